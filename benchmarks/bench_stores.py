"""s3:// inputs and outputs against a local S3-protocol server (moto on 127.0.0.1), in one run.

    python benchmarks/bench_stores.py [--rows 25000] [--formats parquet,csv,jsonl] [--repeats 1]

Every job is `hfbatch embed s3://.../in/big.<ext> -o s3://.../out/big.parquet --cache-dir <warm>`
as a fresh process (`python -m hfbatch`) with the bundled all-MiniLM-L6-v2, reaching the server
through the standard AWS_* environment (AWS_ENDPOINT_URL...), exactly as it would reach MinIO/R2.
Rows: id, a text drawn from 2,000 distinct review-like texts (1-3 sentences of the sample
reviews), and a ~200-byte passthrough string column (random hex, incompressible). The cache is
warmed first by one local run over the 2,000 distinct texts, so the model computes nothing and
what is measured is reading, passing through, writing and uploading.

1. memory: peak RSS at N rows and 8N rows, Parquet (ranged reads), CSV and JSONL (streamed):
   the sidecar's metrics.peak_rss_mb (VmHWM when the sidecar is made) and the job's ru_maxrss
   (os.wait4 in a small launcher process: the whole job, upload included); 8x / 1x ratio (target <= 1.15); rows/s end to end (process wall) and as the
   sidecar reports it;
2. bytes: what the server sent for the Parquet input object vs the object's size and vs the text
   column's compressed size (file metadata); also with `--keep id`, where the passthrough column
   need not be read at all;
3. s3:// vs local disk at 1x on the same Parquet file, same run: local -> local, s3 -> local and
   s3 -> s3 (rows/s ratios against local -> local).

The server runs in this process (a thread), so it shares the CPU with the job, as a store on the
same host would.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / ".work" / "stores"
sys.path.insert(0, str(ROOT / "tests"))  # tests/s3_server.py: the counting moto server

BUCKET = "bench-lake"
DISTINCT = 2000
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile")


def cpu_header() -> str:
    model, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown CPU":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    import torch

    shown = ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in FLAGS)
    return (f"CPU: {model}, {os.cpu_count()} cores; flags: {shown}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.1f}")


def distinct_texts(count: int = DISTINCT, seed: int = 5) -> list[str]:
    """`count` distinct texts of 1-3 sentences taken from the sample reviews."""
    sentences: set[str] = set()
    with (ROOT / "sample_data" / "reviews.csv").open(encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            for part in re.split(r"(?<=[.!?])\s+", row["text"]):
                if len(part.split()) >= 3:
                    sentences.add(part.strip())
    pool = sorted(sentences)
    rng = random.Random(seed)
    texts: dict[str, None] = {}
    while len(texts) < count:
        texts[" ".join(rng.sample(pool, rng.choice([1, 2, 2, 3])))] = None
    return list(texts)


def make_table(rows: int, texts: list[str], seed: int):
    import pyarrow as pa

    rng = random.Random(seed)
    return pa.table({
        "id": list(range(rows)),
        "text": [texts[rng.randrange(len(texts))] for _ in range(rows)],
        "payload": [rng.randbytes(100).hex() for _ in range(rows)],  # 200 chars, incompressible
    })


def write_input(table, path: Path) -> None:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if path.suffix == ".parquet":
        pq.write_table(table, path)  # pyarrow's defaults, as most files are written
    elif path.suffix == ".csv":
        pacsv.write_csv(table, path)
    else:
        with path.open("w", encoding="utf-8") as handle:
            for row in table.to_pylist():
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def store_environment(url: str) -> None:
    """Point this process's environment (inherited by every job) at the server only."""
    for name in list(os.environ):
        if name.startswith("AWS_") or name.lower() in ("http_proxy", "https_proxy", "all_proxy"):
            del os.environ[name]
    no_aws = Path(tempfile.mkdtemp(prefix="no-aws-", dir=WORK))
    os.environ.update({
        "AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "bench-secret",
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": str(no_aws / "config"), "AWS_SHARED_CREDENTIALS_FILE": str(no_aws / "credentials"),
        "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
        "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
    })


