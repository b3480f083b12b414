"""Fault injection at scale: 10,000 rows through the TEI protocol while the server answers a share
of requests with 429/5xx, answers too late, or drops the connection. The output must be complete
and identical to a fault-free run, with the retries counted; a server that never recovers ends the
job with exit 1 and no output."""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from conftest import write_parquet
from embedding_server import EmbeddingServer
from hfbatch import EmbedOptions, TransientBackendError
import hfbatch
from hfbatch.backends.http import RetryPolicy
from hfbatch.cli import app

pytestmark = pytest.mark.slow
ROWS = 10_000
# the client's timeout: far above what a real answer takes on a busy 2-core machine (a slow answer
# would be a timeout nobody injected, and the exact retry counts below would be off by it)
TIMEOUT = 2.0


@pytest.fixture(autouse=True)
def short_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Backoff from 0.05 s, not 0.5 s (what is asserted is that every fault is retried and counted,
    not how long the waits are): half of this file's minute was spent waiting."""
    defaults = dict(zip(("attempts", "ceiling_seconds", "max_wait_seconds", "base_wait_seconds"),
                        RetryPolicy.__init__.__defaults__))
    assert defaults["base_wait_seconds"] == 0.5  # the policy's fields are still these
    monkeypatch.setattr(RetryPolicy.__init__, "__defaults__", (*list(defaults.values())[:3], 0.05))


@pytest.fixture
def server(st_model):
    with EmbeddingServer(st_model) as srv:
        srv.fast = True  # the property under test is the client's; hash vectors keep 10,000 rows quick
        yield srv


def _options(src: Path, out: Path, server: EmbeddingServer, **kw) -> EmbedOptions:
    return EmbedOptions(input=src, output=out, backend="tei", endpoint=server.url, api_batch_size=64,
                        api_concurrency=4, api_timeout=TIMEOUT, use_cache=False, **kw)


def test_random_faults_on_10000_rows_lose_nothing(tmp_path: Path, server: EmbeddingServer) -> None:
    rng = random.Random(3)
    words = "kettle lid battery cable strap zipper screen hinge charger pocket seam button".split()
    src = write_parquet(tmp_path / "in.parquet", [{"id": i, "text": f"{i} " + " ".join(rng.choices(words, k=6))}
                                                  for i in range(ROWS)])
    clean = hfbatch.embed(_options(src, tmp_path / "clean.parquet", server))
    server.chaos_rate, server.chaos, server.hang_seconds = 0.2, random.Random(7), TIMEOUT + 0.5
    chaotic = hfbatch.embed(_options(src, tmp_path / "chaos.parquet", server, api_retries=8))
    want, got = pq.read_table(clean.output), pq.read_table(chaotic.output)
    assert got.num_rows == ROWS and got.column("id").to_pylist() == list(range(ROWS))
    assert got.column("embedding").to_pylist() == want.column("embedding").to_pylist()  # identical, row for row
    injected = sum(server.chaos_seen.values())
    tei = chaotic.document["provenance"]["backends"]["tei"]
    assert injected >= 20 and set(server.chaos_seen) == {"429", "500", "502", "503", "504", "timeout", "reset"}
    assert tei["retries"] == injected  # every injected fault was retried, and counted
    causes = tei["retry_causes"]
    assert causes.get("timeout") == server.chaos_seen["timeout"] and causes.get("connection") == server.chaos_seen["reset"]
    assert tei["requests"] == clean.document["provenance"]["backends"]["tei"]["requests"] + injected


def test_a_server_that_never_recovers_ends_the_job_with_exit_1(tmp_path: Path, server: EmbeddingServer) -> None:
    src = write_parquet(tmp_path / "in.parquet", [{"id": i, "text": f"text {i}"} for i in range(300)])
    server.chaos_rate, server.chaos_kinds = 1.0, ("503", "502", "reset")
    with pytest.raises(TransientBackendError, match="gave up after 3 attempts"):
        hfbatch.embed(_options(src, tmp_path / "o.parquet", server, api_retries=3))
    assert not (tmp_path / "o.parquet").exists()
    result = CliRunner().invoke(app, ["embed", str(src), "-o", str(tmp_path / "o.parquet"), "--backend", "tei",
                                      "--endpoint", server.url, "--api-retries", "2", "--no-cache"])
    assert result.exit_code == 1 and "TransientBackendError" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "o.parquet").exists()
