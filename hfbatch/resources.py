"""Machine resources: which device runs the model, and how much memory the process peaked at."""

from __future__ import annotations

import resource
import sys

import psutil

from .errors import ModelLoadError


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


def peak_rss_mb() -> float:
    """The process's peak resident memory so far, in MiB (the kernel's high-water mark)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_bytes = peak if sys.platform == "darwin" else peak * 1024
    current = psutil.Process().memory_info().rss
    return max(peak_bytes, current) / (1024 * 1024)
