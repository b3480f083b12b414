"""EmbedOptions: everything one embed job needs, as the library and the CLI both build it."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

from .errors import InputError
from .io.plan import check_output_path
from .settings import Settings, parse_byte_size
from .validate import ON_INVALID


@dataclass(frozen=True)
class EmbedOptions:
    """Options of one `embed` job. None means "take it from Settings" (environment, defaults)."""

    input: Path
    output: Path
    text_column: str | None = None
    keep: Sequence[str] | None = None
    format: str | None = None
    model: str | None = None
    backend: str = "local"
    device: str | None = None
    batch_size: int | None = None
    chunk_size: int | None = None
    max_length: int | None = None
    normalize: bool = True
    precision: str = "fp32"
    runtime: str = "torch"
    quantize: str | None = None  # None: from ENABLE_MODEL_QUANTIZATION
    max_batch_tokens: int | None = None
    use_cache: bool | None = None
    cache_dir: Path | None = None
    cache_size_bytes: int | None = None
    on_invalid: str = "mark"
    trust_remote_code: bool = False  # run code that ships with a model (--trust-remote-code)
    relative_paths: bool = False  # paths in the sidecar relative to the output's folder (for sharing)
    max_errors: int | None = None  # stop (exit 1, nothing written) once more rows than this are invalid
    max_line_bytes: int | str | None = None  # longest JSONL line / CSV row: bytes or "64MiB"; None: from settings
    # remote backends (hf-api, tei, openai) and --backend auto
    endpoint: str | None = None
    fallback: str = "hf-api"
    api_batch_size: int = 32
    api_concurrency: int = 4
    api_timeout: float | None = None
    api_retries: int = 5
    api_retry_ceiling: float = 300.0
    remote_pooling: str | None = None
    tokenizer: str | None = None
    # monitoring
    metrics_file: Path | None = None
    log_file: Path | None = None
    command: Sequence[str] = field(default_factory=tuple)

    def resolved(self, settings: Settings) -> "EmbedOptions":
        """Fill unset options from settings and check the values that need no file or model."""
        opts = replace(
            self,
            input=Path(self.input),
            output=Path(self.output),
            text_column=self.text_column or settings.text_column,
            model=self.model or settings.model,
            device=self.device or settings.device,
            batch_size=settings.batch_size if self.batch_size is None else self.batch_size,
            chunk_size=settings.chunk_size if self.chunk_size is None else self.chunk_size,
            use_cache=settings.cache_enabled if self.use_cache is None else self.use_cache,
            cache_dir=Path(self.cache_dir).expanduser() if self.cache_dir else settings.cache_dir,
            cache_size_bytes=self.cache_size_bytes or settings.cache_size_bytes,
            keep=list(dict.fromkeys(self.keep)) if self.keep is not None else None,  # --keep id,id: once
            api_timeout=self.api_timeout or settings.api_timeout,
            endpoint=self.endpoint or settings.endpoint,
            quantize=self.quantize if self.quantize is not None else ("int8" if settings.quantize else "none"),
            max_line_bytes=settings.max_line_bytes if self.max_line_bytes is None
            else parse_byte_size(self.max_line_bytes, "--max-line-bytes"),
        )
        if opts.api_retries < 1:
            raise InputError(f"--api-retries must be at least 1 (got {opts.api_retries}).")
        for name in ("batch_size", "chunk_size"):
            if getattr(opts, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(opts, name)}).")
        if opts.max_batch_tokens is not None and opts.max_batch_tokens < 1:
            raise InputError(f"--max-batch-tokens must be at least 1 (got {opts.max_batch_tokens}).")
        if opts.max_length is not None and opts.max_length < 2:
            raise InputError(f"--max-length must be at least 2 tokens (got {opts.max_length}).")
        if opts.on_invalid not in ON_INVALID:
            raise InputError(f"--on-invalid {opts.on_invalid!r} is not one of: {', '.join(ON_INVALID)}.")
        if opts.max_errors is not None and opts.max_errors < 0:
            raise InputError(f"--max-errors must be 0 or more (got {opts.max_errors}); 0 stops at the first invalid row.")
        check_output_path(opts.input, opts.output)
        return opts

    @property
    def sidecar(self) -> Path:
        return sidecar_path(Path(self.output))


def sidecar_path(output: Path) -> Path:
    """`<output>.meta.json`: provenance and metrics beside the Parquet file."""
    return output.with_name(output.name + ".meta.json")
