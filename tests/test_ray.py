"""--engine ray on a local Ray cluster (2 actors): the same vectors, in the same order per part, as
the local engine; the same output layout, sidecars and resume."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

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
from hfbatch.provenance import file_digest


@pytest.fixture(scope="module", autouse=True)
def cluster(onnx_dir: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """One local cluster for the module (starting one takes seconds): the engine joins a running
    cluster and leaves it running (its own start-and-stop is what it does when none runs: the
    S3 test in test_stores.py goes that way). Workers get the suite's environment: offline, the
    shared export folder, torch fp32, nothing under ~."""
    import ray

    home = tmp_path_factory.mktemp("ray-home")
    env = {"HF_HUB_OFFLINE": "1", "HFBATCH_ONNX_DIR": str(onnx_dir), "HFBATCH_RUNTIME": "onnx",
           "HFBATCH_PRECISION": "fp32", "TOKENIZERS_PARALLELISM": "false", "HF_HOME": str(home / "hf"),
           "HFBATCH_CACHE_DIR": str(home / "cache")}
    ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": env})
    yield
    ray.shutdown()


@pytest.fixture(autouse=True)
def onnx_runtime(clean_environ: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both engines in these tests run ONNX Runtime fp32 (faithful to torch fp32, one identity):
    an actor then starts without importing torch or sentence-transformers (6 s each, per actor
    per job); the export is made once, in the suite's shared folder. The Ray-vs-local
    comparisons below hold either way."""
    monkeypatch.setenv("HFBATCH_RUNTIME", "onnx")


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
    # through the CLI, as users run it: complete like the local engine, but a.jsonl has a number and
    # a null in its text column, so 2 rows are marked and the exit code is 3
    result = CliRunner().invoke(app, ["embed", str(tmp_path / "data"), "-o", str(tmp_path / "ray"), "--engine", "ray",
                                      "--num-workers", "2", "--chunk-size", "10", "--cache-dir",
                                      str(tmp_path / "cache-ray"), "--json"])
    assert result.exit_code == 3, result.output
    assert "2 rows marked invalid" in result.stderr
    document = json.loads(result.stdout)
    assert document["totals"]["parts_done"] == 3 and document["totals"]["rows_out"] == 101
    assert document["ray"]["actor_starts"] == 2 and document["engine"] == "ray"
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
    assert sum(p["texts_computed"] for p in document["parts"]) == 99  # 101 rows, 2 invalid
    again = run_embed_ray(EmbedOptions(input=tmp_path / "data", output=tmp_path / "ray", chunk_size=10,
                                       cache_dir=tmp_path / "cache-ray"), num_workers=2)
    assert again.document["totals"]["parts_skipped"] == 3 and "actor_starts" not in again.document["ray"]


def test_one_file_without_chunk_size_is_shared_by_the_actors_in_chunks_cut_as_the_local_engines(tmp_path: Path) -> None:
    """Without --chunk-size a 300-row file is read in chunks of 64 rows, a few per actor (not one
    10,000-row chunk for one actor to embed while the other waits), with the chunk count and
    vectors of the local engine at that size (and Ray's blocks cut at it, which must not lose,
    repeat or reorder a row)."""
    src = write_parquet(tmp_path / "one.parquet", [{"id": i, "text": f"{SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)]} {i}"}
                                                   for i in range(300)])
    ray = run_embed_ray(EmbedOptions(input=src, output=tmp_path / "ray", cache_dir=tmp_path / "cache-ray"),
                        num_workers=2)
    meta = json.loads((tmp_path / "ray" / "_hfbatch" / "one.parquet.meta.json").read_text())
    assert meta["metrics"]["chunks"] == 5 and ray.document["ray"]["actor_starts"] >= 1  # ceil(300 / 64)
    local = run_embed_parts(EmbedOptions(input=tmp_path / "one.parquet", output=tmp_path / "local", chunk_size=64,
                                         cache_dir=tmp_path / "cache-local"))
    want_meta = json.loads((tmp_path / "local" / "_hfbatch" / "one.parquet.meta.json").read_text())
    assert want_meta["metrics"]["chunks"] == 5 and local.document["totals"]["rows_out"] == 300
    want, got = pq.read_table(tmp_path / "local" / "one.parquet"), pq.read_table(tmp_path / "ray" / "one.parquet")
    assert got.column("id").to_pylist() == list(range(300))
    assert np.abs(np.array(got.column("embedding").to_pylist()) - np.array(want.column("embedding").to_pylist())).max() < 1e-5


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


