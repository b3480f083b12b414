"""EmbeddingCache: vectors on disk, keyed by content, safe to share between runs.

Keys are blake2b(backend fingerprint, exact text), so a vector is only ever found again for the
same model, pooling, normalisation and max length. Values are raw little-endian float32 bytes,
never pickles: `_RawOnlyDisk` refuses to unpickle anything, so a cache directory cannot be a
way to run code. Values only ever come from the database's own BLOB column: diskcache's file mode
is switched off, and a row that names a file (planted, or written by an older version) is a
rejected entry, never read and never deleted outside the directory. `store` records the dimension
of each namespace's vectors, so a lookup can refuse a wrong-size value before any vector has been
computed. diskcache stores each batch in one SQLite transaction, so a killed run leaves
whole entries or none, and a rerun finds everything stored before the kill. Every entry is tagged
with its namespace (the backend fingerprint), so `cache_info` can count entries per namespace.

`cache_info`, `clear_cache` and `prune_cache` look after a cache directory as a whole (the
`hfbatch cache` commands); they open only a directory that holds a cache, never create one.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import diskcache
import numpy as np
from diskcache.core import MODE_RAW

from .errors import InputError, OutputError

log = logging.getLogger(__name__)
_LE_FLOAT32 = np.dtype("<f4")
# what a cache on a full, read-only, vanished or corrupt filesystem raises
_CACHE_FAULTS = (sqlite3.Error, OSError, diskcache.Timeout)


def _survives(*, counts_misses: bool):  # type: ignore[no-untyped-def]
    """A cache fault in this method warns once and disables the cache for the rest of the job
    (lookups find nothing, stores keep nothing): a cache is an optimisation, never a reason to
    lose a job. The sidecar's cache block says why (`disabled`)."""
    def wrap(method):  # type: ignore[no-untyped-def]
        @functools.wraps(method)
        def guarded(self, texts, *args, **kwargs):  # type: ignore[no-untyped-def]
            if self.disabled is None:
                try:
                    return method(self, texts, *args, **kwargs)
                except _CACHE_FAULTS as exc:
                    self.disabled = f"{type(exc).__name__}: {exc}"
                    log.warning("the embedding cache at %s failed (%s); going on without it for this job",
                                self.directory, self.disabled)
            if counts_misses:
                self.stats.misses += len(texts)
            return {} if method.__name__.startswith("lookup") else None
        return guarded
    return wrap
_TOKENS_PREFIX = "tokens|"
_DIM_PREFIX = "dim|"  # cache_key(_DIM_PREFIX + namespace, "") -> the dimension of that namespace's vectors
_NO_FILES = 1 << 40  # diskcache's disk_min_file_size: every value stays in the database, none in a file
_BULK = 500  # keys per SQL statement (SQLite allows 32,766 parameters)


class _RawOnlyDisk(diskcache.Disk):
    """A diskcache Disk that stores bytes and ints as-is, and reads or deletes nothing a row names."""

    def store(self, value, read, key=diskcache.core.UNKNOWN):  # type: ignore[override]
        if type(value) not in (bytes, int):
            raise TypeError("EmbeddingCache stores raw bytes (vectors) and ints (token counts) only")
        return super().store(value, read, key=key)

    def fetch(self, mode, filename, value, read):  # type: ignore[override]
        if mode != MODE_RAW:
            return None  # a pickle, or a file a planted row names (any path): a miss, never read
        return super().fetch(mode, filename, value, read)

    def remove(self, file_path):  # type: ignore[override]
        """diskcache deletes the file a row names when the row is replaced or evicted, and a planted
        row may name any absolute path: delete only files inside the cache directory."""
        root = os.path.realpath(self._directory)
        full = os.path.realpath(os.path.join(self._directory, file_path))
        if full != root and os.path.commonpath([root, full]) == root:
            super().remove(file_path)


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    stores: int = 0
    rejected: int = 0  # entries found with the wrong size, type or storage mode, treated as misses

    def unhit(self, n: int) -> None:
        """`n` hits turned out to be of the wrong size once the model's dimension was known."""
        self.hits -= n
        self.misses += n
        self.rejected += n

    @property
    def hit_rate(self) -> float:
        looked = self.hits + self.misses
        return self.hits / looked if looked else 0.0


