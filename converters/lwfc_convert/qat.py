"""Quantization-aware fine-tuning of a PT2E-converted edge half, by distillation from the float edge half.

Post-training quantization fixes every scale and rounds every weight; what is left is the *joint* error of
all layers, which per-layer fixes (bias correction, adaptive rounding in ``quant_fix``) cannot see. Here the
converted graph itself is trained: each quantize -> dequantize pair becomes a fake-quantizer with the same
scale and zero point (straight-through gradient inside the int8 range, zero outside), and the float weights
and biases, and optionally the activation scales, are adjusted so that the simulated int8 output matches the
float edge half's output on the calibration images (no labels: the teacher is the float model). Zero points
and the graph's structure do not change and learned scales are written back into the quantize/dequantize
nodes, so the trained graph converts to TFLite exactly as before, and computes what was simulated.

The split tensor's L2 error weighs every element alike; the task does not. :class:`TaskDistillation` adds
a second target: the float cloud half's own outputs (a detector's heatmaps and box sizes) computed from the
simulated int8 features, against the same computed from the float features, so that the training spends the
int8 error where the task does not see it.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import fx, nn

from .aten import CAT_TARGETS, SHARE_TARGETS, aten_name

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


def _activation_groups(gm: fx.GraphModule) -> list[list[str]]:
    """Per-tensor quantize nodes that must share one scale and zero point, as lists of node names, in graph
    order. Two quantize nodes are tied when they quantize the same tensor (a tensor with several consumers
    gets one quantize node per consumer) or when one quantizes the output of a padding, max-pooling or
    concatenation whose input the other quantizes with the same parameters (TFLite runs those ops without
    rescaling: shared specs in ``tflite_export``). Every other tensor gets its own scale, so that, e.g.,
    each ReLU6 output may learn its own clipping range."""
    parent: dict[str, str] = {}

    def find(a: str) -> str:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    def params(q: fx.Node) -> tuple[float, int]:
        return float(_const(gm, q.args[1])), int(_const(gm, q.args[2]))

    by_input: dict[tuple[str, tuple[float, int]], str] = {}
    for node in gm.graph.nodes:
        if not (node.op == "call_function" and node.target == _Q.quantize_per_tensor.default):
            continue
        parent[node.name] = node.name
        x = node.args[0]
        if not isinstance(x, fx.Node):
            continue
        own = params(node)
        first = by_input.setdefault((x.name, own), node.name)
        parent[find(node.name)] = find(first)
        if x.op == "call_function" and aten_name(x) in SHARE_TARGETS + CAT_TARGETS:
            inputs = x.args[0] if aten_name(x) in CAT_TARGETS else [x.args[0]]
            for d in inputs:
                if (isinstance(d, fx.Node) and d.target == _Q.dequantize_per_tensor.default
                        and isinstance(d.args[0], fx.Node) and d.args[0].target == _Q.quantize_per_tensor.default
                        and params(d.args[0]) == own):
                    parent[find(node.name)] = find(d.args[0].name)
    groups: dict[str, list[str]] = {}
    for name in parent:
        groups.setdefault(find(name), []).append(name)
    return list(groups.values())


def fake_quant_graph(quantized: fx.GraphModule, learn_scales: bool = False) -> fx.GraphModule:
    """A copy of a ``convert_pt2e`` graph (``fold_quantize=False``) whose quantize/dequantize pairs are
    differentiable fake-quantizers with the same parameters, and without the batch-size guard (training
    runs batches; the exported graph is specialised to batch 1). Parameters are copies.

    ``learn_scales``: each group of activation quantizers (:func:`_activation_groups`) gets a trainable
    scale, stored as its logarithm in the parameter ``qat_log_scales`` (one entry per group, in the order of
    ``qat_groups``, the groups' quantize node names) so that one learning rate moves small and large scales
    by the same fraction; LSQ's gradient (Esser et al. 2020); zero points stay. The group that quantizes
    the model's input is not trained: it is the device's interface, calibrated or set to the pixels' exact
    grid (:func:`fix_input_quantization`)."""
    gm = copy.deepcopy(quantized)
    g = gm.graph
    group_of: dict[str, int] = {}
    if learn_scales:
        nodes = {n.name: n for n in g.nodes}
        groups = _activation_groups(gm)
        fixed = set(input_quantizers(gm, groups))
        gm.qat_groups = [names for names in groups if not fixed.intersection(names)]
        first_q = [nodes[names[0]] for names in gm.qat_groups]
        log_scales = [math.log(float(_const(gm, q.args[1]))) for q in first_q]
        gm.register_parameter("qat_log_scales", nn.Parameter(torch.tensor(log_scales, dtype=torch.float32)))
        gm.register_buffer("qat_zero_points", torch.tensor([float(_const(gm, q.args[2])) for q in first_q],
                                                            dtype=torch.float32))
        group_of = {name: i for i, names in enumerate(gm.qat_groups) for name in names}
        first = next(n for n in g.nodes if n.op != "placeholder")
        with g.inserting_before(first):
            scales_node = g.call_function(torch.exp, (g.get_attr("qat_log_scales"),))
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


def set_activation_scales(quantized: fx.GraphModule, new: dict[str, float | tuple[float, int]]) -> int:
    """Write scales into ``quantized``: ``new`` maps a per-tensor quantize node's name to its new scale, or
    to a (scale, zero point) pair, which that node and the dequantize nodes reading it get. Returns the
    number of nodes changed."""
    changed = 0
    for node in quantized.graph.nodes:
        if node.op == "call_function" and node.target == _Q.quantize_per_tensor.default and node.name in new:
            value = new[node.name]
            scale, zero_point = value if isinstance(value, tuple) else (value, None)
            for n in [node] + [u for u in node.users if u.target == _Q.dequantize_per_tensor.default]:
                args = list(n.args)
                args[1] = float(scale)
                if zero_point is not None:
                    args[2] = int(zero_point)
                n.args = tuple(args)
                changed += 1
    quantized.recompile()
    return changed


def _module_path(node: fx.Node) -> str | None:
    """The innermost module a ``torch.export`` node was traced in (``nn_module_stack``), or None."""
    stack = node.meta.get("nn_module_stack")
    return list(stack.values())[-1][0] if stack else None


def limit_ranges(quantized: fx.GraphModule, limits: dict[str, tuple[float, float]]) -> dict[str, list[float]]:
    """Narrow the calibrated int8 range of module outputs in ``quantized`` (a ``convert_pt2e`` graph, changed
    in place): ``limits`` maps a module path (as in the float model) to (lo, hi); the per-tensor quantize node
    after that module's node gets the range [max(lo, its lo), min(hi, its hi)] (zero still exactly
    representable), so that values outside saturate in int8. Used where values past a bound do not matter
    (a hard-swish's input below -3: ``equalize``). Returns the new range per module path."""
    new: dict[str, tuple[float, int]] = {}
    done: dict[str, list[float]] = {}
    for node in quantized.graph.nodes:
        path = _module_path(node) if node.op == "call_function" else None
        if path not in limits:
            continue
        for q in node.users:
            if q.target != _Q.quantize_per_tensor.default:
                continue
            scale, zp, qmin, qmax = (float(_const(quantized, a)) for a in q.args[1:5])
            lo = max((qmin - zp) * scale, limits[path][0])
            hi = min((qmax - zp) * scale, limits[path][1])
            lo, hi = min(lo, 0.0), max(hi, 0.0)
            step = (hi - lo) / (qmax - qmin)
            new[q.name] = (step, int(min(qmax, max(qmin, round(qmin - lo / step)))))
            done[path] = [lo, hi]
    set_activation_scales(quantized, new)
    return done


def input_quantizers(quantized: fx.GraphModule, groups: list[list[str]] | None = None) -> list[str]:
    """Names of the per-tensor quantize nodes that must share the model input's scale and zero point: those
    of the input itself and those tied to them (e.g. the "SAME" padding in front of the first convolution,
    which TFLite runs on the input's int8 values). ``groups``: :func:`_activation_groups` of ``quantized``,
    if already computed."""
    inputs = [n.name for n in quantized.graph.nodes
              if n.op == "call_function" and n.target == _Q.quantize_per_tensor.default
              and isinstance(n.args[0], fx.Node) and n.args[0].op == "placeholder"]
    groups = _activation_groups(quantized) if groups is None else groups
    return [name for group in groups if set(group) & set(inputs) for name in group]


def fix_input_quantization(quantized: fx.GraphModule, scale: float, zero_point: int) -> list[str]:
    """Give the model input of ``quantized`` (a ``convert_pt2e`` graph, changed in place) the int8
    quantization (``scale``, ``zero_point``) instead of the calibrated one, e.g. the exact pixel grid of
    ``preprocess.exact_int8_input``. Returns the names of the quantize nodes changed."""
    names = input_quantizers(quantized)
    if not names:
        raise ValueError("the graph's input is not quantized per tensor")
    set_activation_scales(quantized, {n: (float(scale), int(zero_point)) for n in names})
    return names


def random_crops(batches: Iterable[torch.Tensor], size: int, count: int, seed: int = 0) -> torch.Tensor:
    """``count`` random ``size`` x ``size`` crops (NCHW) of the images in ``batches``, at even offsets (so that
    stride-2 layers sample the same pixel grid as on the whole image), for fine-tuning a fully convolutional
    edge half on large images at a fraction of the cost."""
    images = torch.cat([x for x in batches])
    n, _, h, w = images.shape
    if size > min(h, w):
        raise ValueError(f"crop size {size} exceeds the images ({h} x {w})")
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (count,), generator=gen)
    tops = 2 * torch.randint(0, (h - size) // 2 + 1, (count,), generator=gen)
    lefts = 2 * torch.randint(0, (w - size) // 2 + 1, (count,), generator=gen)
    return torch.stack([images[i, :, t:t + size, left:left + size]
                        for i, t, left in zip(idx.tolist(), tops.tolist(), lefts.tolist())])


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| over the whole batch."""
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp(min=1e-12))


def error_budget(quantized: fx.GraphModule, teacher: nn.Module, images: Iterable[torch.Tensor],
                 batch: int = 16) -> dict[str, Any]:
    """Where the int8 error of ``quantized`` (a ``convert_pt2e`` graph) against ``teacher`` (the float edge
    half) comes from, as relative L2 errors over ``images`` (NCHW batches), each simulated with
    :func:`fake_quant_graph`:

    - ``output_rounding``: the float output rounded to the int8 output's scale and zero point: the floor no
      change inside the edge half can remove;
    - ``weights_and_output``: int8 weights and output, every other activation left in float;
    - ``int8``: everything quantized (what the TFLite model computes, to about 0.1%).
    """
    fq = fake_quant_graph(quantized)
    out = next(n for n in fq.graph.nodes if n.op == "output").args[0]
    last = out[0] if isinstance(out, (tuple, list)) else out
    if not (isinstance(last, fx.Node) and last.target == torch.fake_quantize_per_tensor_affine):
        raise ValueError("the graph's output is not quantized per tensor")
    out_params = last.args[1:5]
    weights_only = copy.deepcopy(fq)
    for node in list(weights_only.graph.nodes):
        if node.target == torch.fake_quantize_per_tensor_affine and node.name != last.name:
            node.replace_all_uses_with(node.args[0])
            weights_only.graph.erase_node(node)
    weights_only.recompile()
    sums = {"output_rounding": 0.0, "weights_and_output": 0.0, "int8": 0.0}
    norm = 0.0
    n = 0
    with torch.no_grad():
        for x in images:
            for i in range(0, len(x), batch):
                xb = x[i:i + batch].float()
                ref = teacher(xb)
                got = {"output_rounding": torch.fake_quantize_per_tensor_affine(ref, *out_params),
                       "weights_and_output": weights_only(xb), "int8": fq(xb)}
                for k, v in got.items():
                    sums[k] += float((v - ref).pow(2).sum())
                norm += float(ref.pow(2).sum())
                n += len(xb)
    return {"images": n, **{k: math.sqrt(v / max(norm, 1e-30)) for k, v in sums.items()}}


def relative_mse(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum over outputs of ||s - t||^2 / ||t||^2: :class:`TaskDistillation`'s default loss."""
    return sum(((s - t).pow(2).sum() / t.pow(2).sum().clamp(min=1e-12) for s, t in zip(student, teacher)),
               torch.zeros(()))


@dataclass
class TaskDistillation:
    """A second QAT target: the float cloud half's outputs on the simulated int8 features should match its
    outputs on the float features.

    ``head``: features (NCHW, the edge half's output) -> a tensor or a tuple of tensors, differentiable (e.g.
    the cloud half up to a detector's heatmaps, before its top-k decoding); its parameters are not trained.
    ``loss``: (student outputs, teacher outputs), each a tuple -> a scalar relative error (about 1 for outputs
    that are all wrong, 0 for exact ones); default :func:`relative_mse`. ``weight``: the loss's weight
    against the split tensor's relative squared error."""

    head: nn.Module
    loss: Callable[[Sequence[torch.Tensor], Sequence[torch.Tensor]], torch.Tensor] = relative_mse
    weight: float = 1.0

    @property
    def description(self) -> str:
        """The loss's dotted name, for bundle.json."""
        return f"{self.loss.__module__}.{self.loss.__qualname__}"

    def outputs(self, features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.head(features)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def qat_finetune(quantized: fx.GraphModule, teacher: nn.Module, images: Iterable[torch.Tensor],
                 epochs: int = 16, lr: float = 1e-4, batch: int = 16, seed: int = 0, learn_scales: bool = True,
                 scale_lr: float = 1e-3, progress: bool = True, images_per_epoch: int | None = None,
                 task: TaskDistillation | None = None) -> dict[str, Any]:
    """Fine-tune the float weights and biases of ``quantized`` (a ``convert_pt2e`` graph, changed in place)
    so that its simulated int8 output matches ``teacher`` (the float edge half, NCHW) on ``images``
    (NCHW batches). Adam on the relative squared error, ``epochs`` passes over the images in random
    batches of ``batch``; the learning rate decays to zero on a cosine. Weights are clipped to their int8
    range by the fake-quantizers' zero gradient outside it. ``learn_scales``: the activation scales are
    trained too (LSQ on the logarithm of each scale with learning rate ``scale_lr``, i.e. about that
    fraction of the scale per step; groups as in :func:`_activation_groups`) and written back into the
    graph (:func:`set_activation_scales`). Returns a summary with the relative L2 error on
    ``images`` before and after; the parameters of the best epoch (by that error) are kept.

    ``images_per_epoch``: each epoch trains on that many images drawn at random from ``images`` instead of on
    all of them, and the best epoch is judged on the first ``images_per_epoch`` images (many large images at a
    bounded cost per epoch). ``task``: the loss adds ``task.weight`` times the task distillation loss
    (:class:`TaskDistillation`), and the best epoch is the one with the least total loss (squared relative L2
    plus the weighted task loss); the summary's ``task_distillation`` gives the task loss before, after and per
    epoch."""
    from tqdm import tqdm

    t0 = time.time()
    xs = torch.cat([x for x in images]).float()
    per_epoch = min(images_per_epoch or len(xs), len(xs))
    with torch.no_grad():
        target = torch.cat([teacher(xs[i:i + batch]) for i in range(0, len(xs), batch)])
    student = fake_quant_graph(quantized, learn_scales)
    params = {n: p for n, p in student.named_parameters()}
    if not params:
        raise ValueError("the graph has no float parameters to fine-tune")
    for p in params.values():
        p.requires_grad_(True)
    if task is not None:
        for p in task.head.parameters():
            p.requires_grad_(False)
    weight = task.weight if task is not None else 0.0
    norm = target.pow(2).mean()
    probe = torch.arange(per_epoch)
    # The teacher's task outputs on the probe images, computed once: every epoch's error() compares with them.
    probe_wanted = ([task.outputs(target[probe[i:i + batch]]) for i in range(0, per_epoch, batch)]
                    if task is not None else [])

    def task_loss(out: torch.Tensor, idx: torch.Tensor, wanted: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """The task loss of the student's features ``out`` on the images ``idx`` (0 without a task)."""
        if task is None:
            return torch.zeros(())
        if wanted is None:
            with torch.no_grad():
                wanted = task.outputs(target[idx])
        return task.loss(task.outputs(out), wanted)

    def error() -> tuple[float, float]:
        """(relative L2 error of the features, mean task loss per batch) on the probe images."""
        outs, task_losses = [], []
        with torch.no_grad():
            for k, i in enumerate(range(0, per_epoch, batch)):
                idx = probe[i:i + batch]
                outs.append(student(xs[idx]))
                if task is not None:
                    task_losses.append(float(task_loss(outs[-1], idx, probe_wanted[k])))
        return relative_l2(torch.cat(outs), target[probe]), sum(task_losses) / max(len(task_losses), 1)

    def total(err: tuple[float, float]) -> float:
        return err[0] ** 2 + weight * err[1]

    first = error()
    best, best_err = total(first), first
    best_state = {n: p.detach().clone() for n, p in params.items()}
    opt = torch.optim.Adam([{"params": [p for n, p in params.items() if n != "qat_log_scales"], "lr": lr},
                            {"params": [p for n, p in params.items() if n == "qat_log_scales"], "lr": scale_lr}])
    steps = epochs * math.ceil(per_epoch / batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    gen = torch.Generator().manual_seed(seed)
    history = [first]
    for _ in tqdm(range(epochs), desc="QAT fine-tuning", unit="epoch", disable=not progress, leave=False):
        order = torch.randperm(len(xs), generator=gen)[:per_epoch]
        for i in range(0, per_epoch, batch):
            idx = order[i:i + batch]
            out = student(xs[idx])
            loss = (out - target[idx]).pow(2).mean() / norm + weight * task_loss(out, idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        err = error()
        history.append(err)
        if total(err) < best:
            best, best_err = total(err), err
            best_state = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        own = dict(quantized.named_parameters())
        for n, v in best_state.items():
            if n != "qat_log_scales":
                own[n].copy_(v)
    scales = []
    if learn_scales:
        nodes = {n.name: n for n in quantized.graph.nodes}
        for names, log_s in zip(student.qat_groups, best_state["qat_log_scales"].tolist()):
            q = nodes[names[0]]
            scales.append({"tensors": names, "scale_before": float(_const(quantized, q.args[1])),
                           "zero_point": int(_const(quantized, q.args[2])), "scale_after": math.exp(log_s)})
        set_activation_scales(quantized, {n: a["scale_after"] for a in scales for n in a["tensors"]})
    return {"method": "QAT fine-tuning of the converted graph's weights and biases"
                      + (" and activation scales (LSQ)" if learn_scales else " (PT2E's scales fixed)")
                      + ", distilled from the float edge half"
                      + (" and from the float cloud half's outputs" if task is not None else ""),
            "epochs": epochs, "lr": lr, "scale_lr": scale_lr if learn_scales else None, "batch": batch,
            "images": len(xs), "images_per_epoch": per_epoch,
            "calibration_rel_l2_before": first[0], "calibration_rel_l2_after": best_err[0],
            "activation_scales": scales,
            "history": [e[0] for e in history],
            **({"task_distillation": {"loss": task.description, "weight": task.weight,
                                      "before": first[1], "after": best_err[1],
                                      "history": [e[1] for e in history]}} if task is not None else {}),
            "seconds": time.time() - t0}
