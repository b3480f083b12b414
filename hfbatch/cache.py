"""EmbeddingCache: vectors on disk, keyed by content, safe to share between runs.

Keys are blake2b(backend fingerprint, exact text), so a vector is only ever found again for the
same model, pooling, normalisation and max length. Values are raw little-endian float32 bytes,
never pickles: `_RawOnlyDisk` refuses to unpickle anything, so a cache directory cannot be a
way to run code. Values only ever come from the database's own BLOB column: diskcache's file mode
is switched off, and a row that names a file (planted, or written by an older version) is a
rejected entry, never read and never deleted outside the directory. `store` records the dimension
of each namespace's vectors, so a lookup can refuse a wrong-size value before any vector has been
computed. diskcache stores each batch in one SQLite transaction, so a killed run leaves
whole entries or none, and a rerun finds everything stored before the kill.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import diskcache
import numpy as np
from diskcache.core import MODE_RAW

from .errors import OutputError

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
                self._cache.set(cache_key(_DIM_PREFIX + namespace, ""), int(data.shape[1]))
            for text, row in zip(texts, data):
                self._cache.set(cache_key(namespace, text), row.tobytes())
            for text, count in zip(texts, token_counts or ()):
                self._cache.set(cache_key(_TOKENS_PREFIX + namespace, text), int(count))
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
                self._cache.set(cache_key(namespace, text), bytes(value))
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
