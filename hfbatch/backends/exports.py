"""Cached exports of a model for the ONNX Runtime and OpenVINO runtimes, with what was proved of them.

One folder per model (its files, revision and --normalize: what the graph holds) under
HFBATCH_ONNX_DIR or the user cache dir: `model.onnx` (fp32, pooling and normalisation inside),
`model.<int8 recipe>.onnx` (ONNX Runtime int8), `openvino.<recipe>.xml/.bin` (NNCF int8), and
`meta.json`: the graph's inputs, pooling, dimension, whether the fast tokenizer load gives the
transformers ids, and for each runtime variant its fidelity to torch fp32 and the runtime version
it was measured with. A variant whose entry matches the installed runtime's version is used
without loading torch, sentence-transformers or transformers: a cached job starts in about a
second instead of seven. Files are written whole (temp name, then rename) so a killed export
leaves nothing a later run would trust.
"""

from __future__ import annotations

import json
import os
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from platformdirs import user_cache_dir

META_FORMAT = 1


def exports_root() -> Path:
    return Path(os.environ.get("HFBATCH_ONNX_DIR") or user_cache_dir("hfbatch")) / "onnx"


def package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def write_atomic(path: Path, text: str) -> None:
    """`text` at `path` through a temp file of this call's own and a rename: readers (other jobs
    sharing the cache dir) see the old file or the new one, never half. OSError as it comes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


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
        """Merge entries into meta.json (variants merged one level down), written whole."""
        meta = self.meta() or {"format": META_FORMAT}
        variants = dict(meta.get("variants") or {})
        variants.update(entries.pop("variants", {}) or {})
        meta.update(entries, variants=variants, format=META_FORMAT)
        write_atomic(self.meta_path, json.dumps(meta, indent=1, sort_keys=True))

    def path(self, name: str) -> Path:
        return self.dir / name

    def proved(self, variant: str, runtime_version: str | None) -> dict[str, Any] | None:
        """The variant's entry when its file is there and it was checked with this runtime version."""
        entry = (self.meta().get("variants") or {}).get(variant)
        if not isinstance(entry, dict) or entry.get("runtime_version") != runtime_version:
            return None
        path = self.path(str(entry.get("file", "")))
        if not path.is_file() or not entry.get("fidelity") or entry.get("stamp") != stamp(path):
            return None  # missing, or changed since it was proved (replaced, truncated, copied by hand)
        return entry


def stamp(path: Path) -> list[int]:
    """Size and modification time: what says a proved file is still the one that was proved."""
    info = path.stat()
    return [info.st_size, info.st_mtime_ns]
