"""Postgres with pgvector as a sync target (issue 25), against a real server (tests/pg.py: the
`pgserver` wheel's Postgres with pgvector 0.6, on 127.0.0.1 with password authentication).

What a user of a pgvector table relies on: day 2 writes only what changed and the table then
equals a cold rebuild; `hfbatch search` through `<=>` (with and without an HNSW or IVFFlat
index) gives brute force's top 10; the password is nowhere it could leak; hostile ids, column
names, tables and schemas are quoted or refused in one line; a table of another shape or space
is refused. Kills, lost connections and two runs at once: tests/test_pg_faults.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pyarrow as pa
import pytest

from test_sync import CHANGED, GONE, NEW, cli, day1_rows, day2_rows, embed, refused, write_rows

pytestmark = pytest.mark.timeout(240)

HASH = "_hfbatch_hash"


@pytest.fixture(scope="module")
def days(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pgdays")
    return {"root": root, "cache": root / "cache", "d1": write_rows(root / "day1.parquet", day1_rows()),
            "d2": write_rows(root / "day2.parquet", day2_rows())}


def rows_of(pg: Any, table: str, schema: str = "public") -> dict[Any, dict[str, Any]]:
    """id -> the row (the vector as float32 numpy), read back with psycopg and pgvector's adapters."""
    from pgvector.psycopg import register_vector
    from psycopg import sql
    from psycopg.rows import dict_row

    with pg.connect() as conn:
        register_vector(conn)
        with conn.cursor(row_factory=dict_row) as cur:
            cur.execute(sql.SQL("SELECT *, xmin::text AS xmin FROM {}").format(sql.Identifier(schema, table)))
            rows = cur.fetchall()
    found = {}
    for row in rows:
        vector = row.get("embedding")  # (pgvector-python >= 0.5 reads a Vector; before, a numpy array)
        if vector is not None:
            row["embedding"] = np.asarray(vector.to_numpy() if hasattr(vector, "to_numpy") else vector, np.float32)
        key = row["id"]
        assert key not in found, f"id {key} twice"
        found[key] = row
    return found


def version_of(pg: Any, table: str, schema: str = "public") -> int | None:
    with pg.connect() as conn:
        if conn.execute("SELECT to_regclass(%s)", (f'"{schema}".hfbatch_targets',)).fetchone()[0] is None:
            return None
        got = conn.execute(f'SELECT version FROM "{schema}".hfbatch_targets WHERE table_name = %s', (table,)).fetchone()
    return got[0] if got else None


def sync(pg: Any, days: dict[str, Path], day: str, table: str, *extra: Any, code: int = 0) -> dict[str, Any]:
    return embed(days[day], "-o", pg.url(table), "--id-column", "id", "--cache-dir", days["cache"], *extra, code=code)


# --- 1. day 1 / day 2 ------------------------------------------------------------------------------


def test_day2_writes_only_what_changed_and_equals_a_cold_rebuild(pg: Any, days: dict[str, Path],
                                                                  st_model: Any) -> None:
    first = sync(pg, days, "d1", "day")
    assert first["metrics"]["sync"]["inserted"] == len(day1_rows())
    assert first["provenance"]["output"]["table"]["kind"] == "postgres"
    assert version_of(pg, "day") == 1
    before = rows_of(pg, "day")

    second = sync(pg, days, "d2", "day", "--delete-missing")
    counts = second["metrics"]["sync"]
    assert (counts["inserted"], counts["updated"], counts["deleted"]) == (len(NEW), len(CHANGED), len(GONE))
    assert second["metrics"]["texts_computed"] == len(NEW) + len(CHANGED)  # only those reached the model
    assert second["provenance"]["output"]["table"] == {**second["provenance"]["output"]["table"],
                                                       "version_before": 1, "version": 2}
    after = rows_of(pg, "day")
    # the unchanged rows were not rewritten (their row versions, xmin, are day 1's); the changed were
    unchanged = set(before) - set(GONE) - set(CHANGED)
    assert all(after[i]["xmin"] == before[i]["xmin"] for i in unchanged)
    assert all(after[i]["xmin"] != before[i]["xmin"] for i in CHANGED)

    cold = sync(pg, days, "d2", "cold")
    assert cold["metrics"]["sync"]["inserted"] == len(day2_rows())
    rebuilt = rows_of(pg, "cold")
    assert sorted(after) == sorted(rebuilt) == sorted(r["id"] for r in day2_rows())
    for i, row in rebuilt.items():
        a, b = after[i]["embedding"], row["embedding"]
        assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) >= 0.9999, i
        assert (after[i][HASH], after[i]["cat"], after[i]["n_tokens"]) == (row[HASH], row["cat"], row["n_tokens"])

    # the vectors are the model's own (sentence-transformers fp32), each on its own id's row
    texts = {r["id"]: r["text"] for r in day2_rows()}
    ids = sorted(texts)
    want = st_model.encode([texts[i] for i in ids], normalize_embeddings=True)
    got_vectors = np.stack([after[i]["embedding"] for i in ids])
    cosines = (want * got_vectors).sum(1) / np.linalg.norm(got_vectors, axis=1)
    assert float(cosines.mean()) >= 0.9999 and float(cosines.min()) >= 0.999, (cosines.mean(), cosines.min())

    again = sync(pg, days, "d2", "day", "--delete-missing")  # nothing changed: no model work, no new version
    assert again["metrics"]["texts_computed"] == 0
    assert version_of(pg, "day") == 2
    with pg.connect() as conn:
        record = conn.execute("SELECT record FROM hfbatch_targets WHERE table_name = 'day'").fetchone()[0]
        kinds = dict(conn.execute("SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute WHERE "
                                  "attrelid = 'day'::regclass AND attnum > 0 AND NOT attisdropped").fetchall())
        key = conn.execute("SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND "
                           "a.attnum = ANY(i.indkey) WHERE i.indrelid = 'day'::regclass AND i.indisprimary").fetchall()
    assert record["model_id"] == "sentence-transformers/all-MiniLM-L6-v2" and record["dim"] == 384
    assert record["id_column"] == "id" and record["precision"] == "float32"
    assert kinds["embedding"] == "vector(384)" and kinds["id"] == "bigint" and kinds[HASH] == "text"
    assert key == [("id",)]


