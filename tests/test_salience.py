"""The learned selection scorer (knowledge_encoder.select_scores=learned) and its qa.pretrain objective."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from common.errors import UserError
from configs.schema import KnowledgeEncoderConfig
from knowledge_encoder.backbones import LMBackbone, feature_kind
from knowledge_encoder.encoder import KnowledgeEncoder
from knowledge_encoder.salience import (
    answer_occurrences,
    answer_rank,
    answer_token_labels,
    answers_kept,
    oracle_kept,
    recall_at,
    skip_repeats,
)
from lm.prompting import PromptTemplate, TextSegment
from qa.checkpoint import load_models
from qa.pretrain import main as pretrain_main
from tests.test_pretrain import args, share
from tests.tiny_run import make_tiny_run

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "Kaive is a city on the river Ostra, founded in 1204 by fishermen. The river Ostra floods in spring."


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory, smol_tokenizer):
    return make_tiny_run(tmp_path_factory.mktemp("salience"), smol_tokenizer)


def learned(**kw) -> KnowledgeEncoderConfig:
    """Plain learned selection: these tests pin what the scorer's own top P is (mentions: tests/test_mentions.py)."""
    return KnowledgeEncoderConfig(**{"compressor": "select", "select_scores": "learned", "format_slots": 0,
                                     "select_gather_mentions": False, **kw})


def test_answer_token_labels_mark_every_occurrence_and_count_answers_found(smol_tokenizer):
    ids = smol_tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    labels, found = answer_token_labels(ids, ["river Ostra", "1204", "Atlantis"], smol_tokenizer)
    marked = smol_tokenizer.decode([t for t, keep in zip(ids, labels) if keep])
    assert found == 2
    assert marked.count("Ostra") == 2 and "1204" in marked and "Kaive" not in marked and "spring" not in marked


def test_recall_at_counts_answer_tokens_among_the_top_scores():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, float("-inf"), 2.0]])
    labels = torch.tensor([[True, False, True, False], [True, False, False, False]])
    assert recall_at(logits, labels, 2) == pytest.approx(1 / 3)
    assert recall_at(logits, labels, 3) == pytest.approx(1.0)


def test_oracle_kept_fills_the_slots_with_the_cheapest_answers_first():
    occurrences = [[range(0, 4)], [range(10, 11), range(20, 22)], [range(30, 32)], []]  # 4, 1 (or 2), 2 tokens
    assert oracle_kept(occurrences, 3) == 2  # the 1-token and the 2-token answers; the 4-token one does not fit
    assert oracle_kept(occurrences, 7) == 3 and oracle_kept(occurrences, 0) == 0


def test_answer_rank_is_the_rank_of_the_best_occurrences_last_token():
    rank = {0: 5, 1: 0, 2: 9, 3: 1}
    assert answer_rank([range(0, 2), range(2, 4)], rank) == 5  # max(5, 0) = 5 beats max(9, 1) = 9
    assert answer_rank([], rank) is None


def test_skip_repeats_keeps_the_inside_of_a_repeated_name_once_and_numbers_that_share_digits_whole():
    # 0-4 "in 1816" / 5-9 "in 1846" / 10-16 "a Lo Ve Ta Re Mu b" / 17 / 18-24 "c Lo Ve Ta Re Mu d" / 25 pad
    name = [11, 12, 13, 14, 15]
    ids = torch.tensor([[20, 1, 8, 1, 6, 20, 1, 8, 4, 6, 30, *name, 31, 50, 32, *name, 33, 0]])
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[0, -1] = False
    logits = torch.zeros(1, ids.shape[1])
    logits[0, 1:5], logits[0, 6:10], logits[0, 11:16], logits[0, 19:24] = 9.0, 8.0, 7.0, 6.0
    logits[0, -1] = float("-inf")
    out = skip_repeats(logits, ids, mask, slots=16)
    # Position 21 has the same two tokens on each side as 13: it goes behind everything. The second name's
    # other tokens differ in outer context, and the two years share digits but not their neighbourhoods.
    assert out[0, 21] < out[0, 0]
    keep = [*range(1, 5), *range(6, 10), *range(11, 16), 19, 20, 22]
    assert torch.equal(out[0, keep], logits[0, keep]) and out[0, -1] == float("-inf")
    assert torch.equal(skip_repeats(logits, ids, mask, slots=4), logits)  # repeats not reached: unchanged


