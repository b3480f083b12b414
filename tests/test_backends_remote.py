"""Remote backends against a real HTTP server on 127.0.0.1 that runs the real model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import BUNDLED_MODEL_DIR, SAMPLE_TEXTS, rows_for, write_csv
from embedding_server import CaptureServer, EmbeddingServer, Reply, route_through
from hfbatch import EmbedOptions, embed
import hfbatch
from hfbatch.backends.http import hf_token_allowed
from hfbatch.backends.remote import RemoteBackend, RetryPolicy
from hfbatch.errors import BackendError, InputError, RemoteError, TerminalBackendError, TransientBackendError
from hfbatch.vectors import cosine_rows

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
FAST = RetryPolicy(attempts=4, base_wait_seconds=0.01, max_wait_seconds=2)


@pytest.fixture
def server(st_model):
    with EmbeddingServer(st_model) as srv:
        yield srv


def _backend(kind: str, server: EmbeddingServer, **kw) -> RemoteBackend:
    endpoint = {"tei": server.url, "openai": server.url + "/v1", "hf-api": None}[kind]
    return RemoteBackend(kind, model=MODEL, endpoint=endpoint, retry=kw.pop("retry", FAST), **kw)


@pytest.fixture
def router(server, monkeypatch: pytest.MonkeyPatch) -> EmbeddingServer:
    monkeypatch.setenv("HFBATCH_HF_ROUTER", server.url)  # the HF router route, served locally
    return server


@pytest.mark.parametrize("kind", ["tei", "hf-api", "openai"])
def test_each_protocol_equals_the_local_model(kind: str, router: EmbeddingServer, st_model) -> None:
    backend = _backend(kind, router, api_batch_size=3)
    vectors = backend.embed(SAMPLE_TEXTS)
    want = st_model.encode(SAMPLE_TEXTS, normalize_embeddings=True)
    assert vectors.shape == (len(SAMPLE_TEXTS), 384) and vectors.dtype == np.float32
    assert np.allclose(vectors, want, atol=1e-5)  # in order, even when the server shuffles (openai)
    assert len(router.requests) == 3  # 8 texts in batches of 3
    bodies = [r["body"] for r in router.requests]  # requests run concurrently: any order
    if kind == "openai":
        assert {r["path"] for r in router.requests} == {"/v1/embeddings"}
        assert {"input": SAMPLE_TEXTS[:3], "model": MODEL, "encoding_format": "float"} in bodies
    else:
        expected_path = "/embed" if kind == "tei" else f"/hf-inference/models/{MODEL}/pipeline/feature-extraction"
        assert {r["path"] for r in router.requests} == {expected_path}
        # parameters at the top level, beside "inputs"
        assert {"inputs": SAMPLE_TEXTS[:3], "normalize": True, "truncate": True, "truncation_direction": "Right"} in bodies


def test_bearer_token_from_environment(router: EmbeddingServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HUGGINGFACE_TOKEN", "hf_fromtheoldname123")
    _backend("hf-api", router).embed(["a"])
    assert router.requests[0]["headers"]["Authorization"] == "Bearer hf_fromtheoldname123"
    monkeypatch.setenv("HF_TOKEN", "hf_fromthehubname456")  # the hub's own name wins
    _backend("hf-api", router).embed(["a"])
    assert router.requests[1]["headers"]["Authorization"] == "Bearer hf_fromthehubname456"


def test_hf_token_is_not_sent_to_other_servers(server: EmbeddingServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_neverleavesforthirdparties")
    _backend("tei", server).embed(["a"])
    _backend("openai", server).embed(["a"])
    assert all("Authorization" not in r["headers"] for r in server.requests)
    monkeypatch.setenv("HFBATCH_API_KEY", "key-for-my-own-server")  # that server's own key
    _backend("tei", server).embed(["a"])
    assert server.requests[-1]["headers"]["Authorization"] == "Bearer key-for-my-own-server"


@pytest.mark.parametrize("url, allowed", [
    ("https://router.huggingface.co/hf-inference/models/m/pipeline/feature-extraction", True),
    ("https://huggingface.co/api/models", True),
    ("https://HuggingFace.co./api", True),  # the same host, spelled otherwise
    ("https://x1y2.us-east-1.aws.endpoints.huggingface.cloud/", True),
    ("http://x1y2.us-east-1.aws.endpoints.huggingface.cloud/", False),  # plain http: anyone on the path reads it
    ("http://huggingface.co/api", False),
    ("https://attacker-space.hf.space/ok", False),  # Spaces run their owners' code
    ("http://attacker-space.hf.space/ok", False),
    ("https://huggingface.co.evil.net/", False),
    ("https://evilhuggingface.co/", False),
    ("https://huggingface.cloud.evil.net/", False),
    ("https://evil.net/huggingface.co/", False),
    ("https://huggingface.co@evil.net/", False),  # userinfo, not host
    ("https://evil.net\\@huggingface.co/", False),  # Python's urlparse says huggingface.co; requests connects to evil.net
    ("http://127.0.0.1:8123/x", False),  # this machine, but not the configured router
])
def test_hf_token_goes_only_to_hf_hosts_over_https(url: str, allowed: bool) -> None:
    assert hf_token_allowed(url) is allowed


def test_hf_token_goes_to_the_configured_router_only_over_https_or_locally(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HFBATCH_HF_ROUTER", "http://127.0.0.1:8123")  # a test server on this machine
    assert hf_token_allowed("http://127.0.0.1:8123/hf-inference/models/m")
    assert not hf_token_allowed("http://127.0.0.1:8124/hf-inference/models/m")  # another server
    monkeypatch.setenv("HFBATCH_HF_ROUTER", "https://hf-proxy.corp.example")
    assert hf_token_allowed("https://hf-proxy.corp.example/hf-inference/models/m")
    assert not hf_token_allowed("http://hf-proxy.corp.example/hf-inference/models/m")
    monkeypatch.setenv("HFBATCH_HF_ROUTER", "http://hf-proxy.corp.example")  # plain http to another machine
    assert not hf_token_allowed("http://hf-proxy.corp.example/hf-inference/models/m")


@pytest.mark.parametrize("endpoint", ["http://attacker-space.hf.space/ok", "http://huggingface.co.evil.net/ok",
                                      "http://evilhuggingface.co/ok"])
def test_hf_token_never_reaches_a_space_or_lookalike(endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """What would leave the machine, seen at a local capture server set as HTTP_PROXY."""
    monkeypatch.setenv("HF_TOKEN", "hf_mustNotReachTheSpace0123")
    with CaptureServer() as proxy:
        route_through(monkeypatch, proxy)
        RemoteBackend("hf-api", model=MODEL, endpoint=endpoint, retry=FAST).embed(["a"])
        monkeypatch.setenv("HFBATCH_API_KEY", "key-for-other-servers")
        RemoteBackend("hf-api", model=MODEL, endpoint=endpoint, retry=FAST).embed(["a"])
    sent = [r for r in proxy.requests if r["method"] == "POST"]
    assert [r["target"] for r in sent] == [endpoint, endpoint]  # it did go out, through the proxy
    assert "Authorization" not in sent[0]["headers"]
    assert sent[1]["headers"]["Authorization"] == "Bearer key-for-other-servers"


def test_url_credentials_are_sent_as_basic_auth_and_never_shown(server: EmbeddingServer) -> None:
    endpoint = server.url.replace("http://", "http://user:s3cretpw@")
    backend = RemoteBackend("tei", model=MODEL, endpoint=endpoint, retry=FAST)
    backend.embed(["a"])
    assert server.requests[0]["headers"]["Authorization"] == "Basic dXNlcjpzM2NyZXRwdw=="  # user:s3cretpw
    fingerprint = backend.fingerprint()
    assert "s3cretpw" not in fingerprint and server.url in fingerprint
    other = RemoteBackend("tei", model=MODEL, endpoint=server.url.replace("http://", "http://user:rotated@"))
    assert other.fingerprint() == fingerprint  # the same endpoint, so the same cache namespace
    assert backend.describe()["endpoint"] == server.url + "/embed"
    server.script.append(Reply(404, {"error": "nope"}))
    with pytest.raises(TerminalBackendError) as refused:
        backend.embed(["b"])
    assert server.url in str(refused.value) and "s3cretpw" not in str(refused.value)


@pytest.mark.parametrize("status", [307, 308])
def test_a_redirect_to_another_server_is_refused(server: EmbeddingServer, st_model, status: int) -> None:
    with EmbeddingServer(st_model) as elsewhere:
        final = elsewhere.url.replace("127.0.0.1", "localhost") + "/embed"  # another host name, another server
        server.script.append(Reply(status, {}, {"Location": final}))
        endpoint = server.url.replace("http://", "http://user:s3cretpw@")
        with pytest.raises(TerminalBackendError, match="Point --endpoint at the final URL") as refused:
            RemoteBackend("tei", model=MODEL, endpoint=endpoint, retry=FAST).embed(["a"])
        message = str(refused.value)
        assert f"{server.url}/embed" in message and final in message and "s3cretpw" not in message
        assert "\n" not in message and elsewhere.requests == []  # never followed


def test_a_redirect_on_the_same_server_is_followed(server: EmbeddingServer, st_model) -> None:
    server.script.append(Reply(308, {}, {"Location": "/v2/embeddings"}))  # the API moved on the same server
    backend = RemoteBackend("openai", model=MODEL, endpoint=server.url + "/v1", retry=FAST)
    assert np.allclose(backend.embed(["a"]), st_model.encode(["a"]), atol=1e-5)
    assert [r["path"] for r in server.requests] == ["/v1/embeddings", "/v2/embeddings"]


def test_429_honours_retry_after_and_counts_it(server: EmbeddingServer) -> None:
    server.script.extend([Reply(429, {"error": "rate limited"}, {"Retry-After": "0"}), Reply(429, {"error": "again"}, {"Retry-After": "0"})])
    backend = _backend("tei", server)
    assert backend.embed(["hello"]).shape == (1, 384)
    info = backend.describe()
    assert info["requests"] == 3 and info["retries"] == 2 and info["retry_causes"] == {"429": 2}


def test_503_model_loading_waits_its_estimated_time(server: EmbeddingServer) -> None:
    server.script.append(Reply(503, {"error": "Model is currently loading", "estimated_time": 0.05}))
    backend = _backend("hf-api", server, retry=RetryPolicy(attempts=3, base_wait_seconds=30))
    backend._protocol.endpoint = server.url + f"/hf-inference/models/{MODEL}/pipeline/feature-extraction"
    assert backend.embed(["hello"]).shape == (1, 384)  # waited 0.05 s (estimated_time), not the 30 s backoff
    assert backend.describe()["retry_causes"] == {"503": 1}


def test_500_then_success(server: EmbeddingServer) -> None:
    server.script.append(Reply(500, {"error": "boom"}))
    backend = _backend("tei", server)
    assert backend.embed(["a", "b"]).shape == (2, 384)
    assert backend.describe()["retries"] == 1


def test_transient_errors_give_up_after_the_attempts(server: EmbeddingServer) -> None:
    server.script.extend([Reply(502, {"error": "bad gateway"})] * 4)
    with pytest.raises(TransientBackendError, match="answered 502 .*gave up after 4 attempts"):
        _backend("tei", server).embed(["a"])
    assert len(server.requests) == 4


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_client_errors_are_not_retried(server: EmbeddingServer, status: int) -> None:
    server.script.append(Reply(status, {"error": "nope"}))
    with pytest.raises(TerminalBackendError, match=f"answered {status} \\(nope\\)") as info:
        _backend("tei", server).embed(["a"])
    assert len(server.requests) == 1
    if status == 401:
        assert "set HF_TOKEN (or HUGGINGFACE_TOKEN)" in str(info.value)


def test_413_halves_the_batch_and_keeps_the_size(server: EmbeddingServer, st_model) -> None:
    server.max_batch = 4
    backend = _backend("tei", server, api_batch_size=16, concurrency=1)
    texts = [f"text number {i}" for i in range(20)]
    vectors = backend.embed(texts)
    assert np.allclose(vectors, st_model.encode(texts), atol=1e-5)
    assert backend.describe()["api_batch_size"] == 4
    sizes = [len(r["body"]["inputs"]) for r in server.requests]
    assert sizes[:4] == [16, 8, 4, 4]  # halved until it fit...
    assert max(sizes[-3:]) == 4  # ...and the size that worked is kept


def test_413_on_a_single_text_is_terminal(server: EmbeddingServer) -> None:
    server.max_batch = 0
    with pytest.raises(TerminalBackendError, match="single text as too large") as info:
        _backend("tei", server).embed(["a"])
    # the server's own words, and a fix a remote backend takes (--max-length is the local model's only)
    assert "maximum allowed batch size 0" in str(info.value) and "--split tokens:N" in str(info.value)
    assert "--max-length" not in str(info.value)


def test_concurrent_requests_keep_input_order(server: EmbeddingServer, st_model) -> None:
    server.delay = 0.2
    backend = _backend("tei", server, api_batch_size=2, concurrency=4)
    texts = [f"sentence {i} about item {i * 7}" for i in range(16)]
    vectors = backend.embed(texts)
    assert server.max_in_flight >= 2  # several requests really were in flight at once
    assert np.allclose(vectors, st_model.encode(texts), atol=1e-5)


@pytest.mark.parametrize(
    "reply, message",
    [
        (Reply(200, b"<html>not json</html>"), "not JSON"),
        (Reply(200, [[0.1, 0.2]]), "shape \\(1, 2\\) for 2 texts"),
        (Reply(200, [[0.1, 0.2], [0.3]]), "uneven length"),
        (Reply(200, [[0.1, float("nan")], [0.3, 0.4]]), "NaN"),
        (Reply(200, {"error": "odd"}), "answered a JSON dict instead of a list of vectors"),
        # numpy would have turned these into numbers
        (Reply(200, [["0.1", "0.2"], ["0.3", "0.4"]]), 'answered a string \\("0.1"\\) where numbers belong'),
        (Reply(200, [[0.1, True], [0.3, 0.4]]), "answered a boolean \\(true\\) where numbers belong"),
        (Reply(200, [[0.1, None], [0.3, 0.4]]), "answered null where numbers belong"),
        (Reply(200, [[0.1, [0.2]], [0.3, 0.4]]), "answered a list nested deeper than vectors"),
        (Reply(200, [[0.1, 0.2], "0.3,0.4"]), "answered a string"),
    ],
)
def test_wrong_answers_fail_loudly(server: EmbeddingServer, reply: Reply, message: str) -> None:
    server.script.append(reply)
    with pytest.raises(RemoteError, match=message):
        _backend("tei", server).embed(["a", "b"])


def test_dimension_change_between_batches_fails(server: EmbeddingServer) -> None:
    server.script.extend([lambda texts: [[0.5] * 384 for _ in texts], lambda texts: [[0.5] * 768 for _ in texts]])
    with pytest.raises(RemoteError, match="768-dimensional vectors after 384-dimensional"):
        _backend("tei", server, api_batch_size=1, concurrency=1).embed(["a", "b"])


def test_one_vector_of_strings_and_openai_strings_fail(server: EmbeddingServer) -> None:
    server.script.append(Reply(200, ["0.5"] * 384))  # one input: a 1-D answer
    with pytest.raises(RemoteError, match=r"tei: http://127\.0\.0\.1:\d+/embed answered a string"):
        _backend("tei", server).embed(["a"])
    server.script.append(lambda texts: [[str(x) for x in [0.5] * 384] for _ in texts])
    with pytest.raises(RemoteError, match="openai: .*/v1/embeddings answered a string"):
        _backend("openai", server).embed(["a", "b"])


def test_openai_bad_indexes_fail(server: EmbeddingServer) -> None:
    server.script.append(Reply(200, {"data": [{"embedding": [0.1], "index": 0}, {"embedding": [0.2], "index": 0}]}))
    with pytest.raises(RemoteError, match="malformed"):
        _backend("openai", server).embed(["a", "b"])


def test_token_level_answers_are_refused_or_mean_pooled(server: EmbeddingServer, st_model) -> None:
    server.token_level = True
    with pytest.raises(RemoteError, match="token-level vectors .*--remote-pooling mean"):
        _backend("tei", server).embed(["a b c", "d e"])
    pooled = _backend("tei", server, pooling="mean").embed(["a b c", "d e"])
    assert np.allclose(pooled, st_model.encode(["a b c", "d e"]), atol=1e-4)  # MiniLM is mean pooling


def test_connection_refused_is_transient(tmp_path: Path) -> None:
    backend = RemoteBackend("tei", model=MODEL, endpoint="http://127.0.0.1:9", retry=RetryPolicy(attempts=2, base_wait_seconds=0.01))
    with pytest.raises(TransientBackendError, match="cannot connect"):
        backend.embed(["a"])
    assert backend.describe()["retry_causes"] == {"connection": 1}


def test_missing_endpoint_and_bad_options() -> None:
    with pytest.raises(InputError, match="--backend tei needs --endpoint"):
        RemoteBackend("tei", model=MODEL).embed(["a"])
    with pytest.raises(InputError, match="--remote-pooling"):
        RemoteBackend("tei", model=MODEL, pooling="max")


def test_embed_file_through_tei_matches_local(tmp_path: Path, server: EmbeddingServer) -> None:
    src = write_csv(tmp_path / "in.csv", rows_for(SAMPLE_TEXTS + ["", "truncate me " * 300]))
    local = hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "local.parquet"))
    remote = hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "tei.parquet", backend="tei", endpoint=server.url, api_batch_size=4))
    a, b = pq.read_table(local.output), pq.read_table(remote.output)
    for name in ("text", "n_tokens", "truncated", "embedding_error"):
        assert a.column(name).to_pylist() == b.column(name).to_pylist()
    va = [v for v in a.column("embedding").to_pylist()]
    vb = [v for v in b.column("embedding").to_pylist()]
    assert [v is None for v in va] == [v is None for v in vb]
    for x, y in zip(va, vb):
        if x is not None:
            assert float(np.dot(x, y)) > 0.9999
    prov, m = remote.document["provenance"], remote.metrics
    assert prov["backend"] == "tei" and prov["fingerprint"].startswith("tei:")
    assert "/info" in server.gets and prov["backends"]["tei"]["served_model_id"] == MODEL  # asked TEI what it serves
    assert prov["backends"]["tei"]["revision"] == f"hub:{MODEL}@{server.model_sha}"
    assert m["api"]["requests"] == len(server.requests) > 0
    assert m["cache"]["hits"] == 0  # another backend, another cache namespace
    again = hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "tei2.parquet", backend="tei", endpoint=server.url))
    assert again.metrics["texts_computed"] == 0 and again.metrics["api"]["requests"] == 0


def test_max_length_is_refused_for_remote(tmp_path: Path, server: EmbeddingServer) -> None:
    src = write_csv(tmp_path / "in.csv", rows_for(["a"]))
    with pytest.raises(InputError, match="--max-length applies to the local model only"):
        hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "o.parquet", backend="tei", endpoint=server.url, max_length=64))


def test_auto_falls_back_when_the_local_model_cannot_load(tmp_path: Path, server: EmbeddingServer) -> None:
    src = write_csv(tmp_path / "in.csv", rows_for(SAMPLE_TEXTS))
    # no CUDA here: the local model fails to load, the TEI server takes over for the whole job
    result = hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "o.parquet", backend="auto", device="cuda",
                                     fallback="tei", endpoint=server.url))
    table = pq.read_table(result.output)
    assert table.num_rows == len(SAMPLE_TEXTS) and table.column("embedding").null_count == 0
    prov = result.document["provenance"]
    assert prov["backend"] == "auto"
    assert prov["backends"]["tei"]["texts_computed"] == len(set(SAMPLE_TEXTS))
    assert prov["backends"]["local"]["texts_computed"] == 0
    assert result.metrics["api"]["fallbacks"] == 1
    doc = json.loads(result.sidecar.read_text())
    assert doc["provenance"]["backends"]["tei"]["requests"] >= 1


def _local_model_breaks_after_two_calls(monkeypatch: pytest.MonkeyPatch, message: str) -> None:
    """The canary and one batch succeed, then the local model fails as a GPU does (a fault that
    cannot be caused for real on this CPU machine)."""
    from hfbatch.backends.local import LocalBackend
    from hfbatch.errors import BackendError

    calls = {"n": 0}
    real_embed = LocalBackend.embed

    def flaky(self, texts):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] > 2:
            raise BackendError(message)
        return real_embed(self, texts)

    monkeypatch.setattr(LocalBackend, "embed", flaky)


def test_auto_stops_instead_of_mixing_vector_spaces(tmp_path: Path, server: EmbeddingServer, monkeypatch) -> None:
    _local_model_breaks_after_two_calls(monkeypatch, "CUDA error: device-side assert (simulated)")
    rng = np.random.default_rng(0)
    server.script.extend([lambda texts: rng.normal(size=(len(texts), 384)).tolist()] * 10)  # another model behind the API
    src = write_csv(tmp_path / "in.csv", rows_for([f"text {i}" for i in range(20)]))
    out = tmp_path / "o.parquet"
    with pytest.raises(BackendError, match="canary texts differ .*Stopped instead of mixing"):
        hfbatch.embed(EmbedOptions(input=src, output=out, backend="auto", fallback="tei", endpoint=server.url, batch_size=4))
    assert not out.exists()


def test_auto_switches_mid_job_when_the_remote_agrees(tmp_path: Path, server: EmbeddingServer, monkeypatch) -> None:
    _local_model_breaks_after_two_calls(monkeypatch, "out of memory (simulated)")
    texts = [f"text {i} of the review set" for i in range(20)]
    src = write_csv(tmp_path / "in.csv", rows_for(texts))
    result = hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "o.parquet", backend="auto", fallback="tei",
                                     endpoint=server.url, batch_size=4))
    prov = result.document["provenance"]
    assert prov["backends"]["local"]["texts_computed"] == 4 and prov["backends"]["tei"]["texts_computed"] == 16
    assert prov["backends"]["local"]["texts_computed"] + prov["backends"]["tei"]["texts_computed"] == 20
    assert result.document["provenance"]["backends"]["tei"]["model_id"] == MODEL
    assert pq.read_table(result.output).column("embedding").null_count == 0


def test_auto_refuses_a_remote_of_another_dimension_when_the_local_model_cannot_load(tmp_path: Path,
                                                                                      server: EmbeddingServer) -> None:
    server.script.extend([lambda texts: [[0.5] * 768 for _ in texts]] * 10)  # another model behind the API
    src = write_csv(tmp_path / "in.csv", rows_for(SAMPLE_TEXTS))
    out = tmp_path / "o.parquet"
    with pytest.raises(RemoteError, match="tei answered 768-dimensional vectors but the local model .* makes "
                                          "384-dimensional ones"):
        hfbatch.embed(EmbedOptions(input=src, output=out, backend="auto", device="cuda", fallback="tei", endpoint=server.url))
    assert not out.exists()


def test_auto_refuses_a_remote_of_another_dimension_mid_job(tmp_path: Path, server: EmbeddingServer, monkeypatch) -> None:
    _local_model_breaks_after_two_calls(monkeypatch, "out of memory (simulated)")
    server.script.extend([lambda texts: [[0.5] * 768 for _ in texts]] * 10)
    src = write_csv(tmp_path / "in.csv", rows_for([f"text {i}" for i in range(20)]))
    out = tmp_path / "o.parquet"
    with pytest.raises(RemoteError, match="768-dimensional vectors but the local model .* makes 384-dimensional"):
        hfbatch.embed(EmbedOptions(input=src, output=out, backend="auto", fallback="tei", endpoint=server.url, batch_size=4))
    assert not out.exists()


def test_auto_hands_over_when_the_memory_guard_refuses(tmp_path: Path, server: EmbeddingServer, monkeypatch) -> None:
    monkeypatch.setenv("MAX_MODEL_MEMORY_GB", "0.01")
    src = write_csv(tmp_path / "in.csv", rows_for(SAMPLE_TEXTS))
    result = hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "o.parquet", backend="auto", fallback="tei", endpoint=server.url))
    described = result.document["provenance"]["backends"]
    assert described["tei"]["texts_computed"] == len(set(SAMPLE_TEXTS)) and described["local"]["texts_computed"] == 0
    fallback = result.document["provenance"]["fallback"]
    assert fallback["fell_back"] is True and "MemoryGuardError" in fallback["fallback_reason"]
    assert pq.read_table(result.output).column("embedding").null_count == 0


def test_fingerprint_is_the_configuration_and_asks_no_server(server: EmbeddingServer,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "ENDPOINT", server.url)  # the hub too is played by the server: it would see a lookup
    monkeypatch.setenv("HFBATCH_HF_ROUTER", server.url)
    prints = [
        *(_backend(kind, server).fingerprint() for kind in ("tei", "hf-api", "openai")),
        _backend("tei", server, normalize=False).fingerprint(),
        _backend("tei", server, pooling="mean").fingerprint(),
        RemoteBackend("tei", model="BAAI/bge-small-en-v1.5", endpoint=server.url).fingerprint(),
        RemoteBackend("tei", model=MODEL, endpoint=server.url + "/v2").fingerprint(),
    ]
    assert len(set(prints)) == len(prints)  # another kind, setting, model or endpoint: another namespace
    assert _backend("tei", server).fingerprint() == prints[0]
    assert server.gets == [] and server.requests == []  # not /info, not the hub, not the embed route


def test_fingerprint_with_the_server_stopped_neither_raises_nor_connects(st_model) -> None:
    with EmbeddingServer(st_model) as stopped:
        url = stopped.url
    backend = RemoteBackend("tei", model=MODEL, endpoint=url, retry=RetryPolicy(attempts=1))
    assert backend.fingerprint() == f"tei:{MODEL}:{url};normalize=True;pooling=server"
    assert backend.describe()["model_loaded"] is False and backend.describe()["requests"] == 0  # no session opened
    assert backend.known_dimension() is None  # no request to find it out either


def test_served_revision_is_recorded_once_the_first_embed_connects(server: EmbeddingServer) -> None:
    backend = _backend("tei", server)
    before = backend.fingerprint()
    assert backend.describe()["revision"] is None and server.gets == []
    backend.embed(["a"])
    backend.embed(["b"])
    assert server.gets == ["/info"]  # asked once, with the first request
    info = backend.describe()
    assert info["revision"] == f"hub:{MODEL}@{server.model_sha}" and info["served_model_id"] == MODEL
    assert backend.fingerprint() == before and backend.known_dimension() == 384


def test_a_tei_server_serving_another_model_is_refused_before_its_vectors_are_used(server: EmbeddingServer,
                                                                                    tmp_path: Path) -> None:
    backend = RemoteBackend("tei", model="BAAI/bge-small-en-v1.5", endpoint=server.url, retry=FAST)
    for _ in range(2):  # the refusal sticks
        with pytest.raises(TerminalBackendError, match=f"serves {MODEL}, not --model BAAI/bge-small-en-v1.5; pass "
                                                       f"--model {MODEL}"):
            backend.embed(["a"])
    assert server.requests == []  # no POST: nothing of that server is cached under the wrong model


def test_a_cached_tei_rerun_makes_no_request(tmp_path: Path, server: EmbeddingServer) -> None:
    src = write_csv(tmp_path / "in.csv", rows_for(SAMPLE_TEXTS))
    first = hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "a.parquet", backend="tei", endpoint=server.url))
    asked = (list(server.gets), len(server.requests))
    again = hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "b.parquet", backend="tei", endpoint=server.url))
    assert (server.gets, len(server.requests)) == asked  # no /info, no embed request
    assert again.metrics["texts_computed"] == 0
    assert again.document["provenance"]["fingerprint"] == first.document["provenance"]["fingerprint"]
    assert pq.read_table(again.output).column("embedding").to_pylist() == \
        pq.read_table(first.output).column("embedding").to_pylist()


def test_a_cached_auto_rerun_loads_no_model_and_makes_no_request(tmp_path: Path, server: EmbeddingServer) -> None:
    from hfbatch.backends.local import LocalBackend

    src = write_csv(tmp_path / "in.csv", rows_for(SAMPLE_TEXTS))
    opts = dict(backend="auto", fallback="tei", endpoint=server.url)
    first = hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "a.parquet", **opts))
    assert first.document["provenance"]["backends"]["local"]["model_loaded"] is True  # the local side made them
    again = hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "b.parquet", **opts))
    assert server.gets == [] and server.requests == []  # the remote side was never asked anything
    local = again.document["provenance"]["backends"]["local"]
    assert local["model_loaded"] is False and local["load_seconds"] == 0.0 and again.metrics["texts_computed"] == 0
    assert again.metrics["cache"]["hits"] == len(set(SAMPLE_TEXTS))
    # auto caches under the local model's fingerprint while the local model makes the vectors
    assert again.document["provenance"]["fingerprint"] == LocalBackend(MODEL).fingerprint()
    assert pq.read_table(again.output).column("embedding").to_pylist() == \
        pq.read_table(first.output).column("embedding").to_pylist()


def test_a_cached_auto_rerun_that_fell_back_asks_the_server_nothing(tmp_path: Path, server: EmbeddingServer) -> None:
    src = write_csv(tmp_path / "in.csv", rows_for(SAMPLE_TEXTS))
    # no CUDA here: the local side fails its preflight, so the remote's namespace is used from the start
    opts = dict(backend="auto", device="cuda", fallback="tei", endpoint=server.url)
    first = hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "a.parquet", **opts))
    assert first.document["provenance"]["fingerprint"].startswith("tei:")
    asked = (list(server.gets), len(server.requests))
    again = hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "b.parquet", **opts))
    assert (server.gets, len(server.requests)) == asked and again.metrics["texts_computed"] == 0
    assert again.document["provenance"]["fallback"]["fell_back"] is True


def test_auto_stops_when_the_local_model_fails_to_load_after_its_checks(tmp_path: Path, server: EmbeddingServer) -> None:
    import shutil

    from conftest import BUNDLED_MODEL_DIR

    model_dir = tmp_path / "broken-model"
    shutil.copytree(BUNDLED_MODEL_DIR, model_dir)
    (model_dir / "model.safetensors").write_bytes(b"\x00" * 64)  # found, small enough, but not loadable
    src = write_csv(tmp_path / "in.csv", rows_for(SAMPLE_TEXTS))
    out = tmp_path / "o.parquet"
    with pytest.raises(BackendError, match="passed its checks but failed to load .* stops instead of mixing two "
                                           "vector spaces. Rerun with --backend tei"):
        hfbatch.embed(EmbedOptions(input=src, output=out, model=str(model_dir), backend="auto", fallback="tei",
                                endpoint=server.url))
    assert not out.exists() and server.requests == []


def test_endpoint_must_be_http() -> None:
    with pytest.raises(InputError, match="is not an http\\(s\\) URL"):
        RemoteBackend("tei", model=MODEL, endpoint="localhost:8080")


# --- prompts, long texts and smaller vectors through the remote backends (issue 13) -------------

PROMPTS = {"query": "query: ", "passage": "passage: "}


def _endpoint(kind: str, server: EmbeddingServer) -> str | None:
    return {"tei": server.url, "openai": server.url + "/v1", "hf-api": None}[kind]


def _job(src: Path, out: Path, **kw):  # type: ignore[no-untyped-def]
    return embed(EmbedOptions(input=src, output=out, **kw))


def _vectors(result) -> np.ndarray:  # type: ignore[no-untyped-def]
    return np.asarray(pq.read_table(result.output).column("embedding").to_pylist())


def _assert_same_vectors(a: np.ndarray, b: np.ndarray) -> None:
    """Row by row cosine >= 0.9999: the same model in another process (other batches, other padding)."""
    assert a.shape == b.shape and len(a) > 0
    assert (cosine_rows(a.astype(np.float64), b.astype(np.float64)) >= 0.9999).all()


@pytest.fixture
def prompt_model(tmp_path: Path) -> Path:
    """The bundled model with prompts in its config_sentence_transformers.json, as a model with
    query/passage prompts ships (and no default prompt, so a run without --prompt-name uses none)."""
    model_dir = tmp_path / "minilm-with-prompts"
    shutil.copytree(BUNDLED_MODEL_DIR, model_dir)
    config = json.loads((model_dir / "config_sentence_transformers.json").read_text())
    (model_dir / "config_sentence_transformers.json").write_text(json.dumps({**config, "prompts": PROMPTS}))
    return model_dir


@pytest.mark.parametrize("kind", ["tei", "openai"])
def test_prompt_text_is_put_before_each_text_as_the_local_backend_does(kind: str, tmp_path: Path,
                                                                      server: EmbeddingServer) -> None:
    src = write_csv(tmp_path / "in.csv", rows_for(SAMPLE_TEXTS))
    remote = dict(backend=kind, endpoint=_endpoint(kind, server))
    plain = _job(src, tmp_path / "plain.parquet", **remote)
    server.requests.clear()
    prompted = _job(src, tmp_path / "prompted.parquet", prompt="query: ", **remote)
    local = _job(src, tmp_path / "local.parquet", prompt="query: ")

    sent = [text for r in server.requests for text in r["body"]["inputs" if kind == "tei" else "input"]]
    assert sorted(sent) == sorted("query: " + t for t in set(SAMPLE_TEXTS))  # every text, the prompt before it
    assert all("prompt_name" not in r["body"] for r in server.requests)  # a prompt given as text is sent as text
    _assert_same_vectors(_vectors(prompted), _vectors(local))
    assert (cosine_rows(_vectors(prompted), _vectors(plain)) < 0.999).any()  # the prompt changed the vectors
    a, b = pq.read_table(prompted.output), pq.read_table(local.output)
    assert a.column("n_tokens").to_pylist() == b.column("n_tokens").to_pylist()  # the prompt's tokens counted
    assert a.column("n_tokens").to_pylist() != pq.read_table(plain.output).column("n_tokens").to_pylist()

    prov = prompted.document["provenance"]
    assert prov["fingerprint"] != plain.document["provenance"]["fingerprint"]  # another cache namespace
    assert prompted.metrics["cache"]["hits"] == 0 and prompted.metrics["texts_computed"] == len(set(SAMPLE_TEXTS))
    assert prov["prompt"] == "query: " and prov["backends"][kind]["prompt_sent_as"] == "text"
    again = _job(src, tmp_path / "again.parquet", prompt="query: ", **remote)  # ...which a rerun finds
    assert again.metrics["texts_computed"] == 0 and again.document["provenance"]["fingerprint"] == prov["fingerprint"]


def test_prompt_name_goes_to_tei_by_name_when_the_server_has_it(tmp_path: Path, server: EmbeddingServer,
                                                                prompt_model: Path) -> None:
    server.prompts = dict(PROMPTS)
    src = write_csv(tmp_path / "in.csv", rows_for(SAMPLE_TEXTS))
    local = _job(src, tmp_path / "local.parquet", model=str(prompt_model), prompt_name="query")
    remote = _job(src, tmp_path / "tei.parquet", backend="tei", endpoint=server.url, tokenizer=str(prompt_model),
                  prompt_name="query")

    assert server.requests and all(r["body"]["prompt_name"] == "query" for r in server.requests)
    sent = [text for r in server.requests for text in r["body"]["inputs"]]
    assert sorted(sent) == sorted(set(SAMPLE_TEXTS))  # not prefixed here: TEI puts its prompt before them
    assert sorted(server.encoded) == sorted("query: " + t for t in set(SAMPLE_TEXTS))
    _assert_same_vectors(_vectors(remote), _vectors(local))
    for name in ("n_tokens", "truncated"):
        assert pq.read_table(remote.output).column(name).to_pylist() == pq.read_table(local.output).column(name).to_pylist()
    prov = json.loads(remote.sidecar.read_text())["provenance"]
    assert prov["prompt"] == "query: " and prov["prompt_name"] == "query"
    assert prov["backends"]["tei"]["prompt_sent_as"] == "name"


@pytest.mark.parametrize("status", [413, 422])  # 413: what TEI answers (a Validation error); 422: another server
def test_prompt_name_the_tei_server_does_not_have_is_sent_as_text(status: int, tmp_path: Path, server: EmbeddingServer,
                                                                   prompt_model: Path) -> None:
    server.prompts = {"passage": "passage: "}  # the server's model has no "query" prompt
    server.prompt_error_status = status
    src = write_csv(tmp_path / "in.csv", rows_for(SAMPLE_TEXTS))
    local = _job(src, tmp_path / "local.parquet", model=str(prompt_model), prompt_name="query")
    # one request at a time, so exactly one is sent before the server's answer is known
    remote = _job(src, tmp_path / "tei.parquet", backend="tei", endpoint=server.url, tokenizer=str(prompt_model),
                  prompt_name="query", api_concurrency=1, api_batch_size=3)

    first, *rest = server.requests
    assert first["body"]["prompt_name"] == "query" and first["status"] == status
    assert rest and all("prompt_name" not in r["body"] and r["status"] == 200 for r in rest)
    sent = [text for r in rest for text in r["body"]["inputs"]]
    assert sorted(sent) == sorted("query: " + t for t in set(SAMPLE_TEXTS))  # every text, once, with the prompt
    _assert_same_vectors(_vectors(remote), _vectors(local))
    prov = remote.document["provenance"]
    assert prov["prompt"] == "query: " and prov["backends"]["tei"]["prompt_sent_as"] == "text"
    assert prov["backends"]["tei"]["batch_halvings"] == 0  # the refusal was about the prompt, not the batch


def test_a_batch_too_large_for_tei_still_halves_with_a_prompt_name(server: EmbeddingServer, prompt_model: Path,
                                                                   st_model) -> None:
    """TEI's 413 for too many inputs is not its 413 for an unknown prompt: the batch halves, the name stays."""
    server.prompts, server.max_batch = dict(PROMPTS), 2
    backend = _backend("tei", server, tokenizer=str(prompt_model), prompt_name="query", api_batch_size=8, concurrency=1)
    texts = SAMPLE_TEXTS  # 8: one request of 8, then 4, then 2
    vectors = backend.embed(texts)
    assert [r["status"] for r in server.requests][:3] == [413, 413, 200]  # 8 -> 4 -> 2 inputs
    assert all(r["body"]["prompt_name"] == "query" for r in server.requests)
    info = backend.describe()
    assert info["prompt_sent_as"] == "name" and info["api_batch_size"] == 2 and info["batch_halvings"] == 2
    assert np.allclose(vectors, st_model.encode(["query: " + t for t in texts]), atol=1e-5)


