"""hfbatch: turn files of text into embeddings (and generated text) with Hugging Face models, as
a batch job. The library API is what the CLI calls, one function per command:

    import hfbatch
    result = hfbatch.embed(hfbatch.EmbedOptions(input="reviews.csv", output="reviews.parquet"))
    result.metrics["rows_per_second"]
    hfbatch.embed(hfbatch.EmbedOptions(input="data/", output="out/"))   # many parts, as `hfbatch embed data/ -o out/`
    hfbatch.generate(hfbatch.GenerateOptions(input="prompts.jsonl", output="answers.parquet", model="gpt2"))
    hfbatch.plan(options)      # the dry run: rows, cache hits, tokens, ETA; nothing written
    hfbatch.verify("reviews.parquet")

In memory, no files (the same cache, backends and options as `embed`, given as keywords):

    hfbatch.encode(["a query", "a document"])             # np.ndarray (2, 384) float32
    hfbatch.encode(df, text_column="body", prompt="query: ")   # the DataFrame plus `embedding`...

Errors are one tree (see hfbatch.errors); each has the CLI's exit code as `exit_code`.
"""

from ._version import __version__
from .engines import embed, score
from .engines.parts import PartsResult
from .errors import (
    BackendError,
    HfbatchError,
    InputChangedError,
    InputError,
    ModelLoadError,
    OutputError,
    RemoteError,
    TerminalBackendError,
    TooManyErrors,
    TransientBackendError,
)
from .jobs.embed import EmbedResult, run_embed
from .jobs.encode import encode
from .jobs.generate import GenerateResult, run_generate
from .jobs.score import ScoreResult
from .options import EmbedOptions, GenerateOptions, ScoreOptions
from .tools.dry_run import plan_embed as plan
from .tools.search import search
from .tools.verify import verify_output as verify

generate = run_generate

__all__ = [
    "__version__",
    "embed",
    "encode",
    "generate",
    "score",
    "plan",
    "search",
    "verify",
    "run_embed",
    "EmbedOptions",
    "GenerateOptions",
    "ScoreOptions",
    "EmbedResult",
    "GenerateResult",
    "ScoreResult",
    "PartsResult",
    "HfbatchError",
    "InputError",
    "OutputError",
    "BackendError",
    "ModelLoadError",
    "RemoteError",
    "TransientBackendError",
    "TerminalBackendError",
    "TooManyErrors",
    "InputChangedError",
]
