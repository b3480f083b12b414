"""--runtime/--precision auto: faithful configurations only (int8 when asked), one choice per model
and machine (never by job size or options), measured once within the memory guard, chosen only
when something is computed; the exports it leaves on disk proved whole; `hfbatch tune`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import BUNDLED_MODEL_DIR, SAMPLE_TEXTS, rows_for, write_csv
from hfbatch import EmbedOptions, InputError
import hfbatch
from hfbatch.backends import selection
from hfbatch.backends.fidelity import label
from hfbatch.backends.local import LocalBackend
from hfbatch.backends.tokenizer import load_fast, load_transformers, same_ids

DEFAULT = "sentence-transformers/all-MiniLM-L6-v2"
TEXTS = [f"{t} (review {i})" for i, t in enumerate(SAMPLE_TEXTS * 4)]
TORCH, ONNX = ("torch", "fp32", "none"), ("onnx", "fp32", "none")


@pytest.fixture(autouse=True)
def auto_runtime(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests are about auto: undo the suite's torch fp32 pin (conftest)."""
    monkeypatch.delenv("HFBATCH_RUNTIME")
    monkeypatch.delenv("HFBATCH_PRECISION")


@pytest.fixture
def two_candidates(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A machine of its own (exports and records in tmp_path) whose faithful candidates are torch
    fp32 and ONNX Runtime fp32: measuring takes seconds, not the minute of every runtime."""
    monkeypatch.setattr(selection, "EXPORT_RUNTIMES", {"onnx": "onnxruntime"})
    monkeypatch.setattr(selection, "cpu_has_native_bf16", lambda: False)
    root = tmp_path / "machine"  # exports under root/onnx, records under root/choices
    monkeypatch.setenv("HFBATCH_ONNX_DIR", str(root))
    return root


def vectors(path: Path) -> np.ndarray:
    return np.array(pq.read_table(path).column("embedding").to_pylist(), dtype=np.float32)


def sidecar_local(result: Any) -> dict[str, Any]:
    return result.document["provenance"]["backends"]["local"]


def entry(config: tuple[str, str, str], rate: float, accepted: bool = True) -> dict[str, Any]:
    return {"config": list(config), "label": label(config), "texts_per_s": rate,
            "fidelity": {"mean": 0.99999, "min": 0.9999}, "accepted": accepted}


def plant(backend: LocalBackend, entries: list[dict[str, Any]], pinned: list[str] | None = None) -> Path:
    """A record of measurements for this machine and model, as if measured before."""
    path = selection.record_path(backend)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"format": selection.RECORD_FORMAT, "model_id": DEFAULT, "machine": selection.machine(),
                                "measured_at": "2026-12-01T00:00:00+00:00", "candidates": entries, "pinned": pinned}))
    return path


def test_the_default_considers_only_faithful_configurations(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(selection, "cpu_has_native_bf16", lambda: False)
    faithful = selection.candidates("auto", "auto", "none", cpu_only=True)
    assert TORCH in faithful and all(q == "none" and p == "fp32" for _, p, q in faithful)
    assert ONNX in faithful  # onnxruntime is in the dev extras
    if ("openvino", "fp32", "none") in faithful:
        assert ("openvino", "bf16", "none") not in faithful  # bf16 only where the CPU has it natively
    monkeypatch.setattr(selection, "cpu_has_native_bf16", lambda: True)
    native = selection.candidates("auto", "auto", "none", cpu_only=True)
    assert ("torch", "bf16", "none") in native and not any(q == "int8" for _, _, q in native)
    # int8 only when asked, and then only int8
    asked = selection.candidates("auto", "auto", "int8", cpu_only=True)
    assert ("onnx", "fp32", "int8") in asked and all(q == "int8" for _, _, q in asked)
    # the library default (--quantize auto) and ENABLE_MODEL_QUANTIZATION unset: faithful, one identity
    assert LocalBackend(DEFAULT, runtime="auto", precision="auto", quantize="auto").identity() == "faithful"
    assert LocalBackend(DEFAULT, runtime="onnx", precision="auto", quantize="int8").identity().startswith("int8:int8-")
    with pytest.raises(InputError, match="no runtime fits"):
        selection.candidates("onnx", "bf16", "none", cpu_only=True)


def test_one_measurement_per_model_and_machine_whatever_the_job(two_candidates: Path, tmp_path: Path, st_model) -> None:
    src = write_csv(tmp_path / "in.csv", rows_for(TEXTS))
    first = hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "a.parquet", use_cache=False))
    local = sidecar_local(first)
    record_file = Path(local["selection"]["measurements"])
    record = json.loads(record_file.read_text())
    assert {c["label"] for c in record["candidates"]} == {"torch fp32", "onnx fp32"}
    assert all(c["accepted"] and c["texts_per_s"] > 0 and c["fidelity"]["min"] >= 0.999 for c in record["candidates"])
    fastest = max(record["candidates"], key=lambda c: c["texts_per_s"])["label"]
    assert local["selection"] == {**local["selection"], "chosen": fastest, "by": "measured on this machine"}
    stages = first.document["metrics"]["stage_seconds"]
    assert stages["measure"] > 0  # booked apart from the embedding itself...
    assert sum(stages.values()) == pytest.approx(first.document["metrics"]["wall_seconds"], rel=0.05)  # ...adding up
    assert (vectors(first.output) * st_model.encode(TEXTS)).sum(1).min() > 0.9999
    stamp = record_file.stat().st_mtime_ns
    exports = sorted(p.name for p in (two_candidates / "onnx").rglob("*.onnx"))
    # options that do not change which runtime is fastest, and the same model in another folder
    copy = tmp_path / "copied-model"
    shutil.copytree(BUNDLED_MODEL_DIR, copy)
    for i, extra in enumerate([dict(normalize=False), dict(max_length=128), dict(prompt="query: "),
                               dict(model=str(copy)), dict()]):
        again = hfbatch.embed(EmbedOptions(input=src, output=tmp_path / f"b{i}.parquet", use_cache=False, **extra))
        assert sidecar_local(again)["selection"]["chosen"] == fastest, extra
        assert again.document["metrics"]["stage_seconds"]["measure"] == 0, extra
    assert record_file.stat().st_mtime_ns == stamp  # measured nothing again
    assert sorted(p.name for p in (two_candidates / "onnx").rglob("*.onnx")) == exports  # exported nothing again


def test_the_choice_and_the_vectors_do_not_depend_on_the_jobs_size(two_candidates: Path, tmp_path: Path) -> None:
    probe = LocalBackend(DEFAULT, runtime="auto", precision="auto", quantize="auto")
    plant(probe, [entry(TORCH, 50.0), entry(ONNX, 80.0)])
    query = "how long does the battery last?"
    one = hfbatch.embed(EmbedOptions(input=write_csv(tmp_path / "q.csv", rows_for([query])), output=tmp_path / "q.parquet",
                                  use_cache=False))
    many = [query] + [f"document {i}: {t}" for i, t in enumerate(SAMPLE_TEXTS * 40)]
    big = hfbatch.embed(EmbedOptions(input=write_csv(tmp_path / "d.csv", rows_for(many)), output=tmp_path / "d.parquet",
                                  use_cache=False))
    assert sidecar_local(one)["selection"]["chosen"] == sidecar_local(big)["selection"]["chosen"] == "onnx fp32"
    a, b = vectors(one.output)[0], vectors(big.output)[0]
    assert float(a @ b) >= 0.99999


def test_faithful_runtimes_share_one_cache_and_a_cached_job_chooses_nothing(two_candidates: Path, tmp_path: Path) -> None:
    src = write_csv(tmp_path / "in.csv", rows_for(TEXTS))
    torch_run = hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "t.parquet", runtime="torch", precision="fp32"))
    assert torch_run.document["metrics"]["texts_computed"] == len(set(TEXTS))
    # this machine never measured: a job whose every vector is cached measures, exports and loads nothing
    auto = hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "a.parquet"))
    local = sidecar_local(auto)
    assert auto.document["metrics"]["texts_computed"] == 0 and local["model_loaded"] is False
    assert local["runtime"] is None and local["selection"] is None and local["vectors"] == "faithful"
    assert not (two_candidates / "choices").exists() and not list((two_candidates / "onnx").rglob("*.onnx"))
    # ...and an ONNX job is served what torch computed: one identity
    onnx = hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "o.parquet", runtime="onnx"))
    assert onnx.document["metrics"]["texts_computed"] == 0
    assert np.array_equal(vectors(onnx.output), vectors(torch_run.output))


def test_int8_never_runs_unasked_even_when_measured_fastest(two_candidates: Path, tmp_path: Path, st_model) -> None:
    probe = LocalBackend(DEFAULT, runtime="auto", precision="auto", quantize="auto")
    plant(probe, [entry(TORCH, 50.0), entry(ONNX, 60.0), entry(("onnx", "fp32", "int8"), 500.0)])
    src = write_csv(tmp_path / "in.csv", rows_for(TEXTS))
    result = hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "o.parquet", use_cache=False))
    local = sidecar_local(result)
    assert local["selection"]["chosen"] == "onnx fp32" and local["quantize"] == "none"
    assert (vectors(result.output) * st_model.encode(TEXTS)).sum(1).min() > 0.9999


def test_a_pin_and_tune(two_candidates: Path, tmp_path: Path) -> None:
    from hfbatch.tools.tune import tune

    report = tune(DEFAULT)
    assert {c["label"] for c in report["candidates"]} == {"torch fp32", "onnx fp32"} and report["pinned"] is None
    slower = min(report["candidates"], key=lambda c: c["texts_per_s"])["label"]
    record = Path(report["record"])
    measured = json.loads(record.read_text())["measured_at"]
    pinned = tune(DEFAULT, pin=slower)  # pinned from what was measured: nothing measured again
    assert pinned["chosen"] == pinned["pinned"] == slower
    assert json.loads(record.read_text())["measured_at"] == measured
    src = write_csv(tmp_path / "in.csv", rows_for(TEXTS[:3]))
    job = hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "o.parquet", use_cache=False))
    assert sidecar_local(job)["selection"]["chosen"] == slower and sidecar_local(job)["selection"]["by"] == "pinned"
    with pytest.raises(InputError, match="not an accepted configuration"):
        tune(DEFAULT, pin="openvino int4", measure=False)
    assert tune(DEFAULT, unpin=True, measure=False)["pinned"] is None


def test_a_record_not_of_the_shape_written_is_measured_again_not_trusted(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    for planted in ({"format": selection.RECORD_FORMAT, "candidates": "x"},
                    {"format": selection.RECORD_FORMAT, "candidates": [{"config": ["torch"], "label": "x"}]},
                    {"format": selection.RECORD_FORMAT, "candidates": [], "pinned": "torch"},
                    {"format": selection.RECORD_FORMAT, "candidates": [{"config": list(TORCH), "texts_per_s": "fast"}]},
                    {"format": 3, "candidates": []}, [1, 2]):
        path.write_text(json.dumps(planted))
        assert selection.read_record(path) == {}


def test_a_chosen_configuration_that_will_not_load_is_refused_and_the_next_runs(two_candidates: Path, tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch,
                                                                               st_model) -> None:
    from hfbatch.backends import onnx_runner as onnx_backend

    probe = LocalBackend(DEFAULT, runtime="auto", precision="auto", quantize="auto")
    record = plant(probe, [entry(TORCH, 50.0), entry(ONNX, 80.0)])

    class Broken:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise RuntimeError("[ONNXRuntimeError] : 10 : INVALID_GRAPH : this runtime build cannot run it")

    monkeypatch.setattr(onnx_backend, "OnnxRunner", Broken)
    src = write_csv(tmp_path / "in.csv", rows_for(TEXTS))
    result = hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "o.parquet", use_cache=False))
    local = sidecar_local(result)
    assert local["selection"]["chosen"] == "torch fp32"
    assert local["selection"]["passed_over"][0]["label"] == "onnx fp32"
    assert "does not load after a rebuild" in local["selection"]["passed_over"][0]["reason"]
    assert (vectors(result.output) * st_model.encode(TEXTS)).sum(1).min() > 0.9999
    onnx_entry = next(c for c in json.loads(record.read_text())["candidates"] if c["label"] == "onnx fp32")
    assert onnx_entry["accepted"] is False and "INVALID_GRAPH" in onnx_entry["reason"]  # the next job goes straight on


def test_a_damaged_export_is_rebuilt_not_blamed_on_the_model(two_candidates: Path, tmp_path: Path, st_model) -> None:
    src = write_csv(tmp_path / "in.csv", rows_for(TEXTS))
    hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "a.parquet", runtime="onnx", use_cache=False))
    (export,) = (two_candidates / "onnx").rglob("model.onnx")
    export.write_bytes(export.read_bytes()[: export.stat().st_size // 2])  # truncated
    again = hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "b.parquet", runtime="onnx", use_cache=False))
    assert again.document["metrics"]["stage_seconds"]["export"] > 0  # made again, and proved
    assert (vectors(again.output) * st_model.encode(TEXTS)).sum(1).min() > 0.9999


def _tamper(path: Path) -> None:
    """Negate bytes in the middle of `path`, keeping its size and its modification time."""
    info = path.stat()
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4096] = bytes(255 - b for b in data[middle:middle + 4096])
    path.write_bytes(bytes(data))
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))
    assert path.stat().st_size == info.st_size and path.stat().st_mtime_ns == info.st_mtime_ns


@pytest.mark.parametrize("runtime, quantize, tampered", [("onnx", "none", "model.onnx"),
                                                         ("openvino", "int8", "openvino.*.bin")])
def test_tampered_exports_are_made_again_never_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, st_model,
                                                   runtime: str, quantize: str, tampered: str) -> None:
    if runtime == "openvino":
        pytest.importorskip("nncf")  # hfbatch[openvino]: in the dev extras, so CI runs it
    monkeypatch.setenv("HFBATCH_ONNX_DIR", str(tmp_path / "exports"))
    src = write_csv(tmp_path / "in.csv", rows_for(TEXTS))
    opts = dict(runtime=runtime, quantize=quantize, use_cache=False)
    good = vectors(hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "a.parquet", **opts)).output)
    (target,) = (tmp_path / "exports").rglob(tampered)
    _tamper(target)
    # a compiled blob of another graph where OpenVINO's model cache would look: never read
    blobs = target.parent / "openvino-cache"
    blobs.mkdir(exist_ok=True)
    (blobs / "0123456789abcdef.blob").write_bytes(os.urandom(4096))
    again = hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "b.parquet", **opts))
    assert again.document["metrics"]["stage_seconds"]["export"] > 0  # the changed file was not trusted: made again
    bar = 0.98 if quantize == "int8" else 0.9999
    assert (vectors(again.output) * st_model.encode(TEXTS)).sum(1).min() >= bar
    assert np.allclose(vectors(again.output), good, atol=1e-2)


def test_measuring_stays_within_the_memory_guard(tmp_path: Path) -> None:
    """MAX_MODEL_MEMORY_GB=0.4: candidates measured one at a time and released between, each
    within the guard; the first run's peak is compared with the same job run on torch fp32,
    measuring nothing, with the runtimes' libraries loaded as the measuring process has them."""
    src = write_csv(tmp_path / "in.csv", rows_for(TEXTS))
    code = (
        "import json, sys, importlib.util\n"
        # the runtimes' libraries, as the measuring process holds them (code, not models): the base
        "if importlib.util.find_spec('onnxruntime'): import onnxruntime\n"
        "if importlib.util.find_spec('openvino'):\n"
        "    import openvino; openvino.Core().get_property('CPU', 'FULL_DEVICE_NAME')\n"
        "from hfbatch import embed, EmbedOptions\n"
        f"r = embed(EmbedOptions(input={str(src)!r}, output=sys.argv[1], use_cache=False))\n"
        "hwm = next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
        "print(json.dumps({'hwm': hwm, 'selection': r.document['provenance']['backends']['local']['selection']}))\n"
    )

    def run(out: str, **env: str) -> dict[str, Any]:
        done = subprocess.run([sys.executable, "-c", code, str(tmp_path / out)], capture_output=True, text=True,
                              env={**os.environ, "HFBATCH_ONNX_DIR": str(tmp_path / "exports"), **env}, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    base = run("torch.parquet", HFBATCH_RUNTIME="torch", HFBATCH_PRECISION="fp32")
    assert base["selection"]["by"] == "asked for"
    first = run("auto.parquet", MAX_MODEL_MEMORY_GB="0.4", HFBATCH_RUNTIME="auto", HFBATCH_PRECISION="auto")
    assert first["selection"]["by"] == "measured on this machine"
    record = json.loads(Path(first["selection"]["measurements"]).read_text())
    measured = [c for c in record["candidates"] if "memory_mb" in c]
    assert len(measured) >= 2
    assert all(c["memory_mb"] <= 400 for c in record["candidates"] if c["accepted"])  # each within the guard
    # one at a time: the first run's peak over a plain run is under all the candidates held at once
    # (the code before measured all together: 2.25 GB); what the released runtimes leave to the
    # allocators keeps it at ~0.40-0.47 GB here, not under the guard itself (said in the issue note)
    together = sum(c["memory_mb"] for c in measured) * 2**20
    assert first["hwm"] - base["hwm"] < together, ((first["hwm"] - base["hwm"]) / 1e9, together / 1e9)


def test_a_cached_export_starts_without_torch_or_transformers(tmp_path: Path, st_model) -> None:
    LocalBackend(DEFAULT, runtime="onnx").embed(["make the export and prove it"])
    src = write_csv(tmp_path / "in.csv", rows_for(TEXTS))
    out = tmp_path / "o.parquet"
    code = ("import sys, json; from hfbatch import embed, EmbedOptions; "
            f"r = embed(EmbedOptions(input={str(src)!r}, output={str(out)!r}, runtime='onnx')); "
            "local = r.document['provenance']['backends']['local']; "
            "print(json.dumps([local['tokenizer'], local['runtime'], "
            "[m for m in ('torch', 'transformers', 'sentence_transformers') if m in sys.modules]]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ), timeout=300)
    assert done.returncode == 0, done.stderr
    tokenizer, ran, heavy = json.loads(done.stdout.strip().splitlines()[-1])
    assert (tokenizer, ran, heavy) == ("tokenizers", "onnx", [])
    assert (vectors(out) * st_model.encode(TEXTS)).sum(1).min() > 0.9999


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


def test_a_fully_cached_many_part_job_loads_no_model(two_candidates: Path, tmp_path: Path) -> None:
    from hfbatch.engines.parts import run_embed_parts

    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(4):
        write_csv(inputs / f"p{i}.csv", rows_for(TEXTS[i * 5:(i + 1) * 5]))
    first = run_embed_parts(EmbedOptions(input=inputs, output=tmp_path / "out"))
    assert [p["status"] for p in first.document["parts"]] == ["done"] * 4
    record = next((two_candidates / "choices").glob("*.json"))
    measured = json.loads(record.read_text())["measured_at"]
    second = run_embed_parts(EmbedOptions(input=inputs, output=tmp_path / "again"))
    assert [p["status"] for p in second.document["parts"]] == ["done"] * 4
    sidecars = [json.loads(p.read_text()) for p in (tmp_path / "again" / "_hfbatch").glob("*.meta.json")]
    assert len(sidecars) == 4 and all(s["metrics"]["texts_computed"] == 0 for s in sidecars)
    assert not any(s["provenance"]["backends"]["local"]["model_loaded"] for s in sidecars)
    assert json.loads(record.read_text())["measured_at"] == measured
    prints = {s["provenance"]["fingerprint"] for s in sidecars}
    assert prints == {LocalBackend(DEFAULT).fingerprint()}  # every part, one identity


def test_a_dry_run_measures_nothing_and_says_the_job_will(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hfbatch.tools.dry_run import plan_embed

    monkeypatch.setenv("HFBATCH_ONNX_DIR", str(tmp_path / "fresh"))  # a machine that measured nothing yet
    src = write_csv(tmp_path / "in.csv", rows_for(TEXTS))
    report = plan_embed(EmbedOptions(input=src, output=tmp_path / "o.parquet"))
    assert report["rows"] == len(TEXTS)
    assert report["runtime"]["chosen"] == "torch fp32" and "the job will measure" in report["runtime"]["by"]
    assert not (tmp_path / "fresh" / "choices").exists() and not (tmp_path / "fresh" / "onnx").exists()
    assert not (tmp_path / "o.parquet").exists()


def test_a_usage_error_is_found_before_any_measuring(two_candidates: Path, tmp_path: Path) -> None:
    """int8 ranges from one text: refused (exit 2) before this fresh machine measures or exports anything."""
    from hfbatch import InputError as UsageError

    src = write_csv(tmp_path / "in.csv", rows_for(TEXTS))
    one = write_csv(tmp_path / "one.csv", rows_for(["only one calibration text"]))
    with pytest.raises(UsageError, match="has 1 valid text to take --output-precision int8 ranges"):
        hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "o.parquet", output_precision="int8", calibration=one))
    assert not (two_candidates / "choices").exists() and not (two_candidates / "onnx").exists()
    assert not (tmp_path / "o.parquet").exists()


def test_a_planted_export_entry_can_neither_load_nor_delete_a_file_outside_its_folder(two_candidates: Path,
                                                                                     tmp_path: Path, st_model) -> None:
    from hfbatch.backends.exports import file_digest

    src = write_csv(tmp_path / "in.csv", rows_for(TEXTS))
    hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "a.parquet", runtime="onnx", use_cache=False))
    (meta_path,) = (two_candidates / "onnx").rglob("meta.json")
    victim = tmp_path / "precious.txt"
    victim.write_text("not an export")
    meta = json.loads(meta_path.read_text())
    entry = meta["variants"]["onnx-fp32"]
    entry.update(file=str(victim), files=[str(victim), "../../precious.txt"], digests={str(victim): file_digest(victim)})
    meta_path.write_text(json.dumps(meta))
    again = hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "b.parquet", runtime="onnx", use_cache=False))
    assert victim.read_text() == "not an export"  # neither loaded nor deleted
    assert (vectors(again.output) * st_model.encode(TEXTS)).sum(1).min() > 0.9999


