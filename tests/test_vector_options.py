"""--prompt / --prompt-name, --truncate-dim, --output-precision and --calibration, end to end with the
real bundled MiniLM: the vectors equal sentence-transformers' own (encode(prompt=..., truncate_dim=...),
quantize_embeddings), the cache namespaces and token counts follow the prompt, the sidecar records the
ranges, and the files read back in Polars and DuckDB with the same numbers.

Runs that several tests compare are made once per module (`Runs`), on one shared cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sentence_transformers.util.quantization import quantize_embeddings
from typer.testing import CliRunner

from conftest import BUNDLED_MODEL_DIR, write_csv, write_jsonl
from hfbatch import EmbedOptions, embed
from hfbatch.cli import app

MODEL = str(BUNDLED_MODEL_DIR)
DIM = 384

TEXTS = [
    "The kettle boils fast and the handle stays cool.",
    "Arrived broken, the glass lid was cracked in two places.",
    "Battery life is poor: barely two hours of use.",
    "The museum opens at nine and closes early on Sundays.",
    "She planted tomatoes, basil and a row of sunflowers along the fence.",
    "Interest rates rose again, and mortgage applications fell sharply.",
    "The referee stopped the match after the second injury.",
    "Photosynthesis turns sunlight, water and carbon dioxide into sugar.",
    "Our flight was delayed four hours because of fog in Amsterdam.",
    "He learned to play the cello at the age of forty.",
    "The new library has a quiet reading room on the top floor.",
    "Please restart the router before calling technical support.",
    "A volcano erupted near the coast, and villages were evacuated.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Our team shipped the release on Friday without any regressions.",
    "The river flooded the lower town after three days of rain.",
    "I would not recommend this hotel: the rooms smelled of smoke.",
    "Quantum computers use qubits that can exist in superposition.",
    "The children built a snowman with a carrot for a nose.",
    "Shares of the chip maker jumped ten percent after earnings.",
    "The orchestra rehearsed the symphony late into the night.",
    "Wear sunscreen even on cloudy days to protect your skin.",
    "The detective found a muddy footprint beneath the window.",
    "This laptop is light, fast, and the keyboard feels great.",
    "Elephants can recognise themselves in a mirror.",
    "The city council voted to expand the bicycle lanes downtown.",
    "My grandmother still writes letters by hand every week.",
    "The bakery sells out of croissants before eight in the morning.",
    "Password resets are sent to the email address on file.",
    "Honeybees communicate the location of flowers by dancing.",
    "The train to Edinburgh leaves from platform four.",
    "Mix the paint thoroughly before applying a second coat.",
    "The marathon route passes the cathedral and the old harbour.",
    "A balanced diet includes fruit, vegetables and whole grains.",
    "The software crashed whenever I opened a large spreadsheet.",
    "Astronomers discovered a planet orbiting a distant red dwarf.",
    "The puppy chewed through the charging cable overnight.",
    "Customs officers inspected every container at the port.",
    "The novel follows three sisters across two world wars.",
    "Turn left at the bakery, then take the second right.",
    "The vaccine trial enrolled thousands of volunteers.",
    "Fresh snow closed the mountain pass for the weekend.",
    "He apologised for the misunderstanding and offered a refund.",
    "The garden hose leaks where it connects to the tap.",
    "Solar panels on the roof now cover most of our electricity.",
    "The chess champion resigned after a surprising knight sacrifice.",
    "Tickets for the concert sold out within ten minutes.",
    "Regular exercise improves sleep and reduces stress.",
    "The old bridge will be closed for repairs until spring.",
    "Customer service answered quickly and solved the problem.",
]
# texts of another job (--calibration reuse) and of a --calibration texts file
OTHER_TEXTS = [
    "The lighthouse keeper climbed the stairs every evening.",
    "Invoices are due thirty days after delivery.",
    "A sudden storm scattered the fishing boats.",
    "The violinist tuned her instrument before the recital.",
    "Wheat prices climbed after the drought in the plains.",
    "The toddler refused to eat anything green.",
    "Our internet connection drops every afternoon.",
    "The archaeologists uncovered a Roman mosaic floor.",
    "Use a soft brush to clean the camera lens.",
    "The senator announced she would not run again.",
    "Penguins huddle together to survive the winter.",
    "This blender is loud but crushes ice perfectly.",
    "The ferry crossing was calm and took an hour.",
    "Students must submit their essays by Monday noon.",
    "The glacier has retreated several kilometres in a century.",
    "My order arrived two weeks late and the box was soaked.",
]
assert len(TEXTS) == 50 and len(set(TEXTS)) == 50 and not set(TEXTS) & set(OTHER_TEXTS)

INVALID_AT = (5, 33)  # an empty and a null text: marked invalid, a null embedding
ROWS: list[dict[str, Any]] = []
_texts = iter(TEXTS)
for _i in range(len(TEXTS) + len(INVALID_AT)):
    ROWS.append({"id": _i, "text": ("" if _i == INVALID_AT[0] else None) if _i in INVALID_AT else next(_texts)})
VALID = np.array([r["text"] is not None and r["text"] != "" for r in ROWS])
N = len(TEXTS)
CALIBRATION_SIZE = 20  # of 50 valid vectors: later rows fall outside the ranges

PRECISIONS = ("float32", "float16", "int8", "uint8", "binary", "ubinary")
ARROW_TYPES = {"float32": pa.float32(), "float16": pa.float16(), "int8": pa.int8(), "uint8": pa.uint8(),
               "binary": pa.int8(), "ubinary": pa.uint8()}
NUMPY_TYPES = {"float32": np.float32, "float16": np.float16, "int8": np.int8, "uint8": np.uint8,
               "binary": np.int8, "ubinary": np.uint8}
POLARS_TYPES = {"float32": pl.Float32, "float16": pl.Float16, "int8": pl.Int8, "uint8": pl.UInt8,
                "binary": pl.Int8, "ubinary": pl.UInt8}

runner = CliRunner()


# --- helpers ------------------------------------------------------------------------------------


def cli(*args: Any):
    return runner.invoke(app, [str(a) for a in args])


def embeddings(path: Path) -> np.ndarray:
    """The embedding column as a (rows, width) array of its stored dtype (null rows: undefined slots, compare
    only the valid rows)."""
    column = pq.read_table(path).column("embedding").combine_chunks()
    width = column.type.list_size
    values = column.values.fill_null(0)  # a null row's slots read back as nulls (or anything): not data
    return values.to_numpy(zero_copy_only=False).reshape(len(column), width)


def null_mask(path: Path) -> np.ndarray:
    return pq.read_table(path).column("embedding").is_null().to_numpy(zero_copy_only=False)


def vectors_of(result: Any) -> dict[str, Any]:
    return result.document["provenance"]["vectors"]


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def renorm(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def reference_quantized(floats: np.ndarray, precision: str, ranges: np.ndarray | None) -> np.ndarray:
    """What sentence-transformers makes of `floats` at `precision` (its quantize_embeddings has no
    float16: that is a plain cast)."""
    if precision == "float16":
        return floats.astype(np.float16)
    return quantize_embeddings(floats, precision, ranges=ranges)


def n_tokens(st_model: Any, texts: list[str], prompt: str = "") -> list[int]:
    return [len(st_model.tokenizer(prompt + t)["input_ids"]) for t in texts]


class Runs:
    """Embed jobs made once per module, by name, all on one cache (so later runs are cache hits)."""

    def __init__(self, root: Path):
        self.root = root
        self.cache = root / "cache"
        self.src = write_jsonl(root / "in.jsonl", ROWS)
        self.other = write_csv(root / "other.csv", [{"id": i, "text": t} for i, t in enumerate(OTHER_TEXTS)])
        self._done: dict[str, Any] = {}

    def get(self, name: str, **options: Any) -> Any:
        if name not in self._done:
            options.setdefault("input", self.src)
            options.setdefault("model", MODEL)
            options.setdefault("cache_dir", self.cache)
            self._done[name] = embed(EmbedOptions(output=self.root / f"{name}.parquet", **options))
        return self._done[name]

    # the float reference runs every precision is compared with
    def base(self) -> Any:
        return self.get("base")

    def t128(self) -> Any:
        self.base()  # the cache holds the full vectors first
        return self.get("t128", truncate_dim=128)

    def quantized(self, precision: str, truncate_dim: int | None) -> Any:
        (self.t128 if truncate_dim else self.base)()
        return self.get(f"{precision}_{truncate_dim}", output_precision=precision, truncate_dim=truncate_dim,
                        calibration_size=CALIBRATION_SIZE)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return Runs(tmp_path_factory.mktemp("vector-options"))


@pytest.fixture(scope="module")
def prompt_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled model with named prompts, and "passage" its default prompt."""
    root = tmp_path_factory.mktemp("prompt-model") / "minilm-prompts"
    shutil.copytree(BUNDLED_MODEL_DIR, root)
    config = json.loads((root / "config_sentence_transformers.json").read_text())
    config.update(prompts={"query": "query: ", "passage": "passage: "}, default_prompt_name="passage")
    (root / "config_sentence_transformers.json").write_text(json.dumps(config))
    return root


