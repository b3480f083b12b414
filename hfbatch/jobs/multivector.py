"""The embed task of a multi-vector model (ColBERT, late interaction): the same job as a dense
one (chunks, distinct texts, the cache, ordered batches, --split rows, every engine and a Lance
target), with one vector per token as its value.

A value is Embedded(matrix, count): the token vectors MultiVectorEncoder gives (float32, as
cached: token_vectors.pack). The column is list<fixed_size_list<float16>[dim]> by default (the
output is tens of times a dense one: the sidecar says its bytes per row), float32 when asked.

Its own module because the dense options (--truncate-dim, int8 and binary precisions, their
ranges, --aggregate, --index) do not apply to a matrix per row, and are refused up front.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from ..errors import BackendError, InputError
from ..options import EmbedOptions
from ..token_vectors import column_type, pack, to_arrow, unpack
from .core import Cache
from .embed import Embedded, PackedTask, embed_provenance, refuse_for_kind


class MultiVectorTask(PackedTask):
    """EmbedTask for a MultiVectorEncoder backend (backends/encoders.MultiVectorBackend)."""

    def __init__(self, backend: Any, opts: EmbedOptions):
        refuse_for_kind(backend, opts, why="one vector per token, scored by MaxSim; float16 by default, float32 when "
                        "asked", precisions=("float16", "float32"), tables=("lance",), aggregate=False)
        if not opts.normalize:
            raise InputError(f"--no-normalize: {backend.model_id} is a multi-vector model, whose token vectors are as "
                             "its own modules make them (normalised where it has a Normalize module); drop it.")
        super().__init__(backend, opts)
        self.bytes_written = 0  # of the embedding column's values, for the sidecar's bytes per row
        self.rows_with_vectors = 0

    pack, unpack = staticmethod(pack), staticmethod(unpack)

    def compute(self, items: Sequence[Any]) -> tuple[list[Any], int]:
        texts, counts = zip(*items) if items else ((), ())
        matrices = self.backend.embed(list(texts))
        if len(matrices) != len(texts) or len({m.shape[1] for m in matrices}) > 1:
            raise BackendError(f"{self.backend.model_id} returned {len(matrices)} token matrices of widths "
                               f"{sorted({m.shape[1] for m in matrices})} for {len(texts)} texts; nothing was written.")
        if any(not np.isfinite(m).all() for m in matrices):
            raise BackendError(f"{self.backend.model_id} returned NaN or infinite values; nothing was written.")
        self._dim = self._dim or (int(matrices[0].shape[1]) if matrices else None)
        max_length = self.backend.max_length
        return [Embedded(m, c) for m, c in zip(matrices, counts)], sum(min(c, max_length) for c in counts)

    def recheck(self, cache: Cache, found: dict[int, Any]) -> list[int]:
        wrong = [u for u, value in found.items() if self._dim is not None and value.vector.shape[1] != self._dim]
        if wrong:
            cache.stats.unhit(len(wrong))
        return wrong

    def out_dim_hint(self) -> int | None:
        return self.backend.known_dimension()

    def width(self, values: Sequence[Any] = ()) -> int:
        """The token vectors' dimension: the model's (a hit's, for a run the cache served whole)."""
        known = self.backend.known_dimension()
        if known is None and values:
            return int(values[0].vector.shape[1])
        return int(known or self.backend.dimension())

    def dim(self) -> int:
        return self.width()

    def schema(self, passthrough: pa.Schema) -> pa.Schema:
        return pa.schema(list(passthrough) + [
            pa.field("embedding", column_type(self.width(), self.opts.output_precision)),
            pa.field("n_tokens", pa.int32()), pa.field("truncated", pa.bool_()), pa.field("embedding_error", pa.string())])

    def columns(self, values: Sequence[Any], rows: np.ndarray, errors: Sequence[str | None]) -> list[pa.Array]:
        matrices = [values[r].vector if r >= 0 else None for r in rows]
        counts = np.array([values[r].count if r >= 0 else 0 for r in rows], dtype=np.int64)
        valid = rows >= 0
        max_length = self.backend.max_length if valid.any() else 0
        column = to_arrow(matrices, self.width(values), self.opts.output_precision)
        self.bytes_written += column.values.values.nbytes if len(column.values) else 0
        self.rows_with_vectors += int(valid.sum())
        return [
            column,
            pa.array(np.minimum(counts, max_length), type=pa.int32(), mask=~valid),
            pa.array(counts > max_length, type=pa.bool_(), mask=~valid),
            pa.array(errors, type=pa.string()),
        ]

    def provenance(self) -> dict[str, Any]:
        record = embed_provenance(self.backend, self.opts, self.dim())
        record["vectors"]["bytes_per_row"] = round(self.bytes_written / self.rows_with_vectors, 1) \
            if self.rows_with_vectors else None
        return record
