"""The QA system: question -> retrieve top-k -> encode (or read the prefix store) -> inject -> generate.

    qa = QASystem.from_config(cfg, systems=["dynamic_prefix", "rag_text"])   # or QASystem(QASettings(...), lm, ...)
    qa.answer(["Who founded Velmora Works?"], mode="dynamic_prefix") -> list[Prediction]
    qa.generate(questions) -> list[str]          # FlashRAG-style, in cfg.qa.mode

The gold segment is never used here; evaluation passes explicit `hits` only for named ablations
(`~random`, `~gold`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.errors import UserError
from common.integrity import verify_file
from configs.loader import to_dict
from configs.models import load_lm
from configs.schema import Config
from knowledge_encoder.backbones import build_backbone, feature_kind
from lm.generate import StopTokens, greedy_generate
from lm.prefix import Prefix
from lm.prompting import PromptTemplate, TextSegment
from lm.span import SpanConstraint
from qa.batching import Batcher, Example, FeatureCache
from qa.checkpoint import MANIFEST, SHIPPED_MODEL, load_models, read_manifest
from qa.model import PrefixQAModel, QABatch
from qa.reader_rerank import RERANKER_FILE, ReaderReranker, lm_key, reader_features
from qa.reading import Candidate, choose_answer
from qa.systems import SystemName, parse_system

log = logging.getLogger(__name__)


@dataclass
class Prediction:
    question: str
    prediction: str
    mode: str
    retrieved: list = field(default_factory=list)  # retriever Hits (segment_id, score, doc_id, title, text)
    latency_ms: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)  # retrieve_ms, encode_ms, generate_ms per question
    prompt_tokens: int = 0
    prefix_slots: int = 0
    candidates: list[dict] = field(default_factory=list)  # qa.reading=each: every segment's answer (Candidate rows)
    chosen_rank: int | None = None  # qa.reading=each: the rank of the segment whose answer was kept


@dataclass
class _Reading:
    """One batch of greedy answers, row by row, with what they cost."""

    texts: list[str]
    logprobs: list[float]  # log p(answer + stop | question, segments), unconstrained
    prompt_tokens: list[int]
    prefix_slots: list[int]
    encode_s: float
    generate_s: float


EMBEDDED_LM = "embedded:smollm2-135m"


def default_checkpoint(cfg: Config) -> Path:
    """`qa.checkpoint` when set; else run_dir/checkpoints/final when a run trained one; else the shipped model,
    for the embedded LM only. Another LM gets run_dir/checkpoints/final even when absent: systems that need no
    training still serve, and loading a trained one fails with `require_checkpoint`'s message."""
    if cfg.qa.checkpoint:
        return Path(cfg.qa.checkpoint)
    trained = Path(cfg.run_dir) / "checkpoints" / "final"
    if (trained / MANIFEST).is_file() or not (SHIPPED_MODEL / MANIFEST).is_file():
        return trained
    return SHIPPED_MODEL if cfg.lm.model == EMBEDDED_LM else trained


def require_checkpoint(cfg: Config, directory: Path, needed: Sequence[str]) -> None:
    """Refuse, with what to do, when the trained systems `needed` have no checkpoint at `directory`."""
    if (Path(directory) / MANIFEST).is_file():
        return
    shipped = (f"; the shipped model ({SHIPPED_MODEL.name}) is for lm.model={EMBEDDED_LM} only"
               if cfg.lm.model != EMBEDDED_LM and not cfg.qa.checkpoint else "")
    raise UserError(f"{', '.join(needed)} need a trained checkpoint for lm.model={cfg.lm.model} and there is none at "
                    f"{directory}{shipped}: train one with `python -m qa.train --config C`, set qa.checkpoint=DIR, "
                    "or use closed_book / rag_text")


def checkpoint_name(system: SystemName, held: Sequence[str]) -> str:
    """The sub-folder a system reads; `combine` falls back to its dynamic_prefix twin when not trained itself."""
    if system.trained_name in held:
        return system.trained_name
    if system.base == "combine":
        twin = "dynamic_prefix" + (f"@{system.tag}" if system.tag else "")
        if twin in held:
            return twin
    return system.trained_name


