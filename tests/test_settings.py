"""hfbatch/settings.py: defaults < .env file < real environment."""

from __future__ import annotations

from pathlib import Path

import pytest
from platformdirs import user_cache_dir

from hfbatch.errors import InputError
from hfbatch.settings import (BYTES_PER_CACHE_ENTRY, DEFAULT_MODEL, Settings, api_key, environment, hf_token,
                              load_env_file, parse_cache_size)


def test_defaults_without_environment() -> None:
    s = Settings.load(environ={}, dotenv=None)
    assert s.model == DEFAULT_MODEL == "sentence-transformers/all-MiniLM-L6-v2"
    assert s.batch_size == 32
    assert s.chunk_size == 10_000
    assert s.text_column == "text"
    assert s.cache_enabled is True
    assert s.cache_dir == Path(user_cache_dir("hfbatch")) / "embeddings"
    assert s.cache_size_bytes == 2 * 10**9
    assert s.device == "auto"
    assert s.debug is False


def test_env_overrides() -> None:
    s = Settings.load(
        environ={
            "EMBEDDING_BATCH_SIZE": "64",
            "ENABLE_EMBEDDING_CACHE": "false",
            "EMBEDDING_CACHE_SIZE": "500MB",
            "HFBATCH_MODEL": "BAAI/bge-small-en-v1.5",
            "HFBATCH_CACHE_DIR": "/srv/vectors",
            "HFBATCH_CHUNK_SIZE": "500",
            "HFBATCH_TEXT_COLUMN": "body",
            "HFBATCH_DEVICE": "cpu",
            "HFBATCH_DEBUG": "1",
        },
        dotenv=None,
    )
    assert s.batch_size == 64
    assert s.cache_enabled is False
    assert s.cache_size_bytes == 500 * 10**6
    assert s.model == "BAAI/bge-small-en-v1.5"
    assert s.cache_dir == Path("/srv/vectors")
    assert s.chunk_size == 500
    assert s.text_column == "body"
    assert s.device == "cpu"
    assert s.debug is True


@pytest.mark.parametrize("raw, expected", [("true", True), ("1", True), ("YES", True), ("on", True),
                                           ("false", False), ("0", False), ("No", False), ("off", False)])
def test_enable_embedding_cache_values(raw: str, expected: bool) -> None:
    assert Settings.load(environ={"ENABLE_EMBEDDING_CACHE": raw}, dotenv=None).cache_enabled is expected


