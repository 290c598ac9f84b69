"""Retriever-only fine-tuning with InfoNCE: `python -m retriever.train --config C [key=value ...]`.

1. Opens `run_dir/store` and the current index (built by `retriever.index`, built here if missing).
2. Evaluates `retriever.model` on the evaluation split (`data.split`, dev or test) → "before".
3. Pairs every `train`-split question with its gold segment (the one that contains an answer) and
   mines `retriever.finetune.hard_negatives` hard negatives per question (retriever/negatives.py): the
   best-ranked segments of the current index (or of BM25, or the fusion: `retriever.finetune.negatives_from`)
   that are not gold, contain no answer, and belong to train articles (so no dev/test article text is
   ever trained on).
4. Trains with sentence-transformers' trainer: MultipleNegativesRankingLoss (InfoNCE over in-batch
   + hard negatives, scale = 1 / temperature; the GradCache variant when `mini_batch_size` > 0) and
   the no-duplicates batch sampler (no question's positive appears as another's in-batch negative).
   Every `retriever.finetune.save_steps` steps a checkpoint goes to `run_dir/retriever_checkpoints/`;
   rerunning the same command after a crash resumes from it (same model, pairs and settings only).
5. Saves the model atomically to `run_dir/retriever/` (use it with retriever.model=<run_dir>/retriever).
6. Re-embeds the store with the new encoder (into `run_dir` when `retriever.finetune.reindex`, else
   into a scratch folder) and evaluates again → "after"; writes `run_dir/logs/retriever_train.json`.

Before and after are measured twice: with the index as configured (`index.nprobe`, what the QA system
gets) and with every IVF list searched (what the encoder alone gets; up to 200k segments). On the
2,528 SQuAD paragraphs (IVF64, nprobe 16) the two differ by about one point of top-5 accuracy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.answers import AnswerMatcher
from common.atomic import atomic_dir, atomic_write_json, fingerprint
from common.errors import UserError
from configs.cli import build_parser, parse, run_main
from configs.loader import to_dict
from configs.precision import warn_if_slow_bf16
from data_prep.records import QAExample, Segment
from data_prep.store import SegmentStore, load_qa, segment_input_text
from retriever.encoder import Encoder
from retriever.index import ensure_index
from retriever.metrics import retrieval_metrics
from retriever.negatives import mine_hard_negatives
from retriever.search import Retriever

log = logging.getLogger(__name__)

EVAL_KS = (1, 5, 20)


@dataclass
class TrainPair:
    """One InfoNCE example: the question, its gold segment's text and mined hard negatives' texts."""

    question: str
    positive: str
    negatives: list[str]


# ---------------------------------------------------------------------------------------------- data


def gold_segment(store: SegmentStore, ex: QAExample) -> Segment | None:
    """The example's gold segment that contains an answer (else its first gold segment; None if none)."""
    ids = [i for i in ex.gold_segment_ids if 0 <= i < len(store)]
    if not ids:
        return None
    segs = store.get_many(ids)
    match = AnswerMatcher(ex.answers)
    return next((s for s in segs if match(s.text)), segs[0])


def training_examples(store_dir: Path, max_pairs: int = 0, seed: int = 0) -> list[tuple[QAExample, Segment]]:
    """(question, gold segment) for `train`-split questions only; the split is re-checked per example."""
    store = SegmentStore.open(store_dir)
    examples = load_qa(store_dir, "train")
    bad = [ex.id for ex in examples if ex.split != "train"]
    if bad:  # load_qa filters by split; this guards the one rule against a future change there
        raise RuntimeError(f"non-train examples reached training: {bad[:5]}")
    pairs = [(ex, seg) for ex in examples if (seg := gold_segment(store, ex)) is not None]
    if len(pairs) < len(examples):
        log.info(
            "%d of %d train questions have no gold segment and are skipped",
            len(examples) - len(pairs),
            len(examples),
        )
    if max_pairs and len(pairs) > max_pairs:
        rng = np.random.default_rng(seed)
        keep = np.sort(rng.choice(len(pairs), size=max_pairs, replace=False))
        pairs = [pairs[i] for i in keep]
    if not pairs:
        raise UserError(f"{store_dir}: no train-split question has a gold segment; nothing to fine-tune on")
    return pairs


