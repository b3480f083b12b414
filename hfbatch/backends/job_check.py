"""The job-text check: a lossy configuration (int8, bf16, fp16) is held to its bar against fp32
on the job's own first texts before any of its vectors is used.

Its own module because it is the one check that runs on the job's data rather than on fixed
texts (fidelity.py keeps the bars and the calibration sample), and because it orders two models
so they are never held at once: the fp32 reference first, let go, then the configuration's own.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Sequence

import numpy as np

from ..errors import ModelLoadError, first_line
from .builds import ExportFailed
from .fidelity import bar_for, check_fidelity
from .records import refuse
from .torch_runner import TorchModel

if TYPE_CHECKING:
    from .local import LocalBackend

JOB_SAMPLE_TEXTS = 64  # at most this many of the job's first texts are checked against fp32 (int8, half)


def job_sample(texts: Sequence[str]) -> list[str]:
    """The distinct first texts the check runs on."""
    return list(dict.fromkeys(texts))[:JOB_SAMPLE_TEXTS]


def needs_check(quantize: str | None, precision: str) -> bool:
    """int8 and half precision are checked on the job's own texts; fp32 of any runtime is not
    (its export was proved at the faithful bar)."""
    return bool(quantize) or precision in ("bf16", "fp16")


def check_job_texts(backend: "LocalBackend", texts: Sequence[str]) -> np.ndarray | None:
    """The job's own first texts (its first batch) must pass the configuration's bar against fp32
    before any of its vectors is used: int8 >= 0.99 mean / 0.98 min, half precision the faithful
    bar. ModelLoadError (nothing written) otherwise; figures to `backend.job_fidelity`. Returns
    the vectors of `texts` when the check computed all of them (the batch needs no second pass),
    None when it did not, or when the configuration failed to load (the next one checks afresh)."""
    sample = job_sample(texts)
    if not sample:
        return None
    choice = backend.prepare()
    kept = backend.job_reference
    if kept is not None and kept[0] == sample:  # torch fp32's, made while measuring for this job
        reference = kept[1]
        backend.load()
        if backend.config != choice.config:
            return None
        got = backend.compute(sample)
    elif backend.runtime != "torch":
        # the fp32 reference first, let go before the engine loads: never both models at once
        reference = backend.export_reference(sample)
        backend.load()
        if backend.config != choice.config:  # it failed to load: the next configuration checks afresh
            return None
        got = backend.compute(sample)
    else:
        engine = backend.load()
        assert isinstance(engine, TorchModel)
        if backend.config != choice.config:
            return None
        reference, got = engine.encode(sample, "fp32"), engine.encode(sample, backend.precision)
    fix = "drop --quantize int8." if backend.quantize else "pass --precision fp32."
    result = check_fidelity(reference, got, bar_for("int8" if backend.quantize else None), what=choice.label,
                            where=f"this job's first {len(sample)} texts", fix=fix)
    backend.job_fidelity = {"texts": len(sample), **result}
    return got if list(texts) == sample else None


def check_until_faithful(backend: "LocalBackend", texts: Sequence[str], sample: list[str]) -> np.ndarray | None:
    """Check the job's first batch (`texts`) until a configuration passes (see check_job_texts),
    passing over each that fails when the choice was auto and faithful: one that fails to load is
    also refused in the record (its files, not this job's texts: the next job skips it too).
    Forced configurations and int8 (whose identity is the runtime that runs it) fail the job
    instead. Returns the batch's vectors when the check computed all of them."""
    checked: np.ndarray | None = None
    timings = backend.timings
    while backend.job_fidelity is None and needs_check(backend.quantize, backend.precision) and texts:
        started, before = time.perf_counter(), timings["model_load"] + timings["export"]
        try:
            checked = check_job_texts(backend, texts)
        except ModelLoadError as exc:
            if backend.prepare().by == "asked for" or backend.request.quantize == "int8":
                raise  # forced; or int8, whose identity is the runtime that runs it
            if isinstance(exc, ExportFailed):  # its files, not this job's texts: the next job skips it too
                refuse(backend, backend.prepare().config, first_line(exc))
                backend.pass_over(f"failed to load ({first_line(exc)})")
            else:
                backend.pass_over(f"not faithful enough on this job's texts ({first_line(exc)})")
            backend.prepare(job_texts=sample)
        finally:  # loading and exporting inside the check are booked as such
            timings["check"] += time.perf_counter() - started - (timings["model_load"] + timings["export"] - before)
    return checked
