"""Quantizer design end to end: clip range, quantizer, entropy models, table file, rate targeting.

``design`` builds one table from calibration statistics (``finish_design`` for a quantizer designed
elsewhere); ``rd_point`` and ``equal_rate_ecsq`` give rate-distortion points (the ``--report``,
``rd_report``; the evaluation). Rate targeting is ``rate_target``. Formulas: codec_spec/DESIGN-quantizer.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from lwfc.frame import CRC_SIZE, HEADER_SIZE
from lwfc.tables import MAX_GROUPS, MAX_LEVELS, Tables
from lwfc_host.codec.fast import context_ids, indices_from_float_np
from lwfc_host.design import entropy_models as em
from lwfc_host.design.calibration import Histogram, LoadedStats
from lwfc_host.design.clipping import ClipChoice, choose_clip
from lwfc_host.design.quantizers import DesignError, Evaluation, Quantizer, ecsq, evaluate, uniform
from lwfc_host.design.tablefile import finalize, integer_frequencies
from lwfc_host.design.tablegen import int8_lut, neighbour_class_map

# Besides its payload a frame carries a 22-byte header, a 4-byte CRC and, on average, about 2 bytes of
# range-coder flush (the partly used last 32-bit word); measured on real frames (tests/test_design_rate.py).
FLUSH_BYTES = 2


@dataclass
class Design:
    """A designed table and what it was designed from / measured to do on the calibration data."""

    table: dict
    quantizer: Quantizer
    clip: ClipChoice
    groups: em.GroupChoice | None
    classes: int
    entropy_one_model: float  # bits/element, ideal, one model for all channels
    model_bits_per_element: float  # bits/element of the payload with the table's integer models
    overhead_bits_per_element: float  # frame header, CRC and flush, per element
    mse: float
    mse_clipped: float
    notes: list[str] = field(default_factory=list)

    @property
    def coded_bits_per_element(self) -> float:
        """Estimated coded rate: model bits plus the frame overhead (what ``lwfc encode`` would give)."""
        return self.model_bits_per_element + self.overhead_bits_per_element


def zeros_of(stats: LoadedStats) -> float:
    """Exact number of zero activations (float input: they matter for the pile at c_min = 0)."""
    return float(stats.arrays["ch_zeros"].sum())


def overhead_bits(stats: LoadedStats) -> float:
    h, w, c = stats.shape
    return 8.0 * (HEADER_SIZE + CRC_SIZE + FLUSH_BYTES) / (h * w * c)


def frac_bits_for(hist: Histogram, values: list[float]) -> tuple[int, list[str]]:
    """Fixed-point fraction bits: as many as fit int32 for every threshold (at most 24), and at least
    enough to represent the histogram's power-of-two bin edges exactly (so device = design)."""
    notes = []
    big = max([abs(v) for v in values] + [1e-30])
    f = min(24, 30 - max(math.ceil(math.log2(big)), 0))
    if not hist.exact_values:
        need = -int(round(math.log2(hist.width)))
        if need > f:
            notes.append(f"thresholds rounded to 2^-{f}: the histogram resolves 2^-{need}")
    return max(f, 0), notes


def quantizer_indices(x: np.ndarray, table: dict) -> np.ndarray:
    """Index array of float activations under a (finalized) table, by the device's fixed-point rule."""
    return indices_from_float_np(x, Tables(table)).astype(np.uint8)


def design_quantizer(stats: LoadedStats, levels: int, kind: str = "uniform", lam: float = 0.0,
                     clip: str | ClipChoice = "mse", pin: bool | None = None,
                     labels: np.ndarray | None = None) -> tuple[Quantizer, ClipChoice]:
    """Clip range (method 'model' or 'mse', or a given ClipChoice) and the quantizer on it. With
    channel-group ``labels``, ECSQ counts the rate of one model per group (quantizers.ecsq)."""
    if not 2 <= levels <= MAX_LEVELS:
        raise DesignError(f"levels must be in 2..{MAX_LEVELS}, got {levels}")
    hist = stats.histogram()
    zeros = zeros_of(stats)
    choice = clip if isinstance(clip, ClipChoice) else choose_clip(hist, levels, clip, zeros)
    if kind == "uniform":
        q = uniform(hist, levels, choice.c_min, choice.c_max, zeros, pin)
    elif kind == "ecsq":
        grp = None
        if labels is not None and int(labels.max()) > 0:
            grp = (labels, stats.arrays["ch_zeros"])
        q = ecsq(hist, levels, lam, choice.c_min, choice.c_max, zeros, pin, groups=grp)
    else:
        raise DesignError(f"unknown quantizer {kind!r} (uniform or ecsq)")
    return q, choice


