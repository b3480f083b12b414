"""Which runtime and precision a local model runs with when `auto` leaves it open: one choice per
model and machine, measured here once.

Why measured: the fast path depends on the CPU (on an AMD EPYC with AVX-512 BF16 OpenVINO bf16
is ~3x torch fp32; on an Intel Ice Lake without bf16, bf16 is emulated and 2.5x *slower*, and
ONNX Runtime fp32 was 0.76x torch). No fixed rule is right on both.

Why one choice: users embed their queries elsewhere and their documents here, day after day. So
the default considers only configurations that are *faithful* (fidelity.FAITHFUL: cosine to
torch fp32 >= 0.9999 mean / 0.999 min: torch, ONNX Runtime and OpenVINO fp32, bf16 where the CPU
has it natively), they share one identity (cache namespace), and the choice depends only on the
model's weights, the CPU and the library versions: never on the job's size, its options
(normalize, max length, prompt) or the folder the model sits in. int8 runs only when asked and is
its own identity.

How: the first job that computes something measures the candidates one at a time (loaded,
checked against torch fp32 on fixed texts, timed on fixed texts of every length, released before
the next, each within MAX_MODEL_MEMORY_GB), keeps the figures in `choices/` (a JSON record per
model and machine, written under a lock so concurrent first runs measure once) and takes the
fastest accepted one. `hfbatch tune MODEL` measures again on demand and can pin a choice;
HFBATCH_RUNTIME / HFBATCH_PRECISION pin it without any record (containers).
"""

from __future__ import annotations

import importlib.util
import logging
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..errors import HfbatchError, InputError, ModelLoadError, first_line
from ..resources import MemoryGuardError, cpu_has_native_bf16, max_model_memory_bytes, rss_bytes
from ..vectors import cosine_rows
from .configs import Note, RuntimeChoice, RuntimeConfig
from .fidelity import BATCH_INVARIANT, CALIBRATION_TEXTS, SMOOTHING_TEXTS, bar_for, figures, label, labels
from .records import RECORD_FORMAT, Measurement, MeasurementRecord, choices_root, keep, lock, machine, record_path, writable
# what tools/ and tests read from here: the record's names beside the measuring
from .records import pin, read_record, refuse  # noqa: F401

if TYPE_CHECKING:
    from .local import LocalBackend

log = logging.getLogger(__name__)

Config = RuntimeConfig
TORCH_FP32 = RuntimeConfig("torch", "fp32", "none")  # the reference every candidate is held to
TIMED_PASSES = 2  # the best pass is kept (the first one warms up), the first one's vectors checked
BATCH = 16  # texts per timed call: the timing texts make two batches, one short, one long
EXPORT_RUNTIMES = {"onnx": "onnxruntime", "openvino": "openvino"}
# what a runtime holds besides the weights while it runs (ORT's arena, OpenVINO's compiled copy):
# the memory guard refuses a candidate whose weights x this would not fit before loading it
RUNTIME_FOOTPRINT = {"torch": 1.0, "onnx": 3.0, "openvino": 3.0}  # torch: as check_model_memory estimates it


def candidates(runtime: str, precision: str, quantize: str, cpu_only: bool) -> list[Config]:
    """The configurations that fit --runtime/--precision/--quantize here. Without int8 asked, only
    faithful ones: fp32 of every installed runtime, bf16 only where the CPU has it natively (an
    emulated bf16 is slower than fp32, not worth timing). One means nothing to measure.
    InputError when none fits."""
    int8 = quantize == "int8"
    if runtime == "auto":
        runtimes = [] if int8 else ["torch"]
        if cpu_only or int8:  # the exports run on the CPU, even where a GPU is
            runtimes += [rt for rt, module in EXPORT_RUNTIMES.items() if importlib.util.find_spec(module) is not None]
    else:
        runtimes = [runtime]
    native_bf16 = cpu_only and cpu_has_native_bf16()
    out: list[Config] = []
    for rt in runtimes:
        if int8:
            if rt != "torch" and precision in ("auto", "fp32"):
                if rt == "openvino" and runtime == "auto" and importlib.util.find_spec("nncf") is None:
                    continue  # its int8 weights are made by NNCF (hfbatch[openvino] brings it)
                out.append(RuntimeConfig(rt, "fp32", "int8"))
            continue
        if rt == "torch" and not cpu_only:
            out.append(RuntimeConfig("torch", precision, "none"))  # a GPU: fp16 by the device rule
            continue
        wanted = [precision] if precision != "auto" else (["fp32", "bf16"] if native_bf16 else ["fp32"])
        for p in wanted:
            if p == "fp16" or (rt == "onnx" and p != "fp32"):
                continue  # fp16 is a GPU precision; ONNX Runtime runs fp32 on the CPU here
            out.append(RuntimeConfig(rt, p, "none"))
    if not out:
        raise InputError(f"no runtime fits --runtime {runtime} --precision {precision} --quantize {quantize} here "
                         "(ONNX Runtime runs fp32 or int8 on the CPU; OpenVINO fp32, bf16 or int8; torch fp32/bf16/fp16); "
                         "drop one of them.")
    return out


