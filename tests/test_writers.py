"""hfbatch/io/writers.py: the output schema, the atomic ParquetSink, temp cleanup, JSON sidecars."""

from __future__ import annotations

import json
import os
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hfbatch.errors import OutputError
from hfbatch.io.writers import (
    METADATA_KEY,
    ParquetSink,
    check_writable,
    output_schema,
    read_metadata,
    remove_stale_temps,
    temp_path_for,
    write_json_atomic,
)

DIM = 4
PASSTHROUGH = pa.schema([pa.field("id", pa.int64()), pa.field("text", pa.string())])


def _batch(schema: pa.Schema, n: int = 3, start: int = 0) -> pa.RecordBatch:
    ids = list(range(start, start + n))
    return pa.RecordBatch.from_arrays(
        [
            pa.array(ids, pa.int64()),
            pa.array([f"text {i}" for i in ids], pa.string()),
            pa.array([[float(i)] * DIM for i in ids], pa.list_(pa.float32(), DIM)),
            pa.array([i + 1 for i in ids], pa.int32()),
            pa.array([i % 2 == 0 for i in ids], pa.bool_()),
            pa.array([None if i else "empty text" for i in ids], pa.string()),
        ],
        schema=schema,
    )


def _dead_pid() -> int:
    for pid in range(4_000_000, 3_000_000, -1):
        if not psutil.pid_exists(pid):
            return pid
    raise AssertionError("no free pid found")  # pragma: no cover


def test_output_schema_appends_the_four_columns() -> None:
    schema = output_schema(PASSTHROUGH, 384)
    assert schema.names == ["id", "text", "embedding", "n_tokens", "truncated", "embedding_error"]
    assert schema.field("id").type == pa.int64() and schema.field("text").type == pa.string()
    embedding = schema.field("embedding").type
    assert pa.types.is_fixed_size_list(embedding)
    assert embedding.list_size == 384
    assert embedding.value_type == pa.float32()
    assert schema.field("n_tokens").type == pa.int32()
    assert schema.field("truncated").type == pa.bool_()
    assert schema.field("embedding_error").type == pa.string()


def test_output_schema_with_no_passthrough_columns() -> None:
    schema = output_schema(pa.schema([]), 8)
    assert schema.names == ["embedding", "n_tokens", "truncated", "embedding_error"]


