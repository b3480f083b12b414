"""The chunk core that every job plugs into: embed and generate are Tasks on it.

    reader -> validate -> distinct texts -> cache lookup -> misses in ordered batches -> cache store
           -> back to row order -> assemble -> ParquetSink (atomic) -> sidecar

`run_task()` drives one job: chunks are read and validated a chunk ahead in a background thread
(`prefetch`), each goes through `ChunkProcessor.process()` and is written before the next is
taken, so memory stays flat. Nothing reaches the output path unless the whole job succeeds and
every row read was written (or dropped on purpose by --on-invalid skip); every result computed
is in the cache as soon as its batch is done, so a rerun after a failure or a kill resumes where
it stopped. The job reports only to its Observer.

A `Task` says what is particular to a job: how a text is measured (token count, truncation),
how a batch of misses is computed, how results are kept in and read back from the cache, which
columns it adds and what its provenance records. Engines that run chunks elsewhere (Ray actors)
use `ChunkProcessor` on its own.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence, TypeVar

import numpy as np
import pyarrow as pa

from ..cache import EmbeddingCache, NullCache, open_cache
from ..errors import InputError, OutputError, TooManyErrors
from ..io.parts import is_multi_input
from ..io.plan import JobFiles, open_job_files
from ..io.readers import Reader, open_reader, spooled_input
from ..io.stores import location
from ..io.writers import ParquetSink
from ..monitoring import NullObserver, Observer, watch
from ..options import JobOptions
from ..provenance import InputFacts, Metrics, OutputFacts, build_document, utc_now
from ..settings import Settings
from ..backends.windows import Window, Windows
from ..validate import ValidatedChunk

Cache = EmbeddingCache | NullCache
O = TypeVar("O", bound=JobOptions)


class Task(Protocol):
    """What a job plugs into the core. Values are a task's own results per distinct text (embed:
    a vector and its token count; generate: the completion and its counts)."""

    job: str  # "embed" | "generate": the document's job, and the stage its model work is booked to
    backend: Any  # the backend or generator: name, model_id, fingerprint(), describe(); lazy
    added_columns: Sequence[str]  # the columns the task writes after the input's

    @property
    def batch_texts(self) -> int:
        """Texts per model call (without a token budget)."""
        ...

    @property
    def max_batch_tokens(self) -> int | None:
        """Token budget per model call (texts x longest), or None."""
        ...

    def setup_seconds(self) -> dict[str, float]:
        """Seconds the backend has spent so far on one-time work, by stage (measure, export,
        check, model_load): booked to those stages instead of the model's."""
        ...

    def watch(self, note: Callable[[str], None]) -> None:
        """Hand the backend a way to say what slow one-time work it is doing (the progress bar)."""
        ...

    def lookup(self, cache: Cache, texts: Sequence[str]) -> dict[int, Any]:
        """Index in `texts` -> value, for the texts the cache has; one batched read per chunk."""
        ...

    def prepare(self, texts: Sequence[str]) -> tuple[list[Any], list[int]]:
        """Per text: what `compute` takes (token counts, truncated prompts) and the tokens the model reads."""
        ...

    def compute(self, items: Sequence[Any]) -> tuple[list[Any], int]:
        """One model call: the values of `items`, in order, and the tokens the model computed."""
        ...

    def store(self, cache: Cache, texts: Sequence[str], values: Sequence[Any]) -> None:
        """Keep one batch's values in the cache (one transaction)."""
        ...

    def recheck(self, cache: Cache, found: dict[int, Any]) -> list[int]:
        """Hits that the values just computed show to be wrong (to compute again)."""
        ...

    def truncated(self, values: Sequence[Any]) -> list[bool]:
        """For each value, whether the model saw only part of its text."""
        ...

    def schema(self, passthrough: pa.Schema) -> pa.Schema:
        """The output schema: the passed-through input columns, then the task's."""
        ...

    def columns(self, values: Sequence[Any], rows: np.ndarray, errors: Sequence[str | None]) -> list[pa.Array]:
        """The task's columns for output rows whose values are `values[rows[i]]` (-1: an invalid row)."""
        ...

    def provenance(self) -> dict[str, Any]:
        """What only this job records in the sidecar's provenance."""
        ...

    # long texts (--split): None, "rows" (one output row per window) or "mean" (one per input row)
    split_mode: str | None

    def split(self, texts: Sequence[str]) -> list[Windows]:
        """Each text's windows (only called when `split_mode` is set)."""
        ...

    def combine(self, values: Sequence[Any], tokens: int) -> Any:
        """One value for an input row from its windows' values (`split_mode` "mean"); `tokens`: the whole text's."""
        ...

    def calibrate(self, sample: "Sampler") -> None:
        """Before the first chunk: settle what must be fixed for the whole job from its first results
        (embed: the int8/uint8 ranges). `sample(k, path=None)` gives the first k result values."""
        ...


