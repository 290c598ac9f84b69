"""The knowledge encoder: frozen segment features -> per-layer K/V prefixes for a frozen LLaMA-family LM.

Read top to bottom: pooling (n tokens -> P slots), projection heads (2*L of them: a K and a V head per
LM layer), format slots (a small learned static prefix), and `KnowledgeEncoder`, which wires them.

Shapes: L layers, H = num_key_value_heads (GQA-aware: prefixes live in K/V space, not query space),
D = head_dim, N segments, n tokens per segment, P slots per segment, d backbone width.
Why the default warm start: an encoder trained from scratch learned nothing in 12 CPU minutes, while the
LM's own K,V of a segment already carry its facts (README "How it works"); with P = n and
identity heads the prefix equals the LM having read the segment, and compression is learned from there.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from common.errors import UserError
from configs.schema import KnowledgeEncoderConfig
from knowledge_encoder.adapter import EncodeAdapter
from knowledge_encoder.compress import KVAttentionPool, KVSelect, slot_mask
from knowledge_encoder.features import SegmentFeatures
from knowledge_encoder.memory import MemoryTokens
from knowledge_encoder.mentions import MentionFinder, gather_mentions
from knowledge_encoder.rope import Rope
from knowledge_encoder.salience import SalienceScorer, skip_repeats
from lm.prefix import Prefix


def lm_dims(config) -> tuple[int, int, int]:
    """(L, H_kv, D) of a LLaMA-family config, honouring an explicit head_dim."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return text.num_hidden_layers, kv_heads, head_dim


class KVProjection(nn.Module):
    """The 2*L heads for K/V-space features: linear maps initialised to the identity.

    identity: per layer and head a D x D map (L*2*H*D*D parameters);
    full:     per layer an (H*D) x (H*D) map that may mix heads;
    factored: per layer identity + A_l B (a shared rank-r basis B), so a 7B LM stays cheap.
    """

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, mode: str = "identity", rank: int = 64):
        super().__init__()
        self.mode = mode
        self.kv_heads, self.head_dim = kv_heads, head_dim
        width = kv_heads * head_dim
        if mode == "identity":
            eye = torch.eye(head_dim).expand(num_layers, 2, kv_heads, head_dim, head_dim)
            self.weight = nn.Parameter(eye.clone())
        elif mode == "full":
            self.weight = nn.Parameter(torch.eye(width).expand(num_layers, 2, width, width).clone())
        elif mode == "factored":
            self.basis = nn.Parameter(torch.randn(2, rank, width) / math.sqrt(width))
            self.up = nn.Parameter(torch.zeros(num_layers, 2, width, rank))
        else:
            raise ValueError(f"unknown projection {mode!r}")

    def forward(self, x: torch.Tensor, layer: int, which: int) -> torch.Tensor:
        """x: (N, H, S, D) -> (N, H, S, D); which = 0 for K, 1 for V."""
        if self.mode == "identity":
            return torch.einsum("nhsd,hde->nhse", x, self.weight[layer, which])
        n, h, s, d = x.shape
        flat = x.transpose(1, 2).reshape(n, s, h * d)
        if self.mode == "full":
            flat = flat @ self.weight[layer, which]
        else:
            flat = flat + (flat @ self.basis[which].T) @ self.up[layer, which].T
        return flat.view(n, s, h, d).transpose(1, 2)


class HiddenPool(nn.Module):
    """P learned queries attending over backbone token states: (N, n, d) -> (N, P, d)."""

    def __init__(self, dim: int, slots: int, heads: int = 4):
        super().__init__()
        self.slots = slots
        self.queries = nn.Parameter(torch.randn(slots, dim) * 0.02)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q = self.queries.expand(hidden.shape[0], -1, -1).to(hidden.dtype)
        out, _ = self.attn(q, hidden, hidden, key_padding_mask=~mask, need_weights=False)
        return out


class HiddenToKV(nn.Module):
    """The 2*L projection heads from backbone states (N, S, d) to per-layer K, V (N, H, S, D).

    full: one Linear(d, H*D) per layer and K/V; factored: a shared Linear(d, r) then Linear(r, H*D) per head.
    """

    def __init__(self, dim: int, num_layers: int, kv_heads: int, head_dim: int, factored: bool, rank: int):
        super().__init__()
        self.kv_heads, self.head_dim = kv_heads, head_dim
        width = kv_heads * head_dim
        self.shared = nn.Linear(dim, rank) if factored else None
        in_dim = rank if factored else dim
        self.heads = nn.ModuleList(nn.Linear(in_dim, width) for _ in range(2 * num_layers))

    def forward(self, hidden: torch.Tensor, layer: int, which: int) -> torch.Tensor:
        x = self.shared(hidden) if self.shared is not None else hidden
        out = self.heads[2 * layer + which](x)  # (N, S, H*D)
        n, s, _ = out.shape
        return out.view(n, s, self.kv_heads, self.head_dim).transpose(1, 2)


