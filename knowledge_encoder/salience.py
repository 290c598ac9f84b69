"""A learned, question-agnostic token scorer for the `select` compressor (`knowledge_encoder.select_scores=learned`).

KVzip keeps the K,V the LM needs to restate a segment; a SQuAD-style answer is an arbitrary span, and 32 of
~180 positions chosen for reconstruction rarely hold it. `SalienceScorer` instead learns which tokens answers
are made of (names, dates, numbers, noun phrases): a small MLP reads each token's values of every layer of
the frozen LM and predicts whether the token lies inside the answer of some question about its segment.
Trained on the answer spans of training questions (`qa.pretrain pretrain.objective=salience`); at use it
needs no question, so prefixes stay precomputable. The idea of a trained token classifier for
question-agnostic compression is LLMLingua-2's (Pan et al., 2024); here it chooses K,V positions.

Shapes: L layers, H KV heads, D head_dim, N segments, n tokens (right-padded, mask (N, n)).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class SalienceScorer(nn.Module):
    """values[l] (N, H, n, D) for every layer -> (N, n) logits: is this token part of an answer?"""

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, hidden: int = 128, window: int = 0,
                 layers: int = 0):
        super().__init__()
        if window < 0:
            raise ValueError(f"knowledge_encoder.scorer_window must be >= 0, got {window}")
        if layers < 0:
            raise ValueError(f"knowledge_encoder.scorer_layers must be >= 0, got {layers}")
        width = num_layers * kv_heads * head_dim
        self.norm = nn.LayerNorm(width, elementwise_affine=False)  # layers' values differ in scale by 10x and more
        self.hidden = nn.Linear(width, hidden)
        self.context = None
        if window:
            # Depthwise, zero-initialised and added to each token's own features: training starts from the
            # per-token scorer and learns how much a neighbour's answer-likeness should count.
            self.context = nn.Conv1d(hidden, hidden, 2 * window + 1, padding=window, groups=hidden)
            nn.init.zeros_(self.context.weight)
            nn.init.zeros_(self.context.bias)
        self.mixer = None
        if layers:
            # Pre-norm self-attention over the segment: whose fact a name belongs to is often sentences away.
            block = nn.TransformerEncoderLayer(hidden, nhead=4, dim_feedforward=2 * hidden, dropout=0.0,
                                               activation="gelu", batch_first=True, norm_first=True)
            self.mixer = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.out = nn.Linear(hidden, 1)

    def forward(self, values: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """(N, n) logits, -inf at padding."""
        # L x (N, H, n, D) -> (N, n, L*H*D): a token's values of every layer and head side by side.
        x = torch.cat([v.float().permute(0, 2, 1, 3).flatten(2) for v in values], dim=-1)
        h = F.gelu(self.hidden(self.norm(x)))  # (N, n, hidden)
        if self.context is not None:
            h = h.masked_fill(~mask[..., None], 0.0)  # padding is no one's neighbour
            h = h + self.context(h.transpose(1, 2)).transpose(1, 2)  # conv over n: (N, hidden, n)
        if self.mixer is not None:
            h = self.mixer(h, src_key_padding_mask=~mask)  # (N, n, hidden)
        logits = self.out(h).squeeze(-1)
        return logits.masked_fill(~mask, float("-inf"))


def skip_repeats(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, slots: int, reach: int = 2
                 ) -> torch.Tensor:
    """logits (N, n) -> (N, n) whose top `slots` positions skip repeats: walking positions from the highest
    score down, one whose token and `reach` tokens on each side equal those of a position already kept is
    pushed below every other position. The inside of a name that occurs twice then takes its slots once (its
    first and last tokens stay: their outer context differs), while numbers or names that only share pieces
    ("1816" and "1846", "Baisu" and "Baisu Zimairvend") are left whole. Selection only: no gradient."""
    out = logits.clone()
    below = logits.masked_fill(~mask, float("inf")).amin(dim=1) - 1.0  # (N,) under every real score
    for row in range(logits.shape[0]):
        n = int(mask[row].sum())
        tok = [-1] * reach + ids[row, :n].tolist() + [-1] * reach
        seen: set[tuple[int, ...]] = set()
        kept = 0
        for pos in logits[row, :n].argsort(descending=True).tolist():
            context = tuple(tok[pos : pos + 2 * reach + 1])  # tokens pos - reach .. pos + reach
            if context in seen:
                out[row, pos] = below[row] - pos / n  # behind all, in position order
                continue
            seen.add(context)
            kept += 1
            if kept == slots:
                break
    return out


def answer_occurrences(ids: Sequence[int], answer: str, tokenizer) -> list[range]:
    """The token ranges of a segment's ids where `answer` occurs, tokenised with and without a leading space
    (byte-level BPE tokenises a word mid-sentence with its space)."""
    found = []
    for form in (f" {answer.strip()}", answer.strip()):
        needle = tokenizer(form, add_special_tokens=False)["input_ids"]
        if not needle:
            continue
        for start in range(len(ids) - len(needle) + 1):
            if list(ids[start : start + len(needle)]) == needle:
                found.append(range(start, start + len(needle)))
    return found


def answer_token_labels(ids: Sequence[int], answers: Sequence[str], tokenizer) -> tuple[list[bool], int]:
    """Which of a segment's token ids lie inside an occurrence of one of `answers` (every occurrence is
    marked); and how many answers were found."""
    labels = [False] * len(ids)
    found = 0
    for answer in answers:
        spans = answer_occurrences(ids, answer, tokenizer)
        for span in spans:
            labels[span.start : span.stop] = [True] * len(span)
        found += bool(spans)
    return labels, found


def answers_kept(occurrences: Sequence[Sequence[range]], kept: set[int]) -> tuple[int, int]:
    """Of a segment's answers, given each one's `answer_occurrences`, how many were found and how many have an
    occurrence whose every token is among the `kept` positions (what a reader of the selected K,V can copy
    whole); returns (kept, found)."""
    found = sum(bool(spans) for spans in occurrences)
    whole = sum(any(all(i in kept for i in span) for span in spans) for spans in occurrences)
    return whole, found


def oracle_kept(occurrences: Sequence[Sequence[range]], slots: int) -> int:
    """How many of a segment's answers (each one's `answer_occurrences`) a selection that knew them could keep
    whole in `slots` positions: greedily the answer that adds the fewest new positions first, each by its
    shortest occurrence. The ceiling of any question-agnostic exact-token selection at that P."""
    spans = [set(min(spans, key=len)) for spans in occurrences if spans]
    kept: set[int] = set()
    whole = 0
    while spans:
        spans.sort(key=lambda span: len(span - kept))
        if len(kept | spans[0]) > slots:
            break
        kept |= spans.pop(0)
        whole += 1
    return whole


def answer_rank(spans: Sequence[range], rank: dict[int, int]) -> int | None:
    """The score rank (0 = first) at which an answer, given its occurrences `spans`, is kept whole: the rank
    of its best occurrence's lowest-ranked token; None when the answer does not occur."""
    ranks = [max(rank[i] for i in span) for span in spans]
    return min(ranks) if ranks else None


def salience_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, pos_weight: float) -> torch.Tensor:
    """Binary cross-entropy over the real tokens; logits, labels, mask (N, n). Answers are ~10% of tokens, so
    positives weigh `pos_weight` times a negative."""
    weight = torch.tensor(pos_weight, device=logits.device)
    per_token = F.binary_cross_entropy_with_logits(logits.masked_fill(~mask, 0.0), labels.float(),
                                                   pos_weight=weight, reduction="none")
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def recall_at(logits: torch.Tensor, labels: torch.Tensor, slots: int) -> float:
    """Fraction of answer tokens among each segment's `slots` highest-scored positions (padding is -inf)."""
    top = logits.topk(min(slots, logits.shape[1]), dim=-1).indices
    kept = torch.zeros_like(labels).scatter(1, top, True) & labels
    return kept.sum().item() / max(labels.sum().item(), 1)
