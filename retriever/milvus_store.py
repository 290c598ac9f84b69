"""The Milvus vector store (`index.backend=milvus`): a collection reached through pymilvus `MilvusClient`.

`index.milvus_uri` null is milvus-lite in `run_dir/index/milvus.db` (embedded, in this process; a file
only one process may open at a time); a local path ending in `.db` is milvus-lite there; `http://host:19530`
(or https, tcp, unix) is a Milvus server or cluster, through the very same client calls.

Collection: `id` INT64 primary key (the store's segment ids), `vector` FLOAT_VECTOR(dim), inner product
(`IP`), strong consistency. Index `index.milvus_index_type`: FLAT (exact, the default), IVF_FLAT
(`index.nlist` lists, `index.nprobe` visited; Milvus trains the lists itself when it builds the index)
or HNSW (`index.milvus_hnsw_m`, `_ef_construction`, search ef `index.milvus_hnsw_ef`).

Builds are atomic as far as Milvus allows: every build writes a new collection `NAME__<build id>`
(`index.milvus_collection` = NAME); when it is complete and loaded, the alias NAME is switched to it
(Milvus swaps an alias atomically), then `run_dir/index/manifest.json` naming that collection is written
atomically, then the previous build's collection is dropped. A build that fails drops its collection; one
that is killed leaves it behind, unused (the next build lists it). Milvus itself makes each insert and
delete durable (its write-ahead log) but has no multi-statement transactions, so this ordering is what
keeps the manifest and the collection it names consistent. Processes still searching the dropped
collection of the previous build fail with a message saying to reopen the index.

A store opened from an index directory never writes to its collection: live additions and removals (the
demo's, retriever.serve's) are kept in this process, exactly like the faiss index, which is an in-memory copy
of `index.faiss`: additions in an exact in-memory overlay whose scores are merged with Milvus's, removals
as a filter on the Milvus search. `Retriever` persists them in `run_dir/live/` and replays them on open;
`reset()` reopens the collection as built. `save` of such a store writes a new collection with the changes.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid
from pathlib import Path

import numpy as np
from pymilvus import DataType, MilvusClient
from pymilvus.exceptions import MilvusException

from common.atomic import atomic_write_json
from common.errors import UserError
from retriever.vector_store import MANIFEST_FILE, REBUILD, MilvusOptions, manifest_fields, read_manifest

log = logging.getLogger(__name__)

EMBEDDED_FILE = "milvus.db"
ID_FIELD, VECTOR_FIELD = "id", "vector"
INSERT_BATCH = 4096  # rows per insert call (~6 MB of 384-d float32, well under gRPC's 64 MB)
QUERY_BATCH = 1024  # questions per search call (Milvus caps nq at 16,384)
MAX_TOPK = 16384  # Milvus's limit on `limit`
_SCHEMES = ("http://", "https://", "tcp://", "grpc://", "unix:")
_MISSING_SCORE = np.finfo(np.float32).min  # what faiss reports for a missing inner-product hit


class _QuietUnimplemented(logging.Filter):
    """milvus-lite's in-process gRPC server logs a traceback for each RPC it does not implement (pymilvus asks
    for `AllocTimestamp` when it connects); the client copes, so those records are dropped, nothing else."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, NotImplementedError)


logging.getLogger("grpc._server").addFilter(_QuietUnimplemented())


def is_server_uri(uri: str) -> bool:
    return uri.startswith(_SCHEMES)


def resolve_uri(options: MilvusOptions, index_dir: Path) -> str:
    """`index.milvus_uri`, or the milvus-lite file inside the index directory when it is null."""
    if options.uri is None:
        return str(Path(index_dir).absolute() / EMBEDDED_FILE)
    return options.uri if is_server_uri(options.uri) else str(Path(options.uri).absolute())


