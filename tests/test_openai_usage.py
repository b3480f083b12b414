"""The OpenAI-compatible backend on a served model name (no hub id, no directory here) and no
--tokenizer: token counts come from the server's `usage` (per request), truncation is the server's,
and the sidecar says so. Against a real HTTP server on 127.0.0.1 running the real model."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from conftest import BUNDLED_MODEL_DIR, SAMPLE_TEXTS, rows_for, write_csv
from embedding_server import EmbeddingServer
from hfbatch import EmbedOptions, embed, plan
from hfbatch.backends import make_backend
from hfbatch.backends.remote import RemoteBackend, RetryPolicy
from hfbatch.cache import open_cache
from hfbatch.cli import app
from hfbatch.errors import InputError, ModelLoadError
from hfbatch.vectors import cosine_rows

SERVED = "minilm-served"  # what `vllm serve ... --served-model-name minilm-served` answers to
FAST = RetryPolicy(attempts=3, base_wait_seconds=0.01, max_wait_seconds=1)
LONG = "the kettle boils fast and the handle stays cool " * 60  # ~600 tokens: more than the model reads (256)
TEXTS = SAMPLE_TEXTS + [LONG, "", SAMPLE_TEXTS[0]]  # a blank row (invalid) and a duplicate


@pytest.fixture
def server(st_model):
    with EmbeddingServer(st_model) as srv:
        yield srv


def _job(src: Path, out: Path, server: EmbeddingServer, **kw):  # type: ignore[no-untyped-def]
    return embed(EmbedOptions(input=src, output=out, backend="openai", endpoint=server.url + "/v1",
                              model=kw.pop("model", SERVED), **kw))


def _sent(server: EmbeddingServer) -> list[str]:
    return [t for r in server.requests for t in r["body"]["input"]]


def test_a_served_name_runs_on_the_servers_usage(tmp_path: Path, server: EmbeddingServer, st_model) -> None:
    src = write_csv(tmp_path / "in.csv", rows_for(TEXTS))
    result = _job(src, tmp_path / "out.parquet", server, api_batch_size=3)

    table = pq.read_table(result.output)
    assert table.num_rows == len(TEXTS)
    vectors = table.column("embedding").to_pylist()
    valid = [i for i, t in enumerate(TEXTS) if t.strip()]
    assert [v is None for v in vectors] == [not t.strip() for t in TEXTS]
    want = st_model.encode([TEXTS[i] for i in valid], normalize_embeddings=True)
    assert (cosine_rows(np.asarray([vectors[i] for i in valid], dtype=np.float64), want.astype(np.float64)) >= 0.9999).all()
    # the served name went to the server, and every text went whole: truncation is the server's
    assert {r["body"]["model"] for r in server.requests} == {SERVED}
    assert sorted(_sent(server)) == sorted(set(TEXTS) - {""}) and LONG in _sent(server)
    # no row is given a count the server did not give it; none is flagged on a guess: both are null,
    # in columns of the usual types
    assert table.column("n_tokens").to_pylist() == [None] * len(TEXTS)
    assert table.column("truncated").to_pylist() == [None] * len(TEXTS)
    assert table.schema.field("n_tokens").type == "int32" and table.schema.field("truncated").type == "bool"

    doc = json.loads(result.sidecar.read_text())
    block = doc["provenance"]["backends"]["openai"]
    assert block["token_counts"] == "server usage" and block["truncation"] == "server"
    assert block["tokenizer"] is None and block["max_length"] is None and SERVED in block["tokenizer_missing"]
    assert "not per text" in block["token_counts_note"] and "--tokenizer" in block["token_counts_note"]
    # the total is exactly what the server reported, request by request (concurrent, in batches of 3)
    reported = sum(r["usage"]["prompt_tokens"] for r in server.requests)
    assert reported == sum(server.tokens_read(t) for t in set(TEXTS) - {""}) > 256
    assert block["usage"] == {"prompt_tokens": reported, "total_tokens": reported, "requests": len(server.requests),
                              "requests_without_usage": 0}
    assert len(server.requests) == 3  # 8 distinct texts, 3 a request
    assert doc["metrics"]["api"]["requests"] == 3
    # the job's own numbers are the server's: the tokens it computed, no limit known, none known cut
    assert doc["metrics"]["tokens_computed"] == reported and doc["metrics"]["rows_truncated"] == 0
    assert doc["provenance"]["max_length"] is None


def test_with_a_tokenizer_nothing_changes_and_the_counts_agree_with_the_server(tmp_path: Path,
                                                                              server: EmbeddingServer) -> None:
    src = write_csv(tmp_path / "in.csv", rows_for(TEXTS))
    counted = _job(src, tmp_path / "tok.parquet", server, tokenizer=str(BUNDLED_MODEL_DIR))
    local = embed(EmbedOptions(input=src, output=tmp_path / "local.parquet"))

    a, b = pq.read_table(counted.output), pq.read_table(local.output)
    for name in ("n_tokens", "truncated"):  # per row, as the local model counts them
        assert a.column(name).to_pylist() == b.column(name).to_pylist()
    assert a.column("truncated").to_pylist()[TEXTS.index(LONG)] is True
    block = counted.document["provenance"]["backends"]["openai"]
    assert block["token_counts"] == "tokenizer" and block["tokenizer"] == str(BUNDLED_MODEL_DIR)
    assert "token_counts_note" not in block and counted.document["provenance"]["max_length"] == 256
    # the server's total for the texts it computed is the tokens the model read of them, as counted here
    computed = {t: n for t, n in zip(TEXTS, a.column("n_tokens").to_pylist()) if t.strip()}
    assert block["usage"]["prompt_tokens"] == sum(computed.values())


def test_a_tokenizer_that_cannot_be_found_is_still_an_error(tmp_path: Path, server: EmbeddingServer) -> None:
    src = write_csv(tmp_path / "in.csv", rows_for(SAMPLE_TEXTS))
    with pytest.raises(ModelLoadError, match="token counts need the tokenizer of no-such-tokenizer.*--tokenizer"):
        _job(src, tmp_path / "out.parquet", server, tokenizer="no-such-tokenizer")
    assert not (tmp_path / "out.parquet").exists()


def test_tei_on_a_served_name_names_the_openai_route(server: EmbeddingServer) -> None:
    backend = RemoteBackend("tei", model=SERVED, endpoint=server.url, retry=FAST)
    with pytest.raises(ModelLoadError, match=f"--tokenizer.*--backend openai --endpoint {server.url}/v1"):
        backend.token_counts(["a"])


@pytest.mark.parametrize("served", ["/models/bge-small", "org/minilm-served", "nomic-embed-text:latest"])
def test_any_served_name_form_is_counted_by_the_server(served: str, server: EmbeddingServer) -> None:
    """vLLM serves under the path it was started with; ollama-style tags are no hub ids either."""
    backend = RemoteBackend("openai", model=served, endpoint=server.url + "/v1", retry=FAST)
    assert backend.token_source == "server usage" and backend.token_counts(["a", "b"]) == [0, 0]
    assert backend.fingerprint().startswith(f"openai:{served}:")  # the namespace is the configuration, as before
    backend.embed(["a", "b c"])
    assert backend.usage["prompt_tokens"] == server.tokens_read("a") + server.tokens_read("b c")


def test_split_without_a_tokenizer_is_refused_before_any_request(tmp_path: Path, server: EmbeddingServer) -> None:
    src = write_csv(tmp_path / "in.csv", rows_for([LONG, "short"]))
    with pytest.raises(InputError, match="--split cuts texts with the model's tokenizer.*pass --tokenizer") as info:
        _job(src, tmp_path / "out.parquet", server, split="tokens:64")
    assert "\n" not in str(info.value) and server.requests == []
    assert not (tmp_path / "out.parquet").exists()
    with pytest.raises(InputError, match="--split .*--tokenizer"):
        plan(EmbedOptions(input=src, output=tmp_path / "o.parquet", backend="openai", endpoint=server.url + "/v1",
                          model=SERVED, split="tokens:64"))
    assert server.requests == []


def test_prompt_name_without_a_tokenizer_is_refused_and_a_prompt_text_is_counted(tmp_path: Path,
                                                                                server: EmbeddingServer) -> None:
    src = write_csv(tmp_path / "in.csv", rows_for(SAMPLE_TEXTS))
    with pytest.raises(InputError, match="--prompt-name query .*pass the prompt itself as --prompt TEXT"):
        _job(src, tmp_path / "named.parquet", server, prompt_name="query")
    assert server.requests == []

    result = _job(src, tmp_path / "text.parquet", server, prompt="query: ")
    assert sorted(_sent(server)) == sorted("query: " + t for t in set(SAMPLE_TEXTS))
    usage = result.document["provenance"]["backends"]["openai"]["usage"]
    assert usage["prompt_tokens"] == sum(server.tokens_read("query: " + t) for t in set(SAMPLE_TEXTS))  # prompt counted
    assert usage["prompt_tokens"] > sum(server.tokens_read(t) for t in set(SAMPLE_TEXTS))


def test_max_batch_tokens_without_a_tokenizer_is_refused_before_any_request(tmp_path: Path,
                                                                          server: EmbeddingServer) -> None:
    """A budget of tokens per batch needs each text's count before it is sent: only a tokenizer has it."""
    texts = [f"review {i}: the lid held after {i} weeks" for i in range(20)]
    src = write_csv(tmp_path / "in.csv", rows_for(texts))
    with pytest.raises(InputError, match="--max-batch-tokens 64 .*no tokenizer for minilm-served.*--tokenizer") as info:
        _job(src, tmp_path / "out.parquet", server, max_batch_tokens=64, api_batch_size=4)
    assert "\n" not in str(info.value) and server.requests == [] and not (tmp_path / "out.parquet").exists()

    run = CliRunner().invoke(app, ["embed", str(src), "-o", str(tmp_path / "cli.parquet"), "--backend", "openai",
                                   "--endpoint", server.url + "/v1", "--model", SERVED, "--max-batch-tokens", "64"])
    assert run.exit_code == 2 and "--tokenizer" in run.output, run.output
    assert server.requests == [] and not (tmp_path / "cli.parquet").exists()

    # with a tokenizer the budget holds as for any backend
    result = _job(src, tmp_path / "tok.parquet", server, max_batch_tokens=64, api_batch_size=4,
                  tokenizer=str(BUNDLED_MODEL_DIR))
    assert pq.read_table(result.output).num_rows == 20 and sorted(_sent(server)) == sorted(texts)
    assert max(len(r["body"]["input"]) for r in server.requests) <= 4


