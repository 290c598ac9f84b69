"""The one split rule: an article (entity) goes to train/dev/test by a hash of its title and the seed.

Every command uses this function, so the retriever, QA training and evaluation never disagree on
what is held out, and no question of a test article is ever trained on.
"""

from __future__ import annotations

import hashlib
import unicodedata

SPLITS = ("train", "dev", "test")


def split_key(title: str) -> str:
    """Normalise a title so that `Paris`, ` paris ` and `PARIS` land in the same split."""
    return " ".join(unicodedata.normalize("NFKC", title).casefold().split())


def split_of(title: str, seed: int = 0, dev_fraction: float = 0.1, test_fraction: float = 0.2) -> str:
    digest = hashlib.sha256(f"{seed}\x00{split_key(title)}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + dev_fraction:
        return "dev"
    return "train"


def in_split(title: str, split: str, seed: int = 0, dev_fraction: float = 0.1, test_fraction: float = 0.2) -> bool:
    return split == "all" or split_of(title, seed, dev_fraction, test_fraction) == split