class Sampler(Protocol):
    """`sample(k, path=None)`: the first k result values of the job's input (or of the file of
    texts `path`); `sample.valid_rows(n, path=None)`: how many valid rows the first n of them are,
    read and checked without computing anything (a usage error is found before any model work)."""

    metrics: Metrics

    def __call__(self, k: int, path: Path | None = None) -> list[Any]: ...

    def valid_rows(self, n: int, path: Path | None = None) -> int: ...


def window_fields(mode: str | None) -> list[pa.Field]:
    """The columns --split adds after the input's: per window, or per input row with --aggregate."""
    if mode == "rows":
        return [pa.field("parent_row", pa.int64()), pa.field("chunk_index", pa.int32()), pa.field("n_chunks", pa.int32()),
                pa.field("char_start", pa.int64()), pa.field("char_end", pa.int64())]
    if mode == "mean":
        return [pa.field("n_chunks", pa.int32())]
    return []


@dataclass
class _Units:
    """What a chunk's values are computed for: its input rows, or with --split one unit per window
    (an invalid row stays one unit). `parents[j]`: the chunk row unit j belongs to."""

    texts: list[str | None]
    parents: np.ndarray
    errors: list[str | None]
    spans: list[tuple[int, Window] | None] | None = None  # per unit: (index, window), None for an invalid row
    windows: dict[int, Windows] | None = None  # chunk row -> its windows

    @property
    def weights(self) -> np.ndarray:
        """Share of an input row each unit is (1/n for n windows), for the progress bar."""
        if self.windows is None:
            return np.ones(len(self.texts))
        return np.array([1.0 / len(self.windows[int(p)].spans) if t is not None else 1.0
                         for t, p in zip(self.texts, self.parents)])


@dataclass
class JobResult:
    """What a finished job produced: the output paths and the sidecar document."""

    output: Path
    sidecar: Path
    document: dict[str, Any]

    @property
    def metrics(self) -> dict[str, Any]:
        return self.document["metrics"]


