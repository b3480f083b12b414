"""README.md as a new user runs it: every example, as written, top to bottom, in one folder.

The examples are parsed from README.md (never copied here), so the page and this test cannot drift
apart: a shell line in an indented or fenced block, a ```python block (exec'd) and a ```sql block
(run by DuckDB). They run in order in one temporary folder laid out like the repository after
`make demo`: `sample_data/` (a trimmed copy, see `_sample_data`) and nothing else; every output
goes where the README says. `hfbatch` lines run in-process through typer's CliRunner (the model
loads once for the whole page). A line or command this test does not know how to run fails it,
so a new example is either runnable here or marked and listed below with its reason.

What stands in for what a test machine cannot have (the README text is unchanged):
- the hub's `hf download`: a copy of the files the repo would give (the bundled MiniLM is the
  hub repo's files; a tiny GPT-2 saved like a hub model stands in for SmolLM2: no LM is bundled);
- TEI, an OpenAI-compatible server and the HF Inference API router: embedding_server.py, a real
  HTTP server on 127.0.0.1 running the real model, at the URLs in `_STAND_IN_URLS` (and the
  router through HFBATCH_HF_ROUTER), and the hub's model listing (`hfbatch models`) from the
  same server through HF_ENDPOINT;
- S3 / MinIO: moto's S3 server (s3_server.py) through AWS_ENDPOINT_URL, with the bucket `lake`
  holding the copy of sample_data/ the README says it holds;
- the Postgres at db.internal:5432: a real Postgres with pgvector on 127.0.0.1 (tests/pg.py),
  holding the database `shop`, its schema `search` and the role `app` (password `s3cret`, no
  superuser: pgvector installed by the server's owner, as a DBA would) the README's lines use;
- `hfbatch tune`: this machine narrowed to one candidate (torch fp32; no export runtimes, no
  native bf16), as test_selection.py narrows it, so measuring takes seconds rather than the minute
  every runtime takes here; test_selection.py measures the real candidates.
"""

from __future__ import annotations

import csv
import json
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from conftest import BUNDLED_MODEL_DIR
from embedding_server import EmbeddingServer
from s3_server import S3Server, s3  # noqa: F401  # s3: the fixture
from typer.testing import CliRunner

from hfbatch.backends import selection
from hfbatch.cli import app

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
runner = CliRunner()

# Lines that end in `# needs <what>`: what each needs, and why the test cannot give it. Short on
# purpose: every other example runs here.
NEEDS = {
    "the hub": "a model only the hub has (intfloat/e5-small-v2, SmolLM2 behind the HF Inference API): "
               "tests cannot reach the hub, and no stand-in of those models is honest",
    "a Ray cluster with GPUs": "--ray-address auto joins a running cluster and --gpus-per-worker 1 needs GPUs; "
                               "test_ray.py runs the Ray engine on a local cluster",
}
# Commands of the page that are not examples to run here, and why.
NOT_RUN = {
    ("make", "test"): "runs this very suite",
    ("make", "bench"): "the benchmarks take minutes; benchmarks/ holds them",
    (".ci/run",): "CI's own script: make demo, then make test",
    ("python", "-m", "pytest"): "runs this very suite",
    ("pip", "install"): "installs extras; the test environment has them all (pyproject's dev extra)",
}
SHELL_TOOLS = {"gzip"}  # plain shell commands run by bash, as written
_STAND_IN_URLS = {"http://gpu-box:8080": "{embed}", "http://127.0.0.1:7997/v1": "{embed}/v1",
                  "http://minio:9000": "{s3}", "db.internal:5432": "127.0.0.1:{pg_port}"}
_NEEDS = re.compile(r"\s#\s*needs (.+)$")


@dataclass
class Example:
    kind: str  # "shell", "python", "sql" or "listing"
    text: str
    line: int  # 1-based, in README.md

    @property
    def needs(self) -> str | None:
        found = _NEEDS.search(self.text) if self.kind == "shell" else None
        return found.group(1).strip() if found else None


