"""BM25 and its fusion with the dense search (`retriever.hybrid.*`): the BM25 formula on hand-built
documents, save/load and refusal of a corrupt or stale index, the two fusions, and a Retriever whose
hybrid search finds by name what a random encoder cannot."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from common.answers import AnswerMatcher
from common.errors import UserError
from configs.loader import load_config
from data_prep.store import SegmentStore, segment_input_text
from qa.retrieval_cache import retrieval_fingerprint
from retriever.bm25 import BM25Index, open_store_bm25, tokenize, top_k_rows
from retriever.hybrid import fuse
from retriever.search import Retriever
from retriever.testing import build_toy_index

DOCS = [
    "the cat sat on the mat",
    "the dog chased the cat around the garden",
    "Zanzibar exports cloves",
    "",
]

pytestmark = pytest.mark.usefixtures("one_thread")


def hand_bm25(query: str, docs: list[str], i: int, k1: float, b: float, avgdl: float | None = None) -> float:
    """Okapi BM25 with Lucene's idf, written out term by term (avgdl: the corpus mean unless given)."""
    toks = [d.lower().split() for d in docs]
    avgdl = avgdl or sum(map(len, toks)) / len(toks)
    total = 0.0
    for term in query.lower().split():
        df = sum(term in t for t in toks)
        idf = math.log(1 + (len(docs) - df + 0.5) / (df + 0.5))
        tf = toks[i].count(term)
        total += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len(toks[i]) / avgdl))
    return total


def test_tokenize_lowercases_words_and_digits():
    assert tokenize("Who won in 1998, Zoë?") == ["who", "won", "in", "1998", "zoë"]


@pytest.mark.parametrize("k1,b", [(0.9, 0.4), (1.2, 0.75), (1.5, 0.0)])
def test_bm25_scores_match_the_formula(k1, b):
    index = BM25Index.build(DOCS, k1=k1, b=b)
    query = "cat garden"
    ((block_start, block),) = list(index.score_blocks([query]))
    assert block_start == 0 and block.shape == (1, len(DOCS))
    for i in range(len(DOCS)):
        assert block[0, i] == pytest.approx(hand_bm25(query, DOCS, i, k1, b), rel=1e-5)


def test_bm25_search_ranks_rare_terms_and_skips_unmatched():
    index = BM25Index.build(DOCS)
    scores, ids = index.search(["cat garden", "zanzibar", "unknownword"], 3)
    assert ids[0].tolist() == [1, 0, -1]  # garden is rarer than cat; docs 2 and 3 share nothing
    assert scores[0, 0] > scores[0, 1] > 0 and scores[0, 2] == -np.inf
    assert ids[1].tolist() == [2, -1, -1]
    assert ids[2].tolist() == [-1, -1, -1]


def test_bm25_scores_live_documents_as_if_indexed():
    index = BM25Index.build(DOCS, k1=1.2, b=0.75)
    base_avgdl = sum(len(d.split()) for d in DOCS) / len(DOCS)
    extra = ["a cat from zanzibar", "garden garden gnomes"]
    queries = ["cat garden", "zanzibar gnomes", "nothing shared"]
    got = index.score_extra(queries, [Counter(tokenize(t)) for t in extra])
    assert got.shape == (3, 2)
    for i, q in enumerate(queries):
        for j in range(len(extra)):
            # N and df count the extra documents; lengths are normalised by the built index's avgdl
            want = hand_bm25(q, DOCS + extra, len(DOCS) + j, 1.2, 0.75, avgdl=base_avgdl)
            assert got[i, j] == pytest.approx(want, rel=1e-5)
    assert got[2].tolist() == [0.0, 0.0]
    assert index.score_extra(queries, []).shape == (3, 0)


def test_top_k_rows_orders_and_pads():
    s, i = top_k_rows(np.array([[0.0, 3.0, 1.0, 2.0]], dtype=np.float32), 6)
    assert i.tolist() == [[1, 3, 2, -1, -1, -1]]
    assert s[0, :3].tolist() == [3.0, 2.0, 1.0] and np.isinf(s[0, 3:]).all()


