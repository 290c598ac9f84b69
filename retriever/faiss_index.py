"""The faiss index and its directory: `IVF{nlist},Flat` inner product by default, any factory string.

Ids are the segment store's int64 segment ids (IVF indexes keep them natively; other indexes are
wrapped in `IndexIDMap2`), so `remove_ids` and live additions work on the same ids the store uses.
A CPU index is the master copy (it is what is saved and mutated); when faiss sees a GPU, searches
go to a GPU copy made with `index_cpu_to_gpu`, refreshed after every change.

An index directory (`run_dir/index/`) holds `index.faiss` and `manifest.json`: backend (`faiss`),
encoder name and fingerprint, dim, metric, factory string, nlist, nprobe, ntotal, segment-store
fingerprint and the sha256 of `index.faiss`. It is written atomically (a temp folder renamed over the
old one); `retriever.vector_store.load_index_dir` refuses any mismatch. `FaissIndex` is the `faiss`
implementation of `retriever.vector_store.VectorStore` (`index.backend=faiss`, the default).
"""

from __future__ import annotations

import json
import logging
import math
import threading
from pathlib import Path

import faiss
import numpy as np

from common.atomic import atomic_dir, sha256_file
from common.errors import UserError
from retriever.vector_store import (  # noqa: F401  (load_index_dir, read_manifest: the names callers import)
    MANIFEST_FILE,
    REBUILD,
    load_index_dir,
    manifest_fields,
    read_manifest,
    save_index_dir,
)

log = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
_METRICS = {"inner_product": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
# faiss warns below 39 training points per centroid; k-means is unreliable there.
MIN_POINTS_PER_CENTROID = 39
# index.nprobe=0 visits enough lists to scan about this many vectors per query, and at least
# AUTO_MIN_NPROBE lists. Scanning 20k × 384 floats costs well under a millisecond on one core, so
# below that the IVF saves nothing worth the recall it loses: on 2,528 SQuAD paragraphs (IVF64)
# nprobe 16 cost 0.8–1.3 points of top-5 against every list, at 1M mixture vectors (IVF4000)
# nprobe 16 reached recall@10 0.64 and nprobe 64 0.975 (README).
AUTO_NPROBE_SCAN = 20_000
AUTO_MIN_NPROBE = 16


def default_nlist(n: int) -> int:
    """About 4·√N inverted lists, but never so many that a centroid gets fewer than 39 training points."""
    return max(1, min(round(4 * math.sqrt(max(n, 1))), n // MIN_POINTS_PER_CENTROID))


def auto_nprobe(nlist: int, ntotal: int) -> int:
    """Lists to visit so a query scans about AUTO_NPROBE_SCAN vectors (at least 16, at most nlist):
    every list of a small corpus, a few dozen of a 1M-vector IVF4000."""
    if nlist <= 0:
        return 0
    per_list = max(ntotal, 1) / nlist
    return min(nlist, max(AUTO_MIN_NPROBE, math.ceil(AUTO_NPROBE_SCAN / per_list)))


def expand_factory(template: str, nlist: int) -> str:
    """`IVF{nlist},Flat` → `IVF181,Flat`; strings without `{nlist}` pass through."""
    return template.replace("{nlist}", str(nlist))


def gpu_count() -> int:
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


class FaissIndex:
    """A faiss index over (n, dim) float32 vectors with int64 ids; thread-safe search and mutation."""

    backend = "faiss"

    def __init__(
        self, index: faiss.Index, *, metric: str = "inner_product", factory: str = "", use_gpu: str = "auto"
    ):
        self.cpu_index = index
        self.metric = metric
        self.factory = factory
        self._lock = threading.RLock()
        self._gpu_index = None
        self._gpu_res = None
        self._want_gpu = _want_gpu(use_gpu)
        self._refresh_gpu()

    # ------------------------------------------------------------------ construction

    @classmethod
    def create(
        cls, factory: str, dim: int, metric: str = "inner_product", use_gpu: str = "auto"
    ) -> FaissIndex:
        """An empty index from a faiss factory string (already expanded, e.g. `IVF181,Flat`)."""
        if metric not in _METRICS:
            raise UserError(f"unknown index metric {metric!r}; use one of {', '.join(_METRICS)}")
        try:
            index = faiss.index_factory(int(dim), factory, _METRICS[metric])
        except RuntimeError as e:
            raise UserError(
                f"index.factory `{factory}` is not a valid faiss factory string for dim {dim}: "
                f"{str(e).splitlines()[0]}"
            ) from e
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None and hasattr(ivf, "do_polysemous_training"):
            # Polysemous codes only serve Hamming-filtered search, which we never use; training them is slow.
            faiss.downcast_index(ivf).do_polysemous_training = False
        if ivf is None:
            # Flat, HNSW, PQ... have no ids of their own: map them to the store's segment ids.
            index = faiss.IndexIDMap2(index)
        return cls(index, metric=metric, factory=factory, use_gpu=use_gpu)

    @property
    def dim(self) -> int:
        return int(self.cpu_index.d)

    @property
    def ntotal(self) -> int:
        return int(self.cpu_index.ntotal)

    @property
    def is_trained(self) -> bool:
        return bool(self.cpu_index.is_trained)

    @property
    def nlist(self) -> int:
        ivf = faiss.try_extract_index_ivf(self.cpu_index)
        return int(ivf.nlist) if ivf is not None else 0

    def resolve_nprobe(self, nprobe: int) -> int:
        """The lists a search visits for `index.nprobe` (0 = `auto_nprobe`), capped at nlist; 0 for a
        non-IVF index, which always searches everything it holds."""
        if nprobe < 0:
            raise UserError(f"index.nprobe must be >= 0 (0 = automatic), got {nprobe}")
        nlist = self.nlist
        if not nlist:
            return 0
        return auto_nprobe(nlist, self.ntotal) if nprobe == 0 else min(int(nprobe), nlist)

    def train(self, vectors: np.ndarray) -> None:
        """Train the quantizer on a (n, dim) float32 sample (a no-op for indexes that need no training)."""
        if self.is_trained:
            return
        vectors = _as_f32(vectors, self.dim)
        if self.nlist and len(vectors) < self.nlist:
            raise UserError(
                f"cannot train {self.factory} on {len(vectors)} vectors: at least nlist={self.nlist} "
                "are needed (lower index.nlist or set it to 0 for the automatic value)"
            )
        with self._lock:
            self.cpu_index.train(vectors)
            self._refresh_gpu()

    # ------------------------------------------------------------------ mutation

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Add (n, dim) vectors under int64 `ids` (segment ids; must not already be in the index)."""
        vectors = _as_f32(vectors, self.dim)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if len(ids) != len(vectors):
            raise ValueError(f"{len(vectors)} vectors but {len(ids)} ids")
        if not self.is_trained:
            raise RuntimeError("the index must be trained before vectors are added")
        with self._lock:
            self.cpu_index.add_with_ids(vectors, ids)
            self._refresh_gpu()

    def remove(self, ids) -> int:
        """Remove vectors by id; returns how many were removed."""
        ids = np.ascontiguousarray(np.asarray(ids, dtype=np.int64).reshape(-1))
        if len(ids) == 0:
            return 0
        with self._lock:
            try:
                removed = int(self.cpu_index.remove_ids(faiss.IDSelectorBatch(ids)))
            except RuntimeError as e:
                raise UserError(
                    f"the index type `{self.factory}` does not support removing vectors; use an IVF "
                    "or Flat factory string"
                ) from e
            self._refresh_gpu()
        return removed

    # ------------------------------------------------------------------ search

    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k for (n, dim) queries → (scores (n, k) float32, ids (n, k) int64); id -1 where missing."""
        queries = _as_f32(queries, self.dim)
        if k < 1:
            raise ValueError("k must be >= 1")
        with self._lock:
            index = self._gpu_index if self._gpu_index is not None else self.cpu_index
            if nprobe is not None:
                self._set_nprobe(index, self.resolve_nprobe(nprobe))
            scores, ids = index.search(queries, int(k))
        return scores, ids

    def _set_nprobe(self, index, nprobe: int) -> None:
        if nprobe <= 0:  # not an IVF index: nothing to set
            return
        if self._gpu_index is not None and index is self._gpu_index:
            faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", int(nprobe))
            return
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None:
            ivf.nprobe = int(min(nprobe, ivf.nlist))

    # ------------------------------------------------------------------ GPU

    def _refresh_gpu(self) -> None:
        """Mirror the CPU master copy on GPU 0 (only when wanted and faiss sees a GPU)."""
        if not self._want_gpu or not self.cpu_index.is_trained:
            self._gpu_index = None
            return
        try:
            if self._gpu_res is None:
                self._gpu_res = faiss.StandardGpuResources()
            self._gpu_index = faiss.index_cpu_to_gpu(self._gpu_res, 0, self.cpu_index)
        except (RuntimeError, AttributeError) as e:
            log.warning("faiss GPU copy of %s failed (%s); searching on CPU", self.factory, e)
            self._want_gpu = False
            self._gpu_index = None

    @property
    def on_gpu(self) -> bool:
        return self._gpu_index is not None

    # ------------------------------------------------------------------ files

    def write(self, path: Path) -> None:
        with self._lock:
            faiss.write_index(self.cpu_index, str(path))

    def save(self, index_dir: Path, manifest: dict) -> dict:
        """Write `index.faiss` + `manifest.json` (with ntotal, dim, nlist, factory, metric, sha256) as
        `index_dir`, atomically: a temp folder beside it, renamed over it when complete."""
        with atomic_dir(Path(index_dir)) as tmp:
            self.write(tmp / INDEX_FILE)
            full = {**manifest_fields(self, manifest), "index_file": INDEX_FILE, "sha256": sha256_file(tmp / INDEX_FILE)}
            (tmp / MANIFEST_FILE).write_text(json.dumps(full, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return full

    @classmethod
    def load(cls, index_dir: Path, manifest: dict, *, use_gpu: str = "auto", verify_sha256: bool = True) -> FaissIndex:
        """The index file of a checked manifest (`retriever.vector_store.load_index_dir`), sha256 verified."""
        path = Path(index_dir) / manifest.get("index_file", INDEX_FILE)
        if not path.is_file():
            raise UserError(f"{index_dir}: {path.name} is missing; {REBUILD}")
        if verify_sha256 and sha256_file(path) != manifest.get("sha256"):
            raise UserError(f"{path}: sha256 does not match its manifest (corrupt or replaced file); {REBUILD}")
        index = cls.read(
            path, metric=manifest.get("metric", "inner_product"), factory=manifest.get("factory", ""), use_gpu=use_gpu
        )
        if "nprobe" in manifest:
            index._set_nprobe(index.cpu_index, index.resolve_nprobe(manifest["nprobe"]))
        return index

    def discard(self) -> None:
        """Nothing to drop: an unsaved faiss index lives in memory only."""

    @classmethod
    def read(cls, path: Path, *, metric: str, factory: str, use_gpu: str = "auto") -> FaissIndex:
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as e:
            raise UserError(
                f"{path}: not a readable faiss index ({str(e).splitlines()[0]}); rebuild it with "
                "`python -m retriever.index --config C`"
            ) from e
        return cls(index, metric=metric, factory=factory, use_gpu=use_gpu)


def _want_gpu(use_gpu: str) -> bool:
    if use_gpu == "false":
        return False
    n = gpu_count()
    if use_gpu == "true" and n == 0:
        raise UserError(
            "index.use_gpu=true but faiss sees no GPU (faiss-cpu is installed or CUDA is missing); "
            "use index.use_gpu=auto"
        )
    return n > 0


def _as_f32(x: np.ndarray, dim: int) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"expected vectors of shape (n, {dim}), got {x.shape}")
    return x
