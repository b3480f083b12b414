"""hfbatch/cache.py: content-keyed float32 vectors on disk, raw bytes only, LRU-bounded."""

from __future__ import annotations

import hashlib
import os
import sqlite3
from pathlib import Path

import diskcache
import numpy as np
import pytest

from hfbatch.cache import CacheStats, EmbeddingCache, NullCache, cache_key
from hfbatch.errors import InputError, OutputError

DIM = 384
MiB = 1 << 20


def _vectors(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def _open(directory: Path, fingerprint: str = "fp-a", size: int = 100 * MiB) -> EmbeddingCache:
    return EmbeddingCache(directory, fingerprint, size_limit_bytes=size)


def test_store_then_lookup_returns_identical_float32_vectors(tmp_path: Path) -> None:
    cache = _open(tmp_path / "c")
    texts = ["alpha", "beta", "gamma ü 👍", ""]
    vectors = _vectors(len(texts))
    cache.store(texts, vectors)
    found = cache.lookup(texts, DIM)
    assert sorted(found) == [0, 1, 2, 3]
    for i in range(len(texts)):
        assert found[i].dtype == np.float32
        assert found[i].shape == (DIM,)
        assert np.array_equal(found[i], vectors[i])
    cache.close()


def test_lookup_maps_positions_and_skips_unknown_texts(tmp_path: Path) -> None:
    cache = _open(tmp_path / "c")
    vectors = _vectors(2)
    cache.store(["a", "b"], vectors)
    found = cache.lookup(["x", "b", "y", "a", "b"], DIM)
    assert sorted(found) == [1, 3, 4]
    assert np.array_equal(found[1], vectors[1]) and np.array_equal(found[4], vectors[1])
    assert np.array_equal(found[3], vectors[0])
    cache.close()


def test_float64_input_is_stored_as_float32(tmp_path: Path) -> None:
    cache = _open(tmp_path / "c")
    vectors = _vectors(1).astype(np.float64)
    cache.store(["t"], vectors)
    found = cache.lookup(["t"], DIM)
    assert found[0].dtype == np.float32
    assert np.array_equal(found[0], vectors[0].astype(np.float32))
    cache.close()


def test_different_fingerprint_finds_nothing(tmp_path: Path) -> None:
    directory = tmp_path / "c"
    first = _open(directory, "model-a")
    first.store(["same text"], _vectors(1))
    other = _open(directory, "model-b")
    assert other.lookup(["same text"], DIM) == {}
    assert other.stats.misses == 1 and other.stats.hits == 0
    assert 0 in first.lookup(["same text"], DIM)  # it is there, just not for model-b
    first.close()
    other.close()


def test_entries_persist_across_close_and_reopen(tmp_path: Path) -> None:
    directory = tmp_path / "c"
    vectors = _vectors(3)
    cache = _open(directory)
    cache.store(["a", "b", "c"], vectors)
    cache.close()
    reopened = _open(directory)
    found = reopened.lookup(["a", "b", "c"], DIM)
    assert len(found) == 3
    assert all(np.array_equal(found[i], vectors[i]) for i in range(3))
    reopened.close()


def test_lookup_with_dim_rejects_wrong_size(tmp_path: Path) -> None:
    cache = _open(tmp_path / "c")
    cache.store(["short"], _vectors(1, dim=8))
    assert cache.lookup(["short"], DIM) == {}
    assert cache.stats.rejected == 1
    assert cache.stats.misses == 1 and cache.stats.hits == 0
    # Without a known dim the same entry is usable.
    assert cache.lookup(["short"], None)[0].shape == (8,)
    cache.close()


def test_planted_pickle_is_never_unpickled(tmp_path: Path) -> None:
    directory = tmp_path / "c"
    marker = tmp_path / "marker-created-by-unpickling"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))  # any unpickle of this entry creates `marker`

    cache = _open(directory, "fp-a")
    cache.close()
    key = cache_key("fp-a", "innocent text")
    planted = diskcache.Cache(str(directory))  # default Disk: pickles the object
    planted.set(key, Payload())
    planted.close()
    assert not marker.exists()

    cache = _open(directory, "fp-a")
    assert cache.lookup(["innocent text"], None) == {}
    assert cache.stats.hits == 0 and cache.stats.misses == 1
    assert not marker.exists()
    cache.close()

    # Control: the entry really is a live pickle under that key, so the check above means something.
    plain = diskcache.Cache(str(directory))
    plain.get(key)
    plain.close()
    assert marker.exists()


