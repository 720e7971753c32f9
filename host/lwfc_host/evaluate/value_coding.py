"""Value-domain coding estimates for ``coding_modes``: closed-loop DPCM and the integer LeGall 5/3 wavelet.

Both return (mean squared error against the float features, held-out bits per element) at one step; both
reconstruct exactly as a decoder would (closed loop: predictions from reconstructed values; the wavelet's
integer inverse on the dequantized coefficients), so the distortion is what a receiver gets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from lwfc_host.evaluate.code_lengths import GROUPS, heldout_bits, kt_probabilities, median_edge, neighbour

GRID = 255  # the wavelet's integer grid over [c_min, c_max]: the int8 edge output's resolution


def _magnitude_context(q: np.ndarray) -> np.ndarray:
    """0..4: the magnitudes of the left and above symbols of the same plane, added and capped."""
    return np.minimum(np.abs(neighbour(q, 0, 1)) + np.abs(neighbour(q, 1, 0)), 4)


def _signed_symbols(q: np.ndarray) -> tuple[np.ndarray, int]:
    """Signed integers -> 0..n-1 symbols and n."""
    top = int(np.abs(q).max())
    return q + top, 2 * top + 1


def dpcm(x: np.ndarray, c_min: float, c_max: float, step: float, fit: np.ndarray,
         groups: np.ndarray) -> tuple[float, float]:
    """Closed-loop DPCM in raster order: predict each value by the median edge predictor of the reconstructed
    left, above and above-left values, quantize the residual by ``step`` (mid-tread), reconstruct within the
    clip range. Context of a residual index: the channel's group and the left/above residual magnitudes."""
    b, h, w, c = x.shape
    v = np.clip(x, c_min, c_max).astype(np.float64)
    rec = np.full((b, h + 1, w + 2, c), float(c_min))  # a border at c_min above and beside the plane
    q = np.zeros((b, h, w, c), dtype=np.int64)
    for y in range(h):
        for xx in range(w):
            a, bb, cc = rec[:, y + 1, xx], rec[:, y, xx + 1], rec[:, y, xx]
            pred = median_edge(a, bb, cc)
            qi = np.rint((v[:, y, xx] - pred) / step).astype(np.int64)
            q[:, y, xx] = qi
            rec[:, y + 1, xx + 1] = np.clip(pred + qi * step, c_min, c_max)
    recon = rec[:, 1:, 1:w + 1]
    mse = float(np.mean((recon - x) ** 2))
    sym, n_sym = _signed_symbols(q)
    ctx = np.broadcast_to(groups, q.shape) * 5 + _magnitude_context(q)
    return mse, heldout_bits(ctx, sym, fit, GROUPS * 5, n_sym)


# --- the reversible integer LeGall 5/3 lifting (JPEG 2000), along one axis ----------------------------------

def _extend_index(i: np.ndarray, n: int) -> np.ndarray:
    """Whole-sample symmetric extension of positions ``i`` into 0..n-1."""
    period = 2 * (n - 1) if n > 1 else 1
    i = np.mod(i, period)
    return np.where(i >= n, period - i, i)


