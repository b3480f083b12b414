"""--metrics-file (Prometheus text, parsed by the reference parser) and --log-file (JSON lines)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import SAMPLE_TEXTS, rows_for, write_csv
from hfbatch import EmbedOptions, InputError
import hfbatch


def _samples(path: Path) -> dict[tuple[str, str], float]:
    out = {}
    for family in text_string_to_metric_families(path.read_text()):
        for sample in family.samples:
            out[(sample.name, sample.labels.get("stage", ""))] = sample.value
    return out


def test_metrics_and_chunk_log_on_success(tmp_path: Path) -> None:
    texts = SAMPLE_TEXTS + ["", "another review"]
    src = write_csv(tmp_path / "in.csv", rows_for(texts))
    prom, log = tmp_path / "node" / "hfbatch.prom", tmp_path / "logs" / "run.jsonl"
    result = hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "o.parquet", chunk_size=4, metrics_file=prom, log_file=log))
    values = _samples(prom)
    assert values[("hfbatch_job_success", "")] == 1
    assert values[("hfbatch_rows_total", "")] == len(texts)
    assert values[("hfbatch_rows_invalid", "")] == 1
    assert values[("hfbatch_cache_misses", "")] == result.metrics["cache"]["misses"]
    assert values[("hfbatch_stage_seconds", "embed")] > 0
    assert values[("hfbatch_peak_rss_bytes", "")] > 10 * 2**20
    families = {f.name: f for f in text_string_to_metric_families(prom.read_text())}
    labels = families["hfbatch_rows_total"].samples[0].labels
    assert labels == {"input": "in.csv", "output": "o.parquet", "model": "sentence-transformers/all-MiniLM-L6-v2", "backend": "local"}
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    chunks = [line for line in lines if line["event"] == "chunk"]
    assert [c["first_row"] for c in chunks] == [0, 4, 8]  # one line per chunk, in order
    assert chunks[-1]["rows_done"] == len(texts)
    assert lines[-1]["event"] == "done" and lines[-1]["rows_written"] == len(texts)
    assert not list(prom.parent.glob(".*tmp"))  # written atomically


def test_metrics_on_failure_say_so(tmp_path: Path) -> None:
    src = write_csv(tmp_path / "in.csv", rows_for(["good", ""]))
    prom, log = tmp_path / "m.prom", tmp_path / "run.jsonl"
    with pytest.raises(InputError):
        hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "o.parquet", on_invalid="fail", metrics_file=prom, log_file=log))
    families = {f.name: f for f in text_string_to_metric_families(prom.read_text())}
    (sample,) = families["hfbatch_job_success"].samples
    assert sample.value == 0 and sample.labels["error"] == "InputError"
    assert json.loads(log.read_text().splitlines()[-1])["event"] == "failed"


def test_label_values_are_escaped(tmp_path: Path) -> None:
    from hfbatch.monitoring import prometheus_text

    text = prometheus_text(None, success=True, labels={"input": 'we"ird\\name\nx.csv'})
    (family,) = [f for f in text_string_to_metric_families(text) if f.name == "hfbatch_job_success"]
    assert family.samples[0].labels["input"] == 'we"ird\\name\nx.csv'


def test_unwritable_monitoring_paths_fail_before_any_work(tmp_path: Path) -> None:
    src = write_csv(tmp_path / "in.csv", rows_for(["a"]))
    (tmp_path / "file").write_text("x")
    for kwargs in ({"metrics_file": tmp_path / "file" / "m.prom"}, {"log_file": tmp_path / "file" / "log.jsonl"}):
        with pytest.raises(InputError, match="cannot write there"):
            hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "o.parquet", **kwargs))
        assert not (tmp_path / "o.parquet").exists()


def test_a_directory_as_metrics_or_log_file_is_refused_before_work(tmp_path: Path) -> None:
    src = write_csv(tmp_path / "in.csv", rows_for(["a"]))
    (tmp_path / "d").mkdir()
    for kwargs in ({"metrics_file": tmp_path / "d"}, {"log_file": tmp_path / "d"}):
        with pytest.raises(InputError, match="is a directory; give --(metrics|log)-file a file's path"):
            hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "o.parquet", **kwargs))
    assert not (tmp_path / "o.parquet").exists() and not (tmp_path / "cache").exists()


class _Recorder:
    """An Observer that writes down what the job told it."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def start(self, total_rows):
        self.events.append(("start", total_rows))

    def advance(self, rows, *, hit_rate):
        self.events.append(("advance", rows))

    def chunk(self, first_row, rows, metrics):
        self.events.append(("chunk", first_row, rows, metrics.rows_total))

    def note(self, message):
        self.events.append(("note", message))

    def done(self, document):
        self.events.append(("done", document))

    def failed(self, error):
        self.events.append(("failed", type(error).__name__))


