"""Publishing an output and its sidecar to S3, where no lock can be held: the kill points of a
publish and two jobs to one key, against the real local S3 server (tests/s3_server.py, moto's
server mode, reached through AWS_ENDPOINT_URL), with the server holding the request at the point
under test. And a store that cannot be reached: a runtime failure (exit 1) naming its endpoint.

The jobs under test are small processes that publish through ParquetSink, the same commit the
embed and generate jobs end with, with the CLI's signal handling (SIGTERM raises Terminated): the
publish protocol is what is tested, and a model load per job would only make it slow. One step
drives `hfbatch verify` itself, which refuses a mismatched pair before any model is loaded.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hfbatch.errors import InputError, OutputError
from hfbatch.io.stores import RemotePath
from hfbatch.io.writers import ParquetSink
from hfbatch.tools.verify import check_published_object, check_same_run
from s3_server import BUCKET, SECRET_KEY, S3Server, s3  # noqa: F401  # s3: the fixture

pytest.importorskip("s3fs", reason="s3:// support is the optional extra hfbatch[s3]; the dev install has it")

KEY = "out/a.parquet"
URL = f"s3://{BUCKET}/{KEY}"
SIDECAR_KEY = f"{KEY}.meta.json"

# one publishing job: ROWS rows (BLOB random bytes each, so size is predictable) published to URL
# with its sidecar, as a job's commit does; exit as the CLI would (143 on SIGTERM, 1 on failure)
_JOB = r"""
import os, signal, sys
import pyarrow as pa
from hfbatch.errors import HfbatchError, Terminated
from hfbatch.io.stores import RemotePath
from hfbatch.io.writers import ParquetSink

def stop(signum, frame):
    raise Terminated(signum, signal.Signals(signum).name)

signal.signal(signal.SIGTERM, stop)
url, rows, tag, blob = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
table = pa.table({"id": list(range(rows)), "tag": [tag] * rows, "blob": [os.urandom(blob) for _ in range(rows)]})
document = {"provenance": {"started": f"{tag}-started", "finished": f"{tag}-finished", "input": {"hash": tag},
                           "output": {"path": url, "rows": rows}}, "metrics": {}}
sink = ParquetSink(RemotePath(url), table.schema)
try:
    for batch in table.to_batches():
        sink.write(batch)
    sink.commit(document, sidecar=RemotePath(url + ".meta.json"))
except Terminated as exc:
    sys.exit(exc.exit_code)
except HfbatchError as exc:
    print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
    sys.exit(exc.exit_code)
"""


def _job(rows: int, tag: str, blob: int = 16) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _JOB, URL, str(rows), tag, str(blob)], env=dict(os.environ),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _publish(rows: int, tag: str) -> dict[str, Any]:
    """Yesterday's good output, published in this process; returns its sidecar document."""
    table = pa.table({"id": list(range(rows)), "tag": [tag] * rows, "blob": [b"x" * 16] * rows})
    document = {"provenance": {"started": f"{tag}-started", "finished": f"{tag}-finished", "input": {"hash": tag},
                               "output": {"path": URL, "rows": rows}}, "metrics": {}}
    sink = ParquetSink(RemotePath(URL), table.schema)
    sink.write(table.to_batches()[0])
    sink.commit(document, sidecar=RemotePath(f"{URL}.meta.json"))
    return document


def _pair(server: S3Server) -> tuple[pq.ParquetFile, dict[str, Any], str]:
    """The data object, its sidecar and the data object's current ETag, as a reader finds them."""
    data = pq.ParquetFile(io.BytesIO(server.get(BUCKET, KEY)))
    sidecar = json.loads(server.get(BUCKET, SIDECAR_KEY))
    etag = server.client().head_object(Bucket=BUCKET, Key=KEY)["ETag"].strip('"')
    return data, sidecar, etag


def _assert_one_run(server: S3Server, tag: str, rows: int) -> None:
    """The pair at the key is one run's (`tag`), and verify's pair checks accept it."""
    data, sidecar, etag = _pair(server)
    prov = sidecar["provenance"]
    assert set(data.read().column("tag").to_pylist()) == {tag} and data.metadata.num_rows == rows
    assert prov["input"]["hash"] == tag and prov["output"]["rows"] == rows
    assert prov["output"]["object"]["etag"] == etag  # the sidecar names the data object it was written for
    check_published_object(RemotePath(URL), SIDECAR_KEY, prov)
    check_same_run(URL, SIDECAR_KEY, prov, data.metadata.metadata)


