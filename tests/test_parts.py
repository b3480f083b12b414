"""Many input files: a directory or glob of parts, shards, resume after an interruption, merge-meta."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from conftest import SAMPLE_TEXTS, write_csv, write_jsonl, write_parquet
from hfbatch import EmbedOptions, InputError
from hfbatch.engines import parts as parts_module
from hfbatch.cli import app
from hfbatch.engines.parts import merge_job_sidecars, run_embed_parts
from hfbatch.io.parts import expand_inputs, parse_shard, shard_of

WORDS = "kettle lid battery cable strap zipper screen hinge charger pocket seam button".split()


def _texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.choice(SAMPLE_TEXTS)} {' '.join(rng.sample(WORDS, 3))} #{seed}-{i}" for i in range(n)]


def _dataset(root: Path) -> list[tuple[str, list[str]]]:
    """Parts of mixed size and format, one nested, plus files that are not parts."""
    layout = [("a.parquet", 7), ("b.jsonl", 1), ("c.csv", 12), ("nested/d.parquet", 4), ("nested/e.jsonl.gz", 3)]
    made = []
    for seed, (name, n) in enumerate(layout):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        texts = _texts(n, seed)
        rows = [{"id": f"{name}:{i}", "text": t} for i, t in enumerate(texts)]
        if name.endswith(".gz"):
            import gzip

            path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
        else:
            {"parquet": write_parquet, "jsonl": write_jsonl, "csv": write_csv}[name.rsplit(".", 1)[1]](path, rows)
        made.append((name, texts))
    (root / "README.txt").write_text("not a part")
    (root / "_SUCCESS").write_text("")
    return made


def _vectors(path: Path) -> tuple[list[str], np.ndarray]:
    table = pq.read_table(path)
    return table.column("id").to_pylist(), np.array(table.column("embedding").to_pylist(), dtype=np.float32)


def test_a_directory_of_parts_equals_the_single_file_row_for_row(tmp_path: Path) -> None:
    made = _dataset(tmp_path / "data")
    result = run_embed_parts(EmbedOptions(input=tmp_path / "data", output=tmp_path / "out", chunk_size=5,
                                          cache_dir=tmp_path / "cache-parts"))
    t = result.document["totals"]
    assert (t["parts"], t["parts_done"], t["rows_in"], t["rows_out"]) == (5, 5, 27, 27)
    assert sorted(p["output"] for p in result.document["parts"]) == [
        "a.parquet", "b.parquet", "c.parquet", "nested/d.parquet", "nested/e.parquet"]
    ids, vectors = [], []
    for name, _ in made:
        got_ids, got = _vectors(tmp_path / "out" / (name.split(".")[0] + ".parquet"))
        ids += got_ids
        vectors.append(got)
    everything = [{"id": f"{name}:{i}", "text": t} for name, texts in made for i, t in enumerate(texts)]
    import hfbatch

    one = hfbatch.embed(EmbedOptions(input=write_parquet(tmp_path / "all.parquet", everything), output=tmp_path / "all.out.parquet",
                                  cache_dir=tmp_path / "cache-single"))
    want_ids, want = _vectors(one.output)
    assert ids == want_ids  # every row once, in order within its part
    assert np.abs(np.concatenate(vectors) - want).max() < 1e-5
    sidecar = json.loads(result.sidecar.read_text())
    assert sidecar["parts_in_input"] == 5 and sidecar["shard"] == "1/1"
    assert all((tmp_path / "out" / "_hfbatch" / (p["output"] + ".meta.json")).is_file() for p in sidecar["parts"])
    assert {p.relative_to(tmp_path / "out").parts[0] for p in (tmp_path / "out").rglob("*.json")} == {"_hfbatch", "_hfbatch_job.json"}


def test_four_shards_cover_every_part_exactly_once(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    for i in range(12):  # more parts than shards, so the hash spreads them
        write_jsonl(tmp_path / "data" / f"part-{i:03d}.jsonl", [{"id": i, "text": t} for t in _texts(2, i)])
    spec = str(tmp_path / "data" / "part-*.jsonl")
    owners = [shard_of(f"part-{i:03d}.jsonl", 4) for i in range(12)]
    assert len(set(owners)) > 1  # not all on one host
    for index in range(1, 5):
        run_embed_parts(EmbedOptions(input=spec, output=tmp_path / "out", cache_dir=tmp_path / "cache"), shard=(index, 4))
    root, parts = expand_inputs(spec)
    merged = merge_job_sidecars(tmp_path / "out", [str(p.relative_to(root)) for p in parts])
    assert merged["complete"], merged["problems"]
    assert (merged["parts"], merged["rows_in"], merged["rows_out"]) == (12, 24, 24)
    assert len(list((tmp_path / "out").glob("part-*.parquet"))) == 12
    ok = CliRunner().invoke(app, ["merge-meta", str(tmp_path / "out"), "--input", spec, "--json"])
    assert ok.exit_code == 0 and json.loads(ok.stdout)["rows_out"] == 24
    (tmp_path / "out" / "_hfbatch_job.shard-2-of-4.json").unlink()  # one host never ran
    missing = CliRunner().invoke(app, ["merge-meta", str(tmp_path / "out"), "--input", spec])
    assert missing.exit_code == 1 and "is in no sidecar" in missing.stderr
    assert sum(o == 2 for o in owners) == missing.stderr.count("is in no sidecar")


def test_an_interrupted_job_resumes_without_recomputing_finished_parts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _dataset(tmp_path / "data")
    options = EmbedOptions(input=tmp_path / "data", output=tmp_path / "out", cache_dir=tmp_path / "cache")
    real, calls = parts_module.run_embed, []

    def killed_on_third(opts, **kw):  # type: ignore[no-untyped-def]
        calls.append(opts.input)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(opts, **kw)

    monkeypatch.setattr(parts_module, "run_embed", killed_on_third)
    with pytest.raises(KeyboardInterrupt):
        run_embed_parts(options)
    monkeypatch.setattr(parts_module, "run_embed", real)
    interrupted = json.loads((tmp_path / "out" / "_hfbatch_job.json").read_text())
    assert [p["status"] for p in interrupted["parts"]] == ["done", "done"] and interrupted["finished"] is None
    write_csv(tmp_path / "data" / "c.csv", [{"id": "c:0", "text": "changed since the first run"}])  # not yet embedded
    write_jsonl(tmp_path / "data" / "b.jsonl", [{"id": "b:0", "text": "b changed after it was embedded"}])
    again = run_embed_parts(options)
    status = {p["input"]: (p["status"], p["texts_computed"]) for p in again.document["parts"]}
    assert status["a.parquet"] == ("skipped", 0)  # finished before the kill and unchanged: not even read
    assert status["b.jsonl"] == ("done", 1)  # its bytes changed: embedded again
    assert status["c.csv"][0] == "done" and status["nested/d.parquet"][0] == "done"
    assert again.document["totals"]["parts_skipped"] == 1 and again.document["finished"]
    other = run_embed_parts(EmbedOptions(input=tmp_path / "data", output=tmp_path / "out", cache_dir=tmp_path / "cache",
                                         normalize=False))
    assert other.document["totals"]["parts_skipped"] == 0  # other options: nothing is taken as complete


def test_a_bad_part_fails_alone_and_the_cli_exits_1(tmp_path: Path) -> None:
    _dataset(tmp_path / "data")
    write_csv(tmp_path / "data" / "zz-bad.csv", [{"id": 1, "body": "no text column here"}])
    result = CliRunner().invoke(app, ["embed", str(tmp_path / "data"), "-o", str(tmp_path / "out"), "--cache-dir",
                                      str(tmp_path / "cache")])
    assert result.exit_code == 1, result.output
    assert "zz-bad.csv" in result.stderr and "has no column 'text'" in result.stderr
    doc = json.loads((tmp_path / "out" / "_hfbatch_job.json").read_text())
    assert doc["totals"]["parts_done"] == 5 and doc["totals"]["parts_failed"] == 1
    assert (tmp_path / "out" / "a.parquet").is_file() and not (tmp_path / "out" / "zz-bad.parquet").exists()


def test_cli_refusals_for_many_parts(tmp_path: Path) -> None:
    _dataset(tmp_path / "data")
    runner = CliRunner()
    as_file = runner.invoke(app, ["embed", str(tmp_path / "data"), "-o", str(tmp_path / "x.parquet")])
    assert as_file.exit_code == 2 and "the output is a directory" in as_file.stderr
    one_file = runner.invoke(app, ["embed", str(tmp_path / "data" / "a.parquet"), "-o", str(tmp_path / "o"), "--shard", "1/2"])
    assert one_file.exit_code == 2 and "is one file" in one_file.stderr
    zero = runner.invoke(app, ["embed", str(tmp_path / "data"), "-o", str(tmp_path / "o"), "--shard", "0/4"])
    assert zero.exit_code == 2 and "numbered 1..N" in zero.stderr
    nothing = runner.invoke(app, ["embed", str(tmp_path / "data" / "*.xml"), "-o", str(tmp_path / "o")])
    assert nothing.exit_code == 2 and "no CSV, JSONL or Parquet files" in nothing.stderr
    with pytest.raises(InputError, match="give it as I/N"):
        parse_shard("3-8")


def test_a_many_part_output_is_a_parquet_dataset_read_with_no_options(tmp_path: Path) -> None:
    """pyarrow and pandas (like Polars, DuckDB, Spark and `datasets`) read out/ as one dataset, because
    what is not data starts with `_`: the part sidecars under _hfbatch/ and the job sidecar. Beside
    the parts, the sidecars failed every reader with "Parquet magic bytes not found"."""
    import pandas as pd

    made = _dataset(tmp_path / "data")
    result = run_embed_parts(EmbedOptions(input=tmp_path / "data", output=tmp_path / "out", cache_dir=tmp_path / "cache"))
    table = ds.dataset(tmp_path / "out").to_table()
    frame = pd.read_parquet(tmp_path / "out")
    ids = sorted(f"{name}:{i}" for name, texts in made for i in range(len(texts)))
    assert table.num_rows == len(frame) == len(ids) == result.document["totals"]["rows_out"] == 27
    assert sorted(table.column("id").to_pylist()) == sorted(frame["id"]) == ids
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 384)


def test_parts_with_one_stem_keep_their_rows_and_a_renamed_output_is_not_left_behind(tmp_path: Path) -> None:
    """a.csv and a.jsonl in one directory both wrote out/a.parquet: the CSV's rows were lost, the
    job sidecar said done for both and merge-meta said complete. Now each keeps its whole name,
    and the a.parquet an earlier run wrote (before a.csv came) goes, or a reader of out/ would
    read a.jsonl's rows twice."""
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    write_jsonl(data / "a.jsonl", [{"id": f"jsonl:{i}", "text": t} for i, t in enumerate(_texts(4, 1))])
    options = EmbedOptions(input=data, output=out, cache_dir=tmp_path / "cache")
    run_embed_parts(options)
    assert (out / "a.parquet").is_file() and (out / "_hfbatch" / "a.parquet.meta.json").is_file()
    write_csv(data / "a.csv", [{"id": f"csv:{i}", "text": t} for i, t in enumerate(_texts(3, 2))])
    second = run_embed_parts(options)
    assert {p["input"]: p["output"] for p in second.document["parts"]} == {"a.csv": "a.csv.parquet", "a.jsonl": "a.jsonl.parquet"}
    assert pq.read_table(out / "a.csv.parquet").column("id").to_pylist() == ["csv:0", "csv:1", "csv:2"]
    assert pq.read_table(out / "a.jsonl.parquet").column("id").to_pylist() == [f"jsonl:{i}" for i in range(4)]
    assert not (out / "a.parquet").exists() and not (out / "_hfbatch" / "a.parquet.meta.json").exists()
    assert ds.dataset(out).to_table().num_rows == second.document["totals"]["rows_out"] == 7  # the totals are the rows on disk
    merged = merge_job_sidecars(out, ["a.csv", "a.jsonl"])
    assert merged["complete"], merged["problems"]
    assert merged["rows_out"] == 7
    again = run_embed_parts(options)
    assert [p["status"] for p in again.document["parts"]] == ["skipped", "skipped"]