def make_pairs(pairs: list[tuple[QAExample, Segment]], negatives: list[list[str]]) -> list[TrainPair]:
    return [
        TrainPair(ex.question, segment_input_text(seg), negs) for (ex, seg), negs in zip(pairs, negatives)
    ]


def to_dataset(pairs: list[TrainPair]):
    """A datasets.Dataset with columns anchor, positive, negative_1..n (the loss reads them in order)."""
    from datasets import Dataset

    columns = {"anchor": [p.question for p in pairs], "positive": [p.positive for p in pairs]}
    n_neg = len(pairs[0].negatives) if pairs else 0
    for j in range(n_neg):
        columns[f"negative_{j + 1}"] = [p.negatives[j] for p in pairs]
    return Dataset.from_dict(columns)


# ------------------------------------------------------------------------------------------ loss & training


def make_loss(model, temperature: float = 0.05, similarity: str = "cosine", mini_batch_size: int = 0):
    """InfoNCE: MultipleNegativesRankingLoss (scale = 1/temperature), cached (GradCache) for big batches."""
    from sentence_transformers import util
    from sentence_transformers.sentence_transformer import losses

    if temperature <= 0:
        raise UserError(f"retriever.finetune.temperature must be > 0, got {temperature}")
    sim = util.cos_sim if similarity == "cosine" else util.dot_score
    if mini_batch_size > 0:
        return losses.CachedMultipleNegativesRankingLoss(
            model, scale=1.0 / temperature, similarity_fct=sim, mini_batch_size=mini_batch_size
        )
    return losses.MultipleNegativesRankingLoss(model, scale=1.0 / temperature, similarity_fct=sim)


def infonce_loss(
    encoder: Encoder, pairs: list[TrainPair], temperature: float = 0.05, batch_size: int = 32
) -> float:
    """Mean InfoNCE loss over fixed consecutive batches of `pairs` (no gradient): a before/after yardstick."""
    from sentence_transformers import util
    from sentence_transformers.sentence_transformer import losses

    sim = util.cos_sim if encoder.similarity == "cosine" else util.dot_score
    loss_fn = losses.MultipleNegativesRankingLoss(encoder.model, scale=1.0 / temperature, similarity_fct=sim)
    total, batches = 0.0, 0
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        cols = [
            encoder.encode_queries([p.question for p in chunk]),
            encoder.encode_passages([p.positive for p in chunk]),
        ]
        for j in range(len(chunk[0].negatives)):
            cols.append(encoder.encode_passages([p.negatives[j] for p in chunk]))
        with torch.no_grad():
            total += float(loss_fn.compute_loss_from_embeddings([torch.from_numpy(c) for c in cols], None))
        batches += 1
    return total / max(batches, 1)


