"""Evaluate systems side by side: `python -m eval.run --config C [eval.systems=...] [eval.limit=N]`.

Questions: the segment store's QA examples of `data.split` (run_dir/store/qa.jsonl; default `test`, the
split that no training command reads), in file order, the first `eval.limit` of them. Every system of
`eval.systems` answers the same questions with the same frozen LM and the same retriever, reading
`retriever.top_k` segments; `eval.k_values` adds a sweep over k for the systems that retrieve. The
systems: closed_book, rag_text (no checkpoint), rag_text_tuned, static_prefix, dynamic_prefix, combine
(trained: read from qa.checkpoint, default run_dir/checkpoints/final); variants as NAME@tag; the
evaluation-only ablations NAME~random (random store segments instead of the retrieved ones) and
NAME~gold (the gold segment first: an oracle). A `majority` row (the most frequent training answer of
the question's relation, no LM) is always added.

Outputs, in `eval.out_dir` (default run_dir/eval):
  predictions.jsonl  one row per (question, system, k): {id, question, prediction, answers, mode, k,
                     retrieved: [{segment_id, score, has_answer}], latency_ms, timings, prompt_tokens,
                     prefix_slots, setup}; appended batch by batch, so a rerun after a crash answers only
                     what is missing (rows made with another LM, checkpoint, index, store or batch size
                     are recomputed; a torn last line is dropped; eval.resume=false recomputes all)
  metrics.json       per system: em, f1, contains (+ bootstrap 95% CIs), bertscore_f1, bleurt,
                     retrieval_top1/top5 (on one shared top-5 search), latency mean/p95 per question at
                     eval.batch_size, prompt tokens, prefix slots; the k sweep; paired EM/F1 differences
                     (each system vs closed_book, prefix systems vs rag_text_tuned, NAME~ablation vs
                     NAME); the config and machine
  report.md          the same as tables, with metrics.png, k_sweep.png and the training loss.png

examples:
  python -m eval.run --config configs/default.yaml eval.limit=50
  python -m eval.run -c configs/default.yaml eval.systems=closed_book,rag_text eval.k_values=1,2,4
  python -m eval.run -c configs/default.yaml eval.systems=dynamic_prefix,dynamic_prefix~random
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from configs.cli import build_parser, parse, run_main
from configs.errors import UserError
from configs.models import lm_fingerprint, resolve_device, resolve_lm_path
from configs.schema import Config
from data_prep.atomic import atomic_write_json, atomic_write_text, fingerprint, sha256_file
from data_prep.records import QAExample
from data_prep.store import SegmentStore, load_qa
from eval.ablations import MAJORITY, gold_hits, majority_predictions, random_hits
from eval.metrics import build_metrics, compute_all, get_metric
from eval.stats import bootstrap_ci, paired_bootstrap_ci
from qa.checkpoint import read_manifest
from qa.system import checkpoint_name, default_checkpoint
from qa.systems import SYSTEMS, SystemName, parse_system, parse_systems
from retriever.metrics import AnswerMatcher, retrieval_metrics, top_k_answer_accuracy

log = logging.getLogger("eval.run")

PREDICTIONS = "predictions.jsonl"
SWEEP_METRICS = ("em", "f1", "contains")


@dataclass(frozen=True)
class Run:
    """One (system, k) that answers every question; k is None for systems that read no segments."""

    system: SystemName
    k: int | None

    @property
    def mode(self) -> str:
        return str(self.system)


# ---------------------------------------------------------------------------------------------- inputs


def load_examples(cfg: Config) -> list[QAExample]:
    """The first eval.limit questions of data.split, refusing questions without gold answers."""
    store_dir = Path(cfg.run_dir) / "store"
    examples = load_qa(store_dir, cfg.data.split)
    if not examples:
        raise UserError(
            f"{store_dir / 'qa.jsonl'} has no `{cfg.data.split}` questions; pick another data.split "
            "or rebuild the store with a non-zero data.test_fraction / data.dev_fraction"
        )
    if cfg.eval.limit is not None:
        if cfg.eval.limit < 1:
            raise UserError(f"eval.limit must be >= 1 (or null for all), got {cfg.eval.limit}")
        examples = examples[: cfg.eval.limit]
    unanswered = [ex.id for ex in examples if not any(a.strip() for a in ex.answers)]
    if unanswered:
        raise UserError(
            f"{store_dir / 'qa.jsonl'}: {len(unanswered)} of the {len(examples)} `{cfg.data.split}` questions "
            f"evaluated have no gold answers (first: id {unanswered[0]}); eval.run scores predictions against "
            "gold answers, so build the store from a QA file with `answers` (to just answer questions, use "
            "`python -m qa.answer`)"
        )
    seen: set[str] = set()
    for ex in examples:
        if ex.id in seen:
            raise UserError(
                f"{store_dir / 'qa.jsonl'}: question id {ex.id!r} occurs twice; ids must be unique"
            )
        seen.add(ex.id)
    return examples


def plan_runs(cfg: Config) -> tuple[list[SystemName], list[Run], list[int]]:
    """(systems, every (system, k) to answer, the sorted k sweep)."""
    names = [n for n in cfg.eval.systems if n.strip() != MAJORITY]  # majority is always reported
    if not names:
        raise UserError(f"eval.systems is empty; choose from {', '.join(SYSTEMS)}")
    systems = parse_systems(names)
    if cfg.eval.batch_size < 1:
        raise UserError(f"eval.batch_size must be >= 1, got {cfg.eval.batch_size}")
    if any(k < 1 for k in cfg.eval.k_values):
        raise UserError(f"eval.k_values must be >= 1, got {cfg.eval.k_values}")
    if cfg.eval.bootstrap < 0:
        raise UserError(
            f"eval.bootstrap must be >= 0 (0 = no confidence intervals), got {cfg.eval.bootstrap}"
        )
    sweep = sorted(set(cfg.eval.k_values) | {cfg.retriever.top_k}) if cfg.eval.k_values else []
    runs = []
    for s in systems:
        if s.kind.retrieves:
            runs += [Run(s, k) for k in dict.fromkeys([cfg.retriever.top_k, *sweep])]
        else:
            runs.append(Run(s, None))
    return systems, runs, sweep


def check_checkpoint(cfg: Config, systems: Sequence[SystemName]) -> tuple[Path | None, dict | None]:
    """The checkpoint the trained systems read, checked before the LM is loaded."""
    trained = [str(s) for s in systems if s.trainable]
    if not trained:
        return None, None
    directory = default_checkpoint(cfg)
    if not (directory / "manifest.json").is_file():
        raise UserError(
            f"eval.systems lists {', '.join(trained)}, which need a trained checkpoint, and there is none at "
            f"{directory}: train with `python -m qa.train --config C`, set qa.checkpoint=DIR, or evaluate "
            "only eval.systems=closed_book,rag_text"
        )
    manifest = read_manifest(directory)
    held = list(manifest["systems"])
    missing = [str(s) for s in systems if s.trainable and checkpoint_name(s, held) not in held]
    if missing:
        raise UserError(
            f"checkpoint {directory} has no {', '.join(missing)}; it holds: "
            f"{', '.join(held) or 'nothing'} (closed_book and rag_text need no checkpoint)"
        )
    return directory, manifest


def _digest_dir(path: Path) -> str:
    return fingerprint(
        {str(p.relative_to(path)): sha256_file(p) for p in sorted(path.rglob("*")) if p.is_file()}
    )


def setups(
    cfg: Config,
    runs: Sequence[Run],
    lm_config,
    store: SegmentStore,
    retriever,
    ckpt: Path | None,
    held: Sequence[str],
) -> dict[str, str]:
    """mode -> fingerprint of everything its predictions depend on (a row with another one is recomputed)."""
    common = {
        "lm": cfg.lm.model,
        "lm_config": lm_fingerprint(lm_config),
        "dtype": cfg.lm.dtype,
        "system_prompt": cfg.lm.system_prompt,
        "max_new_tokens": cfg.lm.max_new_tokens,
        "store": store.fingerprint,
        "qa": store.qa_fingerprint,
        "batch_size": cfg.eval.batch_size,
        "device": str(resolve_device(cfg.device)),
    }
    out = {MAJORITY: fingerprint({"qa": store.qa_fingerprint})}
    for run in runs:
        setup = dict(common)
        if run.system.kind.retrieves:
            live = Path(cfg.run_dir) / "live" / "manifest.json"
            setup["retriever"] = {
                "model": cfg.retriever.model,
                "encoder": retriever.encoder.fingerprint,
                "index": retriever.manifest.get("sha256"),
                "nprobe": cfg.index.nprobe,
                "query_prefix": cfg.retriever.query_prefix,
                "live": sha256_file(live) if live.is_file() else None,
            }
        if run.system.ablation:
            setup["ablation_seed"] = cfg.seed
        if run.system.trainable:
            setup["checkpoint"] = _digest_dir(ckpt / checkpoint_name(run.system, held))
        out[run.mode] = fingerprint(setup)
    return out


# ---------------------------------------------------------------------------------------------- predictions


class PredictionLog:
    """predictions.jsonl, keyed by (id, mode, k): loaded once, then appended to batch by batch."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: dict[tuple, dict] = {}

    @staticmethod
    def key(row: dict) -> tuple:
        return row["id"], row["mode"], row.get("k")

    def load(self, setups_by_mode: dict[str, str], resume: bool) -> int:
        """Read kept rows; drop a torn last line and rows of these modes made with another setup (or all
        of them if not `resume`), rewriting the file if anything was dropped. Returns rows dropped."""
        if not self.path.is_file():
            return 0
        lines = self.path.read_bytes().split(b"\n")
        complete, tail = lines[:-1], lines[-1]  # rows end in a newline: a non-empty tail is a torn write
        kept: dict[tuple, dict] = {}
        dropped = int(bool(tail.strip()))
        for lineno, line in enumerate(complete, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                key = self.key(row)
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
                raise UserError(
                    f"{self.path}:{lineno}: corrupt prediction row ({e}); delete the file "
                    "(or run with eval.resume=false) to recompute"
                ) from e
            mode = row["mode"]
            if mode in setups_by_mode and (not resume or row.get("setup") != setups_by_mode[mode]):
                dropped += 1
                continue
            kept[key] = row
        self.rows = kept
        if dropped:
            log.info("%s: dropped %d stale or torn row(s); they will be recomputed", self.path, dropped)
            atomic_write_text(
                self.path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept.values())
            )
        return dropped

    def append(self, rows: Sequence[dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            f.flush()
            os.fsync(f.fileno())
        for r in rows:
            self.rows[self.key(r)] = r

    def get(self, example_id: str, run: Run) -> dict | None:
        return self.rows.get((example_id, run.mode, run.k))


def prediction_row(ex: QAExample, pred, run: Run, setup: str) -> dict:
    matcher = AnswerMatcher(ex.answers)
    return {
        "id": ex.id,
        "question": ex.question,
        "prediction": pred.prediction,
        "answers": list(ex.answers),
        "mode": run.mode,
        "k": run.k,
        "retrieved": [
            {
                "segment_id": int(h.segment_id),
                "score": round(float(h.score), 6),
                "has_answer": matcher(h.text),
            }
            for h in pred.retrieved
        ],
        "latency_ms": float(pred.latency_ms),
        "timings": {k: float(v) for k, v in pred.timings.items()},
        "prompt_tokens": int(pred.prompt_tokens),
        "prefix_slots": int(pred.prefix_slots),
        "setup": setup,
    }


def shared_search(retriever, questions: Sequence[str], k: int, progress: bool) -> list[list]:
    """One top-k search for every question, shared by the retrieval metrics and the ~gold oracle."""
    out: list[list] = []
    step = 64
    for start in tqdm(range(0, len(questions), step), desc="retrieval", unit="batch", disable=not progress):
        out += retriever.batch_search(list(questions[start : start + step]), k)
    return out


def answer_runs(
    qa_factory,
    runs: Sequence[Run],
    examples: Sequence[QAExample],
    plog: PredictionLog,
    setup: dict[str, str],
    ablation_hits,
    batch_size: int,
    progress: bool,
) -> None:
    """Answer every (question, run) not yet in `plog`, batch by batch, appending as each batch finishes."""
    todo = {run: [i for i, ex in enumerate(examples) if plog.get(ex.id, run) is None] for run in runs}
    total = sum(len(v) for v in todo.values())
    if total == 0:
        return
    qa = qa_factory()
    bar = tqdm(total=total, desc="answering", unit="q", disable=not progress)
    warmed: set[str] = set()
    for run, idx in todo.items():
        if not idx:
            continue
        bar.set_postfix_str(run.mode + ("" if run.k is None else f" k={run.k}"))
        hits_all = ablation_hits(run, examples) if run.system.ablation else None
        if run.mode not in warmed:
            # One untimed question first, so lazy initialisation does not land in the first batch's latency.
            qa.answer(
                [examples[idx[0]].question],
                mode=run.mode,
                top_k=run.k,
                hits=None if hits_all is None else [hits_all[idx[0]]],
                batch_size=1,
            )
            warmed.add(run.mode)
        for start in range(0, len(idx), batch_size):
            chunk = idx[start : start + batch_size]
            hits = None if hits_all is None else [hits_all[i] for i in chunk]
            preds = qa.answer(
                [examples[i].question for i in chunk],
                mode=run.mode,
                top_k=run.k,
                hits=hits,
                batch_size=batch_size,
            )
            plog.append([prediction_row(examples[i], p, run, setup[run.mode]) for i, p in zip(chunk, preds)])
            bar.update(len(chunk))
    bar.close()


# ---------------------------------------------------------------------------------------------- summaries


def _ci(per: list[float] | None, cfg: Config) -> list[float] | None:
    if per is None or cfg.eval.bootstrap == 0:
        return None
    return [round(v, 6) for v in bootstrap_ci(per, cfg.eval.bootstrap, seed=cfg.seed)]


def _mean(values) -> float:
    return float(np.mean(values)) if len(values) else 0.0


def summarize(
    rows: list[dict],
    examples: Sequence[QAExample],
    metrics,
    cfg: Config,
    retrieves: bool,
    retrieval: tuple | None,
) -> tuple[dict, dict[str, list[float]]]:
    """(metrics.json entry of one system, per-example scores for paired comparisons)."""
    results = compute_all(metrics, [r["prediction"] for r in rows], [ex.answers for ex in examples])
    out: dict = {name: res.score for name, res in results.items()}
    for name in SWEEP_METRICS:
        out[f"{name}_ci"] = _ci(results[name].per_example, cfg)
    latency = np.array([r["latency_ms"] for r in rows], dtype=np.float64)
    out["latency_ms_mean"] = float(latency.mean())
    out["latency_ms_p95"] = float(np.percentile(latency, 95))
    keys = sorted({k for r in rows for k in r.get("timings", {})})
    out["timings_ms_mean"] = {k: _mean([r["timings"].get(k, 0.0) for r in rows]) for k in keys}
    out["prompt_tokens_mean"] = _mean([r["prompt_tokens"] for r in rows])
    out["prefix_slots_mean"] = _mean([r["prefix_slots"] for r in rows])
    out["context_has_answer"] = (
        _mean([any(h["has_answer"] for h in r["retrieved"]) for r in rows]) if retrieves else None
    )
    out["retrieval_top1"], out["retrieval_top5"] = retrieval if retrieval else (None, None)
    out["skipped"] = {name: res.skipped_reason for name, res in results.items() if res.skipped}
    per = {name: res.per_example for name, res in results.items() if res.per_example is not None}
    return out, per


def sweep_entry(rows: list[dict], examples: Sequence[QAExample]) -> dict:
    preds, refs = [r["prediction"] for r in rows], [ex.answers for ex in examples]
    out = {name: get_metric(name).compute(preds, refs).score for name in SWEEP_METRICS}
    latency = np.array([r["latency_ms"] for r in rows], dtype=np.float64)
    out.update(
        latency_ms_mean=float(latency.mean()),
        latency_ms_p95=float(np.percentile(latency, 95)),
        prompt_tokens_mean=_mean([r["prompt_tokens"] for r in rows]),
        prefix_slots_mean=_mean([r["prefix_slots"] for r in rows]),
    )
    return out


def comparison_pairs(names: Sequence[str]) -> list[tuple[str, str]]:
    """(system, baseline) pairs worth a paired test: every LM system against closed_book, prefix systems
    against rag_text_tuned (the trained baseline to match), and each ablation against its plain system
    (`~random` must lose if the system uses what it reads)."""
    pairs = []
    for name in names:
        if name == MAJORITY:
            continue
        system = parse_system(name)
        if name != "closed_book" and "closed_book" in names:
            pairs.append((name, "closed_book"))
        if system.kind.dynamic and not system.ablation and "rag_text_tuned" in names:
            pairs.append((name, "rag_text_tuned"))
        plain = str(SystemName(system.base, system.tag))
        if system.ablation and plain in names:
            pairs.append((name, plain))
    return pairs


def comparisons(per: dict[str, dict[str, list[float]]], cfg: Config) -> list[dict]:
    """Paired bootstrap differences (system - baseline) in EM and F1 on the same questions."""
    if cfg.eval.bootstrap == 0:
        return []
    out = []
    for name, baseline in comparison_pairs(list(per)):
        for metric in ("em", "f1"):
            d = paired_bootstrap_ci(
                per[name][metric], per[baseline][metric], cfg.eval.bootstrap, seed=cfg.seed
            )
            out.append(
                {
                    "system": name,
                    "baseline": baseline,
                    "metric": metric,
                    "diff": d.diff,
                    "ci": [d.low, d.high],
                    "p_value": d.p_value,
                    "significant": d.significant,
                }
            )
    return out


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


# ---------------------------------------------------------------------------------------------- the run


def evaluate(cfg: Config, progress: bool = True) -> dict:
    """Answer, score and report; returns the metrics.json content."""
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    if cfg.eval.threads < 0:
        raise UserError(f"eval.threads must be >= 0 (0 = torch's default), got {cfg.eval.threads}")
    if cfg.eval.threads:
        torch.set_num_threads(cfg.eval.threads)
    run_dir = Path(cfg.run_dir)
    out_dir = Path(cfg.eval.out_dir) if cfg.eval.out_dir else run_dir / "eval"
    systems, runs, sweep = plan_runs(cfg)
    examples = load_examples(cfg)
    store = SegmentStore.open(run_dir / "store")
    device = resolve_device(cfg.device)
    metrics = build_metrics(cfg.eval, str(device))  # bad metric settings fail before any answering
    ckpt, manifest = check_checkpoint(cfg, systems)
    held = list(manifest["systems"]) if manifest else []
    if cfg.data.split in ("train", "all") and ckpt is not None:
        log.warning("data.split=%s: the trained systems were trained on these questions", cfg.data.split)

    retriever = None
    retrieving = any(s.kind.retrieves for s in systems)
    if retrieving:
        from retriever.search import Retriever

        retriever = Retriever.from_config(cfg)
    from transformers import AutoConfig

    lm_config = AutoConfig.from_pretrained(resolve_lm_path(cfg.lm.model, cfg.cache_dir))
    setup = setups(cfg, runs, lm_config, store, retriever, ckpt, held)
    plog = PredictionLog(out_dir / PREDICTIONS)
    plog.load(setup, cfg.eval.resume)

    questions = [ex.question for ex in examples]
    search_k = max([5, cfg.retriever.top_k, *sweep])
    top = shared_search(retriever, questions, search_k, progress) if retriever is not None else None

    def ablation_hits(run: Run, exs):
        if run.system.ablation == "random":
            return random_hits(store, exs, run.k, cfg.seed)
        hits, without = gold_hits(store, exs, top, run.k)
        if without:
            log.warning(
                "%s: %d of %d questions have no gold segment and read their retrieved ones",
                run.mode,
                without,
                len(exs),
            )
        return hits

    def qa_factory():
        from configs.models import load_lm
        from qa.system import QASystem

        lm, tokenizer = load_lm(cfg.lm.model, cfg.cache_dir, cfg.device, cfg.lm.dtype)
        plain = list(dict.fromkeys(str(SystemName(s.base, s.tag)) for s in systems))
        return QASystem.from_config(cfg, systems=plain, lm=lm, tokenizer=tokenizer, retriever=retriever)

    answer_runs(qa_factory, runs, examples, plog, setup, ablation_hits, cfg.eval.batch_size, progress)

    # The majority baseline: no LM, no latency.
    train = load_qa(run_dir / "store", "train")
    try:
        answers, majority_rule = majority_predictions(train, examples)
    except UserError as e:
        answers, majority_rule = None, str(e)
    if answers is not None:
        empty = {
            "question": "",
            "retrieved": [],
            "latency_ms": 0.0,
            "timings": {},
            "prompt_tokens": 0,
            "prefix_slots": 0,
        }
        missing = [
            dict(
                empty,
                id=ex.id,
                question=ex.question,
                prediction=a,
                answers=list(ex.answers),
                mode=MAJORITY,
                k=None,
                setup=setup[MAJORITY],
            )
            for ex, a in zip(examples, answers)
            if (ex.id, MAJORITY, None) not in plog.rows
        ]
        if missing:
            plog.append(missing)

    retrieval_block, accuracy = None, None
    if top is not None:
        retrieval_block = retrieval_metrics(examples, top, ks=(1, 5))
        retrieval_block["k_searched"] = search_k
        answers_all = [ex.answers for ex in examples]
        accuracy = (top_k_answer_accuracy(top, answers_all, 1), top_k_answer_accuracy(top, answers_all, 5))

    summary, per, k_sweep = {}, {}, {}
    for run in runs:
        rows = [plog.get(ex.id, run) for ex in examples]
        retrieves = run.system.kind.retrieves
        if run.k in (None, cfg.retriever.top_k):
            summary[run.mode], per[run.mode] = summarize(
                rows,
                examples,
                metrics,
                cfg,
                retrieves,
                accuracy if retrieves and not run.system.ablation else None,
            )
            summary[run.mode].update(
                k=run.k,
                description=SYSTEMS[run.system.base].description
                + {
                    "random": " (segments replaced by random ones)",
                    "gold": " (gold segment first: oracle)",
                }.get(run.system.ablation, ""),
            )
        if retrieves and sweep and run.k in sweep:
            k_sweep.setdefault(run.mode, {})[str(run.k)] = sweep_entry(rows, examples)
    order = [str(s) for s in systems]
    if answers is not None:
        rows = [plog.rows[(ex.id, MAJORITY, None)] for ex in examples]
        summary[MAJORITY], per[MAJORITY] = summarize(rows, examples, metrics, cfg, False, None)
        summary[MAJORITY].update(k=None, description=f"no LM: {majority_rule}")
        order.append(MAJORITY)

    skipped = {}
    for entry in summary.values():
        for name, reason in entry["skipped"].items():
            skipped.setdefault(name, reason)
    train_log = None
    if ckpt is not None:
        candidate = ckpt.parent.parent / "logs" / "train.jsonl"
        train_log = str(candidate) if candidate.is_file() else None
    result = {
        "n": len(examples),
        "split": cfg.data.split,
        "order": order,
        "systems": summary,
        "k_sweep": k_sweep,
        "retrieval": retrieval_block,
        "comparisons": comparisons(per, cfg),
        "skipped": skipped,
        "majority": None if answers is not None else majority_rule,
        "config": {
            "lm": cfg.lm.model,
            "lm_config": lm_fingerprint(lm_config),
            "device": str(device),
            "dtype": cfg.lm.dtype,
            "max_new_tokens": cfg.lm.max_new_tokens,
            "retriever": cfg.retriever.model if retriever is not None else None,
            "index": None
            if retriever is None
            else {
                "factory": retriever.manifest.get("factory"),
                "ntotal": retriever.manifest.get("ntotal"),
                "nprobe": cfg.index.nprobe,
                "sha256": retriever.manifest.get("sha256"),
            },
            "checkpoint": str(ckpt) if ckpt else None,
            "checkpoint_step": (manifest or {}).get("step"),
            "checkpoint_created": (manifest or {}).get("created"),
            "store": str(run_dir / "store"),
            "store_fingerprint": store.fingerprint,
            "split": cfg.data.split,
            "limit": cfg.eval.limit,
            "seed": cfg.seed,
            "top_k": cfg.retriever.top_k,
            "k_values": sweep,
            "batch_size": cfg.eval.batch_size,
            "metrics": list(cfg.eval.metrics),
            "bootstrap": cfg.eval.bootstrap,
            "train_log": train_log,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "eval_seconds": round(time.perf_counter() - t_start, 2),
            "machine": machine(),
        },
    }
    atomic_write_json(out_dir / "metrics.json", result)
    from eval.report import write_report

    write_report(result, out_dir)
    return result


def main(argv=None) -> int:
    parser = build_parser("python -m eval.run", __doc__)
    cfg, ns = parse(parser, argv)
    if ns.args:
        raise UserError(
            f"unexpected arguments {ns.args}; this command takes only --config and key=value overrides"
        )
    result = evaluate(cfg)
    out_dir = Path(cfg.eval.out_dir) if cfg.eval.out_dir else Path(cfg.run_dir) / "eval"
    print(f"{result['n']} `{result['split']}` questions; report: {out_dir / 'report.md'}")
    for name in result["order"]:
        s = result["systems"][name]
        print(f"  {name:<28} EM {s['em']:.3f}  F1 {s['f1']:.3f}  latency {s['latency_ms_mean']:.0f} ms")
    return 0


if __name__ == "__main__":
    run_main(main)
