"""`hfbatch verify OUT`: re-embed a sample of an output's rows with what its sidecar recorded,
and report how well the stored vectors agree.

For a result handed on, or read months later: the sidecar names the model, backend, precision,
runtime, normalisation and maximum length; verify builds that backend again (never reading the
cache, which would only repeat the stored vectors), embeds a random sample of rows that have a
vector, and compares by cosine. The texts come from the output when it kept the text column,
else from the recorded input file. A fingerprint that differs from the recorded one (another
model revision, another int8 recipe) is reported beside the figures.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from ..backends import make_backend
from ..engines.parts import part_sidecar_path
from ..errors import HfbatchError, InputError
from ..io.readers import open_reader
from ..io.stores import RemotePath, location
from ..options import EmbedOptions, sidecar_path
from ..vectors import cosine_rows, l2_normalize, output_width, quantize, truncate_dims


class VerifyMismatch(HfbatchError):
    """The re-embedded sample does not agree with the stored vectors (exit 1)."""


def verify_output(output: Path, *, sample: int = 64, seed: int = 0, tolerance: float = 0.999) -> dict[str, Any]:
    output = location(output)
    meta_path = find_sidecar(output)
    try:
        document = json.loads(meta_path.read_text(encoding="utf-8"))
        prov = document["provenance"]
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"{meta_path}: cannot read the sidecar ({exc}); verify needs the <output>.meta.json "
                         "that hfbatch wrote beside the output (for a part of a many-part output: under "
                         "_hfbatch/ in its output directory).") from None
    if prov.get("job") == "generate":
        raise InputError(f"{output}: verify checks embedding outputs; this is a generate output.")
    try:
        table = pq.read_table(output.open(ranged=True) if isinstance(output, RemotePath) else output)
    except Exception as exc:  # pyarrow raises several types for a missing or broken file
        raise InputError(f"{output}: cannot read it as Parquet ({exc}).") from None
    text_column = prov.get("text_column") or "text"
    texts = _texts(table, text_column, prov, output)
    vectors = table.column("embedding").to_pylist()
    candidates = [i for i, v in enumerate(vectors) if v is not None and isinstance(texts[i], str)]
    rows = sorted(random.Random(seed).sample(candidates, min(sample, len(candidates))))
    local = (prov.get("backends") or {}).get("local") or {}
    remote = (prov.get("backends") or {}).get(prov.get("backend")) or {}
    options = EmbedOptions(
        input=output, output=output, model=prov.get("model_id"), backend=prov.get("backend") or "local",
        normalize=bool(prov.get("normalize", True)),
        max_length=prov.get("max_length") if (prov.get("backend") or "local") == "local" else None,
        precision=local.get("precision") or "fp32", runtime=local.get("runtime") or "torch",
        # the configuration the run settled on (never `auto` again: another choice would make other vectors)
        quantize="none" if (local.get("quantize") or "none") == "none" else "int8",
        endpoint=remote.get("endpoint") if prov.get("backend") in ("tei", "openai") else None,
        prompt=prov.get("prompt") or "",  # the prompt the run used, as text ("": none, not a model default)
    )
    backend = make_backend(options)
    fingerprint = backend.fingerprint()
    report: dict[str, Any] = {
        "output": str(output), "model_id": prov.get("model_id"), "backend": backend.name,
        "rows_in_output": table.num_rows, "rows_checked": len(rows), "tolerance": tolerance,
        "recorded_fingerprint": prov.get("fingerprint"), "fingerprint_now": fingerprint,
        "same_fingerprint": fingerprint == prov.get("fingerprint"),
    }
    report.update(_int8_terms(backend, local, tolerance))
    if not rows:
        report.update(agree=0, cosine_mean=None, cosine_min=None, ok=True)
        return report
    fresh = _fresh(backend, [texts[i] for i in rows], prov.get("split"), options.normalize)
    stored = np.array([vectors[i] for i in rows], dtype=np.float32)
    cosine = _agreement(fresh, stored, prov.get("vectors") or {}, options.normalize)
    worst = int(np.argmin(cosine))
    bar = report["tolerance"]
    report.update(agree=int((cosine >= bar).sum()), cosine_mean=round(float(cosine.mean()), 6),
                  cosine_min=round(float(cosine.min()), 6), worst_row=rows[worst] + 1,
                  ok=bool((cosine >= bar).all()))
    return report


def _int8_terms(backend: Any, local: dict[str, Any], tolerance: float) -> dict[str, Any]:
    """What an int8 run changes about the comparison: ONNX Runtime's dynamic int8 gives a whole
    batch one activation scale, so a text's vector depends on the texts it was batched with and
    cannot be remade exactly (rows agree at the int8 bar, cosine >= 0.98, not 0.999); and a run
    made with an int8 recipe this version no longer makes is compared with today's recipe."""
    recorded = local.get("quantize") or "none"
    if recorded == "none":
        return {}
    from ..backends.onnx import INT8_MIN_MIN

    terms: dict[str, Any] = {"quantize_recorded": recorded}
    side = getattr(backend, "primary", backend)
    now = side.quantize_recipe() if callable(getattr(side, "quantize_recipe", None)) else None
    if now is not None:
        terms["quantize_now"] = now
        if now != recorded:
            terms["note"] = (f"the run used int8 recipe {recorded}, which this version no longer makes (now {now}): "
                             "the figures compare two recipes")
    if local.get("runtime") == "onnx" and tolerance > INT8_MIN_MIN:
        terms["tolerance"] = INT8_MIN_MIN  # per-batch activation scales: see the docstring
    return terms


