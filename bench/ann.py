"""Section 1's ANN candidates: graph and re-ranked faiss indexes on the IVFFlat run's vectors and queries.

Each factory of `bench.ann_factories` is built through `FaissIndex` (what `index.factory` builds) and
swept over its search parameters:

- `HNSW32,Flat`: `efSearch` over `bench.ann_ef_search_values` (index.hnsw_ef_search);
- `IVF{nlist}_HNSW32,…`: nprobe over `bench.nprobe_values` (the HNSW coarse quantizer's efSearch at
  index.hnsw_ef_search=0, automatic);
- `…,Refine(Flat)` / `…,RFlat`: nprobe × `bench.ann_k_factors` (index.refine_k_factor).

An IVF candidate with the IVFFlat's nlist starts from its coarse centroids (copied, as the compressed
codecs do), so only the HNSW over the centroids and the codec are built; its build time includes the
IVFFlat's k-means, which it would otherwise repeat. Every row gives recall@k against the same exact top-k,
queries/s (one batch, best of the repeats) and the speedup over exact search; every candidate its build
time, its size (`index_bytes`: codes, ids, graph links, centroids, codec tables) and the growth of this
process's resident memory while it was built (measured, the allocator's overhead included).
"""

from __future__ import annotations

import logging
import time

import faiss
import numpy as np

from bench.machine import release_free_memory, rss_bytes
from retriever.faiss_index import FaissIndex, concrete_factory

log = logging.getLogger(__name__)

ADD_BATCH = 65536


def index_bytes(index: faiss.Index) -> int:
    """Memory of a CPU faiss index: flat codes, or IVF lists (codes + int64 ids) + coarse centroids + codec;
    HNSW graphs add their links (4 B each) and levels; a refine stage adds its exact vectors; an IdMap its ids.

    Close to `len(faiss.serialize_index(index))` (tests check it) without copying a GB-sized index.
    (IndexIDMap2 also keeps a hash map from ids to positions, rebuilt on load and not counted here: the
    measured RSS growth includes it.)
    """
    index = faiss.downcast_index(index)
    if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        return int(8 * index.ntotal + index_bytes(index.index))
    if isinstance(index, faiss.IndexRefine):
        return int(index_bytes(index.base_index) + index_bytes(index.refine_index))
    if isinstance(index, faiss.IndexHNSW):
        h = index.hnsw
        graph = 4 * h.neighbors.size() + 4 * h.levels.size() + 8 * h.offsets.size()
        return int(graph + index_bytes(index.storage))
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return int(index.ntotal * index.code_size)
    codes = ivf.invlists.compute_ntotal() * (ivf.code_size + 8)
    quantizer = faiss.downcast_index(ivf.quantizer)
    centroids = index_bytes(quantizer) if isinstance(quantizer, faiss.IndexHNSW) else ivf.nlist * ivf.d * 4
    codec = 0
    real = faiss.downcast_index(ivf)
    if isinstance(real, (faiss.IndexIVFPQ, faiss.IndexIVFPQFastScan)):
        codec = real.pq.M * real.pq.ksub * real.pq.dsub * 4
    elif isinstance(real, faiss.IndexIVFScalarQuantizer):
        codec = faiss.vector_float_to_array(real.sq.trained).nbytes
    return int(codes + centroids + codec)


