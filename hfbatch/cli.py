"""The `hfbatch` command: parses flags, calls the library, renders with rich. No logic lives here."""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import __version__
from .engines import ENGINES
from .errors import HfbatchError, InputError, Terminated
from .engines import embed as embed_job
from .engines.parts import PartsResult, merge_job_sidecars
from .io.parts import expand_inputs
from .jobs.embed import EmbedResult
from .monitoring import NullObserver, RichProgress, job_rate, rate_text
from .options import EmbedOptions, GenerateOptions
from .errors import redact_text
from .settings import DEFAULT_MODEL, Settings
from .tools.dry_run import plan_embed as plan
from .validate import ON_INVALID
from .vectors import OUTPUT_PRECISIONS

app = typer.Typer(
    name="hfbatch",
    help="Turn files of text (CSV, JSONL, Parquet) into embeddings with Hugging Face models, as a batch job.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion
    pretty_exceptions_enable=False,
    # rich: option panels and their titles render (typer draws no panels without a markup mode);
    # help texts escape their brackets (`_env`, `\[`) so "[env: ...]" shows literally
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)
err = Console(stderr=True, highlight=False, soft_wrap=True)  # one line per message, even when not a terminal
out = Console(highlight=False)

# The panels of --help, in the order a new user reads them.
INPUT, TEXT, MODEL, OUTPUT, SYNC, CACHE, REMOTE, SCALE, REPORTING = (
    "Input", "Text", "Model and runtime", "Output", "Sync by id", "Cache", "Remote", "Scale", "Reporting")
PANELS = (INPUT, TEXT, MODEL, OUTPUT, SYNC, CACHE, REMOTE, SCALE, REPORTING)


def _env(name: str, default: object = None) -> str:
    """ "[env: NAME; default: X]", escaped so rich markup shows it as written."""
    return rf"\[env: {name}" + (f"; default: {default}" if default is not None else "") + "]"


def _choices(*values: str) -> str:
    """The metavar of an option that takes one of a fixed set: shown as `a|b|c` in --help."""
    return "|".join(values)


# Options declared once, shared by every command that takes them.
ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help=f"Hub id or local directory. {_env('HFBATCH_MODEL', DEFAULT_MODEL)}", rich_help_panel=MODEL)]
TextColumnOpt = Annotated[Optional[str], typer.Option("--text-column", "-t", help=f"Column holding the text. {_env('HFBATCH_TEXT_COLUMN', 'text')}", rich_help_panel=INPUT)]
CacheDirOpt = Annotated[Optional[Path], typer.Option("--cache-dir", help=f"Embedding cache directory. {_env('HFBATCH_CACHE_DIR', 'user cache dir')}", rich_help_panel=CACHE)]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", metavar="auto|cpu|cuda[:N]|mps", help=f"auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps. {_env('HFBATCH_DEVICE')}", rich_help_panel=MODEL)]
EndpointOpt = Annotated[Optional[str], typer.Option("--endpoint", help=f"Server URL: TEI base (http://host:8080), OpenAI-compatible base (.../v1) or an Inference Endpoint URL. {_env('HFBATCH_ENDPOINT')}", rich_help_panel=REMOTE)]
MaxLineBytesOpt = Annotated[Optional[str], typer.Option("--max-line-bytes", help=f"Longest JSONL line or CSV row read, e.g. 64MiB or 1GB; a longer one stops the job (exit 2) before it fills memory. {_env('HFBATCH_MAX_LINE_BYTES', '64MiB')}", rich_help_panel=INPUT)]
DebugOpt = Annotated[bool, typer.Option("--debug", help=f"Show tracebacks. {_env('HFBATCH_DEBUG')}", rich_help_panel=REPORTING)]
ApiConcurrencyOpt = Annotated[int, typer.Option("--api-concurrency", help="HTTP requests in flight at once.", rich_help_panel=REMOTE)]
ApiTimeoutOpt = Annotated[Optional[float], typer.Option("--api-timeout", help=f"Seconds per HTTP request. {_env('HUGGINGFACE_API_TIMEOUT', 60)}", rich_help_panel=REMOTE)]
ApiRetriesOpt = Annotated[int, typer.Option("--api-retries", help="Attempts per HTTP request on transient errors (429, 5xx, timeouts).", rich_help_panel=REMOTE)]
ApiRetryCeilingOpt = Annotated[float, typer.Option("--api-retry-ceiling", help="Give up on a request after this many seconds, retries included.", rich_help_panel=REMOTE)]
TrustRemoteCodeOpt = Annotated[bool, typer.Option("--trust-remote-code", help="Run Python code that ships with the model (custom architectures). Off unless given: only for models you trust.", rich_help_panel=MODEL)]
TokenizerOpt = Annotated[Optional[str], typer.Option("--tokenizer", help="Hub id or directory of the tokenizer used to count tokens for remote backends (default: --model).", rich_help_panel=REMOTE)]
KeepOpt = Annotated[Optional[str], typer.Option("--keep", help="Comma-separated input columns to pass through (default: all).", rich_help_panel=OUTPUT)]
FormatOpt = Annotated[Optional[str], typer.Option("--format", "-f", metavar=_choices("csv", "tsv", "jsonl", "parquet"), help="csv, tsv (csv with tabs), jsonl or parquet; default: from the extension.", rich_help_panel=INPUT)]
DelimiterOpt = Annotated[Optional[str], typer.Option("--delimiter", metavar="CHAR", help="CSV delimiter: one character, or tab; default: a comma (a tab for .tsv). A header with ';' or tabs and no comma is refused until this says which.", rich_help_panel=INPUT)]
MaxErrorsOpt = Annotated[Optional[int], typer.Option("--max-errors", help="Stop (exit 1, nothing written) once more than N rows are invalid.", rich_help_panel=INPUT)]
MetricsFileOpt = Annotated[Optional[Path], typer.Option("--metrics-file", help="Write Prometheus text metrics here (node_exporter textfile collector), on success and on failure.", rich_help_panel=REPORTING)]
LogFileOpt = Annotated[Optional[Path], typer.Option("--log-file", help="Append one JSON line per chunk (and one at the end) to this file.", rich_help_panel=REPORTING)]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar and no summary (the exit-3 line still goes to stderr).", rich_help_panel=REPORTING)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.", rich_help_panel=REPORTING)]


