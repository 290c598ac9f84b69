"""The frozen LM's rotary position embedding (RoPE), applied to prefix keys outside the LM.

The LM's cached keys are RoPE-rotated at their positions 0..n-1. Averaging rotated keys of several
positions damps their high-frequency dimensions (the rotations of neighbouring positions point in different
directions), so a compressed slot is pooled from the keys *before* RoPE and rotated once at the slot's own
position (`unrotate` -> pool -> `rotate`). A key pooled from one token and rotated at that token's position
is exactly its cached key (a test checks this).

Shapes: keys (N, H, S, D); positions (N, S) or (N, H, S), float (a slot may sit between two tokens).
"""

from __future__ import annotations

import torch
from torch import nn


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(..., D) -> (..., D): the pair (x1, x2) of the two halves becomes (-x2, x1) (LLaMA's RoPE layout)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Rope(nn.Module):
    """cos/sin of the LM's RoPE at arbitrary (fractional) positions, from the LM's own config.

    Uses transformers' rotary module for the config (default, linear, llama3, yarn ... scaling), so the angles
    are the ones the LM applied; nothing is saved in a checkpoint (the frequencies are non-persistent buffers).
    """

    def __init__(self, lm_config):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        text = lm_config.get_text_config() if hasattr(lm_config, "get_text_config") else lm_config
        self.rotary = LlamaRotaryEmbedding(config=text)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (N, S) or (N, H, S) -> cos, sin of shape positions.shape + (D,), float32."""
        flat = positions.reshape(positions.shape[0], -1).float()
        probe = torch.empty(0, device=positions.device, dtype=torch.float32)
        cos, sin = self.rotary(probe, flat)
        shape = (*positions.shape, cos.shape[-1])
        return cos.reshape(shape), sin.reshape(shape)

    @staticmethod
    def _broadcast(t: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        # (N, S, D) -> (N, 1, S, D) so one set of angles serves every head; (N, H, S, D) stays.
        return t.unsqueeze(1) if t.dim() == keys.dim() - 1 else t

    def rotate(self, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Apply RoPE: keys (N, H, S, D) un-rotated -> rotated at `positions` (N, S) or (N, H, S)."""
        cos, sin = self.cos_sin(positions)
        cos, sin = self._broadcast(cos, keys), self._broadcast(sin, keys)
        return keys * cos + rotate_half(keys) * sin

    def unrotate(self, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Undo RoPE: keys (N, H, S, D) rotated at `positions` -> the keys before RoPE.

        The inverse rotation divides by cos^2 + sin^2, which is 1 unless the RoPE type scales its angles
        (yarn's attention factor).
        """
        cos, sin = self.cos_sin(positions)
        cos, sin = self._broadcast(cos, keys), self._broadcast(sin, keys)
        return (keys * cos - rotate_half(keys) * sin) / (cos * cos + sin * sin)
