"""One observer of a job, injected: what the jobs report while they run, and to whom.

A job calls only its Observer: `start(total_rows)`, `advance(rows, hit_rate=)` as rows get their
results, `chunk(first_row, rows, metrics)` after each chunk is written, `note(message)` for a short
status while no rows move (measuring, exporting, loading), then `done(document)` or
`failed(error)`. `NullObserver` (the default) reports nothing; `RichProgress` draws the bar for
people; `MonitoringFiles` keeps the files of cron jobs: a Prometheus textfile (node_exporter's
textfile collector) and a structured log with one JSON line per chunk (`--metrics-file`,
`--log-file`); `watch()` composes what one job asked for. Trouble writing the monitoring files
never fails a job, nor hides the error of one that failed.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Mapping, Protocol

from datetime import timedelta

from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TaskProgressColumn, TextColumn,
                           TimeElapsedColumn)
from rich.text import Text

from .errors import InputError
from .io.writers import write_text_atomic
from .provenance import Metrics, utc_now
from .resources import peak_rss_mb

log = logging.getLogger(__name__)


class Observer(Protocol):
    def start(self, total_rows: int | None) -> None: ...
    def advance(self, rows: int, *, hit_rate: float) -> None: ...
    def chunk(self, first_row: int, rows: int, metrics: Metrics) -> None: ...
    def note(self, message: str) -> None: ...
    def done(self, document: Mapping[str, Any]) -> None: ...
    def failed(self, error: BaseException) -> None: ...


class NullObserver:
    """Reports nothing; the library default."""

    def start(self, total_rows: int | None) -> None:
        pass

    def advance(self, rows: int, *, hit_rate: float) -> None:
        pass

    def chunk(self, first_row: int, rows: int, metrics: Metrics) -> None:
        pass

    def note(self, message: str) -> None:
        pass

    def done(self, document: Mapping[str, Any]) -> None:
        pass

    def failed(self, error: BaseException) -> None:
        pass


def job_rate(rows: float, seconds: float | None) -> float | None:
    """Rows per second of a job: rows done over the wall seconds since it started (model load,
    measuring and checks included). The bar and the summary both use this sum, so they agree."""
    return rows / seconds if rows and seconds else None


def rate_text(rate: float | None) -> str:
    """A rate as the bar and the summary both print it: '1,234', '12.3', '0.08'; '-' for none."""
    if rate is None:
        return "-"
    return f"{rate:,.0f}" if rate >= 100 else f"{rate:.1f}" if rate >= 10 else f"{rate:.2f}"


class _RateColumn(ProgressColumn):
    """`123 rows/s · ETA 0:00:12`: the job's rate (`job_rate`, since start()) and the time the
    rows left take at that rate; recomputed at every refresh, not only when rows move."""

    def render(self, task: Task) -> Text:
        # at the end, the rate of the job's document, the very number its summary prints
        rate = task.fields.get("final_rate") or job_rate(task.completed, task.elapsed)
        if rate is None:
            return Text("- rows/s · ETA -")
        eta = ("-" if task.total is None
               else str(timedelta(seconds=round(max(task.total - task.completed, 0) / rate))))
        return Text(f"{rate_text(rate)} rows/s · ETA {eta}")


class RichProgress(NullObserver):
    """Rows done / total, rows per second and the ETA (`job_rate`), cache hit rate, on stderr.
    `note(message)` shows a status beside the label until the next note (`""` clears it) or until
    rows move."""

    def __init__(self, console: Console | None = None, *, label: str = "embedding"):
        self._label = label
        self._note = ""
        self._bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            _RateColumn(),
            TextColumn("· cache hits {task.fields[hits]}"),
            TimeElapsedColumn(),
            console=console or Console(stderr=True),
            transient=False,
        )
        self._task = None

    def _description(self) -> str:
        return f"[bold]{escape(self._label)}[/]" + (f" {escape(self._note)}" if self._note else "")

    def start(self, total_rows: int | None) -> None:
        self._bar.start()
        self._task = self._bar.add_task(self._description(), total=total_rows, hits="-")

    def note(self, message: str) -> None:
        self._note = " ".join(str(message).split())  # one line, whatever it was given
        if self._task is not None:
            self._bar.update(self._task, description=self._description())

    def advance(self, rows: int, *, hit_rate: float) -> None:
        if self._task is None:
            return
        if rows and self._note:  # rows are moving again: what held them up is over
            self._note = ""
            self._bar.update(self._task, description=self._description())
        self._bar.update(self._task, advance=rows, hits=f"{hit_rate:.0%}")

    def done(self, document: Mapping[str, Any]) -> None:
        m = document.get("metrics") or {}
        if self._task is not None and m.get("wall_seconds"):
            self._bar.update(self._task, final_rate=job_rate(m.get("rows_total", 0), m["wall_seconds"]))
        self._bar.stop()

    def failed(self, error: BaseException) -> None:
        self._bar.stop()


class MonitoringFiles(NullObserver):
    """--log-file (a JSON line per chunk, and one at the end) and --metrics-file (Prometheus text,
    on success and on failure), labelled with the job's input, output, model and backend."""

    def __init__(self, log_file: Path | None, metrics_file: Path | None, labels: Mapping[str, str]):
        try:
            self.log = ChunkLog(log_file)
        except OSError as exc:
            raise InputError(f"--log-file {log_file}: cannot open it ({exc.strerror or exc}); choose another path.") from None
        self.metrics_file, self.labels = metrics_file, dict(labels)
        self._rows_done = 0

    def chunk(self, first_row: int, rows: int, metrics: Metrics) -> None:
        self._rows_done = metrics.rows_total
        self.log.write("chunk", chunk=metrics.chunks, first_row=first_row, rows=rows, rows_done=metrics.rows_total,
                       texts_computed=metrics.texts_computed, cache_hits=metrics.cache_hits,
                       cache_misses=metrics.cache_misses)

    def done(self, document: Mapping[str, Any]) -> None:
        # the output is published: trouble with these files is a warning, not a failed job
        m = document["metrics"]
        try:
            self.log.write("done", rows=m["rows_total"], rows_written=m["rows_written"], wall_seconds=m["wall_seconds"])
            if self.metrics_file:
                write_prometheus(self.metrics_file, prometheus_text(document, success=True, labels=self.labels))
        except OSError as exc:
            log.warning("the output is complete, but a monitoring file could not be written: %s", exc)
        finally:
            self.log.close()

    def failed(self, error: BaseException) -> None:
        # a cron job's failure must show up too; trouble reporting it must not hide the job's own error
        try:
            self.log.write("failed", error=type(error).__name__, rows_done=self._rows_done)
            if self.metrics_file:
                write_prometheus(self.metrics_file,
                                 prometheus_text(None, success=False, labels=self.labels, error=type(error).__name__))
        except OSError as exc:
            log.warning("could not write the monitoring files: %s", exc)
        finally:
            self.log.close()


