"""Names of the synthetic world: seeded bijections from integers to invented names.

Everything here is a pure function of (world seed, integer), so the name of any entity can be computed
without generating any other entity (the world streams; entity 999_999 costs the same as entity 0).

A *stem* is a three-syllable invented word such as `Velmora` or `Dorvakis`, built from slots
`onset nucleus medial nucleus medial nucleus coda` where onsets, medials and codas are consonant-only
strings and nuclei vowel-only strings. A stem therefore splits uniquely into its vowel and consonant
runs, so distinct slot tuples give distinct words: the integer -> stem map is injective by construction.

Near-duplicates are made on purpose (hard retrieval): the members of a *cluster* share every slot but
the last vowel and coda (`Velmora`, `Velmoras`, `Velmorith`), and `data_prep.synthetic` gives one
cluster's stem to entities of every type (`Velmora`, `Tovan Velmoras`, `Velmorath Works`). Clusters are
spread over the stem space by a keyed Feistel permutation, so two seeds give two unrelated worlds.
"""

from __future__ import annotations

import hashlib
import random
from functools import lru_cache

_M64 = (1 << 64) - 1

# fmt: off
ONSETS = ("", "b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
          "br", "dr", "kr", "st")
# fmt: on
NUCLEI = ("a", "e", "i", "o", "u", "ai")
MEDIALS = ("l", "r", "n", "m", "s", "v", "d", "k", "t", "lm", "rd", "nd", "ss", "rv", "th", "sk")
CODAS = ("", "n", "r", "s", "l", "th", "nd", "k")

# Mixed-radix digits of a stem code, lowest first. The two lowest (coda and last vowel) form the
# variant digit: the members of a cluster differ there only, i.e. in their last word piece.
_STEM_SLOTS = (CODAS, NUCLEI, ONSETS, NUCLEI, MEDIALS, NUCLEI, MEDIALS)
STEM_SPACE = 1
for _slot in _STEM_SLOTS:
    STEM_SPACE *= len(_slot)
MAX_VARIANTS = len(CODAS) * len(NUCLEI)
CLUSTER_SPACE = STEM_SPACE // MAX_VARIANTS
_VARIANT_STEP = 7  # coprime with MAX_VARIANTS: consecutive variants change both the coda and the vowel


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


@lru_cache(maxsize=1024)
def _salt(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")


def mix(*parts: int | str) -> int:
    """A 64-bit hash of integers and strings (stable across runs, platforms and Python versions)."""
    h = 0x243F6A8885A308D3
    for p in parts:
        h = _splitmix64(h ^ (_salt(p) if isinstance(p, str) else p & _M64))
    return h


def rng(*parts: int | str) -> random.Random:
    """A `random.Random` seeded from `mix(*parts)` (int seeding is stable across Python versions)."""
    return random.Random(mix(*parts))


class Permutation:
    """A keyed bijection of [0, size): a 4-round Feistel network on 2h bits with cycle walking.

    Cycle walking (re-applying the network until the value falls inside [0, size)) restricts a
    permutation of [0, 4^h) to a permutation of [0, size); as 4^h < 4 * size, < 4 steps on average.
    """

    def __init__(self, size: int, *key: int | str):
        if size < 1:
            raise ValueError("Permutation size must be >= 1")
        self.size = size
        self.half = max(1, ((size - 1).bit_length() + 1) // 2)
        self.mask = (1 << self.half) - 1
        self.keys = tuple(mix(*key, "feistel", r) for r in range(4))

    def _round(self, x: int) -> int:
        left, right = x >> self.half, x & self.mask
        for k in self.keys:
            left, right = right, left ^ (_splitmix64(k ^ right) & self.mask)
        return (left << self.half) | right

    def __call__(self, x: int) -> int:
        if not 0 <= x < self.size:
            raise IndexError(f"{x} outside [0, {self.size})")
        x = self._round(x)
        while x >= self.size:
            x = self._round(x)
        return x


def _digits(code: int, slots: tuple[tuple[str, ...], ...]) -> list[str]:
    out = []
    for slot in slots:
        code, d = divmod(code, len(slot))
        out.append(slot[d])
    return out


def stem_of_code(code: int) -> str:
    """The capitalised stem of a code in [0, STEM_SPACE): injective (see the module docstring)."""
    c, n3, o1, n1, m1, n2, m2 = _digits(code, _STEM_SLOTS)
    return (o1 + n1 + m1 + n2 + m2 + n3 + c).capitalize()


class StemSpace:
    """Stems of one world: (cluster, variant) -> a stem; distinct pairs give distinct stems.

    The members of a cluster share every slot but the last vowel and the coda (`Velmora`, `Velmoras`,
    `Velmorith`), so to a WordPiece retriever they differ in their last piece only: near-duplicates by
    design. Clusters are spread over the space by a keyed permutation; variant 0 is seeded too.
    """

    def __init__(self, seed: int):
        self.seed = seed
        self.perm = Permutation(CLUSTER_SPACE, seed, "stems")

    def stem(self, cluster: int, variant: int = 0) -> str:
        if not 0 <= variant < MAX_VARIANTS:
            raise ValueError(f"variant must be in [0, {MAX_VARIANTS})")
        low = (mix(self.seed, cluster, "variant") + variant * _VARIANT_STEP) % MAX_VARIANTS
        return stem_of_code(self.perm(cluster) * MAX_VARIANTS + low)


def short_word(r: random.Random, coda: bool = True) -> str:
    """A random two-syllable word (`Tovan`, `Relka`): given names and vocabulary pools (not unique)."""
    word = r.choice(ONSETS) + r.choice(NUCLEI) + r.choice(MEDIALS) + r.choice(NUCLEI)
    if coda:
        word += r.choice(CODAS)
    return word.capitalize()


def word_pool(seed: int, name: str, size: int, make) -> tuple[str, ...]:
    """`size` distinct words drawn by `make(random.Random)`; deterministic for (seed, name)."""
    r = rng(seed, "pool", name)
    seen: dict[str, None] = {}
    while len(seen) < size:
        seen.setdefault(make(r), None)
    return tuple(seen)