def connect(uri: str, timeout: float) -> MilvusClient:
    """A MilvusClient for `uri`; a UserError that says why when it cannot be opened."""
    if not is_server_uri(uri):
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
    try:
        return MilvusClient(uri=uri, timeout=timeout)
    except MilvusException as e:
        if is_server_uri(uri):
            raise UserError(
                f"cannot reach the Milvus server at index.milvus_uri={uri} ({e.message}); start it or fix the URI"
            ) from e
        raise UserError(
            f"cannot open the milvus-lite file {uri} ({e.message}): milvus-lite lets one process open a file at "
            "a time, so stop the other process using it (or serve the index with `python -m retriever.serve` and "
            "set retriever.service_url, or use a Milvus server: index.milvus_uri=http://host:19530)"
        ) from e


class MilvusStore:
    """A Milvus collection of (n, dim) float32 vectors under int64 ids; thread-safe search and mutation.

    Made by `create` (a new build collection: `add`/`remove` write to it, `save` publishes it) or by
    `load` (a published collection: `add`/`remove` stay in this process, see the module docstring).
    """

    backend = "milvus"
    metric = "inner_product"

    def __init__(
        self,
        client: MilvusClient,
        *,
        uri: str,
        collection: str,
        dim: int,
        options: MilvusOptions,
        index_type: str,
        nlist: int,
        building: bool,
        base_count: int = 0,
    ):
        self.client = client
        self.uri = uri
        self.collection = collection  # the physical collection this store reads (and, building, writes)
        self.options = options
        self.index_type = index_type
        self._dim = int(dim)
        self._nlist = int(nlist) if index_type == "IVF_FLAT" else 0
        self.building = building
        self.factory = f"milvus:{index_type}" + (f",nlist={self._nlist}" if self._nlist else "")
        self._lock = threading.RLock()
        self._base_count = base_count  # rows in the collection
        self._removed: set[int] = set()  # ids of the collection hidden by live removals (loaded stores)
        self._added_ids = np.zeros(0, dtype=np.int64)  # live additions of a loaded store: (m,) ids
        self._added = np.zeros((0, self._dim), dtype=np.float32)  # and (m, dim) vectors
        self._digest = hashlib.sha256(f"milvus:{index_type}:{self._nlist}:{self._dim}".encode())

    # ------------------------------------------------------------------ construction

    @classmethod
    def create(cls, dim: int, options: MilvusOptions, *, index_dir: Path, nlist: int = 0) -> MilvusStore:
        """A new, empty build collection `NAME__<build id>` at `index.milvus_uri` (null: index_dir/milvus.db)."""
        uri = resolve_uri(options, index_dir)
        client = connect(uri, options.timeout)
        build_id = time.strftime("%Y%m%d%H%M%S") + uuid.uuid4().hex[:6]
        name = f"{options.collection}__{build_id}"
        nlist = max(1, min(int(nlist), 65536)) if options.index_type == "IVF_FLAT" else 0
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field(ID_FIELD, DataType.INT64, is_primary=True)
        schema.add_field(VECTOR_FIELD, DataType.FLOAT_VECTOR, dim=int(dim))
        index_params = client.prepare_index_params()
        index_params.add_index(
            field_name=VECTOR_FIELD,
            index_type=options.index_type,
            metric_type="IP",
            params=_build_params(options, nlist),
        )
        try:
            client.create_collection(name, schema=schema, index_params=index_params, consistency_level="Strong")
        except MilvusException as e:
            raise UserError(f"Milvus at {uri} refused to create collection {name}: {e.message}") from e
        log.info("building Milvus collection %s at %s (%s, inner product)", name, uri, options.index_type)
        return cls(client, uri=uri, collection=name, dim=dim, options=options, index_type=options.index_type,
                   nlist=nlist, building=True)

    @classmethod
    def load(cls, index_dir: Path, manifest: dict, options: MilvusOptions) -> MilvusStore:
        """The collection a checked manifest names (`retriever.vector_store.load_index_dir`), at
        `index.milvus_uri` (null: index_dir/milvus.db)."""
        info = manifest.get("milvus") or {}
        name = info.get("collection")
        uri = resolve_uri(options, index_dir)
        if not name:
            raise UserError(f"{index_dir}: the manifest names no Milvus collection; {REBUILD}")
        client = connect(uri, options.timeout)
        try:
            present = client.has_collection(name)
        except MilvusException as e:
            raise UserError(f"Milvus at {uri}: {e.message}") from e
        if not present:
            built_in = info.get("uri")
            where = f"{built_in} (relative to {index_dir})" if built_in == EMBEDDED_FILE else built_in
            raise UserError(
                f"{index_dir} names Milvus collection {name}, which is not in Milvus at {uri} (the index was built "
                f"in {where}): set index.milvus_uri to where it was built, or {REBUILD}"
            )
        client.load_collection(name)
        rows = _count(client, name)
        return cls(client, uri=uri, collection=name, dim=int(manifest.get("dim", 0)), options=options,
                   index_type=info.get("index_type", "FLAT"), nlist=int(manifest.get("nlist") or 0),
                   building=False, base_count=rows)

    # ------------------------------------------------------------------ properties

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def ntotal(self) -> int:
        with self._lock:
            return self._base_count - len(self._removed) + len(self._added_ids)

    @property
    def nlist(self) -> int:
        return self._nlist

    @property
    def on_gpu(self) -> bool:
        return False

    @property
    def is_trained(self) -> bool:
        return True  # Milvus trains what its index needs when it builds it

    def resolve_nprobe(self, nprobe: int) -> int:
        """IVF_FLAT: lists visited for `index.nprobe` (0 = automatic, as for faiss); 0 for FLAT and HNSW."""
        from retriever.faiss_index import auto_nprobe

        if nprobe < 0:
            raise UserError(f"index.nprobe must be >= 0 (0 = automatic), got {nprobe}")
        if not self._nlist:
            return 0
        return auto_nprobe(self._nlist, self.ntotal) if nprobe == 0 else min(int(nprobe), self._nlist)

    # ------------------------------------------------------------------ mutation

    def train(self, vectors: np.ndarray) -> None:
        """A no-op: Milvus trains IVF lists itself when it indexes the inserted vectors."""

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Add (n, dim) vectors under (n,) int64 ids: into the build collection, or the live overlay."""
        vectors = _as_f32(vectors, self._dim)
        ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
        if len(ids) != len(vectors):
            raise ValueError(f"{len(vectors)} vectors but {len(ids)} ids")
        with self._lock:
            if not self.building:
                self._added_ids = np.concatenate([self._added_ids, ids])
                self._added = np.concatenate([self._added, vectors])
                return
            for start in range(0, len(ids), INSERT_BATCH):
                part_ids, part = ids[start : start + INSERT_BATCH], vectors[start : start + INSERT_BATCH]
                rows = [{ID_FIELD: int(i), VECTOR_FIELD: v} for i, v in zip(part_ids.tolist(), part.tolist())]
                self._call("insert", lambda rows=rows: self.client.insert(self.collection, rows))
                self._digest.update(part_ids.tobytes())
                self._digest.update(part.tobytes())
            self._base_count += len(ids)

    def remove(self, ids) -> int:
        """Remove vectors by id; returns how many were in the store."""
        ids = sorted({int(i) for i in np.asarray(ids, dtype=np.int64).reshape(-1)})
        if not ids:
            return 0
        with self._lock:
            keep = ~np.isin(self._added_ids, ids)
            removed = int((~keep).sum())
            self._added_ids, self._added = self._added_ids[keep], self._added[keep]
            candidates = [i for i in ids if i not in self._removed]
            present = self._present(candidates)
            if self.building and present:
                self._call("delete", lambda: self.client.delete(self.collection, ids=present))
                self._base_count -= len(present)
                self._digest.update(b"delete" + np.asarray(present, dtype=np.int64).tobytes())
            else:
                self._removed.update(present)
            return removed + len(present)

    def _present(self, ids: list[int]) -> list[int]:
        """The ids of `ids` that are rows of the collection."""
        found: list[int] = []
        for start in range(0, len(ids), INSERT_BATCH):
            part = ids[start : start + INSERT_BATCH]
            rows = self._call("get", lambda part=part: self.client.get(self.collection, ids=part, output_fields=[ID_FIELD]))
            found.extend(int(r[ID_FIELD]) for r in rows)
        return sorted(found)

    # ------------------------------------------------------------------ search

    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k for (n, dim) queries → (scores (n, k) float32, ids (n, k) int64), best first; -1 where missing."""
        queries = _as_f32(queries, self._dim)
        if k < 1:
            raise ValueError("k must be >= 1")
        n = len(queries)
        scores = np.full((n, k), _MISSING_SCORE, dtype=np.float32)
        ids = np.full((n, k), -1, dtype=np.int64)
        with self._lock:
            removed = sorted(self._removed)
            added_ids, added = self._added_ids, self._added
        params: dict = {"metric_type": "IP", "params": {}}
        if self._nlist:
            params["params"]["nprobe"] = self.resolve_nprobe(0 if nprobe is None else nprobe)
        if self.index_type == "HNSW":
            params["params"]["ef"] = max(self.options.hnsw_ef, k)
        limit = min(k, MAX_TOPK)
        expr = f"{ID_FIELD} not in {removed}" if removed else ""
        for start in range(0, n, QUERY_BATCH):
            part = queries[start : start + QUERY_BATCH]
            results = self._call(
                "search",
                lambda part=part: self.client.search(
                    self.collection, data=part.tolist(), limit=limit, filter=expr, search_params=params,
                    anns_field=VECTOR_FIELD, output_fields=[],
                ),
            )
            for row, hits in enumerate(results, start=start):
                got = [(float(h["distance"]), int(h["id"])) for h in hits][:k]
                if got:
                    scores[row, : len(got)] = [s for s, _ in got]
                    ids[row, : len(got)] = [i for _, i in got]
        if len(added_ids):
            scores, ids = _merge(scores, ids, queries @ added.T, added_ids, k)
        return scores, ids

    def _call(self, what: str, fn):
        try:
            return fn()
        except MilvusException as e:
            raise UserError(
                f"Milvus {what} on collection {self.collection} at {self.uri} failed: {e.message} (was the index "
                "rebuilt since this process opened it? then open it again)"
            ) from e

    # ------------------------------------------------------------------ files

    def save(self, index_dir: Path, manifest: dict) -> dict:
        """Publish this store as `index_dir`: a build collection as it is, an opened one with its live changes
        copied into a new build collection first. Switches the alias, writes the manifest, drops the previous build."""
        index_dir = Path(index_dir)
        if not self.building:
            return self._copy_with_changes(index_dir).save(index_dir, manifest)
        with self._lock:
            self._call("flush", lambda: self.client.flush(self.collection))
            self._call("load", lambda: self.client.load_collection(self.collection))
            alias = self.options.collection
            previous = _previous_collection(index_dir, self.uri, self.client)
            self._point_alias(alias)
            embedded = self.uri == str(index_dir.absolute() / EMBEDDED_FILE)
            full = {
                **manifest_fields(self, manifest),
                "sha256": self._digest.hexdigest(),
                "milvus": {
                    "uri": EMBEDDED_FILE if embedded else self.uri,
                    "collection": self.collection,
                    "alias": alias,
                    "index_type": self.index_type,
                    "params": _build_params(self.options, self._nlist),
                },
            }
            index_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(index_dir / MANIFEST_FILE, full)
            (index_dir / "index.faiss").unlink(missing_ok=True)  # a faiss index this build replaced
            if previous and previous != self.collection:
                self._call("drop_collection", lambda: self.client.drop_collection(previous))
            self.building = False
            leftovers = [
                c for c in self.client.list_collections() if c.startswith(f"{alias}__") and c != self.collection
            ]
            if leftovers:
                log.warning("Milvus at %s holds unused build collections %s (killed builds?); drop them with "
                            "MilvusClient(uri).drop_collection(name)", self.uri, leftovers)
        return full

    def _point_alias(self, alias: str) -> None:
        """Point the alias `alias` at this build (create it, or switch it from the previous build: atomic in Milvus)."""
        exists = alias in (self._call("list_aliases", self.client.list_aliases).get("aliases") or [])
        try:
            if exists:
                self.client.alter_alias(self.collection, alias)
            else:
                self.client.create_alias(self.collection, alias)
        except MilvusException as e:
            raise UserError(
                f"Milvus at {self.uri} cannot point alias {alias} at {self.collection} ({e.message}); is there a "
                "collection of that name? choose another index.milvus_collection"
            ) from e

    def _copy_with_changes(self, index_dir: Path) -> MilvusStore:
        """A new build collection holding this store's rows as they are now (built rows minus removals, plus additions)."""
        copy = MilvusStore.create(self._dim, self.options, index_dir=index_dir, nlist=self._nlist)
        try:
            iterator = self.client.query_iterator(self.collection, batch_size=INSERT_BATCH, output_fields=[ID_FIELD, VECTOR_FIELD])
            while rows := iterator.next():
                rows = [r for r in rows if int(r[ID_FIELD]) not in self._removed]
                if rows:
                    copy.add(np.asarray([r[VECTOR_FIELD] for r in rows], dtype=np.float32),
                             np.asarray([r[ID_FIELD] for r in rows], dtype=np.int64))
            iterator.close()
            if len(self._added_ids):
                copy.add(self._added, self._added_ids)
        except BaseException:
            copy.discard()
            raise
        return copy

    def discard(self) -> None:
        """Drop the build collection of a build that did not finish (nothing for an opened store)."""
        if self.building:
            try:
                self.client.drop_collection(self.collection)
            except MilvusException as e:
                log.warning("could not drop the unfinished build collection %s: %s", self.collection, e.message)


