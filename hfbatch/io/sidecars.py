"""Where sidecars go: the one set of path rules for every document hfbatch writes beside its data.

    out.parquet.meta.json                   a one-file job's sidecar, beside its output
    out/_hfbatch/2026/a.parquet.meta.json   a part's sidecar in a many-part output directory `out/`,
                                            under `_hfbatch/` (readers of the dataset skip `_` names)
    out/_hfbatch_job.json                   the job sidecar (`_hfbatch_job.shard-I-of-N.json`)

Local paths and a store's RemotePath alike. Used by the options (a job's default sidecar), the
many-part engines (through `io.parts.Part`), --calibration (is this a sidecar?) and verify (which
sidecar is this output's?).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .stores import RemotePath

SIDECAR_SUFFIX = ".meta.json"
PART_SIDECARS = "_hfbatch"  # out/_hfbatch/<output relative path>.meta.json
JOB_SIDECAR = "_hfbatch_job"


def sidecar_path(output: Path) -> Path:
    """`<output>.meta.json`: provenance and metrics beside the Parquet file."""
    return output.with_name(output.name + SIDECAR_SUFFIX)


def is_sidecar_name(name: str) -> bool:
    """Whether a file's name is a sidecar's (`*.meta.json`): never an input part."""
    return name.endswith(SIDECAR_SUFFIX)


def part_sidecar_path(out_dir: Path, output: Path) -> Path:
    """Where a part's sidecar goes: `out/_hfbatch/<output relative to out/>.meta.json`, out of the
    dataset's way (readers skip `_` names) and one per output, however the outputs are named."""
    if isinstance(out_dir, RemotePath):
        return sidecar_path(out_dir / PART_SIDECARS / output.relative_to(out_dir).as_posix())  # type: ignore[arg-type]
    return sidecar_path(Path(out_dir) / PART_SIDECARS / Path(output).relative_to(out_dir))


def job_sidecar_path(out_dir: Path, shard: tuple[int, int]) -> Path:
    """The job sidecar of shard I of N in `out_dir`."""
    index, count = shard
    return out_dir / (f"{JOB_SIDECAR}.json" if count == 1 else f"{JOB_SIDECAR}.shard-{index}-of-{count}.json")


def job_sidecars(out_dir: Any) -> list[Any]:
    """Every shard's job sidecar in `out_dir` (a Path or RemotePath), sorted."""
    if isinstance(out_dir, RemotePath):
        return sorted(out_dir.glob(f"{out_dir.key}/{JOB_SIDECAR}*.json"))
    return sorted(Path(out_dir).glob(f"{JOB_SIDECAR}*.json"))


def find_sidecar(output: Path) -> Path:
    """`output`'s sidecar: beside it, or for a part of a many-part output directory `out/`,
    `out/_hfbatch/<its path in out>.meta.json` (out: the nearest folder above it that has one).
    The one beside it when there is none."""
    beside = sidecar_path(output)
    if beside.is_file():
        return beside
    full = output.absolute()
    return next((s for s in (part_sidecar_path(d, full) for d in full.parents) if s.is_file()), beside)


__all__ = ["SIDECAR_SUFFIX", "PART_SIDECARS", "JOB_SIDECAR", "sidecar_path", "is_sidecar_name", "part_sidecar_path",
           "job_sidecar_path", "job_sidecars", "find_sidecar"]