def cache_key(fingerprint: str, text: str) -> str:
    """Content hash of one text under one backend fingerprint."""
    h = hashlib.blake2b(digest_size=20)
    h.update(fingerprint.encode("utf-8"))
    h.update(b"\x00")
    h.update(text.encode("utf-8", "surrogatepass"))
    return h.hexdigest()


class EmbeddingCache:
    """Batch lookups and stores of float32 vectors for one backend fingerprint."""

    def __init__(self, directory: str | Path, fingerprint: str, *, size_limit_bytes: int):
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        self.stats = CacheStats()
        self.disabled: str | None = None  # why the cache stopped working mid-job, if it did
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._cache = diskcache.Cache(
                str(self.directory),
                disk=_RawOnlyDisk,
                size_limit=size_limit_bytes,
                eviction_policy="least-recently-used",
                # No culling inside set(): within a store transaction SQLite's file does not shrink,
                # so per-set culling would keep evicting until the cache is empty. `store` culls
                # once, after its commit, down to the size limit.
                cull_limit=0,
                disk_min_file_size=_NO_FILES,  # values live in the BLOB column only, never in files
            )
        except Exception as exc:  # sqlite or filesystem trouble: name the place and the way out
            raise OutputError(
                f"cannot open the embedding cache at {self.directory} ({exc}); "
                "pass another --cache-dir or --no-cache."
            ) from exc

    @_survives(counts_misses=True)
    def lookup(self, texts: Sequence[str], dim: int | None, fingerprint: str | None = None) -> dict[int, np.ndarray]:
        """Index in `texts` -> vector, for each text found with a value of `dim` floats.

        `dim` None (the caller cannot know it without loading a model): the dimension `store`
        recorded for this namespace; with no record (hand-planted or older entries) nothing is a
        hit, so a value can never set the size of an output. `fingerprint` overrides the cache's
        own for this call: under --backend auto the namespace follows whichever backend is
        producing vectors at the time.
        """
        namespace = fingerprint or self.fingerprint
        *values, recorded = self._get_many([*(cache_key(namespace, t) for t in texts), cache_key(_DIM_PREFIX + namespace, "")])
        if dim is None and type(recorded) is int and recorded > 0:
            dim = recorded
        found: dict[int, np.ndarray] = {}
        for i, raw in enumerate(values):
            if dim is not None and isinstance(raw, bytes) and len(raw) == 4 * dim:
                found[i] = np.frombuffer(raw, dtype=_LE_FLOAT32).astype(np.float32, copy=False)
            elif raw is not None:
                self.stats.rejected += 1
        self.stats.hits += len(found)
        self.stats.misses += len(texts) - len(found)
        return found

    @_survives(counts_misses=False)
    def lookup_tokens(self, texts: Sequence[str], fingerprint: str | None = None) -> dict[int, int]:
        """Index -> untruncated token count, stored beside the vectors, so a warm rerun skips the tokenizer."""
        namespace = _TOKENS_PREFIX + (fingerprint or self.fingerprint)
        values = self._get_many([cache_key(namespace, t) for t in texts])
        return {i: v for i, v in enumerate(values) if type(v) is int and v >= 0}

    @_survives(counts_misses=False)
    def store(self, texts: Sequence[str], vectors: np.ndarray, fingerprint: str | None = None,
              token_counts: Sequence[int] | None = None) -> None:
        """Store one vector (and its text's token count) per text, all in one transaction."""
        data = np.ascontiguousarray(vectors, dtype=_LE_FLOAT32)
        namespace = fingerprint or self.fingerprint
        with self._cache.transact():
            if len(data):  # what lookups without a known dimension check values against
                self._cache.set(cache_key(_DIM_PREFIX + namespace, ""), int(data.shape[1]), tag=namespace)
            for text, row in zip(texts, data):
                self._cache.set(cache_key(namespace, text), row.tobytes(), tag=namespace)
            for text, count in zip(texts, token_counts or ()):
                self._cache.set(cache_key(_TOKENS_PREFIX + namespace, text), int(count), tag=namespace)
        self._cache.cull(retry=True)  # least recently used first, until under the size limit
        self.stats.stores += len(texts)

    @_survives(counts_misses=True)
    def lookup_bytes(self, texts: Sequence[str], namespace: str) -> dict[int, bytes]:
        """Index -> stored bytes (e.g. a generation result as UTF-8 JSON) under `namespace`."""
        values = self._get_many([cache_key(namespace, t) for t in texts])
        found = {i: v for i, v in enumerate(values) if isinstance(v, bytes)}
        self.stats.hits += len(found)
        self.stats.misses += len(texts) - len(found)
        return found

    @_survives(counts_misses=False)
    def store_bytes(self, texts: Sequence[str], values: Sequence[bytes], namespace: str) -> None:
        with self._cache.transact():
            for text, value in zip(texts, values):
                self._cache.set(cache_key(namespace, text), bytes(value), tag=namespace)
        self._cache.cull(retry=True)
        self.stats.stores += len(texts)

    def _get_many(self, keys: list[str]) -> list[object]:
        """Values for `keys` (None when absent), in bulk.

        diskcache has no get_many; one `get` per key costs a SELECT and (least-recently-used) an
        UPDATE each, about 27k keys/s here. This reads its documented-by-schema `Cache` table with
        one SELECT and one access-time UPDATE per 500 keys (about 80k keys/s). Only MODE_RAW rows
        count, and only their `value` column: a row in another mode (a pickle, or a file named by
        `filename`, which may be any path on the machine) is a rejected entry, never read.
        """
        out: list[object] = [None] * len(keys)
        where: dict[str, list[int]] = {}
        for i, k in enumerate(keys):
            where.setdefault(k, []).append(i)
        now = time.time()
        with self._cache.transact():
            sql = self._cache._sql
            for start in range(0, len(keys), _BULK):
                part = list(dict.fromkeys(keys[start : start + _BULK]))
                marks = ",".join("?" * len(part))
                rows = sql(
                    f"SELECT key, mode, value FROM Cache WHERE raw = 1 AND key IN ({marks})"
                    " AND (expire_time IS NULL OR expire_time > ?)",
                    [*part, now],
                ).fetchall()
                for key, mode, value in rows:
                    if mode != MODE_RAW:
                        self.stats.rejected += len(where[key])
                        continue
                    value = bytes(value) if isinstance(value, (bytes, memoryview)) else value
                    for i in where[key]:
                        out[i] = value
                sql(f"UPDATE Cache SET access_time = ? WHERE raw = 1 AND key IN ({marks})", [now, *part])
        return out

    def volume_bytes(self) -> int:
        try:
            return int(self._cache.volume())
        except _CACHE_FAULTS:
            return 0

    def close(self) -> None:
        try:
            self._cache.close()
        except _CACHE_FAULTS:
            pass


