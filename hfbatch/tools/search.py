"""`hfbatch search TARGET "query"`: the k rows of an embed output or a synced table nearest to a
query, the query embedded as the rows were.

TARGET is what `hfbatch embed -o` wrote: a Parquet file, a directory of Parquet parts (a
many-part output; the parts are read as one dataset, their provenance must agree), a Lance
dataset (`*.lance`) or a Delta table (a folder with `_delta_log`, or `delta://PATH`). Its vector
record (io/targets.vector_record: the table's own, or taken from the Parquet provenance) says how
the rows were made: the model, normalisation, maximum length, prompt, --truncate-dim and
--output-precision with its ranges. The query is embedded by the same model, the identity
rebuilt as verify rebuilds it (tools/verify.recorded_identity), on the model's reference
(sentence-transformers on torch, fp32) for faithful rows (every faithful runtime is one vector
space) or on the recorded int8 recipe for int8 rows; then truncated (renormalised) as they were.

The query's prompt: where the rows were embedded with a document prompt (named "document",
"passage", "corpus"... or its text equal to such a prompt of the model's
config_sentence_transformers.json) and the model has the matching query prompt, the query takes
it (asymmetric retrieval, as the model was trained); otherwise the rows' own prompt (symmetric).
--prompt / --prompt-name choose another. The report says which.

Scores, in the rows' stored precision:
- float32 / float16 (Delta: float16 stored as float): cosine similarity;
- int8 / uint8: cosine with the rows dequantised to their buckets' centres by the recorded ranges
  (the query stays float: closer to the rows' true vectors than a quantised query);
- binary / ubinary: the bits unpacked to +-1, dot with the query's signs, over the dimension
  (1 - 2 * hamming / dim: a cosine of sign vectors).

Exact search, streamed: every row is scored batch by batch and only the k best so far are kept
(np.argpartition), with their columns, so memory is one batch and k rows whatever the target's
size. Equal scores rank by row order. Rows without a vector (embedding_error) are skipped.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from ..backends import make_backend
from ..errors import HfbatchError, InputError
from ..io.columns import EMBED_COLUMNS
from ..io.sidecars import sidecar_path
from ..io.stores import RemotePath
from ..io.targets import HASH_COLUMN, TargetSpec, open_target, parse_target, vector_record
from ..options import EmbedOptions
from ..vectors import CALIBRATED, output_width, truncate_dims
from .verify import recorded_identity

VECTOR_COLUMN = "embedding"
HIDDEN_COLUMNS = (*EMBED_COLUMNS, HASH_COLUMN)  # never shown as a hit's columns
BATCH_ROWS = 8192  # rows scored at once (a table's batch is cut to this)
_EPS = 1e-12

# a prompt name the rows may have been embedded with -> the query prompt of the same model that
# goes with it (a model ships both: e5's query/passage, nomic's search_query/search_document...)
DOCUMENT_PROMPTS = {
    "document": "query", "documents": "query", "doc": "query", "passage": "query", "passages": "query",
    "corpus": "query", "search_document": "search_query", "retrieval.passage": "retrieval.query",
    "retrieval_document": "retrieval_query",
}


def search(target: str | Path | RemotePath, query: str, *, k: int = 10, prompt: str | None = None,
           prompt_name: str | None = None, exact: bool = False) -> dict[str, Any]:
    """The k rows of `target` nearest to `query`: {"target", "kind", "model_id", "prompt",
    "prompt_name", "prompt_from", "precision", "metric", "k", "rows_searched", "rows_skipped",
    "hits": [{"rank", "score", <id column>, <kept columns>...}]}. InputError (exit 2) for a
    target that is not an hfbatch output or table, k < 1, an empty query, or --prompt with
    --prompt-name."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InputError(f"-k must be a whole number of hits, 1 or more (got {k}).")
    if not isinstance(query, str) or not query.strip():
        raise InputError("the query is empty; give the text to search for.")
    if prompt is not None and prompt_name is not None:
        raise InputError("give --prompt TEXT or --prompt-name NAME, not both.")
    source = open_source(target)
    record = source.record
    if not record.get("model_id"):
        raise InputError(f"{source.given}: its hfbatch record names no model; it cannot be searched.")
    sparse, multi = record.get("kind") == "sparse", record.get("kind") == "multivector"
    if sparse or multi:  # the model's query side (its Router's, its "query" prompt), as serving embeds queries
        chosen = {"prompt": prompt, "name": prompt_name or (None if prompt is not None else "query"),
                  "source": "--prompt" if prompt is not None else "--prompt-name" if prompt_name is not None
                  else "the model's query side"}
        vector, note = embed_kind_query(source, query, prompt=prompt, prompt_name=prompt_name)
    else:
        chosen = query_prompt(record, prompt=prompt, prompt_name=prompt_name)
        vector, note = embed_query(source, query, chosen["prompt"])
    precision = record.get("precision") or "float32"
    by_lance = source.kind == "lance" and precision in ("float32", "float16") and not exact and not (sparse or multi)
    by_postgres = source.kind == "postgres" and not exact
    if sparse or multi:  # an exact scan: dot product of sparse vectors, or MaxSim of token vectors
        rate = sparse_rater(vector, source.given) if sparse else maxsim_rater(vector, source.given)
        hits, searched, skipped = nearest(source.batches(), vector, k, record, id_column=source.id_column,
                                          where=source.given, rate=rate)
    elif by_lance:  # Lance's own search: flat (exact) without an index, its index (--index) with one
        hits, searched, skipped = lance_nearest(source, vector, k)
    elif by_postgres:  # pgvector's <=>: exact without an index, its HNSW/IVFFlat (--index) searched wide
        hits, searched, skipped = postgres_nearest(source, vector, k)
    else:
        hits, searched, skipped = nearest(source.batches(), vector, k, record, id_column=source.id_column,
                                          where=source.given)
    report: dict[str, Any] = {
        "target": source.given, "kind": source.kind, "model_id": record.get("model_id"),
        "prompt": chosen["prompt"], "prompt_name": chosen["name"], "prompt_from": chosen["source"],
        "rows_prompt": record.get("prompt"), "precision": precision,
        "metric": "dot product (sparse)" if sparse else "MaxSim (late interaction)" if multi
        else "hamming (sign agreement)" if precision in ("binary", "ubinary") else "cosine",
        "id_column": source.id_column, "k": k, "rows_searched": searched, "rows_skipped": skipped, "hits": hits,
        "strategy": "lance" if by_lance else "postgres <=>" if by_postgres else "exact scan",
    }
    if note:
        report["note"] = note
    return report


