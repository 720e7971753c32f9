"""Scalar quantizers designed on a calibration histogram: uniform, and ECSQ modified for clipped data.

A quantizer here is a set of contiguous cells of histogram bins. Cell boundaries are always bin edges
(float input: multiples of a power-of-two width; int8 input: half-way between int8 values), so the
counts, rates and squared errors computed from the histogram are exactly what the device's fixed-point
thresholds produce. Formulas: codec_spec/DESIGN-quantizer.md, sections 3 and 4.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lwfc_host.calibration import Histogram

PIN_FRACTION = 1e-3  # a clip point holding at least this fraction of the data is a "pile" (section 4)


class DesignError(ValueError):
    """A quantizer cannot be designed as asked (e.g. the clip range holds fewer bins than levels)."""


@dataclass
class Quantizer:
    """Cells (bin index ranges ``edges[j]..edges[j+1]``), thresholds, reconstruction values.

    ``thresholds[j]`` is the lowest value that maps to index j+1. ``pinned`` says whether the lowest
    and highest reconstruction values sit at the clip points. ``lam`` is the dimensionless Lagrange
    multiplier (0 for uniform); ``requested_levels`` the N asked for (ECSQ may empty cells)."""

    kind: str
    clip_min: float
    clip_max: float
    edges: np.ndarray
    thresholds: np.ndarray
    reconstruction: np.ndarray
    pinned: tuple[bool, bool]
    lam: float = 0.0
    requested_levels: int = 0
    iterations: int = 0

    @property
    def levels(self) -> int:
        return len(self.reconstruction)


def boundary_value(hist: Histogram, b: np.ndarray | int) -> np.ndarray:
    """The threshold value of a cell boundary placed before bin ``b``."""
    lower = hist.lower[b]
    return lower - 0.5 * hist.width if hist.exact_values else lower


def boundary_of(hist: Histogram, t: np.ndarray | float) -> np.ndarray:
    """Snap thresholds to the nearest cell boundary: the first bin whose centre is >= t."""
    centre = hist.lower if hist.exact_values else hist.lower + 0.5 * hist.width
    return np.searchsorted(centre, np.asarray(t, dtype=np.float64), side="left")


def snap_clip(hist: Histogram, c_min: float, c_max: float) -> tuple[float, float]:
    """Clip points on the histogram's grid (bin edges, or int8 values), c_min < c_max kept."""
    g = hist.width
    if hist.exact_values:
        base = hist.lower[0]
        lo = base + np.round((c_min - base) / g) * g
        hi = base + np.round((c_max - base) / g) * g
    else:
        lo = np.round(c_min / g) * g
        hi = np.round(c_max / g) * g
    if hi <= lo:
        hi = lo + g
    return float(lo), float(hi)


def clipped_moments(hist: Histogram, c_min: float, c_max: float, zeros: float = 0.0):
    """Per-bin (n, s1, s2) of the clipped values, and the pile masses below/at c_min and at/above c_max.

    Bins are classified by their grid position: with clip points on the grid, a bin lies entirely
    below c_min, inside [c_min, c_max), or at/above c_max. ``zeros`` (exact zero count) joins the lower
    pile when c_min is 0 (after ReLU the zeros sit exactly on the clip point)."""
    n = hist.count
    if hist.exact_values:
        below = hist.lower < c_min - 1e-12 * abs(c_min or 1)
        above = hist.lower > c_max + 1e-12 * abs(c_max or 1)
        at_lo = np.isclose(hist.lower, c_min, rtol=0, atol=hist.width * 1e-6)
        at_hi = np.isclose(hist.lower, c_max, rtol=0, atol=hist.width * 1e-6)
    else:
        below = hist.lower + hist.width <= c_min
        above = hist.lower >= c_max
        at_lo = at_hi = np.zeros_like(below)
    s1 = np.where(below, n * c_min, np.where(above, n * c_max, hist.s1))
    s2 = np.where(below, n * c_min * c_min, np.where(above, n * c_max * c_max, hist.s2))
    pile_lo = float(n[below | at_lo].sum())
    pile_hi = float(n[above | at_hi].sum())
    if not hist.exact_values and c_min == 0.0:
        pile_lo += zeros
    return n, s1, s2, pile_lo, pile_hi


