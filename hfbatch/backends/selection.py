"""Which runtime and precision a local job runs with when `auto` leaves it open: measured here.

Why measured: the fast path depends on the CPU. On an AMD EPYC with AVX-512 BF16, torch bf16 was
1.35x fp32 and ONNX int8 1.26x; on an Intel Ice Lake without bf16, bf16 was 2.5x *slower* and ONNX
Runtime fp32 0.76x torch. No fixed rule is right on both, so the candidates that fit the request
(`candidates`: torch fp32; torch bf16 where the CPU has native bf16; ONNX Runtime fp32 and int8;
OpenVINO fp32 and int8 when installed) are each loaded, checked against torch fp32 and timed the
first time a model is used on a machine: on fixed texts of every length a job meets (short
reviews to paragraphs of ~250 tokens: int8 gains more on long texts than on short ones), batched
as jobs batch, round-robin over the candidates for a few rounds with the best round kept, so that
a busy moment of a shared machine slows every candidate alike instead of ranking whichever it
happened to hit last. Fixed, so every measurement on a machine is comparable and no job's texts
are kept. The figures are kept as JSON in
the user cache dir (`choices/`, keyed by CPU model + flags + library versions + the model's
files; `hfbatch capabilities` lists them). A job then takes the accepted candidate with the
least expected time, start-up + rows / speed: a 100-row cron job gets the one that starts
fastest (a cached export needs no torch import), a big job the one that runs fastest. The choice
must also pass the fidelity bar on the job's own first texts, or the next one is taken.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from .._version import __version__
from ..errors import HfbatchError, InputError
from ..resources import MemoryGuardError, cpu_facts, cpu_has_native_bf16
from ..vectors import cosine_rows
from .exports import exports_root, package_version, write_atomic

if TYPE_CHECKING:
    from .local import LocalBackend

Config = tuple[str, str, str]  # (runtime, precision, quantize)
RECORD_FORMAT = 3  # 3: timed round-robin on fixed texts of every length
TIMED_ROUNDS = 3  # after one warm-up pass; each round times every candidate once, the best round is kept
BATCH = 32
EXPORT_RUNTIMES = {"onnx": "onnxruntime", "openvino": "openvino"}
_LIBRARIES = ("torch", "onnxruntime", "openvino", "nncf", "sentence-transformers", "transformers", "tokenizers")


def label(config: Config) -> str:
    runtime, precision, quantize = config
    return f"{runtime} {'int8' if quantize == 'int8' else precision}"


def candidates(runtime: str, precision: str, quantize: str, cpu_only: bool) -> list[Config]:
    """The configurations that fit --runtime/--precision/--quantize on this machine ("auto" or
    "none"/"int8" for quantize). One means nothing to measure. InputError when none fits."""
    if runtime == "auto":
        runtimes = ["torch"]
        if cpu_only or quantize == "int8":  # int8 runs on the CPU, even where a GPU is
            runtimes += [rt for rt, module in EXPORT_RUNTIMES.items() if importlib.util.find_spec(module) is not None]
    else:
        runtimes = [runtime]
    out: list[Config] = []
    for rt in runtimes:
        if rt == "torch":
            if quantize == "int8":
                continue
            if precision != "auto":
                out.append(("torch", precision, "none"))
            elif not cpu_only:
                out.append(("torch", "auto", "none"))  # a GPU: fp16 by the device rule, checked at load
            else:
                out.append(("torch", "fp32", "none"))
                if cpu_has_native_bf16():  # emulated bf16 is slower than fp32: not worth timing
                    out.append(("torch", "bf16", "none"))
        elif precision in ("auto", "fp32"):
            kinds = {"auto": ["none", "int8"], "none": ["none"], "int8": ["int8"]}[quantize]
            if rt == "openvino" and quantize == "auto" and importlib.util.find_spec("nncf") is None:
                kinds = ["none"]  # its int8 weights are made by NNCF (hfbatch[openvino] brings it)
            out += [(rt, "fp32", q) for q in kinds]
    if not out:
        raise InputError(f"no runtime fits --runtime {runtime} --precision {precision} --quantize {quantize} here "
                         "(ONNX Runtime and OpenVINO run fp32 or int8 on the CPU; torch runs fp32/bf16/fp16); "
                         "drop one of them.")
    return out


def machine() -> dict[str, Any]:
    """What the measurements hold for: the CPU and the libraries that run the model."""
    cpu = cpu_facts()
    return {"cpu": cpu.get("model"), "cores": cpu.get("cores"), "flags": cpu.get("flags"),
            "libraries": {name: package_version(name) for name in _LIBRARIES}, "hfbatch": __version__}


def choices_root() -> Path:
    return exports_root().parent / "choices"


def record_path(backend: "LocalBackend") -> Path:
    from .onnx import int8_recipe
    from .openvino_export import int8_recipe as openvino_recipe

    where = json.dumps(machine(), sort_keys=True).encode()
    # a new int8 recipe is another candidate: measured again, not ranked by the old one's speed
    extra = (f"max_length={backend.max_length};prompt={backend.prompt!r};"
             f"recipes={int8_recipe()},{openvino_recipe()}").encode()
    key = hashlib.blake2b(where + b"\x1f" + backend.model_key().encode() + b"\x1f" + extra, digest_size=10).hexdigest()
    return choices_root() / f"{key}.json"


def read_record(path: Path) -> dict[str, Any]:
    """The record at `path`, or {} (measured again) when it is missing, of another format, or not
    the shape this module writes (edited by hand, written by something else)."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        return {}
    entries = record.get("candidates", [])
    well_formed = isinstance(entries, list) and isinstance(record.get("job_checks", {}), dict) and all(
        isinstance(e, dict) and isinstance(e.get("config"), list) and len(e["config"]) == 3
        and all(isinstance(part, str) for part in e["config"]) and isinstance(e.get("label", ""), str)
        and all(isinstance(e.get(k, 0), (int, float)) and not isinstance(e.get(k, 0), bool)
                for k in ("startup_s", "texts_per_s"))
        for e in entries)
    return record if well_formed else {}


