"""A bounded on-disk LRU cache of segment prefixes, for corpora too big to precompute.

    run_dir/prefix_cache/<system>/manifest.json          what made the entries (encoder, dtype, next_position)
    run_dir/prefix_cache/<system>/<aa>/<key>.safetensors  one segment's rows (`knowledge_encoder.prefix_codec`)

Entries are keyed by a hash of the segment's title and text (never by segment id: a live index may reuse an
id for new text). Serving looks a segment up, computes it with the encoder when missing and `put`s it; the
least recently used entries go beyond `max_bytes`, a crash leaves whole entries only, and an entry that does
not load is deleted and recomputed (`knowledge_encoder.disk_lru`). A manifest from another encoder or dtype
empties the cache: it is only a cache.
"""

from __future__ import annotations

from pathlib import Path

from knowledge_encoder import prefix_codec
from knowledge_encoder.disk_lru import DiskLRU
from lm.prefix import Prefix


class PrefixCache(DiskLRU):
    def __init__(self, directory: Path, meta: dict, max_bytes: int):
        super().__init__(directory, meta, max_bytes, what="prefix cache")
        self.dtype = meta["dtype"]
        self.next_position = meta["next_position"]

    def get(self, key: str, device=None) -> Prefix | None:
        rows = super().get(key)
        return None if rows is None else prefix_codec.decode(rows, self.next_position, device)

    def put(self, key: str, prefix: Prefix) -> Prefix:
        """Store one segment's prefix (1, H, P, D per layer), then evict the least recently used beyond max_bytes.
        Returns the prefix as the cache will give it back (at the cache's dtype), on the prefix's device."""
        rows = prefix_codec.encode(prefix, self.dtype)
        super().put(key, rows)
        return prefix_codec.decode(rows, self.next_position, prefix.mask.device)
