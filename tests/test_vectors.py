"""l2_normalize and cosine_rows: the one place hfbatch normalises and compares vectors."""

from __future__ import annotations

import numpy as np
import pytest

from hfbatch.vectors import (
    CALIBRATED,
    OUTPUT_PRECISIONS,
    cosine_rows,
    l2_normalize,
    output_width,
    quantization_ranges,
    quantize,
    truncate_dims,
)


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


# --- output precision and Matryoshka truncation -------------------------------------------------

_SUBJECTS = ["The kettle", "My new phone", "This old bicycle", "The hotel room", "Our garden hose", "The delivery van"]
_VERDICTS = [
    "works perfectly and I would buy it again.",
    "broke after two days of light use.",
    "smells faintly of burnt plastic.",
    "is much quieter than the advert promised.",
    "arrived late, but the support team was kind.",
    "costs too much for what it actually does.",
    "made the whole family laugh on a rainy Sunday.",
    "needs a firmware update before it will connect.",
    "looks elegant on the kitchen shelf.",
    "keeps its charge for almost a week.",
]
VARIED_TEXTS = [f"{s} {v}" for v in _VERDICTS for s in _SUBJECTS]  # 60 sentences, all different


def _reference(vectors: np.ndarray, precision: str, ranges: np.ndarray | None = None) -> np.ndarray:
    from sentence_transformers.quantization import quantize_embeddings

    if precision == "float16":  # not a sentence-transformers precision: defined as a plain cast
        return vectors.astype(np.float16)
    return quantize_embeddings(vectors, precision, ranges=ranges)


def _assert_bit_identical(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    assert np.array_equal(got, want)


@pytest.fixture(scope="module")
def model_vectors(st_model) -> np.ndarray:  # type: ignore[no-untyped-def]
    assert len(set(VARIED_TEXTS)) == 60
    return st_model.encode(VARIED_TEXTS, convert_to_numpy=True)


@pytest.mark.parametrize("precision", OUTPUT_PRECISIONS)
def test_quantize_matches_sentence_transformers_on_model_vectors(model_vectors: np.ndarray, precision: str) -> None:
    ranges = quantization_ranges(model_vectors[:20])
    later = model_vectors[20:]
    outside = (later < ranges[0]) | (later > ranges[1])
    assert outside.any()  # the clipping path is exercised
    use = ranges if precision in CALIBRATED else None
    got = quantize(later, precision, use)
    _assert_bit_identical(got, _reference(later, precision, use))
    assert got.shape == (40, output_width(384, precision))
    if precision in CALIBRATED:  # clipped values land on the end buckets, not wrapped around
        lo, hi = (0, 255) if precision == "uint8" else (-128, 127)
        assert (got[later < ranges[0]] == lo).all() and (got[later > ranges[1]] == hi).all()
        assert len(np.unique(got)) > 100  # a real spread, not a constant


def test_quantization_ranges_match_sentence_transformers(model_vectors: np.ndarray) -> None:
    from sentence_transformers.quantization import quantize_embeddings

    sample = model_vectors[:20]
    ranges = quantization_ranges(sample)
    assert ranges.dtype == np.float32 and ranges.shape == (2, 384)
    assert np.array_equal(ranges[0], sample.min(0)) and np.array_equal(ranges[1], sample.max(0))
    for precision in CALIBRATED:  # the same buckets as letting sentence-transformers calibrate itself
        want = quantize_embeddings(model_vectors, precision, calibration_embeddings=sample)
        _assert_bit_identical(quantize(model_vectors, precision, ranges), want)
    with pytest.raises(ValueError, match="at least one vector"):
        quantization_ranges(np.zeros((0, 4), dtype=np.float32))


@pytest.mark.parametrize("precision", OUTPUT_PRECISIONS)
def test_quantize_width_not_a_multiple_of_eight(precision: str) -> None:
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(5, 13)).astype(np.float32)
    ranges = quantization_ranges(vectors[:3]) if precision in CALIBRATED else None
    got = quantize(vectors, precision, ranges)
    _assert_bit_identical(got, _reference(vectors, precision, ranges))
    assert got.shape == (5, 2 if precision in ("binary", "ubinary") else 13)
    assert output_width(13, precision) == got.shape[1]


