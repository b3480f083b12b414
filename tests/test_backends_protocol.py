"""The Backend and Generator protocols are the real contract: every concrete class has every member,
and the members the core calls before any vector is needed load no model and make no request."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest

from embedding_server import EmbeddingServer
from hfbatch import EmbedOptions
from hfbatch.backends import Backend, Generator, make_backend, make_generator
from hfbatch.backends.fallback import FallbackBackend
from hfbatch.backends.generation import GenerationParams, LocalGenerator
from hfbatch.backends.local import LocalBackend
from hfbatch.backends.remote import RemoteBackend
from hfbatch.backends.remote_generation import RemoteGenerator
from hfbatch.errors import InputError
from hfbatch.options import GenerateOptions

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
BACKEND_MEMBERS = {"name", "model_id", "remote", "batch_texts", "load_seconds", "max_length", "fingerprint",
                   "known_dimension", "dimension", "token_counts", "embed", "describe", "prompt", "split",
                   "prepare", "setup_seconds", "watch", "token_source", "kind"}
GENERATOR_MEMBERS = {"name", "model_id", "remote", "load_seconds", "fingerprint", "prepare", "generate", "describe"}


def members(protocol: type) -> set[str]:
    """What a protocol declares: annotated attributes, methods and properties."""
    declared = set(getattr(protocol, "__annotations__", {}))
    return declared | {n for n, v in vars(protocol).items()
                       if not n.startswith("_") and (inspect.isfunction(v) or isinstance(v, property))}


def assert_satisfies(obj: Any, protocol: type) -> None:
    """Every member is there (looked up without running properties, so nothing loads), methods are
    callable with the protocol's parameters, and isinstance agrees."""
    for name in members(protocol):
        try:
            found = inspect.getattr_static(obj, name)
        except AttributeError:
            pytest.fail(f"{type(obj).__name__} lacks {protocol.__name__}.{name}")
        declared = vars(protocol).get(name)
        if inspect.isfunction(declared):
            params = list(inspect.signature(declared).parameters)[1:]  # without self
            got = inspect.signature(getattr(obj, name)).parameters
            assert all(p in got for p in params), f"{type(obj).__name__}.{name}{tuple(got)} lacks {params}"
            assert callable(found)
    assert isinstance(obj, protocol)


def test_the_protocols_declare_what_the_core_uses() -> None:
    assert members(Backend) == BACKEND_MEMBERS
    assert members(Generator) == GENERATOR_MEMBERS


@pytest.fixture
def dead_endpoint(st_model) -> str:
    """The URL of a server that has stopped: any request to it would fail."""
    with EmbeddingServer(st_model) as server:
        url = server.url
    return url


def _backends(endpoint: str) -> list[Any]:
    def opts(**kw: Any) -> EmbedOptions:
        return EmbedOptions(input=Path("a.csv"), output=Path("a.parquet"), model=MODEL, endpoint=endpoint, **kw)

    return [make_backend(opts()), make_backend(opts(backend="tei")), make_backend(opts(backend="openai")),
            make_backend(opts(backend="hf-api")), make_backend(opts(backend="auto", fallback="tei")),
            make_backend(opts(backend="auto", fallback="tei", device="cuda"))]  # no CUDA: falls back at once


def test_every_backend_satisfies_the_protocol(dead_endpoint: str) -> None:
    built = _backends(dead_endpoint)
    assert [type(b) for b in built] == [LocalBackend] + [RemoteBackend] * 3 + [FallbackBackend] * 2
    for backend in built:
        assert_satisfies(backend, Backend)


def test_what_the_core_asks_before_a_vector_loads_nothing_and_connects_nowhere(dead_endpoint: str) -> None:
    for backend in _backends(dead_endpoint):
        seen = (backend.name, backend.model_id, backend.fingerprint(), backend.known_dimension(), backend.max_length,
                backend.remote, backend.batch_texts, backend.load_seconds, backend.token_counts(["a text"]),
                backend.token_source)
        assert backend.token_source == "tokenizer", seen  # a hub id: its tokenizer counts, per text
        described = backend.describe()
        assert described["model_loaded"] is False and described.get("requests", 0) == 0, seen
        for side in described.get("backends", {}).values():  # --backend auto: both sides
            assert side["model_loaded"] is False and side.get("requests", 0) == 0, seen
        assert backend.load_seconds == 0.0


