"""The Makefile's entry points run the recipes README promises (checked with `make -n`, nothing executed)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _dry_run(*args: str) -> str:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    out = subprocess.run(["make", "-n", *args], cwd=ROOT, capture_output=True, text=True, check=True)
    return out.stdout


def test_make_demo_uses_the_demo_config_not_the_default_one():
    # Regression: `make demo` passed CONFIG (configs/default.yaml, the comparison recipe) to scripts/demo.sh,
    # so the demo reused the 1,200-entity comparison run instead of building the demo-sized world.
    assert "scripts/demo.sh configs/demo.yaml" in _dry_run("demo")
    assert "scripts/demo.sh configs/squad.yaml" in _dry_run("demo", "DEMO_CONFIG=configs/squad.yaml")


def test_make_bench_uses_the_comparison_config():
    assert "bench.run --config configs/default.yaml" in _dry_run("bench")


def test_make_demo_train_runs_the_synthetic_pipeline():
    assert "scripts/demo_train.sh configs/demo-train.yaml" in _dry_run("demo-train")
