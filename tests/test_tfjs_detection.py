"""Detection quality without labels: mAP@0.5 against reference detections, NMS, deterministic photo views."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lwfc_convert import detection as det


def _rows(boxes, scores, classes):
    return np.column_stack([np.asarray(boxes, float).reshape(-1, 4), scores, classes])


@pytest.fixture(scope="module")
def reference():
    """Three views with a few well-separated objects each, plus low-scoring clutter."""
    rng = np.random.default_rng(0)
    out = []
    for v in range(3):
        boxes, scores, classes = [], [], []
        for k in range(4):
            x, y = 100 * k + 10, 50 * v + 20
            boxes.append([x, y, x + 60, y + 40])
            scores.append(0.9 - 0.1 * k)
            classes.append(k % 2)
        for _ in range(5):  # below the reference threshold: not reference objects
            x, y = rng.uniform(0, 400, 2)
            boxes.append([x, y, x + 20, y + 20])
            scores.append(rng.uniform(0.05, 0.25))
            classes.append(int(rng.integers(0, 3)))
        out.append(_rows(boxes, scores, classes))
    return out


def test_identical_detections_score_one(reference):
    r = det.map50(reference, reference)
    assert r["map50"] == 1.0 and r["recall"] == 1.0 and r["precision"] == 1.0
    assert r["n_reference"] == 12 and r["n_views"] == 3 and set(r["ap"]) == {0, 1}


def test_shifted_missing_and_reclassified_boxes_lower_the_map(reference):
    shifted = [r.copy() for r in reference]
    for r in shifted:
        r[0, [0, 2]] += 45  # IoU of the first object drops to 15/105 < 0.5
    r = det.map50(reference, shifted)
    assert r["map50"] < 1.0
    assert math.isclose(r["recall"], 9 / 12)
    # Losing every class-1 object: AP(1) = 0, AP(0) = 1.
    no_ones = [r[r[:, 5] != 1] for r in reference]
    r = det.map50(reference, no_ones)
    assert r["ap"][1] == 0.0 and r["ap"][0] == 1.0 and math.isclose(r["map50"], 0.5)
    # Small box jitter within IoU 0.5 and rescored detections keep AP 1 when the ranking is kept.
    jitter = [np.column_stack([r[:, :4] + 2.0, r[:, 4] * 0.9, r[:, 5]]) for r in reference]
    assert det.map50(reference, jitter)["map50"] == 1.0


def test_false_positives_ranked_above_true_ones_cost_precision(reference):
    fp = []
    for r in reference:
        extra = _rows([[400, 400, 450, 450]], [0.99], [0])
        fp.append(np.vstack([extra, r]))
    r = det.map50(reference, fp)
    assert 0.5 < r["ap"][0] < 1.0 and r["ap"][1] == 1.0


def test_box_weighted_ap_weighs_classes_by_their_boxes(reference):
    """A class with one reference box counts as much as a class with six in the mAP, but one box in thirteen
    in the box-weighted AP."""
    rare = [np.vstack([reference[0], _rows([[300, 300, 340, 340]], [0.8], [2])]), *reference[1:]]
    lost = [r[r[:, 5] != 2] for r in rare]
    r = det.map50(rare, lost)
    assert r["ap"] == {0: 1.0, 1: 1.0, 2: 0.0} and r["n_reference"] == 13
    assert math.isclose(r["map50"], 2 / 3) and math.isclose(r["map50_box_weighted"], 12 / 13)


def test_bootstrap_interval_resamples_photos(reference):
    """Identical detections: the interval is a point. One photo (two views) losing a class: the resamples
    that leave that photo out score 1, those that draw it score less, so the interval spans the value."""
    assert det.map50_interval(reference, reference, [0, 0, 1]) == (1.0, 1.0)
    views = reference + [r.copy() for r in reference]
    photos = [0, 1, 2, 0, 1, 2]
    damaged = [r[r[:, 5] != 1] if p == 0 else r for r, p in zip(views, photos)]
    value = det.map50(views, damaged)["map50"]
    lo, hi = det.map50_interval(views, damaged, photos, resamples=400)
    assert lo < value < hi == 1.0
    with pytest.raises(ValueError, match="2 group labels for 3 views"):
        det.map50_interval(reference, reference, [0, 1])


def test_counting_a_view_twice_equals_listing_it_twice(reference):
    """The bootstrap's weights mean repetition: view 0 drawn twice scores as the list with view 0 twice."""
    shifted = [r.copy() for r in reference]
    shifted[0][0, [0, 2]] += 45
    shifted[2][1, 4] = 0.95  # reorders the ranking across views
    matches = det._class_matches(reference, shifted, det.REFERENCE_THRESHOLD, 0.5, det.MIN_SCORE, det.NMS_IOU)
    weighted = det._map_from_matches(matches, np.array([2, 0, 1]), det.REFERENCE_THRESHOLD)
    listed = det.map50([reference[0], reference[0], reference[2]], [shifted[0], shifted[0], shifted[2]])
    for key in ("map50", "map50_box_weighted", "recall", "precision", "n_reference", "ap"):
        assert weighted[key] == pytest.approx(listed[key]), key


