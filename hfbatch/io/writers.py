"""ParquetSink: the output file, streamed chunk by chunk and published atomically.

Rows go to a hidden temp file beside the output; only `commit()` renames it into place, so a
killed or failed run never leaves a half-written file at the output path. Temp files left by a
run that was killed (its pid is gone) are removed by the next run for the same output.

Two runs writing the same output both finish; the last to publish wins, and its sidecar is the
one beside the file: publishing (sidecar, then rename) holds a lock on the output's directory.
An output path that is a symlink is replaced by a regular file; the link's target is untouched.

An output in a store (`-o s3://bucket/out.parquet`, see stores.py) is written the same way into a
local temp file (in TMPDIR), and `commit()` publishes it by upload. A store has no lock to hold, so
the pair is made checkable instead: the Parquet object first (one PUT, or S3 multipart completed
only when whole), then the sidecar, which names the data object it was written for by the ETag
(and VersionId) the store answered to that upload (`provenance.output.object`). The sidecar is
written only while the data object is still this job's, with a conditional PUT on the sidecar
seen (If-Match / If-None-Match) so two jobs publishing one key cannot leave one job's data with
the other's sidecar unnoticed: the job whose data was replaced writes no sidecar and fails (exit 1),
and `hfbatch verify` refuses a pair whose data object is not the one its sidecar names (a job
killed between the two). Nothing is ever deleted on the way out: a failed or interrupted publish
leaves the earlier output's objects, sidecar included, as they were, or (killed after its data
was in) new data that its stale sidecar does not name.
"""

from __future__ import annotations

import json
import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import psutil
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import HfbatchError, OutputError
from .stores import RemotePath, publish_error

METADATA_KEY = "hfbatch"
_TMP_SUFFIX = ".hfbatch-tmp"


VECTOR_TYPES = {"float32": pa.float32(), "float16": pa.float16(), "int8": pa.int8(), "uint8": pa.uint8(),
                "binary": pa.int8(), "ubinary": pa.uint8()}  # --output-precision -> the embedding's value type


def output_schema(passthrough: pa.Schema, width: int, precision: str = "float32") -> pa.Schema:
    """Input columns, then the four columns hfbatch adds (see DESIGN.md, 'Output'): `embedding` is a
    fixed-size list of `width` values of the precision's type (binary: 8 dimensions a byte)."""
    return pa.schema(
        list(passthrough)
        + [
            pa.field("embedding", pa.list_(VECTOR_TYPES[precision], width)),
            pa.field("n_tokens", pa.int32()),
            pa.field("truncated", pa.bool_()),
            pa.field("embedding_error", pa.string()),
        ]
    )


def temp_path_for(path: Path) -> Path:
    """A hidden name beside `path` that says which process owns it (so a later run can tell a dead
    run's leftovers) and is unique within the process (two sinks for one output never share it)."""
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}{_TMP_SUFFIX}")


def publish_table(path: str | Path | RemotePath, table: pa.Table, document: Mapping[str, Any],
                  sidecar: Path | RemotePath | None = None, *, schema: pa.Schema | None = None,
                  batch_rows: int = 65_536) -> None:
    """Write a whole table as `path` with its sidecar, as ParquetSink publishes (atomic; nothing
    left on failure): for outputs finished only once every row is in (a sync's, a --rerank's)."""
    sink = ParquetSink(path, schema or table.schema)
    try:
        for batch in table.to_batches(max_chunksize=batch_rows):
            sink.write(batch)
        sink.commit(document, sidecar=sidecar)
    except BaseException:
        sink.abort()
        raise


def local_temp_for(path: Path | RemotePath) -> Path:
    """A temp file of this process for `path` (a store's: in the local temp folder), of the name
    remove_stale_temps clears once the process is gone: a killed run leaves nothing for good."""
    return temp_path_for(_local_temp_dir() / _remote_temp_name(path)) if isinstance(path, RemotePath) \
        else temp_path_for(Path(path))


def remove_stale_temps(path: Path | RemotePath) -> list[Path]:
    """Delete temp files of earlier runs for `path` whose process is no longer alive."""
    removed: list[Path] = []
    if isinstance(path, RemotePath):
        path = _local_temp_dir() / _remote_temp_name(path)
    path = Path(path)
    for candidate in path.parent.glob(f".{path.name}.*{_TMP_SUFFIX}"):
        pid_text = candidate.name[len(path.name) + 2 : -len(_TMP_SUFFIX)].split("-")[0]
        if pid_text.isdigit() and not psutil.pid_exists(int(pid_text)):
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return removed