# A small launcher runs each job and reports the job's own ru_maxrss. Not os.wait4 from this
# process: Linux carries the pre-exec high-water mark over exec, and a child forked (or vforked)
# from this process (the server's objects, the input tables) would report this process's size.
_LAUNCH = """
import json, os, subprocess, sys, time
started = time.perf_counter()
proc = subprocess.Popen(sys.argv[1:])
_, status, usage = os.wait4(proc.pid, 0)
print(json.dumps({"rc": os.waitstatus_to_exitcode(status), "seconds": time.perf_counter() - started,
                  "ru_maxrss_mb": usage.ru_maxrss / 1024}), file=sys.stderr)
"""


def embed(src: str, out: str, cache: Path, extra: tuple[str, ...] = ()) -> dict:
    """One `hfbatch embed` process: its sidecar document, process seconds and ru_maxrss (MiB)."""
    cmd = [sys.executable, "-m", "hfbatch", "embed", src, "-o", out, "--cache-dir", str(cache), "--json", "-q", *extra]
    done = subprocess.run([sys.executable, "-c", _LAUNCH, *cmd], capture_output=True, text=True)
    launch = json.loads(done.stderr.strip().splitlines()[-1])
    if launch["rc"] != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {launch['rc']}:\n{done.stderr[-3000:]}")
    doc = json.loads(done.stdout)
    doc["process_seconds"] = launch["seconds"]
    doc["ru_maxrss_mb"] = launch["ru_maxrss_mb"]  # Linux: KiB -> MiB
    return doc


def text_column_bytes(path: Path, columns: tuple[str, ...]) -> int:
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    total = 0
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        for c in range(group.num_columns):
            chunk = group.column(c)
            if chunk.path_in_schema in columns:
                total += chunk.total_compressed_size
    return total


