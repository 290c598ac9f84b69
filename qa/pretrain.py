"""Pretrain a compressing knowledge encoder by distillation on unlabelled segments (no questions needed).

    python -m qa.pretrain --config C [--resume] [pretrain.system=dynamic_prefix@p32] [key=value ...]
    python -m qa.train --config C train.init_from=RUN_DIR/pretrain/final ...   # then fine-tune on QA

`pretrain.objective=continuation` (the default): each segment of the store (of `pretrain.split`'s articles)
is cut at a random point: the frozen LM reads the continuation once after the K,V of the whole context (the
teacher: exactly the LM having read the text) and once after the compressed prefix of the context (the
student); the loss is KL(teacher || student) on every continuation token. `reconstruct`: the whole segment is
compressed and the LM must restate it after a repeat prompt (cross-entropy on every segment token; ICAE's
autoencoding stage). `salience` trains the learned selection scorer of a `select` compressor
(`knowledge_encoder.select_scores=learned`) to rank the tokens of answers to the split's questions first. A QA
example supervises ~3 answer tokens; a segment supervises up to
`pretrain.continuation_tokens`, and any corpus in the store format will do (CLaRa and Cartridges report large
gains from such a stage). Only the knowledge encoder trains (pooling, projections, an encode adapter).

Writes run_dir/pretrain/{step-N,final} in the checkpoint layout (one system, `pretrain.system`) and resumable
state in run_dir/pretrain/state; logs to run_dir/logs/pretrain.jsonl.
"""

from __future__ import annotations

import json
import logging
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from common.atomic import atomic_dir, atomic_write_json
from common.errors import UserError
from common.integrity import hash_tree, verify_tree
from configs.cli import build_parser, parse, run_main
from configs.models import load_lm
from configs.schema import Config
from data_prep.split import in_split
from data_prep.store import SegmentStore, load_qa
from knowledge_encoder.backbones import build_backbone
from knowledge_encoder.features import SegmentFeatures
from knowledge_encoder.kvzip import REPEAT_PROMPT
from knowledge_encoder.salience import (
    answer_occurrences,
    answer_rank,
    answer_token_labels,
    answers_kept,
    oracle_kept,
    recall_at,
    salience_loss,
)
from lm.forward import forward_with_prefix
from lm.prefix import Prefix
from lm.prompting import PromptTemplate, TextSegment
from qa.batching import FeatureCache, left_pad
from qa.checkpoint import STATE_REBUILD, init_encoder_from, new_model, read_state_meta, save_checkpoint
from qa.systems import parse_system
from qa.train import lr_lambda, param_groups

log = logging.getLogger("qa.pretrain")

LOSS_NAMES = {"continuation": "kl", "reconstruct": "ce", "salience": "bce"}  # the log key of each objective


def segment_answers(store_dir: Path, split: str) -> dict[int, list[str]]:
    """Store segment id -> the answers of the `split` questions whose gold segment it is."""
    out: dict[int, list[str]] = {}
    for ex in load_qa(store_dir, split):
        for sid in ex.gold_segment_ids:
            out.setdefault(int(sid), []).extend(ex.answers)
    return out


@dataclass
class Split:
    """Where each segment of a batch is cut: context lengths (N,) and continuation token rows."""

    context: torch.Tensor
    continuation: list[list[int]]


def cut_segments(features: SegmentFeatures, fractions: torch.Tensor, cfg) -> tuple[list[int], Split]:
    """Rows of `features` long enough to cut (indices) and their cuts; fractions (N,) in [0, 1]."""
    lengths = features.mask.sum(1)
    rows, context, continuation = [], [], []
    for i, n in enumerate(lengths.tolist()):
        m = int(round(fractions[i].item() * n))
        m = max(cfg.min_context_tokens, min(m, n - cfg.min_continuation_tokens))
        if m < cfg.min_context_tokens or n - m < cfg.min_continuation_tokens:
            continue
        rows.append(i)
        context.append(m)
        continuation.append(features.ids[i, m:min(n, m + cfg.continuation_tokens)].tolist())
    return rows, Split(torch.tensor(context, dtype=torch.long), continuation)


