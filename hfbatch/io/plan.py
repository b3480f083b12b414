"""The output plan: every path a job will write, checked against the inputs and each other before
any model work, plus the file checks every job (embed, generate) makes up front.

Contracts (all refusals are InputError, exit 2, one line naming both paths and the fix):

- `plan_outputs(inputs, writes)` takes every input file and every `(role, path)` the job will
  write. A role is the flag that names the path (`-o`, `--metrics-file`, `--log-file`) or what the
  file is (`sidecar`, `temp`, `job sidecar`, `part output`, `part sidecar`); a role that does not
  start with `-` is derived from `-o`, so its fix is "give -o another path". Each path is resolved
  as the operating system will (relative to the cwd, symlinks followed, `..` collapsed), and two
  paths are the same file when an existing one has the same (st_dev, st_ino) (hard links, case
  variants, bind mounts) or a new one has the same existing parent directory and the same
  remaining name, compared without case when that directory's filesystem ignores case (found by
  probing it). A store's key is compared normalised (`normal_location`: `p/./a`, `p/x/../a` and
  `p/a` are one key), since the sidecar's key is derived as pathlib derives names, without its
  `.` segments; a write whose key is not already normal is refused with the normal one as the
  fix (a store would keep `p/./a.parquet` as a key of its own, its sidecar beside `p/a.parquet`).
  Refused: a write equal to an input, equal to another write, a device, FIFO, socket
  or process file descriptor (`-o /dev/null`, `--metrics-file /dev/stdout`), a directory, a path
  below a regular file, and (with `input_dirs`) a path inside an input directory, which the next
  run would read back as an input part. Roles in `appends` (the `--log-file`, written by appending
  to an open file) may be a pipe or terminal. Nothing is created: `OutputPlan.check_writable()`
  then proves each path creatable, making its parent directories.
- `part_outputs(root, parts, out_dir)` names the output of each part of a many-part job:
  `<out_dir>/<relative path without data suffixes>.parquet`. Parts whose names would collide
  (`a.csv` + `a.jsonl`, `a.csv` + `a.csv.gz`, `A.csv` + `a.csv` on a case-insensitive output
  filesystem) keep their whole name instead (`a.csv.parquet`, `a.jsonl.parquet`); the names
  depend only on the part names, so a rerun (or another shard's host, given every part) finds
  the same ones. If even those collide the job is refused.
- `open_job_files` / `check_output_path`: the single-file checks the jobs make today (input
  opened, columns checked, `-o` and its `extra_outputs` planned as above, `--log-file` allowed to
  be a pipe or terminal, then proved writable), in that order so a bad path costs no read.

How a job uses it, before any model work (all of it exit 2):

    plan = plan_outputs([opts.input], [("-o", out), ("sidecar", sidecar_path(out)),
                                       ("--metrics-file", opts.metrics_file), ("--log-file", opts.log_file)],
                        appends=("--log-file",))
    with spooled_input(opts.input, opts.format) as source:   # io/readers.py: a pipe becomes a file
        files = open_job_files(input=source, ...)             # (plan.check_writable() runs in it)

A many-part job: `outputs = part_outputs(root, all_parts, out_dir)`, then one `plan_outputs(parts,
[("part output", o), ("part sidecar", s), ..., ("job sidecar", j), ("--metrics-file", m), ...],
input_dirs=[root] if the input is a directory)` for the whole job, then `plan.check_writable()`.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any, Collection, NamedTuple, Sequence

import pyarrow as pa

from ..errors import InputError
from ..provenance import InputIdentity
from .columns import check_columns
from .readers import DATA_SUFFIXES, Reader, open_reader
from .stores import RemotePath, location
from .writers import check_writable, remove_stale_temps

# Names that are a process's open file, whatever it is now: writing through a temp file and a
# rename would replace the name (as root, /dev/stdout itself), never reach the stream.
_DESCRIPTOR_NAMES = ("/dev/stdin", "/dev/stdout", "/dev/stderr")
_DESCRIPTOR_DIRS = ("/dev/fd/", "/proc/")
# what makes two paths one file: ("file", st_dev, st_ino), or for a new path ("new", st_dev, st_ino
# of its deepest existing directory, the rest of its name as a tuple, case-folded where needed)
_Key = tuple[Any, ...]


@dataclass(frozen=True)
class PlannedWrite:
    """One path the job writes: the role that names it, the path as given, and where it resolves."""

    role: str  # "-o", "--metrics-file", "sidecar", "temp", "job sidecar", "part output", ...
    path: Path
    resolved: Path  # absolute, symlinks followed, '..' collapsed

    @property
    def flag(self) -> str:
        """The flag a user changes to move this path: the role itself, or -o for derived files."""
        return _flag(self.role)


@dataclass(frozen=True)
class OutputPlan:
    """Every input and every path a job will write, already checked against each other."""

    inputs: tuple[Path, ...]
    writes: tuple[PlannedWrite, ...]

    def paths(self, role: str) -> list[Path]:
        """The planned paths of one role, in the order given."""
        return [w.path for w in self.writes if w.role == role]

    def check_writable(self) -> None:
        """Make each write's parent directories and prove a file can be created there (InputError if not)."""
        proved: set[Path] = set()  # one probe per directory, however many parts go there
        for write in self.writes:
            try:
                if isinstance(write.path, RemotePath):
                    if write.resolved.parent not in proved:
                        check_writable(write.path)  # the bucket is there and these credentials see it
                    proved.add(write.resolved.parent)
                elif _special_kind(write.path) is None:
                    if write.resolved.parent not in proved:
                        check_writable(write.path)
                    proved.add(write.resolved.parent)
                elif not os.access(write.path, os.W_OK):  # a terminal or pipe an `appends` role writes to
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
            except OSError as exc:
                raise InputError(f"{_who(write)}: cannot write there ({exc.strerror or exc}); "
                                 f"give {write.flag} another path.") from None