def test_another_models_export_folder_copied_in_is_made_again(two_candidates: Path, tmp_path: Path, st_model) -> None:
    src = write_csv(tmp_path / "in.csv", rows_for(TEXTS))
    hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "a.parquet", runtime="onnx", use_cache=False))
    (meta_path,) = (two_candidates / "onnx").rglob("meta.json")
    meta = json.loads(meta_path.read_text())
    meta["key"] = "0" * 32  # the folder (its proofs, its torch reference) of another model, copied over this one's
    meta_path.write_text(json.dumps(meta))
    again = hfbatch.embed(EmbedOptions(input=src, output=tmp_path / "b.parquet", runtime="onnx", use_cache=False))
    assert again.document["metrics"]["stage_seconds"]["export"] > 0  # its proofs were not taken as this model's
    assert json.loads(meta_path.read_text())["key"] == LocalBackend(DEFAULT).weights_key()
    assert (vectors(again.output) * st_model.encode(TEXTS)).sum(1).min() > 0.9999


def test_half_precision_that_changes_with_the_batch_is_not_a_default_candidate(two_candidates: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16's rounding follows the batch's shape: a text alone and in a padded batch differ by ~1e-5,
    so a 1-row query job would not match its documents at 0.99999. Measured, and refused for that."""
    monkeypatch.setattr(selection, "cpu_has_native_bf16", lambda: True)
    backend = LocalBackend(DEFAULT, runtime="torch", precision="auto", quantize="none")
    entries = {e["label"]: e for e in selection.measure_configs(backend, backend.candidates())}
    assert entries["torch fp32"]["accepted"] and "alone_vs_batched" not in entries["torch fp32"]
    bf16 = entries["torch bf16"]
    assert bf16["fidelity"]["mean"] >= 0.9999  # faithful to the model...
    if not bf16["accepted"]:  # ...but not the same vector alone and batched
        assert bf16["alone_vs_batched"] < 0.99999 and "depends on the batch" in bf16["reason"]
    else:
        assert bf16["alone_vs_batched"] >= 0.99999


def test_a_process_waiting_for_a_measurement_says_so_before_it_waits(tmp_path: Path) -> None:
    """Two first runs of one model: the second waits for the first one's measurement, and says
    so when it starts waiting (not after: a silent minute looks like a hang); a free lock is quiet."""
    import threading

    from filelock import FileLock

    record = tmp_path / "choices" / "model.json"
    said: list[str] = []
    with selection.lock(record, said.append):
        pass
    assert said == []  # nobody else measuring: nothing to say
    held = FileLock(str(record) + ".lock")
    held.acquire()
    inside = threading.Event()

    def second() -> None:
        with selection.lock(record, said.append):
            inside.set()

    waiter = threading.Thread(target=second)
    waiter.start()
    deadline = time.monotonic() + 10
    while not said and time.monotonic() < deadline:
        time.sleep(0.01)
    assert said and "waiting for another process" in said[0]
    assert not inside.is_set()  # said while still waiting
    held.release()
    waiter.join(10)
    assert inside.is_set()