# --- an input replaced while the job reads it (issue 22, item 1) ---------------------------------

_OLD = [f"row {i}: {SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)]}" for i in range(40)]
_NEW = [t[::-1] for t in _OLD]  # as many rows and bytes, other texts


def _write_texts(path: Path, texts: list[str]) -> Path:
    staged = write_csv(path.with_name(f"staged-{path.name}"), [{"id": i, "text": t} for i, t in enumerate(texts)])
    os.replace(staged, path)  # (mv: another inode under the name)
    return path


def test_a_ray_part_replaced_mid_read_fails_alone_loses_its_earlier_output_and_the_rerun_embeds_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The identity of each part is taken in the driver before its first read and checked after its
    last. Here a.csv is replaced (mv) once the driver holds the actors' first rows of it: the read
    task has read at least its first chunk of the old file. Before the fix: exit 0, the old rows
    recorded with the new file's hash, and every rerun skipped the part. Now: that part fails (exit
    1, one line naming it), the output an earlier run made of it goes, b.csv is written, and the
    rerun embeds the new content."""
    data = tmp_path / "data"
    data.mkdir()
    a = _write_texts(data / "a.csv", [f"yesterday {t}" for t in _OLD])
    write_csv(data / "b.csv", [{"id": i, "text": f"b {t}"} for i, t in enumerate(_OLD[:12])])
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = ["embed", str(data), "-o", str(out), "--engine", "ray", "--num-workers", "1", "--chunk-size", "10",
            "--cache-dir", str(cache), "--quiet"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    assert (out / "a.parquet").is_file() and (out / "_hfbatch" / "a.parquet.meta.json").is_file()
    _write_texts(a, _OLD)  # today's input: the earlier output no longer describes it

    replaced: list[int] = []
    real_add = PartsWriter.add

    def add(self: PartsWriter, table) -> None:  # type: ignore[no-untyped-def]
        if not replaced and "a.csv" in table.column("__part").to_pylist():
            _write_texts(a, _NEW)
            replaced.append(1)
        real_add(self, table)

    monkeypatch.setattr(PartsWriter, "add", add)
    result = CliRunner().invoke(app, [a for a in args if a != "--quiet"])  # (--quiet prints no summary)
    assert replaced and result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    [line] = [x for x in result.output.splitlines() if "changed during the job" in x]
    assert "a.csv" in line and "Rerun" in line
    job = json.loads((out / "_hfbatch_job.json").read_text())
    status = {p["input"]: p for p in job["parts"]}
    assert status["a.csv"]["status"] == "failed" and "changed during the job" in status["a.csv"]["error"]
    assert status["a.csv"]["input_hash"] is None and status["b.csv"]["status"] == "skipped"
    # never recorded as done, and yesterday's output of it is gone: out/ holds what the job sidecar counts
    assert not (out / "a.parquet").exists() and not (out / "_hfbatch" / "a.parquet.meta.json").exists()
    assert ds.dataset(out).to_table().num_rows == job["totals"]["rows_out"] == 12
    assert [p.name for p in out.rglob("*tmp*")] == []

    monkeypatch.setattr(PartsWriter, "add", real_add)
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    status = {p["input"]: p for p in json.loads((out / "_hfbatch_job.json").read_text())["parts"]}
    assert status["a.csv"]["status"] == "done" and status["a.csv"]["input_hash"] == file_digest(a)
    assert pq.read_table(out / "a.parquet").column("text").to_pylist() == _NEW


@pytest.mark.parametrize("rows", [80, 25], ids=["more rows", "fewer rows"])
def test_a_ray_part_replaced_before_its_read_task_fails_whatever_its_row_count(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rows: int) -> None:
    """Replaced after the driver took its identity and counted its 40 rows, before the read task:
    the actors return the new file's rows. More rows than counted: the part fails at its commit, and
    rows of it still to come are dropped (before: recorded done, with a hash of a file the driver
    never checked). Fewer: the part never completes, and fails at the end as changed (before:
    "returned 25 rows of the 40", and the whole job failed). The other part is written either way."""
    data = tmp_path / "data"
    data.mkdir()
    a = _write_texts(data / "a.csv", _OLD)
    write_csv(data / "b.csv", [{"id": i, "text": f"b {t}"} for i, t in enumerate(_OLD[:12])])
    real = ray_module.open_files

    def replaced_after_the_check(opts, added):  # type: ignore[no-untyped-def]
        files = real(opts, added)  # the identity taken, the columns checked, the rows counted
        if opts.input.name == "a.csv":
            _write_texts(a, [_NEW[i % len(_NEW)] + f" {i}" for i in range(rows)])
        return files

    monkeypatch.setattr(ray_module, "open_files", replaced_after_the_check)
    out = tmp_path / "out"
    result = run_embed_ray(EmbedOptions(input=data, output=out, chunk_size=10, cache_dir=tmp_path / "cache"),
                           num_workers=1)
    status = {p["input"]: p for p in result.document["parts"]}
    assert status["a.csv"]["status"] == "failed" and "a.csv: changed during the job" in status["a.csv"]["error"]
    assert status["b.csv"]["status"] == "done" and result.document["finished"] is not None
    assert not (out / "a.parquet").exists() and not (out / "_hfbatch" / "a.parquet.meta.json").exists()
    assert ds.dataset(out).to_table().num_rows == result.document["totals"]["rows_out"] == 12


def test_a_sync_with_ray_equals_the_local_engines_and_commits_once(tmp_path: Path) -> None:
    """--engine ray into a Lance table by id: the driver plans, the actors embed only the changed
    rows, the driver commits once; the table equals the local engine's sync of the same days."""
    import lance

    src = tmp_path / "src"
    src.mkdir()
    write_jsonl(src / "a.jsonl", [{"id": i, "text": f"{SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)]} r{i}"} for i in range(30)])
    write_parquet(src / "b.parquet", [{"id": i, "text": f"second part row {i}"} for i in range(30, 50)])
    day2 = tmp_path / "day2"
    day2.mkdir()
    write_jsonl(day2 / "a.jsonl", [{"id": i, "text": f"{SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)]} r{i}" + (" edited" if i == 4 else "")}
                                   for i in range(30) if i != 9] + [{"id": 77, "text": "a new row"}])
    write_parquet(day2 / "b.parquet", [{"id": i, "text": f"second part row {i}"} for i in range(30, 50)])

    def sync(source: Path, target: Path, engine: str) -> dict:
        args = ["embed", str(source), "-o", str(target), "--id-column", "id", "--delete-missing", "--json",
                "--cache-dir", str(tmp_path / f"cache-{engine}-{source.name}-{target.name}"),
                *(["--engine", "ray", "--num-workers", "2"] if engine == "ray" else [])]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    by = {}
    for engine in ("ray", "local"):
        target = tmp_path / f"{engine}.lance"
        first = sync(src, target, engine)
        second = sync(day2, target, engine)
        assert first["metrics"]["sync"]["inserted"] == 50 and first["metrics"]["rows_total"] == 50
        assert {k: second["metrics"]["sync"][k] for k in ("inserted", "updated", "unchanged", "deleted")} == \
            {"inserted": 1, "updated": 1, "unchanged": 48, "deleted": 1}
        assert second["metrics"]["texts_computed"] == 2  # (a fresh cache: the edited row and the new one)
        assert lance.dataset(target).version == 2
        table = lance.dataset(target).to_table().sort_by("id")
        by[engine] = table
    assert by["ray"].column("id").to_pylist() == by["local"].column("id").to_pylist()
    assert by["ray"].column("_hfbatch_hash").to_pylist() == by["local"].column("_hfbatch_hash").to_pylist()
    a = np.asarray(by["ray"].column("embedding").to_pylist(), dtype=np.float32)
    b = np.asarray(by["local"].column("embedding").to_pylist(), dtype=np.float32)
    assert float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min()) >= 0.9999


