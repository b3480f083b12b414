"""hfbatch/io/readers.py: CSV, JSONL and Parquet as one stream of fixed-size Arrow chunks."""

from __future__ import annotations

import csv
import gzip
import json
import os
import re
import subprocess
import sys
import threading
import zlib
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import BUNDLED_MODEL_DIR, WRITERS, write_csv, write_jsonl
from hfbatch.errors import InputError
from hfbatch.io import readers
from hfbatch.io.columns import check_columns
from hfbatch.io.readers import Chunk, CsvReader, JsonlReader, ParquetReader, is_stream, open_reader, spooled_input

EXT = {"csv": ".csv", "jsonl": ".jsonl", "parquet": ".parquet"}

TRICKY_TEXTS = [
    'He said "hi", then left',
    "line one\nline two",
    "windows\r\nline end",
    "comma, comma, comma",
    '"fully quoted"',
    "",
    "  spaces kept  ",
    "Très bien 👍 — ünïcödé",
    'mixed: "a,b"\n"c"',
]


def _rows(n: int) -> list[dict[str, Any]]:
    return [{"id": i, "text": f"row {i}, text\nwith \"quotes\"", "rating": (i % 5) + 1} for i in range(n)]


def _all_chunks(reader) -> list[Chunk]:
    return list(reader.chunks())


def _read_rows(reader) -> list[dict[str, Any]]:
    return [row for chunk in reader.chunks() for row in chunk.batch.to_pylist()]