def choose(backend: "LocalBackend", configs: Sequence[Config], *, measure: bool = True, note: Note | None = None,
           exclude: Sequence[Config] = (), job_texts: Sequence[str] = ()) -> RuntimeChoice:
    """The configuration `backend` runs with: the pinned one, else the fastest accepted in this
    machine's record (measuring those missing first, unless measure=False: then torch fp32,
    saying the job would measure). `exclude`: configurations that failed in this process.
    `job_texts`: the job's first texts; a measurement made now also keeps torch fp32's vectors
    of them (`backend.job_reference`), so their check needs no second reference model."""
    configs = [c for c in configs if c not in exclude]
    if not configs:
        raise ModelLoadError(f"no configuration of {backend.model_id} can run here (every candidate failed: "
                         f"{labels(exclude)}); pass --runtime torch --precision fp32.")
    if len(configs) == 1:
        return RuntimeChoice(configs[0], by="asked for")
    path = record_path(backend)
    record = MeasurementRecord.read(path)
    started = time.perf_counter()
    if measure and _missing(record, configs) and not writable(path.parent):
        # a read-only cache dir: a measurement could not be kept, and every job would pay it again
        fallback = TORCH_FP32 if TORCH_FP32 in configs else configs[0]
        log.warning("%s is not writable: %s runs without measuring (pin a choice with HFBATCH_RUNTIME / "
                    "HFBATCH_PRECISION, or run `hfbatch tune` where the cache dir is writable)", path.parent, label(fallback))
        return RuntimeChoice(fallback, by=f"not measured: {path.parent} is not writable", record=None)
    if measure and _missing(record, configs):
        with lock(path, note):
            record = MeasurementRecord.read(path)  # another process may have measured while this one waited
            if _missing(record, configs):
                record = _measure_and_keep(backend, path, record, _missing(record, configs), note, job_texts)
    spent = time.perf_counter() - started
    entries, pinned = record.by_config(), record.pinned
    if pinned in configs:
        return RuntimeChoice(pinned, by="pinned", record=str(path),
                             texts_per_s=entries[pinned].texts_per_s if pinned in entries else None, measured_seconds=spent)
    accepted = [c for c in configs if c in entries and entries[c].accepted]
    if not accepted:
        if not measure:
            return RuntimeChoice(TORCH_FP32 if TORCH_FP32 in configs else configs[0],
                                 by=f"not measured yet: the job will measure {labels(configs)} first", record=str(path))
        refused = "; ".join(f"{m.label}: {m.reason}" for c, m in entries.items() if c in configs)
        raise ModelLoadError(f"no configuration of {backend.model_id} passed its checks here ({refused or 'none measured'}); "
                             "pass --runtime torch --precision fp32.")
    best = max(accepted, key=lambda c: float(entries[c].texts_per_s or 0.0))
    return RuntimeChoice(best, by="measured on this machine", record=str(path), texts_per_s=entries[best].texts_per_s,
                         fidelity=entries[best].fidelity, measured_seconds=spent)


def _missing(record: MeasurementRecord, configs: Sequence[Config]) -> list[Config]:
    entries = record.by_config()
    # never measured, or failed for a passing reason (a full disk, a busy file) last time
    return [c for c in configs if c not in entries or entries[c].transient]


def _measure_and_keep(backend: "LocalBackend", path: Path, record: MeasurementRecord, configs: Sequence[Config],
                      note: Note | None, job_texts: Sequence[str] = ()) -> MeasurementRecord:
    started = time.perf_counter()
    entries = [m.entry for m in record.candidates if m.config not in configs]
    entries += measure_configs(backend, configs, note, job_texts)
    document = {"format": RECORD_FORMAT, "model_id": backend.model_id, "machine": machine(),
                "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "candidates": entries, "pinned": list(record.pinned) if record.pinned else None,
                "seconds": round(time.perf_counter() - started, 1)}
    try:
        keep(path, document)
    except OSError as exc:
        log.warning("cannot keep the runtime measurements in %s (%s); they hold for this job only", path.parent, exc)
    return MeasurementRecord(document, tuple(Measurement(e) for e in entries), record.pinned)


