"""hf://datasets/... inputs through huggingface_hub's HfFileSystem, against a local stand-in of the
Hub endpoints it calls (tests/hub_server.py), reached through HF_ENDPOINT as a user reaches a hub
mirror. Nothing in huggingface_hub, httpx or fsspec is patched: in-process tests set the hub's
module constants that HF_ENDPOINT sets at import (`HubServer.point_hub_at`), subprocess tests set
HF_ENDPOINT itself. The server serves Parquet as the hub serves LFS files (a 302 to a CDN URL that
answers ranges) and CSV as git blobs, and counts the bytes it sends per file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import SAMPLE_TEXTS, write_csv, write_parquet
from hfbatch import EmbedOptions, embed
from hfbatch.errors import InputError
from hfbatch.io.stores import RemotePath
from hub_server import TOKEN, HubServer

pytest.importorskip("huggingface_hub")

REPO = "org/name"
URL = f"hf://datasets/{REPO}/data"
PARTS = ("a.parquet", "c.csv", "sub/b.parquet")  # key order


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):  # type: ignore[no-untyped-def]
    """A running stand-in with huggingface_hub pointed at it, online, and no token anywhere: not in
    the environment (conftest clears HF_*) and not a developer's saved login file."""
    import huggingface_hub.constants as constants
    from huggingface_hub import HfFileSystem

    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf_home" / "stored_tokens"))
    with HubServer(page_size=2) as server:  # 2 entries a page: listings follow the Link header
        server.point_hub_at(monkeypatch)
        yield server
    HfFileSystem.clear_instance_cache()  # its listings and repo checks name this server


def _texts(n: int, tag: str) -> list[str]:
    return [f"{tag} {i}: {SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)]}" for i in range(n)]


def _repo(root: Path) -> Path:
    """A dataset repo: a README, and under data/ two Parquet parts (one in a folder), one CSV part
    and a README that is not a part."""
    (root / "data" / "sub").mkdir(parents=True)
    (root / "README.md").write_text("---\nlicense: mit\n---\n# reviews\n")
    (root / "data" / "README.md").write_text("the parts\n")
    write_parquet(root / "data" / "a.parquet", [{"id": i, "text": t} for i, t in enumerate(_texts(23, "pq"))])
    write_csv(root / "data" / "c.csv", [{"id": i, "text": t} for i, t in enumerate(_texts(17, "csv"))])
    write_parquet(root / "data" / "sub" / "b.parquet", [{"id": i, "text": t} for i, t in enumerate(_texts(9, "deep"))])
    return root


def _vectors(table: pa.Table) -> np.ndarray:
    return np.array([v or [0.0] * 384 for v in table.column("embedding").to_pylist()], dtype=np.float32)


def _same(got: pa.Table, want: pa.Table) -> None:
    assert got.num_rows == want.num_rows
    for column in ("id", "text", "n_tokens", "embedding_error"):
        assert got.column(column).to_pylist() == want.column(column).to_pylist(), column
    assert np.abs(_vectors(got) - _vectors(want)).max() < 1e-5


