"""capabilities, test-connection and models: the commands that show what a setup can do."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
from typer.testing import CliRunner

from conftest import SAMPLE_TEXTS, rows_for, write_csv
from embedding_server import EmbeddingServer
from hfbatch.cli import app

runner = CliRunner()


@pytest.fixture
def server(st_model):
    with EmbeddingServer(st_model) as srv:
        yield srv


def test_capabilities_json(tmp_path: Path) -> None:
    src = write_csv(tmp_path / "in.csv", rows_for(SAMPLE_TEXTS))
    assert runner.invoke(app, ["embed", str(src), "-o", str(tmp_path / "o.parquet"), "-q"]).exit_code == 0
    result = runner.invoke(app, ["capabilities", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["backends"]["local"]["usable"] is True
    assert info["backends"]["tei"]["usable"] is False and "--endpoint" in info["backends"]["tei"]["why"]
    assert info["devices"][0]["device"] == "cpu" and info["devices"][0]["available"] is True
    assert info["libraries"]["torch"]["version"]
    missing = [lib for lib in info["libraries"].values() if not lib["version"]]
    assert all(lib["install"].startswith("pip install") for lib in missing)
    # a vector and a token count per text, and the dimension record of the model's fingerprint
    assert info["cache"]["entries"] == 2 * len(set(SAMPLE_TEXTS)) + 1
    assert info["memory"]["available_gb"] > 0 and info["token"] == "not set"


def test_capabilities_table_mentions_each_backend() -> None:
    result = runner.invoke(app, ["capabilities"])
    assert result.exit_code == 0
    for name in ("local", "hf-api", "tei", "openai", "cpu", "cache:"):
        assert name in result.stdout


def test_connection_local_and_tei(server: EmbeddingServer) -> None:
    result = runner.invoke(app, ["test-connection", "--backend", "local", "--json"])
    assert result.exit_code == 0, result.output
    (local,) = json.loads(result.stdout)
    assert local["status"] == "ok" and local["dim"] == 384 and local["latency_ms"] > 0
    result = runner.invoke(app, ["test-connection", "--backend", "tei", "--endpoint", server.url, "--json"])
    (tei,) = json.loads(result.stdout)
    assert result.exit_code == 0 and tei["status"] == "ok" and tei["dim"] == 384
    assert server.requests[-1]["path"] == "/embed"


def test_connection_rows_never_show_url_credentials(server: EmbeddingServer, monkeypatch: pytest.MonkeyPatch) -> None:
    with_password = server.url.replace("http://", "http://user:s3cretpw@")
    monkeypatch.setenv("HFBATCH_ENDPOINT", with_password)
    shown = runner.invoke(app, ["capabilities", "--json"])
    assert shown.exit_code == 0 and "s3cretpw" not in shown.stdout
    result = runner.invoke(app, ["test-connection", "--backend", "tei", "--json"])
    (tei,) = json.loads(result.stdout)
    assert result.exit_code == 0 and tei["status"] == "ok" and tei["endpoint"] == server.url
    failed = runner.invoke(app, ["test-connection", "--backend", "tei", "--endpoint", "http://user:s3cretpw@127.0.0.1:9",
                                 "--json"])
    assert failed.exit_code == 1 and "127.0.0.1:9" in failed.stdout
    assert "s3cretpw" not in failed.output


def test_connection_failure_exits_1_with_the_reason() -> None:
    result = runner.invoke(app, ["test-connection", "--backend", "tei", "--endpoint", "http://127.0.0.1:9", "--json"])
    assert result.exit_code == 1
    (row,) = json.loads(result.stdout)
    assert row["status"] == "error" and "cannot connect to http://127.0.0.1:9/embed" in row["error"]


def test_models_lists_from_the_hub_api(server: EmbeddingServer, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    server.hub_models = [
        {"id": "sentence-transformers/all-MiniLM-L6-v2", "_id": "1", "pipeline_tag": "feature-extraction",
         "downloads": 1234567, "likes": 42, "library_name": "sentence-transformers", "tags": []},
        {"id": "acme/mini-embed", "_id": "2", "pipeline_tag": "feature-extraction", "downloads": 10, "likes": 0, "tags": []},
    ]
    result = runner.invoke(app, ["models", "--search", "minilm", "--limit", "2", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["id"] for r in rows] == ["sentence-transformers/all-MiniLM-L6-v2", "acme/mini-embed"]
    assert rows[0]["downloads"] == 1234567
    query = parse_qs(urlparse(server.gets[-1]).query)
    assert query["search"] == ["minilm"] and query["pipeline_tag"] == ["feature-extraction"] and query["limit"] == ["2"]
    table = runner.invoke(app, ["models", "--search", "minilm"])
    assert "1,234,567" in table.stdout
    served = runner.invoke(app, ["models", "--served", "--json"])
    assert served.exit_code == 0
    assert parse_qs(urlparse(server.gets[-1]).query)["inference_provider"] == ["hf-inference"]


def test_models_offline_is_one_clear_line() -> None:
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 1
    assert "cannot list models: HF_HUB_OFFLINE is set" in result.stderr and "Traceback" not in result.output


def test_capabilities_names_the_cpu_and_whether_bf16_is_native() -> None:
    from hfbatch.resources import SPEED_FLAGS, cpu_has_native_bf16
    from hfbatch.tools.doctor import capabilities

    cpu = capabilities()["devices"][0]["cpu"]
    assert cpu["native_bf16"] is cpu_has_native_bf16() and cpu["cores"] >= 1
    assert set(cpu["flags"]) <= set(SPEED_FLAGS)
    flags = open("/proc/cpuinfo", encoding="utf-8").read().split("flags", 1)[1].split("\n", 1)[0].split()
    assert cpu["flags"] == [f for f in SPEED_FLAGS if f in flags]  # read from the machine, in a fixed order
