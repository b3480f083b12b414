"""The real `hfbatch` command, end to end: flags, output, summary, errors and exit codes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import diskcache
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from conftest import SAMPLE_TEXTS, rows_for, write_csv, write_jsonl, write_parquet
from hfbatch.cli import app

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


def run(*args: str):
    return runner.invoke(app, list(args))


def test_embed_csv_prints_summary(tmp_path: Path) -> None:
    src = write_csv(tmp_path / "reviews.csv", rows_for(SAMPLE_TEXTS))
    result = run("embed", str(src), "-o", str(tmp_path / "out.parquet"))
    assert result.exit_code == 0, result.output
    assert "rows" in result.stdout and f"{len(SAMPLE_TEXTS)} read" in result.stdout
    assert "hit rate" in result.stdout
    assert pq.read_table(tmp_path / "out.parquet").num_rows == len(SAMPLE_TEXTS)


def test_json_prints_the_sidecar_document(tmp_path: Path) -> None:
    rows = [{"id": i, "title": f"t{i}", "body": t} for i, t in enumerate(SAMPLE_TEXTS)]
    src = write_jsonl(tmp_path / "data.jsonl", rows)
    result = run("embed", str(src), "-o", str(tmp_path / "out.parquet"), "--text-column", "body", "--keep", "id,title", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc == json.loads((tmp_path / "out.parquet.meta.json").read_text())
    assert pq.read_table(tmp_path / "out.parquet").column_names[:2] == ["id", "title"]


def test_quiet_prints_nothing(tmp_path: Path) -> None:
    src = write_csv(tmp_path / "in.csv", rows_for(SAMPLE_TEXTS[:2]))
    result = run("embed", str(src), "-o", str(tmp_path / "out.parquet"), "--quiet")
    assert result.exit_code == 0 and result.stdout == ""


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda d: [str(d / "missing.csv"), "-o", str(d / "o.parquet")], "missing.csv: no such file"),
        (lambda d: [str(write_csv(d / "in.csv", [{"id": 1, "body": "x"}])), "-o", str(d / "o.parquet")],
         "has no column 'text'; columns are: id, body. Use --text-column"),
        (lambda d: [str(write_csv(d / "in.csv", rows_for(["a"]))), "-o", str(d / "o.parquet"), "--batch-size", "0"],
         "--batch-size must be at least 1"),
        (lambda d: [str(write_csv(d / "in.txt", rows_for(["a"]))), "-o", str(d / "o.parquet")], "pass --format"),
        (lambda d: [str(write_csv(d / "in.csv", rows_for(["a"]))), "-o", str(d / "o.csv")], "give it a .parquet name"),
        (lambda d: [str(write_csv(d / "in.csv", rows_for(["a"]))), "-o", str(d / "o.parquet"), "--on-invalid", "drop"],
         "--on-invalid 'drop' is not one of"),
        (lambda d: [str(write_csv(d / "in.csv", rows_for(["a"]))), "-o", str(d / "o.parquet"), "--device", "gpu"],
         "--device 'gpu' is not a device"),
        # refused before the model would load (an unknown model would otherwise be exit 1)
        (lambda d: [str(write_csv(d / "in.csv", rows_for(["a"]))), "-o", str(d / "o.parquet"), "--max-errors", "-1",
                    "--model", "nobody/no-such-model"], "--max-errors must be 0 or more (got -1)"),
    ],
)
def test_input_errors_exit_2_with_one_line(tmp_path: Path, make_args, message: str) -> None:
    result = run("embed", *make_args(tmp_path))
    assert result.exit_code == 2
    assert message in " ".join(result.stderr.split())
    assert "Traceback" not in result.output
    assert not (tmp_path / "o.parquet").exists()


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "nan"], "--temperature must be a finite number >= 0 (got nan)"),
    (["--temperature", "-1"], "--temperature must be a finite number >= 0"),
    (["--top-p", "0"], "--top-p must be a number in (0, 1]"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
])
def test_generate_usage_errors_exit_2_before_the_model_loads(tmp_path: Path, flags: list[str], message: str) -> None:
    src = write_csv(tmp_path / "in.csv", [{"prompt": "hello"}])
    result = run("generate", str(src), "-o", str(tmp_path / "o.parquet"), "--model", "nobody/no-such-model", *flags)
    assert result.exit_code == 2, result.output  # the unknown model was never asked for (that would be exit 1)
    assert message in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / "o.parquet").exists()


def test_errors_are_one_line_when_stderr_is_not_a_terminal(tmp_path: Path) -> None:
    """Under cron or a Makefile stderr is a pipe; rich would wrap at 80 columns. A missing tokenizer's
    error (a long library message that spans lines) must still be one line."""
    src = write_csv(tmp_path / "in.csv", rows_for(["good"]))
    (tmp_path / "no-tokenizer").mkdir()  # a directory without tokenizer files: transformers' message has 5 lines
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    proc = subprocess.run([sys.executable, "-m", "hfbatch", "embed", str(src), "-o", str(tmp_path / "o.parquet"),
                           "--quiet", "--backend", "tei", "--endpoint", "http://127.0.0.1:9/",
                           "--tokenizer", str(tmp_path / "no-tokenizer")], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("ModelLoadError: cannot load the tokenizer of ") and "no-tokenizer" in proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert not (tmp_path / "o.parquet").exists()


def test_bad_row_with_on_invalid_fail_exits_2(tmp_path: Path) -> None:
    src = write_csv(tmp_path / "in.csv", rows_for(["good", "", "fine"]))
    result = run("embed", str(src), "-o", str(tmp_path / "o.parquet"), "--on-invalid", "fail")
    assert result.exit_code == 2
    assert "row 2, column 'text': empty text" in result.stderr
    assert not (tmp_path / "o.parquet").exists()


def test_unknown_model_exits_1_without_output(tmp_path: Path) -> None:
    src = write_csv(tmp_path / "in.csv", rows_for(["good"]))
    result = run("embed", str(src), "-o", str(tmp_path / "o.parquet"), "--model", "nobody/no-such-model")
    assert result.exit_code == 1
    assert "ModelLoadError" in result.stderr and "pass a local model directory" in result.stderr
    assert "Traceback" not in result.output and not (tmp_path / "o.parquet").exists()


def test_debug_shows_traceback(tmp_path: Path) -> None:
    result = run("embed", str(tmp_path / "missing.csv"), "-o", str(tmp_path / "o.parquet"), "--debug")
    assert result.exit_code == 2 and "Traceback" in result.stderr


def test_every_command_has_help() -> None:
    import typer.main

    group = typer.main.get_command(app)
    for name, command in group.commands.items():  # type: ignore[attr-defined]
        assert command.help, f"{name} has no help text"
        result = run(name, "--help")
        assert result.exit_code == 0 and "Usage" in result.stdout
    assert run("--version").stdout.startswith("hfbatch ")


def test_token_never_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "hf_" + "Zq9" * 12
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setenv("HUGGINGFACE_TOKEN", secret)
    src = write_csv(tmp_path / "in.csv", rows_for(["good"]))
    # a token pasted into the command line by mistake is redacted too
    result = run("embed", str(src), "-o", str(tmp_path / "o.parquet"), "--model", f"./{secret}", "--json")
    assert secret not in result.output
    ok = run("embed", str(src), "-o", str(tmp_path / "o.parquet"), "--json")
    assert ok.exit_code == 0
    for path in (tmp_path / "o.parquet", tmp_path / "o.parquet.meta.json"):
        assert secret.encode() not in path.read_bytes()
    assert secret not in ok.output


def _cached_entries(cache_dir: Path) -> int:
    if not (cache_dir / "cache.db").exists():
        return 0
    with diskcache.Cache(str(cache_dir)) as cache:
        return len(cache) // 2  # each text has two entries: its vector and its token count


def test_killed_run_leaves_no_output_and_rerun_resumes(tmp_path: Path) -> None:
    texts = [f"Row {i}: a product review that says the item number {i} is {'great' if i % 3 else 'poor'}." for i in range(240)]
    src = write_csv(tmp_path / "in.csv", rows_for(texts))
    out = tmp_path / "out.parquet"
    cache_dir = tmp_path / "cache"
    cmd = [sys.executable, "-m", "hfbatch", "embed", str(src), "-o", str(out), "--chunk-size", "40",
           "--batch-size", "8", "--cache-dir", str(cache_dir), "--quiet"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HFBATCH_RUNTIME": "onnx"}  # no torch import: seconds less
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while _cached_entries(cache_dir) < 40 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGSTOP)  # frozen mid-job, however fast this machine is
    assert proc.poll() is None, "the job finished before it could be killed; make the input larger"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists() and not (tmp_path / "out.parquet.meta.json").exists()
    stored = _cached_entries(cache_dir)
    assert 40 <= stored < 240
    rerun = subprocess.run([*cmd[:-1], "--json"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    document = json.loads(rerun.stdout)
    assert document["provenance"]["command"][:3] == ["hfbatch", "embed", str(src)]
    metrics = document["metrics"]
    assert metrics["cache"]["hits"] >= stored  # everything embedded before the kill is reused
    assert metrics["texts_computed"] == 240 - metrics["cache"]["hits"]
    assert pq.read_table(out).column("text").to_pylist() == texts
    assert not list(tmp_path.glob(".out.parquet.*"))  # the killed run's temp file was cleaned up


def test_marked_rows_exit_3_and_max_errors_stops_with_exit_1(tmp_path: Path) -> None:
    rows = [{"id": i, "text": t} for i, t in enumerate(["fine", "", "also fine", None, "   ", "ok"])]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    marked = run("embed", str(src), "-o", str(tmp_path / "a.parquet"))
    assert marked.exit_code == 3, marked.output  # complete, but 3 rows carry an error mark
    assert "3 rows marked invalid" in marked.stderr
    assert pq.read_table(tmp_path / "a.parquet").num_rows == 6
    skipped = run("embed", str(src), "-o", str(tmp_path / "b.parquet"), "--on-invalid", "skip")
    assert skipped.exit_code == 0 and pq.read_table(tmp_path / "b.parquet").num_rows == 3  # dropped on purpose
    within = run("embed", str(src), "-o", str(tmp_path / "c.parquet"), "--max-errors", "3")
    assert within.exit_code == 3
    over = run("embed", str(src), "-o", str(tmp_path / "d.parquet"), "--max-errors", "2")
    assert over.exit_code == 1 and "more than --max-errors 2 rows are invalid (3 so far" in over.stderr
    assert "row 2:" in over.stderr and not (tmp_path / "d.parquet").exists()


def test_dry_run_plans_and_writes_nothing(tmp_path: Path) -> None:
    texts = [f"text number {i} " * (1 + i % 4) for i in range(40)]
    src = write_csv(tmp_path / "in.csv", [{"id": i, "text": t} for i, t in enumerate(texts + ["", texts[0]])])
    cache = tmp_path / "cache"
    first = run("embed", str(src), "-o", str(tmp_path / "o.parquet"), "--cache-dir", str(cache), "--dry-run", "--json")
    assert first.exit_code == 0, first.output
    plan = json.loads(first.stdout)
    assert (plan["rows"], plan["rows_invalid"], plan["texts_distinct"]) == (42, 1, 40)
    assert plan["cache"] == {"used": False, "expected_hits": 0, "texts_to_compute": 40}
    assert plan["model_calls"] == 2 and plan["tokens_to_compute"] > 40 and plan["eta_seconds"] > 0
    assert not (tmp_path / "o.parquet").exists() and not cache.exists()  # nothing written, not even a cache
    half = write_csv(tmp_path / "half.csv", [{"id": i, "text": t} for i, t in enumerate(texts[:25])])
    assert run("embed", str(half), "-o", str(tmp_path / "h.parquet"), "--cache-dir", str(cache)).exit_code == 0
    again = json.loads(run("embed", str(src), "-o", str(tmp_path / "o.parquet"), "--cache-dir", str(cache), "--dry-run",
                           "--json").stdout)
    assert again["cache"]["expected_hits"] == 25 and again["cache"]["texts_to_compute"] == 15
    table = run("embed", str(src), "-o", str(tmp_path / "o.parquet"), "--cache-dir", str(cache), "--dry-run")
    assert table.exit_code == 0 and "nothing written" in table.stdout and "25 expected hits" in table.stdout
    assert not (tmp_path / "o.parquet").exists()


def test_verify_re_embeds_a_sample_and_catches_tampering(tmp_path: Path) -> None:
    texts = [f"verify row {i}: " + SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)] for i in range(30)]
    src = write_csv(tmp_path / "in.csv", [{"id": i, "text": t} for i, t in enumerate(texts + [""])])
    out = tmp_path / "o.parquet"
    assert run("embed", str(src), "-o", str(out)).exit_code == 3  # one empty row marked
    ok = run("verify", str(out), "--sample", "10", "--json")
    assert ok.exit_code == 0, ok.output
    report = json.loads(ok.stdout)
    assert report["rows_checked"] == 10 and report["agree"] == 10 and report["cosine_min"] > 0.9999
    assert report["same_fingerprint"] is True and report["bar"] == "faithful" and report["tolerance"] == 0.999
    # tamper: swap two stored vectors, as a buggy script writing results back might
    import pyarrow as pa

    table = pq.read_table(out)
    vectors = table.column("embedding").to_pylist()
    vectors[0], vectors[1] = vectors[1], vectors[0]
    column = pa.array(vectors, table.schema.field("embedding").type)
    pq.write_table(table.set_column(table.schema.get_field_index("embedding"), "embedding", column), out)
    bad = run("verify", str(out), "--sample", "31")
    assert bad.exit_code == 1 and "28/30 sampled rows agree" in bad.stdout  # the two swapped rows disagree
    missing = run("verify", str(tmp_path / "nothing.parquet"))
    assert missing.exit_code == 2 and "cannot read the sidecar" in missing.stderr


def test_verify_of_an_onnx_int8_output_holds_it_to_the_int8_bar_and_names_a_recipe_no_longer_made(tmp_path: Path) -> None:
    texts = [f"row {i}: " + " ".join(SAMPLE_TEXTS[j % len(SAMPLE_TEXTS)] for j in range(i % 7 + 1)) for i in range(60)]
    src = write_csv(tmp_path / "in.csv", [{"id": i, "text": t} for i, t in enumerate(texts)])
    out = tmp_path / "o.parquet"
    assert run("embed", str(src), "-o", str(out), "--runtime", "onnx", "--quantize", "int8").exit_code == 0
    report = json.loads(run("verify", str(out), "--sample", "60", "--json").stdout)
    # compared with the model itself (torch fp32 sentence-transformers), never with int8 again, at the int8 bar
    assert report["reference"] == "sentence-transformers, torch fp32" and report["bar"] == "int8"
    assert report["ok"] and report["tolerance"] == 0.98 and report["agree"] == 60
    assert report["cosine_min"] < 0.999  # the faithful bar would have called it damaged
    assert report["same_fingerprint"] and "note" not in report
    line = run("verify", str(out), "--sample", "5").stdout
    assert "re-embedded by sentence-transformers, torch fp32 at cosine >= 0.98 (the int8 bar, made by onnx int8)" in line
    sidecar = Path(f"{out}.meta.json")
    document = json.loads(sidecar.read_text())
    document["provenance"]["backends"]["local"]["quantize"] = "int8-sq0.8-ffn1fp32-b7f7d0d45275"  # an older recipe
    sidecar.write_text(json.dumps(document))
    said = run("verify", str(out), "--sample", "5")
    assert "NOTE: the run used int8 recipe int8-sq0.8-ffn1fp32-b7f7d0d45275, which this version no longer makes" in said.stdout


def test_dry_run_counts_windows_and_the_rows_the_output_will_have(tmp_path: Path) -> None:
    long = " ".join(SAMPLE_TEXTS) * 8  # several windows of 64 tokens
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": long}, {"text": "short"}, {"text": None}, {"text": long}])
    plan = json.loads(run("embed", str(src), "-o", str(tmp_path / "o.parquet"), "--split", "tokens:64", "--dry-run",
                          "--json", "--cache-dir", str(tmp_path / "c")).stdout)
    done = run("embed", str(src), "-o", str(tmp_path / "o.parquet"), "--split", "tokens:64", "--json",
               "--cache-dir", str(tmp_path / "c"))
    metrics = json.loads(done.stdout)["metrics"]
    assert plan["windows"] == metrics["windows"] > 4 and plan["output_rows"] == pq.read_table(tmp_path / "o.parquet").num_rows
    assert plan["texts_distinct"] == metrics["texts_computed"]  # the two long rows share every window
    mean = json.loads(run("embed", str(src), "-o", str(tmp_path / "m.parquet"), "--split", "tokens:64", "--aggregate",
                          "mean", "--dry-run", "--json").stdout)
    assert mean["output_rows"] == 4 and mean["windows"] == plan["windows"]


@pytest.mark.parametrize("shaping", [
    ["--split", "tokens:64", "--aggregate", "mean"], ["--split", "tokens:64"], ["--prompt", "query: ", "--truncate-dim", "96"],
    ["--output-precision", "int8", "--truncate-dim", "128"], ["--output-precision", "ubinary"], ["--output-precision", "float16"],
])
def test_verify_checks_outputs_as_they_were_shaped(tmp_path: Path, shaping: list[str]) -> None:
    texts = [f"verify row {i}: " + " ".join(SAMPLE_TEXTS[: 1 + i % 6]) * (1 + i % 3) for i in range(24)]
    src = write_csv(tmp_path / "in.csv", [{"id": i, "text": t} for i, t in enumerate(texts)])
    out = tmp_path / "o.parquet"
    assert run("embed", str(src), "-o", str(out), "--cache-dir", str(tmp_path / "c"), *shaping).exit_code == 0
    report = json.loads(run("verify", str(out), "--sample", "12", "--json").stdout)
    assert report["ok"] is True and report["agree"] == report["rows_checked"] > 0 and report["cosine_min"] > 0.999
    table = pq.read_table(out)  # tamper: every stored vector replaced by the next row's
    vectors = table.column("embedding").to_pylist()
    column = pa.array(vectors[1:] + vectors[:1], table.schema.field("embedding").type)
    pq.write_table(table.set_column(table.schema.get_field_index("embedding"), "embedding", column), out)
    bad = json.loads(run("verify", str(out), "--sample", "12", "--json").stdout)
    assert bad["ok"] is False and bad["agree"] < bad["rows_checked"]


def test_embed_and_generate_share_the_job_options() -> None:
    import typer.main

    group = typer.main.get_command(app)
    params = {name: {p.name: p for p in group.commands[name].params} for name in ("embed", "generate")}  # type: ignore[attr-defined]
    for name in ("metrics_file", "log_file", "max_errors", "max_line_bytes", "keep", "fmt", "quiet", "cache_dir"):
        embed, generate = params["embed"][name], params["generate"][name]
        assert (embed.opts, embed.help) == (generate.opts, generate.help), name  # declared once, at the top of cli.py


def test_the_library_and_the_cli_agree_on_a_directory_of_parts(tmp_path: Path) -> None:
    """`hfbatch.embed(EmbedOptions(input=dir, ...))` does what `hfbatch embed dir -o out/` does: the
    same engine (many parts), the same files, the same vectors."""
    import numpy as np

    import hfbatch

    data = tmp_path / "data"
    (data / "nested").mkdir(parents=True)
    write_csv(data / "a.csv", rows_for(SAMPLE_TEXTS[:5]))
    write_jsonl(data / "nested" / "b.jsonl", rows_for(SAMPLE_TEXTS[3:]))
    cli = run("embed", str(data), "-o", str(tmp_path / "cli-out"), "--quiet")
    assert cli.exit_code == 0, cli.output
    library = hfbatch.embed(hfbatch.EmbedOptions(input=data, output=tmp_path / "lib-out"))
    assert isinstance(library, hfbatch.PartsResult) and not library.failed

    def parts(out: Path) -> dict[str, object]:
        return {str(p.relative_to(out)): pq.read_table(p) for p in sorted(out.rglob("*.parquet"))}

    from_cli, from_library = parts(tmp_path / "cli-out"), parts(tmp_path / "lib-out")
    assert sorted(from_cli) == sorted(from_library) == ["a.parquet", "nested/b.parquet"]
    for name, table in from_cli.items():
        other = from_library[name]
        assert table.column("id").to_pylist() == other.column("id").to_pylist()  # type: ignore[attr-defined]
        got = np.array(table.column("embedding").to_pylist())  # type: ignore[attr-defined]
        assert np.abs(got - np.array(other.column("embedding").to_pylist())).max() < 1e-6  # type: ignore[attr-defined]
    single = hfbatch.embed(hfbatch.EmbedOptions(input=data / "a.csv", output=tmp_path / "a.parquet"))
    assert isinstance(single, hfbatch.EmbedResult) and single.metrics["rows_written"] == 5


@pytest.mark.parametrize("case", ["sidecar-is-the-input", "metrics-file-is-the-input", "log-file-is-the-output",
                                  "metrics-file-is-a-device", "output-is-the-input-through-dotdot"])
def test_every_path_a_job_writes_is_checked_before_any_work(tmp_path: Path, case: str) -> None:
    """Each of these overwrote or appended to a file the user gave (exit 0) or replaced a device node."""
    src = write_jsonl(tmp_path / "in.jsonl", rows_for(SAMPLE_TEXTS[:3]))
    before = src.read_bytes()
    out = str(tmp_path / "out.parquet")
    args = {
        "sidecar-is-the-input": [str(write_jsonl(tmp_path / "out.parquet.meta.json", rows_for(["x"]))), "-f", "jsonl",
                                 "-o", out],
        "metrics-file-is-the-input": [str(src), "-o", out, "--metrics-file", str(src)],
        "log-file-is-the-output": [str(src), "-o", out, "--log-file", out],
        "metrics-file-is-a-device": [str(src), "-o", out, "--metrics-file", "/dev/null"],
        "output-is-the-input-through-dotdot": [str(write_parquet(tmp_path / "in.parquet", rows_for(["x"]))), "-o",
                                               str(tmp_path / "sub" / ".." / "in.parquet")],
    }[case]
    (tmp_path / "sub").mkdir()
    given = {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    result = run("embed", *args, "--model", "nobody/no-such-model")  # refused before the model is asked for
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output
    assert {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == given  # nothing written or changed
    assert src.read_bytes() == before and not Path("/dev/null").is_file()


def test_verify_names_the_fix_for_a_split_output_without_its_text_column(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "text": " ".join(SAMPLE_TEXTS) * 3} for i in range(3)])
    out = tmp_path / "o.parquet"
    assert run("embed", str(src), "-o", str(out), "--split", "tokens:64", "--keep", "id").exit_code == 0
    result = run("verify", str(out))
    assert result.exit_code == 2 and "keep it (--keep) to verify" in result.stderr and "changed" not in result.stderr


def test_the_quick_exit_keeps_what_a_normal_exit_does(tmp_path: Path) -> None:
    """main() leaves without the interpreter's module teardown once torch is imported; threads
    still finish, atexit handlers still run, the exit code and a SystemExit message still arrive."""
    script = f"""
import atexit, threading, time, torch
from pathlib import Path
from hfbatch.cli import _exit_quickly
atexit.register(lambda: Path({str(tmp_path / 'atexit')!r}).write_text('ran'))
def late():
    time.sleep(0.3)
    Path({str(tmp_path / 'thread')!r}).write_text('done')
threading.Thread(target=late).start()
print('buffered output', end='')
_exit_quickly({{code}})
raise SystemExit('not reached')
"""
    for code, rc in (("3", 3), ("'usage: bad'", 1), ("None", 0)):
        proc = subprocess.run([sys.executable, "-c", script.replace("{code}", code)], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == rc, proc.stderr
        assert proc.stdout == "buffered output" and "not reached" not in proc.stderr
        assert ("usage: bad" in proc.stderr) == (rc == 1)
        assert (tmp_path / "atexit").read_text() == "ran" and (tmp_path / "thread").read_text() == "done"
        for f in ("atexit", "thread"):
            (tmp_path / f).unlink()