def test_hf_api_sends_the_prompt_before_each_text(tmp_path: Path, router: EmbeddingServer, prompt_model: Path) -> None:
    router.prompts = dict(PROMPTS)  # the route would honour a name: the hf-api backend sends the text all the same
    src = write_csv(tmp_path / "in.csv", rows_for(SAMPLE_TEXTS))
    local = _job(src, tmp_path / "local.parquet", prompt="query: ")
    for out, given in (("text.parquet", dict(prompt="query: ")),
                       ("name.parquet", dict(prompt_name="query", tokenizer=str(prompt_model)))):
        router.requests.clear()
        result = _job(src, tmp_path / out, backend="hf-api", **given)
        assert {r["path"] for r in router.requests} == {f"/hf-inference/models/{MODEL}/pipeline/feature-extraction"}
        assert all("prompt_name" not in r["body"] for r in router.requests)
        assert sorted(t for r in router.requests for t in r["body"]["inputs"]) == sorted("query: " + t for t in set(SAMPLE_TEXTS))
        _assert_same_vectors(_vectors(result), _vectors(local))
        assert result.document["provenance"]["backends"]["hf-api"]["prompt_sent_as"] == "text"


LONG_TEXTS = [
    "The kettle boils fast and the handle stays cool. " * 12,
    "Short.",
    " ".join(f"word{i} and, more: text-{i * 7}!" for i in range(90)),
    "Très bien! Works exactly as described 👍 " * 20,
    "",
]


