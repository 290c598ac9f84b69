"""Answer metrics on hand-built predictions, the registry, build_metrics, and the bootstrap statistics."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from common.answers import squad_normalize as normalize_answer
from common.errors import UserError
from configs.schema import EvalConfig
from eval import stats
from eval.metrics import (
    METRICS,
    REPORTED,
    BERTScoreF1,
    Contains,
    ExactMatch,
    TokenF1,
    build_metrics,
    compute_all,
    contains_answer,
    get_metric,
    register,
    token_f1,
)

# ------------------------------------------------------------------------------------------ normalisation


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The Eiffel Tower!", "eiffel tower"),
        ("an apple a day", "apple day"),
        ("theater", "theater"),  # articles are whole words only
        ("A.B.C.", "abc"),  # punctuation removed, not replaced by spaces (SQuAD)
        ("  New\tYork \n City ", "new york city"),
        ("rock-n-roll", "rocknroll"),
        ("The", ""),
        ("", ""),
        ("“Paris”", "“paris”"),  # SQuAD strips ASCII punctuation only
        ("Thé Ánswer", "thé ánswer"),  # accents are kept, and "thé" is not an article
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_takes_best_gold_and_ignores_case_punctuation_articles():
    em = ExactMatch()
    r = em.compute(
        ["The Eiffel Tower.", "Paris", "eiffel"], [["Tower", "eiffel tower"], ["London"], ["Eiffel Tower"]]
    )
    assert r.per_example == [1.0, 0.0, 0.0]
    assert r.score == pytest.approx(1 / 3)
    assert r.skipped_reason is None and not r.skipped


def test_token_f1_values():
    # pred tokens cat sat on mat (4), gold cat on mat (3): P = 3/4, R = 1 → 6/7
    assert token_f1("the cat sat on the mat", "cat on mat") == pytest.approx(6 / 7)
    # repeated tokens count min(occurrences): x x y vs x y y → 2 common of 3 each
    assert token_f1("x x y", "x y y") == pytest.approx(2 / 3)
    assert token_f1("Paris", "London") == 0.0
    # empty after normalisation: 1 only when both sides are empty (SQuAD v2 rule)
    assert token_f1("", "") == 1.0
    assert token_f1("The!", "") == 1.0
    assert token_f1("", "Paris") == 0.0
    assert token_f1("Paris", "the") == 0.0


def test_f1_metric_max_over_golds():
    r = TokenF1().compute(["cat on mat"], [["dog", "the cat on a mat", "cat"]])
    assert r.per_example == [1.0]
    r = TokenF1().compute(["cat sat"], [["cat", "sat on"]])
    assert r.per_example == [pytest.approx(2 / 3)]


def test_contains_answer_edge_cases():
    assert contains_answer("The answer is Paris.", ["paris"]) == 1.0
    assert contains_answer("It is the city of Paris", ["The City of Paris!"]) == 1.0
    assert contains_answer("London", ["Paris", "london"]) == 1.0
    # an empty (or article/punctuation-only) gold would be inside every prediction: ignored
    assert contains_answer("Paris", ["", "London"]) == 0.0
    assert contains_answer("anything at all", ["the", "?"]) == 0.0
    assert contains_answer("", ["the"]) == 1.0
    # substring on the normalised string, as FlashRAG: "paris" is in "parisian"
    assert contains_answer("a Parisian cafe", ["Paris"]) == 1.0
    # the articles are removed before matching, on both sides
    assert contains_answer("an apple", ["the apple"]) == 1.0


def test_no_gold_answers_means_the_empty_answer():
    preds, refs = ["", "something"], [[], []]
    assert ExactMatch().compute(preds, refs).per_example == [1.0, 0.0]
    assert TokenF1().compute(preds, refs).per_example == [1.0, 0.0]
    assert Contains().compute(preds, refs).per_example == [1.0, 0.0]


def test_input_validation():
    with pytest.raises(ValueError, match="2 predictions but 1"):
        ExactMatch().compute(["a", "b"], [["a"]])
    with pytest.raises(TypeError, match="list of gold answers"):
        ExactMatch().compute(["a"], ["a"])
    with pytest.raises(TypeError, match="not str"):
        ExactMatch().compute([None], [["a"]])
    with pytest.raises(TypeError):
        ExactMatch().compute("abc", [["a"], ["b"], ["c"]])


def test_no_examples_is_skipped_not_zero():
    r = ExactMatch().compute([], [])
    assert r.score is None and r.per_example is None and "no examples" in r.skipped_reason


# ------------------------------------------------------------------------------------------ registry


def test_registry():
    assert set(REPORTED) <= set(METRICS)
    assert isinstance(get_metric("em"), ExactMatch)
    assert isinstance(get_metric("contains"), Contains)
    with pytest.raises(UserError, match="unknown metric `nope`"):
        get_metric("nope")

    class Other(ExactMatch):
        name = "em"

    with pytest.raises(ValueError, match="registered twice"):
        register(Other)


def test_build_metrics_defaults_skip_bleurt_with_reason_and_json_null():
    metrics = build_metrics(EvalConfig())
    assert [m.name for m in metrics] == list(REPORTED)
    # BERTScore is built (embedded model path resolved) but not loaded until compute
    bert = next(m for m in metrics if m.name == "bertscore_f1")
    assert bert._scorer is None and bert.num_layers == 6
    bleurt = next(m for m in metrics if m.name == "bleurt")
    r = bleurt.compute(["x"], [["y"]])
    assert r.score is None and r.per_example is None and "eval.bleurt_checkpoint" in r.skipped_reason
    assert json.loads(json.dumps(dataclasses.asdict(r)))["score"] is None


def test_build_metrics_selection_reports_unselected_as_skipped():
    metrics = build_metrics(EvalConfig(metrics=["f1", "em"]))
    assert [m.name for m in metrics] == ["f1", "em", "contains", "bertscore_f1", "bleurt"]
    results = compute_all(metrics, ["Paris", "Rome"], [["paris"], ["Milan", "rome!"]])
    assert results["em"].score == 1.0 and results["f1"].score == 1.0
    for name in ("contains", "bertscore_f1", "bleurt"):
        assert results[name].score is None
        assert results[name].skipped_reason == "not selected in eval.metrics"


def test_build_metrics_bad_settings_fail_early(tmp_path):
    with pytest.raises(UserError, match="unknown metric"):
        build_metrics(EvalConfig(metrics=["em", "rouge"]))
    with pytest.raises(UserError, match="not a directory"):
        build_metrics(EvalConfig(bleurt_checkpoint=str(tmp_path / "missing")))
    with pytest.raises(UserError, match="is not a file"):
        build_metrics(EvalConfig(bertscore_baseline=str(tmp_path / "missing.tsv")))
    with pytest.raises(UserError, match="outside 1..6"):
        build_metrics(EvalConfig(bertscore_num_layers=7))
    with pytest.raises(UserError, match="bertscore_num_layers"):
        build_metrics(EvalConfig(bertscore_num_layers=None))


def _write_baseline(path, n_rows, value=0.5):
    rows = ["LAYER,P,R,F"] + [f"{i},{value},{value},{value}" for i in range(n_rows)]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_bertscore_baseline_must_fit_the_model(tmp_path):
    # MiniLM has 6 layers: a baseline for it has rows for layers 0..6; a BERT-base one (0..12) does not fit.
    with pytest.raises(UserError, match="made for another model"):
        BERTScoreF1(num_layers=6, baseline=str(_write_baseline(tmp_path / "b13.tsv", 13)))
    bad = tmp_path / "bad.tsv"
    bad.write_text("LAYER,P,R,F\n0,0.1,x,0.3\n")
    with pytest.raises(UserError, match="bad.tsv:2"):
        BERTScoreF1(num_layers=6, baseline=str(bad))
    ok = BERTScoreF1(num_layers=6, baseline=str(_write_baseline(tmp_path / "b7.tsv", 7)))
    assert ok.baseline.endswith("b7.tsv")


@pytest.mark.slow
def test_bertscore_offline_on_embedded_minilm(tmp_path):
    metric = BERTScoreF1(model="embedded:minilm-l6", num_layers=6, batch_size=8)
    preds = ["The capital of France is Paris.", "Paris", "a purple elephant dances", ""]
    refs = [["The capital of France is Paris."], ["Paris"], ["Paris"], ["Paris"]]
    r = metric.compute(preds, refs)
    assert len(r.per_example) == 4 and r.skipped_reason is None
    assert r.per_example[0] == pytest.approx(1.0, abs=1e-4)
    assert r.per_example[1] == pytest.approx(1.0, abs=1e-4)
    assert r.per_example[2] < r.per_example[1] - 0.05  # unrelated text scores lower
    assert r.score == pytest.approx(float(np.mean(r.per_example)))
    scorer = metric._scorer
    assert metric.compute(preds[:1], refs[:1]).per_example[0] == pytest.approx(r.per_example[0], abs=1e-6)
    assert metric._scorer is scorer  # loaded once per instance

    # several golds: the best one counts
    single = metric.compute(["a purple elephant dances"], [["a purple elephant"]]).per_example[0]
    multi = metric.compute(["a purple elephant dances"], [["Paris", "a purple elephant", "xyz"]]).per_example[
        0
    ]
    assert multi == pytest.approx(single, abs=1e-5)

    # rescaling with a baseline file b: (raw - b) / (1 - b)
    rescaled = BERTScoreF1(num_layers=6, baseline=str(_write_baseline(tmp_path / "b.tsv", 7, value=0.5)))
    rr = rescaled.compute(preds[2:3], refs[2:3])
    assert rr.per_example[0] == pytest.approx((r.per_example[2] - 0.5) / 0.5, abs=1e-4)


def test_bertscore_missing_hub_model_is_skipped_with_reason(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    metric = BERTScoreF1(model="no-such-org/no-such-model-xyz", num_layers=2)
    r = metric.compute(["a"], [["b"]])
    assert r.score is None and "could not be loaded" in r.skipped_reason


# ------------------------------------------------------------------------------------------ bootstrap


def test_bootstrap_ci_constant_and_deterministic():
    assert stats.bootstrap_ci([0.7] * 50) == (pytest.approx(0.7), pytest.approx(0.7))
    x = np.random.default_rng(1).random(200)
    assert stats.bootstrap_ci(x, seed=3) == stats.bootstrap_ci(x, seed=3)
    assert stats.bootstrap_ci(x, seed=3) != stats.bootstrap_ci(x, seed=4)
    low, high = stats.bootstrap_ci(x)
    assert low < x.mean() < high


def test_bootstrap_ci_width_matches_normal_theory():
    # Bernoulli(0.3), n = 400: the 95% interval is about ±1.96 * sqrt(0.21 / 400) = ±0.045
    x = (np.random.default_rng(0).random(400) < 0.3).astype(float)
    low, high = stats.bootstrap_ci(x, n_resamples=2000)
    assert 0.075 < high - low < 0.105
    assert low < 0.3 < high


def test_bootstrap_chunking_does_not_change_results(monkeypatch):
    x = np.random.default_rng(2).random(100)
    whole = stats.bootstrap_means(x, 500, seed=0)
    monkeypatch.setattr(stats, "_CHUNK_ELEMENTS", 730)  # 7 resamples per chunk, the last one partial
    chunked = stats.bootstrap_means(x, 500, seed=0)
    np.testing.assert_allclose(chunked, whole)


def test_paired_bootstrap():
    rng = np.random.default_rng(0)
    a = rng.random(300)  # per-question difficulty varies a lot ...
    b = a - 0.05 + rng.normal(0, 0.02, 300)  # ... but b is consistently a bit worse
    res = stats.paired_bootstrap_ci(a, b)
    assert res.diff == pytest.approx(float(np.mean(a - b)))
    assert res.low < res.diff < res.high
    assert res.significant and res.p_value < 0.01
    # pairing removes the shared difficulty: far narrower than the unpaired intervals
    a_low, a_high = stats.bootstrap_ci(a)
    assert res.high - res.low < (a_high - a_low) / 5

    same = stats.paired_bootstrap_ci(a, a)
    assert (same.diff, same.low, same.high, same.p_value) == (0.0, 0.0, 0.0, 1.0)
    assert not same.significant


def test_bootstrap_errors():
    with pytest.raises(ValueError, match="empty"):
        stats.bootstrap_ci([])
    with pytest.raises(ValueError, match="NaN"):
        stats.bootstrap_ci([0.1, float("nan")])
    with pytest.raises(ValueError, match="alpha"):
        stats.bootstrap_ci([0.1], alpha=1.5)
    with pytest.raises(ValueError, match="same examples"):
        stats.paired_bootstrap_ci([0.1, 0.2], [0.1])
