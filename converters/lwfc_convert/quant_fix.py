"""Bias correction for post-training int8 quantization of an edge half.

Rounding a convolution's weights to int8 shifts the *mean* of its output: E[y_q - y] = (W_q - W) E[x].
Thin depthwise convolutions (9 or 25 weights per channel, BN-folded) suffer most. We fold every
conv -> BatchNorm pair in float first (as PT2E does), predict each conv's weight-rounding error with the
same per-channel symmetric int8 scheme the quantizer uses (scale = max|w| / 127), measure the mean input of
each conv channel on the calibration images, and subtract the expected output shift from the bias
(Nagel et al., "Data-Free Quantization", 2019, section 4.2, with empirical input means).
"""

from __future__ import annotations

import copy
from typing import Any, Iterable

import torch
from torch import fx, nn


def fold_batchnorm(gm: fx.GraphModule) -> fx.GraphModule:
    """Return a copy of ``gm`` with each Conv2d module followed only by a BatchNorm2d module fused."""
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    gm = copy.deepcopy(gm)
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(str(node.target)), nn.BatchNorm2d):
            continue
        prev = node.args[0]
        if not (isinstance(prev, fx.Node) and prev.op == "call_module" and len(prev.users) == 1):
            continue
        conv = modules.get(str(prev.target))
        if not isinstance(conv, nn.Conv2d):
            continue
        bn = modules[str(node.target)]
        w, b = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                                    bn.weight, bn.bias)
        conv.weight = w
        conv.bias = b
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def _int8_weight_error(w: torch.Tensor) -> torch.Tensor:
    """W_q - W for per-output-channel symmetric int8 (-127..127) weights, as the PT2E quantizer does."""
    amax = w.detach().abs().flatten(1).amax(1).clamp(min=2**-12)
    scale = (amax / 127.0).view(-1, *([1] * (w.dim() - 1)))
    return torch.clamp(torch.round(w / scale), -127, 127) * scale - w


def bias_correct(edge: nn.Module, calib: Iterable[torch.Tensor]) -> tuple[fx.GraphModule, dict[str, Any]]:
    """Fold BN and apply weight-rounding bias correction to every conv of ``edge`` (an fx GraphModule);
    returns the corrected copy and a summary (per conv: largest |shift| relative to the output std)."""
    gm = fold_batchnorm(edge if isinstance(edge, fx.GraphModule) else fx.symbolic_trace(edge))
    convs = {name: m for name, m in gm.named_modules() if isinstance(m, nn.Conv2d)}
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def make_hook(name: str, conv: nn.Conv2d) -> Any:
        def hook(mod: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0]
            pad = getattr(mod, "static_padding", None)
            if pad is not None:  # the conv sees the zero-padded input
                x = pad(x)
            sums[name] = sums.get(name, 0) + x.detach().sum(dim=(0, 2, 3))
            counts[name] = counts.get(name, 0) + x.shape[0] * x.shape[2] * x.shape[3]

        return hook

    for name, conv in convs.items():
        hooks.append(conv.register_forward_pre_hook(make_hook(name, conv)))
    with torch.no_grad():
        for x in calib:
            gm(x)
    for h in hooks:
        h.remove()
    summary = {}
    with torch.no_grad():
        for name, conv in convs.items():
            if name not in sums:
                continue
            mean_in = sums[name] / counts[name]  # per input channel
            dw = _int8_weight_error(conv.weight)  # (out, in/groups, kh, kw)
            g = conv.groups
            cin_g = conv.weight.shape[1]
            mean_g = mean_in.view(g, cin_g)  # per group
            out_per_g = conv.weight.shape[0] // g
            dws = dw.sum(dim=(2, 3)).view(g, out_per_g, cin_g)
            shift = torch.einsum("goi,gi->go", dws, mean_g).reshape(-1)
            if conv.bias is None:
                conv.bias = nn.Parameter(torch.zeros(conv.weight.shape[0]))
            conv.bias -= shift
            summary[name] = float(shift.abs().max())
    gm.recompile()
    return gm, {"method": "BN folding + weight-rounding bias correction (empirical input means)",
                "convs": len(summary), "max_abs_shift": max(summary.values(), default=0.0)}
