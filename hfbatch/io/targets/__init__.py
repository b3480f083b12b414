"""Where an embed job's rows go, chosen by `-o`: one Target protocol for every kind.

- `*.parquet` (a file, or a directory of parts): the job's whole output, rewritten each run
  (io/writers.py's ParquetSink); with `--id-column` it also carries each row's content hash, so
  the next run can say what changed (`--changes`).
- `*.lance` (local or s3://): a Lance dataset (lance.py).
- a directory holding `_delta_log`, or `delta://PATH-OR-URL`: a Delta Lake table (delta.py).
- `postgresql://user@host:port/db?table=NAME[&schema=S]`: a Postgres table with pgvector
  (postgres.py; its location a PgLocation, shown without the password).

A table target is synced, not rewritten: each row stores HASH_COLUMN, a content hash of its text,
its kept columns and the options that shape its vector (jobs/sync.py); a run embeds and writes
only rows whose hash is new, and commits upserts and deletes as one table version. The table's
own metadata records its vector space (`vector_record`): a run of another space is refused, and
`hfbatch search` embeds its query with what the table recorded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Protocol, Sequence

import pyarrow as pa

from ...errors import InputError
from ..stores import RemotePath, is_remote, location

class ForeignTable(InputError):
    """A table is there that hfbatch did not write, or whose record was damaged: refused, unless
    the run was told to --rebuild it."""


HASH_COLUMN = "_hfbatch_hash"  # the content hash of a row (of its parent row, with --split)
RECORD_KEY = "hfbatch"  # where a table keeps its vector record (Lance schema metadata; Delta: the description)
TABLE_KINDS = ("lance", "delta", "postgres")
DELTA_PREFIX = "delta://"

# what must be equal for two runs to write into one table: the fields of vector_record compared
SPACE_FIELDS = ("fingerprint", "model_id", "prompt", "dim", "truncate_dim", "precision", "normalize", "split",
                "id_column", "kind", "top_k", "vocab")


@dataclass(frozen=True)
class TargetSpec:
    """What `-o` names: its kind ("parquet", "lance" or "delta") and where it is."""

    kind: str
    location: Path | RemotePath
    given: str  # as the user wrote it (for messages; a store URL is shown without credentials)

    @property
    def is_table(self) -> bool:
        return self.kind in TABLE_KINDS

    @property
    def uri(self) -> str:
        """What the table libraries take: a local path as text, or the store's URL (a Postgres
        table's: without its password)."""
        return self.location.url if isinstance(self.location, RemotePath) else str(self.location)


def parse_target(output: str | Path | RemotePath, kind: str | None = None) -> TargetSpec:
    """The kind of target `-o` names, from its name alone (plus, locally, a `_delta_log` folder);
    `kind`: already known (a delta:// prefix taken off by the options)."""
    from .postgres import PgLocation, is_postgres_url

    if isinstance(output, PgLocation) or is_postgres_url(output):
        where = output if isinstance(output, PgLocation) else PgLocation(str(output))
        return TargetSpec("postgres", where, str(where))  # type: ignore[arg-type]
    text = output.url if isinstance(output, RemotePath) else str(output)
    if kind is not None:
        return TargetSpec(kind, location(output), f"{DELTA_PREFIX}{text}" if kind == "delta" else text)
    if text.lower().startswith(DELTA_PREFIX):
        rest = text[len(DELTA_PREFIX):]
        if not rest:
            raise InputError("-o delta:// names no table; give delta://PATH or delta://s3://bucket/table.")
        return TargetSpec("delta", location(rest), text)
    stripped = text.rstrip("/")
    if stripped.lower().endswith(".lance"):
        return TargetSpec("lance", location(stripped), text)
    where = location(text)
    if isinstance(where, Path) and (where / "_delta_log").is_dir():
        return TargetSpec("delta", where, text)
    return TargetSpec("parquet", where, text)


def is_table_target(output: Any) -> bool:
    return parse_target(output).is_table


class Target(Protocol):
    """A table an embed job syncs into. Everything a run needs of it, and nothing more."""

    spec: TargetSpec

    def exists(self) -> bool:
        """Whether there is a table there (a missing one is created by the first commit)."""
        ...

    def record(self) -> dict[str, Any] | None:
        """The vector record the table keeps (None: no table yet). InputError (exit 2) when
        something is there that is not a table hfbatch wrote."""
        ...

    def version(self) -> int | None:
        """The table's current version (None: no table yet)."""
        ...

    def count_rows(self) -> int:
        ...

    def state(self, id_column: str) -> pa.Table:
        """(id_column, HASH_COLUMN) of every row now in the table, read at `version()`."""
        ...

    def batches(self, columns: Sequence[str] | None = None) -> Iterator[pa.RecordBatch]:
        """The table's rows (only `columns`), streamed."""
        ...

    def commit(self, rows: pa.RecordBatchReader, *, key: Sequence[str], id_column: str, stale: Sequence[Any],
               record: Mapping[str, Any], replace: bool) -> dict[str, Any]:
        """Upsert `rows` by `key` and delete every other row whose id is in `stale` (the ids gone
        from the input; with --split also the upserted ids, whose old windows may outnumber the
        new), as one new version; with `replace` the table becomes exactly `rows` (created or
        rebuilt). Returns {version, bytes_added}."""
        ...

    def size_bytes(self) -> int:
        """Bytes the table's files take (local tables; a store's: summed from its listing)."""
        ...

    def build_index(self, kind: str | None = None) -> dict[str, Any]:
        """Build the table's vector index after a run (--index; `kind`: --index-type): what was
        built, or its error."""
        ...

    pending: bool  # an earlier run left work for this run's commit to finish (Postgres: a run in parts)

    def check_run(self, precision: str, columns: Sequence[str]) -> None:
        """Refuse, before any work, what the table cannot hold: a vector precision, a column name."""
        ...

    def check_rows(self, batch: pa.RecordBatch, columns: Sequence[str], where: Any, first: int) -> None:
        """Refuse, while planning, a value the table cannot hold (naming its row and column)."""
        ...

    def lock(self, timeout: float | None) -> None:
        """Hold the table for this run, from planning to commit, where the table's own commits do
        not order two runs (Postgres: an advisory lock; Lance, Delta: nothing, their commits
        conflict and retry). `timeout`: --lock-timeout."""
        ...

    def close(self) -> None:
        """Let go of what the run held (a connection, its lock)."""
        ...


