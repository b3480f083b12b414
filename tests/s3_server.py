"""A real S3-protocol server on 127.0.0.1 (moto's server mode) that counts what it serves.

hfbatch reaches it exactly as users reach MinIO or R2: through the standard `AWS_ENDPOINT_URL`
environment variable, which botocore (and so boto3, aiobotocore and s3fs) honours. Nothing in
boto3, s3fs or requests is patched. moto's WSGI app is served with werkzeug in a daemon thread,
behind a small WSGI middleware that records each request: method, bucket, key, query, Range
header, status, response body bytes actually sent and request body bytes received.

Use the `s3` fixture (`from s3_server import s3, S3Server`): a running server, the AWS_*
environment pointing at it, a bucket "data-lake", s3fs's instance cache cleared around the test.

moto keeps its state in process-wide backends, so the server resets them when it starts and stops:
run one S3Server at a time in a process (pytest runs tests one at a time; xdist workers are
separate processes).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator
from urllib.parse import parse_qsl

import pytest

BUCKET = "data-lake"
ACCESS_KEY = "testing"
# A string that appears nowhere else: tests search logs, manifests and outputs for it.
SECRET_KEY = "hfbatch-s3-test-secret-9c41f7e2b8"
REGION = "us-east-1"

# Query parameters that make a GET on a key something other than reading the object's bytes.
_NOT_OBJECT_READS = frozenset({"uploadId", "acl", "tagging", "attributes", "retention", "legal-hold", "torrent"})


@dataclass
class Request:
    """One request the server answered."""

    method: str
    bucket: str
    key: str
    query: dict[str, str]
    range: str | None
    status: int = 0
    bytes_out: int = 0
    bytes_in: int = 0

    @property
    def is_object_get(self) -> bool:
        """A GET of an object's bytes (whole, ranged or one part), not a listing or subresource."""
        return self.method == "GET" and bool(self.bucket) and bool(self.key) and not (_NOT_OBJECT_READS & self.query.keys())


class _CountingInput:
    """wsgi.input that counts the request body bytes the app reads."""

    def __init__(self, stream: Any, record: Request) -> None:
        self._stream = stream
        self._record = record

    def _count(self, data: bytes) -> bytes:
        self._record.bytes_in += len(data)
        return data

    def read(self, *args: Any) -> bytes:
        return self._count(self._stream.read(*args))

    def read1(self, *args: Any) -> bytes:
        return self._count(self._stream.read1(*args))

    def readinto(self, buffer: Any) -> int:  # werkzeug's LimitedStream reads this way
        n = self._stream.readinto(buffer)
        self._record.bytes_in += n or 0
        return n

    def readline(self, *args: Any) -> bytes:
        return self._count(self._stream.readline(*args))

    def readlines(self, *args: Any) -> list[bytes]:
        return [self._count(line) for line in self._stream.readlines(*args)]

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._stream:
            yield self._count(chunk)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class _CountingBody:
    """The app's response iterable; counts each chunk before the server writes it, so a count is
    never behind what a client has already received."""

    def __init__(self, body: Iterable[bytes], record: Request) -> None:
        self._body = body
        self._record = record

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._body:
            if self._record.method != "HEAD":  # the server never writes a HEAD body
                self._record.bytes_out += len(chunk)
            yield chunk

    def close(self) -> None:
        close = getattr(self._body, "close", None)
        if close is not None:
            close()


def _split_path(environ: dict[str, Any]) -> tuple[str, str]:
    # WSGI PATH_INFO is the percent-decoded path as latin-1; S3 keys are UTF-8.
    raw = environ.get("PATH_INFO", "") or ""
    try:
        path = raw.encode("latin-1").decode("utf-8")
    except UnicodeError:
        path = raw
    bucket, _, key = path.lstrip("/").partition("/")
    return bucket, key


class _Recorder:
    """WSGI middleware: records every request into `requests` when it arrives, then fills in its
    status and byte counts as the response goes out (a werkzeug worker thread closes the response
    only after the client has it, so recording at close would race the test reading the counts)."""

    holds: list["Hold"]

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self.holds = []
        self.app = app
        self.lock = threading.Lock()
        self.requests: list[Request] = []

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        bucket, key = _split_path(environ)
        record = Request(
            method=environ.get("REQUEST_METHOD", ""),
            bucket=bucket,
            key=key,
            query=dict(parse_qsl(environ.get("QUERY_STRING", ""), keep_blank_values=True)),
            range=environ.get("HTTP_RANGE"),
        )
        with self.lock:
            self.requests.append(record)
            holds = [h for h in self.holds if h.matches(record)]
            for hold in holds:
                hold.held += 1
        for hold in holds:  # a slow store, for stopping a client mid-request at a known point
            hold.seen.set()
            hold.release.wait(hold.seconds)
        if any(h.then == "fail" for h in holds):  # the request never completes: the store keeps nothing of it
            record.status = 503
            start_response("503 Service Unavailable", [("Content-Type", "application/xml"), ("Content-Length", "0")])
            return [b""]
        if "wsgi.input" in environ:
            environ["wsgi.input"] = _CountingInput(environ["wsgi.input"], record)

        def counting_start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
            record.status = int(status.split(" ", 1)[0])
            return start_response(status, headers, exc_info) if exc_info else start_response(status, headers)

        try:
            body = self.app(environ, counting_start_response)
        except BaseException:
            record.status = record.status or 500
            raise
        return _CountingBody(body, record)


