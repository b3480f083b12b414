"""Job options, as the library and the CLI both build them: JobOptions (what every job takes),
EmbedOptions and GenerateOptions. `resolved(settings)` is the one step that fills what was left
unset from Settings (environment, defaults) and refuses, as InputError (exit 2), every value that
can be judged without a file or a model.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence, TypeVar

from .backends.generation import GenerationParams
from .errors import InputError
from .io.plan import check_output_path
from .io.readers import detect_format, format_with_delimiter, parse_delimiter
from .io.sidecars import sidecar_path
from .io.stores import RemotePath, is_remote, location
from .settings import Settings, parse_byte_size
from .validate import ON_INVALID, validate_chunk, validate_pairs
from .vectors import CALIBRATED, OUTPUT_PRECISIONS

_Opts = TypeVar("_Opts", bound="JobOptions")
GENERATE_BACKENDS = ("local", "api", "hf-api")

# The one list of what makes an embed output what it is: the options a rerun must share with an
# earlier run to take its outputs as done (engines/parts.py's options key), and what verify reads
# back from a sidecar to rebuild the backend (tools/verify.py). Every other field of EmbedOptions
# (paths, batching, retries, logging, resources) is in NOT_OUTPUT_IDENTITY; a test holds every
# field to one of the two, so a new option is classified when it is added.
OUTPUT_IDENTITY = ("model", "text_column", "keep", "format", "normalize", "max_length", "precision", "runtime",
                   "quantize", "on_invalid", "backend", "endpoint", "fallback", "remote_pooling", "split", "overlap",
                   "aggregate", "prompt", "prompt_name", "truncate_dim", "output_precision", "calibration",
                   "calibration_size", "tokenizer", "kind", "sparse_top_k", "sparse_vocab")
NOT_OUTPUT_IDENTITY = (
    "input", "output", "delimiter",  # where (the delimiter is folded into `format` once resolved)
    "device", "trust_remote_code",  # how the same model is run
    "batch_size", "chunk_size", "max_batch_tokens", "api_concurrency", "api_timeout", "api_retries",
    "api_retry_ceiling", "api_batch_size",  # how fast
    "use_cache", "cache_dir", "cache_size_bytes", "max_errors", "max_line_bytes",  # cache and limits
    "relative_paths", "metrics_file", "log_file", "command", "sidecar_file",  # records
    "ranges", "calibration_record",  # settled from `calibration` by the engines, the same for every part
    # sync (jobs/sync.py): which rows a run writes into its target, not what their vectors are; the
    # target's own record holds its vector space
    "id_column", "target", "delete_missing", "max_delete_fraction", "rebuild", "changes", "index", "index_type",
    "lock_timeout", "commit_every",
)


def output_identity(opts: "EmbedOptions") -> dict[str, Any]:
    """The OUTPUT_IDENTITY values of `opts` as JSON holds them (paths and other values as text,
    the endpoint without user:password@: credentials are not identity, and this is written down)."""
    from .backends.http import public_url

    values: dict[str, Any] = {name: getattr(opts, name) for name in OUTPUT_IDENTITY}
    values["keep"] = list(values["keep"]) if values["keep"] is not None else None
    values["endpoint"] = public_url(values["endpoint"]) if values["endpoint"] else None
    return json.loads(json.dumps(values, default=str))


@dataclass(frozen=True)
class JobOptions:
    """Options every job has. None means "take it from Settings" (environment, defaults)."""

    input: Path
    output: Path
    keep: Sequence[str] | None = None
    format: str | None = None
    delimiter: str | None = None  # CSV: one character, or tab; None: comma (tab for .tsv). Folded into `format` once resolved
    model: str | None = None
    backend: str = "local"
    device: str | None = None
    precision: str = "fp32"
    trust_remote_code: bool = False  # run code that ships with a model (--trust-remote-code)
    batch_size: int | None = None
    chunk_size: int | None = None
    use_cache: bool | None = None
    cache_dir: Path | None = None
    cache_size_bytes: int | None = None
    on_invalid: str = "mark"
    max_errors: int | None = None  # stop (exit 1, nothing written) once more rows than this are invalid
    max_line_bytes: int | str | None = None  # longest JSONL line / CSV row: bytes or "64MiB"; None: from settings
    relative_paths: bool = False  # paths in the sidecar relative to the output's folder (for sharing)
    # remote backends
    endpoint: str | None = None
    api_concurrency: int = 4
    api_timeout: float | None = None
    api_retries: int = 5
    api_retry_ceiling: float = 300.0
    tokenizer: str | None = None  # counts tokens / truncates for remote backends (default: the model's own)
    # monitoring
    metrics_file: Path | None = None
    log_file: Path | None = None
    command: Sequence[str] = field(default_factory=tuple)
    sidecar_file: Path | None = None  # None: `<output>.meta.json`; many-part outputs put it under `_hfbatch/`

    @property
    def input_column(self) -> str:
        """The column the job reads its texts from."""
        raise NotImplementedError

    def validate(self, chunk: Any) -> Any:
        """Row checks only (validate.validate_chunk on input_column): a ValidatedChunk whose texts
        are the job's units; a job of another unit (score: a pair) says how it makes them."""
        return validate_chunk(chunk, path=self.input, text_column=self.input_column, on_invalid=self.on_invalid)

    @property
    def sidecar(self) -> Path | None:
        """Where the run's document goes: --sidecar-file, else `<output>.meta.json`; a database
        table's (postgresql://) has none beside it, so only where --sidecar-file names one."""
        if self.sidecar_file is not None:
            return location(self.sidecar_file)
        where = location(self.output)
        return sidecar_path(where) if isinstance(where, (Path, RemotePath)) else None

    def resolved(self: _Opts, settings: Settings) -> _Opts:
        """Fill unset options from settings and check the values that need no file or model."""
        opts = replace(self, **self._filled(settings))
        opts._check()
        return opts

    def _filled(self, settings: Settings) -> dict[str, Any]:
        """The values `resolved` replaces; a job's options add their own."""
        return dict(
            input=location(self.input),  # a store's URL stays one (Path would fold its //)
            output=location(self.output),
            # the readers take the format and the CSV delimiter as one value ("tsv", "csv:;")
            format=format_with_delimiter(self.format, self.delimiter, self.input),
            delimiter=None if self.delimiter is None else parse_delimiter(self.delimiter),
            device=self.device or settings.device,
            chunk_size=settings.chunk_size if self.chunk_size is None else self.chunk_size,
            use_cache=settings.cache_enabled if self.use_cache is None else self.use_cache,
            cache_dir=Path(self.cache_dir).expanduser() if self.cache_dir else settings.cache_dir,
            cache_size_bytes=self.cache_size_bytes or settings.cache_size_bytes,
            keep=list(dict.fromkeys(self.keep)) if self.keep is not None else None,  # --keep id,id: once
            api_timeout=self.api_timeout or settings.api_timeout,
            max_line_bytes=settings.max_line_bytes if self.max_line_bytes is None
            else parse_byte_size(self.max_line_bytes, "--max-line-bytes"),
            metrics_file=_local_file("--metrics-file", self.metrics_file),
            log_file=_local_file("--log-file", self.log_file),
        )

    def _check(self) -> None:
        if self.api_retries < 1:
            raise InputError(f"--api-retries must be at least 1 (got {self.api_retries}).")
        for name in ("batch_size", "chunk_size"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)}).")
        if self.on_invalid not in ON_INVALID:
            raise InputError(f"--on-invalid {self.on_invalid!r} is not one of: {', '.join(ON_INVALID)}.")
        if self.max_errors is not None and self.max_errors < 0:
            raise InputError(f"--max-errors must be 0 or more (got {self.max_errors}); 0 stops at the first invalid row.")
        self._check_output()

    def _check_output(self) -> None:
        check_output_path(self.input, self.output)


