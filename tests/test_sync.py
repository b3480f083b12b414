"""Sync by --id-column (jobs/sync.py, io/targets/): day 1 / day 2 into Lance, Delta and Parquet,
--changes, the delete guard, the vector-space record and --rebuild, hostile inputs and tables,
--split, two runs at once and a run killed at any point.

The real bundled MiniLM through the real CLI: in-process (typer's CliRunner) except where the
process itself is under test (SIGKILL, two processes at once). One cache directory is shared by
the module, so each distinct text is embedded once; a run whose model work is counted gets a
fresh cache directory, so `texts_computed` is what the model did.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from hfbatch.cli import app

runner = CliRunner()
pytestmark = pytest.mark.timeout(180)  # the slowest, the SIGKILL test, takes about 25 s on 2 cores

HASH = "_hfbatch_hash"
ADJ = ["quiet", "bright", "rusty", "tiny", "heavy", "golden", "broken", "fresh", "noisy", "gentle", "narrow"]
NOUN = ["kettle", "lantern", "bicycle", "teapot", "window", "garden", "ladder", "violin", "compass", "blanket",
        "harbor", "orchard", "tunnel"]
VERB = ["rests", "shines", "waits", "turns", "sings", "falls", "drifts"]
PLACE = ["by the river", "in the attic", "under the bridge", "near the market", "on the hill", "at the station",
         "behind the school", "inside the barn", "across the valley", "beside the lake"]

N_DAY1 = 200
CHANGED = (10, 57, 133)  # 1.5% of the ids get another text on day 2
NEW = (1000, 1001, 1002, 1003)
GONE = (5, 77, 150)


def text_for(i: int, revision: int = 0) -> str:
    base = (f"note {i}: the {ADJ[i % len(ADJ)]} {NOUN[(i // 3) % len(NOUN)]} {VERB[(i // 7) % len(VERB)]} "
            f"{PLACE[(i // 11) % len(PLACE)]}")
    return base + (f", seen again in revision {revision}" if revision else "")


def day_rows(ids: range | list[int], changed: dict[int, int] | None = None) -> list[dict[str, Any]]:
    changed = changed or {}
    return [{"id": i, "text": text_for(i, changed.get(i, 0)), "cat": i % 4} for i in ids]


def day1_rows() -> list[dict[str, Any]]:
    return day_rows(range(N_DAY1))


def day2_rows() -> list[dict[str, Any]]:
    ids = [i for i in range(N_DAY1) if i not in GONE] + list(NEW)
    rows = day_rows(ids, {i: 1 for i in CHANGED})
    order = np.random.default_rng(7).permutation(len(rows))  # matched by id, never by position
    return [rows[k] for k in order]


def write_rows(path: Path, rows: list[dict[str, Any]], schema: pa.Schema | None = None) -> Path:
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


@dataclass
class World:
    root: Path
    cache: Path  # shared by the module: every distinct text is embedded once
    d1: Path
    d2: Path
    pristine: dict[str, Path]  # day-1 targets built once, copied by the tests that start from one


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("sync")
    return World(root, root / "cache", write_rows(root / "day1.parquet", day1_rows()),
                 write_rows(root / "day2.parquet", day2_rows()), {})


def cli(*args: Any) -> Any:
    return runner.invoke(app, [str(a) for a in args])


def embed(*args: Any, code: int = 0) -> dict[str, Any]:
    """`hfbatch embed ARGS --json`, expected to exit `code`; its document."""
    result = cli("embed", *args, "--json")
    assert result.exit_code == code, (result.exit_code, result.output[-3000:])
    assert "Traceback" not in result.output
    return json.loads(result.stdout)


def refused(*args: Any) -> str:
    """`hfbatch embed ARGS`, expected to be refused before any work: exit 2 with one line, no
    traceback. The message with its whitespace folded."""
    result = cli("embed", *args)
    assert result.exit_code == 2, (result.exit_code, result.output[-3000:])
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return " ".join(result.stderr.split())


def is_delta(target: str | Path) -> bool:
    return str(target).startswith("delta://")


def where(target: str | Path) -> str:
    return str(target)[len("delta://"):] if is_delta(target) else str(target)


def read_target(target: str | Path) -> pa.Table:
    text = str(target)
    if is_delta(text):
        from deltalake import DeltaTable

        return DeltaTable(where(text)).to_pyarrow_table()
    if text.endswith(".lance"):
        import lance

        return lance.dataset(text).to_table()
    return pq.read_table(text)


def version_of(target: str | Path) -> int | None:
    text = str(target)
    if is_delta(text):
        from deltalake import DeltaTable

        return int(DeltaTable(where(text)).version())
    if text.endswith(".lance"):
        import lance

        return int(lance.dataset(text).version)
    return None


def record_of(target: str | Path) -> dict[str, Any]:
    """The vector record a table keeps (Lance: schema metadata; Delta: its description)."""
    text = str(target)
    if is_delta(text):
        from deltalake import DeltaTable

        value = json.loads(DeltaTable(where(text)).metadata().description)["hfbatch"]
        return json.loads(value) if isinstance(value, str) else value
    import lance

    return json.loads(lance.dataset(text).schema.metadata[b"hfbatch"])


def vectors(table: pa.Table, column: str = "embedding") -> np.ndarray:
    return np.asarray(table.column(column).to_pylist(), dtype=np.float32)


def by_id(table: pa.Table, key: tuple[str, ...] = ("id",)) -> dict[Any, dict[str, Any]]:
    rows = table.to_pylist()
    return {tuple(r[k] for k in key) if len(key) > 1 else r[key[0]]: r for r in rows}


def cosine(a: Any, b: Any) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def assert_same_vectors(got: pa.Table, want: pa.Table, key: tuple[str, ...] = ("id",), bar: float = 0.9999) -> None:
    g, w = by_id(got, key), by_id(want, key)
    assert set(g) == set(w)
    worst = min((cosine(g[k]["embedding"], w[k]["embedding"]), k) for k in w)
    assert worst[0] >= bar, f"cosine {worst[0]:.6f} for {worst[1]}"


def state(target: str | Path) -> dict[Any, str]:
    """id -> content hash of every row of a table (asserting no id is there twice)."""
    table = read_target(target)
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)), [i for i, n in Counter(ids).items() if n > 1]
    return dict(zip(ids, table.column(HASH).to_pylist()))


def day1_copy(world: World, tmp_path: Path, kind: str = "lance") -> str:
    """A fresh copy of the day-1 table of `kind` (built once, from the shared cache)."""
    if kind not in world.pristine:
        built = world.root / ("pristine.lance" if kind == "lance" else "pristine_delta")
        target = str(built) if kind == "lance" else f"delta://{built}"
        doc = embed(world.d1, "-o", target, "--id-column", "id", "--cache-dir", world.cache, "--chunk-size", "50")
        assert doc["metrics"]["sync"]["inserted"] == N_DAY1
        world.pristine[kind] = built
    dest = tmp_path / world.pristine[kind].name
    shutil.copytree(world.pristine[kind], dest)
    return str(dest) if kind == "lance" else f"delta://{dest}"


# --- 1. day 1 / day 2 -----------------------------------------------------------------------------


TARGETS: dict[str, Callable[[Path, str], str]] = {
    "lance": lambda d, name: str(d / f"{name}.lance"),
    "delta": lambda d, name: f"delta://{d / f'{name}_delta'}",
    "parquet": lambda d, name: str(d / f"{name}.parquet"),
}


@pytest.mark.parametrize("kind", list(TARGETS))
def test_day2_sync_equals_a_cold_rebuild_and_embeds_only_what_changed(world: World, tmp_path: Path, kind: str) -> None:
    target = TARGETS[kind](tmp_path, "t")
    d1 = embed(world.d1, "-o", target, "--id-column", "id", "--cache-dir", world.cache, "--chunk-size", "50")
    assert d1["metrics"]["sync"] | {"bytes_added": None} == {
        "inserted": N_DAY1, "updated": 0, "unchanged": 0, "deleted": 0, "kept_missing": 0, "bytes_added": None}
    v1 = version_of(target)

    # day 2: a fresh cache, so texts_computed is what the model had to do
    d2 = embed(world.d2, "-o", target, "--id-column", "id", "--cache-dir", tmp_path / "cache2", "--chunk-size", "50",
               "--delete-missing")
    day2_ids = sorted(r["id"] for r in day2_rows())
    assert json.loads(Path(f"{where(target)}.meta.json").read_text()) == d2, "the sidecar is the --json document"
    sync = d2["metrics"]["sync"]
    assert {k: sync[k] for k in ("inserted", "updated", "unchanged", "deleted", "kept_missing")} == {
        "inserted": len(NEW), "updated": len(CHANGED), "unchanged": N_DAY1 - len(GONE) - len(CHANGED),
        "deleted": len(GONE), "kept_missing": 0}

    got = read_target(target)
    ids = got.column("id").to_pylist()
    assert len(ids) == len(set(ids)), "an id is in the target twice"
    assert sorted(ids) == day2_ids

    # the same rows, texts, kept columns and vectors as a cold rebuild from the day-2 input
    cold = TARGETS[kind](tmp_path, "cold")
    embed(world.d2, "-o", cold, "--id-column", "id", "--cache-dir", world.cache)
    want = read_target(cold)
    g, w = by_id(got), by_id(want)
    for i in day2_ids:
        assert (g[i]["text"], g[i]["cat"], g[i][HASH]) == (w[i]["text"], w[i]["cat"], w[i][HASH]), i
    assert_same_vectors(got, want)

    table = d2["provenance"]["output"]["table"]
    assert table["kind"] == kind
    if kind == "parquet":
        assert HASH in got.column_names
    else:
        v2 = version_of(target)
        assert (table["version_before"], table["version"]) == (v1, v2)
        assert v2 == v1 + 1, "day 2 is one commit"
        if kind == "lance":
            assert (v1, v2) == (1, 2)
            # unchanged rows are not rewritten: day 2 adds a small part of what the table takes
            size = sum(p.stat().st_size for p in Path(target).rglob("*") if p.is_file())
            assert 0 < sync["bytes_added"] < size / 10, (sync["bytes_added"], size)

    # day 3, the same input again: nothing embedded, nothing written, no new version
    d3 = embed(world.d2, "-o", target, "--id-column", "id", "--cache-dir", tmp_path / "cache3", "--delete-missing")
    assert d3["metrics"]["sync"]["unchanged"] == len(day2_ids)
    assert d3["metrics"]["sync"]["inserted"] == d3["metrics"]["sync"]["updated"] == d3["metrics"]["sync"]["deleted"] == 0
    if kind != "parquet":
        assert version_of(target) == v1 + 1
        assert d3["provenance"]["output"]["table"]["version"] == v1 + 1
    assert sorted(read_target(target).column("id").to_pylist()) == day2_ids

    # the model's work: day 2 only the changed and new texts, day 3 none
    assert d2["metrics"]["texts_computed"] == len(CHANGED) + len(NEW)
    assert d3["metrics"]["texts_computed"] == 0


# --- 2. --changes --------------------------------------------------------------------------------


def apply_changes(yesterday: pa.Table, changes: pa.Table) -> pa.Table:
    """The documented rule: drop from yesterday's full output every row whose id is in the change
    file, then add its upserts."""
    keep = pc.invert(pc.is_in(yesterday.column("id"), value_set=changes.column("id")))
    upserts = changes.filter(pc.equal(changes.column("op"), "upsert")).drop_columns(["op"])
    return pa.concat_tables([yesterday.filter(keep).select(upserts.column_names), upserts.cast(
        yesterday.select(upserts.column_names).schema)])


def assert_tables_equal(got: pa.Table, want: pa.Table) -> None:
    got, want = got.sort_by("id"), want.sort_by("id")
    assert sorted(got.column_names) == sorted(want.column_names)
    for name in want.column_names:
        assert got.column(name).to_pylist() == want.column(name).to_pylist(), name


def check_change_file(changes: pa.Table) -> None:
    ops = changes.column("op").to_pylist()
    assert Counter(ops) == {"upsert": len(CHANGED) + len(NEW), "delete": len(GONE)}
    assert ops == sorted(ops, key=lambda op: op != "upsert"), "the upserts, then the deletes"
    deletes = changes.filter(pc.equal(changes.column("op"), "delete"))
    assert sorted(deletes.column("id").to_pylist()) == sorted(GONE)
    for name in deletes.column_names:
        if name not in ("id", "op"):
            assert deletes.column(name).null_count == deletes.num_rows, name
    upserts = changes.filter(pc.equal(changes.column("op"), "upsert"))
    assert sorted(upserts.column("id").to_pylist()) == sorted(CHANGED + NEW)


def test_change_file_applied_to_yesterdays_parquet_gives_todays(world: World, tmp_path: Path) -> None:
    out = tmp_path / "y.parquet"
    embed(world.d1, "-o", out, "--id-column", "id", "--cache-dir", world.cache, "--chunk-size", "50")
    yesterday = pq.read_table(out)
    assert HASH in yesterday.column_names
    embed(world.d2, "-o", out, "--id-column", "id", "--cache-dir", world.cache, "--chunk-size", "50",
          "--changes", tmp_path / "changes.parquet")
    today = pq.read_table(out)
    changes = pq.read_table(tmp_path / "changes.parquet")
    check_change_file(changes)
    assert_tables_equal(apply_changes(yesterday, changes), today)


def test_change_file_of_a_lance_sync(world: World, tmp_path: Path) -> None:
    target = day1_copy(world, tmp_path)
    yesterday = read_target(target)
    embed(world.d2, "-o", target, "--id-column", "id", "--cache-dir", world.cache, "--chunk-size", "50",
          "--delete-missing", "--changes", tmp_path / "changes.parquet")
    changes = pq.read_table(tmp_path / "changes.parquet")
    check_change_file(changes)
    assert_tables_equal(apply_changes(yesterday, changes), read_target(target))


# --- 3. the delete guard -------------------------------------------------------------------------


def test_delete_guard_refuses_a_truncated_input_and_leaves_the_table(world: World, tmp_path: Path) -> None:
    target = day1_copy(world, tmp_path)
    before = state(target)
    small = write_rows(tmp_path / "small.parquet", day1_rows()[:10])
    message = refused(small, "-o", target, "--id-column", "id", "--cache-dir", world.cache, "--delete-missing")
    assert "190" in message and "95%" in message and "--max-delete-fraction" in message
    assert version_of(target) == 1
    assert state(target) == before

    # without --delete-missing nothing is deleted: the ids gone are kept, and counted
    rows = day1_rows()[:10]
    rows[3]["text"] = text_for(3, 2)
    small = write_rows(tmp_path / "small2.parquet", rows)
    doc = embed(small, "-o", target, "--id-column", "id", "--cache-dir", world.cache)
    sync = doc["metrics"]["sync"]
    assert (sync["kept_missing"], sync["deleted"], sync["updated"], sync["unchanged"]) == (N_DAY1 - 10, 0, 1, 9)
    after = state(target)
    assert set(after) == set(before)
    assert after[3] != before[3] and all(after[i] == before[i] for i in before if i != 3)
    assert version_of(target) == 2

    # deletes within the fraction given are made
    doc = embed(small, "-o", target, "--id-column", "id", "--cache-dir", world.cache, "--delete-missing",
                "--max-delete-fraction", "0.99")
    assert doc["metrics"]["sync"]["deleted"] == N_DAY1 - 10
    assert sorted(state(target)) == list(range(10))
    assert version_of(target) == 3


# --- 4. one table, one vector space --------------------------------------------------------------


@pytest.mark.parametrize("kind", ["lance", "delta"])
@pytest.mark.parametrize("option, value, named", [("--truncate-dim", "64", "truncate_dim"),
                                                  ("--prompt", "x: ", "prompt")])
def test_another_vector_space_is_refused(world: World, tmp_path: Path, kind: str, option: str, value: str,
                                         named: str) -> None:
    target = day1_copy(world, tmp_path, kind)
    version, before = version_of(target), state(target)
    message = refused(world.d1, "-o", target, "--id-column", "id", "--cache-dir", world.cache, option, value)
    assert f"{named}: null -> " in message and value.strip() in message, message  # the table's and the run's
    assert "--rebuild" in message
    assert version_of(target) == version and state(target) == before


def test_rebuild_with_truncate_dim_replaces_every_row(world: World, tmp_path: Path) -> None:
    target = day1_copy(world, tmp_path)
    full = read_target(target)
    doc = embed(world.d1, "-o", target, "--id-column", "id", "--cache-dir", world.cache, "--truncate-dim", "64",
                "--rebuild")
    assert doc["provenance"]["output"]["table"]["version"] == version_of(target) == 2
    got = read_target(target)
    assert sorted(got.column("id").to_pylist()) == list(range(N_DAY1))
    assert got.schema.field("embedding").type.list_size == 64
    assert vectors(got).shape == (N_DAY1, 64)
    want = full.set_column(full.column_names.index("embedding"), "embedding",
                           pa.array([v[:64] for v in full.column("embedding").to_pylist()]))
    assert_same_vectors(got, want)
    assert record_of(target)["truncate_dim"] == 64 and record_of(target)["dim"] == 64
    # the table now holds 64-dim vectors: a run without the option is the one refused
    assert "truncate_dim" in refused(world.d1, "-o", target, "--id-column", "id", "--cache-dir", world.cache)


def test_rebuild_with_a_prompt_reembeds_every_row(world: World, tmp_path: Path, st_model: Any) -> None:
    target = day1_copy(world, tmp_path)
    plain = by_id(read_target(target))
    doc = embed(world.d1, "-o", target, "--id-column", "id", "--cache-dir", world.cache, "--prompt", "x: ",
                "--rebuild")
    assert doc["provenance"]["output"]["table"]["replaced"] is True
    assert version_of(target) == 2 and record_of(target)["prompt"] == "x: "
    got = by_id(read_target(target))
    assert sorted(got) == list(range(N_DAY1))
    assert max(cosine(got[i]["embedding"], plain[i]["embedding"]) for i in got) < 0.9999
    sample = list(range(0, N_DAY1, 10))
    reference = st_model.encode([f"x: {got[i]['text']}" for i in sample])
    assert min(cosine(got[i]["embedding"], r) for i, r in zip(sample, reference)) >= 0.9999


def test_int8_sync_reuses_the_tables_ranges(world: World, tmp_path: Path) -> None:
    from hfbatch.vectors import quantize

    target = str(tmp_path / "q.lance")
    embed(world.d1, "-o", target, "--id-column", "id", "--cache-dir", world.cache, "--output-precision", "int8")
    ranges = record_of(target)["ranges"]
    assert ranges is not None
    before = by_id(read_target(target))
    doc = embed(world.d2, "-o", target, "--id-column", "id", "--cache-dir", world.cache, "--output-precision", "int8",
                "--delete-missing")
    assert doc["metrics"]["sync"]["updated"] == len(CHANGED)
    assert record_of(target)["ranges"] == ranges
    got = by_id(read_target(target))
    for i in got:
        if i not in CHANGED and i not in NEW:
            assert got[i]["embedding"] == before[i]["embedding"], i
    # the new and changed rows quantised on the table's grid, not one of their own
    floats = tmp_path / "f.parquet"
    embed(world.d2, "-o", floats, "--cache-dir", world.cache)
    ref = by_id(pq.read_table(floats))
    fresh = list(CHANGED + NEW)
    want = quantize(np.asarray([ref[i]["embedding"] for i in fresh], np.float32), "int8",
                    np.asarray(ranges, np.float32))
    have = np.asarray([got[i]["embedding"] for i in fresh], np.int16)
    assert np.abs(have - want.astype(np.int16)).max() <= 1


# --- 5. hostile inputs and tables ----------------------------------------------------------------


def _null_id(d: Path) -> Path:
    rows = day1_rows()[:8]
    rows[3]["id"] = None
    return write_rows(d / "in.parquet", rows)


def _duplicate_id(d: Path) -> Path:
    rows = day1_rows()[:12]
    rows[8]["id"] = rows[2]["id"]
    return write_rows(d / "in.parquet", rows)


def _nan_id(d: Path) -> Path:
    rows = [dict(r, id=float(r["id"])) for r in day1_rows()[:8]]
    rows[5]["id"] = float("nan")
    return write_rows(d / "in.parquet", rows)


def _no_id_column(d: Path) -> Path:
    return write_rows(d / "in.parquet", [{"key": r["id"], "text": r["text"]} for r in day1_rows()[:8]])


def _text_ids(d: Path) -> Path:
    return write_rows(d / "in.parquet", [dict(r, id=f"doc-{r['id']}") for r in day1_rows()[:8]])


@pytest.mark.parametrize("make_input, named", [
    (_null_id, ["null in row 4"]),
    (_duplicate_id, ["repeats id 2", "rows 3, 9"]),
    (_nan_id, ["NaN in row 6", "double"]),
    (_text_ids, ["int64", "string", "--rebuild"]),
    (_no_id_column, ["'id'", "'key'"]),
], ids=["null", "duplicate", "nan", "text-vs-int", "no-id-column"])
def test_bad_ids_are_refused_and_the_table_untouched(world: World, tmp_path: Path, make_input: Any,
                                                     named: list[str]) -> None:
    target = day1_copy(world, tmp_path)
    before = state(target)
    message = refused(make_input(tmp_path), "-o", target, "--id-column", "id", "--cache-dir", world.cache,
                      "--delete-missing", "--max-delete-fraction", "1")
    for part in named:
        assert part in message, (part, message)
    assert version_of(target) == 1 and state(target) == before
    if make_input is not _text_ids:  # nor is a new target made
        refused(make_input(tmp_path), "-o", tmp_path / "new.lance", "--id-column", "id", "--cache-dir", world.cache)
        assert not (tmp_path / "new.lance").exists()


def test_a_file_named_like_a_dataset_is_refused(world: World, tmp_path: Path) -> None:
    planted = tmp_path / "x.lance"
    planted.write_bytes(b"not a dataset\n")
    message = refused(world.d1, "-o", planted, "--id-column", "id", "--cache-dir", world.cache)
    assert "x.lance" in message and "file" in message
    assert planted.read_bytes() == b"not a dataset\n"


def test_a_lance_dataset_hfbatch_did_not_write_is_refused_unless_rebuild(world: World, tmp_path: Path) -> None:
    import lance

    target = str(tmp_path / "foreign.lance")
    lance.write_dataset(pa.table({"id": [1, 2, 3], "text": ["a", "b", "c"]}), target)
    message = refused(world.d1, "-o", target, "--id-column", "id", "--cache-dir", world.cache)
    assert "--rebuild" in message
    assert version_of(target) == 1 and read_target(target).num_rows == 3
    embed(world.d1, "-o", target, "--id-column", "id", "--cache-dir", world.cache, "--rebuild")
    assert version_of(target) == 2
    assert sorted(state(target)) == list(range(N_DAY1))
    assert record_of(target)["id_column"] == "id"


def test_rows_changed_behind_hfbatchs_back_converge_on_the_next_run(world: World, tmp_path: Path) -> None:
    import lance

    target = day1_copy(world, tmp_path)
    pristine = by_id(read_target(target))
    ds = lance.dataset(target)
    ds.delete("id IN (1, 2, 3)")  # deleted with lance's own API
    ds.update({HASH: "'0000'"}, where="id = 8")  # edited: its hash
    ds.update({"text": "'tampered text'"}, where="id = 4")  # edited: its text, its hash left as it was

    doc = embed(world.d1, "-o", target, "--id-column", "id", "--cache-dir", tmp_path / "fresh-cache",
                "--delete-missing")
    got = read_target(target)
    ids = got.column("id").to_pylist()
    assert sorted(ids) == list(range(N_DAY1)), {i: n for i, n in Counter(ids).items() if n != 1}
    rows = by_id(got)
    for i in range(N_DAY1):
        assert rows[i][HASH] == pristine[i][HASH], i
    # hfbatch trusts the hash it stored: a row edited with its hash left as it was is not looked at
    # again (RELIABILITY.md says so; --rebuild rewrites everything)
    assert rows[4]["text"] == "tampered text"
    assert doc["metrics"]["texts_computed"] == 4  # ids 1, 2, 3 (deleted) and 8 (its hash edited)
    assert doc["metrics"]["sync"]["inserted"] == 3 and doc["metrics"]["sync"]["updated"] == 1


def test_a_table_holding_an_id_twice_is_refused_and_left_as_it_is(world: World, tmp_path: Path) -> None:
    import lance

    target = day1_copy(world, tmp_path)
    ds = lance.dataset(target)
    ds.insert(ds.to_table(filter="id = 9"))  # appended again with lance's own API: id 9 twice
    version = lance.dataset(target).version
    result = cli("embed", world.d1, "-o", target, "--id-column", "id", "--cache-dir", world.cache)
    assert result.exit_code == 2, result.output
    assert "holds id 9 2 times" in result.output and "--rebuild" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert lance.dataset(target).version == version
    doc = embed(world.d1, "-o", target, "--id-column", "id", "--cache-dir", world.cache, "--rebuild")
    assert sorted(read_target(target).column("id").to_pylist()) == list(range(N_DAY1))
    assert doc["provenance"]["output"]["table"]["replaced"] is True


# --- 6. --split ----------------------------------------------------------------------------------


def long_text(i: int, words: int) -> str:
    pool = [w for group in (ADJ, NOUN, VERB) for w in group]
    return f"doc {i} " + " ".join(pool[(i * 5 + k) % len(pool)] for k in range(words))


def test_split_windows_of_a_changed_document_are_replaced(world: World, tmp_path: Path) -> None:
    day1 = [{"id": i, "text": long_text(i, 40 + i % 7)} for i in range(20)]
    day2 = [dict(r) for r in day1 if r["id"] != 2]
    day2[0]["text"] = "doc 0 short now"  # was 3+ windows, now one
    day2[1]["text"] = long_text(1, 90)  # more windows than before
    day2.append({"id": 99, "text": long_text(99, 30)})
    d1, d2 = write_rows(tmp_path / "s1.parquet", day1), write_rows(tmp_path / "s2.parquet", day2)
    target = str(tmp_path / "s.lance")
    args = ("--id-column", "id", "--split", "tokens:16", "--cache-dir", world.cache, "--chunk-size", "5")
    embed(d1, "-o", target, *args)
    before = Counter(read_target(target).column("id").to_pylist())
    assert before[0] >= 3
    doc = embed(d2, "-o", target, *args, "--delete-missing")
    assert doc["metrics"]["sync"] | {"bytes_added": 0} == {"inserted": 1, "updated": 2, "unchanged": 17, "deleted": 1,
                                                           "kept_missing": 0, "bytes_added": 0}
    got = read_target(target)
    keys = list(zip(got.column("id").to_pylist(), got.column("chunk_index").to_pylist()))
    assert len(keys) == len(set(keys)), "(id, chunk_index) twice"
    assert [k for k in keys if k[0] == 0] == [(0, 0)], "the shortened document's old windows are gone"
    cold = str(tmp_path / "cold.lance")
    embed(d2, "-o", cold, *args)
    want = read_target(cold)
    assert sorted(keys) == sorted(zip(want.column("id").to_pylist(), want.column("chunk_index").to_pylist()))
    assert_same_vectors(got, want, key=("id", "chunk_index"))
    g, w = by_id(got, ("id", "chunk_index")), by_id(want, ("id", "chunk_index"))
    for k in w:
        assert (g[k]["text"], g[k]["n_chunks"], g[k]["char_start"], g[k]["char_end"]) == \
               (w[k]["text"], w[k]["n_chunks"], w[k]["char_start"], w[k]["char_end"]), k


# --- 8. two runs at once (before the kill test: the last in the file) ------------------------------


def sub_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HFBATCH_", "HF_"))}
    tmp.mkdir(parents=True, exist_ok=True)
    env.update(HF_HUB_OFFLINE="1", HFBATCH_RUNTIME="torch", HFBATCH_PRECISION="fp32", TMPDIR=str(tmp),
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", HF_HOME=str(tmp / "hf_home"))
    return env


def start(args: list[Any], env: dict[str, str], cwd: Path) -> subprocess.Popen:
    """`python -m hfbatch embed ARGS --json` as a process of its own."""
    return subprocess.Popen([sys.executable, "-m", "hfbatch", "embed", *map(str, args), "--json"], env=env, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def delta_of(before: dict[Any, str], after: dict[Any, str]) -> tuple[dict[Any, str], set[Any]]:
    """What a run does to a table: (upserted id -> hash, deleted ids)."""
    return {i: h for i, h in after.items() if before.get(i) != h}, set(before) - set(after)


def test_two_runs_at_once_never_mix_halves(world: World, tmp_path: Path) -> None:
    base = day1_copy(world, tmp_path)
    v1 = state(base)
    a_rows = day2_rows()
    b_ids = [i for i in range(N_DAY1) if i != 99] + [2000, 2001]
    b_rows = day_rows(b_ids, {20: 3, 40: 3})
    a_in, b_in = write_rows(tmp_path / "a.parquet", a_rows), write_rows(tmp_path / "b.parquet", b_rows)
    # each run's state alone (what it does to the day-1 table), from copies
    alone = {}
    for name, src in (("a", a_in), ("b", b_in)):
        copy = day1_copy(world, tmp_path / f"alone-{name}")
        embed(src, "-o", copy, "--id-column", "id", "--cache-dir", world.cache, "--delete-missing")
        alone[name] = state(copy)
    moves = {name: delta_of(v1, s) for name, s in alone.items()}

    def merged(first: str, then: str) -> dict[Any, str]:
        upserts, deletes = moves[then]
        out = {i: h for i, h in alone[first].items() if i not in deletes}
        out.update(upserts)
        return out

    procs = [start([src, "-o", base, "--id-column", "id", "--cache-dir", world.cache, "--delete-missing"],
                   sub_env(tmp_path / f"tmp-{k}"), tmp_path) for k, src in enumerate((a_in, b_in))]
    outs = [p.communicate(timeout=120) for p in procs]
    codes = [p.returncode for p in procs]
    for code, (out, err) in zip(codes, outs):
        assert code in (0, 1), (code, err[-2000:])
        assert "Traceback" not in err, err[-2000:]
    versions = [json.loads(out)["provenance"]["output"]["table"] if code == 0 else None
                for code, (out, _) in zip(codes, outs)]
    final = state(base)  # asserts no id twice
    allowed = {"a": alone["a"], "b": alone["b"], "a then b": merged("a", "b"), "b then a": merged("b", "a")}
    assert final in allowed.values(), {name: (len(set(s) ^ set(final)),
                                              sum(s.get(i) != h for i, h in final.items())) for name, s in allowed.items()}
    if codes == [0, 0]:
        # both committed, one after the other: versions 2 and 3. The later run planned either on
        # the earlier's version (then the table is its input: its own state) or on version 1 at
        # the same time (then its commit is merged onto the earlier's: nothing of either is lost)
        first, later = sorted(zip(versions, "ab"), key=lambda vn: vn[0]["version"])
        assert (first[0]["version"], later[0]["version"]) == (2, 3), versions
        assert version_of(base) == 3
        if later[0]["version_before"] == 2:
            want = alone[later[1]]
        else:
            assert later[0]["version_before"] == 1, versions
            want = merged(first[1], later[1])
        assert final == want, ([name for name, s in allowed.items() if s == final], versions)
    else:
        assert final == alone["a" if codes[0] == 0 else "b"]


# --- 7. SIGKILL at any point (last: the slowest) ------------------------------------------------


def names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()} if folder.exists() else set()


def test_sigkill_at_any_point_leaves_the_old_or_new_version_and_a_rerun_converges(world: World,
                                                                                   tmp_path: Path) -> None:
    """The day-2 run as a process, killed at ten points spread over it: while Python starts, at
    1.5 s and 3 s (imports, planning, model load), once it has staged its first rows (embedding),
    once it has staged more, while Lance writes the new version's data files, its deletion files
    and its transaction (before the manifest), just after the new manifest, and once the run has
    cleaned up (writing its sidecar). Each time the table is day 1's or day 2's exactly, and
    a rerun gives day 2's."""
    n = 300
    k1 = write_rows(tmp_path / "k1.parquet", day_rows(range(n)))
    k2_ids = [i for i in range(n) if i % 30 != 7] + list(range(5000, 5010))
    k2 = write_rows(tmp_path / "k2.parquet", day_rows(k2_ids, {i: 4 for i in range(0, n, 3)}))
    pristine = tmp_path / "k.lance"
    embed(k1, "-o", pristine, "--id-column", "id", "--cache-dir", world.cache)
    day1 = state(pristine)
    day2_ids = sorted(k2_ids)
    cache = tmp_path / "kcache"  # the killed runs' cache: what one computed, the next finds
    rerun_cache = tmp_path / "rerun-cache"  # the first rerun's own, so the second killed run has model work left

    def staged(tmp: Path) -> list[Path]:
        return [p for p in tmp.iterdir() if p.name.startswith(".hfbatch-stage-")]

    def at_time(seconds: float) -> Callable[[Path, Path], bool]:
        started = time.monotonic()
        return lambda tmp, target: time.monotonic() - started >= seconds

    def when_staged(tmp: Path, target: Path) -> bool:
        return bool(staged(tmp))

    def when_staged_more() -> Callable[[Path, Path], bool]:
        first: list[int] = []

        def trigger(tmp: Path, target: Path) -> bool:
            files = staged(tmp)
            size = files[0].stat().st_size if files and files[0].exists() else 0
            if size and not first:
                first.append(size)
            return bool(first) and size > first[0]
        return trigger

    def when_data_written(tmp: Path, target: Path) -> bool:
        return len(names(target / "data")) > len(names(pristine / "data"))

    def when_new_manifest(tmp: Path, target: Path) -> bool:
        return len(names(target / "_versions")) > len(names(pristine / "_versions"))

    def when_grown(folder: str) -> Callable[[Path, Path], bool]:
        """Once the run has written a new file into the table's `folder` (Lance writes its
        deletion files and its transaction before the manifest that commits them)."""
        return lambda tmp, target: len(names(target / folder)) > len(names(pristine / folder))

    def when_cleaned_up(tmp: Path, target: Path) -> bool:
        return when_new_manifest(tmp, target) and not staged(tmp)

    # the two points inside the model's work first: their runs find the day-2 texts uncached
    points: list[tuple[str, Callable[[], Callable[[Path, Path], bool]]]] = [
        ("first rows staged", lambda: when_staged),
        ("more rows staged", when_staged_more),
        ("starting", lambda: at_time(0.3)),
        ("1.5 s in", lambda: at_time(1.5)),
        ("3 s in", lambda: at_time(3.0)),
        ("writing data", lambda: when_data_written),
        ("deletions written", lambda: when_grown("_deletions")),
        ("transaction written", lambda: when_grown("_transactions")),
        ("new manifest", lambda: when_new_manifest),
        ("cleaned up", lambda: when_cleaned_up),
    ]
    killed_at = []
    for k, (name, make) in enumerate(points):
        slug = name.replace(" ", "-")
        target = tmp_path / f"{slug}.lance"
        shutil.copytree(pristine, target)
        tmp = tmp_path / f"tmp-{slug}"
        own = tmp_path / f"cache-{slug}" if name.endswith(" s in") else cache  # (a timed point: model work left)
        proc = start([k2, "-o", target, "--id-column", "id", "--cache-dir", own, "--delete-missing",
                      "--chunk-size", "50", "--batch-size", "8"], sub_env(tmp), tmp_path)
        trigger = make()
        while proc.poll() is None and not trigger(tmp, target):
            time.sleep(0.002)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode in (0, -signal.SIGKILL), (name, proc.returncode, stderr[-2000:])

        # the old version or the new one, exactly
        version = version_of(target)
        killed_at.append((name, proc.returncode, version))
        now = state(target)
        assert version in (1, 2), (name, version)
        if version == 1:
            assert now == day1, name
        else:
            assert sorted(now) == day2_ids, name

        # a rerun converges to day 2 (in-process: the model is loaded already)
        doc = embed(k2, "-o", target, "--id-column", "id", "--cache-dir", rerun_cache if k == 0 else cache, "--delete-missing",
                    "--chunk-size", "50")
        assert sorted(state(target)) == day2_ids, name
        assert version_of(target) == 2, (name, "one version for the day-2 change, whichever run made it")
        if version == 2:
            assert doc["metrics"]["texts_computed"] == 0, name
    # the points were kills, not runs that ended first, and some fell on each side of the commit
    assert all(code == -signal.SIGKILL for _, code, _ in killed_at), killed_at
    assert {v for _, _, v in killed_at} == {1, 2}, killed_at
