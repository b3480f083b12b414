"""hfbatch/io/parts.py and io/sidecars.py: a many-part job's parts resolved once into frozen values
(input, relative name, output, sidecar), local and in a store alike; and io/ free of the import
circle it had with validate."""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

import hfbatch
from conftest import write_csv, write_jsonl
from hfbatch.errors import InputError
from hfbatch.io.parts import Part, resolve_parts, shard_of
from hfbatch.io.sidecars import find_sidecar, job_sidecar_path, part_sidecar_path, sidecar_path
from hfbatch.io.stores import RemotePath


def _csv(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_csv(path, [{"text": "x"}])


def test_local_parts_carry_their_paths(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for name in ("a.csv", "2026/b.csv"):
        _csv(data / name)
    write_jsonl(data / "a.jsonl", [{"text": "x"}])  # a.csv + a.jsonl would collide: both keep their whole name
    (data / "_SUCCESS").write_text("")
    (data / "c.parquet.meta.json").write_text("{}")
    out = tmp_path / "out"
    job = resolve_parts(str(data), out)
    assert job.root == data and job.out_dir == out and job.input_is_dir
    assert job.job_sidecar == out / "_hfbatch_job.json"
    assert job.every == job.mine == (
        Part(data / "2026/b.csv", "2026/b.csv", out / "2026/b.parquet", "2026/b.parquet",
             out / "_hfbatch/2026/b.parquet.meta.json"),
        Part(data / "a.csv", "a.csv", out / "a.csv.parquet", "a.csv.parquet", out / "_hfbatch/a.csv.parquet.meta.json"),
        Part(data / "a.jsonl", "a.jsonl", out / "a.jsonl.parquet", "a.jsonl.parquet",
             out / "_hfbatch/a.jsonl.parquet.meta.json"),
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.every[0].output = out / "elsewhere.parquet"  # type: ignore[misc]
    # the sidecar of each part is the one path rule's
    assert all(p.sidecar == part_sidecar_path(out, p.output) for p in job.every)


def test_shards_split_the_parts_and_name_their_own_job_sidecar(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for i in range(8):
        _csv(data / f"p{i}.csv")
    every = resolve_parts(str(data), tmp_path / "out").every
    mine = [resolve_parts(str(data), tmp_path / "out", shard=(i, 3)) for i in (1, 2, 3)]
    assert sorted((p for job in mine for p in job.mine), key=lambda p: p.relative) == list(every)
    assert all(job.every == every for job in mine)  # every shard names every output alike
    assert all(shard_of(p.relative, 3) == i for i, job in enumerate(mine, 1) for p in job.mine)
    assert mine[1].job_sidecar == tmp_path / "out" / "_hfbatch_job.shard-2-of-3.json"


def test_one_file_is_a_job_of_one_part_and_the_input_dir_is_no_output(tmp_path: Path) -> None:
    src = _csv(tmp_path / "in" / "a.csv")
    job = resolve_parts(src, tmp_path / "out")
    assert [(p.input, p.relative, p.name) for p in job.every] == [(src, "a.csv", "a.parquet")]
    assert not job.input_is_dir
    with pytest.raises(InputError, match="is the input directory"):
        resolve_parts(str(tmp_path / "in"), tmp_path / "in")


def test_store_parts_are_remote_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """A store's prefix resolved without a server: the listing is the one thing asked of the store."""
    objects = ["s3://lake/in/2026/b.jsonl", "s3://lake/in/a.csv", "s3://lake/in/_SUCCESS"]
    monkeypatch.setattr(RemotePath, "is_file", lambda self: self.url in objects)
    monkeypatch.setattr(RemotePath, "is_dir", lambda self: self.url == "s3://lake/in")
    monkeypatch.setattr(RemotePath, "walk_files", lambda self: iter(map(RemotePath, objects)))
    out = RemotePath("s3://lake/out")
    job = resolve_parts("s3://lake/in", out, shard=(1, 1))
    assert job.root == RemotePath("s3://lake/in") and job.input_is_dir
    assert job.job_sidecar == RemotePath("s3://lake/out/_hfbatch_job.json")
    assert job.every == (
        Part(RemotePath("s3://lake/in/2026/b.jsonl"), "2026/b.jsonl", RemotePath("s3://lake/out/2026/b.parquet"),
             "2026/b.parquet", RemotePath("s3://lake/out/_hfbatch/2026/b.parquet.meta.json")),
        Part(RemotePath("s3://lake/in/a.csv"), "a.csv", RemotePath("s3://lake/out/a.parquet"), "a.parquet",
             RemotePath("s3://lake/out/_hfbatch/a.parquet.meta.json")),
    )


def test_sidecar_rules_local_and_in_a_store(tmp_path: Path) -> None:
    store = RemotePath("s3://lake/out")
    assert sidecar_path(RemotePath("s3://lake/o.parquet")) == RemotePath("s3://lake/o.parquet.meta.json")
    assert part_sidecar_path(store, store / "x/a.parquet") == RemotePath("s3://lake/out/_hfbatch/x/a.parquet.meta.json")
    assert job_sidecar_path(store, (3, 8)) == RemotePath("s3://lake/out/_hfbatch_job.shard-3-of-8.json")
    # find_sidecar: beside the output, else under the nearest _hfbatch/ above it, else (none) beside it
    out = tmp_path / "out"
    (out / "_hfbatch/x").mkdir(parents=True)
    (out / "_hfbatch/x/a.parquet.meta.json").write_text("{}")
    assert find_sidecar(out / "x/a.parquet") == out / "_hfbatch/x/a.parquet.meta.json"
    (out / "x").mkdir()
    (out / "x/a.parquet.meta.json").write_text("{}")
    assert find_sidecar(out / "x/a.parquet") == out / "x/a.parquet.meta.json"
    assert find_sidecar(out / "b.parquet") == out / "b.parquet.meta.json"


# --- the import circle io -> validate -> io is gone ------------------------------------------

_ROOT = Path(hfbatch.__file__).parent


def _module_imports(path: Path, module: str, *, top_level_only: bool) -> set[str]:
    """The hfbatch modules `path` imports (at module level only, or anywhere), type-checking ones aside."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    package = module.split(".")[:-1] if path.name != "__init__.py" else module.split(".")
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module or ""
            for alias in node.names:  # `from . import x` imports the module x
                candidate = f"{base}.{alias.name}"
                found.add(candidate if (_ROOT.parent / (candidate.replace(".", "/") + ".py")).exists() else base)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m.split(".")[0] == "hfbatch"}


def _modules(*folders: str) -> dict[str, Path]:
    out = {}
    for folder in folders:
        for path in (_ROOT / folder).glob("*.py") if folder else [_ROOT / f for f in (
                "errors.py", "settings.py", "vectors.py", "resources.py", "_version.py", "provenance.py", "validate.py",
                "cache.py", "monitoring.py")]:
            parts = path.relative_to(_ROOT.parent).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def test_io_imports_nothing_of_validate() -> None:
    """io/ asks no question of validate, anywhere (validate imports io's readers): no io -> validate -> io."""
    offenders = {m: sorted(i) for m, p in _modules("io").items()
                 if (i := {x for x in _module_imports(p, m, top_level_only=False) if x == "hfbatch.validate"})}
    assert not offenders, offenders


def test_no_import_circle_below_the_backends() -> None:
    """Module-level imports among io/*, validate, provenance, cache, monitoring and what they stand
    on form no circle, so any of them imported first (in any order) finds what it needs."""
    modules = _modules("io", "")
    graph = {m: {i for i in _module_imports(p, m, top_level_only=True) if i in modules} for m, p in modules.items()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            assert state.get(nxt) != 1, " -> ".join([*trail, node, nxt])
            if nxt not in state:
                visit(nxt, [*trail, node])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [])


@pytest.mark.parametrize("module", sorted(set(_modules("io")) | {"hfbatch.validate"}))
def test_each_module_imports_alone_in_a_fresh_interpreter(module: str) -> None:
    done = subprocess.run([sys.executable, "-P", "-c", f"import {module}"], capture_output=True, text=True,
                          cwd=_ROOT.parent, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
