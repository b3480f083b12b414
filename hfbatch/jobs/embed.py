"""run_embed(): one embed job, from input file to Parquet + sidecar, as a Task on the chunk core.

The embed task measures texts with the model's tokenizer (counts are cached beside the vectors,
so a warm rerun needs no tokenizer), embeds misses through the Backend, keeps vectors in the
cache as raw float32, and adds `embedding`, `n_tokens`, `truncated` and `embedding_error`.

Cache values are checked against the model's dimension before they can reach an output: known
before the first lookup when the backend can tell it without loading (a local model's config
files), else the dimension the cache recorded; a hit that the first vectors the model makes
contradict is computed again (`recheck`), and a job whose output was already started with the
wrong size fails once (its stores having put the record right for the rerun).

Without a tokenizer (token_source "server usage": an OpenAI-compatible server on a served model
name) no text has a count of its own: the server reports tokens per request, and truncates at a
limit not known here. Then the tokens a batch computed are the change in the backend's summed
usage, n_tokens and truncated are written null, the cache is given the count it ignores
(UNKNOWN_TOKENS: a later run with a tokenizer counts those texts itself), the provenance's
max_length is null, and --max-batch-tokens (a budget of counts) is refused.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import pyarrow as pa

from ..backends import Backend, make_backend
from ..backends.remote import SERVER_USAGE, UNKNOWN_MAX_LENGTH
from ..backends.windows import Windows
from ..errors import BackendError, InputError
from ..io.columns import EMBED_COLUMNS
from ..io.sidecars import is_sidecar_name, sidecar_path
from ..io.stores import location
from ..io.writers import VECTOR_TYPES, output_schema
from ..monitoring import Observer
from ..options import EmbedOptions
from ..settings import Settings
from ..vectors import CALIBRATED, l2_normalize, output_width, quantization_ranges, quantize, truncate_dims
from ..cache import NullCache, open_cache
from .core import Cache, JobResult, Sampler, run_job, sampler, window_fields


log = logging.getLogger(__name__)

# a prompt leaving fewer tokens than this for the text is warned about (none left: refused)
MIN_TEXT_TOKENS = 16
_WARNED_PROMPTS: set[tuple[str | None, str, int]] = set()

# a count not known here (token_source "server usage"): what the cache is given, and ignores on lookup
UNKNOWN_TOKENS = -1


class Embedded(NamedTuple):
    """One text's result: its vector (full size, float32, as cached) and its untruncated token
    count (UNKNOWN_TOKENS: none known); `whole`: the mean of a text's windows (--aggregate),
    which no model call truncated."""

    vector: np.ndarray
    count: int
    whole: bool = False


def embed_columns(opts: EmbedOptions) -> tuple[str, ...]:
    """The columns an embed job adds after the input's (--split adds its window columns)."""
    mode = split_mode(opts)
    return (*(f.name for f in window_fields(mode)), *EMBED_COLUMNS)


def split_mode(opts: EmbedOptions) -> str | None:
    if opts.split is None:
        return None
    return "mean" if opts.aggregate == "mean" else "rows"


def join_parts(opts: EmbedOptions, directory: Path | None) -> Any:
    """A sync's input of many parts, as one (its deletes and its one commit need every part's ids)."""
    from ..io.parts import joined_parts

    return joined_parts(opts.input, opts.format, chunk_size=opts.chunk_size or 10_000,
                        max_line_bytes=opts.max_line_bytes, directory=directory,  # type: ignore[arg-type]
                        same_type=(opts.id_column,) if opts.id_column else ())


class EmbedResult(JobResult):
    """What a finished embed job produced: the output paths and the sidecar document."""


