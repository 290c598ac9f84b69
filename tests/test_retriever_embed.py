"""Corpus embedding: correct vectors in store order, resume after a crash, restart on changed settings,
and the encoder (fingerprint, max_seq_length, normalisation)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from common.errors import UserError
from data_prep.store import SegmentStore, segment_input_text
from retriever.embed import Embeddings, embed_store
from retriever.encoder import Encoder
from retriever.search import tokenizer_backend
from retriever.testing import make_tiny_encoder, toy_documents, words_of, write_toy_store

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed")
    docs, questions = toy_documents(23)
    words = words_of([d.title + " " + d.text for d in docs] + [q for _, q, _ in questions])
    make_tiny_encoder(root / "enc", words)
    make_tiny_encoder(root / "enc2", words, seed=1)
    encoder = Encoder.load(str(root / "enc"), max_seq_length=64, batch_size=4, device="cpu")
    write_toy_store(root / "store", docs, questions, tokenizer_backend(encoder))
    return root, encoder, SegmentStore.open(root / "store")


class CountingEncoder:
    """Wraps an encoder: counts encoded texts and raises after `fail_after` calls (a simulated crash)."""

    def __init__(self, inner, fail_after=None):
        self.inner, self.info, self.fail_after = inner, inner.info, fail_after
        self.calls = self.texts = 0

    def encode_passages(self, texts):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated crash")
        self.calls += 1
        self.texts += len(texts)
        return self.inner.encode_passages(texts)


def test_embeddings_match_direct_encoding(tmp_path, world):
    _, encoder, store = world
    manifest = embed_store(
        store, encoder, tmp_path / "emb", shard_size=5, dtype="float32", batch_size=3, progress=False
    )
    assert manifest["complete"] and manifest["n"] == len(store) == 23
    assert [s["count"] for s in manifest["shards"]] == [5, 5, 5, 5, 3]
    emb = Embeddings.open(
        tmp_path / "emb", encoder_fingerprint=encoder.fingerprint, store_fingerprint=store.fingerprint
    )
    ids, vecs = zip(*emb.iter_chunks(rows=4))
    ids, vecs = np.concatenate(ids), np.concatenate(vecs)
    np.testing.assert_array_equal(ids, np.arange(23))
    direct = encoder.encode_passages([segment_input_text(s) for s in store.get_many(range(23))])
    np.testing.assert_allclose(vecs, direct, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)  # cosine → normalised
    sample = emb.sample(7, seed=3)
    assert sample.shape == (7, encoder.dim)
    assert all(np.isclose(direct, row, atol=1e-5).all(axis=1).any() for row in sample)


def test_resume_after_crash_restarts_at_last_finished_shard(tmp_path, world):
    _, encoder, store = world
    out = tmp_path / "emb"
    crashing = CountingEncoder(encoder, fail_after=5)  # batch 2 → shard 0 = calls 0-2, shard 1 = 3-5
    with pytest.raises(KeyboardInterrupt):
        embed_store(store, crashing, out, shard_size=6, dtype="float16", batch_size=2, progress=False)
    partial = json.loads((out / "manifest.json").read_text())
    assert not partial["complete"] and [s["index"] for s in partial["shards"]] == [0]
    with pytest.raises(UserError, match="incomplete"):
        Embeddings.open(out)
    resumed = CountingEncoder(encoder)
    manifest = embed_store(store, resumed, out, shard_size=6, dtype="float16", batch_size=2, progress=False)
    assert manifest["complete"]
    assert resumed.texts == len(store) - 6  # shard 0 was not encoded again
    assert not list(out.glob(".*tmp"))  # the half-written shard of the crash is gone
    # identical to an uninterrupted run
    embed_store(
        store, encoder, tmp_path / "clean", shard_size=6, dtype="float16", batch_size=2, progress=False
    )
    a = np.concatenate([v for _, v in Embeddings.open(out).iter_chunks()])
    b = np.concatenate([v for _, v in Embeddings.open(tmp_path / "clean").iter_chunks()])
    np.testing.assert_array_equal(a, b)
    # a finished run is reused entirely
    again = CountingEncoder(encoder)
    embed_store(store, again, out, shard_size=6, dtype="float16", batch_size=2, progress=False)
    assert again.texts == 0


def test_changed_settings_start_over(tmp_path, world):
    root, encoder, store = world
    out = tmp_path / "emb"
    embed_store(store, encoder, out, shard_size=10, dtype="float16", progress=False)
    other = CountingEncoder(Encoder.load(str(root / "enc2"), max_seq_length=64, device="cpu"))
    assert other.info.fingerprint != encoder.fingerprint
    manifest = embed_store(store, other, out, shard_size=10, dtype="float16", progress=False)
    assert other.texts == len(store)
    assert manifest["encoder"]["fingerprint"] == other.info.fingerprint
    with pytest.raises(UserError, match="another encoder"):
        Embeddings.open(out, encoder_fingerprint=encoder.fingerprint)


def test_encoder_fingerprint_settings_and_similarity(world, tmp_path):
    root, encoder, _ = world
    again = Encoder.load(str(root / "enc"), max_seq_length=64, device="cpu")
    assert again.fingerprint == encoder.fingerprint  # stable across loads
    assert Encoder.load(str(root / "enc2"), device="cpu").fingerprint != encoder.fingerprint
    # a fine-tuned model saved to the same kind of folder is detected: change one weight slightly
    import torch

    with torch.no_grad():
        next(again.model.parameters()).add_(1e-3)
    again.model.save(str(tmp_path / "tuned"))
    assert Encoder.load(str(tmp_path / "tuned"), device="cpu").fingerprint != encoder.fingerprint
    # max_seq_length is raised to the config's value (capped by the model's positions)
    assert Encoder.load(str(root / "enc"), max_seq_length=320, device="cpu").model.max_seq_length == 320
    assert Encoder.load(str(root / "enc"), max_seq_length=4096, device="cpu").model.max_seq_length == 512
    dot = Encoder.load(str(root / "enc"), similarity="dot", device="cpu")
    v = dot.encode_queries(["what is the capital of ?"])
    assert v.shape == (1, 32) and v.dtype == np.float32 and not np.isclose(np.linalg.norm(v), 1.0)
    assert encoder.encode_queries([]).shape == (0, 32)
    with pytest.raises(UserError, match="does not exist"):
        Encoder.load(str(tmp_path / "nothing-here"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="could not load retriever encoder"):
        Encoder.load(str(tmp_path / "empty"))


@pytest.mark.slow
def test_embedded_minilm_covers_a_whole_segment():
    """The packaged MiniLM says 256 tokens; with 320 a 300-token segment's tail changes its embedding."""
    enc = Encoder.load("embedded:minilm-l6", max_seq_length=320, device="cpu")
    assert enc.dim == 384 and enc.model.max_seq_length == 320
    head = " ".join(["river"] * 250)
    a, b = enc.encode_passages([head + " alpha beta gamma delta " * 10, head + " omega sigma tau rho " * 10])
    assert not np.allclose(a, b, atol=1e-4)  # the differing tail (tokens 250-300) was read