def test_text_ids_many_parts_and_a_dry_run(pg: Any, days: dict[str, Path], tmp_path: Path) -> None:
    """Text ids make a text key; a directory of parts is one input; --dry-run counts and writes nothing."""
    rows = [{"id": f"doc-{r['id']}", "text": r["text"]} for r in day1_rows()[:60]]
    parts = tmp_path / "parts"
    parts.mkdir()
    for k in range(3):
        write_rows(parts / f"part-{k}.parquet", rows[k * 20:(k + 1) * 20])
    dry = cli("embed", parts / "part-0.parquet", "-o", pg.url("texts"), "--id-column", "id", "--cache-dir", days["cache"], "--dry-run",
              "--json")
    assert dry.exit_code == 0, dry.output[-2000:]
    assert json.loads(dry.stdout)["sync"]["inserted"] == 20
    assert version_of(pg, "texts") is None
    embed(parts, "-o", pg.url("texts"), "--id-column", "id", "--cache-dir", days["cache"])
    got = rows_of(pg, "texts")
    assert sorted(got) == sorted(r["id"] for r in rows)
    with pg.connect() as conn:
        kind = conn.execute("SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = "
                            "'texts'::regclass AND attname = 'id'").fetchone()[0]
    assert kind == "text"


# --- 2. search -------------------------------------------------------------------------------------


def brute_force(pg: Any, table: str, query: np.ndarray, k: int = 10) -> list[Any]:
    rows = rows_of(pg, table)
    ids = list(rows)
    matrix = np.stack([rows[i]["embedding"] for i in ids]).astype(np.float64)
    scores = matrix @ query / np.linalg.norm(matrix, axis=1) / np.linalg.norm(query)
    return [ids[j] for j in np.argsort(-scores, kind="stable")[:k]]


@pytest.mark.parametrize("index", [None, "hnsw", "ivfflat"])
def test_search_uses_cosine_and_gives_brute_forces_top_10(pg: Any, days: dict[str, Path], st_model: Any,
                                                          index: str | None) -> None:
    from hfbatch import search

    table = f"searched_{index or 'flat'}"
    extra = ["--index", *(["--index-type", index] if index == "ivfflat" else [])] if index else []
    doc = sync(pg, days, "d1", table, *extra)
    if index:
        built = doc["provenance"]["output"]["table"]["index"]
        assert built["type"] == index and "error" not in built, built
        with pg.connect() as conn:
            names = [r[0] for r in conn.execute("SELECT indexdef FROM pg_indexes WHERE tablename = %s", (table,))]
        assert any(f"USING {index}" in n and "vector_cosine_ops" in n for n in names), names
    for query in ("a golden violin by the river", "the broken ladder waits in the attic"):
        report = search(pg.url(table), query, k=10)
        assert report["strategy"] == "postgres <=>" and report["rows_searched"] == len(day1_rows())
        want = brute_force(pg, table, st_model.encode([query], normalize_embeddings=True)[0].astype(np.float64))
        assert [h["id"] for h in report["hits"]] == want, query
        exact = search(pg.url(table), query, k=10, exact=True)
        assert [h["id"] for h in exact["hits"]] == want


# --- 3. secrets ------------------------------------------------------------------------------------


