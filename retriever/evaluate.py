"""Retrieval metrics on held-out questions: `python -m retriever.evaluate --config C [key=value ...]`.

Searches `run_dir/index` with `retriever.model` for the questions of `data.split` (dev or test, the
held-out articles; `retriever.finetune.eval_limit` caps them, 0 = all) and prints top-k answer accuracy,
gold-document hit@k, recall@k and MRR@10 twice: at `index.nprobe`, what the QA system gets, and with every
IVF list searched, what the encoder alone gets (indexes up to 200k segments). Read-only: an index built
by another encoder or from another store is refused, never rebuilt. The numbers also go to
`run_dir/logs/retriever_eval.json`.

Example, a fine-tuned encoder over the index it was re-indexed into:
    python -m retriever.evaluate --config configs/squad.yaml run_dir=runs/squadr \\
        retriever.model=runs/squadr/retriever retriever.finetune.eval_limit=0 data.split=test
"""

from __future__ import annotations

from pathlib import Path

from configs.cli import build_parser, parse, run_main
from configs.loader import to_dict
from data_prep.atomic import atomic_write_json
from retriever.search import Retriever
from retriever.train import eval_examples, evaluate_both, format_metrics


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
        "metrics": metrics,
        "all_lists": all_lists,
        "config": to_dict(cfg),
    }
    atomic_write_json(run_dir / "logs" / "retriever_eval.json", report)
    return report


def main(argv=None) -> int:
    parser = build_parser("python -m retriever.evaluate", __doc__)
    cfg, _ = parse(parser, argv)
    report = run(cfg)
    print(f"{report['model']} on {report['split']} ({report['metrics']['n']} questions)")
    print(f"  nprobe {report['nprobe']} of {report['nlist']} lists: {format_metrics(report['metrics'])}")
    if report["all_lists"] is not None:
        print(f"  every list:              {format_metrics(report['all_lists'])}")
    return 0


if __name__ == "__main__":
    run_main(main)