def _build_params(options: MilvusOptions, nlist: int) -> dict:
    if options.index_type == "IVF_FLAT":
        return {"nlist": int(nlist)}
    if options.index_type == "HNSW":
        return {"M": options.hnsw_m, "efConstruction": options.hnsw_ef_construction}
    return {}


def _previous_collection(index_dir: Path, uri: str, client: MilvusClient) -> str | None:
    """The collection of the Milvus build `index_dir` holds now, when it lives at `uri` (it is dropped once
    the new build is published)."""
    try:
        manifest = read_manifest(index_dir)
    except UserError:
        return None
    info = manifest.get("milvus") or {}
    built_uri = str(index_dir.absolute() / EMBEDDED_FILE) if info.get("uri") == EMBEDDED_FILE else info.get("uri")
    name = info.get("collection")
    if manifest.get("backend") != "milvus" or built_uri != uri or not name:
        return None
    return name if client.has_collection(name) else None


def _count(client: MilvusClient, name: str) -> int:
    rows = client.query(name, filter="", output_fields=["count(*)"])
    return int(rows[0]["count(*)"])


def _merge(
    scores: np.ndarray, ids: np.ndarray, extra_scores: np.ndarray, extra_ids: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of (n, k) hits and (n, m) exact scores of m extra ids → (scores (n, k), ids (n, k))."""
    all_scores = np.concatenate([scores, extra_scores.astype(np.float32)], axis=1)
    all_ids = np.concatenate([ids, np.broadcast_to(extra_ids, extra_scores.shape)], axis=1)
    all_scores = np.where(all_ids < 0, _MISSING_SCORE, all_scores)
    order = np.argsort(-all_scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(all_scores, order, 1), np.take_along_axis(all_ids, order, 1)


def _as_f32(x: np.ndarray, dim: int) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"expected vectors of shape (n, {dim}), got {x.shape}")
    return x
