"""--runtime/--precision/--quantize auto: measured per machine and model, cached, chosen by the
job's size, checked on the job's own texts; the cached export that starts without torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import BUNDLED_MODEL_DIR, SAMPLE_TEXTS, rows_for, write_csv
from hfbatch import EmbedOptions, InputError, ModelLoadError, embed_file
from hfbatch.backends import selection
from hfbatch.backends.local import CALIBRATION_TEXTS, LocalBackend
from hfbatch.backends.tokenizer import load_fast, load_transformers, same_ids

DEFAULT = "sentence-transformers/all-MiniLM-L6-v2"
TEXTS = [f"{t} (review {i})" for i, t in enumerate(SAMPLE_TEXTS * 4)]


@pytest.fixture(autouse=True)
def auto_runtime(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests are about auto: undo the suite's torch fp32 pin (conftest)."""
    monkeypatch.delenv("HFBATCH_RUNTIME")
    monkeypatch.delenv("HFBATCH_PRECISION")


def vectors(path: Path) -> np.ndarray:
    return np.array(pq.read_table(path).column("embedding").to_pylist(), dtype=np.float32)


def sidecar_local(result: Any) -> dict[str, Any]:
    return result.document["provenance"]["backends"]["local"]


def entry(config: tuple[str, str, str], startup: float, rate: float, accepted: bool = True) -> dict[str, Any]:
    return {"config": list(config), "label": selection.label(config), "startup_s": startup, "texts_per_s": rate,
            "fidelity": {"mean": 0.999, "min": 0.995}, "accepted": accepted}


def plant(backend: LocalBackend, entries: list[dict[str, Any]]) -> Path:
    """A record of measurements for this machine and model, as if measured before: what the
    choice is made from. (The measuring itself is tested in test_auto_measures_once...)."""
    path = selection.record_path(backend)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"format": selection.RECORD_FORMAT, "model_id": DEFAULT, "machine": selection.machine(),
                                "measured_at": "2026-11-29T00:00:00+00:00", "sample_texts": 63, "candidates": entries}))
    return path


def test_candidates_fit_the_request_and_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(selection, "EXPORT_RUNTIMES", {"onnx": "onnxruntime"})
    monkeypatch.setattr(selection, "cpu_has_native_bf16", lambda: True)
    assert selection.candidates("auto", "auto", "auto", cpu_only=True) == [
        ("torch", "fp32", "none"), ("torch", "bf16", "none"), ("onnx", "fp32", "none"), ("onnx", "fp32", "int8")]
    monkeypatch.setattr(selection, "cpu_has_native_bf16", lambda: False)  # emulated bf16 is never a candidate
    assert ("torch", "bf16", "none") not in selection.candidates("auto", "auto", "auto", cpu_only=True)
    assert selection.candidates("auto", "auto", "none", cpu_only=True) == [("torch", "fp32", "none"), ("onnx", "fp32", "none")]
    assert selection.candidates("auto", "auto", "int8", cpu_only=True) == [("onnx", "fp32", "int8")]
    assert selection.candidates("auto", "bf16", "auto", cpu_only=True) == [("torch", "bf16", "none")]  # forced stays forced
    assert selection.candidates("auto", "auto", "auto", cpu_only=False) == [("torch", "auto", "none")]  # a GPU: fp16 rule
    with pytest.raises(InputError, match="no runtime fits --runtime onnx --precision bf16"):
        selection.candidates("onnx", "bf16", "auto", cpu_only=True)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(selection, "EXPORT_RUNTIMES", {"openvino": "openvino"})
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nncf" else real(name, *a))
    # OpenVINO without NNCF: its int8 weights cannot be made, so auto does not weigh it (forced, it says how to install)
    assert ("openvino", "fp32", "int8") not in selection.candidates("auto", "auto", "auto", cpu_only=True)
    assert ("openvino", "fp32", "none") in selection.candidates("auto", "auto", "auto", cpu_only=True)


