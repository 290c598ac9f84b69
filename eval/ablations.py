"""What evaluation feeds systems instead of retrieval, and the one baseline that needs no LM.

- `random_hits`: `NAME~random` reads k segments drawn from the store (never the question's gold segments
  nor any segment of its gold document), seeded per question id, so the draw does not depend on
  `eval.limit`, batching or resuming. A system whose answers do not drop under this ablation is not
  using what it retrieves.
- `gold_hits`: `NAME~gold` is an oracle: the question's gold segments first, then its retrieved segments
  (minus the gold ones) up to k. Questions without a gold segment keep their retrieved segments.
- `majority_predictions`: the `majority` pseudo-system answers every question with the most frequent
  training answer of its relation (`data_prep.synthetic.majority_answers`), or, for QA sets without
  relations, the single most frequent training answer.

Plain system names never go through here: they read what the retriever returns.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from common.atomic import fingerprint
from common.errors import UserError
from data_prep.records import QAExample
from data_prep.synthetic import majority_answers
from retriever.search import Hit

MAJORITY = "majority"


def _hit(segment, score: float = 0.0) -> Hit:
    return Hit(int(segment.segment_id), float(score), segment.doc_id, segment.title, segment.text)


def _rng(seed: int, example_id: str) -> np.random.Generator:
    """A generator that depends only on (seed, question id)."""
    return np.random.default_rng([int(seed), int(fingerprint(example_id), 16)])


def random_hits(store, examples: Sequence[QAExample], k: int, seed: int) -> list[list[Hit]]:
    """k random store segments per question (distinct, none from its gold document), score 0."""
    n = len(store)
    out = []
    for ex in examples:
        banned = set(ex.gold_segment_ids or [])
        rng = _rng(seed, ex.id)
        picked: list = []
        # Rejection sampling: cheap because a question's gold document is a tiny part of the store.
        for _ in range(20):
            need = k - len(picked)
            if need == 0:
                break
            draw = rng.choice(n, size=min(n, 2 * need + 2), replace=False)
            taken = {s.segment_id for s in picked}
            for seg in store.get_many(draw):
                if len(picked) == k:
                    break
                if seg.segment_id in banned or seg.segment_id in taken:
                    continue
                if ex.gold_doc_id is not None and seg.doc_id == ex.gold_doc_id:
                    continue
                picked.append(seg)
                taken.add(seg.segment_id)
        if len(picked) < k:
            raise UserError(
                f"`~random` needs {k} segments outside the gold document of question {ex.id}; "
                f"the store has {n} segments in all: use a larger store or a smaller k"
            )
        out.append([_hit(s) for s in picked])
    return out


def gold_hits(
    store, examples: Sequence[QAExample], retrieved: Sequence[Sequence[Hit]], k: int
) -> tuple[list[list[Hit]], int]:
    """(hits per question, number of questions without a gold segment): gold first, then retrieved."""
    if len(retrieved) != len(examples):
        raise ValueError(f"{len(examples)} questions but {len(retrieved)} retrieved lists")
    out, without = [], 0
    for ex, hits in zip(examples, retrieved):
        gold = [int(i) for i in (ex.gold_segment_ids or []) if 0 <= int(i) < len(store)][:k]
        if not gold:
            without += 1
        chosen = [_hit(s, 1.0) for s in store.get_many(gold)]
        chosen += [h for h in hits if h.segment_id not in set(gold)][: k - len(chosen)]
        if len(chosen) < k:
            raise UserError(
                f"`~gold` needs {k} segments for question {ex.id}; the retriever returned {len(hits)}"
            )
        out.append(chosen)
    return out, without


def majority_predictions(train: Sequence[QAExample], examples: Sequence[QAExample]) -> tuple[list[str], str]:
    """(one answer per example, a description of the rule). Raises UserError without training answers."""
    answered = [ex for ex in train if ex.answers]
    if not answered:
        raise UserError("the store has no training questions with answers: no majority baseline")
    counts = Counter(ex.answers[0] for ex in answered)
    overall = min(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0]  # ties broken by the string
    per_relation = majority_answers(answered)
    if per_relation:
        rule = f"most frequent training answer of the question's relation ({len(per_relation)} relations)"
        return [per_relation.get(ex.relation or "", overall) for ex in examples], rule
    return [overall for _ in examples], f"the most frequent training answer ({overall!r})"