@pytest.fixture(scope="module")
def reference(st_model: Any) -> dict[str, np.ndarray]:
    """sentence-transformers' own vectors of TEXTS."""
    return {
        "plain": st_model.encode(TEXTS, convert_to_numpy=True),
        "query": st_model.encode(TEXTS, prompt="query: ", convert_to_numpy=True),
        "passage": st_model.encode(TEXTS, prompt="passage: ", convert_to_numpy=True),
        "t128": st_model.encode(TEXTS, truncate_dim=128, convert_to_numpy=True),
    }


# --- prompts ------------------------------------------------------------------------------------


def test_prompt_equals_encode_with_prompt_and_has_its_own_cache_namespace(tmp_path: Path, runs: Runs, st_model: Any,
                                                                          reference: dict[str, np.ndarray]) -> None:
    cache = tmp_path / "prompt-cache"
    common = dict(input=runs.src, model=MODEL, cache_dir=cache)
    first = embed(EmbedOptions(output=tmp_path / "query.parquet", prompt="query: ", **common))
    got = embeddings(first.output)[VALID]
    assert cosine(got, reference["query"]).min() >= 0.99999
    assert first.document["metrics"]["texts_computed"] == N
    table = pq.read_table(first.output)
    assert np.array(table.column("n_tokens").to_pylist())[VALID].tolist() == n_tokens(st_model, TEXTS, "query: ")
    assert n_tokens(st_model, TEXTS, "query: ") != n_tokens(st_model, TEXTS)  # the prompt's tokens are counted
    prov = first.document["provenance"]
    assert prov["prompt"] == "query: " and prov["prompt_name"] is None

    # the same texts without the prompt: another namespace, nothing reused
    plain = embed(EmbedOptions(output=tmp_path / "plain.parquet", **common))
    m = plain.document["metrics"]
    assert m["cache"]["hits"] == 0 and m["texts_computed"] == N
    plain_vectors = embeddings(plain.output)[VALID]
    assert cosine(plain_vectors, reference["plain"]).min() >= 0.99999
    assert cosine(plain_vectors, got).min() < 0.999  # the prompt did change the vectors
    assert np.array(pq.read_table(plain.output).column("n_tokens").to_pylist())[VALID].tolist() == n_tokens(st_model, TEXTS)
    assert plain.document["provenance"]["prompt"] is None

    # the prompt again: all hits, and the cached token counts still count the prompt
    again = embed(EmbedOptions(output=tmp_path / "again.parquet", prompt="query: ", **common))
    m = again.document["metrics"]
    assert m["cache"]["hits"] == N and m["texts_computed"] == 0
    assert np.array_equal(embeddings(again.output)[VALID], embeddings(first.output)[VALID])
    assert pq.read_table(again.output).column("n_tokens").to_pylist() == table.column("n_tokens").to_pylist()


