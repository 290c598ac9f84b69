"""The Milvus backend (`index.backend=milvus`, milvus-lite in a temp folder): exact search equal to faiss Flat,
build/add/remove/save/load, live changes through the Retriever and the retrieval service, refusal of an
index built by the other backend, and the config keys. No Milvus server is involved (there is none in CI);
a server URI goes through the same MilvusClient calls."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from common.errors import ConfigError, UserError
from configs.loader import load_config
from retriever.faiss_index import FaissIndex
from retriever.milvus_store import MilvusStore
from retriever.search import Retriever, open_retriever
from retriever.serve import create_app, serve_in_thread
from retriever.testing import build_toy_index
from retriever.vector_store import MilvusOptions, load_index_dir, read_manifest

pytestmark = pytest.mark.usefixtures("one_thread")

EXTRA = "Quorn is a new country. The capital of Quorn is Zib. Quorn is led by Wub."


def unit_vectors(n: int, dim: int = 32, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def faiss_flat(vectors: np.ndarray, ids: np.ndarray) -> FaissIndex:
    index = FaissIndex.create("Flat", vectors.shape[1], use_gpu="false")
    index.add(vectors, ids)
    return index


def test_exact_search_returns_the_ids_of_faiss_flat(tmp_path):
    x, ids = unit_vectors(400), np.arange(400, dtype=np.int64) * 3 + 7
    store = MilvusStore.create(32, MilvusOptions(), index_dir=tmp_path / "index")
    store.add(x, ids)
    manifest = store.save(tmp_path / "index", {"encoder": {}})
    assert manifest["backend"] == "milvus" and manifest["factory"] == "milvus:FLAT" and manifest["ntotal"] == 400
    assert manifest["milvus"]["uri"] == "milvus.db" and (tmp_path / "index" / "milvus.db").exists()
    queries = unit_vectors(60, seed=1)
    loaded, _ = load_index_dir(tmp_path / "index", backend="milvus", milvus=MilvusOptions())
    scores, got = loaded.search(queries, 10)
    want_scores, want = faiss_flat(x, ids).search(queries, 10)
    assert got.shape == (60, 10) and got.dtype == np.int64 and scores.dtype == np.float32
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)
    # More than the store holds: -1 ids past the end, as faiss.
    _, few = loaded.search(queries[:2], 450)
    assert (few[:, :400] >= 0).all() and (few[:, 400:] == -1).all()


def test_add_remove_save_load_round_trip(tmp_path):
    x = unit_vectors(300, seed=2)
    ids = np.arange(300, dtype=np.int64)
    index_dir = tmp_path / "index"
    build = MilvusStore.create(32, MilvusOptions(collection="rt"), index_dir=index_dir)
    build.add(x[:250], ids[:250])
    assert build.remove([3, 4, 999]) == 2  # 999 was never added
    build.save(index_dir, {"encoder": {}})
    first = read_manifest(index_dir)["milvus"]["collection"]
    store, _ = load_index_dir(index_dir, backend="milvus", milvus=MilvusOptions(collection="rt"))
    assert store.ntotal == 248
    # Live changes of an opened store: kept in this process, searched exactly, never written to Milvus.
    store.add(x[250:], ids[250:])
    assert store.remove([5, 260, 4]) == 2 and store.ntotal == 298 - 2
    reference = faiss_flat(x, ids)
    reference.remove(np.array([3, 4, 5, 260]))
    queries = unit_vectors(40, seed=3)
    np.testing.assert_array_equal(store.search(queries, 10)[1], reference.search(queries, 10)[1])
    again, _ = load_index_dir(index_dir, backend="milvus", milvus=MilvusOptions(collection="rt"))
    assert again.ntotal == 248  # the collection as built
    # Saving the changed store publishes a new build with the changes and drops the previous one.
    store.save(index_dir, {"encoder": {}})
    manifest = read_manifest(index_dir)
    assert manifest["ntotal"] == 296 and manifest["milvus"]["collection"] != first
    reopened, _ = load_index_dir(index_dir, backend="milvus", milvus=MilvusOptions(collection="rt"))
    np.testing.assert_array_equal(reopened.search(queries, 10)[1], reference.search(queries, 10)[1])
    client = reopened.client
    assert client.list_collections() == [manifest["milvus"]["collection"]]
    assert client.list_aliases()["aliases"] == ["rt"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The same toy store and tiny encoder indexed twice: faiss (default) and milvus."""
    roots = {b: tmp_path_factory.mktemp(f"toy_{b}") for b in ("faiss", "milvus")}
    built = {
        b: build_toy_index(roots[b], extra_texts=(EXTRA,), overrides=(f"index.backend={b}",)) for b in roots
    }
    return roots, built


