"""The faiss index and its directory: `IVF{nlist},Flat` inner product by default, any factory string.

Ids are the segment store's int64 segment ids (IVF indexes keep them natively; other indexes, and
re-ranked ones such as `IVF{nlist},SQ8,Refine(Flat)` whose refine stage looks vectors up by position,
are wrapped in `IndexIDMap2`), so `remove_ids` and live additions work on the same ids the store uses.
Graph indexes (`HNSW32,Flat`) and re-ranked ones cannot remove vectors: `remove` says so (a UserError).

Search-time parameters, set on the index before each search (under the lock):
- `nprobe` (`index.nprobe`, 0 = `auto_nprobe`): IVF lists visited;
- `ef_search` (`index.hnsw_ef_search`, 0 = `auto_ef_search(k)`): the HNSW candidate list, of an `HNSW…`
  index or of the HNSW coarse quantizer of `IVF{nlist}_HNSW32,…` (the lists whose centroids it finds);
- `k_factor` (`index.refine_k_factor`, 0 = AUTO_K_FACTOR): a `…,Refine(Flat)` / `…,RFlat` index
  re-ranks k·k_factor candidates of its compressed stage with the exact vectors.
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
# index.hnsw_ef_search=0: an HNSW search keeps max(AUTO_EF_SEARCH, AUTO_EF_PER_K * k) candidates
# (faiss's own default is 16, below what k = 10 needs).
AUTO_EF_SEARCH = 64
AUTO_EF_PER_K = 2
# index.refine_k_factor=0: a re-ranked index re-scores k * AUTO_K_FACTOR candidates exactly, more when its
# compressed stage ranks coarsely. At 1M mixture vectors (README "ANN index types") an SQ8 stage gave back the
# IVFFlat's recall at k_factor 2, an SQ4 one needed 8, a 4-bit fast-scan PQ with one code per dimension 32.
AUTO_K_FACTOR = 4.0
AUTO_K_FACTOR_SQ4 = 8.0
AUTO_K_FACTOR_FAST_SCAN = 32.0
# index.factory=auto: IVFFlat (exact vectors, removable live) below this many vectors, 4-bit fast-scan PQ codes
# (one per dimension) re-ranked with the exact vectors from it on. Measured at 1M (bench/RESULTS.md): recall@10
# 0.975 at 21.9x exact search against IVFFlat's 4.4x at the same nprobe; not measured between 200k and 1M.
AUTO_FACTORY = "auto"
AUTO_COMPRESSED_FROM = 1_000_000


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


def auto_ef_search(k: int) -> int:
    """The HNSW candidate list for `index.hnsw_ef_search=0` at top-k: max(64, 2k)."""
    return max(AUTO_EF_SEARCH, AUTO_EF_PER_K * int(k))


def resolve_factory(template: str, n: int, dim: int) -> str:
    """`index.factory` for a corpus of n vectors of `dim`, `{dim}` filled in: the template itself, or for `auto`
    `IVF{nlist},Flat` below AUTO_COMPRESSED_FROM vectors and `IVF{nlist},PQ{dim}x4fs,RFlat` (fast-scan codes,
    exact re-ranking; it cannot remove vectors live) from there on."""
    if template == AUTO_FACTORY:
        big = n >= AUTO_COMPRESSED_FROM and dim % 2 == 0  # 4-bit fast-scan PQ pairs its sub-quantizers
        template = "IVF{nlist},PQ{dim}x4fs,RFlat" if big else "IVF{nlist},Flat"
    return template.replace("{dim}", str(dim))


def expand_factory(template: str, nlist: int) -> str:
    """`IVF{nlist},Flat` → `IVF181,Flat`; strings without `{nlist}` pass through."""
    return template.replace("{nlist}", str(nlist))


def concrete_factory(template: str, *, n: int, dim: int, nlist: int) -> str:
    """The faiss factory string `index.factory` means for n vectors of `dim` in `nlist` lists (`auto` resolved,
    `{dim}` and `{nlist}` filled in)."""
    return expand_factory(resolve_factory(template, n, dim), nlist)


def gpu_count() -> int:
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


class FaissIndex:
    """A faiss index over (n, dim) float32 vectors with int64 ids; thread-safe search and mutation."""

    backend = "faiss"

    def __init__(
        self,
        index: faiss.Index,
        *,
        metric: str = "inner_product",
        factory: str = "",
        use_gpu: str = "auto",
        ef_search: int = 0,
        k_factor: float = 0.0,
    ):
        self.cpu_index = index
        self.metric = metric
        self.factory = factory
        # index.hnsw_ef_search / index.refine_k_factor, used when a search does not pass its own (0 = automatic)
        self.ef_search = _check_ef_search(ef_search)
        self.k_factor = _check_k_factor(k_factor)
        self._lock = threading.RLock()
        self._gpu_index = None
        self._gpu_res = None
        self._want_gpu = _want_gpu(use_gpu)
        self._refresh_gpu()

    # ------------------------------------------------------------------ construction

    @classmethod
    def create(
        cls,
        factory: str,
        dim: int,
        metric: str = "inner_product",
        use_gpu: str = "auto",
        *,
        ef_search: int = 0,
        k_factor: float = 0.0,
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
        if ivf is None or isinstance(index, faiss.IndexRefine):
            # Flat, HNSW, PQ... have no ids of their own, and a refine stage finds its exact vectors by
            # position: map them to the store's segment ids.
            index = faiss.IndexIDMap2(index)
        return cls(
            index, metric=metric, factory=factory, use_gpu=use_gpu, ef_search=ef_search, k_factor=k_factor
        )

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

    @property
    def has_hnsw(self) -> bool:
        """True for a graph index (`HNSW32,…`) or an IVF with an HNSW coarse quantizer (`IVF…_HNSW32,…`)."""
        return _hnsw_of(self.cpu_index) is not None

    @property
    def has_refine(self) -> bool:
        """True for an index that re-ranks its candidates exactly (`…,Refine(Flat)`, `…,RFlat`)."""
        return _refine_of(self.cpu_index) is not None

    def resolve_ef_search(self, ef_search: int, k: int) -> int:
        """The HNSW candidate list for `index.hnsw_ef_search` (0 = `auto_ef_search(k)`, never below k);
        0 for an index without a graph."""
        if not self.has_hnsw:
            return 0
        ef_search = _check_ef_search(ef_search)
        return max(int(k), auto_ef_search(k) if ef_search == 0 else ef_search)

    def resolve_k_factor(self, k_factor: float) -> float:
        """Candidates re-ranked per result for `index.refine_k_factor` (0 = `auto_k_factor`); 0 without refine."""
        if not self.has_refine:
            return 0.0
        k_factor = _check_k_factor(k_factor)
        return self.auto_k_factor if k_factor == 0 else max(1.0, float(k_factor))

    @property
    def auto_k_factor(self) -> float:
        """The re-ranking depth `index.refine_k_factor=0` means for this index's compressed stage."""
        refine = _refine_of(self.cpu_index)
        base = faiss.downcast_index(refine.base_index) if refine is not None else None
        if isinstance(base, faiss.IndexIVFPQFastScan):
            return AUTO_K_FACTOR_FAST_SCAN
        if isinstance(base, faiss.IndexIVFScalarQuantizer) and base.sq.qtype == faiss.ScalarQuantizer.QT_4bit:
            return AUTO_K_FACTOR_SQ4
        return AUTO_K_FACTOR

    def search_settings(self, k: int, nprobe: int = 0) -> dict:
        """What a top-k search with `index.nprobe=nprobe` and this index's ef_search/k_factor uses (for
        manifests and reports): only the parameters the index has."""
        out = {}
        if self.nlist:
            out["nprobe"] = self.resolve_nprobe(nprobe)
        if self.has_hnsw:
            out["ef_search"] = self.resolve_ef_search(self.ef_search, k)
        if self.has_refine:
            out["k_factor"] = self.resolve_k_factor(self.k_factor)
        return out

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
        """Remove vectors by id; returns how many were removed (a UserError for an index that cannot)."""
        ids = np.ascontiguousarray(np.asarray(ids, dtype=np.int64).reshape(-1))
        if len(ids) == 0:
            return 0
        with self._lock:
            try:
                removed = int(self.cpu_index.remove_ids(faiss.IDSelectorBatch(ids)))
            except RuntimeError as e:
                why = (
                    "an HNSW graph cannot remove vectors"
                    if _hnsw_of(self.cpu_index, quantizer=False) is not None
                    else "a re-ranked (Refine) index cannot remove vectors"
                    if self.has_refine
                    else "this index type cannot remove vectors"
                )
                raise UserError(
                    f"the index `{self.factory}` cannot remove or replace vectors ({why}); rebuild it without "
                    "them (`python -m retriever.index --config C`), or use an index.factory that can, such as "
                    "`IVF{nlist},Flat`, `IVF{nlist}_HNSW32,Flat`, `IVF{nlist},SQ8` or `Flat`"
                ) from e
            self._refresh_gpu()
        return removed

    # ------------------------------------------------------------------ search

    def search(
        self,
        queries: np.ndarray,
        k: int,
        nprobe: int | None = None,
        *,
        ef_search: int | None = None,
        k_factor: float | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k for (n, dim) queries → (scores (n, k) float32, ids (n, k) int64); id -1 where missing.

        `nprobe` None keeps the index's current lists (0 = automatic); `ef_search` / `k_factor` None use
        this index's configured ones (`self.ef_search`, `self.k_factor`; 0 = automatic)."""
        queries = _as_f32(queries, self.dim)
        if k < 1:
            raise ValueError("k must be >= 1")
        with self._lock:
            index = self._gpu_index if self._gpu_index is not None else self.cpu_index
            if nprobe is not None:
                self._set_nprobe(index, self.resolve_nprobe(nprobe))
            self._set_graph_params(
                index,
                self.resolve_ef_search(self.ef_search if ef_search is None else ef_search, k),
                self.resolve_k_factor(self.k_factor if k_factor is None else k_factor),
            )
            scores, ids = index.search(queries, int(k))
        return scores, ids

    def _set_graph_params(self, index, ef_search: int, k_factor: float) -> None:
        if index is not self.cpu_index:  # a GPU copy: faiss GPU has no HNSW or refine stage to set
            return
        if ef_search > 0:
            for hnsw in _all_hnsw(index):
                hnsw.efSearch = int(ef_search)
        refine = _refine_of(index)
        if refine is not None and k_factor > 0:
            refine.k_factor = float(k_factor)

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
            full = {
                **manifest_fields(self, manifest),
                "index_file": INDEX_FILE,
                "sha256": sha256_file(tmp / INDEX_FILE),
            }
            (tmp / MANIFEST_FILE).write_text(
                json.dumps(full, indent=2, sort_keys=True) + "\n", encoding="utf-8"
            )
        return full

    @classmethod
    def load(
        cls,
        index_dir: Path,
        manifest: dict,
        *,
        use_gpu: str = "auto",
        verify_sha256: bool = True,
        ef_search: int = 0,
        k_factor: float = 0.0,
    ) -> FaissIndex:
        """The index file of a checked manifest (`retriever.vector_store.load_index_dir`), sha256 verified."""
        path = Path(index_dir) / manifest.get("index_file", INDEX_FILE)
        if not path.is_file():
            raise UserError(f"{index_dir}: {path.name} is missing; {REBUILD}")
        if verify_sha256 and sha256_file(path) != manifest.get("sha256"):
            raise UserError(
                f"{path}: sha256 does not match its manifest (corrupt or replaced file); {REBUILD}"
            )
        index = cls.read(
            path,
            metric=manifest.get("metric", "inner_product"),
            factory=manifest.get("factory", ""),
            use_gpu=use_gpu,
        )
        index.ef_search, index.k_factor = _check_ef_search(ef_search), _check_k_factor(k_factor)
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


def _unwrap(index):
    """The index inside IDMap / PreTransform wrappers, downcast to its real type."""
    index = faiss.downcast_index(index)
    while isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2, faiss.IndexPreTransform)):
        index = faiss.downcast_index(index.index)
    return index