def test_prompt_name_and_the_models_default_prompt(tmp_path: Path, runs: Runs, prompt_model: Path, st_model: Any,
                                                   reference: dict[str, np.ndarray]) -> None:
    common = dict(input=runs.src, model=str(prompt_model), cache_dir=tmp_path / "cache")
    named = embed(EmbedOptions(output=tmp_path / "named.parquet", prompt_name="query", **common))
    assert cosine(embeddings(named.output)[VALID], reference["query"]).min() >= 0.99999
    prov = named.document["provenance"]
    assert prov["prompt"] == "query: " and prov["prompt_name"] == "query"
    assert np.array(pq.read_table(named.output).column("n_tokens").to_pylist())[VALID].tolist() == \
        n_tokens(st_model, TEXTS, "query: ")

    default = embed(EmbedOptions(output=tmp_path / "default.parquet", **common))  # no flag: default_prompt_name
    assert cosine(embeddings(default.output)[VALID], reference["passage"]).min() >= 0.99999
    prov = default.document["provenance"]
    assert prov["prompt"] == "passage: " and prov["prompt_name"] == "passage"
    assert default.document["metrics"]["cache"]["hits"] == 0  # another prompt, another namespace



def test_empty_prompt_turns_the_models_default_off(tmp_path: Path, runs: Runs, prompt_model: Path, st_model: Any,
                                                   reference: dict[str, np.ndarray]) -> None:
    # through the CLI, where "" must survive as a value
    out = tmp_path / "none.parquet"
    result = cli("embed", runs.src, "-o", out, "--model", prompt_model, "--cache-dir", tmp_path / "cache",
                 "--prompt", "", "--quiet")
    assert result.exit_code == 3, result.output  # complete; the two invalid rows are marked
    doc = json.loads((tmp_path / "none.parquet.meta.json").read_text())
    assert doc["provenance"]["prompt"] is None and doc["provenance"]["prompt_name"] is None
    assert np.array(pq.read_table(out).column("n_tokens").to_pylist())[VALID].tolist() == n_tokens(st_model, TEXTS)
    assert cosine(embeddings(out)[VALID], reference["plain"]).min() >= 0.99999