def test_values_in_the_database_are_raw_little_endian_bytes(tmp_path: Path) -> None:
    directory = tmp_path / "c"
    cache = _open(directory, "fp-a")
    vectors = _vectors(2)
    cache.store(["one", "two"], vectors)
    cache.close()
    with sqlite3.connect(directory / "cache.db") as db:
        rows = db.execute("SELECT key, mode, typeof(value), value FROM Cache ORDER BY key").fetchall()
    assert len(rows) == 3  # two vectors and the namespace's dimension record
    by_key = {key: (mode, kind, value) for key, mode, kind, value in rows}
    assert by_key.pop(cache_key("dim|fp-a", "")) == (1, "integer", DIM)
    for text, vector in zip(["one", "two"], vectors):
        mode, kind, value = by_key[cache_key("fp-a", text)]
        assert mode == 1  # diskcache MODE_RAW: stored as-is, never pickled
        assert kind == "blob"
        assert isinstance(value, bytes)
        assert value == vector.astype("<f4").tobytes()


def test_store_refuses_non_bytes_values(tmp_path: Path) -> None:
    cache = _open(tmp_path / "c")
    with pytest.raises(TypeError):
        cache._cache.set("k", {"not": "bytes"})  # the Disk itself refuses anything but bytes
    cache.close()


def test_stats_count_hits_misses_and_hit_rate(tmp_path: Path) -> None:
    cache = _open(tmp_path / "c")
    assert cache.stats.hit_rate == 0.0  # nothing looked up yet: no division by zero
    cache.store(["a", "b"], _vectors(2))
    assert cache.stats.stores == 2
    cache.lookup(["a", "b", "c"], DIM)
    cache.lookup(["d"], DIM)
    assert (cache.stats.hits, cache.stats.misses) == (2, 2)
    assert cache.stats.hit_rate == pytest.approx(0.5)
    cache.close()


def test_cache_stats_hit_rate() -> None:
    assert CacheStats(hits=3, misses=1).hit_rate == pytest.approx(0.75)
    assert CacheStats().hit_rate == 0.0


# Sizing for the eviction tests: diskcache measures volume as SQLite page_count * page_size plus
# the sizes of value files (none here: 1,536-byte values live in the DB). An empty cache is about
# 32 KiB and each 384-dim entry costs roughly 2.2 KiB of pages, so 1 MiB holds ~400 entries.
# EmbeddingCache culls 100 entries at a time (cull_limit), so the capacity must be well above
# 100 for "recently read survives" to be a fair expectation.
EVICT_LIMIT = 1 * MiB
EVICT_TOTAL = 1200  # three times the capacity: eviction must happen several times


def test_lru_eviction_bounds_volume_and_keeps_recently_read(tmp_path: Path) -> None:
    """One store per call (one transaction each): volume stays under the limit, LRU order holds."""
    cache = _open(tmp_path / "c", size=EVICT_LIMIT)
    cache.store(["keep"], _vectors(1, seed=1))
    vectors = _vectors(EVICT_TOTAL, seed=2)
    for i in range(EVICT_TOTAL):
        cache.store([f"t{i}"], vectors[i : i + 1])
        assert 0 in cache.lookup(["keep"], DIM)  # read after every store: never least recent
        assert cache.volume_bytes() <= EVICT_LIMIT
    found = cache.lookup([f"t{i}" for i in range(EVICT_TOTAL)], DIM)
    assert 0 in cache.lookup(["keep"], DIM)
    assert 0 not in found and 99 not in found  # the oldest unread ones went first
    assert EVICT_TOTAL - 1 in found  # the newest is there
    assert 100 < len(found) < EVICT_TOTAL  # evicted some, not everything
    assert min(found) > EVICT_TOTAL - len(found) - 101  # survivors are the most recent run
    cache.close()


