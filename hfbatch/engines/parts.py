"""Embed jobs over many files: a directory or glob of parts, shards across hosts, resume.

Each input part goes through the one pipeline (`run_embed`) into its own output part, at the same
relative path under the output directory (`data/2026/a.csv` -> `out/2026/a.parquet`, with its own
sidecar). A job sidecar (`_hfbatch_job.json`, or `_hfbatch_job.shard-I-of-N.json`) lists every
part of this run with its rows and status, rewritten atomically after each part, so an
interrupted 1,000-file job shows how far it got. On rerun a part is skipped when its output and
sidecar exist, its input bytes are unchanged (the sidecar's input hash) and the options that
shape vectors are the same (`options_key`).

Shards (`--shard I/N`, I = 1..N) take whole parts by a hash of the part's path relative to the
input root: every host computes the same assignment from its own listing, without talking to the
others, and a file added later does not move the other files between shards. `merge_job_sidecars`
(`hfbatch merge-meta`) checks that the shards' sidecars account for every part exactly once.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from ..errors import HfbatchError, InputError
from ..io.readers import detect_format
from ..io.writers import write_json_atomic
from ..options import EmbedOptions, sidecar_path
from ..jobs.embed import run_embed
from ..monitoring import NullObserver, Observer
from ..provenance import file_digest, library_versions, redact, relative_paths, utc_now
from ..settings import Settings

JOB_SIDECAR = "_hfbatch_job"
_GLOB_CHARS = set("*?[")
# fields of EmbedOptions that decide what the vectors are; the rest (paths, batching, retries) do not
_KEY_FIELDS = ("model", "text_column", "keep", "format", "normalize", "max_length", "precision", "runtime",
               "quantize", "on_invalid", "backend", "endpoint", "fallback", "remote_pooling")


def is_multi_input(spec: str | Path) -> bool:
    """A directory, or a pattern with glob characters that is not itself a file."""
    path = Path(spec)
    return path.is_dir() or (bool(_GLOB_CHARS & set(str(spec))) and not path.is_file())


def expand_inputs(spec: str | Path, fmt: str | None = None) -> tuple[Path, list[Path]]:
    """(root, parts): the files of a directory (recursively) or of a glob, sorted, that hfbatch can
    read; hidden and underscore-prefixed files (_SUCCESS, .crc, our own sidecars) are not parts."""
    text = str(spec)
    if Path(text).is_dir():
        root = Path(text)
        candidates = [p for p in root.rglob("*") if p.is_file()]
    else:
        candidates = glob_files(text)
        root = Path(os.path.commonpath([str(p.parent) for p in candidates])) if candidates else Path(text).parent
    parts = []
    for path in sorted(candidates):
        relative = path.relative_to(root)
        if any(piece.startswith((".", "_")) for piece in relative.parts) or path.name.endswith(".meta.json"):
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


def part_output(out_dir: Path, root: Path, part: Path) -> Path:
    """out_dir / relative path, the data suffixes (.csv, .jsonl.gz, ...) replaced by .parquet."""
    relative = part.relative_to(root)
    name = relative.name
    for suffix in reversed(relative.suffixes):
        if suffix.lower() in (".gz", ".csv", ".tsv", ".jsonl", ".ndjson", ".json", ".parquet", ".pq"):
            name = name[: -len(suffix)]
        else:
            break
    return out_dir / relative.parent / f"{name}.parquet"


def options_key(opts: EmbedOptions) -> str:
    values = {name: getattr(opts, name) for name in _KEY_FIELDS}
    values["keep"] = list(values["keep"]) if values["keep"] is not None else None
    return hashlib.blake2b(json.dumps(values, sort_keys=True, default=str).encode(), digest_size=12).hexdigest()


def job_sidecar_path(out_dir: Path, shard: tuple[int, int]) -> Path:
    index, count = shard
    return out_dir / (f"{JOB_SIDECAR}.json" if count == 1 else f"{JOB_SIDECAR}.shard-{index}-of-{count}.json")


@dataclass
class PartRecord:
    input: str  # relative to the input root
    output: str  # relative to the output directory
    status: str  # done | skipped (complete from an earlier run) | failed
    rows_in: int | None = None
    rows_out: int | None = None
    rows_invalid: int | None = None
    texts_computed: int | None = None
    cache_hits: int | None = None
    input_hash: str | None = None
    seconds: float | None = None
    error: str | None = None


@dataclass
class PartsResult:
    output_dir: Path
    sidecar: Path
    document: dict[str, Any]

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [p for p in self.document["parts"] if p["status"] == "failed"]


def run_embed_parts(options: EmbedOptions, *, shard: tuple[int, int] = (1, 1),
                    observer: Observer | None = None, settings: Settings | None = None) -> PartsResult:
    """Embed every part of `options.input` (a directory or glob) owned by `shard` into the
    directory `options.output`. A part with bad data is marked failed and the others go on (the
    job then exits 1); an error of the model or backend stops the job, with the sidecar saying
    which parts are done."""
    settings = settings or Settings.load()
    out_dir = Path(options.output)
    if out_dir.suffix.lower() in (".parquet", ".pq") or out_dir.is_file():
        raise InputError(f"-o {out_dir}: with many input files the output is a directory; give one, e.g. -o out/.")
    if options.metrics_file is not None:
        raise InputError("--metrics-file is written per job for one input file; with many files each part's "
                         "sidecar and the job sidecar carry the metrics. Drop --metrics-file.")
    root, parts = expand_inputs(options.input, options.format)
    inside = out_dir.resolve()
    parts = [p for p in parts if inside not in p.resolve().parents]  # our own outputs are never inputs
    if not parts or inside == root.resolve():
        raise InputError(f"-o {out_dir} is the input directory; give the output its own directory.")
    mine = [p for p in parts if shard_of(str(p.relative_to(root)), shard[1]) == shard[0]]
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"-o {out_dir}: cannot create the directory ({exc.strerror or exc}).") from None
    probe = replace(options, input=parts[0], output=part_output(out_dir, root, parts[0]))
    key = options_key(probe.resolved(settings))  # resolved as a part is: the defaults filled in
    sidecar = job_sidecar_path(out_dir, shard)
    earlier = earlier_records(sidecar, key)
    document: dict[str, Any] = {
        "job": "embed-parts", "tool_version": library_versions()["hfbatch"],
        "command": redact(list(options.command) or sys.argv), "input": str(options.input), "input_root": str(root),
        "output_dir": str(out_dir), "shard": f"{shard[0]}/{shard[1]}", "parts_in_input": len(parts),
        "options_key": key, "started": utc_now(), "parts": [],
    }
    wall = time.perf_counter()
    shared = _OneBar(observer) if observer is not None else None
    try:
        for part in mine:
            relative = str(part.relative_to(root))
            output = part_output(out_dir, root, part)
            record = skip_if_complete(relative, part, output, out_dir, earlier.get(relative))
            if record is None:
                record = _embed_part(options, relative, part, output, out_dir, shared, settings)
            document["parts"].append(asdict(record))
            write_job_sidecar(sidecar, document, wall, finished=False, relative=options.relative_paths)
    except BaseException:
        write_job_sidecar(sidecar, document, wall, finished=False, relative=options.relative_paths)
        raise
    finally:
        if shared is not None:
            shared.close()
    write_job_sidecar(sidecar, document, wall, finished=True, relative=options.relative_paths)
    return PartsResult(out_dir, sidecar, document)


class _OneBar(NullObserver):
    """One progress bar across all parts: each part's start/done would otherwise open a new one."""

    def __init__(self, inner: Observer):
        self.inner, self.started = inner, False

    def start(self, total_rows: int | None) -> None:
        if not self.started:
            self.inner.start(None)  # the total across parts is not known without opening them all
            self.started = True

    def advance(self, rows: int, *, hit_rate: float) -> None:
        self.inner.advance(rows, hit_rate=hit_rate)

    def close(self) -> None:
        if self.started:
            self.inner.done({})