def test_bm25_save_load_round_trip_and_corruption(tmp_path):
    index = BM25Index.build(DOCS, k1=1.1, b=0.6, meta={"store_fingerprint": "abc"})
    index.save(tmp_path / "bm25")
    again = BM25Index.load(tmp_path / "bm25")
    assert (again.k1, again.b, again.meta["store_fingerprint"]) == (1.1, 0.6, "abc")
    queries = ["cat mat", "dog", "cloves zanzibar"]
    for a, b in zip(index.search(queries, 4), again.search(queries, 4)):
        np.testing.assert_array_equal(a, b)
    (tmp_path / "bm25" / "vocab.json").write_text('["tampered"]')
    with pytest.raises(UserError, match="checksum"):
        BM25Index.load(tmp_path / "bm25")
    with pytest.raises(UserError, match="no BM25 index"):
        BM25Index.load(tmp_path / "missing")


def test_bm25_rejects_bad_parameters():
    with pytest.raises(UserError, match="k1"):
        BM25Index.build(DOCS, b=1.5)


def test_fuse_linear_extremes_and_missing_dense():
    dense = np.array([0.9, 0.5, np.nan])  # the third candidate came from BM25 only
    bm25 = np.array([0.0, 2.0, 8.0])
    assert np.argsort(-fuse(dense, bm25, 0.0), kind="stable").tolist() == [0, 1, 2]
    assert np.argsort(-fuse(dense, bm25, 1.0), kind="stable").tolist() == [2, 1, 0]
    # missing dense = the lowest dense score (0.5) → normalised 0; bm25 normalised 0, 0.25, 1
    np.testing.assert_allclose(fuse(dense, bm25, 0.5), [0.5, 0.125, 0.5])


def test_fuse_rrf_by_hand():
    dense = np.array([0.9, 0.5, np.nan])
    bm25 = np.array([0.0, 2.0, 8.0])
    got = fuse(dense, bm25, 0.25, "rrf")
    want = [0.75 / 61, 0.75 / 62 + 0.25 / 62, 0.25 / 61]
    np.testing.assert_allclose(got, want)


def test_fuse_rejects_bad_weight_and_method():
    with pytest.raises(UserError, match="weight"):
        fuse(np.zeros(1), np.zeros(1), 1.5)
    with pytest.raises(UserError, match="fusion"):
        fuse(np.zeros(1), np.zeros(1), 0.5, "max")


# ---------------------------------------------------------------------------------------------- Retriever


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("hybrid")
    _, overrides, encoder, _, questions = build_toy_index(root)
    return root, overrides, encoder, questions


def open_retriever(built, *extra) -> Retriever:
    _, overrides, encoder, _ = built
    return Retriever.from_config(load_config(None, [*overrides, *extra]), encoder=encoder)


def test_hybrid_finds_by_name_what_a_random_encoder_misses(built):
    _, _, _, questions = built
    dense = open_retriever(built)
    bm25 = open_retriever(built, "retriever.hybrid.enabled=true", "retriever.hybrid.weight=1.0")
    store = dense.store
    doc_of_question = [doc_id for doc_id, _, _ in questions]
    qs = [q for _, q, _ in questions]

    def top1(r):
        return np.mean([hits[0].doc_id == d for hits, d in zip(r.batch_search(qs, 1), doc_of_question)])

    # every question names its country, which only that country's segment contains
    assert top1(bm25) == 1.0 and top1(dense) < 0.5
    assert (built[0] / "run" / "bm25" / "manifest.json").is_file()
    assert bm25.search(qs[0], 3)[0].title == store.get(bm25.search(qs[0], 3)[0].segment_id).title


def test_hybrid_weight_zero_keeps_the_dense_ranking(built):
    dense = open_retriever(built)
    zero = open_retriever(built, "retriever.hybrid.enabled=true", "retriever.hybrid.weight=0")
    qs = [segment_input_text(dense.store.get(i)) for i in range(0, 30, 7)] + ["Who leads Kalo?"]
    for a, b in zip(dense.batch_search(qs, 5), zero.batch_search(qs, 5)):
        assert [h.segment_id for h in a] == [h.segment_id for h in b]


def test_hybrid_never_returns_removed_segments(built):
    r = open_retriever(built, "retriever.hybrid.enabled=true", "retriever.hybrid.weight=1.0")
    target = r.store.get(4)
    try:
        r.remove_segments([4])
        hits = r.search(segment_input_text(target), 30)
        assert 4 not in {h.segment_id for h in hits} and len(hits) == 29
    finally:
        r.reset()