def test_lru_eviction_with_batched_stores_keeps_recently_read(tmp_path: Path) -> None:
    """The pipeline stores a chunk's misses in one call; eviction must still be LRU, not a wipe."""
    cache = _open(tmp_path / "c", size=EVICT_LIMIT)
    cache.store(["keep"], _vectors(1, seed=1))
    vectors = _vectors(EVICT_TOTAL, seed=2)
    batch = 20
    for start in range(0, EVICT_TOTAL, batch):
        cache.store([f"t{i}" for i in range(start, start + batch)], vectors[start : start + batch])
        assert 0 in cache.lookup(["keep"], DIM), f"recently read entry evicted after storing {start + batch}"
    assert cache.volume_bytes() <= EVICT_LIMIT
    found = cache.lookup([f"t{i}" for i in range(EVICT_TOTAL)], DIM)
    assert 100 < len(found) < EVICT_TOTAL
    cache.close()


def test_cache_key_is_stable_and_depends_on_fingerprint_and_text() -> None:
    key = cache_key("fp-1", "hello")
    assert key == cache_key("fp-1", "hello")
    # Pinned: changing the key scheme silently invalidates every user's cache.
    assert key == "752017e32d998a091e95c152fe2571a8adfe517f"
    assert key == hashlib.blake2b(b"fp-1\x00hello", digest_size=20).hexdigest()
    assert cache_key("fp-2", "hello") != key
    assert cache_key("fp-1", "hello ") != key
    assert cache_key("fp-1", "Hello") != key
    # The separator keeps fingerprint and text apart.
    assert cache_key("ab", "c") != cache_key("a", "bc")


def test_cache_key_handles_lone_surrogates() -> None:
    assert cache_key("fp", "\ud800") != cache_key("fp", "\udc00")


def test_null_cache_finds_nothing_and_counts_misses() -> None:
    cache = NullCache()
    cache.store(["a", "b"], _vectors(2))
    assert cache.lookup(["a", "b", "c"], DIM) == {}
    assert cache.stats.misses == 3 and cache.stats.hits == 0
    assert cache.stats.hit_rate == 0.0
    assert cache.volume_bytes() == 0
    cache.close()


def test_unwritable_cache_dir_raises_output_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory", encoding="utf-8")
    with pytest.raises(OutputError, match="--cache-dir") as info:
        EmbeddingCache(blocker / "cache", "fp", size_limit_bytes=MiB)
    assert str(blocker / "cache") in str(info.value)


def test_a_cache_that_cannot_open_warns_and_the_job_runs_without_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from conftest import rows_for, write_csv
    from hfbatch import EmbedOptions
    import hfbatch

    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory", encoding="utf-8")
    src = write_csv(tmp_path / "in.csv", rows_for(["one", "two", "three"]))
    with caplog.at_level("WARNING"):
        result = hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "o.parquet", cache_dir=blocker / "cache"))
    assert result.metrics["rows_embedded"] == 3 and result.output.exists()
    cache = result.metrics["cache"]
    assert cache["enabled"] is False and "cannot open the embedding cache" in cache["disabled"]
    assert sum("Going on without a cache" in r.message for r in caplog.records) == 1  # warned once


