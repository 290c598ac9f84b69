"""The faiss wrapper and the index directory: round trip, refusal of mismatches, live add/remove."""

from __future__ import annotations

import json

import numpy as np
import pytest

from common.errors import UserError
from retriever.faiss_index import (
    AUTO_COMPRESSED_FROM,
    AUTO_NPROBE_SCAN,
    FaissIndex,
    auto_nprobe,
    default_nlist,
    expand_factory,
    load_index_dir,
    read_manifest,
    resolve_factory,
    save_index_dir,
)


def _unit(rng, n, d=16):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return _unit(rng, 2000), _unit(rng, 20)


def _ivf(vectors, ids=None, nlist=16):
    index = FaissIndex.create(expand_factory("IVF{nlist},Flat", nlist), vectors.shape[1], use_gpu="false")
    index.train(vectors)
    index.add(vectors, np.arange(len(vectors)) if ids is None else ids)
    return index


def test_default_nlist_rule():
    assert default_nlist(10) == 1  # too few points for more than one centroid
    assert default_nlist(39 * 5) == 5  # capped by 39 training points per centroid
    assert default_nlist(10_000) == 256  # 10_000 // 39 = 256 < 4·√N = 400
    assert default_nlist(1_000_000) == 4000  # 4·√N
    assert expand_factory("IVF{nlist},PQ48", 181) == "IVF181,PQ48"
    assert expand_factory("Flat", 181) == "Flat"


def test_auto_nprobe_rule():
    assert auto_nprobe(64, 2528) == 64  # a small corpus: every list
    assert auto_nprobe(4000, 1_000_000) == 80  # 250 per list: 80 lists scan 20k vectors
    assert auto_nprobe(12_649, 10_000_000) == 26  # ceil(20_000 / 790.6)
    assert auto_nprobe(4000, 100_000_000) == 16  # never fewer than 16 lists
    assert auto_nprobe(8, 0) == 8
    assert auto_nprobe(0, 1000) == 0  # not an IVF index


def test_auto_nprobe_searches_every_list_of_a_small_index(data):
    """index.nprobe=0 (the default) on a corpus far below AUTO_NPROBE_SCAN gives exact results; a fixed
    nprobe 1 does not (so the test sees the difference)."""
    x, q = data
    assert len(x) < AUTO_NPROBE_SCAN
    index = _ivf(x, nlist=32)
    assert index.resolve_nprobe(0) == 32
    assert index.resolve_nprobe(100) == 32  # capped at nlist
    assert index.resolve_nprobe(3) == 3
    exact = np.argsort(-(q @ x.T), axis=1)[:, :10]
    _, auto = index.search(q, 10, nprobe=0)
    np.testing.assert_array_equal(auto, exact)
    _, one = index.search(q, 10, nprobe=1)
    assert (one != exact).any()
    with pytest.raises(UserError, match="index.nprobe must be >= 0"):
        index.search(q, 10, nprobe=-1)
    flat = FaissIndex.create("Flat", x.shape[1], use_gpu="false")
    flat.add(x, np.arange(len(x)))
    assert flat.resolve_nprobe(0) == 0
    np.testing.assert_array_equal(flat.search(q, 10, nprobe=0)[1], exact)


def test_flat_is_exact_and_ids_are_kept(data):
    x, q = data
    ids = np.arange(len(x)) * 3 + 7  # arbitrary int64 ids
    index = FaissIndex.create("Flat", x.shape[1], use_gpu="false")
    index.add(x, ids)
    scores, got = index.search(q, 5)
    exact = np.argsort(-(q @ x.T), axis=1)[:, :5]
    np.testing.assert_array_equal(got, ids[exact])
    np.testing.assert_allclose(scores, np.take_along_axis(q @ x.T, exact, 1), rtol=1e-5)


