"""The prefix store: every segment's prefix computed once, so serving skips the backbone and the encoder.

    run_dir/prefixes/<system>/manifest.json
    run_dir/prefixes/<system>/shard-00000.safetensors     ids (N,) + the rows of `knowledge_encoder.prefix_codec`:
                                                          keys/values (N, L, H, P, D), mask (N, P)[, bias, scales]

The manifest records the sha256 of the knowledge encoder's weights and the segment store's fingerprint;
opening a store made by another encoder checkpoint or over another segment store is refused. Shards are
written atomically one at a time, so an interrupted precompute resumes after the last finished shard.

Each shard's entry also holds the `sha256` of its file. A reader hashes a shard the first time it serves
from it in a process (`common.integrity.verify_once`) and refuses a damaged one; a rerun of precompute
hashes every shard and computes the prefixes of a damaged (or unhashed, older) shard again.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from common.atomic import atomic_write_json, clean_leftovers
from common.errors import UserError
from common.faults import fault_point
from common.integrity import file_ok, read_json_object, sha256_file, verify_once
from knowledge_encoder import prefix_codec
from lm.prefix import Prefix

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
REBUILD = "rerun `python -m qa.precompute --config C` to compute it again"


def prefix_dir(run_dir: Path | str, system: str) -> Path:
    """Where the prefix store of `system` lives in a run: run_dir/prefixes/<system>/."""
    return Path(run_dir) / "prefixes" / system


def _read_manifest(path: Path) -> dict:
    """A prefix store's manifest; a truncated or damaged one is refused with a UserError naming it."""
    return read_json_object(path, "prefix store manifest", f"delete {path.parent} and {REBUILD}")


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def _shard_index(name: str) -> int:
    return int(name.removeprefix("shard-").removesuffix(".safetensors"))


class PrefixStoreWriter:
    """Append shards of segment prefixes; `done_ids()` tells a resumed run what to skip."""

    def __init__(self, directory: Path, meta: dict, dtype: str = "bfloat16"):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dtype = dtype
        path = self.dir / MANIFEST
        # What a killed run left: its manifest's temp file, a shard's temp file (a shard renamed into place but
        # not listed yet is overwritten by the next shard of the same name).
        clean_leftovers(path)
        for f in self.dir.glob(".shard-*.safetensors.tmp"):
            f.unlink()
        old = _read_manifest(path) if path.is_file() else None
        self.manifest = {**meta, "dtype": dtype, "shards": [], "complete": False, "count": 0}
        if old is not None and any(old.get(k) != v for k, v in meta.items()):
            # Another encoder or store: start over rather than mix prefixes of two models. The empty manifest
            # goes first, so a kill while the shards are deleted never leaves one that lists them.
            atomic_write_json(path, self.manifest)
            for f in self.dir.glob("shard-*.safetensors"):
                f.unlink()
        elif old is not None:
            self.manifest = old
            self._drop_damaged()

    def _drop_damaged(self) -> None:
        """Forget (and delete) every listed shard whose file does not match its sha256 or has none recorded,
        so that `done_ids` leaves its segments to be computed again."""
        keep = []
        for shard in self.manifest["shards"]:
            path = self.dir / shard["file"]
            if file_ok(path, shard.get("sha256")):
                keep.append(shard)
                continue
            log.warning("prefix shard %s is damaged or has no sha256: its prefixes are computed again", path)
            path.unlink(missing_ok=True)
        if len(keep) != len(self.manifest["shards"]):
            self.manifest.update(shards=keep, complete=False, count=sum(s["count"] for s in keep))
            atomic_write_json(self.dir / MANIFEST, self.manifest)

    def done_ids(self) -> set[int]:
        done = set()
        for shard in self.manifest["shards"]:
            with safe_open(str(self.dir / shard["file"]), framework="pt") as f:
                done.update(f.get_tensor("ids").tolist())
        return done

    def add(self, ids: list[int], prefix: Prefix) -> None:
        tensors = {"ids": torch.tensor(ids, dtype=torch.int64), **prefix_codec.encode(prefix, self.dtype)}
        # After a damaged shard was dropped the list has a gap: the next name follows the highest one.
        name = shard_name(max((_shard_index(s["file"]) + 1 for s in self.manifest["shards"]), default=0))
        tmp = self.dir / f".{name}.tmp"
        save_file(tensors, str(tmp))
        digest = sha256_file(tmp)
        tmp.replace(self.dir / name)
        fault_point("prefix_store.shard_file")
        self.manifest["shards"].append(
            {"file": name, "count": len(ids), "slots": int(tensors["mask"].shape[1]), "sha256": digest}
        )
        self.manifest["count"] += len(ids)
        atomic_write_json(self.dir / MANIFEST, self.manifest)
        fault_point("prefix_store.shard_listed")

    def finish(self) -> None:
        self.manifest["complete"] = True
        atomic_write_json(self.dir / MANIFEST, self.manifest)


