"""QASystem takes values (QASettings); only `from_config` reads the config (issue 23)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from configs.loader import load_config
from qa.system import QASettings, QASystem


def test_settings_pick_each_value_from_its_section():
    cfg = load_config(None, ["run_dir=runs/x", "qa.mode=rag_text", "qa.decoding=span", "retriever.top_k=3",
                             "qa.reading=each", "qa.reading_rule=max", "qa.rerank=reader",
                             "eval.batch_size=5", "lm.max_new_tokens=7", "lm.max_question_chars=99",
                             "knowledge_encoder.prefix_store=cache", "knowledge_encoder.prefix_cache_gb=0.5",
                             "train.feature_cache_gb=1.5", "train.feature_disk_gb=0"])
    s = QASettings.from_config(cfg)
    assert (s.run_dir, s.mode, s.decoding, s.top_k, s.batch_size) == (Path("runs/x"), "rag_text", "span", 3, 5)
    assert (s.reading, s.reading_rule, s.rerank) == ("each", "max", "reader")
    assert (s.max_new_tokens, s.max_question_chars, s.system_prompt) == (7, 99, cfg.lm.system_prompt)
    assert (s.prefix_store, s.prefix_cache_gb, s.store_dtype) == ("cache", 0.5, cfg.knowledge_encoder.store_dtype)
    assert (s.feature_cache_gb, s.feature_disk_gb, s.retriever_model) == (1.5, 0.0, cfg.retriever.model)
    # Every field is set from the config: none has a default of its own to drift from the schema's.
    assert all(f.default is dataclasses.MISSING for f in dataclasses.fields(QASettings))


def test_qa_system_refuses_a_config_in_place_of_settings():
    with pytest.raises(TypeError, match=r"QASettings\.from_config\(cfg\)"):
        QASystem(load_config(), lm=None, tokenizer=None)
