"""TensorFlow.js graph models (``model.json`` + binary weight shards) converted to plain torch modules.

A TF.js graph model is a frozen TensorFlow GraphDef in JSON (``modelTopology.node``) plus a weights
manifest: groups of shard files whose concatenated bytes hold every ``Const`` tensor in manifest order,
optionally quantized (float16, or affine uint8/uint16). :func:`load_graph_model` parses and validates
both; :func:`convert` turns the graph into a :class:`TfjsModule`.

Design:

- Every graph op becomes one small ``nn.Module`` placed in a module tree that mirrors the TF name scopes
  (``tower_0/MobilenetV3/expanded_conv_2/add`` -> ``MobilenetV3.expanded_conv_2.add``), so that
  :mod:`lwfc_convert.split` can trace the model with ``torch.fx`` and name cut points by TF scope.
- TF graphs are NHWC; torch convolutions want NCHW. Every 4-D activation is kept in NCHW inside the
  module and each op knows whether its inputs are "channels-first copies" of TF's NHWC tensors: layout-
  aware ops (convolutions, pooling, resize, concat, reductions, elementwise ops) work on NCHW directly
  with their axes remapped; layout-sensitive ops (reshape, slicing, top-k, gather, ...) first permute
  back to TF's NHWC order, so the numbers always follow TF's semantics.
- Shapes are static: the converter runs the graph once on an example input while building it, which
  fixes TF "SAME" padding amounts, resize tables and gather shapes. Constant sub-graphs are folded.
- Ops the converter does not implement raise :class:`UnsupportedOpError` naming all of them at once.
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class TfjsError(ValueError):
    """Base class of the converter's errors."""


class TfjsFormatError(TfjsError):
    """A model.json or weight shard that is missing, malformed, of the wrong size or of an unknown dtype."""


class UnsupportedOpError(TfjsError):
    """The graph uses ops (or op attributes) that the converter does not implement."""


# --------------------------------------------------------------------------------------------------
# Loading and validating model.json + shards
# --------------------------------------------------------------------------------------------------

# Bytes per stored element. Quantized weights are stored in the quantization dtype and restored to the
# original dtype on load (TF.js io.decodeWeights semantics).
_STORED_BYTES = {"float32": 4, "int32": 4, "bool": 1, "uint8": 1, "uint16": 2, "float16": 2}
_NUMPY_DTYPES = {"float32": np.float32, "int32": np.int32, "bool": np.bool_}


@dataclass
class GraphNode:
    """One node of the GraphDef: name, op, data inputs (``name`` or ``name:k``) and decoded attributes."""

    name: str
    op: str
    inputs: list[str]
    attr: dict[str, Any]


@dataclass
class TfjsGraph:
    """A parsed TF.js graph model: nodes in file order, decoded constants, signature, source path."""

    path: Path
    nodes: list[GraphNode]
    weights: dict[str, np.ndarray]
    inputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def op_counts(self) -> Counter:
        """How many nodes of each op type the graph has."""
        return Counter(n.op for n in self.nodes)

    def node(self, name: str) -> GraphNode:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(f"no node {name!r} in {self.path}")


def _decode_attr(value: dict[str, Any]) -> Any:
    """Turn one JSON AttrValue into a Python value (strings are base64 in the JSON encoding)."""
    if "s" in value:
        return base64.b64decode(value["s"]).decode("utf-8", "replace")
    if "i" in value:
        return int(value["i"])
    if "f" in value:
        return float(value["f"])
    if "b" in value:
        return bool(value["b"])
    if "type" in value:
        return value["type"]
    if "shape" in value:
        dims = value["shape"].get("dim", [])
        return [int(d.get("size", -1)) for d in dims]
    if "list" in value:
        lst = value["list"]
        if "s" in lst:
            return [base64.b64decode(s).decode("utf-8", "replace") for s in lst["s"]]
        if "i" in lst:
            return [int(i) for i in lst["i"]]
        if "f" in lst:
            return [float(f) for f in lst["f"]]
        if "b" in lst:
            return [bool(b) for b in lst["b"]]
        if "type" in lst:
            return list(lst["type"])
        return []
    if "tensor" in value:
        return value["tensor"]
    return None


def _decode_group(group: dict[str, Any], base: Path, model_path: Path) -> dict[str, np.ndarray]:
    """Read one manifest group: concatenate its shards, check the total size, slice out each weight."""
    paths = group.get("paths")
    specs = group.get("weights")
    if not isinstance(paths, list) or not isinstance(specs, list):
        raise TfjsFormatError(f"{model_path}: a weightsManifest group lacks 'paths' or 'weights'")
    chunks = []
    for p in paths:
        shard = base / p
        if not shard.is_file():
            raise TfjsFormatError(f"{model_path}: weight shard {p!r} is missing (looked for {shard})")
        chunks.append(shard.read_bytes())
    data = b"".join(chunks)

    # First pass: validate every spec and compute the expected size, so a wrong-size shard is reported
    # as such rather than as a confusing reshape error halfway through.
    layout = []
    offset = 0
    for spec in specs:
        name = spec.get("name")
        dtype = spec.get("dtype")
        shape = spec.get("shape", [])
        if name is None or dtype is None:
            raise TfjsFormatError(f"{model_path}: a weight spec lacks 'name' or 'dtype': {spec}")
        if dtype not in _NUMPY_DTYPES:
            raise TfjsFormatError(f"{model_path}: weight {name!r} has unsupported dtype {dtype!r} "
                                  f"(supported: {', '.join(_NUMPY_DTYPES)})")
        quant = spec.get("quantization")
        stored = dtype
        if quant is not None:
            stored = quant.get("dtype")
            if stored not in ("uint8", "uint16", "float16"):
                raise TfjsFormatError(f"{model_path}: weight {name!r} has unsupported quantization dtype "
                                      f"{stored!r} (supported: uint8, uint16, float16)")
            if stored != "float16" and ("scale" not in quant or "min" not in quant):
                raise TfjsFormatError(f"{model_path}: weight {name!r}: {stored} quantization needs scale and min")
        if any((not isinstance(d, int)) or d < 0 for d in shape):
            raise TfjsFormatError(f"{model_path}: weight {name!r} has an invalid shape {shape}")
        count = int(np.prod(shape)) if shape else 1
        nbytes = count * _STORED_BYTES[stored]
        layout.append((name, dtype, shape, quant, stored, count, offset))
        offset += nbytes
    if offset != len(data):
        sizes = ", ".join(f"{p} = {len(c)} bytes" for p, c in zip(paths, chunks))
        raise TfjsFormatError(f"{model_path}: weight shards hold {len(data)} bytes ({sizes}) but the manifest "
                              f"describes {offset} bytes: a shard is truncated, padded or the wrong file")

    out: dict[str, np.ndarray] = {}
    for name, dtype, shape, quant, stored, count, off in layout:
        if stored == "float16":
            arr = np.frombuffer(data, np.float16, count, off).astype(np.float32)
        elif stored in ("uint8", "uint16"):
            q = np.frombuffer(data, np.uint8 if stored == "uint8" else np.uint16, count, off).astype(np.float32)
            arr = q * np.float32(quant["scale"]) + np.float32(quant["min"])
            if dtype == "int32":
                arr = np.round(arr)
        else:
            arr = np.frombuffer(data, _NUMPY_DTYPES[dtype], count, off)
        out[name] = np.array(arr, dtype=_NUMPY_DTYPES[dtype]).reshape(shape)
    return out


