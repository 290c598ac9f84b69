"""The Retriever over a built index: `python -m retriever.index`, search/batch_search, refusal of a
mismatched encoder or store, live additions and removals that persist, and reset()."""

from __future__ import annotations

import numpy as np
import pytest

from common.errors import UserError
from configs.loader import load_config
from data_prep.records import Document
from data_prep.store import SegmentStore, segment_input_text
from retriever import index as index_cli
from retriever.encoder import Encoder
from retriever.search import Hit, Retriever, tokenizer_backend
from retriever.testing import make_tiny_encoder, toy_documents, words_of, write_toy_store

EXTRA = "Quorn is a new country. The capital of Quorn is Zib. Quorn is led by Wub."


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    docs, questions = toy_documents(30)
    words = words_of([d.title + " " + d.text for d in docs] + [q for _, q, _ in questions] + [EXTRA])
    make_tiny_encoder(root / "enc", words)
    make_tiny_encoder(root / "enc2", words, seed=1)
    overrides = [
        f"run_dir={root / 'run'}",
        f"retriever.model={root / 'enc'}",
        "index.shard_size=8",
        "retriever.batch_size=8",
        "index.nprobe=100",
        "device=cpu",
    ]
    cfg = load_config(None, overrides)
    encoder = Encoder.from_config(cfg)
    write_toy_store(root / "run" / "store", docs, questions, tokenizer_backend(encoder))
    assert index_cli.main(overrides) == 0  # python -m retriever.index
    return root, cfg, overrides, encoder


def test_index_cli_writes_manifest(built):
    root, cfg, _, encoder = built
    import json

    manifest = json.loads((root / "run" / "index" / "manifest.json").read_text())
    store = SegmentStore.open(root / "run" / "store")
    assert manifest["ntotal"] == len(store) == 30
    assert manifest["factory"] == "IVF1,Flat" and manifest["nlist"] == 1  # 30 points: one centroid
    assert manifest["encoder"]["fingerprint"] == encoder.fingerprint
    assert manifest["encoder"]["name"] == cfg.retriever.model
    assert manifest["store_fingerprint"] == store.fingerprint
    assert manifest["metric"] == "inner_product"
    assert manifest["nprobe"] == 1  # index.nprobe=100, capped at the one list
    assert (root / "run" / "embeddings" / "manifest.json").is_file()


def test_search_returns_hits_from_the_store(built):
    _, cfg, _, encoder = built
    r = Retriever.from_config(cfg, encoder=encoder)
    store = r.store
    target = store.get(7)
    hits = r.search(segment_input_text(target), 3)  # the segment's own text is its nearest neighbour
    assert len(hits) == 3 and isinstance(hits[0], Hit)
    assert hits[0].segment_id == 7 and hits[0].text == target.text and hits[0].title == target.title
    assert hits[0].doc_id == target.doc_id and hits[0].score == pytest.approx(1.0, abs=1e-3)
    assert hits[0].score >= hits[1].score >= hits[2].score
    batch = r.batch_search([segment_input_text(store.get(i)) for i in (1, 2, 3)], 2)
    assert [b[0].segment_id for b in batch] == [1, 2, 3]
    assert len(r.search("What is the capital of ?", 100)) == 30  # k > N gives every segment once
    with pytest.raises(UserError, match="empty"):
        r.batch_search(["ok", "  "], 1)


def test_refuses_other_encoder_and_other_store(built, tmp_path):
    root, cfg, overrides, _ = built
    other = load_config(None, [*overrides, f"retriever.model={root / 'enc2'}"])
    with pytest.raises(UserError, match="was built with encoder"):
        Retriever.from_config(other)
    # the same index next to a different store
    import shutil

    shutil.copytree(root / "run" / "index", tmp_path / "index")
    docs, questions = toy_documents(5, seed=9)
    write_toy_store(tmp_path / "store", docs, questions, tokenizer_backend(Encoder.from_config(cfg)))
    with pytest.raises(UserError, match="built over segment store"):
        Retriever.from_config(cfg, run_dir=tmp_path)


def test_live_add_remove_persist_and_reset(built):
    _, cfg, _, encoder = built
    r = Retriever.from_config(cfg, encoder=encoder)
    n = len(r.store)
    added = r.add_documents(
        [Document("extra", "Quorn", EXTRA), {"id": "extra2", "text": "Zib is the capital."}]
    )
    assert [s.segment_id for s in added] == [n, n + 1] and len(r) == n + 2
    hit = r.search(segment_input_text(added[0]), 1)[0]
    assert hit.segment_id == n and hit.doc_id == "extra" and hit.text == EXTRA
    with pytest.raises(UserError, match="already in the index"):
        r.add_documents([{"id": "extra", "text": "again"}])
    with pytest.raises(UserError, match="already in the index"):
        r.add_documents([{"id": "doc3", "text": "a built document's id"}])

    # a new Retriever (another process, a restart) replays the additions
    r2 = Retriever.from_config(cfg, encoder=encoder)
    assert len(r2) == n + 2 and r2.live_documents == ["extra", "extra2"]
    assert r2.search(segment_input_text(added[1]), 1)[0].segment_id == n + 1

    # remove a live and a built document; ids are never reused
    assert r2.remove_documents(["extra", "doc3"]) == 2
    ids = [h.segment_id for h in r2.search(EXTRA, 40)]
    assert n not in ids and 3 not in ids and len(ids) == n
    more = r2.add_documents([{"id": "extra3", "title": "Wub", "text": "Wub is a leader."}])
    assert more[0].segment_id == n + 2
    with pytest.raises(UserError, match="no such documents"):
        r2.remove_documents(["never-added"])

    r3 = Retriever.from_config(cfg, encoder=encoder)
    assert len(r3) == n + 1 and sorted(r3.live_documents) == ["extra2", "extra3"]
    assert 3 not in [h.segment_id for h in r3.search(EXTRA, 40)]

    r3.reset()
    assert len(r3) == n and not r3.live_dir.exists()
    assert Retriever.from_config(cfg, encoder=encoder).live_documents == []
    scores, ids = r3.search_vectors(encoder.encode_queries(["anything"]), 40)
    assert sorted(ids[0][ids[0] >= 0].tolist()) == list(range(n))
    assert np.all(np.diff(scores[0][:n]) <= 1e-6)


def test_ensure_index_rebuild_log_gives_the_reason_without_the_manual_advice(built, tmp_path, caplog):
    """Regression: ensure_index logged the refusal's advice ("set retriever.model=... or rebuild it with
    `python -m retriever.index`") while it was itself about to rebuild."""
    import logging
    import shutil

    root, cfg, overrides, _ = built
    shutil.copytree(root / "run" / "store", tmp_path / "store")
    shutil.copytree(root / "run" / "index", tmp_path / "index")
    other = Encoder.from_config(load_config(None, [*overrides, f"retriever.model={root / 'enc2'}"]))
    store = SegmentStore.open(tmp_path / "store")
    with caplog.at_level(logging.INFO, logger="retriever.index"):
        _, manifest = index_cli.ensure_index(
            cfg, encoder=other, store=store, run_dir=tmp_path, progress=False
        )
    assert manifest["encoder"]["fingerprint"] == other.fingerprint
    said = [r.getMessage() for r in caplog.records if "cannot be used" in r.getMessage()]
    assert len(said) == 1 and "was built with encoder" in said[0]
    assert "set retriever.model" not in said[0] and "python -m retriever.index" not in said[0]
