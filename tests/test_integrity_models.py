"""Issue 24 for trained artifacts: damaged prefix-store shards, prefix-cache entries and checkpoint weights are
refused (naming the file and the command that rebuilds it), never served; precompute computes a damaged shard
again. The data artifacts (segment store, embeddings, live additions) are in test_integrity.py."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch

from common.errors import UserError
from common.integrity import forget_verified
from configs.loader import load_config
from configs.schema import Config
from knowledge_encoder.prefix_store import PrefixStore, prefix_dir
from lm.prompting import PromptTemplate
from qa.checkpoint import (
    ENCODER_WEIGHTS,
    SHIPPED_MODEL,
    encoder_sha256,
    load_models,
    new_model,
    read_manifest,
    save_checkpoint,
    verify_weights,
)
from qa.precompute import precompute
from qa.static_prefix import ADAPTER_WEIGHTS
from qa.systems import parse_system
from tests.test_integrity import flip_byte, truncate
from tests.tiny_run import make_tiny_run

pytestmark = pytest.mark.usefixtures("one_thread")
SYSTEM = "dynamic_prefix@p2"
QUESTIONS = ["Who founded it?", "Where was it born?"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smol_tokenizer):
    """A tiny run_dir with store and index, an untrained checkpoint (a dynamic and a static system) and the
    dynamic system's prefix store."""
    from configs.models import load_lm

    root = tmp_path_factory.mktemp("integrity")
    cfg = make_tiny_run(root, smol_tokenizer)
    lm, tokenizer = load_lm(cfg.lm.model, None, "cpu")
    template = PromptTemplate(tokenizer)
    models = {
        name: new_model(parse_system(name), cfg, lm, template, None) for name in (SYSTEM, "static_prefix")
    }
    save_checkpoint(root / "run" / "checkpoints" / "final", models, cfg, lm.config)
    return root, cfg


def copy_run(tiny, tmp_path):
    """A private copy of the tiny run (its config points at the copy), with the prefix store precomputed."""
    root, cfg = tiny
    shutil.copytree(root / "run", tmp_path / "run")
    cfg = load_config(
        None,
        [
            f"run_dir={tmp_path / 'run'}",
            f"lm.model={cfg.lm.model}",
            f"retriever.model={cfg.retriever.model}",
            "index.factory=Flat",
            "knowledge_encoder.max_segment_tokens=96",
            "knowledge_encoder.format_slots=2",
            "train.static_slots=3",
            "lm.max_new_tokens=4",
            "data.synthetic.n_entities=30",
            f"qa.mode={SYSTEM}",
        ],
    )
    if not prefix_dir(cfg.run_dir, SYSTEM).is_dir():
        precompute(cfg, [SYSTEM], progress=False)
    forget_verified()
    return cfg


def open_store(cfg) -> PrefixStore:
    from data_prep.store import SegmentStore

    checkpoint = Path(cfg.run_dir) / "checkpoints" / "final"
    fp = SegmentStore.open(Path(cfg.run_dir) / "store").fingerprint
    return PrefixStore.open(prefix_dir(cfg.run_dir, SYSTEM), encoder_sha256(checkpoint, SYSTEM), fp)


