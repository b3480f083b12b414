"""Building and proving a model's exports, and loading their runners (ONNX Runtime, OpenVINO).

An export is made once per model (exports.py keeps the folder and the proofs): the fp32 graph
from the torch model, int8 where asked, each variant proved against torch fp32 on the
calibration sample at its bar (fidelity.py) before anything runs it, and rebuilt once when its
files do not prove or load. Its own module because this is the one part of a local backend that
needs torch only while it builds, and the one that writes to the shared exports cache.

ExportMethods is the part of LocalBackend that does this (it reads the backend's model, tokenizer
and settings); the session caches live here, beside it.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import InputError, ModelLoadError, first_line
from ..resources import MemoryGuardError
from ..vectors import l2_normalize
from .exports import ExportBundle, package_version
from .fidelity import CALIBRATION_TEXTS, FAITHFUL, check_fidelity
from .tokenizer import ModelTokenizer, load_fast, same_ids, tokenizer_libraries

log = logging.getLogger(__name__)


class ExportFailed(ModelLoadError):
    """An export's files would not prove or load, even after a rebuild: the configuration, not the job, failed."""


class ExportMethods:
    """LocalBackend's exported runtimes: the variant it runs, its proved export (made first if
    need be) and the runners that read it."""

    def _variant(self) -> str:
        """The export variant this configuration runs: onnx-fp32, openvino-bf16, onnx-<int8 recipe>..."""
        if self.quantize:
            return f"{self.runtime}-{self.quantize_recipe()}"
        return f"{self.runtime}-{self.precision}"

    def _runtime_version(self) -> str | None:
        return package_version("openvino" if self.runtime == "openvino" else "onnxruntime")

    def _start_export(self) -> Any:
        """The cached, proved export run by this runtime: onnxruntime/openvino and the tokenizers
        library only (no torch) once it exists; made and proved against torch fp32 otherwise."""
        self._device = self.preflight()
        return self._export_ready(runner=True)

    def _export_ready(self, *, runner: bool) -> Any:
        """This configuration's proved export, made first if need be, and with runner=True its
        runner. Files that do not prove, do not load or are not files are rebuilt once; after
        that, ExportFailed (a ModelLoadError)."""
        bundle = ExportBundle(self.weights_key())
        for attempt in (1, 2):
            try:
                bundle, entry = self._proved()
                self.engine_path = bundle.path(entry["file"])
                made = self._runner(self.engine_path) if runner else None
            except (InputError, MemoryGuardError):
                raise  # not the files' fault: a rebuild would not help
            except Exception as exc:  # damaged files, a proof that fails, a runtime that cannot read them
                if attempt == 2:
                    raise ExportFailed(f"the {self._variant()} export of {self.model_id} does not load after a rebuild "
                                        f"({first_line(exc)}); use --runtime torch.") from exc
                log.warning("the %s export of %s does not load (%s); rebuilding it", self._variant(), self.model_id,
                            first_line(exc))
                entry = (bundle.meta().get("variants") or {}).get(self._variant()) or {}
                bundle.remove([*(entry.get("files") or []), "model.onnx"])
                try:
                    bundle.forget(self._variant())
                except OSError:
                    pass
                continue
            self._normalize_in_encode = self.normalize  # the export never normalises (one export for both)
            self.export_fidelity = dict(entry["fidelity"])
            return made
        raise AssertionError("unreachable")

    def ensure_export(self) -> None:
        """Make and prove this configuration's export now if it is not (selection lets the torch
        model go before the export's runtime loads). Nothing for torch."""
        if self.runtime != "torch":
            self._export_ready(runner=False)

    def _proved(self) -> tuple[ExportBundle, dict[str, Any]]:
        """The export folder and this variant's proved entry, made and proved first if need be
        (a variant whose files changed since they were proved is made again)."""
        bundle = ExportBundle(self.weights_key())
        entry = bundle.proved(self._variant(), self._runtime_version())
        if entry is None:
            started = time.perf_counter()
            if self._note:
                self._note(f"exporting {self.model_id} for {self.runtime} (once per model)")
            try:
                self._build(bundle)
            finally:
                self.timings["export"] += time.perf_counter() - started
                self._model = None  # the torch model made the export; the export runs without it
            entry = bundle.proved(self._variant(), self._runtime_version())
            if entry is None:
                raise ModelLoadError(f"the {self._variant()} export of {self.model_id} changed while it was proved; "
                                     "run the job again.")
        return bundle, entry

    def _runner(self, path: Path, precision: str | None = None) -> Any:
        if self.runtime == "openvino":
            return openvino_session(str(path), {"bf16": "bf16"}.get(precision or self.precision, "f32"))
        from .onnx_runner import OnnxRunner

        return OnnxRunner(path)

    def _build(self, bundle: ExportBundle) -> None:
        """Make this variant and prove it against torch fp32 on the calibration sample, recording
        the digests of the files it loads. The torch model is loaded only when something needs it:
        the fp32 graph exported (again, when its bytes are not the ones exported), an int8 model
        made, or no torch reference kept for these settings yet; an fp32/bf16 variant of an intact
        export is proved without it."""
        from .onnx import check_int8, export_fp32, export_int8, graph_facts

        meta = bundle.meta()
        fp32_path = bundle.path("model.onnx")
        intact = meta.get("export_digest") is not None and bundle.digest("model.onnx") == meta.get("export_digest")
        key = hashlib.blake2b(f"{self.max_length}|{self.prompt or ''}".encode(), digest_size=8).hexdigest()
        kept = (meta.get("references") or {}).get(key)
        reference = np.asarray(kept, dtype=np.float32) if isinstance(kept, list) else None
        if reference is not None and reference.shape[0] != len(CALIBRATION_TEXTS):
            reference = None
        model = None
        if not intact or reference is None or self.quantize or not meta.get("input_names"):
            torch = self._load_model()
            model = torch.model
            facts = {**graph_facts(model, self.model_id), "normalize": False}  # normalised after, as the job asks
            if not intact:
                export_fp32(model, fp32_path, facts, self.model_id)
                bundle.record(export_digest=bundle.digest("model.onnx"))
            slow = ModelTokenizer(hf=model.tokenizer, lower=self.tokens.spec.lower)
            fast = load_fast(self.model_dir, lower=self.tokens.spec.lower)
            reference = torch.encode(CALIBRATION_TEXTS, "fp32")
            bundle.record(input_names=facts["input_names"], pooling=facts["pooling"], normalize=False,
                          model_id=self.model_id, tokenizer_fast=bool(fast is not None and same_ids(fast, slow)),
                          tokenizer_libraries=tokenizer_libraries(),
                          references={**(meta.get("references") or {}), key: reference.tolist()})
            self.tokens.adopt(slow)
        version, variant = self._runtime_version(), self._variant()
        what = f"the {variant} export of {self.model_id}"
        if not self.quantize:
            got = self._run(self._runner(fp32_path), CALIBRATION_TEXTS)
            result = check_fidelity(reference, got, FAITHFUL, what=what, where="the calibration sample",
                                    fix="use --runtime torch.")
            bundle.prove(variant, ["model.onnx"], fidelity=result, runtime_version=version)
            return
        assert model is not None
        if self.runtime == "openvino":
            from .openvino_export import quantize_openvino

            name, result = quantize_openvino(self.tokens.load(), bundle, fp32_path, reference, max_length=self.max_length,
                                             prompt=self.prompt or "")
            files = [name, str(Path(name).with_suffix(".bin")), "model.onnx"]
        else:
            name = f"model.{self.quantize_recipe()}.onnx"
            if bundle.path(name).is_file():
                bundle.path(name).unlink()  # not proved as it is: made again
            # calibrated at the model's own length, whatever --max-length the job that makes it has
            export_int8(model, bundle.path(name), {**graph_facts(model, self.model_id), "normalize": False},
                        self.model_id, self.tokens.spec.native_max_length)
            result = check_int8(reference, self._run(self._runner(bundle.path(name)), CALIBRATION_TEXTS), self.model_id)
            files = [name, "model.onnx"]
        bundle.prove(variant, files, fidelity=result, runtime_version=version)

    def _run(self, runner: Any, texts: Sequence[str]) -> np.ndarray:
        feeds = self.tokens.load().feeds(texts, self.max_length, runner.input_names, self.prompt or "")
        vectors = runner.run(feeds)
        return l2_normalize(vectors) if self._normalize_in_encode else vectors

    def _reference_runner(self) -> Any:
        """fp32 on the proved model.onnx (ONNX Runtime where installed, else the same runtime): what
        int8 and bf16 are checked against on the job's texts (it agrees with torch fp32 at the
        faithful bar), without loading torch."""
        if self._reference is None:
            path = ExportBundle(self.weights_key()).path("model.onnx")
            if importlib.util.find_spec("onnxruntime") is not None:  # no per-shape compile: the cheapest first call
                from .onnx_runner import OnnxRunner

                self._reference = OnnxRunner(path)
            else:
                self._reference = self._runner(path, "fp32")
        return self._reference


@functools.lru_cache(maxsize=4)
def openvino_session(path: str, precision: str = "f32") -> Any:
    """No compiled-blob cache (OpenVINO's CACHE_DIR): it would serve a blob nothing proved, and
    compiling MiniLM takes ~0.3 s."""
    from .openvino import OpenVinoSession

    return OpenVinoSession(Path(path), precision=precision)
