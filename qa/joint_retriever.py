"""Joint retriever training (`train.joint_retriever`): the RAG-sequence marginal likelihood over the top-k.

For a training question x with answer y and its k candidate segments z_1..z_k (the cached top-k of the
*original* retriever, with the gold segment forced in exactly as for the main loss):

    s_z      = sim(E(x), E(z_z))             E = the retriever's sentence-transformers model
    p(z|x)   = softmax_z(s_z / temperature)  over the k candidates
    p(y|x,z) = the system being trained, reading ONE segment z (B*k rows in one batched pass)
    loss     = -mean_x log sum_z p(z|x) p(y|x,z)        (weight 1, added to the system's own loss)

Gradients reach the retriever through p(z|x) and the system's trainable part (knowledge encoder, peft
prefix) through p(y|x,z). Only the question side of the retriever gets gradients: segment embeddings are
recomputed each step with the same (current) weights under no_grad, so they follow the training but are
treated as constants (RAG's frozen document encoder, here sharing the question encoder's weights).

What this does NOT do:
- rebuild the index. The faiss index and the cached top-k keep the embeddings of the retriever the run
  started with; as the retriever trains they go stale. The candidates therefore stay the original top-k
  (plus gold) for the whole run. Re-embed with `python -m retriever.index retriever.model=<checkpoint>/retriever`
  (into a new run_dir, or in place) before evaluating with the trained retriever.
- train the knowledge encoder's `retriever` backbone: that is a separate frozen copy of `retriever.model`.

Multi-process (accelerate): the retriever is not DDP-wrapped (sentence-transformers models hold parameters
that never get a gradient, e.g. BERT's pooler, which DDP refuses); `step` averages its gradients over
processes itself before the optimizer step, which is what DDP would do.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from common.errors import UserError
from configs.schema import Config
from data_prep.store import segment_input_text
from qa.batching import Batcher, Example
from qa.systems import SystemName

log = logging.getLogger(__name__)

STATE_FILE = "retriever.safetensors"  # the retriever's weights inside the resumable state folder
RETRIEVER_DIR = "retriever"  # the trained retriever inside a checkpoint (a sentence-transformers folder)


def check_joint_config(cfg: Config, systems: Sequence[SystemName]) -> None:
    """Refuse, with the fix, a config where joint retriever training cannot work."""
    t = cfg.train
    if not t.joint_retriever:
        return
    if not any(s.kind.retrieves for s in systems):
        raise UserError(
            f"train.joint_retriever=true but none of train.systems ({', '.join(map(str, systems))}) reads "
            "retrieved segments, so nothing could train the retriever; add dynamic_prefix, rag_text_tuned or "
            "combine, or set train.joint_retriever=false")
    if cfg.retriever.top_k < 2:
        raise UserError(
            f"train.joint_retriever=true needs retriever.top_k >= 2 (it is {cfg.retriever.top_k}): the marginal "
            "over a single candidate is p(y|x,z) itself, p(z|x) = 1, and the retriever gets no gradient. "
            "Set retriever.top_k=5 (for example) or train.joint_retriever=false")
    if t.retriever_lr <= 0:
        raise UserError(f"train.retriever_lr must be > 0 with train.joint_retriever=true, got {t.retriever_lr}")
    if t.retriever_temperature is not None and t.retriever_temperature <= 0:
        raise UserError(f"train.retriever_temperature must be > 0 (or null), got {t.retriever_temperature}")


def default_temperature(similarity: str) -> float:
    """Cosine scores live in [-1, 1] and need sharpening (the InfoNCE default); raw dot products do not."""
    return 0.05 if similarity == "cosine" else 1.0


def marginal_nll(scores: torch.Tensor, answer_logprob: torch.Tensor, temperature: float) -> torch.Tensor:
    """-mean_b log sum_z softmax(scores / temperature)[b, z] * exp(answer_logprob[b, z]).

    scores: (B, k) retriever similarities; answer_logprob: (B, k) log p(y|x,z) summed over answer tokens.
    Computed in log space (logsumexp), so very unlikely answers do not underflow.
    """
    log_prior = (scores.float() / temperature).log_softmax(-1)
    return -torch.logsumexp(log_prior + answer_logprob.float(), dim=-1).mean()


def single_segment_examples(examples: Sequence[Example]) -> list[Example]:
    """B examples with k segments -> B*k examples with one segment each (question-major: row b*k + z)."""
    return [dataclasses.replace(ex, segments=[seg], segment_ids=[sid])
            for ex in examples for seg, sid in zip(ex.segments, ex.segment_ids)]


def candidate_logprobs(model, batcher: Batcher, system: SystemName, examples: Sequence[Example]) -> torch.Tensor:
    """log p(y|x,z) of every (question, candidate) pair: (B, k), with gradient into `model`'s trainable part."""
    k = len(examples[0].segments)
    batch = batcher.build(single_segment_examples(examples), system, with_labels=True)
    _, logprob = model(batch, sequence_logprob=True)
    return logprob.view(len(examples), k)