def test_binary_packs_sign_bits_msb_first() -> None:
    v = np.array([[1.0, -1.0, 0.0, 2.0, -3.0, 0.5, -0.1, 0.2, 1.0]], dtype=np.float32)  # 9 dims -> 2 bytes
    # bits 1,0,0,1,0,1,0,1 = 0b10010101 = 149; then 1 followed by zero padding = 128
    assert quantize(v, "ubinary").tolist() == [[149, 128]]
    assert quantize(v, "binary").tolist() == [[149 - 128, 0]]
    assert quantize(np.full((1, 8), -1.0), "binary").tolist() == [[-128]]
    assert quantize(np.full((1, 8), 1.0), "binary").tolist() == [[127]]


@pytest.mark.parametrize("precision", CALIBRATED)
def test_quantize_constant_dimension(precision: str) -> None:
    rng = np.random.default_rng(2)
    sample = rng.normal(size=(10, 6)).astype(np.float32)
    sample[:, 2] = 0.25  # zero-width range in dimension 2
    ranges = quantization_ranges(sample)
    assert ranges[0, 2] == ranges[1, 2] == np.float32(0.25)
    vectors = rng.normal(size=(7, 6)).astype(np.float32)
    vectors[:3, 2] = 0.25
    got = quantize(vectors, precision, ranges)
    _assert_bit_identical(got, _reference(vectors, precision, ranges))
    base = 0 if precision == "uint8" else -128
    assert (got[:3, 2] == base).all()  # no division by zero: the value itself is the lowest bucket


@pytest.mark.parametrize("precision", OUTPUT_PRECISIONS)
def test_quantize_empty_input(precision: str) -> None:
    empty = np.zeros((0, 13), dtype=np.float32)
    ranges = np.zeros((2, 13), dtype=np.float32) if precision in CALIBRATED else None
    got = quantize(empty, precision, ranges)
    want = _reference(empty, precision, ranges)
    _assert_bit_identical(got, want)
    assert got.shape == (0, output_width(13, precision))


def test_quantize_and_output_width_errors() -> None:
    v = np.ones((2, 4), dtype=np.float32)
    for call in (lambda: quantize(v, "int4"), lambda: output_width(4, "bfloat16")):
        with pytest.raises(ValueError, match="unknown output precision") as info:
            call()
        assert all(p in str(info.value) for p in OUTPUT_PRECISIONS)
    for precision in CALIBRATED:
        with pytest.raises(ValueError, match=f"{precision}.*ranges.*None"):
            quantize(v, precision)
        with pytest.raises(ValueError, match=rf"{precision}.*\(2, 4\).*\(2, 5\)"):
            quantize(v, precision, np.zeros((2, 5), dtype=np.float32))
    assert output_width(384, "float32") == 384 and output_width(384, "ubinary") == 48
    assert output_width(385, "binary") == 49


def test_truncate_dims_matches_sentence_transformers_truncate_dim(st_model, model_vectors: np.ndarray) -> None:  # type: ignore[no-untyped-def]
    want = st_model.encode(VARIED_TEXTS, convert_to_numpy=True, truncate_dim=128)
    assert want.shape == (60, 128)
    got = truncate_dims(model_vectors, 128, normalize=True)
    assert got.dtype == np.float32 and got.shape == (60, 128)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(np.linalg.norm(want, axis=1), 1.0, atol=1e-3)  # the prefix alone is not unit length
    assert (cosine_rows(got, want) >= 0.99999).all()
    raw = truncate_dims(model_vectors, 128, normalize=False)
    assert np.allclose(raw, want, atol=1e-5)


def test_truncate_dims_zero_rows_none_and_wide_dims() -> None:
    v = np.array([[3.0, 4.0, 12.0], [0.0, 0.0, 5.0]], dtype=np.float32)
    got = truncate_dims(v, 2, normalize=True)
    assert got.dtype == np.float32
    assert np.allclose(got, [[0.6, 0.8], [0.0, 0.0]]) and not np.isnan(got).any()  # zero row stays zero
    assert np.array_equal(truncate_dims(v, None, normalize=False), v)
    assert np.array_equal(truncate_dims(v, 3, normalize=False), v) and np.array_equal(truncate_dims(v, 99, normalize=False), v)
    assert np.allclose(truncate_dims(v, None, normalize=True), [[3 / 13, 4 / 13, 12 / 13], [0, 0, 1]])
    assert truncate_dims(v.astype(np.float64), 1, normalize=False).dtype == np.float32
    with pytest.raises(ValueError, match="dim >= 1"):
        truncate_dims(v, 0, normalize=True)