class FileTable:
    """What Lance and Delta tables share: no lock (the format's own commits order two runs: one
    conflicts and retries, or fails), no runs in parts, every precision, name and value stored
    (Delta keeps what it lacks as wider types)."""

    pending = False

    def lock(self, timeout: float | None) -> None:
        return None

    def check_run(self, precision: str, columns: Sequence[str]) -> None:
        return None

    def check_rows(self, batch: pa.RecordBatch, columns: Sequence[str], where: Any, first: int) -> None:
        return None


def open_target(spec: TargetSpec | str | Path | RemotePath) -> Target:
    """The Target for a table `-o` (Lance or Delta)."""
    spec = spec if isinstance(spec, TargetSpec) else parse_target(spec)
    if spec.kind == "lance":
        from .lance import LanceTarget

        return LanceTarget(spec)
    if spec.kind == "delta":
        from .delta import DeltaTarget

        return DeltaTarget(spec)
    if spec.kind == "postgres":
        from .postgres import PostgresTarget

        return PostgresTarget(spec)
    raise InputError(f"{spec.given}: a Parquet output is not a table target.")


def vector_record(provenance: Mapping[str, Any], *, id_column: str | None = None,
                  stored_as: str | None = None) -> dict[str, Any]:
    """What a table records of its vector space, taken from a run's provenance: enough to refuse
    a run of another space and for `hfbatch search` to embed a query as the rows were."""
    vectors = provenance.get("vectors") or {}
    return {
        "hfbatch_version": provenance.get("tool_version"),
        "model_id": provenance.get("model_id"),
        "revision": provenance.get("revision"),
        "fingerprint": provenance.get("fingerprint"),
        "backend": provenance.get("backend"),
        "runtime": provenance.get("runtime"),
        "endpoint": provenance.get("endpoint"),
        "prompt": provenance.get("prompt"),
        "prompt_name": provenance.get("prompt_name"),
        "normalize": provenance.get("normalize"),
        "max_length": provenance.get("max_length"),
        "dim": vectors.get("dim"),
        "truncate_dim": vectors.get("truncate_dim"),
        "precision": vectors.get("precision"),
        "ranges": vectors.get("ranges"),
        "split": provenance.get("split"),
        "text_column": provenance.get("text_column"),
        "id_column": id_column,
        "stored_as": stored_as,
        # another kind than dense (issue 26): what the column holds; absent (None) for dense vectors
        "kind": vectors.get("kind"),
        "top_k": vectors.get("top_k"),
        "vocab": vectors.get("vocab"),
    }


def space_difference(recorded: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """The SPACE_FIELDS in which a table's record and a run's differ, each as 'name: a -> b'."""
    def shown(value: Any) -> str:
        text = json.dumps(value, default=str)
        return text if len(text) <= 60 else text[:57] + "..."

    return [f"{name}: {shown(recorded.get(name))} -> {shown(wanted.get(name))}"
            for name in SPACE_FIELDS if recorded.get(name) != wanted.get(name)]


def encode_record(record: Mapping[str, Any]) -> str:
    return json.dumps(dict(record), sort_keys=True, default=str)


def decode_record(text: str | bytes | None, where: str) -> dict[str, Any] | None:
    """A table's record back from its metadata; InputError when it is there but damaged."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        raise ForeignTable(f"{where}: its hfbatch record is not JSON (edited by hand?); rebuild it with --rebuild.") from None
    if not isinstance(value, dict):
        raise ForeignTable(f"{where}: its hfbatch record is not an object (edited by hand?); rebuild it with --rebuild.")
    return value


def sql_literal(value: Any) -> str:
    """One id as an SQL literal for a filter expression (strings quoted, quotes doubled)."""
    if isinstance(value, bool) or value is None:
        raise InputError(f"id {value!r} cannot be a key.")
    if isinstance(value, int):
        return str(value)
    return "'" + str(value).replace("'", "''") + "'"


def in_list(column_sql: str, ids: Sequence[Any]) -> str:
    return f"{column_sql} IN ({', '.join(sql_literal(v) for v in ids)})"


def storage_options(spec: TargetSpec) -> dict[str, str] | None:
    """A store table's options for the object-store clients of Lance and delta-rs: the endpoint
    of an S3-compatible server from AWS_ENDPOINT_URL (as the rest of hfbatch reaches it), plain
    HTTP allowed only for such an endpoint. Credentials stay in the environment, where those
    clients read them; none is ever put here."""
    import os

    if not is_remote(spec.location):
        return None
    options: dict[str, str] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        options["aws_endpoint"] = endpoint
        if endpoint.lower().startswith("http://"):
            options["allow_http"] = "true"
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        options["aws_region"] = region
    return options


def tree_bytes(where: Path | RemotePath) -> int:
    """Bytes of every file under `where` (0 when nothing is there)."""
    if isinstance(where, RemotePath):
        if not where.exists():
            return 0
        return int(sum(int(info.get("size") or 0) for info in where.fs.find(where.key, detail=True).values()))
    return sum(p.stat().st_size for p in where.rglob("*") if p.is_file()) if where.exists() else 0