def _version(value: bool) -> None:
    if value:
        out.print(f"hfbatch {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", "-V", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """hfbatch: batch embeddings with Hugging Face models."""


@app.command()
def embed(
    input: Annotated[str, typer.Argument(metavar="INPUT", help="Input file: .csv, .tsv, .jsonl, .ndjson (optionally .gz) or .parquet; or a directory or quoted glob of such parts; local, or in a store (s3://bucket/key, gs://, az://).", show_default=False)],
    *,
    text_column: TextColumnOpt = None,
    fmt: FormatOpt = None,
    delimiter: DelimiterOpt = None,
    on_invalid: Annotated[str, typer.Option("--on-invalid", metavar=_choices(*ON_INVALID), help="Rows with null/empty/non-string text: mark (keep, with embedding_error; exit 3), skip (drop) or fail.", rich_help_panel=INPUT)] = "mark",
    max_errors: MaxErrorsOpt = None,
    max_line_bytes: MaxLineBytesOpt = None,
    max_length: Annotated[Optional[int], typer.Option("--max-length", help="Tokens per text; longer texts are truncated. Default: the model's max_seq_length.", rich_help_panel=TEXT)] = None,
    split: Annotated[Optional[str], typer.Option("--split", metavar="tokens:N", help="tokens:N: cut long texts into windows of N tokens (the model's own tokenizer, specials and prompt included) and write one row per window, instead of truncating.", rich_help_panel=TEXT)] = None,
    overlap: Annotated[Optional[int], typer.Option("--overlap", help="With --split: tokens consecutive windows share. Default: N/8.", rich_help_panel=TEXT)] = None,
    aggregate: Annotated[Optional[str], typer.Option("--aggregate", metavar=_choices("mean"), help="With --split: mean: one row per input row, the mean of its windows' vectors (renormalised).", rich_help_panel=TEXT)] = None,
    prompt: Annotated[Optional[str], typer.Option("--prompt", help='Text put before every text, as sentence-transformers does (e.g. "query: "); "" for none, overriding the model\'s default prompt.', rich_help_panel=TEXT)] = None,
    prompt_name: Annotated[Optional[str], typer.Option("--prompt-name", help="A prompt named in the model's config_sentence_transformers.json (e.g. query, document).", rich_help_panel=TEXT)] = None,
    model: ModelOpt = None,
    kind: Annotated[Optional[str], typer.Option("--kind", metavar=_choices("dense", "sparse", "multivector"), help="What the model makes: read from its files (a SparseEncoder is sparse, a MultiVectorEncoder multivector); give it for a bare checkpoint whose files do not say.", rich_help_panel=MODEL)] = None,
    device: DeviceOpt = None,
    backend: Annotated[str, typer.Option("--backend", metavar=_choices("local", "hf-api", "tei", "openai", "auto"), help="local, hf-api (alias api), tei, openai, or auto (local, falling back to --fallback).", rich_help_panel=MODEL)] = "local",
    runtime: Annotated[Optional[str], typer.Option("--runtime", metavar=_choices("auto", "torch", "onnx", "openvino"), help=rf"auto (measured once per machine and model, see `hfbatch capabilities`); torch; onnx (ONNX Runtime); openvino (hfbatch\[openvino]). The exports are made once and cached. {_env('HFBATCH_RUNTIME', 'auto')}", rich_help_panel=MODEL)] = None,
    precision: Annotated[Optional[str], typer.Option("--precision", metavar=_choices("auto", "fp32", "bf16", "fp16"), help=f"auto (the fastest measured faithful to fp32 here); fp32; bf16 (CPU autocast, fast only where the CPU has native bf16); fp16 (CUDA). {_env('HFBATCH_PRECISION', 'auto')}", rich_help_panel=MODEL)] = None,
    quantize: Annotated[Optional[str], typer.Option("--quantize", metavar=_choices("auto", "int8", "none"), help=f"int8: lossy, only when asked (ONNX Runtime or OpenVINO int8, this machine's faster; used only while cosine to fp32 stays >= 0.99 mean / 0.98 min, on a calibration sample and on the job's first batch; its own cache namespace). none or auto (the default): faithful vectors only. {_env('ENABLE_MODEL_QUANTIZATION')}", rich_help_panel=MODEL)] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", "-b", help=f"Texts per model call. {_env('EMBEDDING_BATCH_SIZE', 32)}", rich_help_panel=MODEL)] = None,
    max_batch_tokens: Annotated[Optional[int], typer.Option("--max-batch-tokens", help="Token budget per model call (texts x longest text, padding included); batches of short texts grow up to it.", rich_help_panel=MODEL)] = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    output: Annotated[str, typer.Option("--output", "-o", help="Output Parquet file (a <output>.meta.json sidecar is written beside it); a directory when the input is many parts; local or s3://bucket/key. With --id-column also a table: x.lance, delta://PATH, postgresql://user@host:port/db?table=NAME[&schema=S].", show_default=False, rich_help_panel=OUTPUT)],
    keep: KeepOpt = None,
    normalize: Annotated[bool, typer.Option("--normalize/--no-normalize", help="Unit-length vectors.", rich_help_panel=OUTPUT)] = True,
    truncate_dim: Annotated[Optional[int], typer.Option("--truncate-dim", help="Matryoshka: keep the first D dimensions (renormalised with --normalize); the cache keeps full vectors.", rich_help_panel=OUTPUT)] = None,
    output_precision: Annotated[Optional[str], typer.Option("--output-precision", metavar=_choices(*OUTPUT_PRECISIONS), help="float32, float16, int8, uint8 (ranges from a calibration sample), binary or ubinary (8 dimensions a byte); as sentence-transformers' quantize_embeddings. Default: float32 (float16 for a multi-vector model, one vector per token).", rich_help_panel=OUTPUT)] = None,
    sparse_top_k: Annotated[Optional[int], typer.Option("--sparse-top-k", help="A sparse model: keep each text's K largest values (ties: the lower index), in index order. Default: every active dimension.", rich_help_panel=OUTPUT)] = None,
    sparse_vocab: Annotated[bool, typer.Option("--sparse-vocab", help="A sparse model: also write each index's token string (embedding.tokens), to read what a vector holds.", rich_help_panel=OUTPUT)] = False,
    calibration: Annotated[Optional[Path], typer.Option("--calibration", help="int8/uint8 ranges from an earlier run's .meta.json, or from the first --calibration-size texts of this CSV/JSONL/Parquet file. Default: the job's own first vectors.", rich_help_panel=OUTPUT)] = None,
    calibration_size: Annotated[int, typer.Option("--calibration-size", help="Vectors the int8/uint8 ranges are taken from.", rich_help_panel=OUTPUT)] = 1000,
    relative_paths: Annotated[bool, typer.Option("--relative-paths", help="Write paths in the sidecars relative to the output's folder, to share results without this machine's layout.", rich_help_panel=OUTPUT)] = False,
    id_column: Annotated[Optional[str], typer.Option("--id-column", help="A column of unique ids: sync -o (a .lance dataset, a Delta table, a postgresql://...?table=NAME table, or a Parquet file) by id; only new and changed rows are embedded and written.", rich_help_panel=SYNC)] = None,
    delete_missing: Annotated[bool, typer.Option("--delete-missing", help="Delete the target's ids that the input no longer has (behind --max-delete-fraction).", rich_help_panel=SYNC)] = False,
    max_delete_fraction: Annotated[float, typer.Option("--max-delete-fraction", help="Refuse a run that would delete more than this fraction of the target's ids (a truncated or empty input never wipes an index).", rich_help_panel=SYNC)] = 0.5,
    rebuild: Annotated[bool, typer.Option("--rebuild", help="Replace a target holding another vector space (model, prompt, dims, precision), as one new version.", rich_help_panel=SYNC)] = False,
    index: Annotated[bool, typer.Option("--index", help="A Lance or Postgres target: build its vector index after the run (Lance: IVF_FLAT; Postgres: --index-type), for `hfbatch search` on large tables.", rich_help_panel=SYNC)] = False,
    index_type: Annotated[Optional[str], typer.Option("--index-type", metavar=_choices("hnsw", "ivfflat"), help="A Postgres target's --index: pgvector's hnsw (the default) or ivfflat, cosine, built CONCURRENTLY.", rich_help_panel=SYNC)] = None,
    commit_every: Annotated[Optional[int], typer.Option("--commit-every", help="A Postgres target: commit every this many rows in its own transaction (a run too large for one; readers then see it land in parts, each id once, one vector space). Default: the whole run is one transaction.", rich_help_panel=SYNC)] = None,
    lock_timeout: Annotated[Optional[float], typer.Option("--lock-timeout", help="A Postgres target held by another hfbatch run: give up after this many seconds (0: at once). Default: wait for it.", rich_help_panel=SYNC)] = None,
    changes: Annotated[Optional[str], typer.Option("--changes", help="Also write the upserted rows and deleted ids (column op) to this Parquet file, for a store of your own.", rich_help_panel=SYNC)] = None,
    cache_dir: CacheDirOpt = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help=f"Neither read nor write the cache. {_env('ENABLE_EMBEDDING_CACHE=false')}", rich_help_panel=CACHE)] = False,
    endpoint: EndpointOpt = None,
    fallback: Annotated[str, typer.Option("--fallback", metavar=_choices("hf-api", "tei", "openai"), help="The remote that --backend auto falls back to: hf-api, tei or openai.", rich_help_panel=REMOTE)] = "hf-api",
    api_batch_size: Annotated[int, typer.Option("--api-batch-size", help="Texts per HTTP request (halved automatically on 413).", rich_help_panel=REMOTE)] = 32,
    api_concurrency: ApiConcurrencyOpt = 4,
    api_timeout: ApiTimeoutOpt = None,
    api_retries: ApiRetriesOpt = 5,
    api_retry_ceiling: ApiRetryCeilingOpt = 300.0,
    remote_pooling: Annotated[Optional[str], typer.Option("--remote-pooling", metavar=_choices("mean"), help="mean: average token-level (3-D) answers into one vector per text.", rich_help_panel=REMOTE)] = None,
    tokenizer: TokenizerOpt = None,
    chunk_size: Annotated[Optional[int], typer.Option("--chunk-size", help=f"Rows read, embedded and written at a time. {_env('HFBATCH_CHUNK_SIZE', 10000)}", rich_help_panel=SCALE)] = None,
    engine: Annotated[str, typer.Option("--engine", metavar=_choices(*ENGINES), help=r"local (this process), or ray (Ray Data over a cluster; needs hfbatch\[ray]).", rich_help_panel=SCALE)] = "local",
    ray_address: Annotated[Optional[str], typer.Option("--ray-address", help="With --engine ray: a cluster address (auto, ray://host:10001); default: a local cluster.", rich_help_panel=SCALE)] = None,
    num_workers: Annotated[int, typer.Option("--num-workers", help="With --engine ray: embedding actors (each loads the model once).", rich_help_panel=SCALE)] = 2,
    gpus_per_worker: Annotated[float, typer.Option("--gpus-per-worker", help="With --engine ray: GPUs per actor (0 = CPU).", rich_help_panel=SCALE)] = 0.0,
    shard: Annotated[Optional[str], typer.Option("--shard", metavar="I/N", help="I/N: with many input parts, take only shard I of N (1..N), chosen by a hash of each part's path; run N hosts, then hfbatch merge-meta.", rich_help_panel=SCALE)] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Read and check the input, count rows, tokens, cache hits and requests, time a sample for an ETA; write nothing.", rich_help_panel=REPORTING)] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the sidecar document (provenance + metrics) to stdout.", rich_help_panel=REPORTING)] = False,
    quiet: QuietOpt = False,
    metrics_file: MetricsFileOpt = None,
    log_file: LogFileOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Embed the text column of INPUT into a Parquet file, with a cache and a provenance sidecar."""
    settings = _settings_or_exit(debug)
    options = EmbedOptions(
        input=input,
        output=output,
        text_column=text_column,
        keep=_columns(keep),
        format=fmt,
        delimiter=delimiter,
        model=model,
        device=device,
        batch_size=batch_size,
        chunk_size=chunk_size,
        max_length=max_length,
        normalize=normalize,
        precision=precision,
        runtime=runtime,
        quantize=quantize,
        max_batch_tokens=max_batch_tokens,
        split=split,
        overlap=overlap,
        aggregate=aggregate,
        prompt=prompt,
        prompt_name=prompt_name,
        truncate_dim=truncate_dim,
        output_precision=output_precision,
        kind=kind,
        sparse_top_k=sparse_top_k,
        sparse_vocab=sparse_vocab,
        calibration=calibration,
        calibration_size=calibration_size,
        use_cache=False if no_cache else None,
        cache_dir=cache_dir,
        on_invalid=on_invalid,
        max_errors=max_errors,
        max_line_bytes=max_line_bytes,
        trust_remote_code=trust_remote_code,
        relative_paths=relative_paths,
        id_column=id_column,
        delete_missing=delete_missing,
        max_delete_fraction=max_delete_fraction,
        rebuild=rebuild,
        changes=changes,
        index=index,
        index_type=index_type,
        lock_timeout=lock_timeout,
        commit_every=commit_every,
        backend=backend,
        endpoint=endpoint,
        fallback=fallback,
        api_batch_size=api_batch_size,
        api_concurrency=api_concurrency,
        api_timeout=api_timeout,
        api_retries=api_retries,
        api_retry_ceiling=api_retry_ceiling,
        remote_pooling=remote_pooling,
        tokenizer=tokenizer,
        metrics_file=metrics_file,
        log_file=log_file,
        command=["hfbatch", *sys.argv[1:]],
    )
    if dry_run:
        if engine != "local":
            _refuse(InputError("--dry-run plans one input file with the local engine; drop --engine."), debug)
        report = _run(lambda: plan(options, settings), debug or settings.debug)
        if as_json:
            _print_json(report)
        else:
            _plan_summary(report)
        return
    result = _run_job(lambda observer: embed_job(options, engine=engine, shard=shard, ray_address=ray_address,
                                                 num_workers=num_workers, gpus_per_worker=gpus_per_worker,
                                                 observer=observer, settings=settings),
                      lambda r: _parts_summary(r) if isinstance(r, PartsResult) else _summary(r),
                      as_json=as_json, quiet=quiet, debug=debug or settings.debug)
    if isinstance(result, PartsResult):
        return _exit_for_parts(result, on_invalid)
    _exit_if_marked(result.metrics["rows_invalid"] if options.on_invalid == "mark" else 0)


def _exit_for_parts(result: PartsResult, on_invalid: str) -> None:
    """Exit 1 if a part failed (the others are complete and listed), else 3 if rows were marked."""
    if result.failed:
        raise typer.Exit(1)
    _exit_if_marked(sum(p.get("rows_invalid") or 0 for p in result.document["parts"]) if on_invalid == "mark" else 0)


def _exit_if_marked(rows: int) -> None:
    """Exit 3: the output is complete, but some rows carry an error mark instead of a result."""
    if rows:
        err.print(f"{rows:,} row{'s' if rows != 1 else ''} marked invalid (see the *_error column): exit 3.")
        raise typer.Exit(3)


def _plan_summary(report: dict) -> None:
    table = Table(title="hfbatch embed --dry-run (nothing written)", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    calls = report.get("requests", report.get("model_calls"))
    for key, value in (
        ("input", report["input"]), ("model", f"{report['model_id']} ({report['backend']})"),
        ("rows", f"{report['rows']:,} ({report['rows_invalid']:,} invalid), {report['texts_distinct']:,} distinct texts"),
        *([("windows", f"{report['windows']:,} (--split); the output will have {report['output_rows']:,} rows")]
          if report.get("windows") is not None else []),
        *([("sync", "{inserted:,} to insert, {updated:,} to update, {unchanged:,} unchanged, {deleted:,} to delete"
                    .format(**report["sync"]) + f" in {report['sync']['target']}"
                    + (f" (version {report['sync']['version']})" if report["sync"]["version"] is not None else ""))]
          if report.get("sync") else []),
        ("cache", f"{report['cache']['expected_hits']:,} expected hits, {report['cache']['texts_to_compute']:,} to compute"
                  + ("" if report["cache"]["used"] else " (no cache yet)")),
        ("work", (f"{report['tokens_to_compute']:,} tokens" if report.get("tokens_to_compute") is not None
                  else "tokens not known (the server counts them)")
                 + f", {calls:,} {'HTTP requests' if 'requests' in report else 'model calls'}, "
                 + (f"{report['texts_truncated']:,} texts truncated" if report.get("texts_truncated") is not None
                    else "truncation is the server's")),
        *([("runtime", f"{report['runtime']['chosen']} ({report['runtime']['by']})")] if report.get("runtime") else []),
        ("ETA", f"{report['eta_seconds']:,.1f} s ({report['eta_basis']})"),
    ):
        table.add_row(key, escape(str(value)))
    out.print(table)


def _parts_summary(result: PartsResult) -> None:
    t = result.document["totals"]
    out.print(escape(f"{result.output_dir}: {t['parts']:,} parts of shard {result.document['shard']} "
                     f"({t['parts_done']:,} embedded, {t['parts_skipped']:,} already complete, {t['parts_failed']:,} failed); "
                     f"{t['rows_in']:,} rows in, {t['rows_out']:,} out, {t['texts_computed']:,} texts computed; "
                     f"job sidecar {result.sidecar}"))
    for part in result.failed:
        err.print(escape(f"failed: {part['input']}: {part['error']}"), soft_wrap=True)


@app.command()
def verify(
    output: Annotated[str, typer.Argument(metavar="OUTPUT", help="An output Parquet file of hfbatch embed (its .meta.json beside it); local or in a store.", show_default=False)],
    sample: Annotated[int, typer.Option("--sample", help="Rows to re-embed, chosen at random (fixed seed).")] = 64,
    tolerance: Annotated[float, typer.Option("--tolerance", help="Cosine a re-embedded row must reach to agree.")] = 0.999,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.", rich_help_panel=REPORTING)] = False,
    debug: DebugOpt = False,
) -> None:
    """Re-embed a sample of OUTPUT's rows with the recorded model and options; exit 1 if any disagrees."""
    from .tools.verify import verify_output

    report = _run(lambda: verify_output(output, sample=sample, tolerance=tolerance), debug)
    if as_json:
        _print_json(report)
    elif report.get("job") == "score":
        out.print(escape(
            f"{report['output']}: {report['agree']}/{report['rows_checked']} sampled rows agree with {report['model_id']} "
            f"scoring them again ({report['reference']}) within {report['tolerance']}; largest difference "
            f"{report['max_abs_diff']}" + (f"; RANKS: {report['rerank']}" if report.get("rerank") else "")),
            soft_wrap=True)
    else:
        made = f", made by {report['made_by']}" if report.get("made_by") else ""
        out.print(escape(
            f"{report['output']}: {report['agree']}/{report['rows_checked']} sampled rows agree with {report['model_id']} "
            f"re-embedded by {report['reference']} at cosine >= {report['tolerance']} (the {report['bar']} bar{made}); "
            f"mean {report['cosine_mean']}, min {report['cosine_min']}"
            + (f"; NOTE: {report['note']}" if report.get("note") else "" if report["same_fingerprint"]
               else "; NOTE: the model or its settings changed since the run (fingerprint differs)")),
            soft_wrap=True)
    if not report["ok"]:
        raise typer.Exit(1)


