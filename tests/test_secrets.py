"""The token never appears in any artifact: stdout, stderr (--debug too), output, sidecar, cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import SAMPLE_TEXTS, rows_for, write_csv
from embedding_server import CaptureServer, EmbeddingServer, Reply, route_through
from hfbatch.cli import app
from hfbatch.io.writers import read_metadata

SECRET = "hf_SeCrEtToKeN0123456789abcdefXYZ"
runner = CliRunner()


@pytest.fixture
def server(st_model):
    with EmbeddingServer(st_model) as srv:
        yield srv


def test_no_artifact_contains_the_token(tmp_path: Path, server: EmbeddingServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("HFBATCH_HF_ROUTER", server.url)  # the HF Inference API route, served locally
    src = write_csv(tmp_path / "in.csv", rows_for(SAMPLE_TEXTS))
    printed = []
    ok = runner.invoke(app, ["embed", str(src), "-o", str(tmp_path / "api.parquet"), "--backend", "hf-api",
                             "--json", "--debug"])
    assert ok.exit_code == 0, ok.output
    printed.append(ok.output)
    # the server echoes the Authorization header in its error, as some proxies do
    server.script.append(Reply(401, {"error": f"invalid credentials: Bearer {SECRET}"}))
    bad = runner.invoke(app, ["embed", str(src), "-o", str(tmp_path / "bad.parquet"), "--backend", "hf-api",
                              "--debug", "--no-cache"])
    assert bad.exit_code == 1 and "set HF_TOKEN" in bad.stderr and "Traceback" in bad.stderr
    printed.append(bad.output)
    for args in (["capabilities", "--json"], ["test-connection", "--backend", "hf-api", "--json"]):
        result = runner.invoke(app, args)
        printed.append(result.output)
    assert server.requests[0]["headers"]["Authorization"] == f"Bearer {SECRET}"  # it was used...
    for text in printed:
        assert SECRET not in text  # ...and never shown
    files = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "in.csv"]
    assert any(p.name == "api.parquet.meta.json" for p in files) and any(p.name == "cache.db" for p in files)
    for path in files:
        assert SECRET.encode() not in path.read_bytes(), path


def test_a_token_in_dotenv_works_from_the_library_and_cannot_be_redirected(tmp_path: Path, server: EmbeddingServer,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """hfbatch.embed in a notebook whose working directory has a .env with HF_TOKEN: the token
    is used as by the CLI, and only where the real environment says the router is."""
    from hfbatch import EmbedOptions, TransientBackendError
    import hfbatch

    src = write_csv(tmp_path / "in.csv", rows_for(SAMPLE_TEXTS))
    with CaptureServer() as planted:
        # cwd is tmp_path (conftest): this is the .env the library finds
        (tmp_path / ".env").write_text(f"HF_TOKEN={SECRET}\nHFBATCH_HF_ROUTER={planted.url}\n", encoding="utf-8")
        monkeypatch.setenv("HFBATCH_HF_ROUTER", server.url)  # the router, as the real environment sets it
        result = hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "o.parquet", backend="hf-api"))
        assert server.requests and {r["headers"].get("Authorization") for r in server.requests} == {f"Bearer {SECRET}"}

        monkeypatch.delenv("HFBATCH_HF_ROUTER")  # now only the .env names a router: refused, so the default one
        with pytest.raises(TransientBackendError, match="router.huggingface.co"):  # unreachable from a test
            hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "p.parquet", backend="hf-api", api_retries=1,
                                    use_cache=False))
    assert planted.requests == []  # the token never went where the .env pointed
    assert "HF_TOKEN" not in os.environ  # read in place, not copied into the process environment
    assert SECRET.encode() not in result.sidecar.read_bytes()


def test_a_dotenv_token_echoed_by_a_server_is_not_shown(tmp_path: Path, server: EmbeddingServer,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from hfbatch import EmbedOptions, TerminalBackendError
    import hfbatch

    key = "k3y-only-in-the-dotenv-file"  # no hf_ shape to recognise it by
    (tmp_path / ".env").write_text(f"HFBATCH_API_KEY={key}\n", encoding="utf-8")
    server.script.append(Reply(401, {"error": f"invalid credentials: Bearer {key}"}))
    src = write_csv(tmp_path / "in.csv", rows_for(SAMPLE_TEXTS))
    with pytest.raises(TerminalBackendError) as refused:
        hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "o.parquet", backend="tei", endpoint=server.url))
    assert server.requests[0]["headers"]["Authorization"] == f"Bearer {key}"  # used...
    assert "invalid credentials: Bearer ***" in str(refused.value) and key not in str(refused.value)  # ...not shown


def test_relative_paths_leave_no_absolute_path_in_the_sidecar(tmp_path: Path) -> None:
    from conftest import rows_for, write_csv
    from hfbatch import EmbedOptions
    import hfbatch
    from hfbatch.io.writers import read_metadata

    (tmp_path / "data").mkdir()
    src = write_csv(tmp_path / "data" / "in.csv", rows_for(["one", "two"]))
    out = tmp_path / "results" / "o.parquet"
    out.parent.mkdir()
    result = hfbatch.embed(EmbedOptions(input=src, output=out, cache_dir=tmp_path / "cache", relative_paths=True,
                                     command=["hfbatch", "embed", str(src), "-o", str(out)]))
    text = result.sidecar.read_text()
    assert str(tmp_path) not in text and str(tmp_path) not in json.dumps(read_metadata(out))
    prov = result.document["provenance"]
    assert prov["input"]["path"] == "../data/in.csv" and prov["output"]["path"] == "o.parquet"
    assert prov["command"][2] == "../data/in.csv"
    plain = hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "results" / "p.parquet", cache_dir=tmp_path / "cache"))
    assert plain.document["provenance"]["input"]["path"] == str(src)  # absolute unless asked


def _all_text(tmp_path: Path, printed: list[str]) -> list[tuple[str, bytes]]:
    """Everything a run left behind: what it printed, and every file it wrote."""
    files = [(str(p), p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file() and p.suffix not in (".csv",)]
    return [("printed", text.encode()) for text in printed] + files


def test_hf_token_never_goes_to_a_space(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The issue's report: --backend api --endpoint http://attacker-space.hf.space/ok with HF_TOKEN
    set, watched through HTTP_PROXY at a local capture server."""
    monkeypatch.setenv("HF_TOKEN", SECRET)
    src = write_csv(tmp_path / "in.csv", rows_for(SAMPLE_TEXTS))
    with CaptureServer() as proxy:
        route_through(monkeypatch, proxy)
        result = runner.invoke(app, ["embed", str(src), "-o", str(tmp_path / "o.parquet"), "--backend", "api",
                                     "--endpoint", "http://attacker-space.hf.space/ok", "--no-cache"])
    assert result.exit_code == 0, result.output
    posts = [r for r in proxy.requests if r["method"] == "POST"]
    assert posts and {r["target"] for r in posts} == {"http://attacker-space.hf.space/ok"}
    assert all("Authorization" not in r["headers"] for r in proxy.requests)


