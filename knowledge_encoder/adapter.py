"""A trainable encode pass: the frozen LM reads a segment with LoRA deltas that exist only while it encodes.

The compressed prefix is pooled from K,V that the LM computed for a reader with all n tokens; an adapter
lets the encode pass learn to put what the P slots must carry where the pooling can keep it (every
frozen-decoder compressor that works trains its encoder side: ICAE, 500xCompressor, KV-Distill).

Why not peft's LoRA: peft injects its layers into the model it wraps, and the LM here is shared: the same
object answers questions (and is the teacher that reads the full segment), and must stay the original LM.
So the deltas live in this module, and the encode pass calls the LM's decoder with `torch.func.functional_call`
and the weights W + (alpha / r) B A of the targeted linear layers: nothing of the LM is modified, and the
answering LM cannot see the adapter (a test checks its logits).

Shapes: A (r, in), B (out, r) per targeted linear; ids, mask (N, n) right-padded; K,V (N, H_kv, n, D) per layer.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call


def _layer_index(name: str) -> int:
    """The decoder layer a module name belongs to ("layers.12.self_attn.q_proj" -> 12; -1 outside the layers)."""
    parts = name.split(".")
    for head, index in zip(parts, parts[1:]):
        if head == "layers" and index.isdigit():
            return int(index)
    return -1


class EncodeAdapter(nn.Module):
    def __init__(self, lm, rank: int, targets: list[str], alpha: float | None = None, last_layers: int = 0):
        """`last_layers` > 0 adapts only the last that many decoder layers (their linear layers named in
        `targets`); autograd then records nothing below the first adapted layer."""
        super().__init__()
        decoder = lm.get_decoder()
        first = max(0, len(decoder.layers) - last_layers) if last_layers > 0 else 0
        self.names = [n for n, m in decoder.named_modules()
                      if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in targets
                      and _layer_index(n) >= first]
        if not self.names:
            raise ValueError(f"no linear layer of the LM is named like {targets}")
        self.rank = rank
        self.scale = (alpha or rank) / rank
        shapes = {n: decoder.get_submodule(n).weight.shape for n in self.names}
        # ParameterDict keys may not hold dots.
        self.a = nn.ParameterDict({self._key(n): nn.Parameter(torch.empty(rank, shapes[n][1])) for n in self.names})
        self.b = nn.ParameterDict({self._key(n): nn.Parameter(torch.zeros(shapes[n][0], rank)) for n in self.names})
        for p in self.a.values():
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))  # B = 0: the adapted LM starts as the LM itself

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "__")

    def run(self, lm, **kwargs):
        """The LM's decoder called with `kwargs` (input_ids or inputs_embeds, attention_mask, …) under the adapted
        weights W + (alpha / r) B A; the LM object itself is not modified."""
        decoder = lm.get_decoder()
        weights = {}
        for name in self.names:
            base = decoder.get_submodule(name).weight
            delta = self.b[self._key(name)] @ self.a[self._key(name)]
            weights[f"{name}.weight"] = base + (self.scale * delta).to(base.dtype)
        return functional_call(decoder, weights, (), kwargs)

    def encode(self, lm, ids: torch.Tensor, mask: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The adapted LM's per-layer K,V of right-padded segments: (N, H_kv, n, D) each, with gradients into A, B."""
        cache = self.run(lm, input_ids=ids, attention_mask=mask.long(), use_cache=True).past_key_values
        return [layer.keys for layer in cache.layers], [layer.values for layer in cache.layers]