@dataclass(frozen=True)
class QASettings:
    """The values answering reads from the config, and only those: QASystem never holds the Config itself.

    `from_config` picks them from their sections (qa, retriever, lm, knowledge_encoder, eval, train); the
    feature-cache budgets are training's (`train.feature_cache_gb`, `train.feature_disk_gb`) because the
    cache in run_dir/feature_cache is shared by training, --resume and evaluation of a run.
    """

    run_dir: Path
    mode: str  # qa.mode: the system `answer` uses when none is named
    decoding: str  # qa.decoding: free | span
    reading: str  # qa.reading: joint | each
    reading_rule: str  # qa.reading_rule: sum | max
    no_answer: str  # qa.no_answer: what a reader trained with negatives says where a segment does not answer
    rerank: str  # qa.rerank: none | reader
    top_k: int  # retriever.top_k
    retriever_model: str  # retriever.model, for the `retriever` knowledge-encoder backbone
    batch_size: int  # eval.batch_size: questions per generation batch
    max_new_tokens: int  # lm.max_new_tokens
    system_prompt: str  # lm.system_prompt
    max_question_chars: int  # lm.max_question_chars
    prefix_store: str  # knowledge_encoder.prefix_store: all | cache | none
    store_dtype: str  # knowledge_encoder.store_dtype (of the prefix cache)
    prefix_cache_gb: float  # knowledge_encoder.prefix_cache_gb
    feature_cache_gb: float  # train.feature_cache_gb (RAM)
    feature_disk_gb: float  # train.feature_disk_gb (run_dir/feature_cache; 0 = RAM only)

    @classmethod
    def from_config(cls, cfg: Config) -> QASettings:
        kcfg = cfg.knowledge_encoder
        return cls(
            run_dir=Path(cfg.run_dir), mode=cfg.qa.mode, decoding=cfg.qa.decoding, reading=cfg.qa.reading,
            reading_rule=cfg.qa.reading_rule, no_answer=cfg.qa.no_answer, rerank=cfg.qa.rerank, top_k=cfg.retriever.top_k,
            retriever_model=cfg.retriever.model, batch_size=cfg.eval.batch_size,
            max_new_tokens=cfg.lm.max_new_tokens, system_prompt=cfg.lm.system_prompt,
            max_question_chars=cfg.lm.max_question_chars, prefix_store=kcfg.prefix_store,
            store_dtype=kcfg.store_dtype, prefix_cache_gb=kcfg.prefix_cache_gb,
            feature_cache_gb=cfg.train.feature_cache_gb, feature_disk_gb=cfg.train.feature_disk_gb,
        )


