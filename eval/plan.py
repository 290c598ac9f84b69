"""What an evaluation answers: the systems of `eval.systems`, every (system, k) run of them, and the
checkpoint the trained ones read (checked before any model is loaded)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from common.errors import UserError
from configs.schema import Config
from eval.ablations import MAJORITY
from qa.checkpoint import read_manifest
from qa.system import checkpoint_name, default_checkpoint, require_checkpoint
from qa.systems import SYSTEMS, SystemName, parse_systems


@dataclass(frozen=True)
class Run:
    """One (system, k) that answers every question; k is None for systems that read no segments."""

    system: SystemName
    k: int | None

    @property
    def mode(self) -> str:
        return str(self.system)


def plan_runs(cfg: Config) -> tuple[list[SystemName], list[Run], list[int]]:
    """(systems, every (system, k) to answer, the sorted k sweep)."""
    names = [n for n in cfg.eval.systems if n.strip() != MAJORITY]  # majority is always reported
    if not names:
        raise UserError(f"eval.systems is empty; choose from {', '.join(SYSTEMS)}")
    systems = parse_systems(names)
    if cfg.eval.batch_size < 1:
        raise UserError(f"eval.batch_size must be >= 1, got {cfg.eval.batch_size}")
    if any(k < 1 for k in cfg.eval.k_values):
        raise UserError(f"eval.k_values must be >= 1, got {cfg.eval.k_values}")
    if cfg.eval.bootstrap < 0:
        raise UserError(
            f"eval.bootstrap must be >= 0 (0 = no confidence intervals), got {cfg.eval.bootstrap}"
        )
    sweep = sorted(set(cfg.eval.k_values) | {cfg.retriever.top_k}) if cfg.eval.k_values else []
    runs = []
    for s in systems:
        if s.kind.retrieves:
            runs += [Run(s, k) for k in dict.fromkeys([cfg.retriever.top_k, *sweep])]
        else:
            runs.append(Run(s, None))
    return systems, runs, sweep


def check_checkpoint(cfg: Config, systems: Sequence[SystemName]) -> tuple[Path | None, dict | None]:
    """The checkpoint the trained systems read, checked before the LM is loaded."""
    trained = [str(s) for s in systems if s.trainable]
    if not trained:
        return None, None
    directory = default_checkpoint(cfg)
    require_checkpoint(cfg, directory, trained)
    manifest = read_manifest(directory)
    held = list(manifest["systems"])
    missing = [str(s) for s in systems if s.trainable and checkpoint_name(s, held) not in held]
    if missing:
        raise UserError(
            f"checkpoint {directory} has no {', '.join(missing)}; it holds: "
            f"{', '.join(held) or 'nothing'} (closed_book and rag_text need no checkpoint)"
        )
    return directory, manifest
