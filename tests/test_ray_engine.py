"""`compute.engine=ray`: corpus embedding and prefix precomputation on a real local Ray (Ray Data actors) write
the artifacts of the single-process path: the same vectors and prefixes, the same shard files and sha256s.

One local Ray (2 CPUs) serves the module; the commands see it running and reuse it. Both sides run torch on one
thread (the actors get one CPU each), so the floats are computed the same way and compared bit for bit.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from common.errors import UserError
from common.ray_engine import RayOptions, ray_session, run_batches
from configs.loader import load_config
from data_prep.store import SegmentStore, segment_input_text
from retriever.embed import embed_store
from retriever.embed_ray import EncoderLoad, _embed_worker, ray_batch_encoder
from retriever.encoder import Encoder
from retriever.index import build_index
from retriever.search import tokenizer_backend
from retriever.testing import make_tiny_encoder, toy_documents, words_of, write_toy_store

pytestmark = [pytest.mark.usefixtures("one_thread", "local_ray"), pytest.mark.slow]
SYSTEM = "dynamic_prefix@p2"


@pytest.fixture(scope="module")
def local_ray():
    import ray

    with ray_session(RayOptions(workers=2), num_cpus=2):
        assert ray.is_initialized()
        yield
    assert not ray.is_initialized()  # stopped by the session that started it


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny encoder and a toy store of 23 segments."""
    root = tmp_path_factory.mktemp("ray_embed")
    docs, questions = toy_documents(23)
    make_tiny_encoder(root / "enc", words_of([d.title + " " + d.text for d in docs] + [q for _, q, _ in questions]))
    encoder = Encoder.load(str(root / "enc"), batch_size=3, device="cpu")
    write_toy_store(root / "store", docs, questions, tokenizer_backend(encoder))
    return root, encoder


def index_cfg(root: Path, run: str, engine: str):
    return load_config(None, [f"run_dir={root / run}", f"retriever.model={root / 'enc'}",
                              "retriever.batch_size=3", "index.shard_size=5", "index.factory=Flat", "device=cpu",
                              f"compute.engine={engine}", "compute.ray_workers=2"])


def shard_files(directory: Path, pattern: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob(pattern))}


def test_ray_embeddings_are_the_local_ones(world):
    root, encoder = world
    store = SegmentStore.open(root / "store")
    for run, engine in (("local", "local"), ("ray", "ray")):
        build_index(index_cfg(root, run, engine), encoder=encoder, run_dir=root / run, store=store, progress=False)
    local, ray_ = (json.loads((root / r / "embeddings" / "manifest.json").read_text()) for r in ("local", "ray"))
    assert local["complete"] and ray_["complete"] and [s["count"] for s in ray_["shards"]] == [5, 5, 5, 5, 3]
    # The same shards, byte for byte: the vectors (float16) and ids, and the sha256s listed for them.
    assert ray_["shards"] == local["shards"]
    assert shard_files(root / "ray" / "embeddings", "*.npy") == shard_files(root / "local" / "embeddings", "*.npy")
    vecs = np.load(root / "ray" / "embeddings" / "shard-00001.npy")
    direct = encoder.encode_passages([segment_input_text(s) for s in store.get_many(range(5, 10))])
    np.testing.assert_allclose(vecs.astype(np.float32), direct, atol=2e-3)  # real vectors, not zeros
    assert (root / "ray" / "index" / "manifest.json").is_file()


def test_ray_resumes_a_damaged_shard_to_the_local_bytes(world):
    """Only the damaged shard is embedded again (on Ray), and it comes back as the local run wrote it."""
    root, encoder = world
    store = SegmentStore.open(root / "store")
    out = root / "resume"
    cfg = index_cfg(root, "resume", "ray")
    embed_store(store, encoder, out, shard_size=5, dtype="float16", batch_size=3, progress=False)
    damaged = out / "shard-00003.npy"
    damaged.write_bytes(damaged.read_bytes()[:-8] + b"\0" * 8)
    asked: list[int] = []
    ray_encode = ray_batch_encoder(encoder, store, cfg)

    def counting(batches):
        asked.extend(len(b) for b in batches)
        return ray_encode(batches)

    embed_store(store, encoder, out, shard_size=5, dtype="float16", batch_size=3, progress=False,
                encode_batches=counting)
    assert asked == [3, 2]  # shard 3 alone, in the local path's batches
    assert shard_files(out, "*.npy") == shard_files(root / "local" / "embeddings", "*.npy")


def test_a_worker_with_another_encoder_is_refused(world):
    """Actors that load a model other than the driver's (another fingerprint) refuse: a UserError here."""
    root, encoder = world
    store = SegmentStore.open(root / "store")
    load = EncoderLoad.of(encoder, index_cfg(root, "other", "ray"))
    other = partial(_embed_worker, replace(load, fingerprint="0" * 16), str(Path(store.path).resolve()))
    with pytest.raises(UserError, match="not the driver.s 0000000000000000"):
        list(run_batches([np.arange(3)], other, RayOptions(workers=1)))


def _sum_worker():
    pid = os.getpid()
    return lambda ids: {"sum": np.array(int(ids.sum())), "n": np.array(len(ids)), "pid": np.array(pid)}


