"""qa.reading=each: every retrieved segment read alone, one answer kept by its log-probability."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from lm.generate import StopTokens, greedy_generate
from qa.reading import Candidate, choose_answer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_sum_rule_adds_up_segments_that_agree_and_max_keeps_the_single_best():
    lp = math.log
    cands = [Candidate(0, 10, "Ada Quill", lp(0.5)), Candidate(1, 11, "Paris", lp(0.4)),
             Candidate(2, 12, "the Paris", lp(0.3))]  # "the Paris" is "Paris" once normalised
    assert choose_answer(cands, "max").text == "Ada Quill"
    best = choose_answer(cands, "sum")
    assert (best.text, best.rank) == ("Paris", 1)  # 0.7 > 0.5; the better-ranked spelling is kept


def test_ties_go_to_the_better_ranked_segment():
    cands = [Candidate(0, 1, "a", -1.0), Candidate(1, 2, "b", -1.0)]
    assert choose_answer(cands, "max").rank == 0
    assert choose_answer(list(reversed(cands)), "sum").rank == 0


def test_choose_answer_refuses_an_unknown_rule_and_no_candidates():
    with pytest.raises(ValueError, match="unknown reading rule"):
        choose_answer([Candidate(0, 1, "a", 0.0)], "vote")
    with pytest.raises(ValueError):
        choose_answer([], "sum")


def test_generation_logprobs_are_the_teacher_forced_log_probability_of_answer_and_stop(smol_tokenizer, tiny_llama):
    stop = StopTokens.for_tokenizer(smol_tokenizer)
    ids = torch.tensor([[5, 17, 300, 42], [9, 8, 7, 6]])
    logprobs: list[list[float]] = []
    out = greedy_generate(tiny_llama, ids, torch.ones_like(ids), None, stop, 6, logprobs=logprobs)
    assert out == greedy_generate(tiny_llama, ids, torch.ones_like(ids), None, stop, 6)  # unchanged answers
    for row, answer in enumerate(out):
        # the stop token's log-probability is counted when the row stopped before the length cap
        assert len(logprobs[row]) in (len(answer), len(answer) + 1)
        seq = torch.tensor([ids[row].tolist() + answer])
        with torch.no_grad():
            logits = tiny_llama(input_ids=seq).logits[0].float().log_softmax(-1)
        t = ids.shape[1]
        want = [logits[t - 1 + i, tok].item() for i, tok in enumerate(answer)]
        assert logprobs[row][: len(answer)] == pytest.approx(want, abs=1e-4)
        if len(logprobs[row]) > len(answer):
            assert logprobs[row][-1] == pytest.approx(logits[t - 1 + len(answer)].max().item(), abs=1e-4)


@pytest.mark.slow
def test_each_reading_answers_from_one_segment_and_its_top_candidate_is_the_k1_answer(tmp_path, smol_tokenizer):
    from lm.prompting import PromptTemplate
    from qa.checkpoint import new_model, save_checkpoint
    from qa.system import QASystem
    from qa.systems import parse_system
    from tests.tiny_run import make_tiny_run

    cfg = make_tiny_run(tmp_path, smol_tokenizer)
    joint = QASystem.from_config(cfg, systems=["rag_text"])
    lm, tok = joint.lm, joint.tokenizer
    models = {"dynamic_prefix@pfull": new_model(parse_system("dynamic_prefix@pfull"), cfg, lm, PromptTemplate(tok),
                                                None)}
    save_checkpoint(Path(cfg.run_dir) / "checkpoints" / "final", models, cfg, lm.config)
    each_cfg = copy.deepcopy(cfg)
    each_cfg.qa.reading = "each"
    modes = ["rag_text", "dynamic_prefix@pfull"]
    each = QASystem.from_config(each_cfg, systems=modes, lm=lm, tokenizer=tok, retriever=joint.retriever)
    single = QASystem.from_config(cfg, systems=modes, lm=lm, tokenizer=tok, retriever=joint.retriever)
    questions = ["Who founded the company?", "In which year was it built?", "Where is it?"]
    for mode in modes:
        got = each.answer(questions, mode=mode, top_k=3)
        k1 = single.answer(questions, mode=mode, top_k=1)
        for p, one in zip(got, k1):
            assert [c["rank"] for c in p.candidates] == [0, 1, 2], mode
            assert [c["segment_id"] for c in p.candidates] == [h.segment_id for h in p.retrieved], mode
            assert p.candidates[0]["text"] == one.prediction, mode  # the top segment alone is what k = 1 reads
            assert p.prediction == p.candidates[p.chosen_rank]["text"], mode
            assert all(c["logprob"] <= 0 for c in p.candidates), mode
        # the default (joint) reading records no candidates
        assert all(not p.candidates for p in single.answer(questions[:1], mode=mode, top_k=3))

