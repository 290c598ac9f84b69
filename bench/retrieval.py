"""Section 1, retrieval at scale: IVFFlat vs exact Flat on mixture vectors, plus compressed codecs.

The IVFFlat measurement is `bench.retrieval_scale.retrieval_scale` (the retriever's benchmark); this
module adds what the bench report needs on the same vectors and queries, in the same process:

- compressed codecs (`bench.compression`, e.g. `IVF{nlist},SQ8`, `IVF{nlist},PQ48`) built on the
  *same trained coarse quantizer* (its centroids are copied, so only the codec is trained), measured
  for recall@10 against the same exact top-10 and for queries/s at every nprobe;
- memory of every index (bytes per vector: codes + ids + centroids + codec tables);
- the recommended nprobe: the smallest with recall@10 >= 0.95 (else the most accurate), and there the
  recall and speedup over exact search of the IVFFlat;
- the ANN candidates of `bench.ann_factories` (`bench.ann`: HNSW graphs, IVF with an HNSW coarse
  quantizer, compressed codes re-ranked exactly), each over its search parameters, with build time and
  memory per vector.

The goal is judged on the fastest setting of any measured index (IVFFlat, codecs, ANN candidates) whose
recall@10 reaches 0.95 (`best`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import faiss
import numpy as np

from bench.ann import ann_candidate, best_row, index_bytes, recall_at  # noqa: F401  (index_bytes: tests use it here)
from bench.retrieval_scale import retrieval_scale
from retriever.faiss_index import FaissIndex, concrete_factory

log = logging.getLogger(__name__)

RECALL_GOAL = 0.95
SPEEDUP_GOAL = 10.0
IVF_FLAT = "IVF{nlist},Flat"
GOAL = f"recall@10 >= {RECALL_GOAL} at >= {SPEEDUP_GOAL:g}x the exact-search throughput"


def _best_qps(index: FaissIndex, queries: np.ndarray, k: int, nprobe: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        index.search(queries, k, nprobe=nprobe)
        best = min(best, time.perf_counter() - t0)
    return len(queries) / best


def compressed_variant(
    trained: FaissIndex,
    factory: str,
    vectors: np.ndarray,
    queries: np.ndarray,
    truth: np.ndarray,
    nprobe_values,
    k: int = 10,
    repeats: int = 3,
    train_size: int = 16384,
    seed: int = 0,
) -> dict:
    """Build `factory` (e.g. `IVF{nlist},SQ8`) on the coarse centroids of `trained`; recall/qps per nprobe.

    The codec trains on `train_size` vectors (64 per PQ centroid; faiss's k-means on 4-dim sub-vectors
    is slow per point).
    """
    ivf = faiss.extract_index_ivf(trained.cpu_index)
    nlist, dim = ivf.nlist, ivf.d
    index = FaissIndex.create(
        concrete_factory(factory, n=len(vectors), dim=dim, nlist=nlist), dim, use_gpu="false"
    )
    new_ivf = faiss.extract_index_ivf(index.cpu_index)
    if new_ivf.nlist != nlist:
        raise ValueError(
            f"{factory} has {new_ivf.nlist} lists, the trained index {nlist}: use IVF{{nlist}},..."
        )
    # The same coarse quantizer: only the codec (SQ ranges, PQ codebooks) is trained below.
    new_ivf.quantizer.add(ivf.quantizer.reconstruct_n(0, nlist))
    real = faiss.downcast_index(new_ivf)
    if isinstance(real, faiss.IndexIVFPQ):
        # The factory turns on polysemous training (an annealing over code orders, used only by Hamming
        # filtering, which this search does not do); it takes minutes for 96 sub-quantizers.
        real.do_polysemous_training = False
    rng = np.random.default_rng(seed)
    sample = vectors[np.sort(rng.choice(len(vectors), size=min(len(vectors), train_size), replace=False))]
    t0 = time.perf_counter()
    index.train(sample)
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    ids = np.arange(len(vectors), dtype=np.int64)
    for start in range(0, len(vectors), 65536):
        index.add(vectors[start : start + 65536], ids[start : start + 65536])
    t_add = time.perf_counter() - t0
    rows = []
    for nprobe in nprobe_values:
        if nprobe > nlist:
            continue
        _, got = index.search(queries, k, nprobe=nprobe)
        rows.append(
            {
                "nprobe": int(nprobe),
                f"recall@{k}": round(recall_at(got, truth, k), 4),
                "qps": round(_best_qps(index, queries, k, nprobe, repeats), 1),
            }
        )
    size = index_bytes(index.cpu_index)
    return {
        "factory": index.factory,
        "train_s": round(t_train, 2),
        "add_s": round(t_add, 2),
        "bytes": size,
        "bytes_per_vector": round(size / len(vectors), 2),
        "by_nprobe": rows,
    }


def _fitted_segments(cfg) -> int:
    """How many real vectors `retrieval_scale` fits the mixture to (each folder gives at most fit_segments)."""
    from retriever.embed import Embeddings

    b = cfg.bench
    dirs = b.fit_embeddings or [Path(cfg.run_dir) / "embeddings"]
    return min(b.fit_segments, sum(min(Embeddings.open(Path(d)).n, b.fit_segments) for d in dirs))


def recommend_nprobe(rows: list[dict], k: int = 10, goal: float = RECALL_GOAL) -> dict:
    """The smallest nprobe reaching `goal` recall@k, else the most accurate one."""
    good = [r for r in rows if r[f"recall@{k}"] >= goal]
    if good:
        return min(good, key=lambda r: r["nprobe"])
    return max(rows, key=lambda r: (r[f"recall@{k}"], -r["nprobe"]))


def run(cfg) -> dict:
    """The section's numbers (JSON-ready); see the module docstring."""
    b = cfg.bench
    keep: dict = {}
    t0 = time.perf_counter()
    # Always IVFFlat here (what the goal is about), whatever index.factory the run uses; other codecs follow.
    base = retrieval_scale(
        cfg,
        embeddings=b.fit_embeddings or None,
        n_components=b.mixture_components or None,
        factory=IVF_FLAT,
        queries=b.retrieval_queries,
        keep=keep,
    )
    k = base["k"]
    index, truth, vectors, queries = keep["index"], keep["truth"], keep["vectors"], keep["queries"]
    rows = base["ivf"]["by_nprobe"]
    flat_bytes = int(len(vectors) * vectors.shape[1] * 4)
    ivf_bytes = index_bytes(index.cpu_index)
    best = recommend_nprobe(rows, k)
    exact_qps = base["exact"]["qps"]
    for row in rows:
        row["speedup_vs_flat"] = round(row["qps"] / exact_qps, 2)
    variants = []
    for factory in b.compression:
        log.info("compressed codec %s on the same coarse quantizer", factory)
        v = compressed_variant(
            index,
            factory,
            vectors,
            queries,
            truth,
            _nprobes_of(rows),  # the same columns as the IVFFlat rows (the default nprobe included)
            k,
            repeats=min(3, b.repeats),
            seed=cfg.seed,
        )
        for row in v["by_nprobe"]:
            row["speedup_vs_flat"] = round(row["qps"] / exact_qps, 2)
        variants.append(v)
    ann = []
    for factory in b.ann_factories:
        log.info("ANN candidate %s", factory)
        ann.append(
            ann_candidate(
                factory,
                vectors,
                queries,
                truth,
                exact_qps=exact_qps,
                nlist=index.nlist,
                coarse=index,
                coarse_train_s=base["ivf"]["train_s"],
                exact=keep["exact"],
                nprobe_values=_nprobes_of(rows),
                ef_values=b.ann_ef_search_values,
                k_factors=b.ann_k_factors,
                k=k,
                repeats=min(3, b.repeats),
                seed=cfg.seed,
            )
        )
    recall = best[f"recall@{k}"]
    speedup = best["speedup_vs_flat"]
    overall = best_row(_as_candidates(base["ivf"]["factory"], rows, variants) + ann, k, RECALL_GOAL)
    return {
        "goal": GOAL,
        "met": bool(overall is not None and overall["speedup_vs_flat"] >= SPEEDUP_GOAL),
        "best": overall,
        "ivf_met": bool(recall >= RECALL_GOAL and speedup >= SPEEDUP_GOAL),
        "recommended_nprobe": best["nprobe"],
        "ivf_recall_at_10": recall,
        "ivf_speedup_vs_flat": speedup,
        "ivf_qps": best["qps"],
        "flat_qps": exact_qps,
        "build_s": round(base["ivf"]["train_s"] + base["ivf"]["add_s"], 2),
        "memory": {
            "flat_bytes_per_vector": round(flat_bytes / len(vectors), 2),
            "ivfflat_bytes_per_vector": round(ivf_bytes / len(vectors), 2),
            "ivfflat_bytes": ivf_bytes,
        },
        "compressed": variants,
        "ann": ann,
        "fit_segments_wanted": b.fit_segments,
        "fitted_segments": _fitted_segments(cfg),
        "scale": base,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def to_markdown(r: dict) -> str:
    s = r["scale"]
    k = s["k"]
    ivf = s["ivf"]
    mem = ivf["build_memory"]
    lines = [
        f"{s['n_vectors']:,} × {s['dim']} vectors: {s['vectors']} ({'; '.join(s['fit_sources'])}). "
        f"{s['n_queries']} held-out queries ({s['queries']}); recall@{k} is measured against exact Flat "
        f"search on the same vectors; queries/s is one batch of all queries (best of the repeats); "
        f"{s['faiss_threads']} faiss threads.",
        "",
    ]
    fitted = r.get("fitted_segments")
    if fitted is not None and fitted < r["fit_segments_wanted"]:
        lines += [
            f"The mixture is fitted to {fitted:,} encoded segments, fewer than bench.fit_segments="
            f"{r['fit_segments_wanted']:,}: that is all the run has; give more with "
            "`bench.fit_embeddings=[DIR,...]` (embedding folders of larger runs).",
            "",
        ]
    lines += [
        f"IVFFlat build ({ivf['factory']}): k-means on {ivf['train_vectors']:,} vectors {ivf['train_s']} s + "
        f"adding {s['n_vectors']:,} vectors {ivf['add_s']} s = **{r['build_s']} s**; peak RSS during the "
        f"build {mem['peak_rss_mb']:,} MB ({mem['peak_over_before_mb']:,} MB above the "
        f"{mem['rss_before_mb']:,} MB already resident: the vectors and the exact index)"
        + (
            ""
            if mem["peak_is_per_phase"]
            else " (peak since process start: the kernel mark could not be reset)"
        )
        + ".",
        "",
        f"| index | nprobe | recall@{k} vs exact | queries/s (batch) | speedup vs Flat | ms/query (single) |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| Flat (exact) | – | 1.000 | {s['exact']['qps']:,} | 1.0 | {s['exact']['ms_per_query_single']} |",
    ]
    for row in ivf["by_nprobe"]:
        marks = [" **(recommended)**"] if row["nprobe"] == r["recommended_nprobe"] else []
        marks += [" (default, `index.nprobe=0`)"] if row["nprobe"] == ivf.get("default_nprobe") else []
        mark = "".join(marks)
        lines.append(
            f"| {ivf['factory']} | {row['nprobe']}{mark} | {row[f'recall@{k}']:.3f} | {row['qps']:,} | "
            f"{row['speedup_vs_flat']} | {row['ms_per_query_single']} |"
        )
    lines += [
        "",
        "Memory vs recall (compressed codecs on the same coarse quantizer; bytes per vector include the "
        "int64 id and each vector's share of the centroids and codec tables):",
        "",
        f"| index | bytes/vector | recall@{k} at nprobe " + " / ".join(str(n) for n in _nprobes(r)) + " | "
        f"queries/s at nprobe {r['recommended_nprobe']} |",
        "| --- | --- | --- | --- |",
        f"| Flat (exact) | {r['memory']['flat_bytes_per_vector']} | 1.000 | {s['exact']['qps']:,} |",
        f"| {ivf['factory']} | {r['memory']['ivfflat_bytes_per_vector']} | "
        + " / ".join(f"{row[f'recall@{k}']:.3f}" for row in ivf["by_nprobe"])
        + f" | {r['ivf_qps']:,} |",
    ]
    for v in r["compressed"]:
        at = {row["nprobe"]: row for row in v["by_nprobe"]}
        qps = at.get(r["recommended_nprobe"], {}).get("qps")
        recalls = " / ".join(f"{row[f'recall@{k}']:.3f}" for row in v["by_nprobe"])
        lines.append(
            f"| {v['factory']} | {v['bytes_per_vector']} | {recalls} | {'–' if qps is None else f'{qps:,}'} |"
        )
    lines += ["", *ann_markdown(r)]
    return "\n".join(lines)


def _as_candidates(ivf_factory: str, rows: list[dict], variants: list[dict]) -> list[dict]:
    """The IVFFlat and the compressed codecs in `bench.ann.best_row`'s form (rows with params)."""

    def conv(rs):
        return [
            {**{key: v for key, v in r.items() if key != "nprobe"}, "params": {"nprobe": r["nprobe"]}}
            for r in rs
        ]

    return [{"factory": ivf_factory, "rows": conv(rows)}] + [
        {"factory": v["factory"], "rows": conv(v["by_nprobe"])} for v in variants
    ]


def _params_text(params: dict) -> str:
    return ", ".join(f"{key} {v:g}" if isinstance(v, float) else f"{key} {v}" for key, v in params.items())


def ann_markdown(r: dict) -> list[str]:
    """The ANN candidates' table and the goal's verdict lines."""
    k = r["scale"]["k"]
    lines = []
    best = r.get("best")
    if best is not None:
        lines += [
            f"Fastest setting with recall@{k} >= {RECALL_GOAL}: **{best['factory']}, {_params_text(best['params'])}**: "
            f"recall@{k} {best[f'recall@{k}']:.3f} at {best['qps']:,} queries/s = "
            f"**{best['speedup_vs_flat']}× exact** (goal >= {SPEEDUP_GOAL:g}×: {'met' if r['met'] else 'not met'}).",
            "",
        ]
    else:
        lines += [f"No measured setting reaches recall@{k} >= {RECALL_GOAL}: goal not met.", ""]
    if not r.get("ann"):
        return lines
    lines += [
        "ANN candidates (`bench.ann_factories`, built through `index.factory`; build time includes the "
        "IVFFlat's k-means where the coarse centroids are reused; bytes/vector = the index's structures "
        "(codes or vectors, int64 ids, graph links, centroids, codec tables); RSS growth = this process's "
        "resident memory gained while building it; speedups are over exact search timed again just before "
        "each candidate's sweep, shown beside its name):",
        "",
        f"| index | search parameters | recall@{k} vs exact | queries/s (batch) | speedup vs Flat | build s | "
        "bytes/vector | RSS growth B/vector |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in r["ann"]:
        for row in c["rows"]:
            goal = row[f"recall@{k}"] >= RECALL_GOAL and row["speedup_vs_flat"] >= SPEEDUP_GOAL
            lines.append(
                f"| {c['factory']} (exact {c['exact_qps_before_sweep']:,} q/s) | {_params_text(row['params'])}{' **(goal)**' if goal else ''} | "
                f"{row[f'recall@{k}']:.3f} | {row['qps']:,} | {row['speedup_vs_flat']} | {c['build_s']} | "
                f"{c['bytes_per_vector']} | {c['rss_growth_bytes_per_vector']} |"
            )
    return lines


def _nprobes(r: dict) -> list[int]:
    return _nprobes_of(r["scale"]["ivf"]["by_nprobe"])


def _nprobes_of(rows: list[dict]) -> list[int]:
    return [row["nprobe"] for row in rows]