def test_auto_measures_once_per_machine_and_model_and_records_the_choice(tmp_path: Path, onnx_dir: Path, st_model) -> None:
    src = write_csv(tmp_path / "in.csv", rows_for(TEXTS))
    first = embed_file(EmbedOptions(input=src, output=tmp_path / "a.parquet", runtime="onnx"))  # precision, quantize: auto
    chosen = sidecar_local(first)["selection"]
    assert chosen["by"] == "measured on this machine" and chosen["rows"] == len(TEXTS)
    measured = {c["label"]: c for c in chosen["candidates"]}
    assert set(measured) == {"onnx fp32", "onnx int8"}
    for c in measured.values():
        assert c["startup_s"] > 0 and c["texts_per_s"] > 0 and 0.9 < c["fidelity"]["min"] <= c["fidelity"]["mean"] <= 1.0
    assert measured["onnx fp32"]["fidelity"]["min"] > 0.999 and measured["onnx fp32"]["accepted"]
    accepted = [c for c in measured.values() if c["accepted"]]
    best = min(accepted, key=lambda c: selection.estimate(c, len(TEXTS)))
    assert chosen["chosen"] == best["label"]
    local = sidecar_local(first)
    assert (local["runtime"], "int8" if local["quantize"] != "none" else local["precision"]) == tuple(best["label"].split())
    cosine = (vectors(first.output) * st_model.encode(TEXTS)).sum(1)
    assert cosine.min() > (0.98 if "int8" in best["label"] else 0.9999)
    record = Path(chosen["measurements"])
    assert record.parent == onnx_dir / "choices" and json.loads(record.read_text())["model_id"] == DEFAULT
    # timed on fixed texts of every length (how long texts are changes the ranking), not on a job's own
    sample = selection._sample()
    assert json.loads(record.read_text())["sample_texts"] == len(sample) > len(selection._fixed_texts())
    assert max(len(t) for t in sample) > 1500 and not set(TEXTS) & set(sample)
    stamp = record.stat().st_mtime_ns
    again = embed_file(EmbedOptions(input=src, output=tmp_path / "b.parquet", runtime="onnx"))
    assert record.stat().st_mtime_ns == stamp  # measured once: the record is reused, not rewritten
    assert sidecar_local(again)["selection"]["chosen"] == chosen["chosen"]
    from hfbatch.tools.doctor import capabilities

    shown = [r for r in capabilities()["runtimes"] if r["file"] == str(record)]
    # the record holds what this machine measured for the model (other tests may have added torch's)
    assert shown and shown[0]["in_force"] and set(measured) <= {c["label"] for c in shown[0]["candidates"]}


