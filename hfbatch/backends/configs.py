"""What a local model runs with: a configuration (runtime, precision, quantize), the request
(--runtime/--precision/--quantize/--device) that narrows the configurations, and the choice
that names one of them and why.

Its own module because the backend, the measuring (selection.py), the record of what was measured
(records.py) and the tools all speak of configurations: one typed value, never a bare tuple
indexed [1]/[2], and one place that says which requests make sense.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

from ..errors import InputError
from ..resources import resolve_precision
from .fidelity import label

PRECISIONS = ("fp32", "bf16", "fp16", "auto")
RUNTIMES = ("torch", "onnx", "openvino", "auto")
EXPORT_RUNTIMES = ("onnx", "openvino")  # run a cached export of the model, on the CPU
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
Note = Callable[[str], None]  # told what one-time work (measuring, exporting) is going on


class RuntimeConfig(NamedTuple):
    """One configuration a local model can run with (a tuple, so it equals and hashes as one)."""

    runtime: str  # torch | onnx | openvino
    precision: str  # fp32 | bf16 | fp16 | auto (torch on a GPU: by device)
    quantize: str  # none | int8

    @property
    def label(self) -> str:
        return label(self)


@dataclass(frozen=True)
class RuntimeChoice:
    """The configuration a local model runs with here, and why: what the sidecar records."""

    config: RuntimeConfig
    by: str  # "asked for" | "measured on this machine" | "pinned" | "not measured yet"
    record: str | None = None
    texts_per_s: float | None = None
    fidelity: dict[str, float] | None = None
    passed_over: tuple[dict[str, str], ...] = field(default_factory=tuple)
    measured_seconds: float = 0.0  # spent measuring for this choice in this process (0: taken from the record)

    def __post_init__(self) -> None:
        object.__setattr__(self, "config", RuntimeConfig(*self.config))  # a plain tuple or list, typed

    @property
    def label(self) -> str:
        return label(self.config)

    def describe(self) -> dict[str, Any]:
        return {"chosen": self.label, "by": self.by, "measurements": self.record, "texts_per_s": self.texts_per_s,
                "fidelity_on_fixed_texts": self.fidelity, "passed_over": list(self.passed_over)}


def check_request(device: str, precision: str, runtime: str, quantize: str | None) -> RuntimeConfig:
    """The request as a local backend keeps it (quantize "none" or "int8"; int8 asked of torch goes
    to the exports, which make it), or InputError for one that is not a device, precision, runtime
    or quantization, or a combination no runtime runs."""
    if not _DEVICE_RE.match(device):
        raise InputError(f"--device {device!r} is not a device; use auto, cpu, cuda, cuda:N or mps.")
    if precision not in PRECISIONS:
        raise InputError(f"--precision {precision!r} is not one of: {', '.join(PRECISIONS)}.")
    if quantize not in (None, "none", "int8", "auto"):
        raise InputError(f"--quantize {quantize!r} is not one of: none, int8, auto.")
    if runtime not in RUNTIMES:
        raise InputError(f"--runtime {runtime!r} is not one of: {', '.join(RUNTIMES)}.")
    quantize = "int8" if quantize == "int8" else "none"  # auto: faithful unless int8 is asked for
    if quantize == "int8" and runtime == "torch":
        runtime = "onnx"  # int8 is made by the ONNX Runtime / OpenVINO exports here (HFBATCH_RUNTIME=torch pins fp32 jobs)
    if runtime in EXPORT_RUNTIMES and (device.startswith(("cuda", "mps"))
                                       or (precision not in ("fp32", "auto") and not (runtime == "openvino" and precision == "bf16"))):
        raise InputError(f"--runtime {runtime} runs on the CPU in fp32{' or bf16' if runtime == 'openvino' else ''} "
                         "(or int8); drop --precision and --device, or use --runtime torch.")
    if quantize == "int8" and precision not in ("fp32", "auto"):
        raise InputError("--quantize int8 and --precision are two different precisions; drop one of them.")
    if precision == "fp16":
        resolve_precision("fp16", device)  # a CUDA precision: refused on a CPU before any work
    return RuntimeConfig(runtime, precision, quantize)


def int8_recipe(runtime: str) -> str:
    """How `runtime` makes int8 (part of the identity and the sidecar: a new recipe is new vectors)."""
    if runtime == "openvino":
        from .openvino_export import int8_recipe as openvino_recipe

        return openvino_recipe()
    from .onnx import int8_recipe as onnx_recipe

    return onnx_recipe()