def _as_strings(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    """What a CSV reader must give back: every value as the string that was written."""
    return [{k: str(v) for k, v in row.items()} for row in rows]


def _expected(fmt: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return _as_strings(rows) if fmt == "csv" else rows


# --- CSV ---------------------------------------------------------------------------------------


def test_csv_quoted_newlines_commas_and_quotes_round_trip(tmp_path: Path) -> None:
    rows = [{"id": str(i), "text": t} for i, t in enumerate(TRICKY_TEXTS)]
    path = write_csv(tmp_path / "tricky.csv", rows)
    reader = open_reader(path)
    assert isinstance(reader, CsvReader)
    assert _read_rows(reader) == rows
    assert reader.total_rows == len(rows)


def test_csv_utf8_bom_is_stripped_from_first_header(tmp_path: Path) -> None:
    path = tmp_path / "bom.csv"
    path.write_bytes("id,text\n1,hello\n".encode("utf-8-sig"))
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    reader = open_reader(path)
    assert reader.schema.names == ["id", "text"]
    assert _read_rows(reader) == [{"id": "1", "text": "hello"}]


def test_csv_values_come_back_as_written_strings(tmp_path: Path) -> None:
    path = tmp_path / "ids.csv"
    path.write_text('id,score,flag,text\n00123,1.50,true,"NA"\n007,1e3,,null\n', encoding="utf-8")
    reader = open_reader(path)
    assert all(f.type == pa.string() for f in reader.schema)
    assert _read_rows(reader) == [
        {"id": "00123", "score": "1.50", "flag": "true", "text": "NA"},
        {"id": "007", "score": "1e3", "flag": "", "text": "null"},
    ]


def test_csv_repeated_header_name_is_an_input_error(tmp_path: Path) -> None:
    path = tmp_path / "dupe.csv"
    path.write_text("id,text,text\n1,a,b\n", encoding="utf-8")
    with pytest.raises(InputError, match="text"):
        open_reader(path)


def test_csv_row_with_too_many_fields_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "ragged.csv"
    path.write_text("id,text\n1,a\n2,b,extra\n3,c\n", encoding="utf-8")
    with pytest.raises(InputError) as info:
        reader = open_reader(path)
        _read_rows(reader)
    assert str(path) in str(info.value)


def test_csv_total_rows_counts_quoted_newlines_as_one_row(tmp_path: Path) -> None:
    rows = [{"id": str(i), "text": "a\nb\nc\r\nd"} for i in range(25)]
    path = write_csv(tmp_path / "multiline.csv", rows)
    assert path.read_text(encoding="utf-8").count("\n") > 25 * 3
    assert open_reader(path).total_rows == 25


def test_tsv_is_read_with_tab_delimiter(tmp_path: Path) -> None:
    path = tmp_path / "data.tsv"
    path.write_text("id\ttext\n1\ta, b\n", encoding="utf-8")
    assert _read_rows(open_reader(path)) == [{"id": "1", "text": "a, b"}]


# --- gzip --------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_gzip_reads_the_same_as_plain(tmp_path: Path, fmt: str) -> None:
    rows = _rows(12)
    plain = WRITERS[fmt](tmp_path / f"plain{EXT[fmt]}", rows)
    gz = tmp_path / f"packed{EXT[fmt]}.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    plain_reader = open_reader(plain, chunk_size=5)
    gz_reader = open_reader(gz, chunk_size=5)
    assert gz_reader.format == fmt
    assert gz_reader.schema == plain_reader.schema
    assert gz_reader.total_rows == plain_reader.total_rows == 12
    assert _read_rows(gz_reader) == _read_rows(plain_reader) == _expected(fmt, rows)


# --- chunking (all formats) --------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 1000])
@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_chunks_have_exact_size_offsets_and_order(tmp_path: Path, fmt: str, chunk_size: int) -> None:
    rows = _rows(20)
    path = WRITERS[fmt](tmp_path / f"data{EXT[fmt]}", rows)
    reader = open_reader(path, chunk_size=chunk_size)
    chunks = _all_chunks(reader)
    sizes = [c.batch.num_rows for c in chunks]
    expected_sizes = [chunk_size] * (20 // chunk_size) + ([20 % chunk_size] if 20 % chunk_size else [])
    assert sizes == expected_sizes
    assert [c.first_row for c in chunks] == [i * chunk_size for i in range(len(chunks))]
    assert all(c.batch.schema == reader.schema for c in chunks)
    assert [r for c in chunks for r in c.batch.to_pylist()] == _expected(fmt, rows)


@pytest.mark.parametrize("chunk_size", [3, 7, 10])
def test_parquet_with_many_row_groups_is_rechunked(tmp_path: Path, chunk_size: int) -> None:
    rows = _rows(20)
    path = tmp_path / "groups.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=4)
    assert pq.ParquetFile(path).num_row_groups == 5  # the test only means something with several
    reader = open_reader(path, chunk_size=chunk_size)
    assert isinstance(reader, ParquetReader)
    chunks = _all_chunks(reader)
    sizes = [c.batch.num_rows for c in chunks]
    assert all(s == chunk_size for s in sizes[:-1]) and 0 < sizes[-1] <= chunk_size
    assert sum(sizes) == 20
    assert [c.first_row for c in chunks] == [i * chunk_size for i in range(len(chunks))]
    assert [r for c in chunks for r in c.batch.to_pylist()] == rows


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_columns_limits_what_is_read(tmp_path: Path, fmt: str) -> None:
    rows = _rows(6)
    path = WRITERS[fmt](tmp_path / f"data{EXT[fmt]}", rows)
    reader = open_reader(path, columns=["text", "id"], chunk_size=4)
    assert sorted(reader.schema.names) == ["id", "text"]
    got = _read_rows(reader)
    assert all(set(r) == {"id", "text"} for r in got)
    assert got == [{k: v for k, v in r.items() if k in ("id", "text")} for r in _expected(fmt, rows)]


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_total_rows_is_known_up_front(tmp_path: Path, fmt: str) -> None:
    rows = _rows(37)  # texts hold quoted newlines, so CSV lines != rows
    path = WRITERS[fmt](tmp_path / f"data{EXT[fmt]}", rows)
    assert open_reader(path, chunk_size=5).total_rows == 37


# --- JSONL -------------------------------------------------------------------------------------


def test_jsonl_invalid_json_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": "oops"\n{"text": "fine"}\n', encoding="utf-8")
    with pytest.raises(InputError) as info:
        open_reader(path)
    message = str(info.value)
    assert str(path) in message
    assert "line 3" in message


def test_jsonl_array_line_is_an_input_error(tmp_path: Path) -> None:
    path = tmp_path / "array.jsonl"
    path.write_text('{"text": "ok"}\n["not", "an", "object"]\n', encoding="utf-8")
    with pytest.raises(InputError, match="line 2"):
        open_reader(path)


def test_jsonl_blank_lines_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "blanks.jsonl"
    path.write_text('\n{"text": "a"}\n   \n\n{"text": "b"}\n\n', encoding="utf-8")
    reader = open_reader(path, chunk_size=1)
    assert reader.total_rows == 2
    assert _read_rows(reader) == [{"text": "a"}, {"text": "b"}]


def test_jsonl_missing_keys_become_nulls(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "sparse.jsonl", [{"text": "a", "x": 1}, {"text": "b"}, {"y": "z"}])
    reader = open_reader(path)
    assert set(reader.schema.names) == {"text", "x", "y"}
    assert _read_rows(reader) == [
        {"text": "a", "x": 1, "y": None},
        {"text": "b", "x": None, "y": None},
        {"text": None, "x": None, "y": "z"},
    ]


def test_jsonl_mixed_and_nested_values_become_json_text(tmp_path: Path) -> None:
    rows = [
        {"mixed": 5, "nested": [1, {"a": "é"}], "obj": {"k": [1, 2]}},
        {"mixed": "five", "nested": None, "obj": {"k": None}},
        {"mixed": True, "nested": [], "obj": None},
    ]
    reader = open_reader(write_jsonl(tmp_path / "mixed.jsonl", rows))
    assert all(reader.schema.field(n).type == pa.string() for n in ("mixed", "nested", "obj"))
    got = _read_rows(reader)
    assert [r["mixed"] for r in got] == ["5", "five", "true"]
    assert json.loads(got[0]["nested"]) == [1, {"a": "é"}]
    assert got[1]["nested"] is None and got[2]["nested"] == "[]"
    assert [json.loads(r["obj"]) if r["obj"] else None for r in got] == [{"k": [1, 2]}, {"k": None}, None]


def test_jsonl_ints_and_floats_become_float64(tmp_path: Path) -> None:
    reader = open_reader(write_jsonl(tmp_path / "nums.jsonl", [{"v": 1}, {"v": 2.5}, {"v": None}, {"n": 3}]))
    assert reader.schema.field("v").type == pa.float64()
    assert reader.schema.field("n").type == pa.int64()
    assert [r["v"] for r in _read_rows(reader)] == [1.0, 2.5, None, None]


def test_jsonl_bools_stay_bool(tmp_path: Path) -> None:
    reader = open_reader(write_jsonl(tmp_path / "b.jsonl", [{"ok": True}, {"ok": False}]))
    assert reader.schema.field("ok").type == pa.bool_()
    assert [r["ok"] for r in _read_rows(reader)] == [True, False]


@pytest.mark.parametrize("values", [[2**70], [2**70, 1], [2**64, 1.5], [-(2**63) - 1]])
def test_jsonl_huge_int_does_not_crash(tmp_path: Path, values: list) -> None:
    reader = open_reader(write_jsonl(tmp_path / "big.jsonl", [{"n": v} for v in values]))
    got = [r["n"] for r in _read_rows(reader)]
    assert reader.schema.field("n").type == pa.string()
    assert [json.loads(g) for g in got] == values  # exact digits, no overflow or rounding


def test_jsonl_non_string_text_becomes_null_and_invalid(tmp_path: Path) -> None:
    rows = [{"text": "ok"}, {"text": 42}, {"text": ["a", "b"]}, {"text": True}, {"text": None}, {"text": "fine"}]
    reader = open_reader(write_jsonl(tmp_path / "texts.jsonl", rows), text_column="text", chunk_size=4)
    assert reader.schema.field("text").type == pa.string()
    chunks = _all_chunks(reader)
    assert [r["text"] for c in chunks for r in c.batch.to_pylist()] == ["ok", None, None, None, None, "fine"]
    # Row indexes are relative to each chunk.
    assert set(chunks[0].invalid) == {1, 2, 3}
    assert chunks[1].invalid == {}
    assert all("not a string" in reason for reason in chunks[0].invalid.values())


def test_jsonl_text_column_is_string_even_when_all_numbers(tmp_path: Path) -> None:
    reader = open_reader(write_jsonl(tmp_path / "n.jsonl", [{"text": 1}, {"text": 2}]), text_column="text")
    assert reader.schema.field("text").type == pa.string()
    (chunk,) = _all_chunks(reader)
    assert chunk.batch.column("text").to_pylist() == [None, None]
    assert set(chunk.invalid) == {0, 1}


def test_jsonl_invalid_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "a"}\n{"text": "b"}\n{"text": "caf\xe9"}\n{"text": "d"}\n')
    with pytest.raises(InputError) as info:
        open_reader(path)
    message = str(info.value)
    assert str(path) in message and "UTF-8" in message
    assert "line 3" in message


def test_jsonl_invalid_utf8_is_an_input_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(InputError, match="UTF-8") as info:
        open_reader(path)
    assert str(path) in str(info.value)


def test_jsonl_utf8_bom_and_line_separator_in_strings(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    body = json.dumps({"text": "a\u2028b\rc"}, ensure_ascii=False) + "\n" + json.dumps({"text": "d"}) + "\n"
    path.write_bytes(body.encode("utf-8-sig"))
    reader = open_reader(path)
    assert reader.schema.names == ["text"]
    assert _read_rows(reader) == [{"text": "a\u2028b\rc"}, {"text": "d"}]


# --- format detection and opening --------------------------------------------------------------


def test_unknown_extension_suggests_format_flag(tmp_path: Path) -> None:
    path = tmp_path / "data.txt"
    path.write_text('{"text": "a"}\n', encoding="utf-8")
    with pytest.raises(InputError, match="--format"):
        open_reader(path)


def test_format_override_reads_txt_as_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "data.txt"
    path.write_text('{"text": "a"}\n{"text": "b"}\n', encoding="utf-8")
    reader = open_reader(path, fmt="jsonl")
    assert isinstance(reader, JsonlReader)
    assert _read_rows(reader) == [{"text": "a"}, {"text": "b"}]


def test_format_override_beats_extension(tmp_path: Path) -> None:
    path = tmp_path / "really_csv.jsonl"
    path.write_text("id,text\n1,a\n", encoding="utf-8")
    assert _read_rows(open_reader(path, fmt="csv")) == [{"id": "1", "text": "a"}]


def test_unsupported_format_override_is_an_input_error(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}])
    with pytest.raises(InputError, match="xlsx"):
        open_reader(path, fmt="xlsx")


def test_missing_file_is_an_input_error(tmp_path: Path) -> None:
    path = tmp_path / "nope.csv"
    with pytest.raises(InputError) as info:
        open_reader(path)
    assert str(path) in str(info.value)


def test_directory_is_an_input_error(tmp_path: Path) -> None:
    folder = tmp_path / "folder.csv"
    folder.mkdir()
    with pytest.raises(InputError, match="directory"):
        open_reader(folder)


def test_damaged_parquet_is_an_input_error(tmp_path: Path) -> None:
    path = tmp_path / "junk.parquet"
    path.write_bytes(b"this is not parquet at all")
    with pytest.raises(InputError, match="Parquet"):
        open_reader(path)


# --- property tests ----------------------------------------------------------------------------

# Any text a user can have in a cell, except NUL (the csv module cannot write it) and lone
# surrogates (not encodable as UTF-8, so no file can hold them). \r, \r\n, quotes and commas are
# all included: Python's csv module quotes such fields and Arrow's parser keeps them verbatim.
cell_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
    max_size=40,
) | st.sampled_from(["", ",", '"', '""', "\n", "\r", "\r\n", " , ", 'a"b,c\r\nd'])

