"""TF.js graph -> torch converter: the real CenterNet-MobileNetV3 graph of the npm package
``@vladmandic/human`` 3.3.6 against TensorFlow.js itself (tfjs-core/-converter/-backend-cpu 4.22.0, pure
JavaScript, run in node), the batch decoder against the graph's own decoding ops, and clear errors for
broken model files.

Needs node and npm (the packages are installed into the lwfc cache on first use); the darknet photos come
from the Debian package ``darknet``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lwfc_convert import centernet as cn
from lwfc_convert import detection as det
from lwfc_convert.tfjs import (
    SUPPORTED_OPS,
    TfjsFormatError,
    UnsupportedOpError,
    convert,
    load_graph_model,
)
from lwfc_convert.tfjs_ops import ResizeBilinearOp

SCORE_TOL = 1e-3  # the tolerance on scores
BOX_TOL = 0.5  # ... and on box corners, in input pixels
COMPARE_ABOVE = 0.05  # detections compared: every reference row scoring at least this


@pytest.fixture(scope="module")
def model_json() -> Path:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node/npm not installed (apt-get install nodejs npm)")
    try:
        return cn.model_json_path()
    except cn.NpmError as exc:
        pytest.skip(f"npm packages unavailable: {exc}")


@pytest.fixture(scope="module")
def graph(model_json):
    return load_graph_model(model_json)


@pytest.fixture(scope="module")
def model(graph):
    return cn.build_centernet(graph)


def _photo(name: str) -> np.ndarray:
    """View 0 of a photo: the whole photo resized to 512 x 512 (as human feeds this model)."""
    return det.views(n_views=1, names=[name])[0][1]


def compare(ours: np.ndarray, ref: np.ndarray) -> tuple[float, float, int]:
    """Match every reference row scoring >= COMPARE_ABOVE to the row of ours with the same class and the
    nearest box; return (max score difference, max box corner difference in px, rows compared)."""
    max_s = max_b = 0.0
    n = 0
    for row in ref[ref[:, 4] >= COMPARE_ABOVE]:
        cand = ours[ours[:, 5] == row[5]]
        assert len(cand), f"no detection of class {int(row[5])} in ours"
        diff = np.abs(cand[:, :4] - row[:4]).max(axis=1)
        j = int(np.argmin(diff))
        max_b = max(max_b, float(diff[j]))
        max_s = max(max_s, float(abs(cand[j, 4] - row[4])))
        n += 1
    return max_s, max_b, n


def test_graph_ops_are_all_supported(graph):
    ops = graph.op_counts()
    # The CenterNet graph's op list (see the issue report): fused convolutions, hard-swish as Mul/Add/Relu6,
    # squeeze-excite Means, bilinear upsampling, and the in-graph top-k decoding.
    for op in ("_FusedConv2D", "FusedDepthwiseConv2dNative", "DepthwiseConv2dNative", "Conv2D", "Relu6", "Mean",
               "ResizeBilinear", "ConcatV2", "MaxPool", "TopKV2", "GatherV2", "StridedSlice", "FloorDiv",
               "FloorMod"):
        assert op in ops
    assert set(ops) <= set(SUPPORTED_OPS)
    assert sum(w.size for w in graph.weights.values()) > 1_900_000  # ~2M float16 parameters


def test_matches_tensorflow_js_on_a_photo(model, model_json):
    """The issue's acceptance test: same detections as TF.js (scores within 1e-3, boxes within 0.5 px)."""
    names = sorted(det.photo_paths())
    name = "darknet/dog" if "darknet/dog" in names else "skimage/astronaut"
    img = _photo(name).astype(np.float32)[None]
    ref = cn.tfjs_reference(img, model_json=model_json)[0][0]
    with torch.no_grad():
        ours = model(cn.to_input(img)).numpy()[0]
    assert ours.shape == ref.shape == (100, 6)
    max_s, max_b, n = compare(ours, ref)
    assert n >= 3, f"only {n} detections above {COMPARE_ABOVE} on {name}"
    assert max_s <= SCORE_TOL and max_b <= BOX_TOL, (name, max_s, max_b)
    # The confident detections come out in the same order with the same classes.
    top = ref[:, 4] >= 0.3
    np.testing.assert_array_equal(ours[top, 5], ref[top, 5])


@pytest.mark.slow
def test_matches_tensorflow_js_on_all_photos(model, model_json):
    vs = det.views(n_views=1)
    imgs = np.stack([v for _, v in vs]).astype(np.float32)
    refs = cn.tfjs_reference(imgs, model_json=model_json)[0]
    for (name, _), img, ref in zip(vs, imgs, refs):
        with torch.no_grad():
            ours = model(cn.to_input(img[None])).numpy()[0]
        max_s, max_b, _ = compare(ours, ref)
        assert max_s <= SCORE_TOL and max_b <= BOX_TOL, (name, max_s, max_b)