def test_round_trip(tmp_path, data):
    x, q = data
    index = _ivf(x)
    before = index.search(q, 10, nprobe=4)
    saved = save_index_dir(
        tmp_path / "index",
        index,
        {"encoder": {"name": "enc", "fingerprint": "f1"}, "store_fingerprint": "s1", "nprobe": 4},
    )
    assert {"sha256", "ntotal", "dim", "nlist", "factory", "metric"} <= set(saved)
    assert saved["ntotal"] == 2000 and saved["nlist"] == 16 and saved["factory"] == "IVF16,Flat"
    loaded, manifest = load_index_dir(
        tmp_path / "index", encoder_fingerprint="f1", dim=16, store_fingerprint="s1", use_gpu="false"
    )
    assert manifest == read_manifest(tmp_path / "index") == saved
    after = loaded.search(q, 10, nprobe=4)
    np.testing.assert_array_equal(before[1], after[1])
    np.testing.assert_allclose(before[0], after[0])
    # nprobe comes from the manifest when the caller does not set it
    np.testing.assert_array_equal(loaded.search(q, 10)[1], after[1])


def test_refuses_mismatched_manifest(tmp_path, data):
    x, _ = data
    save_index_dir(
        tmp_path / "index",
        _ivf(x),
        {"encoder": {"name": "minilm", "fingerprint": "f1"}, "store_fingerprint": "s1", "nprobe": 4},
    )
    with pytest.raises(UserError, match=r"built with encoder `minilm`.*retriever.model="):
        load_index_dir(tmp_path / "index", encoder_fingerprint="other", encoder_name="tuned")
    with pytest.raises(UserError, match="16-d vectors but the encoder makes 384-d"):
        load_index_dir(tmp_path / "index", encoder_fingerprint="f1", dim=384)
    with pytest.raises(UserError, match="segment store s1"):
        load_index_dir(tmp_path / "index", encoder_fingerprint="f1", dim=16, store_fingerprint="s2")
    # a replaced index file no longer matches the recorded sha256
    path = tmp_path / "index" / "index.faiss"
    _ivf(x[:500]).write(path)
    with pytest.raises(UserError, match="sha256 does not match"):
        load_index_dir(tmp_path / "index")
    # ...and when its manifest is patched to the new hash, ntotal still gives it away
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    from common.atomic import sha256_file

    manifest["sha256"] = sha256_file(path)
    (tmp_path / "index" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="holds 500 × 16 vectors, the manifest says 2000"):
        load_index_dir(tmp_path / "index")
    with pytest.raises(UserError, match="no index at"):
        load_index_dir(tmp_path / "missing")


@pytest.mark.parametrize("factory", ["IVF{nlist},Flat", "Flat", "IVF{nlist}_HNSW16,Flat"])
def test_add_and_remove_live(factory, data):
    x, _ = data
    index = FaissIndex.create(expand_factory(factory, 8), 16, use_gpu="false")
    index.train(x)
    index.add(x[:1000], np.arange(1000))
    # remove: the removed vector no longer comes back for its own query
    assert index.remove([3, 4, 999999]) == 2
    assert index.ntotal == 998
    _, ids = index.search(x[[3, 4, 5]], 3, nprobe=8)
    assert 3 not in ids and 4 not in ids and ids[2, 0] == 5
    # add with new ids after the current maximum: found with their own query
    new_ids = np.array([5000, 5001])
    index.add(x[1000:1002], new_ids)
    _, ids = index.search(x[1000:1002], 1, nprobe=8)
    assert ids[:, 0].tolist() == [5000, 5001]
    assert index.ntotal == 1000


def test_remove_unsupported_and_bad_factory():
    index = FaissIndex.create("HNSW8", 8, use_gpu="false")
    index.add(np.eye(8, dtype=np.float32), np.arange(8))
    with pytest.raises(UserError, match="an HNSW graph cannot remove vectors"):
        index.remove([1])
    with pytest.raises(UserError, match="not a valid faiss factory"):
        FaissIndex.create("IVFnope,Flat", 8)
    with pytest.raises(UserError, match="faiss sees no GPU"):
        FaissIndex.create("Flat", 8, use_gpu="true")


