"""Day 1 / day 2: syncing a changing source into each target by id, as a cron job does.

Day 1 syncs N real-text rows (a sample review per row, its first 200 characters, made distinct) into a target with an
empty cache. Day 2's input has 1% of the texts changed, 1% new rows and 1% of the rows gone, and
runs with --delete-missing. Each day is `hfbatch embed` as a subprocess, as cron runs it (start-up
and model load included). Printed per target:
- day 1 rows/s, and as a ratio to raw `SentenceTransformer.encode` (batch 32, fp32, model loaded)
  on the same texts in this run; and to the same job written to a Parquet file;
- day 2: texts embedded (the sidecar's count; expected: changed + new), bytes added to the table,
  wall seconds, and day 2 / day 1 wall (the issue's bar: <= 15%);
- the check: the target after day 2 against a rebuild from the day-2 input into a new target
  (warm cache): the same ids, none twice, every vector at cosine >= 0.9999.

Every target gets `--keep stars` (the id column is kept with it; the text is not), so each writes
the same columns and "x parquet" compares like with like.

Postgres (pgvector): one server for the whole benchmark, started from the `pgserver` wheel's
binaries by tests/pg.py under .work/sync/pg (stopped at the end, also on failure); day 1 and day 2
into table `day`, the rebuild into table `rebuild`, read back with psycopg. Bytes added come from
the run's --json document (metrics.sync.bytes_added: pg_total_relation_size after - before), and
the server's own row counters (pg_stat_user_tables) show what day 2 inserted, updated and deleted.
Statements over 1 s are logged with their duration (log_min_duration_statement), and their times
printed: where the commit's time goes (COPY into the stage table, INSERT ... ON CONFLICT, COMMIT).

    python benchmarks/bench_sync.py [--rows 100000] [--targets lance,delta,postgres,parquet]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / ".work" / "sync"
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench_embed import raw_encode  # noqa: E402

KEEP = ("--keep", "stars")
PG_TABLES = {"t": "day", "r": "rebuild"}  # (target_path's name prefix -> the Postgres table)
PG = None  # the benchmark's PgServer, when a target is postgres


def reviews() -> list[str]:
    from bench_embed import corpus

    return [t.split(" ", 1)[1] for t in corpus(2000, seed=3)]  # the sample reviews, mixed


def inputs(rows: int, seed: int = 11) -> tuple[pa.Table, pa.Table, dict[str, int]]:
    """Day 1 and day 2 tables (id, text, stars) and what day 2 changes."""
    rng = random.Random(seed)
    base = reviews()
    texts = [f"#{i} {rng.choice(base)[:200]}" for i in range(rows)]
    stars = [rng.randint(1, 5) for _ in range(rows)]
    day1 = pa.table({"id": pa.array(range(rows), pa.int64()), "text": texts, "stars": stars})
    k = max(1, rows // 100)
    order = list(range(rows))
    rng.shuffle(order)
    gone, changed = set(order[:k]), set(order[k:2 * k])
    ids2, texts2, stars2 = [], [], []
    for i in range(rows):
        if i in gone:
            continue
        ids2.append(i)
        texts2.append(texts[i] + " (edited: still good)" if i in changed else texts[i])
        stars2.append(stars[i])
    for j in range(k):  # new rows
        ids2.append(rows + j)
        texts2.append(f"#{rows + j} {rng.choice(base)[:200]}")
        stars2.append(rng.randint(1, 5))
    day2 = pa.table({"id": pa.array(ids2, pa.int64()), "text": texts2, "stars": stars2})
    return day1, day2, {"changed": k, "new": k, "gone": k}


def target_path(kind: str, name: str) -> tuple[str, Path | None]:
    """(-o as given, the folder or file it makes; None for a Postgres table)."""
    if kind == "postgres":
        return PG.url(PG_TABLES[name.split("-", 1)[0]]), None
    if kind == "lance":
        return str(WORK / f"{name}.lance"), WORK / f"{name}.lance"
    if kind == "delta":
        return f"delta://{WORK / name}", WORK / name
    return str(WORK / f"{name}.parquet"), WORK / f"{name}.parquet"


def run(source: Path, output: str, cache: Path, *extra: str) -> tuple[dict, float]:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "hfbatch", "embed", str(source), "-o", output, "--id-column", "id",
                           "--cache-dir", str(cache), "--json", "--quiet", *extra],
                          capture_output=True, text=True, cwd=WORK)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"hfbatch failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout), wall


def pg_table(output: str) -> str:
    return output.rsplit("table=", 1)[1]


def read_back(kind: str, output: str) -> pa.Table:
    from hfbatch.io.targets import open_target

    if kind == "postgres":
        from pgvector.psycopg import register_vector

        with PG.connect() as conn:
            register_vector(conn)
            rows = conn.execute(f'SELECT id, embedding FROM "{pg_table(output)}"').fetchall()
        ids = np.array([r[0] for r in rows], dtype=np.int64)
        # (pgvector-python >= 0.5 reads a Vector, earlier a numpy array)
        flat = np.stack([np.asarray(r[1].to_numpy() if hasattr(r[1], "to_numpy") else r[1], dtype=np.float32)
                         for r in rows])
        return pa.table({"id": ids, "embedding": pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel()), flat.shape[1])})
    if kind == "parquet":
        return pq.read_table(output, columns=["id", "embedding"])
    target = open_target(output)
    return pa.Table.from_batches(list(target.batches(["id", "embedding"])))


def vectors_by_id(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    ids = table.column("id").to_numpy()
    order = np.argsort(ids)
    flat = table.column("embedding").combine_chunks()
    dim = len(flat[0])
    values = np.asarray(flat.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, dim)
    return ids[order], values[order]


def pg_size(output: str) -> int:
    with PG.connect() as conn:
        return int(conn.execute("SELECT pg_total_relation_size(to_regclass(%s))", (f'"{pg_table(output)}"',))
                   .fetchone()[0])


def pg_counters(output: str) -> dict[str, int]:
    """The server's cumulative row counters for the table (flushed when a session ends)."""
    time.sleep(1.5)  # (a backend's stats reach the shared ones within ~1 s of its exit)
    with PG.connect() as conn:
        row = conn.execute("SELECT n_tup_ins, n_tup_upd, n_tup_hot_upd, n_tup_del, n_live_tup FROM pg_stat_user_tables "
                           "WHERE relname = %s", (pg_table(output),)).fetchone()
    return dict(zip(["inserted", "updated", "hot_updated", "deleted", "live"], map(int, row)))


