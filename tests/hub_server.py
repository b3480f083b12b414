"""A local stand-in for the Hugging Face Hub endpoints that huggingface_hub's HfFileSystem uses to
read a dataset repo, on 127.0.0.1 (a real HTTP server in a thread, no patching of httpx or of
huggingface_hub's request code). Clients reach it exactly as users reach a private hub mirror: with
HF_ENDPOINT pointed at its URL (in a process that imports huggingface_hub after setting it, or,
in-process, `HubServer.point_hub_at(monkeypatch)`).

Each repo is a local directory, read at every request, so a test changes a file and the hub
"commits" it (new blob id, new commit sha). Endpoints, as huggingface_hub 2.x calls them
(hf_api.py, hf_file_system.py, file_download.py):

- GET  /api/agent-harnesses: huggingface_hub 2.x fetches this registry (best effort, once) to name
       the AI agent in its user agent; answered with an empty registry.
- GET  /api/datasets/{org}/{name}[/revision/{rev}]               HfApi.dataset_info (repo_info):
       {"id", "sha", "private", "siblings", ...}; an unknown revision is 404 X-Error-Code RevisionNotFound.
- GET  /api/datasets/{org}/{name}/tree/{rev}[/{path}]?recursive=&expand=[&cursor=]
       HfApi.list_repo_tree / _iter_repo_tree_pages: [{"type": "file", "path", "size", "oid",
       "lfs"?: {"oid", "size", "pointerSize"}} | {"type": "directory", "path", "oid", "size": 0}],
       paginated with a GitHub-style `Link: <...>; rel="next"` header (`page_size` entries a page);
       a path that is not a folder is 404 X-Error-Code EntryNotFound. The path is quoted with
       safe="" by the client (data%2Fsub).
- POST /api/datasets/{org}/{name}/paths-info/{rev}   form data paths=...&expand=...   HfApi.get_paths_info
- GET|HEAD /datasets/{org}/{name}/resolve/{rev}/{path}            file bytes (HfFileSystemFile._fetch_range:
       `Range: bytes=a-b`; HfFileSystemStreamFile: no Range, or `bytes=n-`). A small file is served
       from "git": 200/206 with ETag (the git blob sha1), X-Repo-Commit, Content-Length, Accept-Ranges,
       Content-Range. A file in LFS (`lfs_suffixes`, Parquet by default as the hub's .gitattributes
       has it) is answered as the hub does: 302 to a CDN URL with X-Linked-Etag (sha256),
       X-Linked-Size and X-Repo-Commit; the "CDN" (GET|HEAD /_cdn/{sha256}, on this same server)
       serves the bytes with Range support.

Models and spaces: none; their API and resolve routes answer as the hub does for a repo it does
not have (401 RepoNotFound without a token, 404 with one). (hfbatch, online, asks the hub for its
default model first and falls back to the bundled copy: that lookup lands here.)

Authentication: a `private` repo answers every one of its endpoints 401 with the hub's error shape
(X-Error-Code: RepoNotFound, X-Error-Message and JSON {"error": "Repository not found"}) unless the
request has `Authorization: Bearer <token>`; a request with any other bearer token is 401 "Invalid
credentials in Authorization header" (X-Error-Message too), on any repo.

Every request is recorded (`requests`): method, path, query, Range, whether an Authorization header
came and whether it was the expected token; never the header's value.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from embedding_server import LocalServer

TOKEN = "hf_hubStandInTOKENneverPRINTED7f3a91c0"  # a string that appears nowhere else: tests search outputs for it
_CREATED = "2024-01-01T00:00:00.000Z"


@dataclass
class HubRequest:
    """One request the server answered (never the Authorization header's value)."""

    method: str
    path: str  # the URL path, unquoted
    query: dict[str, list[str]]
    range: str | None
    auth: bool  # an Authorization header came
    auth_ok: bool  # ...and it was `Bearer <the expected token>`
    status: int = 0
    bytes_out: int = 0  # body bytes sent
    file: str | None = None  # "org/name:path" whose bytes were served (resolve and CDN)


@dataclass
class Repo:
    repo_id: str
    root: Path
    private: bool = False


@dataclass
class _Entry:
    path: str
    data: bytes = b""
    is_dir: bool = False
    lfs: bool = False
    blob: str = ""  # git blob sha1 (of the LFS pointer for an LFS file)
    sha256: str = ""
    pointer: bytes = b""
    extra: dict[str, Any] = field(default_factory=dict)


def _git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubServer(LocalServer):
    def __init__(self, token: str = TOKEN, page_size: int = 1000, lfs_suffixes: tuple[str, ...] = (".parquet",)):
        self.token = token
        self.page_size = page_size
        self.lfs_suffixes = lfs_suffixes
        self.repos: dict[str, Repo] = {}
        self.requests: list[HubRequest] = []
        self._lock = threading.Lock()
        self._serve(self._handler())

    # --- the repos --------------------------------------------------------------------------------

    def add_dataset(self, repo_id: str, root: Path, *, private: bool = False) -> Repo:
        """Serve the directory `root` as the dataset repo `repo_id` ("org/name")."""
        repo = Repo(repo_id, Path(root), private)
        self.repos[repo_id] = repo
        return repo

    def entries(self, repo: Repo) -> dict[str, _Entry]:
        """The repo's files and folders now, by path (as git would have them committed)."""
        out: dict[str, _Entry] = {}
        for p in sorted(repo.root.rglob("*")):
            rel = p.relative_to(repo.root).as_posix()
            if p.is_dir():
                out[rel] = _Entry(rel, is_dir=True)
                continue
            data = p.read_bytes()
            entry = _Entry(rel, data, lfs=p.name.endswith(self.lfs_suffixes))
            if entry.lfs:
                entry.sha256 = hashlib.sha256(data).hexdigest()
                entry.pointer = (f"version https://git-lfs.github.com/spec/v1\noid sha256:{entry.sha256}\n"
                                 f"size {len(data)}\n").encode()
                entry.blob = _git_blob_sha(entry.pointer)
            else:
                entry.blob = _git_blob_sha(data)
            out[rel] = entry
        for rel, entry in out.items():  # a folder's oid: a hash of what is below it (a git tree id stand-in)
            if entry.is_dir:
                below = "".join(f"{k}:{e.blob}\n" for k, e in out.items() if k.startswith(rel + "/") and not e.is_dir)
                entry.blob = hashlib.sha1(below.encode()).hexdigest()
        return out

    def commit_sha(self, repo: Repo) -> str:
        listing = "".join(f"{k}:{e.blob}\n" for k, e in self.entries(repo).items() if not e.is_dir)
        return hashlib.sha1(f"{repo.repo_id}\n{listing}".encode()).hexdigest()

    # --- what a test asks -------------------------------------------------------------------------

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()

    def file_requests(self, repo_id: str, path: str) -> list[HubRequest]:
        """The requests that served bytes of one file (resolve and CDN, not listings)."""
        return [r for r in list(self.requests) if r.file == f"{repo_id}:{path}" and r.method == "GET"]

    def bytes_read(self, repo_id: str, path: str) -> int:
        return sum(r.bytes_out for r in self.file_requests(repo_id, path))

    def point_hub_at(self, monkeypatch: Any) -> None:
        """Point huggingface_hub (already imported) at this server, as HF_ENDPOINT does at import:
        the endpoint and the download URL template, and leave offline mode (which blocks every request
        huggingface_hub makes). The HfFileSystem instances cached for other endpoints are dropped."""
        import huggingface_hub.constants as hub
        from huggingface_hub import HfFileSystem

        monkeypatch.setenv("HF_ENDPOINT", self.url)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(hub, "ENDPOINT", self.url)
        monkeypatch.setattr(hub, "HUGGINGFACE_CO_URL_TEMPLATE", self.url + "/{repo_id}/resolve/{revision}/{filename}")
        HfFileSystem.clear_instance_cache()

    # --- the HTTP side ----------------------------------------------------------------------------

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self._handle("GET")

            def do_HEAD(self) -> None:
                self._handle("HEAD")

            def do_POST(self) -> None:
                self._handle("POST")

            # ---

            def _handle(self, method: str) -> None:
                split = urlsplit(self.path)
                header = self.headers.get("Authorization")
                record = HubRequest(method, unquote(split.path), parse_qs(split.query), self.headers.get("Range"),
                                    auth=header is not None, auth_ok=header == f"Bearer {server.token}")
                with server._lock:
                    server.requests.append(record)
                self.record = record
                body = b""
                if method == "POST":
                    body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    self._route(method, split.path, split.query, body)
                except BrokenPipeError:
                    pass

            def _send(self, status: int, body: bytes | Any = b"", headers: dict[str, str] | None = None,
                      content_type: str = "application/json", head: bool = False) -> None:
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                if not head:
                    self.wfile.write(data)
                    self.record.bytes_out = len(data)
                self.record.status = status

            def _error(self, status: int, message: str, code: str | None = None, head: bool = False) -> None:
                headers = {"X-Error-Message": message}
                if code:
                    headers["X-Error-Code"] = code
                self._send(status, {"error": message}, headers, head=head)

            def _route(self, method: str, raw_path: str, query: str, body: bytes) -> None:
                if self.record.auth and not self.record.auth_ok:
                    return self._error(401, "Invalid credentials in Authorization header", head=method == "HEAD")
                pieces = raw_path.strip("/").split("/")
                if pieces == ["api", "agent-harnesses"] and method == "GET":  # huggingface_hub's agent detection
                    return self._send(200, {"standardEnvVars": [], "harnesses": {}})
                if pieces[:1] == ["_cdn"] and len(pieces) == 2 and method in ("GET", "HEAD"):
                    return self._cdn(method, pieces[1])
                if pieces[:2] == ["api", "datasets"] and len(pieces) >= 4:
                    repo = self._repo(unquote(pieces[2]) + "/" + unquote(pieces[3]), method == "HEAD")
                    if repo is None:
                        return None
                    rest = pieces[4:]
                    if not rest and method == "GET":
                        return self._info(repo, None)
                    if rest[:1] == ["revision"] and len(rest) == 2 and method == "GET":
                        return self._info(repo, unquote(rest[1]))
                    if rest[:1] == ["tree"] and len(rest) >= 2 and method == "GET":
                        return self._tree(repo, unquote(rest[1]), unquote("/".join(rest[2:])), parse_qs(query))
                    if rest[:1] == ["paths-info"] and len(rest) == 2 and method == "POST":
                        return self._paths_info(repo, unquote(rest[1]), parse_qs(body.decode()))
                resolve = pieces[:1] == ["datasets"] and len(pieces) >= 6 and pieces[3] == "resolve"
                if resolve and method in ("GET", "HEAD"):
                    repo = self._repo(unquote(pieces[1]) + "/" + unquote(pieces[2]), method == "HEAD")
                    if repo is None:
                        return None
                    return self._resolve(method, repo, unquote(pieces[4]), unquote("/".join(pieces[5:])))
                if pieces[:1] == ["api"] and pieces[1:2] in (["models"], ["spaces"]) or (
                        len(pieces) > 3 and pieces[2] == "resolve"):  # a model: this hub has none
                    return self._error(404 if self.record.auth_ok else 401, "Repository not found", "RepoNotFound",
                                       head=method == "HEAD")
                return self._error(404, "Not Found", head=method == "HEAD")

            def _repo(self, repo_id: str, head: bool) -> Repo | None:
                repo = server.repos.get(repo_id)
                if repo is None or (repo.private and not self.record.auth_ok):
                    # the hub does not say whether a repo it will not show you exists: 401 without a
                    # token, 404 with one
                    status = 404 if repo is None and self.record.auth_ok else 401
                    self._error(status, "Repository not found", "RepoNotFound", head=head)
                    return None
                return repo

            def _revision_ok(self, repo: Repo, revision: str, head: bool = False) -> str | None:
                sha = server.commit_sha(repo)
                if revision in ("main", sha):
                    return sha
                self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound", head=head)
                return None

            def _info(self, repo: Repo, revision: str | None) -> None:
                sha = self._revision_ok(repo, revision or "main")
                if sha is None:
                    return
                entries = server.entries(repo)
                org = repo.repo_id.split("/")[0]
                self._send(200, {
                    "_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24], "id": repo.repo_id, "author": org,
                    "sha": sha, "lastModified": _CREATED, "createdAt": _CREATED, "private": repo.private,
                    "gated": False, "disabled": False, "downloads": 0, "likes": 0, "tags": [], "cardData": None,
                    "siblings": [{"rfilename": k} for k, e in entries.items() if not e.is_dir],
                    "usedStorage": sum(len(e.data) for e in entries.values()),
                })

            def _json_entry(self, entry: _Entry, expand: bool, sha: str) -> dict[str, Any]:
                if entry.is_dir:
                    out: dict[str, Any] = {"type": "directory", "oid": entry.blob, "size": 0, "path": entry.path}
                else:
                    out = {"type": "file", "oid": entry.blob, "size": len(entry.data), "path": entry.path}
                    if entry.lfs:
                        out["lfs"] = {"oid": entry.sha256, "size": len(entry.data), "pointerSize": len(entry.pointer)}
                if expand:
                    out["lastCommit"] = {"id": sha, "title": "Upload", "date": _CREATED}
                return out

            def _tree(self, repo: Repo, revision: str, path: str, query: dict[str, list[str]]) -> None:
                sha = self._revision_ok(repo, revision)
                if sha is None:
                    return
                recursive = query.get("recursive", ["false"])[0].lower() in ("true", "1")
                expand = query.get("expand", ["false"])[0].lower() in ("true", "1")
                entries = server.entries(repo)
                path = path.strip("/")
                if path and not (path in entries and entries[path].is_dir):
                    return self._error(404, f"Entry not found: {path}", "EntryNotFound")
                prefix = path + "/" if path else ""
                below = [e for k, e in entries.items() if k.startswith(prefix)
                         and (recursive or "/" not in k[len(prefix):])]
                below.sort(key=lambda e: (not e.is_dir, e.path))  # the hub lists folders first
                start = int(query.get("cursor", ["0"])[0])
                page = below[start:start + server.page_size]
                headers = {}
                if start + server.page_size < len(below):
                    encoded = "/" + quote(path, safe="") if path else ""
                    next_url = (f"{server.url}/api/datasets/{repo.repo_id}/tree/{quote(revision, safe='')}{encoded}"
                                f"?recursive={str(recursive).lower()}&expand={str(expand).lower()}"
                                f"&cursor={start + server.page_size}")
                    headers["Link"] = f'<{next_url}>; rel="next"'
                self._send(200, [self._json_entry(e, expand, sha) for e in page], headers)

            def _paths_info(self, repo: Repo, revision: str, form: dict[str, list[str]]) -> None:
                sha = self._revision_ok(repo, revision)
                if sha is None:
                    return
                expand = form.get("expand", ["false"])[0].lower() in ("true", "1")
                entries = server.entries(repo)
                wanted = [p.strip("/") for p in form.get("paths", [])]
                self._send(200, [self._json_entry(entries[p], expand, sha) for p in wanted if p in entries])

            def _resolve(self, method: str, repo: Repo, revision: str, path: str) -> None:
                head = method == "HEAD"
                sha = self._revision_ok(repo, revision, head)
                if sha is None:
                    return
                entry = server.entries(repo).get(path)
                if entry is None or entry.is_dir:
                    return self._error(404, "Entry not found", "EntryNotFound", head=head)
                common = {"X-Repo-Commit": sha, "Accept-Ranges": "bytes"}
                if entry.lfs:
                    self.record.file = f"{repo.repo_id}:{path}"
                    location = f"{server.url}/_cdn/{entry.sha256}"
                    return self._send(302, b"", {**common, "Location": location, "ETag": f'"{entry.blob}"',
                                                 "X-Linked-Etag": f'"{entry.sha256}"',
                                                 "X-Linked-Size": str(len(entry.data))}, "text/plain", head)
                self.record.file = f"{repo.repo_id}:{path}"
                self._bytes(entry.data, {**common, "ETag": f'"{entry.blob}"'}, head)

            def _cdn(self, method: str, sha256: str) -> None:
                for repo in server.repos.values():
                    for entry in server.entries(repo).values():
                        if entry.lfs and entry.sha256 == sha256:
                            self.record.file = f"{repo.repo_id}:{entry.path}"
                            return self._bytes(entry.data, {"ETag": f'"{sha256}"', "Accept-Ranges": "bytes"},
                                               method == "HEAD")
                return self._send(404, b"<Error><Code>NoSuchKey</Code></Error>", {}, "application/xml",
                                  method == "HEAD")

            def _bytes(self, data: bytes, headers: dict[str, str], head: bool) -> None:
                """The file, or the range the request asks for (bytes=a-b, a-, -n)."""
                headers = {**headers, "Last-Modified": formatdate(datetime(2024, 1, 1, tzinfo=timezone.utc).timestamp(),
                                                                  usegmt=True)}
                size = len(data)
                wanted = self.headers.get("Range")
                if not wanted:
                    return self._send(200, data, headers, "application/octet-stream", head)
                try:
                    unit, _, spec = wanted.partition("=")
                    first, _, last = spec.split(",")[0].strip().partition("-")
                    if unit.strip() != "bytes" or (not first and not last):
                        raise ValueError(wanted)
                    if first:
                        start, end = int(first), min(int(last) if last else size - 1, size - 1)
                    else:
                        start, end = max(size - int(last), 0), size - 1
                except ValueError:
                    # an unreadable Range is ignored, as HTTP says
                    return self._send(200, data, headers, "application/octet-stream", head)
                if start >= size or start > end:
                    return self._send(416, b"", {**headers, "Content-Range": f"bytes */{size}"}, "text/plain", head)
                self._send(206, data[start:end + 1], {**headers, "Content-Range": f"bytes {start}-{end}/{size}"},
                           "application/octet-stream", head)

        return Handler


__all__ = ["HubServer", "HubRequest", "Repo", "TOKEN"]
