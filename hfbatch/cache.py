"""EmbeddingCache: vectors on disk, keyed by content, safe to share between runs.

Keys are blake2b(backend fingerprint, exact text), so a vector is only ever found again for the
same model, pooling, normalisation and max length. Values are raw little-endian float32 bytes,
never pickles: `_RawOnlyDisk` refuses to unpickle anything, so a cache directory cannot be a
way to run code. diskcache stores each batch in one SQLite transaction, so a killed run leaves
whole entries or none, and a rerun finds everything stored before the kill.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import diskcache
import numpy as np
from diskcache.core import MODE_PICKLE

from .errors import OutputError

_LE_FLOAT32 = np.dtype("<f4")


class _RawOnlyDisk(diskcache.Disk):
    """A diskcache Disk that stores bytes as-is and will not unpickle what it finds."""

    def store(self, value, read, key=diskcache.core.UNKNOWN):  # type: ignore[override]
        if not isinstance(value, bytes):
            raise TypeError("EmbeddingCache stores raw bytes only")
        return super().store(value, read, key=key)

    def fetch(self, mode, filename, value, read):  # type: ignore[override]
        if mode == MODE_PICKLE:
            return None  # planted or foreign entry: treat as a miss, never unpickle
        return super().fetch(mode, filename, value, read)


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    stores: int = 0
    rejected: int = 0  # entries found with the wrong size or type, treated as misses

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
            )
        except Exception as exc:  # sqlite or filesystem trouble: name the place and the way out
            raise OutputError(
                f"cannot open the embedding cache at {self.directory} ({exc}); "
                "pass another --cache-dir or --no-cache."
            ) from exc

    def lookup(self, texts: Sequence[str], dim: int | None, fingerprint: str | None = None) -> dict[int, np.ndarray]:
        """Index in `texts` -> vector, for each text found. `dim`, when known, rejects odd sizes.

        `fingerprint` overrides the cache's own for this call: under --backend auto the namespace
        follows whichever backend is producing vectors at the time.
        """
        found: dict[int, np.ndarray] = {}
        namespace = fingerprint or self.fingerprint
        with self._cache.transact():
            for i, text in enumerate(texts):
                raw = self._cache.get(cache_key(namespace, text))
                if isinstance(raw, bytes) and raw and len(raw) % 4 == 0 and (dim is None or len(raw) == 4 * dim):
                    found[i] = np.frombuffer(raw, dtype=_LE_FLOAT32).astype(np.float32, copy=False)
                elif raw is not None:
                    self.stats.rejected += 1
        self.stats.hits += len(found)
        self.stats.misses += len(texts) - len(found)
        return found

    def store(self, texts: Sequence[str], vectors: np.ndarray, fingerprint: str | None = None) -> None:
        """Store one vector per text, all in one transaction."""
        data = np.ascontiguousarray(vectors, dtype=_LE_FLOAT32)
        namespace = fingerprint or self.fingerprint
        with self._cache.transact():
            for text, row in zip(texts, data):
                self._cache.set(cache_key(namespace, text), row.tobytes())
        self._cache.cull(retry=True)  # least recently used first, until under the size limit
        self.stats.stores += len(texts)

    def volume_bytes(self) -> int:
        return int(self._cache.volume())

    def close(self) -> None:
        self._cache.close()


class NullCache:
    """Stands in for EmbeddingCache under --no-cache: finds nothing, keeps nothing."""

    directory = None

    def __init__(self) -> None:
        self.stats = CacheStats()

    def lookup(self, texts: Sequence[str], dim: int | None, fingerprint: str | None = None) -> dict[int, np.ndarray]:
        self.stats.misses += len(texts)
        return {}

    def store(self, texts: Sequence[str], vectors: np.ndarray, fingerprint: str | None = None) -> None:
        pass

    def volume_bytes(self) -> int:
        return 0

    def close(self) -> None:
        pass
