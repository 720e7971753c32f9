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


def _patches(conv: nn.Conv2d, x: torch.Tensor, max_positions: int, gen: torch.Generator) -> torch.Tensor:
    """Input patches of ``conv`` as [groups, n = cin/groups * kh * kw, samples] (subsampled positions)."""
    pad = getattr(conv, "static_padding", None)
    if pad is not None:  # the conv sees the zero-padded input
        x = pad(x)
        padding: Any = 0
    else:
        padding = conv.padding
    cols = torch.nn.functional.unfold(x, conv.kernel_size, conv.dilation, padding, conv.stride)  # N, n*g, L
    n_img, rows, length = cols.shape
    if length > max_positions:
        idx = torch.randperm(length, generator=gen)[:max_positions]
        cols = cols[:, :, idx]
    g = conv.groups
    cols = cols.view(n_img, g, rows // g, -1).permute(1, 2, 0, 3).reshape(g, rows // g, -1)
    return cols


def _adaround(conv: nn.Conv2d, cov: torch.Tensor, sweeps: int = 4) -> torch.Tensor:
    """Choose, per weight, rounding down or up on the int8 grid (scale = max|w| / 127 per output channel)
    to minimise the output error variance dW^T Cov dW of each output channel (coordinate descent from
    round-to-nearest). Weights at the grid's end (which fix the scale) keep their value. Returns the new
    float weights, exactly on the grid, so that the PT2E quantizer reproduces these int8 values."""
    w = conv.weight.detach()
    cout = w.shape[0]
    g = conv.groups
    amax = w.abs().flatten(1).amax(1).clamp(min=2**-12)
    scale = (amax / 127.0).view(g, cout // g, 1)
    wf = w.reshape(g, cout // g, -1)  # g, out, n
    q = torch.clamp(torch.round(wf / scale), -127, 127)
    frozen = (wf / scale).abs() >= 126.5
    dw = q * scale - wf
    n = wf.shape[2]
    if n <= 10:
        # Few weights per output channel (3x3 depthwise): search all floor/ceil combinations exactly.
        lo = torch.floor(wf / scale)
        bits = (torch.arange(2**n).unsqueeze(1) >> torch.arange(n)) & 1  # combos, n
        cand = (lo.unsqueeze(2) + bits.to(wf.dtype)) * scale.unsqueeze(2) - wf.unsqueeze(2)  # g,o,combos,n
        cand_q = lo.unsqueeze(2) + bits.to(wf.dtype)
        bad = ((cand_q < -127) | (cand_q > 127) | (frozen.unsqueeze(2) & (cand_q != q.unsqueeze(2)))).any(3)
        cost = torch.einsum("gocn,gnm,gocm->goc", cand, cov, cand).masked_fill(bad, float("inf"))
        best = cost.argmin(2)  # g, o
        dw = torch.gather(cand, 2, best[:, :, None, None].expand(-1, -1, 1, n)).squeeze(2)
        return (wf + dw).reshape(w.shape)
    for _ in range(sweeps):
        changed = False
        for j in range(n):
            r = torch.einsum("gk,gok->go", cov[:, j, :], dw)
            step = torch.where(dw[:, :, j] < 0, 1.0, -1.0) * scale[:, :, 0]  # flip to the other neighbour
            delta = 2 * step * r + step * step * cov[:, j, j].unsqueeze(1)
            ok = (delta < -1e-12 * cov[:, j, j].unsqueeze(1).abs()) & ~frozen[:, :, j]
            if ok.any():
                changed = True
                dw[:, :, j] = torch.where(ok, dw[:, :, j] + step, dw[:, :, j])
        if not changed:
            break
    return (wf + dw).reshape(w.shape)


def bias_correct(edge: nn.Module, calib: Iterable[torch.Tensor], adaround: bool = True,
                 max_positions: int = 2048, seed: int = 0) -> tuple[fx.GraphModule, dict[str, Any]]:
    """Fold BN, optionally choose the int8 rounding of every conv's weights to minimise its output error
    on the calibration images (per-channel, see :func:`_adaround`), then correct each conv's bias for the
    expected output shift of that rounding. Returns the corrected copy and a summary."""
    gm = fold_batchnorm(edge if isinstance(edge, fx.GraphModule) else fx.symbolic_trace(edge))
    convs = {name: m for name, m in gm.named_modules() if isinstance(m, nn.Conv2d)}
    sums: dict[str, torch.Tensor] = {}
    seconds: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []
    gen = torch.Generator().manual_seed(seed)

    def make_hook(name: str, conv: nn.Conv2d) -> Any:
        def hook(mod: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            cols = _patches(mod, args[0].detach(), max_positions, gen)  # g, n, S
            sums[name] = sums.get(name, 0) + cols.sum(dim=2)
            if adaround:
                seconds[name] = seconds.get(name, 0) + torch.einsum("gns,gms->gnm", cols, cols)
            counts[name] = counts.get(name, 0) + cols.shape[2]

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
            mean = sums[name] / counts[name]  # g, n: mean input patch per group
            g = conv.groups
            w0 = conv.weight.detach().clone()
            if adaround:
                cov = seconds[name] / counts[name] - torch.einsum("gn,gm->gnm", mean, mean)
                conv.weight.data = _adaround(conv, cov)
                dw = conv.weight.detach() - w0
            else:
                dw = _int8_weight_error(w0)
            out_per_g = w0.shape[0] // g
            shift = torch.einsum("gon,gn->go", dw.reshape(g, out_per_g, -1), mean).reshape(-1)
            if conv.bias is None:
                conv.bias = nn.Parameter(torch.zeros(conv.weight.shape[0]))
            conv.bias -= shift
            summary[name] = float(shift.abs().max())
    gm.recompile()
    method = "BN folding + " + ("adaptive int8 weight rounding + " if adaround else "") + \
        "weight-rounding bias correction (empirical input statistics)"
    return gm, {"method": method,
                "convs": len(summary), "max_abs_shift": max(summary.values(), default=0.0)}
