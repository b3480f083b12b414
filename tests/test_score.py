"""`hfbatch score` (issue 26): a cross-encoder's score per (query, document) row equal to
sentence-transformers' own CrossEncoder.predict on the same saved model (within 1e-5, its
activation applied); --rerank K keeps each query's right K, ranked; a long document is scored in
windows (max, or --aggregate mean); the cache keys the pair; hostile rows are marked or refused in
one line, and nothing is lost.

The model is tests/kind_models.py's 1-label cross-encoder: MiniLM's real encoder with a seeded
classifier head, saved by sentence-transformers' own save() and loaded through hfbatch's code."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from conftest import BUNDLED_MODEL_DIR, write_csv, write_parquet
from hfbatch import ScoreOptions, score
from hfbatch.backends.scoring import LocalScorer, Pair
from hfbatch.cli import app
from s3_server import s3  # noqa: F401  # the fixture: a real S3-protocol server on 127.0.0.1

pytestmark = pytest.mark.timeout(300)

SAMPLE = Path(__file__).resolve().parent.parent / "sample_data" / "reviews.parquet"
QUERIES = ["a kettle that boils fast", "broken on arrival", "good value for money"]
LONG = "The copper kettle whistles " + "and whistles, louder and louder, " * 60 + "until someone comes."


def cli(*args: Any) -> Any:
    return CliRunner().invoke(app, [str(a) for a in args])


def documents(n: int = 24) -> list[str]:
    """Real reviews that fit beside any of QUERIES in the model's 256 tokens (longer ones are
    scored in windows, which predict does not do: test_a_long_document_is_scored_by_its_windows)."""
    column = next(c for c in ("text", "review", "body") if c in pq.read_schema(SAMPLE).names)
    return [t for t in pq.read_table(SAMPLE, columns=[column]).column(column).to_pylist() if t and len(t) < 600][:n]


def pairs_rows(docs: list[str]) -> list[dict[str, Any]]:
    return [{"id": i, "query": q, "text": d} for i, (q, d) in enumerate((q, d) for q in QUERIES for d in docs)]


@pytest.fixture(scope="module")
def reference(cross_encoder_model_dir: Path) -> Any:
    from sentence_transformers import CrossEncoder

    return CrossEncoder(str(cross_encoder_model_dir), device="cpu")


def test_scores_equal_cross_encoder_predict(cross_encoder_model_dir: Path, reference: Any, tmp_path: Path) -> None:
    rows = pairs_rows(documents())
    source = write_parquet(tmp_path / "pairs.parquet", rows)
    out = tmp_path / "scored.parquet"
    result = score(ScoreOptions(input=source, output=out, model=str(cross_encoder_model_dir), batch_size=16))
    table = pq.read_table(out)
    assert table.column("id").to_pylist() == [r["id"] for r in rows]  # every row, in order
    want = reference.predict([(r["query"], r["text"]) for r in rows])
    np.testing.assert_allclose(table.column("score").to_numpy(), want, rtol=0, atol=1e-5)
    assert 0 < float(np.min(want)) and float(np.max(want)) < 1  # the sigmoid the model's config names
    assert set(table.column("n_windows").to_pylist()) == {1} and not any(table.column("truncated").to_pylist())
    prov = result.document["provenance"]
    assert prov["kind"] == "cross-encoder" and prov["activation"] == "Sigmoid" and prov["query_column"] == "query"
    # the same pairs again: every one from the cache; a known document with a new query is a new pair
    again = score(ScoreOptions(input=source, output=tmp_path / "again.parquet", model=str(cross_encoder_model_dir)))
    assert again.metrics["texts_computed"] == 0
    assert pq.read_table(tmp_path / "again.parquet").column("score").equals(table.column("score"))
    more = write_parquet(tmp_path / "more.parquet", [*rows, {"id": 999, "query": "a new query", "text": rows[0]["text"]},
                                                     {"id": 1000, "query": rows[0]["query"], "text": rows[0]["text"]}])
    third = score(ScoreOptions(input=more, output=tmp_path / "third.parquet", model=str(cross_encoder_model_dir)))
    assert third.metrics["texts_computed"] == 1  # only (new query, known document); the repeated pair is a hit


def test_rerank_keeps_each_querys_right_k(cross_encoder_model_dir: Path, reference: Any, tmp_path: Path) -> None:
    docs = documents(16)
    rows = pairs_rows(docs)
    rows[5]["text"] = ""  # an empty document: marked, kept (rank null), never ranked
    source = write_parquet(tmp_path / "pairs.parquet", rows)
    out = tmp_path / "top.parquet"
    result = cli("score", source, "-o", out, "--model", cross_encoder_model_dir, "--rerank", 10, "--json")
    assert result.exit_code == 3, result.output  # done, with a row marked invalid
    table = pq.read_table(out).to_pylist()
    want = reference.predict([(r["query"], r["text"]) for r in rows if r["text"]])
    scored = [r for r in rows if r["text"]]
    for query in QUERIES:
        mine = [r for r in scored if r["query"] == query]
        scores = np.array([want[scored.index(r)] for r in mine])
        best = [mine[i]["id"] for i in np.argsort(-scores, kind="stable")[:10]]
        got = [r for r in table if r["query"] == query and r["rank"] is not None]
        assert [r["id"] for r in got] == best and [r["rank"] for r in got] == list(range(1, 11))
    marked = [r for r in table if r["rank"] is None]
    assert [r["id"] for r in marked] == [5] and "text: empty text" in marked[0]["score_error"]
    assert [r["query"] for r in table[:11]] == [QUERIES[0]] * 11  # queries in the order they first appear
    document = json.loads(result.stdout)
    assert document["provenance"]["rerank"] == {"k": 10, "rows_scored": 48, "rows_kept": 31, "queries": 3}
    assert document["metrics"]["rows_written"] == 31
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # the spill file is gone


def test_a_long_document_is_scored_by_its_windows(cross_encoder_model_dir: Path, reference: Any, tmp_path: Path) -> None:
    source = write_parquet(tmp_path / "long.parquet", [{"query": "a whistling kettle", "text": LONG},
                                                       {"query": "a whistling kettle", "text": "A short one."}])
    best = tmp_path / "max.parquet"
    assert cli("score", source, "-o", best, "--model", cross_encoder_model_dir).exit_code == 0
    mean = tmp_path / "mean.parquet"
    assert cli("score", source, "-o", mean, "--model", cross_encoder_model_dir, "--aggregate", "mean").exit_code == 0
    scorer = LocalScorer(str(cross_encoder_model_dir))
    windows = scorer.windows(Pair("a whistling kettle", LONG))
    assert windows is not None and len(windows) > 1
    tokenizer = reference.tokenizer
    for w in windows:  # each window fits beside the query, as the model reads a pair
        assert len(tokenizer("a whistling kettle", w)["input_ids"]) <= reference.max_length
    per_window = reference.predict([("a whistling kettle", w) for w in windows])
    top = pq.read_table(best).to_pylist()
    assert top[0]["n_windows"] == len(windows) and top[0]["truncated"] is False
    assert top[0]["score"] == pytest.approx(float(per_window.max()), abs=1e-5)
    assert pq.read_table(mean).to_pylist()[0]["score"] == pytest.approx(float(per_window.mean()), abs=1e-5)
    assert top[1]["n_windows"] == 1


def test_hostile_rows_and_options(cross_encoder_model_dir: Path, sparse_model_dir: Path, tmp_path: Path) -> None:
    rows = [{"query": "q", "text": "a document"}, {"query": "", "text": "an orphan"}, {"query": "q", "text": None},
            {"query": "q", "text": 12}]
    source = write_parquet(tmp_path / "bad.parquet", rows[:3])
    out = tmp_path / "out.parquet"
    marked = cli("score", source, "-o", out, "--model", cross_encoder_model_dir)
    assert marked.exit_code == 3, marked.output
    table = pq.read_table(out).to_pylist()
    assert len(table) == 3 and table[0]["score"] is not None
    assert table[1]["score"] is None and "query: empty text" in table[1]["score_error"]
    assert table[2]["score"] is None and "text: null text" in table[2]["score_error"]
    failed = cli("score", source, "-o", tmp_path / "f.parquet", "--model", cross_encoder_model_dir, "--on-invalid", "fail")
    assert failed.exit_code == 2 and "row 2" in failed.output and "'query'" in failed.output
    assert not (tmp_path / "f.parquet").exists()
    csv = write_csv(tmp_path / "pairs.csv", [{"q": "x", "text": "y"}])
    missing = cli("score", csv, "-o", tmp_path / "m.parquet", "--model", cross_encoder_model_dir)
    assert missing.exit_code == 2 and "--query-column" in missing.output and "q, text" in missing.output
    for model, named in ((BUNDLED_MODEL_DIR, "not a cross-encoder"), (sparse_model_dir, "SparseEncoder")):
        wrong = cli("score", source, "-o", tmp_path / "w.parquet", "--model", model)
        assert wrong.exit_code == 2 and named in wrong.output and "Traceback" not in wrong.output
    same = cli("score", source, "-o", tmp_path / "s.parquet", "--model", cross_encoder_model_dir, "--query-column", "text")
    assert same.exit_code == 2 and "a pair has two sides" in same.output
    zero = cli("score", source, "-o", tmp_path / "z.parquet", "--model", cross_encoder_model_dir, "--rerank", 0)
    assert zero.exit_code == 2 and "--rerank" in zero.output
    assert not any((tmp_path / n).exists() for n in ("m.parquet", "w.parquet", "s.parquet", "z.parquet"))


def test_an_s3_input_and_output(cross_encoder_model_dir: Path, reference: Any, tmp_path: Path, s3: Any) -> None:
    from s3_server import BUCKET

    rows = pairs_rows(documents(5))
    s3.put(BUCKET, "in/pairs.parquet", write_parquet(tmp_path / "p.parquet", rows).read_bytes())
    score(ScoreOptions(input=f"s3://{BUCKET}/in/pairs.parquet", output=f"s3://{BUCKET}/out/scored.parquet",
                       model=str(cross_encoder_model_dir), cache_dir=tmp_path / "c", rerank=2))
    table = pq.read_table(io.BytesIO(s3.get(BUCKET, "out/scored.parquet")))
    assert table.num_rows == 6 and table.column("rank").to_pylist() == [1, 2] * 3
    want = reference.predict([(r["query"], r["text"]) for r in rows])
    for row in table.to_pylist():
        assert row["score"] == pytest.approx(float(want[row["id"]]), abs=1e-5)


def test_verify_scores_a_sample_again_and_catches_a_changed_score(cross_encoder_model_dir: Path, tmp_path: Path) -> None:
    import pyarrow as pa

    source = write_parquet(tmp_path / "pairs.parquet", pairs_rows(documents(6)))
    out = tmp_path / "scored.parquet"
    assert cli("score", source, "-o", out, "--model", cross_encoder_model_dir).exit_code == 0
    checked = cli("verify", out, "--json")
    assert checked.exit_code == 0, checked.output
    report = json.loads(checked.stdout)
    assert report["job"] == "score" and report["agree"] == report["rows_checked"] == 18 and report["ok"]
    table = pq.read_table(out)  # (its schema keeps the run's metadata: the same run, as verify checks)
    changed = table.column("score").to_numpy().copy()
    changed[4] += 0.01
    pq.write_table(table.set_column(table.schema.get_field_index("score"), "score", pa.array(changed, pa.float32())), out)
    caught = cli("verify", out, "--json")
    assert caught.exit_code == 1
    assert json.loads(caught.stdout)["worst_row"] == 5 and json.loads(caught.stdout)["agree"] == 17


def test_the_dry_run_counts_pairs_windows_and_what_rerank_keeps(cross_encoder_model_dir: Path, tmp_path: Path) -> None:
    rows = [*pairs_rows(documents(4)), {"id": 99, "query": QUERIES[0], "text": LONG}, {"id": 100, "query": "", "text": "x"}]
    source = write_parquet(tmp_path / "pairs.parquet", rows)
    out = tmp_path / "out.parquet"
    plan = cli("score", source, "-o", out, "--model", cross_encoder_model_dir, "--rerank", 2, "--dry-run", "--json")
    assert plan.exit_code == 0, plan.output
    report = json.loads(plan.stdout)
    windows = LocalScorer(str(cross_encoder_model_dir)).windows(Pair(QUERIES[0], LONG))
    assert report["rows"] == 14 and report["rows_invalid"] == 1 and report["queries"] == 3
    assert report["long_documents"] == 1 and report["windows"] == len(windows)  # type: ignore[arg-type]
    assert report["pair_scorings"] == 12 + len(windows) and report["output_rows"] == 3 * 2 + 1  # type: ignore[arg-type]
    assert not out.exists() and report["eta_seconds"] > 0
    assert cli("score", source, "-o", out, "--model", cross_encoder_model_dir).exit_code == 3
    warm = json.loads(cli("score", source, "-o", tmp_path / "o2.parquet", "--model", cross_encoder_model_dir,
                          "--dry-run", "--json").stdout)
    assert warm["cache"]["expected_hits"] == 13 and warm["pair_scorings"] == 0


def test_a_directory_of_parts_is_scored_as_one_input(cross_encoder_model_dir: Path, reference: Any, tmp_path: Path) -> None:
    rows = pairs_rows(documents(8))
    parts = tmp_path / "parts"
    parts.mkdir()
    write_csv(parts / "a.csv", rows[:10])
    write_parquet(parts / "b.parquet", rows[10:])
    out = tmp_path / "top.parquet"
    result = cli("score", parts, "-o", out, "--model", cross_encoder_model_dir, "--rerank", 2)
    assert result.exit_code == 0, result.output
    table = pq.read_table(out).to_pylist()
    want = reference.predict([(r["query"], r["text"]) for r in rows])
    for query in QUERIES:  # a query's rows in both parts are ranked together
        mine = [i for i, r in enumerate(rows) if r["query"] == query]
        best = sorted(mine, key=lambda i: -want[i])[:2]
        assert [int(r["id"]) for r in table if r["query"] == query] == [rows[i]["id"] for i in best]


def test_a_killed_reranks_spill_file_is_cleared_by_the_next_run(cross_encoder_model_dir: Path, tmp_path: Path) -> None:
    import os

    from hfbatch.io.writers import local_temp_for

    out = tmp_path / "top.parquet"
    spill = local_temp_for(out)  # the name a --rerank run spills to: what a SIGKILL would leave
    assert spill.parent == tmp_path and f".{os.getpid()}-" in spill.name
    dead = spill.with_name(spill.name.replace(f".{os.getpid()}-", ".999999999-"))
    dead.write_bytes(b"scored rows of a killed run")
    source = write_parquet(tmp_path / "pairs.parquet", pairs_rows(documents(3)))
    assert cli("score", source, "-o", out, "--model", cross_encoder_model_dir, "--rerank", 1).exit_code == 0
    assert not dead.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_long_query_beside_a_long_document_and_windows_per_forward_pass(cross_encoder_model_dir: Path,
                                                                          reference: Any, tmp_path: Path) -> None:
    """Review: a ~230-token query beside a long document killed the job (no room for the overlap),
    a ~220-token one cut 368 windows a token apart; every window of a batch went into one call."""
    rows = [{"query": " ".join(["fox"] * n), "text": " ".join(["dog"] * 400)} for n in (220, 230, 250)]
    source = write_parquet(tmp_path / "lq.parquet", rows)
    out = tmp_path / "lq.scored.parquet"
    result = cli("score", source, "-o", out, "--model", cross_encoder_model_dir)
    assert result.exit_code == 0, result.output
    table = pq.read_table(out).to_pylist()
    assert all(r["score"] is not None for r in table)
    assert table[0]["n_windows"] < 40  # windows advance by half a window at least
    scorer = LocalScorer(str(cross_encoder_model_dir))
    for row in rows:
        windows = scorer.windows(Pair(row["query"], row["text"])) or []
        for w in windows:
            assert len(reference.tokenizer(row["query"], w)["input_ids"]) <= reference.max_length
    # a batch of 2 long pairs (about 8 windows each) goes to the model 2 pairs a forward pass
    model = scorer.load()
    sizes: list[int] = []
    real = model.predict

    def counted(pairs: Any, **kw: Any) -> Any:
        sizes.append(len(pairs))
        return real(pairs, **kw)

    model.predict = counted
    try:
        long = [Pair("a dog", " ".join(["dog"] * 1500)), Pair("a cat", " ".join(["cat"] * 1500))]
        got = scorer.score(long, scorer.pair_counts(long))
    finally:
        model.predict = real
    assert all(g.windows > 4 for g in got) and max(sizes) <= 2 and sum(sizes) == sum(g.windows for g in got)


def test_a_two_label_classifier_is_refused_and_helper_columns_never_clash(tmp_path: Path,
                                                                          cross_encoder_model_dir: Path) -> None:
    import torch
    from sentence_transformers import CrossEncoder
    from sentence_transformers.cross_encoder.modules import Transformer

    from kind_models import MINILM_DIR

    torch.manual_seed(0)
    backbone = Transformer(str(MINILM_DIR), transformer_task="sequence-classification", config_kwargs={"num_labels": 2})
    CrossEncoder(modules=[backbone], device="cpu").save(str(tmp_path / "ce2"))
    source = write_csv(tmp_path / "p.csv", [{"query": "a", "text": "x", "__first": 1, "__row": 2},
                                            {"query": "a", "text": "y", "__first": 3, "__row": 4}])
    refused = cli("score", source, "-o", tmp_path / "o.parquet", "--model", tmp_path / "ce2")
    assert refused.exit_code == 2 and "2 labels" in refused.output and "Traceback" not in refused.output
    ranked = cli("score", source, "-o", tmp_path / "r.parquet", "--model", cross_encoder_model_dir, "--rerank", 1, "--json")
    assert ranked.exit_code == 0, ranked.output
    assert pq.read_table(tmp_path / "r.parquet").column("__first").to_pylist() in (["1"], ["3"])  # (CSV: text)
    assert json.loads(ranked.stdout)["provenance"]["activation"] == "Sigmoid"
    again = cli("score", source, "-o", tmp_path / "r2.parquet", "--model", cross_encoder_model_dir, "--json")
    assert json.loads(again.stdout)["provenance"]["activation"] == "Sigmoid"  # a run the cache served whole too


def test_verify_checks_a_reranked_files_ranks_and_rows(cross_encoder_model_dir: Path, tmp_path: Path) -> None:
    import pyarrow as pa

    source = write_parquet(tmp_path / "pairs.parquet", pairs_rows(documents(6)))
    out = tmp_path / "top.parquet"
    assert cli("score", source, "-o", out, "--model", cross_encoder_model_dir, "--rerank", 3).exit_code == 0
    fine = cli("verify", out, "--json")
    assert fine.exit_code == 0 and json.loads(fine.stdout)["rerank"] is None, fine.output
    table = pq.read_table(out)
    ranks = table.column("rank").to_pylist()
    ranks[0], ranks[1] = ranks[1], ranks[0]  # two ranks swapped: scores no longer fall with the rank
    pq.write_table(table.set_column(table.schema.get_field_index("rank"), "rank", pa.array(ranks, pa.int32())), out)
    swapped = cli("verify", out, "--json")
    assert swapped.exit_code == 1 and "not 1..3 in order" in json.loads(swapped.stdout)["rerank"]
    pq.write_table(table.slice(0, 5), out)  # rows cut: fewer than the run wrote
    cut = cli("verify", out, "--json")
    assert cut.exit_code == 1 and "the run wrote 9" in json.loads(cut.stdout)["rerank"]


def test_verify_reads_a_side_keep_left_out_from_the_input(cross_encoder_model_dir: Path, tmp_path: Path) -> None:
    """--keep id leaves the documents out of the output: verify reads them from the input, row for
    row (as embed's verify reads texts), and catches a changed score; a --rerank output, whose rows
    are not the input's in order, is refused in one line naming --keep."""
    import pyarrow as pa

    source = write_parquet(tmp_path / "pairs.parquet", pairs_rows(documents(4)))
    out = tmp_path / "scored.parquet"
    assert cli("score", source, "-o", out, "--model", cross_encoder_model_dir, "--keep", "id").exit_code == 0
    assert "text" not in pq.read_schema(out).names
    checked = cli("verify", out, "--json")
    assert checked.exit_code == 0, checked.output
    assert json.loads(checked.stdout)["agree"] == json.loads(checked.stdout)["rows_checked"] == 12
    table = pq.read_table(out)
    changed = table.column("score").to_numpy().copy()
    changed[2] += 0.01
    pq.write_table(table.set_column(table.schema.get_field_index("score"), "score", pa.array(changed, pa.float32())), out)
    caught = cli("verify", out, "--json")
    assert caught.exit_code == 1 and json.loads(caught.stdout)["worst_row"] == 3
    reranked = tmp_path / "reranked.parquet"
    assert cli("score", source, "-o", reranked, "--model", cross_encoder_model_dir, "--keep", "id",
               "--rerank", 2).exit_code == 0
    refused = cli("verify", reranked)
    assert refused.exit_code == 2 and "keep it (--keep) to verify" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1



def test_verify_reads_a_relative_input_as_it_was_typed(cross_encoder_model_dir: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The sidecar records the input as typed (relative to where the run was started): verify reads
    it from there, not from beside the output."""
    monkeypatch.chdir(tmp_path)
    write_parquet(tmp_path / "pairs.parquet", pairs_rows(documents(2)))
    (tmp_path / "out").mkdir()
    assert cli("score", "pairs.parquet", "-o", "out/s.parquet", "--model", cross_encoder_model_dir,
               "--keep", "id").exit_code == 0
    checked = cli("verify", "out/s.parquet", "--json")
    assert checked.exit_code == 0, checked.output
    assert json.loads(checked.stdout)["rows_checked"] == 6


def test_rerank_ranks_copies_of_one_pair_in_input_order_whatever_their_batches_gave(tmp_path: Path) -> None:
    """The same pair scored in two batches (two chunks, or two Ray actors at once) can differ by
    ~1e-7; --rerank gives its copies one score, so they tie and keep input order."""
    import pyarrow as pa

    from hfbatch.jobs.score import RerankSink

    opts = ScoreOptions(input=tmp_path / "in.parquet", output=tmp_path / "out.parquet", rerank=3)
    schema = pa.schema([("id", pa.int64()), ("query", pa.string()), ("text", pa.string()), ("score", pa.float32()),
                        ("n_tokens", pa.int32()), ("n_windows", pa.int32()), ("truncated", pa.bool_()),
                        ("score_error", pa.string())])
    sink = RerankSink(opts, schema)
    sink.write(pa.RecordBatch.from_pydict({
        "id": [0, 1, 2], "query": ["q", "q", "q"], "text": ["same", "other", "same"],
        "score": [0.6446865, 0.1, 0.6446869], "n_tokens": [5, 5, 5], "n_windows": [1, 1, 1],
        "truncated": [False] * 3, "score_error": [None] * 3}, schema=schema))
    table = sink.ranked()
    assert table.column("id").to_pylist() == [0, 2, 1] and table.column("rank").to_pylist() == [1, 2, 3]
    sink.abort()