def lift_forward(x: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) integer subbands of ``x`` along ``axis`` (lengths ceil(n/2), floor(n/2))."""
    x = np.moveaxis(x, axis, 0)
    n = x.shape[0]
    even = np.arange(0, n, 2)
    odd = np.arange(1, n, 2)
    right = x[_extend_index(odd + 1, n)]
    high = x[odd] - np.floor_divide(x[odd - 1] + right, 2)
    # low[i] += (high[i-1] + high[i] + 2) >> 2, high extended symmetrically (odd positions of the extension)
    hi_full = np.zeros((n,) + x.shape[1:], dtype=x.dtype)
    hi_full[odd] = high
    left_pos, right_pos = _extend_index(even - 1, n), _extend_index(even + 1, n)
    low = x[even] + np.floor_divide(hi_full[left_pos] + hi_full[right_pos] + 2, 4) if n > 1 else x[even]
    return np.moveaxis(low, 0, axis), np.moveaxis(high, 0, axis)


def lift_inverse(low: np.ndarray, high: np.ndarray, axis: int) -> np.ndarray:
    """The exact inverse of :func:`lift_forward`."""
    low, high = np.moveaxis(low, axis, 0), np.moveaxis(high, axis, 0)
    n = low.shape[0] + high.shape[0]
    even, odd = np.arange(0, n, 2), np.arange(1, n, 2)
    out = np.zeros((n,) + low.shape[1:], dtype=np.int64)
    hi_full = np.zeros_like(out)
    hi_full[odd] = high
    if n > 1:
        out[even] = low - np.floor_divide(hi_full[_extend_index(even - 1, n)] + hi_full[_extend_index(even + 1, n)]
                                          + 2, 4)
    else:
        out[even] = low
    out[odd] = high + np.floor_divide(out[odd - 1] + out[_extend_index(odd + 1, n)], 2)
    return np.moveaxis(out, 0, axis)


def wavelet_levels(h: int, w: int) -> int:
    """Decomposition levels: up to 3, while the low band stays at least 4 x 4 (at least 1)."""
    levels = 0
    while levels < 3 and min(h, w) >= 8:
        h, w, levels = (h + 1) // 2, (w + 1) // 2, levels + 1
    return max(levels, 1)


def dwt2(v: np.ndarray, levels: int) -> list[np.ndarray]:
    """Subbands of (B, H, W, C) integers: [LL, then (HL, LH, HH) from the coarsest level to the finest]."""
    details: list[list[np.ndarray]] = []
    low = v
    for _ in range(levels):
        lo_rows, hi_rows = lift_forward(low, 1)
        ll, hl = lift_forward(lo_rows, 2)
        lh, hh = lift_forward(hi_rows, 2)
        details.append([hl, lh, hh])
        low = ll
    return [low] + [band for level in reversed(details) for band in level]


def idwt2(bands: list[np.ndarray], levels: int) -> np.ndarray:
    low = bands[0]
    for k in range(levels):
        hl, lh, hh = bands[1 + 3 * k: 4 + 3 * k]
        low = lift_inverse(lift_inverse(low, hl, 2), lift_inverse(lh, hh, 2), 1)
    return low


def synthesis_norms(h: int, w: int, levels: int) -> list[float]:
    """The L2 norm of each subband's synthesis function (a unit coefficient in the band's middle, inverted):
    quantization error in band b reaches the plane scaled by norms[b], so equal steps / norms[b] spread the
    distortion evenly (JPEG 2000's weighting, measured instead of tabulated)."""
    zero = dwt2(np.zeros((1, h, w, 1), dtype=np.int64), levels)
    norms = []
    for k, band in enumerate(zero):
        probe = [z.copy() for z in zero]
        bh, bw = band.shape[1:3]
        probe[k][0, bh // 2, bw // 2, 0] = 1 << 20  # large: the integer lifting's rounding is negligible
        norms.append(float(np.sqrt((idwt2(probe, levels).astype(np.float64) ** 2).sum())) / (1 << 20))
    return norms


def _parent_significance(bands: list[np.ndarray], qs: list[np.ndarray], k: int) -> np.ndarray:
    """For detail band k at a finer level: 1 where the co-located coefficient of the same orientation one
    level coarser is non-zero (already decoded: coarse levels come first), else 0."""
    if k < 4:  # LL and the coarsest details have no parent
        return np.zeros(bands[k].shape, dtype=np.int64)
    parent = qs[k - 3] != 0
    h, w = bands[k].shape[1:3]
    up = np.repeat(np.repeat(parent, 2, axis=1), 2, axis=2)[:, :h, :w]
    out = np.zeros(bands[k].shape, dtype=np.int64)
    out[:, :up.shape[1], :up.shape[2]] = up
    return out


def _activity(q: np.ndarray) -> np.ndarray:
    """0..4: the magnitudes of four decoded neighbours in the band (left, above, above-left, above-right)."""
    m = sum(np.abs(neighbour(q, dy, dx)) for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)))
    return np.select([m == 0, m == 1, m == 2, m <= 4], [0, 1, 2, 3], 4)