# --- what the target is and how its rows were made ----------------------------------------------------

class Source:
    """A target to search: its vector record and its rows, streamed (every column)."""

    def __init__(self, given: str, kind: str, record: dict[str, Any], provenance: dict[str, Any] | None,
                 batches: Any, target: Any = None):
        self.given, self.kind, self.record, self.provenance = given, kind, record, provenance
        self.batches = batches  # () -> iterator of RecordBatches
        self.target = target  # a table target's Target (None: Parquet)
        self.id_column = record.get("id_column") or ((provenance or {}).get("output") or {}).get("table", {}).get("id_column")


def open_source(target: str | Path | RemotePath) -> Source:
    given = target.url if isinstance(target, RemotePath) else str(target)
    if not given.strip():
        raise InputError("no target given: name an hfbatch output (.parquet, a directory of parts, .lance or a Delta table).")
    try:
        spec = parse_target(target)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - a malformed URL
        raise InputError(f"{given}: not a target hfbatch can read ({exc}).") from None
    if spec.is_table:
        return _table_source(spec)
    return _parquet_source(spec)


def _table_source(spec: TargetSpec) -> Source:
    target = open_target(spec)
    if not target.exists():
        what = {"lance": "Lance dataset", "delta": "Delta table"}.get(spec.kind, "table")
        raise InputError(f"{spec.given}: no such {what}; give the -o of an hfbatch embed --id-column run.")
    try:
        record = target.record()
    except InputError as exc:  # its words are for embed's -o; say them for search
        said = str(exc).replace("; give another -o, or --rebuild to replace it", "").replace("; give another -o", "")
        raise InputError(f"{said.removeprefix('-o ').rstrip('.')}; search reads a table hfbatch embed --id-column "
                         "wrote.") from None
    if record is None:
        raise InputError(f"{spec.given}: an empty {spec.kind} target; nothing to search.")
    return Source(spec.given, spec.kind, record, _table_provenance(spec, record), lambda: target.batches(None), target)


