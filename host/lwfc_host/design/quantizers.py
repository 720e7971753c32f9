"""Scalar quantizers designed on a calibration histogram: uniform, and ECSQ modified for clipped data.

A quantizer here is a set of contiguous cells of histogram bins. Cell boundaries are always bin edges
(float input: multiples of a power-of-two width; int8 input: half-way between int8 values), so the
counts, rates and squared errors computed from the histogram are exactly what the device's fixed-point
thresholds produce. Formulas: codec_spec/DESIGN-quantizer.md, sections 3 and 4.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lwfc_host.design.calibration import Histogram

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
    at the centroids of the calibration data in each cell (of the clipped data, so a pile at a clip point
    counts at the clip point). ``pin=None`` (the default) pins nothing: centroids give the least MSE for the
    cells, and on real layers they also cost the task less than pinned ends (on the ResNet stage-2 layer
    0.3-0.5 pp of accuracy at the MSE clip, more with wider clips, where the zero cell holds many small
    positive values). ``pin=True`` or a pile rule as in ECSQ can be asked for explicitly (``_pins``)."""
    if levels < 2:
        raise DesignError("a quantizer needs at least 2 levels")
    c_min, c_max = snap_clip(hist, c_min, c_max)
    edges = uniform_edges(hist, levels, c_min, c_max)
    n, s1, _, plo, phi = clipped_moments(hist, c_min, c_max, zeros)
    pins = (False, False) if pin is None else _pins(hist, plo, phi, pin)
    return _finish("uniform", hist, c_min, c_max, edges, n, s1, pins, requested=levels)


