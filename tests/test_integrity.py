"""Issue 24: a damaged saved file is refused (naming the file and the command that rebuilds it), never served,
and the producing command rebuilds it. Segment store, embeddings and live additions here; the prefix store
and checkpoints in test_integrity_models.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

from common.errors import UserError
from common.integrity import file_ok, forget_verified, sha256_file, verify_file, verify_once
from data_prep.build import build_store
from data_prep.store import MANIFEST_FILE, QA_FILE, SEGMENTS_FILE, SegmentStore, load_qa, write_store
from retriever.embed import Embeddings, embed_store
from retriever.encoder import EncoderInfo
from tests.test_build import config, dataset, tok_dir  # noqa: F401 (fixtures)
from tests.test_retriever_search import built  # noqa: F401 (fixture)
from tests.test_store import make_qa, make_segments


def flip_byte(path, offset: int | None = None, mask: int = 0xFF) -> None:
    """Flip the bits `mask` of one byte (the middle one by default), keeping the size."""
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= mask
    path.write_bytes(bytes(data))


def truncate(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# ---------------------------------------------------------------------------------------------- helpers


def test_verify_file_names_the_file_and_the_command(tmp_path):
    f = tmp_path / "a.bin"
    f.write_bytes(b"hello world")
    good = sha256_file(f)
    verify_file(f, good, "rebuild it with `make x`")
    verify_file(f, None, "rebuild it with `make x`")  # a manifest without hashes is not checked
    assert file_ok(f, good) and not file_ok(f, None) and not file_ok(tmp_path / "b", good)
    flip_byte(f)
    with pytest.raises(UserError, match=r"a\.bin: sha256 does not match .*rebuild it with `make x`"):
        verify_file(f, good, "rebuild it with `make x`")
    f.unlink()
    with pytest.raises(UserError, match=r"a\.bin: the file is missing; rebuild"):
        verify_file(f, good, "rebuild it with `make x`")


def test_verify_once_remembers_a_match_per_file_version(tmp_path, monkeypatch):
    from common import integrity

    f = tmp_path / "shard.bin"
    f.write_bytes(b"x" * 1000)
    good = sha256_file(f)
    calls = []
    real = integrity.sha256_file
    monkeypatch.setattr(integrity, "sha256_file", lambda p: calls.append(p) or real(p))
    verify_once(f, good, "r")
    verify_once(f, good, "r")
    assert len(calls) == 1  # hashed once per process
    f.write_bytes(b"y" * 999)  # another version of the file: hashed (and refused) again
    with pytest.raises(UserError, match="shard.bin: sha256 does not match"):
        verify_once(f, good, "r")
    with pytest.raises(UserError, match="shard.bin: sha256 does not match"):
        verify_once(f, good, "r")
    assert len(calls) == 3
    forget_verified()


# ---------------------------------------------------------------------------------------------- segment store


def test_store_manifest_holds_file_hashes(tmp_path):
    out = write_store(tmp_path / "s", make_segments(20), make_qa(), batch_rows=8)
    files = json.loads((out / MANIFEST_FILE).read_text())["files_sha256"]
    assert files == {SEGMENTS_FILE: sha256_file(out / SEGMENTS_FILE), QA_FILE: sha256_file(out / QA_FILE)}


def test_flipped_byte_in_segments_arrow_is_refused_and_rebuilt(tmp_path, tok_dir, dataset):  # noqa: F811
    cfg = config(tmp_path, tok_dir, *dataset)
    first = build_store(cfg, progress=False)
    store_dir = first.store_dir
    before = [s.text for b in SegmentStore.open(store_dir).iter_batches(64) for s in b]
    # A byte inside the text of a segment: before the fix the store opened and served the changed text.
    data = (store_dir / SEGMENTS_FILE).read_bytes()
    flip_byte(store_dir / SEGMENTS_FILE, data.index(b"w57"))
    with pytest.raises(
        UserError, match=r"segments\.arrow: sha256 does not match.*python -m data_prep\.build"
    ):
        SegmentStore.open(store_dir)
    again = build_store(cfg, progress=False)
    assert not again.skipped  # rebuilt, not "an identical store already exists"
    assert [s.text for b in SegmentStore.open(store_dir).iter_batches(64) for s in b] == before


def test_truncated_segments_arrow_is_refused_and_rebuilt(tmp_path, tok_dir, dataset):  # noqa: F811
    cfg = config(tmp_path, tok_dir, *dataset)
    store_dir = build_store(cfg, progress=False).store_dir
    truncate(store_dir / SEGMENTS_FILE)
    with pytest.raises(
        UserError, match=r"segments\.arrow: sha256 does not match.*python -m data_prep\.build"
    ):
        SegmentStore.open(store_dir)
    assert not build_store(cfg, progress=False).skipped
    assert len(SegmentStore.open(store_dir)) > 0


def test_flipped_byte_in_qa_jsonl_is_refused_and_rebuilt(tmp_path, tok_dir, dataset):  # noqa: F811
    cfg = config(tmp_path, tok_dir, *dataset)
    store_dir = build_store(cfg, progress=False).store_dir
    before = load_qa(store_dir)
    path = store_dir / QA_FILE
    flip_byte(path, path.read_bytes().index(b"Which word"))
    with pytest.raises(UserError, match=r"qa\.jsonl: sha256 does not match.*python -m data_prep\.build"):
        load_qa(store_dir)
    assert not build_store(cfg, progress=False).skipped
    assert load_qa(store_dir) == before


def test_store_without_file_hashes_still_opens(tmp_path):
    """A store built before `files_sha256` existed loads as it did."""
    out = write_store(tmp_path / "s", make_segments(20), make_qa(), batch_rows=8)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    del manifest["files_sha256"]
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    assert len(SegmentStore.open(out)) == 20 and len(load_qa(out)) == len(make_qa())


def test_build_remakes_a_store_without_file_hashes(tmp_path, tok_dir, dataset):  # noqa: F811
    cfg = config(tmp_path, tok_dir, *dataset)
    store_dir = build_store(cfg, progress=False).store_dir
    manifest = json.loads((store_dir / MANIFEST_FILE).read_text())
    del manifest["files_sha256"]
    (store_dir / MANIFEST_FILE).write_text(json.dumps(manifest))
    again = build_store(cfg, progress=False)
    assert not again.skipped and "files_sha256" in again.manifest
    assert again.manifest["fingerprint"] == manifest["fingerprint"]  # the index built over it stays valid
    assert build_store(cfg, progress=False).skipped


# ---------------------------------------------------------------------------------------------- embeddings


class FakeEncoder:
    """Deterministic 8-d vectors from a segment's text (no model): enough for `embed_store`."""

    info = EncoderInfo("fake", "fake", "fake-fp", 8, "cosine", 64, "", "")

    def encode_passages(self, texts: list[str]) -> np.ndarray:
        return np.stack([np.random.default_rng(sum(map(ord, t))).normal(size=8) for t in texts]).astype(
            np.float32
        )


