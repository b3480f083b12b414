"""LocalBackend: the model in this process, on torch (sentence-transformers) or as a cached export
run by ONNX Runtime or OpenVINO; `auto` takes this machine's one measured faithful configuration
for the model (selection.py), chosen when the first vector is computed, never for the job's size.

It composes what it owns by module: hub.py (where the model's files are, their content hash),
spec.py (what the files say: prompts, max length, dimension), tokenizer.py (Tokens: counts and
windows), configs.py (the request, the configuration held, the identity), selection.py (the
measured choice), loader.py (what runs the configuration: torch_runner.py's model, or builds.py's
proved export), runners.py (one `run(texts)` whatever the runtime) and job_check.py (the check on
the job's own texts); what it keeps is the choosing, passing over a configuration that fails, and
the provenance of it all.
Everything is lazy: the tokenizer loads on the first token count, the model on the first embed;
a proved export (exports.py) loads without importing torch or transformers.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import BackendError, InputError, ModelLoadError, first_line
from ..resources import MemoryGuardError
from .configs import EXPORT_RUNTIMES, Configuration, Note, Request, RuntimeChoice, RuntimeConfig
from .hub import bundled_model_dir as _bundled_model_dir  # noqa: F401  (re-exported for benchmarks/)
from .kinds import model_kind
from .job_check import check_until_faithful, job_sample
from .loader import Loader
from .runners import Runner, release_sessions
from .spec import ModelFiles
from .tokenizer import Tokens
from .torch_runner import load_sentence_transformer
from .windows import Windows

log = logging.getLogger(__name__)


class LocalBackend:
    """A sentence-transformers model on this machine: torch (CPU, CUDA, MPS), or its cached export
    run by ONNX Runtime or OpenVINO on the CPU. `auto` runtime/precision take the configuration
    measured fastest among the faithful ones here (selection.py), when the first vector is
    computed: a job that computes nothing loads nothing and measures nothing."""

    name = "local"
    kind = "dense"
    remote = False
    batch_texts: int | None = None  # the job's --batch-size / --max-batch-tokens decide
    token_source = "tokenizer"  # n_tokens and truncation by the model's own tokenizer

    def __init__(self, model: str, *, device: str = "auto", normalize: bool = True, max_length: int | None = None,
                 precision: str = "fp32", runtime: str = "torch", quantize: str | None = None,
                 trust_remote_code: bool = False, prompt: str | None = None, prompt_name: str | None = None):
        self.configuration = Configuration(Request.check(device, precision, runtime, quantize))
        self.request = self.configuration.request
        self.trust_remote_code = trust_remote_code  # code shipped with a model runs only when asked for
        self.model_id, self.normalize = model, normalize
        self._asked = {"max_length": max_length, "prompt": prompt, "prompt_name": prompt_name}
        self._note: Note | None = None
        self._loader: Loader | None = None  # what runs the chosen configuration, once the files are found
        self._files: ModelFiles | None = None
        self._tokens: Tokens | None = None  # the tokenizer, with the model's prompt and max length
        self._fingerprint: str | None = None
        self._dim: int | None = None
        # seconds of the one-time work, booked to their own stages by the job (metrics.stage_seconds)
        self.timings: dict[str, float] = {"measure": 0.0, "export": 0.0, "check": 0.0, "model_load": 0.0}
        self.job_fidelity: dict[str, Any] | None = None
        self.job_reference: tuple[list[str], np.ndarray] | None = None  # torch fp32 of the first texts, if measured now

    @property
    def load_seconds(self) -> float:
        return self.timings["model_load"]

    def setup_seconds(self) -> dict[str, float]:
        return dict(self.timings)

    def watch(self, note: Note) -> None:
        """Tell `note` what one-time work (measuring the runtimes, exporting) is going on."""
        self._note = note

    # --- resolution (cheap: files only) -------------------------------------------------------

    @property
    def files(self) -> ModelFiles:
        """The model's files, found and read (spec.ModelFiles) on first use: no model load."""
        if self._files is None:
            files = ModelFiles(self.model_id, **self._asked)
            found = model_kind(files.dir)
            if found.declared and found.kind != "dense":  # never a SPLADE's or a reranker's mean-pooled vectors
                raise InputError(f"{self.model_id} is a {found.described} ({found.evidence}), not a dense model; "
                                 f"run it with --kind {found.kind}" + (" (hfbatch score)." if found.kind == "cross-encoder"
                                                                       else " (or leave --kind out)."))
            if files.spec.prompt and not files.spec.include_prompt and self.request.runtime in EXPORT_RUNTIMES:
                raise InputError(f"{self.model_id} pools without its prompt's tokens, which --runtime "
                                 f"{self.request.runtime} cannot do; use --runtime torch with a prompt.")
            self._tokens = Tokens(files.dir, self.model_id, files.spec, weights_key=files.weights_key,
                                  trust_remote_code=self.trust_remote_code)
            self._files, self._dim = files, files.spec.dim
        return self._files

    @property
    def model_dir(self) -> Path:
        return self.files.dir

    @property
    def tokens(self) -> Tokens:
        _ = self.files
        assert self._tokens is not None
        return self._tokens

    @property
    def prompt(self) -> str | None:
        """The text put before every text: --prompt, --prompt-name's, or the model's default (None: none)."""
        return self.tokens.prompt

    @property
    def prompt_name(self) -> str | None:
        """The name the prompt came by (--prompt-name or the model's default; None before resolution)."""
        return self._tokens.prompt_name if self._tokens is not None else None

    @property
    def max_length(self) -> int:
        return self.tokens.max_length

    def token_counts(self, texts: Sequence[str]) -> list[int]:
        return self.tokens.counts(texts)

    def split(self, texts: Sequence[str], size: int, overlap: int) -> list[Windows]:
        """Windows of at most `size` tokens as the model reads them (see Tokens.split)."""
        return self.tokens.split(texts, size, overlap)

    def weights_key(self) -> str:
        """Names the model's export folder and its runtime record: its files and revision only,
        wherever it sits and whatever the job's options."""
        return self.files.weights_key()

    def fingerprint(self) -> str:
        """Identity of the vectors this backend makes; the cache namespace. Chooses and loads nothing."""
        if self._fingerprint is None:
            h = self.files.digest()
            h.update(f"normalize={self.normalize};max_length={self.max_length};vectors={self.identity()}".encode())
            if self.prompt:  # a prompt makes other vectors of the same text (none: the namespace of old)
                h.update(f";prompt={json.dumps(self.prompt)}".encode())
            self._fingerprint = f"local:{h.hexdigest()}"
        return self._fingerprint

    def identity(self) -> str:
        """faithful (any runtime), or int8 by the recipe of the runtime that runs it (configs.Request)."""
        return self.request.identity(lambda: self.prepare().config.runtime)

    def known_dimension(self) -> int | None:
        """The dimension if known without loading the model (config files, or a vector already
        made): what cached vectors are checked against before the first one is computed."""
        _ = self.files
        return self._dim

    def dimension(self) -> int:
        _ = self.files
        if self._dim is None:
            if self.runtime == "torch":
                self._dim = int(self.loader.torch(self.prepare().config, self.precision).model.get_sentence_embedding_dimension())
            else:
                self._dim = int(self.embed(["dimension probe"]).shape[1])
        return self._dim

    # --- which runtime and precision (chosen once, when the first vector is computed) -----------

    def candidates(self) -> list[RuntimeConfig]:
        from .selection import candidates

        excluded = bool(self.tokens.prompt) and not self.tokens.spec.include_prompt  # the exports pool over the prompt
        request = self.request
        return candidates("torch" if excluded else request.runtime, request.precision, request.quantize,
                          request.cpu_only())

    def prepare(self, *, measure: bool = True, job_texts: Sequence[str] = ()) -> RuntimeChoice:
        """The configuration this backend runs with: asked for, or (auto) this machine's choice for
        the model, measured first if this machine has none (measure=False: only what was measured
        before, as --dry-run plans). Never depends on the job's size or texts (`job_texts`, its
        first batch, only spare the check a second reference model when a measurement runs now)."""
        held = self.configuration
        if held.choice is None:
            from .selection import choose

            choice = held.take(choose(self, self.candidates(), measure=measure, note=self._note, exclude=held.failed,
                                      job_texts=job_texts if self.request.cpu_only() else ()))
            if choice.measured_seconds:
                self.timings["measure"] += choice.measured_seconds
                if choice.config.runtime != "torch":  # the reference model is not needed any more
                    load_sentence_transformer.cache_clear()
        assert held.choice is not None
        return held.choice

    def pass_over(self, reason: str) -> None:
        """Give up the chosen configuration for this process (it failed to load, or on this job's
        texts) and let the next faithful one run: the identity is the same, so is the cache."""
        self.configuration.pass_over(reason)
        self.job_fidelity = None
        if self._loader is not None:
            self._loader.drop()

    def variant(self, config: RuntimeConfig) -> "LocalBackend":
        """The same model and settings, forced to `config` (what selection measures)."""
        config = RuntimeConfig(*config)
        other = LocalBackend(self.model_id, device=self.request.device, normalize=self.normalize,
                             precision=config.precision, runtime=config.runtime, quantize=config.quantize,
                             trust_remote_code=self.trust_remote_code, **self._asked)
        other.configuration.take(RuntimeChoice(config, by="asked for"))
        return other

    @property
    def config(self) -> RuntimeConfig | None:
        """(runtime, precision, quantize) once chosen, else None."""
        return self.configuration.choice.config if self.configuration.choice is not None else None

    @property
    def runtime(self) -> str:
        return self.prepare().config.runtime

    @property
    def quantize(self) -> str | None:
        return "int8" if self.prepare().config.quantize == "int8" else None

    @property
    def precision(self) -> str:
        """fp32, bf16 or fp16 (int8 is `quantize`); torch's `auto` on a GPU: fp16, by device."""
        self.prepare()
        return self.configuration.precision()

    # --- model (expensive, lazy: loader.py) ----------------------------------------------------

    @property
    def loader(self) -> Loader:
        if self._loader is None:
            self._loader = Loader(self.files, self.tokens, self.request, normalize=self.normalize,
                                  trust_remote_code=self.trust_remote_code, timings=self.timings)
        return self._loader

    def preflight(self) -> str:
        """Every check that decides whether the model can load, short of loading it: its files
        found, the device present, the runtime installed, the memory guard passed (before, not
        after, an OOM). Reads file names and sizes only. Returns the device; raises ModelLoadError
        (MemoryGuardError) or InputError."""
        return self.loader.preflight(self.runtime)

    def estimated_model_bytes(self) -> int:
        from ..resources import estimate_model_bytes

        return int(estimate_model_bytes(self.model_dir, "float32"))

    def load(self) -> Runner:
        """Load what computes the vectors (the torch model or the export's runner), choosing the
        configuration first (auto: measuring once per machine). A chosen configuration that fails
        to load after one rebuild is refused in the record and the next one runs."""
        loader = self.loader
        while loader.engine is None:
            choice = self.prepare()
            started, exported = time.perf_counter(), self.timings["export"]
            try:
                loader.start(choice.config, self.precision, self._note)
            except MemoryGuardError:
                raise
            except ModelLoadError as exc:
                if choice.by == "asked for" or self.request.quantize == "int8":
                    raise  # forced; or int8, whose identity is the runtime that runs it: never two in one namespace
                from .records import refuse

                refuse(self, choice.config, first_line(exc))
                self.pass_over(f"failed to load ({first_line(exc)})")
                continue
            finally:
                self.timings["model_load"] += time.perf_counter() - started - (self.timings["export"] - exported)
            log.info("loaded %s (%s)", self.model_id, choice.label)
        return loader.engine

    def ensure_export(self) -> None:
        """Make and prove this configuration's export now if it is not (selection lets the torch
        model go before the export's runtime loads). Nothing for torch."""
        if self.runtime != "torch":
            self.loader.exports_of(self.prepare().config, self.precision, self._note).ensure()

    @property
    def export_fidelity(self) -> dict[str, float] | None:
        """The export's figures against torch fp32 on the calibration sample, once proved."""
        return self._loader.describe()["export_fidelity"] if self._loader is not None else None

    def release(self, *, torch_model: bool = False) -> None:
        """Let go of the loaded engine (selection measures one configuration at a time), and with
        torch_model=True of the process's torch models too; the memory goes back to the system."""
        if self._loader is not None:
            self._loader.release(torch_model=torch_model)
        else:
            release_sessions()

    def compute(self, texts: Sequence[str]) -> np.ndarray:
        """Vectors of `texts` by the chosen configuration, without the job-text check (what
        selection times)."""
        return self.load().run(texts)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        sample = job_sample(texts)
        self.prepare(job_texts=sample)
        checked = check_until_faithful(self, texts, sample)  # int8 and half precision only
        if checked is not None and len(checked) == len(texts):
            return checked  # the check computed this very batch: its vectors are the batch's
        self.load()
        try:
            vectors = self.compute(texts)
        except Exception as exc:
            raise BackendError(f"{self.model_id} failed on a batch of {len(texts)} texts ({exc}).") from exc
        if self._dim is None:
            self._dim = int(vectors.shape[1])
        return vectors

    def export_reference(self, texts: Sequence[str]) -> np.ndarray:
        """fp32 vectors of `texts` on the proved export (made first if need be), that runner let go
        before the configuration's own engine loads: never both models at once."""
        reference = self.loader.exports_of(self.prepare().config, self.precision, self._note).reference(texts)
        if self.loader.engine is None:  # nothing else holds a session yet: every cached one can go
            self.release()
        return reference

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"backend": self.name, "model_id": self.model_id}
        loaded = self._loader.describe() if self._loader is not None else {}
        if self._files is not None:
            ran = self.configuration.choice is not None and bool(loaded.get("model_loaded"))
            info.update(self._files.source)
            info.update(
                model_path=str(self._files.dir),
                fingerprint=self.fingerprint(),
                vectors=self.identity(),  # faithful (any runtime), or int8 by recipe
                requested=self.request.describe(),
                max_length=self.max_length,
                normalize=self.normalize,
                dim=self._dim,
                **self.configuration.describe(ran=ran),  # runtime, precision, quantize (None: computed nothing)
                precision_fidelity=loaded.get("precision_fidelity"),
                trust_remote_code=self.trust_remote_code,
                export_fidelity=loaded.get("export_fidelity"),  # the export against torch fp32, when made
                job_fidelity=self.job_fidelity,  # the same bar, measured on the job's own first texts
                bf16_emulated_factor=loaded.get("bf16_emulated_factor"),
                prompt=self.prompt,
                prompt_name=self.prompt_name,
                selection=self.configuration.choice.describe() if ran and self.configuration.choice else None,
                tokenizer=self._tokens.loader if self._tokens is not None else None,
            )
        info["device"] = loaded.get("device") or "not loaded (every vector came from the cache)"
        info["model_loaded"] = bool(loaded.get("model_loaded"))
        info["tokenizer_loaded"] = self._tokens is not None and self._tokens.loader is not None
        estimated = loaded.get("estimated_bytes")
        info["estimated_memory_mb"] = round(estimated / 2**20, 1) if estimated else None
        info["load_seconds"] = round(self.load_seconds, 3)
        info["setup_seconds"] = {k: round(v, 3) for k, v in self.timings.items()}
        return info