class Observers(NullObserver):
    """Several observers as one, each told everything in turn."""

    def __init__(self, *observers: Observer):
        self.observers = observers

    def start(self, total_rows: int | None) -> None:
        for o in self.observers:
            o.start(total_rows)

    def advance(self, rows: int, *, hit_rate: float) -> None:
        for o in self.observers:
            o.advance(rows, hit_rate=hit_rate)

    def chunk(self, first_row: int, rows: int, metrics: Metrics) -> None:
        for o in self.observers:
            o.chunk(first_row, rows, metrics)

    def note(self, message: str) -> None:
        for o in self.observers:
            o.note(message)

    def done(self, document: Mapping[str, Any]) -> None:
        for o in self.observers:
            o.done(document)

    def failed(self, error: BaseException) -> None:
        for o in self.observers:
            o.failed(error)


def watch(observer: Observer | None, *, log_file: Path | None, metrics_file: Path | None,
          labels: Mapping[str, str]) -> Observer:
    """The observer of one job: the caller's (a progress bar, or nothing) and the monitoring files
    its options ask for. InputError if --log-file cannot be opened."""
    observer = observer or NullObserver()
    if log_file is None and metrics_file is None:
        return observer
    return Observers(observer, MonitoringFiles(log_file, metrics_file, labels))


