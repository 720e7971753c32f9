"""TensorFlow.js graph models (``model.json`` + binary weight shards) converted to plain torch modules.

Reading and validating ``model.json`` and its shards is :mod:`lwfc_convert.tfjs_graph`
(:func:`load_graph_model`, the errors); the torch modules of single ops are :mod:`lwfc_convert.tfjs_ops`;
the converted model is a :class:`lwfc_convert.tfjs_module.TfjsModule`. This module builds it:
:func:`convert`.

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

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from .tfjs_graph import (
    GraphNode,
    TfjsError,
    TfjsFormatError,
    TfjsGraph,
    UnsupportedOpError,
    input_ref,
    load_graph_model,
    needed_nodes,
    sinks,
)
from .tfjs_module import TfjsModule
from .tfjs_ops import (
    BINARY_OPS,
    FUSED_ACTIVATIONS,
    NHWC_TO_NCHW_AXIS,
    TO_NCHW,
    TO_NHWC,
    UNARY_OPS,
    ConcatOp,
    ConvOp,
    ElementwiseOp,
    GatherOp,
    PoolOp,
    ReduceOp,
    ReshapeOp,
    ResizeBilinearOp,
    StridedSliceOp,
    TopKOp,
)

# Cast's destination types.
_TF_DTYPES = {"DT_FLOAT": torch.float32, "DT_INT32": torch.int32, "DT_BOOL": torch.bool,
              "DT_INT64": torch.int64, "DT_HALF": torch.float16}


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


SUPPORTED_OPS = sorted({"Const", "Placeholder", "Conv2D", "_FusedConv2D", "DepthwiseConv2dNative",
                        "FusedDepthwiseConv2dNative", "MaxPool", "AvgPool", "Mean", "Sum", "Max", "Min",
                        "ConcatV2", "Pack", "ResizeBilinear", "Reshape", "ExpandDims", "Squeeze",
                        "StridedSlice", "TopKV2", "GatherV2"} | UNARY_OPS | BINARY_OPS)


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


def _sanitize(segment: str) -> str:
    s = re.sub(r"[^0-9A-Za-z_]", "_", segment)
    return "_" + s if (not s or s[0].isdigit()) else s


class _Builder:
    """Builds a :class:`TfjsModule` from a graph by a single eager pass over an example input."""

    def __init__(self, graph: TfjsGraph, outputs: Sequence[str], nchw_outputs: bool,
                 into: TfjsModule | None = None) -> None:
        self.g = graph
        self.outputs = [input_ref(o) for o in outputs]
        self.nchw_outputs = nchw_outputs
        self.vals: dict[str, _Val] = {}
        self.mod = into if into is not None else TfjsModule()

    # ---- graph analysis -------------------------------------------------------------------------
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
    def const(self, name: str, node: GraphNode) -> np.ndarray:
        v = self.vals[input_ref(name)]
        if v.const is None:
            raise UnsupportedOpError(f"{node.name} ({node.op}): input {name!r} must be a constant")
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
        x = self.vals[input_ref(node.inputs[0])]
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
                                                                         FUSED_ACTIVATIONS):
                raise UnsupportedOpError(f"{node.name} ({node.op}): fused_ops {fused} (supported: BiasAdd "
                                         f"optionally followed by one of {', '.join(FUSED_ACTIVATIONS)})")
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
        self.finish(node, module, [input_ref(node.inputs[0])], nchw=True)

    def build_elementwise(self, node: GraphNode) -> None:
        n_in = 1 if node.op in UNARY_OPS else 2
        if len(node.inputs) != n_in:
            raise TfjsFormatError(f"{node.name} ({node.op}): expected {n_in} inputs, got {len(node.inputs)}")
        vals = [self.vals[input_ref(i)] for i in node.inputs]
        runtime = [v for v in vals if v.const is None]
        # Stay in NCHW only if every runtime input is a 4-D NCHW tensor and every constant broadcasts
        # against it (rank <= 4: it is padded with leading ones in TF's rules, then permuted).
        nchw = bool(runtime) and all(v.nchw for v in runtime) and all(
            v.const.ndim <= 4 for v in vals if v.const is not None)
        slots: list[tuple[str, Any]] = []
        consts: dict[str, torch.Tensor] = {}
        ins = []
        for i, (name, v) in enumerate(zip(node.inputs, vals)):
            if v.const is None:
                slots.append(("in", bool(v.nchw and not nchw)))
                ins.append(input_ref(name))
            else:
                c = v.const
                if nchw and c.ndim > 0:
                    c = c.reshape((1,) * (4 - c.ndim) + c.shape).transpose(*TO_NCHW)
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
        x = self.vals[input_ref(node.inputs[0])]
        axes = [int(a) for a in np.atleast_1d(self.const(node.inputs[1], node))]
        rank = len(x.tf_shape)
        axes = [a % rank for a in axes]
        keep = bool(node.attr.get("keep_dims", False))
        if x.nchw and keep:
            dims = tuple(NHWC_TO_NCHW_AXIS[a] for a in axes)
            self.finish(node, ReduceOp(node.op, dims, True, False), [input_ref(node.inputs[0])], nchw=True)
        else:
            self.finish(node, ReduceOp(node.op, tuple(axes), keep, x.nchw), [input_ref(node.inputs[0])], nchw=False)

    def build_concat(self, node: GraphNode) -> None:
        stack = node.op == "Pack"
        data = node.inputs if stack else node.inputs[:-1]
        axis = int(node.attr.get("axis", 0)) if stack else int(self.const(node.inputs[-1], node))
        vals = [self.vals[input_ref(i)] for i in data]
        if any(v.const is not None for v in vals):
            # Constants among concatenated values: keep them as TF-layout inputs via a folded step.
            raise UnsupportedOpError(f"{node.name} ({node.op}): concatenating constants with tensors")
        rank = len(vals[0].tf_shape) + (1 if stack else 0)
        axis %= rank
        if not stack and all(v.nchw for v in vals):
            self.finish(node, ConcatOp(NHWC_TO_NCHW_AXIS[axis], [False] * len(vals)),
                        [input_ref(i) for i in data], nchw=True)
        else:
            self.finish(node, ConcatOp(axis, [v.nchw for v in vals], stack), [input_ref(i) for i in data], nchw=False)

    def build_pool(self, node: GraphNode) -> None:
        x = self.vals[input_ref(node.inputs[0])]
        if node.attr.get("data_format", "NHWC") != "NHWC":
            raise UnsupportedOpError(f"{node.name} ({node.op}): data_format {node.attr.get('data_format')!r}")
        k = node.attr.get("ksize", [1, 1, 1, 1])
        s = node.attr.get("strides", [1, 1, 1, 1])
        if k[0] != 1 or k[3] != 1 or s[0] != 1 or s[3] != 1:
            raise UnsupportedOpError(f"{node.name} ({node.op}): pooling over batch or channels")
        _, h, w, _ = x.tf_shape
        pads = _spatial_pads(node, h, w, k[1], k[2], s[1], s[2], 1, 1)
        self.finish(node, PoolOp(node.op, (k[1], k[2]), (s[1], s[2]), pads, not x.nchw), [input_ref(node.inputs[0])],
                    nchw=True)

    def build_resize(self, node: GraphNode) -> None:
        x = self.vals[input_ref(node.inputs[0])]
        size = [int(v) for v in self.const(node.inputs[1], node)]
        _, h, w, _ = x.tf_shape
        module = ResizeBilinearOp((h, w), (size[0], size[1]), bool(node.attr.get("align_corners", False)),
                                  bool(node.attr.get("half_pixel_centers", False)), not x.nchw)
        self.finish(node, module, [input_ref(node.inputs[0])], nchw=True)

    def build_reshape(self, node: GraphNode) -> None:
        x = self.vals[input_ref(node.inputs[0])]
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
        self.finish(node, ReshapeOp(tuple(target), x.nchw), [input_ref(node.inputs[0])], nchw=False)

    def build_strided_slice(self, node: GraphNode) -> None:
        x = self.vals[input_ref(node.inputs[0])]
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
        self.finish(node, StridedSliceOp(tuple(index), x.nchw), [input_ref(node.inputs[0])], nchw=False)

    def build_topk(self, node: GraphNode) -> None:
        x = self.vals[input_ref(node.inputs[0])]
        k = int(self.const(node.inputs[1], node))
        self.finish(node, TopKOp(k, x.nchw), [input_ref(node.inputs[0])], nchw=False, n_out=2)

    def build_gather(self, node: GraphNode) -> None:
        if int(node.attr.get("batch_dims", 0)) != 0:
            raise UnsupportedOpError(f"{node.name} (GatherV2): batch_dims != 0")
        p = self.vals[input_ref(node.inputs[0])]
        idx = self.vals[input_ref(node.inputs[1])]
        axis = int(self.const(node.inputs[2], node)) % len(p.tf_shape)
        if p.const is not None or idx.const is not None:
            raise UnsupportedOpError(f"{node.name} (GatherV2): constant params or indices")
        out_shape = tuple(p.tf_shape[:axis]) + tuple(idx.tf_shape) + tuple(p.tf_shape[axis + 1:])
        self.finish(node, GatherOp(axis, out_shape, (p.nchw, idx.nchw)),
                    [input_ref(node.inputs[0]), input_ref(node.inputs[1])], nchw=False)

    # ---- main ------------------------------------------------------------------------------------
    def finish(self, node: GraphNode, module: nn.Module, ins: list[str], nchw: bool, n_out: int = 1) -> None:
        module.eval()
        if all(self.vals[i].const is not None for i in ins):
            # Constant folding: compute now, no module.
            out = self.run(module, ins)
            outs = out if n_out > 1 else (out,)
            for k, t in enumerate(outs):
                arr = t.permute(*TO_NHWC).numpy() if (nchw and t.dim() == 4) else t.numpy()
                self.vals[node.name if k == 0 else f"{node.name}:{k}"] = _Val(torch.from_numpy(arr), False, arr)
            return
        out = self.run(module, ins)
        names = [node.name] + [f"{node.name}:{k}" for k in range(1, n_out)]
        outs = out if n_out > 1 else (out,)
        for name, t in zip(names, outs):
            self.vals[name] = _Val(t, nchw and t.dim() == 4)
        self.add_step(node, module, ins, names)

    def build(self, example: torch.Tensor | None) -> TfjsModule:
        nodes = needed_nodes(self.g, self.outputs)
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
                example = example.permute(*TO_NCHW).contiguous()
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
                if input_ref(i) not in self.vals:
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
        outputs = list(graph.outputs) or sinks(graph)
    return _Builder(graph, outputs, nchw_outputs, into).build(example)

