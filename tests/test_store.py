"""The segment store: round trip, manifest, memory-mapped random access, atomicity, corrupt stores."""

from __future__ import annotations

import json

import numpy as np
import pytest

from common.errors import UserError
from data_prep.records import QAExample, Segment
from data_prep.store import (
    MANIFEST_FILE,
    SEGMENTS_FILE,
    SegmentStore,
    StoreWriter,
    load_qa,
    segment_input_text,
    write_store,
)


def make_segments(n: int, per_doc: int = 3) -> list[Segment]:
    segs = []
    for i in range(n):
        doc = i // per_doc
        k = i % per_doc
        text = f"segment {i} of doc {doc} — ünïcode ✓"
        segs.append(
            Segment(i, f"doc-{doc}", f"Title {doc}", text, 10 * k, 10 * k + len(text), 5 * k, 5 * k + 7)
        )
    return segs


def make_qa() -> list[QAExample]:
    return [
        QAExample("q0", "who?", ["a"], "doc-0", "Title 0", [0, 1], "train"),
        QAExample("q1", "what?", ["b", "c"], "doc-1", "Title 1", [], "test", relation="r.x"),
        QAExample("q2", "when?", ["d"], "doc-2", "Title 2", [7], "dev"),
    ]


def test_round_trip_and_random_access(tmp_path):
    segs = make_segments(1000)
    out = write_store(tmp_path / "store", segs, make_qa(), {"source": {"kind": "test"}}, batch_rows=64)
    store = SegmentStore.open(out)
    assert len(store) == 1000
    assert store.get(0) == segs[0]
    assert store.get(999) == segs[999]
    ids = [999, 0, 64, 63, 65, 500, 500, 128]
    assert store.get_many(ids) == [segs[i] for i in ids]
    assert store.get_many(np.array([5, 3], dtype=np.int32)) == [segs[5], segs[3]]
    assert store.get_many([]) == []
    with pytest.raises(IndexError):
        store.get(1000)
    with pytest.raises(IndexError):
        store.get_many([1, -1])
    assert store.texts(60, 200) == [s.text for s in segs[60:200]]  # spans three record batches
    assert store.texts(990, 1000) == [s.text for s in segs[990:]] and store.texts(5, 5) == []
    with pytest.raises(IndexError):
        store.texts(999, 1001)
    np.testing.assert_array_equal(store.segment_ids(), np.arange(1000))
    assert store.segment_ids().dtype == np.int64
    assert store.column("doc_id").to_pylist()[:4] == ["doc-0", "doc-0", "doc-0", "doc-1"]


def test_iter_batches_streams_in_order(tmp_path):
    segs = make_segments(250)
    store = SegmentStore.open(write_store(tmp_path / "s", segs, batch_rows=64))
    batches = list(store.iter_batches(100))
    assert [len(b) for b in batches] == [100, 100, 50]
    assert [s for b in batches for s in b] == segs
    assert [len(b) for b in store.iter_batches(1000)] == [250]


def test_manifest_counts_and_fingerprints(tmp_path):
    segs = make_segments(30)
    extra = {"source": {"corpus": "x.jsonl"}, "window": 288, "counts": {"skipped_empty": 2}}
    store = SegmentStore.open(write_store(tmp_path / "a", segs, make_qa(), extra))
    m = store.manifest
    assert m["window"] == 288 and m["source"] == {"corpus": "x.jsonl"}
    assert m["counts"]["segments"] == 30
    assert m["counts"]["documents"] == 10
    assert m["counts"]["skipped_empty"] == 2
    assert m["counts"]["qa_per_split"] == {"train": 1, "dev": 1, "test": 1}
    assert m["counts"]["qa_without_gold_segment"] == 1
    assert m["format_version"] == 1 and "created" in m
    # Same segments, other QA: same segment fingerprint, other QA fingerprint.
    other = SegmentStore.open(write_store(tmp_path / "b", segs, make_qa()[:1]))
    assert other.fingerprint == store.fingerprint
    assert other.qa_fingerprint != store.qa_fingerprint
    # One character of one segment changed: other fingerprint.
    changed = list(segs)
    changed[7] = Segment(**{**changed[7].__dict__, "text": changed[7].text + "!"})
    assert SegmentStore.open(write_store(tmp_path / "c", changed)).fingerprint != store.fingerprint