def test_batches_come_back_in_order_and_whole():
    batches = [np.arange(i, i + 1 + i % 4, dtype=np.int64) for i in range(25)]
    out = list(run_batches(batches, _sum_worker, RayOptions(workers=2)))
    assert [int(o["sum"]) for o in out] == [int(b.sum()) for b in batches]
    assert [int(o["n"]) for o in out] == [len(b) for b in batches]  # unpadded: the worker saw each batch as given
    assert all(int(o["pid"]) != os.getpid() for o in out)  # computed in actors, not here


def test_without_ray_installed_the_error_says_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(UserError, match=r"pip install \"ray\[data\]"):
        list(run_batches([np.arange(3)], _sum_worker, RayOptions()))


def test_an_unreachable_cluster_is_one_clear_error(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a process without the module's Ray
    with (pytest.raises(UserError, match=r"compute.ray_address='127.0.0.1:1': nothing answers"),
          ray_session(RayOptions(address="127.0.0.1:1"))):
        pass


def test_a_refused_connection_names_rays_reason(monkeypatch):
    """Ray says `Failed to connect` and pastes the reason (here a missing auth token) into a cause's traceback."""
    import ray

    def refuse(**kwargs):
        inner = RuntimeError("Failed to connect to GCS. Last error: Traceback (most recent call last):\n  File x\n"
                             "ray.exceptions.AuthenticationError: RPC error: InvalidAuthToken: token is missing\n")
        raise ConnectionError("Failed to connect to Ray cluster at 127.0.0.1:6379") from inner

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr("common.ray_engine._check_reachable", lambda address: None)
    with (pytest.raises(UserError, match=r"127.0.0.1:6379'.*AuthenticationError: RPC error: InvalidAuthToken"),
          ray_session(RayOptions(address="127.0.0.1:6379"))):
        pass


# ------------------------------------------------------------------------------------ prefix precompute


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smol_tokenizer):
    """A tiny run (store of 30 segments, tiny LLaMA and encoder) and an untrained checkpoint of SYSTEM."""
    from configs.models import load_lm
    from lm.prompting import PromptTemplate
    from qa.checkpoint import new_model, save_checkpoint
    from qa.systems import parse_system
    from tests.tiny_run import make_tiny_run, tiny_overrides

    root = tmp_path_factory.mktemp("ray_precompute")
    cfg = make_tiny_run(root, smol_tokenizer)
    lm, tok = load_lm(cfg.lm.model, None, "cpu", "float32")
    template = PromptTemplate(tok, cfg.lm.system_prompt, cfg.lm.max_question_chars)
    ckpt = root / "ckpt"
    save_checkpoint(ckpt, {SYSTEM: new_model(parse_system(SYSTEM), cfg, lm, template, None)}, cfg, lm.config)
    base = [*tiny_overrides(root), f"retriever.model={cfg.retriever.model}", f"qa.checkpoint={ckpt}", "device=cpu",
            "knowledge_encoder.batch_size=4", "knowledge_encoder.store_shard_rows=6", "compute.ray_workers=2"]
    return root, cfg, base


def test_ray_prefix_store_is_the_local_one(tiny, tmp_path):
    from knowledge_encoder.prefix_store import PrefixStore, prefix_dir
    from qa.checkpoint import encoder_sha256
    from qa.precompute import precompute

    root, cfg, base = tiny
    stores = {}
    for engine in ("local", "ray"):
        run_dir = tmp_path / engine
        run_dir.mkdir()
        (run_dir / "store").symlink_to(Path(cfg.run_dir) / "store")
        report = precompute(load_config(None, [*base, f"run_dir={run_dir}", f"compute.engine={engine}"]),
                            progress=False)
        assert report[SYSTEM]["segments"] == 30
        stores[engine] = prefix_dir(run_dir, SYSTEM)
    local, ray_ = (json.loads((stores[e] / "manifest.json").read_text()) for e in ("local", "ray"))
    assert ray_ == local and len(ray_["shards"]) > 1  # every shard's sha256 among them
    assert shard_files(stores["ray"], "*.safetensors") == shard_files(stores["local"], "*.safetensors")
    keys = (encoder_sha256(root / "ckpt", SYSTEM), SegmentStore.open(Path(cfg.run_dir) / "store").fingerprint)
    got = PrefixStore.open(stores["ray"], *keys).get_one(7)
    assert got.keys[0].abs().sum() > 0 and torch.isfinite(got.keys[0]).all()


def test_ray_precompute_resumes_after_a_lost_shard(tiny, tmp_path):
    """A shard missing from a local run is computed by Ray, and the store is the whole local one again."""
    from knowledge_encoder.prefix_store import prefix_dir
    from qa.precompute import precompute

    root, cfg, base = tiny
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "store").symlink_to(Path(cfg.run_dir) / "store")
    precompute(load_config(None, [*base, f"run_dir={run_dir}"]), progress=False)
    out = prefix_dir(run_dir, SYSTEM)
    want = shard_files(out, "*.safetensors")
    (out / "shard-00001.safetensors").write_bytes(b"damaged")
    precompute(load_config(None, [*base, f"run_dir={run_dir}", "compute.engine=ray"]), progress=False)
    got = shard_files(out, "*.safetensors")
    # The damaged shard's segments come back as a new last shard; together the same prefixes.
    assert sorted(got.values()) == sorted(want.values())
    assert json.loads((out / "manifest.json").read_text())["count"] == 30