def test_sink_writes_nothing_at_output_until_commit(tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    schema = output_schema(PASSTHROUGH, DIM)
    sink = ParquetSink(out, schema)
    sink.write(_batch(schema, 3, 0))
    sink.write(_batch(schema, 2, 3))
    assert not out.exists()
    assert sink.temp.exists() and sink.temp.parent == out.parent
    assert sink.rows == 5
    sink.commit({"model": "m"})
    assert out.exists()
    assert not sink.temp.exists()
    table = pq.read_table(out)
    assert table.schema.remove_metadata() == schema
    assert table.column("id").to_pylist() == [0, 1, 2, 3, 4]
    assert table.column("embedding").to_pylist()[4] == [4.0] * DIM
    assert table.column("embedding_error").to_pylist() == ["empty text", None, None, None, None]


def test_sink_abort_removes_temp_and_leaves_no_output(tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    schema = output_schema(PASSTHROUGH, DIM)
    sink = ParquetSink(out, schema)
    sink.write(_batch(schema))
    assert sink.temp.exists()
    sink.abort()
    assert not sink.temp.exists()
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_sink_abort_keeps_an_existing_output_untouched(tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    out.write_bytes(b"previous result")
    schema = output_schema(PASSTHROUGH, DIM)
    sink = ParquetSink(out, schema)
    sink.write(_batch(schema))
    sink.abort()
    assert out.read_bytes() == b"previous result"


def test_commit_stores_metadata_readable_with_read_metadata(tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    schema = output_schema(PASSTHROUGH, DIM)
    sink = ParquetSink(out, schema)
    sink.write(_batch(schema))
    provenance = {"model": {"id": "m", "dim": DIM}, "rows": 3, "note": "ünïcödé", "path": Path("/x/y")}
    sink.commit(provenance)
    meta = read_metadata(out)
    assert meta == {"model": {"id": "m", "dim": DIM}, "rows": 3, "note": "ünïcödé", "path": "/x/y"}
    raw = pq.ParquetFile(out).metadata.metadata[METADATA_KEY.encode()]  # file key/value metadata
    assert json.loads(raw) == meta


def test_read_metadata_of_foreign_parquet_is_empty(tmp_path: Path) -> None:
    path = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"a": [1]}), path)
    assert read_metadata(path) == {}


def test_output_is_zstd_compressed(tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    schema = output_schema(PASSTHROUGH, DIM)
    sink = ParquetSink(out, schema)
    sink.write(_batch(schema, 10))
    sink.commit({})
    meta = pq.ParquetFile(out).metadata
    group = meta.row_group(0)
    assert group.column(0).compression == "ZSTD"
    assert {group.column(i).compression for i in range(group.num_columns)} == {"ZSTD"}


def test_sink_in_missing_directory_raises_output_error(tmp_path: Path) -> None:
    with pytest.raises(OutputError):
        ParquetSink(tmp_path / "no" / "such" / "dir" / "out.parquet", output_schema(PASSTHROUGH, DIM))


def test_temp_path_is_hidden_beside_output_and_names_this_pid(tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    temp = temp_path_for(out)
    assert temp.parent == out.parent
    assert temp.name.startswith(".out.parquet.")
    assert str(os.getpid()) in temp.name


def test_remove_stale_temps_removes_dead_pid_and_keeps_live_one(tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    live = temp_path_for(out)
    dead_pid = _dead_pid()
    dead = live.with_name(live.name.replace(f".{os.getpid()}-", f".{dead_pid}-"))
    assert dead != live and str(dead_pid) in dead.name
    other_output = temp_path_for(tmp_path / "other.parquet").with_name(dead.name.replace("out.parquet", "other.parquet"))
    for p in (live, dead, other_output):
        p.write_bytes(b"partial")
    removed = remove_stale_temps(out)
    assert removed == [dead]
    assert not dead.exists()
    assert live.exists()  # our own pid is alive: a run in progress is never touched
    assert other_output.exists()  # temps of another output are not ours to remove


def test_check_writable_passes_and_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "new" / "dir" / "out.parquet"
    check_writable(out)
    assert out.parent.is_dir()
    assert list(out.parent.iterdir()) == []


def test_check_writable_raises_when_parent_is_a_file(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("x", encoding="utf-8")
    with pytest.raises(OSError):
        check_writable(blocker / "out.parquet")
    with pytest.raises(OSError):
        check_writable(blocker / "deeper" / "out.parquet")


def test_write_json_atomic_writes_valid_json_and_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "out.parquet.meta.json"
    document = {"provenance": {"model": "m", "when": Path("/a")}, "metrics": {"rows": 3, "rate": 0.5}}
    write_json_atomic(path, document)
    assert json.loads(path.read_text(encoding="utf-8")) == {
        "provenance": {"model": "m", "when": "/a"},
        "metrics": {"rows": 3, "rate": 0.5},
    }
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    write_json_atomic(path, {"second": True})  # replaces an existing document
    assert json.loads(path.read_text(encoding="utf-8")) == {"second": True}
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_write_json_atomic_failure_raises_output_error(tmp_path: Path) -> None:
    target = tmp_path / "is_a_dir.json"
    target.mkdir()  # os.replace of a file onto a directory fails
    with pytest.raises(OutputError):
        write_json_atomic(target, {"a": 1})
    assert [p.name for p in tmp_path.iterdir()] == ["is_a_dir.json"]


def test_an_output_path_that_is_a_symlink_is_replaced_and_its_target_untouched(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.parquet"
    target.write_bytes(b"someone else's file")
    link = tmp_path / "out.parquet"
    link.symlink_to(target)
    sink = ParquetSink(link, output_schema(PASSTHROUGH, DIM))
    sink.write(_batch(sink.schema))
    sink.commit({"run": 1}, sidecar=tmp_path / "out.parquet.meta.json")
    assert not link.is_symlink() and pq.read_table(link).num_rows == 3  # a regular file now
    assert target.read_bytes() == b"someone else's file"


def test_two_runs_publishing_one_output_pair_each_file_with_its_own_sidecar(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run A is slow between writing its sidecar and renaming its file (os.replace delayed for A's
    temp file only: the one fault a real race needs, made certain); run B publishes meanwhile. The
    last to finish wins, and the sidecar beside the file is always the file's own."""
    import threading
    import time

    out, sidecar = tmp_path / "out.parquet", tmp_path / "out.parquet.meta.json"
    a = ParquetSink(out, output_schema(PASSTHROUGH, DIM))
    b = ParquetSink(out, output_schema(PASSTHROUGH, DIM))
    a.write(_batch(a.schema, n=3))
    b.write(_batch(b.schema, n=5))
    a_in_commit = threading.Event()
    real_replace = os.replace

    def slow_for_a(src, dst):  # type: ignore[no-untyped-def]
        if Path(src) == a.temp:
            a_in_commit.set()
            time.sleep(0.5)
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", slow_for_a)
    thread = threading.Thread(target=a.commit, args=({"run": "a"},), kwargs={"sidecar": sidecar})
    thread.start()
    assert a_in_commit.wait(10)
    b.commit({"run": "b"}, sidecar=sidecar)  # waits for A to finish publishing, then wins
    thread.join()
    assert read_metadata(out) == json.loads(sidecar.read_text()) == {"run": "b"}
    assert pq.read_table(out).num_rows == 5
    assert sorted(tmp_path.iterdir()) == sorted([out, sidecar])  # no temp file of either run is left
