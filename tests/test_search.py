"""`hfbatch search TARGET "query"` (hfbatch/tools/search.py): for every target kind the top hits
are brute force's over the vectors read back from the target with its own library, the query
embedded as the rows were (the model's query prompt for rows embedded with its document prompt),
in the rows' stored precision; and hostile targets get one line, exit 2."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import conftest
from conftest import BUNDLED_MODEL_DIR, write_csv
from hfbatch.cli import app
from hfbatch.io.writers import read_metadata

pytestmark = pytest.mark.timeout(300)

SUBJECTS = ["The kettle", "My old laptop", "This garden hose", "The night bus", "A paper map", "The espresso machine",
            "Her violin", "The hiking boot", "Our cat", "The solar panel", "A wool sweater", "The city library"]
STATES = ["broke after a week", "works perfectly in winter", "smells of smoke", "is far too loud at night",
          "was cheaper than expected", "arrived two days late", "keeps the water warm for hours",
          "needs a new battery", "made the whole family happy", "leaks when it rains", "is hard to find in shops",
          "glows softly in the dark"]
LONG = "The copper kettle whistles " + "and whistles, louder and louder, " * 8 + "until someone comes."
TEXTS = [f"{s} {v}." for s in SUBJECTS for v in STATES] + [LONG]  # 144 distinct short texts, one long
QUERIES = ["hot drinks in the morning", "noisy at night", "a pet animal"]
PROMPTS = {"query": "query: ", "document": "passage: "}


def cli(*args: str) -> Any:
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Every target searched here, embedded once (one cache: the texts are computed once per
    prompt), set up as conftest isolates each test: module fixtures are made before it."""
    root = tmp_path_factory.mktemp("search")
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
        mp.setenv("HFBATCH_RUNTIME", "torch")
        mp.setenv("HFBATCH_PRECISION", "fp32")
        mp.setenv("TOKENIZERS_PARALLELISM", "false")
        # one row without a vector (an empty text: marked invalid), which search skips
        rows = [{"id": f"r{i:03d}", "text": t, "n": i} for i, t in enumerate(TEXTS)]
        rows.insert(40, {"id": "empty", "text": "", "n": -1})
        src = write_csv(root / "in.csv", rows)
        model = root / "minilm-with-prompts"
        shutil.copytree(BUNDLED_MODEL_DIR, model)
        config = json.loads((model / "config_sentence_transformers.json").read_text())
        (model / "config_sentence_transformers.json").write_text(json.dumps({**config, "prompts": PROMPTS}))
        runs = {
            "parquet": [src, "-o", root / "out.parquet"],
            "lance": [src, "--id-column", "id", "-o", root / "x.lance"],
            "lance-indexed": [src, "--id-column", "id", "--index", "-o", root / "xi.lance"],
            "delta": [src, "--id-column", "id", "-o", f"delta://{root / 'd'}"],
            "int8": [src, "--output-precision", "int8", "-o", root / "int8.parquet"],
            "binary": [src, "--output-precision", "binary", "-o", root / "binary.parquet"],
            "ubinary-delta": [src, "--output-precision", "ubinary", "--id-column", "id", "-o", f"delta://{root / 'ub'}"],
            "float16-128": [src, "--output-precision", "float16", "--truncate-dim", "128", "-o", root / "f16.parquet"],
            "document": [src, "--model", model, "--prompt-name", "document", "-o", root / "doc.parquet"],
            "passage-text": [src, "--model", model, "--prompt", "passage: ", "-o", root / "passage.parquet"],
        }
        for name, args in runs.items():
            result = cli("embed", *args, "-q")
            assert result.exit_code == 3, (name, result.output)  # the one empty text, marked
        yield {"root": root, "model": model, "targets": {name: args[-1] for name, args in runs.items()}}