class ChunkProcessor:
    """The work on one validated chunk: distinct texts, one cache lookup, misses computed in
    length-sorted batches and stored batch by batch, results put back in row order, the output
    rows assembled. Counts into `metrics`, reports progress to `observer`."""

    def __init__(self, task: Task, cache: Cache, metrics: Metrics, observer: Observer | None = None, *,
                 passthrough: pa.Schema, on_invalid: str, text_column: str = "text"):
        self.task, self.cache, self.metrics = task, cache, metrics
        self.text_column = text_column  # where a window's own text goes (--split)
        self.observer = observer or NullObserver()
        self.passthrough, self.on_invalid = passthrough, on_invalid
        self._progress = 0.0  # rows done but not yet reported (windows are fractions of a row)

    def schema(self) -> pa.Schema:
        """The output schema: the passed-through columns, the window columns, the task's."""
        return self.task.schema(pa.schema(list(self.passthrough) + window_fields(self.task.split_mode)))

    def process(self, v: ValidatedChunk) -> pa.RecordBatch:
        return self.process_rows(v)[0]

    def process_rows(self, v: ValidatedChunk) -> tuple[pa.RecordBatch, np.ndarray]:
        """The chunk's output rows, and for each the chunk row it came from (with --split many
        output rows come from one input row)."""
        before = replace(self.cache.stats)
        try:
            units, row_to_unique, ordered = self._values(v)
            with self.metrics.stage("write"):  # building the output rows is the writer's work
                return self._assemble(v, units, row_to_unique, ordered)
        finally:
            self.metrics.add_cache(before, self.cache.stats)

    def values(self, v: ValidatedChunk) -> list[Any]:
        """The result value of each valid output row of the chunk, in order (what `process` would
        write for them), computed through the cache."""
        before = replace(self.cache.stats)
        try:
            units, row_to_unique, ordered = self._values(v)
        finally:
            self.metrics.add_cache(before, self.cache.stats)
        if self.task.split_mode == "mean":
            return self._combined(v, units, row_to_unique, ordered)[0]
        return [ordered[u] for u in row_to_unique if u >= 0]

    def _units(self, v: ValidatedChunk, valid: list[int]) -> _Units:
        if self.task.split_mode is None:
            return _Units(v.texts, np.arange(len(v.texts)), v.errors)
        with self.metrics.stage("validate"):  # tokenizer work, as token counts are
            # (a chunk without a valid text has nothing to cut: a tokenizer given no text can fail)
            windows = dict(zip(valid, self.task.split([v.texts[i] for i in valid]))) if valid else {}  # type: ignore[misc]
        texts: list[str | None] = []
        parents: list[int] = []
        errors: list[str | None] = []
        spans: list[tuple[int, Window] | None] = []
        for i, text in enumerate(v.texts):
            if i not in windows:
                texts.append(None), parents.append(i), errors.append(v.errors[i]), spans.append(None)
                continue
            for k, span in enumerate(windows[i].spans):
                texts.append(text[span.char_start:span.char_end])  # type: ignore[index]
                parents.append(i), errors.append(None), spans.append((k, span))
        self.metrics.windows += sum(len(w.spans) for w in windows.values())
        return _Units(texts, np.array(parents, dtype=np.int64), errors, spans, windows)

    def _values(self, v: ValidatedChunk) -> tuple[_Units, np.ndarray, list[Any]]:
        """Units of the chunk, each unit's index among the distinct texts (-1: invalid), and the
        distinct texts' values."""
        m, task = self.metrics, self.task
        valid = v.valid_rows
        invalid_rows = len(v.texts) - len(valid)
        m.rows_invalid += invalid_rows
        units = self._units(v, valid)

        # identical texts in a chunk are looked up and computed once
        unique: dict[str, int] = {}
        row_to_unique = np.full(len(units.texts), -1, dtype=np.int64)
        for j, text in enumerate(units.texts):
            if text is not None:
                row_to_unique[j] = unique.setdefault(text, len(unique))
        texts = list(unique)
        ok = row_to_unique >= 0
        rows_per_text = np.bincount(row_to_unique[ok], weights=units.weights[ok], minlength=len(texts))
        m.texts_unique += len(texts)

        with m.stage("cache"):
            found = task.lookup(self.cache, texts)
        self._advance(invalid_rows + float(sum(rows_per_text[u] for u in found)))

        values = self._compute([u for u in range(len(texts)) if u not in found], texts, rows_per_text)
        stale = task.recheck(self.cache, found)
        if stale:  # their rows were counted as done already
            for u in stale:
                del found[u]
            values.update(self._compute(stale, texts, np.zeros_like(rows_per_text)))
        values.update(found)
        ordered = [values[u] for u in range(len(texts))]
        m.rows_done += len(valid)
        if task.split_mode is None:  # a window is never truncated
            m.rows_truncated += int(sum(rows_per_text[u] for u, cut in enumerate(task.truncated(ordered)) if cut))
        return units, row_to_unique, ordered

    def _advance(self, rows: float) -> None:
        self._progress += rows
        whole = int(self._progress + 1e-6)
        self._progress -= whole
        self.observer.advance(whole, hit_rate=self.cache.stats.hit_rate)

    def _compute(self, indices: list[int], texts: list[str], rows_per_text: np.ndarray) -> dict[int, Any]:
        """Compute the texts at `indices` longest first (see plan_batches), so padding stays small;
        each batch is stored as soon as it is made."""
        m, task = self.metrics, self.task
        if not indices:
            return {}
        with m.stage("validate"):
            items, lengths = task.prepare([texts[u] for u in indices])
        order = sorted(range(len(indices)), key=lambda j: -lengths[j])
        out: dict[int, Any] = {}
        for batch in plan_batches([lengths[j] for j in order], task.batch_texts, task.max_batch_tokens):
            picked = [order[i] for i in batch]
            setup_before = task.setup_seconds()
            with m.stage(m.job):
                values, tokens = task.compute([items[j] for j in picked])
            # the first batch also measured, exported, checked or loaded: booked to those stages
            m.rebook(m.job, {k: v - setup_before.get(k, 0.0) for k, v in task.setup_seconds().items()})
            with m.stage("cache"):
                task.store(self.cache, [texts[indices[j]] for j in picked], values)
            m.batches += 1
            m.texts_computed += len(picked)
            m.tokens_computed += tokens
            for j, value in zip(picked, values):
                out[indices[j]] = value
            self._advance(float(sum(rows_per_text[indices[j]] for j in picked)))
        return out

    def _combined(self, v: ValidatedChunk, units: _Units, row_to_unique: np.ndarray,
                  values: list[Any]) -> tuple[list[Any], np.ndarray]:
        """--aggregate: one value per valid chunk row from its windows', and each chunk row's index
        into them (-1: invalid)."""
        members: dict[int, list[int]] = {}
        for j, parent in enumerate(units.parents):
            if row_to_unique[j] >= 0:
                members.setdefault(int(parent), []).append(int(row_to_unique[j]))
        combined, index = [], np.full(len(v.texts), -1, dtype=np.int64)
        assert units.windows is not None
        for i, us in members.items():
            index[i] = len(combined)
            combined.append(self.task.combine([values[u] for u in us], units.windows[i].tokens))
        return combined, index

    def _assemble(self, v: ValidatedChunk, units: _Units, row_to_unique: np.ndarray,
                  values: list[Any]) -> tuple[pa.RecordBatch, np.ndarray]:
        """The output rows of one chunk, in input order (invalid rows dropped under --on-invalid
        skip), and the chunk row each came from."""
        mode = self.task.split_mode
        if mode == "mean":  # one row per input row again
            values, row_to_unique = self._combined(v, units, row_to_unique, values)
            units = _Units(v.texts, np.arange(len(v.texts)), v.errors, windows=units.windows)
        keep = np.arange(len(units.texts))
        if self.on_invalid == "skip":
            keep = keep[row_to_unique >= 0]
        parents = units.parents[keep]
        kept_rows = len(np.unique(parents)) if mode == "rows" else len(keep)
        self.metrics.rows_skipped += len(v.texts) - kept_rows
        self.metrics.rows_added += len(keep) - kept_rows  # windows beyond an input row's first
        base = v.chunk.batch.select(self.passthrough.names)
        if len(keep) != len(v.texts) or mode == "rows":
            base = take_rows(base, parents)
        columns = list(base.columns)
        if mode == "rows":
            columns = self._window_texts(base, columns, units, keep)
        columns += self._window_columns(v, units, keep)
        added = self.task.columns(values, row_to_unique[keep], [units.errors[j] for j in keep])
        return pa.RecordBatch.from_arrays(columns + added, schema=self.schema()), parents

    def _window_texts(self, base: pa.RecordBatch, columns: list[pa.Array], units: _Units, keep: np.ndarray) -> list[pa.Array]:
        """With --split, a window's row carries the window's own text in the text column."""
        if self.text_column not in base.schema.names:
            return columns
        at = base.schema.names.index(self.text_column)
        original = columns[at].to_pylist()
        texts = [units.texts[j] if units.texts[j] is not None else original[n] for n, j in enumerate(keep)]
        columns[at] = pa.array(texts, type=base.schema.field(at).type)
        return columns

    def _window_columns(self, v: ValidatedChunk, units: _Units, keep: np.ndarray) -> list[pa.Array]:
        mode = self.task.split_mode
        if mode is None:
            return []
        windows = units.windows or {}
        n_chunks = pa.array([len(windows[int(p)].spans) if int(p) in windows else 0 for p in units.parents[keep]], pa.int32())
        if mode == "mean":
            return [n_chunks]
        spans = [units.spans[j] if units.spans else None for j in keep]
        numbers = v.chunk.row_numbers  # (a sync run's chunk holds only its changed rows)
        parent_rows = numbers[units.parents[keep]] if numbers is not None else units.parents[keep] + v.chunk.first_row
        return [
            pa.array(parent_rows, pa.int64()),
            pa.array([s[0] if s else None for s in spans], pa.int32()),
            n_chunks,
            pa.array([s[1].char_start if s else None for s in spans], pa.int64()),
            pa.array([s[1].char_end if s else None for s in spans], pa.int64()),
        ]


