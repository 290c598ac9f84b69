"""Evaluate systems side by side: `python -m eval.run --config C [eval.systems=...] [eval.limit=N]`.

Questions: the segment store's QA examples of `data.split` (run_dir/store/qa.jsonl; default `test`, the
split that no training command reads), `eval.limit` of them (null = all): with `eval.sample=first` (the
default) the first N in file order, with `eval.sample=random` a random sample of N seeded by `seed`, the
same for every system and every rerun (a larger N keeps a smaller one's questions). Every system of
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
  python -m eval.run --config configs/default.yaml eval.limit=200 eval.sample=random seed=1
  python -m eval.run -c configs/default.yaml eval.systems=closed_book,rag_text eval.k_values=1,2,4
  python -m eval.run -c configs/default.yaml eval.systems=dynamic_prefix,dynamic_prefix~random
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from common.atomic import atomic_write_json
from common.errors import UserError
from configs.cli import build_parser, parse, run_main
from configs.models import resolve_device, resolve_lm_path
from configs.schema import Config
from data_prep.store import SegmentStore, load_qa
from eval.ablations import MAJORITY
from eval.answering import ablation_hits_of, answer_majority, answer_runs, qa_factory_of, shared_search
from eval.metrics import build_metrics
from eval.plan import check_checkpoint, plan_runs
from eval.predictions import PREDICTIONS, PredictionLog, setups
from eval.questions import load_examples
from eval.summary import comparisons, retrieval_summary, run_config, summarize, system_summaries

# The parts: eval.questions (which questions), eval.plan (which runs, which checkpoint), eval.predictions
# (predictions.jsonl and resuming by setup), eval.answering (the LM systems and the majority baseline),
# eval.summary (metrics.json), eval.report (report.md and plots). This module wires them together.
log = logging.getLogger("eval.run")  # not __name__: that is "__main__" under `python -m eval.run`


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
    if any(s.kind.retrieves for s in systems):
        from retriever.search import open_retriever

        retriever = open_retriever(cfg)
    from transformers import AutoConfig

    lm_config = AutoConfig.from_pretrained(resolve_lm_path(cfg.lm.model, cfg.cache_dir))
    setup = setups(cfg, runs, lm_config, store, retriever, ckpt, held)
    plog = PredictionLog(out_dir / PREDICTIONS)
    plog.load(setup, cfg.eval.resume)

    questions = [ex.question for ex in examples]
    search_k = max([5, cfg.retriever.top_k, *sweep])
    top = shared_search(retriever, questions, search_k, progress) if retriever is not None else None
    answer_runs(
        qa_factory_of(cfg, systems, retriever),
        runs,
        examples,
        plog,
        setup,
        ablation_hits_of(store, top, cfg.seed),
        cfg.eval.batch_size,
        progress,
    )
    answers, majority_rule = answer_majority(
        load_qa(run_dir / "store", "train"), examples, plog, setup[MAJORITY]
    )

    retrieval_block, accuracy = retrieval_summary(examples, top, search_k)
    summary, per, k_sweep = system_summaries(runs, examples, plog, metrics, cfg, accuracy, sweep)
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
        "config": run_config(
            cfg,
            lm_config=lm_config,
            device=device,
            retriever=retriever,
            ckpt=ckpt,
            manifest=manifest,
            store=store,
            sweep=sweep,
            t_start=t_start,
        ),
    }
    atomic_write_json(out_dir / "metrics.json", result)
    from eval.report import write_report

    write_report(result, out_dir)
    return result


def main(argv=None) -> int:
    parser = build_parser("python -m eval.run", __doc__)
    cfg, ns = parse(parser, argv)
    result = evaluate(cfg)
    out_dir = Path(cfg.eval.out_dir) if cfg.eval.out_dir else Path(cfg.run_dir) / "eval"
    print(f"{result['n']} `{result['split']}` questions; report: {out_dir / 'report.md'}")
    for name in result["order"]:
        s = result["systems"][name]
        print(f"  {name:<28} EM {s['em']:.3f}  F1 {s['f1']:.3f}  latency {s['latency_ms_mean']:.0f} ms")
    return 0


if __name__ == "__main__":
    run_main(main)