@pytest.fixture
def env_of(built: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.setenv("HFBATCH_CACHE_DIR", str(built["root"] / "cache"))
    return built


def search_json(target: Any, query: str, *args: str) -> dict[str, Any]:
    result = cli("search", target, query, "--json", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# --- brute force over what the target's own library reads back ------------------------------------

def read_back(kind: str, target: Any) -> tuple[list[Any], list[Any]]:
    """(ids, stored vectors or None) of every row, read with the target's own library."""
    if kind == "lance":
        import lance

        table = lance.dataset(str(target)).to_table()
    elif kind.endswith("delta") or kind == "delta":
        import deltalake

        table = deltalake.DeltaTable(str(target)[len("delta://"):]).to_pyarrow_table()
    else:
        table = pq.read_table(target)
    return table.column("id").to_pylist(), table.column("embedding").to_pylist()


def brute_force(ids: list[Any], stored: list[Any], scores_of: Any, k: int = 10) -> tuple[list[Any], np.ndarray]:
    keep = [i for i, v in enumerate(stored) if v is not None]
    scores = scores_of(np.array([stored[i] for i in keep]))
    order = np.lexsort((np.arange(len(keep)), -scores.round(10)))[:k]  # equal scores: row order
    return [ids[keep[i]] for i in order], scores[order]


def cosine_scores(query: np.ndarray) -> Any:
    def score(vectors: np.ndarray) -> np.ndarray:
        vectors = vectors.astype(np.float64)
        return vectors @ query / (np.linalg.norm(vectors, axis=1) * np.linalg.norm(query))
    return score


def st_query(st_model: Any, query: str, *, prompt: str | None = None, dim: int | None = None) -> np.ndarray:
    vector = st_model.encode([query], normalize_embeddings=True, prompt=prompt)[0].astype(np.float64)
    if dim is not None:
        vector = vector[:dim] / np.linalg.norm(vector[:dim])
    return vector


def assert_same_hits(report: dict[str, Any], ids: list[Any], scores: np.ndarray) -> None:
    got = [hit["id"] for hit in report["hits"]]
    got_scores = np.array([hit["score"] for hit in report["hits"]])
    assert len(got) == len(ids)
    np.testing.assert_allclose(got_scores, scores, atol=1e-5)
    # the same rows in the same order (but where brute force has a tie within 1e-6 at that rank)
    for rank, (a, b) in enumerate(zip(got, ids)):
        assert a == b or np.isclose(scores, scores[rank], atol=1e-6).sum() > 1, (rank, got, ids)


@pytest.mark.parametrize("kind, args", [("parquet", ()), ("lance", ()), ("lance", ("--exact",)), ("lance-indexed", ()),
                                        ("delta", ())])
def test_float_targets_give_brute_force_top_10(env_of: dict[str, Any], st_model: Any, kind: str,
                                               args: tuple[str, ...]) -> None:
    """Each target's search (Lance's own, flat or through its --index; hfbatch's exact scan for the
    others, or for Lance with --exact) gives brute force's top 10."""
    target = env_of["targets"][kind]
    if kind == "lance-indexed":
        import lance

        assert lance.dataset(str(target)).describe_indices(), "--index built no index"
    kind = kind.removesuffix("-indexed")
    ids, stored = read_back(kind, target)
    for query in QUERIES:
        report = search_json(target, query, *args)
        assert report["strategy"] == ("lance" if kind == "lance" and not args else "exact scan")
        assert report["kind"] == kind and report["k"] == 10 and report["metric"] == "cosine"
        assert report["rows_searched"] == len(TEXTS) and report["rows_skipped"] == 1  # the empty text's row
        assert report["prompt"] is None and "note" not in report
        want_ids, want_scores = brute_force(ids, stored, cosine_scores(st_query(st_model, query)))
        assert_same_hits(report, want_ids, want_scores)
        assert set(report["hits"][0]) >= {"rank", "score", "id", "text", "n"}
        assert not set(report["hits"][0]) & {"embedding", "n_tokens", "truncated", "embedding_error", "_hfbatch_hash"}
        assert list(report["hits"][0])[:3] == ["rank", "score", "id"]


def test_table_output_cuts_long_values_and_k(env_of: dict[str, Any]) -> None:
    result = CliRunner().invoke(app, ["search", str(env_of["targets"]["lance"]), "the copper kettle whistles louder and louder", "-k", "3"],
                                env={"COLUMNS": "240"})
    assert result.exit_code == 0, result.output
    assert "query prompt: none (as the rows)" in result.stderr and "rows searched" in result.stderr
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert "rank" in lines[0] and "score" in lines[0] and "id" in lines[0] and "text" in lines[0]
    assert len(lines) == 2 + 3  # header, rule, three hits
    assert "r144" in lines[2] and "The copper kettle whistles" in lines[2] and "…" in lines[2]  # the long text, cut
    assert LONG not in result.stdout and all(len(line) < 160 for line in lines)


def dequantized(precision: str, ranges: Any) -> Any:
    bounds = np.asarray(ranges, dtype=np.float64)
    def back(codes: np.ndarray) -> np.ndarray:
        buckets = codes.astype(np.float64) + (128 if precision == "int8" else 0)
        return bounds[0] + (buckets + 0.5) * (bounds[1] - bounds[0]) / 255
    return back


def test_int8_target_gives_brute_force_top_10_over_dequantized_vectors(env_of: dict[str, Any], st_model: Any) -> None:
    target = env_of["targets"]["int8"]
    ids, stored = read_back("int8", target)
    ranges = read_metadata(target)["provenance"]["vectors"]["ranges"]
    back = dequantized("int8", ranges)
    for query in QUERIES:
        report = search_json(target, query)
        assert report["precision"] == "int8"
        asked = cosine_scores(st_query(st_model, query))
        want = brute_force(ids, stored, lambda codes, asked=asked: asked(back(codes)))
        assert_same_hits(report, *want)


@pytest.mark.parametrize("kind", ["binary", "ubinary-delta"])
def test_binary_targets_give_brute_force_top_10_over_sign_bits(env_of: dict[str, Any], st_model: Any, kind: str) -> None:
    target = env_of["targets"][kind]
    ids, stored = read_back(kind, target)
    offset = 128 if kind == "binary" else 0  # binary = packed - 128 (int8); ubinary: the packed bytes
    for query in QUERIES:
        signs = np.where(st_query(st_model, query) > 0, 1, 0)

        def score(codes: np.ndarray, signs: np.ndarray = signs) -> np.ndarray:
            bits = np.unpackbits((codes.astype(np.int16) + offset).astype(np.uint8), axis=1)[:, :384]
            return 1 - 2 * (bits != signs).sum(axis=1) / 384  # 1 - 2 hamming / dim

        report = search_json(target, query)
        assert report["precision"] == ("binary" if kind == "binary" else "ubinary")
        assert report["metric"].startswith("hamming")
        assert_same_hits(report, *brute_force(ids, stored, score))


def test_float16_truncated_target_embeds_the_query_truncated(env_of: dict[str, Any], st_model: Any) -> None:
    target = env_of["targets"]["float16-128"]
    ids, stored = read_back("parquet", target)
    assert len(stored[0]) == 128
    report = search_json(target, QUERIES[1])
    assert_same_hits(report, *brute_force(ids, stored, cosine_scores(st_query(st_model, QUERIES[1], dim=128))))


# --- the query's prompt -------------------------------------------------------------------------

@pytest.mark.parametrize("rows", ["document", "passage-text"])
def test_rows_with_a_document_prompt_get_the_query_prompt(env_of: dict[str, Any], st_model: Any, rows: str) -> None:
    target = env_of["targets"][rows]
    ids, stored = read_back("parquet", target)
    report = search_json(target, QUERIES[0])
    assert report["prompt"] == "query: " and report["prompt_name"] == "query" and "note" not in report
    assert report["rows_prompt"] == "passage: " and "'query' prompt" in report["prompt_from"]
    asked = st_query(st_model, QUERIES[0], prompt="query: ")
    assert_same_hits(report, *brute_force(ids, stored, cosine_scores(asked)))
    top = stored[ids.index(report["hits"][0]["id"])]
    assert report["hits"][0]["score"] == pytest.approx(cosine_scores(asked)(np.array([top]))[0], abs=1e-5)
    symmetric = cosine_scores(st_query(st_model, QUERIES[0], prompt="passage: "))(np.array([top]))[0]
    assert abs(symmetric - report["hits"][0]["score"]) > 1e-3  # the prompt made a difference

    # told otherwise: --prompt TEXT ("" for none), --prompt-name NAME
    plain = search_json(target, QUERIES[0], "--prompt", "")
    assert plain["prompt"] is None and plain["prompt_from"] == "--prompt"
    assert_same_hits(plain, *brute_force(ids, stored, cosine_scores(st_query(st_model, QUERIES[0]))))
    named = search_json(target, QUERIES[0], "--prompt-name", "document", "-k", "3")
    assert named["prompt"] == "passage: " and named["prompt_name"] == "document" and len(named["hits"]) == 3
    assert named["hits"][0]["score"] == pytest.approx(
        cosine_scores(st_query(st_model, QUERIES[0], prompt="passage: "))(np.array([stored[ids.index(named["hits"][0]["id"])]]))[0],
        abs=1e-5)

    result = cli("search", target, QUERIES[0])
    assert result.exit_code == 0 and "query prompt: 'query: '" in " ".join(result.stderr.split())


def test_unknown_prompt_name_and_both_prompt_options_are_refused(env_of: dict[str, Any]) -> None:
    target = env_of["targets"]["document"]
    for args in (["--prompt-name", "nope"], ["--prompt", "q: ", "--prompt-name", "query"]):
        result = cli("search", target, "x", *args)
        assert result.exit_code == 2, result.output
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output


# --- many parts --------------------------------------------------------------------------------

def test_a_directory_of_parts_is_searched_as_one(env_of: dict[str, Any], st_model: Any, tmp_path: Path) -> None:
    parts = tmp_path / "parts"
    parts.mkdir()
    half = len(TEXTS) // 2
    write_csv(parts / "a.csv", [{"id": f"r{i:03d}", "text": t} for i, t in enumerate(TEXTS[:half])])
    write_csv(parts / "b.csv", [{"id": f"r{i + half:03d}", "text": t} for i, t in enumerate(TEXTS[half:])])
    result = cli("embed", parts, "-o", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    table = pa.concat_tables([pq.read_table(tmp_path / "out" / name) for name in ("a.parquet", "b.parquet")])
    ids, stored = table.column("id").to_pylist(), table.column("embedding").to_pylist()
    report = search_json(tmp_path / "out", QUERIES[2])
    assert report["rows_searched"] == len(TEXTS)
    assert_same_hits(report, *brute_force(ids, stored, cosine_scores(st_query(st_model, QUERIES[2]))))


# --- hostile ----------------------------------------------------------------------------------

def one_line_refusal(result: Any, *words: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for word in words:
        assert word in lines[0], lines[0]


def test_hostile_targets_and_arguments(env_of: dict[str, Any], tmp_path: Path) -> None:
    one_line_refusal(cli("search", tmp_path / "missing.parquet", "q"), "missing.parquet", "no such")
    one_line_refusal(cli("search", tmp_path / "missing.lance", "q"), "missing.lance", "no such")
    pq.write_table(pa.table({"text": ["a"], "embedding": [[0.1, 0.2]]}), tmp_path / "foreign.parquet")
    one_line_refusal(cli("search", tmp_path / "foreign.parquet", "q"), "foreign.parquet", "did not write")
    (tmp_path / "notes.parquet").write_text("not parquet")
    one_line_refusal(cli("search", tmp_path / "notes.parquet", "q"), "notes.parquet", "Parquet")
    (tmp_path / "empty").mkdir()
    one_line_refusal(cli("search", tmp_path / "empty", "q"), "empty", "no Parquet parts")
    import lance

    lance.write_dataset(pa.table({"id": [1], "embedding": [[0.1, 0.2]]}), str(tmp_path / "foreign.lance"))
    one_line_refusal(cli("search", tmp_path / "foreign.lance", "q"), "foreign.lance", "did not write")
    target = env_of["targets"]["parquet"]
    one_line_refusal(cli("search", target, "q", "-k", "0"), "-k", "0")
    one_line_refusal(cli("search", target, "   "), "query is empty")


# --- the streamed top k -------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 5, 40])
def test_streamed_top_k_over_many_batches_is_brute_force_ties_by_row_order(k: int) -> None:
    from hfbatch.tools.search import nearest

    rng = np.random.default_rng(k)
    vectors = rng.normal(size=(300, 16)).astype(np.float32)
    vectors[100:130] = vectors[7]  # equal scores, across batches: the earlier rows rank first
    query = vectors[7] + rng.normal(scale=0.1, size=16).astype(np.float32)
    stored: list[Any] = [list(map(float, v)) for v in vectors]
    stored[3] = stored[150] = None  # rows without a vector
    table = pa.table({"id": list(range(300)), "embedding": pa.array(stored, pa.list_(pa.float32(), 16)),
                      "embedding_error": [None if v is not None else "empty" for v in stored]})
    batches = table.to_batches(max_chunksize=23)  # 14 batches
    hits, searched, skipped = nearest(iter(batches), query, k, {"precision": "float32"}, id_column="id", where="t")
    assert (searched, skipped) == (298, 2)
    ids, scores = brute_force(list(range(300)), stored, cosine_scores(query.astype(np.float64)), k=k)
    assert [h["id"] for h in hits] == ids
    np.testing.assert_allclose([h["score"] for h in hits], scores, atol=1e-5)
    assert [h["rank"] for h in hits] == list(range(1, k + 1)) and "embedding_error" not in hits[0]
