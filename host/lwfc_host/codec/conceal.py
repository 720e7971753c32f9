"""Concealment: filling in the parts of a tensor that no received slice covered (SPEC.md 5: "what no slice
covered is missing; filling it in is not part of decoding").

A slice codes rows r0 .. r0+Hs-1 and channels c0 .. c0+Cs-1 over every column, so what is missing is always
a set of (row, channel) pairs over all W columns: ``SliceAssembly`` keeps that as an (H, C) mask while it
places decoded slices into the tensor's (H, W, C) indices, and ``Concealer`` fills the missing elements with
one of these methods (``METHODS``):

- ``zero``: 0.0, what a receiver that knows nothing would feed the cloud half.
- ``expectation``: per channel, the expected reconstruction value under the table's own model for that
  channel's context with every neighbour "outside" and no reference: sum_s p(s) * reconstruction[s]. It needs
  the table alone (models, model_of_context, reconstruction).
- ``mean``: a per-channel mean given by the caller (e.g. the calibration mean of the reconstructed values);
  without one it is ``expectation``.
- ``interpolate``: per channel and column, linear interpolation between the nearest received rows above and
  below; with a received row on one side only, that row's value; a (row, channel) with no received row in
  its channel at all takes its reference channel's conditional expectation (the table's model for the context
  with that reference index) where the reference is received, else the per-channel fill (``mean`` when a mean
  is given, else ``expectation``).
- ``adaptive``: the best linear estimate from the nearest received rows above and below if each channel's rows
  were a first-order autoregressive sequence, with its mean and lag-one correlation rho measured on the
  received rows of the same tensor: x = mu + (rho^a (1 - rho^2b) (x_above - mu) + rho^b (1 - rho^2a)
  (x_below - mu)) / (1 - rho^2(a+b)) at distances a and b (one side only: mu + rho^a (x_above - mu)). Rows that
  hardly correlate are filled with their channel's mean, strongly correlated ones are interpolated almost
  linearly. Channels with no received row are filled as ``interpolate`` fills them.

- ``learned``: per channel and per gap (distance to the nearest received row above, below, or none), the least-
  squares linear estimate from those two rows, fitted on calibration tensors (``fit_conceal_params``). Without
  fitted weights it is ``adaptive``.
- ``conditional``: at each position, the missing channels' expectation given the channels that did arrive there,
  if the reconstructed features were jointly Gaussian with the calibration tensors' mean and covariance:
  mu_m + S_mr S_rr^-1 (x_r - mu_r), clipped to the reconstruction range. It conceals a lost block of channels
  from the others (the channels of a layer are strongly correlated: an expanded layer's 240 channels are 1x1
  convolutions of 40); rows where no channel arrived are filled by ``learned`` (or ``adaptive``). Needs the
  calibration statistics; without them it is ``adaptive``.

``mean``, ``learned`` and ``conditional`` use calibration statistics (``ConcealParams``: ``fit_conceal_params``,
saved by ``lwfc eval-loss`` as conceal_params.npz and given to ``lwfc serve --conceal-params``); the others need
the table alone.

``DEFAULT_METHOD`` is the one that measured best (``lwfc eval-loss``; results/lossy_links/).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lwfc.tables import Tables, context_number

METHODS = ("zero", "expectation", "mean", "interpolate", "adaptive", "learned", "conditional")
SPATIAL = ("interpolate", "adaptive", "learned", "conditional")  # the methods that look at received data
MAX_RHO = 0.98  # keeps the autoregressive weights finite (rho -> 1 is linear interpolation)
DEFAULT_METHOD = "conditional"
PROBABILITY_ONE = float(1 << 24)


def context_of(tables: Tables, channel: np.ndarray, reference_index: np.ndarray | int | None = None) -> np.ndarray:
    """Context numbers (SPEC.md 4.2) of elements of ``channel`` whose above and left neighbours are outside
    the slice and whose reference index is ``reference_index`` (None or ``levels``: no reference)."""
    n = tables.levels
    group = np.asarray(tables.channel_group, dtype=np.int64)[channel]
    ncls = tables.neighbour_class[n]
    rcls = np.asarray(tables.reference_class, dtype=np.int64)
    ref = rcls[n] if reference_index is None else rcls[np.asarray(reference_index, dtype=np.int64)]
    return context_number(group, ncls, ncls, tables.classes, ref, tables.reference_classes)


def model_expectations(tables: Tables) -> np.ndarray:
    """The expected reconstruction value of each model: sum_s f_m[s] / 2^24 * reconstruction[s], shape (M,)."""
    freq = np.asarray(tables.models, dtype=np.float64) / PROBABILITY_ONE
    return freq @ np.asarray(tables.reconstruction, dtype=np.float64)


def channel_expectations(tables: Tables) -> np.ndarray:
    """Per channel, the expected reconstruction under the model of its context with every neighbour outside
    and no reference (what the table predicts knowing nothing else), shape (C,), float32."""
    moc = np.asarray(tables.model_of_context, dtype=np.int64)
    ctx = context_of(tables, np.arange(tables.channels))
    return model_expectations(tables)[moc[ctx]].astype(np.float32)


def reference_expectations(tables: Tables) -> np.ndarray | None:
    """Per channel c and reference index b, the expected reconstruction of c under the model of its context
    with neighbours outside and reference index b, shape (C, N) (rows of channels without a reference channel
    repeat the no-reference expectation); None when the table has no reference channels."""
    ref = np.asarray(tables.reference_channel, dtype=np.int64)
    if not (ref >= 0).any():
        return None
    moc = np.asarray(tables.model_of_context, dtype=np.int64)
    ctx = context_of(tables, np.arange(tables.channels)[:, None], np.arange(tables.levels)[None, :])
    return model_expectations(tables)[moc[ctx]].astype(np.float32)


@dataclass
class ConcealParams:
    """Calibration statistics of the reconstructed features that the ``mean``, ``learned`` and ``conditional``
    concealments use: ``channel_mean`` (C,); ``covariance`` (C, C) of the channels at one position; ``weights``
    (D + 1, D + 1, C, 3), per gap geometry and channel, the least-squares (intercept, w_above, w_below) of a missing
    element from the nearest received rows above and below in its channel and column (index [a, b] for distances
    a above and b below, 0: no received row on that side; distances beyond D use D's weights)."""

    channel_mean: np.ndarray
    covariance: np.ndarray
    weights: np.ndarray

    @property
    def max_distance(self) -> int:
        return self.weights.shape[0] - 1

    @property
    def channels(self) -> int:
        return self.channel_mean.shape[0]

    def save(self, path: str | Path) -> None:
        np.savez(path, channel_mean=self.channel_mean, covariance=self.covariance, weights=self.weights)

    @staticmethod
    def load(path: str | Path) -> ConcealParams:
        """Read a file written by ``save``; ValueError when it is not one."""
        try:
            with np.load(path, allow_pickle=False) as z:
                m, cov, w = (z[k].astype(np.float32) for k in ("channel_mean", "covariance", "weights"))
        except (OSError, KeyError, ValueError) as exc:
            raise ValueError(f"{path}: not concealment parameters ({exc})") from exc
        c = m.shape[0] if m.ndim == 1 else -1
        if cov.shape != (c, c) or w.ndim != 4 or w.shape[0] != w.shape[1] or w.shape[2:] != (c, 3):
            raise ValueError(f"{path}: not concealment parameters (mean {m.shape}, covariance {cov.shape}, "
                             f"weights {w.shape})")
        return ConcealParams(m, cov, w)


def fit_conceal_params(recon: np.ndarray, max_distance: int = 6, ridge: float = 1e-3,
                       max_positions: int = 400_000, seed: int = 0) -> ConcealParams:
    """``ConcealParams`` from calibration reconstructions ``recon`` (N, H, W, C): the channel means and covariance,
    and for every gap geometry, per channel, least squares (a small ridge on the two slopes) over every row that
    has rows at those distances; at most ``max_positions`` positions (whole tensors drawn with ``seed``)."""
    x = np.asarray(recon, dtype=np.float32)
    n, h, w, c = x.shape
    keep = max(1, min(n, max_positions // max(1, h * w)))
    if keep < n:
        x = x[np.sort(np.random.default_rng(seed).choice(n, keep, replace=False))]
    flat = x.reshape(-1, c).astype(np.float64)
    mean = flat.mean(axis=0)
    cov = np.cov(flat, rowvar=False).reshape(c, c)
    d = max(1, min(max_distance, h - 1))
    weights = np.zeros((d + 1, d + 1, c, 3), dtype=np.float32)
    for da in range(d + 1):
        for db in range(d + 1):
            lo, hi = da, h - db  # rows with a row da above and db below
            if hi - lo < 1:
                weights[da, db, :, 0] = mean
                continue
            y = x[:, lo:hi].reshape(-1, c)
            feats = [np.ones_like(y)]
            if da:
                feats.append(x[:, lo - da:hi - da].reshape(-1, c))
            if db:
                feats.append(x[:, lo + db:hi + db].reshape(-1, c))
            f = np.stack(feats, axis=-1).astype(np.float64)  # (M, C, k)
            gram = np.einsum("mci,mcj->cij", f, f)
            gram[:, 1:, 1:] += ridge * len(y) * np.eye(len(feats) - 1)
            rhs = np.einsum("mci,mc->ci", f, y.astype(np.float64))
            sol = np.linalg.solve(gram + 1e-9 * np.eye(len(feats)), rhs[..., None])[..., 0]
            weights[da, db, :, 0] = sol[:, 0]
            k = 1
            if da:
                weights[da, db, :, 1] = sol[:, k]
                k += 1
            if db:
                weights[da, db, :, 2] = sol[:, k]
    return ConcealParams(mean.astype(np.float32), cov.astype(np.float32), weights)


class SliceAssembly:
    """The slices of one tensor as they arrive: indices (H, W, C) and the (H, C) mask of what they cover.

    ``add(region, indices)`` places a decoded slice (``Decoded.header.region``, ``Decoded.indices``) and
    returns False, changing nothing, when the slice overlaps one already placed (a duplicate, or slices that
    do not belong together). ``complete`` is true once the slices tile the tensor."""

    def __init__(self, shape: tuple[int, int, int]):
        h, w, c = shape
        self.shape = (h, w, c)
        self.indices = np.zeros((h, w, c), dtype=np.uint8)
        self.known = np.zeros((h, c), dtype=bool)
        self.covered = 0  # (row, channel) pairs covered
        self.slices = 0

    def add(self, region: tuple[int, int, int, int], indices: np.ndarray) -> bool:
        r0, rn, c0, cn = region
        if r0 < 0 or c0 < 0 or r0 + rn > self.shape[0] or c0 + cn > self.shape[2]:
            raise ValueError(f"slice region {region} lies outside the tensor {self.shape}")
        if indices.shape != (rn, self.shape[1], cn):
            raise ValueError(f"slice indices of shape {indices.shape} do not fit region {region}")
        block = self.known[r0:r0 + rn, c0:c0 + cn]
        if block.any():
            return False
        self.indices[r0:r0 + rn, :, c0:c0 + cn] = indices
        block[:] = True
        self.covered += rn * cn
        self.slices += 1
        return True

    @property
    def complete(self) -> bool:
        return self.covered == self.known.size

    @property
    def missing_fraction(self) -> float:
        """The fraction of the tensor's elements that no slice covered."""
        return 1.0 - self.covered / self.known.size


@dataclass
class Concealed:
    """A tensor with its missing part filled in: ``tensor`` (1, H, W, C) float32 and the fraction of its
    elements that were concealed."""

    tensor: np.ndarray
    concealed: float
    method: str


class Concealer:
    """Fills what no slice covered, by ``method`` (``METHODS``). ``channel_mean`` (C,): the per-channel fill of
    ``mean`` (and the last resort of the spatial methods); default: ``params``' mean, else the table's
    ``channel_expectations``. ``params``: the calibration statistics of ``learned`` and ``conditional``."""

    def __init__(self, tables: Tables, method: str = DEFAULT_METHOD, channel_mean: np.ndarray | None = None,
                 params: ConcealParams | None = None, ridge: float = 1e-3):
        if method not in METHODS:
            raise ValueError(f"unknown concealment {method!r}; known: {', '.join(METHODS)}")
        if params is not None and params.channels != tables.channels:
            raise ValueError(f"the concealment parameters are for {params.channels} channels; the table has "
                             f"{tables.channels}")
        self.params = params
        self.ridge = ridge
        self._solves: dict[bytes, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        if channel_mean is None and params is not None:
            channel_mean = params.channel_mean
        self.tables = tables
        self.method = method
        self.recon = np.asarray(tables.reconstruction, dtype=np.float32)
        self.expectation = channel_expectations(tables)
        if channel_mean is not None:
            channel_mean = np.asarray(channel_mean, dtype=np.float32).reshape(-1)
            if channel_mean.shape != (tables.channels,):
                raise ValueError(f"channel_mean has {channel_mean.size} values; the table has {tables.channels} "
                                 "channels")
        self.channel_mean = channel_mean
        prior = channel_mean if channel_mean is not None else self.expectation
        self.fill = {"zero": np.zeros(tables.channels, dtype=np.float32), "expectation": self.expectation,
                     "mean": prior, "interpolate": prior, "adaptive": prior, "learned": prior,
                     "conditional": prior}[method]
        self.reference = np.asarray(tables.reference_channel, dtype=np.int64)
        self.by_reference = reference_expectations(tables) if method in SPATIAL else None

    def conceal(self, assembly: SliceAssembly) -> Concealed:
        """The assembled tensor, its missing elements filled in."""
        return Concealed(self.fill_in(assembly.indices, assembly.known), assembly.missing_fraction, self.method)

    def fill_in(self, indices: np.ndarray, known: np.ndarray) -> np.ndarray:
        """(1, H, W, C) float32: ``reconstruction[indices]`` where ``known`` (H, C) is true, concealed elsewhere.
        Indices under a false mask entry are not read."""
        h, w, c = indices.shape
        values = self.recon[indices]
        if known.all():
            return values.reshape(1, h, w, c)
        if self.method not in SPATIAL:
            values = np.where(known[:, None, :], values, self.fill[None, None, :])
            return values.reshape(1, h, w, c)
        if self.method == "conditional":
            out = self._interpolate(values, indices, known, "learned")
            if self.params is not None:
                self._conditional(out, values, known)
            return out.reshape(1, h, w, c)
        return self._interpolate(values, indices, known, self.method).reshape(1, h, w, c)

    def _conditional_weights(self, miss: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(received channels, missing channels, S_rr^-1 S_rm) for one pattern of missing channels (cached)."""
        key = np.packbits(miss).tobytes()
        got = self._solves.get(key)
        if got is None:
            cov = self.params.covariance.astype(np.float64)
            r, m = np.flatnonzero(~miss), np.flatnonzero(miss)
            s_rr = cov[np.ix_(r, r)]
            s_rr[np.diag_indices_from(s_rr)] += self.ridge * max(float(np.trace(cov)) / len(cov), 1e-12)
            got = (r, m, np.linalg.solve(s_rr, cov[np.ix_(r, m)]).astype(np.float32))
            if len(self._solves) >= 256:
                self._solves.clear()
            self._solves[key] = got
        return got

    def _conditional(self, out: np.ndarray, values: np.ndarray, known: np.ndarray) -> None:
        """Overwrite, in rows where some channels arrived, the missing channels by their conditional expectation
        given the received ones at the same position."""
        mu = self.params.channel_mean
        lo, hi = float(self.recon.min()), float(self.recon.max())
        patterns: dict[bytes, list[int]] = {}
        for row in range(known.shape[0]):
            miss = ~known[row]
            if miss.any() and not miss.all():
                patterns.setdefault(miss.tobytes(), []).append(row)
        for key, rows in patterns.items():
            miss = np.frombuffer(key, dtype=bool)
            r, m, wt = self._conditional_weights(miss)
            x = values[rows][:, :, r] - mu[r]  # (rows, W, R)
            est = np.clip(mu[m] + x @ wt, lo, hi)
            block = out[rows]
            block[:, :, m] = est
            out[rows] = block

    def _row_statistics(self, values: np.ndarray, known: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per channel, the mean of its received elements (the fill where none) and the lag-one correlation of its
        received vertically adjacent rows, in [0, MAX_RHO] (0 where it cannot be measured)."""
        w = values.shape[1]
        count = known.sum(axis=0) * w
        total = np.einsum("hwc,hc->c", values, known.astype(np.float32))
        mu = np.where(count > 0, total / np.maximum(count, 1), self.fill).astype(np.float32)
        dev = values - mu[None, None, :]
        pair = known[:-1] & known[1:]
        if not pair.any():
            return mu, np.zeros_like(mu)
        p = pair.astype(np.float32)
        num = np.einsum("hwc,hwc,hc->c", dev[:-1], dev[1:], p)
        den = 0.5 * (np.einsum("hwc,hc->c", dev[:-1] ** 2, p) + np.einsum("hwc,hc->c", dev[1:] ** 2, p))
        rho = np.where(den > 0, num / np.maximum(den, 1e-30), 0.0)
        return mu, np.clip(rho, 0.0, MAX_RHO).astype(np.float32)

    def _interpolate(self, values: np.ndarray, indices: np.ndarray, known: np.ndarray, how: str) -> np.ndarray:
        """Along rows, per channel and column, from the nearest received rows: linear interpolation
        (``interpolate``), the autoregressive estimate (``adaptive``) or the fitted one (``learned``)."""
        h, w, c = values.shape
        rows = np.arange(h)[:, None]
        # the nearest received row at or above / at or below each (row, channel); -1 / h where there is none
        above = np.where(known, rows, -1)
        above = np.maximum.accumulate(above, axis=0)
        below = np.where(known, rows, h)
        below = np.minimum.accumulate(below[::-1], axis=0)[::-1]
        has_above, has_below = above >= 0, below < h
        ia, ib = np.clip(above, 0, h - 1), np.clip(below, 0, h - 1)
        chan = np.arange(c)[None, :]
        va = values[ia, :, chan].transpose(0, 2, 1)  # (H, W, C): the above row's values per (row, channel)
        vb = values[ib, :, chan].transpose(0, 2, 1)
        da = (rows - above).astype(np.float32)
        db = (below - rows).astype(np.float32)
        both = has_above & has_below
        if how == "learned" and self.params is not None:
            d = self.params.max_distance
            ka = np.where(has_above, np.minimum(da, d), 0).astype(np.int64)
            kb = np.where(has_below, np.minimum(db, d), 0).astype(np.int64)
            wt = self.params.weights[ka, kb, chan]  # (H, C, 3)
            out = wt[:, None, :, 0] + va * wt[:, None, :, 1] + vb * wt[:, None, :, 2]
        elif how in ("adaptive", "learned"):
            mu, rho = self._row_statistics(values, known)
            pa = np.where(has_above, rho[None, :] ** da, 0.0).astype(np.float32)
            pb = np.where(has_below, rho[None, :] ** db, 0.0).astype(np.float32)
            den = 1.0 - (pa * pb) ** 2
            wa = np.where(den > 0, pa * (1.0 - pb * pb) / np.maximum(den, 1e-30), 0.0)
            wb = np.where(den > 0, pb * (1.0 - pa * pa) / np.maximum(den, 1e-30), 0.0)
            out = mu[None, None, :] + (va - mu) * wa[:, None, :] + (vb - mu) * wb[:, None, :]
        else:
            wa = np.where(both, db / np.maximum(da + db, 1), has_above.astype(np.float32))
            wb = np.where(both, da / np.maximum(da + db, 1), has_below.astype(np.float32))
            out = va * wa[:, None, :] + vb * wb[:, None, :]
        # (row, channel) pairs with no received row in the channel: the reference channel, else the fill
        none = ~(has_above | has_below)
        fill = np.broadcast_to(self.fill[None, None, :], (h, w, c))
        if none.any() and self.by_reference is not None:
            ref = self.reference
            has_ref = ref >= 0
            ref_known = np.zeros_like(known)
            ref_known[:, has_ref] = known[:, ref[has_ref]]
            use = none & ref_known
            if use.any():
                ref_idx = indices[:, :, np.where(has_ref, ref, 0)]  # (H, W, C): the reference channel's indices
                cond = self.by_reference[np.arange(c)[None, None, :], ref_idx]
                fill = np.where(use[:, None, :], cond, fill)
        out = np.where(none[:, None, :], fill, out)
        return np.where(known[:, None, :], values, out).astype(np.float32)
