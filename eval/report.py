"""report.md and its PNG plots from metrics.json: `python -m eval.report --config C` re-renders them.

Everything here reads only the metrics.json dict that `eval.run` writes (and the training log it
names), so the report cannot disagree with it: every number in the tables is metrics.json's value,
rounded for display, and each plot function returns the values it drew.

    write_report(metrics, out_dir) -> out_dir/report.md (+ metrics.png, k_sweep.png, loss.png)
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

from common.atomic import atomic_write_bytes, atomic_write_text
from common.errors import UserError
from configs.cli import build_parser, parse, run_main

NONE = "–"
QUALITY = ("em", "f1", "contains", "bertscore_f1", "bleurt")
LABELS = {"em": "EM", "f1": "F1", "contains": "contains", "bertscore_f1": "BERTScore F1", "bleurt": "BLEURT"}


# ---------------------------------------------------------------------------------------------- formatting


def fmt(value, digits: int = 3) -> str:
    """A metrics.json number as the report shows it (`–` for null)."""
    if value is None:
        return NONE
    return f"{value:.{digits}f}"


def fmt_ci(value, ci) -> str:
    """`0.250 [0.125, 0.375]`, or just the value without an interval."""
    if value is None:
        return NONE
    return fmt(value) + (f" [{fmt(ci[0])}, {fmt(ci[1])}]" if ci else "")


def system_row(name: str, s: dict) -> list[str]:
    """One row of the systems table: the cells in the order of SYSTEM_COLUMNS."""
    return [
        f"`{name}`",
        NONE if s.get("k") is None else str(s["k"]),
        fmt_ci(s["em"], s.get("em_ci")),
        fmt_ci(s["f1"], s.get("f1_ci")),
        fmt_ci(s["contains"], s.get("contains_ci")),
        fmt(s["bertscore_f1"]),
        fmt(s["bleurt"]),
        fmt(s["retrieval_top1"]),
        fmt(s["retrieval_top5"]),
        fmt(s["latency_ms_mean"], 1),
        fmt(s.get("latency_ms_p95"), 1),
        fmt(s.get("prompt_tokens_mean"), 1),
        fmt(s.get("prefix_slots_mean"), 1),
    ]


SYSTEM_COLUMNS = [
    "system",
    "k",
    "EM [95% CI]",
    "F1 [95% CI]",
    "contains [95% CI]",
    "BERTScore F1",
    "BLEURT",
    "top-1",
    "top-5",
    "latency mean (ms)",
    "latency p95 (ms)",
    "prompt tokens",
    "prefix slots",
]


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


# ---------------------------------------------------------------------------------------------- plots


def _save(fig, out: Path) -> Path:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(out, buf.getvalue())
    return out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_metrics(metrics: dict, out: Path) -> dict:
    """Grouped bars of the answer metrics per system (95% CI whiskers) and latency bars (p95 marks).

    Returns what was drawn: {"quality": {metric: {system: value}}, "latency_ms_mean": {...}, "latency_ms_p95": {...}}.
    """
    plt = _pyplot()
    order, systems = metrics["order"], metrics["systems"]
    shown = [m for m in QUALITY if any(systems[n][m] is not None for n in order)]
    drawn = {"quality": {m: {n: systems[n][m] for n in order if systems[n][m] is not None} for m in shown}}
    fig, (ax, ax_lat) = plt.subplots(
        1, 2, figsize=(max(9, 1.6 * len(order) + 5), 4.2), gridspec_kw={"width_ratios": [2, 1]}
    )
    width = 0.8 / max(1, len(shown))
    for j, m in enumerate(shown):
        xs, ys, errs = [], [], [[], []]
        for i, n in enumerate(order):
            v = systems[n][m]
            if v is None:
                continue
            ci = systems[n].get(f"{m}_ci")
            xs.append(i + (j - (len(shown) - 1) / 2) * width)
            ys.append(v)
            errs[0].append(v - ci[0] if ci else 0.0)
            errs[1].append(ci[1] - v if ci else 0.0)
        has_ci = any(systems[n].get(f"{m}_ci") for n in order)
        ax.bar(xs, ys, width, yerr=errs if has_ci else None, capsize=2, label=LABELS[m])
    ax.set_xticks(range(len(order)), order, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("score (whiskers: bootstrap 95% CI)")
    ax.set_title(f"answer quality, n = {metrics['n']}")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    lm_systems = [n for n in order if systems[n]["latency_ms_mean"] > 0]  # `majority` runs no LM
    means = {n: systems[n]["latency_ms_mean"] for n in lm_systems}
    p95 = {n: systems[n].get("latency_ms_p95") for n in lm_systems}
    ax_lat.bar(range(len(lm_systems)), list(means.values()), color="tab:gray", label="mean")
    ax_lat.scatter(
        range(len(lm_systems)),
        [p95[n] or 0.0 for n in lm_systems],
        marker="_",
        s=200,
        color="black",
        label="p95",
        zorder=3,
    )
    ax_lat.set_xticks(range(len(lm_systems)), lm_systems, rotation=25, ha="right", fontsize=8)
    ax_lat.set_ylabel("ms per question")
    ax_lat.set_title(f"latency, batch size {metrics['config']['batch_size']}")
    ax_lat.legend(fontsize=8)
    ax_lat.grid(axis="y", alpha=0.3)
    _save(fig, out)
    drawn.update(latency_ms_mean=means, latency_ms_p95=p95)
    return drawn


def plot_k_sweep(metrics: dict, out: Path) -> dict | None:
    """EM vs k and latency vs k per retrieving system; systems that read nothing as dashed lines.

    Returns {"em": {system: {k: value}}, "latency_ms_mean": {system: {k: value}}}, or None without a sweep.
    """
    sweep = metrics.get("k_sweep") or {}
    if not sweep:
        return None
    plt = _pyplot()
    fig, (ax_em, ax_lat) = plt.subplots(1, 2, figsize=(10, 4))
    drawn: dict = {"em": {}, "latency_ms_mean": {}}
    color = 0
    for name, by_k in sweep.items():
        ks = sorted(by_k, key=int)
        drawn["em"][name] = {int(k): by_k[k]["em"] for k in ks}
        drawn["latency_ms_mean"][name] = {int(k): by_k[k]["latency_ms_mean"] for k in ks}
        for ax, key in ((ax_em, "em"), (ax_lat, "latency_ms_mean")):
            ax.plot(
                [int(k) for k in ks],
                [by_k[k][key] for k in ks],
                marker="o",
                color=f"C{color % 10}",
                label=name,
            )
        color += 1
    for name in metrics["order"]:
        s = metrics["systems"][name]
        if name in sweep or s.get("k") is not None:
            continue
        style = dict(linestyle="--", linewidth=1, color=f"C{color % 10}")
        color += 1
        lm = s["latency_ms_mean"] > 0  # `majority` runs no LM
        ax_em.axhline(s["em"], label=f"{name} ({'no retrieval' if lm else 'no LM'})", **style)
        if lm:
            ax_lat.axhline(s["latency_ms_mean"], label=f"{name} (no retrieval)", **style)
    all_ks = sorted({int(k) for by_k in sweep.values() for k in by_k})
    for ax, label in ((ax_em, "EM"), (ax_lat, "latency per question (ms)")):
        ax.set_xlabel("k (segments read)")
        ax.set_ylabel(label)
        ax.set_xticks(all_ks)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax_em.set_title("EM vs k")
    ax_lat.set_title(f"latency vs k (batch size {metrics['config']['batch_size']})")
    _save(fig, out)
    return drawn


def plot_training(train_log: str | None, out: Path) -> Path | None:
    """The training loss curve of the evaluated checkpoint (qa.plots), written atomically."""
    if not train_log or not Path(train_log).is_file():
        return None
    from qa.plots import plot_loss

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}.png"
    try:
        if plot_loss(Path(train_log), tmp) is None:
            return None
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def final_dev_em(train_log: str | None) -> dict | None:
    if not train_log or not Path(train_log).is_file():
        return None
    from qa.plots import read_log

    finals = [r["final_dev_em"] for r in read_log(Path(train_log)) if "final_dev_em" in r]
    return finals[-1] if finals else None


# ---------------------------------------------------------------------------------------------- report


def _hybrid_note(hybrid: dict | None) -> str:
    """How the dense ranking was fused with BM25 ('' when it was not)."""
    if not hybrid:
        return ""
    return f", fused with BM25 k1 {hybrid['k1']} b {hybrid['b']}: {hybrid['fusion']}, weight {hybrid['weight']}"


def _setup_lines(m: dict) -> list[str]:
    c = m["config"]
    index = c.get("index")
    lines = [
        f"- **{m['n']} questions** of split `{m['split']}` ("
        + (
            f"a random sample of {c['limit']}, seed {c['seed']})"
            if c.get("sample") == "random"
            else f"the first {c['limit']} of the split)"
        )
        if c.get("limit")
        else f"- **{m['n']} questions**: every question of split `{m['split']}`",
        f"  from `{c['store']}` (segments {c['store_fingerprint']}), seed {c['seed']}",
        f"- LM `{c['lm']}` ({c['lm_config'].get('num_hidden_layers')} layers), dtype {c['dtype']}, "
        f"greedy{' over spans of the segments read (qa.decoding=span)' if c.get('decoding') == 'span' else ''}, "
        f"at most {c['max_new_tokens']} new tokens, device `{c['device']}`",
        f"- retriever `{c['retriever']}`, index {index['factory']} ({index['ntotal']} segments, nprobe "
        f"{index['nprobe']}{_hybrid_note(index.get('hybrid'))}), k = {c['top_k']} segments read"
        if index
        else "- no retriever (no system retrieves)",
        f"- checkpoint `{c['checkpoint']}` (step {c['checkpoint_step']}, {c['checkpoint_created']})"
        if c.get("checkpoint")
        else "- no checkpoint (no trained system evaluated)",
        f"- latency: wall time of a batch of {c['batch_size']} questions divided by its size (retrieval, "
        "prefix encoding and generation), one untimed warm-up question per system first",
        f"- machine: {c['machine']['processor']}, {c['machine']['cpu_count']} CPUs, torch "
        f"{c['machine']['torch']} with {c['machine']['torch_threads']} threads; run took {c['eval_seconds']} s "
        f"({c['created']})",
    ]
    return lines


def render(m: dict, plots: dict[str, str]) -> str:
    """The report text for metrics `m`; `plots` maps plot kind to its file name (present ones only)."""
    order, systems = m["order"], m["systems"]
    c = m["config"]
    out = ["# Evaluation report", "", *_setup_lines(m), "", "## Systems", ""]
    out += table(SYSTEM_COLUMNS, [system_row(n, systems[n]) for n in order])
    out += [
        "",
        f"EM, F1 and contains are fractions of questions; brackets: percentile bootstrap 95% CI over "
        f"questions ({c['bootstrap']} resamples). top-1 / top-5: an answer string occurs in the first 1 / 5 "
        "segments of one shared top-5 search (– for systems that do not retrieve, and for ablations, which "
        "are fed their segments). Latency and token counts are means per question; a question's latency is "
        "its batch's wall time over the batch size, so p95 is over batches. Ablation latencies exclude "
        "retrieval (their segments are given).",
    ]
    if m.get("skipped"):
        out += ["", "Not computed:"] + [f"- {LABELS.get(k, k)}: {v}" for k, v in sorted(m["skipped"].items())]
    if m.get("majority"):
        out += ["", f"No `majority` row: {m['majority']}"]
    if "metrics" in plots:
        out += ["", f"![answer quality and latency per system]({plots['metrics']})"]
    if m.get("comparisons"):
        out += [
            "",
            "## Paired differences",
            "",
            "Same questions, paired bootstrap (system − baseline); * = the 95% CI excludes 0.",
            "",
        ]
        out += table(
            ["system", "baseline", "metric", "difference", "95% CI", "p"],
            [
                [
                    f"`{d['system']}`",
                    f"`{d['baseline']}`",
                    LABELS[d["metric"]],
                    fmt(d["diff"]) + (" *" if d["significant"] else ""),
                    f"[{fmt(d['ci'][0])}, {fmt(d['ci'][1])}]",
                    fmt(d["p_value"]),
                ]
                for d in m["comparisons"]
            ],
        )
    if m.get("retrieval"):
        r = m["retrieval"]
        keys = [k for k in r if k not in ("n", "k_searched")]
        out += ["", "## Retrieval", "", f"One top-{r['k_searched']} search per question (n = {r['n']}).", ""]
        out += table(["metric", "value"], [[k, fmt(r[k])] for k in keys])
    if m.get("k_sweep"):
        out += ["", "## Answers vs k", ""]
        rows = []
        for name, by_k in m["k_sweep"].items():
            for k in sorted(by_k, key=int):
                e = by_k[k]
                rows.append(
                    [
                        f"`{name}`",
                        k,
                        fmt_ci(e["em"], e.get("em_ci")),
                        fmt_ci(e["f1"], e.get("f1_ci")),
                        fmt_ci(e["contains"], e.get("contains_ci")),
                        fmt(e["latency_ms_mean"], 1),
                        fmt(e["latency_ms_p95"], 1),
                        fmt(e["prompt_tokens_mean"], 1),
                        fmt(e["prefix_slots_mean"], 1),
                    ]
                )
        out += table(
            [
                "system",
                "k",
                "EM",
                "F1",
                "contains",
                "latency mean (ms)",
                "latency p95 (ms)",
                "prompt tokens",
                "prefix slots",
            ],
            rows,
        )
        if "k_sweep" in plots:
            out += ["", f"![EM and latency vs k]({plots['k_sweep']})"]
    if "loss" in plots or m.get("final_dev_em"):
        out += ["", "## Training", ""]
        if m.get("final_dev_em"):
            out += [
                "Final dev EM in the training log: "
                + ", ".join(f"`{k}` {fmt(v)}" for k, v in m["final_dev_em"].items()),
                "",
            ]
        if "loss" in plots:
            out += [f"![training loss]({plots['loss']}) (from `{c['train_log']}`)"]
    out += ["", "## What the systems see", ""]
    out += [f"- `{n}`: {systems[n].get('description', '')}" for n in order]
    return "\n".join(out) + "\n"


def write_report(metrics: dict, out_dir: Path) -> Path:
    """Write out_dir/report.md and its plots (each atomically); returns the report's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = {"metrics": "metrics.png"}
    plot_metrics(metrics, out_dir / plots["metrics"])
    if plot_k_sweep(metrics, out_dir / "k_sweep.png") is not None:
        plots["k_sweep"] = "k_sweep.png"
    train_log = metrics["config"].get("train_log")
    if plot_training(train_log, out_dir / "loss.png") is not None:
        plots["loss"] = "loss.png"
    final = final_dev_em(train_log)
    text = render({**metrics, "final_dev_em": final} if final else metrics, plots)
    atomic_write_text(out_dir / "report.md", text)
    return out_dir / "report.md"


def main(argv=None) -> int:
    parser = build_parser("python -m eval.report", __doc__)
    cfg, ns = parse(parser, argv)
    out_dir = Path(cfg.eval.out_dir) if cfg.eval.out_dir else Path(cfg.run_dir) / "eval"
    path = out_dir / "metrics.json"
    if not path.is_file():
        raise UserError(f"no {path}; run `python -m eval.run --config C` first")
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e}); rerun `python -m eval.run`") from e
    print(write_report(metrics, out_dir))
    return 0


if __name__ == "__main__":
    run_main(main)