@app.command()
def search(
    target: Annotated[str, typer.Argument(metavar="TARGET", help="What hfbatch embed -o wrote: a .parquet file, a directory of parts, a .lance dataset, a Delta table (or delta://PATH).", show_default=False)],
    query: Annotated[str, typer.Argument(metavar="QUERY", help="The text to search for.", show_default=False)],
    k: Annotated[int, typer.Option("-k", "--top-k", help="How many hits to show (1 or more).")] = 10,
    prompt: Annotated[Optional[str], typer.Option("--prompt", help="Put this text before the query (\"\": none). Default: the model's query prompt where the rows were embedded with its document prompt, else the rows' prompt.")] = None,
    prompt_name: Annotated[Optional[str], typer.Option("--prompt-name", help="Put this prompt of the model's config_sentence_transformers.json before the query.")] = None,
    exact: Annotated[bool, typer.Option("--exact", help="A Lance or Postgres target: hfbatch's own exact scan instead of the table's own search (Lance's, or pgvector's <=>, which use an --index when there is one).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the hits as JSON.", rich_help_panel=REPORTING)] = False,
    debug: DebugOpt = False,
) -> None:
    """Nearest-neighbour search of TARGET's rows for QUERY, the query embedded as the rows were."""
    from .tools.search import search as search_target

    report = _run(lambda: search_target(target, query, k=k, prompt=prompt, prompt_name=prompt_name, exact=exact), debug)
    if as_json:
        _print_json(report)
    else:
        _search_summary(report)


