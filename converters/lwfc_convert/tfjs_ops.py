"""The torch modules that TF.js graph ops become (``tfjs`` builds them, one per op node).

TF graphs are NHWC; torch convolutions want NCHW. Every 4-D activation is kept in NCHW inside the converted
module and each op knows whether its inputs are "channels-first copies" of TF's NHWC tensors: layout-aware
ops (convolutions, pooling, resize, concat, reductions, elementwise ops) work on NCHW directly with their
axes remapped; layout-sensitive ops (reshape, slicing, top-k, gather, ...) first permute back to TF's NHWC
order, so the numbers always follow TF's semantics. All shapes and parameters are static (fixed while
building), so ``torch.fx`` traces and ``torch.export`` exports these modules.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .tfjs_graph import UnsupportedOpError

# NHWC axis -> NCHW dim, and the permutations between the two.
NHWC_TO_NCHW_AXIS = (0, 2, 3, 1)
TO_NCHW = (0, 3, 1, 2)
TO_NHWC = (0, 2, 3, 1)


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


# The activations TF fuses into convolutions (_FusedConv2D fused_ops), which ConvOp applies.
FUSED_ACTIVATIONS = ("Relu", "Relu6", "Elu", "LeakyRelu", "Sigmoid", "Tanh")


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
            x = x.permute(*TO_NCHW)
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
                args.append(t.permute(*TO_NHWC) if val else t)
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


# The ops ElementwiseOp implements, by arity.
UNARY_OPS = {"Relu", "Relu6", "Sigmoid", "Tanh", "Neg", "Exp", "Sqrt", "Rsqrt", "Square", "Identity", "Cast"}
BINARY_OPS = {"Add", "AddV2", "Sub", "Mul", "RealDiv", "Div", "FloorDiv", "FloorMod", "Maximum", "Minimum",
           "Equal", "Greater", "Less"}


class ReduceOp(nn.Module):
    """Mean / Sum / Max / Min over constant axes (already mapped to the runtime layout)."""

    def __init__(self, op: str, dims: tuple[int, ...], keepdim: bool, to_nhwc: bool) -> None:
        super().__init__()
        self.op, self.dims, self.keepdim, self.to_nhwc = op, dims, keepdim, to_nhwc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.to_nhwc:
            x = x.permute(*TO_NHWC)
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
        ts = [x.permute(*TO_NHWC) if p else x for x, p in zip(xs, self.permute)]
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
            x = x.permute(*TO_NCHW)
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
    legacy): torch's interpolate uses half-pixel centres only, which differs from TF's legacy mode used by
    Keras UpSampling2D.

    Legacy up-sampling by an integer factor ``s`` (what Keras UpSampling2D does) is nearest-neighbour
    up-sampling followed by an ``s`` x ``s`` box mean, stride 1, over the result with its last row and column
    repeated ``s - 1`` times: output ``s*i + k`` is ``((s - k) x[i] + k x[i + 1]) / s``, with ``x[n]`` read as
    ``x[n - 1]``, which is the legacy rule. Those are ops every int8 runtime has (RESIZE_NEAREST_NEIGHBOR,
    AVERAGE_POOL_2D) and that litert-torch's channel-last rewrite handles; the general path, static index and
    weight tables with ``index_select``, fails there (issue 17: the detector's head split)."""

    def __init__(self, in_hw: tuple[int, int], out_hw: tuple[int, int], align_corners: bool, half_pixel: bool,
                 to_nchw: bool) -> None:
        super().__init__()
        self.to_nchw = to_nchw
        s = out_hw[0] // in_hw[0] if in_hw[0] > 0 else 0
        legacy_integer = not (align_corners or half_pixel) and s > 1 and tuple(out_hw) == (in_hw[0] * s, in_hw[1] * s)
        self.factor = s if legacy_integer else 0  # 0: the general path
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
            x = x.permute(*TO_NCHW)
        if self.factor > 1:
            s = self.factor
            x = F.interpolate(x, scale_factor=s, mode="nearest")
            x = torch.cat([x] + [x[:, :, :, -1:]] * (s - 1), dim=3)
            x = torch.cat([x] + [x[:, :, -1:, :]] * (s - 1), dim=2)
            return F.avg_pool2d(x, s, stride=1)
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
            x = x.permute(*TO_NHWC)
        return x.reshape(self.shape)


class StridedSliceOp(nn.Module):
    """StridedSlice with constant begin/end/strides and masks, as a precomputed index tuple (TF order)."""

    def __init__(self, index: tuple[Any, ...], to_nhwc: bool) -> None:
        super().__init__()
        self.index, self.to_nhwc = index, to_nhwc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.to_nhwc:
            x = x.permute(*TO_NHWC)
        return x[self.index]


class TopKOp(nn.Module):
    """TopKV2 along the last axis. A stable descending sort keeps the lower index first among equal values,
    which is what TF.js's CPU kernel returns, so ties resolve identically."""

    def __init__(self, k: int, to_nhwc: bool) -> None:
        super().__init__()
        self.k, self.to_nhwc = k, to_nhwc

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.to_nhwc:
            x = x.permute(*TO_NHWC)
        values, indices = torch.sort(x, dim=-1, descending=True, stable=True)
        return values[..., : self.k], indices[..., : self.k].to(torch.int32)


class GatherOp(nn.Module):
    """GatherV2 (batch_dims 0) along a constant axis; the output shape is static."""

    def __init__(self, axis: int, out_shape: tuple[int, ...], permute: tuple[bool, bool]) -> None:
        super().__init__()
        self.axis, self.out_shape, self.permute = axis, out_shape, permute

    def forward(self, params: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        if self.permute[0]:
            params = params.permute(*TO_NHWC)
        if self.permute[1]:
            indices = indices.permute(*TO_NHWC)
        picked = params.index_select(self.axis, indices.reshape(-1).to(torch.int64))
        return picked.reshape(self.out_shape)