def _int8_params(stats: LoadedStats, q: Quantizer, scale: float | None, zp: int | None,
                 notes: list[str]) -> tuple[float, int]:
    if stats.kind == "int8":
        s_scale, s_zp = stats.int8
        if scale is not None and (abs(scale - s_scale) > 1e-9 * s_scale or zp != s_zp):
            raise DesignError(f"--int8-scale/--int8-zero-point {scale}, {zp} differ from the calibration data's "
                              f"{s_scale}, {s_zp}")
        return s_scale, s_zp
    if scale is not None:
        if zp is None or not -128 <= zp <= 127 or not scale > 0:
            raise DesignError("give --int8-scale > 0 together with --int8-zero-point in -128..127")
        return float(scale), int(zp)
    s = max(q.clip_max - q.clip_min, 1e-6) / 255.0
    z = int(np.clip(-128 - round(q.clip_min / s), -128, 127))
    notes.append(f"no int8 parameters given: index_of_q assumes scale {s:.6g}, zero point {z} "
                 "(the clip range over 256 steps); pass the edge model's --int8-scale/--int8-zero-point")
    return s, z


def _base_table(stats: LoadedStats, q: Quantizer, int8: tuple[float, int], frac_bits: int, groups: int,
                labels: np.ndarray, classes: int) -> dict:
    fixed = [int(math.ceil(t * (1 << frac_bits))) for t in q.thresholds]
    c = stats.channels
    n = q.levels
    return {
        "layout": "NHWC",
        "channels": c,
        "levels": n,
        "quantizer": q.kind,
        "clip_min": float(q.clip_min),
        "clip_max": float(q.clip_max),
        "int8": {"scale": float(int8[0]), "zero_point": int(int8[1]),
                 "index_of_q": int8_lut(fixed, frac_bits, int8[0], int8[1])},
        "float_input": {"frac_bits": frac_bits, "thresholds": fixed},
        "reconstruction": [float(r) for r in q.reconstruction],
        "contexts": {
            "groups": groups, "classes": classes, "channel_group": [int(v) for v in labels],
            "neighbour_class": neighbour_class_map(n, classes),
            "model_of_context": list(range(groups * classes * classes)),
        },
        "models": [[1] * (n - 1) + [(1 << 24) - n + 1]] * (groups * classes * classes),
    }


def sample_indices(stats: LoadedStats, table: dict) -> np.ndarray:
    """Indices (B, H, W, C) of the reservoir tensors under ``table``, exactly as the device computes them."""
    t = Tables(table)
    q8 = stats.reservoir_int8()
    if q8 is not None:
        lut = np.asarray(t.index_of_q, dtype=np.uint8)
        return lut[q8.astype(np.int64) + 128]
    return indices_from_float_np(stats.reservoir_float(), t).astype(np.uint8)


def design(stats: LoadedStats, levels: int, kind: str = "uniform", lam: float = 0.0, clip: str | ClipChoice = "mse",
           groups: int | str = 1, classes: int | str = 1, int8_scale: float | None = None,
           int8_zero_point: int | None = None, pin: bool | None = None, amortise: float = 1.0) -> Design:
    """Design one table: clip range, quantizer, channel groups and entropy models.

    ECSQ with channel groups alternates once: channels are grouped on the uniform quantizer with the same
    levels and clip range, ECSQ is designed for the rate of those group models, then the channels are
    grouped again for the final models."""
    labels = None
    if kind == "ecsq" and groups != 1:
        qu, clip = design_quantizer(stats, levels, "uniform", 0.0, clip, pin)
        ev = evaluate(qu, stats.histogram(), zeros_of(stats))
        g = groups if groups == "auto" else min(int(groups), min(stats.channels, MAX_GROUPS))
        labels = em.choose_groups(ev.ch_counts, g, amortise).labels
    q, choice = design_quantizer(stats, levels, kind, lam, clip, pin, labels)
    return finish_design(stats, q, choice, groups, classes, int8_scale, int8_zero_point, amortise)


