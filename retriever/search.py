"""The retriever: questions → top-k segments (`Hit`s) from `run_dir/index` + `run_dir/store`.

    retriever = Retriever.from_config(cfg)         # or open_retriever(cfg): this, or the service's client
    retriever.search("Who founded X?", k=5) -> list[Hit]
    retriever.batch_search(questions, k) -> list[list[Hit]]

With `retriever.hybrid.enabled` the dense ranking is fused with BM25 over the store (retriever.hybrid,
index in `run_dir/bm25`); `search_vectors` stays dense-only.

Live changes (the demo's "Add documents", NeMo-RETRO style): `add_documents` segments new documents
with data_prep's segmenter, embeds them and adds them under new ids (>= every id ever used);
`remove_documents` / `remove_segments` drop segments by id. Changes are a small delta kept in
`run_dir/live/` (written atomically after every change) and replayed on top of the built index when
a Retriever opens, so the built `run_dir/index` is never rewritten; `reset()` deletes the delta and
returns to the built index. A delta made for another index or encoder is ignored with a warning.

`run_dir/live/`: `manifest.json` (base index sha256, encoder fingerprint, next_id, counts, and
`files_sha256` of the three other files, checked when the delta is replayed: a damaged file is refused),
`segments.jsonl` (the added segments that are still live), `vectors.npy` (their float32 embeddings,
same order), `removed.npy` (int64 ids of removed segments of the built store).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from common.atomic import atomic_dir, clean_leftovers
from common.errors import UserError
from common.faults import fault_point
from common.integrity import hash_files, verify_file
from data_prep.records import Document, Segment
from data_prep.store import SegmentStore, segment_input_text
from retriever.encoder import Encoder
from retriever.hybrid import HybridSearcher
from retriever.vector_store import StoreOptions, VectorStore, load_index_dir, store_checks

log = logging.getLogger(__name__)

LIVE_DIR = "live"
_LIVE_FORMAT = 1
_LIVE_FILES = ["segments.jsonl", "vectors.npy", "removed.npy"]


@dataclass
class Hit:
    """One retrieved segment: its store id, the index score (higher is better), and its content."""

    segment_id: int
    score: float
    doc_id: str
    title: str
    text: str


class Retriever:
    """Encoder + vector store (faiss or Milvus, `index.backend`) + segment store (+ the live delta); thread-safe."""

    def __init__(
        self,
        *,
        encoder: Encoder,
        index: VectorStore,
        manifest: dict,
        store: SegmentStore,
        run_dir: Path,
        nprobe: int = 0,
        window: int = 288,
        stride: int = 64,
        use_gpu: str = "auto",
        hybrid: HybridSearcher | None = None,
        store_options: StoreOptions | None = None,
    ):
        self.encoder = encoder
        self.hybrid = hybrid  # BM25 fusion (retriever.hybrid.*), None = dense only
        self.index = index
        self.manifest = manifest
        self.store = store
        self.run_dir = Path(run_dir)
        self.nprobe_setting = nprobe  # index.nprobe as configured (0 = automatic)
        self.window = window
        self.stride = stride
        self.use_gpu = use_gpu
        # how reset() reopens the index (index.backend, index.milvus_*); None = whichever backend built it
        self.store_options = store_options
        self._lock = threading.RLock()
        self._segmenter = None
        self._reset_live_state()

    @classmethod
    def from_config(
        cls,
        cfg,
        encoder: Encoder | None = None,
        run_dir: str | Path | None = None,
        verify_sha256: bool = True,
    ) -> Retriever:
        """Open `run_dir/index` and `run_dir/store` with `cfg.retriever.model` (checked against the index)."""
        run_dir = Path(run_dir or cfg.run_dir)
        store = SegmentStore.open(run_dir / "store")
        encoder = encoder or Encoder.from_config(cfg)
        index, manifest = load_index_dir(
            run_dir / "index",
            encoder_fingerprint=encoder.fingerprint,
            encoder_name=encoder.info.name,
            dim=encoder.dim,
            store_fingerprint=store.fingerprint,
            **{**store_checks(StoreOptions.from_config(cfg)), "verify_sha256": verify_sha256 and cfg.index.verify_sha256},
        )
        built = manifest.get("encoder", {})
        for key in ("similarity", "query_prefix", "passage_prefix", "max_seq_length"):
            if key in built and built[key] != getattr(encoder.info, key):
                # Same weights, different use: rankings shift silently, so say so.
                log.warning(
                    "the index was built with retriever.%s=%r, the config says %r",
                    key,
                    built[key],
                    getattr(encoder.info, key),
                )
        retriever = cls.configured(
            cfg, encoder=encoder, index=index, manifest=manifest, store=store, run_dir=run_dir
        )
        retriever._load_live()
        return retriever

    @classmethod
    def configured(
        cls,
        cfg,
        *,
        encoder: Encoder,
        index: VectorStore,
        manifest: dict,
        store: SegmentStore,
        run_dir: Path,
        bm25_dir: Path | None = None,
    ) -> Retriever:
        """A Retriever over an index already opened, with the search settings of `cfg` (index.*, data.*,
        retriever.hybrid.*: the BM25 index of `store` lives in `bm25_dir`, default run_dir/bm25)."""
        hybrid = None
        if cfg.retriever.hybrid.enabled:
            hybrid = HybridSearcher.from_config(
                cfg.retriever.hybrid, store, Path(bm25_dir or Path(run_dir) / "bm25")
            )
        return cls(
            encoder=encoder,
            index=index,
            manifest=manifest,
            store=store,
            run_dir=run_dir,
            nprobe=cfg.index.nprobe,
            window=cfg.data.window,
            stride=cfg.data.stride,
            use_gpu=cfg.index.use_gpu,
            hybrid=hybrid,
            store_options=StoreOptions.from_config(cfg),
        )

    # ------------------------------------------------------------------ search

    def __len__(self) -> int:
        return self.index.ntotal

    @property
    def nprobe(self) -> int:
        """IVF lists a search visits now (`index.nprobe`, 0 resolved for the index's current size)."""
        return self.index.resolve_nprobe(self.nprobe_setting)

    @property
    def search_settings(self) -> dict:
        """The settings besides index, encoder and store that decide a ranking (for cache keys)."""
        settings = {"nprobe": self.nprobe}
        # HNSW candidate list / re-rank depth as configured (0 = automatic, a function of k, which the key holds)
        if getattr(self.index, "has_hnsw", False):
            settings["ef_search"] = self.index.ef_search
        if getattr(self.index, "has_refine", False):
            settings["k_factor"] = self.index.k_factor
        if self.hybrid is not None:
            settings["hybrid"] = self.hybrid.signature()
        return settings

    def search(self, query: str, k: int) -> list[Hit]:
        """The k best segments for one question, best first."""
        return self.batch_search([query], k)[0]

    def batch_search(self, queries: Sequence[str], k: int) -> list[list[Hit]]:
        """The k best segments for each question (fewer if the index holds fewer)."""
        if isinstance(queries, str):
            raise TypeError("batch_search takes a list of questions; use search() for one")
        for i, q in enumerate(queries):
            if not isinstance(q, str) or not q.strip():
                raise UserError(f"question {i} is empty; give a non-empty question")
        if not queries:
            return []
        vectors = self.encoder.encode_queries(list(queries))
        if self.hybrid is None:
            return self.to_hits(*self.search_vectors(vectors, k))
        scores, ids = self.search_vectors(vectors, max(k, self.hybrid.depth))
        with self._lock:
            removed = set(self._removed)
            live = {i: segment_input_text(s) for i, s in self._live_segments.items()}
        return self.to_hits(*self.hybrid.rerank(list(queries), scores, ids, k, removed=removed, live=live))

    def search_vectors(self, query_vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Raw dense top-k (no BM25 fusion) for (n, dim) query embeddings → (scores (n, k), ids (n, k), -1 where missing)."""
        if k < 1:
            raise UserError(f"k must be >= 1, got {k}")
        return self.index.search(query_vectors, k, nprobe=self.nprobe_setting)

    def to_hits(self, scores: np.ndarray, ids: np.ndarray) -> list[list[Hit]]:
        with self._lock:
            segs = self.segments([int(i) for i in np.unique(ids) if i >= 0])
        return [
            [
                Hit(int(i), float(s), segs[i].doc_id, segs[i].title, segs[i].text)
                for s, i in zip(row_s, row_i)
                if i >= 0 and int(i) in segs
            ]
            for row_s, row_i in zip(scores, ids)
        ]

    def segments(self, ids: Sequence[int]) -> dict[int, Segment]:
        """Segments by id, from the built store or the live delta (unknown ids are left out)."""
        n = len(self.store)
        base = [i for i in ids if 0 <= i < n]
        out = dict(zip(base, self.store.get_many(base))) if base else {}
        out.update({i: self._live_segments[i] for i in ids if i in self._live_segments})
        return out

    # ------------------------------------------------------------------ live changes

    def _reset_live_state(self) -> None:
        self._live_segments: dict[int, Segment] = {}
        self._live_vectors: dict[int, np.ndarray] = {}
        self._removed: set[int] = set()
        self._next_id = max(len(self.store), int(self.manifest.get("max_id", len(self.store) - 1)) + 1)

    @property
    def live_dir(self) -> Path:
        return self.run_dir / LIVE_DIR

    def _segmenter_instance(self):
        if self._segmenter is None:
            from data_prep.segment import Segmenter

            self._segmenter = Segmenter(tokenizer_backend(self.encoder), self.window, self.stride)
        return self._segmenter

    def add_documents(self, docs: Sequence[Document | dict]) -> list[Segment]:
        """Segment, embed and index new documents; returns their segments (with their new ids)."""
        docs = [_as_document(d, i) for i, d in enumerate(docs)]
        if not docs:
            return []
        with self._lock:
            ids = [d.id for d in docs]
            dupes = {i for i in ids if ids.count(i) > 1}
            if dupes:
                raise UserError(f"document ids repeated in one upload: {sorted(dupes)}")
            taken = self._existing_doc_ids(set(ids))
            if taken:
                raise UserError(
                    f"documents already in the index: {sorted(taken)}; remove them first or use new ids"
                )
            segmenter = self._segmenter_instance()
            segments: list[Segment] = []
            for doc in docs:
                segs = segmenter.segment(doc, first_id=self._next_id + len(segments))
                if not segs:
                    raise UserError(f"document {doc.id!r} has no text to index")
                segments.extend(segs)
            vectors = self.encoder.encode_passages([segment_input_text(s) for s in segments])
            new_ids = np.array([s.segment_id for s in segments], dtype=np.int64)
            self.index.add(vectors, new_ids)
            for seg, vec in zip(segments, vectors):
                self._live_segments[seg.segment_id] = seg
                self._live_vectors[seg.segment_id] = vec
            self._next_id = int(new_ids.max()) + 1
            fault_point("live.added")
            self._save_live()
            fault_point("live.saved")
        log.info(
            "added %d documents (%d segments, ids %d..%d)",
            len(docs),
            len(segments),
            new_ids.min(),
            new_ids.max(),
        )
        return segments

    def remove_segments(self, ids: Sequence[int]) -> int:
        """Remove segments by id (built or live); returns how many were in the index."""
        with self._lock:
            ids = sorted({int(i) for i in ids})
            removed = self.index.remove(np.array(ids, dtype=np.int64))
            n = len(self.store)
            for i in ids:
                if i in self._live_segments:
                    del self._live_segments[i]
                    del self._live_vectors[i]
                elif 0 <= i < n:
                    self._removed.add(i)
            self._save_live()
        return removed

    def remove_documents(self, doc_ids: Sequence[str]) -> int:
        """Remove every segment of the given documents; returns the number of segments removed."""
        with self._lock:
            wanted = set(doc_ids)
            ids = [i for i, s in self._live_segments.items() if s.doc_id in wanted]
            base = [i for i in self._base_ids_of_docs(wanted) if i not in self._removed]
            found = {self._live_segments[i].doc_id for i in ids}
            found |= {s.doc_id for s in self.store.get_many(base)} if base else set()
            missing = wanted - found
            if missing:
                raise UserError(f"no such documents in the index: {sorted(missing)}")
            return self.remove_segments(ids + base)

    def reset(self) -> None:
        """Forget every live change: delete `run_dir/live` and reload the built index."""
        with self._lock:
            shutil.rmtree(self.live_dir, ignore_errors=True)
            self.index, self.manifest = load_index_dir(
                self.run_dir / "index",
                encoder_fingerprint=self.encoder.fingerprint,
                encoder_name=self.encoder.info.name,
                dim=self.encoder.dim,
                store_fingerprint=self.store.fingerprint,
                use_gpu=self.use_gpu,
                **(
                    {
                        "backend": self.store_options.backend,
                        "milvus": self.store_options.milvus,
                        "hnsw_ef_search": self.store_options.hnsw_ef_search,
                        "refine_k_factor": self.store_options.refine_k_factor,
                    }
                    if self.store_options is not None
                    else {}
                ),
            )
            self._reset_live_state()

    @property
    def live_changes(self) -> int:
        """Live segments added plus built segments removed (0 = the built index as it is)."""
        return len(self._live_segments) + len(self._removed)

    @property
    def live_documents(self) -> list[str]:
        """Ids of the documents added live (in order of addition)."""
        return list(dict.fromkeys(s.doc_id for s in self._live_segments.values()))

    def _base_ids_of_docs(self, doc_ids: set[str]) -> list[int]:
        if not doc_ids or len(self.store) == 0:
            return []
        mask = pc.is_in(self.store.column("doc_id"), value_set=pa.array(sorted(doc_ids), type=pa.string()))
        return [int(i) for i in np.flatnonzero(np.asarray(mask.to_numpy(zero_copy_only=False), dtype=bool))]

    def _existing_doc_ids(self, doc_ids: set[str]) -> set[str]:
        live = {s.doc_id for s in self._live_segments.values()} & doc_ids
        base_ids = [i for i in self._base_ids_of_docs(doc_ids) if i not in self._removed]
        base = {s.doc_id for s in self.store.get_many(base_ids)} if base_ids else set()
        return live | base

    def _save_live(self) -> None:
        ids = sorted(self._live_segments)
        dim = self.encoder.dim
        vectors = (
            np.stack([self._live_vectors[i] for i in ids]) if ids else np.zeros((0, dim), dtype=np.float32)
        )
        manifest = {
            "format": _LIVE_FORMAT,
            "base_sha256": self.manifest["sha256"],
            "encoder_fingerprint": self.encoder.fingerprint,
            "next_id": self._next_id,
            "n_segments": len(ids),
            "n_removed": len(self._removed),
        }
        with atomic_dir(self.live_dir) as tmp:
            with open(tmp / "segments.jsonl", "w", encoding="utf-8") as f:
                for i in ids:
                    f.write(json.dumps(dataclasses.asdict(self._live_segments[i]), ensure_ascii=False) + "\n")
            np.save(tmp / "vectors.npy", vectors.astype(np.float32))
            np.save(tmp / "removed.npy", np.array(sorted(self._removed), dtype=np.int64))
            manifest["files_sha256"] = hash_files(tmp, _LIVE_FILES)
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")

    def _load_live(self) -> None:
        # A process killed between the two renames that replace the delta left it only as `.live.old-PID-*`:
        # put it back, or it would be missed here and overwritten by the next change (documents lost).
        clean_leftovers(self.live_dir)
        path = self.live_dir / "manifest.json"
        if not path.is_file():
            return
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
            if manifest.get("format") != _LIVE_FORMAT:
                raise ValueError(f"format {manifest.get('format')!r}")
            if (
                manifest.get("base_sha256") != self.manifest.get("sha256")
                or manifest.get("encoder_fingerprint") != self.encoder.fingerprint
            ):
                log.warning(
                    "ignoring %s: it was made for another index or encoder (the index was rebuilt)",
                    self.live_dir,
                )
                return
            hashes = manifest.get("files_sha256", {})
            for name in _LIVE_FILES:
                verify_file(
                    self.live_dir / name,
                    hashes.get(name),
                    "delete the folder (or call reset()) to return to the built index, then add the documents again",
                )
            with open(self.live_dir / "segments.jsonl", encoding="utf-8") as f:
                segments = [Segment(**json.loads(line)) for line in f if line.strip()]
            vectors = np.load(self.live_dir / "vectors.npy", allow_pickle=False)
            removed = np.load(self.live_dir / "removed.npy", allow_pickle=False).astype(np.int64)
            if vectors.shape != (len(segments), self.encoder.dim):
                raise ValueError(f"vectors.npy has shape {vectors.shape} for {len(segments)} segments")
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise UserError(
                f"{self.live_dir}: corrupt live additions ({e}); delete the folder (or call reset()) "
                "to return to the built index"
            ) from e
        if segments:
            self.index.add(vectors, np.array([s.segment_id for s in segments], dtype=np.int64))
        if len(removed):
            self.index.remove(removed)
        self._live_segments = {s.segment_id: s for s in segments}
        self._live_vectors = {s.segment_id: v for s, v in zip(segments, vectors.astype(np.float32))}
        self._removed = {int(i) for i in removed}
        self._next_id = max(self._next_id, int(manifest.get("next_id", 0)))
        log.info("replayed live changes: %d added segments, %d removed", len(segments), len(removed))


def open_retriever(cfg, encoder: Encoder | None = None):
    """The retriever every command uses (qa.train, eval.run, qa.answer, app.py): in-process over
    `run_dir/index` + `run_dir/store`, or, with `retriever.service_url`, a `retriever.client.RemoteRetriever`
    of a running `python -m retriever.serve` (same `search`/`batch_search`, same Hits).

    A service whose segment store is not run_dir's (when run_dir has one) is refused: segment ids would
    point at other segments. `encoder` (a local one, e.g. the joint retriever's) needs in-process search.
    """
    if not cfg.retriever.service_url:
        return Retriever.from_config(cfg, encoder=encoder)
    from retriever.client import RemoteRetriever

    if encoder is not None:
        raise UserError(
            "this run needs the retriever's encoder in process (train.joint_retriever=true trains it): "
            "unset retriever.service_url"
        )
    remote = RemoteRetriever.from_config(cfg)
    store_dir = Path(cfg.run_dir) / "store"
    if (store_dir / "manifest.json").is_file():
        local = SegmentStore.open(store_dir).fingerprint
        served = remote.manifest.get("store_fingerprint")
        if served != local:
            raise UserError(
                f"the retrieval service at {remote.url} serves segment store {served}, but {store_dir} is {local}: "
                "point retriever.service_url at a service over this run_dir, or run_dir at the service's"
            )
    if cfg.retriever.hybrid.enabled != ("hybrid" in remote.search_settings):
        log.warning(
            "retriever.hybrid.enabled=%s here, but the retrieval service searches %s: the service's settings "
            "(index.nprobe, retriever.hybrid.*) are the ones used",
            cfg.retriever.hybrid.enabled,
            "with BM25 fusion" if "hybrid" in remote.search_settings else "dense only",
        )
    if remote.encoder.info.name != cfg.retriever.model:
        log.warning(
            "the retrieval service encodes with %s, the config says retriever.model=%s",
            remote.encoder.info.name,
            cfg.retriever.model,
        )
    log.info("searching through the retrieval service at %s (%d segments)", remote.url, len(remote))
    return remote


def _as_document(doc: Document | dict, position: int) -> Document:
    if isinstance(doc, Document):
        d = doc
    elif isinstance(doc, dict):
        try:
            d = Document(id=str(doc["id"]), title=str(doc.get("title") or doc["id"]), text=doc["text"])
        except KeyError as e:
            raise UserError(
                f"document {position}: missing key {e} (need `id` and `text`, optional `title`)"
            ) from e
    else:
        raise UserError(f"document {position}: expected a Document or a dict, got {type(doc).__name__}")
    if not isinstance(d.text, str) or not d.text.strip():
        raise UserError(f"document {position} ({d.id!r}): empty text")
    if not d.id.strip():
        raise UserError(f"document {position}: empty id")
    return d


def tokenizer_backend(encoder: Encoder):
    """A private `tokenizers.Tokenizer` copy of the encoder's fast tokenizer, without truncation/padding."""
    from tokenizers import Tokenizer

    hf_tok = encoder.tokenizer
    if not getattr(hf_tok, "is_fast", False):
        raise UserError("adding documents needs an encoder with a fast tokenizer (tokenizer.json)")
    tok = Tokenizer.from_str(hf_tok.backend_tokenizer.to_str())
    tok.no_truncation()
    tok.no_padding()
    return tok


_tokenizer_backend = tokenizer_backend  # the name other modules' tests imported first
