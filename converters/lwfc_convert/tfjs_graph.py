"""Reading TensorFlow.js graph models: ``model.json`` (a frozen TensorFlow GraphDef in JSON,
``modelTopology.node``) plus a weights manifest: groups of shard files whose concatenated bytes hold every
``Const`` tensor in manifest order, optionally quantized (float16, or affine uint8/uint16).

:func:`load_graph_model` parses and validates both into a :class:`TfjsGraph`; :func:`needed_nodes` orders
the nodes some outputs depend on. The errors of the whole TF.js converter (``tfjs``) are defined here.
"""

from __future__ import annotations

import base64
import heapq
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


class TfjsError(ValueError):
    """Base class of the converter's errors."""


class TfjsFormatError(TfjsError):
    """A model.json or weight shard that is missing, malformed, of the wrong size or of an unknown dtype."""


class UnsupportedOpError(TfjsError):
    """The graph uses ops (or op attributes) that the converter does not implement."""


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


def input_ref(name: str) -> str:
    """Normalize an input reference: ``x:0`` is ``x``."""
    return name[:-2] if name.endswith(":0") else name


def needed_nodes(graph: TfjsGraph, outputs: list[str]) -> list[GraphNode]:
    """The nodes ``outputs`` (node names) depend on, in a topological order that follows the file order."""
    by_name = {n.name: n for n in graph.nodes}
    need: set[str] = set()
    stack = [o.split(":")[0] for o in outputs]
    for o in stack:
        if o not in by_name:
            raise TfjsError(f"output {o!r} is not a node of {graph.path}")
    while stack:
        n = stack.pop()
        if n in need:
            continue
        need.add(n)
        node = by_name.get(n)
        if node is None:
            raise TfjsFormatError(f"{graph.path}: an input refers to the unknown node {n!r}")
        stack.extend(i.split(":")[0] for i in node.inputs)
    order = {n.name: i for i, n in enumerate(graph.nodes)}
    result: list[GraphNode] = []
    # Kahn's algorithm with file order as the priority: keeps TF.js's executed order where valid.
    indeg: dict[str, int] = {}
    users: dict[str, list[str]] = {}
    for n in need:
        deps = {i.split(":")[0] for i in by_name[n].inputs}
        indeg[n] = len(deps)
        for d in deps:
            users.setdefault(d, []).append(n)
    heap = [(order[n], n) for n in need if indeg[n] == 0]
    heapq.heapify(heap)
    while heap:
        _, n = heapq.heappop(heap)
        result.append(by_name[n])
        for u in users.get(n, []):
            indeg[u] -= 1
            if indeg[u] == 0:
                heapq.heappush(heap, (order[u], u))
    if len(result) != len(need):
        raise TfjsFormatError(f"{graph.path}: the graph has a cycle")
    return result


def sinks(graph: TfjsGraph) -> list[str]:
    """The graph's non-constant nodes that no node reads: its outputs when the signature names none."""
    used = {input_ref(i).split(":")[0] for n in graph.nodes for i in n.inputs}
    return [n.name for n in graph.nodes if n.name not in used and n.op != "Const"]