def take_rows(batch: pa.RecordBatch, rows: np.ndarray) -> pa.RecordBatch:
    """`batch.take(rows)`, also for columns of Arrow's view types (string_view, binary_view),
    which have no take kernel: taken as their plain large types and cast back."""
    try:
        return batch.take(pa.array(rows))
    except pa.ArrowNotImplementedError:
        plain = {pa.string_view(): pa.large_string(), pa.binary_view(): pa.large_binary()}
        columns = [c.cast(plain[c.type]).take(pa.array(rows)).cast(c.type) if c.type in plain else c.take(pa.array(rows))
                   for c in batch.columns]
        return pa.RecordBatch.from_arrays(columns, schema=batch.schema)


def open_files(opts: JobOptions, added_columns: Sequence[str], source: Path | None = None, *,
               table: bool = False, extra_outputs: Sequence[tuple[str, Any]] = ()) -> JobFiles:
    """Every check that needs no model: the input opened and its columns checked, the output, its
    sidecar and the monitoring paths planned and proved writable. `source` is the file to read when
    it is not `opts.input` itself (the spooled copy of a pipe); `table`: -o is a table target (a
    folder its library writes), planned by its sink. InputError (exit 2) before any work."""
    return open_job_files(input=source or opts.input, output=None if table else opts.output, fmt=opts.format,
                          chunk_size=opts.chunk_size or 10_000, text_column=opts.input_column, keep=opts.keep,
                          added_columns=added_columns,
                          extra_outputs=(("sidecar", opts.sidecar), ("--metrics-file", opts.metrics_file),
                                         ("--log-file", opts.log_file), *extra_outputs),
                          max_line_bytes=opts.max_line_bytes)  # type: ignore[arg-type]  # an int once resolved