def test_cache_dir_expands_user(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    s = Settings.load(environ={"HFBATCH_CACHE_DIR": "~/vectors"}, dotenv=None)
    assert s.cache_dir == tmp_path / "vectors"


def test_real_process_environment_is_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EMBEDDING_BATCH_SIZE", "8")
    s = Settings.load()  # os.environ and ./.env (none: cwd is tmp_path)
    assert s.batch_size == 8
    assert s.cache_dir == tmp_path / "cache"  # set by the conftest fixture


def test_dotenv_is_read_and_environment_wins(tmp_path: Path) -> None:
    dotenv = tmp_path / "custom.env"
    dotenv.write_text(
        "EMBEDDING_BATCH_SIZE=16\nHFBATCH_MODEL=from-dotenv/model\n# a comment\nEMBEDDING_CACHE_SIZE=1GiB\n",
        encoding="utf-8",
    )
    s = Settings.load(environ={"EMBEDDING_BATCH_SIZE": "128"}, dotenv=dotenv)
    assert s.batch_size == 128  # real environment beats .env
    assert s.model == "from-dotenv/model"  # .env beats the default
    assert s.cache_size_bytes == 2**30


def test_default_dotenv_is_dot_env_in_cwd(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("HFBATCH_TEXT_COLUMN=review\n", encoding="utf-8")
    assert Settings.load(environ={}).text_column == "review"  # conftest chdir'd into tmp_path
    assert Settings.load(environ={}, dotenv=None).text_column == "text"


def test_missing_dotenv_file_is_fine(tmp_path: Path) -> None:
    assert Settings.load(environ={}, dotenv=tmp_path / "absent.env").batch_size == 32
    environ: dict[str, str] = {}
    load_env_file(tmp_path / "absent.env", environ)
    assert environ == {}


def test_env_file_fills_the_environment_but_never_redirects_credentials(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text("HF_TOKEN=hf_fromdotenv123\nEMBEDDING_BATCH_SIZE=16\nHFBATCH_MODEL=from-dotenv/model\n"
                      "HFBATCH_HF_ROUTER=http://127.0.0.1:9/capture\nHF_ENDPOINT=http://127.0.0.1:9\n"
                      "https_proxy=http://127.0.0.1:9\nREQUESTS_CA_BUNDLE=/tmp/planted.pem\n", encoding="utf-8")
    environ = {"HFBATCH_MODEL": "from-env/model"}
    load_env_file(dotenv, environ)
    assert environ == {"HFBATCH_MODEL": "from-env/model",  # the environment wins
                       "HF_TOKEN": "hf_fromdotenv123", "EMBEDDING_BATCH_SIZE": "16"}
    warning = capsys.readouterr().err
    assert warning.count("\n") == 1 and warning.startswith("warning: ignored HFBATCH_HF_ROUTER, HF_ENDPOINT, ")
    assert "https_proxy" in warning and "REQUESTS_CA_BUNDLE" in warning and str(dotenv) in warning
    assert "set it in the environment" in warning
    assert Settings.load(environ={}, dotenv=dotenv).model == "from-dotenv/model"  # the same reader


def test_credentials_come_from_the_same_view_as_every_setting(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text("HF_TOKEN=hf_fromdotenv123\nHFBATCH_API_KEY=key-from-dotenv\n"
                      "HFBATCH_HF_ROUTER=http://127.0.0.1:9/capture\n", encoding="utf-8")
    assert environment(environ={}, dotenv=dotenv) == {"HF_TOKEN": "hf_fromdotenv123",
                                                      "HFBATCH_API_KEY": "key-from-dotenv"}  # never the router
    assert hf_token(environ={}, dotenv=dotenv) == "hf_fromdotenv123"
    assert hf_token(environ={"HF_TOKEN": "hf_fromtheenv456"}, dotenv=dotenv) == "hf_fromtheenv456"  # the environment wins
    assert hf_token(environ={"HUGGINGFACE_TOKEN": "hf_oldname789"}, dotenv=None) == "hf_oldname789"
    assert hf_token(environ={}, dotenv=None) is None and api_key(environ={}, dotenv=None) is None
    assert api_key(environ={}, dotenv=dotenv) == "key-from-dotenv"
    assert hf_token() == "hf_fromdotenv123" and api_key() == "key-from-dotenv"  # ./.env: conftest chdir'd into tmp_path
    # the CLI copies .env into the environment first; the library reads it in place: the same answer
    environ: dict[str, str] = {"HUGGINGFACE_TOKEN": "hf_oldname789"}
    load_env_file(dotenv, environ)
    for view in ({"environ": environ, "dotenv": None}, {"environ": {"HUGGINGFACE_TOKEN": "hf_oldname789"}, "dotenv": dotenv}):
        assert hf_token(**view) == "hf_fromdotenv123" and api_key(**view) == "key-from-dotenv"


def test_a_router_set_in_the_environment_is_not_warned_about(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text("HFBATCH_HF_ROUTER=http://127.0.0.1:9/capture\n", encoding="utf-8")
    environ = {"HFBATCH_HF_ROUTER": "https://router.example"}
    load_env_file(dotenv, environ)
    assert environ == {"HFBATCH_HF_ROUTER": "https://router.example"} and capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("2GB", 2 * 10**9),
        ("500MiB", 500 * 2**20),
        ("500MB", 500 * 10**6),
        ("1000", 1000 * BYTES_PER_CACHE_ENTRY),
        ("1.5g", int(1.5 * 10**9)),
        ("64 KiB", 64 * 1024),
        ("3tb", 3 * 10**12),
        ("100b", 100),
    ],
)
def test_parse_cache_size(raw: str, expected: int) -> None:
    assert parse_cache_size(raw) == expected


@pytest.mark.parametrize("raw", ["lots", "2 gigabytes", "-5", "GB", "1,000", "5XB"])
def test_parse_cache_size_garbage_is_input_error(raw: str) -> None:
    with pytest.raises(InputError, match="EMBEDDING_CACHE_SIZE"):
        parse_cache_size(raw)


def test_bad_cache_size_in_environment_is_input_error() -> None:
    with pytest.raises(InputError, match="EMBEDDING_CACHE_SIZE"):
        Settings.load(environ={"EMBEDDING_CACHE_SIZE": "huge"}, dotenv=None)


@pytest.mark.parametrize("raw", ["abc", "0", "-3", "2.5"])
def test_bad_batch_size_names_the_variable(raw: str) -> None:
    with pytest.raises(InputError, match="EMBEDDING_BATCH_SIZE"):
        Settings.load(environ={"EMBEDDING_BATCH_SIZE": raw}, dotenv=None)


def test_bad_chunk_size_names_the_variable() -> None:
    with pytest.raises(InputError, match="HFBATCH_CHUNK_SIZE"):
        Settings.load(environ={"HFBATCH_CHUNK_SIZE": "many"}, dotenv=None)


def test_bad_boolean_is_input_error() -> None:
    with pytest.raises(InputError, match="ENABLE_EMBEDDING_CACHE"):
        Settings.load(environ={"ENABLE_EMBEDDING_CACHE": "maybe"}, dotenv=None)


def test_bad_value_in_dotenv_is_input_error(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text("EMBEDDING_BATCH_SIZE=zero\n", encoding="utf-8")
    with pytest.raises(InputError, match="EMBEDDING_BATCH_SIZE"):
        Settings.load(environ={}, dotenv=dotenv)
