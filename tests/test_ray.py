"""--engine ray on a local Ray cluster (2 actors): the same vectors, in the same order per part, as
the local engine; the same output layout, sidecars and resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from typer.testing import CliRunner

from conftest import SAMPLE_TEXTS, write_csv, write_jsonl, write_parquet
from hfbatch import EmbedOptions
from hfbatch.cli import app
from hfbatch.engines.parts import run_embed_parts
from hfbatch.engines.ray import run_embed_ray


def _parts(root: Path) -> None:
    root.mkdir()
    write_jsonl(root / "a.jsonl", [{"id": i, "text": f"{SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)]} a{i}"} for i in range(45)]
                + [{"id": 45, "text": 12345}, {"id": 46, "text": None}])  # a number and a null: marked, kept
    write_csv(root / "b.csv", [{"id": i, "text": f"csv row {i}, {SAMPLE_TEXTS[i % 3]}"} for i in range(23)])
    (root / "sub").mkdir()
    write_parquet(root / "sub" / "c.parquet", [{"id": i, "text": f"parquet {i} " * (1 + i % 7)} for i in range(31)])


def test_ray_engine_equals_the_local_engine_part_by_part(tmp_path: Path) -> None:
    _parts(tmp_path / "data")
    local = run_embed_parts(EmbedOptions(input=tmp_path / "data", output=tmp_path / "local", chunk_size=10,
                                         cache_dir=tmp_path / "cache-local"))
    ray = run_embed_ray(EmbedOptions(input=tmp_path / "data", output=tmp_path / "ray", chunk_size=10,
                                     cache_dir=tmp_path / "cache-ray"), num_workers=2)
    assert ray.document["totals"]["parts_done"] == 3 and ray.document["totals"]["rows_out"] == 101
    assert ray.document["ray"]["actor_starts"] == 2 and ray.document["engine"] == "ray"
    for record in local.document["parts"]:
        want = pq.read_table(tmp_path / "local" / record["output"])
        got = pq.read_table(tmp_path / "ray" / record["output"])
        assert got.schema.remove_metadata() == want.schema.remove_metadata()  # the same columns and types
        assert got.column("id").to_pylist() == want.column("id").to_pylist()  # same rows, same order
        assert got.column("embedding_error").to_pylist() == want.column("embedding_error").to_pylist()
        assert got.column("n_tokens").to_pylist() == want.column("n_tokens").to_pylist()
        a = np.array([v if v is not None else [0.0] * 384 for v in got.column("embedding").to_pylist()], dtype=np.float32)
        b = np.array([v if v is not None else [0.0] * 384 for v in want.column("embedding").to_pylist()], dtype=np.float32)
        assert np.abs(a - b).max() < 1e-5
        meta = json.loads((tmp_path / "ray" / (record["output"] + ".meta.json")).read_text())
        assert meta["provenance"]["engine"] == "ray" and meta["metrics"]["rows_written"] == want.num_rows
    assert sum(p["texts_computed"] for p in ray.document["parts"]) == 99  # 101 rows, 2 invalid
    again = run_embed_ray(EmbedOptions(input=tmp_path / "data", output=tmp_path / "ray", chunk_size=10,
                                       cache_dir=tmp_path / "cache-ray"), num_workers=2)
    assert again.document["totals"]["parts_skipped"] == 3 and "actor_starts" not in again.document["ray"]


def test_ray_engine_cli_refusals(tmp_path: Path) -> None:
    _parts(tmp_path / "data")
    runner = CliRunner()
    bad = runner.invoke(app, ["embed", str(tmp_path / "data"), "-o", str(tmp_path / "o"), "--engine", "spark"])
    assert bad.exit_code == 2 and "not one of: local, ray" in bad.stderr
    as_file = runner.invoke(app, ["embed", str(tmp_path / "data"), "-o", str(tmp_path / "o.parquet"), "--engine", "ray"])
    assert as_file.exit_code == 2 and "the output is a directory" in as_file.stderr
    workers = runner.invoke(app, ["embed", str(tmp_path / "data"), "-o", str(tmp_path / "o"), "--engine", "ray",
                                  "--num-workers", "0"])
    assert workers.exit_code == 2 and "--num-workers must be at least 1" in workers.stderr


def test_ray_engine_cli_exit_3_for_marked_rows(tmp_path: Path) -> None:
    _parts(tmp_path / "data")  # a.jsonl has a number and a null in its text column
    result = CliRunner().invoke(app, ["embed", str(tmp_path / "data"), "-o", str(tmp_path / "o"), "--engine", "ray",
                                      "--cache-dir", str(tmp_path / "cache"), "--quiet"])
    assert result.exit_code == 3, result.output  # complete, like the local engine, but 2 rows marked
    assert "2 rows marked invalid" in result.stderr
