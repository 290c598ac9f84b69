"""The retrieval service: `python -m retriever.serve --config C [key=value ...]` (FastAPI + uvicorn).

Opens `run_dir/index` + `run_dir/store` (+ the live delta in `run_dir/live/`) once, as the other commands
do, and answers over HTTP on serve.host:serve.port (default 127.0.0.1:8765; serve.host=0.0.0.0 exposes it
to the network without authentication, and anyone who reaches it can add and remove documents):

    POST /search        {"question": str, "top_k": int}                  -> {"hits": [hit, ...]}
    POST /batch_search  {"questions": [str, ...], "top_k": int}          -> {"hits": [[hit, ...], ...]}
                        or {"vectors": [[float, ...], ...], "top_k": int} (raw query embeddings, dense only)
    POST /add           {"documents": [{"id", "text", "title"?}, ...]}   -> {"added", "segments", "segment_ids"}
    POST /remove        {"doc_ids": [str, ...]} and/or {"segment_ids": [int, ...]} -> {"removed": n}
    POST /segments      {"ids": [int, ...]}                              -> {"segments": [segment, ...]}
    POST /reset         forget every live change (back to the built index)
    GET  /health        {"status": "ok", "segments": n}
    GET  /stats         index, encoder, store, search settings, live changes, limits
    GET  /docs          the OpenAPI page (schema at /openapi.json)

A hit is {"id", "segment_id", "doc_id", "title", "text", "score"} (`id` is the segment id, the index's id;
higher scores are better), exactly what `Retriever.search` returns in-process; `top_k` may be left out
(retriever.top_k). The service's own index.nprobe and retriever.hybrid.* decide the ranking. Questions of
concurrent requests are encoded together (serve.coalesce). Additions and removals go through the
Retriever's live-change path (the demo's "Add documents"): segmented, embedded and indexed under one
lock, all documents of a request or none, persisted in run_dir/live/.

The first line on stdout is the service's URL (serve.port=0 takes any free port); stop it with Ctrl-C or
SIGTERM. A load check: `python -m bench.service_load --url URL`.

Limits (serve.*): top_k from 1 to serve.max_top_k, at most serve.max_questions questions per batch,
serve.max_question_chars per question, serve.max_documents per /add, serve.max_body_mb per request body.
Bad requests get a 4xx with {"detail": "<what is wrong>"}: 400 for a request the retriever refuses,
413 for a body over the limit, 422 for a malformed or out-of-range field.

Other commands use the service with `retriever.service_url=http://HOST:PORT` (retriever/client.py).
"""

# No `from __future__ import annotations`: FastAPI reads the request models of create_app's endpoints
# from their annotations, which must be objects, not strings naming create_app's locals.
import contextlib
import json
import logging
import time
from pathlib import Path

from common.errors import UserError
from configs.cli import build_parser, parse, run_main

log = logging.getLogger(__name__)


