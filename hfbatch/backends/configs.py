"""What a local model runs with: a configuration (runtime, precision, quantize), the request
(--runtime/--precision/--quantize/--device) that narrows the configurations, and the choice
that names one of them and why.

Its own module because the backend, the measuring (selection.py), the record of what was measured
(records.py) and the tools all speak of configurations: one typed value, never a bare tuple
indexed [1]/[2], and one place that says which requests make sense.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

from ..errors import InputError
from ..resources import gpu_possible, resolve_device, resolve_precision
from .fidelity import label

PRECISIONS = ("fp32", "bf16", "fp16", "auto")
RUNTIMES = ("torch", "onnx", "openvino", "auto")
EXPORT_RUNTIMES = ("onnx", "openvino")  # run a cached export of the model, on the CPU
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
Note = Callable[[str], None]  # told what one-time work (measuring, exporting) is going on
log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class Request:
    """What a job asked of a local model (--device, --runtime, --precision, --quantize), checked:
    what narrows the configurations, and what names the vectors' identity before any is chosen."""

    device: str
    runtime: str  # torch | onnx | openvino | auto
    precision: str  # fp32 | bf16 | fp16 | auto
    quantize: str  # none | int8

    @classmethod
    def check(cls, device: str, precision: str, runtime: str, quantize: str | None) -> "Request":
        """The request as a local backend keeps it (check_request), or InputError."""
        config = check_request(device, precision, runtime, quantize)
        return cls(device, config.runtime, config.precision, config.quantize)

    def cpu_only(self) -> bool:
        """Whether the model will run on the CPU, decided without importing torch where possible."""
        if self.device != "auto":
            return self.device == "cpu"  # an explicit GPU that is not there is refused at load
        return not gpu_possible() or resolve_device("auto") == "cpu"

    def recipe(self, runtime: str) -> str:
        """How int8 is made by `runtime` for this request ("none" without int8): part of the sidecar."""
        return int8_recipe(runtime) if self.quantize == "int8" else "none"

    def identity(self, chosen_runtime: Callable[[], str]) -> str:
        """What the vectors are held to: every faithful configuration is one identity (they agree
        with torch fp32 at >= 0.9999), known without choosing anything; int8 is its own, by recipe.
        int8 runtimes differ (0.996 between ONNX Runtime's and OpenVINO's): the one that runs is the
        identity, under --runtime auto `chosen_runtime()` (this machine's choice: read from its
        record, measured first if there is none; int8 is asked for, and lossy)."""
        if self.quantize != "int8":
            return "faithful"
        return f"int8:{self.recipe(self.runtime if self.runtime in EXPORT_RUNTIMES else chosen_runtime())}"

    def describe(self) -> dict[str, str]:
        return {"runtime": self.runtime, "precision": self.precision, "quantize": self.quantize}


class Configuration:
    """What one local backend runs with over its life: its request, the choice once made (`take`),
    and the configurations passed over in this process (each failed to load, or on the job's
    texts: the next faithful one runs, under the same identity)."""

    def __init__(self, request: Request):
        self.request = request
        self.choice: RuntimeChoice | None = None
        self.failed: list[RuntimeConfig] = []  # configurations that failed in this process
        self.passed_over: list[dict[str, str]] = []  # ... and why: the sidecar says so
        self._precision: str | None = None

    def take(self, choice: RuntimeChoice) -> RuntimeChoice:
        """Hold `choice`, naming what was passed over before it."""
        if self.passed_over:
            choice = RuntimeChoice(choice.config, choice.by, choice.record, choice.texts_per_s, choice.fidelity,
                                   tuple(self.passed_over))
        self.choice, self._precision = choice, None
        return choice

    def pass_over(self, reason: str) -> None:
        """Give up the chosen configuration for this process; the next `take` names it."""
        assert self.choice is not None
        log.warning("%s: %s; taking the next configuration", self.choice.label, reason)
        self.failed.append(self.choice.config)
        self.passed_over.append({"label": self.choice.label, "reason": reason[:300]})
        self.choice = self._precision = None

    def precision(self) -> str:
        """The chosen precision: fp32, bf16 or fp16; torch's `auto` on a GPU: fp16, by device."""
        assert self.choice is not None
        if self._precision is None:
            self._precision = resolve_precision(self.choice.config.precision, self.request.device)
        return self._precision

    def describe(self, *, ran: bool) -> dict[str, Any]:
        """The configuration that computed a job's vectors (`ran`; None: it computed none)."""
        int8 = self.request.quantize == "int8"
        if not (ran and self.choice is not None):
            return {"runtime": None, "precision": None, "quantize": None if int8 else "none"}
        runtime = self.choice.config.runtime
        return {"runtime": runtime, "precision": self.precision(), "quantize": self.request.recipe(runtime)}


def int8_recipe(runtime: str) -> str:
    """How `runtime` makes int8 (part of the identity and the sidecar: a new recipe is new vectors)."""
    if runtime == "openvino":
        from .openvino_export import int8_recipe as openvino_recipe

        return openvino_recipe()
    from .onnx import int8_recipe as onnx_recipe

    return onnx_recipe()