def recall_at(got: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean |got_i ∩ truth_i| / k over queries; got, truth: (q, k) int64 ids."""
    return float(np.mean([len(set(a[:k]) & set(b[:k])) / k for a, b in zip(got, truth)]))


def param_grid(index: FaissIndex, *, nprobe_values, ef_values, k_factors) -> list[dict]:
    """The search settings swept for `index` (keys: nprobe, ef_search, k_factor; only those it has)."""
    if index.nlist:
        nprobes = [p for p in nprobe_values if p <= index.nlist] or [index.nlist]
    else:
        nprobes = [None]
    graph_only = index.has_hnsw and not index.nlist
    efs = list(ef_values) if graph_only else [None]
    kfs = list(k_factors) if index.has_refine else [None]
    grid = []
    for p in nprobes:
        for ef in efs:
            for kf in kfs:
                grid.append({key: v for key, v in (("nprobe", p), ("ef_search", ef), ("k_factor", kf)) if v})
    return grid


def _search(index: FaissIndex, queries, k, params):
    return index.search(
        queries,
        k,
        nprobe=params.get("nprobe"),
        ef_search=params.get("ef_search"),
        k_factor=params.get("k_factor"),
    )


def _best_qps(index, queries, k, params, repeats) -> float:
    best = float("inf")
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        _search(index, queries, k, params)
        best = min(best, time.perf_counter() - t0)
    return len(queries) / best


def ann_candidate(
    factory: str,
    vectors: np.ndarray,
    queries: np.ndarray,
    truth: np.ndarray,
    *,
    exact_qps: float,
    nlist: int,
    coarse: FaissIndex | None = None,
    coarse_train_s: float = 0.0,
    exact: FaissIndex | None = None,
    nprobe_values=(16, 64),
    ef_values=(32, 64, 128),
    k_factors=(2, 4),
    k: int = 10,
    repeats: int = 3,
    train_size: int = 65536,
    seed: int = 0,
) -> dict:
    """Build `factory` over `vectors` (ids 0..n-1) and sweep its search parameters; see the module docstring.

    `coarse`: a trained IVF index with `nlist` lists whose centroids an IVF candidate reuses
    (`coarse_train_s`: the k-means time that saves, added to the build time). `exact`: the exact index,
    timed again just before this candidate's sweep; speedups are over that time (on a shared CPU the load
    changes over a long run, and an exact time from minutes earlier makes the ratios meaningless), and
    `exact_qps` (the section's first exact time) is kept beside it."""
    n, dim = vectors.shape
    release_free_memory()
    rss0 = rss_bytes()
    index = FaissIndex.create(concrete_factory(factory, n=n, dim=dim, nlist=nlist), dim, use_gpu="false")
    ivf = faiss.try_extract_index_ivf(index.cpu_index)
    reused = False
    t0 = time.perf_counter()
    if ivf is not None and coarse is not None and coarse.nlist == ivf.nlist:
        # The same coarse centroids as the IVFFlat (an HNSW quantizer builds its graph over them here).
        # faiss's IVF training then skips k-means (its quantizer already holds nlist centroids) and trains
        # only the codec.
        ivf.quantizer.add(faiss.extract_index_ivf(coarse.cpu_index).quantizer.reconstruct_n(0, ivf.nlist))
        reused = True
    if not index.is_trained or reused:
        rng = np.random.default_rng(seed)
        size = min(n, train_size if reused else max(train_size, 64 * index.nlist))
        index.train(vectors[np.sort(rng.choice(n, size=size, replace=False))])
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    ids = np.arange(n, dtype=np.int64)
    for start in range(0, n, ADD_BATCH):
        index.add(vectors[start : start + ADD_BATCH], ids[start : start + ADD_BATCH])
    t_add = time.perf_counter() - t0
    rss_growth = rss_bytes() - rss0
    build_s = t_train + t_add + (coarse_train_s if reused else 0.0)
    log.info("ANN %s built in %.1f s", index.factory, build_s)
    exact_here = exact_qps
    if exact is not None:
        exact_here = _best_qps(exact, queries, k, {}, repeats)
    rows = []
    for params in param_grid(index, nprobe_values=nprobe_values, ef_values=ef_values, k_factors=k_factors):
        _, got = _search(index, queries, k, params)
        qps = _best_qps(index, queries, k, params, repeats)
        shown = dict(params)
        if index.has_hnsw and "ef_search" not in shown:
            shown["ef_search"] = index.resolve_ef_search(0, k)  # automatic (the coarse quantizer's)
        if index.has_refine and "k_factor" not in shown:
            shown["k_factor"] = index.resolve_k_factor(0)
        rows.append(
            {
                "params": shown,
                f"recall@{k}": round(recall_at(got, truth, k), 4),
                "qps": round(qps, 1),
                "speedup_vs_flat": round(qps / exact_here, 2),
            }
        )
    size = index_bytes(index.cpu_index)
    out = {
        "factory": index.factory,
        "coarse_reused": reused,
        "exact_qps_before_sweep": round(exact_here, 1),
        "exact_qps_section_start": round(exact_qps, 1),
        "train_s": round(t_train, 2),
        "add_s": round(t_add, 2),
        "build_s": round(build_s, 2),
        "build_s_per_million": round(build_s / n * 1e6, 1),
        "bytes": size,
        "bytes_per_vector": round(size / n, 2),
        "rss_growth_bytes_per_vector": round(rss_growth / n, 1),
        "rows": rows,
    }
    del index
    release_free_memory()
    return out


def best_row(candidates: list[dict], k: int, recall_goal: float) -> dict | None:
    """The fastest setting of any candidate with recall@k >= recall_goal (None if none reaches it)."""
    good = [
        (r["qps"], c["factory"], r) for c in candidates for r in c["rows"] if r[f"recall@{k}"] >= recall_goal
    ]
    if not good:
        return None
    qps, factory, row = max(good, key=lambda t: t[0])
    return {"factory": factory, **row}
