"""YAML + dotted overrides → validated `Config`.

A YAML file may start with `extends: other.yaml` (relative to itself) to inherit and override.
Unknown keys and values of the wrong type raise `ConfigError` naming the key and where it came from.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from common.errors import ConfigError
from configs.schema import Config
from configs.window import check_window_fits_encoder


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _scalar(text: str) -> Any:
    """A comma-list item as YAML reads it (`3` -> 3, `0.5` -> 0.5), the text itself when YAML cannot."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against type `tp`, with the few conversions YAML and the command line need."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return _coerce(value, a, key, source)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is list:
        (item_tp,) = args
        if isinstance(value, str):
            # `eval.k_values=1,3` from the command line: each item is read as a YAML scalar.
            items = [v.strip() for v in value.split(",") if v.strip()]
            value = items if item_tp is str else [_scalar(v) for v in items]
        if isinstance(value, int | float) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{source}: `{key}` must be a list (or a comma-separated string), got {value!r}")
        return [_coerce(v, item_tp, key, source) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: `{key}` must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{source}: `{key}` must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{source}: `{key}` must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{source}: `{key}` must be a string, got {value!r}")
    raise ConfigError(f"{source}: `{key}` has an unsupported type {tp}")


# Keys that are gone, with what replaced them. A config a person wrote is refused with the new name (a silent
# alias would keep two names for one setting alive); a config the program saved (a checkpoint's config.yaml,
# which lists every key of its day) loads with the retired key dropped.
RETIRED = {
    "app.max_question_chars": "lm.max_question_chars (one question-length limit for the demo and every command; "
                              "its default is 1000 characters, the demo's was 500)",
}


def _unknown_key(key: str, known: list[str], source: str) -> ConfigError:
    leaf = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, known, n=1)
    hint = f" (did you mean `{key.rsplit('.', 1)[0] + '.' if '.' in key else ''}{close[0]}`?)" if close else ""
    return ConfigError(f"{source}: unknown config key `{key}`{hint}")


def _apply(obj: Any, updates: dict, prefix: str, source: str, saved: bool = False) -> None:
    """Set `updates` on the (section) dataclass `obj`; `saved` drops RETIRED keys instead of refusing them."""
    hints = _hints(type(obj))
    for name, value in updates.items():
        key = f"{prefix}{name}"
        if key in RETIRED:
            if saved:
                continue
            raise ConfigError(f"{source}: `{key}` is retired; use {RETIRED[key]}")
        if name not in hints:
            raise _unknown_key(key, list(hints), source)
        tp = hints[name]
        if _is_dataclass_type(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: `{key}` is a section; give it as a mapping, not {value!r}")
            _apply(getattr(obj, name), value, key + ".", source, saved)
            continue
        value = _coerce(value, tp, key, source)
        choices = next(f for f in dataclasses.fields(obj) if f.name == name).metadata.get("choices")
        if choices is not None and value not in choices:
            raise ConfigError(f"{source}: `{key}` must be one of {', '.join(map(str, choices))}; got {value!r}")
        setattr(obj, name, value)


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[dict, str]]:
    """The chain of (mapping, source) a file resolves to, base first."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: `extends` loops back to itself")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    chain: list[tuple[dict, str]] = []
    base = data.pop("extends", None)
    if base is not None:
        chain.extend(_read_yaml(path.parent / base, (*seen, path)))
    chain.append((data, str(path)))
    return chain


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override `{item}` is not of the form key=value (e.g. train.lr=3e-5)")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # YAML reads `nq:validation` or `a,b` as strings already; anything else odd stays the raw text.
    if isinstance(value, dict):
        value = raw
    return key, value


def _nest(key: str, value: Any) -> dict:
    out: dict = {}
    node = out
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a validated Config from a YAML file (or the defaults) and `key=value` overrides."""
    cfg = Config()
    if path is not None:
        for data, source in _read_yaml(Path(path)):
            _apply(cfg, data, "", source)
    for item in overrides:
        key, value = _parse_override(item)
        _apply(cfg, _nest(key, value), "", "command line")
    _validate(cfg)
    return cfg


# A window this short holds a title and a word or two: no passage a reader or a retriever can use.
MIN_WINDOW = 8

# Counts that make no sense below a minimum: (section, key, minimum, what the minimum means).
_MINIMUMS = (
    ("data", "num_workers", 0, "0 = all cores"),
    ("data", "chunk_docs", 1, ""),
    ("retriever", "max_seq_length", 1, ""),
    ("retriever", "batch_size", 1, ""),
    ("index", "nlist", 0, "0 = automatic"),
    ("index", "nprobe", 0, "0 = automatic"),
    ("index", "hnsw_ef_search", 0, "0 = automatic"),
    ("index", "refine_k_factor", 0, "0 = automatic"),
    ("index", "shard_size", 1, ""),
    ("index", "train_sample", 0, "0 = automatic"),
    ("index", "milvus_hnsw_m", 2, ""),
    ("index", "milvus_hnsw_ef_construction", 1, ""),
    ("index", "milvus_hnsw_ef", 1, ""),
    ("lm", "max_new_tokens", 1, ""),
    ("lm", "max_question_chars", 1, ""),
    ("knowledge_encoder", "store_shard_rows", 0, "0 = automatic"),
    ("compute", "ray_workers", 1, ""),
    ("compute", "ray_cpus_per_worker", 0, ""),
    ("compute", "ray_gpus_per_worker", 0, ""),
)


