"""Per-channel range equalisation before per-tensor int8 quantization of the activations.

TFLite's int8 scheme gives every activation tensor one scale. A channel whose values span a few tenths of a
tensor that spans tens gets one or two int8 steps, and when that channel feeds a depthwise kernel with a
large gain its noise dominates the edge half's output. CenterNet-MobileNetV3 is that case twice: channels 5,
7, 11 and 13 of the stem's convolution (the tensor spans -32..40) take 0.5-1.7 steps before and after their
hard-swish and feed depthwise kernels with 10x the usual L1 norm (the int8 edge half lost a third of the
float model's detections; a fused HARD_SWISH op or clipping at -3 alone changed little: see
converters/README.md), and the 64 ReLU channels before the first stride-2 depthwise convolution span very
different ranges. Both rewrites below change the float graph exactly (up to float rounding), before bias
correction and PT2E:

- :func:`equalize_relus`: conv -> ReLU -> depthwise conv. ReLU is positively homogeneous: scaling channel c
  of the first convolution by s_c and dividing the depthwise kernel of channel c by s_c changes nothing in
  float (cross-layer equalisation, Nagel et al., "Data-Free Quantization", 2019), and per-channel int8
  weights absorb the gains on both sides.
- :func:`equalize_hard_swishes`: conv -> hard-swish ``h = y * relu6(y + 3) / 6`` (the TF graph's
  decomposition into two multiplications, an addition and a ReLU6, or ``F.hardswish``). The hard-swish is
  not homogeneous, so it is rebuilt: ``y' = s * y`` (the convolution scaled per output channel); the gate
  ``a = relu6(y + 3)`` from a copy of the convolution with the original weights and the bias + 3 (a TFLite
  convolution with a fused ReLU6: a lies in [0, 6] in every channel, and the int32 accumulator computes it
  from the input directly); ``p = y' * a`` (one int8 multiplication, ``6 s h``); every convolution reading
  ``h`` (directly or behind a zero padding) reads ``p`` with its weights times ``1 / (6 s)`` along that
  input channel, and any other reader (the residual addition after MobileNetV3's first block) reads ``h``
  back from ``p`` through a 1x1 depthwise convolution with weights ``1 / (6 s)``. Below -3 the hard-swish is
  0 whatever ``y`` is, and ``p = y' * 0`` there: the int8 range of ``y'`` may be clipped at the lower end
  of the channels' useful ranges (``range_limits``, applied by ``tflite_export.quantize_edge`` after
  calibration).

The gains (:func:`channel_gains`) minimise the int8 noise that reaches the consumers, weighted by the
consumers' squared weights (:func:`sensitivity`).
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import fx, nn

# Below this input the hard-swish is exactly 0 (relu6(y + 3) = 0); above +3 it is the identity.
HARD_SWISH_FLOOR = -3.0
# Largest per-channel gain: beyond it a channel's values would only re-grow the tensor's range from rare
# outliers of the calibration set.
MAX_GAIN = 64.0
# Rewrite only when the largest gain is at least this many times the smallest (otherwise the rewrite costs
# ops, or just rescales weights, for nothing).
MIN_GAIN = 2.0


@dataclass
class HardSwish:
    """A hard-swish found in an fx graph: its input node ``x`` and output node ``out`` and the nodes between
    them (removed when rewritten)."""

    x: fx.Node
    out: fx.Node
    inner: list[fx.Node]
    sixth: float = 1 / 6  # the graph's own constant (TF.js stores 1/6 as float16: 0.16662598)


def _scalar(gm: fx.GraphModule, arg: Any) -> float | None:
    """``arg`` as a Python float if it is a number or a one-element constant tensor (get_attr), else None."""
    if isinstance(arg, (int, float)):
        return float(arg)
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        obj: Any = gm
        for part in str(arg.target).split("."):
            obj = getattr(obj, part)
        if isinstance(obj, torch.Tensor) and obj.numel() == 1:
            return float(obj)
    return None


def _is(node: Any, *names: str) -> bool:
    """Whether ``node`` calls a function or method named one of ``names`` (``mul``, ``add``, ``relu6``...)."""
    if not isinstance(node, fx.Node) or node.op not in ("call_function", "call_method"):
        return False
    target = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    return target in names


def _near_sixth(c: float | None) -> bool:
    """1/6 as a graph stores it (float16 in TF.js graphs)."""
    return c is not None and abs(c * 6 - 1) < 1e-3


def _mul_operands(node: fx.Node) -> tuple[Any, Any] | None:
    """The two operands of a binary multiplication node, or None."""
    if _is(node, "mul") and len(node.args) == 2 and not node.kwargs:
        return node.args[0], node.args[1]
    return None


def find_hard_swishes(gm: fx.GraphModule) -> list[HardSwish]:
    """The hard-swishes of ``gm``: ``F.hardswish``/``nn.Hardswish`` calls, and the decompositions
    ``(x * 1/6) * relu6(x + 3)`` and ``x * relu6(x + 3) * 1/6`` in any operand order (TF graphs)."""
    found = []
    for node in gm.graph.nodes:
        if _is(node, "hardswish"):
            found.append(HardSwish(node.args[0], node, []))
        elif node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), nn.Hardswish):
            found.append(HardSwish(node.args[0], node, []))
        if not (_is(node, "relu6") and len(node.args) == 1):
            continue
        add = node.args[0]
        if not (_is(add, "add") and len(add.args) == 2 and len(add.users) == 1):
            continue
        a0, a1 = add.args
        x = a0 if _scalar(gm, a1) == 3.0 else a1 if _scalar(gm, a0) == 3.0 else None
        if x is None or len(node.users) != 1:
            continue
        prod = next(iter(node.users))
        ops = _mul_operands(prod)
        if ops is None:
            continue
        other = ops[0] if ops[1] is node else ops[1]
        # (x / 6) * relu6(x + 3)
        inner = _mul_operands(other) if isinstance(other, fx.Node) else None
        if inner is not None and len(other.users) == 1:
            c = [_scalar(gm, v) for v in inner]
            sixth = c[1] if inner[0] is x else c[0] if inner[1] is x else None
            if sixth is not None and _near_sixth(sixth):
                found.append(HardSwish(x, prod, [add, node, other, prod], sixth))
            continue
        # x * relu6(x + 3) * (1 / 6)
        if other is x and len(prod.users) == 1:
            last = next(iter(prod.users))
            ops2 = _mul_operands(last)
            if ops2 is not None:
                c2 = _scalar(gm, ops2[1] if ops2[0] is prod else ops2[0])
                if c2 is not None and _near_sixth(c2):
                    found.append(HardSwish(x, last, [add, node, prod, last], c2))
    return found


def _conv_of(gm: fx.GraphModule, node: Any) -> nn.Conv2d | None:
    """The Conv2d module that ``node`` calls, or None."""
    if isinstance(node, fx.Node) and node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        if isinstance(mod, nn.Conv2d):
            return mod
    return None


def _zero_pad(node: fx.Node) -> bool:
    """A constant zero padding (``F.pad`` with mode constant and value 0/None): it commutes with per-channel
    scaling."""
    if not _is(node, "pad"):
        return False
    mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
    value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else None)
    return mode == "constant" and not value


def _readers(gm: fx.GraphModule, node: fx.Node) -> list[tuple[fx.Node, list[nn.Conv2d]]]:
    """Each direct reader of ``node`` with the convolutions that see it through that reader: the reader
    itself when it is a convolution taking ``node`` as its only input, the convolutions behind a zero padding
    that only convolutions read, and none (an empty list) for any other reader."""
    out: list[tuple[fx.Node, list[nn.Conv2d]]] = []
    for u in node.users:
        conv = _conv_of(gm, u)
        if conv is not None and u.args[0] is node and len(u.args) == 1:
            out.append((u, [conv]))
        elif _zero_pad(u) and u.args[0] is node:
            behind = _readers(gm, u)
            convs = [c for _, cs in behind for c in cs]
            out.append((u, convs if behind and len(convs) == len(behind) else []))
        else:
            out.append((u, []))
    return out


def _input_channel_weights(conv: nn.Conv2d) -> Iterator[tuple[int, slice, int]]:
    """For each input channel ``c`` of ``conv`` (any group count): ``(c, rows, k)`` such that
    ``conv.weight[rows, k]`` are the weights that read it."""
    per_group_in = conv.weight.shape[1]
    per_group_out = conv.weight.shape[0] // conv.groups
    for c in range(conv.in_channels):
        g, k = divmod(c, per_group_in)
        yield c, slice(g * per_group_out, (g + 1) * per_group_out), k


def _input_channel_energy(conv: nn.Conv2d) -> torch.Tensor:
    """Sum of squared weights reading each input channel of ``conv``: how much an error on that channel
    grows in its output."""
    w = conv.weight.detach()
    energy = torch.zeros(conv.in_channels)
    for c, rows, k in _input_channel_weights(conv):
        energy[c] = w[rows, k].pow(2).sum()
    return energy


def sensitivity(gm: fx.GraphModule, node: fx.Node, channels: int) -> torch.Tensor:
    """Per-channel weight of an error on ``node``'s tensor: the squared weights of the convolutions that
    read it (:func:`_readers`), plus 1 for every other reader (which takes the value as it is)."""
    w = torch.zeros(channels)
    for _, convs in _readers(gm, node):
        if convs:
            for conv in convs:
                w += _input_channel_energy(conv)
        else:
            w += 1.0
    return w


def _scale_input_channels(conv: nn.Conv2d, factor: torch.Tensor) -> None:
    """Multiply ``conv``'s weights by ``factor[c]`` along input channel ``c`` (any group count)."""
    w = conv.weight.data
    for c, rows, k in _input_channel_weights(conv):
        w[rows, k] *= factor[c]


