"""Entropy models: integer frequencies, channel groups found by clustering, the choice of G, contexts.

* Frequencies: counts + 1/2 (no symbol may have zero probability), scaled to the spec's 2^24 total by
  ``tablefile.integer_frequencies``.
* Channel groups: k-means on per-channel index histograms with the code length as the distance
  (each channel goes to the group model that codes its counts in the fewest bits; a group's model is
  its pooled counts). This is Bregman (KL) clustering: every step lowers the total bits.
* G: the count (1 .. min(C, 256)) minimising total bits = data bits on the calibration set + the bits
  of the table's models and channel map (section 5 of codec_spec/DESIGN-quantizer.md).
* Contexts with neighbour classes (K > 1) are counted on whole sampled tensors with
  ``lwfc_host.codec.fast.context_map``, the host's one vectorised form of the spec's context rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lwfc.tables import MAX_GROUPS, TOTAL
from lwfc_host.codec.fast import context_map
from lwfc_host.design.tablefile import integer_frequencies

FREQ_BITS = 24  # one stored frequency


def code_lengths(counts: np.ndarray) -> np.ndarray:
    """-log2 of the probabilities of the integer frequencies fitted on ``counts`` (rows)."""
    counts = np.atleast_2d(counts)
    freqs = np.array([integer_frequencies(row) for row in counts], dtype=np.float64)
    return -np.log2(freqs / TOTAL)


def coded_bits(counts: np.ndarray, fitted_on: np.ndarray | None = None) -> float:
    """Bits to code ``counts`` (rows = models) with the integer models fitted on ``fitted_on``."""
    fitted_on = counts if fitted_on is None else fitted_on
    return float((np.atleast_2d(counts) * code_lengths(fitted_on)).sum())


def table_bits(groups: int, levels: int, channels: int, models: int | None = None) -> int:
    """Side information of the entropy models: N - 1 free 24-bit frequencies per model, and
    ceil(log2 G) bits per channel for the channel map."""
    models = groups if models is None else models
    return models * (levels - 1) * FREQ_BITS + channels * (math.ceil(math.log2(groups)) if groups > 1 else 0)


def _smoothed_lengths(pooled: np.ndarray) -> np.ndarray:
    p = (pooled + 0.5) / (pooled + 0.5).sum(axis=1, keepdims=True)
    return -np.log2(p)


def _fill_empty(labels: np.ndarray, groups: int, ch_counts: np.ndarray, cost: np.ndarray | None = None) -> np.ndarray:
    """Give every empty group one channel: the most expensive channel of a group with several members."""
    labels = labels.copy()
    for g in range(groups):
        sizes = np.bincount(labels, minlength=groups)
        if sizes[g]:
            continue
        own = cost[np.arange(len(labels)), labels] if cost is not None else ch_counts.sum(axis=1).astype(float)
        own = np.where(sizes[labels] > 1, own, -np.inf)
        labels[int(np.argmax(own))] = g
    return labels


def cluster_channels(ch_counts: np.ndarray, groups: int, iterations: int = 50) -> tuple[np.ndarray, float]:
    """Assign C channels to ``groups`` groups minimising the total code length of their index counts.

    Initialisation: channels sorted by mean index, cut into groups of equal mass (and, as a second
    start, sorted by the probability of index 0); Lloyd iterations with the code length as distance.
    Returns (channel -> group labels, total bits with the integer models)."""
    c, n = ch_counts.shape
    groups = min(groups, c)
    if groups == 1:
        return np.zeros(c, dtype=np.int64), coded_bits(ch_counts.sum(axis=0))
    tot = ch_counts.sum(axis=1)
    p = ch_counts / np.maximum(tot, 1)[:, None]
    starts = [p @ np.arange(n), p[:, 0]]
    best_labels, best_bits = None, np.inf
    for key in starts:
        order = np.argsort(key, kind="stable")
        cum = np.cumsum(tot[order]) / max(tot.sum(), 1)
        labels = np.empty(c, dtype=np.int64)
        labels[order] = np.minimum((cum * groups - 1e-9).astype(np.int64), groups - 1)
        for _ in range(iterations):
            labels = _fill_empty(labels, groups, ch_counts)
            pooled = np.zeros((groups, n))
            np.add.at(pooled, labels, ch_counts)
            cost = ch_counts @ _smoothed_lengths(pooled).T  # (C, G) bits of channel c under model g
            new = _fill_empty(np.argmin(cost, axis=1), groups, ch_counts, cost)
            if np.array_equal(new, labels):
                break
            labels = new
        pooled = np.zeros((groups, n))
        np.add.at(pooled, labels, ch_counts)
        bits = coded_bits(pooled)
        if bits < best_bits:
            best_labels, best_bits = labels.copy(), bits
    # relabel groups in order of first appearance so that equal designs give equal tables
    _, first = np.unique(best_labels, return_index=True)
    relabel = np.empty(groups, dtype=np.int64)
    relabel[best_labels[np.sort(first)]] = np.arange(groups)
    return relabel[best_labels], best_bits


def group_candidates(channels: int) -> list[int]:
    """G values tried by ``choose_groups``: 1..16, then 4 per octave up to min(C, 256)."""
    gmax = min(channels, MAX_GROUPS)
    cands = set(range(1, min(gmax, 16) + 1))
    g = 16.0
    while g < gmax:
        g *= 2 ** (1 / 4)
        cands.add(min(int(round(g)), gmax))
    cands.add(gmax)
    return sorted(cands)


@dataclass
class GroupChoice:
    """Chosen grouping: labels, G, data bits, table bits, and bits for every G tried."""

    labels: np.ndarray
    groups: int
    data_bits: float
    side_bits: int
    tried: dict[int, tuple[float, int]]


def choose_groups(ch_counts: np.ndarray, groups: int | str = "auto", amortise: float = 1.0,
                  candidates: list[int] | None = None) -> GroupChoice:
    """Group channels. ``groups`` = an int G, or 'auto': minimise data bits + table bits / ``amortise``
    (the number of calibration sets' worth of data one table serves; 1 = the table is charged once
    against the whole calibration set)."""
    c, n = ch_counts.shape
    gmax = min(c, MAX_GROUPS)
    if groups != "auto":
        g = int(groups)
        if not 1 <= g <= gmax:
            raise ValueError(f"groups must be in 1..min(C, {MAX_GROUPS}) = {gmax}, got {g}")
        labels, bits = cluster_channels(ch_counts, g)
        return GroupChoice(labels, g, bits, table_bits(g, n, c), {g: (bits, table_bits(g, n, c))})
    tried: dict[int, tuple[float, int]] = {}
    best = None
    for g in candidates or group_candidates(c):
        labels, bits = cluster_channels(ch_counts, g)
        side = table_bits(g, n, c)
        tried[g] = (bits, side)
        if best is None or bits + side / amortise < best[0]:
            best = (bits + side / amortise, g, labels, bits, side)
    _, g, labels, bits, side = best
    return GroupChoice(labels, g, bits, side, tried)


def count_contexts(indices: np.ndarray, proto) -> np.ndarray:
    """Counts[context, index] over (B, H, W, C) index arrays, contexts by the spec's rule
    (``lwfc_host.codec.fast.context_map``). One tensor at a time: the int64 context map of a whole
    batch would take 8 bytes per element."""
    n = proto.levels
    k = proto.classes
    counts = np.zeros((proto.groups * proto.reference_classes * k * k, n), dtype=np.int64)
    for idx in indices.reshape((-1,) + indices.shape[-3:]):
        idx = idx.astype(np.int64)
        ctx = context_map(idx, proto)
        counts += np.bincount((ctx * n + idx).ravel(), minlength=counts.size).reshape(counts.shape)
    return counts
