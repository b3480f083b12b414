"""One input through every engine: the single-file job (run_embed on each part), the many-part
engine and the Ray engine write the same part sidecar (one document builder), and `verify`
passes on an output of each."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from conftest import SAMPLE_TEXTS, write_csv, write_jsonl, write_parquet
from hfbatch import EmbedOptions
from hfbatch.engines.parts import run_embed_parts
from hfbatch.engines.ray import run_embed_ray
from hfbatch.jobs.embed import run_embed
from hfbatch.tools.verify import verify_output

PARTS = ("a.jsonl", "b.csv", "sub/c.parquet", "sub/d.parquet")

# Values that may differ between engines, and why; every key must still be there in each document.
IGNORED_VALUES = {
    "provenance.engine",  # "local" or "ray": the point of the test
    "provenance.started", "provenance.finished",  # timestamps
    "provenance.output.path",  # each engine writes its own directory
    "metrics.wall_seconds", "metrics.rows_per_second", "metrics.tokens_per_second",  # timings
    "metrics.stage_seconds.read", "metrics.stage_seconds.validate", "metrics.stage_seconds.cache",
    "metrics.stage_seconds.model_load", "metrics.stage_seconds.embed", "metrics.stage_seconds.write",
    "metrics.stage_seconds.measure", "metrics.stage_seconds.export", "metrics.stage_seconds.check",
    "metrics.background_seconds.read", "metrics.background_seconds.validate",
    "metrics.model_load_seconds", "provenance.backends.local.load_seconds",  # timings
    "provenance.backends.local.setup_seconds.model_load", "provenance.backends.local.setup_seconds.measure",
    "provenance.backends.local.setup_seconds.export", "provenance.backends.local.setup_seconds.check",
    "metrics.peak_rss_mb",  # of whichever process wrote it
    # the cache file's size when the part was published: Ray's actors work on several parts at once
    "metrics.cache.volume_bytes",
}


def _data(root: Path) -> None:
    """Parts in three formats, every text distinct (so no engine's hits depend on the order it saw
    the parts in), a.jsonl with a number and a null in its text column (marked rows), and a part
    with no rows (which the Ray engine's driver writes itself)."""
    (root / "sub").mkdir(parents=True)
    write_jsonl(root / "a.jsonl", [{"id": i, "text": f"{SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)]} a{i}"} for i in range(25)]
                + [{"id": 25, "text": 12345}, {"id": 26, "text": None}])
    write_csv(root / "b.csv", [{"id": i, "text": f"csv row {i}: {SAMPLE_TEXTS[i % 3]}"} for i in range(13)])
    write_parquet(root / "sub" / "c.parquet", [{"id": i, "text": f"parquet {i} " * (1 + i % 5)} for i in range(17)])
    pq.write_table(pa.table({"id": pa.array([], pa.int64()), "text": pa.array([], pa.string())}), root / "sub" / "d.parquet")


def _flat(document: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(document, dict):
        for key, value in document.items():
            yield from _flat(value, f"{prefix}{key}.")
    else:
        yield prefix[:-1], document


def test_every_engine_writes_the_same_part_sidecar_and_verify_passes_on_each(tmp_path: Path) -> None:
    data, cache = tmp_path / "data", tmp_path / "cache"
    _data(data)

    def options(output: Path, source: Path = data) -> EmbedOptions:
        return EmbedOptions(input=source, output=output, chunk_size=8, cache_dir=cache)

    # each engine starts from the same empty cache (one path: the documents name it)
    for part in PARTS:
        output = tmp_path / "single" / (part.split(".")[0] + ".parquet")
        output.parent.mkdir(parents=True, exist_ok=True)
        run_embed(options(output, data / part))
    shutil.rmtree(cache)
    run_embed_parts(options(tmp_path / "parts"))
    shutil.rmtree(cache)
    ray = run_embed_ray(options(tmp_path / "ray"), num_workers=2)
    assert ray.document["totals"]["rows_out"] == 57 and ray.document["ray"]["actor_starts"] == 2

    for part in PARTS:
        name = part.split(".")[0] + ".parquet"
        documents = {
            "single": json.loads((tmp_path / "single" / (name + ".meta.json")).read_text()),
            "parts": json.loads((tmp_path / "parts" / "_hfbatch" / (name + ".meta.json")).read_text()),
            "ray": json.loads((tmp_path / "ray" / "_hfbatch" / (name + ".meta.json")).read_text()),
        }
        flat = {engine: dict(_flat(doc)) for engine, doc in documents.items()}
        assert flat["parts"].keys() == flat["single"].keys(), part
        assert flat["ray"].keys() == flat["single"].keys(), (part, flat["ray"].keys() ^ flat["single"].keys())
        for engine in ("parts", "ray"):
            differ = {key: (value, flat[engine][key]) for key, value in flat["single"].items()
                      if key not in IGNORED_VALUES and flat[engine][key] != value}
            assert not differ, (part, engine, differ)
        assert flat["ray"]["provenance.engine"] == "ray" and flat["parts"]["provenance.engine"] == "local"
        # the sidecar, the Parquet metadata and the job's record agree
        for engine in ("parts", "ray"):
            assert json.loads(pq.read_metadata(tmp_path / engine / name).metadata[b"hfbatch"]) == documents[engine]

    for output in (tmp_path / "single" / "b.parquet", tmp_path / "parts" / "sub" / "c.parquet", tmp_path / "ray" / "a.parquet",
                   tmp_path / "ray" / "sub" / "c.parquet"):
        report = verify_output(output, sample=8)
        assert report["ok"] and report["same_fingerprint"] and report["rows_checked"] == 8, (output, report)
    empty = verify_output(tmp_path / "ray" / "sub" / "d.parquet")
    assert empty["ok"] and empty["same_fingerprint"] and empty["rows_checked"] == 0
