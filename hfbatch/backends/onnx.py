"""ONNX Runtime for the local backend: the same weights exported once, optionally int8.

`--runtime onnx` exports the model's transformer with its pooling (and normalisation) to ONNX,
caches the file under the user cache dir keyed by the model fingerprint, and runs it with ONNX
Runtime. The export traces the eager attention (plain MatMul/Softmax): ONNX Runtime fuses that
pattern itself (1.10x the SDPA export's speed for MiniLM) and OpenVINO reads it as it is.

`--quantize int8` is made from that graph in three steps:
1. ONNX Runtime's transformer optimizer fuses attention, skip-LayerNorm and bias-GELU, so that the
   query/key/value projections become one Attention node, which int8 turns into QAttention (the
   largest single gain: 1.15x the unfused int8 graph).
2. SmoothQuant (Xiao et al., 2022), applied to the graph: a few hidden channels of BERT-like models
   carry activations 10-100x larger than the rest, and ONNX Runtime's dynamic quantization gives a
   whole activation tensor one scale, so those channels flatten everything else (cosine to fp32
   0.989 mean / 0.96 min for MiniLM). Each weight input of a MatMul/Attention is divided per channel
   by s = max|x|^alpha / max|W|^(1-alpha), measured on SMOOTHING_TEXTS, and the weight's input rows
   are multiplied by s: exact in fp32, and the outliers move into the per-channel-quantized weights.
3. Every weight MatMul but one is quantized dynamically to int8 with per-channel weights; the first
   block's FFN output (fed by GELU) stays fp32, because its one activation scale per tensor cost the
   most fidelity: keeping it fp32 lifts MiniLM's min cosine on 2,160 real package descriptions from
   0.979 to 0.99 for ~5% of the speed (benchmarks/int8_recipes.py).
The result is only used when a check on a calibration sample holds it to the int8 bar
(fidelity.INT8: cosine to fp32 >= 0.99 mean and >= 0.98 min), otherwise loading refuses with the figures. A model the optimizer cannot fuse is still
smoothed and quantized MatMul by MatMul (slower, same checks).
"""


from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import InputError, ModelLoadError, first_line
from .fidelity import SMOOTHING_TEXTS  # noqa: F401  (read here by tests and benchmarks/)
from .onnx_runner import OnnxRunner, release_sessions  # noqa: F401  (the runner, as this module's users knew it)

log = logging.getLogger(__name__)

SMOOTH_ALPHA = 0.8  # 0.5 (the paper's default) kept MiniLM at 0.981 mean; 0.7-0.8 reach 0.997
_PROTOBUF_LIMIT = 2_000_000_000  # one ONNX protobuf: the fused, smoothed and quantized graphs are written whole
_FP32_FFN_OUTPUTS = 1  # FFN output MatMuls kept fp32, from the first block: 1 lifts min cosine 0.979 -> 0.991
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


def graph_facts(model: Any, model_id: str) -> dict[str, Any]:
    """What the exported graph holds, read from a loaded sentence-transformers model: its pooling,
    whether it normalises, and the tokenizer outputs it takes. InputError for what it cannot hold."""
    kinds = [type(m).__name__ for m in model]
    if set(kinds) - _SUPPORTED:
        raise InputError(
            f"--runtime onnx/openvino support Transformer + Pooling (+ Normalize) models; {model_id} has "
            f"{', '.join(kinds)}. Use --runtime torch."
        )
    pooling = _pooling_mode(model[1]) if len(model) > 1 else "mean"
    if pooling not in ("mean", "cls"):
        raise InputError(f"--runtime onnx/openvino support mean or cls pooling; {model_id} uses {pooling}. "
                         "Use --runtime torch.")
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in model.tokenizer("probe")]
    return {"pooling": pooling, "normalize": kinds[-1] == "Normalize", "input_names": names}


def export_fp32(model: Any, target: Path, facts: dict[str, Any], model_id: str) -> None:
    """The transformer with its pooling (and normalisation) as one ONNX graph, written whole or not at all."""
    _export(model[0].auto_model, model.tokenizer, target, facts, model_id)