def test_candidates_are_timed_round_robin_so_a_busy_moment_hits_all_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = LocalBackend.compute

    def spy(self: LocalBackend, texts: Any) -> np.ndarray:
        calls.append(selection.label((self.runtime, self.precision, self.quantize or "none")))
        return real(self, texts)

    backend = LocalBackend(DEFAULT, runtime="onnx")
    fixed, sample = selection._fixed_texts()[:40], selection._sample()[:70]
    reference = backend.variant(("torch", "fp32", "none")).compute(fixed)
    monkeypatch.setattr(LocalBackend, "compute", spy)
    configs = [("onnx", "fp32", "none"), ("onnx", "fp32", "int8")]
    entries = selection._measure(backend, configs, sample, fixed, reference)
    assert all(e["accepted"] and e["texts_per_s"] > 0 for e in entries)
    per_pass, checked = -(-len(sample) // selection.BATCH), -(-len(fixed) // selection.BATCH)
    a, b = "onnx fp32", "onnx int8"
    # each: checked on the fixed texts and warmed up on the timed ones, then rounds that take each once, in turn first
    loading = 2 * (checked + per_pass)
    assert calls[:loading] == [a] * (checked + per_pass) + [b] * (checked + per_pass)
    timed = calls[loading:]
    passes = [timed[i] for i in range(0, len(timed), per_pass)]
    assert all(timed[i:i + per_pass] == [timed[i]] * per_pass for i in range(0, len(timed), per_pass))
    assert len(timed) == per_pass * len(passes) and passes == [a, b, b, a, a, b][:2 * selection.TIMED_ROUNDS]


def test_a_new_candidate_remeasures_all_on_one_sample_and_a_passing_failure_only_itself(
        monkeypatch: pytest.MonkeyPatch) -> None:
    measured: list[list[str]] = []

    def fake(backend: Any, configs: Any, sample: Any, fixed: Any, reference: Any) -> list[dict[str, Any]]:
        measured.append([selection.label(c) for c in configs])
        return [entry(c, 1.0, 50.0) for c in configs]

    monkeypatch.setattr(selection, "_measure", fake)
    monkeypatch.setattr(LocalBackend, "compute", lambda self, texts: np.ones((len(texts), 384), np.float32))
    fp32, int8, openvino = ("onnx", "fp32", "none"), ("onnx", "fp32", "int8"), ("openvino", "fp32", "none")
    backend = LocalBackend(DEFAULT, runtime="auto")
    plant(backend, [entry(fp32, 1.0, 10.0), {**entry(int8, 1.0, 20.0), "accepted": False, "transient": True}])
    selection.measured(backend, [fp32, int8])
    assert measured == [["onnx int8"]]  # the full disk / memory guard case: that one again, not every one
    selection.measured(backend, [fp32, int8, openvino])
    assert measured[-1] == ["onnx fp32", "onnx int8", "openvino fp32"]  # never ranked across two samples
    selection.measured(backend, [fp32, int8, openvino])
    assert len(measured) == 2  # all measured: nothing again


@pytest.mark.parametrize("planted", [
    {"candidates": [{"label": "onnx int8"}]},  # no config
    {"candidates": [{"config": "onnx", "label": "x"}]},
    {"candidates": [{**entry(("onnx", "fp32", "int8"), 0.1, 50.0), "texts_per_s": "fast"}]},
    {"candidates": "all", "job_checks": {}},
    {"candidates": [], "job_checks": ["passed"]},
])
def test_a_record_not_of_the_shape_written_is_measured_again_not_trusted(planted: dict[str, Any]) -> None:
    backend = LocalBackend(DEFAULT, runtime="auto")
    path = plant(backend, [])
    path.write_text(json.dumps({"format": selection.RECORD_FORMAT, "model_id": DEFAULT, **planted}))
    assert selection.read_record(path) == {}
    good = plant(backend, [entry(("onnx", "fp32", "int8"), 0.1, 50.0)])
    assert selection.read_record(good)["candidates"][0]["texts_per_s"] == 50.0


def test_the_choice_weighs_start_up_against_speed_by_job_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(selection, "EXPORT_RUNTIMES", {"onnx": "onnxruntime"})
    monkeypatch.setattr(selection, "cpu_has_native_bf16", lambda: False)
    probe = LocalBackend(DEFAULT, runtime="auto", precision="auto", quantize="none")
    plant(probe, [entry(("torch", "fp32", "none"), startup=6.0, rate=100.0),  # slow to start, fast to run
                  entry(("onnx", "fp32", "none"), startup=0.3, rate=50.0)])
    small = LocalBackend(DEFAULT, runtime="auto", precision="auto", quantize="none")
    small.settle(rows=100)  # 0.3 + 2 s against 6 + 1 s
    assert small.config == ("onnx", "fp32", "none") and small.selection["estimated_seconds"] == pytest.approx(2.3)
    big = LocalBackend(DEFAULT, runtime="auto", precision="auto", quantize="none")
    big.settle(rows=1_000_000)
    assert big.config == ("torch", "fp32", "none")
    assert small.fingerprint() != big.fingerprint()  # other vectors, other cache namespace
    rejected = LocalBackend(DEFAULT, runtime="auto", precision="auto", quantize="none")
    plant(probe, [entry(("torch", "fp32", "none"), 6.0, 100.0), entry(("onnx", "fp32", "none"), 0.3, 50.0, accepted=False)])
    rejected.settle(rows=100)
    assert rejected.config == ("torch", "fp32", "none")  # never a configuration that failed its check


def test_auto_passes_over_a_choice_unfaithful_on_the_jobs_own_texts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   st_model) -> None:
    # The int8 export made unfaithful on the job's texts only (noise on every text that is not a
    # fixed calibration text): what really happened on package descriptions (min 0.9798).
    real = LocalBackend._run

    def drifting(self, runner, texts):  # type: ignore[no-untyped-def]
        got = real(self, runner, texts)
        if self.quantize != "int8" or runner is self._reference:
            return got
        noise = np.random.default_rng(0).normal(0, 0.2, got.shape).astype(np.float32)
        return np.where([[t in CALIBRATION_TEXTS] for t in texts], got, got + noise)

    monkeypatch.setattr(LocalBackend, "_run", drifting)
    probe = LocalBackend(DEFAULT, runtime="onnx", precision="auto", quantize="auto")
    plant(probe, [entry(("onnx", "fp32", "int8"), 0.2, 500.0), entry(("onnx", "fp32", "none"), 0.3, 60.0)])
    src = write_csv(tmp_path / "in.csv", rows_for(TEXTS))
    result = embed_file(EmbedOptions(input=src, output=tmp_path / "o.parquet", runtime="onnx"))
    chosen = sidecar_local(result)["selection"]
    assert chosen["chosen"] == "onnx fp32"  # fell back, instead of refusing the job
    assert [p["label"] for p in chosen["passed_over"]] == ["onnx int8"]
    assert "not faithful enough on this job's first" in chosen["passed_over"][0]["reason"]
    assert (vectors(result.output) * st_model.encode(TEXTS)).sum(1).min() > 0.9999
    # forced int8 (no auto) is refused, with nothing written
    with pytest.raises(ModelLoadError, match="not faithful enough on this job's first"):
        embed_file(EmbedOptions(input=src, output=tmp_path / "forced.parquet", runtime="onnx", quantize="int8"))
    assert not (tmp_path / "forced.parquet").exists()
    # every accepted candidate unfaithful on the job's texts: the refusal says why, for each
    plant(probe, [entry(("onnx", "fp32", "int8"), 0.2, 500.0), entry(("onnx", "fp32", "none"), 0.3, 60.0, accepted=False)])
    with pytest.raises(InputError, match="onnx int8: .*not faithful enough on this job's first"):
        embed_file(EmbedOptions(input=src, output=tmp_path / "none.parquet", runtime="onnx"))


