"""Sparse models (issue 26): the kind read from the model's files, `hfbatch embed` of a SPLADE
equal to sentence-transformers' own SparseEncoder on the same saved model (same indices, values
within 1e-5 relative), --sparse-top-k / --sparse-vocab, the cache, --split, the readers users
have (DuckDB, Polars), Lance and Delta sync targets and `hfbatch search` by dot product; and the
refusals (a cross-encoder through embed, a contradicting --kind, --truncate-dim on a sparse model).

The models are tests/kind_models.py's: MiniLM's real encoder with seeded heads, saved by
sentence-transformers' own save() and loaded here through hfbatch's real loading code."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from conftest import BUNDLED_MODEL_DIR, write_parquet
from s3_server import s3  # noqa: F401  # the fixture: a real S3-protocol server on 127.0.0.1
from hfbatch import EmbedOptions, embed
from hfbatch.backends.kinds import model_kind
from hfbatch.backends.local import LocalBackend
from hfbatch.cli import app
from hfbatch.errors import InputError
from hfbatch.sparse_vectors import SparseVector, from_arrow, from_coo, pack, top_k, unpack

pytestmark = pytest.mark.timeout(300)

SAMPLE = Path(__file__).resolve().parent.parent / "sample_data" / "reviews.parquet"
LONG = "The copper kettle whistles " + "and whistles, louder and louder, " * 60 + "until someone comes."


def cli(*args: Any) -> Any:
    return CliRunner().invoke(app, [str(a) for a in args])


def texts() -> list[str]:
    column = next(c for c in ("text", "review", "body") if c in pq.read_schema(SAMPLE).names)
    return [t for t in pq.read_table(SAMPLE, columns=[column]).column(column).to_pylist() if t][:40] + [LONG]


@pytest.fixture(scope="module")
def reference(sparse_model_dir: Path) -> Any:
    from sentence_transformers import SparseEncoder

    return SparseEncoder(str(sparse_model_dir), device="cpu")


def encoded(model: Any, items: list[str], side: str = "document") -> list[SparseVector]:
    encode = model.encode_query if side == "query" else model.encode_document
    tensor = encode(items, convert_to_tensor=True, convert_to_sparse_tensor=True).coalesce()
    return from_coo(tensor.indices().numpy(), tensor.values().numpy(), len(items))


def assert_same(got: list[SparseVector | None], want: list[SparseVector]) -> None:
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g is not None, i
        assert g.indices.tolist() == w.indices.tolist(), i
        # relative to the vector's largest value: texts batched with others of other lengths (other
        # padding) move fp32 sums by ~1e-6 of it, in sentence-transformers' own encode too
        np.testing.assert_allclose(g.values, w.values, rtol=0, atol=1e-5 * float(np.abs(w.values).max()),
                                   err_msg=f"row {i}")


def write_input(tmp_path: Path, items: list[Any]) -> Path:
    return write_parquet(tmp_path / "in.parquet", [{"id": i, "text": t} for i, t in enumerate(items)])


# --- what kind a model is -------------------------------------------------------------------------

def test_kind_is_read_from_the_models_files(sparse_model_dir: Path, multivector_model_dir: Path,
                                            cross_encoder_model_dir: Path, tmp_path: Path) -> None:
    assert model_kind(sparse_model_dir).kind == "sparse"
    assert model_kind(multivector_model_dir).kind == "multivector"
    assert model_kind(cross_encoder_model_dir).kind == "cross-encoder"
    assert model_kind(BUNDLED_MODEL_DIR).kind == "dense"
    # an older SPLADE save without model_type: its modules say it
    bare = tmp_path / "old_splade"
    bare.mkdir()
    (bare / "modules.json").write_text((sparse_model_dir / "modules.json").read_text())
    assert model_kind(bare).kind == "sparse" and "SpladePooling" in model_kind(bare).evidence
    # a bare sequence-classification checkpoint is a cross-encoder
    head = tmp_path / "head"
    head.mkdir()
    (head / "config.json").write_text(json.dumps({"architectures": ["BertForSequenceClassification"]}))
    assert model_kind(head).kind == "cross-encoder"


def test_a_sparse_model_is_never_run_as_a_dense_one(sparse_model_dir: Path, tmp_path: Path) -> None:
    """What issue 26 found: a SPLADE directory embedded as a 384-d mean-pooled model, exit 0."""
    with pytest.raises(InputError, match="SparseEncoder"):
        LocalBackend(str(sparse_model_dir)).fingerprint()
    source = write_input(tmp_path, ["one text"])
    result = cli("embed", source, "-o", tmp_path / "out.parquet", "--model", sparse_model_dir, "--kind", "dense")
    assert result.exit_code == 2, result.output
    assert "SparseEncoder" in result.output and "--kind dense" in result.output
    assert not (tmp_path / "out.parquet").exists()


def test_a_cross_encoder_through_embed_is_one_line_exit_2(cross_encoder_model_dir: Path, tmp_path: Path) -> None:
    source = write_input(tmp_path, ["one text", "two"])
    result = cli("embed", source, "-o", tmp_path / "out.parquet", "--model", cross_encoder_model_dir)
    assert result.exit_code == 2, result.output
    assert "CrossEncoder" in result.output and "hfbatch score" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out.parquet").exists()


def test_kind_sparse_on_a_dense_model_names_what_it_is(tmp_path: Path) -> None:
    source = write_input(tmp_path, ["one text"])
    result = cli("embed", source, "-o", tmp_path / "out.parquet", "--model", BUNDLED_MODEL_DIR, "--kind", "sparse")
    assert result.exit_code == 2, result.output
    assert "SentenceTransformer" in result.output and "--kind sparse" in result.output


# --- the vectors ---------------------------------------------------------------------------------

def test_sparse_embed_equals_sparse_encoder(sparse_model_dir: Path, reference: Any, tmp_path: Path) -> None:
    items = texts()
    source = write_input(tmp_path, [*items[:3], None, *items[3:]])  # a null text: a marked row, kept
    out = tmp_path / "out.parquet"
    result = embed(EmbedOptions(input=source, output=out, model=str(sparse_model_dir), batch_size=8))
    table = pq.read_table(out)
    assert table.num_rows == len(items) + 1
    assert pa.types.is_struct(table.schema.field("embedding").type)
    vectors = from_arrow(table.column("embedding"))
    assert vectors[3] is None and table.column("embedding_error")[3].as_py()
    got = vectors[:3] + vectors[4:]
    assert_same(got, encoded(reference, items))
    assert all(v is not None and v.nnz > 0 for v in got)
    # the long text is truncated at the model's length, by its own tokenizer
    assert table.column("truncated")[-1].as_py() is True
    assert table.column("n_tokens")[-1].as_py() == reference.max_seq_length
    vectors_record = result.document["provenance"]["vectors"]
    assert vectors_record["kind"] == "sparse" and vectors_record["dim"] == 30522 and vectors_record["side"] == "document"
    assert result.document["provenance"]["normalize"] is False
    # the same rows again: every one from the cache, none computed, the same column
    again = embed(EmbedOptions(input=source, output=tmp_path / "again.parquet", model=str(sparse_model_dir)))
    assert again.metrics["texts_computed"] == 0
    assert pq.read_table(tmp_path / "again.parquet").column("embedding").equals(table.column("embedding"))


def test_top_k_and_vocab(sparse_model_dir: Path, reference: Any, tmp_path: Path) -> None:
    items = texts()[:12]
    source = write_input(tmp_path, items)
    out = tmp_path / "out.parquet"
    result = cli("embed", source, "-o", out, "--model", sparse_model_dir, "--sparse-top-k", 5, "--sparse-vocab")
    assert result.exit_code == 0, result.output
    column = pq.read_table(out).column("embedding")
    want = encoded(reference, items)
    tokenizer = reference.tokenizer
    for row, full in zip(column.to_pylist(), want):
        order = np.lexsort((full.indices, -full.values))[:5]
        assert row["indices"] == sorted(full.indices[order].tolist())  # the 5 largest, in index order
        np.testing.assert_allclose(row["values"], full.values[np.sort(order)], rtol=1e-5)
        assert row["tokens"] == tokenizer.convert_ids_to_tokens(row["indices"])


def test_a_planted_cache_entry_is_computed_again(sparse_model_dir: Path, reference: Any, tmp_path: Path) -> None:
    from hfbatch.backends.encoders import SparseBackend
    from hfbatch.cache import open_cache

    items = texts()[:4]
    source = write_input(tmp_path, items)
    cache_dir = tmp_path / "cache"
    backend = SparseBackend(str(sparse_model_dir))
    cache = open_cache(cache_dir, backend.fingerprint(), size_limit_bytes=1 << 30)
    bogus = SparseVector(np.array([7, 3], np.int32), np.array([1.0, 2.0], np.float32))  # unsorted: not ours
    cache.store_bytes([items[0]], [pack(bogus, 5)], backend.fingerprint())
    cache.store_bytes([items[1]], [b"\x00" * 13], backend.fingerprint())
    beyond = SparseVector(np.array([5, 100_000_000], np.int32), np.array([1.0, 2.0], np.float32))  # past the vocabulary
    cache.store_bytes([items[2]], [pack(beyond, 5)], backend.fingerprint())
    cache.close()
    result = embed(EmbedOptions(input=source, output=tmp_path / "out.parquet", model=str(sparse_model_dir),
                                cache_dir=cache_dir))
    assert result.metrics["texts_computed"] == 4
    assert_same(from_arrow(pq.read_table(tmp_path / "out.parquet").column("embedding")), encoded(reference, items))


def test_pack_and_unpack_refuse_what_is_not_a_sparse_vector() -> None:
    vector = SparseVector(np.array([1, 5, 9], np.int32), np.array([0.5, 1.5, 2.5], np.float32))
    back, count = unpack(pack(vector, 17), 10)  # type: ignore[misc]
    assert back.indices.tolist() == [1, 5, 9] and back.values.tolist() == [0.5, 1.5, 2.5] and count == 17
    assert unpack(pack(vector, 17), 9) is None  # an index beyond the model's vocabulary
    assert unpack(pack(SparseVector(np.array([1], np.int32), np.array([np.nan], np.float32)), 1), None) is None
    assert unpack(b"SPV1\x00\x00\x00\x00\x01", None) is None
    assert top_k(vector, 2).indices.tolist() == [5, 9]
    tie = SparseVector(np.array([2, 4, 6], np.int32), np.array([1.0, 1.0, 1.0], np.float32))
    assert top_k(tie, 2).indices.tolist() == [2, 4]  # ties: the lower index first


def test_split_windows_equal_the_windows_own_vectors(sparse_model_dir: Path, reference: Any, tmp_path: Path) -> None:
    items = [LONG, "A short one."]
    source = write_input(tmp_path, items)
    out = tmp_path / "rows.parquet"
    assert cli("embed", source, "-o", out, "--model", sparse_model_dir, "--split", "tokens:64").exit_code == 0
    table = pq.read_table(out)
    assert table.num_rows > 2 and table.column("parent_row").to_pylist().count(0) > 1
    window_texts = table.column("text").to_pylist()
    assert_same(from_arrow(table.column("embedding")), encoded(reference, window_texts))
    mean_out = tmp_path / "mean.parquet"
    assert cli("embed", source, "-o", mean_out, "--model", sparse_model_dir, "--split", "tokens:64",
               "--aggregate", "mean").exit_code == 0
    means = from_arrow(pq.read_table(mean_out).column("embedding"))
    first = [v for v, p in zip(from_arrow(table.column("embedding")), table.column("parent_row").to_pylist()) if p == 0]
    dense = np.zeros((len(first), 30522))
    for i, v in enumerate(first):
        dense[i, v.indices] = v.values
    want = dense.mean(axis=0)
    assert means[0] is not None
    assert means[0].indices.tolist() == np.flatnonzero(want).tolist()
    np.testing.assert_allclose(means[0].values, want[np.flatnonzero(want)], rtol=1e-5)


@pytest.mark.parametrize("args, named", [
    (["--truncate-dim", "8"], "--truncate-dim"),
    (["--output-precision", "int8"], "--output-precision int8"),
    (["--quantize", "int8"], "--quantize int8"),
    (["--backend", "openai", "--endpoint", "http://127.0.0.1:9", "--kind", "sparse"], "--kind sparse"),
    (["--sparse-top-k", "0"], "--sparse-top-k"),
])
def test_what_a_sparse_model_cannot_do_is_refused(sparse_model_dir: Path, tmp_path: Path, args: list[str],
                                                  named: str) -> None:
    source = write_input(tmp_path, ["one text", "two texts"])
    result = cli("embed", source, "-o", tmp_path / "out.parquet", "--model", sparse_model_dir, *args)
    assert result.exit_code == 2, result.output
    assert named in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) <= 3
    assert not (tmp_path / "out.parquet").exists()


def test_duckdb_and_polars_read_the_column(sparse_model_dir: Path, tmp_path: Path) -> None:
    import duckdb
    import polars as pl

    source = write_input(tmp_path, texts()[:6])
    out = tmp_path / "out.parquet"
    embed(EmbedOptions(input=source, output=out, model=str(sparse_model_dir)))
    want = pq.read_table(out).column("embedding").to_pylist()
    rows = duckdb.sql(f"SELECT embedding.indices AS i, embedding.values AS v FROM read_parquet('{out}') ORDER BY id").fetchall()
    assert [list(i) for i, _ in rows] == [w["indices"] for w in want]
    np.testing.assert_allclose(np.concatenate([v for _, v in rows]), np.concatenate([w["values"] for w in want]), rtol=1e-6)
    frame = pl.read_parquet(out)
    assert frame["embedding"].struct.field("indices").to_list() == [w["indices"] for w in want]


# --- sync targets and search ---------------------------------------------------------------------

def test_lance_target_day_two_and_search_by_dot_product(sparse_model_dir: Path, reference: Any, tmp_path: Path) -> None:
    import lance

    items = texts()[:30]
    source = write_input(tmp_path, items)
    target = tmp_path / "index.lance"
    first = cli("embed", source, "-o", target, "--model", sparse_model_dir, "--id-column", "id", "--json")
    assert first.exit_code == 0, first.output
    table = lance.dataset(str(target)).to_table().sort_by("id")
    assert_same(from_arrow(table.column("embedding")), encoded(reference, items))
    # day 2: one row changed, one new; only those are embedded
    changed = [*items[:5], "A brand new review about a quiet kettle.", *items[6:], "One more row."]
    source2 = write_input(tmp_path, changed)
    second = cli("embed", source2, "-o", target, "--model", sparse_model_dir, "--id-column", "id", "--json")
    assert second.exit_code == 0, second.output
    metrics = json.loads(second.output)["metrics"]
    assert metrics["rows_written"] == 2
    table = lance.dataset(str(target)).to_table().sort_by("id")
    assert_same(from_arrow(table.column("embedding")), encoded(reference, changed))
    # another top-k is another space: refused, naming it
    third = cli("embed", source2, "-o", target, "--model", sparse_model_dir, "--id-column", "id", "--sparse-top-k", "3")
    assert third.exit_code == 2 and "top_k" in third.output
    # search: the query's own (query-side) sparse vector, rows by dot product, as brute force ranks them
    query = "a noisy kettle"
    found = cli("search", target, query, "-k", 5, "--json")
    assert found.exit_code == 0, found.output
    report = json.loads(found.output)
    q = encoded(reference, [query], side="query")[0]
    dense_q = np.zeros(30522)
    dense_q[q.indices] = q.values
    scores = np.array([float(dense_q[v.indices] @ v.values) for v in encoded(reference, changed)])
    best = np.argsort(-scores, kind="stable")[:5]
    assert [h["id"] for h in report["hits"]] == best.tolist()
    np.testing.assert_allclose([h["score"] for h in report["hits"]], scores[best], rtol=1e-4, atol=1e-5)
    assert report["metric"].startswith("dot product")


def test_delta_target_stores_sparse_vectors(sparse_model_dir: Path, reference: Any, tmp_path: Path) -> None:
    from deltalake import DeltaTable

    items = texts()[:8]
    source = write_input(tmp_path, items)
    result = cli("embed", source, "-o", f"delta://{tmp_path / 'delta'}", "--model", sparse_model_dir, "--id-column", "id")
    assert result.exit_code == 0, result.output
    table = DeltaTable(str(tmp_path / "delta")).to_pyarrow_table().sort_by("id")
    assert_same(from_arrow(table.column("embedding")), encoded(reference, items))


def test_router_model_document_side_by_default_query_side_when_asked(sparse_router_model_dir: Path,
                                                                   tmp_path: Path) -> None:
    from sentence_transformers import SparseEncoder

    model = SparseEncoder(str(sparse_router_model_dir), device="cpu")
    items = texts()[:6]
    source = write_input(tmp_path, items)
    docs, queries = tmp_path / "docs.parquet", tmp_path / "queries.parquet"
    assert cli("embed", source, "-o", docs, "--model", sparse_router_model_dir).exit_code == 0
    assert cli("embed", source, "-o", queries, "--model", sparse_router_model_dir, "--prompt-name", "query").exit_code == 0
    assert_same(from_arrow(pq.read_table(docs).column("embedding")), encoded(model, items))
    assert_same(from_arrow(pq.read_table(queries).column("embedding")), encoded(model, items, side="query"))
    # the static query side reads every token: --max-length there is refused, not pretended
    cut = cli("embed", source, "-o", tmp_path / "cut.parquet", "--model", sparse_router_model_dir, "--prompt-name",
              "query", "--max-length", 6)
    assert cut.exit_code == 2 and "--max-length" in cut.output


def test_an_s3_input_and_output(sparse_model_dir: Path, reference: Any, tmp_path: Path, s3: Any) -> None:
    import io

    from s3_server import BUCKET

    items = texts()[:7]
    source = write_input(tmp_path, items)
    s3.put(BUCKET, "in/rows.parquet", source.read_bytes())
    embed(EmbedOptions(input=f"s3://{BUCKET}/in/rows.parquet", output=f"s3://{BUCKET}/out/rows.parquet",
                       model=str(sparse_model_dir), cache_dir=tmp_path / "c"))
    table = pq.read_table(io.BytesIO(s3.get(BUCKET, "out/rows.parquet")))
    assert_same(from_arrow(table.column("embedding")), encoded(reference, items))


def test_dry_run_counts_the_kind_and_verify_checks_it(sparse_model_dir: Path, tmp_path: Path) -> None:
    items = texts()[:10]
    source = write_input(tmp_path, items)
    out = tmp_path / "out.parquet"
    plan = cli("embed", source, "-o", out, "--model", sparse_model_dir, "--sparse-top-k", 20, "--dry-run", "--json")
    assert plan.exit_code == 0, plan.output
    report = json.loads(plan.stdout)
    assert report["kind"] == "sparse" and report["cache"]["texts_to_compute"] == 10
    assert 0 < report["output_bytes_per_row"] <= 20 * 8 and not out.exists()
    assert cli("embed", source, "-o", out, "--model", sparse_model_dir, "--sparse-top-k", 20).exit_code == 0
    again = json.loads(cli("embed", source, "-o", tmp_path / "o2.parquet", "--model", sparse_model_dir, "--dry-run",
                           "--json").stdout)
    assert again["cache"]["expected_hits"] == 10 and again["cache"]["texts_to_compute"] == 0
    checked = cli("verify", out, "--json")
    assert checked.exit_code == 0, checked.output
    verdict = json.loads(checked.stdout)
    assert verdict["ok"] and verdict["agree"] == 10 and verdict["cosine_min"] >= 0.9999


def test_encode_in_memory_gives_sparse_vectors(sparse_model_dir: Path, reference: Any, tmp_path: Path) -> None:
    import hfbatch

    items = texts()[:5]
    got = hfbatch.encode(items, model=str(sparse_model_dir), cache_dir=tmp_path / "c")
    assert isinstance(got, list) and all(isinstance(v, SparseVector) for v in got)
    assert_same(got, encoded(reference, items))


def test_prompt_name_query_names_the_side_of_a_model_without_prompts(sparse_model_dir: Path, reference: Any,
                                                                     tmp_path: Path) -> None:
    """Hub SPLADEs often have no prompts: --prompt-name query still means the query side."""
    import shutil

    model = tmp_path / "no-prompts"
    shutil.copytree(sparse_model_dir, model)
    config = json.loads((model / "config_sentence_transformers.json").read_text())
    config["prompts"] = {}
    (model / "config_sentence_transformers.json").write_text(json.dumps(config))
    items = texts()[:4]
    source = write_input(tmp_path, items)
    result = cli("embed", source, "-o", tmp_path / "q.parquet", "--model", model, "--prompt-name", "query", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["provenance"]["vectors"]["side"] == "query"
    assert_same(from_arrow(pq.read_table(tmp_path / "q.parquet").column("embedding")), encoded(reference, items, "query"))


@pytest.mark.parametrize("kind", ["sparse", "multivector"])
def test_a_postgres_target_refuses_other_kinds_in_one_line_without_the_password(
        kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """pgvector's column types hold dense vectors (sparsevec needs pgvector 0.7; the tests' server
    has 0.6): a sparse or multi-vector sync into Postgres is refused before any connection (nothing
    listens at the URL's port), in one line naming the outputs the kind writes, and the URL's
    password is in no message."""
    model = request.getfixturevalue(f"{kind}_model_dir")
    source = write_parquet(tmp_path / "in.parquet", [{"id": i, "text": t} for i, t in enumerate(["one", "two"])])
    result = cli("embed", source, "-o", "postgresql://hf:s3cretPW@127.0.0.1:9/db?table=docs", "--id-column", "id",
                 "--model", model)
    assert result.exit_code == 2, result.output
    assert "-o a postgres table" in result.output and "into Parquet, lance" in result.output
    assert "s3cretPW" not in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) <= 3