def plan_outputs(
    inputs: Sequence[Path],
    writes: Sequence[tuple[str, Path | None]],
    *,
    input_dirs: Sequence[Path] = (),
    appends: Collection[str] = (),
) -> OutputPlan:
    """Check every planned write (None paths are skipped) against `inputs`, `input_dirs` and each
    other; see the module docstring for what is refused. Returns the plan; raises InputError."""
    where = _Resolver([_normal_or_given(d) for d in input_dirs])
    owners: dict[_Key, _Owner] = {}  # identity -> the first path seen there
    folders: dict[_Key, _Owner] = {}  # identity of a directory the job will make -> the write that needs it
    for source in map(location, inputs):
        found = where.identity(_normal_or_given(source), f"the input {source}")
        if found is not None:
            owners.setdefault(found[0], _Owner(f"the input {source}", None, source, found[1]))
    planned: list[PlannedWrite] = []
    for role, given in writes:
        if given is None:
            continue
        path = location(given)
        who = _label(role, path)
        normal = normal_location(path, flag=_flag(role))
        found = where.identity(normal, who)
        if found is None:
            raise InputError(f"{who}: cannot write there (a part of the path is a file, not a directory); "
                             f"give {_flag(role)} another path.")
        identity, resolved = found
        write = PlannedWrite(role, path, resolved)
        _check_kind(write, appends)
        inside = where.input_dir_holding(resolved.parent)
        if inside is not None:
            raise InputError(f"{who}: is inside the input directory {inside}, so the next run would read it as an "
                             f"input part; give {write.flag} a path outside {inside}.")
        if identity in owners:
            raise _clash(write, owners[identity])
        # a new path's missing directories, so that no write is another one's directory
        made = [(*identity[:3], identity[3][:k]) for k in range(1, len(identity[3]))] if identity[0] == "new" else []
        for other in (folders.get(identity), *map(owners.get, made)):
            if other is not None:
                raise InputError(f"{who} and {other.who} need one path to be both a file and a directory; "
                                 f"give {write.flag if write.flag != '-o' else other.flag or '-o'} another path.")
        if normal != path:  # a store's key with '.' or '..' segments, clashing with nothing
            raise InputError(f"{who}: has a '.' or '..' segment, which a store keeps as part of the key (its sidecar "
                             f"would be named without it); give {write.flag} "
                             f"{normal if write.flag == role else 'a key without such segments'}.")
        owner = _Owner(who, write.flag, path, resolved)
        owners[identity] = owner
        folders.update(dict.fromkeys(made, owner))
        planned.append(write)
    return OutputPlan(tuple(map(location, inputs)), tuple(planned))


