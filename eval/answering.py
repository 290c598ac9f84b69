"""Answering: every (question, run) not yet in the prediction log, batch by batch, with one shared
retrieval pass, the segments the `~random` / `~gold` ablations read instead, and the `majority` rows."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from tqdm.auto import tqdm

from common.errors import UserError
from configs.schema import Config
from data_prep.records import QAExample
from data_prep.store import SegmentStore
from eval.ablations import MAJORITY, gold_hits, majority_predictions, random_hits
from eval.plan import Run
from eval.predictions import PredictionLog, majority_row, prediction_row
from qa.systems import SystemName

log = logging.getLogger(__name__)


def shared_search(retriever, questions: Sequence[str], k: int, progress: bool) -> list[list]:
    """One top-k search for every question, shared by the retrieval metrics and the ~gold oracle."""
    out: list[list] = []
    step = 64
    for start in tqdm(range(0, len(questions), step), desc="retrieval", unit="batch", disable=not progress):
        out += retriever.batch_search(list(questions[start : start + step]), k)
    return out


def ablation_hits_of(store: SegmentStore, top: list[list] | None, seed: int) -> Callable:
    """(run, examples) -> the segments an ablation run reads per question, in place of retrieval."""

    def ablation_hits(run: Run, exs: Sequence[QAExample]):
        if run.system.ablation == "random":
            return random_hits(store, exs, run.k, seed)
        hits, without = gold_hits(store, exs, top, run.k)
        if without:
            log.warning(
                "%s: %d of %d questions have no gold segment and read their retrieved ones",
                run.mode,
                without,
                len(exs),
            )
        return hits

    return ablation_hits


def qa_factory_of(cfg: Config, systems: Sequence[SystemName], retriever) -> Callable:
    """() -> a QASystem with the LM loaded, called only when something is left to answer."""

    def qa_factory():
        from configs.models import load_lm
        from qa.system import QASystem

        lm, tokenizer = load_lm(cfg.lm.model, cfg.cache_dir, cfg.device, cfg.lm.dtype)
        plain = list(dict.fromkeys(str(SystemName(s.base, s.tag)) for s in systems))
        return QASystem.from_config(cfg, systems=plain, lm=lm, tokenizer=tokenizer, retriever=retriever)

    return qa_factory


def answer_runs(
    qa_factory,
    runs: Sequence[Run],
    examples: Sequence[QAExample],
    plog: PredictionLog,
    setup: dict[str, str],
    ablation_hits,
    batch_size: int,
    progress: bool,
) -> None:
    """Answer every (question, run) not yet in `plog`, batch by batch, appending as each batch finishes."""
    todo = {run: [i for i, ex in enumerate(examples) if plog.get(ex.id, run) is None] for run in runs}
    total = sum(len(v) for v in todo.values())
    if total == 0:
        return
    qa = qa_factory()
    bar = tqdm(total=total, desc="answering", unit="q", disable=not progress)
    warmed: set[str] = set()
    for run, idx in todo.items():
        if not idx:
            continue
        bar.set_postfix_str(run.mode + ("" if run.k is None else f" k={run.k}"))
        hits_all = ablation_hits(run, examples) if run.system.ablation else None
        if run.mode not in warmed:
            # One untimed question first, so lazy initialisation does not land in the first batch's latency.
            qa.answer(
                [examples[idx[0]].question],
                mode=run.mode,
                top_k=run.k,
                hits=None if hits_all is None else [hits_all[idx[0]]],
                batch_size=1,
            )
            warmed.add(run.mode)
        for start in range(0, len(idx), batch_size):
            chunk = idx[start : start + batch_size]
            hits = None if hits_all is None else [hits_all[i] for i in chunk]
            preds = qa.answer(
                [examples[i].question for i in chunk],
                mode=run.mode,
                top_k=run.k,
                hits=hits,
                batch_size=batch_size,
            )
            plog.append([prediction_row(examples[i], p, run, setup[run.mode]) for i, p in zip(chunk, preds)])
            bar.update(len(chunk))
    bar.close()


def answer_majority(
    train: Sequence[QAExample], examples: Sequence[QAExample], plog: PredictionLog, setup: str
) -> tuple[list[str] | None, str]:
    """The majority baseline (no LM, no latency): appends its missing rows to `plog`. Returns (answers,
    the rule), or (None, why there is no baseline) when the store has no training answers."""
    try:
        answers, rule = majority_predictions(train, examples)
    except UserError as e:
        return None, str(e)
    missing = [
        majority_row(ex, a, setup)
        for ex, a in zip(examples, answers)
        if (ex.id, MAJORITY, None) not in plog.rows
    ]
    if missing:
        plog.append(missing)
    return answers, rule
