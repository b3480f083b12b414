"""The other sentence-transformers model classes in this process: SparseEncoder (SPLADE) and
MultiVectorEncoder (late interaction), as Backends whose `embed` returns that kind's values.

Its own module because these run as their classes run them (torch, fp32, the class's own
`encode_document` / `encode_query`), so what they make equals the model's reference by
construction; they share with the dense LocalBackend only the files (spec.ModelFiles) and the
tokenizer (tokenizer.Tokens: counts, truncation, --split windows), not its runtime selection,
exports or int8 (not offered for these kinds yet: refused up front).

The side: a model with query and document sides (a Router, inference-free SPLADE, ColBERT's
query expansion) is run on its document side, the one a batch of files is; `--prompt-name
query` runs the query side (what a user's queries get at serving time).
"""

from __future__ import annotations

import functools
import json
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np


from ..errors import BackendError, InputError, ModelLoadError, first_line
from ..resources import check_model_memory, resolve_device
from .hub import read_json
from .kinds import describe_kind
from .spec import ModelFiles, read_spec, prompt_config
from .tokenizer import Tokens
from .windows import Windows

log = logging.getLogger(__name__)

DOCUMENT_PROMPTS = ("document", "passage", "corpus")  # what encode_document takes, in sentence-transformers' order


def side_dir(root: Path, side: str) -> Path:
    """Where the text module of `side` keeps its tokenizer and config: the model's folder, or for a
    Router (inference-free SPLADE) the first module of that side's route (router_config.json)."""
    modules = read_json(root / "modules.json")
    router = next((m for m in modules if isinstance(m, dict) and str(m.get("type", "")).endswith("Router")), None) \
        if isinstance(modules, list) else None
    if router is None:
        return root
    config = read_json(root / str(router.get("path") or "") / "router_config.json")
    structure = config.get("structure") if isinstance(config, dict) else None
    default = (config.get("parameters") or {}).get("default_route") if isinstance(config, dict) else None
    route = (structure or {}).get(side) or (structure or {}).get(default or "") if isinstance(structure, dict) else None
    if not route or not isinstance(route, list):
        raise ModelLoadError(f"{root}: its Router has no {side!r} route in router_config.json; restore the model's files.")
    return root / str(router.get("path") or "") / str(route[0])


def is_static(root: Path, text_dir: Path) -> bool:
    """Whether a Router's side is a SparseStaticEmbedding (inference-free: a weight per token, no length)."""
    if text_dir == root:
        return False
    config = read_json(text_dir.parent / "router_config.json")
    types = config.get("types") if isinstance(config, dict) else None
    return isinstance(types, dict) and str(types.get(text_dir.name, "")).endswith("SparseStaticEmbedding")


