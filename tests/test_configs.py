"""The config system: YAML + `extends` + dotted overrides into typed dataclasses, with errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.errors import ConfigError, UserError
from configs import load_config
from configs.loader import config_from_dict, iter_keys, save_config, to_dict
from configs.models import resolve_encoder_path, resolve_lm_path

REPO = Path(__file__).resolve().parents[1]


def test_every_shipped_config_loads():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.run_dir, path


def test_unknown_key_names_the_key_the_file_and_a_suggestion(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert "train.lrr" in msg and str(path.name) in msg and "train.lr" in msg


def test_wrong_type_names_the_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  max_steps: many\n")
    with pytest.raises(ConfigError, match="train.max_steps"):
        load_config(path)
    with pytest.raises(ConfigError, match="command line.*train.batch_size"):
        load_config(None, ["train.batch_size=1.5"])


def test_choice_and_cross_field_checks():
    with pytest.raises(ConfigError, match="train.retrieval"):
        load_config(None, ["train.retrieval=sometimes"])
    with pytest.raises(ConfigError, match="data.stride"):
        load_config(None, ["data.stride=400"])


def test_hybrid_weight_out_of_range_is_refused_while_hybrid_is_off():
    with pytest.raises(ConfigError, match="retriever.hybrid.weight"):
        load_config(None, ["retriever.hybrid.weight=5"])
    with pytest.raises(ConfigError, match="retriever.hybrid.depth"):
        load_config(None, ["retriever.hybrid.depth=0"])
    with pytest.raises(ConfigError, match="retriever.hybrid.k1"):
        load_config(None, ["retriever.hybrid.b=1.5"])
    assert load_config(None, ["retriever.hybrid.weight=1"]).retriever.hybrid.weight == 1.0


def test_extends_and_overrides_in_order(tmp_path):
    (tmp_path / "base.yaml").write_text("run_dir: runs/base\ntrain:\n  lr: 0.5\n  max_steps: 7\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\ntrain:\n  lr: 0.25\n")
    cfg = load_config(tmp_path / "child.yaml", ["train.max_steps=9"])
    assert (cfg.run_dir, cfg.train.lr, cfg.train.max_steps) == ("runs/base", 0.25, 9)


def test_extends_loop_is_an_error(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_config(tmp_path / "a.yaml")


def test_comma_list_override_items_get_the_list_item_type():
    """Regression: `eval.k_values=1,3` used to keep the items as strings and fail the int check."""
    cfg = load_config(None, ["eval.k_values=1,3", "train.systems=dynamic_prefix@p32,static_prefix"])
    assert cfg.eval.k_values == [1, 3]
    assert cfg.train.systems == ["dynamic_prefix@p32", "static_prefix"]
    assert load_config(None, ["eval.k_values=5"]).eval.k_values == [5]


def test_override_without_equals_is_explained():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.lr"])


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(REPO / "configs" / "default.yaml", ["train.lr=0.01", "eval.k_values=1,2"])
    save_config(cfg, tmp_path / "saved.yaml")
    again = load_config(tmp_path / "saved.yaml")
    assert to_dict(again) == to_dict(cfg)
    assert to_dict(config_from_dict(to_dict(cfg))) == to_dict(cfg)


def test_retired_key_is_refused_naming_its_replacement(tmp_path):
    """app.max_question_chars became lm.max_question_chars (issue 23: one question-length limit)."""
    with pytest.raises(ConfigError, match=r"command line: `app\.max_question_chars` is retired; use "
                                          r"lm\.max_question_chars"):
        load_config(None, ["app.max_question_chars=200"])
    path = tmp_path / "c.yaml"
    path.write_text("app:\n  max_question_chars: 200\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: `app\.max_question_chars` is retired"):
        load_config(path)


def test_saved_config_with_a_retired_key_still_loads():
    """A checkpoint's config.yaml lists every key of its day: one saved before app.max_question_chars moved to
    lm.max_question_chars (as the shipped model's of 2026-12-03 was) still loads."""
    import yaml

    saved = REPO / "models" / "smollm2-135m-squad" / "dynamic_prefix@pfull" / "config.yaml"
    data = yaml.safe_load(saved.read_text())
    data["app"]["max_question_chars"] = data["lm"]["max_question_chars"]  # the key of its day
    cfg = config_from_dict(data, str(saved))
    assert cfg.lm.max_question_chars == data["lm"]["max_question_chars"]
    assert not hasattr(cfg.app, "max_question_chars")
    with pytest.raises(ConfigError, match=r"unknown config key `app\.nonsense`"):
        config_from_dict({"app": {"nonsense": 1}})


def test_one_question_limit_defined_once():
    from configs.schema import MAX_QUESTION_CHARS
    from lm.prompting import PromptTemplate

    assert load_config().lm.max_question_chars == MAX_QUESTION_CHARS
    assert PromptTemplate.__init__.__defaults__[-1] == MAX_QUESTION_CHARS


def test_every_key_has_help():
    missing = [key for key, _tp, _default, help_text, _choices in iter_keys() if not help_text]
    assert not missing


def test_missing_local_model_paths_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        resolve_lm_path(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="config.json"):
        resolve_lm_path(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="does not exist"):
        resolve_encoder_path("./no/such/encoder")
    assert Path(resolve_encoder_path("embedded:minilm-l6"), "config.json").is_file()


def test_commands_refuse_stray_arguments_unless_they_take_them():
    from configs.cli import build_parser, parse

    parser = build_parser("prog", "a command")
    cfg, ns = parse(parser, ["train.lr=0.5"])
    assert cfg.train.lr == 0.5 and ns.args == []
    with pytest.raises(UserError, match="unexpected arguments.*'typo'"):
        parse(parser, ["typo", "train.lr=0.5"])
    _, ns = parse(parser, ["Who founded it?", "train.lr=0.5"], positional=True)
    assert ns.args == ["Who founded it?"]
