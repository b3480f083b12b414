"""Remote backends: the Hugging Face Inference API, text-embeddings-inference, OpenAI-compatible.

Each speaks its real protocol (checked against huggingface_hub's hf-inference provider and TEI's
API); `RemoteBackend` adds what a batch job needs on top of one HTTP call:
- a pooled requests.Session, `api_batch_size` texts per request and `concurrency` requests in
  flight, results placed back in input order;
- 413 (too many inputs / body too large) halves the batch, and the size that worked is kept;
- retries by type: connection errors, timeouts, 429 (Retry-After honoured), 500/502/503/504
  (503 "model is loading" waits its estimated_time) are transient; 400/401/403/404/422 are
  terminal one-line errors with the fix;
- every answer is checked (count, shape, dimension, finite) before it can reach an output.
The token is only ever put in the Authorization header; errors are built without it.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

from urllib.parse import urlparse

import numpy as np
import requests
from requests.adapters import HTTPAdapter
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt, stop_before_delay

from ..errors import InputError, ModelLoadError, RemoteError, TerminalBackendError, TransientBackendError

HF_ROUTER = "https://router.huggingface.co"
REMOTE_KINDS = ("hf-api", "tei", "openai")
_TRANSIENT_STATUS = {429, 500, 502, 503, 504}
_FIXES = {
    400: "the server rejected the request; check --model and the input texts",
    401: "the token is missing or invalid; set HF_TOKEN (or HUGGINGFACE_TOKEN) to a valid token",
    403: "the token may not use this model or endpoint; check its permissions (gated models need access)",
    404: "no such model or route; check --model and --endpoint",
    422: "the server could not process the inputs; check --model supports feature-extraction",
}


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5  # tries per request, first included
    ceiling_seconds: float = 300.0  # give up on a request after this long, retries included
    max_wait_seconds: float = 60.0  # longest single wait (Retry-After / estimated_time capped here)
    base_wait_seconds: float = 0.5  # exponential backoff starts here, with jitter


class PayloadTooLarge(Exception):
    """413: fewer inputs per request will do."""


class RetryableHTTPError(TransientBackendError):
    def __init__(self, message: str, cause: str, wait: float | None = None):
        super().__init__(message)
        self.cause = cause
        self.wait = wait


def hf_router() -> str:
    """The Inference Providers router; HFBATCH_HF_ROUTER points it at a proxy (or a test server)."""
    return os.environ.get("HFBATCH_HF_ROUTER", HF_ROUTER).rstrip("/")


def resolve_token(explicit: str | None = None) -> str | None:
    """--token, else HF_TOKEN, else HUGGINGFACE_TOKEN, else the hub's stored login."""
    token = explicit or os.environ.get("HF_TOKEN") or os.environ.get("HUGGINGFACE_TOKEN")
    if token:
        return token
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:  # no stored login, or it cannot be read: go without
        return None


class _Protocol:
    """How one kind of server wants texts in and vectors out."""

    name = ""

    def __init__(self, model: str, endpoint: str | None, normalize: bool):
        self.model, self.endpoint, self.normalize = model, endpoint, normalize

    def url(self) -> str:
        raise NotImplementedError

    def body(self, texts: Sequence[str]) -> dict[str, Any]:
        # TEI and the HF Inference API take parameters at the top level, beside "inputs".
        return {"inputs": list(texts), "normalize": self.normalize, "truncate": True, "truncation_direction": "Right"}

    def vectors(self, payload: Any, n: int) -> Any:
        return payload


class HfApiProtocol(_Protocol):
    name = "hf-api"

    def url(self) -> str:
        if self.endpoint:  # a dedicated Inference Endpoint or a proxy of the same route
            return self.endpoint
        return f"{hf_router()}/hf-inference/models/{self.model}/pipeline/feature-extraction"


class TeiProtocol(_Protocol):
    name = "tei"

    def url(self) -> str:
        if not self.endpoint:
            raise InputError("--backend tei needs --endpoint URL (the TEI server, e.g. http://gpu-box:8080).")
        return self.endpoint.rstrip("/") + "/embed"


