"""Reranking k retrieved segments with the reader's own view of each (`qa.rerank=reader`).

A reader trained on one segment per question answers well from the right paragraph but reads five worse than
one, and the log-probability of its answer barely tells a right paragraph from a wrong one (README, "Reading
the five one at a time"). Its hidden state where it starts answering does: after reading one segment, the
last prompt position holds what the LM is about to answer from. A linear probe on that state (a few layers),
the first answer token's entropy and top log-probability, and the segment's retrieval score and rank, is fitted
listwise (softmax over each question's k segments, cross-entropy to the segments that hold an answer) by
`python -m qa.fit_reranker`. Answering then reads each of the k segments' prompts once (no generation), keeps
the best-scored segment and generates one answer from it alone.

The probe is tied to the system whose prefixes it read (its weights live in that system's checkpoint folder
as `reranker.safetensors`) and to the LM (its fingerprint is in the file's metadata).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from common.atomic import atomic_write_bytes, fingerprint
from common.errors import UserError
from lm.forward import forward_with_prefix

RERANKER_FILE = "reranker.safetensors"
RANK_BUCKETS = 5  # ranks 0..3 one-hot, 4 and deeper share the last bucket


def lm_key(lm_config) -> str:
    """A short fingerprint of the LM's shape: a reranker fitted on one LM's hidden states is refused by another."""
    from configs.models import lm_fingerprint

    return fingerprint(lm_fingerprint(lm_config))


def probe_layers(num_hidden_layers: int, count: int = 5) -> list[int]:
    """`count` evenly spaced hidden-state indices, the last layer included (index 0 is the embeddings)."""
    return sorted({round(num_hidden_layers * (i + 1) / count) for i in range(count)})


@torch.no_grad()
def reader_features(lm, input_ids: torch.Tensor, attention_mask: torch.Tensor, prefix, layers: list[int],
                    scores: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """Features of R (question, one segment) rows: (R, len(layers) * hidden + 2 + 1 + RANK_BUCKETS).

    input_ids, attention_mask: (R, T) left-padded prompts, so position -1 is every row's last prompt token;
    prefix: the R rows' segment prefixes (or None for text systems whose prompt holds the segment);
    scores, ranks: (R,) retrieval score and 0-based rank of each row's segment.
    """
    out = forward_with_prefix(lm, input_ids, attention_mask, prefix, logits_to_keep=1, output_hidden_states=True)
    hidden = torch.cat([out.hidden_states[i][:, -1].float() for i in layers], dim=-1)
    logp = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
    entropy = -(logp.exp() * logp).sum(-1, keepdim=True)
    top = logp.max(-1, keepdim=True).values
    rank = torch.nn.functional.one_hot(ranks.clamp(max=RANK_BUCKETS - 1).long(), RANK_BUCKETS).float()
    return torch.cat([hidden, entropy, top, scores.float().unsqueeze(-1).to(hidden.device), rank.to(hidden.device)],
                     dim=-1).cpu()


@dataclass
class ReaderReranker:
    """A linear score over standardised features: score = ((x - mean) / std) @ weight."""

    layers: list[int]
    mean: torch.Tensor  # (F,)
    std: torch.Tensor  # (F,)
    weight: torch.Tensor  # (F,)
    meta: dict

    def score(self, features: torch.Tensor) -> torch.Tensor:
        """(R, F) features -> (R,) scores, higher = more likely to hold the answer."""
        if features.shape[-1] != self.weight.shape[0]:
            raise UserError(f"reranker expects {self.weight.shape[0]} features per segment, got {features.shape[-1]}: "
                            "it was fitted for another LM or another layer choice; refit it with qa.fit_reranker")
        return ((features - self.mean) / self.std) @ self.weight

    def save(self, path: Path) -> None:
        metadata = {"layers": json.dumps(self.layers), "meta": json.dumps(self.meta)}
        tensors = {"mean": self.mean.contiguous(), "std": self.std.contiguous(), "weight": self.weight.contiguous()}
        atomic_write_bytes(path, save(tensors, metadata=metadata))

    @classmethod
    def load(cls, path: Path, lm_fingerprint: str | None = None) -> ReaderReranker:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
        meta = json.loads(metadata.get("meta", "{}"))
        if lm_fingerprint and meta.get("lm_fingerprint") not in (None, lm_fingerprint):
            raise UserError(f"{path} was fitted on another LM (fingerprint {meta.get('lm_fingerprint')}, this LM "
                            f"{lm_fingerprint}); refit it with `python -m qa.fit_reranker`")
        return cls(json.loads(metadata["layers"]), tensors["mean"], tensors["std"], tensors["weight"], meta)


def fit_reranker(features: torch.Tensor, labels: torch.Tensor, layers: list[int], l2: float, epochs: int = 300,
                 lr: float = 0.01, meta: dict | None = None) -> ReaderReranker:
    """Listwise fit on Q questions of k segments each.

    features: (Q, k, F); labels: (Q, k) bool, a segment holds an answer string. Questions none of whose k
    segments holds an answer teach nothing about picking and are left out. L2 on the standardised weights
    keeps the probe from learning what the reader memorised of its own training questions.
    """
    keep = labels.any(dim=1)
    if not bool(keep.any()):
        raise UserError("no question has an answer among its retrieved segments: nothing to fit a reranker on")
    x, y = features[keep].float(), labels[keep].float()
    flat = x.reshape(-1, x.shape[-1])
    mean, std = flat.mean(0), flat.std(0) + 1e-4
    z = (x - mean) / std
    target = y / y.sum(dim=1, keepdim=True)
    weight = torch.zeros(x.shape[-1], requires_grad=True)
    opt = torch.optim.Adam([weight], lr=lr)
    for _ in range(epochs):
        loss = -(target * torch.log_softmax(z @ weight, dim=1)).sum(1).mean() + l2 * (weight ** 2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return ReaderReranker(layers, mean, std, weight.detach(), dict(meta or {}, questions=int(keep.sum())))


def top1_accuracy(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of questions whose best-scored segment holds an answer; scores, labels (Q, k)."""
    best = scores.argmax(dim=1)
    return float(labels[torch.arange(len(labels)), best].float().mean())
