"""From questions + retrieved segments to a system's tensors (`QABatch`), with a cache of frozen features.

Prompts are left-padded so that answers (during training) and the generation point sit at the end of
every row; `lm.forward.prompt_positions` keeps RoPE positions independent of the padding.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from knowledge_encoder.feature_disk import FeatureDisk
from knowledge_encoder.features import SegmentFeatures
from lm.prompting import PromptTemplate, TextSegment
from qa.model import IGNORE, QABatch
from qa.systems import SystemName


@dataclass
class Example:
    """A question with the k segments a system reads (retrieved, or forced/ablated) and gold answers."""

    question: str
    segments: list[TextSegment] = field(default_factory=list)
    segment_ids: list[int | None] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    id: str = ""


def _feature_bytes(f: SegmentFeatures) -> int:
    tensors = (f.keys or []) + (f.values or []) + (f.scores or []) + ([f.hidden] if f.hidden is not None else [])
    return sum(t.numel() * t.element_size() for t in tensors)


class FeatureCache:
    """Frozen backbone features per segment, computed on demand and kept (LRU) up to `max_bytes`.

    Keys are a hash of the segment's title and text (never the id alone: a live index may give a reset id to
    new text). Stored unpadded on the CPU in `dtype` (bf16 halves the memory of K,V features). With a `disk`
    tier (`FeatureDisk`, run_dir/feature_cache) a RAM miss reads the disk before computing, and what is computed
    goes to both: the next process over the same corpus (--resume, another system, eval) computes nothing.
    """

    def __init__(self, backbone, max_bytes: int = 4 << 30, dtype: torch.dtype = torch.bfloat16, batch_size: int = 16,
                 disk: FeatureDisk | None = None):
        self.backbone = backbone
        self.disk = disk
        self.max_bytes = max_bytes
        self.dtype = dtype
        self.batch_size = batch_size
        self._items: OrderedDict[object, SegmentFeatures] = OrderedDict()
        self._bytes = 0
        self.hits = self.misses = 0

    @classmethod
    def from_config(cls, backbone, cfg) -> FeatureCache:
        """`train.feature_cache_gb` of RAM, backed by `train.feature_disk_gb` of disk in run_dir/feature_cache."""
        return cls.sized(backbone, cfg.run_dir, cfg.train.feature_cache_gb, cfg.train.feature_disk_gb)

    @classmethod
    def sized(cls, backbone, run_dir: Path | str, ram_gb: float, disk_gb: float) -> FeatureCache:
        """`ram_gb` of RAM, backed by `disk_gb` of disk in run_dir/feature_cache (0 = RAM only)."""
        disk = None
        if disk_gb > 0:
            disk = FeatureDisk(Path(run_dir) / "feature_cache", backbone, int(disk_gb * (1 << 30)))
        return cls(backbone, max_bytes=int(ram_gb * (1 << 30)), disk=disk)

    @staticmethod
    def key(segment: TextSegment) -> str:
        return hashlib.sha1(f"{segment.title}\x00{segment.text}".encode()).hexdigest()

    def get(self, segments: Sequence[TextSegment], device) -> SegmentFeatures:
        """Features of `segments`, right-padded and stacked: (N, ...) on `device`."""
        keys = [self.key(s) for s in segments]
        missing = list(OrderedDict.fromkeys(k for k in keys if k not in self._items))
        self.misses += len(missing)  # RAM misses (the disk tier keeps its own counts)
        self.hits += len(keys) - len(missing)
        if self.disk is not None:
            for k in missing:
                stored = self.disk.get(k)
                if stored is not None:
                    self._put(k, stored.to(device="cpu", dtype=self.dtype))
            missing = [k for k in missing if k not in self._items]
        if missing:
            by_key = dict(zip(keys, segments))
            for start in range(0, len(missing), self.batch_size):
                chunk = missing[start:start + self.batch_size]
                feats = self.backbone.features([by_key[k] for k in chunk]).split()
                for k, f in zip(chunk, feats):
                    f = f.to(device="cpu", dtype=self.dtype)
                    self._put(k, f)
                    if self.disk is not None:
                        self.disk.put(k, f)
        parts = []
        for k in keys:
            self._items.move_to_end(k)
            parts.append(self._items[k])
        dtype = torch.float32
        return SegmentFeatures.pad_stack(parts).to(device=device, dtype=dtype)

    def _put(self, key, feats: SegmentFeatures) -> None:
        size = _feature_bytes(feats)
        self._items[key] = feats
        self._bytes += size
        while self._bytes > self.max_bytes and len(self._items) > 1:
            _, old = self._items.popitem(last=False)
            self._bytes -= _feature_bytes(old)


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and 0/1 mask with every row right-aligned."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


class Batcher:
    """Builds each system's QABatch for the same examples (the same batches for every system)."""

    def __init__(self, template: PromptTemplate, cache: FeatureCache | None, device):
        self.template = template
        self.cache = cache
        self.device = device

    def build(self, examples: Sequence[Example], system: SystemName, with_labels: bool,
              with_features: bool = True) -> QABatch:
        """`with_features=False` skips the frozen backbone (the caller has the prefix from a prefix store)."""
        rows, label_rows = [], []
        for ex in examples:
            prompt = self.template.prompt_ids(ex.question, ex.segments if system.kind.text else ())
            if with_labels:
                answer = self.template.answer_ids(ex.answers[0])
                rows.append(prompt + answer)
                label_rows.append([IGNORE] * len(prompt) + answer)
            else:
                rows.append(prompt)
        pad_id = self.template.tokenizer.pad_token_id or 0
        ids, mask = left_pad(rows, pad_id, self.device)
        labels = None
        if with_labels:
            labels, _ = left_pad(label_rows, IGNORE, self.device)
        features, k = None, 0
        if system.kind.dynamic:
            k = len(examples[0].segments)
            if any(len(ex.segments) != k for ex in examples):
                raise ValueError("every question of a batch needs the same number of segments")
            if with_features:
                features = self.cache.get([s for ex in examples for s in ex.segments], self.device)
        return QABatch(input_ids=ids, attention_mask=mask, labels=labels, features=features, k=k)
