"""The chunk core: prefetch (runs ahead in a thread, keeps order, hands errors to the consumer, stops
cleanly), batch planning, the chunk processor and the rows-in == rows-out rule."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings as hsettings
from hypothesis import strategies as st

from conftest import write_csv
from hfbatch.cache import NullCache
from hfbatch.errors import OutputError
from hfbatch.io.readers import Chunk
from hfbatch.jobs.core import ChunkProcessor, open_files, plan_batches, prefetch, run_task
from hfbatch.monitoring import NullObserver
from hfbatch.options import EmbedOptions
from hfbatch.provenance import Metrics
from hfbatch.settings import Settings
from hfbatch.validate import validate_chunk


def test_order_and_completeness() -> None:
    assert list(prefetch(iter(range(1000)), depth=3)) == list(range(1000))
    assert list(prefetch(iter([]))) == []


def test_producer_runs_ahead_while_the_consumer_works() -> None:
    produced: list[int] = []

    def items():
        for i in range(5):
            produced.append(i)
            yield i

    stream = prefetch(items(), depth=2)
    assert next(stream) == 0
    deadline = time.monotonic() + 5
    while len(produced) < 3 and time.monotonic() < deadline:  # the consumer is busy elsewhere...
        time.sleep(0.01)
    assert len(produced) == 3  # ...and items 1 and 2 were made meanwhile, but no more than depth ahead
    assert list(stream) == [1, 2, 3, 4]


def test_errors_reach_the_consumer_in_place() -> None:
    def items():
        yield 1
        yield 2
        raise ValueError("row 3 is bad")

    stream = prefetch(items())
    assert next(stream) == 1 and next(stream) == 2
    with pytest.raises(ValueError, match="row 3 is bad"):
        next(stream)


def test_consumer_stopping_early_stops_the_producer() -> None:
    def endless():
        i = 0
        while True:
            yield i
            i += 1

    before = threading.active_count()
    for i in prefetch(endless(), depth=2):
        if i == 10:
            break
    deadline = time.monotonic() + 5
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() == before  # the prefetch thread ended


# --- the chunk core, with a deterministic fake task (pipeline logic only; the real model's results
# are proven in test_embed.py and test_generate.py) --------------------------------------------





@hsettings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 600), max_size=200), st.integers(1, 64), st.one_of(st.none(), st.integers(1, 20000)))
def test_plan_batches_covers_every_text_once_within_budget(lengths, batch_size, budget) -> None:
    lengths = sorted(lengths, reverse=True)
    batches = plan_batches(lengths, batch_size, budget)
    assert [i for b in batches for i in b] == list(range(len(lengths)))  # each once, in order
    for b in batches:
        assert b
        if budget is None:
            assert len(b) <= batch_size
        elif len(b) > 1:
            assert max(lengths[i] for i in b) * len(b) <= budget  # padded size within the budget


class _Backend:
    name, model_id = "fake", "fake/upper"

    def fingerprint(self) -> str:
        return "fake:upper"

    def describe(self) -> dict:
        return {"backend": self.name, "load_seconds": 0.0}


class _UpperTask:
    """Upper-cases texts; 'length' is the number of characters; records every model call."""

    job = "embed"
    added_columns = ("upper", "upper_error")
    batch_texts, max_batch_tokens = 2, None

    def __init__(self, cached: dict[str, str] | None = None):
        self.backend, self.calls, self.cached = _Backend(), [], cached or {}

    def setup_seconds(self) -> dict[str, float]:
        return {"model_load": 0.0}

    def watch(self, note) -> None:  # type: ignore[no-untyped-def]
        pass

    def lookup(self, cache, texts):
        return {i: self.cached[t] for i, t in enumerate(texts) if t in self.cached}

    def prepare(self, texts):
        return list(texts), [len(t) for t in texts]

    def compute(self, items):
        self.calls.append(list(items))
        return [t.upper() for t in items], sum(map(len, items))

    def store(self, cache, texts, values):
        self.cached.update(zip(texts, values))

    def recheck(self, cache, found):
        return [u for u, v in found.items() if v == "WRONG"]

    def truncated(self, values) -> list[bool]:
        return [len(v) > 5 for v in values]

    def schema(self, passthrough):
        return pa.schema(list(passthrough) + [pa.field("upper", pa.string()), pa.field("upper_error", pa.string())])

    def columns(self, values, rows, errors):
        return [pa.array([values[r] if r >= 0 else None for r in rows], pa.string()), pa.array(errors, pa.string())]

    def provenance(self) -> dict:
        return {}

    split_mode = None  # the core's --split path is tested with the real model in test_long_texts.py

    def split(self, texts):
        raise AssertionError("not a splitting task")

    def combine(self, values, tokens):
        raise AssertionError("not a splitting task")

    def calibrate(self, sample) -> None:
        return None


class _Rows(NullObserver):
    def __init__(self) -> None:
        self.rows = 0

    def advance(self, rows: int, *, hit_rate: float) -> None:
        self.rows += rows


def _chunk(texts: list) -> Chunk:
    return Chunk(pa.record_batch({"id": list(range(len(texts))), "text": texts}), 0)


def test_processor_computes_each_distinct_text_once_longest_first_in_row_order() -> None:
    task, metrics, observer = _UpperTask(cached={"bb": "BB", "stale": "WRONG"}), Metrics(), _Rows()
    texts = ["a", "ccc", None, "bb", "a", "stale", "dddddd", ""]
    validated = validate_chunk(_chunk(texts), path=Path("x.csv"), text_column="text", on_invalid="mark")
    processor = ChunkProcessor(task, NullCache(), metrics, observer, passthrough=pa.schema([("id", pa.int64())]),
                               on_invalid="mark")
    out = processor.process(validated)
    assert out.column("id").to_pylist() == list(range(len(texts)))
    assert out.column("upper").to_pylist() == ["A", "CCC", None, "BB", "A", "STALE", "DDDDDD", None]
    assert out.column("upper_error").to_pylist() == [None, None, "null text", None, None, None, None, "empty text"]
    # misses longest first, two a call; then the hit the computed values showed to be wrong
    assert task.calls == [["dddddd", "ccc"], ["a"], ["stale"]]
    assert (metrics.rows_done, metrics.rows_invalid, metrics.texts_unique, metrics.texts_computed) == (6, 2, 5, 4)
    assert metrics.batches == 3 and metrics.rows_truncated == 1 and metrics.tokens_computed == 6 + 3 + 1 + 5
    assert observer.rows == len(texts)  # every row reported once, invalid ones and the recomputed hit's included


def test_processor_drops_invalid_rows_under_skip() -> None:
    metrics = Metrics()
    validated = validate_chunk(_chunk(["x", None, "y"]), path=Path("x.csv"), text_column="text", on_invalid="skip")
    out = ChunkProcessor(_UpperTask(), NullCache(), metrics, passthrough=pa.schema([("id", pa.int64())]),
                         on_invalid="skip").process(validated)
    assert out.column("id").to_pylist() == [0, 2] and metrics.rows_skipped == 1


def test_a_run_that_reads_fewer_rows_than_the_input_has_publishes_nothing(tmp_path: Path) -> None:
    src = write_csv(tmp_path / "in.csv", [{"id": i, "text": f"t{i}"} for i in range(5)])
    opts = EmbedOptions(input=src, output=tmp_path / "o.parquet").resolved(Settings.load())
    files = open_files(opts, ("upper", "upper_error"))
    files.reader.total_rows += 1  # as when a counting pass and the read see different data (a pipe)
    with pytest.raises(OutputError, match="5 rows were read of the 6 it has"):
        run_task(_UpperTask(), opts, files)
    assert not (tmp_path / "o.parquet").exists() and not opts.sidecar.exists()
    files = open_files(opts, ("upper", "upper_error"))
    document = run_task(_UpperTask(), opts, files)
    assert pq.read_table(opts.output).column("upper").to_pylist() == [f"T{i}" for i in range(5)]
    assert document["provenance"]["input"]["rows"] == document["provenance"]["output"]["rows"] == 5
    assert np.isclose(document["metrics"]["cache"]["hit_rate"], 0.0)


def test_metrics_of_chunks_processed_apart_add_up_to_one_run() -> None:
    """What an engine does that runs chunks elsewhere (Ray actors): a Metrics per chunk, merged."""
    whole, merged = Metrics(), Metrics()
    for texts in (["a", "bb", None], ["ccc", "a", "a"], ["dddddd"]):
        validated = validate_chunk(_chunk(texts), path=Path("x.csv"), text_column="text", on_invalid="mark")
        part = Metrics()
        for metrics in (whole, part):
            ChunkProcessor(_UpperTask(), NullCache(), metrics, passthrough=pa.schema([]), on_invalid="mark").process(validated)
        merged.add(part)
    counters = ("rows_done", "rows_invalid", "texts_unique", "texts_computed", "tokens_computed", "rows_truncated", "batches")
    assert [getattr(merged, c) for c in counters] == [getattr(whole, c) for c in counters] == [6, 1, 5, 5, 13, 1, 3]
    assert set(merged.stage_seconds) == {"read", "validate", "cache", "measure", "export", "check", "model_load", "embed",
                                         "write"}
    assert merged.stage_seconds["embed"] > 0
