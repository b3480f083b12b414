"""Machine resources: which device runs the model, and how much memory the process peaked at."""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path

import psutil

from .errors import InputError, ModelLoadError

_BYTES_PER_PARAM = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int8": 1}
# Resident size over the weights in memory: activations of a batch, allocator slack, buffers.
_OVERHEAD = 1.25


class MemoryGuardError(ModelLoadError):
    """Loading the model would exceed MAX_MODEL_MEMORY_GB or the free memory."""


def gpu_possible() -> bool:
    """Whether this machine could have a CUDA, ROCm or MPS device, judged without importing torch
    (1.5 s): macOS, or a GPU driver's device node. False means `--device auto` is the CPU."""
    if sys.platform == "darwin":
        return True
    dev = Path("/dev")
    return any(dev.glob("nvidia[0-9]*")) or (dev / "dxg").exists() or (dev / "kfd").exists()


def resolve_device(requested: str) -> str:
    """auto -> cuda > mps > cpu; an explicit device must exist (ModelLoadError otherwise)."""
    import torch

    mps = getattr(torch.backends, "mps", None)
    mps_ok = bool(mps is not None and mps.is_available())
    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if mps_ok else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ModelLoadError(f"--device {requested}: no CUDA device is available here; use --device cpu or auto.")
        index = int(requested.split(":")[1]) if ":" in requested else 0
        if index >= torch.cuda.device_count():
            raise ModelLoadError(f"--device {requested}: only {torch.cuda.device_count()} CUDA device(s) exist here.")
    if requested == "mps" and not mps_ok:
        raise ModelLoadError("--device mps: MPS is not available here; use --device cpu or auto.")
    return requested


def return_freed_memory() -> None:
    """Hand memory freed by released models back to the system (glibc keeps it otherwise, and
    the process's resident size, which the memory guard watches, would not come down)."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        pass


def rss_bytes() -> int:
    """The process's resident memory now."""
    return int(psutil.Process().memory_info().rss)


def peak_rss_mb() -> float:
    """The process's peak resident memory so far, in MiB (the kernel's high-water mark).

    Linux: VmHWM of /proc/self/status. Not ru_maxrss: that survives exec, so a job started from a
    big Python process would report its parent's memory.
    """
    current = psutil.Process().memory_info().rss
    try:
        with open("/proc/self/status", "rb") as handle:  # bytes: the Name: line need not be ASCII
            for line in handle:
                if line.startswith(b"VmHWM:"):
                    return max(int(line.split()[1]) * 1024, current) / (1024 * 1024)
    except (OSError, ValueError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_bytes = peak if sys.platform == "darwin" else peak * 1024
    return max(peak_bytes, current) / (1024 * 1024)


def estimate_model_bytes(model_dir: Path, load_dtype: str = "float32") -> int:
    """Resident size of a model loaded in `load_dtype`, from its weight files and stored dtype."""
    files = list(model_dir.glob("*.safetensors")) or list(model_dir.glob("pytorch_model*.bin"))
    stored = sum(f.stat().st_size for f in files)
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    stored_dtype = str(config.get("torch_dtype") or config.get("dtype") or "float32")
    ratio = _BYTES_PER_PARAM.get(load_dtype, 4) / _BYTES_PER_PARAM.get(stored_dtype, 4)
    return int(stored * ratio * _OVERHEAD)


def max_model_memory_bytes(environ: dict[str, str] | None = None) -> int | None:
    """MAX_MODEL_MEMORY_GB as bytes, or None when unset: from `environ`, else the environment
    over the working directory's .env (as the CLI reads it, so library callers get it too)."""
    from .settings import environment

    raw = (environ if environ is not None else environment()).get("MAX_MODEL_MEMORY_GB")
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise InputError(f"MAX_MODEL_MEMORY_GB={raw!r} is not a number; set it to e.g. 4 (GB).") from None
    if value <= 0:
        raise InputError(f"MAX_MODEL_MEMORY_GB={raw!r} must be more than 0.")
    return int(value * 1e9)


def check_model_memory(model_id: str, model_dir: Path, load_dtype: str = "float32") -> int:
    """Refuse (MemoryGuardError) a model that would not fit; return the estimate in bytes."""
    need = estimate_model_bytes(model_dir, load_dtype)
    limit = max_model_memory_bytes()
    if limit is not None and need > limit:
        raise MemoryGuardError(
            f"{model_id} needs about {need / 1e9:.2f} GB loaded ({load_dtype}), more than "
            f"MAX_MODEL_MEMORY_GB={limit / 1e9:g}; raise the limit, pick a smaller model, or use a remote backend "
            "(--backend auto falls back to one)."
        )
    free = psutil.virtual_memory().available
    if need > 0.9 * free:
        raise MemoryGuardError(
            f"{model_id} needs about {need / 1e9:.2f} GB loaded ({load_dtype}) but only {free / 1e9:.2f} GB is free; "
            "free memory, pick a smaller model, or use a remote backend (--backend auto falls back to one)."
        )
    return need


# the CPU features that decide which fast path is fast here (README: runtimes and precision)
SPEED_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_facts() -> dict[str, object]:
    """The CPU as speed choices depend on it: model name, cores, the flags that matter, and
    whether bf16 is native (Linux /proc/cpuinfo; empty where it cannot be read)."""
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name") and not model:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"model": model or None, "cores": os.cpu_count(), "flags": [f for f in SPEED_FLAGS if f in flags],
            "native_bf16": bool(flags & {"avx512_bf16", "amx_bf16"})}


def cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX: CPUs where bf16 matmuls are fast (Linux /proc/cpuinfo flags)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def resolve_precision(requested: str, device: str) -> str:
    """fp32/bf16/fp16 as asked; auto -> fp16 on CUDA, bf16 on CPUs with native bf16, else fp32."""
    if requested == "fp16" and not (device.startswith("cuda") or (device == "auto" and _cuda_available())):
        raise InputError("--precision fp16 is for CUDA devices; on a CPU use --precision bf16 (or fp32).")
    if requested != "auto":
        return requested
    if device.startswith("cuda") or (device == "auto" and _cuda_available()):
        return "fp16"
    if device in ("cpu", "auto") and cpu_has_native_bf16():
        return "bf16"
    return "fp32"


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())
