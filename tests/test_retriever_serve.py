"""The retrieval service (`python -m retriever.serve`) on loopback over a tiny index: the same hits as the
in-process Retriever, clear 4xx errors, live additions and removals, and the HTTP client Retriever that
`retriever.service_url` puts behind qa.train, eval.run, qa.answer and app.py."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request

import numpy as np
import pytest

from common.errors import UserError
from configs.loader import load_config
from data_prep.store import segment_input_text
from retriever import serve as serve_cli
from retriever.client import RemoteRetriever, ServiceError
from retriever.search import Retriever, open_retriever, tokenizer_backend
from retriever.serve import check_serve_config, create_app, serve_in_thread
from retriever.testing import build_toy_index, toy_documents, write_toy_store

EXTRA = "Quorn is a new country. The capital of Quorn is Zib. Quorn is led by Wub."
LIMITS = ["serve.max_top_k=10", "serve.max_questions=4", "serve.max_body_mb=0.02", "serve.max_documents=3"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    cfg, overrides, encoder, _, questions = build_toy_index(root, extra_texts=(EXTRA,), overrides=tuple(LIMITS))
    return root, cfg, overrides, encoder, questions


@pytest.fixture(scope="module")
def served(built):
    _, cfg, _, encoder, _ = built
    server_side = Retriever.from_config(cfg, encoder=encoder)
    with serve_in_thread(create_app(server_side, cfg.serve)) as url:
        yield url, server_side


@pytest.fixture()
def url(served):
    url, server_side = served
    yield url
    server_side.reset()  # every test starts from the built index


@pytest.fixture(scope="module")
def local(built):
    _, cfg, _, encoder, _ = built
    return Retriever.from_config(cfg, encoder=encoder)


def call(url: str, path: str, payload=None, raw: bytes | None = None) -> tuple[int, dict]:
    data = raw if raw is not None else (None if payload is None else json.dumps(payload).encode())
    req = urllib.request.Request(url + path, data=data, method="GET" if data is None else "POST")
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def same_hits(got: list[dict], want) -> None:
    assert [h["segment_id"] for h in got] == [h.segment_id for h in want]
    assert [h["id"] for h in got] == [h.segment_id for h in want]
    assert [h["doc_id"] for h in got] == [h.doc_id for h in want]
    assert [(h["title"], h["text"]) for h in got] == [(h.title, h.text) for h in want]
    np.testing.assert_allclose([h["score"] for h in got], [h.score for h in want], atol=1e-5)


def test_search_and_batch_search_match_the_in_process_retriever(url, local, built):
    questions = [q for _, q, _ in built[4]][:4]
    for q in questions:
        status, body = call(url, "/search", {"question": q, "top_k": 5})
        assert status == 200
        same_hits(body["hits"], local.search(q, 5))
    status, body = call(url, "/batch_search", {"questions": questions, "top_k": 3})
    assert status == 200 and len(body["hits"]) == 4
    for got, want in zip(body["hits"], local.batch_search(questions, 3)):
        same_hits(got, want)
    # The segment's own text finds itself first, as in-process.
    target = local.store.get(7)
    assert call(url, "/search", {"question": segment_input_text(target), "top_k": 1})[1]["hits"][0]["id"] == 7


def test_batch_search_with_raw_query_vectors_is_dense_search(url, local, built):
    questions = [q for _, q, _ in built[4]][:3]
    vectors = local.encoder.encode_queries(questions)
    status, body = call(url, "/batch_search", {"vectors": vectors.tolist(), "top_k": 4})
    assert status == 200
    for got, want in zip(body["hits"], local.to_hits(*local.search_vectors(vectors, 4))):
        same_hits(got, want)


def test_health_stats_and_openapi(url, local):
    assert call(url, "/health") == (200, {"status": "ok", "segments": 30})
    status, stats = call(url, "/stats")
    assert status == 200 and stats["segments"] == stats["built_segments"] == 30
    assert stats["index"]["sha256"] == local.manifest["sha256"]
    assert stats["encoder"]["fingerprint"] == local.encoder.fingerprint
    assert stats["search_settings"] == local.search_settings and stats["live_changes"] == 0
    assert stats["limits"]["max_top_k"] == 10 and stats["limits"]["max_questions"] == 4
    status, spec = call(url, "/openapi.json")
    assert status == 200 and {"/search", "/batch_search", "/add", "/remove", "/health", "/stats"} <= set(
        spec["paths"]
    )
    with urllib.request.urlopen(url + "/docs", timeout=30) as resp:
        assert resp.status == 200


@pytest.mark.parametrize(
    ("path", "payload", "status", "message"),
    [
        (
            "/search",
            {"question": "   ", "top_k": 3},
            422,
            "question: String should have at least 1 character",
        ),
        ("/search", {"question": "x" * 2001, "top_k": 3}, 422, "question: String should have at most 2000"),
        (
            "/search",
            {"question": "Who leads Kalo?", "top_k": 0},
            422,
            "top_k: Input should be greater than or equal to 1",
        ),
        (
            "/search",
            {"question": "Who leads Kalo?", "top_k": 11},
            422,
            "top_k: Input should be less than or equal to 10",
        ),
        (
            "/search",
            {"question": "Who leads Kalo?", "top_k": "many"},
            422,
            "top_k: Input should be a valid integer",
        ),
        ("/search", {"top_k": 3}, 422, "question: Field required"),
        (
            "/batch_search",
            {"questions": ["a?"] * 5, "top_k": 1},
            422,
            "questions: List should have at most 4 items",
        ),
        (
            "/batch_search",
            {"questions": ["ok?", ""], "top_k": 1},
            422,
            "questions.1: String should have at least 1",
        ),
        ("/batch_search", {"top_k": 1}, 422, "give either `questions` or `vectors`"),
        (
            "/batch_search",
            {"questions": ["a?"], "vectors": [[0.0]], "top_k": 1},
            422,
            "either `questions` or",
        ),
        (
            "/batch_search",
            {"vectors": [[0.0, 1.0]], "top_k": 1},
            422,
            "vector 0 has 2 values; the encoder's dimension is 32",
        ),
        ("/add", {"documents": []}, 422, "documents: List should have at least 1 item"),
        (
            "/add",
            {"documents": [{"id": "d", "text": "  "}]},
            422,
            "documents.0.text: String should have at least 1",
        ),
        ("/add", {"documents": [{"id": f"d{i}", "text": "t"} for i in range(4)]}, 422, "at most 3 items"),
        (
            "/add",
            {"documents": [{"id": "doc3", "text": "Quorn."}]},
            400,
            "documents already in the index: ['doc3']",
        ),
        (
            "/add",
            {"documents": [{"id": "n", "text": "a"}, {"id": "n", "text": "b"}]},
            400,
            "repeated in one upload",
        ),
        ("/remove", {}, 422, "give `doc_ids` and/or `segment_ids`"),
        ("/remove", {"doc_ids": ["nope"]}, 400, "no such documents in the index: ['nope']"),
    ],
)
def test_bad_requests_get_4xx_with_a_message(url, path, payload, status, message):
    got, body = call(url, path, payload)
    assert got == status, body
    assert message in body["detail"]
    assert call(url, "/health")[1]["segments"] == 30  # nothing was half added


def test_malformed_json_and_a_body_over_the_limit(url):
    status, body = call(url, "/search", raw=b"{not json")
    assert status == 422 and "JSON" in body["detail"]
    status, body = call(url, "/search", {"question": "x" * 30_000, "top_k": 1})
    assert status == 413 and "serve.max_body_mb" in body["detail"]
    # Chunked, without a Content-Length: counted as it arrives.
    import http.client
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    chunks = (b'{"question": "' + b"y" * 5000 if i == 0 else b"y" * 5000 for i in range(6))
    conn.request(
        "POST", "/search", body=chunks, headers={"Content-Type": "application/json"}, encode_chunked=True
    )
    resp = conn.getresponse()
    assert resp.status == 413 and "serve.max_body_mb" in json.loads(resp.read())["detail"]
    conn.close()


def test_add_search_remove_round_trip(url, local):
    status, body = call(url, "/add", {"documents": [{"id": "quorn", "title": "Quorn", "text": EXTRA}]})
    assert status == 200 and body["added"] == 1 and body["segments"] == 1
    new_id = body["segment_ids"][0]
    assert new_id >= 30 and body["total_segments"] == 31
    hits = call(url, "/search", {"question": "Quorn. " + EXTRA, "top_k": 3})[1]["hits"]
    assert hits[0]["doc_id"] == "quorn" and hits[0]["id"] == new_id and hits[0]["title"] == "Quorn"
    stats = call(url, "/stats")[1]
    assert stats["live_documents"] == ["quorn"] and stats["live_changes"] == 1
    segs = call(url, "/segments", {"ids": [new_id, 0, 999]})[1]["segments"]
    assert [s["segment_id"] for s in segs] == [new_id, 0] and segs[0]["text"] == EXTRA
    # A built document too, by doc id, then a segment by id.
    assert call(url, "/remove", {"doc_ids": ["quorn", "doc3"]}) == (200, {"removed": 2, "total_segments": 29})
    assert call(url, "/remove", {"segment_ids": [5]}) == (200, {"removed": 1, "total_segments": 28})
    found = {h["doc_id"] for h in call(url, "/search", {"question": EXTRA, "top_k": 10})[1]["hits"]}
    assert "quorn" not in found and "doc3" not in found
    assert call(url, "/reset", {})[1]["total_segments"] == 30


def test_client_retriever_gives_the_same_hits(url, built, local):
    _, cfg, overrides, _, questions = built
    remote = open_retriever(load_config(None, [*overrides, f"retriever.service_url={url}"]))
    assert isinstance(remote, RemoteRetriever) and len(remote) == 30 and len(remote.store) == 30
    assert remote.manifest["sha256"] == local.manifest["sha256"]
    assert remote.encoder.fingerprint == local.encoder.fingerprint and remote.encoder.dim == 32
    assert remote.search_settings == local.search_settings
    from qa.retrieval_cache import retrieval_fingerprint

    # qa.train's cached top-k is the same file whether it searched in-process or through the service.
    assert retrieval_fingerprint(remote, 5, ["q1"]) == retrieval_fingerprint(local, 5, ["q1"])
    qs = [q for _, q, _ in questions][:6]  # more than serve.max_questions: sent in two requests
    got, want = remote.batch_search(qs, 4), local.batch_search(qs, 4)
    for g, w in zip(got, want):
        assert [h.segment_id for h in g] == [h.segment_id for h in w]
        assert [(h.doc_id, h.title, h.text) for h in g] == [(h.doc_id, h.title, h.text) for h in w]
        np.testing.assert_allclose([h.score for h in g], [h.score for h in w], atol=1e-5)
    assert remote.search(qs[0], 2) == want[0][:2]  # Hit dataclasses compare equal field by field
    vectors = local.encoder.encode_queries(qs[:2])
    assert remote.batch_search_vectors(vectors, 3) == local.to_hits(*local.search_vectors(vectors, 3))
    assert remote.segments([3, 999]) == {3: local.store.get(3)}
    with pytest.raises(UserError, match="empty"):
        remote.batch_search(["ok", " "], 1)
    with pytest.raises(ServiceError, match=r"refused the request \(422\): top_k: Input should be less than"):
        remote.search("Who leads Kalo?", 50)


def test_client_live_changes_and_the_retrieval_cache_key(url, built):
    from data_prep.records import Document
    from qa.retrieval_cache import retrieval_fingerprint

    remote = RemoteRetriever(url, timeout=30)
    before = retrieval_fingerprint(remote, 3, ["q1"])
    segs = remote.add_documents([Document("quorn", "Quorn", EXTRA)])
    assert len(segs) == 1 and segs[0].doc_id == "quorn" and segs[0].text == EXTRA
    assert remote.live_documents == ["quorn"] and remote.live_changes == 1 and len(remote) == 31
    assert remote.search(EXTRA, 1)[0].doc_id == "quorn"
    assert retrieval_fingerprint(remote, 3, ["q1"]) != before  # a cached top-k never outlives a live change
    with pytest.raises(ServiceError, match="already in the index"):
        remote.add_documents([{"id": "quorn", "text": "again"}])
    assert remote.remove_documents(["quorn"]) == 1 and len(remote) == 30
    remote.reset()
    assert retrieval_fingerprint(remote, 3, ["q1"]) == before


def test_client_errors_when_the_service_is_down_or_silent(built):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ServiceError, match=r"not reachable .*python -m retriever.serve"):
        RemoteRetriever(f"http://127.0.0.1:{port}", timeout=5)
    with socket.socket() as silent:  # accepts connections (the backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        with pytest.raises(ServiceError, match=r"did not answer .*0.3 s \(retriever.service_timeout\)"):
            RemoteRetriever(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout=0.3)
    with pytest.raises(UserError, match="must start with http"):
        RemoteRetriever("127.0.0.1:8765")


def test_open_retriever_refuses_another_store_and_a_local_encoder(url, built, tmp_path):
    root, _, overrides, encoder, questions = built
    docs, qs = toy_documents(5, seed=3)
    write_toy_store(tmp_path / "store", docs, qs, tokenizer_backend(encoder))
    other = load_config(None, [*overrides, f"retriever.service_url={url}", f"run_dir={tmp_path}"])
    with pytest.raises(UserError, match="serves segment store .* point retriever.service_url"):
        open_retriever(other)
    cfg = load_config(None, [*overrides, f"retriever.service_url={url}"])
    with pytest.raises(UserError, match="unset retriever.service_url"):
        open_retriever(cfg, encoder=encoder)
    # Without service_url: the in-process Retriever, as before.
    assert isinstance(open_retriever(load_config(None, overrides), encoder=encoder), Retriever)


def test_help_names_the_endpoints_and_keys(capsys):
    with pytest.raises(SystemExit) as e:
        serve_cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for word in (
        "POST /search",
        "/batch_search",
        "/add",
        "/remove",
        "GET  /health",
        "serve.host",
        "serve.port",
        "retriever.service_url",
        "127.0.0.1",
    ):
        assert word in out


def test_serve_config_is_checked(built):
    cfg = load_config(None, ["serve.max_top_k=0"])
    with pytest.raises(UserError, match="serve.max_top_k must be >= 1"):
        check_serve_config(cfg.serve)
    with pytest.raises(UserError, match="serve.port"):
        check_serve_config(load_config(None, ["serve.port=70000"]).serve)
    assert load_config(None, []).serve.host == "127.0.0.1"
    with pytest.raises(UserError, match="drop the key"):
        serve_cli.main(["retriever.service_url=http://127.0.0.1:1", f"run_dir={built[0] / 'run'}"])


def test_the_demo_adds_and_resets_documents_through_the_service(url, built):
    """app.py with retriever.service_url: the demo's live documents go through /add and /reset."""
    from types import SimpleNamespace

    from demo.service import DemoService

    cfg = load_config(None, [*built[2], f"retriever.service_url={url}"])
    remote = open_retriever(cfg)
    qa = SimpleNamespace(retriever=remote, available_modes=lambda: ["closed_book", "rag_text"])
    demo = DemoService(cfg, qa)
    message, segments = demo.add_text(EXTRA, "Quorn")
    assert "Added 1 document(s), 1 segment(s)" in message and "(31 segments)" in message
    assert segments[0].segment_id >= 30 and segments[0].title == "Quorn"
    status = demo.status()
    assert status["segments"] == 31 and status["live_titles"] == {segments[0].doc_id: "Quorn"}
    hits = remote.search(EXTRA, 2)
    assert hits[0].segment_id == segments[0].segment_id
    assert demo._reading_hits(hits)[0].segment_id is None  # live segments are read by their text
    with pytest.raises(UserError, match="already in the index"):
        demo.add_text(EXTRA, "Quorn")
    assert "1 added document(s) removed" in demo.reset() and len(remote) == 30


