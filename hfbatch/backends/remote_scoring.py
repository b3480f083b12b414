"""RemoteScorer: pair scoring (`hfbatch score`) on a reranking server, text-embeddings-inference
(TEI) or infinity, with the same members as scoring.LocalScorer, so the score job cannot tell them
apart.

The wire, as the servers have it:
- TEI `POST /rerank` {"query", "texts", "truncate", "truncation_direction", "raw_scores",
  "return_text"} -> [{"index", "score"[, "text"]}], sorted by score, best first (router/src/http/
  server.rs `rerank`: `ranks.sort_by(...); ranks.reverse()`). raw_scores false: TEI's sigmoid of a
  one-label model's logit (core/src/infer.rs `predict`), raw_scores true: the logit. A model that is
  no reranker answers 424 "model is not a re-ranker model"; more texts than its
  --max-client-batch-size answer 413. `GET /info` names what it serves: model_id, model_sha,
  max_input_length and model_type, one of {"reranker": {...}}, {"classifier": {...}} or
  {"embedding": {"pooling": "cls" | "mean" | "splade" | "last_token"}} (router/src/lib.rs `Info`).
- infinity `POST /rerank` (Cohere's shape) {"model", "query", "documents", "return_documents",
  "raw_scores"} -> {"object": "rerank", "results": [{"relevance_score", "index"[, "document"]}],
  "model", "usage": {"prompt_tokens", "total_tokens"}}, sorted by relevance_score (infinity_emb
  engine `rerank`); raw_scores false: its sigmoid of the logit. A model that cannot rerank answers
  400 "ModelNotDeployedError"; `GET /models` lists {"data": [{"id", "capabilities": [...], ...}]}.
Scores are always placed back by `index`, never by the order of the answer.

Exactness: the scores equal CrossEncoder.predict, whose activation the model's files name
(config_sentence_transformers.json `activation_fn`, as sentence-transformers reads it): a Sigmoid
model gets the server's activated scores, an Identity one (cross-encoder/ms-marco-*) asks for
raw_scores, a Tanh one gets tanh of the raw scores here. Without the model's files at hand (a
served model name and no --tokenizer), the server's own activation (sigmoid) is what there is.

Long documents are windowed exactly as LocalScorer windows them: the tokenizer side of this
scorer *is* a LocalScorer on the model's (or --tokenizer's) files, which never loads its weights
and asks the server for its predictions. Without a tokenizer, nothing is counted or cut here: the
server truncates (token_source "server usage").

Refused up front (`check_remote`, once, before the first request that scores): a TEI whose /info
says it serves an embedding, SPLADE or classifier model, or another model than --model; an
infinity whose /models does not list --model or lists it without "rerank".
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence, TypeVar
from urllib.parse import urlparse

import numpy as np
import requests

from ..errors import InputError, ModelLoadError, RemoteError, TerminalBackendError, first_line
from .http import HttpClient, PayloadTooLarge, RetryPolicy, public_url, short_json
from .hub import read_json
from .kinds import describe_kind, model_kind, settle_kind
from .remote import SERVER_USAGE, UNKNOWN_MAX_LENGTH
from .remote_protocol import UsageTotals
from .scoring import LocalScorer, Pair, Scored

if TYPE_CHECKING:
    from ..options import ScoreOptions

SCORE_SERVERS = ("tei", "infinity")
# a server's answer to a request it will never take, with the fix (HttpClient puts it after the message)
_FIXES = {
    "tei": {404: "the server has no /rerank route; --endpoint is a TEI server's base URL (e.g. http://gpu-box:8080)",
            424: "the TEI behind --endpoint serves no reranker; start it with a cross-encoder (reranker) model"},
    "infinity": {404: "the server has no /rerank route; --endpoint is infinity's base URL (with its --url-prefix)",
                 400: "infinity cannot rerank with --model there; check that it serves --model and that it is a "
                      "reranker (its /models lists the capabilities)"},
}
log = logging.getLogger(__name__)
T = TypeVar("T")


# --- what a server says it serves (shared with remote_sparse.py) --------------------------------

def tei_serves(info: Any) -> tuple[str, str] | None:
    """(kind, words) of what a TEI /info `model_type` says: kind one of "reranker", "classifier",
    "sparse", "dense"; None where /info does not say (an older TEI, a proxy)."""
    model_type = info.get("model_type") if isinstance(info, dict) else None
    if not isinstance(model_type, dict) or len(model_type) != 1:
        return None
    (key, body), = model_type.items()
    body = body if isinstance(body, dict) else {}
    if key == "reranker":
        return "reranker", "a reranker (cross-encoder)"
    if key == "classifier":
        labels = len(body.get("id2label") or {})
        return "classifier", f"a classifier ({labels} labels)" if labels else "a classifier"
    if key == "embedding":
        pooling = str(body.get("pooling") or "")
        if pooling == "splade":
            return "sparse", "a SPLADE sparse embedding model (pooling splade)"
        return "dense", f"a dense embedding model (pooling {pooling or 'unknown'})"
    return None


def get_info(http: HttpClient, url: str, timeout: float) -> dict[str, Any] | None:
    """One GET of an optional fact (TEI's /info, infinity's /models): the JSON object, or None when
    the server does not answer one (an older server, a proxy; the first real request says more)."""
    try:
        answer = http.get_json(url, timeout=min(timeout, 10.0))
    except (requests.RequestException, ValueError):
        return None
    return answer if isinstance(answer, dict) else None


class BatchSize:
    """Inputs per request, halved where a server answers 413 and kept so for the rest of the job
    (shared by the requests in flight; each halving counted in the client's stats)."""

    def __init__(self, size: int, http: HttpClient):
        self.size, self._http = size, http
        self._lock = threading.Lock()

    def halve(self, tried: int) -> None:
        with self._lock:
            half = max(1, (tried + 1) // 2)
            if half < self.size:
                self.size = half
                self._http.count("halvings")


def send_halving(items: list[Any], send: Callable[[list[Any]], list[T]], batch: BatchSize,
                 one_too_large: Callable[[PayloadTooLarge], Exception]) -> list[T]:
    """`send(items)`; where the server answers 413 (too many inputs, or a body over its payload
    limit), the batch size is halved and the items sent again in pieces of the size kept (each
    piece halved again where it is still refused); one item refused raises `one_too_large`."""
    try:
        return send(items)
    except PayloadTooLarge as exc:
        if len(items) == 1:
            raise one_too_large(exc) from None
        batch.halve(len(items))
    out: list[T] = []
    at = 0
    while at < len(items):
        size = min(batch.size, (len(items) + 1) // 2)  # at most half: every piece is smaller than what was refused
        out += send_halving(items[at:at + size], send, batch, one_too_large)
        at += size
    return out


def check_url(flag_backend: str, endpoint: str | None, example: str) -> str:
    """The --endpoint of a remote backend, or a one-line InputError (missing, not http(s))."""
    if not endpoint:
        raise InputError(f"--backend {flag_backend} needs --endpoint URL (the server's base URL, e.g. {example}).")
    if urlparse(endpoint).scheme not in ("http", "https"):
        raise InputError(f"--endpoint {public_url(endpoint)!r} is not an http(s) URL; give it like {example}.")
    return endpoint.rstrip("/")


def _usage(usage: Any) -> tuple[int, int] | None:
    """(prompt_tokens, total_tokens) of an infinity answer's usage, or None where it sent none."""
    tokens = usage.get("prompt_tokens") if isinstance(usage, dict) else None
    if type(tokens) is not int or tokens < 0:
        return None
    total = usage.get("total_tokens")
    return tokens, total if type(total) is int and total >= 0 else tokens


def _number(value: Any) -> bool:
    return type(value) in (int, float)  # not bool, not "0.5": json gives those as themselves


# --- the model's activation, read as sentence-transformers reads it --------------------------------

def file_activation(root: Path, trust_remote_code: bool = False) -> str:
    """The class name of the activation CrossEncoder.predict applies for the model at `root`, from
    its files as sentence-transformers 6 resolves it: config_sentence_transformers.json
    `activation_fn`, else config.json's `sentence_transformers.activation_fn` (or the pre-4.0
    `sbert_ce_default_activation_function`), a path outside torch only with trust_remote_code;
    else Sigmoid for a one-label model, Identity for more."""
    trusted = (lambda p: isinstance(p, str) and bool(p) and (trust_remote_code or p.startswith("torch.")))
    st_config = read_json(root / "config_sentence_transformers.json")
    path = st_config.get("activation_fn") if isinstance(st_config, dict) else None
    if trusted(path):
        return str(path).rsplit(".", 1)[-1]
    config = read_json(root / "config.json")
    config = config if isinstance(config, dict) else {}
    inner = config.get("sentence_transformers")
    path = inner.get("activation_fn") if isinstance(inner, dict) and "activation_fn" in inner \
        else config.get("sbert_ce_default_activation_function")
    if trusted(path):
        return str(path).rsplit(".", 1)[-1]
    labels = len(config.get("id2label") or {}) or config.get("num_labels") or 1
    return "Sigmoid" if labels == 1 else "Identity"


# activation -> (ask the server for raw scores, what is applied to them here)
_ACTIVATIONS: dict[str, tuple[bool, Callable[[np.ndarray], np.ndarray] | None]] = {
    "Sigmoid": (False, None),  # both servers apply sigmoid to a one-label model's logit
    "Identity": (True, None),
    "Tanh": (True, np.tanh),
}


class _ServerSide(LocalScorer):
    """The tokenizer side of a RemoteScorer: LocalScorer's counts, windows and aggregation on the
    model's files, its predictions asked of the server. Never loads the weights."""

    def __init__(self, model: str, *, ask: Callable[[Sequence[Pair]], np.ndarray], **kwargs: Any):
        super().__init__(model, **kwargs)
        self._ask = ask

    def load(self) -> Any:
        raise AssertionError("a remote scorer never loads the model's weights")

    def predict(self, pairs: Sequence[Pair], batch: int | None = None) -> np.ndarray:
        return self._ask(pairs)  # (the server's requests are sized by --api-batch-size)


class RemoteScorer:
    """A cross-encoder behind TEI's or infinity's /rerank. Builds only: nothing connects until
    the first `score` (or `check_remote`); `fingerprint()` never does."""

    kind = "cross-encoder"
    remote = True
    load_seconds = 0.0

    def __init__(self, backend: str, *, model: str, endpoint: str | None, tokenizer: str | None = None,
                 aggregate: str = "max", overlap: int | None = None, api_batch_size: int = 32, concurrency: int = 4,
                 timeout: float = 60.0, retry: RetryPolicy = RetryPolicy(), token: str | None = None,
                 trust_remote_code: bool = False, max_length: int | None = None):
        if backend not in SCORE_SERVERS:
            raise InputError(f"--backend {backend!r} is not a reranking server; use one of: {', '.join(SCORE_SERVERS)}.")
        if max_length is not None:
            raise InputError("--max-length: a reranking server reads the pair up to its own length; long documents are "
                             "scored in windows (--aggregate max|mean); drop --max-length.")
        if api_batch_size < 1 or concurrency < 1:
            raise InputError("--api-batch-size and --api-concurrency must be at least 1.")
        if aggregate not in ("max", "mean"):
            raise InputError(f"--aggregate {aggregate!r} is not one of: max, mean.")
        if overlap is not None and overlap < 0:
            raise InputError(f"--overlap must be 0 or more (got {overlap}).")
        port = 8080 if backend == "tei" else 7997
        endpoint = check_url(backend, endpoint, f"http://gpu-box:{port}")
        base = endpoint.removesuffix("/rerank")
        self.name, self.model_id = backend, model
        self.aggregate, self.overlap, self.trust_remote_code = aggregate, overlap, trust_remote_code
        self.concurrency, self.timeout = concurrency, timeout
        self._base, self.url = base, base + "/rerank"  # may hold user:password@: shown only through public_url
        self._http = HttpClient(backend, concurrency=concurrency, timeout=timeout, retry=retry, token=token,
                                fixes=_FIXES[backend])
        self._batch = BatchSize(api_batch_size, self._http)
        self._tokenizer_source = tokenizer or model
        self._tokenizer_given = tokenizer is not None  # a --tokenizer that cannot be found is an error, never skipped
        self._side: _ServerSide | None = None
        self._no_tokenizer: str | None = None  # why there is none (a served model name): the server truncates
        self._side_lock = threading.Lock()
        self._activation: str | None = None  # the model's, once planned
        self._raw: bool | None = None  # ask the server for raw scores (None: not planned yet)
        self._apply: Callable[[np.ndarray], np.ndarray] | None = None
        self._checked = False
        self._check_lock = threading.Lock()
        self._info: dict[str, Any] | None = None  # TEI's /info, once asked
        self._info_asked = False
        self._served: str | None = None
        self._revision: str | None = None
        self._usage = UsageTotals()  # infinity's usage per answer

    @classmethod
    def from_options(cls, opts: "ScoreOptions") -> "RemoteScorer":
        """The scorer `hfbatch score --backend tei|infinity` runs (builds only)."""
        return cls(opts.backend, model=opts.model or "", endpoint=opts.endpoint, tokenizer=opts.tokenizer,
                   aggregate=opts.aggregate or "max", overlap=opts.overlap, api_batch_size=opts.api_batch_size,
                   concurrency=opts.api_concurrency, timeout=opts.api_timeout or 60.0,
                   retry=RetryPolicy(attempts=opts.api_retries, ceiling_seconds=opts.api_retry_ceiling),
                   trust_remote_code=opts.trust_remote_code, max_length=opts.max_length)

    # --- what the score job asks of every scorer ---------------------------------------------

    @property
    def batch_texts(self) -> int:
        """Pairs per call that keep every connection busy (one query's documents per request)."""
        return self._batch.size * self.concurrency

    def setup_seconds(self) -> dict[str, float]:
        return {}  # the server's model is loaded already

    def watch(self, note: Callable[[str], None]) -> None:
        """Nothing slow happens once per job here."""

    def prepare(self, **_: Any) -> None:
        return None

    def known_dimension(self) -> int | None:
        return None  # a score has no dimension

    def fingerprint(self) -> str:
        """What this scorer is configured to ask for: the server kind, its endpoint without
        credentials, the model, the aggregate and overlap of windows (and --tokenizer, which cuts
        them). From the configuration alone: never a request, never a file."""
        overlap = self.overlap if self.overlap is not None else "auto"
        tokenizer = f";tokenizer={self._tokenizer_source}" if self._tokenizer_given else ""
        return (f"{self.name}-cross-encoder:{self.model_id}:{public_url(self.url)};aggregate={self.aggregate};"
                f"overlap={overlap}{tokenizer}")

    @property
    def token_source(self) -> str:
        """"tokenizer" (the model's own or --tokenizer's: counts and windows here) or "server
        usage" (none to be had: the server counts and truncates). Files only; never connects."""
        return "tokenizer" if self._tokenizer_side() is not None else SERVER_USAGE

    @property
    def max_length(self) -> int:
        """Tokens of a pair the model reads: its tokenizer files' length; without them TEI's /info
        max_input_length (one GET), else UNKNOWN_MAX_LENGTH (no count reaches it)."""
        side = self._tokenizer_side()
        if side is not None:
            return side.max_length
        told = (self._tei_info() or {}).get("max_input_length") if self.name == "tei" else None
        return told if isinstance(told, int) and not isinstance(told, bool) and told > 0 else UNKNOWN_MAX_LENGTH

    @property
    def window_overlap(self) -> int:
        side = self._tokenizer_side()
        return side.window_overlap if side is not None else (self.overlap or 0)

    def pair_counts(self, pairs: Sequence[Pair]) -> list[int]:
        """Tokens of each pair as the model reads it (untruncated); 0 each without a tokenizer
        (the server counts only once it has scored them)."""
        side = self._tokenizer_side()
        return side.pair_counts(pairs) if side is not None else [0] * len(pairs)

    def windows(self, pair: Pair) -> list[str] | None:
        """The document's windows beside the query, as LocalScorer cuts them; None without a tokenizer."""
        side = self._tokenizer_side()
        return side.windows(pair) if side is not None else None

    def check_labels(self) -> None:
        """The model's files (where at hand) name one label: a classifier is refused, files only."""
        side = self._tokenizer_side()
        if side is not None and not self._tokenizer_given:
            side.check_labels()

    def score(self, pairs: Sequence[Pair], counts: Sequence[int]) -> list[Scored]:
        """Each pair's Scored: windows and aggregation as LocalScorer's, the scores the server's
        (one /rerank request per query and up to api_batch_size documents, `concurrency` in flight)."""
        pairs, counts = list(pairs), list(counts)
        if len(pairs) != len(counts):
            raise ValueError(f"{len(pairs)} pairs with {len(counts)} counts")
        if not pairs:
            return []
        self.check_remote()
        side = self._tokenizer_side()
        if side is not None:
            return side.score(pairs, counts)
        scores = self._ask(pairs)
        if not np.isfinite(scores).all():
            raise RemoteError(f"{self.name}: {public_url(self.url)} returned NaN or infinite scores; nothing was written.")
        return [Scored(float(np.float32(s)), int(c), 1, False) for s, c in zip(scores, counts)]

    def describe(self) -> dict[str, Any]:
        """The provenance block, from what is known already (asks no server, finds no tokenizer)."""
        side = self._side
        info_length = (self._info or {}).get("max_input_length")
        return {
            "backend": self.name,
            "model_id": self.model_id,
            "served_model_id": self._served,
            **describe_kind(self.kind),
            "endpoint": public_url(self.url),
            "model_source": f"remote ({self.name})",
            "revision": self._revision,
            "device": f"remote ({self.name})",
            "max_length": side.max_length if side is not None else info_length if isinstance(info_length, int) else None,
            "aggregate": self.aggregate,
            "overlap": side.window_overlap if side is not None else self.overlap,
            "activation": self._activation,
            "raw_scores": self._raw,
            "token_counts": "tokenizer" if side is not None else SERVER_USAGE if self._no_tokenizer else None,
            "tokenizer": self._tokenizer_source if side is not None else None,
            "tokenizer_missing": self._no_tokenizer,
            "truncation": "windows" if side is not None else "server",
            "usage": self._usage.totals() if self.name == "infinity" else None,
            "api_batch_size": self._batch.size,
            "api_concurrency": self.concurrency,
            **self._http.summary(),
            "batch_halvings": self._http.stats["halvings"],
            "model_loaded": self._http.connected,
            "load_seconds": 0.0,
        }

    # --- up front ------------------------------------------------------------------------------

    def check_remote(self) -> None:
        """Once, before the first request that scores: the model's activation planned from its files,
        and the server asked what it serves. One that cannot rerank, or serves another model, is a
        one-line InputError (asked again next time: the refusal sticks). A server that does not say
        (an older TEI without /info, a proxy) is left to its first answer."""
        with self._check_lock:
            if self._checked:
                return
            self._plan_activation()
            where = public_url(self._base)
            if self.name == "tei":
                info = self._tei_info()
                said = tei_serves(info)
                served = info.get("model_id") if info else None
                if said is not None and said[0] != "reranker":
                    raise InputError(f"tei: {where} serves {said[1]}{f' ({served})' if served else ''}, not a reranker; "
                                     "`hfbatch score` needs a TEI started with a cross-encoder (reranker) model: point "
                                     "--endpoint at one.")
                if isinstance(served, str) and served and served != self.model_id:
                    raise InputError(f"tei: {where} serves {served}, not --model {self.model_id}; pass --model {served} "
                                     "(and --tokenizer with a hub id or directory of its tokenizer if that is not one), "
                                     "so the cache and the sidecar name the model that makes the scores.")
                told, side = (info or {}).get("max_input_length"), self._tokenizer_side()
                if side is not None and type(told) is int and 0 < told < side.max_length:
                    raise InputError(f"tei: {where} reads {told} tokens of a pair, and {self._tokenizer_source}'s files "
                                     f"{side.max_length}: windows cut here would be cut again there, unseen. Start TEI "
                                     f"with --max-input-length {side.max_length} (or the model's own length), or pass "
                                     "--tokenizer with the files of the model it serves.")
                self._served = served if isinstance(served, str) else None
                sha = info.get("model_sha") if info else None
                self._revision = f"tei:{sha}" if isinstance(sha, str) and sha else None
            else:
                self._check_infinity(where)
            self._checked = True

    def _check_infinity(self, where: str) -> None:
        listed = get_info(self._http, self._base + "/models", self.timeout)
        data = listed.get("data") if listed else None
        if not isinstance(data, list):
            return  # no /models here: the first /rerank answer says more
        models = [m for m in data if isinstance(m, dict)]
        ids = [str(m.get("id")) for m in models]
        entry = next((m for m in models if m.get("id") == self.model_id), None)
        if entry is None:
            raise InputError(f"infinity: {where} serves {', '.join(ids) or 'no model'}, not --model {self.model_id}; "
                             "pass --model with the name it serves (its --served-model-name), and --tokenizer with a hub "
                             "id or directory of its tokenizer if that name is not one.")
        capabilities = entry.get("capabilities")
        if isinstance(capabilities, list) and "rerank" not in capabilities:
            raise InputError(f"infinity: {where} serves {self.model_id} for {', '.join(map(str, capabilities)) or 'nothing'}, "
                             "not rerank; `hfbatch score` needs a cross-encoder (reranker) model there.")
        self._served = self.model_id
        revision = entry.get("revision")
        self._revision = f"infinity:{revision}" if isinstance(revision, str) and revision else None

    def _tei_info(self) -> dict[str, Any] | None:
        if not self._info_asked:
            self._info_asked = True
            self._info = get_info(self._http, self._base + "/info", self.timeout)
        return self._info

    def _plan_activation(self) -> None:
        """Raw or activated scores, and what is applied here, from the activation the model's files
        name (see the module docstring). Files only."""
        if self._raw is not None:
            return
        side = self._tokenizer_side()
        if side is None:
            self._activation, self._raw = None, False  # the server's own (sigmoid): nothing else is known
            return
        name = file_activation(side.files.dir, self.trust_remote_code)
        if name not in _ACTIVATIONS:
            raise InputError(f"{self.model_id} applies the activation {name} to its scores (its files say), which a "
                             f"{self.name} server does not: it gives raw or sigmoid scores. Score it with --backend local.")
        self._activation = name
        self._raw, self._apply = _ACTIVATIONS[name]

    # --- the tokenizer side --------------------------------------------------------------------

    def _tokenizer_side(self) -> _ServerSide | None:
        with self._side_lock:
            if self._side is None and self._no_tokenizer is None:
                self._side = self._find_side()
            return self._side

    def _find_side(self) -> _ServerSide | None:
        source = self._tokenizer_source
        side = _ServerSide(source, ask=self._ask, aggregate=self.aggregate, overlap=self.overlap,
                           trust_remote_code=self.trust_remote_code)
        try:
            _ = side.files  # the files only: config, tokenizer (the weights are never loaded)
        except (ModelLoadError, InputError) as exc:
            if isinstance(exc, InputError) and Path(source).expanduser().is_dir():
                raise  # the files were found: a usage error of their own
            if self._tokenizer_given:
                raise ModelLoadError(f"{self.name}: --tokenizer {source} cannot be found ({first_line(exc)}); pass a hub id "
                                     "or local directory that has the served model's tokenizer.") from None
            self._no_tokenizer = first_line(exc)
            log.warning("%s: no tokenizer for %s, so pairs are neither counted nor windowed here: the server truncates "
                        "long ones at its own limit (n_tokens unknown). Pass --tokenizer for counts and windows.",
                        self.name, source)
            return None
        if not self._tokenizer_given:  # the model's own files: they must say cross-encoder
            settle_kind(self.model_id, model_kind(side.files.dir), None, command="score")
            side.check_labels()
        return side

    # --- requests ------------------------------------------------------------------------------

    def _ask(self, pairs: Sequence[Pair]) -> np.ndarray:
        """The server's score of each pair (activation applied), float32, in the pairs' order:
        grouped by query, one request per group of up to api_batch_size documents."""
        self._plan_activation()
        groups: dict[str, list[int]] = {}
        for i, pair in enumerate(pairs):
            groups.setdefault(pair.query, []).append(i)
        size = self._batch.size
        work = [(query, at[k:k + size]) for query, at in groups.items() for k in range(0, len(at), size)]

        def run(item: tuple[str, list[int]]) -> tuple[list[int], list[float]]:
            query, at = item
            return at, self._rerank(query, [pairs[i].document for i in at])

        if len(work) == 1 or self.concurrency == 1:
            done = [run(item) for item in work]
        else:
            with ThreadPoolExecutor(max_workers=min(self.concurrency, len(work))) as pool:
                done = list(pool.map(run, work))
        scores = np.empty(len(pairs), dtype=np.float32)
        for at, got in done:
            scores[at] = got
        if self._apply is not None:
            scores = self._apply(scores).astype(np.float32)
        return scores

    def _rerank(self, query: str, documents: list[str]) -> list[float]:
        def one_too_large(exc: PayloadTooLarge) -> Exception:
            said = f": {exc.server_message}" if exc.server_message else ""
            return TerminalBackendError(f"{self.name} refused a single (query, document) pair as too large (413{said}); "
                                        "it is over the server's payload limit (TEI: --payload-limit): shorten it, or "
                                        "raise the server's limit.")

        return send_halving(documents, lambda docs: self._post(query, docs), self._batch, one_too_large)

    def _post(self, query: str, documents: list[str]) -> list[float]:
        if self.name == "tei":
            body: dict[str, Any] = {"query": query, "texts": documents, "truncate": True,
                                    "truncation_direction": "Right", "raw_scores": bool(self._raw), "return_text": False}
        else:
            body = {"model": self.model_id, "query": query, "documents": documents, "return_documents": False,
                    "raw_scores": bool(self._raw)}
        payload = self._http.post_json(self.url, body)
        return self._scores(payload, len(documents))

    def _scores(self, payload: Any, n: int) -> list[float]:
        """The `n` scores of one answer placed by their `index`, or RemoteError (nothing written)."""
        where = public_url(self.url)
        key = "score" if self.name == "tei" else "relevance_score"
        if self.name == "infinity":
            if not isinstance(payload, dict):
                raise RemoteError(f"infinity: {where} answered {short_json(payload)} instead of a rerank result; "
                                  "nothing was written.")
            items = payload.get("results", payload.get("data"))  # "data" before infinity 0.0.5x
        else:
            items = payload
        if not isinstance(items, list) or len(items) != n:
            got = f"{len(items)} results" if isinstance(items, list) else short_json(items)
            raise RemoteError(f"{self.name}: {where} answered {got} for {n} documents; nothing was written.")
        out: list[float | None] = [None] * n
        for item in items:
            index = item.get("index") if isinstance(item, dict) else None
            value = item.get(key) if isinstance(item, dict) else None
            if type(index) is not int or not 0 <= index < n or out[index] is not None or not _number(value):
                raise RemoteError(f"{self.name}: {where} answered a malformed result ({short_json(item)[:80]}): each of the "
                                  f"{n} documents needs one {{\"index\", \"{key}\"}}; nothing was written.")
            out[index] = float(value)
        if self.name == "infinity":  # only answers whose scores are taken
            self._usage.add(_usage(payload.get("usage")))
        return out  # type: ignore[return-value]


__all__ = ["BatchSize", "RemoteScorer", "SCORE_SERVERS", "file_activation", "send_halving", "tei_serves"]
