"""The bi-encoder: one sentence-transformers model for questions and segments (contriever style).

Mean pooling comes from the model folder (a plain HF encoder such as `facebook/contriever` gets mean
pooling from sentence-transformers automatically). `similarity=cosine` L2-normalises the embeddings
so that the faiss inner product is the cosine; `dot` keeps them raw (Contriever's own convention).

Outputs are float32 numpy arrays of shape (n, dim), whatever dtype the model runs in.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from common.errors import UserError
from configs.models import resolve_device, resolve_encoder_path
from configs.precision import warn_if_slow_bf16

log = logging.getLogger(__name__)

# Per tensor, at most this many evenly strided values enter the fingerprint: enough to see any
# fine-tuning (which moves every dense layer) without hashing hundreds of MB.
_FINGERPRINT_VALUES = 4096


def resolve_encoder_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto`: float16 on a GPU, float32 on CPU (half precision is slow or unsupported on most CPUs)."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype == "bfloat16":
        warn_if_slow_bf16("retriever.dtype=bfloat16", device)
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def weights_fingerprint(model: torch.nn.Module, extra: Sequence = ()) -> str:
    """16-hex hash of a strided sample of every parameter (fp32 values) plus `extra` (module config).

    Must be called on the float32 weights: a fp16 copy of the same model would hash differently.
    """
    h = hashlib.sha256()
    for item in extra:
        h.update(repr(item).encode())
    for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        flat = param.detach().reshape(-1)
        stride = max(1, flat.numel() // _FINGERPRINT_VALUES)
        sample = flat[::stride][:_FINGERPRINT_VALUES].to(device="cpu", dtype=torch.float32).numpy()
        h.update(name.encode())
        h.update(repr(tuple(param.shape)).encode())
        h.update(np.ascontiguousarray(sample).tobytes())
    return h.hexdigest()[:16]


@dataclass
class EncoderInfo:
    """What an index or embedding manifest records about the encoder that produced its vectors."""

    name: str  # the spec the user gave (`embedded:minilm-l6`, a hub id or a path)
    path: str  # where it was loaded from
    fingerprint: str  # weights + module structure; a fine-tuned model in the same path differs
    dim: int
    similarity: str  # cosine | dot
    max_seq_length: int
    query_prefix: str
    passage_prefix: str

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class Encoder:
    """A loaded bi-encoder. `encode_queries` / `encode_passages` → float32 (n, dim)."""

    def __init__(
        self,
        model,
        *,
        name: str,
        path: str,
        fingerprint: str,
        similarity: str = "cosine",
        batch_size: int = 64,
        query_prefix: str = "",
        passage_prefix: str = "",
    ):
        if similarity not in ("cosine", "dot"):
            raise UserError(f"retriever.similarity must be cosine or dot, got {similarity!r}")
        self.model = model
        self.similarity = similarity
        self.batch_size = batch_size
        self.query_prefix = query_prefix
        self.passage_prefix = passage_prefix
        dim = model.get_embedding_dimension()
        if dim is None:
            raise UserError(
                f"encoder `{name}` does not report an embedding dimension (is it a sentence encoder?)"
            )
        self.info = EncoderInfo(
            name=name,
            path=path,
            fingerprint=fingerprint,
            dim=int(dim),
            similarity=similarity,
            max_seq_length=int(model.max_seq_length or 0),
            query_prefix=query_prefix,
            passage_prefix=passage_prefix,
        )

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(
        cls,
        spec: str,
        *,
        similarity: str = "cosine",
        max_seq_length: int = 320,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 64,
        query_prefix: str = "",
        passage_prefix: str = "",
    ) -> Encoder:
        """Load `embedded:minilm-l6`, a hub id or a local sentence-transformers / HF encoder folder."""
        from sentence_transformers import SentenceTransformer

        path = resolve_encoder_path(spec)
        dev = resolve_device(device)
        try:
            # Always load in float32 first: the fingerprint is taken on the exact stored weights, so an
            # index built on a GPU in fp16 still matches the same model loaded in fp32 on a CPU.
            model = SentenceTransformer(path, device="cpu", model_kwargs={"dtype": torch.float32})
        except (OSError, ValueError) as e:
            raise UserError(
                f"could not load retriever encoder `{spec}`: {e}\nOffline, give a local folder "
                "(retriever.model=/path/to/model or a fine-tuned run_dir/retriever) "
                "or retriever.model=embedded:minilm-l6."
            ) from e
        positions = _max_positions(model)
        if positions is not None and max_seq_length > positions:
            log.warning(
                "retriever.max_seq_length=%d exceeds the encoder's %d positions; using %d",
                max_seq_length,
                positions,
                positions,
            )
            max_seq_length = positions
        # The packaged MiniLM says 256, which would silently cut a 288-token window plus its title.
        model.max_seq_length = max_seq_length
        fp = model_fingerprint(model)
        target = resolve_encoder_dtype(dtype, dev)
        model.to(device=dev, dtype=target)
        model.eval()
        return cls(
            model,
            name=spec,
            path=path,
            fingerprint=fp,
            similarity=similarity,
            batch_size=batch_size,
            query_prefix=query_prefix,
            passage_prefix=passage_prefix,
        )

    @classmethod
    def from_config(cls, cfg, model: str | None = None, dtype: str | None = None) -> Encoder:
        """The encoder of `cfg.retriever` (or `model` in its place, e.g. a freshly fine-tuned folder)."""
        r = cfg.retriever
        return cls.load(
            model or r.model,
            similarity=r.similarity,
            max_seq_length=r.max_seq_length,
            device=cfg.device,
            dtype=dtype or r.dtype,
            batch_size=r.batch_size,
            query_prefix=r.query_prefix,
            passage_prefix=r.passage_prefix,
        )

    # ------------------------------------------------------------------ encoding

    @property
    def dim(self) -> int:
        return self.info.dim

    @property
    def fingerprint(self) -> str:
        return self.info.fingerprint

    @property
    def tokenizer(self):
        return self.model.tokenizer

    def _encode(self, texts: Sequence[str], prefix: str, show_progress: bool = False) -> np.ndarray:
        if isinstance(texts, str):
            raise TypeError("encode_* takes a list of strings, not one string")
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        inputs = [prefix + t for t in texts] if prefix else list(texts)
        with torch.inference_mode():
            emb = self.model.encode(
                inputs,
                batch_size=self.batch_size,
                convert_to_numpy=True,
                normalize_embeddings=self.similarity == "cosine",
                show_progress_bar=show_progress,
            )
        return np.ascontiguousarray(emb, dtype=np.float32)

    def encode_queries(self, questions: Sequence[str], show_progress: bool = False) -> np.ndarray:
        """(n, dim) float32 query embeddings."""
        return self._encode(questions, self.query_prefix, show_progress)

    def encode_passages(self, texts: Sequence[str], show_progress: bool = False) -> np.ndarray:
        """(n, dim) float32 passage embeddings; `texts` already joined as `segment_input_text` does."""
        return self._encode(texts, self.passage_prefix, show_progress)


def model_fingerprint(model) -> str:
    """The fingerprint `Encoder.load` records for a SentenceTransformer (weights + module structure).

    A model trained in memory and the same model saved and loaded again give the same value (fp32 weights).
    """
    return weights_fingerprint(model, [type(m).__name__ for m in model] + [_pooling_config(model)])


def _max_positions(model) -> int | None:
    auto = getattr(model[0], "auto_model", None)
    config = getattr(auto, "config", None)
    return getattr(config, "max_position_embeddings", None) if config is not None else None


def _pooling_config(model) -> dict:
    for module in model:
        if type(module).__name__ == "Pooling" and hasattr(module, "get_config_dict"):
            return module.get_config_dict()
    return {}