def ids_offset(path) -> int:
    """Where the `ids` tensor's bytes start in a safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    return 8 + n + header["ids"]["data_offsets"][0]


# ---------------------------------------------------------------------------------------------- prefix store


def test_shard_hashes_are_recorded(tiny, tmp_path):
    from common.atomic import sha256_file

    cfg = copy_run(tiny, tmp_path)
    out = prefix_dir(cfg.run_dir, SYSTEM)
    for shard in json.loads((out / "manifest.json").read_text())["shards"]:
        assert shard["sha256"] == sha256_file(out / shard["file"])


def test_swapped_id_bytes_in_prefix_shard_are_refused_and_recomputed(tiny, tmp_path):
    """Before the fix, segment 0 was answered with segment 1's prefix while segment 0 showed as the source."""
    from qa.system import QASystem

    cfg = copy_run(tiny, tmp_path)
    good = open_store(cfg).get([0, 1])
    shard = prefix_dir(cfg.run_dir, SYSTEM) / "shard-00000.safetensors"
    raw = bytearray(shard.read_bytes())
    at = ids_offset(shard)
    raw[at], raw[at + 8] = raw[at + 8], raw[at]  # ids 0 and 1 (int64, little-endian) swap places
    shard.write_bytes(bytes(raw))
    forget_verified()
    store = open_store(cfg)
    with pytest.raises(
        UserError, match=r"shard-00000\.safetensors: sha256 does not match.*qa\.precompute"
    ):
        store.get([0])
    with pytest.raises(UserError, match=r"shard-00000\.safetensors: sha256 does not match"):
        QASystem.from_config(cfg).answer(QUESTIONS)
    report = precompute(cfg, [SYSTEM], progress=False)
    assert not report[SYSTEM].get("skipped")
    again = open_store(cfg).get([0, 1])
    torch.testing.assert_close(again.keys[0], good.keys[0])
    assert len(QASystem.from_config(cfg).answer(QUESTIONS)) == 2


def test_flipped_value_byte_in_prefix_shard_is_refused_and_recomputed(tiny, tmp_path):
    cfg = copy_run(tiny, tmp_path)
    store = open_store(cfg)
    good = store.get(list(range(len(store))))
    shard = prefix_dir(cfg.run_dir, SYSTEM) / "shard-00000.safetensors"
    flip_byte(shard, shard.stat().st_size - 3)  # the last tensor's data, not the ids
    forget_verified()
    with pytest.raises(UserError, match=r"shard-00000\.safetensors: sha256 does not match"):
        open_store(cfg).get([0])
    precompute(cfg, [SYSTEM], progress=False)
    store = open_store(cfg)
    torch.testing.assert_close(store.get(list(range(len(store)))).values[1], good.values[1])


def test_truncated_prefix_shard_is_refused_and_recomputed(tiny, tmp_path):
    cfg = copy_run(tiny, tmp_path)
    shard = prefix_dir(cfg.run_dir, SYSTEM) / "shard-00000.safetensors"
    truncate(shard)
    with pytest.raises(UserError, match=r"shard-00000\.safetensors: .*qa\.precompute"):
        open_store(cfg)
    precompute(cfg, [SYSTEM], progress=False)
    assert open_store(cfg).get([0]) is not None


def test_prefix_cache_entry_with_a_flipped_byte_is_recomputed(tmp_path, smol_tokenizer, tiny_llama):
    """A flipped value byte loaded without a word; now it is dropped and computed again, never served."""
    from knowledge_encoder.prefix_cache import PrefixCache
    from tests.test_prefix_cache import _encoder, _features

    with torch.no_grad():
        prefix = _encoder(tiny_llama)(_features(tiny_llama, smol_tokenizer))
    cache = PrefixCache(
        tmp_path / "c", {"encoder_sha256": "e", "dtype": "float32", "next_position": 320}, 1 << 30
    )
    cache.put("k0", prefix.select([0]))
    assert cache.get("k0") is not None
    path = next((tmp_path / "c").glob("*/*.safetensors"))
    flip_byte(path, path.stat().st_size - 2)
    assert cache.get("k0") is None and not path.exists() and len(cache) == 0


# ---------------------------------------------------------------------------------------------- checkpoints


def _checkpoint(tmp_path, smol_tokenizer, tiny_llama, names=(SYSTEM, "static_prefix")):
    cfg = Config()
    template = PromptTemplate(smol_tokenizer)
    models = {n: new_model(parse_system(n), cfg, tiny_llama, template, None) for n in names}
    save_checkpoint(tmp_path / "ck", models, cfg, tiny_llama.config)
    return tmp_path / "ck"


