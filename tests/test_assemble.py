"""qa.assemble: systems of several checkpoints into one, derived selection variants, refusals."""

from __future__ import annotations

import pytest
import torch

from common.errors import UserError
from configs.schema import Config
from lm.prompting import PromptTemplate
from qa.assemble import assemble, encoder_overrides, main
from qa.checkpoint import load_models, new_model, read_manifest, save_checkpoint
from qa.systems import parse_system
from tests.conftest import make_tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


def _checkpoint(path, lm, tokenizer, names, step):
    cfg = Config()
    cfg.knowledge_encoder.format_slots = 2
    cfg.train.static_slots = 3
    models = {n: new_model(parse_system(n), cfg, lm, PromptTemplate(tokenizer), None) for n in names}
    save_checkpoint(path, models, cfg, lm.config, {"step": step, "data": {"train_questions": step * 10}})
    return models


def test_assemble_copies_renames_and_derives_a_selection_variant(tmp_path, smol_tokenizer, tiny_llama):
    a = _checkpoint(tmp_path / "a", tiny_llama, smol_tokenizer, ["dynamic_prefix@pfull"], 5)
    _checkpoint(tmp_path / "b", tiny_llama, smol_tokenizer, ["rag_text_tuned"], 9)
    rc = main([str(tmp_path / "out"), f"{tmp_path / 'a'}:dynamic_prefix@pfull",
               f"{tmp_path / 'a'}:dynamic_prefix@pfull=dynamic_prefix@p4-kvzip", f"{tmp_path / 'b'}:rag_text_tuned",
               "--encoder", "dynamic_prefix@p4-kvzip", "compressor=select,prefix_slots=4"])
    assert rc == 0
    manifest = read_manifest(tmp_path / "out")
    assert set(manifest["systems"]) == {"dynamic_prefix@pfull", "dynamic_prefix@p4-kvzip", "rag_text_tuned"}
    derived = manifest["systems"]["dynamic_prefix@p4-kvzip"]
    assert derived["knowledge_encoder"]["compressor"] == "select" and derived["prefix_slots"] == 4
    assert derived["source"]["step"] == 5 and manifest["systems"]["rag_text_tuned"]["source"]["step"] == 9
    loaded = load_models(tmp_path / "out", list(manifest["systems"]), tiny_llama)
    assert loaded["dynamic_prefix@p4-kvzip"].encoder.slots == 4
    same = a["dynamic_prefix@pfull"].encoder.state_dict()
    for key, value in loaded["dynamic_prefix@p4-kvzip"].encoder.state_dict().items():
        torch.testing.assert_close(value, same[key])


def test_assemble_refusals(tmp_path, smol_tokenizer, tiny_llama):
    _checkpoint(tmp_path / "a", tiny_llama, smol_tokenizer, ["dynamic_prefix@pfull"], 5)
    other = make_tiny_llama(len(smol_tokenizer), layers=3)
    _checkpoint(tmp_path / "c", other, smol_tokenizer, ["static_prefix"], 1)
    src = f"{tmp_path / 'a'}:dynamic_prefix@pfull"
    with pytest.raises(UserError, match="one LM"):
        assemble(tmp_path / "o1", [src, f"{tmp_path / 'c'}:static_prefix"])
    with pytest.raises(UserError, match="given twice"):
        assemble(tmp_path / "o2", [src, src])
    with pytest.raises(UserError, match="holds: dynamic_prefix@pfull"):
        assemble(tmp_path / "o3", [f"{tmp_path / 'a'}:rag_text_tuned"])
    with pytest.raises(UserError, match="no entry produces"):
        assemble(tmp_path / "o4", [src], {"dynamic_prefix@p8": {"prefix_slots": 8}})
    with pytest.raises(UserError, match="knowledge_encoder key"):
        encoder_overrides([["x", "no_such_key=1"]])
    with pytest.raises(Exception, match="must be one of"):
        assemble(tmp_path / "o5", [src], {"dynamic_prefix@pfull": {"compressor": "magic"}})
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6))
    assemble(tmp_path / "o6", [src])
    with pytest.raises(UserError, match="--force"):
        assemble(tmp_path / "o6", [src])


