"""What a model's files say about its vectors, read without loading it: its prompts
(config_sentence_transformers.json), the length it reads, lowercasing, whether its pooling
counts the prompt's tokens, and its dimension where the files tell it.

Its own module because these facts are read before (and often instead of) any model load: the
fingerprint, token counts, --split and the dimension check on cached vectors all need them, and a
remote backend's tokenizer reads the same prompts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError, ModelLoadError
from .hub import files_digest, read_json, resolve_model_dir, weights_key


@dataclass(frozen=True)
class ModelSpec:
    """The facts of one model directory, under one job's --max-length / --prompt / --prompt-name."""
    lower: bool  # the model lowercases texts before its tokenizer (do_lower_case)
    max_length: int  # tokens read per text: --max-length, else the model's own
    native_max_length: int  # the model's own (what an int8 export is calibrated at)
    dim: int | None  # the output dimension, if the files tell it
    prompt: str | None
    prompt_name: str | None  # the name the prompt came by (--prompt-name or the model's default)
    has_default_prompt: bool  # the model names a default prompt (turned off by --prompt "")
    include_prompt: bool  # the model's pooling averages over the prompt's tokens too


class ModelFiles:
    """A model's files, found (hub.resolve_model_dir) and read (ModelSpec) once under one job's
    --max-length / --prompt / --prompt-name, and their content digest (hub.files_digest), hashed
    once: what a local backend and a remote backend's tokenizer know of a model without loading it."""

    def __init__(self, model_id: str, *, max_length: int | None = None, prompt: str | None = None,
                 prompt_name: str | None = None):
        self.model_id = model_id
        self.dir, self.source = resolve_model_dir(model_id)  # where, and how it was found (the provenance's)
        self.spec = read_spec(self.dir, model_id, max_length=max_length, prompt=prompt, prompt_name=prompt_name)
        self._digest: Any = None

    def digest(self) -> Any:
        """The files' blake2b (hub.files_digest), a copy to update."""
        if self._digest is None:
            self._digest = files_digest(self.dir, str(self.source["revision"]))
        return self._digest.copy()

    def weights_key(self) -> str:
        """Names the model's export folder and its runtime record (hub.weights_key)."""
        return weights_key(self.digest())


def read_spec(root: Path, model_id: str, *, max_length: int | None, prompt: str | None,
              prompt_name: str | None) -> ModelSpec:
    """The ModelSpec of the model at `root`; InputError for a --max-length beyond its positions or
    an unknown --prompt-name, ModelLoadError for config files sentence-transformers would refuse."""
    sbert = _config_object(root / "sentence_bert_config.json")
    config = _config_object(root / "config.json")
    # as sentence-transformers reads it: the old sentence_bert_config.json's, else the tokenizer's
    # model_max_length (what sentence-transformers 6 saves), else the model's positions
    told = _config_object(root / "tokenizer_config.json").get("model_max_length")
    told = told if isinstance(told, int) and not isinstance(told, bool) and 0 < told < 1_000_000 else None
    native = sbert.get("max_seq_length") or told or config.get("max_position_embeddings") or 512
    limit = config.get("max_position_embeddings")
    wanted = max_length or native
    if limit and wanted > limit:
        raise InputError(
            f"--max-length {wanted} is more than {model_id} can read ({limit} positions); "
            f"use --max-length {limit} or less."
        )
    st_config = prompt_config(root / "config_sentence_transformers.json")
    text, name = resolve_prompt(model_id, st_config, prompt, prompt_name)
    pooling = next(iter(sorted(root.glob("*Pooling*/config.json"))), None)
    return ModelSpec(
        lower=bool(sbert.get("do_lower_case", False)),
        max_length=int(wanted),
        native_max_length=int(min(native, limit) if limit else native),
        dim=_dimension_from_files(root),
        prompt=text,
        prompt_name=name,
        has_default_prompt=bool(st_config.get("default_prompt_name")),
        include_prompt=bool(_config_object(pooling).get("include_prompt", True)) if pooling else True,
    )


