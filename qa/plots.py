"""The training loss curve (PNG) from run_dir/logs/train.jsonl."""

from __future__ import annotations

import json
from pathlib import Path


def read_log(path: Path) -> list[dict]:
    if not Path(path).is_file():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_loss(log_path: Path, out: Path) -> Path | None:
    """One line per system: training loss vs step, with dev EM markers when logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in read_log(log_path) if "loss" in r]
    if not records:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in records[-1]["loss"]:
        steps = [r["step"] for r in records if name in r["loss"]]
        ax.plot(steps, [r["loss"][name] for r in records if name in r["loss"]], label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