def fixed_texts() -> list[str]:
    """The short texts of every kind the candidates meet: reviews, codes, other languages."""
    return list(dict.fromkeys([*SMOOTHING_TEXTS, *CALIBRATION_TEXTS]))


def timing_texts() -> list[str]:
    """What every candidate is checked against torch fp32 and timed on: every third fixed text
    and paragraphs made of runs of 4 and 12 of them (documents: ~60 and ~200 tokens), sorted by
    length as a job batches them (in batches of BATCH: short ones together, long ones together)."""
    texts = fixed_texts()
    paragraphs = [" ".join(texts[i:i + n]) for n, step in ((4, 8), (12, 20)) for i in range(0, len(texts) - n + 1, step)]
    return sorted(dict.fromkeys(texts[::3] + paragraphs), key=len)


def measure_configs(backend: "LocalBackend", configs: Sequence[Config], note: Note | None = None,
                    job_texts: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Each configuration loaded, warmed up, then timed on the timing texts twice (the best pass
    kept; the first pass's vectors checked against torch fp32's), one at a time and released
    before the next, each within the memory guard. The torch model is let go once the export is
    made from it. A failure (not installed, export refused, below the bar, over the guard) is
    kept with its reason; environmental ones (`transient`) are measured again next time."""
    say = note or (lambda message: None)
    timed = timing_texts()
    batches = [timed[i:i + BATCH] for i in range(0, len(timed), BATCH)]
    # torch first (fp32: the reference every candidate is checked against), then the exports made from it
    order = sorted((RuntimeConfig(*c) for c in configs), key=lambda c: (c.runtime != "torch", c != TORCH_FP32))
    log.warning("measuring %s for %s on this CPU, one at a time, once per machine (kept in %s)",
                labels(order), backend.model_id, choices_root())
    say(f"measuring runtimes (1/{len(order)}): loading torch fp32, the reference")
    reference_backend = backend.variant(TORCH_FP32)
    reference_backend.compute(batches[0])  # loads
    t = time.perf_counter()
    reference = np.concatenate([reference_backend.compute(b) for b in batches])
    reference_pass = time.perf_counter() - t  # torch fp32's first timed pass
    if job_texts:  # what the job's own check will compare with, while torch is here
        backend.job_reference = (list(job_texts), reference_backend.compute(list(job_texts)))
    guard = max_model_memory_bytes()
    entries: list[dict[str, Any]] = []
    spent: list[float] = []
    torch_held = True
    for n, config in enumerate(order, 1):
        left = f", ~{(sum(spent) / len(spent)) * (len(order) - n + 1):.0f} s left" if spent else ""
        say(f"measuring runtimes ({n}/{len(order)}): {label(config)}{left}")
        began = time.perf_counter()
        entry: dict[str, Any] = {"config": list(config), "label": label(config)}
        entries.append(entry)
        variant = reference_backend if config == TORCH_FP32 else backend.variant(config)
        base = rss_bytes()
        try:
            if guard is not None:  # before loading, not after an OOM
                need = variant.estimated_model_bytes() * RUNTIME_FOOTPRINT.get(config.runtime, 3.0)
                if need > guard:
                    raise MemoryGuardError(f"needs about {need / 1e9:.2f} GB to run, more than MAX_MODEL_MEMORY_GB="
                                           f"{guard / 1e9:g}")
            if config.runtime != "torch":
                variant.ensure_export()  # made from the torch model, which can go now
                if torch_held:
                    reference_backend.release(torch_model=True)
                    torch_held = False
            is_reference = variant is reference_backend
            half = config.quantize != "int8" and config.precision in ("bf16", "fp16")
            if half:  # the cheap refusal first: the longest batch alone vs batched, before any timed pass
                longest = variant.compute(batches[-1])
                entry["fidelity"] = figures(reference[-len(batches[-1]):], longest)  # the full pass replaces it
                entry["alone_vs_batched"] = _batch_invariance(variant, batches[-1:], longest)
                if entry["alone_vs_batched"] < BATCH_INVARIANT:
                    raise _NotInvariant(entry["alone_vs_batched"])
            # the first pass loads and warms up (a runtime's first call of each shape is slower):
            # the best of the passes is kept, the first one's vectors checked. torch fp32's pass is
            # the reference's own (eager torch compiles nothing per shape: one pass is its speed)
            passes = [reference_pass] if is_reference else []
            if is_reference:
                entry.update(fidelity=figures(reference, reference), accepted=True)
            for _ in range(0 if is_reference else TIMED_PASSES):
                t = time.perf_counter()
                vectors = np.concatenate([variant.compute(b) for b in batches])
                passes.append(time.perf_counter() - t)
                if len(passes) == 1:
                    entry["fidelity"] = figures(reference, vectors)
                    bar = bar_for(config.quantize)
                    entry["accepted"] = bar.passes(entry["fidelity"])
                    if not entry["accepted"]:
                        entry["reason"] = f"cosine to torch fp32 {entry['fidelity']['mean']:.5f} mean / " \
                                          f"{entry['fidelity']['min']:.5f} min, under the {bar.name} bar ({bar})"
                        break
                    # half precision's rounding follows the batch's shape; fp32's (~1e-7) cannot reach the bar,
                    # and int8 (activation scales per batch) is lossy and its own identity
                    if half:  # the other batches too
                        entry["alone_vs_batched"] = min(entry["alone_vs_batched"],
                                                        _batch_invariance(variant, batches[:-1], vectors))
                        if entry["alone_vs_batched"] < BATCH_INVARIANT:
                            raise _NotInvariant(entry["alone_vs_batched"])
            if entry["accepted"]:
                entry["texts_per_s"] = round(len(timed) / max(min(passes), 1e-9), 1)
            grown = rss_bytes() - base
            entry["memory_mb"] = round(max(grown, 0) / 2**20, 1)
            if guard is not None and grown > guard and entry["accepted"]:
                raise MemoryGuardError(f"grew the process by {grown / 1e9:.2f} GB, more than MAX_MODEL_MEMORY_GB={guard / 1e9:g}")
        except _NotInvariant as exc:
            entry.update(accepted=False, alone_vs_batched=exc.cosine, memory_mb=round(max(rss_bytes() - base, 0) / 2**20, 1),
                         reason=f"a text's vector depends on the batch it is in (cosine {exc.cosine:.6f} alone "
                                f"against batched; needs >= {BATCH_INVARIANT})")
            entry.pop("texts_per_s", None)
        except MemoryGuardError as exc:
            # transient: a guard set for one job must not refuse the configuration for every job after it
            entry.update(accepted=False, transient=True, reason=f"over the memory guard: {first_line(exc)}")
            entry.pop("texts_per_s", None)
            log.warning("%s not measured: %s", label(config), entry["reason"])
        except (HfbatchError, ImportError, OSError, RuntimeError, ValueError) as exc:
            entry.update(accepted=False, reason=first_line(exc)[:300])
            entry["transient"] = isinstance(exc, (OSError, ImportError)) and not isinstance(exc, ModelLoadError)
            log.warning("%s refused: %s", label(config), entry["reason"])
        finally:
            if variant is not reference_backend:
                variant.release()
        spent.append(time.perf_counter() - began)
    if torch_held:
        reference_backend.release(torch_model=False)
    return entries


class _NotInvariant(Exception):
    """A half-precision candidate whose vectors follow the batch a text is in."""

    def __init__(self, cosine: float):
        super().__init__(f"alone against batched: {cosine}")
        self.cosine = cosine


def _batch_invariance(variant: "LocalBackend", batches: list[list[str]], batched: np.ndarray) -> float:
    """Min cosine between each text of `batches` embedded alone and the same text in its padded
    batch (`batched`: their rows, in order). Half precision's rounding follows the batch's shape
    (~1e-5, where fp32's is ~1e-7)."""
    texts = [t for b in batches for t in b]
    if not texts:
        return 1.0
    alone = np.concatenate([variant.compute([t]) for t in texts])
    return float(np.floor(cosine_rows(batched[:len(texts)], alone).min() * 1e7) / 1e7)  # rounded down: never up to the bar




def remeasure(backend: "LocalBackend", configs: Sequence[Config], note: Note | None = None) -> MeasurementRecord:
    """Measure `configs` again now (`hfbatch tune`), keeping a pin; returns the new record."""
    path = record_path(backend)
    with lock(path):
        return _measure_and_keep(backend, path, MeasurementRecord.read(path), list(configs), note)


