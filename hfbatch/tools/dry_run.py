"""`hfbatch embed --dry-run`: what a job would do, and roughly how long, with nothing written.

Reads and validates the whole input (so a bad file fails now, not at row 9 million), looks every
distinct text up in the cache (read only: a cache that does not exist yet is not created), counts
the tokens of the texts the cache does not have with the model's tokenizer, and times the real
backend on a sample of those texts (at most 32, one request for a remote backend) for an ETA.
No output, no sidecar, no cache entry is written.

Without a tokenizer (token_source "server usage": an OpenAI-compatible server on a served model
name) the server counts tokens per request, once it has embedded the texts, and truncates at its
own limit: tokens_to_compute and texts_truncated are null (not known before the job), the ETA is
per text, and the report says so (`token_counts`, `token_counts_note`).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..backends import make_backend
from ..backends.remote import SERVER_USAGE
from ..cache import NullCache, open_cache
from ..errors import InputError
from ..io.columns import check_columns
from ..io.parts import is_multi_input
from ..io.readers import open_reader, spooled_input
from ..jobs.embed import embed_columns
from ..options import EmbedOptions
from ..settings import Settings
from ..validate import validate_chunk

SAMPLE = 32


def plan_embed(options: EmbedOptions, settings: Settings | None = None) -> dict[str, Any]:
    """The dry run's report: rows, invalid rows, distinct texts, expected cache hits, tokens,
    model calls or HTTP requests, and an ETA measured on a sample."""
    opts = options.resolved(settings or Settings.load())
    assert opts.text_column and opts.chunk_size
    if is_multi_input(opts.input):
        raise InputError(f"{opts.input}: --dry-run plans one input file with the local engine; give one file.")
    with spooled_input(opts.input, opts.format) as source:  # a pipe is read once, like the job reads it
        return _plan(opts, source)


def _sync_plan(opts: EmbedOptions, backend: Any, source: Path, reader: Any) -> Any:
    """The sync the job would make (jobs/sync.plan_sync: the target read, its space compared, the
    delete guard applied), so the dry run counts only the rows it would embed."""
    import pyarrow as pa

    from ..io.targets import open_target, parse_target
    from ..jobs.embed import embed_task
    from ..jobs.sync import plan_sync

    spec = parse_target(opts.output, kind=opts.target)
    passthrough = pa.schema([reader.schema.field(n) for n in (opts.keep if opts.keep is not None else reader.schema.names)])
    target = open_target(spec) if spec.is_table else None
    task = embed_task(backend, opts)
    try:
        if target is not None:  # what the real run would refuse before any work, refused here too
            target.check_run(opts.output_precision, [*passthrough.names, *task.added_columns])
        return plan_sync(opts, task, source, passthrough, target)
    finally:
        if target is not None:
            target.close()  # (a Postgres target's connection: a dry run takes no lock and writes nothing)


def _plan(opts: EmbedOptions, source: Path) -> dict[str, Any]:
    assert opts.text_column and opts.chunk_size
    columns = None if opts.keep is None else list(dict.fromkeys([*opts.keep, opts.text_column]))
    reader = open_reader(source, fmt=opts.format, chunk_size=opts.chunk_size, columns=columns,
                         text_column=opts.text_column, max_line_bytes=opts.max_line_bytes)  # type: ignore[arg-type]
    check_columns(opts.input, reader.schema, opts.text_column, opts.keep, reader.all_columns, added_columns=embed_columns(opts))
    backend = make_backend(opts)
    choice = backend.prepare(measure=False)  # the configuration the job would take (auto: this machine's, if measured)
    cache_dir = Path(opts.cache_dir) if opts.cache_dir else None
    exists = bool(opts.use_cache and cache_dir and (cache_dir / "cache.db").exists())
    cache = open_cache(cache_dir, backend.fingerprint(), size_limit_bytes=opts.cache_size_bytes or 0) if exists \
        else NullCache()
    sync = _sync_plan(opts, backend, source, reader) if opts.id_column is not None else None
    rows = invalid = windows = 0
    distinct: set[str] = set()
    misses: list[str] = []
    hits = 0
    dim = backend.known_dimension() if exists else None  # hits must have the model's size, as in the job
    try:
        for chunk in reader.chunks():
            validated = validate_chunk(chunk, path=opts.input, text_column=opts.text_column, on_invalid=opts.on_invalid)
            rows += len(validated.texts)
            invalid += len(validated.texts) - len(validated.valid_rows)
            changed = sync.changed[chunk.first_row:chunk.first_row + len(validated.texts)] if sync is not None else None
            texts = [validated.texts[i] for i in validated.valid_rows if changed is None or changed[i]]
            if opts.split_tokens:  # what the job computes is each text's windows
                cut = backend.split(texts, opts.split_tokens, opts.window_overlap)  # type: ignore[arg-type]
                windows += sum(len(w.spans) for w in cut)
                texts = [t[s.char_start:s.char_end] for t, w in zip(texts, cut) for s in w.spans]  # type: ignore[index]
            new = [t for t in dict.fromkeys(texts) if t not in distinct]
            distinct.update(new)  # type: ignore[arg-type]
            found = cache.lookup(new, dim) if backend.kind == "dense" \
                else cache.lookup_bytes(new, backend.fingerprint())  # type: ignore[arg-type]
            hits += len(found)
            misses += [t for j, t in enumerate(new) if j not in found]  # type: ignore[misc]
    finally:
        cache.close()
    by_server = backend.token_source == SERVER_USAGE  # no count per text before the server has embedded it
    counts = backend.token_counts(misses) if misses and not by_server else []
    max_length = backend.max_length
    seen = [min(c, max_length) for c in counts] if not by_server else [1] * len(misses)  # (by_server: per text)
    remote = backend.remote
    size = opts.api_batch_size if remote else (opts.batch_size or 32)
    report: dict[str, Any] = {
        "input": str(opts.input), "output": str(opts.output), "model_id": opts.model, "backend": backend.name,
        "kind": backend.kind,
        # a sync by --id-column: what the run would insert, update, leave and delete (texts: the changed rows')
        "sync": None if sync is None else {**sync.counts, "target": sync.spec.given, "version": sync.version_before},
        "rows": rows, "rows_invalid": invalid, "texts_distinct": len(distinct),
        # --split: the windows the valid rows are cut into, and the rows the output will have
        "windows": windows if opts.split_tokens else None,
        "output_rows": rows - invalid * (opts.on_invalid == "skip")
        + (windows - (rows - invalid) if opts.split_tokens and not opts.aggregate else 0),
        "cache": {"used": exists, "expected_hits": hits, "texts_to_compute": len(misses)},
        "tokens_to_compute": None if by_server else sum(seen),
        "texts_truncated": None if by_server else sum(1 for c in counts if c > max_length),
        "token_counts": backend.token_source,
        # a local model's configuration, and how it was chosen ("not measured yet: the job will measure ... first")
        "runtime": {"chosen": choice.label, "by": choice.by} if choice is not None else None,
        ("requests" if remote else "model_calls"): math.ceil(len(misses) / size) if misses else 0,
        "eta_seconds": 0.0, "eta_basis": "nothing to compute",
    }
    if misses:
        # spread over the lengths (tokens; characters when the server counts)
        length = (lambda i: len(misses[i])) if by_server else (lambda i: seen[i])
        sample = sorted(range(len(misses)), key=lambda i: -length(i))[:: max(1, len(misses) // SAMPLE)][:SAMPLE]
        texts = [misses[i] for i in sample]
        backend.embed(texts[:2])  # warm-up: the model load is not the job's per-text cost
        # a local model is timed in batches of alike lengths, as the job batches (one batch of every
        # length would pad all to the longest: several times the work for a sparse model's head)
        groups = [texts] if backend.remote else [texts[g:g + 8] for g in range(0, len(texts), 8)]
        started = time.perf_counter()
        made = [value for group in groups for value in backend.embed(group)]
        per_unit = (time.perf_counter() - started) / max(1, sum(seen[i] for i in sample))
        if backend.kind != "dense":  # what a row of the output will weigh: a sparse row's entries, a matrix's tokens
            per_row = value_bytes(backend.kind, made, opts)
            report["output_bytes_per_row"] = round(per_row, 1)
            report["output_bytes_estimate"] = int(per_row * report["output_rows"])
        load = backend.load_seconds
        report["eta_seconds"] = round(load + per_unit * sum(seen), 1)
        report["eta_basis"] = (f"{len(texts)} of the texts to compute timed on {backend.name} "
                               f"({per_unit * 1000:.3f} ms per {'text' if by_server else 'token'}), plus model load {load:.1f} s")
    if by_server:
        report["token_counts_note"] = (
            f"no tokenizer for {opts.model}: the server counts tokens per request, once it has embedded the texts, "
            "and truncates at its own limit, so tokens_to_compute and texts_truncated are not known before the job "
            "(its sidecar has the server's total) and the ETA is per text. Pass --tokenizer for counts.")
    return report


def value_bytes(kind: str, values: Any, opts: EmbedOptions) -> float:
    """Mean bytes of the embedding column per row for a sample of `kind` values: a sparse vector's
    indices and values (8 bytes an entry, at most --sparse-top-k of them), a multi-vector's tokens x dim
    at its precision."""
    if not values:
        return 0.0
    if kind == "sparse":
        return float(np.mean([8 * min(v.nnz, opts.sparse_top_k or v.nnz) for v in values]))
    width = 2 if opts.output_precision == "float16" else 4
    return float(np.mean([m.shape[0] * m.shape[1] * width for m in values]))


def plan_score(options: Any, settings: Settings | None = None) -> dict[str, Any]:
    """`hfbatch score --dry-run`: rows, invalid rows, distinct pairs, expected cache hits, the pairs
    and windows to score (a long document costs a model call per window), tokens, model calls or
    requests, the rows --rerank would keep, and an ETA measured on a sample. Writes nothing."""
    from ..backends.scoring import Pair, make_scorer
    from ..validate import parse_pair_key

    opts = options.resolved(settings or Settings.load())
    if is_multi_input(opts.input):
        raise InputError(f"{opts.input}: --dry-run plans one input file; give one file.")
    with spooled_input(opts.input, opts.format) as source:
        reader = open_reader(source, fmt=opts.format, chunk_size=opts.chunk_size, text_column=opts.text_column,
                             columns=None if opts.keep is None else list(dict.fromkeys([*opts.keep, opts.text_column])),
                             max_line_bytes=opts.max_line_bytes)
        scorer = make_scorer(opts)
        cache_dir = Path(opts.cache_dir) if opts.cache_dir else None
        exists = bool(opts.use_cache and cache_dir and (cache_dir / "cache.db").exists())
        cache = open_cache(cache_dir, scorer.fingerprint(), size_limit_bytes=opts.cache_size_bytes or 0) if exists \
            else NullCache()
        rows = invalid = hits = 0
        distinct: set[str] = set()
        misses: list[str] = []
        per_query: dict[Any, int] = {}
        try:
            for chunk in reader.chunks():
                validated = opts.validate(chunk)
                rows += len(validated.texts)
                invalid += len(validated.texts) - len(validated.valid_rows)
                for i in validated.valid_rows:
                    query = parse_pair_key(validated.texts[i])[0]  # type: ignore[arg-type]
                    per_query[query] = per_query.get(query, 0) + 1
                new = [t for t in dict.fromkeys(t for t in validated.texts if t is not None) if t not in distinct]
                distinct.update(new)
                found = cache.lookup_bytes(new, scorer.fingerprint())
                hits += len(found)
                misses += [t for j, t in enumerate(new) if j not in found]
        finally:
            cache.close()
    pairs = [Pair(*parse_pair_key(t)) for t in misses]
    counts = scorer.pair_counts(pairs)
    cuts = [scorer.windows(p) for p, c in zip(pairs, counts) if c > scorer.max_length]
    long = [w for w in cuts if w]  # scored in windows; the rest (a query leaving no room) truncated
    windows = sum(len(w) for w in long)
    calls = len(pairs) - len(long) + windows
    size = opts.api_batch_size if scorer.remote else (opts.batch_size or 32)
    kept = sum(min(n, opts.rerank) for n in per_query.values()) + invalid * (opts.on_invalid == "mark") \
        if opts.rerank else rows - invalid * (opts.on_invalid == "skip")
    report: dict[str, Any] = {
        "input": str(opts.input), "output": str(opts.output), "model_id": opts.model, "backend": scorer.name,
        "kind": "cross-encoder", "rows": rows, "rows_invalid": invalid, "pairs_distinct": len(distinct),
        "queries": len(per_query),
        "cache": {"used": exists, "expected_hits": hits, "pairs_to_score": len(misses)},
        "long_documents": len(long), "windows": windows, "pairs_truncated": len(cuts) - len(long),
        "pair_scorings": calls,
        "tokens_to_compute": sum(min(c, scorer.max_length) for c in counts) + (windows - len(long)) * scorer.max_length,
        ("requests" if scorer.remote else "model_calls"): math.ceil(calls / size) if calls else 0,
        "output_rows": kept, "rerank": opts.rerank, "eta_seconds": 0.0, "eta_basis": "nothing to compute",
    }
    if pairs:
        order = sorted(range(len(pairs)), key=lambda i: -counts[i])[:: max(1, len(pairs) // SAMPLE)][:SAMPLE]
        sample = [pairs[i] for i in order]
        scorer.score(sample[:2], [counts[i] for i in order[:2]])  # warm-up: the load is not a per-pair cost
        started = time.perf_counter()
        step = len(sample) if scorer.remote else 8  # batches of alike lengths, as the job's (see plan_embed)
        for g in range(0, len(sample), step):
            scorer.score(sample[g:g + step], [counts[i] for i in order[g:g + step]])
        per_pair = (time.perf_counter() - started) / len(sample)
        report["eta_seconds"] = round(scorer.load_seconds + per_pair * len(pairs), 1)
        report["eta_basis"] = (f"{len(sample)} of the pairs to score timed on {scorer.name} ({per_pair * 1000:.2f} ms a "
                               f"pair, windows included), plus model load {scorer.load_seconds:.1f} s")
    return report
