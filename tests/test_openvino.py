"""--runtime openvino: the exported ONNX graph run by OpenVINO, and its int8 (int8 weights, dynamic activations).

The graph is the one users run: the export LocalBackend(runtime="onnx") makes and proves, its
feeds from the backend's own tokenizer. One export and one quantization are shared by the module
(session fixtures): exporting takes seconds and quantizing ~20 s on two cores.
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("openvino")

from hfbatch.backends import openvino as ovb  # noqa: E402
from hfbatch.backends.fidelity import SMOOTHING_TEXTS, Bar  # noqa: E402
from hfbatch.backends.local import LocalBackend  # noqa: E402
from hfbatch.errors import BackendError, InputError, ModelLoadError  # noqa: E402
from hfbatch.vectors import cosine_rows  # noqa: E402

MAX_LENGTH = 256
DIM = 384


def stdlib_texts(count: int) -> list[str]:
    """Real English text that is in no calibration set: docstrings of stdlib functions and classes
    (deterministic for one Python version), varied in length."""
    import argparse
    import collections
    import csv
    import functools
    import json as json_module
    import pathlib
    import shutil
    import textwrap

    seen, texts = set(), []
    for module in (json_module, textwrap, pathlib, collections, functools, argparse, csv, shutil):
        for name, obj in sorted(vars(module).items()):
            doc = inspect.getdoc(obj) if not name.startswith("_") else None
            if not doc or getattr(obj, "__module__", None) != module.__name__:
                continue
            text = " ".join(doc.split())
            if len(text) >= 40 and text not in seen:
                seen.add(text)
                texts.append(text)
    assert len(texts) >= count, f"only {len(texts)} stdlib docstrings"
    return texts[:count]


class Encoder:
    """The ONNX export hfbatch makes for --runtime onnx, run by ONNX Runtime through LocalBackend: the reference."""

    def __init__(self, backend: LocalBackend):
        backend.embed(["make the export"])
        exports = backend.loader.exports
        assert exports is not None and exports.path is not None
        self.backend, self.path = backend, exports.path
        from hfbatch.backends.onnx_runner import OnnxRunner

        self.input_names = OnnxRunner(self.path).input_names

    def encode(self, texts: list[str]) -> np.ndarray:
        return self.backend.compute(texts)


def feeds_for(encoder: Encoder, texts: list[str]) -> dict[str, np.ndarray]:
    backend = encoder.backend
    return backend.tokens.load().feeds(texts, MAX_LENGTH, encoder.input_names, backend.prompt or "")


def batched(texts: list[str], size: int) -> list[list[str]]:
    return [texts[i:i + size] for i in range(0, len(texts), size)]


@pytest.fixture(scope="session")
def encoder(onnx_dir: Path) -> Encoder:
    """The ONNX export hfbatch makes for --runtime onnx (in the suite's exports folder), run by ONNX Runtime."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HFBATCH_ONNX_DIR", str(onnx_dir))
        return Encoder(LocalBackend("sentence-transformers/all-MiniLM-L6-v2", device="cpu", runtime="onnx",
                                    precision="fp32", quantize="none", max_length=MAX_LENGTH))


@pytest.fixture(scope="session")
def session(encoder: Encoder) -> ovb.OpenVinoSession:
    return ovb.OpenVinoSession(encoder.path)


@pytest.fixture(scope="session")
def validation(encoder: Encoder) -> tuple[list[dict[str, np.ndarray]], np.ndarray]:
    """48 docstrings in batches of 16 sorted by length, and ONNX Runtime's fp32 vectors for them."""
    texts = sorted(stdlib_texts(48), key=len)
    batches = batched(texts, 16)
    reference = np.concatenate([encoder.encode(b) for b in batches])
    return [feeds_for(encoder, b) for b in batches], reference


@pytest.fixture(scope="session")
def int8(encoder: Encoder, validation: tuple, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """quantize_int8 at the default gate: figures (or the refusal) and where it wrote."""
    target = tmp_path_factory.mktemp("ov-int8") / "model.int8.xml"
    feeds, reference = validation
    try:
        figures: Any = ovb.quantize_int8(encoder.path, target, validation=feeds, reference=reference)
    except ModelLoadError as exc:
        figures = exc
    return {"figures": figures, "target": target}


# --- availability, lazy imports ------------------------------------------------------------------


def test_import_loads_neither_openvino_nor_nncf() -> None:
    code = ("import sys, hfbatch.backends.openvino as ov; ok = ov.available(); v = ov.version(); "
            "import json; print(json.dumps([ok, v, 'openvino' in sys.modules, 'nncf' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    available, version, openvino_loaded, nncf_loaded = json.loads(out)
    assert available is True
    import openvino

    assert version == openvino.__version__.split("-")[0]
    assert openvino_loaded is False and nncf_loaded is False


def test_missing_openvino_says_how_to_install(monkeypatch: pytest.MonkeyPatch, encoder: Encoder) -> None:
    monkeypatch.setattr(ovb, "available", lambda: False)
    with pytest.raises(ModelLoadError) as info:
        ovb.OpenVinoSession(encoder.path)
    assert str(info.value) == "--runtime openvino needs OpenVINO: pip install 'hfbatch[openvino]'."


# --- OpenVinoSession ------------------------------------------------------------------------------


def test_vectors_match_onnx_runtime_across_shapes(session: ovb.OpenVinoSession, encoder: Encoder) -> None:
    """Two calls of different batch sizes and token lengths (dynamic shapes); fp32 faithful."""
    assert session.input_names == ["input_ids", "attention_mask", "token_type_ids"]
    texts = SMOOTHING_TEXTS[:20] + stdlib_texts(30)
    short, long = sorted(texts, key=len)[:7], sorted(texts, key=len)[7:]
    for batch in (short, long):
        feeds = feeds_for(encoder, batch)
        vectors = session.run(feeds)
        assert vectors.dtype == np.float32 and vectors.shape == (len(batch), DIM)
        cosine = cosine_rows(vectors, encoder.encode(batch))
        # 0.99999, not 0.9999: OpenVINO's bf16 (its default on CPUs with avx512_bf16 / AMX) reaches
        # 0.99997, so this fails if the f32 hint is lost
        assert cosine.min() >= 0.99999, cosine.min()
    assert feeds_for(encoder, short)["input_ids"].shape != feeds_for(encoder, long)["input_ids"].shape


def test_precision_is_forced_to_f32(session: ovb.OpenVinoSession) -> None:
    assert str(session.compiled.get_property("INFERENCE_PRECISION_HINT")) in ("<Type: 'float32'>", "f32")
    assert str(session.compiled.get_property("PERFORMANCE_HINT")) in ("PerformanceMode.LATENCY", "LATENCY")


def test_extra_feeds_are_ignored_and_missing_ones_refused(session: ovb.OpenVinoSession,
                                                         encoder: Encoder) -> None:
    feeds = feeds_for(encoder, ["one text", "another, longer text"])
    extra = {**feeds, "position_ids": np.zeros_like(feeds["input_ids"])}
    assert np.array_equal(session.run(extra), session.run(feeds))
    with pytest.raises(BackendError, match="token_type_ids"):
        session.run({k: v for k, v in feeds.items() if k != "token_type_ids"})


def test_cache_dir_and_threads(encoder: Encoder, session: ovb.OpenVinoSession, tmp_path: Path) -> None:
    cache = tmp_path / "ov-cache"
    first = ovb.OpenVinoSession(encoder.path, cache_dir=cache, threads=1)
    assert int(first.compiled.get_property("INFERENCE_NUM_THREADS")) == 1
    assert any(p.stat().st_size > 1_000_000 for p in cache.iterdir())  # the compiled blob
    second = ovb.OpenVinoSession(encoder.path, cache_dir=cache, threads=1)  # loaded from the cache
    feeds = feeds_for(encoder, ["a cached model gives the same vectors"])
    assert np.array_equal(first.run(feeds), second.run(feeds))
    assert cosine_rows(second.run(feeds), session.run(feeds)).min() >= 0.99999


def test_unknown_precision_is_an_input_error(encoder: Encoder) -> None:
    with pytest.raises(InputError, match="f32"):
        ovb.OpenVinoSession(encoder.path, precision="fp8")


def test_missing_file_is_a_model_load_error(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "model.onnx"
    with pytest.raises(ModelLoadError) as info:
        ovb.OpenVinoSession(path)
    message = str(info.value)
    assert str(path) in message and "--runtime onnx or torch" in message and "\n" not in message


@pytest.mark.parametrize("name", ["model.onnx", "model.xml"])
def test_corrupt_file_is_a_model_load_error(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ModelLoadError) as info:
        ovb.OpenVinoSession(path)
    message = str(info.value)
    assert str(path) in message and "--runtime onnx or torch" in message and "\n" not in message
    assert info.value.__cause__ is not None  # OpenVINO's own error, kept for --debug


# --- int8 -------------------------------------------------------------------------------------------


def test_int8_is_faithful_on_real_text_and_loadable(int8: dict[str, Any], validation: tuple,
                                                   session: ovb.OpenVinoSession) -> None:
    import openvino

    figures, target = int8["figures"], int8["target"]
    assert not isinstance(figures, ModelLoadError), figures  # int8 weights + dynamic activations hold the bar
    assert figures["mean"] >= 0.99 and figures["min"] >= 0.98
    assert figures["seconds"] > 0
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.int8.bin", "model.int8.xml"]
    quantized = ovb.OpenVinoSession(target)
    assert quantized.input_names == session.input_names
    feeds, reference = validation
    vectors = np.concatenate([quantized.run(f) for f in feeds])
    assert vectors.dtype == np.float32 and vectors.shape == reference.shape
    cosine = cosine_rows(vectors, reference)
    assert cosine.mean() == pytest.approx(figures["mean"], abs=1e-5)
    assert cosine.min() == pytest.approx(figures["min"], abs=1e-5)
    # it really is int8: every linear layer's weights and the 3 embedding tables stored as int8, vectors not fp32's
    assert ovb._int8_weights(openvino.Core().read_model(str(target))) == 6 * 6 + 3
    fp32 = np.concatenate([session.run(f) for f in feeds])
    assert cosine_rows(vectors, fp32).min() < 0.99999


def test_int8_refused_below_the_gate_leaves_nothing(encoder: Encoder,
                                                    validation: tuple, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capfd: pytest.CaptureFixture[str]) -> None:
    """A gate int8 cannot meet: refused with the figures, nothing written."""
    feeds, reference = validation
    target = tmp_path / "out" / "model.int8.xml"
    with pytest.raises(ModelLoadError) as info:
        ovb.quantize_int8(encoder.path, target, validation=feeds[:1],
                          reference=reference[:len(feeds[0]["input_ids"])], bar=Bar("strict", 0.99, 0.99999))
    message = str(info.value)
    assert "the strict bar is >= 0.99 mean / 0.99999 min" in message
    assert "drop --quantize int8 or use --runtime onnx" in message
    assert "\n" not in message
    assert not target.exists() and not target.with_suffix(".bin").exists()
    assert list(target.parent.iterdir()) == []  # no temp files either
    assert capfd.readouterr().out == ""  # NNCF's progress bars and logs stay off stdout


def test_int8_bad_arguments(encoder: Encoder, validation: tuple, tmp_path: Path) -> None:
    feeds, reference = validation
    with pytest.raises(ValueError, match="rows"):
        ovb.quantize_int8(encoder.path, tmp_path / "m.xml", validation=feeds,
                          reference=reference[:-1])
    with pytest.raises(ModelLoadError, match="no such file"):
        ovb.quantize_int8(tmp_path / "missing.onnx", tmp_path / "m.xml", validation=feeds, reference=reference)
    assert list(tmp_path.iterdir()) == []
