"""Assemble one checkpoint from systems trained in different runs (and derive variants of them).

    python -m qa.assemble OUT CHECKPOINT:SYSTEM[=NAME] [CHECKPOINT:SYSTEM[=NAME] ...] [--encoder NAME key=value ...]

Each entry copies one system folder of a checkpoint (`run_dir/checkpoints/final`, a shipped `models/<name>`)
into OUT, under NAME when given. `--encoder NAME key=value[,key=value]` changes knowledge_encoder settings of
an entry's copy, e.g. the training-free selection baseline from a trained full-length encoder:

    python -m qa.assemble runs/x/checkpoints/cmp runs/x/checkpoints/final:dynamic_prefix@pfull \\
        runs/x/checkpoints/final:dynamic_prefix@pfull=dynamic_prefix@p32-kvzip \\
        --encoder dynamic_prefix@p32-kvzip compressor=select,prefix_slots=32

Every source must be trained for the same LM (same fingerprint); OUT's manifest keeps, per system, where it
came from (checkpoint, step, data, training seconds) and is written atomically with the weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path

import yaml

from common.atomic import atomic_dir, atomic_write_json
from common.errors import UserError
from configs.cli import run_main
from configs.loader import config_from_dict
from configs.schema import KnowledgeEncoderConfig
from qa.checkpoint import LEGACY_ENCODER_KEYS, MANIFEST, read_manifest, verify_weights, weights_sha256
from qa.systems import parse_system

PROVENANCE = ("step", "data", "train_seconds", "store_fingerprint", "qa_fingerprint", "created", "continues")


def parse_entry(text: str) -> tuple[Path, str, str]:
    """`CHECKPOINT:SYSTEM[=NAME]` -> (checkpoint, system, name)."""
    path, sep, rest = text.rpartition(":")
    if not sep or not path or not rest:
        raise UserError(f"`{text}`: an entry is CHECKPOINT:SYSTEM or CHECKPOINT:SYSTEM=NAME")
    system, _, name = rest.partition("=")
    name = name or system
    parse_system(name)  # a name eval.run can read
    return Path(path), system, name


def encoder_overrides(items: list[list[str]]) -> dict[str, dict]:
    """--encoder NAME k=v,k=v -> {NAME: {k: v}} with values parsed and keys checked."""
    fields = {f.name: f for f in dataclasses.fields(KnowledgeEncoderConfig)}
    out: dict[str, dict] = {}
    for name, spec in items:
        for pair in spec.split(","):
            key, sep, value = pair.partition("=")
            key = key.strip().removeprefix("knowledge_encoder.")
            if not sep or key not in fields:
                raise UserError(f"--encoder {name}: `{pair}` is not key=value with a knowledge_encoder key; keys: "
                                f"{', '.join(fields)}")
            out.setdefault(name, {})[key] = yaml.safe_load(value.strip())
    return out


def assemble(out: Path, entries: list[str], overrides: dict[str, dict] | None = None, force: bool = False,
             metrics: list[Path] = ()) -> dict:
    out = Path(out)
    overrides = overrides or {}
    if (out / MANIFEST).exists() and not force:
        raise UserError(f"{out} already holds a checkpoint; pass --force to replace it")
    parsed = [parse_entry(e) for e in entries]
    names = [n for _, _, n in parsed]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UserError(f"system name(s) {', '.join(dupes)} given twice; rename one with CHECKPOINT:SYSTEM=NAME")
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise UserError(f"--encoder names {', '.join(unknown)}, which no entry produces ({', '.join(names)})")
    manifests = {src: read_manifest(src) for src, _, _ in parsed}
    first = manifests[parsed[0][0]]
    manifest = {"format": first.get("format", 1), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "lm": first["lm"], "retriever_model": first.get("retriever_model"), "systems": {},
                "joint_retriever": None, "assembled_from": []}
    with atomic_dir(out) as tmp:
        for src, system, name in parsed:
            source = manifests[src]
            if source["lm"] != first["lm"]:
                raise UserError(f"{src} was trained for LM {source['lm']}, {parsed[0][0]} for {first['lm']}: a "
                                "checkpoint holds systems of one LM")
            if system not in source["systems"]:
                raise UserError(f"{src} has no system `{system}`; it holds: {', '.join(source['systems'])}")
            info = dict(source["systems"][system])
            verify_weights(src, system, info)  # never ship a damaged copy
            shutil.copytree(src / system, tmp / name)
            info["sha256"] = weights_sha256(tmp / name)  # also for a source from before hashes
            if name in overrides:
                if "knowledge_encoder" not in info:
                    raise UserError(f"--encoder {name}: `{system}` has no knowledge encoder")
                merged = {**LEGACY_ENCODER_KEYS, **info["knowledge_encoder"], **overrides[name]}
                kcfg = config_from_dict({"knowledge_encoder": merged}, f"--encoder {name}").knowledge_encoder
                info["knowledge_encoder"] = dataclasses.asdict(kcfg)
                info["prefix_slots"] = kcfg.prefix_slots or 0
                _rewrite_config(tmp / name / "config.yaml", overrides[name])
                # The source's metrics measured the encoder before these changes: they do not describe this one.
                info.pop("metrics", None)
            # A system copied from an assembled checkpoint (e.g. the shipped model, to add a system to it) keeps
            # the run it was trained in; `via` records the copy.
            if "source" in info:
                info["source"] = {**info["source"], "via": str(src)}
            else:
                info["source"] = {"checkpoint": str(src), "system": system,
                                  **{k: source[k] for k in PROVENANCE if k in source}}
            manifest["systems"][name] = info
            manifest["assembled_from"].append({"checkpoint": str(src), "system": system, "as": name,
                                               "encoder_overrides": overrides.get(name)})
        for path in metrics:
            _add_metrics(manifest, Path(path))
        atomic_write_json(tmp / MANIFEST, manifest)
    return manifest


def _add_metrics(manifest: dict, path: Path) -> None:
    """Copy an eval.run metrics.json's rows of the assembled systems into their manifest entries."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"--metrics {path}: not a readable metrics.json ({err})") from err
    rows = data.get("systems") or {}
    sweep = data.get("k_sweep") or {}
    config = data.get("config") or {}
    setup = {"file": str(path), "n": data.get("n"), "split": data.get("split"),
             "decoding": config.get("decoding", "free"), "reading": config.get("reading", "joint"),
             "rerank": config.get("rerank", "none")}
    for name, info in manifest["systems"].items():
        if name in rows:
            info.setdefault("metrics", []).append({**setup, "row": name, **rows[name]})
        main_k = (rows.get(name) or {}).get("k")
        for k, row in (sweep.get(name) or {}).items():  # eval.k_values: the same system at other k
            if int(k) != main_k:  # the main row already holds retriever.top_k's numbers
                info.setdefault("metrics", []).append({**setup, "row": f"{name} k={k}", "k": int(k), **row})