def finish_design(stats: LoadedStats, q: Quantizer, choice: ClipChoice, groups: int | str = 1,
                  classes: int | str = 1,
                  int8_scale: float | None = None, int8_zero_point: int | None = None,
                  amortise: float = 1.0) -> Design:
    """Entropy models and the table file for a designed quantizer."""
    hist = stats.histogram()
    notes = list(choice.notes)
    if q.kind == "ecsq" and q.levels < q.requested_levels:
        notes.append(f"ECSQ at lambda {q.lam:g} emptied {q.requested_levels - q.levels} of {q.requested_levels} "
                     f"cells: the table has {q.levels} levels")
    n = q.levels
    c = stats.channels
    auto_ctx = classes == "auto"  # context design: classes, class map, merged models (design/contexts.py)
    if auto_ctx:
        classes = 1
    if classes < 1 or classes * classes * n > 256:
        raise DesignError(f"classes K must be >= 1 with K*K*levels <= 256 (levels {n}), got {classes}")
    gmax = min(c, MAX_GROUPS)
    if groups != "auto" and not 1 <= int(groups) <= gmax:
        if int(groups) > gmax:
            notes.append(f"--groups {groups} exceeds min(C, {MAX_GROUPS}) = {gmax}: using {gmax}")
            groups = gmax
        else:
            raise DesignError(f"--groups must be >= 1, got {groups}")
    ev = evaluate(q, hist, zeros_of(stats))
    gc = em.choose_groups(ev.ch_counts, groups, amortise)
    int8 = _int8_params(stats, q, int8_scale, int8_zero_point, notes)
    frac_bits, fnotes = frac_bits_for(hist, [q.clip_min, q.clip_max] + list(q.thresholds))
    notes += fnotes
    table = finalize(_base_table(stats, q, int8, frac_bits, gc.groups, gc.labels, classes))
    proto = Tables(table)
    elements = hist.total
    if classes == 1:
        # the group of each channel by the spec's rule (lwfc_host.codec.fast.context_ids with K = 1)
        ctx = np.asarray(context_ids(None, None, np.arange(c), proto))
        counts = np.zeros((gc.groups, n))
        np.add.at(counts, ctx, ev.ch_counts)
        bits = em.coded_bits(counts)
        model_counts = counts
    else:
        idx = sample_indices(stats, table)
        model_counts = em.count_contexts(idx, proto)
        bits = em.coded_bits(model_counts) * elements / idx.size  # measured on the sample, scaled up
        notes.append(f"neighbour contexts counted on {idx.shape[0]} sampled tensors")
    table["models"] = [integer_frequencies(row) for row in model_counts]
    ctx_info = None
    if auto_ctx:
        from lwfc_host.design import contexts as cdz
        idx = sample_indices(stats, table)
        cd = cdz.design_contexts(idx, n, "auto", groups, amortise, extra_groups=(gc.groups,),
                                 labels_of={gc.groups: gc.labels})
        table = finalize(cdz.apply_to_table(table, cd))
        classes = cd.classes
        gc = em.GroupChoice(np.asarray(cd.labels), cd.groups, gc.data_bits, cd.side_bits, gc.tried)
        model_counts = cd.model_counts
        bits = em.coded_bits(model_counts) * elements / idx.size
        ctx_info = {"groups": cd.groups, "classes": cd.classes, "models": cd.models,
                    "neighbour_class": cd.neighbour_class, "heldout_bits_per_element": cd.heldout_bits,
                    "side_bits": cd.side_bits, "candidates": len(cd.tried)}
        notes.append(f"context design: G={cd.groups}, K={cd.classes} (class map {cd.neighbour_class}), "
                     f"{cd.models} models for {len(cd.model_of_context)} contexts; held-out payload "
                     f"{cd.heldout_bits:.4f} bits/element over {len(cd.tried)} (G, K) candidates")
    p = ev.counts / ev.counts.sum()
    ent = float(-(p[p > 0] * np.log2(p[p > 0])).sum())
    # informative (SPEC.md 3.1): how the table was made and what it did on the calibration data
    table["design"] = {
        "tool": "lwfc design", "quantizer": q.kind, "lambda": float(q.lam), "requested_levels": q.requested_levels,
        "clip_method": choice.method, "pinned": [bool(v) for v in q.pinned], "groups_chosen": gc.groups,
        "calibration_tensors": stats.tensors, "shape": list(stats.shape),
        "mse": float(ev.mse), "payload_bits_per_element": float(bits / elements),
        "entropy_one_model": ent,
    }
    if ctx_info is not None:
        table["design"]["context_design"] = ctx_info
    table = finalize(table)
    return Design(table, q, choice, gc, classes, ent, bits / elements, overhead_bits(stats), ev.mse, ev.mse_clipped,
                  notes)