_COUNTS = ("rows_total", "rows_written", "rows_embedded", "rows_generated", "rows_invalid", "rows_skipped",
           "rows_truncated", "texts_computed", "prompts_computed", "tokens_computed", "tokens_generated", "batches", "chunks")


def _label(value: Any) -> str:
    text = str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    return f'"{text}"'


def prometheus_text(document: Mapping[str, Any] | None, *, success: bool, labels: Mapping[str, str], error: str | None = None) -> str:
    """The job's metrics in the Prometheus text exposition format (all gauges)."""
    base = ",".join(f"{k}={_label(v)}" for k, v in labels.items())
    lines: list[str] = []

    def gauge(name: str, value: Any, help_text: str, extra: Mapping[str, str] | None = None) -> None:
        if value is None:
            return
        if not any(line.startswith(f"# HELP hfbatch_{name} ") for line in lines):
            lines.append(f"# HELP hfbatch_{name} {help_text}")
            lines.append(f"# TYPE hfbatch_{name} gauge")
        more = ",".join(f"{k}={_label(v)}" for k, v in (extra or {}).items())
        joined = ",".join(p for p in (base, more) if p)
        lines.append(f"hfbatch_{name}{{{joined}}} {float(value):.15g}")

    gauge("job_success", 1 if success else 0, "1 if the last run succeeded, 0 if it failed.",
          {"error": error} if error else None)
    gauge("job_last_run_timestamp_seconds", time.time(), "Unix time the last run ended.")
    if document:
        m = document["metrics"]
        for key in _COUNTS:  # the job's own names: rows_embedded, or rows_generated and prompts_computed
            if key in m:
                gauge(key, m[key], f"{key.replace('_', ' ').capitalize()} in the last run.")
        gauge("wall_seconds", m["wall_seconds"], "Wall-clock seconds of the last run.")
        for stage, seconds in m["stage_seconds"].items():
            gauge("stage_seconds", seconds, "Seconds spent per pipeline stage in the last run.", {"stage": stage})
        gauge("rows_per_second", m["rows_per_second"], "Input rows per wall-clock second.")
        gauge("tokens_per_second", m["tokens_per_second"], "Tokens computed per second of the model's work.")
        gauge("cache_hits", m["cache"]["hits"], "Cache hits (distinct texts per chunk).")
        gauge("cache_misses", m["cache"]["misses"], "Cache misses (distinct texts per chunk).")
        gauge("cache_hit_rate", m["cache"]["hit_rate"], "Cache hit rate of the last run.")
        gauge("peak_rss_bytes", m["peak_rss_mb"] * 2**20, "Peak resident memory of the process.")
        gauge("model_load_seconds", m["model_load_seconds"], "Seconds spent loading the model.")
        for key, value in m["api"].items():
            gauge(f"api_{key}", value, f"Remote API {key} in the last run.")
    return "\n".join(lines) + "\n"


def write_prometheus(path: Path, text: str) -> None:
    """Atomic, as the textfile collector requires: it must never read half a file."""
    write_text_atomic(path, text)


class ChunkLog:
    """One JSON line per chunk (and one at the end) appended to --log-file; a no-op without one."""

    def __init__(self, path: Path | None):
        self.path = path
        self._handle = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = path.open("a", encoding="utf-8")
        self._last = time.perf_counter()

    def write(self, event: str, **fields: Any) -> None:
        if self._handle is None:
            return
        now = time.perf_counter()
        record = {"ts": utc_now(), "event": event, **fields, "seconds": round(now - self._last, 3),
                  "rss_mb": round(peak_rss_mb(), 1)}
        self._last = now
        self._handle.write(json.dumps(record, default=str) + "\n")
        self._handle.flush()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
