"""The request/response protocols of the remote embedding servers: how the HF Inference API,
text-embeddings-inference and OpenAI-compatible servers want texts in and give vectors (and token
usage) back, and the check every answer passes before any of its vectors can reach an output.

Its own module because it is the wire, and only the wire: no retries, concurrency, tokenizer or
identity (remote.py's RemoteBackend and http.py's HttpClient own those), so a new kind of server is
one class here, and a malformed answer is refused in one place.
"""

from __future__ import annotations

import threading
from typing import Any, Sequence

import numpy as np

from ..errors import InputError, RemoteError
from ..vectors import l2_normalize
from .http import hf_router, short_json


class Protocol:
    """How one kind of server wants texts in and vectors out."""

    name = ""

    def __init__(self, model: str, endpoint: str | None, normalize: bool):
        self.model, self.endpoint, self.normalize = model, endpoint, normalize

    def url(self) -> str:
        raise NotImplementedError

    def body(self, texts: Sequence[str], prompt_name: str | None = None) -> dict[str, Any]:
        # TEI and the HF Inference API take parameters at the top level, beside "inputs".
        body = {"inputs": list(texts), "normalize": self.normalize, "truncate": True, "truncation_direction": "Right"}
        if prompt_name is not None:  # the server puts its prompt of that name before each text
            body["prompt_name"] = prompt_name
        return body

    def vectors(self, payload: Any, n: int) -> Any:
        return payload

    def usage(self, payload: Any) -> tuple[int, int] | None:
        """(prompt_tokens, total_tokens) the server reports for one request, or None (TEI's /embed
        and the HF API report none)."""
        return None


class HfApiProtocol(Protocol):
    name = "hf-api"

    def url(self) -> str:
        if self.endpoint:  # a dedicated Inference Endpoint or a proxy of the same route
            return self.endpoint
        return f"{hf_router()}/hf-inference/models/{self.model}/pipeline/feature-extraction"


class TeiProtocol(Protocol):
    name = "tei"

    def url(self) -> str:
        if not self.endpoint:
            raise InputError("--backend tei needs --endpoint URL (the TEI server, e.g. http://gpu-box:8080).")
        return self.endpoint.rstrip("/") + "/embed"


class OpenAIProtocol(Protocol):
    name = "openai"

    def url(self) -> str:
        if not self.endpoint:
            raise InputError("--backend openai needs --endpoint URL (the API base, e.g. http://127.0.0.1:7997/v1).")
        base = self.endpoint.rstrip("/")
        return base if base.endswith("/embeddings") else base + "/embeddings"

    def body(self, texts: Sequence[str], prompt_name: str | None = None) -> dict[str, Any]:
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

    def usage(self, payload: Any) -> tuple[int, int] | None:
        """`usage` of one answer: {"prompt_tokens": n, "total_tokens": m}, for all its inputs together
        (OpenAI's CreateEmbeddingResponse; vLLM sums each prompt's token ids, TEI each input's tokens
        after its truncation). A server that leaves it out, or sends something else, reports nothing."""
        usage = payload.get("usage") if isinstance(payload, dict) else None
        if not isinstance(usage, dict):
            return None
        prompt, total = usage.get("prompt_tokens"), usage.get("total_tokens", usage.get("prompt_tokens"))
        if type(prompt) is not int or type(total) is not int or prompt < 0 or total < 0:  # not bool, not "12"
            return None
        return prompt, total


PROTOCOLS = {"hf-api": HfApiProtocol, "tei": TeiProtocol, "openai": OpenAIProtocol}


