"""Multi-vector models (late interaction, ColBERT; issue 26): `hfbatch embed` equals
sentence-transformers' own MultiVectorEncoder on the same saved model, token for token (cosine >=
0.9999 at the default float16, 1e-5 at float32), with its markers, skiplist and query expansion;
the sidecar says the bytes a row takes; the cache, --split, a Lance target; and the refusals.

The model is tests/kind_models.py's: MiniLM's real encoder with a seeded 128-d projection, saved
by sentence-transformers' own save() and loaded here through hfbatch's real loading code."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from conftest import write_parquet
from s3_server import s3  # noqa: F401  # the fixture: a real S3-protocol server on 127.0.0.1
from hfbatch import EmbedOptions, embed
from hfbatch.cli import app
from hfbatch.token_vectors import from_arrow, pack, unpack

pytestmark = pytest.mark.timeout(300)

SAMPLE = Path(__file__).resolve().parent.parent / "sample_data" / "reviews.parquet"
LONG = "The copper kettle whistles " + "and whistles, louder and louder, " * 40 + "until someone comes."


def cli(*args: Any) -> Any:
    return CliRunner().invoke(app, [str(a) for a in args])


def texts() -> list[str]:
    column = next(c for c in ("text", "review", "body") if c in pq.read_schema(SAMPLE).names)
    return [t for t in pq.read_table(SAMPLE, columns=[column]).column(column).to_pylist() if t][:24] + [LONG]


@pytest.fixture(scope="module")
def reference(multivector_model_dir: Path) -> Any:
    from sentence_transformers import MultiVectorEncoder

    return MultiVectorEncoder(str(multivector_model_dir), device="cpu")


def encoded(model: Any, items: list[str], side: str = "document") -> list[np.ndarray]:
    encode = model.encode_query if side == "query" else model.encode_document
    return [np.asarray(m, dtype=np.float32) for m in encode(items, convert_to_numpy=True)]


def assert_tokens_agree(got: list[np.ndarray | None], want: list[np.ndarray], *, atol: float | None = None) -> None:
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g is not None and g.shape == w.shape, (i, None if g is None else g.shape, w.shape)
        cosine = (g * w).sum(1) / (np.linalg.norm(g, axis=1) * np.linalg.norm(w, axis=1))
        assert cosine.min() >= 0.9999, (i, cosine.min())
        if atol is not None:
            np.testing.assert_allclose(g, w, rtol=0, atol=atol, err_msg=f"row {i}")


def write_input(tmp_path: Path, items: list[Any]) -> Path:
    return write_parquet(tmp_path / "in.parquet", [{"id": i, "text": t} for i, t in enumerate(items)])


def test_embed_equals_multivector_encoder_token_for_token(multivector_model_dir: Path, reference: Any,
                                                          tmp_path: Path) -> None:
    items = texts()
    source = write_input(tmp_path, [*items[:2], None, *items[2:]])  # a null text: a marked row, kept
    out = tmp_path / "out.parquet"
    result = embed(EmbedOptions(input=source, output=out, model=str(multivector_model_dir), batch_size=8))
    table = pq.read_table(out)
    assert table.schema.field("embedding").type == pa.list_(pa.list_(pa.float16(), 128))  # float16: the kind's default
    matrices = from_arrow(table.column("embedding"))
    assert matrices[2] is None and table.column("embedding_error")[2].as_py()
    want = encoded(reference, items)
    assert_tokens_agree(matrices[:2] + matrices[3:], want)
    # documents are read to the model's document_length (180 here), not its tokenizer's 256
    assert table.column("truncated")[-1].as_py() is True and table.column("n_tokens")[-1].as_py() == 180
    vectors = result.document["provenance"]["vectors"]
    assert vectors["kind"] == "multivector" and vectors["dim"] == 128 and vectors["precision"] == "float16"
    tokens = sum(len(m) for m in want)
    assert vectors["bytes_per_row"] == pytest.approx(tokens * 128 * 2 / len(items), rel=1e-3)
    # float32 when asked: the model's own values
    out32 = tmp_path / "out32.parquet"
    again = embed(EmbedOptions(input=source, output=out32, model=str(multivector_model_dir), output_precision="float32"))
    assert again.metrics["texts_computed"] == 0  # one cache for every precision: nothing computed again
    got32 = from_arrow(pq.read_table(out32).column("embedding"))
    assert_tokens_agree(got32[:2] + got32[3:], want, atol=1e-5)


def test_query_side_when_asked(multivector_model_dir: Path, reference: Any, tmp_path: Path) -> None:
    items = ["what keeps tea warm", "a quiet kettle"]
    source = write_input(tmp_path, items)
    out = tmp_path / "q.parquet"
    result = cli("embed", source, "-o", out, "--model", multivector_model_dir, "--prompt-name", "query",
                 "--output-precision", "float32")
    assert result.exit_code == 0, result.output
    got = from_arrow(pq.read_table(out).column("embedding"))
    want = encoded(reference, items, side="query")
    assert all(len(w) == 32 for w in want)  # query expansion: padded to query_length
    assert_tokens_agree(got, want, atol=1e-5)


def test_split_rows_and_a_cached_rerun(multivector_model_dir: Path, reference: Any, tmp_path: Path) -> None:
    source = write_input(tmp_path, [LONG, "Short."])
    out = tmp_path / "rows.parquet"
    first = cli("embed", source, "-o", out, "--model", multivector_model_dir, "--split", "tokens:64", "--json")
    assert first.exit_code == 0, first.output
    table = pq.read_table(out)
    assert table.column("parent_row").to_pylist().count(0) > 1
    assert_tokens_agree(from_arrow(table.column("embedding")), encoded(reference, table.column("text").to_pylist()))
    second = cli("embed", source, "-o", tmp_path / "again.parquet", "--model", multivector_model_dir,
                 "--split", "tokens:64", "--json")
    assert json.loads(second.output)["metrics"]["texts_computed"] == 0


def test_a_damaged_cache_entry_is_computed_again() -> None:
    matrix = np.arange(12, dtype=np.float32).reshape(3, 4)
    back, count = unpack(pack(matrix, 9), 4)  # type: ignore[misc]
    assert np.array_equal(back, matrix) and count == 9
    assert unpack(pack(matrix, 9), 5) is None  # another model's width
    assert unpack(pack(matrix, 9)[:-4], 4) is None  # cut short
    assert unpack(pack(np.full((1, 4), np.inf, np.float32), 1), 4) is None


@pytest.mark.parametrize("args, named", [
    (["--truncate-dim", "8"], "--truncate-dim"),
    (["--output-precision", "int8"], "--output-precision int8"),
    (["--split", "tokens:32", "--aggregate", "mean"], "--aggregate"),
    (["--max-length", "64"], "--max-length"),
])
def test_what_a_multivector_model_cannot_do_is_refused(multivector_model_dir: Path, tmp_path: Path, args: list[str],
                                                       named: str) -> None:
    source = write_input(tmp_path, ["one text", "two texts"])
    result = cli("embed", source, "-o", tmp_path / "out.parquet", "--model", multivector_model_dir, *args)
    assert result.exit_code == 2, result.output
    assert named in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out.parquet").exists()


def test_a_delta_target_is_refused_and_a_lance_one_stores_it(multivector_model_dir: Path, reference: Any,
                                                             tmp_path: Path) -> None:
    import lance

    items = texts()[:6]
    source = write_input(tmp_path, items)
    refused = cli("embed", source, "-o", f"delta://{tmp_path / 'd'}", "--model", multivector_model_dir, "--id-column", "id")
    assert refused.exit_code == 2 and "delta" in refused.output
    target = tmp_path / "mv.lance"
    result = cli("embed", source, "-o", target, "--model", multivector_model_dir, "--id-column", "id")
    assert result.exit_code == 0, result.output
    table = lance.dataset(str(target)).to_table().sort_by("id")
    assert_tokens_agree(from_arrow(table.column("embedding")), encoded(reference, items))
    # day 2 with the same options finds its own space: nothing to write (review: it was refused)
    again = cli("embed", source, "-o", target, "--model", multivector_model_dir, "--id-column", "id", "--json")
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["metrics"]["rows_written"] == 0
    # search scores by MaxSim with the query side's own token vectors, as the model's similarity does
    query = "a kettle that whistles"
    found = cli("search", target, query, "-k", 3, "--json")
    assert found.exit_code == 0, found.output
    report = json.loads(found.stdout)
    q = encoded(reference, [query], side="query")[0]
    scores = np.array([(m @ q.T).max(axis=0).sum() for m in encoded(reference, items)])
    assert report["metric"].startswith("MaxSim")
    assert [h["id"] for h in report["hits"]] == np.argsort(-scores, kind="stable")[:3].tolist()
    np.testing.assert_allclose([h["score"] for h in report["hits"]], np.sort(scores)[::-1][:3], rtol=2e-3)


def test_an_s3_input_and_output(multivector_model_dir: Path, reference: Any, tmp_path: Path, s3: Any) -> None:
    import io

    from s3_server import BUCKET

    items = texts()[:5]
    s3.put(BUCKET, "in/rows.parquet", write_input(tmp_path, items).read_bytes())
    embed(EmbedOptions(input=f"s3://{BUCKET}/in/rows.parquet", output=f"s3://{BUCKET}/out/rows.parquet",
                       model=str(multivector_model_dir), cache_dir=tmp_path / "c"))
    table = pq.read_table(io.BytesIO(s3.get(BUCKET, "out/rows.parquet")))
    assert_tokens_agree(from_arrow(table.column("embedding")), encoded(reference, items))


def test_dry_run_counts_bytes_and_verify_checks_each_token(multivector_model_dir: Path, tmp_path: Path) -> None:
    items = texts()[:8]
    source = write_input(tmp_path, items)
    out = tmp_path / "out.parquet"
    plan = cli("embed", source, "-o", out, "--model", multivector_model_dir, "--dry-run", "--json")
    assert plan.exit_code == 0, plan.output
    report = json.loads(plan.stdout)
    assert report["kind"] == "multivector" and report["output_bytes_per_row"] > 128 * 2 * 3  # float16, 3+ tokens
    assert cli("embed", source, "-o", out, "--model", multivector_model_dir).exit_code == 0
    checked = cli("verify", out, "--json")
    assert checked.exit_code == 0, checked.output
    verdict = json.loads(checked.stdout)
    assert verdict["ok"] and verdict["agree"] == 8 and verdict["cosine_min"] >= 0.999
    queries = tmp_path / "q.parquet"
    assert cli("embed", source, "-o", queries, "--model", multivector_model_dir, "--prompt-name", "query").exit_code == 0
    assert json.loads(cli("verify", queries, "--json").stdout)["agree"] == 8  # the query side checked as a query side


def test_encode_in_memory_gives_token_matrices(multivector_model_dir: Path, reference: Any, tmp_path: Path) -> None:
    import hfbatch

    items = texts()[:4]
    got = hfbatch.encode(items, model=str(multivector_model_dir), cache_dir=tmp_path / "c")
    assert isinstance(got, list) and all(isinstance(m, np.ndarray) and m.shape[1] == 128 for m in got)
    assert_tokens_agree(got, encoded(reference, items))


def test_a_cached_rerun_loads_no_model_and_a_planted_width_is_computed_again(multivector_model_dir: Path,
                                                                            reference: Any, tmp_path: Path) -> None:
    from hfbatch.backends.encoders import MultiVectorBackend
    from hfbatch.cache import open_cache

    items = texts()[:3]
    source = write_input(tmp_path, items)
    first = embed(EmbedOptions(input=source, output=tmp_path / "a.parquet", model=str(multivector_model_dir),
                               cache_dir=tmp_path / "c"))
    assert first.document["provenance"]["backends"]["local"]["model_loaded"] is True
    again = embed(EmbedOptions(input=source, output=tmp_path / "b.parquet", model=str(multivector_model_dir),
                               cache_dir=tmp_path / "c"))
    assert again.metrics["texts_computed"] == 0
    assert again.document["provenance"]["backends"]["local"]["model_loaded"] is False  # the width is in its files
    backend = MultiVectorBackend(str(multivector_model_dir))
    cache = open_cache(tmp_path / "c", backend.fingerprint(), size_limit_bytes=1 << 30)
    cache.store_bytes([items[0]], [pack(np.ones((3, 64), np.float32), 5)], backend.fingerprint())  # another width
    cache.close()
    third = embed(EmbedOptions(input=source, output=tmp_path / "c.parquet", model=str(multivector_model_dir),
                               cache_dir=tmp_path / "c"))
    assert third.metrics["texts_computed"] == 1
    assert_tokens_agree(from_arrow(pq.read_table(tmp_path / "c.parquet").column("embedding")), encoded(reference, items))


def test_options_that_do_not_apply_and_made_up_heads_are_refused(multivector_model_dir: Path, tmp_path: Path) -> None:
    import shutil

    from conftest import BUNDLED_MODEL_DIR

    source = write_input(tmp_path, ["one text"])
    for args, named in ((["--model", multivector_model_dir, "--no-normalize"], "--no-normalize"),
                        (["--model", multivector_model_dir, "--sparse-top-k", "3"], "--sparse-top-k"),
                        (["--model", BUNDLED_MODEL_DIR, "--sparse-vocab"], "--sparse-vocab")):
        result = cli("embed", source, "-o", tmp_path / "o.parquet", *args)
        assert result.exit_code == 2 and named in result.output, result.output
    bare = tmp_path / "bare"  # MiniLM's transformers files only: no head for either kind
    bare.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        if (BUNDLED_MODEL_DIR / name).exists():
            shutil.copy(BUNDLED_MODEL_DIR / name, bare / name)
    for kind in ("multivector", "sparse"):
        result = cli("embed", source, "-o", tmp_path / "o.parquet", "--model", bare, "--kind", kind)
        assert result.exit_code == 2 and "at random" in result.output, result.output
    assert not (tmp_path / "o.parquet").exists()
