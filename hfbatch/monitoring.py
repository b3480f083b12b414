"""Monitoring for cron jobs: a Prometheus textfile (node_exporter's textfile collector) and a
structured log with one JSON line per chunk. Both are optional and cost nothing when unused.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Mapping

from .io.writers import temp_path_for
from .provenance import utc_now
from .resources import peak_rss_mb


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
        for key in ("rows_total", "rows_written", "rows_embedded", "rows_invalid", "rows_skipped", "rows_truncated",
                    "texts_computed", "tokens_computed", "batches", "chunks"):
            gauge(key, m[key], f"{key.replace('_', ' ').capitalize()} in the last run.")
        gauge("wall_seconds", m["wall_seconds"], "Wall-clock seconds of the last run.")
        for stage, seconds in m["stage_seconds"].items():
            gauge("stage_seconds", seconds, "Seconds spent per pipeline stage in the last run.", {"stage": stage})
        gauge("rows_per_second", m["rows_per_second"], "Input rows per wall-clock second.")
        gauge("tokens_per_second", m["tokens_per_second"], "Tokens computed per second of embedding.")
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
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_path_for(path)
    try:
        temp.write_text(text, encoding="utf-8")
        os.replace(temp, path)
    except OSError:
        temp.unlink(missing_ok=True)
        raise


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
