"""The demo's logic without Gradio: validated requests, streamed answers, live documents.

    service = DemoService.from_config(cfg)          # loads the LM, the retriever and every trained system
    for update in service.stream("Who founded X?", "rag_text", 3): ...   # sources first, then the answer
    service.answer(question, mode, top_k) -> Update                       # the final update only
    service.add_text(text, title) / service.add_files(paths) / service.reset() -> message

The demo serves `closed_book`, `rag_text` and every system of the checkpoint (plus `combine`, which
reads the dynamic_prefix weights when the checkpoint has no `combine` of its own). Without a trained
checkpoint it still serves the two systems that need none, and says so.

Retrieval runs before generation, so the page shows the sources while the answer is written; the
generation itself runs in a worker thread that pushes tokens through a queue (QASystem's `on_token`).
One generation runs at a time (a lock): the CPU LM gains nothing from two, and QASystem's feature
cache is not meant to be shared between threads. Retrieval and document additions are thread-safe.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import UserError
from common.text import control_char_note
from configs.schema import Config
from data_prep.records import Segment
from demo.documents import Limits, pasted_document, uploaded_documents
from qa.checkpoint import MANIFEST, read_manifest
from qa.system import QASystem, default_checkpoint
from qa.systems import SYSTEMS, parse_system

log = logging.getLogger(__name__)


@dataclass
class Update:
    """One step of a streamed answer: the sources come first, then the growing answer, then the final one."""

    text: str
    sources: list  # retriever Hits (segment_id, score, doc_id, title, text), best first
    mode: str
    done: bool = False
    timings: dict[str, float] = field(default_factory=dict)  # retrieve_ms, encode_ms, generate_ms
    prompt_tokens: int = 0
    prefix_slots: int = 0


class _Stopped(Exception):
    """Raised in the generation thread when the consumer of the stream went away (client left)."""


def check_app_config(app) -> None:
    for key in (
        "port",
        "concurrency_limit",
        "queue_size",
        "max_top_k",
        "max_paste_chars",
        "max_upload_files",
        "max_title_chars",
    ):
        value = getattr(app, key)
        if key == "port" and not 1 <= value <= 65535:
            raise UserError(f"app.port must be a TCP port from 1 to 65535, got {value} (the default is 7860)")
        if value < 1:
            raise UserError(f"app.{key} must be >= 1, got {value}")
    if app.max_upload_mb <= 0:
        raise UserError(f"app.max_upload_mb must be > 0, got {app.max_upload_mb}")


def demo_systems(cfg: Config) -> tuple[list[str], str]:
    """(systems to load, a note on the checkpoint) for the page and the /answer endpoint."""
    directory = default_checkpoint(cfg)
    if not (directory / MANIFEST).is_file():
        if cfg.qa.checkpoint:
            read_manifest(directory)  # an explicit checkpoint that is not one: its clear error
        return ["closed_book", "rag_text"], (
            f"no trained checkpoint at {directory}: serving closed_book and rag_text only "
            "(train with `python -m qa.train`, or set qa.checkpoint=DIR)"
        )
    held = list(read_manifest(directory)["systems"])
    systems = ["closed_book", "rag_text", *held]
    for name in held:
        s = parse_system(name)
        if s.base == "dynamic_prefix":
            twin = "combine" + (f"@{s.tag}" if s.tag else "")
            if twin not in systems:
                systems.append(twin)  # QASystem reads the dynamic_prefix weights for it
    order = list(SYSTEMS)

    def rank(name: str) -> tuple:
        # Per base, the full-length prefix first: it is the most accurate, and the page's default mode (the first
        # dynamic prefix when qa.mode is not served) must not become a compressed one by alphabetical accident.
        s = parse_system(name)
        return order.index(s.base), s.tag not in (None, "pfull"), name

    systems.sort(key=rank)
    return systems, f"checkpoint {_shown(directory)} ({', '.join(held)})"


def _shown(directory: Path) -> str:
    """A checkpoint path as the page shows it: relative to the working directory when inside it (the shipped
    model's path is absolute, and the machine's folder layout is nobody's business on a shared page)."""
    try:
        return str(Path(directory).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(directory)


def _as_top_k(value, max_top_k: int) -> int:
    if isinstance(value, bool):
        raise UserError(f"top_k must be a whole number from 1 to {max_top_k}, got {value!r}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if not isinstance(value, int) or not 1 <= value <= max_top_k:
        raise UserError(f"top_k must be a whole number from 1 to {max_top_k} (app.max_top_k), got {value!r}")
    return value


def source_dicts(hits: Sequence) -> list[dict]:
    """The /answer endpoint's sources: JSON-ready dicts, best first."""
    return [
        {
            "segment_id": int(h.segment_id),
            "doc_id": h.doc_id,
            "title": h.title,
            "score": round(float(h.score), 4),
            "text": h.text,
        }
        for h in hits
    ]


class DemoService:
    def __init__(self, cfg: Config, qa: QASystem, checkpoint_note: str = ""):
        check_app_config(cfg.app)
        self.cfg = cfg
        self.qa = qa
        self.checkpoint_note = checkpoint_note
        self.limits = Limits.from_app_config(cfg.app)
        self.modes = qa.available_modes()
        # qa.mode when served, else the first dynamic prefix (variants such as dynamic_prefix@p32), else rag_text.
        preferred = [cfg.qa.mode, *(m for m in self.modes if m.startswith("dynamic_prefix")), "rag_text"]
        self.default_mode = next((m for m in preferred if m in self.modes), self.modes[0])
        self.default_top_k = min(max(1, cfg.retriever.top_k), cfg.app.max_top_k)
        self._lock = threading.Lock()
        self._titles: dict[str, str] = {}  # titles of the documents added by this process, by id

    @classmethod
    def from_config(cls, cfg: Config, qa: QASystem | None = None) -> DemoService:
        check_app_config(cfg.app)
        systems, note = demo_systems(cfg)
        if qa is None:
            t0 = time.perf_counter()
            qa = QASystem.from_config(cfg, systems=systems)
            log.info("loaded %s in %.1f s", ", ".join(systems), time.perf_counter() - t0)
        return cls(cfg, qa, note)

    @property
    def retriever(self):
        if self.qa.retriever is None:
            raise UserError("this demo has no retriever: build the index first (`python -m retriever.index`)")
        return self.qa.retriever

    # ------------------------------------------------------------------ questions
    def check_request(self, question, mode, top_k) -> tuple[str, str, int]:
        """(question, mode, k) validated against the app limits and the loaded systems."""
        if not isinstance(question, str):
            raise UserError("the question must be text")
        question = question.strip()
        if not question:
            raise UserError("type a question first")
        limit = self.cfg.lm.max_question_chars  # the one limit; QASystem's prompt template checks it again
        if len(question) > limit:
            raise UserError(
                f"the question has {len(question)} characters; the demo accepts at most {limit} "
                "(lm.max_question_chars)"
            )
        bad = control_char_note(question)
        if bad:
            raise UserError(f"the question contains {bad}; type or paste plain text")
        if mode is None or (isinstance(mode, str) and not mode.strip()):
            mode = self.default_mode
        mode = mode.strip() if isinstance(mode, str) else mode
        if mode not in self.modes:
            raise UserError(
                f"mode {mode!r} is not available here; this demo serves: {', '.join(self.modes)}"
                + (f" ({self.checkpoint_note})" if self.checkpoint_note else "")
            )
        k = self.default_top_k if top_k is None else _as_top_k(top_k, self.cfg.app.max_top_k)
        return question, mode, k

    def _reading_hits(self, hits: list) -> list:
        """Hits as the LM reads them: live segments without their id.

        `Retriever.reset()` hands the ids of forgotten live segments out again, and a prefix store is looked up
        by segment id; without an id a live segment is read by its text (the feature and prefix caches key by
        a hash of title and text), so a document added after a reset is never read as another one.
        """
        n_built = len(self.retriever.store)
        return [dataclasses.replace(h, segment_id=None) if h.segment_id >= n_built else h for h in hits]

    def stream(self, question, mode=None, top_k=None) -> Iterator[Update]:
        """Sources (once retrieved), then the answer as it grows, then a final Update with timings."""
        question, mode, k = self.check_request(question, mode, top_k)
        system = parse_system(mode)
        t0 = time.perf_counter()
        hits = self.qa.retrieve([question], k)[0] if system.kind.retrieves else []
        retrieve_ms = (time.perf_counter() - t0) * 1e3
        if system.kind.retrieves and not hits:
            raise UserError("the index returned no segments; add documents or press Reset")
        yield Update("", hits, mode)

        events: queue.Queue = queue.Queue()
        stop = threading.Event()

        def on_token(_row: int, text: str) -> None:
            if stop.is_set():
                raise _Stopped
            events.put(("token", text))

        def work() -> None:
            try:
                with self._lock:
                    if stop.is_set():
                        raise _Stopped  # the client left while waiting for the model
                    pred = self.qa.answer(
                        [question],
                        mode=mode,
                        top_k=k,
                        hits=[self._reading_hits(hits)] if system.kind.retrieves else None,
                        on_token=on_token,
                    )[0]
                events.put(("done", pred))
            except _Stopped:
                events.put(("stopped", None))
            except Exception as e:  # re-raised in the consumer's thread, where the caller sees it
                events.put(("error", e))

        threading.Thread(target=work, name="demo-generate", daemon=True).start()
        try:
            while True:
                kind, value = events.get()
                if kind == "token":
                    yield Update(value.split("\n")[0].strip(), hits, mode)
                elif kind == "error":
                    raise value
                elif kind == "stopped":
                    return
                else:
                    timings = {
                        "retrieve_ms": retrieve_ms,
                        "encode_ms": value.timings.get("encode_ms", 0.0),
                        "generate_ms": value.timings.get("generate_ms", 0.0),
                    }
                    yield Update(
                        value.prediction,
                        hits,
                        mode,
                        done=True,
                        timings=timings,
                        prompt_tokens=value.prompt_tokens,
                        prefix_slots=value.prefix_slots,
                    )
                    return
        finally:
            stop.set()  # a consumer that stops early (GeneratorExit) ends the generation at its next token

    def answer(self, question, mode=None, top_k=None) -> Update:
        """The final answer (the /answer endpoint and scripts)."""
        final = None
        for update in self.stream(question, mode, top_k):
            final = update
        return final

    # ------------------------------------------------------------------ documents
    def _add(self, docs) -> tuple[str, list[Segment]]:
        segments = self.retriever.add_documents(docs)
        self._titles.update({d.id: d.title for d in docs})
        titles = ", ".join(repr(d.title) for d in docs[:5]) + (
            f" and {len(docs) - 5} more" if len(docs) > 5 else ""
        )
        return (
            f"Added {len(docs)} document(s), {len(segments)} segment(s): {titles}. "
            f"They are in the index now ({len(self.retriever)} segments); ask away.",
            segments,
        )

    def add(
        self, text: str | None = None, title: str | None = "", paths: Sequence[str] = ()
    ) -> tuple[str, list]:
        """Add a pasted text and/or uploaded files in one go: every input is checked before anything is added."""
        pasted = text is not None and (not isinstance(text, str) or text.strip())
        docs = [pasted_document(text, title, self.limits)] if pasted else []
        if paths:
            docs += uploaded_documents(paths, self.limits)
        if not docs:
            raise UserError("nothing to add: paste a text or choose files first")
        return self._add(docs)

    def add_text(self, text: str | None, title: str | None = "") -> tuple[str, list[Segment]]:
        return self._add([pasted_document(text, title, self.limits)])

    def add_files(self, paths: Sequence[str]) -> tuple[str, list[Segment]]:
        return self._add(uploaded_documents(paths, self.limits))

    def reset(self) -> str:
        n = len(self.retriever.live_documents)
        self.retriever.reset()
        self._titles.clear()
        return f"Back to the built index ({len(self.retriever)} segments); {n} added document(s) removed."

    # ------------------------------------------------------------------ page text
    def status(self) -> dict:
        r = self.qa.retriever
        return {
            "lm": self.cfg.lm.model,
            "retriever": self.cfg.retriever.model,
            "checkpoint": self.checkpoint_note,
            "modes": list(self.modes),
            "segments": len(r) if r is not None else 0,
            "live_documents": r.live_documents if r is not None else [],
            # Documents added before a restart come back from run_dir/live without their titles here.
            "live_titles": {
                d: self._titles[d] for d in (r.live_documents if r is not None else []) if d in self._titles
            },
            "run_dir": str(Path(self.cfg.run_dir)),
        }

    def example_questions(self) -> list[str]:
        """A few questions of the store's `data.split` (the held-out test split by default)."""
        n = self.cfg.app.examples
        if n <= 0:
            return []
        from data_prep.store import load_qa

        try:
            examples = load_qa(Path(self.cfg.run_dir) / "store", self.cfg.data.split)
        except (UserError, OSError) as e:
            log.warning("no example questions: %s", e)
            return []
        seen = list(dict.fromkeys(ex.question for ex in examples))
        step = max(1, len(seen) // n)  # spread over the split rather than the first few entities
        return [q for q in seen[::step] if len(q) <= self.cfg.lm.max_question_chars][:n]
