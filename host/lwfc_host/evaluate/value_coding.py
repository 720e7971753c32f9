"""Value-domain coding estimates for ``coding_modes``: closed-loop DPCM and the integer LeGall 5/3 wavelet.

Both return (mean squared error against the float features, held-out bits per element) at one step; both
reconstruct exactly as a decoder would (closed loop: predictions from reconstructed values; the wavelet's
integer inverse on the dequantized coefficients), so the distortion is what a receiver gets.
"""

from __future__ import annotations

import numpy as np

from lwfc_host.evaluate.code_lengths import GROUPS, heldout_bits, median_edge, neighbour

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
