"""`hfbatch cache info|clear|prune` on a cache filled by real embed runs (the bundled model)."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

from typer.testing import CliRunner

from conftest import SAMPLE_TEXTS, rows_for, write_csv
from hfbatch.cli import app

runner = CliRunner()
DISTINCT = len(set(SAMPLE_TEXTS))


def run(*args: str, input: str | None = None):  # type: ignore[no-untyped-def]
    return runner.invoke(app, list(args), input=input, env={"COLUMNS": "240"})


def _embed(src: Path, out: Path, *flags: str) -> dict:
    result = run("embed", str(src), "-o", str(out), "--json", *flags)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _info(*flags: str) -> dict:
    result = run("cache", "info", "--json", *flags)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_info_shows_the_namespaces_of_real_runs_and_prune_shrinks_the_cache(tmp_path: Path) -> None:
    src = write_csv(tmp_path / "in.csv", rows_for(SAMPLE_TEXTS))
    first = _embed(src, tmp_path / "a.parquet")
    second = _embed(src, tmp_path / "b.parquet", "--no-normalize")  # other vectors: another namespace
    info = _info()  # HFBATCH_CACHE_DIR (conftest), as embed used it
    assert info["directory"] == first["metrics"]["cache"]["directory"]
    counts = {n["namespace"]: n["entries"] for n in info["namespaces"]}
    fingerprints = {first["provenance"]["fingerprint"], second["provenance"]["fingerprint"]}
    assert set(counts) == fingerprints and len(fingerprints) == 2
    assert all(n == 2 * DISTINCT + 1 for n in counts.values())  # a vector and a token count per text, one dimension
    assert info["entries"] == sum(counts.values()) and info["size_bytes"] > 0

    shown = run("cache", "info")
    assert shown.exit_code == 0 and first["provenance"]["fingerprint"] in shown.stdout
    assert f"{info['entries']} entries" in shown.stdout

    # the first run's entries unused for 40 days: --older-than 30d drops them and nothing else
    with sqlite3.connect(Path(info["directory"]) / "cache.db") as db:
        db.execute("UPDATE Cache SET access_time = ? WHERE tag = ?", (time.time() - 40 * 86400, first["provenance"]["fingerprint"]))
    pruned = run("cache", "prune", "--older-than", "30d", "--json")
    assert pruned.exit_code == 0 and json.loads(pruned.stdout)["removed"] == 2 * DISTINCT + 1
    assert [n["namespace"] for n in _info()["namespaces"]] == [second["provenance"]["fingerprint"]]
    rerun = _embed(src, tmp_path / "c.parquet")
    assert rerun["metrics"]["cache"]["hits"] == 0  # computed again: its vectors were pruned

    # down to a size: least recently used first, the cache ends at or under it
    limit = _info()["volume_bytes"] // 2
    shrunk = run("cache", "prune", "--max-size", f"{limit}B", "--json")
    assert shrunk.exit_code == 0, shrunk.output
    assert json.loads(shrunk.stdout)["volume_bytes"] <= limit and json.loads(shrunk.stdout)["removed"] > 0


def test_clear_asks_first_and_honours_cache_dir(tmp_path: Path) -> None:
    src = write_csv(tmp_path / "in.csv", rows_for(SAMPLE_TEXTS[:3]))
    mine = tmp_path / "my-cache"
    _embed(src, tmp_path / "a.parquet", "--cache-dir", str(mine))
    assert _info("--cache-dir", str(mine))["entries"] > 0
    assert not _info()["exists"]  # the default directory was never used

    declined = run("cache", "clear", "--cache-dir", str(mine), input="n\n")
    assert declined.exit_code == 1 and "Remove every entry" in declined.stdout
    assert _info("--cache-dir", str(mine))["entries"] > 0

    cleared = run("cache", "clear", "--cache-dir", str(mine), "--yes")
    assert cleared.exit_code == 0 and "removed" in cleared.stdout
    assert _info("--cache-dir", str(mine))["entries"] == 0
    again = _embed(src, tmp_path / "b.parquet", "--cache-dir", str(mine))
    assert again["metrics"]["cache"]["hits"] == 0


def test_cache_commands_refuse_bad_values_and_create_nothing(tmp_path: Path) -> None:
    nowhere = tmp_path / "nowhere"
    shown = run("cache", "info", "--cache-dir", str(nowhere))
    assert shown.exit_code == 0 and "no cache there" in shown.stdout and not nowhere.exists()
    for args, message in ((["prune"], "needs --max-size"),
                          (["prune", "--older-than", "30 days"], "--older-than '30 days' is not an age"),
                          (["prune", "--max-size", "lots"], "--max-size 'lots' is not a size")):
        result = run("cache", *args, "--cache-dir", str(nowhere))
        assert result.exit_code == 2 and message in result.stderr, result.output
        assert result.stderr.count("\n") == 1
    assert not nowhere.exists()