def test_the_job_reports_only_to_its_observer_and_the_monitoring_files_ride_along(tmp_path: Path) -> None:
    texts = SAMPLE_TEXTS + [""]
    src = write_csv(tmp_path / "in.csv", rows_for(texts))
    seen, log = _Recorder(), tmp_path / "run.jsonl"
    result = hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "o.parquet", chunk_size=4, log_file=log), observer=seen)
    kinds = [e[0] for e in seen.events]
    assert kinds[0] == "start" and seen.events[0][1] == len(texts) and kinds[-1] == "done"
    assert sum(e[1] for e in seen.events if e[0] == "advance") == len(texts)  # every row once, the invalid one too
    assert [e[1:] for e in seen.events if e[0] == "chunk"] == [(0, 4, 4), (4, 4, 8), (8, 1, 9)]
    assert seen.events[-1][1] == result.document
    assert [json.loads(line)["event"] for line in log.read_text().splitlines()] == ["chunk"] * 3 + ["done"]

    failing, log2 = _Recorder(), tmp_path / "fail.jsonl"
    with pytest.raises(InputError):
        hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "f.parquet", on_invalid="fail", log_file=log2), observer=failing)
    assert failing.events[-1] == ("failed", "InputError") and not any(e[0] == "done" for e in failing.events)
    assert json.loads(log2.read_text().splitlines()[-1])["event"] == "failed"


def test_a_failure_to_write_the_metrics_file_after_publishing_is_a_warning(tmp_path: Path, caplog) -> None:
    from hfbatch.monitoring import MonitoringFiles

    document = hfbatch.embed(EmbedOptions(input=write_csv(tmp_path / "in.csv", rows_for(["a"])),
                                       output=tmp_path / "o.parquet")).document
    monitor = MonitoringFiles(None, tmp_path / "gone" / "m.prom", {"input": "in.csv"})
    (tmp_path / "gone").write_text("a file where the directory should be")
    monitor.done(document)  # no exception: the output was published already
    assert "the output is complete, but a monitoring file could not be written" in caplog.text


def _bar(width: int = 200):  # type: ignore[no-untyped-def]
    """A RichProgress drawing into a string; not a terminal, so it renders its final state once, at stop."""
    import io

    from rich.console import Console

    from hfbatch.monitoring import RichProgress

    sink = io.StringIO()
    return RichProgress(Console(file=sink, width=width, force_terminal=False), label="embedding"), sink


def test_the_bar_ends_on_the_rate_of_the_job_document_and_shows_an_eta() -> None:
    from hfbatch.monitoring import job_rate, rate_text

    bar, sink = _bar()
    bar.start(10)
    bar.advance(10, hit_rate=0.5)
    bar.done({"metrics": {"rows_total": 10, "wall_seconds": 4.0}})
    drawn = " ".join(sink.getvalue().split())
    # the summary's sum: rows over the wall seconds of the whole job (model load and measuring included)
    assert job_rate(10, 4.0) == 2.5 and f"{rate_text(2.5)} rows/s" == "2.50 rows/s"
    assert "10/10" in drawn and "2.50 rows/s · ETA 0:00:00" in drawn and "cache hits 50%" in drawn

    bar, sink = _bar()
    bar.start(1000)
    bar.advance(1, hit_rate=0.0)
    bar.failed(RuntimeError("stopped"))  # mid-job: the rate since start() and the time the other 999 rows take at it
    assert re.search(r"[\d,.]+ rows/s · ETA \d+:\d\d:\d\d", sink.getvalue()), sink.getvalue()


def test_note_shows_beside_the_label_until_rows_move_and_is_ignored_elsewhere(tmp_path: Path) -> None:
    from hfbatch.monitoring import MonitoringFiles, NullObserver, Observers

    bar, sink = _bar()
    bar.note("measuring onnx fp32 (2/4), ~6 s left")  # before start: shown once the bar starts
    bar.start(4)
    bar.failed(RuntimeError("stopped"))
    assert "embedding measuring onnx fp32 (2/4), ~6 s left" in sink.getvalue()

    bar, sink = _bar()
    bar.start(4)
    bar.note("loading [the] model\nnow")  # one line; brackets are text, not rich markup
    bar.note("")  # cleared
    bar.note("checking int8 on the first texts")
    bar.advance(2, hit_rate=0.0)  # rows move: the note is over
    bar.failed(RuntimeError("stopped"))
    assert "checking" not in sink.getvalue() and "2/4" in sink.getvalue()

    bar, sink = _bar()
    bar.start(4)
    bar.note("loading [the] model\nnow")
    bar.failed(RuntimeError("stopped"))
    assert "embedding loading [the] model now" in sink.getvalue()

    assert NullObserver().note("anything") is None
    log = tmp_path / "run.jsonl"
    told = _Recorder()
    Observers(told, MonitoringFiles(log, None, {})).note("measuring")  # the monitoring files ignore it
    assert told.events == [("note", "measuring")] and log.read_text() == ""
