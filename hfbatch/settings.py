"""One Settings object: defaults < environment (and a .env file) < CLI flags.

This module is the only reader of `.env`, for the CLI and the library alike: `environment()` is
the one view (a .env in the working directory, overlaid by the real environment) that Settings,
the HF token (`hf_token`) and the key for other servers (`api_key`) are read from, so a token
in `.env` works from a notebook as from `hfbatch embed`. A `.env` may set anything but where
credentials go: a file in the working directory (a cloned repository's, say) must not point the
HF token at another server, so the router, the hub endpoint, proxies and CA bundles are taken
from the real environment only (ENV_FILE_REFUSED; see `load_env_file`).

The environment names of the original service stay valid (EMBEDDING_BATCH_SIZE,
ENABLE_EMBEDDING_CACHE, EMBEDDING_CACHE_SIZE, ...); `.env.example` lists them all.
CLI flags are applied later, by `EmbedOptions.resolve()`, so this module only knows defaults and
the environment.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, MutableMapping

from dotenv import dotenv_values
from platformdirs import user_cache_dir

from .errors import InputError

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_CACHE_SIZE = "2GB"
# A bare number in EMBEDDING_CACHE_SIZE counts entries (its meaning in the original service);
# each is budgeted at this many bytes (a 384-dim float32 vector is 1,536 bytes plus its key).
BYTES_PER_CACHE_ENTRY = 2048

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
# keys that decide which server gets the token or can watch it on the way: never from a .env file
ENV_FILE_REFUSED = frozenset({
    "HFBATCH_HF_ROUTER", "HF_ENDPOINT", "HF_INFERENCE_ENDPOINT",
    "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR",
})


@dataclass(frozen=True)
class Settings:
    """Values from defaults and the environment; the CLI overrides them per run."""

    model: str = DEFAULT_MODEL
    batch_size: int = 32
    chunk_size: int = 10_000
    text_column: str = "text"
    cache_enabled: bool = True
    cache_dir: Path = Path(user_cache_dir("hfbatch")) / "embeddings"
    cache_size_bytes: int = 2 * 10**9
    device: str = "auto"
    debug: bool = False
    api_timeout: float = 60.0
    endpoint: str | None = None
    quantize: bool = False
    runtime: str = "auto"  # local embedding runtime: auto (measured), torch, onnx, openvino
    precision: str = "auto"  # local embedding precision: auto (measured), fp32, bf16, fp16
    max_line_bytes: int = 64 << 20  # longest JSONL line / CSV row read (a gzip bomb's one line stops here)

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None, dotenv: Path | None = Path(".env")) -> "Settings":
        """Read settings from a .env file (if present) overlaid by the real environment."""
        env = environment(environ, dotenv)
        defaults = cls()
        return cls(
            model=env.get("HFBATCH_MODEL") or defaults.model,
            batch_size=_int(env, "EMBEDDING_BATCH_SIZE", defaults.batch_size),
            chunk_size=_int(env, "HFBATCH_CHUNK_SIZE", defaults.chunk_size),
            text_column=env.get("HFBATCH_TEXT_COLUMN") or defaults.text_column,
            cache_enabled=_bool(env, "ENABLE_EMBEDDING_CACHE", True),
            cache_dir=Path(env["HFBATCH_CACHE_DIR"]).expanduser() if env.get("HFBATCH_CACHE_DIR") else defaults.cache_dir,
            cache_size_bytes=parse_cache_size(env.get("EMBEDDING_CACHE_SIZE") or DEFAULT_CACHE_SIZE),
            device=env.get("HFBATCH_DEVICE") or defaults.device,
            debug=_bool(env, "HFBATCH_DEBUG", False),
            api_timeout=float(_int(env, "HUGGINGFACE_API_TIMEOUT", int(defaults.api_timeout))),
            endpoint=env.get("HFBATCH_ENDPOINT") or None,
            quantize=_bool(env, "ENABLE_MODEL_QUANTIZATION", False),
            runtime=env.get("HFBATCH_RUNTIME") or defaults.runtime,
            precision=env.get("HFBATCH_PRECISION") or defaults.precision,
            max_line_bytes=parse_byte_size(env["HFBATCH_MAX_LINE_BYTES"], "HFBATCH_MAX_LINE_BYTES")
            if env.get("HFBATCH_MAX_LINE_BYTES") else defaults.max_line_bytes,
        )


def environment(environ: Mapping[str, str] | None = None, dotenv: Path | None = Path(".env")) -> dict[str, str]:
    """The variables hfbatch reads: a .env file (in the working directory by default; less the
    ENV_FILE_REFUSED keys) overlaid by the real environment (`environ`, default os.environ).
    The CLI and the library see the same values, whether or not `load_env_file` ran first."""
    env: dict[str, str] = dict(read_env_file(dotenv)[0]) if dotenv is not None else {}
    env.update(os.environ if environ is None else environ)
    return env


def hf_token(environ: Mapping[str, str] | None = None, dotenv: Path | None = Path(".env")) -> str | None:
    """HF_TOKEN, else HUGGINGFACE_TOKEN (the original service's name), from `environment()`.
    Where it may be sent is not decided here: a .env cannot move the router or the hub."""
    env = environment(environ, dotenv)
    return env.get("HF_TOKEN") or env.get("HUGGINGFACE_TOKEN") or None


def api_key(environ: Mapping[str, str] | None = None, dotenv: Path | None = Path(".env")) -> str | None:
    """HFBATCH_API_KEY from `environment()`: the bearer key for servers that are not Hugging Face's."""
    return environment(environ, dotenv).get("HFBATCH_API_KEY") or None


def read_env_file(path: Path) -> tuple[dict[str, str], list[str]]:
    """(values, refused names) of a .env file (none if absent): keys in ENV_FILE_REFUSED, in any
    case, are left out of the values."""
    if not path.is_file():
        return {}, []
    values: dict[str, str] = {}
    refused: list[str] = []
    for key, value in dotenv_values(path).items():
        if value is None:
            continue
        if key.upper() in ENV_FILE_REFUSED:
            refused.append(key)
        else:
            values[key] = value
    return values, refused


def load_env_file(path: Path, environ: MutableMapping[str, str] = os.environ) -> None:
    """Fill `environ` from a .env file without overriding what is set; keys that would redirect
    credentials (ENV_FILE_REFUSED) are refused with one warning line on stderr."""
    values, refused = read_env_file(path)
    for key, value in values.items():
        environ.setdefault(key, value)
    ignored = [key for key in refused if key not in environ]  # a value set in the environment wins anyway
    if ignored:
        sys.stderr.write(
            f"warning: ignored {', '.join(ignored)} from {path}: a .env file may not change where credentials "
            "are sent; set it in the environment if you mean it.\n"
        )


def parse_byte_size(value: str | int, name: str) -> int:
    """'64MiB', '1GB', '1048576' -> bytes (a bare number is bytes); `name` is the flag or variable, for the error."""
    match = _SIZE_RE.match(str(value))
    size = int(float(match.group(1)) * _unit_bytes(match.group(2) or "b")) if match else 0
    if size < 1:
        raise InputError(f"{name} {value!r} is not a size of at least 1 byte; use e.g. 64MiB, 1GB or 1048576.")
    return size


def _unit_bytes(unit: str) -> int:
    unit = unit.lower()
    return (1024 if "i" in unit else 1000) ** "bkmgt".index(unit[0])


def parse_cache_size(value: str) -> int:
    """'2GB', '500MiB', '1.5g' -> bytes; a bare number counts entries (see BYTES_PER_CACHE_ENTRY)."""
    match = _SIZE_RE.match(str(value))
    if not match:
        raise InputError(
            f"EMBEDDING_CACHE_SIZE={value!r} is not a size; use bytes with a unit like 2GB or 500MB, "
            "or a number of entries like 100000."
        )
    number, unit = float(match.group(1)), (match.group(2) or "").lower()
    if not unit:
        return int(number * BYTES_PER_CACHE_ENTRY)
    base = 1024 if "i" in unit else 1000
    power = "bkmgt".index(unit[0])
    return int(number * base**power)


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InputError(f"{name}={raw!r} is not a whole number; set it to e.g. {default}.") from None
    if value < 1:
        raise InputError(f"{name}={raw!r} must be at least 1.")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None:
        return default
    low = raw.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise InputError(f"{name}={raw!r} is not a yes/no value; use true or false.")