def test_the_password_is_in_no_output_log_error_or_json(pg: Any, days: dict[str, Path], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "run.log"
    result = cli("embed", days["d1"], "-o", pg.url("secret"), "--id-column", "id", "--cache-dir", days["cache"],
                 "--json", "--log-file", log, "--metrics-file", tmp_path / "m.prom")
    assert result.exit_code == 0, result.output[-2000:]
    seen = [result.stdout, result.stderr, log.read_text(), (tmp_path / "m.prom").read_text()]
    document = json.loads(result.stdout)
    assert "postgres:***@127.0.0.1" in document["provenance"]["output"]["path"]
    with pg.connect() as conn:
        seen += [json.dumps(r[0]) for r in conn.execute("SELECT record FROM hfbatch_targets")]
        seen += [r[0] or "" for r in conn.execute("SELECT obj_description(oid) FROM pg_class WHERE relname = 'secret'")]
    # a wrong password, a refused run (another space) and a search: their messages too
    wrong = pg.url("secret").replace(pg.password, pg.password + "x")
    failed = cli("embed", days["d1"], "-o", wrong, "--id-column", "id", "--cache-dir", days["cache"])
    assert failed.exit_code == 1 and "cannot connect" in failed.stderr and len(failed.stderr.strip().splitlines()) == 1
    other = cli("embed", days["d1"], "-o", pg.url("secret"), "--id-column", "id", "--cache-dir", days["cache"],
                "--truncate-dim", "64")
    assert other.exit_code == 2
    found = cli("search", pg.url("secret"), "a teapot", "--json")
    assert found.exit_code == 0, found.output[-2000:]
    seen += [failed.output, other.output, found.output, json.dumps(json.loads(found.stdout))]
    summary = cli("embed", days["d1"], "-o", pg.url("secret"), "--id-column", "id", "--cache-dir", days["cache"])
    assert summary.exit_code == 0 and "none beside a database table" in summary.stdout
    seen += [summary.output]
    # and the password given in the URL's query (?password=), which libpq also takes
    query_url = pg.url("secret", password=False) + f"&password={pg.password}"
    by_query = cli("embed", days["d1"], "-o", query_url, "--id-column", "id", "--cache-dir", days["cache"], "--json")
    assert by_query.exit_code == 0, by_query.output[-2000:]
    seen += [by_query.output]
    for text in seen:
        assert pg.password not in text


def test_the_password_from_pgpassword_or_a_pgpass_file(pg: Any, days: dict[str, Path], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    bare = pg.url("envpw", password=False)
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "none"))
    failed = cli("embed", days["d1"], "-o", bare, "--id-column", "id", "--cache-dir", days["cache"])
    assert failed.exit_code == 1 and "PGPASSWORD" in failed.stderr  # says where a password can come from
    monkeypatch.setenv("PGPASSWORD", pg.password)
    doc = embed(days["d1"], "-o", bare, "--id-column", "id", "--cache-dir", days["cache"])
    assert pg.password not in json.dumps(doc)
    monkeypatch.delenv("PGPASSWORD")
    pgpass = tmp_path / "pgpass"
    pgpass.write_text(f"127.0.0.1:{pg.port}:*:postgres:{pg.password}\n")
    pgpass.chmod(0o600)
    monkeypatch.setenv("PGPASSFILE", str(pgpass))
    again = embed(days["d2"], "-o", bare, "--id-column", "id", "--cache-dir", days["cache"], "--delete-missing")
    assert again["metrics"]["sync"]["deleted"] == len(GONE)


# --- 4. hostile names and ids ----------------------------------------------------------------------


def test_sql_looking_ids_values_and_column_names_are_quoted(pg: Any, days: dict[str, Path], tmp_path: Path) -> None:
    hostile = ['x"; DROP TABLE hfbatch_targets; --', "select", "user", "Order By", "a'b"]
    rows = [{"id": f"'; DROP TABLE t{i}; --" if i % 2 else f"id {i}", "text": f"row {i} about a teapot",
             **{name: f"{name} {i} '); DELETE FROM x; --" for name in hostile}} for i in range(12)]
    source = write_rows(tmp_path / "hostile.parquet", rows)
    table = 'evil"; DROP TABLE public.hfbatch_targets; --'
    url = pg.url(quote(table, safe=""))
    embed(source, "-o", url, "--id-column", "id", "--keep", ",".join(hostile), "--cache-dir", days["cache"])
    got = rows_of(pg, table)
    assert sorted(got) == sorted(r["id"] for r in rows)
    for row in rows:
        for name in hostile:
            assert got[row["id"]][name] == row[name]
    assert version_of(pg, table) == 1  # hfbatch_targets is still there
    # day 2 deletes by SQL-looking ids
    embed(write_rows(tmp_path / "hostile2.parquet", rows[:6]), "-o", url, "--id-column", "id", "--keep",
          ",".join(hostile), "--cache-dir", days["cache"], "--delete-missing", "--max-delete-fraction", "0.6")
    assert sorted(rows_of(pg, table)) == sorted(r["id"] for r in rows[:6])


def test_names_postgres_cannot_keep_are_refused_in_one_line(pg: Any, days: dict[str, Path], tmp_path: Path) -> None:
    long_name = "c" * 1000
    source = write_rows(tmp_path / "long.parquet", [{"id": 1, "text": "a", long_name: "v"}])
    said = refused(source, "-o", pg.url("longcol"), "--id-column", "id", "--keep", long_name, "--cache-dir",
                   days["cache"])
    assert "longer than Postgres's 63-byte names" in said
    said = refused(days["d1"], "-o", pg.url("t", schema="no_such_schema"), "--id-column", "id", "--cache-dir",
                   days["cache"])
    assert "schema 'no_such_schema' does not exist" in said
    said = refused(days["d1"], "-o", pg.url("x" * 70), "--id-column", "id")
    assert "63-byte" in said
    said = refused(days["d1"], "-o", pg.url("t").split("?")[0], "--id-column", "id")
    assert "names no table" in said
    for url in (pg.url("longcol"), pg.url("t", schema="no_such_schema")):
        assert version_of(pg, "longcol") is None and url


