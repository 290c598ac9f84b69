"""Hard negatives for retriever fine-tuning: for each (question, gold segment) pair, the best-ranked
segments that are wrong for it.

Where the ranking comes from is `retriever.finetune.negatives_from`:

- `dense`: the current index (the encoder being fine-tuned; ANCE-style when re-mined every round);
- `bm25`: BM25 over the store (DPR's choice: "the top passages returned by BM25 which don't contain the
  answer" gave its best model, Karpukhin et al. 2020, section 5.2), lexical look-alikes the dense encoder
  may rank far below;
- `hybrid`: the fusion of both (`retriever.hybrid.*` weight and fusion).

A segment is allowed as a negative when it is not a gold segment, contains no answer string and belongs to
a train-split article, so no dev/test article text is trained on. When the top `depth` has too few, random
allowed segments fill in, so every row has the same number of columns.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from common.answers import AnswerMatcher
from common.errors import UserError
from data_prep.records import QAExample, Segment
from data_prep.split import split_of
from data_prep.store import segment_input_text
from retriever.hybrid import HybridSearcher
from retriever.search import Retriever

log = logging.getLogger(__name__)

SOURCES = ("dense", "bm25", "hybrid")


def ranked_candidates(retriever: Retriever, questions: list[str], depth: int, source: str, cfg) -> np.ndarray:
    """(n, depth) segment ids, best first (-1 = none), from the ranking `source` names."""
    if source not in SOURCES:
        raise UserError(f"retriever.finetune.negatives_from must be one of {SOURCES}, got {source!r}")
    if source != "bm25":
        vectors = retriever.encoder.encode_queries(questions, show_progress=True)
    if source == "dense":
        return retriever.search_vectors(vectors, depth)[1]
    searcher = retriever.hybrid or HybridSearcher.from_config(
        cfg.retriever.hybrid, retriever.store, Path(cfg.run_dir) / "bm25"
    )
    if source == "bm25":
        return searcher.bm25.search(questions, depth)[1]
    scores, ids = retriever.search_vectors(vectors, max(depth, searcher.depth))
    return searcher.rerank(questions, scores, ids, depth)[1]


def mine_hard_negatives(
    retriever: Retriever,
    pairs: list[tuple[QAExample, Segment]],
    n_negatives: int,
    cfg,
    depth: int | None = None,
    seed: int = 0,
    source: str = "dense",
) -> list[list[str]]:
    """For each pair, the texts (title + text) of its `n_negatives` best-ranked allowed segments."""
    if n_negatives <= 0:
        return [[] for _ in pairs]
    depth = depth or max(20, 4 * n_negatives)
    store = retriever.store
    # The split rule the store was built with (its manifest records it) decides what is a train article.
    rule = store.manifest.get("split_rule") or {}
    split_seed = rule.get("seed", cfg.seed)
    dev, test = rule.get("dev", cfg.data.dev_fraction), rule.get("test", cfg.data.test_fraction)

    def is_train(title: str) -> bool:
        return split_of(title, split_seed, dev, test) == "train"

    ids = ranked_candidates(retriever, [ex.question for ex, _ in pairs], depth, source, cfg)
    rng = np.random.default_rng(seed)
    out: list[list[str]] = []
    n_random = 0
    for (ex, pos), row in zip(pairs, ids):
        gold = set(ex.gold_segment_ids) | {pos.segment_id}
        match = AnswerMatcher(ex.answers)
        chosen: list[str] = []
        for seg in store.get_many([int(i) for i in row if 0 <= i < len(store) and int(i) not in gold]):
            if not match(seg.text) and is_train(seg.title):
                chosen.append(segment_input_text(seg))
                if len(chosen) == n_negatives:
                    break
        tries = 0
        while len(chosen) < n_negatives and tries < 100:
            tries += 1
            seg = store.get(int(rng.integers(len(store))))
            text = segment_input_text(seg)
            if (
                seg.segment_id not in gold
                and not match(seg.text)
                and is_train(seg.title)
                and text not in chosen
            ):
                chosen.append(text)
                n_random += 1
        while len(chosen) < n_negatives:  # a degenerate corpus: repeat what we have
            chosen.append(chosen[-1] if chosen else "")
        out.append(chosen)
    if n_random:
        log.info(
            "hard negatives: %d of %d filled with random train segments", n_random, len(pairs) * n_negatives
        )
    return out
