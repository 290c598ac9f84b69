"""Issue 24, damaged files of the kinds test_integrity*.py does not cover (a truncated manifest of the BM25
index, a checkpoint, a prefix store; a flipped byte or a truncation of the BM25 index's weights): refused with
a UserError naming the file, or rebuilt by the command that owns them, never served. And the regressions that
the fault suite (test_fault_suite.py) found, at unit size."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.errors import UserError
from lm.prefix import Prefix
from tests.test_integrity import flip_byte, truncate

pytestmark = pytest.mark.usefixtures("one_thread")


def dead_pid() -> int:
    """The id of a process that has ended (what a killed job leaves in its temp folders' names)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from retriever.testing import build_toy_index

    root = tmp_path_factory.mktemp("damage")
    extra = ("Quorn is a new country. The capital of Quorn is Zibbelquat.",)
    return build_toy_index(root, extra_texts=extra, overrides=("retriever.hybrid.enabled=true",))


# ---------------------------------------------------------------------------------------------- BM25


@pytest.mark.parametrize("damage", [flip_byte, truncate], ids=["flipped", "truncated"])
@pytest.mark.parametrize("name", ["weights.npz", "vocab.json", "manifest.json"])
def test_damaged_bm25_index_is_refused_and_rebuilt(toy, name, damage):
    from data_prep.store import SegmentStore
    from retriever.bm25 import BM25Index, open_store_bm25

    cfg = toy[0]
    path = Path(cfg.run_dir) / "bm25"
    store = SegmentStore.open(Path(cfg.run_dir) / "store")
    good = open_store_bm25(path, store, k1=cfg.retriever.hybrid.k1, b=cfg.retriever.hybrid.b, progress=False)
    if name == "manifest.json" and damage is flip_byte:
        damage = truncate  # a flipped manifest byte may still be JSON (and a hash in it then refuses a file)
    damage(path / name)
    with pytest.raises(UserError, match=name.replace(".", r"\.") + "|bm25"):
        BM25Index.load(path)
    again = open_store_bm25(path, store, k1=cfg.retriever.hybrid.k1, b=cfg.retriever.hybrid.b, progress=False)
    assert (again.weights != good.weights).nnz == 0 and BM25Index.load(path).meta == good.meta


# ------------------------------------------------------------------------------------- checkpoints


def test_truncated_checkpoint_manifest_is_a_user_error(tmp_path, smol_tokenizer, tiny_llama):
    from configs.loader import load_config
    from lm.prompting import PromptTemplate
    from qa.checkpoint import load_models, new_model, read_manifest, save_checkpoint
    from qa.systems import parse_system

    cfg = load_config(None, ["knowledge_encoder.prefix_slots=2", "knowledge_encoder.format_slots=2"])
    template = PromptTemplate(smol_tokenizer, cfg.lm.system_prompt, cfg.lm.max_question_chars)
    model = new_model(parse_system("dynamic_prefix"), cfg, tiny_llama, template, None)
    save_checkpoint(tmp_path / "ckpt", {"dynamic_prefix": model}, cfg, tiny_llama.config)
    truncate(tmp_path / "ckpt" / "manifest.json")
    with pytest.raises(UserError, match=r"manifest\.json: corrupt checkpoint manifest"):
        read_manifest(tmp_path / "ckpt")
    with pytest.raises(UserError, match="corrupt checkpoint manifest"):
        load_models(tmp_path / "ckpt", ["dynamic_prefix"], tiny_llama)


# ------------------------------------------------------------------------------------ prefix store


def _prefix(n: int) -> Prefix:
    keys = [torch.randn(n, 2, 3, 4) for _ in range(2)]
    return Prefix(keys, [k + 1 for k in keys], torch.ones(n, 3, dtype=torch.bool), next_position=3)


def test_prefix_store_writer_removes_what_a_killed_manifest_write_left(tmp_path):
    """Regression: a precompute killed inside the manifest's atomic write left `.manifest.json.tmp-PID-*`
    in the prefix store for good (the fault suite's rerun had a file the uninterrupted run had not)."""
    from knowledge_encoder.prefix_store import PrefixStore, PrefixStoreWriter

    meta = {"encoder_sha256": "e", "store_fingerprint": "s", "next_position": 3, "prefix_slots": 3}
    writer = PrefixStoreWriter(tmp_path / "p", meta, "float32")
    writer.add([0, 1], _prefix(2))
    leftover = tmp_path / "p" / f".manifest.json.tmp-{dead_pid()}-0123abcd"
    leftover.write_text('{"half": ')
    shard_tmp = tmp_path / "p" / ".shard-00001.safetensors.tmp"
    shard_tmp.write_bytes(b"half a shard")
    writer = PrefixStoreWriter(tmp_path / "p", meta, "float32")
    assert not leftover.exists() and not shard_tmp.exists() and writer.done_ids() == {0, 1}
    writer.finish()
    assert len(PrefixStore.open(tmp_path / "p", "e", "s")) == 2


def test_truncated_prefix_store_manifest_is_a_user_error(tmp_path):
    """Regression: a truncated prefix-store manifest was a JSONDecodeError with a traceback."""
    from knowledge_encoder.prefix_store import PrefixStore, PrefixStoreWriter

    meta = {"encoder_sha256": "e", "store_fingerprint": "s", "next_position": 3, "prefix_slots": 3}
    writer = PrefixStoreWriter(tmp_path / "p", meta, "float32")
    writer.add([0], _prefix(1))
    writer.finish()
    truncate(tmp_path / "p" / "manifest.json")
    with pytest.raises(UserError, match=r"manifest\.json: corrupt prefix store manifest"):
        PrefixStore.open(tmp_path / "p", "e", "s")
    with pytest.raises(UserError, match="corrupt prefix store manifest"):
        PrefixStoreWriter(tmp_path / "p", meta, "float32")


# ------------------------------------------------------------------------------------- live additions


def test_live_additions_survive_a_kill_between_the_renames_of_their_folder(toy):
    """Regression: a demo killed between the two renames that replace run_dir/live (the delta of earlier
    additions moved aside, the new one not yet in place) came back without the documents added before, and
    its next addition overwrote them for good."""
    import os

    from retriever.search import Retriever

    cfg = toy[0]
    first = Retriever.from_config(cfg)
    first.add_documents([{"id": "quorn", "title": "Quorn", "text": "The capital of Quorn is Zibbelquat."}])
    live = first.live_dir
    os.replace(live, live.parent / f".live.old-{dead_pid()}-0123abcd")  # where the kill left it
    try:
        again = Retriever.from_config(cfg)
        assert again.live_documents == ["quorn"]
        assert again.search("capital of Quorn", 1)[0].doc_id == "quorn"
    finally:
        Retriever.from_config(cfg).reset()
