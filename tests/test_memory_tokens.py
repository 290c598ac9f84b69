"""The `memory` compressor: P learned tokens read after a segment's frozen K,V become its P slots."""

from __future__ import annotations

import pytest
import torch

from configs.schema import Config, KnowledgeEncoderConfig
from knowledge_encoder.encoder import KnowledgeEncoder
from knowledge_encoder.memory import chunk_means
from lm.prompting import PromptTemplate
from qa.checkpoint import load_models, new_model, save_checkpoint
from qa.systems import parse_system
from tests.conftest import make_tiny_llama
from tests.encoder_helpers import QUESTIONS, segment_features, train_steps

pytestmark = pytest.mark.usefixtures("one_thread")

_features = segment_features


def _encoder(lm, slots=4, rank=0) -> KnowledgeEncoder:
    cfg = KnowledgeEncoderConfig(prefix_slots=slots, format_slots=0, compressor="memory", encode_lora_rank=rank)
    return KnowledgeEncoder(cfg, lm.config, lm=lm)


def test_memory_slots_are_the_lm_k_v_of_the_memory_tokens_read_after_the_segment(smol_tokenizer, tiny_llama):
    """Slot j of a segment = the K,V the LM computes for memory token j when it reads segment + memory tokens."""
    feats = _features(tiny_llama, smol_tokenizer)
    enc = _encoder(tiny_llama)
    with torch.no_grad():
        prefix = enc(feats)
        length = int(feats.mask[1].sum())
        ids = feats.ids[1:2, :length]
        embeds = torch.cat([tiny_llama.get_input_embeddings()(ids), enc.pool.embeddings[None]], dim=1)
        positions = torch.arange(length + 4)[None]
        cache = tiny_llama.get_decoder()(inputs_embeds=embeds, position_ids=positions, use_cache=True).past_key_values
    assert prefix.keys[0].shape == (2, tiny_llama.config.num_key_value_heads, 4, feats.keys[0].shape[-1])
    assert prefix.bias is None and prefix.mask.all()
    for layer in (0, len(prefix.keys) - 1):
        torch.testing.assert_close(prefix.keys[layer][1:2], cache.layers[layer].keys[:, :, length:], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(prefix.values[layer][1:2], cache.layers[layer].values[:, :, length:],
                                   atol=1e-4, rtol=1e-4)


def test_memory_slots_do_not_depend_on_the_padding_of_the_batch(smol_tokenizer, tiny_llama):
    feats = _features(tiny_llama, smol_tokenizer)
    enc = _encoder(tiny_llama)
    with torch.no_grad():
        both = enc(feats)
        alone = enc(feats.split()[1])
    torch.testing.assert_close(both.keys[-1][1:2], alone.keys[-1], atol=1e-4, rtol=1e-4)


def test_memory_positions_stay_before_the_prompt(tiny_llama):
    enc = KnowledgeEncoder(KnowledgeEncoderConfig(prefix_slots=4, format_slots=0, compressor="memory",
                                                  max_segment_tokens=10), tiny_llama.config, lm=tiny_llama)
    mask = torch.tensor([[True] * 3 + [False] * 7, [True] * 10])
    assert enc.pool.positions(mask).tolist() == [[3, 4, 5, 6], [6, 7, 8, 9]]
    assert enc.next_position == 10


def test_memory_tokens_and_adapter_train_and_never_change_the_answering_lm(smol_tokenizer):
    lm = make_tiny_llama(len(smol_tokenizer))
    reference = make_tiny_llama(len(smol_tokenizer))  # same seed: the same weights, never touched
    feats = _features(lm, smol_tokenizer)
    enc = _encoder(lm, rank=2)
    before = enc(feats).keys[-1].detach().clone()
    start = enc.pool.embeddings.detach().clone()
    train_steps(lm, enc, feats)
    q = QUESTIONS
    assert all(p.grad is None for p in lm.parameters())
    assert not torch.allclose(enc.pool.embeddings, start)
    assert any(b.abs().sum() > 0 for b in enc.adapter.b.values())
    assert not torch.allclose(enc(feats).keys[-1], before, atol=1e-4)
    torch.testing.assert_close(lm(input_ids=q).logits, reference(input_ids=q).logits)


def test_memory_compressor_needs_the_lm(tiny_llama):
    cfg = KnowledgeEncoderConfig(prefix_slots=4, format_slots=0, compressor="memory")
    with pytest.raises(ValueError, match="needs the LM"):
        KnowledgeEncoder(cfg, tiny_llama.config)


def test_memory_checkpoint_round_trip_gives_the_same_prefix(tmp_path, smol_tokenizer, tiny_llama):
    cfg = Config()
    cfg.knowledge_encoder.format_slots = 2
    cfg.knowledge_encoder.compressor = "memory"
    cfg.knowledge_encoder.encode_lora_rank = 2
    model = new_model(parse_system("dynamic_prefix@p4"), cfg, tiny_llama, PromptTemplate(smol_tokenizer), None)
    with torch.no_grad():
        model.encoder.pool.embeddings.add_(torch.randn_like(model.encoder.pool.embeddings))
        for b in model.encoder.adapter.b.values():
            b.normal_()
    save_checkpoint(tmp_path / "ck", {"dynamic_prefix@p4": model}, cfg, tiny_llama.config)
    loaded = load_models(tmp_path / "ck", ["dynamic_prefix@p4"], tiny_llama)["dynamic_prefix@p4"]
    feats = _features(tiny_llama, smol_tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encoder(feats).keys[-1], model.encoder(feats).keys[-1])


def test_chunk_means_average_each_of_p_equal_chunks_of_the_real_tokens():
    embeds = torch.arange(12, dtype=torch.float32).view(1, 6, 2).repeat(2, 1, 1)  # token i = (2i, 2i + 1)
    mask = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    out = chunk_means(embeds, mask, 3)
    assert out[0].tolist() == [[1.0, 2.0], [5.0, 6.0], [9.0, 10.0]]  # chunks {0, 1}, {2, 3}, {4, 5}
    assert out[1].tolist() == [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]  # one token each, padding ignored
    assert chunk_means(embeds[:1, :2], mask[:1, :2], 3)[0, 2].tolist() == [0.0, 0.0]  # more slots than tokens


def test_chunk_mean_memory_tokens_read_their_chunk_and_need_token_ids(smol_tokenizer, tiny_llama):
    cfg = KnowledgeEncoderConfig(prefix_slots=4, format_slots=0, compressor="memory", memory_inputs="chunk_mean")
    enc = KnowledgeEncoder(cfg, tiny_llama.config, lm=tiny_llama)
    feats = _features(tiny_llama, smol_tokenizer)
    with torch.no_grad():
        prefix = enc(feats)
        length = int(feats.mask[0].sum())
        ids = feats.ids[:1, :length]
        tokens = tiny_llama.get_input_embeddings()(ids)
        embeds = torch.cat([tokens, chunk_means(tokens, feats.mask[:1, :length], 4)], dim=1)
        positions = torch.arange(length + 4)[None]
        cache = tiny_llama.get_decoder()(inputs_embeds=embeds, position_ids=positions, use_cache=True).past_key_values
    torch.testing.assert_close(prefix.values[-1][:1], cache.layers[-1].values[:, :, length:], atol=1e-4, rtol=1e-4)
    feats.ids = None
    with pytest.raises(ValueError, match="token ids"):
        enc(feats)
