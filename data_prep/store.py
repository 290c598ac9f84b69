"""The segment store: every segment of the corpus in one memory-mapped Arrow file, plus the QA set.

Layout of a store directory (`run_dir/store/`):

- `segments.arrow`: an Arrow IPC *file* (uncompressed, record batches of `batch_rows` rows), one row a
  segment, columns `segment_id:int64, doc_id:string, title:string, text:string, char_start:int64,
  char_end:int64, token_start:int64, token_end:int64`. Arrow IPC rather than Parquet because an
  uncompressed IPC file opened with `pa.memory_map` is truly zero-copy: opening a 10M-segment store
  costs no RAM and `get_many` touches only the rows it returns (Parquet would decompress whole row groups).
- `qa.jsonl`: every QA example (all splits), one `QAExample` a line, with `split` and `gold_segment_ids`.
- `manifest.json`: written last; `format_version`, `created`, `counts` (segments, documents, qa,
  qa_per_split, qa_without_gold_segment, plus whatever the builder adds), `segments_sha256`/`qa_sha256`
  (hashes of the content), `files_sha256` (sha256 of the bytes of segments.arrow and qa.jsonl, checked
  on every open: a damaged file is refused, and `data_prep.build` rebuilds it), `fingerprint`, and the
  builder's fields (source, tokenizer, window, stride...).

Segment ids are 0..N-1 in store order, and segments of one document are contiguous and in document order.
`text` is the raw window of the document WITHOUT the title; whoever embeds or reads a segment joins title
and text with `segment_input_text` (the one place that decides how).

Reading::

    store = SegmentStore.open(run_dir / "store")   # UserError if missing, incomplete, corrupt or damaged
    len(store); store.fingerprint; store.qa_fingerprint; store.manifest
    store.get(7) -> Segment; store.get_many([3, 1, 2]) -> list[Segment] (in the order asked)
    for batch in store.iter_batches(256): ...      # list[Segment], streaming, in segment_id order
    store.segment_ids() -> np.ndarray[int64] of shape (N,)
    load_qa(run_dir / "store", "test") -> list[QAExample]   # split in train/dev/test/all

Writing (atomic: the store appears under `out_dir` only when the block ends without error, so a crash
never leaves a half store that loads; an existing store at `out_dir` is replaced only then)::

    with StoreWriter(out_dir, manifest_extra={"source": ...}) as w:
        for seg in segments:          # seg.segment_id must be 0, 1, 2, ... in order (checked)
            w.add(seg)
        view = w.close_segments()     # optional: read back the segments written so far (SegmentStore)
        w.add_qa(qa_examples)         # QAExample with split set (checked); may be called more than once
    # or in one call (handy for test fixtures):
    write_store(out_dir, segments, qa=(), manifest_extra=None) -> Path

`store.fingerprint` hashes the segments' content only (what an embedding index depends on), so a
rebuild that changes only the QA set keeps the index valid; `store.qa_fingerprint` hashes the QA set.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from common.atomic import atomic_dir, fingerprint
from common.errors import UserError
from common.faults import fault_point
from common.integrity import hash_files, read_json_object, verify_file
from data_prep.records import QAExample, Segment
from data_prep.split import SPLITS

FORMAT_VERSION = 1
SEGMENTS_FILE = "segments.arrow"
QA_FILE = "qa.jsonl"
MANIFEST_FILE = "manifest.json"
REBUILD = "rebuild it with `python -m data_prep.build --config C`"

SCHEMA = pa.schema(
    [
        ("segment_id", pa.int64()),
        ("doc_id", pa.string()),
        ("title", pa.string()),
        ("text", pa.string()),
        ("char_start", pa.int64()),
        ("char_end", pa.int64()),
        ("token_start", pa.int64()),
        ("token_end", pa.int64()),
    ]
)
_COLUMNS = SCHEMA.names
_QA_FIELDS = tuple(f.name for f in dataclasses.fields(QAExample))


def segment_input_text(segment: Segment) -> str:
    """What an encoder or an LM reads for a segment: the title, a newline, then the window text."""
    return f"{segment.title}\n{segment.text}"


# ---------------------------------------------------------------------------------------------- reading


class SegmentStore:
    """Read-only, memory-mapped view of a store directory (see the module docstring)."""

    def __init__(
        self, path: Path, manifest: dict, reader: pa.ipc.RecordBatchFileReader, mmap: pa.MemoryMappedFile
    ):
        self.path = path
        self.manifest = manifest
        self._mmap = mmap
        self._reader = reader
        # Zero-copy batches; `_starts[b]` is the segment id of batch b's first row.
        self._batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
        sizes = np.array([b.num_rows for b in self._batches], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._n = int(self._starts[-1])

    @classmethod
    def open(cls, path: Path | str) -> SegmentStore:
        path = Path(path)
        manifest_path = path / MANIFEST_FILE
        seg_path = path / SEGMENTS_FILE
        if not manifest_path.is_file():
            hint = (
                " (the directory exists but has no manifest: an interrupted or foreign build)"
                if path.is_dir()
                else ""
            )
            raise UserError(
                f"no segment store at {path}{hint}; build it with `python -m data_prep.build --config C`"
            )
        manifest = read_json_object(manifest_path, "manifest", "rebuild with `python -m data_prep.build`")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise UserError(
                f"{path}: store format version {manifest.get('format_version')!r}, this code reads "
                f"{FORMAT_VERSION}; rebuild with `python -m data_prep.build --force`"
            )
        if not seg_path.is_file():
            raise UserError(
                f"{path}: {SEGMENTS_FILE} is missing; rebuild with `python -m data_prep.build --force`"
            )
        # The whole file, on every open (~1 GB/s): a flipped byte would otherwise give wrong text silently.
        verify_file(seg_path, manifest.get("files_sha256", {}).get(SEGMENTS_FILE), REBUILD)
        try:
            mmap = pa.memory_map(str(seg_path), "r")
            reader = pa.ipc.open_file(mmap)
            if not reader.schema.equals(SCHEMA):
                raise UserError(f"{seg_path}: unexpected columns {reader.schema.names}; rebuild the store")
            store = cls(path, manifest, reader, mmap)
        except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as e:
            raise UserError(
                f"{seg_path}: corrupt segment file ({e}); rebuild with `python -m data_prep.build`"
            ) from e
        expected = manifest.get("counts", {}).get("segments")
        if expected != len(store):
            raise UserError(
                f"{path}: manifest says {expected} segments, {SEGMENTS_FILE} holds {len(store)}; rebuild"
            )
        return store

    def __len__(self) -> int:
        return self._n

    def __repr__(self) -> str:
        return f"SegmentStore({str(self.path)!r}, segments={self._n}, fingerprint={self.fingerprint})"

    @property
    def fingerprint(self) -> str:
        """Hash of the segments' content (format version + every row); what an index records."""
        return self.manifest["fingerprint"]

    @property
    def qa_fingerprint(self) -> str:
        """Hash of qa.jsonl (questions, answers, splits, gold segment ids)."""
        return self.manifest["qa_fingerprint"]

    def _locate(self, segment_id: int) -> tuple[int, int]:
        if not 0 <= segment_id < self._n:
            raise IndexError(f"segment id {segment_id} out of range (store has {self._n} segments)")
        b = int(np.searchsorted(self._starts, segment_id, side="right")) - 1
        return b, segment_id - int(self._starts[b])

    def get(self, segment_id: int) -> Segment:
        b, row = self._locate(int(segment_id))
        return _to_segments(self._batches[b].slice(row, 1))[0]

    def texts(self, start: int, stop: int) -> list[str]:
        """The `text` of segments start..stop-1 (a contiguous range, e.g. one document's segments)."""
        if not 0 <= start <= stop <= self._n:
            raise IndexError(f"segment range [{start}, {stop}) out of range (store has {self._n} segments)")
        if start == stop:
            return []
        col = _COLUMNS.index("text")
        b0 = int(np.searchsorted(self._starts, start, side="right")) - 1
        out: list[str] = []
        b = b0
        while len(out) < stop - start:
            lo = max(start - int(self._starts[b]), 0)
            hi = min(stop - int(self._starts[b]), self._batches[b].num_rows)
            out.extend(self._batches[b].column(col).slice(lo, hi - lo).to_pylist())
            b += 1
        return out

    def get_many(self, ids: Sequence[int] | np.ndarray) -> list[Segment]:
        """Segments for `ids` (any order, repeats allowed), returned in the order asked."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            return []
        if ids.min() < 0 or ids.max() >= self._n:
            bad = ids[(ids < 0) | (ids >= self._n)][0]
            raise IndexError(f"segment id {int(bad)} out of range (store has {self._n} segments)")
        batch_of = np.searchsorted(self._starts, ids, side="right") - 1
        out: list[Segment | None] = [None] * len(ids)
        # Group by record batch so each batch is touched once with one `take`.
        for b in np.unique(batch_of):
            where = np.nonzero(batch_of == b)[0]
            local = ids[where] - self._starts[b]
            rows = self._batches[int(b)].take(pa.array(local, type=pa.int64()))
            for pos, seg in zip(where, _to_segments(rows)):
                out[int(pos)] = seg
        return out  # type: ignore[return-value]

    def iter_batches(self, batch_size: int = 1024) -> Iterator[list[Segment]]:
        """Every segment, in segment_id order, `batch_size` at a time (the last batch may be shorter)."""
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        pending: list[Segment] = []
        for batch in self._batches:
            for off in range(0, batch.num_rows, batch_size):
                pending.extend(_to_segments(batch.slice(off, batch_size)))
                while len(pending) >= batch_size:
                    yield pending[:batch_size]
                    pending = pending[batch_size:]
        if pending:
            yield pending

    def segment_ids(self) -> np.ndarray:
        """All segment ids, shape (N,), int64 (always 0..N-1)."""
        if not self._batches:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([b.column(0).to_numpy() for b in self._batches]).astype(np.int64, copy=False)

    def column(self, name: str) -> pa.ChunkedArray:
        """One column over the whole store (zero-copy chunks), e.g. `doc_id` to group segments by document."""
        if name not in _COLUMNS:
            raise KeyError(f"no column {name!r}; columns: {_COLUMNS}")
        i = _COLUMNS.index(name)
        return pa.chunked_array([b.column(i) for b in self._batches], type=SCHEMA.field(name).type)


def _to_segments(rows: pa.RecordBatch) -> list[Segment]:
    cols = [rows.column(i).to_pylist() for i in range(len(_COLUMNS))]
    return [Segment(*vals) for vals in zip(*cols)]


def _qa_from_json(obj: dict) -> QAExample:
    names = {f.name for f in dataclasses.fields(QAExample)}
    return QAExample(**{k: v for k, v in obj.items() if k in names})


def verify_qa(store_dir: Path | str, manifest: dict) -> None:
    """Refuse a qa.jsonl whose bytes do not match the store's manifest (SegmentStore.open checks segments only)."""
    verify_file(Path(store_dir) / QA_FILE, manifest.get("files_sha256", {}).get(QA_FILE), REBUILD)


