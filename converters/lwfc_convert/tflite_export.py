"""Edge half -> fully int8 TFLite with litert-torch PT2E post-training quantization.

Recipe (litert-torch 0.10.0, torch 2.13): torch.export -> PT2EQuantizer with per-channel symmetric weights
-> prepare_pt2e -> calibrate on real images -> convert_pt2e(fold_quantize=False) -> litert_torch.convert
with the same quantizer, wrapped in to_channel_last_io so that input and output are NHWC.

Pitfall handled here: torch.export emits ``aten.relu6.default``/``aten.hardtanh`` and ``aten.add.Tensor``
nodes without ``source_fn_stack``; litert-torch's stock annotators then skip them, ReLU6 outputs and
residual sums silently stay float (DEQUANTIZE ops inside, a float32 output) and nothing raises.
:class:`FullInt8Quantizer` annotates them (conv+ReLU6 fused like conv+ReLU, add(+ReLU) fused, padding
sharing its input's quantization) and :func:`check_int8` verifies the result op by op.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from lwfc.edge import make_interpreter

from .aten import ACT_TARGETS, ADD_TARGETS, CAT_TARGETS, CONV_TARGETS, SHARE_TARGETS, STANDALONE_ACT_TARGETS, aten_name
from .qat import fix_input_quantization, limit_ranges


class ExportError(RuntimeError):
    """The edge half could not be exported or converted; the message names the failing op when known."""


def make_quantizer() -> Any:
    """A :class:`PT2EQuantizer` subclass that also annotates ReLU6/hardtanh, bare ReLU, add and pad nodes."""
    from litert_torch.quantize import pt2e_quantizer as pq
    from litert_torch.quantize import pt2e_quantizer_utils as qu
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, SharedQuantizationSpec

    class FullInt8Quantizer(pq.PT2EQuantizer):
        """PT2EQuantizer that leaves no float activations behind (see module docstring)."""

        def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            # Same as PT2EQuantizer.annotate, with our annotations inserted *before* the propagation
            # step: propagation would otherwise make hardtanh/ReLU6 share the conv's (pre-clipping)
            # observer, wasting most of the int8 range on values the activation removes.
            model = self._annotate_for_static_quantization_config(model)
            self._annotate_missing(model)
            qu.propagate_annotation(model)
            return model

        def _annotate_missing(self, model: torch.fx.GraphModule) -> None:
            cfg = self.global_config
            in_q = qu.get_input_act_qspec(cfg)
            out_q = qu.get_output_act_qspec(cfg)

            def annotated(n: Any) -> bool:
                a = n.meta.get("quantization_annotation")
                return bool(a and a._annotated)

            for n in model.graph.nodes:
                if n.op != "call_function":
                    continue
                name = aten_name(n)
                if name in ACT_TARGETS and not annotated(n):
                    prev = n.args[0]
                    pa = prev.meta.get("quantization_annotation")
                    if (aten_name(prev) in CONV_TARGETS and pa is not None and len(prev.users) == 1):
                        # Fuse conv + activation: the conv output stays float inside the fused op.
                        pa.output_qspec = None
                        n.meta["quantization_annotation"] = QuantizationAnnotation(
                            output_qspec=out_q, _annotated=True)
                    elif aten_name(prev) in ADD_TARGETS and not annotated(prev) and len(prev.users) == 1:
                        # add + activation, fused.
                        qmap = {a: in_q for a in prev.args[:2] if isinstance(a, torch.fx.Node)}
                        prev.meta["quantization_annotation"] = QuantizationAnnotation(
                            input_qspec_map=qmap, _annotated=True)
                        n.meta["quantization_annotation"] = QuantizationAnnotation(
                            output_qspec=out_q, _annotated=True)
                    else:
                        n.meta["quantization_annotation"] = QuantizationAnnotation(
                            input_qspec_map={prev: in_q}, output_qspec=out_q, _annotated=True)
            for n in model.graph.nodes:
                if n.op != "call_function" or annotated(n):
                    continue
                name = aten_name(n)
                if name in STANDALONE_ACT_TARGETS:
                    prev = n.args[0]
                    n.meta["quantization_annotation"] = QuantizationAnnotation(
                        input_qspec_map={prev: in_q}, output_qspec=out_q, _annotated=True)
                elif name in ADD_TARGETS:
                    qmap = {a: in_q for a in n.args[:2] if isinstance(a, torch.fx.Node)}
                    n.meta["quantization_annotation"] = QuantizationAnnotation(
                        input_qspec_map=qmap, output_qspec=out_q, _annotated=True)
                elif name in CAT_TARGETS:
                    # All inputs and the output share one scale (TFLite CONCATENATION without rescaling);
                    # inputs quantized differently upstream are requantized int8 -> int8.
                    inputs = [a for a in n.args[0] if isinstance(a, torch.fx.Node)]
                    first = inputs[0]
                    shared = SharedQuantizationSpec((first, n))
                    qmap = {a: (in_q if a is first else shared) for a in inputs}
                    n.meta["quantization_annotation"] = QuantizationAnnotation(
                        input_qspec_map=qmap, output_qspec=shared, _annotated=True)
                elif name in SHARE_TARGETS:
                    prev = n.args[0]
                    # Zero padding and max pooling keep the input's scale/zero point (a pad writes the zero
                    # point, a max picks one of the inputs).
                    n.meta["quantization_annotation"] = QuantizationAnnotation(
                        input_qspec_map={prev: in_q},
                        output_qspec=SharedQuantizationSpec((prev, n)), _annotated=True)

    q = FullInt8Quantizer().set_global(pq.get_symmetric_quantization_config(is_per_channel=True))
    return q


def quantize_edge(
    edge: nn.Module, calib: Iterable[torch.Tensor], example: torch.Tensor, progress: bool = True,
    input_qparams: tuple[float, int] | None = None, range_limits: dict[str, tuple[float, float]] | None = None,
) -> tuple[Any, Any]:
    """Export, annotate, calibrate and convert (PT2E) the NCHW ``edge`` half; returns (quantized graph
    module, quantizer). ``input_qparams``: the input's (scale, zero point), replacing the calibrated ones
    (``preprocess.exact_int8_input``). ``range_limits``: module path -> (lo, hi) bounds on calibrated output
    ranges (``qat.limit_ranges``; from ``equalize``)."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from tqdm import tqdm

    try:
        exported = torch.export.export(edge.eval(), (example,)).module()
    except Exception as exc:
        raise ExportError(f"torch.export failed on the edge half: {first_line(exc)}") from exc
    quantizer = make_quantizer()
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for x in tqdm(calib, desc="calibrating", unit="batch", disable=not progress, leave=False):
            # The export is specialised to batch 1 (so is the TFLite model): feed images one by one.
            for i in range(len(x)):
                prepared(x[i : i + 1])
    quantized = convert_pt2e(prepared, fold_quantize=False)
    if range_limits:
        limit_ranges(quantized, range_limits)
    if input_qparams is not None:
        fix_input_quantization(quantized, *input_qparams)
    return quantized, quantizer


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` of an exception, for one-line error reports."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def convert_edge_to_tflite(
    edge: nn.Module,
    calib: Iterable[torch.Tensor],
    example: torch.Tensor,
    output: str | Path,
    progress: bool = True,
    refine: Callable[[Any], dict[str, Any]] | None = None,
    input_qparams: tuple[float, int] | None = None,
    range_limits: dict[str, tuple[float, float]] | None = None,
) -> dict[str, Any]:
    """Quantize ``edge`` (NCHW float) to an int8 TFLite file with NHWC int8 input and output.

    ``calib`` yields NCHW float batches of real preprocessed images; ``example`` is one NCHW batch of 1.
    ``refine``, if given, changes the converted PT2E graph in place before the TFLite conversion (e.g.
    ``qat.qat_finetune``) and returns a summary, stored under ``"refine"``. ``input_qparams``: the input's
    int8 (scale, zero point) instead of the calibrated ones, ``range_limits`` bounds on calibrated ranges (see
    :func:`quantize_edge`). Returns the interpreter's
    input/output details (shape, dtype, scale, zero point) and timings."""
    import litert_torch
    from litert_torch.quantize.quant_config import QuantConfig

    t0 = time.time()
    quantized, quantizer = quantize_edge(edge, calib, example, progress, input_qparams, range_limits)
    t_quant = time.time() - t0
    refined = refine(quantized) if refine is not None else None
    nhwc = litert_torch.to_channel_last_io(quantized, args=[0], outputs=[0])
    example_nhwc = example.permute(0, 2, 3, 1).contiguous()
    try:
        model = litert_torch.convert(nhwc, (example_nhwc,), quant_config=QuantConfig(pt2e_quantizer=quantizer))
    except Exception as exc:
        import re

        m = re.search(r"Lowering not found: (\S+)", str(exc))
        if m:
            raise ExportError(f"the edge half uses op {m.group(1)}, which litert-torch cannot convert to "
                              "TFLite; split earlier or replace that op") from exc
        raise ExportError(f"litert-torch conversion failed: {first_line(exc)}") from exc
    output = Path(output)
    model.export(str(output))
    info = tflite_io_details(output)
    info["conversion_seconds"] = time.time() - t0
    info["pt2e_seconds"] = t_quant  # export + observers + calibration + convert_pt2e
    info["size_bytes"] = output.stat().st_size
    info["refine"] = refined
    return info


def tflite_io_details(path: str | Path) -> dict[str, Any]:
    """Input and output of a single-signature TFLite model: shape, dtype, scale and zero point."""
    interp = make_interpreter(path)

    def det(d: dict[str, Any]) -> dict[str, Any]:
        scale, zp = d["quantization"]
        return {"shape": [int(v) for v in d["shape"]], "dtype": np.dtype(d["dtype"]).name,
                "scale": float(scale), "zero_point": int(zp), "layout": "NHWC"}

    return {"input": det(interp.get_input_details()[0]), "output": det(interp.get_output_details()[0])}


def list_ops(path: str | Path) -> list[dict[str, Any]]:
    """Ops of a TFLite model with the dtypes of their inputs and outputs (for the int8 check)."""
    interp = make_interpreter(path)
    tensors = {t["index"]: t for t in interp.get_tensor_details()}
    ops = []
    for op in interp._get_ops_details():
        ins = [np.dtype(tensors[i]["dtype"]).name for i in op["inputs"] if i >= 0 and i in tensors]
        outs = [np.dtype(tensors[i]["dtype"]).name for i in op["outputs"] if i in tensors]
        ops.append({"op": op["op_name"], "inputs": ins, "outputs": outs})
    return ops


def check_int8(path: str | Path) -> list[str]:
    """Problems that make a model not fully int8 (empty list when it is): a float input or output, any
    QUANTIZE/DEQUANTIZE op, any op computing in float32."""
    problems = []
    d = tflite_io_details(path)
    for k in ("input", "output"):
        if d[k]["dtype"] != "int8":
            problems.append(f"model {k} is {d[k]['dtype']}, not int8")
    for op in list_ops(path):
        if op["op"] in ("DEQUANTIZE", "QUANTIZE") and "float32" in op["inputs"] + op["outputs"]:
            problems.append(f"{op['op']} op with float32 tensors inside the model")
        elif op["op"] not in ("DEQUANTIZE", "QUANTIZE") and "float32" in op["outputs"]:
            problems.append(f"{op['op']} computes in float32")
    return problems


def run_tflite(interp: Any, x_nchw: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Quantize NCHW float images with the model's input scale/zero point, run one image at a time
    (the model has batch 1), return (int8 outputs NHWC, dequantized float outputs NHWC)."""
    inp = interp.get_input_details()[0]
    out = interp.get_output_details()[0]
    s_in, z_in = inp["quantization"]
    s_out, z_out = out["quantization"]
    x = np.asarray(x_nchw, dtype=np.float32).transpose(0, 2, 3, 1)
    q_in = np.clip(np.round(x / s_in) + z_in, -128, 127).astype(np.int8)
    qs = []
    for i in range(len(q_in)):
        interp.set_tensor(inp["index"], q_in[i : i + 1])
        interp.invoke()
        qs.append(interp.get_tensor(out["index"]).copy())
    q = np.concatenate(qs)
    return q, (q.astype(np.float32) - z_out) * s_out
