"""run_generate(): prompts in, completions out, as a Task on the same chunk core as embedding.

Streamed chunks, row validation, a content-hashed cache (only for deterministic generation:
greedy, or sampling with a fixed --seed; see GenerateOptions), batches of prompts with similar
length, an atomic Parquet output with a sidecar, --max-errors, --log-file and --metrics-file.
The model runs here (LocalGenerator) or behind the HF Inference API / a TGI endpoint
(RemoteGenerator); both take the same prepared prompts and give the same (text, tokens,
finish_reason) answers. A cached answer is UTF-8 JSON; one that does not decode to an answer
(planted, or from another version) is a miss.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa

from ..backends import Generator, make_generator
from ..monitoring import Observer
from ..options import GenerateOptions
from ..settings import Settings
from .core import Cache, JobResult, run_job

__all__ = ["GENERATED_COLUMNS", "GenerateOptions", "GenerateResult", "GenerateTask", "output_schema",
           "run_generate"]

GENERATED_COLUMNS = ("generated_text", "n_prompt_tokens", "n_generated_tokens", "finish_reason", "prompt_truncated",
                     "generation_error")
_ANSWER = {"text": str, "n_generated": int, "finish_reason": str, "n_prompt": int, "truncated": bool}


class GenerateResult(JobResult):
    """What a finished generate job produced: the output paths and the sidecar document."""


def output_schema(passthrough: pa.Schema) -> pa.Schema:
    return pa.schema(list(passthrough) + [
        pa.field("generated_text", pa.string()), pa.field("n_prompt_tokens", pa.int32()),
        pa.field("n_generated_tokens", pa.int32()), pa.field("finish_reason", pa.string()),
        pa.field("prompt_truncated", pa.bool_()), pa.field("generation_error", pa.string()),
    ])


def run_generate(options: GenerateOptions, *, generator: Generator | None = None, observer: Observer | None = None,
                 settings: Settings | None = None) -> GenerateResult:
    """Run one generation job with `generator` (default: the one the options name, made lazily).
    InputError (exit 2) before any work, other HfbatchErrors (exit 1) after."""
    opts, document = run_job(options, GENERATED_COLUMNS, lambda o: GenerateTask(generator or make_generator(o), o),
                             observer=observer, settings=settings)
    return GenerateResult(opts.output, opts.sidecar, document)


class GenerateTask:
    """The generate job on the chunk core. A value is the answer to one prompt: its text, tokens
    generated, finish reason, and the prompt's tokens and truncation."""

    job = "generate"
    added_columns = GENERATED_COLUMNS
    max_batch_tokens = None  # left-padded prompts: batch_size prompts a call

    def __init__(self, generator: Generator, opts: GenerateOptions):
        self.backend, self.opts = generator, opts

    @property
    def batch_texts(self) -> int:
        return self.opts.batch_size or 8

    def setup_seconds(self) -> dict[str, float]:
        return {"model_load": self.backend.load_seconds}

    def watch(self, note: Callable[[str], None]) -> None:
        """A generator's one-time work is its load, booked as model_load: nothing to show."""

    def lookup(self, cache: Cache, texts: Sequence[str]) -> dict[int, Any]:
        found = {}
        for i, raw in cache.lookup_bytes(texts, self.backend.fingerprint()).items():
            answer = _decode(raw)
            if answer is None:
                cache.stats.unhit(1)
            else:
                found[i] = answer
        return found

    def prepare(self, texts: Sequence[str]) -> tuple[list[Any], list[int]]:
        prepared = self.backend.prepare(texts)
        return prepared, [p.n_prompt_tokens for p in prepared]

    def compute(self, items: Sequence[Any]) -> tuple[list[Any], int]:
        answers = [{"text": text, "n_generated": n_new, "finish_reason": reason, "n_prompt": item.n_prompt_tokens,
                    "truncated": item.truncated}
                   for item, (text, n_new, reason) in zip(items, self.backend.generate(items))]
        return answers, sum(a["n_generated"] for a in answers)

    def store(self, cache: Cache, texts: Sequence[str], values: Sequence[Any]) -> None:
        cache.store_bytes(texts, [json.dumps(v).encode() for v in values], self.backend.fingerprint())

    def recheck(self, cache: Cache, found: dict[int, Any]) -> list[int]:
        return []

    def truncated(self, values: Sequence[Any]) -> list[bool]:
        return [bool(v["truncated"]) for v in values]

    def schema(self, passthrough: pa.Schema) -> pa.Schema:
        return output_schema(passthrough)

    def columns(self, values: Sequence[Any], rows: np.ndarray, errors: Sequence[str | None]) -> list[pa.Array]:
        got = [values[r] if r >= 0 else None for r in rows]
        return [
            pa.array([g["text"] if g else None for g in got], pa.string()),
            pa.array([g["n_prompt"] if g else None for g in got], pa.int32()),
            pa.array([g["n_generated"] if g else None for g in got], pa.int32()),
            pa.array([g["finish_reason"] if g else None for g in got], pa.string()),
            pa.array([g["truncated"] if g else None for g in got], pa.bool_()),
            pa.array(errors, pa.string()),
        ]

    def provenance(self) -> dict[str, Any]:
        return {"prompt_column": self.opts.prompt_column, "params": self.opts.params.key(), "cached": bool(self.opts.use_cache)}

    # a prompt is answered whole: nothing to split, combine or calibrate
    split_mode = None

    def split(self, texts: Sequence[str]) -> list[Any]:
        raise NotImplementedError("generate does not split prompts")

    def combine(self, values: Sequence[Any], tokens: int) -> Any:
        raise NotImplementedError("generate does not split prompts")

    def calibrate(self, sample: Any) -> None:
        return None


def _decode(raw: bytes) -> dict[str, Any] | None:
    """A cached answer, or None when the bytes are not one."""
    try:
        answer = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(answer, dict) or any(type(answer.get(k)) is not t for k, t in _ANSWER.items()):
        return None
    return answer