rows_strategy = st.lists(st.tuples(cell_text, cell_text), min_size=1, max_size=25)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=rows_strategy, chunk_size=st.integers(1, 10))
def test_property_csv_round_trips_exactly(tmp_path: Path, data: list[tuple[str, str]], chunk_size: int) -> None:
    rows = [{"id": str(i), "text": text, "note": note} for i, (text, note) in enumerate(data)]
    path = tmp_path / "prop.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["id", "text", "note"])
        writer.writeheader()
        writer.writerows(rows)
    reader = open_reader(path, chunk_size=chunk_size)
    assert isinstance(reader, CsvReader)
    chunks = _all_chunks(reader)
    assert reader.total_rows == len(rows)
    assert all(c.batch.num_rows == chunk_size for c in chunks[:-1])
    assert [r for c in chunks for r in c.batch.to_pylist()] == rows


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=rows_strategy, chunk_size=st.integers(1, 10), ascii_only=st.booleans())
def test_property_jsonl_round_trips_exactly(
    tmp_path: Path, data: list[tuple[str, str]], chunk_size: int, ascii_only: bool
) -> None:
    rows = [{"id": i, "text": text, "note": note} for i, (text, note) in enumerate(data)]
    path = tmp_path / "prop.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=ascii_only) + "\n" for r in rows), encoding="utf-8")
    reader = open_reader(path, chunk_size=chunk_size, text_column="text")
    assert isinstance(reader, JsonlReader)
    chunks = _all_chunks(reader)
    assert reader.total_rows == len(rows)
    assert all(c.batch.num_rows == chunk_size for c in chunks[:-1])
    assert all(c.invalid == {} for c in chunks)
    assert [r for c in chunks for r in c.batch.to_pylist()] == rows


