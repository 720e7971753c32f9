"""Index-domain coding estimates for ``coding_modes``: schemes that code the same quantizer indices with other
contexts or with prediction (see that module's docstring). Each returns held-out bits per element."""

from __future__ import annotations

from typing import Any

import numpy as np

from lwfc_host.evaluate.code_lengths import GROUPS, channel_groups, classes3, heldout_bits, median_edge, neighbour


def bits_left_above(idx: np.ndarray, fit: np.ndarray, groups: np.ndarray) -> float:
    ctx = groups * 9 + 3 * classes3(neighbour(idx, 0, 1)) + classes3(neighbour(idx, 1, 0))
    return heldout_bits(ctx, idx, fit, GROUPS * 9, int(idx.max()) + 1)


def bits_more_neighbours(idx: np.ndarray, fit: np.ndarray, groups: np.ndarray) -> float:
    base = groups * 9 + 3 * classes3(neighbour(idx, 0, 1)) + classes3(neighbour(idx, 1, 0))
    extra = sum((neighbour(idx, dy, dx) > 0).astype(np.int64) << k
                for k, (dy, dx) in enumerate([(1, 1), (1, -1), (2, 0)]))
    return heldout_bits(base * 8 + extra, idx, fit, GROUPS * 72, int(idx.max()) + 1)


def correlation_chain(idx: np.ndarray, fit: np.ndarray) -> np.ndarray:
    """prev[c]: the channel coded before c (-1 for the first): a greedy chain, each step to the channel most
    correlated with the last one, starting from the channel of largest variance."""
    flat = idx[fit].reshape(-1, idx.shape[-1]).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):  # a constant channel correlates with nothing: 0
        corr = np.nan_to_num(np.corrcoef(flat, rowvar=False)) if flat.std(axis=0).max() > 0 else np.zeros((1, 1))
    c = idx.shape[-1]
    order = [int(np.argmax(flat.var(axis=0)))]
    left = set(range(c)) - set(order)
    while left:
        last = order[-1]
        nxt = max(left, key=lambda k: corr[last, k] if corr.shape[0] > 1 else 0.0)
        order.append(nxt)
        left.remove(nxt)
    prev = np.full(c, -1, dtype=np.int64)
    for a, b in zip(order, order[1:]):
        prev[b] = a
    return prev


def bits_cross_channel(idx: np.ndarray, fit: np.ndarray, groups: np.ndarray) -> float:
    prev = correlation_chain(idx, fit)
    co_located = np.where(prev >= 0, idx[..., np.maximum(prev, 0)], 0)
    ctx = (groups * 9 + 3 * classes3(neighbour(idx, 0, 1)) + classes3(neighbour(idx, 1, 0))) * 3 \
        + classes3(co_located)
    return heldout_bits(ctx, idx, fit, GROUPS * 27, int(idx.max()) + 1)


def _gradient_region(d: np.ndarray) -> np.ndarray:
    """JPEG-LS-style quantized gradient: 0, +-1, +-2, +-3 (3-4), +-4 (5 and more), for small index alphabets."""
    m = np.abs(d)
    q = np.select([m == 0, m == 1, m == 2, m <= 4], [0, 1, 2, 3], 4)
    return np.sign(d) * q


def bits_loco(idx: np.ndarray, fit: np.ndarray, groups: np.ndarray, levels: int) -> float:
    a, b = neighbour(idx, 0, 1), neighbour(idx, 1, 0)
    c, d = neighbour(idx, 1, 1), neighbour(idx, 1, -1)
    pred = median_edge(a, b, c)
    q = np.stack([_gradient_region(d - b), _gradient_region(b - c), _gradient_region(c - a)])
    first_nonzero = np.where(q[0] != 0, q[0], np.where(q[1] != 0, q[1], q[2]))
    sign = np.where(first_nonzero < 0, -1, 1)
    q = q * sign
    ctx = groups * 729 + (q[0] + 4) * 81 + (q[1] + 4) * 9 + (q[2] + 4)
    n_ctx = GROUPS * 729
    err = sign * (idx - pred)
    flat_ctx, flat_err = ctx[fit].ravel(), err[fit].ravel()
    bias = np.rint(np.bincount(flat_ctx, flat_err, n_ctx) / np.maximum(np.bincount(flat_ctx, None, n_ctx), 1))
    corrected = np.clip(pred + sign * bias[ctx].astype(np.int64), 0, levels - 1)
    residual = np.mod(sign * (idx - corrected) + levels // 2, levels)  # invertible given the prediction
    return heldout_bits(ctx, residual, fit, n_ctx, levels)


def v1_models(idx: np.ndarray, design: Any, levels: int) -> np.ndarray:
    """The model each element is coded with under a v1 context design (SPEC.md 4.2: channel group and the
    classes of the above and left indices, N outside, then ``model_of_context``)."""
    from lwfc.tables import context_number
    from lwfc_host.codec.fast import neighbours

    above, left = neighbours(idx, levels)
    cls = np.asarray(design.neighbour_class, dtype=np.int64)
    x = context_number(np.asarray(design.labels, dtype=np.int64), cls[above], cls[left], design.classes)
    return np.asarray(design.model_of_context, dtype=np.int64)[x]


def bits_v1_cross_channel(idx: np.ndarray, fit: np.ndarray, design: Any, levels: int) -> tuple[float, float]:
    """(v1's contexts, v1's contexts with the correlated channel's class added): both by this module's
    estimator, so that the pair shows whether the cross-channel gain adds to v1's design."""
    models = v1_models(idx, design, levels)
    n_models = int(models.max()) + 1
    prev = correlation_chain(idx, fit)
    co_located = classes3(np.where(prev >= 0, idx[..., np.maximum(prev, 0)], 0))
    return (heldout_bits(models, idx, fit, n_models, levels),
            heldout_bits(models * 3 + co_located, idx, fit, n_models * 3, levels))


def index_schemes(idx: np.ndarray, fit: np.ndarray, levels: int) -> dict[str, float]:
    """Bits per element of every index-domain scheme on the same indices."""
    from lwfc.tables import MAX_LEVELS_V1
    from lwfc_host.design.contexts import design_contexts

    groups = np.broadcast_to(channel_groups(idx, fit), idx.shape)
    nan = float("nan")
    design = (design_contexts(idx.astype(np.uint8), levels, spec_version=1) if levels <= MAX_LEVELS_V1
              else None)
    v1_same, v1_cross = bits_v1_cross_channel(idx, fit, design, levels) if design else (nan, nan)
    v2 = design_contexts(idx.astype(np.uint8), levels, spec_version="auto")  # reference channels where they win
    return {
        "v1 designed": design.heldout_bits if design else nan,  # v1 tables have at most 16 levels
        "v2 designed": v2.heldout_bits,
        "v1 contexts, KT estimate": v1_same,
        "v1 + cross-channel": v1_cross,
        "left+above": bits_left_above(idx, fit, groups),
        "more neighbours": bits_more_neighbours(idx, fit, groups),
        "cross-channel": bits_cross_channel(idx, fit, groups),
        "LOCO-I": bits_loco(idx, fit, groups, levels),
    }