def test_hybrid_finds_a_document_added_live_by_its_words(built):
    """Regression: live additions had no BM25 entry, so a lexical match on them scored 0 and lost."""
    from data_prep.records import Document

    r = open_retriever(built, "retriever.hybrid.enabled=true", "retriever.hybrid.weight=1.0")
    try:
        (seg,) = r.add_documents([Document("live-1", "Quorvex", "Quorvex is a small country led by Amira.")])
        question = "Which small country is led by Amira?"  # every built segment shares words with it too
        hits = r.search(question, 3)
        assert hits[0].segment_id == seg.segment_id and hits[0].doc_id == "live-1"
        r.remove_documents(["live-1"])
        assert "live-1" not in {h.doc_id for h in r.search(question, 30)}
    finally:
        r.reset()


def test_hybrid_settings_change_the_retrieval_cache_key(built):
    dense = open_retriever(built)
    on = open_retriever(built, "retriever.hybrid.enabled=true")
    heavier = open_retriever(built, "retriever.hybrid.enabled=true", "retriever.hybrid.weight=0.6")
    keys = {retrieval_fingerprint(r, 5, ["q0"]) for r in (dense, on, heavier)}
    assert len(keys) == 3
    assert dense.search_settings == {"nprobe": dense.nprobe}  # dense-only keys are unchanged


def test_stale_bm25_index_is_rebuilt(built, tmp_path):
    root = built[0]
    store = SegmentStore.open(root / "run" / "store")
    first = open_store_bm25(tmp_path / "bm25", store, k1=0.9, b=0.4, progress=False)
    assert first.n_docs == len(store)
    other = open_store_bm25(tmp_path / "bm25", store, k1=1.2, b=0.75, progress=False)
    assert (other.k1, other.b) == (1.2, 0.75)
    assert BM25Index.load(tmp_path / "bm25").k1 == 1.2


def test_unknown_fusion_is_a_config_error(built):
    _, overrides, _, _ = built
    with pytest.raises(UserError, match="fusion"):
        load_config(None, [*overrides, "retriever.hybrid.fusion=max"])


def test_evaluate_sweeps_hybrid_weights(built, capsys):
    import json

    from retriever import evaluate

    root, overrides, _, _ = built
    assert (
        evaluate.main(
            [*overrides, "data.split=test", "retriever.finetune.eval_limit=0", "--hybrid-weights", "0,1"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "weight 0.00" in out and "weight 1.00" in out and "best top-5 at weight 1.0" in out
    report = json.loads((root / "run" / "logs" / "retriever_hybrid_sweep.json").read_text())
    dense, lexical = (row["metrics"] for row in report["rows"])
    assert lexical["top1_accuracy"] == 1.0 > dense["top1_accuracy"]
    with pytest.raises(UserError, match="hybrid-weights"):
        evaluate.parse_weights("0.5,2")
    with pytest.raises(UserError, match="hybrid-weights"):
        evaluate.parse_weights("a,b")


@pytest.mark.parametrize("source", ["bm25", "hybrid"])
def test_hard_negatives_mined_from_bm25_follow_its_ranking(built, source):
    from retriever.negatives import mine_hard_negatives, ranked_candidates
    from retriever.train import training_examples

    root, overrides, encoder, _ = built
    cfg = load_config(None, [*overrides, "retriever.hybrid.weight=1.0"])
    r = Retriever.from_config(cfg, encoder=encoder)  # hybrid off: the miner opens run_dir/bm25 itself
    pairs = training_examples(root / "run" / "store")
    negatives = mine_hard_negatives(r, pairs, 1, cfg, source=source)
    bm25 = BM25Index.load(root / "run" / "bm25")
    ((_, scores),) = bm25.score_blocks([ex.question for ex, _ in pairs])
    train_titles = {pos.title for _, pos in pairs}  # every toy article has questions
    texts = [segment_input_text(r.store.get(i)) for i in range(len(r.store))]
    checked = 0
    for (ex, pos), (neg,), row in zip(pairs, negatives, scores):
        match = AnswerMatcher(ex.answers)
        allowed = [
            i
            for i in range(len(r.store))
            if i != pos.segment_id and not match(r.store.get(i).text) and r.store.get(i).title in train_titles
        ]
        best = max(row[i] for i in allowed)
        if best > 0:  # else ("Who leads X?" shares no word with other articles) random segments fill in
            # at weight 1 the fusion is the BM25 ranking: the negative is a best-scoring allowed one (ties exist)
            assert row[texts.index(neg)] == best
            checked += 1
    assert checked >= len(pairs) // 2
    with pytest.raises(UserError, match="negatives_from"):
        ranked_candidates(r, ["q"], 5, "sparse", cfg)