def check_writable(path: Path | RemotePath) -> None:
    """Fail before any work when the output cannot be created (exit 2 via the caller)."""
    if isinstance(path, RemotePath):
        path.check_writable()
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    probe = temp_path_for(path)
    try:
        with open(probe, "wb"):
            pass
    finally:
        probe.unlink(missing_ok=True)


class ParquetSink:
    """Write batches to a temp file; `commit()` publishes it, `abort()` removes it."""

    def __init__(self, path: str | Path | RemotePath, schema: pa.Schema):
        self.path: Path | RemotePath = path if isinstance(path, RemotePath) else Path(path)
        self.schema = schema
        # a store's output is written locally first, published by upload at commit
        self.temp = temp_path_for(_local_temp_dir() / _remote_temp_name(self.path)) if isinstance(self.path, RemotePath) \
            else temp_path_for(self.path)
        self.rows = 0
        try:
            # vectors never repeat enough for a dictionary: writing one first only to fall back to
            # plain encoding costs space and time (the other columns keep it)
            plain = {"embedding"}
            self._writer = pq.ParquetWriter(str(self.temp), schema, compression="zstd",
                                            use_dictionary=[n for n in schema.names if n not in plain])
        except (OSError, pa.ArrowException) as exc:
            raise OutputError(f"cannot create {self.temp} ({exc}); check the output directory.") from exc

    def write(self, batch: pa.RecordBatch) -> None:
        try:
            self._writer.write_batch(batch)
        except (OSError, pa.ArrowException) as exc:
            self.abort()
            raise OutputError(f"writing {self.path} failed ({exc}); nothing was written there.") from exc
        self.rows += batch.num_rows

    def commit(self, metadata: Mapping[str, Any], sidecar: Path | RemotePath | None = None) -> None:
        """Add the provenance as key/value metadata, close, publish the file and its sidecar.

        Local: the sidecar is written to a temp file first (where a full disk fails), then the
        Parquet file and the sidecar are renamed into place, under the directory's lock; a failed
        commit leaves the earlier output and its sidecar as they were. In a store: see `_upload`.
        """
        try:
            self._writer.add_key_value_metadata({METADATA_KEY: json.dumps(metadata, default=str)})
            self._writer.close()
        except (OSError, pa.ArrowException) as exc:
            self.abort()
            raise OutputError(f"finishing {self.path} failed ({exc}); nothing was written there.") from exc
        if isinstance(self.path, RemotePath):
            try:
                self._upload(metadata, sidecar)
            finally:
                self.abort()  # (the temp file; the upload's own errors say what is where)
            return
        staged = None
        try:
            with publishing(self.path.parent):
                if isinstance(sidecar, Path):
                    if sidecar.is_dir():  # taken since the job was planned: the pair could not be completed
                        raise OutputError(f"the sidecar's path {sidecar} is a directory")
                    staged = temp_path_for(sidecar)
                    staged.write_text(json.dumps(metadata, indent=2, default=str) + "\n", encoding="utf-8")
                elif sidecar is not None:
                    write_json_atomic(sidecar, metadata)  # (a store's sidecar of a local output: one PUT)
                os.replace(self.temp, self.path)
                if staged is not None:
                    os.replace(staged, sidecar)  # type: ignore[arg-type]
        except (OSError, pa.ArrowException, OutputError) as exc:
            self.abort()
            if staged is not None:
                staged.unlink(missing_ok=True)
            raise OutputError(f"finishing {self.path} failed ({exc}); nothing was written there.") from exc

    def _upload(self, metadata: Mapping[str, Any], sidecar: Path | RemotePath | None) -> None:
        """Data object first, then the sidecar naming it (see the module docstring). `metadata`, a
        dict, gains `provenance.output.object`, so --json prints the document the sidecar holds."""
        assert isinstance(self.path, RemotePath)
        try:
            stamp = self.path.upload(self.temp)
        except BaseException as exc:  # an error, SIGTERM or ^C: nothing of this job is there; nothing is removed
            if isinstance(exc, Exception) and not isinstance(exc, OutputError):
                if type(exc) is HfbatchError:  # the store could not be reached: one line naming it, already
                    raise OutputError(f"{exc} Nothing was written there.") from exc
                raise publish_error(self.path, exc) from exc
            raise
        finally:
            self.temp.unlink(missing_ok=True)
        if sidecar is None:
            return
        document = _stamped(metadata, stamp)
        if isinstance(sidecar, RemotePath):
            publish_sidecar(sidecar, document, data=self.path, stamp=stamp)
        else:
            write_json_atomic(sidecar, document)

    def abort(self) -> None:
        try:
            self._writer.close()
        except Exception:  # already closed or broken: the temp file goes either way
            pass
        self.temp.unlink(missing_ok=True)


