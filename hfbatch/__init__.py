"""hfbatch: turn files of text into embeddings with Hugging Face models, as a batch job.

    from . import embed_file, EmbedOptions
    result = embed_file(EmbedOptions(input="reviews.csv", output="reviews.parquet"))
    result.document["metrics"]["rows_per_second"]
"""

__version__ = "0.1.0"

from .errors import (  # noqa: E402
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
from .options import EmbedOptions  # noqa: E402
from .jobs.embed import EmbedResult, embed_file, run_embed  # noqa: E402

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
