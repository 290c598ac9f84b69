"""Compressors on tiny random LLaMAs: RoPE geometry of pooled keys, slot biases, KVzip selection."""

from __future__ import annotations

import math

import pytest
import torch

from configs.schema import KnowledgeEncoderConfig
from knowledge_encoder.backbones import LMBackbone
from knowledge_encoder.compress import KVAttentionPool, KVSelect
from knowledge_encoder.encoder import KnowledgeEncoder, lm_dims
from knowledge_encoder.rope import Rope
from lm.forward import forward_with_prefix
from lm.generate import StopTokens, greedy_generate
from lm.prefix import Prefix
from lm.prompting import PromptTemplate, TextSegment
from tests.conftest import make_tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

SEGMENTS = [
    TextSegment("Velmora Works", "Velmora Works is a company founded in 1873 by Ada Quill in Old Ridelis."),
    TextSegment("Kaive", "Kaive is a city on the river Ostra."),
]


def lm_features(lm, tokenizer, segments=SEGMENTS, scores=None):
    return LMBackbone(lm, PromptTemplate(tokenizer), max_tokens=64, scores=scores).features(segments)


def test_unrotated_cached_key_is_the_layers_key_before_rope(smol_tokenizer, tiny_llama):
    """Rope.unrotate of the LM's cached (post-RoPE) keys gives k_proj of the layer input, computed directly."""
    template = PromptTemplate(smol_tokenizer)
    ids = template.segment_ids(SEGMENTS[0], 64)
    out = tiny_llama.model(input_ids=torch.tensor([ids]), output_hidden_states=True, use_cache=True)
    layer = tiny_llama.model.layers[1]
    _, kv_heads, head_dim = lm_dims(tiny_llama.config)
    direct = layer.self_attn.k_proj(layer.input_layernorm(out.hidden_states[1]))  # (1, n, H*D)
    direct = direct.view(1, len(ids), kv_heads, head_dim).transpose(1, 2)
    positions = torch.arange(len(ids)).float()[None]
    undone = Rope(tiny_llama.config).unrotate(out.past_key_values.layers[1].keys, positions)
    torch.testing.assert_close(undone, direct, atol=1e-5, rtol=1e-4)