def normal_location(spec: Any, *, flag: str = "-o") -> "Path | RemotePath":
    """`spec` as a local Path or a store's RemotePath whose key has no `.` or `..` segments
    (`s3://lake/p/./a.parquet` and `s3://lake/p/x/../a.parquet` are `s3://lake/p/a.parquet`),
    as pathlib already drops a local path's `.` segments. A local `..` is left to the operating
    system, which resolves it after symlinks (the plan compares resolved paths). InputError when
    a `..` climbs above the bucket."""
    path = location(spec)
    if not isinstance(path, RemotePath):
        return path
    normal = _normal_key(path)
    if normal is None:
        raise InputError(f"{flag} {path}: its '.' and '..' segments lead out of the bucket; give the object's own key.")
    return normal


def _normal_key(path: RemotePath) -> RemotePath | None:
    given = path.key.split("/")
    if given[0] in (".", ".."):  # the bucket itself
        return None
    pieces: list[str] = []
    for piece in given:
        if piece == ".":
            continue
        if piece == "..":
            if len(pieces) < 2:
                return None
            pieces.pop()
            continue
        pieces.append(piece)
    return path if pieces == given else RemotePath(f"{path.scheme}://{'/'.join(pieces)}")


def _normal_or_given(path: Any) -> Any:
    """An input's location, normalised where it can be (a key that cannot is compared as given)."""
    path = location(path)
    return (_normal_key(path) or path) if isinstance(path, RemotePath) else path


class _Resolver:
    """Paths resolved as the OS will, with each directory's work (realpath, case probe, input-dir
    check) done once: a job of 10,000 parts writes into a few directories."""

    def __init__(self, input_dirs: Sequence[Path]):
        self._guarded = [(Path(d), os.stat(d)) for d in input_dirs if not isinstance(d, RemotePath) and os.path.isdir(d)]
        self._remote_dirs = [d for d in input_dirs if isinstance(d, RemotePath)]
        self._real: dict[Path, Path] = {}  # directory as given -> resolved
        self._bases: dict[Path, tuple[Path, _Key, bool]] = {}  # resolved directory -> deepest existing one, its key, folds
        self._inside: dict[Path, Path | None] = {}

    def resolve(self, path: Path) -> Path:
        """Absolute, symlinks followed, '..' collapsed (os.path.realpath, its directory's part memoised)."""
        if path.name in ("", ".", ".."):
            return Path(os.path.realpath(path))
        if path.parent not in self._real:
            self._real[path.parent] = Path(os.path.realpath(path.parent))
        full = self._real[path.parent] / path.name
        return Path(os.path.realpath(full)) if os.path.islink(full) else full

    def identity(self, path: Path, who: str) -> tuple[_Key, Path] | None:
        """(what makes two paths one file, the resolved path); None when a parent is not a directory.
        Symlink loops and parents that cannot be entered are InputError. In a store, a key is
        itself: no links, no case folding."""
        if isinstance(path, RemotePath):
            return ("remote", hash(path), str(path)), path  # type: ignore[return-value]
        resolved = self.resolve(path)
        # the given name first (/dev/stdout's /proc link resolves only this way), then the resolved
        # one (`new/../in.csv` is in.csv once the job makes `new`)
        for name in (path, resolved):
            try:
                st = os.stat(name)
                return ("file", st.st_dev, st.st_ino), resolved
            except FileNotFoundError:
                continue
            except NotADirectoryError:
                return None
            except OSError as exc:
                raise InputError(f"{who}: cannot be resolved ({exc.strerror or exc}); give a path without a symlink "
                                 "loop, in directories you can enter.") from None
        base, key, folds = self._base(resolved.parent)
        if not base.is_dir():
            return None
        return ("new", *key, _name_key(resolved.relative_to(base), folds)), resolved

    def _base(self, directory: Path) -> tuple[Path, _Key, bool]:
        if directory not in self._bases:
            base = _existing_dir(directory)
            st = os.stat(base)
            self._bases[directory] = (base, (st.st_dev, st.st_ino), base.is_dir() and case_insensitive(base))
        return self._bases[directory]

    def input_dir_holding(self, directory: Path) -> Path | None:
        """The input directory that `directory` (resolved) is in, compared by identity; None if none."""
        if isinstance(directory, RemotePath):
            return next((d for d in self._remote_dirs if d == directory or d in directory.parents), None)  # type: ignore[return-value]
        if not self._guarded:
            return None
        if directory not in self._inside:
            folder = _existing_dir(directory)
            stats = [os.stat(d) for d in (folder, *folder.parents)]
            self._inside[directory] = next((d for d, st in self._guarded if any(os.path.samestat(st, x) for x in stats)),
                                           None)
        return self._inside[directory]


