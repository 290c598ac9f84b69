"""Backbones: what reads a segment before the trainable knowledge encoder turns it into a prefix.

All backbones here are frozen, so their outputs can be computed once per segment and cached
(`SegmentFeatures.split` / `SegmentFeatures.pad_stack`):

- `lm_kv`     the frozen LM's own per-layer K,V of the segment (RoPE at positions 0..n-1); with P = n and
              identity heads this is exactly what the LM would attend to had it read the segment itself.
- `lm_layers` hidden states after the LM's lower `lm_layers` layers.
- any other value: a Hugging Face encoder (the retriever's, `retriever`, or an id/path), mean-free token states.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from qa.prompting import PromptTemplate, TextSegment


@dataclass
class SegmentFeatures:
    """Frozen features of N segments, right-padded to n tokens.

    keys[l], values[l]: (N, H_kv, n, D) for `lm_kv`; hidden: (N, n, d) for the other backbones; mask: (N, n) bool.
    """

    mask: torch.Tensor
    keys: list[torch.Tensor] | None = None
    values: list[torch.Tensor] | None = None
    hidden: torch.Tensor | None = None

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
        )

    def to(self, device=None, dtype=None) -> SegmentFeatures:
        return SegmentFeatures(
            mask=self.mask.to(device),
            keys=None if self.keys is None else [k.to(device=device, dtype=dtype) for k in self.keys],
            values=None if self.values is None else [v.to(device=device, dtype=dtype) for v in self.values],
            hidden=None if self.hidden is None else self.hidden.to(device=device, dtype=dtype),
        )


def _right_pad(rows: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), n), dtype=torch.bool, device=device)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long, device=device)
        mask[i, : len(r)] = True
    return ids, mask


class LMBackbone:
    """The frozen LM reading a segment on its own: its per-layer K,V (`lm_kv`) or lower hidden states."""

    def __init__(self, lm, template: PromptTemplate, max_tokens: int, kind: str = "lm_kv", lm_layers: int = 4):
        if kind not in ("lm_kv", "lm_layers"):
            raise ValueError(kind)
        self.lm = lm
        self.template = template
        self.max_tokens = max_tokens
        self.kind = kind
        self.lm_layers = lm_layers

    @property
    def feature_dim(self) -> int:
        return self.lm.config.hidden_size

    def tokenize(self, segments: Sequence[TextSegment]) -> list[list[int]]:
        return [self.template.segment_ids(s, self.max_tokens) for s in segments]

    @torch.no_grad()
    def features_from_ids(self, rows: Sequence[Sequence[int]]) -> SegmentFeatures:
        device = next(self.lm.parameters()).device
        pad_id = self.template.tokenizer.pad_token_id or 0
        ids, mask = _right_pad(rows, pad_id, device)
        body = self.lm.get_decoder()
        if self.kind == "lm_layers":
            out = body(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True, use_cache=False)
            return SegmentFeatures(mask=mask, hidden=out.hidden_states[self.lm_layers])
        # Right padding keeps real tokens at positions 0..n_i-1 and, being causal, unaffected by the pads.
        out = body(input_ids=ids, attention_mask=mask.long(), use_cache=True)
        cache = out.past_key_values
        keys = [layer.keys for layer in cache.layers]
        values = [layer.values for layer in cache.layers]
        return SegmentFeatures(mask=mask, keys=keys, values=values)

    def features(self, segments: Sequence[TextSegment]) -> SegmentFeatures:
        return self.features_from_ids(self.tokenize(segments))


class EncoderBackbone:
    """A frozen Hugging Face encoder (e.g. the retriever's MiniLM) giving token states (N, n, d)."""

    def __init__(self, path: str, max_tokens: int, device):
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(device).eval()
        self.model.requires_grad_(False)
        self.max_tokens = max_tokens

    @property
    def feature_dim(self) -> int:
        return self.model.config.hidden_size

    def tokenize(self, segments: Sequence[TextSegment]) -> list[list[int]]:
        enc = self.tokenizer([s.title for s in segments], [s.text for s in segments], truncation=True,
                             max_length=self.max_tokens)
        return enc["input_ids"]

    @torch.no_grad()
    def features_from_ids(self, rows: Sequence[Sequence[int]]) -> SegmentFeatures:
        device = next(self.model.parameters()).device
        ids, mask = _right_pad(rows, self.tokenizer.pad_token_id or 0, device)
        hidden = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        return SegmentFeatures(mask=mask, hidden=hidden)

    def features(self, segments: Sequence[TextSegment]) -> SegmentFeatures:
        return self.features_from_ids(self.tokenize(segments))


def build_backbone(backbone: str, lm, template: PromptTemplate, max_tokens: int, lm_layers: int,
                   retriever_model: str, device):
    """`lm_kv` / `lm_layers` read with the frozen LM; `retriever` or an HF id/path read with that encoder."""
    if backbone in ("lm_kv", "lm_layers"):
        return LMBackbone(lm, template, max_tokens, kind=backbone, lm_layers=lm_layers)
    from configs.models import resolve_encoder_path

    spec = retriever_model if backbone == "retriever" else backbone
    return EncoderBackbone(resolve_encoder_path(spec), max_tokens, device)
