"""A small, fixed table maker: uniform quantizer over a given clip range and models counted on given
activations. Used by tests, conformance vectors and the benchmark until the quantizer design tools
(calibration, clip search, ECSQ, channel-group clustering) replace it for real designs.
"""

from __future__ import annotations

import math

import numpy as np

from lwfc.tables import MAX_LEVELS_V1, Tables
from lwfc_host.codec.fast import indices_from_float_np
from lwfc_host.design.entropy_models import count_contexts
from lwfc_host.design.tablefile import finalize, integer_frequencies


def neighbour_class_map(levels: int, classes: int) -> list[int]:
    """Map a neighbour index (0..levels-1, and levels = outside) to one of ``classes`` classes:
    0 stays 0, 1 -> 1, ..., indices >= classes-1 share the top class; outside counts as 0."""
    return [min(v, classes - 1) for v in range(levels)] + [0]


def fixed_thresholds(thresholds: list[float], frac_bits: int) -> list[int]:
    """Float thresholds to the spec's fixed point: the smallest X = floor(x * 2^F) that maps up."""
    return [int(math.ceil(t * (1 << frac_bits))) for t in thresholds]


def int8_lut(fixed: list[int], frac_bits: int, scale: float, zero_point: int) -> list[int]:
    """index_of_q for q = -128..127, by the same fixed-point rule as float input."""
    x = scale * (np.arange(-128, 128) - zero_point)
    xf = np.clip(np.floor(x * float(1 << frac_bits)), -2147483648.0, 2147483647.0)
    return np.searchsorted(np.asarray(fixed, dtype=np.float64), xf, side="right").astype(int).tolist()


def uniform_table(
    activations: np.ndarray,
    levels: int,
    clip_max: float,
    clip_min: float = 0.0,
    groups: int | str = 1,
    classes: int = 1,
    int8_scale: float | None = None,
    int8_zero_point: int | None = None,
    frac_bits: int = 16,
    reference_channel: list[int] | None = None,
    reference_classes: int = 1,
) -> dict:
    """A finalized table dict: uniform ``levels``-level quantizer on [clip_min, clip_max], models
    fitted on ``activations`` (float, (..., H, W, C)). ``groups`` is 1 (one model), "channel" (one
    group per channel, C <= 256) or an int G (channel c in group c % G). ``reference_channel`` (C ints,
    -1 for none) makes a version 2 table whose reference index v has class min(v, R - 1), "no reference"
    class 0, with ``reference_classes`` R; so does ``levels`` above 16."""
    acts = np.asarray(activations, dtype=np.float32)
    c = acts.shape[-1]
    step = (clip_max - clip_min) / (levels - 1)
    recon = [clip_min + i * step for i in range(levels)]
    fixed = fixed_thresholds([clip_min + (i + 0.5) * step for i in range(levels - 1)], frac_bits)
    if int8_scale is None:
        int8_scale = max(clip_max - clip_min, 1e-6) / 255.0
        int8_zero_point = int(np.clip(-128 - round(clip_min / int8_scale), -128, 127))
    if groups == "channel":
        g = c
        channel_group = list(range(c))
    else:
        g = int(groups)
        channel_group = [ch % g for ch in range(c)]
    table = {
        "layout": "NHWC",
        "channels": c,
        "levels": levels,
        "quantizer": "uniform",
        "clip_min": float(clip_min),
        "clip_max": float(clip_max),
        "int8": {"scale": float(int8_scale), "zero_point": int(int8_zero_point),
                 "index_of_q": int8_lut(fixed, frac_bits, int8_scale, int8_zero_point)},
        "float_input": {"frac_bits": frac_bits, "thresholds": fixed},
        "reconstruction": [float(r) for r in recon],
        "contexts": {
            "groups": g, "classes": classes, "channel_group": channel_group,
            "neighbour_class": neighbour_class_map(levels, classes),
            "model_of_context": list(range(g * reference_classes * classes * classes)),
        },
        "models": [[1] * (levels - 1) + [(1 << 24) - levels + 1]] * (g * reference_classes * classes * classes),
    }
    if reference_channel is not None or levels > MAX_LEVELS_V1:
        table["contexts"].update(
            reference_channel=list(reference_channel) if reference_channel is not None else [-1] * c,
            reference_classes=reference_classes,
            reference_class=neighbour_class_map(levels, reference_classes))
    elif reference_classes != 1:
        raise ValueError("reference_classes needs reference_channel")
    table = finalize(table)  # a provisional table, so the device's reader gives the context rule
    proto = Tables(table)
    idx = indices_from_float_np(acts.reshape((-1,) + acts.shape[-3:]) if acts.ndim >= 3
                                else acts.reshape(1, 1, 1, c), proto)
    counts = count_contexts(idx, proto)
    table["models"] = [integer_frequencies(row) for row in counts]
    return finalize(table)