def pg_slow_statements(since: int) -> list[str]:
    """'12.3 s COPY ...' for each statement the server logged (over 1 s) after byte `since` of its log."""
    text = (PG.root / "log").read_bytes()[since:].decode(errors="replace")
    out = []
    for line in text.splitlines():
        if "duration:" in line:
            ms, _, rest = line.split("duration:", 1)[1].strip().partition(" ms")
            what = rest.split(":", 1)[1].strip() if ":" in rest else rest
            out.append(f"{float(ms) / 1000:.1f} s {what[:90]}")
    return out


def pg_log_size() -> int:
    return (PG.root / "log").stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--targets", default="lance,delta,postgres,parquet")
    args = parser.parse_args()
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    global PG
    if "postgres" in args.targets.split(","):
        sys.path.insert(0, str(ROOT / "tests"))
        from pg import PgServer

        PG = PgServer(WORK / "pg")
        with PG.connect() as conn:
            conn.execute("ALTER SYSTEM SET log_min_duration_statement = 1000")
            conn.execute("SELECT pg_reload_conf()")
    try:
        bench(args)
    finally:
        if PG is not None:
            PG.stop()


def bench(args: argparse.Namespace) -> None:
    day1, day2, change = inputs(args.rows)
    pq.write_table(day1, WORK / "day1.parquet")
    pq.write_table(day2, WORK / "day2.parquet")
    print(f"{args.rows:,} rows; day 2: {change['changed']:,} changed, {change['new']:,} new, {change['gone']:,} gone")
    results: dict[str, dict] = {}
    for kind in args.targets.split(","):
        cache = WORK / f"cache-{kind}"
        output, where = target_path(kind, f"t-{kind}")
        log_at = pg_log_size() if kind == "postgres" else 0
        doc1, wall1 = run(WORK / "day1.parquet", output, cache, *KEEP)
        if where is None:
            size1 = pg_size(output)
            counters1 = pg_counters(output)
            slow1 = pg_slow_statements(log_at)
            log_at = pg_log_size()
        else:
            size1 = sum(p.stat().st_size for p in where.rglob("*") if p.is_file()) if where.is_dir() else where.stat().st_size
        doc2, wall2 = run(WORK / "day2.parquet", output, cache, *KEEP, "--delete-missing")
        extra: dict = {}
        if where is None:
            counters2 = pg_counters(output)
            extra = {"day1_slow_statements": slow1, "day2_slow_statements": pg_slow_statements(log_at),
                     "day2_rows_by_server": {k: counters2[k] - counters1[k] for k in ("inserted", "updated", "deleted")},
                     "day2_live_rows": counters2["live"], "day2_size_bytes": pg_size(output)}
        rebuilt, _ = target_path(kind, f"r-{kind}")
        run(WORK / "day2.parquet", rebuilt, cache, *KEEP)  # warm: a cold rebuild's vectors, from the cache they went to
        a_ids, a = vectors_by_id(read_back(kind, output))
        b_ids, b = vectors_by_id(read_back(kind, rebuilt))
        same_ids = bool(len(a_ids) == len(b_ids) and (a_ids == b_ids).all() and len(np.unique(a_ids)) == len(a_ids))
        cosine = float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min()) if same_ids else None
        sync = doc2["metrics"].get("sync") or {}
        results[kind] = {
            "day1_wall_s": round(wall1, 2), "day1_rows_per_s": round(args.rows / wall1, 1), "day1_bytes": size1,
            "day2_wall_s": round(wall2, 2), "day2_over_day1": round(wall2 / wall1, 4),
            "day2_texts_computed": doc2["metrics"]["texts_computed"], "day2_expected": change["changed"] + change["new"],
            "day2_bytes_added": sync.get("bytes_added"), "day2_deleted": sync.get("deleted"), "day2_sync": sync,
            "day1_metrics": doc1["metrics"], "day2_metrics": doc2["metrics"],
            "same_ids_as_rebuild": same_ids, "min_cosine_to_rebuild": cosine, **extra,
        }
        print(json.dumps({kind: results[kind]}, indent=1))
    texts = day1.column("text").to_pylist()
    _, raw_s = raw_encode(texts)
    raw_rate = args.rows / raw_s
    print(f"\nraw SentenceTransformer.encode: {raw_rate:,.1f} rows/s ({raw_s:.1f} s, model loaded, in-process)")
    print(f"{'target':8} {'day1 rows/s':>12} {'x raw':>6} {'x parquet':>10} {'day2 s':>8} {'day2/day1':>10} "
          f"{'embedded':>9} {'deleted':>12} {'bytes added':>12} {'ids ok':>7} {'min cos':>8}")
    parquet_rate = results.get("parquet", {}).get("day1_rows_per_s")
    for kind, r in results.items():
        print(f"{kind:8} {r['day1_rows_per_s']:>12,.1f} {r['day1_rows_per_s'] / raw_rate:>6.2f} "
              f"{(r['day1_rows_per_s'] / parquet_rate if parquet_rate else float('nan')):>10.2f} {r['day2_wall_s']:>8.1f} "
              f"{r['day2_over_day1']:>10.1%} {r['day2_texts_computed']:>5}/{r['day2_expected']:<4} {r['day2_deleted'] or 0:>7}/{change['gone']:<4} "
              f"{(r['day2_bytes_added'] or 0):>12,} {str(r['same_ids_as_rebuild']):>7} {r['min_cosine_to_rebuild'] or 0:>8.5f}")
    (WORK / "results.json").write_text(json.dumps({"rows": args.rows, "raw_rows_per_s": raw_rate, "targets": results},
                                                  indent=1))


if __name__ == "__main__":
    main()
