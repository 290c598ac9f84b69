"""faiss against Milvus on the same embeddings: `python -m bench.vector_backends --config C [key=value ...]`.

Reads `run_dir/store` and `run_dir/embeddings` (made by `python -m retriever.index`; nothing in run_dir is
written), encodes the questions of `data.split` with `retriever.model`, builds in a temporary folder

- faiss `Flat` (exact inner product, the reference),
- faiss `index.factory` (default IVF) searched with every list visited,
- Milvus `index.milvus_index_type` (default FLAT) at `index.milvus_uri` (null: milvus-lite in the temp folder),

and reports for each the build and search time and the fraction of questions whose top-k ids (`--k`,
default 10) equal the reference's, in order and as sets. `--out FILE` also writes the numbers as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.separate import provenance
from common.errors import UserError
from configs.cli import build_parser, parse, run_main
from data_prep.store import SegmentStore, load_qa
from retriever.embed import Embeddings
from retriever.encoder import Encoder
from retriever.index import index_embeddings
from retriever.vector_store import StoreOptions, VectorStore


def agreement(ids: np.ndarray, reference: np.ndarray) -> dict:
    """Fractions of rows of (n, k) `ids` equal to `reference`'s: same ids in the same order, same set."""
    ordered = (ids == reference).all(axis=1)
    as_set = np.array([set(a.tolist()) == set(b.tolist()) for a, b in zip(ids, reference)])
    return {"same_order": float(ordered.mean()), "same_set": float(as_set.mean())}


def timed_search(index: VectorStore, queries: np.ndarray, k: int, nprobe: int | None) -> tuple[np.ndarray, float]:
    """(ids (n, k), seconds) of one search of every question."""
    t0 = time.perf_counter()
    _, ids = index.search(queries, k, nprobe=nprobe)
    return ids, time.perf_counter() - t0


def run(cfg, k: int = 10) -> dict:
    run_dir = Path(cfg.run_dir)
    store = SegmentStore.open(run_dir / "store")
    encoder = Encoder.from_config(cfg)
    emb = Embeddings.open(
        run_dir / "embeddings", encoder_fingerprint=encoder.fingerprint, store_fingerprint=store.fingerprint
    )
    examples = load_qa(run_dir / "store", cfg.data.split)
    if not examples:
        raise UserError(f"{run_dir / 'store'}: no {cfg.data.split}-split questions")
    t0 = time.perf_counter()
    queries = encoder.encode_queries([ex.question for ex in examples])
    encode_s = time.perf_counter() - t0
    rows = {}
    with tempfile.TemporaryDirectory(prefix="vector_backends-") as tmp:
        setups = {
            "faiss Flat": (StoreOptions(backend="faiss", use_gpu="false"), "Flat"),
            "faiss index.factory, every list": (StoreOptions(backend="faiss", use_gpu="false"), cfg.index.factory),
            f"milvus {cfg.index.milvus_index_type}": (
                dataclasses.replace(StoreOptions.from_config(cfg), backend="milvus", use_gpu="false"),
                cfg.index.factory,
            ),
        }
        reference = None
        for name, (options, factory) in setups.items():
            t1 = time.perf_counter()
            index = index_embeddings(
                emb, factory=factory, nlist=cfg.index.nlist, train_sample=cfg.index.train_sample,
                seed=cfg.seed, options=options, index_dir=Path(tmp) / "index",
            )
            if options.backend == "milvus":
                index.save(Path(tmp) / "index", {"encoder": emb.manifest.get("encoder", {})})
            build_s = time.perf_counter() - t1
            nprobe = index.nlist if options.backend == "faiss" else cfg.index.nprobe
            index.search(queries[:1], k, nprobe=nprobe)  # warm-up (Milvus loads the collection)
            ids, search_s = timed_search(index, queries, k, nprobe)
            reference = ids if reference is None else reference
            if options.backend == "milvus":
                assert index.backend == "milvus", index.backend
            rows[name.replace("index.factory", index.factory)] = {
                "factory": index.factory,
                "build_s": round(build_s, 3),
                "search_s": round(search_s, 3),
                "ms_per_question": round(1000 * search_s / len(queries), 3),
                **agreement(ids, reference),
            }
    return {
        "run_dir": str(run_dir),
        "split": cfg.data.split,
        "questions": len(examples),
        "segments": emb.n,
        "dim": emb.dim,
        "k": k,
        "encode_questions_s": round(encode_s, 1),
        "backends": rows,
    }


def main(argv=None) -> int:
    parser = build_parser("python -m bench.vector_backends", __doc__)
    parser.add_argument("--k", type=int, default=10, help="top-k compared (default 10)")
    parser.add_argument("--out", default=None, help="also write the report as JSON to this file")
    cfg, ns = parse(parser, argv)
    started = provenance("bench.vector_backends", sys.argv[1:] if argv is None else argv)
    report = run(cfg, k=ns.k)
    print(
        f"{report['questions']} {report['split']} questions over {report['segments']} segments ({report['dim']}-d), "
        f"top-{report['k']} ids against faiss Flat:"
    )
    for name, row in report["backends"].items():
        print(
            f"  {name:32s} build {row['build_s']:7.2f} s  search {row['search_s']:7.2f} s "
            f"({row['ms_per_question']:.2f} ms/question)  same ids in order {row['same_order']:.4f}, "
            f"as a set {row['same_set']:.4f}"
        )
    if ns.out:
        report = {**started, **report}
        Path(ns.out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    run_main(main)
