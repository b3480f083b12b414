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
`embedding vector(D)` (`halfvec(D)` for float16 and `bit(D)` for binary where the server's
pgvector has them, 0.7.0 or later; int8/uint8 have no pgvector type and are refused), and the
columns the run adds (n_tokens, truncated, embedding_error), with the key as primary key.
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any, Iterator, Mapping, Sequence
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import numpy as np
import pyarrow as pa

from ...errors import InputError, OutputError, first_line, redact_text
from . import HASH_COLUMN, ForeignTable, TargetSpec, encode_record

log = logging.getLogger(__name__)

SCHEMES = ("postgresql", "postgres")
TARGETS_TABLE = "hfbatch_targets"  # one row per synced table: its vector record and version
JOBS_TABLE = "hfbatch_jobs"  # one row per table synced in parts (--commit-every): the last job's watermark
MAX_NAME_BYTES = 63  # NAMEDATALEN - 1: Postgres cuts longer names (silently, with a NOTICE)
HALFVEC_SINCE = (0, 7, 0)  # pgvector's halfvec and bit operators
LOCK_CLASS = 0x68666201  # the advisory lock's first key ("hfb\x01"); the second: hashtext(schema.table)
_SECRET_QUERY = ("password", "sslpassword")


def is_postgres_url(text: Any) -> bool:
    return isinstance(text, (str, PgLocation)) and str(text).split("://", 1)[0].lower() in SCHEMES and "://" in str(text)


def check_name(name: str, what: str) -> str:
    """A schema, table or column name Postgres keeps as given (quoted), else a one-line refusal."""
    if not name:
        raise InputError(f"{what}: an empty name; give a name.")
    if "\x00" in name:
        raise InputError(f"{what} {name[:40]!r}: a NUL character cannot be in a Postgres name; rename it.")
    if len(name.encode()) > MAX_NAME_BYTES:
        raise InputError(f"{what} {name[:40]!r}...: {len(name.encode())} bytes, longer than Postgres's "
                         f"{MAX_NAME_BYTES}-byte names (it would cut it); rename it.")
    return name


class PgLocation:
    """A table -o names by a postgresql:// URL. `str()` and `url` are the URL without its password
    (the only forms ever shown or recorded); `conninfo` (with it) goes to libpq alone."""

    def __init__(self, url: str):
        parts = urlsplit(str(url))
        query = parse_qsl(parts.query, keep_blank_values=True)
        self.shown = _shown(parts, query)
        table = [v for k, v in query if k == "table"]
        schema = [v for k, v in query if k == "schema"]
        if not table or not table[-1]:
            raise InputError(f"-o {self.shown}: names no table; add ?table=NAME (and &schema=NAME for another "
                             "schema than public).")
        self.table = check_name(table[-1], "-o ...?table=")
        if self.table in (TARGETS_TABLE, JOBS_TABLE) or self.table.startswith("hfbatch_new_"):
            raise InputError(f"-o {self.shown}: {self.table} is the name of hfbatch's own bookkeeping table; give "
                             "another table name.")
        self.schema = check_name(schema[-1], "-o ...&schema=") if schema else "public"
        if not parts.path.strip("/") and not any(k == "dbname" for k, _ in query):
            raise InputError(f"-o {self.shown}: names no database; give postgresql://user@host:port/DBNAME?table=...")
        rest = [(k, v) for k, v in query if k not in ("table", "schema")]
        self._conninfo = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(rest), ""))
        self.password = parts.password  # (only to be removed from messages)

    @property
    def conninfo(self) -> str:
        return self._conninfo

    @property
    def url(self) -> str:
        return self.shown

    @property
    def name(self) -> str:
        return self.table

    @property
    def qualified(self) -> str:
        """schema.table as text: the advisory lock's and hfbatch_targets' key."""
        return f"{self.schema}.{self.table}"

    def __str__(self) -> str:
        return self.shown

    def __repr__(self) -> str:
        return f"PgLocation({self.shown!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PgLocation) and (self._conninfo, self.schema, self.table) == \
            (other._conninfo, other.schema, other.table)

    def __hash__(self) -> int:
        return hash((self._conninfo, self.schema, self.table))

    def clean(self, text: str) -> str:
        """`text` (a server's or libpq's message) with this URL's password taken out."""
        if self.password:
            text = text.replace(self.password, "***")
        return redact_text(text)


