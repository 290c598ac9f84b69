"""`knowledge_encoder.precompute` moved to `qa.precompute` (issue 23): the old command says so and fails."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_old_command_names_the_new_one_and_exits_2():
    done = subprocess.run(
        [sys.executable, "-m", "knowledge_encoder.precompute", "--config", "configs/demo-train.yaml", "run_dir=runs/a b"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2
    assert "python -m qa.precompute --config configs/demo-train.yaml 'run_dir=runs/a b'" in done.stderr
    assert done.stdout == ""


def test_old_python_api_fails_naming_the_new_module():
    with pytest.raises(ImportError, match=r"moved: import it from qa\.precompute"):
        from knowledge_encoder.precompute import precompute  # noqa: F401


def test_new_command_has_help():
    done = subprocess.run([sys.executable, "-m", "qa.precompute", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "python -m qa.precompute" in done.stdout
