"""Retrieval metrics on hand-built cases (values worked out by hand in the comments)."""

from __future__ import annotations

import pytest

from common.answers import has_answer
from common.answers import retrieval_normalize as normalize_answer
from data_prep.records import QAExample
from retriever.metrics import (
    answer_flags,
    gold_doc_hit_at_k,
    mrr_at_k,
    recall_at_k,
    retrieval_metrics,
    top_k_accuracy,
)
from retriever.search import Hit


def test_normalize_answer_squad_rules():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffel tower"
    assert normalize_answer("An apple, a pear") == "apple pear"
    assert normalize_answer("“Venite Ad Me Omnes”") == "venite ad me omnes"


def test_has_answer_matches_whole_tokens_only():
    assert has_answer("Mary appeared in 1858 to Saint Bernadette Soubirous.", ["saint bernadette soubirous"])
    assert not has_answer("Mary appeared in 1858.", ["1"])  # `1` is not the token `1858`
    assert has_answer("It cost $1 in 1858.", ["1"])
    assert has_answer("the capital is Ka-Lo.", ["ka lo"])  # punctuation is dropped on both sides
    assert not has_answer("anything", [""])  # an empty answer never matches
    assert not has_answer("anything", [])


def test_top_k_and_mrr_by_hand():
    flags = [
        [False, True, False],  # first answer at rank 2
        [True, False, False],  # rank 1
        [False, False, False],  # none
        [False, False, True],  # rank 3
    ]
    assert top_k_accuracy(flags, 1) == pytest.approx(1 / 4)
    assert top_k_accuracy(flags, 2) == pytest.approx(2 / 4)
    assert top_k_accuracy(flags, 3) == pytest.approx(3 / 4)
    assert mrr_at_k(flags, 10) == pytest.approx((1 / 2 + 1 + 0 + 1 / 3) / 4)
    assert mrr_at_k(flags, 2) == pytest.approx((1 / 2 + 1) / 4)  # rank 3 is outside k=2
    assert top_k_accuracy([], 5) is None


def test_gold_doc_hit_and_recall_skip_examples_without_gold():
    docs = [["a", "b"], ["c", "d"], ["e", "f"]]
    assert gold_doc_hit_at_k(docs, ["b", "x", None], 1) == pytest.approx(0.0)
    assert gold_doc_hit_at_k(docs, ["b", "x", None], 2) == pytest.approx(
        1 / 2
    )  # the None example is left out
    assert gold_doc_hit_at_k(docs, [None, None, None], 2) is None
    ids = [[1, 2, 3], [4, 5, 6]]
    # example 1: gold {2, 9} → 1 of 2 found in top 3; example 2: gold {4} → found at rank 1
    assert recall_at_k(ids, [[2, 9], [4]], 3) == pytest.approx((0.5 + 1.0) / 2)
    assert recall_at_k(ids, [[2, 9], [4]], 1) == pytest.approx((0.0 + 1.0) / 2)
    assert recall_at_k(ids, [[], []], 3) is None


def test_retrieval_metrics_end_to_end():
    examples = [
        QAExample("q1", "Who?", ["Mr Smith"], gold_doc_id="d1", gold_segment_ids=[10]),
        QAExample("q2", "When?", ["1858"], gold_doc_id="d2", gold_segment_ids=[20, 21]),
    ]
    hits = [
        [Hit(11, 0.9, "d9", "T", "nothing here"), Hit(10, 0.8, "d1", "T", "said mr. smith")],
        [Hit(20, 0.7, "d2", "T", "in 1858 it"), Hit(30, 0.6, "d3", "T", "also 1858")],
    ]
    m = retrieval_metrics(examples, hits, ks=(1, 2))
    assert m["n"] == 2
    assert m["top1_accuracy"] == pytest.approx(0.5)
    assert m["top2_accuracy"] == pytest.approx(1.0)
    assert m["gold_doc_hit@1"] == pytest.approx(0.5)
    assert m["recall@1"] == pytest.approx((0 + 0.5) / 2)
    assert m["recall@2"] == pytest.approx((1 + 0.5) / 2)
    assert m["mrr@10"] == pytest.approx((1 / 2 + 1) / 2)
    assert answer_flags([["a b"]], [["b"]]) == [[True]]
    with pytest.raises(ValueError):
        retrieval_metrics(examples, hits[:1])