def test_a_cache_that_breaks_mid_job_is_dropped_once_and_nothing_is_lost(tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    cache = EmbeddingCache(tmp_path / "c", "fp", size_limit_bytes=MiB)
    cache.store(["a"], np.ones((1, 4), dtype=np.float32))

    def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise sqlite3.DatabaseError("file is not a database")  # what SQLite says of a file overwritten mid-job

    cache._cache.transact = broken  # every lookup and store goes through a transaction
    with caplog.at_level("WARNING"):
        assert cache.lookup(["a", "b"], 4) == {}
        cache.store(["b"], np.ones((1, 4), dtype=np.float32))
        assert cache.lookup_tokens(["a"]) == {}
    assert cache.disabled and "file is not a database" in cache.disabled
    assert cache.stats.misses == 2 and cache.stats.stores == 1  # the first store, before the fault
    assert sum("going on without it" in r.message for r in caplog.records) == 1


def test_a_corrupt_cache_database_does_not_stop_a_job(tmp_path: Path) -> None:
    from conftest import rows_for, write_csv
    from hfbatch import EmbedOptions
    import hfbatch

    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "cache.db").write_bytes(b"garbage, not SQLite" * 200)
    src = write_csv(tmp_path / "in.csv", rows_for(["one", "two"]))
    result = hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "o.parquet", cache_dir=tmp_path / "cache"))
    assert result.metrics["rows_embedded"] == 2 and result.metrics["cache"]["enabled"] is False


# --- hostile entries: only the database's own BLOB column is ever read -------------------------

def _plant_file_row(directory: Path, key: str, target: Path, mode: int = 2) -> None:
    """A Cache row as diskcache writes one for a value kept in a file (MODE_BINARY = 2, MODE_TEXT = 3),
    but naming `target`, a file outside the cache directory, by its absolute path."""
    now = 1.0e9
    with sqlite3.connect(directory / "cache.db") as db:
        db.execute("DELETE FROM Cache WHERE key = ?", (key,))
        db.execute(
            "INSERT INTO Cache (key, raw, store_time, expire_time, access_time, access_count, tag, size, mode,"
            " filename, value) VALUES (?, 1, ?, NULL, ?, 0, NULL, ?, ?, ?, NULL)",
            (key, now, now, target.stat().st_size, mode, str(target)),
        )


@pytest.mark.parametrize("mode", [2, 3])  # diskcache MODE_BINARY, MODE_TEXT: both name a file
def test_a_row_naming_a_file_outside_the_cache_is_never_read(tmp_path: Path, mode: int) -> None:
    directory = tmp_path / "c"
    _open(directory).close()
    secret = tmp_path / "outside" / "secret.bin"
    secret.parent.mkdir()
    secret.write_bytes(np.full(DIM, 0.5, dtype="<f4").tobytes())  # a valid-length vector, byte for byte
    for text in ("vector", "bytes"):
        _plant_file_row(directory, cache_key("fp-a", text), secret, mode)
    _plant_file_row(directory, cache_key("tokens|fp-a", "vector"), secret, mode)

    cache = _open(directory)
    assert cache.lookup(["vector"], DIM) == {}
    assert cache.lookup_tokens(["vector"]) == {}
    assert cache.lookup_bytes(["bytes"], "fp-a") == {}
    assert cache.stats.rejected == 3 and cache.stats.hits == 0 and cache.stats.misses == 2
    cache.close()


def test_replacing_or_evicting_a_planted_file_row_deletes_no_file_outside_the_cache(tmp_path: Path) -> None:
    """diskcache deletes the file a row names when the row is replaced or evicted: a planted row
    must not turn a store (or the size limit) into deleting a file anywhere on the machine."""
    directory = tmp_path / "c"
    _open(directory).close()
    victims = [tmp_path / f"precious-{i}.txt" for i in range(2)]
    for victim in victims:
        victim.write_text("do not delete", encoding="utf-8")
    _plant_file_row(directory, cache_key("fp-a", "replaced"), victims[0])
    _plant_file_row(directory, cache_key("fp-a", "evicted"), victims[1])

    cache = _open(directory, size=EVICT_LIMIT)
    cache.store(["replaced"], _vectors(1))  # overwrites the planted row
    for start in range(0, 800, 100):  # fills past the size limit: the old planted row is culled
        cache.store([f"t{i}" for i in range(start, start + 100)], _vectors(100, seed=start))
    cache.close()
    with sqlite3.connect(directory / "cache.db") as db:  # both planted rows really went
        gone = [cache_key("fp-a", t) for t in ("replaced", "evicted")]
        assert db.execute("SELECT count(*) FROM Cache WHERE key IN (?, ?) AND mode != 1", gone).fetchone()[0] == 0
    assert all(v.read_text(encoding="utf-8") == "do not delete" for v in victims)