def test_a_sync_with_ray_into_postgres_commits_once_and_lets_go_of_the_table(tmp_path: Path, pg: Any) -> None:
    """--engine ray into a Postgres table: the workers embed and write their rows into staging
    tables of their own, the driver merges them in one transaction (dropping them) and the rows
    equal the local engine's; a rerun with nothing changed (handed to the local engine) finds the
    table free; a killed run's staging tables go with the next run's lock."""

    rows = [{"id": i, "text": f"{SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)]} r{i}"} for i in range(40)]
    source = write_parquet(tmp_path / "in.parquet", rows)
    url = pg.url("by_ray")
    docs = []
    for _ in range(2):
        result = CliRunner().invoke(app, ["embed", str(source), "-o", url, "--id-column", "id", "--json",
                                          "--cache-dir", str(tmp_path / "cache"), "--engine", "ray",
                                          "--num-workers", "2", "--lock-timeout", "5"])
        assert result.exit_code == 0, result.output
        docs.append(json.loads(result.stdout))
    assert docs[0]["metrics"]["sync"]["inserted"] == 40 and docs[0]["ray"]["num_workers"] == 2
    assert docs[1]["metrics"]["sync"]["unchanged"] == 40 and docs[1]["metrics"]["texts_computed"] == 0
    with pg.connect() as conn:
        assert conn.execute("SELECT count(*), count(DISTINCT id), count(embedding) FROM by_ray").fetchone() == (40, 40, 40)
        assert conn.execute("SELECT version FROM hfbatch_targets WHERE table_name = 'by_ray'").fetchone() == (1,)
        held = conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'").fetchone()[0]
        vectors = dict(conn.execute("SELECT id, embedding::text FROM by_ray").fetchall())
        stages = conn.execute("SELECT count(*) FROM pg_tables WHERE tablename LIKE 'hfbatch\\_stage\\_%'").fetchone()[0]
    assert held == 0 and stages == 0  # the workers' staging tables went with the commit
    # the vectors the workers wrote are the model's own: the local engine's, into another table
    local = CliRunner().invoke(app, ["embed", str(source), "-o", pg.url("by_local"), "--id-column", "id",
                                     "--cache-dir", str(tmp_path / "cache-local")])
    assert local.exit_code == 0, local.output
    with pg.connect() as conn:
        rows = conn.execute("SELECT r.embedding <=> l.embedding FROM by_ray r JOIN by_local l USING (id)").fetchall()
    assert len(rows) == 40 and max(d for (d,) in rows) <= 1e-4 and len(vectors) == 40
    # a killed run's staging tables are dropped by the next run's lock
    with pg.connect() as conn:
        conn.execute("CREATE UNLOGGED TABLE hfbatch_stage_leftover (id bigint)")
    from hfbatch.io.targets import parse_target
    from hfbatch.io.targets.postgres import PgLocation, PostgresTarget

    target = PostgresTarget(parse_target(PgLocation(pg.url("by_ray"))))
    with pg.connect() as conn:
        conn.execute(f"ALTER TABLE hfbatch_stage_leftover RENAME TO {target.stage_prefix('dead00')}x")
    target.lock(0)
    target.close()
    with pg.connect() as conn:
        assert conn.execute("SELECT count(*) FROM pg_tables WHERE tablename LIKE 'hfbatch\\_stage\\_%'").fetchone()[0] == 0


