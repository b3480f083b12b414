"""An input replaced or rewritten while a job reads it (issue 22, item 1).

The input's identity (a local file's stat, plus its digest when it was modified just now; a store
object's ETag and size) is taken before the first read and checked after the last: if it changed,
the job (or, in a many-part job, that part) fails with exit 1, one line naming the file, nothing is
published, nothing is recorded as done, and the rerun embeds the new content.

The replacement happens between chunks, from inside the job: `ChunkProcessor.process` is wrapped so
that the file is replaced right after the first chunk of the named input is processed. That is a
Python-level hook on the real job (real files, the bundled model, the real S3-protocol server);
nothing the check looks at is faked.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from conftest import SAMPLE_TEXTS, write_csv
from hfbatch import EmbedOptions, embed
from hfbatch.cli import app
from hfbatch.errors import HfbatchError, InputChangedError, OutputError
from hfbatch.jobs import core
from hfbatch.provenance import InputIdentity, file_digest
from s3_server import BUCKET, SECRET_KEY, S3Server, s3  # noqa: F401  # s3: the fixture

ROWS = 100
CHUNK = 40  # three chunks: the replacement lands after the first, with two still to read


def _texts(tag: str) -> list[str]:
    return [f"{tag} {i}: {SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)]}" for i in range(ROWS)]


def _rows(texts: list[str]) -> list[dict]:
    return [{"id": i, "text": t} for i, t in enumerate(texts)]


_PROCESS = core.ChunkProcessor.process
OLD = _texts("row")
# the same rows, bytes and size, other content (the issue upper-cased them, but MiniLM is uncased:
# its vectors of "ROW 1" and "row 1" are one, and so is their cache entry)
NEW = [t[::-1] for t in OLD]


def _replace_after_first_chunk(monkeypatch: pytest.MonkeyPatch, replace: Callable[[], None],
                               prefix: str = "row ") -> list[int]:
    """Wrap ChunkProcessor.process so that `replace()` runs once, right after the first chunk whose
    first text starts with `prefix` (the OLD texts: the input under test) was processed. Returns a
    list that gets one entry when it ran."""
    ran: list[int] = []
    original = core.ChunkProcessor.process

    def process(self, v):  # type: ignore[no-untyped-def]
        out = original(self, v)
        if not ran and (v.texts[0] or "").startswith(prefix):
            replace()
            ran.append(1)
        return out

    monkeypatch.setattr(core.ChunkProcessor, "process", process)
    return ran


def _stop_replacing(monkeypatch: pytest.MonkeyPatch) -> None:
    # (not monkeypatch.undo(): that would also undo conftest's clean environment and cache directory)
    monkeypatch.setattr(core.ChunkProcessor, "process", _PROCESS)


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["embed", *args, "--quiet"])
    return result.exit_code, result.output


def _one_error_line(output: str) -> str:
    # (transformers' own "Loading weights" bar shares stderr when the model loads in this process)
    lines = [line for line in output.splitlines() if line.strip() and not line.startswith("Loading weights")]
    assert len(lines) == 1, output
    assert "Traceback" not in output
    return lines[0]


def _texts_of(path: Path) -> list[str]:
    return pq.read_table(path, columns=["text"]).column("text").to_pylist()


# --- the identity itself -----------------------------------------------------------------------

def test_input_changed_error_is_in_the_error_tree_with_exit_1() -> None:
    """One tree (hfbatch.errors): catchable as an OutputError, exit 1 (the job ran: no usage error);
    provenance, which raises it, re-exports the same class."""
    from hfbatch import errors, provenance

    assert issubclass(InputChangedError, OutputError) and issubclass(InputChangedError, HfbatchError)
    assert InputChangedError.__module__ == "hfbatch.errors" and InputChangedError.exit_code == 1
    assert not InputChangedError.transient
    assert provenance.InputChangedError is errors.InputChangedError
    assert "InputChangedError" in (errors.__doc__ or "")


def test_the_identity_sees_a_rename_onto_the_path_and_an_in_place_rewrite_that_restores_the_mtime(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "a.csv", _rows(OLD))
    old = 1_600_000_000
    os.utime(path, (old, old))  # not modified just now: the stat alone is the identity
    identity = InputIdentity.take(path)
    assert identity.digest is None
    identity.check()  # unchanged: no error
    facts = identity.facts("csv", ROWS)
    assert facts.hash == file_digest(path) and facts.bytes == path.stat().st_size

    # rewritten in place, same size, mtime put back: ctime still moves
    data = path.read_bytes()
    path.write_bytes(data.upper())
    os.utime(path, (old, old))
    with pytest.raises(InputChangedError, match="changed during the job"):
        identity.check()

    # replaced by a rename (mv): another inode under the name
    identity = InputIdentity.take(path)
    staged = write_csv(tmp_path / "b.csv", _rows(OLD))
    os.replace(staged, path)
    with pytest.raises(InputChangedError, match=r"a\.csv: changed during the job"):
        identity.facts("csv", ROWS)


def test_a_file_modified_just_now_is_also_checked_by_its_digest(tmp_path: Path) -> None:
    """Within the filesystem's timestamp granule a second write can leave the stat as it was: for a
    file written in the last 2 s the digest taken before the first read is compared too."""
    path = write_csv(tmp_path / "a.csv", _rows(OLD))
    identity = InputIdentity.take(path)
    assert identity.digest == file_digest(path)
    st = path.stat()
    path.write_bytes(path.read_bytes().upper())  # same size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(InputChangedError):
        identity.facts("csv", ROWS)


def test_a_file_gone_since_the_first_read_is_changed_not_a_crash(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "a.csv", _rows(OLD))
    identity = InputIdentity.take(path)
    path.unlink()
    with pytest.raises(InputChangedError, match="changed during the job"):
        identity.facts("csv", ROWS, shown=Path("in/a.csv"))


# --- a single file -----------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["mv", "rewrite in place"])
def test_a_local_input_replaced_mid_job_fails_and_the_rerun_embeds_the_new_content(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    src = write_csv(tmp_path / "in.csv", _rows(OLD))
    os.utime(src, (1_600_000_000, 1_600_000_000))  # an input written long ago: the stat is its identity
    out = tmp_path / "out.parquet"

    def replace() -> None:
        if how == "mv":
            os.replace(write_csv(tmp_path / "staged.csv", _rows(NEW)), src)
        else:  # the same inode and size, the mtime put back
            st = src.stat()
            with open(src, "r+b") as f:
                f.write(write_csv(tmp_path / "staged.csv", _rows(NEW)).read_bytes())
            assert src.stat().st_size == st.st_size
            os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))

    ran = _replace_after_first_chunk(monkeypatch, replace)
    code, output = _cli(str(src), "-o", str(out), "--chunk-size", str(CHUNK))
    assert ran and code == 1, output
    line = _one_error_line(output)
    assert "InputChangedError" in line and str(src) in line and "changed during the job" in line and "Rerun" in line
    assert not out.exists() and not Path(f"{out}.meta.json").exists()  # nothing published, nothing recorded
    assert list(tmp_path.glob("*.tmp*")) == [] and list(tmp_path.glob(".*tmp*")) == []

    _stop_replacing(monkeypatch)
    code, output = _cli(str(src), "-o", str(out), "--chunk-size", str(CHUNK))
    assert code == 0, output
    assert _texts_of(out) == NEW
    meta = json.loads(Path(f"{out}.meta.json").read_text())
    assert meta["provenance"]["input"]["hash"] == file_digest(src)
    # the new texts were embedded (those the failed run read after an in-place rewrite are cached)
    assert meta["metrics"]["texts_computed"] == (ROWS if how == "mv" else meta["metrics"]["cache"]["misses"]) > 0


# --- a directory of parts ----------------------------------------------------------------------

def test_a_part_replaced_mid_job_fails_alone_is_never_done_and_the_rerun_embeds_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The issue's repro: a directory job over in/a.csv with --chunk-size 40; after the first chunk
    a.csv is replaced (mv) by a file of other texts with as many rows. Before the fix: exit 0, the old
    rows recorded with the new file's hash, and every rerun "1 already complete"."""
    data = tmp_path / "in"
    data.mkdir()
    a = write_csv(data / "a.csv", _rows(OLD))
    write_csv(data / "b.csv", [{"id": i, "text": f"b {t}"} for i, t in enumerate(OLD[:10])])
    out = tmp_path / "out"
    ran = _replace_after_first_chunk(monkeypatch, lambda: os.replace(write_csv(tmp_path / "staged.csv", _rows(NEW)), a))
    code, output = _cli(str(data), "-o", str(out), "--chunk-size", str(CHUNK))
    assert ran and code == 1, output
    assert "Traceback" not in output
    job = json.loads((out / "_hfbatch_job.json").read_text())
    status = {p["input"]: p for p in job["parts"]}
    assert status["a.csv"]["status"] == "failed" and "changed during the job" in status["a.csv"]["error"]
    assert status["a.csv"]["input_hash"] is None
    assert status["b.csv"]["status"] == "done"  # the other parts go on
    assert not (out / "a.parquet").exists() and not (out / "_hfbatch" / "a.parquet.meta.json").exists()

    _stop_replacing(monkeypatch)
    code, output = _cli(str(data), "-o", str(out), "--chunk-size", str(CHUNK))
    assert code == 0, output
    job = json.loads((out / "_hfbatch_job.json").read_text())
    status = {p["input"]: p for p in job["parts"]}
    assert status["a.csv"]["status"] == "done" and status["a.csv"]["texts_computed"] == ROWS  # not "skipped"
    assert status["a.csv"]["input_hash"] == file_digest(a)
    assert status["b.csv"]["status"] == "skipped"
    assert _texts_of(out / "a.parquet") == NEW


