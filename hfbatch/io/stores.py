"""Objects in stores as inputs and outputs: S3 and every S3-compatible server (MinIO, R2...),
Google Cloud Storage, Azure Blob / ADLS, Hugging Face datasets.

`RemotePath` names an object, or a prefix, by URL (`s3://bucket/key`) and offers the part of
pathlib.Path that hfbatch uses on inputs and outputs (name, suffixes, parent, `/`, relative_to,
exists/is_file/is_dir), plus what only a store has: an identity that needs no read of the bytes
(ETag or version, and size) and reads by range. The filesystems are fsspec's (s3fs, gcsfs, adlfs,
huggingface_hub's HfFileSystem), each with its store's standard credential chain: the AWS_*
variables and profiles, AWS_ENDPOINT_URL for an S3-compatible server, GOOGLE_APPLICATION_CREDENTIALS,
AZURE_STORAGE_*, HF_TOKEN. hfbatch never writes a credential anywhere: URLs are shown without a
`user:password@` part, and nothing else of the chain is ever printed.

Reading: Parquet through a file opened without read-ahead, so pyarrow's footer and column-chunk
reads are ranged GETs of just the needed columns; CSV and JSONL as a stream in blocks. Writing:
a job writes its output as for a local path (into a local temp file) and *publishes* it with
`upload`, which returns the published object's `stamp` (ETag, VersionId where the bucket keeps
versions, size: what the store answered to the write itself, not a later look). On S3 a small
output is one PUT and a large one a multipart upload, completed only when every part is in and
aborted on any error or signal, so an object appears under the key only for a job that succeeded.
A publish aborts no upload but its own: a SIGKILL leaves an incomplete upload, recorded in a file
in the local temp folder that names its process, and the next publish to that key from this
machine aborts the uploads whose process is gone (`abort_stale_uploads`); another job's live
upload to the same key is never touched. (Uploads left by a machine that is gone are the bucket's
AbortIncompleteMultipartUpload lifecycle rule's to clean.) Other stores through their own put,
whose object appears when the upload completes.

A store that cannot be reached (connection refused, no answer, a name that does not resolve) is
a runtime failure (HfbatchError / OutputError, exit 1), named by its endpoint without
credentials; a missing bucket or key, or credentials refused, is an InputError (exit 2).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import uuid
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Iterator
from urllib.parse import urlsplit

from ..errors import HfbatchError, InputError, OutputError, first_line, redact_text

# URL scheme -> the fsspec protocol that serves it
SCHEMES = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "abfs", "abfs": "abfs", "abfss": "abfs", "hf": "hf"}
_EXTRAS = {"s3": "s3fs", "gcs": "gcsfs", "abfs": "adlfs", "hf": "huggingface_hub"}
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$")
PART_BYTES = 8 << 20  # multipart upload part size (S3's minimum is 5 MiB; the last part may be smaller)


def is_remote(spec: Any) -> bool:
    """A store URL (s3://, gs://, az://, hf://...) or a RemotePath."""
    if isinstance(spec, RemotePath):
        return True
    match = _URL.match(str(spec)) if isinstance(spec, str) else None
    return bool(match and match.group(1).lower() in SCHEMES)


def location(spec: Any) -> "Path | RemotePath":
    """A local Path, or a RemotePath for a store URL (never Path("s3://..."), which would fold the //).
    A Postgres table (io/targets/postgres.PgLocation, made from `-o postgresql://...` by the embed
    options alone) passes through as it is."""
    if isinstance(spec, (Path, RemotePath)) or type(spec).__name__ == "PgLocation":
        return spec
    return RemotePath(str(spec)) if is_remote(spec) else Path(spec)


def _filesystem(protocol: str) -> Any:
    """The store's fsspec filesystem (fsspec keeps one instance per configuration). Listings are
    not cached: a job lists a prefix once, and a rerun must see objects added since."""
    try:
        import fsspec

        return fsspec.filesystem(protocol, use_listings_cache=False)
    except ImportError as exc:
        raise InputError(f"{protocol}:// paths need {_EXTRAS.get(protocol, protocol)}: pip install "
                         f"'hfbatch[{'s3' if protocol == 's3' else 'stores'}]' ({exc}).") from None
    except ValueError as exc:  # fsspec: an unknown protocol
        raise InputError(f"{protocol}:// is not a store hfbatch can reach ({exc}).") from None


class RemotePath:
    """An object or prefix in a store, by URL. Cheap to make: nothing is asked of the store until
    a method that needs it (exists, info, open...) is called."""

    def __init__(self, url: str):
        match = _URL.match(url)
        if not match or match.group(1).lower() not in SCHEMES:
            raise InputError(f"{url!r} is not a store URL (s3://bucket/key, gs://, az://, hf://datasets/...).")
        self.scheme = match.group(1).lower()
        rest = match.group(2)
        if "@" in rest.split("/", 1)[0]:
            raise InputError(f"{self.scheme}://...: credentials do not go in the URL; use the store's own "
                             "configuration (AWS_ACCESS_KEY_ID, a profile, GOOGLE_APPLICATION_CREDENTIALS...).")
        self.key = "/".join(p for p in rest.split("/") if p)  # bucket/key, no empty parts
        if not self.key:
            raise InputError(f"{url!r} names no bucket.")

    # --- what pathlib.Path offers --------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.key}"

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"RemotePath({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemotePath) and (SCHEMES[self.scheme], self.key) == (SCHEMES[other.scheme], other.key)

    def __hash__(self) -> int:
        return hash((SCHEMES[self.scheme], self.key))

    def __lt__(self, other: "RemotePath") -> bool:
        return self.url < other.url

    def __truediv__(self, other: str | PurePosixPath) -> "RemotePath":
        return RemotePath(f"{self.url}/{other}")

    @property
    def _pure(self) -> PurePosixPath:
        return PurePosixPath(self.key)

    @property
    def name(self) -> str:
        return self._pure.name

    @property
    def stem(self) -> str:
        return self._pure.stem

    @property
    def suffix(self) -> str:
        return self._pure.suffix

    @property
    def suffixes(self) -> list[str]:
        return self._pure.suffixes

    @property
    def parent(self) -> "RemotePath":
        parent = str(self._pure.parent)
        return self if parent in ("", ".") else RemotePath(f"{self.scheme}://{parent}")

    @property
    def parents(self) -> list["RemotePath"]:
        out, at = [], self
        while at.parent != at:
            at = at.parent
            out.append(at)
        return out

    def with_name(self, name: str) -> "RemotePath":
        return RemotePath(f"{self.scheme}://{self._pure.with_name(name)}")

    def relative_to(self, other: "RemotePath") -> PurePosixPath:
        if not isinstance(other, RemotePath) or SCHEMES[other.scheme] != SCHEMES[self.scheme]:
            raise ValueError(f"{self} is not in {other}")
        return self._pure.relative_to(other._pure)

    def absolute(self) -> "RemotePath":
        return self

    def resolve(self) -> "RemotePath":
        return self

    # --- the store -----------------------------------------------------------------------------

    @property
    def fs(self) -> Any:
        return _filesystem(SCHEMES[self.scheme])

    def exists(self) -> bool:
        return bool(self._ask(self.fs.exists, self.key))

    def is_file(self) -> bool:
        return bool(self._ask(self.fs.isfile, self.key))

    def is_dir(self) -> bool:
        return bool(self._ask(self.fs.isdir, self.key))

    def info(self) -> dict[str, Any]:
        try:
            return dict(self._ask(self.fs.info, self.key))
        except FileNotFoundError:
            raise InputError(f"{self}: no such object.") from None

    def size(self) -> int:
        return int(self.info().get("size") or 0)

    def identity(self) -> str:
        """What the store says of this object's content without a read of its bytes: its ETag (S3,
        Azure), generation or md5 (GCS), commit/blob id (hub), and its size."""
        self._forget_listings()
        info = self.info()
        mark = next((str(info[k]) for k in ("VersionId", "ETag", "etag", "generation", "md5Hash", "blob_id", "lfs")
                     if info.get(k)), "")
        return f"{self.scheme}:{mark.strip(chr(34))}:{info.get('size')}"

    def open(self, mode: str = "rb", *, ranged: bool = False) -> BinaryIO:
        """A file object: `ranged` for random access without read-ahead (Parquet), else a stream
        read ahead in 1 MiB blocks (CSV, JSONL)."""
        if mode != "rb":
            raise ValueError("RemotePath.open reads only; outputs are published with upload()")
        options = {"cache_type": "none"} if ranged else {"cache_type": "readahead", "block_size": 1 << 20}
        self._forget_listings()  # the size it reads up to is the object's now
        try:
            return self._ask(self.fs.open, self.key, "rb", **options)
        except FileNotFoundError:
            raise InputError(f"{self}: no such object.") from None

    def read_bytes(self) -> bytes:
        return bytes(self._ask(self.fs.cat_file, self.key))

    def read_text(self, encoding: str = "utf-8") -> str:
        try:
            return self.read_bytes().decode(encoding)
        except FileNotFoundError:
            raise FileNotFoundError(str(self)) from None

    def write_text(self, text: str) -> None:
        """One PUT: the object appears whole or not at all."""
        self._ask(self.fs.pipe_file, self.key, text.encode("utf-8"))

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self._ask(self.fs.rm_file, self.key)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def walk_files(self) -> Iterator["RemotePath"]:
        """Every object under this prefix, recursively, in key order."""
        self._forget_listings()
        for key in sorted(self._ask(self.fs.find, self.key)):
            yield RemotePath(f"{self.scheme}://{key}")

    def glob(self, pattern: str) -> list["RemotePath"]:
        """Objects matching a glob pattern (the whole URL is the pattern), in key order."""
        self._forget_listings()
        return [RemotePath(f"{self.scheme}://{key}") for key in sorted(self._ask(self.fs.glob, pattern))
                if not self._ask(self.fs.isdir, key)]

    def _ask(self, call: Any, *args: Any, **kwargs: Any) -> Any:
        """Call the store. What it answers (access denied, an error) becomes a one-line InputError
        (exit 2); a store that cannot be reached, a one-line HfbatchError naming its endpoint (exit 1)."""
        try:
            if SCHEMES[self.scheme] == "hf":
                self._hub_repo_visible()
            return call(*args, **kwargs)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError, HfbatchError):
            raise  # (HfbatchError: a signal's Terminated raised inside the call stays what it is)
        except Exception as exc:  # noqa: BLE001 - botocore/google/azure raise their own types
            if _unreachable(exc):  # (before OSError: ConnectionError and TimeoutError are OSErrors)
                raise HfbatchError(self.unreachable_message(exc)) from None
            if isinstance(exc, PermissionError):
                raise InputError(f"{self}: access denied ({_short(exc)}); check the store's credentials.") from None
            if isinstance(exc, OSError):
                raise InputError(f"{self}: the store answered an error ({_short(exc)}).") from None
            if "Credential" in type(exc).__name__:
                raise InputError(f"{self}: no credentials for the store ({_short(exc)}); set them the store's way "
                                 "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE, "
                                 "GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_*, HF_TOKEN).") from None
            raise InputError(f"{self}: the store answered an error ({type(exc).__name__}: {_short(exc)}).") from None

    def endpoint(self, exc: BaseException | None = None) -> str:
        """Where this store is reached, for messages: scheme://host[:port] of the failed request or
        of the configured endpoint (AWS_ENDPOINT_URL...), never a user:password@ part or a path."""
        names = {"s3": ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"), "gcs": ("STORAGE_EMULATOR_HOST",),
                 "hf": ("HF_ENDPOINT",)}.get(SCHEMES[self.scheme], ())
        candidates = [_request_url(exc)] + [os.environ.get(n) for n in names]
        for raw in candidates:
            if raw:
                parts = urlsplit(raw if "://" in raw else f"http://{raw}")
                if parts.hostname:
                    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
                    try:
                        port = f":{parts.port}" if parts.port else ""
                    except ValueError:
                        port = ""
                    return f"{parts.scheme}://{host}{port}"
        return {"s3": "the AWS S3 endpoint", "gcs": "the Google Cloud Storage endpoint",
                "abfs": "the Azure storage endpoint", "hf": "the Hugging Face hub"}[SCHEMES[self.scheme]]

    def unreachable_message(self, exc: BaseException) -> str:
        setting = {"s3": "AWS_ENDPOINT_URL", "gcs": "STORAGE_EMULATOR_HOST", "hf": "HF_ENDPOINT"}.get(SCHEMES[self.scheme])
        fix = f"check {setting} and that the server is up" if setting else "check the network and that the service is up"
        return (f"{self}: cannot reach the store at {self.endpoint(exc)} ({_connection_cause(exc)}); {fix}.")

    def _hub_repo_visible(self) -> None:
        """hf://: HfFileSystem's exists/isdir/isfile answer False for a repo or revision the hub will
        not show (a private one without HF_TOKEN among them), which would read as 'no such file', and
        its glob raises a bare FileNotFoundError: name the cause first. (Cached by HfFileSystem: no
        request after the first.)"""
        try:
            self.fs.resolve_path(self.key)
        except FileNotFoundError as exc:
            raise InputError(f"{self}: the hub shows no such repo or revision; if it is private or gated, set "
                             f"HF_TOKEN to a token that can read it ({_short(exc)}).") from None
        except (ValueError, NotImplementedError) as exc:
            raise InputError(f"{self}: {_short(exc)}; give hf://datasets/org/name/path.") from None

    def _forget_listings(self) -> None:
        """HfFileSystem keeps its listings, and which repos it could see, for the life of its instance
        (one per process and thread) whatever use_listings_cache says: forget what it holds for this
        key, so a second job in the same process sees the objects (and HF_TOKEN) as they are now."""
        if SCHEMES[self.scheme] == "hf":
            self.fs.invalidate_cache(self.key)

    # --- publishing ----------------------------------------------------------------------------

    def stamp(self) -> dict[str, Any] | None:
        """What the store says this object is now (one HEAD): {"etag", "version_id", "size"}, the
        form `upload` returns; None when there is no such object."""
        self._forget_listings()
        try:
            self.fs.invalidate_cache(self.key)
            info = dict(self._ask(self.fs.info, self.key))
        except FileNotFoundError:
            return None
        if info.get("type") == "directory":
            return None
        mark = next((str(info[k]) for k in ("ETag", "etag", "md5Hash", "blob_id", "lfs") if info.get(k)), "")
        version = next((str(info[k]) for k in ("VersionId", "generation") if info.get(k)), None)
        return _stamp(mark, version, info.get("size"))

    def upload(self, local: Path) -> dict[str, Any]:
        """Put the local file `local` under this key, whole or not at all (see the module docstring).
        Returns the published object's stamp, as the store answered the write."""
        if SCHEMES[self.scheme] != "s3":
            self._ask(self.fs.put_file, str(local), self.key)
            return self.stamp() or _stamp("", None, local.stat().st_size)
        self.abort_stale_uploads()
        bucket, _, key = self.key.partition("/")
        size = local.stat().st_size
        if size <= PART_BYTES:  # one PUT: atomic already
            answer = self._ask(self.fs.call_s3, "put_object", Bucket=bucket, Key=key, Body=local.read_bytes())
            self.fs.invalidate_cache(self.key)
            return _stamp(answer.get("ETag"), answer.get("VersionId"), size)
        started = self._ask(self.fs.call_s3, "create_multipart_upload", Bucket=bucket, Key=key)
        upload_id = started["UploadId"]
        record = self._record_upload(upload_id)  # so a rerun on this machine can abort it if this process is killed
        try:
            parts = []
            with open(local, "rb") as handle:
                while chunk := handle.read(PART_BYTES):
                    number = len(parts) + 1
                    done = self._ask(self.fs.call_s3, "upload_part", Bucket=bucket, Key=key, UploadId=upload_id,
                                     PartNumber=number, Body=chunk)
                    parts.append({"ETag": done["ETag"], "PartNumber": number})
            answer = self._ask(self.fs.call_s3, "complete_multipart_upload", Bucket=bucket, Key=key,
                               UploadId=upload_id, MultipartUpload={"Parts": parts})
        except BaseException:  # an error, SIGTERM or ^C: no object, and this job's upload (only) aborted
            try:
                self.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)
            except Exception:  # noqa: BLE001 - the first error is the one to report
                pass
            raise
        finally:
            record.unlink(missing_ok=True)
        self.fs.invalidate_cache(self.key)
        return _stamp(answer.get("ETag"), answer.get("VersionId"), size)

    def write_text_if(self, text: str, etag: str | None) -> bool:
        """One PUT of `text`, only if the object is still what was seen: its ETag `etag`, or (None)
        no object at all (S3's conditional writes, If-Match / If-None-Match). False when another
        writer got there first. Stores without conditional writes write unconditionally."""
        if SCHEMES[self.scheme] != "s3":
            self.write_text(text)
            return True
        bucket, _, key = self.key.partition("/")
        condition = {"IfMatch": f'"{etag}"'} if etag else {"IfNoneMatch": "*"}
        try:
            self._ask(self.fs.call_s3, "put_object", Bucket=bucket, Key=key, Body=text.encode("utf-8"), **condition)
        except (InputError, OSError) as exc:
            code = _s3_code(exc)
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                return False
            if code in ("NotImplemented", "501"):  # a server without conditional writes: as before them
                self.write_text(text)
                return True
            raise
        finally:
            self.fs.invalidate_cache(self.key)
        return True

    def _record_upload(self, upload_id: str) -> Path:
        """A file in the local temp folder naming this process and its multipart upload to this key."""
        record = _uploads_dir() / f"{_upload_prefix(self)}{os.getpid()}-{uuid.uuid4().hex[:8]}.json"
        try:
            record.write_text(json.dumps({"url": self.url, "upload_id": upload_id}), encoding="utf-8")
        except OSError:
            pass  # a read-only temp folder: the upload goes on, unrecorded (lifecycle rules still clean it)
        return record

    def abort_stale_uploads(self) -> int:
        """Abort the multipart uploads to this key that an hfbatch process on this machine started
        and did not live to complete or abort (S3 only; recorded by `upload`). Another process's
        live upload, or one no record names, is never touched. Returns how many were aborted."""
        if SCHEMES[self.scheme] != "s3":
            return 0
        import psutil

        bucket, _, key = self.key.partition("/")
        aborted = 0
        prefix = _upload_prefix(self)
        for record in sorted(_uploads_dir().glob(f"{prefix}*.json")):
            pid = record.name[len(prefix):].split("-")[0]
            if not pid.isdigit() or psutil.pid_exists(int(pid)):
                continue
            try:
                noted = json.loads(record.read_text(encoding="utf-8"))
                if noted.get("url") == self.url:
                    self.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=noted["upload_id"])
                    aborted += 1
            except FileNotFoundError:
                pass  # already aborted (or completed): nothing left to do
            except (OSError, ValueError, KeyError, TypeError):
                continue  # unreadable, or the store would not answer: kept for the next publish
            record.unlink(missing_ok=True)
        return aborted

    def check_writable(self) -> None:
        """The bucket (container, repo) exists and can be listed: a wrong name or credentials fail
        now, before any work, not at the upload (InputError); a store that cannot be reached fails
        now too, as a runtime failure (OutputError, exit 1), naming its endpoint."""
        bucket = self.key.split("/", 1)[0]
        if SCHEMES[self.scheme] == "s3":  # (s3fs's exists() on a bucket reads an unreachable server as "no")
            try:
                self.fs.call_s3("head_bucket", Bucket=bucket)
                return
            except FileNotFoundError:
                raise InputError(f"{self}: the bucket {bucket!r} does not exist (or these credentials cannot see it).") from None
            except HfbatchError:
                raise
            except Exception as exc:  # noqa: BLE001 - botocore's errors are many
                if _unreachable(exc):
                    raise OutputError(self.unreachable_message(exc)) from None
                if _s3_code(exc) in ("404", "NoSuchBucket"):
                    raise InputError(f"{self}: the bucket {bucket!r} does not exist (or these credentials cannot see it).") from None
                # (403 and the like: the listing below says which, as before)
        try:
            if not self._ask(self.fs.exists, bucket):
                raise InputError(f"{self}: the bucket {bucket!r} does not exist (or these credentials cannot see it).")
        except HfbatchError as exc:
            if type(exc) is HfbatchError:  # unreachable (see _ask): the output cannot be written
                raise OutputError(str(exc)) from None
            raise
        except Exception as exc:  # noqa: BLE001 - botocore's errors are many
            if _unreachable(exc):
                raise OutputError(self.unreachable_message(exc)) from None
            raise InputError(f"{self}: cannot reach the store ({_short(exc)}).") from None