def _write_record(path: Path, record: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(record, indent=1))


def measured(backend: "LocalBackend", configs: Sequence[Config], log: Callable[[str], None] | None = None,
             measure: bool = True) -> tuple[Path, dict[str, Any]]:
    """The record of this machine and model, with every config in `configs` measured (those
    missing are measured now and the record saved; not with measure=False)."""
    path = record_path(backend)
    record = read_record(path)
    recorded = {tuple(c["config"]): c for c in record.get("candidates", [])}
    if any(c not in recorded for c in configs):
        missing = list(configs)  # all of them, on one sample: speeds from two samples are not ranked together
    else:  # only those that failed for a passing reason (a full disk, the memory guard) again
        missing = [c for c in configs if recorded[c].get("transient")]
    if missing and measure:
        if log:
            log(f"measuring {', '.join(label(c) for c in missing)} for {backend.model_id} on this CPU, once "
                f"(kept in {path.parent})")
        started = time.perf_counter()
        fixed, sample = _fixed_texts(), _sample()
        torch_fp32 = backend.variant(("torch", "fp32", "none"))
        reference = np.concatenate([torch_fp32.compute(fixed[i:i + BATCH]) for i in range(0, len(fixed), BATCH)])
        entries = [c for c in record.get("candidates", []) if tuple(c["config"]) not in missing]
        entries += _measure(backend, missing, sample, fixed, reference)
        record = {"format": RECORD_FORMAT, "model_id": backend.model_id, "machine": machine(),
                  "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "sample_texts": len(sample), "candidates": entries, "job_checks": record.get("job_checks", {}),
                  "seconds": round(time.perf_counter() - started + float(record.get("seconds", 0)), 1)}
        try:
            _write_record(path, record)
        except OSError as exc:  # a read-only cache dir: this job still chooses; the next measures again
            if log:
                log(f"cannot keep the runtime measurements in {path.parent} ({exc}); they hold for this job only")
    return path, record


def _fixed_texts() -> list[str]:
    """What every candidate is checked against torch fp32 on: varied kinds, lengths, languages."""
    from .local import CALIBRATION_TEXTS
    from .onnx import SMOOTHING_TEXTS

    return list(dict.fromkeys([*SMOOTHING_TEXTS, *CALIBRATION_TEXTS]))


def _sample() -> list[str]:
    """What every candidate is timed on: the fixed texts and paragraphs made of runs of 4, 8 and 16
    of them (the length of documents), sorted by length as a job batches them."""
    texts = _fixed_texts()
    paragraphs = [" ".join(texts[i:i + n]) for n in (4, 8, 16) for i in range(0, len(texts) - n + 1, n)]
    return sorted(dict.fromkeys(texts + paragraphs), key=len)