def test_a_warm_rerun_of_an_auto_job_loads_no_model(tmp_path: Path) -> None:
    probe = LocalBackend(DEFAULT, runtime="onnx", precision="auto", quantize="auto")
    plant(probe, [entry(("onnx", "fp32", "int8"), 0.2, 500.0), entry(("onnx", "fp32", "none"), 0.3, 60.0)])
    src = write_csv(tmp_path / "in.csv", rows_for(TEXTS))
    first = embed_file(EmbedOptions(input=src, output=tmp_path / "a.parquet", runtime="onnx", cache_dir=tmp_path / "c"))
    checked = sidecar_local(first)["job_fidelity"]
    assert sidecar_local(first)["selection"]["chosen"] == "onnx int8" and checked["min"] >= 0.98 and "remembered" not in checked
    again = embed_file(EmbedOptions(input=src, output=tmp_path / "b.parquet", runtime="onnx", cache_dir=tmp_path / "c"))
    local = sidecar_local(again)
    assert again.document["metrics"]["texts_computed"] == 0
    assert local["model_loaded"] is False and local["job_fidelity"] == dict(checked, remembered=True)
    assert local["fingerprint"] == sidecar_local(first)["fingerprint"]


@pytest.mark.parametrize("runtime, quantize, bar", [("onnx", "int8", 0.98), ("openvino", "none", 0.9999)])
def test_a_cached_export_starts_without_torch_or_transformers(tmp_path: Path, onnx_dir: Path, st_model, runtime: str,
                                                              quantize: str, bar: float) -> None:
    if runtime == "openvino":
        pytest.importorskip("openvino")  # hfbatch[openvino]: in the dev extras, so CI runs it
    LocalBackend(DEFAULT, runtime=runtime, quantize=quantize).embed(["make the export and prove it"])
    src = write_csv(tmp_path / "in.csv", rows_for(TEXTS))
    out = tmp_path / "o.parquet"
    code = ("import sys, json; from hfbatch import embed_file, EmbedOptions; "
            f"r = embed_file(EmbedOptions(input={str(src)!r}, output={str(out)!r}, runtime={runtime!r}, quantize={quantize!r})); "
            "local = r.document['provenance']['backends']['local']; "
            "print(json.dumps([local['tokenizer'], local['runtime'], "
            "[m for m in ('torch', 'transformers', 'sentence_transformers') if m in sys.modules]]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ), timeout=300)
    assert done.returncode == 0, done.stderr
    tokenizer, ran, heavy = json.loads(done.stdout.strip().splitlines()[-1])
    assert (tokenizer, ran, heavy) == ("tokenizers", runtime, [])
    assert (vectors(out) * st_model.encode(TEXTS)).sum(1).min() > bar


def test_the_fast_tokenizer_is_trusted_only_where_it_gives_the_same_ids(tmp_path: Path) -> None:
    fast, slow = load_fast(BUNDLED_MODEL_DIR), load_transformers(BUNDLED_MODEL_DIR, DEFAULT)
    assert fast is not None and same_ids(fast, slow)
    texts = ["Héllo WORLD", "x" * 3000, "", "query: two  spaces"]
    assert fast.count(texts) == slow.count(texts) and fast.count(texts, "query: ") == slow.count(texts, "query: ")
    tampered = tmp_path / "model"
    tampered.mkdir()
    for f in BUNDLED_MODEL_DIR.glob("*.json"):
        (tampered / f.name).write_bytes(f.read_bytes())
    (tampered / "vocab.txt").write_bytes((BUNDLED_MODEL_DIR / "vocab.txt").read_bytes())
    spec = json.loads((tampered / "tokenizer.json").read_text())
    spec["normalizer"]["lowercase"] = False  # transformers lowercases anyway (tokenizer_config.json says so)
    (tampered / "tokenizer.json").write_text(json.dumps(spec))
    changed = load_fast(tampered)
    assert changed is not None and not same_ids(changed, load_transformers(tampered, "tampered"))


def test_a_damaged_cached_export_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, onnx_dir: Path) -> None:
    LocalBackend(DEFAULT, runtime="onnx").embed(["make the export"])
    backend = LocalBackend(DEFAULT, runtime="onnx")
    folder = onnx_dir / "onnx" / backend.model_key()
    copy = tmp_path / "exports"
    (copy / "onnx" / folder.name).mkdir(parents=True)
    (copy / "onnx" / folder.name / "meta.json").write_bytes((folder / "meta.json").read_bytes())
    (copy / "onnx" / folder.name / "model.onnx").write_bytes(b"not an onnx graph")
    monkeypatch.setenv("HFBATCH_ONNX_DIR", str(copy))
    with pytest.raises(ModelLoadError, match=r"ONNX Runtime cannot load .*model\.onnx .*delete it to export again"):
        LocalBackend(DEFAULT, runtime="onnx").embed(["x"])


