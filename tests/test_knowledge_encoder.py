"""Knowledge encoder on tiny random LLaMAs (GQA, explicit head_dim): shapes, masking, warm start, gradients."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from configs.schema import KnowledgeEncoderConfig
from knowledge_encoder.backbones import LMBackbone
from knowledge_encoder.encoder import KnowledgeEncoder, lm_dims
from knowledge_encoder.features import SegmentFeatures
from lm.forward import forward_with_prefix
from lm.prefix import Prefix
from lm.prompting import PromptTemplate, TextSegment
from tests.conftest import make_tiny_llama

SEGMENTS = [
    TextSegment("Velmora Works", "Velmora Works is a company founded in 1873 by Ada Quill in Old Ridelis."),
    TextSegment("Ridelis beetle", "A small beetle."),
    TextSegment("Zome Ridelor", "Zome Ridelor was born in Kaive and worked as a glassblower for many years."),
    TextSegment("Kaive", "Kaive is a city on the river Ostra."),
]


def features(lm, tokenizer, segments=SEGMENTS) -> SegmentFeatures:
    return LMBackbone(lm, PromptTemplate(tokenizer), max_tokens=64).features(segments)


@pytest.mark.parametrize("layers,heads,kv_heads,head_dim", [(2, 4, 2, 24), (3, 8, 1, 16), (1, 2, 2, 32)])
@pytest.mark.parametrize("slots", [0, 5])
@pytest.mark.parametrize("projection", ["identity", "full", "factored"])
def test_prefix_shapes_and_padding(smol_tokenizer, layers, heads, kv_heads, head_dim, slots, projection):
    lm = make_tiny_llama(len(smol_tokenizer), layers=layers, heads=heads, kv_heads=kv_heads, head_dim=head_dim)
    feats = features(lm, smol_tokenizer)
    cfg = KnowledgeEncoderConfig(prefix_slots=slots, format_slots=3, projection=projection, rank=8)
    enc = KnowledgeEncoder(cfg, lm.config)
    per_segment = enc(feats)
    n = feats.mask.shape[1]
    width = slots or n
    assert per_segment.num_layers == layers
    for k, v in zip(per_segment.keys, per_segment.values):
        assert k.shape == v.shape == (4, kv_heads, width, head_dim)
    if slots == 0:
        # Per-token prefixes keep the padding of short segments masked.
        assert torch.equal(per_segment.mask, feats.mask)
        assert not per_segment.mask[1].all()
    full = enc.build_prefix(feats, k=2)  # 4 segments = 2 questions x k=2
    assert full.batch_size == 2 and full.length == 3 + 2 * width
    assert full.keys[0].shape == (2, kv_heads, 3 + 2 * width, head_dim)


def test_lm_kv_full_prefix_reproduces_reading_the_text(smol_tokenizer, tiny_llama):
    """P = segment length + identity heads = the LM having read the segment (the warm start)."""
    template = PromptTemplate(smol_tokenizer)
    seg_ids = template.segment_ids(SEGMENTS[0], 64)
    question = smol_tokenizer(" Who founded it?", add_special_tokens=False)["input_ids"]
    feats = LMBackbone(tiny_llama, template, 64).features_from_ids([seg_ids])
    cfg = KnowledgeEncoderConfig(prefix_slots=0, format_slots=0)
    prefix = KnowledgeEncoder(cfg, tiny_llama.config)(feats)
    q = torch.tensor([question])
    with_prefix = forward_with_prefix(tiny_llama, q, torch.ones_like(q), prefix, position_start=len(seg_ids)).logits
    reading = tiny_llama(input_ids=torch.tensor([seg_ids + question])).logits[:, len(seg_ids):]
    torch.testing.assert_close(with_prefix, reading, atol=1e-4, rtol=1e-4)


def test_padding_of_short_segments_does_not_leak(smol_tokenizer, tiny_llama):
    """A segment's prefix is the same alone and in a batch padded by a longer segment."""
    cfg = KnowledgeEncoderConfig(prefix_slots=4, format_slots=0)
    torch.manual_seed(0)
    enc = KnowledgeEncoder(cfg, tiny_llama.config)
    with torch.no_grad():
        enc.pool.queries.normal_()
    alone = enc(features(tiny_llama, smol_tokenizer, [SEGMENTS[1]]))
    batched = enc(features(tiny_llama, smol_tokenizer, [SEGMENTS[0], SEGMENTS[1]]))
    for a, b in zip(alone.keys + alone.values, batched.keys + batched.values):
        torch.testing.assert_close(a[0], b[1], atol=1e-5, rtol=1e-5)


