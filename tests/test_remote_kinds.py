"""Remote pair scoring (TEI and infinity /rerank) and remote sparse vectors (TEI /embed_sparse)
against a real HTTP server on 127.0.0.1 (tests/rerank_server.py) that runs the real models: the
CrossEncoder and SparseEncoder built from MiniLM's weights (tests/kind_models.py). References are
sentence-transformers' own classes on the same saved models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import write_csv
from embedding_server import Reply
from hfbatch import EmbedOptions, ScoreOptions, run_embed
from hfbatch.backends.http import RetryPolicy
from hfbatch.backends.remote import SERVER_USAGE
from hfbatch.backends.remote_scoring import RemoteScorer, file_activation
from hfbatch.backends.remote_sparse import RemoteSparseBackend, make_remote_sparse
from hfbatch.backends.scoring import LocalScorer, Pair
from hfbatch.errors import InputError, ModelLoadError, RemoteError, TerminalBackendError
from hfbatch.sparse_vectors import from_arrow
from rerank_server import KindServer

pytestmark = pytest.mark.timeout(120)

FAST = RetryPolicy(attempts=4, base_wait_seconds=0.01, max_wait_seconds=1)
SECRET = "s3cretpw"

PAIRS = [
    Pair("how do I descale a kettle?", "Fill it with vinegar and water, boil, and rinse twice."),
    Pair("how do I descale a kettle?", "The glass lid arrived cracked in two places."),
    Pair("how do I descale a kettle?", "Battery life is poor: barely two hours of use."),
    Pair("how do I descale a kettle?", "Citric acid works too; leave it for an hour before boiling."),
    Pair("is the battery good?", "Battery life is poor: barely two hours of use."),
    Pair("is the battery good?", "Très bien! Works exactly as described 👍"),
    Pair("is the battery good?", "Charges in an hour and lasts all day."),
    Pair("how do I descale a kettle?", "Short."),
]
LONG = " ".join(f"Paragraph {i}: the kettle boils fast, the handle stays cool and the lid fits well." for i in range(40))


# --- fixtures -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cross_encoder(cross_encoder_model_dir: Path):
    from sentence_transformers import CrossEncoder

    return CrossEncoder(str(cross_encoder_model_dir), device="cpu")


@pytest.fixture(scope="module")
def sparse_encoder(sparse_model_dir: Path):
    from sentence_transformers import SparseEncoder

    return SparseEncoder(str(sparse_model_dir), device="cpu")


@pytest.fixture
def tei(cross_encoder, cross_encoder_model_dir: Path):
    with KindServer(flavor="tei", cross_encoder=cross_encoder, model_id=str(cross_encoder_model_dir)) as server:
        yield server


@pytest.fixture
def infinity(cross_encoder, cross_encoder_model_dir: Path):
    with KindServer(flavor="infinity", cross_encoder=cross_encoder, model_id=str(cross_encoder_model_dir)) as server:
        yield server


@pytest.fixture
def tei_sparse(sparse_encoder, sparse_model_dir: Path):
    with KindServer(flavor="tei", sparse=sparse_encoder, model_id=str(sparse_model_dir)) as server:
        yield server


def _scorer(flavor: str, server: KindServer, model: Path | str, **kw) -> RemoteScorer:
    return RemoteScorer(flavor, model=str(model), endpoint=kw.pop("endpoint", server.url), retry=kw.pop("retry", FAST), **kw)


def _predict(cross_encoder, pairs) -> np.ndarray:
    return np.asarray(cross_encoder.predict([list(p) for p in pairs], show_progress_bar=False), dtype=np.float32)


def _activation_copy(src: Path, dst: Path, activation: str) -> Path:
    """The cross-encoder with another activation in its files (cross-encoder/ms-marco-* name Identity:
    predict gives logits)."""
    shutil.copytree(src, dst)
    config_path = dst / "config_sentence_transformers.json"
    config = json.loads(config_path.read_text())
    config["activation_fn"] = activation
    config_path.write_text(json.dumps(config))
    return dst


# --- pair scoring -------------------------------------------------------------------------------------

@pytest.mark.parametrize("flavor", ["tei", "infinity"])
def test_scores_equal_predict_and_are_placed_by_index(flavor: str, request, cross_encoder, cross_encoder_model_dir) -> None:
    server: KindServer = request.getfixturevalue(flavor)
    scorer = _scorer(flavor, server, cross_encoder_model_dir, api_batch_size=3)
    scored = scorer.score(PAIRS, scorer.pair_counts(PAIRS))
    want = _predict(cross_encoder, PAIRS)
    assert np.allclose([s.score for s in scored], want, atol=1e-5)
    assert [s.windows for s in scored] == [1] * len(PAIRS) and not any(s.truncated for s in scored)
    # answers came sorted by score, not in input order: only placing them by index gives `want`
    answers = [r["answer"] if flavor == "tei" else r["answer"]["results"] for r in server.requests]
    assert any([a["index"] for a in answer] != sorted(a["index"] for a in answer) for answer in answers)
    bodies = [r["body"] for r in server.requests]
    assert {r["path"] for r in server.requests} == {"/rerank"}
    docs = "texts" if flavor == "tei" else "documents"
    # grouped by query, up to 3 documents a request: 5 + 3 documents -> 2 + 1 requests
    assert sorted(len(b[docs]) for b in bodies) == [2, 3, 3]
    assert all(b["raw_scores"] is False for b in bodies)  # a Sigmoid model: the server's activated scores
    if flavor == "tei":
        assert all(b["truncate"] is True and b["return_text"] is False for b in bodies)
    else:
        assert all(b["model"] == str(cross_encoder_model_dir) for b in bodies)
        assert scorer.describe()["usage"]["prompt_tokens"] == sum(scorer.pair_counts(PAIRS))
    info = scorer.describe()
    assert info["activation"] == "Sigmoid" and info["backend"] == flavor and info["kind"] == "cross-encoder"
    assert info["requests"] == 3 and info["token_counts"] == "tokenizer"


@pytest.mark.parametrize("activation", ["torch.nn.modules.linear.Identity", "torch.nn.modules.activation.Tanh"])
@pytest.mark.parametrize("flavor", ["tei", "infinity"])
def test_another_activation_gets_raw_scores(flavor: str, activation: str, request, cross_encoder, cross_encoder_model_dir,
                                            tmp_path) -> None:
    """The server's sigmoid would not equal predict for these: raw scores, the activation applied here."""
    from sentence_transformers import CrossEncoder

    model = _activation_copy(cross_encoder_model_dir, tmp_path / "other", activation)
    assert file_activation(model) == activation.rsplit(".", 1)[-1] and file_activation(cross_encoder_model_dir) == "Sigmoid"
    server: KindServer = request.getfixturevalue(flavor)
    server.model_id = str(model)
    scorer = _scorer(flavor, server, model)
    scored = scorer.score(PAIRS[:4], scorer.pair_counts(PAIRS[:4]))
    want = _predict(CrossEncoder(str(model), device="cpu"), PAIRS[:4])
    assert np.allclose([s.score for s in scored], want, atol=1e-5)
    assert not np.allclose(want, _predict(cross_encoder, PAIRS[:4]), atol=1e-3)  # not the sigmoid's
    assert [r["body"]["raw_scores"] for r in server.requests] == [True]
    assert scorer.describe()["activation"] == activation.rsplit(".", 1)[-1]


