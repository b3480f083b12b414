"""`hfbatch verify OUT`: re-embed a sample of an output's rows with the model itself and report
how well the stored vectors agree.

For a result handed on, or read months later: the sidecar names the model, normalisation,
maximum length, prompt and the configuration that made the vectors. A local output is compared
with the model's reference, sentence-transformers on torch in fp32 (never the runtime or int8
recipe that made it: that would only check a configuration against itself), and held to the bar
of that configuration: the faithful bar (--tolerance, 0.999 by default) or, for an int8 output,
int8's (0.98). A remote output is re-embedded by the same server. Never through the cache, which
would only repeat the stored vectors. The texts come from the output when it kept the text
column, else from the recorded input file. A fingerprint that differs from the recorded one
(another model revision, another int8 recipe) is reported beside the figures.

First, before any model work, that the sidecar is this output's: for an output in a store, the
object there now is the one the sidecar was written for (its ETag, `provenance.output.object`);
for every output, the provenance the Parquet file carries in its own metadata is the sidecar's
(the same run: started, finished, input, rows). A pair that is not one (a job killed between its
data and its sidecar, or two jobs publishing one key) is refused in one line (InputError).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from ..backends import make_backend
from ..backends.fidelity import FAITHFUL, INT8
from ..backends.local import LocalBackend
from ..errors import InputError
from ..io.readers import open_reader
from ..io.sidecars import find_sidecar
from ..io.stores import RemotePath, location
from ..io.writers import METADATA_KEY
from ..options import OUTPUT_IDENTITY, EmbedOptions
from ..vectors import cosine_rows, l2_normalize, output_width, quantize, truncate_dims


def verify_output(output: Path, *, sample: int = 64, seed: int = 0, tolerance: float = 0.999) -> dict[str, Any]:
    from ..io.targets import parse_target

    if parse_target(output).is_table:  # (a table keeps its vector record, not a sidecar of one run)
        raise InputError(f"{output}: verify checks Parquet outputs; a Lance, Delta or Postgres table is not one yet. "
                         "`hfbatch search` embeds a query with the table's record and shows its nearest rows.")
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
    if isinstance(output, RemotePath):
        check_published_object(output, meta_path, prov)
    try:
        parquet = pq.ParquetFile(output.open(ranged=True) if isinstance(output, RemotePath) else output)
        table = parquet.read()
    except InputError:
        raise
    except Exception as exc:  # pyarrow raises several types for a missing or broken file
        raise InputError(f"{output}: cannot read it as Parquet ({exc}).") from None
    check_same_run(output, meta_path, prov, parquet.metadata.metadata or {})
    if prov.get("job") == "score":
        return verify_scores(output, table, prov, sample=sample, seed=seed)
    text_column = prov.get("text_column") or "text"
    texts = _texts(table, text_column, prov, output)
    vectors = table.column("embedding").to_pylist()
    candidates = [i for i, v in enumerate(vectors) if v is not None and isinstance(texts[i], str)]
    rows = sorted(random.Random(seed).sample(candidates, min(sample, len(candidates))))
    local = (prov.get("backends") or {}).get("local") or {}
    backend_name = prov.get("backend") or "local"
    int8 = str(local.get("vectors") or "").startswith("int8") or (local.get("quantize") or "none") != "none"
    recorded = recorded_identity(prov)
    # the identity the run recorded, rebuilt (nothing loads): has the model or a setting changed?
    made = make_backend(EmbedOptions(input=output, output=output, **recorded))
    fingerprint = made.fingerprint()
    # what the stored vectors are compared with: the model itself (torch fp32) for a local output
    reference = {**recorded, "runtime": "torch", "precision": "fp32", "quantize": "none"}
    options = EmbedOptions(input=output, output=output, **reference)
    backend = make_backend(options) if backend_name == "local" else made
    report: dict[str, Any] = {
        "output": str(output), "model_id": prov.get("model_id"), "backend": backend.name,
        "reference": "sentence-transformers, torch fp32" if backend_name == "local" else f"the {backend_name} server",
        "made_by": local.get("selection", {}).get("chosen") if isinstance(local.get("selection"), dict) else None,
        "bar": "int8" if int8 else "faithful",
        "rows_in_output": table.num_rows, "rows_checked": len(rows), "tolerance": tolerance,
        "recorded_fingerprint": prov.get("fingerprint"), "fingerprint_now": fingerprint,
        "same_fingerprint": fingerprint == prov.get("fingerprint"),
    }
    report.update(_int8_terms(made, local, tolerance) if int8 else {})
    if not rows:
        report.update(agree=0, cosine_mean=None, cosine_min=None, ok=True)
        return report
    if backend.kind != "dense":  # a sparse vector or a token matrix per row, compared as such
        cosine = kind_agreement(backend, [texts[i] for i in rows], [vectors[i] for i in rows], prov)
    else:
        fresh = _fresh(backend, [texts[i] for i in rows], prov.get("split"), options.normalize)
        stored = np.array([vectors[i] for i in rows], dtype=np.float32)
        cosine = _agreement(fresh, stored, prov.get("vectors") or {}, options.normalize)
    worst = int(np.argmin(cosine))
    bar = report["tolerance"]
    # every row at the tolerance, and the sample's mean at its configuration's bar (0.9999 faithful, 0.99 int8)
    # (float vectors only: int8/binary outputs are compared code by code, bit by bit)
    floats = ((prov.get("vectors") or {}).get("precision") or "float32") in ("float32", "float16")
    mean_bar = (INT8 if report["bar"] == "int8" else FAITHFUL).mean if backend_name == "local" and floats else 0.0
    report.update(agree=int((cosine >= bar).sum()), cosine_mean=round(float(cosine.mean()), 6),
                  cosine_min=round(float(cosine.min()), 6), worst_row=rows[worst] + 1, mean_bar=mean_bar,
                  ok=bool((cosine >= bar).all()) and float(cosine.mean()) >= mean_bar)
    return report


# How a sidecar records each option that identifies an output's vectors (options.OUTPUT_IDENTITY,
# the one list; the options key of a many-part job hashes the same names): read back, they rebuild
# the backend that made the vectors. The others are in _NOT_REBUILT with where verify takes them
# from instead, or why they do not change a row's vector; a test holds OUTPUT_IDENTITY to the two,
# so a new identity option is read back here (or placed) when it is added there.
_NOT_REBUILT = {
    "keep": "which columns pass through", "format": "how the input is read", "on_invalid": "which rows are embedded",
    "fallback": "the fallback of --backend auto: the backend that ran is recorded",
    "tokenizer": "counts tokens; the server makes the vectors",
    "prompt_name": "recorded as the prompt's text",
    "split": "provenance.split", "overlap": "provenance.split", "aggregate": "provenance.split",
    "truncate_dim": "provenance.vectors", "output_precision": "provenance.vectors",
    "calibration": "provenance.vectors.ranges", "calibration_size": "provenance.vectors.ranges",
    "sparse_top_k": "provenance.vectors.top_k (the cache and the model keep every dimension)",
    "sparse_vocab": "provenance.vectors.vocab (token strings beside the indices)",
}


def recorded_identity(prov: dict[str, Any]) -> dict[str, Any]:
    """The OUTPUT_IDENTITY options of the run that wrote `prov` (a sidecar's provenance), as far as
    they make its backend: the EmbedOptions keywords that rebuild it (see `_NOT_REBUILT`)."""
    local = (prov.get("backends") or {}).get("local") or {}
    remote = (prov.get("backends") or {}).get(prov.get("backend")) or {}
    backend_name = prov.get("backend") or "local"
    int8 = str(local.get("vectors") or "").startswith("int8") or (local.get("quantize") or "none") != "none"
    asked = local.get("requested") if isinstance(local.get("requested"), dict) else {}
    recorded = {
        "model": prov.get("model_id"), "backend": backend_name, "text_column": prov.get("text_column") or "text",
        "normalize": bool(prov.get("normalize", True)),
        "max_length": prov.get("max_length") if backend_name == "local" else None,
        "endpoint": remote.get("endpoint") if backend_name in ("tei", "openai") else None,
        "remote_pooling": "mean" if remote.get("pooling") == "mean" else None,  # ("server": the server's own)
        "prompt": prov.get("prompt") or "",  # the prompt the run used, as text ("": none, not a model default)
        # int8's identity is the runtime that ran it (recorded); a faithful one's is any faithful runtime
        "runtime": (local.get("runtime") if int8 else None) or asked.get("runtime") or "auto",
        "precision": asked.get("precision") or "auto",
        "quantize": "int8" if int8 else "none",
        "kind": (prov.get("vectors") or {}).get("kind") or "dense",  # what the model made (backends/kinds.py)
    }
    identity = {name: recorded[name] for name in OUTPUT_IDENTITY if name not in _NOT_REBUILT}
    if (prov.get("vectors") or {}).get("side") == "query":  # a sparse or multi-vector model's query side
        identity.update(prompt=None, prompt_name="query")
    if identity.get("kind") == "multivector":  # its lengths are its files' own (document_length, query_length)
        identity["max_length"] = None
    return identity


def check_published_object(output: RemotePath, meta_path: Any, prov: dict[str, Any]) -> None:
    """The object at `output` is the one its sidecar was written for (the ETag the store answered
    to that upload); a sidecar from before the record was kept is checked by check_same_run only."""
    recorded = (prov.get("output") or {}).get("object") if isinstance(prov.get("output"), dict) else None
    if not isinstance(recorded, dict) or not recorded.get("etag"):
        return
    now = output.stamp()
    if now is None:
        raise InputError(f"{output}: no such object, but its sidecar {meta_path} is there; the output was removed "
                         "or never published. Run the job again.")
    if now.get("etag") != recorded.get("etag"):
        raise InputError(f"{output}: the object there (ETag {now.get('etag')}) is not the one its sidecar {meta_path} "
                         f"was written for (ETag {recorded.get('etag')}); the pair is not one run's (a job stopped "
                         "between them, or two jobs wrote this output). Run the job again.")


_SAME_RUN = (("started",), ("finished",), ("input", "hash"), ("output", "rows"))


def check_same_run(output: Any, meta_path: Any, prov: dict[str, Any], schema_metadata: dict[bytes, bytes]) -> None:
    """The provenance the Parquet file carries (written with it, by the same commit) is the
    sidecar's: the same run's start and finish, input and row count."""
    raw = schema_metadata.get(METADATA_KEY.encode())
    if not raw:
        return  # not written by hfbatch's sink (nothing to compare)
    try:
        embedded = json.loads(raw).get("provenance") or {}
    except (ValueError, AttributeError):
        return
    for path in _SAME_RUN:
        mine, theirs = _dig(embedded, path), _dig(prov, path)
        if mine is not None and theirs is not None and mine != theirs:
            raise InputError(f"{output}: its sidecar {meta_path} is not this output's ({'.'.join(path)}: the file "
                             f"says {mine}, the sidecar {theirs}); the pair is not one run's. Run the job again.")


def _dig(document: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        document = document.get(key) if isinstance(document, dict) else None
    return document


def _int8_terms(made: Any, local: dict[str, Any], tolerance: float) -> dict[str, Any]:
    """What an int8 run changes about the comparison: it is held to the int8 bar (cosine >= 0.98
    to the model's own vectors, not 0.999), and a run made with an int8 recipe this version no
    longer makes says so."""
    from ..backends.fidelity import INT8

    recorded = local.get("quantize") or "none"
    terms: dict[str, Any] = {"quantize_recorded": recorded, "tolerance": min(tolerance, INT8.min)}
    identity = made.identity() if isinstance(made, LocalBackend) else None
    if identity is not None and recorded != "none" and recorded not in identity:
        terms["note"] = (f"the run used int8 recipe {recorded}, which this version no longer makes: "
                         "the fingerprint differs")
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


def kind_agreement(backend: Any, texts: list[str], stored: list[Any], prov: dict[str, Any]) -> np.ndarray:
    """Per row, the cosine of the stored value and the texts embedded again as the run did: a
    sparse vector's values over the union of both index sets (after the run's --sparse-top-k;
    another index set costs cosine), a token matrix's least per-token cosine (another token count: 0)."""
    from ..sparse_vectors import SparseVector, mean, top_k

    split = prov.get("split") or {}
    shape = prov.get("vectors") or {}
    if split.get("aggregate") == "mean":  # (a sparse model's only: multi-vector refuses --aggregate)
        cut = backend.split(texts, int(split["tokens"]), int(split["overlap"]))
        fresh = [mean(backend.embed([t[w.char_start:w.char_end] for w in ws.spans])) for t, ws in zip(texts, cut)]
    else:
        fresh = backend.embed(texts)
    out = np.zeros(len(texts))
    for i, (new, old) in enumerate(zip(fresh, stored)):
        if backend.kind == "sparse":
            new = top_k(new, shape.get("top_k"))
            old = SparseVector(np.asarray(old["indices"], np.int64), np.asarray(old["values"], np.float64))
            union = np.union1d(new.indices, old.indices)
            a, b = np.zeros(len(union)), np.zeros(len(union))
            a[np.searchsorted(union, new.indices)] = new.values
            b[np.searchsorted(union, old.indices)] = old.values
        else:
            b = np.asarray(old, dtype=np.float64)
            if b.shape != new.shape:
                continue  # another number of token vectors: no agreement
            a = np.asarray(new, dtype=np.float64)
            norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
            out[i] = float(((a * b).sum(1) / np.where(norms > 0, norms, 1.0)).min()) if len(a) else 1.0
            continue
        norm = np.linalg.norm(a) * np.linalg.norm(b)
        out[i] = float(a @ b / norm) if norm > 0 else float(np.array_equal(a, b))
    return out


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


def _texts(table: Any, column: str, prov: dict[str, Any], output: Path) -> list[Any]:
    """The text of every output row: from the output if it kept the column, else the input."""
    if column in table.column_names:
        return table.column(column).to_pylist()
    split = prov.get("split") or {}
    if split and split.get("aggregate") != "mean":
        raise InputError(f"{output}: a --split output is verified from the windows' own texts, and this one did not "
                         f"keep its {column!r} column; keep it (--keep) to verify.")
    source = location(prov.get("input", {}).get("path", ""))
    if isinstance(source, Path) and not source.is_absolute():  # as typed, or beside the output (--relative-paths)
        beside = output.parent / source
        source = beside if prov.get("relative_paths") or not source.is_file() else source
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


SCORE_TOLERANCE = 1e-4  # |fresh - stored| a re-scored pair may differ by (relative above 1): batching noise is ~1e-6


def verify_scores(output: Any, table: Any, prov: dict[str, Any], *, sample: int, seed: int) -> dict[str, Any]:
    """A score output's sampled rows scored again by the recorded cross-encoder (its aggregate and
    windows, as the run did): each within SCORE_TOLERANCE of the stored score."""
    from ..backends.scoring import Pair, make_scorer
    from ..options import ScoreOptions

    query_column, text_column = prov.get("query_column") or "query", prov.get("text_column") or "text"
    if "score" not in table.schema.names:
        raise InputError(f"{output}: has no column 'score', which its sidecar says the run wrote; the output was "
                         "changed after the run, or the sidecar is not its own.")
    rerank = prov.get("rerank") if isinstance(prov.get("rerank"), dict) else None

    def side(column: str) -> list[Any]:
        # a side --keep left out is read from the input, row for row, as embed's verify reads texts
        if column not in table.schema.names and rerank is not None:
            raise InputError(f"{output}: a --rerank output holds each query's best rows, not the input's rows in order, "
                             f"and this one did not keep its {column!r} column; keep it (--keep) to verify.")
        return _texts(table, column, prov, output)

    queries, texts = side(query_column), side(text_column)
    scores = table.column("score").to_pylist()
    candidates = [i for i, s in enumerate(scores) if s is not None and isinstance(queries[i], str)
                  and isinstance(texts[i], str)]
    rows = sorted(random.Random(seed).sample(candidates, min(sample, len(candidates))))
    name = prov.get("backend") or "local"
    remote = (prov.get("backends") or {}).get(name) or {}
    scorer = make_scorer(ScoreOptions(input=output, output=output, model=prov.get("model_id"), backend=name,
                                      endpoint=remote.get("endpoint"), query_column=query_column,
                                      text_column=text_column, aggregate=prov.get("aggregate"),
                                      overlap=prov.get("overlap")))
    report: dict[str, Any] = {
        "output": str(output), "job": "score", "model_id": prov.get("model_id"), "backend": name,
        "reference": "sentence-transformers' CrossEncoder, torch fp32" if name == "local" else f"the {name} server",
        "rows_in_output": table.num_rows, "rows_checked": len(rows), "tolerance": SCORE_TOLERANCE,
        "recorded_fingerprint": prov.get("fingerprint"), "fingerprint_now": scorer.fingerprint(),
        "same_fingerprint": scorer.fingerprint() == prov.get("fingerprint"), "bar": "scores",
    }
    if rerank is not None:  # the ranks as the run wrote them: each query's best K, 1..K by score
        report["rerank"] = rerank_problem(table, query_column, rerank, prov)
    if not rows:
        report.update(agree=0, max_abs_diff=None, ok=report.get("rerank") is None)
        return report
    pairs = [Pair(queries[i], texts[i]) for i in rows]
    fresh = np.array([s.score for s in scorer.score(pairs, scorer.pair_counts(pairs))], dtype=np.float64)
    stored = np.array([scores[i] for i in rows], dtype=np.float64)
    diff = np.abs(fresh - stored) / np.maximum(1.0, np.abs(stored))
    worst = int(np.argmax(diff))
    report.update(agree=int((diff <= SCORE_TOLERANCE).sum()), max_abs_diff=round(float(diff.max()), 8),
                  worst_row=rows[worst] + 1,
                  ok=bool((diff <= SCORE_TOLERANCE).all()) and report.get("rerank") is None)
    return report


def rerank_problem(table: Any, query_column: str, rerank: dict[str, Any], prov: dict[str, Any]) -> str | None:
    """What is wrong with a --rerank output's rows, or None: the row count the run recorded, and
    per query ranks 1..n (n <= K) in order, scores not rising with the rank."""
    recorded = (prov.get("output") or {}).get("rows") if isinstance(prov.get("output"), dict) else None
    if recorded is not None and recorded != table.num_rows:
        return f"the file has {table.num_rows} rows, the run wrote {recorded}"
    if "rank" not in table.schema.names:
        return "the file has no rank column"
    ranks: dict[Any, list[tuple[int, float]]] = {}
    for query, rank, score in zip(table.column(query_column).to_pylist(), table.column("rank").to_pylist(),
                                  table.column("score").to_pylist()):
        if rank is not None:
            ranks.setdefault(query, []).append((rank, score))
    k = int(rerank.get("k") or 0)
    for query, got in ranks.items():
        if [r for r, _ in got] != list(range(1, len(got) + 1)) or len(got) > k:
            return f"query {str(query)[:40]!r}: ranks {[r for r, _ in got][:12]} are not 1..{min(len(got), k)} in order"
        scores = [s for _, s in got]
        if any(later > earlier for earlier, later in zip(scores, scores[1:])):
            return f"query {str(query)[:40]!r}: a lower rank has a higher score"
    return None
