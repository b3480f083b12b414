"""The record of what was measured: one JSON file per model and machine under `choices/`, what
`auto` reads its choice from, `hfbatch tune` pins in, and `hfbatch doctor` lists.

Its own module because the record is a file other processes wrote (another job, another
version, or someone else): it is read as one shape only (MeasurementRecord.from_json refuses any
other, and a refused record is measured again), written atomically under a lock, and its name
holds the machine, the model's files and the int8 recipes. Measuring is selection.py's.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from .._version import __version__
from ..resources import cpu_facts
from .configs import EXPORT_RUNTIMES, Note, RuntimeConfig
from ..io.writers import write_text_atomic
from .exports import exports_root, package_version
from .fidelity import label

if TYPE_CHECKING:
    from .local import LocalBackend

log = logging.getLogger(__name__)

RECORD_FORMAT = 7  # 5: faithful candidates only unless int8 is asked, one at a time, half precision batch-invariant; 6: OpenVINO over its streams (withdrawn: wrong vectors); 7: OpenVINO one LATENCY request again
_LIBRARIES = ("torch", "onnxruntime", "openvino", "nncf", "sentence-transformers", "transformers", "tokenizers")


@dataclass(frozen=True)
class Measurement:
    """One candidate of a record, by attribute; `entry` is its JSON object as written (with what
    else it holds: memory_mb, alone_vs_batched...)."""

    entry: dict[str, Any]

    @property
    def config(self) -> RuntimeConfig:
        return RuntimeConfig(*self.entry["config"])

    @property
    def label(self) -> str:
        return str(self.entry["label"])

    @property
    def accepted(self) -> bool:
        return bool(self.entry.get("accepted", False))

    @property
    def texts_per_s(self) -> float | None:
        return self.entry.get("texts_per_s")

    @property
    def fidelity(self) -> dict[str, float] | None:
        return self.entry.get("fidelity")

    @property
    def reason(self) -> str | None:
        return self.entry.get("reason")

    @property
    def transient(self) -> bool:
        """Failed for a passing reason (a full disk, a busy file): measured again next time."""
        return bool(self.entry.get("transient"))


@dataclass(frozen=True)
class MeasurementRecord:
    """One model's measurements on one machine: its candidates and the pinned configuration, if
    any. `document` is the whole JSON object, as written (machine, measured_at, seconds...); an
    empty record ({}) is one nothing was measured in (or one refused: measured again)."""

    document: dict[str, Any]
    candidates: tuple[Measurement, ...] = ()
    pinned: RuntimeConfig | None = None

    @classmethod
    def from_json(cls, document: Any) -> "MeasurementRecord":
        """The record of `document`, or ValueError when it is of another format or not the shape
        this module writes (edited by hand, written by something else)."""
        if not isinstance(document, dict) or document.get("format") != RECORD_FORMAT:
            raise ValueError("not a runtime record of this format")
        entries, pinned = document.get("candidates", []), document.get("pinned")
        well_formed = isinstance(entries, list) and (pinned is None or _is_config(pinned)) and all(
            isinstance(e, dict) and _is_config(e.get("config")) and e.get("label") == label(tuple(e["config"]))
            and isinstance(e.get("accepted", False), bool) and _is_number(e.get("texts_per_s", 0))
            and (e.get("fidelity") is None or (isinstance(e["fidelity"], dict)
                                               and all(_is_number(e["fidelity"].get(k)) for k in ("mean", "min"))))
            for e in entries) and len({tuple(e["config"]) for e in entries}) == len(entries)
        if not well_formed:
            raise ValueError("a runtime record of another shape")
        return cls(document, tuple(Measurement(e) for e in entries), RuntimeConfig(*pinned) if pinned else None)

    @classmethod
    def read(cls, path: Path) -> "MeasurementRecord":
        """The record at `path`, or an empty one (measured again) when it is missing or from_json refuses it."""
        try:
            return cls.from_json(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            return cls({})

    def by_config(self) -> dict[RuntimeConfig, Measurement]:
        """The candidates by configuration."""
        return {m.config: m for m in self.candidates}

    @property
    def model_id(self) -> str | None:
        return self.document.get("model_id")

    @property
    def machine(self) -> dict[str, Any] | None:
        return self.document.get("machine")

    @property
    def measured_at(self) -> str | None:
        return self.document.get("measured_at")

    @property
    def seconds(self) -> float | None:
        return self.document.get("seconds")

    def faithful_choice(self) -> str | None:
        """The label of what a default (faithful) job runs by this record: its pin, unless that pin
        is int8 (an int8 pin is for --quantize int8 jobs), else the fastest accepted faithful candidate."""
        if self.pinned and self.pinned.quantize != "int8":
            return self.pinned.label
        faithful = [m for m in self.candidates if m.accepted and m.config.quantize != "int8"]
        return max(faithful, key=lambda m: m.texts_per_s or 0.0).label if faithful else None


def read_record(path: Path) -> dict[str, Any]:
    """The record at `path` as its JSON object, {} when MeasurementRecord.read finds none."""
    return MeasurementRecord.read(path).document


def keep(path: Path, record: dict[str, Any]) -> None:
    """Write `record` at `path`, atomically (OSError when it cannot be)."""
    write_text_atomic(path, json.dumps(record, indent=1))


def machine() -> dict[str, Any]:
    """What the measurements hold for: the CPU and the libraries that run the model."""
    cpu = cpu_facts()
    return {"cpu": cpu.get("model"), "cores": cpu.get("cores"), "flags": cpu.get("flags"),
            "libraries": {name: package_version(name) for name in _LIBRARIES}, "hfbatch": __version__}


def choices_root() -> Path:
    return exports_root().parent / "choices"


def record_path(backend: "LocalBackend") -> Path:
    """One record per model (its files, wherever they sit) and machine; int8 recipes are part of
    it so a new recipe is measured again, not ranked by the old one's speed."""
    from .onnx import int8_recipe
    from .openvino_export import int8_recipe as openvino_recipe

    where = json.dumps(machine(), sort_keys=True).encode()
    extra = f"recipes={int8_recipe()},{openvino_recipe()}".encode()
    key = hashlib.blake2b(where + b"\x1f" + backend.weights_key().encode() + b"\x1f" + extra, digest_size=10).hexdigest()
    return choices_root() / f"{key}.json"