def test_dry_run_without_a_tokenizer_plans_and_sends_only_its_sample(tmp_path: Path, server: EmbeddingServer) -> None:
    src = write_csv(tmp_path / "in.csv", rows_for(TEXTS))
    report = plan(EmbedOptions(input=src, output=tmp_path / "out.parquet", backend="openai",
                               endpoint=server.url + "/v1", model=SERVED))
    assert report["rows"] == len(TEXTS) and report["rows_invalid"] == 1
    assert report["cache"]["texts_to_compute"] == len(set(TEXTS) - {""}) and report["requests"] == 1
    # not guessed: the server counts once it has embedded, and truncation is its own
    assert report["tokens_to_compute"] is None and report["texts_truncated"] is None
    assert report["token_counts"] == "server usage" and "--tokenizer" in report["token_counts_note"]
    assert "server counts tokens per request" in report["token_counts_note"]
    assert "ms per text" in report["eta_basis"] and report["eta_seconds"] >= 0
    assert len(server.requests) <= 2 and not (tmp_path / "out.parquet").exists()  # the timed sample only


def test_dry_run_with_a_tokenizer_counts_tokens_and_truncation(tmp_path: Path, server: EmbeddingServer) -> None:
    src = write_csv(tmp_path / "in.csv", rows_for(TEXTS))
    report = plan(EmbedOptions(input=src, output=tmp_path / "out.parquet", backend="openai",
                               endpoint=server.url + "/v1", model=SERVED, tokenizer=str(BUNDLED_MODEL_DIR)))
    assert report["token_counts"] == "tokenizer" and "token_counts_note" not in report
    assert report["texts_truncated"] == 1 and report["tokens_to_compute"] > 256  # LONG, counted to 256
    assert "ms per token" in report["eta_basis"]


