"""Engines: what runs an embed job over its input, on top of the one chunk core (jobs/core.py).

- one file, in this process: `jobs.embed.run_embed`;
- many files (a directory or a glob of parts), with shards and resume: `engines.parts`;
- Ray Data over a cluster (or a local one): `engines.ray`.

`score()` likewise runs a score job in this process, or with `engine="ray"` on Ray's actors
(engines/ray_score.py), into one output either way.

`embed()` chooses among them exactly as `hfbatch embed` does, so the library and the CLI agree:
`hfbatch.embed(EmbedOptions(input="data/", output="out/"))` is `hfbatch embed data/ -o out/`.
"""

from __future__ import annotations

from ..backends import Backend
from ..errors import InputError
from ..io.parts import is_multi_input, parse_shard
from ..io.targets import is_table_target
from ..jobs.embed import EmbedResult, run_embed
from ..jobs.score import ScoreResult, run_score
from ..monitoring import Observer
from ..options import EmbedOptions, ScoreOptions
from ..settings import Settings
from .parts import PartsResult, run_embed_parts

ENGINES = ("local", "ray")


def embed(options: EmbedOptions, *, engine: str = "local", shard: str | tuple[int, int] | None = None,
          ray_address: str | None = None, num_workers: int = 2, gpus_per_worker: float = 0.0,
          backend: Backend | None = None, observer: Observer | None = None,
          settings: Settings | None = None) -> EmbedResult | PartsResult:
    """Run one embed job with the engine its input and options call for.

    One file with the local engine gives an EmbedResult (one Parquet file and its sidecar); a
    directory or glob of parts, or `engine="ray"`, gives a PartsResult (a directory of parts, a
    sidecar per part under `_hfbatch/`, and a job sidecar). `shard` is "I/N" or (I, N). `backend`
    replaces the one the options name (tests, other programs); the Ray actors make their own.
    Raises InputError (exit 2) before any work for a bad engine or shard.
    """
    if engine not in ENGINES:
        raise InputError(f"--engine {engine!r} is not one of: {', '.join(ENGINES)}.")
    from ..io.targets.postgres import is_postgres_url

    if is_postgres_url(options.input):
        raise InputError("the input: a postgresql:// URL names a table to write (-o); the input is a file, a folder, "
                         "a glob or a store URL.")
    shard_of = parse_shard(shard) if shard is None or isinstance(shard, str) else shard
    sync = options.id_column is not None or is_table_target(options.output)
    if sync and shard_of != (1, 1):
        raise InputError("--shard splits a job's parts over hosts, and a sync by --id-column needs every part's ids "
                         "in one run (its deletes, its one commit); drop --shard.")
    if sync and engine == "ray":  # the driver plans and commits, the actors embed what changed
        if backend is not None:
            raise InputError("the Ray engine's actors make their own backend; a backend object cannot be given.")
        from .ray_sync import run_sync_ray

        return run_sync_ray(options, address=ray_address, num_workers=num_workers, gpus_per_worker=gpus_per_worker,
                            settings=settings)
    if sync:  # many parts are read as one input (jobs/embed.join_parts)
        return run_embed(options, backend=backend, observer=observer, settings=settings)
    if engine == "ray":
        if backend is not None:
            raise InputError("the Ray engine's actors make their own backend; a backend object cannot be given.")
        from .ray import run_embed_ray  # Ray is an optional extra: imported only when asked for

        return run_embed_ray(options, shard=shard_of, address=ray_address, num_workers=num_workers,
                             gpus_per_worker=gpus_per_worker, settings=settings)
    if is_multi_input(options.input):
        return run_embed_parts(options, shard=shard_of, backend=backend, observer=observer, settings=settings)
    if shard_of != (1, 1):
        raise InputError(f"--shard splits a job of many parts; {options.input} is one file. Split it into parts "
                         "(e.g. Parquet row groups written as files) or drop --shard.")
    return run_embed(options, backend=backend, observer=observer, settings=settings)


def score(options: ScoreOptions, *, engine: str = "local", ray_address: str | None = None, num_workers: int = 2,
          gpus_per_worker: float = 0.0, scorer: object = None, observer: Observer | None = None,
          settings: Settings | None = None) -> ScoreResult:
    """Run one score job (`hfbatch score`): in this process, or on Ray's actors with
    `engine="ray"`; one output and sidecar either way (a directory of parts is one input).
    `scorer` replaces the one the options name (local engine only: the actors make their own).
    Raises InputError (exit 2) before any work for a bad engine."""
    if engine not in ENGINES:
        raise InputError(f"--engine {engine!r} is not one of: {', '.join(ENGINES)}.")
    if engine == "ray":
        if scorer is not None:
            raise InputError("the Ray engine's actors make their own scorer; a scorer object cannot be given.")
        from .ray_score import run_score_ray  # Ray is an optional extra: imported only when asked for

        return run_score_ray(options, address=ray_address, num_workers=num_workers, gpus_per_worker=gpus_per_worker,
                             settings=settings)
    return run_score(options, scorer=scorer, observer=observer, settings=settings)


__all__ = ["ENGINES", "embed", "score"]