def channel_ranges(gm: fx.GraphModule, nodes: list[fx.Node], calib: Iterable[torch.Tensor]
                   ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel (min, max) of the NCHW tensors of ``nodes`` over the calibration batches."""
    want = {n.name for n in nodes}
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            if n.name in want:
                lo, hi = out.detach().amin(dim=(0, 2, 3)), out.detach().amax(dim=(0, 2, 3))
                if n.name in stats:
                    lo, hi = torch.minimum(lo, stats[n.name][0]), torch.maximum(hi, stats[n.name][1])
                stats[n.name] = (lo, hi)
            return out

    with torch.no_grad():
        for x in calib:
            Recorder(gm).run(x)
    return stats


def channel_gains(lo: torch.Tensor, hi: torch.Tensor, weight: torch.Tensor, max_gain: float = MAX_GAIN
                  ) -> tuple[torch.Tensor, float, float]:
    """Per-channel gains ``s`` for a tensor whose channel c takes values in [lo_c, hi_c] (its useful range,
    on calibration images), and the range [low, high] of the scaled tensor, for per-tensor int8.

    Scaled, channel c spans ``s_c (hi_c - lo_c)`` of the tensor's ``high - low``: its int8 noise is that of
    the tensor over s_c, and ``weight[c]`` says how much that noise costs downstream
    (:func:`sensitivity`). For a given ratio rho = -low / high, the best gains make every channel touch the
    tensor's range at one end (s_c = high / max(hi_c, -lo_c / rho)); rho itself is chosen on a grid to
    minimise the weighted noise sum_c weight_c ((high - low) / s_c)^2. The gains are normalised so that the
    tensor's top stays that of the unscaled tensor, and capped at ``max_gain`` (a channel that is almost
    always 0 would otherwise be scaled without bound). A ReLU output (lo = 0) gets rho = 0: every channel is
    scaled up to the largest one."""
    pos, neg = hi.clamp(min=0.0), (-lo).clamp(min=0.0)
    top = float(pos.max())
    if top <= 0:
        return torch.ones_like(hi), float(lo.min()), float(hi.max())
    rhos = [0.0] if float(neg.max()) == 0.0 else [float(r) for r in torch.logspace(-3, 1, 161)]
    best: tuple[float, float] | None = None
    for rho in rhos:
        need = pos if rho == 0.0 else torch.maximum(pos, neg / rho)
        need = need.clamp(min=top / max_gain)
        cost = float((weight * ((1 + rho) * need) ** 2).sum())
        if best is None or cost < best[0]:
            best = (cost, rho)
    assert best is not None
    rho = best[1]
    need = (pos if rho == 0.0 else torch.maximum(pos, neg / rho)).clamp(min=top / max_gain)
    s = top / need
    return s, float((lo * s).min()), float((hi * s).max())


def _scale_conv_outputs(conv: nn.Conv2d, s: torch.Tensor) -> None:
    """Multiply ``conv``'s output channel c by ``s[c]`` (weights and bias)."""
    with torch.no_grad():
        conv.weight.mul_(s.view(-1, 1, 1, 1))
        if conv.bias is not None:
            conv.bias.mul_(s)


