"""Building and proving a model's exports, and opening the runners that read them (ONNX Runtime,
OpenVINO).

An export is made once per model (exports.py keeps the folder and the proofs): the fp32 graph
from the torch model, int8 where asked, each variant proved against torch fp32 on the
calibration sample at its bar (fidelity.py) before anything runs it, and rebuilt once when its
files do not prove or load. Its own module because this is the one part of a local backend that
needs torch only while it builds, and the one that writes to the shared exports cache.

Exports is one configuration's export of one model: LocalBackend holds one for the export
configuration it runs, built with what it needs (the configuration, the model's Tokens, its
weights key, and how to get and let go of the torch model it is made from).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import InputError, ModelLoadError, first_line
from ..resources import MemoryGuardError
from .configs import Note, RuntimeConfig, int8_recipe
from .exports import ExportBundle, package_version
from .fidelity import CALIBRATION_TEXTS, bar_for, check_fidelity
from .runners import ExportRunner, Session, open_session
from .tokenizer import ModelTokenizer, Tokens, load_fast, same_ids, tokenizer_libraries
from .torch_runner import TorchModel

log = logging.getLogger(__name__)


class ExportFailed(ModelLoadError):
    """An export's files would not prove or load, even after a rebuild: the configuration, not the job, failed."""


class Exports:
    """The proved export of one export configuration (onnx/openvino, fp32/bf16/int8) of one model:
    made and proved first if need be, and the runners that read it.

    `torch_model` gives the torch model an export is made from (loaded on demand), `let_go` drops
    it once the export is made (the export runs without it); `timings["export"]` is credited with
    the seconds spent making exports, and `note` told when one is made."""

    def __init__(self, config: RuntimeConfig, *, precision: str, tokens: Tokens, weights_key: str, normalize: bool,
                 torch_model: Callable[[], TorchModel], let_go: Callable[[], None], timings: dict[str, float],
                 note: Note | None = None):
        self.config, self.precision, self.tokens, self.normalize = config, precision, tokens, normalize
        self.weights_key, self.model_id = weights_key, tokens.model_id
        self._torch_model, self._let_go, self._timings, self._note = torch_model, let_go, timings, note
        self.recipe = int8_recipe(config.runtime) if config.quantize == "int8" else "none"
        self.path: Path | None = None  # the export file the runner reads, once proved
        self.fidelity: dict[str, float] | None = None  # its figures against torch fp32, once proved

    @property
    def bundle(self) -> ExportBundle:
        """The model's export folder (where HFBATCH_ONNX_DIR says now)."""
        return ExportBundle(self.weights_key)

    @property
    def variant(self) -> str:
        """The export variant this configuration runs: onnx-fp32, openvino-bf16, onnx-<int8 recipe>..."""
        return f"{self.config.runtime}-{self.recipe if self.config.quantize == 'int8' else self.precision}"

    def _runtime_version(self) -> str | None:
        return package_version("openvino" if self.config.runtime == "openvino" else "onnxruntime")

    def runner(self) -> ExportRunner:
        """The cached, proved export run by this runtime: onnxruntime/openvino and the tokenizers
        library only (no torch) once it exists; made and proved against torch fp32 otherwise."""
        made = self._ready(runner=True)
        assert made is not None
        return made

    def ensure(self) -> None:
        """Make and prove this configuration's export now if it is not (selection lets the torch
        model go before the export's runtime loads)."""
        self._ready(runner=False)

    def reference(self, texts: Sequence[str]) -> np.ndarray:
        """fp32 vectors of `texts` on the proved model.onnx (ONNX Runtime where installed, else the
        same runtime), made first if need be: what int8 and bf16 are checked against on the job's
        texts (it agrees with torch fp32 at the faithful bar), without loading torch. The session
        is not kept."""
        self.ensure()
        path = self.bundle.path("model.onnx")
        # ONNX Runtime where installed: no per-shape compile, the cheapest first call
        runtime = "onnx" if importlib.util.find_spec("onnxruntime") is not None else self.config.runtime
        return self._wrap(open_session(path, runtime, "fp32")).run(texts)

    def _wrap(self, session: Session) -> ExportRunner:
        return ExportRunner(session, self.tokens.load(), max_length=self.tokens.max_length,
                            prompt=self.tokens.prompt or "", normalize=self.normalize)

    def _ready(self, *, runner: bool) -> ExportRunner | None:
        """This configuration's proved export, made first if need be, and with runner=True its
        runner. Files that do not prove, do not load or are not files are rebuilt once; after
        that, ExportFailed (a ModelLoadError)."""
        for attempt in (1, 2):
            try:
                entry = self._proved()
                self.path = self.bundle.path(entry["file"])
                made = self._wrap(open_session(self.path, self.config.runtime, self.precision)) if runner else None
            except (InputError, MemoryGuardError):
                raise  # not the files' fault: a rebuild would not help
            except Exception as exc:  # damaged files, a proof that fails, a runtime that cannot read them
                if attempt == 2:
                    raise ExportFailed(f"the {self.variant} export of {self.model_id} does not load after a rebuild "
                                       f"({first_line(exc)}); use --runtime torch.") from exc
                log.warning("the %s export of %s does not load (%s); rebuilding it", self.variant, self.model_id,
                            first_line(exc))
                entry = (self.bundle.meta().get("variants") or {}).get(self.variant) or {}
                self.bundle.remove([*(entry.get("files") or []), "model.onnx"])
                try:
                    self.bundle.forget(self.variant)
                except OSError:
                    pass
                continue
            self.fidelity = dict(entry["fidelity"])
            return made
        raise AssertionError("unreachable")

    def _proved(self) -> dict[str, Any]:
        """This variant's proved entry, made and proved first if need be (a variant whose files
        changed since they were proved is made again)."""
        entry = self.bundle.proved(self.variant, self._runtime_version())
        if entry is None:
            started = time.perf_counter()
            if self._note:
                self._note(f"exporting {self.model_id} for {self.config.runtime} (once per model)")
            try:
                self._build()
            finally:
                self._timings["export"] += time.perf_counter() - started
                self._let_go()  # the torch model made the export; the export runs without it
            entry = self.bundle.proved(self.variant, self._runtime_version())
            if entry is None:
                raise ModelLoadError(f"the {self.variant} export of {self.model_id} changed while it was proved; "
                                     "run the job again.")
        return entry

    def _build(self) -> None:
        """Make this variant and prove it against torch fp32 on the calibration sample, recording
        the digests of the files it loads. The torch model is loaded only when something needs it:
        the fp32 graph exported (again, when its bytes are not the ones exported), an int8 model
        made, or no torch reference kept for these settings yet; an fp32/bf16 variant of an intact
        export is proved without it."""
        from .onnx import export_fp32, export_int8, graph_facts

        bundle, tokens, int8 = self.bundle, self.tokens, self.config.quantize == "int8"
        meta = bundle.meta()
        fp32_path = bundle.path("model.onnx")
        intact = meta.get("export_digest") is not None and bundle.digest("model.onnx") == meta.get("export_digest")
        key = hashlib.blake2b(f"{tokens.max_length}|{tokens.prompt or ''}".encode(), digest_size=8).hexdigest()
        kept = (meta.get("references") or {}).get(key)
        reference = np.asarray(kept, dtype=np.float32) if isinstance(kept, list) else None
        if reference is not None and reference.shape[0] != len(CALIBRATION_TEXTS):
            reference = None
        model = None
        if not intact or reference is None or int8 or not meta.get("input_names"):
            torch = self._torch_model()
            model = torch.model
            facts = {**graph_facts(model, self.model_id), "normalize": False}  # normalised after, as the job asks
            if not intact:
                export_fp32(model, fp32_path, facts, self.model_id)
                bundle.record(export_digest=bundle.digest("model.onnx"))
            slow = ModelTokenizer(hf=model.tokenizer, lower=tokens.spec.lower)
            fast = load_fast(tokens.model_dir, lower=tokens.spec.lower)
            reference = torch.encode(CALIBRATION_TEXTS, "fp32")
            bundle.record(input_names=facts["input_names"], pooling=facts["pooling"], normalize=False,
                          model_id=self.model_id, tokenizer_fast=bool(fast is not None and same_ids(fast, slow)),
                          tokenizer_libraries=tokenizer_libraries(),
                          references={**(meta.get("references") or {}), key: reference.tolist()})
            tokens.adopt(slow)
        version, variant = self._runtime_version(), self.variant
        what = f"the {variant} export of {self.model_id}"
        if not int8:
            got = self._wrap(open_session(fp32_path, self.config.runtime, self.precision)).run(CALIBRATION_TEXTS)
            result = check_fidelity(reference, got, bar_for(None), what=what, where="the calibration sample",
                                    fix="use --runtime torch.")
            bundle.prove(variant, ["model.onnx"], fidelity=result, runtime_version=version)
            return
        assert model is not None
        if self.config.runtime == "openvino":
            from .openvino_export import quantize_openvino

            name, result = quantize_openvino(tokens.load(), bundle, fp32_path, reference, max_length=tokens.max_length,
                                             prompt=tokens.prompt or "")
            files = [name, str(Path(name).with_suffix(".bin")), "model.onnx"]
        else:
            name = f"model.{self.recipe}.onnx"
            if bundle.path(name).is_file():
                bundle.path(name).unlink()  # not proved as it is: made again
            # calibrated at the model's own length, whatever --max-length the job that makes it has
            export_int8(model, bundle.path(name), {**graph_facts(model, self.model_id), "normalize": False},
                        self.model_id, tokens.spec.native_max_length)
            got = self._wrap(open_session(bundle.path(name), "onnx")).run(CALIBRATION_TEXTS)
            result = check_fidelity(reference, got, bar_for("int8"), what=f"int8 {self.model_id}",
                                    where="the calibration sample",
                                    fix="drop --quantize int8 (bf16 may be the faster faithful choice: --precision auto).")
            files = [name, "model.onnx"]
        bundle.prove(variant, files, fidelity=result, runtime_version=version)
