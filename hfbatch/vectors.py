"""The two vector operations hfbatch needs: L2 normalisation and row-wise cosine similarity.

Both take float arrays of shape (n, dim) (a 1-D vector is one row) and never divide by zero: a
zero vector stays zero when normalised and has cosine 0 to anything.
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
