"""Cached exports of a model for the ONNX Runtime and OpenVINO runtimes, with what was proved of them.

One folder per model (its files and revision: one export whatever --normalize, --max-length or
--prompt say) under HFBATCH_ONNX_DIR or the user cache dir: `model.onnx` (fp32, pooling inside,
never normalisation: that is applied after, as asked), `model.<int8 recipe>.onnx` (ONNX Runtime
int8), `openvino.<recipe>.xml/.bin` (NNCF int8), and `meta.json`: the graph's inputs, pooling,
whether the fast tokenizer load gives the transformers ids, the digest of every file, and for
each runtime variant (onnx-fp32, openvino-fp32, openvino-bf16, ...) its fidelity to torch fp32,
the runtime version it was measured with and the digests of the files it loads. A variant whose
proof holds is used without loading torch, sentence-transformers or transformers; one whose files
changed in any byte is not (it is rebuilt). Files are written whole (temp name, then rename) so a
killed export leaves nothing a later run would trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from platformdirs import user_cache_dir

from ..io.writers import write_text_atomic

META_FORMAT = 2  # 2: every file a variant loads is proved by digest


def exports_root() -> Path:
    return Path(os.environ.get("HFBATCH_ONNX_DIR") or user_cache_dir("hfbatch")) / "onnx"


def package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


class ExportBundle:
    """The export folder of one model (see the module docstring)."""

    def __init__(self, key: str, root: Path | None = None):
        self.key = key
        self.dir = (root or exports_root()) / key

    @property
    def meta_path(self) -> Path:
        return self.dir / "meta.json"

    def meta(self) -> dict[str, Any]:
        try:
            data = json.loads(self.meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) and data.get("format") == META_FORMAT else {}

    def record(self, **entries: Any) -> None:
        """Merge entries into meta.json (variants and files merged one level down), written whole."""
        meta = self.meta()
        if meta.get("key") != self.key:  # none yet, or another model's: this folder starts afresh
            meta = {"format": META_FORMAT, "key": self.key}
        for nested in ("variants", "files"):
            merged = dict(meta.get(nested) or {})
            merged.update(entries.pop(nested, {}) or {})
            meta[nested] = {k: v for k, v in merged.items() if v is not None}  # None: forgotten
        meta.update(entries, format=META_FORMAT)
        write_text_atomic(self.meta_path, json.dumps(meta, indent=1, sort_keys=True))

    def path(self, name: str) -> Path:
        """A file of this folder. Names come from meta.json, which anyone with the cache dir can
        edit: only a plain file name is one (never a path out of the folder: no deleting or
        loading anything else through a planted entry)."""
        if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
            raise ValueError(f"{name!r} is not a file name of an export folder")
        return self.dir / name

    def _remove(self, name: str) -> None:
        """Delete the file `name` of this folder (whatever took its place: a directory, a pipe)."""
        import shutil

        path = self.path(name)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    def digest(self, name: str) -> str | None:
        """blake2b of the file `name` (None: missing). Taken from meta.json while the file keeps the
        stamp it was hashed with (size, mtime, ctime, inode: ctime cannot be set back by hand, so
        bytes rewritten at the same size and an old mtime are hashed again); else hashed now."""
        path = self.path(name)
        try:
            now = stamp(path)
        except OSError:
            return None
        if not stat.S_ISREG(now_mode(path)):
            return None  # a directory, a pipe (reading it would hang), a device: not a proved file
        known = (self.meta().get("files") or {}).get(name)
        if isinstance(known, dict) and known.get("stamp") == now and isinstance(known.get("digest"), str):
            return str(known["digest"])
        digest = file_digest(path)
        try:  # best effort: a read-only cache only costs the next process the hashing again
            self.record(files={name: {"stamp": now, "digest": digest}})
        except OSError:
            pass
        return digest

    def prove(self, variant: str, files: list[str], **entry: Any) -> None:
        """Record `variant` as proved (`entry`: its fidelity, runtime version) for exactly the
        bytes of `files` it loads, as they are now."""
        digests = {name: self.digest(name) for name in files}
        self.record(variants={variant: {**entry, "file": files[0], "files": files, "digests": digests}})

    def forget(self, variant: str) -> None:
        """Drop `variant`'s proof and the files only it loads (rebuilt by the next use)."""
        meta = self.meta()
        variants = meta.get("variants") or {}
        entry = variants.get(variant) or {}
        shared = {f for name, other in variants.items() if name != variant and isinstance(other, dict)
                  for f in other.get("files") or []}
        for name in entry.get("files") or []:
            if name not in shared:
                try:
                    self._remove(name)
                except ValueError:  # a planted name: never a path out of the folder
                    pass
        self.record(variants={variant: None})

    def remove(self, names: list[str]) -> None:
        """Delete these files of the folder (a rebuild starts from nothing); planted names are skipped."""
        for name in names:
            try:
                self._remove(name)
            except (ValueError, OSError):
                pass

    def proved(self, variant: str, runtime_version: str | None) -> dict[str, Any] | None:
        """The variant's entry when it was checked with this runtime version and every file it
        loads still has the digest it was proved with (not replaced, truncated, rewritten)."""
        meta = self.meta()
        if meta.get("key") != self.key:
            return None  # another model's folder copied or renamed here: its proofs are not this model's
        entry = (meta.get("variants") or {}).get(variant)
        if not isinstance(entry, dict) or entry.get("runtime_version") != runtime_version or not entry.get("fidelity"):
            return None
        files, digests = entry.get("files"), entry.get("digests")
        if not isinstance(files, list) or not files or not isinstance(digests, dict) or entry.get("file") not in files:
            return None
        try:
            if any(digests.get(name) is None or self.digest(name) != digests.get(name) for name in files):
                return None
        except ValueError:  # a planted name
            return None
        return entry


def now_mode(path: Path) -> int:
    return path.stat().st_mode


def stamp(path: Path) -> list[int]:
    """Size, modification and change times, inode: what says a file was not touched since."""
    info = path.stat()
    return [info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino]


def file_digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with path.open("rb") as handle:
        while block := handle.read(1 << 22):
            h.update(block)
    return h.hexdigest()
