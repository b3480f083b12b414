"""ONNX Runtime for the local backend: the same weights exported once, optionally int8.

`--runtime onnx` exports the model's transformer with its pooling (and normalisation) to ONNX,
caches the file under the user cache dir keyed by the model fingerprint, and runs it with ONNX
Runtime. `--quantize int8` quantizes the weight matrices dynamically, per channel, keeping the
most sensitive layers (each block's feed-forward output and the last block's feed-forward input)
in fp32; it is only used when a check on a calibration sample keeps cosine to fp32 >= 0.99 mean
and >= 0.98 min, otherwise loading refuses with the figures.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import InputError, ModelLoadError

log = logging.getLogger(__name__)

INT8_MIN_MEAN = 0.99
INT8_MIN_MIN = 0.98
_SUPPORTED = {"Transformer", "Pooling", "Normalize"}


def _pooling_mode(module: Any) -> str:
    mode = getattr(module, "pooling_mode", None)
    if isinstance(mode, str):
        return mode
    config = module.get_config_dict() if hasattr(module, "get_config_dict") else {}
    for key, name in (("pooling_mode_mean_tokens", "mean"), ("pooling_mode_cls_token", "cls")):
        if config.get(key):
            return name
    return str(config.get("pooling_mode", "unknown"))


class OnnxEncoder:
    """Tokenize with the model's tokenizer, run the exported graph, return float32 vectors."""

    def __init__(self, model: Any, *, model_id: str, export_dir: Path, fingerprint: str, quantize: str | None):
        kinds = [type(m).__name__ for m in model]
        if set(kinds) - _SUPPORTED:
            raise InputError(
                f"--runtime onnx supports Transformer + Pooling (+ Normalize) models; {model_id} has "
                f"{', '.join(kinds)}. Use --runtime torch."
            )
        pooling = _pooling_mode(model[1]) if len(model) > 1 else "mean"
        if pooling not in ("mean", "cls"):
            raise InputError(f"--runtime onnx supports mean or cls pooling; {model_id} uses {pooling}. Use --runtime torch.")
        self.model, self.model_id, self.pooling = model, model_id, pooling
        self.normalize = kinds[-1] == "Normalize"
        self.tokenizer = model.tokenizer
        self.input_names = [n for n in ("input_ids", "attention_mask", "token_type_ids")
                            if n in self.tokenizer("probe", return_tensors="np")]
        export_dir.mkdir(parents=True, exist_ok=True)
        base = export_dir / f"{fingerprint.replace(':', '-')}.onnx"
        if not base.exists():
            self._export(base)
        path = base
        if quantize == "int8":
            path = base.with_suffix(".int8.onnx")
            if not path.exists():
                self._quantize(base, path)
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.path = path

    def _export(self, target: Path) -> None:
        import torch

        transformer = self.model[0].auto_model.eval().to("cpu")
        pooling, normalize = self.pooling, self.normalize

        class Graph(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.m = transformer

            def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
                named = dict(zip(names, inputs))
                hidden = self.m(**named).last_hidden_state
                if pooling == "cls":
                    out = hidden[:, 0]
                else:
                    mask = named["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                    out = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                if normalize:
                    out = torch.nn.functional.normalize(out, p=2, dim=1)
                return out

        names = self.input_names
        probe = self.tokenizer(["a short text", "a somewhat longer probe text"], padding=True, return_tensors="pt")
        temp = target.with_suffix(".partial")
        try:
            with _Quiet():
                torch.onnx.export(
                    Graph(), tuple(probe[n] for n in names), str(temp), input_names=names, output_names=["embedding"],
                    dynamic_axes={**{n: {0: "batch", 1: "tokens"} for n in names}, "embedding": {0: "batch"}},
                    opset_version=17, dynamo=False,
                )
            temp.replace(target)  # a cached export is always whole
        except Exception as exc:
            temp.unlink(missing_ok=True)
            raise ModelLoadError(f"exporting {self.model_id} to ONNX failed ({exc}); use --runtime torch.") from exc

    def _quantize(self, source: Path, target: Path) -> None:
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        matmuls = [n.name for n in onnx.load(str(source)).graph.node if n.op_type == "MatMul"]
        # sensitive layers stay fp32: every block's FFN output projection, the last block's FFN input
        layers = sorted({name.split("/layer.")[1].split("/")[0] for name in matmuls if "/layer." in name}, key=int)
        keep = [n for n in matmuls if n.endswith("/output/dense/MatMul") and "/attention/" not in n]
        if layers:
            keep += [n for n in matmuls if f"/layer.{layers[-1]}/intermediate/" in n]
        temp = target.with_suffix(".partial")
        try:
            with _Quiet():
                quantize_dynamic(str(source), str(temp), per_channel=True, weight_type=QuantType.QInt8,
                                 op_types_to_quantize=["MatMul"], nodes_to_exclude=keep)
            temp.replace(target)
        except Exception as exc:
            temp.unlink(missing_ok=True)
            raise ModelLoadError(f"int8 quantization of {self.model_id} failed ({exc}); drop --quantize int8.") from exc

    def encode(self, texts: Sequence[str], max_length: int) -> np.ndarray:
        batch = self.tokenizer([t.strip() for t in texts], padding=True, truncation=True, max_length=max_length,
                               return_tensors="np")
        feeds = {n: batch[n].astype(np.int64) for n in self.input_names}
        return np.asarray(self.session.run(None, feeds)[0], dtype=np.float32)


class _Quiet:
    """Silence the exporter's tracer warnings and the quantizer's root-logger advice: the
    fidelity check after loading is what tells whether the result is right."""

    def __enter__(self) -> None:
        import warnings

        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)

    def __exit__(self, *exc: object) -> None:
        logging.disable(logging.NOTSET)
        self._warnings.__exit__(*exc)


def check_int8(reference: np.ndarray, quantized: np.ndarray, model_id: str) -> dict[str, float]:
    """Cosine of int8 to fp32 vectors; refuse below 0.99 mean / 0.98 min with the figures."""
    cosine = (reference * quantized).sum(1) / (np.linalg.norm(reference, axis=1) * np.linalg.norm(quantized, axis=1))
    figures = {"mean": float(cosine.mean()), "min": float(cosine.min())}
    if figures["mean"] < INT8_MIN_MEAN or figures["min"] < INT8_MIN_MIN:
        raise ModelLoadError(
            f"int8 {model_id} is not faithful enough on the calibration sample: cosine to fp32 mean "
            f"{figures['mean']:.4f} (needs >= {INT8_MIN_MEAN}), min {figures['min']:.4f} (needs >= {INT8_MIN_MIN}); "
            "drop --quantize int8 (bf16 may be the faster faithful choice: --precision auto)."
        )
    return figures
