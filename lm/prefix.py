"""`Prefix`: per-layer key/value slots that a frozen LM attends to before its prompt.

A Prefix is the one currency between the knowledge encoder, the static (peft) prefixes and the LM:

    keys[l], values[l]  : (B, H_kv, S, D)   for every LM layer l (already RoPE-rotated where meaningful)
    mask                : (B, S) bool       True = a real slot, False = padding that no token may attend to
    next_position       : int               RoPE position of the first prompt token after the prefix
    bias                : (B, H_kv, S) or None   additive attention logit of each slot (every layer), e.g.
                                            log(tokens a pooled slot stands for), so a slot keeps their mass

`next_position` keeps positions identical in training and generation: segment K,V computed by the LM at
positions 0..n-1 (n <= max_segment_tokens) are followed by the prompt at position max_segment_tokens
whatever k is, and a peft-style static prefix of S slots is followed by position S (what peft does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache


@dataclass
class Prefix:
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    mask: torch.Tensor
    next_position: int
    bias: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.mask.shape[0]

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    def to_cache(self, config) -> DynamicCache:
        """A fresh DynamicCache holding the prefix (one `update` per layer); the LM appends to it in forward."""
        cache = DynamicCache(config=config)
        for layer, (k, v) in enumerate(zip(self.keys, self.values)):
            cache.update(k, v, layer)
        return cache

    def to(self, device=None, dtype=None) -> Prefix:
        return Prefix(
            keys=[k.to(device=device, dtype=dtype) for k in self.keys],
            values=[v.to(device=device, dtype=dtype) for v in self.values],
            mask=self.mask.to(device=device),
            next_position=self.next_position,
            bias=None if self.bias is None else self.bias.to(device=device, dtype=torch.float32),
        )

    def repeat_interleave(self, n: int) -> Prefix:
        """Repeat every batch row n times (e.g. one static prefix for every question of a batch)."""
        return Prefix(
            keys=[k.repeat_interleave(n, dim=0) for k in self.keys],
            values=[v.repeat_interleave(n, dim=0) for v in self.values],
            mask=self.mask.repeat_interleave(n, dim=0),
            next_position=self.next_position,
            bias=None if self.bias is None else self.bias.repeat_interleave(n, dim=0),
        )

    def select(self, index: torch.Tensor | list[int]) -> Prefix:
        index = torch.as_tensor(index, device=self.mask.device, dtype=torch.long)
        return Prefix(
            keys=[k.index_select(0, index) for k in self.keys],
            values=[v.index_select(0, index) for v in self.values],
            mask=self.mask.index_select(0, index),
            next_position=self.next_position,
            bias=None if self.bias is None else self.bias.index_select(0, index),
        )

    @staticmethod
    def concat(parts: list[Prefix]) -> Prefix:
        """Concatenate along slots. Parts sit side by side in position space, so the prompt starts after the
        furthest one."""
        parts = [p for p in parts if p is not None]
        if not parts:
            raise ValueError("Prefix.concat needs at least one prefix")
        if len(parts) == 1:
            return parts[0]
        batch = max(p.batch_size for p in parts)
        parts = [p.repeat_interleave(batch) if p.batch_size == 1 and batch > 1 else p for p in parts]
        return Prefix(
            keys=[torch.cat([p.keys[i] for p in parts], dim=2) for i in range(parts[0].num_layers)],
            values=[torch.cat([p.values[i] for p in parts], dim=2) for i in range(parts[0].num_layers)],
            mask=torch.cat([p.mask for p in parts], dim=1),
            next_position=max(p.next_position for p in parts),
            bias=_cat_bias(parts, dim=2),
        )

    @staticmethod
    def group_segments(flat: Prefix, k: int) -> Prefix:
        """Group B*k single-segment prefixes (question-major order) into B prefixes of k*P slots.

        (B*k, H, P, D) -> (B, H, k*P, D); mask (B*k, P) -> (B, k*P).
        """
        bk, _, p, _ = flat.keys[0].shape
        if bk % k:
            raise ValueError(f"{bk} segment prefixes cannot be grouped by k={k}")
        b = bk // k

        def group(t: torch.Tensor) -> torch.Tensor:
            h, d = t.shape[1], t.shape[3]
            return t.view(b, k, h, p, d).transpose(1, 2).reshape(b, h, k * p, d)

        return Prefix(
            keys=[group(t) for t in flat.keys],
            values=[group(t) for t in flat.values],
            mask=flat.mask.view(b, k * p),
            next_position=flat.next_position,
            bias=None if flat.bias is None else flat.bias.view(b, k, -1, p).transpose(1, 2).reshape(b, -1, k * p),
        )

    @staticmethod
    def cat_batch(parts: list[Prefix]) -> Prefix:
        """Concatenate prefixes of equal slot count along the batch dimension."""
        return Prefix(
            keys=[torch.cat([p.keys[i] for p in parts], dim=0) for i in range(parts[0].num_layers)],
            values=[torch.cat([p.values[i] for p in parts], dim=0) for i in range(parts[0].num_layers)],
            mask=torch.cat([p.mask for p in parts], dim=0),
            next_position=max(p.next_position for p in parts),
            bias=_cat_bias(parts, dim=0),
        )


def _cat_bias(parts: list[Prefix], dim: int) -> torch.Tensor | None:
    """Concatenate the parts' slot biases (dim 2 = slots, 0 = batch); a part without one contributes zeros."""
    if all(p.bias is None for p in parts):
        return None
    like = next(p.bias for p in parts if p.bias is not None)
    return torch.cat([
        p.bias if p.bias is not None else like.new_zeros(p.batch_size, p.keys[0].shape[1], p.length)
        for p in parts
    ], dim=dim)