def run_embed(options: EmbedOptions, *, backend: Backend | None = None, observer: Observer | None = None,
              settings: Settings | None = None) -> EmbedResult:
    """Run one embed job with `backend` (default: the one the options name, made lazily).
    Raises InputError (exit 2) before any work, other HfbatchErrors (exit 1) after."""
    from ..io.targets import parse_target
    from .sync import sync_hooks

    table = parse_target(options.output).is_table or str(options.output).lower().startswith("delta://")
    changes = location(options.changes) if options.changes is not None else None
    opts, document = run_job(options, embed_columns(options), lambda o: embed_task(backend or make_backend(o), o),
                             observer=observer, settings=settings, sync_for=sync_hooks, table=table,
                             extra_outputs=(("--changes", changes), ("--changes sidecar", sidecar_path(changes)))
                             if changes is not None else (),
                             join_parts=join_parts if options.id_column is not None else None)
    return EmbedResult(opts.output, opts.sidecar, document)


MIN_CALIBRATION_VECTORS = 10  # fewer cannot give a range per dimension (one vector: every value in one bucket)


def calibrate_ranges(options: EmbedOptions, inputs: Sequence[Any], *, backend: Backend | None = None,
                     settings: Settings | None = None) -> tuple[list[list[float]], dict[str, Any]]:
    """The int8/uint8 ranges of a job whose parts must all share them (engines settle them once,
    before any part runs): the first --calibration-size vectors of `inputs` (the job's parts, in
    order; a part without usable texts is passed over), or --calibration's. The sample's vectors
    go to the cache, where the job then finds them."""
    opts = options.resolved(settings or Settings.load())
    task = embed_task(backend or make_backend(opts), opts)
    cache: Cache = open_cache(opts.cache_dir, task.backend.fingerprint(),  # type: ignore[arg-type]
                              size_limit_bytes=opts.cache_size_bytes or 0) if opts.use_cache else NullCache()
    one = sampler(task, opts, cache)
    used: list[str] = []

    def across_parts(k: int, path: Any = None) -> list[Any]:
        if path is not None:
            return one(k, path)
        values: list[Any] = []
        for part in inputs:
            try:
                got = one(k - len(values), part)
            except InputError:  # this part's columns or data: the next part may serve
                continue
            values += got
            used.append(str(part)) if got else None
            if len(values) >= k:
                break
        return values

    def rows_across_parts(n: int, path: Any = None) -> int:
        if path is not None:
            return one.valid_rows(n, path)
        found = 0
        for part in inputs:
            try:
                found += one.valid_rows(n - found, part)
            except InputError:
                continue
            if found >= n:
                break
        return found

    across_parts.metrics = one.metrics  # type: ignore[attr-defined]
    across_parts.valid_rows = rows_across_parts  # type: ignore[attr-defined]
    try:
        task.calibrate(across_parts)
    finally:
        cache.close()
    assert task.ranges is not None
    record = dict(task.calibration or {})
    if record.get("source") == "job":
        record["source"] = "job: " + ", ".join(used[:3]) + (f" and {len(used) - 3} more parts" if len(used) > 3 else "")
    return task.ranges.tolist(), record


def embed_task(backend: Backend, opts: EmbedOptions) -> "EmbedTask":
    """The embed task for what `backend` makes (its kind): EmbedTask for dense vectors, SparseTask
    (jobs/sparse.py) for a SparseEncoder's."""
    if backend.kind == "sparse":
        from .sparse import SparseTask

        return SparseTask(backend, opts)
    if backend.kind == "multivector":
        from .multivector import MultiVectorTask

        return MultiVectorTask(backend, opts)
    return EmbedTask(backend, opts)


def refuse_for_kind(backend: Backend, opts: EmbedOptions, *, why: str, precisions: Sequence[str],
                    tables: Sequence[str], aggregate: bool = True) -> None:
    """One line (InputError, before any work) for what a dense vector's options or targets mean
    that another kind's values cannot take: --truncate-dim, other precisions, int8 ranges,
    --index, --aggregate, a table kind that cannot hold the column."""
    from ..io.targets import parse_target

    target = parse_target(opts.output, kind=opts.target).kind
    asked = [flag for flag, given in (
        ("--truncate-dim", opts.truncate_dim is not None),
        (f"--output-precision {opts.output_precision}", opts.output_precision not in precisions),
        ("--calibration", opts.calibration is not None),
        ("--index", opts.index),
        ("--aggregate", opts.aggregate is not None and not aggregate),
        (f"-o a {target} table", target not in ("parquet", *tables))) if given]
    if asked:
        raise InputError(f"{', '.join(asked)}: {backend.model_id} is a {backend.kind} model ({why}). "
                         f"It writes --output-precision {' or '.join(precisions)}, into Parquet"
                         f"{''.join(', ' + t for t in tables)} outputs.")