def wavelet(x: np.ndarray, c_min: float, c_max: float, step: float, fit: np.ndarray,
            groups: np.ndarray) -> tuple[float, float]:
    """Values on a 256-step integer grid, 5/3 lifting per channel plane, deadzone quantization of band b by
    ``step / norms[b]`` (grid units; :func:`synthesis_norms`), reconstruction at 3/8 of the cell above the
    deadzone (JPEG 2000's usual bias), integer inverse. Context of a coefficient index: its subband, channel
    group, the activity of four decoded neighbours in the band and whether its parent is non-zero."""
    b, h, w, c = x.shape
    grid = np.rint((np.clip(x, c_min, c_max) - c_min) / (c_max - c_min) * GRID).astype(np.int64)
    levels = wavelet_levels(h, w)
    bands = dwt2(grid, levels)
    norms = synthesis_norms(h, w, levels)
    total_bits, total_count, rec_bands, qs = 0.0, 0, [], []
    for k, band in enumerate(bands):
        delta = step / norms[k]
        if delta > 1:
            q = (np.sign(band) * np.floor_divide(np.abs(band), delta)).astype(np.int64)
            rec = np.sign(q) * np.rint((np.abs(q) + 0.375) * delta)
        else:
            q, rec = band.copy(), band
        qs.append(q)
        rec_bands.append(rec.astype(np.int64))
        sym, n_sym = _signed_symbols(q)
        ctx = (np.broadcast_to(groups, q.shape) * 5 + _activity(q)) * 2 + _parent_significance(bands, qs, k)
        count = q[0].size
        total_bits += heldout_bits(ctx, sym, fit, GROUPS * 10, n_sym) * count
        total_count += count
    recon = c_min + idwt2(rec_bands, levels).astype(np.float64) / GRID * (c_max - c_min)
    mse = float(np.mean((np.clip(recon, c_min, c_max) - x) ** 2))
    return mse, total_bits / total_count


# --- the 5/3 wavelet with designed coefficient coding ----------------------------------------------------------
#
# What a device would run (MicroPython-sized): the integer 5/3 lifting above; per subband a quantizer that is a
# table lookup on |coefficient| (a threshold table from the step and the rounding offset) and a reconstruction
# table (index -> |value|, with fitted offsets); per coefficient a context cell from already-coded neighbours
# of the same subband (left, above, above-left + above-right, capped) and the parent's magnitude one level
# coarser, mapped by a per-subband byte table to a merged class; one static categorical model per (class,
# channel group) over a bounded magnitude alphabet with an escape; the sign as its own binary symbol.

ESCAPE = 15  # magnitude symbols 0..14 and the escape 15; an escaped |v| - 15 follows as an Exp-Golomb code
_CLS_NEAR = np.array([0, 1, 2, 3, 3, 4, 4, 4, 4, 5])  # |left|, |above| -> 0, 1, 2, 3-4, 5-8, 9+
_CLS_DIAG = np.array([0, 1, 2, 2, 3])  # |above-left| + |above-right| -> 0, 1, 2-3, 4+
N_CELLS = 6 * 6 * 4 * 3  # near left x near above x diagonal x parent (0, 1, 2+)
N_CROSS = 4  # with ``cross``: x the correlated channel's co-located magnitude (0, 1, 2, 3+)
K_CANDIDATES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


