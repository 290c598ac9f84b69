"""One prompt template per LM: its chat template when it has one, a plain `Question:/Answer:` format otherwise.

Every system builds its token ids here, so closed-book, text RAG and prefix systems differ only in what
they put before the question, never in how the question is asked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from common.errors import UserError
from common.text import control_char_note
from configs.schema import MAX_QUESTION_CHARS


@dataclass
class TextSegment:
    title: str
    text: str


def check_question(question: str, max_chars: int, where: str = "") -> str:
    """The question with its whitespace collapsed; a UserError (prefixed by `where`) if empty, too long, or
    holding a control character (a NUL or an escape sequence is a mangled input, not a question)."""
    if not isinstance(question, str) or not question.strip():
        raise UserError(f"{where}the question is empty")
    if len(question) > max_chars:
        raise UserError(
            f"{where}the question has {len(question)} characters; the limit is {max_chars} "
            "(lm.max_question_chars)"
        )
    bad = control_char_note(question)
    if bad:
        raise UserError(f"{where}the question contains {bad}; only text is accepted (tabs and newlines are fine)")
    return " ".join(question.split())


class PromptTemplate:
    def __init__(self, tokenizer, system_prompt: str = "", max_question_chars: int = MAX_QUESTION_CHARS):
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.max_question_chars = max_question_chars
        self.use_chat = bool(getattr(tokenizer, "chat_template", None))
        # Chat models end an answer with their end-of-turn token; plain LMs with a newline.
        self.answer_end = tokenizer.eos_token if self.use_chat else "\n"

    def check_question(self, question: str) -> str:
        return check_question(question, self.max_question_chars)

    def _content(self, question: str, segments: Sequence[TextSegment]) -> str:
        question = self.check_question(question)
        if not segments:
            return question
        context = "\n\n".join(f"{s.title}\n{s.text}" for s in segments)
        return f"Context:\n{context}\n\nQuestion: {question}"

    def prompt_ids(self, question: str, segments: Sequence[TextSegment] = ()) -> list[int]:
        """Token ids of the prompt up to where the answer starts."""
        content = self._content(question, segments)
        if self.use_chat:
            messages = [{"role": "user", "content": content}]
            if self.system_prompt:
                messages.insert(0, {"role": "system", "content": self.system_prompt})
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            return list(ids)
        text = (f"{self.system_prompt}\n\n" if self.system_prompt else "") + f"{content}\nAnswer:"
        return self.tokenizer(text, add_special_tokens=True)["input_ids"]

    def answer_ids(self, answer: str) -> list[int]:
        """Token ids of a gold answer as the LM should produce it, end marker included."""
        text = answer.strip() if self.use_chat else " " + answer.strip()
        return self.tokenizer(text + self.answer_end, add_special_tokens=False)["input_ids"]

    def segment_ids(self, segment: TextSegment, max_tokens: int) -> list[int]:
        """Token ids of one segment as the LM reads it to make its own K,V (title line first)."""
        ids = self.tokenizer(f"{segment.title}\n{segment.text}", add_special_tokens=False)["input_ids"]
        return ids[:max_tokens]

    def decode_answer(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).split("\n")[0].strip()
