"""qa.decoding=span: the answer is always a piece of the retrieved text, and free decoding is unchanged."""

from __future__ import annotations

import pytest
import torch

from lm.generate import StopTokens, greedy_generate
from lm.span import SpanConstraint

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = [["Kaive\nKaive is a city on the river Ostra, founded by Ada Quill."],
         ["Velmora Works\nVelmora Works makes glass in Old Ridelis."]]


def test_span_constrained_answers_are_substrings_of_a_retrieved_segment(smol_tokenizer, tiny_llama):
    stop = StopTokens.for_tokenizer(smol_tokenizer)
    ids = torch.tensor([[5, 17, 300, 42], [9, 8, 7, 6]])
    free = greedy_generate(tiny_llama, ids, torch.ones_like(ids), None, stop, 8)
    constraint = SpanConstraint(smol_tokenizer, TEXTS, stop)
    spans = greedy_generate(tiny_llama, ids, torch.ones_like(ids), None, stop, 8, choose=constraint)
    for row, out in enumerate(spans):
        text = constraint.answer_text(out)
        assert text and text in " ".join(TEXTS[row][0].split()), (row, text)
        # a random tiny LM's free answer is no such span: the constraint did something
        assert constraint.answer_text(free[row]) != text


def test_span_constraint_prefers_the_best_allowed_token_and_stops_when_none_fits(smol_tokenizer):
    stop = StopTokens.for_tokenizer(smol_tokenizer)
    constraint = SpanConstraint(smol_tokenizer, [["the river Ostra"]], stop)
    vocab = len(smol_tokenizer)
    logits = torch.zeros(vocab)
    river = smol_tokenizer(" river", add_special_tokens=False)["input_ids"][0]
    moon = smol_tokenizer(" moon", add_special_tokens=False)["input_ids"][0]
    logits[moon], logits[river] = 10.0, 5.0
    assert constraint(0, logits, []) == river  # " moon" scores higher but is in no segment
    # After "river", a stop token is allowed (the answer is not empty) when it scores best.
    eos = smol_tokenizer.eos_token_id
    logits[eos] = 20.0
    assert constraint(0, logits, [river]) == eos
    # Nothing of the segment among the top candidates (stop tokens scored low): the segment's own tokens are
    # tried, " O" of " Ostra" fits.
    low_stop = torch.zeros(vocab).index_fill_(0, torch.tensor(sorted(stop.ids)), -10.0)
    low_stop[moon] = 3.0
    nxt = constraint(0, low_stop, [river])
    assert constraint.answer_text([river, nxt]) == "river O"
    # At the segment's end nothing can follow: stop.
    end = smol_tokenizer("the river Ostra", add_special_tokens=False)["input_ids"]
    assert constraint(0, low_stop, end) in stop.ids
