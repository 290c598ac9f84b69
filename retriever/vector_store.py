"""The vector-store interface the retriever uses, and the index directory every backend shares.

`index.backend` picks the implementation: `faiss` (retriever/faiss_index.py: the index lives in
`run_dir/index/index.faiss`, embedded, the default) or `milvus` (retriever/milvus_store.py: a Milvus
collection through pymilvus; milvus-lite in `run_dir/index/milvus.db` unless `index.milvus_uri` names a
server). Both keep the store's int64 segment ids and rank by inner product.

`run_dir/index/manifest.json` is written by both and names the backend that built the index (a manifest
without `backend` is from before backends: faiss). `load_index_dir` refuses an index built by another
backend than the configured one, another encoder or dim, or another segment store, each with a UserError
that says how to fix it; nothing is rewritten by a refusal.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from common.errors import UserError
from common.integrity import read_json_object

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
BACKENDS = ("faiss", "milvus")
REBUILD = "rebuild it with `python -m retriever.index --config C`"


@runtime_checkable
class VectorStore(Protocol):
    """What `Retriever`, `retriever.index` and the benchmarks need of a vector index.

    Vectors are float32 (n, dim) rows under int64 segment ids; scores are inner products (higher is better).
    """

    backend: str  # "faiss" or "milvus", recorded in the manifest
    metric: str  # "inner_product"
    factory: str  # what was built, e.g. `IVF64,Flat` or `milvus:FLAT`

    @property
    def dim(self) -> int: ...

    @property
    def ntotal(self) -> int:
        """Vectors searchable now (live additions included, removals excluded)."""
        ...

    @property
    def is_trained(self) -> bool:
        """False until `train` when the index needs training before `add` (a faiss IVF)."""
        ...

    @property
    def nlist(self) -> int:
        """IVF lists (0 for an index without lists: Flat, HNSW)."""
        ...

    def resolve_nprobe(self, nprobe: int) -> int:
        """The lists a search visits for `index.nprobe` (0 = automatic); 0 for an index without lists."""
        ...

    def train(self, vectors: np.ndarray) -> None:
        """Train on a (n, dim) sample before `add` (a no-op where the backend needs no training)."""
        ...

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Add (n, dim) vectors under (n,) int64 ids not in the store yet."""
        ...

    def remove(self, ids) -> int:
        """Remove vectors by id; returns how many were in the store."""
        ...

    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of (n, dim) queries → (scores (n, k) float32, ids (n, k) int64), best first; id -1 where
        the store holds fewer than k."""
        ...

    def save(self, index_dir: Path, manifest: dict) -> dict:
        """Persist the store as `index_dir` (manifest.json + the backend's data) atomically where the
        backend allows; returns the full manifest written."""
        ...

    def discard(self) -> None:
        """Drop what an unfinished build wrote (a build that failed before `save`)."""
        ...


@dataclass(frozen=True)
class MilvusOptions:
    """The `index.milvus_*` keys (see configs/schema.py)."""

    uri: str | None = None  # None = <index_dir>/milvus.db (milvus-lite)
    collection: str = "prefixrag"
    index_type: str = "FLAT"
    hnsw_m: int = 16
    hnsw_ef_construction: int = 200
    hnsw_ef: int = 128
    timeout: float = 60.0

    @classmethod
    def from_config(cls, index_cfg) -> MilvusOptions:
        return cls(
            uri=index_cfg.milvus_uri,
            collection=index_cfg.milvus_collection,
            index_type=index_cfg.milvus_index_type,
            hnsw_m=index_cfg.milvus_hnsw_m,
            hnsw_ef_construction=index_cfg.milvus_hnsw_ef_construction,
            hnsw_ef=index_cfg.milvus_hnsw_ef,
            timeout=index_cfg.milvus_timeout,
        )


@dataclass(frozen=True)
class StoreOptions:
    """How to create or open a store: `index.backend`, `index.use_gpu`, `index.verify_sha256`, `index.milvus_*`."""

    backend: str = "faiss"
    use_gpu: str = "auto"
    verify_sha256: bool = True
    milvus: MilvusOptions = MilvusOptions()
    hnsw_ef_search: int = 0
    refine_k_factor: float = 0.0

    @classmethod
    def from_config(cls, cfg) -> StoreOptions:
        return cls(
            backend=cfg.index.backend,
            use_gpu=cfg.index.use_gpu,
            verify_sha256=cfg.index.verify_sha256,
            milvus=MilvusOptions.from_config(cfg.index),
            hnsw_ef_search=cfg.index.hnsw_ef_search,
            refine_k_factor=cfg.index.refine_k_factor,
        )


def create_store(options: StoreOptions, dim: int, *, factory: str, nlist: int, index_dir: Path) -> VectorStore:
    """An empty store to build into `index_dir` (faiss: `factory`, already expanded; milvus: the
    `index.milvus_*` index type, IVF_FLAT with `nlist` lists)."""
    if options.backend == "faiss":
        from retriever.faiss_index import FaissIndex

        return FaissIndex.create(
            factory,
            dim,
            "inner_product",
            use_gpu=options.use_gpu,
            ef_search=options.hnsw_ef_search,
            k_factor=options.refine_k_factor,
        )
    if options.backend == "milvus":
        from retriever.milvus_store import MilvusStore

        return MilvusStore.create(dim, options.milvus, index_dir=Path(index_dir), nlist=nlist)
    raise UserError(f"unknown index.backend {options.backend!r}; use one of {', '.join(BACKENDS)}")


def save_index_dir(index_dir: Path, index: VectorStore, manifest: dict) -> dict:
    """Write `index` + `manifest.json` (with backend, ntotal, dim, nlist, factory, metric, sha256) as `index_dir`."""
    return index.save(Path(index_dir), manifest)


def manifest_fields(index: VectorStore, manifest: dict) -> dict:
    """`manifest` plus what every backend records about the store itself."""
    return {
        **manifest,
        "format": MANIFEST_FORMAT,
        "backend": index.backend,
        "factory": index.factory,
        "metric": index.metric,
        "dim": index.dim,
        "nlist": index.nlist,
        "ntotal": index.ntotal,
    }


def read_manifest(index_dir: Path) -> dict:
    path = Path(index_dir) / MANIFEST_FILE
    if not path.is_file():
        raise UserError(
            f"no index at {index_dir} (missing {MANIFEST_FILE}); build it with "
            "`python -m retriever.index --config C`"
        )
    manifest = read_json_object(path, "manifest", "rebuild with `python -m retriever.index --config C`")
    if manifest.get("format") != MANIFEST_FORMAT:
        raise UserError(
            f"{path}: unknown index manifest format; rebuild with `python -m retriever.index --config C`"
        )
    return manifest


def manifest_backend(manifest: dict) -> str:
    """The backend that built an index (manifests from before backends were faiss)."""
    return manifest.get("backend", "faiss")


def load_index_dir(
    index_dir: Path,
    *,
    encoder_fingerprint: str | None = None,
    encoder_name: str | None = None,
    dim: int | None = None,
    store_fingerprint: str | None = None,
    use_gpu: str = "auto",
    verify_sha256: bool = True,
    backend: str | None = None,
    milvus: MilvusOptions | None = None,
    hnsw_ef_search: int = 0,
    refine_k_factor: float = 0.0,
) -> tuple[VectorStore, dict]:
    """Open an index directory, refusing a mismatch with the backend (None = whichever built it), the
    encoder, the dim or the segment store."""
    index_dir = Path(index_dir)
    manifest = read_manifest(index_dir)
    built_by = manifest_backend(manifest)
    if backend is not None and built_by != backend:
        raise UserError(
            f"{index_dir} was built with index.backend={built_by}, but the config says index.backend={backend}: "
            f"set index.backend={built_by}, or rebuild it with `python -m retriever.index --config C "
            f"index.backend={backend}` (which replaces the {built_by} index)"
        )
    enc = manifest.get("encoder", {})
    if encoder_fingerprint is not None and enc.get("fingerprint") != encoder_fingerprint:
        raise UserError(
            f"{index_dir} was built with encoder `{enc.get('name')}` (fingerprint {enc.get('fingerprint')}), "
            "but "
            f"retriever.model=`{encoder_name}` has fingerprint {encoder_fingerprint}: set "
            f"retriever.model={enc.get('name')} (e.g. the fine-tuned run_dir/retriever) or {REBUILD}"
        )
    if dim is not None and manifest.get("dim") != dim:
        raise UserError(
            f"{index_dir} holds {manifest.get('dim')}-d vectors but the encoder makes {dim}-d ones; {REBUILD}"
        )
    if store_fingerprint is not None and manifest.get("store_fingerprint") != store_fingerprint:
        raise UserError(
            f"{index_dir} was built over segment store {manifest.get('store_fingerprint')}, "
            "but the store in this "
            f"run_dir is {store_fingerprint} (the corpus or segmentation changed); {REBUILD}"
        )
    if built_by == "faiss":
        from retriever.faiss_index import FaissIndex

        index: VectorStore = FaissIndex.load(
            index_dir,
            manifest,
            use_gpu=use_gpu,
            verify_sha256=verify_sha256,
            ef_search=hnsw_ef_search,
            k_factor=refine_k_factor,
        )
    elif built_by == "milvus":
        from retriever.milvus_store import MilvusStore

        index = MilvusStore.load(index_dir, manifest, milvus or MilvusOptions())
    else:
        raise UserError(f"{index_dir}: built by an unknown backend {built_by!r}; {REBUILD}")
    if index.ntotal != manifest.get("ntotal") or index.dim != manifest.get("dim"):
        raise UserError(
            f"{index_dir}: the {built_by} index holds {index.ntotal} × {index.dim} vectors, the manifest says "
            f"{manifest.get('ntotal')} × {manifest.get('dim')}; {REBUILD}"
        )
    return index, manifest


def store_checks(options: StoreOptions) -> dict:
    """The keyword arguments of `load_index_dir` that come from the config (backend and how to open it)."""
    return {
        "use_gpu": options.use_gpu,
        "verify_sha256": options.verify_sha256,
        "backend": options.backend,
        "milvus": options.milvus,
        "hnsw_ef_search": options.hnsw_ef_search,
        "refine_k_factor": options.refine_k_factor,
    }