def test_the_cli_dry_run_json_reports_the_unknown_counts_as_null(tmp_path: Path, server: EmbeddingServer) -> None:
    src = write_csv(tmp_path / "in.csv", rows_for(SAMPLE_TEXTS))
    run = CliRunner().invoke(app, ["embed", str(src), "-o", str(tmp_path / "out.parquet"), "--backend", "openai",
                                   "--endpoint", server.url + "/v1", "--model", SERVED, "--dry-run", "--json"])
    assert run.exit_code == 0, run.output
    report = json.loads(run.stdout[run.stdout.index("{"):])
    assert report["tokens_to_compute"] is None and report["texts_truncated"] is None
    assert report["token_counts"] == "server usage"
    shown = CliRunner().invoke(app, ["embed", str(src), "-o", str(tmp_path / "out.parquet"), "--backend", "openai",
                                     "--endpoint", server.url + "/v1", "--model", SERVED, "--dry-run"])
    assert shown.exit_code == 0, shown.output  # the table says what is not known instead of failing on it
    assert "tokens not known (the server counts them)" in shown.stdout and "truncation is the server's" in shown.stdout


def test_a_server_without_usage_still_runs_and_says_it_reported_none(tmp_path: Path, server: EmbeddingServer) -> None:
    src = write_csv(tmp_path / "in.csv", rows_for(SAMPLE_TEXTS))
    server.openai_usage = None  # some OpenAI-compatible servers leave it out
    result = _job(src, tmp_path / "none.parquet", server, api_batch_size=4)
    usage = result.document["provenance"]["backends"]["openai"]["usage"]
    assert usage == {"prompt_tokens": None, "total_tokens": None, "requests": 2, "requests_without_usage": 2}