def _recall(got, truth):
    return float(np.mean([len(set(a) & set(b)) / truth.shape[1] for a, b in zip(got, truth)]))


def test_hnsw_ef_search_is_applied_and_automatic(tmp_path, data):
    x, q = data
    ids = np.arange(len(x)) * 7 + 3  # the store's ids, not positions
    exact = FaissIndex.create("Flat", 16, use_gpu="false")
    exact.add(x, ids)
    _, truth = exact.search(q, 10)
    index = FaissIndex.create("HNSW8,Flat", 16, use_gpu="false")
    assert index.has_hnsw and not index.has_refine and index.nlist == 0
    index.add(x, ids)
    # 0 = automatic: max(64, 2k), never below k; an explicit value is kept
    assert index.resolve_ef_search(0, 10) == 64 and index.resolve_ef_search(0, 50) == 100
    assert index.resolve_ef_search(8, 10) == 10 and index.search_settings(10) == {"ef_search": 64}
    _, low = index.search(q, 10, ef_search=10)
    assert _hnsw_ef(index) == 10
    _, high = index.search(q, 10)  # the index's own setting (0, automatic) when the call gives none
    assert _hnsw_ef(index) == 64
    assert set(high.ravel()) <= set(ids) and _recall(high, truth) >= _recall(low, truth)
    assert _recall(high, truth) > 0.9
    with pytest.raises(UserError, match="hnsw_ef_search must be >= 0"):
        index.search(q, 10, ef_search=-1)
    # the configured value travels with load (index.hnsw_ef_search), not in the file
    save_index_dir(
        tmp_path / "index", index, {"encoder": {"name": "enc", "fingerprint": "f"}, "store_fingerprint": "s"}
    )
    loaded, _ = load_index_dir(tmp_path / "index", use_gpu="false", hnsw_ef_search=200)
    assert loaded.ef_search == 200
    loaded.search(q[:1], 10)
    assert _hnsw_ef(loaded) == 200


def _hnsw_ef(index):
    import faiss

    inner = faiss.downcast_index(index.cpu_index)
    inner = faiss.downcast_index(inner.index) if isinstance(inner, faiss.IndexIDMap2) else inner
    if isinstance(inner, faiss.IndexHNSW):
        return inner.hnsw.efSearch
    return faiss.downcast_index(faiss.extract_index_ivf(inner).quantizer).hnsw.efSearch


def test_ivf_with_hnsw_quantizer_sets_nprobe_and_quantizer_ef(data):
    x, q = data
    index = FaissIndex.create("IVF32_HNSW8,Flat", 16, use_gpu="false")
    assert index.has_hnsw and index.nlist == 32
    index.train(x)
    index.add(x, np.arange(len(x)))
    index.search(q, 5, nprobe=32, ef_search=100)
    assert _hnsw_ef(index) == 100 and faiss_ivf(index).nprobe == 32
    assert index.search_settings(5, nprobe=4) == {"nprobe": 4, "ef_search": 64}


def faiss_ivf(index):
    import faiss

    return faiss.extract_index_ivf(index.cpu_index)