def test_select_skip_repeats_changes_what_the_encoder_keeps(smol_tokenizer, tiny_llama):
    text = "The Upper Filmuskain Salt Guild lies west. The Upper Filmuskain Salt Guild trades salt."
    feats = LMBackbone(tiny_llama, PromptTemplate(smol_tokenizer), 96).features([TextSegment("X", text)])
    ids = feats.ids[0].tolist()
    name = smol_tokenizer(" Upper Filmuskain Salt Guild", add_special_tokens=False)["input_ids"]
    starts = [i for i in range(len(ids)) if ids[i:i + len(name)] == name]
    assert len(starts) == 2 and len(name) >= 5
    bump = torch.zeros(len(ids))  # the scorer ranks both occurrences of the name first, the first one higher
    for s, score in zip(starts, (5.0, 4.0)):
        bump[s:s + len(name)] = score
    kept = {}
    for skip in (False, True):
        enc = KnowledgeEncoder(learned(prefix_slots=2 * len(name), select_skip_repeats=skip), tiny_llama.config)
        enc.scorer.forward = lambda values, mask: bump[None, :].clone()
        with torch.no_grad():
            slots = enc(feats).values[-1][0, 0]
        v = feats.values[-1][0, 0].float()  # the last layer's values differ between two occurrences of a token
        kept[skip] = {i for i in range(len(ids)) if any(torch.allclose(v[i], r) for r in slots)}
    second = set(range(starts[1], starts[1] + len(name)))
    assert second <= kept[False] and not second <= kept[True]
    assert set(range(starts[0], starts[0] + len(name))) <= kept[True]


def test_select_skip_repeats_without_token_ids_is_an_error_not_a_silent_fallback(smol_tokenizer, tiny_llama):
    feats = LMBackbone(tiny_llama, PromptTemplate(smol_tokenizer), 96).features([TextSegment("Kaive", TEXT)])
    enc = KnowledgeEncoder(learned(prefix_slots=5, select_skip_repeats=True), tiny_llama.config)
    with torch.no_grad():
        enc(feats)  # with ids: fine
        with pytest.raises(ValueError, match="select_skip_repeats needs the segments' token ids"):
            enc(dataclasses.replace(feats, ids=None))


def test_learned_selection_keeps_the_positions_its_scorer_ranks_first_in_every_layer(smol_tokenizer, tiny_llama):
    cfg = learned(prefix_slots=5)
    assert feature_kind(cfg) == "lm_kv"  # no KVzip pass: the scorer reads the values themselves
    feats = LMBackbone(tiny_llama, PromptTemplate(smol_tokenizer), 96).features([TextSegment("Kaive", TEXT)])
    enc = KnowledgeEncoder(cfg, tiny_llama.config)
    torch.nn.init.normal_(enc.scorer.out.weight)
    with torch.no_grad():
        top = enc.scorer(feats.values, feats.mask)[0].topk(5).indices.sort().values
        prefix = enc(feats)
    assert prefix.mask.sum().item() == 5
    for layer, (k, v) in enumerate(zip(feats.keys, feats.values)):
        assert torch.allclose(prefix.keys[layer][0], k[0][:, top].float(), atol=1e-5)
        assert torch.allclose(prefix.values[layer][0], v[0][:, top].float(), atol=1e-5)


def test_pretrain_salience_lowers_its_loss_keeps_the_heads_and_reloads(tiny_cfg, tmp_path, tiny_llama):
    run = share(tiny_cfg, tmp_path / "s")
    keys = ["knowledge_encoder.compressor=select", "knowledge_encoder.select_scores=learned"]
    pretrain_main(args(tiny_cfg, run, "pretrain.objective=salience", "pretrain.max_steps=15", "pretrain.lr=1e-2",
                       "pretrain.save_every=0", *keys))
    lines = [json.loads(line) for line in (run / "logs" / "pretrain.jsonl").read_text().splitlines()]
    rows = [row for row in lines if "bce" in row]
    curve = [row["bce"] for row in rows]
    assert len(curve) == 15 and sum(curve[-3:]) / 3 < sum(curve[:3]) / 3, curve
    assert all(0.0 <= row["recall_at_p"] <= 1.0 for row in rows)
    # Held-out dev segments are scored at the end: answers kept whole by the top P, answer-token recall.
    dev = [row for row in lines if "dev_answers_kept" in row]
    assert len(dev) == 1 and dev[0]["step"] == 15 and dev[0]["dev_answers"] > 0
    assert 0.0 <= dev[0]["dev_answers_kept"] <= 1.0 and 0.0 <= dev[0]["dev_recall_at_p"] <= 1.0

    final = run / "pretrain" / "final"
    manifest = json.loads((final / "manifest.json").read_text())
    assert manifest["pretrain"]["dev"] == {k: v for k, v in dev[0].items() if k != "step"}
    assert manifest["systems"]["dynamic_prefix@p3"]["knowledge_encoder"]["select_scores"] == "learned"
    from configs.models import load_lm

    lm, _ = load_lm(tiny_cfg.lm.model, None, "cpu", "float32")
    model = load_models(final, ["dynamic_prefix@p3"], lm)["dynamic_prefix@p3"]
    fresh = KnowledgeEncoder(learned(prefix_slots=3, max_segment_tokens=96, format_slots=2), lm.config)
    trained, start = model.encoder.state_dict(), fresh.state_dict()
    assert any(not torch.equal(trained[k], start[k]) for k in trained if k.startswith("scorer."))
    # Only the scorer learns from answer spans: the K/V heads and format slots get no gradient from it.
    assert all(torch.equal(trained[k], start[k]) for k in trained if k.startswith("proj."))


