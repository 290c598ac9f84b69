"""Issue 24's fault suite: every producing command killed (SIGKILL) at three or more points, then rerun.

Each command runs as a real subprocess (`python -m ...`) on a tiny world, with FAULT_KILL_AT
(common/faults.py) naming the point where it kills itself: deterministic, no racing sleeps. After each kill
whatever is on disk either loads complete or is refused with a UserError (never half of it); the rerun
(--resume where the command has it) ends with what an uninterrupted run writes: the same bytes, or the same
tensors where a file also holds timings. The kills are chained: each rerun but the last is itself killed at
the next point, so recovery from a kill is also what the next kill interrupts.

Damaged files (a flipped byte, a truncated file) of the artifact kinds that test_integrity*.py and
test_bad_inputs.py do not cover are in test_fault_damage.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from common.errors import UserError
from common.faults import ENV
from configs.loader import load_config
from tests.tiny_run import make_tiny_run, tiny_overrides

REPO = Path(__file__).resolve().parents[1]
SHARDS = ("index.shard_size=8", "retriever.batch_size=4")  # 30 segments: 4 embedding shards

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def run(args: list[str], kill_at: str | None = None) -> str:
    """`python ARGS` in the repo; with `kill_at` it must die of SIGKILL there (so the point was reached)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(REPO)}
    env.pop(ENV, None)
    if kill_at:
        env[ENV] = kill_at
    done = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    expected = -signal.SIGKILL if kill_at else 0
    assert done.returncode == expected, (kill_at, done.returncode, done.stderr[-3000:])
    return done.stdout + done.stderr


def loaded_or_refused(load: Callable):
    """What `load()` returns, or None when it refuses with a UserError (any other exception fails the test)."""
    try:
        return load()
    except UserError:
        return None


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir()) if p.is_file()}


def link_into(run_dir: Path, source: Path, *subs: str) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    for sub in subs:
        os.symlink(Path(source) / sub, run_dir / sub)
    return run_dir


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smol_tokenizer):
    """The uninterrupted baseline: store + embeddings + index of a tiny world, built in this process."""
    root = tmp_path_factory.mktemp("fault")
    cfg = make_tiny_run(root, smol_tokenizer, overrides=SHARDS)
    return root, cfg, tiny_overrides(root, overrides=SHARDS)


# ------------------------------------------------------------------------------------- segmentation


def test_killed_build_never_leaves_a_store_that_loads_and_the_rerun_equals_an_uninterrupted_one(tiny, tmp_path):
    from data_prep.store import SegmentStore, load_qa

    _, cfg, base = tiny
    run_dir = tmp_path / "run"
    args = ["-m", "data_prep.build", *base, f"run_dir={run_dir}", "--no-progress"]
    store = run_dir / "store"
    # mid-segmentation; segments file finished, QA not written; the whole folder written, not yet renamed
    for point in ("build.document:10", "store.segments_closed:1", "atomic_dir.store.ready:1"):
        run(args, kill_at=point)
        assert loaded_or_refused(lambda: SegmentStore.open(store)) is None, point
        assert loaded_or_refused(lambda: load_qa(store)) is None, point
    run(args)
    want = Path(cfg.run_dir) / "store"
    for name in ("segments.arrow", "qa.jsonl"):
        assert (store / name).read_bytes() == (want / name).read_bytes(), name
    got, ref = SegmentStore.open(store).manifest, SegmentStore.open(want).manifest
    assert got["fingerprint"] == ref["fingerprint"] and got["files_sha256"] == ref["files_sha256"]
    # A forced rebuild killed between its two renames: no store opens, and the next build puts it back whole.
    run([*args, "--force"], kill_at="atomic_dir.store.swapped:1")
    assert loaded_or_refused(lambda: SegmentStore.open(store)) is None
    assert "an identical store already exists" in run(args)
    assert SegmentStore.open(store).manifest == got
    assert sorted(p.name for p in run_dir.iterdir()) == ["data", "store"]  # no temp folder left


# ------------------------------------------------------------------------------- embedding + indexing