def test_merge_meta_refuses_two_parts_recorded_with_one_output(tmp_path: Path) -> None:
    """The job sidecar the collision wrote (both parts done, one file): merge-meta said complete."""
    out = tmp_path / "out"
    out.mkdir()
    pq.write_table(pa.table({"id": [0, 1, 2]}), out / "a.parquet")
    parts = [{"input": name, "output": output, "status": "done", "rows_in": 3, "rows_out": 3}
             for name, output in (("a.csv", "a.parquet"), ("a.jsonl", "a.parquet"), ("b.csv", "b.parquet"))]
    (out / "_hfbatch_job.json").write_text(json.dumps({"options_key": "k", "shard": "1/1", "parts": parts}))
    merged = merge_job_sidecars(out, ["a.csv", "a.jsonl", "b.csv"])
    assert not merged["complete"]
    assert merged["problems"] == ["a.parquet is the output of 2 parts (a.csv, a.jsonl): only the last one's rows are there",
                                  f"b.parquet (of b.csv) is not in {out}"]


def test_every_path_of_a_many_part_job_is_planned_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--log-file naming an input part was appended to, then read back as data; -o inside the input
    directory is read back as parts by the next run. Both are refused (exit 2), nothing written."""
    data, out = tmp_path / "data", tmp_path / "out"
    _dataset(data)
    before = {p: p.read_bytes() for p in data.rglob("*") if p.is_file()}
    monkeypatch.setattr(parts_module, "run_embed", lambda *a, **k: pytest.fail("a part ran"))
    with pytest.raises(InputError, match=f"--log-file {data / 'b.jsonl'} is the input"):
        run_embed_parts(EmbedOptions(input=str(data / "*.*"), output=out, log_file=data / "b.jsonl"))
    with pytest.raises(InputError, match="--log-file .* is inside the input directory"):
        run_embed_parts(EmbedOptions(input=data, output=out, log_file=data / "run.log"))
    with pytest.raises(InputError, match="inside the input directory"):
        run_embed_parts(EmbedOptions(input=data, output=data / "out"))
    inside = CliRunner().invoke(app, ["embed", str(data), "-o", str(data / "out")])
    assert inside.exit_code == 2 and "inside the input directory" in inside.stderr
    assert {p: p.read_bytes() for p in data.rglob("*") if p.is_file()} == before and not out.exists()


def test_a_part_that_fails_on_rerun_loses_its_earlier_output(tmp_path: Path) -> None:
    """Its rows no longer describe its input: left in out/, a reader would get rows the job sidecar
    does not count."""
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    write_jsonl(data / "a.jsonl", [{"id": i, "text": t} for i, t in enumerate(_texts(2, 1))])
    write_csv(data / "b.csv", [{"id": i, "text": t} for i, t in enumerate(_texts(3, 2))])
    options = EmbedOptions(input=data, output=out, cache_dir=tmp_path / "cache")
    run_embed_parts(options)
    write_csv(data / "b.csv", [{"id": 0, "body": "the text column is gone"}])
    again = run_embed_parts(options)
    assert [p["status"] for p in again.document["parts"]] == ["skipped", "failed"]
    assert not (out / "b.parquet").exists() and not (out / "_hfbatch" / "b.parquet.meta.json").exists()
    assert ds.dataset(out).to_table().num_rows == again.document["totals"]["rows_out"] == 2


def test_a_job_from_before_the_hfbatch_folder_moves_to_the_dataset_layout(tmp_path: Path) -> None:
    """Earlier versions kept each part's sidecar beside it (out/a.parquet.meta.json): a rerun removes
    those (and embeds the parts again, from the cache), so out/ becomes a dataset."""
    data, out = tmp_path / "data", tmp_path / "out"
    _dataset(data)
    options = EmbedOptions(input=data, output=out, cache_dir=tmp_path / "cache")
    run_embed_parts(options)
    for sidecar in (out / "_hfbatch").rglob("*.meta.json"):  # what the old layout left
        sidecar.replace(out / sidecar.relative_to(out / "_hfbatch"))
    job = json.loads((out / "_hfbatch_job.json").read_text())
    del job["part_sidecars"], job["input_id"]
    (out / "_hfbatch_job.json").write_text(json.dumps(job))
    again = run_embed_parts(options)
    assert again.document["totals"]["parts_done"] == 5 and again.document["totals"]["texts_computed"] == 0
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.meta.json")) == [
        "_hfbatch/a.parquet.meta.json", "_hfbatch/b.parquet.meta.json", "_hfbatch/c.parquet.meta.json",
        "_hfbatch/nested/d.parquet.meta.json", "_hfbatch/nested/e.parquet.meta.json"]
    assert ds.dataset(out).to_table().num_rows == 27


_EXPAND = "import json, sys; from hfbatch.io.parts import expand_inputs; print(json.dumps([str(p) for p in expand_inputs(sys.argv[1])[1]]))"


def _expand_with_deadline(pattern: str) -> list[str]:
    """expand_inputs in a child process, so a glob that hangs fails the test instead of the run."""
    done = subprocess.run([sys.executable, "-c", _EXPAND, pattern], capture_output=True, text=True, timeout=60, check=True)
    return json.loads(done.stdout)


def test_a_quoted_glob_does_not_follow_symlink_loops(tmp_path: Path) -> None:
    """glob.glob followed directory symlinks: one loop listed a file 41 times (loop/loop/...), two
    loops never returned. A glob now walks like a directory input: directory symlinks are not entered."""
    one, two = tmp_path / "one", tmp_path / "two"
    for root in (one, two):
        (root / "sub").mkdir(parents=True)
        write_csv(root / "a.csv", [{"id": 0, "text": "a"}])
        write_csv(root / "sub" / "b.csv", [{"id": 1, "text": "b"}])
    (one / "loop").symlink_to(".", target_is_directory=True)
    (two / "back").symlink_to(".", target_is_directory=True)
    (two / "sub" / "up").symlink_to("..", target_is_directory=True)
    (two / "linked.csv").symlink_to(two / "a.csv")  # a symlink to a file is a part, as in a directory input
    assert _expand_with_deadline(str(one / "**" / "*.csv")) == [str(one / "a.csv"), str(one / "sub" / "b.csv")]
    assert _expand_with_deadline(str(two / "**" / "*.csv")) == [str(two / p) for p in ("a.csv", "linked.csv", "sub/b.csv")]
    assert _expand_with_deadline(str(two / "**")) == [str(two / p) for p in ("a.csv", "linked.csv", "sub/b.csv")]
    assert _expand_with_deadline(str(two / "*" / "*.csv")) == [str(two / "sub" / "b.csv")]  # not back/a.csv
    assert expand_inputs(two)[1] == [two / p for p in ("a.csv", "linked.csv", "sub/b.csv")]  # the same rule


@pytest.mark.parametrize("flags, code, message", [
    (["--backend", "tei"], 2, "--endpoint"),  # a usage error found by the backend
    (["--model", "no/such-model-here"], 1, "no/such-model-here"),  # a model that cannot be found
])
def test_a_usage_error_on_a_rerun_ends_the_job_and_keeps_every_finished_part(tmp_path: Path, flags: list[str],
                                                                             code: int, message: str) -> None:
    """It marked every part failed and deleted the outputs of the earlier run (exit 1)."""
    _dataset(tmp_path / "data")
    runner = CliRunner()
    first = runner.invoke(app, ["embed", str(tmp_path / "data"), "-o", str(tmp_path / "out"), "--quiet"])
    assert first.exit_code == 0, first.output
    before = {p: p.read_bytes() for p in (tmp_path / "out").rglob("*.parquet")}
    assert len(before) == 5
    again = runner.invoke(app, ["embed", str(tmp_path / "data"), "-o", str(tmp_path / "out"), *flags])
    assert again.exit_code == code, again.output
    assert message in again.stderr and "failed:" not in again.output
    assert {p: p.read_bytes() for p in (tmp_path / "out").rglob("*.parquet")} == before


def test_the_job_key_names_the_endpoint_without_its_credentials() -> None:
    from hfbatch.engines.parts import options_key

    def key(endpoint: str) -> str:
        return options_key(EmbedOptions(input=Path("in.csv"), output=Path("out"), backend="tei", endpoint=endpoint))

    assert key("http://u:pw1@gpu-box:8080") == key("http://u:pw2@gpu-box:8080") == key("http://gpu-box:8080")
    assert key("http://gpu-box:8080") != key("http://other-box:8080")


def test_int8_ranges_come_from_the_job_across_parts_and_a_part_on_another_grid_is_embedded_again(tmp_path: Path) -> None:
    """The ranges are the job's first --calibration-size vectors across its parts (a first part of
    one row does not make them), every part shares them, and a rerun whose ranges changed (the
    first part changed) embeds again every part recorded with the old ones, not only that part."""
    root = tmp_path / "data"
    root.mkdir()
    write_jsonl(root / "a.jsonl", [{"id": 0, "text": SAMPLE_TEXTS[0]}])
    write_jsonl(root / "b.jsonl", [{"id": i, "text": f"{SAMPLE_TEXTS[i % 8]} b{i}"} for i in range(30)])
    options = EmbedOptions(input=root, output=tmp_path / "out", output_precision="int8", calibration_size=20,
                           cache_dir=tmp_path / "c")
    first = run_embed_parts(options)
    metas = {p: json.loads((tmp_path / "out" / "_hfbatch" / f"{p}.parquet.meta.json").read_text()) for p in "ab"}
    ranges = [m["provenance"]["vectors"]["ranges"] for m in metas.values()]
    assert ranges[0] == ranges[1] and metas["a"]["provenance"]["vectors"]["calibration"]["vectors"] == 20
    codes = np.array(pq.read_table(tmp_path / "out" / "b.parquet").column("embedding").to_pylist())
    assert len({tuple(row) for row in codes}) == 30  # distinct rows keep distinct codes
    assert first.document["totals"]["parts_done"] == 2
    write_jsonl(root / "a.jsonl", [{"id": i, "text": f"something else entirely, number {i}"} for i in range(25)])
    again = run_embed_parts(options)
    assert again.document["totals"]["parts_done"] == 2 and again.document["totals"]["parts_skipped"] == 0
    metas = {p: json.loads((tmp_path / "out" / "_hfbatch" / f"{p}.parquet.meta.json").read_text()) for p in "ab"}
    assert metas["a"]["provenance"]["vectors"]["ranges"] == metas["b"]["provenance"]["vectors"]["ranges"] != ranges[0]
    third = run_embed_parts(options)
    assert third.document["totals"]["parts_skipped"] == 2  # same grid: resumed


def test_a_local_part_whose_file_and_sidecar_are_not_one_runs_is_embedded_again(tmp_path: Path) -> None:
    """A run killed between the two renames of a part's publish (data, then sidecar) leaves the new
    file beside the earlier sidecar, with the same rows and input hash: resume went by those and
    skipped the part for good. Now the provenance the Parquet file carries (read with its row count
    from the footer) must be the sidecar's, so the part is embedded again."""
    data = tmp_path / "in"
    data.mkdir()
    write_csv(data / "a.csv", [{"id": i, "text": t} for i, t in enumerate(_texts(5, 1))])
    write_csv(data / "b.csv", [{"id": i, "text": t} for i, t in enumerate(_texts(3, 2))])
    options = EmbedOptions(input=data, output=tmp_path / "out", cache_dir=tmp_path / "cache")
    run_embed_parts(options)
    a = tmp_path / "out" / "a.parquet"
    table = pq.read_table(a)
    provenance = json.loads(pq.ParquetFile(a).metadata.metadata[b"hfbatch"])
    provenance["provenance"]["started"] = provenance["provenance"]["finished"] = "a later run"
    with pq.ParquetWriter(a, table.schema) as writer:  # the same rows, another run's provenance
        writer.write_table(table)
        writer.add_key_value_metadata({"hfbatch": json.dumps(provenance)})
    again = run_embed_parts(options)
    assert {p["input"]: p["status"] for p in again.document["parts"]} == {"a.csv": "done", "b.csv": "skipped"}
    meta = json.loads((tmp_path / "out" / "_hfbatch" / "a.parquet.meta.json").read_text())
    assert json.loads(pq.ParquetFile(a).metadata.metadata[b"hfbatch"])["provenance"]["started"] == meta["provenance"]["started"]