@functools.lru_cache(maxsize=2)
def _load(cls_name: str, path: str, device: str, model_id: str, trust_remote_code: bool) -> Any:
    """One model per process, class and device (test suites and notebooks run many jobs)."""
    try:
        import sentence_transformers

        model = getattr(sentence_transformers, cls_name)(path, device=device, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ModelLoadError(f"cannot load {model_id} from {path} as a {cls_name} on {device} ({first_line(exc)}).") from exc
    model.eval()
    return model


class EncoderBackend:
    """What the sparse and multi-vector backends share: the files, the tokenizer, the side, the
    lazy load, the identity and the provenance. Subclasses say the class and how a batch is run."""

    name = "local"
    remote = False
    batch_texts: int | None = None
    token_source = "tokenizer"
    kind = "dense"
    st_class = "SentenceTransformer"
    sets_length = True  # the model reads max_length tokens (set on it per call), --max-length may change it

    def __init__(self, model: str, *, device: str = "auto", max_length: int | None = None, precision: str = "fp32",
                 runtime: str = "torch", quantize: str | None = None, trust_remote_code: bool = False,
                 prompt: str | None = None, prompt_name: str | None = None, side: str | None = None):
        other = [f"{name} {value}" for name, value, fine in (("runtime", runtime, ("torch", "auto")),
                                                             ("precision", precision, ("fp32", "auto")),
                                                             ("quantize", quantize, (None, "auto", "none")))
                 if value not in fine]
        if other:  # a faithful choice for dense models (often from the environment): this kind's own is fp32 torch
            log.warning("%s: a %s model runs on torch in fp32 in this version (its reference, never a lossy int8); "
                        "the %s apply to dense models.", ", ".join(other), self.kind,
                        "settings" if len(other) > 1 else "setting")
        self.model_id, self.device_asked, self.trust_remote_code = model, device, trust_remote_code
        self._side = side  # None: the document side, unless --prompt-name query
        self._asked = {"max_length": max_length, "prompt": prompt, "prompt_name": prompt_name}
        self._files: ModelFiles | None = None
        self._tokens: Tokens | None = None
        self._model: Any = None
        self._device: str | None = None
        self._fingerprint: str | None = None
        self._dim: int | None = None
        self._estimated: int | None = None
        self.timings: dict[str, float] = {"model_load": 0.0}

    # --- files (no model load) ---------------------------------------------------------------

    @property
    def files(self) -> ModelFiles:
        if self._files is None:
            # --prompt-name query / document names a side: its prompt where the model has one (else none)
            named_side = self._asked["prompt_name"] in ("query", "document")
            files = ModelFiles(self.model_id, max_length=self._asked["max_length"], prompt=self._asked["prompt"],
                               prompt_name=None if named_side else self._asked["prompt_name"])
            text_dir = self.text_dir = side_dir(files.dir, self.side)
            if self._asked["max_length"] is not None and is_static(files.dir, text_dir):
                raise InputError(f"--max-length: the {self.side} side of {self.model_id} is a static (inference-free) "
                                 "weighting of each token, which reads every token; drop --max-length.")
            if text_dir != files.dir:  # a Router: the side's own tokenizer and length (the prompts are the model's)
                own = read_spec(text_dir, self.model_id, max_length=self._asked["max_length"], prompt="", prompt_name=None)
                files.spec = replace(files.spec, lower=own.lower, max_length=own.max_length,
                                     native_max_length=own.native_max_length)
            if self._asked["prompt"] is None and (self._asked["prompt_name"] is None or named_side):
                # no prompt asked for, or a side: the side's own, as encode_document / encode_query choose it
                prompts = prompt_config(files.dir / "config_sentence_transformers.json").get("prompts") or {}
                name = next((p for p in (("query",) if self.side == "query" else DOCUMENT_PROMPTS) if p in prompts), None)
                if name is not None:
                    named = read_spec(files.dir, self.model_id, max_length=None, prompt=None, prompt_name=name)
                    files.spec = replace(files.spec, prompt=named.prompt, prompt_name=named.prompt_name)
            files.spec = self.adjust(files.spec, text_dir)
            self._tokens = Tokens(text_dir, self.model_id, files.spec, weights_key=files.weights_key,
                                  trust_remote_code=self.trust_remote_code)
            self._files = files
        return self._files

    def adjust(self, spec: Any, text_dir: Path) -> Any:
        """The spec as this kind reads texts (a subclass may change the length it reads)."""
        return spec

    @property
    def tokens(self) -> Tokens:
        _ = self.files
        assert self._tokens is not None
        return self._tokens

    @property
    def side(self) -> str:
        """query or document: which side of the model runs (see the module docstring)."""
        return self._side or ("query" if self._asked["prompt_name"] == "query" else "document")

    @property
    def prompt(self) -> str | None:
        return self.tokens.prompt

    @property
    def prompt_name(self) -> str | None:
        return self.tokens.prompt_name

    @property
    def max_length(self) -> int:
        return self.tokens.max_length

    @property
    def load_seconds(self) -> float:
        return self.timings["model_load"]

    def setup_seconds(self) -> dict[str, float]:
        return dict(self.timings)

    def watch(self, note: Any) -> None:
        """Nothing slow happens once per machine here (no runtime measurement, no export)."""

    def prepare(self, *, measure: bool = True, **_: Any) -> None:
        return None

    def token_counts(self, texts: Sequence[str]) -> list[int]:
        return self.tokens.counts(texts)

    def split(self, texts: Sequence[str], size: int, overlap: int) -> list[Windows]:
        return self.tokens.split(texts, size, overlap)

    def fingerprint(self) -> str:
        """The identity of what this backend makes: the files, the kind, the side, the length
        read and the prompt. Loads nothing."""
        if self._fingerprint is None:
            h = self.files.digest()
            h.update(f"kind={self.kind};side={self.side};max_length={self.max_length};"
                     f"prompt={json.dumps(self.prompt)}".encode())
            self._fingerprint = f"local-{self.kind}:{h.hexdigest()}"
        return self._fingerprint

    def known_dimension(self) -> int | None:
        """The width of what this model makes, from its files (no load): what cached values are
        held to before the model has made one (a planted or another model's entry is computed again)."""
        if self._dim is None:
            found = self.files_dimension()
            self._dim = int(found) if isinstance(found, int) and not isinstance(found, bool) and found > 0 else None
        return self._dim

    def files_dimension(self) -> Any:
        return None

    def dimension(self) -> int:
        if self._dim is None:
            self._dim = int(self.load().get_embedding_dimension())
        return self._dim

    # --- the model ---------------------------------------------------------------------------

    def load(self) -> Any:
        if self._model is None:
            files = self.files
            self._device = resolve_device(self.device_asked)
            self._estimated = check_model_memory(self.model_id, files.dir)
            started = time.perf_counter()
            self._model = _load(self.st_class, str(files.dir), self._device, self.model_id, self.trust_remote_code)
            self.timings["model_load"] += time.perf_counter() - started
            if self.sets_length:
                self._model.max_seq_length = self.max_length
        return self._model

    def run(self, texts: Sequence[str]) -> Any:
        """The class's own encode on `texts`, on this backend's side, prompt and length."""
        model = self.load()
        if self.sets_length:
            model.max_seq_length = self.max_length  # set per call: the loaded model may be shared
        encode = model.encode_query if self.side == "query" else model.encode_document
        return encode(list(texts), prompt=self.prompt or "", batch_size=max(1, len(texts)), show_progress_bar=False,
                      **self.encode_options())

    def encode_options(self) -> dict[str, Any]:
        return {}

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"backend": self.name, "model_id": self.model_id, **describe_kind(self.kind)}
        if self._files is not None:
            info.update(self._files.source)
            info.update(model_path=str(self._files.dir), fingerprint=self.fingerprint(), side=self.side,
                        max_length=self.max_length, prompt=self.prompt, prompt_name=self.prompt_name, dim=self._dim,
                        runtime="torch", precision="fp32", trust_remote_code=self.trust_remote_code,
                        tokenizer=self._tokens.loader if self._tokens is not None else None)
        info["device"] = self._device or "not loaded (every value came from the cache)"
        info["model_loaded"] = self._model is not None
        info["tokenizer_loaded"] = self._tokens is not None and self._tokens.loader is not None
        info["estimated_memory_mb"] = round(self._estimated / 2**20, 1) if self._estimated else None
        info["load_seconds"] = round(self.load_seconds, 3)
        info["setup_seconds"] = {k: round(v, 3) for k, v in self.timings.items()}
        return info


