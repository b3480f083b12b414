"""The public names users import from `hfbatch`, and the error hierarchy they catch."""

import hfbatch
from hfbatch import errors


def test_public_names() -> None:
    assert set(hfbatch.__all__) == {
        "__version__", "embed_file", "run_embed", "EmbedOptions", "EmbedResult", "HfbatchError", "InputError",
        "OutputError", "BackendError", "ModelLoadError", "RemoteError", "TransientBackendError", "TerminalBackendError",
        "TooManyErrors",
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
