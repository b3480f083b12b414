"""run_generate(): prompts in, completions out, with the embed job's qualities.

Same stages as embedding: streamed chunks, row validation, a content-hashed cache (only for
deterministic generation: greedy, or sampling with a fixed --seed), batches of prompts with
similar length, an atomic Parquet output with a sidecar. The model runs here (LocalGenerator) or
behind the HF Inference API / a TGI endpoint (RemoteGenerator); both take the same prepared
prompts and give the same (text, tokens, finish_reason) answers.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa

from ..backends.generation import GenerationParams, LocalGenerator
from ..backends.http import RetryPolicy
from ..backends.remote_generation import RemoteGenerator
from ..cache import NullCache, open_cache
from ..errors import InputError
from ..io.plan import open_job_files
from ..io.writers import ParquetSink
from ..options import sidecar_path
from .core import prefetch
from ..progress import NullProgress, ProgressReporter
from ..provenance import file_digest, library_versions, redact, utc_now
from ..resources import peak_rss_mb
from ..settings import Settings, parse_byte_size
from ..validate import ON_INVALID, validate_chunk

GENERATED_COLUMNS = ("generated_text", "n_prompt_tokens", "n_generated_tokens", "finish_reason", "prompt_truncated",
                     "generation_error")


@dataclass(frozen=True)
class GenerateOptions:
    input: Path
    output: Path
    model: str = ""
    prompt_column: str = "prompt"
    keep: Sequence[str] | None = None
    format: str | None = None
    device: str = "auto"
    trust_remote_code: bool = False  # run code that ships with a model (--trust-remote-code)
    precision: str = "fp32"  # weights' dtype for the local model: fp32, bf16, fp16 (CUDA) or auto
    batch_size: int = 8
    chunk_size: int | None = None
    params: GenerationParams = GenerationParams()
    use_cache: bool | None = None
    cache_dir: Path | None = None
    on_invalid: str = "mark"
    max_line_bytes: int | str | None = None  # longest JSONL line / CSV row: bytes or "64MiB"; None: from settings
    backend: str = "local"  # local, or api / hf-api
    endpoint: str | None = None  # a TGI server or Inference Endpoint instead of the HF router
    api_concurrency: int = 4
    api_timeout: float | None = None
    api_retries: int = 5
    api_retry_ceiling: float = 300.0
    tokenizer: str | None = None  # for prompt truncation with --backend api (default: the model's own)
    command: Sequence[str] = field(default_factory=tuple)


@dataclass
class GenerateResult:
    output: Path
    sidecar: Path
    document: dict[str, Any]


def output_schema(passthrough: pa.Schema) -> pa.Schema:
    return pa.schema(list(passthrough) + [
        pa.field("generated_text", pa.string()), pa.field("n_prompt_tokens", pa.int32()),
        pa.field("n_generated_tokens", pa.int32()), pa.field("finish_reason", pa.string()),
        pa.field("prompt_truncated", pa.bool_()), pa.field("generation_error", pa.string()),
    ])


def make_generator(opts: GenerateOptions, settings: Settings) -> LocalGenerator | RemoteGenerator:
    if opts.backend == "local":
        return LocalGenerator(opts.model, device=opts.device, params=opts.params, precision=opts.precision,
                              trust_remote_code=opts.trust_remote_code)
    if opts.backend in ("api", "hf-api"):
        if opts.api_retries < 1:
            raise InputError(f"--api-retries must be at least 1 (got {opts.api_retries}).")
        return RemoteGenerator(opts.model, params=opts.params, endpoint=opts.endpoint, concurrency=opts.api_concurrency,
                               timeout=opts.api_timeout or settings.api_timeout, tokenizer=opts.tokenizer,
                               retry=RetryPolicy(attempts=opts.api_retries, ceiling_seconds=opts.api_retry_ceiling))
    raise InputError(f"--backend {opts.backend!r} is not one of: local, api (hf-api) for generate.")


def run_generate(options: GenerateOptions, *, progress: ProgressReporter | None = None,
                 settings: Settings | None = None) -> GenerateResult:
    """Run one generation job; InputError (exit 2) before any work, other HfbatchErrors (exit 1) after."""
    settings = settings or Settings.load()
    progress = progress or NullProgress()
    opts = replace(options, input=Path(options.input), output=Path(options.output),
                   chunk_size=options.chunk_size or settings.chunk_size,
                   cache_dir=Path(options.cache_dir) if options.cache_dir else settings.cache_dir,
                   use_cache=settings.cache_enabled if options.use_cache is None else options.use_cache,
                   keep=list(dict.fromkeys(options.keep)) if options.keep is not None else None,
                   max_line_bytes=settings.max_line_bytes if options.max_line_bytes is None
                   else parse_byte_size(options.max_line_bytes, "--max-line-bytes"))
    if not opts.model:
        raise InputError("generate needs --model (a hub id or a local directory of a causal LM).")
    if opts.on_invalid not in ON_INVALID:
        raise InputError(f"--on-invalid {opts.on_invalid!r} is not one of: {', '.join(ON_INVALID)}.")
    if opts.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1 (got {opts.batch_size}).")
    opts.params.check()
    started, wall = utc_now(), time.perf_counter()
    files = open_job_files(input=opts.input, output=opts.output, fmt=opts.format, chunk_size=opts.chunk_size or 10_000,
                           text_column=opts.prompt_column, keep=opts.keep, added_columns=GENERATED_COLUMNS,
                           max_line_bytes=opts.max_line_bytes)  # type: ignore[arg-type]  # an int once resolved
    reader, passthrough = files.reader, files.passthrough

    generator = make_generator(opts, settings)
    cached = opts.use_cache and opts.params.deterministic  # sampling without a seed is never cached
    cache = open_cache(opts.cache_dir, generator.fingerprint(), size_limit_bytes=settings.cache_size_bytes) \
        if cached else NullCache()
    counts = {"rows_total": 0, "rows_generated": 0, "rows_invalid": 0, "rows_truncated": 0, "prompts_computed": 0,
              "tokens_generated": 0, "batches": 0}
    seconds = {"read_validate": 0.0, "cache": 0.0, "generate": 0.0, "write": 0.0}
    sink = ParquetSink(opts.output, output_schema(passthrough))
    progress.start(reader.total_rows)
    try:
        chunks = (validate_chunk(c, path=opts.input, text_column=opts.prompt_column, on_invalid=opts.on_invalid)
                  for c in reader.chunks())
        for v in prefetch(chunks, depth=1):
            n = len(v.texts)
            counts["rows_total"] += n
            valid = v.valid_rows
            counts["rows_invalid"] += n - len(valid)
            unique = list(dict.fromkeys(v.texts[i] for i in valid))
            t0 = time.perf_counter()
            found = cache.lookup_bytes(unique, generator.fingerprint())  # type: ignore[arg-type]
            results: dict[str, dict[str, Any]] = {unique[i]: json.loads(b) for i, b in found.items()}
            seconds["cache"] += time.perf_counter() - t0
            misses = [p for p in unique if p not in results]
            t0 = time.perf_counter()
            prepared = dict(zip(misses, generator.prepare(misses))) if misses else {}
            order = sorted(misses, key=lambda p: -prepared[p].n_prompt_tokens)
            for start in range(0, len(order), opts.batch_size):
                group = order[start : start + opts.batch_size]
                for prompt, (text, n_new, reason) in zip(group, generator.generate([prepared[p] for p in group])):
                    item = prepared[prompt]
                    results[prompt] = {"text": text, "n_generated": n_new, "finish_reason": reason,
                                       "n_prompt": item.n_prompt_tokens, "truncated": item.truncated}
                    counts["tokens_generated"] += n_new
                counts["batches"] += 1
                counts["prompts_computed"] += len(group)
                cache.store_bytes(group, [json.dumps(results[p]).encode() for p in group], generator.fingerprint())
            seconds["generate"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            rows = [i for i in range(n) if opts.on_invalid != "skip" or v.texts[i] is not None]
            got = [results.get(v.texts[i]) if v.texts[i] is not None else None for i in rows]  # type: ignore[arg-type]
            base = v.chunk.batch.select(passthrough.names)
            if len(rows) != n:
                base = base.take(pa.array(rows, type=pa.int64()))
            counts["rows_generated"] += sum(1 for g in got if g)
            counts["rows_truncated"] += sum(1 for g in got if g and g["truncated"])
            extra = [
                pa.array([g["text"] if g else None for g in got], pa.string()),
                pa.array([g["n_prompt"] if g else None for g in got], pa.int32()),
                pa.array([g["n_generated"] if g else None for g in got], pa.int32()),
                pa.array([g["finish_reason"] if g else None for g in got], pa.string()),
                pa.array([g["truncated"] if g else None for g in got], pa.bool_()),
                pa.array([v.errors[i] for i in rows], pa.string()),
            ]
            sink.write(pa.RecordBatch.from_arrays(list(base.columns) + extra, schema=sink.schema))
            seconds["write"] += time.perf_counter() - t0
            progress.advance(n, hit_rate=cache.stats.hit_rate)
        wall_s = time.perf_counter() - wall
        document = {
            "provenance": {
                "tool": "hfbatch", "job": "generate", "tool_version": library_versions()["hfbatch"],
                "command": redact(list(opts.command) or sys.argv), "model_id": opts.model,
                "fingerprint": generator.fingerprint(), "backends": {generator.name: generator.describe()},
                "prompt_column": opts.prompt_column, "params": opts.params.key(), "cached": bool(cached),
                "input": {"path": str(opts.input), "format": reader.format, "bytes": opts.input.stat().st_size,
                          "hash": file_digest(opts.input), "rows": counts["rows_total"]},
                "output": {"path": str(opts.output)}, "started": started, "finished": utc_now(),
                "libraries": library_versions(),
            },
            "metrics": {
                **counts, "wall_seconds": round(wall_s, 3), "stage_seconds": {k: round(x, 3) for k, x in seconds.items()},
                "tokens_per_second": round(counts["tokens_generated"] / seconds["generate"], 1) if seconds["generate"] else None,
                "cache": {"enabled": bool(cached) and cache.disabled is None, "disabled": cache.disabled, "hits": cache.stats.hits, "misses": cache.stats.misses,
                          "hit_rate": round(cache.stats.hit_rate, 4)},
                "model_load_seconds": round(generator.load_seconds, 3), "peak_rss_mb": round(peak_rss_mb(), 1),
            },
        }
        sink.commit(document, sidecar=sidecar_path(opts.output))
    except BaseException:
        sink.abort()
        raise
    finally:
        progress.finish()
        cache.close()
    return GenerateResult(opts.output, sidecar_path(opts.output), document)
