"""Remote backends: the Hugging Face Inference API, text-embeddings-inference, OpenAI-compatible.

Each speaks its real protocol (checked against huggingface_hub's hf-inference provider and TEI's
API); `RemoteBackend` adds what a batch job needs on top of one HTTP call (retries, credentials
and error rules are HttpClient's, shared with remote generation):
- `api_batch_size` texts per request and `concurrency` requests in flight, results placed back
  in input order;
- 413 (too many inputs / body too large) halves the batch, and the size that worked is kept;
- every answer is checked (count, shape, dimension, finite) before it can reach an output.

Token counts come from the model's own tokenizer (its hub id or directory, or --tokenizer), as for
the local backend. An OpenAI-compatible server is often given a served model name that is neither
(`vllm serve /models/bge-m3`, `text-embedding-3-small`): with no tokenizer to be had for it and no
--tokenizer, the backend counts by the server's `usage` instead. OpenAI, vLLM and TEI's /v1 route
report it per request (`prompt_tokens` = `total_tokens` = the tokens of all its inputs, as the
model read them), never per input, so:
- the counts are totals: `describe()["usage"]` sums them over the job's requests; no row is given
  a share of them (a request's mean is not any text's count). `token_counts` answers 0 per text
  (not known before the server answers) and `max_length` a ceiling no count reaches; the job
  writes the rows computed here with n_tokens and truncated null, and the sidecar says why;
- truncation is the server's (TEI --auto-truncate cuts, vLLM and OpenAI refuse a text that is too
  long): nothing is cut here, and which texts the server cut is not known;
- what needs a count before sending refuses in one line naming --tokenizer: --split, and
  --prompt-name (its text is in the model's files).
"""

from __future__ import annotations

import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence
from urllib.parse import urlparse

import numpy as np
import requests

from ..errors import InputError, ModelLoadError, RemoteError, TerminalBackendError
from .http import HttpClient, PayloadTooLarge, RejectedRequest, RetryPolicy, hf_router, public_url, resolve_token
from .hub import hub_sha
from .remote_protocol import PROTOCOLS, UsageTotals, check_vectors
from .tokenizer import Tokens
from .windows import Windows

REMOTE_KINDS = ("hf-api", "tei", "openai")
_FIXES = {422: "the server could not process the inputs; check --model supports feature-extraction"}
# max_length without a tokenizer: the server's limit is not known here. The n_tokens column's
# (int32) ceiling, so no count reaches it and no row is flagged as truncated on a guess.
UNKNOWN_MAX_LENGTH = 2**31 - 1
SERVER_USAGE = "server usage"
log = logging.getLogger(__name__)


