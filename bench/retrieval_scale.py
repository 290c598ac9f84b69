"""Retrieval at scale: faiss IVF vs exact Flat on >= 100k embeddings, in one run.

`python -m bench.retrieval_scale --config C [bench.n_vectors=200000 ...] [--embeddings DIR ...] [--out FILE]`

Encoding 100k real segments takes hours on a small CPU, so the corpus vectors are drawn from a
Gaussian mixture (k-means components, each with its own mean and diagonal spread, weighted by size)
fitted to real encoded segments (`run_dir/embeddings`, or the folders given with `--embeddings`),
then L2-normalised like the encoder's cosine embeddings. Queries are real encoded questions of the
run's store when available (else mixture samples). For each nprobe the report gives recall@10
relative to exact search (|IVF top-10 ∩ exact top-10| / 10) and queries/s (one batch of all
queries, best of `bench.repeats`), plus the single-query latency.

`retrieval_scale(...)` returns the numbers as a dict for `bench/run.py`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from bench.machine import PeakRSS
from common.atomic import atomic_write_json
from common.errors import UserError
from configs.cli import build_parser, parse, run_main
from retriever.embed import Embeddings
from retriever.faiss_index import FaissIndex, auto_nprobe, concrete_factory, default_nlist

log = logging.getLogger(__name__)


@dataclass
class Mixture:
    """A diagonal Gaussian mixture: weights (c,), means (c, d), stds (c, d)."""

    weights: np.ndarray
    means: np.ndarray
    stds: np.ndarray

    def sample(self, n: int, seed: int = 0, normalize: bool = True) -> np.ndarray:
        """(n, d) float32 samples (L2-normalised rows when `normalize`)."""
        rng = np.random.default_rng(seed)
        comp = rng.choice(len(self.weights), size=n, p=self.weights)
        out = np.empty((n, self.means.shape[1]), dtype=np.float32)
        for start in range(0, n, 65536):  # in chunks: the noise matrix of 1M × 768 would be 3 GB
            c = comp[start : start + 65536]
            noise = rng.standard_normal((len(c), self.means.shape[1]), dtype=np.float32)
            out[start : start + len(c)] = self.means[c] + noise * self.stds[c]
        if normalize:
            out /= np.linalg.norm(out, axis=1, keepdims=True) + 1e-12
        return out


POINTS_PER_COMPONENT = 40


def fit_mixture(x: np.ndarray, n_components: int | None = None, seed: int = 0) -> Mixture:
    """Fit a diagonal Gaussian mixture by k-means (hard EM): one component per cluster.

    The default is as many components as the data supports (one per 40 points, so that each diagonal
    variance has enough members). Fewer components make a smoother, harder dataset: at 100k vectors
    fitted to the same 2,528 real segments, 32 components gave recall@10 0.58 at nprobe 16, 63 gave 0.87.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if n_components is None:
        n_components = min(4096, len(x) // POINTS_PER_COMPONENT)
    n_components = max(1, min(n_components, len(x) // 20))
    km = faiss.Kmeans(x.shape[1], n_components, niter=25, seed=seed, verbose=False)
    km.train(x)
    _, assign = km.index.search(x, 1)
    assign = assign[:, 0]
    weights = np.bincount(assign, minlength=n_components).astype(np.float64)
    means = np.zeros((n_components, x.shape[1]), dtype=np.float32)
    stds = np.zeros_like(means)
    floor = float(x.std(axis=0).mean()) * 0.05  # a one-point cluster still gets some spread
    for c in range(n_components):
        members = x[assign == c]
        if len(members):
            means[c] = members.mean(axis=0)
            stds[c] = np.maximum(members.std(axis=0), floor)
    return Mixture(weights / weights.sum(), means, stds)


def _best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(
    vectors: np.ndarray,
    queries: np.ndarray,
    *,
    factory: str = "IVF{nlist},Flat",
    nlist: int = 0,
    nprobe_values=(1, 4, 16, 64),
    k: int = 10,
    repeats: int = 3,
    train_sample: int = 0,
    single_queries: int = 200,
    seed: int = 0,
    keep: dict | None = None,
) -> dict:
    """Exact Flat vs `factory` on the same vectors: recall@k relative to exact and queries/s per nprobe.

    `keep` (a dict) receives the built index, the exact top-k ids and the inputs, for callers that
    measure more on the same data (bench/retrieval.py: compressed codecs on the same coarse quantizer).
    """
    n, dim = vectors.shape
    ids = np.arange(n, dtype=np.int64)
    exact = FaissIndex.create("Flat", dim, use_gpu="false")
    exact.add(vectors, ids)
    t_exact = _best_time(lambda: exact.search(queries, k), repeats)
    _, truth = exact.search(queries, k)
    single = queries[:single_queries]
    t_exact_single = _best_time(lambda: [exact.search(q[None], k) for q in single], 1)

    nlist = nlist or default_nlist(n)
    index = FaissIndex.create(concrete_factory(factory, n=n, dim=dim, nlist=nlist), dim, use_gpu="false")
    size = train_sample or min(n, 64 * max(index.nlist, 1))
    rng = np.random.default_rng(seed)
    with PeakRSS() as build_mem:  # peak resident memory of the IVF build (train + add)
        t0 = time.perf_counter()
        index.train(vectors[np.sort(rng.choice(n, size=size, replace=False))])
        t_train = time.perf_counter() - t0
        t0 = time.perf_counter()
        for start in range(0, n, 65536):
            index.add(vectors[start : start + 65536], ids[start : start + 65536])
        t_add = time.perf_counter() - t0
    rows = []
    # The automatic index.nprobe (0) resolves to this for the index: measured too, so the report shows
    # where the default lands.
    default_nprobe = auto_nprobe(index.nlist, n) if index.nlist else None
    for nprobe in sorted(set(nprobe_values) | ({default_nprobe} if default_nprobe else set())):
        if index.nlist and nprobe > index.nlist:
            continue
        t = _best_time(lambda nprobe=nprobe: index.search(queries, k, nprobe=nprobe), repeats)
        _, got = index.search(queries, k, nprobe=nprobe)
        recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(got, truth)]))
        t_single = _best_time(
            lambda nprobe=nprobe: [index.search(q[None], k, nprobe=nprobe) for q in single], 1
        )
        rows.append(
            {
                "nprobe": int(nprobe),
                f"recall@{k}": round(recall, 4),
                "qps": round(len(queries) / t, 1),
                "ms_per_query_single": round(1000 * t_single / len(single), 3),
            }
        )
    if keep is not None:
        keep.update(index=index, truth=truth, vectors=vectors, queries=queries, exact=exact)
    return {
        "n_vectors": int(n),
        "dim": int(dim),
        "n_queries": int(len(queries)),
        "k": k,
        "exact": {
            "qps": round(len(queries) / t_exact, 1),
            "ms_per_query_single": round(1000 * t_exact_single / len(single), 3),
        },
        "ivf": {
            "factory": index.factory,
            "nlist": index.nlist,
            "train_vectors": int(size),
            "train_s": round(t_train, 2),
            "add_s": round(t_add, 2),
            "build_memory": build_mem.as_dict(),
            "default_nprobe": default_nprobe,
            "by_nprobe": rows,
        },
        "faiss_threads": faiss.omp_get_max_threads(),
    }


