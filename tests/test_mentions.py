"""Mentions of names and numbers, and learned selection that keeps a repeated mention in one occurrence
(knowledge_encoder.select_gather_mentions)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from common.errors import UserError
from configs.schema import KnowledgeEncoderConfig
from knowledge_encoder.backbones import LMBackbone
from knowledge_encoder.encoder import KnowledgeEncoder
from knowledge_encoder.mentions import MentionFinder, gather_mentions
from lm.prompting import PromptTemplate, TextSegment

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = ("Daikaissak Ridge was first climbed by Baisu Zimairvend in 1816. The nearest town is Lower Netathun.\n\n"
        "Baisu Zimairvend was born in 1846. His rival, Baisu Zimairvak, lives in Lower Netathun.")


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def texts(finder: MentionFinder, ids: list[int]) -> list[str]:
    return [m.key[0] for m in finder.mentions(ids)]


def test_mentions_are_runs_of_capitalised_or_numeric_words(smol_tokenizer):
    finder = MentionFinder(smol_tokenizer)
    found = texts(finder, ids_of(smol_tokenizer, TEXT))
    assert found == ["Daikaissak Ridge", "Baisu Zimairvend", "1816", "The", "Lower Netathun", "Baisu Zimairvend",
                     "1846", "His", "Baisu Zimairvak", "Lower Netathun"]
    ids = ids_of(smol_tokenizer, TEXT)
    first, second = [m for m in finder.mentions(ids) if m.key[0] == "Baisu Zimairvend"]
    assert first.key == second.key  # " Baisu" and "\n\nBaisu": the same words, the same token count
    assert smol_tokenizer.decode(ids[first.start:first.start + first.length]).strip() == "Baisu Zimairvend"


def test_gather_keeps_one_whole_occurrence_where_the_scorer_splits_a_name_over_two(smol_tokenizer):
    finder = MentionFinder(smol_tokenizer)
    ids = ids_of(smol_tokenizer, TEXT)
    first, second = [m for m in finder.mentions(ids) if m.key[0] == "Baisu Zimairvend"]
    size = first.length
    logits = torch.zeros(1, len(ids))
    half = size // 2
    # The scorer ranks the first half of one occurrence and the second half of the other highest.
    logits[0, first.start:first.start + half] = 5.0
    logits[0, second.start + half:second.start + size] = 4.0
    mask = torch.ones(1, len(ids), dtype=torch.bool)
    plain = set(logits[0].topk(size).indices.tolist())
    gathered = set(gather_mentions(logits, torch.tensor([ids]), mask, size, finder)[0].topk(size).indices.tolist())
    one = set(range(first.start, first.start + size))
    assert not (one <= plain or set(range(second.start, second.start + size)) <= plain)  # neither whole before
    assert gathered == one  # the first-reached occurrence, whole, in the same number of slots


def test_gather_leaves_names_that_share_a_word_and_numbers_that_share_digits_apart(smol_tokenizer):
    finder = MentionFinder(smol_tokenizer)
    ids = ids_of(smol_tokenizer, TEXT)
    mentions = finder.mentions(ids)
    keep = [m for m in mentions if m.key[0] in ("Baisu Zimairvend", "Baisu Zimairvak", "1816", "1846")]
    logits = torch.full((1, len(ids)), -1.0)
    for m in keep:
        logits[0, m.start:m.start + m.length] = 3.0
    slots = sum(m.length for m in keep) - keep[0].length  # room for every occurrence but one repeat
    chosen = gather_mentions(logits, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.bool), slots, finder)
    top = set(chosen[0].topk(slots).indices.tolist())
    for name in ("Baisu Zimairvak", "1816", "1846"):
        m = next(m for m in keep if m.key[0] == name)
        assert set(range(m.start, m.start + m.length)) <= top, name


def learned(**kw) -> KnowledgeEncoderConfig:
    return KnowledgeEncoderConfig(compressor="select", select_scores="learned", format_slots=0, **kw)


def test_select_gather_mentions_changes_what_the_encoder_keeps(smol_tokenizer, tiny_llama):
    feats = LMBackbone(tiny_llama, PromptTemplate(smol_tokenizer), 96).features([TextSegment("X", TEXT)])
    ids = feats.ids[0].tolist()
    finder = MentionFinder(smol_tokenizer)
    first, second = [m for m in finder.mentions(ids) if m.key[0] == "Baisu Zimairvend"]
    size, half = first.length, first.length // 2
    bump = torch.zeros(len(ids))
    bump[first.start:first.start + half] = 5.0
    bump[second.start + half:second.start + size] = 4.0
    kept = {}
    for gather in (False, True):
        enc = KnowledgeEncoder(learned(prefix_slots=size, select_gather_mentions=gather), tiny_llama.config,
                               tokenizer=smol_tokenizer)
        enc.scorer.forward = lambda values, mask: bump[None, :].clone()
        with torch.no_grad():
            slots = enc(feats).values[-1][0, 0]
        v = feats.values[-1][0, 0].float()  # the last layer's values differ between two occurrences of a token
        kept[gather] = {i for i in range(len(ids)) if any(torch.allclose(v[i], r) for r in slots)}
    assert kept[True] == set(range(first.start, first.start + size)) != kept[False]


def test_select_gather_mentions_refuses_skip_repeats_beside_it_and_features_without_ids(smol_tokenizer, tiny_llama):
    with pytest.raises(UserError, match="set one of them"):
        KnowledgeEncoder(learned(prefix_slots=4, select_gather_mentions=True, select_skip_repeats=True),
                         tiny_llama.config, tokenizer=smol_tokenizer)
    feats = LMBackbone(tiny_llama, PromptTemplate(smol_tokenizer), 96).features([TextSegment("X", TEXT)])
    enc = KnowledgeEncoder(learned(prefix_slots=4, select_gather_mentions=True), tiny_llama.config,
                           tokenizer=smol_tokenizer)
    with torch.no_grad(), pytest.raises(ValueError, match="select_gather_mentions needs the segments' token ids"):
        enc(dataclasses.replace(feats, ids=None))