def test_the_command_serves_on_a_free_port_and_stops(built):
    """`python -m retriever.serve … serve.port=0` prints its URL, answers, and stops on SIGTERM."""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "retriever.serve", *built[2], "serve.port=0"],
        cwd=repo,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("retrieval service on http://127.0.0.1:"), line
        url = line.split()[3]
        for _ in range(100):  # the socket is bound before the line; uvicorn answers a moment later
            try:
                assert call(url, "/health") == (200, {"status": "ok", "segments": 30})
                break
            except urllib.error.URLError:
                time.sleep(0.1)
        else:
            raise AssertionError("the service did not answer")
    finally:
        proc.terminate()
        # uvicorn shuts down gracefully, then re-raises the signal it caught (exit status -SIGTERM).
        assert proc.wait(timeout=30) in (0, -15)


def test_a_taken_port_is_a_clear_error(built):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        with pytest.raises(UserError, match=r"cannot listen on 127.0.0.1:\d+ .*serve.port"):
            serve_cli.main([*built[2], f"serve.port={taken.getsockname()[1]}"])


def test_concurrent_requests_get_their_own_hits(url, local, built):
    """Questions of concurrent requests are searched together (serve.coalesce), each gets its own hits."""
    from concurrent.futures import ThreadPoolExecutor

    questions = [q for _, q, _ in built[4]][:12]
    before = call(url, "/stats")[1]["coalesce"]

    def ask(i):
        q, k = questions[i % len(questions)], 1 + i % 4
        return q, k, call(url, "/search", {"question": q, "top_k": k})

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(ask, range(40)))
    for q, k, (status, body) in results:
        assert status == 200
        same_hits(body["hits"], local.search(q, k))
    after = call(url, "/stats")[1]["coalesce"]
    assert after["questions"] - before["questions"] == 40
    assert after["encoder_calls"] - before["encoder_calls"] <= 40