def _shown(parts: Any, query: list[tuple[str, str]]) -> str:
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:***@{host}" if ":" in userinfo else f"{user}@{host}"
    shown_query = "&".join(f"{k}={'***' if k in _SECRET_QUERY else quote(v, safe='/')}" for k, v in query)
    return urlunsplit((parts.scheme, netloc, parts.path, shown_query, ""))


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError as exc:  # pragma: no cover - a dependency of hfbatch
        raise InputError(f"-o postgresql://... needs psycopg: pip install 'psycopg[binary]' ({exc}).") from None
    return psycopg


def pg_type(field: pa.Field, pgvector: tuple[int, ...]) -> str:
    """The Postgres type of one output column (the vector's by --output-precision)."""
    t = field.type
    if pa.types.is_fixed_size_list(t):
        value, size = t.value_type, t.list_size
        if value == pa.float32():
            return f"vector({size})"
        if value == pa.float16() and pgvector >= HALFVEC_SINCE:
            return f"halfvec({size})"
        if value == pa.float16():
            raise InputError(f"--output-precision float16 needs pgvector's halfvec (pgvector 0.7.0 or later); this "
                             f"server has pgvector {'.'.join(map(str, pgvector))}: use float32, or upgrade pgvector.")
        raise InputError(f"{field.name}: {value} vectors (--output-precision int8, uint8, binary, ubinary) have no "
                         "pgvector type hfbatch writes; a Postgres target holds float32 (vector) or float16 "
                         "(halfvec, pgvector 0.7.0 or later).")
    # (the names Postgres's format_type gives back, so an existing table's shape compares equal)
    simple = [(pa.types.is_boolean, "boolean"), (pa.types.is_int8, "smallint"), (pa.types.is_int16, "smallint"),
              (pa.types.is_int32, "integer"), (pa.types.is_int64, "bigint"), (pa.types.is_uint8, "smallint"),
              (pa.types.is_uint16, "integer"), (pa.types.is_uint32, "bigint"), (pa.types.is_uint64, "numeric"),
              (pa.types.is_float16, "real"), (pa.types.is_float32, "real"), (pa.types.is_float64, "double precision"),
              (pa.types.is_string, "text"), (pa.types.is_large_string, "text"), (pa.types.is_binary, "bytea"),
              (pa.types.is_large_binary, "bytea"), (pa.types.is_date, "date"), (pa.types.is_decimal, "numeric")]
    for test, name in simple:
        if test(t):
            return name
    if pa.types.is_timestamp(t):
        return "timestamp with time zone" if t.tz else "timestamp without time zone"
    return "jsonb"  # lists, structs, maps: as JSON


