"""Detection quality without labeled data: deterministic photo views and mAP@0.5 against reference
detections (the uncompressed model's own, above a score threshold).

Photos: the Debian ``darknet`` demo photos (``/usr/share/darknet/data/*.jpg``: dog, eagle, giraffe, horses,
kite, person, scream) plus the photos bundled with scikit-image, matplotlib and scikit-learn
(:func:`lwfc_convert.datasets.photo_paths`). :func:`views` derives a fixed set of augmented views from
them (crops, flips, photometric changes) from a seed, so every run sees the same pixels.

:func:`map50` is the usual VOC/COCO-style average precision at IoU 0.5 per class (all-point interpolated
precision envelope), averaged over the classes that occur in the reference. Both the reference and the
detections under test go through the same post-processing as the ``@vladmandic/human`` library applies to
this model: a score threshold and class-agnostic non-maximum suppression (IoU 0.4).
"""

from __future__ import annotations

import math
import os
import zlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np

DARKNET_DIRS = [os.environ.get("LWFC_DARKNET_DIR", ""), "/usr/share/darknet/data"]
DARKNET_PHOTOS = ("dog.jpg", "eagle.jpg", "giraffe.jpg", "horses.jpg", "kite.jpg", "person.jpg", "scream.jpg")

# human's defaults for this detector (config.object): minConfidence 0.2, iouThreshold 0.4.
REFERENCE_THRESHOLD = 0.3
NMS_IOU = 0.4
MIN_SCORE = 0.05  # detections under test are kept down to this score, to trace the precision-recall curve
# Views a full detector evaluation asks for (`lwfc eval`'s plan): every photo gets the same number of views,
# so 17 photos give 136.
EVAL_VIEWS = 120
# Views `lwfc convert`'s int8 retention check asks for (544 from 17 photos). mAP averages AP over the classes
# present, and on 136 views several classes have one or two reference boxes: one of them missed moves the mAP
# by 3-4 pp. One bundle scored 92.7-99.4% on four 136-view sets drawn with different seeds; 544 views pool four
# times the boxes (1,114 in 29 classes), yet still leave a few single-box classes (converters/NOTES.md).
CHECK_VIEWS = 544


def darknet_photo_paths() -> dict[str, Path]:
    """The darknet demo photos that are installed (``apt-get install darknet``), name -> path."""
    for d in DARKNET_DIRS:
        if d and Path(d).is_dir():
            found = {f"darknet/{n.rsplit('.', 1)[0]}": Path(d) / n for n in DARKNET_PHOTOS if (Path(d) / n).exists()}
            if found:
                return found
    return {}


def photo_paths(require_darknet: bool = False) -> dict[str, Path]:
    """All photos for detection views: darknet's demo photos and the bundled package photos, sorted by name.
    With ``require_darknet`` a missing darknet package is an error naming the apt package."""
    from .datasets import DatasetMissing
    from .datasets import photo_paths as package_photos

    found = darknet_photo_paths()
    if require_darknet and not found:
        raise DatasetMissing("darknet demo photos not found in /usr/share/darknet/data: apt-get install darknet "
                             "(or set LWFC_DARKNET_DIR)")
    found.update(package_photos())
    return dict(sorted(found.items()))


def _rng(name: str, index: int, seed: int) -> np.random.Generator:
    # crc32, not hash(): Python salts str hashes per process.
    return np.random.default_rng([seed, zlib.crc32(name.encode()), index])