def _cells(c: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Sums of per-bin quantity ``c`` over cells (last axis)."""
    cum = np.concatenate([np.zeros(c.shape[:-1] + (1,)), np.cumsum(c, axis=-1)], axis=-1)
    return np.diff(cum[..., edges], axis=-1)


def _finish(kind, hist, c_min, c_max, edges, n, s1, pins, lam=0.0, requested=0, iterations=0) -> Quantizer:
    """Reconstruction = centroid of the clipped values in each cell, ends pinned where piles sit."""
    cn = _cells(n, edges)
    cs = _cells(s1, edges)
    with np.errstate(invalid="ignore", divide="ignore"):
        recon = np.where(cn > 0, cs / cn, 0.5 * (boundary_value(hist, edges[:-1].clip(0, len(n) - 1))
                                                 + boundary_value(hist, edges[1:].clip(0, len(n) - 1))))
    if pins[0]:
        recon[0] = c_min
    if pins[1]:
        recon[-1] = c_max
    recon = np.clip(recon, c_min, c_max)
    thresholds = boundary_value(hist, edges[1:-1])
    return Quantizer(kind, c_min, c_max, edges, np.asarray(thresholds, dtype=np.float64), recon, pins, lam,
                     requested or len(recon), iterations)


def _pins(hist: Histogram, pile_lo: float, pile_hi: float, pin: bool | None) -> tuple[bool, bool]:
    if pin is False:
        return (False, False)
    tot = hist.total
    if pin is True:
        return (True, True)
    return (pile_lo >= PIN_FRACTION * tot, pile_hi >= PIN_FRACTION * tot)


def uniform_edges(hist: Histogram, levels: int, c_min: float, c_max: float) -> np.ndarray:
    """Cell boundaries of the N-level uniform quantizer on [c_min, c_max] (thresholds at mid-points)."""
    step = (c_max - c_min) / (levels - 1)
    t = c_min + (np.arange(levels - 1) + 0.5) * step
    inner = boundary_of(hist, t)
    edges = np.concatenate([[0], inner, [len(hist.count)]]).astype(np.int64)
    if np.any(np.diff(edges[1:-1]) < 1) or inner[0] < 1 or inner[-1] >= len(hist.count):
        raise DesignError(f"the clip range [{c_min:g}, {c_max:g}] spans too few histogram bins "
                          f"(width {hist.width:g}) for {levels} levels")
    return edges


def uniform(hist: Histogram, levels: int, c_min: float, c_max: float, zeros: float = 0.0,
            pin: bool | None = None) -> Quantizer:
    """Uniform N-level quantizer over the clip range: thresholds at c_min + (j + 1/2) step, reconstruction
    at the centroids of the calibration data in each cell, the end cells pinned at the clip points when
    data pile up there."""
    if levels < 2:
        raise DesignError("a quantizer needs at least 2 levels")
    c_min, c_max = snap_clip(hist, c_min, c_max)
    edges = uniform_edges(hist, levels, c_min, c_max)
    n, s1, _, plo, phi = clipped_moments(hist, c_min, c_max, zeros)
    return _finish("uniform", hist, c_min, c_max, edges, n, s1, _pins(hist, plo, phi, pin), requested=levels)


def ecsq(hist: Histogram, levels: int, lam: float, c_min: float, c_max: float, zeros: float = 0.0,
         pin: bool | None = None, max_iter: int = 300, tol: float = 1e-10) -> Quantizer:
    """Entropy-constrained scalar quantizer (Chou, Lookabaugh and Gray 1989), modified for clipped data.

    Minimises J = D / (c_max - c_min)^2 + lam * R over thresholds and reconstruction values, where D is
    the mean squared error of the clipped values and R the entropy (bits) of the index. Iteration, from
    the uniform quantizer: (1) each bin goes to the cell minimising (v - r_j)^2 + lam' * l_j with
    l_j = -log2 p_j and lam' = lam (c_max - c_min)^2; (2) p_j = cell mass, r_j = cell centroid. Cells
    that empty are dropped. The modification: when data pile up at a clip point, that end's
    reconstruction value stays pinned at the clip point instead of drifting to the centroid."""
    if levels < 2:
        raise DesignError("a quantizer needs at least 2 levels")
    if lam < 0 or not np.isfinite(lam):
        raise DesignError("lambda must be a finite number >= 0")
    c_min, c_max = snap_clip(hist, c_min, c_max)
    n, s1, s2, plo, phi = clipped_moments(hist, c_min, c_max, zeros)
    pins = _pins(hist, plo, phi, pin)
    q = _finish("ecsq", hist, c_min, c_max, uniform_edges(hist, levels, c_min, c_max), n, s1, pins)
    scale = (c_max - c_min) ** 2
    lam_abs = lam * scale
    total = float(n.sum())
    nz = n > 0
    v = np.where(nz, s1 / np.where(nz, n, 1), np.clip(hist.value, c_min, c_max))
    edges = q.edges
    recon = q.reconstruction.copy()
    best = np.inf
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007 - the count is reported
        cn = _cells(n, edges)
        p = cn / total
        with np.errstate(divide="ignore"):
            length = np.where(p > 0, -np.log2(np.where(p > 0, p, 1)), np.inf)
        # (1) assignment: contiguous cells, because the costs are parabolas of equal curvature in v
        cost = (v[:, None] - recon[None, :]) ** 2 + lam_abs * length[None, :]
        cell = np.argmin(cost, axis=1)
        cell = np.maximum.accumulate(cell)  # guard against ties breaking monotonicity
        # cells left without data are dropped; their (empty) bins join the previous kept cell
        keep = np.bincount(cell, weights=n, minlength=len(recon)) > 0
        remap = np.maximum(np.cumsum(keep) - 1, 0)
        recon = recon[keep]
        cell = remap[cell]
        edges = np.concatenate([[0], np.flatnonzero(np.diff(cell)) + 1, [len(n)]]).astype(np.int64)
        # (2) update probabilities and centroids
        cn = _cells(n, edges)
        cs = _cells(s1, edges)
        with np.errstate(invalid="ignore", divide="ignore"):
            recon = np.where(cn > 0, cs / cn, recon)
        if pins[0]:
            recon[0] = c_min
        if pins[1]:
            recon[-1] = c_max
        p = cn / total
        rate = float(-(p[p > 0] * np.log2(p[p > 0])).sum())
        dist = float((_cells(s2, edges) - 2 * recon * cs + recon * recon * cn).sum() / total)
        j = dist / scale + lam * rate
        if best - j <= tol * max(abs(j), 1e-30):
            best = min(best, j)
            break
        best = j
    if len(recon) < 2:
        raise DesignError(f"lambda {lam:g} leaves a single cell: no information would be sent")
    return _finish("ecsq", hist, c_min, c_max, edges, n, s1, pins, lam, levels, it)


@dataclass
class Evaluation:
    """Rate and distortion of a quantizer on a histogram: ``entropy`` bits/element with one global
    model, ``mse`` against the original values, ``mse_clipped`` against the clipped ones, the cell
    ``counts`` and per-channel cell counts ``ch_counts`` (C, N)."""

    entropy: float
    mse: float
    mse_clipped: float
    counts: np.ndarray
    ch_counts: np.ndarray


def evaluate(q: Quantizer, hist: Histogram, zeros: float = 0.0) -> Evaluation:
    """Exact (for grid-aligned cells) rate and distortion of ``q`` on the histogram."""
    counts = _cells(hist.count, q.edges)
    total = counts.sum()
    p = counts / total
    ent = float(-(p[p > 0] * np.log2(p[p > 0])).sum())
    r = q.reconstruction
    s1 = _cells(hist.s1, q.edges)
    s2 = _cells(hist.s2, q.edges)
    mse = float(max((s2 - 2 * r * s1 + r * r * counts).sum(), 0.0) / total)
    n, c1, c2, _, _ = clipped_moments(hist, q.clip_min, q.clip_max, zeros)
    mse_c = float(max((_cells(c2, q.edges) - 2 * r * _cells(c1, q.edges) + r * r * counts).sum(), 0.0) / total)
    return Evaluation(ent, mse, mse_c, counts, _cells(hist.ch_count, q.edges))


def grid_mse(hist: Histogram, levels: int, c_min: float, c_max: float) -> float:
    """MSE of the textbook uniform quantizer (reconstruction on the grid c_min + j step, bins assigned by
    their mean value): the criterion of the empirical clipping search."""
    step = (c_max - c_min) / (levels - 1)
    cell = np.clip(np.floor((hist.value - c_min) / step + 0.5), 0, levels - 1)
    r = c_min + cell * step
    err = hist.s2 - 2 * r * hist.s1 + r * r * hist.count
    return float(max(err.sum(), 0.0) / hist.total)
