"""The S3 test server itself: s3fs and boto3 reach it through AWS_ENDPOINT_URL alone, and its byte
counts are exact enough to tell a ranged read from a whole-object download."""

from __future__ import annotations

import io
import os
import socket

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq
import pytest
import s3fs

from s3_server import BUCKET, SECRET_KEY, S3Server, s3  # noqa: F401  (s3 is a fixture)


def test_s3fs_writes_and_reads_through_the_environment_only(s3: S3Server) -> None:
    assert os.environ["AWS_ENDPOINT_URL"] == s3.url
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == SECRET_KEY
    assert "AWS_PROFILE" not in os.environ
    assert not os.path.exists(os.environ["AWS_CONFIG_FILE"])
    assert not os.path.exists(os.environ["AWS_SHARED_CREDENTIALS_FILE"])

    fs = s3fs.S3FileSystem()  # no endpoint, no keys: all from the environment
    payload = b"hello, lake\n" * 1000
    with fs.open(f"{BUCKET}/dir/a.txt", "wb") as f:
        f.write(payload)
    assert fs.cat_file(f"{BUCKET}/dir/a.txt") == payload

    assert s3.keys(BUCKET) == ["dir/a.txt"]
    assert s3.keys(BUCKET, prefix="other/") == []
    puts = [r for r in s3.requests if r.method == "PUT" and r.key == "dir/a.txt"]
    assert puts and puts[-1].status == 200 and puts[-1].bytes_in >= len(payload)
    assert s3.bytes_read("a.txt") == len(payload)
    assert [r.status for r in s3.gets("a.txt")] == [200]

    s3.reset_counts()
    assert s3.requests == [] and s3.bytes_read() == 0
    s3.put(BUCKET, "b.bin", b"xyz")
    assert s3.keys(BUCKET) == ["b.bin", "dir/a.txt"]
    assert s3.bytes_read() == 0  # a PUT is not a read


def test_a_ranged_read_counts_only_the_range(s3: S3Server) -> None:
    data = np.random.default_rng(1).bytes(1_000_000)
    s3.put(BUCKET, "blob.bin", data)
    fs = s3fs.S3FileSystem()

    with fs.open(f"{BUCKET}/blob.bin", "rb", cache_type="none") as f:
        f.seek(300_000)
        assert f.read(10_000) == data[300_000:310_000]
    assert abs(s3.bytes_read("blob.bin") - 10_000) <= 16
    (get,) = s3.gets("blob.bin")
    assert get.status == 206 and get.range is not None and get.range.startswith("bytes=300000-")

    s3.reset_counts()
    assert fs.cat_file(f"{BUCKET}/blob.bin", start=999_000, end=999_500) == data[999_000:999_500]
    assert s3.bytes_read() == 500

    s3.reset_counts()
    fs.info(f"{BUCKET}/blob.bin")  # HEAD: headers only
    fs.invalidate_cache()
    assert s3.bytes_read() == 0


def test_missing_keys_answer_404_and_are_counted(s3: S3Server) -> None:
    fs = s3fs.S3FileSystem()
    with pytest.raises(FileNotFoundError):
        fs.cat_file(f"{BUCKET}/nope.bin")
    assert any(r.key == "nope.bin" and r.status == 404 for r in s3.requests)


def test_an_unfinished_multipart_upload_shows_until_aborted(s3: S3Server) -> None:
    client = boto3.client("s3")  # from the environment, as a user's boto3 would be
    start = client.create_multipart_upload(Bucket=BUCKET, Key="out/part-0.parquet")
    upload_id = start["UploadId"]
    client.upload_part(Bucket=BUCKET, Key="out/part-0.parquet", UploadId=upload_id, PartNumber=1, Body=b"x" * 5 * 2**20)

    (upload,) = s3.multipart_uploads(BUCKET)
    assert upload["Key"] == "out/part-0.parquet" and upload["UploadId"] == upload_id
    assert s3.keys(BUCKET) == []  # nothing visible until completed
    assert any(r.method == "POST" and "uploads" in r.query for r in s3.requests)
    (part,) = [r for r in s3.requests if r.method == "PUT" and r.query.get("partNumber") == "1"]
    assert part.query["uploadId"] == upload_id and part.bytes_in >= 5 * 2**20

    client.abort_multipart_upload(Bucket=BUCKET, Key="out/part-0.parquet", UploadId=upload_id)
    assert s3.multipart_uploads(BUCKET) == []
    assert s3.keys(BUCKET) == []


def _wide_parquet(rows: int = 20_000) -> bytes:
    """50 float64 columns with one string column in the middle (so neither the footer read nor a
    read-to-end-of-file can hide in the other's bytes)."""
    rng = np.random.default_rng(0)
    columns: dict[str, object] = {f"f{i}": rng.random(rows) for i in range(25)}
    columns["text"] = [f"row {i} " + "x" * (i % 17) for i in range(rows)]
    columns.update({f"f{i}": rng.random(rows) for i in range(25, 50)})
    buf = io.BytesIO()
    pq.write_table(pa.table(columns), buf)
    return buf.getvalue()


def test_reading_one_parquet_column_transfers_about_that_column(s3: S3Server) -> None:
    data = _wide_parquet()
    s3.put(BUCKET, "wide.parquet", data)
    meta = pq.ParquetFile(pa.BufferReader(data)).metadata
    text = meta.schema.names.index("text")
    chunk = sum(meta.row_group(g).column(text).total_compressed_size for g in range(meta.num_row_groups))
    footer = int.from_bytes(data[-8:-4], "little") + 8
    fs = s3fs.S3FileSystem()

    s3.reset_counts()
    with fs.open(f"{BUCKET}/wide.parquet", "rb", cache_type="none") as f:
        table = pq.ParquetFile(f).read(columns=["text"])
    assert table.num_rows == 20_000 and table.column_names == ["text"]
    read = s3.bytes_read("wide.parquet")
    assert read < 2 * chunk + footer, (read, chunk, footer, len(data))
    assert read < len(data) / 20

    # the same through pyarrow's own filesystem interface, over an s3fs whose default is no cache
    s3.reset_counts()
    arrow_fs = pa.fs.PyFileSystem(pa.fs.FSSpecHandler(s3fs.S3FileSystem(default_cache_type="none")))
    table = pq.read_table(f"{BUCKET}/wide.parquet", columns=["text"], filesystem=arrow_fs)
    assert table.num_rows == 20_000
    assert s3.bytes_read("wide.parquet") < 2 * chunk + footer


def test_a_server_starts_empty_and_stops() -> None:
    with S3Server() as server:  # moto's state is reset on start: no bucket from an earlier test
        assert server.url.startswith("http://127.0.0.1:")
        assert server.client().list_buckets()["Buckets"] == []
        server.create_bucket("second-bucket")
        server.put("second-bucket", "k", b"abc")
        assert server.keys("second-bucket") == ["k"] and server.get("second-bucket", "k") == b"abc"
    port = int(server.url.rsplit(":", 1)[1])
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