def test_assemble_records_eval_metrics_of_its_systems(tmp_path, smol_tokenizer, tiny_llama):
    import json

    _checkpoint(tmp_path / "a", tiny_llama, smol_tokenizer, ["dynamic_prefix@pfull"], 5)
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"n": 3, "split": "test", "config": {"decoding": "span", "reading": "each:sum",
                                                                     "rerank": "reader"},
                                   "systems": {"dynamic_prefix@pfull": {"k": 1, "em": 0.5, "f1": 0.6},
                                               "rag_text": {"em": 0.1}},
                                   "k_sweep": {"dynamic_prefix@pfull": {"1": {"em": 0.5}, "5": {"em": 0.2}},
                                               "rag_text": {"5": {"em": 0.3}}}}))
    manifest = assemble(tmp_path / "o", [f"{tmp_path / 'a'}:dynamic_prefix@pfull"], metrics=[metrics])
    rows = manifest["systems"]["dynamic_prefix@pfull"]["metrics"]
    setup = {"file": str(metrics), "n": 3, "split": "test", "decoding": "span", "reading": "each:sum",
             "rerank": "reader"}
    # the sweep's k = 1 row is the main row (retriever.top_k = 1): recorded once
    assert rows == [{**setup, "row": "dynamic_prefix@pfull", "k": 1, "em": 0.5, "f1": 0.6},
                    {**setup, "row": "dynamic_prefix@pfull k=5", "k": 5, "em": 0.2}]
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    with pytest.raises(UserError, match="metrics.json"):
        assemble(tmp_path / "o2", [f"{tmp_path / 'a'}:dynamic_prefix@pfull"], metrics=[bad])


def test_reassembling_an_assembled_checkpoint_keeps_where_each_system_was_trained(tmp_path, smol_tokenizer,
                                                                                   tiny_llama):
    """Regression: adding a system to the shipped model (assembling from a copy of it) recorded the copy as the
    source of the systems already there, losing the run, step and data they were trained with."""
    _checkpoint(tmp_path / "a", tiny_llama, smol_tokenizer, ["dynamic_prefix@pfull"], 5)
    _checkpoint(tmp_path / "b", tiny_llama, smol_tokenizer, ["rag_text_tuned"], 9)
    assemble(tmp_path / "shipped", [f"{tmp_path / 'a'}:dynamic_prefix@pfull"])
    manifest = assemble(tmp_path / "bigger", [f"{tmp_path / 'shipped'}:dynamic_prefix@pfull",
                                              f"{tmp_path / 'b'}:rag_text_tuned"])
    kept = manifest["systems"]["dynamic_prefix@pfull"]["source"]
    assert kept["checkpoint"] == str(tmp_path / "a") and kept["step"] == 5 and kept["via"] == str(tmp_path / "shipped")
    assert manifest["systems"]["rag_text_tuned"]["source"]["step"] == 9


def test_encoder_overrides_drop_the_metrics_of_the_encoder_before_them(tmp_path, smol_tokenizer, tiny_llama):
    """Regression: deriving a variant (--encoder) from an entry with recorded metrics copied those metrics onto
    the variant, so a shipped manifest could list another encoder's EM for it."""
    import json

    _checkpoint(tmp_path / "a", tiny_llama, smol_tokenizer, ["dynamic_prefix@pfull"], 5)
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"n": 3, "systems": {"dynamic_prefix@pfull": {"k": 1, "em": 0.5}}}))
    assemble(tmp_path / "m", [f"{tmp_path / 'a'}:dynamic_prefix@pfull"], metrics=[metrics])
    src = f"{tmp_path / 'm'}:dynamic_prefix@pfull"
    manifest = assemble(tmp_path / "o", [src, f"{src}=dynamic_prefix@p4"],
                        {"dynamic_prefix@p4": {"compressor": "select", "prefix_slots": 4}})
    assert manifest["systems"]["dynamic_prefix@pfull"]["metrics"][0]["em"] == 0.5  # unchanged copy: kept
    assert "metrics" not in manifest["systems"]["dynamic_prefix@p4"]
