"""lwfc's rate points: every quantizer of the plan, designed on the calibration edge outputs, with each context
variant; rates from the real frames of the device-identical encoder, metrics from the host decoder's output
through the cloud half."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from lwfc_convert.cloud_runtime import cloud_outputs
from lwfc_host.evaluate.edge_cache import EdgeData
from lwfc_host.evaluate.plans import CONTEXTS, Plan
from lwfc_host.evaluate.results import Point
from lwfc_host.evaluate.streaming import chunk_of, squared_error

# ECSQ's one-model entropy as a fraction of the uniform quantizer's with the same levels and clip range.
ECSQ_RATE_RATIO = 0.8
Combo = tuple[str, str, int, float]  # (kind, clip, levels, clip scale)


def scaled_clip(stats: Any, levels: int, clip_scale: float) -> Any:
    """The MSE clip range of an N-level uniform quantizer with its top scaled by ``clip_scale``
    (``clipping.scale_top``)."""
    from lwfc_host.design.clipping import choose_clip, scale_top
    from lwfc_host.design.table_design import zeros_of

    hist = stats.histogram()
    return scale_top(hist, choose_clip(hist, levels, "mse", zeros_of(stats)), clip_scale)


def earlier_equal_scale(stats: Any, levels: int, clip_scale: float, clip_scales: list[float]) -> float | None:
    """The first of ``clip_scales`` listed before ``clip_scale`` that gives the same clip range: scaled tops are
    capped at the data maximum (bounded layers, many levels), so several scales can make one quantizer."""
    top = scaled_clip(stats, levels, clip_scale).c_max
    for s in clip_scales[:clip_scales.index(clip_scale)] if clip_scale in clip_scales else []:
        if scaled_clip(stats, levels, s).c_max == top:
            return s
    return None


def lwfc_designs(stats: Any, kind: str, clip: Any, levels: int, contexts: list[str]) -> list[tuple[str, Any]]:
    """(context name, Design) for one quantizer: the quantizer is designed once, each context variant only
    changes the entropy models. ECSQ's lambda is chosen so that its one-model entropy is ``ECSQ_RATE_RATIO``
    times that of the uniform quantizer with the same levels and clip range. (At equal entropy, on int8
    edge outputs whose grid is coarse, ECSQ's thresholds snap back onto the uniform ones and its points
    would duplicate uniform's; at a lower rate it trades levels for rate, which is what it is for.)"""
    from lwfc_host.design.quantizers import evaluate
    from lwfc_host.design.table_design import design_quantizer, equal_rate_ecsq, finish_design, zeros_of

    q, choice = design_quantizer(stats, levels, "uniform", 0.0, clip)
    if kind == "ecsq":
        target = ECSQ_RATE_RATIO * evaluate(q, stats.histogram(), zeros_of(stats)).entropy
        q = equal_rate_ecsq(stats, levels, choice, target)
        if q is None:
            return []
    out = []
    for ctx in contexts:
        groups, classes, version = CONTEXTS[ctx]
        if classes != "auto" and classes * classes * q.levels > 256:
            continue  # more context classes than a table can hold
        if version == 1 and q.levels > 16:
            continue  # more levels than a version 1 table can hold
        out.append((ctx, finish_design(stats, q, choice, groups, classes, spec_version=version)))
    return out


def lwfc_combos(plan: Plan) -> list[Combo]:
    """(kind, clip, levels, clip scale) of every lwfc quantizer the plan asks for."""
    combos = [(k, cl, lv, 1.0) for k in plan.kinds for cl in plan.clips if cl != "sweep" for lv in plan.levels]
    if "sweep" in plan.clips:
        combos += [(k, "sweep", lv, sc) for k in plan.sweep_kinds for lv in plan.levels for sc in plan.clip_scales]
    return combos


def lwfc_stats(data: EdgeData) -> Any:
    """Calibration statistics of the calibration edge outputs (what every lwfc design starts from).
    Deterministic: the same edge outputs give the same statistics in every process."""
    from lwfc_host.design.calibration import CalibrationStats

    cs = CalibrationStats()
    cs.add_int8(data.q_calib, data.scale, data.zero_point, where="calibration edge outputs")
    return cs.loaded()


@dataclass
class _Coded:
    """One context variant's frames of every evaluation tensor, and what decoding some of them gave."""

    frames: list[bytes]
    elements: int  # per tensor
    encode_seconds: float
    decode_seconds: float
    decoded: int  # frames decoded (and checked against the encoder's indices)
    outputs: list[np.ndarray]  # cloud outputs of the decoded tensors, when asked for
    squared_error: float  # summed over the decoded tensors, when the cloud ran


def _code_variant(design: Any, data: EdgeData, session: Any, decoded: int, run_cloud: bool, what: str) -> _Coded:
    """Encode every evaluation tensor with ``design``'s table and decode the first ``decoded`` frames, checking
    that they give the encoder's indices; with ``run_cloud``, run the cloud half on the decoded tensors."""
    from lwfc.tables import Tables
    from lwfc_host.codec.decoder import Decoder
    from lwfc_host.codec.fast import FastEncoder

    tables = Tables(design.table)
    t0 = time.perf_counter()
    encoder = FastEncoder(tables)
    frames = [encoder.frame_int8(q) for q in data.q_eval]
    out = _Coded(frames, int(np.prod(data.q_eval.shape[1:])), time.perf_counter() - t0, 0.0, decoded, [], 0.0)
    dec = Decoder(tables)
    chunk = chunk_of(data.q_eval.shape[1:], 256)  # decoded tensors are held a chunk at a time, not all
    for i in range(0, decoded, chunk):
        q = data.q_eval[i:min(decoded, i + chunk)]
        recon = np.empty(q.shape, dtype=np.float32) if run_cloud else None
        for k in range(len(q)):  # one tensor's indices at a time: as int64 they are 8 bytes an element
            t0 = time.perf_counter()
            got = dec.decode(out.frames[i + k])
            out.decode_seconds += time.perf_counter() - t0
            # every variant must decode to the encoder's indices (so all variants agree with each other)
            if not np.array_equal(got.indices, encoder.lut[q[k].astype(np.int64) + 128]):
                raise RuntimeError(f"{what}: decoded indices differ from the encoder's")
            if recon is not None:
                recon[k] = got.tensor[0]
        if recon is not None:
            out.outputs.append(cloud_outputs(session, recon))
            out.squared_error += squared_error(recon, q, data.dequantize)
        del recon  # before the next chunk's is made
    return out


def _point(combo: Combo, ctx: str, design: Any, coded: _Coded, metrics: dict[str, float], mse: float,
           first: bool) -> Point:
    """The point of one context variant (``first``: the variant whose every frame was decoded)."""
    kind, clip, _, clip_scale = combo
    q = design.quantizer
    setting = f"{q.levels} levels" + (f" lambda={q.lam:.3g}" if kind == "ecsq" else "") + \
        (f" clip x{clip_scale:g}" if clip == "sweep" else "")
    g = design.table["contexts"]["groups"]
    n = len(coded.frames)
    nbytes = np.asarray([len(f) for f in coded.frames], dtype=np.int64)
    refs = sum(r >= 0 for r in design.table["contexts"].get("reference_channel", []))
    notes = f"v{design.table['version']} G={g} K={design.classes}" + (f" refs={refs}" if refs else "") + \
        ("" if first else f"; decoded {coded.decoded} of {n}")
    return Point(f"lwfc {kind} clip={clip} ctx={ctx}", setting, float(8 * nbytes.mean() / coded.elements),
                 dict(metrics), 1000 * coded.encode_seconds / n, 1000 * coded.decode_seconds / coded.decoded, n,
                 mse=mse, notes=notes,
                 extra={"clip_min": q.clip_min, "clip_max": q.clip_max, "groups": g, "classes": design.classes,
                        "levels": q.levels, "kind": kind, "design_bits": design.coded_bits_per_element,
                        "table_version": design.table["version"], "dependent_channels": refs,
                        "clip_scale": clip_scale, "table": design.table})


def _no_point(method: str, setting: str, why: str) -> Point:
    """A setting that gave no point of its own; the report lists it with ``why``."""
    return Point(method, setting, math.nan, {}, math.nan, math.nan, 0, notes=why)


def run_lwfc_combo(combo: Combo, stats: Any, data: EdgeData, session: Any, metric: Any, plan: Plan) -> list[Point]:
    """The points of one quantizer: the cloud runs once on the decoded tensors of the first context variant;
    every variant's frames are all encoded (their sizes are the rate), the first is decoded in full and each
    other one on ``plan.decode_check`` tensors, checked to give the same indices."""
    kind, clip, levels, clip_scale = combo
    if clip == "sweep" and (same := earlier_equal_scale(stats, levels, clip_scale, plan.clip_scales)) is not None:
        # the same quantizer again: not designed, coded and scored twice, but said in the report
        return [_no_point(f"lwfc {kind} clip=sweep", f"{levels} levels clip x{clip_scale:g}",
                          f"the same quantizer as clip x{same:g}: the clip top is capped at the data maximum")]
    n = len(data.q_eval)
    try:
        if clip == "sweep":
            designs = lwfc_designs(stats, kind, scaled_clip(stats, levels, clip_scale), levels,
                                   plan.sweep_contexts or plan.contexts[-1:])
        else:
            designs = lwfc_designs(stats, kind, clip, levels, plan.contexts)
    except Exception as exc:  # a design that cannot exist (e.g. ECSQ emptying all cells) is reported
        return [_no_point(f"lwfc {kind} clip={clip}", f"{levels} levels",
                          f"design failed: {type(exc).__name__}: {exc}")]
    points: list[Point] = []
    metrics: dict[str, float] = {}
    mse = math.nan
    for vi, (ctx, d) in enumerate(designs):
        coded = _code_variant(d, data, session, n if vi == 0 else min(n, plan.decode_check), vi == 0,
                              f"lwfc {kind} {clip} {levels} {ctx}")
        if vi == 0:  # the variants differ in rate only: the first one's metrics are every variant's
            metrics = metric(np.concatenate(coded.outputs), data.labels, data.ref)
            mse = coded.squared_error / data.q_eval.size
        points.append(_point(combo, ctx, d, coded, metrics, mse, vi == 0))
    return points
