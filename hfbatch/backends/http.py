"""HttpClient: one JSON-over-HTTP call with the rules every remote backend shares.

Embedding (remote.py) and generation (remote_generation.py) both need the same things from a
request, so they live here once:
- a pooled requests.Session sized for `concurrency` requests in flight, created under a lock;
- retries by the errors' `transient` property (tenacity), never by message: connection errors,
  timeouts, 429 (Retry-After honoured) and 500/502/503/504 (503 "model is loading" waits its
  estimated_time) are transient, with exponential backoff and jitter, bounded by attempts and by
  a ceiling that is never overshot; 400/401/403/404/422 are terminal one-line errors with the
  fix; 413 raises PayloadTooLarge so the caller can split its batch;
- the Hugging Face token (HF_TOKEN / HUGGINGFACE_TOKEN, from the environment or a .env file, as
  settings.environment() reads them) only goes, over https, to Hugging Face hosts and the
  configured router, decided per request on the URL requests will really connect to; any other
  server gets HFBATCH_API_KEY. A POST redirected to another server is refused (its vectors would
  come from a host the provenance does not name). Errors name URLs without user:password@ and
  are scrubbed of the token and the key.
"""

from __future__ import annotations

import ipaddress
import json
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping
from urllib.parse import urljoin, urlsplit

import numpy as np
import requests
from requests.adapters import HTTPAdapter
from requests.auth import AuthBase, HTTPBasicAuth
from requests.utils import get_auth_from_url, urldefragauth
from urllib3.util import parse_url
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, stop_before_delay

from ..errors import RemoteError, TerminalBackendError, TransientBackendError, is_transient
from ..errors import redact_text
from ..settings import api_key, hf_token

HF_ROUTER = "https://router.huggingface.co"
_TRANSIENT_STATUS = {429, 500, 502, 503, 504}
DEFAULT_FIXES = {
    400: "the server rejected the request; check --model and the inputs",
    401: "the token is missing or invalid; set HF_TOKEN (or HUGGINGFACE_TOKEN) to a valid token",
    403: "the token may not use this model or endpoint; check its permissions (gated models need access)",
    404: "no such model or route; check --model and --endpoint",
    422: "the server could not process the inputs; check that --model supports this task",
}


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5  # tries per request, first included
    ceiling_seconds: float = 300.0  # give up on a request after this long, retries included
    max_wait_seconds: float = 60.0  # longest single wait (Retry-After / estimated_time capped here)
    base_wait_seconds: float = 0.5  # exponential backoff starts here, with jitter


class PayloadTooLarge(Exception):
    """413: fewer inputs per request will do. `server_message`: what the server said, for a caller
    that must tell a batch too large from TEI's other 413s (TEI answers every input validation
    error, an unknown prompt_name included, with 413)."""

    def __init__(self, server_message: str = ""):
        super().__init__(server_message)
        self.server_message = server_message


class RejectedRequest(TerminalBackendError):
    """A 4xx the server meant (not 413): `status` and the server's own message, for a caller that
    can ask differently (TEI told a prompt name it does not know)."""

    def __init__(self, message: str, status: int, server_message: str):
        super().__init__(message)
        self.status, self.server_message = status, server_message


class RetryableHTTPError(TransientBackendError):
    """One failed try (transient by its class): why (`cause`, for the retry counts) and how long
    the server asked to wait."""

    def __init__(self, message: str, cause: str, wait: float | None = None):
        super().__init__(message)
        self.cause = cause
        self.wait = wait


def hf_router() -> str:
    """The Inference Providers router; HFBATCH_HF_ROUTER points it at a proxy (or a test server).
    Read from the real environment only: the token follows the router, so a .env may not move it."""
    return os.environ.get("HFBATCH_HF_ROUTER", HF_ROUTER).rstrip("/")


