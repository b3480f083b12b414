"""l2_normalize and cosine_rows: the one place hfbatch normalises and compares vectors."""

from __future__ import annotations

import numpy as np
import pytest

from hfbatch.vectors import cosine_rows, l2_normalize


def test_l2_normalize_rows_and_zero_vectors() -> None:
    a = np.array([[3.0, 4.0], [0.0, 0.0], [-2.0, 0.0]], dtype=np.float32)
    got = l2_normalize(a)
    assert got.dtype == np.float32
    assert np.allclose(got, [[0.6, 0.8], [0.0, 0.0], [-1.0, 0.0]])
    assert np.allclose(l2_normalize(np.array([3.0, 4.0])), [0.6, 0.8])  # one vector


def test_cosine_rows_against_the_definition() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 7)), rng.normal(size=(5, 7))
    want = [float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y))) for x, y in zip(a, b)]
    assert np.allclose(cosine_rows(a, b), want)
    assert np.allclose(cosine_rows(a, 3 * a), 1.0) and np.allclose(cosine_rows(a, -a), -1.0)
    assert cosine_rows(np.zeros((1, 3)), np.ones((1, 3)))[0] == 0.0  # not NaN, which compares false with any threshold


def test_cosine_rows_refuses_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="one shape"):
        cosine_rows(np.ones((2, 3)), np.ones((2, 4)))
