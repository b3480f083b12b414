"""The model's tokenizer, loaded once and shared by counting, windows and the ONNX/OpenVINO runtimes;
`Tokens` is what a backend (local, or remote for its counts) holds of it.

Two ways to load the same tokenizer: the `tokenizers` library on the model's tokenizer.json
(milliseconds, no transformers import: the start-up of a small job) or transformers'
AutoTokenizer (seconds: importing transformers alone costs 2-4 s on a 2-core machine). The fast
way is used only for a model whose tokenizer.json was proved to give the ids AutoTokenizer gives
(`verify`, run once per model and remembered in the export folder; see exports.py), because
transformers can change a tokenizer after reading its file (tokenizer_config.json settings).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import InputError, ModelLoadError
from .exports import ExportBundle, package_version
from .spec import ModelFiles, ModelSpec
from .windows import Windows, fit_windows

# What a tokenizer is checked on before the fast loader is trusted: cases, accents, scripts,
# symbols, whitespace runs, very long text (truncation), and the empty string.
VERIFY_TEXTS = [
    "The kettle boils fast and the handle stays cool.", "ÉCOLE Über naïve façade", "ok", "", "  spaced   out  ",
    "这个产品质量很好", "製品はとても良いです。", "Отличный товар", "مرحبا بكم", "🔥 love it 😍 #tag",
    "SKU-4471-B / lot 2026-11 @ $19.99", "https://example.com/a?b=c&d=1", "def f(x):\n\treturn x ** 2",
    "[CLS] [SEP] <s> </s> [PAD] [MASK]", " ".join(["a long text that must be cut"] * 200),
]


class ModelTokenizer:
    """Token ids as the model reads them: `count` (specials included, no truncation), `offsets`
    (of the text's own tokens), `feeds` (padded, truncated arrays for a runtime)."""

    def __init__(self, raw: Any = None, hf: Any = None, *, lower: bool = False):
        self._raw, self._hf, self.lower = raw, hf, lower
        self.fast = raw is not None or bool(getattr(hf, "is_fast", False))
        if raw is not None:
            padding = raw.padding or {}  # read before it is cleared: RoBERTa-like models pad with id 1
            self._pad_id = int(padding.get("pad_id", 0) or 0)
            self._pad_token = str(padding.get("pad_token", "[PAD]") or "[PAD]")
            raw.no_truncation()
            raw.no_padding()
        self.loader = "tokenizers" if raw is not None else "transformers"

    @property
    def hf(self) -> Any:
        """The transformers tokenizer (None when loaded the fast way)."""
        return self._hf

    def _prepare(self, texts: Sequence[str], prompt: str) -> list[str]:
        # what sentence-transformers does before tokenizing: prompt + text, stripped, lowercased where the model says
        prepared = [(prompt + t).strip() for t in texts]
        return [t.lower() for t in prepared] if self.lower else prepared

    def count(self, texts: Sequence[str], prompt: str = "") -> list[int]:
        prepared = self._prepare(texts, prompt)
        if self._raw is not None:
            return [len(e.ids) for e in self._raw.encode_batch(prepared, add_special_tokens=True)]
        encoded = self._hf(prepared, add_special_tokens=True, truncation=False, verbose=False,
                           return_attention_mask=False, return_token_type_ids=False)
        return [len(ids) for ids in encoded["input_ids"]]

    def offsets(self, texts: Sequence[str]) -> list[list[tuple[int, int]]]:
        """Character spans of each text's own tokens (no specials), for cutting windows."""
        if self._raw is not None:
            return [[(int(a), int(b)) for a, b in e.offsets] for e in self._raw.encode_batch(list(texts), add_special_tokens=False)]
        encoded = self._hf(list(texts), add_special_tokens=False, truncation=False, verbose=False,
                           return_offsets_mapping=True, return_attention_mask=False, return_token_type_ids=False)
        return [[(int(a), int(b)) for a, b in o] for o in encoded["offset_mapping"]]

    def feeds(self, texts: Sequence[str], max_length: int, names: Sequence[str], prompt: str = "") -> dict[str, np.ndarray]:
        """int64 arrays [batch, tokens] for the graph's inputs, padded to the longest, cut at max_length."""
        prepared = self._prepare(texts, prompt)
        if self._raw is None:
            batch = self._hf(prepared, padding=True, truncation=True, max_length=max_length, return_tensors="np")
            return {n: np.asarray(batch[n], dtype=np.int64) for n in names}
        self._raw.enable_truncation(max_length)
        self._raw.enable_padding(pad_id=self._pad_id, pad_token=self._pad_token)
        try:
            encoded = self._raw.encode_batch(prepared, add_special_tokens=True)
        finally:
            self._raw.no_truncation()
            self._raw.no_padding()
        columns = {"input_ids": [e.ids for e in encoded], "attention_mask": [e.attention_mask for e in encoded],
                   "token_type_ids": [e.type_ids for e in encoded]}
        return {n: np.asarray(columns[n], dtype=np.int64) for n in names}


def tokenizer_libraries() -> dict[str, str | None]:
    """The versions a fast-tokenizer proof holds for (a new tokenizers or transformers proves again)."""
    return {name: package_version(name) for name in ("tokenizers", "transformers")}


def load_fast(model_dir: Path, *, lower: bool = False) -> ModelTokenizer | None:
    """The tokenizers-library load of model_dir/tokenizer.json (None when there is none)."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    try:
        return ModelTokenizer(Tokenizer.from_file(str(path)), lower=lower)
    except Exception:  # noqa: BLE001 - a file the library cannot read: transformers decides
        return None


def load_transformers(model_dir: Path, model_id: str, *, trust_remote_code: bool = False, lower: bool = False) -> ModelTokenizer:
    try:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ModelLoadError(f"cannot load the tokenizer of {model_id} from {model_dir} ({exc}).") from exc
    return ModelTokenizer(hf=hf, lower=lower)


def same_ids(fast: ModelTokenizer, slow: ModelTokenizer, texts: Sequence[str] = VERIFY_TEXTS) -> bool:
    """Whether the fast load gives exactly the ids (with specials, with and without truncation)
    and offsets of the transformers load: the condition for using it."""
    try:
        if fast.count(texts) != slow.count(texts) or fast.offsets(texts) != slow.offsets(texts):
            return False
        names = ["input_ids", "attention_mask"]
        a, b = fast.feeds(texts, 128, names), slow.feeds(texts, 128, names)
        return all(a[n].shape == b[n].shape and bool((a[n] == b[n]).all()) for n in names)
    except Exception:  # noqa: BLE001 - any disagreement, even a crash, means: use transformers
        return False


class Tokens:
    """A model's tokenizer as a job uses it: counts and windows of the texts as the model reads
    them (its prompt before each, lowercased where it says, cut at its max length). The tokenizer
    loads on the first count, the fast way where this model's export proved it (`weights_key`
    names that export), else transformers'."""

    def __init__(self, model_dir: Path, model_id: str, spec: ModelSpec, *, weights_key: Callable[[], str],
                 trust_remote_code: bool = False):
        self.model_dir, self.model_id, self.spec = model_dir, model_id, spec
        self._weights_key, self._trust_remote_code = weights_key, trust_remote_code
        self._loaded: ModelTokenizer | None = None

    @classmethod
    def find(cls, model: str, *, prompt: str | None = None, prompt_name: str | None = None) -> "Tokens":
        """The tokens of `model` (hub id or directory) found as a local backend finds them:
        ModelLoadError when its files cannot be had, InputError for an unknown `prompt_name`."""
        files = ModelFiles(model, prompt=prompt, prompt_name=prompt_name)
        return cls(files.dir, model, files.spec, weights_key=files.weights_key)

    @property
    def prompt(self) -> str | None:
        return self.spec.prompt

    @property
    def prompt_name(self) -> str | None:
        return self.spec.prompt_name

    @property
    def max_length(self) -> int:
        return self.spec.max_length

    @property
    def loader(self) -> str | None:
        """How the tokenizer was loaded ("tokenizers" or "transformers"; None: not loaded)."""
        return self._loaded.loader if self._loaded is not None else None

    def adopt(self, tokenizer: ModelTokenizer) -> None:
        """Take `tokenizer` (the loaded torch model's own) unless one is loaded already."""
        self._loaded = self._loaded or tokenizer

    def load(self) -> ModelTokenizer:
        if self._loaded is None:
            meta = ExportBundle(self._weights_key()).meta()
            if meta.get("tokenizer_fast") and meta.get("tokenizer_libraries") == tokenizer_libraries():
                self._loaded = load_fast(self.model_dir, lower=self.spec.lower)
            if self._loaded is None:
                self._loaded = load_transformers(self.model_dir, self.model_id, trust_remote_code=self._trust_remote_code,
                                                 lower=self.spec.lower)
        return self._loaded

    def counts(self, texts: Sequence[str]) -> list[int]:
        # the preparation sentence-transformers applies: prompt + text, stripped, lowercased where the model says
        return self.load().count(texts, self.prompt or "")

    def split(self, texts: Sequence[str], size: int, overlap: int) -> list[Windows]:
        """Windows of at most `size` tokens as the model reads them (specials and prompt included),
        `overlap` tokens shared, cut by this model's tokenizer (see windows.py)."""
        if size > self.max_length:
            raise InputError(f"--split tokens:{size} is more than {self.model_id} reads ({self.max_length} tokens); "
                             f"use --split tokens:{self.max_length} or less.")
        tokenizer = self.load()
        if not tokenizer.fast:
            raise InputError(f"--split needs a fast tokenizer (with offsets); {self.model_id}'s is not one.")
        # offsets index the text as given; lowercasing is kept only where it keeps every length
        lower = self.spec.lower
        seen = [t.lower() if lower and len(t.lower()) == len(t) else t for t in texts]
        offsets = tokenizer.offsets(seen)
        overhead = self.counts([""])[0]  # specials and the prompt: what any text costs beside its own tokens
        return fit_windows(list(texts), offsets, size=size, overlap=overlap, overhead=overhead, count=self.counts,
                           limit=self.max_length)
