"""Inputs and outputs in an S3-compatible store: a real S3-protocol server on 127.0.0.1 (moto's,
tests/s3_server.py), reached through AWS_ENDPOINT_URL exactly as users reach MinIO or R2. Nothing
in boto3, s3fs or pyarrow is patched; the server counts the bytes it serves."""

from __future__ import annotations

import gzip
import io
import json
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import SAMPLE_TEXTS, write_csv, write_jsonl, write_parquet
from hfbatch import EmbedOptions, embed
from hfbatch.engines.parts import merge_job_sidecars
from s3_server import BUCKET, SECRET_KEY, S3Server, s3  # noqa: F401  # s3: the fixture

pytest.importorskip("s3fs", reason="s3:// support is the optional extra hfbatch[s3]; the dev install has it")


def _texts(n: int, tag: str) -> list[str]:
    return [f"{tag} {i}: {SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)]}" for i in range(n)]


def _local_parts(root: Path) -> Path:
    """Four parts of four kinds: Parquet, CSV (with an invalid row), gzip JSONL, Parquet in a folder."""
    root.mkdir()
    write_parquet(root / "a.parquet", [{"id": i, "text": t} for i, t in enumerate(_texts(23, "pq"))])
    write_csv(root / "b.csv", [{"id": i, "text": t} for i, t in enumerate(_texts(17, "csv") + [""])])
    with gzip.open(root / "c.jsonl.gz", "wt", encoding="utf-8") as f:
        for i, t in enumerate(_texts(11, "jsonl")):
            f.write(json.dumps({"id": i, "text": t}) + "\n")
    (root / "sub").mkdir()
    write_parquet(root / "sub" / "d.parquet", [{"id": i, "text": t} for i, t in enumerate(_texts(9, "deep"))])
    return root


def _upload_dir(server: S3Server, root: Path, prefix: str) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            server.put(BUCKET, f"{prefix}/{path.relative_to(root).as_posix()}", path.read_bytes())


def _table(server: S3Server, key: str) -> pa.Table:
    return pq.read_table(io.BytesIO(server.get(BUCKET, key)))


def _cli(*args: str, env: dict | None = None, **kw) -> subprocess.Popen:
    pinned = ("HFBATCH_RUNTIME", "HFBATCH_PRECISION", "HFBATCH_ONNX_DIR")  # the suite's runtime (conftest)
    full = {k: v for k, v in (env or os.environ).items() if not k.startswith("HFBATCH_") or k in pinned}
    full.update(HF_HUB_OFFLINE="1")
    return subprocess.Popen([sys.executable, "-m", "hfbatch", *args], env=full, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_parts_in_s3_embed_to_s3_row_for_row_as_from_local_disk(s3: S3Server, tmp_path: Path) -> None:
    root = _local_parts(tmp_path / "data")
    _upload_dir(s3, root, "in")
    local = embed(EmbedOptions(input=root, output=tmp_path / "local", cache_dir=tmp_path / "c1"))
    remote = embed(EmbedOptions(input=f"s3://{BUCKET}/in", output=f"s3://{BUCKET}/out/", cache_dir=tmp_path / "c2"))
    assert remote.document["totals"]["parts_done"] == 4 and remote.document["totals"]["rows_out"] == 61
    for record in local.document["parts"]:
        want = pq.read_table(tmp_path / "local" / record["output"])
        got = _table(s3, f"out/{record['output']}")
        assert got.schema.remove_metadata() == want.schema.remove_metadata(), record["output"]
        for column in ("id", "text", "n_tokens", "embedding_error"):
            assert got.column(column).to_pylist() == want.column(column).to_pylist()
        a = np.array([v or [0.0] * 384 for v in got.column("embedding").to_pylist()], dtype=np.float32)
        b = np.array([v or [0.0] * 384 for v in want.column("embedding").to_pylist()], dtype=np.float32)
        assert np.abs(a - b).max() < 1e-5
        meta = json.loads(s3.get(BUCKET, f"out/_hfbatch/{record['output']}.meta.json"))
        # the input named by URL, identified by what the store says of it (no hash of its bytes)
        assert meta["provenance"]["input"]["path"].startswith(f"s3://{BUCKET}/in/")
        assert meta["provenance"]["input"]["hash"].startswith("s3:") and meta["metrics"]["rows_written"] == want.num_rows
    job = json.loads(s3.get(BUCKET, "out/_hfbatch_job.json"))
    assert job["totals"]["parts_done"] == 4 and merge_job_sidecars(f"s3://{BUCKET}/out/")["complete"] is True
    keys = s3.keys(BUCKET, "out/")
    assert not any("tmp" in k for k in keys)  # nothing but outputs and sidecars
    again = embed(EmbedOptions(input=f"s3://{BUCKET}/in", output=f"s3://{BUCKET}/out/", cache_dir=tmp_path / "c2"))
    assert again.document["totals"]["parts_skipped"] == 4


def test_one_file_from_s3_to_s3_and_verify(s3: S3Server, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "text": t} for i, t in enumerate(_texts(12, "one"))])
    s3.put(BUCKET, "in/rows.jsonl", src.read_bytes())
    result = embed(EmbedOptions(input=f"s3://{BUCKET}/in/rows.jsonl", output=f"s3://{BUCKET}/out/rows.parquet",
                                cache_dir=tmp_path / "c"))
    assert str(result.output) == f"s3://{BUCKET}/out/rows.parquet"
    assert set(s3.keys(BUCKET, "out/")) == {"out/rows.parquet", "out/rows.parquet.meta.json"}
    table = _table(s3, "out/rows.parquet")
    assert table.column("id").to_pylist() == list(range(12)) and table.column("embedding").null_count == 0
    checked = _cli("verify", f"s3://{BUCKET}/out/rows.parquet", "--json")
    stdout, stderr = checked.communicate(timeout=240)
    assert checked.returncode == 0, stderr
    assert json.loads(stdout)["agree"] == 12


