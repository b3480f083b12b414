"""Scale-out benchmark: many parts with the local engine and with `--engine ray` (local cluster),
against the plain single-file pipeline on the same rows, in one run.

    python benchmarks/bench_scale.py [--parts 4] [--rows-per-part 2500] [--workers 2]
    python benchmarks/bench_scale.py --driver-memory [--rows-per-part 5000]

Every contender starts with an empty cache. Ray's time includes `ray.init` of a local cluster and
each actor loading the model; the plain pipeline's includes its own model load (the process has
not loaded the model before its run: each contender runs in a fresh process).

--driver-memory: the Ray driver's peak RSS over 16 parts against 4 parts of the same size (every
part holds the same texts under other ids, and the cache is warmed first, so the actors compute
nothing and the run measures what the driver holds, not the model). A driver that kept every
part's rows until the end would grow with the parts; one that writes each part as it completes
stays flat.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / ".work" / "scale"
sys.path.insert(0, str(ROOT / "benchmarks"))

_RUN = """
import json, sys, time
from pathlib import Path
started = time.perf_counter()
from hfbatch import EmbedOptions
kind, src, out, cache, workers = sys.argv[1:6]
opts = EmbedOptions(input=Path(src), output=Path(out), cache_dir=Path(cache))
if kind == "single":
    import hfbatch
    result = hfbatch.embed(opts)
    rows = result.metrics["rows_written"]
elif kind == "parts":
    from hfbatch.engines.parts import run_embed_parts
    rows = run_embed_parts(opts).document["totals"]["rows_out"]
else:
    from hfbatch.engines.ray import run_embed_ray
    rows = run_embed_ray(opts, num_workers=int(workers)).document["totals"]["rows_out"]
import resource
peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # this process: the driver
print(json.dumps({"s": time.perf_counter() - started, "rows": rows, "peak_mb": peak_mb}))
"""


def run(kind: str, src: Path, out: Path, workers: int, cache: Path | None = None) -> dict:
    if cache is None:
        cache = WORK / f"cache-{kind}"
        shutil.rmtree(cache, ignore_errors=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "-c", _RUN, kind, str(src), str(out), str(cache), str(workers)],
                          capture_output=True, text=True, env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    from bench_embed import corpus
    import pyarrow as pa
    import pyarrow.parquet as pq

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", type=int, default=4)
    parser.add_argument("--rows-per-part", type=int, default=2500)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--driver-memory", action="store_true", help="Ray driver peak RSS, 16 parts vs 4")
    args = parser.parse_args()
    shutil.rmtree(WORK, ignore_errors=True)
    if args.driver_memory:
        return driver_memory(args.rows_per_part, args.workers)
    (WORK / "data").mkdir(parents=True)
    texts = corpus(args.parts * args.rows_per_part, seed=21)
    for p in range(args.parts):
        part = texts[p * args.rows_per_part:(p + 1) * args.rows_per_part]
        pq.write_table(pa.table({"id": list(range(len(part))), "text": part}), WORK / "data" / f"part-{p:03d}.parquet")
    pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), WORK / "all.parquet")
    print(f"{os.cpu_count()} cores; {args.parts} parts x {args.rows_per_part} rows, MiniLM-L6 fp32, empty caches")
    single = run("single", WORK / "all.parquet", WORK / "single.parquet", args.workers)
    parts = run("parts", WORK / "data", WORK / "out-parts", args.workers)
    ray = run("ray", WORK / "data", WORK / "out-ray", args.workers)
    ray_one = run("ray", WORK / "all.parquet", WORK / "out-ray-one", args.workers)  # its blocks cut at the chunk size
    for label, r in (("plain pipeline, one file", single), ("local engine, parts", parts),
                     (f"ray engine, local cluster, {args.workers} actors", ray),
                     (f"ray engine, one file, {args.workers} actors", ray_one)):
        print(f"{label:40s} {r['s']:7.2f} s  {r['rows'] / r['s']:7.1f} rows/s  ratio vs plain {single['s'] / r['s']:.2f}x")


def driver_memory(rows_per_part: int, workers: int) -> None:
    from bench_embed import corpus
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = corpus(rows_per_part, seed=22)
    for count in (4, 16):
        (WORK / f"data-{count}").mkdir(parents=True)
        for p in range(count):
            ids = list(range(p * rows_per_part, (p + 1) * rows_per_part))
            pq.write_table(pa.table({"id": ids, "text": texts}), WORK / f"data-{count}" / f"part-{p:03d}.parquet")
    cache = WORK / "cache-shared"
    warm = run("parts", WORK / "data-4", WORK / "out-warm", workers, cache)  # fills the cache once
    print(f"{os.cpu_count()} cores; parts of {rows_per_part} rows (the same texts), warm cache "
          f"(filled in {warm['s']:.1f} s); Ray local cluster, {workers} actors")
    results = {count: run("ray", WORK / f"data-{count}", WORK / f"out-ray-{count}", workers, cache) for count in (4, 16)}
    for count, r in results.items():
        print(f"ray driver, {count:2d} parts ({count * rows_per_part:,} rows): peak RSS {r['peak_mb']:7.1f} MiB, {r['s']:6.2f} s")
    print(f"driver peak RSS 16 parts / 4 parts: {results[16]['peak_mb'] / results[4]['peak_mb']:.3f} (target <= 1.15)")


if __name__ == "__main__":
    main()
