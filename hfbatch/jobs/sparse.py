"""The embed task of a sparse model (SPLADE): the same job as a dense one (chunks, distinct texts,
the cache, ordered batches, --split, every engine and sync target), with its own values.

A value is Embedded(SparseVector, count): every active dimension as SparseEncoder gives it,
cached compactly (sparse_vectors.pack: indices and values, with the token count) under the
backend's fingerprint, which names the kind. --sparse-top-k and --sparse-vocab shape only what is
written, so one cache serves every choice of them. The column is
struct<indices: list<int32>, values: list<float32>[, tokens: list<string>]>, null for an invalid row.

Its own module because everything dense about EmbedTask (the dimension checks, --truncate-dim,
output precisions and int8 ranges) does not apply, and is refused here up front.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from ..errors import BackendError
from ..options import EmbedOptions
from ..sparse_vectors import SparseVector, mean, pack, sparse_type, to_arrow, top_k, unpack
from .core import Cache
from .embed import Embedded, PackedTask, embed_provenance, refuse_for_kind


class SparseTask(PackedTask):
    """EmbedTask for a SparseEncoder backend (backends/encoders.SparseBackend)."""

    def __init__(self, backend: Any, opts: EmbedOptions):
        refuse_for_kind(backend, opts, why="SPLADE: weights over its vocabulary, searched exactly by dot product; "
                        "dimensions cannot be cut or quantised, --sparse-top-k K keeps each text's K largest",
                        precisions=("float32",), tables=("lance", "delta"))
        super().__init__(backend, opts)
        self._vocab: list[str] | None = None

    pack, unpack = staticmethod(pack), staticmethod(unpack)

    def compute(self, items: Sequence[Any]) -> tuple[list[Any], int]:
        texts, counts = zip(*items) if items else ((), ())
        vectors = self.backend.embed(list(texts))
        if len(vectors) != len(texts):
            raise BackendError(f"{self.backend.model_id} returned {len(vectors)} sparse vectors for {len(texts)} texts; "
                               "nothing was written.")
        if any(not np.isfinite(v.values).all() for v in vectors):
            raise BackendError(f"{self.backend.model_id} returned NaN or infinite values; nothing was written.")
        max_length = self.backend.max_length
        return [Embedded(v, c) for v, c in zip(vectors, counts)], sum(min(c, max_length) for c in counts)

    def recheck(self, cache: Cache, found: dict[int, Any]) -> list[int]:
        return []  # each hit was checked on its own by unpack

    def combine(self, values: Sequence[Any], tokens: int) -> Any:
        """--aggregate mean: the mean of the windows' sparse vectors (not renormalised: SPLADE
        weights are not unit vectors); the whole text's tokens."""
        return Embedded(mean([value.vector for value in values]), tokens, True)

    def dim(self) -> int:
        """The vocabulary's size where known without a model load (0: not known, a cached run)."""
        return int(self.backend.known_dimension() or 0)

    def out_dim_hint(self) -> int | None:
        return None  # a sparse vector has no fixed width

    def schema(self, passthrough: pa.Schema) -> pa.Schema:
        return pa.schema(list(passthrough) + [
            pa.field("embedding", sparse_type(self.opts.sparse_vocab)), pa.field("n_tokens", pa.int32()),
            pa.field("truncated", pa.bool_()), pa.field("embedding_error", pa.string())])

    def vocabulary(self) -> list[str]:
        if self._vocab is None:
            self._vocab = self.backend.vocabulary()
        return self._vocab

    def columns(self, values: Sequence[Any], rows: np.ndarray, errors: Sequence[str | None]) -> list[pa.Array]:
        kept = [top_k(value.vector, self.opts.sparse_top_k) for value in values]
        vectors: list[SparseVector | None] = [kept[r] if r >= 0 else None for r in rows]
        counts = np.array([values[r].count if r >= 0 else 0 for r in rows], dtype=np.int64)
        whole = np.array([values[r].whole if r >= 0 else False for r in rows], dtype=bool)
        valid = rows >= 0
        max_length = self.backend.max_length if valid.any() else 0
        vocab = self.vocabulary() if self.opts.sparse_vocab and valid.any() else ([] if self.opts.sparse_vocab else None)
        return [
            to_arrow(vectors, vocab),
            pa.array(np.where(whole, counts, np.minimum(counts, max_length)), type=pa.int32(), mask=~valid),
            pa.array((counts > max_length) & ~whole, type=pa.bool_(), mask=~valid),
            pa.array(errors, type=pa.string()),
        ]

    def provenance(self) -> dict[str, Any]:
        return embed_provenance(self.backend, self.opts, self.dim())
