"""Compressors: a segment's per-layer K,V from n tokens to P slots (`knowledge_encoder.compressor`).

- `KVAttentionPool` (`pool`): P learned queries per layer and head attend over the segment's keys; a slot is
  the attention-weighted mean of their keys and values. Starts as chunked mean pooling (a locality bias,
  zero queries). Options, each its own config key so they can be measured one at a time:
  `pool_rope=pre` pools keys before RoPE and rotates each slot at its mean position (`knowledge_encoder.rope`);
  `slot_bias=true` gives each slot an attention logit bias of log(n / P) plus a learned offset per head and
  slot, so P slots keep the attention mass of the n tokens they stand for.
- `KVSelect` (`select`): training-free and question-agnostic: keep, per layer and KV head, the K,V of the P
  positions with the highest importance score (`SegmentFeatures.scores`, KVzip's reconstruction attention,
  see `knowledge_encoder.kvzip`) at their original positions.

Shapes: L layers, H KV heads, D head_dim, N segments, n tokens (right-padded, `mask` (N, n)), P slots.
Every compressor returns `CompressedKV`: keys/values (N, H, P, D) per layer, mask (N, P), bias (N, H, P) or None.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from knowledge_encoder.rope import Rope


@dataclass
class CompressedKV:
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    mask: torch.Tensor
    bias: torch.Tensor | None = None


def locality_bias(slots: int, mask: torch.Tensor) -> torch.Tensor:
    """(N, P, n) additive bias so slot j starts out pooling the j-th of P equal chunks of each segment.

    Content attention (learned queries) is added on top; with zero queries this is chunked mean pooling.
    """
    lengths = mask.sum(1, keepdim=True).clamp(min=1).float()  # (N, 1)
    n = mask.shape[1]
    pos = (torch.arange(n, device=mask.device).float()[None, :] + 0.5) / lengths  # (N, n) in (0, 1]
    centre = (torch.arange(slots, device=mask.device).float() + 0.5) / slots  # (P,)
    width = 0.5 / slots
    return -((pos[:, None, :] - centre[None, :, None]) / width) ** 2  # (N, P, n)


def slot_mask(mask: torch.Tensor, slots: int) -> torch.Tensor:
    """(N, n) token mask -> (N, P): a slot is real when its segment has at least one token."""
    return mask.any(1, keepdim=True).expand(-1, slots).contiguous()


class KVAttentionPool(nn.Module):
    """Compress a segment's per-layer K,V from n tokens to P slots by learned attention per layer and head.

    queries: (L, H, P, D). For layer l: A = softmax(q K^T / sqrt(D) + locality) over the n real tokens,
    K' = A K and V' = A V, each (N, H, P, D). With a `rope`, K is un-rotated first and K' is rotated at the
    slot's position A . (0..n-1), so slots keep the LM's relative-position geometry.
    """

    def __init__(self, num_layers: int, kv_heads: int, slots: int, head_dim: int, rope: Rope | None = None,
                 slot_bias: bool = False):
        super().__init__()
        self.slots = slots
        self.queries = nn.Parameter(torch.zeros(num_layers, kv_heads, slots, head_dim))
        self.rope = rope
        # Learned offset on top of log(n / P); shared by the layers (it enters SDPA as one position_bias).
        self.bias_offset = nn.Parameter(torch.zeros(kv_heads, slots)) if slot_bias else None

    def forward(self, keys: list[torch.Tensor], values: list[torch.Tensor], mask: torch.Tensor) -> CompressedKV:
        n = mask.shape[1]
        bias = locality_bias(self.slots, mask)[:, None]  # (N, 1, P, n)
        neg = torch.finfo(torch.float32).min
        bias = bias.masked_fill(~mask[:, None, None, :], neg)
        scale = 1.0 / math.sqrt(keys[0].shape[-1])
        positions = torch.arange(n, device=mask.device, dtype=torch.float32).expand(mask.shape[0], n)  # (N, n)
        out_k, out_v = [], []
        for layer, (k, v) in enumerate(zip(keys, values)):
            k = k.float()
            if self.rope is not None:
                k = self.rope.unrotate(k, positions)  # before RoPE
            logits = torch.einsum("hpd,nhtd->nhpt", self.queries[layer].float(), k) * scale + bias
            pooled_k, pooled_v = self.pool_with(logits.softmax(-1), k, v.float(), positions)
            out_k.append(pooled_k)
            out_v.append(pooled_v)
        slot_bias = None
        if self.bias_offset is not None:
            lengths = mask.sum(1).clamp(min=1).float()  # (N,)
            slot_bias = (lengths / self.slots).log()[:, None, None] + self.bias_offset[None].float()  # (N, H, P)
        return CompressedKV(out_k, out_v, slot_mask(mask, self.slots), slot_bias)

    def pool_with(self, attn: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor):
        """Slots from attention weights attn (N, H, P, n) over keys/values (N, H, n, D) at positions (N, n).

        Keys are post-RoPE without a `rope`, pre-RoPE with one; then each slot's key is rotated at its
        attention-weighted position (N, H, P), so a slot pooled from one token is that token's cached key.
        """
        pooled = attn @ keys
        if self.rope is not None:
            slot_positions = (attn @ positions[:, None, :, None]).squeeze(-1)  # (N, H, P)
            pooled = self.rope.rotate(pooled, slot_positions)
        return pooled, attn @ values


class KVSelect(nn.Module):
    """Keep the P most important positions per layer and KV head (no parameters).

    scores[l]: (N, H, n), higher = keep. Kept positions are ordered by position; their keys stay rotated at
    their original positions, so the LM reads them exactly as it would have in the full segment. A segment
    shorter than P keeps all its tokens and masks the remaining slots.
    """

    def __init__(self, slots: int):
        super().__init__()
        self.slots = slots

    def forward(self, keys: list[torch.Tensor], values: list[torch.Tensor], mask: torch.Tensor,
                scores: list[torch.Tensor]) -> CompressedKV:
        n = mask.shape[1]
        p = min(self.slots, n)
        out_k, out_v = [], []
        for k, v, s in zip(keys, values, scores):
            s = s.float().masked_fill(~mask[:, None, :], float("-inf"))
            # Padding scores -inf, so a short segment keeps its real tokens first; sort by position.
            top = s.topk(p, dim=-1).indices.sort(dim=-1).values  # (N, H, p)
            index = top[..., None].expand(-1, -1, -1, k.shape[-1])
            out_k.append(self._pad(k.float().gather(2, index)))
            out_v.append(self._pad(v.float().gather(2, index)))
        lengths = mask.sum(1, keepdim=True)  # (N, 1)
        kept = torch.arange(self.slots, device=mask.device)[None, :] < lengths.clamp(max=p)
        return CompressedKV(out_k, out_v, kept)

    def _pad(self, t: torch.Tensor) -> torch.Tensor:
        """(N, H, p, D) -> (N, H, P, D) with zero slots when the batch's longest segment is shorter than P."""
        extra = self.slots - t.shape[2]
        return t if extra <= 0 else torch.cat([t, t.new_zeros(*t.shape[:2], extra, t.shape[3])], dim=2)