def _measure(backend: "LocalBackend", configs: Sequence[Config], sample: list[str], fixed: list[str],
             reference: np.ndarray) -> list[dict[str, Any]]:
    """Load each configuration and check it on the `fixed` texts (`reference`: torch fp32's
    vectors of them), then time those accepted round-robin on `sample`. Acceptance does not
    depend on which job measured: each job's own texts get their own check (`_job_check`). A
    failure (not installed, export refused, below the bar) is kept with its reason, so it is not
    tried again on this machine (environmental ones are: `transient`)."""
    batches = [sample[i:i + BATCH] for i in range(0, len(sample), BATCH)]
    fixed_batches = [fixed[i:i + BATCH] for i in range(0, len(fixed), BATCH)]
    entries: list[dict[str, Any]] = []
    loaded: dict[int, "LocalBackend"] = {}
    for config in configs:
        entry: dict[str, Any] = {"config": list(config), "label": label(config)}
        entries.append(entry)
        try:
            variant = backend.variant(config)
            variant.load()
            entry["startup_s"] = round(_startup(variant), 3)
            vectors = np.concatenate([variant.compute(b) for b in fixed_batches])
            for b in batches:  # warm-up on the texts it is timed on
                variant.compute(b)
            cosine = cosine_rows(reference, vectors)
            entry["fidelity"] = {"mean": round(float(cosine.mean()), 6), "min": round(float(cosine.min()), 6)}
            bar = _bar(config)
            entry["accepted"] = entry["fidelity"]["mean"] >= bar[0] and entry["fidelity"]["min"] >= bar[1]
            if entry["accepted"]:
                loaded[len(entries) - 1] = variant
            else:
                entry["reason"] = f"cosine to torch fp32 below {bar[0]} mean / {bar[1]} min"
        except (HfbatchError, ImportError, OSError, RuntimeError, ValueError) as exc:
            _failed(entry, exc)
    best = {i: float("inf") for i in loaded}
    order = list(loaded)
    for round_ in range(TIMED_ROUNDS):
        for i in order[round_ % len(order):] + order[:round_ % len(order)] if order else ():
            try:
                started = time.perf_counter()
                for b in batches:
                    loaded[i].compute(b)
                best[i] = min(best[i], time.perf_counter() - started)
            except (HfbatchError, OSError, RuntimeError, ValueError) as exc:
                _failed(entries[i], exc)
                order.remove(i)
    for i in order:
        entries[i]["texts_per_s"] = round(len(sample) / max(best[i], 1e-9), 1)
    return entries


def _failed(entry: dict[str, Any], exc: BaseException) -> None:
    entry.update(accepted=False, reason=(str(exc).splitlines() or [type(exc).__name__])[0][:300])
    # a full disk, a busy file, the memory guard: measured again next time, not refused for good
    entry["transient"] = isinstance(exc, (OSError, RuntimeError, ImportError, MemoryGuardError))


def _bar(config: Config) -> tuple[float, float]:
    from .local import EXPORT_MIN_COSINE, HALF_MIN_MEAN, HALF_MIN_MIN
    from .onnx import INT8_MIN_MEAN, INT8_MIN_MIN

    if config[2] == "int8":
        return INT8_MIN_MEAN, INT8_MIN_MIN
    if config[1] in ("bf16", "fp16"):
        return HALF_MIN_MEAN, HALF_MIN_MIN
    return 0.0, EXPORT_MIN_COSINE if config[0] != "torch" else 0.0


def _startup(variant: "LocalBackend") -> float:
    """Seconds a new process spends before this configuration's first vector: importing its
    libraries (timed in a fresh interpreter, as a job pays it) and loading the model or session
    again (the in-process caches bypassed)."""
    modules = ["sentence_transformers"] if variant.runtime == "torch" else [EXPORT_RUNTIMES[variant.runtime], "tokenizers"]
    return sum(import_seconds(m) for m in modules) + variant.reload_seconds()


_IMPORTS: dict[str, float] = {}


def import_seconds(module: str) -> float:
    """Import time of `module` in a fresh interpreter (the caller may have imported it already)."""
    if module not in _IMPORTS:
        code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
        try:
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
            _IMPORTS[module] = float(out.stdout.strip().splitlines()[-1])
        except (subprocess.SubprocessError, OSError, ValueError, IndexError):
            _IMPORTS[module] = 0.0
    return _IMPORTS[module]


MAX_JOB_CHECKS = 200  # job-text checks remembered per record (the most recent)


