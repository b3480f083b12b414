"""run_embed(): one embed job, from input file to Parquet + sidecar, as a Task on the chunk core.

The embed task measures texts with the model's tokenizer (counts are cached beside the vectors,
so a warm rerun needs no tokenizer), embeds misses through the Backend, keeps vectors in the
cache as raw float32, and adds `embedding`, `n_tokens`, `truncated` and `embedding_error`.

Cache values are checked against the model's dimension before they can reach an output: known
before the first lookup when the backend can tell it without loading (a local model's config
files), else the dimension the cache recorded; a hit that the first vectors the model makes
contradict is computed again (`recheck`), and a job whose output was already started with the
wrong size fails once (its stores having put the record right for the rerun).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from ..backends import Backend, make_backend
from ..errors import BackendError
from ..io.writers import output_schema
from ..monitoring import Observer
from ..options import EmbedOptions
from ..settings import Settings
from ..validate import EMBED_COLUMNS
from .core import Cache, JobResult, run_job


class EmbedResult(JobResult):
    """What a finished embed job produced: the output paths and the sidecar document."""


def run_embed(options: EmbedOptions, *, backend: Backend | None = None, observer: Observer | None = None,
              settings: Settings | None = None) -> EmbedResult:
    """Run one embed job with `backend` (default: the one the options name, made lazily).
    Raises InputError (exit 2) before any work, other HfbatchErrors (exit 1) after."""
    opts, document = run_job(options, EMBED_COLUMNS, lambda o: EmbedTask(backend or make_backend(o), o),
                             observer=observer, settings=settings)
    return EmbedResult(opts.output, opts.sidecar, document)


class EmbedTask:
    """The embed job on the chunk core. A value is (vector, untruncated token count)."""

    job = "embed"
    added_columns = EMBED_COLUMNS

    def __init__(self, backend: Backend, opts: EmbedOptions):
        self.backend, self.opts = backend, opts
        self._dim: int | None = None  # the backend's own: config files or a vector it made, never the cache's word
        self._hit_dim: int | None = None  # size of hits the cache checked against its own record
        self._out_dim: int | None = None  # the size this job's output was started with
        self._cache_dir: Any = None  # where the hits came from, for the message when they were wrong

    @property
    def batch_texts(self) -> int:
        # a remote backend wants enough texts per call to keep all its connections busy
        return self.backend.batch_texts or self.opts.batch_size or 32

    @property
    def max_batch_tokens(self) -> int | None:
        return self.opts.max_batch_tokens

    def load_seconds(self) -> float:
        return self.backend.load_seconds

    def dim(self) -> int:
        """The output's dimension. A fully cached job takes it from hits (checked against the
        cache's record) rather than load the model; should the model later disagree (a planted
        record), the job fails once, its stores having put the record right for the rerun."""
        if self._out_dim is None:
            self._out_dim = self._dim or self.backend.known_dimension() or self._hit_dim or self.backend.dimension()
        if self._dim is not None and self._dim != self._out_dim:
            raise BackendError(
                f"the cache at {self._cache_dir} held {self._out_dim}-dimensional vectors for this model, which makes "
                f"{self._dim}-dimensional ones; those entries are now replaced or refused: run the job again."
            )
        return self._out_dim

    def lookup(self, cache: Cache, texts: Sequence[str]) -> dict[int, Any]:
        fingerprint, self._cache_dir = self.backend.fingerprint(), cache.directory
        # hits must have the model's size, known before the first lookup when the backend can
        # tell it without loading (else the cache checks them against the size it recorded)
        self._dim = self._dim or self.backend.known_dimension()
        found = cache.lookup(texts, self._dim, fingerprint)
        if not found:
            return {}
        if self._dim is None:
            self._hit_dim = len(next(iter(found.values())))
        hits = list(found)
        tokens = cache.lookup_tokens([texts[u] for u in hits], fingerprint)
        uncounted = [u for j, u in enumerate(hits) if j not in tokens]  # entries stored without a count
        counted = dict(zip(uncounted, self.backend.token_counts([texts[u] for u in uncounted]))) if uncounted else {}
        return {u: (found[u], tokens[j] if j in tokens else counted[u]) for j, u in enumerate(hits)}

    def prepare(self, texts: Sequence[str]) -> tuple[list[Any], list[int]]:
        counts = [int(c) for c in self.backend.token_counts(texts)]
        max_length = self.backend.max_length  # the model reads at most max_length tokens
        return list(zip(texts, counts)), [min(c, max_length) for c in counts]

    def compute(self, items: Sequence[Any]) -> tuple[list[Any], int]:
        texts, counts = zip(*items) if items else ((), ())
        result = self.backend.embed(list(texts))
        expected = (len(texts), self._dim or (result.shape[1] if result.ndim == 2 else -1))
        if result.ndim != 2 or result.shape != expected:
            raise BackendError(
                f"backend {self.backend.name} returned vectors of shape {result.shape} for {len(texts)} texts "
                f"(expected {expected}); nothing was written."
            )
        if not np.isfinite(result).all():
            raise BackendError(f"backend {self.backend.name} returned NaN or infinite values; nothing was written.")
        self._dim = result.shape[1]
        max_length = self.backend.max_length
        return list(zip(result, counts)), sum(min(c, max_length) for c in counts)

    def store(self, cache: Cache, texts: Sequence[str], values: Sequence[Any]) -> None:
        # under the fingerprint of the backend that made them: under --backend auto that can
        # change between two batches of a chunk
        cache.store(texts, np.stack([vector for vector, _ in values]), self.backend.fingerprint(),
                    token_counts=[count for _, count in values])

    def recheck(self, cache: Cache, found: dict[int, Any]) -> list[int]:
        # hits accepted on the cache's record, which the vectors just computed contradict
        wrong = [u for u, (vector, _) in found.items() if self._dim is not None and len(vector) != self._dim]
        if wrong:
            cache.stats.unhit(len(wrong))
        return wrong

    def truncated(self, values: Sequence[Any]) -> list[bool]:
        max_length = self.backend.max_length if values else 0
        return [count > max_length for _, count in values]

    def schema(self, passthrough: pa.Schema) -> pa.Schema:
        return output_schema(passthrough, self.dim())

    def columns(self, values: Sequence[Any], rows: np.ndarray, errors: Sequence[str | None]) -> list[pa.Array]:
        dim = self.dim()
        vectors = np.zeros((len(values), dim), dtype=np.float32)
        for u, (vector, _) in enumerate(values):
            vectors[u] = vector
        counts = np.array([count for _, count in values], dtype=np.int64)
        valid = rows >= 0
        flat = np.zeros((len(rows), dim), dtype=np.float32)
        flat[valid] = vectors[rows[valid]]
        full = np.zeros(len(rows), dtype=np.int64)
        full[valid] = counts[rows[valid]]
        max_length = self.backend.max_length if valid.any() else 0
        return [
            pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), type=pa.float32()), dim, mask=pa.array(~valid)),
            pa.array(np.minimum(full, max_length), type=pa.int32(), mask=~valid),
            pa.array(full > max_length, type=pa.bool_(), mask=~valid),
            pa.array(errors, type=pa.string()),
        ]

    def provenance(self) -> dict[str, Any]:
        return embed_provenance(self.backend, self.opts, self.dim())


def embed_provenance(backend: Backend, opts: EmbedOptions, dim: int) -> dict[str, Any]:
    """What an embed sidecar records beside the shared provenance (build_document's `details`)."""
    described = backend.describe() if backend.name == "auto" else {}
    return {
        "fallback": {k: described.get(k) for k in ("fell_back", "fallback_reason", "canary_min_cosine")}
        if backend.name == "auto" else None,
        "dim": dim,
        "normalize": opts.normalize,
        "max_length": backend.max_length,
        "text_column": opts.text_column,
    }


