"""The encode-time LoRA adapter: it starts as the frozen LM, trains, and never changes the answering LM."""

from __future__ import annotations

import pytest
import torch

from configs.schema import Config, KnowledgeEncoderConfig
from knowledge_encoder.encoder import KnowledgeEncoder
from lm.forward import forward_with_prefix
from lm.prompting import PromptTemplate
from qa.checkpoint import load_models, new_model, save_checkpoint
from qa.systems import parse_system
from tests.conftest import make_tiny_llama
from tests.encoder_helpers import segment_features, train_steps

pytestmark = pytest.mark.usefixtures("one_thread")

_features = segment_features


def _adapted(lm, rank=4):
    cfg = KnowledgeEncoderConfig(prefix_slots=4, format_slots=0, pool_rope="pre", encode_lora_rank=rank)
    return KnowledgeEncoder(cfg, lm.config, lm=lm)


def test_untrained_adapter_encodes_like_the_frozen_lm(smol_tokenizer, tiny_llama):
    feats = _features(tiny_llama, smol_tokenizer)
    adapted = _adapted(tiny_llama)(feats)
    frozen = KnowledgeEncoder(KnowledgeEncoderConfig(prefix_slots=4, format_slots=0, pool_rope="pre"),
                              tiny_llama.config)(feats)
    for a, b in zip(adapted.keys + adapted.values, frozen.keys + frozen.values):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_trained_adapter_changes_the_prefix_but_never_the_answering_lm(smol_tokenizer):
    lm = make_tiny_llama(len(smol_tokenizer))
    reference = make_tiny_llama(len(smol_tokenizer))  # same seed: the same weights, never touched
    feats = _features(lm, smol_tokenizer)
    enc = _adapted(lm)
    before = enc(feats).keys[0].detach().clone()
    train_steps(lm, enc, feats)
    assert all(p.grad is None for p in lm.parameters())
    assert any(b.abs().sum() > 0 for b in enc.adapter.b.values())
    assert not torch.allclose(enc(feats).keys[0], before, atol=1e-4)
    # The LM that answers, with an empty prefix and with none, is the base LM.
    empty = enc(feats).select([0])
    empty.mask[:] = False
    q = torch.tensor([[5, 17, 300, 42]])
    torch.testing.assert_close(forward_with_prefix(lm, q, torch.ones_like(q), empty).logits,
                               reference(input_ids=q).logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lm(input_ids=q).logits, reference(input_ids=q).logits)


def test_adapter_checkpoint_round_trip_gives_the_same_prefix(tmp_path, smol_tokenizer, tiny_llama):
    cfg = Config()
    cfg.knowledge_encoder.format_slots = 2
    cfg.knowledge_encoder.pool_rope = "pre"
    cfg.knowledge_encoder.encode_lora_rank = 2
    model = new_model(parse_system("dynamic_prefix@p4"), cfg, tiny_llama, PromptTemplate(smol_tokenizer), None)
    with torch.no_grad():
        for b in model.encoder.adapter.b.values():
            b.normal_()
    save_checkpoint(tmp_path / "ck", {"dynamic_prefix@p4": model}, cfg, tiny_llama.config)
    loaded = load_models(tmp_path / "ck", ["dynamic_prefix@p4"], tiny_llama)["dynamic_prefix@p4"]
    feats = _features(tiny_llama, smol_tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encoder(feats).keys[-1], model.encoder(feats).keys[-1])


def test_adapter_needs_token_ids(smol_tokenizer, tiny_llama):
    feats = _features(tiny_llama, smol_tokenizer)
    feats.ids = None
    with pytest.raises(ValueError, match="token ids"):
        _adapted(tiny_llama)(feats)


def test_adapter_on_the_last_layers_only_leaves_the_lower_layers_k_v_frozen(smol_tokenizer):
    lm = make_tiny_llama(len(smol_tokenizer))
    layers = lm.config.num_hidden_layers
    cfg = KnowledgeEncoderConfig(prefix_slots=4, format_slots=0, pool_rope="pre", encode_lora_rank=4,
                                 encode_lora_layers=1)
    enc = KnowledgeEncoder(cfg, lm.config, lm=lm)
    assert enc.adapter.names and all(n.startswith(f"layers.{layers - 1}.") for n in enc.adapter.names)
    for b in enc.adapter.b.values():
        torch.nn.init.normal_(b, std=0.1)  # a trained adapter: B no longer zero
    feats = _features(lm, smol_tokenizer)
    keys, values = enc.adapter.encode(lm, feats.ids, feats.mask)
    torch.testing.assert_close(keys[0], feats.keys[0], atol=1e-5, rtol=1e-4)  # layer 0: the frozen LM's
    assert not keys[0].requires_grad and keys[-1].requires_grad
    assert not torch.allclose(keys[-1], feats.keys[-1], atol=1e-4)
