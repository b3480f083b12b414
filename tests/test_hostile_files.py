"""Hostile input files, generated (hypothesis) and hand-made: every one gives either a complete
output (every input row once, in order, with a vector or an error mark) or a one-line error that
names the file, with exit 2; never a traceback, never a silently dropped row."""

from __future__ import annotations

import csv
import gzip
import io
import json
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from hfbatch import EmbedOptions, HfbatchError
import hfbatch
from hfbatch.cli import app

# text that files meet: quotes, separators, newlines, BOMs, controls, emoji, right-to-left, CJK
HOSTILE = st.lists(st.one_of(
    st.sampled_from(list('",;\t\n\r\\\'\ufeff\u200f\u202e\x00\x1b\x7f') + ["😀", "👍🏽", "שלום", "مرحبا", "漢字", "é", "  "]),
    st.characters(codec="utf-8", exclude_categories=("Cs",)),
), max_size=30).map("".join)
VALUES = st.one_of(HOSTILE, HOSTILE, st.none(), st.integers(), st.floats(allow_nan=True), st.booleans())
ROWS = st.lists(VALUES, min_size=0, max_size=12)
FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _check(result_or_error, path: Path, rows: int, error: str | None = None) -> None:
    """`error`: the one error this input must give (a part of its message); None: it must embed.
    A reader that refused every file, or accepted a file with no columns, fails here."""
    if error is not None or isinstance(result_or_error, HfbatchError):
        assert isinstance(result_or_error, HfbatchError), f"expected an error with {error!r}"
        message = str(result_or_error)
        assert "\n" not in message.strip()  # one line
        assert str(path.name) in message and error is not None and error in message, message
        return
    table = pq.read_table(result_or_error.output)
    assert table.num_rows == rows  # every row once
    assert table.column("id").to_pylist() == [str(i) for i in range(rows)] or \
        table.column("id").to_pylist() == list(range(rows))  # in order
    embeddings = table.column("embedding").to_pylist()
    errors = table.column("embedding_error").to_pylist()
    assert all((e is None) != (v is None) for e, v in zip(errors, embeddings))  # a vector xor an error mark


def _embed(path: Path, out: Path):  # type: ignore[no-untyped-def]
    try:
        return hfbatch.embed(EmbedOptions(input=path, output=out, use_cache=False, chunk_size=5))
    except HfbatchError as exc:
        assert not out.exists()  # an error leaves no output
        return exc


@FAST
@given(values=ROWS)
def test_generated_jsonl(tmp_path_factory: pytest.TempPathFactory, values: list) -> None:
    root = tmp_path_factory.mktemp("jsonl")
    path = root / "in.jsonl"
    path.write_text("".join(json.dumps({"id": i, "text": v}) + "\n" for i, v in enumerate(values)), encoding="utf-8")
    # every line is an object with a text (of any type: a non-text is an error mark); no line, no columns
    _check(_embed(path, root / "o.parquet"), path, len(values), None if values else "has no column 'text'")


@FAST
@given(values=ROWS, bom=st.booleans(), gz=st.booleans())
def test_generated_csv(tmp_path_factory: pytest.TempPathFactory, values: list, bom: bool, gz: bool) -> None:
    root = tmp_path_factory.mktemp("csv")
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["id", "text"])
    for i, v in enumerate(values):
        writer.writerow([i, "" if v is None else v])
    data = (("\ufeff" if bom else "") + buffer.getvalue()).encode("utf-8")
    path = root / ("in.csv.gz" if gz else "in.csv")
    path.write_bytes(gzip.compress(data) if gz else data)
    _check(_embed(path, root / "o.parquet"), path, len(values))


@FAST
@given(values=st.lists(st.one_of(HOSTILE, st.none()), max_size=12), kind=st.sampled_from(["string", "large_string", "dictionary"]))
def test_generated_parquet(tmp_path_factory: pytest.TempPathFactory, values: list, kind: str) -> None:
    root = tmp_path_factory.mktemp("parquet")
    text = pa.array(values, pa.large_string() if kind == "large_string" else pa.string())
    if kind == "dictionary":
        text = text.dictionary_encode()
    nested = pa.array([{"a": i, "tags": ["x"] * (i % 3)} for i in range(len(values))])
    path = root / "in.parquet"
    pq.write_table(pa.table({"id": pa.array(range(len(values)), pa.int64()), "text": text, "meta": nested}), path)
    _check(_embed(path, root / "o.parquet"), path, len(values))


