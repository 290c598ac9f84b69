"""The shared command-line front end: `--config FILE` plus dotted `key=value` overrides."""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Callable, Sequence

from common.errors import UserError
from configs.loader import iter_keys, load_config
from configs.schema import Config

_OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*=")


def _keys_help() -> str:
    lines = ["config keys (override any as key=value):"]
    for key, _tp, default, help_text, choices in iter_keys():
        extra = f" {{{','.join(map(str, choices))}}}" if choices else ""
        lines.append(f"  {key} = {default!r}{extra}\n      {help_text}")
    return "\n".join(lines)


def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=_keys_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", "-c", default=None, help="YAML config file (default: built-in defaults)")
    parser.add_argument("args", nargs="*", help="dotted overrides such as train.lr=3e-5 retriever.top_k=5")
    return parser


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None,
          positional: bool = False) -> tuple[Config, argparse.Namespace]:
    """Parse argv; positional `key=value` items are overrides. Any other positional item is an error,
    unless the command takes them (`positional=True`, e.g. qa.answer's questions): they stay in `ns.args`."""
    # Intermixed: `--force data.window=64` and `data.window=64 --force` both work (plain parse_args
    # rejects a key=value that follows an option as an "unrecognized argument").
    ns = parser.parse_intermixed_args(argv)
    overrides = [a for a in ns.args if _OVERRIDE.match(a)]
    ns.args = [a for a in ns.args if not _OVERRIDE.match(a)]
    if ns.args and not positional:
        raise UserError(f"unexpected arguments {ns.args}; this command takes its options and key=value "
                        "overrides (e.g. train.lr=3e-5)")
    cfg = load_config(ns.config, overrides)
    return cfg, ns


def run_main(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> None:
    """Run a command's main(); a UserError becomes one clear line on stderr and exit code 2."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # faiss announces which SIMD build it loaded at INFO on every import; users need none of it.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    try:
        code = main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
