"""Quantization-aware fine-tuning of a PT2E-converted edge half, by distillation from the float edge half.

Post-training quantization fixes every scale and rounds every weight; what is left is the *joint* error of
all layers, which per-layer fixes (bias correction, adaptive rounding in ``quant_fix``) cannot see. Here the
converted graph itself is trained: each quantize -> dequantize pair becomes a fake-quantizer with the same
scale and zero point (straight-through gradient inside the int8 range, zero outside), and the float weights
and biases, and optionally the activation scales, are adjusted so that the simulated int8 output matches the
float edge half's output on the calibration images (no labels: the teacher is the float model). Zero points
and the graph's structure do not change and learned scales are written back into the quantize/dequantize
nodes, so the trained graph converts to TFLite exactly as before, and computes what was simulated.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any, Iterable

import torch
from torch import fx, nn

_Q = torch.ops.quantized_decomposed  # registered by torchao's PT2E import, which made the graph


def _const(gm: fx.GraphModule, arg: Any) -> Any:
    """A node argument as a value: get_attr nodes are looked up in ``gm``."""
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        obj: Any = gm
        for part in str(arg.target).split("."):
            obj = getattr(obj, part)
        return obj
    return arg


def _dq_ops() -> tuple[Any, Any]:
    return _Q.dequantize_per_tensor.default, _Q.dequantize_per_channel.default


def _q_ops() -> tuple[Any, Any]:
    return _Q.quantize_per_tensor.default, _Q.quantize_per_channel.default


def _activation_groups(gm: fx.GraphModule) -> dict[tuple[float, int], list[str]]:
    """Per-tensor quantize nodes grouped by (scale, zero point). Tensors that must share their quantization
    (concatenation inputs, padding and max pooling: shared specs) carry equal values, so a learned scale is
    learned per group and they stay equal; unrelated tensors with equal ranges (ReLU6's 0..6) are tied too."""
    groups: dict[tuple[float, int], list[str]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target == _Q.quantize_per_tensor.default:
            key = (float(_const(gm, node.args[1])), int(_const(gm, node.args[2])))
            groups.setdefault(key, []).append(node.name)
    return groups


def fake_quant_graph(quantized: fx.GraphModule, learn_scales: bool = False) -> fx.GraphModule:
    """A copy of a ``convert_pt2e`` graph (``fold_quantize=False``) whose quantize/dequantize pairs are
    differentiable fake-quantizers with the same parameters, and without the batch-size guard (training
    runs batches; the exported graph is specialised to batch 1). Parameters are copies.

    ``learn_scales``: each group of activation quantizers (:func:`_activation_groups`) gets a trainable
    scale, the parameter ``qat_scales`` (one entry per group, in the order of ``qat_scale_keys``), with LSQ's
    gradient (Esser et al. 2020); zero points stay."""
    gm = copy.deepcopy(quantized)
    g = gm.graph
    group_of: dict[str, int] = {}
    if learn_scales:
        groups = _activation_groups(gm)
        gm.qat_scale_keys = list(groups)
        gm.register_parameter("qat_scales", nn.Parameter(torch.tensor([k[0] for k in groups], dtype=torch.float32)))
        gm.register_buffer("qat_zero_points", torch.tensor([float(k[1]) for k in groups], dtype=torch.float32))
        group_of = {name: i for i, names in enumerate(groups.values()) for name in names}
        first = next(n for n in g.nodes if n.op != "placeholder")
        with g.inserting_before(first):
            scales_node = g.get_attr("qat_scales")
            zps_node = g.get_attr("qat_zero_points")
    pairs = 0
    for node in list(g.nodes):
        if node.op != "call_function" or node.target not in _dq_ops():
            continue
        q = node.args[0]
        if not (isinstance(q, fx.Node) and q.target in _q_ops()):
            continue
        x = q.args[0]
        if q.target == _Q.quantize_per_tensor.default:
            scale, zp, qmin, qmax = (float(_const(gm, a)) for a in q.args[1:5])
            with g.inserting_before(node):
                if q.name in group_of:
                    val = x.meta.get("val") if isinstance(x, fx.Node) else None
                    n_el = int(val.numel()) if isinstance(val, torch.Tensor) else 1 << 16
                    k = group_of[q.name]
                    s_k = g.call_function(torch.narrow, (scales_node, 0, k, 1))
                    z_k = g.call_function(torch.narrow, (zps_node, 0, k, 1))
                    fq = g.call_function(torch._fake_quantize_learnable_per_tensor_affine,
                                         (x, s_k, z_k, int(qmin), int(qmax), 1.0 / math.sqrt(n_el * (qmax - zp))))
                else:
                    fq = g.call_function(torch.fake_quantize_per_tensor_affine, (x, scale, int(zp), int(qmin),
                                                                                int(qmax)))
        else:
            scale_n, zp_n, axis, qmin, qmax = q.args[1:6]
            with g.inserting_before(node):
                zp_i = g.call_function(torch.Tensor.to, (zp_n, torch.int32))
                fq = g.call_function(torch.fake_quantize_per_channel_affine, (x, scale_n, zp_i, axis, qmin, qmax))
        node.replace_all_uses_with(fq)
        pairs += 1
    for node in list(g.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            g.erase_node(node)
    g.eliminate_dead_code()
    gm.recompile()
    if pairs == 0:
        raise ValueError("the graph has no quantize/dequantize pairs: not a convert_pt2e(fold_quantize=False) graph")
    return gm


def set_activation_scales(quantized: fx.GraphModule, new: dict[tuple[float, int], float]) -> int:
    """Write learned scales into ``quantized``'s per-tensor quantize and dequantize nodes: every node whose
    (scale, zero point) is a key of ``new`` gets that key's new scale. Returns the number of nodes changed."""
    changed = 0
    for node in quantized.graph.nodes:
        if node.op == "call_function" and node.target in (_Q.quantize_per_tensor.default,
                                                          _Q.dequantize_per_tensor.default):
            key = (float(_const(quantized, node.args[1])), int(_const(quantized, node.args[2])))
            if key in new:
                args = list(node.args)
                args[1] = float(new[key])
                node.args = tuple(args)
                changed += 1
    quantized.recompile()
    return changed


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| over the whole batch."""
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp(min=1e-12))


def qat_finetune(quantized: fx.GraphModule, teacher: nn.Module, images: Iterable[torch.Tensor],
                 epochs: int = 16, lr: float = 1e-4, batch: int = 16, seed: int = 0, learn_scales: bool = True,
                 progress: bool = True) -> dict[str, Any]:
    """Fine-tune the float weights and biases of ``quantized`` (a ``convert_pt2e`` graph, changed in place)
    so that its simulated int8 output matches ``teacher`` (the float edge half, NCHW) on ``images``
    (NCHW batches). Adam on the relative squared error, ``epochs`` passes over the images in random
    batches of ``batch``; the learning rate decays to zero on a cosine. Weights are clipped to their int8
    range by the fake-quantizers' zero gradient outside it. ``learn_scales``: the activation scales are
    trained too (LSQ, a tenth of the learning rate; groups as in :func:`fake_quant_graph`) and written back
    into the graph (:func:`set_activation_scales`). Returns a summary with the relative L2 error on
    ``images`` before and after; the parameters of the best epoch (by that error) are kept."""
    from tqdm import tqdm

    t0 = time.time()
    xs = torch.cat([x for x in images]).float()
    with torch.no_grad():
        target = torch.cat([teacher(xs[i:i + batch]) for i in range(0, len(xs), batch)])
    student = fake_quant_graph(quantized, learn_scales)
    params = {n: p for n, p in student.named_parameters()}
    if not params:
        raise ValueError("the graph has no float parameters to fine-tune")
    for p in params.values():
        p.requires_grad_(True)

    def error() -> float:
        with torch.no_grad():
            out = torch.cat([student(xs[i:i + batch]) for i in range(0, len(xs), batch)])
        return relative_l2(out, target)

    before = best = error()
    best_state = {n: p.detach().clone() for n, p in params.items()}
    opt = torch.optim.Adam([{"params": [p for n, p in params.items() if n != "qat_scales"], "lr": lr},
                            {"params": [p for n, p in params.items() if n == "qat_scales"], "lr": lr / 10}])
    steps = epochs * math.ceil(len(xs) / batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    gen = torch.Generator().manual_seed(seed)
    norm = target.pow(2).mean()
    history = [before]
    for _ in tqdm(range(epochs), desc="QAT fine-tuning", unit="epoch", disable=not progress, leave=False):
        order = torch.randperm(len(xs), generator=gen)
        for i in range(0, len(xs), batch):
            idx = order[i:i + batch]
            loss = (student(xs[idx]) - target[idx]).pow(2).mean() / norm
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if learn_scales:
                with torch.no_grad():
                    student.qat_scales.clamp_(min=1e-8)
        err = error()
        history.append(err)
        if err < best:
            best = err
            best_state = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        own = dict(quantized.named_parameters())
        for n, v in best_state.items():
            if n != "qat_scales":
                own[n].copy_(v)
    scales = {}
    if learn_scales:
        scales = {k: float(v) for k, v in zip(student.qat_scale_keys, best_state["qat_scales"])}
        set_activation_scales(quantized, scales)
    return {"method": "QAT fine-tuning of the converted graph's weights and biases"
                      + (" and activation scales (LSQ)" if learn_scales else " (PT2E's scales fixed)")
                      + ", distilled from the float edge half",
            "epochs": epochs, "lr": lr, "batch": batch, "images": len(xs),
            "calibration_rel_l2_before": before, "calibration_rel_l2_after": best,
            "activation_scales": [{"scale_before": k[0], "zero_point": k[1], "scale_after": v}
                                  for k, v in scales.items()],
            "history": history, "seconds": time.time() - t0}