class EmbedTask:
    """The embed job on the chunk core. A value is (vector, untruncated token count)."""

    job = "embed"

    def __init__(self, backend: Backend, opts: EmbedOptions):
        self.backend, self.opts = backend, opts
        self.added_columns = embed_columns(opts)
        self._window_counts: dict[str, int] = {}  # window text -> its tokens, from the last split
        self.split_mode = split_mode(opts)
        self.ranges: np.ndarray | None = np.asarray(opts.ranges, dtype=np.float32) if opts.ranges is not None else None
        self.calibration: dict[str, Any] | None = dict(opts.calibration_record or {}) or None
        sparse_only = [flag for flag, given in (("--sparse-top-k", opts.sparse_top_k is not None),
                                                ("--sparse-vocab", opts.sparse_vocab)) if given]
        if sparse_only and backend.kind != "sparse":  # never accepted and ignored
            raise InputError(f"{' and '.join(sparse_only)}: {backend.model_id} is a {backend.kind} model; these shape a "
                             "sparse model's vectors (a SparseEncoder, SPLADE). Drop them.")
        if opts.prompt_name is not None:
            _ = backend.prompt  # an unknown --prompt-name is a usage error now, before the job starts
        self._prompt_checked = False
        if opts.prompt or opts.prompt_name is not None:  # asked for: judged now (the model's own default: in prepare)
            self.check_prompt()
        if opts.max_batch_tokens is not None and self.server_counted:  # files only: no request
            raise InputError(
                f"--max-batch-tokens {opts.max_batch_tokens} budgets batches by each text's tokens, and there is no "
                f"tokenizer for {backend.model_id} (a served model name; the server counts tokens per request, only "
                "once it has embedded them): pass --tokenizer with a hub id or local directory of the served model's "
                "tokenizer, or drop --max-batch-tokens (--api-batch-size bounds each request).")
        if opts.split_tokens is not None and opts.split_tokens > backend.max_length:  # config files: no model load
            raise InputError(f"--split tokens:{opts.split_tokens} is more than {backend.model_id} reads "
                             f"({backend.max_length} tokens); use --split tokens:{backend.max_length} or less.")
        self._dim: int | None = None  # the backend's own: config files or a vector it made, never the cache's word
        self._hit_dim: int | None = None  # size of hits the cache checked against its own record
        self._out_dim: int | None = None  # the size this job's output was started with
        self._cache_dir: Any = None  # where the hits came from, for the message when they were wrong
        if opts.truncate_dim is not None:  # config files: no model load (else checked once a vector is made)
            self.check_truncate_dim(backend.known_dimension())
        if self.ranges is None and opts.calibration is not None and is_sidecar(Path(opts.calibration)):
            expect = {"model_id": backend.model_id, "normalize": opts.normalize, "prompt": backend.prompt,
                      "truncate_dim": opts.truncate_dim}
            self.ranges, self.calibration = read_ranges(Path(opts.calibration), self.out_dim_hint(), expect)  # before it starts

    def check_prompt(self) -> None:
        """A prompt that leaves the model no token of the text is refused (every vector would be
        the prompt's alone); one that leaves fewer than MIN_TEXT_TOKENS is warned about. Judged
        once, by the model's own tokenizer, before any text is embedded."""
        if self._prompt_checked:
            return
        self._prompt_checked = True
        backend, opts = self.backend, self.opts
        if not backend.prompt or self.server_counted:  # no prompt, or no tokenizer to count it with
            return
        taken, limit = backend.token_counts([""])[0], backend.max_length  # the prompt with the specials
        room = limit - taken
        named, fix = "--prompt", "use a shorter prompt"
        if not opts.prompt and opts.prompt_name is not None:
            named = f"--prompt-name {opts.prompt_name}"
        elif not opts.prompt:
            named = f"{backend.model_id}'s default prompt (config_sentence_transformers.json)"
            fix = "give a shorter one with --prompt TEXT, or turn it off with --prompt ''"
        if room < 1:
            raise InputError(f"{named} is {taken} tokens with the model's special tokens, and {backend.model_id} reads "
                             f"{limit} tokens in all: no token of any text would be read; {fix}.")
        if room < MIN_TEXT_TOKENS and (backend.prompt, backend.model_id, limit) not in _WARNED_PROMPTS:
            _WARNED_PROMPTS.add((backend.prompt, backend.model_id, limit))  # once a process, not once a part or actor
            log.warning("%s is %d tokens with the model's special tokens, leaving %d of the %d that %s reads for each "
                        "text: longer texts are truncated; use a shorter prompt.", named, taken, room, limit,
                        backend.model_id)

    def check_truncate_dim(self, dim: int | None) -> None:
        """--truncate-dim above the model's dimension is a usage error, found where the dimension
        is first known (config files, else the first vectors), before anything is written."""
        wanted = self.opts.truncate_dim
        if dim is not None and wanted is not None and wanted > dim:
            raise InputError(f"--truncate-dim {wanted} is more than the {dim} dimensions {self.backend.model_id} makes; "
                             f"use --truncate-dim {dim} or less (or drop it to keep them all).")

    @property
    def batch_texts(self) -> int:
        # a remote backend wants enough texts per call to keep all its connections busy
        return self.backend.batch_texts or self.opts.batch_size or 32

    @property
    def max_batch_tokens(self) -> int | None:
        return self.opts.max_batch_tokens

    @property
    def server_counted(self) -> bool:
        """Tokens are counted by the server, per request (token_source "server usage"): no text has
        a count or a truncated flag of its own. Asked each time: under --backend auto the side that
        makes the vectors can change."""
        return self.backend.token_source == SERVER_USAGE

    def setup_seconds(self) -> dict[str, float]:
        return self.backend.setup_seconds()

    def watch(self, note: Callable[[str], None]) -> None:
        self.backend.watch(note)

    def dim(self) -> int:
        """The output's dimension. A fully cached job takes it from hits (checked against the
        cache's record) rather than load the model; should the model later disagree (a planted
        record), the job fails once, its stores having put the record right for the rerun."""
        if self._out_dim is None:
            self._out_dim = self._dim or self.backend.known_dimension() or self._hit_dim or self.backend.dimension()
            self.check_truncate_dim(self._out_dim)
        if self._dim is not None and self._dim != self._out_dim:
            raise BackendError(
                f"the cache at {self._cache_dir} held {self._out_dim}-dimensional vectors for this model, which makes "
                f"{self._dim}-dimensional ones; those entries are now replaced or refused: run the job again."
            )
        return self._out_dim

    def lookup(self, cache: Cache, texts: Sequence[str]) -> dict[int, Any]:
        fingerprint, self._cache_dir = self.backend.fingerprint(), cache.directory
        # hits must have the model's size, known before the first lookup when the backend can
        # tell it without loading (else the cache checks them against the size it recorded)
        self._dim = self._dim or self.backend.known_dimension()
        found = cache.lookup(texts, self._dim, fingerprint)
        if not found:
            return {}
        if self._dim is None:
            self._hit_dim = len(next(iter(found.values())))
        hits = list(found)
        tokens = cache.lookup_tokens([texts[u] for u in hits], fingerprint)
        uncounted = [u for j, u in enumerate(hits) if j not in tokens]  # entries stored without a count
        if uncounted and self.server_counted:  # the tokenizer's 0 is no count
            counted = dict.fromkeys(uncounted, UNKNOWN_TOKENS)
        else:
            counted = dict(zip(uncounted, self.backend.token_counts([texts[u] for u in uncounted]))) if uncounted else {}
        return {u: Embedded(found[u], tokens[j] if j in tokens else counted[u]) for j, u in enumerate(hits)}

    def prepare(self, texts: Sequence[str]) -> tuple[list[Any], list[int]]:
        if self.server_counted:  # counted by the server once embedded (no --split, no --max-batch-tokens here)
            return [(t, UNKNOWN_TOKENS) for t in texts], [0] * len(texts)
        self.check_prompt()  # the model's default prompt: judged before its first text is embedded
        # a window's count is known from cutting it (split): only other texts go to the tokenizer
        fresh = [t for t in texts if t not in self._window_counts]
        counted = dict(zip(fresh, self.backend.token_counts(fresh))) if fresh else {}
        counts = [int(self._window_counts[t] if t in self._window_counts else counted[t]) for t in texts]
        max_length = self.backend.max_length  # the model reads at most max_length tokens
        return list(zip(texts, counts)), [min(c, max_length) for c in counts]

    def compute(self, items: Sequence[Any]) -> tuple[list[Any], int]:
        texts, counts = zip(*items) if items else ((), ())
        # the server's counts are per request: the tokens of this batch are what its requests added
        server = self.server_counted
        before = self.backend.usage["prompt_tokens"] if server else 0  # type: ignore[attr-defined]
        result = self.backend.embed(list(texts))
        expected = (len(texts), self._dim or (result.shape[1] if result.ndim == 2 else -1))
        if result.ndim != 2 or result.shape != expected:
            raise BackendError(
                f"backend {self.backend.name} returned vectors of shape {result.shape} for {len(texts)} texts "
                f"(expected {expected}); nothing was written."
            )
        if not np.isfinite(result).all():
            raise BackendError(f"backend {self.backend.name} returned NaN or infinite values; nothing was written.")
        self._dim = result.shape[1]
        if server:  # (a request whose answer carried no usage adds none)
            computed = self.backend.usage["prompt_tokens"] - before  # type: ignore[attr-defined]
            return [Embedded(v, UNKNOWN_TOKENS) for v in result], max(0, computed)
        max_length = self.backend.max_length
        return [Embedded(v, c) for v, c in zip(result, counts)], sum(min(c, max_length) for c in counts)

    def store(self, cache: Cache, texts: Sequence[str], values: Sequence[Any]) -> None:
        # under the fingerprint of the backend that made them: under --backend auto that can
        # change between two batches of a chunk
        cache.store(texts, np.stack([value.vector for value in values]), self.backend.fingerprint(),
                    token_counts=[value.count for value in values])

    def recheck(self, cache: Cache, found: dict[int, Any]) -> list[int]:
        # hits accepted on the cache's record, which the vectors just computed contradict
        wrong = [u for u, value in found.items() if self._dim is not None and len(value.vector) != self._dim]
        if wrong:
            cache.stats.unhit(len(wrong))
        return wrong

    def truncated(self, values: Sequence[Any]) -> list[bool]:
        if values and self.server_counted:  # the server truncates at its own limit: none is known to be cut
            return [False] * len(values)
        max_length = self.backend.max_length if values else 0
        return [value.count > max_length and not value.whole for value in values]

    # --- long texts -----------------------------------------------------------------------------

    def split(self, texts: Sequence[str]) -> list[Windows]:
        cut = self.backend.split(texts, self.opts.split_tokens or 0, self.opts.window_overlap)
        # the tokens of each window as the model reads it, for `prepare` (this chunk's windows only)
        self._window_counts = {text[w.char_start:w.char_end]: w.n_tokens for text, ws in zip(texts, cut) for w in ws.spans}
        return cut

    def combine(self, values: Sequence[Any], tokens: int) -> Any:
        """The mean of the windows' vectors, renormalised under --normalize; the whole text's tokens."""
        mean = np.mean(np.stack([value.vector for value in values]), axis=0, dtype=np.float64).astype(np.float32)
        return Embedded(l2_normalize(mean) if self.opts.normalize else mean, tokens, True)

    # --- what is written ------------------------------------------------------------------------

    def calibrate(self, sample: Sampler) -> None:
        """int8/uint8 ranges, fixed before the first row is written: given (an earlier run's, or
        every part's from the job's first), read from --calibration's sidecar, or taken from the
        first --calibration-size vectors of --calibration's texts or of the job itself."""
        opts = self.opts
        if opts.output_precision not in CALIBRATED or self.ranges is not None:
            return
        path = Path(opts.calibration) if opts.calibration is not None else None  # (a sidecar was read in __init__)
        needed = max(min(MIN_CALIBRATION_VECTORS, opts.calibration_size), 2)
        # too few texts is a usage error: found before any model work (a window is a value, a row at least one)
        def too_few(found: int) -> InputError:
            return InputError(
                f"{path or opts.input} has {found} valid text{'s' if found != 1 else ''} to take "
                f"--output-precision {opts.output_precision} ranges from; ranges need at least {MIN_CALIBRATION_VECTORS} "
                "vectors (from fewer, most values fall in one bucket): give --calibration FILE with more texts (or an "
                "earlier run's .meta.json), or --calibration-size 10 or more.")

        if self.split_mode is None and (rows := sample.valid_rows(needed, path)) < needed:
            raise too_few(rows)
        values = sample(opts.calibration_size, path)
        if len(values) < needed:
            raise too_few(len(values))
        ranges = quantization_ranges(self.finish(np.stack([value.vector for value in values])))
        flat = int((ranges[1] <= ranges[0]).sum())
        if flat:
            raise InputError(f"the {len(values)} calibration vectors of {path or opts.input} do not vary in {flat} of "
                             f"{ranges.shape[1]} dimensions, so int8/uint8 would put every value of those in one bucket; "
                             "calibrate on more (and more varied) texts with --calibration FILE.")
        self.ranges = ranges
        self.calibration = {"source": str(path) if path else "job", "vectors": len(values),
                            "texts_computed": sample.metrics.texts_computed}  # type: ignore[attr-defined]

    def out_dim_hint(self) -> int | None:
        """The output's float width (before packing) when known without a model call."""
        full = self._dim or self.backend.known_dimension()
        if full is None:
            return self.opts.truncate_dim
        return output_dim(full, self.opts.truncate_dim)

    def finish(self, vectors: np.ndarray) -> np.ndarray:
        """Full cached vectors -> what the output holds before quantizing: --truncate-dim (renormalised)."""
        if self.opts.truncate_dim is None:
            return vectors
        self.check_truncate_dim(vectors.shape[-1])
        return truncate_dims(vectors, self.opts.truncate_dim, normalize=self.opts.normalize)

    def float_dim(self) -> int:
        return output_dim(self.dim(), self.opts.truncate_dim)

    def schema(self, passthrough: pa.Schema) -> pa.Schema:
        precision = self.opts.output_precision
        return output_schema(passthrough, output_width(self.float_dim(), precision), precision)

    def columns(self, values: Sequence[Any], rows: np.ndarray, errors: Sequence[str | None]) -> list[pa.Array]:
        dim, precision = self.dim(), self.opts.output_precision
        vectors = np.zeros((len(values), dim), dtype=np.float32)
        for u, value in enumerate(values):
            vectors[u] = value.vector
        counts = np.array([value.count for value in values], dtype=np.int64)
        whole = np.array([value.whole for value in values], dtype=bool)
        valid = rows >= 0
        if precision in CALIBRATED and self.ranges is None:
            raise BackendError(f"--output-precision {precision} has no ranges (the job was not calibrated); nothing was written.")
        stored = quantize(self.finish(vectors), precision, self.ranges)
        width = stored.shape[1] if stored.ndim == 2 else output_width(self.float_dim(), precision)
        flat = np.zeros((len(rows), width), dtype=stored.dtype)
        flat[valid] = stored[rows[valid]]
        full = np.zeros(len(rows), dtype=np.int64)
        full[valid] = counts[rows[valid]]
        read_all = np.zeros(len(rows), dtype=bool)
        read_all[valid] = whole[rows[valid]]
        max_length = self.backend.max_length if valid.any() else 0
        # no count known (UNKNOWN_TOKENS), or none that says what the model read: the server's counts
        # are per request and its limit is not known here (even a tokenizer's count from the cache)
        unknown = ~valid | (full < 0) | (bool(valid.any()) and self.server_counted)
        return [
            pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), type=VECTOR_TYPES[precision]), width,
                                              mask=pa.array(~valid)),
            pa.array(np.where(read_all, full, np.minimum(full, max_length)), type=pa.int32(), mask=unknown),
            pa.array((full > max_length) & ~read_all, type=pa.bool_(), mask=unknown),
            pa.array(errors, type=pa.string()),
        ]

    def provenance(self) -> dict[str, Any]:
        return embed_provenance(self.backend, self.opts, self.dim(), ranges=self.ranges, calibration=self.calibration)