def _held(proc: subprocess.Popen, hold: Any) -> None:
    if not hold.seen.wait(60):
        proc.kill()
        raise AssertionError(proc.communicate())


def test_sigkill_while_the_data_put_is_in_flight_leaves_the_earlier_pair_whole(s3: S3Server) -> None:  # noqa: F811
    _publish(10, "yesterday")
    hold = s3.hold("PUT", KEY, then="fail")  # the data PUT never completes: its client dies first
    proc = _job(186, "today")
    _held(proc, hold)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    s3.release_all()
    _assert_one_run(s3, "yesterday", 10)  # not yesterday's data with today's sidecar
    assert s3.multipart_uploads(BUCKET) == []


def test_sigterm_while_the_data_put_is_in_flight_keeps_the_earlier_output_and_its_sidecar(s3: S3Server) -> None:  # noqa: F811
    _publish(10, "yesterday")
    hold = s3.hold("PUT", KEY, then="fail")
    proc = _job(186, "today")
    _held(proc, hold)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
    s3.release_all()
    assert proc.returncode == 143, stderr
    assert sorted(s3.keys(BUCKET, "out/")) == [KEY, SIDECAR_KEY]  # the earlier sidecar is not deleted
    _assert_one_run(s3, "yesterday", 10)
    deletes = [r for r in s3.requests if r.method == "DELETE" and r.key.startswith("out/")]
    assert deletes == []  # the cleanup deleted nothing it did not write (here: nothing at all)


def test_killed_between_the_data_and_its_sidecar_verify_refuses_the_pair_in_one_line(s3: S3Server) -> None:  # noqa: F811
    _publish(10, "yesterday")
    hold = s3.hold("PUT", SIDECAR_KEY, then="fail")  # the data is in; the sidecar PUT never completes
    proc = _job(186, "today")
    _held(proc, hold)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    s3.release_all()
    data, sidecar, etag = _pair(s3)
    assert data.metadata.num_rows == 186 and sidecar["provenance"]["output"]["rows"] == 10  # the state a kill leaves
    assert sidecar["provenance"]["output"]["object"]["etag"] != etag
    env = {k: v for k, v in os.environ.items() if not k.startswith("HFBATCH_") or k in ("HFBATCH_RUNTIME", "HFBATCH_PRECISION")}
    checked = subprocess.run([sys.executable, "-m", "hfbatch", "verify", URL], env={**env, "HF_HUB_OFFLINE": "1"},
                             capture_output=True, text=True, timeout=120)
    assert checked.returncode == 2, checked.stderr
    assert len(checked.stderr.strip().splitlines()) == 1 and "is not the one its sidecar" in checked.stderr
    assert SECRET_KEY not in checked.stderr + checked.stdout
    with pytest.raises(InputError, match="not this output's"):  # an older sidecar, without the ETag: the file's own provenance
        check_same_run(URL, SIDECAR_KEY, sidecar["provenance"], data.metadata.metadata)


def test_two_jobs_to_one_key_abort_nothing_of_each_other_and_leave_one_runs_pair(s3: S3Server) -> None:  # noqa: F811
    # job A: a ~10 MB output, a multipart upload whose first part the server holds
    hold = s3.hold("PUT", KEY, query="partNumber", count=1)
    first = _job(600, "first", blob=16000)
    _held(first, hold)
    second = _job(186, "second")  # job B publishes the same key while A's upload is open
    _, stderr = second.communicate(timeout=60)
    assert second.returncode == 0, stderr
    _assert_one_run(s3, "second", 186)
    assert len(s3.multipart_uploads(BUCKET)) == 1  # A's upload, still open: B did not abort it
    s3.release_all()
    _, stderr = first.communicate(timeout=60)
    assert first.returncode == 0, stderr  # last to publish wins, with its own sidecar
    _assert_one_run(s3, "first", 600)
    assert s3.multipart_uploads(BUCKET) == []


