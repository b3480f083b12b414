"""hfbatch generate with a tiny real causal LM (2-layer GPT-2 and a BPE tokenizer trained here),
saved to disk and loaded through the same code path as any hub model."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import write_csv, write_jsonl
from hfbatch.backends.generation import GenerationParams, LocalGenerator
from hfbatch.errors import InputError
from hfbatch.jobs.generate import GenerateOptions, run_generate

PROMPTS = ["The kettle", "Battery life is", "Arrived broken and", "The kettle", "A very long prompt " * 30]


def _run(tmp_path: Path, model: Path, name: str = "out.parquet", **kw):
    src = write_jsonl(tmp_path / "prompts.jsonl", [{"id": i, "prompt": p} for i, p in enumerate(PROMPTS)])
    return run_generate(GenerateOptions(input=src, output=tmp_path / name, model=str(model), **kw))


def test_generates_deterministically_with_truncation_marks(tmp_path: Path, tiny_lm: Path) -> None:
    params = GenerationParams(max_new_tokens=8)
    first = _run(tmp_path, tiny_lm, params=params, batch_size=2)
    table = pq.read_table(first.output)
    assert table.column("id").to_pylist() == list(range(len(PROMPTS)))
    texts = table.column("generated_text").to_pylist()
    assert all(isinstance(t, str) for t in texts) and texts[0] == texts[3]  # same prompt, same text
    n_new = table.column("n_generated_tokens").to_pylist()
    reasons = table.column("finish_reason").to_pylist()
    assert all(1 <= k <= 8 for k in n_new) and set(reasons) <= {"stop", "length"}
    assert all(r == "stop" for r, k in zip(reasons, n_new) if k < 8)
    truncated = table.column("prompt_truncated").to_pylist()
    assert truncated == [False, False, False, False, True]  # 64 positions - 8 new tokens = 56 for the prompt
    assert table.column("n_prompt_tokens")[4].as_py() == 56
    second = _run(tmp_path, tiny_lm, name="again.parquet", params=params, batch_size=5)
    assert pq.read_table(second.output).column("generated_text").to_pylist() == texts
    assert second.document["metrics"]["cache"]["hits"] == len(set(PROMPTS))  # greedy results are cached
    assert second.document["metrics"]["prompts_computed"] == 0
    meta = json.loads(second.sidecar.read_text())
    assert meta["provenance"]["job"] == "generate" and meta["metrics"]["rows_total"] == len(PROMPTS)


def test_batched_equals_one_by_one_under_greedy(tmp_path: Path, tiny_lm: Path) -> None:
    generator = LocalGenerator(str(tiny_lm), device="cpu", params=GenerationParams(max_new_tokens=6))
    prepared = generator.prepare(PROMPTS)
    batched = generator.generate(prepared)
    alone = [generator.generate([p])[0] for p in prepared]
    assert batched == alone  # left padding does not change what a prompt produces


def test_sampling_without_seed_is_not_cached_and_chat_template(tmp_path: Path, tiny_lm: Path) -> None:
    sampled = _run(tmp_path, tiny_lm, params=GenerationParams(max_new_tokens=4, temperature=0.8), use_cache=True)
    assert sampled.document["metrics"]["cache"]["enabled"] is False
    seeded = _run(tmp_path, tiny_lm, name="s1.parquet", params=GenerationParams(max_new_tokens=4, temperature=0.8, seed=3))
    again = _run(tmp_path, tiny_lm, name="s2.parquet", params=GenerationParams(max_new_tokens=4, temperature=0.8, seed=3))
    assert again.document["metrics"]["cache"]["hits"] > 0
    assert pq.read_table(seeded.output).column("generated_text").to_pylist() == \
        pq.read_table(again.output).column("generated_text").to_pylist()
    chat = LocalGenerator(str(tiny_lm), params=GenerationParams(max_new_tokens=4, chat=True))
    ids = chat.prepare(["hello"])[0].ids
    assert chat.tokenizer.decode(ids).startswith("<|user|>hello") and chat.tokenizer.decode(ids).endswith("<|assistant|>")


def test_bad_prompts_and_options(tmp_path: Path, tiny_lm: Path) -> None:
    src = write_csv(tmp_path / "p.csv", [{"id": 1, "prompt": "fine"}, {"id": 2, "prompt": ""}])
    result = run_generate(GenerateOptions(input=src, output=tmp_path / "o.parquet", model=str(tiny_lm),
                                          params=GenerationParams(max_new_tokens=3)))
    table = pq.read_table(result.output)
    assert table.column("generation_error").to_pylist() == [None, "empty text"]
    assert table.column("generated_text")[1].as_py() is None
    with pytest.raises(InputError, match="leaves no room for a prompt"):
        run_generate(GenerateOptions(input=src, output=tmp_path / "x.parquet", model=str(tiny_lm),
                                     params=GenerationParams(max_new_tokens=64)))
    assert not (tmp_path / "x.parquet").exists()
    with pytest.raises(InputError, match="has no column 'prompt'"):
        run_generate(GenerateOptions(input=write_csv(tmp_path / "q.csv", [{"q": "x"}]), output=tmp_path / "y.parquet",
                                     model=str(tiny_lm)))


def test_generate_command(tmp_path: Path, tiny_lm: Path) -> None:
    from typer.testing import CliRunner

    from hfbatch.cli import app

    src = write_jsonl(tmp_path / "prompts.jsonl", [{"id": 1, "prompt": "The kettle"}, {"id": 2, "prompt": "Battery"}])
    result = CliRunner().invoke(app, ["generate", str(src), "-o", str(tmp_path / "a.parquet"), "--local", "--model",
                                      str(tiny_lm), "--max-new-tokens", "4", "--temperature", "0", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["metrics"]["rows_generated"] == 2 and pq.read_table(tmp_path / "a.parquet").num_rows == 2
    bad = CliRunner().invoke(app, ["generate", str(src), "-o", str(tmp_path / "b.parquet"), "--backend", "tei", "--model", "x"])
    assert bad.exit_code == 2 and "--backend 'tei' is not one of: local, api" in bad.stderr
    both = CliRunner().invoke(app, ["generate", str(src), "-o", str(tmp_path / "b.parquet"), "--local", "--backend", "api",
                                    "--model", "x"])
    assert both.exit_code == 2 and "contradict" in both.stderr


def test_generate_shares_the_output_checks(tmp_path: Path, tiny_lm: Path) -> None:
    src = write_csv(tmp_path / "p.csv", [{"id": 1, "prompt": "x", "generated_text": "old"}])
    (tmp_path / "dir.parquet").mkdir()
    for output, message in ((tmp_path / "dir.parquet", "is a directory"), (tmp_path / "o.csv", "give it a .parquet name")):
        with pytest.raises(InputError, match=message):
            run_generate(GenerateOptions(input=src, output=output, model=str(tiny_lm), keep=["id"]))
    with pytest.raises(InputError, match="already has column\\(s\\) generated_text"):
        run_generate(GenerateOptions(input=src, output=tmp_path / "o.parquet", model=str(tiny_lm)))


def test_precision_bf16_loads_bf16_weights_in_its_own_cache_namespace(tmp_path: Path, tiny_lm: Path) -> None:
    fp32 = LocalGenerator(str(tiny_lm), device="cpu", params=GenerationParams(max_new_tokens=4))
    bf16 = LocalGenerator(str(tiny_lm), device="cpu", params=GenerationParams(max_new_tokens=4), precision="bf16")
    assert bf16.fingerprint() != fp32.fingerprint()  # another dtype may pick other tokens: never shares a cache entry
    result = _run(tmp_path, tiny_lm, params=GenerationParams(max_new_tokens=4), precision="bf16", device="cpu")
    local = result.document["provenance"]["backends"]["local"]
    assert local["precision"] == "bf16" and result.document["metrics"]["rows_generated"] == len(PROMPTS)
    import torch

    bf16.generate(bf16.prepare(["The kettle"]))
    assert next(bf16._model.parameters()).dtype == torch.bfloat16
    with pytest.raises(InputError, match="fp16 is for CUDA"):
        LocalGenerator(str(tiny_lm), device="cpu", precision="fp16").fingerprint()
    with pytest.raises(InputError, match="--precision 'int3'"):
        LocalGenerator(str(tiny_lm), precision="int3")


def test_model_code_runs_only_with_trust_remote_code(tmp_path: Path, tiny_lm: Path) -> None:
    import shutil

    custom = tmp_path / "custom-lm"
    shutil.copytree(tiny_lm, custom)
    marker = tmp_path / "code-ran"
    (custom / "modeling_custom.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('imported')  # proof that the model's own code ran\n"
        "from transformers import GPT2Config, GPT2LMHeadModel\n"
        "class CustomConfig(GPT2Config):\n    model_type = 'custom-gpt2'\n"
        "class CustomModel(GPT2LMHeadModel):\n    config_class = CustomConfig\n")
    config = json.loads((custom / "config.json").read_text())
    config.update(model_type="custom-gpt2", architectures=["CustomModel"],
                  auto_map={"AutoConfig": "modeling_custom.CustomConfig",
                            "AutoModelForCausalLM": "modeling_custom.CustomModel"})
    (custom / "config.json").write_text(json.dumps(config))
    params = GenerationParams(max_new_tokens=3)
    refused = LocalGenerator(str(custom), device="cpu", params=params)
    with pytest.raises(Exception, match="--trust-remote-code"):
        refused.generate(refused.prepare(["The kettle"]))
    assert not marker.exists()  # off by default: the file was never imported
    trusted = LocalGenerator(str(custom), device="cpu", params=params, trust_remote_code=True)
    assert len(trusted.generate(trusted.prepare(["The kettle"]))) == 1
    assert marker.exists() and trusted.describe()["trust_remote_code"] is True


def test_generate_command_writes_monitoring_files_and_stops_at_max_errors(tmp_path: Path, tiny_lm: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families
    from typer.testing import CliRunner

    from hfbatch.cli import app

    src = write_jsonl(tmp_path / "p.jsonl", [{"id": i, "prompt": p} for i, p in
                                            enumerate(["The kettle", "", "Battery life is", None, "The kettle"])])
    prom, log = tmp_path / "node" / "gen.prom", tmp_path / "logs" / "gen.jsonl"
    common = ["generate", str(src), "--model", str(tiny_lm), "--max-new-tokens", "4", "--chunk-size", "2",
              "--metrics-file", str(prom), "--log-file", str(log), "--quiet"]
    ok = CliRunner().invoke(app, [*common, "-o", str(tmp_path / "a.parquet"), "--max-errors", "2"])
    assert ok.exit_code == 3, ok.output  # complete, 2 rows marked
    families = {f.name: f for f in text_string_to_metric_families(prom.read_text())}
    value = {name: f.samples[0].value for name, f in families.items()}
    assert value["hfbatch_job_success"] == 1 and value["hfbatch_rows_total"] == 5
    assert value["hfbatch_rows_generated"] == 3 and value["hfbatch_rows_invalid"] == 2
    assert value["hfbatch_prompts_computed"] == 2 and value["hfbatch_tokens_generated"] > 0
    assert families["hfbatch_rows_total"].samples[0].labels == {"input": "p.jsonl", "output": "a.parquet",
                                                                "model": str(tiny_lm), "backend": "local"}
    stages = {s.labels["stage"]: s.value for s in families["hfbatch_stage_seconds"].samples}
    assert stages["generate"] > 0 and "model_load" in stages  # the one Metrics' stages, not hand-kept timers
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [line["first_row"] for line in lines if line["event"] == "chunk"] == [0, 2, 4]
    assert lines[-1]["event"] == "done" and lines[-1]["rows_written"] == 5

    over = CliRunner().invoke(app, [*common, "-o", str(tmp_path / "b.parquet"), "--max-errors", "1"])
    assert over.exit_code == 1 and "more than --max-errors 1 rows are invalid (2 so far" in over.stderr
    assert not (tmp_path / "b.parquet").exists()
    families = {f.name: f for f in text_string_to_metric_families(prom.read_text())}
    (failed,) = families["hfbatch_job_success"].samples
    assert failed.value == 0 and failed.labels["error"] == "TooManyErrors"
    assert json.loads(log.read_text().splitlines()[-1])["event"] == "failed"


def test_embed_and_generate_sidecars_are_one_document(tmp_path: Path, tiny_lm: Path) -> None:
    """Both built by provenance.build_document: the same shared keys, each job adding only its own."""
    from hfbatch import EmbedOptions, run_embed

    src = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "prompt": p, "text": p} for i, p in enumerate(PROMPTS)])
    embedded = run_embed(EmbedOptions(input=src, output=tmp_path / "e.parquet", keep=["id"])).document
    generated = run_generate(GenerateOptions(input=src, output=tmp_path / "g.parquet", model=str(tiny_lm), keep=["id"],
                                             params=GenerationParams(max_new_tokens=3))).document
    e, g = embedded["provenance"], generated["provenance"]
    shared = set(e) & set(g)
    assert set(e) - shared == {"fallback", "dim", "normalize", "max_length", "text_column", "prompt", "prompt_name", "split",
                               "vectors"}
    assert set(g) - shared == {"prompt_column", "params", "cached"}
    assert {"tool_version", "command", "model_id", "fingerprint", "backend", "backends", "device", "input", "output",
            "started", "finished", "libraries", "engine", "job"} <= shared
    assert (e["job"], g["job"], e["engine"], g["engine"]) == ("embed", "generate", "local", "local")
    for key in ("input", "output", "libraries"):
        assert set(e[key]) == set(g[key]), key
    assert e["input"]["hash"] == g["input"]["hash"] and g["output"]["rows"] == len(PROMPTS)
    em, gm = embedded["metrics"], generated["metrics"]
    assert set(em) - {"rows_embedded", "texts_computed", "tokens_computed"} == \
        set(gm) - {"rows_generated", "prompts_computed", "tokens_generated"}
    assert set(em["cache"]) == set(gm["cache"]) and set(em["api"]) == set(gm["api"])
    assert set(em["stage_seconds"]) - {"embed"} == set(gm["stage_seconds"]) - {"generate"}


def test_run_generate_takes_an_injected_generator(tmp_path: Path, tiny_lm: Path) -> None:
    class Counting(LocalGenerator):
        calls = 0

        def generate(self, prepared):
            Counting.calls += 1
            return super().generate(prepared)

    params = GenerationParams(max_new_tokens=3)
    src = write_jsonl(tmp_path / "p.jsonl", [{"id": i, "prompt": p} for i, p in enumerate(PROMPTS)])
    options = GenerateOptions(input=src, output=tmp_path / "a.parquet", model=str(tiny_lm), params=params, batch_size=2)
    first = run_generate(options, generator=Counting(str(tiny_lm), device="cpu", params=params))
    assert Counting.calls == 2 and first.document["metrics"]["prompts_computed"] == len(set(PROMPTS))
    again = run_generate(replace(options, output=tmp_path / "b.parquet"),
                         generator=Counting(str(tiny_lm), device="cpu", params=params))
    assert Counting.calls == 2 and again.document["metrics"]["cache"]["hits"] == len(set(PROMPTS))
    assert pq.read_table(again.output).column("generated_text").to_pylist() == \
        pq.read_table(first.output).column("generated_text").to_pylist()
