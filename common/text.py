"""What counts as text: the control characters that a question, a document or a title must not carry.

C0 and C1 control characters and DEL, less the three that plain text carries (tab, newline, carriage return):
a NUL or an escape sequence in user text is a binary or a mangled file, and a question with one reaches the
tokenizer as bytes the LM never saw in training.
"""

from __future__ import annotations

import re

CONTROL_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def first_control_char(value: str) -> int | None:
    """Index of the first control character of `value` (tab, newline and carriage return are text), or None."""
    m = CONTROL_CHARS.search(value)
    return None if m is None else m.start()


def control_char_note(value: str) -> str | None:
    """`the control character U+XXXX at character N` (1-based) for the first one in `value`, or None."""
    at = first_control_char(value)
    return None if at is None else f"the control character U+{ord(value[at]):04X} at character {at + 1}"
