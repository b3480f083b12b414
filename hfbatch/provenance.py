"""The sidecar document: provenance (what produced each result) and metrics (what it cost).

`Metrics` counts one job (and merges those of parts); `build_document()` is the one builder of
the document every job and engine writes: to `<output>.meta.json`, the Parquet key/value
metadata under `hfbatch`, and stdout with --json. Secrets never enter it: the recorded command
is redacted.

The input a document describes is the input as it was before the job's first read:
`InputIdentity.take()` is called before the input is opened and `InputFacts.of(..., identity=)`
checks it after the last read. An input replaced or rewritten in between (`mv`, an in-place
write, S3 `copy_object`) fails the job with `InputChangedError` (exit 1, nothing published), so no
sidecar ever records the new file's identity beside the old file's rows, and a rerun reads it again.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from ._version import __version__
from .errors import InputChangedError, InputError, redact_text
from .io.stores import RemotePath
from .resources import peak_rss_mb

_STAGE_LOCK = threading.Lock()
_LIBRARIES = ("torch", "sentence-transformers", "transformers", "tokenizers", "huggingface_hub", "pyarrow", "numpy", "diskcache")
_SECRET_FLAGS = ("--token", "--api-key", "--hf-token")

# What each job calls the shared counters in its document (a generate job's rows are generated, its
# texts are prompts, and the tokens it computes are the ones it writes); None leaves one out.
_METRIC_NAMES: dict[str, dict[str, str]] = {
    "embed": {"rows_done": "rows_embedded"},
    "generate": {"rows_done": "rows_generated", "texts_computed": "prompts_computed", "tokens_computed": "tokens_generated"},
}
_COUNTERS = ("rows_total", "rows_written", "rows_done", "rows_invalid", "rows_skipped", "rows_truncated", "rows_added",
             "windows", "texts_unique", "texts_computed", "tokens_computed", "chunks", "batches")
_CACHE_COUNTERS = ("cache_hits", "cache_misses", "cache_stores", "cache_rejected")


def stages(job: str) -> tuple[str, ...]:
    """The stages a job's seconds are booked to; the model's own work is the stage named after the job."""
    return ("read", "validate", "cache", "measure", "export", "check", "model_load", job, "write")


@dataclass
class Metrics:
    """Counters and per-stage seconds of one job (or, merged with `add`, of its parts).

    `rows_done`: rows that got a result; `texts_computed` / `tokens_computed`: what the model
    computed (the tokens it read for embed, the tokens it wrote for generate); the cache counters
    are distinct texts per chunk, as the cache answered."""

    job: str = "embed"
    rows_total: int = 0
    rows_written: int = 0
    rows_done: int = 0
    rows_invalid: int = 0
    rows_skipped: int = 0
    rows_truncated: int = 0
    rows_added: int = 0  # --split: output rows beyond one per input row (an input row's 2nd, 3rd... window)
    rows_unchanged: int = 0  # a sync run: rows the target already has as they are (reported in metrics.sync)
    windows: int = 0  # --split: windows the valid rows were cut into
    texts_unique: int = 0
    texts_computed: int = 0
    tokens_computed: int = 0
    batches: int = 0
    chunks: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    cache_stores: int = 0
    cache_rejected: int = 0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    background_seconds: dict[str, float] = field(default_factory=dict)  # the prefetch thread's (overlapping)
    _started: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        for name in stages(self.job):
            self.stage_seconds.setdefault(name, 0.0)
        for name in ("read", "validate"):
            self.background_seconds.setdefault(name, 0.0)

    @property
    def hit_rate(self) -> float:
        looked = self.cache_hits + self.cache_misses
        return self.cache_hits / looked if looked else 0.0

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Add the time spent inside to stage `name` (stages run on two threads, hence the lock).

        The job's own thread books its stages one after another, so they add up to its wall time;
        the prefetch thread's (read and validate ahead) are kept apart, in `background_seconds`."""
        began = time.perf_counter()
        try:
            yield
        finally:
            with _STAGE_LOCK:
                self.stage_seconds[name] = self.stage_seconds.get(name, 0.0) + time.perf_counter() - began

    def timed(self, name: str, items: Iterator[Any]) -> Iterator[Any]:
        """Yield from `items`, counting the time spent producing each one as stage `name`."""
        while True:
            with self.stage(name):
                try:
                    item = next(items)
                except StopIteration:
                    return
            yield item

    def rebook(self, source: str, moves: Mapping[str, float]) -> None:
        """Seconds of stage `source` that were other work (the first batch also measured the
        runtimes, exported, checked or loaded the model): booked to those stages instead."""
        with _STAGE_LOCK:
            for name, seconds in moves.items():
                if seconds > 0:
                    self.stage_seconds[source] = self.stage_seconds.get(source, 0.0) - seconds
                    self.stage_seconds[name] = self.stage_seconds.get(name, 0.0) + seconds

    def add_cache(self, before: Any, after: Any) -> None:
        """Count what a cache's stats (hits, misses, stores, rejected) gained from `before` to `after`."""
        for name in _CACHE_COUNTERS:
            key = name.removeprefix("cache_")
            setattr(self, name, getattr(self, name) + getattr(after, key) - getattr(before, key))

    def add_work(self, other: "Metrics") -> None:
        """Count the model work of `other` (a sample taken before the job: texts and tokens
        computed, model calls, every stage's seconds: it ran on the job's thread) into these, but
        none of its rows."""
        self.texts_computed += other.texts_computed
        self.tokens_computed += other.tokens_computed
        self.batches += other.batches
        with _STAGE_LOCK:
            for name, seconds in other.stage_seconds.items():
                self.stage_seconds[name] = self.stage_seconds.get(name, 0.0) + seconds

    def add(self, other: "Metrics") -> None:
        """Merge `other` (a chunk's or a part's metrics) into these: counters and stage seconds add
        up; the wall clock stays this one's."""
        for name in (*_COUNTERS, *_CACHE_COUNTERS):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        with _STAGE_LOCK:
            for name, seconds in other.stage_seconds.items():
                self.stage_seconds[name] = self.stage_seconds.get(name, 0.0) + seconds
            for name, seconds in other.background_seconds.items():
                self.background_seconds[name] = self.background_seconds.get(name, 0.0) + seconds

    def as_dict(self, *, cache: Mapping[str, Any], api: Mapping[str, int], model_load_seconds: float) -> dict[str, Any]:
        """The document's `metrics`, under this job's names (see _METRIC_NAMES)."""
        wall = time.perf_counter() - self._started
        model_s = self.stage_seconds.get(self.job, 0.0)
        names = _METRIC_NAMES.get(self.job, {})
        counts = {names.get(k, k): getattr(self, k) for k in _COUNTERS}
        return {
            "wall_seconds": round(wall, 3),
            # the job's own thread, stage after stage: they add up to wall_seconds (within what the
            # progress display and bookkeeping take); read/validate done ahead in the background apart
            "stage_seconds": {k: round(v, 3) for k, v in self.stage_seconds.items()},
            "background_seconds": {k: round(v, 3) for k, v in self.background_seconds.items()},
            **counts,
            "cache": {**cache, "hits": self.cache_hits, "misses": self.cache_misses, "hit_rate": round(self.hit_rate, 4),
                      "stores": self.cache_stores, "rejected": self.cache_rejected},
            "rows_per_second": round(self.rows_total / wall, 2) if wall > 0 else None,
            # the model's own rate: tokens it computed per second of its stage (load excluded)
            "tokens_per_second": round(self.tokens_computed / model_s, 1) if model_s > 0 else None,
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "model_load_seconds": model_load_seconds,
            "api": dict(api),
        }