def train_encoder(
    encoder: Encoder,
    pairs: list[TrainPair],
    *,
    out_dir: Path,
    lr: float = 2e-5,
    epochs: float = 1.0,
    batch_size: int = 32,
    mini_batch_size: int = 0,
    temperature: float = 0.05,
    seed: int = 0,
    device: str = "auto",
    max_steps: int = -1,
    checkpoint_dir: Path | None = None,
    save_steps: int = 0,
    precision: str = "auto",
    progress: bool = True,
) -> dict:
    """Fine-tune `encoder.model` in place on `pairs` and save it (sentence-transformers format) to `out_dir`.

    With `checkpoint_dir` and `save_steps` > 0, the trainer saves a checkpoint every `save_steps` steps
    there, and a rerun with the same model, pairs and settings resumes from the last one (the folder is
    deleted once the model is saved). Returns {"steps", "seconds", "steps_per_s", "train_loss",
    "loss_log": [(step, loss), ...], "resumed_from": step or None}.
    """
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.training_args import BatchSamplers

    if not pairs:
        raise UserError("no training pairs")
    model = encoder.model
    model.to(torch.float32)  # master weights in fp32; mixed precision is the trainer's autocast
    dataset = to_dataset(pairs)
    loss = make_loss(model, temperature, encoder.similarity, mini_batch_size)
    cuda = torch.cuda.is_available() and device != "cpu"
    amp = resolve_precision(precision, cuda)
    if amp == "bf16" and not cuda:
        warn_if_slow_bf16("retriever.finetune.precision=bf16")
    prompts = {}
    if encoder.query_prefix:
        prompts["anchor"] = encoder.query_prefix
    if encoder.passage_prefix:
        prompts.update({c: encoder.passage_prefix for c in dataset.column_names if c != "anchor"})
    steps_per_epoch = math.ceil(len(pairs) / batch_size)
    key = fingerprint(
        [
            encoder.fingerprint,
            [dataclasses.astuple(p) for p in pairs],
            lr,
            epochs,
            batch_size,
            mini_batch_size,
            temperature,
            seed,
            max_steps,
            encoder.query_prefix,
            encoder.passage_prefix,
        ]
        + ([precision] if precision != "auto" else [])  # keeps resuming checkpoints made before the option
    )
    resume = _resumable_checkpoint(checkpoint_dir, key) if checkpoint_dir and save_steps > 0 else None
    with contextlib.ExitStack() as stack:
        if checkpoint_dir and save_steps > 0:
            output_dir = Path(checkpoint_dir)
            if resume is None:
                shutil.rmtree(output_dir, ignore_errors=True)  # another run's checkpoints: never resume those
            output_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(output_dir / _KEY_FILE, {"key": key})
        else:
            output_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="retriever-train-")))
        args = SentenceTransformerTrainingArguments(
            output_dir=str(output_dir),
            num_train_epochs=epochs,
            max_steps=max_steps,
            per_device_train_batch_size=batch_size,
            learning_rate=lr,
            warmup_steps=0.1,
            lr_scheduler_type="linear",
            batch_sampler=BatchSamplers.NO_DUPLICATES,
            seed=seed,
            data_seed=seed,
            logging_steps=max(1, min(50, steps_per_epoch // 10)),
            logging_first_step=True,
            save_strategy="steps" if save_steps > 0 and checkpoint_dir else "no",
            save_steps=max(1, save_steps),
            save_total_limit=1,
            report_to="none",
            use_cpu=not cuda,
            bf16=amp == "bf16",
            fp16=amp == "fp16",
            disable_tqdm=not progress,
            dataloader_num_workers=0,
            prompts=prompts or None,
        )
        trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset, loss=loss)
        if resume is not None:
            log.info("resuming retriever fine-tuning from %s", resume)
        t0 = time.perf_counter()
        result = trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
        seconds = time.perf_counter() - t0
        history = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    model.eval()
    with atomic_dir(out_dir) as tmp:
        model.save(str(tmp))
    if checkpoint_dir and save_steps > 0:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    steps = int(result.global_step)
    done_here = steps - (_checkpoint_step(resume) if resume is not None else 0)
    return {
        "steps": steps,
        "resumed_from": _checkpoint_step(resume) if resume is not None else None,
        "seconds": round(seconds, 2),
        "steps_per_s": round(done_here / seconds, 4) if seconds else None,
        "train_loss": float(result.training_loss),
        "loss_log": history,
        "pairs": len(pairs),
    }


def resolve_precision(precision: str, cuda: bool) -> str:
    """The autocast dtype of retriever training: `bf16`, `fp16` or `fp32` (see retriever.finetune.precision)."""
    if precision == "auto":
        if not cuda:
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp16" and not cuda:
        raise UserError("retriever.finetune.precision=fp16 needs a GPU; on CPU use bf16 or fp32")
    return precision


_KEY_FILE = "retriever_train_key.json"


def _checkpoint_step(path: Path) -> int:
    return int(path.name.rsplit("-", 1)[-1])


def _resumable_checkpoint(checkpoint_dir: Path, key: str) -> Path | None:
    """The last `checkpoint-N` in `checkpoint_dir` if it was made by a run with the same `key`."""
    checkpoint_dir = Path(checkpoint_dir)
    try:
        saved = json.loads((checkpoint_dir / _KEY_FILE).read_text(encoding="utf-8")).get("key")
    except (OSError, json.JSONDecodeError):
        return None
    if saved != key:
        return None
    done = [p for p in checkpoint_dir.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    return max(done, key=_checkpoint_step) if done else None


# ---------------------------------------------------------------------------------------------- evaluation


def evaluate(retriever: Retriever, examples: list[QAExample], ks=EVAL_KS, batch: int = 256) -> dict:
    """Retrieval metrics of `examples` (top-k accuracy, gold-doc hit@k, recall@k, MRR@10)."""
    hits = []
    for start in range(0, len(examples), batch):
        chunk = examples[start : start + batch]
        hits.extend(retriever.batch_search([ex.question for ex in chunk], max(max(ks), 10)))
    return retrieval_metrics(examples, hits, ks)


# Above this many segments the every-list evaluation is skipped: it costs a brute-force search per question.
EXHAUSTIVE_EVAL_MAX_SEGMENTS = 200_000


def evaluate_exhaustive(retriever: Retriever, examples: list[QAExample]) -> dict | None:
    """Metrics with every IVF list visited: the encoder without the IVF approximation (a Flat index, or
    nprobe >= nlist, gives the same numbers as `evaluate`). None for indexes too big to search this way."""
    if retriever.index.ntotal > EXHAUSTIVE_EVAL_MAX_SEGMENTS:
        return None
    saved = retriever.nprobe_setting
    retriever.nprobe_setting = retriever.index.nlist
    try:
        return evaluate(retriever, examples)
    finally:
        retriever.nprobe_setting = saved


def evaluate_both(retriever: Retriever, examples: list[QAExample]) -> tuple[dict, dict | None]:
    """(`evaluate`, `evaluate_exhaustive`) without searching twice when nprobe already covers every list."""
    metrics = evaluate(retriever, examples)
    if retriever.index.nlist <= retriever.nprobe and retriever.index.ntotal <= EXHAUSTIVE_EVAL_MAX_SEGMENTS:
        return metrics, metrics
    return metrics, evaluate_exhaustive(retriever, examples)


def eval_examples(store_dir: Path, split: str, limit: int) -> list[QAExample]:
    if split not in ("dev", "test"):
        raise UserError(
            f"retriever.train evaluates on data.split=dev or test (held-out articles), got {split!r}"
        )
    examples = load_qa(store_dir, split)
    if not examples:
        raise UserError(f"{store_dir}: no {split}-split questions to evaluate on")
    return examples[:limit] if limit else examples


def retriever_over(
    cfg, encoder: Encoder, store: SegmentStore, out_dir: Path, progress: bool = True
) -> Retriever:
    """Embed + index `store` with `encoder` into `out_dir` (reused when it already matches) and open it."""
    index, manifest = ensure_index(cfg, encoder=encoder, store=store, run_dir=out_dir, progress=progress)
    return Retriever.configured(
        cfg,
        encoder=encoder,
        index=index,
        manifest=manifest,
        store=store,
        run_dir=out_dir,
        bm25_dir=Path(cfg.run_dir) / "bm25",  # derived from the store alone: shared by before and after
    )


def run(cfg, progress: bool = True) -> dict:
    """The whole command (see the module docstring); returns the report it writes."""
    ft = cfg.retriever.finetune
    run_dir = Path(cfg.run_dir)
    store_dir = run_dir / "store"
    store = SegmentStore.open(store_dir)
    eval_set = eval_examples(store_dir, cfg.data.split, ft.eval_limit)
    pairs = training_examples(store_dir, ft.max_pairs, cfg.seed)
    log.info(
        "fine-tuning on %d train pairs; evaluating on %d %s questions",
        len(pairs),
        len(eval_set),
        cfg.data.split,
    )

    encoder = Encoder.from_config(cfg, dtype="float32")
    before_ret = retriever_over(cfg, encoder, store, run_dir, progress)
    before, before_all = evaluate_both(before_ret, eval_set)
    log.info("before: %s", format_metrics(before))
    negatives = mine_hard_negatives(
        before_ret, pairs, ft.hard_negatives, cfg, source=ft.negatives_from, seed=cfg.seed
    )
    train_pairs = make_pairs(pairs, negatives)
    loss_sample = train_pairs[: max(1, ft.loss_pairs)]
    loss_before = infonce_loss(encoder, loss_sample, ft.temperature, ft.batch_size)

    out_dir = run_dir / "retriever"
    stats = train_encoder(
        encoder,
        train_pairs,
        out_dir=out_dir,
        lr=ft.lr,
        epochs=ft.epochs,
        batch_size=ft.batch_size,
        mini_batch_size=ft.mini_batch_size,
        temperature=ft.temperature,
        seed=cfg.seed,
        device=cfg.device,
        max_steps=ft.max_steps or -1,
        checkpoint_dir=run_dir / "retriever_checkpoints",
        save_steps=ft.save_steps,
        precision=ft.precision,
        progress=progress,
    )
    # Reload from disk: the saved folder is what users will load, and its fingerprint is what indexes record.
    tuned = Encoder.from_config(cfg, model=str(out_dir))
    loss_after = infonce_loss(tuned, loss_sample, ft.temperature, ft.batch_size)
    if ft.reindex:
        after_ret = retriever_over(cfg, tuned, store, run_dir, progress)
        after, after_all = evaluate_both(after_ret, eval_set)
    else:
        with tempfile.TemporaryDirectory(prefix="retriever-eval-") as scratch:
            after_ret = retriever_over(cfg, tuned, store, Path(scratch), progress)
            after, after_all = evaluate_both(after_ret, eval_set)
    log.info("after:  %s", format_metrics(after))
    report = {
        "model_in": cfg.retriever.model,
        "model_out": str(out_dir),
        "encoder_fingerprint": tuned.fingerprint,
        "eval_split": cfg.data.split,
        "train_pairs": len(train_pairs),
        "hard_negatives": ft.hard_negatives,
        "negatives_from": ft.negatives_from,
        "infonce_loss_before": loss_before,
        "infonce_loss_after": loss_after,
        "train": stats,
        "before": before,
        "after": after,
        "nprobe": after_ret.nprobe,
        "hybrid": after_ret.search_settings.get("hybrid"),
        # every IVF list visited: what the encoder alone achieves (None when the index is too big)
        "before_all_lists": before_all,
        "after_all_lists": after_all,
        "reindexed": ft.reindex,
        "config": to_dict(cfg),
    }
    atomic_write_json(run_dir / "logs" / "retriever_train.json", report)
    return report


def format_metrics(m: dict) -> str:
    keys = [f"top{k}_accuracy" for k in EVAL_KS] + ["gold_doc_hit@5", "recall@5", "mrr@10"]
    return "  ".join(f"{k}={m[k]:.3f}" for k in keys if m.get(k) is not None)


def main(argv=None) -> int:
    parser = build_parser("python -m retriever.train", __doc__)
    cfg, ns = parse(parser, argv)
    report = run(cfg)
    s = report["train"]
    print(
        f"trained {s['steps']} steps in {s['seconds']:.0f} s ({s['steps_per_s']:.3f} steps/s) on "
        f"{report['train_pairs']} pairs; InfoNCE {report['infonce_loss_before']:.3f} -> "
        f"{report['infonce_loss_after']:.3f}"
    )
    print(f"{report['eval_split']} ({report['before']['n']} questions)")
    print(f"  before: {format_metrics(report['before'])}")
    print(f"  after:  {format_metrics(report['after'])}")
    if report["before_all_lists"] and report["after_all_lists"]:
        print("  every IVF list searched (the encoder without the index's approximation):")
        print(f"  before: {format_metrics(report['before_all_lists'])}")
        print(f"  after:  {format_metrics(report['after_all_lists'])}")
    print(f"model: {report['model_out']}  (use retriever.model={report['model_out']})")
    print(json.dumps({"before": report["before"], "after": report["after"]}))
    return 0


if __name__ == "__main__":
    run_main(main)
