"""hfbatch.encode: in memory, no files, with the real bundled model; its vectors are `hfbatch embed`'s."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import hfbatch
from conftest import SAMPLE_TEXTS, rows_for, write_csv
from hfbatch import EmbedOptions, InputError

TEXTS = SAMPLE_TEXTS + [f"Review number {i}: the lid {'fits' if i % 2 else 'leaks'} after {i} weeks." for i in range(6)]


class Recorder:
    """An Observer that keeps what the call reported (the core's metrics and the final document)."""

    def __init__(self) -> None:
        self.metrics: Any = None
        self.document: Mapping[str, Any] | None = None

    def start(self, total_rows: int | None) -> None: ...

    def advance(self, rows: int, *, hit_rate: float) -> None: ...

    def note(self, message: str) -> None: ...

    def chunk(self, first_row: int, rows: int, metrics: Any) -> None:
        self.metrics = metrics

    def done(self, document: Mapping[str, Any]) -> None:
        self.document = document

    def failed(self, error: BaseException) -> None: ...


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _embed_file(tmp_path: Path, texts: list[str], **options: Any) -> pa.Table:
    """What `hfbatch embed in.csv -o out.parquet` writes for `texts`, through the CLI's library call."""
    src = write_csv(tmp_path / "in.csv", rows_for(texts))
    hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "out.parquet", **options))
    return pq.read_table(tmp_path / "out.parquet")


def test_a_list_equals_hfbatch_embed(tmp_path: Path) -> None:
    want = np.array(_embed_file(tmp_path, TEXTS).column("embedding").to_pylist(), dtype=np.float32)
    got = hfbatch.encode(TEXTS, use_cache=False)  # computed here, not read from what embed cached
    assert isinstance(got, np.ndarray) and got.dtype == np.float32 and got.shape == (len(TEXTS), 384)
    assert _cosine(got, want).min() >= 0.99999
    one = hfbatch.encode(TEXTS[1])  # one query: one call, one vector
    assert one.shape == (384,) and _cosine(one[None], want[1:2])[0] >= 0.99999


@pytest.mark.parametrize("options", [
    {"prompt": "query: ", "truncate_dim": 64, "output_precision": "float16"},
    {"output_precision": "int8", "normalize": False},  # ranges from the texts' own first vectors, as embed takes them
    {"split": "tokens:8", "aggregate": "mean"},
], ids=["prompt-truncate-fp16", "int8", "windows-mean"])
def test_options_give_embeds_vectors(tmp_path: Path, options: dict[str, Any]) -> None:
    table = _embed_file(tmp_path, TEXTS, **options)
    got = hfbatch.encode(TEXTS, use_cache=False, **options)
    column = table.column("embedding")
    want = np.array(column.to_pylist(), dtype=column.type.value_type.to_pandas_dtype())
    assert got.dtype == want.dtype and got.shape == want.shape
    if options.get("output_precision") == "int8":
        assert np.abs(got.astype(np.int16) - want.astype(np.int16)).max() <= 1  # one bucket at most
    else:
        assert _cosine(got.astype(np.float32), want.astype(np.float32)).min() >= 0.9999


def test_a_table_gets_embeds_columns_as_the_file_would(tmp_path: Path) -> None:
    texts = TEXTS[:6] + [""] + TEXTS[6:]  # an invalid row is marked, as embed marks it
    written = _embed_file(tmp_path, texts)
    got = hfbatch.encode(pa.Table.from_pylist(rows_for(texts)))
    assert isinstance(got, pa.Table)
    assert got.column_names == written.column_names == ["id", "text", "rating", "embedding", "n_tokens", "truncated",
                                                        "embedding_error"]
    assert got.schema.field("embedding").type == written.schema.field("embedding").type == pa.list_(pa.float32(), 384)
    for name in ("text", "n_tokens", "truncated", "embedding_error"):  # (the CSV reads its ids as text)
        assert got.column(name).to_pylist() == written.column(name).to_pylist(), name
    assert got.column("embedding").to_pylist() == written.column("embedding").to_pylist()  # cached by embed: the same


def test_windows_as_rows_in_a_table_match_embed(tmp_path: Path) -> None:
    texts = ["a short one", "A much longer review that goes on about the kettle, its lid, its handle and the price."]
    written = _embed_file(tmp_path, texts, split="tokens:12")
    got = hfbatch.encode(pa.Table.from_pylist(rows_for(texts)), split="tokens:12")
    assert got.column_names == written.column_names
    for name in ("text", "parent_row", "chunk_index", "n_chunks", "char_start", "char_end", "embedding"):
        assert got.column(name).to_pylist() == written.column(name).to_pylist(), name
    assert got.column("id").to_pylist() == [0, 1, 1, 1]  # each window keeps its row's other columns
    with pytest.raises(InputError, match="aggregate='mean'"):
        hfbatch.encode(texts, split="tokens:12")  # an array cannot hold a row per window in input order


