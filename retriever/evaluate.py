"""Retrieval metrics on held-out questions: `python -m retriever.evaluate --config C [key=value ...]`.

Searches `run_dir/index` with `retriever.model` for the questions of `data.split` (dev or test, the
held-out articles; `retriever.finetune.eval_limit` caps them, 0 = all) and prints top-k answer accuracy,
gold-document hit@k, recall@k and MRR@10 twice: at `index.nprobe`, what the QA system gets, and with every
IVF list searched, what the encoder alone gets (indexes up to 200k segments). With
`retriever.hybrid.enabled=true` both are the fused dense + BM25 ranking (run_dir/bm25 is built on first use).
Read-only otherwise: an index built by another encoder or from another store is refused, never rebuilt.
The numbers also go to `run_dir/logs/retriever_eval.json`.

`--hybrid-weights 0,0.1,...,1` sweeps the BM25 weight of the fusion (`retriever.hybrid.fusion`, at
`index.nprobe`) with the questions encoded once, and names the weight with the best top-5: tune it on
`data.split=dev`, then report `data.split=test` at that weight.

Example, a fine-tuned encoder over the index it was re-indexed into:
    python -m retriever.evaluate --config configs/squad.yaml run_dir=runs/squadr \\
        retriever.model=runs/squadr/retriever retriever.finetune.eval_limit=0 data.split=test
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from common.atomic import atomic_write_json
from common.errors import UserError
from configs.cli import build_parser, parse, run_main
from configs.loader import to_dict
from data_prep.records import QAExample
from retriever.metrics import retrieval_metrics
from retriever.search import Retriever
from retriever.train import EVAL_KS, eval_examples, evaluate_both, format_metrics


def run(cfg) -> dict:
    """Evaluate and write the report (see the module docstring); returns it."""
    run_dir = Path(cfg.run_dir)
    examples = eval_examples(run_dir / "store", cfg.data.split, cfg.retriever.finetune.eval_limit)
    retriever = Retriever.from_config(cfg)
    metrics, all_lists = evaluate_both(retriever, examples)
    report = {
        "model": cfg.retriever.model,
        "split": cfg.data.split,
        "nprobe": retriever.nprobe,
        "nlist": retriever.index.nlist,
        "hybrid": retriever.search_settings.get("hybrid"),
        "metrics": metrics,
        "all_lists": all_lists,
        "config": to_dict(cfg),
    }
    atomic_write_json(run_dir / "logs" / "retriever_eval.json", report)
    return report


def sweep_hybrid_weights(
    retriever: Retriever, examples: list[QAExample], weights: Sequence[float]
) -> list[dict]:
    """Metrics of the fused ranking at each BM25 weight; the dense search runs once for all of them."""
    if retriever.hybrid is None:
        raise UserError("--hybrid-weights needs retriever.hybrid.enabled=true")
    questions = [ex.question for ex in examples]
    k = max(max(EVAL_KS), 10)
    dense_scores, dense_ids = retriever.search_vectors(
        retriever.encoder.encode_queries(questions), max(k, retriever.hybrid.depth)
    )
    rows = []
    for weight in weights:
        retriever.hybrid.weight = weight
        fused = retriever.hybrid.rerank(questions, dense_scores, dense_ids, k, removed=retriever._removed)
        rows.append(
            {"weight": weight, "metrics": retrieval_metrics(examples, retriever.to_hits(*fused), EVAL_KS)}
        )
    return rows


def parse_weights(text: str) -> list[float]:
    try:
        weights = [float(w) for w in text.split(",") if w.strip()]
    except ValueError as e:
        raise UserError(f"--hybrid-weights takes comma-separated numbers in [0, 1], got {text!r}") from e
    if not weights or any(not 0 <= w <= 1 for w in weights):
        raise UserError(f"--hybrid-weights takes comma-separated numbers in [0, 1], got {text!r}")
    return weights


def run_sweep(cfg, weights: Sequence[float]) -> dict:
    """The `--hybrid-weights` sweep; writes run_dir/logs/retriever_hybrid_sweep.json and returns it."""
    run_dir = Path(cfg.run_dir)
    examples = eval_examples(run_dir / "store", cfg.data.split, cfg.retriever.finetune.eval_limit)
    retriever = Retriever.from_config(cfg)
    rows = sweep_hybrid_weights(retriever, examples, weights)
    best = max(rows, key=lambda r: (r["metrics"]["top5_accuracy"], r["metrics"]["top1_accuracy"]))
    report = {
        "model": cfg.retriever.model,
        "split": cfg.data.split,
        "nprobe": retriever.nprobe,
        "fusion": cfg.retriever.hybrid.fusion,
        "rows": rows,
        "best_weight": best["weight"],
        "config": to_dict(cfg),
    }
    atomic_write_json(run_dir / "logs" / "retriever_hybrid_sweep.json", report)
    return report


def main(argv=None) -> int:
    parser = build_parser("python -m retriever.evaluate", __doc__)
    parser.add_argument(
        "--hybrid-weights",
        default=None,
        help="comma-separated BM25 weights to sweep (e.g. 0,0.2,0.4,0.6,0.8,1); turns retriever.hybrid on",
    )
    cfg, ns = parse(parser, argv)
    if ns.hybrid_weights is not None:
        weights = parse_weights(ns.hybrid_weights)
        cfg.retriever.hybrid.enabled = True
        report = run_sweep(cfg, weights)
        print(
            f"{report['model']} on {report['split']}, BM25 fusion {report['fusion']}, nprobe {report['nprobe']}"
        )
        for row in report["rows"]:
            print(f"  weight {row['weight']:.2f}: {format_metrics(row['metrics'])}")
        print(
            f"best top-5 at weight {report['best_weight']} (set retriever.hybrid.weight={report['best_weight']})"
        )
        return 0
    report = run(cfg)
    hybrid = report["hybrid"]
    fused = f", fused with BM25 ({hybrid['fusion']}, weight {hybrid['weight']})" if hybrid else ""
    print(f"{report['model']}{fused} on {report['split']} ({report['metrics']['n']} questions)")
    print(f"  nprobe {report['nprobe']} of {report['nlist']} lists: {format_metrics(report['metrics'])}")
    if report["all_lists"] is not None:
        print(f"  every list:              {format_metrics(report['all_lists'])}")
    return 0


if __name__ == "__main__":
    run_main(main)
