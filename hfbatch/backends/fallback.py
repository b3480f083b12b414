"""FallbackBackend (--backend auto): the local model first, a remote backend when it fails.

Which side makes the vectors is decided without loading anything until a vector is needed:
- before any work, the local side's `preflight()` (files found, device present, runtime
  installed, memory guard) runs when the first member is asked for; if it fails, the remote
  takes over for the whole job, before any cache lookup;
- on the first `embed`, the local model loads and embeds a few canary texts. If it then fails
  (at load or mid-job), the remote embeds the same canaries first: when their cosine to the
  local vectors falls below the threshold (another model or revision behind the API) the job
  stops rather than write an output whose rows live in two vector spaces. A load failure leaves
  no local canaries to compare with, so it stops too (the job may already hold vectors from the
  local model's cache), naming the fix;
- a remote whose vectors have another dimension than the local model's (from its files, or its
  canaries) is refused the same way: it serves another model.

The fingerprint is that of the side that makes the vectors now, so each cache namespace holds only
vectors of the backend it names: the local model's until a failure, the remote's after. It is
cheap on either side (files only; the remote's is its configuration), so a fully cached rerun
loads no model and makes no request. Hits looked up under the local fingerprint before a verified
switch in the middle of a chunk are vectors of the local model, which the remote was just shown to
agree with; vectors made after the switch are stored under the remote's fingerprint, and a rerun
with a working local model recomputes them locally.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Sequence

import numpy as np

from ..errors import BackendError, RemoteError
from ..vectors import cosine_rows
from .local import LocalBackend
from .remote import RemoteBackend
from .windows import Windows

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
    kind = "dense"

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
        self._checked = False  # the local side's preflight ran
        self._started = False  # the local model was loaded (or failed to load) for the canaries

    @property
    def remote(self) -> bool:
        return self._side().remote

    @property
    def batch_texts(self) -> int | None:
        return self._side().batch_texts

    @property
    def load_seconds(self) -> float:
        return self.primary.load_seconds

    def prepare(self, *, measure: bool = True) -> Any:
        """The local side's runtime choice; one it cannot make hands over to the remote side."""
        if self._checked and self.active is not self.primary:
            return None
        try:
            return self.primary.prepare(measure=measure)
        except BackendError as exc:
            self._checked = True
            self._switch(exc, verified=False)
            return None

    def setup_seconds(self) -> dict[str, float]:
        return self.primary.setup_seconds()

    def watch(self, note: Any) -> None:
        self.primary.watch(note)

    def _side(self) -> LocalBackend | RemoteBackend:
        """The side that makes the vectors, settled as far as it can be without loading a model:
        the local model's preflight runs once, and a failure hands over before any cache lookup."""
        if not self._checked:
            self._checked = True
            try:
                self.primary.preflight()
            except BackendError as exc:  # no such model, no such device, memory guard...
                self._switch(exc, verified=False)
        return self.active

    def _start(self) -> None:
        """Load the local model with the canaries, on the first `embed` (never for cache hits)."""
        if self._side() is not self.primary or self._started:
            return
        self._started = True
        try:
            self._canary = self.primary.embed(list(CANARY_TEXTS))
        except BackendError as exc:
            self._switch(exc, verified=True)

    def _local_dimension(self) -> int | None:
        if self._canary is not None:
            return int(self._canary.shape[1])
        try:  # a model that failed to resolve may fail to tell its dimension too
            return self.primary.known_dimension()
        except Exception:
            return None

    def _switch(self, exc: BaseException, *, verified: bool) -> None:
        """Hand over to the remote. `verified`: only when its canary vectors agree with the local
        model's (needed once vectors of the local model may be in the job)."""
        self.reason = f"{type(exc).__name__}: {exc}"
        log.warning("local backend failed (%s); %s takes over", self.reason, self.secondary.name)
        self._local_dim = self._local_dimension()
        if verified:
            if self._canary is None:
                raise BackendError(
                    f"the local model {self.model_id} passed its checks but failed to load ({exc}); with no vectors of "
                    f"it to compare {self.secondary.name}'s with, and vectors from its cache possibly in this job, "
                    f"--backend auto stops instead of mixing two vector spaces. Rerun with --backend "
                    f"{self.secondary.name}, or fix the local model."
                ) from exc
            remote = self.secondary.embed(list(CANARY_TEXTS))
            self._check_dimension(remote.shape[1])
            self.canary_min_cosine = float(cosine_rows(remote, self._canary).min())
            if self.canary_min_cosine < self.canary_threshold:
                raise BackendError(
                    f"the local model failed ({exc}) and {self.secondary.name} cannot take over: its vectors for the "
                    f"canary texts differ (min cosine {self.canary_min_cosine:.4f} < {self.canary_threshold}), so it "
                    "serves another model or revision. Stopped instead of mixing two vector spaces; rerun with "
                    f"--backend local or --backend {self.secondary.name}."
                ) from exc
        self.active = self.secondary

    # --- the Backend protocol, delegated to the side that makes the vectors ------------------

    def fingerprint(self) -> str:
        """The fingerprint of the side that makes the vectors now (see the module docstring):
        files or configuration only, never a model load or a request."""
        return self._side().fingerprint()

    def known_dimension(self) -> int | None:
        """The local model's dimension from its files (a remote that takes over must match it), or
        the remote's once it has answered; None when neither is known without work."""
        if self._side() is self.primary:
            return self.primary.known_dimension()
        return self._local_dim or self.secondary.known_dimension()  # the local side is not asked again

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
        return self._side().max_length

    @property
    def prompt(self) -> str | None:
        return self._side().prompt

    @property
    def token_source(self) -> str:
        """The side's that makes the vectors now: "tokenizer", or "server usage" for a remote on a
        served model name with no tokenizer here."""
        return self._side().token_source

    @property
    def usage(self) -> dict[str, int]:
        """The remote side's summed `usage` (all zeros while the local side makes the vectors)."""
        return self.secondary.usage

    def token_counts(self, texts: Sequence[str]) -> list[int]:
        return self._side().token_counts(texts)

    def split(self, texts: Sequence[str], size: int, overlap: int) -> list[Windows]:
        return self._side().split(texts, size, overlap)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        self._start()
        if self.active is self.primary:
            try:
                vectors = self.primary.embed(texts)
                self.texts_by_backend[self.primary.name] += len(texts)
                return vectors
            except BackendError as exc:  # transient or terminal alike: the local side has no retry
                self._switch(exc, verified=True)
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
