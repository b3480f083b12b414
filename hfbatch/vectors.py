"""The vector operations hfbatch needs: L2 normalisation, row-wise cosine similarity, Matryoshka
truncation and output quantisation.

All take float arrays of shape (n, dim) (a 1-D vector is one row) and never divide by zero: a
zero vector stays zero when normalised and has cosine 0 to anything. The quantisation helpers
reproduce sentence-transformers' `quantize_embeddings` bit for bit (same float32 arithmetic), so a
file written by hfbatch holds exactly what the reference library would have produced, without this
base layer importing it (numpy only).
"""

from __future__ import annotations

import numpy as np

_EPS = 1e-12


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """Each row scaled to unit length (float32 in, float32 out)."""
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, _EPS)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of `a` with the same row of `b`: shape (n,)."""
    a, b = np.atleast_2d(a), np.atleast_2d(b)
    if a.shape != b.shape:
        raise ValueError(f"cosine_rows needs arrays of one shape, got {a.shape} and {b.shape}")
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(1) / np.maximum(norms, _EPS)


OUTPUT_PRECISIONS = ("float32", "float16", "int8", "uint8", "binary", "ubinary")
CALIBRATED = ("int8", "uint8")  # precisions that need ranges
_PACKED = ("binary", "ubinary")  # 8 dimensions per byte


def _check_precision(precision: str) -> None:
    if precision not in OUTPUT_PRECISIONS:
        raise ValueError(f"unknown output precision {precision!r}: choose one of {', '.join(OUTPUT_PRECISIONS)}")


def truncate_dims(vectors: np.ndarray, dim: int | None, *, normalize: bool) -> np.ndarray:
    """Matryoshka truncation: keep the first `dim` columns (all when dim is None or >= the width).

    Models trained with a Matryoshka loss front-load information, so a prefix is a usable smaller
    embedding; but the prefix of a unit vector is no longer unit length, so `normalize` rescales
    each row (an all-zero row stays zero, never NaN) for cosine/dot-product search. float32 out.
    """
    if dim is not None and dim < 1:
        raise ValueError(f"truncate_dims needs dim >= 1 (or None for all dimensions), got {dim}")
    out = np.asarray(vectors, dtype=np.float32)
    if dim is not None and dim < out.shape[-1]:
        out = out[..., :dim]
    return l2_normalize(out) if normalize else out


def quantization_ranges(sample: np.ndarray) -> np.ndarray:
    """Calibration ranges for int8/uint8: a (2, D) float32 array, per-dimension min (row 0) and max (row 1).

    Computed from a representative sample of vectors (rows), exactly as sentence-transformers does,
    so that later batches quantised with these ranges share one bucket grid (ranges taken from each
    batch itself would make codes from different batches incomparable).
    """
    sample = np.atleast_2d(np.asarray(sample))
    if sample.ndim != 2:
        raise ValueError(f"quantization_ranges needs a (n, dim) sample, got shape {sample.shape}")
    if sample.shape[0] == 0:
        raise ValueError("quantization_ranges needs at least one vector in the calibration sample, got none")
    return np.vstack((np.min(sample, axis=0), np.max(sample, axis=0))).astype(np.float32, copy=False)


def quantize(vectors: np.ndarray, precision: str, ranges: np.ndarray | None = None) -> np.ndarray:
    """`vectors` stored at `precision`, the same numbers as sentence-transformers' quantize_embeddings.

    float32 is a cast; float16 is vectors.astype(np.float16). int8/uint8 map each dimension's
    calibration range (`ranges`, see quantization_ranges) onto 256 buckets, clipping values outside
    it; they need `ranges` because ranges inferred from the batch itself would differ between
    batches. binary/ubinary keep the sign bit (> 0) and pack 8 dimensions per byte
    (np.packbits along the last axis; binary = packed - 128 as int8). A (0, D) input gives the empty
    array of the right shape and dtype.
    """
    _check_precision(precision)
    vectors = np.asarray(vectors)
    dim = vectors.shape[-1]
    if precision in CALIBRATED:
        if ranges is None:
            raise ValueError(
                f"{precision} output needs calibration ranges (a (2, {dim}) array from quantization_ranges), got None"
            )
        ranges = np.asarray(ranges)
        if ranges.shape != (2, dim):
            raise ValueError(f"{precision} output needs calibration ranges of shape (2, {dim}), got {ranges.shape}")
    if vectors.ndim == 2 and vectors.shape[0] == 0:
        kind = np.int8 if precision in ("int8", "binary") else np.uint8
        if precision in CALIBRATED:
            return np.zeros((0, dim), dtype=kind)
        if precision in _PACKED:
            return np.zeros((0, output_width(dim, precision)), dtype=kind)
    if precision == "float32":
        return vectors.astype(np.float32)
    if precision == "float16":
        return vectors.astype(np.float16)
    if precision in CALIBRATED:
        # Same operations in the same dtypes as sentence-transformers, so results are bit-identical.
        assert ranges is not None
        ranges = ranges.astype(np.float32, copy=False)
        starts = ranges[0, :]
        steps = (ranges[1, :] - starts) / 255
        steps = np.where(steps == 0, 1, steps)  # a constant dimension: every value maps to one bucket
        q_vals = np.clip(np.floor((vectors - starts) / steps), 0, 255)
        if precision == "uint8":
            return q_vals.astype(np.uint8)
        return (q_vals - 128).astype(np.int8)
    packed = np.packbits(vectors > 0, axis=-1)
    if precision == "ubinary":
        return packed
    return (packed - 128).astype(np.int8)  # uint8 arithmetic wraps: 0 -> -128, 255 -> 127


def output_width(dim: int, precision: str) -> int:
    """Values per stored vector at `precision`: dim, or ceil(dim / 8) bytes for the bit-packed binary/ubinary."""
    _check_precision(precision)
    return (dim + 7) // 8 if precision in _PACKED else dim
