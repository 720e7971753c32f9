"""Choosing the clip range [c_min, c_max] for N levels: model-based (as in the paper) or empirical.

Both minimise the mean squared error of clipping plus uniform quantization with N levels
(reconstruction on the grid c_min + j (c_max - c_min) / (N - 1)):

* ``model``: fit a distribution to the calibration histogram -- a point mass at exact zero plus, on
  each side of zero, a truncated Gaussian or an exponential (whichever fits better by binned maximum
  likelihood, censored at a saturation value when the data pile up there) -- and minimise the
  *modelled* error, computed exactly from the model's partial moments (no high-resolution
  approximation, so the result holds at 2 levels as well as at 16);
* ``mse``: search candidate clip points on the histogram for the least measured error.

c_min is 0 when the data have no negative values (ReLU, ReLU6); otherwise it is searched too (leaky
ReLU: a small negative value; general signed activations). Formulas: codec_spec/DESIGN-quantizer.md,
section 2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import optimize
from scipy.special import ndtr

from lwfc_host.design.calibration import Histogram
from lwfc_host.design.quantizers import grid_mse, snap_clip

SAT_FRACTION = 1e-3  # a data maximum (minimum) holding this fraction of the data is a saturation pile


def _phi(z: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


@dataclass
class SideModel:
    """Distribution of |x| on one side of zero: ``family`` 'gauss' (Gaussian (mu, sigma) truncated to
    (0, inf)) or 'exp' (rate beta), with total probability ``mass`` on that side and, when
    ``sat`` is set, the part above ``sat`` collapsed onto a point mass at ``sat`` (saturation)."""

    family: str
    params: tuple[float, ...]
    mass: float
    sat: float | None = None
    loglik: float = 0.0

    def cdf(self, y: np.ndarray) -> np.ndarray:
        """P(|x| <= y | this side) of the uncensored model, y >= 0."""
        y = np.maximum(np.asarray(y, dtype=np.float64), 0.0)
        if self.family == "exp":
            (beta,) = self.params
            return -np.expm1(-beta * y)
        mu, sigma = self.params
        z0 = ndtr(-mu / sigma)
        return (ndtr((y - mu) / sigma) - z0) / (1 - z0)

    def moments(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Partial moments int_a^b y^k f(y) dy, k = 0, 1, 2, of this side's density (times ``mass``),
        with the saturation point mass counted when a <= sat < b."""
        a = np.maximum(np.asarray(a, dtype=np.float64), 0.0)
        b = np.maximum(np.asarray(b, dtype=np.float64), a)
        top = np.inf if self.sat is None else self.sat
        ac = np.minimum(a, top)
        bc = np.minimum(b, top)
        if self.family == "exp":
            (beta,) = self.params

            def upper(y):
                e = np.where(np.isinf(y), 0.0, np.exp(-beta * np.where(np.isinf(y), 0.0, y)))
                yy = np.where(np.isinf(y), 0.0, y)
                return e, (yy + 1 / beta) * e, (yy * yy + 2 * yy / beta + 2 / beta ** 2) * e

            ea, ma1, ma2 = upper(ac)
            eb, mb1, mb2 = upper(bc)
            m0, m1, m2 = ea - eb, ma1 - mb1, ma2 - mb2
        else:
            mu, sigma = self.params
            za = (ac - mu) / sigma
            zb = np.where(np.isinf(bc), np.inf, (bc - mu) / sigma)
            pa, pb = _phi(za), np.where(np.isinf(zb), 0.0, _phi(np.where(np.isinf(zb), 0.0, zb)))
            m0 = ndtr(zb) - ndtr(za)
            zpa = za * pa
            zpb = np.where(np.isinf(zb), 0.0, np.where(np.isinf(zb), 0.0, zb) * pb)
            m1 = mu * m0 + sigma * (pa - pb)
            m2 = (mu * mu + sigma * sigma) * m0 + 2 * mu * sigma * (pa - pb) + sigma * sigma * (zpa - zpb)
            norm = 1 - ndtr(-mu / sigma)
            m0, m1, m2 = m0 / norm, m1 / norm, m2 / norm
        if self.sat is not None:
            tail = 1 - self.cdf(self.sat)
            hit = (a <= self.sat) & (self.sat < b) if np.ndim(a) else (a <= self.sat < b)
            m0 = m0 + hit * tail
            m1 = m1 + hit * tail * self.sat
            m2 = m2 + hit * tail * self.sat ** 2
        return self.mass * m0, self.mass * m1, self.mass * m2