class SparseBackend(EncoderBackend):
    """A SparseEncoder (SPLADE, inference-free SPLADE): `embed` gives each text's SparseVector,
    exactly as SparseEncoder.encode_document (or encode_query) gives it, every active dimension
    (--sparse-top-k is applied when the output is written, so the cache keeps them all)."""

    kind = "sparse"
    st_class = "SparseEncoder"

    def files_dimension(self) -> Any:
        """The vocabulary's size: the side's config (vocab_size), else its tokenizer's vocabulary."""
        _ = self.files
        config = read_json(self.text_dir / "config.json")
        if isinstance(config, dict) and isinstance(config.get("vocab_size"), int):
            return config["vocab_size"]
        tokenizer = read_json(self.text_dir / "tokenizer.json")
        vocab = ((tokenizer.get("model") or {}).get("vocab") if isinstance(tokenizer, dict) else None)
        return len(vocab) if isinstance(vocab, (dict, list)) and vocab else None

    def encode_options(self) -> dict[str, Any]:
        return {"convert_to_tensor": True, "convert_to_sparse_tensor": True, "save_to_cpu": True}

    def vocabulary(self) -> list[str]:
        """Index -> the tokenizer's string for it (--sparse-vocab)."""
        tokenizer = self.tokens.load().hf
        vocab = tokenizer.get_vocab()
        words = [""] * (max(vocab.values()) + 1 if vocab else 0)
        for word, index in vocab.items():
            words[index] = word
        return words

    def embed(self, texts: Sequence[str]) -> list[Any]:
        from ..sparse_vectors import from_coo

        try:
            tensor = self.run(texts).coalesce()
        except Exception as exc:
            raise BackendError(f"{self.model_id} failed on a batch of {len(texts)} texts ({first_line(exc)}).") from exc
        self._dim = self._dim or int(tensor.shape[-1])
        return from_coo(tensor.indices().numpy(), tensor.values().numpy(), len(texts))