@pytest.mark.parametrize("kind", ["sparse", "multivector"])
def test_ray_engine_runs_sparse_and_multivector_models_as_the_local_engine_does(
        tmp_path: Path, kind: str, request: pytest.FixtureRequest) -> None:
    """Issue 26: the other kinds go through the same parts, actors and writer: each part's rows as
    the local engine writes them (the actors load the model's own class from its folder)."""
    model = request.getfixturevalue(f"{kind}_model_dir")
    root = tmp_path / "data"
    root.mkdir()
    write_jsonl(root / "a.jsonl", [{"id": i, "text": f"{SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)]} a{i}"} for i in range(13)]
                + [{"id": 13, "text": None}])
    write_csv(root / "b.csv", [{"id": i, "text": f"csv row {i}, {SAMPLE_TEXTS[i % 3]}"} for i in range(9)])
    local = run_embed_parts(EmbedOptions(input=root, output=tmp_path / "local", model=str(model), chunk_size=5,
                                         cache_dir=tmp_path / "cache-local"))
    ray = run_embed_ray(EmbedOptions(input=root, output=tmp_path / "ray", model=str(model), chunk_size=5,
                                     cache_dir=tmp_path / "cache-ray"), num_workers=1)  # (one actor: each loads torch)
    assert ray.document["totals"]["parts_done"] == 2
    for record in local.document["parts"]:
        want = pq.read_table(tmp_path / "local" / record["output"])
        got = pq.read_table(tmp_path / "ray" / record["output"])
        assert got.schema.remove_metadata() == want.schema.remove_metadata()
        assert got.column("id").to_pylist() == want.column("id").to_pylist()
        assert got.column("n_tokens").to_pylist() == want.column("n_tokens").to_pylist()
        for g, w in zip(got.column("embedding").to_pylist(), want.column("embedding").to_pylist()):
            assert (g is None) == (w is None)
            if g is None:
                continue
            if kind == "sparse":
                assert g["indices"] == w["indices"]
                np.testing.assert_allclose(g["values"], w["values"], rtol=0, atol=1e-5 * max(w["values"]))
            else:
                np.testing.assert_allclose(np.array(g, np.float32), np.array(w, np.float32), atol=2e-3)
        meta = json.loads((tmp_path / "ray" / "_hfbatch" / (record["output"] + ".meta.json")).read_text())
        assert meta["provenance"]["vectors"]["kind"] == kind


