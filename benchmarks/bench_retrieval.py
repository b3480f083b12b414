"""Retrieval with smaller vectors: recall@10 of hfbatch's --output-precision and --truncate-dim outputs.

The stdlib docstring set (benchmarks/retrieval.py: 1,000 summary -> body pairs, one right body
per query) is embedded through hfbatch with the bundled all-MiniLM-L6-v2 (384 dims) at each
configuration, documents and queries as two JSONL jobs, and scored as sentence-transformers'
quantization guidance does:

- float32 / float16: cosine;
- int8: dot product of the integer codes (as float);
- uint8: the codes minus the middle (128), then dot product. The uint8 codes are the int8 bucket
  indices + 128, so this scores exactly as int8 does (checked below);
- binary / ubinary: Hamming distance on the unpacked bits (np.unpackbits), lower is better.

Documents and queries must be quantised on one grid: the documents' int8/uint8 job takes its
ranges from its own first --calibration-size vectors, and the queries' job is given that run's
.meta.json as --calibration, so it reuses those ranges (what --calibration FILE.meta.json is for: codes
of both sides then stand for the same float values; a queries job left to calibrate on its own
vectors is shown as a contrast line, with a diagnosis of where the int8 gap comes from). One cache
directory serves every job: the first float32 jobs compute each text once, every later job (other
precisions, other dims) is read from the cache (the cache keeps full float vectors).

Prints a table: recall@10, its ratio to float32, bytes per vector as stored (values x itemsize),
compression vs float32, and the Parquet size of the documents' output; then hfbatch float32 vs raw
SentenceTransformer.encode (cosine per row, recall).

    python benchmarks/bench_retrieval.py [--pairs 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / ".work" / "retrieval"
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the bundled model; no network in benchmarks
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from retrieval import docstring_pairs, recall_at_10  # noqa: E402

FULL_DIM = 384
FLOAT32_BYTES = FULL_DIM * 4
# (label, output precision, truncate dim)
CONFIGS = [
    ("float32", "float32", None),
    ("float16", "float16", None),
    ("int8", "int8", None),
    ("uint8", "uint8", None),
    ("binary", "binary", None),
    ("ubinary", "ubinary", None),
    ("float32 @256", "float32", 256),
    ("float32 @128", "float32", 128),
    ("int8 @256", "int8", 256),
    ("int8 @128", "int8", 128),
    ("binary @256", "binary", 256),
    ("binary @128", "binary", 128),
]
WATCHED_FLAGS = ("avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile")


def cpu_header() -> str:
    """CPU model (as lscpu's "Model name") and whether the flags that matter for inference are present."""
    model, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    model = model or platform.processor() or platform.machine()
    marks = ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in WATCHED_FLAGS)
    return f"cpu: {model}, {os.cpu_count()} cores; flags: {marks}"