class PostgresTarget:
    def __init__(self, spec: TargetSpec):
        self.spec = spec
        self.where: PgLocation = spec.location  # type: ignore[assignment]
        self._conn: Any = None
        self._locked = False
        self._written: set[Any] = set()  # the ids this run has upserted (its parts', then its commit's)

    # --- the connection -----------------------------------------------------------------------

    def _connect(self) -> Any:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        psycopg = _psycopg()
        try:
            conn = psycopg.connect(self.where.conninfo, autocommit=True, application_name="hfbatch",
                                   connect_timeout=15)
        except psycopg.Error as exc:
            raise OutputError(f"-o {self.where}: cannot connect ({self.where.clean(first_line(exc, 300))}); check the "
                              "host, port, database, user and password (PGPASSWORD or ~/.pgpass).") from None
        self._conn = conn
        return conn

    def _sql(self, query: Any, params: Sequence[Any] | None = None, *, fetch: bool = True) -> list[tuple[Any, ...]]:
        conn = self._connect()
        with self._errors("a query"):
            with conn.cursor() as cur:
                cur.execute(query, params)
                return cur.fetchall() if fetch and cur.description is not None else []

    def _errors(self, doing: str) -> Any:
        return _PgErrors(self, doing)

    def _ident(self) -> Any:
        from psycopg import sql

        return sql.Identifier(self.where.schema, self.where.table)

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
        key = (LOCK_CLASS, self.where.qualified)
        got = self._sql("SELECT pg_try_advisory_lock(%s, hashtext(%s))", key)[0][0]
        if not got:
            holder = self._sql("SELECT a.pid, a.client_addr, a.backend_start FROM pg_locks l JOIN pg_stat_activity a "
                               "ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.classid = %s::oid "
                               "AND l.objid = hashtext(%s)::oid AND l.granted LIMIT 1",
                               (LOCK_CLASS & 0xFFFFFFFF, self.where.qualified))
            who = f" (Postgres pid {holder[0][0]}, since {holder[0][2]:%H:%M:%S})" if holder else ""
            if timeout == 0:
                raise _busy(self.where, who, timeout)
            log.warning("%s: another hfbatch run holds this table%s; waiting for it%s.", self.where, who,
                        f" (at most {timeout:g} s, --lock-timeout)" if timeout else " (--lock-timeout N gives up after N s)")
            psycopg = _psycopg()
            conn = self._connect()
            started = time.monotonic()
            try:
                with conn.cursor() as cur:
                    cur.execute(f"SET lock_timeout = {int(timeout * 1000) if timeout else 0}")
                    cur.execute("SELECT pg_advisory_lock(%s, hashtext(%s))", key)
                    cur.execute("SET lock_timeout = 0")
            except psycopg.errors.LockNotAvailable:
                raise _busy(self.where, who, timeout) from None
            except psycopg.Error as exc:
                raise self._lost(exc, "waiting for the table's lock") from None
            log.warning("%s: the other run finished after %.1f s; this run goes on.", self.where,
                        time.monotonic() - started)
        self._locked = True
        job = self.unfinished_job()
        if job is not None:
            log.warning("%s: an earlier run in parts (--commit-every; job %s, started %s) stopped after committing "
                        "%d rows in %d transactions; its rows are in the table with their new hashes, so this run "
                        "embeds only the rest (a rebuild in parts starts again).", self.where, job["job_id"][:8],
                        f"{job['started_at']:%Y-%m-%d %H:%M:%S}", job["rows_committed"], job["parts"])

    def _lost(self, exc: BaseException, doing: str) -> OutputError:
        psycopg = _psycopg()
        again = ": run again" if isinstance(exc, psycopg.OperationalError) else ""  # (refused data fails again)
        return OutputError(f"-o {self.where}: Postgres failed while {doing} "
                           f"({self.where.clean(first_line(exc, 300))}); the transaction was rolled back, the table "
                           f"is as it was{again}.")

    # --- reading ------------------------------------------------------------------------------

    def _schema_exists(self) -> bool:
        return bool(self._sql("SELECT 1 FROM pg_namespace WHERE nspname = %s", (self.where.schema,)))

    def exists(self) -> bool:
        if not self._schema_exists():
            raise InputError(f"-o {self.where}: schema {self.where.schema!r} does not exist in this database; create "
                             f"it (CREATE SCHEMA ...), or drop schema= from -o for public.")
        return self._relation(self.where.table) is not None

    def _relation(self, name: str) -> str | None:
        from psycopg import sql

        rows = self._sql("SELECT to_regclass(%s)::text", (sql.Identifier(self.where.schema, name).as_string(self._connect()),))
        return rows[0][0] if rows else None

    def pgvector_version(self) -> tuple[int, ...]:
        """pgvector in this database, installed here when missing (CREATE EXTENSION)."""
        rows = self._sql("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
        if not rows:
            try:
                self._sql("CREATE EXTENSION IF NOT EXISTS vector", fetch=False)
            except OutputError as exc:
                raise InputError(f"-o {self.where}: pgvector is not installed in this database and this user cannot "
                                 f"install it ({exc}); ask its owner to run CREATE EXTENSION vector.") from None
            rows = self._sql("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
        return tuple(int(p) for p in re.findall(r"\d+", rows[0][0])[:3])

    def check_precision(self, precision: str) -> None:
        """Refuse, before any work, an --output-precision this server's pgvector has no type for."""
        value = {"float32": pa.float32(), "float16": pa.float16(), "uint8": pa.uint8(), "ubinary": pa.uint8()}
        pg_type(pa.field("embedding", pa.list_(value.get(precision, pa.int8()), 1)), self.pgvector_version())

    def check_rows(self, batch: pa.RecordBatch, columns: Sequence[str], where: Any, first: int) -> None:
        """A NUL character in a kept text column (or a text id), which Postgres text cannot hold:
        refused while planning, naming the row and column, instead of failing the commit."""
        import pyarrow.compute as pc

        for name in columns:
            column = batch.column(name)
            if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
                continue
            hits = pc.match_substring(column, "\x00")
            if pc.any(hits).as_py():
                row = first + int(pc.index(hits, True).as_py()) + 1
                raise InputError(f"{where}: row {row:,}, column {name!r} holds a NUL character, which Postgres text "
                                 "cannot store; remove it from the input (or the column from --keep).")

    def _targets_exists(self) -> bool:
        return self._relation(TARGETS_TABLE) is not None

    def _row(self) -> tuple[Any, ...] | None:
        from psycopg import sql

        if not self._targets_exists():
            return None
        rows = self._sql(sql.SQL("SELECT record, version FROM {} WHERE table_name = %s").format(
            sql.Identifier(self.where.schema, TARGETS_TABLE)), (self.where.table,))
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
        return int(row[1]) if row is not None else None

    def count_rows(self, where: str | None = None) -> int:
        """Rows in the table (`where`: only those whose `embedding IS NULL`, the one filter asked for)."""
        from psycopg import sql

        if not self.exists():
            return 0
        condition = sql.SQL(" WHERE embedding IS NULL") if where == "embedding IS NULL" else sql.SQL("")
        return int(self._sql(sql.SQL("SELECT count(*) FROM {}{}").format(self._ident(), condition))[0][0])

    def columns(self) -> list[tuple[str, str]]:
        """(name, Postgres type) of the table's columns, in order."""
        return [(r[0], r[1]) for r in self._sql(
            "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = to_regclass(%s) "
            "AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            (self._ident().as_string(self._connect()),))]

    def schema(self) -> pa.Schema | None:
        """The table's column names (typed loosely: check_columns compares names)."""
        if not self.exists():
            return None
        return pa.schema([pa.field(name, pa.string()) for name, _ in self.columns()])

    def state(self, id_column: str) -> pa.Table:
        from psycopg import sql

        names = [n for n, _ in self.columns()]
        if id_column not in names or HASH_COLUMN not in names:
            missing = id_column if id_column not in names else HASH_COLUMN
            raise InputError(f"{self.where}: has no column {missing!r}, so it was not synced by --id-column "
                             f"{id_column}; use --rebuild to replace it, or another -o.")
        id_sql = dict(self.columns())[id_column]
        rows = self._sql(sql.SQL("SELECT {}, {} FROM {}").format(sql.Identifier(id_column), sql.Identifier(HASH_COLUMN),
                                                                 self._ident()))
        id_type = pa.int64() if id_sql in ("bigint", "integer", "smallint") else pa.string()
        ids, hashes = (list(c) for c in zip(*rows)) if rows else ([], [])
        return pa.table({id_column: pa.array(ids, id_type), HASH_COLUMN: pa.array(hashes, pa.string())})

    def batches(self, columns: Sequence[str] | None = None, *, size: int = 4096) -> Iterator[pa.RecordBatch]:
        """The table's rows (vectors as float32 lists), streamed by a server-side cursor."""
        from psycopg import sql

        if not self.exists():
            return
        have = self.columns()
        chosen = [(n, t) for n, t in have if columns is None or n in columns]
        conn = self._connect()
        self._register(conn)
        with self._errors("reading the table"), conn.transaction(), conn.cursor(name="hfbatch_read") as cur:
            cur.execute(sql.SQL("SELECT {} FROM {}").format(sql.SQL(", ").join(sql.Identifier(n) for n, _ in chosen),
                                                          self._ident()))
            while rows := cur.fetchmany(size):
                yield _to_batch(rows, chosen)

    def nearest(self, vector: np.ndarray, k: int, columns: Sequence[str], *, ef_search: int = 1000) -> list[tuple[Any, ...]]:
        """The k rows nearest `vector` by `<=>` (cosine distance), with it last: Postgres's own
        search, exact without an index; an HNSW index is searched with hnsw.ef_search =
        `ef_search` (and an IVFFlat one with every list probed)."""
        from psycopg import sql

        conn = self._connect()
        self._register(conn)
        with self._errors("searching the table"), conn.transaction(), conn.cursor() as cur:
            cur.execute(sql.SQL("SET LOCAL hnsw.ef_search = {}").format(sql.Literal(int(ef_search))))
            cur.execute("SET LOCAL ivfflat.probes = 32768")
            cur.execute(sql.SQL("SELECT {}, embedding <=> %s AS _distance FROM {} WHERE embedding IS NOT NULL "
                                "ORDER BY embedding <=> %s LIMIT %s").format(
                sql.SQL(", ").join(sql.Identifier(c) for c in columns), self._ident()),
                (_vector(vector), _vector(vector), int(k)))
            return cur.fetchall()

    def size_bytes(self) -> int:
        if not self.exists():
            return 0
        return int(self._sql("SELECT pg_total_relation_size(to_regclass(%s))",
                             (self._ident().as_string(self._connect()),))[0][0] or 0)

    # --- writing ------------------------------------------------------------------------------

    def _register(self, conn: Any) -> None:
        from pgvector.psycopg import register_vector

        register_vector(conn)

    def _columns_of(self, schema: pa.Schema) -> list[tuple[str, str]]:
        pgvector = self.pgvector_version()
        wanted = [(f.name, pg_type(f, pgvector)) for f in schema]
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
        """COPY `rows` into a temporary table, then upsert them into `table` by `key`: the rows sent."""
        from psycopg import sql

        names = sql.SQL(", ").join(sql.Identifier(n) for n, _ in wanted)
        cur.execute("DROP TABLE IF EXISTS pg_temp.hfbatch_stage")
        cur.execute(sql.SQL("CREATE TEMP TABLE hfbatch_stage ON COMMIT DROP AS SELECT {} FROM {} WITH NO DATA")
                    .format(names, table))
        sent = 0
        with cur.copy(sql.SQL("COPY hfbatch_stage ({}) FROM STDIN (FORMAT BINARY)").format(names)) as copy:
            copy.set_types([t.split("(")[0] for _, t in wanted])  # (vector(384) -> vector)
            for batch in rows:
                for row in _rows(batch):
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

    def commit_part(self, rows: pa.RecordBatchReader, *, key: Sequence[str], replace: bool, job: dict[str, Any]) -> None:
        """--commit-every: one transaction upserting `rows` (no deletes, no new version) and moving
        the job's watermark in hfbatch_jobs. A run that creates or rebuilds the table writes its parts
        into a shadow table, swapped in by the final commit: the table never holds rows of two
        vector spaces, and readers see the old table whole until then."""
        from psycopg import sql

        wanted = self._columns_of(rows.schema)
        conn = self._connect()
        self._register(conn)
        with self._errors("committing a part of the run"), conn.transaction(), conn.cursor() as cur:
            self._ensure_targets(cur)
            if replace:
                into = sql.Identifier(self.where.schema, self._shadow_name())
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

        wanted = self._columns_of(rows.schema)
        conn = self._connect()
        self._register(conn)
        table = self._ident()
        before = self.size_bytes()
        exists = self.exists()
        shadow = bool(replace and job and job["parts"])  # the parts went into the shadow table
        with self._errors("committing the run"), conn.transaction(), conn.cursor() as cur:
            self._ensure_targets(cur)
            if shadow:
                into = sql.Identifier(self.where.schema, self._shadow_name())
                self._merge(cur, into, rows, wanted, key)
                if exists:
                    cur.execute(sql.SQL("DROP TABLE {}").format(table))
                cur.execute(sql.SQL("ALTER TABLE {} RENAME TO {}").format(into, sql.Identifier(self.where.table)))
                cur.execute(sql.SQL("ALTER TABLE {} RENAME CONSTRAINT {} TO {}").format(
                    table, sql.Identifier(f"{self._shadow_name()}_pkey"), sql.Identifier(_pkey_name(self.where.table))))
            else:
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
                id_type = dict(wanted)[id_column]
                cur.execute(sql.SQL("DELETE FROM {} WHERE {} = ANY(%s::{}[])").format(
                    table, sql.Identifier(id_column), sql.SQL(id_type)), (gone,))
            cur.execute(sql.SQL("INSERT INTO {} AS t (table_name, record, version, updated_at) VALUES (%s, %s, 1, now()) "
                                "ON CONFLICT (table_name) DO UPDATE SET record = EXCLUDED.record, "
                                "version = t.version + 1, updated_at = now() RETURNING version").format(
                sql.Identifier(self.where.schema, TARGETS_TABLE)),
                (self.where.table, _jsonb(record)))
            version = int(cur.fetchone()[0])
            if job is not None:
                self._watermark(cur, job, "done")
        return {"version": version, "bytes_added": max(0, self.size_bytes() - before)}

    def _shadow_name(self) -> str:
        """The table a rebuild in parts (--commit-every) writes before it is swapped in."""
        import hashlib

        return "hfbatch_new_" + hashlib.blake2b(self.where.qualified.encode(), digest_size=8).hexdigest()

    def new_job(self) -> dict[str, Any]:
        import uuid

        return {"job_id": uuid.uuid4().hex, "parts": 0, "rows_committed": 0}

    def _watermark(self, cur: Any, job: Mapping[str, Any], state: str) -> None:
        """The job's progress in hfbatch_jobs (one row per table: its last job in parts)."""
        from psycopg import sql

        jobs = sql.Identifier(self.where.schema, JOBS_TABLE)
        cur.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} (table_name text PRIMARY KEY, job_id text NOT NULL, "
                            "state text NOT NULL, parts integer NOT NULL, rows_committed bigint NOT NULL, "
                            "started_at timestamptz NOT NULL, updated_at timestamptz NOT NULL)").format(jobs))
        cur.execute(sql.SQL("INSERT INTO {} AS j VALUES (%s, %s, %s, %s, %s, now(), now()) ON CONFLICT (table_name) "
                            "DO UPDATE SET job_id = EXCLUDED.job_id, state = EXCLUDED.state, parts = EXCLUDED.parts, "
                            "rows_committed = EXCLUDED.rows_committed, updated_at = now(), started_at = CASE WHEN "
                            "j.job_id = EXCLUDED.job_id THEN j.started_at ELSE now() END").format(jobs),
                    (self.where.table, job["job_id"], state, job["parts"], job["rows_committed"]))

    def unfinished_job(self) -> dict[str, Any] | None:
        """The last job in parts on this table when it stopped before its final commit."""
        from psycopg import sql

        if self._relation(JOBS_TABLE) is None:
            return None
        rows = self._sql(sql.SQL("SELECT job_id, parts, rows_committed, started_at FROM {} WHERE table_name = %s AND "
                                 "state = 'running'").format(sql.Identifier(self.where.schema, JOBS_TABLE)),
                         (self.where.table,))
        return dict(zip(("job_id", "parts", "rows_committed", "started_at"), rows[0])) if rows else None

    def _ensure_targets(self, cur: Any) -> None:
        """hfbatch_targets in the table's schema (made once; two runs making it at once: one waits)."""
        from psycopg import sql

        if self._relation(TARGETS_TABLE) is not None:
            return
        cur.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (LOCK_CLASS, f"{self.where.schema}.{TARGETS_TABLE}"))
        cur.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} (table_name text PRIMARY KEY, record jsonb NOT NULL, "
                            "version bigint NOT NULL, updated_at timestamptz NOT NULL)").format(
            sql.Identifier(self.where.schema, TARGETS_TABLE)))

    def build_index(self, kind: str | None = None) -> dict[str, Any]:
        """A cosine HNSW or IVFFlat index on `embedding`, built CONCURRENTLY (readers and writers
        go on), replacing an earlier one of hfbatch's."""
        from psycopg import sql

        kind = kind or "hnsw"
        name = f"{self.where.table[:40]}_embedding_{kind}"
        other = f"{self.where.table[:40]}_embedding_{'ivfflat' if kind == 'hnsw' else 'hnsw'}"
        ops = "vector_cosine_ops" if dict(self.columns()).get("embedding", "").startswith("vector") else "halfvec_cosine_ops"
        with_ = sql.SQL("")
        if kind == "ivfflat":
            lists = max(1, min(32768, int(self.count_rows() ** 0.5)))
            with_ = sql.SQL(" WITH (lists = {})").format(sql.Literal(lists))
        started = time.monotonic()
        try:
            for old in (other, name):
                self._sql(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(sql.Identifier(self.where.schema, old)),
                          fetch=False)
            self._sql(sql.SQL("CREATE INDEX CONCURRENTLY {} ON {} USING {} (embedding {}){}").format(
                sql.Identifier(name), self._ident(), sql.SQL(kind), sql.SQL(ops), with_), fetch=False)
        except OutputError as exc:
            return {"type": kind, "error": str(exc)}
        return {"type": kind, "metric": "cosine", "name": name, "seconds": round(time.monotonic() - started, 2)}


