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
