"""Segment store → embeddings → faiss index: `python -m retriever.index --config C [key=value ...]`.

Reads `run_dir/store/`, embeds every segment with `retriever.model` into `run_dir/embeddings/`
(sharded, resumable: rerun after a crash and it continues at the first unfinished shard; `compute.engine=ray`
encodes the batches on Ray Data actors, retriever/embed_ray.py, into the same shards), then builds
the vector store of `index.backend`: faiss (default) builds `index.factory` (default `auto`:
`IVF{nlist},Flat` below 1M vectors, `IVF{nlist},PQ{dim}x4fs,RFlat` from there; inner product; nlist from
`index.nlist` or about 4·√N) trained on a random sample and writes
`run_dir/index/` (index.faiss + manifest.json) atomically; milvus inserts the vectors into a new Milvus
collection (`index.milvus_*`, retriever/milvus_store.py) and publishes it with run_dir/index/manifest.json.
Vectors go in with the store's segment ids, in batches. A rebuild drops live additions.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from pathlib import Path

from common.errors import UserError
from configs.cli import build_parser, parse, run_main
from configs.window import check_window_fits_encoder
from data_prep.store import SegmentStore
from retriever.embed import Embeddings, embed_store
from retriever.encoder import Encoder
from retriever.faiss_index import concrete_factory, default_nlist
from retriever.vector_store import (
    StoreOptions,
    VectorStore,
    create_store,
    load_index_dir,
    save_index_dir,
    store_checks,
)

log = logging.getLogger(__name__)

ADD_BATCH = 65536
TRAIN_SAMPLE_BYTES = 4 << 30


def index_embeddings(
    emb: Embeddings,
    *,
    factory: str = "auto",
    nlist: int = 0,
    train_sample: int = 0,
    use_gpu: str = "auto",
    seed: int = 0,
    options: StoreOptions | None = None,
    index_dir: Path | None = None,
) -> VectorStore:
    """A vector store over a finished embedding directory, ids = segment ids: faiss (`factory`) unless
    `options.backend` says otherwise; a Milvus build goes to `options.milvus` (null uri: index_dir/milvus.db)."""
    n = emb.n
    if n == 0:
        raise UserError("the segment store has no segments: nothing to index")
    nlist = nlist or default_nlist(n)
    options = options or StoreOptions(use_gpu=use_gpu)
    index = create_store(
        options,
        emb.dim,
        factory=concrete_factory(factory, n=n, dim=emb.dim, nlist=nlist),
        nlist=nlist,
        index_dir=Path(index_dir or "."),
    )
    try:
        _fill(index, emb, train_sample=train_sample, seed=seed)
    except BaseException:
        index.discard()
        raise
    return index


def _fill(index: VectorStore, emb: Embeddings, *, train_sample: int, seed: int) -> None:
    """Train `index` on a sample of `emb` (when it needs training), then add every vector under its segment id."""
    n = emb.n
    if not index.is_trained:
        # faiss k-means uses at most 256 points per centroid anyway; more only costs time. The sample is
        # held in RAM as float32, so the default also stays under TRAIN_SAMPLE_BYTES (4 GB: 1.4M × 768).
        size = train_sample or min(n, 256 * max(index.nlist, 1), TRAIN_SAMPLE_BYTES // (4 * emb.dim))
        sample = emb.sample(size, seed=seed)
        t0 = time.perf_counter()
        try:
            index.train(sample)
        except RuntimeError as e:
            raise UserError(
                f"training {index.factory} on {len(sample)} vectors failed: {str(e).splitlines()[0]} "
                "(PQ/SQ codebooks need thousands of vectors; use `Flat` or `IVF{nlist},Flat` for a "
                "small corpus)"
            ) from e
        log.info("trained %s on %d vectors in %.1f s", index.factory, len(sample), time.perf_counter() - t0)
    for ids, vectors in emb.iter_chunks(ADD_BATCH):
        index.add(vectors, ids)


def check_store_fits_encoder(store: SegmentStore, encoder: Encoder, configured: int) -> None:
    """Refuse to embed a store whose windows the encoder would cut (a UserError naming the limit)."""
    window = store.manifest.get("window")
    limit = getattr(encoder.model, "max_seq_length", None)
    if not isinstance(window, int) or not limit:
        return  # a store written without the builder's window (tests, toy stores)
    prefix = encoder.passage_prefix
    prefix_tokens = len(encoder.tokenizer(prefix, add_special_tokens=False)["input_ids"]) if prefix else 0
    limit_from = (
        "retriever.max_seq_length" if limit >= configured else f"the positions of encoder {encoder.info.name}"
    )
    check_window_fits_encoder(
        window,
        limit,
        prefix_tokens,
        limit_from=limit_from,
        window_from=f"the window of {store.path}",
        fix=" and rebuild the store (python -m data_prep.build)",
    )


def build_index(
    cfg,
    *,
    encoder: Encoder | None = None,
    run_dir: str | Path | None = None,
    store: SegmentStore | None = None,
    progress: bool = True,
) -> dict:
    """Embed `run_dir/store` (or `store`) into run_dir/embeddings, write run_dir/index; return its manifest.

    `progress` shows a tqdm bar while embedding.
    """
    run_dir = Path(run_dir or cfg.run_dir)
    store = store or SegmentStore.open(run_dir / "store")
    encoder = encoder or Encoder.from_config(cfg)
    check_store_fits_encoder(store, encoder, cfg.retriever.max_seq_length)
    encode_batches = None
    if cfg.compute.engine == "ray":
        from retriever.embed_ray import ray_batch_encoder

        encode_batches = ray_batch_encoder(encoder, store, cfg)
    t0 = time.perf_counter()
    emb_manifest = embed_store(
        store,
        encoder,
        run_dir / "embeddings",
        shard_size=cfg.index.shard_size,
        dtype=cfg.index.embed_dtype,
        batch_size=cfg.retriever.batch_size,
        progress=progress,
        encode_batches=encode_batches,
    )
    t_embed = time.perf_counter() - t0
    emb = Embeddings(run_dir / "embeddings", emb_manifest)
    t1 = time.perf_counter()
    index = index_embeddings(
        emb,
        factory=cfg.index.factory,
        nlist=cfg.index.nlist,
        train_sample=cfg.index.train_sample,
        use_gpu=cfg.index.use_gpu,
        seed=cfg.seed,
        options=StoreOptions.from_config(cfg),
        index_dir=run_dir / "index",
    )
    try:
        manifest = _save(cfg, index, run_dir, store, encoder, emb_manifest, t_embed, t1)
    except BaseException:
        index.discard()
        raise
    live = run_dir / "live"
    if live.exists():
        log.info("the index was rebuilt: dropping live additions in %s", live)
        shutil.rmtree(live, ignore_errors=True)
    return manifest


def _save(
    cfg, index: VectorStore, run_dir: Path, store, encoder, emb_manifest: dict, t_embed: float, t1: float
) -> dict:
    t_index = time.perf_counter() - t1
    return save_index_dir(
        run_dir / "index",
        index,
        {
            "encoder": encoder.info.to_dict(),
            "store_fingerprint": store.fingerprint,
            "factory_template": cfg.index.factory,
            # the lists a search visits by default (index.nprobe, 0 resolved for this size)
            "nprobe": index.resolve_nprobe(cfg.index.nprobe),
            "max_id": len(store) - 1,
            "embed_dtype": cfg.index.embed_dtype,
            "embed_seconds": round(t_embed, 3),
            "index_seconds": round(t_index, 3),
            "segments_per_s": emb_manifest.get("segments_per_s"),
        },
    )


def ensure_index(
    cfg, *, encoder: Encoder, store: SegmentStore, run_dir: str | Path, progress: bool = True
) -> tuple[VectorStore, dict]:
    """Open run_dir/index when it was built from `store` with `encoder`; (re)build it first otherwise.

    Any refusal of load_index_dir (missing, another encoder or store, a bad sha256) means a rebuild.
    """
    index_dir = Path(run_dir) / "index"
    checks = {
        "encoder_fingerprint": encoder.fingerprint,
        "encoder_name": encoder.info.name,
        "dim": encoder.dim,
        "store_fingerprint": store.fingerprint,
        **store_checks(StoreOptions.from_config(cfg)),
    }
    try:
        return load_index_dir(index_dir, **checks)
    except UserError as err:
        # err ends in advice for a user opening the index by hand; here the rebuild is what follows.
        reason = re.split(r"; rebuild|; build it|: set retriever\.model|: set index\.", str(err))[0]
        log.info("building %s, since the index there cannot be used: %s", index_dir, reason)
    build_index(cfg, encoder=encoder, run_dir=run_dir, store=store, progress=progress)
    return load_index_dir(index_dir, **checks)


def main(argv=None) -> int:
    parser = build_parser("python -m retriever.index", __doc__)
    cfg, ns = parse(parser, argv)
    manifest = build_index(cfg)
    rate = manifest.get("segments_per_s")
    print(
        f"index: {Path(cfg.run_dir) / 'index'}  {manifest['backend']} {manifest['factory']}  ntotal={manifest['ntotal']} "
        f"dim={manifest['dim']} nlist={manifest['nlist']} nprobe={manifest['nprobe']}  "
        f"embedding {manifest['embed_seconds']:.1f} s"
        + (f" ({rate:.1f} segments/s)" if rate else " (reused)")
        + f", indexing {manifest['index_seconds']:.1f} s"
    )
    return 0


if __name__ == "__main__":
    run_main(main)
