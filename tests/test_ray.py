"""--engine ray on a local Ray cluster (2 actors): the same vectors, in the same order per part, as
the local engine; the same output layout, sidecars and resume."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from conftest import SAMPLE_TEXTS, write_csv, write_jsonl, write_parquet
from hfbatch import EmbedOptions
from hfbatch.cli import app
from hfbatch.engines.parts import run_embed_parts
from hfbatch.engines import ray as ray_module
from hfbatch.engines.ray import PartsWriter, gained, run_embed_ray, summed
from hfbatch.errors import OutputError


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
        meta = json.loads((tmp_path / "ray" / "_hfbatch" / (record["output"] + ".meta.json")).read_text())
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


def test_the_ray_driver_publishes_each_part_as_it_completes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The driver kept every part's rows until the dataset ended (its memory grew with the input).
    Now it holds at most the part in flight and publishes each as soon as its last row is in. With
    --on-invalid skip, a chunk whose rows are all dropped (a.jsonl's rows 46-47, chunks of 3) still
    reports its counts: the rows in == rows out check holds."""
    _parts(tmp_path / "data")
    seen: list[tuple[int, int]] = []  # (parts published, parts open) after each block the driver took
    real_add = PartsWriter.add

    def add(self: PartsWriter, table) -> None:  # type: ignore[no-untyped-def]
        real_add(self, table)
        seen.append((len(self.job.records), len(self.open)))

    monkeypatch.setattr(PartsWriter, "add", add)
    options = EmbedOptions(input=tmp_path / "data", output=tmp_path / "ray", chunk_size=3, on_invalid="skip",
                           cache_dir=tmp_path / "cache")
    result = run_embed_ray(options, num_workers=2)
    assert max(open_parts for _, open_parts in seen) <= 1
    assert any(0 < published < 3 for published, _ in seen) and seen[-1][0] == 3  # published one by one, not at the end
    local = run_embed_parts(replace(options, output=tmp_path / "local"))
    assert [p["rows_out"] for p in result.document["parts"]] == [p["rows_out"] for p in local.document["parts"]] == [45, 23, 31]
    meta = json.loads((tmp_path / "ray" / "_hfbatch" / "a.parquet.meta.json").read_text())["metrics"]
    assert (meta["rows_total"], meta["rows_skipped"], meta["rows_written"], meta["chunks"]) == (47, 2, 45, 16)
    assert pq.read_table(tmp_path / "ray" / "a.parquet").column("id").to_pylist() == list(range(45))
    assert ds.dataset(tmp_path / "ray").to_table().num_rows == result.document["totals"]["rows_out"] == 99