def test_an_activation_outside_torch_is_read_as_sentence_transformers_reads_it(cross_encoder_model_dir, tmp_path) -> None:
    model = _activation_copy(cross_encoder_model_dir, tmp_path / "custom", "my_package.activations.Swish")
    assert file_activation(model) == "Sigmoid"  # not trusted: the default, as CrossEncoder loads it (nothing imported)
    assert file_activation(model, trust_remote_code=True) == "Swish"
    scorer = RemoteScorer("tei", model=str(model), endpoint="http://127.0.0.1:9", trust_remote_code=True)
    with pytest.raises(InputError, match="applies the activation Swish .* --backend local"):
        scorer.check_remote()


@pytest.mark.parametrize("aggregate", ["max", "mean"])
def test_long_documents_are_windowed_as_locally(aggregate: str, tei: KindServer, cross_encoder,
                                                cross_encoder_model_dir) -> None:
    pairs = [Pair("does the lid fit?", LONG), PAIRS[0], Pair("which paragraph is last?", LONG[: len(LONG) // 2])]
    scorer = _scorer("tei", tei, cross_encoder_model_dir, aggregate=aggregate)
    counts = scorer.pair_counts(pairs)
    assert counts[0] > scorer.max_length == cross_encoder.max_length
    scored = scorer.score(pairs, counts)
    local = LocalScorer(str(cross_encoder_model_dir), aggregate=aggregate)
    windows = local.windows(pairs[0])
    assert scorer.windows(pairs[0]) == windows and len(windows) > 2
    pick = np.max if aggregate == "max" else np.mean
    assert scored[0].windows == len(windows) and not scored[0].truncated
    assert scored[0].score == pytest.approx(float(pick(_predict(cross_encoder, [Pair(pairs[0].query, w) for w in windows]))),
                                            abs=1e-5)
    assert scored[0].count == counts[0]
    want = local.score(pairs, local.pair_counts(pairs))  # the local scorer, the same pairs: the same values
    assert [(s.count, s.windows, s.truncated) for s in scored] == [(s.count, s.windows, s.truncated) for s in want]
    assert np.allclose([s.score for s in scored], [s.score for s in want], atol=1e-5)


def test_a_503_is_retried(tei: KindServer, cross_encoder, cross_encoder_model_dir) -> None:
    tei.script.append(Reply(503, {"error": "Model is loading", "error_type": "Unhealthy"}))
    scorer = _scorer("tei", tei, cross_encoder_model_dir)
    scored = scorer.score(PAIRS[:2], scorer.pair_counts(PAIRS[:2]))
    assert np.allclose([s.score for s in scored], _predict(cross_encoder, PAIRS[:2]), atol=1e-5)
    info = scorer.describe()
    assert info["retries"] == 1 and info["retry_causes"] == {"503": 1} and [r["status"] for r in tei.requests] == [503, 200]


def test_413_halves_the_batch_and_keeps_the_size(tei: KindServer, cross_encoder, cross_encoder_model_dir) -> None:
    tei.max_batch = 2  # TEI's --max-client-batch-size
    pairs = [Pair("is it good?", f"review number {i}: {'good' if i % 2 else 'bad'} value") for i in range(10)]
    scorer = _scorer("tei", tei, cross_encoder_model_dir, api_batch_size=8, concurrency=1)
    scored = scorer.score(pairs, scorer.pair_counts(pairs))
    assert np.allclose([s.score for s in scored], _predict(cross_encoder, pairs), atol=1e-5)
    sizes = [len(r["body"]["texts"]) for r in tei.requests]
    assert sizes == [8, 4, 2, 2, 2, 2, 2]  # halved until it fit, and sent at the size that fits from then on
    assert [r["status"] for r in tei.requests] == [413, 413, 200, 200, 200, 200, 200]
    info = scorer.describe()
    assert info["api_batch_size"] == 2 and info["batch_halvings"] == 2  # ...and the size that worked is kept


def test_413_on_a_single_pair_is_terminal(tei: KindServer, cross_encoder_model_dir) -> None:
    tei.max_batch = 0
    scorer = _scorer("tei", tei, cross_encoder_model_dir)
    with pytest.raises(TerminalBackendError, match="single .query, document. pair as too large") as refused:
        scorer.score(PAIRS[:1], scorer.pair_counts(PAIRS[:1]))
    assert "maximum allowed batch size 0" in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.parametrize("serves, words", [("dense", "a dense embedding model (pooling mean)"),
                                           ("splade", "a SPLADE sparse embedding model"),
                                           ("classifier", "a classifier (2 labels)")])
def test_a_tei_that_cannot_rerank_is_refused_before_scoring(serves: str, words: str, tei: KindServer,
                                                            cross_encoder_model_dir) -> None:
    tei.serves = serves
    scorer = _scorer("tei", tei, cross_encoder_model_dir)
    with pytest.raises(InputError, match="not a reranker") as refused:
        scorer.score(PAIRS, scorer.pair_counts(PAIRS))
    assert words in str(refused.value) and "\n" not in str(refused.value)
    assert tei.requests == [] and tei.gets == ["/info"]  # nothing was sent to score
    with pytest.raises(InputError):  # the refusal sticks
        scorer.check_remote()


def test_an_infinity_that_cannot_rerank_is_refused_before_scoring(infinity: KindServer, cross_encoder_model_dir) -> None:
    infinity.serves = "dense"
    scorer = _scorer("infinity", infinity, cross_encoder_model_dir)
    with pytest.raises(InputError, match="for embed, not rerank"):
        scorer.check_remote()
    assert infinity.requests == [] and infinity.gets == ["/models"]
    other = _scorer("infinity", infinity, "BAAI/bge-reranker-base", tokenizer=str(cross_encoder_model_dir))
    with pytest.raises(InputError, match="serves .*cross-encoder, not --model BAAI/bge-reranker-base"):
        other.score(PAIRS[:1], other.pair_counts(PAIRS[:1]))
    assert infinity.requests == []


def test_a_tei_serving_another_model_is_refused(tei: KindServer, cross_encoder_model_dir) -> None:
    tei.model_id = "BAAI/bge-reranker-v2-m3"
    scorer = _scorer("tei", tei, cross_encoder_model_dir)
    with pytest.raises(InputError, match="serves BAAI/bge-reranker-v2-m3, not --model"):
        scorer.score(PAIRS[:1], scorer.pair_counts(PAIRS[:1]))
    assert tei.requests == []


def test_a_tei_reading_fewer_tokens_than_the_windows_is_refused(tei: KindServer, cross_encoder_model_dir) -> None:
    tei.input_limit = 128  # the model's files say 256: windows cut for 256 would be cut again, unseen
    scorer = _scorer("tei", tei, cross_encoder_model_dir)
    with pytest.raises(InputError, match="reads 128 tokens of a pair.* --max-input-length 256"):
        scorer.score(PAIRS[:1], scorer.pair_counts(PAIRS[:1]))
    assert tei.requests == []


def test_no_rerank_route_is_one_line_with_the_fix(tei: KindServer, cross_encoder_model_dir) -> None:
    scorer = _scorer("tei", tei, cross_encoder_model_dir, endpoint=tei.url + "/v9")  # no /v9/info, no /v9/rerank
    with pytest.raises(TerminalBackendError, match="answered 404 .*no /rerank route") as refused:
        scorer.score(PAIRS[:1], scorer.pair_counts(PAIRS[:1]))
    assert len(tei.requests) == 1 and "\n" not in str(refused.value)  # 404 is not retried


def test_a_424_from_tei_names_the_fix(tei: KindServer, cross_encoder_model_dir) -> None:
    """A TEI without /info (or behind a proxy that hides it) is told by its first answer."""
    tei.script.append(Reply(424, {"error": "model is not a re-ranker model", "error_type": "Backend"}))
    tei.info_route = False
    scorer = _scorer("tei", tei, cross_encoder_model_dir, endpoint=tei.url + "/")
    with pytest.raises(TerminalBackendError, match="answered 424 .*serves no reranker"):
        scorer.score(PAIRS[:1], scorer.pair_counts(PAIRS[:1]))
    assert tei.gets == ["/info"] and len(tei.requests) == 1  # asked, not answered: left to the first answer


@pytest.mark.parametrize("flavor", ["tei", "infinity"])
def test_url_credentials_are_sent_and_never_shown(flavor: str, request, cross_encoder_model_dir) -> None:
    server: KindServer = request.getfixturevalue(flavor)
    endpoint = server.url.replace("http://", f"http://user:{SECRET}@")
    scorer = _scorer(flavor, server, cross_encoder_model_dir, endpoint=endpoint)
    fingerprint = scorer.fingerprint()
    assert server.gets == [] and server.requests == []  # identity needs no request
    scorer.score(PAIRS[:2], scorer.pair_counts(PAIRS[:2]))
    assert server.requests[0]["headers"]["Authorization"] == "Basic dXNlcjpzM2NyZXRwdw=="  # user:s3cretpw
    other = _scorer(flavor, server, cross_encoder_model_dir, endpoint=server.url.replace("http://", "http://user:rotated@"))
    assert other.fingerprint() == fingerprint and SECRET not in fingerprint  # credentials are not identity
    described = json.dumps(scorer.describe())
    assert SECRET not in described and server.url + "/rerank" in described
    server.script.append(Reply(422, {"error": "bad input"}))
    with pytest.raises(TerminalBackendError) as refused:
        scorer.score(PAIRS[2:3], scorer.pair_counts(PAIRS[2:3]))
    assert server.url in str(refused.value) and SECRET not in str(refused.value)
    server.model_id = "another-model"
    fresh = _scorer(flavor, server, cross_encoder_model_dir, endpoint=endpoint)
    with pytest.raises(InputError) as mismatch:
        fresh.check_remote()
    assert server.url in str(mismatch.value) and SECRET not in str(mismatch.value)


@pytest.mark.parametrize("reply, message", [
    (Reply(200, [{"index": 0, "score": 0.5}]), "answered 1 results for 2 documents"),
    (Reply(200, [{"index": 0, "score": 0.5}, {"index": 0, "score": 0.4}]), "malformed result"),
    (Reply(200, [{"index": 0, "score": 0.5}, {"index": 2, "score": 0.4}]), "malformed result"),
    (Reply(200, [{"index": 0, "score": "0.5"}, {"index": 1, "score": 0.4}]), "malformed result"),
    (Reply(200, {"error": "?"}), "answered .* for 2 documents"),
])
def test_wrong_answers_fail_loudly(reply: Reply, message: str, tei: KindServer, cross_encoder_model_dir) -> None:
    tei.script.append(reply)
    scorer = _scorer("tei", tei, cross_encoder_model_dir)
    with pytest.raises(RemoteError, match=message):
        scorer.score(PAIRS[:2], scorer.pair_counts(PAIRS[:2]))


def test_a_served_name_without_a_tokenizer_lets_the_server_truncate(cross_encoder, cross_encoder_model_dir) -> None:
    with KindServer(flavor="tei", cross_encoder=cross_encoder, model_id="my-reranker") as server:
        scorer = _scorer("tei", server, "my-reranker")
        assert scorer.token_source == SERVER_USAGE and scorer.pair_counts(PAIRS) == [0] * len(PAIRS)
        assert scorer.windows(Pair("q", LONG)) is None
        assert server.gets == []
        assert scorer.max_length == cross_encoder.max_length and server.gets == ["/info"]  # TEI's max_input_length
        pairs = [*PAIRS[:3], Pair("does the lid fit?", LONG)]
        scored = scorer.score(pairs, scorer.pair_counts(pairs))
        assert np.allclose([s.score for s in scored[:3]], _predict(cross_encoder, pairs[:3]), atol=1e-5)
        assert [s.windows for s in scored] == [1] * 4  # the long one was truncated by the server (truncate: true)
        assert all(r["body"]["truncate"] is True for r in server.requests)
        assert scorer.describe()["truncation"] == "server"
        with_tokenizer = _scorer("tei", server, "my-reranker", tokenizer=str(cross_encoder_model_dir))
        assert with_tokenizer.token_source == "tokenizer" and with_tokenizer.windows(Pair("q", LONG))
        with pytest.raises(ModelLoadError, match="--tokenizer /no/such/dir cannot be found"):
            _scorer("tei", server, "my-reranker", tokenizer="/no/such/dir").pair_counts(PAIRS)


def test_a_model_whose_files_say_another_kind_is_refused(tei: KindServer, sparse_model_dir) -> None:
    tei.model_id = str(sparse_model_dir)
    scorer = _scorer("tei", tei, sparse_model_dir)
    with pytest.raises(InputError, match="not a cross-encoder"):
        scorer.pair_counts(PAIRS)
    assert tei.requests == [] and tei.gets == []


@pytest.mark.parametrize("kwargs, message", [
    ({"endpoint": None}, "needs --endpoint URL"),
    ({"endpoint": "gpu-box:8080"}, "not an http"),
    ({"max_length": 128}, "--max-length"),
    ({"api_batch_size": 0}, "at least 1"),
    ({"aggregate": "min"}, "--aggregate"),
])
def test_bad_configuration_is_a_usage_error(kwargs: dict, message: str, cross_encoder_model_dir) -> None:
    kwargs.setdefault("endpoint", "http://127.0.0.1:9")
    with pytest.raises(InputError, match=message):
        RemoteScorer("tei", model=str(cross_encoder_model_dir), **kwargs)
    with pytest.raises(InputError, match="not a reranking server"):
        RemoteScorer("openai", model="m", endpoint="http://127.0.0.1:9")


def test_concurrent_requests_keep_pair_order(tei: KindServer, cross_encoder, cross_encoder_model_dir) -> None:
    tei.delay = 0.1
    pairs = [Pair(f"query {i % 3}", f"document {i} about item {i * 7}") for i in range(18)]
    scorer = _scorer("tei", tei, cross_encoder_model_dir, api_batch_size=2, concurrency=4)
    scored = scorer.score(pairs, scorer.pair_counts(pairs))
    assert np.allclose([s.score for s in scored], _predict(cross_encoder, pairs), atol=1e-5)
    assert tei.max_in_flight > 1 and len(tei.requests) == 9  # 3 queries x 6 documents, 2 a request


def test_score_job_end_to_end(tei: KindServer, cross_encoder, cross_encoder_model_dir, tmp_path: Path) -> None:
    import hfbatch

    rows = [{"id": i, "q": p.query, "d": p.document} for i, p in enumerate([*PAIRS, Pair("does the lid fit?", LONG)])]
    source = write_csv(tmp_path / "pairs.csv", rows)
    opts = ScoreOptions(input=source, output=tmp_path / "scored.parquet", model=str(cross_encoder_model_dir),
                        backend="tei", endpoint=tei.url, query_column="q", text_column="d", api_retries=3)
    hfbatch.score(opts)
    table = pq.read_table(tmp_path / "scored.parquet").to_pylist()
    local = LocalScorer(str(cross_encoder_model_dir))
    pairs = [Pair(r["q"], r["d"]) for r in rows]
    want = local.score(pairs, local.pair_counts(pairs))
    assert np.allclose([r["score"] for r in table], [w.score for w in want], atol=1e-5)
    assert [r["n_windows"] for r in table] == [w.windows for w in want] and table[-1]["n_windows"] > 1
    sent = len(tei.requests)
    hfbatch.score(opts)  # a rerun: every pair from the cache
    assert len(tei.requests) == sent


# --- sparse ------------------------------------------------------------------------------------------

SPARSE_TEXTS = ["The kettle boils fast and the handle stays cool.", "Arrived broken, the glass lid was cracked.",
                "Très bien! Works exactly as described 👍", "Short.", "Battery life is poor: barely two hours of use.",
                "He said \"great value\", and I agree, mostly.", "Line one\nline two, with a comma"]


def _assert_sparse_equal(got, want_tensor) -> None:
    dense = want_tensor.to_dense().numpy()
    assert len(got) == len(dense)
    for vector, row in zip(got, dense):
        at = np.flatnonzero(row)
        assert vector.indices.dtype == np.int32 and vector.values.dtype == np.float32
        assert np.array_equal(vector.indices, at)  # the same indices, sorted, zeros dropped
        assert np.allclose(vector.values, row[at], rtol=0, atol=1e-5 * float(np.abs(row).max()))


def test_embed_sparse_equals_encode_document(tei_sparse: KindServer, sparse_encoder, sparse_model_dir) -> None:
    backend = RemoteSparseBackend(model=str(sparse_model_dir), endpoint=tei_sparse.url, api_batch_size=3,
                                  concurrency=2, retry=FAST)
    assert backend.kind == "sparse" and backend.name == "tei" and backend.remote and backend.side == "document"
    got = backend.embed(SPARSE_TEXTS)
    want = sparse_encoder.encode_document(SPARSE_TEXTS, convert_to_tensor=True, convert_to_sparse_tensor=True).cpu()
    _assert_sparse_equal(got, want)
    assert {r["path"] for r in tei_sparse.requests} == {"/embed_sparse"}
    assert sorted(len(r["body"]["inputs"]) for r in tei_sparse.requests) == [1, 3, 3]
    assert all(r["body"]["truncate"] is True for r in tei_sparse.requests)
    from hfbatch.backends.encoders import SparseBackend

    local = SparseBackend(str(sparse_model_dir))
    assert backend.token_counts(SPARSE_TEXTS) == local.token_counts(SPARSE_TEXTS)
    assert backend.max_length == local.max_length and backend.known_dimension() == 30522
    assert backend.vocabulary()[:3] == local.vocabulary()[:3]
    assert backend.describe()["served_model_id"] == str(sparse_model_dir)


def test_embed_sparse_413_halves_and_a_503_is_retried(tei_sparse: KindServer, sparse_encoder, sparse_model_dir) -> None:
    tei_sparse.max_batch = 2
    tei_sparse.script.append(Reply(503, {"error": "Model is loading", "error_type": "Unhealthy"}))
    backend = RemoteSparseBackend(model=str(sparse_model_dir), endpoint=tei_sparse.url, api_batch_size=8, concurrency=1,
                                  retry=FAST)
    got = backend.embed(SPARSE_TEXTS)
    _assert_sparse_equal(got, sparse_encoder.encode_document(SPARSE_TEXTS, convert_to_tensor=True,
                                                             convert_to_sparse_tensor=True).cpu())
    info = backend.describe()
    assert info["retries"] == 1 and info["api_batch_size"] == 2 and info["batch_halvings"] == 2
    assert [len(r["body"]["inputs"]) for r in tei_sparse.requests] == [7, 7, 4, 2, 2, 2, 1]  # 503, 413, 413, ...


@pytest.mark.parametrize("serves, words", [("dense", "a dense embedding model (pooling mean)"),
                                           ("reranker", "a reranker (cross-encoder)")])
def test_a_tei_without_splade_is_refused_before_embedding(serves: str, words: str, tei_sparse: KindServer,
                                                          sparse_model_dir) -> None:
    tei_sparse.serves = serves
    endpoint = tei_sparse.url.replace("http://", f"http://user:{SECRET}@")
    backend = RemoteSparseBackend(model=str(sparse_model_dir), endpoint=endpoint, retry=FAST)
    with pytest.raises(InputError, match="not a SPLADE model") as refused:
        backend.embed(SPARSE_TEXTS)
    message = str(refused.value)
    assert words in message and "\n" not in message and SECRET not in message and tei_sparse.url in message
    assert tei_sparse.requests == []
    assert SECRET not in backend.fingerprint() and SECRET not in json.dumps(backend.describe())


def test_embed_sparse_answers_are_checked(tei_sparse: KindServer, sparse_model_dir) -> None:
    backend = RemoteSparseBackend(model=str(sparse_model_dir), endpoint=tei_sparse.url, retry=FAST)
    for reply, message in [(Reply(200, [[{"index": 1, "value": 0.5}]]), "answered 1 vectors for 2 texts"),
                           (Reply(200, [[{"index": 40000, "value": 0.5}], []]), "out of range"),
                           (Reply(200, [[{"index": 3, "value": 0.5}, {"index": 3, "value": 0.1}], []]), "repeated"),
                           (Reply(200, [[{"index": 3, "value": "0.5"}], []]), "malformed sparse vector")]:
        tei_sparse.script.append(reply)
        with pytest.raises(RemoteError, match=message):
            backend.embed(["a", "b"])
    tei_sparse.script.append(Reply(200, [[{"index": 9, "value": 0.25}, {"index": 2, "value": 0.5},
                                          {"index": 5, "value": 0.0}], []]))
    unsorted, empty = backend.embed(["a", "b"])  # placed by index, zeros dropped
    assert unsorted.indices.tolist() == [2, 9] and unsorted.values.tolist() == [0.5, 0.25] and empty.nnz == 0


def test_embed_job_with_the_remote_sparse_backend(tei_sparse: KindServer, sparse_encoder, sparse_model_dir,
                                                  tmp_path: Path) -> None:
    source = write_csv(tmp_path / "texts.csv", [{"id": i, "text": t} for i, t in enumerate(SPARSE_TEXTS)])
    opts = EmbedOptions(input=source, output=tmp_path / "sparse.parquet", model=str(sparse_model_dir), backend="tei",
                        endpoint=tei_sparse.url, kind="sparse", api_retries=3)
    run_embed(opts, backend=make_remote_sparse(opts))
    got = from_arrow(pq.read_table(tmp_path / "sparse.parquet").column("embedding"))
    _assert_sparse_equal(got, sparse_encoder.encode_document(SPARSE_TEXTS, convert_to_tensor=True,
                                                             convert_to_sparse_tensor=True).cpu())
    sent = len(tei_sparse.requests)
    run_embed(opts, backend=make_remote_sparse(opts))  # a rerun: every vector from the cache
    assert len(tei_sparse.requests) == sent


def test_make_remote_sparse_refuses_what_tei_cannot_take(sparse_model_dir, tmp_path: Path) -> None:
    base = dict(input=tmp_path / "in.csv", output=tmp_path / "out.parquet", model=str(sparse_model_dir),
                endpoint="http://127.0.0.1:9", kind="sparse")
    with pytest.raises(InputError, match="--backend tei"):
        make_remote_sparse(EmbedOptions(backend="openai", **base))
    with pytest.raises(InputError, match="--max-length"):
        make_remote_sparse(EmbedOptions(backend="tei", max_length=64, **base))
    backend = make_remote_sparse(EmbedOptions(backend="tei", **base))
    assert backend.fingerprint().startswith(f"tei-sparse:{sparse_model_dir}:http://127.0.0.1:9/embed_sparse;side=document")
    with pytest.raises(ModelLoadError, match="pass --tokenizer"):
        RemoteSparseBackend(model="naver/splade-v3", endpoint="http://127.0.0.1:9").token_counts(["a"])


def test_the_query_side_of_an_inference_free_model_is_refused(sparse_router_model_dir) -> None:
    """TEI runs one SPLADE; a Router's query side (static weights per token) is not it: never sent."""
    backend = RemoteSparseBackend(model=str(sparse_router_model_dir), endpoint="http://127.0.0.1:9", prompt_name="query")
    with pytest.raises(InputError, match="query side of its own"):
        backend.token_counts(["a"])
    document = RemoteSparseBackend(model=str(sparse_router_model_dir), endpoint="http://127.0.0.1:9")
    assert document.side == "document" and document.token_counts(["a kettle"])[0] > 2
