"""metrics.json: per-system scores with bootstrap CIs, the k sweep, paired comparisons, the retrieval
block, and the config and machine the numbers were measured with. Reads only the prediction log."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from configs.models import lm_fingerprint
from configs.schema import Config
from data_prep.records import QAExample
from data_prep.store import SegmentStore
from eval.ablations import MAJORITY
from eval.metrics import compute_all, get_metric
from eval.plan import Run
from eval.predictions import PredictionLog
from eval.stats import bootstrap_ci, paired_bootstrap_ci
from qa.systems import SYSTEMS, SystemName, parse_system
from retriever.metrics import retrieval_metrics, top_k_answer_accuracy

SWEEP_METRICS = ("em", "f1", "contains")
ABLATION_NOTES = {"random": " (segments replaced by random ones)", "gold": " (gold segment first: oracle)"}


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


def sweep_entry(rows: list[dict], examples: Sequence[QAExample], cfg: Config) -> dict:
    """One k of the sweep: the SWEEP_METRICS with their bootstrap CIs, latency and prompt/prefix sizes."""
    preds, refs = [r["prediction"] for r in rows], [ex.answers for ex in examples]
    out = {}
    for name in SWEEP_METRICS:
        result = get_metric(name).compute(preds, refs)
        out[name] = result.score
        out[f"{name}_ci"] = _ci(result.per_example, cfg)
    latency = np.array([r["latency_ms"] for r in rows], dtype=np.float64)
    out.update(
        latency_ms_mean=float(latency.mean()),
        latency_ms_p95=float(np.percentile(latency, 95)),
        prompt_tokens_mean=_mean([r["prompt_tokens"] for r in rows]),
        prefix_slots_mean=_mean([r["prefix_slots"] for r in rows]),
    )
    return out


def retrieval_summary(
    examples: Sequence[QAExample], top: list[list] | None, search_k: int
) -> tuple[dict | None, tuple[float, float] | None]:
    """(the metrics.json retrieval block, (top-1, top-5) answer accuracy) of the shared search, if any."""
    if top is None:
        return None, None
    block = retrieval_metrics(examples, top, ks=(1, 5))
    block["k_searched"] = search_k
    answers_all = [ex.answers for ex in examples]
    return block, (top_k_answer_accuracy(top, answers_all, 1), top_k_answer_accuracy(top, answers_all, 5))


def system_summaries(
    runs: Sequence[Run],
    examples: Sequence[QAExample],
    plog: PredictionLog,
    metrics,
    cfg: Config,
    accuracy: tuple | None,
    sweep: Sequence[int],
) -> tuple[dict, dict, dict]:
    """(metrics.json entry per system at retriever.top_k, per-example scores per system, the k sweep)."""
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
                + ABLATION_NOTES.get(run.system.ablation, ""),
            )
        if retrieves and sweep and run.k in sweep:
            k_sweep.setdefault(run.mode, {})[str(run.k)] = sweep_entry(rows, examples, cfg)
    return summary, per, k_sweep


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


def run_config(
    cfg: Config,
    *,
    lm_config,
    device,
    retriever,
    ckpt: Path | None,
    manifest: dict | None,
    store: SegmentStore,
    sweep: Sequence[int],
    t_start: float,
) -> dict:
    """The `config` block of metrics.json: what was evaluated, how, on which machine."""
    train_log = None
    if ckpt is not None:
        candidate = ckpt.parent.parent / "logs" / "train.jsonl"
        train_log = str(candidate) if candidate.is_file() else None
    return {
        "lm": cfg.lm.model,
        "lm_config": lm_fingerprint(lm_config),
        "device": str(device),
        "dtype": cfg.lm.dtype,
        "max_new_tokens": cfg.lm.max_new_tokens,
        "decoding": cfg.qa.decoding,
        "reading": cfg.qa.reading if cfg.qa.reading == "joint" else f"{cfg.qa.reading}:{cfg.qa.reading_rule}",
        "rerank": cfg.qa.rerank,
        "retriever": cfg.retriever.model if retriever is not None else None,
        "index": None
        if retriever is None
        else {
            "factory": retriever.manifest.get("factory"),
            "ntotal": retriever.manifest.get("ntotal"),
            **retriever.search_settings,
            "sha256": retriever.manifest.get("sha256"),
        },
        "checkpoint": str(ckpt) if ckpt else None,
        "checkpoint_step": (manifest or {}).get("step"),
        "checkpoint_created": (manifest or {}).get("created"),
        "store": str(Path(cfg.run_dir) / "store"),
        "store_fingerprint": store.fingerprint,
        "split": cfg.data.split,
        "limit": cfg.eval.limit,
        "sample": cfg.eval.sample,
        "seed": cfg.seed,
        "top_k": cfg.retriever.top_k,
        "k_values": list(sweep),
        "batch_size": cfg.eval.batch_size,
        "metrics": list(cfg.eval.metrics),
        "bootstrap": cfg.eval.bootstrap,
        "train_log": train_log,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "eval_seconds": round(time.perf_counter() - t_start, 2),
        "machine": machine(),
    }