def test_batch_decoder_equals_graph_decoding(graph, model):
    """CenterNetDecode reproduces the graph's own (batch-1) decoding ops, and decodes batches image by image."""
    full = convert(graph, outputs=[cn.DETECTIONS])
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.uniform(0, 255, size=(1, 3, 512, 512)).astype(np.float32))
    with torch.no_grad():
        expect = full(x).numpy()[0]
        keypoints, wh = cn.TfjsModule.forward(model, x)  # the heads, NCHW
        np.testing.assert_array_equal(model.decode(keypoints, wh).numpy()[0], expect)
        # A batch of two different heat maps decodes to the two single results.
        kp2 = torch.cat([keypoints, keypoints.flip(3)])
        wh2 = torch.cat([wh, wh.flip(3)])
        batch = model.decode(kp2, wh2).numpy()
        np.testing.assert_array_equal(batch[0], expect)
        np.testing.assert_array_equal(batch[1], model.decode(kp2[1:], wh2[1:]).numpy()[0])
    assert not np.array_equal(batch[0], batch[1])


def test_module_paths_follow_tf_scopes(model):
    assert model.module_path("tower_0/MobilenetV3/expanded_conv_2/add") == "MobilenetV3.expanded_conv_2.add"
    assert model.tf_name("CenternetHead.Relu_2") == "tower_0/CenternetHead/Relu_2"
    conv = model.get_submodule("MobilenetV3.Conv.BatchNorm.FusedBatchNorm")
    # The stem is a stride-2 "SAME" conv on an even size: TF pads one row/column more at the bottom/right.
    assert conv.pad == (0, 1, 0, 1) and conv.conv.stride == (2, 2)


def test_zoo_entry():
    from lwfc_convert.zoo import get_spec, list_models

    assert "centernet_mbv3_coco" in list_models()
    spec = get_spec("centernet_mbv3_coco")
    assert spec.input_shape == (3, 512, 512) and spec.default_split in spec.recommended_splits
    assert spec.preprocess["mean"] == [0.0, 0.0, 0.0] and spec.preprocess["order"] == "RGB"


@pytest.mark.slow
def test_zoo_split_points(model):
    """The zoo's centernet_mbv3_coco: split points are real single-tensor cuts with the stated shapes, and
    the default split is exact."""
    from lwfc_convert import split as sp
    from lwfc_convert.zoo import get_spec

    spec = get_spec("centernet_mbv3_coco")
    points = {p.path: p for p in sp.list_split_points(model)}
    shapes = {p: points[p].shape_chw for p in spec.recommended_splits}
    assert shapes == {"MobilenetV3.expanded_conv.add": (16, 256, 256),
                      "MobilenetV3.expanded_conv_2.add": (24, 128, 128),
                      "MobilenetV3.expanded_conv_3.expand.Relu": (72, 128, 128),
                      "CenternetHead.Relu_2": (128, 128, 128)}
    assert points[spec.default_split].activation == "relu"
    # No cut inside the stride-8..32 stages: the FPN's lateral taps make two tensors cross there.
    assert not any(p.startswith(("MobilenetV3.expanded_conv_4.", "MobilenetV3.expanded_conv_9.")) for p in points)
    edge, cloud = sp.split(model, spec.default_split)
    x = torch.from_numpy(np.random.default_rng(1).uniform(0, 255, (1, 3, 512, 512)).astype(np.float32))
    with torch.no_grad():
        feats = edge(x)
        assert tuple(feats.shape) == (1, 72, 128, 128)
        np.testing.assert_array_equal(cloud(feats).numpy(), model(x).numpy())


# ---- bad input -----------------------------------------------------------------------------------------------------
@pytest.fixture()
def model_copy(model_json, tmp_path) -> Path:
    """A writable copy of centernet.json + centernet.bin."""
    for f in (model_json, model_json.with_suffix(".bin")):
        shutil.copy(f, tmp_path / f.name)
    return tmp_path / model_json.name


def _edit(path: Path, fn) -> None:
    meta = json.loads(path.read_text())
    fn(meta)
    path.write_text(json.dumps(meta))


def test_missing_shard(model_copy):
    model_copy.with_suffix(".bin").unlink()
    with pytest.raises(TfjsFormatError, match=r"shard 'centernet.bin' is missing"):
        load_graph_model(model_copy)


@pytest.mark.parametrize("change", [-2, 6])
def test_shard_of_the_wrong_size(model_copy, change):
    shard = model_copy.with_suffix(".bin")
    data = shard.read_bytes()
    shard.write_bytes(data[:change] if change < 0 else data + b"\0" * change)
    with pytest.raises(TfjsFormatError, match=rf"hold {len(data) + change} bytes .* describes {len(data)} bytes"):
        load_graph_model(model_copy)


def test_unknown_dtype(model_copy):
    def edit(meta):
        meta["weightsManifest"][0]["weights"][0]["dtype"] = "float64"

    _edit(model_copy, edit)
    with pytest.raises(TfjsFormatError, match=r"unsupported dtype 'float64'"):
        load_graph_model(model_copy)