def test_photo_index_follows_views():
    n_photos = len(det.photo_paths())
    assert list(det.photo_index(3)) == [0, 1, 2]  # fewer views than photos: view 0 of the first ones
    idx = det.photo_index(n_photos + 1)  # two views per photo
    names = [name.split("#")[0] for name, _ in det.views(n_photos + 1, size=16)]
    assert len(idx) == len(names) == 2 * n_photos
    assert all(names[i] == names[j] for i in range(len(idx)) for j in range(len(idx)) if idx[i] == idx[j])
    assert list(idx) == sorted(idx)


def test_no_reference_objects_gives_nan():
    empty = [_rows(np.zeros((0, 4)), [], [])]
    r = det.map50(empty, empty)
    assert math.isnan(r["map50"]) and r["n_reference"] == 0
    with pytest.raises(ValueError, match="2 reference views but 1"):
        det.map50(empty * 2, empty)


def test_postprocess_threshold_and_class_agnostic_nms():
    rows = _rows([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60], [0, 0, 10, 10]], [0.8, 0.9, 0.5, 0.1],
                 [0, 1, 2, 0])
    out = det.postprocess(rows, 0.2, 0.4)
    np.testing.assert_array_equal(out[:, 4], [0.9, 0.5])  # the 0.8 box overlaps the 0.9 one (IoU 0.68)
    assert len(det.postprocess(rows, 0.2, None)) == 3


def test_describe_for_replies():
    rows = _rows([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], [0.8, 0.9, 0.1], [0, 1, 2])
    out = det.describe(rows, ["person", "bicycle", "car"])
    assert out == [{"box": [1.0, 1.0, 11.0, 11.0], "score": 0.9, "class": 1, "label": "bicycle"}]


def test_detector_names_and_metric_plugin(reference):
    assert det.is_detector("centernet_mbv3_coco") and not det.is_detector("efficientnet_lite0")
    m = det.DetectionMetric()
    assert m.primary(False) == "map50"
    ref = np.stack(reference)
    moved = ref.copy()
    moved[..., [1, 3]] += 1000.0  # every box far below the others: nothing matches
    out = m(ref, np.full(len(ref), -1), {"int8": ref, "float": moved})
    assert out["map50"] == 1.0 and out["recall"] == 1.0 and out["map50_float"] == 0.0
    assert "map50_float" not in m(ref, np.full(len(ref), -1), {"int8": ref})
    with pytest.raises(ValueError, match="detection rows"):
        m(np.zeros((3, 10)), np.full(3, -1), {"int8": ref})


def test_box_iou_and_average_precision():
    iou = det.box_iou([[0, 0, 10, 10]], [[5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 10, 10]])
    np.testing.assert_allclose(iou, [[1 / 3, 0.0, 1.0]])
    assert det.average_precision(np.array([0.5, 1.0]), np.array([1.0, 0.5])) == pytest.approx(0.75)


def test_views_are_deterministic_and_many():
    paths = det.photo_paths()
    if len(paths) < 5:
        pytest.skip("fewer than 5 photos installed (scikit-image, matplotlib, scikit-learn, darknet)")
    a = det.views(n_views=100, size=64)
    b = det.views(n_views=100, size=64)
    assert len(a) >= 100 and len(a) % len(paths) == 0
    assert [n for n, _ in a] == [n for n, _ in b]
    assert all(np.array_equal(x, y) for (_, x), (_, y) in zip(a, b))
    assert all(v.shape == (64, 64, 3) and v.dtype == np.uint8 for _, v in a)
    few = det.views(n_views=3, size=64)
    assert [n for n, _ in few] == [f"{name}#0" for name in sorted(paths)[:3]]
    assert all(np.array_equal(x, y) for (_, x), (_, y) in zip(few, a[::len(a) // len(paths)]))
    c = det.views(n_views=100, size=64, seed=1)
    assert not all(np.array_equal(x, y) for (_, x), (_, y) in zip(a, c))


def test_darknet_photos_are_used():
    found = det.darknet_photo_paths()
    if not found:
        pytest.skip("Debian package darknet not installed (apt-get install darknet): its demo photos are missing")
    assert {"darknet/dog", "darknet/horses", "darknet/person"} <= set(found)
    assert set(found) <= set(det.photo_paths(require_darknet=True))