def export_int8(model: Any, target: Path, facts: dict[str, Any], model_id: str, max_length: int) -> None:
    """Export fp32, fuse it, smooth it, then quantize its weight MatMuls (and fused attention) to
    int8, all but the first _FP32_FFN_OUTPUTS FFN outputs. Written whole or not at all."""
    import shutil
    import tempfile

    from onnxruntime.quantization import QuantType, quantize_dynamic

    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    parts = {kind: work / f"{kind}.onnx" for kind in ("fp32", "fused", "smoothed", "int8")}
    try:  # every intermediate (and any external-data file the exporter wrote) lives in `work`
        _export(model[0].auto_model, model.tokenizer, parts["fp32"], facts, model_id)
        size = sum(f.stat().st_size for f in work.iterdir())
        if size >= _PROTOBUF_LIMIT:
            raise ModelLoadError(f"int8 with ONNX Runtime handles models under 2 GB; {model_id}'s export is "
                                 f"{size / 1e9:.1f} GB. Use --runtime openvino --quantize int8, or drop --quantize int8.")
        fuse(parts["fp32"], parts["fused"], model[0].auto_model.config)

        def quantize(source: Path) -> None:
            import onnx

            smooth_graph(source, parts["smoothed"], model.tokenizer, facts["input_names"], max_length)
            with _Quiet():
                quantize_dynamic(str(parts["smoothed"]), str(parts["int8"]), per_channel=True,
                                 weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Attention"],
                                 nodes_to_exclude=_ffn_outputs(parts["smoothed"])[:_FP32_FFN_OUTPUTS],
                                 # fused contrib ops have no shape inference: their outputs are float
                                 extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})

        try:
            quantize(parts["fused"])
        except Exception as exc:  # a fusion the quantizer cannot take: the unfused graph, slower but the same model
            log.info("int8 of %s's fused graph failed (%s); quantizing the unfused graph", model_id, first_line(exc))
            quantize(parts["fp32"])
        parts["int8"].replace(target)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"int8 quantization of {model_id} failed ({first_line(exc)}); drop --quantize int8.") from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)


def fuse(source: Path, target: Path, config: Any) -> bool:
    """ONNX Runtime's transformer fusions (attention, skip-LayerNorm, bias-GELU) on an encoder
    graph; True when attention was fused. A graph the optimizer cannot handle is copied unchanged:
    fusion is speed, never correctness (the int8 check compares the result with torch)."""
    import shutil

    heads, hidden = int(getattr(config, "num_attention_heads", 0) or 0), int(getattr(config, "hidden_size", 0) or 0)
    try:
        from onnxruntime.transformers.optimizer import optimize_model

        with _Quiet():
            fused = optimize_model(str(source), model_type="bert", num_heads=heads, hidden_size=hidden, opt_level=1)
            fused.save_model_to_file(str(target))
        return bool(fused.get_fused_operator_statistics().get("Attention"))
    except Exception as exc:  # an architecture the optimizer does not know: unfused is still right
        log.info("ONNX Runtime's optimizer left the graph unfused (%s)", first_line(exc))
        shutil.copyfile(source, target)
        return False


def smooth_graph(source: Path, target: Path, tokenizer: Any, input_names: Sequence[str], max_length: int,
                 alpha: float = SMOOTH_ALPHA, texts: Sequence[str] = SMOOTHING_TEXTS) -> None:
    """SmoothQuant on an ONNX graph: for each tensor that feeds weight MatMuls or Attention nodes,
    a Mul by 1/s is inserted on those edges only (the same tensor's residual path is untouched)
    and the consumers' weight rows are multiplied by s. Exact in fp32; s from max|x| per channel
    over `texts` (run by ONNX Runtime with those tensors as extra outputs)."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    model = onnx.load(str(source))
    graph = model.graph
    weights = {w.name: w for w in graph.initializer}
    groups: dict[str, list[Any]] = {}  # input tensor -> the nodes that multiply it by a constant weight
    for node in graph.node:
        if node.op_type in ("MatMul", "Attention") and len(node.input) > 1 and node.input[1] in weights \
                and len(weights[node.input[1]].dims) == 2:
            groups.setdefault(node.input[0], []).append(node)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, None) for x in groups)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    peaks: dict[str, np.ndarray] = {}
    for i in range(0, len(texts), 8):
        batch = tokenizer(list(texts[i:i + 8]), padding=True, truncation=True, max_length=max_length, return_tensors="np")
        for name, value in zip(groups, session.run(list(groups), {n: batch[n].astype(np.int64) for n in input_names})):
            peak = np.abs(value).reshape(-1, value.shape[-1]).max(0)
            peaks[name] = np.maximum(peaks[name], peak) if name in peaks else peak
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output}
    users: dict[str, set[str]] = {}  # weight -> the inputs it multiplies
    for x, consumers in groups.items():
        for c in consumers:
            users.setdefault(c.input[1], set()).add(x)
    inserts: list[tuple[int, Any]] = []
    for x, consumers in groups.items():
        if any(len(users[c.input[1]]) > 1 for c in consumers):
            continue  # a weight shared by layers with other inputs (ALBERT-style) cannot take one input's scale
        ws = [numpy_helper.to_array(weights[c.input[1]]) for c in consumers]
        x_peak = np.maximum(peaks[x], 1e-5)
        w_peak = np.maximum(np.max([np.abs(w).max(1) for w in ws], axis=0), 1e-5)
        scale = np.maximum(x_peak ** alpha / w_peak ** (1 - alpha), 1e-5).astype(np.float32)
        for c, w in zip(consumers, ws):
            weights[c.input[1]].CopyFrom(numpy_helper.from_array((w * scale[:, None]).astype(np.float32), c.input[1]))
        inverse = numpy_helper.from_array((1.0 / scale).astype(np.float32), f"{x}/smooth_inverse")
        graph.initializer.append(inverse)
        inserts.append((producer.get(x, -1), helper.make_node("Mul", [x, inverse.name], [f"{x}/smoothed"],
                                                              name=f"{x}/smooth")))
        for c in consumers:
            c.input[0] = f"{x}/smoothed"
    nodes = list(graph.node)
    for position, mul in sorted(inserts, key=lambda t: -t[0]):  # right after its producer: still topological
        nodes.insert(position + 1, mul)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(model, str(target))


def _ffn_outputs(path: Path) -> list[str]:
    """The FFN output MatMuls of a graph in block order: those whose constant weight narrows
    (more input rows than output columns, 1536 -> 384 in MiniLM)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    shapes = {w.name: tuple(w.dims) for w in graph.initializer}
    return [n.name for n in graph.node if n.op_type == "MatMul" and len(shapes.get(n.input[1], ())) == 2
            and shapes[n.input[1]][0] > shapes[n.input[1]][1]]


