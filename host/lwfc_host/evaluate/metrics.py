"""Metric plug-ins: a metric turns cloud outputs (and labels, and the reference outputs) into named numbers
and names its primary one.

Classifiers use labeled accuracy, or, on unlabeled photos, top-1 agreement with the uncompressed pipeline;
detectors (cloud outputs ``[N, 100, 6]`` detection rows) use mAP@0.5 against the uncompressed int8 pipeline's
detections (``lwfc_convert.detection.DetectionMetric``). ``resolve_metric(..., "auto")`` picks the one that
fits the bundle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from lwfc_convert.cloud_runtime import softmax

CONFIDENT = 0.5  # a view is "confident" when the reference top-1 softmax probability reaches this


@dataclass
class ClassifierMetric:
    """Top-1 accuracy on labeled data; top-1 agreement with the uncompressed int8 pipeline (edge half +
    cloud half, no feature codec) and with the float model, on all views and on confident ones."""

    name: str = "classification"

    def primary(self, labeled: bool) -> str:
        """The headline metric: accuracy with labels, agreement without."""
        return "accuracy" if labeled else "agreement"

    def __call__(self, outputs: np.ndarray, labels: np.ndarray, ref: dict[str, np.ndarray]) -> dict[str, float]:
        top1 = outputs.argmax(axis=1)
        res: dict[str, float] = {}
        if (labels >= 0).all():
            res["accuracy"] = float((top1 == labels).mean())
        ref_int8 = ref["int8"].argmax(axis=1)
        res["agreement"] = float((top1 == ref_int8).mean())
        conf = softmax(ref["int8"], axis=1).max(axis=1) >= CONFIDENT
        res["agreement_confident"] = float((top1[conf] == ref_int8[conf]).mean()) if conf.any() else math.nan
        if "float" in ref:
            res["agreement_float"] = float((top1 == ref["float"].argmax(axis=1)).mean())
        return res


def detection_metric() -> Any:
    """mAP@0.5 against the uncompressed int8 pipeline's detections (imported only when a detector is scored)."""
    from lwfc_convert.detection import DetectionMetric

    return DetectionMetric()


METRICS: dict[str, Callable[[], Any]] = {"classification": ClassifierMetric, "detection": detection_metric}


def bundle_task(info: dict) -> str:
    """``"detection"`` for a detector bundle (cloud half outputs detection rows), else ``"classification"``.
    ``info`` is bundle.json's content (``Bundle.info``): its ``task`` (written by ``lwfc convert`` since
    detectors exist), or, for older bundles, the zoo's list of detectors."""
    task = info.get("task")
    if task:
        return str(task)
    from lwfc_convert.detection import is_detector

    return "detection" if is_detector(info.get("model", "")) else "classification"


def resolve_metric(info: dict, metric: str) -> str:
    """The metric plug-in to use for bundle.json's content ``info``: ``auto`` picks the bundle's task; a
    metric that does not fit it is an error that says why."""
    task = bundle_task(info)
    if metric == "auto":
        return task
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; known: auto, {', '.join(METRICS)}")
    if metric != task:
        out = info.get("cloud", {}).get("output", {}).get("shape")
        what = ("detection rows (x1, y1, x2, y2, score, class) per image, not class logits" if task == "detection"
                else "class logits, not detection rows")
        raise ValueError(f"--metric {metric} does not fit bundle {info.get('model')!r}: it is a {task} model (its "
                         f"cloud half outputs {out}: {what}); use --metric {task} or --metric auto")
    return metric