def _embedded(tmp_path, n: int = 40, shard_size: int = 16):
    store = SegmentStore.open(write_store(tmp_path / "store", make_segments(n), batch_rows=8))
    enc = FakeEncoder()
    out = tmp_path / "emb"
    embed_store(store, enc, out, shard_size=shard_size, dtype="float32", batch_size=8, progress=False)
    return store, enc, out


def test_embeddings_manifest_holds_shard_hashes(tmp_path):
    _, _, out = _embedded(tmp_path)
    for shard in json.loads((out / "manifest.json").read_text())["shards"]:
        assert shard["sha256"] == sha256_file(out / shard["file"])
        assert shard["ids_sha256"] == sha256_file(out / shard["ids_file"])


def test_flipped_byte_in_embedding_shard_is_refused_and_rebuilt(tmp_path):
    store, enc, out = _embedded(tmp_path)
    good = np.load(out / "shard-00000.npy").copy()
    flip_byte(out / "shard-00000.npy", len((out / "shard-00000.npy").read_bytes()) - 7)
    forget_verified()
    emb = Embeddings.open(out)
    with pytest.raises(
        UserError, match=r"shard-00000\.npy: sha256 does not match.*python -m retriever\.index"
    ):
        list(emb.iter_chunks())
    with pytest.raises(UserError, match=r"shard-00000\.npy: sha256 does not match"):
        emb.sample(5)
    # Before the fix the damaged shard was "reused" for a new index (a cosine of 6.44 came out of it).
    calls = []
    real = enc.encode_passages
    enc.encode_passages = lambda texts: calls.append(len(texts)) or real(texts)
    embed_store(store, enc, out, shard_size=16, dtype="float32", batch_size=8, progress=False)
    assert sum(calls) == 16  # only the damaged shard was embedded again
    np.testing.assert_array_equal(np.load(out / "shard-00000.npy"), good)
    ids, vecs = next(Embeddings.open(out).iter_chunks())
    np.testing.assert_array_equal(vecs[:16], good)


