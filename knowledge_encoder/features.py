"""`SegmentFeatures`: what a backbone computed for N segments, right-padded, in one batch.

The knowledge encoder reads these; a per-segment cache stores them unpadded (`split` / `pad_stack`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class SegmentFeatures:
    """Frozen features of N segments, right-padded to n tokens.

    keys[l], values[l]: (N, H_kv, n, D) for `lm_kv`; hidden: (N, n, d) for the other backbones; mask: (N, n) bool;
    scores[l]: (N, H_kv, n) importance of each cached K,V (KVzip) when the compressor selects positions;
    ids: (N, n) the LM token ids read (right-padded), for an encoder that runs its own adapted encode pass.
    """

    mask: torch.Tensor
    keys: list[torch.Tensor] | None = None
    values: list[torch.Tensor] | None = None
    hidden: torch.Tensor | None = None
    scores: list[torch.Tensor] | None = None
    ids: torch.Tensor | None = None

    def split(self) -> list[SegmentFeatures]:
        """One unpadded SegmentFeatures per segment (for a per-segment cache)."""
        out = []
        for i, length in enumerate(self.mask.sum(1).tolist()):
            out.append(
                SegmentFeatures(
                    mask=self.mask[i : i + 1, :length].clone(),
                    keys=None if self.keys is None else [k[i : i + 1, :, :length].clone() for k in self.keys],
                    values=None if self.values is None else [v[i : i + 1, :, :length].clone() for v in self.values],
                    hidden=None if self.hidden is None else self.hidden[i : i + 1, :length].clone(),
                    scores=None if self.scores is None else [t[i : i + 1, :, :length].clone() for t in self.scores],
                    ids=None if self.ids is None else self.ids[i : i + 1, :length].clone(),
                )
            )
        return out

    @staticmethod
    def pad_stack(parts: Sequence[SegmentFeatures]) -> SegmentFeatures:
        """Right-pad single-segment features to the longest and stack them: N x (1, ..., n_i, ...) -> (N, ..., n, ...)."""
        n = max(p.mask.shape[1] for p in parts)

        def pad(t: torch.Tensor, dim: int) -> torch.Tensor:
            extra = n - t.shape[dim]
            if extra == 0:
                return t
            shape = list(t.shape)
            shape[dim] = extra
            return torch.cat([t, t.new_zeros(shape)], dim=dim)

        first = parts[0]
        return SegmentFeatures(
            mask=torch.cat([pad(p.mask, 1) for p in parts]),
            keys=None if first.keys is None else [
                torch.cat([pad(p.keys[layer], 2) for p in parts]) for layer in range(len(first.keys))
            ],
            values=None if first.values is None else [
                torch.cat([pad(p.values[layer], 2) for p in parts]) for layer in range(len(first.values))
            ],
            hidden=None if first.hidden is None else torch.cat([pad(p.hidden, 1) for p in parts]),
            scores=None if first.scores is None else [
                torch.cat([pad(p.scores[layer], 2) for p in parts]) for layer in range(len(first.scores))
            ],
            ids=None if first.ids is None else torch.cat([pad(p.ids, 1) for p in parts]),
        )

    def truncate(self, lengths: torch.Tensor) -> SegmentFeatures:
        """The features of each segment's first lengths[i] tokens: (N, ..., n) -> (N, ..., max(lengths)).

        Exact for the LM backbones only: a causal LM's K,V of a token do not depend on the tokens after it.
        """
        width = int(lengths.max())
        keep = torch.arange(width, device=self.mask.device)[None, :] < lengths.to(self.mask.device)[:, None]
        return SegmentFeatures(
            mask=self.mask[:, :width] & keep,
            keys=None if self.keys is None else [k[:, :, :width] for k in self.keys],
            values=None if self.values is None else [v[:, :, :width] for v in self.values],
            hidden=None if self.hidden is None else self.hidden[:, :width],
            scores=None if self.scores is None else [t[:, :, :width] for t in self.scores],
            ids=None if self.ids is None else self.ids[:, :width],
        )

    def to(self, device=None, dtype=None) -> SegmentFeatures:
        return SegmentFeatures(
            mask=self.mask.to(device),
            keys=None if self.keys is None else [k.to(device=device, dtype=dtype) for k in self.keys],
            values=None if self.values is None else [v.to(device=device, dtype=dtype) for v in self.values],
            hidden=None if self.hidden is None else self.hidden.to(device=device, dtype=dtype),
            scores=None if self.scores is None else [t.to(device=device, dtype=dtype) for t in self.scores],
            ids=None if self.ids is None else self.ids.to(device),
        )

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """A flat name -> tensor dict (for safetensors): mask, keys.{l}, values.{l}, scores.{l}, hidden, ids."""
        out = {"mask": self.mask}
        for name in ("keys", "values", "scores"):
            for layer, t in enumerate(getattr(self, name) or []):
                out[f"{name}.{layer}"] = t
        if self.hidden is not None:
            out["hidden"] = self.hidden
        if self.ids is not None:
            out["ids"] = self.ids
        return out

    @staticmethod
    def from_tensors(tensors: dict[str, torch.Tensor]) -> SegmentFeatures:
        """The inverse of `to_tensors`."""

        def layers(name: str) -> list[torch.Tensor] | None:
            n = sum(1 for k in tensors if k.startswith(name + "."))
            return [tensors[f"{name}.{i}"] for i in range(n)] if n else None

        return SegmentFeatures(mask=tensors["mask"], keys=layers("keys"), values=layers("values"),
                               hidden=tensors.get("hidden"), scores=layers("scores"), ids=tensors.get("ids"))