class OpenAIProtocol(_Protocol):
    name = "openai"

    def url(self) -> str:
        if not self.endpoint:
            raise InputError("--backend openai needs --endpoint URL (the API base, e.g. http://127.0.0.1:7997/v1).")
        base = self.endpoint.rstrip("/")
        return base if base.endswith("/embeddings") else base + "/embeddings"

    def body(self, texts: Sequence[str]) -> dict[str, Any]:
        return {"input": list(texts), "model": self.model, "encoding_format": "float"}

    def vectors(self, payload: Any, n: int) -> Any:
        if not isinstance(payload, dict) or not isinstance(payload.get("data"), list):
            raise RemoteError("the OpenAI-compatible server answered without a 'data' list; nothing was written.")
        items = payload["data"]
        try:
            ordered = sorted(items, key=lambda item: int(item["index"]))  # results carry their input index
            if [int(item["index"]) for item in ordered] != list(range(len(items))):
                raise ValueError("indexes are not 0..n-1")
            return [item["embedding"] for item in ordered]
        except (KeyError, TypeError, ValueError) as exc:
            raise RemoteError(f"the OpenAI-compatible server's 'data' items are malformed ({exc}); nothing was written.") from None


_PROTOCOLS = {"hf-api": HfApiProtocol, "tei": TeiProtocol, "openai": OpenAIProtocol}