def _sample_key(config: Config, sample: Sequence[str]) -> str:
    h = hashlib.blake2b(digest_size=12)
    h.update(label(config).encode())
    for text in sample:
        h.update(b"\x1f" + text.encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def _remember(path: Path, record: dict[str, Any]) -> None:
    """Keep a passed job-text check in the record (best effort: a read-only cache only loses it)."""
    checks = record.get("job_checks", {})
    record["job_checks"] = dict(list(checks.items())[-MAX_JOB_CHECKS:])
    try:
        _write_record(path, record)
    except OSError:
        pass


def _job_check(variant: "LocalBackend", config: Config, sample: Sequence[str], path: Path,
               record: dict[str, Any]) -> None:
    """`variant` checked on the job's first texts (HfbatchError below the bar), or the pass of an
    earlier run on the same texts taken from the record: a rerun of the same input loads no model."""
    seen = _sample_key(config, sample)
    passed = record.get("job_checks", {}).get(seen)
    if isinstance(passed, dict):
        variant.job_fidelity = dict(passed, remembered=True)
        return
    variant.check_job_texts(sample)
    if variant.job_fidelity is not None:  # an empty input checks nothing: nothing to remember
        record.setdefault("job_checks", {})[seen] = variant.job_fidelity
        _remember(path, record)


def confirm(backend: "LocalBackend", texts: Callable[[], Sequence[str]]) -> None:
    """A forced int8 or half-precision configuration checked on the job's first texts before the
    cache opens, its pass remembered in this machine's record as auto's are."""
    path = record_path(backend)
    record = read_record(path) or {"format": RECORD_FORMAT, "model_id": backend.model_id, "machine": machine(),
                                   "candidates": [], "job_checks": {}}
    _job_check(backend, backend.config, texts(), path, record)


def estimate(entry: dict[str, Any], rows: int | None) -> float:
    """Expected seconds of a job of `rows` texts (None: a large job, where speed is all)."""
    rate = max(float(entry.get("texts_per_s") or 0.0), 1e-9)
    if rows is None:
        return 1.0 / rate
    return float(entry.get("startup_s") or 0.0) + rows / rate


def choose(backend: "LocalBackend", configs: Sequence[Config], *, rows: int | None = None,
           texts: Callable[[], Sequence[str]] | None = None, measure: bool = True) -> dict[str, Any]:
    """Settle `backend` on the accepted configuration of least expected time that also passes the
    bar on the job's first texts; returns what the sidecar says of the choice. measure=False
    (a dry run): nothing measured here yet means torch fp32, saying that the job would measure."""
    import logging

    logger = logging.getLogger("hfbatch.backends.selection")
    path, record = measured(backend, configs, log=logger.warning, measure=measure)
    entries = {tuple(c["config"]): c for c in record.get("candidates", [])}
    if not measure and not any(entries.get(c, {}).get("accepted") for c in configs):
        backend.use(("torch", "fp32", "none"))
        return {"by": "not measured here yet: the job will measure " + ", ".join(label(c) for c in configs) + " first",
                "chosen": "torch fp32", "rows": rows, "measurements": str(path), "passed_over": [], "candidates": []}
    ranked = sorted((c for c in configs if entries.get(c, {}).get("accepted")), key=lambda c: estimate(entries[c], rows))
    passed_over: list[dict[str, Any]] = []
    sample: Sequence[str] | None = None
    for config in ranked:
        variant = backend.variant(config)
        if variant.needs_job_check() and texts is not None:
            sample = texts() if sample is None else sample
            try:
                _job_check(variant, config, sample, path, record)
            except HfbatchError as exc:
                passed_over.append({"label": label(config), "reason": str(exc)[:300]})
                logger.warning("%s is not faithful enough on this job's texts; taking the next fastest", label(config))
                continue
        backend.use(config, engine_from=variant)
        return {"by": "measured on this machine", "chosen": label(config), "rows": rows,
                "estimated_seconds": round(estimate(entries[config], rows), 3) if rows is not None else None,
                "measurements": str(path), "passed_over": passed_over,
                "candidates": [{k: v for k, v in entries[c].items() if k != "config"} for c in configs if c in entries]}
    why = {item["label"]: item["reason"] for item in passed_over}  # accepted here, unfaithful on the job's texts
    refused = "; ".join(f"{entries[c]['label']}: {why.get(entries[c]['label']) or entries[c].get('reason')}"
                        for c in configs if c in entries) or "none measured"
    raise InputError(f"no configuration of {backend.model_id} passed its checks here ({refused}); "
                     "pass --runtime torch --precision fp32.")