def test_a_many_part_job_settles_once_and_redoes_parts_made_otherwise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hfbatch.engines.parts import run_embed_parts

    monkeypatch.setattr(selection, "EXPORT_RUNTIMES", {"onnx": "onnxruntime"})
    monkeypatch.setattr(selection, "cpu_has_native_bf16", lambda: False)
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(3):
        write_csv(inputs / f"p{i}.csv", rows_for(TEXTS[i * 5:(i + 1) * 5]))
    probe = LocalBackend(DEFAULT, runtime="auto", precision="auto", quantize="none")
    plant(probe, [entry(("torch", "fp32", "none"), 6.0, 50.0), entry(("onnx", "fp32", "none"), 0.3, 100.0)])
    options = EmbedOptions(input=inputs, output=tmp_path / "out", quantize="none")
    first = run_embed_parts(options)

    def part_prints() -> set[str]:
        return {json.loads(p.read_text())["provenance"]["fingerprint"] for p in (tmp_path / "out" / "_hfbatch").glob("*.meta.json")}

    assert len(part_prints()) == 1 and first.document["parts"][0]["status"] == "done"
    assert part_prints() == {LocalBackend(DEFAULT, runtime="onnx").fingerprint()}
    # the measurements now favour torch (say, a library upgrade was measured): every part is redone with it
    plant(probe, [entry(("torch", "fp32", "none"), 6.0, 500.0), entry(("onnx", "fp32", "none"), 0.3, 100.0)])
    second = run_embed_parts(options)
    assert [p["status"] for p in second.document["parts"]] == ["done"] * 3
    assert part_prints() == {LocalBackend(DEFAULT).fingerprint()}
    third = run_embed_parts(options)  # nothing changed: every part is resumed
    assert [p["status"] for p in third.document["parts"]] == ["skipped"] * 3


def test_openvino_int8_is_int8_weights_with_dynamic_activations_and_weighed_by_auto(tmp_path: Path, st_model) -> None:
    pytest.importorskip("nncf")  # hfbatch[openvino]: in the dev extras, so CI runs it
    assert ("openvino", "fp32", "int8") in selection.candidates("auto", "auto", "auto", cpu_only=True)
    src = write_csv(tmp_path / "in.csv", rows_for(TEXTS))
    forced = embed_file(EmbedOptions(input=src, output=tmp_path / "o.parquet", runtime="openvino", quantize="int8"))
    local = sidecar_local(forced)
    assert local["runtime"] == "openvino" and local["quantize"].startswith("int8-wdq128-")
    assert local["onnx_fidelity"]["mean"] >= 0.99 and local["onnx_fidelity"]["min"] >= 0.98
    assert local["job_fidelity"]["min"] >= 0.98 and local["job_fidelity"]["texts"] > 0
    got, want = vectors(forced.output), st_model.encode(TEXTS)
    cosine = (got * want).sum(1)
    assert cosine.min() > 0.99 and not np.allclose(got, want, atol=1e-3)  # faithful, and really int8


def test_a_dry_run_measures_nothing_and_says_the_job_will(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hfbatch.tools.dry_run import plan_embed

    monkeypatch.setenv("HFBATCH_ONNX_DIR", str(tmp_path / "fresh"))  # a machine that measured nothing yet
    src = write_csv(tmp_path / "in.csv", rows_for(TEXTS))
    report = plan_embed(EmbedOptions(input=src, output=tmp_path / "o.parquet"))
    assert report["rows"] == len(TEXTS)
    assert not (tmp_path / "fresh" / "choices").exists() and not (tmp_path / "fresh" / "onnx").exists()
    assert not (tmp_path / "o.parquet").exists()