def test_unknown_prompt_name_exits_2_listing_the_names(tmp_path: Path, runs: Runs, prompt_model: Path) -> None:
    out = tmp_path / "o.parquet"
    result = cli("embed", runs.src, "-o", out, "--model", prompt_model, "--cache-dir", tmp_path / "cache",
                 "--prompt-name", "document", "--quiet")
    assert result.exit_code == 2, result.output
    assert "'document'" in result.stderr and "passage, query" in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output
    assert not out.exists() and not (tmp_path / "o.parquet.meta.json").exists()


def test_prompt_and_prompt_name_together_exit_2(tmp_path: Path, runs: Runs, prompt_model: Path) -> None:
    out = tmp_path / "o.parquet"
    result = cli("embed", runs.src, "-o", out, "--model", prompt_model, "--prompt", "query: ", "--prompt-name", "query")
    assert result.exit_code == 2, result.output
    assert "not both" in result.stderr and result.stderr.count("\n") == 1
    assert not out.exists()


# --- --truncate-dim -----------------------------------------------------------------------------


def test_base_run_equals_encode(runs: Runs, reference: dict[str, np.ndarray]) -> None:
    base = runs.base()
    table = pq.read_table(base.output)
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), DIM)
    assert cosine(embeddings(base.output)[VALID], reference["plain"]).min() >= 0.99999
    assert null_mask(base.output).tolist() == (~VALID).tolist()
    assert vectors_of(base) == {"dim": DIM, "truncate_dim": None, "precision": "float32", "values_per_vector": DIM,
                                "ranges": None, "calibration": None}


def test_truncate_dim_equals_encode_truncated_and_renormalised(runs: Runs, reference: dict[str, np.ndarray]) -> None:
    t128 = runs.t128()
    assert pq.read_table(t128.output).schema.field("embedding").type == pa.list_(pa.float32(), 128)
    got = embeddings(t128.output)[VALID]
    assert cosine(got, renorm(reference["t128"])).min() >= 0.99999
    assert np.abs(np.linalg.norm(got, axis=1) - 1).max() < 1e-5
    full = embeddings(runs.base().output)[VALID]
    assert np.allclose(got, renorm(full[:, :128]), atol=1e-6)  # the prefix of the cached full vector
    assert t128.document["metrics"]["texts_computed"] == 0  # the cache keeps full vectors
    v = vectors_of(t128)
    assert (v["dim"], v["truncate_dim"], v["values_per_vector"], v["precision"]) == (128, 128, 128, "float32")
    assert t128.document["provenance"]["dim"] == DIM  # the model's own dimension
    assert null_mask(t128.output).tolist() == (~VALID).tolist()


def test_second_truncation_on_the_same_cache_computes_nothing(runs: Runs) -> None:
    t128 = embeddings(runs.t128().output)[VALID]
    t64 = runs.get("t64", truncate_dim=64)
    m = t64.document["metrics"]
    assert m["texts_computed"] == 0 and m["cache"]["hits"] == N and m["cache"]["misses"] == 0
    got = embeddings(t64.output)[VALID]
    assert got.shape == (N, 64)
    assert np.allclose(got, renorm(t128[:, :64]), atol=1e-6)
    assert np.abs(np.linalg.norm(got, axis=1) - 1).max() < 1e-5