def _short(exc: BaseException) -> str:
    return redact_text(first_line(exc))


# exception types (by name, anywhere in the chain) that mean no answer came from the store
_UNREACHABLE = frozenset({
    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
    "ProxyConnectionError", "ClientConnectorError", "ClientConnectionError", "ServerTimeoutError",
    "ServerDisconnectedError", "ConnectionError", "ConnectError", "ConnectTimeout", "ReadTimeout",
    "TimeoutError", "FSTimeoutError", "ServiceRequestError", "ServiceResponseTimeoutError", "gaierror",
})


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _unreachable(exc: BaseException) -> bool:
    """The store did not answer: refused, timed out, reset, or its name does not resolve."""
    return any(_UNREACHABLE & {c.__name__ for c in type(e).__mro__} for e in _chain(exc))


def _connection_cause(exc: BaseException) -> str:
    for e in _chain(exc):
        names = {c.__name__ for c in type(e).__mro__}
        if "ConnectionRefusedError" in names or "refused" in str(e).lower():
            return "connection refused"
        if names & {"ConnectTimeoutError", "ConnectTimeout"}:
            return "no answer: the connection timed out"
        if names & {"ReadTimeoutError", "ReadTimeout", "TimeoutError", "FSTimeoutError", "ServerTimeoutError",
                    "ServiceResponseTimeoutError"}:
            return "no answer: the request timed out"
        if "gaierror" in names or "Name or service not known" in str(e):
            return "the host name does not resolve"
    return f"no answer: {type(exc).__name__}"