def load_graph_model(model_json: str | Path) -> TfjsGraph:
    """Parse ``model.json`` and its weight shards (found next to it), validating sizes and dtypes.

    Raises :class:`TfjsFormatError` for a missing or malformed file, a missing shard, a shard whose size
    does not match the manifest, or a dtype/quantization that TF.js does not define for graph weights."""
    model_path = Path(model_json)
    if not model_path.is_file():
        raise TfjsFormatError(f"model file {model_path} does not exist")
    try:
        meta = json.loads(model_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TfjsFormatError(f"{model_path} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise TfjsFormatError(f"{model_path}: top level is not a JSON object")
    fmt = meta.get("format")
    if fmt not in (None, "graph-model"):
        raise TfjsFormatError(f"{model_path}: format {fmt!r} is not a TF.js graph model (layers models are "
                              "not supported)")
    topo = meta.get("modelTopology")
    if not isinstance(topo, dict) or not isinstance(topo.get("node"), list):
        raise TfjsFormatError(f"{model_path}: no modelTopology.node list")
    manifest = meta.get("weightsManifest")
    if not isinstance(manifest, list):
        raise TfjsFormatError(f"{model_path}: no weightsManifest list")
    if topo.get("library", {}).get("function"):
        raise UnsupportedOpError(f"{model_path}: graphs with functions (control flow) are not supported")

    weights: dict[str, np.ndarray] = {}
    for group in manifest:
        weights.update(_decode_group(group, model_path.parent, model_path))

    nodes = []
    for raw in topo["node"]:
        if "name" not in raw or "op" not in raw:
            raise TfjsFormatError(f"{model_path}: a node lacks 'name' or 'op': {str(raw)[:200]}")
        inputs = [i for i in raw.get("input", []) if not i.startswith("^")]  # drop control deps
        attr = {k: _decode_attr(v) for k, v in raw.get("attr", {}).items()}
        nodes.append(GraphNode(raw["name"], raw["op"], inputs, attr))
    for n in nodes:
        if n.op == "Const" and n.name not in weights:
            raise TfjsFormatError(f"{model_path}: constant {n.name!r} has no entry in the weights manifest")

    sig = meta.get("signature") or topo.get("signature") or {}
    return TfjsGraph(model_path, nodes, weights, dict(sig.get("inputs", {})), dict(sig.get("outputs", {})),
                     {k: v for k, v in meta.items() if k not in ("modelTopology", "weightsManifest")})


# --------------------------------------------------------------------------------------------------
# Op modules
# --------------------------------------------------------------------------------------------------

# NHWC axis -> NCHW dim, and the permutations between the two.
_NHWC_TO_NCHW_AXIS = (0, 2, 3, 1)
_TO_NCHW = (0, 3, 1, 2)
_TO_NHWC = (0, 2, 3, 1)

_TF_DTYPES = {"DT_FLOAT": torch.float32, "DT_INT32": torch.int32, "DT_BOOL": torch.bool,
              "DT_INT64": torch.int64, "DT_HALF": torch.float16}


def _activation(x: torch.Tensor, act: str, alpha: float) -> torch.Tensor:
    # Dispatch happens while tracing (act is a build-time string), so fx sees a single torch call.
    if act == "Relu":
        return F.relu(x)
    if act == "Relu6":
        return F.relu6(x)
    if act == "Elu":
        return F.elu(x)
    if act == "LeakyRelu":
        return F.leaky_relu(x, alpha)
    if act == "Sigmoid":
        return torch.sigmoid(x)
    if act == "Tanh":
        return torch.tanh(x)
    return x


_FUSED_ACTIVATIONS = ("Relu", "Relu6", "Elu", "LeakyRelu", "Sigmoid", "Tanh")


def _same_pads(size: int, k: int, stride: int, dilation: int) -> tuple[int, int]:
    """TF "SAME" padding (before, after) for one spatial dim: extra padding goes after (bottom/right)."""
    eff = (k - 1) * dilation + 1
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + eff - size, 0)
    return total // 2, total - total // 2


def _spatial_pads(node: GraphNode, h: int, w: int, kh: int, kw: int, sh: int, sw: int, dh: int, dw: int
                  ) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) padding for a TF padding attribute."""
    padding = node.attr.get("padding", "VALID")
    if padding == "VALID":
        return 0, 0, 0, 0
    if padding == "SAME":
        return (*_same_pads(h, kh, sh, dh), *_same_pads(w, kw, sw, dw))
    if padding == "EXPLICIT":
        p = node.attr.get("explicit_paddings", [])
        if len(p) != 8:
            raise UnsupportedOpError(f"{node.name}: EXPLICIT padding needs 8 values, got {p}")
        return p[2], p[3], p[4], p[5]
    raise UnsupportedOpError(f"{node.name} ({node.op}): padding {padding!r}")


class ConvOp(nn.Module):
    """Conv2D / DepthwiseConv2dNative and their fused forms (bias + activation), NCHW in and out.

    Symmetric padding goes into the Conv2d itself (what TFLite converters recognize best); TF's
    asymmetric "SAME" padding (stride 2, even input: one more row/column at the bottom/right) is an
    explicit zero pad first."""

    def __init__(self, conv: nn.Conv2d, pad: tuple[int, int, int, int] | None, act: str, alpha: float,
                 to_nchw: bool) -> None:
        super().__init__()
        self.pad = pad
        self.conv = conv
        self.act = act
        self.alpha = alpha
        self.to_nchw = to_nchw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.to_nchw:
            x = x.permute(*_TO_NCHW)
        if self.pad is not None:
            x = F.pad(x, self.pad)
        return _activation(self.conv(x), self.act, self.alpha)


class ElementwiseOp(nn.Module):
    """A unary or binary elementwise op. ``slots`` says, per TF input, either ("in", permute_to_nhwc) for
    a runtime tensor or ("const", buffer name) for a constant already laid out for the runtime layout."""

    def __init__(self, op: str, slots: list[tuple[str, Any]], consts: dict[str, torch.Tensor], extra: Any = None
                 ) -> None:
        super().__init__()
        self.op = op
        self.slots = slots
        self.extra = extra
        for k, v in consts.items():
            self.register_buffer(k, v, persistent=True)

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        args = []
        it = iter(xs)
        for kind, val in self.slots:
            if kind == "in":
                t = next(it)
                args.append(t.permute(*_TO_NHWC) if val else t)
            else:
                args.append(getattr(self, val))
        op = self.op
        if op in ("Add", "AddV2"):
            return args[0] + args[1]
        if op == "Sub":
            return args[0] - args[1]
        if op == "Mul":
            return args[0] * args[1]
        if op in ("RealDiv", "Div"):
            return args[0] / args[1]
        if op == "FloorDiv":
            return torch.div(args[0], args[1], rounding_mode="floor")
        if op == "FloorMod":
            return torch.remainder(args[0], args[1])
        if op == "Maximum":
            return torch.maximum(args[0], args[1])
        if op == "Minimum":
            return torch.minimum(args[0], args[1])
        if op == "Equal":
            return torch.eq(args[0], args[1])
        if op == "Greater":
            return torch.gt(args[0], args[1])
        if op == "Less":
            return torch.lt(args[0], args[1])
        if op == "Relu":
            return F.relu(args[0])
        if op == "Relu6":
            return F.relu6(args[0])
        if op == "Sigmoid":
            return torch.sigmoid(args[0])
        if op == "Tanh":
            return torch.tanh(args[0])
        if op == "Neg":
            return torch.neg(args[0])
        if op == "Exp":
            return torch.exp(args[0])
        if op == "Sqrt":
            return torch.sqrt(args[0])
        if op == "Rsqrt":
            return torch.rsqrt(args[0])
        if op == "Square":
            return args[0] * args[0]
        if op == "Identity":
            return args[0]
        if op == "Cast":
            return args[0].to(self.extra)
        raise UnsupportedOpError(op)  # unreachable: the builder checks the op first


_UNARY = {"Relu", "Relu6", "Sigmoid", "Tanh", "Neg", "Exp", "Sqrt", "Rsqrt", "Square", "Identity", "Cast"}
_BINARY = {"Add", "AddV2", "Sub", "Mul", "RealDiv", "Div", "FloorDiv", "FloorMod", "Maximum", "Minimum",
           "Equal", "Greater", "Less"}


class ReduceOp(nn.Module):
    """Mean / Sum / Max / Min over constant axes (already mapped to the runtime layout)."""

    def __init__(self, op: str, dims: tuple[int, ...], keepdim: bool, to_nhwc: bool) -> None:
        super().__init__()
        self.op, self.dims, self.keepdim, self.to_nhwc = op, dims, keepdim, to_nhwc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.to_nhwc:
            x = x.permute(*_TO_NHWC)
        if self.op == "Mean":
            return torch.mean(x, dim=self.dims, keepdim=self.keepdim)
        if self.op == "Sum":
            return torch.sum(x, dim=self.dims, keepdim=self.keepdim)
        if self.op == "Max":
            return torch.amax(x, dim=self.dims, keepdim=self.keepdim)
        return torch.amin(x, dim=self.dims, keepdim=self.keepdim)


class ConcatOp(nn.Module):
    """ConcatV2 / Pack along a constant axis (runtime layout); ``permute`` flags inputs to bring to NHWC."""

    def __init__(self, dim: int, permute: list[bool], stack: bool = False) -> None:
        super().__init__()
        self.dim, self.permute, self.stack = dim, permute, stack

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        ts = [x.permute(*_TO_NHWC) if p else x for x, p in zip(xs, self.permute)]
        return torch.stack(ts, dim=self.dim) if self.stack else torch.cat(ts, dim=self.dim)


class PoolOp(nn.Module):
    """MaxPool / AvgPool in NCHW with TF padding. Max pooling pads with -inf (TF ignores padded cells);
    average pooling excludes padded cells from the divisor, as TF does."""

    def __init__(self, op: str, kernel: tuple[int, int], stride: tuple[int, int],
                 pad: tuple[int, int, int, int], to_nchw: bool) -> None:
        super().__init__()
        self.op, self.kernel, self.stride, self.pad, self.to_nchw = op, kernel, stride, pad, to_nchw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.to_nchw:
            x = x.permute(*_TO_NCHW)
        t, b, left, r = self.pad
        if self.op == "MaxPool":
            if any(self.pad):
                x = F.pad(x, (left, r, t, b), value=float("-inf"))
            return F.max_pool2d(x, self.kernel, self.stride)
        if t == b and left == r and t <= self.kernel[0] // 2 and left <= self.kernel[1] // 2:
            return F.avg_pool2d(x, self.kernel, self.stride, (t, left), count_include_pad=False)
        # Asymmetric "SAME": average the zero-padded sums, divided by the count of real cells.
        ones = torch.ones_like(x[:, :1])
        s = F.avg_pool2d(F.pad(x, (left, r, t, b)), self.kernel, self.stride, divisor_override=1)
        n = F.avg_pool2d(F.pad(ones, (left, r, t, b)), self.kernel, self.stride, divisor_override=1)
        return s / n


class ResizeBilinearOp(nn.Module):
    """ResizeBilinear with TF.js's exact source-coordinate rule (align_corners / half_pixel_centers /
    legacy), as static index and weight tables: torch's interpolate uses half-pixel centres only, which
    differs from TF's legacy mode used by Keras UpSampling2D."""

    def __init__(self, in_hw: tuple[int, int], out_hw: tuple[int, int], align_corners: bool, half_pixel: bool,
                 to_nchw: bool) -> None:
        super().__init__()
        self.to_nchw = to_nchw
        for axis, (n_in, n_out) in zip(("h", "w"), zip(in_hw, out_hw)):
            lo, hi, frac = self._table(n_in, n_out, align_corners, half_pixel)
            self.register_buffer(f"{axis}_lo", lo, persistent=False)
            self.register_buffer(f"{axis}_hi", hi, persistent=False)
            self.register_buffer(f"{axis}_frac", frac, persistent=False)

    @staticmethod
    def _table(n_in: int, n_out: int, align: bool, half: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # Mirrors tfjs-backend-cpu resizeBilinear: ratio, source = ratio * (i [+ 0.5]) [- 0.5],
        # floor clamped at 0, ceil clamped at n_in - 1, fraction = source - floor.
        ratio = (n_in - 1) / (n_out - 1) if (align and n_out > 1) else n_in / n_out
        lo, hi, frac = [], [], []
        for i in range(n_out):
            src = ratio * (i + 0.5) - 0.5 if half else ratio * i
            f = max(0, math.floor(src))
            lo.append(f)
            hi.append(min(n_in - 1, math.ceil(src)))
            frac.append(src - f)
        return (torch.tensor(lo, dtype=torch.int64), torch.tensor(hi, dtype=torch.int64),
                torch.tensor(frac, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.to_nchw:
            x = x.permute(*_TO_NCHW)
        left = x.index_select(3, self.w_lo)
        right = x.index_select(3, self.w_hi)
        x = left + (right - left) * self.w_frac
        top = x.index_select(2, self.h_lo)
        bottom = x.index_select(2, self.h_hi)
        return top + (bottom - top) * self.h_frac.view(-1, 1)


class ReshapeOp(nn.Module):
    """Reshape / ExpandDims / Squeeze to a static target shape, in TF (NHWC) element order."""

    def __init__(self, shape: tuple[int, ...], to_nhwc: bool) -> None:
        super().__init__()
        self.shape, self.to_nhwc = shape, to_nhwc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.to_nhwc:
            x = x.permute(*_TO_NHWC)
        return x.reshape(self.shape)


class StridedSliceOp(nn.Module):
    """StridedSlice with constant begin/end/strides and masks, as a precomputed index tuple (TF order)."""

    def __init__(self, index: tuple[Any, ...], to_nhwc: bool) -> None:
        super().__init__()
        self.index, self.to_nhwc = index, to_nhwc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.to_nhwc:
            x = x.permute(*_TO_NHWC)
        return x[self.index]


class TopKOp(nn.Module):
    """TopKV2 along the last axis. A stable descending sort keeps the lower index first among equal values,
    which is what TF.js's CPU kernel returns, so ties resolve identically."""

    def __init__(self, k: int, to_nhwc: bool) -> None:
        super().__init__()
        self.k, self.to_nhwc = k, to_nhwc

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.to_nhwc:
            x = x.permute(*_TO_NHWC)
        values, indices = torch.sort(x, dim=-1, descending=True, stable=True)
        return values[..., : self.k], indices[..., : self.k].to(torch.int32)


class GatherOp(nn.Module):
    """GatherV2 (batch_dims 0) along a constant axis; the output shape is static."""

    def __init__(self, axis: int, out_shape: tuple[int, ...], permute: tuple[bool, bool]) -> None:
        super().__init__()
        self.axis, self.out_shape, self.permute = axis, out_shape, permute

    def forward(self, params: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        if self.permute[0]:
            params = params.permute(*_TO_NHWC)
        if self.permute[1]:
            indices = indices.permute(*_TO_NHWC)
        picked = params.index_select(self.axis, indices.reshape(-1).to(torch.int64))
        return picked.reshape(self.out_shape)


# --------------------------------------------------------------------------------------------------
# The converter
# --------------------------------------------------------------------------------------------------

SUPPORTED_OPS = sorted({"Const", "Placeholder", "Conv2D", "_FusedConv2D", "DepthwiseConv2dNative",
                        "FusedDepthwiseConv2dNative", "MaxPool", "AvgPool", "Mean", "Sum", "Max", "Min",
                        "ConcatV2", "Pack", "ResizeBilinear", "Reshape", "ExpandDims", "Squeeze",
                        "StridedSlice", "TopKV2", "GatherV2"} | _UNARY | _BINARY)


@dataclass
class _Val:
    """A value during the build pass: example tensor in runtime layout, whether that layout is NCHW
    (a permuted NHWC TF tensor), and the numpy value when it is a constant."""

    tensor: torch.Tensor
    nchw: bool = False
    const: np.ndarray | None = None

    @property
    def tf_shape(self) -> tuple[int, ...]:
        s = tuple(self.tensor.shape)
        return (s[0], s[2], s[3], s[1]) if self.nchw else s


def _ref(name: str) -> str:
    """Normalize an input reference: ``x:0`` is ``x``."""
    return name[:-2] if name.endswith(":0") else name


def _sanitize(segment: str) -> str:
    s = re.sub(r"[^0-9A-Za-z_]", "_", segment)
    return "_" + s if (not s or s[0].isdigit()) else s


class TfjsModule(nn.Module):
    """A converted TF.js graph. ``forward(x)`` takes the input as NCHW (``N, C, H, W``) when the graph's
    input is a 4-D NHWC image tensor (any other input in TF layout) and returns the requested outputs
    (one tensor, or a tuple) in TF layout (NHWC), or NCHW for 4-D outputs when built with
    ``nchw_outputs=True``.

    ``module_path(tf_name)`` gives the module path of a TF node; ``tf_name(path)`` the reverse."""

    def __init__(self) -> None:
        super().__init__()
        self._steps: list[tuple[str, list[str], list[str]]] = []
        self._input_name = ""
        self._outputs: list[tuple[str, bool]] = []  # (value name, permute NCHW -> NHWC on return)
        self._paths: dict[str, str] = {}
        self._const_outputs: dict[str, torch.Tensor] = {}
        self.input_nchw = True

    def module_path(self, tf_name: str) -> str:
        return self._paths[tf_name]

    def tf_name(self, path: str) -> str:
        for k, v in self._paths.items():
            if v == path:
                return k
        raise KeyError(path)

    def forward(self, x: torch.Tensor) -> Any:
        env: dict[str, torch.Tensor] = {self._input_name: x}
        for path, ins, outs in self._steps:
            result = self.get_submodule(path)(*[env[i] for i in ins])
            if len(outs) == 1:
                env[outs[0]] = result
            else:
                for o, r in zip(outs, result):
                    env[o] = r
        results = []
        for name, permute in self._outputs:
            t = env[name] if name in env else self._const_outputs[name]
            results.append(t.permute(*_TO_NHWC) if permute else t)
        return results[0] if len(results) == 1 else tuple(results)


class _Builder:
    """Builds a :class:`TfjsModule` from a graph by a single eager pass over an example input."""

    def __init__(self, graph: TfjsGraph, outputs: Sequence[str], nchw_outputs: bool,
                 into: TfjsModule | None = None) -> None:
        self.g = graph
        self.outputs = [_ref(o) for o in outputs]
        self.nchw_outputs = nchw_outputs
        self.by_name = {n.name: n for n in graph.nodes}
        self.vals: dict[str, _Val] = {}
        self.mod = into if into is not None else TfjsModule()

    # ---- graph analysis -------------------------------------------------------------------------
    def needed(self) -> list[GraphNode]:
        """Nodes the outputs depend on, in a topological order that follows the file order."""
        need: set[str] = set()
        stack = [o.split(":")[0] for o in self.outputs]
        for o in stack:
            if o not in self.by_name:
                raise TfjsError(f"output {o!r} is not a node of {self.g.path}")
        while stack:
            n = stack.pop()
            if n in need:
                continue
            need.add(n)
            node = self.by_name.get(n)
            if node is None:
                raise TfjsFormatError(f"{self.g.path}: an input refers to the unknown node {n!r}")
            stack.extend(i.split(":")[0] for i in node.inputs)
        order = {n.name: i for i, n in enumerate(self.g.nodes)}
        done: set[str] = set()
        result: list[GraphNode] = []
        # Kahn's algorithm with file order as the priority: keeps TF.js's executed order where valid.
        import heapq

        indeg: dict[str, int] = {}
        users: dict[str, list[str]] = {}
        for n in need:
            deps = {i.split(":")[0] for i in self.by_name[n].inputs}
            indeg[n] = len(deps)
            for d in deps:
                users.setdefault(d, []).append(n)
        heap = [(order[n], n) for n in need if indeg[n] == 0]
        heapq.heapify(heap)
        while heap:
            _, n = heapq.heappop(heap)
            done.add(n)
            result.append(self.by_name[n])
            for u in users.get(n, []):
                indeg[u] -= 1
                if indeg[u] == 0:
                    heapq.heappush(heap, (order[u], u))
        if len(result) != len(need):
            raise TfjsFormatError(f"{self.g.path}: the graph has a cycle")
        return result

    def check_ops(self, nodes: list[GraphNode]) -> None:
        bad = sorted({n.op for n in nodes if n.op not in SUPPORTED_OPS})
        if bad:
            raise UnsupportedOpError(f"{self.g.path}: unsupported TF.js ops: {', '.join(bad)} "
                                     f"(supported: {', '.join(SUPPORTED_OPS)})")

    def assign_paths(self, nodes: list[GraphNode]) -> None:
        """Module path per op node: sanitized TF scopes, common leading scope dropped, leaves that are
        also scopes of other nodes suffixed with ``_op``."""
        ops = [n.name for n in nodes if n.op not in ("Const", "Placeholder")]
        segs = {n: [_sanitize(s) for s in n.split("/")] for n in ops}
        first = {s[0] for s in segs.values() if len(s) > 1}
        if len(first) == 1 and all(len(s) > 1 for s in segs.values()):
            segs = {n: s[1:] for n, s in segs.items()}
        prefixes = {".".join(s[:i]) for s in segs.values() for i in range(1, len(s))}
        taken: set[str] = set()
        for n, s in segs.items():
            path = ".".join(s)
            if path in prefixes:
                path += "_op"
            while path in taken:
                path += "_"
            taken.add(path)
            self.mod._paths[n] = path

    # ---- helpers ---------------------------------------------------------------------------------
    def const(self, ref: str, node: GraphNode) -> np.ndarray:
        v = self.vals[_ref(ref)]
        if v.const is None:
            raise UnsupportedOpError(f"{node.name} ({node.op}): input {ref!r} must be a constant")
        return v.const

    def add_step(self, node: GraphNode, module: nn.Module, ins: list[str], outs: list[str]) -> None:
        path = self.mod._paths[node.name]
        parent = self.mod
        parts = path.split(".")
        for p in parts[:-1]:
            if not hasattr(parent, p):
                parent.add_module(p, nn.Module())
            parent = getattr(parent, p)
        parent.add_module(parts[-1], module)
        self.mod._steps.append((path, ins, outs))

    def run(self, module: nn.Module, ins: list[str]) -> Any:
        with torch.no_grad():
            return module(*[self.vals[i].tensor for i in ins])

    # ---- op builders -----------------------------------------------------------------------------
    def build_conv(self, node: GraphNode) -> None:
        x = self.vals[_ref(node.inputs[0])]
        w = self.const(node.inputs[1], node)
        if node.attr.get("data_format", "NHWC") != "NHWC":
            raise UnsupportedOpError(f"{node.name} ({node.op}): data_format {node.attr.get('data_format')!r}")
        if len(x.tf_shape) != 4 or w.ndim != 4:
            raise UnsupportedOpError(f"{node.name} ({node.op}): expects 4-D input and filter")
        strides = node.attr.get("strides", [1, 1, 1, 1])
        dil = node.attr.get("dilations", [1, 1, 1, 1])
        _, h, wd, cin = x.tf_shape
        kh, kw = w.shape[0], w.shape[1]
        depthwise = "Depthwise" in node.op
        if depthwise:
            mult = w.shape[3]
            weight = w.transpose(2, 3, 0, 1).reshape(cin * mult, 1, kh, kw)
            cout, groups = cin * mult, cin
        else:
            if w.shape[2] != cin:
                raise TfjsFormatError(f"{node.name}: filter expects {w.shape[2]} input channels, got {cin}")
            weight = w.transpose(3, 2, 0, 1)
            cout, groups = w.shape[3], 1
        act, alpha, bias = "", 0.0, None
        if node.op in ("_FusedConv2D", "FusedDepthwiseConv2dNative"):
            fused = node.attr.get("fused_ops", [])
            extra = node.inputs[2:]
            if not fused or fused[0] != "BiasAdd" or len(fused) > 2 or (len(fused) == 2 and fused[1] not in
                                                                         _FUSED_ACTIVATIONS):
                raise UnsupportedOpError(f"{node.name} ({node.op}): fused_ops {fused} (supported: BiasAdd "
                                         f"optionally followed by one of {', '.join(_FUSED_ACTIVATIONS)})")
            if len(extra) != 1:
                raise UnsupportedOpError(f"{node.name} ({node.op}): {len(extra)} extra arguments for {fused}")
            bias = self.const(extra[0], node).reshape(-1)
            if len(fused) == 2:
                act = fused[1]
                alpha = float(node.attr.get("leakyrelu_alpha", 0.2))
        pads = _spatial_pads(node, h, wd, kh, kw, strides[1], strides[2], dil[1], dil[2])
        t, b, left, r = pads
        symmetric = t == b and left == r
        conv = nn.Conv2d(cin, cout, (kh, kw), (strides[1], strides[2]), (t, left) if symmetric else 0,
                         (dil[1], dil[2]), groups, bias=bias is not None)
        with torch.no_grad():
            conv.weight.copy_(torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32)))
            if bias is not None:
                conv.bias.copy_(torch.from_numpy(bias.astype(np.float32)))
        module = ConvOp(conv, None if symmetric else (left, r, t, b), act, alpha, to_nchw=not x.nchw)
        self.finish(node, module, [_ref(node.inputs[0])], nchw=True)

    def build_elementwise(self, node: GraphNode) -> None:
        n_in = 1 if node.op in _UNARY else 2
        if len(node.inputs) != n_in:
            raise TfjsFormatError(f"{node.name} ({node.op}): expected {n_in} inputs, got {len(node.inputs)}")
        vals = [self.vals[_ref(i)] for i in node.inputs]
        runtime = [v for v in vals if v.const is None]
        # Stay in NCHW only if every runtime input is a 4-D NCHW tensor and every constant broadcasts
        # against it (rank <= 4: it is padded with leading ones in TF's rules, then permuted).
        nchw = bool(runtime) and all(v.nchw for v in runtime) and all(
            v.const.ndim <= 4 for v in vals if v.const is not None)
        slots: list[tuple[str, Any]] = []
        consts: dict[str, torch.Tensor] = {}
        ins = []
        for i, (ref, v) in enumerate(zip(node.inputs, vals)):
            if v.const is None:
                slots.append(("in", bool(v.nchw and not nchw)))
                ins.append(_ref(ref))
            else:
                c = v.const
                if nchw and c.ndim > 0:
                    c = c.reshape((1,) * (4 - c.ndim) + c.shape).transpose(*_TO_NCHW)
                key = f"const{i}"
                consts[key] = torch.from_numpy(np.array(c))
                slots.append(("const", key))
        extra = None
        if node.op == "Cast":
            dst = node.attr.get("DstT")
            if dst not in _TF_DTYPES:
                raise UnsupportedOpError(f"{node.name} (Cast): destination type {dst!r}")
            extra = _TF_DTYPES[dst]
        self.finish(node, ElementwiseOp(node.op, slots, consts, extra), ins, nchw=nchw)

    def build_reduce(self, node: GraphNode) -> None:
        x = self.vals[_ref(node.inputs[0])]
        axes = [int(a) for a in np.atleast_1d(self.const(node.inputs[1], node))]
        rank = len(x.tf_shape)
        axes = [a % rank for a in axes]
        keep = bool(node.attr.get("keep_dims", False))
        if x.nchw and keep:
            dims = tuple(_NHWC_TO_NCHW_AXIS[a] for a in axes)
            self.finish(node, ReduceOp(node.op, dims, True, False), [_ref(node.inputs[0])], nchw=True)
        else:
            self.finish(node, ReduceOp(node.op, tuple(axes), keep, x.nchw), [_ref(node.inputs[0])], nchw=False)

    def build_concat(self, node: GraphNode) -> None:
        stack = node.op == "Pack"
        data = node.inputs if stack else node.inputs[:-1]
        axis = int(node.attr.get("axis", 0)) if stack else int(self.const(node.inputs[-1], node))
        vals = [self.vals[_ref(i)] for i in data]
        if any(v.const is not None for v in vals):
            # Constants among concatenated values: keep them as TF-layout inputs via a folded step.
            raise UnsupportedOpError(f"{node.name} ({node.op}): concatenating constants with tensors")
        rank = len(vals[0].tf_shape) + (1 if stack else 0)
        axis %= rank
        if not stack and all(v.nchw for v in vals):
            self.finish(node, ConcatOp(_NHWC_TO_NCHW_AXIS[axis], [False] * len(vals)),
                        [_ref(i) for i in data], nchw=True)
        else:
            self.finish(node, ConcatOp(axis, [v.nchw for v in vals], stack), [_ref(i) for i in data], nchw=False)

    def build_pool(self, node: GraphNode) -> None:
        x = self.vals[_ref(node.inputs[0])]
        if node.attr.get("data_format", "NHWC") != "NHWC":
            raise UnsupportedOpError(f"{node.name} ({node.op}): data_format {node.attr.get('data_format')!r}")
        k = node.attr.get("ksize", [1, 1, 1, 1])
        s = node.attr.get("strides", [1, 1, 1, 1])
        if k[0] != 1 or k[3] != 1 or s[0] != 1 or s[3] != 1:
            raise UnsupportedOpError(f"{node.name} ({node.op}): pooling over batch or channels")
        _, h, w, _ = x.tf_shape
        pads = _spatial_pads(node, h, w, k[1], k[2], s[1], s[2], 1, 1)
        self.finish(node, PoolOp(node.op, (k[1], k[2]), (s[1], s[2]), pads, not x.nchw), [_ref(node.inputs[0])],
                    nchw=True)

    def build_resize(self, node: GraphNode) -> None:
        x = self.vals[_ref(node.inputs[0])]
        size = [int(v) for v in self.const(node.inputs[1], node)]
        _, h, w, _ = x.tf_shape
        module = ResizeBilinearOp((h, w), (size[0], size[1]), bool(node.attr.get("align_corners", False)),
                                  bool(node.attr.get("half_pixel_centers", False)), not x.nchw)
        self.finish(node, module, [_ref(node.inputs[0])], nchw=True)

    def build_reshape(self, node: GraphNode) -> None:
        x = self.vals[_ref(node.inputs[0])]
        shape = list(x.tf_shape)
        if node.op == "Reshape":
            target = [int(v) for v in np.atleast_1d(self.const(node.inputs[1], node))]
        elif node.op == "ExpandDims":
            axis = int(self.const(node.inputs[1], node))
            axis = axis + len(shape) + 1 if axis < 0 else axis
            target = shape[:axis] + [1] + shape[axis:]
        else:  # Squeeze
            dims = node.attr.get("squeeze_dims", []) or [i for i, d in enumerate(shape) if d == 1]
            dims = {d % len(shape) for d in dims}
            target = [d for i, d in enumerate(shape) if i not in dims]
        # Resolve -1 now: the graph is static and a fixed shape keeps fx/export simple.
        numel = int(np.prod(shape))
        if target.count(-1) == 1:
            known = int(np.prod([d for d in target if d != -1]))
            target[target.index(-1)] = numel // known if known else 0
        if int(np.prod(target)) != numel:
            raise TfjsFormatError(f"{node.name} ({node.op}): cannot reshape {tuple(shape)} to {tuple(target)}")
        self.finish(node, ReshapeOp(tuple(target), x.nchw), [_ref(node.inputs[0])], nchw=False)

    def build_strided_slice(self, node: GraphNode) -> None:
        x = self.vals[_ref(node.inputs[0])]
        begin, end, strides = (np.atleast_1d(self.const(i, node)).tolist() for i in node.inputs[1:4])
        a = node.attr
        if a.get("ellipsis_mask", 0):
            raise UnsupportedOpError(f"{node.name} (StridedSlice): ellipsis_mask")
        bm, em, sm, nm = (a.get(k, 0) for k in ("begin_mask", "end_mask", "shrink_axis_mask", "new_axis_mask"))
        index: list[Any] = []
        for i, (b, e, s) in enumerate(zip(begin, end, strides)):
            if nm >> i & 1:
                index.append(None)
            elif sm >> i & 1:
                index.append(int(b))
            else:
                index.append(slice(None if bm >> i & 1 else int(b), None if em >> i & 1 else int(e), int(s)))
        if any(isinstance(i, slice) and (i.step or 1) < 0 for i in index):
            raise UnsupportedOpError(f"{node.name} (StridedSlice): negative strides")
        self.finish(node, StridedSliceOp(tuple(index), x.nchw), [_ref(node.inputs[0])], nchw=False)

    def build_topk(self, node: GraphNode) -> None:
        x = self.vals[_ref(node.inputs[0])]
        k = int(self.const(node.inputs[1], node))
        self.finish(node, TopKOp(k, x.nchw), [_ref(node.inputs[0])], nchw=False, n_out=2)

    def build_gather(self, node: GraphNode) -> None:
        if int(node.attr.get("batch_dims", 0)) != 0:
            raise UnsupportedOpError(f"{node.name} (GatherV2): batch_dims != 0")
        p = self.vals[_ref(node.inputs[0])]
        idx = self.vals[_ref(node.inputs[1])]
        axis = int(self.const(node.inputs[2], node)) % len(p.tf_shape)
        if p.const is not None or idx.const is not None:
            raise UnsupportedOpError(f"{node.name} (GatherV2): constant params or indices")
        out_shape = tuple(p.tf_shape[:axis]) + tuple(idx.tf_shape) + tuple(p.tf_shape[axis + 1:])
        self.finish(node, GatherOp(axis, out_shape, (p.nchw, idx.nchw)),
                    [_ref(node.inputs[0]), _ref(node.inputs[1])], nchw=False)

    # ---- main ------------------------------------------------------------------------------------
    def finish(self, node: GraphNode, module: nn.Module, ins: list[str], nchw: bool, n_out: int = 1) -> None:
        module.eval()
        if all(self.vals[i].const is not None for i in ins):
            # Constant folding: compute now, no module.
            out = self.run(module, ins)
            outs = out if n_out > 1 else (out,)
            for k, t in enumerate(outs):
                arr = t.permute(*_TO_NHWC).numpy() if (nchw and t.dim() == 4) else t.numpy()
                self.vals[node.name if k == 0 else f"{node.name}:{k}"] = _Val(torch.from_numpy(arr), False, arr)
            return
        out = self.run(module, ins)
        names = [node.name] + [f"{node.name}:{k}" for k in range(1, n_out)]
        outs = out if n_out > 1 else (out,)
        for name, t in zip(names, outs):
            self.vals[name] = _Val(t, nchw and t.dim() == 4)
        self.add_step(node, module, ins, names)

    def build(self, example: torch.Tensor | None) -> TfjsModule:
        nodes = self.needed()
        self.check_ops(nodes)
        self.assign_paths(nodes)
        placeholders = [n for n in nodes if n.op == "Placeholder"]
        if len(placeholders) != 1:
            raise UnsupportedOpError(f"{self.g.path}: graphs with {len(placeholders)} inputs (only 1 supported)")
        ph = placeholders[0]
        tf_shape = ph.attr.get("shape") or []
        if example is None:
            sig = self.g.inputs.get(ph.name, {}).get("tensorShape", {}).get("dim")
            if sig:
                tf_shape = [int(d.get("size", -1)) for d in sig]
            if not tf_shape or any(d < 0 for d in tf_shape):
                raise TfjsError(f"input {ph.name!r} has no static shape {tf_shape}: pass an example input")
            tf_shape = [1] + list(tf_shape[1:])
        nchw_in = len(tf_shape) == 4 if example is None else example.dim() == 4
        if example is None:
            example = torch.zeros(tf_shape, dtype=torch.float32)
            if nchw_in:
                example = example.permute(*_TO_NCHW).contiguous()
        self.mod._input_name = ph.name
        self.mod.input_nchw = nchw_in
        self.vals[ph.name] = _Val(example, nchw_in)
        builders = {"Conv2D": self.build_conv, "_FusedConv2D": self.build_conv,
                    "DepthwiseConv2dNative": self.build_conv, "FusedDepthwiseConv2dNative": self.build_conv,
                    "Mean": self.build_reduce, "Sum": self.build_reduce, "Max": self.build_reduce,
                    "Min": self.build_reduce, "ConcatV2": self.build_concat, "Pack": self.build_concat,
                    "MaxPool": self.build_pool, "AvgPool": self.build_pool, "ResizeBilinear": self.build_resize,
                    "Reshape": self.build_reshape, "ExpandDims": self.build_reshape, "Squeeze": self.build_reshape,
                    "StridedSlice": self.build_strided_slice, "TopKV2": self.build_topk,
                    "GatherV2": self.build_gather}
        for node in nodes:
            if node.op == "Placeholder":
                continue
            if node.op == "Const":
                arr = self.g.weights[node.name]
                self.vals[node.name] = _Val(torch.from_numpy(np.array(arr)), False, arr)
                continue
            for i in node.inputs:
                if _ref(i) not in self.vals:
                    raise TfjsFormatError(f"{node.name}: input {i!r} is not produced by any node")
            builders.get(node.op, self.build_elementwise)(node)
        for o in self.outputs:
            v = self.vals[o]
            permute = v.nchw and not self.nchw_outputs
            if v.const is not None:
                self.mod._const_outputs[o] = v.tensor
            self.mod._outputs.append((o, permute))
        self.mod.tf_outputs = list(self.outputs)
        return self.mod.eval()


def convert(graph: TfjsGraph | str | Path, outputs: Sequence[str] | None = None,
            example: torch.Tensor | None = None, nchw_outputs: bool = False,
            into: TfjsModule | None = None) -> TfjsModule:
    """Convert a TF.js graph model (a :class:`TfjsGraph` or the path of its model.json) to a torch module.

    ``outputs`` names the graph nodes to return (default: the signature outputs, else the graph's sinks);
    only the nodes they depend on are converted. ``example`` is an input in torch layout (NCHW for an
    image) that fixes the static shapes; by default a batch of one of the signature's input shape.
    ``into`` is a fresh instance of a :class:`TfjsModule` subclass to fill (e.g. one whose forward adds
    post-processing); by default a plain TfjsModule. Raises :class:`UnsupportedOpError` naming every op
    the converter lacks."""
    if not isinstance(graph, TfjsGraph):
        graph = load_graph_model(graph)
    if outputs is None:
        outputs = list(graph.outputs) or _sinks(graph)
    return _Builder(graph, outputs, nchw_outputs, into).build(example)


def _sinks(graph: TfjsGraph) -> list[str]:
    used = {_ref(i).split(":")[0] for n in graph.nodes for i in n.inputs}
    return [n.name for n in graph.nodes if n.name not in used and n.op != "Const"]