def test_truncate_dim_without_normalize_keeps_the_raw_prefix(runs: Runs) -> None:
    full = runs.get("raw", normalize=False)
    cut = runs.get("raw_t100", normalize=False, truncate_dim=100)
    assert cut.document["metrics"]["texts_computed"] == 0
    full_v, cut_v = embeddings(full.output)[VALID], embeddings(cut.output)[VALID]
    assert cut_v.shape == (N, 100)
    assert np.array_equal(cut_v, full_v[:, :100])
    assert np.abs(np.linalg.norm(cut_v, axis=1) - 1).min() > 1e-3  # not rescaled


def test_truncate_dim_above_the_models_dimension_exits_2(tmp_path: Path, runs: Runs) -> None:
    # issue 22: it used to keep all dimensions and record truncate_dim 1000 beside dim 384
    out = tmp_path / "o.parquet"
    result = cli("embed", runs.src, "-o", out, "--model", MODEL, "--truncate-dim", "1000")
    assert result.exit_code == 2, result.output
    assert f"--truncate-dim 1000 is more than the {DIM} dimensions" in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("value", ["0", "-3"])
def test_truncate_dim_below_1_exits_2(tmp_path: Path, runs: Runs, value: str) -> None:
    out = tmp_path / "o.parquet"
    result = cli("embed", runs.src, "-o", out, "--model", MODEL, "--truncate-dim", value)
    assert result.exit_code == 2, result.output
    assert f"--truncate-dim must be at least 1 (got {value})" in result.stderr
    assert not out.exists()


# --- --output-precision -------------------------------------------------------------------------


@pytest.mark.parametrize("truncate_dim", [None, 128])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_output_precision_equals_quantize_embeddings(runs: Runs, precision: str, truncate_dim: int | None) -> None:
    result = runs.quantized(precision, truncate_dim)
    floats = embeddings((runs.t128() if truncate_dim else runs.base()).output)[VALID]
    dim = truncate_dim or DIM
    width = (dim + 7) // 8 if precision.endswith("binary") else dim
    table = pq.read_table(result.output)
    assert table.schema.field("embedding").type == pa.list_(ARROW_TYPES[precision], width)
    assert null_mask(result.output).tolist() == (~VALID).tolist()  # invalid rows keep a null embedding
    assert table.column("embedding_error").to_pylist()[INVALID_AT[0]]  # ... and their error mark
    stored = embeddings(result.output)
    assert stored.dtype == NUMPY_TYPES[precision]

    v = vectors_of(result)
    assert (v["dim"], v["truncate_dim"], v["precision"], v["values_per_vector"]) == (dim, truncate_dim, precision, width)
    if precision in ("int8", "uint8"):
        ranges = np.asarray(v["ranges"], dtype=np.float32)
        assert ranges.shape == (2, dim)
        sample = floats[:CALIBRATION_SIZE]  # the first K *valid* vectors (row 5 is empty)
        assert np.array_equal(ranges, np.vstack([sample.min(0), sample.max(0)]))
        assert (floats[CALIBRATION_SIZE:] > ranges[1]).any() and (floats[CALIBRATION_SIZE:] < ranges[0]).any()
        assert v["calibration"]["source"] == "job" and v["calibration"]["vectors"] == CALIBRATION_SIZE
    else:
        ranges = None
        assert v["ranges"] is None and v["calibration"] is None
    want = reference_quantized(floats, precision, ranges)
    assert want.dtype == stored.dtype
    assert np.array_equal(stored[VALID], want)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_polars_and_duckdb_read_the_same_numbers(runs: Runs, precision: str) -> None:
    result = runs.quantized(precision, None)
    stored = embeddings(result.output)
    width = stored.shape[1]

    frame = pl.read_parquet(result.output)
    column = frame["embedding"]
    assert column.dtype == pl.Array(POLARS_TYPES[precision], width)
    assert column.is_null().to_list() == (~VALID).tolist()
    got = column.filter(column.is_not_null()).to_numpy()
    assert got.dtype == stored.dtype and np.array_equal(got, stored[VALID])

    rows = duckdb.connect().sql(f"select embedding from '{result.output}'").fetchall()
    assert [r[0] is None for r in rows] == (~VALID).tolist()
    from_duckdb = np.array([r[0] for r in rows if r[0] is not None], dtype=np.float64)
    assert np.array_equal(from_duckdb, stored[VALID].astype(np.float64))


