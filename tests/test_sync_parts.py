"""A sync by --id-column whose input is many parts (a directory or a glob): the parts are read as
one input, so one run sees every id (its deletes, its one commit), whatever format each part is."""

from __future__ import annotations

import json
from pathlib import Path

import lance
import pytest
from typer.testing import CliRunner

from conftest import write_jsonl, write_parquet
from hfbatch.cli import app

TEXTS = [f"part review {i}: the lid {'sealed' if i % 3 else 'leaked'} on day {i}" for i in range(40)]


def run(*args: object) -> tuple[int, str]:
    """(exit code, stdout) of `hfbatch embed ARGS`; stderr's lines (a warning, an error) follow stdout's."""
    result = CliRunner().invoke(app, ["embed", *map(str, args)])
    return result.exit_code, result.stdout if "--json" in args and result.exit_code == 0 else result.output


def test_parts_of_two_formats_sync_as_one_input_and_a_part_gone_deletes_its_ids(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    write_parquet(src / "a.parquet", [{"id": i, "text": TEXTS[i]} for i in range(20)])
    write_jsonl(src / "b.jsonl", [{"id": i, "text": TEXTS[i]} for i in range(20, 40)])
    target = tmp_path / "t.lance"
    code, out = run(src, "-o", target, "--id-column", "id", "--json")
    assert code == 0, out
    assert json.loads(out)["metrics"]["sync"]["inserted"] == 40
    assert sorted(lance.dataset(target).to_table(columns=["id"]).column("id").to_pylist()) == list(range(40))

    (src / "b.jsonl").unlink()  # a part gone: its ids go with --delete-missing, in the run's one commit
    write_jsonl(src / "c.jsonl", [{"id": 100, "text": "a review from a new part"}])
    code, out = run(f"{src}/*.*", "-o", target, "--id-column", "id", "--delete-missing", "--max-delete-fraction", "0.6",
                    "--json")
    assert code == 0, out
    document = json.loads(out)
    assert {k: document["metrics"]["sync"][k] for k in ("inserted", "deleted", "unchanged")} == \
        {"inserted": 1, "deleted": 20, "unchanged": 20}
    assert document["metrics"]["texts_computed"] <= 1  # the new part's text (or a cache hit), nothing else
    assert lance.dataset(target).version == 2
    assert sorted(lance.dataset(target).to_table(columns=["id"]).column("id").to_pylist()) == [*range(20), 100]


@pytest.mark.parametrize("second", [["x"], [1.5]], ids=["text-ids", "float-ids"])
def test_ids_of_another_type_in_a_later_part_are_refused_naming_it(tmp_path: Path, second: list) -> None:
    src = tmp_path / "src"
    src.mkdir()
    write_jsonl(src / "a.jsonl", [{"id": i, "text": TEXTS[i]} for i in range(5)])
    write_jsonl(src / "b.jsonl", [{"id": v, "text": "odd id"} for v in second])
    code, out = run(src, "-o", tmp_path / "t.lance", "--id-column", "id")
    assert code == 2, out
    assert "b.jsonl" in out and "'id'" in out and "Traceback" not in out
    assert not (tmp_path / "t.lance").exists()


def test_shards_and_ray_with_split_are_refused_for_a_sync_in_one_line(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    write_jsonl(src / "a.jsonl", [{"id": 1, "text": "x"}])
    for extra, named in ((["--shard", "1/2"], "--shard"), (["--engine", "ray", "--split", "tokens:16"], "--split")):
        code, out = run(src, "-o", tmp_path / "t.lance", "--id-column", "id", *extra)
        assert code == 2 and named in out and len(out.strip().splitlines()) == 1, out
        assert not (tmp_path / "t.lance").exists()


def test_a_dry_run_of_a_sync_counts_only_what_would_change_and_writes_nothing(tmp_path: Path) -> None:
    day1 = write_parquet(tmp_path / "d1.parquet", [{"id": i, "text": TEXTS[i]} for i in range(40)])
    target = tmp_path / "t.lance"
    assert run(day1, "-o", target, "--id-column", "id")[0] == 0
    day2 = write_parquet(tmp_path / "d2.parquet", [{"id": i, "text": TEXTS[i] + (" (edited)" if i < 3 else "")}
                                                   for i in range(35)] + [{"id": 99, "text": "brand new"}])
    code, out = run(day2, "-o", target, "--id-column", "id", "--delete-missing", "--dry-run", "--json")
    assert code == 0, out
    report = json.loads(out)
    assert {k: report["sync"][k] for k in ("inserted", "updated", "unchanged", "deleted")} == \
        {"inserted": 1, "updated": 3, "unchanged": 32, "deleted": 5}
    assert report["cache"]["texts_to_compute"] == 4  # the changed and the new rows' texts, not the 32 others
    assert lance.dataset(target).version == 1  # nothing written
    code, out = run(day2, "-o", target, "--id-column", "id", "--delete-missing", "--max-delete-fraction", "0.1",
                    "--dry-run")
    assert code == 2 and "--max-delete-fraction" in out and len(out.strip().splitlines()) == 1, out


def test_verify_of_a_table_says_what_it_checks_in_one_line(tmp_path: Path) -> None:
    day1 = write_parquet(tmp_path / "d1.parquet", [{"id": i, "text": TEXTS[i]} for i in range(5)])
    assert run(day1, "-o", tmp_path / "t.lance", "--id-column", "id")[0] == 0
    result = CliRunner().invoke(app, ["verify", str(tmp_path / "t.lance")])
    assert result.exit_code == 2 and "hfbatch search" in result.output and "Traceback" not in result.output


# --- found by review: each once a wrong row kept or a count untrue ---------------------------------


def _ids(target: Path) -> list:
    return sorted(lance.dataset(target).to_table(columns=["id"]).column("id").to_pylist())


def test_a_changed_row_skipped_as_invalid_leaves_the_table_and_the_change_file(tmp_path: Path) -> None:
    d1 = write_parquet(tmp_path / "d1.parquet", [{"id": i, "text": TEXTS[i]} for i in range(10)])
    d2 = write_parquet(tmp_path / "d2.parquet", [{"id": i, "text": None if i == 5 else TEXTS[i]} for i in range(10)])
    target = tmp_path / "t.lance"
    assert run(d1, "-o", target, "--id-column", "id")[0] == 0
    code, out = run(d2, "-o", target, "--id-column", "id", "--on-invalid", "skip", "--changes",
                    tmp_path / "c.parquet", "--json")
    assert code == 0, out
    assert _ids(target) == [i for i in range(10) if i != 5]  # not its old text's vector
    assert json.loads(out)["metrics"]["sync"]["dropped_invalid"] == 1
    import pyarrow.parquet as pq

    changes = pq.read_table(tmp_path / "c.parquet").to_pylist()
    assert [(r["id"], r["op"]) for r in changes] == [(5, "delete")]


def test_a_rebuild_reports_and_guards_what_it_removes(tmp_path: Path) -> None:
    d1 = write_parquet(tmp_path / "d1.parquet", [{"id": i, "text": TEXTS[i]} for i in range(20)])
    d2 = write_parquet(tmp_path / "d2.parquet", [{"id": i, "text": TEXTS[i]} for i in range(3, 20)])
    target = tmp_path / "t.lance"
    assert run(d1, "-o", target, "--id-column", "id")[0] == 0
    code, out = run(d2, "-o", target, "--id-column", "id", "--rebuild", "--changes", tmp_path / "c.parquet", "--json")
    assert code == 0, out
    sync = json.loads(out)["metrics"]["sync"]
    assert (sync["deleted"], sync["updated"], sync["inserted"]) == (3, 17, 0)
    import pyarrow.parquet as pq

    assert sorted(r["id"] for r in pq.read_table(tmp_path / "c.parquet").to_pylist() if r["op"] == "delete") == [0, 1, 2]
    empty = write_parquet(tmp_path / "empty.parquet", [{"id": 1, "text": TEXTS[1]}])
    code, out = run(empty, "-o", target, "--id-column", "id", "--rebuild")
    assert code == 2 and "--max-delete-fraction" in out, out  # a rebuild from a cut input never wipes the table
    assert len(_ids(target)) == 17


def test_an_empty_folder_named_for_the_dataset_is_used(tmp_path: Path) -> None:
    (tmp_path / "e.lance").mkdir()
    d1 = write_parquet(tmp_path / "d1.parquet", [{"id": i, "text": TEXTS[i]} for i in range(4)])
    assert run(d1, "-o", tmp_path / "e.lance", "--id-column", "id")[0] == 0
    assert _ids(tmp_path / "e.lance") == [0, 1, 2, 3]


def test_int8_rows_carried_in_a_parquet_output_keep_their_ranges(tmp_path: Path) -> None:
    from hfbatch.io.writers import read_metadata

    d1 = write_parquet(tmp_path / "d1.parquet", [{"id": i, "text": TEXTS[i]} for i in range(30)])
    d2 = write_parquet(tmp_path / "d2.parquet", [{"id": i, "text": TEXTS[i] + (" (edited)" if i == 0 else "")}
                                                 for i in range(30)])
    out = tmp_path / "q.parquet"
    assert run(d1, "-o", out, "--id-column", "id", "--output-precision", "int8")[0] == 0
    before = read_metadata(out)["provenance"]["vectors"]["ranges"]
    assert run(d2, "-o", out, "--id-column", "id", "--output-precision", "int8")[0] == 0
    assert read_metadata(out)["provenance"]["vectors"]["ranges"] == before
    code, said = run(d2, "-o", out, "--id-column", "id", "--output-precision", "int8", "--calibration", d1)
    assert code == 2 and "--calibration" in said, said


def test_split_windows_carried_in_a_parquet_output_name_their_row_in_this_input(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    d1 = write_parquet(tmp_path / "d1.parquet", [{"id": i, "text": TEXTS[i]} for i in range(6)])
    d2 = write_parquet(tmp_path / "d2.parquet", [{"id": 99, "text": "a new first row"}]
                       + [{"id": i, "text": TEXTS[i]} for i in range(6)])
    out = tmp_path / "s.parquet"
    for day in (d1, d2):
        assert run(day, "-o", out, "--id-column", "id", "--split", "tokens:8")[0] == 0
    rows = pq.read_table(out, columns=["id", "parent_row"]).to_pylist()
    assert {r["id"]: r["parent_row"] for r in rows} == {99: 0, **{i: i + 1 for i in range(6)}}


def test_an_id_column_name_the_formats_cannot_merge_on_is_refused_before_work(tmp_path: Path) -> None:
    d1 = write_parquet(tmp_path / "d1.parquet", [{"a`b": i, "text": TEXTS[i]} for i in range(3)])
    code, out = run(d1, "-o", tmp_path / "t.lance", "--id-column", "a`b")
    assert code == 2 and "rename the column" in out and not (tmp_path / "t.lance").exists(), out
