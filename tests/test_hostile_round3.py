"""Round 3 of hostile input (issue 22, items 4-8): prompts that leave no room for the text, model
configs that are not what sentence-transformers loads, --calibration files that are no sidecar
(or no file), --truncate-dim above the model's dimension, and --split advice that must work.

Each refusal comes before any model work where the flaw is known from files: the tests that say
so make measuring or embedding fail the test (LocalBackend.prepare / embed), so "exit 2" cannot
come from a job that ran. The real bundled MiniLM and its tokenizer otherwise; a copy of its
folder (weights linked, configs rewritten) stands for a model with hostile files."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import pytest
from conftest import BUNDLED_MODEL_DIR, rows_for, write_csv
from typer.testing import CliRunner

from hfbatch import EmbedOptions, InputError, encode
from hfbatch.backends.hub import resolve_model_dir
from hfbatch.backends.local import LocalBackend
from hfbatch.backends.windows import fit_windows
from hfbatch.cli import app
from hfbatch.errors import ModelLoadError
from hfbatch.jobs.embed import run_embed
from hfbatch.settings import DEFAULT_MODEL

MODEL = str(BUNDLED_MODEL_DIR)
LIMIT, DIM = 256, 384  # what the bundled MiniLM reads and makes
ST_CONFIG = "config_sentence_transformers.json"
runner = CliRunner()


def cli(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def one_line(stderr: str) -> str:
    assert stderr.count("\n") == 1 and "Traceback" not in stderr, stderr
    return stderr.strip()


@pytest.fixture
def src(tmp_path: Path) -> Path:
    return write_csv(tmp_path / "in.csv", rows_for([f"review number {i}: the kettle works." for i in range(10)]))


@pytest.fixture
def no_model_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Measuring the runtimes or embedding a text fails the test: the refusal must come first."""
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("model work before the refusal")

    monkeypatch.setattr(LocalBackend, "prepare", forbidden)
    monkeypatch.setattr(LocalBackend, "embed", forbidden)


def model_copy(root: Path, files: dict[str, object] | None = None) -> Path:
    """The bundled model's folder as hfbatch resolves it, its weights linked, with `files`
    (relative name -> a JSON value, or raw text) written over its own."""
    bundled, _ = resolve_model_dir(DEFAULT_MODEL)  # offline in tests: the bundled package
    shutil.copytree(bundled, root, copy_function=os.symlink)
    for name, value in (files or {}).items():
        target = root / name
        target.unlink(missing_ok=True)
        target.write_text(value if isinstance(value, str) else json.dumps(value), encoding="utf-8")
    return root


def prompt_of(tokens: int) -> str:
    """A prompt of `tokens` tokens once the model's two specials ([CLS], [SEP]) are counted."""
    return "query " * (tokens - 2)


# --- item 4: a prompt longer than the model reads -------------------------------------------------


def test_a_prompt_with_no_room_for_text_exits_2_before_any_model_work(tmp_path: Path, src: Path,
                                                                       no_model_work: None) -> None:
    out = tmp_path / "o.parquet"
    result = cli("embed", src, "-o", out, "--model", MODEL, "--prompt", "query " * 2000)
    assert result.exit_code == 2, result.output
    line = one_line(result.stderr)
    assert line.startswith("InputError: --prompt is 2002 tokens") and f"reads {LIMIT} tokens" in line, line
    assert "shorter prompt" in line
    assert not out.exists()


def test_a_prompt_exactly_filling_the_limit_is_refused_and_one_token_less_is_not(tmp_path: Path, src: Path,
                                                                                   no_model_work: None) -> None:
    full = cli("embed", src, "-o", tmp_path / "a.parquet", "--model", MODEL, "--prompt", prompt_of(LIMIT))
    assert full.exit_code == 2 and f"is {LIMIT} tokens" in full.stderr, full.output
    # one token for the text: accepted (with the warning); it then reaches the model, which is forbidden here
    with pytest.raises(AssertionError, match="model work"):
        run_embed(EmbedOptions(input=src, output=tmp_path / "b.parquet", model=MODEL, prompt=prompt_of(LIMIT - 1)))