def test_unknown_quantization_dtype(model_copy):
    def edit(meta):
        meta["weightsManifest"][0]["weights"][0]["quantization"]["dtype"] = "int4"

    _edit(model_copy, edit)
    with pytest.raises(TfjsFormatError, match=r"unsupported quantization dtype 'int4'"):
        load_graph_model(model_copy)


def test_missing_or_broken_model_json(tmp_path):
    with pytest.raises(TfjsFormatError, match="does not exist"):
        load_graph_model(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(TfjsFormatError, match="not valid JSON"):
        load_graph_model(bad)
    bad.write_text(json.dumps({"format": "layers-model", "modelTopology": {}, "weightsManifest": []}))
    with pytest.raises(TfjsFormatError, match="not a TF.js graph model"):
        load_graph_model(bad)


def test_unsupported_ops_are_named(model_copy):
    def edit(meta):
        for node in meta["modelTopology"]["node"]:
            if node["name"] == "tower_0/CenternetHead/Relu_2":
                node["op"] = "Softplus"
            if node["name"] == "tower_0/MobilenetV3/expanded_conv_2/add":
                node["op"] = "BitwiseXor"

    _edit(model_copy, edit)
    g = load_graph_model(model_copy)
    with pytest.raises(UnsupportedOpError, match=r"unsupported TF.js ops: BitwiseXor, Softplus"):
        convert(g)


def test_float16_and_uint8_weights_decode(tmp_path):
    """A tiny hand-written graph: y = relu(x * w) with w stored as uint8 (affine) and float16."""
    w = np.array([0.5, -1.0, 2.0], dtype=np.float32)
    q = np.round((w - w.min()) / ((w.max() - w.min()) / 255)).astype(np.uint8)
    scale = float((w.max() - w.min()) / 255)
    nodes = [
        {"name": "x", "op": "Placeholder", "attr": {"dtype": {"type": "DT_FLOAT"},
                                                    "shape": {"shape": {"dim": [{"size": "2"}, {"size": "3"}]}}}},
        {"name": "w8", "op": "Const", "attr": {}},
        {"name": "w16", "op": "Const", "attr": {}},
        {"name": "m", "op": "Mul", "input": ["x", "w8"], "attr": {}},
        {"name": "s", "op": "Add", "input": ["m", "w16"], "attr": {}},
        {"name": "y", "op": "Relu", "input": ["s"], "attr": {}},
    ]
    meta = {"format": "graph-model", "modelTopology": {"node": nodes}, "weightsManifest": [{
        "paths": ["w.bin"], "weights": [
            {"name": "w8", "shape": [3], "dtype": "float32",
             "quantization": {"dtype": "uint8", "scale": scale, "min": float(w.min())}},
            {"name": "w16", "shape": [3], "dtype": "float32", "quantization": {"dtype": "float16"}}]}]}
    (tmp_path / "model.json").write_text(json.dumps(meta))
    (tmp_path / "w.bin").write_bytes(q.tobytes() + w.astype(np.float16).tobytes())
    g = load_graph_model(tmp_path / "model.json")
    np.testing.assert_allclose(g.weights["w8"], q * np.float32(scale) + w.min(), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(g.weights["w16"], w.astype(np.float16).astype(np.float32))
    m = convert(g, outputs=["y"], example=torch.ones(2, 3))
    x = torch.tensor([[1.0, 1.0, 1.0], [-1.0, 2.0, 0.5]])
    expect = torch.relu(x * torch.from_numpy(g.weights["w8"]) + torch.from_numpy(g.weights["w16"]))
    torch.testing.assert_close(m(x), expect)


@pytest.mark.parametrize("hw,factor", [((16, 16), 2), ((5, 7), 2), ((1, 3), 3)])
def test_legacy_upsampling_as_nearest_and_box_mean(hw, factor):
    """Keras UpSampling2D (legacy bilinear, integer factor) runs as nearest up-sampling + a box mean, ops that
    convert to int8 TFLite; in float it equals the general index-table path."""
    x = torch.randn(2, 4, *hw, generator=torch.Generator().manual_seed(0))
    out_hw = (hw[0] * factor, hw[1] * factor)
    fast = ResizeBilinearOp(hw, out_hw, align_corners=False, half_pixel=False, to_nchw=False)
    tables = ResizeBilinearOp(hw, out_hw, align_corners=False, half_pixel=False, to_nchw=False)
    tables.factor = 0
    assert fast.factor == factor
    torch.testing.assert_close(fast(x), tables(x), rtol=0, atol=1e-6)
    # Half-pixel, align-corners and non-integer factors keep the general path.
    assert ResizeBilinearOp(hw, out_hw, False, True, False).factor == 0
    assert ResizeBilinearOp(hw, out_hw, True, False, False).factor == 0
    assert ResizeBilinearOp(hw, (hw[0] * factor + 1, hw[1] * factor), False, False, False).factor == 0