def _rescale_readers(gm: fx.GraphModule, old: fx.Node, new: fx.Node, factor: torch.Tensor,
                     fallback: fx.Node | None) -> None:
    """Make the readers of ``old`` read ``new`` = ``old`` / ``factor`` per channel: convolutions (directly or
    behind a zero padding) get their weights multiplied by ``factor`` along that input channel; any other
    reader reads ``fallback`` (which must hold ``old``'s value) instead."""
    for u, convs in _readers(gm, old):
        if convs:
            for conv in convs:
                with torch.no_grad():
                    _scale_input_channels(conv, factor)
            u.replace_input_with(old, new)
        else:
            assert fallback is not None
            u.replace_input_with(old, fallback)


def equalize_hard_swishes(gm: fx.GraphModule, calib: Iterable[torch.Tensor], min_gain: float = MIN_GAIN,
                          max_gain: float = MAX_GAIN) -> tuple[fx.GraphModule, dict[str, Any]]:
    """Return a copy of ``gm`` (float, NCHW) with every hard-swish that reads a convolution's output (and
    nothing else does) rewritten as described in the module docstring, when its gains
    (:func:`channel_gains` on the useful ranges, weighted by :func:`sensitivity`) differ by at least
    ``min_gain``; and a summary: per rewritten hard-swish the convolution, the gains and the int8 range of
    the scaled pre-activation, and ``range_limits`` (module path -> (lo, hi)) for
    :func:`lwfc_convert.tflite_export.quantize_edge`. The copy computes the same function (float rounding
    aside)."""
    gm = copy.deepcopy(gm)
    calib = list(calib)
    matches = [m for m in find_hard_swishes(gm) if _conv_of(gm, m.x) is not None
               and set(m.x.users) <= set(m.inner) | {m.out}]
    ranges = channel_ranges(gm, [m.x for m in matches], calib)
    done = []
    limits: dict[str, tuple[float, float]] = {}
    g = gm.graph
    for m in matches:
        conv = _conv_of(gm, m.x)
        assert conv is not None
        lo, hi = ranges[m.x.name]
        # Below the floor the hard-swish is 0 whatever the value: only [max(lo, -3), hi] needs int8 steps.
        # A channel that never rises above the floor is always 0: leave it (its gain does not matter).
        alive = hi > HARD_SWISH_FLOOR
        lo_u = torch.where(alive, lo.clamp(min=HARD_SWISH_FLOOR), torch.zeros_like(lo))
        hi_u = torch.where(alive, hi, torch.zeros_like(hi))
        weight = sensitivity(gm, m.out, conv.out_channels)
        s, low, high = channel_gains(lo_u, hi_u, weight, max_gain)
        if float(s.max() / s.min()) < min_gain:
            continue
        path = str(m.x.target)
        # a = relu6(y + 3): a copy of the convolution, unscaled, bias + 3, reading the same input.
        gate = copy.deepcopy(conv)
        with torch.no_grad():
            if gate.bias is None:
                gate.bias = nn.Parameter(torch.zeros(conv.out_channels))
            gate.bias.add_(3.0)
        gm.add_submodule(f"{path}_hswish_gate", gate)
        # y' = s * y: the original convolution, scaled in place (this copy of the graph owns it).
        if conv.bias is None:
            conv.bias = nn.Parameter(torch.zeros(conv.out_channels))
        _scale_conv_outputs(conv, s)
        with g.inserting_after(m.out):
            a_conv = g.call_module(f"{path}_hswish_gate", m.x.args, dict(m.x.kwargs))
        with g.inserting_after(a_conv):
            a = g.call_function(F.relu6, (a_conv,))
        with g.inserting_after(a):
            p = g.call_function(operator.mul, (m.x, a))  # = 6 s h (with the graph's own 1/6: h s / sixth)
        factor = m.sixth / s
        fallback = None
        if any(not convs for _, convs in _readers(gm, m.out)):
            # h = p * sixth / s for readers that are not convolutions: a 1x1 depthwise convolution, whose
            # per-channel int8 weights carry the factors exactly.
            back = nn.Conv2d(conv.out_channels, conv.out_channels, 1, groups=conv.out_channels, bias=False)
            with torch.no_grad():
                back.weight.copy_(factor.view(-1, 1, 1, 1))
            gm.add_submodule(f"{path}_hswish_out", back)
            with g.inserting_after(p):
                fallback = g.call_module(f"{path}_hswish_out", (p,))
        _rescale_readers(gm, m.out, p, factor, fallback)
        for n in reversed(m.inner or [m.out]):
            if not n.users:
                g.erase_node(n)
        # y' under `low` only occurs where y < -3 (a = 0, p = 0 whatever y' is): the int8 range may clip it.
        limits[path] = (low, high)
        done.append({"conv": path, "gains": [round(float(v), 4) for v in s], "int8_range": [low, high],
                     "back_to_h": fallback is not None})
    g.eliminate_dead_code()
    g.lint()
    gm.recompile()
    return gm, {"rewritten": done, "range_limits": limits}