@pytest.mark.parametrize("reported", [{"prompt_tokens": "12", "total_tokens": 12}, {"prompt_tokens": True},
                                      {"prompt_tokens": -3, "total_tokens": -3}, [12], "12"])
def test_malformed_usage_counts_as_none_and_never_as_tokens(reported, server: EmbeddingServer) -> None:
    server.openai_usage = reported
    backend = RemoteBackend("openai", model=SERVED, endpoint=server.url + "/v1", retry=FAST)
    assert backend.embed(["a", "b"]).shape == (2, 384)  # the vectors are checked on their own
    assert backend.usage == {"prompt_tokens": 0, "total_tokens": 0, "requests": 1, "requests_without_usage": 1}
    assert backend.describe()["usage"]["prompt_tokens"] is None


def test_a_cached_rerun_on_a_served_name_asks_the_server_nothing(tmp_path: Path, server: EmbeddingServer) -> None:
    src = write_csv(tmp_path / "in.csv", rows_for(TEXTS))
    first = _job(src, tmp_path / "a.parquet", server)
    server.requests.clear()
    again = _job(src, tmp_path / "b.parquet", server)
    assert server.requests == [] and again.metrics["texts_computed"] == 0 and again.metrics["tokens_computed"] == 0
    assert again.document["provenance"]["fingerprint"] == first.document["provenance"]["fingerprint"]
    a, b = (pq.read_table(r.output).column("embedding").to_pylist() for r in (first, again))
    assert a == b


