"""Backbones: what reads a segment before the trainable knowledge encoder turns it into a prefix.

All backbones here are frozen, so their outputs can be computed once per segment and cached
(`SegmentFeatures.split` / `SegmentFeatures.pad_stack`):

- `lm_kv`     the frozen LM's own per-layer K,V of the segment (RoPE at positions 0..n-1); with P = n and
              identity heads this is exactly what the LM would attend to had it read the segment itself.
- `lm_layers` hidden states after the LM's lower `lm_layers` layers.
- any other value: a Hugging Face encoder (the retriever's, `retriever`, or an id/path), mean-free token states.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from knowledge_encoder.features import SegmentFeatures
from lm.prompting import PromptTemplate, TextSegment

# name -> backbone class; `knowledge_encoder.backbone` picks one, any other value is a Hugging Face encoder.
BACKBONES: dict[str, type] = {}


def register_backbone(*names: str) -> Callable[[type], type]:
    """Class decorator: a backbone class with `from_config(kcfg, lm, template, retriever_model, device)`, a
    `feature_dim` (None for per-layer K,V features) and `features(segments) -> SegmentFeatures`."""
    def add(cls: type) -> type:
        for name in names:
            BACKBONES[name] = cls
        return cls

    return add


def _right_pad(rows: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), n), dtype=torch.bool, device=device)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long, device=device)
        mask[i, : len(r)] = True
    return ids, mask


@register_backbone("lm_kv", "lm_layers")
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

    @classmethod
    def from_config(cls, kcfg, lm, template: PromptTemplate, retriever_model: str, device) -> LMBackbone:
        scores = "kvzip" if feature_kind(kcfg) == "lm_kv+kvzip" else None
        return cls(lm, template, kcfg.max_segment_tokens, kind=kcfg.backbone, lm_layers=kcfg.lm_layers, scores=scores)

    @property
    def name(self) -> str:
        """What the features hold (a feature cache serves one name)."""
        return self.kind + (f"+{self.scores}" if self.scores else "")

    @property
    def feature_dim(self) -> int | None:
        """Width of hidden-state features; None for `lm_kv` (per-layer K,V in the LM's own attention shape)."""
        return None if self.kind == "lm_kv" else self.lm.config.hidden_size

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


@register_backbone("retriever")
class EncoderBackbone:
    """A frozen Hugging Face encoder (e.g. the retriever's MiniLM) giving token states (N, n, d)."""

    def __init__(self, path: str, max_tokens: int, device):
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(device).eval()
        self.model.requires_grad_(False)
        self.max_tokens = max_tokens

    @classmethod
    def from_config(cls, kcfg, lm, template, retriever_model: str, device) -> EncoderBackbone:
        """`retriever` reads with `retriever.model`; any other value is an HF encoder id or path."""
        from configs.models import resolve_encoder_path

        spec = retriever_model if kcfg.backbone == "retriever" else kcfg.backbone
        return cls(resolve_encoder_path(spec), kcfg.max_segment_tokens, device)

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
    if kcfg.backbone == "lm_kv" and kcfg.prefix_slots and kcfg.compressor == "select" and kcfg.select_scores == "kvzip":
        return "lm_kv+kvzip"
    return kcfg.backbone


def build_backbone(kcfg, lm, template: PromptTemplate, retriever_model: str, device):
    """The backbone a knowledge encoder config (`KnowledgeEncoderConfig`) reads with: a registered name
    (`BACKBONES`), else `kcfg.backbone` is a Hugging Face encoder id or path."""
    cls = BACKBONES.get(kcfg.backbone, EncoderBackbone)
    return cls.from_config(kcfg, lm, template, retriever_model, device)
