"""--split tokens:N [--overlap M] [--aggregate mean] end to end with the real bundled model
(all-MiniLM-L6-v2: reads 256 tokens, 384 dimensions), through `hfbatch.embed` and the CLI.

The long document is real English: docstrings of the Python standard library, concatenated until
the model's tokenizer counts at least 10,000 tokens. Every window is checked against the
tokenizer itself (its size, its overlap with the next, its place in the document) and every vector
against sentence-transformers' own `encode` of the window's text."""

from __future__ import annotations

import importlib
import inspect
import os
import random
import socket
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import conftest
from conftest import write_csv, write_jsonl
from hfbatch import EmbedOptions, embed
from hfbatch.backends import windows as windows_module
from hfbatch.backends.windows import token_spans
from hfbatch.cli import app

SIZE, OVERLAP = 256, 32
WINDOW_COLUMNS = ["parent_row", "chunk_index", "n_chunks", "char_start", "char_end"]
EMBED_COLUMNS = ["embedding", "n_tokens", "truncated", "embedding_error"]

# Modules whose docstrings (the module's, then its public functions' and classes') make the prose.
PROSE_MODULES = ("argparse", "collections", "csv", "json", "heapq", "bisect", "difflib", "statistics", "random", "re",
                 "textwrap", "string", "functools", "itertools", "pathlib", "shutil", "tempfile", "unittest", "logging",
                 "subprocess", "os", "typing", "pickle", "threading", "tarfile", "zipfile", "decimal", "fractions",
                 "datetime", "calendar", "contextlib", "dataclasses", "enum", "inspect", "doctest", "optparse",
                 "configparser", "email", "urllib.parse", "http.client")


# --- helpers ---------------------------------------------------------------------------------------

def stdlib_prose(tokenizer: Any, target: int, modules: Sequence[str] = PROSE_MODULES) -> str:
    """Docstrings of the standard library, in a fixed order, until the text has `target` tokens."""
    pieces: list[str] = []
    seen: set[str] = set()
    total = 0
    for name in modules:
        module = importlib.import_module(name)
        members = [obj for key, obj in sorted(vars(module).items())
                   if not key.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj))
                   and getattr(obj, "__module__", None) == module.__name__]
        for doc in [inspect.getdoc(module)] + [inspect.getdoc(obj) for obj in members]:
            if not doc or doc in seen or len(doc) < 80:
                continue
            seen.add(doc)
            pieces.append(doc)
            total += len(tokenizer(doc, add_special_tokens=False, verbose=False)["input_ids"])
            if total >= target:
                text = "\n\n".join(pieces)
                if n_doc_tokens(tokenizer, text) >= target:
                    return text
    raise AssertionError(f"the standard library's docstrings of {modules} have fewer than {target} tokens")


def n_doc_tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def n_model_tokens(tokenizer: Any, text: str, prompt: str = "") -> int:
    """Tokens the model reads for `text`, special tokens (and the prompt put before it) included."""
    return len(tokenizer((prompt + text).strip(), verbose=False)["input_ids"])


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def rows_of(table: pa.Table) -> list[dict[str, Any]]:
    return table.to_pylist()


def windows_of(rows: list[dict[str, Any]], parent: int) -> list[dict[str, Any]]:
    return [r for r in rows if r["parent_row"] == parent]


