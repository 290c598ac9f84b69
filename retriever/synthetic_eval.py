"""Off-the-shelf retrieval over the synthetic world's whole articles, beside the world's other statistics.

    python -m retriever.synthetic_eval --config configs/default.yaml [--json stats.json]

`retriever.model` (default MiniLM) encodes every article as one segment (joined with its title by
`segment_input_text`) and every question of `data.split`; exact cosine search, no index. Reported: top-k
answer accuracy (an answer string occurs in a retrieved article's text, whole-token match, the DPR convention
of `retriever.metrics`), gold-document hit@k, the articles' length in retriever tokens and gold-document hit@5
per entity type; printed after `data_prep.synthetic_stats.world_stats` (sizes, lengths, majority baseline).
This was `python -m data_prep.synthetic --stats --retrieval`, which would have data_prep import the retriever,
a floor above it (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from common.atomic import atomic_write_json
from configs.cli import build_parser, parse, run_main
from configs.schema import Config
from data_prep.records import QAExample, Segment
from data_prep.store import segment_input_text
from data_prep.synthetic import World, iter_questions
from data_prep.synthetic_stats import article_segments, length_summary, print_stats, world_stats
from retriever.encoder import Encoder
from retriever.metrics import retrieval_metrics

KS = (1, 5, 20)


def article_retrieval(cfg: Config, ks: Sequence[int] = KS) -> dict:
    """Exact cosine search of the `data.split` questions over every article with `cfg.retriever.model`."""
    d = cfg.data
    docs = article_segments(World(d.synthetic))
    questions = iter_questions(d.synthetic, cfg.seed, d.dev_fraction, d.test_fraction)
    examples = [q for q in questions if d.split == "all" or q.split == d.split]
    return _search(cfg, docs, examples, tuple(ks))


def _search(cfg: Config, docs: list[Segment], examples: list[QAExample], ks: tuple[int, ...]) -> dict:
    t0 = time.time()
    encoder = Encoder.from_config(cfg)
    passages = encoder.encode_passages([segment_input_text(s) for s in docs])  # (n_docs, dim), normalised
    queries = encoder.encode_queries([q.question for q in examples])  # (n_q, dim)
    kmax = min(max(ks), len(docs))
    scores = queries @ passages.T  # (n_q, n_docs) cosine
    top = np.argsort(-scores, axis=1, kind="stable")[:, :kmax]
    hits = [[docs[j] for j in row] for row in top]
    out = retrieval_metrics(examples, hits, ks=ks)
    out = {k: v for k, v in out.items() if not k.startswith("recall@")}  # no gold segments here
    retr_tokens = [len(encoder.tokenizer(segment_input_text(s))["input_ids"]) for s in docs]
    out.update(
        {
            "model": cfg.retriever.model,
            "split": cfg.data.split,
            "retriever_tokens_per_article": length_summary(retr_tokens),
            "seconds": round(time.time() - t0, 1),
        }
    )
    # Per relation top-5 answer accuracy, to see which questions are hard to retrieve for.
    per_rel: dict[str, list[bool]] = {}
    for ex, hs in zip(examples, hits):
        per_rel.setdefault(ex.relation, []).append(ex.gold_doc_id in {h.doc_id for h in hs[:5]})
    out["gold_doc_hit@5_per_type"] = {
        t: round(float(np.mean([v for r, vs in per_rel.items() if r.startswith(t + ".") for v in vs])), 3)
        for t in sorted({r.split(".")[0] for r in per_rel})
    }
    return out


def world_stats_with_retrieval(cfg: Config, ks: Sequence[int] = KS) -> dict:
    """`world_stats` plus its `retrieval` entry (what `data_prep.synthetic --stats --retrieval` returned)."""
    return {**world_stats(cfg), "retrieval": article_retrieval(cfg, ks)}


def main(argv=None) -> int:
    parser = build_parser("python -m retriever.synthetic_eval", __doc__)
    parser.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    cfg, ns = parse(parser, argv)
    stats = world_stats_with_retrieval(cfg)
    print_stats(stats)
    if ns.json:
        atomic_write_json(ns.json, stats)
    return 0


if __name__ == "__main__":
    run_main(main)