def test_ray_engine_scores_pairs_into_one_output_as_the_local_engine_does(
        tmp_path: Path, cross_encoder_model_dir: Path) -> None:
    """Issue 26: `hfbatch score --engine ray` -- a directory of parts read as one input, pairs
    deduped and windowed by the actors as the local engine does, rows back in input order into
    one output (and --rerank's ranks over every part), with the sidecar of the same job."""
    from hfbatch import ScoreOptions, score, verify

    long_doc = "The copper kettle whistles " + "and whistles, louder and louder, " * 60 + "until someone comes."
    queries = ["a kettle that boils fast", "broken on arrival", "good value"]
    rows = [{"id": i, "query": queries[i % 3], "text": f"{SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)]} d{i % 7}"}
            for i in range(26)]
    rows[4]["text"] = long_doc  # scored in windows
    rows[9]["text"] = None  # marked, kept
    rows[7] = dict(rows[6], id=7)  # the same pair twice in one chunk: scored once
    root = tmp_path / "pairs"
    root.mkdir()
    write_jsonl(root / "a.jsonl", rows[:11])
    write_csv(root / "b.csv", [{**r, "text": r["text"] or ""} for r in rows[11:]])
    common = dict(model=str(cross_encoder_model_dir), chunk_size=4)
    for rerank in (None, 2):
        local = score(ScoreOptions(input=root, output=tmp_path / f"local-{rerank}.parquet", rerank=rerank,
                                   cache_dir=tmp_path / f"cache-local-{rerank}", **common))
        out = tmp_path / f"ray-{rerank}.parquet"
        args = ["score", root, "-o", out, "--model", cross_encoder_model_dir, "--chunk-size", 4,
                "--cache-dir", tmp_path / f"cache-ray-{rerank}", "--engine", "ray", "--num-workers", 1 if rerank else 2,
                *(["--rerank", rerank] if rerank else [])]
        result = CliRunner().invoke(app, [str(a) for a in args])
        assert result.exit_code == 3, result.output  # (the marked rows)
        want, got = pq.read_table(local.output), pq.read_table(out)
        assert got.schema.remove_metadata() == want.schema.remove_metadata()
        for name in want.schema.names:
            if name == "score":
                np.testing.assert_allclose(np.array(got.column(name).to_pylist(), dtype=float),
                                           np.array(want.column(name).to_pylist(), dtype=float), rtol=0, atol=1e-5)
            else:
                assert got.column(name).to_pylist() == want.column(name).to_pylist(), name
        meta = json.loads(Path(f"{out}.meta.json").read_text())
        assert meta["provenance"]["engine"] == "ray" and meta["ray"]["actor_starts"] >= 1
        for key in ("rows_total", "rows_invalid", "rows_written", "texts_computed"):
            assert meta["metrics"][key] == local.document["metrics"][key], key
        assert meta["provenance"]["activation"] == local.document["provenance"]["activation"]
        if rerank:
            assert meta["provenance"]["rerank"] == local.document["provenance"]["rerank"]
            assert set(got.column("rank").to_pylist()) == {1, 2, None}
        else:
            assert got.column("n_windows").to_pylist()[4] > 1 and got.column("score_error").to_pylist()[9]
    report = verify(tmp_path / "ray-None.parquet")
    assert report["ok"], report
    # a bad row fails the job as the local engine does: exit 2, its row and column named, nothing written
    failed = CliRunner().invoke(app, [str(a) for a in ["score", root, "-o", tmp_path / "fail.parquet", "--model",
                                                         cross_encoder_model_dir, "--on-invalid", "fail", "--engine",
                                                         "ray", "--num-workers", 1, "--no-cache"]])
    assert failed.exit_code == 2, failed.output
    assert "row 10" in failed.stderr and "'text'" in failed.stderr and "Ray job failed" not in failed.stderr
    assert not (tmp_path / "fail.parquet").exists()