def test_killed_index_never_loads_half_and_the_rerun_equals_an_uninterrupted_one(tiny, tmp_path):
    from retriever.embed import Embeddings
    from retriever.faiss_index import load_index_dir

    _, cfg, base = tiny
    run_dir = link_into(tmp_path / "run", Path(cfg.run_dir), "store")
    args = ["-m", "retriever.index", *base, f"retriever.model={cfg.retriever.model}", f"run_dir={run_dir}"]
    want = Path(cfg.run_dir)
    # a shard's vectors renamed into place but not listed; two shards listed; all embedded, index not renamed
    for point in ("embed.shard_file:2", "embed.shard_listed:2", "atomic_dir.index.ready:1"):
        run(args, kill_at=point)
        emb = loaded_or_refused(lambda: Embeddings.open(run_dir / "embeddings"))
        if emb is not None:  # complete: then every vector is the uninterrupted run's
            assert point == "atomic_dir.index.ready:1"
            np.testing.assert_array_equal(np.concatenate([v for _, v in emb.iter_chunks()]),
                                          np.concatenate([v for _, v in Embeddings.open(want / "embeddings").iter_chunks()]))
        assert loaded_or_refused(lambda: load_index_dir(run_dir / "index")) is None, point
    run(args)
    got, ref = files(run_dir / "embeddings"), files(want / "embeddings")
    assert got.keys() == ref.keys()  # no temp file or unlisted shard left
    for name in ref:
        if name != "manifest.json":  # it holds the throughput
            assert got[name] == ref[name], name
    assert (run_dir / "index" / "index.faiss").read_bytes() == (want / "index" / "index.faiss").read_bytes()
    index, manifest = load_index_dir(run_dir / "index")
    assert index.ntotal == 30 and manifest["sha256"] == load_index_dir(want / "index")[1]["sha256"]


# ------------------------------------------------------------------------------------------- training

TRAIN = ("train.systems=dynamic_prefix@p2", "train.max_steps=6", "train.save_every=2", "train.log_every=1")


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return {f"{f.parent.name}/{k}": v for f in sorted(checkpoint.glob("*/*.safetensors"))
            for k, v in load_file(str(f)).items()}