# --- --calibration ------------------------------------------------------------------------------


def test_calibration_from_an_earlier_sidecar_reuses_its_ranges(runs: Runs) -> None:
    first = runs.quantized("int8", None)
    first_ranges = np.asarray(vectors_of(first)["ranges"], dtype=np.float32)
    other_floats = embeddings(runs.get("other_f32", input=runs.other).output)
    reused = runs.get("other_int8", input=runs.other, output_precision="int8", calibration=first.sidecar)
    v = vectors_of(reused)
    ranges = np.asarray(v["ranges"], dtype=np.float32)
    assert np.array_equal(ranges, first_ranges)
    assert v["calibration"]["source"] == str(first.sidecar) and v["calibration"]["vectors"] == CALIBRATION_SIZE
    own = np.vstack([other_floats.min(0), other_floats.max(0)])
    assert not np.array_equal(ranges, own)  # not the new job's own vectors
    assert np.array_equal(embeddings(reused.output), quantize_embeddings(other_floats, "int8", ranges=first_ranges))


def test_calibration_from_a_file_of_texts(runs: Runs) -> None:
    other_floats = embeddings(runs.get("other_f32", input=runs.other).output)
    floats = embeddings(runs.base().output)[VALID]
    result = runs.get("uint8_from_texts", output_precision="uint8", calibration=runs.other, calibration_size=10)
    v = vectors_of(result)
    ranges = np.asarray(v["ranges"], dtype=np.float32)
    assert np.array_equal(ranges, np.vstack([other_floats[:10].min(0), other_floats[:10].max(0)]))
    assert v["calibration"]["source"] == str(runs.other) and v["calibration"]["vectors"] == 10
    assert np.array_equal(embeddings(result.output)[VALID], quantize_embeddings(floats, "uint8", ranges=ranges))
    assert null_mask(result.output).tolist() == (~VALID).tolist()


def test_calibration_with_truncate_dim_from_a_file_of_texts(runs: Runs) -> None:
    other_floats = embeddings(runs.get("other_t128", input=runs.other, truncate_dim=128).output)
    floats = embeddings(runs.t128().output)[VALID]
    result = runs.get("int8_128_from_texts", output_precision="int8", truncate_dim=128, calibration=runs.other)
    ranges = np.asarray(vectors_of(result)["ranges"], dtype=np.float32)
    assert np.array_equal(ranges, np.vstack([other_floats.min(0), other_floats.max(0)]))  # all 16 (< 1000) texts
    assert vectors_of(result)["calibration"]["vectors"] == len(OTHER_TEXTS)
    assert np.array_equal(embeddings(result.output)[VALID], quantize_embeddings(floats, "int8", ranges=ranges))


def test_calibration_with_float_output_exits_2(tmp_path: Path, runs: Runs) -> None:
    sidecar = runs.quantized("int8", None).sidecar
    out = tmp_path / "o.parquet"
    for precision in ("float32", "binary"):
        result = cli("embed", runs.src, "-o", out, "--model", MODEL, "--output-precision", precision,
                     "--calibration", sidecar)
        assert result.exit_code == 2, result.output
        assert "--calibration sets the ranges" in result.stderr and result.stderr.count("\n") == 1
        assert not out.exists()


def test_calibration_sidecar_of_another_dimension_exits_2(tmp_path: Path, runs: Runs) -> None:
    sidecar = runs.quantized("int8", 128).sidecar  # ranges of 128 dimensions
    out = tmp_path / "o.parquet"
    result = cli("embed", runs.src, "-o", out, "--model", MODEL, "--cache-dir", runs.cache, "--output-precision", "int8",
                 "--calibration", sidecar)
    assert result.exit_code == 2, result.output
    assert "its ranges are for 128-dimensional vectors, this job writes 384" in " ".join(result.stderr.split())
    assert "Traceback" not in result.output and not out.exists()
    # the same sidecar fits a job of the same --truncate-dim
    fits = cli("embed", runs.src, "-o", out, "--model", MODEL, "--cache-dir", runs.cache, "--output-precision", "uint8",
               "--truncate-dim", "128", "--calibration", sidecar, "--quiet")
    assert fits.exit_code == 3, fits.output  # complete, two rows marked
    assert pq.read_table(out).schema.field("embedding").type == pa.list_(pa.uint8(), 128)


