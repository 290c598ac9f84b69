"""Where a dynamic system's segment prefixes come from when answering (`knowledge_encoder.prefix_store`).

Per segment: the precomputed store (`all`, by segment id), else the on-disk LRU cache (`cache`, by a hash of
the segment's text), else the knowledge encoder over the segment's features, whose result then goes into the
cache. The prefix the LM reads is the same whichever way each segment came: a segment computed on a cache
miss is read as the cache stores it (at `knowledge_encoder.store_dtype`), so a cold and a warm cache answer
alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from knowledge_encoder.prefix_cache import PrefixCache
from knowledge_encoder.prefix_codec import stack_segments
from knowledge_encoder.prefix_store import PrefixStore
from lm.prefix import Prefix
from qa.batching import Batcher, Example, FeatureCache


def prefix_cache_dir(run_dir: Path | str, system: str) -> Path:
    return Path(run_dir) / "prefix_cache" / system


class PrefixSource:
    def __init__(self, store: PrefixStore | None = None, cache: PrefixCache | None = None):
        self.store, self.cache = store, cache
        self.from_store = self.computed = 0

    def segment_prefixes(self, model, segments: Sequence, segment_ids: Sequence[int | None], batcher: Batcher,
                         device) -> Prefix:
        """One prefix per segment, stacked: (N, H, P, D per layer), N = len(segments)."""
        parts: list[Prefix | None] = [None] * len(segments)
        if self.store is not None:
            for j, sid in enumerate(segment_ids):
                if sid is not None:
                    parts[j] = self.store.get_one(int(sid), device)
        self.from_store += sum(p is not None for p in parts)
        keys = [FeatureCache.key(s) for s in segments]
        if self.cache is not None:
            for j, part in enumerate(parts):
                if part is None:
                    parts[j] = self.cache.get(keys[j], device)
        missing = [j for j, p in enumerate(parts) if p is None]
        if missing:
            computed = model.encoder(batcher.cache.get([segments[j] for j in missing], device))
            for row, j in enumerate(missing):
                one = computed.select([row])
                if not model.encoder.slots:  # full length: drop this segment's padding
                    one = _trim(one, int(one.mask.sum()))
                # Read what the cache keeps, not the fresh prefix: an answer must not depend on whether its
                # segment was a hit (a quantised store dtype changes the K,V a little).
                parts[j] = one if self.cache is None else self.cache.put(keys[j], one)
            self.computed += len(missing)
        return stack_segments(parts)

    def prefix(self, model, examples: Sequence[Example], batcher: Batcher, device) -> Prefix:
        """The whole prefix of a batch of questions: [static] + format slots + k segment prefixes each."""
        k = len(examples[0].segments)
        flat = self.segment_prefixes(model, [s for e in examples for s in e.segments],
                                     [i for e in examples for i in e.segment_ids], batcher, device)
        segs = Prefix.group_segments(flat, k)
        parts = [model.encoder.format_prefix(segs.batch_size), segs]
        if model.static is not None:
            parts.insert(0, model.static(segs.batch_size))
        return Prefix.concat(parts)

    def stats(self) -> dict:
        out = {"from_store": self.from_store, "computed": self.computed}
        if self.cache is not None:
            out["cache"] = self.cache.stats()
        return out


def _trim(prefix: Prefix, length: int) -> Prefix:
    return Prefix(keys=[k[:, :, :length] for k in prefix.keys], values=[v[:, :, :length] for v in prefix.values],
                  mask=prefix.mask[:, :length], next_position=prefix.next_position,
                  bias=None if prefix.bias is None else prefix.bias[:, :, :length])