def test_key_pooled_from_one_token_before_rope_and_rerotated_equals_its_cached_key(smol_tokenizer, tiny_llama):
    feats = lm_features(tiny_llama, smol_tokenizer)
    layers, kv_heads, head_dim = lm_dims(tiny_llama.config)
    pool = KVAttentionPool(layers, kv_heads, 3, head_dim, rope=Rope(tiny_llama.config))
    n = feats.mask.shape[1]
    positions = torch.arange(n).float().expand(2, n)
    pre = pool.rope.unrotate(feats.keys[0], positions)
    attn = torch.zeros(2, kv_heads, 3, n)
    chosen = [0, 7, 12]  # slot j pools token chosen[j] alone
    for j, t in enumerate(chosen):
        attn[:, :, j, t] = 1.0
    keys, values = pool.pool_with(attn, pre, feats.values[0], positions)
    torch.testing.assert_close(keys, feats.keys[0][:, :, chosen], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(values, feats.values[0][:, :, chosen])


def test_post_rope_averaging_damps_keys_that_pre_rope_pooling_keeps(smol_tokenizer, tiny_llama):
    """Why pool_rope=pre: averaging the rotated keys of several positions shrinks them; pooled before RoPE the
    slot key has the norm of the average content, whatever the positions."""
    feats = lm_features(tiny_llama, smol_tokenizer)
    layers, kv_heads, head_dim = lm_dims(tiny_llama.config)
    n = int(feats.mask[0].sum())
    post = KVAttentionPool(layers, kv_heads, 2, head_dim)
    pre = KVAttentionPool(layers, kv_heads, 2, head_dim, rope=Rope(tiny_llama.config))
    mask = feats.mask[:1]
    keys = [k[:1] for k in feats.keys]
    values = [v[:1] for v in feats.values]
    norm_post = post(keys, values, mask).keys[-1].norm(dim=-1).mean()
    norm_pre = pre(keys, values, mask).keys[-1].norm(dim=-1).mean()
    assert n > 8 and norm_pre > norm_post


def test_slot_bias_of_log_two_equals_the_slot_written_twice(tiny_llama):
    """A slot with bias log 2 gets the attention mass of two identical slots: forward and greedy decoding."""
    layers, kv_heads, head_dim = lm_dims(tiny_llama.config)
    g = torch.Generator().manual_seed(3)
    keys = [torch.randn(1, kv_heads, 4, head_dim, generator=g) for _ in range(layers)]
    values = [torch.randn(1, kv_heads, 4, head_dim, generator=g) for _ in range(layers)]
    bias = torch.zeros(1, kv_heads, 4)
    bias[:, :, 2] = math.log(2.0)
    biased = Prefix(keys, values, torch.ones(1, 4, dtype=torch.bool), next_position=20, bias=bias)
    twice = Prefix([torch.cat([k, k[:, :, 2:3]], 2) for k in keys], [torch.cat([v, v[:, :, 2:3]], 2) for v in values],
                   torch.ones(1, 5, dtype=torch.bool), next_position=20)
    ids = torch.tensor([[5, 17, 300, 42]])
    a = forward_with_prefix(tiny_llama, ids, torch.ones_like(ids), biased).logits
    b = forward_with_prefix(tiny_llama, ids, torch.ones_like(ids), twice).logits
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    plain = forward_with_prefix(tiny_llama, ids, torch.ones_like(ids), Prefix(keys, values, biased.mask, 20)).logits
    assert not torch.allclose(a, plain, atol=1e-4)
    stop = StopTokens(frozenset())
    assert greedy_generate(tiny_llama, ids, torch.ones_like(ids), biased, stop, 6) == \
        greedy_generate(tiny_llama, ids, torch.ones_like(ids), twice, stop, 6)


def test_slot_bias_survives_grouping_and_concat():
    def part(batch, slots, bias):
        keys = [torch.zeros(batch, 2, slots, 4)]
        return Prefix(keys, keys, torch.ones(batch, slots, dtype=torch.bool), 8,
                      None if bias is None else torch.full((batch, 2, slots), bias))

    grouped = Prefix.group_segments(part(4, 3, 1.0), k=2)
    assert grouped.bias.shape == (2, 2, 6)
    both = Prefix.concat([part(1, 2, None), grouped])
    assert both.bias.shape == (2, 2, 8)
    assert both.bias[:, :, :2].eq(0).all() and both.bias[:, :, 2:].eq(1).all()


def test_pool_slot_bias_starts_at_log_n_over_p(smol_tokenizer, tiny_llama):
    feats = lm_features(tiny_llama, smol_tokenizer)
    cfg = KnowledgeEncoderConfig(prefix_slots=4, format_slots=0, pool_rope="pre", slot_bias=True)
    prefix = KnowledgeEncoder(cfg, tiny_llama.config)(feats)
    lengths = feats.mask.sum(1).float()
    torch.testing.assert_close(prefix.bias, (lengths / 4).log()[:, None, None].expand(2, prefix.keys[0].shape[1], 4))


def test_kvzip_scores_are_padding_invariant_and_zero_on_padding(smol_tokenizer, tiny_llama):
    batched = lm_features(tiny_llama, smol_tokenizer, scores="kvzip")
    alone = lm_features(tiny_llama, smol_tokenizer, [SEGMENTS[1]], scores="kvzip")
    n = int(alone.mask.sum())
    assert batched.scores[0].shape == (2, lm_dims(tiny_llama.config)[1], batched.mask.shape[1])
    for a, b in zip(alone.scores, batched.scores):
        torch.testing.assert_close(a[0, :, :n], b[1, :, :n], atol=1e-5, rtol=1e-4)
        assert b[1, :, n:].eq(0).all() and (b[1, :, :n] > 0).all()


def test_select_keeps_the_top_scored_positions_in_order():
    keys = [torch.arange(6.0).view(1, 1, 6, 1).expand(2, 1, 6, 2)]
    scores = [torch.tensor([[[0.1, 0.9, 0.2, 0.8, 0.3, 0.7]], [[0.5, 0.4, 0.3, 0.0, 0.0, 0.0]]])]
    mask = torch.tensor([[True] * 6, [True, True, True, False, False, False]])
    kept = KVSelect(4)(keys, keys, mask, scores)
    assert kept.keys[0][0, 0, :, 0].tolist() == [1.0, 3.0, 4.0, 5.0]
    # A 3-token segment keeps all three (in order) and masks its fourth slot.
    assert kept.keys[0][1, 0, :3, 0].tolist() == [0.0, 1.0, 2.0]
    assert kept.mask.tolist() == [[True] * 4, [True, True, True, False]]


def test_selecting_every_position_reproduces_reading_the_text(smol_tokenizer, tiny_llama):
    """P >= n: the select compressor keeps all K,V at their positions = the P = n prefix exactly."""
    feats = lm_features(tiny_llama, smol_tokenizer, [SEGMENTS[0]], scores="kvzip")
    n = feats.mask.shape[1]
    enc_sel = KnowledgeEncoder(KnowledgeEncoderConfig(prefix_slots=n, compressor="select", format_slots=0),
                               tiny_llama.config)
    enc_full = KnowledgeEncoder(KnowledgeEncoderConfig(prefix_slots=0, format_slots=0), tiny_llama.config)
    ids = torch.tensor([[5, 17, 300, 42]])
    a = forward_with_prefix(tiny_llama, ids, torch.ones_like(ids), enc_sel(feats)).logits
    b = forward_with_prefix(tiny_llama, ids, torch.ones_like(ids), enc_full(feats)).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_select_needs_scores(smol_tokenizer, tiny_llama):
    feats = lm_features(tiny_llama, smol_tokenizer)
    enc = KnowledgeEncoder(KnowledgeEncoderConfig(prefix_slots=4, compressor="select"), tiny_llama.config)
    with pytest.raises(ValueError, match="importance scores"):
        enc(feats)


def test_slot_bias_refused_without_sdpa(smol_tokenizer):
    lm = make_tiny_llama(len(smol_tokenizer))
    lm.set_attn_implementation("eager")
    layers, kv_heads, head_dim = lm_dims(lm.config)
    keys = [torch.zeros(1, kv_heads, 2, head_dim) for _ in range(layers)]
    prefix = Prefix(keys, keys, torch.ones(1, 2, dtype=torch.bool), 4, torch.zeros(1, kv_heads, 2))
    ids = torch.tensor([[5, 6]])
    with pytest.raises(ValueError, match="sdpa"):
        forward_with_prefix(lm, ids, torch.ones_like(ids), prefix)


def test_pool_lr_scale_puts_the_pooling_parameters_in_their_own_group(smol_tokenizer, tiny_llama):
    from configs.schema import Config
    from qa.checkpoint import new_model
    from qa.systems import parse_system
    from qa.train import param_groups

    cfg = Config()
    cfg.train.pool_lr_scale = 10.0
    cfg.knowledge_encoder.slot_bias = True
    model = new_model(parse_system("dynamic_prefix@p4"), cfg, tiny_llama, PromptTemplate(smol_tokenizer), None)
    rest, pool = param_groups(model, cfg.train.lr, cfg.train.pool_lr_scale)
    assert {id(p) for p in pool["params"]} == {id(model.encoder.pool.queries), id(model.encoder.pool.bias_offset)}
    assert pool["lr"] == 10 * cfg.train.lr and "lr" not in rest
    full = new_model(parse_system("dynamic_prefix@pfull"), cfg, tiny_llama, PromptTemplate(smol_tokenizer), None)
    assert len(param_groups(full, cfg.train.lr, cfg.train.pool_lr_scale)) == 1