def test_gradients_reach_encoder_and_never_the_lm(smol_tokenizer, tiny_llama):
    cfg = KnowledgeEncoderConfig(prefix_slots=3, format_slots=2)
    enc = KnowledgeEncoder(cfg, tiny_llama.config)
    prefix = enc.build_prefix(features(tiny_llama, smol_tokenizer), k=1)
    ids = torch.randint(5, 500, (4, 6))
    out = forward_with_prefix(tiny_llama, ids, torch.ones_like(ids), prefix)
    out.logits.float().pow(2).mean().backward()
    grads = {n: p.grad for n, p in enc.named_parameters()}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values()), [n for n, g in grads.items() if g is None]
    assert all(p.grad is None for p in tiny_llama.parameters())


def test_hidden_state_backbone_with_factored_heads(smol_tokenizer, tiny_llama):
    backbone = LMBackbone(tiny_llama, PromptTemplate(smol_tokenizer), 64, kind="lm_layers", lm_layers=1)
    feats = backbone.features(SEGMENTS)
    cfg = KnowledgeEncoderConfig(backbone="lm_layers", prefix_slots=4, format_slots=0, projection="factored", rank=8)
    enc = KnowledgeEncoder(cfg, tiny_llama.config, feature_dim=backbone.feature_dim)
    layers, kv_heads, head_dim = lm_dims(tiny_llama.config)
    prefix = enc(feats)
    assert prefix.keys[0].shape == (4, kv_heads, 4, head_dim) and prefix.num_layers == layers
    small = sum(p.numel() for p in enc.parameters())
    full = KnowledgeEncoder(dataclasses.replace(cfg, projection="full"), tiny_llama.config, backbone.feature_dim)
    assert small < sum(p.numel() for p in full.parameters())


def test_segment_features_split_and_pad_stack_round_trip(smol_tokenizer, tiny_llama):
    feats = features(tiny_llama, smol_tokenizer)
    again = SegmentFeatures.pad_stack(feats.split())
    assert torch.equal(again.mask, feats.mask)
    for a, b in zip(again.keys, feats.keys):
        torch.testing.assert_close(a[again.mask[:, None, :, None].expand_as(a)], b[feats.mask[:, None, :, None].expand_as(b)])


def test_group_segments_is_question_major():
    layers, b, k, h, p, d = 2, 3, 2, 2, 4, 5
    flat = Prefix(
        keys=[torch.arange(b * k, dtype=torch.float).view(-1, 1, 1, 1).expand(b * k, h, p, d) for _ in range(layers)],
        values=[torch.zeros(b * k, h, p, d) for _ in range(layers)],
        mask=torch.ones(b * k, p, dtype=torch.bool),
        next_position=10,
    )
    grouped = Prefix.group_segments(flat, k)
    assert grouped.keys[0].shape == (b, h, k * p, d)
    # Question 1 holds segments 2 and 3, in that order.
    assert grouped.keys[0][1, 0, :, 0].tolist() == [2.0] * p + [3.0] * p


def test_feature_cache_does_not_serve_old_text_for_a_reused_segment_id(smol_tokenizer, tiny_llama):
    """Regression: after a live-index reset, a new document may get an old segment id; its features must be
    computed from its own text, not served from the cache entry of the old one."""
    from qa.batching import Batcher, Example, FeatureCache
    from qa.systems import parse_system

    batcher = Batcher(PromptTemplate(smol_tokenizer), FeatureCache(LMBackbone(tiny_llama, PromptTemplate(smol_tokenizer), 64)), "cpu")
    system = parse_system("dynamic_prefix")
    old = batcher.build([Example("q?", [SEGMENTS[0]], [7])], system, with_labels=False).features
    new = batcher.build([Example("q?", [SEGMENTS[2]], [7])], system, with_labels=False).features
    assert old.mask.shape != new.mask.shape or not torch.equal(old.keys[0], new.keys[0])
