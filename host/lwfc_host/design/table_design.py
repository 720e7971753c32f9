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
from lwfc.tables import MAX_GROUPS, MAX_LEVELS, MAX_LEVELS_V1, Tables
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
    context: object | None = None  # contexts.ContextDesign of a context design (classes 'auto')

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


def check_levels(levels: int, spec_version: int | str = "auto") -> None:
    """2..64 levels (version 2 tables), 2..16 with ``spec_version`` 1."""
    top = MAX_LEVELS_V1 if spec_version in (1, "1") else MAX_LEVELS
    if not 2 <= levels <= top:
        more = f" (more than {MAX_LEVELS_V1} need spec version 2)" if top == MAX_LEVELS_V1 and levels > top else ""
        raise DesignError(f"levels must be in 2..{top}, got {levels}{more}")


def design_quantizer(stats: LoadedStats, levels: int, kind: str = "uniform", lam: float = 0.0,
                     clip: str | ClipChoice = "mse", pin: bool | None = None,
                     labels: np.ndarray | None = None) -> tuple[Quantizer, ClipChoice]:
    """Clip range (method 'model' or 'mse', or a given ClipChoice) and the quantizer on it. With
    channel-group ``labels``, ECSQ counts the rate of one model per group (quantizers.ecsq)."""
    check_levels(levels)
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
           int8_zero_point: int | None = None, pin: bool | None = None, amortise: float = 1.0,
           spec_version: int | str = "auto") -> Design:
    """Design one table: clip range, quantizer, channel groups and entropy models.

    ECSQ with channel groups alternates once: channels are grouped on the uniform quantizer with the same
    levels and clip range, ECSQ is designed for the rate of those group models, then the channels are
    grouped again for the final models. ``spec_version``: see ``finish_design``."""
    check_levels(levels, spec_version)
    labels = None
    if kind == "ecsq" and groups != 1:
        qu, clip = design_quantizer(stats, levels, "uniform", 0.0, clip, pin)
        ev = evaluate(qu, stats.histogram(), zeros_of(stats))
        g = groups if groups == "auto" else min(int(groups), min(stats.channels, MAX_GROUPS))
        labels = em.choose_groups(ev.ch_counts, g, amortise).labels
    q, choice = design_quantizer(stats, levels, kind, lam, clip, pin, labels)
    return finish_design(stats, q, choice, groups, classes, int8_scale, int8_zero_point, amortise, spec_version)


def finish_design(stats: LoadedStats, q: Quantizer, choice: ClipChoice, groups: int | str = 1,
                  classes: int | str = 1,
                  int8_scale: float | None = None, int8_zero_point: int | None = None,
                  amortise: float = 1.0, spec_version: int | str = "auto") -> Design:
    """Entropy models and the table file for a designed quantizer.

    ``spec_version``: 1 writes a version 1 table (at most 16 levels, K*K*levels <= 256, no reference
    channels); 2 a version 2 table; 'auto' version 2 only where it is needed (more than 16 levels, or a given
    K beyond version 1's limit) or, with ``classes`` 'auto', where its features (reference channels, more
    neighbour classes) code the held-out calibration tensors in fewer bits (``contexts.design_contexts``)."""
    from lwfc_host.design.contexts import check_spec_version

    try:
        spec_version = check_spec_version(spec_version)
    except ValueError as exc:
        raise DesignError(str(exc)) from None
    check_levels(q.levels, spec_version)
    version = {1: 1, 2: 2}.get(spec_version)  # the table version asked for (None: as the table needs)
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
    if classes < 1 or (classes * classes * n > 256 and (spec_version == 1 or classes > 16)):
        v2 = "" if spec_version == 1 else ", or K <= 16 in a version 2 table"
        raise DesignError(f"classes K must be >= 1 with K*K*levels <= 256{v2} (levels {n}), got {classes}")
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
    table = finalize(_base_table(stats, q, int8, frac_bits, gc.groups, gc.labels, classes), version)
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
    cd = None
    if auto_ctx:
        from lwfc_host.design import contexts as cdz
        idx = sample_indices(stats, table)
        try:
            cd = cdz.design_contexts(idx, n, "auto", groups, amortise, extra_groups=(gc.groups,),
                                     labels_of={gc.groups: gc.labels}, spec_version=spec_version)
        except ValueError as exc:
            raise DesignError(str(exc)) from None
        table = finalize(cdz.apply_to_table(table, cd), version)
        classes = cd.classes
        gc = em.GroupChoice(np.asarray(cd.labels), cd.groups, gc.data_bits, cd.side_bits, gc.tried)
        model_counts = cd.model_counts
        bits = em.coded_bits(model_counts) * elements / idx.size
        ctx_info = context_summary(cd)
        notes.append(f"context design: G={cd.groups}, K={cd.classes} (class map {cd.neighbour_class}), "
                     f"{cd.models} models for {len(cd.model_of_context)} contexts; held-out payload "
                     f"{cd.heldout_bits:.4f} bits/element over {len(cd.tried)} candidates")
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
    table = finalize(table, version)
    return Design(table, q, choice, gc, classes, ent, bits / elements, overhead_bits(stats), ev.mse, ev.mse_clipped,
                  notes, cd)


def context_summary(cd) -> dict:
    """The informative ``design.context_design`` entry of a table: the chosen contexts, and the held-out
    payload bits of the best designs with and without reference channels (and of the best version 1 one)."""
    alt = cd.alternatives
    info = {"groups": cd.groups, "classes": cd.classes, "models": cd.models,
            "neighbour_class": cd.neighbour_class, "heldout_bits_per_element": cd.heldout_bits,
            "side_bits": cd.side_bits, "candidates": len(cd.tried), "table_version": cd.version,
            "references_used": cd.dependent_channels > 0, "dependent_channels": cd.dependent_channels,
            "reference_channels": cd.reference_bases, "reference_classes": cd.reference_classes}
    for key, name in (("heldout_bits_with_references", "references"),
                      ("heldout_bits_without_references", "no references"), ("heldout_bits_v1", "v1")):
        info[key] = float(alt[name]["heldout_bits"]) if name in alt else None
    return info


def reference_note(info: dict) -> str:
    """One line on reference channels: used or not, dependent channels, held-out bits with and without."""
    with_, without, v1 = (info.get("heldout_bits_with_references"), info.get("heldout_bits_without_references"),
                          info.get("heldout_bits_v1"))
    v1_text = f"; best version 1 design {v1:.4f}" if v1 is not None and v1 != without else ""
    if info.get("references_used"):
        return (f"reference channels used (table version {info['table_version']}): {info['dependent_channels']} "
                f"dependent channels on {info['reference_channels']} reference channels, "
                f"{info['reference_classes']} reference classes; held-out payload {with_:.4f} bits/element with "
                f"references, {without:.4f} without{v1_text}")
    if with_ is None:
        return (f"reference channels not tried (table version {info['table_version']}); held-out payload "
                f"{without:.4f} bits/element without{v1_text}")
    return (f"reference channels not used (table version {info['table_version']}): held-out payload "
            f"{without:.4f} bits/element without, {with_:.4f} with the best reference design{v1_text}")


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
