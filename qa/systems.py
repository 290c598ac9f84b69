"""The systems compared, and how their names parse.

A name is `BASE[@tag][~ablation]`:
- BASE is one of SYSTEMS;
- `@tag` names a trained variant (`dynamic_prefix@p32`, `dynamic_prefix@pfull`); a tag `pN` / `pfull`, alone or
  followed by `-name` (`dynamic_prefix@p32-kvzip`), sets knowledge_encoder.prefix_slots for that variant, any
  other tag is just a name;
- `~random` (evaluation only) replaces the retrieved segments by random ones, `~gold` by the gold segment
  (an oracle): neither is ever used by a plain system name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from common.errors import UserError


@dataclass(frozen=True)
class SystemKind:
    retrieves: bool  # reads retrieved segments
    text: bool  # segments as text in the prompt
    static: bool  # a peft static prefix
    dynamic: bool  # the knowledge encoder's prefix
    description: str


SYSTEMS = {
    "closed_book": SystemKind(False, False, False, False, "the question only"),
    "rag_text": SystemKind(True, True, False, False, "top-k segments as text, zero-shot"),
    "rag_text_tuned": SystemKind(True, True, True, False, "segments as text + a trained static prefix"),
    "static_prefix": SystemKind(False, False, True, False, "a trained static prefix, no retrieval"),
    "dynamic_prefix": SystemKind(True, False, False, True, "the knowledge encoder's K/V of the top-k segments"),
    "combine": SystemKind(True, True, False, True, "dynamic prefix and the segments as text"),
}
ABLATIONS = ("random", "gold")
_NAME = re.compile(r"^(?P<base>[a-z_]+)(@(?P<tag>[A-Za-z0-9_.\-]+))?(~(?P<ablation>[a-z]+))?$")


@dataclass(frozen=True)
class SystemName:
    base: str
    tag: str | None = None
    ablation: str | None = None

    @property
    def kind(self) -> SystemKind:
        return SYSTEMS[self.base]

    @property
    def trained_name(self) -> str:
        """The checkpoint sub-folder this system reads (ablations share their system's weights)."""
        return self.base if self.tag is None else f"{self.base}@{self.tag}"

    @property
    def trainable(self) -> bool:
        return self.kind.static or self.kind.dynamic

    def prefix_slots(self, default: int | None) -> int | None:
        """P for this variant: from a `pN`/`pfull` tag, else the configured default."""
        m = re.fullmatch(r"p(\d+|full)([-_.].*)?", self.tag or "")
        if m is None:
            return default
        return 0 if m[1] == "full" else int(m[1])

    def __str__(self) -> str:
        return self.trained_name + (f"~{self.ablation}" if self.ablation else "")


def parse_system(name: str) -> SystemName:
    m = _NAME.match(name.strip())
    if not m or m["base"] not in SYSTEMS:
        raise UserError(f"unknown system `{name}`; systems are {', '.join(SYSTEMS)} (variants as NAME@tag, "
                        f"evaluation ablations as NAME~random or NAME~gold)")
    if m["ablation"] and m["ablation"] not in ABLATIONS:
        raise UserError(f"unknown ablation `~{m['ablation']}` in `{name}`; known: {', '.join(ABLATIONS)}")
    parsed = SystemName(m["base"], m["tag"], m["ablation"])
    if parsed.ablation and not parsed.kind.retrieves:
        raise UserError(f"`{name}`: `~{parsed.ablation}` only applies to systems that retrieve")
    return parsed


def parse_systems(names: list[str]) -> list[SystemName]:
    out = [parse_system(n) for n in names]
    seen = set()
    for s in out:
        if str(s) in seen:
            raise UserError(f"system `{s}` is listed twice")
        seen.add(str(s))
    return out