def select_rows(features: SegmentFeatures, rows: list[int]) -> SegmentFeatures:
    index = torch.tensor(rows, dtype=torch.long, device=features.mask.device)

    def pick(t):
        return None if t is None else t.index_select(0, index)

    return SegmentFeatures(
        mask=pick(features.mask),
        keys=None if features.keys is None else [pick(k) for k in features.keys],
        values=None if features.values is None else [pick(v) for v in features.values],
        hidden=pick(features.hidden),
        scores=None if features.scores is None else [pick(s) for s in features.scores],
        ids=pick(features.ids),
    )


def continuation_kl(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) per real continuation token, averaged; logits (B, T, V), mask (B, T)."""
    keep = mask.bool().reshape(-1)
    s = (student.reshape(-1, student.shape[-1])[keep].float() / temperature).log_softmax(-1)
    t = (teacher.reshape(-1, teacher.shape[-1])[keep].float() / temperature).log_softmax(-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def distillation_loss(lm, encoder, features: SegmentFeatures, split: Split, pad_id: int,
                      temperature: float) -> torch.Tensor:
    """The student prefix (encoder over each context) against the teacher (the context's own K,V), on the
    continuation tokens; positions continue after each context (RoPE is relative, the cut is per row)."""
    context = features.truncate(split.context)
    device = context.mask.device
    student = encoder(context)
    teacher = Prefix(keys=context.keys, values=context.values, mask=context.mask, next_position=0)
    ids, mask = left_pad(split.continuation, pad_id, device)
    start = split.context.to(device)[:, None]
    out = forward_with_prefix(lm, ids, mask, student, position_start=start)
    with torch.no_grad():
        target = forward_with_prefix(lm, ids, mask, teacher, position_start=start).logits
    return continuation_kl(out.logits, target, mask, temperature)


def reconstruction_loss(lm, encoder, features: SegmentFeatures, prompt_ids: list[int], max_tokens: int,
                        pad_id: int) -> torch.Tensor:
    """Cross-entropy of each segment's own tokens (its first `max_tokens`), teacher-forced after its compressed
    prefix and a repeat prompt: ICAE's autoencoding objective. The slots must keep what restating the text
    needs, which is what copying an answer span out of it needs too.

    Rows are [repeat prompt; segment tokens], left-padded (B, T); logits at t score token t + 1; only segment
    tokens are scored (B, T - 1 mask)."""
    student = encoder(features)
    lengths = features.mask.sum(1).tolist()
    targets = [features.ids[i, : min(n, max_tokens)].tolist() for i, n in enumerate(lengths)]
    ids, mask = left_pad([list(prompt_ids) + t for t in targets], pad_id, features.mask.device)
    scored = torch.zeros_like(mask, dtype=torch.bool)
    for i, t in enumerate(targets):
        scored[i, ids.shape[1] - len(t):] = True
    logits = forward_with_prefix(lm, ids, mask, student).logits[:, :-1]
    keep = scored[:, 1:]
    return F.cross_entropy(logits[keep].float(), ids[:, 1:][keep])


class Pretrainer:
    def __init__(self, cfg: Config, accelerator, resume: bool = False):
        self.cfg, self.acc = cfg, accelerator
        pcfg = cfg.pretrain
        self.system = parse_system(pcfg.system)
        if not self.system.kind.dynamic or self.system.kind.text:
            raise UserError(f"pretrain.system must be a dynamic_prefix variant, got `{pcfg.system}`")
        if not self.system.prefix_slots(cfg.knowledge_encoder.prefix_slots):
            raise UserError(f"pretrain.system `{pcfg.system}` has P = segment length: there is nothing to compress")
        if cfg.knowledge_encoder.backbone != "lm_kv":
            raise UserError("qa.pretrain needs knowledge_encoder.backbone=lm_kv (its teacher is the LM's own K,V)")
        lo, hi = pcfg.context_fraction
        if not 0 < lo <= hi < 1:
            raise UserError(f"pretrain.context_fraction must be two fractions 0 < lo <= hi < 1, got {pcfg.context_fraction}")
        self.out_dir = Path(cfg.run_dir) / "pretrain"
        self.log_path = Path(cfg.run_dir) / "logs" / "pretrain.jsonl"
        torch.manual_seed(cfg.seed)
        self.lm, tokenizer = load_lm(cfg.lm.model, cfg.cache_dir, str(accelerator.device), cfg.lm.dtype)
        self.template = PromptTemplate(tokenizer, cfg.lm.system_prompt, cfg.lm.max_question_chars)
        self.pad_id = tokenizer.pad_token_id or 0
        self.repeat_ids = tokenizer(REPEAT_PROMPT, add_special_tokens=False)["input_ids"]
        self.store = SegmentStore.open(Path(cfg.run_dir) / "store")
        rule = self.store.manifest.get("split_rule") or {}
        titles = self.store.column("title").to_pylist()
        self.ids = [i for i, t in enumerate(titles)
                    if in_split(t, pcfg.split, rule.get("seed", 0), rule.get("dev", 0.1), rule.get("test", 0.2))]
        if not self.ids:
            raise UserError(f"{self.store.path} has no segments of `{pcfg.split}` articles")
        self.answers: dict[int, list[str]] = {}
        self.dev_answers: dict[int, list[str]] = {}
        self.dev_ids: list[int] = []
        self.last_dev: dict | None = None
        if pcfg.objective == "salience":
            self.answers = segment_answers(Path(cfg.run_dir) / "store", pcfg.split)
            self.ids = [i for i in self.ids if i in self.answers]
            if not self.ids:
                raise UserError(f"pretrain.objective=salience: no question of `{pcfg.split}` articles has a gold "
                                f"segment in {self.store.path}; it learns from answer spans")
            if pcfg.split == "train" and pcfg.dev_segments:  # held out only when training reads train articles
                self.dev_answers = segment_answers(Path(cfg.run_dir) / "store", "dev")
                self.dev_ids = sorted(self.dev_answers)[: pcfg.dev_segments]
        backbone = build_backbone(cfg.knowledge_encoder, self.lm, self.template, cfg.retriever.model, accelerator.device)
        self.cache = FeatureCache.from_config(backbone, cfg)
        model = new_model(self.system, cfg, self.lm, self.template, None)
        if pcfg.objective == "salience" and model.encoder.scorer is None:
            raise UserError("pretrain.objective=salience trains a learned selection scorer: set "
                            "knowledge_encoder.compressor=select knowledge_encoder.select_scores=learned")
        self.last_recall: float | None = None
        if pcfg.init_from:
            loaded = init_encoder_from(model, pcfg.init_from, str(self.system), self.lm.config,
                                       key="pretrain.init_from")
            log.info("%s starts from the knowledge encoder in %s (%s)", self.system, pcfg.init_from,
                     ", ".join(loaded or ["nothing: no such system there"]))
        # The pooling queries get train.pool_lr_scale here too: without it they stay near zero for the
        # whole stage and every slot pools by position only.
        opt = torch.optim.AdamW(param_groups(model, pcfg.lr, cfg.train.pool_lr_scale), lr=pcfg.lr,
                                weight_decay=cfg.train.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(pcfg.warmup_steps, pcfg.max_steps))
        self.model, self.opt, self.sched = accelerator.prepare(model.to(accelerator.device), opt, sched)
        self.step, self.seconds = 0, 0.0
        if resume:
            self._resume()

    def batch(self, step: int) -> tuple[list[int], list[TextSegment], torch.Tensor]:
        """The store ids, segments and cut fractions of a step: a pure function of (seed, step), so a resumed run
        repeats it."""
        rng = random.Random(self.cfg.seed * 1_000_003 + step)
        ids = [self.ids[rng.randrange(len(self.ids))] for _ in range(self.cfg.pretrain.batch_size)]
        lo, hi = self.cfg.pretrain.context_fraction
        fractions = torch.tensor([rng.uniform(lo, hi) for _ in ids])
        return ids, [TextSegment(s.title, s.text) for s in self.store.get_many(ids)], fractions

    def salience_step_loss(self, encoder, ids: list[int], features: SegmentFeatures) -> torch.Tensor:
        """BCE of the selection scorer against the answer tokens of each segment's questions (N, n labels)."""
        labels = torch.zeros_like(features.mask)
        for row, sid in enumerate(ids):
            n = int(features.mask[row].sum())
            marked, _ = answer_token_labels(features.ids[row, :n].tolist(), self.answers[sid], self.template.tokenizer)
            labels[row, :n] = torch.tensor(marked, dtype=torch.bool)
        logits = encoder.scorer(features.values, features.mask)
        self.last_recall = recall_at(logits.detach(), labels, encoder.slots)
        return salience_loss(logits, labels, features.mask, self.cfg.pretrain.salience_pos_weight)

    @torch.no_grad()
    def dev_salience(self) -> dict:
        """How well the scorer's top P of held-out dev segments hold their questions' answers."""
        encoder = self.acc.unwrap_model(self.model).encoder
        tokenizer = self.template.tokenizer
        whole = found = hit_tokens = answer_tokens = oracle = 0
        ranks: list[int] = []
        size = self.cfg.pretrain.batch_size
        for start in range(0, len(self.dev_ids), size):
            chunk = self.dev_ids[start : start + size]
            segments = [TextSegment(s.title, s.text) for s in self.store.get_many(chunk)]
            features = self.cache.get(segments, self.acc.device)
            logits = encoder.selection_scores(features)  # what the encoder keeps, repeats rule included
            for row, sid in enumerate(chunk):
                n = int(features.mask[row].sum())
                ids = features.ids[row, :n].tolist()
                order = logits[row, :n].argsort(descending=True).tolist()
                top = set(order[: encoder.slots])
                occurrences = [answer_occurrences(ids, a, tokenizer) for a in self.dev_answers[sid]]
                w, f = answers_kept(occurrences, top)
                whole, found = whole + w, found + f
                oracle += oracle_kept(occurrences, encoder.slots)
                rank = {pos: r for r, pos in enumerate(order)}
                ranks += [r for r in (answer_rank(spans, rank) for spans in occurrences) if r is not None]
                answer_positions = {i for spans in occurrences for span in spans for i in span}
                hit_tokens += len(answer_positions & top)
                answer_tokens += len(answer_positions)
        return {"dev_answers_kept": whole / max(found, 1), "dev_recall_at_p": hit_tokens / max(answer_tokens, 1),
                "dev_oracle_kept": oracle / max(found, 1),
                "dev_answer_rank_median": statistics.median(ranks) if ranks else None,
                "dev_answers": found, "dev_segments": len(self.dev_ids)}

    def evaluate(self) -> None:
        """Dev metrics of the salience scorer (if any), logged and kept for the next checkpoint."""
        if not self.dev_ids:
            return
        self.model.eval()
        self.last_dev = self.dev_salience()
        self.model.train()
        log.info("step %d: %s", self.step, json.dumps(self.last_dev))
        if self.acc.is_main_process:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": self.step, **self.last_dev}) + "\n")

    def train_step(self) -> float | None:
        self.step += 1
        ids, segments, fractions = self.batch(self.step)
        features = self.cache.get(segments, self.acc.device)
        encoder = self.acc.unwrap_model(self.model).encoder
        if self.cfg.pretrain.objective == "salience":
            return self._update(self.salience_step_loss(encoder, ids, features))
        rows, split = cut_segments(features, fractions, self.cfg.pretrain)
        if not rows:
            return None  # every segment too short: nothing to learn from this step
        if self.cfg.pretrain.objective == "reconstruct":
            loss = reconstruction_loss(self.lm, encoder, select_rows(features, rows), self.repeat_ids,
                                       self.cfg.pretrain.reconstruct_tokens, self.pad_id)
        else:
            loss = distillation_loss(self.lm, encoder, select_rows(features, rows), split, self.pad_id,
                                     self.cfg.pretrain.temperature)
        return self._update(loss)

    def _update(self, loss: torch.Tensor) -> float:
        self.acc.backward(loss)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()

    def save(self, final: bool = False) -> Path:
        target = self.out_dir / ("final" if final else f"step-{self.step}")
        if self.acc.is_main_process:
            model = self.acc.unwrap_model(self.model)
            extra = {"step": self.step, "store_fingerprint": self.store.fingerprint, "train_seconds": self.seconds,
                     "pretrain": {"split": self.cfg.pretrain.split, "segments": len(self.ids)}}
            if self.last_dev is not None:
                extra["pretrain"]["dev"] = self.last_dev
            save_checkpoint(target, {str(self.system): model}, self.cfg, self.lm.config, extra)
            with atomic_dir(self.out_dir / "state") as tmp:
                self.acc.save_state(str(tmp), safe_serialization=True)
                atomic_write_json(tmp / "pretrainer_state.json",
                                  {"step": self.step, "seconds": self.seconds, "system": str(self.system),
                                   "sha256": hash_tree(tmp)})
        return target

    def _resume(self) -> None:
        meta = self.out_dir / "state" / "pretrainer_state.json"
        if not meta.is_file():
            log.info("--resume: no saved state in %s, starting from step 0", meta.parent)
            return
        saved = read_state_meta(meta)
        if saved["system"] != str(self.system):
            raise UserError(f"--resume: the saved state pretrained {saved['system']}, pretrain.system is "
                            f"{self.system}; use the same system or a new run_dir")
        verify_tree(meta.parent, saved.get("sha256"), STATE_REBUILD)
        self.acc.load_state(str(meta.parent))
        self.step, self.seconds = saved["step"], saved["seconds"]
        log.info("resumed at step %d", self.step)

    def fit(self) -> Path:
        pcfg = self.cfg.pretrain
        self.model.train()
        bar = tqdm(total=pcfg.max_steps, initial=self.step, desc="pretraining", disable=not self.acc.is_main_process)
        last = min(pcfg.max_steps, pcfg.stop_at_step) if pcfg.stop_at_step else pcfg.max_steps
        while self.step < last:
            t0 = time.perf_counter()
            loss = self.train_step()
            self.seconds += time.perf_counter() - t0
            bar.update(1)
            name = LOSS_NAMES[pcfg.objective]
            shown = {name: loss} if self.last_recall is None else {name: loss, "recall_at_p": self.last_recall}
            if loss is not None:
                bar.set_postfix({k: f"{v:.3f}" for k, v in shown.items()})
            if self.acc.is_main_process and (self.step % pcfg.log_every == 0 or self.step == pcfg.max_steps):
                self.log_path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.log_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"step": self.step, **shown, "lr": self.sched.get_last_lr()[0],
                                        "seconds": self.seconds}) + "\n")
            if pcfg.save_every and self.step % pcfg.save_every == 0 and self.step < pcfg.max_steps:
                self.evaluate()
                self.save()
        bar.close()
        self.evaluate()
        if self.step < pcfg.max_steps:
            log.info("stopped at step %d of %d (pretrain.stop_at_step); continue with --resume", self.step,
                     pcfg.max_steps)
            return self.save()
        return self.save(final=True)


def main(argv=None) -> int:
    parser = build_parser("python -m qa.pretrain", __doc__)
    parser.add_argument("--resume", action="store_true", help="continue from run_dir/pretrain/state")
    cfg, ns = parse(parser, argv)
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=cfg.device == "cpu")
    trainer = Pretrainer(cfg, accelerator, resume=ns.resume)
    target = trainer.fit()
    print(json.dumps({"checkpoint": str(target), "steps": trainer.step, "seconds": round(trainer.seconds, 1)}))
    return 0


if __name__ == "__main__":
    run_main(main)