class RemoteBackend:
    """Embeddings over HTTP. Nothing connects until the first `embed`; `fingerprint()` never does."""

    remote = True
    kind = "dense"

    def prepare(self, *, measure: bool = True) -> None:
        """The server decides how it computes: nothing to choose here."""

    def setup_seconds(self) -> dict[str, float]:
        return {"model_load": 0.0}  # a server's model is loaded already

    def watch(self, note: Callable[[str], None]) -> None:
        """Nothing slow happens once per job here: no note."""

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
        prompt: str | None = None,
        prompt_name: str | None = None,
    ):
        if kind not in PROTOCOLS:
            raise InputError(f"--backend {kind!r} is not a remote backend; use one of: {', '.join(REMOTE_KINDS)}.")
        if api_batch_size < 1 or concurrency < 1:
            raise InputError("--api-batch-size and --api-concurrency must be at least 1.")
        if endpoint is not None and urlparse(endpoint).scheme not in ("http", "https"):
            raise InputError(f"--endpoint {public_url(endpoint)!r} is not an http(s) URL; give it like http://gpu-box:8080.")
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
        self._protocol = PROTOCOLS[kind](model, endpoint, normalize)
        self._protocol.url()  # builds a string, connects nowhere: a missing --endpoint is a usage error now
        self._http = HttpClient(kind, concurrency=concurrency, timeout=timeout, retry=retry, token=token, fixes=_FIXES)
        self._batch_size = api_batch_size
        self._batch_lock = threading.Lock()
        self._dim: int | None = None
        self._tokenizer_source = tokenizer or model
        self._tokenizer_given = tokenizer is not None  # a --tokenizer that cannot be found is an error, never skipped
        self._prompt_args = (prompt, prompt_name)
        # TEI is sent the prompt's name when it came by one, until the server says it does not know it
        self.prompt_sent_as: str | None = None  # "name" | "text", once a prompt was sent
        self._tokens: Tokens | None = None  # the model's tokenizer, with its prompt and max length
        self._no_tokenizer: str | None = None  # why there is none (openai: the server's usage counts instead)
        self._tokens_lock = threading.Lock()
        # the server's own counts, summed over the requests whose vectors were taken (openai)
        self._usage = UsageTotals()
        self.load_seconds = 0.0
        self._revision: str | None = None
        self.served_model: str | None = None

    @property
    def batch_texts(self) -> int:
        """Texts the pipeline should hand over per call: enough to keep every connection busy."""
        return self._batch_size * self.concurrency

    # --- identity ------------------------------------------------------------------------------

    def fingerprint(self) -> str:
        """Kind, model, endpoint (without credentials), normalisation and pooling: what this
        backend is configured to ask for. Built from the configuration alone, so a fully cached
        rerun makes no request (and an offline one finds the same namespace as an online one).

        The revision a server or the hub reports is not part of it (knowing it takes a request);
        it is recorded in `describe()` once the first `embed` has connected. What keeps the model
        honest instead: hf-api and openai name the model in every request, and TEI, which serves
        whatever it was started with, is asked on the first `embed` what it serves (/info): a
        model other than --model is refused before any of its vectors is used, so (where /info
        answers) every vector in a namespace came from a server that said it serves that model.
        A server redeployed with another revision of the same model behind the same URL shares
        the namespace; the sidecar of each run records the revision it was served."""
        where = public_url(self.endpoint or hf_router())  # credentials are not identity
        given, name = self._prompt_args  # as configured: naming the prompt needs no file (none: the namespace of old)
        prompt = f";prompt={json.dumps(given)}" if given else f";prompt_name={json.dumps(name)}" if name else ""
        return f"{self.name}:{self.model_id}:{where};normalize={self.normalize};pooling={self.pooling or 'server'}{prompt}"

    @property
    def prompt(self) -> str | None:
        """The prompt text: --prompt as given, or --prompt-name's from the model's
        config_sentence_transformers.json (found with its tokenizer's files, as locally). A model's
        default prompt is the server's to apply, not put before the text here as well."""
        prompt, name = self._prompt_args
        if prompt is not None:
            return prompt or None
        if name is None:
            return None
        tokens = self._tokenizer()
        if tokens is None:
            raise InputError(
                f"--prompt-name {name} reads the prompt from {self._tokenizer_source}'s files, which cannot be found "
                "here (a served model name); pass the prompt itself as --prompt TEXT, or --tokenizer with a hub id "
                "or directory of the model."
            )
        return tokens.prompt

    def known_dimension(self) -> int | None:
        """The dimension of the vectors already received (None before the first `embed`)."""
        return self._dim

    def dimension(self) -> int:
        if self._dim is None:
            self.embed(["dimension probe"])
        assert self._dim is not None
        return self._dim

    @property
    def max_length(self) -> int:
        """The tokenizer's max_length; without one (openai, a served name) UNKNOWN_MAX_LENGTH: the
        server truncates (or refuses) at a limit not known here."""
        tokens = self._tokenizer()
        return tokens.max_length if tokens is not None else UNKNOWN_MAX_LENGTH

    @property
    def token_source(self) -> str:
        """Who counts tokens: "tokenizer" (the model's own, or --tokenizer's: per text, before a
        request) or "server usage" (an OpenAI-compatible server whose model name has no tokenizer to
        be had: its answers' usage, per request). Reads the tokenizer's files as `token_counts`
        would; never connects to the server."""
        return "tokenizer" if self._tokenizer() is not None else SERVER_USAGE

    @property
    def usage(self) -> dict[str, int]:
        """The server's counts summed over the requests whose vectors were taken: prompt_tokens,
        total_tokens, requests, and requests_without_usage (answers that carried none)."""
        return self._usage.totals()

    def token_counts(self, texts: Sequence[str]) -> list[int]:
        """Counted by the model's own tokenizer (hub, cache or --tokenizer), as for the local backend.
        Without one (openai, a served name), 0 per text: the server counts only once it has embedded
        the texts, and then per request (see `usage`), never per text."""
        tokens = self._tokenizer()
        return tokens.counts(texts) if tokens is not None else [0] * len(texts)

    def split(self, texts: Sequence[str], size: int, overlap: int) -> list[Windows]:
        """Windows cut by the model's own tokenizer, as for the local backend."""
        tokens = self._tokenizer()
        if tokens is None:
            raise InputError(
                f"--split cuts texts with the model's tokenizer, and there is none for {self._tokenizer_source} "
                "(a served model name; the server counts tokens only once it has embedded them): pass --tokenizer "
                "with a hub id or local directory of the served model's tokenizer."
            )
        return tokens.split(texts, size, overlap)

    def _token_backend(self) -> Tokens:
        """The tokenizer's backend, which must be found (TEI's prompt names are in its files)."""
        tokens = self._tokenizer()
        assert tokens is not None, "only an openai backend goes without a tokenizer"
        return tokens

    def _tokenizer(self) -> Tokens | None:
        """The model's tokenizer (tokenizer.Tokens, found as a local backend finds it), found once. None for an OpenAI-compatible
        server given a model name that is no hub id or directory here and no --tokenizer: its answers'
        usage counts instead. Any other kind, or a --tokenizer not found, is a one-line error."""
        with self._tokens_lock:
            if self._tokens is None and self._no_tokenizer is None:
                self._tokens = self._find_tokenizer()
            return self._tokens

    def _find_tokenizer(self) -> Tokens | None:
        prompt, name = self._prompt_args
        source = self._tokenizer_source
        try:  # counts include the prompt this backend sends, and no default prompt it does not
            return Tokens.find(source, prompt="" if prompt is None and name is None else prompt, prompt_name=name)
        except (ModelLoadError, InputError) as exc:
            if isinstance(exc, InputError) and Path(source).expanduser().is_dir():
                raise  # the files were found: a usage error of their own (an unknown --prompt-name)
            if self.name != "openai" or self._tokenizer_given:
                # TEI serves the same model on its OpenAI route, whose answers count tokens
                other = (f"; or use --backend openai --endpoint {public_url(self.endpoint.rstrip('/'))}/v1, whose "
                         "answers count tokens") if self.name == "tei" and self.endpoint and not self._tokenizer_given else ""
                raise ModelLoadError(
                    f"token counts need the tokenizer of {source}, which cannot be found ({exc}); "
                    f"pass --tokenizer with a hub id or local directory that has it{other}."
                ) from None
            self._no_tokenizer = str(exc)
        log.warning("openai: no tokenizer for %s, so token counts come from the server's usage (per request, "
                    "in the sidecar); rows computed here have n_tokens and truncated null (truncation is the "
                    "server's). Pass --tokenizer for per-row counts.", source)
        return None

    def _identify(self) -> None:
        """Once, on the first `embed` (the first time anything connects): what the server serves
        and its revision, for the provenance. TEI's /info names the model it was started with; one
        other than --model is refused (its vectors would be cached under the wrong model). Without
        /info, the hub's current commit of the model id (None offline)."""
        if self._revision is not None:
            return
        revision, served = "", None
        if self.name == "tei" and self.endpoint:
            try:
                info = self._http.get_json(self.endpoint.rstrip("/") + "/info", timeout=min(self.timeout, 10))
                revision, served = str(info.get("model_sha") or ""), info.get("model_id")
            except (requests.RequestException, ValueError, AttributeError):
                pass  # an older TEI or a proxy without /info: the configuration is all there is
            if served and served != self.model_id:  # asked again on every embed: the refusal sticks
                raise TerminalBackendError(
                    f"tei: {public_url(self.endpoint)} serves {served}, not --model {self.model_id}; pass --model "
                    f"{served} (and --tokenizer with a hub id or directory of its tokenizer if that is not one), so "
                    "the cache and the sidecar name the model that makes the vectors."
                )
        if not revision and "/" in self.model_id:
            revision = hub_sha(self.model_id, resolve_token(None)) or ""  # the HF token, to the hub only
        self._revision, self.served_model = revision, served

    def describe(self) -> dict[str, Any]:
        revision = self._revision or None
        return {
            "backend": self.name,
            "model_id": self.model_id,
            "served_model_id": self.served_model,
            "endpoint": public_url(self._protocol.url()) if self.name == "hf-api" or self.endpoint else None,
            "model_source": f"remote ({self.name})",
            "revision": f"hub:{self.model_id}@{revision}" if revision else None,
            "device": f"remote ({self.name})",
            "dim": self._dim,
            "normalize": self.normalize,
            "pooling": self.pooling or "server",
            "prompt": self.prompt,
            "prompt_name": self._tokens.prompt_name if self._tokens is not None else self._prompt_args[1],
            "prompt_sent_as": self.prompt_sent_as,
            **self._counting(),
            "api_batch_size": self._batch_size,
            "api_concurrency": self.concurrency,
            **self._http.summary(),
            "batch_halvings": self._http.stats["halvings"],
            "model_loaded": self._http.connected,
            "load_seconds": 0.0,
        }

    def _counting(self) -> dict[str, Any]:
        """Who counted the tokens and who truncated, for the provenance (from what is known already:
        finds no tokenizer, asks no server)."""
        counted_by = "tokenizer" if self._tokens is not None else SERVER_USAGE if self._no_tokenizer else None
        usage = self.usage if self.name == "openai" else None
        if usage is not None and usage["requests"] == usage["requests_without_usage"]:
            usage.update(prompt_tokens=None, total_tokens=None)  # none was reported: not zero tokens
        block: dict[str, Any] = {
            "token_counts": counted_by,  # None: nothing needed counting in this run
            "tokenizer": self._tokenizer_source if self._tokens is not None else None,
            "truncation": "server",  # texts go whole; the server cuts (or refuses) at its own limit
            "usage": usage,
        }
        if counted_by == SERVER_USAGE:
            block["max_length"] = None
            block["token_counts_note"] = (
                f"no tokenizer for {self._tokenizer_source}: the server reports tokens per request (usage), not per "
                "text, and truncates at its own limit, so the rows this run computed have n_tokens and truncated "
                "null (neither is known); usage.prompt_tokens is the total. Pass --tokenizer for per-row counts.")
            block["tokenizer_missing"] = self._no_tokenizer
        return block

    # --- embedding -----------------------------------------------------------------------------

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Vectors for `texts` in order; several requests in flight, each retried on its own."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, self._dim or 0), dtype=np.float32)
        self._identify()
        size = self._batch_size
        parts = [texts[i : i + size] for i in range(0, len(texts), size)]
        if len(parts) == 1 or self.concurrency == 1:
            results = [self._embed_part(p) for p in parts]
        else:
            with ThreadPoolExecutor(max_workers=min(self.concurrency, len(parts))) as pool:
                results = list(pool.map(self._embed_part, parts))  # map keeps input order
        dims = {r.shape[1] for r in results}
        if len(dims) > 1:  # concurrent first requests: each passed the check before _dim was known
            raise RemoteError(f"{self.name}: {public_url(self._protocol.url())} returned vectors of "
                              f"{' and '.join(map(str, sorted(dims)))} dimensions in one job; nothing was written.")
        out = np.concatenate(results, axis=0)
        if out.shape[0] != len(texts):
            raise RemoteError(f"{self.name} returned {out.shape[0]} vectors for {len(texts)} texts; nothing was written.")
        return out

    def _request(self, url: str, texts: list[str]) -> Any:
        """One POST of `texts` with the prompt: TEI by its name while the server knows it (else,
        and for the other kinds, the text put before each text)."""
        prompt = self.prompt
        if not prompt:
            return self._http.post_json(url, self._protocol.body(texts))
        name = self._token_backend().prompt_name if self.name == "tei" and self.prompt_sent_as != "text" else None
        if name is not None:
            try:
                payload = self._http.post_json(url, self._protocol.body(texts, prompt_name=name))
                self.prompt_sent_as = "name"
                return payload
            except (RejectedRequest, PayloadTooLarge) as exc:
                # TEI answers a prompt_name its model does not have with 413 (its input validation
                # errors are all 413s), others with 400/422: whatever the status, the message says so
                status = exc.status if isinstance(exc, RejectedRequest) else 413
                if status not in (400, 413, 422) or "prompt" not in exc.server_message.lower():
                    raise
                self.prompt_sent_as = "text"  # this server has no prompt of that name: send the text
        self.prompt_sent_as = "text"
        return self._http.post_json(url, self._protocol.body([prompt + t for t in texts]))

    def _embed_part(self, texts: list[str]) -> np.ndarray:
        try:
            url = self._protocol.url()
            payload = self._request(url, texts)
        except PayloadTooLarge as exc:
            if len(texts) == 1:
                said = f": {exc.server_message}" if exc.server_message else ""
                raise TerminalBackendError(
                    f"{self.name} refused a single text as too large (413{said}); it is longer than the server takes "
                    "or over its payload limit: cut long texts with --split tokens:N, or raise the server's limits "
                    "(TEI: --auto-truncate, --payload-limit)."
                ) from None
            half = len(texts) // 2
            with self._batch_lock:  # keep the size that works for the rest of the job
                if half < self._batch_size:
                    self._batch_size = half
                    self._http.count("halvings")
            return np.concatenate([self._embed_part(texts[:half]), self._embed_part(texts[half:])], axis=0)
        vectors = check_vectors(self._protocol.vectors(payload, len(texts)), len(texts), public_url(url), kind=self.name,
                                pooling=self.pooling, normalize=self.normalize, dim=self._dim)
        self._dim = vectors.shape[1]
        self._usage.add(self._protocol.usage(payload))  # only answers whose vectors are taken
        return vectors

__all__ = ["RemoteBackend", "RetryPolicy", "resolve_token", "hub_sha", "REMOTE_KINDS"]
