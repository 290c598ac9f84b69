"""eval.compare_runs: paired NEW − BASE over the questions two evaluation runs share."""

from __future__ import annotations

import json

import pytest

from common.errors import UserError
from eval.compare_runs import compare, main, read_predictions


def _write(path, rows):
    path.mkdir(parents=True, exist_ok=True)
    (path / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _row(qid, prediction, answer="Paris", mode="rag_text_tuned", k=1):
    return {"id": qid, "mode": mode, "k": k, "question": "?", "prediction": prediction, "answers": [answer]}


def test_paired_difference_counts_better_and_worse(tmp_path, capsys):
    base = _write(
        tmp_path / "a", [_row("q1", "Paris"), _row("q2", "Rome"), _row("q3", "Rome"), _row("q4", "x")]
    )
    new = _write(
        tmp_path / "b", [_row("q1", "Paris"), _row("q2", "Paris"), _row("q3", "Paris"), _row("q4", "x")]
    )
    rows, notes = compare(read_predictions(base), read_predictions(new), ["em"], n_resamples=500)
    (r,) = rows
    assert (r.n, r.base, r.new, r.better, r.worse) == (4, 0.25, 0.75, 2, 0)
    assert r.difference.diff == pytest.approx(0.5) and r.difference.low >= 0 and notes == []
    assert main([str(base), str(new / "predictions.jsonl"), "--metrics", "em,contains"]) == 0
    out = capsys.readouterr().out
    assert "| `rag_text_tuned` | 1 | em | 4 | 0.250 | 0.750 | +0.500" in out and "| contains |" in out


def test_unpaired_questions_and_systems_are_left_out_and_said(tmp_path):
    base = _write(
        tmp_path / "a", [_row("q1", "Paris"), _row("q2", "Rome"), _row("q1", "a", mode="closed_book", k=None)]
    )
    new = _write(tmp_path / "b", [_row("q1", "Rome"), _row("q3", "Paris")])
    rows, notes = compare(read_predictions(base), read_predictions(new), ["em"], n_resamples=100)
    assert [(r.mode, r.n, r.base, r.new) for r in rows] == [("rag_text_tuned", 1, 1.0, 0.0)]
    assert "only in one run: closed_book" in notes
    assert any("2 question(s) answered in one run only" in n for n in notes)


def test_bad_inputs_get_clear_errors(tmp_path):
    good = _write(tmp_path / "good", [_row("q1", "Paris")])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "predictions.jsonl").write_text(
        json.dumps(_row("q1", "Paris")) + "\n{not json\n", encoding="utf-8"
    )
    with pytest.raises(UserError, match=r"predictions.jsonl:2: not a prediction row"):
        read_predictions(bad)
    with pytest.raises(UserError, match="no such predictions file"):
        read_predictions(tmp_path / "missing")
    (bad / "predictions.jsonl").write_bytes(b'{"id": "q\xff"}\n')
    with pytest.raises(UserError, match="not UTF-8"):
        read_predictions(bad)
    other = _write(tmp_path / "other", [_row("q1", "Paris", mode="closed_book", k=None)])
    with pytest.raises(UserError, match="share no system"):
        compare(read_predictions(good), read_predictions(other))
    with pytest.raises(UserError, match="not recomputed here"):
        compare(read_predictions(good), read_predictions(good), ["bertscore_f1"])
    with pytest.raises(UserError, match="--resamples"):
        main([str(good), str(good), "--resamples", "0"])
