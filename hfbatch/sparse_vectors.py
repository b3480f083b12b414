"""What a sparse vector is here (a SPLADE text's weights over the vocabulary): its indices, sorted
and unique, and their values, zeros dropped; its bytes in the cache; --sparse-top-k; the dot
product sparse search scores by; and the Arrow column it is written as.

Its own module because the cache, the embed task, the sync targets and search all handle these
values, and each must read them the same way: a planted or damaged cache entry is refused by
`unpack`, never written out.
"""

from __future__ import annotations

import struct
from typing import NamedTuple, Sequence

import numpy as np
import pyarrow as pa

_LE_INT32 = np.dtype("<i4")
_LE_FLOAT32 = np.dtype("<f4")
_HEADER = struct.Struct("<4si")  # magic, the text's untruncated token count
_MAGIC = b"SPV1"


class SparseVector(NamedTuple):
    """indices (int32, strictly increasing) and their values (float32, none zero)."""

    indices: np.ndarray
    values: np.ndarray

    @property
    def nnz(self) -> int:
        return int(len(self.indices))


def from_dense_row(row: np.ndarray) -> SparseVector:
    """The non-zero entries of one dense row, by index."""
    at = np.flatnonzero(row)
    return SparseVector(at.astype(np.int32), np.asarray(row[at], dtype=np.float32))


def from_coo(indices: np.ndarray, values: np.ndarray, rows: int) -> list[SparseVector]:
    """Rows of a coalesced 2-D COO tensor's (2, nnz) indices and values, zeros dropped."""
    order = np.lexsort((indices[1], indices[0]))
    row_of, col, val = indices[0][order], indices[1][order], np.asarray(values, dtype=np.float32)[order]
    keep = val != 0
    row_of, col, val = row_of[keep], col[keep], val[keep]
    bounds = np.searchsorted(row_of, np.arange(rows + 1))
    return [SparseVector(col[bounds[r]:bounds[r + 1]].astype(np.int32), val[bounds[r]:bounds[r + 1]].copy())
            for r in range(rows)]


def pack(vector: SparseVector, count: int) -> bytes:
    """The cache's bytes: a header (magic, token count), then the indices, then the values, little-endian."""
    return (_HEADER.pack(_MAGIC, int(count)) + np.ascontiguousarray(vector.indices, dtype=_LE_INT32).tobytes()
            + np.ascontiguousarray(vector.values, dtype=_LE_FLOAT32).tobytes())


def unpack(raw: bytes, dim: int | None) -> tuple[SparseVector, int] | None:
    """(vector, token count) from the cache's bytes, or None where they are not a sparse vector of
    a model with `dim` dimensions (wrong length, unsorted or out-of-range indices, zero or
    non-finite values): a damaged or planted entry is computed again, never written out."""
    if len(raw) < _HEADER.size or (len(raw) - _HEADER.size) % 8:
        return None
    magic, count = _HEADER.unpack_from(raw)
    if magic != _MAGIC:
        return None
    n = (len(raw) - _HEADER.size) // 8
    indices = np.frombuffer(raw, dtype=_LE_INT32, count=n, offset=_HEADER.size).astype(np.int32)
    values = np.frombuffer(raw, dtype=_LE_FLOAT32, count=n, offset=_HEADER.size + 4 * n).astype(np.float32)
    if n and (indices[0] < 0 or (dim is not None and indices[-1] >= dim) or (np.diff(indices) <= 0).any()
              or not np.isfinite(values).all() or (values == 0).any()):
        return None
    return SparseVector(indices, values), int(count)


def top_k(vector: SparseVector, k: int | None) -> SparseVector:
    """The k largest values (ties: the lower index first), kept in index order; None: all."""
    if k is None or vector.nnz <= k:
        return vector
    keep = np.lexsort((vector.indices, -vector.values))[:k]
    keep.sort()
    return SparseVector(vector.indices[keep], vector.values[keep])


def mean(vectors: Sequence[SparseVector]) -> SparseVector:
    """The mean of sparse vectors (an index absent from one counts as zero there): --aggregate mean."""
    indices = np.concatenate([v.indices for v in vectors]) if vectors else np.zeros(0, np.int32)
    values = np.concatenate([v.values for v in vectors]).astype(np.float64) if vectors else np.zeros(0)
    unique, at = np.unique(indices, return_inverse=True)
    sums = np.zeros(len(unique), dtype=np.float64)
    np.add.at(sums, at, values)
    out = (sums / max(len(vectors), 1)).astype(np.float32)
    keep = out != 0
    return SparseVector(unique[keep].astype(np.int32), out[keep])


def dot(a: SparseVector, b: SparseVector) -> float:
    """Their dot product: the sum over the indices both have."""
    _, ia, ib = np.intersect1d(a.indices, b.indices, assume_unique=True, return_indices=True)
    return float(np.dot(a.values[ia].astype(np.float64), b.values[ib].astype(np.float64)))


def sparse_type(vocab: bool = False) -> pa.DataType:
    """The output column: struct<indices: list<int32>, values: list<float32>> (with --sparse-vocab
    also `tokens`: the vocabulary's string of each index, for a person to read)."""
    fields = [pa.field("indices", pa.list_(pa.int32())), pa.field("values", pa.list_(pa.float32()))]
    if vocab:
        fields.append(pa.field("tokens", pa.list_(pa.string())))
    return pa.struct(fields)


def is_sparse_type(type_: pa.DataType) -> bool:
    """Whether a column holds sparse vectors as written here."""
    return (pa.types.is_struct(type_) and type_.get_field_index("indices") >= 0
            and type_.get_field_index("values") >= 0)


def to_arrow(vectors: Sequence[SparseVector | None], vocab: Sequence[str] | None = None) -> pa.StructArray:
    """The column of `vectors` (None: a null row, an invalid text); `vocab`: index -> token string."""
    valid = [v for v in vectors if v is not None]
    offsets = np.zeros(len(vectors) + 1, dtype=np.int32)
    np.cumsum([v.nnz if v is not None else 0 for v in vectors], out=offsets[1:])
    flat_indices = np.concatenate([v.indices for v in valid]).astype(np.int32) if valid else np.zeros(0, np.int32)
    flat_values = np.concatenate([v.values for v in valid]).astype(np.float32) if valid else np.zeros(0, np.float32)
    mask = pa.array([v is None for v in vectors], type=pa.bool_())
    off = pa.array(offsets, type=pa.int32())
    children = [pa.ListArray.from_arrays(off, pa.array(flat_indices, type=pa.int32())),
                pa.ListArray.from_arrays(off, pa.array(flat_values, type=pa.float32()))]
    names = ["indices", "values"]
    if vocab is not None:
        top = int(flat_indices.max()) + 1 if len(flat_indices) else 0
        words = np.asarray([*vocab, *[""] * max(0, top - len(vocab))], dtype=object)  # an index beyond it: ""
        children.append(pa.ListArray.from_arrays(off, pa.array(words[flat_indices].tolist() if len(flat_indices) else [],
                                                                type=pa.string())))
        names.append("tokens")
    return pa.StructArray.from_arrays(children, names=names, mask=mask)


def from_arrow(column: pa.Array | pa.ChunkedArray) -> list[SparseVector | None]:
    """The vectors of a column written by `to_arrow` (None where null)."""
    out: list[SparseVector | None] = []
    for item in column.to_pylist():
        out.append(None if item is None else SparseVector(np.asarray(item["indices"], dtype=np.int32),
                                                          np.asarray(item["values"], dtype=np.float32)))
    return out
