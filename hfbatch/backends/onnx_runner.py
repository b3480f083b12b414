"""ONNX Runtime running an exported graph: feeds in, float32 vectors out, one session per file
and process.

Its own module because running needs only onnxruntime and numpy, while making the export
(onnx.py: torch, the transformer optimizer, SmoothQuant, the quantizer) needs far more: a job
whose export is cached imports this and never the other.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelLoadError, first_line
from ..resources import max_model_memory_bytes


class OnnxRunner:
    """An ONNX Runtime session over an exported graph: feeds in, float32 vectors out. Needs only
    onnxruntime (no torch): the start-up of a job whose export is cached."""

    def __init__(self, path: Path, *, fresh: bool = False):
        self.path = Path(path)
        # one session per file and process (a suite or notebook runs many jobs); fresh: a new one
        self.session = _session.__wrapped__(str(self.path)) if fresh else _session(str(self.path))
        self.input_names = [i.name for i in self.session.get_inputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(self.session.run(None, {n: feeds[n] for n in self.input_names})[0], dtype=np.float32)


def release_sessions() -> None:
    """Let go of every cached session (selection measures one configuration at a time)."""
    _session.cache_clear()


@functools.lru_cache(maxsize=4)
def _session(path: str) -> Any:
    """One session per file and process (a test suite or notebook runs many jobs)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # under MAX_MODEL_MEMORY_GB, no memory arena: it keeps the largest batch's activations (~300 MB
    # more for MiniLM at 32 x 256 tokens) for ~5-15% speed
    options.enable_cpu_mem_arena = max_model_memory_bytes() is None
    try:
        return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelLoadError(f"ONNX Runtime cannot load {path} ({first_line(exc)[:300]}); delete it to export again, "
                             "or use --runtime torch.") from exc
