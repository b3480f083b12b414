"""What computes a local model's vectors, behind one call: `run(texts) -> np.ndarray` (float32,
one row per text), whatever the runtime.

- torch_runner.TorchModel: sentence-transformers on torch, in the configuration's precision;
- ExportRunner: an exported graph (exports.py, made by builds.py) run by a Session, the model's
  tokenizer in front (texts -> token feeds) and the job's normalisation behind.

A Session is the runtime's own object (onnx_runner.OnnxRunner, openvino.OpenVinoSession): token
feeds in, float32 vectors out. Its own module because the backend, the export builder and the
job-text check all hold runners, and none of them needs to know which runtime is behind one.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from ..vectors import l2_normalize
from .tokenizer import ModelTokenizer


class Runner(Protocol):
    """Texts in, float32 vectors [len(texts), dim] out, in the configuration it was made for."""

    def run(self, texts: Sequence[str]) -> np.ndarray: ...


class Session(Protocol):
    """An exported graph loaded by a runtime: token feeds (int64 arrays by input name) in, float32 vectors out."""

    input_names: list[str]

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray: ...


class ExportRunner:
    """An export's Session with the model's tokenizer in front (prompt, lowercasing, max length as
    sentence-transformers applies them) and normalisation behind (an export never normalises: one
    export serves --normalize and --no-normalize)."""

    def __init__(self, session: Session, tokenizer: ModelTokenizer, *, max_length: int, prompt: str, normalize: bool):
        self.session, self.tokenizer = session, tokenizer
        self.max_length, self.prompt, self.normalize = max_length, prompt, normalize

    def run(self, texts: Sequence[str]) -> np.ndarray:
        feeds = self.tokenizer.feeds(texts, self.max_length, self.session.input_names, self.prompt)
        vectors = self.session.run(feeds)
        return l2_normalize(vectors) if self.normalize else vectors


def open_session(path: Path, runtime: str, precision: str = "fp32") -> Session:
    """The Session of the export file at `path`: OpenVINO's (fp32 or bf16) or ONNX Runtime's (fp32,
    or the int8 graph). One per file and process (cached)."""
    if runtime == "openvino":
        return openvino_session(str(path), "bf16" if precision == "bf16" else "f32")
    from .onnx_runner import OnnxRunner

    return OnnxRunner(path)


@functools.lru_cache(maxsize=4)
def openvino_session(path: str, precision: str = "f32") -> Any:
    """No compiled-blob cache (OpenVINO's CACHE_DIR): it would serve a blob nothing proved, and
    compiling MiniLM takes ~0.3 s."""
    from .openvino import OpenVinoSession

    return OpenVinoSession(Path(path), precision=precision)


def release_sessions() -> None:
    """Let go of every cached session, of both runtimes (selection measures one configuration at a time)."""
    from .onnx_runner import release_sessions as release_onnx

    release_onnx()
    openvino_session.cache_clear()
