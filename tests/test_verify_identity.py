"""tools/verify.py rebuilds the backend that made an output from OUTPUT_IDENTITY (options.py, the
one list of what identifies an output's vectors): every name there is read back from the sidecar
or placed, with where verify takes it from instead."""

from __future__ import annotations

from hfbatch.options import OUTPUT_IDENTITY
from hfbatch.tools import verify


def test_every_identity_option_is_read_back_or_placed() -> None:
    read = set(verify.recorded_identity({"model_id": "m", "backend": "local"}))
    assert not read & set(verify._NOT_REBUILT)
    assert read | set(verify._NOT_REBUILT) == set(OUTPUT_IDENTITY), "say how a sidecar records the new option"


def test_a_remote_outputs_pooling_is_read_back() -> None:
    prov = {"model_id": "m", "backend": "tei", "backends": {"tei": {"endpoint": "http://127.0.0.1:1", "pooling": "mean"}}}
    assert verify.recorded_identity(prov)["remote_pooling"] == "mean"
    prov["backends"]["tei"]["pooling"] = "server"
    assert verify.recorded_identity(prov)["remote_pooling"] is None