class _PgErrors:
    """psycopg's errors inside a target call, as one-line OutputErrors without secrets."""

    def __init__(self, target: PostgresTarget, doing: str):
        self.target, self.doing = target, doing

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> bool:
        if exc is None or isinstance(exc, (InputError, OutputError)):
            return False
        psycopg = _psycopg()
        if isinstance(exc, psycopg.Error):
            if isinstance(exc, psycopg.OperationalError) or self.target._conn is None or self.target._conn.closed:
                self.target.close()
            raise self.target._lost(exc, self.doing) from None
        return False


def _busy(where: PgLocation, who: str, timeout: float | None) -> OutputError:
    waited = "at once (--lock-timeout 0)" if not timeout else f"after {timeout:g} s (--lock-timeout)"
    return OutputError(f"-o {where}: another hfbatch run holds this table{who}; gave up {waited}, nothing was "
                       "changed: run again once it has finished.")


def _check_shape(where: PgLocation, have: Sequence[tuple[str, str]], wanted: Sequence[tuple[str, str]]) -> None:
    """The existing table has the columns and types this run writes, else a one-line refusal
    naming the difference (before the rows are sent)."""
    has, wants = dict(have), dict(wanted)
    differ = [f"{n}: {has.get(n, 'missing')} in the table, {wants.get(n, 'not written')} by this run"
              for n in dict.fromkeys([*has, *wants]) if has.get(n) != wants.get(n)]
    if differ:
        raise InputError(f"-o {where}: the table has another shape than this run's ({'; '.join(differ[:4])}); give "
                         "--rebuild to replace it, or another table.")