def readme_examples(text: str) -> list[Example]:
    """Every example of the page, in order: fenced blocks by language, indented blocks line by
    line (a shell line, or a listing of files when the line names a path under out/)."""
    examples: list[Example] = []
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        fence = re.match(r"^```(\w*)\s*$", line)
        if fence:
            end = lines.index("```", i + 1)
            body = "\n".join(lines[i + 1:end])
            kind = {"python": "python", "sql": "sql", "": "shell", "sh": "shell", "bash": "shell",
                    "console": "shell"}.get(fence.group(1), fence.group(1))
            if kind == "shell":
                examples += [Example("shell", b, i + 2 + n) for n, b in enumerate(body.split("\n")) if b.strip()]
            else:
                examples.append(Example(kind, body, i + 2))
            i = end + 1
            continue
        if line.startswith("    ") and line.strip() and (i == 0 or not lines[i - 1].strip()):
            while i < len(lines) and (lines[i].startswith("    ") or not lines[i].strip()):
                if lines[i].strip():
                    body = lines[i][4:]
                    kind = "listing" if body.startswith("out/") else "shell"
                    examples.append(Example(kind, body, i + 1))
                i += 1
            continue
        i += 1
    return examples


def test_the_readme_is_parsed_into_the_examples_it_shows() -> None:
    """The parser finds every kind of example (a guard against a parser that finds nothing), and
    every marked line names a need this test lists."""
    examples = readme_examples(README.read_text(encoding="utf-8"))
    kinds = {e.kind for e in examples}
    assert {"shell", "python", "sql", "listing"} <= kinds
    assert sum(e.kind == "shell" and e.text.startswith("hfbatch ") for e in examples) >= 30
    for example in examples:
        if example.needs is not None:
            assert example.needs in NEEDS, f"README.md:{example.line}: '# needs {example.needs}' is not in NEEDS"


# --- set-up: the folder a user has after `make demo` ------------------------------------------


def _long(text: str) -> bool:
    return len(text) > 1200  # the multi-paragraph reviews that go past the model's 256 tokens