@dataclass
class ActivationModel:
    """Point mass ``zero`` at 0 plus the two sides (either may be None when it holds no data)."""

    zero: float
    pos: SideModel | None
    neg: SideModel | None
    notes: list[str] = field(default_factory=list)

    def cell_error(self, t_lo: np.ndarray, t_hi: np.ndarray, r: np.ndarray) -> float:
        """Modelled E[(x - r_j)^2; t_lo_j <= x < t_hi_j] summed over cells j."""
        total = np.zeros_like(np.asarray(r, dtype=np.float64))
        if self.pos is not None:
            m0, m1, m2 = self.pos.moments(np.maximum(t_lo, 0), np.maximum(t_hi, 0))
            total += m2 - 2 * r * m1 + r * r * m0
        if self.neg is not None:
            m0, m1, m2 = self.neg.moments(np.maximum(-t_hi, 0), np.maximum(-t_lo, 0))
            total += m2 + 2 * r * m1 + r * r * m0  # x = -y: first moment changes sign
        inside = (t_lo <= 0) & (0 < t_hi)
        total += inside * self.zero * r * r
        return float(total.sum())

    def uniform_error(self, levels: int, c_min: float, c_max: float) -> float:
        """Modelled clipping-plus-quantization MSE of the N-level grid quantizer on [c_min, c_max]."""
        step = (c_max - c_min) / (levels - 1)
        r = c_min + step * np.arange(levels)
        t = c_min + step * (np.arange(levels - 1) + 0.5)
        t_lo = np.concatenate([[-np.inf], t])
        t_hi = np.concatenate([t, [np.inf]])
        return self.cell_error(t_lo, t_hi, r)


def _side_data(hist: Histogram, sign: int, zeros: float):
    """Bin intervals (a, b) of |x| on one side, their counts, and the saturation pile if any."""
    w = hist.width
    if hist.exact_values:
        v = hist.lower
        sel = v * sign > 0
        y = np.abs(v[sel])
        a, b = np.maximum(y - w / 2, 0), y + w / 2
        n = hist.count[sel].copy()
    else:
        if sign > 0:
            sel = hist.lower >= 0
            a, b = hist.lower[sel], hist.lower[sel] + w
            n = hist.count[sel].copy()
            if n.size:
                n[0] = max(n[0] - zeros, 0.0)  # the exact zeros are modelled as a point mass
        else:
            sel = hist.lower < 0
            a, b = -(hist.lower[sel] + w), -hist.lower[sel]
            n = hist.count[sel].copy()
    order = np.argsort(a)
    a, b, n = a[order], b[order], n[order]
    nz = np.flatnonzero(n)
    if nz.size == 0:
        return None
    a, b, n = a[: nz[-1] + 1], b[: nz[-1] + 1], n[: nz[-1] + 1]
    sat = None
    if n[-1] >= SAT_FRACTION * hist.total and n.sum() > n[-1]:
        sat = float(a[-1]) if not hist.exact_values else float(0.5 * (a[-1] + b[-1]))
    return a, b, n, sat


def _fit_side(hist: Histogram, sign: int, zeros: float) -> SideModel | None:
    data = _side_data(hist, sign, zeros)
    if data is None:
        return None
    a, b, n, sat = data
    mass = float(n.sum() / hist.total)
    if sat is not None:  # censored: the last bin is "|x| >= sat"
        a_in, b_in, n_in, n_sat = a[:-1], b[:-1], n[:-1], n[-1]
    else:
        a_in, b_in, n_in, n_sat = a, b, n, 0.0
    mid = 0.5 * (a_in + b_in)
    m1 = float((n_in * mid).sum() / max(n_in.sum(), 1))
    m2 = float((n_in * mid * mid).sum() / max(n_in.sum(), 1))
    sd = math.sqrt(max(m2 - m1 * m1, 1e-30))
    fits = []

    def nll(model: SideModel) -> float:
        pr = model.cdf(b_in) - model.cdf(a_in)
        val = -(n_in * np.log(np.maximum(pr, 1e-300))).sum()
        if n_sat:
            val -= n_sat * math.log(max(1 - float(model.cdf(sat)), 1e-300))
        return float(val)

    def g(p):
        return nll(SideModel("gauss", (p[0], math.exp(p[1])), mass, sat))

    res = optimize.minimize(g, [m1, math.log(sd)], method="Nelder-Mead",
                            options={"xatol": 1e-6 * sd, "fatol": 1e-9, "maxiter": 2000})
    fits.append(SideModel("gauss", (float(res.x[0]), float(math.exp(res.x[1]))), mass, sat, -float(res.fun)))

    def e(lb):
        return nll(SideModel("exp", (math.exp(lb),), mass, sat))

    res = optimize.minimize_scalar(e, bracket=(math.log(0.5 / max(m1, 1e-30)), math.log(2 / max(m1, 1e-30))))
    fits.append(SideModel("exp", (float(math.exp(res.x)),), mass, sat, -float(res.fun)))
    return max(fits, key=lambda m: m.loglik)


def fit_model(hist: Histogram, zeros: float = 0.0) -> ActivationModel:
    """Fit the activation model (zero mass, a truncated Gaussian or exponential on each side)."""
    if hist.exact_values:
        zi = np.flatnonzero(np.isclose(hist.lower, 0.0, atol=hist.width * 1e-6))
        zeros = float(hist.count[zi].sum()) if zi.size else 0.0
    pos = _fit_side(hist, +1, zeros)
    neg = _fit_side(hist, -1, zeros)
    return ActivationModel(zeros / hist.total, pos, neg)


@dataclass
class ClipChoice:
    """A chosen clip range with the method, the criterion value and notes for the user."""

    c_min: float
    c_max: float
    method: str
    mse: float
    model: ActivationModel | None = None
    notes: list[str] = field(default_factory=list)