@dataclass
class Hold:
    """Requests that the server holds (answers late): `method` and a key suffix, optionally only
    those with a query parameter (`partNumber` for multipart parts), only the first `count` of them
    (None: all). `seen` is set when the first one arrives; a held request goes on after `seconds`
    or once `release` is set, and then (`then`) is served ("pass"), or answered 503 without the
    store reading or keeping any of it ("fail": a request whose client died before it completed)."""

    method: str
    key_suffix: str
    query: str | None = None
    seconds: float = 30.0
    then: str = "pass"
    count: int | None = None
    held: int = 0
    seen: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)

    def matches(self, request: "Request") -> bool:
        return (request.method == self.method and (request.key == self.key_suffix or request.key.endswith(self.key_suffix))
                and (self.query is None or self.query in request.query)
                and (self.count is None or self.held < self.count))


def _reset_moto() -> None:
    from moto.moto_api._internal.models import moto_api_backend

    moto_api_backend.reset()


class S3Server:
    """A moto S3 server on 127.0.0.1 that counts what it serves."""

    def __init__(self) -> None:
        self.url: str = ""
        self._recorder: _Recorder | None = None
        self._server: Any = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "S3Server":
        """Start serving on a free port of 127.0.0.1 with empty moto state; returns self."""
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        _reset_moto()
        self._recorder = _Recorder(DomainDispatcherApplication(create_backend_app))
        self._server = make_server("127.0.0.1", 0, self._recorder, threaded=True, request_handler=MotoRequestHandler)
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="s3-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and drop moto's state."""
        if self._recorder is not None:
            self.release_all()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        _reset_moto()

    def __enter__(self) -> "S3Server":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- what was served ---------------------------------------------------------------------
    @property
    def requests(self) -> list[Request]:
        """Every request so far (a copy), in arrival order; counts fill in as responses are sent."""
        if self._recorder is None:
            return []
        with self._recorder.lock:
            return list(self._recorder.requests)

    def reset_counts(self) -> None:
        """Forget the requests recorded so far (the stored objects stay)."""
        if self._recorder is not None:
            with self._recorder.lock:
                self._recorder.requests.clear()

    def gets(self, key_suffix: str | None = None) -> list[Request]:
        """GET object requests, optionally only for keys ending with `key_suffix`."""
        return [r for r in self.requests if r.is_object_get and (key_suffix is None or r.key.endswith(key_suffix))]

    def bytes_read(self, key_suffix: str | None = None) -> int:
        """Object body bytes sent by GET object requests (optionally only keys ending with `key_suffix`)."""
        return sum(r.bytes_out for r in self.gets(key_suffix))

    # --- setup and inspection ------------------------------------------------------------------
    def client(self) -> Any:
        """A boto3 S3 client for this server, independent of the environment."""
        import boto3

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.url,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
        )

    def create_bucket(self, bucket: str) -> None:
        """Create `bucket` (a valid S3 name: 3-63 lowercase letters, digits, dots, hyphens)."""
        self.client().create_bucket(Bucket=bucket)

    def put(self, bucket: str, key: str, data: bytes) -> None:
        """Store `data` at s3://bucket/key."""
        self.client().put_object(Bucket=bucket, Key=key, Body=data)

    def get(self, bucket: str, key: str) -> bytes:
        """The bytes stored at s3://bucket/key."""
        return self.client().get_object(Bucket=bucket, Key=key)["Body"].read()

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Sorted keys under `prefix` in `bucket`."""
        paginator = self.client().get_paginator("list_objects_v2")
        return sorted(o["Key"] for page in paginator.paginate(Bucket=bucket, Prefix=prefix) for o in page.get("Contents", []))

    def hold(self, method: str, key_suffix: str, *, query: str | None = None, seconds: float = 30.0,
             then: str = "pass", count: int | None = None) -> Hold:
        """Hold matching requests (see Hold); remove with `release_all()`."""
        assert then in ("pass", "fail")
        hold = Hold(method, key_suffix, query, seconds, then, count)
        assert self._recorder is not None
        with self._recorder.lock:
            self._recorder.holds.append(hold)
        return hold

    def release_all(self) -> None:
        assert self._recorder is not None
        with self._recorder.lock:
            for hold in self._recorder.holds:
                hold.release.set()
            self._recorder.holds.clear()

    def multipart_uploads(self, bucket: str) -> list[dict[str, Any]]:
        """Multipart uploads started in `bucket` and neither completed nor aborted."""
        return list(self.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []))


_PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


def point_environment_at(server: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_dir: str) -> None:
    """Point the AWS_* environment at `server` only: no profile, config file, metadata service or proxy."""
    import os

    for name in list(os.environ):
        if name.startswith("AWS_") or name in _PROXY_VARS:
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", os.path.join(tmp_dir, "no-such-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.path.join(tmp_dir, "no-such-aws-credentials"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


def _clear_s3fs_cache() -> None:
    try:
        import s3fs
    except ImportError:
        return
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A running server, the AWS_* environment pointing at it (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID=testing,
    AWS_SECRET_ACCESS_KEY=SECRET_KEY, AWS_DEFAULT_REGION=us-east-1, AWS_EC2_METADATA_DISABLED=true, config
    and credentials files at nonexistent paths, no proxy), a bucket "data-lake" created; s3fs's instance
    cache cleared before and after so no test reuses another's client. Counts start at zero."""
    server = S3Server().start()
    try:
        point_environment_at(server, monkeypatch, str(tmp_path_factory.mktemp("no-aws")))
        _clear_s3fs_cache()
        server.create_bucket(BUCKET)
        server.reset_counts()
        yield server
    finally:
        _clear_s3fs_cache()
        server.stop()