def main() -> None:
    import pyarrow.parquet as pq
    from s3_server import S3Server

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=25_000, help="N: the 1x input's rows (8x = 8N)")
    parser.add_argument("--formats", default="parquet,csv,jsonl")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of the s3-vs-local comparison")
    args = parser.parse_args()
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    t0 = time.perf_counter()
    print(cpu_header())

    texts = distinct_texts()
    cache = WORK / "cache"
    warm_src = WORK / "distinct.parquet"
    import pyarrow as pa

    pq.write_table(pa.table({"text": texts}), warm_src)
    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    server = S3Server().start()
    try:
        store_environment(server.url)
        warm = embed(str(warm_src), str(WORK / "distinct.out.parquet"), cache)
        print(f"N = {args.rows:,} rows (8x = {8 * args.rows:,}); {len(texts):,} distinct texts, mean "
              f"{sum(map(len, texts)) / len(texts):.0f} chars; cache warmed in {warm['process_seconds']:.1f} s "
              f"({warm['metrics']['texts_computed']:,} computed); server {server.url}")
        server.create_bucket(BUCKET)

        inputs: dict[tuple[str, int], Path] = {}
        for factor in (1, 8):
            table = make_table(args.rows * factor, texts, seed=factor)
            for fmt in formats:
                path = WORK / f"big{factor}x.{fmt}"
                write_input(table, path)
                inputs[fmt, factor] = path

        results: dict[tuple[str, int], dict] = {}
        bytes_rows = []
        for fmt in formats:
            for factor in (1, 8):
                path = inputs[fmt, factor]
                key = f"in/big.{fmt}"
                server.put(BUCKET, key, path.read_bytes())
                server.reset_counts()
                doc = embed(f"s3://{BUCKET}/{key}", f"s3://{BUCKET}/out/big.parquet", cache)
                m = doc["metrics"]
                assert m["texts_computed"] == 0, m["texts_computed"]
                r = {"rows": m["rows_written"], "size": path.stat().st_size, "served": server.bytes_read(key),
                     "gets": len(server.gets(key)),
                     "sidecar_rss": m["peak_rss_mb"], "ru_rss": doc["ru_maxrss_mb"],
                     "rows_s": m["rows_written"] / doc["process_seconds"], "sidecar_rows_s": m["rows_per_second"],
                     "uploaded": sum(q.bytes_in for q in server.requests if q.key.endswith("out/big.parquet"))}
                results[fmt, factor] = r
                print(f"{fmt:7s} {factor}x {r['rows']:>8,} rows, input {r['size'] / 2**20:6.1f} MiB: peak RSS sidecar "
                      f"{r['sidecar_rss']:6.0f} MiB, ru_maxrss {r['ru_rss']:6.0f} MiB; {r['rows_s']:7,.0f} rows/s end to end "
                      f"({r['sidecar_rows_s']:,.0f} sidecar); served {r['served'] / 2**20:.1f} MiB "
                      f"({r['served'] / r['size']:.2f}x the object, {r['gets']} GETs), uploaded "
                      f"{r['uploaded'] / 2**20:.1f} MiB  [{time.perf_counter() - t0:.0f} s]", flush=True)
                if fmt == "parquet":
                    served_keep = None
                    if factor == 1:
                        server.reset_counts()
                        embed(f"s3://{BUCKET}/{key}", f"s3://{BUCKET}/out/keep.parquet", cache, ("--keep", "id"))
                        served_keep = server.bytes_read(key)
                    bytes_rows.append((factor, r["size"], r["served"], text_column_bytes(path, ("text",)),
                                       text_column_bytes(path, ("id", "text")), served_keep,
                                       pq.ParquetFile(path).metadata.num_row_groups))
                server.client().delete_object(Bucket=BUCKET, Key=key)
            server.client().delete_object(Bucket=BUCKET, Key="out/big.parquet")
            server.client().delete_object(Bucket=BUCKET, Key="out/big.parquet.meta.json")

        print("\npeak RSS 8x / 1x (target <= 1.15):")
        for fmt in formats:
            one, eight = results[fmt, 1], results[fmt, 8]
            print(f"  {fmt:7s} sidecar {eight['sidecar_rss'] / one['sidecar_rss']:.3f}, ru_maxrss "
                  f"{eight['ru_rss'] / one['ru_rss']:.3f}; rows/s 8x / 1x {eight['rows_s'] / one['rows_s']:.2f}")
        print("\nParquet input bytes served (all columns kept, the default; and --keep id):")
        for factor, size, served, text_b, id_text_b, served_keep, groups in bytes_rows:
            line = (f"  {factor}x: object {size / 2**20:.2f} MiB ({groups} row group(s)), served {served / 2**20:.2f} MiB = "
                    f"{served / size:.3f} of the object; text column compressed {text_b / 2**20:.2f} MiB "
                    f"(served / text = {served / text_b:.2f})")
            if served_keep is not None:
                line += (f"; --keep id: served {served_keep / 2**20:.2f} MiB = {served_keep / size:.3f} of the object, "
                         f"{served_keep / id_text_b:.2f}x the id+text columns' {id_text_b / 2**20:.2f} MiB")
            print(line)

        # 3. s3 vs local disk, 1x Parquet, interleaved
        key = "in/cmp.parquet"
        src = inputs["parquet", 1]
        server.put(BUCKET, key, src.read_bytes())
        modes = {"local -> local": (str(src), str(WORK / "cmp.out.parquet")),
                 "s3 -> local": (f"s3://{BUCKET}/{key}", str(WORK / "cmp-s3.out.parquet")),
                 "s3 -> s3": (f"s3://{BUCKET}/{key}", f"s3://{BUCKET}/out/cmp.parquet")}
        seen: dict[str, list[dict]] = {m: [] for m in modes}
        for _ in range(args.repeats):
            for mode, (i, o) in modes.items():
                doc = embed(i, o, cache)
                seen[mode].append({"rows_s": doc["metrics"]["rows_written"] / doc["process_seconds"],
                                   "sidecar_rows_s": doc["metrics"]["rows_per_second"]})
        best = {m: (max(x["rows_s"] for x in v), max(x["sidecar_rows_s"] for x in v)) for m, v in seen.items()}
        base = best["local -> local"]
        print(f"\ns3:// vs local disk, parquet 1x ({args.rows:,} rows), best of {args.repeats}:")
        for mode, (rows_s, sidecar) in best.items():
            print(f"  {mode:15s} {rows_s:7,.0f} rows/s end to end ({rows_s / base[0]:.2f}x local), "
                  f"{sidecar:7,.0f} rows/s sidecar ({sidecar / base[1]:.2f}x local)")
        print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
