"""Corpus embedding on Ray Data (`compute.engine=ray`): `embed_store`'s batches encoded by Ray actors.

`ray_batch_encoder(encoder, store, cfg)` is the `encode_batches` argument of `retriever.embed.embed_store`.
Each actor opens the segment store and loads the encoder once (from the path the driver's encoder was loaded
from, with the same settings) and runs `retriever.embed.encode_segments` on the batches it gets, the function
the local path runs; `embed_store` writes the vectors into the same shards and manifest. An actor whose
encoder has another weights fingerprint than the driver's (a model folder that changed) is refused.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.errors import UserError
from common.ray_engine import BatchFn, RayOptions, run_batches
from data_prep.store import SegmentStore
from retriever.embed import BatchEncoder, encode_segments


@dataclass(frozen=True)
class EncoderLoad:
    """How an actor loads the driver's encoder: `Encoder.load` arguments plus the fingerprint it must have."""

    path: str
    fingerprint: str
    similarity: str
    max_seq_length: int
    device: str
    dtype: str
    batch_size: int
    query_prefix: str
    passage_prefix: str

    @classmethod
    def of(cls, encoder, cfg) -> EncoderLoad:
        info = encoder.info
        path = Path(info.path)
        return cls(
            path=str(path.resolve()) if path.exists() else info.path,  # actors do not share the driver's cwd
            fingerprint=info.fingerprint, similarity=info.similarity, max_seq_length=info.max_seq_length,
            device=cfg.device, dtype=cfg.retriever.dtype, batch_size=encoder.batch_size,
            query_prefix=info.query_prefix, passage_prefix=info.passage_prefix,
        )


def _embed_worker(load: EncoderLoad, store_path: str) -> BatchFn:
    """Run in each actor once: the store and the encoder, then ids (n,) -> {"vecs": float32 (n, dim)}."""
    from retriever.encoder import Encoder

    encoder = Encoder.load(
        load.path, similarity=load.similarity, max_seq_length=load.max_seq_length, device=load.device,
        dtype=load.dtype, batch_size=load.batch_size, query_prefix=load.query_prefix,
        passage_prefix=load.passage_prefix,
    )
    if encoder.fingerprint != load.fingerprint:
        raise UserError(
            f"a Ray worker loaded encoder {load.path} with weights fingerprint {encoder.fingerprint}, not the "
            f"driver's {load.fingerprint}: the model folder differs on that node or changed during the run"
        )
    store = SegmentStore.open(store_path)

    def encode(ids: np.ndarray) -> dict[str, np.ndarray]:
        return {"vecs": np.ascontiguousarray(encode_segments(store, encoder, ids), dtype=np.float32)}

    return encode


def ray_batch_encoder(encoder, store: SegmentStore, cfg) -> BatchEncoder:
    """`embed_store`'s `encode_batches` on Ray: the batches' vectors computed by `compute.ray_workers` actors.

    Ray Data's own progress bars stay off: `embed_store`'s bar counts the vectors as they arrive."""
    options = RayOptions.from_config(cfg.compute)
    make_worker = functools.partial(_embed_worker, EncoderLoad.of(encoder, cfg), str(Path(store.path).resolve()))

    def encode_batches(batches: list[np.ndarray]) -> Iterator[np.ndarray]:
        outputs = run_batches(batches, make_worker, options)
        try:
            for out in outputs:
                yield out["vecs"]
        finally:
            outputs.close()  # stops the actors (and a Ray started for this job) when embed_store stops early

    return encode_batches
