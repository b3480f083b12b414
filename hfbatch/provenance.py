"""The sidecar document: provenance (what produced each vector) and metrics (what it cost).

The same document goes to `<output>.meta.json`, the Parquet key/value metadata under `hfbatch`,
and stdout with --json. Secrets never enter it: the recorded command is redacted.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Iterator, Sequence

from . import __version__
from .resources import peak_rss_mb

_STAGE_LOCK = threading.Lock()
STAGES = ("read", "validate", "cache", "model_load", "embed", "write")
_LIBRARIES = ("torch", "sentence-transformers", "transformers", "tokenizers", "huggingface_hub", "pyarrow", "numpy", "diskcache")
_TOKEN_RE = re.compile(r"hf_[A-Za-z0-9]{6,}")
_SECRET_FLAGS = ("--token", "--api-key", "--hf-token")
_SECRET_ENV = ("HF_TOKEN", "HUGGINGFACE_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HFBATCH_API_KEY")
# user:password@ in any URL (greedy up to the last @ before the path, as URL parsers split it)
_USERINFO_RE = re.compile(r"\b([a-z][a-z0-9+.\-]*://)[^/?#\s'\"<>]*@", re.IGNORECASE)


@dataclass
class Metrics:
    """Counters and per-stage seconds of one job."""

    rows_total: int = 0
    rows_written: int = 0
    rows_embedded: int = 0
    rows_invalid: int = 0
    rows_skipped: int = 0
    rows_truncated: int = 0
    texts_unique: int = 0
    texts_computed: int = 0
    tokens_computed: int = 0
    batches: int = 0
    chunks: int = 0
    stage_seconds: dict[str, float] = field(default_factory=lambda: {s: 0.0 for s in STAGES})
    _started: float = field(default_factory=time.perf_counter)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Add the time spent inside to stage `name` (stages run on two threads, hence the lock).

        With prefetch, read and validate overlap embed, so stage seconds can add up to more
        than the wall time."""
        began = time.perf_counter()
        try:
            yield
        finally:
            with _STAGE_LOCK:
                self.stage_seconds[name] += time.perf_counter() - began

    def timed(self, name: str, items: Iterator[Any]) -> Iterator[Any]:
        """Yield from `items`, counting the time spent producing each one as stage `name`."""
        while True:
            with self.stage(name):
                try:
                    item = next(items)
                except StopIteration:
                    return
            yield item

    def as_dict(self, cache: dict[str, Any], backend: dict[str, Any], api: dict[str, int]) -> dict[str, Any]:
        wall = time.perf_counter() - self._started
        embed_s = self.stage_seconds["embed"]
        return {
            "wall_seconds": round(wall, 3),
            "stage_seconds": {k: round(v, 3) for k, v in self.stage_seconds.items()},
            "rows_total": self.rows_total,
            "rows_written": self.rows_written,
            "rows_embedded": self.rows_embedded,
            "rows_invalid": self.rows_invalid,
            "rows_skipped": self.rows_skipped,
            "rows_truncated": self.rows_truncated,
            "texts_unique": self.texts_unique,
            "texts_computed": self.texts_computed,
            "tokens_computed": self.tokens_computed,
            "chunks": self.chunks,
            "batches": self.batches,
            "cache": cache,
            "rows_per_second": round(self.rows_total / wall, 2) if wall > 0 else None,
            # the model's own rate: tokens it computed per second of embedding (load excluded)
            "tokens_per_second": round(self.tokens_computed / embed_s, 1) if embed_s > 0 else None,
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "model_load_seconds": backend.get("load_seconds", 0.0),
            "api": api,
        }


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def file_digest(path: Path) -> str:
    """blake2b of the input file, so a sidecar names exactly which bytes it describes."""
    h = hashlib.blake2b(digest_size=20)
    with path.open("rb") as handle:
        while block := handle.read(1 << 22):
            h.update(block)
    return f"blake2b:{h.hexdigest()}"


def redact(args: Sequence[str]) -> list[str]:
    """The command line with tokens and the values of secret flags replaced."""
    out: list[str] = []
    hide_next = False
    for arg in args:
        if hide_next:
            out.append("***")
            hide_next = False
            continue
        flag, sep, _ = arg.partition("=")
        if flag in _SECRET_FLAGS:
            if sep:
                out.append(f"{flag}=***")
            else:
                out.append(arg)
                hide_next = True
            continue
        out.append(redact_text(arg))
    return out


def redact_text(text: str) -> str:
    """`text` with secrets replaced: hub tokens (by shape), the configured token and HFBATCH_API_KEY
    values (a server may echo them back), and the user:password@ of any URL."""
    for name in _SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 8:
            text = text.replace(value, "***")
    text = _USERINFO_RE.sub(r"\1***@", text)
    return _TOKEN_RE.sub("hf_***", text)


def library_versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "hfbatch": __version__}
    for name in _LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def relative_paths(document: Any, base: Path) -> Any:
    """The document with every absolute local path made relative to `base` (the output's folder),
    for sharing results without the machine's layout: --relative-paths."""
    if isinstance(document, dict):
        return {k: relative_paths(v, base) for k, v in document.items()}
    if isinstance(document, list):
        return [relative_paths(v, base) for v in document]
    if isinstance(document, str) and os.path.isabs(document) and "\n" not in document:
        candidate = Path(document)
        if candidate.exists() or candidate.parent.exists():
            return os.path.relpath(candidate, base.resolve())
    return document
