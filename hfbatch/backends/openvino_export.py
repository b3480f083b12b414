"""OpenVINO int8 of a model's export: int8 weights run with dynamic activation quantization,
kept only when faithful.

The validation texts are the load check's (fidelity.CALIBRATION_TEXTS), against torch fp32 vectors;
the quantizer (openvino.quantize_int8) refuses below 0.99 mean / 0.98 min cosine, the int8 bar.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from .exports import ExportBundle, package_version
from .tokenizer import ModelTokenizer


def int8_recipe() -> str:
    """Names how the OpenVINO int8 model is made and run (NNCF version, weight mode, activation
    group): part of the fingerprint, so another recipe is another export and cache namespace."""
    from .openvino import DQ_GROUP

    h = hashlib.blake2b(digest_size=6)
    # the activations are quantized by OpenVINO as it runs: its version is part of the recipe too
    h.update(f"nncf-compress-weights-int8-sym|{package_version('nncf')}|dynamic-quantization-group={DQ_GROUP}|"
             f"openvino={package_version('openvino')}".encode())
    return f"int8-wdq{DQ_GROUP}-{h.hexdigest()}"


def quantize_openvino(tokenizer: ModelTokenizer, bundle: ExportBundle, fp32_path: Path, reference: np.ndarray, *,
                      max_length: int, prompt: str) -> tuple[str, dict[str, Any]]:
    """(file name in the bundle, cosine figures) of the NNCF int8 model; ModelLoadError below the bar."""
    from .fidelity import CALIBRATION_TEXTS
    from .openvino import quantize_int8

    name = f"openvino.{int8_recipe()}.xml"
    target = bundle.path(name)
    names = list(bundle.meta().get("input_names") or ["input_ids", "attention_mask"])

    def feeds(texts: list[str]) -> dict[str, np.ndarray]:
        return tokenizer.feeds(texts, max_length, names, prompt)

    figures = quantize_int8(fp32_path, target, validation=[feeds(list(CALIBRATION_TEXTS))],
                            reference=np.asarray(reference, dtype=np.float32))
    return name, dict(figures)