def _data_range(hist: Histogram) -> tuple[float, float]:
    nz = np.flatnonzero(hist.count)
    lo = float(hist.lower[nz[0]])
    hi = float(hist.upper[nz[-1]])
    return lo, hi


def _quantile(hist: Histogram, q: float) -> float:
    c = np.cumsum(hist.count) / hist.total
    return float(hist.upper[min(np.searchsorted(c, q), len(c) - 1)])


def _search(crit, lo_cands: np.ndarray, hi_cands: np.ndarray) -> tuple[float, float, float]:
    """Grid search over (c_min, c_max) pairs, then a finer grid around the best pair."""
    best = (np.inf, 0.0, 0.0)
    for lo in lo_cands:
        for hi in hi_cands:
            if hi > lo:
                v = crit(lo, hi)
                if v < best[0]:
                    best = (v, lo, hi)
    return best


def scale_top(hist: Histogram, choice: ClipChoice, scale: float) -> ClipChoice:
    """``choice`` with its top moved to c_min + ``scale`` x (c_max - c_min), capped at the data maximum; the
    bottom stays (after a ReLU it is 0 and holds the pile of zeros). Wider tops zero more small values."""
    top = min(choice.c_min + scale * (choice.c_max - choice.c_min), _data_range(hist)[1])
    return ClipChoice(choice.c_min, top, f"{choice.method} x{scale:g}", choice.mse, choice.model, list(choice.notes))


def choose_clip(hist: Histogram, levels: int, method: str = "mse", zeros: float = 0.0,
                c_min: float | None = None) -> ClipChoice:
    """Clip range minimising the clipping-plus-quantization MSE of the N-level uniform quantizer.

    ``method``: 'model' (fit a distribution, minimise the modelled error) or 'mse' (search on the
    histogram). ``c_min`` fixes the lower clip point (default: 0 for non-negative data, searched
    otherwise)."""
    if levels < 2:
        raise ValueError("levels must be >= 2")
    lo_data, hi_data = _data_range(hist)
    notes: list[str] = []
    if hi_data - lo_data <= hist.width * (levels - 1) * (0 if hist.exact_values else 1):
        raise ValueError("the calibration data are (nearly) constant: no clip range to choose")
    model = None
    if method == "model":
        model = fit_model(hist, zeros)
        for side, m in (("positive", model.pos), ("negative", model.neg)):
            if m is not None:
                notes.append(f"{side} side: {m.family} {tuple(round(p, 6) for p in m.params)}, "
                             f"mass {m.mass:.4f}" + (f", saturates at {m.sat:g}" if m.sat is not None else ""))

        def crit(lo, hi):
            return model.uniform_error(levels, lo, hi)
    elif method == "mse":
        def crit(lo, hi):
            return grid_mse(hist, levels, lo, hi)
    else:
        raise ValueError(f"unknown clip method {method!r} (model or mse)")

    top = hi_data if not hist.exact_values else float(hist.lower[np.flatnonzero(hist.count)[-1]])
    q_lo = max(_quantile(hist, 0.5), lo_data + (hi_data - lo_data) * 1e-3)
    if lo_data >= 0 and c_min is None:
        c_min = 0.0
    signed = c_min is None
    if signed:
        bottom = lo_data if not hist.exact_values else float(hist.lower[np.flatnonzero(hist.count)[0]])
        lo_c = np.linspace(bottom, min(_quantile(hist, 0.5), 0.0) if bottom < 0 else bottom, 40)
        hi_c = np.linspace(max(_quantile(hist, 0.5), bottom + hist.width), top, 60)
        _, lo, hi = _search(crit, lo_c, hi_c)
        dl = (lo_c[1] - lo_c[0]) if len(lo_c) > 1 else hist.width
        dh = hi_c[1] - hi_c[0]
        _, lo, hi = _search(crit, np.linspace(lo - dl, lo + dl, 21), np.linspace(hi - dh, hi + dh, 21))
    else:
        hi_c = np.concatenate([np.geomspace(max(q_lo - c_min, hist.width), top - c_min, 300) + c_min])
        _, lo, hi = _search(crit, np.array([c_min]), hi_c)
        i = int(np.argmin(np.abs(hi_c - hi)))
        a = hi_c[max(i - 1, 0)]
        b = hi_c[min(i + 1, len(hi_c) - 1)]
        res = optimize.minimize_scalar(lambda h: crit(c_min, h), bounds=(a, b), method="bounded",
                                       options={"xatol": hist.width * 0.25})
        if res.fun < crit(c_min, hi):
            hi = float(res.x)
    lo_s, hi_s = snap_clip(hist, lo, hi)
    if hi_s > top and hist.exact_values:
        hi_s = top
    if method == "model":
        notes.append(f"modelled MSE {crit(lo, hi):.6g}, measured {grid_mse(hist, levels, lo_s, hi_s):.6g}")
    return ClipChoice(lo_s, hi_s, method, grid_mse(hist, levels, lo_s, hi_s), model, notes)