@dataclass(frozen=True)
class WaveletOptions:
    """The design choices of :class:`DesignedWavelet` (each measured in results/coding_modes_wavelet.md).

    levels: decomposition levels (0: :func:`designed_levels`, 1 on small ReLU maps); grid_shift: extra bits
    of the integer grid (the 255-step grid shifted left, so reconstruction and lifting round less);
    rounding: the quantizer's rounding offset r in q = floor(|c| / step + r) (0: JPEG 2000's deadzone of
    two steps, 0.5: uniform);
    fit_reconstruction: reconstruct at the fit tensors' centroid of each band's index 1 and index 2+ cells
    (else at 3/8 of the cell above the deadzone); ll_weight: the LL band's step multiplier (1: equal weight
    by synthesis norms); ll_predict: code the LL indices as the residual of the median edge predictor of the
    decoded left, above and above-left indices (True), as they are (False), or "auto": whichever codes the
    design tensors in fewer bits under the fixed activity contexts (a sparse ReLU low band loses its zeros to
    prediction, a dense linear one gains); contexts: "designed" (cells merged per band by agglomeration
    on part of the fit tensors, the class count and channel groups chosen by bits on the rest), "activity"
    (the old row's fixed 5 activity classes x parent, all 8 channel groups) or "none"; parent: the parent
    magnitude in the cell; sign: "context" (a binary model per band on the left and above signs), "plain"
    (one binary model per band) or "signed" (one signed alphabet -15..15 with escapes at both ends);
    zero_threshold: decoded values under a threshold fitted on the fit tensors become c_min (ReLU layers);
    cross: the co-located magnitude in the same band of the channel coded before (a chain of most correlated
    channels, :func:`~lwfc_host.evaluate.index_coding.correlation_chain`) as one more cell dimension -- beyond
    the same-band neighbourhood, measured to see what it would add; isolated_rounding: the rounding offset of
    coefficients whose eight neighbours in the band all quantize to 0 (an encoder-only choice, like a
    rate-distortion quantizer's: the decoder never sees it; None: ``rounding`` everywhere)."""

    levels: int = 0
    grid_shift: int = 2
    rounding: float = 0.375
    fit_reconstruction: bool = True
    ll_weight: float = 1.0
    ll_predict: bool | str = "auto"
    contexts: str = "designed"
    parent: bool = True
    sign: str = "context"
    zero_threshold: bool = True
    cross: bool = False
    isolated_rounding: float | None = None


def designed_levels(h: int, w: int, floor_clipped: bool = False) -> int:
    """Decomposition levels of the designed mode: 1 on a map under 32 on its shorter side whose values are
    clipped below at 0 (ReLU: a sparse low band; measured on five such layers, results/coding_modes_wavelet.md),
    else up to 4 while the low band stays at least 2 x 2."""
    if floor_clipped and min(h, w) < 32:
        return 1
    levels = 0
    while levels < 4 and min(h, w) >= 4:
        h, w, levels = (h + 1) // 2, (w + 1) // 2, levels + 1
    return max(levels, 1)


def _exp_golomb_bits(r: np.ndarray) -> np.ndarray:
    """Bits of the order-0 Exp-Golomb code of non-negative integers."""
    return 2 * np.floor(np.log2(r.astype(np.float64) + 1)) + 1


def _kt_bits(counts_fit: np.ndarray, counts_eval: np.ndarray) -> float:
    """Bits of the ``counts_eval`` symbols (rows: contexts) under the ``counts_fit`` rows with the KT prior."""
    return float(-(counts_eval * np.log2(kt_probabilities(counts_fit))).sum())


def _entropy_cost(c: np.ndarray) -> np.ndarray:
    """Empirical code length in bits of each row of counts (last axis: symbols)."""
    tot = c.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(c > 0, c * np.log2(np.where(c > 0, tot / np.maximum(c, 1e-300), 1)), 0).sum(axis=-1)


