"""`PrefixQAModel`: the trainable part of one system around the frozen LM; `forward` returns (logits, loss).

The LM is held by reference and never registered as a sub-module, so `state_dict()` holds only what
trains (the knowledge encoder or the peft prefix), optimizers never see LM weights, and accelerate/DDP
wraps only the small module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from knowledge_encoder.encoder import KnowledgeEncoder
from knowledge_encoder.features import SegmentFeatures
from lm.forward import forward_with_prefix
from lm.prefix import Prefix
from qa.static_prefix import StaticPrefix
from qa.systems import SystemName

IGNORE = -100


@dataclass
class QABatch:
    """One system's view of a batch of B questions (left-padded prompt [+ answer]).

    input_ids, attention_mask: (B, T); labels: (B, T) with IGNORE outside answer tokens, or None;
    features: frozen features of the B*k retrieved segments (question-major) for dynamic systems.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None = None
    features: SegmentFeatures | None = None
    k: int = 0


@dataclass
class LossWeights:
    distill: float = 1.0  # KL(teacher || student) on answer tokens
    hidden: float = 0.0  # MSE to the teacher's last hidden states on answer positions
    temperature: float = 1.0


def answer_window(labels: torch.Tensor) -> int:
    """How many trailing positions hold every answer token (+1 for the shift): left padding puts answers last."""
    has = (labels != IGNORE).any(0).nonzero()
    return int(labels.shape[1] - has[0].item()) + 1 if len(has) else 1


def answer_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the answer tokens. logits: (B, W, V) for the last W positions; labels: (B, T)."""
    window = logits.shape[1]
    target = labels[:, -window + 1:] if window > 1 else labels[:, :0]
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                           ignore_index=IGNORE)


def answer_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(answer | prompt) per row: the answer tokens' log-probabilities summed. logits: (B, W, V) for the
    last W positions; labels: (B, T) -> (B,) float32 (0 for a row without answer tokens)."""
    window = logits.shape[1]
    if window < 2:
        return logits.new_zeros(logits.shape[0], dtype=torch.float32)
    target = labels[:, -window + 1:]
    keep = target != IGNORE
    logp = logits[:, :-1].float().log_softmax(-1)
    tokens = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (tokens * keep).sum(-1)


def answer_kl(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) averaged over answer positions; both (B, W, V)."""
    window = student.shape[1]
    keep = (labels[:, -window + 1:] != IGNORE).reshape(-1)
    s = (student[:, :-1].reshape(-1, student.shape[-1])[keep].float() / temperature).log_softmax(-1)
    t = (teacher[:, :-1].reshape(-1, teacher.shape[-1])[keep].float() / temperature).log_softmax(-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def hidden_mse(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...], mask: torch.Tensor) -> torch.Tensor:
    """Mean over layers of the relative squared error of the student's hidden states (B, T, d) on real tokens.

    A dense, per-layer signal: every layer's read of the prefix is pulled towards the teacher's read of the
    full segment, instead of only the final answer distribution.
    """
    keep = mask.bool()
    losses = []
    for s, t in zip(student[1:], teacher[1:]):
        s, t = s[keep].float(), t[keep].float()
        losses.append(((s - t) ** 2).sum(-1).mean() / (t**2).sum(-1).mean().clamp(min=1e-6))
    return torch.stack(losses).mean()


class PrefixQAModel(nn.Module):
    """Trainable prefix of one system (a knowledge encoder, a peft static prefix, or nothing)."""

    def __init__(self, system: SystemName, lm, encoder: KnowledgeEncoder | None = None,
                 static: StaticPrefix | None = None, weights: LossWeights | None = None):
        super().__init__()
        object.__setattr__(self, "lm", lm)  # frozen, shared across systems, not a sub-module
        self.system = system
        self.encoder = encoder
        self.static = static
        self.weights = weights or LossWeights()
        if system.kind.dynamic and encoder is None:
            raise ValueError(f"{system} needs a knowledge encoder")
        if system.kind.static and static is None:
            raise ValueError(f"{system} needs a static prefix")

    @property
    def distills(self) -> bool:
        """A compressed dynamic prefix learns from its own P = segment-length path (the teacher)."""
        return self.encoder is not None and self.encoder.pool is not None and self.weights.distill > 0

    def prefix(self, batch: QABatch, full: bool = False) -> Prefix | None:
        parts = []
        if self.static is not None:
            parts.append(self.static(batch.input_ids.shape[0]))
        if self.encoder is not None:
            parts.append(self.encoder.build_prefix(batch.features, batch.k, full=full))
        return Prefix.concat(parts) if parts else None

    def forward(self, batch: QABatch, sequence_logprob: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns (logits over the answer window (B, W, V), loss or None when the batch has no labels).

        With `sequence_logprob` (and labels) the second output is instead log p(answer | prompt, prefix) per
        row, (B,), from the student path only (no teacher, no distillation): the reader term of the joint
        retriever's marginal likelihood (`qa.joint_retriever`).
        """
        window = answer_window(batch.labels) if batch.labels is not None else 1
        hidden = self.distills and self.weights.hidden > 0 and batch.labels is not None and not sequence_logprob
        out = forward_with_prefix(self.lm, batch.input_ids, batch.attention_mask, self.prefix(batch),
                                  logits_to_keep=window, output_hidden_states=hidden)
        if batch.labels is None:
            return out.logits, None
        if sequence_logprob:
            return out.logits, answer_logprob(out.logits, batch.labels)
        loss = answer_ce(out.logits, batch.labels)
        if self.distills:
            teacher = forward_with_prefix(self.lm, batch.input_ids, batch.attention_mask,
                                          self.prefix(batch, full=True), logits_to_keep=window,
                                          output_hidden_states=hidden)
            # The teacher path learns the answer format by CE too; the student matches its distribution.
            loss = loss + answer_ce(teacher.logits, batch.labels)
            loss = loss + self.weights.distill * answer_kl(out.logits, teacher.logits.detach(), batch.labels,
                                                           self.weights.temperature)
            if hidden:
                loss = loss + self.weights.hidden * hidden_mse(
                    out.hidden_states, tuple(h.detach() for h in teacher.hidden_states), batch.attention_mask)
        return out.logits, loss