def test_url_credentials_never_reach_an_artifact(tmp_path: Path, server: EmbeddingServer,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    src = write_csv(tmp_path / "in.csv", rows_for(SAMPLE_TEXTS))
    endpoint = server.url.replace("http://", "http://user:s3cretpw@")
    args = ["embed", str(src), "-o", str(tmp_path / "o.parquet"), "--backend", "tei", "--endpoint", endpoint, "--json"]
    monkeypatch.setattr(sys, "argv", ["hfbatch", *args])  # the sidecar records the real command line
    ok = runner.invoke(app, args)
    assert ok.exit_code == 0, ok.output
    assert server.requests[0]["headers"]["Authorization"].startswith("Basic ")  # the credentials were used
    prov = json.loads(ok.stdout)["provenance"]
    assert f"http://***@{server.url[7:]}" in prov["command"]
    assert server.url in prov["fingerprint"] and prov["backends"]["tei"]["endpoint"] == server.url + "/embed"
    assert read_metadata(tmp_path / "o.parquet")["provenance"]["fingerprint"] == prov["fingerprint"]
    # other credentials for the same endpoint: the same cache namespace, nothing recomputed
    rotated = runner.invoke(app, ["embed", str(src), "-o", str(tmp_path / "o2.parquet"), "--backend", "tei",
                                  "--endpoint", server.url.replace("http://", "http://user:rotated@"), "--json"])
    assert rotated.exit_code == 0 and json.loads(rotated.stdout)["metrics"]["texts_computed"] == 0
    server.script.append(Reply(404, {"error": "no such route"}))
    bad = runner.invoke(app, ["embed", str(src), "-o", str(tmp_path / "bad.parquet"), "--backend", "tei",
                              "--endpoint", endpoint, "--no-cache", "--debug"])
    assert bad.exit_code == 1 and "Traceback" in bad.stderr and f"{server.url}/embed answered 404" in bad.stderr
    for where, data in _all_text(tmp_path, [ok.output, rotated.output, bad.output]):
        assert b"s3cretpw" not in data, where


def test_an_api_key_echoed_by_the_server_is_scrubbed(tmp_path: Path, server: EmbeddingServer,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    key = "key-MyOwnServer-0123456789"
    monkeypatch.setenv("HFBATCH_API_KEY", key)
    server.script.append(Reply(401, {"error": f"invalid credentials: Bearer {key}"}))  # as some proxies do
    src = write_csv(tmp_path / "in.csv", rows_for(SAMPLE_TEXTS))
    bad = runner.invoke(app, ["embed", str(src), "-o", str(tmp_path / "o.parquet"), "--backend", "tei",
                              "--endpoint", server.url, "--debug"])
    assert server.requests[0]["headers"]["Authorization"] == f"Bearer {key}"  # it was used...
    assert bad.exit_code == 1 and "answered 401 (invalid credentials: Bearer ***)" in bad.stderr
    assert key not in bad.output  # ...and never shown, traceback included


def test_a_dotenv_router_is_refused(tmp_path: Path) -> None:
    """A .env in the working directory (a cloned repository's, say) points HFBATCH_HF_ROUTER at a
    server of its choosing: the real `hfbatch` command refuses it with one warning, and the request
    goes to the real router instead (seen as a CONNECT at a local proxy, which refuses the tunnel)."""
    src = write_csv(tmp_path / "in.csv", rows_for(["one text"]))
    with CaptureServer() as planted, CaptureServer() as proxy:
        (tmp_path / ".env").write_text(f"HFBATCH_HF_ROUTER={planted.url}\nHFBATCH_TEXT_COLUMN=text\n", encoding="utf-8")
        env = {k: v for k, v in os.environ.items() if k.upper() not in ("NO_PROXY", "ALL_PROXY")}
        env.update(HF_TOKEN=SECRET, HTTP_PROXY=proxy.url, HTTPS_PROXY=proxy.url, http_proxy=proxy.url,
                   https_proxy=proxy.url)
        run = subprocess.run([sys.executable, "-m", "hfbatch", "embed", str(src), "-o", str(tmp_path / "o.parquet"),
                              "--backend", "api", "--api-retries", "1", "--no-cache"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    warnings = [line for line in run.stderr.splitlines() if "HFBATCH_HF_ROUTER" in line]
    assert len(warnings) == 1 and "ignored HFBATCH_HF_ROUTER from" in warnings[0], run.stderr
    assert planted.requests == []  # the token (and the texts) never went to the planted router
    assert [r["target"] for r in proxy.requests] == ["router.huggingface.co:443"]  # but to the real one
    assert run.returncode == 1 and SECRET not in run.stdout + run.stderr