def test_a_nul_character_postgres_cannot_store_is_refused_before_work(pg: Any, days: dict[str, Path],
                                                                       tmp_path: Path) -> None:
    rows = [{"id": f"a{i}", "text": f"doc {i}", "note": "x\x00y" if i == 3 else "ok"} for i in range(8)]
    source = write_rows(tmp_path / "nul.parquet", rows)
    said = refused(source, "-o", pg.url("nul"), "--id-column", "id", "--keep", "note", "--cache-dir", days["cache"])
    assert "row 4, column 'note' holds a NUL character" in said
    ids = write_rows(tmp_path / "nulid.parquet", [{"id": f"a{i}" + ("\x00" if i == 1 else ""), "text": "t"} for i in range(4)])
    assert "row 2, column 'id'" in refused(ids, "-o", pg.url("nul"), "--id-column", "id", "--cache-dir", days["cache"])
    assert version_of(pg, "nul") is None


def test_another_schema_is_used_when_it_exists(pg: Any, days: dict[str, Path]) -> None:
    with pg.connect() as conn:
        conn.execute('CREATE SCHEMA IF NOT EXISTS "Search Data"')
    embed(days["d1"], "-o", pg.url("docs", schema="Search%20Data"), "--id-column", "id", "--cache-dir", days["cache"])
    assert len(rows_of(pg, "docs", schema="Search Data")) == len(day1_rows())
    assert version_of(pg, "docs", schema="Search Data") == 1


# --- 5. tables of another shape, space or owner ----------------------------------------------------


def test_a_table_hfbatch_did_not_write_is_refused_unless_rebuild(pg: Any, days: dict[str, Path]) -> None:
    with pg.connect() as conn:
        conn.execute("CREATE TABLE theirs (id bigint PRIMARY KEY, note text)")
        conn.execute("INSERT INTO theirs VALUES (1, 'kept')")
    said = refused(days["d1"], "-o", pg.url("theirs"), "--id-column", "id", "--cache-dir", days["cache"])
    assert "hfbatch did not write" in said and "--rebuild" in said
    with pg.connect() as conn:
        assert conn.execute("SELECT note FROM theirs").fetchall() == [("kept",)]
    sync(pg, days, "d1", "theirs", "--rebuild", "--max-delete-fraction", "1")
    assert len(rows_of(pg, "theirs")) == len(day1_rows())


def test_a_table_of_another_shape_or_space_is_refused_naming_it(pg: Any, days: dict[str, Path]) -> None:
    sync(pg, days, "d1", "shaped")
    said = refused(days["d1"], "-o", pg.url("shaped"), "--id-column", "id", "--cache-dir", days["cache"],
                   "--truncate-dim", "128")
    assert "truncate_dim" in said and "--rebuild" in said
    with pg.connect() as conn:  # someone changes the table by hand
        conn.execute("ALTER TABLE shaped ALTER COLUMN embedding TYPE vector(3) USING NULL")
    result = cli("embed", days["d2"], "-o", pg.url("shaped"), "--id-column", "id", "--cache-dir", days["cache"])
    assert result.exit_code == 2, result.output[-2000:]
    assert "another shape" in result.stderr and "vector(3)" in result.stderr and "vector(384)" in result.stderr
    assert version_of(pg, "shaped") == 1
    doc = sync(pg, days, "d2", "shaped", "--rebuild", "--truncate-dim", "128")
    assert doc["provenance"]["output"]["table"]["replaced"] is True
    with pg.connect() as conn:
        kind = conn.execute("SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = "
                            "'shaped'::regclass AND attname = 'embedding'").fetchone()[0]
    assert kind == "vector(128)"


@pytest.mark.parametrize("precision,needs", [("float16", "pgvector 0.7.0"), ("int8", "no pgvector type")])
def test_precisions_pgvector_lacks_are_refused_in_one_line(pg: Any, days: dict[str, Path], precision: str,
                                                           needs: str) -> None:
    result = cli("embed", days["d1"], "-o", pg.url(f"p_{precision}"), "--id-column", "id", "--cache-dir",
                 days["cache"], "--output-precision", precision)
    assert result.exit_code == 2, result.output[-2000:]
    assert needs in result.stderr and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1
    assert version_of(pg, f"p_{precision}") is None


def test_an_unreachable_server_is_one_line(days: dict[str, Path]) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = cli("embed", days["d1"], "-o", f"postgresql://u:hunter22@127.0.0.1:{port}/db?table=t", "--id-column", "id")
    assert result.exit_code == 1 and "cannot connect" in result.stderr and "hunter22" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1


# --- 6. runs too large for one transaction (--commit-every) ----------------------------------------


def hashes(pg: Any, table: str) -> dict[Any, str]:
    with pg.connect() as conn:
        return dict(conn.execute(f'SELECT id, "{HASH}" FROM "{table}"').fetchall())