def _fresh(backend: Any, texts: list[str], split: dict[str, Any] | None, normalize: bool) -> np.ndarray:
    """The texts embedded again as the run did: whole, or (--aggregate mean) as the mean of their
    windows. A --split run's rows already hold each window's own text."""
    if not split or split.get("aggregate") != "mean":
        return backend.embed(texts)
    cut = backend.split(texts, int(split["tokens"]), int(split["overlap"]))
    out = []
    for text, windows in zip(texts, cut):
        mean = backend.embed([text[w.char_start:w.char_end] for w in windows.spans]).mean(axis=0)
        out.append(l2_normalize(mean) if normalize else mean)
    return np.stack(out).astype(np.float32)


def _agreement(fresh: np.ndarray, stored: np.ndarray, shape: dict[str, Any], normalize: bool) -> np.ndarray:
    """Per row, how far the stored vector agrees with the fresh one made into what the run wrote
    (--truncate-dim, --output-precision with its recorded ranges): cosine of the vectors, or of
    the int8/uint8 codes (centred), or for binary the share of equal bits."""
    fresh = truncate_dims(fresh, shape.get("truncate_dim"), normalize=normalize)
    precision = shape.get("precision") or "float32"
    if output_width(fresh.shape[1], precision) != stored.shape[1]:
        raise InputError(f"the output's vectors have {stored.shape[1]} values but its sidecar describes "
                         f"{output_width(fresh.shape[1], precision)} ({precision}, {fresh.shape[1]} dimensions); "
                         "the sidecar is not this output's.")
    if precision in ("float32", "float16"):
        return cosine_rows(fresh, stored)
    ranges = np.asarray(shape["ranges"], dtype=np.float32) if shape.get("ranges") else None
    codes = quantize(fresh, precision, ranges).astype(np.float32)
    if precision in ("binary", "ubinary"):
        bits = np.unpackbits(codes.astype(np.int16).astype(np.uint8), axis=1)
        return (bits == np.unpackbits(stored.astype(np.int16).astype(np.uint8), axis=1)).mean(axis=1)
    centre = 127.5 if precision == "uint8" else -0.5
    return cosine_rows(codes - centre, stored - centre)


def find_sidecar(output: Path) -> Path:
    """`output`'s sidecar: beside it, or for a part of a many-part output directory `out/`,
    `out/_hfbatch/<its path in out>.meta.json` (out: the nearest folder above it that has one)."""
    beside = sidecar_path(output)
    if beside.is_file():
        return beside
    full = output.absolute()
    return next((s for s in (part_sidecar_path(d, full) for d in full.parents) if s.is_file()), beside)


def _texts(table: Any, column: str, prov: dict[str, Any], output: Path) -> list[Any]:
    """The text of every output row: from the output if it kept the column, else the input."""
    if column in table.column_names:
        return table.column(column).to_pylist()
    split = prov.get("split") or {}
    if split and split.get("aggregate") != "mean":
        raise InputError(f"{output}: a --split output is verified from the windows' own texts, and this one did not "
                         f"keep its {column!r} column; keep it (--keep) to verify.")
    source = location(prov.get("input", {}).get("path", ""))
    if isinstance(source, Path) and not source.is_absolute():
        source = output.parent / source  # written with --relative-paths
    if prov.get("on_invalid") == "skip" or not source.is_file():
        raise InputError(f"{output}: the output has no {column!r} column and the input {source} cannot be matched "
                         "row for row; keep the text column (--keep) to verify.")
    reader = open_reader(source, columns=[column], text_column=column)
    texts: list[Any] = []
    for chunk in reader.chunks():
        texts += chunk.batch.column(column).to_pylist()
    if len(texts) != table.num_rows:
        raise InputError(f"{output}: the input {source} now has {len(texts)} rows, the output {table.num_rows}; "
                         "it changed since the run.")
    return texts