def check_windows(tokenizer: Any, text: str, windows: list[dict[str, Any]], *, size: int, overlap: int,
                  text_column: str = "text", prompt: str = "") -> None:
    """The window rules for one input row's output rows (in output order), against the tokenizer:
    each window's text is text[char_start:char_end] and the model reads it as n_tokens <= size tokens;
    mapped onto the text's own tokenization, windows are runs of whole tokens from the first to the
    last, consecutive ones sharing exactly `overlap` tokens."""
    assert windows, "a valid row has at least one window"
    n_chunks = len(windows)
    assert [w["chunk_index"] for w in windows] == list(range(n_chunks))
    assert {w["n_chunks"] for w in windows} == {n_chunks}
    for w in windows:
        window_text = w[text_column]
        assert text[w["char_start"]:w["char_end"]] == window_text
        assert n_model_tokens(tokenizer, window_text, prompt) == w["n_tokens"] <= size
        assert w["truncated"] is False and w["embedding_error"] is None and w["embedding"] is not None
    offsets = [tuple(o) for o in tokenizer(text, add_special_tokens=False, return_offsets_mapping=True,
                                           verbose=False)["offset_mapping"]]
    n = len(offsets)
    if n == 0:  # nothing the tokenizer reads: one window, the whole text
        assert n_chunks == 1 and (windows[0]["char_start"], windows[0]["char_end"]) == (0, len(text))
        return
    ranges = []
    for w in windows:
        inside = [i for i, (a, b) in enumerate(offsets) if w["char_start"] <= a and b <= w["char_end"]]
        assert inside, f"window {w['chunk_index']} holds no token of the text"
        assert inside == list(range(inside[0], inside[-1] + 1)), "a window is not a run of consecutive tokens"
        assert w["char_start"] == offsets[inside[0]][0] and w["char_end"] == offsets[inside[-1]][1]
        ranges.append((inside[0], inside[-1] + 1))
    assert ranges[0][0] == 0, "the first window does not start at the first token"
    assert ranges[-1][1] == n, "the last window does not end at the last token"
    assert windows[0]["char_start"] == offsets[0][0] and windows[-1]["char_end"] == offsets[-1][1]
    for (s0, e0), (s1, e1) in zip(ranges, ranges[1:]):
        assert e0 - s1 == overlap, f"windows {(s0, e0)} and {(s1, e1)} share {e0 - s1} tokens, not {overlap}"
        assert s1 > s0 and e1 > e0
    covered = set().union(*(range(s, e) for s, e in ranges))
    assert covered == set(range(n)), "some token falls outside every window"


def check_vectors(st_model: Any, texts: list[str], vectors: list[Any]) -> None:
    got = np.array(vectors, dtype=np.float32)
    want = st_model.encode(texts, convert_to_numpy=True, normalize_embeddings=True, batch_size=32)
    assert got.shape == want.shape == (len(texts), 384)
    assert cosine(got, want).min() >= 0.9999
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-4)


def check_metrics(metrics: dict[str, Any]) -> None:
    assert metrics["rows_written"] + metrics["rows_skipped"] == metrics["rows_total"] + metrics["rows_added"]