@dataclass(frozen=True)
class EmbedOptions(JobOptions):
    """Options of one `embed` job."""

    text_column: str | None = None
    max_length: int | None = None
    normalize: bool = True
    precision: str | None = None  # None: HFBATCH_PRECISION, else auto (measured here; see backends/selection.py)
    runtime: str | None = None  # None: HFBATCH_RUNTIME, else auto
    quantize: str | None = None  # None: int8 with ENABLE_MODEL_QUANTIZATION, else auto (int8 one of the candidates)
    max_batch_tokens: int | None = None
    # remote backends (hf-api, tei, openai) and --backend auto
    fallback: str = "hf-api"
    api_batch_size: int = 32
    remote_pooling: str | None = None
    # what is embedded and what is written (README "Long texts, prompts, smaller vectors")
    split: str | None = None  # "tokens:N": embed every window of N tokens instead of truncating
    overlap: int | None = None  # tokens consecutive windows share; None: N // 8
    aggregate: str | None = None  # "mean": one row per input row, the (renormalised) mean of its windows
    prompt: str | None = None  # prepended to every text; None: the model's default prompt, if it names one
    prompt_name: str | None = None  # a prompt from the model's config_sentence_transformers.json
    truncate_dim: int | None = None  # Matryoshka: the first D dimensions (renormalised with --normalize)
    output_precision: str | None = None  # None: the kind's default (float32; float16 for a multi-vector model)
    calibration: Path | None = None  # int8/uint8 ranges: an earlier run's sidecar, or a file of texts
    calibration_size: int = 1000  # vectors the int8/uint8 ranges are taken from
    # int8/uint8 ranges once known, and where they came from: a many-part job settles them once and
    # every part carries them (set by the engines, not by users)
    ranges: Sequence[Sequence[float]] | None = None
    calibration_record: dict[str, Any] | None = None
    # sync into a target by id (README "Keep an index in sync"; jobs/sync.py)
    id_column: str | None = None  # each row's key: only new and changed rows are embedded and written
    target: str | None = None  # the target's kind when -o alone cannot tell it (delta://); set by `resolved`
    delete_missing: bool = False  # delete the target's ids that the input no longer has
    max_delete_fraction: float = 0.5  # refuse a run that would delete more of the target than this
    rebuild: bool = False  # replace a target of another vector space (one new version)
    changes: Path | None = None  # also write the upserted rows and deleted ids to this Parquet file
    index: bool = False  # a Lance or Postgres target: build its vector index after the run (for `hfbatch search`)
    index_type: str | None = None  # a Postgres target's --index: hnsw (None) or ivfflat
    lock_timeout: float | None = None  # a Postgres target held by another run: give up after this (None: wait)
    commit_every: int | None = None  # a Postgres target: commit every this many rows (None: one transaction)
    # what kind of model (backends/kinds.py): None reads it from the model's files
    kind: str | None = None
    sparse_top_k: int | None = None  # a sparse model: keep each text's K largest values (None: all)
    sparse_vocab: bool = False  # a sparse model: write each index's token string beside it

    @property
    def input_column(self) -> str:
        return self.text_column or "text"

    @property
    def split_tokens(self) -> int | None:
        """N of --split tokens:N (None: texts are not split)."""
        if self.split is None:
            return None
        kind, _, size = str(self.split).partition(":")
        if kind != "tokens" or not size.isdigit() or int(size) < 2:
            raise InputError(f"--split {self.split!r} is not tokens:N with N >= 2 (e.g. --split tokens:256).")
        return int(size)

    @property
    def window_overlap(self) -> int:
        """Tokens consecutive windows share: --overlap, else N // 8."""
        if self.overlap is not None:
            return self.overlap
        return (self.split_tokens or 0) // 8

    def _filled(self, settings: Settings) -> dict[str, Any]:
        return dict(
            super()._filled(settings),
            text_column=self.text_column or settings.text_column,
            model=self.model or settings.model,
            batch_size=settings.batch_size if self.batch_size is None else self.batch_size,
            endpoint=self.endpoint or settings.endpoint,
            quantize=self.quantize if self.quantize is not None else ("int8" if settings.quantize else "auto"),
            precision=self.precision or settings.precision,
            runtime=self.runtime or settings.runtime,
            output_precision=self.output_precision or self._kind_precision(self.model or settings.model),
            **self._sync_filled(),
        )

    def _kind_precision(self, model: str | None) -> str:
        """--output-precision's default: float16 for a multi-vector model (a vector per token: the
        output is tens of times a dense one), float32 otherwise. The kind as backends/kinds.py
        reads it from a local model's files (a model not at hand: float32; the job says why later)."""
        if self.kind == "multivector":
            return "float16"
        if self.kind is None and self.backend == "local" and model:
            from .backends.hub import resolve_model_dir
            from .backends.kinds import model_kind

            try:
                root, _ = resolve_model_dir(model)
            except Exception:  # noqa: BLE001 - not at hand: the backend reports it where it always has
                return "float32"
            return "float16" if model_kind(root).kind == "multivector" else "float32"
        return "float32"

    def _sync_filled(self) -> dict[str, Any]:
        """-o delta://PATH names a Delta table by prefix (the path alone may not exist yet); --keep
        always carries the --id-column (the target's key)."""
        from .io.targets import DELTA_PREFIX
        from .io.targets.postgres import PgLocation, is_postgres_url

        filled: dict[str, Any] = {}
        given = str(self.output) if not isinstance(self.output, Path) else None
        if given is not None and given.lower().startswith(DELTA_PREFIX):
            filled.update(output=location(given[len(DELTA_PREFIX):] or "."), target="delta")
        if is_postgres_url(self.output):
            filled.update(output=self.output if isinstance(self.output, PgLocation) else PgLocation(str(self.output)),
                          target="postgres")
        for flag, value in (("the input", self.input), ("--changes", self.changes), ("--calibration", self.calibration)):
            if is_postgres_url(value):
                raise InputError(f"{flag}: a postgresql:// URL names a table to write (-o); {flag} is a file.")
        if self.id_column is not None and self.keep is not None and self.id_column not in self.keep:
            filled["keep"] = [self.id_column, *dict.fromkeys(self.keep)]
        if self.changes is not None:
            filled["changes"] = location(self.changes)
        return filled

    def _check_output(self) -> None:
        from .io.targets import parse_target

        spec = parse_target(self.output, kind=self.target)
        if not spec.is_table:
            super()._check_output()
        if self.max_delete_fraction < 0 or self.max_delete_fraction > 1:
            raise InputError(f"--max-delete-fraction is a fraction of the target, 0 to 1 (got {self.max_delete_fraction}).")
        if self.changes is not None and str(self.changes).lower().rsplit(".", 1)[-1] not in ("parquet", "pq"):
            raise InputError(f"--changes {self.changes}: the change file is Parquet; give it a .parquet name.")
        if self.index and (spec.kind not in ("lance", "postgres") or self.output_precision not in ("float32", "float16")):
            raise InputError("--index builds a Lance dataset's or a Postgres table's vector index (float32 or float16 "
                             f"vectors); -o {spec.given} with --output-precision {self.output_precision} is searched "
                             "exactly, without one.")
        if self.index_type is not None and (spec.kind != "postgres" or self.index_type not in ("hnsw", "ivfflat")):
            raise InputError(f"--index-type {self.index_type}: a Postgres target's --index is hnsw or ivfflat "
                             f"(-o {spec.given}{' is not a Postgres table' if spec.kind != 'postgres' else ''}).")
        if self.commit_every is not None and self.changes is not None:
            raise InputError("--changes with --commit-every: a run in parts commits rows before its change file is "
                             "written, so a rerun after a kill could not list them; give one of the two.")
        if self.commit_every is not None and (self.commit_every < 1 or spec.kind != "postgres"):
            raise InputError(f"--commit-every is rows per transaction (1 or more) for a run too large for one "
                             f"transaction into a Postgres target (got {self.commit_every} with -o {spec.given}).")
        if self.lock_timeout is not None and (self.lock_timeout < 0 or spec.kind != "postgres"):
            raise InputError(f"--lock-timeout is seconds (0 or more) to wait for another run on a Postgres target "
                             f"(got {self.lock_timeout:g} with -o {spec.given}).")
        if self.delete_missing and self.id_column is None:
            raise InputError("--delete-missing deletes the ids the input no longer has: give --id-column COL.")

    def _check(self) -> None:
        super()._check()
        if self.max_batch_tokens is not None and self.max_batch_tokens < 1:
            raise InputError(f"--max-batch-tokens must be at least 1 (got {self.max_batch_tokens}).")
        if self.max_length is not None and self.max_length < 2:
            raise InputError(f"--max-length must be at least 2 tokens (got {self.max_length}).")
        self._check_shaping()

    def _check_shaping(self) -> None:
        """--split, --aggregate, prompts, --truncate-dim and --output-precision: what can be judged without the model."""
        size = self.split_tokens
        if size is None and (self.overlap is not None or self.aggregate is not None):
            raise InputError(f"{'--overlap' if self.overlap is not None else '--aggregate'} needs --split tokens:N.")
        if self.overlap is not None and not 0 <= self.overlap < (size or 0):
            raise InputError(f"--overlap must be 0 or more and less than the window ({size} tokens); got {self.overlap}.")
        if self.aggregate is not None and self.aggregate != "mean":
            raise InputError(f"--aggregate {self.aggregate!r} is not supported; the one aggregate is mean.")
        if self.prompt is not None and self.prompt_name is not None:
            raise InputError("give --prompt TEXT or --prompt-name NAME, not both.")
        if self.kind is not None and self.kind not in ("dense", "sparse", "multivector"):
            raise InputError(f"--kind {self.kind!r} is not one of: dense, sparse, multivector.")
        if self.sparse_top_k is not None and self.sparse_top_k < 1:
            raise InputError(f"--sparse-top-k must be at least 1 (got {self.sparse_top_k}).")
        if self.truncate_dim is not None and self.truncate_dim < 1:
            raise InputError(f"--truncate-dim must be at least 1 (got {self.truncate_dim}).")
        if self.output_precision not in OUTPUT_PRECISIONS:
            raise InputError(f"--output-precision {self.output_precision!r} is not one of: {', '.join(OUTPUT_PRECISIONS)}.")
        if self.calibration is not None and self.output_precision not in CALIBRATED:
            raise InputError(f"--calibration sets the ranges of --output-precision {' or '.join(CALIBRATED)}; "
                             f"--output-precision {self.output_precision} has none.")
        if self.calibration_size < 1:
            raise InputError(f"--calibration-size must be at least 1 (got {self.calibration_size}).")
        if self.calibration is not None:
            self._check_calibration_file(Path(self.calibration))
        if self.calibration is not None and not str(self.calibration).endswith(".json"):
            try:
                detect_format(Path(self.calibration))
            except InputError:
                raise InputError(f"--calibration {self.calibration}: give an earlier run's .meta.json, or a file of "
                                 "texts named .csv, .tsv, .jsonl, .ndjson or .parquet (optionally .gz).") from None


    @staticmethod
    def _check_calibration_file(path: Path) -> None:
        """--calibration names a regular file this process can read (a device such as /dev/zero, a
        pipe or a directory is none: it would be read without end, or not at all)."""
        give = "give an earlier run's .meta.json, or a CSV/JSONL/Parquet file of texts"
        try:
            mode = path.stat().st_mode
        except FileNotFoundError:
            raise InputError(f"--calibration {path}: no such file ({give}).") from None
        except OSError as exc:
            raise InputError(f"--calibration {path}: cannot be read ({exc.strerror or type(exc).__name__}); {give}.") from None
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "a device, pipe or socket"
            raise InputError(f"--calibration {path}: not a regular file ({kind}); {give}.")
        if not os.access(path, os.R_OK):
            raise InputError(f"--calibration {path}: cannot be read (permission denied); {give}.")