def test_the_cli_runs_on_a_served_name_and_warns_once(tmp_path: Path, server: EmbeddingServer,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    src = write_csv(tmp_path / "in.csv", rows_for(SAMPLE_TEXTS))
    out = tmp_path / "out.parquet"
    with caplog.at_level(logging.WARNING, logger="hfbatch.backends.remote"):
        run = CliRunner().invoke(app, ["embed", str(src), "-o", str(out), "--backend", "openai", "--endpoint",
                                       server.url + "/v1", "--model", SERVED])
    assert run.exit_code == 0, run.output
    warned = [r.getMessage() for r in caplog.records if "no tokenizer for" in r.getMessage()]
    assert len(warned) == 1 and "server's usage" in warned[0] and "--tokenizer" in warned[0]
    prov = json.loads(Path(str(out) + ".meta.json").read_text())["provenance"]
    assert prov["model_id"] == SERVED and prov["backends"]["openai"]["token_counts"] == "server usage"
    assert prov["backends"]["openai"]["usage"]["prompt_tokens"] == sum(server.tokens_read(t) for t in set(SAMPLE_TEXTS))


def test_the_cache_keeps_no_count_for_texts_the_server_counted(tmp_path: Path, server: EmbeddingServer) -> None:
    """A served-name run stores its vectors with the count the cache ignores (not 0), so a later
    run with --tokenizer (the same fingerprint: the tokenizer is no part of it) reads the vectors
    and counts the texts itself."""
    src = write_csv(tmp_path / "in.csv", rows_for(TEXTS))
    first = _job(src, tmp_path / "a.parquet", server)
    fingerprint = first.document["provenance"]["fingerprint"]
    cache = open_cache(tmp_path / "cache", fingerprint, size_limit_bytes=0)  # the autouse fixture's cache dir
    try:
        distinct = sorted(set(TEXTS) - {""})
        assert len(cache.lookup(distinct, 384)) == len(distinct)  # the vectors are there
        assert cache.lookup_tokens(distinct) == {}  # no count is
    finally:
        cache.close()

    server.requests.clear()
    counted = _job(src, tmp_path / "b.parquet", server, tokenizer=str(BUNDLED_MODEL_DIR))
    local = embed(EmbedOptions(input=src, output=tmp_path / "local.parquet"))
    assert server.requests == [] and counted.document["provenance"]["fingerprint"] == fingerprint
    a, b = pq.read_table(counted.output), pq.read_table(local.output)
    assert a.column("n_tokens").to_pylist() == b.column("n_tokens").to_pylist()  # never 0 from the cache
    assert a.column("truncated").to_pylist()[TEXTS.index(LONG)] is True
    assert counted.document["provenance"]["max_length"] == 256


def test_a_served_name_run_on_counts_a_tokenizer_cached_still_writes_null(tmp_path: Path,
                                                                          server: EmbeddingServer) -> None:
    """The output does not depend on what the cache holds: a tokenizer's count from an earlier run
    says nothing of where the server cuts, so the served-name run's rows are null all the same."""
    src = write_csv(tmp_path / "in.csv", rows_for(TEXTS))
    _job(src, tmp_path / "tok.parquet", server, tokenizer=str(BUNDLED_MODEL_DIR))
    server.requests.clear()
    again = _job(src, tmp_path / "served.parquet", server)
    table = pq.read_table(again.output)
    assert server.requests == [] and again.metrics["texts_computed"] == 0
    assert table.column("n_tokens").null_count == table.column("truncated").null_count == len(TEXTS)
    assert again.document["provenance"]["max_length"] is None


def test_auto_falling_back_to_a_served_name_counts_by_the_server(tmp_path: Path, server: EmbeddingServer) -> None:
    """--backend auto whose local model cannot be found hands over to the remote: its token source
    is the side's that makes the vectors."""
    opts = EmbedOptions(input=tmp_path / "in.csv", output=tmp_path / "out.parquet", backend="auto", fallback="openai",
                        endpoint=server.url + "/v1", model=SERVED)
    backend = make_backend(opts)
    assert backend.token_source == "server usage" and backend.usage["prompt_tokens"] == 0
    backend.embed(["a", "b c"])
    assert backend.usage["prompt_tokens"] == server.tokens_read("a") + server.tokens_read("b c")
    assert make_backend(EmbedOptions(input=tmp_path / "in.csv", output=tmp_path / "o.parquet", backend="auto",
                                     fallback="openai", endpoint=server.url + "/v1",
                                     model=str(BUNDLED_MODEL_DIR))).token_source == "tokenizer"

    write_csv(tmp_path / "in.csv", rows_for(SAMPLE_TEXTS))
    server.requests.clear()
    result = embed(opts)
    table = pq.read_table(result.output)
    assert table.column("n_tokens").null_count == len(SAMPLE_TEXTS) and result.document["provenance"]["max_length"] is None
    assert result.metrics["tokens_computed"] == sum(r["usage"]["prompt_tokens"] for r in server.requests) > 0