def test_sigkill_during_the_upload_leaves_no_object_and_the_rerun_leaves_no_upload(s3: S3Server, tmp_path: Path) -> None:
    # 8,000 rows of one text and an incompressible column: a ~13 MB output (a multipart upload), one vector
    rows = [{"id": i, "text": "one text for every row", "blob": secrets.token_hex(1500)} for i in range(8000)]
    src = write_parquet(tmp_path / "big.parquet", rows)
    target = f"s3://{BUCKET}/out/big.parquet"
    hold = s3.hold("PUT", "out/big.parquet", query="partNumber")  # the first part waits at the server
    proc = _cli("embed", str(src), "-o", target, "--cache-dir", str(tmp_path / "c"), "--quiet")
    assert hold.seen.wait(240), proc.communicate()
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    s3.release_all()
    assert "out/big.parquet" not in s3.keys(BUCKET, "out/")  # no object under the output's key
    assert s3.multipart_uploads(BUCKET)  # the killed run's upload, neither completed nor aborted
    rerun = _cli("embed", str(src), "-o", target, "--cache-dir", str(tmp_path / "c"), "--quiet")
    _, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr
    assert s3.multipart_uploads(BUCKET) == []  # the rerun aborted the one left behind, and completed its own
    table = _table(s3, "out/big.parquet")
    assert table.num_rows == 8000 and table.column("id").to_pylist() == list(range(8000))
    assert json.loads(s3.get(BUCKET, "out/big.parquet.meta.json"))["provenance"]["output"]["rows"] == 8000


def test_a_job_killed_after_two_of_four_parts_resumes_without_reading_their_inputs(s3: S3Server, tmp_path: Path) -> None:
    root = _local_parts(tmp_path / "data")
    _upload_dir(s3, root, "in")
    hold = s3.hold("GET", "in/c.jsonl.gz")  # the third part (key order: a, b, c, sub/d) waits at the server
    proc = _cli("embed", f"s3://{BUCKET}/in", "-o", f"s3://{BUCKET}/out/", "--cache-dir", str(tmp_path / "c"), "--quiet")
    assert hold.seen.wait(240), proc.communicate()
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    s3.release_all()
    done = json.loads(s3.get(BUCKET, "out/_hfbatch_job.json"))
    assert [p["input"] for p in done["parts"] if p["status"] == "done"] == ["a.parquet", "b.csv"]
    s3.reset_counts()
    again = embed(EmbedOptions(input=f"s3://{BUCKET}/in", output=f"s3://{BUCKET}/out/", cache_dir=tmp_path / "c"))
    totals = again.document["totals"]
    assert (totals["parts_skipped"], totals["parts_done"], totals["rows_out"]) == (2, 2, 61)
    assert s3.gets("in/a.parquet") == [] and s3.gets("in/b.csv") == []  # not one byte of the finished parts' inputs
    assert s3.bytes_read("in/c.jsonl.gz") > 0 and s3.bytes_read("in/sub/d.parquet") > 0