def agglomerate(counts: np.ndarray, ks: tuple[int, ...] = K_CANDIDATES) -> dict[int, np.ndarray]:
    """Greedy merging of context cells (rows of ``counts``, symbols on the last axis) that raises the empirical
    code length least, down to one class; ``{k: class of each cell}`` for each k in ``ks``. Empty cells are not
    merged by cost: they join the class of the non-empty cell with the nearest index."""
    n = len(counts)
    full = np.flatnonzero(counts.sum(axis=1) > 0)
    out: dict[int, np.ndarray] = {}
    if len(full) == 0:
        return {k: np.zeros(n, dtype=np.int64) for k in ks}
    c = counts[full].astype(np.float64)
    label = np.arange(len(full))
    alive = np.ones(len(full), dtype=bool)
    own = _entropy_cost(c)
    cost = _entropy_cost(c[:, None, :] + c[None, :, :]) - own[:, None] - own[None, :]
    np.fill_diagonal(cost, np.inf)

    def snapshot() -> np.ndarray:
        roots = np.unique(label)
        cls = np.searchsorted(roots, label)
        nearest = full[np.abs(np.arange(n)[:, None] - full[None, :]).argmin(axis=1)]
        return cls[np.searchsorted(full, nearest)]

    k = len(full)
    wanted = sorted({min(k_, k) for k_ in ks}, reverse=True)
    for target in wanted:
        while k > target:
            i, j = np.unravel_index(np.argmin(cost), cost.shape)
            i, j = min(i, j), max(i, j)
            c[i] += c[j]
            alive[j] = False
            label[label == j] = i
            own[i] = _entropy_cost(c[i])
            row = _entropy_cost(c[i][None, :] + c) - own[i] - own
            row[~alive] = np.inf
            row[i] = np.inf
            cost[i, :], cost[:, i] = row, row
            cost[j, :], cost[:, j] = np.inf, np.inf
            k -= 1
        out[target] = snapshot()
    return {k_: out[min(k_, len(full))] for k_ in ks}


def _cells(v: np.ndarray, parent: np.ndarray | None, prev: np.ndarray | None = None) -> np.ndarray:
    """Context cell of each value of a band from its decoded neighbours and parent magnitude (0..N_CELLS-1),
    and with ``prev`` (the channel coded before each channel, -1 for none) the class of that channel's
    co-located magnitude (0..N_CELLS * N_CROSS - 1)."""
    a = np.abs(v)
    near_l = _CLS_NEAR[np.minimum(np.abs(neighbour(a, 0, 1)), 9)]
    near_a = _CLS_NEAR[np.minimum(np.abs(neighbour(a, 1, 0)), 9)]
    diag = _CLS_DIAG[np.minimum(neighbour(a, 1, 1) + neighbour(a, 1, -1), 4)]
    par = np.zeros_like(near_l) if parent is None else np.minimum(parent, 2)
    cell = ((near_l * 6 + near_a) * 4 + diag) * 3 + par
    if prev is None:
        return cell
    cross = np.where(prev >= 0, np.minimum(a[..., np.maximum(prev, 0)], N_CROSS - 1), 0)
    return cross * N_CELLS + cell


