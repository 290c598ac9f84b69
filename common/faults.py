"""A test-only fault-injection point: kill this process with SIGKILL at a named point of the code.

    FAULT_KILL_AT=<name>:<count>[,<name>:<count>...]  python -m data_prep.build ...

`fault_point(name)` does nothing unless FAULT_KILL_AT names `name`; then the count-th time this process
reaches it, the process sends itself SIGKILL (no cleanup, no `finally`, no flushing: what `kill -9`, the
OOM killer or a power cut of the process does). tests/test_fault_suite.py uses it to stop each producing
command at chosen points, deterministically, and checks that nothing half-written ever loads and that a
rerun gives what an uninterrupted run gives.

The points (grep `fault_point(` for where): `atomic_dir.<folder>.ready` (a temp folder is complete, before
its rename), `atomic_dir.<folder>.swapped` (between the two renames that replace an existing folder),
`embed.shard_file` / `embed.shard_listed`, `prefix_store.shard_file` / `prefix_store.shard_listed`,
`store.segments_closed`, `build.document`, `train.step`, `train.checkpoint_saved`, `live.added`,
`live.saved`. Unset (always, outside tests) it costs one dictionary lookup per call.
"""

from __future__ import annotations

import os
import signal

ENV = "FAULT_KILL_AT"

_seen: dict[str, int] = {}


def _targets(spec: str) -> dict[str, int]:
    out = {}
    for part in spec.split(","):
        name, sep, count = part.strip().rpartition(":")
        if not sep or not name or not count.isdigit() or int(count) < 1:
            raise ValueError(f"{ENV}={spec!r}: expected NAME:COUNT[,NAME:COUNT...] with COUNT >= 1")
        out[name] = int(count)
    return out


def fault_point(name: str) -> None:
    """SIGKILL this process if FAULT_KILL_AT asks for `name` and this is its count-th arrival here."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    wanted = _targets(spec).get(name)
    if wanted is None:
        return
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] == wanted:
        os.kill(os.getpid(), signal.SIGKILL)