def test_chunks_are_shared_by_the_actors_and_too_many_actors_are_refused(tmp_path: Path) -> None:
    from hfbatch.engines.ray import shared_chunk_size

    opts = EmbedOptions(input="x.csv", output="y.parquet", chunk_size=10_000)
    assert shared_chunk_size(opts, given=None, rows=2000, workers=2).chunk_size == 250  # 4 chunks an actor
    assert shared_chunk_size(opts, given=None, rows=100, workers=2).chunk_size == 64  # at least 64 rows
    assert shared_chunk_size(replace(opts, chunk_size=16), given=None, rows=2000, workers=2).chunk_size == 16  # kept
    assert shared_chunk_size(opts, given=10_000, rows=2000, workers=2).chunk_size == 10_000  # --chunk-size given
    src = write_csv(tmp_path / "in.csv", [{"id": 1, "text": "one"}])
    refused = CliRunner().invoke(app, ["embed", str(src), "-o", str(tmp_path / "out"), "--engine", "ray",
                                       "--num-workers", "400"])
    assert refused.exit_code == 2 and "--num-workers 400" in refused.stderr, refused.output


def test_a_sigterm_mid_ray_job_cleans_up_and_says_so(tmp_path: Path, cross_encoder_model_dir: Path) -> None:
    """ray.init takes the process's SIGTERM handler; hfbatch puts its own back, so a job killed
    while Ray scores (its rows arriving: the --rerank spill exists) leaves nothing beside the
    output (no joined copy of the parts, no spill), says so in its line, and exits 143."""
    import signal
    import subprocess
    import sys
    import time

    root = tmp_path / "pairs"
    root.mkdir()
    rows = [{"id": i, "query": f"query {i % 5}", "text": f"{SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)]} {i}"} for i in range(400)]
    write_jsonl(root / "a.jsonl", rows[:200])
    write_jsonl(root / "b.jsonl", rows[200:])
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "hfbatch", "score", str(root), "-o", str(out_dir / "s.parquet"),
                             "--model", str(cross_encoder_model_dir), "--engine", "ray", "--num-workers", "1",
                             "--rerank", "2", "--no-cache", "--chunk-size", "16", "--quiet"],
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 240
    while not any(p.name.endswith(".hfbatch-tmp") for p in out_dir.iterdir()):  # rows arrived: after ray.init
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "no rows arrived from Ray in 240 s"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-2000:]
    assert "terminated (SIGTERM)" in stderr and "Traceback" not in stderr
    assert sorted(p.name for p in out_dir.iterdir()) == []
