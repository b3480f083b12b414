"""A Postgres table with pgvector as a sync target (psycopg 3 + pgvector's adapters).

`-o postgresql://user@host:port/db?table=NAME[&schema=S]` (PgLocation): the password comes from
the URL, PGPASSWORD or a .pgpass file (libpq reads both), and is never shown: the URL is printed
and recorded as `user:***@host`. Names (schema, table, columns) are always quoted identifiers;
one longer than Postgres's 63 bytes (which it would cut silently, so two columns could become
one) or holding a NUL is refused before any work.

One run is one transaction on one connection, which holds a session advisory lock on the table
from planning to the end (`lock`): a second run on the table waits for it, or with
--lock-timeout is refused after that many seconds, and says which. The commit copies the rows
(binary COPY) into a temporary table, deletes the stale ids, merges the rows with INSERT ... ON
CONFLICT (key) DO UPDATE, and bumps the table's row in `hfbatch_targets` (its vector record and
version), then COMMITs: readers see the old rows or the new ones. A SIGKILL or a lost connection
at any moment rolls the transaction back, and the rerun converges.

The table: the id column (bigint or text, from the input), the kept columns, HASH_COLUMN,
`embedding vector(D)` (`halfvec(D)` for float16 where the server's pgvector has it, 0.7.0 or
later; other precisions are refused), and the columns the run adds (n_tokens, truncated,
embedding_error), with the key as primary key (pg_types.py types them; pg_url.py reads -o).
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa

from ...errors import InputError, OutputError, first_line
from . import HASH_COLUMN, ForeignTable, TargetSpec
from .pg_types import arrow_batch, copy_rows, family, jsonb_value, pg_type, vector_value
from .pg_url import JOBS_TABLE, MAX_NAME_BYTES, SHADOW_PREFIX, TARGETS_TABLE, PgLocation, check_name, is_postgres_url

__all__ = ["PostgresTarget", "PgLocation", "is_postgres_url", "check_name", "LOCK_CLASS"]

log = logging.getLogger(__name__)

EF_SEARCH_MAX = 1000  # pgvector's largest hnsw.ef_search: an HNSW scan returns at most this many rows
LOCK_CLASS = 0x68666201  # the advisory lock's first key ("hfb\x01"); the second: hashtext(schema.table)


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError as exc:  # pragma: no cover - a dependency of hfbatch
        raise InputError(f"-o postgresql://... needs psycopg: pip install 'psycopg[binary]' ({exc}).") from None
    return psycopg


class PostgresTarget:
    """A Postgres table synced by id (see the module)."""

    def __init__(self, spec: TargetSpec):
        self.spec = spec
        self.where: PgLocation = spec.location  # type: ignore[assignment]
        self._conn: Any = None
        self._locked = False
        self._lock_timeout: float | None = None
        self._seen_version: int | None = None  # the version planned on (checked again after a reconnect)
        self._pending_job: dict[str, Any] | None = None  # an earlier run in parts that did not finish
        self._written: set[Any] = set()  # the ids this run has upserted (its parts', then its commit's)
        self.stages: str | None = None  # --engine ray: the prefix of the staging tables its workers wrote

    # --- the connection -----------------------------------------------------------------------

    def _connect(self) -> Any:
        if self._conn is not None and not self._conn.closed and not self._conn.broken:
            return self._conn
        relock = self._locked  # a connection lost while the run worked: its lock went with it
        self._conn, self._locked = None, False
        psycopg = _psycopg()
        try:
            # keepalives: the run's connection idles while the model works; a NAT or firewall
            # that drops idle connections would otherwise cost the run at its commit
            conn = psycopg.connect(self.where.conninfo, autocommit=True, application_name="hfbatch",
                                   connect_timeout=15, keepalives=1, keepalives_idle=60, keepalives_interval=15)
        except psycopg.Error as exc:
            raise OutputError(f"-o {self.where}: cannot connect ({self.where.clean(first_line(exc, 300))}); check the "
                              "host, port, database, user and password (PGPASSWORD or ~/.pgpass).") from None
        self._conn = conn
        if relock:
            self.lock(self._lock_timeout)
            now = self.version()
            if now != self._seen_version:
                raise OutputError(f"-o {self.where}: the connection was lost while this run worked and the table "
                                  f"changed meanwhile (version {self._seen_version} -> {now}); nothing was written: "
                                  "run again.")
            log.warning("%s: the connection was lost while this run worked; reconnected, the table is as planned.",
                        self.where)
        return conn

    def _fresh(self) -> Any:
        """The run's connection, checked alive before a commit (an idle one may have been cut
        while the model worked): if it was, a new one, holding the lock again, on the table as
        planned (else refused)."""
        psycopg = _psycopg()
        conn = self._connect()
        try:
            conn.execute("SELECT 1")
        except psycopg.OperationalError:
            self._conn = None  # (`_locked` stays: _connect takes the lock again and checks the version)
            conn = self._connect()
        return conn

    def _sql(self, query: Any, params: Sequence[Any] | None = None, *, fetch: bool = True,
             doing: str = "reading the table's catalog") -> list[tuple[Any, ...]]:
        conn = self._connect()
        with self._errors(doing, rolled_back=False):
            with conn.cursor() as cur:
                cur.execute(query, params)
                return cur.fetchall() if fetch and cur.description is not None else []

    def _errors(self, doing: str, *, rolled_back: bool = True, after: str = "") -> Any:
        return _PgErrors(self, doing, rolled_back=rolled_back, after=after)

    def _ident(self, name: str | None = None) -> Any:
        from psycopg import sql

        return sql.Identifier(self.where.schema, name or self.where.table)

    def _regclass(self, name: str | None = None) -> str:
        """schema.table quoted, as to_regclass() and ::regclass read it."""
        return self._ident(name).as_string(self._connect())

    def close(self) -> None:
        """End the session: its advisory lock goes with it."""
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:  # noqa: BLE001 - a lost connection is closed either way
                pass
        self._conn, self._locked = None, False

    def lock(self, timeout: float | None) -> None:
        """Hold the table's advisory lock for this run (planning to commit): wait for another run
        holding it (said on screen), or with `timeout` seconds give up after them (0: at once)."""
        if self._locked:
            return
        self._lock_timeout = timeout
        key = (LOCK_CLASS, self.where.qualified)
        got = self._sql("SELECT pg_try_advisory_lock(%s, hashtext(%s))", key, doing="taking the table's lock")[0][0]
        if not got:
            holder = self._sql("SELECT a.pid, a.backend_start FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                               "WHERE l.locktype = 'advisory' AND l.classid = %s::oid AND l.objid = hashtext(%s)::oid "
                               "AND l.granted LIMIT 1", (LOCK_CLASS & 0xFFFFFFFF, self.where.qualified),
                               doing="taking the table's lock")
            who = f" (Postgres pid {holder[0][0]}, since {holder[0][1]:%H:%M:%S})" if holder else ""
            if timeout == 0:
                raise _busy(self.where, who, timeout)
            log.warning("%s: another hfbatch run holds this table%s; waiting for it%s.", self.where, who,
                        f" (at most {timeout:g} s, --lock-timeout)" if timeout else " (--lock-timeout N gives up after N s)")
            psycopg = _psycopg()
            conn = self._connect()
            started = time.monotonic()
            # (Postgres reads lock_timeout 0 as "none": a positive timeout waits at least 1 ms)
            ms = min(2**31 - 1, max(1, math.ceil(timeout * 1000))) if timeout else 0
            try:
                with conn.cursor() as cur:
                    cur.execute(f"SET lock_timeout = {int(ms)}")
                    cur.execute("SELECT pg_advisory_lock(%s, hashtext(%s))", key)
                    cur.execute("SET lock_timeout = 0")
            except psycopg.errors.LockNotAvailable:
                raise _busy(self.where, who, timeout) from None
            except psycopg.Error as exc:
                self.close()
                raise self._lost(exc, "waiting for the table's lock", rolled_back=False) from None
            log.warning("%s: the other run finished after %.1f s; this run goes on.", self.where,
                        time.monotonic() - started)
        self._locked = True
        for old in self._stage_tables(self.stage_prefix()):  # a killed Ray run's (no other run can be using them)
            self._sql(sql_drop(self._ident(old)), fetch=False, doing="dropping a killed run's staging table")
        self._pending_job = self.unfinished_job()
        job = self._pending_job
        if job is not None:
            log.warning("%s: an earlier run in parts (--commit-every; job %s, started %s) stopped after committing "
                        "%d rows in %d transactions; its rows are in the table with their new hashes, so this run "
                        "embeds only the rest (a rebuild in parts starts again).", self.where, job["job_id"][:8],
                        f"{job['started_at']:%Y-%m-%d %H:%M:%S}", job["rows_committed"], job["parts"])

    @property
    def pending(self) -> bool:
        """An earlier run in parts did not finish: this run's final commit closes it (a new version)."""
        return self._pending_job is not None

    def _lost(self, exc: BaseException, doing: str, *, rolled_back: bool = True, after: str = "") -> OutputError:
        psycopg = _psycopg()
        again = ": run again" if isinstance(exc, psycopg.OperationalError) else ""  # (refused data fails again)
        tail = after or ("; the transaction was rolled back, the table is as it was" if rolled_back else "")
        return OutputError(f"-o {self.where}: Postgres failed while {doing} "
                           f"({self.where.clean(first_line(exc, 300))}){tail}{again}.")

    # --- reading ------------------------------------------------------------------------------

    def _schema_exists(self) -> bool:
        return bool(self._sql("SELECT 1 FROM pg_namespace WHERE nspname = %s", (self.where.schema,)))

    def exists(self) -> bool:
        if not self._schema_exists():
            raise InputError(f"-o {self.where}: schema {self.where.schema!r} does not exist in this database; create "
                             f"it (CREATE SCHEMA ...), or drop schema= from -o for public.")
        return self._relation(self.where.table) is not None

    def _relation(self, name: str) -> str | None:
        rows = self._sql("SELECT to_regclass(%s)::text", (self._regclass(name),))
        return rows[0][0] if rows else None

    def pgvector_version(self) -> tuple[int, ...]:
        """pgvector in this database, installed here when missing (CREATE EXTENSION)."""
        rows = self._sql("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
        if not rows:
            try:
                self._sql("CREATE EXTENSION IF NOT EXISTS vector", fetch=False, doing="installing pgvector")
            except OutputError as exc:
                raise InputError(f"-o {self.where}: pgvector is not installed in this database and this user cannot "
                                 f"install it ({exc}); ask its owner to run CREATE EXTENSION vector.") from None
            rows = self._sql("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
        return tuple(int(p) for p in re.findall(r"\d+", rows[0][0])[:3])

    def check_run(self, precision: str, columns: Sequence[str]) -> None:
        """Before any work: an --output-precision this server's pgvector has no type for, and
        names Postgres cannot keep, refused in one line."""
        for name in columns:
            check_name(name, "column")
        value = {"float32": pa.float32(), "float16": pa.float16(), "uint8": pa.uint8(), "ubinary": pa.uint8()}
        pg_type(pa.field("embedding", pa.list_(value.get(precision, pa.int8()), 1)), self.pgvector_version())

    def check_rows(self, batch: pa.RecordBatch, columns: Sequence[str], where: Any, first: int) -> None:
        """A NUL character in a kept text column, a text id or a nested (jsonb) value, which
        Postgres cannot hold: refused while planning, naming the row and column, not at the commit."""
        import pyarrow.compute as pc

        for name in columns:
            column = batch.column(name)
            if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
                hits = pc.match_substring(column, "\x00")
                at = int(pc.index(hits, True).as_py()) if pc.any(hits).as_py() else -1
            elif pa.types.is_nested(column.type):
                at = next((i for i, v in enumerate(column.to_pylist())
                           if v is not None and "\\u0000" in json.dumps(v, default=str)), -1)
            else:
                continue
            if at >= 0:
                raise InputError(f"{where}: row {first + at + 1:,}, column {name!r} holds a NUL character, which "
                                 "Postgres cannot store; remove it from the input (or the column from --keep).")

    def _row(self) -> tuple[Any, ...] | None:
        from psycopg import sql

        if self._relation(TARGETS_TABLE) is None:
            return None
        rows = self._sql(sql.SQL("SELECT record, version FROM {} WHERE table_name = %s").format(
            self._ident(TARGETS_TABLE)), (self.where.table,))
        return rows[0] if rows else None

    def record(self) -> dict[str, Any] | None:
        if not self.exists():
            return None
        row = self._row()
        if row is None:
            raise ForeignTable(f"-o {self.where}: a table that hfbatch did not write (no row for it in "
                               f"{self.where.schema}.{TARGETS_TABLE}); give another table, or --rebuild to replace it.")
        record = row[0]
        if not isinstance(record, dict):
            raise ForeignTable(f"-o {self.where}: its hfbatch record is not an object (edited by hand?); rebuild it "
                               "with --rebuild.")
        return record

    def version(self) -> int | None:
        row = self._row() if self.exists() else None
        version = int(row[1]) if row is not None else None
        if self._seen_version is None:
            self._seen_version = version
        return version

    def count_rows(self, where: str | None = None) -> int:
        """Rows in the table (`where`: only those whose `embedding IS NULL`, the one filter asked for)."""
        total, missing = self.counts()
        return missing if where == "embedding IS NULL" else total

    def counts(self) -> tuple[int, int]:
        """(rows, rows without a vector), in one scan."""
        from psycopg import sql

        if not self.exists():
            return 0, 0
        has_vector = "embedding" in dict(self.columns())
        rows = self._sql(sql.SQL("SELECT count(*), {} FROM {}").format(
            sql.SQL("count(*) FILTER (WHERE embedding IS NULL)" if has_vector else "0"), self._ident()))
        return int(rows[0][0]), int(rows[0][1])

    def columns(self, name: str | None = None) -> list[tuple[str, str]]:
        """(name, Postgres type) of the table's (or table `name`'s) columns, in order."""
        return [(r[0], r[1]) for r in self._sql(
            "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = to_regclass(%s) "
            "AND attnum > 0 AND NOT attisdropped ORDER BY attnum", (self._regclass(name),))]

    def schema(self) -> pa.Schema | None:
        """The table's column names (typed loosely: check_columns compares names)."""
        if not self.exists():
            return None
        return pa.schema([pa.field(name, pa.string()) for name, _ in self.columns()])

    def state(self, id_column: str) -> pa.Table:
        from psycopg import sql

        have = dict(self.columns())
        if id_column not in have or HASH_COLUMN not in have:
            missing = id_column if id_column not in have else HASH_COLUMN
            raise InputError(f"{self.where}: has no column {missing!r}, so it was not synced by --id-column "
                             f"{id_column}; use --rebuild to replace it, or another -o.")
        rows = self._sql(sql.SQL("SELECT {}, {} FROM {}").format(sql.Identifier(id_column), sql.Identifier(HASH_COLUMN),
                                                                 self._ident()))
        integer = family(have[id_column]) == "integer"
        ids, hashes = (list(c) for c in zip(*rows)) if rows else ([], [])
        if integer:
            ids = [int(i) for i in ids]  # (a numeric column answers Decimals)
        return pa.table({id_column: pa.array(ids, pa.int64() if integer else pa.string()),
                         HASH_COLUMN: pa.array(hashes, pa.string())})

    def batches(self, columns: Sequence[str] | None = None, *, size: int = 4096) -> Iterator[pa.RecordBatch]:
        """The table's rows (vectors as float32 lists, jsonb as JSON text), streamed by a
        server-side cursor."""
        from psycopg import sql

        if not self.exists():
            return
        chosen = [(n, t) for n, t in self.columns() if columns is None or n in columns]
        conn = self._connect()
        self._register(conn)
        with self._errors("reading the table", rolled_back=False), conn.transaction(), \
                conn.cursor(name="hfbatch_read") as cur:
            cur.execute(sql.SQL("SELECT {} FROM {}").format(sql.SQL(", ").join(sql.Identifier(n) for n, _ in chosen),
                                                          self._ident()))
            while rows := cur.fetchmany(size):
                yield arrow_batch(rows, chosen)

    def nearest(self, vector: np.ndarray, k: int, columns: Sequence[str], *, ef_search: int = EF_SEARCH_MAX) -> list[tuple[Any, ...]]:
        """The k rows nearest `vector` by `<=>` (cosine distance), with it last: Postgres's own
        search, exact without an index; an HNSW index is searched with hnsw.ef_search =
        `ef_search` (its most), an IVFFlat one with every list probed; a k above `ef_search`
        (more than an HNSW scan can return) is answered by a scan without the index. jsonb
        values come back as JSON text, as `batches` gives them."""
        from psycopg import sql

        conn = self._connect()
        self._register(conn)
        types = dict(self.columns())
        with self._errors("searching the table", rolled_back=False), conn.transaction(), conn.cursor() as cur:
            cur.execute(sql.SQL("SET LOCAL hnsw.ef_search = {}").format(sql.Literal(int(ef_search))))
            cur.execute("SET LOCAL ivfflat.probes = 32768")
            if k > ef_search:
                cur.execute("SET LOCAL enable_indexscan = off")
            cur.execute(sql.SQL("SELECT {}, embedding <=> %s AS _distance FROM {} WHERE embedding IS NOT NULL "
                                "ORDER BY embedding <=> %s LIMIT %s").format(
                sql.SQL(", ").join(sql.Identifier(c) for c in columns), self._ident()),
                (vector_value(vector), vector_value(vector), int(k)))
            rows = cur.fetchall()
        jsonb = [types.get(c) == "jsonb" for c in columns]
        return [tuple(json.dumps(v) if j and v is not None else v for v, j in zip(row, [*jsonb, False]))
                for row in rows]

    def size_bytes(self) -> int:
        if not self.exists():
            return 0
        return int(self._sql("SELECT pg_total_relation_size(to_regclass(%s))", (self._regclass(),))[0][0] or 0)

    # --- writing ------------------------------------------------------------------------------

    def _register(self, conn: Any) -> None:
        from pgvector.psycopg import register_vector

        register_vector(conn)

    def _columns_of(self, schema: pa.Schema, key: Sequence[str]) -> list[tuple[str, str]]:
        pgvector = self.pgvector_version()
        wanted = [(f.name, "bigint" if f.name == key[0] and pa.types.is_integer(f.type) else pg_type(f, pgvector))
                  for f in schema]
        for name, _ in wanted:
            check_name(name, "column")
        return wanted

    def _create(self, cur: Any, table: Any, wanted: Sequence[tuple[str, str]], key: Sequence[str]) -> None:
        from psycopg import sql

        cur.execute(sql.SQL("CREATE TABLE {} ({}, PRIMARY KEY ({}))").format(
            table, sql.SQL(", ").join(sql.SQL("{} {}").format(sql.Identifier(n), sql.SQL(t)) for n, t in wanted),
            sql.SQL(", ").join(sql.Identifier(k) for k in key)))

    def _merge(self, cur: Any, table: Any, rows: Iterator[pa.RecordBatch], wanted: Sequence[tuple[str, str]],
               key: Sequence[str]) -> int:
        """COPY `rows` into a temporary table of `table`'s own column types, then upsert them into
        `table` by `key`: the rows sent."""
        from psycopg import sql

        names = sql.SQL(", ").join(sql.Identifier(n) for n, _ in wanted)
        cur.execute("DROP TABLE IF EXISTS pg_temp.hfbatch_stage")
        cur.execute(sql.SQL("CREATE TEMP TABLE hfbatch_stage ON COMMIT DROP AS SELECT {} FROM {} WITH NO DATA")
                    .format(names, table))
        cur.execute("SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = "
                    "'pg_temp.hfbatch_stage'::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum")
        types = [re.sub(r"^[^(]*\.", "", r[0]).split("(")[0] for r in cur.fetchall()]  # (vector(384) -> vector)
        sent = 0
        stages = self._stage_tables(self.stages) if self.stages else []
        if self.stages:  # Ray's workers wrote the rows (`rows`, the driver's copy, has no vectors)
            for _ in rows:
                pass
            if stages:  # (a row twice: a retried block; the same input, so either copy)
                union = sql.SQL(" UNION ALL ").join(sql.SQL("SELECT {} FROM {}").format(names, self._ident(s))
                                                    for s in stages)
                cur.execute(sql.SQL("INSERT INTO hfbatch_stage ({}) SELECT DISTINCT ON ({}) {} FROM ({}) u").format(
                    names, sql.SQL(", ").join(sql.Identifier(k) for k in key), names, union))
                sent = cur.rowcount
            for stage in stages:  # (dropped with this transaction's commit; a rollback keeps them for the rerun's lock)
                cur.execute(sql_drop(self._ident(stage)))
        else:
            with cur.copy(sql.SQL("COPY hfbatch_stage ({}) FROM STDIN (FORMAT BINARY)").format(names)) as copy:
                copy.set_types(types)
                for batch in rows:
                    for row in copy_rows(batch, key):
                        copy.write_row(row)
                    sent += batch.num_rows
        others = [n for n, _ in wanted if n not in key]
        cur.execute(sql.SQL("INSERT INTO {} ({}) SELECT {} FROM hfbatch_stage ON CONFLICT ({}) DO UPDATE SET {}").format(
            table, names, names, sql.SQL(", ").join(sql.Identifier(k) for k in key),
            sql.SQL(", ").join(sql.SQL("{} = EXCLUDED.{}").format(sql.Identifier(n), sql.Identifier(n)) for n in others)))
        if len(key) > 1:  # --split: an upserted document's windows that this run did not write again go
            ident = sql.Identifier(key[0])
            cur.execute(sql.SQL("DELETE FROM {} t WHERE t.{} IN (SELECT {} FROM hfbatch_stage) AND NOT EXISTS "
                                "(SELECT 1 FROM hfbatch_stage s WHERE {})").format(
                table, ident, ident, sql.SQL(" AND ").join(
                    sql.SQL("s.{} = t.{}").format(sql.Identifier(k), sql.Identifier(k)) for k in key)))
        cur.execute(sql.SQL("SELECT DISTINCT {} FROM hfbatch_stage").format(sql.Identifier(key[0])))
        self._written.update(r[0] for r in cur.fetchall())
        return sent

    # --- staging tables of Ray's workers ------------------------------------------------------------

    def stage_prefix(self, job: str = "") -> str:
        """The names of this table's staging tables start so (a job's: with its id too)."""
        return f"hfbatch_stage_{_digest(self.where.qualified)}_{job}"

    def _stage_tables(self, prefix: str) -> list[str]:
        like = prefix.replace("_", "\\_") + "%"
        return [r[0] for r in self._sql("SELECT tablename FROM pg_tables WHERE schemaname = %s AND tablename LIKE %s "
                                        "ORDER BY tablename", (self.where.schema, like))]

    def stage_rows(self, stage: str, rows: pa.Table, key: Sequence[str]) -> None:
        """A Ray worker's rows into its own UNLOGGED staging table (made by its first call), in one
        transaction per call; the driver's commit merges every staging table of the job."""
        from psycopg import sql

        conn = self._connect()
        self._register(conn)
        wanted = self._columns_of(rows.schema, key)
        names = sql.SQL(", ").join(sql.Identifier(n) for n, _ in wanted)
        with self._errors("staging a worker's rows", rolled_back=False), conn.transaction(), conn.cursor() as cur:
            cur.execute(sql.SQL("CREATE UNLOGGED TABLE IF NOT EXISTS {} ({})").format(
                self._ident(stage), sql.SQL(", ").join(sql.SQL("{} {}").format(sql.Identifier(n), sql.SQL(t))
                                                       for n, t in wanted)))
            with cur.copy(sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(self._ident(stage), names)) as copy:
                copy.set_types([t.split("(")[0] for _, t in wanted])
                for batch in rows.to_batches(max_chunksize=8192):
                    for row in copy_rows(batch, key):
                        copy.write_row(row)

    def new_job(self) -> dict[str, Any]:
        """A run in parts (--commit-every): its id and watermark, and the table's bytes before it."""
        import uuid

        return {"job_id": uuid.uuid4().hex, "parts": 0, "rows_committed": 0, "bytes_before": self.size_bytes()}

    def commit_part(self, rows: pa.RecordBatchReader, *, key: Sequence[str], replace: bool, job: dict[str, Any]) -> None:
        """--commit-every: one transaction upserting `rows` (no deletes, no new version) and moving
        the job's watermark in hfbatch_jobs. A run that creates or rebuilds the table writes its parts
        into a shadow table, swapped in by the final commit: the table never holds rows of two
        vector spaces, and readers see the old table whole until then."""
        from psycopg import sql

        conn = self._fresh()  # (first: every query below needs a live connection)
        wanted = self._columns_of(rows.schema, key)
        self._register(conn)
        after = (f"; part {job['parts'] + 1} was rolled back, the {job['parts']} parts before it are in the table "
                 "(a rerun goes on from them)")
        with self._errors(f"committing part {job['parts'] + 1} of the run", after=after), conn.transaction(), \
                conn.cursor() as cur:
            self._ensure_bookkeeping(cur)
            if replace:
                into = self._ident(self._shadow_name())
                if not job["parts"]:  # (a killed run's shadow goes: its rebuild starts again)
                    cur.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(into))
                    self._create(cur, into, wanted, key)
            else:
                into = self._ident()
                _check_shape(self.where, self.columns(), wanted)
            sent = self._merge(cur, into, rows, wanted, key)
            job["parts"] += 1
            job["rows_committed"] += sent
            self._watermark(cur, job, "running")

    def commit(self, rows: pa.RecordBatchReader, *, key: Sequence[str], id_column: str, stale: Sequence[Any],
               record: Mapping[str, Any], replace: bool, job: dict[str, Any] | None = None) -> dict[str, Any]:
        from psycopg import sql

        conn = self._fresh()  # (first: every query below needs a live connection)
        wanted = self._columns_of(rows.schema, key)
        self._register(conn)
        table = self._ident()
        before = job["bytes_before"] if job is not None else self.size_bytes()
        exists = self.exists()
        shadow_name = self._shadow_name()
        shadow = bool(replace and job and job["parts"])  # the parts went into the shadow table
        with self._errors("committing the run"), conn.transaction(), conn.cursor() as cur:
            self._ensure_bookkeeping(cur)
            if shadow:
                self._merge(cur, self._ident(shadow_name), rows, wanted, key)
                if exists:
                    cur.execute(sql.SQL("DROP TABLE {}").format(table))
                cur.execute(sql.SQL("ALTER TABLE {} RENAME TO {}").format(self._ident(shadow_name),
                                                                         sql.Identifier(self.where.table)))
                self._rename_primary_key(cur)
            else:
                cur.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(self._ident(shadow_name)))  # (a killed rebuild's)
                if exists and not replace:
                    _check_shape(self.where, self.columns(), wanted)
                else:
                    if exists:
                        cur.execute(sql.SQL("DROP TABLE {}").format(table))
                    self._create(cur, table, wanted, key)
                self._merge(cur, table, rows, wanted, key)
            # the ids gone (and changed ones no longer written): `stale` names, with --split, also
            # the upserted documents, whose old windows the merges removed; those stay
            gone = [i for i in stale if i not in self._written]
            if gone:
                id_type = dict(self.columns())[id_column]
                cur.execute(sql.SQL("DELETE FROM {} WHERE {} = ANY(%s::{}[])").format(
                    table, sql.Identifier(id_column), sql.SQL(id_type)), (gone,))
            cur.execute(sql.SQL("INSERT INTO {} AS t (table_name, record, version, updated_at) VALUES (%s, %s, 1, now()) "
                                "ON CONFLICT (table_name) DO UPDATE SET record = EXCLUDED.record, "
                                "version = t.version + 1, updated_at = now() RETURNING version").format(
                self._ident(TARGETS_TABLE)), (self.where.table, jsonb_value(record)))
            version = int(cur.fetchone()[0])
            if job is not None:
                self._watermark(cur, job, "done")
            elif self._pending_job is not None:  # an earlier run in parts: this commit finishes it
                cur.execute(sql.SQL("UPDATE {} SET state = 'done', updated_at = now() WHERE table_name = %s").format(
                    self._ident(JOBS_TABLE)), (self.where.table,))
        self._pending_job = None
        return {"version": version, "bytes_added": max(0, self.size_bytes() - before)}

    def _rename_primary_key(self, cur: Any) -> None:
        """The swapped-in shadow's primary key named as Postgres would name the table's own
        (`<table cut to 58 bytes>_pkey`), unless another relation has that name."""
        from psycopg import sql

        cur.execute("SELECT conname FROM pg_constraint WHERE conrelid = to_regclass(%s) AND contype = 'p'",
                    (self._regclass(),))
        found = cur.fetchone()
        wanted = _pkey_name(self.where.table)
        cur.execute("SELECT to_regclass(%s)", (self._regclass(wanted),))
        if found and found[0] != wanted and cur.fetchone()[0] is None:
            cur.execute(sql.SQL("ALTER TABLE {} RENAME CONSTRAINT {} TO {}").format(
                self._ident(), sql.Identifier(found[0]), sql.Identifier(wanted)))

    def _shadow_name(self) -> str:
        """The table a rebuild in parts (--commit-every) writes before it is swapped in."""
        return SHADOW_PREFIX + _digest(self.where.qualified)

    def _watermark(self, cur: Any, job: Mapping[str, Any], state: str) -> None:
        """The job's progress in hfbatch_jobs (one row per table: its last job in parts)."""
        from psycopg import sql

        cur.execute(sql.SQL("INSERT INTO {} AS j VALUES (%s, %s, %s, %s, %s, now(), now()) ON CONFLICT (table_name) "
                            "DO UPDATE SET job_id = EXCLUDED.job_id, state = EXCLUDED.state, parts = EXCLUDED.parts, "
                            "rows_committed = EXCLUDED.rows_committed, updated_at = now(), started_at = CASE WHEN "
                            "j.job_id = EXCLUDED.job_id THEN j.started_at ELSE now() END").format(self._ident(JOBS_TABLE)),
                    (self.where.table, job["job_id"], state, job["parts"], job["rows_committed"]))

    def unfinished_job(self) -> dict[str, Any] | None:
        """The last job in parts on this table when it stopped before its final commit."""
        from psycopg import sql

        if self._relation(JOBS_TABLE) is None:
            return None
        rows = self._sql(sql.SQL("SELECT job_id, parts, rows_committed, started_at FROM {} WHERE table_name = %s AND "
                                 "state = 'running'").format(self._ident(JOBS_TABLE)), (self.where.table,))
        return dict(zip(("job_id", "parts", "rows_committed", "started_at"), rows[0])) if rows else None

    def _ensure_bookkeeping(self, cur: Any) -> None:
        """hfbatch_targets and hfbatch_jobs in the table's schema, made once (two first runs in one
        schema at once: one waits for the other's)."""
        from psycopg import sql

        if self._relation(TARGETS_TABLE) is not None and self._relation(JOBS_TABLE) is not None:
            return
        cur.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (LOCK_CLASS, f"{self.where.schema}.{TARGETS_TABLE}"))
        cur.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} (table_name text PRIMARY KEY, record jsonb NOT NULL, "
                            "version bigint NOT NULL, updated_at timestamptz NOT NULL)").format(self._ident(TARGETS_TABLE)))
        cur.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} (table_name text PRIMARY KEY, job_id text NOT NULL, "
                            "state text NOT NULL, parts integer NOT NULL, rows_committed bigint NOT NULL, "
                            "started_at timestamptz NOT NULL, updated_at timestamptz NOT NULL)").format(
            self._ident(JOBS_TABLE)))

    def build_index(self, kind: str | None = None) -> dict[str, Any]:
        """A cosine HNSW or IVFFlat index on `embedding`, built CONCURRENTLY (readers and writers
        go on), replacing the one hfbatch built on this table before (named for this table alone)."""
        from psycopg import sql

        kind = kind or "hnsw"
        name = f"hfbatch_{_digest(self.where.qualified)}_{kind}"
        ops = "halfvec_cosine_ops" if family(dict(self.columns()).get("embedding", "")).startswith("halfvec") \
            else "vector_cosine_ops"
        with_ = sql.SQL("")
        if kind == "ivfflat":
            lists = max(1, min(32768, int(self.count_rows() ** 0.5)))
            with_ = sql.SQL(" WITH (lists = {})").format(sql.Literal(lists))
        started = time.monotonic()
        ours = [r[0] for r in self._sql(
            "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid WHERE i.indrelid = to_regclass(%s) "
            "AND c.relname LIKE %s", (self._regclass(), f"hfbatch\\_{_digest(self.where.qualified)}\\_%"))]
        try:
            for old in ours:
                self._sql(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(self._ident(old)), fetch=False,
                          doing="dropping the table's earlier index")
            self._sql(sql.SQL("CREATE INDEX CONCURRENTLY {} ON {} USING {} (embedding {}){}").format(
                sql.Identifier(name), self._ident(), sql.SQL(kind), sql.SQL(ops), with_), fetch=False,
                doing=f"building the {kind} index")
        except OutputError as exc:
            return {"type": kind, "error": str(exc)}
        return {"type": kind, "metric": "cosine", "name": name, "seconds": round(time.monotonic() - started, 2)}


