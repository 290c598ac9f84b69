"""Checkpoints, the peft static prefix and the prefix store: round trips and refusals."""

from __future__ import annotations

import json

import pytest
import torch

from common.errors import UserError
from configs.schema import Config
from knowledge_encoder.backbones import LMBackbone
from knowledge_encoder.prefix_store import PrefixStore, PrefixStoreWriter
from lm.forward import forward_with_prefix
from lm.prompting import PromptTemplate, TextSegment
from qa.checkpoint import load_models, new_model, read_manifest, save_checkpoint
from qa.static_prefix import StaticPrefix
from qa.systems import parse_system
from tests.conftest import make_tiny_llama


def test_static_prefix_loads_in_peft_with_identical_logits(tmp_path, smol_tokenizer, tiny_llama):
    from peft import PeftModel

    torch.manual_seed(0)
    static = StaticPrefix(tiny_llama.config, 5)
    static.save(tmp_path / "adapter")
    ids = torch.tensor([[12, 40, 7, 99]])
    ours = forward_with_prefix(tiny_llama, ids, torch.ones_like(ids), static(1)).logits
    peft_model = PeftModel.from_pretrained(tiny_llama, tmp_path / "adapter")
    theirs = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    again = StaticPrefix.load(tmp_path / "adapter", tiny_llama.config)
    torch.testing.assert_close(again(1).keys[0], static(1).keys[0])


def test_static_prefix_refuses_adapter_of_another_lm(tmp_path, smol_tokenizer, tiny_llama):
    StaticPrefix(tiny_llama.config, 4).save(tmp_path / "a")
    other = make_tiny_llama(len(smol_tokenizer), layers=3)
    with pytest.raises(UserError, match="another LM"):
        StaticPrefix.load(tmp_path / "a", other.config)


def _models(cfg, lm, tokenizer):
    template = PromptTemplate(tokenizer)
    return {name: new_model(parse_system(name), cfg, lm, template, None)
            for name in ("dynamic_prefix@p4", "dynamic_prefix@pfull", "static_prefix", "rag_text_tuned")}


def test_checkpoint_round_trip_and_manifest(tmp_path, smol_tokenizer, tiny_llama):
    cfg = Config()
    cfg.knowledge_encoder.format_slots = 3
    cfg.train.static_slots = 4
    models = _models(cfg, tiny_llama, smol_tokenizer)
    with torch.no_grad():
        models["dynamic_prefix@p4"].encoder.pool.queries.normal_()
    save_checkpoint(tmp_path / "final", models, cfg, tiny_llama.config, {"step": 7})
    manifest = read_manifest(tmp_path / "final")
    assert set(manifest["systems"]) == set(models) and manifest["step"] == 7
    assert manifest["systems"]["dynamic_prefix@p4"]["prefix_slots"] == 4
    assert manifest["systems"]["dynamic_prefix@pfull"]["prefix_slots"] == 0
    loaded = load_models(tmp_path / "final", list(models), tiny_llama)
    for name, model in models.items():
        a, b = model.state_dict(), loaded[name].state_dict()
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key])
    assert not any(p.requires_grad for p in loaded["static_prefix"].parameters())


def test_checkpoint_refuses_other_lm_and_missing_system(tmp_path, smol_tokenizer, tiny_llama):
    cfg = Config()
    models = {"static_prefix": new_model(parse_system("static_prefix"), cfg, tiny_llama, PromptTemplate(smol_tokenizer), None)}
    save_checkpoint(tmp_path / "ck", models, cfg, tiny_llama.config)
    with pytest.raises(UserError, match="holds: static_prefix"):
        load_models(tmp_path / "ck", ["dynamic_prefix"], tiny_llama)
    other = make_tiny_llama(len(smol_tokenizer), layers=3)
    with pytest.raises(UserError, match="trained for LM"):
        load_models(tmp_path / "ck", ["static_prefix"], other)
    with pytest.raises(UserError, match="not a checkpoint"):
        read_manifest(tmp_path)


def test_prefix_store_round_trip_resume_and_stale(tmp_path, smol_tokenizer, tiny_llama):
    cfg = Config()
    cfg.knowledge_encoder.format_slots = 0
    model = new_model(parse_system("dynamic_prefix@p3"), cfg, tiny_llama, PromptTemplate(smol_tokenizer), None)
    backbone = LMBackbone(tiny_llama, PromptTemplate(smol_tokenizer), 64)
    segs = [TextSegment(f"T{i}", f"text number {i} " * (i + 1)) for i in range(5)]
    with torch.no_grad():
        prefix = model.encoder(backbone.features(segs))
    meta = {"encoder_sha256": "abc", "store_fingerprint": "s1", "next_position": 320, "prefix_slots": 3}
    writer = PrefixStoreWriter(tmp_path / "p", meta)
    writer.add([0, 1, 2], prefix.select([0, 1, 2]))
    # An interrupted run: a new writer sees the finished shard and only needs the rest.
    writer = PrefixStoreWriter(tmp_path / "p", meta)
    assert writer.done_ids() == {0, 1, 2}
    writer.add([3, 4], prefix.select([3, 4]))
    with pytest.raises(UserError, match="incomplete"):
        PrefixStore.open(tmp_path / "p", "abc", "s1")
    writer.finish()
    store = PrefixStore.open(tmp_path / "p", "abc", "s1")
    got = store.get([4, 0])
    torch.testing.assert_close(got.keys[1], prefix.select([4, 0]).keys[1], atol=1e-2, rtol=1e-2)  # float16 store
    assert store.get([0, 99]) is None
    with pytest.raises(UserError, match="another knowledge encoder"):
        PrefixStore.open(tmp_path / "p", "other", "s1")
    with pytest.raises(UserError, match="another segment store"):
        PrefixStore.open(tmp_path / "p", "abc", "s2")
    assert json.loads((tmp_path / "p" / "manifest.json").read_text())["count"] == 5