def _search_summary(report: dict) -> None:
    """The hits as a table (long values cut), and which prompt the query was embedded with."""
    def cut(value: object) -> str:
        text = " ".join(str(value).split()) if value is not None else ""
        return text if len(text) <= 80 else text[:79] + "…"

    shown_prompt = repr(report["prompt"]) if report["prompt"] else "none"
    err.print(escape(f"{report['target']}: {report['rows_searched']:,} rows searched"
                     + (f" ({report['rows_skipped']:,} without a vector skipped)" if report["rows_skipped"] else "")
                     + f", {report['model_id']}, {report['precision']} by {report['metric']}; "
                     f"query prompt: {shown_prompt} ({report['prompt_from']})"
                     + (f"; NOTE: {report['note']}" if report.get("note") else "")), soft_wrap=True)
    hits = report["hits"]
    columns = [name for name in (hits[0] if hits else {}) if name not in ("rank", "score")]
    table = Table(show_edge=False)
    table.add_column("rank", justify="right")
    table.add_column("score", justify="right")
    for name in columns:
        table.add_column(escape(name), overflow="fold")
    for hit in hits:
        table.add_row(str(hit["rank"]), f"{hit['score']:.4f}", *(escape(cut(hit.get(name))) for name in columns))
    out.print(table)


@app.command("merge-meta")
def merge_meta(
    output_dir: Annotated[str, typer.Argument(metavar="OUTPUT_DIR", help="The -o directory of a many-part job (its shards' job sidecars); local or in a store.", show_default=False)],
    input: Annotated[Optional[str], typer.Option("--input", help="The job's input (directory or glob): also check that no part is missing.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the merged document to stdout.", rich_help_panel=REPORTING)] = False,
    debug: DebugOpt = False,
) -> None:
    """Check that the shards of a job account for every part exactly once, and sum their metrics."""
    def merge() -> dict:
        expected = None
        if input:
            root, parts = expand_inputs(input)
            expected = [str(p.relative_to(root)) for p in parts]
        return merge_job_sidecars(output_dir, expected)

    merged = _run(merge, debug)
    if as_json:
        _print_json(merged)
    else:
        out.print(escape(f"{len(merged['sidecars'])} job sidecars, {merged['parts']:,} parts, {merged['rows_in']:,} rows in, "
                         f"{merged['rows_out']:,} out, {merged['texts_computed']:,} texts computed: "
                         + ("complete" if merged["complete"] else "INCOMPLETE")))
        for problem in merged["problems"]:
            err.print(escape(problem), soft_wrap=True)
    if not merged["complete"]:
        raise typer.Exit(1)