def load_qa(store_dir: Path | str, split: str = "all") -> list[QAExample]:
    """The store's QA examples of one split (`train`, `dev`, `test` or `all`), in file order."""
    if split not in (*SPLITS, "all"):
        raise UserError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}, all")
    store_dir = Path(store_dir)
    qa_path = store_dir / QA_FILE
    if not (store_dir / MANIFEST_FILE).is_file() or not qa_path.is_file():
        raise UserError(
            f"no segment store at {store_dir}; build it with `python -m data_prep.build --config C`"
        )
    try:
        manifest = json.loads((store_dir / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{store_dir / MANIFEST_FILE}: corrupt manifest ({e}); {REBUILD}") from e
    verify_qa(store_dir, manifest)
    out = []
    with open(qa_path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                ex = _qa_from_json(json.loads(line))
            except (json.JSONDecodeError, TypeError) as e:
                raise UserError(f"{qa_path}:{lineno}: corrupt QA row ({e}); rebuild the store") from e
            if split == "all" or ex.split == split:
                out.append(ex)
    return out


# ---------------------------------------------------------------------------------------------- writing


class StoreWriter:
    """Streams segments into a new store directory; see the module docstring for the usage pattern.

    Rows are buffered `batch_rows` at a time (one Arrow record batch each), so memory stays flat
    however large the corpus. Nothing is visible at `out_dir` until `__exit__` succeeds.
    """

    def __init__(self, out_dir: Path | str, *, manifest_extra: dict | None = None, batch_rows: int = 4096):
        if batch_rows < 1:
            raise ValueError("batch_rows must be >= 1")
        self.out_dir = Path(out_dir)
        self.manifest_extra = dict(manifest_extra or {})
        self.batch_rows = batch_rows
        self.n_segments = 0
        self.n_documents = 0
        self._last_doc: str | None = None
        self._buf: dict[str, list] = {c: [] for c in _COLUMNS}
        self._seg_hash = hashlib.sha256()
        self._qa_hash = hashlib.sha256()
        self._qa_counts: dict[str, int] = dict.fromkeys(SPLITS, 0)
        self._qa_no_gold = 0
        self._qa_ids: set[str] = set()
        self._ctx = None
        self._tmp: Path | None = None
        self._writer: pa.ipc.RecordBatchFileWriter | None = None
        self._sink = None
        self._qa_file = None

    def __enter__(self) -> StoreWriter:
        self._ctx = atomic_dir(self.out_dir)
        self._tmp = self._ctx.__enter__()
        self._sink = pa.OSFile(str(self._tmp / SEGMENTS_FILE), "wb")
        self._writer = pa.ipc.new_file(self._sink, SCHEMA)
        self._qa_file = open(self._tmp / QA_FILE, "w", encoding="utf-8")  # noqa: SIM115 (closed in __exit__)
        return self

    def add(self, seg: Segment) -> None:
        if self._writer is None:
            raise RuntimeError("StoreWriter.add outside its `with` block or after close_segments()")
        if seg.segment_id != self.n_segments:
            raise ValueError(
                f"segment ids must be 0..N-1 in order: expected {self.n_segments}, got {seg.segment_id}"
            )
        if not 0 <= seg.char_start <= seg.char_end or not 0 <= seg.token_start <= seg.token_end:
            raise ValueError(f"segment {seg.segment_id}: bad span {seg}")
        if seg.doc_id != self._last_doc:
            self.n_documents += 1
            self._last_doc = seg.doc_id
        row = (
            seg.segment_id,
            seg.doc_id,
            seg.title,
            seg.text,
            seg.char_start,
            seg.char_end,
            seg.token_start,
            seg.token_end,
        )
        for c, v in zip(_COLUMNS, row):
            self._buf[c].append(v)
        # Unit/record separators keep field boundaries unambiguous in the content hash.
        self._seg_hash.update("\x1f".join(map(str, row)).encode("utf-8", "surrogatepass") + b"\x1e")
        self.n_segments += 1
        if len(self._buf["segment_id"]) >= self.batch_rows:
            self._flush()

    def add_many(self, segments: Iterable[Segment]) -> None:
        for seg in segments:
            self.add(seg)

    def add_qa(self, examples: Iterable[QAExample]) -> None:
        if self._qa_file is None:
            raise RuntimeError("StoreWriter.add_qa outside its `with` block")
        for ex in examples:
            if ex.split not in SPLITS:
                raise ValueError(f"QA example {ex.id!r}: split must be one of {SPLITS}, got {ex.split!r}")
            if ex.id in self._qa_ids:
                raise ValueError(f"duplicate QA id {ex.id!r}")
            bad = [i for i in ex.gold_segment_ids if not isinstance(i, int) or i < 0]
            if bad:
                raise ValueError(f"QA example {ex.id!r}: bad gold segment ids {bad}")
            self._qa_ids.add(ex.id)
            line = json.dumps({f: getattr(ex, f) for f in _QA_FIELDS}, ensure_ascii=False) + "\n"
            self._qa_file.write(line)
            self._qa_hash.update(line.encode("utf-8"))
            self._qa_counts[ex.split] += 1
            self._qa_no_gold += not ex.gold_segment_ids

    def close_segments(self) -> SegmentStore:
        """Finish the segment file and return a read-only view of it (still inside the temporary directory),
        e.g. to find gold segments before the QA set is written. `add` is refused afterwards."""
        if self._writer is None:
            raise RuntimeError("StoreWriter.close_segments outside its `with` block or called twice")
        self._close_segment_file()
        fault_point("store.segments_closed")
        mmap = pa.memory_map(str(self._tmp / SEGMENTS_FILE), "r")
        return SegmentStore(
            self._tmp, {"counts": {"segments": self.n_segments}}, pa.ipc.open_file(mmap), mmap
        )

    def _close_segment_file(self) -> None:
        if self._writer is not None:
            self._flush()
            self._writer.close()
            self._sink.close()
            self._writer = None

    def _flush(self) -> None:
        if not self._buf["segment_id"]:
            return
        arrays = [pa.array(self._buf[c], type=SCHEMA.field(c).type) for c in _COLUMNS]
        self._writer.write_batch(pa.RecordBatch.from_arrays(arrays, schema=SCHEMA))
        self._buf = {c: [] for c in _COLUMNS}

    def _manifest(self) -> dict[str, Any]:
        counts = dict(self.manifest_extra.get("counts", {}))
        counts.update(
            segments=self.n_segments,
            documents=self.n_documents,
            qa=sum(self._qa_counts.values()),
            qa_per_split=dict(self._qa_counts),
            qa_without_gold_segment=self._qa_no_gold,
        )
        seg_sha = self._seg_hash.hexdigest()
        qa_sha = self._qa_hash.hexdigest()
        manifest = {k: v for k, v in self.manifest_extra.items() if k != "counts"}
        manifest.update(
            format_version=FORMAT_VERSION,
            created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            counts=counts,
            segments_sha256=seg_sha,
            qa_sha256=qa_sha,
            fingerprint=fingerprint({"format_version": FORMAT_VERSION, "segments_sha256": seg_sha}),
            qa_fingerprint=fingerprint({"format_version": FORMAT_VERSION, "qa_sha256": qa_sha}),
            files_sha256=hash_files(self._tmp, [SEGMENTS_FILE, QA_FILE]),
        )
        return manifest

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None:
                self._close_segment_file()
            elif self._writer is not None:
                self._writer.close()
                self._sink.close()
            self._qa_file.close()
            if exc_type is None:
                self.manifest = self._manifest()
                # The manifest goes last: a directory without it never opens as a store.
                (self._tmp / MANIFEST_FILE).write_text(
                    json.dumps(self.manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
                    encoding="utf-8",
                )
        except BaseException:
            self._ctx.__exit__(*sys.exc_info())  # deletes the temp dir
            raise
        finally:
            self._writer = None
            self._qa_file = None
        # atomic_dir renames the temp dir onto out_dir on success, deletes it when the block raised.
        return bool(self._ctx.__exit__(exc_type, exc, tb))


def write_store(
    out_dir: Path | str,
    segments: Iterable[Segment],
    qa: Iterable[QAExample] = (),
    manifest_extra: dict | None = None,
    batch_rows: int = 4096,
) -> Path:
    """Write a complete store in one call (segment ids must be 0..N-1 in order); returns `out_dir`."""
    with StoreWriter(out_dir, manifest_extra=manifest_extra, batch_rows=batch_rows) as w:
        w.add_many(segments)
        w.add_qa(qa)
    return Path(out_dir)