def make_view(image: np.ndarray, rng: np.random.Generator, index: int, size: int) -> np.ndarray:
    """One deterministic view of ``image`` (uint8 H x W x 3) as uint8 ``size`` x ``size`` x 3: view 0 is the
    whole photo resized (as the human library feeds this model); others crop 55-100% of each side at a
    random place, flip half of the time, and jitter brightness, contrast and saturation."""
    from PIL import Image, ImageEnhance

    im = Image.fromarray(image).convert("RGB")
    if index > 0:
        w, h = im.size
        cw = int(round(w * rng.uniform(0.55, 1.0)))
        ch = int(round(h * rng.uniform(0.55, 1.0)))
        left = int(rng.integers(0, w - cw + 1))
        top = int(rng.integers(0, h - ch + 1))
        im = im.crop((left, top, left + cw, top + ch))
        if rng.random() < 0.5:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
    im = im.resize((size, size), Image.BILINEAR)
    if index > 0:
        im = ImageEnhance.Brightness(im).enhance(float(rng.uniform(0.75, 1.25)))
        im = ImageEnhance.Contrast(im).enhance(float(rng.uniform(0.75, 1.25)))
        im = ImageEnhance.Color(im).enhance(float(rng.uniform(0.7, 1.3)))
    return np.asarray(im, dtype=np.uint8)


def _views_per_photo(n_views: int, n_photos: int) -> int:
    return max(1, math.ceil(n_views / n_photos))


def photo_index(n_views: int, require_darknet: bool = False) -> np.ndarray:
    """The photo (0-based, in name order) of each view :func:`views` returns for ``n_views``: views of one
    photo are not independent samples, :func:`map50_interval` resamples photos, then views."""
    n_photos = len(photo_paths(require_darknet))
    if 0 < n_views < n_photos:
        return np.arange(n_views)
    per_photo = _views_per_photo(n_views, n_photos)
    return np.repeat(np.arange(n_photos), per_photo)


def views(n_views: int = EVAL_VIEWS, size: int = 512, seed: int = 0, names: Sequence[str] | None = None,
          require_darknet: bool = False) -> list[tuple[str, np.ndarray]]:
    """At least ``n_views`` deterministic views (``"photo#k"``, uint8 size x size x 3), the same number for
    each photo (view 0 of each photo is the plain resize). Fewer views than photos: view 0 of the first
    ``n_views`` photos in name order (darknet's first), for quick runs."""
    from .datasets import load_photo

    paths = photo_paths(require_darknet)
    if names is not None:
        missing = [n for n in names if n not in paths]
        if missing:
            raise KeyError(f"photos not available: {missing}; available: {sorted(paths)}")
        paths = {n: paths[n] for n in names}
    if not paths:
        raise FileNotFoundError("no photos found: apt-get install darknet, or install scikit-image/matplotlib/"
                                "scikit-learn")
    if 0 < n_views < len(paths):
        paths = dict(list(paths.items())[:n_views])
    per_photo = _views_per_photo(n_views, len(paths))
    out = []
    for name, path in paths.items():
        image = load_photo(path)
        for k in range(per_photo):
            out.append((f"{name}#{k}", make_view(image, _rng(name, k, seed), k, size)))
    return out


# --------------------------------------------------------------------------------------------------
# Boxes, NMS, AP
# --------------------------------------------------------------------------------------------------

def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix between boxes ``a`` (M x 4) and ``b`` (K x 4), corners (x1, y1, x2, y2)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    ix1 = np.maximum(a[:, None, 0], b[None, :, 0])
    iy1 = np.maximum(a[:, None, 1], b[None, :, 1])
    ix2 = np.minimum(a[:, None, 2], b[None, :, 2])
    iy2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(ix2 - ix1, 0, None) * np.clip(iy2 - iy1, 0, None)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def postprocess(rows: np.ndarray, min_score: float, nms_iou: float | None = NMS_IOU) -> np.ndarray:
    """Keep rows ``(x1, y1, x2, y2, score, class)`` with score >= ``min_score``, then greedy class-agnostic
    NMS at ``nms_iou`` (what human does with this model's output); sorted by score, highest first."""
    rows = np.asarray(rows, dtype=np.float64).reshape(-1, 6)
    rows = rows[rows[:, 4] >= min_score]
    rows = rows[np.argsort(-rows[:, 4], kind="stable")]
    if nms_iou is None or len(rows) == 0:
        return rows
    keep: list[int] = []
    iou = box_iou(rows[:, :4], rows[:, :4])
    suppressed = np.zeros(len(rows), dtype=bool)
    for i in range(len(rows)):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= iou[i] > nms_iou
    return rows[keep]