def _request_url(exc: BaseException | None) -> str | None:
    """The URL a botocore connection error was sending to (its `endpoint_url`), if it says."""
    for e in _chain(exc):
        kwargs = getattr(e, "kwargs", None)
        if isinstance(kwargs, dict) and isinstance(kwargs.get("endpoint_url"), str):
            return kwargs["endpoint_url"]
    return None


def _s3_code(exc: BaseException) -> str | None:
    """The S3 error code (or HTTP status) behind an error s3fs translated, if any."""
    for e in _chain(exc):
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            error = response.get("Error") or {}
            return str(error.get("Code") or response.get("ResponseMetadata", {}).get("HTTPStatusCode") or "") or None
    return None


def _stamp(etag: Any, version: Any, size: Any) -> dict[str, Any]:
    """An object's stamp: its ETag (no quotes), version (None where the bucket keeps none) and size."""
    version = str(version) if version not in (None, "", "null") else None
    return {"etag": str(etag or "").strip('"'), "version_id": version, "size": int(size) if size is not None else None}


def _uploads_dir() -> Path:
    return Path(tempfile.gettempdir())


def _upload_prefix(target: RemotePath) -> str:
    return f".hfbatch-upload-{hashlib.blake2b(target.url.encode(), digest_size=10).hexdigest()}."


def publish_error(target: RemotePath, exc: BaseException) -> OutputError:
    return OutputError(f"uploading to {target} failed ({_short(exc)}); nothing was written there.")


__all__ = ["RemotePath", "is_remote", "location", "SCHEMES", "PART_BYTES", "publish_error"]
