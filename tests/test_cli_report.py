"""What a run tells its user: the bar and the summary agree on rows/s, the bar has an ETA, the
summary lists every stage the job booked time to, -q still says why it exits 3, and errors name
hfbatch's own flags."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import SAMPLE_TEXTS, rows_for, write_csv
from hfbatch.cli import app
from hfbatch.monitoring import job_rate, rate_text
from hfbatch.provenance import Metrics

runner = CliRunner()
WIDE = {"COLUMNS": "240"}  # the summary's rows stay on one line each


def _summary_row(stdout: str, key: str) -> str:
    (line,) = [line for line in stdout.splitlines() if re.match(rf"\W*{key}\b", line.strip("│┃ "))]
    return " ".join(line.strip("│┃ ").split("│", 1)[1].split())


def test_bar_and_summary_agree_on_rows_per_second_and_the_bar_has_an_eta(tmp_path: Path) -> None:
    src = write_csv(tmp_path / "in.csv", rows_for(SAMPLE_TEXTS))
    result = runner.invoke(app, ["embed", str(src), "-o", str(tmp_path / "o.parquet")], env=WIDE)
    assert result.exit_code == 0, result.output
    m = json.loads((tmp_path / "o.parquet.meta.json").read_text())["metrics"]
    # one sum for both: rows over the wall seconds of the whole job, model load included
    expected = rate_text(job_rate(m["rows_total"], m["wall_seconds"]))
    bar = re.findall(r"([\d.,]+) rows/s · ETA (\d+:\d\d:\d\d)", result.stderr)
    assert bar, result.stderr
    assert bar[-1] == (expected, "0:00:00")
    assert f"{len(SAMPLE_TEXTS)}/{len(SAMPLE_TEXTS)}" in result.stderr
    assert _summary_row(result.stdout, "time") == f"{m['wall_seconds']:.2f}s wall ({expected} rows/s)"


def test_summary_lists_every_stage_with_time_in_the_documents_order(tmp_path: Path) -> None:
    src = write_csv(tmp_path / "in.csv", rows_for(SAMPLE_TEXTS))
    result = runner.invoke(app, ["embed", str(src), "-o", str(tmp_path / "o.parquet")], env=WIDE)
    assert result.exit_code == 0, result.output
    stages = json.loads((tmp_path / "o.parquet.meta.json").read_text())["metrics"]["stage_seconds"]
    shown = _summary_row(result.stdout, "stages")
    names = [part.rsplit(" ", 1)[0] for part in shown.split(" · ")]
    assert names == [name.replace("_", " ") for name, s in stages.items() if s > 0]
    assert "embed" in names  # (model load too, unless an earlier test in this process loaded the model)


def test_a_stage_the_jobs_add_shows_up_without_a_change_to_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every stage the document books time to is printed, in its order, the zero ones left out: the CLI names none."""
    as_dict = Metrics.as_dict

    def with_new_stages(self, **kwargs):  # type: ignore[no-untyped-def]
        document = as_dict(self, **kwargs)
        document["stage_seconds"].update(measure=4.2, export=0.0, check=12.345, later_stage=1.0)
        return document

    monkeypatch.setattr(Metrics, "as_dict", with_new_stages)
    src = write_csv(tmp_path / "in.csv", rows_for(SAMPLE_TEXTS[:2]))
    result = runner.invoke(app, ["embed", str(src), "-o", str(tmp_path / "o.parquet")], env=WIDE)
    assert result.exit_code == 0, result.output
    shown = _summary_row(result.stdout, "stages")
    assert " · measure 4.20s · " in shown and " · check 12.3s · " in shown and "export" not in shown
    assert shown.index("measure") < shown.index("check") < shown.index("embed") and shown.endswith("later stage 1.00s")


@pytest.mark.parametrize("flags", [["-q"], ["--quiet", "--json"]])
def test_quiet_with_marked_rows_still_says_why_it_exits_3(tmp_path: Path, flags: list[str]) -> None:
    src = write_csv(tmp_path / "in.csv", rows_for(["fine", "", "also fine"]))
    result = runner.invoke(app, ["embed", str(src), "-o", str(tmp_path / "o.parquet"), *flags])
    assert result.exit_code == 3, result.output
    assert result.stderr == "1 row marked invalid (see the *_error column): exit 3.\n"
    assert (result.stdout == "") == ("--json" not in flags)


def test_generate_without_a_model_names_a_causal_lm(tmp_path: Path) -> None:
    src = write_csv(tmp_path / "in.csv", [{"prompt": "hello"}])
    result = runner.invoke(app, ["generate", str(src), "-o", str(tmp_path / "o.parquet")])
    assert result.exit_code == 2 and "e.g. --model HuggingFaceTB/SmolLM2-135M-Instruct" in result.stderr


def test_a_ray_cluster_that_cannot_be_reached_is_one_line_naming_ray_address(tmp_path: Path) -> None:
    """A process of its own: in this one, another test's Ray cluster may be running already. A port
    where nothing listens (not `auto`: that joins any cluster running on the machine, another
    pytest worker's included), refused within seconds: Ray alone retried it for over 10 minutes."""
    pytest.importorskip("ray")
    src = write_csv(tmp_path / "in.csv", rows_for(["a"]))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{free.getsockname()[1]}"  # closed again: nothing listens there
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "hfbatch", "embed", str(src), "-o", str(tmp_path / "out"), "-q",
                           "--engine", "ray", "--ray-address", address], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("\n") == 1 and f"--ray-address {address}" in proc.stderr, proc.stderr
    assert "nothing answers" in proc.stderr and time.monotonic() - started < 60
    assert "RAY_ADDRESS" not in proc.stderr and "`--address`" not in proc.stderr
