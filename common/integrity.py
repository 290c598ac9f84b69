"""Content hashes of saved artifacts: written with the file, checked when it is read.

A manifest records the sha256 of each file when the file is written (`sha256_file`). Readers call
`verify_file` (small files, on every open) or `verify_once` (large shards, the first time a process reads
one; the verdict is cached per file version), and producing commands call `file_ok` to decide whether a
finished file can be kept or must be made again. A mismatch, a missing or a truncated file is refused with
a `UserError` naming the file and the command that rebuilds it, never served.

A hash of None means a manifest written before hashes existed: it is not checked (old artifacts still load).
Cost: sha256 reads about 1.2 GB/s on one core of the busy 2-core CPU this was measured on (README, Commands).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from common.atomic import sha256_file
from common.errors import UserError

__all__ = ["file_ok", "forget_verified", "hash_files", "hash_tree", "read_json_object", "sha256_file", "verify_file",
           "verify_once", "verify_tree"]

# (path, expected sha256, size, mtime_ns, inode) of files that matched their hash in this process.
_verified: set[tuple[str, str, int, int, int]] = set()
_lock = threading.Lock()


def _refuse(path: Path, what: str, rebuild: str) -> UserError:
    return UserError(f"{path}: {what}; {rebuild}")


def verify_file(path: Path | str, expected: str | None, rebuild: str) -> None:
    """Refuse `path` unless its sha256 is `expected` (None: a manifest without hashes, not checked).

    `rebuild` ends the message: what to run to make the file again, e.g. "rebuild it with `python -m ...`".
    """
    path = Path(path)
    if not path.is_file():
        raise _refuse(path, "the file is missing", rebuild)
    if expected is None:
        return
    if sha256_file(path) != expected:
        raise _refuse(
            path, "sha256 does not match its manifest (a damaged, truncated or replaced file)", rebuild
        )


def _version(path: Path, expected: str) -> tuple[str, str, int, int, int]:
    st = path.stat()
    return (str(path.resolve()), expected, st.st_size, st.st_mtime_ns, st.st_ino)


def verify_once(path: Path | str, expected: str | None, rebuild: str) -> None:
    """`verify_file`, hashing each version of a file (path, size, mtime, inode) once per process.

    For shards too large to hash on every open: a reader calls this before it first serves from a shard.
    Only a match is remembered, so a refused file is checked (and refused) again on the next call.
    """
    path = Path(path)
    if expected is None:
        verify_file(path, None, rebuild)
        return
    try:
        key = _version(path, expected)
    except OSError:
        raise _refuse(path, "the file is missing", rebuild) from None
    with _lock:
        if key in _verified:
            return
    verify_file(path, expected, rebuild)
    with _lock:
        _verified.add(key)


def file_ok(path: Path | str, expected: str | None) -> bool:
    """Whether a producing command may keep `path`: it exists and matches `expected` (None: never kept)."""
    path = Path(path)
    if expected is None or not path.is_file():
        return False
    try:
        return sha256_file(path) == expected
    except OSError:
        return False


def forget_verified() -> None:
    """Drop the remembered verdicts of `verify_once` (tests that damage a file already read)."""
    with _lock:
        _verified.clear()


def hash_files(directory: Path | str, names: list[str]) -> dict[str, str]:
    """{name: sha256} of files in `directory` (for a manifest, right after they were written)."""
    directory = Path(directory)
    return {name: sha256_file(directory / name) for name in names if os.path.isfile(directory / name)}


def hash_tree(directory: Path | str, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """{relative path: sha256} of every file under `directory` but `skip` (a saved training state's files)."""
    directory = Path(directory)
    return {p.relative_to(directory).as_posix(): sha256_file(p) for p in sorted(directory.rglob("*"))
            if p.is_file() and p.relative_to(directory).as_posix() not in skip}


def verify_tree(directory: Path | str, hashes: dict[str, str] | None, rebuild: str) -> None:
    """Refuse a folder written with `hash_tree` unless every listed file matches (None: saved without hashes)."""
    for name, expected in (hashes or {}).items():
        verify_file(Path(directory) / name, expected, rebuild)


def read_json_object(path: Path | str, what: str, hint: str) -> dict:
    """A JSON object saved by one of our commands (a manifest, a state's metadata); a truncated, damaged or
    non-object file is refused with a UserError naming it: `{path}: corrupt {what} (...); {hint}`."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: corrupt {what} ({err}); {hint}") from err
    if not isinstance(obj, dict):
        raise UserError(f"{path}: not a {what}; {hint}")
    return obj