# --- hostile sizes: endless lines, wide files, foreign encodings (issue 11) ---------------------

MiB = 1 << 20


def _gzip_bomb(path: Path, prefix: bytes, inflated_mib: int) -> Path:
    """`prefix`, then `inflated_mib` MiB of one line with no newline, gzipped to ~1/1000 the size."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # wbits 31: gzip framing
    with path.open("wb") as handle:
        handle.write(packer.compress(prefix))
        block = b"a" * MiB
        for _ in range(inflated_mib):
            handle.write(packer.compress(block))
        handle.write(packer.flush())
    return path


@pytest.mark.parametrize(("name", "prefix", "where"), [
    ("bomb.jsonl.gz", b'{"text": "', "line 1 is longer"),
    ("bomb.csv.gz", b"id,text\n0,", "data row 1 is longer"),
])
def test_a_gzip_bomb_line_stops_at_the_cap_with_the_fix(tmp_path: Path, name: str, prefix: bytes, where: str) -> None:
    path = _gzip_bomb(tmp_path / name, prefix, 48)
    assert path.stat().st_size < MiB
    with pytest.raises(InputError) as info:
        open_reader(path, max_line_bytes=MiB)
    message = str(info.value)
    assert str(path) in message and where in message and "--max-line-bytes (1 MiB)" in message
    assert "raise --max-line-bytes" in message and "\n" not in message


_PEAK_MEMORY = """
import json, resource, sys
from hfbatch.errors import InputError
from hfbatch.io.readers import open_reader
scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
try:
    open_reader(sys.argv[1], max_line_bytes=int(sys.argv[2]))
    error = None
except InputError as exc:
    error = str(exc)
print(json.dumps({"error": error, "grew": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale - before}))
"""


@pytest.mark.parametrize(("name", "prefix"), [("bomb.jsonl.gz", b'{"text": "'), ("bomb.csv.gz", b"id,text\n0,")])
def test_a_gzip_bomb_never_holds_more_than_the_cap_and_a_few_blocks(tmp_path: Path, name: str, prefix: bytes) -> None:
    """Peak memory of a fresh process (its own ru_maxrss) reading a line that inflates to 96 MiB
    under a 1 MiB cap: the whole line was read before any check, so it grew by the line's size."""
    path = _gzip_bomb(tmp_path / name, prefix, 96)
    done = subprocess.run([sys.executable, "-c", _PEAK_MEMORY, str(path), str(MiB)],
                          capture_output=True, text=True, timeout=300, check=True)
    report = json.loads(done.stdout)
    assert report["error"] and "--max-line-bytes (1 MiB)" in report["error"]
    assert report["grew"] < 32 * MiB, report


def test_jsonl_line_up_to_the_cap_is_read_and_one_byte_more_is_not(tmp_path: Path) -> None:
    line = json.dumps({"id": 1, "text": "x" * (3 * MiB)}).encode()
    path = tmp_path / "long.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"id": 0, "text": "short"}\n' + line + b'\n{"id": 2, "text": "after"}'))
    reader = open_reader(path, chunk_size=2, max_line_bytes=len(line))
    assert [(r["id"], len(r["text"])) for r in _read_rows(reader)] == [(0, 5), (1, 3 * MiB), (2, 5)]
    with pytest.raises(InputError, match=r"line 2 is longer than --max-line-bytes \(3,145,7\d\d bytes\)"):
        open_reader(path, max_line_bytes=len(line) - 1)