def _relu_of(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` is a ReLU (function or module)."""
    if _is(node, "relu") and len(node.args) == 1:
        return True
    return node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), nn.ReLU)


def equalize_relus(gm: fx.GraphModule, calib: Iterable[torch.Tensor], min_gain: float = MIN_GAIN,
                   max_gain: float = MAX_GAIN) -> tuple[fx.GraphModule, dict[str, Any]]:
    """Cross-layer equalisation (Nagel et al., "Data-Free Quantization", 2019) of conv -> ReLU -> depthwise
    conv chains: ReLU is positively homogeneous, so scaling channel c of the first convolution by s_c and
    dividing the depthwise kernel of channel c by s_c is exact. Each channel is scaled up until its
    calibration maximum reaches the tensor's (:func:`channel_gains`, at most ``max_gain``), so that
    per-tensor int8 gives small channels as many steps as large ones; per-channel int8 weights absorb the
    scaling on both sides. Returns a copy of ``gm`` and a summary."""
    gm = copy.deepcopy(gm)
    calib = list(calib)
    cands = []
    for node in gm.graph.nodes:
        if not _relu_of(gm, node):
            continue
        x = node.args[0]
        conv = _conv_of(gm, x)
        readers = _readers(gm, node)
        if conv is None or len(x.users) != 1 or not readers:
            continue
        convs = [c for _, cs in readers for c in cs]
        # Only depthwise readers (through paddings or not): their per-channel weight scales absorb 1/s exactly.
        if any(not cs for _, cs in readers) or not all(c.groups == c.in_channels for c in convs):
            continue
        cands.append((node, x, conv))
    ranges = channel_ranges(gm, [c[0] for c in cands], calib)
    done = []
    for node, x, conv in cands:
        _, hi = ranges[node.name]
        s, _, _ = channel_gains(torch.zeros_like(hi), hi, torch.ones_like(hi), max_gain)
        if float(s.max() / s.min()) < min_gain:
            continue
        _scale_conv_outputs(conv, s)
        _rescale_readers(gm, node, node, 1.0 / s, None)
        done.append({"conv": str(x.target), "gains": [round(float(v), 4) for v in s]})
    gm.recompile()
    return gm, {"rewritten": done}


def equalize(gm: fx.GraphModule, calib: Iterable[torch.Tensor], max_gain: float = MAX_GAIN
             ) -> tuple[fx.GraphModule, dict[str, Any]]:
    """Both rewrites on a copy of the float edge half ``gm``: :func:`equalize_relus`, then
    :func:`equalize_hard_swishes`. Returns the copy and a summary for bundle.json (``range_limits`` is for
    :func:`lwfc_convert.tflite_export.quantize_edge`)."""
    calib = list(calib)
    gm, relus = equalize_relus(gm, calib, max_gain=max_gain)
    gm, hswish = equalize_hard_swishes(gm, calib, max_gain=max_gain)
    return gm, {"method": "per-channel range equalisation for per-tensor int8 activations: conv -> ReLU -> "
                          "depthwise (cross-layer scaling) and conv -> hard-swish (gate convolution, scaled "
                          "pre-activation, consumers rescaled); exact in float",
                "max_gain": max_gain, "relu": relus["rewritten"], "hard_swish": hswish["rewritten"],
                "range_limits": hswish["range_limits"]}