def measure_coded_rate(stats: LoadedStats, table: dict, limit: int | None = None) -> tuple[float, float, int]:
    """Encode the reservoir tensors with the device encoder. Returns (real bits/element of the frames,
    bits/element the table's models promise for the same tensors plus the estimated frame overhead,
    number of tensors)."""
    from lwfc.encoder import Encoder

    t = Tables(table)
    idx = sample_indices(stats, table)[:limit]
    enc = Encoder(t)
    real = sum(len(enc.encode_indices(x.tobytes(), x.shape[0], x.shape[1])) for x in idx)
    counts = em.count_contexts(idx, t)
    lengths = -np.log2(np.asarray(t.models, dtype=np.float64) / (1 << 24))
    promised = float((counts * lengths[np.asarray(t.model_of_context)]).sum())
    return 8.0 * real / idx.size, promised / idx.size + overhead_bits(stats), int(idx.shape[0])


# ---- rate of channel-group models --------------------------------------------------------------------------
def rate_with_groups(ev: Evaluation, labels: np.ndarray, groups: int, overhead: float) -> float:
    """Bits/element of the cell counts of ``ev`` coded with one integer model per channel group (channel
    -> group ``labels``), plus ``overhead`` bits/element."""
    counts = np.zeros((groups, ev.ch_counts.shape[1]))
    np.add.at(counts, labels, ev.ch_counts)
    return em.coded_bits(counts) / ev.counts.sum() + overhead


# ---- rate-distortion report --------------------------------------------------------------------------------------
@dataclass
class RDPoint:
    """One point of the rate-distortion report."""

    kind: str
    levels: int
    lam: float
    entropy: float  # bits/element, one ideal global model, no overhead
    grouped: float  # bits/element with channel-group integer models (G chosen automatically), no overhead
    groups: int
    mse: float
    labels: np.ndarray | None = None


def rd_point(stats: LoadedStats, q: Quantizer, groups: int | str = "auto") -> RDPoint:
    """Rate (one model, and channel groups) and MSE of a quantizer on the calibration data."""
    hist = stats.histogram()
    ev = evaluate(q, hist, zeros_of(stats))
    gc = em.choose_groups(ev.ch_counts, groups)
    one = em.coded_bits(ev.counts) / ev.counts.sum()
    return RDPoint(q.kind, q.levels, q.lam, one, gc.data_bits / ev.counts.sum(), gc.groups, ev.mse, gc.labels)


def equal_rate_ecsq(stats: LoadedStats, levels: int, clip: ClipChoice, rate: float,
                    labels: np.ndarray | None = None) -> Quantizer | None:
    """ECSQ with ``levels`` levels whose rate equals ``rate`` (bisection on lambda): the one-model entropy,
    or with ``labels`` the payload bits/element of channel-group integer models (grouping fixed). Returns
    the lambda = 0 design when even that codes below ``rate``."""
    hist = stats.histogram()
    zeros = zeros_of(stats)

    def rate_of(q):
        e = evaluate(q, hist, zeros)
        if labels is None:
            return e.entropy
        return rate_with_groups(e, labels, int(labels.max()) + 1, 0.0)

    grp = (labels, stats.arrays["ch_zeros"]) if labels is not None and int(labels.max()) > 0 else None
    q0 = ecsq(hist, levels, 0.0, clip.c_min, clip.c_max, zeros, groups=grp)
    if rate_of(q0) <= rate:
        return q0
    a, b = -10.0, 1.0
    best = q0
    for _ in range(40):
        m = 0.5 * (a + b)
        try:
            q = ecsq(hist, levels, 10.0 ** m, clip.c_min, clip.c_max, zeros, groups=grp)
        except DesignError:
            b = m
            continue
        r = rate_of(q)
        if r > rate:
            a = m
        else:
            b = m
            best = q
        if abs(r - rate) < 1e-4 * rate:
            return q
    return best