def test_pretrain_salience_refuses_an_encoder_without_a_learned_scorer(tiny_cfg, tmp_path):
    run = share(tiny_cfg, tmp_path / "n")
    with pytest.raises(UserError, match="select_scores=learned"):
        pretrain_main(args(tiny_cfg, run, "pretrain.objective=salience"))


def test_answers_kept_needs_every_token_of_an_occurrence(smol_tokenizer):
    ids = smol_tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    labels, _ = answer_token_labels(ids, ["river Ostra"], smol_tokenizer)
    marked = [i for i, x in enumerate(labels) if x]
    first = set(marked[: len(marked) // 2])  # the first occurrence whole, nothing of the second
    def occurrences(answers):
        return [answer_occurrences(ids, a, smol_tokenizer) for a in answers]

    assert answers_kept(occurrences(["river Ostra", "1204", "Atlantis"]), first) == (1, 2)
    assert answers_kept(occurrences(["river Ostra"]), set(marked[1:-1])) == (0, 1)


def test_a_windowed_scorer_starts_as_the_per_token_one_and_ignores_padding(smol_tokenizer, tiny_llama):
    backbone = LMBackbone(tiny_llama, PromptTemplate(smol_tokenizer), 96)
    feats = backbone.features([TextSegment("Kaive", TEXT[:40]), TextSegment("Kaive", TEXT)])
    plain = KnowledgeEncoder(learned(prefix_slots=5), tiny_llama.config).scorer
    windowed = KnowledgeEncoder(learned(prefix_slots=5, scorer_window=2), tiny_llama.config).scorer
    windowed.load_state_dict({**plain.state_dict(), **{k: v for k, v in windowed.state_dict().items()
                                                       if k.startswith("context.")}})
    with torch.no_grad():
        assert torch.equal(plain(feats.values, feats.mask), windowed(feats.values, feats.mask))
        torch.nn.init.normal_(windowed.context.weight)
        both = windowed(feats.values, feats.mask)
        alone = windowed([v[:1] for v in feats.values], feats.mask[:1])
    n = int(feats.mask[0].sum())
    assert n < feats.mask.shape[1] and torch.allclose(both[0, :n], alone[0, :n], atol=1e-5)
    assert not torch.allclose(both[0, :n], plain(feats.values, feats.mask)[0, :n])


def test_an_attention_scorer_reads_the_whole_segment_and_ignores_padding(smol_tokenizer, tiny_llama):
    backbone = LMBackbone(tiny_llama, PromptTemplate(smol_tokenizer), 96)
    feats = backbone.features([TextSegment("Kaive", TEXT[:40]), TextSegment("Kaive", TEXT)])
    scorer = KnowledgeEncoder(learned(prefix_slots=5, scorer_layers=1), tiny_llama.config).scorer.eval()
    torch.nn.init.normal_(scorer.out.weight)
    with torch.no_grad():
        both = scorer(feats.values, feats.mask)
        alone = scorer([v[:1] for v in feats.values], feats.mask[:1])
        # Changing the last real token's features changes the first token's score: attention spans the segment.
        n = int(feats.mask[1].sum())
        changed = [v.clone() for v in feats.values]
        for v in changed:
            v[1, :, n - 1] = torch.randn_like(v[1, :, n - 1])  # (a constant shift would be normalised away)
        moved = scorer(changed, feats.mask)
    m = int(feats.mask[0].sum())
    assert m < feats.mask.shape[1] and torch.allclose(both[0, :m], alone[0, :m], atol=1e-5)
    assert torch.isinf(both[0, m:]).all()
    assert not torch.allclose(moved[1, 0], both[1, 0]) and torch.allclose(moved[0], both[0])
    with pytest.raises(ValueError, match="scorer_layers"):
        KnowledgeEncoder(learned(prefix_slots=5, scorer_layers=-1), tiny_llama.config)
