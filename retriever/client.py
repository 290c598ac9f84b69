"""The HTTP client of `python -m retriever.serve`: a Retriever that searches through the service.

    retriever = RemoteRetriever("http://127.0.0.1:8765", timeout=60)
    retriever.search("Who founded X?", k=5) -> list[Hit]          # the same Hits as in-process
    retriever.batch_search(questions, k) -> list[list[Hit]]

`retriever.service_url=http://…` makes `retriever.search.open_retriever(cfg)` (qa.train, eval.run, qa.answer,
app.py) return one of these instead of opening run_dir/index. Besides search it offers what those commands
read of a Retriever: `manifest`, `search_settings`, `encoder.fingerprint`/`.dim`, `segments(ids)`,
`len()`, `live_changes`, `live_documents`, and the live changes `add_documents`, `remove_documents`,
`remove_segments`, `reset`. It has no encoder of its own (train.joint_retriever needs one in process).

Stdlib only (urllib): every request has a timeout (retriever.service_timeout); a service that is down,
slow or refuses a request raises a UserError saying which, with the service's own message.
"""

from __future__ import annotations

import dataclasses
import json
import urllib.error
import urllib.request
from collections.abc import Sequence
from types import SimpleNamespace

from common.errors import UserError
from data_prep.records import Document, Segment


class ServiceError(UserError):
    """The retrieval service is unreachable, too slow, or answered with an error."""


class RemoteRetriever:
    def __init__(self, url: str, timeout: float = 60.0):
        if not url.startswith(("http://", "https://")):
            raise UserError(f"retriever.service_url must start with http:// or https://, got {url!r}")
        if not timeout > 0:
            raise UserError(f"retriever.service_timeout must be > 0, got {timeout}")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.refresh()

    @classmethod
    def from_config(cls, cfg) -> RemoteRetriever:
        return cls(cfg.retriever.service_url, cfg.retriever.service_timeout)

    # ------------------------------------------------------------------ transport
    def _request(self, method: str, path: str, payload=None):
        data = None if payload is None else json.dumps(payload).encode("utf-8")
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            try:
                detail = json.loads(e.read()).get("detail", "")
            except (ValueError, AttributeError, OSError):
                detail = ""
            if not isinstance(detail, str):
                detail = json.dumps(detail)
            where = f"the retrieval service at {self.url} ({method} {path})"
            if e.code < 500:
                raise ServiceError(f"{where} refused the request ({e.code}): {detail or e.reason}") from None
            raise ServiceError(
                f"{where} failed ({e.code}): {detail or e.reason}; see the service's log"
            ) from None
        except TimeoutError as e:
            raise ServiceError(
                f"the retrieval service at {self.url} did not answer {method} {path} within {self.timeout:g} s "
                "(retriever.service_timeout)"
            ) from e
        except urllib.error.URLError as e:
            reason = e.reason
            if isinstance(reason, TimeoutError):
                raise ServiceError(
                    f"the retrieval service at {self.url} did not answer within {self.timeout:g} s "
                    "(retriever.service_timeout)"
                ) from e
            raise ServiceError(
                f"the retrieval service at {self.url} is not reachable ({reason}); start it with "
                "`python -m retriever.serve --config C`, or unset retriever.service_url to search in-process"
            ) from e
        except (ConnectionError, OSError) as e:
            raise ServiceError(f"the retrieval service at {self.url} dropped the connection ({e})") from e

    def _get(self, path: str):
        return self._request("GET", path)

    def _post(self, path: str, payload):
        return self._request("POST", path, payload)

    # ------------------------------------------------------------------ what the commands read
    def refresh(self) -> dict:
        """Fetch /stats again (index, encoder, settings, limits); returns it."""
        stats = self._get("/stats")
        self._stats = stats
        enc = stats["encoder"]
        self.encoder = SimpleNamespace(
            fingerprint=enc["fingerprint"], dim=enc["dim"], info=SimpleNamespace(name=enc["name"])
        )
        self.manifest = {**stats["index"], "encoder": dict(enc)}
        self.limits = stats["limits"]
        self.store = _BuiltStore(stats["built_segments"])
        return stats

    @property
    def search_settings(self) -> dict:
        return dict(self._stats["search_settings"])

    @property
    def live_changes(self) -> int:
        return int(self.refresh()["live_changes"])

    @property
    def live_documents(self) -> list[str]:
        return list(self.refresh()["live_documents"])

    def __len__(self) -> int:
        return int(self._get("/health")["segments"])

    def __repr__(self) -> str:
        return f"RemoteRetriever({self.url!r})"

    # ------------------------------------------------------------------ search
    def search(self, query: str, k: int) -> list:
        return self.batch_search([query], k)[0]

    def batch_search(self, queries: Sequence[str], k: int) -> list[list]:
        """The k best segments for each question, in chunks of the service's serve.max_questions."""
        if isinstance(queries, str):
            raise TypeError("batch_search takes a list of questions; use search() for one")
        for i, q in enumerate(queries):
            if not isinstance(q, str) or not q.strip():
                raise UserError(f"question {i} is empty; give a non-empty question")
        return self._chunked("questions", list(queries), k)

    def batch_search_vectors(self, query_vectors, k: int) -> list[list]:
        """Dense top-k Hits for raw (n, dim) query embeddings (no BM25 fusion), like search_vectors + to_hits."""
        rows = [[float(x) for x in row] for row in query_vectors]
        return self._chunked("vectors", rows, k)

    def _chunked(self, key: str, items: list, k: int) -> list[list]:
        from retriever.search import Hit

        step = max(1, int(self.limits["max_questions"]))
        out: list[list] = []
        for start in range(0, len(items), step):
            rows = self._post("/batch_search", {key: items[start : start + step], "top_k": int(k)})["hits"]
            out += [
                [Hit(h["segment_id"], float(h["score"]), h["doc_id"], h["title"], h["text"]) for h in row]
                for row in rows
            ]
        return out

    def segments(self, ids: Sequence[int]) -> dict[int, Segment]:
        """Segments by id from the service's store or live delta (unknown ids are left out)."""
        ids = [int(i) for i in ids]
        out: dict[int, Segment] = {}
        step = 1000
        for start in range(0, len(ids), step):
            for s in self._post("/segments", {"ids": ids[start : start + step]})["segments"]:
                out[s["segment_id"]] = Segment(**s)
        return out

    # ------------------------------------------------------------------ live changes
    def add_documents(self, docs: Sequence[Document | dict]) -> list[Segment]:
        payload = [dataclasses.asdict(d) if isinstance(d, Document) else dict(d) for d in docs]
        if not payload:
            return []
        step = max(1, int(self.limits["max_documents"]))
        if len(payload) > step:
            raise UserError(
                f"{len(payload)} documents in one addition; the service takes at most {step} (serve.max_documents)"
            )
        ids = self._post("/add", {"documents": payload})["segment_ids"]
        found = self.segments(ids)
        return [found[i] for i in ids if i in found]

    def remove_documents(self, doc_ids: Sequence[str]) -> int:
        return int(self._post("/remove", {"doc_ids": list(doc_ids)})["removed"])

    def remove_segments(self, ids: Sequence[int]) -> int:
        ids = [int(i) for i in ids]
        return int(self._post("/remove", {"segment_ids": ids})["removed"]) if ids else 0

    def reset(self) -> None:
        self._post("/reset", {})
        self.refresh()


class _BuiltStore:
    """Stands in for `Retriever.store` where callers only ask its size (the built segments)."""

    def __init__(self, n: int):
        self._n = int(n)

    def __len__(self) -> int:
        return self._n
