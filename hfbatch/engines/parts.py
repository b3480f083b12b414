"""Embed jobs over many files: a directory or glob of parts, shards across hosts, resume.

The output directory is a Parquet dataset: readers of `out/` (pyarrow, pandas, Polars, DuckDB,
Spark, `datasets`) skip names that start with `_` or `.`, so everything but the data goes there:

    out/2026/a.parquet                      one output per input part, at its relative path
    out/_hfbatch/2026/a.parquet.meta.json   that part's sidecar (the document run_embed writes)
    out/_hfbatch_job.json                   the job sidecar (`_hfbatch_job.shard-I-of-N.json`)

The parts are found and resolved once, in io/ (`io.parts.resolve_parts`): each a frozen `Part`
with its input, its name relative to the input root, its output and its sidecar (the path rules in
`io.sidecars`). Output names come from `io.plan.part_outputs` over every part of the input (so
every shard's host finds the same ones): data suffixes become `.parquet`, and parts that would
collide (`a.csv` + `a.jsonl`) keep their whole name (`a.csv.parquet`, `a.jsonl.parquet`). Every
path the job writes (outputs, part sidecars, job sidecar, --log-file) is planned and checked before
any model work (`io.plan.plan_outputs`; a refusal is exit 2).

`PartsJob` (made by `plan_parts`) is what the two many-part engines share, this one (each part
through `run_embed`) and engines/ray.py: the plan, resume, and the job sidecar, which lists every
part of this run with its rows and status and is rewritten atomically after each part, so an
interrupted 1,000-file job shows how far it got. On rerun a part is skipped when its output and
sidecar exist and are one run's pair (in a store: the data object is the one the sidecar names by
its ETag, one HEAD; everywhere: the provenance the Parquet file carries is the sidecar's, from the
footer read for its row count), its input bytes are unchanged (the sidecar's input hash) and the
options that shape vectors are the same (`options_key`); a part killed between its data and its
sidecar is so embedded again, never skipped. What an earlier run of the same job wrote that this
one no longer names (an output renamed by a collision, a part gone from the input, sidecars of the
layout before `_hfbatch/`) is removed first, and a part that fails loses its earlier output, so
that the job sidecar's totals are the rows a reader of `out/` gets.

Shards (`--shard I/N`) take whole parts by a hash of the part's relative path (`io.parts.shard_of`).
`merge_job_sidecars` (`hfbatch merge-meta`) checks that the shards' sidecars account for every part
exactly once.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path, PurePath
from typing import Any, Collection, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from ..backends import Backend, make_backend
from ..errors import HfbatchError, InputChangedError, InputError
from ..io.parts import JobParts, Part, input_id, resolve_parts
from ..io.plan import normal_location, plan_outputs
from ..io.sidecars import JOB_SIDECAR, PART_SIDECARS, job_sidecars, part_sidecar_path, sidecar_path
from ..io.stores import RemotePath, location
from ..io.writers import METADATA_KEY, publishing, write_json_atomic
from ..jobs.embed import calibrate_ranges, run_embed
from ..monitoring import NullObserver, Observer
from ..options import EmbedOptions, output_identity
from ..provenance import file_digest, library_versions, redact, relative_paths, utc_now
from ..settings import Settings
from ..vectors import CALIBRATED


def options_key(opts: EmbedOptions) -> str:
    """What an earlier run must share with this one for its parts to be taken as done."""
    return hashlib.blake2b(json.dumps(output_identity(opts), sort_keys=True).encode(), digest_size=12).hexdigest()


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


@dataclass
class PartsJob:
    """A many-part job, planned (see `plan_parts`): its parts, resolved once (`io.parts.JobParts`:
    which parts this shard embeds, where each one's output and sidecar go), what an earlier run
    finished, and the job sidecar, rewritten as each part is recorded. Both engines run on it."""

    options: EmbedOptions
    resolved: EmbedOptions  # resolved as the first part is: what the actors of the Ray engine take
    parts: JobParts
    earlier: dict[str, dict[str, Any]]  # parts of an earlier run with the same options, by input path
    document: dict[str, Any]
    records: dict[str, PartRecord] = field(default_factory=dict)
    wall: float = field(default_factory=time.perf_counter)
    fingerprint: str | None = None  # the vectors' identity once the runtime is settled: parts made otherwise are redone

    @property
    def mine(self) -> tuple[Part, ...]:
        """The parts of this shard, in input order."""
        return self.parts.mine

    @property
    def sidecar(self) -> Path:
        """The job sidecar."""
        return self.parts.job_sidecar

    def part_options(self, part: Part) -> EmbedOptions:
        """The options of one part's job (unresolved, as given): its input, output and sidecar."""
        return replace(self.options, input=part.input, output=part.output, sidecar_file=part.sidecar)

    def resume(self, part: Part) -> bool:
        """Record `part` as skipped when an earlier run finished it: its output is whole (the rows
        recorded) and its sidecar describes these input bytes."""
        earlier = self.earlier.get(part.relative)
        output = part.output
        if (not earlier or earlier.get("status") not in ("done", "skipped") or earlier.get("output") != part.name
                or not output.is_file()):
            return False
        try:
            meta = json.loads(part.sidecar.read_text(encoding="utf-8"))
            recorded = meta["provenance"]["input"]["hash"]
            if self.options.ranges is not None and meta["provenance"]["vectors"]["ranges"] != list(map(list, self.options.ranges)):
                return False  # quantized on another grid than this job's: embedded again
            if self.fingerprint is not None and meta["provenance"]["fingerprint"] != self.fingerprint:
                return False  # made by another runtime or precision (`auto` chose otherwise): embedded again
            if not _names_object(output, meta):
                return False  # the data object is not the sidecar's (a run killed between them): embedded again
            footer = pq.ParquetFile(output.open(ranged=True) if isinstance(output, RemotePath) else output).metadata
            rows = footer.num_rows
            if not _same_run(meta, footer.metadata):
                return False  # the file and its sidecar are not one run's: embedded again
        except (OSError, ValueError, KeyError, TypeError, AttributeError, pa.ArrowException, HfbatchError):
            return False
        # a store's object by what the store says of it (ETag/version, size): no byte of it is read
        now = part.input.identity() if isinstance(part.input, RemotePath) else file_digest(part.input)
        if recorded != earlier.get("input_hash") or rows != earlier.get("rows_out") or recorded != now:
            return False
        fields = {k: earlier.get(k) for k in ("rows_in", "rows_out", "rows_invalid", "input_hash")}
        self.add(PartRecord(part.relative, part.name, "skipped", texts_computed=0, cache_hits=0,
                            seconds=0.0, **fields))
        return True

    def done(self, part: Part, document: dict[str, Any], started: float) -> None:
        """Record `part` as embedded, from the sidecar document its output was published with."""
        m, prov = document["metrics"], document["provenance"]
        self.add(PartRecord(part.relative, part.name, "done", rows_in=m["rows_total"],
                            rows_out=prov["output"]["rows"], rows_invalid=m["rows_invalid"],
                            texts_computed=m["texts_computed"], cache_hits=m["cache"]["hits"],
                            input_hash=prov["input"]["hash"], seconds=round(time.perf_counter() - started, 3)))

    def failed(self, part: Part, error: str, started: float) -> None:
        """Record `part` as failed (its data or columns: the other parts go on). An output an
        earlier run made of it no longer describes the input and goes, so the totals stay the rows
        on disk: this part's own output path and sidecar path, and only while they are one run's
        pair (`_remove_pair`). A sidecar that is not readable, or whose data is not the one it names
        (a run killed between the two, or another job publishing there now), is left as it is."""
        self._remove_pair(part.output, part.sidecar)
        self.add(PartRecord(part.relative, part.name, "failed", error=error,
                            seconds=round(time.perf_counter() - started, 3)))

    def _remove_pair(self, output: Path, sidecar: Path) -> None:
        """Remove `output` and its `sidecar` when they are one run's pair (see `failed`). Locally
        under the publishing lock of the output's directory, so no publish interleaves. In a store,
        which has no lock: the data object only while it is still the one the sidecar names (its
        ETag, asked just before), then the sidecar only while it is still the one read (its ETag):
        a sidecar another job wrote meanwhile for its own data stays."""
        try:
            if isinstance(output, RemotePath):
                seen = sidecar.stamp()  # type: ignore[attr-defined]
                if seen is None:
                    return
                meta = json.loads(sidecar.read_text(encoding="utf-8"))
                named = meta["provenance"]["output"]["object"]["etag"]
                footer = pq.ParquetFile(output.open(ranged=True)).metadata
                now = output.stamp()
                if not named or now is None or now.get("etag") != named or not _same_run(meta, footer.metadata):
                    return
                output.unlink(missing_ok=True)
                if (sidecar.stamp() or {}).get("etag") == seen.get("etag"):  # type: ignore[attr-defined]
                    sidecar.unlink(missing_ok=True)
                return
            if not Path(sidecar).is_file():
                return
            with publishing(Path(output).parent):
                meta = json.loads(Path(sidecar).read_text(encoding="utf-8"))
                if Path(output).is_file() and not _same_run(meta, pq.ParquetFile(output).metadata.metadata):
                    return
                Path(output).unlink(missing_ok=True)
                Path(sidecar).unlink(missing_ok=True)
        except (OSError, ValueError, KeyError, TypeError, AttributeError, pa.ArrowException, HfbatchError):
            return  # not a pair this job can vouch for: nothing is removed

    def add(self, record: PartRecord) -> None:
        self.records[record.input] = record
        if record.status != "skipped":  # a rerun of 10,000 complete parts need not write the sidecar 10,000 times
            self.write(finished=False)

    def write(self, *, finished: bool) -> None:
        """Rewrite the job sidecar (atomically): the parts recorded so far, in input order, and totals."""
        document = self.document
        parts = [asdict(self.records[p.relative]) for p in self.mine if p.relative in self.records]
        document["parts"] = parts
        document["finished"] = utc_now() if finished else None
        document["totals"] = {
            "parts": len(parts),
            **{f"parts_{s}": sum(1 for p in parts if p["status"] == s) for s in ("done", "skipped", "failed")},
            "rows_in": sum(p["rows_in"] or 0 for p in parts), "rows_out": sum(p["rows_out"] or 0 for p in parts),
            "texts_computed": sum(p["texts_computed"] or 0 for p in parts),
            "wall_seconds": round(time.perf_counter() - self.wall, 3),
        }
        local = self.options.relative_paths and not isinstance(self.sidecar, RemotePath)
        write_json_atomic(self.sidecar, relative_paths(document, self.sidecar.parent) if local else document)

    def finish(self) -> PartsResult:
        self.write(finished=True)
        return PartsResult(self.parts.out_dir, self.sidecar, self.document)


def plan_parts(options: EmbedOptions, *, shard: tuple[int, int], settings: Settings, engine: str) -> PartsJob:
    """Everything a many-part job does before any model work: list the parts (a directory, a glob,
    or for the Ray engine one file), name their outputs, plan and check every path the job writes,
    find what an earlier run finished, and remove what it wrote that this run no longer names.
    Raises InputError (exit 2)."""
    out_dir = normal_location(options.output)  # a store's `out/./`: every part's key derives from `out`
    if out_dir.suffix.lower() in (".parquet", ".pq") or out_dir.is_file():
        why = "with --engine ray" if engine == "ray" else "with many input files"
        raise InputError(f"-o {out_dir}: {why} the output is a directory; give one, e.g. -o out/.")
    if options.metrics_file is not None:
        raise InputError("--metrics-file is written per job for one input file; with many files each part's "
                         "sidecar and the job sidecar carry the metrics. Drop --metrics-file.")
    if engine == "ray" and (options.max_errors is not None or options.log_file is not None):
        flag = "--max-errors" if options.max_errors is not None else "--log-file"
        raise InputError(f"{flag} is not supported by --engine ray yet; drop it, or use the local engine.")
    parts = resolve_parts(options.input, out_dir, fmt=options.format, shard=shard)
    first = parts.every[0]
    resolved = replace(options, input=first.input, output=first.output).resolved(settings)  # the defaults filled in
    key = options_key(resolved)
    writes = [w for p in parts.mine for w in (("part output", p.output), ("part sidecar", p.sidecar))]
    plan = plan_outputs([p.input for p in parts.every], [*writes, ("job sidecar", parts.job_sidecar),
                                                         ("--log-file", options.log_file)],
                        input_dirs=[parts.root] if parts.input_is_dir else (), appends=("--log-file",))
    plan.check_writable()
    earlier = read_job_sidecar(parts.job_sidecar)
    if earlier.get("input_id", input_id(earlier.get("input", ""))) == input_id(options.input):
        remove_stale_outputs(out_dir, earlier, [p.name for p in parts.every])
    document: dict[str, Any] = {
        "job": "embed-parts", "engine": engine, "tool_version": library_versions()["hfbatch"],
        "command": redact(list(options.command) or sys.argv), "input": str(options.input), "input_id": input_id(options.input),
        "input_root": str(parts.root), "output_dir": str(out_dir), "part_sidecars": f"{PART_SIDECARS}/",
        "shard": f"{shard[0]}/{shard[1]}", "parts_in_input": len(parts.every), "options_key": key, "started": utc_now(),
        "parts": [],
    }
    return PartsJob(options, resolved, parts, earlier_records(earlier, key), document)


def _names_object(output: Path, meta: dict[str, Any]) -> bool:
    """Whether the data object at `output` is the one its sidecar `meta` was written for (the
    ETag the store answered to that upload, `provenance.output.object`; one HEAD). True for a local
    output and for a sidecar from before the record was kept (the footer check still applies)."""
    recorded = (meta["provenance"].get("output") or {}).get("object")
    if not isinstance(output, RemotePath) or not isinstance(recorded, dict) or not recorded.get("etag"):
        return True
    now = output.stamp()
    return now is not None and now.get("etag") == recorded["etag"]


_SAME_RUN = (("started",), ("finished",), ("input", "hash"), ("output", "rows"))


def _same_run(meta: dict[str, Any], footer: dict[bytes, bytes] | None) -> bool:
    """Whether the provenance a Parquet file carries (its `hfbatch` key/value metadata, written by
    the same commit as the sidecar) is the sidecar `meta`'s: the same start, finish, input and rows."""
    raw = (footer or {}).get(METADATA_KEY.encode())
    if not raw:
        return False  # not written by hfbatch's sink: not this job's output
    embedded = json.loads(raw)["provenance"]
    for path in _SAME_RUN:
        mine, theirs = embedded, meta["provenance"]
        for key in path:
            mine, theirs = mine.get(key), theirs.get(key)
        if mine != theirs:
            return False
    return True


def read_job_sidecar(sidecar: Path) -> dict[str, Any]:
    """An earlier run's job sidecar, or {} when there is none (or it is not one)."""
    try:
        document = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return document if isinstance(document, dict) else {}


def earlier_records(earlier: dict[str, Any], key: str) -> dict[str, dict[str, Any]]:
    """Parts of an earlier run (its job sidecar) with the same vector-shaping options, by input path."""
    if earlier.get("options_key") != key:
        return {}
    return {p["input"]: p for p in earlier.get("parts", []) if isinstance(p, dict) and "input" in p}


def remove_stale_outputs(out_dir: Path, earlier: dict[str, Any], planned: Collection[str]) -> list[Path]:
    """Remove what an earlier run of this job wrote under `out_dir` (as its job sidecar `earlier`
    records: parts done or skipped) that this run no longer names: the output of a part whose name
    changed (`a.parquet` once `a.csv` joins `a.jsonl`) or that left the input, with its sidecar,
    and the sidecars the layout before `_hfbatch/` kept beside the parts. A reader of the dataset
    `out/` would otherwise read those rows too, or fail on the JSON. Nothing outside `out_dir` and
    nothing but Parquet outputs and their sidecars is touched. `planned`: the names (`Part.name`)
    of this run's outputs. Returns what was removed."""
    if isinstance(out_dir, RemotePath):
        return _remove_stale_objects(out_dir, earlier, planned)
    keep = {Path(name) for name in planned}
    beside = earlier.get("part_sidecars") is None  # written before _hfbatch/: sidecars beside the parts
    base = Path(out_dir).resolve()
    removed = []
    for record in earlier.get("parts", []):
        if not isinstance(record, dict) or record.get("status") not in ("done", "skipped"):
            continue
        name = PurePath(str(record.get("output", "")))
        if name.is_absolute() or ".." in name.parts or name.suffix.lower() not in (".parquet", ".pq"):
            continue  # not a name this engine gives an output
        output = Path(out_dir) / name
        folder = output.parent.resolve()
        if folder != base and base not in folder.parents:
            continue  # through a symlink out of out/: not ours to remove
        stale = [] if Path(name) in keep else [output, part_sidecar_path(out_dir, output)]
        for path in [*stale, *([sidecar_path(output)] if beside else [])]:
            if path.is_file() or path.is_symlink():
                path.unlink()
                removed.append(path)
    return removed


def _remove_stale_objects(out_dir: RemotePath, earlier: dict[str, Any], planned: Collection[str]) -> list[Any]:
    """remove_stale_outputs in a store: keys have no links, so only the names are checked."""
    keep = set(planned)
    removed = []
    for record in earlier.get("parts", []):
        if not isinstance(record, dict) or record.get("status") not in ("done", "skipped"):
            continue
        name = PurePath(str(record.get("output", "")))
        if name.is_absolute() or ".." in name.parts or name.suffix.lower() not in (".parquet", ".pq") or name.as_posix() in keep:
            continue
        output = out_dir / name.as_posix()
        for path in (output, part_sidecar_path(out_dir, output)):  # type: ignore[arg-type]
            if path.is_file():
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def run_embed_parts(options: EmbedOptions, *, shard: tuple[int, int] = (1, 1), backend: Backend | None = None,
                    observer: Observer | None = None, settings: Settings | None = None) -> PartsResult:
    """Embed every part of `options.input` (a directory or glob) owned by `shard` into the
    directory `options.output`. A part with bad data is marked failed and the others go on (the
    job then exits 1); an error of the model or backend stops the job, with the sidecar saying
    which parts are done."""
    settings = settings or Settings.load()
    job = plan_parts(options, shard=shard, settings=settings, engine="local")
    # the backend is made and asked for its identity now: a usage error (no --endpoint, no such
    # model) ends the job here, before any part could be marked failed and lose its output. Each
    # part still makes its own (the model itself is loaded once per process), so that each part's
    # sidecar describes what that part did.
    made = backend or make_backend(job.resolved)
    settle_identity(job, made)
    shared = _OneBar(observer) if observer is not None else None
    try:
        settle_ranges(job, settings, backend)  # int8/uint8: before any part is resumed or run
        for part in job.mine:
            if not job.resume(part):
                _embed_part(job, part, backend, shared, settings)
    except BaseException as exc:
        job.write(finished=False)
        if shared is not None:
            shared.job_failed(exc)
        raise
    if shared is not None:
        shared.close()
    return job.finish()


def settle_identity(job: PartsJob, backend: Backend | None = None) -> None:
    """The vectors' identity, fixed once for every part and Ray actor: parts an earlier run made
    under another one are embedded again (`PartsJob.resume`). It chooses no runtime and loads
    nothing: every faithful configuration is one identity, and each process that computes takes
    this machine's one choice for the model (selection.py), so a fully cached job loads no model."""
    job.fingerprint = (backend or make_backend(job.resolved)).fingerprint()


def settle_ranges(job: PartsJob, settings: Settings, backend: Backend | None = None) -> None:
    """--output-precision int8/uint8 without ranges: take them once for the whole job from its
    first --calibration-size vectors (or --calibration's), whichever shard this is, and give them
    to every part; a part recorded with other ranges is not resumed (`PartsJob.resume`). Nothing
    to do once they are set."""
    if job.options.output_precision not in CALIBRATED or job.options.ranges is not None:
        return
    every = job.parts.every  # the input's parts in order, whichever shard this is
    ranges, record = calibrate_ranges(job.part_options(every[0]), [p.input for p in every], backend=backend,
                                      settings=settings)
    job.options = replace(job.options, ranges=ranges, calibration_record=record)
    job.resolved = replace(job.resolved, ranges=ranges, calibration_record=record)


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

    def job_failed(self, error: BaseException) -> None:
        """The job itself failed. (A part's own failure reaches `failed`, a no-op: the job records
        it and the other parts go on.)"""
        if self.started:
            self.inner.failed(error)
            self.started = False


def _embed_part(job: PartsJob, part: Part, backend: Backend | None, observer: Observer | None,
                settings: Settings) -> None:
    started = time.perf_counter()
    try:
        result = run_embed(job.part_options(part), backend=backend, observer=observer, settings=settings)
    except (InputError, InputChangedError) as exc:  # this file's data or columns, or it changed as it was read:
        job.failed(part, str(exc), started)          # never recorded as done; the other parts go on
        return
    job.done(part, result.document, started)


def merge_job_sidecars(out_dir: Path, expected: Sequence[str] | None = None) -> dict[str, Any]:
    """Every job sidecar under `out_dir` together: each part exactly once and complete, and (with
    `expected`, the relative paths of the input's parts) none missing. Metrics summed."""
    out_dir = location(out_dir)
    sidecars = job_sidecars(out_dir)
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
    written: dict[str, list[str]] = {}
    for r in records:
        if r["status"] in ("done", "skipped"):
            written.setdefault(str(r.get("output")), []).append(r["input"])
    problems += [f"{output} is the output of {len(inputs)} parts ({', '.join(inputs)}): only the last one's rows are there"
                 for output, inputs in written.items() if len(inputs) > 1]
    problems += [f"{output} (of {inputs[0]}) is not in {out_dir}" for output, inputs in written.items()
                 if not (out_dir / output).is_file()]
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
