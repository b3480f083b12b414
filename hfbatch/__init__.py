"""hfbatch: turn files of text into embeddings with Hugging Face models, as a batch job.

    from . import embed_file, EmbedOptions
    result = embed_file(EmbedOptions(input="reviews.csv", output="reviews.parquet"))
    result.document["metrics"]["rows_per_second"]
"""

from ._version import __version__
from .errors import (
    BackendError,
    HfbatchError,
    InputError,
    ModelLoadError,
    OutputError,
    RemoteError,
    TerminalBackendError,
    TooManyErrors,
    TransientBackendError,
)
from .options import EmbedOptions
from .jobs.embed import EmbedResult, embed_file, run_embed

__all__ = [
    "__version__",
    "embed_file",
    "run_embed",
    "EmbedOptions",
    "EmbedResult",
    "HfbatchError",
    "InputError",
    "OutputError",
    "BackendError",
    "ModelLoadError",
    "RemoteError",
    "TransientBackendError",
    "TerminalBackendError",
    "TooManyErrors",
]