@pytest.mark.parametrize("kind", ["tei", "openai"])
def test_split_windows_through_remote_equal_the_local_backend(kind: str, tmp_path: Path, server: EmbeddingServer) -> None:
    src = write_csv(tmp_path / "in.csv", rows_for(LONG_TEXTS))
    remote = dict(backend=kind, endpoint=_endpoint(kind, server))
    runs = {}
    for aggregate in ("mean", None):  # --aggregate mean first: its windows are what the server computes
        for side, opts in (("local", {}), ("remote", remote)):
            runs[side, aggregate] = _job(src, tmp_path / f"{side}-{aggregate}.parquet", split="tokens:64", overlap=8,
                                         aggregate=aggregate, **opts)
    for aggregate in ("mean", None):
        a, b = (pq.read_table(runs[side, aggregate].output) for side in ("local", "remote"))
        columns = ["id", "n_chunks", "n_tokens", "truncated", "embedding_error"]
        if aggregate is None:
            columns += ["text", "parent_row", "chunk_index", "char_start", "char_end"]
        assert a.num_rows == b.num_rows == (len(LONG_TEXTS) if aggregate else a.num_rows)
        for name in columns:
            assert a.column(name).to_pylist() == b.column(name).to_pylist(), name
        va, vb = a.column("embedding").to_pylist(), b.column("embedding").to_pylist()
        assert [v is None for v in va] == [v is None for v in vb]
        _assert_same_vectors(np.asarray([v for v in va if v is not None]), np.asarray([v for v in vb if v is not None]))
        assert runs["remote", aggregate].document["provenance"]["split"] == {"tokens": 64, "overlap": 8,
                                                                             "aggregate": aggregate}
    whole = pq.read_table(runs["remote", "mean"].output)  # a text longer than the model reads, read whole
    assert whole.column("n_tokens").to_pylist()[2] > 256 and whole.column("truncated").to_pylist()[2] is False
    # one row per window: each row's text is its window, text[char_start:char_end], and those windows
    # are what the server was sent (by the --aggregate mean run; the rows run found them all cached)
    rows = pq.read_table(runs["remote", None].output).to_pylist()
    windows = [r for r in rows if r["embedding_error"] is None]
    assert len(rows) > len(LONG_TEXTS) and max(r["n_tokens"] for r in windows) <= 64
    assert all(r["text"] == LONG_TEXTS[r["parent_row"]][r["char_start"]:r["char_end"]] for r in windows)
    assert set(server.encoded) == {r["text"] for r in windows}
    assert runs["remote", None].metrics["texts_computed"] == 0