# --- in a store --------------------------------------------------------------------------------

def _csv_bytes(texts: list[str], tmp_path: Path, name: str) -> bytes:
    return write_csv(tmp_path / name, _rows(texts)).read_bytes()


def _etag(server: S3Server, key: str) -> str:
    return server.client().head_object(Bucket=BUCKET, Key=key)["ETag"].strip('"')


def test_an_s3_input_replaced_by_copy_object_mid_job_fails_and_the_rerun_embeds_the_new_content(
        s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    s3.put(BUCKET, "in/a.csv", _csv_bytes(OLD, tmp_path, "old.csv"))
    s3.put(BUCKET, "staging/a.csv", _csv_bytes(NEW, tmp_path, "new.csv"))
    url, out = f"s3://{BUCKET}/in/a.csv", f"s3://{BUCKET}/out/a.parquet"

    def replace() -> None:
        s3.client().copy_object(Bucket=BUCKET, Key="in/a.csv", CopySource={"Bucket": BUCKET, "Key": "staging/a.csv"})

    ran = _replace_after_first_chunk(monkeypatch, replace)
    code, output = _cli(url, "-o", out, "--chunk-size", str(CHUNK))
    assert ran and code == 1, output
    line = _one_error_line(output)
    assert url in line and "changed during the job" in line
    assert SECRET_KEY not in output  # no credentials in the message
    assert [k for k in s3.keys(BUCKET) if k.startswith("out/")] == []  # neither the data nor a sidecar

    _stop_replacing(monkeypatch)
    code, output = _cli(url, "-o", out, "--chunk-size", str(CHUNK))
    assert code == 0, output
    import io

    table = pq.read_table(io.BytesIO(s3.get(BUCKET, "out/a.parquet")))
    assert table.column("text").to_pylist() == NEW
    meta = json.loads(s3.get(BUCKET, "out/a.parquet.meta.json"))
    assert _etag(s3, "in/a.csv") in meta["provenance"]["input"]["hash"]
    assert meta["metrics"]["texts_computed"] > 0


def test_an_s3_part_replaced_mid_job_is_never_done_and_the_rerun_embeds_it(
        s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    s3.put(BUCKET, "in/a.csv", _csv_bytes(OLD, tmp_path, "old.csv"))
    s3.put(BUCKET, "staging/a.csv", _csv_bytes(NEW, tmp_path, "new.csv"))
    ran = _replace_after_first_chunk(monkeypatch, lambda: s3.client().copy_object(
        Bucket=BUCKET, Key="in/a.csv", CopySource={"Bucket": BUCKET, "Key": "staging/a.csv"}))
    result = embed(EmbedOptions(input=f"s3://{BUCKET}/in/", output=tmp_path / "out", chunk_size=CHUNK))
    assert ran
    [part] = result.document["parts"]
    assert part["status"] == "failed" and f"s3://{BUCKET}/in/a.csv: changed during the job" in part["error"]
    assert not (tmp_path / "out" / "a.parquet").exists()

    _stop_replacing(monkeypatch)
    result = embed(EmbedOptions(input=f"s3://{BUCKET}/in/", output=tmp_path / "out", chunk_size=CHUNK))
    [part] = result.document["parts"]
    assert part["status"] == "done" and part["texts_computed"] > 0  # embedded, not "skipped"
    assert _texts_of(tmp_path / "out" / "a.parquet") == NEW
