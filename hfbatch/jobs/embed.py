"""run_embed(): one embed job, from input file to Parquet + sidecar.

    reader -> validate -> cache lookup -> embed misses -> cache store -> writer

Chunks pass every stage in order; the next chunk is read and validated in a background thread
while the model works, so at most three chunks are in memory and memory stays flat. Inside a chunk each
distinct text is embedded once, in batches of texts with similar token counts (little padding),
and vectors are put back in row order. Nothing reaches the output path unless the whole job
succeeds; every vector computed is in the cache as soon as its chunk is done, so a rerun after a
failure or a kill resumes where it stopped.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from ..backends import Backend, make_backend
from ..cache import EmbeddingCache, NullCache, open_cache
from ..errors import BackendError, InputError, TooManyErrors
from ..io.readers import Reader, open_reader
from ..monitoring import ChunkLog, prometheus_text, write_prometheus
from .core import prefetch
from ..io.plan import open_job_files
from ..io.writers import ParquetSink, output_schema
from ..options import EmbedOptions
from ..progress import NullProgress, ProgressReporter
from ..provenance import Metrics, file_digest, library_versions, redact, relative_paths, utc_now
from ..settings import Settings
from ..validate import EMBED_COLUMNS, ValidatedChunk, validate_chunk


@dataclass
class EmbedResult:
    """What a finished job produced: the output paths and the sidecar document."""

    output: Path
    sidecar: Path
    document: dict[str, Any]

    @property
    def metrics(self) -> dict[str, Any]:
        return self.document["metrics"]


def embed_file(options: EmbedOptions, *, progress: ProgressReporter | None = None, settings: Settings | None = None) -> EmbedResult:
    """The library entry point: same job, same results as `hfbatch embed`."""
    return run_embed(options, progress=progress, settings=settings)


def run_embed(options: EmbedOptions, *, progress: ProgressReporter | None = None, settings: Settings | None = None) -> EmbedResult:
    """Run one embed job. Raises InputError (exit 2) before any work, other HfbatchErrors (exit 1) after."""
    metrics = Metrics()
    started = utc_now()
    progress = progress or NullProgress()
    opts = options.resolved(settings or Settings.load())
    assert opts.text_column and opts.model and opts.chunk_size and opts.batch_size  # filled by resolved()

    # Everything that can be checked without a model is checked here, before any work.
    files = open_job_files(input=opts.input, output=opts.output, fmt=opts.format, chunk_size=opts.chunk_size,
                           text_column=opts.text_column, keep=opts.keep, added_columns=EMBED_COLUMNS,
                           extra_outputs=(("--metrics-file", opts.metrics_file), ("--log-file", opts.log_file)),
                           max_line_bytes=opts.max_line_bytes)  # type: ignore[arg-type]  # an int once resolved
    reader, passthrough = files.reader, files.passthrough
    try:
        log = ChunkLog(opts.log_file)
    except OSError as exc:
        raise InputError(f"--log-file {opts.log_file}: cannot open it ({exc.strerror or exc}); choose another path.") from None

    backend = make_backend(opts)
    cache = (
        open_cache(opts.cache_dir, backend.fingerprint(), size_limit_bytes=opts.cache_size_bytes or 0)  # type: ignore[arg-type]
        if opts.use_cache
        else NullCache()
    )
    job = _Job(opts, reader, backend, cache, metrics, progress, passthrough)
    sink: ParquetSink | None = None
    labels = {"input": opts.input.name, "output": opts.output.name, "model": opts.model, "backend": backend.name}
    progress.start(reader.total_rows)
    try:
        def read_and_validate() -> Iterator[ValidatedChunk]:
            # runs ahead in a background thread (prefetch): chunk N+1 is read and checked while
            # the model works on chunk N
            for chunk in metrics.timed("read", reader.chunks()):
                with metrics.stage("validate"):
                    # row checks only; token counts follow the cache lookup (a warm rerun needs no tokenizer)
                    validated = validate_chunk(chunk, path=opts.input, text_column=opts.text_column, on_invalid=opts.on_invalid)
                yield validated  # outside the timer: waiting for the consumer is no stage's time

        for validated in prefetch(read_and_validate(), depth=1):
            chunk = validated.chunk
            metrics.chunks += 1
            metrics.rows_total += chunk.batch.num_rows
            out = job.process(validated)
            if opts.max_errors is not None and metrics.rows_invalid > opts.max_errors:
                first = next((f"row {chunk.first_row + i + 1}: {e}" for i, e in enumerate(validated.errors) if e), "")
                raise TooManyErrors(
                    f"{opts.input}: more than --max-errors {opts.max_errors} rows are invalid ({metrics.rows_invalid} so far; "
                    f"in this chunk {first}); nothing was written. Fix the input, or raise --max-errors."
                )
            with metrics.stage("write"):
                if sink is None:
                    sink = ParquetSink(opts.output, output_schema(passthrough, job.dim()))
                sink.write(out)
                metrics.rows_written += out.num_rows
            log.write("chunk", chunk=metrics.chunks, first_row=chunk.first_row, rows=chunk.batch.num_rows,
                      rows_done=metrics.rows_total, texts_computed=metrics.texts_computed,
                      cache_hits=cache.stats.hits, cache_misses=cache.stats.misses)
        if sink is None:  # an input with no rows still gets a (valid, empty) output
            sink = ParquetSink(opts.output, output_schema(passthrough, job.dim()))
        # one document, the same in the Parquet metadata, the sidecar and --json
        document = _document(opts, reader, backend, cache, metrics, started, file_digest(opts.input), job.dim())
        if opts.relative_paths:
            document = relative_paths(document, opts.output.parent)
        sink.commit(document, sidecar=opts.sidecar)
    except BaseException as exc:
        if sink is not None:
            sink.abort()
        try:  # report the failure; trouble doing so must not hide the job's own error
            log.write("failed", error=type(exc).__name__, rows_done=metrics.rows_total)
            if opts.metrics_file:  # a cron job's failure must show up too
                write_prometheus(opts.metrics_file, prometheus_text(None, success=False, labels=labels, error=type(exc).__name__))
        except OSError as report_exc:
            logging.getLogger(__name__).warning("could not write the monitoring files: %s", report_exc)
        finally:
            log.close()
        raise
    finally:
        progress.finish()
        cache.close()
    # the output is published: trouble with the monitoring files from here on is a warning, not a failed job
    try:
        log.write("done", rows=metrics.rows_total, rows_written=metrics.rows_written, wall_seconds=document["metrics"]["wall_seconds"])
        if opts.metrics_file:
            write_prometheus(opts.metrics_file, prometheus_text(document, success=True, labels=labels))
    except OSError as exc:
        logging.getLogger(__name__).warning("the output is complete, but a monitoring file could not be written: %s", exc)
    finally:
        log.close()
    return EmbedResult(opts.output, opts.sidecar, document)


class _Job:
    """The per-chunk work of one job: dedupe, cache, embed in length-sorted batches, assemble."""

    def __init__(self, opts: EmbedOptions, reader: Reader, backend: Backend, cache: EmbeddingCache | NullCache,
                 metrics: Metrics, progress: ProgressReporter, passthrough: pa.Schema):
        self.opts, self.reader, self.backend, self.cache = opts, reader, backend, cache
        self.metrics, self.progress, self.passthrough = metrics, progress, passthrough
        self._dim: int | None = None  # the backend's own: config files or a vector it made, never the cache's word
        self._hit_dim: int | None = None  # size of hits the cache checked against its own record
        self._out_dim: int | None = None  # the size this job's output was started with

    def dim(self) -> int:
        """The output's dimension. A fully cached job takes it from hits (checked against the
        cache's record) rather than load the model; should the model later disagree (a planted
        record), the job fails once, its stores having put the record right for the rerun."""
        if self._out_dim is None:
            self._out_dim = self._dim or known_dimension(self.backend) or self._hit_dim or self.backend.dimension()
        if self._dim is not None and self._dim != self._out_dim:
            raise BackendError(
                f"the cache at {self.cache.directory} held {self._out_dim}-dimensional vectors for this model, which makes "
                f"{self._dim}-dimensional ones; those entries are now replaced or refused: run the job again."
            )
        return self._out_dim

    def process(self, v: ValidatedChunk) -> pa.RecordBatch:
        m = self.metrics
        n = len(v.texts)
        valid = v.valid_rows
        invalid_rows = n - len(valid)
        m.rows_invalid += invalid_rows

        # identical texts in a chunk are looked up and embedded once
        unique: dict[str, int] = {}
        row_to_unique = np.full(n, -1, dtype=np.int64)
        for i in valid:
            row_to_unique[i] = unique.setdefault(v.texts[i], len(unique))  # type: ignore[arg-type]
        texts = list(unique)
        rows_per_text = np.bincount(row_to_unique[row_to_unique >= 0], minlength=len(texts))
        m.texts_unique += len(texts)

        with m.stage("cache"):
            fingerprint = self.backend.fingerprint()
            # hits must have the model's size, known before the first lookup when the backend can
            # tell it without loading (else the cache checks them against the size it recorded)
            self._dim = self._dim or known_dimension(self.backend)
            found = self.cache.lookup(texts, self._dim, fingerprint)
            known_tokens = self.cache.lookup_tokens([texts[u] for u in found], fingerprint) if found else {}
        if found and self._dim is None:
            self._hit_dim = len(next(iter(found.values())))
        hit_rate = self.cache.stats.hit_rate
        self.progress.advance(invalid_rows + int(sum(rows_per_text[u] for u in found)), hit_rate=hit_rate)

        # token counts: from the cache for hits, from the model's tokenizer for the rest
        tokens = np.zeros(len(texts), dtype=np.int64)
        hits = list(found)
        for j, count in known_tokens.items():
            tokens[hits[j]] = count
        uncounted = [u for u in range(len(texts)) if u not in found] + [hits[j] for j in range(len(hits)) if j not in known_tokens]
        if uncounted:
            with m.stage("validate"):
                for u, count in zip(uncounted, self.backend.token_counts([texts[u] for u in uncounted])):
                    tokens[u] = count
        max_length = self.backend.max_length
        for i in valid:
            full = int(tokens[row_to_unique[i]])
            v.n_tokens[i] = min(full, max_length)
            v.truncated[i] = full > max_length
        m.rows_truncated += sum(1 for t in v.truncated if t)

        misses = [u for u in range(len(texts)) if u not in found]
        computed = self._embed(misses, texts, tokens, rows_per_text) if misses else {}
        # hits accepted on the cache's record, which the vectors just computed contradict: recompute
        wrong = [u for u, vec in found.items() if self._dim is not None and len(vec) != self._dim]
        if wrong:
            self.cache.stats.unhit(len(wrong))
            for u in wrong:
                del found[u]
            computed.update(self._embed(wrong, texts, tokens, np.zeros_like(rows_per_text)))  # rows already counted
        vectors = np.zeros((len(texts), self.dim()), dtype=np.float32)
        for u, vec in {**found, **computed}.items():
            vectors[u] = vec
        m.rows_embedded += len(valid)
        return self._assemble(v, row_to_unique, vectors)

    def _embed(self, misses: list[int], texts: list[str], tokens: np.ndarray, rows_per_text: np.ndarray) -> dict[int, np.ndarray]:
        """Embed the missing texts longest first (see plan_batches), so padding stays small."""
        m = self.metrics
        seen = np.minimum(tokens, self.backend.max_length)  # the model reads at most max_length tokens
        order = sorted(misses, key=lambda u: -seen[u])
        # a remote backend wants enough texts per call to keep all its connections busy
        size = getattr(self.backend, "batch_texts", None) or self.opts.batch_size or 32
        out: dict[int, np.ndarray] = {}
        for batch in plan_batches([int(seen[u]) for u in order], size, self.opts.max_batch_tokens):
            batch = [order[i] for i in batch]
            load_before = getattr(self.backend, "load_seconds", 0.0)
            with m.stage("embed"):
                result = self.backend.embed([texts[u] for u in batch])
            loaded = getattr(self.backend, "load_seconds", 0.0) - load_before
            if loaded > 0:  # the first batch also loaded the model: book that time separately
                m.stage_seconds["embed"] -= loaded
                m.stage_seconds["model_load"] += loaded
            expected = (len(batch), self._dim or (result.shape[1] if result.ndim == 2 else -1))
            if result.ndim != 2 or result.shape != expected:
                raise BackendError(
                    f"backend {self.backend.name} returned vectors of shape {result.shape} for {len(batch)} texts "
                    f"(expected {expected}); nothing was written."
                )
            if not np.isfinite(result).all():
                raise BackendError(f"backend {self.backend.name} returned NaN or infinite values; nothing was written.")
            self._dim = result.shape[1]
            for u, vec in zip(batch, result):
                out[u] = vec
            with m.stage("cache"):
                # stored batch by batch, under the fingerprint of the backend that made them: under
                # --backend auto that can change between two batches of a chunk
                self.cache.store([texts[u] for u in batch], result, self.backend.fingerprint(),
                                 token_counts=[int(tokens[u]) for u in batch])
            m.batches += 1
            m.texts_computed += len(batch)
            m.tokens_computed += int(seen[batch].sum())  # what the model read
            self.progress.advance(int(rows_per_text[batch].sum()), hit_rate=self.cache.stats.hit_rate)
        return out

    def _assemble(self, v: ValidatedChunk, row_to_unique: np.ndarray, vectors: np.ndarray) -> pa.RecordBatch:
        """The output rows of one chunk, in input order (invalid rows dropped under --on-invalid skip)."""
        keep_rows = np.arange(len(v.texts))
        if self.opts.on_invalid == "skip":
            keep_rows = keep_rows[row_to_unique >= 0]
            self.metrics.rows_skipped += len(v.texts) - len(keep_rows)
        dim = self.dim()
        idx = row_to_unique[keep_rows]
        valid_mask = idx >= 0
        flat = np.zeros((len(keep_rows), dim), dtype=np.float32)
        flat[valid_mask] = vectors[idx[valid_mask]]
        embedding = pa.FixedSizeListArray.from_arrays(
            pa.array(flat.reshape(-1), type=pa.float32()), dim, mask=pa.array(~valid_mask)
        )
        base = v.chunk.batch.select(self.passthrough.names)
        if len(keep_rows) != len(v.texts):
            base = base.take(pa.array(keep_rows))
        rows = keep_rows.tolist()
        columns = list(base.columns) + [
            embedding,
            pa.array([v.n_tokens[i] for i in rows], type=pa.int32()),
            pa.array([v.truncated[i] for i in rows], type=pa.bool_()),
            pa.array([v.errors[i] for i in rows], type=pa.string()),
        ]
        return pa.RecordBatch.from_arrays(columns, schema=output_schema(self.passthrough, dim))


def known_dimension(backend: Backend) -> int | None:
    """The backend's dimension when it costs no model load and no request (a local model's config
    files), else None. Not part of the Backend protocol: remote backends cannot know it for free."""
    probe = getattr(backend, "known_dimension", None)
    return probe() if callable(probe) else None


def plan_batches(lengths: list[int], batch_size: int, max_batch_tokens: int | None) -> list[list[int]]:
    """Split positions of `lengths` (sorted longest first) into model calls.

    Without a token budget: `batch_size` texts a call. With one, a batch grows while
    (texts x its longest text) -- what the padded tensor holds -- stays within the budget, so
    short texts go in large batches and long ones in small; `batch_size` is then not a limit.
    A text longer than the budget goes alone.
    """
    if not max_batch_tokens:
        return [list(range(i, min(i + batch_size, len(lengths)))) for i in range(0, len(lengths), batch_size)]
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i, n in enumerate(lengths):
        longest_if_added = max(longest, n)
        if current and longest_if_added * (len(current) + 1) > max_batch_tokens:
            batches.append(current)
            current, longest_if_added = [], n
        current.append(i)
        longest = longest_if_added
    if current:
        batches.append(current)
    return batches


def _document(opts: EmbedOptions, reader: Reader, backend: Backend, cache: EmbeddingCache | NullCache,
              metrics: Metrics, started: str, input_hash: str, dim: int) -> dict[str, Any]:
    """The sidecar: provenance (what produced the vectors) and metrics (what it cost)."""
    described = backend.describe()
    backends = described.pop("backends", None) or {backend.name: {"texts_computed": metrics.texts_computed, **described}}
    api = {
        "requests": sum(int(b.get("requests", 0)) for b in backends.values()),
        "retries": sum(int(b.get("retries", 0)) for b in backends.values()),
        "fallbacks": int(bool(described.get("fell_back"))),
    }
    stats = cache.stats
    cache_info = {
        "enabled": not isinstance(cache, NullCache) and cache.disabled is None,
        "disabled": cache.disabled,  # why a cache that was asked for did not work (the job ran without it)
        "directory": str(cache.directory) if cache.directory else None,
        "hits": stats.hits,
        "misses": stats.misses,
        "hit_rate": round(stats.hit_rate, 4),
        "stores": stats.stores,
        "rejected": stats.rejected,
        "volume_bytes": cache.volume_bytes(),
    }
    provenance = {
        "tool": "hfbatch",
        "tool_version": library_versions()["hfbatch"],
        "command": redact(list(opts.command) or sys.argv),
        "model_id": opts.model,
        "revision": described.get("revision"),
        "model_source": described.get("model_source"),
        "fingerprint": backend.fingerprint(),
        "backend": backend.name,
        "backends": backends,
        "fallback": {k: described.get(k) for k in ("fell_back", "fallback_reason", "canary_min_cosine")}
        if backend.name == "auto" else None,
        "device": described.get("device"),
        "dim": dim,
        "normalize": opts.normalize,
        "max_length": backend.max_length,
        "text_column": opts.text_column,
        "on_invalid": opts.on_invalid,
        "input": {
            "path": str(opts.input),
            "format": reader.format,
            "bytes": opts.input.stat().st_size,
            "hash": input_hash,
            "rows": metrics.rows_total,
        },
        "output": {"path": str(opts.output), "rows": metrics.rows_written},
        "started": started,
        "finished": utc_now(),
        "libraries": library_versions(),
    }
    return {"provenance": provenance, "metrics": metrics.as_dict(cache_info, described, api)}