def _table_provenance(spec: TargetSpec, record: Mapping[str, Any]) -> dict[str, Any] | None:
    """The last run's provenance (the sidecar beside the table) when it is of the table's vector
    space (the same fingerprint): what the record does not keep (an int8 run's runtime)."""
    if spec.kind == "postgres" or isinstance(spec.location, RemotePath):
        return None
    beside = sidecar_path(Path(str(spec.location).rstrip("/")))
    try:
        prov = json.loads(beside.read_text(encoding="utf-8")).get("provenance")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(prov, dict) and prov.get("fingerprint") == record.get("fingerprint"):
        return prov
    return None


def _parquet_source(spec: TargetSpec) -> Source:
    where, given = spec.location, spec.given
    if isinstance(where, RemotePath):
        if not where.exists():
            raise InputError(f"{given}: no such object.")
        return _parquet_file(given, lambda: pq.ParquetFile(where.open(ranged=True)))  # type: ignore[union-attr]
    if where.is_dir():
        return _parquet_parts(given, where)
    if not where.exists():
        raise InputError(f"{given}: no such file or directory; give an hfbatch output (.parquet, a directory of "
                         "parts, .lance or a Delta table).")
    if not where.is_file():
        raise InputError(f"{given}: not a regular file (a device, pipe or socket); give an hfbatch output.")
    return _parquet_file(given, lambda: pq.ParquetFile(where))


def _provenance_of(given: str, opened: pq.ParquetFile) -> dict[str, Any]:
    from ..io.writers import METADATA_KEY

    raw = (opened.metadata.metadata or {}).get(METADATA_KEY.encode())
    if not raw:
        raise InputError(f"{given}: a Parquet file that hfbatch did not write (no hfbatch provenance in its metadata); "
                         "search needs the output of hfbatch embed.")
    try:
        prov = json.loads(raw).get("provenance")
    except (ValueError, AttributeError):
        prov = None
    if not isinstance(prov, dict):
        raise InputError(f"{given}: its hfbatch metadata is damaged (not a provenance); embed it again.")
    if prov.get("job") == "generate":
        raise InputError(f"{given}: a generate output has no vectors to search.")
    return prov


def _open_parquet(given: str, opener: Any) -> pq.ParquetFile:
    try:
        return opener()
    except HfbatchError:
        raise
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a broken file
        raise InputError(f"{given}: cannot read it as Parquet ({' '.join(str(exc).split())[:200]}).") from None


def _parquet_file(given: str, opener: Any) -> Source:
    opened = _open_parquet(given, opener)
    prov = _provenance_of(given, opened)

    def batches() -> Iterator[pa.RecordBatch]:
        return _open_parquet(given, opener).iter_batches(batch_size=BATCH_ROWS)

    return Source(given, "parquet", vector_record(prov), prov, batches)


def _parquet_parts(given: str, root: Path) -> Source:
    """A many-part output: every `*.parquet` under `root` but `_`/`.` names, in path order, one
    dataset; each part's provenance must be of one vector space (its first part's)."""
    parts = sorted(p for p in root.rglob("*.parquet")
                   if p.is_file() and not any(s.startswith(("_", ".")) for s in p.relative_to(root).parts))
    if not parts:
        raise InputError(f"{given}: a directory with no Parquet parts (and no _delta_log); give an hfbatch output.")
    first = _provenance_of(str(parts[0]), _open_parquet(str(parts[0]), lambda: pq.ParquetFile(parts[0])))
    record = vector_record(first)
    for part in parts[1:]:
        other = vector_record(_provenance_of(str(part), _open_parquet(str(part), lambda p=part: pq.ParquetFile(p))))
        differ = [name for name in ("fingerprint", "model_id", "prompt", "normalize", "truncate_dim", "precision",
                                    "ranges") if other.get(name) != record.get(name)]
        if differ:
            raise InputError(f"{given}: its parts are not of one vector space ({part.relative_to(root)} differs from "
                             f"{parts[0].relative_to(root)} in {', '.join(differ)}); search them one by one.")
    try:
        dataset = pads.dataset([str(p) for p in parts], format="parquet")
    except Exception as exc:  # noqa: BLE001 - parts whose schemas cannot be one dataset
        raise InputError(f"{given}: its parts cannot be read as one dataset ({' '.join(str(exc).split())[:200]}).") from None

    def batches() -> Iterator[pa.RecordBatch]:
        return dataset.to_batches(batch_size=BATCH_ROWS)

    return Source(given, "parquet", record, first, batches)


# --- the query ----------------------------------------------------------------------------------