def write_jsonl(path: Path, texts: list[str]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for i, text in enumerate(texts):
            handle.write(json.dumps({"id": i, "text": text}) + "\n")


def read_codes(path: Path) -> np.ndarray:
    """The `embedding` column as stored (float32/float16/int8/uint8), rows in input order."""
    table = pq.read_table(path, columns=["id", "embedding"])
    column = table.column("embedding").combine_chunks()
    values = column.values.to_numpy(zero_copy_only=False)
    codes = values.reshape(len(column), column.type.list_size)
    return codes[np.argsort(table.column("id").to_numpy())]


def run_job(src: Path, out: Path, cache: Path, precision: str, dim: int | None,
            calibration: Path | None = None) -> dict:
    from hfbatch import EmbedOptions, embed

    started = time.perf_counter()
    result = embed(EmbedOptions(input=src, output=out, keep=["id"], cache_dir=cache, truncate_dim=dim,
                                output_precision=precision, calibration=calibration))
    meta = json.loads(Path(f"{out}.meta.json").read_text(encoding="utf-8"))
    vectors = meta["provenance"]["vectors"]
    calib = vectors.get("calibration") or {}
    return {
        "codes": read_codes(out),
        "seconds": time.perf_counter() - started,
        # vectors a job computed: its own, plus those its int8/uint8 calibration sample computed
        # (the sample runs first, so the job's own pass then finds them in the cache)
        "computed": result.metrics["texts_computed"] + (calib.get("texts_computed") or 0),
        "hits": result.metrics["cache"]["hits"],
        "ranges": vectors.get("ranges"),
        "calibration": calib,
        "sidecar": Path(f"{out}.meta.json"),
        "file_bytes": out.stat().st_size,
    }


def recall_from_scores(scores: np.ndarray, higher_is_better: bool = True) -> tuple[float, float]:
    """recall@10 from a (queries x documents) score matrix whose diagonal is the right pair.

    First: documents strictly better than the right one push it down (recall_at_10's rule, ties
    in its favour); second: ties counted against it (matters for integer Hamming distances)."""
    own = np.diag(scores)[:, None]
    better = scores > own if higher_is_better else scores < own
    tied = (scores == own).sum(1) - 1  # minus the right document itself
    strict = better.sum(1)
    return float((strict < 10).mean()), float((strict + tied < 10).mean())


def bits(codes: np.ndarray) -> np.ndarray:
    """Unpacked sign bits of binary (int8, packed - 128) or ubinary (uint8, packed) codes, as 0/1 float32."""
    packed = codes.astype(np.uint8) if codes.dtype == np.uint8 else (codes.astype(np.int16) + 128).astype(np.uint8)
    return np.unpackbits(packed, axis=-1).astype(np.float32)


def score(precision: str, queries: np.ndarray, documents: np.ndarray) -> tuple[float, float]:
    if precision in ("float32", "float16"):
        q, d = queries.astype(np.float32), documents.astype(np.float32)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        return recall_from_scores(q @ d.T)
    if precision in ("int8", "uint8"):
        shift = 128.0 if precision == "uint8" else 0.0  # uint8: subtract the middle -> the int8 codes
        q, d = queries.astype(np.float32) - shift, documents.astype(np.float32) - shift
        return recall_from_scores(q @ d.T)  # integer products < 2**24: exact in float32
    q, d = bits(queries), bits(documents)
    hamming = q.sum(1)[:, None] + d.sum(1)[None, :] - 2.0 * (q @ d.T)
    return recall_from_scores(hamming, higher_is_better=False)


def raw_encode(queries: list[str], documents: list[str]) -> tuple[np.ndarray, np.ndarray, float]:
    from sentence_transformers import SentenceTransformer

    from hfbatch.backends.local import _bundled_model_dir

    model = SentenceTransformer(str(_bundled_model_dir()), device="cpu")
    started = time.perf_counter()
    q = model.encode(queries, batch_size=32, convert_to_numpy=True)
    d = model.encode(documents, batch_size=32, convert_to_numpy=True)
    return q, d, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=1000)
    args = parser.parse_args()
    import torch

    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    cache = WORK / "cache"  # one cache for every job: each text is computed once
    queries, documents = docstring_pairs(args.pairs)
    q_src, d_src = WORK / "queries.jsonl", WORK / "documents.jsonl"
    write_jsonl(q_src, queries)
    write_jsonl(d_src, documents)
    print(cpu_header())
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; model all-MiniLM-L6-v2 (bundled, {FULL_DIM} dims); "
          f"{len(queries)} stdlib docstring pairs (query mean {np.mean([len(t) for t in queries]):.0f} chars, "
          f"document mean {np.mean([len(t) for t in documents]):.0f} chars)")

    rows, runs = [], []
    for label, precision, dim in CONFIGS:
        tag = label.replace(" @", "-")
        docs = run_job(d_src, WORK / f"documents-{tag}.parquet", cache, precision, dim)
        # the queries' int8/uint8 job reuses the documents' ranges through their sidecar
        calibration = docs["sidecar"] if precision in ("int8", "uint8") else None
        qs = run_job(q_src, WORK / f"queries-{tag}.parquet", cache, precision, dim, calibration)
        if calibration is not None and qs["ranges"] != docs["ranges"]:
            print(f"CHECK FAILED: {label}: the queries' ranges differ from the documents' ranges")
        runs.append((label, docs, qs))
        recall, recall_ties = score(precision, qs["codes"], docs["codes"])
        nbytes = docs["codes"].shape[1] * docs["codes"].dtype.itemsize
        rows.append({"label": label, "precision": precision, "dim": dim or FULL_DIM, "recall": recall,
                     "recall_ties": recall_ties, "bytes": nbytes, "file": docs["file_bytes"], "docs": docs, "queries": qs})

    # contrast: int8 queries calibrated on their own vectors instead of the documents' ranges
    selfcal = run_job(q_src, WORK / "queries-int8-selfcal.parquet", cache, "int8", None)
    int8 = next(r for r in rows if r["label"] == "int8")
    selfcal_recall, _ = score("int8", selfcal["codes"], int8["docs"]["codes"])

    base = rows[0]["recall"]
    print()
    print(f"{'config':<14} {'recall@10':>9} {'ties against':>12} {'vs float32':>10} {'bytes/vector':>12} "
          f"{'compression':>11} {'docs parquet':>12}")
    for r in rows:
        print(f"{r['label']:<14} {r['recall']:>9.3f} {r['recall_ties']:>12.3f} {r['recall'] / base:>9.3f}x "
              f"{r['bytes']:>12d} {FLOAT32_BYTES / r['bytes']:>10.1f}x {r['file'] / 1024:>9.1f} KiB")
    print(f"contrast, int8 queries on their own ranges (not the documents' grid): recall@10 {selfcal_recall:.3f} "
          f"({selfcal_recall / base:.3f}x float32) vs {int8['recall']:.3f} with the documents' ranges")
    # where the int8 gap comes from: rounding, or the dot product of codes centred on the ranges' middles
    ranges = np.asarray(int8["docs"]["ranges"], dtype=np.float32)
    steps = (ranges[1] - ranges[0]) / 255
    dequant = [(c.astype(np.float32) + 128.5) * steps + ranges[0] for c in (int8["queries"]["codes"], int8["docs"]["codes"])]
    middle = (ranges[0] + ranges[1]) / 2
    f_q, f_d = rows[0]["queries"]["codes"], rows[0]["docs"]["codes"]
    print(f"int8 diagnosis: codes dequantised with the ranges, cosine: recall@10 {score('float32', *dequant)[0]:.3f}; "
          f"float32 vectors minus the ranges' middles, dot product (no rounding): "
          f"{recall_from_scores((f_q - middle) @ (f_d - middle).T)[0]:.3f}")
    print("scoring: float32/float16 cosine; int8 dot product of the codes; uint8 codes - 128, dot product; "
          "binary/ubinary Hamming distance on the unpacked bits (lower is better). 'ties against': documents "
          "tied with the right one ranked above it. Documents' Parquet holds id, embedding, n_tokens, truncated, "
          "embedding_error.")

    # cache: the first jobs compute, every later one reads
    first_label, first_docs, first_queries = runs[0]
    later = sum(d["computed"] + q["computed"] for _, d, q in runs[1:]) + selfcal["computed"]
    print(f"texts computed: first run ({first_label}) documents {first_docs['computed']}, queries {first_queries['computed']}; "
          f"the {2 * len(runs) - 1} later jobs together {later} (cache hits per later documents job: "
          f"{runs[1][1]['hits']}); seconds: first two jobs {first_docs['seconds'] + first_queries['seconds']:.1f}, "
          f"later jobs {sum(d['seconds'] + q['seconds'] for _, d, q in runs[1:]) + selfcal['seconds']:.1f}")
    print(f"calibration: documents' int8 ranges from the job's own first {int8['docs']['calibration'].get('vectors')} vectors; "
          f"queries' int8 job: --calibration {int8['queries']['calibration'].get('source', '?').rsplit('/', 1)[-1]} "
          f"(ranges identical: {int8['queries']['ranges'] == int8['docs']['ranges']})")

    # consistency checks (printed, never raised)
    uint8 = next(r for r in rows if r["label"] == "uint8")
    same_grid = np.array_equal(uint8["docs"]["codes"].astype(np.int16) - 128, int8["docs"]["codes"].astype(np.int16))
    binary = next(r for r in rows if r["label"] == "binary")
    ubinary = next(r for r in rows if r["label"] == "ubinary")
    same_bits = np.array_equal(bits(binary["docs"]["codes"]), bits(ubinary["docs"]["codes"]))
    print(f"check: uint8 codes - 128 == int8 codes: {'ok' if same_grid else 'MISMATCH'}; "
          f"binary and ubinary unpack to the same bits: {'ok' if same_bits else 'MISMATCH'}")

    raw_q, raw_d, raw_s = raw_encode(queries, documents)
    got_q, got_d = rows[0]["queries"]["codes"], rows[0]["docs"]["codes"]
    cosine = np.concatenate([
        (got_q * raw_q).sum(1) / (np.linalg.norm(got_q, axis=1) * np.linalg.norm(raw_q, axis=1)),
        (got_d * raw_d).sum(1) / (np.linalg.norm(got_d, axis=1) * np.linalg.norm(raw_d, axis=1)),
    ])
    raw_recall = recall_at_10(raw_q, raw_d)
    ok = cosine.min() >= 0.9999
    print(f"check: hfbatch float32 vs raw SentenceTransformer.encode ({len(cosine)} vectors, encode {raw_s:.1f} s): "
          f"cosine mean {cosine.mean():.6f} min {cosine.min():.6f} (>= 0.9999: {'ok' if ok else 'FAILED'}); "
          f"recall@10 hfbatch {base:.3f} / raw {raw_recall:.3f} = {base / raw_recall:.3f}x")


if __name__ == "__main__":
    main()
