"""Reading k retrieved segments one at a time and keeping one answer (`qa.reading=each`).

A reader trained on one segment per question reads five concatenated segments worse than one (it never
learnt to pick among them). Reading each segment alone gives k candidate answers, each with the LM's
log-probability of that answer (stop token included) given the question and that segment; the answer kept
is the one the rule scores highest:

- `max`: the single most probable candidate.
- `sum`: RAG-Sequence's marginal with a uniform segment prior (Lewis et al. 2020, "fast decoding": a
  candidate's probability is taken as 0 under the segments that did not produce it), so an answer that
  several segments agree on adds their probabilities: score(y) = sum over {z : y_z = y} of p(y | q, z).

A reader trained with hard negatives (`train.negatives`) answers `qa.no_answer` where a segment does not
answer; such candidates are left out. Candidates are the same answer when their SQuAD-normalised texts are equal. Ties go to the better-ranked
segment, so with equal scores the result is what k = 1 would have answered.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from common.answers import squad_normalize

RULES = ("max", "sum")


@dataclass(frozen=True)
class Candidate:
    """One segment's answer: its retrieval rank (0 = top), text and log p(answer + stop | question, segment)."""

    rank: int
    segment_id: int | None
    text: str
    logprob: float

    def as_row(self) -> dict:
        return {"rank": self.rank, "segment_id": self.segment_id, "text": self.text,
                "logprob": round(self.logprob, 4)}


def choose_answer(candidates: Sequence[Candidate], rule: str = "sum", no_answer: str | None = None) -> Candidate:
    """The candidate `rule` keeps (for `sum`, the best-ranked candidate of the winning answer). Candidates that
    say `no_answer` (a reader trained with `train.negatives` abstains so) are passed over while another segment
    answers; when every segment abstains, the top segment's abstention is the answer."""
    if not candidates:
        raise ValueError("choose_answer needs at least one candidate")
    if rule not in RULES:
        raise ValueError(f"unknown reading rule {rule!r}; one of {', '.join(RULES)}")
    if no_answer is not None:
        abstain = squad_normalize(no_answer)
        answering = [c for c in candidates if squad_normalize(c.text) != abstain]
        if not answering:
            return min(candidates, key=lambda c: c.rank)
        candidates = answering
    if rule == "max":
        return max(candidates, key=lambda c: (c.logprob, -c.rank))
    mass: dict[str, float] = {}
    first: dict[str, Candidate] = {}
    for c in sorted(candidates, key=lambda c: c.rank):
        key = squad_normalize(c.text)
        mass[key] = mass.get(key, 0.0) + math.exp(c.logprob)
        first.setdefault(key, c)
    best = max(first, key=lambda key: (mass[key], -first[key].rank))
    return first[best]