def prompt_config(path: Path) -> dict[str, Any]:
    """A model's config_sentence_transformers.json (empty when there is none), held to what
    sentence-transformers loads: an object whose `prompts` maps names to texts (null: "") and
    whose `default_prompt_name` is one of them. Anything else is a ModelLoadError naming the
    file and the field: sentence-transformers itself refuses such a model, or worse, prepends the
    repr of an object to every text."""
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except OSError:
        return {}
    except (ValueError, RecursionError) as exc:
        raise ModelLoadError(f"{path}: not JSON ({type(exc).__name__}); restore the model's file, or delete it "
                             "(a model needs it only for its prompts).") from None

    def bad(what: str) -> ModelLoadError:
        return ModelLoadError(f"{path}: {what}; fix or remove it (sentence-transformers would not load this model).")

    if not isinstance(config, dict):
        raise bad(f"is {type(config).__name__} {_short(config)}, not a JSON object")
    prompts = config.get("prompts")
    if prompts is not None and not isinstance(prompts, dict):
        raise bad(f'"prompts" is {_short(prompts)}, not an object of prompt names and texts')
    for name, text in (prompts or {}).items():
        if text is not None and not isinstance(text, str):
            raise bad(f'"prompts" gives {name!r} the {type(text).__name__} {_short(text)}, not a text')
    prompts = {name: text or "" for name, text in (prompts or {}).items()}
    default = config.get("default_prompt_name")
    if default is not None and not isinstance(default, str):
        raise bad(f'"default_prompt_name" is {_short(default)}, not the name of a prompt (a string)')
    if default and default not in prompts:
        raise bad(f'"default_prompt_name" {default!r} is not one of its "prompts" '
                  f"({', '.join(map(repr, prompts)) or 'it has none'})")
    return {**config, "prompts": prompts}


def _config_object(path: Path) -> dict[str, Any]:
    """A model's JSON config file as read_json reads it ({} when missing or not JSON), which must
    be an object: anything else is a ModelLoadError naming the file."""
    config = read_json(path)
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path}: is {type(config).__name__} {_short(config)}, not a JSON object; "
                             "restore the model's file.")
    return config


def _short(value: Any) -> str:
    """A value of a config file, shown in a message: as JSON, at most 60 characters, one line."""
    try:
        shown = json.dumps(value, ensure_ascii=True)
    except (ValueError, RecursionError):
        shown = type(value).__name__
    return shown if len(shown) <= 60 else shown[:57] + "..."


def resolve_prompt(model_id: str, config: dict[str, Any], prompt: str | None, name: str | None) -> tuple[str | None, str | None]:
    """(prompt text, the name it came by), as sentence-transformers chooses: --prompt as given
    ("" for none), else --prompt-name from the model's `prompts`, else its `default_prompt_name`."""
    prompts = config.get("prompts") or {}
    if not isinstance(prompts, dict):
        prompts = {}
    if prompt is not None:
        return prompt or None, None
    if name is not None:
        if name not in prompts:
            known = ", ".join(sorted(prompts)) or "none (config_sentence_transformers.json has no prompts)"
            raise InputError(f"--prompt-name {name!r} is not a prompt of {model_id}; its prompts are: {known}. "
                             "Use one of them, or --prompt TEXT.")
        return str(prompts[name] or "") or None, name
    default = config.get("default_prompt_name")
    if default and default in prompts:
        return str(prompts[default] or "") or None, default
    return None, None


def _dimension_from_files(root: Path) -> int | None:
    """The output dimension read from config files, so writing can start without the model."""
    modules = read_json(root / "modules.json")
    if not isinstance(modules, list):
        return None
    types = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    if set(types) - {"Transformer", "Pooling", "Normalize"}:
        return None  # Dense and friends change the size: ask the model
    for m in modules:
        if str(m.get("type", "")).endswith("Pooling"):
            pooling = read_json(root / m.get("path", "") / "config.json")
            dim = pooling.get("word_embedding_dimension")
            modes = [k for k, v in pooling.items() if k.startswith("pooling_mode") and v]
            if dim and len(modes) == 1:  # several pooling modes concatenate
                return int(dim)
    return None