def _embed_part(options: EmbedOptions, relative: str, part: Path, output: Path, out_dir: Path,
                observer: Observer | None, settings: Settings) -> PartRecord:
    started = time.perf_counter()
    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        result = run_embed(replace(options, input=part, output=output), observer=observer, settings=settings)
    except InputError as exc:  # this file's data or columns: the other parts go on
        return PartRecord(relative, str(output.relative_to(out_dir)), "failed", error=str(exc),
                          seconds=round(time.perf_counter() - started, 3))
    m, prov = result.metrics, result.document["provenance"]
    return PartRecord(relative, str(output.relative_to(out_dir)), "done", rows_in=m["rows_total"],
                      rows_out=prov["output"]["rows"], rows_invalid=m["rows_invalid"], texts_computed=m["texts_computed"],
                      cache_hits=m["cache"]["hits"], input_hash=prov["input"]["hash"],
                      seconds=round(time.perf_counter() - started, 3))


def skip_if_complete(relative: str, part: Path, output: Path, out_dir: Path,
                      earlier: dict[str, Any] | None) -> PartRecord | None:
    """The earlier record, marked skipped, if that part's output is whole and still describes these bytes."""
    if not earlier or earlier.get("status") not in ("done", "skipped") or not output.is_file():
        return None
    try:
        meta = json.loads(sidecar_path(output).read_text(encoding="utf-8"))
        recorded = meta["provenance"]["input"]["hash"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if recorded != earlier.get("input_hash") or recorded != file_digest(part):
        return None
    fields = {k: earlier.get(k) for k in ("rows_in", "rows_out", "rows_invalid", "input_hash")}
    return PartRecord(relative, str(output.relative_to(out_dir)), "skipped", texts_computed=0, cache_hits=0,
                      seconds=0.0, **fields)


def earlier_records(sidecar: Path, key: str) -> dict[str, dict[str, Any]]:
    """Parts of an earlier run of this shard with the same vector-shaping options, by input path."""
    try:
        earlier = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(earlier, dict) or earlier.get("options_key") != key:
        return {}
    return {p["input"]: p for p in earlier.get("parts", []) if isinstance(p, dict) and "input" in p}


def write_job_sidecar(sidecar: Path, document: dict[str, Any], wall: float, *, finished: bool, relative: bool = False) -> None:
    parts = document["parts"]
    document["finished"] = utc_now() if finished else None
    document["totals"] = {
        "parts": len(parts),
        **{f"parts_{s}": sum(1 for p in parts if p["status"] == s) for s in ("done", "skipped", "failed")},
        "rows_in": sum(p["rows_in"] or 0 for p in parts), "rows_out": sum(p["rows_out"] or 0 for p in parts),
        "texts_computed": sum(p["texts_computed"] or 0 for p in parts),
        "wall_seconds": round(time.perf_counter() - wall, 3),
    }
    write_json_atomic(sidecar, relative_paths(document, sidecar.parent) if relative else document)


def merge_job_sidecars(out_dir: Path, expected: Sequence[str] | None = None) -> dict[str, Any]:
    """Every job sidecar under `out_dir` together: each part exactly once and complete, and (with
    `expected`, the relative paths of the input's parts) none missing. Metrics summed."""
    sidecars = sorted(Path(out_dir).glob(f"{JOB_SIDECAR}*.json"))
    if not sidecars:
        raise InputError(f"{out_dir}: no {JOB_SIDECAR}*.json job sidecars there; is it the -o of a many-file job?")
    seen: dict[str, list[str]] = {}
    records: list[dict[str, Any]] = []
    keys, shards = set(), []
    for path in sidecars:
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise HfbatchError(f"{path}: not a readable job sidecar ({exc}).") from None
        keys.add(doc.get("options_key"))
        shards.append(doc.get("shard"))
        for record in doc.get("parts", []):
            seen.setdefault(record["input"], []).append(path.name)
            records.append(record)
    problems = []
    problems += [f"{name} is in {len(where)} sidecars ({', '.join(where)})" for name, where in seen.items() if len(where) > 1]
    problems += [f"{r['input']} failed: {r.get('error')}" for r in records if r["status"] == "failed"]
    if expected is not None:
        problems += [f"{name} is in no sidecar (its shard has not run, or not finished)"
                     for name in sorted(set(expected) - set(seen))]
    if len(keys) > 1:
        problems.append("the sidecars come from runs with different options (model, column, ...)")
    counts = [s.split("/")[1] for s in shards if isinstance(s, str) and "/" in s]
    if len(set(counts)) > 1:
        problems.append(f"the sidecars come from different shard counts ({', '.join(sorted(set(counts)))})")
    return {
        "sidecars": [p.name for p in sidecars], "shards": shards, "parts": len(seen),
        "rows_in": sum(r.get("rows_in") or 0 for r in records), "rows_out": sum(r.get("rows_out") or 0 for r in records),
        "texts_computed": sum(r.get("texts_computed") or 0 for r in records),
        "parts_failed": sum(1 for r in records if r["status"] == "failed"),
        "complete": not problems, "problems": problems,
    }