def resolve_token(explicit: str | None = None) -> str | None:
    """--token, else HF_TOKEN, else HUGGINGFACE_TOKEN (the environment, then a .env file in the
    working directory), else the hub's stored login."""
    token = explicit or hf_token()
    if token:
        return token
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:  # no stored login, or it cannot be read: go without
        return None


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _server(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) as urllib3 parses them: the server requests will really connect to
    (Python's urlparse reads `https://evil.net\\@huggingface.co/` as huggingface.co; urllib3 does not)."""
    parts = parse_url(url)
    scheme, host = (parts.scheme or "").lower(), (parts.host or "").lower().rstrip(".")
    return scheme, host, parts.port or _DEFAULT_PORTS.get(scheme)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a name, not an address
        return host == "localhost"


def hf_token_allowed(url: str) -> bool:
    """May the Hugging Face token go to `url`? Only over https (plain http only to this machine, for
    tests) and only to huggingface.co and its subdomains, *.huggingface.cloud (Inference Endpoints)
    or the server of the router (HFBATCH_HF_ROUTER). Spaces (*.hf.space) run their owners' code."""
    try:
        scheme, host, port = _server(url)
        router = _server(hf_router())
    except ValueError:  # unparseable: nothing to trust
        return False
    if scheme != "https" and not (scheme == "http" and _is_loopback(host)):
        return False
    if host == "huggingface.co" or host.endswith((".huggingface.co", ".huggingface.cloud")):
        return True
    return (scheme, host, port) == router


def public_url(url: str) -> str:
    """`url` without user:password@ (sent as Basic auth, never shown): what errors, the sidecar and
    the cache fingerprint name, so one endpoint with other credentials is still the same endpoint."""
    return urldefragauth(url) if "@" in urlsplit(url).netloc else url


class _Credentials(AuthBase):
    """requests' auth hook, run on every prepared request (so on the URL it will connect to): Basic
    auth from the URL's user:password@, else the HF token where `hf_token_allowed`, else
    HFBATCH_API_KEY, else nothing. Both are read once, when the session starts."""

    def __init__(self, token: str | None):
        self.token = resolve_token(token)
        self.api_key = api_key()

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        url = request.url or ""
        user, password = get_auth_from_url(url)
        if user or password:
            return HTTPBasicAuth(user, password)(request)
        credential = self.token if hf_token_allowed(url) else self.api_key
        if credential:
            request.headers["Authorization"] = f"Bearer {credential}"
        return request


class HttpClient:
    """POST JSON, get JSON back, with hfbatch's retry, error and credential rules.

    `name` labels errors ("hf-api: http://... answered 503 ..."); `token` is the HF token to use
    instead of HF_TOKEN (still only where `hf_token_allowed`).
    """

    def __init__(self, name: str, *, concurrency: int = 4, timeout: float = 60.0, retry: RetryPolicy = RetryPolicy(),
                 token: str | None = None, fixes: Mapping[int, str] | None = None):
        self.name, self.concurrency, self.timeout, self.retry = name, concurrency, timeout, retry
        self.fixes = {**DEFAULT_FIXES, **(fixes or {})}
        self._token = token
        self._lock = threading.Lock()
        self._session: requests.Session | None = None
        self.stats: Counter[str] = Counter()  # requests, retries, cause:<why>, and what callers add
        self._stats_lock = threading.Lock()

    @property
    def connected(self) -> bool:
        return self._session is not None

    def count(self, key: str) -> None:
        with self._stats_lock:  # requests run on several threads
            self.stats[key] += 1

    def summary(self) -> dict[str, Any]:
        return {"requests": self.stats["requests"], "retries": self.stats["retries"],
                "retry_causes": {k[6:]: v for k, v in self.stats.items() if k.startswith("cause:")}}

    # --- session and credentials ----------------------------------------------------------------

    def session(self) -> requests.Session:
        with self._lock:  # the first requests start on several threads at once
            if self._session is None:
                session = requests.Session()
                adapter = HTTPAdapter(pool_connections=self.concurrency, pool_maxsize=self.concurrency, max_retries=0)
                session.mount("http://", adapter)
                session.mount("https://", adapter)
                session.headers["User-Agent"] = "hfbatch"
                session.auth = _Credentials(self._token)  # decided per request, on the URL really used
                self._session = session
            return self._session

    def _same_server_only(self, response: requests.Response, *args: Any, **kwargs: Any) -> None:
        """Response hook: a redirect to another server is refused before it is followed, so every
        vector comes from the server the provenance names (requests' own should_strip_auth says
        what "another server" is: host, port or scheme changed, http -> https upgrades allowed)."""
        target = self.session().get_redirect_target(response)
        if target is None:
            return
        final = urljoin(response.url, target)
        if self.session().should_strip_auth(response.url, final):
            response.close()
            raise TerminalBackendError(
                f"{self.name}: {public_url(response.url)} redirected the request ({response.status_code}) to another "
                f"server, {public_url(final)}; refused, so no vector comes from a server the provenance does not "
                "name. Point --endpoint at the final URL."
            )

    # --- requests -------------------------------------------------------------------------------

    def get_json(self, url: str, timeout: float | None = None) -> Any:
        """One GET, no retries (used for optional facts such as TEI's /info)."""
        return self.session().get(url, timeout=timeout or self.timeout).json()

    def post_json(self, url: str, body: Any) -> Any:
        """POST with retries; the decoded JSON answer, or a one-line error (PayloadTooLarge on 413)."""
        retrying = Retrying(
            retry=retry_if_exception(is_transient),
            # stop_before_delay: never start a wait that would end past the ceiling
            stop=stop_after_attempt(self.retry.attempts) | stop_before_delay(self.retry.ceiling_seconds),
            wait=self._wait,
            before_sleep=self._count_retry,
            reraise=True,
        )
        try:
            return retrying(self._post, url, body)
        except RemoteError as exc:
            if not exc.transient:
                raise
            tries = retrying.statistics.get("attempt_number", self.retry.attempts)
            raise TransientBackendError(
                f"{exc} (gave up after {tries} attempt{'s' if tries != 1 else ''}, --api-retries {self.retry.attempts}, "
                f"--api-retry-ceiling {self.retry.ceiling_seconds:g}s)"
            ) from None

    def _post(self, url: str, body: Any) -> Any:
        self.count("requests")
        shown = public_url(url)
        try:
            response = self.session().post(url, json=body, timeout=self.timeout,
                                           hooks={"response": self._same_server_only})
        except requests.Timeout:
            raise RetryableHTTPError(f"{self.name}: no answer from {shown} within {self.timeout:g}s", "timeout") from None
        except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as exc:
            raise RetryableHTTPError(f"{self.name}: cannot connect to {shown} ({type(exc).__name__})", "connection") from None
        except requests.RequestException as exc:  # bad URL, redirect loop, undecodable body: retrying won't help
            raise TerminalBackendError(f"{self.name}: request to {shown} failed ({type(exc).__name__}); check --endpoint.") from None
        status = response.status_code
        if status == 413:
            raise PayloadTooLarge(self._server_message(response))
        if status in _TRANSIENT_STATUS:
            raise RetryableHTTPError(f"{self.name}: {shown} answered {status} {self._server_message(response)}", str(status),
                                     _server_wait(response))
        if status >= 400:
            fix = self.fixes.get(status, "check the endpoint and model")
            said = self._server_message(response)
            raise RejectedRequest(f"{self.name}: {shown} answered {status} {said}; {fix}.", status, said)
        try:
            return response.json()
        except ValueError:
            raise RemoteError(f"{self.name}: {shown} answered {status} with a body that is not JSON; nothing was written.") from None

    def _server_message(self, response: requests.Response) -> str:
        """The server's own error message, short, without the credentials this client sends (a
        server may echo the Authorization header back; the token may come from a .env file, which
        redact_text, reading the process environment, does not see)."""
        text = _error_text(response)
        auth = self.session().auth
        from urllib.parse import unquote, urlsplit

        sent = urlsplit(getattr(response.request, "url", None) or response.url or "")  # user:password@ of the endpoint
        password = unquote(sent.password) if sent.password else None
        for secret, shortest in ((getattr(auth, "token", None), 8), (getattr(auth, "api_key", None), 8), (password, 4)):
            if secret and len(secret) >= shortest:
                text = text.replace(secret, "***")
        return text

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, RetryableHTTPError) and exc.wait is not None:
            return min(max(exc.wait, 0.0), self.retry.max_wait_seconds)
        backoff = self.retry.base_wait_seconds * 2 ** (state.attempt_number - 1)
        return min(backoff * (0.5 + np.random.random()), self.retry.max_wait_seconds)  # jitter

    def _count_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        self.count("retries")
        self.count(f"cause:{getattr(exc, 'cause', 'unknown')}")


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


def short_json(value: Any) -> str:
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
    # a server may echo the Authorization header (token or HFBATCH_API_KEY) back in its error
    message = " ".join(redact_text(str(message or response.reason or "")).split())[:200]
    return f"({message})" if message else ""
