"""The Backend seam: local models and (later) remote APIs all look like this to the pipeline."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, Sequence, runtime_checkable

import numpy as np

from ..errors import InputError

if TYPE_CHECKING:
    from ..options import EmbedOptions


@runtime_checkable
class Backend(Protocol):
    """Turns texts into vectors.

    Created lazily: constructing a backend loads nothing and opens no connection; the tokenizer is
    loaded by the first `token_counts` call and the model by the first `embed`, so --help,
    validation errors and a fully cached rerun cost no model load.
    """

    name: str  # "local", "hf-api", "tei", "openai", "auto"
    model_id: str
    max_length: int  # tokens per text the model sees; longer texts are truncated

    def fingerprint(self) -> str:
        """Model id + revision/weights hash + pooling/normalize/max_length: the cache namespace."""
        ...

    def dimension(self) -> int: ...

    def token_counts(self, texts: Sequence[str]) -> list[int]:
        """Tokens per text by the model's own tokenizer, special tokens included, untruncated."""
        ...

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """float32 array of shape (len(texts), dim), one forward pass (the caller batches)."""
        ...

    def describe(self) -> dict:
        """Provenance of this backend: model source, revision, device, load seconds..."""
        ...


BACKENDS = ("local", "hf-api", "tei", "openai", "auto")
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
        return _local(opts)
    if opts.max_length is not None:
        raise InputError(
            "--max-length applies to the local model only; a remote server truncates at its own limit "
            "(hfbatch asks it to truncate, and counts tokens with the model's tokenizer)."
        )
    if name == "auto":
        from .fallback import FallbackBackend

        return FallbackBackend(_local(opts), _remote(opts, opts.fallback))
    return _remote(opts, name)


def _local(opts: "EmbedOptions") -> Backend:
    from .local import LocalBackend

    return LocalBackend(opts.model or "", device=opts.device or "auto", normalize=opts.normalize,
                        max_length=opts.max_length, precision=opts.precision, runtime=opts.runtime,
                        quantize=opts.quantize, trust_remote_code=opts.trust_remote_code)


def _remote(opts: "EmbedOptions", kind: str) -> Backend:
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
    )
