"""The request and response models of the retrieval service (`retriever.serve`), with its limits filled in.

The limits (serve.max_question_chars, max_top_k, max_questions, max_documents) and the encoder's dimension
are known only when the service starts, so the models are made by `request_models(serve, dim, top_k)` rather
than declared once at import; `create_app` builds its endpoints on them. `hit_dict` is a retriever Hit as the
service sends it (HitOut), the same fields `Retriever.search` returns in-process.
"""

# No `from __future__ import annotations`: pydantic and FastAPI read these models' field types from their
# annotations, which must be objects, not strings naming request_models' locals (Question, TopK).
import math
from dataclasses import dataclass
from typing import Annotated

from pydantic import BaseModel, Field, StringConstraints, field_validator, model_validator


def hit_dict(hit) -> dict:
    """A retriever Hit as the service sends it (HitOut)."""
    return {
        "id": int(hit.segment_id),
        "segment_id": int(hit.segment_id),
        "doc_id": hit.doc_id,
        "title": hit.title,
        "text": hit.text,
        "score": float(hit.score),
    }


@dataclass(frozen=True)
class RequestModels:
    """The pydantic models of one service's endpoints (see the module docstring of retriever.serve)."""

    HitOut: type[BaseModel]
    SearchIn: type[BaseModel]
    SearchOut: type[BaseModel]
    BatchIn: type[BaseModel]
    BatchOut: type[BaseModel]
    DocumentIn: type[BaseModel]
    AddIn: type[BaseModel]
    AddOut: type[BaseModel]
    RemoveIn: type[BaseModel]
    RemoveOut: type[BaseModel]
    SegmentsIn: type[BaseModel]


def request_models(serve, dim: int, default_top_k: int = 5) -> RequestModels:
    """The models under the limits of `serve` (a ServeConfig), for an encoder of dimension `dim`."""
    Question = Annotated[
        str, StringConstraints(strip_whitespace=True, min_length=1, max_length=serve.max_question_chars)
    ]
    TopK = Annotated[
        int, Field(ge=1, le=serve.max_top_k, description=f"segments per question, 1 to {serve.max_top_k}")
    ]

    class HitOut(BaseModel):
        id: int = Field(description="the segment id (the index's id; same as segment_id)")
        segment_id: int
        doc_id: str
        title: str
        text: str
        score: float = Field(description="index score, higher is better")

    class SearchIn(BaseModel):
        question: Question
        top_k: TopK = default_top_k

    class SearchOut(BaseModel):
        hits: list[HitOut]

    class BatchIn(BaseModel):
        questions: list[Question] | None = Field(None, max_length=serve.max_questions)
        vectors: list[list[float]] | None = Field(
            None,
            max_length=serve.max_questions,
            description=f"raw query embeddings ({dim} floats each), dense only",
        )
        top_k: TopK = default_top_k

        @model_validator(mode="after")
        def one_kind(self):
            if (self.questions is None) == (self.vectors is None):
                raise ValueError("give either `questions` or `vectors`")
            if self.vectors is not None:
                for i, v in enumerate(self.vectors):
                    if len(v) != dim:
                        raise ValueError(f"vector {i} has {len(v)} values; the encoder's dimension is {dim}")
                    if not all(math.isfinite(x) for x in v):
                        raise ValueError(f"vector {i} holds a non-finite value")
            return self

    class BatchOut(BaseModel):
        hits: list[list[HitOut]]

    class DocumentIn(BaseModel):
        id: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
        text: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
        title: str | None = None

    class AddIn(BaseModel):
        documents: list[DocumentIn] = Field(min_length=1, max_length=serve.max_documents)

    class AddOut(BaseModel):
        added: int
        segments: int
        segment_ids: list[int]
        total_segments: int

    class RemoveIn(BaseModel):
        doc_ids: list[str] = []
        segment_ids: list[int] = []

        @field_validator("doc_ids")
        @classmethod
        def non_empty_ids(cls, v):
            if any(not d.strip() for d in v):
                raise ValueError("document ids must be non-empty")
            return v

        @model_validator(mode="after")
        def something(self):
            if not self.doc_ids and not self.segment_ids:
                raise ValueError("give `doc_ids` and/or `segment_ids` to remove")
            return self

    class RemoveOut(BaseModel):
        removed: int
        total_segments: int

    class SegmentsIn(BaseModel):
        ids: list[int] = Field(max_length=max(serve.max_questions * serve.max_top_k, 1000))

    return RequestModels(HitOut, SearchIn, SearchOut, BatchIn, BatchOut, DocumentIn, AddIn, AddOut, RemoveIn,
                         RemoveOut, SegmentsIn)
