"""LocalBackend: the model in this process, on torch (sentence-transformers) or as a cached export
run by ONNX Runtime or OpenVINO; `auto` takes this machine's one measured faithful configuration
for the model (selection.py), chosen when the first vector is computed, never for the job's size.

It composes what it owns by module: hub.py (where the model's files are, their content hash),
spec.py (what the files say: prompts, max length, dimension), tokenizer.py (Tokens: counts and
windows), torch_runner.py (the model on torch), builds.py (the exports, made and proved),
job_check.py (the check on the job's own texts), configs.py (the request, the configuration) and
selection.py (the measured choice); what it keeps is the configuration it runs and passing over
one that fails.
Everything is lazy: the tokenizer loads on the first token count, the model on the first embed;
a proved export (exports.py) loads without importing torch or transformers.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import BackendError, InputError, ModelLoadError, first_line
from ..resources import (MemoryGuardError, check_model_memory, cpu_has_native_bf16, gpu_possible, resolve_device,
                         resolve_precision)
from . import torch_runner
from .configs import EXPORT_RUNTIMES, Note, RuntimeChoice, RuntimeConfig, check_request, int8_recipe
from .builds import ExportMethods, openvino_session
from .hub import bundled_model_dir as _bundled_model_dir  # noqa: F401  (re-exported for benchmarks/)
from .hub import files_digest, resolve_model_dir, weights_key
from .job_check import check_job_texts, check_until_faithful, job_sample, needs_check
from .spec import read_spec
from .tokenizer import Tokens
from .torch_runner import TorchModel, load_sentence_transformer
from .windows import Windows

log = logging.getLogger(__name__)



class LocalBackend(ExportMethods):
    """A sentence-transformers model on this machine: torch (CPU, CUDA, MPS), or its cached export
    run by ONNX Runtime or OpenVINO on the CPU. `auto` runtime/precision take the configuration
    measured fastest among the faithful ones here (selection.py), when the first vector is
    computed: a job that computes nothing loads nothing and measures nothing."""

    name = "local"
    remote = False
    batch_texts: int | None = None  # the job's --batch-size / --max-batch-tokens decide
    token_source = "tokenizer"  # n_tokens and truncation by the model's own tokenizer

    def __init__(self, model: str, *, device: str = "auto", normalize: bool = True, max_length: int | None = None,
                 precision: str = "fp32", runtime: str = "torch", quantize: str | None = None,
                 trust_remote_code: bool = False, prompt: str | None = None, prompt_name: str | None = None):
        runtime, precision, quantize = check_request(device, precision, runtime, quantize)
        self.trust_remote_code = trust_remote_code  # code shipped with a model runs only when asked for
        self.requested_runtime, self.requested_precision, self.requested_quantize = runtime, precision, quantize
        self._choice: RuntimeChoice | None = None  # the configuration, once chosen (before the first vector)
        self._failed: list[RuntimeConfig] = []  # configurations that failed in this process
        self.passed_over: list[dict[str, str]] = []  # ... and why: the sidecar says so
        self._note: Note | None = None
        self._precision: str | None = None
        self._engine: Any = None  # the torch model or the export's runner
        self.engine_path: Path | None = None  # the export file the runner reads
        self._reference: Any = None  # the fp32 runner int8/bf16 are checked against on the job's texts
        self.export_fidelity: dict[str, float] | None = None
        self.model_id = model
        self.requested_device = device
        self.normalize = normalize
        self._requested_max_length = max_length
        self._dir: Path | None = None
        self._source: dict[str, Any] = {}
        self._tokens: Tokens | None = None  # the tokenizer, with the model's prompt and max length
        self._model: TorchModel | None = None
        self._device: str | None = None
        self._files_hash: Any = None
        self._fingerprint: str | None = None
        self._dim: int | None = None
        self._normalize_in_encode = False
        # seconds of the one-time work, booked to their own stages by the job (metrics.stage_seconds)
        self.timings: dict[str, float] = {"measure": 0.0, "export": 0.0, "check": 0.0, "model_load": 0.0}
        self.estimated_bytes: int | None = None
        self.fidelity: dict[str, float] | None = None
        self.job_fidelity: dict[str, Any] | None = None
        self.job_reference: tuple[list[str], np.ndarray] | None = None  # torch fp32 of the first texts, if measured now
        self.bf16_factor: float | None = None  # bf16 time / fp32 time, measured where bf16 is emulated
        self._requested_prompt, self._requested_prompt_name = prompt, prompt_name

    @property
    def load_seconds(self) -> float:
        return self.timings["model_load"]

    def setup_seconds(self) -> dict[str, float]:
        return dict(self.timings)

    def watch(self, note: Note) -> None:
        """Tell `note` what one-time work (measuring the runtimes, exporting) is going on."""
        self._note = note

    # --- resolution (cheap: files only) -------------------------------------------------------

    @property
    def model_dir(self) -> Path:
        if self._dir is None:
            self._dir, self._source = resolve_model_dir(self.model_id)
            self._read_configs()
        return self._dir

    def _read_configs(self) -> None:
        assert self._dir is not None
        spec = read_spec(self._dir, self.model_id, max_length=self._requested_max_length, prompt=self._requested_prompt,
                         prompt_name=self._requested_prompt_name)
        self._dim = spec.dim
        self._tokens = Tokens(self._dir, self.model_id, spec, weights_key=self.weights_key,
                              trust_remote_code=self.trust_remote_code)
        if spec.prompt and not spec.include_prompt and self.requested_runtime in EXPORT_RUNTIMES:
            raise InputError(f"{self.model_id} pools without its prompt's tokens, which --runtime "
                             f"{self.requested_runtime} cannot do; use --runtime torch with a prompt.")

    @property
    def prompt(self) -> str | None:
        """The text put before every text: --prompt, --prompt-name's, or the model's default (None: none)."""
        return self.tokens.prompt

    @property
    def prompt_name(self) -> str | None:
        """The name the prompt came by (--prompt-name or the model's default; None before resolution)."""
        return self._tokens.prompt_name if self._tokens is not None else None

    @property
    def max_length(self) -> int:
        return self.tokens.max_length

    # --- which runtime and precision (chosen once, when the first vector is computed) -----------

    def candidates(self) -> list[RuntimeConfig]:
        from .selection import candidates

        runtime = "torch" if self._prompt_excluded() else self.requested_runtime  # the exports pool over the prompt
        return candidates(runtime, self.requested_precision, self.requested_quantize, self.cpu_only())

    def prepare(self, *, measure: bool = True, job_texts: Sequence[str] = ()) -> RuntimeChoice:
        """The configuration this backend runs with: asked for, or (auto) this machine's choice for
        the model, measured first if this machine has none (measure=False: only what was measured
        before, as --dry-run plans). Never depends on the job's size or texts (`job_texts`, its
        first batch, only spare the check a second reference model when a measurement runs now)."""
        if self._choice is None:
            from .selection import choose

            choice = choose(self, self.candidates(), measure=measure, note=self._note, exclude=self._failed,
                            job_texts=job_texts if self.cpu_only() else ())
            if self.passed_over:
                choice = RuntimeChoice(choice.config, choice.by, choice.record, choice.texts_per_s, choice.fidelity,
                                       tuple(self.passed_over))
            self._choice = choice
            self._precision = None
            if choice.measured_seconds:
                self.timings["measure"] += choice.measured_seconds
                if choice.config.runtime != "torch":  # the reference model is not needed any more
                    load_sentence_transformer.cache_clear()
        return self._choice

    def _prompt_excluded(self) -> bool:
        return bool(self.tokens.prompt) and not self.tokens.spec.include_prompt

    def pass_over(self, reason: str) -> None:
        """Give up the chosen configuration for this process (it failed to load, or on this job's
        texts) and let the next faithful one run: the identity is the same, so is the cache."""
        assert self._choice is not None
        log.warning("%s: %s; taking the next configuration", self._choice.label, reason)
        self._failed.append(self._choice.config)
        self.passed_over.append({"label": self._choice.label, "reason": reason[:300]})
        self._choice, self._engine, self._reference, self._precision = None, None, None, None
        self.job_fidelity = None

    def variant(self, config: RuntimeConfig) -> "LocalBackend":
        """The same model and settings, forced to `config` (what selection measures)."""
        config = RuntimeConfig(*config)
        other = LocalBackend(self.model_id, device=self.requested_device, normalize=self.normalize,
                             max_length=self._requested_max_length, precision=config.precision,
                             runtime=config.runtime, quantize=config.quantize, trust_remote_code=self.trust_remote_code,
                             prompt=self._requested_prompt, prompt_name=self._requested_prompt_name)
        other._choice = RuntimeChoice(config, by="asked for")
        return other

    def release(self, *, torch_model: bool = False) -> None:
        """Let go of the loaded engine (selection measures one configuration at a time), and with
        torch_model=True of the process's torch models too; the memory goes back to the system."""
        from ..resources import return_freed_memory
        from .onnx_runner import release_sessions

        self._engine = self._model = self._reference = None
        release_sessions()
        openvino_session.cache_clear()
        if torch_model:
            load_sentence_transformer.cache_clear()
        gc.collect()
        return_freed_memory()

    def cpu_only(self) -> bool:
        """Whether the model will run on the CPU, decided without importing torch where possible."""
        if self.requested_device != "auto":
            return self.requested_device == "cpu"  # an explicit GPU that is not there is refused at load
        return not gpu_possible() or resolve_device("auto") == "cpu"

    @property
    def config(self) -> RuntimeConfig | None:
        """(runtime, precision, quantize) once chosen, else None."""
        return self._choice.config if self._choice is not None else None

    @property
    def runtime(self) -> str:
        return self.prepare().config.runtime

    @property
    def quantize(self) -> str | None:
        return "int8" if self.prepare().config.quantize == "int8" else None

    @property
    def precision(self) -> str:
        """fp32, bf16 or fp16 (int8 is `quantize`); torch's `auto` on a GPU: fp16, by device."""
        if self._precision is None:
            self._precision = resolve_precision(self.prepare().config.precision, self.requested_device)
        return self._precision

    def quantize_recipe(self, runtime: str | None = None) -> str:
        """How this backend's int8 is made ("none" without int8): part of the sidecar."""
        if self.requested_quantize != "int8":
            return "none"
        return int8_recipe(runtime or self.runtime)

    def identity(self) -> str:
        """What the vectors are held to: every faithful configuration is one identity (they agree
        with torch fp32 at >= 0.9999), known without choosing anything; int8 is its own, by recipe
        (under --runtime auto, that of the runtime this machine takes)."""
        if self.requested_quantize != "int8":
            return "faithful"
        # int8 runtimes differ (0.996 between ONNX Runtime's and OpenVINO's): the one that runs is the
        # identity. Under --runtime auto that is this machine's choice (read from its record, measured
        # first if there is none: int8 is asked for, and lossy)
        runtime = self.requested_runtime if self.requested_runtime in EXPORT_RUNTIMES else self.prepare().config.runtime
        return f"int8:{self.quantize_recipe(runtime)}"

    def _files_digest(self) -> Any:
        """The model's content digest (hub.files_digest), computed once."""
        if self._files_hash is None:
            self._files_hash = files_digest(self.model_dir, str(self._source["revision"]))
        return self._files_hash.copy()

    def weights_key(self) -> str:
        """Names the model's export folder and its runtime record: its files and revision only,
        wherever it sits and whatever the job's options."""
        return weights_key(self._files_digest())

    def fingerprint(self) -> str:
        """Identity of the vectors this backend makes; the cache namespace. Chooses and loads nothing."""
        if self._fingerprint is None:
            h = self._files_digest()
            h.update(f"normalize={self.normalize};max_length={self.max_length};vectors={self.identity()}".encode())
            if self.prompt:  # a prompt makes other vectors of the same text (none: the namespace of old)
                h.update(f";prompt={json.dumps(self.prompt)}".encode())
            self._fingerprint = f"local:{h.hexdigest()}"
        return self._fingerprint

    def known_dimension(self) -> int | None:
        """The dimension if known without loading the model (config files, or a vector already
        made): what cached vectors are checked against before the first one is computed."""
        _ = self.model_dir
        return self._dim

    def dimension(self) -> int:
        _ = self.model_dir
        if self._dim is None:
            if self.runtime == "torch":
                self._dim = int(self._load_model().model.get_sentence_embedding_dimension())
            else:
                self._dim = int(self.embed(["dimension probe"]).shape[1])
        return self._dim

    # --- tokenizer (cheap; tokenizer.py) --------------------------------------------------------

    @property
    def tokens(self) -> Tokens:
        _ = self.model_dir
        assert self._tokens is not None
        return self._tokens

    def token_counts(self, texts: Sequence[str]) -> list[int]:
        return self.tokens.counts(texts)

    def split(self, texts: Sequence[str], size: int, overlap: int) -> list[Windows]:
        """Windows of at most `size` tokens as the model reads them (see Tokens.split)."""
        return self.tokens.split(texts, size, overlap)

    # --- model (expensive, lazy) --------------------------------------------------------------

    def preflight(self) -> str:
        """Every check that decides whether the model can load, short of loading it: its files
        found, the device present, the runtime installed, the memory guard passed (before, not
        after, an OOM). Reads file names and sizes only. Returns the device; raises ModelLoadError
        (MemoryGuardError) or InputError."""
        if self.runtime == "torch":
            device = resolve_device(self.requested_device)
        else:
            device = "cpu"
            module, extra = ("openvino", "openvino") if self.runtime == "openvino" else ("onnxruntime", "onnx")
            if importlib.util.find_spec(module) is None:
                raise ModelLoadError(f"--runtime {self.runtime} needs {module}: pip install 'hfbatch[{extra}]'.")
        self.estimated_bytes = check_model_memory(self.model_id, self.model_dir)
        return device

    def estimated_model_bytes(self) -> int:
        from ..resources import estimate_model_bytes

        return int(estimate_model_bytes(self.model_dir, "float32"))

    def load(self) -> Any:
        """Load what computes the vectors (the torch model or the export's runner), choosing the
        configuration first (auto: measuring once per machine). A chosen configuration that fails
        to load after one rebuild is refused in the record and the next one runs."""
        while self._engine is None:
            choice = self.prepare()
            started, exported = time.perf_counter(), self.timings["export"]
            try:
                self._engine = self._load_model() if self.runtime == "torch" else self._start_export()
            except MemoryGuardError:
                raise
            except ModelLoadError as exc:
                if choice.by == "asked for" or self.requested_quantize == "int8":
                    raise  # forced; or int8, whose identity is the runtime that runs it: never two in one namespace
                from .records import refuse

                refuse(self, choice.config, first_line(exc))
                self.pass_over(f"failed to load ({first_line(exc)})")
                continue
            finally:
                self.timings["model_load"] += time.perf_counter() - started - (self.timings["export"] - exported)
            log.info("loaded %s (%s)", self.model_id, choice.label)
        return self._engine

    def _load_model(self) -> TorchModel:
        """The torch model (torch_runner.py) with this backend's settings; --precision auto on a GPU
        keeps half precision only where it matches fp32, and emulated bf16 says what it costs."""
        if self._model is not None:
            return self._model
        device = resolve_device(self.requested_device) if self.runtime == "torch" else "cpu"
        self.estimated_bytes = check_model_memory(self.model_id, self.model_dir)
        # prompt "" where the model names a default prompt this job turned off (--prompt ""); None
        # otherwise (an empty prompt would still be measured for prompt-excluding pooling)
        model = torch_runner.load(str(self.model_dir), device, self.model_id, trust_remote_code=self.trust_remote_code,
                                  normalize=self.normalize, max_length=self.max_length,
                                  prompt=self.prompt or ("" if self.tokens.spec.has_default_prompt else None))
        self._model, self._device, self._normalize_in_encode = model, device, model.normalize
        if self.runtime == "torch":
            if self.requested_precision == "auto" and self.precision != "fp32":
                self.fidelity = model.check_half(self.precision)
            if self.precision == "bf16" and device == "cpu" and not cpu_has_native_bf16():
                self.bf16_factor = model.emulated_bf16_factor()
        return model

    def compute(self, texts: Sequence[str]) -> np.ndarray:
        """Vectors of `texts` by the chosen configuration, without the job-text check (what
        selection times)."""
        engine = self.load()
        if self.runtime == "torch":
            return engine.encode(texts, self.precision)
        return self._run(engine, texts)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        sample = job_sample(texts)
        self.prepare(job_texts=sample)
        checked = check_until_faithful(self, texts, sample)  # int8 and half precision only
        if checked is not None and len(checked) == len(texts):
            return checked  # the check computed this very batch: its vectors are the batch's
        self.load()
        try:
            vectors = self.compute(texts)
        except Exception as exc:
            raise BackendError(f"{self.model_id} failed on a batch of {len(texts)} texts ({exc}).") from exc
        if self._dim is None:
            self._dim = int(vectors.shape[1])
        return vectors

    def needs_job_check(self) -> bool:
        """Whether this configuration is checked on the job's own texts (job_check.py)."""
        return needs_check(self.quantize, self.precision)

    def check_job_texts(self, texts: Sequence[str]) -> np.ndarray | None:
        return check_job_texts(self, texts)

    def export_reference(self, texts: Sequence[str]) -> np.ndarray:
        """fp32 vectors of `texts` on the proved export (made first if need be), that runner let go
        before the configuration's own engine loads: never both models at once."""
        self.ensure_export()
        reference = self._run(self._reference_runner(), texts)
        engine_loaded = self._engine is not None
        self._reference = None
        if not engine_loaded:  # nothing else holds a session yet: every cached one can go
            self.release()
        return reference

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"backend": self.name, "model_id": self.model_id}
        if self._dir is not None:
            chosen = self._choice is not None and (self._engine is not None or self._model is not None)
            info.update(self._source)
            info.update(
                model_path=str(self._dir),
                fingerprint=self.fingerprint(),
                vectors=self.identity(),  # faithful (any runtime), or int8 by recipe
                requested={"runtime": self.requested_runtime, "precision": self.requested_precision,
                           "quantize": self.requested_quantize},
                max_length=self.max_length,
                normalize=self.normalize,
                dim=self._dim,
                # the configuration that computed this job's vectors (None: it computed none)
                runtime=self.runtime if chosen else None,
                precision=self.precision if chosen else None,
                quantize=self.quantize_recipe() if chosen else ("none" if self.requested_quantize != "int8" else None),
                precision_fidelity=self.fidelity,
                trust_remote_code=self.trust_remote_code,
                export_fidelity=self.export_fidelity,  # the export against torch fp32, when made
                job_fidelity=self.job_fidelity,  # the same bar, measured on the job's own first texts
                bf16_emulated_factor=self.bf16_factor,
                prompt=self.prompt,
                prompt_name=self.prompt_name,
                selection=self._choice.describe() if chosen and self._choice else None,
                tokenizer=self._tokens.loader if self._tokens is not None else None,
            )
        info["device"] = self._device or "not loaded (every vector came from the cache)"
        info["model_loaded"] = self._engine is not None or self._model is not None
        info["tokenizer_loaded"] = self._tokens is not None and self._tokens.loader is not None
        info["estimated_memory_mb"] = round(self.estimated_bytes / 2**20, 1) if self.estimated_bytes else None
        info["load_seconds"] = round(self.load_seconds, 3)
        info["setup_seconds"] = {k: round(v, 3) for k, v in self.timings.items()}
        return info