class _Cumulative:
    """Cumulative count and first moment of the clipped data at any point t of [c_min, c_max].

    The data are the two piles (point masses at c_min and c_max) and the bins inside the clip range.
    Within a float bin the values are taken as spread evenly over the bin, so that thresholds move
    continuously during the iteration (with cells made of whole bins, Lloyd-type iterations stall once
    a threshold moves less than half a bin per step). int8 bins hold single values: no interpolation."""

    def __init__(self, hist: Histogram, c_min: float, c_max: float, zeros: float,
                 groups: tuple[np.ndarray, np.ndarray] | None = None):
        n = hist.count.copy()
        # per-group bin counts (G, B) and exact zeros per group, for the rate of channel-group models
        gn = None
        if groups is not None:
            labels, ch_zeros = groups
            g = int(labels.max()) + 1
            onehot = np.zeros((g, len(labels)))
            onehot[labels, np.arange(len(labels))] = 1.0
            gn = onehot @ hist.ch_count  # (G, B); np.add.at is ~100x slower on wide layers
            gz = np.bincount(labels, weights=np.asarray(ch_zeros, dtype=np.float64), minlength=g)
        s1 = hist.s1.copy()
        exact = hist.exact_values
        tol = 1e-9 * hist.width
        if exact:
            inside = (hist.lower > c_min + tol) & (hist.lower < c_max - tol)
            lo_mask = hist.lower <= c_min + tol
        else:
            inside = (hist.lower >= c_min - tol) & (hist.lower + hist.width <= c_max + tol)
            lo_mask = hist.lower + hist.width <= c_min + tol
        hi_mask = hist.lower >= c_max - tol
        self.pile_lo = float(n[lo_mask].sum())
        self.pile_hi = float(n[hi_mask].sum())
        if gn is not None:
            self.g_pile_lo = gn[:, lo_mask].sum(axis=1)
            self.g_pile_hi = gn[:, hi_mask].sum(axis=1)
        if not exact and c_min == 0.0 and zeros:  # the exact zeros sit on the clip point: they join the pile
            b0 = int(np.flatnonzero(np.isclose(hist.lower, 0.0, atol=tol))[0])
            n[b0] -= zeros
            self.pile_lo += zeros
            if gn is not None:
                gn[:, b0] = np.maximum(gn[:, b0] - gz, 0.0)
                self.g_pile_lo = self.g_pile_lo + gz
        self.gn = gn[:, inside] if gn is not None else None
        if gn is not None:
            self.g_c0 = np.concatenate([np.zeros((gn.shape[0], 1)), np.cumsum(self.gn, axis=1)], axis=1)
            self.g_total = self.g_pile_lo + self.g_c0[:, -1] + self.g_pile_hi
        self.exact = exact
        self.lower = hist.lower[inside]
        self.width = hist.width
        self.n = np.maximum(n[inside], 0.0)
        self.s1 = np.where(self.n > 0, s1[inside], 0.0)
        self.mean = np.where(self.n > 0, self.s1 / np.where(self.n > 0, self.n, 1), self.lower + 0.5 * self.width)
        self.c0 = np.concatenate([[0.0], np.cumsum(self.n)])
        self.c1 = np.concatenate([[0.0], np.cumsum(self.s1)])
        self.c_min, self.c_max = c_min, c_max
        self.total = float(self.n.sum() + self.pile_lo + self.pile_hi)

    def at(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(count, sum) of the clipped values below t (t inside (c_min, c_max)), piles included."""
        t = np.asarray(t, dtype=np.float64)
        if self.exact:
            k = np.searchsorted(self.lower, t, side="left")
            return self.pile_lo + self.c0[k], self.pile_lo * self.c_min + self.c1[k]
        k = np.clip(np.searchsorted(self.lower, t, side="right") - 1, 0, max(len(self.lower) - 1, 0))
        if len(self.lower) == 0:
            return np.full_like(t, self.pile_lo), np.full_like(t, self.pile_lo * self.c_min)
        f = np.clip((t - self.lower[k]) / self.width, 0.0, 1.0)
        part_n = f * self.n[k]
        part_s = part_n * (self.mean[k] - (1 - f) * 0.5 * self.width)
        return (self.pile_lo + self.c0[k] + part_n, self.pile_lo * self.c_min + self.c1[k] + part_s)

    def group_at(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-group counts below each t, (G, len(t)), and the groups' shares of the density at each t."""
        t = np.asarray(t, dtype=np.float64)
        if len(self.lower) == 0:
            below = np.repeat(self.g_pile_lo[:, None], len(t), axis=1)
            return below, np.full_like(below, 1.0 / len(self.g_pile_lo))
        if self.exact:
            k = np.searchsorted(self.lower, t, side="left")
            below = self.g_pile_lo[:, None] + self.g_c0[:, k]
            near = self.gn[:, np.clip(k - 1, 0, len(self.lower) - 1)] + self.gn[:, np.clip(k, 0, len(self.lower) - 1)]
        else:
            k = np.clip(np.searchsorted(self.lower, t, side="right") - 1, 0, len(self.lower) - 1)
            f = np.clip((t - self.lower[k]) / self.width, 0.0, 1.0)
            below = self.g_pile_lo[:, None] + self.g_c0[:, k] + f * self.gn[:, k]
            # shares over a window of bins: smoother in t than one bin's counts
            lo_k = np.clip(k - 8, 0, len(self.lower))
            hi_k = np.clip(k + 9, 0, len(self.lower))
            near = self.g_c0[:, hi_k] - self.g_c0[:, lo_k]
        tot = near.sum(axis=0, keepdims=True)
        share = np.where(tot > 0, near / np.where(tot > 0, tot, 1), (self.g_total / self.g_total.sum())[:, None])
        return below, share


def ecsq(hist: Histogram, levels: int, lam: float, c_min: float, c_max: float, zeros: float = 0.0,
         pin: bool | None = None, max_iter: int = 3000, tol: float = 1e-7,
         groups: tuple[np.ndarray, np.ndarray] | None = None) -> Quantizer:
    """Entropy-constrained scalar quantizer (Chou, Lookabaugh and Gray 1989), modified for clipped data.

    Minimises J = D / (c_max - c_min)^2 + lam * R over thresholds and reconstruction values, where D is
    the mean squared error of the clipped values and R the entropy (bits) of the index. Iteration, from
    the uniform quantizer: (1) with r_j and l_j = -log2 p_j fixed, the best threshold between cells j
    and j+1 is t_j = (r_j + r_{j+1}) / 2 + lam' (l_{j+1} - l_j) / (2 (r_{j+1} - r_j)),
    lam' = lam (c_max - c_min)^2; (2) with the thresholds fixed, p_j = cell mass and r_j = cell centroid.
    Cells squeezed to nothing are dropped. The modification: when data pile up at a clip point, that
    end's reconstruction value stays pinned at the clip point instead of drifting to the centroid. The
    thresholds are finally snapped to the histogram's grid and the centroids recomputed there.

    ``groups`` = (channel -> group labels, per-channel zero counts): R is then the rate the coder pays
    with one model per channel group, R = -sum_g sum_j p_gj log2 q_gj (q_g: group g's smoothed index
    distribution), and l_{j+1} - l_j in step (1) becomes the average over groups weighted by each
    group's share of the data density at the threshold (the thresholds are shared by all channels)."""
    if levels < 2:
        raise DesignError("a quantizer needs at least 2 levels")
    if lam < 0 or not np.isfinite(lam):
        raise DesignError("lambda must be a finite number >= 0")
    c_min, c_max = snap_clip(hist, c_min, c_max)
    n, s1, _, plo, phi = clipped_moments(hist, c_min, c_max, zeros)
    pins = _pins(hist, plo, phi, pin)
    cum = _Cumulative(hist, c_min, c_max, zeros, groups)
    span = c_max - c_min
    lam_abs = lam * span * span
    step = span / (levels - 1)
    t = c_min + (np.arange(levels - 1) + 0.5) * step  # the uniform quantizer's thresholds
    alpha, last_step = 1.0, None
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007 - the count is reported
        bounds_n, bounds_s = cum.at(t)
        cn = np.diff(np.concatenate([[0.0], bounds_n, [cum.total]]))
        cs = np.diff(np.concatenate([[0.0], bounds_s, [cum.pile_lo * c_min + cum.c1[-1] + cum.pile_hi * c_max]]))
        keep = cn > 1e-12 * cum.total
        if not keep.all():  # drop emptied cells: cell j loses its upper threshold (the last cell its lower)
            if keep.sum() < 2:
                raise DesignError(f"lambda {lam:g} leaves a single cell: no information would be sent")
            t = np.delete(t, sorted({min(int(j), len(t) - 1) for j in np.flatnonzero(~keep)}))
            continue
        r = _centroids(cn, cs, t, c_min, c_max, pins)
        gap = np.maximum(np.diff(r), 1e-12 * span)
        dlen = _length_steps(cum, cn, t, groups is not None)
        new_t = 0.5 * (r[:-1] + r[1:]) + lam_abs * dlen / (2 * gap)
        new_t = np.clip(new_t, c_min, c_max)
        # a threshold overtaking its neighbour empties the cell between them: drop that cell
        if np.any(np.diff(new_t) <= 0) or new_t[0] <= c_min or new_t[-1] >= c_max:
            ok = np.concatenate([[new_t[0] > c_min], np.diff(new_t) > 0])
            ok &= new_t < c_max
            new_t = new_t[ok]
            if len(new_t) == 0:
                raise DesignError(f"lambda {lam:g} leaves a single cell: no information would be sent")
            new_t = np.maximum.accumulate(new_t)
            t = np.unique(new_t)
            continue
        if len(new_t) != len(t):
            t = new_t
            alpha, last_step = 1.0, None
            continue
        # damping: a step pointing against the previous one means the iteration cycles (with group
        # models the shares at a threshold change from bin to bin); halve the step until it settles
        step_t = new_t - t
        if last_step is not None and len(last_step) == len(step_t) and float(step_t @ last_step) < 0:
            alpha = max(alpha * 0.5, 1.0 / 256)
        last_step = step_t
        t = t + alpha * step_t
        moved = float(np.max(np.abs(step_t))) * alpha
        # converged; or cycling around a bin boundary with steps far below the grid's resolution
        if moved < tol * span or (alpha <= 1.0 / 64 and moved < 0.05 * hist.width):
            break
    edges = _snap_to_grid(hist, t, n, lam)
    return _finish("ecsq", hist, c_min, c_max, edges, n, s1, pins, lam, levels, it)


def _centroids(cn: np.ndarray, cs: np.ndarray, t: np.ndarray, c_min: float, c_max: float,
               pins: tuple[bool, bool]) -> np.ndarray:
    """ECSQ step (2): reconstruction values = cell centroids (cell mid-points for empty cells), with the
    pinned ends at the clip points."""
    lo_edge = np.concatenate([[c_min], t])
    hi_edge = np.concatenate([t, [c_max]])
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(cn > 0, cs / cn, 0.5 * (lo_edge + hi_edge))
    if pins[0]:
        r[0] = c_min
    if pins[1]:
        r[-1] = c_max
    return r


def _length_steps(cum: _Cumulative, cn: np.ndarray, t: np.ndarray, grouped: bool) -> np.ndarray:
    """l_{j+1} - l_j for each threshold t_j: code-length differences between neighbouring cells, of one
    global model, or (``grouped``) of the channel-group models weighted by each group's share of the data
    density at the threshold."""
    if not grouped:
        p = np.maximum(cn / cum.total, 1e-300)
        return np.diff(-np.log2(p))
    below, share = cum.group_at(t)
    gcn = np.diff(np.concatenate([np.zeros((below.shape[0], 1)), below, cum.g_total[:, None]], axis=1), axis=1)
    gcn = np.maximum(gcn, 0.0)
    q = (gcn + 0.5) / (gcn + 0.5).sum(axis=1, keepdims=True)  # as the integer models will smooth
    return (share * np.diff(-np.log2(q), axis=1)).sum(axis=0)


def _snap_to_grid(hist: Histogram, t: np.ndarray, n: np.ndarray, lam: float) -> np.ndarray:
    """Cell edges (bin indices) for thresholds ``t`` snapped to the histogram's grid; thresholds landing on
    the same boundary merge their cells, and a cell left without calibration data merges into its neighbour."""
    inner = np.unique(boundary_of(hist, t))
    inner = inner[(inner > 0) & (inner < len(n))]
    if len(inner) == 0:
        raise DesignError(f"lambda {lam:g} leaves a single cell: no information would be sent")
    edges = np.concatenate([[0], inner, [len(n)]]).astype(np.int64)
    cn = _cells(n, edges)
    if np.any(cn <= 0):
        keep = np.concatenate([[True], cn[1:] > 0])
        edges = np.concatenate([edges[:-1][keep], [len(n)]])
    return edges


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
