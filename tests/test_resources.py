"""resources.py: peak memory that belongs to this process, device and precision choice."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hfbatch.errors import InputError, ModelLoadError
from hfbatch.resources import peak_rss_mb, resolve_device, resolve_precision


def test_peak_rss_is_this_process_not_its_parent() -> None:
    ballast = np.ones(400_000_000 // 8)  # the parent holds 400 MB when it starts the child
    code = "from hfbatch.resources import peak_rss_mb; print(peak_rss_mb())"
    child = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert child < 300  # ru_maxrss would say > 400 here: it survives fork + exec
    assert peak_rss_mb() > 400 and ballast.sum() > 0


def test_devices_and_precisions_on_this_cpu() -> None:
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") in ("cpu", "cuda", "mps")
    import torch

    if not torch.cuda.is_available():  # the machines this suite runs on: asking for CUDA must fail clearly
        with pytest.raises(ModelLoadError, match="no CUDA device"):
            resolve_device("cuda:0")
    assert resolve_precision("fp32", "cpu") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"
    assert resolve_precision("auto", "cpu") in ("bf16", "fp32")
    with pytest.raises(InputError, match="fp16 is for CUDA"):
        resolve_precision("fp16", "cpu")


def test_the_memory_guard_in_a_dotenv_holds_for_library_callers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MAX_MODEL_MEMORY_GB in the working directory's .env guards `hfbatch.embed` as it guards the
    CLI (the library used to read os.environ only); the real environment still wins over .env."""
    from hfbatch.resources import MemoryGuardError, check_model_memory, max_model_memory_bytes

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "model.safetensors").write_bytes(b"\0" * 4_000_000)
    monkeypatch.delenv("MAX_MODEL_MEMORY_GB", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("MAX_MODEL_MEMORY_GB=0.001\n")
    assert max_model_memory_bytes() == 1_000_000
    with pytest.raises(MemoryGuardError, match="MAX_MODEL_MEMORY_GB=0.001"):
        check_model_memory("tiny", model_dir)
    monkeypatch.setenv("MAX_MODEL_MEMORY_GB", "8")
    assert max_model_memory_bytes() == 8_000_000_000 and check_model_memory("tiny", model_dir) > 0