def _cli(args: list[str], server: HubServer, tmp_path: Path, token: str | None = None) -> subprocess.CompletedProcess:
    """`python -m hfbatch ...` in a fresh process that knows the hub only by HF_ENDPOINT, and in which
    a name lookup of any host but this machine fails and is written to tmp_path/"lookups.txt"."""
    guard = tmp_path / "guard"
    guard.mkdir(exist_ok=True)
    (guard / "sitecustomize.py").write_text(
        "import socket\n"
        "_real = socket.getaddrinfo\n"
        "def _local(host, *a, **k):\n"
        "    if host not in ('localhost', '127.0.0.1', '::1', '', None) and not str(host).startswith('127.'):\n"
        f"        open({str(tmp_path / 'lookups.txt')!r}, 'a').write(str(host) + '\\n')\n"
        "        raise OSError('this test may only reach this machine')\n"
        "    return _real(host, *a, **k)\n"
        "socket.getaddrinfo = _local\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(HF_ENDPOINT=server.url, HF_HUB_OFFLINE="0", HF_HUB_DISABLE_TELEMETRY="1",
               HF_HOME=str(tmp_path / "hf_home"), PYTHONPATH=str(guard))
    if token is not None:
        env["HF_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "hfbatch", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def _job(out: Path) -> dict[str, Any]:
    return json.loads((out / "_hfbatch_job.json").read_text())


# --- reading parts -------------------------------------------------------------------------------


def test_parts_of_a_hub_dataset_embed_as_from_local_disk(hub: HubServer, tmp_path: Path) -> None:
    root = _repo(tmp_path / "repo")
    hub.add_dataset(REPO, root)
    local = embed(EmbedOptions(input=root / "data", output=tmp_path / "local", cache_dir=tmp_path / "c1"))
    remote = embed(EmbedOptions(input=URL, output=tmp_path / "out", cache_dir=tmp_path / "c2"))
    assert [p["input"] for p in remote.document["parts"]] == list(PARTS)  # README.md is not a part
    assert remote.document["totals"]["parts_done"] == 3 and remote.document["totals"]["rows_out"] == 49
    entries = hub.entries(hub.repos[REPO])
    for record in local.document["parts"]:
        _same(pq.read_table(tmp_path / "out" / record["output"]), pq.read_table(tmp_path / "local" / record["output"]))
        meta = json.loads((tmp_path / "out" / "_hfbatch" / f"{record['output']}.meta.json").read_text())
        source = meta["provenance"]["input"]
        entry = entries[f"data/{record['input']}"]
        assert source["path"] == f"{URL}/{record['input']}"
        # the input is identified by what the hub's listing says of it: its git blob id and size
        assert source["hash"] == f"hf:{entry.blob}:{len(entry.data)}"
    # every byte came from resolve/CDN GETs of the three parts; nothing asked for a token, none was sent
    served = {r.file for r in hub.requests if r.file}
    assert served == {f"{REPO}:data/{p}" for p in PARTS}
    assert not any(r.auth for r in hub.requests)
    # online, hfbatch first asks the hub for its default model (this one has no models: the bundled
    # copy is used, as offline); every other request succeeded
    failed = [r.path for r in hub.requests if r.status >= 400]
    assert all(p.startswith("/api/models/sentence-transformers/all-MiniLM-L6-v2/") for p in failed), failed


def test_one_file_of_a_hub_dataset(hub: HubServer, tmp_path: Path) -> None:
    root = _repo(tmp_path / "repo")
    hub.add_dataset(REPO, root)
    embed(EmbedOptions(input=root / "data" / "a.parquet", output=tmp_path / "local.parquet", cache_dir=tmp_path / "c1"))
    embed(EmbedOptions(input=f"{URL}/a.parquet", output=tmp_path / "one.parquet", cache_dir=tmp_path / "c2"))
    _same(pq.read_table(tmp_path / "one.parquet"), pq.read_table(tmp_path / "local.parquet"))
    assert {r.file for r in hub.requests if r.file} == {f"{REPO}:data/a.parquet"}


def test_one_text_column_of_a_wide_hub_parquet_is_read_by_range(hub: HubServer, tmp_path: Path) -> None:
    n = 3000
    rng = np.random.default_rng(0)
    columns: dict[str, Any] = {f"f{i}": rng.random(n) for i in range(25)}
    columns["text"] = _texts(40, "wide") * (n // 40)  # 40 distinct: the job computes 40; what is measured is the read
    columns.update({f"g{i}": rng.random(n) for i in range(25)})
    (tmp_path / "wide" / "data").mkdir(parents=True)
    wide = tmp_path / "wide" / "data" / "wide.parquet"
    pq.write_table(pa.table(columns), wide)
    hub.add_dataset("org/wide", tmp_path / "wide")
    size = wide.stat().st_size
    embed(EmbedOptions(input="hf://datasets/org/wide/data/wide.parquet", output=tmp_path / "o.parquet", keep=["text"],
                       cache_dir=tmp_path / "c"))
    reads = hub.file_requests("org/wide", "data/wide.parquet")
    assert reads and all(r.range for r in reads)  # never a GET of the whole file
    # Loose on purpose: pyarrow reads the footer (one tail GET), then the text column's chunks;
    # fsspec and HfFileSystem may round a read up. 50 float columns of 3,000 rows make the rest of
    # the file ~1.2 MB, so reading a quarter of it or more means the columns were not skipped.
    read = hub.bytes_read("org/wide", "data/wide.parquet")
    assert read < size / 4, (read, size)


# --- a private dataset ---------------------------------------------------------------------------


def test_a_private_hub_dataset_needs_hf_token_and_the_token_goes_nowhere_else(hub: HubServer, tmp_path: Path) -> None:
    root = _repo(tmp_path / "repo")
    hub.add_dataset("org/secret", root, private=True)
    url = "hf://datasets/org/secret/data"
    denied = _cli(["embed", url, "-o", str(tmp_path / "denied") + "/", "--cache-dir", str(tmp_path / "c")],
                  hub, tmp_path)
    lines = denied.stderr.strip().splitlines()
    # an InputError naming HF_TOKEN, before any work
    assert denied.returncode == 2, denied.stderr
    assert len(lines) == 1 and "Traceback" not in denied.stderr and "HF_TOKEN" in denied.stderr, denied.stderr
    assert not (tmp_path / "denied").exists()
    asked = [r for r in hub.requests if r.path.startswith("/api/datasets/org/secret")]
    assert asked and all(r.status == 401 and not r.auth for r in asked)
    assert not any(r.file for r in hub.requests)  # not one byte of the private files

    hub.reset()
    out, log = tmp_path / "out", tmp_path / "log.jsonl"
    ok = _cli(["embed", url, "-o", str(out) + "/", "--cache-dir", str(tmp_path / "c"), "--json",
               "--log-file", str(log)], hub, tmp_path, token=TOKEN)
    assert ok.returncode == 0, ok.stderr
    assert _job(out)["totals"]["parts_done"] == 3 and _job(out)["totals"]["rows_out"] == 49
    # the token went with every request to the private repo, and the stand-in is the only server
    # this process reached: no name lookup of another host was even tried
    private = [r for r in hub.requests if r.path.startswith(("/api/datasets/org/secret", "/datasets/org/secret"))]
    assert private and all(r.auth_ok and r.status < 400 for r in private)
    assert all(r.auth_ok for r in hub.requests if r.auth)
    assert not (tmp_path / "lookups.txt").exists(), (tmp_path / "lookups.txt").read_text()
    # ...and it is written nowhere: not in an output, a sidecar, the log, stdout or stderr
    seen = [denied.stdout, denied.stderr, ok.stdout, ok.stderr, log.read_text()]
    seen += [p.read_bytes().decode("utf-8", "replace") for p in out.rglob("*") if p.is_file()]
    assert len(seen) > 8
    assert not any(TOKEN in text for text in seen)


def test_a_private_hub_dataset_without_token_is_named_as_such(hub: HubServer, tmp_path: Path) -> None:
    hub.add_dataset("org/secret", _repo(tmp_path / "repo"), private=True)
    for spec in ("hf://datasets/org/secret/data", "hf://datasets/org/secret/data/*.parquet",
                 "hf://datasets/org/secret/data/a.parquet"):
        with pytest.raises(InputError, match="HF_TOKEN"):
            embed(EmbedOptions(input=spec, output=tmp_path / "o.parquet", cache_dir=tmp_path / "c"))


# --- resuming ------------------------------------------------------------------------------------


def test_identity_is_the_blob_id_and_size_and_changes_with_the_file(hub: HubServer, tmp_path: Path) -> None:
    from huggingface_hub import HfFileSystem

    root = _repo(tmp_path / "repo")
    hub.add_dataset(REPO, root)
    info = RemotePath(f"{URL}/c.csv").info()
    entry = hub.entries(hub.repos[REPO])["data/c.csv"]
    # what HfFileSystem.info says (from the parent's tree listing): no ETag, a git blob id
    assert {k: info[k] for k in ("name", "size", "type", "blob_id", "lfs")} == {
        "name": f"datasets/{REPO}/data/c.csv", "size": len(entry.data), "type": "file", "blob_id": entry.blob,
        "lfs": None}
    lfs = RemotePath(f"{URL}/a.parquet").info()["lfs"]
    assert lfs["sha256"] == hub.entries(hub.repos[REPO])["data/a.parquet"].sha256
    before = RemotePath(f"{URL}/c.csv").identity()
    assert before == f"hf:{entry.blob}:{len(entry.data)}"
    data = (root / "data" / "c.csv").read_bytes()
    (root / "data" / "c.csv").write_bytes(data.replace(b"csv 3:", b"CSV 3:"))  # same size, other bytes
    HfFileSystem.clear_instance_cache()  # a new process: HfFileSystem's listings are per instance
    after = RemotePath(f"{URL}/c.csv").identity()
    assert after != before and after.endswith(f":{len(entry.data)}")


def test_a_rerun_skips_the_finished_parts_and_redoes_a_changed_one(hub: HubServer, tmp_path: Path) -> None:
    root = _repo(tmp_path / "repo")
    hub.add_dataset(REPO, root)
    out = tmp_path / "out"
    first = embed(EmbedOptions(input=URL, output=out, cache_dir=tmp_path / "c"))
    assert first.document["totals"]["parts_done"] == 3
    hub.reset()
    again = embed(EmbedOptions(input=URL, output=out, cache_dir=tmp_path / "c"))
    assert (again.document["totals"]["parts_skipped"], again.document["totals"]["parts_done"]) == (3, 0)
    assert not any(r.file for r in hub.requests)  # not one byte of a finished part's input was read
    # the CSV changes on the hub; a rerun (a new process, as a user reruns a command) redoes it alone
    with (root / "data" / "c.csv").open("a", encoding="utf-8") as f:
        f.write("17,one more row\n")
    hub.reset()
    rerun = _cli(["embed", URL, "-o", str(out) + "/", "--cache-dir", str(tmp_path / "c"), "--quiet"], hub, tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    totals = _job(out)["totals"]
    assert (totals["parts_skipped"], totals["parts_done"], totals["rows_out"]) == (2, 1, 50), totals
    assert pq.read_table(out / "c.parquet").num_rows == 18
    assert {r.file for r in hub.requests if r.file} == {f"{REPO}:data/c.csv"}  # only the changed part was read


def test_a_second_job_in_the_same_process_sees_a_changed_part(hub: HubServer, tmp_path: Path) -> None:
    root = _repo(tmp_path / "repo")
    hub.add_dataset(REPO, root)
    out = tmp_path / "out"
    embed(EmbedOptions(input=URL, output=out, cache_dir=tmp_path / "c"))
    with (root / "data" / "c.csv").open("a", encoding="utf-8") as f:
        f.write("17,one more row\n")
    again = embed(EmbedOptions(input=URL, output=out, cache_dir=tmp_path / "c"))
    assert (again.document["totals"]["parts_skipped"], again.document["totals"]["parts_done"]) == (2, 1)
    assert pq.read_table(out / "c.parquet").num_rows == 18