def _is_config(value: Any) -> bool:
    """One of the configurations hfbatch makes (a planted ["evil", "x", "y"] or "onnx " is not)."""
    return (isinstance(value, list) and len(value) == 3 and value[0] in ("torch", *EXPORT_RUNTIMES)
            and value[1] in ("fp32", "bf16", "fp16", "auto") and value[2] in ("none", "int8"))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def writable(folder: Path) -> bool:
    """Whether the record's folder can be made and written (its nearest existing parent, if not there)."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return os.access(probe, os.W_OK | os.X_OK)


@contextlib.contextmanager
def lock(path: Path, note: Note | None = None) -> Iterator[None]:
    """One measurement per record at a time, across processes (Ray actors, two cron jobs); a
    process that has to wait says so first (a silent wait of a minute looks like a hang)."""
    from filelock import FileLock, Timeout

    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path) + ".lock", timeout=900)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if note:
            note("measuring runtimes: waiting for another process measuring this model")
        log.warning("waiting for another process measuring %s (lock %s.lock)", path.stem, path)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def pin(backend: "LocalBackend", config: RuntimeConfig | None) -> MeasurementRecord:
    """Pin `config` as this machine's choice for the model (None: unpin, the fastest again)."""
    path = record_path(backend)
    with lock(path):
        record = read_record(path) or {"format": RECORD_FORMAT, "model_id": backend.model_id, "machine": machine(),
                                       "candidates": []}
        record["pinned"] = list(config) if config else None
        keep(path, record)
    return MeasurementRecord(record, tuple(Measurement(e) for e in record["candidates"]),
                             RuntimeConfig(*config) if config else None)


def refuse(backend: "LocalBackend", config: RuntimeConfig, reason: str) -> None:
    """A chosen configuration failed to load or to prove itself after one rebuild: kept as refused
    in the record (with its reason) so the next job goes on with the next faithful one."""
    path = record_path(backend)
    try:
        with lock(path):
            record = read_record(path)
            for entry in record.get("candidates", []):
                if RuntimeConfig(*entry["config"]) == config:
                    entry.update(accepted=False, reason=reason[:300])
            if record:
                keep(path, record)
    except OSError:
        pass
