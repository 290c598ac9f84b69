"""Retrieval metrics (reused by `eval/`): top-k answer accuracy, gold-document hit@k, recall@k, MRR@10.

- top-k accuracy (the Natural Questions / DPR convention): some segment among the first k contains a
  normalised answer string, matched as a whole-token sequence so that `1` does not match `1858`.
- gold-document hit@k: some segment among the first k comes from the example's `gold_doc_id`.
- recall@k: the fraction of the example's `gold_segment_ids` found among the first k, averaged.
- MRR@10: the mean of 1/rank of the first segment (within 10) that contains an answer, 0 if none.

Examples without a gold document (or gold segments) are left out of the metrics that need them; a
metric with no example to average is None. Every function takes plain per-example lists, so any
object with `segment_id`, `doc_id` and `text` (a `retriever.search.Hit`) works as a hit.
"""

from __future__ import annotations

from collections.abc import Sequence

from common.answers import AnswerMatcher


def answer_flags(
    texts_per_example: Sequence[Sequence[str]], answers: Sequence[Sequence[str]]
) -> list[list[bool]]:
    """For each example, whether each retrieved text (in rank order) contains one of its answers."""
    if len(texts_per_example) != len(answers):
        raise ValueError(f"{len(texts_per_example)} retrieved lists but {len(answers)} answer lists")
    return [[m(t) for t in texts] for texts, m in zip(texts_per_example, map(AnswerMatcher, answers))]


def top_k_accuracy(flags: Sequence[Sequence[bool]], k: int) -> float | None:
    """Fraction of examples with an answer-bearing segment among the first k (`flags` from answer_flags)."""
    if not flags:
        return None
    return sum(any(f[:k]) for f in flags) / len(flags)


def top_k_answer_accuracy(hits: Sequence[Sequence], answers: Sequence[Sequence[str]], k: int) -> float | None:
    """Top-k accuracy straight from ranked hits (anything with `.text`) and each question's answers.

    This is `retrieval_top1` / `retrieval_top5` of metrics.json (k = 1, 5 on a top-5 search).
    """
    return top_k_accuracy(answer_flags([[h.text for h in hs[:k]] for hs in hits], answers), k)


def mrr_at_k(flags: Sequence[Sequence[bool]], k: int = 10) -> float | None:
    """Mean reciprocal rank of the first answer-bearing segment within the first k (0 when none)."""
    if not flags:
        return None
    total = 0.0
    for f in flags:
        rank = next((i + 1 for i, hit in enumerate(f[:k]) if hit), None)
        total += 1.0 / rank if rank else 0.0
    return total / len(flags)


def gold_doc_hit_at_k(
    retrieved_doc_ids: Sequence[Sequence[str]], gold_doc_ids: Sequence[str | None], k: int
) -> float | None:
    """Fraction of examples (with a gold document) whose gold document is among the first k segments' docs."""
    pairs = [(r, g) for r, g in zip(retrieved_doc_ids, gold_doc_ids) if g is not None]
    if not pairs:
        return None
    return sum(g in r[:k] for r, g in pairs) / len(pairs)


def recall_at_k(
    retrieved_ids: Sequence[Sequence[int]], gold_ids: Sequence[Sequence[int]], k: int
) -> float | None:
    """Mean over examples with gold segments of |first k ∩ gold| / |gold|."""
    pairs = [(r, set(g)) for r, g in zip(retrieved_ids, gold_ids) if len(g) > 0]
    if not pairs:
        return None
    return sum(len(set(r[:k]) & g) / len(g) for r, g in pairs) / len(pairs)


def retrieval_metrics(examples: Sequence, hits: Sequence[Sequence], ks: Sequence[int] = (1, 5, 20)) -> dict:
    """All metrics for QA examples (`answers`, `gold_doc_id`, `gold_segment_ids`) and their ranked hits.

    Returns {"n", "top{k}_accuracy", "gold_doc_hit@{k}", "recall@{k}" for k in ks, "mrr@10"}.
    """
    if len(examples) != len(hits):
        raise ValueError(f"{len(examples)} examples but {len(hits)} hit lists")
    flags = answer_flags([[h.text for h in hs] for hs in hits], [ex.answers for ex in examples])
    doc_ids = [[h.doc_id for h in hs] for hs in hits]
    seg_ids = [[h.segment_id for h in hs] for hs in hits]
    gold_docs = [ex.gold_doc_id for ex in examples]
    gold_segs = [list(ex.gold_segment_ids or []) for ex in examples]
    out: dict = {"n": len(examples)}
    for k in ks:
        out[f"top{k}_accuracy"] = top_k_accuracy(flags, k)
    for k in ks:
        out[f"gold_doc_hit@{k}"] = gold_doc_hit_at_k(doc_ids, gold_docs, k)
    for k in ks:
        out[f"recall@{k}"] = recall_at_k(seg_ids, gold_segs, k)
    out["mrr@10"] = mrr_at_k(flags, 10)
    return out