class FormatSlots(nn.Module):
    """A small learned static prefix (L, 2, H, S, D) shared by all questions: it carries the answer format."""

    def __init__(self, num_layers: int, kv_heads: int, slots: int, head_dim: int):
        super().__init__()
        self.kv = nn.Parameter(torch.zeros(num_layers, 2, kv_heads, slots, head_dim))

    @torch.no_grad()
    def init_from(self, init: Prefix) -> None:
        """Start from real K,V (the LM's own K,V of a short instruction): a random start trains slower."""
        slots = self.kv.shape[3]
        if init.length < slots:
            raise ValueError(f"format init has {init.length} slots, need {slots}")
        k = torch.stack([t[0, :, :slots] for t in init.keys])  # (L, H, S, D)
        v = torch.stack([t[0, :, :slots] for t in init.values])
        self.kv.copy_(torch.stack([k, v], dim=1))

    def forward(self, batch: int) -> Prefix:
        kv = self.kv
        slots = kv.shape[3]
        return Prefix(
            keys=[kv[layer, 0].unsqueeze(0).expand(batch, -1, -1, -1) for layer in range(kv.shape[0])],
            values=[kv[layer, 1].unsqueeze(0).expand(batch, -1, -1, -1) for layer in range(kv.shape[0])],
            mask=torch.ones(batch, slots, dtype=torch.bool, device=kv.device),
            next_position=slots,
        )