@contextmanager
def publishing(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on `directory` while a file and its sidecar are published, so two runs
    writing one output never pair one run's file with the other's sidecar. A lock on the directory
    itself leaves no lock file behind. Where locks are unsupported (some network filesystems,
    Windows) publishing goes on unlocked."""
    try:
        import fcntl

        fd = os.open(directory, os.O_RDONLY)
    except (ImportError, OSError):
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def write_text_atomic(path: Path, text: str) -> None:
    """`text` at `path` through a temp file of this process's own (temp_path_for: a later run
    removes a dead one's) and a rename: a reader sees the old file or the new one, never half.
    OSError as it comes, the temp file gone."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_path_for(path)
    try:
        temp.write_text(text, encoding="utf-8")
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path | RemotePath, document: Mapping[str, Any]) -> None:
    """Write JSON through a temp file and rename, so readers never see half a document (in a
    store: one PUT, which is whole or nothing)."""
    if isinstance(path, RemotePath):
        try:
            path.write_text(json.dumps(document, indent=2, default=str) + "\n")
        except Exception as exc:  # noqa: BLE001 - a store's errors are many
            raise OutputError(f"cannot write {path} ({exc}).") from exc
        return
    try:
        write_text_atomic(path, json.dumps(document, indent=2, default=str) + "\n")
    except OSError as exc:
        raise OutputError(f"cannot write {path} ({exc}).") from exc


def _stamped(metadata: Mapping[str, Any], stamp: Mapping[str, Any]) -> Mapping[str, Any]:
    """The sidecar document: `metadata` with the published data object's stamp in provenance.output."""
    try:
        output = metadata["provenance"]["output"]
        output["object"] = dict(stamp)  # (the caller's dict: --json and the part record see it too)
        return metadata
    except (KeyError, TypeError):
        return {**metadata, "object": dict(stamp)}


SIDECAR_TRIES = 8


def publish_sidecar(sidecar: RemotePath, document: Mapping[str, Any], *, data: RemotePath,
                    stamp: Mapping[str, Any]) -> None:
    """Write `document`, the sidecar of the data object `data` published as `stamp`, to the store:
    only while `data` is still that object, and (conditional PUT) only over the sidecar that was
    there when that was checked. OutputError (exit 1) when another job published `data` in the
    meantime: its pair is its own, and this job writes nothing more."""
    text = json.dumps(document, indent=2, default=str) + "\n"
    try:
        for _ in range(SIDECAR_TRIES):
            seen = sidecar.stamp()  # the sidecar there now (its ETag is the condition of the PUT)
            now = data.stamp()
            if now is None or now.get("etag") != stamp.get("etag"):
                raise OutputError(f"{data}: another job published this output while this one was finishing; the "
                                  "object there is that job's, so this job wrote no sidecar for it. Run one job per output.")
            if sidecar.write_text_if(text, seen.get("etag") if seen else None):
                return
        raise OutputError(f"{sidecar}: other jobs kept replacing it while this one wrote it ({SIDECAR_TRIES} tries); "
                          "run one job per output.")
    except OutputError:
        raise
    except HfbatchError as exc:  # the store refused or could not be reached: data in, sidecar not
        raise OutputError(f"{data} was published but its sidecar {sidecar} could not be written ({exc}); "
                          "`hfbatch verify` refuses the pair until a rerun writes both.") from exc


def _local_temp_dir() -> Path:
    import tempfile

    return Path(tempfile.gettempdir())


def _remote_temp_name(path: RemotePath) -> str:
    """A local name for a store output's temp file: the key flattened, so temps never collide."""
    return "hfbatch-" + path.url.replace("://", "-").replace("/", "-")


def read_metadata(path: str | Path | RemotePath) -> dict[str, Any]:
    """The hfbatch provenance stored in a Parquet file written by ParquetSink."""
    source: Any = path.open(ranged=True) if isinstance(path, RemotePath) else str(path)
    meta = pq.ParquetFile(source).metadata.metadata or {}  # file key/value metadata
    raw = meta.get(METADATA_KEY.encode())
    return json.loads(raw) if raw else {}
