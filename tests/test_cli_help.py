"""The CLI's surface for a new user: --help in panels with choices, -h, -V, shell completion."""

from __future__ import annotations

import re

import pytest
import typer.main
from typer.testing import CliRunner

from hfbatch import __version__
from hfbatch.cli import PANELS, app

runner = CliRunner()
WIDE = {"COLUMNS": "240"}  # rich wraps help at the terminal's width; wide, each option stays on one line


def _help(*args: str) -> str:
    result = runner.invoke(app, [*args, "--help"], env=WIDE)
    assert result.exit_code == 0, result.output
    return result.stdout


def _panels(text: str) -> dict[str, str]:
    """Option name -> the title of the help panel it is drawn in."""
    where, panel = {}, None
    for line in text.splitlines():
        title = re.match(r"\s*╭─ (.+?) ─", line)
        if title:
            panel = title.group(1)
            continue
        # a row: "│ *  --output  -o  <str>  help..." (the names come first, then the metavar and help)
        for token in line.strip("│ ").split()[:4]:
            if re.fullmatch(r"--?\w[\w-]*", token):
                where.setdefault(token, panel)
    return where


def _commands(group, prefix: tuple[str, ...] = ()):  # type: ignore[no-untyped-def]
    """(path, command) of every command and sub-command (typer vendors click: no isinstance on click's classes)."""
    for name, command in group.commands.items():
        yield (*prefix, name), command
        if hasattr(command, "commands"):
            yield from _commands(command, (*prefix, name))


def test_every_embed_option_is_drawn_in_one_of_the_named_panels() -> None:
    text = _help("embed")
    drawn = _panels(text)
    embed = typer.main.get_command(app).commands["embed"]  # type: ignore[attr-defined]
    options = [p for p in embed.params if p.param_type_name == "option"]
    assert len(options) > 40
    for option in options:
        for name in (*option.opts, *option.secondary_opts):
            assert drawn.get(name) in PANELS, f"{name} is drawn in {drawn.get(name)!r}, not one of {PANELS}"
    # the panels render (typer draws none without a markup mode), in the order a new user reads them
    titles = re.findall(r"╭─ (.+?) ─", text)
    assert [t for t in titles if t in PANELS] == list(PANELS)
    assert drawn["--delimiter"] == "Input" and drawn["--runtime"] == "Model and runtime"
    assert drawn["--ray-address"] == "Scale" and drawn["--quiet"] == "Reporting" and drawn["--cache-dir"] == "Cache"


def test_help_lists_the_choices_and_shows_env_brackets_literally() -> None:
    text = " ".join(_help("embed").split())
    for choices in ("mark|skip|fail", "float32|float16|int8|uint8|binary|ubinary", "auto|torch|onnx|openvino",
                    "auto|fp32|bf16|fp16", "auto|int8|none", "local|hf-api|tei|openai|auto", "csv|tsv|jsonl|parquet",
                    "local|ray"):
        assert choices in text, choices
    # rich markup would swallow an unescaped "[env: ...]" or "hfbatch[ray]"
    assert "[env: HFBATCH_MODEL; default: sentence-transformers/all-MiniLM-L6-v2]" in text
    assert "[env: HFBATCH_CACHE_DIR; default: user cache dir]" in text
    assert "hfbatch[openvino]" in text and "hfbatch[ray]" in text


def test_every_command_and_subcommand_has_help_and_answers_dash_h() -> None:
    group = typer.main.get_command(app)
    seen = []
    for path, command in _commands(group):  # type: ignore[arg-type]
        assert command.help, f"{' '.join(path)} has no help text"
        short = runner.invoke(app, [*path, "-h"], env=WIDE)
        assert short.exit_code == 0 and "Usage" in short.stdout, (path, short.output)
        assert short.stdout == runner.invoke(app, [*path, "--help"], env=WIDE).stdout
        seen.append(" ".join(path))
    assert {"embed", "generate", "cache", "cache info", "cache clear", "cache prune"} <= set(seen)


@pytest.mark.parametrize("flag", ["-V", "--version"])
def test_version_short_and_long(flag: str) -> None:
    result = runner.invoke(app, [flag])
    assert result.exit_code == 0 and result.stdout.strip() == f"hfbatch {__version__}"


def test_shell_completion_is_offered(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "--install-completion" in _help() and "--show-completion" in _help()
    # the shell named, not detected from the parent processes (a test run under nohup or a CI
    # runner has no shell above it: typer would then say "Shell  not supported")
    monkeypatch.setenv("_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION", "1")
    script = runner.invoke(app, ["--show-completion", "bash"], prog_name="hfbatch")
    assert script.exit_code == 0, script.output
    assert "_HFBATCH_COMPLETE" in script.stdout and "complete" in script.stdout


def test_a_usage_error_still_exits_2_and_names_the_option() -> None:
    result = runner.invoke(app, ["embed", "in.csv", "--no-such-flag", "-o", "o.parquet"])
    assert result.exit_code == 2 and "No such option: --no-such-flag" in result.output
