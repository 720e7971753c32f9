"""``lwfc eval --quick`` on a real bundle: report structure, and every rate re-measured from real frames.

The bundle is $LWFC_EVAL_BUNDLE, or the one with the smallest feature tensor under cache/bundles/ or
cache/eval/bundles/ (``lwfc convert`` output); on a fresh clone there is none, and the test converts
resnet_fmnist at stage2 into cache/bundles/ first (a few minutes, once)."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from lwfc_host.evaluate.report import curve, envelope, family_headline, headline, metric_at, rate_for

ROOT = Path(__file__).resolve().parents[1]


def find_bundle() -> Path | None:
    env = os.environ.get("LWFC_EVAL_BUNDLE")
    if env:
        return Path(env)
    found = sorted((ROOT / "cache" / "bundles").glob("*/bundle.json"))
    found += sorted((ROOT / "cache" / "eval" / "bundles").glob("*/bundle.json"))
    best = None
    for path in found:  # the cheapest: fewest elements per feature tensor
        try:
            info = json.loads(path.read_text())
            size = int(np.prod(info["feature"]["shape_nhwc"]))
        except (OSError, ValueError, KeyError):
            continue
        if best is None or size < best[0]:
            best = (size, path.parent)
    return best[1] if best else None


class _P:
    def __init__(self, rate: float, acc: float) -> None:
        self.bits_per_element = rate
        self.metrics = {"accuracy": acc}


def test_family_rate_is_its_best_curve_and_failed_settings_are_no_method():
    """HEVC 8- and 10-bit from a real run (EfficientNet block 5, target 90.5%): the 8-bit point at 1.199 b/e
    lies under the 10-bit curve, so interpolating over the union crosses the target later (1.239) than the
    10-bit curve alone (1.189); the family takes the lower. A design that failed has no curve."""
    from lwfc_host.evaluate.results import Point

    def pt(method, rate, acc):
        return Point(method, "", rate, {"accuracy": acc}, 0.0, 0.0, 1)

    eight = [(0.3112, 0.7843), (0.5135, 0.8733), (0.7738, 0.8973), (1.1992, 0.9043), (1.6789, 0.9127)]
    ten = [(0.3119, 0.7810), (0.7761, 0.8977), (1.6813, 0.9137)]
    points = [pt("hevc 8-bit", r, a) for r, a in eight] + [pt("hevc 10-bit", r, a) for r, a in ten]
    points.append(Point("lwfc uniform clip=mse", "24 levels", math.nan, {}, math.nan, math.nan, 0,
                        notes="design failed: ValueError: ..."))
    ev = SimpleNamespace(points=points, primary="accuracy", reference={"float accuracy": 0.915})
    union = rate_for(*envelope([p for p in points if p.method.startswith("hevc")], "accuracy"), 0.905)
    own = rate_for(*curve(points[5:8], "accuracy"), 0.905)
    assert union == pytest.approx(1.239, abs=1e-3) and own == pytest.approx(1.189, abs=1e-3)
    (row,) = [r for r in family_headline(ev) if r["family"] == "HEVC (x265)"]
    assert row["rate_within_1pp"] == pytest.approx(own)
    assert [r["method"] for r in headline(ev)] == ["hevc 8-bit", "hevc 10-bit"]


def test_curve_envelope_and_interpolation():
    pts = [_P(0.4, 0.80), _P(0.6, 0.88), _P(0.5, 0.90), _P(1.0, 0.92), _P(2.0, 0.91)]
    r, a = curve(pts, "accuracy")
    assert r.tolist() == [0.4, 0.5, 1.0]  # dominated points dropped
    assert rate_for(r, a, 0.85) == pytest.approx(0.4 + 0.05 / 0.10 * 0.1)
    assert math.isnan(rate_for(r, a, 0.95))
    assert rate_for(r, a, 0.5) == 0.4  # reached at the cheapest point: an upper bound
    assert metric_at(r, a, 0.75) == pytest.approx(0.91)
    assert math.isnan(metric_at(r, a, 0.3))
    assert metric_at(r, a, 3.0) == pytest.approx(0.92)


def test_plan_refuses_overrides_that_nothing_would_use():
    from lwfc_host.evaluate.lwfc_points import lwfc_combos
    from lwfc_host.evaluate.plans import make_plan

    assert make_plan(False, "fashion-mnist", True, None, {"levels": [3]}, {"lwfc"}).levels == [3]
    with pytest.raises(ValueError, match=r"--levels.*not among the methods to run \(hevc\)"):
        make_plan(False, "fashion-mnist", True, None, {"levels": [2]}, {"hevc"})
    with pytest.raises(ValueError, match=r"--hevc-qps.*not among the methods"):
        make_plan(False, "fashion-mnist", True, None, {"hevc_qps": {8: [30]}}, {"lwfc"})
    with pytest.raises(ValueError, match="clip sweep only"):  # a detector's quick plan has no clip sweep
        make_plan(True, "photos", True, 4, {"clip_scales": [1.0]})
    with pytest.raises(ValueError, match="the clip sweep has its own, --sweep-kinds"):
        make_plan(False, "fashion-mnist", True, None, {"kinds": ["ecsq"], "clips": ["sweep"]})
    with pytest.raises(ValueError, match="sweep kinds apply to the clip sweep only"):
        make_plan(False, "fashion-mnist", True, None, {"sweep_kinds": ["ecsq"], "clips": ["mse"]})
    with pytest.raises(ValueError, match="unknown quantizer kinds"):
        make_plan(False, "fashion-mnist", True, None, {"sweep_kinds": ["lloyd"]})
    swept = make_plan(False, "fashion-mnist", True, None, {"sweep_kinds": ["uniform", "ecsq"], "clips": ["sweep"],
                                                            "levels": [3], "clip_scales": [1.6, 2.0]})
    assert lwfc_combos(swept) == [("uniform", "sweep", 3, 1.6), ("uniform", "sweep", 3, 2.0),
                                  ("ecsq", "sweep", 3, 1.6), ("ecsq", "sweep", 3, 2.0)]
    assert make_plan(False, "fashion-mnist", True, None).sweep_kinds == ["uniform"]  # the default sweep
    with pytest.raises(ValueError, match="unknown contexts"):
        make_plan(False, "fashion-mnist", True, None, {"contexts": ["groups+k9"]})
    with pytest.raises(ValueError, match=r"av1_crfs \(--av1-crfs\) set for av1"):
        make_plan(False, "fashion-mnist", True, None, {"av1_crfs": [40]}, {"lwfc", "hevc"})
    assert make_plan(False, "fashion-mnist", True, None, {"av1_crfs": [40, 50]}).av1_crfs == [40, 50]
    both = {"contexts": ["auto-v1", "auto"], "sweep_contexts": ["auto-v1", "auto"]}
    assert make_plan(False, "fashion-mnist", True, None, both).sweep_contexts == ["auto-v1", "auto"]
    with pytest.raises(ValueError, match="sweep contexts apply to the clip sweep only"):
        make_plan(False, "fashion-mnist", True, None, {"sweep_contexts": ["auto"], "clips": ["mse"]})
    with pytest.raises(ValueError, match="unknown contexts"):
        make_plan(False, "fashion-mnist", True, None, {"sweep_contexts": ["v3"]})


@pytest.mark.parametrize("flags, message", [
    (["--methods", ","], "--methods needs at least one value"),
    (["--levels", ""], "--levels needs at least one value"),
    (["--kinds", "uniform,vq"], "--kinds: unknown vq"),
    (["--levels", "2,x"], "--levels: bad number list"),
    (["--methods", "lwfc,vvc"], "--methods: unknown vvc"),
    (["--av1-crfs", "40,70"], "--av1-crfs must be between 0 and 63"),
])
def test_eval_cli_refuses_flags_it_would_drop(flags, message, tmp_path, capsys):
    from lwfc_host.cli import main

    assert main(["eval", "--bundle", str(tmp_path), "--output", str(tmp_path / "out"), *flags]) == 2
    assert message in capsys.readouterr().err


def converted_resnet_bundle() -> Path:
    """The real resnet_fmnist bundle (int8 TFLite + ONNX) in cache/bundles/, converted once if absent."""
    from lwfc_convert.bundle import convert
    from lwfc_convert.cache import cache_lock

    out = ROOT / "cache" / "bundles" / "resnet_fmnist"
    with cache_lock(out.with_name("resnet_fmnist.lock")):
        if not (out / "bundle.json").exists():
            # no QAT fine-tuning: the evaluation tests need a real bundle, not its best int8 error (saves minutes)
            convert("resnet_fmnist", "stage2", out, calib_images=256, eval_images=1000, progress=False, qat_epochs=0)
    return out


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    bundle = find_bundle()
    if bundle is None or not (bundle / "bundle.json").exists():
        bundle = converted_resnet_bundle()
    out = tmp_path_factory.mktemp("eval")
    cmd = [sys.executable, "-m", "lwfc_host", "eval", "--bundle", str(bundle), "--quick", "--output", str(out),
           "--cache", str(ROOT / "cache" / "eval"), "--no-progress"]
    if os.environ.get("LWFC_EVAL_LIMIT"):  # fewer images, e.g. for a large-feature bundle on a slow machine
        cmd += ["--limit", os.environ["LWFC_EVAL_LIMIT"]]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r.stdout


def _rows(out: Path) -> list[dict]:
    with open(out / "points.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_quick_eval_structure(quick_report):
    out, stdout = quick_report
    for name in ("points.csv", "rate_accuracy.png", "report.md", "evaluation.json"):
        assert (out / name).stat().st_size > 0
    assert (out / "rate_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = _rows(out)
    assert list(rows[0])[:8] == ["method", "setting", "bits_per_element", "bits_per_element_no_param_sets",
                                 "accuracy", "agreement", "agreement_confident", "agreement_float"]
    methods = {r["method"] for r in rows}
    for kind in ("uniform", "ecsq"):
        for clip in ("mse", "model"):
            for ctx in ("one", "groups", "groups+k2"):
                assert f"lwfc {kind} clip={clip} ctx={ctx}" in methods
    for m in ("hevc 8-bit", "jpeg tiles", "webp tiles", "uniform+rle", "uniform+zlib"):
        assert m in methods
    ev = json.loads((out / "evaluation.json").read_text())
    primary = ev["primary"]
    for r in rows:
        assert float(r["bits_per_element"]) > 0
        assert 0.0 <= float(r[primary]) <= 1.0
        assert float(r["encode_ms"]) > 0 and float(r["decode_ms"]) > 0
    hevc = [r for r in rows if r["method"].startswith("hevc")]
    assert all(float(r["bits_per_element_no_param_sets"]) < float(r["bits_per_element"]) for r in hevc)
    md = (out / "report.md").read_text()
    assert "## Headline" in md and "## Against the goal" in md
    head = md.split("## Headline")[1].split("\n## ")[0]  # the family table, then the per-method one
    for m in methods:
        assert f"| {m} |" in head
    for fam in ("lwfc v1", "HEVC (x265)", "JPEG", "WebP"):
        assert f"| {fam} |" in head.split("### Per method")[0]
    assert (out / "rate_accuracy_variants.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(ev["headline"]) == len(methods)
    assert "bits/element within 1 pp" in stdout


def test_quick_eval_rates_are_measured(quick_report):
    """Re-encode the cached edge outputs: every lwfc rate is the mean size of real frames made with the table
    saved next to the report, and one setting of each baseline reproduces its rate from real bytes."""
    out, _ = quick_report
    check_rates_are_measured(out)


def check_rates_are_measured(out: Path) -> None:
    """The checks of :func:`test_quick_eval_rates_are_measured` on a report directory ``out`` (also used by the
    detector's quick evaluation test)."""
    from lwfc.encoder import Encoder
    from lwfc_host.codec.fast import encode_int8_constriction
    from lwfc_host.design.tablefile import load_verified
    from lwfc_host.evaluate import baselines as bl

    ev = json.loads((out / "evaluation.json").read_text())
    with np.load(ev["edge_cache"]) as z:
        q = z["q_eval"]
        scale, zp = float(z["scale"]), int(z["zero_point"])
    n_el = int(np.prod(q.shape[1:]))
    rows = _rows(out)
    lwfc_rows = [r for r in rows if r["method"].startswith("lwfc")]
    assert lwfc_rows
    for r in lwfc_rows:
        table_file = re.search(r"table (tables/\S+\.json)", r["notes"]).group(1)
        tables = load_verified(out / table_file)
        frames = [encode_int8_constriction(t, tables) for t in q]
        assert float(r["bits_per_element"]) == pytest.approx(8 * np.mean([len(f) for f in frames]) / n_el, abs=1e-5)
    # the device's pure-Python encoder gives the same bytes
    dev = Encoder(tables)
    assert dev.encode_int8(q[0].tobytes(), q.shape[1], q.shape[2]) == frames[0]
    x = (scale * (q.astype(np.float32) - zp)).astype(np.float32)

    def check(method: str, coder) -> None:
        r = next(r for r in rows if r["method"] == method)
        b = coder(r["setting"])
        assert b.setting == r["setting"]
        assert float(r["bits_per_element"]) == pytest.approx(b.bits_per_element().mean(), abs=1e-5)

    def hevc(setting):
        bits, qp = re.fullmatch(r"(\d+)bit qp(\d+)", setting).groups()
        return bl.hevc(x, int(qp), int(bits))

    check("hevc 8-bit", hevc)
    check("jpeg tiles", lambda s: bl.image_tiles(x, int(s[1:]), "JPEG"))
    check("webp tiles", lambda s: bl.image_tiles(x, int(s[1:]), "WEBP"))

    def rle(setting):
        lv, lo, hi = re.fullmatch(r"(\d+) levels clip=\[(\S+), (\S+)\]", setting).groups()
        return bl.rle(x, int(lv), float(lo), float(hi))

    check("uniform+rle", rle)
    check("uniform+zlib", lambda s: bl.zlib_codec(x, int(s[:-3])))


def test_eval_extend_adds_points(quick_report, tmp_path):
    """``--extend``: a second run's points join the first run's report (same cached tensors); a point with the
    same method and setting is replaced, and every rate of the combined report still re-measures from frames."""
    out, _ = quick_report
    old = json.loads((out / "evaluation.json").read_text())
    bundle = old["bundle_dir"]
    ext = tmp_path / "extended"
    base = [sys.executable, "-m", "lwfc_host", "eval", "--bundle", bundle, "--quick", "--methods", "lwfc",
            "--kinds", "uniform", "--clips", "mse", "--contexts", "one", "--levels", "2,3",
            "--cache", str(ROOT / "cache" / "eval"), "--no-progress"]
    limit = ["--limit", os.environ["LWFC_EVAL_LIMIT"]] if os.environ.get("LWFC_EVAL_LIMIT") else []
    r = subprocess.run(base + limit + ["--extend", str(out), "--output", str(ext)], capture_output=True, text=True,
                       timeout=400, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    new = json.loads((ext / "evaluation.json").read_text())
    keys = [(p["method"], p["setting"]) for p in new["points"]]
    assert len(keys) == len(set(keys)) == len(old["points"]) + 1  # 2 levels replaced, 3 levels added
    assert ("lwfc uniform clip=mse ctx=one", "3 levels") in keys
    assert {2, 3, 4} <= set(new["plan"]["levels"])
    assert new["command"].count("lwfc eval") == 2
    assert new["peak_rss_mb"] >= old["peak_rss_mb"] > 0  # the larger of the two runs' peaks
    check_rates_are_measured(ext)

    # other tensors (another --limit) cannot be merged: a clear error, nothing written
    bad = tmp_path / "bad"
    r = subprocess.run(base + ["--limit", "40", "--extend", str(out), "--output", str(bad)],
                       capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert r.returncode != 0
    assert "cannot extend" in r.stderr and "edge-output cache" in r.stderr
    assert not (bad / "evaluation.json").exists()
    r = subprocess.run(base + limit + ["--extend", str(tmp_path / "nowhere"), "--output", str(bad)],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode != 0 and "evaluation.json" in r.stderr


def test_a_sweep_scale_capped_at_the_data_maximum_is_not_evaluated_again():
    """On a bounded layer (ReLU6-like int8 outputs piling up at the top) wider clip tops are capped at the data
    maximum: the later scales make the same quantizer, which the run reports instead of evaluating twice."""
    from lwfc_host.design.calibration import CalibrationStats
    from lwfc_host.evaluate.lwfc_points import earlier_equal_scale, run_lwfc_combo, scaled_clip
    from lwfc_host.evaluate.plans import make_plan

    rng = np.random.default_rng(0)
    q = np.clip(rng.normal(-40, 80, size=(64, 7, 7, 16)), -128, 127).astype(np.int8)  # a pile at +127
    cs = CalibrationStats()
    cs.add_int8(q, 6 / 255, -128, where="test")
    stats = cs.loaded()
    scales = [1.0, 1.6, 2.0, 2.5]
    tops = {s: scaled_clip(stats, 8, s).c_max for s in scales}
    assert tops[2.0] == tops[2.5] == pytest.approx(6.0)  # both capped at the largest value
    first_capped = min(s for s in scales if tops[s] == tops[2.5])
    assert earlier_equal_scale(stats, 8, 2.5, scales) == first_capped
    assert earlier_equal_scale(stats, 8, first_capped, scales) is None  # the first of them is evaluated
    assert earlier_equal_scale(stats, 8, 1.0, scales) is None
    plan = make_plan(False, "fashion-mnist", True, None, {"clip_scales": scales, "levels": [8]})
    (marker,) = run_lwfc_combo(("uniform", "sweep", 8, 2.5), stats, None, None, None, plan)
    assert math.isnan(marker.bits_per_element) and marker.setting == "8 levels clip x2.5"
    assert f"the same quantizer as clip x{first_capped:g}" in marker.notes


def test_report_lists_a_setting_without_a_point_once_not_as_a_nan_row():
    """A capped sweep scale (no point of its own) is named under "Settings that gave no point", not in All points."""
    from lwfc_host.evaluate.report import load_evaluation, markdown
    from lwfc_host.evaluate.results import Point

    ev = load_evaluation(Path(__file__).parent.parent / "results/eval/resnet_fmnist_stage2/evaluation.json")
    ev.points.append(Point("lwfc uniform clip=sweep", "4 levels clip x9", math.nan, {}, math.nan, math.nan, 0,
                           notes="the same quantizer as clip x2.5: the clip top is capped at the data maximum"))
    md = markdown(ev)
    listed, all_points = md.split("## All points")
    assert "lwfc uniform clip=sweep, 4 levels clip x9 (the same quantizer as clip x2.5" in listed
    assert "clip x9" not in all_points and "nan" not in all_points
    assert all_points.count("\n| lwfc ") == sum(p.method.startswith("lwfc") for p in ev.points) - 1
    # The no-point setting's method has no context suffix, so it would have made a "lwfc v1" family of its own
    # in an evaluation that ran only the v2 contexts.
    ev.points = [p for p in ev.points if not p.method.startswith("lwfc") or p.method.endswith("ctx=auto")]
    ev.points.append(Point("lwfc uniform clip=sweep", "4 levels clip x9", math.nan, {}, math.nan, math.nan, 0,
                           notes="capped"))
    assert [r["family"] for r in family_headline(ev)] == ["lwfc v2 (designed contexts + reference channels)",
                                                          "HEVC (x265)", "AV1 (libaom)"]


def test_a_fine_tuned_model_is_held_to_the_higher_of_its_own_and_the_original_accuracy():
    """A model fine-tuned for the codec (zoo ``fine_tuned_from``) must not lower the 1-pp bar: when the model it
    came from was more accurate, that accuracy is the reference; when it was less, the model's own is."""
    from lwfc_host.evaluate.report import reference_value

    lower = SimpleNamespace(primary="accuracy", reference={"float accuracy": 0.920, "original float accuracy": 0.925})
    higher = SimpleNamespace(primary="accuracy", reference={"float accuracy": 0.927, "original float accuracy": 0.925})
    plain = SimpleNamespace(primary="accuracy", reference={"float accuracy": 0.925})
    assert reference_value(lower) == (0.925, "accuracy of the model it was fine-tuned from (above its own float "
                                              "accuracy)")
    assert reference_value(higher) == (0.927, "float model accuracy")
    assert reference_value(plain) == (0.925, "float model accuracy")


def test_the_edge_cache_knows_which_model_a_zoo_model_was_fine_tuned_from():
    """The evaluation runs the original float model beside a fine-tuned one (and only then)."""
    pytest.importorskip("torch", reason="the zoo needs torch")
    from lwfc_host.evaluate.edge_cache import _original_name

    assert _original_name(SimpleNamespace(model="resnet_fmnist_rate")) == "resnet_fmnist"
    assert _original_name(SimpleNamespace(model="resnet_fmnist")) is None
    assert _original_name(SimpleNamespace(model="not_in_the_zoo")) is None
