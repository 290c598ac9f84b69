"""A bounded on-disk LRU of tensor dicts, one safetensors file per entry (the prefix cache and the feature cache).

    DIR/manifest.json          what made the entries; a different one empties DIR (it is only a cache)
    DIR/<aa>/<key>.safetensors  one entry

Entries are keyed by a hex string (a hash of what they were computed from). `get` touches the file's mtime, so
the least recently used entry is the oldest file, for this process and the next. When the entries exceed
`max_bytes` the least recently used go. Each entry is written to a temporary file and renamed, so a crash
leaves whole entries only (and a leftover temporary file, deleted at the next start). Each entry carries the
sha256 of its tensors in its safetensors metadata; an entry that does not load or whose tensors do not match
it (a flipped byte, an entry from before the hash) is deleted and reported as a miss, for the caller to
recompute: never served.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from common.atomic import atomic_write_json

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
DIGEST = "sha256"  # the metadata key of an entry's tensor hash


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of the names, dtypes, shapes and bytes of `tensors` (what an entry's metadata records)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _read_entry(path: Path) -> dict[str, torch.Tensor]:
    """An entry's tensors; ValueError when they do not match the digest in its metadata."""
    with safe_open(str(path), framework="pt") as f:
        expected = (f.metadata() or {}).get(DIGEST)
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    if expected is None or tensor_digest(tensors) != expected:
        raise ValueError("sha256 of its tensors does not match its metadata" if expected else "no sha256")
    return tensors


class DiskLRU:
    def __init__(self, directory: Path, meta: dict, max_bytes: int, what: str = "cache"):
        self.dir = Path(directory)
        self.meta = meta
        self.max_bytes = max_bytes
        self.what = what
        self.hits = self.misses = self.evictions = 0
        manifest = self.dir / MANIFEST
        if manifest.is_file() and json.loads(manifest.read_text()) != meta:
            log.info("%s %s was made by something else: emptied", what, self.dir)
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        if not manifest.is_file():
            atomic_write_json(manifest, meta)
        for leftover in self.dir.glob("*/.*.tmp"):  # a write interrupted by a crash
            leftover.unlink(missing_ok=True)
        entries = sorted((p.stat().st_mtime_ns, p) for p in self.dir.glob("*/*.safetensors"))
        # path -> size, least recently used first
        self._sizes: OrderedDict[Path, int] = OrderedDict((p, p.stat().st_size) for _, p in entries)
        self._bytes = sum(self._sizes.values())

    def _path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.safetensors"

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._sizes)

    def __contains__(self, key: str) -> bool:
        return self._path(key) in self._sizes

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        path = self._path(key)
        if path not in self._sizes:
            self.misses += 1
            return None
        try:
            tensors = _read_entry(path)
            os.utime(path)  # most recently used, also for the next process
        except (SafetensorError, OSError, ValueError) as err:
            log.warning("%s entry %s does not load (%s): recomputed", self.what, path, err)
            self._drop(path)
            self.misses += 1
            return None
        self._sizes.move_to_end(path)
        self.hits += 1
        return tensors

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        """Store one entry, then evict the least recently used beyond max_bytes."""
        path = self._path(key)
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # processes sharing the cache never collide
        try:
            tensors = {k: v.contiguous() for k, v in tensors.items()}
            save_file(tensors, str(tmp), metadata={DIGEST: tensor_digest(tensors)})
            tmp.replace(path)
        except OSError as err:  # e.g. a disk full, or another process's start-up cleaned the temporary file
            log.warning("%s entry %s not written (%s)", self.what, path, err)
            tmp.unlink(missing_ok=True)
            return
        size = path.stat().st_size
        self._bytes += size - self._sizes.get(path, 0)
        self._sizes[path] = size
        self._sizes.move_to_end(path)
        while self._bytes > self.max_bytes and len(self._sizes) > 1:
            self._drop(next(iter(self._sizes)))
            self.evictions += 1

    def _drop(self, path: Path) -> None:
        self._bytes -= self._sizes.pop(path, 0)
        path.unlink(missing_ok=True)

    def stats(self) -> dict:
        asked = self.hits + self.misses
        return {"entries": len(self), "bytes": self.bytes, "hits": self.hits, "misses": self.misses,
                "evictions": self.evictions, "hit_rate": self.hits / asked if asked else None}
