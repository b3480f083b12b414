"""What a multi-vector (late interaction, ColBERT) value is here: one text's matrix of token
vectors (tokens x dim, float32 as computed); its bytes in the cache; the Arrow column it is
written as, list<fixed_size_list<float16|float32>[dim]>; and how many bytes a row takes.

Its own module because the cache, the task and the readers must agree on the layout, and a
planted or damaged cache entry must be refused by `unpack`, never written out.
"""

from __future__ import annotations

import struct
from typing import Sequence

import numpy as np
import pyarrow as pa

_LE_FLOAT32 = np.dtype("<f4")
_HEADER = struct.Struct("<4siii")  # magic, the text's untruncated token count, vectors, dim
_MAGIC = b"MVV1"
PRECISIONS = {"float32": (pa.float32(), np.float32), "float16": (pa.float16(), np.float16)}


def pack(matrix: np.ndarray, count: int) -> bytes:
    """The cache's bytes: a header (magic, token count, rows, dim), then the float32 values, little-endian."""
    rows, dim = matrix.shape
    return _HEADER.pack(_MAGIC, int(count), rows, dim) + np.ascontiguousarray(matrix, dtype=_LE_FLOAT32).tobytes()


def unpack(raw: bytes, dim: int | None) -> tuple[np.ndarray, int] | None:
    """(matrix, token count) from the cache's bytes, or None where they are not a matrix of `dim`
    columns (wrong length or dim, non-finite values)."""
    if len(raw) < _HEADER.size:
        return None
    magic, count, rows, width = _HEADER.unpack_from(raw)
    if magic != _MAGIC or rows < 0 or width < 1 or (dim is not None and width != dim):
        return None
    if len(raw) != _HEADER.size + 4 * rows * width:
        return None
    matrix = np.frombuffer(raw, dtype=_LE_FLOAT32, offset=_HEADER.size).astype(np.float32).reshape(rows, width)
    if not np.isfinite(matrix).all():
        return None
    return matrix, int(count)


def column_type(dim: int, precision: str) -> pa.DataType:
    return pa.list_(pa.list_(PRECISIONS[precision][0], dim))


def to_arrow(matrices: Sequence[np.ndarray | None], dim: int, precision: str) -> pa.ListArray:
    """The column of `matrices` (None: a null row, an invalid text), stored at `precision`."""
    value_type, dtype = PRECISIONS[precision]
    valid = [m for m in matrices if m is not None]
    offsets = np.zeros(len(matrices) + 1, dtype=np.int32)
    np.cumsum([len(m) if m is not None else 0 for m in matrices], out=offsets[1:])
    flat = np.concatenate([m.reshape(-1) for m in valid]).astype(dtype) if valid else np.zeros(0, dtype)
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(flat, type=value_type), dim)
    mask = pa.array([m is None for m in matrices], type=pa.bool_())
    return pa.ListArray.from_arrays(pa.array(offsets, type=pa.int32()), vectors, mask=mask)


def from_arrow(column: pa.Array | pa.ChunkedArray) -> list[np.ndarray | None]:
    """The float32 matrices of a column written by `to_arrow` (None where null)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    out: list[np.ndarray | None] = []
    dim = column.type.value_type.list_size
    for i in range(len(column)):
        if not column[i].is_valid:
            out.append(None)
            continue
        values = column[i].values.flatten().to_numpy(zero_copy_only=False)
        out.append(np.asarray(values, dtype=np.float32).reshape(-1, dim))
    return out


def is_multivector_type(type_: pa.DataType) -> bool:
    return pa.types.is_list(type_) and pa.types.is_fixed_size_list(type_.value_type)