def _model_prompts(model_id: str) -> dict[str, Any]:
    """The model's config_sentence_transformers.json ({} where its files are not at hand: a
    remote model whose files were never fetched)."""
    try:
        from ..backends.spec import ModelFiles, prompt_config

        files = ModelFiles(model_id)
        return prompt_config(files.dir / "config_sentence_transformers.json")
    except Exception:  # noqa: BLE001 - no local files: the query takes the rows' prompt
        return {}


def query_prompt(record: Mapping[str, Any], *, prompt: str | None = None,
                 prompt_name: str | None = None) -> dict[str, Any]:
    """{"prompt" (text or None), "name", "source"}: what is put before the query (module docstring)."""
    from ..backends.spec import resolve_prompt

    model_id = str(record.get("model_id"))
    if prompt is not None:
        return {"prompt": prompt or None, "name": None, "source": "--prompt"}
    # a remote model's prompts are read only when asked for by name (its files may not be here)
    local = (record.get("backend") or "local") == "local"
    config = _model_prompts(model_id) if local or prompt_name is not None else {}
    prompts = {n: t for n, t in (config.get("prompts") or {}).items()}
    if prompt_name is not None:
        text, _ = resolve_prompt(model_id, config, None, prompt_name)
        return {"prompt": text, "name": prompt_name, "source": "--prompt-name"}
    rows_prompt = record.get("prompt") or None
    rows_name = record.get("prompt_name")
    if rows_name is None and rows_prompt:
        rows_name = next((n for n, t in prompts.items() if t and t == rows_prompt and n in DOCUMENT_PROMPTS), None)
    if rows_prompt and rows_name in DOCUMENT_PROMPTS:
        for name in dict.fromkeys((DOCUMENT_PROMPTS[rows_name], "query")):
            if name in prompts:
                return {"prompt": prompts[name] or None, "name": name,
                        "source": f"the model's {name!r} prompt (the rows were embedded with its {rows_name!r} prompt)"}
    return {"prompt": rows_prompt, "name": rows_name if rows_prompt else None,
            "source": "the rows' prompt" if rows_prompt else "as the rows"}


def _identity(source: Source) -> dict[str, Any]:
    """The EmbedOptions keywords that make the rows' vectors (tools/verify.recorded_identity), from
    the run's provenance or, for a table whose last run's sidecar is not at hand, its record."""
    record = source.record
    prov = source.provenance
    if prov is None:
        backend = record.get("backend") or "local"
        prov = {"model_id": record.get("model_id"), "backend": backend, "normalize": record.get("normalize", True),
                "max_length": record.get("max_length"), "prompt": record.get("prompt"),
                "text_column": record.get("text_column"),
                "backends": {backend: {"endpoint": record.get("endpoint")}} if backend != "local" else {}}
    identity = recorded_identity(prov)
    if identity.get("backend", "local") == "local" and identity.get("quantize") != "int8":
        # faithful rows: every faithful runtime is one vector space; the model's reference embeds the query
        identity.update(runtime="torch", precision="fp32", quantize="none")
    return identity


def embed_query(source: Source, query: str, prompt: str | None) -> tuple[np.ndarray, str | None]:
    """The query's vector as the rows' were made (truncated, renormalised), and a note when the
    model or its settings changed since the rows were embedded (their fingerprint differs)."""
    record = source.record
    identity = _identity(source)
    where = Path(".")
    made = make_backend(EmbedOptions(input=where, output=where, **identity))
    note = None
    if record.get("fingerprint") and made.fingerprint() != record.get("fingerprint"):
        note = ("the model or its settings changed since the rows were embedded (fingerprint differs): "
                "scores may not be comparable")
    backend = make_backend(EmbedOptions(input=where, output=where, **{**identity, "prompt": prompt or ""}))
    vector = np.asarray(backend.embed([query]), dtype=np.float32)
    normalize = bool(record.get("normalize", True))
    vector = truncate_dims(vector, record.get("truncate_dim"), normalize=normalize)
    return vector[0], note