HANDMADE = {
    "empty.csv": (b"", 2),
    "header-only.csv": (b"id,text\n", 0),
    "empty.jsonl": (b"", 2),  # no line, so no columns: "has no column 'text'"
    "blank-lines.jsonl": (b'{"id": 0, "text": "a"}\n\n{"id": 1, "text": "b"}\n', 0),
    "malformed.jsonl": (b'{"id": 0, "text": "a"}\n{"id": 1, "text": "b"\n', 2),
    "not-objects.jsonl": (b'["a"]\n', 2),
    "invalid-utf8.csv": (b"id,text\n0,caf\xe9\n1,ok\n", 2),
    "invalid-utf8.jsonl": (b'{"id": 0, "text": "caf\xe9"}\n', 2),
    "numeric-text.csv": (b"id,text\n0,12\n1,3.5\n", 0),
    "numeric-text.jsonl": (b'{"id": 0, "text": 12}\n{"id": 1, "text": 3.5}\n', 3),
    "fake.parquet": (b"PAR1 this is not parquet at all", 2),
    "no-text-column.csv": (b"id,body\n0,hello\n", 2),
    "huge-row.csv": (b"id,text\n0," + b"word " * 200_000 + b"\n", 0),
    "quoted-newlines.csv": (b'id,text\n0,"line one\nline two, with ""quotes"""\n1,plain\n', 0),
    "utf16-excel.csv": ("id,text\n0,hello\n".encode("utf-16"), 2),  # Excel's "Unicode text"
    "utf16.jsonl": ('{"id": 0, "text": "hello"}\n'.encode("utf-16"), 2),
    "duplicate-key.jsonl": (b'{"id": 0, "text": "first", "text": "last"}\n', 0),
}


@pytest.mark.parametrize("name", sorted(HANDMADE))
def test_handmade_hostile_files(tmp_path: Path, name: str) -> None:
    content, code = HANDMADE[name]
    path = tmp_path / name
    path.write_bytes(content)
    result = CliRunner().invoke(app, ["embed", str(path), "-o", str(tmp_path / "o.parquet"), "--no-cache"])
    assert "Traceback" not in result.output
    assert result.exit_code == code, result.output
    if code == 2:
        assert name in result.stderr and not (tmp_path / "o.parquet").exists()
    else:
        assert pq.read_table(tmp_path / "o.parquet").num_rows == (2 if name in ("blank-lines.jsonl", "numeric-text.csv",
                                                                              "numeric-text.jsonl", "quoted-newlines.csv")
                                                                  else 1 if name in ("huge-row.csv", "duplicate-key.jsonl") else 0)
    if name == "duplicate-key.jsonl":  # the last value of a repeated key wins (README, JSONL input)
        assert pq.read_table(tmp_path / "o.parquet").column("text").to_pylist() == ["last"]


def test_truncated_parquet(tmp_path: Path) -> None:
    whole = tmp_path / "whole.parquet"
    pq.write_table(pa.table({"id": list(range(50)), "text": [f"text {i}" for i in range(50)]}), whole)
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    result = CliRunner().invoke(app, ["embed", str(cut), "-o", str(tmp_path / "o.parquet"), "--no-cache"])
    assert result.exit_code == 2 and "cut.parquet" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "o.parquet").exists()


MiB = 1 << 20