def _sample_data(into: Path) -> None:
    """sample_data/ as the repository has it, each data file cut to its first 20 rows and its long
    reviews (which exercise truncation and --split), in the same format: the examples read the same
    names and kinds of rows, and the page runs in seconds rather than minutes on two cores."""
    src = ROOT / "sample_data"
    into.mkdir()
    for name in ("README.md", "make_samples.py", "pairs.csv"):
        shutil.copy(src / name, into / name)
    with (src / "reviews.csv").open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = [r for n, r in enumerate(reader) if n < 20 or _long(r["text"])]
        fields = reader.fieldnames
    with (into / "reviews.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    lines = (src / "reviews.jsonl").read_text(encoding="utf-8").splitlines()
    kept = [line for n, line in enumerate(lines) if n < 20 or _long(json.loads(line)["text"])]
    (into / "reviews.jsonl").write_text("\n".join(kept) + "\n", encoding="utf-8")
    table = pq.read_table(src / "reviews.parquet")
    texts = table.column("text").to_pylist()
    table = table.take([n for n, t in enumerate(texts) if n < 20 or _long(t)])
    pq.write_table(table, into / "reviews.parquet", compression="zstd", row_group_size=10)


def _demo_commands() -> list[str]:
    """`make demo`'s own hfbatch lines, from the Makefile (the rest of the target installs)."""
    recipe: list[str] = []
    lines = (ROOT / "Makefile").read_text(encoding="utf-8").splitlines()
    start = next(n for n, line in enumerate(lines) if line.startswith("demo:"))
    for line in lines[start + 1:]:
        if not line.startswith("\t"):
            break
        if "/hfbatch " in line:
            recipe.append("hfbatch " + line.split("/hfbatch ", 1)[1])
    assert recipe, "the Makefile's demo target runs no hfbatch command"
    return recipe


# --- running the page --------------------------------------------------------------------------


class Page:
    """Runs examples in `folder` with the stand-ins, and keeps what they wrote."""

    def __init__(self, folder: Path, embed: EmbeddingServer, store: S3Server, tiny_lm: Path, pg: Any,
                 kinds: dict[str, Path] | None = None) -> None:
        self.folder, self.embed, self.s3, self.pg = folder, embed, store, pg
        # the other kinds' hub models: the tests' models of the same classes (tests/kind_models.py)
        self.repos = {"sentence-transformers/all-MiniLM-L6-v2": BUNDLED_MODEL_DIR,
                      "HuggingFaceTB/SmolLM2-135M-Instruct": tiny_lm, **(kinds or {})}
        self.written: dict[str, Example] = {}  # every output path, and the example that wrote it
        self.skipped: list[tuple[Example, str]] = []

    def url(self, value: str) -> str:
        for real, stand_in in _STAND_IN_URLS.items():
            value = value.replace(real, stand_in.format(embed=self.embed.url, s3=self.s3.url, pg_port=self.pg.port))
        return value

    def run(self, example: Example) -> None:
        if example.needs is not None:
            self.skipped.append((example, NEEDS[example.needs]))
            return
        handlers = {"shell": self.shell, "python": self.python, "sql": self.sql, "listing": self.listing}
        assert example.kind in handlers, f"README.md:{example.line}: a ```{example.kind} block this test cannot run"
        handlers[example.kind](example)

    # shell lines
    def shell(self, example: Example) -> None:
        words = shlex.split(example.text, comments=True)
        if ">" in words or "|" in words:
            return self.tool(example)
        for not_run, why in NOT_RUN.items():
            if tuple(words[:len(not_run)]) == not_run:
                self.skipped.append((example, why))
                return
        commands: list[list[str]] = [[]]
        for word in words:
            commands.append([]) if word == "&&" else commands[-1].append(word)
        for command in commands:
            self.command(example, command)

    def command(self, example: Example, words: list[str]) -> None:
        env = {}
        while words and re.match(r"^[A-Z_]+=", words[0]):
            name, value = words.pop(0).split("=", 1)
            env[name] = self.url(value)
        where = f"README.md:{example.line}: {example.text}"
        if words[:2] == ["make", "demo"]:
            for line in _demo_commands():
                self.hfbatch(example, shlex.split(line)[1:], env)
        elif words[:2] == ["hf", "download"]:
            repo, target = words[2], words[words.index("--local-dir") + 1]
            assert repo in self.repos, f"{where}: no stand-in for the hub repo {repo}"
            self.wrote(target, example)
            shutil.copytree(self.repos[repo], self.folder / target)
        elif words[:1] == ["hfbatch"]:
            self.hfbatch(example, words[1:], env)
        else:
            raise AssertionError(f"{where}: this test does not know how to run {words[0]!r}; "
                                 "make it runnable here, or mark it '# needs ...' (and list it in NEEDS)")

    def hfbatch(self, example: Example, args: list[str], env: dict[str, str]) -> None:
        args = [self.url(a) for a in args]
        for flag in ("-o", "--output"):
            if flag in args:
                target = args[args.index(flag) + 1]
                if "--shard" not in args:  # the shards of one job share their -o by design
                    self.wrote(target, example)
        if args[0] == "models":  # the hub's model listing, from the stand-in
            import huggingface_hub.constants as hub

            self.embed.hub_models = [{"id": "sentence-transformers/all-MiniLM-L6-v2", "_id": "1",
                                      "pipeline_tag": "feature-extraction", "downloads": 1234567, "likes": 42,
                                      "library_name": "sentence-transformers", "tags": []}]
            with pytest.MonkeyPatch.context() as hub_online:
                hub_online.setattr(hub, "HF_HUB_OFFLINE", False)
                hub_online.setenv("HF_ENDPOINT", self.embed.url)
                result = runner.invoke(app, args, env=env)
        else:
            result = runner.invoke(app, args, env=env)
        assert result.exit_code == 0, (f"README.md:{example.line}: hfbatch {' '.join(args)} exited "
                                       f"{result.exit_code}:\n{result.output}\n{result.exception!r}")

    def tool(self, example: Example) -> None:
        words = shlex.split(example.text, comments=True)
        assert words[0] in SHELL_TOOLS, f"README.md:{example.line}: {example.text}: not a shell tool this test runs"
        if ">" in words:
            self.wrote(words[words.index(">") + 1], example)
        done = subprocess.run(["bash", "-c", example.text], cwd=self.folder, capture_output=True, text=True,
                              timeout=60, check=False)
        assert done.returncode == 0, f"README.md:{example.line}: {example.text}: {done.stderr}"

    def wrote(self, target: str, example: Example) -> None:
        """No example overwrites what another wrote (so none overwrites a later one's input), and
        none writes into sample_data/. A sync by --id-column updates its target: that is its point."""
        key = target.rstrip("/")
        assert not key.startswith("sample_data"), f"README.md:{example.line} writes into sample_data/"
        syncs = "--id-column" in example.text and "--id-column" in getattr(self.written.get(key), "text", "")
        assert key not in self.written or syncs, (f"README.md:{example.line} writes {target}, which README.md:"
                                         f"{self.written[key].line} wrote: a later example's input may be gone")
        self.written[key] = example

    # blocks
    def python(self, example: Example) -> None:
        namespace: dict[str, Any] = {"__name__": "__readme__"}
        exec(compile(example.text, f"README.md:{example.line}", "exec"), namespace)  # noqa: S102

    def sql(self, example: Example) -> None:
        import duckdb

        rows = duckdb.connect().sql(example.text).fetchall()
        assert rows, f"README.md:{example.line}: the query found nothing"

    def listing(self, example: Example) -> None:
        path = example.text.split()[0]
        assert (self.folder / path).is_file(), f"README.md:{example.line}: {path} is listed but was not written"


@pytest.fixture
def embed_server(st_model: Any) -> Any:
    with EmbeddingServer(st_model) as server:
        yield server


def test_every_readme_example_runs_as_written_top_to_bottom(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            s3: S3Server, embed_server: EmbeddingServer,  # noqa: F811
                                                            tiny_lm: Path, pg: Any, sparse_model_dir: Path,
                                                            multivector_model_dir: Path,
                                                            cross_encoder_model_dir: Path) -> None:
    folder = tmp_path / "repo"
    folder.mkdir()
    _sample_data(folder / "sample_data")
    monkeypatch.chdir(folder)
    # the router of the HF Inference API (`--backend api`), served on this machine
    monkeypatch.setenv("HFBATCH_HF_ROUTER", embed_server.url)
    # the bucket the README's S3 examples read: a copy of sample_data/ under reviews/
    s3.create_bucket("lake")
    for path in sorted((folder / "sample_data").iterdir()):
        s3.put("lake", f"reviews/{path.name}", path.read_bytes())
    # `hfbatch tune` on a machine of its own (exports and records in tmp_path) whose one faithful
    # candidate is torch fp32 (see the docstring)
    monkeypatch.setenv("HFBATCH_ONNX_DIR", str(tmp_path / "machine"))
    monkeypatch.setattr(selection, "EXPORT_RUNTIMES", {})
    monkeypatch.setattr(selection, "cpu_has_native_bf16", lambda: False)

    # the Postgres the README's lines reach: database shop, schema search, role app
    with pg.connect() as conn:
        if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = 'app'").fetchone():
            conn.execute("CREATE ROLE app LOGIN PASSWORD 's3cret'")
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = 'shop'").fetchone():
            conn.execute("CREATE DATABASE shop OWNER app")
    import psycopg

    with psycopg.connect(f"postgresql://postgres:{pg.password}@127.0.0.1:{pg.port}/shop", autocommit=True) as shop:
        shop.execute("CREATE EXTENSION IF NOT EXISTS vector")
        shop.execute("CREATE SCHEMA IF NOT EXISTS search AUTHORIZATION app")
    page = Page(folder, embed_server, s3, tiny_lm, pg, {
        "naver/splade-cocondenser-ensembledistil": sparse_model_dir, "lightonai/GTE-ModernColBERT-v1": multivector_model_dir,
        "cross-encoder/ms-marco-MiniLM-L6-v2": cross_encoder_model_dir})
    examples = readme_examples(README.read_text(encoding="utf-8"))
    for example in examples:
        page.run(example)

    # what the page promises, checked on what it left
    marked = [e for e, _ in page.skipped if e.needs]
    assert len(marked) <= 4, [e.text for e in marked]  # the page runs here, but for a few lines that say why
    assert {e.needs for e in marked} == set(NEEDS), "a NEEDS entry no README line uses"
    with (folder / "sample_data/reviews.csv").open(newline="", encoding="utf-8") as f:
        rows = sum(1 for _ in csv.DictReader(f))
    assert pq.read_table(folder / "out/reviews.embedded.parquet").num_rows == rows
    assert "embedded/_hfbatch_job.json" in s3.keys("lake", "embedded/")
    # the calibration example puts the queries on the documents' int8 grid
    docs, queries = (json.loads((folder / f"out/{name}.parquet.meta.json").read_text())["provenance"]["vectors"]
                     for name in ("small", "small-queries"))
    assert queries["ranges"] == docs["ranges"] and queries["precision"] == "int8"
