"""Frozen segment features kept on disk, so a second process over the same corpus does not recompute them.

    run_dir/feature_cache/<backbone>/manifest.json          what computed the entries (`backbone_signature`)
    run_dir/feature_cache/<backbone>/<aa>/<key>.safetensors  one segment's features (`SegmentFeatures.to_tensors`)

The frozen LM's K,V of a segment cost one LM forward pass; training, `--resume`, a second system and the
evaluation of the same run all read the same segments, and the RAM cache (`qa.batching.FeatureCache`) dies
with its process. This is its second tier: a RAM miss looks here before computing, and what is computed is
written here too. Keys are the RAM cache's (a hash of title and text). An LRU bounded by
`train.feature_disk_gb` (`knowledge_encoder.disk_lru`); a different LM, weights, dtype, backbone, token limit
or segment format empties it. SmolLM2-135M's K,V take ~23 KB per token in bf16 (~4 MB per SQuAD paragraph).
"""

from __future__ import annotations

from pathlib import Path

import torch

from configs.models import lm_fingerprint
from knowledge_encoder.disk_lru import DiskLRU
from knowledge_encoder.features import SegmentFeatures
from lm.prompting import TextSegment

PROBE = TextSegment(title="Probe title", text="A probe text, 1,234 words: ünïcode — and digits.")


def _weights_probe(module: torch.nn.Module) -> str:
    """A cheap fingerprint of a model's weights: sums of its first two and last two parameter tensors."""
    params = list(module.parameters())
    picked = params[:2] + params[-2:]
    return ",".join(f"{float(p.detach().double().sum()):.6e}" for p in picked)


def backbone_signature(backbone) -> dict:
    """What a backbone's features depend on: its kind, model (config, path, weights, dtype), token limit and
    the token ids it reads for a probe segment (a changed segment format or tokenizer changes them)."""
    model = backbone.lm if hasattr(backbone, "lm") else backbone.model
    config = model.config
    sig = {
        "backbone": backbone.name,
        "model": str(getattr(config, "_name_or_path", "")),
        "weights": _weights_probe(model),
        "dtype": str(next(model.parameters()).dtype),
        "max_tokens": getattr(backbone, "max_tokens", None),
        "probe_ids": backbone.tokenize([PROBE])[0],
    }
    if getattr(backbone, "kind", None) == "lm_layers":
        sig["lm_layers"] = backbone.lm_layers
    if hasattr(backbone, "lm"):
        sig["lm"] = lm_fingerprint(config)
    return sig


class FeatureDisk(DiskLRU):
    def __init__(self, directory: Path, backbone, max_bytes: int, dtype: torch.dtype = torch.bfloat16):
        self.dtype = dtype
        folder = Path(directory) / backbone.name.replace(":", "_").replace("/", "_")
        meta = {"signature": backbone_signature(backbone), "dtype": str(dtype)}
        super().__init__(folder, meta, max_bytes, what="feature cache")

    def get(self, key: str) -> SegmentFeatures | None:
        tensors = super().get(key)
        return None if tensors is None else SegmentFeatures.from_tensors(tensors)

    def put(self, key: str, feats: SegmentFeatures) -> None:
        """Store one segment's unpadded features (1, ..., n, ...), in `dtype` (masks and ids as they are)."""
        super().put(key, feats.to(device="cpu", dtype=self.dtype).to_tensors())
