"""Answer metrics: a registry of small classes with one interface (FlashRAG style).

    metric = get_metric("f1")
    result = metric.compute(predictions, references)   # list[str], list[list[str]] (gold answers per example)
    result.score          # corpus score (mean of per_example), or None when skipped
    result.per_example    # one float per example (for bootstrap confidence intervals), or None
    result.skipped_reason # why the metric was not computed (e.g. no BLEURT checkpoint), else None

`build_metrics(cfg.eval)` builds the configured set. Names are the keys of metrics.json: `em`, `f1`,
`contains`, `bertscore_f1`, `bleurt`. A metric that cannot run (not selected in `eval.metrics`, no BLEURT
checkpoint, a BERTScore model that cannot be loaded offline) returns `score=None` with the reason, so
metrics.json says `null` and the report says why: never a silent zero.

Answer normalisation is SQuAD v1.1's: lowercase, drop punctuation, drop the articles a/an/the, collapse
whitespace. An example with no gold answer is scored against the empty answer (SQuAD v2 convention).
Retrieval accuracy (top-k, gold hit@k) needs retrieved segment ids, not answer strings, and lives in
`retriever/metrics.py`.
"""

from __future__ import annotations

import csv
import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from common.answers import exact_match, squad_normalize, token_f1
from common.errors import UserError

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------- results


@dataclass
class MetricResult:
    """What one metric says about a set of predictions."""

    name: str
    score: float | None  # corpus score; None when skipped
    per_example: list[float] | None  # (N,) scores in input order; None when skipped
    skipped_reason: str | None = None

    @property
    def skipped(self) -> bool:
        return self.score is None

    @classmethod
    def skip(cls, name: str, reason: str) -> MetricResult:
        return cls(name=name, score=None, per_example=None, skipped_reason=reason)


