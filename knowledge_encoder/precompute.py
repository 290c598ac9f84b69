"""Moved: the prefix-store command is `python -m qa.precompute` (same options).

It reads trained checkpoints, which qa/ owns, and knowledge_encoder/ sits below qa/ (docs/ARCHITECTURE.md).
This stub imports nothing of ours: `python -m knowledge_encoder.precompute ...` prints the new command line
and exits with status 2, and `from knowledge_encoder.precompute import ...` fails naming the new module.
Forwarding to qa.precompute instead would need the very back-import the move removes, and would let old
scripts run on without ever learning the new name. Remove this stub one release after the move.
"""

from __future__ import annotations

import shlex
import sys

NEW_MODULE = "qa.precompute"


def moved_message(argv: list[str]) -> str:
    """What to run instead, with the caller's own arguments."""
    command = shlex.join(["python", "-m", NEW_MODULE, *argv])
    return (f"`python -m knowledge_encoder.precompute` has moved to `python -m {NEW_MODULE}` (same options); "
            f"run:\n  {command}")


def __getattr__(name: str):
    # `from knowledge_encoder.precompute import precompute` (the old Python API): a clear ImportError. Dunder
    # look-ups (`__path__`, `__wrapped__`, ...) are the import system and tools probing; they get the usual answer.
    if name.startswith("__"):
        raise AttributeError(name)
    raise ImportError(f"knowledge_encoder.precompute.{name} has moved: import it from {NEW_MODULE} "
                      "(encoder_sha256 is in qa.checkpoint, prefix_dir in knowledge_encoder.prefix_store)")


if __name__ == "__main__":
    print(moved_message(sys.argv[1:]), file=sys.stderr)
    sys.exit(2)
