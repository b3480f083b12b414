"""A real HTTP server on 127.0.0.1 that speaks TEI's and infinity's reranking and sparse routes
with real models (a sentence-transformers CrossEncoder and SparseEncoder), as tests/embedding_server.py
does for the dense routes.

Routes, as the real servers have them (see hfbatch/backends/remote_scoring.py for the sources):
- TEI (`flavor="tei"`):
  GET  /info          -> {"model_id", "model_sha", "model_dtype", "model_type", "max_input_length",
                          "max_client_batch_size", "auto_truncate", "version", ...}; `model_type` is
                          {"reranker": {...}}, {"embedding": {"pooling": "splade" | "mean"}} or
                          {"classifier": {...}} by what the server plays (`serves`).
  POST /rerank        {"query", "texts", "truncate"?, "raw_scores"?, "return_text"?, ...}
                      -> [{"index", "score"[, "text"]}] sorted by score, best first. The score is
                         the model's logit (CrossEncoder.predict with no activation), with TEI's
                         sigmoid (f32) unless raw_scores. Not a reranker: 424 "model is not a
                         re-ranker model"; empty texts: 400; more texts than max_client_batch_size:
                         413 (error_type Validation); a pair longer than max_input_length without
                         truncate: 413.
  POST /embed_sparse  {"inputs", "truncate"?, "prompt_name"?} -> per input [{"index", "value"}],
                      the non-zero weights in index order (SparseEncoder.encode of the text as sent,
                      no prompt of its own). Not SPLADE: 424 "Model is not an embedding model with
                      SPLADE pooling".
- infinity (`flavor="infinity"`):
  GET  /models        -> {"data": [{"id", "capabilities", "backend", "revision", "stats", ...}], "object": "list"}
  POST /rerank        {"model", "query", "documents", "return_documents"?, "raw_scores"?, "top_n"?}
                      -> {"object": "rerank", "results": [{"relevance_score", "index"[, "document"]}],
                          "model", "usage": {"prompt_tokens", "total_tokens"}, "id", "created"},
                         sorted by relevance_score; the query and documents are whitespace-stripped
                         (its pydantic INPUT_STRING), sigmoid (numpy) unless raw_scores. Another
                         model name: 400 "Invalid model"; a model without "rerank": 400
                         "ModelNotDeployedError ...". Errors are {"error": {"message", "type", "code"}}.

Faults are scripted per POST (`script`: a Reply is answered instead, once), so tests can play a 503
then success, a 413 and so on; `max_batch` plays TEI's max_client_batch_size (413 above it);
`serves` plays a server started with another kind of model ("reranker", "splade", "dense",
"classifier"); `sorted_answers=False` answers in input order (the order is never promised).
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler
from typing import Any

import numpy as np

from embedding_server import JsonHandler, LocalServer, Reply

_MODEL_TYPES = {
    "reranker": {"reranker": {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}},
    "classifier": {"classifier": {"id2label": {"0": "NEGATIVE", "1": "POSITIVE"}, "label2id": {"NEGATIVE": 0, "POSITIVE": 1}}},
    "splade": {"embedding": {"pooling": "splade"}},
    "dense": {"embedding": {"pooling": "mean"}},
}
_CAPABILITIES = {"reranker": ["rerank"], "classifier": ["classify"], "splade": ["embed"], "dense": ["embed"]}


class KindServer(LocalServer):
    """TEI or infinity on 127.0.0.1, backed by a CrossEncoder (rerank) and/or a SparseEncoder (embed_sparse)."""

    def __init__(self, *, flavor: str = "tei", cross_encoder: Any = None, sparse: Any = None, serves: str | None = None,
                 model_id: str = "model"):
        assert flavor in ("tei", "infinity")
        self.flavor = flavor
        self.cross_encoder, self.sparse = cross_encoder, sparse
        self.serves = serves or ("reranker" if cross_encoder is not None else "splade")
        self.model_id = model_id  # TEI's /info model_id, infinity's served name
        self.model_sha = "0123456789abcdef0123456789abcdef01234567"
        self.script: deque[Reply] = deque()  # consumed one per POST
        self.requests: list[dict[str, Any]] = []  # POSTs: path, headers, body, status
        self.gets: list[str] = []
        self.max_batch: int | None = None  # TEI's max_client_batch_size (None: 32 reported, not enforced)
        self.sorted_answers = True
        self.input_limit: int | None = None  # /info's max_input_length (None: the model's own)
        self.info_route = True  # False: plays an older TEI, or a proxy, without /info (404)
        self.delay = 0.0
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._model_lock = threading.Lock()  # one model call at a time (a fast tokenizer is not thread-safe)
        self._serve(self._handler())

    # --- the models ------------------------------------------------------------------------------

    @property
    def max_input_length(self) -> int:
        if self.input_limit is not None:  # a TEI started with --max-input-length
            return self.input_limit
        model = self.cross_encoder if self.serves == "reranker" else self.sparse
        if model is None:
            return 512
        return int(getattr(model, "max_length", None) or model.max_seq_length)

    def logits(self, query: str, texts: list[str]) -> np.ndarray:
        """The model's raw score of each (query, text): CrossEncoder.predict without an activation."""
        import torch

        with self._model_lock:
            out = self.cross_encoder.predict([[query, t] for t in texts], activation_fn=torch.nn.Identity(),
                                             batch_size=max(1, len(texts)), show_progress_bar=False, convert_to_numpy=True)
        return np.asarray(out, dtype=np.float32).reshape(len(texts))

    def pair_tokens(self, query: str, text: str) -> int:
        with self._model_lock:
            return len(self.cross_encoder.tokenizer(query, text, truncation=False)["input_ids"])

    def text_tokens(self, text: str) -> int:
        with self._model_lock:
            return len(self.sparse.tokenizer(text)["input_ids"])

    def sparse_rows(self, texts: list[str]) -> list[list[dict[str, Any]]]:
        with self._model_lock:
            tensor = self.sparse.encode(texts, convert_to_tensor=True, convert_to_sparse_tensor=True,
                                        batch_size=max(1, len(texts)), show_progress_bar=False).coalesce().cpu()
        dense = tensor.to_dense().numpy()
        return [[{"index": int(i), "value": float(row[i])} for i in np.flatnonzero(row)] for row in dense]

    # --- HTTP ------------------------------------------------------------------------------------

    def _handler(server) -> type[BaseHTTPRequestHandler]:  # noqa: N805 - closes over the server
        class Handler(JsonHandler):

            def do_GET(self) -> None:  # noqa: N802
                self._record = None
                with server._lock:
                    server.gets.append(self.path)
                if server.flavor == "tei" and self.path == "/info" and server.info_route:
                    return self._send(Reply(200, {
                        "model_id": server.model_id, "model_sha": server.model_sha, "model_dtype": "float32",
                        "model_type": _MODEL_TYPES[server.serves], "max_concurrent_requests": 512,
                        "max_input_length": server.max_input_length, "max_batch_tokens": 16384, "max_batch_requests": None,
                        "max_client_batch_size": server.max_batch or 32, "auto_truncate": False, "tokenization_workers": 1,
                        "version": "1.8.0", "sha": None, "docker_label": None}))
                if server.flavor == "infinity" and self.path == "/models":
                    return self._send(Reply(200, {"object": "list", "data": [{
                        "id": server.model_id, "object": "model", "owned_by": "infinity", "created": int(time.time()),
                        "stats": {"queue_fraction": 0.0, "queue_absolute": 0, "results_pending": 0, "batch_size": 32},
                        "capabilities": _CAPABILITIES[server.serves], "backend": "torch", "embedding_dtype": "float32",
                        "dtype": "float32", "revision": None, "lengths_via_tokenize": False, "device": "cpu"}]}))
                self._send(Reply(404, {"error": "Not Found"} if server.flavor == "tei" else {"detail": "Not Found"}))

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                self._record: dict[str, Any] | None = {"path": self.path, "headers": dict(self.headers), "body": body}
                with server._lock:
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    server.requests.append(self._record)
                    step = server.script.popleft() if server.script else None
                try:
                    if server.delay:
                        threading.Event().wait(server.delay)
                    if step is not None:
                        return self._send(step)
                    self._answer(body)
                finally:
                    with server._lock:
                        server.in_flight -= 1

            def _send(self, reply: Reply) -> None:
                record = getattr(self, "_record", None)
                if record is not None:  # what this request was answered, beside what it sent
                    record["status"], record["answer"] = reply.status, reply.body
                super()._send(reply)

            def _answer(self, body: dict[str, Any]) -> None:
                if server.flavor == "tei" and self.path == "/rerank":
                    return self._tei_rerank(body)
                if server.flavor == "tei" and self.path == "/embed_sparse":
                    return self._tei_sparse(body)
                if server.flavor == "infinity" and self.path == "/rerank":
                    return self._infinity_rerank(body)
                if server.flavor == "tei":
                    return self._send(Reply(404, {"error": f"no route {self.path}"}))
                return self._send(Reply(404, {"detail": "Not Found"}))

            # TEI ------------------------------------------------------------------------------

            def _tei_error(self, status: int, message: str, kind: str) -> None:
                self._send(Reply(status, {"error": message, "error_type": kind}))

            def _tei_batch_ok(self, n: int, what: str) -> bool:
                if n == 0:
                    self._tei_error(400, f"`{what}` cannot be empty", "Empty")
                    return False
                if server.max_batch is not None and n > server.max_batch:
                    self._tei_error(413, f"batch size {n} > maximum allowed batch size {server.max_batch}", "Validation")
                    return False
                return True

            def _tei_rerank(self, body: dict[str, Any]) -> None:
                if server.serves != "reranker":
                    return self._tei_error(424, "model is not a re-ranker model", "Backend")
                query, texts = body["query"], list(body["texts"])
                if not self._tei_batch_ok(len(texts), "texts"):
                    return None
                if not body.get("truncate", False):
                    for text in texts:
                        tokens = server.pair_tokens(query, text)
                        if tokens > server.max_input_length:
                            return self._tei_error(413, f"Input validation error: `inputs` must have less than "
                                                        f"{server.max_input_length} tokens. Given: {tokens}", "Validation")
                scores = server.logits(query, texts)
                if not body.get("raw_scores", False):
                    scores = (np.float32(1) / (np.float32(1) + np.exp(-scores))).astype(np.float32)  # TEI: f32 sigmoid
                ranks = [{"index": i, "score": float(s), **({"text": texts[i]} if body.get("return_text") else {})}
                         for i, s in enumerate(scores)]
                if server.sorted_answers:
                    ranks.sort(key=lambda r: r["score"], reverse=True)
                self._send(Reply(200, ranks))

            def _tei_sparse(self, body: dict[str, Any]) -> None:
                if server.serves != "splade":
                    return self._tei_error(424, "Model is not an embedding model with SPLADE pooling", "Backend")
                inputs = body["inputs"]
                texts = [inputs] if isinstance(inputs, str) else list(inputs)
                if not self._tei_batch_ok(len(texts), "inputs"):
                    return None
                name = body.get("prompt_name")
                if name is not None:  # TEI puts the named prompt's text before each input
                    prompts = server.sparse.prompts or {}
                    if name not in prompts:
                        return self._tei_error(413, f"Input validation error: `default-prompt-name` is set to `{name}` but "
                                                    "it was not found in the Sentence Transformers prompts.", "Validation")
                    texts = [prompts[name] + t for t in texts]
                if not body.get("truncate", False):
                    for text in texts:
                        tokens = server.text_tokens(text)
                        if tokens > server.max_input_length:
                            return self._tei_error(413, f"Input validation error: `inputs` must have less than "
                                                        f"{server.max_input_length} tokens. Given: {tokens}", "Validation")
                self._send(Reply(200, server.sparse_rows(texts)))

            # infinity -------------------------------------------------------------------------

            def _infinity_error(self, status: int, message: str, kind: str) -> None:
                self._send(Reply(status, {"error": {"message": message, "type": kind, "param": None, "code": status}}))

            def _infinity_rerank(self, body: dict[str, Any]) -> None:
                model = body.get("model", "default/not-specified")
                if model not in (server.model_id, "default/not-specified"):
                    return self._infinity_error(400, f"Invalid model: model {model} not in {[server.model_id]}",
                                                "BadRequestError")
                if server.serves != "reranker":
                    return self._infinity_error(400, f"ModelNotDeployedError: model=`{model}` does not support `rerank`. "
                                                     "Reason: the loaded moded cannot fullyfill `rerank`. Options are "
                                                     f"{set(_CAPABILITIES[server.serves])}.", "BadRequestError")
                documents = [d.strip() for d in body.get("documents") or []]  # INPUT_STRING strips whitespace
                if not 1 <= len(documents) <= 2048:
                    return self._send(Reply(422, {"detail": [{"type": "too_short" if not documents else "too_long",
                                                              "loc": ["body", "documents"], "msg": "List length"}]}))
                query = str(body["query"]).strip()
                scores = server.logits(query, documents).astype(np.float64)
                if not body.get("raw_scores", False):
                    scores = 1 / (1 + np.exp(-np.array(scores)))  # infinity's sigmoid, numpy
                results = [{"relevance_score": float(s), "index": i,
                            **({"document": documents[i]} if body.get("return_documents") else {})}
                           for i, s in enumerate(scores)]
                if server.sorted_answers:
                    results.sort(key=lambda r: r["relevance_score"], reverse=True)
                top_n = body.get("top_n")
                if isinstance(top_n, int) and top_n > 0:
                    results = results[:top_n]
                tokens = sum(server.pair_tokens(query, d) for d in documents)
                self._send(Reply(200, {"object": "rerank", "results": results, "model": server.model_id,
                                       "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                                       "id": "infinity-0", "created": int(time.time())}))

        return Handler