def _check_inputs(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> list[list[str]]:
    """Validate shapes and types; an empty gold list becomes [""] (the "no answer" answer)."""
    if isinstance(predictions, str) or isinstance(references, str):
        raise TypeError("predictions and references must be lists (one entry per example), not a string")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    refs = []
    for i, (pred, golds) in enumerate(zip(predictions, references)):
        if not isinstance(pred, str):
            raise TypeError(f"prediction {i} is {type(pred).__name__}, not str")
        if isinstance(golds, str):
            raise TypeError(f"references[{i}] is a string; give a list of gold answers, e.g. [{golds!r}]")
        golds = list(golds)
        if not all(isinstance(g, str) for g in golds):
            raise TypeError(f"references[{i}] holds a non-string gold answer: {golds!r}")
        refs.append(golds or [""])
    return refs


# ---------------------------------------------------------------------------------------------- registry


class Metric(ABC):
    """One metric; `compute` takes N predictions and N lists of gold answers."""

    name: ClassVar[str]

    @abstractmethod
    def compute(self, predictions: Sequence[str], references: Sequence[Sequence[str]]) -> MetricResult: ...


METRICS: dict[str, type[Metric]] = {}


def register(cls: type[Metric]) -> type[Metric]:
    """Class decorator: make a metric available under `cls.name`."""
    if cls.name in METRICS and METRICS[cls.name] is not cls:
        raise ValueError(f"metric `{cls.name}` is registered twice")
    METRICS[cls.name] = cls
    return cls


def get_metric(name: str, **kwargs) -> Metric:
    if name not in METRICS:
        raise UserError(f"unknown metric `{name}`; known: {', '.join(sorted(METRICS))}")
    return METRICS[name](**kwargs)


# ---------------------------------------------------------------------------------------------- SQuAD-style


def contains_answer(prediction: str, golds: Sequence[str]) -> float:
    """1.0 if a normalised gold answer occurs in the normalised prediction (FlashRAG's `acc`).

    Golds that normalise to nothing ("", "the", "!") would be "contained" in every prediction, so they
    are ignored; if no gold is left, the example counts as answered only by an empty prediction.
    Matching is on the normalised string, so "paris" is found in "parisian"; FlashRAG does the same.
    """
    pred = squad_normalize(prediction)
    golds = [g for g in (squad_normalize(g) for g in golds) if g]
    if not golds:
        return float(pred == "")
    return float(any(g in pred for g in golds))


class _PerExampleMetric(Metric):
    """A metric scored per example as the best over its gold answers; the corpus score is the mean."""

    def score_one(self, prediction: str, golds: list[str]) -> float:
        raise NotImplementedError

    def compute(self, predictions, references) -> MetricResult:
        refs = _check_inputs(predictions, references)
        if not refs:
            return MetricResult.skip(self.name, "no examples to score")
        per = [self.score_one(p, g) for p, g in zip(predictions, refs)]
        return MetricResult(self.name, sum(per) / len(per), per)


@register
class ExactMatch(_PerExampleMetric):
    name = "em"

    def score_one(self, prediction, golds):
        return max(exact_match(prediction, g) for g in golds)


@register
class TokenF1(_PerExampleMetric):
    name = "f1"

    def score_one(self, prediction, golds):
        return max(token_f1(prediction, g) for g in golds)


@register
class Contains(_PerExampleMetric):
    name = "contains"

    def score_one(self, prediction, golds):
        return contains_answer(prediction, golds)


# ---------------------------------------------------------------------------------------------- BERTScore


def _read_baseline(path: Path, num_layers: int, model_layers: int | None) -> float:
    """The F1 baseline of layer `num_layers` from a bert-score rescale file (CSV `LAYER,P,R,F`, row i =
    layer i), after checking the file fits the model (one row per layer, embeddings included)."""
    try:
        with path.open(newline="") as f:
            rows = list(csv.reader(f))
    except OSError as e:
        raise UserError(f"cannot read BERTScore baseline `{path}`: {e}") from e
    if not rows or [c.strip() for c in rows[0]] != ["LAYER", "P", "R", "F"]:
        raise UserError(
            f"BERTScore baseline `{path}` must start with the header LAYER,P,R,F (bert-score format)"
        )
    body = rows[1:]
    for line, row in enumerate(body, start=2):
        try:
            if len(row) != 4:
                raise ValueError
            [float(v) for v in row]
        except ValueError:
            raise UserError(f"{path}:{line}: expected 4 numbers, got {row!r}") from None
    if model_layers is not None and len(body) != model_layers + 1:
        raise UserError(
            f"BERTScore baseline `{path}` has {len(body)} layer rows but the model has "
            f"{model_layers} layers (+ embeddings = {model_layers + 1}): it was made for another model"
        )
    if num_layers >= len(body):
        raise UserError(f"BERTScore baseline `{path}` has no row for layer {num_layers}")
    baseline_f1 = float(body[num_layers][3])
    if baseline_f1 >= 1.0:
        raise UserError(f"{path}: the F baseline of layer {num_layers} is {baseline_f1}; it must be below 1")
    return baseline_f1


@register
class BERTScoreF1(Metric):
    """BERTScore F1 (bert-score), max over gold answers; rescaled only with an explicit baseline file.

    `model` is an `embedded:` name, a local folder or a hub id; `num_layers` picks the layer whose
    embeddings are compared (bert-score needs it for anything outside its own table). The scorer is
    loaded on first use and kept on this instance.

    Pairs with an empty side get raw F1 = 0, which is bert-score's own rule; they are filled in here
    rather than passed on, because bert-score 0.3.13 encodes an empty sentence with
    `build_inputs_with_special_tokens`, which transformers 5 tokenizers no longer have. Rescaling,
    (F - b) / (1 - b) with b the baseline's F for the layer, is bert-score's formula, applied here so
    those zeros are rescaled like every other score.
    """

    name = "bertscore_f1"

    def __init__(
        self,
        model: str = "embedded:minilm-l6",
        num_layers: int | None = None,
        baseline: str | None = None,
        batch_size: int = 32,
        device: str = "cpu",
    ):
        from bert_score.utils import model2layers

        from configs.models import resolve_encoder_path

        self.model_spec = model
        self.model_path = resolve_encoder_path(model)
        self.batch_size = batch_size
        self.device = device
        model_layers = self._local_num_layers(self.model_path)
        if num_layers is None:
            if self.model_path not in model2layers:
                raise UserError(
                    f"set eval.bertscore_num_layers for BERTScore model `{model}` "
                    f"(bert-score knows default layers only for its own hub models)"
                )
            num_layers = model2layers[self.model_path]
        if num_layers < 1 or (model_layers is not None and num_layers > model_layers):
            raise UserError(
                f"eval.bertscore_num_layers={num_layers} is outside 1..{model_layers or '?'} "
                f"for BERTScore model `{model}`"
            )
        self.num_layers = num_layers
        self.baseline: str | None = None
        self.baseline_f1: float | None = None
        if baseline:
            path = Path(baseline).expanduser()
            if not path.is_file():
                raise UserError(f"eval.bertscore_baseline `{baseline}` is not a file")
            self.baseline_f1 = _read_baseline(path, num_layers, model_layers)
            self.baseline = str(path)
        self._scorer = None

    @staticmethod
    def _local_num_layers(path: str) -> int | None:
        config = Path(path) / "config.json"
        if not config.is_file():
            return None
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(path).num_hidden_layers

    def _load(self):
        if self._scorer is None:
            from bert_score import BERTScorer

            scorer = BERTScorer(
                model_type=self.model_path,
                num_layers=self.num_layers,
                batch_size=self.batch_size,
                device=str(self.device),
            )
            # bert-score truncates at tokenizer.model_max_length, which some tokenizers leave at 1e30:
            # cap it at the model's position table so long answers are cut instead of crashing.
            tokenizer, positions = (
                scorer._tokenizer,
                getattr(scorer._model.config, "max_position_embeddings", None),
            )
            if positions and tokenizer.model_max_length > positions:
                tokenizer.model_max_length = positions
            self._scorer = scorer
        return self._scorer

    def raw_f1(self, candidates: list[str], references: list[str]) -> list[float]:
        """Unrescaled BERTScore F1 of each (candidate, reference) pair (N,); 0.0 where either is blank."""
        scores = [0.0] * len(candidates)
        keep = [i for i, (c, r) in enumerate(zip(candidates, references)) if c.strip() and r.strip()]
        if keep:
            _, _, f1 = self._load().score(
                [candidates[i] for i in keep], [references[i] for i in keep], batch_size=self.batch_size
            )
            for i, value in zip(keep, f1.tolist()):
                scores[i] = float(value)
        return scores

    def compute(self, predictions, references) -> MetricResult:
        refs = _check_inputs(predictions, references)
        if not refs:
            return MetricResult.skip(self.name, "no examples to score")
        try:
            self._load()
        except OSError as e:  # what transformers raises for a hub model that is not available offline
            reason = f"BERTScore model `{self.model_spec}` could not be loaded: {e}"
            log.warning(reason)
            return MetricResult.skip(self.name, reason)
        # One pair per (prediction, gold); the example keeps its best gold, as bert-score does.
        flat = self.raw_f1(
            [p for p, golds in zip(predictions, refs) for _ in golds], [g for golds in refs for g in golds]
        )
        per = _best_per_example(flat, refs)
        if self.baseline_f1 is not None:  # monotone, so the max over golds is unchanged
            per = [(v - self.baseline_f1) / (1.0 - self.baseline_f1) for v in per]
        return MetricResult(self.name, sum(per) / len(per), per)


def _best_per_example(flat: list[float], refs: list[list[str]]) -> list[float]:
    """Scores of the flattened (prediction, gold) pairs → the best gold's score per example."""
    per, start = [], 0
    for golds in refs:
        per.append(max(flat[start : start + len(golds)]))
        start += len(golds)
    return per


# ---------------------------------------------------------------------------------------------- BLEURT


@register
class Bleurt(Metric):
    """BLEURT (bleurt-pytorch via eval.bleurt_compat), max over gold answers; skipped without a checkpoint."""

    name = "bleurt"

    def __init__(
        self, checkpoint: str | None = None, batch_size: int = 32, max_length: int = 512, device: str = "cpu"
    ):
        self.scorer = None
        if checkpoint:
            from eval.bleurt_compat import BleurtScorer, check_checkpoint, install_shims

            # Fail before the evaluation, not after it: the files are there and the package imports.
            check_checkpoint(Path(checkpoint).expanduser())
            install_shims()
            self.scorer = BleurtScorer(
                checkpoint, device=device, batch_size=batch_size, max_length=max_length
            )

    def compute(self, predictions, references) -> MetricResult:
        refs = _check_inputs(predictions, references)
        if self.scorer is None:
            return MetricResult.skip(
                self.name,
                "no BLEURT checkpoint configured (set eval.bleurt_checkpoint=/path/to/BLEURT-20-D12)",
            )
        if not refs:
            return MetricResult.skip(self.name, "no examples to score")
        # One pair per (prediction, gold); the example keeps its best gold, as BERTScore does.
        flat_refs = [g for golds in refs for g in golds]
        flat_cands = [p for p, golds in zip(predictions, refs) for _ in golds]
        per = _best_per_example(self.scorer.score(flat_refs, flat_cands), refs)
        return MetricResult(self.name, sum(per) / len(per), per)


# ---------------------------------------------------------------------------------------------- from config


class Disabled(Metric):
    """Stands in for a metric left out of `eval.metrics`, so its key is still reported (as null)."""

    def __init__(self, name: str, reason: str):
        self.name = name
        self.reason = reason

    def compute(self, predictions, references) -> MetricResult:
        return MetricResult.skip(self.name, self.reason)


REPORTED = ("em", "f1", "contains", "bertscore_f1", "bleurt")  # keys metrics.json always holds


def build_metrics(eval_cfg, device: str = "cpu") -> list[Metric]:
    """The metrics of `eval_cfg.metrics` (an `EvalConfig`), plus a `Disabled` stand-in for every unselected
    key of REPORTED. Bad settings (unknown name, missing checkpoint, bad baseline) raise UserError here,
    before any answer is generated."""
    selected = list(dict.fromkeys(eval_cfg.metrics))
    unknown = [n for n in selected if n not in METRICS]
    if unknown:
        raise UserError(
            f"eval.metrics: unknown metric(s) {', '.join(unknown)}; known: {', '.join(sorted(METRICS))}"
        )
    kwargs = {
        "bertscore_f1": dict(
            model=eval_cfg.bertscore_model,
            num_layers=eval_cfg.bertscore_num_layers,
            baseline=eval_cfg.bertscore_baseline,
            batch_size=eval_cfg.metric_batch_size,
            device=str(device),
        ),
        "bleurt": dict(
            checkpoint=eval_cfg.bleurt_checkpoint,
            batch_size=eval_cfg.metric_batch_size,
            max_length=eval_cfg.bleurt_max_length,
            device=str(device),
        ),
    }
    metrics = [get_metric(n, **kwargs.get(n, {})) for n in selected]
    metrics += [Disabled(n, "not selected in eval.metrics") for n in REPORTED if n not in selected]
    return metrics


def compute_all(
    metrics: Sequence[Metric], predictions: Sequence[str], references: Sequence[Sequence[str]]
) -> dict[str, MetricResult]:
    """Run every metric on the same predictions → {name: result}, logging the ones skipped and why."""
    results = {}
    for metric in metrics:
        result = metric.compute(predictions, references)
        if result.skipped and not isinstance(metric, Disabled):
            log.info("metric %s skipped: %s", metric.name, result.skipped_reason)
        results[metric.name] = result
    return results
