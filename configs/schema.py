"""Typed configuration: one dataclass per area, every field with help text.

Every public key (README "Commands", docs/ARCHITECTURE.md) lives here under its dotted name. `configs.loader` fills these from YAML plus `key=value` overrides and rejects unknown keys
and wrong types.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# The one question-length limit (lm.max_question_chars): every command, the demo and `lm.PromptTemplate`'s
# default read it from here. (The demo once had its own, app.max_question_chars; see configs.loader.RETIRED.)
MAX_QUESTION_CHARS = 1000


def opt(default, help: str, choices: tuple | None = None):
    """A dataclass field with help text (shown by `--help`) and optional allowed values."""
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = choices
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class SyntheticConfig:
    n_entities: int = opt(1200, "number of entities (one article each) in the synthetic knowledge world")
    seed: int = opt(0, "seed of the world generator (independent of the top-level seed)")
    questions_per_entity: int = opt(4, "questions generated per entity (one per sampled attribute)")
    name_variants: int = opt(
        12, "entities per type whose names differ only in their last syllable (1-48; more = harder retrieval)"
    )
    distractor_facts: int = opt(
        3, "facts about related entities in each article (harder reading and retrieval)"
    )


@dataclass
class DataConfig:
    corpus: str = opt(
        "synthetic",
        "corpus: a JSONL file, a SQuAD JSON file, `synthetic` (the generated world), "
        "`nq:<split>` (Natural Questions via datasets) or `dpr:<psgs_w100.tsv>`",
    )
    qa: str = opt("synthetic", "QA set: a JSONL file, a SQuAD JSON file, `synthetic`, `nq:<split>` or `nq_open:<split>`")
    split: str = opt(
        "test",
        "the split evaluation commands read; training commands always train on `train` (split rule: a hash "
        "of the article title / entity, never of the question)",
        choices=("train", "dev", "test", "all"),
    )
    dev_fraction: float = opt(0.1, "fraction of articles in the dev split")
    test_fraction: float = opt(0.2, "fraction of articles in the test split")
    window: int = opt(
        288,
        "segment length in retriever tokens, title included (title + text <= window, [CLS]/[SEP] excluded)",
    )
    stride: int = opt(
        64,
        "OVERLAP in tokens between consecutive windows of a long document (Hugging Face "
        "`return_overflowing_tokens` convention): window starts advance by window - title - stride tokens",
    )
    on_bad_line: str = opt("error", "malformed JSONL lines: `error` stops with file:line, `skip` counts them",
                           choices=("error", "skip"))
    num_workers: int = opt(0, "processes for segmentation (0 = all cores)")
    chunk_docs: int = opt(256, "documents per segmentation task sent to a worker process")
    nq_dataset: str = opt(
        "google-research-datasets/natural_questions",
        "dataset (hub id or local folder of its parquet files) read by the `nq:<split>` loader",
    )
    nq_open_dataset: str = opt(
        "google-research-datasets/nq_open",
        "dataset (hub id or local folder) read by the `nq_open:<split>` loader",
    )
    hf_cache_dir: str | None = opt(None, "cache of the `datasets` library for NQ (null = its default)")
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class RetrieverFinetuneConfig:
    lr: float = opt(2e-5, "learning rate of retriever fine-tuning")
    epochs: float = opt(1.0, "epochs over the (question, gold segment) pairs")
    batch_size: int = opt(32, "pairs per batch (in-batch negatives)")
    mini_batch_size: int = opt(0, "if > 0, use the cached (GradCache) InfoNCE loss with this mini-batch size")
    temperature: float = opt(0.05, "InfoNCE temperature (sentence-transformers scale = 1 / temperature)")
    hard_negatives: int = opt(1, "hard negatives per question mined from the current index (0 = none)")
    negatives_from: str = opt(
        "dense",
        "ranking the hard negatives are mined from: dense (the current index), bm25 (DPR's choice) or hybrid "
        "(the fusion, retriever.hybrid.weight/fusion); run_dir/bm25 is built when needed",
        choices=("dense", "bm25", "hybrid"),
    )
    max_pairs: int = opt(0, "cap on training pairs (0 = all)")
    reindex: bool = opt(True, "after training, re-embed the store and rebuild the index with the new encoder")
    eval_limit: int = opt(2000, "questions of the evaluation split used for before/after metrics")
    max_steps: int = opt(0, "stop after this many optimizer steps (0 = the epochs decide)")
    loss_pairs: int = opt(128, "training pairs on which the InfoNCE loss is measured before and after")
    save_steps: int = opt(50, "steps between resumable checkpoints in run_dir/retriever_checkpoints (0 = none)")
    precision: str = opt(
        "auto",
        "mixed precision of the forward/backward (weights stay fp32): auto (bf16, else fp16, on a GPU; fp32 "
        "on CPU), bf16 (CPU autocast too: faster where the CPU has AVX-512 bf16 or AMX), fp16 (GPU only), fp32",
        choices=("auto", "bf16", "fp16", "fp32"),
    )


@dataclass
class HybridConfig:
    enabled: bool = opt(
        False,
        "fuse BM25 (lexical) with the dense search; run_dir/bm25 is built from the store on first use. Helps "
        "questions that share rare words with their passage (SQuAD-style)",
    )
    weight: float = opt(
        0.5,
        "weight of BM25 in the fusion, 0..1 (0 = the dense ranking, 1 = the BM25 ranking; 0.5 was best on the "
        "SQuAD dev articles, see README)",
    )
    fusion: str = opt(
        "linear",
        "linear: per-question min-max normalised (1 - weight) * dense + weight * bm25 (DPR's hybrid); "
        "rrf: reciprocal rank fusion with the same weights",
        choices=("linear", "rrf"),
    )
    depth: int = opt(100, "candidates taken from each of the dense and the BM25 search before fusing")
    k1: float = opt(0.9, "BM25 term-frequency saturation k1")
    b: float = opt(0.4, "BM25 length normalisation b (0 = none, 1 = full)")


@dataclass
class RetrieverConfig:
    model: str = opt("embedded:minilm-l6", "bi-encoder: `embedded:minilm-l6`, a hub id or a local path")
    top_k: int = opt(1, "segments per question")
    similarity: str = opt("cosine", "score function", choices=("cosine", "dot"))
    max_seq_length: int = opt(320, "encoder max tokens (must cover window + title)")
    batch_size: int = opt(64, "encoding batch size")
    query_prefix: str = opt("", "text prepended to queries (e.g. `query: ` for e5)")
    passage_prefix: str = opt("", "text prepended to segments (e.g. `passage: ` for e5)")
    dtype: str = opt("auto", "encoder dtype: auto (fp16 on GPU, fp32 on CPU), float32, bfloat16, float16",
                     choices=("auto", "float32", "bfloat16", "float16"))
    service_url: str | None = opt(None, "a running `python -m retriever.serve` (e.g. http://127.0.0.1:8765): qa.train, "
                                  "eval.run, qa.answer and app.py search through it instead of opening run_dir/index "
                                  "themselves (null = in-process)")
    service_timeout: float = opt(60.0, "seconds the retrieval-service client waits for one response")
    finetune: RetrieverFinetuneConfig = field(default_factory=RetrieverFinetuneConfig)
    hybrid: HybridConfig = field(default_factory=HybridConfig)


@dataclass
class IndexConfig:
    factory: str = opt("auto", "faiss factory string, `{nlist}` filled in (e.g. `Flat`, `IVF{nlist},Flat`, "
                               "`IVF{nlist},SQ8,Refine(Flat)`), or auto: `IVF{nlist},Flat` below 1M vectors, "
                               "`IVF{nlist},PQ{dim}x4fs,RFlat` (fast-scan codes, exact re-ranking, no live removal) "
                               "from 1M on")
    nlist: int = opt(0, "IVF lists (0 = about 4*sqrt(N), capped so each centroid has >= 39 training points)")
    nprobe: int = opt(0, "IVF lists visited per query (0 = automatic: enough lists to scan ~20k vectors, at "
                         "least 16; every list of a corpus under ~20k segments)")
    hnsw_ef_search: int = opt(0, "HNSW candidate list per query, of an `HNSW32,Flat` index or of the HNSW coarse "
                                 "quantizer of `IVF{nlist}_HNSW32,Flat` (0 = automatic: max(64, 2k))")
    refine_k_factor: float = opt(0.0, "a re-ranked index (`IVF{nlist},SQ8,Refine(Flat)`, `...,RFlat`) re-scores "
                                      "k * this many candidates with the exact vectors (0 = automatic: 4; 8 "
                                      "after SQ4 codes, 32 after 4-bit fast-scan PQ codes)")
    embed_dtype: str = opt("float16", "dtype of the stored embedding matrix", choices=("float16", "float32"))
    shard_size: int = opt(4096, "segments per embedding shard (the unit of resume)")
    train_sample: int = opt(0, "vectors used to train the IVF quantizer (0 = min(N, 256 * nlist))")
    use_gpu: str = opt("auto", "faiss GPU index: auto, true, false", choices=("auto", "true", "false"))
    verify_sha256: bool = opt(True, "check the index file's sha256 against its manifest on load (slow for huge indexes)")
    backend: str = opt("faiss", "vector store: `faiss` (embedded, run_dir/index/index.faiss) or `milvus` (pymilvus: "
                       "milvus-lite in a local file, or a Milvus server/cluster at index.milvus_uri); an index built "
                       "by one is refused by the other", choices=("faiss", "milvus"))
    milvus_uri: str | None = opt(None, "Milvus to build in and search (index.backend=milvus): null = the milvus-lite "
                                 "file run_dir/index/milvus.db, a local path ending in .db (milvus-lite), or a server "
                                 "or cluster URI such as http://host:19530")
    milvus_collection: str = opt("prefixrag", "Milvus alias of the index (index.backend=milvus); each build is a new "
                                 "collection NAME__<build id> that the alias is switched to")
    milvus_index_type: str = opt("FLAT", "Milvus vector index (index.backend=milvus), inner product: FLAT (exact), "
                                 "IVF_FLAT (index.nlist lists, index.nprobe visited) or HNSW (index.milvus_hnsw_*)",
                                 choices=("FLAT", "IVF_FLAT", "HNSW"))
    milvus_hnsw_m: int = opt(16, "HNSW graph degree M (index.milvus_index_type=HNSW)")
    milvus_hnsw_ef_construction: int = opt(200, "HNSW efConstruction (index.milvus_index_type=HNSW)")
    milvus_hnsw_ef: int = opt(128, "HNSW search ef, raised to k when k is larger (index.milvus_index_type=HNSW)")
    milvus_timeout: float = opt(60.0, "seconds one Milvus call may take before it is an error (index.backend=milvus)")


@dataclass
class KnowledgeEncoderConfig:
    backbone: str = opt(
        "lm_kv",
        "what reads a segment: `lm_kv` (the frozen LM's own per-layer K,V of the segment), `lm_layers` (hidden "
        "states of the LM's lower layers), `retriever` (the retriever's encoder) or an HF encoder id/path",
    )
    prefix_slots: int | None = opt(32, "P, prefix slots per segment (0 or null = segment length)")
    compressor: str = opt(
        "pool",
        "how the lm_kv backbone's n token K,V become P slots: `pool` (learned attention pooling, trained through "
        "the LM) or `select` (training-free: keep the P positions per layer and head that KVzip's reconstruction "
        "attention scores highest, at their original positions; the baseline a learned compressor must beat) or "
        "`memory` (P learned memory tokens that the LM reads after the segment's K,V; their per-layer K,V are the "
        "slots, ICAE-style; trained through the LM, best with an encode_lora_rank adapter)",
        choices=("pool", "select", "memory"),
    )
    select_scores: str = opt(
        "kvzip",
        "what ranks the positions the `select` compressor keeps: `kvzip` (training-free: KVzip's reconstruction "
        "attention, per layer and head) or `learned` (a small scorer over the segment's values of every layer "
        "predicts which tokens answers are made of, one set of positions for all layers; trained by `python -m "
        "qa.pretrain pretrain.objective=salience` on the answer spans of training questions)",
        choices=("kvzip", "learned"),
    )
    scorer_window: int = opt(
        0,
        "tokens on each side that the learned selection scorer (select_scores=learned) also reads: 0 = each token "
        "alone (an MLP over its values); w > 0 adds a depthwise convolution over 2w + 1 neighbouring tokens' "
        "hidden features (started at zero, so training starts from the per-token scorer), so it can learn to "
        "keep the rest of a name or a number once one of its tokens is kept",
    )
    scorer_layers: int = opt(
        0,
        "self-attention layers (4 heads, width 128) the learned selection scorer runs over the whole segment's "
        "token features before scoring (after scorer_window's convolution): a token can then be judged by the "
        "segment around it at any distance (whose fact it belongs to, whether it names the title entity), which "
        "a window cannot see; 0 = none",
    )
    select_skip_repeats: bool = opt(
        False,
        "learned selection (select_scores=learned) passes over a position whose token and two tokens on each "
        "side repeat those of a position already kept, so the inside of a name that occurs twice takes its "
        "slots once and the slots saved go to the next answer-like tokens; selection only, the scorer is unchanged",
    )
    select_gather_mentions: bool = opt(
        True,
        "learned selection (select_scores=learned) keeps each repeated name or number in one of its occurrences: "
        "walking positions from the highest score down, a pick inside a mention (a run of capitalised or numeric "
        "words) moves to the same token of that mention's first-picked occurrence, so its slots add up to one "
        "whole copy instead of parts of several, and the slots saved go to the next-ranked tokens; selection "
        "only (the scorer is unchanged); needs the LM's tokenizer; set it false to use select_skip_repeats",
    )
    memory_inputs: str = opt(
        "learned",
        "what the `memory` compressor's P tokens read in: `learned` embeddings (started as P random vocabulary "
        "tokens) or `chunk_mean` (the mean token embedding of the segment's j-th of P equal chunks + a learned "
        "offset started at zero: each slot starts as a summary of its part of the segment)",
        choices=("learned", "chunk_mean"),
    )
    pool_rope: str = opt(
        "pre",
        "keys the `pool` compressor averages: `post` = the LM's RoPE-rotated keys (the first design), `pre` = keys "
        "with RoPE undone, each slot then rotated at its attention-weighted mean position (averaging rotated keys "
        "of several positions damps their high-frequency dimensions)",
        choices=("post", "pre"),
    )
    encode_lora_rank: int = opt(
        0,
        "rank of a LoRA adapter on the LM's linear layers that is active only while the LM encodes a segment for "
        "a compressed (`pool` or `memory`) prefix: the encode pass learns what the slots must carry (for `memory` "
        "it adapts the memory tokens' pass only); the LM that answers stays the original (0 = the frozen LM's own K,V)",
    )
    encode_lora_targets: list[str] = opt(
        ["q_proj", "k_proj", "v_proj", "o_proj"], "names of the LM's linear layers that the encode adapter adapts"
    )
    encode_lora_layers: int = opt(
        0,
        "adapt only the LM's last N decoder layers in the encode pass (0 = all): backpropagation then stops at "
        "the first adapted layer, so a step costs about (1 + 2 N / L) instead of 3 forward passes of L layers; "
        "the K,V of the layers below are the frozen LM's",
    )
    slot_bias: bool = opt(
        True,
        "give every pooled slot the attention logit bias log(n / P) plus a learned offset per head and slot, so P "
        "slots keep the attention mass of the n tokens they stand for (needs the LM's sdpa attention)",
    )
    format_slots: int = opt(8, "learned static slots shared by all questions (answer format), 0 = none")
    projection: str = opt("identity", "per-layer K/V heads: identity-initialised linear maps, full, or factored",
                          choices=("identity", "full", "factored"))
    rank: int = opt(64, "rank of the shared basis of the `factored` projection")
    lm_layers: int = opt(4, "lower LM layers read by the `lm_layers` backbone")
    max_segment_tokens: int = opt(320, "segment length cap in LM tokens")
    store_dtype: str = opt(
        "bfloat16",
        "dtype of the prefix store: bfloat16, float16, float32, int8 (keys quantised per channel, values per "
        "slot, float16 scales: about half of bf16) or int4 (the same groups, asymmetric 4-bit codes packed two "
        "per byte, float16 scales and minima: about a quarter of bf16)",
        choices=("float16", "bfloat16", "float32", "int8", "int4"),
    )
    batch_size: int = opt(16, "segments per batch in precompute")
    store_shard_rows: int = opt(0, "prefixes per prefix-store shard, the unit of resume of precompute "
                                   "(0 = 256 compressed or 32 full-length prefixes)")
    prefix_store: str = opt(
        "all",
        "where serving (qa.answer, eval.run, the app) gets segment prefixes: `all` = the store that "
        "`python -m qa.precompute` filled (segments it lacks are computed on the fly), `cache` = a "
        "bounded on-disk LRU cache in run_dir/prefix_cache filled while serving (for corpora too big to "
        "precompute), `none` = always computed",
        choices=("all", "cache", "none"),
    )
    prefix_cache_gb: float = opt(2.0, "disk budget of the `cache` prefix store per system")


@dataclass
class LMConfig:
    model: str = opt("embedded:smollm2-135m", "frozen LM: `embedded:smollm2-135m`, a hub id or a local path")
    dtype: str = opt("auto", "LM weights dtype: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16",
                     choices=("auto", "float32", "bfloat16", "float16"))
    autocast_bf16: bool = opt(False, "run the LM under bf16 autocast on CPU (AVX-512 bf16 machines)")
    max_new_tokens: int = opt(24, "answer length cap in tokens")
    max_question_chars: int = opt(
        MAX_QUESTION_CHARS,
        "longest question in characters, for every command and the demo alike; longer ones are refused with a "
        "clear error",
    )
    system_prompt: str = opt("Answer the question with a short phrase.", "system message of the chat template")


@dataclass
class QAConfig:
    checkpoint: str | None = opt(
        None,
        "trained checkpoint directory; null = run_dir/checkpoints/final when a run trained one, else the model that "
        "ships in models/smollm2-135m-squad (for lm.model=embedded:smollm2-135m)",
    )
    mode: str = opt("dynamic_prefix", "system used by qa.answer and the app (a name from eval.systems)")
    decoding: str = opt(
        "free",
        "answers of systems that read segments: `free` = greedy decoding; `span` = greedy over the tokens that keep "
        "the answer a piece of the retrieved segments' text (extractive answers)",
        choices=("free", "span"),
    )
    reading: str = opt(
        "joint",
        "how a system that retrieves reads top_k > 1 segments: `joint` = all k in one prompt or prefix (what "
        "training does); `each` = every segment alone, then one answer kept by qa.reading_rule (for a reader "
        "trained on one segment; costs k reader passes, batched)",
        choices=("joint", "each"),
    )
    no_answer: str = opt("unanswerable", "the answer a reader trained with train.negatives gives when its segment "
                         "does not answer; qa.reading=each never keeps it while another segment answers")
    reading_rule: str = opt(
        "sum",
        "qa.reading=each: `sum` = RAG-Sequence marginal, the answer whose segments give it the most probability in "
        "total (agreeing segments add up); `max` = the single most probable answer",
        choices=("sum", "max"),
    )
    rerank: str = opt(
        "none",
        "top_k > 1: `reader` = score each retrieved segment by a probe on the reader's hidden state after reading "
        "it alone (fitted by `python -m qa.fit_reranker`, kept as <checkpoint>/<system>/reranker.safetensors), "
        "then answer from the best-scored segment alone; `none` = read as qa.reading says",
        choices=("none", "reader"),
    )


@dataclass
class TrainConfig:
    systems: list[str] = opt(
        ["dynamic_prefix", "rag_text_tuned", "static_prefix"],
        "systems trained on the same batches and budget (comma list; variants as NAME@tag, e.g. dynamic_prefix@p32)",
    )
    max_steps: int = opt(300, "optimizer steps per system")
    stop_at_step: int = opt(0, "stop after this step and save state (0 = run to max_steps); continue with --resume")
    batch_size: int = opt(8, "questions per step (per process)")
    grad_accum: int = opt(1, "gradient accumulation steps")
    lr: float = opt(3e-3, "peak learning rate (AdamW, linear warmup then cosine decay)")
    pool_lr_scale: float = opt(10.0, "learning rate of a compressor's pooling parameters (queries, slot biases) as a "
                               "multiple of train.lr")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    warmup_steps: int = opt(20, "linear warmup steps")
    static_slots: int = opt(16, "virtual tokens of the peft prefix of static_prefix and rag_text_tuned")
    force_gold: bool = opt(True, "training only: when retrieval missed the gold segment, it replaces the lowest-ranked "
                           "of the top-k (with top_k = 5: gold + 4 retrieved hard negatives)")
    train_segments_only: bool = opt(True, "training reads only segments of train articles: with top_k > 1 the "
                                    "retrieved segments of dev/test articles are dropped and deeper hits used, so "
                                    "no test article is read, even as a distractor, by any training command")
    shuffle_segments: bool = opt(False, "training only: put each question's k segments in a random order (seeded), so "
                                 "the reader learns to pick the segment that answers rather than a position")
    negatives: int = opt(0, "hard negatives per question (needs retriever.top_k=1): its best-ranked retrieved train "
                         "segments without an answer string, each read alone with the target qa.no_answer, so the "
                         "reader learns to abstain where the answer is not (what qa.reading=each needs to pick among "
                         "k segments); 0 = none")
    retrieval: str = opt("cached", "`cached`: top-k per question retrieved once, fingerprinted by index, encoder and "
                         "store (the only mode: the index stays fixed during training, so an online search would "
                         "return the same hits)", choices=("cached",))
    distill_weight: float = opt(1.0, "weight of the KL to the teacher's answer distribution (0 = off)")
    hidden_distill_weight: float = opt(0.0, "weight of matching the teacher's hidden states on the question")
    distill_temperature: float = opt(1.0, "softmax temperature of the distillation KL")
    teacher: str = opt("pfull", "teacher of a compressed dynamic prefix: `pfull`, the same encoder at P = segment "
                       "length (the frozen LM's own K,V of the text), trained alongside with CE; or `none`",
                       choices=("pfull", "none"))
    joint_retriever: bool = opt(
        False,
        "also train the retriever's question side end to end: for every trainable system that retrieves, add the "
        "RAG-sequence loss -log sum_z p(z|x) p(y|x,z) over the (cached, gold-forced) top-k, the reader reading one "
        "segment at a time; needs retriever.top_k >= 2. The trained retriever is saved as checkpoints/*/retriever; "
        "the index is not rebuilt (re-embed with `python -m retriever.index retriever.model=<that folder>`)",
    )
    retriever_lr: float = opt(1e-5, "learning rate of the retriever (AdamW, same warmup/cosine schedule) when "
                              "joint_retriever is on")
    retriever_temperature: float | None = opt(
        None, "p(z|x) = softmax(score / temperature) in joint_retriever mode (null = 0.05 for cosine similarity, "
        "1 for dot)")
    eval_every: int = opt(100, "steps between dev evaluations (0 = only at the end)")
    dev_limit: int = opt(100, "dev questions per evaluation")
    dev_force_gold: bool = opt(False, "dev evaluation with the gold segment forced in (measures reading, not retrieval)")
    save_every: int = opt(100, "steps between checkpoints (0 = only final)")
    log_every: int = opt(10, "steps between log lines")
    max_train_questions: int = opt(0, "cap on training questions (0 = all)")
    feature_cache_gb: float = opt(4.0, "RAM for cached frozen segment features (LM K,V), in training and "
                                   "when answering (eval, app); misses are recomputed")
    feature_disk_gb: float = opt(12.0, "disk for frozen segment features in run_dir/feature_cache (an LRU shared "
                                  "by training, --resume and evaluation of the run; ~4 MB per SQuAD paragraph "
                                  "with the embedded LM); 0 = RAM only")
    data_start_step: int = opt(0, "skip the training order's batches up to this step: a run that continues a "
                                "checkpoint trained N steps on the same data and seed (train.init_from) sets N, so "
                                "the two runs together read each question once per epoch instead of the first N "
                                "batches twice")
    init_from: str | None = opt(
        None,
        "a checkpoint whose knowledge-encoder weights start every trained dynamic system of the same name "
        "(e.g. run_dir/pretrain/final from `python -m qa.pretrain`), or `DIR:SYSTEM` to start from another "
        "system there (e.g. DIR:dynamic_prefix@pfull: its format slots and K/V heads; the pooling keeps its start); "
        "null = the LM's own K,V warm start",
    )


@dataclass
class PretrainConfig:
    system: str = opt("dynamic_prefix@p32", "the dynamic-prefix system whose knowledge encoder is pretrained "
                      "(P from its tag, the rest from knowledge_encoder.*); qa.train with train.init_from starts "
                      "the system of this name from it")
    max_steps: int = opt(200, "optimizer steps (0: no training, only the dev report of objective=salience)")
    stop_at_step: int = opt(0, "stop after this step and save state (0 = run to max_steps); continue with --resume")
    batch_size: int = opt(8, "segments per step")
    lr: float = opt(3e-3, "peak learning rate (AdamW, linear warmup then cosine decay)")
    warmup_steps: int = opt(20, "linear warmup steps")
    split: str = opt("train", "which articles' segments are read (the data.split rule); `all` reads the test "
                     "articles too, which is fine for a deployed corpus but not before measuring on it",
                     choices=("train", "dev", "test", "all"))
    objective: str = opt("continuation", "what the compressed prefix must let the frozen LM do: `continuation` = "
                         "continue a segment cut at context_fraction as it does after the segment's full K,V (KL on "
                         "the continuation tokens); `reconstruct` = restate the whole segment after a repeat prompt "
                         "(cross-entropy on its tokens; ICAE's autoencoding objective); `salience` = train the "
                         "learned selection scorer (knowledge_encoder.compressor=select, select_scores=learned) to "
                         "rank the tokens of the split's questions' answers first (binary cross-entropy; needs the "
                         "store's questions, which no other objective reads)",
                         choices=("continuation", "reconstruct", "salience"))
    salience_pos_weight: float = opt(4.0, "weight of an answer token against another token in the salience "
                                     "objective's cross-entropy (answers are ~10% of a SQuAD paragraph's tokens)")
    dev_segments: int = opt(200, "objective=salience with split=train: segments of dev articles (those with "
                            "questions) on which each save reports how many answers the scorer's top P keep whole "
                            "(dev_answers_kept), its answer-token recall (dev_recall_at_p), the median rank of an "
                            "answer's last token (dev_answer_rank_median) and how many an oracle that knew the "
                            "answers could keep in P positions (dev_oracle_kept); with max_steps=0 and init_from "
                            "it only reports these for a trained scorer; 0 = none")
    reconstruct_tokens: int = opt(320, "segment tokens restated and scored per segment at most (objective=reconstruct)")
    context_fraction: list[float] = opt([0.5, 0.8], "each segment is cut at a uniformly drawn fraction in this "
                                        "range of its tokens: the part before is compressed, the part after is "
                                        "the continuation")
    continuation_tokens: int = opt(64, "continuation tokens scored per segment at most")
    min_context_tokens: int = opt(16, "segments with fewer context tokens than this are skipped")
    min_continuation_tokens: int = opt(8, "segments with fewer continuation tokens than this are skipped")
    temperature: float = opt(1.0, "softmax temperature of the distillation KL")
    init_from: str | None = opt(None, "start the encoder from a checkpoint, as train.init_from does: `DIR` "
                                "(the same-named system) or `DIR:SYSTEM` (e.g. DIR:dynamic_prefix@pfull: its "
                                "format slots and K/V heads; the pooling keeps its start); null = the LM's own "
                                "K,V warm start")
    save_every: int = opt(50, "steps between checkpoints and resumable state (0 = only final)")
    log_every: int = opt(10, "steps between log lines")


@dataclass
class EvalConfig:
    systems: list[str] = opt(["closed_book", "rag_text", "rag_text_tuned", "static_prefix", "dynamic_prefix"],
                             "systems evaluated side by side (comma list)")
    limit: int | None = opt(None, "evaluate N questions of the split (null = all); which ones: eval.sample")
    sample: str = opt("first", "which eval.limit questions: `first` = the first N in file order; `random` = a "
                      "seeded (seed) random sample of N questions, the same for every system and every rerun",
                      choices=("first", "random"))
    k_values: list[int] = opt([], "optional sweep of retriever.top_k for the EM-vs-k and latency-vs-k plots")
    batch_size: int = opt(8, "questions per generation batch")
    bertscore_model: str = opt("embedded:minilm-l6", "BERTScore backbone: hub id, local path or embedded name")
    bertscore_num_layers: int | None = opt(6, "BERTScore layer (required for a local path)")
    bertscore_baseline: str | None = opt(None, "rescale baseline file (.tsv) for BERTScore, null = no rescaling")
    bleurt_checkpoint: str | None = opt(None, "BLEURT checkpoint path (null = BLEURT skipped, reported as null)")
    bootstrap: int = opt(1000, "bootstrap resamples for 95% confidence intervals")
    metrics: list[str] = opt(["em", "f1", "contains", "bertscore_f1", "bleurt"],
                             "answer metrics computed (comma list); the others are reported as null (skipped)")
    metric_batch_size: int = opt(32, "pairs per forward pass of the model-based metrics (BERTScore, BLEURT)")
    bleurt_max_length: int = opt(512, "BLEURT input cap in tokens for reference + candidate (BLEURT-20: 512)")
    out_dir: str | None = opt(None, "where eval.run writes predictions.jsonl, metrics.json, report.md and plots "
                              "(null = run_dir/eval)")
    threads: int = opt(0, "torch CPU threads while evaluating (0 = torch's default); on a shared CPU, 1 avoids "
                       "oversubscription that inflates latency many times over")
    resume: bool = opt(True, "reuse predictions already in predictions.jsonl that were made with the same setup "
                       "(LM, checkpoint, index, store, batch size); false = recompute the evaluated systems")


@dataclass
class AppConfig:
    host: str = opt("127.0.0.1", "address the demo binds to (0.0.0.0 exposes it to the network)")
    port: int = opt(7860, "port of the demo")
    max_upload_mb: float = opt(2.0, "largest uploaded file")
    concurrency_limit: int = opt(2, "requests processed at once (the rest queue)")
    queue_size: int = opt(64, "requests waiting in the queue at most (more are refused at once with a 503 and a "
                          "message); 64 admits 50 concurrent users, each waiting for the answers ahead of it")
    max_top_k: int = opt(10, "largest top-k the demo accepts (the slider's maximum)")
    max_paste_chars: int = opt(100_000, "longest pasted document in characters")
    max_title_chars: int = opt(300, "longest title of an added document in characters")
    max_upload_files: int = opt(10, "files per upload")
    examples: int = opt(6, "example questions shown under the question box (from the store's data.split)")


@dataclass
class ServeConfig:
    host: str = opt("127.0.0.1", "address the retrieval service binds to (0.0.0.0 exposes it to the network, "
                    "without authentication: anyone who reaches it can add and remove documents)")
    port: int = opt(8765, "port of the retrieval service (0 = any free port, printed at start)")
    max_top_k: int = opt(100, "largest top_k a request may ask for")
    max_questions: int = opt(256, "questions (or query vectors) per /batch_search request")
    max_question_chars: int = opt(2000, "longest question accepted")
    max_documents: int = opt(100, "documents per /add request")
    max_body_mb: float = opt(8.0, "largest request body in MB (larger ones get 413)")
    coalesce: bool = opt(True, "search the questions of concurrent requests together (one encoder call for all "
                         "that wait while the encoder is busy; none waits longer); false = one call per request")


@dataclass
class ComputeConfig:
    engine: str = opt(
        "local",
        "where the corpus-sized jobs run (`python -m retriever.index`'s embedding, `python -m qa.precompute`): "
        "`local` = this process; `ray` = Ray Data actors (compute.ray_*), writing the same shards and manifests",
        choices=("local", "ray"),
    )
    ray_address: str | None = opt(
        None,
        "Ray to run on (compute.engine=ray): null = start a local Ray for the job and stop it after; `auto` or "
        "`host:6379` = an existing cluster, whose nodes must see the repo, run_dir and models at the same paths",
    )
    ray_workers: int = opt(2, "Ray actors (each loads the model once and encodes batches) for compute.engine=ray")
    ray_cpus_per_worker: float = opt(1.0, "CPUs reserved per Ray actor (also its torch threads, at least 1)")
    ray_gpus_per_worker: float = opt(0.0, "GPUs reserved per Ray actor (fractions share a GPU; 0 = CPU actors)")


@dataclass
class BenchConfig:
    n_vectors: int = opt(1_000_000, "synthetic vectors of the retrieval-at-scale benchmark")
    n_queries: int = opt(1000, "held-out queries of the retrieval benchmark")
    fit_segments: int = opt(20_000, "real segments encoded to fit the Gaussian mixture")
    nprobe_values: list[int] = opt([1, 4, 16, 64], "nprobe values measured")
    repeats: int = opt(5, "repetitions of each latency measurement")
    sections: list[str] = opt(["retrieval", "encoding", "qa_latency", "training", "size"],
                              "benchmark sections `make bench` runs (comma list)")
    run_dir: str | None = opt(None, "store, embeddings and index the benchmarks read (null = bench.work_dir/run, "
                              "built from data.* and retriever.model when missing or stale, so `make bench` needs "
                              "no earlier run and ignores what a comparison left in run_dir)")
    work_dir: str = opt("runs/bench", "bench-owned artifacts: an untrained checkpoint, a subset store, its prefix "
                        "store, finished sections (for --resume)")
    out_dir: str = opt("bench", "where RESULTS.md and results.json are written")
    retrieval_queries: str = opt("mixture", "queries of the retrieval benchmark: held-out `mixture` samples, real "
                                 "encoded `questions`, or `auto` (questions when the run has them)",
                                 choices=("mixture", "questions", "auto"))
    mixture_components: int = opt(0, "Gaussian components fitted to the real embeddings (0 = one per 40 vectors)")
    fit_embeddings: list[str] = opt([], "embedding folders the mixture is fitted to (empty = run_dir/embeddings)")
    compression: list[str] = opt(["IVF{nlist},SQ8", "IVF{nlist},PQ96", "IVF{nlist},PQ48"],
                                 "compressed IVF codecs compared with IVFFlat on the same coarse quantizer")
    ann_factories: list[str] = opt(["IVF{nlist}_HNSW32,Flat", "IVF{nlist},SQ8,Refine(Flat)",
                                    "IVF{nlist},PQ{dim}x4fs,RFlat"],
                                   "ANN index.factory strings the retrieval benchmark measures beside IVFFlat "
                                   "(`{nlist}` = the IVFFlat's lists, whose centroids they reuse; `{dim}` = the "
                                   "vectors' dimension)")
    ann_ef_search_values: list[int] = opt([32, 64, 128, 256], "HNSW efSearch values measured for graph indexes")
    ann_k_factors: list[float] = opt([2.0, 8.0, 32.0], "re-rank k_factor values measured for Refine indexes")
    encode_segments: int = opt(96, "segments encoded per dtype in the encoding-throughput benchmark")
    encode_tokens: int = opt(288, "tokens per encoded segment ([CLS] and [SEP] included)")
    encode_batch_size: int = opt(16, "segments per encoder forward pass")
    encode_dtypes: list[str] = opt(["float32", "bfloat16"], "encoder dtypes compared (bf16 = bf16 weights)")
    matmul_size: int = opt(4096, "n of the n x n matmul that measures this machine's peak FLOP/s")
    qa_questions: int = opt(24, "timed questions per system and k in the QA-latency benchmark")
    qa_warmup: int = opt(2, "untimed warm-up batches per system and k")
    qa_batch_size: int = opt(1, "questions per generation batch (the same for every system)")
    qa_answer_tokens: int = opt(16, "forced answer length in tokens (no stop token) for every system")
    qa_k_values: list[int] = opt([1, 3, 5], "retrieved segments per question")
    qa_systems: list[str] = opt(["closed_book", "rag_text", "dynamic_prefix"],
                                "systems timed; dynamic ones online and from a prefix store")
    qa_checkpoint: str | None = opt(None, "a trained checkpoint holding the dynamic qa_systems to time (e.g. "
                                    "models/smollm2-135m-squad); null = freshly initialised ones of the config")
    train_systems: list[str] = opt(["dynamic_prefix@p10", "dynamic_prefix@p32", "dynamic_prefix@pfull",
                                    "rag_text_tuned"], "systems whose qa.train step is timed")
    train_steps: int = opt(4, "timed training steps per system")
    train_warmup: int = opt(1, "untimed warm-up steps per system")
    train_segment_tokens: int = opt(288, "LM tokens per segment in the training benchmark (built from store text)")


@dataclass
class Config:
    run_dir: str = opt("runs/default", "where commands read and write artifacts")
    seed: int = opt(0, "one seed for data splits, sampling and training")
    cache_dir: str | None = opt(None, "model cache (converted GGUF etc.); default $PREFIXRAG_CACHE or ~/.cache/prefixrag")
    device: str = opt("auto", "auto (cuda when available), cpu or cuda")
    data: DataConfig = field(default_factory=DataConfig)
    retriever: RetrieverConfig = field(default_factory=RetrieverConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    knowledge_encoder: KnowledgeEncoderConfig = field(default_factory=KnowledgeEncoderConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    qa: QAConfig = field(default_factory=QAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    app: AppConfig = field(default_factory=AppConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
