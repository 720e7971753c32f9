"""What an evaluation runs: the methods and rate points (``Plan``) for classifiers and detectors.

A plan is plain data (it is saved in evaluation.json and sent to worker processes); ``make_plan`` picks the
default plan for a bundle, applies the caller's overrides and refuses combinations that would run nothing or
silently drop an override.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lwfc_convert.detection import EVAL_VIEWS as DETECTION_VIEWS

# lwfc context variants: name -> (channel groups, neighbour classes K, table spec version) given to
# ``table_design.finish_design``.
CONTEXTS: dict[str, tuple[Any, Any, Any]] = {
    "one": (1, 1, 1), "groups": ("auto", 1, 1), "groups+k2": ("auto", 2, 1), "groups+k3": ("auto", 3, 1),
    # one model per channel (G = min(C, 256)); "auto" designs the contexts on held-out bits (design/contexts.py),
    # with spec version 2's reference channels where they win; "auto-v1" the same within version 1
    "channel": (256, 1, 1), "auto": ("auto", "auto", "auto"), "auto-v1": ("auto", "auto", 1)}
KINDS = ("uniform", "ecsq")
CLIPS = ("mse", "model", "sweep")
METHODS = ("lwfc", "hevc", "av1", "jpeg", "webp", "rle", "zlib")
# The plan fields each method reads (an override of a field no method to run reads is refused).
METHOD_FIELDS = {"lwfc": ("levels", "kinds", "clips", "contexts", "clip_scales", "decode_check", "sweep_contexts",
                          "sweep_kinds"),
                 "hevc": ("hevc_qps",), "av1": ("av1_crfs",), "jpeg": ("jpeg_qualities",), "webp": ("webp_qualities",),
                 "rle": ("rle_levels",), "zlib": ("zlib_bits",)}
MIN_DETECTION_VIEWS = 100  # a full (not quick) detector evaluation needs at least this many views
MIN_PHOTO_VIEWS = 300  # a full classifier evaluation on photos (top-1 agreement) needs at least this many views


@dataclass
class Plan:
    """Which methods and rate points to run."""

    levels: list[int]
    kinds: list[str]
    clips: list[str]  # "mse", "model" (clipping.choose_clip) and "sweep" (the MSE clip's top x each clip_scale)
    contexts: list[str]  # keys of CONTEXTS: "one" (one model), "channel", "groups", "groups+k2", "auto", ...
    hevc_qps: dict[int, list[int]]  # bit depth -> QPs
    jpeg_qualities: list[int]
    webp_qualities: list[int]
    rle_levels: list[int]
    zlib_bits: list[int]
    calib_images: int
    eval_images: int | None  # None: the whole test set
    decode_check: int  # tensors decoded per extra context variant (the main variant decodes them all)
    # "sweep": quantizers (sweep_kinds) whose clip top is the MSE one times each scale, coded with sweep_contexts.
    # Wider clips zero more small activations: far fewer bits for little task loss at 2-3 levels.
    clip_scales: list[float] = field(default_factory=lambda: [1.0, 1.3, 1.6, 2.0, 2.5])
    # AV1 all-intra constant-quality levels (libaom crf, 0-63); empty in plans written before AV1 was added
    av1_crfs: list[int] = field(default_factory=list)
    # the context variants the clip sweep codes with (empty: the last of ``contexts``), e.g. auto-v1 and auto to
    # compare spec versions on the same quantizers
    sweep_contexts: list[str] = field(default_factory=list)
    # the quantizer kinds of the clip sweep: uniform, and ecsq for a dead zone on top of the wider clip (ECSQ's
    # lambda chosen as for the other clips, lwfc_points.ECSQ_RATE_RATIO)
    sweep_kinds: list[str] = field(default_factory=lambda: ["uniform"])


def full_plan(limit: int | None = None, dataset: str = "fashion-mnist") -> Plan:
    """The full classifier plan: the whole Fashion-MNIST test set (or 320 photo views) unless ``limit``."""
    return Plan(levels=[2, 3, 4, 5, 6, 7, 8], kinds=["uniform", "ecsq"], clips=["mse", "model", "sweep"],
                contexts=["one", "channel", "groups+k2", "auto"],
                # 10-bit frames add nothing on int8 edge outputs (256 values at most): fewer QPs there
                hevc_qps={8: [22, 27, 32, 36, 40, 43, 46, 49], 10: [32, 40, 46]},
                jpeg_qualities=[5, 10, 25, 50, 75, 95], webp_qualities=[5, 10, 25, 50, 75, 95],
                rle_levels=[2, 3, 4, 5, 6, 8], zlib_bits=[8, 4, 2], calib_images=512,
                av1_crfs=[20, 32, 40, 48, 54, 60, 63],
                eval_images=limit if limit is not None else (None if dataset == "fashion-mnist" else 320),
                decode_check=200)


def quick_plan(limit: int | None = None, dataset: str = "fashion-mnist") -> Plan:
    """A few rate points per method on 500 images (64 photo views) unless ``limit``: about 2 minutes."""
    return Plan(levels=[2, 4], kinds=["uniform", "ecsq"], clips=["mse", "model", "sweep"],
                contexts=["one", "groups", "groups+k2"], hevc_qps={8: [30, 38, 44, 50]}, clip_scales=[1.0, 1.6],
                jpeg_qualities=[10, 50, 90], webp_qualities=[10, 50, 90], rle_levels=[2, 4], zlib_bits=[4, 2],
                calib_images=128, decode_check=20, av1_crfs=[40, 56, 63],
                eval_images=limit if limit is not None else (500 if dataset == "fashion-mnist" else 64))


def detection_plan(quick: bool, limit: int | None = None) -> Plan:
    """Plans for detectors: a feature tensor is 10-100 times larger than a classifier's (e.g. 128x128x72 for
    CenterNet-MobileNetV3), so fewer views and calibration views (every photo gets the same number of views:
    ``limit`` is rounded up to a multiple of the number of photos, see ``lwfc_convert.detection.views``).
    Quick: one quantizer family, 17 views (one per photo) unless ``limit`` says otherwise."""
    if quick:
        return Plan(levels=[2, 4], kinds=["uniform"], clips=["mse"], contexts=["one", "groups", "groups+k2"],
                    hevc_qps={8: [30, 38, 44, 50]}, jpeg_qualities=[10, 50, 90], webp_qualities=[10, 50, 90],
                    rle_levels=[2, 4], zlib_bits=[4, 2], calib_images=17, decode_check=4, av1_crfs=[40, 56, 63],
                    eval_images=limit if limit is not None else 17)
    return Plan(levels=[2, 3, 4, 5, 6, 8], kinds=["uniform", "ecsq"], clips=["mse", "model"],
                contexts=["one", "groups", "groups+k2", "groups+k3"], hevc_qps={8: [22, 27, 32, 36, 40, 43, 46, 49]},
                # below quality 25 JPEG/WebP tiles keep a small fraction of the detections (measured: mAP 12-17%
                # at q10 on 8 views), and each quality costs about 0.2 s per view
                jpeg_qualities=[25, 50, 75, 95], webp_qualities=[25, 50, 75, 95],
                rle_levels=[2, 3, 4, 5, 6, 8], zlib_bits=[8, 4, 2], calib_images=34, decode_check=16,
                av1_crfs=[20, 32, 40, 48, 54, 60, 63],
                eval_images=limit if limit is not None else DETECTION_VIEWS)


def _named(field_name: str) -> str:
    """A plan field as the messages name it: with its ``lwfc eval`` flag."""
    return f"{field_name} (--{field_name.replace('_', '-')})"


def _check_overrides(plan: Plan, overrides: dict[str, Any], methods: set[str]) -> None:
    """Overrides that the plan would not use are errors, not silently dropped settings."""
    for method, fields in METHOD_FIELDS.items():
        unused = [_named(f) for f in fields if f in overrides and method not in methods]
        if unused:
            raise ValueError(f"{', '.join(unused)} set for {method}, which is not among the methods to run "
                             f"({', '.join(sorted(methods))})")
    unknown = [c for c in plan.contexts + plan.sweep_contexts if c not in CONTEXTS]
    if unknown:
        raise ValueError(f"unknown contexts {unknown}; known: {', '.join(CONTEXTS)}")
    if "sweep_contexts" in overrides and "sweep" not in plan.clips:
        raise ValueError("sweep contexts apply to the clip sweep only: add sweep to the clip choices (--clips)")
    if "clip_scales" in overrides and "sweep" not in plan.clips:
        raise ValueError(f"clip scales {overrides['clip_scales']} apply to the clip sweep only, and the clip choices "
                         f"are {plan.clips}: add sweep to them (--clips)")
    if "kinds" in overrides and not any(c != "sweep" for c in plan.clips):
        raise ValueError(f"quantizer kinds {overrides['kinds']} apply to the mse and model clips only (the clip sweep "
                         "has its own, --sweep-kinds): add mse or model to the clip choices (--clips)")
    if "sweep_kinds" in overrides and "sweep" not in plan.clips:
        raise ValueError("sweep kinds apply to the clip sweep only: add sweep to the clip choices (--clips)")
    unknown = [k for k in plan.kinds + plan.sweep_kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown quantizer kinds {unknown}; known: {', '.join(KINDS)}")


def make_plan(detector: bool, dataset: str, quick: bool, limit: int | None, overrides: dict[str, Any] | None = None,
              methods: set[str] | frozenset[str] = frozenset(METHODS)) -> Plan:
    """The default plan for the bundle's task and data set, with ``overrides`` replacing plan fields (e.g.
    ``{"levels": [2, 3, 4], "contexts": ["one", "groups+k2"]}``). Raises ValueError for an unknown field or
    context, an override that none of ``methods`` would use, or too few views for a full run."""
    if detector:
        plan = detection_plan(quick, limit)
    else:
        plan = quick_plan(limit, dataset) if quick else full_plan(limit, dataset)
    overrides = overrides or {}
    for k, v in overrides.items():
        if not hasattr(plan, k):
            raise ValueError(f"unknown plan field {k!r}")
        setattr(plan, k, v)
    _check_overrides(plan, overrides, set(methods))
    if detector and (plan.eval_images or 0) < MIN_DETECTION_VIEWS and not quick:
        raise ValueError(f"the detector evaluation needs at least {MIN_DETECTION_VIEWS} views (--limit), or --quick")
    if not detector and dataset == "photos" and (plan.eval_images or 0) < MIN_PHOTO_VIEWS and not quick:
        raise ValueError(f"the photo evaluation needs at least {MIN_PHOTO_VIEWS} views")
    return plan