class MultiVectorBackend(EncoderBackend):
    """A MultiVectorEncoder (ColBERT, late interaction): `embed` gives each text's float32 matrix
    of token vectors (tokens x dim), exactly as MultiVectorEncoder.encode_document (or
    encode_query) gives it: its markers, its document skiplist, its query expansion."""

    kind = "multivector"
    st_class = "MultiVectorEncoder"
    sets_length = False  # the model's own document_length / query_length decide

    def files_dimension(self) -> Any:
        """The token vectors' width: the last Dense module's out_features, else the encoder's hidden size."""
        root = self.files.dir
        modules = read_json(root / "modules.json")
        dense = [m for m in modules if isinstance(m, dict) and str(m.get("type", "")).endswith(".Dense")] \
            if isinstance(modules, list) else []
        if dense:
            return read_json(root / str(dense[-1].get("path") or "") / "config.json").get("out_features")
        config = read_json(root / "config.json")
        return config.get("hidden_size") if isinstance(config, dict) else None

    def __init__(self, model: str, **kwargs: Any):
        if kwargs.get("max_length") is not None:
            raise InputError(f"--max-length: {model} is a multi-vector model, which reads the lengths its files give "
                             "(document_length, query_length in sentence_bert_config.json); drop --max-length.")
        super().__init__(model, **kwargs)

    def adjust(self, spec: Any, text_dir: Path) -> Any:
        """Documents are read up to document_length tokens, queries padded or cut to query_length."""
        config = read_json(text_dir / "sentence_bert_config.json")
        length = config.get(f"{self.side}_length") if isinstance(config, dict) else None
        if isinstance(length, int) and not isinstance(length, bool) and 1 < length <= spec.max_length:
            return replace(spec, max_length=length)
        return spec

    def encode_options(self) -> dict[str, Any]:
        return {"convert_to_numpy": True}

    def embed(self, texts: Sequence[str]) -> list[np.ndarray]:
        try:
            matrices = self.run(texts)
        except Exception as exc:
            raise BackendError(f"{self.model_id} failed on a batch of {len(texts)} texts ({first_line(exc)}).") from exc
        out = [np.asarray(m, dtype=np.float32).reshape(len(m), -1) for m in matrices]
        if out and self._dim is None:
            self._dim = int(out[0].shape[1])
        return out
