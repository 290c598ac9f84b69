"""End-to-end training of `train.systems` through the frozen LM, on the same batches and budget.

    accelerate launch -m qa.train --config configs/default.yaml [--resume] [key=value ...]
    python -m qa.train --config configs/default.yaml train.max_steps=200

Loss = cross-entropy on the answer tokens (the LM stays frozen; gradients flow through it into the
knowledge encoder or the peft prefix), plus, for a compressed dynamic prefix, a KL to its own
P = segment-length path (`train.teacher=pfull`). Retrieval is cached per question; the gold
segment is forced in during training only (`train.force_gold`). Checkpoints go to
run_dir/checkpoints/{step-N,final}; optimizer, scheduler and RNG state to run_dir/checkpoints/state
(accelerate's save_state) so `--resume` continues exactly. Logs: run_dir/logs/train.jsonl + loss.png.

`train.joint_retriever=true` (needs retriever.top_k >= 2) also trains the retriever end to end: each system
that retrieves gets the extra RAG-sequence loss -log sum_z p(z|x) p(y|x,z) over its k candidates (reading one
segment at a time), which trains its own prefix and, through p(z|x) = softmax(sim / train.retriever_temperature),
the retriever's question encoder (AdamW, train.retriever_lr). The retriever is saved with every checkpoint as
checkpoints/*/retriever (a sentence-transformers folder). The index is NOT rebuilt during training: its
embeddings and the cached top-k go stale; `python -m retriever.index retriever.model=<checkpoint>/retriever`
re-embeds. See qa/joint_retriever.py.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm.auto import tqdm

from common.atomic import atomic_dir, atomic_write_json, atomic_write_text, clean_leftovers
from common.errors import UserError
from common.faults import fault_point
from common.integrity import hash_tree, verify_tree
from configs.cli import build_parser, parse, run_main
from configs.loader import save_config
from configs.models import load_lm
from configs.precision import warn_if_slow_bf16
from configs.schema import Config
from data_prep.store import SegmentStore, load_qa
from knowledge_encoder.backbones import build_backbone, feature_kind
from lm.prompting import PromptTemplate
from qa.batching import Batcher, FeatureCache
from qa.checkpoint import STATE_REBUILD, init_encoder_from, new_model, read_state_meta, save_checkpoint
from qa.joint_retriever import JointRetriever, candidate_logprobs, check_joint_config, marginal_nll
from qa.retrieval_cache import cached_hits
from qa.system import QASettings, QASystem
from qa.systems import parse_systems
from qa.training_data import (
    BatchOrder,
    ExampleStats,
    hard_negatives,
    make_examples,
    sample_dev,
    with_negatives,
)
from retriever.search import Hit

log = logging.getLogger("qa.train")


def lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def train_segment_ids(store: SegmentStore) -> set[int]:
    """Ids of the segments whose article is in the train split (the store's own split rule)."""
    from data_prep.split import in_split

    rule = store.manifest.get("split_rule") or {}
    titles = store.column("title").to_pylist()
    return {i for i, t in enumerate(titles)
            if in_split(t, "train", rule.get("seed", 0), rule.get("dev", 0.1), rule.get("test", 0.2))}


def param_groups(model, lr: float, pool_lr_scale: float) -> list[dict]:
    """AdamW groups: the compressor's pooling queries at pool_lr_scale x lr (train.pool_lr_scale; they start at
    zero and must grow to the keys' scale before content, not only position, decides what a slot pools), the
    rest at lr. qa.train and qa.pretrain both use it."""
    pool, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (pool if ".pool." in f".{name}" else rest).append(p)
    groups = [{"params": rest}]
    if pool:
        groups.append({"params": pool, "lr": lr * pool_lr_scale})
    return groups


def exact_match(prediction: str, answers: list[str]) -> bool:
    from common.answers import exact_match as em

    return any(em(prediction, a) for a in answers)


class Trainer:
    def __init__(self, cfg: Config, accelerator, resume: bool = False):
        self.cfg = cfg
        self.acc = accelerator
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.log_path = self.run_dir / "logs" / "train.jsonl"
        torch.manual_seed(cfg.seed)
        if cfg.lm.autocast_bf16 and accelerator.device.type == "cpu":
            warn_if_slow_bf16("lm.autocast_bf16=true")
        self.lm, self.tokenizer = load_lm(cfg.lm.model, cfg.cache_dir, str(accelerator.device), cfg.lm.dtype)
        self.template = PromptTemplate(self.tokenizer, cfg.lm.system_prompt, cfg.lm.max_question_chars)
        self.systems = parse_systems(cfg.train.systems)
        untrainable = [str(s) for s in self.systems if not s.trainable]
        if untrainable:
            raise UserError(f"train.systems lists {', '.join(untrainable)}, which have nothing to train "
                            "(closed_book and rag_text are zero-shot); evaluate them with eval.run")
        if any(s.ablation for s in self.systems):
            raise UserError("ablations (~random, ~gold) are evaluation-only; remove them from train.systems")
        check_joint_config(cfg, self.systems)
        self._load_data()
        kcfg = cfg.knowledge_encoder
        backbone = build_backbone(kcfg, self.lm, self.template, cfg.retriever.model, accelerator.device)
        self.cache = FeatureCache.from_config(backbone, cfg)
        self.batcher = Batcher(self.template, self.cache, accelerator.device)
        feature_dim = backbone.feature_dim
        self.models, self.opts, self.scheds = {}, {}, {}
        for system in self.systems:
            model = new_model(system, cfg, self.lm, self.template, feature_dim)
            loaded = init_encoder_from(model, cfg.train.init_from, str(system), self.lm.config) if cfg.train.init_from else None
            if loaded:
                log.info("%s starts from the knowledge encoder in %s (%s)", system, cfg.train.init_from,
                         ", ".join(loaded))
            model = model.to(accelerator.device)
            opt = torch.optim.AdamW(param_groups(model, cfg.train.lr, cfg.train.pool_lr_scale), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.train.warmup_steps, cfg.train.max_steps))
            model, opt, sched = accelerator.prepare(model, opt, sched)
            self.models[str(system)], self.opts[str(system)], self.scheds[str(system)] = model, opt, sched
        self.joint = None
        if cfg.train.joint_retriever:
            self._setup_joint()
        self.order = BatchOrder(len(self.train_examples), cfg.train.batch_size * accelerator.num_processes, cfg.seed)
        self.step = 0
        self.seconds = dict.fromkeys(self.models, 0.0)
        if self.joint is not None:
            self.seconds["retriever"] = 0.0
        self.joint_losses: dict[str, float] = {}
        self.joint_stats: dict[str, float] = {}
        self.joint_prior_on_best: dict[str, float] = {}  # mean p(z|x) of the reader's favourite candidate
        if resume:
            self._resume()
        self._trim_log()

    def _trim_log(self) -> None:
        """Drop the log records of steps after the one training starts from: a run killed after its last saved
        state logged steps that the resumed run does again (and a fresh start logs from step 1)."""
        if not self.acc.is_main_process or not self.log_path.is_file():
            return
        lines = self.log_path.read_text(encoding="utf-8").splitlines(keepends=True)
        keep = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= self.step]
        if len(keep) != len(lines):
            atomic_write_text(self.log_path, "".join(keep))

    def _setup_joint(self) -> None:
        """The trainable retriever, its optimizer and schedule (prepared after the systems' for load_state)."""
        cfg = self.cfg
        self.joint = JointRetriever.from_encoder(self.retriever.encoder, cfg, self.acc.device)
        opt = torch.optim.AdamW(self.joint.parameters(), lr=cfg.train.retriever_lr,
                                weight_decay=cfg.train.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.train.warmup_steps, cfg.train.max_steps))
        self.retriever_opt, self.retriever_sched = self.acc.prepare(opt, sched)
        log.info("joint retriever training: %s (temperature %.3g, lr %g); the index is NOT rebuilt during "
                 "training, so its embeddings go stale: re-embed with `python -m retriever.index "
                 "retriever.model=<checkpoint>/retriever`", cfg.retriever.model, self.joint.temperature,
                 cfg.train.retriever_lr)

    # ------------------------------------------------------------------ data
    def _load_data(self) -> None:
        cfg = self.cfg
        store_dir = self.run_dir / "store"
        self.store = SegmentStore.open(store_dir)
        train_qa = load_qa(store_dir, "train")
        if cfg.train.max_train_questions:
            train_qa = train_qa[: cfg.train.max_train_questions]
        dev_qa = load_qa(store_dir, "dev")
        if not train_qa:
            raise UserError(f"{store_dir} has no training questions (data.split rule gave none to `train`)")
        needs_retrieval = any(s.kind.retrieves for s in self.systems)
        k = cfg.retriever.top_k
        self.retriever = None
        self.negatives: dict[str, list] = {}  # question id -> hard negatives (train.negatives)
        train_hits, dev_hits = {}, {}
        if needs_retrieval:
            from retriever.encoder import Encoder
            from retriever.search import open_retriever

            # The joint retriever trains this encoder in place (after the cached top-k below), in float32.
            encoder = Encoder.from_config(cfg, dtype="float32") if cfg.train.joint_retriever else None
            self.retriever = open_retriever(cfg, encoder=encoder)
            cache_dir = self.run_dir / "cache"
            keep = train_segment_ids(self.store) if cfg.train.train_segments_only else None
            # Retrieve 10 deeper than needed, so that k train-article segments (or N negatives) remain after
            # test and dev articles' segments are dropped: no test article is read in training.
            deep_hits = functools.partial(cached_hits, self.retriever, train_qa, cache_dir=cache_dir,
                                          progress=self.acc.is_main_process)
            if keep is not None and k > 1:
                train_hits = {q: [h for h in hs if h.segment_id in keep][:k] for q, hs in deep_hits(k + 10).items()}
            else:
                train_hits = cached_hits(self.retriever, train_qa, k, cache_dir, progress=self.acc.is_main_process)
            dev_hits = cached_hits(self.retriever, dev_qa, k, cache_dir, progress=self.acc.is_main_process)
            if cfg.train.negatives:
                if k != 1:
                    raise UserError(f"train.negatives={cfg.train.negatives} needs retriever.top_k=1 (each negative is "
                                    f"read alone, as qa.reading=each reads), got top_k={k}")
                self.negatives = hard_negatives(train_qa, deep_hits(cfg.train.negatives + 10), cfg.train.negatives,
                                                keep)
        else:
            k = 0
            if cfg.train.negatives:
                raise UserError("train.negatives needs a system that retrieves (dynamic_prefix, rag_text_tuned, "
                                "combine)")
        stats = ExampleStats()
        shuffle = cfg.seed if cfg.train.shuffle_segments else None
        self.train_examples = make_examples(train_qa, train_hits, k, self.store, cfg.train.force_gold and k > 0, stats,
                                            shuffle_seed=shuffle)
        dev_gold = cfg.train.dev_force_gold and k > 0
        self.dev_examples = sample_dev(make_examples(dev_qa, dev_hits, k, self.store, dev_gold), cfg.train.dev_limit,
                                       cfg.seed)
        self.data_stats = {"train_questions": len(train_qa), "train_examples": stats.total,
                           "gold_forced": stats.gold_forced, "skipped_no_gold": stats.skipped_no_gold,
                           "dev_examples": len(self.dev_examples), "top_k": k,
                           "negatives": sum(len(v) for v in self.negatives.values())}
        log.info("training data: %s", self.data_stats)

    def _shard(self, indices: list[int]) -> list:
        """This process's share of a global batch."""
        n, rank = self.acc.num_processes, self.acc.process_index
        per = len(indices) // n
        return [self.train_examples[i] for i in indices[rank * per:(rank + 1) * per]]

    # ------------------------------------------------------------------ loop
    def _autocast(self):
        if self.cfg.lm.autocast_bf16 and self.acc.device.type == "cpu":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return nullcontext()

    def train_step(self) -> dict[str, float]:
        self.step += 1
        losses = {}
        micro = self._shard(self.order.batch(self.step + self.cfg.train.data_start_step))
        accum = self.cfg.train.grad_accum
        chunks = [micro[i::accum] for i in range(accum)]
        segment_emb = None
        if self.joint is not None:
            t0 = time.perf_counter()
            segment_emb = [self.joint.segment_embeddings(chunk) for chunk in chunks]  # constants this step
            self.seconds["retriever"] += time.perf_counter() - t0
        self.joint_losses = {}
        for name, model in self.models.items():
            t0 = time.perf_counter()
            system = model.module.system if hasattr(model, "module") else model.system
            total = 0.0
            for i, chunk in enumerate(chunks):
                read = with_negatives(chunk, self.negatives, self.cfg.qa.no_answer) if system.kind.retrieves else chunk
                batch = self.batcher.build(read, system, with_labels=True)
                with self._autocast():
                    _, loss = model(batch)
                self.acc.backward(loss / accum)
                total += loss.item() / accum
                if segment_emb is not None and system.kind.retrieves:
                    joint = self._joint_loss(model, system, chunk, segment_emb[i])
                    self.acc.backward(joint / accum)
                    self.joint_losses[name] = self.joint_losses.get(name, 0.0) + joint.item() / accum
            self.opts[name].step()
            self.scheds[name].step()
            self.opts[name].zero_grad(set_to_none=True)
            self.seconds[name] += time.perf_counter() - t0
            losses[name] = total
        if self.joint is not None:
            t0 = time.perf_counter()
            self.joint_stats["grad_norm"] = self.joint.step(self.retriever_opt, self.retriever_sched, self.acc)
            self.seconds["retriever"] += time.perf_counter() - t0
        return losses

    def _joint_loss(self, model, system, chunk: list, segment_emb: torch.Tensor) -> torch.Tensor:
        """The marginal NLL of `chunk` for one system (scalar), with gradient into it and the retriever."""
        scores = self.joint.scores(chunk, segment_emb)  # (B, k), float32, outside autocast
        with self._autocast():
            logprob = candidate_logprobs(model, self.batcher, system, chunk)  # (B, k)
        with torch.no_grad():  # diagnostics: prior mass on the candidate the reader likes best
            prior = (scores / self.joint.temperature).softmax(-1)
            best = (prior.log() + logprob.float()).argmax(-1, keepdim=True)
            self.joint_prior_on_best[str(system)] = prior.gather(-1, best).mean().item()
        return marginal_nll(scores, logprob, self.joint.temperature)

    def dev_em(self) -> dict[str, float]:
        if not self.dev_examples:
            return {}
        unwrapped = {n: self.acc.unwrap_model(m) for n, m in self.models.items()}
        qa = QASystem(QASettings.from_config(self.cfg), self.lm, self.tokenizer, None, unwrapped,
                      {n: n for n in unwrapped})
        qa._batchers[feature_kind(self.cfg.knowledge_encoder)] = self.batcher
        out = {}
        for name, model in unwrapped.items():
            model.eval()
            hits = [[Hit(i, 0.0, "", s.title, s.text) for i, s in zip(e.segment_ids, e.segments)]
                    for e in self.dev_examples]
            with self._autocast():
                preds = qa.answer([e.question for e in self.dev_examples], mode=name, hits=hits,
                                  top_k=max(1, self.cfg.retriever.top_k))
            out[name] = sum(exact_match(p.prediction, e.answers) for p, e in zip(preds, self.dev_examples)) / len(preds)
            model.train()
        return out

    def log(self, record: dict) -> None:
        if not self.acc.is_main_process:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    # ------------------------------------------------------------------ state
    def save(self, final: bool = False) -> Path:
        self.acc.wait_for_everyone()
        target = self.ckpt_dir / ("final" if final else f"step-{self.step}")
        if self.acc.is_main_process:
            models = {n: self.acc.unwrap_model(m) for n, m in self.models.items()}
            extra = {"step": self.step, "store_fingerprint": self.store.fingerprint,
                     "qa_fingerprint": self.store.qa_fingerprint, "data": self.data_stats,
                     "train_seconds": self.seconds,
                     "retriever_index_sha256": self.retriever.manifest.get("sha256") if self.retriever else None}
            if self.cfg.train.init_from:  # a continued run: where its weights and its data position came from
                extra["continues"] = {"init_from": self.cfg.train.init_from,
                                      "data_start_step": self.cfg.train.data_start_step}
            save_checkpoint(target, models, self.cfg, self.lm.config, extra, retriever=self.joint)
            fault_point("train.checkpoint_saved")
        state_dir = self.ckpt_dir / "state"
        if self.acc.is_main_process:
            with atomic_dir(state_dir) as tmp:
                self.acc.save_state(str(tmp), safe_serialization=True)
                if self.joint is not None:
                    self.joint.save_state(tmp)
                atomic_write_json(tmp / "trainer_state.json", {"step": self.step, "seconds": self.seconds,
                                                               "systems": list(self.models),
                                                               "joint_retriever": self.joint is not None,
                                                               "sha256": hash_tree(tmp)})
        self.acc.wait_for_everyone()
        return target

    def _resume(self) -> None:
        state_dir = self.ckpt_dir / "state"
        # A job killed between the two renames that replace the state left it only as `.state.old-PID-*`:
        # put it back, or --resume would start again from step 0.
        clean_leftovers(state_dir)
        meta = state_dir / "trainer_state.json"
        if not meta.is_file():
            log.info("--resume: no saved state in %s, starting from step 0", state_dir)
            return
        saved = read_state_meta(meta)
        if saved["systems"] != list(self.models):
            raise UserError(f"--resume: the saved state trained {saved['systems']}, the config asks for "
                            f"{list(self.models)}; use the same train.systems or a new run_dir")
        if saved.get("joint_retriever", False) != (self.joint is not None):
            raise UserError(f"--resume: the saved state was trained with train.joint_retriever="
                            f"{str(saved.get('joint_retriever', False)).lower()}; use the same setting or a new run_dir")
        verify_tree(state_dir, saved.get("sha256"), STATE_REBUILD)
        self.acc.load_state(str(state_dir))
        if self.joint is not None:
            self.joint.load_state(state_dir)
        self.step, self.seconds = saved["step"], saved["seconds"]
        log.info("resumed at step %d", self.step)

    def fit(self) -> Path:
        cfg = self.cfg.train
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="training", disable=not self.acc.is_main_process)
        t_start = time.perf_counter()
        start_step = self.step
        for model in self.models.values():
            model.train()
        last = min(cfg.max_steps, cfg.stop_at_step) if cfg.stop_at_step else cfg.max_steps
        while self.step < last:
            losses = self.train_step()
            fault_point("train.step")
            per_step = (time.perf_counter() - t_start) / (self.step - start_step)
            examples_per_s = cfg.batch_size * self.acc.num_processes / per_step
            bar.update(1)
            bar.set_postfix({n.split("@")[0][:8] + ("@" + n.split("@")[1] if "@" in n else ""): f"{v:.3f}"
                             for n, v in losses.items()} | {"ex/s": f"{examples_per_s:.1f}"})
            record = {"step": self.step, "loss": losses, "examples_per_s": examples_per_s,
                      "lr": self.scheds[next(iter(self.scheds))].get_last_lr()[0], "seconds": dict(self.seconds)}
            if self.joint is not None:
                record["joint_loss"] = dict(self.joint_losses)
                record["retriever"] = {k: round(v, 6) for k, v in self.joint_stats.items()} | {
                    "lr": self.retriever_sched.get_last_lr()[0],
                    "prior_on_best": {k: round(v, 4) for k, v in self.joint_prior_on_best.items()}}
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.max_steps:
                record["dev_em"] = self.dev_em()
                log.info("step %d dev EM %s", self.step, record["dev_em"])
            if self.step % cfg.log_every == 0 or "dev_em" in record:
                self.log(record)
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.max_steps:
                self.save()
        bar.close()
        if self.step < cfg.max_steps:
            self.save()
            log.info("stopped at step %d of %d (train.stop_at_step); continue with --resume", self.step, cfg.max_steps)
            return self.ckpt_dir / f"step-{self.step}"
        final_em = self.dev_em()
        self.log({"step": self.step, "final_dev_em": final_em, "seconds": dict(self.seconds)})
        log.info("final dev EM %s; train seconds per system %s", final_em,
                 {k: round(v) for k, v in self.seconds.items()})
        target = self.save(final=True)
        if self.joint is not None:
            log.info("trained retriever: %s/retriever; the index still holds the old embeddings: re-embed with "
                     "`python -m retriever.index retriever.model=%s/retriever` (in a new run_dir to keep this one)",
                     target, target)
        if self.acc.is_main_process:
            from qa.plots import plot_loss

            plot_loss(self.log_path, self.run_dir / "logs" / "loss.png")
        return target


def main(argv=None) -> int:
    parser = build_parser("python -m qa.train", __doc__)
    parser.add_argument("--resume", action="store_true", help="continue from run_dir/checkpoints/state")
    cfg, ns = parse(parser, argv)
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=cfg.device == "cpu", gradient_accumulation_steps=1)
    if accelerator.is_main_process:
        Path(cfg.run_dir, "logs").mkdir(parents=True, exist_ok=True)
        save_config(cfg, Path(cfg.run_dir) / "logs" / "train_config.yaml")
    trainer = Trainer(cfg, accelerator, resume=ns.resume)
    target = trainer.fit()
    if accelerator.is_main_process:
        print(f"checkpoint: {target}")
        print(json.dumps({"train_seconds": {k: round(v, 1) for k, v in trainer.seconds.items()},
                          "data": trainer.data_stats}, indent=2))
    return 0


if __name__ == "__main__":
    run_main(main)
