"""OpenVINO int8 of a model's export: NNCF with accuracy control, kept only when faithful.

The calibration batches are the ONNX int8 recipe's varied texts (onnx.SMOOTHING_TEXTS); the
validation texts are the load check's (local.CALIBRATION_TEXTS), against torch fp32 vectors. The
quantizer (openvino.quantize_int8) refuses below 0.99 mean / 0.98 min cosine, the int8 bar.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .exports import ExportBundle, package_version

if TYPE_CHECKING:
    from .local import LocalBackend

CALIBRATION_BATCH = 8


def int8_recipe() -> str:
    """Names how the OpenVINO int8 model is made (NNCF version, texts): part of the fingerprint."""
    from .onnx import SMOOTHING_TEXTS

    h = hashlib.blake2b(digest_size=6)
    h.update(f"nncf-accuracy-control|{package_version('nncf')}|".encode())
    h.update("\x1f".join(SMOOTHING_TEXTS).encode())
    return f"int8-nncf-{h.hexdigest()}"


def quantize_openvino(backend: "LocalBackend", bundle: ExportBundle, fp32_path: Path,
                      reference: np.ndarray) -> tuple[str, dict[str, Any]]:
    """(file name in the bundle, cosine figures) of the NNCF int8 model; ModelLoadError below the bar."""
    from .local import CALIBRATION_TEXTS
    from .onnx import INT8_MIN_MEAN, INT8_MIN_MIN, SMOOTHING_TEXTS
    from .openvino import quantize_int8

    name = f"openvino.{int8_recipe()}.xml"
    target = bundle.path(name)
    tokenizer = backend._load_tokenizer()
    names = list(bundle.meta().get("input_names") or ["input_ids", "attention_mask"])
    prompt = backend.prompt or ""

    def feeds(texts: list[str]) -> dict[str, np.ndarray]:
        return tokenizer.feeds(texts, backend.max_length, names, prompt)

    calibration = [feeds(SMOOTHING_TEXTS[i:i + CALIBRATION_BATCH]) for i in range(0, len(SMOOTHING_TEXTS), CALIBRATION_BATCH)]
    figures = quantize_int8(fp32_path, target, calibration=calibration, validation=[feeds(list(CALIBRATION_TEXTS))],
                            reference=np.asarray(reference, dtype=np.float32), min_mean=INT8_MIN_MEAN, min_min=INT8_MIN_MIN)
    return name, dict(figures)
