"""The token never appears in any artifact: stdout, stderr (--debug too), output, sidecar, cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import SAMPLE_TEXTS, rows_for, write_csv
from embedding_server import EmbeddingServer, Reply
from hfbatch.cli import app

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


def test_relative_paths_leave_no_absolute_path_in_the_sidecar(tmp_path: Path) -> None:
    from conftest import rows_for, write_csv
    from hfbatch import EmbedOptions, embed_file
    from hfbatch.io.writers import read_metadata

    (tmp_path / "data").mkdir()
    src = write_csv(tmp_path / "data" / "in.csv", rows_for(["one", "two"]))
    out = tmp_path / "results" / "o.parquet"
    out.parent.mkdir()
    result = embed_file(EmbedOptions(input=src, output=out, cache_dir=tmp_path / "cache", relative_paths=True,
                                     command=["hfbatch", "embed", str(src), "-o", str(out)]))
    text = result.sidecar.read_text()
    assert str(tmp_path) not in text and str(tmp_path) not in json.dumps(read_metadata(out))
    prov = result.document["provenance"]
    assert prov["input"]["path"] == "../data/in.csv" and prov["output"]["path"] == "o.parquet"
    assert prov["command"][2] == "../data/in.csv"
    plain = embed_file(EmbedOptions(input=src, output=tmp_path / "results" / "p.parquet", cache_dir=tmp_path / "cache"))
    assert plain.document["provenance"]["input"]["path"] == str(src)  # absolute unless asked
