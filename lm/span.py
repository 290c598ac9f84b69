"""Span-constrained decoding (`qa.decoding=span`): the answer must be a piece of the retrieved text.

Extractive QA answers are spans of a passage; a small LM reading a passage sometimes paraphrases or
continues past the span. At each step the constraint takes the highest-scoring of the LM's top
`candidates` next tokens whose addition keeps the answer (decoded, leading space stripped, whitespace
collapsed) a substring of one of the row's texts; a stop token is taken once the answer is not empty. When
no candidate fits, the tokens of the row's texts (as in the texts, and each word without its leading space)
are tried by score; when none of those fits either, the answer stops. Decoded text rather than token ids is matched, since a word is often
tokenized differently at the start of an answer than inside a passage (" Mima" vs "Mima").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lm.generate import StopTokens


def _norm(text: str) -> str:
    return " ".join(text.split())


class SpanConstraint:
    def __init__(self, tokenizer, texts: Sequence[Sequence[str]], stop: StopTokens, candidates: int = 50):
        """texts[row]: the texts the answer of batch row `row` must come from (e.g. its retrieved segments)."""
        self.tokenizer = tokenizer
        self.texts = [[_norm(t) for t in row] for row in texts]
        self.stop = stop
        self.candidates = candidates
        self.fallback_stop = tokenizer.eos_token_id if tokenizer.eos_token_id in stop.ids else min(stop.ids)
        self.row_tokens = [self._tokens_of(row) for row in self.texts]

    def _tokens_of(self, texts: list[str]) -> torch.Tensor:
        ids: set[int] = set()
        for text in texts:
            ids.update(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            for word in set(text.split()):
                ids.update(self.tokenizer(word, add_special_tokens=False)["input_ids"])
        return torch.tensor(sorted(ids - set(self.stop.ids)), dtype=torch.long)

    def answer_text(self, ids: Sequence[int]) -> str:
        return _norm(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def __call__(self, row: int, logits: torch.Tensor, generated: list[int]) -> int:
        """The next token of batch row `row` given its logits (V,) and the answer tokens so far."""
        started = bool(self.answer_text(generated))
        for tid in logits.topk(min(self.candidates, logits.shape[-1])).indices.tolist():
            if tid in self.stop.ids:
                if started:
                    return tid
                continue
            if self._fits(row, generated, tid):
                return tid
        pool = self.row_tokens[row].to(logits.device)
        if len(pool):
            for tid in pool[logits[pool].argsort(descending=True)].tolist():
                if self._fits(row, generated, tid):
                    return tid
        return self.fallback_stop

    def _fits(self, row: int, generated: list[int], tid: int) -> bool:
        """The answer grows (a token of bare whitespace does not count) and stays a piece of a text."""
        text = self.answer_text([*generated, tid])
        return text != self.answer_text(generated) and any(text in t for t in self.texts[row])