def losses(run_dir: Path) -> list[tuple[int, dict]]:
    lines = (run_dir / "logs" / "train.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines) if "loss" in r]


def assert_same_weights(a: Path, b: Path) -> None:
    x, y = weights(a), weights(b)
    assert x.keys() == y.keys() and x, (a, b)
    for key in x:
        torch.testing.assert_close(x[key], y[key], atol=1e-6, rtol=1e-5, msg=f"{a.name} {key}")


def test_killed_training_resumes_to_the_weights_of_an_uninterrupted_run(tiny, tmp_path):
    from configs.models import load_lm
    from qa.checkpoint import load_models
    from qa.train import main as train_main

    _, cfg, base = tiny
    common = [*base, f"retriever.model={cfg.retriever.model}", *TRAIN]
    straight = link_into(tmp_path / "a", Path(cfg.run_dir), "store", "index")
    train_main([*common, f"run_dir={straight}"])
    run_dir = link_into(tmp_path / "b", Path(cfg.run_dir), "store", "index")
    args = ["-m", "qa.train", *common, f"run_dir={run_dir}"]
    lm, _ = load_lm(cfg.lm.model, None, "cpu", "float32")
    ckpts = run_dir / "checkpoints"
    # mid-training (state saved at step 2); after the step-4 checkpoint, before the state; between the renames
    # that replace the state folder (the state of step 2 is only a temp folder then)
    for i, point in enumerate(("train.step:3", "train.checkpoint_saved:1", "atomic_dir.state.swapped:1")):
        run(args + (["--resume"] if i else []), kill_at=point)
        assert not (ckpts / "final").exists(), point
        for ckpt in ckpts.glob("step-*"):  # every checkpoint there is whole: it loads, with the straight weights
            assert loaded_or_refused(lambda c=ckpt: load_models(c, ["dynamic_prefix@p2"], lm)) is not None
            assert_same_weights(ckpt, straight / "checkpoints" / ckpt.name)
    out = run(args + ["--resume"])
    assert "resumed at step 2" in out  # not from step 0: the state of step 2 was put back
    for name in ("step-2", "step-4", "final"):
        assert_same_weights(ckpts / name, straight / "checkpoints" / name)
    got, want = losses(run_dir), losses(straight)
    assert [s for s, _ in got] == [1, 2, 3, 4, 5, 6]  # each step logged once, though 3 and 4 ran three times
    for (_, a), (_, b) in zip(got, want):
        assert a == pytest.approx(b, rel=1e-5)


# ------------------------------------------------------------------------------------ prefix precompute


def test_killed_precompute_resumes_to_the_prefixes_of_an_uninterrupted_run(tiny, tmp_path, smol_tokenizer):
    from configs.models import load_lm
    from data_prep.store import SegmentStore
    from knowledge_encoder.prefix_store import PrefixStore, prefix_dir
    from lm.prompting import PromptTemplate
    from qa.checkpoint import encoder_sha256, new_model, save_checkpoint
    from qa.precompute import precompute
    from qa.systems import parse_system

    _, cfg, base = tiny
    system = "dynamic_prefix@p2"
    lm, tok = load_lm(cfg.lm.model, None, "cpu", "float32")
    template = PromptTemplate(tok, cfg.lm.system_prompt, cfg.lm.max_question_chars)
    ckpt = tmp_path / "ckpt"
    save_checkpoint(ckpt, {system: new_model(parse_system(system), cfg, lm, template, None)}, cfg, lm.config)
    common = [*base, f"retriever.model={cfg.retriever.model}", f"qa.checkpoint={ckpt}",
              "knowledge_encoder.batch_size=4", "knowledge_encoder.store_shard_rows=4"]
    straight = link_into(tmp_path / "a", Path(cfg.run_dir), "store")
    precompute(load_config(None, [*common, f"run_dir={straight}"]), progress=False)
    run_dir = link_into(tmp_path / "b", Path(cfg.run_dir), "store")
    args = ["-m", "qa.precompute", *common, f"run_dir={run_dir}"]
    keys = (encoder_sha256(ckpt, system), SegmentStore.open(run_dir / "store").fingerprint)
    out = prefix_dir(run_dir, system)
    # a shard renamed into place but not listed; a manifest written but not renamed; two shards listed
    for point in ("prefix_store.shard_file:2", "atomic_write.manifest.json.ready:2", "prefix_store.shard_listed:2"):
        run(args, kill_at=point)
        assert loaded_or_refused(lambda: PrefixStore.open(out, *keys)) is None, point
    run(args)
    got, want = PrefixStore.open(out, *keys), PrefixStore.open(prefix_dir(straight, system), *keys)
    assert len(got) == len(want) == 30
    for sid in range(30):
        a, b = got.get_one(sid), want.get_one(sid)
        for x, y in zip([*a.keys, *a.values, a.mask], [*b.keys, *b.values, b.mask]):
            assert torch.equal(x, y), sid
    assert files(out).keys() == files(prefix_dir(straight, system)).keys()  # no temp file left behind
    assert len(got.manifest["shards"]) == 8


# ------------------------------------------------------------------------------------------ demo: add


A = ("Quorn", "Quorn is a new country. The capital of Quorn is Zibbelquat. Quorn is led by Wub.")
B = ("Glimmerholt", "Glimmerholt is an island. Its harbour master is Oskarine Vell. Ferries leave at dawn.")


def test_killed_demo_add_never_loses_or_half_adds_a_document(tmp_path):
    from retriever.search import Retriever
    from tests.test_app import build_tiny_demo

    overrides = build_tiny_demo(tmp_path / "demo", checkpoint=False)
    built = tmp_path / "demo" / "run"
    straight = link_into(tmp_path / "a", built, "store", "index")
    run_dir = link_into(tmp_path / "b", built, "store", "index")
    docs = [a for title, text in (A, B) for a in ("--doc", f"{title}::{text}")]
    run(["-m", "tests.fault_demo_add", *overrides, f"run_dir={straight}", *docs])
    args = ["-m", "tests.fault_demo_add", *overrides, f"run_dir={run_dir}", *docs]

    def live_titles() -> list[str] | None:
        cfg = load_config(None, [*overrides, f"run_dir={run_dir}"])
        r = loaded_or_refused(lambda: Retriever.from_config(cfg))
        return None if r is None else [r.segments([i])[i].title for i in sorted(r._live_segments)]

    # A: indexed in memory, not saved; its delta written, not renamed. B: between the renames that replace
    # the delta of A; B saved, the process killed before it answers.
    expect = {"live.added:1": [], "atomic_dir.live.ready:1": [], "atomic_dir.live.swapped:1": ["Quorn"],
              "live.saved:1": ["Quorn", "Glimmerholt"]}
    for point, titles in expect.items():
        run(args, kill_at=point)
        assert live_titles() == titles, point
    run(args)  # the client retries: nothing is added twice
    assert files(run_dir / "live") == files(straight / "live")
