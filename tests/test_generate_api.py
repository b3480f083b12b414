"""hfbatch generate --backend api against a real HTTP server on 127.0.0.1 running the tiny GPT-2:
the HF Inference API text-generation and chat-completion routes, a TGI endpoint, retries,
terminal errors, the cache, and the token rules."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import write_jsonl
from embedding_server import CaptureServer, Reply, route_through
from generation_server import GenerationServer
from hfbatch.backends.generation import GenerationParams
from hfbatch.errors import TerminalBackendError, TransientBackendError
from hfbatch.jobs.generate import GenerateOptions, run_generate

PROMPTS = ["The kettle", "Battery life is", "Arrived broken and", "The kettle", "A very long prompt " * 30]
TOKEN = "hf_generationSECRET123"
MODEL = "acme/tiny-gpt2"  # a hub id: the server does not care, the URL carries it


@pytest.fixture
def server(tiny_lm: Path, monkeypatch: pytest.MonkeyPatch):
    with GenerationServer(tiny_lm) as srv:
        monkeypatch.setenv("HFBATCH_HF_ROUTER", srv.url)  # the HF router, served locally
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        yield srv


def _run(tmp_path: Path, name: str, tiny_lm: Path, **kw):
    src = write_jsonl(tmp_path / "prompts.jsonl", [{"id": i, "prompt": p} for i, p in enumerate(PROMPTS)])
    kw.setdefault("params", GenerationParams(max_new_tokens=8))
    return run_generate(GenerateOptions(input=src, output=tmp_path / name, **kw))


def test_text_generation_route_equals_local_greedy(tmp_path: Path, tiny_lm: Path, server: GenerationServer) -> None:
    local = pq.read_table(_run(tmp_path, "local.parquet", tiny_lm, model=str(tiny_lm)).output)
    result = _run(tmp_path, "api.parquet", tiny_lm, model=MODEL, backend="api", tokenizer=str(tiny_lm), api_concurrency=3)
    api = pq.read_table(result.output)
    assert api.column("id").to_pylist() == list(range(len(PROMPTS)))
    # same model, same greedy decoding: the API answers what the local model answers
    for column in ("generated_text", "n_generated_tokens", "finish_reason", "n_prompt_tokens", "prompt_truncated"):
        assert api.column(column).to_pylist()[:4] == local.column(column).to_pylist()[:4], column
    assert api.column("prompt_truncated").to_pylist()[4] is True
    sent = server.requests
    assert len(sent) == 4  # the repeated prompt is asked once
    assert {r["path"] for r in sent} == {f"/hf-inference/models/{MODEL}"}
    assert sent[0]["body"]["parameters"] == {"max_new_tokens": 8, "do_sample": False, "return_full_text": False,
                                             "details": True}
    assert all(r["authorization"] == f"Bearer {TOKEN}" for r in sent)  # the HF router gets the HF token
    long = next(r["body"]["inputs"] for r in sent if r["body"]["inputs"] not in PROMPTS[:4])
    assert len(long) < len(PROMPTS[4]) and PROMPTS[4].endswith(long)  # cut from the left, end kept
    backend = result.document["provenance"]["backends"]["hf-api"]
    assert backend["route"] == "text-generation" and backend["requests"] == 4
    assert TOKEN not in json.dumps(result.document) and TOKEN not in result.sidecar.read_text()


def test_chat_route_cache_and_seeded_sampling(tmp_path: Path, tiny_lm: Path, server: GenerationServer) -> None:
    chat = GenerationParams(max_new_tokens=6, chat=True)
    local = pq.read_table(_run(tmp_path, "local.parquet", tiny_lm, model=str(tiny_lm), params=chat).output)
    first = _run(tmp_path, "api.parquet", tiny_lm, model=MODEL, backend="api", tokenizer=str(tiny_lm), params=chat)
    api = pq.read_table(first.output)
    assert api.column("generated_text").to_pylist()[:4] == local.column("generated_text").to_pylist()[:4]
    assert {r["path"] for r in server.requests} == {f"/hf-inference/models/{MODEL}/v1/chat/completions"}
    body = next(r["body"] for r in server.requests if r["body"]["messages"][0]["content"] == PROMPTS[0])
    assert body["model"] == MODEL and body["messages"] == [{"role": "user", "content": PROMPTS[0]}]
    assert body["max_tokens"] == 6 and body["temperature"] == 0.0 and "seed" not in body
    asked = len(server.requests)
    again = _run(tmp_path, "again.parquet", tiny_lm, model=MODEL, backend="api", tokenizer=str(tiny_lm), params=chat)
    assert len(server.requests) == asked  # greedy answers came from the cache
    assert again.document["metrics"]["cache"]["hits"] == len(set(PROMPTS))
    assert pq.read_table(again.output).column("generated_text").to_pylist() == api.column("generated_text").to_pylist()
    sampled = GenerationParams(max_new_tokens=6, chat=True, temperature=0.9, seed=7)
    _run(tmp_path, "s.parquet", tiny_lm, model=MODEL, backend="api", tokenizer=str(tiny_lm), params=sampled)
    assert server.requests[-1]["body"]["seed"] == 7 and server.requests[-1]["body"]["temperature"] == 0.9


def test_transient_errors_are_retried_and_counted(tmp_path: Path, tiny_lm: Path, server: GenerationServer) -> None:
    server.script.extend([Reply(503, {"error": "Model is loading", "estimated_time": 0.01}),
                          Reply(429, {"error": "rate limited"}, {"Retry-After": "0"}), Reply(502, b"bad gateway")])
    result = _run(tmp_path, "api.parquet", tiny_lm, model=MODEL, backend="api", tokenizer=str(tiny_lm), api_concurrency=1)
    table = pq.read_table(result.output)
    assert table.num_rows == len(PROMPTS) and None not in table.column("generated_text").to_pylist()
    backend = result.document["provenance"]["backends"]["hf-api"]
    assert backend["retries"] == 3 and backend["retry_causes"] == {"503": 1, "429": 1, "502": 1}
    assert backend["requests"] == 4 + 3


def test_a_server_that_never_recovers_or_refuses_writes_nothing(tmp_path: Path, tiny_lm: Path,
                                                                server: GenerationServer) -> None:
    server.script.extend([Reply(500, {"error": "boom"})] * 10)
    with pytest.raises(TransientBackendError, match=r"answered 500 \(boom\).*gave up after 2 attempts"):
        _run(tmp_path, "a.parquet", tiny_lm, model=MODEL, backend="api", tokenizer=str(tiny_lm), api_retries=2,
             api_concurrency=1)
    assert not (tmp_path / "a.parquet").exists()
    server.script.clear()
    server.script.append(Reply(401, {"error": "Invalid credentials in Authorization header"}))
    with pytest.raises(TerminalBackendError, match="set HF_TOKEN") as refused:
        _run(tmp_path, "b.parquet", tiny_lm, model=MODEL, backend="api", tokenizer=str(tiny_lm), api_concurrency=1)
    assert TOKEN not in str(refused.value) and not (tmp_path / "b.parquet").exists()
    server.script.append(Reply(200, {"choices": []}))
    with pytest.raises(Exception, match="without generated_text"):
        _run(tmp_path, "c.parquet", tiny_lm, model=MODEL, backend="api", tokenizer=str(tiny_lm), api_concurrency=1)
    assert not (tmp_path / "c.parquet").exists()


def test_tgi_endpoint_without_details_and_no_token_to_third_parties(tmp_path: Path, tiny_lm: Path,
                                                                     server: GenerationServer,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    server.details = False  # a server that ignores details=true: counts come from the tokenizer
    monkeypatch.delenv("HFBATCH_HF_ROUTER")  # the server plays a TGI box here, not the router (which gets the token)
    local = pq.read_table(_run(tmp_path, "local.parquet", tiny_lm, model=str(tiny_lm)).output)
    api = pq.read_table(_run(tmp_path, "tgi.parquet", tiny_lm, model=MODEL, backend="api", endpoint=server.url,
                             tokenizer=str(tiny_lm)).output)
    for column in ("generated_text", "finish_reason"):
        assert api.column(column).to_pylist()[:4] == local.column(column).to_pylist()[:4], column
    assert all(r["path"] == "/" and r["authorization"] is None for r in server.requests)  # not an HF host
    monkeypatch.setenv("HFBATCH_API_KEY", "endpoint-key")
    _run(tmp_path, "tgi2.parquet", tiny_lm, model=MODEL, backend="api", endpoint=server.url, tokenizer=str(tiny_lm),
         params=GenerationParams(max_new_tokens=5))
    assert server.requests[-1]["authorization"] == "Bearer endpoint-key"


def test_no_token_to_a_space_and_no_url_credentials_in_artifacts(tmp_path: Path, tiny_lm: Path,
                                                                  server: GenerationServer,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint = server.url.replace("http://", "http://user:s3cretpw@")
    first = _run(tmp_path, "a.parquet", tiny_lm, model=MODEL, backend="api", endpoint=endpoint, tokenizer=str(tiny_lm))
    assert {r["authorization"] for r in server.requests} == {"Basic dXNlcjpzM2NyZXRwdw=="}  # user:s3cretpw, not the token
    assert first.document["provenance"]["backends"]["hf-api"]["endpoint"] == server.url
    asked = len(server.requests)
    rotated = _run(tmp_path, "b.parquet", tiny_lm, model=MODEL, backend="api", tokenizer=str(tiny_lm),
                   endpoint=server.url.replace("http://", "http://user:rotated@"))
    assert len(server.requests) == asked and rotated.document["metrics"]["cache"]["hits"] == len(set(PROMPTS))
    assert b"s3cretpw" not in first.sidecar.read_bytes() + first.output.read_bytes()
    with CaptureServer() as proxy:  # what would leave for a Space, seen through HTTP_PROXY
        proxy.reply = Reply(200, {"generated_text": "ok"})
        route_through(monkeypatch, proxy)
        _run(tmp_path, "c.parquet", tiny_lm, model=MODEL, backend="api", endpoint="http://attacker-space.hf.space/",
             tokenizer=str(tiny_lm), params=GenerationParams(max_new_tokens=3))
    assert proxy.requests and {r["target"] for r in proxy.requests} == {"http://attacker-space.hf.space/"}
    assert all("Authorization" not in r["headers"] for r in proxy.requests)


def test_cli_generate_backend_api(tmp_path: Path, tiny_lm: Path, server: GenerationServer) -> None:
    from typer.testing import CliRunner

    from hfbatch.cli import app

    src = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "The kettle"}, {"prompt": "Battery"}])
    result = CliRunner().invoke(app, ["generate", str(src), "-o", str(tmp_path / "o.parquet"), "--backend", "api",
                                      "--model", MODEL, "--tokenizer", str(tiny_lm), "--max-new-tokens", "4", "--chat",
                                      "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["metrics"]["rows_generated"] == 2 and doc["provenance"]["backends"]["hf-api"]["route"] == "chat-completion"
    missing = CliRunner().invoke(app, ["generate", str(src), "-o", str(tmp_path / "x.parquet"), "--backend", "api",
                                       "--model", "nobody/nothing"])
    assert missing.exit_code in (1, 2) and "pass --tokenizer" in missing.stderr and "Traceback" not in missing.output
