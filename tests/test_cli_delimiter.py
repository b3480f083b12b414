"""--delimiter and -f tsv end to end: options carry the delimiter to the CSV reader; a header with
another delimiter and no comma is refused (exit 2), never embedded as one column."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from conftest import SAMPLE_TEXTS
from hfbatch import EmbedOptions, InputError
import hfbatch
from hfbatch.cli import app

runner = CliRunner()
TEXTS = [t for t in SAMPLE_TEXTS if "\n" not in t and '"' not in t][:4]  # one line each, commas kept


def _write(path: Path, sep: str) -> Path:
    path.write_text(f"id{sep}text\n" + "".join(f"{i}{sep}{t}\n" for i, t in enumerate(TEXTS)), encoding="utf-8")
    return path


def _embedded(path: Path) -> tuple[list[str], np.ndarray]:
    table = pq.read_table(path)
    return table.column("text").to_pylist(), np.array(table.column("embedding").to_pylist())


def test_semicolon_csv_without_delimiter_is_refused_in_one_line(tmp_path: Path) -> None:
    src = _write(tmp_path / "export.csv", ";")
    result = runner.invoke(app, ["embed", str(src), "-o", str(tmp_path / "o.parquet")])
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and str(src) in result.stderr and "use --delimiter ';'" in result.stderr
    assert not (tmp_path / "o.parquet").exists()
    tabbed = _write(tmp_path / "tabbed.csv", "\t")
    result = runner.invoke(app, ["embed", str(tabbed), "-o", str(tmp_path / "o.parquet")])
    assert result.exit_code == 2 and "use --delimiter tab (or -f tsv)" in result.stderr


def test_delimiter_and_tsv_read_the_columns_and_embed_what_a_comma_csv_embeds(tmp_path: Path) -> None:
    import csv

    comma = tmp_path / "comma.csv"
    with comma.open("w", newline="", encoding="utf-8") as handle:  # quoted where the text holds a comma
        csv.writer(handle).writerows([["id", "text"], *[[i, t] for i, t in enumerate(TEXTS)]])
    assert runner.invoke(app, ["embed", str(comma), "-o", str(tmp_path / "c.parquet"), "-q"]).exit_code == 0
    texts, expected = _embedded(tmp_path / "c.parquet")
    assert texts == TEXTS and any("," in t for t in texts)

    semi = _write(tmp_path / "semi.csv", ";")
    result = runner.invoke(app, ["embed", str(semi), "-o", str(tmp_path / "s.parquet"), "--delimiter", ";", "-q"])
    assert result.exit_code == 0, result.output
    got_texts, got = _embedded(tmp_path / "s.parquet")
    assert got_texts == TEXTS and pq.read_table(tmp_path / "s.parquet").column_names[:2] == ["id", "text"]
    np.testing.assert_allclose(got, expected, atol=1e-6)

    tabs = _write(tmp_path / "rows.txt", "\t")  # no extension to tell: -f tsv says csv with tabs
    result = runner.invoke(app, ["embed", str(tabs), "-o", str(tmp_path / "t.parquet"), "-f", "tsv", "-q"])
    assert result.exit_code == 0, result.output
    assert _embedded(tmp_path / "t.parquet")[0] == TEXTS


def test_the_library_takes_the_delimiter_as_an_option(tmp_path: Path) -> None:
    src = _write(tmp_path / "piped.csv", "|")
    result = hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "o.parquet", delimiter="pipe"))
    assert result.metrics["rows_total"] == len(TEXTS)
    assert _embedded(tmp_path / "o.parquet")[0] == TEXTS
    with pytest.raises(InputError, match="--delimiter 'ab' is not one ASCII character"):
        hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "p.parquet", delimiter="ab"))


@pytest.mark.parametrize("args, message", [
    (["--delimiter", "ab"], "--delimiter 'ab' is not one ASCII character"),
    (["-f", "jsonl", "--delimiter", ";"], "--delimiter is for CSV input"),
    (["-f", "tsv", "--delimiter", ";"], "--format tsv and --delimiter ';' name two delimiters"),
])
def test_a_delimiter_that_cannot_apply_is_a_usage_error(tmp_path: Path, args: list[str], message: str) -> None:
    src = _write(tmp_path / "in.csv", ";")
    result = runner.invoke(app, ["embed", str(src), "-o", str(tmp_path / "o.parquet"), *args])
    assert result.exit_code == 2 and message in result.stderr, result.output
    assert not (tmp_path / "o.parquet").exists()