def test_a_ray_part_that_lost_rows_is_never_published(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows in == rows out: a part whose input has a row the actors never returned (here: the
    driver's count says one more) is not written; the parts that are whole are, and the job
    sidecar counts exactly those."""
    _parts(tmp_path / "data")
    real = ray_module.open_files

    def one_more_row(opts, added):  # type: ignore[no-untyped-def]
        files = real(opts, added)
        if opts.input.name == "b.csv":
            files.reader.total_rows += 1
        return files

    monkeypatch.setattr(ray_module, "open_files", one_more_row)
    out = tmp_path / "ray"
    with pytest.raises(OutputError, match="b.csv: the Ray job returned 23 rows of the 24 it has; the part was not written"):
        run_embed_ray(EmbedOptions(input=tmp_path / "data", output=out, cache_dir=tmp_path / "cache"), num_workers=2)
    assert not (out / "b.parquet").exists() and not (out / "_hfbatch" / "b.parquet.meta.json").exists()
    job = json.loads((out / "_hfbatch_job.json").read_text())
    assert job["finished"] is None and [p["input"] for p in job["parts"]] == ["a.jsonl", "sub/c.parquet"]
    assert ds.dataset(out).to_table().num_rows == job["totals"]["rows_out"] == 47 + 31


def test_a_part_sidecar_counts_what_the_actors_did_for_that_part() -> None:
    """An actor's backend counts requests, retries and load seconds over its life, across parts:
    each chunk reports what they gained, and a part's sidecar sums its own chunks' gains."""
    start = {"requests": 10, "retries": 1, "retry_causes": {"429": 1}, "load_seconds": 2.5, "dim": 384,
             "device": "remote (tei)", "model_loaded": True}
    middle = {**start, "requests": 14, "retries": 3, "retry_causes": {"429": 2, "503": 1}}
    end = {**middle, "requests": 15}
    first, second = gained(middle, start), gained(end, middle)
    assert first == {"requests": 4, "retries": 2, "retry_causes": {"429": 1, "503": 1}, "load_seconds": 0.0, "dim": 384,
                     "device": "remote (tei)", "model_loaded": True}  # what is not a counter is as it is now
    assert summed(summed({}, first), second) == {**first, "requests": 5}


def test_ray_engine_splits_prompts_truncates_and_quantizes_like_the_local_engine(tmp_path: Path) -> None:
    """--split/--overlap, --prompt, --truncate-dim and --output-precision int8 through the actors:
    the same rows, windows and codes as the local parts engine, with one set of int8 ranges for
    every part (settled once, from the job's first part) recorded in each part's sidecar."""
    root = tmp_path / "data"
    root.mkdir()
    long = " ".join(SAMPLE_TEXTS) * 6  # a few hundred tokens: several windows of 64
    write_jsonl(root / "a.jsonl", [{"id": 0, "text": long}, {"id": 1, "text": None}, {"id": 2, "text": SAMPLE_TEXTS[0]}])
    write_csv(root / "b.csv", [{"id": i, "text": f"{SAMPLE_TEXTS[i % 5]} {long[: 300 * i]}"} for i in range(6)])
    shaped = dict(split="tokens:64", overlap=8, prompt="query: ", truncate_dim=128, output_precision="int8",
                  calibration_size=5, chunk_size=4)
    local = run_embed_parts(EmbedOptions(input=root, output=tmp_path / "local", cache_dir=tmp_path / "c1", **shaped))
    ray = run_embed_ray(EmbedOptions(input=root, output=tmp_path / "ray", cache_dir=tmp_path / "c2", **shaped),
                        num_workers=2)
    assert ray.document["totals"]["parts_done"] == 2
    ranges = []
    for record in local.document["parts"]:
        want = pq.read_table(tmp_path / "local" / record["output"])
        got = pq.read_table(tmp_path / "ray" / record["output"])
        assert got.schema.remove_metadata() == want.schema.remove_metadata()
        assert str(got.schema.field("embedding").type) == "fixed_size_list<element: int8>[128]"
        for column in ("id", "text", "parent_row", "chunk_index", "n_chunks", "char_start", "char_end", "n_tokens",
                       "embedding_error"):
            assert got.column(column).to_pylist() == want.column(column).to_pylist(), column
        a = np.array([v or [0] * 128 for v in got.column("embedding").to_pylist()], dtype=np.int16)
        b = np.array([v or [0] * 128 for v in want.column("embedding").to_pylist()], dtype=np.int16)
        assert np.abs(a - b).max() <= 1  # one grid; float noise between processes moves a code by one at most
        assert got.num_rows > 6 and max(got.column("n_tokens").to_pylist(), key=lambda n: n or 0) <= 64
        for out in ("local", "ray"):
            meta = json.loads((tmp_path / out / "_hfbatch" / (record["output"] + ".meta.json")).read_text())
            assert meta["provenance"]["prompt"] == "query: " and meta["provenance"]["split"]["tokens"] == 64
            assert meta["metrics"]["rows_written"] == meta["metrics"]["rows_total"] + meta["metrics"]["rows_added"]
            ranges.append(meta["provenance"]["vectors"]["ranges"])
            assert meta["provenance"]["vectors"]["calibration"]["source"].endswith("a.jsonl")
    assert all(np.allclose(r, ranges[0], atol=1e-6) for r in ranges)  # every part, both engines: one set of ranges