class PrefixStore:
    """Read-only view: `get(ids)` -> Prefix (N, H, P, D) per layer, or None if an id is missing.

    Opening reads every shard's ids; a shard's bytes (ids included) are checked against its sha256 before
    the first prefix is served from it, so a damaged shard is refused rather than answering with the prefix
    of another segment.
    """

    def __init__(self, directory: Path, manifest: dict):
        self.dir = Path(directory)
        self.manifest = manifest
        self.next_position = manifest["next_position"]
        self._where: dict[int, tuple[int, int]] = {}
        self._handles = []
        self._verified: set[int] = set()
        for s, shard in enumerate(manifest["shards"]):
            path = self.dir / shard["file"]
            try:
                handle = safe_open(str(path), framework="pt")
                ids = handle.get_tensor("ids").tolist()
            except (SafetensorError, OSError) as err:
                raise UserError(f"{path}: the prefix shard cannot be read ({err}); {REBUILD}") from err
            self._handles.append(handle)
            for row, sid in enumerate(ids):
                self._where[sid] = (s, row)

    def _shard(self, s: int):
        """The open handle of shard `s`, its file verified once per process (`verify_once`)."""
        if s not in self._verified:
            shard = self.manifest["shards"][s]
            verify_once(self.dir / shard["file"], shard.get("sha256"), REBUILD)
            self._verified.add(s)
        return self._handles[s]

    @classmethod
    def open(cls, directory: Path, encoder_sha256: str, store_fingerprint: str) -> PrefixStore:
        path = Path(directory) / MANIFEST
        if not path.is_file():
            raise UserError(f"no prefix store at {directory}; run `python -m qa.precompute --config C`")
        manifest = _read_manifest(path)
        if manifest.get("encoder_sha256") != encoder_sha256:
            raise UserError(f"the prefix store {directory} was computed by another knowledge encoder checkpoint; "
                            "rerun `python -m qa.precompute --config C`")
        if manifest.get("store_fingerprint") != store_fingerprint:
            raise UserError(f"the prefix store {directory} was computed over another segment store; "
                            "rerun `python -m qa.precompute --config C`")
        if not manifest.get("complete"):
            raise UserError(f"the prefix store {directory} is incomplete (interrupted?); rerun precompute to finish it")
        return cls(directory, manifest)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, segment_id: int) -> bool:
        return segment_id in self._where

    def get_one(self, segment_id: int, device=None) -> Prefix | None:
        """The stored prefix of one segment (1, H, P, D per layer), or None when the store lacks it."""
        where = self._where.get(segment_id)
        if where is None:
            return None
        s, row = where
        h = self._shard(s)
        rows = {name: h.get_slice(name)[row:row + 1] for name in h.keys() if name != "ids"}  # noqa: SIM118 (safe_open is not a dict)
        return prefix_codec.decode(rows, self.next_position, device)

    def get(self, ids: list[int], device=None) -> Prefix | None:
        """The prefixes of `ids` stacked (N, H, P_max, D per layer), or None if an id is missing."""
        if any(i not in self._where for i in ids):
            return None
        return prefix_codec.stack_segments([self.get_one(i, device) for i in ids])