def test_one_text_column_of_a_wide_parquet_is_read_by_range(s3: S3Server, tmp_path: Path) -> None:
    n = 3000
    rng = np.random.default_rng(0)
    columns = {f"f{i}": rng.random(n) for i in range(25)}
    columns["text"] = _texts(40, "wide") * (n // 40)  # 40 distinct: the job computes 40; what is measured is the read
    columns.update({f"g{i}": rng.random(n) for i in range(25)})
    pq.write_table(pa.table(columns), tmp_path / "wide.parquet")
    s3.put(BUCKET, "in/wide.parquet", (tmp_path / "wide.parquet").read_bytes())
    meta = pq.ParquetFile(tmp_path / "wide.parquet").metadata
    text_bytes = sum(meta.row_group(g).column(25).total_compressed_size for g in range(meta.num_row_groups))
    size = (tmp_path / "wide.parquet").stat().st_size
    s3.reset_counts()
    embed(EmbedOptions(input=f"s3://{BUCKET}/in/wide.parquet", output=tmp_path / "o.parquet", keep=["text"],
                       cache_dir=tmp_path / "c"))
    read = s3.bytes_read("in/wide.parquet")
    footer = meta.serialized_size + 8
    assert read < 2 * text_bytes + footer + 65536, (read, text_bytes, size)  # the footer is read in one 64 KiB GET
    assert read < size / 4  # a whole-file read would be ~15x the text column here


def test_store_credentials_appear_in_no_artifact_log_or_error(s3: S3Server, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_SECRETtokenNEVERtoBEseen1234")
    src = write_csv(tmp_path / "in.csv", [{"id": i, "text": t} for i, t in enumerate(_texts(6, "creds"))])
    s3.put(BUCKET, "in/in.csv", src.read_bytes())
    log, metrics = tmp_path / "log.jsonl", tmp_path / "m.prom"
    ok = _cli("embed", f"s3://{BUCKET}/in/in.csv", "-o", f"s3://{BUCKET}/out/o.parquet", "--json", "--log-file", str(log),
              "--metrics-file", str(metrics), "--cache-dir", str(tmp_path / "c"))
    ok_out, ok_err = ok.communicate(timeout=240)
    assert ok.returncode == 0, ok_err
    missing = _cli("embed", "s3://no-such-bucket-here/in.csv", "-o", str(tmp_path / "x.parquet"), "--debug")
    bad_out, bad_err = missing.communicate(timeout=240)
    assert missing.returncode == 2 and "no-such-bucket-here" in bad_err
    wrong_bucket = _cli("embed", str(src), "-o", "s3://no-such-bucket-here/o.parquet")
    _, wrong_err = wrong_bucket.communicate(timeout=240)
    assert wrong_bucket.returncode == 2 and "does not exist" in wrong_err and len(wrong_err.strip().splitlines()) == 1
    seen = [ok_out, ok_err, bad_out, bad_err, wrong_err, log.read_text(), metrics.read_text()]
    seen += [s3.get(BUCKET, key).decode("utf-8", "replace") for key in s3.keys(BUCKET, "out/")]
    for secret in (SECRET_KEY, "hf_SECRETtokenNEVERtoBEseen1234"):
        assert not any(secret in text for text in seen)


def test_store_paths_that_cannot_work_are_refused_before_any_work(s3: S3Server, tmp_path: Path) -> None:
    src = write_csv(tmp_path / "in.csv", [{"id": 1, "text": "x"}])
    cases = {
        f"--metrics-file s3://{BUCKET}/m.prom: is written on this machine": ["--metrics-file", f"s3://{BUCKET}/m.prom"],
        "credentials do not go in the URL": ["-o", f"s3://key:secret@{BUCKET}/o.parquet"],
        "give it a .parquet name": ["-o", f"s3://{BUCKET}/o.csv"],
    }
    for message, args in cases.items():
        full = ["embed", str(src), *(["-o", str(tmp_path / "o.parquet")] if args[0] != "-o" else []), *args]
        proc = _cli(*full)
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 2 and message in stderr, (args, stderr)
        assert "secret" not in stderr.replace("credentials", "")
    assert s3.keys(BUCKET) == []
    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "in.parquet")
    s3.put(BUCKET, "in/in.parquet", (tmp_path / "in.parquet").read_bytes())
    same = _cli("embed", f"s3://{BUCKET}/in/in.parquet", "-o", f"s3://{BUCKET}/in/in.parquet")
    _, stderr = same.communicate(timeout=120)
    assert same.returncode == 2 and "in/in.parquet" in stderr, stderr  # the output would overwrite its input
    assert s3.keys(BUCKET) == ["in/in.parquet"]


def test_the_ray_engine_reads_and_writes_the_store_like_the_local_engine(s3: S3Server, tmp_path: Path,  # noqa: F811
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("ray")
    monkeypatch.setenv("HFBATCH_RUNTIME", "onnx")  # both engines; an actor then starts without torch
    root = _local_parts(tmp_path / "data")
    _upload_dir(s3, root, "in")
    local = embed(EmbedOptions(input=root, output=tmp_path / "local", cache_dir=tmp_path / "c1"))
    ray = embed(EmbedOptions(input=f"s3://{BUCKET}/in", output=f"s3://{BUCKET}/rout/", cache_dir=tmp_path / "c2"),
                engine="ray", num_workers=1)
    assert ray.document["totals"]["rows_out"] == local.document["totals"]["rows_out"] == 61
    for record in local.document["parts"]:
        want = pq.read_table(tmp_path / "local" / record["output"])
        got = _table(s3, f"rout/{record['output']}")
        assert got.column("id").to_pylist() == want.column("id").to_pylist()
        assert got.column("embedding_error").to_pylist() == want.column("embedding_error").to_pylist()


def test_no_credentials_is_a_one_line_usage_error_naming_the_fix(s3: S3Server, tmp_path: Path) -> None:
    s3.put(BUCKET, "in/a.csv", b"text\nhello\n")
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    proc = _cli("embed", f"s3://{BUCKET}/in/a.csv", "-o", str(tmp_path / "o.parquet"), "--quiet", env=env)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "no credentials for the store" in stderr and "AWS_ACCESS_KEY_ID" in stderr
    assert len(stderr.strip().splitlines()) == 1 and not (tmp_path / "o.parquet").exists()