def _rewrite_config(path: Path, changes: dict) -> None:
    """Keep a copied system's config.yaml in step with its manifest entry."""
    cfg = yaml.safe_load(path.read_text())
    cfg.setdefault("knowledge_encoder", {}).update(changes)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qa.assemble", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="the checkpoint directory to write")
    parser.add_argument("entries", nargs="+", metavar="CHECKPOINT:SYSTEM[=NAME]", help="systems to copy")
    parser.add_argument("--encoder", nargs=2, action="append", default=[], metavar=("NAME", "KEY=VALUE,..."),
                        help="knowledge_encoder settings of the copy NAME (e.g. compressor=select,prefix_slots=32)")
    parser.add_argument("--force", action="store_true", help="replace an existing checkpoint at OUT (the whole folder: keep a copy of "
                        "anything else in it, e.g. a MODEL_CARD.md)")
    parser.add_argument("--metrics", action="append", default=[], metavar="METRICS_JSON",
                        help="an eval.run metrics.json whose rows of the assembled systems go into the manifest")
    ns = parser.parse_args(argv)
    manifest = assemble(Path(ns.out), ns.entries, encoder_overrides(ns.encoder), ns.force, ns.metrics)
    print(json.dumps({"checkpoint": ns.out, "systems": list(manifest["systems"])}, indent=2))
    return 0


if __name__ == "__main__":
    run_main(main)
