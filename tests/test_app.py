"""The Gradio demo: its functions called directly, and the served app queried with gradio_client.

A tiny world (toy countries, a random word-level encoder, a random LLaMA with the SmolLM2 tokenizer, a
freshly initialised dynamic_prefix checkpoint) makes everything run in seconds; answers are noise, so
these tests check structure: streaming, sources, live documents, limits and errors. One slow test uses
the embedded MiniLM + SmolLM2 to check that a pasted fact is answered from (rag_text).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from common.errors import UserError
from configs.loader import load_config
from data_prep.store import segment_input_text
from demo.documents import Limits, pasted_document, uploaded_documents
from demo.render import answer_pattern, highlight_spans, highlighted_html, latency_markdown, sources_html
from demo.service import DemoService, demo_systems, source_dicts
from demo.ui import free_port
from retriever.search import Hit

EXTRA = "Quorn is a new country. The capital of Quorn is Zibbelquat. Quorn is led by Wub."
OTHER = "Glimmerholt is an island. Its harbour master is Oskarine Vell. Ferries leave at dawn."


pytestmark = pytest.mark.usefixtures("one_thread")


def build_tiny_demo(root: Path, checkpoint: bool = True) -> list[str]:
    """Store, index, LM and (optionally) a dynamic_prefix checkpoint under `root`; returns config overrides."""
    import torch
    from transformers import AutoTokenizer

    from configs.models import resolve_lm_path
    from lm.prompting import PromptTemplate
    from qa.checkpoint import new_model, save_checkpoint
    from qa.systems import parse_system
    from retriever import index as index_cli
    from retriever.encoder import Encoder
    from retriever.search import _tokenizer_backend
    from retriever.testing import make_tiny_encoder, toy_documents, words_of, write_toy_store
    from tests.conftest import make_tiny_llama

    docs, questions = toy_documents(24)
    words = words_of([d.title + " " + d.text for d in docs] + [q for _, q, _ in questions] + [EXTRA, OTHER])
    make_tiny_encoder(root / "enc", words)
    tok = AutoTokenizer.from_pretrained(resolve_lm_path("embedded:smollm2-135m"))
    lm = make_tiny_llama(len(tok))
    # Untied output head: a tied random LM repeats its last prompt token, here the chat template's "\n",
    # a stop token, so every answer would be empty and streaming untestable.
    torch.manual_seed(1)
    lm.config.tie_word_embeddings = False
    lm.lm_head.weight = torch.nn.Parameter(torch.randn_like(lm.lm_head.weight) * 0.5, requires_grad=False)
    lm.save_pretrained(root / "lm")
    tok.save_pretrained(root / "lm")
    overrides = [
        f"run_dir={root / 'run'}",
        f"retriever.model={root / 'enc'}",
        f"lm.model={root / 'lm'}",
        "device=cpu",
        "index.nprobe=100",
        "index.shard_size=16",
        "retriever.batch_size=16",
        "retriever.top_k=2",
        "knowledge_encoder.prefix_slots=4",
        "knowledge_encoder.format_slots=2",
        "lm.max_new_tokens=6",
        "app.examples=3",
        "app.max_upload_mb=0.01",
        "lm.max_question_chars=200",
    ]
    cfg = load_config(None, overrides)
    write_toy_store(root / "run" / "store", docs, questions, _tokenizer_backend(Encoder.from_config(cfg)))
    index_cli.build_index(cfg, progress=False)
    if checkpoint:
        template = PromptTemplate(tok, cfg.lm.system_prompt, cfg.lm.max_question_chars)
        model = new_model(parse_system("dynamic_prefix"), cfg, lm, template, None)
        save_checkpoint(root / "run" / "checkpoints" / "final", {"dynamic_prefix": model}, cfg, lm.config)
    return overrides


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("app")
    overrides = build_tiny_demo(root)
    cfg = load_config(None, overrides)
    return root, cfg, overrides


@pytest.fixture(scope="module")
def service(tiny):
    _, cfg, _ = tiny
    service = DemoService.from_config(cfg)
    yield service
    service.retriever.reset()


@pytest.fixture()
def clean_index(service):
    service.retriever.reset()
    yield service
    service.retriever.reset()


LIMITS = Limits(max_upload_bytes=2000, max_files=3, max_paste_chars=300)


# ---------------------------------------------------------------------------------------------- documents


def test_pasted_document_title_id_and_limits():
    doc = pasted_document("  Quorn facts\n" + EXTRA + "  ", "", LIMITS)
    assert (
        doc.title == "Quorn facts" and doc.text.startswith("Quorn facts\n") and doc.id.startswith("pasted-")
    )
    assert pasted_document(EXTRA, "  Quorn   (2026) ", LIMITS).title == "Quorn (2026)"
    assert pasted_document(EXTRA, "Quorn", LIMITS).id == pasted_document(EXTRA + "\n", "Quorn", LIMITS).id
    assert pasted_document(EXTRA, "Quorn", LIMITS).id != pasted_document(EXTRA, "Other", LIMITS).id
    with pytest.raises(UserError, match="paste some text"):
        pasted_document("  \n ", "t", LIMITS)
    with pytest.raises(UserError, match="301 characters; the limit is 300"):
        pasted_document("x" * 301, "t", LIMITS)


def test_uploaded_text_markdown_and_jsonl(tmp_path):
    (tmp_path / "quorn_notes.txt").write_text(EXTRA, encoding="utf-8")
    (tmp_path / "isle.md").write_text("# Glimmerholt\n\n" + OTHER, encoding="utf-8")
    rows = [{"id": "a1", "title": "A", "text": "alpha text"}, {"id": 7, "text": "beta text"}]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    docs = uploaded_documents([str(tmp_path / n) for n in ("quorn_notes.txt", "isle.md", "c.jsonl")], LIMITS)
    assert [d.title for d in docs] == ["quorn notes", "Glimmerholt", "A", "7"]
    assert docs[0].text == EXTRA and docs[0].id.startswith("upload-quorn-notes-")
    assert [d.id for d in docs[2:]] == ["a1", "7"] and docs[3].text == "beta text"


def test_malformed_jsonl_names_every_bad_line_by_file_name(tmp_path):
    lines = [
        json.dumps({"id": "ok", "title": "t", "text": "fine"}),
        "{not json",
        json.dumps({"title": "no id", "text": "x"}),
        json.dumps(["a", "list"]),
        json.dumps({"id": "ok", "title": "t", "text": "again"}),
        json.dumps({"id": "e", "title": "t", "text": "  "}),
    ]
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(UserError) as e:
        uploaded_documents([str(path)], LIMITS)
    msg = str(e.value)
    assert "5 malformed line(s); nothing was added" in msg
    for n in (2, 3, 4, 5, 6):
        assert f"corpus.jsonl:{n}:" in msg
    assert "corpus.jsonl:1:" not in msg and str(tmp_path) not in msg
    assert "duplicate document id 'ok' (first at line 1)" in msg


def test_upload_type_size_count_and_encoding_are_checked_on_the_server(tmp_path):
    for name, data in {
        "a.pdf": b"%PDF",
        "big.txt": b"x" * 2001,
        "latin.txt": "caf\xe9".encode("latin-1"),
        "empty.md": b"",
        "ok.txt": b"fine",
    }.items():
        (tmp_path / name).write_bytes(data)
    cases = {
        "a.pdf": "unsupported file type",
        "big.txt": "over the upload limit",
        "latin.txt": "not UTF-8 text",
        "empty.md": "the file is empty",
    }
    for name, message in cases.items():
        with pytest.raises(UserError, match=message):
            uploaded_documents([str(tmp_path / name)], LIMITS)
    with pytest.raises(UserError, match="4 files in one upload; the limit is 3"):
        uploaded_documents([str(tmp_path / "ok.txt")] * 4, LIMITS)
    with pytest.raises(UserError, match="no file uploaded"):
        uploaded_documents([], LIMITS)


# ---------------------------------------------------------------------------------------------- rendering


def test_answer_highlighting_is_escaped_and_word_bounded():
    text = "The capital of Quorn is Zibbelquat. ZIBBELQUAT again; Zibbelquatia is not it. <script>x</script>"
    assert len(highlight_spans(text, " zibbelquat. ")) == 2
    assert highlight_spans("New  York City", "new york") == [(0, 9)]
    assert answer_pattern("") is None and answer_pattern(" . ") is None and answer_pattern("a") is None
    out = highlighted_html(text, "Zibbelquat")
    assert out.count("<mark>") == 2 and "<script>" not in out and "&lt;script&gt;" in out
    hits = [Hit(3, 0.91, "doc3", "Quorn <b>", text), Hit(5, 0.42, "doc5", "Other", "nothing here")]
    page = sources_html(hits, "Zibbelquat")
    assert page.count("data-segment-id=") == 2 and page.count("source-answer") == 1
    assert "Quorn &lt;b&gt;" in page and "score 0.910" in page and 'data-segment-id="3"' in page
    assert "reads nothing" in sources_html([], None, "reads nothing")
    table = latency_markdown({"retrieve_ms": 1.2, "encode_ms": 3.4, "generate_ms": 10.0}, 40, 8)
    assert "| 1 ms | 3 ms | 10 ms | **15 ms** | 40 tokens | 8 slots |" in table


# ---------------------------------------------------------------------------------------------- service


def test_systems_follow_the_checkpoint(tiny, tmp_path):
    _, cfg, overrides = tiny
    systems, note = demo_systems(cfg)
    assert systems == ["closed_book", "rag_text", "dynamic_prefix", "combine"] and "checkpoint" in note
    bare = load_config(None, [*overrides, f"run_dir={tmp_path}"])
    assert (
        demo_systems(bare)[0] == ["closed_book", "rag_text"]
        and "no trained checkpoint" in demo_systems(bare)[1]
    )
    with pytest.raises(UserError, match="not a checkpoint"):
        demo_systems(load_config(None, [*overrides, f"qa.checkpoint={tmp_path}"]))


def test_demo_lists_the_full_length_prefix_before_a_compressed_one(tmp_path):
    """Regression: with dynamic_prefix@p32 shipped beside @pfull, the alphabetical order listed p32 first, so a
    demo whose qa.mode is not served defaulted to the less accurate compressed prefix."""
    systems, _ = demo_systems(load_config(None, [f"run_dir={tmp_path}"]))  # no run checkpoint: the shipped model
    assert systems == ["closed_book", "rag_text", "rag_text_tuned", "dynamic_prefix@pfull", "dynamic_prefix@p32",
                       "combine@pfull", "combine@p32"]


def test_service_modes_defaults_and_examples(service):
    assert service.modes == ["closed_book", "rag_text", "dynamic_prefix", "combine"]
    assert service.default_mode == "dynamic_prefix" and service.default_top_k == 2
    examples = service.example_questions()
    assert len(examples) == 3 and all(q.endswith("?") for q in examples)


def test_stream_gives_sources_first_then_a_growing_answer(clean_index):
    service = clean_index
    question = "What is the capital of " + service.retriever.store.get(3).title + "?"
    updates = list(service.stream(question, "rag_text", 3))
    first, last = updates[0], updates[-1]
    assert first.text == "" and not first.done and len(first.sources) == 3
    assert all(u.sources == first.sources for u in updates)
    assert len(updates) >= 3 and not any(u.done for u in updates[:-1])  # tokens arrived one by one
    assert last.done and set(last.timings) == {"retrieve_ms", "encode_ms", "generate_ms"}
    assert all(v >= 0 for v in last.timings.values()) and last.timings["generate_ms"] > 0
    assert last.text == service.qa.answer([question], mode="rag_text", top_k=3)[0].prediction
    assert last.text  # this seed's random LM writes something (the browser test relies on it)
    assert [s.segment_id for s in last.sources] == [
        h.segment_id for h in service.retriever.search(question, 3)
    ]


def test_every_mode_answers_and_closed_book_reads_nothing(clean_index):
    service = clean_index
    for mode in service.modes:
        final = service.answer("Who leads Quorn?", mode, 2)
        assert final.done and isinstance(final.text, str) and final.mode == mode
        assert len(final.sources) == (0 if mode == "closed_book" else 2)
        if mode in ("dynamic_prefix", "combine"):
            assert final.prefix_slots > 0


@pytest.mark.parametrize(
    "question, mode, top_k, message",
    [
        ("   ", "rag_text", 2, "type a question first"),
        ("x" * 201, "rag_text", 2, "201 characters; the demo accepts at most 200"),
        (None, "rag_text", 2, "must be text"),
        ("Who?", "static_prefix", 2, "not available here; this demo serves: closed_book, rag_text"),
        ("Who?", "rag_text", 0, "top_k must be a whole number from 1 to 10"),
        ("Who?", "rag_text", 11, "top_k must be"),
        ("Who?", "rag_text", 2.5, "top_k must be"),
        ("Who?", "rag_text", True, "top_k must be"),
    ],
)
def test_bad_requests_get_clear_messages(service, question, mode, top_k, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        service.answer(question, mode, top_k)


def test_a_consumer_that_leaves_stops_the_generation(clean_index):
    service = clean_index
    stream = service.stream("Who leads Quorn?", "rag_text", 1)
    next(stream)  # the sources
    stream.close()  # the client went away: the worker stops at its next token, the lock is free again
    assert service.answer("Who leads Quorn?", "rag_text", 1).done


def test_pasted_document_is_found_and_read_at_once_and_persisted(clean_index, tiny):
    service = clean_index
    _, cfg, _ = tiny
    message, segments = service.add_text(EXTRA, "Quorn")
    assert "Added 1 document(s), 1 segment(s): 'Quorn'" in message
    doc_id = segments[0].doc_id
    # The random encoder cannot rank by meaning; a segment's own text is its nearest neighbour.
    question = segment_input_text(segments[0])
    for mode in ("rag_text", "dynamic_prefix", "combine"):
        final = service.answer(question, mode, 2)
        assert final.sources[0].doc_id == doc_id and final.sources[0].score == pytest.approx(1.0, abs=1e-3)
    live = Path(cfg.run_dir) / "live"
    assert doc_id in (live / "segments.jsonl").read_text()
    from retriever.search import Retriever

    assert Retriever.from_config(cfg).live_documents == [doc_id]  # a restarted app keeps it
    with pytest.raises(UserError, match="already in the index"):
        service.add_text(EXTRA, "Quorn")
    assert "1 added document(s) removed" in service.reset()
    assert not live.exists() and service.answer(question, "rag_text", 1).sources[0].doc_id != doc_id


def test_a_document_added_after_reset_is_read_with_its_own_text(clean_index, tiny):
    """Reset hands segment ids out again: the LM must read the new text, not features cached for the old."""
    service = clean_index
    _, cfg, _ = tiny
    service.add_text(EXTRA, "Quorn")
    old = service.add_text(OTHER, "Glimmerholt")[1][0]
    service.answer(segment_input_text(old), "dynamic_prefix", 1)  # the LM's features of OTHER are cached
    service.reset()
    service.add_text(EXTRA + " It rains.", "Quorn two")
    new = service.add_text("Zibbelquat capital river Wub leads the small country of Quorn.", "Wub")[1][0]
    assert new.segment_id == old.segment_id  # the id is handed out again
    question = segment_input_text(new)
    got = service.answer(question, "dynamic_prefix", 1)
    want = DemoService.from_config(cfg).answer(question, "dynamic_prefix", 1)  # empty caches, same index
    assert got.sources[0].segment_id == new.segment_id and got.text == want.text


def test_add_files_through_the_service(clean_index, tmp_path):
    (tmp_path / "isle.md").write_text("# Glimmerholt\n\n" + OTHER, encoding="utf-8")
    message, segments = clean_index.add_files([str(tmp_path / "isle.md")])
    assert "'Glimmerholt'" in message and segments[0].title == "Glimmerholt"
    assert clean_index.status()["live_documents"] == [segments[0].doc_id]


def test_source_dicts_are_json_ready():
    out = source_dicts([Hit(4, 0.123456, "d", "T", "text")])
    assert out == [{"segment_id": 4, "doc_id": "d", "title": "T", "score": 0.1235, "text": "text"}]
    json.dumps(out)


# ---------------------------------------------------------------------------------------------- served


@pytest.fixture(scope="module")
def served(service):
    from demo.ui import build_ui, launch

    blocks = build_ui(service)
    url = launch(blocks, service, port=free_port(), block=False, quiet=True)
    yield url, blocks
    blocks.close()


@pytest.fixture()
def client(served, clean_index):
    from gradio_client import Client

    return Client(served[0], verbose=False)


def test_served_answer_endpoint(client, served):
    url, blocks = served
    assert url.startswith("http://127.0.0.1:")
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False" and blocks.analytics_enabled is False
    endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert {"/answer", "/add_text", "/reset", "/info"} <= set(endpoints)
    answer, sources = client.predict("Who leads Quorn?", "dynamic_prefix", 3, api_name="/answer")
    assert isinstance(answer, str) and len(sources) == 3
    assert set(sources[0]) == {"segment_id", "doc_id", "title", "score", "text"}
    assert sources[0]["score"] >= sources[1]["score"] >= sources[2]["score"]
    assert client.predict(api_name="/info")["modes"] == [
        "closed_book",
        "rag_text",
        "dynamic_prefix",
        "combine",
    ]


def test_served_pasted_document_is_the_top_source(client):
    message = client.predict(EXTRA, "Quorn", api_name="/add_text")
    assert "Added 1 document(s)" in message
    question = "Quorn\n" + EXTRA  # the tiny encoder's nearest neighbour of a text is the text itself
    for mode in ("rag_text", "dynamic_prefix"):
        answer, sources = client.predict(question, mode, 2, api_name="/answer")
        assert sources[0]["title"] == "Quorn" and sources[0]["text"] == EXTRA and isinstance(answer, str)
    assert "1 added document(s) removed" in client.predict(api_name="/reset")
    _, sources = client.predict(question, "rag_text", 2, api_name="/answer")
    assert sources[0]["title"] != "Quorn"


def test_served_queue_answers_concurrent_requests(client, served, tiny):
    _, blocks = served
    _, cfg, _ = tiny
    assert blocks._queue.max_size == cfg.app.queue_size
    assert blocks._queue.default_concurrency_limit == cfg.app.concurrency_limit
    questions = [f"Who leads {t}?" for t in ("Quorn", "Nyul", "Volomi", "Kalo")]
    jobs = [
        client.submit(q, mode, 2, api_name="/answer") for q in questions for mode in ("rag_text", "combine")
    ]
    results = [job.result(timeout=120) for job in jobs]
    assert all(isinstance(a, str) and len(s) == 2 for a, s in results)
    # Generation is serialised by a lock; the answers are those of one request at a time.
    assert results[0][0] == client.predict(questions[0], "rag_text", 2, api_name="/answer")[0]


def test_served_errors_are_clear(client):
    from gradio_client.exceptions import AppError

    cases = [
        (("", "rag_text", 2), "type a question first"),
        (("Who?", "nope", 2), "mode 'nope' is not available here"),
        (("Who?", "rag_text", 99), "top_k must be a whole number from 1 to 10"),
    ]
    for args, message in cases:
        with pytest.raises(AppError, match=message):
            client.predict(*args, api_name="/answer")
    with pytest.raises(AppError, match="paste some text"):
        client.predict("   ", "", api_name="/add_text")


def test_served_app_refuses_paths_and_big_uploads(served, tiny):
    import httpx

    url, _ = served
    _, cfg, _ = tiny
    for path in ("/etc/passwd", str(Path(cfg.run_dir).resolve() / "store" / "manifest.json")):
        assert httpx.get(f"{url}gradio_api/file={path}").status_code in (403, 404)
    big = {"files": ("big.txt", b"x" * 20_000, "text/plain")}  # app.max_upload_mb=0.01
    assert httpx.post(f"{url}gradio_api/upload", files=big).status_code == 413
    small = {"files": ("ok.txt", b"fine", "text/plain")}
    assert httpx.post(f"{url}gradio_api/upload", files=small).status_code == 200


# ---------------------------------------------------------------------------------------------- real models


@pytest.mark.slow
def test_rag_text_answers_a_pasted_fact_with_the_embedded_models(tmp_path):
    """Acceptance with real models: MiniLM finds the pasted fact, SmolLM2 answers from it in rag_text."""
    from gradio_client import Client

    from demo.ui import build_ui, launch
    from retriever import index as index_cli
    from retriever.encoder import Encoder
    from retriever.search import _tokenizer_backend
    from retriever.testing import toy_documents, write_toy_store

    docs, questions = toy_documents(30)
    overrides = [f"run_dir={tmp_path / 'run'}", "device=cpu", "index.factory=Flat", "lm.max_new_tokens=24"]
    cfg = load_config(None, overrides)
    write_toy_store(tmp_path / "run" / "store", docs, questions, _tokenizer_backend(Encoder.from_config(cfg)))
    index_cli.build_index(cfg, progress=False)
    service = DemoService.from_config(cfg)
    # No run trained a checkpoint: the embedded LM is served with the shipped model's systems too.
    assert service.modes == ["closed_book", "rag_text", "rag_text_tuned", "dynamic_prefix@pfull", "dynamic_prefix@p32",
                             "combine@pfull", "combine@p32"]
    assert service.default_mode == "dynamic_prefix@pfull"
    blocks = build_ui(service)
    url = launch(blocks, service, port=free_port(), block=False, quiet=True)
    try:
        client = Client(url, verbose=False)
        fact = "Quorn Works was founded by Idris Pellamy in 1911."
        client.predict(fact, "Quorn Works", api_name="/add_text")
        answer, sources = client.predict("Who founded Quorn Works?", "rag_text", 1, api_name="/answer")
        assert sources[0]["title"] == "Quorn Works"
        assert "pellamy" in answer.lower()
    finally:
        blocks.close()
        service.retriever.reset()


def test_live_check_adds_new_facts_asks_and_cleans_up(clean_index):
    from demo.live_check import new_facts, run

    service = clean_index
    facts = new_facts(service.cfg.data.synthetic, 3, world_seed=7)
    assert [d.id for d, _, _ in facts] == ["live-check-7-0", "live-check-7-1", "live-check-7-2"]
    assert all(q.endswith("?") and answers for _, q, answers in facts)
    service.add_text(OTHER, "Glimmerholt")  # a user's live document survives the check
    results = run(service, 3, ["rag_text", "closed_book"], world_seed=7, top_k=1)
    assert set(results) == {"rag_text", "closed_book"} and results["closed_book"]["top1_is_new_doc"] == 0.0
    for r in results.values():
        assert r["n"] == 3 and all(0.0 <= r[k] <= 1.0 for k in ("top1_is_new_doc", "em", "contains"))
    assert len(service.retriever.live_documents) == 1


def test_live_check_after_a_crashed_check_left_its_documents(clean_index):
    """Regression: a check killed before its cleanup made every later check fail on 'already in the index'."""
    from demo.live_check import new_facts, run

    service = clean_index
    service.retriever.add_documents([doc for doc, _, _ in new_facts(service.cfg.data.synthetic, 2, world_seed=7)])
    results = run(service, 2, ["rag_text"], world_seed=7, top_k=1)
    assert results["rag_text"]["n"] == 2
    assert service.retriever.live_documents == []


def test_add_checks_every_input_before_adding_anything(clean_index, tmp_path):
    service = clean_index
    (tmp_path / "bad.jsonl").write_text("{oops\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"bad.jsonl:1: not valid JSON"):
        service.add(EXTRA, "Quorn", [str(tmp_path / "bad.jsonl")])
    assert service.retriever.live_documents == []  # the valid pasted text was not added either
    with pytest.raises(UserError, match="nothing to add"):
        service.add("  ", "", [])
    (tmp_path / "isle.txt").write_text(OTHER, encoding="utf-8")
    message, segments = service.add(EXTRA, "Quorn", [str(tmp_path / "isle.txt")])
    assert "Added 2 document(s)" in message and [s.title for s in segments] == ["Quorn", "isle"]


def test_demo_load_check_counts_answers_and_errors(served, clean_index):
    """bench.demo_load drives /answer over raw HTTP as gradio_client does: answers counted, refusals as errors."""
    from bench.demo_load import run_load
    from bench.load import table

    url, _ = served
    rows = run_load(url, ["Who leads Quorn?", "What is the capital of Quorn?"], [1, 2], requests=3,
                    mode="rag_text", top_k=2, warmup=1)
    assert [(r["clients"], r["ok"], r["errors"]) for r in rows] == [(1, 3, 0), (2, 3, 0)]
    assert all(r["qps"] > 0 and r["p50_ms"] <= r["p95_ms"] for r in rows)
    bad = run_load(url, ["Who?"], [2], requests=2, mode="nope", top_k=2)[0]  # a mode the demo does not serve
    assert bad["ok"] == 0 and bad["error_kinds"] == {"gradio error": 2}
    assert "| clients | requests | errors | answers/s |" in table(rows, per="answers/s")
