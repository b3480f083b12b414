"""Scale-out benchmark: many parts with the local engine and with `--engine ray` (local cluster),
against the plain single-file pipeline on the same rows, in one run.

    python benchmarks/bench_scale.py [--parts 4] [--rows-per-part 2500] [--workers 2]

Every contender starts with an empty cache. Ray's time includes `ray.init` of a local cluster and
each actor loading the model; the plain pipeline's includes its own model load (the process has
not loaded the model before its run: each contender runs in a fresh process).
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
    from hfbatch import embed_file
    result = embed_file(opts)
    rows = result.metrics["rows_written"]
elif kind == "parts":
    from hfbatch.engines.parts import run_embed_parts
    rows = run_embed_parts(opts).document["totals"]["rows_out"]
else:
    from hfbatch.engines.ray import run_embed_ray
    rows = run_embed_ray(opts, num_workers=int(workers)).document["totals"]["rows_out"]
print(json.dumps({"s": time.perf_counter() - started, "rows": rows}))
"""


def run(kind: str, src: Path, out: Path, workers: int) -> dict:
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
    args = parser.parse_args()
    shutil.rmtree(WORK, ignore_errors=True)
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
    for label, r in (("plain pipeline, one file", single), ("local engine, parts", parts),
                     (f"ray engine, local cluster, {args.workers} actors", ray)):
        print(f"{label:40s} {r['s']:7.2f} s  {r['rows'] / r['s']:7.1f} rows/s  ratio vs plain {single['s'] / r['s']:.2f}x")


if __name__ == "__main__":
    main()