class _Owner(NamedTuple):
    """The input or write that first took a file, as a refusal names it."""

    who: str  # "the input in.csv", "-o out.parquet"
    flag: str | None  # None for an input
    path: Path
    resolved: Path


def part_outputs(root: Path, parts: Sequence[Path], out_dir: Path) -> dict[Path, Path]:
    """Each part's output path (see the module docstring); pass every part of the input, not one
    shard's, so that every host derives the same names. Raises InputError if names still collide."""
    folds = False if isinstance(out_dir, RemotePath) else case_insensitive(_existing_dir(Path(out_dir)))
    relative = {part: PurePath(part.relative_to(root)) for part in parts}  # type: ignore[arg-type]
    plain = {part: rel.parent / f"{_data_stem(rel.name)}.parquet" for part, rel in relative.items()}
    claims = Counter(_name_key(name, folds) for name in plain.values())
    named = {part: plain[part] if claims[_name_key(plain[part], folds)] == 1 else rel.parent / f"{rel.name}.parquet"
             for part, rel in relative.items()}
    final: dict[_Key, Path] = {}
    for part, name in named.items():
        other = final.setdefault(_name_key(name, folds), part)
        if other != part:
            raise InputError(
                f"input parts {other} and {part} would both write {out_dir / name}"
                f"{' (names differing only in case, on a case-insensitive filesystem)' if folds else ''}; "
                "rename one of them."
            )
    return {part: out_dir / (name.as_posix() if isinstance(out_dir, RemotePath) else name)  # type: ignore[misc]
            for part, name in named.items()}


def case_insensitive(directory: Path) -> bool:
    """Whether names in the existing `directory` match without regard to case: probed by looking up
    an entry's name with its case swapped (a probe file of our own when no entry has ASCII
    letters). False when the directory cannot be read or written."""
    try:
        with os.scandir(directory) as entries:
            name = next((e.name for e in entries if e.name.isascii() and e.name.swapcase() != e.name), None)
        if name is not None:
            return _same_entry(directory, name)
        with tempfile.NamedTemporaryFile(prefix=".hfbatch-case-probe-", dir=directory) as probe:
            return _same_entry(directory, Path(probe.name).name)
    except OSError:
        return False


def _same_entry(directory: Path, name: str) -> bool:
    try:
        return os.path.samestat(os.lstat(Path(directory, name)), os.lstat(Path(directory, name.swapcase())))
    except OSError:
        return False


def _fold(name: str) -> str:
    """A name as a case-insensitive filesystem compares it (case and Unicode normal form ignored)."""
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", name).casefold())


def _name_key(relative: PurePath, folds: bool) -> tuple[str, ...]:
    return tuple(_fold(p) for p in relative.parts) if folds else relative.parts


def _data_stem(name: str) -> str:
    """`a.csv.gz` -> `a`, `2026.01.jsonl` -> `2026.01`: the name without its trailing data suffixes."""
    while (suffix := PurePath(name).suffix) and suffix.lower() in DATA_SUFFIXES:
        name = name[: -len(suffix)]
    return name