@dataclass(frozen=True)
class GenerateOptions(JobOptions):
    """Options of one `generate` job: prompts in, completions out."""

    batch_size: int | None = 8  # prompts per generate call (left-padded); not EMBEDDING_BATCH_SIZE
    prompt_column: str = "prompt"
    params: GenerationParams = GenerationParams()

    @property
    def input_column(self) -> str:
        return self.prompt_column

    def _filled(self, settings: Settings) -> dict[str, Any]:
        filled = super()._filled(settings)
        # sampling without a seed gives another text each time: never cached
        filled["use_cache"] = filled["use_cache"] and self.params.deterministic
        filled["batch_size"] = 8 if self.batch_size is None else self.batch_size
        return filled

    def _check(self) -> None:
        if not self.model:
            raise InputError("generate needs --model (a hub id or a local directory of a causal LM, "
                             "e.g. --model HuggingFaceTB/SmolLM2-135M-Instruct).")
        if self.backend not in GENERATE_BACKENDS:
            raise InputError(f"--backend {self.backend!r} is not one of: local, api (hf-api) for generate.")
        super()._check()
        self.params.check()


SCORE_BACKENDS = ("local", "tei", "infinity")
AGGREGATES = ("max", "mean")


@dataclass(frozen=True)
class ScoreOptions(JobOptions):
    """Options of one `score` job: (query, document) rows in, a cross-encoder's score per row out;
    with `rerank` K, each query's K best rows, ranked."""

    query_column: str = "query"
    text_column: str = "text"  # the document
    rerank: int | None = None  # keep each query's K best rows, with their rank
    aggregate: str | None = None  # a document longer than the model reads: its windows' max (None) or mean
    overlap: int | None = None  # tokens consecutive windows share (None: an eighth of the model's length)
    max_length: int | None = None  # refused: the model reads the pair to its own length
    api_batch_size: int = 32  # documents per /rerank request (one query each)

    @property
    def input_column(self) -> str:
        return self.text_column

    def validate(self, chunk: Any) -> Any:
        """Both columns checked; a valid row's unit is its pair (validate.pair_key)."""
        return validate_pairs(chunk, path=self.input, query_column=self.query_column, text_column=self.text_column,
                              on_invalid=self.on_invalid)

    def _filled(self, settings: Settings) -> dict[str, Any]:
        filled = super()._filled(settings)
        filled["batch_size"] = settings.batch_size if self.batch_size is None else self.batch_size
        if filled["keep"] is not None and self.query_column not in filled["keep"]:  # the query is read to score
            filled["keep"] = [self.query_column, *filled["keep"]]
        return filled

    def _check(self) -> None:
        if not self.model:
            raise InputError("score needs --model: a cross-encoder (reranker), a hub id or a local directory "
                             "(e.g. --model BAAI/bge-reranker-base).")
        if self.backend not in SCORE_BACKENDS:
            raise InputError(f"--backend {self.backend!r} is not one of: {', '.join(SCORE_BACKENDS)} for score.")
        if self.backend != "local" and not self.endpoint:
            raise InputError(f"--backend {self.backend} needs --endpoint URL (the server's base URL).")
        if self.query_column == self.text_column:
            raise InputError(f"--query-column and --text-column are both {self.query_column!r}; a pair has two sides.")
        if self.rerank is not None and self.rerank < 1:
            raise InputError(f"--rerank must be at least 1 (got {self.rerank}).")
        if self.aggregate is not None and self.aggregate not in AGGREGATES:
            raise InputError(f"--aggregate {self.aggregate!r} is not one of: {', '.join(AGGREGATES)}.")
        if self.overlap is not None and self.overlap < 0:
            raise InputError(f"--overlap must be 0 or more (got {self.overlap}).")
        if self.api_batch_size < 1:
            raise InputError(f"--api-batch-size must be at least 1 (got {self.api_batch_size}).")
        super()._check()


def _local_file(flag: str, value: Any) -> Path | None:
    """A monitoring file: written on this machine as the job goes, never a store's object."""
    if value is None:
        return None
    text = str(value)
    unfolded = text if "://" in text else text.replace(":/", "://", 1)  # typer's Path folds s3:// to s3:/
    if is_remote(unfolded):
        raise InputError(f"{flag} {unfolded}: is written on this machine as the job goes; give a local path.")
    return Path(value)
