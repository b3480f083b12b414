"""Lance and Delta targets in a store: a real S3-protocol server on 127.0.0.1 (moto's), reached
through AWS_ENDPOINT_URL as users reach MinIO or R2 (the `s3` fixture). Lance and delta-rs talk
to it with their own Rust object-store clients, so this is their S3 path, not fsspec's."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from hfbatch import EmbedOptions
from hfbatch.engines import embed
from hfbatch.io.stores import RemotePath
from hfbatch.io.targets import open_target
from conftest import write_parquet
from s3_server import BUCKET, SECRET_KEY, S3Server, s3  # noqa: F401  # s3: the fixture

pytest.importorskip("s3fs", reason="s3:// support is the optional extra hfbatch[s3]; the dev install has it")

TEXTS = [f"store review {i}: the strap {'held' if i % 2 else 'broke'} after {i} days" for i in range(30)]


def _days(tmp_path: Path) -> tuple[Path, Path]:
    day1 = write_parquet(tmp_path / "day1.parquet", [{"id": i, "text": t} for i, t in enumerate(TEXTS)])
    rows = [{"id": i, "text": t + (" (edited)" if i == 3 else "")} for i, t in enumerate(TEXTS) if i != 7]
    day2 = write_parquet(tmp_path / "day2.parquet", rows + [{"id": 100, "text": "a new review of the strap"}])
    return day1, day2


@pytest.mark.parametrize("output", [f"s3://{BUCKET}/vectors/reviews.lance", f"delta://s3://{BUCKET}/vectors/reviews"])
def test_a_table_in_a_store_syncs_by_id(s3: S3Server, tmp_path: Path, output: str) -> None:  # noqa: F811
    day1, day2 = _days(tmp_path)
    first = embed(EmbedOptions(input=day1, output=output, id_column="id", cache_dir=tmp_path / "cache"))
    second = embed(EmbedOptions(input=day2, output=output, id_column="id", delete_missing=True,
                                cache_dir=tmp_path / "cache"))
    assert first.metrics["sync"]["inserted"] == 30
    assert {k: second.metrics["sync"][k] for k in ("inserted", "updated", "unchanged", "deleted")} == \
        {"inserted": 1, "updated": 1, "unchanged": 28, "deleted": 1}
    assert second.metrics["texts_computed"] == 2  # the edited text and the new one, nothing else
    table = second.document["provenance"]["output"]["table"]
    assert table["version"] == table["version_before"] + 1  # one commit for the upserts and the delete

    target = open_target(output)
    ids = sorted(pa.Table.from_batches(list(target.batches(["id"]))).column("id").to_pylist())
    assert ids == sorted([i for i in range(30) if i != 7] + [100])
    record = target.record()
    assert record is not None and record["id_column"] == "id" and record["dim"] == 384
    # the store's credentials are in no record the run left: the table's own nor the sidecar
    sidecar = RemotePath(output.removeprefix("delta://") + ".meta.json")
    assert SECRET_KEY not in json.dumps(record) and SECRET_KEY not in sidecar.read_text()