def run_job(options: O, added_columns: Sequence[str], task_for: Callable[[O], Task], *, observer: Observer | None = None,
            settings: Settings | None = None,
            sync_for: Callable[[O, Task, Path, JobFiles], Sync | None] | None = None,
            table: bool = False, extra_outputs: Sequence[tuple[str, Any]] = (),
            join_parts: Callable[[O, Path | None], Any] | None = None) -> tuple[O, dict[str, Any]]:
    """Resolve `options`, make every check that needs no model, then run the task that `task_for`
    makes from the resolved options. Returns (resolved options, sidecar document). `sync_for`
    gives the hooks of a run that writes only what changed (None: the whole output); `join_parts`
    reads an input of many parts as one (io/parts.joined_parts), where the job needs them as one."""
    opts = options.resolved(settings or Settings.load())
    # a pipe or stdin is read once into a temp file beside the output, so every row is read
    # (and counted, and hashed); the copy goes when the job ends, however it ends
    beside = opts.output.parent if isinstance(opts.output, Path) and opts.output.parent.is_dir() else None
    joined = join_parts is not None and is_multi_input(opts.input)
    with (join_parts(opts, beside) if joined else spooled_input(opts.input, opts.format, directory=beside)) as source:
        files = open_files(opts, added_columns, source, table=table, extra_outputs=extra_outputs)
        task = task_for(opts)
        sync = sync_for(opts, task, source, files) if sync_for is not None else None
        try:
            return opts, run_task(task, opts, files, observer=observer, sync=sync)
        finally:
            if sync is not None:
                sync.close()


class Sync(Protocol):
    """A run that writes only what changed since the target's last run (jobs/sync.py's SyncRun)."""

    def passthrough(self, schema: pa.Schema) -> pa.Schema: ...

    def select(self, v: ValidatedChunk) -> ValidatedChunk: ...

    def open_sink(self, schema: pa.Schema) -> Any: ...

    def close(self) -> None: ...