def test_checkpoint_manifest_holds_weights_hashes(tmp_path, smol_tokenizer, tiny_llama):
    from common.atomic import sha256_file

    ck = _checkpoint(tmp_path, smol_tokenizer, tiny_llama)
    systems = read_manifest(ck)["systems"]
    assert systems[SYSTEM]["sha256"] == {ENCODER_WEIGHTS: sha256_file(ck / SYSTEM / ENCODER_WEIGHTS)}
    assert systems["static_prefix"]["sha256"] == {
        ADAPTER_WEIGHTS: sha256_file(ck / "static_prefix" / ADAPTER_WEIGHTS)
    }


def test_flipped_byte_in_checkpoint_weights_is_refused(tmp_path, smol_tokenizer, tiny_llama):
    """Before the fix: rc 0 and nonsense answers."""
    ck = _checkpoint(tmp_path, smol_tokenizer, tiny_llama)
    flip_byte(ck / SYSTEM / ENCODER_WEIGHTS, (ck / SYSTEM / ENCODER_WEIGHTS).stat().st_size - 5)
    with pytest.raises(
        UserError, match=r"knowledge_encoder\.safetensors: sha256 does not match.*python -m qa\.train"
    ):
        load_models(ck, [SYSTEM], tiny_llama)
    flip_byte(
        ck / "static_prefix" / ADAPTER_WEIGHTS, (ck / "static_prefix" / ADAPTER_WEIGHTS).stat().st_size - 5
    )
    with pytest.raises(UserError, match=r"adapter_model\.safetensors: sha256 does not match"):
        load_models(ck, ["static_prefix"], tiny_llama)


def test_missing_or_truncated_checkpoint_weights_are_a_user_error(tmp_path, smol_tokenizer, tiny_llama):
    """Before the fix: a raw FileNotFoundError / SafetensorError traceback from qa.answer and eval.run."""
    ck = _checkpoint(tmp_path, smol_tokenizer, tiny_llama)
    weights = ck / SYSTEM / ENCODER_WEIGHTS
    truncate(weights)
    with pytest.raises(UserError, match=r"knowledge_encoder\.safetensors: sha256 does not match"):
        load_models(ck, [SYSTEM], tiny_llama)
    # The same damage in a checkpoint saved before hashes: still a UserError naming the file.
    manifest = json.loads((ck / "manifest.json").read_text())
    for info in manifest["systems"].values():
        del info["sha256"]
    (ck / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"knowledge_encoder\.safetensors: the weights cannot be read"):
        load_models(ck, [SYSTEM], tiny_llama)
    weights.unlink()
    with pytest.raises(
        UserError, match=r"knowledge_encoder\.safetensors: the file is missing; train it again"
    ):
        load_models(ck, [SYSTEM], tiny_llama)
    truncate(ck / "static_prefix" / ADAPTER_WEIGHTS)
    with pytest.raises(UserError, match=r"adapter_model\.safetensors: the weights cannot be read"):
        load_models(ck, ["static_prefix"], tiny_llama)


def test_checkpoint_without_hashes_still_loads(tmp_path, smol_tokenizer, tiny_llama):
    ck = _checkpoint(tmp_path, smol_tokenizer, tiny_llama)
    manifest = json.loads((ck / "manifest.json").read_text())
    for info in manifest["systems"].values():
        del info["sha256"]
    (ck / "manifest.json").write_text(json.dumps(manifest))
    assert set(load_models(ck, [SYSTEM, "static_prefix"], tiny_llama)) == {SYSTEM, "static_prefix"}


def test_shipped_model_weights_match_their_manifest():
    manifest = read_manifest(SHIPPED_MODEL)
    for name, info in manifest["systems"].items():
        assert info.get("sha256"), f"{name}: the shipped manifest records no sha256"
        verify_weights(SHIPPED_MODEL, name, info)
