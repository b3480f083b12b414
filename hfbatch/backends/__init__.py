"""The two seams between a job and a model: Backend (texts -> vectors) and Generator (prompts ->
completions), with the registries that build them (`make_backend`, `make_generator`).

Each protocol declares every member the job core, the engines and the tools use, so they call
members directly (no getattr, no "has it got X?"). Implementations:

    Backend     local.LocalBackend        sentence-transformers (torch, or ONNX Runtime via onnx.py)
                remote.RemoteBackend      hf-api, tei, openai over HTTP (http.HttpClient)
                fallback.FallbackBackend  --backend auto: local first, a remote that agrees on failure
    Generator   generation.LocalGenerator         a transformers causal LM in this process
                remote_generation.RemoteGenerator the HF Inference API / a TGI endpoint

Both are lazy: building one loads nothing and opens no connection, and `fingerprint()` never
loads a model or calls a server, so --help, validation errors and a fully cached rerun cost no
model load and no request.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence, runtime_checkable

import numpy as np

from ..errors import InputError

if TYPE_CHECKING:
    from ..options import EmbedOptions, GenerateOptions
    from .generation import Prepared
    from .local import LocalBackend
    from .remote import RemoteBackend
    from .windows import Windows


@runtime_checkable
class Backend(Protocol):
    """Turns texts into vectors.

    Created lazily: constructing a backend loads nothing and opens no connection; the tokenizer is
    loaded by the first `token_counts` call and the model by the first `embed`.
    """

    name: str  # "local", "hf-api", "tei", "openai", "auto"
    model_id: str
    kind: str  # what `embed` returns (backends/kinds.py): "dense" (float32 rows), "sparse" (SparseVectors), "multivector"

    @property
    def remote(self) -> bool:
        """Vectors come over HTTP (now: `auto` turns remote when it falls back): the job counts
        requests of `batch_texts`, not model calls."""
        ...

    @property
    def batch_texts(self) -> int | None:
        """Texts per `embed` call the core should send; None: the job's --batch-size."""
        ...

    @property
    def load_seconds(self) -> float:
        """Seconds spent loading the model so far: 0.0 until it loads, and for HTTP backends."""
        ...

    @property
    def max_length(self) -> int:
        """Tokens per text the model sees; longer texts are truncated. From files: no model load.
        Under token_source "server usage" a ceiling no count reaches (the server's limit is not known)."""
        ...

    @property
    def token_source(self) -> str:
        """Who counts tokens: "tokenizer" (the model's own, or --tokenizer's: per text, before the
        text is sent; `token_counts` and `max_length` are real) or "server usage" (an
        OpenAI-compatible server on a served model name with no tokenizer here: the server's
        answers count per request, summed in the backend's `usage`; `token_counts` answers 0 per
        text and truncation is the server's, so no text has a count or a truncated flag of its
        own). From files: no model load, no request."""
        ...

    def fingerprint(self) -> str:
        """The identity of the vectors this backend makes, the cache namespace: model, revision or
        weights, pooling/normalize/max_length, endpoint; for a local model its fidelity class
        (every faithful runtime is one identity). Never loads, measures or calls a server."""
        ...

    def prepare(self, *, measure: bool = True) -> Any:
        """Fix how the vectors will be computed: a local model's runtime choice (selection.py:
        measured once per machine, unless measure=False), returned; None for HTTP backends. The
        first `embed` does it anyway: call it only to know the choice beforehand."""
        ...

    def setup_seconds(self) -> dict[str, float]:
        """Seconds spent so far on one-time work, by stage: measure (the runtime choice), export,
        check (a half/int8 configuration on the job's texts), model_load. Zeros for HTTP backends."""
        ...

    def watch(self, note: Callable[[str], None]) -> None:
        """`note(message)` is told what slow one-time work is going on (measuring, exporting)."""
        ...

    def known_dimension(self) -> int | None:
        """The dimension when it costs no model load and no request (config files, a vector already
        made), else None: what cached vectors are checked against before one is computed."""
        ...

    def dimension(self) -> int:
        """The dimension, loading the model or asking the server if it must."""
        ...

    @property
    def prompt(self) -> str | None:
        """The text put before every text (--prompt, --prompt-name or the model's default); None: none.
        Part of the fingerprint; counted in token_counts and split."""
        ...

    def token_counts(self, texts: Sequence[str]) -> list[int]:
        """Tokens per text by the model's own tokenizer, special tokens and prompt included, untruncated
        (0 per text under token_source "server usage": no count is known before the server answers)."""
        ...

    def split(self, texts: Sequence[str], size: int, overlap: int) -> list["Windows"]:
        """Each text's windows of at most `size` tokens as the model reads them, `overlap` shared."""
        ...

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """float32 array of shape (len(texts), dim), one forward pass (the caller batches)."""
        ...

    def describe(self) -> dict[str, Any]:
        """Provenance of this backend: model source, revision, device, load seconds..."""
        ...


