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


def _right_pad(rows: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), n), dtype=torch.bool, device=device)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long, device=device)
        mask[i, : len(r)] = True
    return ids, mask


class LMBackbone:
    """The frozen LM reading a segment on its own: its per-layer K,V (`lm_kv`) or lower hidden states.

    `scores="kvzip"` also scores every cached K,V by KVzip's reconstruction attention (one more LM pass over
    a repeat prompt + the segment), for the `select` compressor.
    """

    def __init__(self, lm, template: PromptTemplate, max_tokens: int, kind: str = "lm_kv", lm_layers: int = 4,
                 scores: str | None = None):
        if kind not in ("lm_kv", "lm_layers"):
            raise ValueError(kind)
        if scores not in (None, "kvzip") or (scores and kind != "lm_kv"):
            raise ValueError(f"scores={scores!r} needs the lm_kv backbone")
        self.lm = lm
        self.template = template
        self.max_tokens = max_tokens
        self.kind = kind
        self.lm_layers = lm_layers
        self.scores = scores

    @property
    def name(self) -> str:
        """What the features hold (a feature cache serves one name)."""
        return self.kind + (f"+{self.scores}" if self.scores else "")

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
        scores = None
        if self.scores == "kvzip":
            from knowledge_encoder.kvzip import REPEAT_PROMPT, kvzip_scores

            prompt = self.template.tokenizer(REPEAT_PROMPT, add_special_tokens=False)["input_ids"]
            scores = kvzip_scores(self.lm, ids, mask, cache, prompt)
        return SegmentFeatures(mask=mask, keys=keys, values=values, scores=scores, ids=ids)

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

    @property
    def name(self) -> str:
        return f"encoder:{self.model.config.name_or_path}"

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


def feature_kind(kcfg) -> str:
    """What a knowledge encoder config's backbone computes per segment: systems with the same kind share
    one feature cache (e.g. `lm_kv`, `lm_kv+kvzip` when the K,V are also scored for selection)."""
    if kcfg.backbone == "lm_kv" and kcfg.prefix_slots and kcfg.compressor == "select":
        return "lm_kv+kvzip"
    return kcfg.backbone


def build_backbone(kcfg, lm, template: PromptTemplate, retriever_model: str, device):
    """The backbone a knowledge encoder config (`KnowledgeEncoderConfig`) reads with.

    `lm_kv` / `lm_layers` read with the frozen LM (`lm_kv` also scores its K,V when the compressor selects);
    `retriever` or an HF id/path read with that encoder.
    """
    if kcfg.backbone in ("lm_kv", "lm_layers"):
        scores = "kvzip" if feature_kind(kcfg) == "lm_kv+kvzip" else None
        return LMBackbone(lm, template, kcfg.max_segment_tokens, kind=kcfg.backbone, lm_layers=kcfg.lm_layers,
                          scores=scores)
    from configs.models import resolve_encoder_path

    spec = retriever_model if kcfg.backbone == "retriever" else kcfg.backbone
    return EncoderBackbone(resolve_encoder_path(spec), kcfg.max_segment_tokens, device)
