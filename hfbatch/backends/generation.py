"""LocalGenerator: a transformers causal LM in this process, for `hfbatch generate`.

Lazy like the embedding backend: the tokenizer loads on the first token count, the model on the
first generate. Prompts are batched with left padding (so every prompt ends where generation
starts), greedy unless --temperature > 0, and truncated from the left to fit the context minus
the generation budget (the end of a prompt is what the model must continue).
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from typing import Any, Sequence

from ..errors import BackendError, InputError, ModelLoadError
from ..resources import check_model_memory, resolve_device, resolve_precision
from .hub import read_json, resolve_model_dir


_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    chat: bool = False

    def check(self) -> None:
        """Refuse values the model would turn into garbage or a crash later (NaN compares false
        with everything, so `temperature == 0` would not even mean greedy): exit 2 before any work."""
        if self.max_new_tokens < 1:
            raise InputError(f"--max-new-tokens must be at least 1 (got {self.max_new_tokens}).")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InputError(f"--temperature must be a finite number >= 0 (got {self.temperature}); 0 means greedy.")
        if not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise InputError(f"--top-p must be a number in (0, 1] (got {self.top_p}).")

    @property
    def deterministic(self) -> bool:
        """Greedy, or sampling with a fixed seed: the same prompt gives the same text, so it is cached."""
        return self.temperature == 0 or self.seed is not None

    def key(self) -> str:
        return (f"max_new_tokens={self.max_new_tokens};temperature={self.temperature};top_p={self.top_p};"
                f"seed={self.seed};chat={self.chat}")


@dataclass
class Prepared:
    """A prompt ready for the model: its token ids (after template and truncation)."""

    ids: list[int]
    n_prompt_tokens: int
    truncated: bool
    text: str = ""  # the prompt as sent to a remote server (the kept tokens, decoded, when truncated)


class LocalGenerator:
    """A causal LM on this machine. Lazy: files resolve for `fingerprint()`, the tokenizer loads for
    `prepare()`, the model for the first `generate()`."""

    name = "local"
    remote = False

    def __init__(self, model: str, *, device: str = "auto", params: GenerationParams = GenerationParams(),
                 precision: str = "fp32", trust_remote_code: bool = False):
        if params.max_new_tokens < 1:
            raise InputError(f"--max-new-tokens must be at least 1 (got {params.max_new_tokens}).")
        if params.temperature < 0 or not 0 < params.top_p <= 1:
            raise InputError("--temperature must be >= 0 and --top-p in (0, 1].")
        if precision not in _DTYPES and precision != "auto":
            raise InputError(f"--precision {precision!r} is not one of: fp32, bf16, fp16, auto.")
        self.model_id, self.requested_device, self.params = model, device, params
        self.requested_precision = precision
        self.trust_remote_code = trust_remote_code  # code shipped with a model runs only when asked for
        self._precision: str | None = None
        self._dir: Any = None
        self._source: dict[str, Any] = {}
        self._tokenizer: Any = None
        self._model: Any = None
        self._device: str | None = None
        self.load_seconds = 0.0

    @property
    def model_dir(self) -> Any:
        if self._dir is None:
            self._dir, self._source = resolve_model_dir(self.model_id)
        return self._dir

    def fingerprint(self) -> str:
        h = hashlib.blake2b(digest_size=16)
        h.update(self._source_revision().encode())
        for cfg in sorted(p for p in self.model_dir.rglob("*.json") if p.is_file()):
            h.update(cfg.read_bytes())
        h.update(self.params.key().encode())
        if self.precision != "fp32":  # fp32 keys stay as they were before --precision existed
            h.update(f"precision={self.precision}".encode())
        return f"generate:{h.hexdigest()}"

    @property
    def precision(self) -> str:
        """fp32, bf16 or fp16: the dtype the weights are loaded in (auto: fp16 on CUDA, bf16 on CPUs
        with native bf16). Part of the fingerprint: another dtype may choose other tokens."""
        if self._precision is None:
            self._precision = resolve_precision(self.requested_precision, self.requested_device)
        return self._precision

    def _source_revision(self) -> str:
        _ = self.model_dir
        return str(self._source.get("revision"))

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            try:
                tok = AutoTokenizer.from_pretrained(str(self.model_dir), trust_remote_code=self.trust_remote_code)
            except Exception as exc:
                raise ModelLoadError(f"cannot load the tokenizer of {self.model_id} ({exc}).") from exc
            tok.padding_side = "left"  # prompts end where generation starts
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
            if self.params.chat and not getattr(tok, "chat_template", None):
                raise InputError(f"--chat: {self.model_id} has no chat template; drop --chat to send prompts as they are.")
            self._tokenizer = tok
        return self._tokenizer

    @property
    def context(self) -> int:
        config = read_json(self.model_dir / "config.json")
        for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
            if isinstance(config.get(key), int):
                return int(config[key])
        limit = getattr(self.tokenizer, "model_max_length", 2048)
        return int(limit) if limit < 10**8 else 2048

    def prepare(self, prompts: Sequence[str], reserve: int = 0) -> list[Prepared]:
        """Template (with --chat), tokenize and left-truncate each prompt to context - max_new_tokens
        (- `reserve`: tokens a remote server's chat template will add)."""
        budget = self.context - self.params.max_new_tokens - reserve
        if budget < 1:
            raise InputError(f"--max-new-tokens {self.params.max_new_tokens} leaves no room for a prompt in "
                             f"{self.model_id}'s context of {self.context} tokens; lower it.")
        tok = self.tokenizer
        if self.params.chat:
            texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
                     for p in prompts]
        else:
            texts = list(prompts)
        encoded = tok(texts, add_special_tokens=not self.params.chat, truncation=False, verbose=False)["input_ids"]
        return [Prepared(ids[-budget:], min(len(ids), budget), len(ids) > budget) for ids in encoded]

    def _load(self) -> Any:
        if self._model is None:
            started = time.perf_counter()
            device = resolve_device(self.requested_device)
            dtype_name = _DTYPES[self.precision]
            check_model_memory(self.model_id, self.model_dir, load_dtype=dtype_name)
            try:
                import torch
                from transformers import AutoModelForCausalLM

                model = AutoModelForCausalLM.from_pretrained(str(self.model_dir), dtype=getattr(torch, dtype_name),
                                                             trust_remote_code=self.trust_remote_code)
                model = model.to(device).eval()
            except Exception as exc:
                hint = " It ships its own code: pass --trust-remote-code if you trust it." \
                    if "trust_remote_code" in str(exc) and not self.trust_remote_code else ""
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise ModelLoadError(f"cannot load {self.model_id} as a causal LM ({first}).{hint or ' --model takes a text-generation model, e.g. HuggingFaceTB/SmolLM2-135M-Instruct or gpt2.'}") from exc
            self._model, self._device = model, device
            self.load_seconds = time.perf_counter() - started
        return self._model

    def generate(self, prepared: Sequence[Prepared]) -> list[tuple[str, int, str]]:
        """(text, tokens generated, finish_reason 'stop' | 'length') per prompt, in order."""
        import torch

        model, tok, p = self._load(), self.tokenizer, self.params
        batch = tok.pad({"input_ids": [x.ids for x in prepared]}, padding=True, return_tensors="pt").to(self._device)
        if p.seed is not None:
            torch.manual_seed(p.seed)
        sampling = p.temperature > 0
        try:
            with torch.inference_mode():
                out = model.generate(
                    **batch, max_new_tokens=p.max_new_tokens, do_sample=sampling,
                    temperature=p.temperature if sampling else None, top_p=p.top_p if sampling else None,
                    pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                )
        except Exception as exc:
            raise BackendError(f"{self.model_id} failed to generate for a batch of {len(prepared)} prompts ({exc}).") from exc
        results = []
        start = batch["input_ids"].shape[1]
        for row in out[:, start:].tolist():
            stop = row.index(tok.eos_token_id) if tok.eos_token_id in row else None
            new = row if stop is None else row[:stop]
            results.append((tok.decode(new, skip_special_tokens=True), len(new) + (stop is not None),
                            "stop" if stop is not None else "length"))
        return results

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"backend": self.name, "model_id": self.model_id, **self._source}
        info.update(device=self._device or "not loaded", precision=self.precision, trust_remote_code=self.trust_remote_code, model_loaded=self._model is not None,
                    load_seconds=round(self.load_seconds, 3), params=self.params.key())
        return info