class RemoteBackend:
    """Embeddings over HTTP. Nothing connects until the first `embed`."""

    def __init__(
        self,
        kind: str,
        *,
        model: str,
        endpoint: str | None = None,
        token: str | None = None,
        normalize: bool = True,
        api_batch_size: int = 32,
        concurrency: int = 4,
        timeout: float = 60.0,
        retry: RetryPolicy = RetryPolicy(),
        pooling: str | None = None,
        tokenizer: str | None = None,
    ):
        if kind not in _PROTOCOLS:
            raise InputError(f"--backend {kind!r} is not a remote backend; use one of: {', '.join(REMOTE_KINDS)}.")
        if api_batch_size < 1 or concurrency < 1:
            raise InputError("--api-batch-size and --api-concurrency must be at least 1.")
        if endpoint is not None and urlparse(endpoint).scheme not in ("http", "https"):
            raise InputError(f"--endpoint {endpoint!r} is not an http(s) URL; give it like http://gpu-box:8080.")
        if pooling not in (None, "mean"):
            raise InputError(f"--remote-pooling {pooling!r}: only 'mean' is supported.")
        self.name = kind
        self.model_id = model
        self.endpoint = endpoint
        self.normalize = normalize
        self.concurrency = concurrency
        self.timeout = timeout
        self.retry = retry
        self.pooling = pooling
        self._protocol = _PROTOCOLS[kind](model, endpoint, normalize)
        self._token = token
        self._batch_size = api_batch_size
        self._batch_lock = threading.Lock()
        self._session: requests.Session | None = None
        self._dim: int | None = None
        self._tokenizer_source = tokenizer or model
        self._tokens: Any = None  # a LocalBackend used for its tokenizer only
        self.stats: Counter[str] = Counter()  # requests, retries, retry causes, batch halvings
        self._stats_lock = threading.Lock()
        self.load_seconds = 0.0
        self._revision: str | None = None
        self.served_model: str | None = None

    @property
    def batch_texts(self) -> int:
        """Texts the pipeline should hand over per call: enough to keep every connection busy."""
        return self._batch_size * self.concurrency

    # --- identity ------------------------------------------------------------------------------

    def fingerprint(self) -> str:
        """Kind, model (and the revision the server or hub reports), endpoint and normalisation:
        vectors of another server, model or revision never share a cache namespace. Asks TEI's
        /info (or the hub) once; unknown revisions leave the endpoint to tell servers apart."""
        where = self.endpoint or hf_router()
        revision = self.hub_revision()
        served = self.served_model or self.model_id
        return (f"{self.name}:{served}@{revision or 'unresolved'}:{where};"
                f"normalize={self.normalize};pooling={self.pooling or 'server'}")

    def dimension(self) -> int:
        if self._dim is None:
            self.embed(["dimension probe"])
        assert self._dim is not None
        return self._dim

    @property
    def max_length(self) -> int:
        return self._token_backend().max_length

    def token_counts(self, texts: Sequence[str]) -> list[int]:
        """Counted by the model's own tokenizer (hub, cache or --tokenizer), as for the local backend."""
        return self._token_backend().token_counts(texts)

    def _token_backend(self) -> Any:
        if self._tokens is None:
            from .local import LocalBackend

            self._tokens = LocalBackend(self._tokenizer_source)
            try:
                _ = self._tokens.model_dir
            except ModelLoadError as exc:
                raise ModelLoadError(
                    f"token counts need the tokenizer of {self._tokenizer_source}, which cannot be found ({exc}); "
                    "pass --tokenizer with a hub id or local directory that has it."
                ) from None
        return self._tokens

    def hub_revision(self) -> str | None:
        """The commit sha of the model: from TEI's /info, else the hub's model info (None offline)."""
        if self._revision is not None:
            return self._revision or None
        self._revision = ""
        if self.name == "tei" and self.endpoint:
            try:
                info = self._session_().get(self.endpoint.rstrip("/") + "/info", timeout=min(self.timeout, 10)).json()
                self._revision = str(info.get("model_sha") or "")
                self.served_model = info.get("model_id")
            except (requests.RequestException, ValueError, AttributeError):
                pass
        if not self._revision and "/" in self.model_id:
            self._revision = _hub_sha(self.model_id, resolve_token(None)) or ""  # the HF token, to the hub only
        return self._revision or None

    def describe(self) -> dict[str, Any]:
        revision = self._revision or None
        return {
            "backend": self.name,
            "model_id": self.model_id,
            "served_model_id": self.served_model,
            "endpoint": self._protocol.url() if self.name == "hf-api" or self.endpoint else None,
            "model_source": f"remote ({self.name})",
            "revision": f"hub:{self.model_id}@{revision}" if revision else None,
            "device": f"remote ({self.name})",
            "dim": self._dim,
            "normalize": self.normalize,
            "pooling": self.pooling or "server",
            "api_batch_size": self._batch_size,
            "api_concurrency": self.concurrency,
            "requests": self.stats["requests"],
            "retries": self.stats["retries"],
            "retry_causes": {k[6:]: v for k, v in self.stats.items() if k.startswith("cause:")},
            "batch_halvings": self.stats["halvings"],
            "model_loaded": self._session is not None,
            "load_seconds": 0.0,
        }

    # --- embedding -----------------------------------------------------------------------------

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Vectors for `texts` in order; several requests in flight, each retried on its own."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, self._dim or 0), dtype=np.float32)
        size = self._batch_size
        parts = [texts[i : i + size] for i in range(0, len(texts), size)]
        if len(parts) == 1 or self.concurrency == 1:
            results = [self._embed_part(p) for p in parts]
        else:
            with ThreadPoolExecutor(max_workers=min(self.concurrency, len(parts))) as pool:
                results = list(pool.map(self._embed_part, parts))  # map keeps input order
        out = np.concatenate(results, axis=0)
        if out.shape[0] != len(texts):
            raise RemoteError(f"{self.name} returned {out.shape[0]} vectors for {len(texts)} texts; nothing was written.")
        return out

    def _embed_part(self, texts: list[str]) -> np.ndarray:
        try:
            return self._request_with_retries(texts)
        except PayloadTooLarge:
            if len(texts) == 1:
                raise TerminalBackendError(
                    f"{self.name} refused a single text as too large (413); "
                    "lower --max-length or raise the server's payload limit."
                ) from None
            half = len(texts) // 2
            with self._batch_lock:  # keep the size that works for the rest of the job
                if half < self._batch_size:
                    self._batch_size = half
                    self._count("halvings")
            return np.concatenate([self._embed_part(texts[:half]), self._embed_part(texts[half:])], axis=0)

    def _request_with_retries(self, texts: list[str]) -> np.ndarray:
        retrying = Retrying(
            retry=retry_if_exception_type(RetryableHTTPError),
            # stop_before_delay: never start a wait that would end past the ceiling
            stop=stop_after_attempt(self.retry.attempts) | stop_before_delay(self.retry.ceiling_seconds),
            wait=self._wait,
            before_sleep=self._count_retry,
            reraise=True,
        )
        try:
            return retrying(self._request, texts)
        except RetryableHTTPError as exc:
            tries = retrying.statistics.get("attempt_number", self.retry.attempts)
            raise TransientBackendError(
                f"{exc} (gave up after {tries} attempt{'s' if tries != 1 else ''}, --api-retries {self.retry.attempts}, "
                f"--api-retry-ceiling {self.retry.ceiling_seconds:g}s)"
            ) from None

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, RetryableHTTPError) and exc.wait is not None:
            return min(max(exc.wait, 0.0), self.retry.max_wait_seconds)
        backoff = self.retry.base_wait_seconds * 2 ** (state.attempt_number - 1)
        return min(backoff * (0.5 + np.random.random()), self.retry.max_wait_seconds)  # jitter

    def _count_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        self._count("retries")
        self._count(f"cause:{getattr(exc, 'cause', 'unknown')}")

    def _count(self, key: str) -> None:
        with self._stats_lock:  # requests run on several threads
            self.stats[key] += 1

    def _session_(self) -> requests.Session:
        with self._batch_lock:  # the first requests start on several threads at once
            return self._session if self._session is not None else self._new_session()

    def _new_session(self) -> requests.Session:
        if self._session is None:
            session = requests.Session()
            adapter = HTTPAdapter(pool_connections=self.concurrency, pool_maxsize=self.concurrency, max_retries=0)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            session.headers["User-Agent"] = "hfbatch"
            self._token = self._credential()
            if self._token:
                session.headers["Authorization"] = f"Bearer {self._token}"
            self._session = session
        return self._session

    def _credential(self) -> str | None:
        """The Hugging Face token goes to Hugging Face hosts (and the router you configured) only;
        any other server gets HFBATCH_API_KEY, if set, so a token never leaks to a third party."""
        url = self._protocol.url()
        host = (urlparse(url).hostname or "").lower()
        hf_host = host == "huggingface.co" or host.endswith((".huggingface.co", ".huggingface.cloud", ".hf.space"))
        if hf_host or (self.name == "hf-api" and not self.endpoint):
            return resolve_token(self._token)
        return self._token or os.environ.get("HFBATCH_API_KEY") or None

    def _request(self, texts: list[str]) -> np.ndarray:
        url = self._protocol.url()
        self._count("requests")
        try:
            response = self._session_().post(url, json=self._protocol.body(texts), timeout=self.timeout)
        except requests.Timeout:
            raise RetryableHTTPError(f"{self.name}: no answer from {url} within {self.timeout:g}s", "timeout") from None
        except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as exc:
            raise RetryableHTTPError(f"{self.name}: cannot connect to {url} ({type(exc).__name__})", "connection") from None
        except requests.RequestException as exc:  # bad URL, redirect loop, undecodable body: retrying won't help
            raise TerminalBackendError(f"{self.name}: request to {url} failed ({type(exc).__name__}); check --endpoint.") from None
        status = response.status_code
        if status == 413:
            raise PayloadTooLarge()
        if status in _TRANSIENT_STATUS:
            raise RetryableHTTPError(f"{self.name}: {url} answered {status} {_error_text(response)}", str(status), _server_wait(response))
        if status >= 400:
            fix = _FIXES.get(status, "check the endpoint and model")
            raise TerminalBackendError(f"{self.name}: {url} answered {status} {_error_text(response)}; {fix}.")
        try:
            payload = response.json()
        except ValueError:
            raise RemoteError(f"{self.name}: {url} answered {status} with a body that is not JSON; nothing was written.") from None
        return self._check(self._protocol.vectors(payload, len(texts)), len(texts), url)

    def _check(self, raw: Any, n: int, url: str) -> np.ndarray:
        """1-D (one input), 2-D (pooled) or 3-D (token level, mean-pooled only when asked)."""
        if not isinstance(raw, list):
            raise RemoteError(
                f"{self.name}: {url} answered a JSON {type(raw).__name__} instead of a list of vectors "
                f"({_short_json(raw)}); nothing was written."
            )
        if isinstance(raw, list) and raw and isinstance(raw[0], list) and raw[0] and isinstance(raw[0][0], list):
            if self.pooling != "mean":
                raise RemoteError(
                    f"{self.name}: {url} returned token-level vectors (3-D), not one vector per text; "
                    "use a sentence-embedding model, or pass --remote-pooling mean to average the tokens."
                )
            raw = [np.asarray(tokens, dtype=np.float32).mean(axis=0) for tokens in raw]
            if self.normalize:
                raw = [v / max(float(np.linalg.norm(v)), 1e-12) for v in raw]
        try:
            array = np.asarray(raw, dtype=np.float32)
        except (TypeError, ValueError):
            raise RemoteError(f"{self.name}: {url} returned vectors of uneven length; nothing was written.") from None
        if array.ndim == 1 and n == 1:
            array = array.reshape(1, -1)
        if array.ndim != 2 or array.shape[0] != n or array.shape[1] == 0:
            raise RemoteError(f"{self.name}: {url} returned shape {array.shape} for {n} texts; nothing was written.")
        if self._dim is not None and array.shape[1] != self._dim:
            raise RemoteError(
                f"{self.name}: {url} returned {array.shape[1]}-dimensional vectors after {self._dim}-dimensional ones; "
                "nothing was written."
            )
        if not np.isfinite(array).all():
            raise RemoteError(f"{self.name}: {url} returned NaN or infinite values; nothing was written.")
        if self.name == "openai" and self.normalize:  # the OpenAI protocol has no normalize flag
            array = array / np.maximum(np.linalg.norm(array, axis=1, keepdims=True), 1e-12)
        self._dim = array.shape[1]
        return array


