"""Answer normalisation: one module, two conventions, on purpose.

Two questions are asked of an answer string, and the field answers them differently:

- **Is this prediction the gold answer?** (EM, F1 — `exact_match`, `token_f1`). The official SQuAD v1.1
  evaluation script: lower case, *delete* punctuation, drop articles, collapse whitespace. Deleting keeps
  numbers whole ("1,858" and "1858" are the same answer), and following the script exactly is what makes our
  EM comparable with published numbers; so no Unicode normalisation is added either.
- **Does this retrieved text contain an answer?** (`has_answer`, top-k accuracy, hard-negative mining). DPR's
  convention: the answer must occur as a whole-token sequence of the text, after NFKC (full-width digits,
  ligatures and compatibility forms match their plain spelling), lower case, punctuation turned into *spaces*,
  articles dropped. Spaces, not deletion, because a passage writes "(1810–1849)" or "Paris,": deleting would
  glue "18101849" and hide the year as a token, and whole-token matching is what keeps "1" from matching
  "1858".

So "1,858" is "1858" to EM and "1 858" to `has_answer`; both are right for their question. `squad_normalize`
and `retrieval_normalize` name the two so no caller picks one by accident.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from collections.abc import Iterable

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_SQUAD_PUNCTUATION = frozenset(string.punctuation)
# ASCII punctuation plus the typographic quotes and dashes Wikipedia text uses, which NFKC keeps.
_RETRIEVAL_PUNCTUATION = frozenset(string.punctuation) | {"‘", "’", "“", "”", "–", "—", "´"}


def squad_normalize(text: str) -> str:
    """SQuAD v1.1 script: lower case, delete punctuation, drop articles, collapse whitespace (in that order)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _SQUAD_PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    """1.0 when prediction and gold are equal after `squad_normalize`."""
    return float(squad_normalize(prediction) == squad_normalize(gold))


def token_f1(prediction: str, gold: str) -> float:
    """SQuAD token F1 over normalised tokens; when either side is empty, 1.0 only if both are (SQuAD v2)."""
    pred_tokens = squad_normalize(prediction).split()
    gold_tokens = squad_normalize(gold).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def retrieval_normalize(text: str) -> str:
    """DPR-style: NFKC, lower case, punctuation to spaces, articles dropped, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if ch in _RETRIEVAL_PUNCTUATION else ch for ch in text)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _contains_tokens(haystack: list[str], needle: list[str]) -> bool:
    n = len(needle)
    if n == 0:
        return False
    first = needle[0]
    return any(haystack[i] == first and haystack[i : i + n] == needle for i in range(len(haystack) - n + 1))


class AnswerMatcher:
    """Checks many texts against one example's answers (answers are normalised once, by `retrieval_normalize`)."""

    def __init__(self, answers: Iterable[str]):
        self.answers = [toks for toks in (retrieval_normalize(a).split() for a in answers) if toks]

    def __call__(self, text: str) -> bool:
        if not self.answers:
            return False
        tokens = retrieval_normalize(text).split()
        return any(_contains_tokens(tokens, a) for a in self.answers)


def has_answer(text: str, answers: Iterable[str]) -> bool:
    """True if an answer occurs in `text` as a whole-token sequence (both `retrieval_normalize`d)."""
    return AnswerMatcher(answers)(text)
