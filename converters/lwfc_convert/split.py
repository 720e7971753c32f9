"""Split a model into an edge half and a cloud half at a module boundary.

The model is traced with ``torch.fx`` (every custom module inlined down to torch.nn leaves; each node
remembers its module scope). A module path P names the tensor that P returns, i.e. the last node traced
inside P. Cutting after a node is valid only when that node's tensor is the *only* value that crosses the
cut: the input image and every other intermediate must be dead by then. That rules out points inside a
residual block (the skip connection crosses) and accepts the points between blocks and stages, so residual
networks split without being a plain sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

# Modules and functions whose output is known to be non-negative (ReLU) or within [0, 6] (ReLU6).
_RELU_MODULES = (nn.ReLU,)
_RELU6_MODULES = (nn.ReLU6,)


class SplitError(ValueError):
    """A split point that does not exist or does not cut the model into two halves."""


@dataclass(frozen=True)
class SplitPoint:
    """A valid cut: module path, output shape (C, H, W) for one input, activation type and aliases."""

    path: str
    shape_chw: tuple[int, ...]
    activation: str  # "relu" (c_min = 0), "relu6" (values in [0, 6]) or "linear" (signed)
    aliases: tuple[str, ...] = ()

    def as_tuple(self) -> tuple[str, tuple[int, ...], str]:
        return self.path, self.shape_chw, self.activation


class _Tracer(fx.Tracer):
    """Keeps every Conv2d (including subclasses such as EfficientNet's SameConv2d with its own padding)
    as one call_module node, so BN folding and bias correction find conv -> BN module pairs."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, nn.Conv2d) or super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace ``model`` (eval mode assumed) into a GraphModule with module scopes."""
    try:
        graph = _Tracer().trace(model)
        return fx.GraphModule(model, graph, class_name=type(model).__name__)
    except Exception as exc:  # fx raises many types; the message names the failing construct
        raise SplitError(f"cannot trace {type(model).__name__} with torch.fx: {exc}") from exc


def _activation_of(gm: fx.GraphModule, node: fx.Node) -> str:
    """Classify the op producing ``node``: relu, relu6 or linear."""
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        if isinstance(mod, _RELU6_MODULES):
            return "relu6"
        if isinstance(mod, nn.Hardtanh) and mod.min_val == 0.0 and mod.max_val == 6.0:
            return "relu6"
        if isinstance(mod, _RELU_MODULES):
            return "relu"
        if isinstance(mod, (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Identity, nn.Dropout)):
            # Pooling keeps the sign range of its input.
            arg = node.args[0]
            return _activation_of(gm, arg) if isinstance(arg, fx.Node) else "linear"
        return "linear"
    if node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target))
        if name == "relu6":
            return "relu6"
        if name in ("relu", "relu_"):
            return "relu"
        if name in ("max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "dropout"):
            arg = node.args[0]
            return _activation_of(gm, arg) if isinstance(arg, fx.Node) else "linear"
        if name in ("hardtanh",) and tuple(node.args[1:3]) == (0.0, 6.0):
            return "relu6"
        if name == "cat" and node.args and isinstance(node.args[0], (list, tuple)):
            # A concatenation is as non-negative as its least constrained input.
            kinds = {_activation_of(gm, a) if isinstance(a, fx.Node) else "linear" for a in node.args[0]}
            if kinds == {"relu6"}:
                return "relu6"
            if kinds <= {"relu", "relu6"}:
                return "relu"
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return "relu"
    return "linear"


def _scopes(node: fx.Node) -> list[str]:
    stack = node.meta.get("nn_module_stack", {})
    scopes = list(stack.keys())
    if node.op == "call_module":
        scopes.append(str(node.target))
    return scopes


def _uninteresting(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Valid but useless cuts that the listing hides (split() still accepts them): padding outputs (the
    padded tensor is larger than the conv output) and convolution outputs that feed a batch norm (BN is
    folded into the conv on conversion, so the edge half would carry an unfolded BN)."""
    users = list(node.users)
    feeds_bn = (len(users) == 1 and users[0].op == "call_module"
                and isinstance(gm.get_submodule(str(users[0].target)), nn.BatchNorm2d))
    if node.op == "call_function":
        return feeds_bn and getattr(node.target, "__name__", "") == "conv2d"
    if node.op != "call_module":
        return False
    mod = gm.get_submodule(str(node.target))
    if isinstance(mod, (nn.ZeroPad2d, nn.ConstantPad2d)):
        return True
    return feeds_bn and isinstance(mod, nn.Conv2d)


def _cut_nodes(gm: fx.GraphModule) -> dict[fx.Node, list[str]]:
    """Map each node after which the graph can be cut (only that node crosses) to the module paths whose
    output it is, outermost first."""
    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    last_use = {n: max((index[u] for u in n.users), default=index[n]) for n in nodes}
    # Last node in each module scope = that module's output.
    last_in_scope: dict[str, fx.Node] = {}
    for n in nodes:
        for s in _scopes(n):
            last_in_scope[s] = n
    outputs: dict[fx.Node, list[str]] = {}
    for path, n in last_in_scope.items():
        outputs.setdefault(n, []).append(path)
    valid: dict[fx.Node, list[str]] = {}
    # Walk in order, tracking whether any earlier value other than the candidate is used later.
    for n, paths in outputs.items():
        i = index[n]
        if n.op in ("placeholder", "output") or last_use[n] == i:
            continue
        crossing = [m for m in nodes[:i] if m.op != "get_attr" and last_use[m] > i]
        if not crossing:
            valid[n] = sorted(paths, key=lambda p: (p.count("."), len(p)))
    return dict(sorted(valid.items(), key=lambda kv: index[kv[0]]))


def _example_input(model: nn.Module, input_shape: tuple[int, ...] | None) -> torch.Tensor:
    if input_shape is None:
        input_shape = getattr(model, "input_shape", None)
    if input_shape is None:
        raise SplitError("the model has no input_shape attribute: pass input_shape=(C, H, W)")
    return torch.zeros((1, *input_shape))


def list_split_points(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> list[SplitPoint]:
    """All valid 4-D (N, C, H, W) cut points of ``model`` in execution order."""
    from torch.fx.passes.shape_prop import ShapeProp

    gm = trace(model)
    x = _example_input(model, input_shape)
    ShapeProp(gm).propagate(x)
    points = []
    for node, paths in _cut_nodes(gm).items():
        tm = node.meta.get("tensor_meta")
        if tm is None or len(tm.shape) != 4 or _uninteresting(gm, node):
            continue
        points.append(SplitPoint(paths[0], tuple(int(d) for d in tm.shape[1:]), _activation_of(gm, node),
                                 tuple(paths[1:])))
    return points


def split_points(name: str) -> list[tuple[str, tuple[int, ...], str]]:
    """Valid split points of a zoo model: (module path, output shape C x H x W, activation)."""
    from .zoo import load_model

    return [p.as_tuple() for p in list_split_points(load_model(name))]


def _format_points(points: list[SplitPoint], limit: int = 40) -> str:
    names = [p.path for p in points]
    text = ", ".join(names[:limit])
    return text + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def split(model: nn.Module, at: str, input_shape: tuple[int, ...] | None = None) -> tuple[nn.Module, nn.Module]:
    """Cut ``model`` after the module at path ``at``; returns (edge, cloud) GraphModules in eval mode with
    ``cloud(edge(x)) == model(x)``. Raises :class:`SplitError` listing the valid points if ``at`` is not
    one."""
    gm = trace(model)
    valid = _cut_nodes(gm)
    cut = next((n for n, paths in valid.items() if at in paths), None)
    if cut is None:
        points = list_split_points(model, input_shape)
        known = {m for m, _ in model.named_modules() if m}
        why = "is not a module of the model" if at not in known else (
            "is not a valid cut (another tensor, e.g. a skip connection, crosses it, or it is not 4-D)")
        raise SplitError(f"split point {at!r} {why}; valid split points: {_format_points(points)}")

    nodes = list(gm.graph.nodes)
    i = nodes.index(cut)
    # Edge: everything up to the cut, returning the cut tensor.
    edge_graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in nodes[: i + 1]:
        env[n] = edge_graph.node_copy(n, lambda a: env[a])
    edge_graph.output(env[cut])
    # Cloud: a placeholder for the cut tensor, then everything after it (get_attr nodes copied as needed).
    cloud_graph = fx.Graph()
    cenv: dict[fx.Node, fx.Node] = {cut: cloud_graph.placeholder("features")}

    def lookup(a: fx.Node) -> fx.Node:
        if a not in cenv:  # only parameters/buffers (get_attr) can come from before the cut
            cenv[a] = cloud_graph.node_copy(a, lookup)
        return cenv[a]

    for n in nodes[i + 1 :]:
        cenv[n] = cloud_graph.node_copy(n, lookup)
    edge = fx.GraphModule(gm, edge_graph, class_name="EdgeHalf")
    cloud = fx.GraphModule(gm, cloud_graph, class_name="CloudHalf")
    edge.graph.eliminate_dead_code()
    cloud.graph.eliminate_dead_code()
    edge.delete_all_unused_submodules()
    cloud.delete_all_unused_submodules()
    edge.recompile()
    cloud.recompile()
    return edge.eval(), cloud.eval()


def check_split(model: nn.Module, edge: nn.Module, cloud: nn.Module, x: torch.Tensor) -> float:
    """Max absolute difference between ``cloud(edge(x))`` and ``model(x)``."""
    with torch.no_grad():
        return float((cloud(edge(x)) - model(x)).abs().max())


def describe(model: nn.Module, at: str) -> dict[str, Any]:
    """The :class:`SplitPoint` fields of ``at`` as a dict (raises SplitError if invalid)."""
    for p in list_split_points(model):
        if at == p.path or at in p.aliases:
            return {"path": p.path, "shape_chw": list(p.shape_chw), "activation": p.activation,
                    "aliases": list(p.aliases)}
    split(model, at)  # raises with the list of valid points
    raise SplitError(f"split point {at!r} has no 4-D output")
