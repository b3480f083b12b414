"""`hfbatch tune MODEL`: measure a model's runtime configurations on this machine now, show the
table, and pin the choice (or let the fastest faithful one run again).

The same measurement a first job makes (backends/selection.py), on demand: after an upgrade, on
a machine that was busy the first time, or in a container image build so that the jobs it runs
measure nothing. `--pin` fixes what `auto` runs for this model here; HFBATCH_RUNTIME /
HFBATCH_PRECISION fix it without any record.
"""

from __future__ import annotations

from typing import Any, Callable

from ..backends.local import LocalBackend
from ..backends.records import MeasurementRecord
from ..backends.selection import pin as pin_choice
from ..backends.selection import record_path, remeasure
from ..errors import InputError


def tune(model: str, *, int8: bool = False, pin: str | None = None, unpin: bool = False, measure: bool = True,
         trust_remote_code: bool = False, note: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure `model`'s candidates here (the faithful ones; with int8=True the int8 ones too; with
    `pin`/`unpin` only those never measured), keep the record, apply `pin` ("openvino bf16",
    "torch fp32", ...) or `unpin`, and return
    {"model_id", "record", "candidates", "chosen", "pinned"}. InputError for a pin that is not a
    measured, accepted candidate."""
    backend = LocalBackend(model, runtime="auto", precision="auto", quantize="none", trust_remote_code=trust_remote_code)
    configs = backend.candidates()
    if int8:
        configs += LocalBackend(model, runtime="auto", precision="auto", quantize="int8").candidates()
    record = MeasurementRecord.read(record_path(backend))
    known = record.by_config()
    # a pin is made from what was measured; only what never was is measured first
    if measure and (not (pin or unpin) or any(c not in known for c in configs)):
        record = remeasure(backend, configs, note)
    measured = record.candidates
    if pin is not None:
        wanted = " ".join(pin.replace("-", " ").split()).lower()
        match = [m for m in measured if m.label == wanted]
        if not match or not match[0].accepted:
            accepted = ", ".join(m.label for m in measured if m.accepted) or "none"
            raise InputError(f"--pin {pin!r} is not an accepted configuration of {model} here; accepted: {accepted}.")
        record = pin_choice(backend, match[0].config)
    elif unpin:
        record = pin_choice(backend, None)
    chosen = MeasurementRecord(record.document, measured, record.pinned).faithful_choice()
    return {"model_id": model, "record": str(record_path(backend)), "candidates": [m.entry for m in measured],
            "chosen": chosen, "pinned": record.pinned.label if record.pinned else None, "seconds": record.seconds}