def test_refine_reranks_with_exact_vectors_under_store_ids(data):
    x, q = data
    ids = np.arange(len(x)) + 1000
    exact = FaissIndex.create("Flat", 16, use_gpu="false")
    exact.add(x, ids)
    truth_scores, truth = exact.search(q, 10)
    index = FaissIndex.create("IVF8,PQ4x4fs,RFlat", 16, use_gpu="false", k_factor=1)
    assert index.has_refine and not index.has_hnsw and index.nlist == 8
    index.train(x)
    index.add(x, ids)
    _, plain = index.search(q, 10, nprobe=8)  # k_factor 1: the 4-bit PQ order, 2 bytes a vector
    scores, deep = index.search(q, 10, nprobe=8, k_factor=50)  # 500 candidates re-scored exactly
    assert set(deep.ravel()) <= set(ids)
    assert _recall(deep, truth) > 0.95 > _recall(plain, truth)
    np.testing.assert_allclose(scores[:, 0], truth_scores[:, 0], rtol=1e-5)  # exact scores after re-ranking
    assert index.resolve_k_factor(0) == 32.0 and index.search_settings(10, nprobe=0)["k_factor"] == 1.0
    with pytest.raises(UserError, match="Refine"):
        index.remove([1000])
    with pytest.raises(UserError, match="refine_k_factor"):
        index.search(q, 10, k_factor=0.5)


@pytest.mark.parametrize(
    ("factory", "auto"),
    [("IVF8,PQ16x4fs,RFlat", 32.0), ("IVF8,SQ4,Refine(Flat)", 8.0), ("IVF8,SQ8,Refine(Flat)", 4.0)],
)
def test_automatic_k_factor_follows_the_compressed_stage(data, factory, auto):
    x, _ = data
    index = FaissIndex.create(factory, 16, use_gpu="false")
    index.train(x)
    assert index.resolve_k_factor(0) == auto and index.resolve_k_factor(3) == 3.0


def test_auto_factory_is_ivfflat_below_a_million_and_fast_scan_pq_from_there():
    assert resolve_factory("auto", AUTO_COMPRESSED_FROM - 1, 384) == "IVF{nlist},Flat"
    assert resolve_factory("auto", AUTO_COMPRESSED_FROM, 384) == "IVF{nlist},PQ384x4fs,RFlat"
    assert resolve_factory("auto", AUTO_COMPRESSED_FROM, 7) == "IVF{nlist},Flat"  # PQ needs an even dim here
    assert resolve_factory("IVF{nlist},SQ8", AUTO_COMPRESSED_FROM, 384) == "IVF{nlist},SQ8"  # explicit wins


class _InMemoryEmbeddings:
    """What `index_embeddings` reads of an embedding directory, over an in-memory matrix."""

    def __init__(self, vectors):
        self.vectors, self.n, self.dim = vectors, len(vectors), vectors.shape[1]

    def sample(self, size, seed=0):
        return self.vectors[:size]

    def iter_chunks(self, rows=65536):
        for off in range(0, self.n, rows):
            yield np.arange(off, min(off + rows, self.n)), self.vectors[off : off + rows]


def test_auto_factory_builds_the_compressed_index_above_its_threshold(data, monkeypatch):
    """`index_embeddings` resolves `auto` by corpus size; the threshold is lowered so 2,000 vectors cross it."""
    import retriever.faiss_index as faiss_index
    from retriever.index import index_embeddings

    x, q = data
    small = index_embeddings(_InMemoryEmbeddings(x), factory="auto", use_gpu="false")
    monkeypatch.setattr(faiss_index, "AUTO_COMPRESSED_FROM", 1000)
    large = index_embeddings(_InMemoryEmbeddings(x), factory="auto", use_gpu="false")
    assert small.factory.endswith(",Flat") and not small.has_refine
    assert large.factory.endswith(",PQ16x4fs,RFlat") and large.has_refine
    assert large.resolve_k_factor(0) == 32.0
    exact = np.argsort(-(q @ x.T), axis=1)[:, :10]
    _, got = large.search(q, 10, nprobe=large.nlist)
    assert _recall(got, exact) > 0.95


def test_search_pads_missing_with_minus_one(data):
    x, q = data
    index = FaissIndex.create("Flat", 16, use_gpu="false")
    index.add(x[:3], np.array([10, 11, 12]))
    scores, ids = index.search(q[:2], 5)
    assert ids.shape == (2, 5) and (ids[:, 3:] == -1).all() and set(ids[0, :3]) == {10, 11, 12}
