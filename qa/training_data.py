"""Training and dev examples: QA rows + (cached) retrieval -> `Example`s, and a resumable batch order.

The batch order is a pure function of (seed, step), so a resumed run sees exactly the batches an
uninterrupted run would have seen, and every system trains on the same batches.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from common.answers import AnswerMatcher
from data_prep.records import QAExample
from lm.prompting import TextSegment
from qa.batching import Example


@dataclass
class ExampleStats:
    total: int = 0
    gold_forced: int = 0
    skipped_no_gold: int = 0


def make_examples(qa: Sequence[QAExample], hits: dict[str, list], k: int, store=None, force_gold: bool = False,
                  stats: ExampleStats | None = None, shuffle_seed: int | None = None) -> list[Example]:
    """One Example per question with its top-k hits. With `force_gold` (training only) the gold segment
    replaces the lowest-ranked hit when retrieval missed it; questions without a gold segment are skipped.
    With `shuffle_seed` the k segments of each question are put in a random order (seeded by the seed and
    the question id), so a reader cannot learn that the answer sits in the first one."""
    out = []
    stats = stats if stats is not None else ExampleStats()
    for ex in qa:
        rows = list(hits.get(ex.id, []))[:k]
        seg_pairs = [(h.segment_id, TextSegment(h.title, h.text)) for h in rows]
        if force_gold:
            if not ex.gold_segment_ids:
                stats.skipped_no_gold += 1
                continue
            if not any(sid in ex.gold_segment_ids for sid, _ in seg_pairs):
                gold = store.get(int(ex.gold_segment_ids[0]))
                pair = (gold.segment_id, TextSegment(gold.title, gold.text))
                seg_pairs = seg_pairs[: k - 1] + [pair] if len(seg_pairs) >= k else seg_pairs + [pair]
                stats.gold_forced += 1
        if len(seg_pairs) < k:
            continue
        if shuffle_seed is not None:
            random.Random(f"{shuffle_seed}\x00{ex.id}").shuffle(seg_pairs)
        out.append(Example(
            question=ex.question,
            segments=[s for _, s in seg_pairs],
            segment_ids=[i for i, _ in seg_pairs],
            answers=list(ex.answers),
            id=ex.id,
        ))
    stats.total = len(out)
    return out


def hard_negatives(qa: Sequence[QAExample], deep_hits: dict[str, list], n: int, keep: set[int] | None = None,
                   ) -> dict[str, list[tuple[int, TextSegment]]]:
    """{question id: its n best-ranked retrieved segments that are not gold and hold no answer string}.

    A reader trained to say `qa.no_answer` on these learns to abstain where the question's answer is not,
    which is what lets `qa.reading=each` tell the segment that answers from the ones that only look alike.
    `keep` restricts negatives to those segment ids (training reads train articles only)."""
    out: dict[str, list[tuple[int, TextSegment]]] = {}
    for ex in qa:
        matcher = AnswerMatcher(ex.answers)
        gold = set(ex.gold_segment_ids)
        picked = [(h.segment_id, TextSegment(h.title, h.text)) for h in deep_hits.get(ex.id, [])
                  if h.segment_id not in gold and (keep is None or h.segment_id in keep)
                  and not matcher(h.title + " " + h.text)]
        if picked:
            out[ex.id] = picked[:n]
    return out


def with_negatives(chunk: Sequence[Example], negatives: dict[str, list[tuple[int, TextSegment]]],
                   no_answer: str) -> list[Example]:
    """`chunk` followed by one Example per hard negative of its questions, each read alone, answer `no_answer`."""
    extra = [Example(question=ex.question, segments=[seg], segment_ids=[sid], answers=[no_answer], id=ex.id)
             for ex in chunk for sid, seg in negatives.get(ex.id, [])]
    return list(chunk) + extra


class BatchOrder:
    """Epoch-wise shuffles of n examples; `batch(step)` (1-based) is the same whatever happened before."""

    def __init__(self, n: int, batch_size: int, seed: int):
        if n == 0:
            raise ValueError("no training examples")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._perm_epoch = epoch
        return self._perm

    def batch(self, step: int) -> list[int]:
        start = (step - 1) * self.batch_size
        out = []
        for pos in range(start, start + self.batch_size):
            out.append(int(self._permutation(pos // self.n)[pos % self.n]))
        return out


def sample_dev(examples: Sequence[Example], limit: int, seed: int) -> list[Example]:
    items = list(examples)
    random.Random(seed).shuffle(items)
    return items[:limit] if limit else items