def test_search_batcher_coalesces_waiting_requests_and_fails_a_bad_one_alone():
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from retriever.serve import SearchBatcher

    release, calls = threading.Event(), []

    class Fake:
        def batch_search(self, questions, k):
            calls.append((list(questions), k))
            if questions == ["first"]:
                release.wait(10)  # hold the worker while the others queue up
            if "bad" in questions:
                raise UserError("bad question")
            return [[f"{q}@{k}"] for q in questions]

    batcher = SearchBatcher(Fake(), max_questions=10)
    with ThreadPoolExecutor(5) as pool:
        first = pool.submit(batcher.search, ["first"], 1)
        while not calls:
            threading.Event().wait(0.01)
        others = [
            pool.submit(batcher.search, qs, k)
            for qs, k in ([["a", "b"], 2], [["c"], 2], [["bad"], 2], [["d"], 3])
        ]
        while batcher._queue.qsize() < 4:
            threading.Event().wait(0.01)
        release.set()
        assert first.result() == [["first@1"]]
        assert others[0].result() == [["a@2"], ["b@2"]] and others[1].result() == [["c@2"]]
        with pytest.raises(UserError, match="bad question"):
            others[2].result()
        assert others[3].result() == [["d@3"]]
    # One call for the first, one for the three waiting top_k=2 requests (refused), each alone again, one for k=3.
    assert calls[1] == (["a", "b", "c", "bad"], 2) and (["d"], 3) in calls and len(calls) == 6
    batcher.close()