@app.command()
def generate(
    input: Annotated[str, typer.Argument(metavar="INPUT", help="Input file with a prompt column: CSV, JSONL or Parquet; local or in a store.", show_default=False)],
    *,
    prompt_column: Annotated[str, typer.Option("--prompt-column", help="Column holding the prompt.", rich_help_panel=INPUT)] = "prompt",
    fmt: FormatOpt = None,
    delimiter: DelimiterOpt = None,
    on_invalid: Annotated[str, typer.Option("--on-invalid", metavar=_choices(*ON_INVALID), help="mark, skip or fail rows with null/empty/non-string prompts.", rich_help_panel=INPUT)] = "mark",
    max_errors: MaxErrorsOpt = None,
    max_line_bytes: MaxLineBytesOpt = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Tokens to generate at most per prompt.", rich_help_panel=TEXT)] = 64,
    temperature: Annotated[float, typer.Option("--temperature", help="0 = greedy (deterministic, cached).", rich_help_panel=TEXT)] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling when --temperature > 0.", rich_help_panel=TEXT)] = 1.0,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Fixed seed: sampling becomes repeatable and is cached.", rich_help_panel=TEXT)] = None,
    chat: Annotated[bool, typer.Option("--chat", help="Wrap each prompt in the model's chat template (with --backend api: the chat-completion route).", rich_help_panel=TEXT)] = False,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Causal LM: hub id or local directory.", rich_help_panel=MODEL)] = None,
    backend: Annotated[str, typer.Option("--backend", metavar=_choices("local", "api", "hf-api"), help="local, or api (alias hf-api): the HF Inference API (text generation; chat completion with --chat), or --endpoint (a TGI server or Inference Endpoint).", rich_help_panel=MODEL)] = "local",
    local: Annotated[bool, typer.Option("--local", help="Run the model here (the original service's flag; the default).", rich_help_panel=MODEL)] = False,
    device: DeviceOpt = None,
    precision: Annotated[str, typer.Option("--precision", metavar=_choices("fp32", "bf16", "fp16", "auto"), help="Weights' dtype for --backend local: fp32; bf16 (fast on CPUs with native bf16); fp16 (CUDA); auto.", rich_help_panel=MODEL)] = "fp32",
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Prompts per generate call (left-padded).", rich_help_panel=MODEL)] = 8,
    trust_remote_code: TrustRemoteCodeOpt = False,
    output: Annotated[str, typer.Option("--output", "-o", help="Output Parquet file; a <output>.meta.json sidecar is written beside it; local or in a store.", show_default=False, rich_help_panel=OUTPUT)],
    keep: KeepOpt = None,
    cache_dir: CacheDirOpt = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Neither read nor write the cache.", rich_help_panel=CACHE)] = False,
    endpoint: EndpointOpt = None,
    api_concurrency: ApiConcurrencyOpt = 4,
    api_timeout: ApiTimeoutOpt = None,
    api_retries: ApiRetriesOpt = 5,
    api_retry_ceiling: ApiRetryCeilingOpt = 300.0,
    tokenizer: TokenizerOpt = None,
    chunk_size: Annotated[Optional[int], typer.Option("--chunk-size", help="Rows read and written at a time.", rich_help_panel=SCALE)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the sidecar document to stdout.", rich_help_panel=REPORTING)] = False,
    quiet: QuietOpt = False,
    metrics_file: MetricsFileOpt = None,
    log_file: LogFileOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Generate text for the prompt column of INPUT with a causal LM (local transformers, or the HF Inference API)."""
    from .backends.generation import GenerationParams
    from .jobs.generate import run_generate

    settings = _settings_or_exit(debug)
    if local and backend != "local":
        _refuse(InputError(f"--local and --backend {backend} contradict each other; give one."), debug)
    options = GenerateOptions(
        input=input, output=output, model=model, prompt_column=prompt_column, keep=_columns(keep), format=fmt,
        delimiter=delimiter, device=device, precision=precision, trust_remote_code=trust_remote_code, batch_size=batch_size, chunk_size=chunk_size,
        params=GenerationParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, chat=chat),
        use_cache=False if no_cache else None, cache_dir=cache_dir, on_invalid=on_invalid, max_errors=max_errors,
        max_line_bytes=max_line_bytes, backend=backend, endpoint=endpoint, api_concurrency=api_concurrency,
        api_timeout=api_timeout, api_retries=api_retries, api_retry_ceiling=api_retry_ceiling, tokenizer=tokenizer,
        metrics_file=metrics_file, log_file=log_file, command=["hfbatch", *sys.argv[1:]],
    )
    result = _run_job(lambda observer: run_generate(options, observer=observer, settings=settings), _generate_summary,
                      as_json=as_json, quiet=quiet, debug=debug or settings.debug, label="generating")
    _exit_if_marked(result.document["metrics"]["rows_invalid"] if on_invalid == "mark" else 0)


@app.command()
def score(
    input: Annotated[str, typer.Argument(metavar="INPUT", help="Input file with a query and a document column: CSV, JSONL or Parquet; local or in a store; a directory or quoted glob of such parts is scored as one input.", show_default=False)],
    *,
    query_column: Annotated[str, typer.Option("--query-column", help="Column holding the query.", rich_help_panel=INPUT)] = "query",
    text_column: Annotated[str, typer.Option("--text-column", help="Column holding the document scored against the query.", rich_help_panel=INPUT)] = "text",
    fmt: FormatOpt = None,
    delimiter: DelimiterOpt = None,
    on_invalid: Annotated[str, typer.Option("--on-invalid", metavar=_choices(*ON_INVALID), help="Rows with a null/empty/non-string query or document: mark (keep, with score_error; exit 3), skip (drop) or fail.", rich_help_panel=INPUT)] = "mark",
    max_errors: MaxErrorsOpt = None,
    max_line_bytes: MaxLineBytesOpt = None,
    rerank: Annotated[Optional[int], typer.Option("--rerank", help="Keep each query's K best rows, with their rank (1 = best; equal scores in input order).", rich_help_panel=OUTPUT)] = None,
    aggregate: Annotated[Optional[str], typer.Option("--aggregate", metavar=_choices("max", "mean"), help="A document longer than the model reads beside its query is scored in windows: their max (the default: its best window) or mean.", rich_help_panel=TEXT)] = None,
    overlap: Annotated[Optional[int], typer.Option("--overlap", help="Tokens consecutive windows of a long document share. Default: an eighth of the model's length.", rich_help_panel=TEXT)] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="A cross-encoder (reranker): hub id or local directory.", rich_help_panel=MODEL)] = None,
    backend: Annotated[str, typer.Option("--backend", metavar=_choices("local", "tei", "infinity"), help="local (sentence-transformers' CrossEncoder here), or a server's /rerank: tei or infinity (with --endpoint).", rich_help_panel=MODEL)] = "local",
    device: DeviceOpt = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", "-b", help=f"Pairs per model call. {_env('EMBEDDING_BATCH_SIZE', 32)}", rich_help_panel=MODEL)] = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    output: Annotated[str, typer.Option("--output", "-o", help="Output Parquet file; a <output>.meta.json sidecar is written beside it; local or in a store.", show_default=False, rich_help_panel=OUTPUT)],
    keep: KeepOpt = None,
    cache_dir: CacheDirOpt = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Neither read nor write the cache.", rich_help_panel=CACHE)] = False,
    endpoint: EndpointOpt = None,
    api_batch_size: Annotated[int, typer.Option("--api-batch-size", help="Documents per /rerank request (one query each).", rich_help_panel=REMOTE)] = 32,
    api_concurrency: ApiConcurrencyOpt = 4,
    api_timeout: ApiTimeoutOpt = None,
    api_retries: ApiRetriesOpt = 5,
    api_retry_ceiling: ApiRetryCeilingOpt = 300.0,
    tokenizer: TokenizerOpt = None,
    chunk_size: Annotated[Optional[int], typer.Option("--chunk-size", help="Rows read, scored and written at a time.", rich_help_panel=SCALE)] = None,
    engine: Annotated[str, typer.Option("--engine", metavar=_choices(*ENGINES), help=r"local (this process), or ray (Ray Data's actors score the chunks; one output still; needs hfbatch\[ray]).", rich_help_panel=SCALE)] = "local",
    ray_address: Annotated[Optional[str], typer.Option("--ray-address", help="With --engine ray: a cluster address (auto, ray://host:10001); default: a local cluster.", rich_help_panel=SCALE)] = None,
    num_workers: Annotated[int, typer.Option("--num-workers", help="With --engine ray: scoring actors (each loads the model once).", rich_help_panel=SCALE)] = 2,
    gpus_per_worker: Annotated[float, typer.Option("--gpus-per-worker", help="With --engine ray: GPUs per actor (0 = CPU).", rich_help_panel=SCALE)] = 0.0,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Read and check the input, count rows, pairs, cache hits, windows and model calls, time a sample for an ETA; write nothing.", rich_help_panel=REPORTING)] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the sidecar document to stdout.", rich_help_panel=REPORTING)] = False,
    quiet: QuietOpt = False,
    metrics_file: MetricsFileOpt = None,
    log_file: LogFileOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Score each (query, document) row of INPUT with a cross-encoder (reranker); --rerank K keeps each query's best K."""
    from .engines import score as score_job
    from .options import ScoreOptions

    settings = _settings_or_exit(debug)
    options = ScoreOptions(
        input=input, output=output, model=model, query_column=query_column, text_column=text_column,
        keep=_columns(keep), format=fmt, delimiter=delimiter, device=device, trust_remote_code=trust_remote_code,
        batch_size=batch_size, chunk_size=chunk_size, rerank=rerank, aggregate=aggregate, overlap=overlap,
        use_cache=False if no_cache else None, cache_dir=cache_dir, on_invalid=on_invalid, max_errors=max_errors,
        max_line_bytes=max_line_bytes, backend=backend, endpoint=endpoint, api_batch_size=api_batch_size,
        api_concurrency=api_concurrency, api_timeout=api_timeout, api_retries=api_retries,
        api_retry_ceiling=api_retry_ceiling, tokenizer=tokenizer, metrics_file=metrics_file, log_file=log_file,
        command=["hfbatch", *sys.argv[1:]],
    )
    if dry_run:
        from .tools.dry_run import plan_score

        if engine != "local":
            _refuse(InputError("--dry-run plans the job with the local engine; drop --engine."), debug)

        report = _run(lambda: plan_score(options, settings), debug or settings.debug)
        if as_json:
            _print_json(report)
        else:
            out.print(escape(f"would score {report['pair_scorings']:,} pairs and windows of {report['rows']:,} rows "
                             f"({report['rows_invalid']:,} invalid, {report['cache']['expected_hits']:,} cached, "
                             f"{report['long_documents']:,} long documents in {report['windows']:,} windows) and write "
                             f"{report['output_rows']:,} rows; ETA {report['eta_seconds']} s ({report['eta_basis']})"),
                      soft_wrap=True)
        return
    result = _run_job(lambda observer: score_job(options, engine=engine, ray_address=ray_address, num_workers=num_workers,
                                                 gpus_per_worker=gpus_per_worker, observer=observer, settings=settings),
                      _score_summary,
                      as_json=as_json, quiet=quiet, debug=debug or settings.debug, label="scoring")
    _exit_if_marked(result.document["metrics"]["rows_invalid"] if on_invalid == "mark" else 0)


def _score_summary(result) -> None:  # type: ignore[no-untyped-def]
    m = result.document["metrics"]
    rerank = result.document["provenance"].get("rerank")
    kept = f"; kept {rerank['rows_kept']:,} rows, the best {rerank['k']} of each of {rerank['queries']:,} queries" \
        if rerank else ""
    out.print(escape(f"wrote {result.output} ({m['rows_total']:,} rows: {m['rows_invalid']:,} invalid, "
                     f"{m['texts_computed']:,} pairs scored{kept}); cache {m['cache']['hits']:,} hits / "
                     f"{m['cache']['misses']:,} misses"))
    out.print(f"{_time_line(m)}; {_stages_line(m)}")


def _generate_summary(result) -> None:  # type: ignore[no-untyped-def]
    m = result.document["metrics"]
    out.print(escape(f"wrote {result.output} ({m['rows_total']:,} rows: {m['rows_generated']:,} generated, "
                     f"{m['rows_invalid']:,} invalid, {m['rows_truncated']:,} prompts truncated); "
                     f"{m['tokens_generated']:,} tokens at {m['tokens_per_second'] or 0:,.1f}/s; "
                     f"cache {m['cache']['hits']:,} hits / {m['cache']['misses']:,} misses"))
    out.print(f"{_time_line(m)}; {_stages_line(m)}")


def _columns(keep: str | None) -> list[str] | None:
    """--keep id,title -> ["id", "title"]."""
    return [c.strip() for c in keep.split(",") if c.strip()] if keep else None


def _run_job(job, summary, *, as_json: bool, quiet: bool, debug: bool, label: str = "embedding"):  # type: ignore[no-untyped-def]
    """Run a job with a progress bar (or none), then print its document (--json) or its summary."""
    observer = NullObserver() if (quiet or as_json) else RichProgress(err, label=label)
    result = _run(lambda: job(observer), debug)
    if as_json:
        _print_json(result.document)
    elif not quiet:
        summary(result)
    return result


@app.command()
def capabilities(
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """What this machine can do: backends and why not, devices, libraries, the runtimes measured for `auto`, memory, cache."""
    from .tools.doctor import capabilities as report

    settings = _settings_or_exit(debug)
    info = _run(lambda: report(settings), debug or settings.debug)
    if as_json:
        _print_json(info)
        return
    table = Table(title="backends", title_justify="left")
    for col in ("backend", "usable", "why"):
        table.add_column(col)
    for name, b in info["backends"].items():
        table.add_row(name, "yes" if b["usable"] else "no", escape(b["why"]))
    out.print(table)
    devices = Table(title="devices", title_justify="left")
    for col in ("device", "available", "detail"):
        devices.add_column(col)
    for d in info["devices"]:
        cpu = d.get("cpu") or {}
        detail = (f"{d['name']}, {d['memory_gb']} GB" if "name" in d else
                  f"{cpu.get('model') or 'CPU'}, {cpu.get('cores')} cores; {' '.join(cpu.get('flags') or []) or 'no AVX2'}; "
                  f"bf16 {'native' if cpu.get('native_bf16') else 'emulated (slower than fp32)'}" if cpu else "")
        devices.add_row(d["device"], "yes" if d["available"] else "no", detail)
    out.print(devices)
    libs = Table(title="libraries", title_justify="left")
    for col in ("package", "version", "for", "install"):
        libs.add_column(col)
    for name, lib in info["libraries"].items():
        libs.add_row(name, lib["version"] or "missing", lib["for"], escape(lib.get("install", "")))
    out.print(libs)
    for record in info["runtimes"]:
        _runtime_table(record)
    mem, cache = info["memory"], info["cache"]
    out.print(f"memory: {mem['available_gb']} GB free of {mem['total_gb']} GB, {mem['cpu_cores']} cores; "
              f"MAX_MODEL_MEMORY_GB {mem['max_model_memory_gb'] or 'not set'}")
    out.print(escape(f"cache: {cache['directory']} ({'on' if cache['enabled'] else 'off'}), "
              + (f"{cache['entries']:,} entries (vectors and token counts), {cache['volume_bytes'] / 1e6:,.1f} MB" if cache["exists"] else "empty")
              + f", limit {cache['size_limit_bytes'] / 1e9:g} GB; token {info['token']}"))


def _runtime_table(record: dict) -> None:
    """One model's measured configurations on this machine, and what auto runs."""
    runs = f"auto runs {record['chosen']}" + (" (pinned)" if record.get("pinned") == record["chosen"] else
                                              " (the fastest faithful)") if record.get("chosen") else "nothing passed"
    if record.get("pinned") and record["pinned"] != record.get("chosen"):
        runs += f"; --quantize int8 runs {record['pinned']} (pinned)"
    title = (f"runtimes measured for {record['model_id']} ({record['measured_at']}"
             f"{'' if record['in_force'] else '; another CPU or library versions: not in force'}); {runs}")
    runtimes = Table(title=escape(title), title_justify="left")
    for col in ("configuration", "texts/s", "cosine to torch fp32 (mean / min)", "memory MB", "accepted"):
        runtimes.add_column(col)
    for c in record["candidates"]:
        fid = c.get("fidelity") or {}
        runtimes.add_row(c["label"], f"{c['texts_per_s']:.1f}" if c.get("texts_per_s") is not None else "-",
                         f"{fid['mean']:.5f} / {fid['min']:.5f}" if fid else "-",
                         f"{c['memory_mb']:.0f}" if c.get("memory_mb") is not None else "-",
                         "yes" if c.get("accepted") else escape(f"no: {c.get('reason')}"))
    out.print(runtimes)


@app.command()
def tune(
    model: Annotated[Optional[str], typer.Argument(metavar="MODEL", help=f"Hub id or local directory. [default: {DEFAULT_MODEL}]", show_default=False)] = None,
    pin: Annotated[Optional[str], typer.Option("--pin", help='Make auto run this measured configuration for MODEL here, e.g. "openvino bf16" or "torch fp32".')] = None,
    unpin: Annotated[bool, typer.Option("--unpin", help="Let auto run the fastest faithful configuration again.")] = False,
    int8: Annotated[bool, typer.Option("--int8", help="Measure the int8 configurations too (what --quantize int8 chooses among).")] = False,
    no_measure: Annotated[bool, typer.Option("--no-measure", help="Only show (or pin from) what was measured before. --pin and --unpin measure only what was never measured.")] = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Measure MODEL's runtime configurations on this machine now, show them, and pin the choice.

    What the first job of a model measures by itself, on demand: after an upgrade, on a machine that was busy, or while building a container image (then its jobs measure nothing). Pinning without a record: HFBATCH_RUNTIME / HFBATCH_PRECISION."""
    from .tools.doctor import runtime_measurements
    from .tools.tune import tune as run_tune

    def note(message: str) -> None:
        if not (as_json or debug):
            err.print(escape(message))

    report = _run(lambda: run_tune(model or DEFAULT_MODEL, int8=int8, pin=pin, unpin=unpin, measure=not no_measure,
                                   trust_remote_code=trust_remote_code, note=note), debug)
    if as_json:
        _print_json(report)
        return
    record = next((r for r in runtime_measurements() if r["file"] == report["record"]), None)
    if record is None:
        err.print(escape(f"nothing measured for {report['model_id']} on this machine yet; run without --no-measure."))
        raise typer.Exit(1)
    _runtime_table(record)


@app.command("test-connection")
def test_connection(
    model: ModelOpt = None,
    endpoint: EndpointOpt = None,
    backend: Annotated[str, typer.Option("--backend", metavar=_choices("local", "hf-api", "tei", "openai", "all"), help="local, hf-api, tei, openai, or all.")] = "all",
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Embed one text with the local model and each configured remote; report latency, dimension, status."""
    from .tools.doctor import check_connection

    settings = _settings_or_exit(debug)
    rows = _run(lambda: check_connection(model=model, backend=backend, endpoint=endpoint, settings=settings), debug or settings.debug)
    if as_json:
        _print_json(rows)
    else:
        table = Table(title="test-connection", title_justify="left")
        for col in ("backend", "status", "dim", "latency ms", "detail"):
            table.add_column(col)
        for r in rows:
            table.add_row(r["backend"], r["status"], str(r.get("dim", "")), f"{r['latency_ms']:,.0f}",
                          escape(redact_text(r.get("error") or r.get("detail") or "")))
        out.print(table)
    if any(r["status"] != "ok" for r in rows):
        raise typer.Exit(1)


@app.command()
def models(
    search: Annotated[Optional[str], typer.Option("--search", help="Words in the model id.")] = None,
    task: Annotated[str, typer.Option("--task", help="Pipeline tag, e.g. feature-extraction, text-generation.")] = "feature-extraction",
    sort: Annotated[str, typer.Option("--sort", metavar=_choices("downloads", "likes", "trending_score", "created_at", "last_modified"), help="downloads, likes, trending_score, created_at, last_modified.")] = "downloads",
    limit: Annotated[int, typer.Option("--limit", help="At most this many models.")] = 20,
    served: Annotated[bool, typer.Option("--served", help="Only models the hf-inference provider serves.")] = False,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """List hub models (through huggingface_hub) by search, task and sort."""
    from .tools.doctor import list_models

    rows = _run(lambda: list_models(search=search, task=task, sort=sort, limit=limit, served=served), debug)
    if as_json:
        _print_json(rows)
        return
    table = Table(title=f"models ({task})", title_justify="left")
    for col in ("id", "downloads", "likes", "library"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["id"], f"{r['downloads'] or 0:,}", f"{r['likes'] or 0:,}", r["library"] or "")
    out.print(table)


cache_app = typer.Typer(help="Look after the embedding cache: what it holds, clear it, prune it.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")


def _cache_dir(cache_dir: Path | None, debug: bool) -> Path:
    """--cache-dir, else HFBATCH_CACHE_DIR, else the user cache dir: the directory embed uses."""
    return Path(cache_dir).expanduser() if cache_dir else _settings_or_exit(debug).cache_dir


def _mb(n: int) -> str:
    """Bytes as people read them: 812 B, 64.0 kB, 12.3 MB, 1.50 GB."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:,.2f} {unit}" if unit == "GB" else f"{n / size:,.1f} {unit}"
    return f"{n:,} B"


def _when(ts: float | None) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M UTC") if ts else "-"


@cache_app.command("info")
def cache_info(
    cache_dir: CacheDirOpt = None,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """The cache directory, its size on disk, its entries, and its namespaces (one per model fingerprint) with theirs."""
    from .cache import cache_info as info_of

    settings = _settings_or_exit(debug)
    directory = Path(cache_dir).expanduser() if cache_dir else settings.cache_dir
    info = _run(lambda: info_of(directory), debug)
    info["size_limit_bytes"] = settings.cache_size_bytes
    if as_json:
        _print_json(info)
        return
    if not info["exists"]:
        out.print(escape(f"{info['directory']}: no cache there yet (embed makes one)."))
        return
    out.print(escape(f"{info['directory']}: {info['entries']:,} entries (vectors, token counts and dimension records), "
                     f"{_mb(info['size_bytes'])} on disk of a {_mb(info['size_limit_bytes'])} limit (EMBEDDING_CACHE_SIZE); "
                     f"used {_when(info['oldest_use'])} to {_when(info['newest_use'])}"))
    table = Table(title="namespaces (a job's fingerprint, in its sidecar's provenance)", title_justify="left")
    table.add_column("namespace", overflow="fold")
    for col in ("entries", "values", "last used"):
        table.add_column(col)
    for ns in info["namespaces"]:
        table.add_row(escape(ns["namespace"] or "(stored before namespaces were recorded)"), f"{ns['entries']:,}",
                      _mb(ns["value_bytes"]), _when(ns["last_use"]))
    out.print(table)


@cache_app.command("clear")
def cache_clear(
    cache_dir: CacheDirOpt = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Remove every entry of the cache (every model's); asks first unless --yes."""
    from .cache import clear_cache

    directory = _cache_dir(cache_dir, debug)
    if not yes and not typer.confirm(f"Remove every entry of the embedding cache at {directory}?"):
        err.print("nothing removed.")
        raise typer.Exit(1)
    report = _run(lambda: clear_cache(directory), debug)
    if as_json:
        _print_json(report)
    else:
        out.print(escape(f"{report['directory']}: removed {report['removed']:,} entries; "
                         f"{_mb(report['before_bytes'])} -> {_mb(report['size_bytes'])} on disk"))


@cache_app.command("prune")
def cache_prune(
    cache_dir: CacheDirOpt = None,
    max_size: Annotated[Optional[str], typer.Option("--max-size", help="Shrink the cache to this size (e.g. 500MB, 2GiB), least recently used entries first.")] = None,
    older_than: Annotated[Optional[str], typer.Option("--older-than", help="Drop the entries not used for this long: 30d, 12h, 90m, 2w.")] = None,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Shrink the cache: drop entries unused for --older-than, then the least recently used down to --max-size."""
    from .cache import parse_age, prune_cache
    from .settings import parse_byte_size

    directory = _cache_dir(cache_dir, debug)
    report = _run(lambda: prune_cache(directory, max_bytes=None if max_size is None else parse_byte_size(max_size, "--max-size"),
                                      older_than_seconds=None if older_than is None else parse_age(older_than)), debug)
    if as_json:
        _print_json(report)
    else:
        out.print(escape(f"{report['directory']}: removed {report['removed']:,} entries, {report['entries']:,} left; "
                         f"{_mb(report['before_bytes'])} -> {_mb(report['size_bytes'])} on disk"))


def _print_json(document: object) -> None:
    # plain write, not rich: a console would wrap long lines inside JSON strings
    sys.stdout.write(json.dumps(document, indent=2, default=str) + "\n")


def _settings_or_exit(debug: bool) -> Settings:
    return _run(Settings.load, debug)


def _run(job, debug: bool):  # type: ignore[no-untyped-def]
    """Run `job`; turn errors into one line and the documented exit code."""
    try:
        return job()
    except HfbatchError as exc:
        if debug:
            sys.stderr.write(redact_text(traceback.format_exc()))
        err.print(f"[bold red]{type(exc).__name__}[/]: {escape(_one_line(redact_text(str(exc))))}")
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        err.print("interrupted: no output was written; rerun the same command to resume from the cache.")
        raise typer.Exit(130) from None
    except Terminated as exc:
        err.print(f"terminated ({exc.name}): no output was written; rerun the same command to resume from the cache.")
        raise typer.Exit(exc.exit_code) from None
    except Exception as exc:  # a bug or an unforeseen failure: still one line, still no output
        if debug:
            sys.stderr.write(redact_text(traceback.format_exc()))
        err.print(f"[bold red]error[/]: {type(exc).__name__}: {escape(_one_line(redact_text(str(exc))))} "
                  "(no output was written; rerun with --debug for the traceback)")
        raise typer.Exit(1) from None


def _refuse(error: HfbatchError, debug: bool) -> None:
    """A contradiction among flags, found before any library call: reported like any other error."""
    def fail() -> None:
        raise error

    _run(fail, debug)


def _one_line(text: str) -> str:
    """Messages from libraries (a tokenizer's OSError, a server's body) can span lines; a log
    line or a cron mail needs the error on one."""
    return " ".join(text.split())


def _device_line(p: dict) -> str:
    """The device, and for the local model the runtime and precision that ran (and whether auto chose them)."""
    local = (p.get("backends") or {}).get("local") or {}
    if not local.get("runtime"):
        return str(p["device"])
    kind = "int8" if str(local.get("quantize", "none")) != "none" else local.get("precision")
    chosen = local.get("selection") or {}
    how = {"measured on this machine": " (auto: this machine's choice for the model)",
           "pinned": " (auto: pinned by hfbatch tune)"}.get(chosen.get("by"), "")
    over = "; passed over " + ", ".join(p["label"] for p in chosen.get("passed_over") or []) \
        if chosen.get("passed_over") else ""
    return escape(f"{p['device']}, {local['runtime']} {kind}{how}{over}")


def _summary(result: EmbedResult) -> None:
    m, p = result.metrics, result.document["provenance"]
    table = Table(title="hfbatch embed", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    cache = m["cache"]
    rows = [
        ("output", f"{result.output} ({m['rows_written']:,} rows)"),
        ("sidecar", str(result.sidecar) if result.sidecar is not None else "none beside a database table (hfbatch_targets keeps its record; --json prints this run)"),
        ("model", escape(f"{p['model_id']} [{p['model_source']}]")),
        ("device", _device_line(p)),
        ("backend", _backend_line(p, m)),
        ("rows", f"{m['rows_total']:,} read, {m['rows_embedded']:,} embedded, {m['rows_invalid']:,} invalid, "
                 f"{m['rows_skipped']:,} skipped, {m['rows_truncated']:,} truncated"),
        ("cache", f"{cache['hits']:,} hits, {cache['misses']:,} misses ({cache['hit_rate']:.0%} hit rate)"
                  if cache["enabled"] else "off"),
        ("computed", f"{m['texts_computed']:,} texts in {m['batches']:,} batches, {m['tokens_computed']:,} tokens"),
        ("time", _time_line(m)),
        ("stages", _stages_line(m)),
        ("peak memory", f"{m['peak_rss_mb']:,.0f} MiB"),
    ]
    sync, target = m.get("sync"), p.get("output", {}).get("table")
    if sync is not None:  # a sync by --id-column: what it did to the target
        rows.insert(1, ("sync", f"{sync['inserted']:,} inserted, {sync['updated']:,} updated, {sync['unchanged']:,} "
                                f"unchanged, {sync['deleted']:,} deleted"
                                + (f", {sync['kept_missing']:,} gone from the input and kept" if sync["kept_missing"] else "")))
    if target is not None:
        made = "no new version (nothing changed)" if target["version"] == target["version_before"] \
            else f"created, version {target['version']}" if target["version_before"] is None \
            else f"version {target['version_before']} -> {target['version']}"
        rows.insert(2, ("table", f"{target['kind']}, {made}"
                                 + (f", {sync['bytes_added']:,} bytes added" if sync and sync.get("bytes_added") else "")))
    for key, value in rows:
        table.add_row(key, value)
    out.print(table)


def _time_line(m: dict) -> str:
    """Wall seconds and rows per second, the progress bar's sum (`job_rate`: model load and
    measuring included)."""
    return f"{m['wall_seconds']:.2f}s wall ({rate_text(job_rate(m['rows_total'], m['wall_seconds']))} rows/s)"


def _stages_line(m: dict) -> str:
    """Every stage the job booked time to, in its order ("read 0.10s · measure 4.2s · embed 1.7s"):
    a stage added to the jobs shows up here without a change to this file."""
    stages = [f"{name.replace('_', ' ')} {_seconds(s)}" for name, s in m.get("stage_seconds", {}).items() if s > 0]
    return escape(" · ".join(stages)) or "-"


def _seconds(s: float) -> str:
    return f"{s:.2f}s" if s < 10 else f"{s:,.1f}s" if s < 100 else f"{s:,.0f}s"


def _backend_line(p: dict, m: dict) -> str:
    """Which backend made the vectors; for --backend auto, whether and why it fell back."""
    counts = ", ".join(f"{name} {b.get('texts_computed', 0):,} texts" for name, b in p["backends"].items())
    line = f"{p['backend']} ({counts})"
    fallback = p.get("fallback") or {}
    if fallback.get("fell_back"):
        line += f"; fell back: {fallback.get('fallback_reason')}"
    api = m["api"]
    if api["requests"]:
        line += f"; {api['requests']:,} requests, {api['retries']:,} retries"
    return escape(redact_text(line))


def main() -> None:
    """Console-script entry point."""
    from .settings import load_env_file

    # .env in the working directory fills what the environment leaves unset (tokens included),
    # for every part of hfbatch that reads the environment; never where credentials are sent
    load_env_file(Path.cwd() / ".env")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for stop in (signal.SIGTERM, signal.SIGHUP):  # a scheduler's kill, a closed terminal or ssh session
        signal.signal(stop, _on_stop_signal)
    try:
        app()
    except SystemExit as done:
        _exit_quickly(done.code)
        raise
    _exit_quickly(0)


def _exit_quickly(code: object) -> None:
    """Once torch is imported, the interpreter's own teardown (freeing its modules) takes about a
    second after the job is done: a cron job or a Makefile waits for it for nothing. Run what
    atexit holds (logging's flush, temp-dir cleanup), flush, and leave: the interpreter's own exit
    steps in its own order (threads joined, executors' workers stopped, then atexit), minus the
    module teardown. Never for in-process callers (tests, notebooks): they do not come through main()."""
    import atexit
    import threading

    if "torch" not in sys.modules:
        return  # nothing slow to tear down
    threading._shutdown()  # type: ignore[attr-defined]  # what Py_Finalize runs first: non-daemon threads joined
    status = code if isinstance(code, int) else (0 if code is None else 1)
    if not isinstance(code, int) and code is not None:
        print(code, file=sys.stderr)  # what SystemExit("message") would have printed
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


def _on_stop_signal(signum: int, frame: object) -> None:
    raise Terminated(signum, signal.Signals(signum).name)


if __name__ == "__main__":
    main()