def test_jsonl_lines_spanning_read_blocks_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of 7 bytes: every line crosses block boundaries; rows and line numbers stay exact."""
    monkeypatch.setattr(readers, "_READ_BLOCK_BYTES", 7)
    rows = [{"id": i, "text": "é" * i + "\u2028"} for i in range(12)]
    path = write_jsonl(tmp_path / "small-blocks.jsonl", rows)
    assert _read_rows(open_reader(path, chunk_size=5)) == rows
    path.write_bytes(path.read_bytes() + b'{"id": 12, "text": \n')
    with pytest.raises(InputError, match="line 13 is not valid JSON"):
        open_reader(path)


def test_csv_row_longer_than_a_block_is_read_up_to_the_cap(tmp_path: Path) -> None:
    """pyarrow refuses a row longer than its block (1 MiB); the block grows up to the cap, so a
    4 MiB row in the middle of a file is read whole, with every row once and in order."""
    rows = [{"id": str(i), "text": ("y" * (4 * MiB) if i == 5 else f"row {i}")} for i in range(10)]
    path = write_csv(tmp_path / "long-row.csv", rows)
    reader = open_reader(path, chunk_size=3)
    assert reader.total_rows == 10
    assert [(r["id"], len(r["text"])) for r in _read_rows(reader)] == [(r["id"], len(r["text"])) for r in rows]
    # parsed in blocks of up to the cap, a CSV row is refused for sure past twice the cap
    with pytest.raises(InputError, match="data row 6 is longer than --max-line-bytes \\(1 MiB\\)"):
        open_reader(path, max_line_bytes=MiB)


def test_csv_block_growth_keeps_every_row_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks start at 16 bytes: the read restarts at each growth and must skip rows it already gave."""
    monkeypatch.setattr(readers, "_CSV_BLOCK_BYTES", 16)
    rows = [{"id": str(i), "text": "z" * (i * i * 7)} for i in range(30)]
    path = write_csv(tmp_path / "growing.csv", rows)
    reader = open_reader(path, chunk_size=4)
    assert reader.total_rows == 30
    assert _read_rows(reader) == rows


def test_csv_header_longer_than_the_cap_names_the_header(tmp_path: Path) -> None:
    path = tmp_path / "long-header.csv"
    path.write_bytes(b"id," + b"h" * (2 * MiB) + b"\n0,a\n")
    with pytest.raises(InputError, match="the header row is longer than --max-line-bytes \\(1 MiB\\)"):
        open_reader(path, max_line_bytes=MiB)
    assert open_reader(path, max_line_bytes=4 * MiB).total_rows == 1


@pytest.mark.parametrize(("name", "data", "encoding", "mark"), [
    ("excel.csv", "id,text\n0,héllo\n".encode("utf-16"), "UTF-16", "FF FE"),
    ("big-endian.csv", b"\xfe\xff" + "id,text\n0,a\n".encode("utf-16-be"), "UTF-16", "FE FF"),
    ("no-mark.csv", "id,text\n0,a\n".encode("utf-16-le"), "UTF-16LE", None),
    ("utf32.jsonl", '{"text": "a"}\n'.encode("utf-32"), "UTF-32", "FF FE 00 00"),
    ("excel.jsonl", '{"text": "a"}\n'.encode("utf-16"), "UTF-16", "FF FE"),
    ("excel.jsonl.gz", gzip.compress('{"text": "a"}\n'.encode("utf-16"), mtime=0), "UTF-16", "FF FE"),
])
def test_utf16_and_utf32_files_are_refused_with_the_fix(tmp_path: Path, name: str, data: bytes, encoding: str,
                                                        mark: str | None) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(InputError) as info:
        open_reader(path)
    message = str(info.value)
    assert str(path) in message and encoding in message and "re-save it as UTF-8" in message
    assert f"iconv -f {encoding} -t UTF-8" in message
    assert mark is None or f"byte order mark {mark}" in message
    assert "\x00" not in message and "\n" not in message


def test_library_error_text_never_carries_control_bytes(tmp_path: Path) -> None:
    path = tmp_path / "nul.csv"
    path.write_bytes(b"id,text\n0,a\n1,b,\x00extra\n")
    with pytest.raises(InputError) as info:
        open_reader(path)
    assert "\x00" not in str(info.value) and str(path) in str(info.value)


def test_jsonl_key_given_twice_keeps_its_last_value(tmp_path: Path) -> None:
    """Documented in the README: like JavaScript's JSON.parse and Python's json, the last value wins,
    in the text column and in passthrough columns alike."""
    path = tmp_path / "dupes.jsonl"
    path.write_bytes(b'{"id": 1, "text": "first", "id": 2, "text": "last"}\n{"text": "only", "id": 3}\n')
    reader = open_reader(path, text_column="text")
    assert reader.all_columns == ["id", "text"]
    assert _read_rows(reader) == [{"id": 2, "text": "last"}, {"id": 3, "text": "only"}]