def _existing_dir(path: Path) -> Path:
    """The deepest existing ancestor of `path` (itself included), resolved."""
    path = Path(os.path.realpath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_kind(write: PlannedWrite, appends: Collection[str]) -> None:
    """Refuse a directory, and (unless the role appends) a device, FIFO, socket or descriptor name."""
    if isinstance(write.path, RemotePath):
        return  # a store holds objects only
    kind = _special_kind(write.path)
    if kind == "directory":
        raise InputError(f"{_who(write)}: is a directory; give {write.flag} a file's path.")
    if kind is not None and write.role not in appends:
        raise InputError(f"{_who(write)}: is a {kind}, not a regular file; hfbatch writes through a temp file "
                         f"and a rename: give {write.flag} a file's path.")


def _special_kind(path: Path) -> str | None:
    """What `path` is when it is no regular file to replace ("directory", "character device", "pipe
    (FIFO)", ...); None for a regular file or a new path."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        mode = 0  # a new file, or trouble that _Resolver.identity reports
    kinds = ((stat.S_ISDIR, "directory"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
             (stat.S_ISFIFO, "pipe (FIFO)"), (stat.S_ISSOCK, "socket"))
    kind = next((name for test, name in kinds if test(mode)), None)
    absolute = os.path.abspath(path)
    if kind is None and (absolute in _DESCRIPTOR_NAMES or absolute.startswith(_DESCRIPTOR_DIRS)):
        kind = "process's file descriptor"
    return kind


def _clash(write: PlannedWrite, owner: _Owner) -> InputError:
    """The one-line refusal of `write` landing on a file already taken by `owner`."""
    how = ""
    if write.path != owner.path:  # the same text needs no explanation
        how = f" (both are {owner.resolved})" if write.resolved == owner.resolved else " (one file under two names)"
    if owner.flag is None:
        return InputError(f"{_who(write)} is {owner.who}{how}; the job would overwrite its input: "
                          f"give {write.flag} another path.")
    fix = write.flag if write.flag != "-o" else owner.flag  # the user's own flag first: -o names the rest
    return InputError(f"{_who(write)} is the same file as {owner.who}{how}; give {fix} another path.")


def _flag(role: str) -> str:
    return role if role.startswith("-") else "-o"


def _who(write: PlannedWrite) -> str:
    return _label(write.role, write.path)


def _label(role: str, path: Path) -> str:
    """How a message names a write: `-o out.parquet`, `the sidecar out.parquet.meta.json`."""
    return f"{role} {path}" if role.startswith("-") else f"the {role} {path}"


@dataclass
class JobFiles:
    reader: Reader
    passthrough: pa.Schema  # the input columns copied to the output
    source: Path  # the file read: the input itself, or the spooled copy of a pipe / stdin
    identity: InputIdentity  # the source as it was before its first read: checked again after the last


def check_output_path(input: Path, output: Path) -> None:
    """The output is named as a Parquet file (checked with the options, before any file is read).
    Whether it is the input, another output or a device is the plan's question (`plan_outputs`)."""
    if output.suffix.lower() not in (".parquet", ".pq"):
        raise InputError(f"-o {output}: the output is Parquet; give it a .parquet name.")


def open_job_files(
    *,
    input: Path,
    output: Path | None,
    fmt: str | None,
    chunk_size: int,
    text_column: str,
    keep: Sequence[str] | None,
    added_columns: Sequence[str],
    extra_outputs: Sequence[tuple[str, Path | None]] = (),
    max_line_bytes: int | None = None,
) -> JobFiles:
    """Plan `-o` and `extra_outputs` (role, path) against the input (`plan_outputs`, paths first so
    a bad path costs no read), take the input's identity, open the input, check its columns, and
    prove every output writable."""
    plan = plan_outputs([input], [*((("-o", output),) if output is not None else ()), *extra_outputs],
                        appends=("--log-file",))
    identity = InputIdentity.take(location(input))  # before the first read (the reader reads at open)
    columns = None if keep is None else list(dict.fromkeys([*keep, text_column]))
    reader = open_reader(input, fmt=fmt, chunk_size=chunk_size, columns=columns, text_column=text_column,
                         max_line_bytes=max_line_bytes)
    check_columns(input, reader.schema, text_column, keep, reader.all_columns, added_columns=added_columns)
    passthrough = pa.schema([reader.schema.field(n) for n in (keep if keep is not None else reader.schema.names)])
    if output is not None:
        remove_stale_temps(output)
    for role, path in extra_outputs:  # a killed run's staged sidecar goes too
        if role in ("sidecar", "--changes") and path is not None:
            remove_stale_temps(path)
    plan.check_writable()
    return JobFiles(reader, passthrough, location(input), identity)


__all__ = ["OutputPlan", "PlannedWrite", "plan_outputs", "normal_location", "part_outputs", "case_insensitive", "JobFiles",
           "check_output_path", "open_job_files"]