def test_init_from_another_system_loads_the_shared_weights(tmp_path, smol_tokenizer, tiny_llama):
    """train.init_from=DIR:dynamic_prefix@pfull starts a compressed encoder from a trained full-length one."""
    from qa.checkpoint import init_encoder_from

    cfg = Config()
    cfg.knowledge_encoder.format_slots = 2
    template = PromptTemplate(smol_tokenizer)
    full = new_model(parse_system("dynamic_prefix@pfull"), cfg, tiny_llama, template, None)
    with torch.no_grad():
        full.encoder.proj.weight.add_(0.5)
        full.encoder.format.kv.add_(1.0)
    save_checkpoint(tmp_path / "ck", {"dynamic_prefix@pfull": full}, cfg, tiny_llama.config)
    small = new_model(parse_system("dynamic_prefix@p3"), cfg, tiny_llama, template, None)
    queries = small.encoder.pool.queries.detach().clone()
    loaded = init_encoder_from(small, f"{tmp_path / 'ck'}:dynamic_prefix@pfull", "dynamic_prefix@p3", tiny_llama.config)
    assert loaded == ["format.kv", "proj.weight"]
    torch.testing.assert_close(small.encoder.proj.weight, full.encoder.proj.weight)
    torch.testing.assert_close(small.encoder.pool.queries, queries)
    # The same name in a checkpoint without it: nothing loads; an unknown source system is refused.
    assert init_encoder_from(small, str(tmp_path / "ck"), "dynamic_prefix@p3", tiny_llama.config) is None
    with pytest.raises(UserError, match="no dynamic system"):
        init_encoder_from(small, f"{tmp_path / 'ck'}:dynamic_prefix@p9", "dynamic_prefix@p3", tiny_llama.config)
    cfg.knowledge_encoder.format_slots = 4
    wider = new_model(parse_system("dynamic_prefix@p3"), cfg, tiny_llama, template, None)
    with pytest.raises(UserError, match="another shape"):
        init_encoder_from(wider, f"{tmp_path / 'ck'}:dynamic_prefix@pfull", "dynamic_prefix@p3", tiny_llama.config)


def test_checkpoint_saved_before_pool_rope_and_slot_bias_loads_as_it_was_trained(tmp_path, smol_tokenizer,
                                                                                   tiny_llama):
    """Regression: pool_rope and slot_bias changed default (to pre / true); a manifest that predates the keys
    must load the post-RoPE pool without slot biases it was trained with, not today's defaults."""
    cfg = Config()
    cfg.knowledge_encoder.pool_rope = "post"
    cfg.knowledge_encoder.slot_bias = False
    model = new_model(parse_system("dynamic_prefix@p4"), cfg, tiny_llama, PromptTemplate(smol_tokenizer), None)
    save_checkpoint(tmp_path / "old", {"dynamic_prefix@p4": model}, cfg, tiny_llama.config)
    path = tmp_path / "old" / "manifest.json"
    manifest = json.loads(path.read_text())
    for key in ("pool_rope", "slot_bias", "compressor", "encode_lora_rank"):
        del manifest["systems"]["dynamic_prefix@p4"]["knowledge_encoder"][key]
    path.write_text(json.dumps(manifest))
    loaded = load_models(tmp_path / "old", ["dynamic_prefix@p4"], tiny_llama)["dynamic_prefix@p4"]
    assert loaded.encoder.cfg.pool_rope == "post" and loaded.encoder.cfg.slot_bias is False
    assert Config().knowledge_encoder.pool_rope == "pre" and Config().knowledge_encoder.slot_bias is True


def test_save_checkpoint_refuses_to_overwrite_the_shipped_model(tmp_path, smol_tokenizer, tiny_llama):
    """Regression: a test saved its untrained systems to `default_checkpoint(cfg)`, which is the shipped model
    when no run trained one, and replaced models/smollm2-135m-squad (its card included)."""
    from qa.checkpoint import SHIPPED_MODEL

    cfg = Config()
    model = new_model(parse_system("dynamic_prefix@p4"), cfg, tiny_llama, PromptTemplate(smol_tokenizer), None)
    with pytest.raises(UserError, match="refusing to overwrite the shipped model"):
        save_checkpoint(SHIPPED_MODEL, {"dynamic_prefix@p4": model}, cfg, tiny_llama.config)
    assert (SHIPPED_MODEL / "MODEL_CARD.md").is_file()