# A local file modified this recently may be modified again within the filesystem's timestamp
# granule (a few ms on Linux without fine-grained timestamps), leaving its stat as it was: for such
# a file the identity also holds a digest taken before the first read (git's "racily clean" index)
_RACY_NS = 2_000_000_000


@dataclass(frozen=True)
class InputIdentity:
    """What the input is before the job's first read, to be checked after its last.

    A local file: (device, inode, size, mtime, ctime), which any rename onto the path or write into
    the file changes, and which reads no byte of it (plus its digest when it was modified within the
    last 2 s). A store's object: what the store says of its content (ETag or version, and size),
    one HEAD. `mark` is None when the file could not be looked at (the reader then says why)."""

    path: Path
    mark: Any
    digest: str | None = None

    @classmethod
    def take(cls, path: Path) -> "InputIdentity":
        """The identity of the input at `path` now (call it before anything reads it)."""
        mark = _mark(path)
        digest = None
        if isinstance(mark, tuple) and abs(time.time_ns() - mark[3]) < _RACY_NS:
            try:
                digest = file_digest(Path(path))
            except OSError:
                digest = None
            if _mark(path) != mark:  # changing as we look: it will fail the check
                mark = None
        return cls(path, mark, digest)

    def check(self, *, digest: str | None = None, shown: Any = None) -> None:
        """InputChangedError (exit 1, naming the input as `shown`) unless the input is still what it
        was when taken (and, given its `digest` now, has the digest it had then, where one was taken)."""
        if (self.mark is None or _mark(self.path) != self.mark
                or (self.digest is not None and digest is not None and digest != self.digest)):
            raise InputChangedError(f"{shown if shown is not None else self.path}: changed during the job (replaced "
                                    "or rewritten while it was read); nothing was written for it. Rerun to embed it "
                                    "as it is now.")

    def facts(self, format: str, rows: int, *, shown: Any = None) -> "InputFacts":
        """The input's facts as the sidecar records them: its identity from before the first read,
        checked unchanged now (InputChangedError if not). A local file's digest is read here and
        vouched for by the check after it (no rename or write since the first read)."""
        if isinstance(self.path, RemotePath):  # the store's word for its content: no read of the bytes
            size = _remote_size(self.path)
            self.check(shown=shown)
            return InputFacts(shown or self.path, format, size or 0, self.mark, rows)
        try:
            digest = file_digest(Path(self.path))
        except OSError:
            digest = None  # gone or unreadable now: the check says so
        self.check(digest=digest, shown=shown)
        return InputFacts(Path(shown or self.path), format, self.mark[2], digest or "", rows)


