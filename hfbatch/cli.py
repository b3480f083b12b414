"""The `hfbatch` command: parses flags, calls the library, renders with rich. No logic lives here."""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import __version__
from .errors import HfbatchError
from .options import EmbedOptions
from .pipeline import EmbedResult, run_embed
from .progress import NullProgress, RichProgress
from .provenance import redact_text
from .settings import DEFAULT_MODEL, Settings

app = typer.Typer(
    name="hfbatch",
    help="Turn files of text (CSV, JSONL, Parquet) into embeddings with Hugging Face models, as a batch job.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts show "[env: ...]" literally
)
err = Console(stderr=True, highlight=False)
out = Console(highlight=False)

# Options declared once, shared by every command that takes them.
ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help=f"Hub id or local directory. [env: HFBATCH_MODEL; default: {DEFAULT_MODEL}]")]
TextColumnOpt = Annotated[Optional[str], typer.Option("--text-column", "-t", help="Column holding the text. [env: HFBATCH_TEXT_COLUMN; default: text]")]
CacheDirOpt = Annotated[Optional[Path], typer.Option("--cache-dir", help="Embedding cache directory. [env: HFBATCH_CACHE_DIR; default: user cache dir]")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps. [env: HFBATCH_DEVICE]")]
EndpointOpt = Annotated[Optional[str], typer.Option("--endpoint", help="Server URL: TEI base (http://host:8080), OpenAI-compatible base (.../v1) or an Inference Endpoint URL. [env: HFBATCH_ENDPOINT]")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks. [env: HFBATCH_DEBUG]")]


def _version(value: bool) -> None:
    if value:
        out.print(f"hfbatch {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """hfbatch: batch embeddings with Hugging Face models."""


@app.command()
def embed(
    input: Annotated[Path, typer.Argument(help="Input file: .csv, .tsv, .jsonl, .ndjson (optionally .gz) or .parquet.", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output Parquet file; a <output>.meta.json sidecar is written beside it.", show_default=False)],
    text_column: TextColumnOpt = None,
    keep: Annotated[Optional[str], typer.Option("--keep", help="Comma-separated input columns to pass through (default: all).")] = None,
    fmt: Annotated[Optional[str], typer.Option("--format", "-f", help="csv, jsonl or parquet; default: from the extension.")] = None,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", "-b", help="Texts per model call. [env: EMBEDDING_BATCH_SIZE; default: 32]")] = None,
    chunk_size: Annotated[Optional[int], typer.Option("--chunk-size", help="Rows read, embedded and written at a time. [env: HFBATCH_CHUNK_SIZE; default: 10000]")] = None,
    max_length: Annotated[Optional[int], typer.Option("--max-length", help="Tokens per text; longer texts are truncated. Default: the model's max_seq_length.")] = None,
    normalize: Annotated[bool, typer.Option("--normalize/--no-normalize", help="Unit-length vectors.")] = True,
    cache_dir: CacheDirOpt = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Neither read nor write the cache. [env: ENABLE_EMBEDDING_CACHE=false]")] = False,
    backend: Annotated[str, typer.Option("--backend", help="local, hf-api (alias api), tei, openai, or auto (local, falling back to --fallback).")] = "local",
    endpoint: EndpointOpt = None,
    fallback: Annotated[str, typer.Option("--fallback", help="The remote that --backend auto falls back to: hf-api, tei or openai.")] = "hf-api",
    api_batch_size: Annotated[int, typer.Option("--api-batch-size", help="Texts per HTTP request (halved automatically on 413).")] = 32,
    api_concurrency: Annotated[int, typer.Option("--api-concurrency", help="HTTP requests in flight at once.")] = 4,
    api_timeout: Annotated[Optional[float], typer.Option("--api-timeout", help="Seconds per HTTP request. [env: HUGGINGFACE_API_TIMEOUT; default: 60]")] = None,
    api_retries: Annotated[int, typer.Option("--api-retries", help="Attempts per HTTP request on transient errors (429, 5xx, timeouts).")] = 5,
    remote_pooling: Annotated[Optional[str], typer.Option("--remote-pooling", help="mean: average token-level (3-D) answers into one vector per text.")] = None,
    tokenizer: Annotated[Optional[str], typer.Option("--tokenizer", help="Hub id or directory of the tokenizer used to count tokens for remote backends (default: --model).")] = None,
    on_invalid: Annotated[str, typer.Option("--on-invalid", help="Rows with null/empty/non-string text: mark (keep, with embedding_error), skip (drop) or fail.")] = "mark",
    as_json: Annotated[bool, typer.Option("--json", help="Print the sidecar document (provenance + metrics) to stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar and no summary.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Embed the text column of INPUT into a Parquet file, with a cache and a provenance sidecar."""
    settings = _settings_or_exit(debug)
    options = EmbedOptions(
        input=input,
        output=output,
        text_column=text_column,
        keep=[c.strip() for c in keep.split(",") if c.strip()] if keep else None,
        format=fmt,
        model=model,
        device=device,
        batch_size=batch_size,
        chunk_size=chunk_size,
        max_length=max_length,
        normalize=normalize,
        use_cache=False if no_cache else None,
        cache_dir=cache_dir,
        on_invalid=on_invalid,
        backend=backend,
        endpoint=endpoint,
        fallback=fallback,
        api_batch_size=api_batch_size,
        api_concurrency=api_concurrency,
        api_timeout=api_timeout,
        api_retries=api_retries,
        remote_pooling=remote_pooling,
        tokenizer=tokenizer,
        command=["hfbatch", *sys.argv[1:]],
    )
    progress = NullProgress() if (quiet or as_json) else RichProgress(err)
    result = _run(lambda: run_embed(options, progress=progress, settings=settings), debug or settings.debug)
    if as_json:
        # plain write, not rich: a console would wrap long lines inside JSON strings
        sys.stdout.write(json.dumps(result.document, indent=2, default=str) + "\n")
    elif not quiet:
        _summary(result)


def _settings_or_exit(debug: bool) -> Settings:
    return _run(Settings.load, debug)


def _run(job, debug: bool):  # type: ignore[no-untyped-def]
    """Run `job`; turn errors into one line and the documented exit code."""
    try:
        return job()
    except HfbatchError as exc:
        if debug:
            sys.stderr.write(redact_text(traceback.format_exc()))
        err.print(f"[bold red]{type(exc).__name__}[/]: {escape(redact_text(str(exc)))}", soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        err.print("interrupted: no output was written; rerun the same command to resume from the cache.")
        raise typer.Exit(130) from None
    except Exception as exc:  # a bug or an unforeseen failure: still one line, still no output
        if debug:
            sys.stderr.write(redact_text(traceback.format_exc()))
        err.print(
            f"[bold red]error[/]: {type(exc).__name__}: {escape(redact_text(str(exc)))} "
            "(no output was written; rerun with --debug for the traceback)",
            soft_wrap=True,
        )
        raise typer.Exit(1) from None


def _summary(result: EmbedResult) -> None:
    m, p = result.metrics, result.document["provenance"]
    table = Table(title="hfbatch embed", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    cache = m["cache"]
    rows = [
        ("output", f"{result.output} ({m['rows_written']:,} rows)"),
        ("sidecar", str(result.sidecar)),
        ("model", escape(f"{p['model_id']} [{p['model_source']}]")),
        ("device", str(p["device"])),
        ("rows", f"{m['rows_total']:,} read, {m['rows_embedded']:,} embedded, {m['rows_invalid']:,} invalid, "
                 f"{m['rows_skipped']:,} skipped, {m['rows_truncated']:,} truncated"),
        ("cache", f"{cache['hits']:,} hits, {cache['misses']:,} misses ({cache['hit_rate']:.0%} hit rate)"
                  if cache["enabled"] else "off"),
        ("computed", f"{m['texts_computed']:,} texts in {m['batches']:,} batches, {m['tokens_computed']:,} tokens"),
        ("time", f"{m['wall_seconds']:.2f}s wall ({m['rows_per_second'] or 0:,.0f} rows/s), model load {m['model_load_seconds']:.2f}s"),
        ("peak memory", f"{m['peak_rss_mb']:,.0f} MiB"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    out.print(table)


def main() -> None:
    """Console-script entry point."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    app()


if __name__ == "__main__":
    main()