def test_csv_of_100k_columns_opens_checks_and_reads(tmp_path: Path) -> None:
    """Issue 11 item 9, at the issue's size (a 1 MB CSV of 100k columns took 178 s in quadratic
    column checks). Speed is measured by the benchmarks; a quadratic step shows here as a very slow test."""
    names = ["text", *(f"c{i}" for i in range(1, 100_000))]
    path = tmp_path / "wide.csv"
    path.write_text(",".join(names) + "\n" + ",".join(["hello", *("x" * (1 + i % 3) for i in range(1, 100_000))]) + "\n")
    assert path.stat().st_size > 900_000
    reader = open_reader(path, text_column="text", columns=names)
    check_columns(path, reader.schema, "text", names, reader.all_columns)
    [chunk] = list(reader.chunks())
    assert reader.total_rows == 1 and chunk.batch.num_columns == 100_000
    assert chunk.batch.schema.names == names
    assert chunk.batch.column("c99999").to_pylist() == ["x" * (1 + 99_999 % 3)]
    with pytest.raises(InputError) as info:
        check_columns(path, reader.schema, "body", None, reader.all_columns)
    assert "columns are: text, c1, c2" in str(info.value) and "(99,980 more)" in str(info.value)
    assert len(str(info.value)) < 1_000  # the error names the columns, not all 100k of them


def test_parquet_of_20k_columns_opens_checks_and_reads(tmp_path: Path) -> None:
    """Issue 11 item 9, at the issue's size (a 20k-column Parquet took 55 s to open)."""
    names = ["text", *(f"c{i}" for i in range(1, 20_000))]
    path = tmp_path / "wide.parquet"
    pq.write_table(pa.table({"text": ["a", "b"], **{n: pa.array([i, -i], pa.int32()) for i, n in enumerate(names[1:])}}), path)
    reader = open_reader(path, text_column="text")
    check_columns(path, reader.schema, "text", names[::-1], reader.all_columns)
    chunks = list(reader.chunks())
    assert reader.all_columns == names and reader.schema.names == names and reader.total_rows == 2
    assert chunks[0].batch.num_columns == 20_000 and chunks[0].batch.column("c19999").to_pylist() == [19_998, -19_998]
    with pytest.raises(InputError, match=r"--keep names column\(s\) nope that do not exist"):
        check_columns(path, reader.schema, "text", [*names, "nope"], reader.all_columns)


# --- pipes and standard input: spooled once, then read like a file ------------------------------

SPOOL_ROWS = _rows(3_000)  # ~200 KiB of JSONL: more than a pipe's 64 KiB buffer


def _encoded(fmt: str, rows: list[dict[str, Any]], tmp_path: Path, *, gz: bool = False) -> bytes:
    """The bytes a file of `rows` holds, as a producer would pipe them."""
    path = WRITERS[fmt](tmp_path / f"source{EXT[fmt]}", rows)
    data = path.read_bytes()
    path.unlink()
    return gzip.compress(data) if gz else data


@contextmanager
def _pipe(data: bytes) -> Iterator[BinaryIO]:
    """The read end of a real os.pipe(), fed `data` by a thread (the pipe holds only 64 KiB)."""
    read_fd, write_fd = os.pipe()

    def feed() -> None:
        with suppress(BrokenPipeError), os.fdopen(write_fd, "wb") as sink:  # a refused stream is never read
            sink.write(data)

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    with os.fdopen(read_fd, "rb") as source:
        yield source
    writer.join(timeout=10)


@contextmanager
def _fifo(path: Path, data: bytes) -> Iterator[Path]:
    """A real FIFO at `path`, written by a thread once a reader opens it."""
    os.mkfifo(path)

    def feed() -> None:
        with open(path, "wb") as sink:
            sink.write(data)

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    yield path
    writer.join(timeout=10)


@pytest.mark.parametrize(("fmt", "gz"), [("csv", False), ("csv", True), ("jsonl", False), ("jsonl", True),
                                       ("parquet", False)])
def test_stdin_from_a_pipe_is_spooled_and_every_row_read(tmp_path: Path, fmt: str, gz: bool) -> None:
    """Before spooling: JSONL from a pipe gave 0 rows (the counting scan ate the stream), CSV 'lseek failed'."""
    spool = tmp_path / "spool"
    spool.mkdir()
    with _pipe(_encoded(fmt, SPOOL_ROWS, tmp_path, gz=gz)) as stdin, \
            spooled_input("-", fmt, directory=spool, stdin=stdin) as copy:
        assert copy.parent == spool and copy.name.endswith(EXT[fmt] + (".gz" if gz else ""))
        reader = open_reader(copy, fmt=fmt, chunk_size=1_000)
        assert reader.total_rows == len(SPOOL_ROWS)
        assert _read_rows(reader) == _expected(fmt, SPOOL_ROWS)
    assert os.listdir(spool) == []  # the copy is gone once the job is


@pytest.mark.parametrize(("name", "fmt", "gz"), [("rows", "jsonl", True), ("rows", "csv", False),
                                                 ("rows.jsonl", None, False), ("rows.csv", None, True)])
def test_a_fifo_is_spooled_with_or_without_format(tmp_path: Path, name: str, fmt: str | None, gz: bool) -> None:
    """A FIFO named rows.jsonl tells its format; one named rows needs -f. Gzip is told by its bytes."""
    kind = fmt or name.rsplit(".", 1)[1]
    with _fifo(tmp_path / name, _encoded(kind, SPOOL_ROWS, tmp_path, gz=gz)) as fifo:
        assert is_stream(fifo)
        with spooled_input(fifo, fmt) as copy:
            assert copy.is_file() and copy.parent != tmp_path  # TMPDIR by default
            assert _read_rows(open_reader(copy, fmt=fmt)) == _expected(kind, SPOOL_ROWS)
        assert not copy.exists()