def open_cache(directory: str | Path, fingerprint: str, *, size_limit_bytes: int) -> "EmbeddingCache | NullCache":
    """The cache, or, when its directory cannot be opened (unwritable, not a directory, a corrupt
    database), a warning and a NullCache that says why: the job runs without a cache."""
    try:
        return EmbeddingCache(directory, fingerprint, size_limit_bytes=size_limit_bytes)
    except OutputError as exc:
        log.warning("%s Going on without a cache.", exc)
        return NullCache(reason=str(exc))


class NullCache:
    """Stands in for EmbeddingCache under --no-cache: finds nothing, keeps nothing."""

    directory = None

    def __init__(self, reason: str | None = None) -> None:
        self.stats = CacheStats()
        self.disabled = reason  # None under --no-cache; why, when a cache could not be opened

    def lookup(self, texts: Sequence[str], dim: int | None, fingerprint: str | None = None) -> dict[int, np.ndarray]:
        self.stats.misses += len(texts)
        return {}

    def lookup_tokens(self, texts: Sequence[str], fingerprint: str | None = None) -> dict[int, int]:
        return {}

    def lookup_bytes(self, texts: Sequence[str], namespace: str) -> dict[int, bytes]:
        self.stats.misses += len(texts)
        return {}

    def store_bytes(self, texts: Sequence[str], values: Sequence[bytes], namespace: str) -> None:
        pass

    def store(self, texts: Sequence[str], vectors: np.ndarray, fingerprint: str | None = None,
              token_counts: Sequence[int] | None = None) -> None:
        pass

    def volume_bytes(self) -> int:
        return 0

    def close(self) -> None:
        pass


