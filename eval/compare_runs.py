"""Paired comparison of two evaluation runs of the same questions (read-only).

    python -m eval.compare_runs BASE NEW [--metrics em,f1,contains] [--resamples 10000] [--seed 0]

BASE and NEW are `eval.run` output folders (their predictions.jsonl) or predictions.jsonl files, e.g. the
same checkpoint evaluated with the dense retriever and with `retriever.hybrid.enabled=true`. For every
system (mode and k) in both, the questions answered in both are paired by id and each metric's NEW − BASE
difference gets a paired percentile bootstrap interval and p-value (eval.stats, as eval.run's own
system-vs-baseline table), with how many questions got better and worse. Only the string metrics (EM,
F1, contains) are recomputed here; BERTScore and BLEURT need their models and stay in each run's report.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from common.errors import UserError
from configs.cli import run_main
from eval.metrics import get_metric
from eval.stats import PairedDifference, paired_bootstrap_ci

STRING_METRICS = ("em", "f1", "contains")


def read_predictions(path: Path) -> dict[tuple[str, int | None], dict[str, dict]]:
    """{(mode, k): {question id: row}} of a predictions.jsonl (or of the folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "predictions.jsonl"
    if not path.is_file():
        raise UserError(
            f"{path}: no such predictions file (give an eval.run output folder or its predictions.jsonl)"
        )
    systems: dict[tuple[str, int | None], dict[str, dict]] = {}
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            lines = list(f)
        except UnicodeDecodeError as e:
            raise UserError(f"{path}: not UTF-8 ({e})") from e
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            key, qid = (row["mode"], row.get("k")), str(row["id"])
            if not isinstance(row["prediction"], str) or not isinstance(row["answers"], list):
                raise TypeError("prediction must be a string and answers a list")
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{path}:{lineno}: not a prediction row ({e})") from e
        systems.setdefault(key, {})[qid] = row
    if not systems:
        raise UserError(f"{path}: holds no predictions")
    return systems


@dataclass
class SystemComparison:
    """One system's metric in both runs over the questions they share."""

    mode: str
    k: int | None
    metric: str
    n: int
    base: float
    new: float
    difference: PairedDifference
    better: int  # questions whose score rose
    worse: int


def compare(
    base: dict, new: dict, metrics: Sequence[str] = ("em", "f1"), n_resamples: int = 10000, seed: int = 0
) -> tuple[list[SystemComparison], list[str]]:
    """Paired NEW − BASE per system and metric, and notes on what could not be paired."""
    unknown = [m for m in metrics if m not in STRING_METRICS]
    if unknown:
        raise UserError(
            f"--metrics: {unknown} are not recomputed here; choose from {', '.join(STRING_METRICS)}"
        )
    scorers = {m: get_metric(m) for m in metrics}
    shared = sorted(set(base) & set(new), key=lambda s: (s[0], s[1] or 0))
    if not shared:
        raise UserError(f"the runs share no system: {sorted(base)} against {sorted(new)}")
    notes = [
        f"only in one run: {m}" + (f" k={k}" if k is not None else "")
        for m, k in sorted(set(base) ^ set(new))
    ]
    out = []
    for mode, k in shared:
        a, b = base[(mode, k)], new[(mode, k)]
        ids = sorted(set(a) & set(b))
        if len(ids) < len(set(a) | set(b)):
            notes.append(f"{mode}: {len(set(a) ^ set(b))} question(s) answered in one run only, left out")
        if not ids:
            continue
        for name, scorer in scorers.items():
            per = [
                scorer.compute(
                    [rows[i]["prediction"] for i in ids], [rows[i]["answers"] for i in ids]
                ).per_example
                for rows in (a, b)
            ]
            diff = paired_bootstrap_ci(per[1], per[0], n_resamples=n_resamples, seed=seed)
            out.append(
                SystemComparison(
                    mode=mode,
                    k=k,
                    metric=name,
                    n=len(ids),
                    base=sum(per[0]) / len(ids),
                    new=sum(per[1]) / len(ids),
                    difference=diff,
                    better=sum(y > x for x, y in zip(*per)),
                    worse=sum(y < x for x, y in zip(*per)),
                )
            )
    return out, notes


def to_markdown(rows: Sequence[SystemComparison], base_name: str, new_name: str) -> str:
    lines = [
        f"BASE = `{base_name}`, NEW = `{new_name}`; difference NEW − BASE, paired bootstrap 95% CI (* = excludes 0).",
        "",
        "| system | k | metric | n | BASE | NEW | difference | 95% CI | p | better / worse |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        d = r.difference
        lines.append(
            f"| `{r.mode}` | {'–' if r.k is None else r.k} | {r.metric} | {r.n} | {r.base:.3f} | {r.new:.3f} | "
            f"{d.diff:+.3f}{' *' if d.significant else ''} | [{d.low:+.3f}, {d.high:+.3f}] | {d.p_value:.3f} | "
            f"{r.better} / {r.worse} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m eval.compare_runs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("base", help="the baseline run: an eval.run output folder or its predictions.jsonl")
    parser.add_argument("new", help="the run compared with it, on the same questions")
    parser.add_argument(
        "--metrics", default="em,f1", help=f"comma list of {', '.join(STRING_METRICS)} (default em,f1)"
    )
    parser.add_argument("--resamples", type=int, default=10000, help="bootstrap resamples (default 10000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    ns = parser.parse_args(argv)
    if ns.resamples < 1:
        raise UserError(f"--resamples must be at least 1, got {ns.resamples}")
    metrics = [m.strip() for m in ns.metrics.split(",") if m.strip()]
    rows, notes = compare(
        read_predictions(Path(ns.base)), read_predictions(Path(ns.new)), metrics, ns.resamples, ns.seed
    )
    print(to_markdown(rows, ns.base, ns.new))
    for note in notes:
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    run_main(main)