def test_calibration_missing_file_exits_2(tmp_path: Path, runs: Runs) -> None:
    out = tmp_path / "o.parquet"
    result = cli("embed", runs.src, "-o", out, "--model", MODEL, "--output-precision", "int8",
                 "--calibration", tmp_path / "nope.meta.json")
    assert result.exit_code == 2 and "no such file" in result.stderr
    assert not out.exists()


def test_calibration_sidecar_without_ranges_exits_2(tmp_path: Path, runs: Runs) -> None:
    sidecar = runs.base().sidecar  # a float32 run: "ranges": null
    out = tmp_path / "o.parquet"
    result = cli("embed", runs.src, "-o", out, "--model", MODEL, "--cache-dir", runs.cache, "--output-precision", "int8",
                 "--calibration", sidecar)
    assert result.exit_code == 2, result.output
    assert "--calibration" in result.stderr and result.stderr.count("\n") == 1
    assert not out.exists()


# --- calibration that cannot be one (hostile-review findings) ------------------------------------


def test_ranges_from_too_few_vectors_are_refused(tmp_path: Path, runs: Runs) -> None:
    one = write_jsonl(tmp_path / "one.jsonl", [{"text": TEXTS[0]}])
    for args in (["--calibration-size", "1"], ["--calibration", one]):
        out = tmp_path / "o.parquet"
        result = cli("embed", runs.src, "-o", out, "--model", MODEL, "--cache-dir", runs.cache, "--output-precision", "int8",
                     "--quiet", *args)
        assert result.exit_code == 2 and "ranges need at least" in result.stderr, (args, result.output)
        assert not out.exists()


def test_a_sidecar_whose_ranges_are_not_ranges_or_not_of_these_vectors_is_refused(tmp_path: Path, runs: Runs) -> None:
    first = runs.quantized("int8", None)
    document = json.loads(first.sidecar.read_text())
    cases = {}
    inverted = json.loads(json.dumps(document))
    inverted["provenance"]["vectors"]["ranges"] = [document["provenance"]["vectors"]["ranges"][1],
                                                   document["provenance"]["vectors"]["ranges"][0]]
    cases["inverted"] = (inverted, "not finite minimums below their maximums")
    nan = json.loads(json.dumps(document))
    nan["provenance"]["vectors"]["ranges"][0][3] = float("nan")
    cases["nan"] = (nan, "not finite minimums below their maximums")
    other = json.loads(json.dumps(document))
    other["provenance"]["normalize"] = False
    cases["unnormalized"] = (other, "normalize not the same")
    for name, (doc, message) in cases.items():
        path = tmp_path / f"{name}.meta.json"
        path.write_text(json.dumps(doc))
        out = tmp_path / f"{name}.parquet"
        result = cli("embed", runs.src, "-o", out, "--model", MODEL, "--cache-dir", runs.cache, "--output-precision",
                     "int8", "--calibration", path, "--quiet")
        assert result.exit_code == 2 and message in result.stderr, (name, result.output)
        assert not out.exists()


def test_a_jsonl_file_named_json_is_a_file_of_texts_not_a_sidecar(tmp_path: Path, runs: Runs) -> None:
    texts = tmp_path / "texts.json"
    texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:20]))
    result = runs.get("json_texts_int8", output_precision="int8", calibration=texts)
    calibration = vectors_of(result)["calibration"]
    assert calibration["source"] == str(texts) and calibration["vectors"] == 20
    bad = cli("embed", runs.src, "-o", tmp_path / "o.parquet", "--model", MODEL, "--output-precision", "int8",
              "--calibration", tmp_path / "cal.txt")
    assert bad.exit_code == 2  # no such file
    (tmp_path / "cal.txt").write_text("a\nb\n")
    bad = cli("embed", runs.src, "-o", tmp_path / "o.parquet", "--model", MODEL, "--output-precision", "int8",
              "--calibration", tmp_path / "cal.txt")
    assert bad.exit_code == 2 and "named .csv, .tsv, .jsonl" in bad.stderr and "--format" not in bad.stderr
