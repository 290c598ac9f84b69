"""Model resolution: the embedded LM loads from its safetensors cache and generates; local paths load; every
QA mode runs end to end on the embedded SmolLM2 (untrained prefixes: this checks the plumbing, not quality)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from configs.models import load_lm, resolve_lm_path
from lm.generate import StopTokens, greedy_generate
from lm.prompting import PromptTemplate
from tests.conftest import make_tiny_llama


def test_embedded_lm_loads_from_the_cache_without_opening_the_gguf(monkeypatch):
    import gguf

    import configs.models as models

    resolve_lm_path("embedded:smollm2-135m")  # converts once if this machine has no cache yet

    def refuse(*_args, **_kwargs):
        raise AssertionError("the GGUF was opened although the safetensors cache exists")

    monkeypatch.setattr(models, "_convert_gguf", refuse)
    monkeypatch.setattr(gguf.GGUFReader, "__init__", refuse)
    lm, tok = load_lm("embedded:smollm2-135m", device="cpu")
    assert lm.config.num_key_value_heads < lm.config.num_attention_heads
    assert not any(p.requires_grad for p in lm.parameters())
    template = PromptTemplate(tok)
    ids = torch.tensor([template.prompt_ids("What is the capital of France?")])
    out = greedy_generate(lm, ids, torch.ones_like(ids), None, StopTokens.for_tokenizer(tok), 8)
    assert "paris" in tok.decode(out[0], skip_special_tokens=True).lower()


def test_a_saved_tiny_llama_loads_by_path(tmp_path, smol_tokenizer):
    make_tiny_llama(len(smol_tokenizer)).save_pretrained(tmp_path / "lm")
    smol_tokenizer.save_pretrained(tmp_path / "lm")
    lm, tok = load_lm(str(tmp_path / "lm"), device="cpu")
    assert lm.config.num_hidden_layers == make_tiny_llama(len(smol_tokenizer)).config.num_hidden_layers
    assert tok.pad_token is not None
    ids = torch.tensor([[1, 2, 3]])
    out = greedy_generate(lm, ids, torch.ones_like(ids), None, StopTokens.for_tokenizer(tok), 3)
    assert 1 <= len(out[0]) <= 3


@pytest.mark.slow
def test_every_mode_runs_end_to_end_on_the_embedded_lm(tmp_path, smol_tokenizer):
    from qa.checkpoint import new_model, save_checkpoint
    from qa.system import QASystem, default_checkpoint
    from qa.systems import parse_system
    from tests.tiny_run import make_tiny_run

    cfg = make_tiny_run(tmp_path, smol_tokenizer, overrides=("lm.model=embedded:smollm2-135m",
                                                             "knowledge_encoder.max_segment_tokens=320"))
    lm, tok = load_lm(cfg.lm.model, device="cpu")
    template = PromptTemplate(tok)
    trained = ["rag_text_tuned", "static_prefix", "dynamic_prefix@p4", "dynamic_prefix@pfull"]
    models = {name: new_model(parse_system(name), cfg, lm, template, None) for name in trained}
    save_checkpoint(Path(cfg.run_dir) / "checkpoints" / "final", models, cfg, lm.config)
    assert default_checkpoint(cfg) == Path(cfg.run_dir) / "checkpoints" / "final"  # a trained run beats the shipped
    modes = ["closed_book", "rag_text", *trained, "combine@pfull"]
    qa = QASystem.from_config(cfg, systems=modes, lm=lm, tokenizer=tok)
    questions = ["Who founded the company?", "In which year was it built?"]
    for mode in modes:
        predictions = qa.answer(questions, mode=mode, top_k=2)
        assert len(predictions) == 2, mode
        for p in predictions:
            assert p.prediction.strip(), (mode, p)
            assert len(p.retrieved) == (0 if mode in ("closed_book", "static_prefix") else 2), mode
            assert (p.prefix_slots > 0) == (mode not in ("closed_book", "rag_text")), (mode, p.prefix_slots)