def test_remote_and_batch_texts_say_how_the_core_sends_texts(dead_endpoint: str) -> None:
    local, tei, _, _, auto, auto_fallen = _backends(dead_endpoint)
    assert (local.remote, local.batch_texts) == (False, None)  # the job's --batch-size
    assert (tei.remote, tei.batch_texts) == (True, 32 * 4)  # --api-batch-size x --api-concurrency
    assert (auto.remote, auto.batch_texts) == (False, None)  # the local side works: it makes the vectors
    assert (auto_fallen.remote, auto_fallen.batch_texts) == (True, 32 * 4)
    assert auto.fingerprint() == local.fingerprint() and auto_fallen.fingerprint() == tei.fingerprint()
    assert auto.known_dimension() == local.known_dimension() == 384
    assert auto_fallen.known_dimension() == 384  # the local model's files still say what the remote must match


def test_every_generator_satisfies_the_protocol(tiny_lm: Path, dead_endpoint: str) -> None:
    def opts(**kw: Any) -> GenerateOptions:
        kw.setdefault("params", GenerationParams(max_new_tokens=4))
        return GenerateOptions(input=Path("p.jsonl"), output=Path("o.parquet"), model=str(tiny_lm), **kw)

    local = make_generator(opts())
    remote = make_generator(opts(backend="api", endpoint=dead_endpoint))
    assert type(local) is LocalGenerator and type(remote) is RemoteGenerator
    assert type(make_generator(opts(backend="hf-api", endpoint=dead_endpoint))) is RemoteGenerator
    for generator in (local, remote):
        assert_satisfies(generator, Generator)
        generator.fingerprint()
        assert generator.prepare(["Battery life is"])[0].n_prompt_tokens > 0
        described = generator.describe()
        assert described["model_loaded"] is False and described.get("requests", 0) == 0
    assert (local.remote, remote.remote) == (False, True)
    assert local.fingerprint() != make_generator(opts(params=GenerationParams(max_new_tokens=5))).fingerprint()
    assert remote.fingerprint() != make_generator(opts(backend="api", endpoint=dead_endpoint + "/x")).fingerprint()


def test_make_generator_refuses_what_it_cannot_build(tiny_lm: Path) -> None:
    base = dict(input=Path("p.jsonl"), output=Path("o.parquet"), model=str(tiny_lm))
    with pytest.raises(InputError, match="--backend 'tei' is not one of: local, api \\(hf-api\\) for generate"):
        make_generator(GenerateOptions(**base, backend="tei"))
    with pytest.raises(InputError, match="--api-retries must be at least 1"):
        make_generator(GenerateOptions(**base, backend="api", api_retries=0))


def test_no_module_probes_a_backend_for_what_the_protocol_does_not_declare() -> None:
    """The runtime choice and everything else the core asks of a backend go through the declared
    protocol (prepare, fingerprint, ...): no getattr/hasattr on a backend in jobs/, engines/ or
    tools/ (that is how a second way of working grew beside the designed one before)."""
    import ast

    import hfbatch

    root = Path(hfbatch.__file__).parent
    probes = []
    for folder in ("jobs", "engines", "tools"):
        for path in sorted((root / folder).glob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                        and node.func.id in ("getattr", "hasattr") and node.args:
                    target = ast.unparse(node.args[0]).lower()
                    if target.startswith("torch."):
                        continue  # a library's own module (torch.backends.mps), not one of ours
                    if any(word in target for word in ("backend", "local", "primary", "generator", "runner")):
                        probes.append(f"{path.relative_to(root)}:{node.lineno}: {ast.unparse(node)}")
    assert not probes, probes