def test_load_qa_filters_by_split(tmp_path):
    out = write_store(tmp_path / "s", make_segments(9), make_qa())
    assert [q.id for q in load_qa(out, "all")] == ["q0", "q1", "q2"]
    assert [q.id for q in load_qa(out, "test")] == ["q1"]
    (q1,) = load_qa(out, "test")
    assert q1.answers == ["b", "c"] and q1.relation == "r.x" and q1.gold_doc_id == "doc-1"
    assert load_qa(out, "train")[0].gold_segment_ids == [0, 1]
    with pytest.raises(UserError, match="unknown split"):
        load_qa(out, "validation")
    with pytest.raises(UserError, match="no segment store"):
        load_qa(tmp_path / "nope", "all")


def test_segment_input_text_joins_title_and_text():
    seg = Segment(0, "d", "Paris", "is a city.", 0, 10, 0, 3)
    assert segment_input_text(seg) == "Paris\nis a city."


def test_crash_leaves_no_store_and_keeps_the_old_one(tmp_path):
    out = tmp_path / "store"
    with pytest.raises(RuntimeError, match="boom"), StoreWriter(out) as w:
        w.add_many(make_segments(10))
        raise RuntimeError("boom")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # the temp directory is gone too
    write_store(out, make_segments(10))
    old_fp = SegmentStore.open(out).fingerprint
    with pytest.raises(RuntimeError, match="boom"), StoreWriter(out) as w:
        w.add_many(make_segments(20))
        raise RuntimeError("boom")
    store = SegmentStore.open(out)
    assert len(store) == 10 and store.fingerprint == old_fp
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def test_writer_rejects_bad_ids_and_qa(tmp_path):
    segs = make_segments(3)
    with pytest.raises(ValueError, match="0..N-1"), StoreWriter(tmp_path / "a") as w:
        w.add(segs[1])
    with pytest.raises(ValueError, match="split"), StoreWriter(tmp_path / "b") as w:
        w.add_qa([QAExample("q", "?", ["a"])])
    with pytest.raises(ValueError, match="duplicate QA id"), StoreWriter(tmp_path / "c") as w:
        w.add_qa([make_qa()[0], make_qa()[0]])
    assert not any((tmp_path / n).exists() for n in "abc")


def test_missing_or_corrupt_store_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no segment store"):
        SegmentStore.open(tmp_path / "missing")
    out = write_store(tmp_path / "s", make_segments(50), batch_rows=16)
    # A directory without its manifest (e.g. a foreign half-copied store) does not load.
    manifest = (out / MANIFEST_FILE).read_text()
    (out / MANIFEST_FILE).unlink()
    with pytest.raises(UserError, match="no manifest"):
        SegmentStore.open(out)
    (out / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(UserError, match="corrupt manifest"):
        SegmentStore.open(out)
    (out / MANIFEST_FILE).write_text(manifest)
    data = (out / SEGMENTS_FILE).read_bytes()
    (out / SEGMENTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="segments.arrow: sha256 does not match"):
        SegmentStore.open(out)
    (out / SEGMENTS_FILE).write_bytes(data)
    m = json.loads(manifest)
    m["counts"]["segments"] = 49
    (out / MANIFEST_FILE).write_text(json.dumps(m))
    with pytest.raises(UserError, match="manifest says 49"):
        SegmentStore.open(out)
    m["format_version"] = 99
    (out / MANIFEST_FILE).write_text(json.dumps(m))
    with pytest.raises(UserError, match="format version"):
        SegmentStore.open(out)


def test_empty_store(tmp_path):
    store = SegmentStore.open(write_store(tmp_path / "s", []))
    assert len(store) == 0
    assert store.segment_ids().shape == (0,)
    assert list(store.iter_batches(8)) == []