def _temp_name(target: Path, kind: str) -> Path:
    """A name of this process's own beside `target`: two first jobs exporting the same model at
    once each write their own file, and the last whole one is renamed into place."""
    import os
    import uuid

    return target.with_name(f".{target.name}.{kind}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial")


def _export(transformer: Any, tokenizer: Any, target: Path, facts: dict[str, Any], model_id: str) -> None:
    import torch

    transformer = transformer.eval().to("cpu")
    attention = getattr(transformer.config, "_attn_implementation", None)
    switch = attention not in (None, "eager") and hasattr(transformer, "set_attn_implementation")
    pooling, normalize, names = facts["pooling"], facts["normalize"], facts["input_names"]

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

    temp = _temp_name(target, "export")
    try:
        if switch:
            transformer.set_attn_implementation("eager")  # plain ops: fusable by ORT, readable by OpenVINO
        probe = tokenizer(["a short text", "a somewhat longer probe text"], padding=True, return_tensors="pt")
        target.parent.mkdir(parents=True, exist_ok=True)
        with _Quiet():
            torch.onnx.export(
                Graph(), tuple(probe[n] for n in names), str(temp), input_names=names, output_names=["embedding"],
                dynamic_axes={**{n: {0: "batch", 1: "tokens"} for n in names}, "embedding": {0: "batch"}},
                opset_version=17, dynamo=False,
            )
        temp.replace(target)  # a cached export is always whole
    except Exception as exc:
        temp.unlink(missing_ok=True)
        raise ModelLoadError(f"exporting {model_id} to ONNX failed ({first_line(exc)}); use --runtime torch.") from exc
    finally:
        if switch:
            try:
                transformer.set_attn_implementation(attention)  # the torch runtime keeps its faster kernel
            except Exception:  # never hide the export's own error; the model stays correct, only slower
                log.warning("could not switch %s back to %s attention after the export", model_id, attention)


def int8_recipe() -> str:
    """Names how int8 is made (scheme, alpha, MatMuls kept fp32, smoothing texts): part of the backend
    fingerprint, so a changed recipe gets a new export and never serves vectors cached from the old one."""
    import hashlib

    h = hashlib.blake2b(digest_size=6)
    from .exports import package_version

    runtime = package_version("onnxruntime")  # its fusions and int8 kernels: another version, other vectors
    h.update(f"eager-export+ort-fusion+graph-smoothquant+dynamic-per-channel-qattention|{SMOOTH_ALPHA}|"
             f"fp32-ffn-outputs={_FP32_FFN_OUTPUTS}|onnxruntime={runtime}|".encode())
    h.update("\x1f".join(SMOOTHING_TEXTS).encode())
    return f"int8-fused-sq{SMOOTH_ALPHA}-ffn{_FP32_FFN_OUTPUTS}fp32-{h.hexdigest()}"


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