def test_a_job_whose_data_is_replaced_before_its_sidecar_writes_none_and_fails(s3: S3Server) -> None:  # noqa: F811
    _publish(10, "yesterday")
    hold = s3.hold("PUT", SIDECAR_KEY, count=1)  # job A's sidecar PUT waits; its data is in
    first = _job(50, "first")
    _held(first, hold)
    second = _job(186, "second")  # job B publishes data and sidecar meanwhile
    _, stderr = second.communicate(timeout=60)
    assert second.returncode == 0, stderr
    s3.release_all()
    _, stderr = first.communicate(timeout=60)
    assert first.returncode == 1 and "another job published this output" in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1
    _assert_one_run(s3, "second", 186)  # B's pair, not B's data with A's sidecar


def test_only_uploads_of_dead_processes_on_this_machine_are_aborted(s3: S3Server) -> None:  # noqa: F811
    client = s3.client()
    foreign = client.create_multipart_upload(Bucket=BUCKET, Key=KEY)["UploadId"]  # another host's live upload
    target = RemotePath(URL)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = client.create_multipart_upload(Bucket=BUCKET, Key=KEY)["UploadId"]
    record = target._record_upload(stale)  # noqa: SLF001 - as a killed run's upload() left it
    renamed = record.with_name(record.name.replace(f".{os.getpid()}-", f".{dead.stdout.strip()}-"))
    record.rename(renamed)
    assert target.abort_stale_uploads() == 1
    assert [u["UploadId"] for u in s3.multipart_uploads(BUCKET)] == [foreign] and not renamed.exists()


# --- a store that cannot be reached (item 9) -----------------------------------------------------

