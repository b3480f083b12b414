"""A many-part job's parts: found in the input, and resolved once into where each is read and written.

Input discovery: a directory (a store's prefix) or a glob of parts (`is_multi_input`,
`expand_inputs`): the files below it that hfbatch can read, hidden and `_`-prefixed names and
sidecars aside; a glob walks as a directory does (a symlink to a directory is never entered).

`resolve_parts(spec, out_dir, fmt=..., shard=...)` turns the input spec and the output directory
into frozen values, local paths and a store's RemotePath alike:

    Part(input=data/2026/a.csv, relative="2026/a.csv",
         output=out/2026/a.parquet, name="2026/a.parquet", sidecar=out/_hfbatch/2026/a.parquet.meta.json)

`JobParts` holds every part of the input (so that every shard's host names the outputs alike:
`io.plan.part_outputs`), this shard's own, and the job sidecar. The engines iterate those values
and ask a Part for its paths; they derive none.

Shards (`--shard I/N`, I = 1..N) take whole parts by a hash of the part's path relative to the
input root (`shard_of`): every host computes the same assignment from its own listing, without
talking to the others, and a file added later does not move the other files between shards.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import InputError
from .plan import part_outputs
from .readers import detect_format, open_reader
from .sidecars import is_sidecar_name, job_sidecar_path, part_sidecar_path
from .stores import RemotePath, is_remote, location

_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class Part:
    """One part of a many-part job: its input file and where its output and sidecar go."""

    input: Path  # the part's file (a RemotePath in a store)
    relative: str  # its path below the input root: its name in the job sidecar, and what shards it
    output: Path  # its Parquet output in the output directory
    name: str  # the output's path below the output directory, as the job sidecar records it
    sidecar: Path  # out/_hfbatch/<name>.meta.json


@dataclass(frozen=True)
class JobParts:
    """Every part of a many-part job, resolved (see `resolve_parts`)."""

    root: Path  # the input root: parts are named relative to it
    out_dir: Path
    every: tuple[Part, ...]  # every part of the input, in input order, whichever shard this is
    mine: tuple[Part, ...]  # the parts of this shard, in input order
    job_sidecar: Path  # this shard's job sidecar
    input_is_dir: bool  # the input is a directory: no write may go inside it


def resolve_parts(spec: str | Path, out_dir: Path, *, fmt: str | None = None,
                  shard: tuple[int, int] = (1, 1)) -> JobParts:
    """The parts of `spec` (a directory, a glob, or one file: a job of one part) and where each
    one's output and sidecar go in `out_dir` (normalised: `io.plan.normal_location`). Our own
    outputs are never parts. InputError (exit 2) when there are no parts, when `out_dir` is the
    input directory, or when two parts would write one output."""
    given = location(spec)
    if given.is_file():
        root, inputs = given.parent, [given]
        input_is_dir = False
    else:
        root, inputs = expand_inputs(spec, fmt)
        input_is_dir = given.is_dir()
    inside = out_dir.resolve()
    inputs = [p for p in inputs if inside not in p.resolve().parents]  # our own outputs are never inputs
    if not inputs or inside == root.resolve():
        raise InputError(f"-o {out_dir} is the input directory; give the output its own directory.")
    outputs = part_outputs(root, inputs, out_dir)  # every part's, so that every shard names them alike
    every = tuple(Part(p, str(p.relative_to(root)), outputs[p], str(outputs[p].relative_to(out_dir)),
                       part_sidecar_path(out_dir, outputs[p])) for p in inputs)
    mine = tuple(p for p in every if shard_of(p.relative, shard[1]) == shard[0])
    return JobParts(root, out_dir, every, mine, job_sidecar_path(out_dir, shard), input_is_dir)


def is_multi_input(spec: str | Path) -> bool:
    """A directory (a store's prefix), or a pattern with glob characters that is not itself a file."""
    path = location(spec)
    return path.is_dir() or (bool(_GLOB_CHARS & set(str(spec))) and not path.is_file())


def expand_inputs(spec: str | Path, fmt: str | None = None) -> tuple[Path, list[Path]]:
    """(root, parts): the files of a directory (recursively) or of a glob, sorted, that hfbatch can
    read; hidden and underscore-prefixed files (_SUCCESS, .crc, our own sidecars) are not parts."""
    text = str(spec)
    if is_remote(text):
        root, candidates = _store_candidates(RemotePath(text))
    elif Path(text).is_dir():
        root = Path(text)
        candidates = [p for p in root.rglob("*") if p.is_file()]
    else:
        candidates = glob_files(text)
        root = Path(os.path.commonpath([str(p.parent) for p in candidates])) if candidates else Path(text).parent
    parts = []
    for path in sorted(candidates):
        relative = path.relative_to(root)
        if any(piece.startswith((".", "_")) for piece in relative.parts) or is_sidecar_name(path.name):
            continue
        try:
            detect_format(path, fmt)
        except InputError:
            continue  # not a data file (README, checksums): a directory of parts often has some
        parts.append(path)
    if not parts:
        raise InputError(f"{spec}: no CSV, JSONL or Parquet files there; give a directory of parts or a glob "
                         "like 'data/part-*.parquet' (quoted, so the shell leaves it to hfbatch).")
    return root, parts


def _store_candidates(spec: RemotePath) -> tuple[RemotePath, list[RemotePath]]:
    """(root, objects) of a store's prefix (every object below it) or glob (its matches, under the
    deepest prefix without a glob character)."""
    if not _GLOB_CHARS & set(spec.key):
        return spec, list(spec.walk_files())
    found = spec.glob(spec.key)
    pieces = spec.key.split("/")
    fixed = next(i for i, piece in enumerate(pieces) if _GLOB_CHARS & set(piece))
    root = RemotePath(f"{spec.scheme}://{'/'.join(pieces[:fixed])}")
    return root, found


def glob_files(pattern: str) -> list[Path]:
    """Files matching a glob (`**` for any depth), walked as a directory input is: a symlink to a
    directory is never entered, so a symlink loop neither repeats files (glob.glob listed one file
    41 times, as loop/loop/...) nor hangs (two loops). A symlink to a file is a file."""
    pieces = Path(pattern).parts
    fixed = next((i for i, piece in enumerate(pieces) if _GLOB_CHARS & set(piece)), len(pieces))
    base, rest = Path(*pieces[:fixed]) if fixed else Path("."), list(pieces[fixed:])
    if not rest:
        return [base] if base.is_file() else []
    if rest[-1] == "**":
        rest.append("*")  # glob's "data/**" is every file below data
    wants_hidden = any(piece.startswith(".") for piece in rest)  # glob's * skips dot names unless asked
    linked: dict[Path, bool] = {}
    files = []
    for path in base.glob(os.path.join(*rest)):  # pathlib's ** does not follow directory symlinks
        relative = path.relative_to(base).parts
        if not wants_hidden and any(piece.startswith(".") for piece in relative):
            continue
        folders = [base.joinpath(*relative[: i + 1]) for i in range(len(relative) - 1)]
        if any(linked.setdefault(d, d.is_symlink()) for d in folders):  # a "*/" level through a directory symlink
            continue
        if path.is_file():
            files.append(path)
    return files


def parse_shard(text: str | None) -> tuple[int, int]:
    """'3/8' -> (3, 8); shards are numbered 1..N."""
    if not text:
        return 1, 1
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise InputError(f"--shard {text!r}: give it as I/N, e.g. 3/8 for the third of eight hosts.") from None
    if count < 1 or not 1 <= index <= count:
        raise InputError(f"--shard {text!r}: shards are numbered 1..N (N >= 1), e.g. 1/4 .. 4/4.")
    return index, count


def shard_of(relative: str, count: int) -> int:
    """The shard (1..count) that owns a part: a hash of its relative path, the same on every host."""
    digest = hashlib.blake2b(relative.replace(os.sep, "/").encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % count + 1


def input_id(spec: str | Path) -> str:
    """What says two runs are one job: their input (directory or glob) made absolute, hashed (a hash,
    not a path, so --relative-paths leaves it alone and it shows nothing of the machine)."""
    where = str(spec) if is_remote(spec) else os.path.abspath(str(spec))
    return hashlib.blake2b(where.encode(), digest_size=12).hexdigest()


__all__ = ["Part", "JobParts", "resolve_parts", "is_multi_input", "expand_inputs", "glob_files", "parse_shard", "shard_of",
           "input_id"]


@contextmanager
def joined_parts(spec: str | Path, fmt: str | None, *, chunk_size: int, max_line_bytes: int | None,
                 directory: Path | None = None, same_type: tuple[str, ...] = ()) -> Iterator[Path]:
    """The rows of every part of `spec`, in part order, in one temp Parquet file (removed when the
    block exits), for a job that reads its parts as one input: a sync into a table target, whose
    deletes and one commit need every part's ids. Each part must have the first part's columns,
    of types that convert without loss, and the columns `same_type` (the ids) of the very same type
    (text ids in one part and integers in another are refused, naming the part and the column). A
    local copy of the input, streamed chunk by chunk."""
    _, parts = expand_inputs(spec, fmt)
    handle, name = tempfile.mkstemp(suffix=".parquet", prefix=".hfbatch-parts-", dir=directory)
    os.close(handle)
    copy = Path(name)
    writer: pq.ParquetWriter | None = None
    schema: pa.Schema | None = None
    try:
        for part in parts:
            reader = open_reader(part, fmt=fmt, chunk_size=chunk_size, max_line_bytes=max_line_bytes)
            if schema is None:
                schema = reader.schema
                writer = pq.ParquetWriter(str(copy), schema, compression="zstd")
            elif sorted(reader.schema.names) != sorted(schema.names):
                extra = [n for n in reader.schema.names if n not in schema.names]
                missing = [n for n in schema.names if n not in reader.schema.names]
                raise InputError(f"{part}: its columns differ from {parts[0]}'s (" + "; ".join(
                    x for x in (f"it has {', '.join(map(repr, extra))}" if extra else "",
                                f"it lacks {', '.join(map(repr, missing))}" if missing else "") if x)
                    + "); every part of one input needs the same columns.")
            for name in same_type:
                if name in schema.names and reader.schema.field(name).type != schema.field(name).type:
                    raise InputError(f"{part}: column {name!r} is {reader.schema.field(name).type} where {parts[0]} has "
                                     f"{schema.field(name).type}; ids of one input are of one type (give them as text, "
                                     "or as integers, in every part).")
            for chunk in reader.chunks():
                batch = chunk.batch.select(schema.names)
                try:
                    batch = batch.cast(schema) if batch.schema != schema else batch
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
                    differ = [f"{f.name!r} is {batch.schema.field(f.name).type}, not {f.type}"
                              for f in schema if batch.schema.field(f.name).type != f.type]
                    raise InputError(f"{part}: column {differ[0] if differ else '?'} as in {parts[0]}; every part of "
                                     "one input needs the same column types (cast them, or give ids as text in "
                                     "every part).") from None
                assert writer is not None
                writer.write_batch(batch)
        if writer is not None:
            writer.close()
            writer = None
        yield copy
    finally:
        if writer is not None:
            writer.close()
        copy.unlink(missing_ok=True)
