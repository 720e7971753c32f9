"""Code lengths and neighbourhoods shared by the coding-mode estimates (``coding_modes``): held-out ideal code
lengths under static counts, neighbours in a plane, channel groups, the median edge predictor."""

from __future__ import annotations

import numpy as np

KT = 0.5  # the counts' prior: the Krichevsky-Trofimov estimator
GROUPS = 8  # channel groups of the simple contexts

def neighbour(x: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``n[:, y, x] = x[:, y - dy, x - dx]`` over (B, H, W, ...) arrays, 0 outside the plane."""
    out = np.zeros_like(x)
    h, w = x.shape[1:3]
    if dy >= h or -dx >= w or dx >= w:
        return out
    ys, yd = slice(max(dy, 0), h + min(dy, 0)), slice(max(-dy, 0), h - max(dy, 0))
    xs, xd = slice(max(dx, 0), w + min(dx, 0)), slice(max(-dx, 0), w - max(dx, 0))
    out[:, ys, xs] = x[:, yd, xd]
    return out


def kt_probabilities(counts: np.ndarray) -> np.ndarray:
    """Each row of symbol counts (last axis: symbols) as probabilities with the KT prior."""
    return (counts + KT) / (counts.sum(axis=-1, keepdims=True) + KT * counts.shape[-1])


def heldout_bits(ctx: np.ndarray, sym: np.ndarray, fit: np.ndarray, n_ctx: int, n_sym: int) -> float:
    """Ideal code length (bits per element) of the held-out tensors' symbols, counts fitted on the fit ones.
    ``ctx``, ``sym``: (B, ...) integer arrays; ``fit``: boolean (B,) mask."""
    ctx = ctx.reshape(len(ctx), -1).astype(np.int64)
    sym = sym.reshape(len(sym), -1).astype(np.int64)
    counts = np.bincount((ctx[fit] * n_sym + sym[fit]).ravel(), minlength=n_ctx * n_sym).reshape(n_ctx, n_sym)
    prob = kt_probabilities(counts)
    held_ctx, held_sym = ctx[~fit].ravel(), sym[~fit].ravel()
    return float(-np.log2(prob[held_ctx, held_sym]).sum() / held_ctx.size)


def channel_groups(indices: np.ndarray, fit: np.ndarray, groups: int = GROUPS) -> np.ndarray:
    """Channel -> group (0..groups-1) by the quantile of the channel's mean index on the fit tensors."""
    mean = indices[fit].reshape(-1, indices.shape[-1]).mean(axis=0)
    g = min(groups, indices.shape[-1])
    ranks = np.argsort(np.argsort(mean, kind="stable"), kind="stable")
    return (ranks * g // indices.shape[-1]).astype(np.int64)


def classes3(v: np.ndarray) -> np.ndarray:
    return np.minimum(v, 2)


def median_edge(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """LOCO-I's median edge predictor from left ``a``, above ``b`` and above-left ``c``."""
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    return np.where(c >= hi, lo, np.where(c <= lo, hi, a + b - c))