@runtime_checkable
class Generator(Protocol):
    """Turns prompts into completions; lazy like Backend (the model loads on the first `generate`)."""

    name: str  # "local", "hf-api"
    model_id: str

    @property
    def remote(self) -> bool:
        """Completions come over HTTP: one request per prompt."""
        ...

    @property
    def load_seconds(self) -> float:
        """Seconds spent loading the model so far (0.0 until it loads, and for HTTP)."""
        ...

    def fingerprint(self) -> str:
        """Model, revision or files, parameters (and URL): the cache namespace. Never loads a model
        or calls a server."""
        ...

    def prepare(self, prompts: Sequence[str]) -> list["Prepared"]:
        """Template (with --chat) and left-truncate each prompt to fit the context; tokenizer only."""
        ...

    def generate(self, prepared: Sequence["Prepared"]) -> list[tuple[str, int, str]]:
        """(text, tokens generated, finish_reason 'stop' | 'length') per prompt, in order."""
        ...

    def describe(self) -> dict[str, Any]:
        """Provenance of this generator: model source, revision, device, load seconds, parameters..."""
        ...


BACKENDS = ("local", "hf-api", "tei", "openai", "auto")
GENERATORS = ("local", "hf-api")
_ALIASES = {"api": "hf-api", "hf": "hf-api", "inference-api": "hf-api"}


def backend_name(name: str) -> str:
    """The canonical backend name (`api` is an alias of `hf-api`)."""
    name = _ALIASES.get(name, name)
    if name not in BACKENDS:
        raise InputError(f"--backend {name!r} is not available; use one of: {', '.join(BACKENDS)} (or api).")
    return name


def make_backend(opts: "EmbedOptions") -> Backend:
    """The backend registry. Only builds objects; nothing loads or connects here."""
    name = backend_name(opts.backend)
    if name == "local":
        kind = local_kind(opts)
        return _local(opts) if kind == "dense" else _encoder(opts, kind)
    if opts.kind == "sparse" and name == "tei":  # TEI's /embed_sparse (a SPLADE server)
        from .remote_sparse import make_remote_sparse

        return make_remote_sparse(opts)
    if opts.kind not in (None, "dense"):
        raise InputError(f"--kind {opts.kind} runs on the local backend in this version; --backend {name} makes dense "
                         "vectors only (drop --backend, or --kind).")
    if opts.max_length is not None:
        raise InputError(
            "--max-length applies to the local model only; a remote server truncates at its own limit "
            "(hfbatch asks it to truncate, and counts tokens with the model's tokenizer)."
        )
    if name == "auto":
        from .fallback import FallbackBackend

        return FallbackBackend(_local(opts), _remote(opts, opts.fallback))
    return _remote(opts, name)


def local_kind(opts: "EmbedOptions") -> str:
    """The kind (backends/kinds.py) a local job runs its model as: what its files say, --kind
    agreeing. A model whose files cannot be had is left to the dense backend, which says why
    where it always has (nothing is loaded here: files only)."""
    from ..errors import HfbatchError
    from .hub import resolve_model_dir
    from .kinds import model_kind, settle_kind

    try:
        root, _ = resolve_model_dir(opts.model or "")
    except HfbatchError:
        if opts.kind not in (None, "dense"):
            raise
        return "dense"
    return settle_kind(opts.model or "", model_kind(root), opts.kind)