def test_values_of_any_size_are_kept_in_the_database_never_in_files(tmp_path: Path) -> None:
    directory = tmp_path / "c"
    cache = _open(directory)
    big = _vectors(1, dim=16384)  # 64 KiB: diskcache would put this in a file by default
    cache.store(["big"], big)
    cache.store_bytes(["result"], [b"x" * 100_000], "gen")
    assert np.array_equal(cache.lookup(["big"], 16384)[0], big[0])
    assert cache.lookup_bytes(["result"], "gen")[0] == b"x" * 100_000
    cache.close()
    with sqlite3.connect(directory / "cache.db") as db:
        assert db.execute("SELECT count(*) FROM Cache WHERE mode != 1 OR filename IS NOT NULL").fetchone()[0] == 0
    assert [p.name for p in directory.iterdir() if p.is_dir()] == []  # no value files


# --- dimension: a value is only a hit when its size is the model's -----------------------------

def test_without_a_known_dimension_only_the_recorded_one_is_accepted(tmp_path: Path) -> None:
    """`store` records the dimension of the vectors it keeps; with no dimension given, lookups
    accept only values of that size, and a namespace with no record (entries planted by hand, or
    by an older hfbatch) has no hits at all, so a first chunk cannot take its size from a planted value."""
    cache = _open(tmp_path / "c")
    cache._cache.set(cache_key("fp-a", "planted"), np.ones(10, dtype="<f4").tobytes())  # no record
    assert cache.lookup(["planted"], None) == {}
    assert cache.stats.rejected == 1
    cache.store(["real"], _vectors(1))  # records 384 for fp-a
    found = cache.lookup(["real", "planted"], None)
    assert list(found) == [0] and found[0].shape == (DIM,)
    assert cache.stats.rejected == 2
    cache.close()


# --- the key is the exact text --------------------------------------------------------------------

def test_nfc_and_nfd_forms_of_a_text_are_two_entries(tmp_path: Path) -> None:
    """Documented behaviour: texts are not Unicode-normalised, so composed and decomposed forms of
    one word are two keys, two misses and two vectors (the model may tokenise them differently)."""
    import unicodedata

    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    assert nfc != nfd and cache_key("fp-a", nfc) != cache_key("fp-a", nfd)
    cache = _open(tmp_path / "c")
    assert cache.lookup([nfc, nfd], DIM) == {} and cache.stats.misses == 2
    cache.store([nfc], _vectors(1))
    assert list(cache.lookup([nfc, nfd], DIM)) == [0]  # the NFD form is still a miss
    cache.store([nfd], _vectors(1, seed=1))
    assert len(cache.lookup([nfc, nfd], DIM)) == 2
    cache.close()
    with sqlite3.connect(tmp_path / "c" / "cache.db") as db:
        keys = {k for (k,) in db.execute("SELECT key FROM Cache")}
    assert {cache_key("fp-a", nfc), cache_key("fp-a", nfd)} <= keys


# --- the directory as a whole: cache_info, clear_cache, prune_cache --------------------------------

def _filled(directory: Path) -> None:
    """Two namespaces: 300 texts under fp-a (vectors and token counts), 100 under fp-b."""
    cache = _open(directory, "fp-a")
    cache.store([f"a{i}" for i in range(300)], _vectors(300), token_counts=[7] * 300)
    cache.store([f"b{i}" for i in range(100)], _vectors(100, seed=1), fingerprint="fp-b")
    cache.close()