# --- the cache directory as a whole: hfbatch cache info | clear | prune ---------------------------

_DB_FILES = ("cache.db", "cache.db-wal", "cache.db-shm")
_AGE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.IGNORECASE)
_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_age(value: str, name: str = "--older-than") -> float:
    """'30d', '12h', '90m', '2w', '45s' -> seconds. InputError for anything else."""
    match = _AGE_RE.match(str(value))
    if not match or float(match.group(1)) <= 0:
        raise InputError(f"{name} {value!r} is not an age; use a number and a unit: 30d, 12h, 90m, 2w or 45s.")
    return float(match.group(1)) * _AGE_UNITS[match.group(2).lower()]


def _size_on_disk(directory: Path) -> int:
    return sum((directory / name).stat().st_size for name in _DB_FILES if (directory / name).is_file())


@contextmanager
def _existing(directory: str | Path) -> Iterator[diskcache.Cache | None]:
    """The cache in `directory` with the settings it was made with, or None where there is none
    (nothing is created). OutputError, naming the directory, when it cannot be opened."""
    directory = Path(directory).expanduser()
    if not (directory / "cache.db").is_file():
        yield None
        return
    try:
        cache = diskcache.Cache(str(directory), disk=_RawOnlyDisk)
    except Exception as exc:
        raise OutputError(f"cannot open the embedding cache at {directory} ({exc}); is it an hfbatch cache?") from exc
    try:
        yield cache
    except _CACHE_FAULTS as exc:
        raise OutputError(f"the embedding cache at {directory} failed ({type(exc).__name__}: {exc}).") from exc
    finally:
        cache.close()


def _facts(directory: Path, cache: diskcache.Cache | None) -> dict[str, Any]:
    return {"directory": str(directory), "exists": cache is not None,
            "entries": len(cache) if cache is not None else 0, "size_bytes": _size_on_disk(directory)}


def cache_info(directory: str | Path) -> dict[str, Any]:
    """What a cache directory holds: `entries` (vectors, token counts and per-namespace records),
    `size_bytes` on disk, `volume_bytes` (what the size limit is held against), the time of the
    least and the most recent use, and per namespace (a backend fingerprint; None for entries
    stored before namespaces were recorded) its entries, value bytes and last use, most used first."""
    directory = Path(directory).expanduser()
    with _existing(directory) as cache:
        info = _facts(directory, cache)
        info.update(volume_bytes=0, oldest_use=None, newest_use=None, namespaces=[])
        if cache is None:
            return info
        sql = cache._sql  # one scan of diskcache's table (see _get_many)
        oldest, newest = sql("SELECT MIN(access_time), MAX(access_time) FROM Cache").fetchone()
        rows = sql("SELECT tag, COUNT(*), COALESCE(SUM(length(value)), 0), MAX(access_time) FROM Cache "
                   "GROUP BY tag ORDER BY COUNT(*) DESC").fetchall()
        info.update(volume_bytes=int(cache.volume()), oldest_use=oldest, newest_use=newest,
                    namespaces=[{"namespace": tag if isinstance(tag, str) else None, "entries": n, "value_bytes": b,
                                 "last_use": last} for tag, n, b, last in rows])
        return info