def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_an_endpoint_that_refuses_connections_is_exit_1_naming_it(s3: S3Server, tmp_path: Path) -> None:  # noqa: F811
    port = _closed_port()
    src = tmp_path / "in.csv"
    src.write_text("id,text\n1,hello\n", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HFBATCH_") or k in ("HFBATCH_RUNTIME", "HFBATCH_PRECISION")}
    env.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_MAX_ATTEMPTS="1", HF_HUB_OFFLINE="1")
    for args in (["embed", str(src), "-o", f"s3://{BUCKET}/o.parquet"],
                 ["embed", f"s3://{BUCKET}/in.csv", "-o", str(tmp_path / "o.parquet")]):
        proc = subprocess.run([sys.executable, "-m", "hfbatch", *args, "--quiet"], env=env, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 1, (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert f"cannot reach the store at http://127.0.0.1:{port}" in proc.stderr and "connection refused" in proc.stderr
        assert SECRET_KEY not in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o.parquet").exists()
    missing = RemotePath("s3://no-such-bucket-here/o.parquet")  # the live server: a usage error stays exit 2
    with pytest.raises(InputError, match="does not exist"):
        missing.check_writable()


def test_an_endpoint_that_does_not_answer_is_a_runtime_failure(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    import fsspec.config

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:  # accepts every connection and never answers
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        port = listener.getsockname()[1]
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        # a short read timeout and no retries, so the test takes seconds (the defaults wait minutes)
        monkeypatch.setitem(fsspec.config.conf, "s3", {"config_kwargs": {"read_timeout": 1, "connect_timeout": 1,
                                                                          "retries": {"max_attempts": 1}}})
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        target = RemotePath(f"s3://{BUCKET}/o.parquet")
        target.fs.retries = 1  # s3fs's own retries of a timed-out request (an instance setting)
        with pytest.raises(OutputError) as refused:
            target.check_writable()
        assert refused.value.exit_code == 1 and f"http://127.0.0.1:{port}" in str(refused.value)
        assert "no answer" in str(refused.value) and SECRET_KEY not in str(refused.value)
    finally:
        stop.set()
        thread.join(5)
        for sock in held:
            sock.close()
        listener.close()
        s3fs.S3FileSystem.clear_instance_cache()


# --- a many-part job on S3: resume and a failed part's cleanup trust only a pair that is one ----

def _parts_job(tmp_path: Path, texts: dict[str, list[str]] | None = None, column: str = "text") -> Any:
    """A many-part job from local parts to s3://BUCKET/parts/ (in this process: the bundled model)."""
    from conftest import write_csv
    from hfbatch import EmbedOptions, embed

    data = tmp_path / "in"
    data.mkdir(exist_ok=True)
    for name, rows in (texts or {}).items():
        write_csv(data / name, [{"id": i, column: t} for i, t in enumerate(rows)])
    return embed(EmbedOptions(input=data, output=f"s3://{BUCKET}/parts/", cache_dir=tmp_path / "cache"))


def _rewritten(server: S3Server, key: str) -> bytes:
    """The Parquet object at `key` with other vectors but the very same key/value metadata (the
    provenance its sidecar was written with): only the data object's ETag tells it apart."""
    table = pq.read_table(io.BytesIO(server.get(BUCKET, key)))
    zeros = pa.array([[0.0] * 384] * table.num_rows, table.schema.field("embedding").type)
    buffer = io.BytesIO()
    pq.write_table(table.set_column(table.schema.get_field_index("embedding"), "embedding", zeros), buffer)
    return buffer.getvalue()


def test_a_part_whose_data_object_is_not_the_one_its_sidecar_names_is_embedded_again_not_skipped(
        s3: S3Server, tmp_path: Path) -> None:  # noqa: F811
    """The state a run killed between a part's data PUT and its sidecar PUT leaves: a data object
    under the key (same rows, same Parquet metadata) that its sidecar does not name. Resume went by
    the row count and the input hash and skipped it ("already complete") for good; now the sidecar's
    recorded ETag is compared with the object's (one HEAD), so the part is embedded again and the
    pair left is one run's."""
    texts = {"a.csv": [f"a {i} kettle lid" for i in range(6)], "b.csv": [f"b {i} zipper" for i in range(4)]}
    first = _parts_job(tmp_path, texts)
    assert [p["status"] for p in first.document["parts"]] == ["done", "done"]
    s3.put(BUCKET, "parts/a.parquet", _rewritten(s3, "parts/a.parquet"))

    again = _parts_job(tmp_path)
    status = {p["input"]: p["status"] for p in again.document["parts"]}
    assert status == {"a.csv": "done", "b.csv": "skipped"}
    etag = s3.client().head_object(Bucket=BUCKET, Key="parts/a.parquet")["ETag"].strip('"')
    meta = json.loads(s3.get(BUCKET, "parts/_hfbatch/a.parquet.meta.json"))
    assert meta["provenance"]["output"]["object"]["etag"] == etag
    vectors = pq.read_table(io.BytesIO(s3.get(BUCKET, "parts/a.parquet"))).column("embedding").to_pylist()
    assert all(any(v) for v in vectors)  # the model's vectors again, not the zeros


def test_a_failed_part_removes_its_own_pair_and_never_a_sidecar_of_data_it_does_not_name(
        s3: S3Server, tmp_path: Path) -> None:  # noqa: F811
    """A part that fails loses the output an earlier run made of it, so out/ holds what the job
    sidecar counts. But only a pair that is one run's: b's data object was replaced by another
    writer (its sidecar names another ETag), so b's data and that sidecar are not this job's to
    delete, and both stay. (Before: whatever sat at both keys was deleted.)"""
    texts = {"a.csv": [f"a {i} kettle lid" for i in range(6)], "b.csv": [f"b {i} zipper" for i in range(4)]}
    _parts_job(tmp_path, texts)
    foreign = _rewritten(s3, "parts/b.parquet")
    s3.put(BUCKET, "parts/b.parquet", foreign)  # another writer's data, its sidecar not (yet) there
    sidecar_b = s3.get(BUCKET, "parts/_hfbatch/b.parquet.meta.json")

    broken = {name: [f"{t} now" for t in rows] for name, rows in texts.items()}
    again = _parts_job(tmp_path, broken, column="body")  # no text column: each part fails (InputError)
    assert [p["status"] for p in again.document["parts"]] == ["failed", "failed"]
    keys = s3.keys(BUCKET, "parts/")
    assert "parts/a.parquet" not in keys and "parts/_hfbatch/a.parquet.meta.json" not in keys  # its own pair: gone
    assert s3.get(BUCKET, "parts/b.parquet") == foreign  # not the sidecar's data: left, and so is the sidecar
    assert s3.get(BUCKET, "parts/_hfbatch/b.parquet.meta.json") == sidecar_b
