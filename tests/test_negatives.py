"""train.negatives: each question also reads its hardest retrieved non-answer segment, target qa.no_answer."""

from __future__ import annotations

import pytest

from common.errors import UserError
from data_prep.records import QAExample
from lm.prompting import TextSegment
from qa.batching import Example
from qa.reading import Candidate, choose_answer
from qa.training_data import hard_negatives, with_negatives
from retriever.search import Hit
from tests.test_train import run_train, share_run_data


def hit(sid: int, text: str) -> Hit:
    return Hit(sid, 0.0, f"d{sid}", f"T{sid}", text)


def test_hard_negatives_are_the_best_ranked_kept_segments_without_gold_or_answer():
    qa = [QAExample("q1", "Who built it?", ["Ada Quill"], gold_segment_ids=[1]),
          QAExample("q2", "When?", ["1849"], gold_segment_ids=[5])]
    deep = {"q1": [hit(1, "gold: Ada Quill built it"), hit(2, "built by ada quill too"), hit(3, "a test article"),
                   hit(4, "Bo Lind built the bridge"), hit(6, "Cy built the dam")],
            "q2": [hit(5, "in 1849"), hit(7, "the year 1849 again")]}
    out = hard_negatives(qa, deep, n=1, keep={1, 2, 4, 5, 6, 7})
    assert [sid for sid, _ in out["q1"]] == [4]  # 1 is gold, 2 holds the answer, 3 is not a kept segment
    assert "q2" not in out  # every other hit holds the answer: no negative
    assert [sid for sid, _ in hard_negatives(qa, deep, n=2)["q1"]] == [3, 4]


def test_with_negatives_appends_one_single_segment_row_per_negative_answering_no_answer():
    chunk = [Example("Who?", [TextSegment("T", "x")], [1], ["Ada"], id="q1"),
             Example("When?", [TextSegment("T", "y")], [5], ["1849"], id="q2")]
    rows = with_negatives(chunk, {"q1": [(4, TextSegment("T4", "Bo"))]}, "unanswerable")
    assert rows[:2] == chunk and len(rows) == 3
    assert (rows[2].question, rows[2].segment_ids, rows[2].answers) == ("Who?", [4], ["unanswerable"])


def test_each_reading_passes_over_abstaining_segments_unless_all_abstain():
    cands = [Candidate(0, 1, "unanswerable", -0.1), Candidate(1, 2, "Ada Quill", -2.0),
             Candidate(2, 3, "Unanswerable.", -0.2)]
    assert choose_answer(cands, "sum", "unanswerable").text == "Ada Quill"
    assert choose_answer(cands, "max", "unanswerable").text == "Ada Quill"
    assert choose_answer(cands, "max").text == "unanswerable"  # no abstention configured: plain max
    both = [Candidate(0, 1, "unanswerable", -0.5), Candidate(1, 2, "unanswerable", -0.1)]
    assert choose_answer(both, "max", "unanswerable").rank == 0


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory, smol_tokenizer):
    from tests.tiny_run import make_tiny_run

    return make_tiny_run(tmp_path_factory.mktemp("negatives"), smol_tokenizer)


def test_training_reads_each_questions_negative_with_the_no_answer_target(tiny_cfg, tmp_path, monkeypatch):
    from qa.batching import Batcher

    built: list[list[Example]] = []
    real_build = Batcher.build

    def build(self, exs, system, with_labels, *a, **kw):
        if with_labels:  # training batches (answering builds unlabelled ones)
            built.append(list(exs))
        return real_build(self, exs, system, with_labels, *a, **kw)

    monkeypatch.setattr(Batcher, "build", build)
    run_train(tiny_cfg, "train.systems=dynamic_prefix@pfull", "train.max_steps=2", "train.negatives=1",
              "qa.no_answer=none here", f"run_dir={share_run_data(tiny_cfg, tmp_path / 'a')}")
    assert len(built) == 2
    for rows in built:
        positives = [r for r in rows if r.answers != ["none here"]]
        negatives = [r for r in rows if r.answers == ["none here"]]
        assert len(positives) == 4 and 1 <= len(negatives) <= 4, rows
        questions = {p.id: p for p in positives}
        for n in negatives:
            assert len(n.segments) == 1 and n.segment_ids[0] not in questions[n.id].segment_ids
            assert not any(a.lower() in n.segments[0].text.lower() for a in questions[n.id].answers)


def test_negatives_need_top_1_reading(tiny_cfg, tmp_path):
    with pytest.raises(UserError, match="needs retriever.top_k=1"):
        run_train(tiny_cfg, "train.systems=dynamic_prefix@pfull", "train.max_steps=1", "train.negatives=1",
                  "retriever.top_k=2", f"run_dir={share_run_data(tiny_cfg, tmp_path / 'b')}")


def test_negatives_beyond_ten_are_mined_deep_enough(tiny_cfg, tmp_path, monkeypatch):
    """Regression: negatives were mined from a fixed top-11, so train.negatives=N > 10 gave fewer than N."""
    import qa.train

    mined: list[dict] = []
    real = qa.train.hard_negatives

    def record(*a, **kw):
        mined.append(real(*a, **kw))
        return mined[-1]

    monkeypatch.setattr(qa.train, "hard_negatives", record)
    run_train(tiny_cfg, "train.systems=dynamic_prefix@pfull", "train.max_steps=1", "train.negatives=12",
              f"run_dir={share_run_data(tiny_cfg, tmp_path / 'c')}")
    assert max(len(v) for v in mined[0].values()) == 12
