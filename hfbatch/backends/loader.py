"""What computes a local model's vectors in one configuration, loaded once: the torch model
(torch_runner.py) or the proved export's runner (builds.Exports), within the memory guard; and
what loading it found out (the device, the memory estimate, half precision's fidelity, emulated
bf16's cost), and letting go of it.

Its own module because LocalBackend decides *which* configuration runs (and passes over one that
fails: a new configuration, the same Loader); this holds *what* runs it.
"""

from __future__ import annotations

import gc
import importlib.util
from typing import Any

from ..errors import ModelLoadError
from ..resources import check_model_memory, cpu_has_native_bf16, resolve_device
from . import torch_runner
from .builds import Exports
from .configs import Note, Request, RuntimeConfig
from .runners import Runner, release_sessions
from .spec import ModelFiles
from .tokenizer import Tokens
from .torch_runner import TorchModel, load_sentence_transformer


class Loader:
    """Loads the runner of a configuration for one model and one backend's settings;
    `timings["export"]` is credited with the seconds spent making exports."""

    def __init__(self, files: ModelFiles, tokens: Tokens, request: Request, *, normalize: bool, trust_remote_code: bool,
                 timings: dict[str, float]):
        self.files, self.tokens, self.request, self.model_id = files, tokens, request, files.model_id
        self.normalize, self.trust_remote_code, self.timings = normalize, trust_remote_code, timings
        self.engine: Runner | None = None  # the torch model or the export's runner
        self.exports: Exports | None = None  # the export of the configuration (not torch)
        self.model: TorchModel | None = None  # the torch model (its runtime, or what an export is made from)
        self.device: str | None = None
        self.estimated_bytes: int | None = None
        self.fidelity: dict[str, float] | None = None  # half precision against fp32 (--precision auto on a GPU)
        self.bf16_factor: float | None = None  # bf16 time / fp32 time, measured where bf16 is emulated

    @property
    def loaded(self) -> bool:
        return self.engine is not None or self.model is not None

    def preflight(self, runtime: str) -> str:
        """Every check that decides whether `runtime` can load the model, short of loading it (see
        LocalBackend.preflight). Returns the device."""
        if runtime == "torch":
            device = resolve_device(self.request.device)
        else:
            device = "cpu"
            module, extra = ("openvino", "openvino") if runtime == "openvino" else ("onnxruntime", "onnx")
            if importlib.util.find_spec(module) is None:
                raise ModelLoadError(f"--runtime {runtime} needs {module}: pip install 'hfbatch[{extra}]'.")
        self.estimated_bytes = check_model_memory(self.model_id, self.files.dir)
        return device

    def start(self, config: RuntimeConfig, precision: str, note: Note | None) -> Runner:
        """The runner of `config` (`precision`: its precision resolved for the device), loaded now if it is not."""
        if self.engine is None:
            if config.runtime == "torch":
                self.engine = self.torch(config, precision)
            else:
                self.device = self.preflight(config.runtime)
                self.engine = self.exports_of(config, precision, note).runner()
        return self.engine

    def torch(self, config: RuntimeConfig, precision: str) -> TorchModel:
        """The torch model (torch_runner.py) with the backend's settings: `config`'s runtime, or the
        fp32 model an export is made from. --precision auto on a GPU keeps half precision only where
        it matches fp32, and emulated bf16 says what it costs."""
        if self.model is not None:
            return self.model
        on_torch = config.runtime == "torch"
        device = resolve_device(self.request.device) if on_torch else "cpu"
        self.estimated_bytes = check_model_memory(self.model_id, self.files.dir)
        # prompt "" where the model names a default prompt this job turned off (--prompt ""); None
        # otherwise (an empty prompt would still be measured for prompt-excluding pooling)
        model = torch_runner.load(str(self.files.dir), device, self.model_id, trust_remote_code=self.trust_remote_code,
                                  normalize=self.normalize, max_length=self.tokens.max_length,
                                  prompt=self.tokens.prompt or ("" if self.tokens.spec.has_default_prompt else None),
                                  precision=precision if on_torch else "fp32")
        self.model, self.device = model, device
        if on_torch:
            if self.request.precision == "auto" and precision != "fp32":
                self.fidelity = model.check_half(precision)
            if precision == "bf16" and device == "cpu" and not cpu_has_native_bf16():
                self.bf16_factor = model.emulated_bf16_factor()
        return model

    def exports_of(self, config: RuntimeConfig, precision: str, note: Note | None) -> Exports:
        """The export of `config` (not torch): made, proved and run by builds.Exports."""
        if self.exports is None or self.exports.config != config:
            self.exports = Exports(config, precision=precision, tokens=self.tokens, weights_key=self.files.weights_key(),
                                   normalize=self.normalize, torch_model=lambda: self.torch(config, precision),
                                   let_go=self.let_go_of_torch, timings=self.timings, note=note)
        return self.exports

    def let_go_of_torch(self) -> None:
        self.model = None

    def drop(self) -> None:
        """Forget the configuration's runner and export (it is passed over: the next one loads its own)."""
        self.engine = self.exports = None

    def release(self, *, torch_model: bool = False) -> None:
        """Let go of the loaded engine, and with torch_model=True of the process's torch models
        too; the memory goes back to the system."""
        from ..resources import return_freed_memory

        self.engine = self.model = None
        release_sessions()
        if torch_model:
            load_sentence_transformer.cache_clear()
        gc.collect()
        return_freed_memory()

    def describe(self) -> dict[str, Any]:
        return {"device": self.device, "model_loaded": self.loaded, "precision_fidelity": self.fidelity,
                "export_fidelity": self.exports.fidelity if self.exports is not None else None,
                "bf16_emulated_factor": self.bf16_factor, "estimated_bytes": self.estimated_bytes}
