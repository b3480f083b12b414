"""The model on torch, as sentence-transformers runs it: the reference every other runtime is
held to (fp32), and a runtime of its own (fp32, bf16 or fp16 under autocast).

Its own module because loading a SentenceTransformer is the expensive, memoised part of a local
backend (one per process and device: notebooks and test suites embed many times), and because
exports are built from it while they run without it.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import ModelLoadError, first_line
from .fidelity import CALIBRATION_TEXTS, FAITHFUL, check_fidelity

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=2)
def load_sentence_transformer(path: str, device: str, model_id: str, trust_remote_code: bool = False) -> Any:
    """Load once per process and device: notebooks and test suites call embed_file many times."""
    try:
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(path, device=device, trust_remote_code=trust_remote_code)
    except Exception as exc:
        hint = " It ships its own code: pass --trust-remote-code if you trust it." \
            if "trust_remote_code" in str(exc) and not trust_remote_code else ""
        raise ModelLoadError(f"cannot load {model_id} from {path} on {device} ({first_line(exc)}).{hint}") from exc
    model.eval()
    return model


def load_torch_model(path: str, device: str, model_id: str, *, trust_remote_code: bool,
                     normalize: bool) -> tuple[Any, bool]:
    """(the model, whether encode must normalise its vectors): the shared, memoised model, or
    with normalize=False for a model that normalises, a new wrapper without its Normalize module."""
    model = load_sentence_transformer(path, device, model_id, trust_remote_code)
    has_normalize = type(model[len(model) - 1]).__name__ == "Normalize"
    if has_normalize and not normalize:
        # --no-normalize: the raw pooled vectors. A new wrapper over the same modules, so the
        # shared (memoised) model is left as it was.
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(modules=list(model)[:-1], device=device)
    return model, normalize and not has_normalize


def encode(model: Any, texts: Sequence[str], precision: str, *, device: str | None, max_length: int,
           normalize: bool, prompt: str | None) -> np.ndarray:
    """float32 vectors of `texts`; bf16/fp16 by autocast (fp32 weights, half-precision matmuls:
    the 'measured faithful' path). `prompt`: None for none, "" to turn off the model's default."""
    import torch

    model.max_seq_length = max_length  # set per call: the loaded model may be shared
    device_type = str(device).split(":")[0] if str(device).startswith(("cuda", "mps")) else "cpu"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    with torch.autocast(device_type, dtype=dtype, enabled=dtype is not None):
        vectors = model.encode(
            list(texts),
            batch_size=max(1, len(texts)),
            convert_to_numpy=True,
            normalize_embeddings=normalize,
            show_progress_bar=False,
            prompt=prompt,
        )
    return np.asarray(vectors, dtype=np.float32)


def warn_emulated_bf16(run: Callable[[Sequence[str], str], Any]) -> float:
    """--precision bf16 on a CPU without native bf16 (no AVX-512 BF16, no AMX): torch emulates it,
    usually slower than fp32. Say so in one line, with the factor measured here and now by
    `run(texts, precision)`; returns that factor (bf16 time / fp32 time)."""
    def seconds(precision: str) -> float:
        run(CALIBRATION_TEXTS, precision)  # warm-up: the first call pays for setup
        started = time.perf_counter()
        run(CALIBRATION_TEXTS, precision)
        return time.perf_counter() - started

    fp32 = seconds("fp32")
    factor = round(seconds("bf16") / max(fp32, 1e-9), 2)
    log.warning("--precision bf16: this CPU has no native bf16 (no avx512_bf16 or amx_bf16 flag), so torch "
                "emulates it: %.1fx the time of fp32 on a sample here; --precision fp32 (or auto) is the fast "
                "choice on this machine.", factor)
    return factor


class TorchModel:
    """A loaded sentence-transformers model under one backend's settings (device, max length,
    normalisation, prompt, precision): a runners.Runner (`run(texts)` in its precision), what
    `encode(texts, precision)` runs in another, and what exports are made from."""

    def __init__(self, model: Any, device: str, *, max_length: int, normalize: bool, prompt: str | None,
                 precision: str = "fp32"):
        self.model, self.device, self.max_length, self.precision = model, device, max_length, precision
        self.normalize = normalize  # whether encode normalises (the model has no Normalize module of its own)
        self.prompt = prompt  # None: none; "": the model's default prompt turned off

    def run(self, texts: Sequence[str]) -> np.ndarray:
        return self.encode(texts, self.precision)

    def encode(self, texts: Sequence[str], precision: str) -> np.ndarray:
        return encode(self.model, texts, precision, device=self.device, max_length=self.max_length,
                      normalize=self.normalize, prompt=self.prompt)

    def check_half(self, precision: str) -> dict[str, float]:
        """--precision auto on a GPU keeps half precision only where it matches fp32 on the
        calibration sample: its figures, or ModelLoadError."""
        return check_fidelity(self.encode(CALIBRATION_TEXTS, "fp32"), self.encode(CALIBRATION_TEXTS, precision), FAITHFUL,
                              what=f"{precision} on this machine", where="the calibration sample",
                              fix="pass --precision fp32.")

    def emulated_bf16_factor(self) -> float:
        return warn_emulated_bf16(self.encode)


def load(path: str, device: str, model_id: str, *, trust_remote_code: bool, normalize: bool, max_length: int,
         prompt: str | None, precision: str = "fp32") -> TorchModel:
    """The memoised model (load_torch_model) with these settings."""
    model, normalize_in_encode = load_torch_model(path, device, model_id, trust_remote_code=trust_remote_code,
                                                  normalize=normalize)
    return TorchModel(model, device, max_length=max_length, normalize=normalize_in_encode, prompt=prompt,
                      precision=precision)
