"""OpenVINO runtime for the local backend (`--runtime openvino`, extra `hfbatch[openvino]`).

It runs the graph hfbatch already exports for `--runtime onnx` (transformer + pooling +
normalisation, inputs input_ids / attention_mask / token_type_ids, output "embedding"): OpenVINO
reads ONNX directly, so there is no optimum and no second export. `--quantize int8` stores the
weights as int8 (NNCF weight compression, symmetric per output channel, no calibration data) and
OpenVINO's CPU plugin quantizes each activation row dynamically in groups of DQ_GROUP channels as
it runs, so the matrix products run in int8. Per-group activation scales keep the few outlier
channels of BERT-like models from flattening the rest, which NNCF's static per-tensor int8 could
not (0.93 min cosine on real text even with accuracy control, and minutes to make). The result
is accepted only when its vectors keep the same fidelity bar as ONNX int8 (fidelity.INT8: cosine to
fp32 >= 0.99 mean and >= 0.98 min), else loading refuses with the figures.

Nothing here imports openvino, nncf, torch or transformers at import time: `import hfbatch` and
`--help` stay fast and work without the extra. Each function imports what it needs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..errors import BackendError, InputError, ModelLoadError, first_line
from .fidelity import Bar, bar_for, check_fidelity

log = logging.getLogger(__name__)

INSTALL_HINT = "--runtime openvino needs OpenVINO: pip install 'hfbatch[openvino]'."
NNCF_HINT = "--runtime openvino --quantize int8 needs NNCF: pip install 'hfbatch[openvino]'."
PRECISIONS = ("f32", "bf16", "f16")
# Channels per dynamic activation scale for int8 weights. MiniLM-L6, 600 held-out real texts
# (cosine to fp32 mean / min) and speed vs ONNX Runtime fp32 on this 2-core AMD EPYC: 32 (the
# plugin's default) 0.9993 / 0.9977, 1.96x; 64 0.9992 / 0.9972, 2.18x; 128 0.9989 / 0.9964,
# 2.34x; 256 0.9983 / 0.9941, 2.09x; 384 (one per token) 0.9977 / 0.9924, 2.38x.
# (ONNX Runtime's int8, fused and smoothed: 0.9982 / 0.9927, 1.87x.) No effect on fp32 weights.
DQ_GROUP = 128


def available() -> bool:
    """Whether OpenVINO is installed, without importing it (that costs ~0.3 s and 100+ MB)."""
    return importlib.util.find_spec("openvino") is not None


def version() -> str | None:
    """The installed OpenVINO's version (for provenance and `doctor`), None when it is absent.
    Read from the package metadata, so this does not import openvino either."""
    if not available():
        return None
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("openvino")
    except PackageNotFoundError:  # importable but not installed as a distribution (a source build)
        import openvino

        return str(openvino.__version__)


def _import_openvino() -> Any:
    if not available():
        raise ModelLoadError(INSTALL_HINT)
    try:
        import openvino
    except ImportError as exc:  # present but broken (a missing shared library)
        raise ModelLoadError(f"{INSTALL_HINT} (importing it failed: {first_line(exc, 240)})") from exc
    return openvino


class OpenVinoSession:
    """One compiled model and one reused InferRequest: `run(feeds)` -> float32 [batch, dim].

    Compiled for the CPU with:
    - PERFORMANCE_HINT "LATENCY": hfbatch runs one batch at a time (one synchronous request), and
      THROUGHPUT splits the cores into streams of which a single request uses only one. Measured
      on this 2-core AMD EPYC (avx512_bf16, avx512_vnni; no AMX), all-MiniLM-L6-v2, 1,000 stdlib
      docstrings in batches of 32 sorted by length: LATENCY 39 texts/s, THROUGHPUT 19 texts/s on a
      quiet machine (2 streams x 1 thread); 17 vs 15 texts/s interleaved batch by batch on a busy
      one (benchmarks/bench_openvino.py). Splitting each batch over 2 THROUGHPUT streams (tried
      2026-12-07: 1.1x on an idle machine, 1.4x on a busy one) gave 16 of 2,000 rows of a real job
      wrong vectors (a whole slice at once, cosine 0.25-0.47 to LATENCY's) though short tests and
      a direct comparison agreed: not used.
    - INFERENCE_PRECISION_HINT "f32" unless asked otherwise: on CPUs with avx512_bf16 or AMX
      OpenVINO picks bf16 by itself (it does on this machine), which changes the vectors (cosine
      to fp32 0.99998 mean / 0.99997 min here, 1.7-1.8x faster); on CPUs without native bf16 it is
      emulated and slow. hfbatch promises fp32-faithful vectors unless a precision is asked for.
    - DYNAMIC_QUANTIZATION_GROUP_SIZE DQ_GROUP: for int8 weights (quantize_int8), activations
      quantized per row in groups of that many channels as the model runs.
    - CACHE_DIR when given: the compiled blob (~87 MB for MiniLM) is cached, keyed by a hash of
      the model read (graph and weights) and the config, so later loads skip compilation
      (measured here, best of 3: 0.29 s without a cache, 0.37 s filling it, 0.20 s from it). The
      model is read first on purpose: `compile_model(path)` loads faster from the cache (0.07 s)
      but keys it by the path alone and serves the old blob when a file is re-exported in place
      (checked: a changed file at the same path, new mtime, gave the old model's outputs).
    """

    def __init__(self, model_path: Path, *, cache_dir: Path | None = None, threads: int | None = None,
                 precision: str = "f32"):
        if precision not in PRECISIONS:
            raise InputError(f"OpenVINO precision must be one of {', '.join(PRECISIONS)}, not {precision!r}.")
        ov = _import_openvino()
        self.path = Path(model_path)
        if not self.path.is_file():
            raise ModelLoadError(f"OpenVINO cannot load {self.path}: no such file; use --runtime onnx or torch.")
        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": precision,
                                  "DYNAMIC_QUANTIZATION_GROUP_SIZE": str(DQ_GROUP)}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        if cache_dir is not None:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            config["CACHE_DIR"] = str(cache_dir)
        try:
            core = ov.Core()
            model = core.read_model(str(self.path))
            self.compiled = core.compile_model(model, "CPU", config)
            self.request = self.compiled.create_infer_request()
        except Exception as exc:  # OpenVINO raises RuntimeError for parse, shape and compile failures alike
            raise ModelLoadError(f"OpenVINO could not load {self.path} ({first_line(exc, 240)}); "
                                 "re-export it or use --runtime onnx or torch.") from exc
        self.input_names: list[str] = [port.get_any_name() for port in self.compiled.inputs]
        self.precision = precision
        self._output = self.compiled.output(0)
        self._lock = threading.Lock()  # one InferRequest: calls from several threads take turns

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """The graph's first output for one batch, as float32 [batch, dim].

        `feeds` holds int64 [batch, tokens] arrays by input name; names the model does not take
        are ignored, so a caller can pass the tokenizer's output as it comes. Batch size and token
        count may differ from call to call (the export's axes are dynamic)."""
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise BackendError(f"{self.path} needs inputs {', '.join(missing)} that the batch lacks; "
                               "use --runtime onnx or torch.")
        inputs = {n: np.ascontiguousarray(feeds[n], dtype=np.int64) for n in self.input_names}
        with self._lock:
            try:
                result = self.request.infer(inputs)
            except Exception as exc:
                shape = "x".join(str(d) for d in inputs[self.input_names[0]].shape)
                raise BackendError(f"OpenVINO failed on a batch of {shape} tokens with {self.path} "
                                   f"({first_line(exc, 240)}); use --runtime onnx or torch.") from exc
            return np.array(result[self._output], dtype=np.float32, copy=True)


# --- int8 weights through NNCF ----------------------------------------------------------------------


def _import_nncf() -> Any:
    if importlib.util.find_spec("nncf") is None:
        raise ModelLoadError(NNCF_HINT)
    # NNCF sends usage telemetry unless this is set (it switches nothing else): a batch job
    # quantizing a model should not phone home.
    os.environ.setdefault("NNCF_CI", "1")
    try:
        import nncf
    except ImportError as exc:
        raise ModelLoadError(f"{NNCF_HINT} (importing it failed: {first_line(exc, 240)})") from exc
    with contextlib.suppress(Exception):  # imported before by someone else: stub it all the same
        from nncf.telemetry import decorator, wrapper

        decorator.telemetry = wrapper.telemetry = wrapper.NNCFTelemetryStub()
    return nncf


@contextlib.contextmanager
def _quiet_nncf() -> Iterator[None]:
    """NNCF logs INFO to stdout through its own handler and draws rich progress bars on stdout;
    a batch job's stdout may be its output. Route its log records (WARNING and up) into Python
    logging under hfbatch's rules, and swallow the progress bars."""
    from nncf.common.logging import nncf_logger

    saved = (list(nncf_logger.handlers), nncf_logger.level, nncf_logger.propagate)
    nncf_logger.handlers = []
    nncf_logger.setLevel(logging.WARNING)
    nncf_logger.propagate = True
    sink = io.StringIO()
    try:
        with contextlib.redirect_stdout(sink):
            yield
    finally:
        nncf_logger.handlers, _, nncf_logger.propagate = saved
        nncf_logger.setLevel(saved[1])
        log.debug("NNCF progress output: %d characters swallowed", len(sink.getvalue()))


def _int8_weights(model: Any) -> int:
    """int8 constants in the model: the compressed weights (0: nothing was compressed)."""
    import openvino

    return sum(1 for op in model.get_ops()
               if op.get_type_name() == "Constant" and op.get_element_type() == openvino.Type.i8)


def quantize_int8(onnx_path: Path, target: Path, *, validation: list[dict[str, np.ndarray]], reference: np.ndarray,
                  bar: Bar | None = None) -> dict[str, float]:
    """int8 weights for the exported ONNX graph, saved as OpenVINO IR at `target` and checked.

    `validation`: feed dicts whose outputs, concatenated, match `reference` row for row (fp32
    vectors, float32 [n, dim]).

    NNCF's weight compression (INT8_SYM, per output channel; data-free, a second or two for
    MiniLM) stores the weights as int8; OpenVinoSession compiles them with dynamic activation
    quantization (DQ_GROUP), so the products run in int8. The result is saved to temp names in
    target's folder, loaded back as OpenVinoSession loads it, and checked on every validation row.
    Under `bar` (fidelity.check_fidelity; default the int8 bar, fidelity.INT8), or with no int8
    weight, ModelLoadError with the figures and nothing
    at `target`; otherwise the .bin then the .xml are moved into place (a reader waits for the
    .xml: it appears last) and {"mean", "min", "seconds"} is returned (cosine figures, and the
    wall time of compression and check).
    """
    started = time.perf_counter()
    onnx_path, target = Path(onnx_path), Path(target)
    rows = sum(len(next(iter(f.values()))) for f in validation)
    reference = np.asarray(reference, dtype=np.float32)
    if not validation:
        raise ValueError("quantize_int8 needs validation batches")
    if reference.ndim != 2 or reference.shape[0] != rows:
        raise ValueError(f"reference has shape {reference.shape}, the validation batches hold {rows} rows")
    ov = _import_openvino()
    nncf = _import_nncf()
    if not onnx_path.is_file():
        raise ModelLoadError(f"int8 with OpenVINO cannot read {onnx_path}: no such file; "
                             "drop --quantize int8 or use --runtime onnx.")
    try:
        model = ov.Core().read_model(str(onnx_path))
    except Exception as exc:
        raise ModelLoadError(f"OpenVINO could not read {onnx_path} ({first_line(exc, 240)}); "
                             "drop --quantize int8 or use --runtime onnx.") from exc
    partial_xml = target.parent / f".{target.stem}.{uuid.uuid4().hex[:12]}.partial.xml"
    partial_bin = partial_xml.with_suffix(".bin")
    try:  # the finally removes the temp pair on every way out but success (which renamed it)
        try:
            with _quiet_nncf():
                compressed = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_SYM)
            int8_weights = _int8_weights(compressed)
            target.parent.mkdir(parents=True, exist_ok=True)
            ov.save_model(compressed, str(partial_xml), compress_to_fp16=False)
            check = OpenVinoSession(partial_xml)  # the saved files, loaded as they will be used
            vectors = np.concatenate([check.run(f) for f in validation])
            del check
        except Exception as exc:
            raise ModelLoadError(f"int8 quantization of {onnx_path} with NNCF failed ({first_line(exc, 240)}); "
                                 "drop --quantize int8 or use --runtime onnx.") from exc
        fix = "drop --quantize int8 or use --runtime onnx."
        figures: dict[str, float] = check_fidelity(reference, vectors, bar or bar_for("int8"),
                                                   what=f"OpenVINO int8 of {onnx_path}", where=f"{rows} validation texts",
                                                   fix=fix)
        if int8_weights == 0:
            raise ModelLoadError(f"OpenVINO int8 of {onnx_path} is left with no int8 weight by NNCF; {fix}")
        try:
            target.unlink(missing_ok=True)  # an old pair: its .xml goes first, so no reader pairs old and new
            os.replace(partial_bin, target.with_suffix(".bin"))
            os.replace(partial_xml, target)  # the .xml last: a reader sees a whole pair or none
        except OSError as exc:
            raise ModelLoadError(f"could not save the int8 model to {target} ({exc}); "
                                 "drop --quantize int8 or use --runtime onnx.") from exc
    finally:
        _remove(partial_xml, partial_bin)
    figures["seconds"] = time.perf_counter() - started
    log.info("OpenVINO int8 of %s: cosine to fp32 mean %.4f, min %.4f on %d texts, %d int8 weights, %.1f s",
             onnx_path.name, figures["mean"], figures["min"], rows, int8_weights, figures["seconds"])
    return figures


def _remove(*paths: Path) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