def run_task(task: Task, opts: JobOptions, files: JobFiles, *, observer: Observer | None = None,
             sync: Sync | None = None) -> dict[str, Any]:
    """Run one job of `task` over the opened input; publish the output and its sidecar atomically
    and return the sidecar document. On any failure nothing is published, the observer is told,
    and the error is raised again. With `sync`, only the rows it selects are computed and written,
    into the sink it opens (a table target's, committed as one version)."""
    metrics = Metrics(job=task.job)
    started = utc_now()
    reader = files.reader
    observer = watch(observer, log_file=opts.log_file, metrics_file=opts.metrics_file,
                     labels={"input": opts.input.name, "output": opts.output.name, "model": str(opts.model),
                             "backend": task.backend.name})
    cache: Cache = NullCache()
    sink: Any = None
    passthrough = sync.passthrough(files.passthrough) if sync is not None else files.passthrough

    def open_sink(schema: pa.Schema) -> Any:
        return sync.open_sink(schema) if sync is not None else ParquetSink(opts.output, schema)

    observer.start(reader.total_rows)
    try:
        task.watch(observer.note)  # measuring the runtimes or exporting a model shows on the bar
        with metrics.stage("cache"):
            if opts.use_cache:  # the fingerprint may resolve the model: a model not found is a failed job
                cache = open_cache(opts.cache_dir, task.backend.fingerprint(), size_limit_bytes=opts.cache_size_bytes or 0)  # type: ignore[arg-type]
        processor = ChunkProcessor(task, cache, metrics, observer, passthrough=passthrough, on_invalid=opts.on_invalid,
                                   text_column=opts.input_column)
        sample = sampler(task, opts, cache, source=files.reader.local_path)  # a store's input: no second download
        task.calibrate(sample)
        metrics.add_work(sample.metrics)  # what the sample computed is this job's work (its rows are not)
        # chunks are read and validated one ahead, in a background thread, while the model works:
        # that thread's seconds are kept apart (they overlap the others); the wait for it is `read`
        ahead = Metrics(job=task.job)
        for validated in metrics.timed("read", prefetch(_validated(reader, opts, ahead), depth=1)):
            chunk = validated.chunk
            metrics.chunks += 1
            metrics.rows_total += chunk.batch.num_rows
            if sync is not None:
                validated = sync.select(validated)
                unchanged = chunk.batch.num_rows - validated.chunk.batch.num_rows
                metrics.rows_unchanged += unchanged
                observer.advance(unchanged, hit_rate=cache.stats.hit_rate)
                if not validated.texts:  # nothing in this chunk changed
                    observer.chunk(chunk.first_row, chunk.batch.num_rows, metrics)
                    continue
            out = processor.process(validated)
            check_max_errors(opts, metrics, validated)
            with metrics.stage("write"):
                if sink is None:
                    sink = open_sink(out.schema)
                sink.write(out)
                metrics.rows_written += out.num_rows
            observer.chunk(chunk.first_row, chunk.batch.num_rows, metrics)
        with metrics.stage("write"):
            if sink is None:  # an input with no rows still gets a (valid, empty) output
                sink = open_sink(processor.schema())
        metrics.background_seconds = {k: ahead.stage_seconds.get(k, 0.0) for k in ("read", "validate")}
        # the input's identity as taken before the first read, unchanged since (else InputChangedError:
        # nothing published, nothing recorded as done); first, as a replaced input also miscounts rows
        with metrics.stage("read"):
            facts = InputFacts.of(files.source, reader.format, metrics.rows_total, shown=opts.input,
                                  identity=files.identity)
        check_rows(opts, reader, metrics, sink)
        # one document, the same in the Parquet metadata, the sidecar and --json
        document = build_document(job=task.job, backend=task.backend, options=opts, metrics=metrics, started=started,
                                  input=facts,
                                  output=OutputFacts(opts.output, metrics.rows_written), cache=cache,
                                  details=task.provenance())
        sink.commit(document, sidecar=opts.sidecar)
    except BaseException as exc:
        if sink is not None:
            sink.abort()
        observer.failed(exc)
        raise
    finally:
        cache.close()
    observer.done(document)
    return document


def sampler(task: Task, opts: JobOptions, cache: Cache, *, source: Path | None = None) -> Sampler:
    """`sample(k, path=None)`: the first k result values of the job's input (`source`, else
    opts.input), or of another file of texts, computed through the job's cache (so the job itself
    then finds them there). Counted apart from the job's metrics, in `sample.metrics`."""
    metrics = Metrics(job=task.job)

    def read(path: Path | None) -> Reader:
        reader = open_reader(path or source or opts.input, fmt=None if path else opts.format, chunk_size=opts.chunk_size or 10_000,
                             columns=[opts.input_column], text_column=opts.input_column,
                             max_line_bytes=opts.max_line_bytes)  # type: ignore[arg-type]
        if opts.input_column not in reader.schema.names:
            raise InputError(f"{path or opts.input} has no column {opts.input_column!r} to take a sample of texts from; "
                             f"columns are: {', '.join(reader.all_columns[:20])}.")
        return reader

    def valid_rows(n: int, path: Path | None = None) -> int:
        found = 0
        for validated in _validated(read(path), replace(opts, input=location(path or opts.input)), metrics):
            found += len(validated.valid_rows)
            if found >= n:
                break
        return min(found, n)

    def sample(k: int, path: Path | None = None) -> list[Any]:
        reader = read(path)
        processor = ChunkProcessor(task, cache, metrics, passthrough=pa.schema([]), on_invalid="mark")
        values: list[Any] = []
        for validated in _validated(reader, replace(opts, input=location(path or opts.input)), metrics):
            # only the rows the sample needs are computed (each valid row gives at least one value)
            values += processor.values(_first_valid(validated, k - len(values)))
            if len(values) >= k:
                break
        return values[:k]

    sample.metrics = metrics  # type: ignore[attr-defined]
    sample.valid_rows = valid_rows  # type: ignore[attr-defined]
    return sample  # type: ignore[return-value]