def test_the_in_memory_encode_refuses_it_too(no_model_work: None) -> None:
    with pytest.raises(InputError, match=f"--prompt is 2002 tokens .* reads {LIMIT} tokens"):
        encode(["a text"], model=MODEL, prompt="query " * 2000)


def test_a_models_own_default_prompt_with_no_room_is_refused_before_it_embeds(tmp_path: Path, src: Path,
                                                                             no_model_work: None) -> None:
    root = model_copy(tmp_path / "long-default", {ST_CONFIG: {"prompts": {"query": "query " * 300},
                                                              "default_prompt_name": "query"}})
    out = tmp_path / "o.parquet"
    result = cli("embed", src, "-o", out, "--model", root, "--quiet")  # (judged once the job starts: no bar)
    assert result.exit_code == 2, result.output
    line = one_line(result.stderr)
    assert "default prompt (config_sentence_transformers.json) is 302 tokens" in line and "--prompt ''" in line, line
    assert not out.exists()
    named = cli("embed", src, "-o", out, "--model", root, "--prompt-name", "query")
    assert named.exit_code == 2 and "--prompt-name query is 302 tokens" in named.stderr, named.output


def test_a_prompt_leaving_fewer_than_16_tokens_for_text_is_warned_about(tmp_path: Path, src: Path,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "o.parquet"
    with caplog.at_level(logging.WARNING):
        result = cli("embed", src, "-o", out, "--model", MODEL, "--prompt", prompt_of(LIMIT - 11), "--quiet")
    assert result.exit_code == 0, result.output
    warned = [r.getMessage() for r in caplog.records if "--prompt is" in r.getMessage()]
    assert len(warned) == 1, warned
    assert "\n" not in warned[0]
    assert f"is {LIMIT - 11} tokens" in warned[0] and f"leaving 11 of the {LIMIT}" in warned[0], warned[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # room enough: no warning
        assert cli("embed", src, "-o", out, "--model", MODEL, "--prompt", prompt_of(LIMIT - 16), "--quiet").exit_code == 0
    assert not [r for r in caplog.records if "--prompt is" in r.getMessage()]


# --- item 5: hostile config_sentence_transformers.json ---------------------------------------------


@pytest.mark.parametrize("config, field", [
    ([1, 2, 3], "not a JSON object"),
    ({"prompts": {"query": "query: "}, "default_prompt_name": ["query"]}, '"default_prompt_name" is ["query"]'),
    ({"prompts": {"query": {"x": 1}}, "default_prompt_name": "query"}, '"prompts" gives \'query\' the dict {"x": 1}'),
    ({"prompts": {"query": {"x": 1}}}, '"prompts" gives \'query\''),
    ({"prompts": ["query: "]}, '"prompts" is ["query: "]'),
    ({"prompts": {"query": "query: "}, "default_prompt_name": "passage"}, "\"default_prompt_name\" 'passage' is not one"),
    ('{"prompts": ' * 100000 + "}" * 100000, "not JSON"),
], ids=["list", "default-name-a-list", "prompt-an-object-default", "prompt-an-object", "prompts-a-list",
        "default-not-a-prompt", "nested-too-deep"])
def test_a_hostile_sentence_transformers_config_is_one_line_naming_the_file_and_field(
        tmp_path: Path, src: Path, no_model_work: None, config: object, field: str) -> None:
    root = model_copy(tmp_path / "hostile", {ST_CONFIG: config})
    target = root / ST_CONFIG
    out = tmp_path / "o.parquet"
    result = cli("embed", src, "-o", out, "--model", root, "--quiet")  # (found once the job starts: no bar)
    assert result.exit_code == ModelLoadError.exit_code, result.output
    line = one_line(result.stderr)
    assert line.startswith(f"ModelLoadError: {target}: "), line
    assert field in line, line
    assert not out.exists()
    with pytest.raises(ModelLoadError, match="config_sentence_transformers.json"):
        _ = LocalBackend(str(root)).prompt  # the library says the same


def test_a_null_prompt_is_the_empty_prompt_as_sentence_transformers_reads_it(tmp_path: Path) -> None:
    root = model_copy(tmp_path / "null-prompt", {ST_CONFIG: {"prompts": {"query": None}, "default_prompt_name": "query"}})
    assert LocalBackend(str(root)).prompt is None


def test_a_sentence_bert_config_that_is_not_an_object_is_one_line(tmp_path: Path, src: Path, no_model_work: None) -> None:
    root = model_copy(tmp_path / "hostile-sbert", {"sentence_bert_config.json": [1, 2, 3]})
    target = root / "sentence_bert_config.json"
    result = cli("embed", src, "-o", tmp_path / "o.parquet", "--model", root, "--quiet")
    assert result.exit_code == 1, result.output
    assert one_line(result.stderr).startswith(f"ModelLoadError: {target}: is list [1, 2, 3], not a JSON object")


# --- item 6: --calibration files that are no sidecar, or no file -----------------------------------


def calibration_cases(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    null_vectors = tmp_path / "null.meta.json"
    null_vectors.write_text(json.dumps({"provenance": {"model_id": MODEL, "vectors": None}, "metrics": {}}))
    deep = tmp_path / "deep.meta.json"
    deep.write_text('{"provenance": {"vectors": {"ranges": ' + "[" * 100000 + "]" * 100000 + "}}}")
    listed = tmp_path / "list.meta.json"
    listed.write_text("[1, 2, 3]")
    calibration = tmp_path / "calibration.meta.json"
    calibration.write_text(json.dumps({"provenance": {"model_id": MODEL, "normalize": True, "prompt": None, "vectors": {
        "ranges": [[-1.0] * DIM, [1.0] * DIM], "truncate_dim": None, "calibration": [1]}}}))
    folder = tmp_path / "folder.meta.json"
    folder.mkdir()
    return {
        "vectors-null": (null_vectors, "not an hfbatch sidecar (provenance.vectors is missing, not an object)"),
        "nested-too-deep": (deep, "not an hfbatch sidecar (JSON nested too deep to read)"),
        "a-list": (listed, "not an hfbatch sidecar (a JSON list, not an object)"),
        "dev-zero": (Path("/dev/zero"), "not a regular file (a device, pipe or socket)"),
        "a-directory": (folder, "not a regular file (a directory)"),
        "calibration-a-list": (calibration, ""),  # accepted: the record's odd member is only not copied
    }


@pytest.mark.parametrize("case", ["vectors-null", "nested-too-deep", "a-list", "dev-zero", "a-directory"])
def test_a_bad_calibration_file_is_one_line_exit_2(tmp_path: Path, src: Path, no_model_work: None, case: str) -> None:
    path, expected = calibration_cases(tmp_path)[case]
    out = tmp_path / "o.parquet"
    result = cli("embed", src, "-o", out, "--model", MODEL, "--output-precision", "int8", "--calibration", path)
    assert result.exit_code == 2, result.output
    line = one_line(result.stderr)
    assert line.startswith(f"InputError: --calibration {path}: {expected}"), line
    assert "give " in line  # and what to give instead
    assert not out.exists()


def test_a_sidecar_whose_calibration_record_is_odd_still_gives_its_ranges(tmp_path: Path) -> None:
    from hfbatch.jobs.embed import read_ranges

    path, _ = calibration_cases(tmp_path)["calibration-a-list"]
    ranges, record = read_ranges(path, DIM)
    assert ranges.shape == (2, DIM) and record == {"source": str(path), "vectors": None}


# --- item 7: --truncate-dim above the model's dimension ---------------------------------------------


def test_truncate_dim_above_the_models_dimension_exits_2_naming_it(tmp_path: Path, src: Path, no_model_work: None) -> None:
    out = tmp_path / "o.parquet"
    result = cli("embed", src, "-o", out, "--model", MODEL, "--truncate-dim", DIM + 1)
    assert result.exit_code == 2, result.output
    line = one_line(result.stderr)
    assert line.startswith(f"InputError: --truncate-dim {DIM + 1} is more than the {DIM} dimensions"), line
    assert f"--truncate-dim {DIM} or less" in line
    assert not out.exists() and not out.with_name(out.name + ".meta.json").exists()


def test_truncate_dim_above_the_dimension_is_refused_by_encode(no_model_work: None) -> None:
    with pytest.raises(InputError, match=f"--truncate-dim {DIM + 1} is more than the {DIM} dimensions"):
        encode(["a text"], model=MODEL, truncate_dim=DIM + 1)


def test_truncate_dim_is_checked_where_the_dimension_is_first_known(tmp_path: Path, src: Path) -> None:
    """A model whose files do not tell its dimension (modules.json names a Dense layer): the
    check waits for the first vectors, and still nothing is written."""
    from hfbatch.backends.local import LocalBackend as Local

    class NoFilesDim(Local):  # stands for a model whose size only its first vector tells
        def known_dimension(self) -> int | None:
            return self._dim if self._dim_from_vectors else None

        _dim_from_vectors = False

        def dimension(self) -> int:
            self._dim_from_vectors = True
            return super().dimension()

    out = tmp_path / "o.parquet"
    with pytest.raises(InputError, match=f"--truncate-dim {DIM + 1} is more than the {DIM} dimensions"):
        run_embed(EmbedOptions(input=src, output=out, model=MODEL, truncate_dim=DIM + 1), backend=NoFilesDim(MODEL))
    assert not out.exists()


# --- item 8: --split advice that works ---------------------------------------------------------------


def test_split_overlap_advice_fits_the_model(tmp_path: Path, src: Path, no_model_work: None) -> None:
    out = tmp_path / "o.parquet"
    result = cli("embed", src, "-o", out, "--model", MODEL, "--split", f"tokens:{LIMIT}", "--overlap", LIMIT - 1,
                 "--quiet")
    assert result.exit_code == 2, result.output
    line = one_line(result.stderr)
    assert f"--overlap {LIMIT - 3} or less" in line, line  # 256 - [CLS] - [SEP] - 1
    assert not re.search(r"at least (\d+)", line) or int(re.search(r"at least (\d+)", line).group(1)) <= LIMIT, line
    # the advised overlap works on the same model
    [windows] = LocalBackend(MODEL).split(["word " * 1000], LIMIT, LIMIT - 3)
    assert len(windows.spans) > 1 and max(w.n_tokens for w in windows.spans) <= LIMIT


def advised(message: str) -> list[tuple[int | None, int | None]]:
    """(N, overlap) pairs the message advises: None keeps the value given."""
    pairs: list[tuple[int | None, int | None]] = []
    if m := re.search(r"a larger N \(at least (\d+)", message):
        pairs.append((int(m.group(1)), None))
    if m := re.search(r"--split tokens:(\d+) with --overlap (\d+) or less", message):
        pairs.append((int(m.group(1)), int(m.group(2))))
    elif m := re.search(r"--overlap (\d+) or less", message):
        pairs.append((None, int(m.group(1))))
    return pairs


def test_every_value_the_split_advice_names_works() -> None:
    """Every (N, overhead, overlap) a model of up to `limit` tokens can be asked for: the refusal
    names at least one fix, or says why none exists, and every number it names works (N within
    the limit, the windows then fit)."""
    text = " ".join(f"w{i}" for i in range(40))
    offsets = [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]
    for limit in range(2, 14):
        for overhead in range(limit + 2):
            count = lambda texts, o=overhead: [len(t.split()) + o for t in texts]
            for size in range(2, limit + 1):
                for overlap in range(size):
                    if size - overhead > overlap:
                        continue  # fits: no advice
                    with pytest.raises(InputError) as caught:
                        fit_windows([text], [offsets], size=size, overlap=overlap, overhead=overhead, count=count,
                                    limit=limit)
                    message = str(caught.value)
                    fixes = advised(message)
                    if not fixes:
                        assert overhead >= limit and "shorter prompt" in message, message
                    for n, lap in fixes:
                        n, lap = n or size, overlap if lap is None else lap
                        assert 2 <= n <= limit and 0 <= lap < n, (message, n, lap)
                        fit_windows([text], [offsets], size=n, overlap=lap, overhead=overhead, count=count, limit=limit)


def test_the_advice_without_a_known_limit_is_as_before() -> None:
    from hfbatch.backends.windows import room_advice

    assert room_advice(10, 2, 9, None) == "use a larger N (at least 12) or --overlap 7 or less."
