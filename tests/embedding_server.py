"""A real HTTP server on 127.0.0.1 that speaks the three embedding protocols with the real model.

Routes, as the real servers have them:
- TEI:      POST /embed  {"inputs": [...], "normalize", "truncate", "truncation_direction", "prompt_name"?}
            -> [[...], ...]
            GET  /info   -> {"model_id", "max_client_batch_size", ...}
- HF API:   POST /hf-inference/models/<model>/pipeline/feature-extraction (same body as TEI)
- OpenAI:   POST /v1/embeddings {"input": [...], "model"} -> {"object": "list", "data": [{"embedding", "index"}],
            "model", "usage": {"prompt_tokens", "total_tokens"}}: usage per request, the tokens of all its
            inputs as the model read them (truncated at its max_seq_length, as TEI's /v1 route counts;
            vLLM sums each prompt's token ids), never per input. `openai_usage` plays servers that
            leave it out (None) or send something else (a value sent as it is).

Faults are scripted per request (`script`), so tests can play 429 + Retry-After, 503 loading,
500, 401, 413, malformed JSON or a wrong dimension exactly as a server would send them; or drawn at
random (`chaos_rate`) from 429/500/502/503/504, a late answer (timeout) and a dropped connection
(reset), for fault injection at scale. `fast` answers hash-based vectors instead of the model's.

`prompts` plays the model's config_sentence_transformers.json `prompts` as TEI reads them: a
request's "prompt_name" (TEI and HF API routes) puts that prompt's text before each input before it
is encoded (core/src/tokenization.rs, prepare_pre_prompt / tokenize_input: `pre_prompt.push_str(&s)`);
a name the server does not have is TEI's Validation error, which TEI's router answers with 413
(ErrorType::Validation => StatusCode::PAYLOAD_TOO_LARGE in router/src/http/server.rs) and
{"error": "Input validation error: `default-prompt-name` is set to `X` but it was not found in the
Sentence Transformers prompts. Available prompts: [...]", "error_type": "Validation"}
(`prompt_error_status` plays another server's status for it, e.g. 422).
"""

from __future__ import annotations

import json
import random
import sys
import threading
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

import numpy as np


CHAOS = ("429", "500", "502", "503", "504", "timeout", "reset")


@dataclass
class Reply:
    status: int
    body: Any = None  # JSON-serialisable, or bytes sent as they are
    headers: dict[str, str] = field(default_factory=dict)


CHAOS_REPLIES = {
    "429": Reply(429, {"error": "rate limited"}, {"Retry-After": "0"}),
    "500": Reply(500, {"error": "internal error"}),
    "502": Reply(502, b"<html>bad gateway</html>"),
    "503": Reply(503, {"error": "Model is loading", "estimated_time": 0.01}),
    "504": Reply(504, {"error": "gateway timeout"}),
}


class JsonHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive, quiet, and `_send(Reply)` for JSON (or raw bytes) answers."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, reply: Reply) -> None:
        data = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
        self.send_response(reply.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in reply.headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that gave up (closed its end while an answer was written) is the client's
        story, told by what the test checks of it; socketserver would print a traceback to the
        process's stderr, which a CliRunner test captures as if the CLI had printed it."""
        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            return
        super().handle_error(request, client_address)


class LocalServer:
    """A ThreadingHTTPServer on 127.0.0.1 (a free port) run in a thread, as a context manager."""

    def _serve(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self._httpd = _Server(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        # shutdown() waits for the loop's next poll: 0.5 s by default, per server, per test
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self):  # type: ignore[no-untyped-def]
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


class EmbeddingServer(LocalServer):
    def __init__(self, model: Any):
        self.model = model
        self.script: deque[Reply | Callable[[list[str]], Any]] = deque()  # consumed one per POST
        self.requests: list[dict[str, Any]] = []  # POSTs
        self.gets: list[str] = []  # paths of GETs (/info, /api/models)
        self.max_batch: int | None = None  # inputs above this -> 413, like TEI's max_client_batch_size
        self.delay = 0.0
        self.token_level = False  # answer 3-D token embeddings instead of pooled vectors
        self.shuffle_openai = True
        self.hub_models: list[dict[str, Any]] = []  # answers GET /api/models, as the hub does
        self.hub_status = 200  # set to 503 to play a hub that is down
        self.model_sha = "5f0dcbd2a87cd59ae7b6bdb7ed6e5e4c27c1a0b4"  # what TEI's /info reports
        self.in_flight = 0
        self.max_in_flight = 0
        # random faults, for fault injection at scale: a share of requests gets one of CHAOS
        self.chaos_rate = 0.0
        self.chaos = random.Random(0)
        self.chaos_kinds = CHAOS
        self.chaos_seen: dict[str, int] = {}
        self.hang_seconds = 1.0  # a "timeout" fault answers this late (set it above the client's timeout)
        self.fast = False  # answer deterministic hash-based vectors instead of running the model
        # the model's prompts, as TEI reads them from config_sentence_transformers.json (none by default)
        self.prompts: dict[str, str] = {}
        self.prompt_error_status = 413  # TEI answers an unknown prompt_name so (a Validation error)
        self.encoded: list[str] = []  # every text the model was given, prompt included, in arrival order
        self.openai_usage: Any = "count"  # "count": the real counts; None: no usage; anything else: sent as is
        self._lock = threading.Lock()
        self._serve(self._handler())

    def vectors(self, texts: list[str], normalize: bool = True) -> list:
        if self.fast:  # 16 numbers per text from its hash: same text, same vector, any process
            import hashlib

            out = []
            for text in texts:
                v = np.frombuffer(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=64).digest(),
                                  dtype=np.uint8)[:16].astype(np.float32) - 127.5
                out.append((v / np.linalg.norm(v)).tolist() if normalize else v.tolist())
            return out
        if self.token_level:
            out = self.model.encode(texts, output_value="token_embeddings", convert_to_numpy=False)
            return [np.asarray(t.cpu()).tolist() for t in out]
        return self.model.encode(texts, normalize_embeddings=normalize, convert_to_numpy=True).tolist()

    def tokens_read(self, text: str) -> int:
        """The tokens the model reads of `text`: special tokens included, cut at its max_seq_length."""
        ids = self.model.tokenizer(text, truncation=True, max_length=self.model.max_seq_length)["input_ids"]
        return len(ids)

    def _handler(server) -> type[BaseHTTPRequestHandler]:  # noqa: N805 - closes over the server
        class Handler(JsonHandler):

            def do_GET(self) -> None:
                self._record = None  # a kept-alive connection's earlier POST keeps the status it was answered
                with server._lock:
                    server.gets.append(self.path)
                if self.path.startswith("/api/models") and server.hub_status != 200:
                    self._send(Reply(server.hub_status, {"error": "Service Unavailable"}))
                elif self.path.startswith("/api/models"):
                    self._send(Reply(200, server.hub_models))
                elif self.path == "/info":
                    self._send(Reply(200, {"model_id": "sentence-transformers/all-MiniLM-L6-v2", "model_sha": server.model_sha,
                                           "max_client_batch_size": server.max_batch or 32, "max_input_length": 256}))
                else:
                    self._send(Reply(404, {"error": "Not Found"}))

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                self._record: dict[str, Any] = {"path": self.path, "headers": dict(self.headers), "body": body}
                with server._lock:
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    server.requests.append(self._record)
                    step = server.script.popleft() if server.script else None
                    fault = None
                    if step is None and server.chaos_rate and server.chaos.random() < server.chaos_rate:
                        fault = server.chaos.choice(server.chaos_kinds)
                        server.chaos_seen[fault] = server.chaos_seen.get(fault, 0) + 1
                if fault == "reset":  # the connection drops without an answer
                    self.close_connection = True
                    with server._lock:
                        server.in_flight -= 1
                    return
                if fault == "timeout":
                    threading.Event().wait(server.hang_seconds)
                elif fault is not None:
                    step = CHAOS_REPLIES[fault]
                try:
                    if server.delay:
                        threading.Event().wait(server.delay)
                    self._answer(body, step)
                finally:
                    with server._lock:
                        server.in_flight -= 1

            def _send(self, reply: Reply) -> None:
                record = getattr(self, "_record", None)
                if record is not None:  # what this request was answered, beside what it sent
                    record["status"] = reply.status
                super()._send(reply)

            def _answer(self, body: dict[str, Any], step: Any) -> None:
                openai = self.path.rstrip("/").endswith("/embeddings")
                tei = self.path == "/embed"
                hf = self.path.startswith("/hf-inference/models/") and self.path.endswith("/pipeline/feature-extraction")
                if not (openai or tei or hf):
                    return self._send(Reply(404, {"error": f"no route {self.path}"}))
                texts = body.get("input" if openai else "inputs")
                texts = [texts] if isinstance(texts, str) else texts
                if isinstance(step, Reply):
                    return self._send(step)
                if server.max_batch is not None and len(texts) > server.max_batch:
                    return self._send(Reply(413, {"error": f"batch size {len(texts)} > maximum allowed batch size {server.max_batch}",
                                                  "error_type": "Validation"}))
                name = body.get("prompt_name") if not openai else None
                if name is not None:  # TEI: the named prompt's text put before each input, then tokenized
                    if name not in server.prompts:
                        return self._send(Reply(server.prompt_error_status, {"error": _unknown_prompt(name, server.prompts),
                                                                             "error_type": "Validation"}))
                    texts = [server.prompts[name] + t for t in texts]
                with server._lock:
                    server.encoded.extend(texts)
                vectors = step(texts) if callable(step) else server.vectors(texts, bool(body.get("normalize", True)))
                if openai:
                    data = [{"object": "embedding", "embedding": v, "index": i} for i, v in enumerate(vectors)]
                    if server.shuffle_openai:
                        random.Random(len(texts)).shuffle(data)  # results carry their index; order is not promised
                    answer = {"object": "list", "data": data, "model": body.get("model")}
                    if server.openai_usage == "count":  # one total for the request, as the real servers count
                        tokens = sum(server.tokens_read(t) for t in texts)
                        answer["usage"] = {"prompt_tokens": tokens, "total_tokens": tokens}
                    elif server.openai_usage is not None:
                        answer["usage"] = server.openai_usage
                    self._record["usage"] = answer.get("usage")
                    return self._send(Reply(200, answer))
                return self._send(Reply(200, vectors))

        return Handler


def _unknown_prompt(name: str, prompts: dict[str, str]) -> str:
    """TEI's message for a prompt_name its model does not have (prepare_pre_prompt, with the
    "Input validation error: " that TextEmbeddingsError::Validation's Display puts first)."""
    if not prompts:
        said = f"`default-prompt-name` is set to `{name}` but no prompts were found in the Sentence Transformers configuration"
    else:
        said = (f"`default-prompt-name` is set to `{name}` but it was not found in the Sentence Transformers prompts. "
                f"Available prompts: {json.dumps(sorted(prompts))}")
    return f"Input validation error: {said}"


class CaptureServer(LocalServer):
    """Records every request as it arrives and answers it, for seeing what a client would send:
    as HTTP_PROXY it receives requests meant for any host name (absolute-form targets such as
    `http://attacker-space.hf.space/ok`, or `CONNECT host:443` for https, answered 403 so the client
    gives up at once), without any name being resolved or any outside address reached.
    POSTs get vectors of 4 numbers per input (the TEI / HF API shape), or `reply` when set."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []  # method, target (path or absolute URL), headers
        self.reply: Reply | None = None
        self._lock = threading.Lock()
        self._serve(self._handler())

    def _handler(server) -> type[BaseHTTPRequestHandler]:  # noqa: N805 - closes over the server
        class Handler(JsonHandler):

            def _record(self) -> Any:
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"null") if length else None
                with server._lock:
                    server.requests.append({"method": self.command, "target": self.path,
                                            "headers": dict(self.headers), "body": body})
                return body

            def do_CONNECT(self) -> None:  # noqa: N802 - http.server's name
                self._record()
                self.close_connection = True
                self._send(Reply(403, {"error": "capture server: no tunnels"}))

            def do_GET(self) -> None:  # noqa: N802
                self._record()
                self._send(server.reply or Reply(404, {"error": "Not Found"}))

            def do_POST(self) -> None:  # noqa: N802
                body = self._record()
                texts = body.get("inputs", body.get("input")) if isinstance(body, dict) else None
                texts = [texts] if isinstance(texts, str) else texts or []
                self._send(server.reply or Reply(200, [[0.5, 0.5, 0.5, 0.5] for _ in texts]))

        return Handler


def route_through(monkeypatch: Any, proxy: LocalServer) -> None:
    """Send every request for any host through `proxy` (both spellings of the variables, and no
    NO_PROXY exemption), as the issue's reporter did to see what would leave the machine."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(name, proxy.url)
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
