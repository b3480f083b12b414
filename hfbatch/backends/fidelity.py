"""The fidelity bars, in one place: how close a configuration's vectors must stay to the model's
own (sentence-transformers, torch fp32) to be used.

- FAITHFUL (cosine >= 0.9999 mean, >= 0.999 min): every configuration the default may run (torch,
  ONNX Runtime and OpenVINO in fp32; bf16 where the CPU has it natively; fp16 on a GPU). They are
  interchangeable, so they share one identity: one cache namespace, one vector space.
- INT8 (>= 0.99 mean, >= 0.98 min): int8 runs only when asked (--quantize int8,
  ENABLE_MODEL_QUANTIZATION) and is its own identity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import ModelLoadError
from ..vectors import cosine_rows


# Varied lengths and languages: the fixed sample every configuration is checked against torch fp32
# on (an export when it is made, half precision on a GPU, int8 as it is calibrated).
CALIBRATION_TEXTS = [
    "The kettle boils fast and the handle stays cool.",
    "Arrived broken; the glass lid was cracked in two places and support never answered my emails.",
    "Battery life is poor: barely two hours of continuous use, far from the twelve hours advertised.",
    "Très bien, je recommande. Sehr gut verarbeitet, aber etwas teuer.",
    "A", "ok", "SKU-4471-B / lot 2026-11 / 3 units",
    " ".join(["This review goes on at length about every detail of the product."] * 12),
]


@dataclass(frozen=True)
class Bar:
    name: str
    mean: float
    min: float

    def passes(self, figures: dict[str, float]) -> bool:
        return figures["mean"] >= self.mean and figures["min"] >= self.min

    def __str__(self) -> str:
        return f">= {self.mean} mean / {self.min} min"


FAITHFUL = Bar("faithful", 0.9999, 0.999)
# A faithful configuration must also give a text the same vector whatever it is batched with (a
# 1-row query job and a 2,000-row document job): alone against in a padded batch, at least this.
BATCH_INVARIANT = 0.99999
INT8 = Bar("int8", 0.99, 0.98)


def bar_for(quantize: str | None) -> Bar:
    """The bar of a configuration: int8's, or the faithful one for everything else."""
    return INT8 if quantize == "int8" else FAITHFUL


def figures(reference: np.ndarray, got: np.ndarray) -> dict[str, float]:
    cosine = cosine_rows(np.asarray(reference, dtype=np.float32), np.asarray(got, dtype=np.float32))
    return {"mean": round(float(cosine.mean()), 6), "min": round(float(cosine.min()), 6)}


def check_fidelity(reference: np.ndarray, got: np.ndarray, bar: Bar, *, what: str, where: str,
                   fix: str) -> dict[str, float]:
    """Cosine figures of `got` against `reference`; ModelLoadError naming `what`, `where` and `fix`
    when they are under `bar`."""
    result = figures(reference, got)
    if not bar.passes(result):
        raise ModelLoadError(f"{what} is not faithful enough on {where}: cosine to fp32 mean {result['mean']:.5f}, "
                             f"min {result['min']:.5f} (the {bar.name} bar is {bar}); {fix}")
    return result


def labels(configs: Sequence[tuple[str, str, str]]) -> str:
    return ", ".join(label(c) for c in configs)


def label(config: tuple[str, str, str]) -> str:
    runtime, precision, quantize = config
    return f"{runtime} {'int8' if quantize == 'int8' else precision}"