def _remote_size(path: RemotePath) -> int | None:
    try:
        return path.size()
    except InputError:  # gone: the check after says so
        return None


def _mark(path: Path) -> Any:
    """A local file's (st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns), a store object's
    identity string; None when it cannot be looked at."""
    if isinstance(path, RemotePath):
        try:
            return path.identity()
        except InputError:
            return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass(frozen=True)
class InputFacts:
    """What a sidecar says of the input it describes."""

    path: Path
    format: str
    bytes: int
    hash: str
    rows: int

    @classmethod
    def of(cls, path: Path, format: str, rows: int, *, shown: Path | None = None,
           identity: InputIdentity | None = None) -> "InputFacts":
        """The facts of the file at `path`, named `shown` when that is what the user gave (`-` for a
        spooled stdin). With `identity` (taken before the first read): that identity, checked
        unchanged now (InputChangedError, exit 1, if not). Without: its size and content hash read now."""
        if identity is not None:
            return identity.facts(format, rows, shown=shown)
        if isinstance(path, RemotePath):  # the store's word for its content: no second read of the bytes
            return cls(shown or path, format, path.size(), path.identity(), rows)  # type: ignore[arg-type]
        return cls(Path(shown or path), format, Path(path).stat().st_size, file_digest(Path(path)), rows)


@dataclass(frozen=True)
class OutputFacts:
    path: Path
    rows: int


def build_document(*, job: str, backend: Any, options: Any, input: InputFacts, output: OutputFacts,
                   metrics: Metrics, started: str, cache: Any = None, details: Mapping[str, Any] | None = None,
                   engine: str = "local") -> dict[str, Any]:
    """The sidecar document of one output file, whichever job and engine wrote it: `provenance`
    (what produced the results) and `metrics` (what it cost). The same document goes to
    `<output>.meta.json`, the Parquet metadata and --json.

    `backend`: the embedding backend or generator (its name, fingerprint() and describe(); it need
    not be loaded). `options`: the resolved JobOptions (model, command, on_invalid,
    relative_paths). `cache`: the cache object (directory, disabled, volume_bytes()), None for
    none. `details`: what only this job records (embed: dim, normalize, max_length...)."""
    described = dict(backend.describe())
    backends = described.pop("backends", None) or {backend.name: {"texts_computed": metrics.texts_computed, **described}}
    api = {
        "requests": sum(int(b.get("requests", 0)) for b in backends.values()),
        "retries": sum(int(b.get("retries", 0)) for b in backends.values()),
        "fallbacks": int(bool(described.get("fell_back"))),
    }
    directory = getattr(cache, "directory", None)
    disabled = getattr(cache, "disabled", None)
    cache_info = {
        "enabled": directory is not None and disabled is None,
        "disabled": disabled,  # why a cache that was asked for did not work (the job ran without it)
        "directory": str(directory) if directory else None,
        "volume_bytes": cache.volume_bytes() if cache is not None else 0,
    }
    provenance = {
        "tool": "hfbatch",
        "tool_version": __version__,
        "job": job,
        "engine": engine,
        "command": redact(list(options.command) or sys.argv),
        "model_id": options.model,
        "revision": described.get("revision"),
        "model_source": described.get("model_source"),
        "fingerprint": backend.fingerprint(),
        "backend": backend.name,
        "backends": backends,
        "device": described.get("device"),
        "on_invalid": options.on_invalid,
        **(details or {}),
        "input": {"path": str(input.path), "format": input.format, "bytes": input.bytes, "hash": input.hash,
                  "rows": input.rows},
        "output": {"path": str(output.path), "rows": output.rows},
        "started": started,
        "finished": utc_now(),
        "libraries": library_versions(),
    }
    document = {"provenance": provenance, "metrics": metrics.as_dict(
        cache=cache_info, api=api, model_load_seconds=described.get("load_seconds", 0.0))}
    local = options.relative_paths and not isinstance(output.path, RemotePath)
    return relative_paths(document, Path(output.path).parent) if local else document


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
