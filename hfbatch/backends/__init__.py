"""The Backend seam: local models and (later) remote APIs all look like this to the pipeline."""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import numpy as np

from ..errors import InputError


@runtime_checkable
class Backend(Protocol):
    """Turns texts into vectors.

    Created lazily: constructing a backend loads nothing and opens no connection; the tokenizer is
    loaded by the first `token_counts` call and the model by the first `embed`, so --help,
    validation errors and a fully cached rerun cost no model load.
    """

    name: str  # "local", later "hf-api", "tei", "openai"
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


BACKENDS = ("local",)


def make_backend(
    name: str,
    *,
    model: str,
    device: str = "auto",
    normalize: bool = True,
    max_length: int | None = None,
) -> Backend:
    """The backend registry. Only builds the object; nothing heavy happens here."""
    if name == "local":
        from .local import LocalBackend

        return LocalBackend(model, device=device, normalize=normalize, max_length=max_length)
    raise InputError(f"--backend {name!r} is not available; use one of: {', '.join(BACKENDS)}.")
