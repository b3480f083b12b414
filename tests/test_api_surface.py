"""The public names users import from `hfbatch`, and the error hierarchy they catch."""

import hfbatch
from hfbatch import errors


def test_public_names() -> None:
    assert set(hfbatch.__all__) == {
        "__version__", "embed", "encode", "generate", "plan", "search", "verify", "run_embed", "InputChangedError",
        "EmbedOptions", "GenerateOptions", "EmbedResult", "GenerateResult", "PartsResult", "HfbatchError",
        "InputError", "OutputError", "BackendError", "ModelLoadError", "RemoteError", "TransientBackendError",
        "TerminalBackendError", "TooManyErrors", "score", "ScoreOptions", "ScoreResult",
    }
    for name in hfbatch.__all__:
        assert getattr(hfbatch, name) is not None


def test_error_hierarchy_and_exit_codes() -> None:
    assert issubclass(errors.InputError, errors.HfbatchError) and errors.InputError.exit_code == 2
    for cls in (errors.ModelLoadError, errors.RemoteError, errors.TransientBackendError, errors.TerminalBackendError):
        assert issubclass(cls, errors.BackendError) and cls.exit_code == 1
    assert issubclass(errors.OutputError, errors.HfbatchError) and errors.OutputError.exit_code == 1
    assert issubclass(errors.TooManyErrors, errors.HfbatchError) and errors.TooManyErrors.exit_code == 1
    assert not issubclass(errors.Terminated, Exception)  # like KeyboardInterrupt: no `except Exception` swallows it


def test_one_version_read_without_an_import_cycle() -> None:
    from pathlib import Path

    from hfbatch import _version
    from hfbatch.provenance import library_versions

    assert hfbatch.__version__ == _version.__version__ == library_versions()["hfbatch"]
    root = Path(hfbatch.__file__).parent
    assert "noqa: E402" not in (root / "__init__.py").read_text()  # nothing imported late to dodge a cycle
    assert "from . import __version__" not in (root / "provenance.py").read_text()
    pyproject = (root.parent / "pyproject.toml").read_text()
    assert 'version = {attr = "hfbatch._version.__version__"}' in pyproject and '\nversion = "' not in pyproject


# Layers, lowest first: a module may import its own layer and lower ones, never a higher one.
_LAYERS = [
    {"_version", "errors", "settings", "vectors", "sparse_vectors", "token_vectors", "resources"},
    {"provenance", "validate", "cache", "monitoring", "io"},
    {"backends", "options"},
    {"jobs"},
    {"engines", "tools"},
    {"cli", "__main__", "__init__"},
]


def _layer(module: str) -> int:
    top = module.split(".")[1] if module.count(".") else "__init__"
    return next(i for i, names in enumerate(_LAYERS) if top in names)


def _imports(path, module: str):  # type: ignore[no-untyped-def]
    """(imported module, imported names) of every hfbatch import in `path`, type-checking-only ones aside."""
    import ast

    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)}
    package = module.split(".")[:-1] if not path.name == "__init__.py" else module.split(".")
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and id(node) not in skip:
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "hfbatch":
                yield target, [a.name for a in node.names]


def test_imports_run_downward_and_never_take_private_names() -> None:
    from pathlib import Path

    root = Path(hfbatch.__file__).parent
    upward, private = [], []
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        for target, names in _imports(path, module):
            if target != "hfbatch" and _layer(target) > _layer(module):
                upward.append(f"{module} -> {target}")
            for name in names:
                submodule = f"{target}.{name}"
                if name.startswith("_") and name != "__version__" and not (root.parent / (submodule.replace(".", "/") + ".py")).exists():
                    private.append(f"{module} imports {target}.{name}")
    assert not upward, upward
    assert not private, private
