"""Atomic writes and fingerprints: a crash never leaves a half-written artifact that loads."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from common.faults import fault_point


def _tmp_sibling(path: Path, kind: str) -> Path:
    return path.parent / f".{path.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def clean_leftovers(path: Path | str) -> list[Path]:
    """Remove the temp folders that a killed `atomic_dir(path)` left beside `path`; returns what was removed.

    Only `path`'s own `.NAME.tmp-PID-*` / `.NAME.old-PID-*` siblings are touched, and only when process PID
    is gone: a build running at the same time (another live process, or this one) keeps its folder. A job
    killed between its two renames leaves the previous version only as `.old-*`; it is put back when `path`
    is missing, so nothing is lost.
    """
    path = Path(path)
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(tmp|old)-(\d+)-[0-9a-f]{{8}}$")
    try:
        entries = sorted(os.scandir(path.parent), key=lambda e: e.name)
    except OSError:
        return []
    removed = []
    for entry in entries:
        m = pattern.match(entry.name)
        if m is None or int(m.group(2)) == os.getpid() or _pid_alive(int(m.group(2))):
            continue
        leftover = Path(entry.path)
        if m.group(1) == "old" and entry.is_dir(follow_symlinks=False) and not path.exists():
            os.replace(leftover, path)
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
        removed.append(leftover)
    return removed


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path, "tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        fault_point(f"atomic_write.{path.name}.ready")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path | str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def atomic_dir(path: Path | str) -> Iterator[Path]:
    """Yield a temporary directory that replaces `path` only if the block finishes without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(path)  # of an earlier job that was killed while writing `path`
    tmp = _tmp_sibling(path, "tmp")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fault_point(f"atomic_dir.{path.name}.ready")
    old = None
    if path.exists():
        old = _tmp_sibling(path, "old")
        os.replace(path, old)
        fault_point(f"atomic_dir.{path.name}.swapped")
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fingerprint(obj: Any) -> str:
    """A short stable hash of a JSON-able object (configs, manifests, id lists)."""
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]