def test_a_fifo_named_tsv_keeps_tab_delimiting(tmp_path: Path) -> None:
    with _fifo(tmp_path / "rows.tsv", b"id\ttext\n1\ta, b\n") as fifo, spooled_input(fifo) as copy:
        assert copy.suffix == ".tsv"
        assert _read_rows(open_reader(copy)) == [{"id": "1", "text": "a, b"}]


def test_a_real_subprocess_pipe_into_stdin_gives_every_row(tmp_path: Path) -> None:
    """`producer | hfbatch embed - -f jsonl`: the producer is a real process writing to a real pipe."""
    producer = subprocess.Popen([sys.executable, "-c", "import json\nfor i in range(5000): print(json.dumps({'text': f'row {i}'}))"],
                                stdout=subprocess.PIPE)
    assert producer.stdout is not None
    with producer.stdout, spooled_input("-", "jsonl", stdin=producer.stdout) as copy:  # type: ignore[arg-type]
        reader = open_reader(copy, fmt="jsonl", chunk_size=1_000)
        texts = [t for chunk in reader.chunks() for t in chunk.batch.column("text").to_pylist()]
    assert producer.wait(timeout=30) == 0
    assert reader.total_rows == 5000 and texts == [f"row {i}" for i in range(5000)]


def test_the_line_cap_holds_for_a_spooled_stream(tmp_path: Path) -> None:
    data = b'{"text": "short"}\n{"text": "' + b"x" * 4096 + b'"}\n'
    with _pipe(gzip.compress(data)) as stdin, spooled_input("-", "jsonl", stdin=stdin) as copy:
        with pytest.raises(InputError, match=r"line 2 is longer than --max-line-bytes \(1 KiB\)"):
            open_reader(copy, fmt="jsonl", max_line_bytes=1024)
        assert open_reader(copy, fmt="jsonl", max_line_bytes=8192).total_rows == 2


def test_stdin_without_a_format_is_refused_with_the_fix(tmp_path: Path) -> None:
    with _pipe(b'{"text": "a"}\n') as stdin, pytest.raises(InputError) as info:
        with spooled_input("-", None, stdin=stdin):
            pass
    assert str(info.value) == ("standard input (-): a stream has no file extension to tell its format; "
                               "pass --format csv|jsonl|parquet (-f).")


def test_the_copy_is_removed_when_the_job_fails(tmp_path: Path) -> None:
    (tmp_path / "spool").mkdir()
    with _pipe(b"text\na\n") as stdin, pytest.raises(KeyboardInterrupt):
        with spooled_input("-", "csv", directory=tmp_path / "spool", stdin=stdin) as copy:
            assert copy.exists()
            raise KeyboardInterrupt  # Ctrl-C mid-job
    assert os.listdir(tmp_path / "spool") == []


class _BrokenStream:
    """A stream that fails after its first block. A real pipe cannot be made to return EIO, so
    this stands in for a producer whose device fails mid-stream."""

    def __init__(self) -> None:
        self.calls = 0

    def read(self, size: int = -1) -> bytes:
        self.calls += 1
        if self.calls > 2:
            raise OSError(5, "Input/output error")
        return b"text\n" if self.calls == 1 else b"a\n" * 1000


def test_a_stream_that_fails_while_copying_leaves_no_copy(tmp_path: Path) -> None:
    (tmp_path / "spool").mkdir()
    with pytest.raises(InputError) as info:
        with spooled_input("-", "csv", directory=tmp_path / "spool", stdin=_BrokenStream()):  # type: ignore[arg-type]
            pass
    assert str(info.value).startswith(f"standard input (-): copying it to a temp file in {tmp_path / 'spool'} failed "
                                      "(Input/output error)")
    assert os.listdir(tmp_path / "spool") == []


def test_a_regular_file_is_not_copied(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "rows.jsonl", SPOOL_ROWS[:3])
    with spooled_input(path, None) as same:
        assert same == path
    assert is_stream("-") and is_stream("/dev/null") and not is_stream(path) and not is_stream(tmp_path / "missing")


def test_a_socket_is_refused_with_the_fix(tmp_path: Path) -> None:
    import socket

    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(tmp_path / "sock"))
        with pytest.raises(InputError, match=r"sock: is a socket, which hfbatch does not open; pipe it in instead"):
            with spooled_input(tmp_path / "sock", "jsonl"):
                pass


@pytest.mark.parametrize("name", ["-", "fifo"])
def test_open_reader_refuses_a_stream_instead_of_reading_no_rows(tmp_path: Path, name: str) -> None:
    if name == "fifo":
        os.mkfifo(tmp_path / name)  # nobody writes to it: open_reader must not open (and block on) it
    with pytest.raises(InputError) as info:
        open_reader("-" if name == "-" else tmp_path / name, fmt="jsonl")
    assert "is a pipe or device, which can be read only once" in str(info.value)
    assert "spooled_input()" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(("name", "fmt"), [("-", "jsonl"), ("/dev/stdin", "csv")])
