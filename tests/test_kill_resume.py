"""The real CLI in a subprocess, stopped at several points: SIGKILL during model load and mid-job,
SIGTERM, SIGHUP and SIGINT mid-job. Never a partial output under the final name; the rerun completes,
equals an uninterrupted run, and does not recompute what was embedded before the stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import write_csv

pytestmark = pytest.mark.slow

ROWS = 240
PINNED = ("HFBATCH_RUNTIME", "HFBATCH_PRECISION", "HFBATCH_ONNX_DIR")  # the suite's runtime (conftest)


def _rows() -> list[dict]:
    return [{"id": i, "text": f"review {i}: " + "the lid cracked but support replaced it quickly " * (1 + i % 9)}
            for i in range(ROWS)]


def _input(tmp_path: Path) -> Path:
    return write_csv(tmp_path / "in.csv", _rows())


def _start(src: Path, out: Path, cache: Path, log: Path, runtime: str = "onnx") -> subprocess.Popen:
    """The CLI in a process of its own. ONNX Runtime fp32 (faithful, the identity torch's vectors
    have): its process starts without importing torch or sentence-transformers, the seconds most
    of these tests would spend; the export is the suite's (HFBATCH_ONNX_DIR)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HFBATCH_") or k in PINNED}
    env.update(HF_HUB_OFFLINE="1", HFBATCH_CACHE_DIR=str(cache), HFBATCH_RUNTIME=runtime)
    return subprocess.Popen([sys.executable, "-m", "hfbatch", "embed", str(src), "-o", str(out), "--chunk-size", "40",
                             "--batch-size", "8", "--log-file", str(log), "--quiet"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _chunks(log: Path) -> int:
    """Chunk events in the --log-file so far (a line still being written is not one yet)."""
    text = log.read_text() if log.exists() else ""
    return sum(json.loads(line)["event"] == "chunk" for line in text.split("\n")[:-1])


def _wait_for_chunks(log: Path, count: int, proc: subprocess.Popen, limit: float = 120) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if _chunks(log) >= count:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError(f"no {count} chunks within {limit}s")


def _finish(src: Path, out: Path, cache: Path, log: Path) -> dict:
    proc = _start(src, out, cache, log)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    return json.loads(Path(str(out) + ".meta.json").read_text())


def _no_partial(tmp_path: Path, out: Path) -> None:
    assert not out.exists() and not Path(str(out) + ".meta.json").exists()


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    root = tmp_path_factory.mktemp("reference")
    src = _input(root)
    _finish(src, root / "ref.parquet", root / "cache", root / "log.jsonl")
    return np.array(pq.read_table(root / "ref.parquet").column("embedding").to_pylist(), dtype=np.float32)


@pytest.mark.parametrize("how", ["sigkill-mid-job", "sigterm-mid-job", "sighup-mid-job", "sigint-mid-job",
                                 "sigkill-during-load"])
def test_stopped_run_leaves_nothing_and_the_rerun_resumes(tmp_path: Path, reference: np.ndarray, how: str) -> None:
    src, out, cache, log = _input(tmp_path), tmp_path / "out.parquet", tmp_path / "cache", tmp_path / "log.jsonl"
    proc = _start(src, out, cache, log, runtime="torch" if how == "sigkill-during-load" else "onnx")
    if how == "sigkill-during-load":
        time.sleep(1.0)  # imports and model load take seconds: no chunk is done yet
    else:
        _wait_for_chunks(log, 3, proc)
    # frozen where it is: the signal below reaches a job that is still running (3 of 6 chunks
    # done), however fast or slow this machine is; the checks are made on the frozen process
    proc.send_signal(signal.SIGSTOP)
    assert proc.poll() is None, "the job ended before it could be stopped"
    assert _chunks(log) == 0 if how == "sigkill-during-load" else _chunks(log) < ROWS // 40
    sig = {"sigterm-mid-job": signal.SIGTERM, "sighup-mid-job": signal.SIGHUP,
           "sigint-mid-job": signal.SIGINT}.get(how, signal.SIGKILL)
    proc.send_signal(sig)
    proc.send_signal(signal.SIGCONT)  # a caught signal is handled once the process runs again
    _, stderr = proc.communicate(timeout=60)
    expected = {signal.SIGKILL: -signal.SIGKILL, signal.SIGTERM: 143, signal.SIGHUP: 129, signal.SIGINT: 130}[sig]
    assert proc.returncode == expected, stderr
    if sig != signal.SIGKILL:
        # stderr is a pipe here, as under cron: the message is one line, never wrapped at 80 columns
        assert stderr.count("\n") == 1 and "no output was written" in stderr and "Traceback" not in stderr, stderr
        if sig != signal.SIGINT:
            assert f"terminated ({sig.name})" in stderr
    _no_partial(tmp_path, out)
    done = sum(json.loads(line)["event"] == "chunk" for line in log.read_text().splitlines()) if log.exists() else 0
    log.unlink(missing_ok=True)
    document = _finish(src, out, cache, log)
    got = np.array(pq.read_table(out).column("embedding").to_pylist(), dtype=np.float32)
    assert got.shape == reference.shape and np.abs(got - reference).max() < 1e-5  # equals an uninterrupted run
    assert pq.read_table(out).column("id").to_pylist() == [str(i) for i in range(ROWS)]
    hits = document["metrics"]["cache"]["hits"]
    if how != "sigkill-during-load":
        assert hits >= 3 * 40 * 0.9  # what was embedded before the stop came from the cache
        assert document["metrics"]["texts_computed"] <= ROWS - hits
    assert done >= (0 if how == "sigkill-during-load" else 3)
    assert not list(tmp_path.glob("*.hfbatch-tmp"))  # the killed run's temp file was removed by the rerun


def test_two_processes_share_one_cache_directory(tmp_path: Path, reference: np.ndarray) -> None:
    src = _input(tmp_path)
    half = write_csv(tmp_path / "half.csv", _rows()[ROWS // 2:])  # overlaps the second half of the first
    cache = tmp_path / "cache"
    procs = [_start(src, tmp_path / "a.parquet", cache, tmp_path / "a.log"),
             _start(half, tmp_path / "b.parquet", cache, tmp_path / "b.log")]
    for proc in procs:
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
    a = np.array(pq.read_table(tmp_path / "a.parquet").column("embedding").to_pylist(), dtype=np.float32)
    b = np.array(pq.read_table(tmp_path / "b.parquet").column("embedding").to_pylist(), dtype=np.float32)
    assert np.abs(a - reference).max() < 1e-5 and np.abs(b - reference[ROWS // 2:]).max() < 1e-5


def test_a_disk_that_fills_during_the_write_leaves_no_output(tmp_path: Path) -> None:
    """RLIMIT_FSIZE makes every file of the process stop growing at 64 KiB, as a full disk does
    (writes fail with EFBIG instead of ENOSPC): the cache gives up with a warning, the Parquet write
    fails with a one-line error, exit 1, and neither the output nor its temp file is left."""
    import hashlib
    import resource

    src = _input(tmp_path)  # 240 rows x 384 floats: ~370 KB of vectors
    before = hashlib.blake2b(src.read_bytes()).hexdigest()
    limit = 64 * 1024

    def small_disk() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write() instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {k: v for k, v in os.environ.items() if not k.startswith("HFBATCH_") or k in PINNED}
    env.update(HF_HUB_OFFLINE="1", HFBATCH_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-m", "hfbatch", "embed", str(src), "-o", str(tmp_path / "out.parquet"),
                           "--quiet", "--chunk-size", "40"], env=env, capture_output=True, text=True,
                          preexec_fn=small_disk, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "out.parquet failed" in proc.stderr and "nothing was written there" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out.parquet").exists() and not list(tmp_path.glob(".out.parquet*"))
    assert hashlib.blake2b(src.read_bytes()).hexdigest() == before  # the input is never touched


def test_sigkill_at_the_final_rename(tmp_path: Path, reference: np.ndarray) -> None:
    """The process is killed at the moment it would rename the finished Parquet into place (a
    sitecustomize wraps os.replace): nothing exists under the output's name; the rerun publishes it."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(
        "import os, signal\n"
        "_replace = os.replace\n"
        "def replace(src, dst, *a, **k):\n"
        "    if str(dst).endswith('out.parquet'):\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return _replace(src, dst, *a, **k)\n"
        "os.replace = replace\n")
    src, out, cache = _input(tmp_path), tmp_path / "out.parquet", tmp_path / "cache"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HFBATCH_") or k in PINNED}
    env.update(HF_HUB_OFFLINE="1", HFBATCH_CACHE_DIR=str(cache), PYTHONPATH=str(hooks), HFBATCH_RUNTIME="onnx")
    killed = subprocess.run([sys.executable, "-m", "hfbatch", "embed", str(src), "-o", str(out), "--quiet"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL
    assert not out.exists()  # the finished file never appeared under its name
    stale = list(tmp_path.glob("*.hfbatch-tmp"))
    assert stale  # the killed run's whole temp file is still there ...
    document = _finish(src, out, cache, tmp_path / "log.jsonl")
    assert not list(tmp_path.glob("*.hfbatch-tmp"))  # ... until the rerun removes it
    got = np.array(pq.read_table(out).column("embedding").to_pylist(), dtype=np.float32)
    assert np.abs(got - reference).max() < 1e-5
    assert document["metrics"]["texts_computed"] == 0  # every vector was stored before the kill
    from hfbatch.io.writers import read_metadata

    assert read_metadata(out) == json.loads(Path(str(out) + ".meta.json").read_text())  # sidecar and file agree
