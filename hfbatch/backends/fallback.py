"""FallbackBackend (--backend auto): the local model first, a remote backend when it fails.

Which backend is active is settled before any cache lookup (so the cache namespace follows the
backend that produces the vectors). On start the local model is loaded and embeds a few canary
texts; if it cannot load, the remote takes over for the whole job. If it fails later, in the
middle of a job, the remote embeds the same canaries first: when their cosine to the local
vectors falls below the threshold (another model or revision behind the API), the job stops
rather than write an output whose rows live in two vector spaces. A remote whose vectors have
another dimension than the local model's (known from its files, or its canaries) is refused the
same way: it serves another model.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Sequence

import numpy as np

from ..errors import BackendError, RemoteError
from .local import LocalBackend
from .remote import RemoteBackend

log = logging.getLogger(__name__)

CANARY_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Battery life is excellent, but the screen scratches easily.",
    "Return policy: items can be sent back within 30 days.",
    "Il fait beau aujourd'hui et nous allons au marché.",
)


class FallbackBackend:
    """Local first, remote on failure; counts rows per backend and says why it switched."""

    name = "auto"

    def __init__(self, primary: LocalBackend, secondary: RemoteBackend, *, canary_threshold: float = 0.99):
        self.primary, self.secondary = primary, secondary
        self.canary_threshold = canary_threshold
        self.model_id = primary.model_id
        self.active: LocalBackend | RemoteBackend = primary
        self.reason: str | None = None
        self.canary_min_cosine: float | None = None
        self.texts_by_backend: Counter[str] = Counter()
        self._canary: np.ndarray | None = None
        self._local_dim: int | None = None  # what the remote's vectors must match once it takes over
        self._started = False

    @property
    def batch_texts(self) -> int | None:
        return getattr(self.active, "batch_texts", None)

    @property
    def load_seconds(self) -> float:
        return self.primary.load_seconds

    def _start(self) -> None:
        if self._started:
            return
        self._started = True
        try:
            self._canary = self.primary.embed(list(CANARY_TEXTS))
        except BackendError as exc:  # not installed, cannot load, no such device, refused...
            self._switch(exc, mixing=False)

    def _switch(self, exc: BaseException, *, mixing: bool) -> None:
        self.reason = f"{type(exc).__name__}: {exc}"
        log.warning("local backend failed (%s); %s takes over", self.reason, self.secondary.name)
        if self._canary is not None:
            self._local_dim = int(self._canary.shape[1])
        else:  # it never embedded: its files may still say the dimension (the remote reads them anyway, for
            try:  # its token counts); None when they cannot be found or do not say
                _ = self.primary.model_dir
                self._local_dim = self.primary.describe().get("dim")
            except Exception:  # a model that failed to resolve or load may fail to describe itself too
                self._local_dim = None
        if mixing and self._canary is not None:
            remote = self.secondary.embed(list(CANARY_TEXTS))
            self._check_dimension(remote.shape[1])
            cosine = (remote * self._canary).sum(1) / (
                np.linalg.norm(remote, axis=1) * np.linalg.norm(self._canary, axis=1)
            )
            self.canary_min_cosine = float(cosine.min())
            if self.canary_min_cosine < self.canary_threshold:
                raise BackendError(
                    f"the local model failed ({exc}) and {self.secondary.name} cannot take over: its vectors for the "
                    f"canary texts differ (min cosine {self.canary_min_cosine:.4f} < {self.canary_threshold}), so it "
                    "serves another model or revision. Stopped instead of mixing two vector spaces; rerun with "
                    f"--backend local or --backend {self.secondary.name}."
                ) from exc
        self.active = self.secondary

    # --- the Backend protocol, delegated to whichever backend is active ------------------------

    def fingerprint(self) -> str:
        self._start()
        return self.active.fingerprint()

    def dimension(self) -> int:
        self._start()
        dim = self.active.dimension()
        if self.active is self.secondary:
            self._check_dimension(dim)
        return dim

    def _check_dimension(self, dim: int) -> None:
        """Refuse a remote whose vectors have another dimension than the local model's."""
        if self._local_dim is not None and dim != self._local_dim:
            raise RemoteError(
                f"{self.secondary.name} answered {dim}-dimensional vectors but the local model "
                f"{self.model_id} makes {self._local_dim}-dimensional ones, so it serves another model; nothing was "
                f"written. Rerun with --backend local, or --backend {self.secondary.name} to use its model alone."
            )

    @property
    def max_length(self) -> int:
        self._start()
        return self.active.max_length

    def token_counts(self, texts: Sequence[str]) -> list[int]:
        self._start()
        return self.active.token_counts(texts)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        self._start()
        if self.active is self.primary:
            try:
                vectors = self.primary.embed(texts)
                self.texts_by_backend[self.primary.name] += len(texts)
                return vectors
            except BackendError as exc:
                self._switch(exc, mixing=True)
        vectors = self.secondary.embed(texts)
        self._check_dimension(vectors.shape[1])
        self.texts_by_backend[self.secondary.name] += len(texts)
        return vectors

    def describe(self) -> dict[str, Any]:
        active = self.active.describe()
        return {
            **active,
            "backend": "auto",
            "active": self.active.name,
            "fell_back": self.active is self.secondary,
            "fallback_reason": self.reason,
            "canary_min_cosine": self.canary_min_cosine,
            "backends": {
                self.primary.name: {"texts_computed": self.texts_by_backend[self.primary.name], **self.primary.describe()},
                self.secondary.name: {"texts_computed": self.texts_by_backend[self.secondary.name], **self.secondary.describe()},
            },
        }