def test_truncated_embedding_ids_are_refused_and_rebuilt(tmp_path):
    store, enc, out = _embedded(tmp_path)
    truncate(out / "ids-00001.npy")
    forget_verified()
    with pytest.raises(UserError, match=r"ids-00001\.npy: sha256 does not match"):
        list(Embeddings.open(out).iter_chunks())
    embed_store(store, enc, out, shard_size=16, dtype="float32", batch_size=8, progress=False)
    ids = np.concatenate([i for i, _ in Embeddings.open(out).iter_chunks()])
    np.testing.assert_array_equal(ids, np.arange(40))


def test_embeddings_without_hashes_are_read_but_made_again(tmp_path):
    """A manifest from before shard hashes: still readable; a rerun embeds its shards again (it cannot trust
    them) and records their hashes."""
    store, enc, out = _embedded(tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())
    for shard in manifest["shards"]:
        del shard["sha256"], shard["ids_sha256"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert sum(len(i) for i, _ in Embeddings.open(out).iter_chunks()) == 40
    new = embed_store(store, enc, out, shard_size=16, dtype="float32", batch_size=8, progress=False)
    assert all("sha256" in s for s in new["shards"]) and new["segments_per_s"] is not None


# ---------------------------------------------------------------------------------------------- live additions


def test_flipped_byte_in_live_additions_is_refused(built):  # noqa: F811
    """The demo's added documents persist in run_dir/live; a changed letter in their text was replayed."""
    import shutil

    from data_prep.records import Document
    from retriever.search import Retriever

    _, cfg, _, encoder = built
    r = Retriever.from_config(cfg, encoder=encoder)
    r.add_documents([Document("extra", "Quorn", "The capital of Quorn is Zib.")])
    manifest = json.loads((r.live_dir / "manifest.json").read_text())
    assert set(manifest["files_sha256"]) == {"segments.jsonl", "vectors.npy", "removed.npy"}
    path = r.live_dir / "segments.jsonl"
    flip_byte(path, path.read_bytes().index(b"Zib"), mask=0x20)  # Zib -> zib: still valid JSON
    with pytest.raises(UserError, match=r"live/segments\.jsonl: sha256 does not match.*reset\(\)"):
        Retriever.from_config(cfg, encoder=encoder)
    truncate(r.live_dir / "vectors.npy")
    with pytest.raises(UserError, match=r"live/(segments\.jsonl|vectors\.npy): sha256 does not match"):
        Retriever.from_config(cfg, encoder=encoder)
    shutil.rmtree(r.live_dir)
    assert Retriever.from_config(cfg, encoder=encoder).live_documents == []
