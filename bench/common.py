"""Small helpers shared by the bench sections: the LM, questions, summary statistics."""

from __future__ import annotations

import statistics
from contextlib import nullcontext
from pathlib import Path

import torch

from common.errors import UserError
from configs.precision import warn_if_slow_bf16


def load_lm_template(cfg):
    """(lm, tokenizer, PromptTemplate) of `cfg.lm`, frozen, in eval mode."""
    from configs.models import load_lm
    from lm.prompting import PromptTemplate

    lm, tokenizer = load_lm(cfg.lm.model, cfg.cache_dir, cfg.device, cfg.lm.dtype)
    return lm, tokenizer, PromptTemplate(tokenizer, cfg.lm.system_prompt, cfg.lm.max_question_chars)


def autocast(cfg):
    """bf16 autocast on CPU when `lm.autocast_bf16` asks for it (as qa.train and eval do), else nothing."""
    if cfg.lm.autocast_bf16 and cfg.device in ("auto", "cpu") and not torch.cuda.is_available():
        warn_if_slow_bf16("lm.autocast_bf16=true")
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


def questions(cfg, split: str, n: int) -> list:
    """The first `n` QA examples of `split` in run_dir/store (cycled when the split is smaller)."""
    from data_prep.store import load_qa

    rows = load_qa(Path(cfg.run_dir) / "store", split)
    if not rows:
        raise UserError(
            f"{cfg.run_dir}/store has no `{split}` questions; build the store first "
            "(`python -m data_prep.build --config C`)"
        )
    return [rows[i % len(rows)] for i in range(n)]


def summary(values: list[float], digits: int = 1) -> dict:
    """mean / median / p90 / min of a list of timings."""
    if not values:
        return {"mean": None, "median": None, "p90": None, "min": None}
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]
    return {
        "mean": round(statistics.fmean(values), digits),
        "median": round(statistics.median(values), digits),
        "p90": round(p90, digits),
        "min": round(ordered[0], digits),
    }
