"""--runtime openvino against ONNX Runtime on the CPU, measured in one run on this machine.

Every row but one is what users run: hfbatch.backends.local.LocalBackend with --runtime onnx,
--runtime openvino (fp32, --precision bf16, --quantize int8), each making and proving its export
of the bundled all-MiniLM-L6-v2 in a temporary folder (HFBATCH_ONNX_DIR), and timed through
`LocalBackend.compute` (tokenizer, runtime, normalisation). The one other row is OpenVINO with the
THROUGHPUT hint on the same graph and tokenizer (what OpenVinoSession's LATENCY was chosen over).
Texts: 1,000 stdlib docstring bodies (benchmarks/retrieval.py's docstring_pairs), sorted by length,
in batches of 32 (max 256 tokens); every configuration runs the same batches after one warm-up
batch, taking turns of 8 batches (so a busy machine slows every configuration alike).

int8 is measured even where its bar (fidelity.INT8) refuses it, and the table says so. Also: the
OpenVINO load time of the fp32 export without a cache, filling CACHE_DIR, and from the cache.

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
from typing import Callable

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
    import onnxruntime as ort
    import openvino as ov
    from retrieval import docstring_pairs

    os.environ["HFBATCH_ONNX_DIR"] = str(work / "exports")
    from hfbatch.backends import fidelity
    from hfbatch.backends import openvino as ovb
    from hfbatch.backends.local import LocalBackend
    from hfbatch.backends.onnx_runner import OnnxRunner
    from hfbatch.settings import DEFAULT_MODEL
    from hfbatch.vectors import cosine_rows

    _, texts = docstring_pairs(args.texts)
    texts = sorted(texts, key=len)
    batches = [texts[i:i + BATCH] for i in range(0, len(texts), BATCH)]

    def backend(**options: str) -> LocalBackend:
        made = LocalBackend(DEFAULT_MODEL, device="cpu", max_length=MAX_LENGTH, **options)
        made.load()  # makes and proves its export
        return made

    onnx = backend(runtime="onnx", precision="fp32", quantize="none")
    assert onnx.loader.exports is not None and onnx.loader.exports.path is not None
    path = onnx.loader.exports.path  # the fp32 graph every OpenVINO configuration reads too
    names = OnnxRunner(path).input_names
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
            ovb.OpenVinoSession(path, cache_dir=cache_dir)
            loads[label].append(time.perf_counter() - started)
    print("load s (best of 3): " + ", ".join(f"{k} {min(v):.2f}" for k, v in loads.items()), flush=True)

    def throughput() -> Callable[[list[str]], np.ndarray]:
        core = ov.Core()
        compiled = core.compile_model(core.read_model(str(path)), "CPU",
                                      {"PERFORMANCE_HINT": "THROUGHPUT", "INFERENCE_PRECISION_HINT": "f32"})
        request, tokenizer = compiled.create_infer_request(), onnx.tokens.load()
        return lambda batch: np.array(request.infer(tokenizer.feeds(batch, MAX_LENGTH, names, onnx.prompt or ""))
                                      [compiled.output(0)], dtype=np.float32)

    bar = fidelity.INT8
    fidelity.INT8 = fidelity.Bar("int8", 0.0, -1.0)  # measured even where the bar refuses it
    try:
        int8 = backend(runtime="openvino", precision="fp32", quantize="int8")
    finally:
        fidelity.INT8 = bar
    proved = int8.export_fidelity or {}
    verdict = "accepted" if proved and bar.passes(proved) else "refused"
    print(f"int8: {verdict} at the int8 bar ({bar}) on the calibration sample: mean {proved.get('mean', 0):.5f}, "
          f"min {proved.get('min', 0):.5f}", flush=True)

    # the configurations take turns, 8 batches each, so a busy neighbour slows all alike (batch by
    # batch turns would charge each runtime for the previous one's spinning threads)
    runners: dict[str, Callable[[list[str]], np.ndarray]] = {
        "onnxruntime fp32 (--runtime onnx)": onnx.compute,
        "openvino fp32 LATENCY (--runtime openvino)": backend(runtime="openvino", precision="fp32").compute,
        "openvino fp32 THROUGHPUT (not run by hfbatch)": throughput(),
        "openvino bf16 LATENCY (--runtime openvino --precision bf16)":
            backend(runtime="openvino", precision="bf16").compute,
        f"openvino int8 (--quantize int8, {verdict} at the bar)": int8.compute,
    }
    seconds = dict.fromkeys(runners, 0.0)
    outputs: dict[str, list[np.ndarray]] = {k: [] for k in runners}
    for run in runners.values():
        run(batches[0])  # warm-up
    for i in range(0, len(batches), TURN):
        for label, run in runners.items():
            started = time.perf_counter()
            outputs[label].extend(run(batch) for batch in batches[i:i + TURN])
            seconds[label] += time.perf_counter() - started

    first = next(iter(runners))
    ort_s, reference = seconds[first], np.concatenate(outputs[first])
    print()
    print("| runtime | seconds | texts/s | vs onnxruntime fp32 | cosine to onnxruntime fp32 mean / min |")
    print("|---|---|---|---|---|")
    for label in runners:
        cosine = cosine_rows(np.concatenate(outputs[label]), reference)
        print(f"| {label} | {seconds[label]:.2f} | {len(texts) / seconds[label]:.0f} | {ort_s / seconds[label]:.2f}x | "
              f"{cosine.mean():.5f} / {cosine.min():.5f} |")


if __name__ == "__main__":
    main()