def _check_run_dir(run_dir: str) -> None:
    """run_dir must be a folder or creatable as one: no component of it may be an existing file."""
    if not str(run_dir).strip():
        raise ConfigError("run_dir is empty; give a folder, e.g. run_dir=runs/mine")
    path = Path(run_dir)
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                what = "is" if p == path else f"is inside {p}, which is"
                raise ConfigError(
                    f"run_dir {run_dir} {what} an existing file, not a folder; give a folder "
                    "(run_dir=runs/NAME), or move the file away"
                )
            return


_MILVUS_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,199}")
_MILVUS_SCHEMES = ("http://", "https://", "tcp://", "grpc://", "unix:")


def _check_milvus(index) -> None:
    """index.milvus_*: checked whatever index.backend is, so a typo surfaces before the backend is switched."""
    if not _MILVUS_NAME.fullmatch(index.milvus_collection):
        raise ConfigError(
            f"index.milvus_collection must be a Milvus name (a letter or _, then letters, digits or _, at most "
            f"200 characters), got {index.milvus_collection!r}"
        )
    uri = index.milvus_uri
    if uri is not None and not (uri.startswith(_MILVUS_SCHEMES) or (uri.endswith(".db") and uri.strip() != ".db")):
        raise ConfigError(
            f"index.milvus_uri must be a server URI (http://host:19530, https://…, tcp://…, unix:…) or a "
            f"milvus-lite file ending in .db, got {uri!r} (null = run_dir/index/milvus.db)"
        )
    if index.milvus_timeout <= 0:
        raise ConfigError(f"index.milvus_timeout must be > 0 seconds, got {index.milvus_timeout}")


def _validate(cfg: Config) -> None:
    """Cross-field checks that a type alone cannot express."""
    d = cfg.data
    if d.window < MIN_WINDOW:
        raise ConfigError(
            f"data.window must be at least {MIN_WINDOW} tokens (title + text of a segment), got {d.window}; "
            "the default is 288"
        )
    if not 0 <= d.stride < d.window:
        raise ConfigError(f"data.stride ({d.stride}) must be >= 0 and smaller than data.window ({d.window})")
    # What the config alone tells: build and index check again with the passage prefix and the encoder's limit.
    check_window_fits_encoder(d.window, cfg.retriever.max_seq_length, error=ConfigError)
    if d.dev_fraction < 0 or d.test_fraction < 0 or not d.dev_fraction + d.test_fraction < 1:
        raise ConfigError(
            f"data.dev_fraction ({d.dev_fraction}) and data.test_fraction ({d.test_fraction}) must be >= 0 "
            "and sum to less than 1"
        )
    for section, key, minimum, meaning in _MINIMUMS:
        value = getattr(getattr(cfg, section), key)
        if value < minimum:
            note = f" ({meaning})" if meaning else ""
            raise ConfigError(f"{section}.{key} must be >= {minimum}{note}, got {value}")
    if not 1 <= cfg.app.port <= 65535:
        raise ConfigError(f"app.port must be a TCP port from 1 to 65535, got {cfg.app.port} (the default is 7860)")
    _check_run_dir(cfg.run_dir)
    if cfg.retriever.top_k < 1:
        raise ConfigError("retriever.top_k must be >= 1")
    if cfg.knowledge_encoder.prefix_slots is not None and cfg.knowledge_encoder.prefix_slots < 0:
        raise ConfigError("knowledge_encoder.prefix_slots must be >= 0 (0 or null = segment length)")
    _check_milvus(cfg.index)
    hybrid = cfg.retriever.hybrid
    # Checked even while hybrid.enabled is false, so a typo surfaces before a long run turns it on.
    if not 0.0 <= hybrid.weight <= 1.0:
        raise ConfigError(f"retriever.hybrid.weight must be in [0, 1], got {hybrid.weight}")
    if hybrid.depth < 1:
        raise ConfigError(f"retriever.hybrid.depth must be >= 1, got {hybrid.depth}")
    if hybrid.k1 < 0 or not 0.0 <= hybrid.b <= 1.0:
        raise ConfigError(f"retriever.hybrid.k1 must be >= 0 and b in [0, 1], got k1={hybrid.k1}, b={hybrid.b}")


def to_dict(cfg: Any) -> dict:
    """Plain nested dict of a Config (or any section), for saving next to artifacts."""
    return dataclasses.asdict(cfg)


def config_from_dict(data: dict, source: str = "saved config") -> Config:
    """A Config from a dict the program saved (to_dict, a checkpoint's config.yaml): keys it has retired since
    are dropped (RETIRED), anything else unknown is refused as in load_config."""
    cfg = Config()
    _apply(cfg, data, "", source, saved=True)
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    from common.atomic import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False))


def iter_keys(cls=Config, prefix: str = ""):
    """Yields (dotted key, type, default, help, choices) for every leaf key, for `--help`."""
    inst = cls()
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _is_dataclass_type(tp):
            yield from iter_keys(tp, f"{prefix}{f.name}.")
        else:
            yield (f"{prefix}{f.name}", tp, getattr(inst, f.name), f.metadata.get("help", ""),
                   f.metadata.get("choices"))