def _gzip_bomb(path: Path, prefix: bytes, inflated_mib: int) -> Path:
    """`prefix`, then one line of `inflated_mib` MiB with no newline: a gzip of ~1/1000 that size."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # wbits 31: gzip framing
    with path.open("wb") as handle:
        handle.write(packer.compress(prefix))
        for _ in range(inflated_mib):
            handle.write(packer.compress(b"a" * MiB))
        handle.write(packer.flush())
    return path


@pytest.mark.parametrize(("name", "prefix", "inflated_mib", "where"), [
    ("bomb.jsonl.gz", b'{"id": 0, "text": "', 72, "line 1 is longer than --max-line-bytes (64 MiB)"),
    # pyarrow parses CSV in blocks of up to the cap: a row up to twice the cap may still be read
    ("bomb.csv.gz", b"id,text\n0,", 136, "data row 1 is longer than --max-line-bytes (64 MiB)"),
])
def test_a_gzip_bomb_exits_2_at_the_default_cap(tmp_path: Path, name: str, prefix: bytes, inflated_mib: int,
                                                where: str) -> None:
    """One line inflating to 72 / 136 MiB from a gzip of ~100 KB stops at the 64 MiB default before any
    model work; a 6 GiB line is refused the same way, as early (peak memory: see test_readers)."""
    path = _gzip_bomb(tmp_path / name, prefix, inflated_mib)
    result = CliRunner().invoke(app, ["embed", str(path), "-o", str(tmp_path / "o.parquet"), "--no-cache"])
    assert result.exit_code == 2, result.output
    assert name in result.stderr and where in result.stderr and "raise --max-line-bytes" in result.stderr
    assert "Traceback" not in result.output and not (tmp_path / "o.parquet").exists()


def test_max_line_bytes_flag_and_variable_set_the_cap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"id": 0, "text": "word " * (MiB // 2)}) + "\n", encoding="utf-8")  # a 2.5 MiB line
    runner = CliRunner()
    refused = runner.invoke(app, ["embed", str(path), "-o", str(tmp_path / "o.parquet"), "--no-cache", "--max-line-bytes", "1MiB"])
    assert refused.exit_code == 2 and "line 1 is longer than --max-line-bytes (1 MiB)" in refused.stderr
    monkeypatch.setenv("HFBATCH_MAX_LINE_BYTES", "2MiB")
    from_env = runner.invoke(app, ["embed", str(path), "-o", str(tmp_path / "o.parquet"), "--no-cache"])
    assert from_env.exit_code == 2 and "(2 MiB)" in from_env.stderr
    raised = runner.invoke(app, ["embed", str(path), "-o", str(tmp_path / "o.parquet"), "--no-cache", "--max-line-bytes", "4MiB"])
    assert raised.exit_code == 0, raised.output
    assert pq.read_table(tmp_path / "o.parquet").num_rows == 1


def test_generate_reads_with_the_same_cap(tmp_path: Path) -> None:
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"prompt": "word " * (MiB // 2)}) + "\n", encoding="utf-8")  # a 2.5 MiB line
    result = CliRunner().invoke(app, ["generate", str(path), "-o", str(tmp_path / "o.parquet"), "--model",
                                      "nobody/no-such-model", "--max-line-bytes", "1MiB"])
    assert result.exit_code == 2, result.output  # before the (unknown) model is asked for
    assert "line 1 is longer than --max-line-bytes (1 MiB)" in result.stderr


def test_max_line_bytes_that_is_not_a_size_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text('{"text": "a"}\n', encoding="utf-8")
    result = CliRunner().invoke(app, ["embed", str(path), "-o", str(tmp_path / "o.parquet"), "--max-line-bytes", "lots"])
    assert result.exit_code == 2 and "--max-line-bytes 'lots' is not a size" in result.stderr


@pytest.mark.parametrize("name", ["excel.csv", "excel.jsonl", "excel.csv.gz"])
def test_utf16_input_exits_2_naming_the_encoding_and_the_fix(tmp_path: Path, name: str) -> None:
    data = ('{"text": "héllo"}\n' if "jsonl" in name else "id,text\n0,héllo\n").encode("utf-16")
    path = tmp_path / name
    path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    result = CliRunner().invoke(app, ["embed", str(path), "-o", str(tmp_path / "o.parquet"), "--no-cache"])
    assert result.exit_code == 2, result.output
    assert f"{name}: is UTF-16 encoded (byte order mark FF FE); hfbatch reads UTF-8" in result.stderr
    assert "iconv -f UTF-16 -t UTF-8" in result.stderr and "\x00" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
