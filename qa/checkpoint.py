"""Checkpoints: `run_dir/checkpoints/{step-N,final}/` with one sub-folder per trained system + manifest.json.

    <system>/knowledge_encoder.safetensors + config.yaml    dynamic systems
    <system>/adapter_config.json + adapter_model.safetensors + config.yaml   peft static prefixes
    retriever/      the jointly trained retriever (train.joint_retriever only), a sentence-transformers folder
    manifest.json   systems, LM fingerprint, retriever encoder, P, data fingerprints, joint_retriever

Only safetensors, JSON and YAML: nothing here unpickles. A checkpoint made for another LM is refused.
Each system's manifest entry holds `sha256`: {weights file: sha256}, checked before the weights load; a
damaged, truncated or missing weights file is refused with a UserError naming it (an entry without
`sha256`, from before hashes were recorded, loads unchecked).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from common.atomic import atomic_dir, atomic_write_json
from common.errors import UserError
from common.integrity import read_json_object, sha256_file, verify_file
from configs.loader import config_from_dict, to_dict
from configs.models import lm_fingerprint
from configs.schema import Config, KnowledgeEncoderConfig
from knowledge_encoder.encoder import KnowledgeEncoder
from lm.prefix import Prefix
from lm.prompting import PromptTemplate, TextSegment
from qa.model import LossWeights, PrefixQAModel
from qa.static_prefix import ADAPTER_WEIGHTS, StaticPrefix
from qa.systems import SystemName, parse_system

MANIFEST = "manifest.json"
ENCODER_WEIGHTS = "knowledge_encoder.safetensors"
# The LM's own K,V of this text initialise static and format slots (repeated if more slots are asked for).
INSTRUCTION = (
    "Read the context and answer the question with a short phrase taken from it, "
    "without a full sentence and without explanation. "
)


def instruction_prefix(backbone_lm, template: PromptTemplate, slots: int) -> Prefix:
    """(1, H, slots, D) per layer: the frozen LM's K,V of the instruction text."""
    from knowledge_encoder.backbones import LMBackbone

    reader = LMBackbone(backbone_lm, template, max_tokens=10_000)
    ids = template.segment_ids(TextSegment("Instructions", INSTRUCTION), 10_000)
    while len(ids) < slots:
        ids = ids + ids
    feats = reader.features_from_ids([ids[:slots]])
    return Prefix(feats.keys, feats.values, feats.mask, next_position=slots)


def encoder_config(system: SystemName, cfg: Config) -> KnowledgeEncoderConfig:
    return dataclasses.replace(cfg.knowledge_encoder, prefix_slots=system.prefix_slots(cfg.knowledge_encoder.prefix_slots))


def loss_weights(cfg: Config) -> LossWeights:
    t = cfg.train
    weight = t.distill_weight if t.teacher == "pfull" else 0.0
    return LossWeights(distill=weight, hidden=t.hidden_distill_weight, temperature=t.distill_temperature)


def new_model(system: SystemName, cfg: Config, lm, template: PromptTemplate, feature_dim: int | None) -> PrefixQAModel:
    """A freshly initialised trainable system (warm-started from the LM's own K,V)."""
    encoder = static = None
    if system.kind.dynamic:
        encoder = KnowledgeEncoder(encoder_config(system, cfg), lm.config, feature_dim, lm=lm,
                                   tokenizer=template.tokenizer)
        if encoder.format is not None:
            encoder.format.init_from(instruction_prefix(lm, template, cfg.knowledge_encoder.format_slots))
    if system.kind.static:
        init = instruction_prefix(lm, template, cfg.train.static_slots)
        static = StaticPrefix(lm.config, cfg.train.static_slots, init=init, base_model=cfg.lm.model)
    return PrefixQAModel(system, lm, encoder, static, loss_weights(cfg))


