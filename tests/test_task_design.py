"""Task-aware design (host/lwfc_host/design/task_design.py) on a real bundle: the chosen table's agreement, checked
again through real frames, the host decoder and the ONNX cloud half, is within the tolerance, and no
cheaper candidate within tolerance was passed over.

Uses a cached bundle (resnet_fmnist preferred, else the demo's efficientnet_lite0); skipped when none is
cached. The edge outputs of the calibration images are cached next to the bundle after the first run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lwfc_host.cli.demo import bundle_complete, cache_root

TOLERANCE = 0.2
IMAGES = 32


def _bundle() -> Path | None:
    for root in (Path(__file__).resolve().parents[1] / "cache" / "bundles", cache_root() / "bundles"):
        for name in ("resnet_fmnist", "efficientnet_lite0"):
            if bundle_complete(root / name):
                return root / name
    return None


@pytest.fixture(scope="module")
def result():
    pytest.importorskip("onnxruntime")
    pytest.importorskip("lwfc_convert")
    b = _bundle()
    if b is None:
        pytest.skip("no cached bundle (run `lwfc demo` or `lwfc convert --model resnet_fmnist`)")
    from lwfc_host.design.task_design import task_design

    td = task_design(b, images=IMAGES, tolerance=TOLERANCE, levels=(3, 4), clip_scales=(0.85, 1.0),
                     lambdas=(0.01,), kinds=("uniform", "ecsq"), finalists=2)
    return b, td


def test_choice_is_within_tolerance_in_the_real_pipeline(result):
    from lwfc.bundle import load_bundle
    from lwfc.tables import Tables
    from lwfc_convert.cloud_runtime import cloud_outputs, onnx_session
    from lwfc_host.codec.decoder import Decoder
    from lwfc_host.codec.fast import encode_int8_constriction
    from lwfc_host.design.task_design import calibration_edge_outputs

    b, td = result
    c = td.chosen
    assert c.agreement >= 1 - TOLERANCE or td.notes
    # the choice is the cheapest finalist, and every cheaper candidate (by entropy) missed the tolerance
    finalists = [x for x in td.candidates if x.coded_bits == x.coded_bits]
    assert c.coded_bits == min(x.coded_bits for x in finalists)
    if not td.notes:
        assert all(x.agreement < 1 - TOLERANCE for x in td.candidates if x.entropy < min(f.entropy for f in finalists))
    # again through real frames: encode the held-out tensors, decode, run the cloud half
    q8, scale, zp = calibration_edge_outputs(b, IMAGES)
    held = q8[1::2]
    t = Tables(td.design.table)
    frames = [encode_int8_constriction(x, t) for x in held]
    dec = Decoder(t)
    recon = np.concatenate([dec.decode(f).tensor for f in frames])
    sess = onnx_session(load_bundle(b).cloud_path, threads=2)
    ref = cloud_outputs(sess, (scale * (held.astype(np.float32) - zp)).astype(np.float32)).argmax(axis=1)
    agree = float((cloud_outputs(sess, recon).argmax(axis=1) == ref).mean())
    assert agree == pytest.approx(c.agreement)
    bits = 8.0 * sum(len(f) for f in frames) / held.size
    assert bits == pytest.approx(c.coded_bits)
    assert td.design.table["design"]["objective"]["agreement"] == pytest.approx(c.agreement)