def no_output(out: Path) -> bool:
    """Nothing of a job with output `out` was left in its folder: no output, sidecar or temp file."""
    return not [p for p in out.parent.iterdir() if p.name.startswith(out.name)]


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A folder for the module's shared runs, set up as conftest isolates each test (clean env,
    the hub off, no outside network): module fixtures are made before the per-test isolation."""
    root = tmp_path_factory.mktemp("long_texts")
    import huggingface_hub.constants as hub

    with pytest.MonkeyPatch.context() as mp:
        for name in list(os.environ):
            if name.startswith(conftest._PREFIXES):
                mp.delenv(name, raising=False)
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_HOME", str(root / "hf_home"))
        mp.setattr(hub, "HF_HUB_OFFLINE", True)
        mp.setattr(hub, "HF_HUB_CACHE", str(root / "hf_home" / "hub"))
        mp.setenv("HFBATCH_CACHE_DIR", str(root / "cache"))
        mp.setenv("HFBATCH_RUNTIME", "torch")  # as conftest pins every test's
        mp.setenv("HFBATCH_PRECISION", "fp32")
        mp.setenv("TOKENIZERS_PARALLELISM", "false")
        mp.setattr(socket, "getaddrinfo", conftest._local_only_getaddrinfo)
        mp.chdir(root)
        yield root


@pytest.fixture(scope="module")
def tok(st_model: Any) -> Any:
    return st_model.tokenizer


@pytest.fixture(scope="module")
def long_doc(tok: Any) -> str:
    doc = stdlib_prose(tok, 10_000)
    assert 10_000 <= n_doc_tokens(tok, doc) < 12_000
    return doc


SHORTS = ["The kettle boils fast and the handle stays cool.", "  padded short text, spaces around it \n"]


@pytest.fixture(scope="module")
def doc_rows(long_doc: str) -> list[dict[str, Any]]:
    return [{"id": 0, "text": SHORTS[0], "kind": "short"}, {"id": 1, "text": long_doc, "kind": "long"},
            {"id": 2, "text": SHORTS[1], "kind": "short"}]


@pytest.fixture(scope="module")
def split_run(module_dir: Path, doc_rows: list[dict[str, Any]]) -> Any:
    src = write_jsonl(module_dir / "doc.jsonl", doc_rows)
    return embed(EmbedOptions(input=src, output=module_dir / "split.parquet", split=f"tokens:{SIZE}", overlap=OVERLAP,
                              cache_dir=module_dir / "cache"))


@pytest.fixture(scope="module")
def mean_run(module_dir: Path, split_run: Any) -> Any:
    """The same input with --aggregate mean, after the split run and on its cache."""
    return embed(EmbedOptions(input=module_dir / "doc.jsonl", output=module_dir / "mean.parquet", split=f"tokens:{SIZE}",
                              overlap=OVERLAP, aggregate="mean", cache_dir=module_dir / "cache"))


def cli(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


# --- the ~10,000-token document ----------------------------------------------------------------------

def test_split_output_schema_and_rows(split_run: Any, doc_rows: list[dict[str, Any]]) -> None:
    table = pq.read_table(split_run.output)
    assert table.column_names == ["id", "text", "kind", *WINDOW_COLUMNS, *EMBED_COLUMNS]
    schema = table.schema
    assert schema.field("parent_row").type == pa.int64()
    assert schema.field("chunk_index").type == pa.int32() and schema.field("n_chunks").type == pa.int32()
    assert schema.field("char_start").type == pa.int64() and schema.field("char_end").type == pa.int64()
    assert schema.field("embedding").type == pa.list_(pa.float32(), 384)
    rows = rows_of(table)
    parents = [r["parent_row"] for r in rows]
    assert parents == sorted(parents) and set(parents) == {0, 1, 2}  # input order, every row
    for r in rows:  # the input's other columns ride along with each window
        assert (r["id"], r["kind"]) == (doc_rows[r["parent_row"]]["id"], doc_rows[r["parent_row"]]["kind"])
    n_long = len(windows_of(rows, 1))
    assert n_long >= 10_000 // (SIZE - 2)  # at least tokens / window content
    assert table.num_rows == n_long + 2


def test_every_window_obeys_the_rules_of_the_tokenizer(split_run: Any, long_doc: str, tok: Any) -> None:
    rows = rows_of(pq.read_table(split_run.output))
    check_windows(tok, long_doc, windows_of(rows, 1), size=SIZE, overlap=OVERLAP)


def test_windows_are_as_long_as_the_window_allows(split_run: Any, long_doc: str, tok: Any) -> None:
    """Not a window of a few tokens each: every window but the last reads close to N tokens."""
    windows = windows_of(rows_of(pq.read_table(split_run.output)), 1)
    assert all(w["n_tokens"] >= SIZE - 8 for w in windows[:-1])
    n, content = n_doc_tokens(tok, long_doc), SIZE - 2  # the model adds [CLS] and [SEP]
    assert len(token_spans(n, content, OVERLAP)) <= len(windows) <= len(token_spans(n, content - 8, OVERLAP))


def test_window_vectors_equal_sentence_transformers_encode_of_the_window_text(split_run: Any, st_model: Any) -> None:
    rows = rows_of(pq.read_table(split_run.output))
    check_vectors(st_model, [r["text"] for r in rows], [r["embedding"] for r in rows])


def test_short_texts_are_one_window_of_their_stripped_text(split_run: Any, tok: Any) -> None:
    rows = rows_of(pq.read_table(split_run.output))
    for parent, original in ((0, SHORTS[0]), (2, SHORTS[1])):
        [w] = windows_of(rows, parent)
        stripped = original.strip()
        assert w["text"] == stripped == original[w["char_start"]:w["char_end"]]
        assert (w["chunk_index"], w["n_chunks"]) == (0, 1)
        assert w["n_tokens"] == n_model_tokens(tok, stripped) and w["truncated"] is False
        check_windows(tok, original, [w], size=SIZE, overlap=OVERLAP)


def test_split_sidecar_metrics_and_provenance(split_run: Any) -> None:
    table = pq.read_table(split_run.output)
    m = split_run.document["metrics"]
    n_long = len(windows_of(rows_of(table), 1))
    assert m["rows_total"] == 3 and m["rows_written"] == table.num_rows
    assert m["rows_added"] == n_long - 1
    assert m["rows_written"] == m["rows_total"] + m["rows_added"]
    assert m["windows"] == table.num_rows
    assert m["rows_truncated"] == 0 and m["rows_invalid"] == 0
    assert m["texts_computed"] == len(set(table.column("text").to_pylist()))
    assert split_run.document["provenance"]["split"] == {"tokens": SIZE, "overlap": OVERLAP, "aggregate": None}
    check_metrics(m)


def test_aggregate_mean_is_the_renormalised_mean_of_the_windows(split_run: Any, mean_run: Any, doc_rows: list[dict[str, Any]],
                                                                 tok: Any) -> None:
    split_rows = rows_of(pq.read_table(split_run.output))
    table = pq.read_table(mean_run.output)
    assert table.column_names == ["id", "text", "kind", "n_chunks", *EMBED_COLUMNS]
    rows = rows_of(table)
    assert [r["id"] for r in rows] == [0, 1, 2]  # one row per input row, input order
    assert [r["text"] for r in rows] == [r["text"] for r in doc_rows]  # the whole text, not a window
    for i, row in enumerate(rows):
        windows = windows_of(split_rows, i)
        assert row["n_chunks"] == len(windows)
        mean = np.mean(np.array([w["embedding"] for w in windows], dtype=np.float64), axis=0)
        want = mean / np.linalg.norm(mean)
        got = np.array(row["embedding"], dtype=np.float64)
        assert cosine(got, want) >= 0.99999
        assert abs(np.linalg.norm(got) - 1) < 1e-4
        assert row["n_tokens"] == n_model_tokens(tok, doc_rows[i]["text"])  # the whole text's tokens
        assert row["truncated"] is False and row["embedding_error"] is None
    assert rows[1]["n_tokens"] > 10_000
    m = mean_run.document["metrics"]
    assert m["rows_written"] == 3 and m["rows_added"] == 0 and m["windows"] == len(split_rows)
    assert m["texts_computed"] == 0  # every window was in the cache from the split run
    assert mean_run.document["provenance"]["split"] == {"tokens": SIZE, "overlap": OVERLAP, "aggregate": "mean"}
    check_metrics(m)


def test_a_rerun_computes_nothing_and_writes_the_same(split_run: Any, module_dir: Path) -> None:
    again = embed(EmbedOptions(input=module_dir / "doc.jsonl", output=module_dir / "again.parquet", split=f"tokens:{SIZE}",
                               overlap=OVERLAP, cache_dir=module_dir / "cache"))
    m = again.document["metrics"]
    assert m["texts_computed"] == 0 and m["cache"]["misses"] == 0 and m["cache"]["hits"] == m["texts_unique"] > 0
    first, second = pq.read_table(split_run.output), pq.read_table(again.output)
    assert first.drop(["embedding"]).equals(second.drop(["embedding"]))
    assert np.allclose(np.array(first.column("embedding").to_pylist()), np.array(second.column("embedding").to_pylist()))


# --- each window is cached on its own --------------------------------------------------------------

@pytest.fixture(scope="module")
def shared_docs(tok: Any) -> tuple[str, str]:
    """Two documents that begin with the same long passage (~1,200 tokens) and go on differently."""
    passage = stdlib_prose(tok, 1_200, ("argparse", "csv", "collections"))
    tail_a = stdlib_prose(tok, 300, ("heapq", "bisect"))
    tail_b = stdlib_prose(tok, 300, ("difflib", "textwrap"))
    assert tail_a[:200] != tail_b[:200]
    return passage + "\n\n" + tail_a, passage + "\n\n" + tail_b


def test_a_passage_shared_by_two_documents_is_embedded_once(tmp_path: Path, shared_docs: tuple[str, str],
                                                             tok: Any) -> None:
    doc_a, doc_b = shared_docs
    opts = dict(split=f"tokens:{SIZE}", overlap=OVERLAP, cache_dir=tmp_path / "cache")
    a = embed(EmbedOptions(input=write_jsonl(tmp_path / "a.jsonl", [{"text": doc_a}]), output=tmp_path / "a.parquet", **opts))
    b = embed(EmbedOptions(input=write_jsonl(tmp_path / "b.jsonl", [{"text": doc_b}]), output=tmp_path / "b.parquet", **opts))
    windows_a = pq.read_table(a.output).column("text").to_pylist()
    windows_b = pq.read_table(b.output).column("text").to_pylist()
    check_windows(tok, doc_b, rows_of(pq.read_table(b.output)), size=SIZE, overlap=OVERLAP)
    shared = [w for w in windows_b if w in set(windows_a)]
    assert len(shared) >= 4  # ~1,200 shared tokens hold 4 whole windows of 254 moving on by 222
    mb = b.document["metrics"]
    assert mb["cache"]["hits"] == len(shared)
    assert mb["texts_computed"] == len(windows_b) - len(shared)

    # both in one input, a fresh cache: each distinct window once; then a rerun computes nothing
    both = write_jsonl(tmp_path / "both.jsonl", [{"text": doc_a}, {"text": doc_b}])
    opts["cache_dir"] = tmp_path / "cache2"
    first = embed(EmbedOptions(input=both, output=tmp_path / "both.parquet", **opts))
    m = first.document["metrics"]
    assert m["windows"] == len(windows_a) + len(windows_b)
    assert m["texts_computed"] == len(set(windows_a) | set(windows_b)) == m["windows"] - len(shared)
    rerun = embed(EmbedOptions(input=both, output=tmp_path / "both2.parquet", **opts))
    assert rerun.document["metrics"]["texts_computed"] == 0 and rerun.document["metrics"]["cache"]["misses"] == 0


# --- invalid rows ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def medium_doc(tok: Any) -> str:
    """About 600 tokens: three windows of 256."""
    return stdlib_prose(tok, 600, ("heapq", "bisect", "statistics"))


def invalid_rows(medium_doc: str) -> list[dict[str, Any]]:
    return [{"id": 0, "text": "first, fine"}, {"id": 1, "text": None}, {"id": 2, "text": medium_doc},
            {"id": 3, "text": ""}, {"id": 4, "text": "   "}, {"id": 5, "text": "last, fine"}]


def test_invalid_rows_keep_one_marked_row_each_in_place(tmp_path: Path, medium_doc: str, tok: Any) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", invalid_rows(medium_doc))
    result = embed(EmbedOptions(input=src, output=tmp_path / "out.parquet", split=f"tokens:{SIZE}", overlap=OVERLAP,
                                chunk_size=2))  # windows of row 2 and the invalid rows fall in different chunks
    rows = rows_of(pq.read_table(result.output))
    n_medium = len(windows_of(rows, 2))
    assert n_medium >= 2
    assert [r["parent_row"] for r in rows] == [0, 1] + [2] * n_medium + [3, 4, 5]
    assert [r["id"] for r in rows] == [r["parent_row"] for r in rows]
    for r in rows:
        if r["id"] in (1, 3, 4):
            assert r["chunk_index"] is None and r["char_start"] is None and r["char_end"] is None
            assert r["n_chunks"] == 0 and r["embedding"] is None and r["embedding_error"]
            assert r["text"] == {1: None, 3: "", 4: "   "}[r["id"]]  # the input's own value, not a window
        else:
            assert r["embedding_error"] is None and r["embedding"] is not None
    errors = {r["id"]: r["embedding_error"] for r in rows if r["embedding_error"]}
    assert errors == {1: "null text", 3: "empty text", 4: "whitespace-only text"}
    check_windows(tok, medium_doc, windows_of(rows, 2), size=SIZE, overlap=OVERLAP)
    m = result.document["metrics"]
    assert m["rows_invalid"] == 3 and m["rows_total"] == 6 and m["rows_written"] == len(rows)
    assert m["rows_written"] == m["rows_total"] + m["rows_added"]


def test_invalid_rows_with_aggregate_mean(tmp_path: Path, medium_doc: str) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", invalid_rows(medium_doc))
    result = embed(EmbedOptions(input=src, output=tmp_path / "out.parquet", split=f"tokens:{SIZE}", overlap=OVERLAP,
                                aggregate="mean", chunk_size=2))
    rows = rows_of(pq.read_table(result.output))
    assert [r["id"] for r in rows] == [0, 1, 2, 3, 4, 5]
    assert [r["embedding"] is None for r in rows] == [False, True, False, True, True, False]
    assert [r["n_chunks"] for r in rows][:2] == [1, 0] and rows[2]["n_chunks"] >= 2
    assert [r["n_chunks"] for r in rows][3:] == [0, 0, 1]
    assert [bool(r["embedding_error"]) for r in rows] == [False, True, False, True, True, False]
    check_metrics(result.document["metrics"])


@pytest.mark.parametrize("aggregate", [None, "mean"])
def test_on_invalid_skip_drops_invalid_rows(tmp_path: Path, medium_doc: str, aggregate: str | None) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", invalid_rows(medium_doc))
    result = embed(EmbedOptions(input=src, output=tmp_path / "out.parquet", split=f"tokens:{SIZE}", overlap=OVERLAP,
                                aggregate=aggregate, on_invalid="skip", chunk_size=2))
    rows = rows_of(pq.read_table(result.output))
    assert all(r["embedding_error"] is None and r["embedding"] is not None for r in rows)
    if aggregate is None:
        n_medium = sum(r["id"] == 2 for r in rows)
        # parent_row stays the input row's index, not its place among the rows kept
        assert [r["parent_row"] for r in rows] == [0] + [2] * n_medium + [5]
        assert [r["id"] for r in rows] == [r["parent_row"] for r in rows]
    else:
        assert [r["id"] for r in rows] == [0, 2, 5]
    m = result.document["metrics"]
    assert m["rows_skipped"] == 3
    check_metrics(m)


def test_cli_marks_invalid_rows_with_exit_3(tmp_path: Path, medium_doc: str) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", invalid_rows(medium_doc))
    for extra in ([], ["--aggregate", "mean"]):
        out = tmp_path / f"out{len(extra)}.parquet"
        result = cli("embed", str(src), "-o", str(out), "--split", f"tokens:{SIZE}", "--overlap", str(OVERLAP), "-q", *extra)
        assert result.exit_code == 3, result.output
        table = pq.read_table(out)
        assert table.column("embedding_error").to_pylist().count(None) == table.num_rows - 3


def test_cli_split_writes_the_windows(tmp_path: Path, medium_doc: str, tok: Any) -> None:
    src = write_csv(tmp_path / "in.csv", [{"id": "a", "text": medium_doc}, {"id": "b", "text": "short"}])
    out = tmp_path / "out.parquet"
    result = cli("embed", str(src), "-o", str(out), "--split", "tokens:128", "--overlap", "16", "-q")
    assert result.exit_code == 0, result.output
    rows = rows_of(pq.read_table(out))
    check_windows(tok, medium_doc, windows_of(rows, 0), size=128, overlap=16)
    assert len(windows_of(rows, 0)) >= 4 and [r["text"] for r in windows_of(rows, 1)] == ["short"]


def test_default_overlap_is_an_eighth_of_the_window(tmp_path: Path, medium_doc: str, tok: Any) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": medium_doc}])
    result = embed(EmbedOptions(input=src, output=tmp_path / "out.parquet", split="tokens:96"))
    assert result.document["provenance"]["split"] == {"tokens": 96, "overlap": 12, "aggregate": None}
    check_windows(tok, medium_doc, rows_of(pq.read_table(result.output)), size=96, overlap=12)


def test_a_prompt_counts_in_every_window(tmp_path: Path, medium_doc: str, tok: Any, st_model: Any) -> None:
    """With --prompt the model reads the prompt before each window: N counts it too."""
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": medium_doc}])
    result = embed(EmbedOptions(input=src, output=tmp_path / "out.parquet", split="tokens:64", overlap=8, prompt="query: "))
    rows = rows_of(pq.read_table(result.output))
    check_windows(tok, medium_doc, rows, size=64, overlap=8, prompt="query: ")
    assert all(60 <= r["n_tokens"] <= 64 for r in rows[:-1])  # 2 specials + 2 prompt tokens + up to 60 of the text
    got = np.array([r["embedding"] for r in rows], dtype=np.float32)
    want = st_model.encode([r["text"] for r in rows], prompt="query: ", normalize_embeddings=True)
    assert cosine(got, want).min() >= 0.9999


# --- hostile flags: exit 2, nothing written ----------------------------------------------------------

@pytest.mark.parametrize("flags, names", [
    (["--split", "tokens:1024"], ["1024", "256"]),
    (["--split", "tokens:64", "--overlap", "64"], ["--overlap", "64"]),
    (["--split", "tokens:64", "--overlap", "100"], ["--overlap", "100"]),
    (["--split", "tokens:64", "--overlap", "-1"], ["--overlap", "-1"]),
    (["--overlap", "8"], ["--overlap", "--split"]),
    (["--aggregate", "mean"], ["--aggregate", "--split"]),
    (["--split", "tokens:abc"], ["tokens:abc"]),
    (["--split", "tokens:"], ["--split"]),
    (["--split", "words:64"], ["words:64"]),
    (["--split", "tokens:1"], ["tokens:1"]),
    (["--split", "tokens:64", "--aggregate", "max"], ["--aggregate", "max"]),
    # 34 tokens less the model's 2 specials leave 32: no more than the overlap
    (["--split", "tokens:34", "--overlap", "32"], ["tokens:34", "--overlap 32", "at least 35"]),
])
def test_bad_split_flags_exit_2_and_write_nothing(tmp_path: Path, flags: list[str], names: list[str]) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "word " * 400}, {"text": "short"}])
    out = tmp_path / "out" / "o.parquet"
    out.parent.mkdir()
    result = cli("embed", str(src), "-o", str(out), *flags)
    assert result.exit_code == 2, result.output
    error_lines = [line for line in result.output.splitlines() if "Error" in line]
    assert len(error_lines) == 1, result.output
    for name in names:
        assert name in error_lines[0], (name, error_lines[0])
    assert no_output(out)


@pytest.mark.parametrize("column, flags", [
    ("parent_row", ["--split", "tokens:64"]),
    ("char_start", ["--split", "tokens:64"]),
    ("n_chunks", ["--split", "tokens:64", "--aggregate", "mean"]),
])
def test_an_input_column_named_like_a_window_column_clashes(tmp_path: Path, column: str, flags: list[str]) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [{column: 7, "text": "hello there"}])
    out = tmp_path / "out" / "o.parquet"
    out.parent.mkdir()
    result = cli("embed", str(src), "-o", str(out), *flags)
    assert result.exit_code == 2, result.output
    assert column in result.output and "already has" in result.output
    assert no_output(out)


def test_aggregate_mean_leaves_the_per_window_column_names_free(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [{"parent_row": 7, "chunk_index": 1, "text": "hello there"}])
    out = tmp_path / "o.parquet"
    result = cli("embed", str(src), "-o", str(out), "-q", "--split", "tokens:64", "--aggregate", "mean")
    assert result.exit_code == 0, result.output  # --aggregate mean adds only n_chunks
    assert pq.read_table(out).column_names[:4] == ["parent_row", "chunk_index", "text", "n_chunks"]


# --- hostile texts -----------------------------------------------------------------------------------

def pseudo_words(n: int) -> str:
    """Words no vocabulary has (consonant runs): many word pieces each, so a window that starts
    inside a word is read as more tokens than its span had (the case fit_windows must refit)."""
    rnd = random.Random(13)
    letters = "bcdfghjklmnpqrstvwxz"
    return " ".join("".join(rnd.choice(letters) for _ in range(rnd.randint(6, 14))) for _ in range(n))


HOSTILE = {
    "zero-width only": "\u200b\u200b\u200b",
    "control chars only": "\x01\x02\x03\x07",
    "zero-width around a word": "\u200b\u200bword\u200b\u200b",
    "emoji word": "😀" * 600,
    "emoji words": "🚀🔥 " * 100 + "done 👍",
    "combining marks": "cafe\u0301 nai\u0308ve " * 60,
    "lone combining marks": "\u0301\u0308 " * 50 + "end",
    "cjk 5000 chars, no space": ("中文字符测试你好" * 625),
    "5000-char word": "a" * 5000,
    "5000-char word then words": "x" * 5000 + " and then some ordinary words follow it",
    "mixed scripts": "مرحبا بالعالم Привет мир שלום 🌍 नमस्ते दुनिया " * 12,
    "pseudo words": pseudo_words(250),
}


@pytest.fixture(scope="module")
def hostile_run(module_dir: Path) -> tuple[Any, int]:
    """The hostile texts, split into windows of 64 tokens sharing 8; `refits`: how often the
    tokenizer read a planned window as too long (fit_windows moved its end back)."""
    src = write_jsonl(module_dir / "hostile.jsonl", [{"name": k, "text": v} for k, v in HOSTILE.items()])
    refits = []
    real = windows_module._refit

    def spy(*args: Any, **kwargs: Any) -> Any:
        refits.append(1)
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(windows_module, "_refit", spy)
        result = embed(EmbedOptions(input=src, output=module_dir / "hostile.parquet", split="tokens:64", overlap=8,
                                    cache_dir=module_dir / "cache"))
    return result, len(refits)


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_texts_obey_the_window_rules(hostile_run: tuple[Any, int], name: str, tok: Any) -> None:
    result, _ = hostile_run
    rows = rows_of(pq.read_table(result.output))
    parent = list(HOSTILE).index(name)
    windows = windows_of(rows, parent)
    assert all(w["name"] == name for w in windows)
    check_windows(tok, HOSTILE[name], windows, size=64, overlap=8)


def test_hostile_texts_are_embedded_faithfully(hostile_run: tuple[Any, int], st_model: Any) -> None:
    result, refits = hostile_run
    rows = rows_of(pq.read_table(result.output))
    assert [r["parent_row"] for r in rows] == sorted(r["parent_row"] for r in rows)
    assert {r["parent_row"] for r in rows} == set(range(len(HOSTILE)))
    assert result.document["metrics"]["rows_invalid"] == 0
    check_vectors(st_model, [r["text"] for r in rows], [r["embedding"] for r in rows])
    assert refits >= 1  # the pseudo words made the tokenizer read some planned window as too long
    check_metrics(result.document["metrics"])


def test_the_5000_char_cjk_run_is_cut_into_many_windows(hostile_run: tuple[Any, int]) -> None:
    result, _ = hostile_run
    rows = rows_of(pq.read_table(result.output))
    windows = windows_of(rows, list(HOSTILE).index("cjk 5000 chars, no space"))
    assert len(windows) == len(token_spans(5000, 62, 8)) == 93  # one token a character: 62 a window, moving on by 54
    assert all(w["n_tokens"] == 64 for w in windows[:-1])


# --- input formats: the text column keeps its Arrow type ----------------------------------------------

@pytest.mark.parametrize("arrow_type", [
    pa.string(),
    pa.large_string(),
    pa.dictionary(pa.int32(), pa.string()),
    pa.string_view(),  # no take kernel in pyarrow: the core takes it as large_string and casts back
])
def test_parquet_input_keeps_the_text_columns_arrow_type(tmp_path: Path, medium_doc: str, tok: Any,
                                                         arrow_type: pa.DataType) -> None:
    texts = [medium_doc, "a short body", medium_doc]
    if pa.types.is_dictionary(arrow_type):
        body = pa.array(texts).dictionary_encode()
    else:
        body = pa.array(texts, type=arrow_type)
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"title": ["t0", "t1", "t2"], "body": body}), src)
    result = embed(EmbedOptions(input=src, output=tmp_path / "out.parquet", split="tokens:128", overlap=16,
                                text_column="body"))
    table = pq.read_table(result.output)
    assert table.schema.field("body").type == pq.read_table(src).schema.field("body").type
    assert table.column_names == ["title", "body", *WINDOW_COLUMNS, *EMBED_COLUMNS]
    rows = rows_of(table)
    for parent in range(3):
        windows = windows_of(rows, parent)
        assert {w["title"] for w in windows} == {f"t{parent}"}
        check_windows(tok, texts[parent], windows, size=128, overlap=16, text_column="body")
    # the same document twice: its windows were computed once
    assert result.document["metrics"]["texts_computed"] == len(windows_of(rows, 0)) + 1


def test_csv_input_keeps_the_text_columns_type(tmp_path: Path, medium_doc: str, tok: Any) -> None:
    src = write_csv(tmp_path / "in.csv", [{"id": 1, "text": medium_doc, "note": "x"}, {"id": 2, "text": "tiny", "note": "y"}])
    plain = embed(EmbedOptions(input=src, output=tmp_path / "plain.parquet"))
    split = embed(EmbedOptions(input=src, output=tmp_path / "split.parquet", split="tokens:128", overlap=16))
    plain_t, split_t = pq.read_table(plain.output), pq.read_table(split.output)
    assert split_t.schema.field("text").type == plain_t.schema.field("text").type
    assert split_t.schema.field("id").type == plain_t.schema.field("id").type
    rows = rows_of(split_t)
    check_windows(tok, medium_doc, windows_of(rows, 0), size=128, overlap=16)
    assert [(r["id"], r["note"], r["text"]) for r in windows_of(rows, 1)] == [("2", "y", "tiny")]  # CSV columns are read as text
    # the text that was truncated without --split is read whole with it
    assert plain_t.column("truncated").to_pylist() == [True, False]
    assert not any(split_t.column("truncated").to_pylist())
