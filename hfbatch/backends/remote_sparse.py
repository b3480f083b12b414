"""RemoteSparseBackend: sparse (SPLADE) vectors from text-embeddings-inference's `/embed_sparse`,
for `hfbatch embed --backend tei --kind sparse`, with the members of encoders.SparseBackend that
the embed job uses (jobs/sparse.py), so the job, the cache and every target take it as they take
the local one.

The wire, as TEI has it: `POST /embed_sparse` {"inputs": [...], "truncate", "truncation_direction",
"prompt_name"?} -> per input a list of {"index", "value"}, its non-zero weights in index order
(router/src/http/server.rs `embed_sparse`, its `sparsify`); a model that is not an embedding model
with SPLADE pooling answers 424 "Model is not an embedding model with SPLADE pooling". `GET /info`
says what the server was started with (model_type {"embedding": {"pooling": "splade"}} for a
SPLADE): a dense embedding model, a reranker or a classifier behind the endpoint is refused before
the first text is sent (`check_remote`), as is a model other than --model.

What is sent is what SparseEncoder.encode_document reads: the document side's prompt (or
--prompt / --prompt-name's) put before each text here, as sentence-transformers and TEI both put
it. The tokenizer side, a SparseBackend on the model's (or --tokenizer's) files that never loads
its weights, gives the counts, --split windows, max_length, the prompt and the vocabulary
(--sparse-vocab); it must be had (a TEI's counts are per text, before the request), so a served
model name needs --tokenizer. Answers are checked (one vector per text, indices unique, in range,
values finite) and given back sorted by index, zeros dropped.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from ..errors import InputError, ModelLoadError, RemoteError, TerminalBackendError, first_line
from ..sparse_vectors import SparseVector
from .encoders import SparseBackend, side_dir
from .http import HttpClient, PayloadTooLarge, RetryPolicy, public_url, short_json
from .hub import read_json
from .kinds import describe_kind, model_kind, settle_kind
from .remote_scoring import BatchSize, check_url, get_info, send_halving, tei_serves
from .windows import Windows

if TYPE_CHECKING:
    from ..options import EmbedOptions

_FIXES = {404: "the server has no /embed_sparse route; --endpoint is a TEI server's base URL (e.g. http://gpu-box:8080)",
          424: "the TEI behind --endpoint serves no SPLADE model; start it with a SPLADE model and --pooling splade"}


class RemoteSparseBackend:
    """SPLADE weights over TEI's /embed_sparse. Builds only: nothing connects until the first
    `embed`; `fingerprint()` never does."""

    name = "tei"
    kind = "sparse"
    remote = True
    load_seconds = 0.0
    token_source = "tokenizer"

    def __init__(self, *, model: str, endpoint: str | None, tokenizer: str | None = None, prompt: str | None = None,
                 prompt_name: str | None = None, api_batch_size: int = 32, concurrency: int = 4, timeout: float = 60.0,
                 retry: RetryPolicy = RetryPolicy(), token: str | None = None, trust_remote_code: bool = False):
        if api_batch_size < 1 or concurrency < 1:
            raise InputError("--api-batch-size and --api-concurrency must be at least 1.")
        if prompt is not None and prompt_name is not None:
            raise InputError("give --prompt TEXT or --prompt-name NAME, not both.")
        endpoint = check_url("tei", endpoint, "http://gpu-box:8080")
        base = endpoint.removesuffix("/embed_sparse")
        self.model_id, self.trust_remote_code = model, trust_remote_code
        self.concurrency, self.timeout = concurrency, timeout
        self._base, self.url = base, base + "/embed_sparse"  # may hold user:password@: shown only through public_url
        self._http = HttpClient("tei", concurrency=concurrency, timeout=timeout, retry=retry, token=token, fixes=_FIXES)
        self._batch = BatchSize(api_batch_size, self._http)
        self._tokenizer_source = tokenizer or model
        self._tokenizer_given = tokenizer is not None
        self._asked = (prompt, prompt_name)
        self._side: SparseBackend | None = None
        self._side_lock = threading.Lock()
        self._checked = False
        self._check_lock = threading.Lock()
        self._served: str | None = None
        self._revision: str | None = None
        self._dim: int | None = None
        self._dim_read = False

    # --- identity and the tokenizer side (files only) ------------------------------------------

    def fingerprint(self) -> str:
        """Kind, model, endpoint (without credentials), side and the prompt as asked: what this
        backend is configured to ask for. From the configuration alone (never a request or a file),
        so a cached rerun makes no request; the kind keeps it apart from the same TEI's dense
        namespace."""
        prompt, name = self._asked
        asked = f";prompt={json.dumps(prompt)}" if prompt is not None else \
            f";prompt_name={json.dumps(name)}" if name is not None else ""
        tokenizer = f";tokenizer={self._tokenizer_source}" if self._tokenizer_given else ""
        return f"tei-sparse:{self.model_id}:{public_url(self.url)};side={self.side}{asked}{tokenizer}"

    @property
    def side(self) -> str:
        """The model's side a batch of files is: the document one, unless --prompt-name query."""
        return "query" if self._asked[1] == "query" else "document"

    @property
    def batch_texts(self) -> int:
        """Texts per call that keep every connection busy."""
        return self._batch.size * self.concurrency

    def _tokens(self) -> SparseBackend:
        """The tokenizer side (a SparseBackend on the files, never loaded), found once."""
        with self._side_lock:
            if self._side is None:
                self._side = self._find_side()
            return self._side

    def _find_side(self) -> SparseBackend:
        source = self._tokenizer_source
        prompt, name = self._asked
        side = SparseBackend(source, prompt=prompt, prompt_name=name, trust_remote_code=self.trust_remote_code)
        try:
            _ = side.files  # config, prompts, tokenizer: never the weights
        except (ModelLoadError, InputError) as exc:
            if isinstance(exc, InputError) and Path(source).expanduser().is_dir():
                raise
            flag = "--tokenizer" if self._tokenizer_given else "--model"
            raise ModelLoadError(f"tei: token counts, the prompt and --sparse-vocab need the tokenizer of {source} ({flag}), "
                                 f"which cannot be found ({first_line(exc)}); pass --tokenizer with a hub id or local "
                                 "directory of the served model.") from None
        if not self._tokenizer_given:  # the model's own files: they must say sparse
            root = side.files.dir
            settle_kind(self.model_id, model_kind(root), "sparse")
            if side.side == "query" and side_dir(root, "query") != side_dir(root, "document"):
                raise InputError(f"--prompt-name query: {self.model_id} has a query side of its own (a Router: "
                                 "inference-free SPLADE), which TEI's /embed_sparse does not run (it serves one SPLADE); "
                                 "embed its queries with the local backend.")
        return side

    @property
    def prompt(self) -> str | None:
        """The text put before each text (the side's prompt, as encode_document / encode_query take it)."""
        return self._tokens().prompt or None

    @property
    def prompt_name(self) -> str | None:
        return self._tokens().prompt_name

    @property
    def max_length(self) -> int:
        return self._tokens().max_length

    def token_counts(self, texts: Sequence[str]) -> list[int]:
        return self._tokens().token_counts(texts)

    def split(self, texts: Sequence[str], size: int, overlap: int) -> list[Windows]:
        return self._tokens().split(texts, size, overlap)

    def vocabulary(self) -> list[str]:
        """Index -> the tokenizer's string for it (--sparse-vocab)."""
        return self._tokens().vocabulary()

    def known_dimension(self) -> int | None:
        """The vocabulary the weights are over: the model's config.json vocab_size, where its files
        tell it (None: not known; TEI does not say)."""
        if not self._dim_read:
            self._dim_read = True
            config = read_json(self._tokens().tokens.model_dir / "config.json")
            size = config.get("vocab_size") if isinstance(config, dict) else None
            self._dim = size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None
        return self._dim

    def dimension(self) -> int:
        return int(self.known_dimension() or 0)

    def setup_seconds(self) -> dict[str, float]:
        return {"model_load": 0.0}  # the server's model is loaded already

    def watch(self, note: Callable[[str], None]) -> None:
        """Nothing slow happens once per job here."""

    def prepare(self, **_: Any) -> None:
        return None

    # --- up front ------------------------------------------------------------------------------

    def check_remote(self) -> None:
        """Once, before the first text is sent: TEI's /info must say SPLADE, and --model. Anything
        else is a one-line InputError naming what the server serves (asked again next time: the
        refusal sticks). A server without /info is left to its first answer (424 if not SPLADE)."""
        with self._check_lock:
            if self._checked:
                return
            info = get_info(self._http, self._base + "/info", self.timeout)
            said = tei_serves(info)
            served = info.get("model_id") if info else None
            where = public_url(self._base)
            if said is not None and said[0] != "sparse":
                kind = {"reranker": "`hfbatch score --backend tei`", "dense": "`hfbatch embed --backend tei` (no --kind)"}
                fix = f"; it takes {kind[said[0]]}" if said[0] in kind else ""
                raise InputError(f"tei: {where} serves {said[1]}{f' ({served})' if served else ''}, not a SPLADE model; "
                                 f"--kind sparse needs a TEI started with a SPLADE model and --pooling splade{fix}.")
            if isinstance(served, str) and served and served != self.model_id:
                raise InputError(f"tei: {where} serves {served}, not --model {self.model_id}; pass --model {served} (and "
                                 "--tokenizer with a hub id or directory of its tokenizer if that is not one), so the cache "
                                 "and the sidecar name the model that makes the vectors.")
            self._served = served if isinstance(served, str) else None
            sha = info.get("model_sha") if info else None
            self._revision = f"tei:{sha}" if isinstance(sha, str) and sha else None
            self._checked = True

    # --- embedding ---------------------------------------------------------------------------

    def embed(self, texts: Sequence[str]) -> list[SparseVector]:
        """Each text's sparse vector in order; `concurrency` requests in flight, each retried on its own."""
        texts = list(texts)
        if not texts:
            return []
        self.check_remote()
        prompt = self.prompt
        sent = [prompt + t for t in texts] if prompt else texts
        size = self._batch.size
        parts = [sent[i:i + size] for i in range(0, len(sent), size)]
        if len(parts) == 1 or self.concurrency == 1:
            results = [self._part(p) for p in parts]
        else:
            with ThreadPoolExecutor(max_workers=min(self.concurrency, len(parts))) as pool:
                results = list(pool.map(self._part, parts))  # map keeps input order
        out = [v for part in results for v in part]
        if len(out) != len(texts):
            raise RemoteError(f"tei returned {len(out)} sparse vectors for {len(texts)} texts; nothing was written.")
        return out

    def _part(self, texts: list[str]) -> list[SparseVector]:
        def one_too_large(exc: PayloadTooLarge) -> Exception:
            said = f": {exc.server_message}" if exc.server_message else ""
            return TerminalBackendError(f"tei refused a single text as too large (413{said}); it is longer than the "
                                        "server takes or over its payload limit: cut long texts with --split tokens:N, or "
                                        "raise the server's limits (TEI: --auto-truncate, --payload-limit).")

        return send_halving(texts, self._post, self._batch, one_too_large)

    def _post(self, texts: list[str]) -> list[SparseVector]:
        body = {"inputs": texts, "truncate": True, "truncation_direction": "Right"}
        return self._vectors(self._http.post_json(self.url, body), len(texts))

    def _vectors(self, payload: Any, n: int) -> list[SparseVector]:
        """The `n` vectors of one answer, each sorted by index with zeros dropped, or RemoteError."""
        where = public_url(self.url)
        if not isinstance(payload, list) or len(payload) != n:
            got = f"{len(payload)} vectors" if isinstance(payload, list) else short_json(payload)
            raise RemoteError(f"tei: {where} answered {got} for {n} texts; nothing was written.")
        dim = self.known_dimension()
        out = []
        for entries in payload:
            if not isinstance(entries, list) or not all(
                    isinstance(e, dict) and type(e.get("index")) is int and type(e.get("value")) in (int, float)
                    for e in entries):
                raise RemoteError(f"tei: {where} answered a malformed sparse vector ({short_json(entries)[:80]}): "
                                  "each is a list of {\"index\", \"value\"}; nothing was written.")
            indices = np.array([e["index"] for e in entries], dtype=np.int64)
            values = np.array([e["value"] for e in entries], dtype=np.float32)
            order = np.argsort(indices, kind="stable")
            indices, values = indices[order], values[order]
            if len(indices) and (indices[0] < 0 or (dim is not None and indices[-1] >= dim)
                                 or (np.diff(indices) == 0).any()):
                raise RemoteError(f"tei: {where} answered indices out of range or repeated (the vocabulary has "
                                  f"{dim or 'an unknown number of'} entries); nothing was written.")
            if not np.isfinite(values).all():
                raise RemoteError(f"tei: {where} returned NaN or infinite values; nothing was written.")
            keep = values != 0
            out.append(SparseVector(indices[keep].astype(np.int32), values[keep]))
        return out

    def describe(self) -> dict[str, Any]:
        """The provenance block, from what is known already (asks no server)."""
        side = self._side
        return {
            "backend": self.name,
            "model_id": self.model_id,
            "served_model_id": self._served,
            **describe_kind(self.kind),
            "endpoint": public_url(self.url),
            "model_source": "remote (tei)",
            "revision": self._revision,
            "device": "remote (tei)",
            "side": self.side,
            "dim": self._dim,
            "max_length": side.max_length if side is not None else None,
            "prompt": (side.prompt or None) if side is not None else self._asked[0],
            "prompt_name": side.prompt_name if side is not None else self._asked[1],
            "token_counts": "tokenizer" if side is not None else None,
            "tokenizer": self._tokenizer_source if side is not None else None,
            "truncation": "server",
            "api_batch_size": self._batch.size,
            "api_concurrency": self.concurrency,
            **self._http.summary(),
            "batch_halvings": self._http.stats["halvings"],
            "model_loaded": self._http.connected,
            "load_seconds": 0.0,
        }