def _real_vectors(dirs: list[Path], limit: int, seed: int) -> tuple[np.ndarray, list[str]]:
    parts, names = [], []
    for d in dirs:
        emb = Embeddings.open(d)
        parts.append(emb.sample(limit, seed=seed))
        names.append(f"{d} ({emb.manifest['encoder']['name']}, {emb.n} segments)")
    if not parts:
        raise UserError(
            "no encoded segments to fit the mixture to: run `python -m retriever.index` first "
            "or pass --embeddings DIR"
        )
    x = np.concatenate(parts)
    if len({p.shape[1] for p in parts}) != 1:
        raise UserError("the embedding folders have different dimensions")
    return x[:limit], names


def _real_questions(cfg, run_dir: Path, n: int) -> np.ndarray | None:
    """Encoded questions of the run's store (all splits), or None when there is no store."""
    from data_prep.store import load_qa
    from retriever.encoder import Encoder

    if not (run_dir / "store" / "qa.jsonl").is_file():
        return None
    questions = [ex.question for ex in load_qa(run_dir / "store", "all")][:n]
    if not questions:
        return None
    return Encoder.from_config(cfg).encode_queries(questions)


def retrieval_scale(
    cfg,
    *,
    embeddings: list[str] | None = None,
    n_components: int | None = None,
    factory: str | None = None,
    queries: str = "auto",
    keep: dict | None = None,
) -> dict:
    """The whole benchmark with `cfg.bench.*` sizes; returns the numbers (see the module docstring).

    `queries`: `auto` = real encoded questions when the run has any, else mixture samples; `mixture` =
    held-out samples of the fitted mixture (drawn like the corpus vectors); `questions` = real ones only.
    `keep` is passed to `measure`.
    """
    if queries not in ("auto", "mixture", "questions"):
        raise UserError(f"queries must be auto, mixture or questions, got {queries!r}")
    b = cfg.bench
    run_dir = Path(cfg.run_dir)
    dirs = [Path(p) for p in embeddings] if embeddings else [run_dir / "embeddings"]
    t0 = time.perf_counter()
    real, sources = _real_vectors(dirs, b.fit_segments, cfg.seed)
    mix = fit_mixture(real, n_components, cfg.seed)
    vectors = mix.sample(b.n_vectors, seed=cfg.seed + 1)
    source = queries
    queries = None if source == "mixture" else _real_questions(cfg, run_dir, b.n_queries)
    query_source = "real encoded questions"
    if queries is None or len(queries) == 0 or queries.shape[1] != vectors.shape[1]:
        if source == "questions":
            raise UserError(f"no encoded questions of {vectors.shape[1]} dims in {run_dir / 'store'}")
        queries, query_source = mix.sample(b.n_queries, seed=cfg.seed + 2), "mixture samples"
    t_prep = time.perf_counter() - t0
    result = measure(
        vectors,
        queries,
        factory=factory or cfg.index.factory,
        nlist=cfg.index.nlist,
        nprobe_values=b.nprobe_values,
        repeats=b.repeats,
        seed=cfg.seed,
        keep=keep,
    )
    result.update(
        {
            "vectors": f"Gaussian mixture ({len(mix.weights)} diagonal components) fitted to "
            f"{len(real)} real encoded segments, L2-normalised",
            "fit_sources": sources,
            "queries": query_source,
            "prep_s": round(t_prep, 2),
            "seconds": round(time.perf_counter() - t0, 2),
        }
    )
    return result