class JointRetriever:
    """The trainable retriever: question embeddings with gradient, segment embeddings without.

    `model` is a sentence-transformers model in float32 (trained in place); `similarity` is cosine (embeddings
    L2-normalised) or dot, as in `retriever.encoder`.
    """

    def __init__(self, model, *, similarity: str, temperature: float | None, query_prefix: str = "",
                 passage_prefix: str = "", device=None):
        self.model = model
        self.similarity = similarity
        self.temperature = temperature if temperature is not None else default_temperature(similarity)
        self.query_prefix = query_prefix
        self.passage_prefix = passage_prefix
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model.to(device=self.device, dtype=torch.float32)

    @classmethod
    def from_encoder(cls, encoder, cfg: Config, device) -> JointRetriever:
        """Train `encoder.model` (a `retriever.encoder.Encoder`, loaded in float32) in place."""
        if next(encoder.model.parameters()).dtype != torch.float32:
            raise ValueError("the joint retriever trains float32 weights; load the encoder with dtype=float32")
        return cls(encoder.model, similarity=encoder.similarity, temperature=cfg.train.retriever_temperature,
                   query_prefix=encoder.query_prefix, passage_prefix=encoder.passage_prefix, device=device)

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def _embed(self, texts: list[str]) -> torch.Tensor:
        """(n, dim) sentence embeddings (L2-normalised for cosine), with gradient unless called under no_grad."""
        features = self.model.preprocess(texts)
        features = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in features.items()}
        emb = self.model(features)["sentence_embedding"].float()
        return F.normalize(emb, dim=-1) if self.similarity == "cosine" else emb

    @torch.no_grad()
    def segment_embeddings(self, examples: Sequence[Example]) -> torch.Tensor:
        """(B, k, dim) embeddings of every example's k segments, current weights, no gradient, eval mode."""
        self.model.eval()
        texts = [self.passage_prefix + segment_input_text(s) for ex in examples for s in ex.segments]
        return self._embed(texts).view(len(examples), len(examples[0].segments), -1)

    def scores(self, examples: Sequence[Example], segment_emb: torch.Tensor) -> torch.Tensor:
        """(B, k) similarities of each question (embedded with gradient, train mode) to its k segments."""
        self.model.train()
        q = self._embed([self.query_prefix + ex.question for ex in examples])
        return torch.einsum("bd,bkd->bk", q, segment_emb)

    def step(self, optimizer, scheduler, accelerator) -> float:
        """Average gradients over processes, take an optimizer step; returns the gradient norm (pre-step)."""
        params = [p for p in self.parameters() if p.grad is not None]
        if accelerator.num_processes > 1:
            for p in params:
                p.grad = accelerator.reduce(p.grad, reduction="mean")
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item() if params else 0.0
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    # ------------------------------------------------------------------ persistence
    def save_state(self, directory: Path) -> None:
        """The weights only (resume); optimizer and scheduler state go through accelerate's save_state."""
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        save_file(state, str(Path(directory) / STATE_FILE))

    def load_state(self, directory: Path) -> None:
        path = Path(directory) / STATE_FILE
        if not path.is_file():
            raise UserError(f"--resume: {directory} holds no joint retriever weights ({STATE_FILE}); "
                            "it was saved without train.joint_retriever")
        self.model.load_state_dict(load_file(str(path)))

    def save(self, directory: Path) -> None:
        """A sentence-transformers folder (`SentenceTransformer(directory)` / `retriever.model=<directory>`)."""
        self.model.save(str(directory), create_model_card=False)

    def describe(self, base_model: str) -> dict:
        """What a checkpoint manifest records about the trained retriever."""
        from retriever.encoder import model_fingerprint

        return {"folder": RETRIEVER_DIR, "base_model": base_model, "fingerprint": model_fingerprint(self.model),
                "similarity": self.similarity, "temperature": self.temperature, "trained": "question side",
                "index_stale": True,
                "reindex": f"python -m retriever.index retriever.model=<checkpoint>/{RETRIEVER_DIR}"}