def test_retriever_over_milvus_matches_faiss_and_keeps_live_changes(toy):
    roots, built = toy
    manifest = json.loads((roots["milvus"] / "run" / "index" / "manifest.json").read_text())
    assert manifest["backend"] == "milvus" and manifest["ntotal"] == 30
    assert not (roots["milvus"] / "run" / "index" / "index.faiss").exists()
    cfg_m, _, enc_m, _, questions = built["milvus"]
    cfg_f, _, enc_f, _, _ = built["faiss"]
    milvus = Retriever.from_config(cfg_m, encoder=enc_m)
    faiss_r = Retriever.from_config(cfg_f, encoder=enc_f)
    asked = [q for _, q, _ in questions[:30]]
    got = [[h.segment_id for h in hits] for hits in milvus.batch_search(asked, 5)]
    want = [[h.segment_id for h in hits] for hits in faiss_r.batch_search(asked, 5)]
    assert got == want
    # Live additions and removals persist in run_dir/live and are replayed by the next process.
    new = milvus.add_documents([{"id": "quorn", "title": "Quorn", "text": EXTRA}])
    assert milvus.search("Quorn. " + EXTRA, 1)[0].segment_id == new[0].segment_id
    assert milvus.remove_documents(["doc3"]) == 1 and len(milvus) == 30
    reopened = Retriever.from_config(cfg_m, encoder=enc_m)
    assert len(reopened) == 30 and reopened.live_documents == ["quorn"]
    assert "doc3" not in {h.doc_id for h in reopened.search(asked[9], 30)}
    reopened.reset()
    assert len(reopened) == 30 and reopened.live_changes == 0
    assert "quorn" not in {h.doc_id for h in reopened.search(EXTRA, 31)}


def test_open_retriever_and_the_retrieval_service_over_milvus(toy):
    roots, built = toy
    cfg, _, encoder, _, questions = built["milvus"]
    retriever = open_retriever(cfg, encoder=encoder)  # what qa.train, eval.run, qa.answer and app.py call
    assert isinstance(retriever, Retriever) and retriever.index.backend == "milvus"
    with serve_in_thread(create_app(retriever, cfg.serve)) as url:
        req = urllib.request.Request(
            url + "/search", data=json.dumps({"question": questions[0][1], "top_k": 3}).encode(), method="POST"
        )
        req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=30) as resp:
            hits = json.loads(resp.read())["hits"]
        with urllib.request.urlopen(url + "/stats", timeout=30) as resp:
            stats = json.loads(resp.read())
    assert [h["id"] for h in hits] == [h.segment_id for h in retriever.search(questions[0][1], 3)]
    assert stats["index"]["factory"] == "milvus:FLAT" and stats["segments"] == 30


def test_an_index_of_the_other_backend_is_refused(toy):
    roots, built = toy
    for built_by, asked in (("faiss", "milvus"), ("milvus", "faiss")):
        _, overrides, encoder, _, _ = built[built_by]
        cfg = load_config(None, [*overrides, f"index.backend={asked}"])
        with pytest.raises(UserError, match=f"built with index.backend={built_by}.*index.backend={asked}"):
            Retriever.from_config(cfg, encoder=encoder)
    # Nothing was rewritten by the refusals.
    assert (roots["faiss"] / "run" / "index" / "index.faiss").is_file()
    assert read_manifest(roots["milvus"] / "run" / "index")["backend"] == "milvus"


def test_a_collection_missing_from_the_uri_is_refused(toy, tmp_path):
    _, built = toy
    _, overrides, encoder, _, _ = built["milvus"]
    cfg = load_config(None, [*overrides, "index.backend=milvus", f"index.milvus_uri={tmp_path / 'other.db'}"])
    with pytest.raises(UserError, match="not in Milvus at .*other.db.*set index.milvus_uri"):
        Retriever.from_config(cfg, encoder=encoder)


@pytest.mark.parametrize(
    "override, message",
    [
        ("index.backend=chroma", "`index.backend` must be one of faiss, milvus"),
        ("index.milvus_uri=localhost:19530", "index.milvus_uri must be a server URI"),
        ("index.milvus_collection=my-index", "index.milvus_collection must be a Milvus name"),
        ("index.milvus_index_type=DISKANN", "`index.milvus_index_type` must be one of FLAT, IVF_FLAT, HNSW"),
    ],
)
def test_config_refuses_unknown_backends_and_bad_milvus_keys(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])
    cfg = load_config(None, ["index.backend=milvus", "index.milvus_uri=http://milvus.example:19530"])
    assert cfg.index.backend == "milvus" and cfg.index.milvus_index_type == "FLAT"


def test_an_unreachable_server_is_a_clear_error(tmp_path):
    options = MilvusOptions(uri="http://127.0.0.1:9", timeout=1.0)
    with pytest.raises(UserError, match="cannot reach the Milvus server at index.milvus_uri=http://127.0.0.1:9"):
        MilvusStore.create(8, options, index_dir=Path(tmp_path))


def test_a_milvus_lite_file_open_in_another_process_is_a_clear_error(tmp_path):
    """milvus-lite locks its .db for one process; a second one gets a UserError saying what to do."""
    import subprocess
    import sys

    store = MilvusStore.create(4, MilvusOptions(), index_dir=tmp_path)
    store.add(np.eye(4, dtype=np.float32), np.arange(4))
    store.save(tmp_path, {})
    code = (
        "from common.errors import UserError\nfrom retriever.vector_store import load_index_dir\n"
        f"try:\n    load_index_dir({str(tmp_path)!r}, backend='milvus')\n"
        "except UserError as e:\n    print('refused:', e)\n"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=120).stdout
    assert "refused: cannot open the milvus-lite file" in out and "one process" in out