def test_pandas_and_polars_keep_their_columns_index_and_order() -> None:
    vectors = hfbatch.encode(TEXTS)
    frame = pd.DataFrame({"id": range(len(TEXTS)), "body": TEXTS, "n": [1.5] * len(TEXTS)},
                         index=[f"r{i}" for i in range(len(TEXTS))])
    out = hfbatch.encode(frame, text_column="body")
    assert isinstance(out, pd.DataFrame) and list(out.index) == list(frame.index)
    assert list(out.columns) == ["id", "body", "n", "embedding", "n_tokens", "truncated", "embedding_error"]
    assert list(frame.columns) == ["id", "body", "n"]  # the caller's frame is left as it was
    assert out["body"].tolist() == TEXTS and out["id"].tolist() == list(range(len(TEXTS)))
    assert np.array_equal(np.stack(out["embedding"].to_numpy()), vectors)

    polars = pl.DataFrame({"id": list(range(len(TEXTS))), "text": TEXTS})
    got = hfbatch.encode(polars)
    assert isinstance(got, pl.DataFrame) and got.columns == ["id", "text", "embedding", "n_tokens", "truncated",
                                                             "embedding_error"]
    assert got["text"].to_list() == TEXTS and got["id"].to_list() == list(range(len(TEXTS)))
    assert got.schema["embedding"] == pl.Array(pl.Float32, 384)
    assert np.array_equal(got["embedding"].to_numpy(), vectors)
    # a Series is a sequence of texts
    assert np.array_equal(hfbatch.encode(polars["text"]), vectors)
    assert np.array_equal(hfbatch.encode(frame["body"]), vectors)


def test_marked_and_skipped_rows_of_a_dataframe() -> None:
    frame = pd.DataFrame({"id": [1, 2, 3, 4], "text": ["fine", None, "   ", "also fine"]})
    marked = hfbatch.encode(frame)
    assert marked["embedding_error"].tolist()[1:3] == ["null text", "whitespace-only text"]
    assert marked["embedding"].isna().tolist() == [False, True, True, False]
    skipped = hfbatch.encode(frame, on_invalid="skip")
    assert skipped["id"].tolist() == [1, 4] and list(skipped.index) == [0, 3]
    polars = hfbatch.encode(pl.from_pandas(frame), on_invalid="skip")
    assert polars["id"].to_list() == [1, 4]


def test_duplicates_and_order_and_a_warm_second_call_computes_nothing() -> None:
    texts = ["b text", "a text", "b text", "c text", "a text"]
    first, second = Recorder(), Recorder()
    got = hfbatch.encode(texts, observer=first)
    assert first.metrics.texts_computed == 3 and first.metrics.cache_misses == 3  # each distinct text once
    assert np.array_equal(got[0], got[2]) and np.array_equal(got[1], got[4])
    again = hfbatch.encode(texts[::-1], observer=second)
    assert np.array_equal(again, got[::-1])  # rows follow the input's order
    assert second.metrics.texts_computed == 0 and second.metrics.cache_hits == 3
    assert second.metrics.stage_seconds["model_load"] == 0.0
    assert second.document is not None and second.document["provenance"]["fingerprint"].startswith("local:")
    assert second.document["metrics"]["cache"]["hits"] == 3


def test_repeated_calls_reuse_the_loaded_model() -> None:
    hfbatch.encode(["warm up"], use_cache=False)
    seen = Recorder()
    hfbatch.encode(["a text no call has seen"], use_cache=False, observer=seen)
    assert seen.metrics.texts_computed == 1
    assert seen.metrics.stage_seconds["model_load"] == 0.0  # the same backend, its model already loaded


def test_invalid_texts_name_their_index_in_one_line() -> None:
    with pytest.raises(InputError) as caught:
        hfbatch.encode(["fine", "", None, 7])
    message = str(caught.value)
    assert "\n" not in message and message.startswith("texts[1]: empty text") and "(3 invalid in all)" in message
    with pytest.raises(InputError, match=r"^texts\[0\]: not a string \(int\)"):
        hfbatch.encode([7])
    with pytest.raises(InputError, match=r"row 1 \(0-based\) of column 'text': null text"):
        hfbatch.encode(pd.DataFrame({"text": ["ok", None]}), on_invalid="fail")
    marked = hfbatch.encode(["fine", None], on_invalid="mark")
    assert np.isnan(marked[1]).all() and np.isfinite(marked[0]).all()


def test_usage_errors_before_any_work() -> None:
    with pytest.raises(InputError, match="has no column 'text'; columns are: id, body. Pass text_column="):
        hfbatch.encode(pd.DataFrame({"id": [1], "body": ["x"]}))
    with pytest.raises(InputError, match="already has column"):
        hfbatch.encode(pa.table({"text": ["x"], "embedding": [1]}))
    with pytest.raises(InputError, match="on_invalid='skip'"):
        hfbatch.encode(["x"], on_invalid="skip")
    with pytest.raises(InputError, match="--truncate-dim must be at least 1"):
        hfbatch.encode(["x"], truncate_dim=0)
    with pytest.raises(TypeError, match="unknown option"):
        hfbatch.encode(["x"], normalise=False)
    with pytest.raises(TypeError, match="takes a str"):
        hfbatch.encode(b"bytes")


def test_empty_input_gives_an_empty_result() -> None:
    assert hfbatch.encode([]).shape == (0, 384)
    out = hfbatch.encode(pa.table({"text": pa.array([], pa.string())}))
    assert out.num_rows == 0 and out.column_names[-4:] == ["embedding", "n_tokens", "truncated", "embedding_error"]


def test_no_files_but_the_cache(tmp_path: Path) -> None:
    before = set(tmp_path.rglob("*"))
    hfbatch.encode(pd.DataFrame({"text": ["one", "two"]}))
    made = {p for p in set(tmp_path.rglob("*")) - before if p.is_file()}
    assert made and all((tmp_path / "cache") in p.parents for p in made)  # HFBATCH_CACHE_DIR, as embed resolves it