def kill_after_a_part(pg: Any, args: list[Any], tmp_path: Path, table: str) -> None:
    """Run `hfbatch embed ARGS` as a process and SIGKILL it once hfbatch_jobs shows it committed a
    part (its watermark moved) and before its final commit."""
    import signal
    import time

    from test_sync import start, sub_env

    proc = start(args, sub_env(tmp_path / "tmp"), tmp_path)
    deadline = time.monotonic() + 120
    with pg.connect() as conn:
        while proc.poll() is None and time.monotonic() < deadline:
            if conn.execute("SELECT to_regclass('hfbatch_jobs')").fetchone()[0] is not None:
                row = conn.execute("SELECT state, parts FROM hfbatch_jobs WHERE table_name = %s", (table,)).fetchone()
                if row and row[0] == "running" and row[1] >= 1:
                    proc.send_signal(signal.SIGKILL)
                    break
            time.sleep(0.005)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, stderr[-2000:])


def test_a_run_in_parts_killed_midway_keeps_one_space_and_each_id_once(pg: Any, days: dict[str, Path],
                                                                        tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    """--commit-every: the parts land as they go (each id once, their new hashes), a SIGKILL after
    one leaves the rest for the rerun, which embeds only that and says what the earlier run did.
    A rebuild in parts (another vector space) writes a shadow table: killed midway, the table is
    still wholly the old space; the rerun swaps the new one in."""
    sync(pg, days, "d1", "big")
    day1 = hashes(pg, "big")
    args = [days["d2"], "-o", pg.url("big"), "--id-column", "id", "--cache-dir", tmp_path / "own-cache",
            "--delete-missing", "--commit-every", "20", "--chunk-size", "20", "--batch-size", "4"]
    # day 2 rewrites every row (another --keep would be refused): use a prompt-free change of text
    rows = [{**r, "text": r["text"] + " (revised)"} for r in day2_rows()]
    args[0] = write_rows(tmp_path / "revised.parquet", rows)
    kill_after_a_part(pg, args, tmp_path, "big")
    midway = {i: r[HASH] for i, r in rows_of(pg, "big").items()}  # (rows_of: no id twice)
    assert set(day1) <= set(midway)  # the deletes are the final commit's
    moved = {i for i in midway if midway[i] != day1.get(i)}
    assert 20 <= len(moved) < len(rows), len(moved)  # some parts landed, not all
    assert version_of(pg, "big") == 1  # the new version is the final commit's
    result = cli("embed", *args, "--json")
    assert result.exit_code == 0, result.output[-2000:]
    doc = json.loads(result.stdout)
    assert "an earlier run in parts" in caplog.text
    # the landed parts' rows are unchanged now: only the rest is embedded (less what the killed run cached)
    assert doc["metrics"]["sync"]["unchanged"] == len(moved)
    assert 0 < doc["metrics"]["texts_computed"] <= len(rows) - len(moved)
    cold = embed(args[0], "-o", pg.url("big_cold"), "--id-column", "id", "--cache-dir", days["cache"])
    assert hashes(pg, "big") == hashes(pg, "big_cold") and cold
    assert version_of(pg, "big") == 2

    # a rebuild into another space, in parts, killed midway: the old table is untouched
    before = rows_of(pg, "big")
    rebuild = [args[0], "-o", pg.url("big"), "--id-column", "id", "--cache-dir", tmp_path / "cache-128",
               "--rebuild", "--truncate-dim", "128", "--commit-every", "20", "--chunk-size", "20", "--batch-size", "4"]
    kill_after_a_part(pg, rebuild, tmp_path, "big")
    after = rows_of(pg, "big")
    assert {i: r["xmin"] for i, r in after.items()} == {i: r["xmin"] for i, r in before.items()}
    assert all(len(r["embedding"]) == 384 for r in after.values())
    with pg.connect() as conn:
        shadows = conn.execute("SELECT count(*) FROM pg_tables WHERE tablename LIKE 'hfbatch_new_%'").fetchone()[0]
    assert shadows == 1  # the killed rebuild's parts, never read as the table
    done = cli("embed", *rebuild, "--json")
    assert done.exit_code == 0, done.output[-2000:]
    rebuilt = rows_of(pg, "big")
    assert sorted(rebuilt) == sorted(before) and all(len(r["embedding"]) == 128 for r in rebuilt.values())
    with pg.connect() as conn:
        assert conn.execute("SELECT count(*) FROM pg_tables WHERE tablename LIKE 'hfbatch_new_%'").fetchone()[0] == 0
        assert conn.execute("SELECT record->>'truncate_dim' FROM hfbatch_targets WHERE table_name = 'big'").fetchone() \
            == ("128",)


# --- 7. found by review ----------------------------------------------------------------------------


def test_rows_without_a_vector_and_split_windows_of_invalid_rows_are_stored(pg: Any, days: dict[str, Path],
                                                                          tmp_path: Path) -> None:
    """--on-invalid mark (the default): an empty or null text is a row with a NULL vector (search
    skips it); with --split its chunk_index, part of the key, is 0."""
    from hfbatch import search

    rows = [{"id": i, "text": "" if i == 2 else None if i == 5 else f"a short note number {i}"} for i in range(8)]
    source = write_rows(tmp_path / "marked.parquet", rows)
    embed(source, "-o", pg.url("marked"), "--id-column", "id", "--cache-dir", days["cache"], code=3)  # (3: rows marked)
    got = rows_of(pg, "marked")
    assert got[2]["embedding"] is None and got[5]["embedding"] is None and got[2]["embedding_error"]
    assert all(got[i]["embedding"] is not None for i in (0, 1, 3, 4, 6, 7))
    report = search(pg.url("marked"), "note number 3", k=10)
    assert report["rows_searched"] == 6 and report["rows_skipped"] == 2 and len(report["hits"]) == 6
    embed(source, "-o", pg.url("marked_split"), "--id-column", "id", "--cache-dir", days["cache"], "--split", "tokens:4",
          code=3)
    with pg.connect() as conn:
        invalid = conn.execute("SELECT chunk_index, embedding IS NULL FROM marked_split WHERE id IN (2, 5)").fetchall()
    assert invalid == [(0, True), (0, True)]


def test_integer_widths_that_change_between_days_are_one_column(pg: Any, days: dict[str, Path], tmp_path: Path) -> None:
    """An int32 id or kept column on day 1 and int64 (or uint64 ids) on day 2 are the same
    columns (the id is always bigint); a text column where an integer was is refused, naming it."""
    small = pa.schema([("id", pa.int32()), ("text", pa.string()), ("cat", pa.int32())])
    wide = pa.schema([("id", pa.uint64()), ("text", pa.string()), ("cat", pa.int64())])
    rows = [{"id": i, "text": f"row {i} of widths", "cat": i % 3} for i in range(10)]
    embed(write_rows(tmp_path / "d1.parquet", rows, small), "-o", pg.url("widths"), "--id-column", "id", "--keep",
          "cat", "--cache-dir", days["cache"])
    rows[4]["text"] = "row 4 changed"
    doc = embed(write_rows(tmp_path / "d2.parquet", rows, wide), "-o", pg.url("widths"), "--id-column", "id", "--keep",
                "cat", "--cache-dir", days["cache"])
    assert doc["metrics"]["sync"]["updated"] == 1 and doc["metrics"]["sync"]["unchanged"] == 9
    again = embed(write_rows(tmp_path / "d3.parquet", rows, wide), "-o", pg.url("widths"), "--id-column", "id",
                  "--keep", "cat", "--cache-dir", days["cache"])
    assert again["metrics"]["sync"]["unchanged"] == 10
    with pg.connect() as conn:
        kinds = dict(conn.execute("SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute WHERE "
                                  "attrelid = 'widths'::regclass AND attnum > 0").fetchall())
    assert kinds["id"] == "bigint" and kinds["cat"] == "integer"
    texts = [{**r, "cat": f"c{r['cat']}"} for r in rows]
    texts[0]["text"] = "row 0 changed"
    result = cli("embed", write_rows(tmp_path / "d4.parquet", texts), "-o", pg.url("widths"), "--id-column", "id",
                 "--keep", "cat", "--cache-dir", days["cache"])
    assert result.exit_code == 2 and "cat: integer in the table, text by this run" in " ".join(result.stderr.split())


def test_urls_read_two_ways_are_refused_without_showing_them(pg: Any, days: dict[str, Path]) -> None:
    for secret, url in (("Xy/9Qz", "postgresql://app:Xy/9Qz+Kw7==@127.0.0.1:5/db?table=t"),
                        ("Cd9Ef", "postgresql://app:Ab#Cd9Ef@127.0.0.1:5/db?table=t"),
                        ("rty7Secret", "postgresql://app:Qw@rty7Secret@127.0.0.1:5/db?table=t"),
                        ("pa?ss", "postgresql://app:pa?ss@127.0.0.1:5/db?table=t")):
        result = cli("embed", days["d1"], "-o", url, "--id-column", "id")
        assert result.exit_code == 2 and "percent-encode" in result.stderr, result.output
        assert secret not in result.output and secret.split("/")[0][:3] not in result.stderr.replace("postgresql", "")
    # and a postgresql:// URL anywhere but -o is one line, not a traceback
    for args in ([pg.url("t"), "-o", "out.parquet"], [days["d1"], "-o", pg.url("t"), "--id-column", "id", "--changes",
                                                        pg.url("c") + "&x=.parquet"]):
        result = cli("embed", *args)
        assert result.exit_code == 2 and "Traceback" not in result.output and pg.password not in result.output
        assert "names a table to write" in result.stderr


def test_an_unfinished_run_in_parts_is_closed_by_the_next_commit(pg: Any, days: dict[str, Path]) -> None:
    """What a run in parts killed after its last part leaves (its job 'running', a rebuild's shadow
    table) is finished by the next run, even one with nothing to change: a new version, the job
    done, the shadow gone."""
    from hfbatch.io.targets.postgres import PgLocation, PostgresTarget
    from hfbatch.io.targets import parse_target

    sync(pg, days, "d1", "closing")
    target = PostgresTarget(parse_target(PgLocation(pg.url("closing"))))
    shadow = target._shadow_name()
    with pg.connect() as conn:
        conn.execute(f'CREATE TABLE "{shadow}" (id bigint)')
        conn.execute("CREATE TABLE IF NOT EXISTS hfbatch_jobs (table_name text PRIMARY KEY, job_id text NOT NULL, state "
                     "text NOT NULL, parts integer NOT NULL, rows_committed bigint NOT NULL, started_at timestamptz NOT "
                     "NULL, updated_at timestamptz NOT NULL)")
        conn.execute("INSERT INTO hfbatch_jobs VALUES ('closing', 'j1', 'running', 3, 60, now(), now())")
    doc = sync(pg, days, "d1", "closing")
    assert doc["metrics"]["texts_computed"] == 0 and doc["provenance"]["output"]["table"]["version"] == 2
    with pg.connect() as conn:
        assert conn.execute("SELECT state FROM hfbatch_jobs WHERE table_name = 'closing'").fetchone() == ("done",)
        assert conn.execute("SELECT to_regclass(%s)", (f'"{shadow}"',)).fetchone() == (None,)
    assert sync(pg, days, "d1", "closing")["provenance"]["output"]["table"]["version"] == 2  # then: no version


def test_a_63_byte_table_rebuilt_in_parts_and_indexes_of_alike_names(pg: Any, days: dict[str, Path]) -> None:
    long_name = "t" * 63
    for extra in ([], ["--rebuild", "--truncate-dim", "64", "--commit-every", "50", "--chunk-size", "50"]):
        sync(pg, days, "d1", long_name, *extra)
    assert len(rows_of(pg, long_name)) == len(day1_rows())
    with pg.connect() as conn:
        assert conn.execute("SELECT conname FROM pg_constraint WHERE conrelid = to_regclass(%s) AND contype = 'p'",
                            (f'"{long_name}"',)).fetchone() == ("t" * 58 + "_pkey",)
    # two tables whose names share their first 40 characters each keep their own index
    a, b = "customer_reviews_embeddings_for_search_v1_en", "customer_reviews_embeddings_for_search_v1_fr"
    for table in (a, b):
        sync(pg, days, "d1", table, "--index")
    with pg.connect() as conn:
        for table in (a, b):
            assert conn.execute("SELECT count(*) FROM pg_indexes WHERE tablename = %s AND indexdef LIKE '%%hnsw%%'",
                                (table,)).fetchone() == (1,), table


def test_k_above_an_hnsw_scans_reach_is_answered_whole(pg: Any, days: dict[str, Path], st_model: Any) -> None:
    """An HNSW scan returns at most ef_search rows; a k above it is answered without the index."""
    from hfbatch.io.targets import parse_target
    from hfbatch.io.targets.postgres import PgLocation, PostgresTarget

    sync(pg, days, "d1", "wide_k", "--index")
    target = PostgresTarget(parse_target(PgLocation(pg.url("wide_k"))))
    query = st_model.encode(["a quiet kettle"], normalize_embeddings=True)[0]
    try:
        assert len(target.nearest(query, 50, ["id"], ef_search=10)) == 50
    finally:
        target.close()


def test_a_tiny_lock_timeout_gives_up_and_a_dry_run_refuses_what_the_run_would(pg: Any, days: dict[str, Path],
                                                                              tmp_path: Path) -> None:
    from hfbatch.io.targets.postgres import LOCK_CLASS

    sync(pg, days, "d1", "locked")
    with pg.connect() as holder:
        holder.execute("SELECT pg_advisory_lock(%s, hashtext('public.locked'))", (LOCK_CLASS,))
        result = cli("embed", days["d2"], "-o", pg.url("locked"), "--id-column", "id", "--cache-dir", days["cache"],
                     "--lock-timeout", "0.0004")
        assert result.exit_code == 1 and "gave up after 0.0004 s" in " ".join(result.stderr.split()), result.output
    dry = cli("embed", days["d1"], "-o", pg.url("locked"), "--id-column", "id", "--dry-run", "--output-precision",
              "int8")
    assert dry.exit_code == 2 and "no pgvector type" in dry.stderr
    nested = write_rows(tmp_path / "nested.parquet", [{"id": 1, "text": "t", "tags": ["a", "x\x00y"]}])
    said = refused(nested, "-o", pg.url("nested"), "--id-column", "id", "--keep", "tags", "--cache-dir", days["cache"])
    assert "row 1, column 'tags' holds a NUL character" in said


def test_a_connection_cut_while_the_model_works_is_taken_again(pg: Any, days: dict[str, Path], tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """The run's connection idles while the model works; cut then (a firewall, an idle timeout:
    here pg_terminate_backend), the commit connects again, takes the lock again and goes on if the
    table is as planned; if another writer moved it meanwhile, nothing is written (exit 1)."""
    import tempfile
    import threading
    import time

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # (where this run stages its rows)

    def cut_once_staging(moved: bool) -> threading.Thread:
        def cut() -> None:
            deadline = time.monotonic() + 60
            with pg.connect() as conn:
                while time.monotonic() < deadline and not any(tmp_path.glob(".hfbatch-stage-*")):
                    time.sleep(0.005)
                conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = "
                             "'hfbatch' AND pid <> pg_backend_pid()")
                if moved:
                    conn.execute("UPDATE hfbatch_targets SET version = version + 1 WHERE table_name = 'cut'")
        thread = threading.Thread(target=cut)
        thread.start()
        return thread

    sync(pg, days, "d1", "cut")
    thread = cut_once_staging(moved=False)
    doc = embed(days["d2"], "-o", pg.url("cut"), "--id-column", "id", "--cache-dir", tmp_path / "c1",
                "--delete-missing", "--chunk-size", "2", "--batch-size", "1")
    thread.join()
    assert "reconnected, the table is as planned" in caplog.text
    assert doc["provenance"]["output"]["table"]["version"] == 2
    assert sorted(rows_of(pg, "cut")) == sorted(r["id"] for r in day2_rows())

    changed = write_rows(tmp_path / "d3.parquet", [{**r, "text": r["text"] + "!"} for r in day2_rows()])
    before = rows_of(pg, "cut")
    thread = cut_once_staging(moved=True)
    result = cli("embed", changed, "-o", pg.url("cut"), "--id-column", "id", "--cache-dir", tmp_path / "c2",
                 "--chunk-size", "20", "--batch-size", "1")
    thread.join()
    assert result.exit_code == 1 and "changed meanwhile (version 2 -> 3)" in " ".join(result.stderr.split())
    assert {i: r["xmin"] for i, r in rows_of(pg, "cut").items()} == {i: r["xmin"] for i, r in before.items()}


def test_columns_a_user_adds_to_the_table_are_left_as_they_are(pg: Any, days: dict[str, Path]) -> None:
    """A table's own columns that hfbatch does not write (a generated tsvector, a created_at with
    a default, a note filled by hand) survive day 2 and are filled by Postgres for new rows."""
    sync(pg, days, "d1", "extended")
    with pg.connect() as conn:
        conn.execute("ALTER TABLE extended ADD COLUMN note text, ADD COLUMN added_at timestamptz DEFAULT now(), "
                     "ADD COLUMN hash_len integer GENERATED ALWAYS AS (length(_hfbatch_hash)) STORED")
        conn.execute("UPDATE extended SET note = 'kept by hand' WHERE id = 0")
    doc = sync(pg, days, "d2", "extended", "--delete-missing")
    assert doc["metrics"]["sync"]["inserted"] == len(NEW)
    got = rows_of(pg, "extended")
    assert got[0]["note"] == "kept by hand" and all(got[i]["added_at"] is not None for i in NEW)
    assert all(r["hash_len"] == len(r[HASH]) for r in got.values())


# --- 8. pgvector 0.8 (Postgres 18): halfvec ---------------------------------------------------------


def test_float16_is_a_halfvec_table_on_pgvector_0_8_synced_indexed_and_searched(pg18: Any, days: dict[str, Path],
                                                                               st_model: Any) -> None:
    """Where the server's pgvector has halfvec (0.7.0 and later), --output-precision float16 makes
    `embedding halfvec(384)`: day 2 as on float32, the HNSW index with halfvec_cosine_ops, and a
    search that gives brute force's top 10 over the float16 vectors read back."""
    from hfbatch import search

    with pg18.connect() as conn:
        assert conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()[0] >= "0.7"
    url = pg18.url("half")
    embed(days["d1"], "-o", url, "--id-column", "id", "--cache-dir", days["cache"], "--output-precision", "float16")
    doc = embed(days["d2"], "-o", url, "--id-column", "id", "--cache-dir", days["cache"], "--output-precision", "float16",
                "--delete-missing", "--index")
    assert (doc["metrics"]["sync"]["inserted"], doc["metrics"]["sync"]["updated"]) == (len(NEW), len(CHANGED))
    assert doc["provenance"]["output"]["table"]["index"]["type"] == "hnsw"
    with pg18.connect() as conn:
        kind = conn.execute("SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = "
                            "'half'::regclass AND attname = 'embedding'").fetchone()[0]
        index = conn.execute("SELECT indexdef FROM pg_indexes WHERE tablename = 'half' AND indexdef LIKE '%hnsw%'")
        assert "halfvec_cosine_ops" in index.fetchone()[0]
        rows = conn.execute("SELECT id, embedding::text FROM half").fetchall()
    assert kind == "halfvec(384)" and sorted(i for i, _ in rows) == sorted(r["id"] for r in day2_rows())
    ids = [i for i, _ in rows]
    matrix = np.array([json.loads(v) for _, v in rows], dtype=np.float64)
    for query in ("a golden violin by the river", "the broken ladder waits in the attic"):
        q = st_model.encode([query], normalize_embeddings=True)[0].astype(np.float64)
        scores = matrix @ q / np.linalg.norm(matrix, axis=1)
        want = [ids[j] for j in np.argsort(-scores, kind="stable")[:10]]
        report = search(url, query, k=10)
        assert report["strategy"] == "postgres <=>" and report["precision"] == "float16"
        assert [h["id"] for h in report["hits"]] == want, query