def test_load_check_script_counts_requests_and_errors(url, built):
    from bench.service_load import run_load, table

    questions = [q for _, q, _ in built[4]]
    rows = run_load(url, questions, [1, 3], requests=9, top_k=2, warmup=2)
    assert [(r["clients"], r["ok"], r["errors"]) for r in rows] == [(1, 9, 0), (3, 9, 0)]
    assert all(r["qps"] > 0 and r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"] for r in rows)
    bad = run_load(url, questions, [2], requests=4, top_k=50)[0]  # over serve.max_top_k: every one a 422
    assert bad["ok"] == 0 and bad["error_kinds"] == {"http 422": 4}
    assert "| clients | requests | errors | queries/s | p50 ms | p95 ms | p99 ms |" in table(rows)


def test_load_check_json_reaches_the_bench_report(url, built, tmp_path):
    """`--json` writes the rows with the command and machine, which bench/RESULTS.md then shows."""
    from bench.separate import load_separate, render_separate
    from bench.service_load import main

    qfile = tmp_path / "questions.txt"
    qfile.write_text("\n".join(q for _, q, _ in built[4][:3]) + "\n", encoding="utf-8")
    argv = ["--url", url, "--clients", "1,2", "--requests", "4", "--warmup", "0", "--top-k", "2"]
    assert main([*argv, "--questions", str(qfile), "--json", str(tmp_path / "service_load.json")]) == 0
    found = load_separate(tmp_path)["service_load.json"]
    assert found["command"].startswith("python -m bench.service_load --url ")
    assert [(r["clients"], r["ok"]) for r in found["rows"]] == [(1, 4), (2, 4)]
    assert "| 2 | 4 | 0 |" in "\n".join(render_separate({"service_load.json": found}))


def test_the_listening_socket_is_tcp_with_nodelay():
    """asyncio sets TCP_NODELAY on accepted sockets only when the listener says it is TCP: without it every
    response on a kept-alive connection waited ~40 ms for the client's delayed ACK."""
    from retriever.serve import bind_socket

    sock = bind_socket("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        sock.close()


def test_hybrid_search_through_the_service(built, caplog):
    """The service searches with its own retriever.hybrid settings; a client configured otherwise is told."""
    import logging

    _, _, overrides, encoder, questions = built
    hybrid_cfg = load_config(
        None, [*overrides, "retriever.hybrid.enabled=true", "retriever.hybrid.weight=0.5"]
    )
    hybrid = Retriever.from_config(hybrid_cfg, encoder=encoder)
    qs = [q for _, q, _ in questions][:4]
    with serve_in_thread(create_app(hybrid, hybrid_cfg.serve)) as url:
        with caplog.at_level(logging.WARNING, logger="retriever.search"):
            remote = open_retriever(load_config(None, [*overrides, f"retriever.service_url={url}"]))
        assert "the retrieval service searches with BM25 fusion" in caplog.text
        assert remote.search_settings == hybrid.search_settings and "hybrid" in remote.search_settings
        for got, want in zip(remote.batch_search(qs, 3), hybrid.batch_search(qs, 3)):
            assert [h.segment_id for h in got] == [h.segment_id for h in want]
            np.testing.assert_allclose([h.score for h in got], [h.score for h in want], atol=1e-5)


def test_qa_system_answers_with_hits_from_the_service(url, built, local, tiny_llama, smol_tokenizer):
    """qa.answer / app.py / eval.run build their QASystem with open_retriever: with retriever.service_url
    the rag_text prompt reads the service's hits, the same as in-process."""
    from qa.system import QASystem

    cfg = load_config(None, [*built[2], f"retriever.service_url={url}", "lm.max_new_tokens=2"])
    qa = QASystem.from_config(cfg, systems=["rag_text"], lm=tiny_llama, tokenizer=smol_tokenizer)
    assert isinstance(qa.retriever, RemoteRetriever)
    question = built[4][0][1]
    pred = qa.answer([question], mode="rag_text", top_k=2)[0]
    assert [h.segment_id for h in pred.retrieved] == [h.segment_id for h in local.search(question, 2)]
    assert isinstance(pred.prediction, str)