@pytest.mark.parametrize("kind", ["tei", "openai"])
def test_truncated_and_quantized_vectors_through_remote_equal_the_local_backend(kind: str, tmp_path: Path,
                                                                               server: EmbeddingServer) -> None:
    texts = SAMPLE_TEXTS + [f"review {i}: the lid {'cracked' if i % 2 else 'held'} after {i} weeks" for i in range(24)]
    src = write_csv(tmp_path / "in.csv", rows_for(texts))
    remote = dict(backend=kind, endpoint=_endpoint(kind, server))
    runs = {}
    for precision in ("float32", "int8", "ubinary"):  # the full vectors are cached: the later runs only requantize
        for side, opts in (("local", {}), ("remote", remote)):
            runs[side, precision] = _job(src, tmp_path / f"{side}-{precision}.parquet", truncate_dim=128,
                                         output_precision=precision, **opts)

    local, far = _vectors(runs["local", "float32"]), _vectors(runs["remote", "float32"])
    assert far.shape == (len(texts), 128) and np.allclose(np.linalg.norm(far, axis=1), 1, atol=1e-5)  # renormalised
    _assert_same_vectors(far, local)
    ranges = [np.asarray(runs[side, "int8"].document["provenance"]["vectors"]["ranges"]) for side in ("local", "remote")]
    assert ranges[0].shape == (2, 128) and np.allclose(ranges[0], ranges[1], atol=1e-5)  # both from the job's vectors
    codes = [_vectors(runs[side, "int8"]).astype(int) for side in ("local", "remote")]
    # Not bitwise: the server batches and pads otherwise, so floats differ by ~3e-8 (seen: 1 value in
    # 10). A bucket is ~1e-3 wide: that noise (in the values and in the ranges taken from them) can
    # tip a value across a bucket edge (seen: 1 code in 4,096), never further than the next bucket.
    assert codes[0].shape == (len(texts), 128) and np.abs(codes[0] - codes[1]).max() <= 1
    assert (codes[0] == codes[1]).mean() > 0.99
    bits = [np.unpackbits(_vectors(runs[side, "ubinary"]).astype(np.uint8), axis=1) for side in ("local", "remote")]
    assert bits[0].shape == (len(texts), 128)
    clear = np.abs(local) > 1e-4  # a sign is noise only for a value that close to 0
    assert (bits[0] == (local > 0)).all() and (bits[0][clear] == bits[1][clear]).all()
    assert runs["remote", "int8"].metrics["texts_computed"] == 0  # the same namespace as the float32 run