def _parent_magnitude(q_parent: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """|parent index| (one level coarser, same orientation) at each position of a band of ``shape``."""
    h, w = shape[1:3]
    up = np.repeat(np.repeat(np.abs(q_parent), 2, axis=1), 2, axis=2)[:, :h, :w]
    out = np.zeros(shape, dtype=np.int64)
    out[:, :up.shape[1], :up.shape[2]] = up
    return out


def _med_residual(q: np.ndarray) -> np.ndarray:
    """Index minus the median edge prediction from the left, above and above-left indices (0 outside)."""
    return q - median_edge(neighbour(q, 0, 1), neighbour(q, 1, 0), neighbour(q, 1, 1))


class DesignedWavelet:
    """The integer 5/3 wavelet with designed coefficient coding on one layer's tensors (B, H, W, C): call it
    with a step (in units of the 255-step grid over [c_min, c_max]) for (held-out MSE, held-out bits/element).

    Tensors: ``fit`` (True) fit the models; of those, every 4th (``design``) is held back from the cell merging
    to choose the class count and channel grouping by its bits, so every design choice and every count comes
    from fit tensors and the bits and the MSE are those of the held-out tensors alone. Step of band b:
    ``step * 2**grid_shift / norms[b]`` (times ``ll_weight`` for LL). What is coded per band: the magnitude
    symbol min(|v|, ESCAPE) under the model of its context class (escape: |v| - ESCAPE as an Exp-Golomb code,
    charged at its length), then the sign of each non-zero v (``options.sign``)."""

    def __init__(self, x: np.ndarray, c_min: float, c_max: float, fit: np.ndarray, groups: np.ndarray,
                 options: WaveletOptions | None = None, prev: np.ndarray | None = None) -> None:
        self.o = options or WaveletOptions()
        if self.o.cross and prev is None:
            raise ValueError("options.cross needs prev, the channel coded before each channel")
        self.prev = prev if self.o.cross else None
        self.n_cells = N_CELLS * (N_CROSS if self.o.cross else 1)
        self.x, self.c_min, self.c_max, self.fit = x, c_min, c_max, fit
        b, h, w, c = x.shape
        self.levels = self.o.levels or designed_levels(h, w, c_min == 0 and bool((x <= 0).any()))
        fit_ids = np.flatnonzero(fit)
        self.design = np.zeros(b, dtype=bool)
        self.design[fit_ids[3::4] if len(fit_ids) >= 4 else fit_ids[-1:]] = True
        if len(fit_ids) >= 2:
            self.merge = fit & ~self.design
        else:
            self.merge = fit
        self.groups = np.asarray(groups).reshape(-1)
        scale = 1 << self.o.grid_shift
        grid = np.rint((np.clip(x, c_min, c_max) - c_min) / (c_max - c_min) * GRID).astype(np.int64) * scale
        self.bands = dwt2(grid, self.levels)
        self.norms = synthesis_norms(h, w, self.levels)

    def band_step(self, k: int, step: float) -> float:
        """Quantizer step of band k in grid units."""
        weight = self.o.ll_weight if k == 0 else 1.0
        return step * (1 << self.o.grid_shift) / self.norms[k] * weight

    def quantize(self, step: float) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """(indices, integer reconstructions) of every band."""
        qs, recs = [], []
        for k, band in enumerate(self.bands):
            delta = self.band_step(k, step)
            mag = np.abs(band)
            if delta <= 1:
                qs.append(band.copy())
                recs.append(band.copy())
                continue
            qm = np.floor(mag / delta + self.o.rounding).astype(np.int64)
            if self.o.isolated_rounding is not None:
                nz = (qm > 0).astype(np.int8)
                around = sum(neighbour(nz, dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx)
                alone = np.floor(mag / delta + self.o.isolated_rounding).astype(np.int64)
                qm = np.where(around == 0, alone, qm)
            if self.o.fit_reconstruction:
                frac = mag / delta - qm
                offs = []
                for sel in (qm == 1, qm >= 2):
                    sel = sel & self.fit[:, None, None, None]
                    offs.append(float(np.clip(frac[sel].mean(), -0.5, 1.0)) if sel.any() else 0.375)
                off = np.where(qm >= 2, offs[1], offs[0])
            else:
                off = 0.375 - self.o.rounding  # JPEG 2000's 3/8 above the cell's lower end
            recm = np.where(qm > 0, np.rint((qm + off) * delta), 0).astype(np.int64)
            sgn = np.sign(band)
            qs.append(sgn * qm)
            recs.append(sgn * recm)
        return qs, recs

    def reconstruct(self, recs: list[np.ndarray], which: np.ndarray) -> np.ndarray:
        """Decoded float values of the tensors selected by ``which``."""
        scale = (1 << self.o.grid_shift) * GRID
        v = idwt2([r[which] for r in recs], self.levels).astype(np.float64)
        return np.clip(self.c_min + v / scale * (self.c_max - self.c_min), self.c_min, self.c_max)

    def _zero_threshold(self, recs: list[np.ndarray]) -> float:
        """The decoded value under which values become c_min, chosen on the design tensors by their MSE."""
        if not self.o.zero_threshold:
            return self.c_min
        dec = self.reconstruct(recs, self.design)
        ref = self.x[self.design]
        best, best_mse = self.c_min, float(np.mean((dec - ref) ** 2))
        span = self.c_max - self.c_min
        for t in span * np.array([0.002, 0.004, 0.008, 0.012, 0.016, 0.024, 0.032, 0.048, 0.064, 0.096]):
            mse = float(np.mean((np.where(dec < self.c_min + t, self.c_min, dec) - ref) ** 2))
            if mse < best_mse:
                best, best_mse = self.c_min + t, mse
        return best

    def mse(self, step: float) -> float:
        """Held-out MSE at ``step``."""
        _, recs = self.quantize(step)
        return self._mse(recs)

    def _mse(self, recs: list[np.ndarray]) -> float:
        t = self._zero_threshold(recs)
        dec = self.reconstruct(recs, ~self.fit)
        dec = np.where(dec < t, self.c_min, dec)
        return float(np.mean((dec - self.x[~self.fit]) ** 2))

    def band_values(self, qs: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """(coded values, parent magnitudes or None) per band: LL's median edge residuals if ``ll_predict``."""
        out: list[tuple[np.ndarray, np.ndarray | None]] = []
        for k, q in enumerate(qs):
            if k == 0:
                predict = self.o.ll_predict
                if predict == "auto":
                    predict = self._design_bits(_med_residual(q)) < self._design_bits(q)
                out.append((_med_residual(q) if predict else q, None))
            elif k >= 4 and self.o.parent:
                out.append((q, _parent_magnitude(qs[k - 3], q.shape)))
            else:
                out.append((q, None))
        return out

    def _design_bits(self, v: np.ndarray) -> float:
        """Bits of a band's values on the design tensors, models fitted on the merge tensors: the fixed activity
        cells, the sign as one binary model, escapes at their length (a cheap chooser between codings)."""
        cells = _cells(v, None)
        near_l, rest = np.divmod(cells, 72)
        near_a, rest = np.divmod(rest, 12)
        diag = rest // 3
        m = np.array([0, 1, 2, 3, 5, 9])[near_l] + np.array([0, 1, 2, 3, 5, 9])[near_a] + np.array(
            [0, 1, 2, 4, 4])[diag]
        ctx = np.select([m == 0, m == 1, m == 2, m <= 4], [0, 1, 2, 3], 4)
        mag = np.minimum(np.abs(v), ESCAPE)

        def counts(sel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            key = ctx[sel].ravel() * (ESCAPE + 1) + mag[sel].ravel()
            nz = v[sel][v[sel] != 0]
            return (np.bincount(key, minlength=5 * (ESCAPE + 1)).reshape(5, ESCAPE + 1),
                    np.bincount((nz < 0).astype(np.int64), minlength=2))

        (mf, sf), (md, sd) = counts(self.merge), counts(self.design)
        esc = np.abs(v[self.design])
        return (_kt_bits(mf, md) + _kt_bits(sf, sd)
                + float(_exp_golomb_bits(esc[esc >= ESCAPE] - ESCAPE).sum()))

    def _magnitude_bits(self, cells: np.ndarray, sym: np.ndarray, n_sym: int) -> tuple[float, dict[str, Any]]:
        """Held-out bits of ``sym`` under the contexts of ``options.contexts`` on ``cells`` (B, H, W, C)."""
        g_full = np.broadcast_to(self.groups, cells.shape)
        n_groups = int(self.groups.max()) + 1

        def counts(sel: np.ndarray) -> np.ndarray:
            key = (g_full[sel].ravel() * self.n_cells + cells[sel].ravel()) * n_sym + sym[sel].ravel()
            return np.bincount(key, minlength=n_groups * self.n_cells * n_sym).reshape(n_groups, self.n_cells,
                                                                                        n_sym)

        c_fit, c_held = counts(self.fit), counts(~self.fit)
        if self.o.contexts == "none":
            return _kt_bits(c_fit.sum(axis=(0, 1)), c_held.sum(axis=(0, 1))), {"k": 1, "groups": 1}
        if self.o.contexts == "activity":  # the old row's grouping: 5 classes of four neighbours x parent x group
            near_l, rest = np.divmod(np.arange(self.n_cells) % N_CELLS, 72)
            near_a, rest = np.divmod(rest, 12)
            diag, par = np.divmod(rest, 3)
            m = np.array([0, 1, 2, 3, 5, 9])[near_l] + np.array([0, 1, 2, 3, 5, 9])[near_a] + np.array(
                [0, 1, 2, 4, 4])[diag]
            labels = np.select([m == 0, m == 1, m == 2, m <= 4], [0, 1, 2, 3], 4) * 2 + (par > 0)
            return self._labelled_bits(labels, c_fit, c_held, n_groups), {"k": 10, "groups": n_groups}
        c_merge, c_design = counts(self.merge), counts(self.design)
        options = agglomerate(c_merge.sum(axis=0))
        best: tuple[float, int, int] | None = None
        for k, labels in options.items():
            for g in sorted({1, 2, 4, 8, n_groups} & set(range(1, n_groups + 1))):
                bits = self._labelled_bits(labels, c_merge, c_design, n_groups, g)
                if best is None or bits < best[0]:
                    best = (bits, k, g)
        assert best is not None
        _, k, g = best
        return self._labelled_bits(options[k], c_fit, c_held, n_groups, g), {"k": k, "groups": g}

    @staticmethod
    def _labelled_bits(labels: np.ndarray, c_fit: np.ndarray, c_eval: np.ndarray, n_groups: int,
                       g: int | None = None) -> float:
        """Bits of ``c_eval`` with cells merged by ``labels`` and channel groups merged to ``g``."""
        g = g or n_groups
        gmap = np.arange(n_groups) * g // n_groups
        k = int(labels.max()) + 1
        s = c_fit.shape[-1]
        mf, me = np.zeros((g, k, s)), np.zeros((g, k, s))
        np.add.at(mf, (gmap[:, None], labels[None, :]), c_fit)
        np.add.at(me, (gmap[:, None], labels[None, :]), c_eval)
        return _kt_bits(mf, me)

    def _sign_bits(self, v: np.ndarray) -> float:
        """Held-out bits of the signs of the non-zero values of a band (``options.sign``)."""
        nz = v != 0
        sym = (v < 0).astype(np.int64)
        if self.o.sign == "context":
            ctx = (np.sign(neighbour(v, 0, 1)) + 1) * 3 + np.sign(neighbour(v, 1, 0)) + 1
        else:
            ctx = np.zeros_like(sym)

        def counts(sel: np.ndarray) -> np.ndarray:
            m = nz & sel[:, None, None, None]
            return np.bincount(ctx[m] * 2 + sym[m], minlength=18).reshape(9, 2)

        c_fit, c_held = counts(self.fit), counts(~self.fit)
        if self.o.sign == "context":  # the 9 contexts only where they code the design tensors in fewer bits
            c_merge, c_design = counts(self.merge), counts(self.design)
            if _kt_bits(c_merge, c_design) > _kt_bits(c_merge.sum(0), c_design.sum(0)):
                return _kt_bits(c_fit.sum(0), c_held.sum(0))
        return _kt_bits(c_fit, c_held)

    def bits(self, qs: list[np.ndarray], report: dict[str, Any] | None = None) -> float:
        """Held-out bits per element of the coded indices ``qs``."""
        total = 0.0
        held = ~self.fit
        for k, (v, parent) in enumerate(self.band_values(qs)):
            cells = _cells(v, parent, self.prev)
            if self.o.sign == "signed":
                sym = np.clip(v, -ESCAPE, ESCAPE) + ESCAPE
                n_sym = 2 * ESCAPE + 1
                sign = 0.0
            else:
                sym, n_sym = np.minimum(np.abs(v), ESCAPE), ESCAPE + 1
                sign = self._sign_bits(v)
            mag, info = self._magnitude_bits(cells, sym, n_sym)
            esc = np.abs(v[held])
            esc_bits = float(_exp_golomb_bits(esc[esc >= ESCAPE] - ESCAPE).sum())
            total += mag + sign + esc_bits
            if report is not None:
                report[k] = {**info, "bits": (mag + sign + esc_bits) / v[held].size, "elements": v[held].size,
                             "sign": sign / v[held].size, "escape": esc_bits / v[held].size}
        return total / self.x[held].size

    def __call__(self, step: float) -> tuple[float, float]:
        qs, recs = self.quantize(step)
        return self._mse(recs), self.bits(qs)
