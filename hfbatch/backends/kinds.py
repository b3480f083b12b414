"""What kind of model a directory holds, read from its own files without loading it: a dense
SentenceTransformer, a SparseEncoder (SPLADE, inference-free SPLADE), a MultiVectorEncoder
(late interaction, ColBERT) or a CrossEncoder (a pair scorer).

Its own module because the kind decides everything downstream (the backend class, the task,
the output column's type, the cache's value format) and must be settled before any of them is
made: a SPLADE directory run as a dense model silently gives mean-pooled vectors of a model the
user did not ask for (issue 26 found exactly that).

The files decide, as sentence-transformers itself decides (config_sentence_transformers.json's
`model_type`), then the module stack (modules.json: SpladePooling, SparseStaticEmbedding, a
Router over them), then a bare transformers checkpoint's architecture (a *ForSequenceClassification
head is a cross-encoder; anything else is read as dense, and --kind may say otherwise: a bare
masked-LM checkpoint is a SPLADE with --kind sparse, as SparseEncoder loads one).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError
from .hub import read_json

EMBED_KINDS = ("dense", "sparse", "multivector")  # what `hfbatch embed --kind` makes
KINDS = (*EMBED_KINDS, "cross-encoder")

# sentence-transformers' model_type -> kind
_MODEL_TYPES = {"SentenceTransformer": "dense", "SparseEncoder": "sparse", "MultiVectorEncoder": "multivector",
                "CrossEncoder": "cross-encoder"}
_SPARSE_MODULES = {"SpladePooling", "SparseStaticEmbedding", "MLMTransformer", "SparseAutoEncoder"}
_CLASS = {"dense": "SentenceTransformer (dense vectors)", "sparse": "SparseEncoder (sparse lexical vectors, SPLADE)",
          "multivector": "MultiVectorEncoder (one vector per token, late interaction)",
          "cross-encoder": "CrossEncoder (scores a query and a document together)"}


@dataclass(frozen=True)
class ModelKind:
    """A model's kind and how its files said so (`evidence`, for messages); `declared`: the files
    name it outright (a model_type, a sparse module, a classifier head), not the dense default."""

    kind: str
    evidence: str
    declared: bool
    architectures: tuple[str, ...] = ()  # a bare checkpoint's config.json architectures (what --kind may make of it)

    @property
    def described(self) -> str:
        return _CLASS[self.kind]


def model_kind(root: Path) -> ModelKind:
    """The kind of the model whose files are at `root` (see the module docstring)."""
    config = read_json(root / "config_sentence_transformers.json")
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if isinstance(model_type, str) and model_type in _MODEL_TYPES:
        return ModelKind(_MODEL_TYPES[model_type], f"config_sentence_transformers.json model_type {model_type}", True)
    modules = read_json(root / "modules.json")
    types = {str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules if isinstance(m, dict)} \
        if isinstance(modules, list) else set()
    sparse = sorted(types & _SPARSE_MODULES)
    if sparse:
        return ModelKind("sparse", f"modules.json has {', '.join(sparse)}", True)
    if types:  # a module stack with no sparse module: what SentenceTransformer makes of it
        return ModelKind("dense", f"modules.json of {', '.join(sorted(types))}", True)
    hf_config = read_json(root / "config.json")
    architectures = hf_config.get("architectures") if isinstance(hf_config, dict) else None
    heads = [a for a in architectures or [] if isinstance(a, str) and a.endswith("ForSequenceClassification")]
    if heads:
        return ModelKind("cross-encoder", f"config.json architecture {heads[0]}", True)
    return ModelKind("dense", "a transformers checkpoint without sentence-transformers files (mean pooling)", False,
                     tuple(a for a in architectures or [] if isinstance(a, str)))


def settle_kind(model_id: str, found: ModelKind, asked: str | None, *, command: str = "embed") -> str:
    """The kind a job runs `model_id` as: the files' own; --kind may name it again, or choose for
    a model whose files do not say (a bare checkpoint). A kind the command cannot make, or a --kind
    that contradicts the files, is a one-line InputError naming what the model is."""
    if asked is not None and asked not in EMBED_KINDS:
        raise InputError(f"--kind {asked!r} is not one of: {', '.join(EMBED_KINDS)}.")
    kind = found.kind if found.declared or asked is None else asked
    masked_lm = any(a.endswith("ForMaskedLM") for a in found.architectures)
    made_up = not found.declared and ((kind == "sparse" and not masked_lm) or kind == "multivector")
    if made_up:
        # sentence-transformers would add a randomly initialised head (an MLM head, a projection):
        # vectors of no trained model, different each load
        need = "a masked-LM head (config.json architectures *ForMaskedLM)" if kind == "sparse" else \
            "its multi-vector files (a MultiVectorEncoder saved by sentence-transformers, with its projection)"
        raise InputError(f"--kind {kind}: {model_id} is a bare checkpoint without {need}; sentence-transformers would "
                         "make one up at random. Give a model saved as that kind.")
    if asked is not None and asked != kind:
        raise InputError(f"--kind {asked}: {model_id} is a {found.described} ({found.evidence}); "
                         f"drop --kind, or give a {asked} model.")
    if command == "embed" and kind == "cross-encoder":
        raise InputError(f"{model_id} is a {found.described} ({found.evidence}): it makes scores of (query, document) "
                         "pairs, not embeddings; run it with `hfbatch score INPUT -o OUT --query-column Q "
                         "--text-column D`.")
    if command == "score" and kind != "cross-encoder":
        raise InputError(f"{model_id} is a {found.described} ({found.evidence}), not a cross-encoder; "
                         "`hfbatch score` needs a CrossEncoder model (e.g. a reranker); embed it with `hfbatch embed`.")
    return kind


def describe_kind(kind: str) -> dict[str, Any]:
    return {"kind": kind, "class": _CLASS[kind].split(" ", 1)[0]}