def _encoder(opts: "EmbedOptions", kind: str) -> Any:
    from ..settings import Settings
    from .encoders import MultiVectorBackend, SparseBackend

    settings = Settings.load()
    unset = None if opts.precision and opts.runtime else settings  # options not resolved
    if opts.quantize == "int8" and not settings.quantize:  # asked on the command line (the environment's: warned)
        raise InputError(f"--quantize int8: {opts.model} is a {kind} model, which runs as sentence-transformers runs it "
                         "(torch, fp32) in this version; drop --quantize.")
    cls = {"sparse": SparseBackend, "multivector": MultiVectorBackend}[kind]
    return cls(opts.model or "", device=opts.device or "auto", max_length=opts.max_length,
               precision=opts.precision or unset.precision,  # type: ignore[union-attr]
               runtime=opts.runtime or unset.runtime,  # type: ignore[union-attr]
               quantize=opts.quantize, trust_remote_code=opts.trust_remote_code,
               prompt=opts.prompt, prompt_name=opts.prompt_name)


def _local(opts: "EmbedOptions") -> "LocalBackend":
    from ..settings import Settings
    from .local import LocalBackend

    unset = None if opts.precision and opts.runtime and opts.quantize else Settings.load()  # options not resolved
    return LocalBackend(opts.model or "", device=opts.device or "auto", normalize=opts.normalize,
                        max_length=opts.max_length, precision=opts.precision or unset.precision,  # type: ignore[union-attr]
                        runtime=opts.runtime or unset.runtime,  # type: ignore[union-attr]
                        quantize=opts.quantize or ("int8" if unset.quantize else "auto"),  # type: ignore[union-attr]
                        trust_remote_code=opts.trust_remote_code,
                        prompt=opts.prompt, prompt_name=opts.prompt_name)


def _remote(opts: "EmbedOptions", kind: str) -> "RemoteBackend":
    from .remote import RemoteBackend, RetryPolicy

    return RemoteBackend(
        backend_name(kind),
        model=opts.model or "",
        endpoint=opts.endpoint,
        normalize=opts.normalize,
        api_batch_size=opts.api_batch_size,
        concurrency=opts.api_concurrency,
        timeout=opts.api_timeout or 60.0,
        retry=RetryPolicy(attempts=opts.api_retries, ceiling_seconds=opts.api_retry_ceiling),
        pooling=opts.remote_pooling,
        tokenizer=opts.tokenizer,
        prompt=opts.prompt,
        prompt_name=opts.prompt_name,
    )


def make_generator(opts: "GenerateOptions") -> Generator:
    """The generator registry (`local`, or `hf-api` / `api`); only builds objects. `opts` is a
    resolved GenerateOptions (its api_timeout filled from Settings)."""
    name = _ALIASES.get(opts.backend, opts.backend)
    if name not in GENERATORS:
        raise InputError(f"--backend {opts.backend!r} is not one of: local, api (hf-api) for generate.")
    if name == "local":
        from .generation import LocalGenerator

        return LocalGenerator(opts.model or "", device=opts.device or "auto", params=opts.params,
                              precision=opts.precision, trust_remote_code=opts.trust_remote_code)
    if opts.api_retries < 1:
        raise InputError(f"--api-retries must be at least 1 (got {opts.api_retries}).")
    from .http import RetryPolicy
    from .remote_generation import RemoteGenerator

    return RemoteGenerator(opts.model or "", params=opts.params, endpoint=opts.endpoint, concurrency=opts.api_concurrency,
                           timeout=opts.api_timeout or 60.0, tokenizer=opts.tokenizer,
                           retry=RetryPolicy(attempts=opts.api_retries, ceiling_seconds=opts.api_retry_ceiling))
