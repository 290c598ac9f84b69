"""The prediction log, predictions.jsonl: one row per (question, system, k), appended batch by batch.

Each row carries the `setup` fingerprint of its system (LM, checkpoint, index, store, batch size, ...).
A rerun keeps the rows whose setup still matches and answers only what is missing; rows of the evaluated
systems made with another setup, and a torn last line left by a crash, are dropped and recomputed
(`eval.resume=false` drops every row of the evaluated systems).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from common.answers import AnswerMatcher
from common.atomic import atomic_write_text, fingerprint, sha256_file
from common.errors import UserError
from configs.models import lm_fingerprint, resolve_device
from configs.schema import Config
from data_prep.records import QAExample
from data_prep.store import SegmentStore
from eval.ablations import MAJORITY
from eval.plan import Run
from qa.system import checkpoint_name

log = logging.getLogger(__name__)

PREDICTIONS = "predictions.jsonl"


def _digest_dir(path: Path) -> str:
    return fingerprint(
        {str(p.relative_to(path)): sha256_file(p) for p in sorted(path.rglob("*")) if p.is_file()}
    )


def setups(
    cfg: Config,
    runs: Sequence[Run],
    lm_config,
    store: SegmentStore,
    retriever,
    ckpt: Path | None,
    held: Sequence[str],
) -> dict[str, str]:
    """mode -> fingerprint of everything its predictions depend on (a row with another one is recomputed)."""
    common = {
        "lm": cfg.lm.model,
        "lm_config": lm_fingerprint(lm_config),
        "dtype": cfg.lm.dtype,
        "system_prompt": cfg.lm.system_prompt,
        "max_new_tokens": cfg.lm.max_new_tokens,
        "store": store.fingerprint,
        "qa": store.qa_fingerprint,
        "batch_size": cfg.eval.batch_size,
        "device": str(resolve_device(cfg.device)),
    }
    out = {MAJORITY: fingerprint({"qa": store.qa_fingerprint})}
    for run in runs:
        setup = dict(common)
        if run.system.kind.retrieves:
            live = Path(cfg.run_dir) / "live" / "manifest.json"
            setup["retriever"] = {
                "model": cfg.retriever.model,
                "encoder": retriever.encoder.fingerprint,
                "index": retriever.manifest.get("sha256"),
                **retriever.search_settings,
                "query_prefix": cfg.retriever.query_prefix,
                "live": sha256_file(live) if live.is_file() else None,
            }
            if cfg.qa.decoding != "free":  # absent for free decoding, so earlier predictions stay valid
                setup["decoding"] = cfg.qa.decoding
            if cfg.qa.reading != "joint":  # likewise absent for the default
                setup["reading"] = f"{cfg.qa.reading}:{cfg.qa.reading_rule}:{cfg.qa.no_answer}"
            if cfg.qa.rerank != "none":
                setup["rerank"] = cfg.qa.rerank
        if run.system.ablation:
            setup["ablation_seed"] = cfg.seed
        if run.system.trainable:
            setup["checkpoint"] = _digest_dir(ckpt / checkpoint_name(run.system, held))
        out[run.mode] = fingerprint(setup)
    return out


class PredictionLog:
    """predictions.jsonl, keyed by (id, mode, k): loaded once, then appended to batch by batch."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: dict[tuple, dict] = {}

    @staticmethod
    def key(row: dict) -> tuple:
        return row["id"], row["mode"], row.get("k")

    def load(self, setups_by_mode: dict[str, str], resume: bool) -> int:
        """Read kept rows; drop a torn last line and rows of these modes made with another setup (or all
        of them if not `resume`), rewriting the file if anything was dropped. Returns rows dropped."""
        if not self.path.is_file():
            return 0
        lines = self.path.read_bytes().split(b"\n")
        complete, tail = lines[:-1], lines[-1]  # rows end in a newline: a non-empty tail is a torn write
        kept: dict[tuple, dict] = {}
        dropped = int(bool(tail.strip()))
        for lineno, line in enumerate(complete, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                key = self.key(row)
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
                raise UserError(
                    f"{self.path}:{lineno}: corrupt prediction row ({e}); delete the file "
                    "(or run with eval.resume=false) to recompute"
                ) from e
            mode = row["mode"]
            if mode in setups_by_mode and (not resume or row.get("setup") != setups_by_mode[mode]):
                dropped += 1
                continue
            kept[key] = row
        self.rows = kept
        if dropped:
            log.info("%s: dropped %d stale or torn row(s); they will be recomputed", self.path, dropped)
            atomic_write_text(
                self.path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept.values())
            )
        return dropped

    def append(self, rows: Sequence[dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            f.flush()
            os.fsync(f.fileno())
        for r in rows:
            self.rows[self.key(r)] = r

    def get(self, example_id: str, run: Run) -> dict | None:
        return self.rows.get((example_id, run.mode, run.k))


def prediction_row(ex: QAExample, pred, run: Run, setup: str) -> dict:
    """The predictions.jsonl row of one answer of `run`."""
    matcher = AnswerMatcher(ex.answers)
    extra = {"candidates": pred.candidates, "chosen_rank": pred.chosen_rank} if pred.candidates else {}
    return {
        "id": ex.id,
        "question": ex.question,
        "prediction": pred.prediction,
        "answers": list(ex.answers),
        "mode": run.mode,
        "k": run.k,
        "retrieved": [
            {
                "segment_id": int(h.segment_id),
                "score": round(float(h.score), 6),
                "has_answer": matcher(h.text),
            }
            for h in pred.retrieved
        ],
        "latency_ms": float(pred.latency_ms),
        "timings": {k: float(v) for k, v in pred.timings.items()},
        "prompt_tokens": int(pred.prompt_tokens),
        "prefix_slots": int(pred.prefix_slots),
        "setup": setup,
        **extra,
    }


def majority_row(ex: QAExample, answer: str, setup: str) -> dict:
    """The predictions.jsonl row of the `majority` baseline: no LM, so no latency, tokens or segments."""
    return {
        "question": ex.question,
        "retrieved": [],
        "latency_ms": 0.0,
        "timings": {},
        "prompt_tokens": 0,
        "prefix_slots": 0,
        "id": ex.id,
        "prediction": answer,
        "answers": list(ex.answers),
        "mode": MAJORITY,
        "k": None,
        "setup": setup,
    }