class QASystem:
    def __init__(self, settings: QASettings, lm, tokenizer, retriever=None,
                 models: dict[str, PrefixQAModel] | None = None, model_names: dict[str, str] | None = None):
        if not isinstance(settings, QASettings):  # the old signature took the Config here
            raise TypeError(f"QASystem takes QASettings (QASettings.from_config(cfg)), not {type(settings).__name__}")
        self.settings = settings
        self.lm = lm
        self.tokenizer = tokenizer
        self.retriever = retriever
        self.device = next(lm.parameters()).device
        self.template = PromptTemplate(tokenizer, settings.system_prompt, settings.max_question_chars)
        self.stop = StopTokens.for_tokenizer(tokenizer)
        self.models = models or {}
        self.model_names = model_names or {}  # system name -> key in self.models
        self._batchers: dict[str, Batcher] = {}
        self.prefix_sources: dict = {}  # system -> qa.prefix_source.PrefixSource (stored or cached prefixes)
        self.rerankers: dict[str, ReaderReranker] = {}  # system -> its qa.rerank=reader probe

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, cfg: Config, systems: Sequence[str] | None = None, retriever=None, lm=None,
                    tokenizer=None) -> QASystem:
        names = [parse_system(s) for s in (systems or [cfg.qa.mode])]
        if lm is None:
            lm, tokenizer = load_lm(cfg.lm.model, cfg.cache_dir, cfg.device, cfg.lm.dtype)
        if retriever is None and any(s.kind.retrieves for s in names):
            from retriever.search import open_retriever

            retriever = open_retriever(cfg)
        trained = [s for s in names if s.trainable]
        models, model_names = {}, {}
        if trained:
            directory = default_checkpoint(cfg)
            require_checkpoint(cfg, directory, [str(s) for s in trained])
            held = list(read_manifest(directory)["systems"])
            # Keyed without the ablation: `dynamic_prefix~random` reads dynamic_prefix's weights (model_for).
            wanted = {str(SystemName(s.base, s.tag)): checkpoint_name(s, held) for s in trained}
            feature_dims = {"lm_kv": None, "lm_layers": lm.config.hidden_size}
            models = load_models(directory, sorted(set(wanted.values())), lm, feature_dims, cfg.lm.model,
                                 tokenizer=tokenizer)
            model_names = wanted
        qa = cls(QASettings.from_config(cfg), lm, tokenizer, retriever, models, model_names)
        if trained:
            qa.attach_prefix_stores(directory)
            if qa.settings.rerank == "reader":
                qa.attach_rerankers(directory)
        return qa

    def attach_rerankers(self, checkpoint: Path) -> None:
        """The `qa.rerank=reader` probe of every loaded system, from <checkpoint>/<system>/reranker.safetensors."""
        for name in self.models:
            path = Path(checkpoint) / name / RERANKER_FILE
            if not path.is_file():
                raise UserError(f"qa.rerank=reader: {path} does not exist; fit one with `python -m qa.fit_reranker "
                                f"--config CONFIG qa.checkpoint={checkpoint} qa.mode={name}` or set qa.rerank=none")
            expected = read_manifest(Path(checkpoint))["systems"].get(name, {}).get("sha256", {}).get(RERANKER_FILE)
            verify_file(path, expected, "fit it again with `python -m qa.fit_reranker`")
            self.rerankers[name] = ReaderReranker.load(path, lm_key(self.lm.config))

    def attach_prefix_stores(self, checkpoint: Path) -> None:
        """Prefix sources per `knowledge_encoder.prefix_store`: `all` reads run_dir/prefixes/<system> where it
        exists (a stale one is refused with a clear error), `cache` an LRU cache in run_dir/prefix_cache."""
        from data_prep.store import SegmentStore
        from knowledge_encoder.prefix_cache import PrefixCache
        from knowledge_encoder.prefix_store import PrefixStore, prefix_dir
        from qa.checkpoint import encoder_sha256
        from qa.prefix_source import PrefixSource, prefix_cache_dir

        s = self.settings
        if s.prefix_store == "none":
            return
        for name, model in self.models.items():
            if model.encoder is None:
                continue
            if s.prefix_store == "cache":
                meta = {"system": name, "encoder_sha256": encoder_sha256(checkpoint, name),
                        "encoder_config": to_dict(model.encoder.cfg), "dtype": s.store_dtype,
                        "next_position": model.encoder.next_position}
                cache = PrefixCache(prefix_cache_dir(s.run_dir, name), meta, int(s.prefix_cache_gb * (1 << 30)))
                self.prefix_sources[name] = PrefixSource(cache=cache)
                log.info("%s caches prefixes in %s (%d entries, %.1f MB)", name, cache.dir, len(cache),
                         cache.bytes / 1e6)
                continue
            directory = prefix_dir(s.run_dir, name)
            if not directory.is_dir():
                continue
            store_fp = SegmentStore.open(s.run_dir / "store").fingerprint
            store = PrefixStore.open(directory, encoder_sha256(checkpoint, name), store_fp)
            self.prefix_sources[name] = PrefixSource(store=store)
            log.info("%s reads precomputed prefixes from %s (%d segments)", name, directory, len(store))

    @property
    def prefix_stores(self) -> dict:
        """The precomputed stores in use, by system (for reports and tests)."""
        return {n: s.store for n, s in self.prefix_sources.items() if s.store is not None}

    def available_modes(self) -> list[str]:
        modes = ["closed_book"]
        if self.retriever is not None:
            modes.append("rag_text")
        modes += list(self.model_names)
        return list(dict.fromkeys(modes))

    def model_for(self, system: SystemName) -> PrefixQAModel | None:
        if not system.trainable:
            return None
        key = self.model_names.get(str(SystemName(system.base, system.tag)))
        if key is None or key not in self.models:
            raise UserError(f"mode `{system}` needs a trained checkpoint that holds it; loaded: "
                            f"{', '.join(self.model_names) or 'none'}")
        return self.models[key]

    def _batcher(self, model: PrefixQAModel | None) -> Batcher:
        """One feature cache per backbone, shared by the systems that read with it."""
        if model is None or model.encoder is None:
            return self._batchers.setdefault("none", Batcher(self.template, None, self.device))
        kcfg = model.encoder.cfg
        key = feature_kind(kcfg)
        if key not in self._batchers:
            s = self.settings
            backbone = build_backbone(kcfg, self.lm, self.template, s.retriever_model, self.device)
            # Sized like training's cache: an evaluation runs system after system over the same segments,
            # and an LRU smaller than their features would recompute every one of them for every system.
            cache = FeatureCache.sized(backbone, s.run_dir, s.feature_cache_gb, s.feature_disk_gb)
            self._batchers[key] = Batcher(self.template, cache, self.device)
        return self._batchers[key]

    # ------------------------------------------------------------------ answering
    def retrieve(self, questions: Sequence[str], k: int) -> list[list]:
        if self.retriever is None:
            raise UserError("this mode needs a retriever: build the index first (`python -m retriever.index`)")
        return self.retriever.batch_search(list(questions), k)

    def prepare(self, system: SystemName, model: PrefixQAModel | None, examples: Sequence[Example],
                batcher: Batcher | None = None) -> tuple[QABatch, Prefix | None]:
        """The batch and the prefix the LM reads: segment prefixes from the system's prefix source (store or
        cache; the encoder only for the segments they lack), else the encoder over every segment's features."""
        batcher = batcher or self._batcher(model)
        key = self.model_names.get(str(SystemName(system.base, system.tag)), "")
        source = self.prefix_sources.get(key)
        if model is not None and model.encoder is not None and source is not None:
            batch = batcher.build(examples, system, with_labels=False, with_features=False)
            return batch, source.prefix(model, examples, batcher, self.device)
        batch = batcher.build(examples, system, with_labels=False)
        return batch, None if model is None else model.prefix(batch)

    @torch.no_grad()
    def answer(self, questions: Sequence[str], mode: str | None = None, top_k: int | None = None,
               hits: Sequence[Sequence] | None = None, batch_size: int | None = None,
               on_token: Callable[[int, str], None] | None = None) -> list[Prediction]:
        """Answer questions in one mode. `hits` overrides retrieval (ablations, the demo's source view).

        `on_token(i, text_so_far)` streams the answer of question i as it is generated (with
        `qa.reading=each` and k > 1, once, when the answer is chosen).
        """
        s = self.settings
        system = parse_system(mode or s.mode)
        model = self.model_for(system)
        for q in questions:
            self.template.check_question(q)
        k = top_k or s.top_k
        batch_size = batch_size or s.batch_size
        out: list[Prediction] = []
        for start in range(0, len(questions), batch_size):
            chunk = list(questions[start:start + batch_size])
            t0 = time.perf_counter()
            chunk_hits = [[] for _ in chunk]
            if system.kind.retrieves:
                chunk_hits = [list(h) for h in hits[start:start + batch_size]] if hits is not None else self.retrieve(chunk, k)
            t1 = time.perf_counter()
            read_hits = chunk_hits
            if s.rerank == "reader" and system.kind.retrieves and any(len(hs) > 1 for hs in chunk_hits):
                chunk_hits = self.rerank(system, model, chunk, chunk_hits)
                read_hits = [hs[:1] for hs in chunk_hits]
            rerank_s = time.perf_counter() - t1
            each = s.reading == "each" and system.kind.retrieves and any(len(hs) > 1 for hs in read_hits)
            if each:
                # One row per (question, segment): row r reads segment r % k' of question r // k' alone.
                rows = [(i, [h]) for i, hs in enumerate(read_hits) for h in hs]
            else:
                rows = list(enumerate(read_hits))
            stream = None if on_token is None or each else _Streamer(self.tokenizer, on_token, start, len(chunk))
            read = self._read(system, model, [chunk[i] for i, _ in rows], [hs for _, hs in rows], stream)
            t2, t3 = t1 + read.encode_s, t1 + read.encode_s + read.generate_s
            n = len(chunk)
            timings = {"retrieve_ms": (t1 - t0) * 1e3 / n, "encode_ms": (t2 - t1 + rerank_s) * 1e3 / n,
                       "generate_ms": (t3 - t2) * 1e3 / n}
            rows_of: list[list[int]] = [[] for _ in chunk]  # question i -> its rows, in rank order
            for r, (row_q, _) in enumerate(rows):
                rows_of[row_q].append(r)
            for i, q in enumerate(chunk):
                mine = rows_of[i]
                candidates = [Candidate(rank, rows[r][1][0].segment_id if rows[r][1] else None, read.texts[r],
                                        read.logprobs[r]) for rank, r in enumerate(mine)]
                chosen = choose_answer(candidates, s.reading_rule, s.no_answer) if each else candidates[0]
                if each and on_token is not None:
                    on_token(start + i, chosen.text)
                out.append(Prediction(
                    question=q,
                    prediction=chosen.text,
                    mode=str(system),
                    retrieved=chunk_hits[i],
                    latency_ms=sum(timings.values()),
                    timings=dict(timings),
                    prompt_tokens=sum(read.prompt_tokens[r] for r in mine),
                    prefix_slots=sum(read.prefix_slots[r] for r in mine),
                    candidates=[c.as_row() for c in candidates] if each else [],
                    chosen_rank=chosen.rank if each else None,
                ))
        return out

    @torch.no_grad()
    def rerank(self, system: SystemName, model: PrefixQAModel | None, questions: Sequence[str],
               hits: Sequence[Sequence]) -> list[list]:
        """Each question's hits reordered by the system's reader probe (`qa.rerank=reader`), best first."""
        key = self.model_names.get(str(SystemName(system.base, system.tag)), "")
        reranker = self.rerankers.get(key)
        if reranker is None:
            raise UserError(f"qa.rerank=reader: no reranker is loaded for `{system}` (a trained system's checkpoint "
                            f"holds one after `python -m qa.fit_reranker`)")
        rows = [(i, rank, h) for i, hs in enumerate(hits) for rank, h in enumerate(hs)]
        examples = [Example(questions[i], [TextSegment(h.title, h.text)], [h.segment_id]) for i, _, h in rows]
        batch, prefix = self.prepare(system, model, examples)
        features = reader_features(self.lm, batch.input_ids, batch.attention_mask, prefix, reranker.layers,
                                   torch.tensor([h.score for _, _, h in rows]),
                                   torch.tensor([rank for _, rank, _ in rows]))
        scores = reranker.score(features).tolist()
        out: list[list] = [[] for _ in hits]
        order = sorted(range(len(rows)), key=lambda r: (rows[r][0], -scores[r], rows[r][1]))  # ties keep rank order
        for r in order:
            out[rows[r][0]].append(rows[r][2])
        return out

    def _read(self, system: SystemName, model: PrefixQAModel | None, questions: Sequence[str],
              hits: Sequence[Sequence], stream) -> _Reading:
        """Greedy answers of `questions[r]` reading the segments `hits[r]`, one batch, with their log-probs."""
        t0 = time.perf_counter()
        examples = [Example(q, [TextSegment(h.title, h.text) for h in hs], [h.segment_id for h in hs])
                    for q, hs in zip(questions, hits)]
        batch, prefix = self.prepare(system, model, examples)
        t1 = time.perf_counter()
        choose = None
        if self.settings.decoding == "span" and system.kind.retrieves:
            texts = [[f"{h.title}\n{h.text}" for h in hs] for hs in hits]
            choose = SpanConstraint(self.tokenizer, texts, self.stop)
        logprobs: list[list[float]] = []
        generated = greedy_generate(self.lm, batch.input_ids, batch.attention_mask, prefix, self.stop,
                                    self.settings.max_new_tokens, on_token=stream, choose=choose, logprobs=logprobs)
        t2 = time.perf_counter()
        return _Reading(
            texts=[self.template.decode_answer(ids) for ids in generated],
            logprobs=[sum(lp) for lp in logprobs],
            prompt_tokens=[int(m.sum()) for m in batch.attention_mask],
            prefix_slots=[0] * len(examples) if prefix is None else [int(m.sum()) for m in prefix.mask],
            encode_s=t1 - t0,
            generate_s=t2 - t1,
        )

    def generate(self, questions: Sequence[str]) -> list[str]:
        return [p.prediction for p in self.answer(questions)]


class _Streamer:
    """Turns generated token ids into the running answer text of each question for `on_token`."""

    def __init__(self, tokenizer, on_token: Callable[[int, str], None], offset: int, rows: int):
        self.tokenizer, self.on_token, self.offset = tokenizer, on_token, offset
        self.ids: list[list[int]] = [[] for _ in range(rows)]

    def __call__(self, row: int, token_id: int) -> None:
        self.ids[row].append(token_id)
        self.on_token(self.offset + row, self.tokenizer.decode(self.ids[row], skip_special_tokens=True))