def _first_valid(v: ValidatedChunk, n: int) -> ValidatedChunk:
    """The chunk cut after its n-th valid row."""
    valid = v.valid_rows
    if len(valid) <= n:
        return v
    end = valid[n - 1] + 1
    chunk = replace(v.chunk, batch=v.chunk.batch.slice(0, end))
    return ValidatedChunk(chunk, v.texts[:end], v.errors[:end], v.n_tokens[:end], v.truncated[:end])


def _validated(reader: Reader, opts: JobOptions, metrics: Metrics) -> Iterator[ValidatedChunk]:
    for chunk in metrics.timed("read", reader.chunks()):
        with metrics.stage("validate"):
            # row checks only; token counts follow the cache lookup (a warm rerun needs no tokenizer)
            validated = opts.validate(chunk)
        yield validated  # outside the timer: waiting for the consumer is no stage's time


def check_max_errors(opts: JobOptions, metrics: Metrics, validated: ValidatedChunk) -> None:
    """TooManyErrors (nothing written) once more rows than --max-errors are invalid."""
    if opts.max_errors is None or metrics.rows_invalid <= opts.max_errors:
        return
    first_row = validated.chunk.first_row
    first = next((f"row {first_row + i + 1}: {e}" for i, e in enumerate(validated.errors) if e), "")
    raise TooManyErrors(
        f"{opts.input}: more than --max-errors {opts.max_errors} rows are invalid ({metrics.rows_invalid} so far; "
        f"in this chunk {first}); nothing was written. Fix the input, or raise --max-errors."
    )


def check_rows(opts: JobOptions, reader: Reader, metrics: Metrics, sink: Any) -> None:
    """Rows in == rows out: every row the input has was read, and written, dropped on purpose
    (--on-invalid skip) or, in a sync run, found unchanged in the target. Anything else is a lost
    row, and nothing is published."""
    if reader.total_rows is not None and metrics.rows_total != reader.total_rows:
        raise OutputError(f"{opts.input}: {metrics.rows_total:,} rows were read of the {reader.total_rows:,} it has "
                          "(was it read by another process, or is it a pipe?); nothing was written.")
    if (metrics.rows_written + metrics.rows_skipped + metrics.rows_unchanged != metrics.rows_total + metrics.rows_added
            or sink.rows != metrics.rows_written):
        raise OutputError(f"{opts.input}: {metrics.rows_total:,} rows were read but {sink.rows:,} written "
                          f"({metrics.rows_skipped:,} skipped, {metrics.rows_added:,} added by --split); nothing was written.")


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


# --- read-ahead ---------------------------------------------------------------------------------
# prefetch(): run an iterator ahead in a background thread, a bounded number of items ahead.
# Reading and validating chunk N+1 then overlaps the model's work on chunk N: torch releases the
# GIL while it computes, so the two really run at once, and memory stays bounded: `depth` items
# queued, one being made, one being used.

_DONE = object()


T = TypeVar("T")


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc


def prefetch(items: Iterator[T], depth: int = 2) -> Iterator[T]:
    """Yield what `items` yields, in order; its exceptions are raised here, in the consumer."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(value: object) -> bool:
        while not stop.is_set():
            try:
                q.put(value, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return  # the consumer stopped early
            put(_DONE)
        except BaseException as exc:  # handed to the consumer, raised there
            put(_Failed(exc))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()  # a generator's own cleanup (open files) runs here, in its thread

    thread = threading.Thread(target=produce, name="hfbatch-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            value = q.get()
            if value is _DONE:
                return
            if isinstance(value, _Failed):
                raise value.exc
            yield value
    finally:
        # The producer stops at its next hand-over; a read already under way finishes first
        # (it cannot be interrupted), in a daemon thread, without anyone waiting for it.
        stop.set()
        thread.join(timeout=0.5)