def _delete(cache: diskcache.Cache, where: str, params: Sequence[Any]) -> int:
    """Delete the rows `where` selects, in one transaction; a row naming a file (written by an
    older version, or planted) has it removed only inside the cache directory (_RawOnlyDisk)."""
    with cache.transact():
        rows = cache._sql(f"SELECT rowid, filename FROM Cache WHERE {where}", list(params)).fetchall()
        for start in range(0, len(rows), _BULK):
            part = [rowid for rowid, _ in rows[start : start + _BULK]]
            cache._sql(f"DELETE FROM Cache WHERE rowid IN ({','.join('?' * len(part))})", part)
    for _, filename in rows:
        if filename:
            cache.disk.remove(filename)
    return len(rows)


def _compact(cache: diskcache.Cache) -> None:
    """Give the freed pages back to the filesystem (diskcache's database runs auto_vacuum in WAL
    mode: the file shrinks once the log is checkpointed)."""
    try:
        cache._sql("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    except sqlite3.Error:
        pass  # another process is reading: the log is folded in at its next checkpoint


def clear_cache(directory: str | Path) -> dict[str, Any]:
    """Remove every entry of the cache in `directory` (every namespace). Returns `removed` and
    `size_bytes` on disk before and after (`before_bytes`)."""
    directory = Path(directory).expanduser()
    with _existing(directory) as cache:
        before = _size_on_disk(directory)
        removed = _delete(cache, "1", ()) if cache is not None else 0
        if cache is not None:
            _compact(cache)
        return {**_facts(directory, cache), "removed": removed, "before_bytes": before}


def prune_cache(directory: str | Path, *, max_bytes: int | None = None,
                older_than_seconds: float | None = None) -> dict[str, Any]:
    """Drop the entries of the cache in `directory` not used (stored or looked up) for
    `older_than_seconds`, then the least recently used ones until its volume is at most
    `max_bytes` (the eviction order and measure of a job's own size limit). Returns `removed`,
    and `size_bytes` / `volume_bytes` after, `before_bytes` on disk before."""
    if max_bytes is None and older_than_seconds is None:
        raise InputError("cache prune needs --max-size (e.g. 500MB) or --older-than (e.g. 30d), or both.")
    if max_bytes is not None and max_bytes < 0:
        raise InputError(f"--max-size must be 0 or more bytes (got {max_bytes}).")
    directory = Path(directory).expanduser()
    with _existing(directory) as cache:
        before = _size_on_disk(directory)
        removed = 0
        if cache is not None and older_than_seconds is not None:
            removed += _delete(cache, "access_time < ?", [time.time() - older_than_seconds])
        if cache is not None and max_bytes is not None:
            while (volume := cache.volume()) > max_bytes:
                # the least recently used rows that hold the excess, their keys and values scaled
                # by the database's overhead on them (pages freed only in part give back less: the
                # loop measures again and goes on)
                row_bytes = "length(key) + COALESCE(length(value), 8)"
                held = cache._sql(f"SELECT SUM({row_bytes}) FROM Cache").fetchone()[0] or 0
                excess, last = (volume - max_bytes) * held / volume, 0
                for count, (rowid, size) in enumerate(cache._sql(
                        f"SELECT rowid, {row_bytes} FROM Cache ORDER BY access_time LIMIT 50000"), start=1):
                    excess, last = excess - size, rowid
                    if excess <= 0:
                        break
                if not last:
                    break  # nothing left to remove: what remains is the database's own pages
                removed += _delete(cache, "rowid IN (SELECT rowid FROM Cache ORDER BY access_time LIMIT ?)", [count])
        if cache is not None:
            _compact(cache)
        return {**_facts(directory, cache), "removed": removed, "before_bytes": before,
                "volume_bytes": int(cache.volume()) if cache is not None else 0}