def to_markdown(r: dict) -> str:
    k = r["k"]
    lines = [
        f"Retrieval at scale: {r['n_vectors']:,} × {r['dim']} vectors ({r['vectors']}); "
        f"{r['n_queries']} queries ({r['queries']}); faiss {r['ivf']['factory']}, trained on "
        f"{r['ivf']['train_vectors']:,} vectors in {r['ivf']['train_s']} s, added in {r['ivf']['add_s']} s; "
        f"{r['faiss_threads']} faiss threads.",
        "",
        f"| index | nprobe | recall@{k} vs exact | queries/s (batch) | ms/query (single) |",
        "| --- | --- | --- | --- | --- |",
        f"| Flat (exact) | – | 1.000 | {r['exact']['qps']:,} | {r['exact']['ms_per_query_single']} |",
    ]
    for row in r["ivf"]["by_nprobe"]:
        lines.append(
            f"| {r['ivf']['factory']} | {row['nprobe']} | {row[f'recall@{k}']:.3f} | {row['qps']:,} | "
            f"{row['ms_per_query_single']} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = build_parser("python -m bench.retrieval_scale", __doc__)
    parser.add_argument(
        "--embeddings",
        action="append",
        default=None,
        help="embedding folder(s) to fit the mixture to (default: run_dir/embeddings)",
    )
    parser.add_argument(
        "--components", type=int, default=None, help="mixture components (default: one per 40 real vectors)"
    )
    parser.add_argument("--out", default=None, help="JSON file for the numbers (default run_dir/bench/...)")
    cfg, ns = parse(parser, argv)
    result = retrieval_scale(cfg, embeddings=ns.embeddings, n_components=ns.components)
    out = Path(ns.out) if ns.out else Path(cfg.run_dir) / "bench" / "retrieval_scale.json"
    atomic_write_json(out, result)
    print(to_markdown(result))
    print(f"\nnumbers: {out}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    run_main(main)