def check_serve_config(serve) -> None:
    if not 0 <= serve.port <= 65535:
        raise UserError(f"serve.port must be from 0 to 65535, got {serve.port}")
    for key in ("max_top_k", "max_questions", "max_question_chars", "max_documents"):
        if getattr(serve, key) < 1:
            raise UserError(f"serve.{key} must be >= 1, got {getattr(serve, key)}")
    if not serve.max_body_mb > 0:
        raise UserError(f"serve.max_body_mb must be > 0, got {serve.max_body_mb}")


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` gets 413 before any endpoint parses it.

    The declared Content-Length is checked first; a body without one (chunked) is counted as it arrives.
    """

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(send, int(declared))
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._refuse(send, size)
            if not message.get("more_body", False):
                break
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _refuse(self, send, size: int):
        detail = (
            f"request body of {size:,} bytes is over the limit of {self.max_bytes:,} bytes (serve.max_body_mb); "
            "send fewer questions or documents per request"
        )
        body = json.dumps({"detail": detail}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class SearchBatcher:
    """Questions of concurrent requests, searched together: one `retriever.batch_search` per top_k.

    One worker thread takes every request waiting when it is free (up to `max_questions` questions), so a
    lone request waits for nothing and a crowd shares encoder calls; it is also the only thread that
    encodes questions (a fast tokenizer is not meant to be used by several threads at once). A batch the
    retriever refuses is retried request by request, so one bad request fails alone.
    """

    def __init__(self, retriever, max_questions: int):
        import queue
        import threading

        self.retriever = retriever
        self.max_questions = max_questions
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="retriever-search", daemon=True)
        self._thread.start()
        self.batches = 0  # encoder calls made (for /stats)
        self.questions = 0

    def search(self, questions: list[str], k: int) -> list:
        from concurrent.futures import Future

        if not self._thread.is_alive():
            raise RuntimeError("the search worker has stopped")
        future: Future = Future()
        self._queue.put((list(questions), k, future))
        return future.result()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        import queue

        while True:
            item = self._queue.get()
            if item is None:
                return
            items, n, stop = [item], len(item[0]), False
            while n < self.max_questions:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                items.append(nxt)
                n += len(nxt[0])
            by_k: dict[int, list] = {}
            for it in items:
                by_k.setdefault(it[1], []).append(it)
            for k, group in by_k.items():
                self._answer(k, group)
            if stop:
                return

    def _answer(self, k: int, group: list) -> None:
        questions = [q for qs, _, _ in group for q in qs]
        try:
            hits = self.retriever.batch_search(questions, k)
        except Exception as e:
            if len(group) == 1:
                group[0][2].set_exception(e)
            else:
                for it in group:
                    self._answer(k, [it])
            return
        self.batches += 1
        self.questions += len(questions)
        start = 0
        for qs, _, future in group:
            future.set_result(hits[start : start + len(qs)])
            start += len(qs)


def create_app(retriever, serve, default_top_k: int = 5):
    """The FastAPI app over an open Retriever, with the limits of `serve` (a ServeConfig)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    # Imported here, as fastapi is: a process that only imports this module (its client, tests) skips pydantic.
    from retriever.serve_models import hit_dict, request_models

    check_serve_config(serve)
    dim = retriever.encoder.dim
    api = request_models(serve, dim, default_top_k)  # the request/response models, limits filled in

    batcher = SearchBatcher(retriever, serve.max_questions) if serve.coalesce else None

    def find(questions: list[str], k: int) -> list:
        return batcher.search(questions, k) if batcher else retriever.batch_search(questions, k)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        if batcher is not None:
            batcher.close()

    app = FastAPI(
        lifespan=lifespan,
        title="prefixrag retrieval service",
        description=(__doc__ or "").split("\n\n")[0]
        + "\n\nQuestions → top-k segments of run_dir's index; live additions and removals.",
        version="1",
    )
    started = time.time()
    counts = {"requests": 0, "errors": 0}

    @app.middleware("http")
    async def count(request: Request, call_next):
        response = await call_next(request)
        counts["requests"] += 1
        counts["errors"] += response.status_code >= 400
        return response

    @app.exception_handler(UserError)
    async def user_error(_request: Request, exc: UserError):
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError):
        parts = []
        for err in exc.errors():
            where = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            msg = err.get("msg", "invalid").removeprefix("Value error, ")
            parts.append(f"{where}: {msg}" if where else msg)
        return JSONResponse({"detail": "; ".join(parts) or "invalid request"}, status_code=422)

    @app.post("/search", response_model=api.SearchOut, summary="top-k segments for one question")
    def search(req: api.SearchIn):
        return {"hits": [hit_dict(h) for h in find([req.question], req.top_k)[0]]}

    @app.post(
        "/batch_search",
        response_model=api.BatchOut,
        summary="top-k segments for many questions (or raw query vectors)",
    )
    def batch_search(req: api.BatchIn):
        if req.vectors is not None:
            import numpy as np

            if not req.vectors:
                return {"hits": []}
            vectors = np.asarray(req.vectors, dtype=np.float32)
            hits = retriever.to_hits(*retriever.search_vectors(vectors, req.top_k))
        else:
            hits = find(req.questions, req.top_k) if req.questions else []
        return {"hits": [[hit_dict(h) for h in row] for row in hits]}

    @app.post("/add", response_model=api.AddOut, summary="segment, embed and index new documents (all or none)")
    def add(req: api.AddIn):
        from data_prep.records import Document

        docs = [Document(id=d.id, title=(d.title or "").strip() or d.id, text=d.text) for d in req.documents]
        segments = retriever.add_documents(docs)
        return {
            "added": len(docs),
            "segments": len(segments),
            "segment_ids": [s.segment_id for s in segments],
            "total_segments": len(retriever),
        }

    @app.post("/remove", response_model=api.RemoveOut, summary="remove documents (by doc id) or segments (by id)")
    def remove(req: api.RemoveIn):
        removed = retriever.remove_documents(req.doc_ids) if req.doc_ids else 0
        if req.segment_ids:
            removed += retriever.remove_segments(req.segment_ids)
        return {"removed": removed, "total_segments": len(retriever)}

    @app.post("/segments", summary="segments by id (built or live; unknown ids are left out)")
    def segments(req: api.SegmentsIn):
        import dataclasses

        found = retriever.segments(req.ids)
        return {"segments": [dataclasses.asdict(found[i]) for i in req.ids if i in found]}

    @app.post("/reset", summary="forget every live change and return to the built index")
    def reset():
        n = len(retriever.live_documents)
        retriever.reset()
        return {"removed_documents": n, "total_segments": len(retriever)}

    @app.get("/health", summary="liveness: the index is open")
    def health():
        return {"status": "ok", "segments": len(retriever)}

    @app.get("/stats", summary="index, encoder, store, search settings, live changes and limits")
    def stats():
        m = retriever.manifest
        return {
            "segments": len(retriever),
            "built_segments": len(retriever.store),
            "live_documents": retriever.live_documents,
            "live_changes": retriever.live_changes,
            "index": {
                k: m.get(k) for k in ("sha256", "factory", "ntotal", "nlist", "metric", "store_fingerprint")
            },
            "encoder": {
                "name": retriever.encoder.info.name,
                "fingerprint": retriever.encoder.fingerprint,
                "dim": dim,
            },
            "search_settings": retriever.search_settings,
            "limits": {
                "max_top_k": serve.max_top_k,
                "max_questions": serve.max_questions,
                "max_question_chars": serve.max_question_chars,
                "max_documents": serve.max_documents,
                "max_body_bytes": int(serve.max_body_mb * 1024 * 1024),
            },
            "coalesce": {"encoder_calls": batcher.batches, "questions": batcher.questions}
            if batcher
            else None,
            "uptime_s": round(time.time() - started, 1),
            **counts,
        }

    app.add_middleware(BodyLimit, max_bytes=int(serve.max_body_mb * 1024 * 1024))  # the outermost layer
    return app


def bind_socket(host: str, port: int):
    """A socket bound to host:port (port 0: any free one); a clear UserError when the address is taken."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on accepted sockets that say they are TCP, and
    # without it every response on a kept-alive connection waited ~40 ms (Nagle + the client's delayed ACK).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # inherited by accepted sockets on Linux
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(
            f"cannot listen on {host}:{port} ({e.strerror}); choose another serve.port (0 = any free port) "
            "or stop what is using it"
        ) from e
    return sock


def base_url(sock) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@contextlib.contextmanager
def serve_in_thread(app, host: str = "127.0.0.1", port: int = 0, startup_timeout: float = 30.0):
    """Run `app` with uvicorn in a daemon thread (tests, benchmarks); yields its base URL, stops on exit."""
    import threading

    import uvicorn

    sock = bind_socket(host, port)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="retriever-serve", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise RuntimeError("the retrieval service did not start")
        time.sleep(0.01)
    try:
        yield base_url(sock)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def main(argv=None) -> int:
    parser = build_parser("python -m retriever.serve", __doc__)
    cfg, _ns = parse(parser, argv)
    check_serve_config(cfg.serve)
    if cfg.retriever.service_url:
        raise UserError("retriever.service_url is set: the service opens run_dir/index itself; drop the key")
    import uvicorn

    from retriever.search import Retriever

    sock = bind_socket(cfg.serve.host, cfg.serve.port)  # before the slow part: a taken port fails at once
    t0 = time.perf_counter()
    retriever = Retriever.from_config(cfg)
    log.info(
        "opened %s (%d segments) in %.1f s",
        Path(cfg.run_dir) / "index",
        len(retriever),
        time.perf_counter() - t0,
    )
    app = create_app(retriever, cfg.serve, default_top_k=min(cfg.retriever.top_k, cfg.serve.max_top_k))
    url = base_url(sock)
    # One line on stdout that scripts can wait for (with serve.port=0 it is the only place the port shows).
    print(f"retrieval service on {url} (OpenAPI page: {url}/docs)", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="info")).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    run_main(main)
