"""--runtime onnx and --quantize int8 with the real bundled model and real ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import SAMPLE_TEXTS, rows_for, write_csv
from hfbatch import EmbedOptions, InputError, ModelLoadError, embed_file
from hfbatch.backends import onnx as onnx_backend
from hfbatch.backends.local import LocalBackend

DEFAULT = "sentence-transformers/all-MiniLM-L6-v2"


def test_onnx_runtime_equals_torch_and_caches_its_export(tmp_path: Path, st_model, onnx_dir: Path) -> None:
    src = write_csv(tmp_path / "in.csv", rows_for(SAMPLE_TEXTS))
    result = embed_file(EmbedOptions(input=src, output=tmp_path / "o.parquet", runtime="onnx", quantize="none", chunk_size=3))
    got = np.array(pq.read_table(result.output).column("embedding").to_pylist(), dtype=np.float32)
    want = st_model.encode(SAMPLE_TEXTS)
    assert ((got * want).sum(1)).min() > 0.9999  # unit vectors: the dot product is the cosine
    local = result.document["provenance"]["backends"]["local"]
    assert local["runtime"] == "onnx" and local["onnx_fidelity"]["min"] > 0.999
    exports = sorted(onnx_dir.rglob("*.onnx"))
    assert exports
    stamp = {p: p.stat().st_mtime_ns for p in exports}
    again = LocalBackend(DEFAULT, runtime="onnx")
    assert again.embed(["reuse the export"]).shape == (1, 384)
    assert {p: p.stat().st_mtime_ns for p in exports} == stamp  # exported once, reused
    assert again.fingerprint() != LocalBackend(DEFAULT).fingerprint()  # never served as torch vectors


def test_int8_is_refused_with_figures_when_not_faithful(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(onnx_backend, "INT8_MIN_MEAN", 0.99999)  # a bar no int8 model meets
    src = write_csv(tmp_path / "in.csv", rows_for(SAMPLE_TEXTS))
    with pytest.raises(ModelLoadError, match=r"not faithful enough .*cosine to fp32 mean 0\.\d+ \(needs >= 0\.99999\), min"):
        embed_file(EmbedOptions(input=src, output=tmp_path / "o.parquet", quantize="int8"))
    assert not (tmp_path / "o.parquet").exists()


def test_int8_meets_the_default_bar_and_is_really_int8(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, st_model,
                                                        onnx_dir: Path) -> None:
    monkeypatch.setenv("ENABLE_MODEL_QUANTIZATION", "true")  # the original service's switch
    src = write_csv(tmp_path / "in.csv", rows_for(SAMPLE_TEXTS))
    result = embed_file(EmbedOptions(input=src, output=tmp_path / "o.parquet"))
    local = result.document["provenance"]["backends"]["local"]
    assert local["quantize"].startswith("int8-") and local["runtime"] == "onnx"
    assert local["onnx_fidelity"]["mean"] >= onnx_backend.INT8_MIN_MEAN == 0.99
    assert local["onnx_fidelity"]["min"] >= onnx_backend.INT8_MIN_MIN == 0.98
    got = np.array(pq.read_table(result.output).column("embedding").to_pylist(), dtype=np.float32)
    want = st_model.encode(SAMPLE_TEXTS)
    cosine = (got * want).sum(1)  # unit vectors
    assert cosine.min() > 0.97 and not np.allclose(got, want, atol=1e-3)  # close, but really int8
    import onnx

    (export,) = onnx_dir.rglob("model.int8*.onnx")
    ops = [n.op_type for n in onnx.load(str(export)).graph.node]
    # every weight MatMul int8 but the first block's FFN output (kept fp32: the recipe's one exception), inputs smoothed
    assert ops.count("MatMulInteger") == 6 * 6 - 1 and ops.count("MatMul") >= 1 and "Mul" in ops


def test_smoothing_is_exact_in_fp32_and_shares_one_scale_per_input(st_model) -> None:
    import torch

    transformer = st_model[0].auto_model
    smoothed = onnx_backend.smooth_linears(transformer, st_model.tokenizer, 256)
    wrapped = {name: m for name, m in smoothed.named_modules()
               if type(m).__name__ == "Smoothed" and name.startswith("encoder.")}
    assert len(wrapped) == 6 * 6  # q, k, v, attention output, FFN in, FFN out in each of 6 blocks
    block = "encoder.layer.3.attention.self."
    inverse = [wrapped[block + n].inverse for n in ("query", "key", "value")]
    assert torch.equal(inverse[0], inverse[1]) and torch.equal(inverse[0], inverse[2])  # one input, one scale
    assert not torch.allclose(inverse[0], torch.ones_like(inverse[0]))  # really rescaled
    batch = st_model.tokenizer(SAMPLE_TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        want = transformer(**batch).last_hidden_state
        got = smoothed(**batch).last_hidden_state
    assert (got - want).abs().max() < 1e-3
    assert transformer.encoder.layer[0].attention.self.query.__class__ is torch.nn.Linear  # the loaded model is untouched


def test_onnx_option_conflicts() -> None:
    with pytest.raises(InputError, match="run in fp32 or int8 on the CPU"):
        LocalBackend(DEFAULT, runtime="onnx", precision="bf16")
    with pytest.raises(InputError, match="--quantize 'int4'"):
        LocalBackend(DEFAULT, quantize="int4")


def test_int8_is_checked_on_the_jobs_own_texts_and_recorded(tmp_path: Path) -> None:
    texts = [f"order {i}: {SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)]} " * (1 + i % 4) for i in range(40)]
    src = write_csv(tmp_path / "in.csv", rows_for(texts))
    result = embed_file(EmbedOptions(input=src, output=tmp_path / "o.parquet", quantize="int8", batch_size=16))
    job = result.document["provenance"]["backends"]["local"]["job_fidelity"]
    assert job["texts"] == 16  # the first batch: the 16 longest texts of the chunk
    assert job["mean"] >= onnx_backend.INT8_MIN_MEAN and job["min"] >= onnx_backend.INT8_MIN_MIN


def test_int8_unfaithful_on_the_jobs_texts_is_refused_before_anything_is_written(tmp_path: Path,
                                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # A fake, because no real int8 export can be made unfaithful on chosen texts on demand: the real
    # encoder, with noise added to every text that is not one of the fixed calibration texts, so the
    # load-time check passes and only the job's own texts can catch it (the real case:
    # package descriptions at min cosine 0.9798 where the fixed sample said 0.9903).
    from hfbatch.backends.local import CALIBRATION_TEXTS

    real = LocalBackend._run

    def drifting(self, runner, texts):  # type: ignore[no-untyped-def]
        vectors = real(self, runner, texts)
        if runner is self._reference:  # the fp32 reference stays true
            return vectors
        noise = np.random.default_rng(0).normal(0, 0.2, vectors.shape).astype(np.float32)
        return np.where([[t in CALIBRATION_TEXTS] for t in texts], vectors, vectors + noise)

    monkeypatch.setattr(LocalBackend, "_run", drifting)
    src = write_csv(tmp_path / "in.csv", rows_for([f"{t} (row {i})" for i, t in enumerate(SAMPLE_TEXTS * 3)]))
    with pytest.raises(ModelLoadError, match=r"not faithful enough on this job's first \d+ texts"):
        embed_file(EmbedOptions(input=src, output=tmp_path / "o.parquet", quantize="int8", cache_dir=tmp_path / "c"))
    assert not (tmp_path / "o.parquet").exists() and not (tmp_path / "o.parquet.meta.json").exists()