def _refine_of(index):
    """The IndexRefine (or IndexRefineFlat) of `index`, or None."""
    inner = _unwrap(index)
    return inner if isinstance(inner, faiss.IndexRefine) else None


def _hnsw_of(index, *, quantizer: bool = True):
    """The HNSW graph of a graph index, else (when `quantizer`) of an IVF's coarse quantizer; or None."""
    graphs = _all_hnsw(index, quantizer=quantizer)
    return graphs[0] if graphs else None


def _all_hnsw(index, *, quantizer: bool = True) -> list:
    inner = _unwrap(index)
    refine = _refine_of(inner)
    if refine is not None:
        inner = _unwrap(refine.base_index)
    if isinstance(inner, faiss.IndexHNSW):
        return [inner.hnsw]
    ivf = faiss.try_extract_index_ivf(inner)
    if quantizer and ivf is not None:
        q = faiss.downcast_index(ivf.quantizer)
        if isinstance(q, faiss.IndexHNSW):
            return [q.hnsw]
    return []


def _check_ef_search(ef_search) -> int:
    if int(ef_search) < 0:
        raise UserError(f"index.hnsw_ef_search must be >= 0 (0 = automatic), got {ef_search}")
    return int(ef_search)


def _check_k_factor(k_factor) -> float:
    if float(k_factor) < 0 or (0 < float(k_factor) < 1):
        raise UserError(f"index.refine_k_factor must be 0 (automatic) or >= 1, got {k_factor}")
    return float(k_factor)


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