def describe(rows: np.ndarray, classes: Sequence[str] | None = None, min_score: float = 0.2,
             nms_iou: float | None = NMS_IOU) -> list[dict[str, Any]]:
    """Detector output rows ``(x1, y1, x2, y2, score, class)`` as a JSON-able list (what ``lwfc serve``
    replies): :func:`postprocess` (human's defaults: score >= 0.2, class-agnostic NMS at 0.4), then one dict
    per detection with its box (input pixels), score, class index and label."""
    out = []
    for x1, y1, x2, y2, score, cls in postprocess(rows, min_score, nms_iou):
        c = int(cls)
        out.append({"box": [round(float(v), 2) for v in (x1, y1, x2, y2)], "score": round(float(score), 4),
                    "class": c, "label": classes[c] if classes is not None and 0 <= c < len(classes) else str(c)})
    return out


def average_precision(recall: np.ndarray, precision: np.ndarray) -> float:
    """Area under the precision envelope (all-point interpolation, VOC 2010+)."""
    r = np.concatenate([[0.0], recall, [1.0]])
    p = np.concatenate([[0.0], precision, [0.0]])
    p = np.maximum.accumulate(p[::-1])[::-1]
    idx = np.nonzero(r[1:] != r[:-1])[0]
    return float(np.sum((r[idx + 1] - r[idx]) * p[idx + 1]))