def test_cli_embeds_every_row_piped_into_stdin(tmp_path: Path, name: str, fmt: str) -> None:
    """`cat rows | hfbatch embed - -f jsonl -o out.parquet` wrote 0 rows with exit 0 (CSV: lseek failed)."""
    texts = [f"piped row {i}" for i in range(50)]
    data = _encoded(fmt, [{"id": i, "text": t} for i, t in enumerate(texts)], tmp_path)
    out = tmp_path / "out.parquet"
    proc = subprocess.run([sys.executable, "-m", "hfbatch", "embed", name, "-f", fmt, "-o", str(out),
                           "--model", str(BUNDLED_MODEL_DIR), "--quiet"],
                          input=data, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()
    assert pq.read_table(out).column("text").to_pylist() == texts
    assert [p for p in os.listdir(tmp_path) if "spool" in p] == []


# --- CSV delimiters: --delimiter, -f tsv, and a header that names another delimiter --------------

@pytest.mark.parametrize("delimiter, given", [(";", ";"), ("|", "pipe"), ("\t", "tab"), ("\t", "\\t"), ("\t", "\t")])
def test_a_delimiter_given_splits_the_columns_and_keeps_commas_in_text(tmp_path: Path, delimiter: str, given: str) -> None:
    path = tmp_path / "export.csv"
    path.write_text(f"id{delimiter}text\n1{delimiter}hello, world\n2{delimiter}\"a{delimiter}b\"\n", encoding="utf-8")
    fmt = readers.format_with_delimiter(None, given, path)
    reader = open_reader(path, fmt=fmt)
    assert reader.format == "csv" and reader.schema.names == ["id", "text"]
    assert _read_rows(reader) == [{"id": "1", "text": "hello, world"}, {"id": "2", "text": f"a{delimiter}b"}]
    assert readers.format_with_delimiter(fmt, given, path) == fmt  # resolving twice changes nothing


def test_format_tsv_reads_tabs_whatever_the_extension(tmp_path: Path) -> None:
    path = tmp_path / "rows.txt"
    path.write_text("id\ttext\n1\ta, b\n", encoding="utf-8")
    assert _read_rows(open_reader(path, fmt="tsv")) == [{"id": "1", "text": "a, b"}]
    assert _read_rows(open_reader(path, fmt="TSV")) == [{"id": "1", "text": "a, b"}]


@pytest.mark.parametrize("header, fix", [("id;text", "use --delimiter ';'"), ("id\ttext", "use --delimiter tab (or -f tsv)")])
def test_a_header_with_another_delimiter_and_no_comma_is_refused_with_the_fix(tmp_path: Path, header: str, fix: str) -> None:
    sep = header[2]
    path = tmp_path / "export.csv"
    path.write_text(f"{header}\n1{sep}hello, world\n2{sep}fine\n", encoding="utf-8")
    with pytest.raises(InputError) as caught:
        open_reader(path)  # never one column named "id;text"
    message = str(caught.value)
    assert message.startswith(f"{path}: the header ") and fix in message and "\n" not in message
    # said out loud, a comma reads it as the one column it then is
    single = tmp_path / "single.csv"
    single.write_text(f"{header}\n1{sep}fine\n", encoding="utf-8")
    assert _read_rows(open_reader(single, fmt="csv:,")) == [{header: f"1{sep}fine"}]
    # a comma in the header: an ordinary CSV whose names hold a semicolon
    ok = tmp_path / "ok.csv"
    ok.write_text("id,text;notes\n1,x\n", encoding="utf-8")
    assert open_reader(ok).schema.names == ["id", "text;notes"]
    # a .tsv file is read with tabs; a one-column CSV without ; or tab is fine
    (tmp_path / "t.tsv").write_text("id\ttext\n1\tx\n", encoding="utf-8")
    assert open_reader(tmp_path / "t.tsv").schema.names == ["id", "text"]
    (tmp_path / "one.csv").write_text("text\nhello\n", encoding="utf-8")
    assert open_reader(tmp_path / "one.csv").schema.names == ["text"]


@pytest.mark.parametrize("fmt, delimiter, input, message", [
    (None, "ab", "x.csv", "--delimiter 'ab' is not one ASCII character"),
    (None, "", "x.csv", "is not one ASCII character"),
    (None, '"', "x.csv", "other than a quote"),
    (None, "§", "x.csv", "is not one ASCII character"),
    ("jsonl", ";", "x.jsonl", "--delimiter is for CSV input; jsonl is jsonl"),
    (None, ";", "x.parquet", "--delimiter is for CSV input; x.parquet is parquet"),
    ("tsv", ";", "x.csv", "--format tsv and --delimiter ';' name two delimiters"),
])
def test_a_delimiter_that_cannot_be_used_is_refused(fmt: str | None, delimiter: str, input: str, message: str) -> None:
    with pytest.raises(InputError, match=re.escape(message)):
        readers.format_with_delimiter(fmt, delimiter, input)


def test_the_delimiter_travels_in_the_format_through_a_spooled_pipe(tmp_path: Path) -> None:
    with _fifo(tmp_path / "rows", b"id;text\n1;a, b\n") as fifo, spooled_input(fifo, "csv:;") as copy:
        assert _read_rows(open_reader(copy, fmt="csv:;")) == [{"id": "1", "text": "a, b"}]
