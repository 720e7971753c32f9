"""``lwfc eval`` in bounded memory (issue 16): every method codes and scores the evaluation tensors a chunk at a time
and runs the cloud half a few tensors at a time, and must give exactly the numbers of the computation written out
whole (every tensor decoded, reconstructed and run through the cloud half at once, as ``lwfc eval`` did before it
streamed): the same rates, the same mAP, the same MSE to the last bit.

Checked on the real CenterNet-MobileNetV3 bundle, whose 128x128x72 features are what made the evaluation hold GBs:
its cloud half now runs on 3 tensors at a time, so the 4 cached views of the quick detector evaluation (the edge
outputs ``test_eval_detection`` uses, computed once into cache/eval) take two runs.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import pytest

from lwfc_convert.cloud_runtime import RUN_ELEMENTS, batch_for, cloud_outputs, onnx_session, run_onnx
from lwfc_host.evaluate import baselines as bl
from lwfc_host.evaluate.edge_cache import EdgeData, edge_data
from lwfc_host.evaluate.metrics import METRICS
from lwfc_host.evaluate.streaming import squared_error

ROOT = Path(__file__).resolve().parents[1]
VIEWS = 4


@pytest.fixture(scope="module")
def detector(centernet_bundle) -> tuple[EdgeData, object]:
    """The edge outputs of the quick detector evaluation on VIEWS views, and a cloud-half session."""
    from lwfc.bundle import load_bundle
    from lwfc_host.evaluate.plans import make_plan

    bundle = load_bundle(centernet_bundle)
    session = onnx_session(bundle.cloud_path, threads=2)
    plan = make_plan(True, "photos", True, VIEWS)
    return edge_data(bundle, "photos", plan, ROOT / "cache" / "eval", progress=False), session


def _whole(data: EdgeData, session: object, recon: np.ndarray) -> tuple[dict, float]:
    """The metrics and MSE of reconstructions of every evaluation tensor, computed at once."""
    metrics = METRICS["detection"]()(run_onnx(session, recon), data.labels, data.ref)
    x = data.dequantize(data.q_eval)
    return metrics, float(np.sum((recon.astype(np.float64) - x) ** 2)) / data.q_eval.size


def test_cloud_outputs_do_not_depend_on_the_batch(detector):
    """onnxruntime's outputs for a tensor are the same whatever else is in its run: streaming changes no output."""
    data, session = detector
    x = data.dequantize(data.q_eval)
    assert batch_for(x.shape[1:], 256, RUN_ELEMENTS) < len(x)  # so cloud_outputs does stream here
    whole = run_onnx(session, x)
    assert np.array_equal(cloud_outputs(session, x), whole)
    assert np.array_equal(np.concatenate([run_onnx(session, t[None]) for t in x]), whole)
    assert np.array_equal(data.cloud(session, data.q_eval), whole)
    assert np.array_equal(data.ref["int8"], whole)


def test_squared_error_is_numpys_to_the_last_bit():
    rng = np.random.default_rng(0)
    shape = (3, 1024, 1024, 2)  # 2M elements a tensor: summed 2 tensors at a time, then once over all
    assert batch_for(shape[1:], shape[0], RUN_ELEMENTS) < shape[0]
    x = rng.normal(size=shape).astype(np.float32)
    recon = (x + rng.normal(scale=1e-3, size=shape)).astype(np.float32)
    assert squared_error(recon, x) == float(np.sum((recon.astype(np.float64) - x) ** 2))
    q = rng.integers(-128, 128, size=shape, dtype=np.int8)

    def to_float(v: np.ndarray) -> np.ndarray:
        return (0.05 * (v.astype(np.float32) + 3)).astype(np.float32)

    assert squared_error(recon, q, to_float) == float(np.sum((recon.astype(np.float64) - to_float(q)) ** 2))


def test_lwfc_points_match_the_whole_computation(detector):
    from lwfc.tables import Tables
    from lwfc_host.codec.decoder import Decoder
    from lwfc_host.codec.fast import FastEncoder
    from lwfc_host.evaluate.lwfc_points import lwfc_designs, lwfc_stats, run_lwfc_combo
    from lwfc_host.evaluate.plans import make_plan

    data, session = detector
    plan = make_plan(True, "photos", True, VIEWS, {"contexts": ["one", "groups+k2"]})
    stats = lwfc_stats(data)
    points = run_lwfc_combo(("uniform", "mse", 4, 1.0), stats, data, session, METRICS["detection"](), plan)
    assert len(points) == 2
    for p, (_, design) in zip(points, lwfc_designs(stats, "uniform", "mse", 4, plan.contexts)):
        tables = Tables(design.table)
        frames = [FastEncoder(tables).frame_int8(q) for q in data.q_eval]
        assert p.bits_per_element == float(8 * np.mean([len(f) for f in frames]) / np.prod(data.q_eval.shape[1:]))
        if p is points[0]:  # the variant decoded and scored in full (the others differ in rate only)
            dec = Decoder(tables)
            metrics, mse = _whole(data, session, np.concatenate([dec.decode(f).tensor for f in frames]))
        assert p.metrics == metrics and p.mse == mse
    assert 0.5 < points[0].metrics["map50"] <= 1.0


@pytest.mark.parametrize("name, codec", [("hevc 8-bit", partial(bl.hevc, qp=38, bits=8)),
                                         ("uniform+zlib", partial(bl.zlib_codec, bits=4))])
def test_baseline_points_match_the_whole_computation(detector, name, codec):
    from lwfc_host.evaluate.baseline_points import run_baseline

    data, session = detector
    p = run_baseline(name, codec, data, session, METRICS["detection"]())
    b = codec(data.dequantize(data.q_eval))
    metrics, mse = _whole(data, session, b.recon)
    assert p.bits_per_element == float(8 * b.nbytes.mean() / np.prod(data.q_eval.shape[1:]))
    assert p.metrics == metrics and p.mse == mse and p.tensors == VIEWS
