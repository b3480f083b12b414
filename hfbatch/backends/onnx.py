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
The result is only used when a check on a calibration sample keeps cosine to fp32 >= 0.99 mean and
>= 0.98 min, otherwise loading refuses with the figures. A model the optimizer cannot fuse is still
smoothed and quantized MatMul by MatMul (slower, same checks).
"""


from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import InputError, ModelLoadError
from ..vectors import cosine_rows

log = logging.getLogger(__name__)

INT8_MIN_MEAN = 0.99
INT8_MIN_MIN = 0.98
SMOOTH_ALPHA = 0.8  # 0.5 (the paper's default) kept MiniLM at 0.981 mean; 0.7-0.8 reach 0.997
_PROTOBUF_LIMIT = 2_000_000_000  # one ONNX protobuf: the fused, smoothed and quantized graphs are written whole
_FP32_FFN_OUTPUTS = 1  # FFN output MatMuls kept fp32, from the first block: 1 lifts min cosine 0.979 -> 0.991
# Varied text the activation ranges are measured on: kinds, lengths, languages and symbols that
# embed jobs meet. Fixed, so one model always gets the same int8 export.
SMOOTHING_TEXTS = [
    "The kettle boils fast and the handle stays cool.",
    "Arrived broken; the glass lid was cracked in two places and support never answered.",
    "10/10 would recommend!!!",
    "ok", "A", "N/A", "SKU-4471-B / lot 2026-11 / 3 units @ $19.99", "https://example.com/a?b=c&d=1",
    "How do I reset my password if I no longer have access to the email on my account?",
    "What is the capital of Australia, and why is it not Sydney?",
    "Return a new array of given shape and type, filled with zeros.",
    "Raises ValueError if the input contains NaN or infinite values; use np.nan_to_num first.",
    "def mean(xs: list[float]) -> float:\n    return sum(xs) / len(xs)",
    "SELECT customer_id, SUM(total) FROM orders WHERE created_at > '2026-01-01' GROUP BY 1;",
    "The mitochondria generate most of the chemical energy needed to power a cell's reactions.",
    "In 1969 the Apollo 11 mission landed the first humans on the Moon, six hours after touchdown.",
    "Quarterly revenue rose 12% year over year to $4.2 billion, driven by subscription growth.",
    "The patient presented with a persistent dry cough, mild fever and fatigue for ten days.",
    "Preheat the oven to 200C. Mix flour, butter and a pinch of salt until the dough is crumbly.",
    "Très bien, je recommande. Sehr gut verarbeitet, aber etwas teuer. Muy cómodo y ligero.",
    "这个产品质量很好，物流也很快。", "製品はとても良いです。", "Отличный товар, всем советую.",
    "مرحبا بكم في متجرنا", "🔥🔥🔥 love it 😍 #bestbuy", "ERROR 503: upstream timed out (retry 3/5)",
    "Terms and conditions: the warranty does not cover damage caused by misuse, accidents, "
    "unauthorised repairs or normal wear and tear, and is void if the serial number is removed.",
    " ".join(["This review goes on at length about every detail of the product."] * 12),
    " ".join(["Section 4.2 describes how the scheduler assigns shards to workers, how a failed worker's "
              "shards are retried, and why the retry budget is bounded."] * 6),
    "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor",
    "Q: Is it dishwasher safe? A: Yes, top rack only, according to the manual.",
    "1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144",
    # everyday English of mixed length: most embed jobs are reviews, tickets, comments, articles
    "Really happy with this one.", "Total waste of cash.", "Works as described, nothing more.",
    "Good overall, but the strap broke after a month and the replacement took weeks to arrive.",
    "Pretty design, yet the paint chips if you look at it wrong. I'd only rebuy on sale.",
    "Looks great, but the cord is short, so bring an extension lead if your socket is far away.",
    "My daughter uses it every day for school and it still charges overnight without problems.",
    "Customer service answered my question within an hour and sent a new part the next day.",
    "The instructions were clear and setup took about ten minutes, including the app pairing.",
    "Much smaller than expected - measure your shelf before ordering, the photos make it look huge.",
    "Costs more than the rest, though the quality is noticeably better than cheaper brands.",
    "It's \"good enough\" as a backup, not as a main device. Battery drains quickly with GPS on.",
    "Cheap and cheerful, and frankly nicer than the famous-brand version my sister owns.",
    "The app keeps disconnecting, which makes it almost useless for tracking my runs.",
    "Middling: handy, slightly expensive, average build. Delivery was fast and well packed.",
    "Thanks for the quick reply! Unfortunately the issue is still there after the update.",
    "Please cancel my order #88213, I was charged twice for the same item.",
    "Hi team, the export button does nothing in Firefox 121 on Windows; Chrome works fine.",
    "I moved here three years ago and the neighbourhood has changed a lot since the new station opened.",
    "The council approved the budget on Tuesday after a long debate about road repairs and libraries.",
    "Researchers found that people who slept less than six hours were more likely to catch a cold.",
    "The team scored twice in the last ten minutes to win the final, their first title in twenty years.",
    "Stir the sauce gently, taste it, and add lemon juice or salt until the balance feels right.",
    "We hiked for five hours along the ridge; the view at the top made every step worth it.",
    "Honestly the best coffee grinder I've owned: consistent grind, quiet motor, easy to clean. "
    "The only downside is the small hopper, which needs refilling every couple of days.",
    "I was skeptical at first because of the mixed reviews, but after two weeks of daily use I can say "
    "it does exactly what it promises. Setup was simple, the materials feel solid, and the company "
    "answered my one question politely. Minus one star for the packaging, which was mostly plastic.",
    "The novel follows three generations of a family through war, emigration and return, and although "
    "the middle section drags, the final chapters tie the stories together beautifully.",
]
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


class OnnxRunner:
    """An ONNX Runtime session over an exported graph: feeds in, float32 vectors out. Needs only
    onnxruntime (no torch): the start-up of a job whose export is cached."""

    def __init__(self, path: Path, *, fresh: bool = False):
        self.path = Path(path)
        # one session per file and process (a suite or notebook runs many jobs); fresh: a new one
        self.session = _session.__wrapped__(str(self.path)) if fresh else _session(str(self.path))
        self.input_names = [i.name for i in self.session.get_inputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(self.session.run(None, {n: feeds[n] for n in self.input_names})[0], dtype=np.float32)


def release_sessions() -> None:
    """Let go of every cached session (selection measures one configuration at a time)."""
    _session.cache_clear()


@functools.lru_cache(maxsize=4)
def _session(path: str) -> Any:
    """One session per file and process (a test suite or notebook runs many jobs)."""
    import onnxruntime as ort

    from ..resources import max_model_memory_bytes

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # under MAX_MODEL_MEMORY_GB, no memory arena: it keeps the largest batch's activations (~300 MB
    # more for MiniLM at 32 x 256 tokens) for ~5-15% speed
    options.enable_cpu_mem_arena = max_model_memory_bytes() is None
    try:
        return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelLoadError(f"ONNX Runtime cannot load {path} ({_first_line(exc)}); delete it to export again, "
                             "or use --runtime torch.") from exc


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


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
            log.info("int8 of %s's fused graph failed (%s); quantizing the unfused graph", model_id, _first_line(exc))
            quantize(parts["fp32"])
        parts["int8"].replace(target)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"int8 quantization of {model_id} failed ({_first_line(exc)}); drop --quantize int8.") from exc
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
        log.info("ONNX Runtime's optimizer left the graph unfused (%s)", _first_line(exc))
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
        raise ModelLoadError(f"exporting {model_id} to ONNX failed ({_first_line(exc)}); use --runtime torch.") from exc
    finally:
        if switch:
            try:
                transformer.set_attn_implementation(attention)  # the torch runtime keeps its faster kernel
            except Exception:  # never hide the export's own error; the model stays correct, only slower
                log.warning("could not switch %s back to %s attention after the export", model_id, attention)


class OnnxEncoder:
    """Export (once, cached in export_dir) and run a loaded sentence-transformers model: the
    one-object form of graph_facts + export_fp32/export_int8 + OnnxRunner."""

    def __init__(self, model: Any, *, model_id: str, export_dir: Path, fingerprint: str, quantize: str | None):
        facts = graph_facts(model, model_id)
        self.pooling, self.normalize, self.input_names = facts["pooling"], facts["normalize"], facts["input_names"]
        self.tokenizer = model.tokenizer
        self.max_length = int(getattr(model, "max_seq_length", None) or 512)
        export_dir.mkdir(parents=True, exist_ok=True)
        path = export_dir / f"{fingerprint.replace(':', '-')}.onnx"
        if quantize == "int8":
            path = path.with_suffix(".int8.onnx")
            if not path.exists():
                export_int8(model, path, facts, model_id, self.max_length)
        elif not path.exists():
            export_fp32(model, path, facts, model_id)
        self.runner = OnnxRunner(path)
        self.session, self.path = self.runner.session, path

    def encode(self, texts: Sequence[str], max_length: int) -> np.ndarray:
        batch = self.tokenizer([t.strip() for t in texts], padding=True, truncation=True, max_length=max_length,
                               return_tensors="np")
        return self.runner.run({n: batch[n].astype(np.int64) for n in self.input_names})


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


def check_int8(reference: np.ndarray, quantized: np.ndarray, model_id: str,
               sample: str = "the calibration sample") -> dict[str, float]:
    """Cosine of int8 to fp32 vectors; refuse below 0.99 mean / 0.98 min with the figures."""
    cosine = cosine_rows(reference, quantized)
    figures = {"mean": float(cosine.mean()), "min": float(cosine.min())}
    if figures["mean"] < INT8_MIN_MEAN or figures["min"] < INT8_MIN_MIN:
        raise ModelLoadError(
            f"int8 {model_id} is not faithful enough on {sample}: cosine to fp32 mean "
            f"{figures['mean']:.4f} (needs >= {INT8_MIN_MEAN}), min {figures['min']:.4f} (needs >= {INT8_MIN_MIN}); "
            "drop --quantize int8 (bf16 may be the faster faithful choice: --precision auto)."
        )
    return figures
