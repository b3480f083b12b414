"""One definition of what makes an embed output what it is (options.OUTPUT_IDENTITY): every
option is classified, and the many-part resume key follows that list."""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path

from hfbatch import EmbedOptions
from hfbatch.options import NOT_OUTPUT_IDENTITY, OUTPUT_IDENTITY


def test_every_embed_option_says_whether_it_shapes_the_output() -> None:
    names = {f.name for f in fields(EmbedOptions)}
    assert not set(OUTPUT_IDENTITY) & set(NOT_OUTPUT_IDENTITY)
    assert names == set(OUTPUT_IDENTITY) | set(NOT_OUTPUT_IDENTITY), (
        "classify the new option: " + ", ".join(sorted(names ^ (set(OUTPUT_IDENTITY) | set(NOT_OUTPUT_IDENTITY)))))


def test_the_resume_key_changes_with_each_identity_option_and_with_nothing_else(tmp_path: Path) -> None:
    from hfbatch.engines.parts import options_key

    base = EmbedOptions(input=tmp_path / "in", output=tmp_path / "out")
    changed = {"model": "other/model", "text_column": "body", "keep": ("id",), "format": "csv", "normalize": False,
               "max_length": 64, "precision": "bf16", "runtime": "onnx", "quantize": "int8", "on_invalid": "fail",
               "backend": "tei", "endpoint": "http://127.0.0.1:9", "fallback": "none", "remote_pooling": "cls",
               "split": "tokens:64", "overlap": 8, "aggregate": "mean", "prompt": "query: ", "prompt_name": "query",
               "truncate_dim": 128, "output_precision": "int8", "calibration": tmp_path / "c.json",
               "calibration_size": 10, "tokenizer": "bert-base-uncased", "kind": "sparse", "sparse_top_k": 10,
               "sparse_vocab": True}
    assert set(changed) == set(OUTPUT_IDENTITY)
    key = options_key(base)
    for name, value in changed.items():
        assert options_key(replace(base, **{name: value})) != key, name
    same = {"batch_size": 7, "chunk_size": 9, "api_concurrency": 1, "api_retries": 0, "max_errors": 3,
            "use_cache": False, "cache_dir": tmp_path / "c", "log_file": tmp_path / "l", "relative_paths": True}
    for name, value in same.items():
        assert options_key(replace(base, **{name: value})) == key, name