class _PgErrors:
    """psycopg's errors inside a target call, as one-line OutputErrors without secrets."""

    def __init__(self, target: PostgresTarget, doing: str, *, rolled_back: bool, after: str):
        self.target, self.doing, self.rolled_back, self.after = target, doing, rolled_back, after

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> bool:
        if exc is None or isinstance(exc, (InputError, OutputError)):
            return False
        psycopg = _psycopg()
        if isinstance(exc, psycopg.Error):
            if isinstance(exc, psycopg.OperationalError) or self.target._conn is None or self.target._conn.closed:
                self.target.close()
            raise self.target._lost(exc, self.doing, rolled_back=self.rolled_back, after=self.after) from None
        return False


def _busy(where: PgLocation, who: str, timeout: float | None) -> OutputError:
    waited = "at once (--lock-timeout 0)" if not timeout else f"after {timeout:g} s (--lock-timeout)"
    return OutputError(f"-o {where}: another hfbatch run holds this table{who}; gave up {waited}, nothing was "
                       "changed: run again once it has finished.")


def _check_shape(where: PgLocation, have: Sequence[tuple[str, str]], wanted: Sequence[tuple[str, str]]) -> None:
    """The existing table has the columns this run writes, each of a type of the same family
    (integers of another width cast), else a one-line refusal naming the difference. Columns of
    the table's own that the run does not write are left as they are."""
    has, wants = dict(have), dict(wanted)
    differ = [f"{n}: {has.get(n, 'missing')} in the table, {wants[n]} by this run"
              for n in wants if n not in has or family(has[n]) != family(wants[n])]
    if differ:
        raise InputError(f"-o {where}: the table has another shape than this run's ({'; '.join(differ[:4])}); give "
                         "--rebuild to replace it, or another table.")


def sql_drop(ident: Any) -> Any:
    from psycopg import sql

    return sql.SQL("DROP TABLE IF EXISTS {}").format(ident)


def _digest(text: str) -> str:
    import hashlib

    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def _pkey_name(table: str) -> str:
    """The name Postgres gives a table's primary key: `<table>_pkey`, the table's part cut so the
    whole fits in 63 bytes."""
    return table.encode()[:MAX_NAME_BYTES - len("_pkey")].decode(errors="ignore") + "_pkey"