class UsageTotals:
    """The server's own token counts (Protocol.usage), summed over the answers whose vectors were
    taken; thread-safe (several requests in flight)."""

    def __init__(self) -> None:
        self._totals = {"prompt_tokens": 0, "total_tokens": 0, "requests": 0, "requests_without_usage": 0}
        self._lock = threading.Lock()

    def add(self, reported: tuple[int, int] | None) -> None:
        with self._lock:
            self._totals["requests"] += 1
            if reported is None:
                self._totals["requests_without_usage"] += 1
            else:
                self._totals["prompt_tokens"] += reported[0]
                self._totals["total_tokens"] += reported[1]

    def totals(self) -> dict[str, int]:
        """prompt_tokens, total_tokens, requests, and requests_without_usage (answers that carried none)."""
        with self._lock:
            return dict(self._totals)


def check_vectors(raw: Any, n: int, url: str, *, kind: str, pooling: str | None, normalize: bool,
                  dim: int | None) -> np.ndarray:
    """The `n` vectors of one answer as float32 [n, dim], or RemoteError (nothing written): 1-D
    (one input), 2-D (pooled) or 3-D (token level, mean-pooled only when `pooling` is "mean");
    numbers only, finite, of the dimension `dim` already received (None: any)."""
    if not isinstance(raw, list):
        raise RemoteError(
            f"{kind}: {url} answered a JSON {type(raw).__name__} instead of a list of vectors "
            f"({short_json(raw)}); nothing was written."
        )
    token_level = bool(raw) and isinstance(raw[0], list) and bool(raw[0]) and isinstance(raw[0][0], list)
    one_vector = n == 1 and bool(raw) and not isinstance(raw[0], list)
    bad = _first_non_number(raw, 3 if token_level else 1 if one_vector else 2)
    if bad is not None:  # numpy would quietly turn "0.1", true or a nested list into numbers
        raise RemoteError(f"{kind}: {url} answered {bad} where numbers belong; nothing was written.")
    if token_level:
        if pooling != "mean":
            raise RemoteError(
                f"{kind}: {url} returned token-level vectors (3-D), not one vector per text; "
                "use a sentence-embedding model, or pass --remote-pooling mean to average the tokens."
            )
        raw = [np.asarray(tokens, dtype=np.float32).mean(axis=0) for tokens in raw]
        if normalize:
            raw = [l2_normalize(v) for v in raw]
    try:
        array = np.asarray(raw, dtype=np.float32)
    except (TypeError, ValueError):
        raise RemoteError(f"{kind}: {url} returned vectors of uneven length; nothing was written.") from None
    if array.ndim == 1 and n == 1:
        array = array.reshape(1, -1)
    if array.ndim != 2 or array.shape[0] != n or array.shape[1] == 0:
        raise RemoteError(f"{kind}: {url} returned shape {array.shape} for {n} texts; nothing was written.")
    if dim is not None and array.shape[1] != dim:
        raise RemoteError(
            f"{kind}: {url} returned {array.shape[1]}-dimensional vectors after {dim}-dimensional ones; "
            "nothing was written."
        )
    if not np.isfinite(array).all():
        raise RemoteError(f"{kind}: {url} returned NaN or infinite values; nothing was written.")
    if kind == "openai" and normalize:  # the OpenAI protocol has no normalize flag
        array = l2_normalize(array)
    return array


def _first_non_number(value: Any, depth: int) -> str | None:
    """The first value of a `depth`-deep list of lists that is not a JSON number, described, or
    None. (A number where a list belongs is a shape error, left to the shape checks.)"""
    if depth == 0 or not isinstance(value, list):
        if type(value) in (int, float):  # not bool: json gives True as a bool, numpy would make it 1.0
            return None
        if isinstance(value, list):
            return f"a list nested deeper than vectors ({short_json(value)[:40]})"
        if value is None:
            return "null"
        kind = {str: "a string", bool: "a boolean", dict: "an object"}.get(type(value), "a value")
        return f"{kind} ({short_json(value)[:40]})"
    for item in value:
        if depth == 1 and type(item) in (int, float):  # the common case, kept cheap (~1,000 per vector)
            continue
        bad = _first_non_number(item, depth - 1)
        if bad is not None:
            return bad
    return None