def _pkey_name(table: str) -> str:
    """The name Postgres gives a table's primary key (cut to 63 bytes as it would)."""
    return f"{table}_pkey".encode()[:MAX_NAME_BYTES].decode(errors="ignore")


def _vector(values: np.ndarray) -> Any:
    from pgvector import Vector

    return Vector(np.asarray(values, dtype=np.float32))


def _jsonb(value: Any) -> Any:
    from psycopg.types.json import Jsonb

    return Jsonb(json.loads(encode_record(value)) if isinstance(value, Mapping) else value)


def _rows(batch: pa.RecordBatch) -> Iterator[tuple[Any, ...]]:
    """A batch's rows as COPY values: vectors as pgvector objects, nested values as JSON."""
    from pgvector import HalfVector, Vector

    columns: list[list[Any]] = []
    for column in batch.columns:
        t = column.type
        if pa.types.is_fixed_size_list(t):
            flat = column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), t.list_size)
            valid = column.is_valid().to_numpy(zero_copy_only=False)
            make = Vector if t.value_type == pa.float32() else HalfVector
            columns.append([make(v) if ok else None for v, ok in zip(flat, valid)])
        elif pa.types.is_nested(t):
            columns.append([None if v is None else _jsonb(v) for v in column.to_pylist()])
        else:
            columns.append(column.to_pylist())
    return zip(*columns)


def _to_batch(rows: Sequence[tuple[Any, ...]], columns: Sequence[tuple[str, str]]) -> pa.RecordBatch:
    arrays = []
    for k, (name, sql_type) in enumerate(columns):
        values = [r[k] for r in rows]
        if sql_type.startswith(("vector(", "halfvec(")):
            size = int(sql_type.split("(")[1].rstrip(")"))
            dense = [None if v is None else np.asarray(v.to_numpy() if hasattr(v, "to_numpy") else v, np.float32)
                     for v in values]
            flat = np.concatenate([v if v is not None else np.zeros(size, np.float32) for v in dense]) if dense else \
                np.zeros(0, np.float32)
            mask = pa.array([v is None for v in dense], pa.bool_())
            arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), size, mask=mask))
        elif sql_type == "jsonb":
            arrays.append(pa.array([None if v is None else json.dumps(v) for v in values], pa.string()))
        else:
            arrays.append(pa.array(values))
    return pa.RecordBatch.from_arrays(arrays, names=[n for n, _ in columns])