def _hub_sha(model: str, token: str | None) -> str | None:
    """The model's current commit on the hub, or None when offline or unknown (never raises)."""
    try:
        from huggingface_hub import HfApi, constants

        if constants.HF_HUB_OFFLINE:
            return None
        return HfApi().model_info(model, timeout=10, token=token or False).sha
    except Exception:  # offline, private, unknown: the provenance just says "unresolved"
        return None


def _server_wait(response: requests.Response) -> float | None:
    """Seconds the server asked us to wait: Retry-After, or a loading model's estimated_time."""
    header = response.headers.get("Retry-After")
    if header:
        try:
            return float(header)
        except ValueError:
            from email.utils import parsedate_to_datetime

            try:
                return max(0.0, parsedate_to_datetime(header).timestamp() - time.time())
            except (TypeError, ValueError):
                return None
    try:
        body = response.json()
    except ValueError:
        return None
    if isinstance(body, dict) and isinstance(body.get("estimated_time"), (int, float)):
        return float(body["estimated_time"])
    return None


def _short_json(value: Any) -> str:
    import json

    return json.dumps(value, default=str)[:120]


def _error_text(response: requests.Response) -> str:
    """The server's own error message, short, if it sent one."""
    try:
        body = response.json()
        message = body.get("error") or body.get("message") if isinstance(body, dict) else None
        if isinstance(message, dict):
            message = message.get("message")
    except ValueError:
        message = response.text
    message = " ".join(str(message or response.reason or "").split())[:200]
    return f"({message})" if message else ""


__all__ = ["RemoteBackend", "RetryPolicy", "resolve_token", "REMOTE_KINDS"]