def test_info_counts_entries_per_namespace_and_opens_nothing_new(tmp_path: Path) -> None:
    from hfbatch.cache import cache_info

    _filled(tmp_path / "c")
    info = cache_info(tmp_path / "c")
    assert info["exists"] and info["entries"] == 300 * 2 + 1 + 100 + 1  # vectors, token counts, a dimension each
    assert [(n["namespace"], n["entries"]) for n in info["namespaces"]] == [("fp-a", 601), ("fp-b", 101)]
    assert info["namespaces"][0]["value_bytes"] >= 300 * DIM * 4
    assert info["size_bytes"] >= info["volume_bytes"] > 400 * DIM * 4
    empty = cache_info(tmp_path / "nothing")
    assert not empty["exists"] and empty["entries"] == 0 and not (tmp_path / "nothing").exists()


def test_prune_to_a_size_drops_the_least_recently_used_first(tmp_path: Path) -> None:
    from hfbatch.cache import cache_info, prune_cache

    _filled(tmp_path / "c")
    cache = _open(tmp_path / "c", "fp-a")
    assert len(cache.lookup([f"a{i}" for i in range(20)], DIM)) == 20  # used just now: kept
    cache.close()
    before = cache_info(tmp_path / "c")["volume_bytes"]
    report = prune_cache(tmp_path / "c", max_bytes=before // 3)
    assert report["volume_bytes"] <= before // 3 and report["removed"] > 0
    assert report["volume_bytes"] > before // 5  # about the excess, not everything
    cache = _open(tmp_path / "c", "fp-a")
    assert len(cache.lookup([f"a{i}" for i in range(20)], DIM)) == 20
    assert len(cache.lookup([f"a{i}" for i in range(200, 300)], DIM)) < 100  # stored early, never read again
    cache.close()


def test_prune_by_age_drops_only_entries_unused_for_that_long(tmp_path: Path) -> None:
    import time

    from hfbatch.cache import cache_info, parse_age, prune_cache

    _filled(tmp_path / "c")
    with sqlite3.connect(tmp_path / "c" / "cache.db") as db:  # fp-b last used 40 days ago
        db.execute("UPDATE Cache SET access_time = ? WHERE tag = 'fp-b'", (time.time() - 40 * 86400,))
    report = prune_cache(tmp_path / "c", older_than_seconds=parse_age("30d"))
    assert report["removed"] == 101
    assert [n["namespace"] for n in cache_info(tmp_path / "c")["namespaces"]] == ["fp-a"]
    assert parse_age("12h") == 12 * 3600 and parse_age("2w") == 14 * 86400
    for bad in ("30 days", "-1d", "0d", "d"):
        with pytest.raises(InputError, match="--older-than .* is not an age"):
            parse_age(bad)
    with pytest.raises(InputError, match="needs --max-size"):
        prune_cache(tmp_path / "c")


def test_clear_removes_every_entry_but_no_file_outside_the_cache(tmp_path: Path) -> None:
    from hfbatch.cache import cache_info, clear_cache

    _filled(tmp_path / "c")
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me")
    with sqlite3.connect(tmp_path / "c" / "cache.db") as db:  # a planted row naming a file outside
        db.execute("INSERT INTO Cache (key, raw, store_time, expire_time, access_time, access_count, tag, size, mode,"
                   " filename, value) VALUES ('planted', 1, 0, NULL, 0, 0, NULL, 7, 2, ?, NULL)", (str(outside),))
    report = clear_cache(tmp_path / "c")
    assert report["removed"] == 300 * 2 + 1 + 100 + 1 + 1 and report["size_bytes"] < report["before_bytes"]
    assert cache_info(tmp_path / "c")["entries"] == 0 and outside.read_text() == "keep me"
    cache = _open(tmp_path / "c", "fp-a")
    assert cache.lookup(["a1"], DIM) == {}
    cache.close()
