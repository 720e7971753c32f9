"""A small synthetic bundle for the server, link and flashing tests: bundle.json, tables.json (uniform
quantizer, neighbour contexts) and a real ONNX classifier head, with 8 x 8 x 16 ReLU-like features, so its
frames are small and many of them are quick to serve. It has no edge model: the tests make the int8 feature
tensors directly (``small_tensors``) and encode them with the device encoder (``small_frames``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from lwfc.bundle import load_bundle

SMALL_SHAPE = (8, 8, 16)
SMALL_CLASSES = [f"class{i}" for i in range(10)]


def relu_features(shape: tuple[int, int, int], seed: int, batch: int = 1) -> np.ndarray:
    """``batch`` float feature tensors (NHWC) that look like a ReLU layer's output."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 1.0, size=(batch, *shape)).astype(np.float32)
    # spatially smooth, channel-dependent scale: a ReLU layer's look, so contexts matter
    x = (x + np.roll(x, 1, axis=1) + np.roll(x, 1, axis=2)) / 3 + np.linspace(-0.5, 0.5, shape[-1])
    return np.maximum(x, 0.0)


def write_cloud_head(path: Path, channels: int, classes: int, seed: int = 0, batch: int | None = 1) -> None:
    """A real ONNX classifier head: NHWC float features -> global average pool -> linear -> logits (``batch``
    None: any batch size)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = rng.normal(0, 1, size=(channels, classes)).astype(np.float32)
    b = rng.normal(0, 0.1, size=(classes,)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["x", "axes"], ["pooled"], keepdims=0),
         helper.make_node("MatMul", ["pooled", "w"], ["mm"]),
         helper.make_node("Add", ["mm", "b"], ["logits"])],
        "head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, None, None, channels])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes])],
        [numpy_helper.from_array(np.array([1, 2], dtype=np.int64), "axes"), numpy_helper.from_array(w, "w"),
         numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())


def make_small_bundle(out: str | Path, shape: tuple[int, int, int] = SMALL_SHAPE, levels: int = 4,
                      seed: int = 0) -> dict[str, Any]:
    """A small bundle without an edge model (the device gets int8 tensors from ``small_tensors``):
    bundle.json, tables.json (uniform quantizer, neighbour contexts) and cloud.onnx. Returns bundle.json."""
    from lwfc_host.design.tablefile import write_tables
    from lwfc_host.design.tablegen import uniform_table

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    calib = relu_features(shape, seed, batch=4)
    clip = float(np.quantile(calib[calib > 0], 0.99))
    scale = clip / 127.0
    table = uniform_table(calib, levels, clip_max=clip, groups=4, classes=3, int8_scale=scale,
                          int8_zero_point=-128)
    final = write_tables(table, out / "tables.json")
    write_cloud_head(out / "cloud.onnx", shape[2], len(SMALL_CLASSES), seed)
    info = {
        "bundle_version": 1, "model": "small_head", "description": "small synthetic bundle for tests",
        "split": "features", "activation": "relu",
        "cloud": {"file": "cloud.onnx"},
        "feature": {"shape_nhwc": [1, *shape], "layout": "NHWC", "scale": scale, "zero_point": -128,
                    "activation": "relu"},
        "class_names": SMALL_CLASSES, "tables": "tables.json", "table_id": final["table_id"],
    }
    (out / "bundle.json").write_text(json.dumps(info, indent=1))
    return info


def small_tensors(info: dict[str, Any], n: int, seed: int = 1) -> list[bytes]:
    """``n`` int8 feature tensors (bytes, NHWC) for a small bundle (``info``: its bundle.json)."""
    shape = tuple(info["feature"]["shape_nhwc"][1:])
    scale = info["feature"]["scale"]
    x = relu_features(shape, seed, batch=n)
    q = np.clip(np.round(x / scale) - 128, -128, 127).astype(np.int8)
    return [q[i].tobytes() for i in range(n)]


def small_frames(bundle_dir: str | Path, n: int, seed: int = 1) -> list[bytes]:
    """``n`` distinct real lwfc frames for a small bundle (encoded by the device encoder)."""
    from lwfc.encoder import Encoder
    from lwfc.tables import load_tables

    b = load_bundle(bundle_dir)
    h, w, _c = b.feature_shape
    enc = Encoder(load_tables(b.tables_path))
    return [enc.encode_int8(t, h, w) for t in small_tensors(b.info, n, seed)]
