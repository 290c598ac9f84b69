"""Mentions of names and numbers in a segment's tokens, and a selection that keeps each mention once.

A learned selection scorer ranks every occurrence of a name alike, so with a small slot budget it keeps the
first half of one occurrence and the second half of another, and no occurrence is whole: the reader cannot
copy the name. `gather_mentions` walks the positions from the highest score down and moves a pick inside a
repeated mention onto the same token of the occurrence first picked, so the slots a name earns add up in
one place and the others' slots go to the next-ranked tokens.

A word starts at a token with leading whitespace, at punctuation, and after punctuation; a mention is a
maximal run of words that start with a capital letter or a digit ("Baisu Zimairvend", "1846", "Lower
Netathun"). Two occurrences are the same mention when their words and token counts are equal, so names that
share a word ("Baisu Zimairvend", "Baisu Zimairvak") and numbers that share digits stay apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Mention:
    start: int  # first token position
    length: int  # tokens
    key: tuple[str, int]  # (the words, token count): equal keys are the same mention


class MentionFinder:
    """Finds mentions in LM token ids; decodes each vocabulary id once (a memo on this instance)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._text: dict[int, str] = {}

    def token_text(self, token_id: int) -> str:
        if token_id not in self._text:
            self._text[token_id] = self.tokenizer.decode([token_id])
        return self._text[token_id]

    def words(self, ids: Sequence[int]) -> list[tuple[int, int, str]]:
        """(start, end, stripped text) of each word, end exclusive."""
        out: list[tuple[int, int, str]] = []
        after_break = True
        for pos, token_id in enumerate(ids):
            text = self.token_text(int(token_id))
            stripped = text.strip()
            is_break = not stripped or not any(ch.isalnum() for ch in stripped)  # whitespace or punctuation
            if after_break or is_break or text[:1].isspace() or not out:
                out.append((pos, pos + 1, stripped))
            else:
                start, _, word = out[-1]
                out[-1] = (start, pos + 1, word + stripped)
            after_break = is_break
        return out

    def mentions(self, ids: Sequence[int]) -> list[Mention]:
        """Maximal runs of capitalised or numeric words, in position order."""
        found: list[Mention] = []
        run: list[tuple[int, int, str]] = []
        for word in [*self.words(ids), (len(ids), len(ids), "")]:  # a sentinel closes the last run
            if word[2][:1].isupper() or word[2][:1].isdigit():
                run.append(word)
                continue
            if run:
                start, end = run[0][0], run[-1][1]
                found.append(Mention(start, end - start, (" ".join(w for _, _, w in run), end - start)))
                run = []
        return found


def gather_mentions(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, slots: int,
                    finder: MentionFinder) -> torch.Tensor:
    """logits (N, n) -> (N, n) scores whose top `slots` positions hold each repeated mention in one occurrence.

    Walking positions from the highest logit down, a position inside a mention is replaced by the same token of
    that mention's first-reached occurrence; a position already taken is passed over. The chosen positions are
    lifted above every other score in the order chosen; the rest keep their logits (-inf at padding). Selection
    only: no gradient.
    """
    out = logits.detach().clone()
    for row in range(logits.shape[0]):
        n = int(mask[row].sum())
        if n == 0:
            continue
        where: dict[int, Mention] = {}
        for m in finder.mentions(ids[row, :n].tolist()):
            for pos in range(m.start, m.start + m.length):
                where[pos] = m
        first: dict[tuple[str, int], int] = {}  # mention key -> start of its first-reached occurrence
        chosen: list[int] = []
        taken: set[int] = set()
        for pos in logits[row, :n].argsort(descending=True).tolist():
            m = where.get(pos)
            if m is not None:
                pos = first.setdefault(m.key, m.start) + (pos - m.start)
            if pos in taken:
                continue
            taken.add(pos)
            chosen.append(pos)
            if len(chosen) == slots:
                break
        top = float(logits[row, :n].max()) + 1.0
        for rank, pos in enumerate(chosen):
            out[row, pos] = top + (len(chosen) - rank)
    return out