def _class_matches(reference: Sequence[np.ndarray], detections: Sequence[np.ndarray], threshold: float, iou: float,
                   min_score: float, nms_iou: float | None
                   ) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Per class present in the reference boxes (:func:`map50`'s post-processing): the detections of that class
    ranked by score (``score``, ``tp`` 0/1, ``view``) and the number of reference boxes per view. Matching
    happens within a view, so a resample of views reuses it (see :func:`_map_from_matches`)."""
    if len(reference) != len(detections):
        raise ValueError(f"{len(reference)} reference views but {len(detections)} detection views")
    gts = [postprocess(r, threshold, nms_iou) for r in reference]
    preds = [postprocess(d, min_score, nms_iou) for d in detections]
    classes = sorted({int(c) for g in gts for c in g[:, 5]})
    out = {}
    for c in classes:
        items = []  # (score, view, box)
        for v, p in enumerate(preds):
            for row in p[p[:, 5] == c]:
                items.append((row[4], v, row[:4]))
        items.sort(key=lambda t: -t[0])
        matched = [np.zeros(int(np.sum(g[:, 5] == c)), dtype=bool) for g in gts]
        tp = np.zeros(len(items))
        for i, (_, v, box) in enumerate(items):
            g = gts[v][gts[v][:, 5] == c]
            if len(g):
                ious = box_iou(box[None], g[:, :4])[0]
                ious[matched[v]] = -1.0
                j = int(np.argmax(ious))
                if ious[j] >= iou:
                    matched[v][j] = True
                    tp[i] = 1
        out[c] = (np.array([t[0] for t in items], dtype=np.float64), tp,
                  np.array([t[1] for t in items], dtype=np.int64), np.array([len(m) for m in matched]))
    return out


def _map_from_matches(matches: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
                      weights: np.ndarray, threshold: float) -> dict[str, Any]:
    """AP per class, mAP, box-weighted AP and recall/precision at ``threshold`` with each view counted
    ``weights[view]`` (integer) times, exactly as if it were listed that many times (all ones: the plain
    metric; a bootstrap draws the multiplicities)."""
    ap: dict[int, float] = {}
    n_box: dict[int, int] = {}
    tp_at = fp_at = 0
    for c, (score, tp, view, n_gt) in matches.items():
        n = int(np.dot(weights, n_gt))
        if n == 0:  # the class is absent from this resample
            continue
        ranked = np.repeat(np.arange(len(score)), weights[view])  # copies of a view's detection stay adjacent
        ctp = np.cumsum(tp[ranked])
        ap[c] = average_precision(ctp / n, ctp / np.arange(1, len(ranked) + 1))
        n_box[c] = n
        at = score[ranked] >= threshold
        tp_at += int(np.sum(tp[ranked][at]))
        fp_at += int(np.sum(at)) - int(np.sum(tp[ranked][at]))
    n_total = sum(n_box.values())
    return {
        "map50": float(np.mean(list(ap.values()))) if ap else float("nan"),
        "map50_box_weighted": sum(ap[c] * n_box[c] for c in ap) / n_total if n_total else float("nan"),
        "ap": ap,
        "n_reference": n_total,
        "recall": tp_at / n_total if n_total else float("nan"),
        "precision": tp_at / (tp_at + fp_at) if (tp_at + fp_at) else float("nan"),
    }


def map50(reference: Sequence[np.ndarray], detections: Sequence[np.ndarray], threshold: float = REFERENCE_THRESHOLD,
          iou: float = 0.5, min_score: float = MIN_SCORE, nms_iou: float | None = NMS_IOU) -> dict[str, Any]:
    """mAP at IoU ``iou`` of ``detections`` against ``reference``, one array of rows per view.

    The reference boxes are the reference rows with score >= ``threshold`` (after NMS); the detections
    under test are kept down to ``min_score`` (after NMS) and ranked by score. Each detection matches the
    unmatched reference box of its class in its view with the highest IoU >= ``iou``. Returns ``map50``
    (mean AP over the classes present in the reference; nan if there are none), ``map50_box_weighted`` (the
    same APs weighted by each class's reference boxes: a class with one box no longer weighs as much as one
    with hundreds), ``ap`` per class index, ``n_reference`` boxes, ``n_views``, and ``recall`` /
    ``precision`` at the reference threshold."""
    matches = _class_matches(reference, detections, threshold, iou, min_score, nms_iou)
    res = _map_from_matches(matches, np.ones(len(reference), dtype=np.int64), threshold)
    return {**res, "n_views": len(reference)}


def map50_interval(reference: Sequence[np.ndarray], detections: Sequence[np.ndarray], groups: Sequence[int],
                   level: float = 0.9, resamples: int = 1000, seed: int = 0,
                   threshold: float = REFERENCE_THRESHOLD, iou: float = 0.5, min_score: float = MIN_SCORE,
                   nms_iou: float | None = NMS_IOU) -> tuple[float, float]:
    """Percentile interval (``level``, e.g. 0.9 for 5%..95%) of :func:`map50` under a two-stage bootstrap:
    draw the ``groups`` (photos) with replacement, then each drawn photo's views with replacement. Views of
    one photo share its objects, so neither the photo nor the view alone is the independent unit: the
    interval covers other photos of the same kind and other views of these photos. ``groups[i]`` is the photo
    of view ``i`` (:func:`photo_index`)."""
    groups = np.asarray(groups)
    if len(groups) != len(reference):
        raise ValueError(f"{len(groups)} group labels for {len(reference)} views")
    matches = _class_matches(reference, detections, threshold, iou, min_score, nms_iou)
    members = [np.nonzero(groups == g)[0] for g in np.unique(groups)]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        weights = np.zeros(len(groups), dtype=np.int64)
        for g in rng.integers(0, len(members), len(members)):
            np.add.at(weights, rng.choice(members[g], len(members[g])), 1)
        values.append(_map_from_matches(matches, weights, threshold)["map50"])
    lo, hi = np.nanpercentile(values, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


# --------------------------------------------------------------------------------------------------
# Plug-ins for `lwfc eval`
# --------------------------------------------------------------------------------------------------

DETECTORS = ("centernet_mbv3_coco",)


def is_detector(model_or_name: Any) -> bool:
    """Whether a zoo model (by name, or a loaded model) outputs detection rows ``[N, K, 6]`` rather than
    logits: the bundle, eval and serve code use this to pick :func:`bundle_metrics`,
    :func:`detection_eval_data`, :class:`DetectionMetric` and :func:`describe`."""
    if isinstance(model_or_name, str):
        return model_or_name in DETECTORS
    from .centernet import CenterNetMBv3

    return isinstance(model_or_name, CenterNetMBv3)


class DetectionMetric:
    """Metric plug-in for the host's evaluation (``lwfc_host.evaluate.metrics``, registered there as
    ``METRICS["detection"]``; this module does not import the host).

    ``outputs`` are cloud-half outputs ``[N, K, 6]``; ``ref`` holds the uncompressed references: ``"int8"``
    (int8 edge half + cloud half, no feature codec: the primary reference, since it is what a codec can at best
    give back, as top-1 agreement is for classifiers on photos) and ``"float"`` (the float model, when its weights
    load). Returns ``map50`` (mAP@0.5 against the int8 pipeline's detections with score >= ``threshold``),
    ``recall`` and ``precision`` at that threshold against the same boxes, and ``map50_float`` (mAP@0.5 against
    the float model's detections) when available. Numbers are fractions (mAP 1.0 = the reference's detections)."""

    name = "detection"
    threshold = REFERENCE_THRESHOLD

    def primary(self, labeled: bool) -> str:
        return "map50"

    def describe(self) -> str:
        return (f"mAP@0.5 against the uncompressed int8 pipeline's detections (int8 edge half + cloud half, no "
                f"feature codec) with score >= {self.threshold} after class-agnostic NMS at IoU {NMS_IOU}; detections "
                f"under test kept down to score {MIN_SCORE}, same NMS; AP per class (all-point interpolation), "
                f"averaged over the classes present in the reference")

    def __call__(self, outputs: np.ndarray, labels: np.ndarray, ref: dict[str, np.ndarray]) -> dict[str, float]:
        outs = [np.asarray(o) for o in outputs]
        if outs and (outs[0].ndim != 2 or outs[0].shape[-1] != 6):
            raise ValueError(f"detection metric needs detection rows [N, K, 6], got outputs of shape "
                             f"{np.shape(outputs)}")
        if "int8" not in ref:
            raise ValueError("detection metric needs the uncompressed int8 pipeline's detections (ref['int8'])")
        main = map50([np.asarray(r) for r in ref["int8"]], outs, self.threshold)
        res = {"map50": main["map50"], "recall": main["recall"], "precision": main["precision"]}
        if "float" in ref:
            res["map50_float"] = map50([np.asarray(r) for r in ref["float"]], outs, self.threshold)["map50"]
        return res


def detection_eval_data(name: str, calib_images: int, eval_images: int | None, seed: int = 0,
                        progress: bool = True, batch_size: int = 4) -> tuple[list[Any], list[tuple[Any, Any]], str]:
    """Calibration batches and evaluation batches ``(x, labels=-1)`` for a zoo detector, in the shape of
    :func:`lwfc_convert.bundle.calibration_and_eval_data`: evaluation on at least ``eval_images`` (default
    :data:`EVAL_VIEWS`) :func:`views` of every photo
    (darknet's included: required) with ``seed``; calibration on views of the same photos drawn with another
    seed (``seed + 1000``), so no calibration view is an evaluation view."""
    import torch

    from .zoo import get_spec

    size = get_spec(name).input_shape[1]
    n_eval = EVAL_VIEWS if eval_images is None else eval_images
    # Not truncated: every photo keeps the same number of views (so at least the number asked for), except
    # that fewer views than photos take view 0 of the first photos (see views()).
    ev_views = views(max(n_eval, 1), size, seed, require_darknet=True)
    cal_views = views(max(calib_images, 1), size, seed + 1000, require_darknet=True)

    def batches(vs: list[tuple[str, np.ndarray]]) -> list[Any]:
        return [torch.from_numpy(np.stack([v for _, v in vs[i:i + batch_size]]).astype(np.float32)
                                 .transpose(0, 3, 1, 2).copy()) for i in range(0, len(vs), batch_size)]

    calib = batches(cal_views)
    ev = [(x, torch.full((len(x),), -1)) for x in batches(ev_views)]
    photos = sorted({n.split("#")[0] for n, _ in ev_views})
    return calib, ev, f"{len(ev_views)} views (whole photo + random crops/flips/colour) of {len(photos)} photos"


def bundle_metrics(model: Any, edge: Any, cloud: Any, tflite_path: Path, onnx_path: Path,
                   data: list[tuple[Any, Any]], progress: bool = True) -> dict[str, Any]:
    """The detector's counterpart of :func:`lwfc_convert.bundle.evaluate` (same arguments): run the float
    model, the int8 TFLite edge half (ai-edge-litert) and the ONNX cloud half (onnxruntime) on ``data`` and
    report mAP@0.5 of the int8 pipeline (and of the float edge + ONNX cloud) against the float model's
    detections (class-averaged, with its 90% bootstrap interval over photos and views when ``data`` are
    :func:`detection_eval_data`'s views in order, and box-weighted), the int8 error of the edge output, and the
    ONNX error."""
    import time

    import torch
    from tqdm import tqdm

    from lwfc.edge import make_interpreter

    from .cloud_runtime import onnx_session, run_onnx
    from .tflite_export import run_tflite

    interp = make_interpreter(tflite_path)
    sess = onnx_session(onnx_path)
    ref, int8, onnx_float = [], [], []
    err_num = err_den = 0.0
    onnx_err = 0.0
    t_edge = 0.0
    n = 0
    for x, _ in tqdm(data, desc="evaluating", unit="batch", disable=not progress, leave=False):
        with torch.no_grad():
            dets = model(x).numpy()
            feats = edge(x).permute(0, 2, 3, 1).numpy()
        t = time.perf_counter()
        _, deq = run_tflite(interp, x)
        t_edge += time.perf_counter() - t
        err_num += float(np.sum((deq - feats) ** 2))
        err_den += float(np.sum(feats ** 2))
        d_int8 = run_onnx(sess, deq)
        d_float = run_onnx(sess, feats)
        # Rows can swap order on near-equal scores: compare the confident ones through the metric, and the
        # raw numbers only where the float model is confident.
        conf = dets[..., 4] >= REFERENCE_THRESHOLD
        if conf.any():
            onnx_err = max(onnx_err, float(np.abs(d_float[..., 4][conf] - dets[..., 4][conf]).max()))
        ref.extend(dets)
        int8.extend(d_int8)
        onnx_float.extend(d_float)
        n += len(x)
    m_int8 = map50(ref, int8)
    photos = photo_index(n, require_darknet=True)
    interval = map50_interval(ref, int8, photos) if len(photos) == n else None  # data not from views(): none
    return {
        "images": n,
        "reference": f"float model detections with score >= {REFERENCE_THRESHOLD}, class-agnostic NMS {NMS_IOU}",
        "reference_detections": m_int8["n_reference"],
        "map50_int8_vs_float": m_int8["map50"],
        "map50_int8_vs_float_interval90": list(interval) if interval else None,
        "map50_box_weighted_int8_vs_float": m_int8["map50_box_weighted"],
        "recall_int8_vs_float": m_int8["recall"],
        "precision_int8_vs_float": m_int8["precision"],
        "map50_onnx_float_vs_float": map50(ref, onnx_float)["map50"],
        "edge_int8_rel_l2_error": float(np.sqrt(err_num / max(err_den, 1e-30))),
        "cloud_onnx_vs_torch_max_score_error": onnx_err,
        "edge_tflite_ms_per_image": 1000 * t_edge / max(n, 1),
    }