def is_sidecar(path: Path) -> bool:
    """Whether --calibration names an earlier run's sidecar (a JSON document with a provenance),
    rather than a file of texts (CSV, JSONL -- also named .json -- or Parquet)."""
    if is_sidecar_name(path.name):
        return True
    if path.suffix.lower() != ".json":
        return False
    try:
        with open(path, "rb") as handle:
            head = handle.read(1 << 16).lstrip()
        return head.startswith(b"{") and b'"provenance"' in head and b"\n{" not in head
    except OSError:
        return False


def read_ranges(path: Path, dim: int | None, expect: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """int8/uint8 ranges from an earlier run's sidecar (its provenance.vectors.ranges), refused
    unless they are real ranges (finite, each minimum below its maximum) of vectors like this
    job's (`expect`: model_id, normalize, prompt, truncate_dim)."""
    def not_sidecar(why: str) -> InputError:
        return InputError(f"--calibration {path}: not an hfbatch sidecar ({why}); give the .meta.json of a run with "
                          "--output-precision int8 or uint8, or a file of texts.")

    def member(parent: Any, key: str, where: str) -> dict[str, Any]:
        value = parent.get(key) if isinstance(parent, dict) else None
        if not isinstance(value, dict):
            raise not_sidecar(f"{where}{key} is {'missing' if value is None else type(value).__name__}, not an object")
        return value

    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise not_sidecar(f"{type(exc).__name__}: {exc}") from None
    except RecursionError:
        raise not_sidecar("JSON nested too deep to read") from None
    if not isinstance(document, dict):
        raise not_sidecar(f"a JSON {type(document).__name__}, not an object")
    provenance = member(document, "provenance", "")
    output = member(provenance, "vectors", "provenance.")
    try:
        ranges = np.asarray(output["ranges"], dtype=np.float32) if output.get("ranges") is not None else None
    except (ValueError, TypeError) as exc:
        raise not_sidecar(f"provenance.vectors.ranges is not numbers ({type(exc).__name__})") from None
    if ranges is None:
        raise InputError(f"--calibration {path}: that run wrote {output.get('precision') or 'float32'} vectors and has no "
                         "ranges; give the .meta.json of a run with --output-precision int8 or uint8, or a file of texts.")
    if ranges.ndim != 2 or ranges.shape[0] != 2:
        raise InputError(f"--calibration {path}: its ranges are not two rows (minimums, maximums); the sidecar is damaged.")
    if dim is not None and ranges.shape[1] != dim:
        raise InputError(f"--calibration {path}: its ranges are for {ranges.shape[-1]}-dimensional vectors, this job "
                         f"writes {dim}; use a sidecar of the same model and --truncate-dim.")
    if not np.isfinite(ranges).all() or (ranges[1] <= ranges[0]).any():
        raise InputError(f"--calibration {path}: its ranges are not finite minimums below their maximums in every "
                         "dimension; the sidecar was edited or damaged.")
    differ = [k for k, v in (expect or {}).items()
              if (output.get(k) if k == "truncate_dim" else provenance.get(k)) != v]
    if differ:
        raise InputError(f"--calibration {path}: that run's vectors differ from this job's ({', '.join(differ)} "
                         "not the same), so its ranges are not theirs; calibrate with a run of the same options.")
    record = output.get("calibration")
    return ranges, {"source": str(path), "vectors": record.get("vectors") if isinstance(record, dict) else None}


def output_dim(dim: int, truncate_dim: int | None) -> int:
    """Dimensions the output keeps of the model's `dim` (a --truncate-dim above it is refused by
    EmbedTask.check_truncate_dim; here it would keep all)."""
    return min(dim, truncate_dim) if truncate_dim else dim


def embed_provenance(backend: Backend, opts: EmbedOptions, dim: int, *, ranges: np.ndarray | None = None,
                     calibration: dict[str, Any] | None = None) -> dict[str, Any]:
    """What an embed sidecar records beside the shared provenance (build_document's `details`)."""
    described = backend.describe() if backend.name in ("auto", "local") else {}
    out_dim = output_dim(dim, opts.truncate_dim)
    # UNKNOWN_MAX_LENGTH is what a backend counting by the server's usage answers (its limit is not
    # known here); asked of max_length, which the Ray engine's reported backend also has
    max_length = backend.max_length
    record = {
        "fallback": {k: described.get(k) for k in ("fell_back", "fallback_reason", "canary_min_cosine")}
        if backend.name == "auto" else None,
        "dim": dim,
        "normalize": opts.normalize,
        "max_length": None if max_length == UNKNOWN_MAX_LENGTH else max_length,
        "text_column": opts.text_column,
        "prompt": backend.prompt,
        "prompt_name": opts.prompt_name or (backend.describe().get("prompt_name") if backend.prompt else None),
        "split": {"tokens": opts.split_tokens, "overlap": opts.window_overlap, "aggregate": opts.aggregate}
        if opts.split else None,
        # what the embedding column holds: the first `dim` dimensions, stored at `precision`
        "vectors": {"dim": out_dim, "truncate_dim": opts.truncate_dim, "precision": opts.output_precision,
                   "values_per_vector": output_width(out_dim, opts.output_precision),
                   "ranges": ranges.tolist() if ranges is not None else None, "calibration": calibration},
    }
    if backend.kind == "multivector":  # a matrix a row: its token vectors' dim, stored at `precision`
        record["vectors"] = {"kind": "multivector", "dim": dim or None, "precision": opts.output_precision,
                             "side": described.get("side"), "per": "token"}
    if backend.kind == "sparse":  # weights over the vocabulary: no width, no normalising, no quantising
        record["normalize"] = False
        record["vectors"] = {"kind": "sparse", "dim": dim or None, "top_k": opts.sparse_top_k,
                             "vocab": opts.sparse_vocab, "precision": "float32", "side": described.get("side")}
    return record




class PackedTask(EmbedTask):
    """What the tasks of the other kinds (jobs/sparse.py, jobs/multivector.py) share: their values
    kept in the cache as bytes of their own layout (`pack`, and `unpack`, which refuses a damaged
    or planted entry: it is computed again), each with its text's token count; nothing to
    calibrate for the whole job."""

    @staticmethod
    def pack(value: Any, count: int) -> bytes:
        raise NotImplementedError

    @staticmethod
    def unpack(raw: bytes, dim: int | None) -> tuple[Any, int] | None:
        raise NotImplementedError

    def lookup(self, cache: Cache, texts: Sequence[str]) -> dict[int, Any]:
        self._cache_dir = cache.directory
        out: dict[int, Any] = {}
        for u, raw in cache.lookup_bytes(texts, self.backend.fingerprint()).items():
            got = self.unpack(raw, self.backend.known_dimension())
            if got is None:
                cache.stats.rejected += 1
                cache.stats.unhit(1)
                continue
            out[u] = Embedded(got[0], got[1])
        return out

    def store(self, cache: Cache, texts: Sequence[str], values: Sequence[Any]) -> None:
        cache.store_bytes(texts, [self.pack(value.vector, value.count) for value in values], self.backend.fingerprint())

    def calibrate(self, sample: Sampler) -> None:
        return None
