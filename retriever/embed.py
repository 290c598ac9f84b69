"""Corpus embedding: the segment store → a sharded, memory-mapped (N, dim) float16/float32 matrix.

Layout of `run_dir/embeddings/`:

- `shard-00000.npy`, `shard-00001.npy`, ...: rows [i·S, min(N, (i+1)·S)) of the matrix, S = shard_size,
  in segment-store order; `ids-00000.npy`, ...: the int64 segment ids of those rows.
- `manifest.json`: encoder (name, fingerprint, dim, similarity, max_seq_length, prefixes), store
  fingerprint, n, dim, dtype, shard_size, the finished shards (each with the `sha256`/`ids_sha256` of its
  two files, recorded when they were written), `complete`, and the throughput.

A reader checks a shard's hashes the first time it reads the shard in a process (`common.integrity`);
a damaged shard is refused, and the next `python -m retriever.index` embeds it again.

A shard is the unit of work and of resume: it is filled through a temporary memory-mapped file, flushed
and renamed, and only then listed in the manifest (itself replaced atomically). After a crash the next
run keeps every listed shard whose settings match and restarts at the first missing one. Text is read
from the store one encoding batch at a time, so memory holds one batch of text and one shard of vectors.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from common.atomic import atomic_write_json, clean_leftovers
from common.errors import UserError
from common.faults import fault_point
from common.integrity import file_ok, sha256_file, verify_once
from data_prep.store import SegmentStore, segment_input_text

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
FORMAT = 1
REBUILD = "rerun `python -m retriever.index --config C` to embed it again"
_DTYPES = {"float16": np.float16, "float32": np.float32}
# The planned batches of segment ids (each (m,) int64) -> their vectors, float32 (m, dim), one array per batch in order.
BatchEncoder = Callable[[list[np.ndarray]], Iterator[np.ndarray]]


def _shard_names(i: int) -> tuple[str, str]:
    return f"shard-{i:05d}.npy", f"ids-{i:05d}.npy"


def _settings(encoder, store: SegmentStore, shard_size: int, dtype: str) -> dict:
    """What the vectors depend on; a finished shard is reused only if all of it matches."""
    info = encoder.info
    return {
        "format": FORMAT,
        "encoder": info.to_dict(),
        "store_fingerprint": store.fingerprint,
        "n": len(store),
        "dim": int(info.dim),
        "dtype": dtype,
        "shard_size": int(shard_size),
    }


def _same_settings(old: dict, new: dict) -> bool:
    keys = ("format", "store_fingerprint", "n", "dim", "dtype", "shard_size")
    enc_keys = ("fingerprint", "similarity", "max_seq_length", "passage_prefix")
    return all(old.get(k) == new[k] for k in keys) and all(
        old.get("encoder", {}).get(k) == new["encoder"][k] for k in enc_keys
    )


def _shard_ok(out_dir: Path, shard: dict, dim: int, dtype: str) -> bool:
    """Whether a finished shard can be kept: both files match their hashes (a shard without hashes, from
    before they were recorded, is made again) and have the expected shapes."""
    vec_name, ids_name = shard["file"], shard["ids_file"]
    if not (
        file_ok(out_dir / vec_name, shard.get("sha256"))
        and file_ok(out_dir / ids_name, shard.get("ids_sha256"))
    ):
        log.info("embedding shard %s is damaged or has no hash: embedding it again", out_dir / vec_name)
        return False
    try:
        vecs = np.load(out_dir / vec_name, mmap_mode="r", allow_pickle=False)
        ids = np.load(out_dir / ids_name, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return False
    return (
        vecs.shape == (shard["count"], dim)
        and vecs.dtype == _DTYPES[dtype]
        and ids.shape == (shard["count"],)
    )


def embed_store(
    store: SegmentStore,
    encoder,
    out_dir: Path | str,
    *,
    shard_size: int = 4096,
    dtype: str = "float16",
    batch_size: int = 64,
    progress: bool = True,
    encode_batches: BatchEncoder | None = None,
) -> dict:
    """Embed every segment of `store` into `out_dir` (resuming a previous run); returns the manifest.

    `encoder` needs `.info` (an EncoderInfo) and `.encode_passages(list[str]) -> float32 (n, dim)`.
    `encode_batches` computes the vectors of the planned batches of segment ids elsewhere (Ray:
    `retriever.embed_ray`), one (len(ids), dim) array per batch in order; by default `encode_segments` runs
    here with `encoder`. Either way the batches, and so the shards written, are the same.
    """
    if dtype not in _DTYPES:
        raise UserError(f"index.embed_dtype must be float16 or float32, got {dtype!r}")
    if shard_size < 1 or batch_size < 1:
        raise UserError("index.shard_size and retriever.batch_size must be >= 1")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = _settings(encoder, store, shard_size, dtype)
    n, dim = settings["n"], settings["dim"]
    n_shards = (n + shard_size - 1) // shard_size

    done: dict[int, dict] = {}
    old = _read_manifest(out_dir)
    if old is not None and _same_settings(old, settings):
        for shard in old.get("shards", []):
            if _shard_ok(out_dir, shard, dim, dtype):
                done[shard["index"]] = shard
        if done:
            log.info("resuming embeddings in %s: %d of %d shards already done", out_dir, len(done), n_shards)
    elif old is not None:
        log.info(
            "embeddings in %s were made with other settings (encoder/store/dtype/shard size); starting over",
            out_dir,
        )
    _clean(out_dir, keep={name for s in done.values() for name in (s["file"], s["ids_file"])})
    clean_leftovers(out_dir / MANIFEST_FILE)  # the temp file of a manifest write that was killed
    # The manifest now lists exactly what is on disk (a stale `complete` one never survives a restart).
    _write_manifest(out_dir, settings, done, complete=len(done) == n_shards, rate=None)

    all_ids = store.segment_ids()
    remaining = sum(_count(n, shard_size, i) for i in range(n_shards) if i not in done)
    t0 = time.perf_counter()
    encoded = 0
    bar = tqdm(
        total=n,
        initial=n - remaining,
        desc="embedding segments",
        unit="seg",
        disable=not progress,
        dynamic_ncols=True,
    )
    todo = [i for i in range(n_shards) if i not in done]
    plan = [
        all_ids[i * shard_size + off : i * shard_size + min(off + batch_size, _count(n, shard_size, i))]
        for i in todo
        for off in range(0, _count(n, shard_size, i), batch_size)
    ]
    if encode_batches is None:
        vectors = (encode_segments(store, encoder, ids) for ids in plan)
    else:
        vectors = encode_batches(plan)
    try:
        for i in todo:
            start = i * shard_size
            count = _count(n, shard_size, i)
            vec_name, ids_name = _shard_names(i)
            tmp = out_dir / f".{vec_name}.tmp"
            matrix = np.lib.format.open_memmap(tmp, mode="w+", dtype=_DTYPES[dtype], shape=(count, dim))
            for off in range(0, count, batch_size):
                rows = min(batch_size, count - off)
                vecs = next(vectors)
                if vecs.shape != (rows, dim):
                    raise RuntimeError(f"encoder returned shape {vecs.shape} for {rows} segments of dim {dim}")
                matrix[off : off + rows] = vecs
                encoded += rows
                bar.update(rows)
                bar.set_postfix(seg_per_s=f"{encoded / max(time.perf_counter() - t0, 1e-9):.1f}")
            matrix.flush()
            del matrix
            os.replace(tmp, out_dir / vec_name)
            fault_point("embed.shard_file")
            np.save(out_dir / ids_name, np.ascontiguousarray(all_ids[start : start + count], dtype=np.int64))
            done[i] = {
                "index": i,
                "start": start,
                "count": count,
                "file": vec_name,
                "ids_file": ids_name,
                "sha256": sha256_file(out_dir / vec_name),
                "ids_sha256": sha256_file(out_dir / ids_name),
            }
            _write_manifest(out_dir, settings, done, complete=len(done) == n_shards, rate=None)
            fault_point("embed.shard_listed")
    finally:
        bar.close()
        if hasattr(vectors, "close"):
            vectors.close()  # a Ray run stops its actors (and a Ray it started) here, also on an error
    elapsed = time.perf_counter() - t0
    rate = encoded / elapsed if encoded and elapsed > 0 else None
    manifest = _write_manifest(out_dir, settings, done, complete=True, rate=rate)
    if encoded:
        log.info(
            "embedded %d segments in %.1f s (%.1f segments/s) into %s", encoded, elapsed, rate or 0.0, out_dir
        )
    return manifest


def _count(n: int, shard_size: int, i: int) -> int:
    """Rows of shard `i` of a store of `n` segments."""
    return min(shard_size, n - i * shard_size)


def encode_segments(store: SegmentStore, encoder, ids: np.ndarray) -> np.ndarray:
    """float32 (len(ids), dim): the passage embeddings of segments `ids`, the text as the index reads it."""
    texts = [segment_input_text(s) for s in store.get_many(ids)]
    return encoder.encode_passages(texts)


def _read_manifest(out_dir: Path) -> dict | None:
    path = out_dir / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None


def _write_manifest(
    out_dir: Path, settings: dict, done: dict[int, dict], *, complete: bool, rate: float | None
) -> dict:
    manifest = {
        **settings,
        "shards": [done[i] for i in sorted(done)],
        "complete": complete,
        "segments_per_s": rate,
    }
    atomic_write_json(out_dir / MANIFEST_FILE, manifest)
    return manifest


def _clean(out_dir: Path, keep: set[str]) -> None:
    """Delete temporary files and shards not listed as done (from a crash or other settings)."""
    for p in out_dir.iterdir():
        if p.name == MANIFEST_FILE or p.name in keep:
            continue
        if p.name.startswith((".shard-", "shard-", "ids-")) and p.is_file():
            p.unlink()


# ---------------------------------------------------------------------------------------------- reading


@dataclass
class Embeddings:
    """A finished embedding directory: the shards as one logical (n, dim) matrix, memory-mapped."""

    path: Path
    manifest: dict

    @classmethod
    def open(
        cls, path: Path | str, *, encoder_fingerprint: str | None = None, store_fingerprint: str | None = None
    ) -> Embeddings:
        path = Path(path)
        manifest = _read_manifest(path)
        if manifest is None:
            raise UserError(f"no embeddings at {path}; run `python -m retriever.index --config C`")
        if not manifest.get("complete"):
            raise UserError(
                f"embeddings at {path} are incomplete (an interrupted run); run "
                "`python -m retriever.index --config C` again to resume"
            )
        if encoder_fingerprint is not None and manifest["encoder"]["fingerprint"] != encoder_fingerprint:
            raise UserError(f"embeddings at {path} come from another encoder ({manifest['encoder']['name']})")
        if store_fingerprint is not None and manifest["store_fingerprint"] != store_fingerprint:
            raise UserError(f"embeddings at {path} come from another segment store")
        return cls(path, manifest)

    @property
    def n(self) -> int:
        return int(self.manifest["n"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    def _shard(self, shard: dict) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) of one shard, memory-mapped; its files are hashed the first time a process reads them."""
        verify_once(self.path / shard["file"], shard.get("sha256"), REBUILD)
        verify_once(self.path / shard["ids_file"], shard.get("ids_sha256"), REBUILD)
        vecs = np.load(self.path / shard["file"], mmap_mode="r", allow_pickle=False)
        ids = np.load(self.path / shard["ids_file"], mmap_mode="r", allow_pickle=False)
        return ids, vecs

    def iter_chunks(self, rows: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids (m,) int64, vectors (m, dim) float32) chunks of at most `rows`, in store order."""
        for shard in self.manifest["shards"]:
            ids, vecs = self._shard(shard)
            for off in range(0, len(ids), rows):
                yield (
                    np.array(ids[off : off + rows], dtype=np.int64),
                    np.asarray(vecs[off : off + rows], dtype=np.float32),
                )

    def sample(self, size: int, seed: int = 0) -> np.ndarray:
        """`size` distinct rows chosen uniformly at random, float32 (size, dim) (all rows if size >= n)."""
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(self.n, size=min(size, self.n), replace=False))
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        pos = 0
        for shard in self.manifest["shards"]:
            start, count = shard["start"], shard["count"]
            lo, hi = np.searchsorted(rows, [start, start + count])
            if hi > lo:
                _, vecs = self._shard(shard)
                out[pos : pos + hi - lo] = vecs[rows[lo:hi] - start]
                pos += hi - lo
        return out