class KnowledgeEncoder(nn.Module):
    """Segment features -> one Prefix per segment, plus the format slots shared by every question."""

    def __init__(self, cfg: KnowledgeEncoderConfig, lm_config, feature_dim: int | None = None, lm=None,
                 tokenizer=None):
        """`lm` (the frozen LM, held by reference, never a sub-module) is needed by an encode adapter only;
        `tokenizer` (the LM's) by select_gather_mentions only, loaded from the LM's path when not given."""
        super().__init__()
        if cfg.select_gather_mentions and cfg.select_skip_repeats:
            raise UserError("knowledge_encoder.select_gather_mentions (on by default) and select_skip_repeats are two "
                            "rules for the same repeats: set one of them (select_gather_mentions=false to skip repeats)")
        self.cfg = cfg
        self._lm_path = getattr(lm_config, "_name_or_path", "") or ""
        self._mentions = MentionFinder(tokenizer) if tokenizer is not None else None
        self.feature_dim = feature_dim
        num_layers, kv_heads, head_dim = lm_dims(lm_config)
        self.slots = cfg.prefix_slots or 0  # 0 = one slot per segment token
        self.next_position = cfg.max_segment_tokens
        self.kv_backbone = cfg.backbone == "lm_kv"
        self.adapter = None
        self.scorer = None  # a learned selection scorer (select_scores=learned)
        if self.kv_backbone:
            self.pool = None
            if self.slots and cfg.compressor == "select":
                self.pool = KVSelect(self.slots)
                if cfg.select_scores == "learned":
                    self.scorer = SalienceScorer(num_layers, kv_heads, head_dim, window=cfg.scorer_window,
                                                 layers=cfg.scorer_layers)
            elif self.slots and cfg.compressor == "memory":
                if lm is None:
                    raise ValueError("the memory compressor needs the LM (its memory tokens run through it)")
                self.pool = MemoryTokens(lm, self.slots, cfg.max_segment_tokens, cfg.memory_inputs)
                object.__setattr__(self, "lm", lm)
            elif self.slots:
                rope = Rope(lm_config) if cfg.pool_rope == "pre" else None
                self.pool = KVAttentionPool(num_layers, kv_heads, self.slots, head_dim, rope, cfg.slot_bias)
            self.proj = KVProjection(num_layers, kv_heads, head_dim, cfg.projection, cfg.rank)
            if cfg.encode_lora_rank and self.slots and cfg.compressor in ("pool", "memory"):
                if lm is None:
                    raise ValueError("an encode adapter (encode_lora_rank > 0) needs the LM")
                self.adapter = EncodeAdapter(lm, cfg.encode_lora_rank, list(cfg.encode_lora_targets),
                                            last_layers=cfg.encode_lora_layers)
                object.__setattr__(self, "lm", lm)
        else:
            if feature_dim is None:
                raise ValueError("a hidden-state backbone needs feature_dim")
            self.pool = HiddenPool(feature_dim, self.slots) if self.slots else None
            self.heads = HiddenToKV(feature_dim, num_layers, kv_heads, head_dim,
                                    factored=cfg.projection == "factored", rank=cfg.rank)
        self.format = FormatSlots(num_layers, kv_heads, cfg.format_slots, head_dim) if cfg.format_slots else None

    def forward(self, features: SegmentFeatures, full: bool = False) -> Prefix:
        """N segments -> Prefix with keys (N, H, P, D) per layer (P = n when prefix_slots is 0 or `full`).

        `full=True` skips the pooling: the P = segment-length path, the teacher of the compressed one.
        """
        mask = features.mask
        bias = None
        if self.kv_backbone:
            keys, values = features.keys, features.values
            if isinstance(self.pool, KVSelect) and not full:
                if self.scorer is not None:
                    heads = values[0].shape[1]
                    scores = [self.selection_scores(features)[:, None, :].expand(-1, heads, -1)] * len(values)
                else:
                    scores = features.scores
                if scores is None:
                    raise ValueError("the select compressor needs importance scores (SegmentFeatures.scores)")
                kept = self.pool(keys, values, mask, scores)
                keys, values, mask = kept.keys, kept.values, kept.mask
            elif isinstance(self.pool, MemoryTokens) and not full:
                slots = self.pool(self.lm, keys, values, mask, self.adapter, features.ids)
                keys, values, mask = slots.keys, slots.values, slots.mask
            elif self.pool is not None and not full:
                if self.adapter is not None:
                    if features.ids is None:
                        raise ValueError("the encode adapter needs the segments' token ids (SegmentFeatures.ids)")
                    keys, values = self.adapter.encode(self.lm, features.ids, mask)
                pooled = self.pool(keys, values, mask)
                keys, values, mask, bias = pooled.keys, pooled.values, pooled.mask, pooled.bias
            keys = [self.proj(k.float(), layer, 0) for layer, k in enumerate(keys)]
            values = [self.proj(v.float(), layer, 1) for layer, v in enumerate(values)]
        else:
            hidden = features.hidden.float()
            if self.pool is not None and not full:
                hidden = self.pool(hidden, mask)
                mask = slot_mask(mask, self.slots)
            num_layers = len(self.heads.heads) // 2
            keys = [self.heads(hidden, layer, 0) for layer in range(num_layers)]
            values = [self.heads(hidden, layer, 1) for layer in range(num_layers)]
        return Prefix(keys=keys, values=values, mask=mask.contiguous(), next_position=self.next_position, bias=bias)

    def selection_scores(self, features: SegmentFeatures) -> torch.Tensor:
        """(N, n) scores of the learned scorer whose top `slots` positions the select compressor keeps, in every
        layer and head (-inf at padding); with select_skip_repeats, repeats of a kept position rank last; with
        select_gather_mentions, a repeated mention's picks are moved onto one of its occurrences."""
        if self.scorer is None:
            raise ValueError("selection_scores needs knowledge_encoder.select_scores=learned")
        logits = self.scorer(features.values, features.mask)
        if not (self.cfg.select_skip_repeats or self.cfg.select_gather_mentions):
            return logits
        if features.ids is None:
            rule = "select_skip_repeats" if self.cfg.select_skip_repeats else "select_gather_mentions"
            raise ValueError(f"knowledge_encoder.{rule} needs the segments' token ids "
                             "(SegmentFeatures.ids); features without them cannot tell a repeat")
        if self.cfg.select_skip_repeats:
            return skip_repeats(logits.detach(), features.ids, features.mask, self.slots)
        return gather_mentions(logits, features.ids, features.mask, self.slots, self.mention_finder())

    def mention_finder(self) -> MentionFinder:
        """The LM tokenizer's mention finder, loaded from the LM's path on first use when none was given."""
        if self._mentions is None:
            from transformers import AutoTokenizer

            if not self._lm_path:
                raise ValueError("knowledge_encoder.select_gather_mentions needs the LM's tokenizer: pass "
                                 "tokenizer= to KnowledgeEncoder (the LM config names no path to load it from)")
            try:
                self._mentions = MentionFinder(AutoTokenizer.from_pretrained(self._lm_path))
            except OSError as err:
                raise ValueError(f"knowledge_encoder.select_gather_mentions needs the LM's tokenizer; it could not "
                                 f"be loaded from {self._lm_path}: {err}") from err
        return self._mentions

    def format_prefix(self, batch: int) -> Prefix | None:
        return None if self.format is None else self.format(batch)

    def build_prefix(self, features: SegmentFeatures, k: int, full: bool = False) -> Prefix:
        """Features of B*k segments (question-major) -> the full prefix of B questions: format slots + k*P slots."""
        segs = Prefix.group_segments(self(features, full=full), k)
        fmt = self.format_prefix(segs.batch_size)
        return segs if fmt is None else Prefix.concat([fmt, segs])
