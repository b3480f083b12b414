"""A job reads its input once (issue 23, item 5): before it embeds anything it used to open a
CSV or JSONL up to four times, which on s3:// is four downloads. Counted at the local S3 server."""

from __future__ import annotations

import csv
import gc
import io
import json
import random
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from conftest import SAMPLE_TEXTS
from hfbatch.cli import app
from s3_server import BUCKET, S3Server, s3  # noqa: F401  # s3: the fixture

pytest.importorskip("s3fs", reason="s3:// support is the optional extra hfbatch[s3]; the dev install has it")

ROWS = 2000


def _rows() -> list[dict]:
    """~2.2 MB of rows (a long note beside each text), of 10 distinct texts: the bytes are the
    object's, the model's work stays small (the job embeds each distinct text once)."""
    noise = random.Random(0)  # incompressible notes: a Parquet file as large as the text files
    return [{"id": i, "text": SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)], "note": noise.randbytes(500).hex()}
            for i in range(ROWS)]


def _bodies() -> dict[str, bytes]:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=["id", "text", "note"])
    writer.writeheader()
    writer.writerows(_rows())
    jsonl = "".join(json.dumps(r) + "\n" for r in _rows())
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(_rows()), sink)
    return {"in.csv": out.getvalue().encode(), "in.jsonl": jsonl.encode(), "in.parquet": sink.getvalue().to_pybytes()}


@pytest.mark.parametrize("name", ["in.csv", "in.jsonl", "in.parquet"])
def test_an_s3_input_is_served_once(s3: S3Server, name: str, tmp_path: Path,  # noqa: F811
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A CSV or JSONL object is downloaded once (to a temp file every pass then reads, removed
    after the job), not once per pass: 5x its size before for a CSV, 3x for a JSONL. A Parquet
    object: its footer, then the columns once."""
    spool = tmp_path / "tmp"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    body = _bodies()[name]
    s3.put(BUCKET, f"src/{name}", body)
    s3.reset_counts()
    result = CliRunner().invoke(app, ["embed", f"s3://{BUCKET}/src/{name}", "-o", str(tmp_path / "o.parquet"),
                                      "--quiet"])
    assert result.exit_code == 0, result.output
    served = s3.bytes_read(f"src/{name}")
    assert served <= (1.05 if name.endswith(".parquet") else 1.0) * len(body), (served, len(body))
    assert pq.read_table(tmp_path / "o.parquet").num_rows == ROWS
    gc.collect()
    assert not list(spool.glob(".hfbatch-spool-*"))  # the local copy went with the job


def test_the_calibration_sample_reads_the_same_download(s3: S3Server, tmp_path: Path,  # noqa: F811
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """--output-precision int8 takes its ranges from the job's first texts: a second reader of the
    input, which opens the job's own copy, not the store again."""
    spool = tmp_path / "tmp"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    body = _bodies()["in.jsonl"]
    s3.put(BUCKET, "src/in.jsonl", body)
    s3.reset_counts()
    result = CliRunner().invoke(app, ["embed", f"s3://{BUCKET}/src/in.jsonl", "-o", str(tmp_path / "o.parquet"),
                                      "--output-precision", "int8", "--calibration-size", "10", "--quiet"])
    assert result.exit_code == 0, result.output
    assert s3.bytes_read("src/in.jsonl") <= len(body)
    meta = json.loads((tmp_path / "o.parquet.meta.json").read_text())
    assert meta["provenance"]["vectors"]["ranges"]  # the sample was taken
    gc.collect()
    assert not list(spool.glob(".hfbatch-spool-*"))