def embed_kind_query(source: Source, query: str, *, prompt: str | None,
                     prompt_name: str | None) -> tuple[np.ndarray, str | None]:
    """A sparse or multi-vector target's query: the model's query side (encode_query), unless
    --prompt / --prompt-name say otherwise; a sparse vector as a dense array over the vocabulary, a
    multi-vector query as its (tokens, dim) matrix. A note when the model changed since the rows."""
    from ..backends.encoders import MultiVectorBackend, SparseBackend

    record = source.record
    sparse = record.get("kind") == "sparse"
    cls = SparseBackend if sparse else MultiVectorBackend
    length = {"max_length": record.get("max_length")} if sparse else {}
    backend = cls(str(record.get("model_id")), prompt=prompt, prompt_name=prompt_name,
                  side=None if prompt is not None or prompt_name is not None else "query", **length)
    made = backend.embed([query])[0]
    if sparse:
        dense = np.zeros(max(backend.dimension(), int(made.indices.max()) + 1 if made.nnz else 0), dtype=np.float32)
        dense[made.indices] = made.values
    else:
        dense = np.asarray(made, dtype=np.float32)
    # the rows' own backend (their side and prompt), for their fingerprint
    rows_side = "query" if record.get("prompt_name") == "query" else None
    rows = cls(str(record.get("model_id")), side=rows_side, **length)
    note = None
    if record.get("fingerprint") and rows.fingerprint() != record.get("fingerprint"):
        note = ("the model or its settings changed since the rows were embedded (fingerprint differs): "
                "scores may not be comparable")
    return dense, note