def save_checkpoint(directory: Path, models: dict[str, PrefixQAModel], cfg: Config, lm_config,
                    extra: dict | None = None, retriever=None) -> None:
    """Write all systems atomically: a crash leaves the previous checkpoint (or none), never half of one.

    Refuses the shipped model's folder: training writes run_dir/checkpoints/*, a shipped model is made with
    `python -m qa.assemble` (a test once overwrote it through `default_checkpoint`).

    `retriever` (a `qa.joint_retriever.JointRetriever`, train.joint_retriever) is written in the same atomic
    step as the sentence-transformers folder `retriever/`; the manifest's `joint_retriever` describes it
    (null when the retriever was not trained).
    """
    if Path(directory).resolve() == SHIPPED_MODEL.resolve():
        raise UserError(f"refusing to overwrite the shipped model {SHIPPED_MODEL}: save a trained run under its "
                        "run_dir and ship it with `python -m qa.assemble`")
    manifest = {
        "format": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "lm": {"model": cfg.lm.model, **lm_fingerprint(lm_config)},
        "retriever_model": cfg.retriever.model,
        "systems": {},
        "joint_retriever": retriever.describe(cfg.retriever.model) if retriever is not None else None,
        **(extra or {}),
    }
    with atomic_dir(directory) as tmp:
        if retriever is not None:
            retriever.save(tmp / manifest["joint_retriever"]["folder"])
        for name, model in models.items():
            sub = tmp / name
            sub.mkdir()
            (sub / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
            info = {"base": model.system.base, "trainable_parameters": sum(p.numel() for p in model.parameters())}
            if model.encoder is not None:
                state = {k: v.detach().cpu().contiguous() for k, v in model.encoder.state_dict().items()}
                save_file(state, str(sub / ENCODER_WEIGHTS))
                info["knowledge_encoder"] = to_dict(model.encoder.cfg)
                info["prefix_slots"] = model.encoder.slots
                info["feature_dim"] = model.encoder.feature_dim
            if model.static is not None:
                model.static.save(sub)
                info["static_slots"] = model.static.slots
            info["sha256"] = weights_sha256(sub)
            manifest["systems"][name] = info
        atomic_write_json(tmp / MANIFEST, manifest)


# The trained model that ships with the repo (for the embedded SmolLM2-135M): models/<name>/, checkpoint layout.
SHIPPED_MODEL = Path(__file__).resolve().parents[1] / "models" / "smollm2-135m-squad"

# What a checkpoint saved before a knowledge_encoder key existed was trained with: a missing key means the
# behaviour of that time, not today's default (pool_rope and slot_bias changed default when measured better).
LEGACY_ENCODER_KEYS = {"pool_rope": "post", "slot_bias": False, "compressor": "pool", "encode_lora_rank": 0,
                       "select_scores": "kvzip", "scorer_window": 0,
                       "select_skip_repeats": False, "scorer_layers": 0, "select_gather_mentions": False}


def saved_encoder_config(saved: dict) -> KnowledgeEncoderConfig:
    """The KnowledgeEncoderConfig a manifest describes, with LEGACY_ENCODER_KEYS for keys it predates."""
    return KnowledgeEncoderConfig(**{**LEGACY_ENCODER_KEYS, **saved})


STATE_REBUILD = ("the saved training state is damaged: delete its folder and train again without --resume, or "
                 "start from a saved step-N checkpoint with train.init_from")


def read_state_meta(path: Path) -> dict:
    """The JSON beside a saved training state (trainer_state.json, pretrainer_state.json); a damaged one is
    refused with a UserError, never loaded half."""
    saved = read_json_object(path, "training state", STATE_REBUILD)
    if "step" not in saved:
        raise UserError(f"{path}: not a training state; {STATE_REBUILD}")
    return saved


def weights_sha256(sub: Path) -> dict[str, str]:
    """{file: sha256} of a system folder's weights (what its manifest entry records as `sha256`)."""
    return {p.name: sha256_file(p) for p in sorted(Path(sub).glob("*.safetensors"))}


def encoder_sha256(checkpoint: Path | str, system: str) -> str:
    """The sha256 of a system's knowledge-encoder weights: what prefix stores and caches are fingerprinted by."""
    return sha256_file(Path(checkpoint) / system / ENCODER_WEIGHTS)


def _rebuild_hint(directory: Path) -> str:
    if Path(directory).resolve() == SHIPPED_MODEL.resolve():
        return f"restore the shipped model with `git checkout -- models/{SHIPPED_MODEL.name}`"
    return "train it again with `python -m qa.train --config C` (or set qa.checkpoint to another checkpoint)"


def verify_weights(directory: Path, name: str, info: dict) -> None:
    """Refuse system `name` of checkpoint `directory` when a weights file it needs is missing or does not match
    the sha256 its manifest entry `info` records (unchecked when the entry predates hashes)."""
    kind = parse_system(name).kind
    needed = [f for f, used in ((ENCODER_WEIGHTS, kind.dynamic), (ADAPTER_WEIGHTS, kind.static)) if used]
    for file in needed:
        verify_file(Path(directory) / name / file, info.get("sha256", {}).get(file), _rebuild_hint(directory))


def _load_weights(path: Path, directory: Path) -> dict:
    """load_file, with a truncated or unreadable file refused by a UserError that names it."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise UserError(f"{path}: the weights cannot be read ({err}); {_rebuild_hint(directory)}") from err


def read_manifest(directory: Path) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise UserError(f"{directory} is not a checkpoint (no {MANIFEST}); train one with `python -m qa.train`")
    manifest = read_json_object(path, "checkpoint manifest", _rebuild_hint(directory))
    if not isinstance(manifest.get("systems"), dict):
        raise UserError(f"{path}: not a checkpoint manifest; {_rebuild_hint(directory)}")
    return manifest


def load_models(directory: Path, names: list[str], lm, feature_dims: dict[str, int | None] | None = None,
                lm_spec: str | None = None, tokenizer=None) -> dict[str, PrefixQAModel]:
    """Load the named systems (checkpoint sub-folders) for `lm`; refuses another LM or a missing system.
    `tokenizer` (the LM's) serves encoders that select by mention (else they load it from the LM's path)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    want = lm_fingerprint(lm.config)
    have = {k: v for k, v in manifest["lm"].items() if k != "model"}
    if have != want:
        raise UserError(
            f"checkpoint {directory} was trained for LM {manifest['lm'].get('model')} ({have}); "
            f"the configured LM {lm_spec or ''} is {want}. Use the same lm.model as in training."
        )
    models = {}
    for name in names:
        if name not in manifest["systems"]:
            raise UserError(f"checkpoint {directory} has no system `{name}`; it holds: "
                            f"{', '.join(manifest['systems']) or 'nothing'}")
        system = parse_system(name)
        sub = directory / name
        verify_weights(directory, name, manifest["systems"][name])
        saved_cfg = config_from_dict(yaml.safe_load((sub / "config.yaml").read_text()), str(sub / "config.yaml"))
        encoder = static = None
        if system.kind.dynamic:
            kcfg = saved_encoder_config(manifest["systems"][name]["knowledge_encoder"])
            dim = manifest["systems"][name].get("feature_dim") or (feature_dims or {}).get(kcfg.backbone)
            encoder = KnowledgeEncoder(kcfg, lm.config, dim, lm=lm, tokenizer=tokenizer)
            encoder.load_state_dict(_load_weights(sub / ENCODER_WEIGHTS, directory))
        if system.kind.static:
            try:
                static = StaticPrefix.load(sub, lm.config)
            except (SafetensorError, OSError) as err:
                raise UserError(f"{sub / ADAPTER_WEIGHTS}: the weights cannot be read ({err}); "
                                f"{_rebuild_hint(directory)}") from err
        model = PrefixQAModel(system, lm, encoder, static, loss_weights(saved_cfg))
        device = next(lm.parameters()).device
        models[name] = model.to(device).eval().requires_grad_(False)
    return models


def init_encoder_from(model: PrefixQAModel, spec: str, name: str, lm_config,
                      key: str = "train.init_from") -> list[str] | None:
    """Start `model`'s knowledge encoder from a trained one (train.init_from = `DIR` or `DIR:SYSTEM`).

    `DIR` reads the same-named system of checkpoint DIR, `DIR:SYSTEM` another one (e.g. a compressed encoder
    from a trained `dynamic_prefix@pfull`: its format slots and K/V heads load, the pooling keeps its start).
    Returns the weight names that loaded, or None when DIR holds no such dynamic system (the model keeps its
    warm start); refuses a checkpoint of another LM or weights of another shape with a clear message.
    """
    directory, source = _split_spec(spec, name)
    manifest = read_manifest(directory)
    have = {k: v for k, v in manifest["lm"].items() if k != "model"}
    if have != lm_fingerprint(lm_config):
        raise UserError(f"{key}={spec} was trained for LM {manifest['lm'].get('model')}; use a "
                        "checkpoint of the configured lm.model")
    info = manifest["systems"].get(source)
    if model.encoder is None or info is None or "knowledge_encoder" not in info:
        if source != name:
            raise UserError(f"{key}={spec}: {directory} has no dynamic system `{source}`; it holds "
                            f"{', '.join(manifest['systems'])}")
        return None
    verify_weights(directory, source, info)
    weights = _load_weights(Path(directory) / source / ENCODER_WEIGHTS, directory)
    own = model.encoder.state_dict()
    wrong = [k for k, v in weights.items() if k in own and own[k].shape != v.shape]
    if wrong or (source == name and set(weights) != set(own)):
        raise UserError(f"{key}={spec}: the knowledge encoder of `{source}` there has another shape than "
                        f"the configured `{name}` ({', '.join(wrong) or 'other weights'}); "
                        f"saved config: {info['knowledge_encoder']}")
    shared = {k: v for k, v in weights.items() if k in own}
    model.encoder.load_state_dict(shared, strict=False)
    return sorted(shared)


def _split_spec(spec: str, name: str) -> tuple[Path, str]:
    """`DIR` -> (DIR, name); `DIR:SYSTEM` -> (DIR, SYSTEM) when DIR exists as written before the colon."""
    head, sep, tail = str(spec).rpartition(":")
    if sep and head and tail and not Path(spec).exists():
        return Path(head), tail
    return Path(spec), name