def make_remote_sparse(opts: "EmbedOptions") -> RemoteSparseBackend:
    """`hfbatch embed --backend tei --kind sparse`: builds only. What a server's SPLADE cannot take
    is refused here, in one line."""
    if opts.backend != "tei":
        raise InputError(f"--kind sparse runs remotely on TEI's /embed_sparse only: use --backend tei (not {opts.backend}), "
                         "or the local backend.")
    if opts.max_length is not None:
        raise InputError("--max-length applies to the local model only; a remote server truncates at its own limit.")
    if opts.remote_pooling is not None:
        raise InputError("--remote-pooling: a SPLADE's pooling is its own (TEI --pooling splade); drop --remote-pooling.")
    return RemoteSparseBackend(model=opts.model or "", endpoint=opts.endpoint, tokenizer=opts.tokenizer, prompt=opts.prompt,
                               prompt_name=opts.prompt_name, api_batch_size=opts.api_batch_size,
                               concurrency=opts.api_concurrency, timeout=opts.api_timeout or 60.0,
                               retry=RetryPolicy(attempts=opts.api_retries, ceiling_seconds=opts.api_retry_ceiling),
                               trust_remote_code=opts.trust_remote_code)


__all__ = ["RemoteSparseBackend", "make_remote_sparse"]