def sparse_rater(query: np.ndarray, where: str) -> Any:
    """Scores a batch's sparse column by its dot product with `query` (a dense array over the
    vocabulary): (scores, positions of the rows that have a vector)."""
    def rate(column: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        from ..sparse_vectors import is_sparse_type

        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        if not is_sparse_type(column.type):
            raise InputError(f"{where}: its {VECTOR_COLUMN!r} column is {column.type}, not sparse vectors.")
        positions = np.flatnonzero(column.is_valid().to_numpy(zero_copy_only=False))
        present = column.take(pa.array(positions, pa.int64()))
        indices, values = present.field("indices"), present.field("values")
        offsets = indices.offsets.to_numpy()
        flat_i = indices.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
        flat_v = values.flatten().to_numpy(zero_copy_only=False).astype(np.float64)
        inside = flat_i < len(query)
        products = np.where(inside, query[np.minimum(flat_i, len(query) - 1)] * flat_v, 0.0)
        sums = np.concatenate([[0.0], np.cumsum(products)])
        scores = sums[offsets[1:] - offsets[0]] - sums[offsets[:-1] - offsets[0]]
        return scores, positions

    return rate


def maxsim_rater(query: np.ndarray, where: str) -> Any:
    """Scores a batch's multi-vector column by MaxSim with the query's token matrix: for each query
    token its best dot product among the row's tokens, summed (as MultiVectorEncoder.similarity)."""
    def rate(column: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        from ..token_vectors import is_multivector_type

        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        if not is_multivector_type(column.type) or column.type.value_type.list_size != query.shape[1]:
            raise InputError(f"{where}: its {VECTOR_COLUMN!r} column is {column.type}, not token vectors of the "
                             f"query's {query.shape[1]} dimensions.")
        positions = np.flatnonzero(column.is_valid().to_numpy(zero_copy_only=False))
        present = column.take(pa.array(positions, pa.int64()))
        offsets = present.offsets.to_numpy()
        starts, ends = offsets[:-1] - offsets[0], offsets[1:] - offsets[0]
        flat = present.flatten().flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, query.shape[1])
        sims = flat @ query.T  # (tokens of every row, query tokens)
        scores = np.zeros(len(positions))
        full = ends > starts
        if full.any():
            best = np.maximum.reduceat(sims, starts[full], axis=0) if len(sims) else np.zeros((0, len(query)))
            scores[full] = best.sum(axis=1)
        return scores, positions

    return rate


# --- scoring ------------------------------------------------------------------------------------

def stored_vectors(column: pa.Array, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(the rows' stored vectors as an (n, width) array in their own dtype, the positions in the
    batch of the rows that have one). Fixed-size lists (Parquet, Lance) and lists (Delta) alike."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if not (pa.types.is_fixed_size_list(column.type) or pa.types.is_list(column.type)
            or pa.types.is_large_list(column.type)):
        raise InputError(f"{where}: its {VECTOR_COLUMN!r} column is {column.type}, not a list of numbers.")
    valid = column.is_valid().to_numpy(zero_copy_only=False)
    positions = np.flatnonzero(valid)
    if len(positions) == 0:
        return np.zeros((0, 0), dtype=np.float32), positions
    present = column.filter(pa.array(valid)) if len(positions) < len(column) else column
    lengths = present.value_lengths().to_numpy(zero_copy_only=False) if not pa.types.is_fixed_size_list(present.type) \
        else np.full(len(present), present.type.list_size)
    width = int(lengths[0])
    if (lengths != width).any():
        raise InputError(f"{where}: its vectors are not all of one width ({int(lengths.min())} to {int(lengths.max())} values).")
    values = present.flatten()
    if values.null_count:
        raise InputError(f"{where}: a stored vector holds a null value; embed those rows again.")
    return values.to_numpy(zero_copy_only=False).reshape(len(present), width), positions


def dequantize(codes: np.ndarray, precision: str, ranges: Any) -> np.ndarray:
    """int8/uint8 codes back to float32: each code's bucket centre in the recorded ranges (the
    inverse of vectors.quantize; a constant dimension gives its one value)."""
    bounds = np.asarray(ranges, dtype=np.float32)
    starts = bounds[0]
    steps = (bounds[1] - starts) / 255
    buckets = codes.astype(np.float32) + (128 if precision == "int8" else 0)
    return starts + (buckets + 0.5) * steps


def unpack_signs(codes: np.ndarray, precision: str, dim: int) -> np.ndarray:
    """binary/ubinary codes (packed bytes; binary = packed - 128) to +-1 per dimension, float32."""
    packed = (codes.astype(np.int16) + (128 if precision == "binary" else 0)).astype(np.uint8)
    bits = np.unpackbits(packed, axis=1)[:, :dim]
    return bits.astype(np.float32) * 2 - 1


def scorer(query: np.ndarray, record: Mapping[str, Any], where: str) -> Any:
    """A function from a batch's stored vectors to their scores against `query` (module docstring)."""
    precision = record.get("precision") or "float32"
    dim = int(query.shape[0])
    width = output_width(dim, precision)
    ranges = record.get("ranges")
    if precision in CALIBRATED and (not ranges or np.asarray(ranges).shape != (2, dim)):
        raise InputError(f"{where}: {precision} vectors need their recorded ranges (2 x {dim}), and its record has "
                         f"{'none' if not ranges else np.asarray(ranges).shape}; embed it again.")
    signs = np.where(query > 0, 1.0, -1.0).astype(np.float32)
    query64 = query.astype(np.float64)
    query_norm = float(np.sqrt((query64 * query64).sum()))

    def score(stored: np.ndarray) -> np.ndarray:
        if stored.shape[1] != width:
            raise InputError(f"{where}: its vectors have {stored.shape[1]} values, but its record describes {width} "
                             f"({precision}, {dim} dimensions); the record is not these rows'.")
        if precision in ("binary", "ubinary"):
            return (unpack_signs(stored, precision, dim) @ signs) / dim
        vectors = dequantize(stored, precision, ranges) if precision in CALIBRATED else stored
        # in float64, row by row (not a matrix product, whose rounding depends on a row's place in
        # the batch): equal vectors (duplicate texts) get equal scores, and rank by row order
        vectors = vectors.astype(np.float64)
        norms = np.sqrt((vectors * vectors).sum(axis=1)) * query_norm
        return (vectors * query64).sum(axis=1) / np.maximum(norms, _EPS)

    return score


def best(scores: np.ndarray, order: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k best of `scores` (highest first; equal scores by lower `order`)."""
    n = len(scores)
    if n > k:
        kth = scores[np.argpartition(-scores, k - 1)[:k]].min()
        above = np.flatnonzero(scores > kth)
        ties = np.flatnonzero(scores == kth)
        ties = ties[np.argsort(order[ties], kind="stable")][: k - len(above)]
        chosen = np.concatenate([above, ties])
    else:
        chosen = np.arange(n)
    return chosen[np.lexsort((order[chosen], -scores[chosen]))]


def shown_columns(schema: pa.Schema, id_column: str | None) -> list[str]:
    """A hit's columns: the id column, then every kept column (not the vector, the row's embed
    facts or its content hash)."""
    first = [id_column] if id_column and id_column in schema.names else []
    return first + [n for n in schema.names if n not in HIDDEN_COLUMNS and n not in first]


LANCE_PROBES = 256  # every partition an hfbatch --index makes (IVF_FLAT): its search stays exact


def lance_nearest(source: Source, query: np.ndarray, k: int) -> tuple[list[dict[str, Any]], int, int]:
    """The k nearest rows by Lance's own search (cosine; scores 1 - its distance)."""
    from ..io.targets.lance import LanceTarget

    target = source.target
    assert isinstance(target, LanceTarget)
    names = [n for n in shown_columns(target.schema(), source.id_column) if n != "_distance"]
    table = target.nearest(query.astype(np.float32), k, names, metric="cosine", probes=LANCE_PROBES)
    distances = table.column("_distance").to_numpy(zero_copy_only=False)
    rows = table.drop_columns(["_distance"]).to_pylist()
    hits = [{"rank": rank, "score": round(float(1.0 - d), 6),
             **{(f"{name}_" if name in ("rank", "score") else name): cell for name, cell in row.items()}}
            for rank, (d, row) in enumerate(zip(distances, rows), 1)]
    total, missing = target.count_rows(), target.count_rows(f"{VECTOR_COLUMN} IS NULL")
    return hits, total - missing, missing


def postgres_nearest(source: Source, query: np.ndarray, k: int) -> tuple[list[dict[str, Any]], int, int]:
    """The k nearest rows by pgvector's `<=>` (cosine distance; scores 1 - it), in SQL: with an
    HNSW index searched at hnsw.ef_search 1000 (its most), an IVFFlat one with every list probed."""
    from ..io.targets.postgres import PostgresTarget

    target = source.target
    assert isinstance(target, PostgresTarget)
    names = [n for n in shown_columns(target.schema(), source.id_column) if n != "_distance"]
    rows = target.nearest(query.astype(np.float32), k, names)
    hits = [{"rank": rank, "score": round(float(1.0 - row[-1]), 6),
             **{(f"{name}_" if name in ("rank", "score") else name): cell for name, cell in zip(names, row)}}
            for rank, row in enumerate(rows, 1)]
    total, missing = target.counts()
    return hits, total - missing, missing


def nearest(batches: Iterator[pa.RecordBatch], query: np.ndarray, k: int, record: Mapping[str, Any], *,
            id_column: str | None = None, where: str, rate: Any = None) -> tuple[list[dict[str, Any]], int, int]:
    """(the k best rows as hits, rows scored, rows skipped for having no vector), streamed;
    `rate(column) -> (scores, positions)` scores a batch (default: dense vectors by the record's metric)."""
    score = scorer(query, record, where) if rate is None else None

    def dense_rate(column: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        stored, positions = stored_vectors(column, where)
        return (np.asarray(score(stored), dtype=np.float64) if len(positions) else np.zeros(0)), positions  # type: ignore[misc]

    rate = rate or dense_rate
    kept_scores = np.zeros(0, dtype=np.float64)
    kept_order = np.zeros(0, dtype=np.int64)
    kept_rows: pa.Table | None = None
    offset = searched = skipped = 0
    for whole in batches:
        for start in range(0, max(whole.num_rows, 1), BATCH_ROWS):
            batch = whole.slice(start, BATCH_ROWS)
            if batch.num_rows == 0:
                continue
            if VECTOR_COLUMN not in batch.schema.names:
                raise InputError(f"{where}: has no {VECTOR_COLUMN!r} column; it is not an embedding output.")
            scores, positions = rate(batch.column(VECTOR_COLUMN))
            skipped += batch.num_rows - len(positions)
            searched += len(positions)
            if len(positions):
                scores = np.asarray(scores, dtype=np.float64)
                scores = np.where(np.isnan(scores), -np.inf, scores)
                order = positions.astype(np.int64) + offset
                top = best(scores, order, k)
                rows = pa.Table.from_batches([batch.select(shown_columns(batch.schema, id_column))
                                               .take(pa.array(positions[top]))])
                kept_scores = np.concatenate([kept_scores, scores[top]])
                kept_order = np.concatenate([kept_order, order[top]])
                kept_rows = rows if kept_rows is None else pa.concat_tables([kept_rows, rows], promote_options="default")
                keep = best(kept_scores, kept_order, k)
                kept_scores, kept_order = kept_scores[keep], kept_order[keep]
                kept_rows = kept_rows.take(pa.array(keep))
            offset += batch.num_rows
    hits: list[dict[str, Any]] = []
    for rank, (value, row) in enumerate(zip(kept_scores, kept_rows.to_pylist() if kept_rows is not None else []), 1):
        hits.append({"rank": rank, "score": round(float(value), 6),
                     **{(f"{name}_" if name in ("rank", "score") else name): cell for name, cell in row.items()}})
    return hits, searched, skipped
