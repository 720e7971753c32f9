"""Design of the context entropy models (SPEC.md 4.2) from calibration tensors: channel groups, neighbour
classes, (version 2) reference channels and reference classes, and merged context models.

Everything is derived from arrays of *counts*: how often index s occurs at an element of channel c whose
above and left neighbours fall in fine classes (a, l) and, with reference channels, whose reference index
falls in reference class rho. Any choice of channel groups, neighbour-class map and model merging only sums
entries of such an array, so hundreds of candidate designs cost no further pass over the data. Up to 16
levels a neighbour's fine class is its value (0..N, N meaning "outside the slice"); above, values are first
binned into at most ``FINE_CLASSES`` contiguous fine classes of about equal mass (0 and "outside" on their
own), which keeps the counts at C * 17^2 * N rather than C * (N+1)^2 * N and the class search cheap.

The search, for each candidate number of channel groups G (the version 1 grid):

1. channel groups: the K = 1 clustering of ``entropy_models.cluster_channels`` (per-channel histograms);
2. neighbour-class map: agglomerative -- start with one class per fine class, merge the two classes whose
   merge raises the fit tensors' conditional code length least, record the map at every K;
3. models: contexts (g, rho, class_above, class_left) are merged greedily (``model_of_context``) while a merge
   costs fewer data bits than the bits of the model table it saves (MDL); empty or rare contexts merge first
   because merging them costs (almost) nothing;
4. score: bits of the *held-out* calibration tensors coded with the integer models fitted on the fit tensors,
   plus the table's side information spread over the calibration data (as ``choose_groups`` does).

Version 2 (``spec_version`` 2 or "auto") adds, starting from the best version 1 design:

5. more neighbour classes: K up to R*K^2 <= 256 rather than K^2*N <= 256 (at 8 and more levels), at the best
   channel groupings;
6. reference channels (``reference_structures``): a two-layer structure -- a set of base channels, each other
   channel given its best base channel or none -- by greedy facility location on the mutual information
   that the absolute correlation of the fit tensors' indices implies, for several base-set sizes;
7. reference classes: agglomerative merging of the reference index values (N = "no reference") on counts
   conditioned on the best design's neighbour classes, giving the maps for R = 2..``MAX_REFERENCE_CLASSES``;
8. each (structure, R) is screened at the best design's G and K; the best two get a local search over G and K
   with neighbour classes designed again on the reference-conditioned counts.

With ``spec_version`` "auto" version 2 wins only where it codes the held-out tensors in fewer bits and scores
lower (held-out bits plus side information); otherwise the best version 1 design is kept and old devices
read the table. The best design's models are then refitted on all calibration tensors. Code lengths use the
spec's integer frequencies (``tablefile.integer_frequencies``), so the scores are what the range coder
spends up to the final flush.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from lwfc.tables import MAX_GROUPS, MAX_KEYS, MAX_LEVELS, MAX_LEVELS_V1, TOTAL
from lwfc_host.design import entropy_models as em
from lwfc_host.design.tablefile import integer_frequencies

FREQ_BITS = em.FREQ_BITS
FINE_CLASSES = 17  # neighbour / reference values are binned to at most this many fine classes (N + 1 up to 16 levels)
MAX_REFERENCE_CLASSES = 4  # R tried: 2..4 (more gained under 0.5% on real layers, at a third more time)
SPEC_VERSIONS = ("auto", 1, 2)
COUNT_BUDGET = 1 << 22  # elements (and count bins) handled at once while counting: bounds the temporaries
SAMPLE_ELEMENTS = 1 << 23  # fit elements the fine classes, reference channels and reference classes are chosen on


def max_classes(levels: int) -> int:
    """Version 1's limit on K for ``levels`` quantization indices: K^2 N <= 256, and at most N + 1 classes."""
    return min(levels + 1, int(math.isqrt(256 // levels)))


def max_classes_v2(levels: int, reference_classes: int = 1) -> int:
    """Version 2's limit on K: R K^2 <= 256 with R reference classes, and at most N + 1 classes."""
    return min(levels + 1, int(math.isqrt(256 // reference_classes)))


def check_spec_version(spec_version: int | str) -> int | str:
    """'auto', 1 or 2 (also given as the strings '1', '2')."""
    if spec_version in ("1", "2"):
        spec_version = int(spec_version)
    if spec_version not in SPEC_VERSIONS:
        raise ValueError(f"spec version must be auto, 1 or 2, got {spec_version!r}")
    return spec_version


# ---- counting ----------------------------------------------------------------------------------------------------
def joint_counts(indices: np.ndarray, levels: int) -> np.ndarray:
    """Counts (C, N+1, N+1, N) of (channel, above index, left index, index) over (B, H, W, C) indices."""
    idx = np.asarray(indices).reshape((-1,) + np.shape(indices)[-3:])
    return fine_counts(idx, levels, np.arange(levels + 1))[0, :, 0]


def fine_map(value_counts: np.ndarray, levels: int, bins: int = FINE_CLASSES) -> np.ndarray:
    """Fine class (0..F-1, F <= ``bins``) of each neighbour value 0..N (N = outside / no reference).

    Up to ``bins`` - 1 levels every value is its own fine class. Above, value 0 and N keep their own classes
    and 1..N-1 are cut into contiguous runs of about equal mass in ``value_counts`` (counts of 0..N-1)."""
    n = levels
    if n + 1 <= bins:
        return np.arange(n + 1, dtype=np.int64)
    inner = bins - 2
    cnt = np.asarray(value_counts, dtype=np.float64)[1:n] + 1e-3 * max(float(np.sum(value_counts)), 1.0) / n
    pos = (np.cumsum(cnt) - 0.5 * cnt) / cnt.sum()
    runs = np.minimum((pos * inner).astype(np.int64), inner - 1)
    _, runs = np.unique(runs, return_inverse=True)  # consecutive run numbers, none empty
    out = np.empty(n + 1, dtype=np.int64)
    out[0] = 0
    out[1:n] = runs + 1
    out[n] = out[1:n].max() + 1
    return out


def fine_counts(indices: np.ndarray, levels: int, fine: np.ndarray, reference_channel: np.ndarray | None = None,
                   reference_map: np.ndarray | None = None, part_of: np.ndarray | None = None,
                   parts: int = 1) -> np.ndarray:
    """Counts (P, C, Rr, F, F, N) of (part, channel, reference class, fine class of the above neighbour, of the
    left neighbour, index) over (B, H, W, C) indices, with tensor b in part ``part_of[b]`` (all in part 0 when
    None). ``fine`` maps values 0..N (N = outside) to F fine classes; ``reference_map`` maps the reference
    index 0..N (N = no reference; every channel whose ``reference_channel`` is -1) to Rr classes (Rr = 1
    without references). Counted a few tensors and channels at a time; stored as int32."""
    idx = np.asarray(indices).reshape((-1,) + np.shape(indices)[-3:])
    b, h, w, c = idx.shape
    n = levels
    fine = np.asarray(fine, dtype=np.int64)
    f = int(fine.max()) + 1
    rmap = np.zeros(n + 1, dtype=np.int64) if reference_map is None else np.asarray(reference_map, dtype=np.int64)
    rr = int(rmap.max()) + 1
    part_of = np.zeros(b, dtype=np.int64) if part_of is None else np.asarray(part_of, dtype=np.int64)
    per_channel = rr * f * f * n
    out = np.zeros((parts, c, rr, f, f, n), dtype=np.int32)
    cb = max(1, min(c, COUNT_BUDGET // max(per_channel * parts, 1)))  # channels per block
    tb = max(1, COUNT_BUDGET // max(h * w * cb, 1))  # tensors per chunk
    fine8 = fine.astype(np.uint8) if f <= 256 else fine
    rmap8 = rmap.astype(np.uint8) if rr <= 256 else rmap
    rc_all = None if reference_channel is None else np.asarray(reference_channel, dtype=np.int64)
    for c0 in range(0, c, cb):
        c1 = min(c, c0 + cb)
        block = np.zeros(parts * (c1 - c0) * per_channel, dtype=np.int64)
        lead = (np.arange(parts, dtype=np.int32)[:, None] * (c1 - c0) + np.arange(c1 - c0, dtype=np.int32)) * rr
        for t0 in range(0, b, tb):
            x = idx[t0:t0 + tb, :, :, c0:c1]
            t1 = t0 + len(x)
            # key = ((((part * Cb + channel) * Rr + reference class) * F + above) * F + left) * N + index, in int32
            key = np.empty(x.shape, dtype=np.int32)
            key[...] = lead[part_of[t0:t1]][:, None, None, :]
            if rc_all is not None:
                rc = rc_all[c0:c1]
                ref = idx[t0:t1][..., np.maximum(rc, 0)]
                ref[..., rc < 0] = n
                key += rmap8[ref]
            key *= f
            key[:, 0] += fine8[n]
            key[:, 1:] += fine8[x[:, :-1]]
            key *= f
            key[:, :, 0] += fine8[n]
            key[:, :, 1:] += fine8[x[:, :, :-1]]
            key *= n
            key += x
            block += np.bincount(key.ravel(), minlength=block.size)
        out[:, c0:c1] = block.reshape(parts, c1 - c0, rr, f, f, n)
    return out


def _group_sum(per_channel: np.ndarray, labels: np.ndarray, groups: int) -> np.ndarray:
    """Sum over channels of (C, ...) counts into (G, ...) float64 by channel -> group ``labels``."""
    order = np.argsort(labels, kind="stable")
    sizes = np.bincount(labels, minlength=groups)
    out = np.zeros((groups,) + per_channel.shape[1:])
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    present = sizes > 0
    out[present] = np.add.reduceat(per_channel[order].astype(np.float64), starts[present], axis=0)
    return out


# ---- code lengths ------------------------------------------------------------------------------------------------
def _ideal_bits(counts: np.ndarray) -> float:
    """Adaptive-free conditional code length of count rows (last axis = symbols), add-half smoothed."""
    c = counts.reshape(-1, counts.shape[-1]).astype(np.float64) + 0.5
    p = c / c.sum(axis=1, keepdims=True)
    return float(-((c - 0.5) * np.log2(p)).sum())


def _row_bits(t: np.ndarray) -> np.ndarray:
    """``_ideal_bits`` of each row (last axis = symbols) of ``t``: -sum x log2((x + 1/2) / (total + N/2))."""
    tot = t.sum(axis=-1)
    return -(t * np.log2(t + 0.5)).sum(axis=-1) + tot * np.log2(tot + 0.5 * t.shape[-1])


def _lengths(rows: np.ndarray) -> np.ndarray:
    """Code lengths (bits) of the spec's integer frequencies fitted on each count row."""
    rows = np.atleast_2d(rows)
    f = np.array([integer_frequencies(r) for r in rows], dtype=np.float64)
    return -np.log2(f / TOTAL)


def _by_class(group_joint: np.ndarray, cmap: np.ndarray, k: int) -> np.ndarray:
    """(X, F, F, N) counts -> (X, K, K, N) context counts under class map ``cmap`` (F entries)."""
    cmap = np.asarray(cmap, dtype=np.int64)
    order = np.argsort(cmap, kind="stable")
    starts = np.searchsorted(cmap[order], np.arange(k))
    if np.bincount(cmap, minlength=k).min() == 0:  # an empty class: sum by one-hot products
        onehot = np.zeros((len(cmap), k))
        onehot[np.arange(len(cmap)), cmap] = 1.0
        return np.einsum("xabs,ai,bj->xijs", group_joint, onehot, onehot)
    t = np.add.reduceat(np.asarray(group_joint, dtype=np.float64)[:, order], starts, axis=1)
    return np.add.reduceat(t[:, :, order], starts, axis=2)


def _coarse_symbols(t: np.ndarray, bins: int = FINE_CLASSES) -> np.ndarray:
    """Counts with more than ``bins`` symbols summed into ``bins`` contiguous symbol runs of about equal mass
    (the class searches judge merges on these; the models keep every symbol)."""
    n = t.shape[-1]
    if n <= bins:
        return t
    runs = fine_map(t.reshape(-1, n).sum(axis=0), n, bins)[:n]
    k = int(runs.max()) + 1
    onehot = np.zeros((n, k))
    onehot[np.arange(n), runs] = 1.0
    return t @ onehot


# ---- class maps by agglomeration ---------------------------------------------------------------------------------
def class_maps(group_joint: np.ndarray, kmax: int) -> dict[int, list[int]]:
    """Neighbour-class maps for K = 1..kmax by agglomerative merging of fine neighbour classes on counts
    (X, F, F, N) of (context group, above, left, index); each map has F entries.

    Which values share a class is learnt, not assumed: e.g. "outside" usually joins the class of the
    most common index (0 after a ReLU), and high indices that rarely occur merge with their neighbours.
    Each step merges the pair whose merge raises the total code length least; only the cells in the two
    rows and columns change, so a candidate costs O(X F N), not a recount."""
    t = _coarse_symbols(np.asarray(group_joint, dtype=np.float64))
    t = t.reshape((-1,) + t.shape[-3:])
    f = t.shape[1]
    cmap = np.arange(f)
    maps: dict[int, list[int]] = {}
    k = f
    if k <= kmax:
        maps[k] = cmap.tolist()
    while k > 1:
        cell = _row_bits(t)  # (X, k, k)
        rows, cols = cell.sum(axis=2), cell.sum(axis=1)  # (X, k)
        best = None
        for i in range(k - 1):
            js = np.arange(i + 1, k)
            merged_rows = t[:, i][:, None] + t[:, js]  # (X, J, k, N): rows i + j, columns not yet merged
            merged_cols = (t[:, :, i][:, None] + t[:, :, js].transpose(0, 2, 1, 3))  # (X, J, k, N): cols i + j
            rb = _row_bits(merged_rows)  # (X, J, k)
            cbits = _row_bits(merged_cols)
            jj = np.arange(len(js))
            corner = merged_rows[:, jj, i] + merged_rows[:, jj, js]  # (X, J, N)
            new = (rb.sum(axis=2) - rb[:, :, i] - rb[:, jj, js] + _row_bits(corner)
                   + cbits.sum(axis=2) - cbits[:, :, i] - cbits[:, jj, js])
            old = (rows[:, i][:, None] + rows[:, js] + cols[:, i][:, None] + cols[:, js]
                   - cell[:, i, i][:, None] - cell[:, i, js] - cell[:, js, i] - cell[:, js, js])
            delta = (new - old).sum(axis=0)
            m = int(np.argmin(delta))
            if best is None or delta[m] < best[0]:
                best = (float(delta[m]), i, int(js[m]))
        _, i, j = best
        t = t.copy()
        t[:, i] += t[:, j]
        t[:, :, i] += t[:, :, j]
        t = np.delete(np.delete(t, j, axis=1), j, axis=2)
        cmap = _merge_labels(cmap, i, j)
        k -= 1
        if k <= kmax:
            maps[k] = cmap.tolist()
    return maps


def _merge_labels(cmap: np.ndarray, i: int, j: int) -> np.ndarray:
    """A class map after class j (> i) merges into class i: later classes move down by one."""
    cmap = np.where(cmap == j, i, cmap)
    return np.where(cmap > j, cmap - 1, cmap)


def value_class_maps(counts: np.ndarray, kmax: int) -> dict[int, list[int]]:
    """Class maps for K = 1..kmax of the values along axis -2 of counts (..., F, N) (e.g. reference values
    under fixed other contexts), by agglomerative merging as ``class_maps`` does along one axis."""
    t = _coarse_symbols(np.asarray(counts, dtype=np.float64))
    t = t.reshape((-1,) + t.shape[-2:])
    f = t.shape[1]
    cmap = np.arange(f)
    maps: dict[int, list[int]] = {}
    k = f
    if k <= kmax:
        maps[k] = cmap.tolist()
    while k > 1:
        cell = _row_bits(t)  # (X, k)
        iu, ju = np.triu_indices(k, 1)
        delta = (_row_bits(t[:, iu] + t[:, ju]) - cell[:, iu] - cell[:, ju]).sum(axis=0)
        m = int(np.argmin(delta))
        i, j = int(iu[m]), int(ju[m])
        t = t.copy()
        t[:, i] += t[:, j]
        t = np.delete(t, j, axis=1)
        cmap = _merge_labels(cmap, i, j)
        k -= 1
        if k <= kmax:
            maps[k] = cmap.tolist()
    return maps


# ---- model merging -----------------------------------------------------------------------------------------------
MERGE_BLOCK = 384  # contexts merged pairwise at once before merging is done blockwise
SECOND_STAGE = 2048  # the blockwise merge's models are merged with each other when there are at most this many


def merge_models(ctx_counts: np.ndarray, model_bits: float, groups: int = 1,
                 max_models: int | None = None) -> np.ndarray:
    """Context -> model map for contexts numbered g * P + (local context), P = contexts per group (R K^2), see
    ``_merge_rows``. With many contexts (G P > MERGE_BLOCK) the contexts of each local context are merged
    across groups first (all local contexts at once, ``merge_blocks``), then the resulting models with each
    other. At most ``max_models`` models (merging goes on past the MDL rule until they fit)."""
    ctx_counts = np.asarray(ctx_counts, dtype=np.float64)
    x = len(ctx_counts)
    if x <= MERGE_BLOCK:
        return _merge_rows(ctx_counts, model_bits, max_models)
    kk = x // groups
    blocks = ctx_counts.reshape(groups, kk, -1).transpose(1, 0, 2)  # (local context, group, N)
    sub = merge_blocks(blocks, model_bits)  # (kk, G)
    per_block = sub.max(axis=1) + 1
    offset = np.concatenate([[0], np.cumsum(per_block)[:-1]])
    labels = (sub + offset[:, None]).T.reshape(-1)  # context g * kk + pair -> first-stage model
    rows_a = np.zeros((int(per_block.sum()), ctx_counts.shape[1]))
    np.add.at(rows_a, labels, ctx_counts)
    if len(rows_a) <= SECOND_STAGE or (max_models is not None and len(rows_a) > max_models):
        labels = _merge_rows(rows_a, model_bits, max_models)[labels]
    # relabel in order of first appearance
    _, first = np.unique(labels, return_index=True)
    relabel = np.empty(int(labels.max()) + 1, dtype=np.int64)
    relabel[labels[np.sort(first)]] = np.arange(len(first))
    return relabel[labels]


def _merge_rows(ctx_counts: np.ndarray, model_bits: float, max_models: int | None = None) -> np.ndarray:
    """Context -> model map: merge contexts greedily while merging two models raises the (ideal) data bits
    by less than ``model_bits``, the side information one model costs (and while there are more than
    ``max_models``). Returns labels 0..M-1 in order of first appearance."""
    return merge_blocks(np.asarray(ctx_counts, dtype=np.float64)[None], model_bits, max_models)[0]


def _compact(alive: np.ndarray) -> np.ndarray:
    """(P, m) positions of each block's live rows, in order, padded with a dead row's position (m = the most
    live rows of a block)."""
    p, x = alive.shape
    m = max(int(alive.sum(axis=1).max()), 1)
    order = np.argsort(~alive, axis=1, kind="stable")[:, :m]  # live rows first, each in its old order
    return order


def merge_blocks(blocks: np.ndarray, model_bits: float, max_models: int | None = None) -> np.ndarray:
    """``_merge_rows`` on each of P blocks of X count rows (P, X, N) at once: labels (P, X), each block's
    0..M-1 in order of first appearance. Every step merges, in each block still merging, the pair of rows
    whose merge costs fewest bits (the first such pair in row-major order); the pair costs are kept in a
    (P, X, X) upper-triangular matrix with each row's minimum, so a step costs O(P X N). Merged-away rows
    are dropped from the matrices (keeping the others' order) whenever they are most of them."""
    mat = np.array(blocks, dtype=np.float64)
    p, x, _ = mat.shape
    parent = np.tile(np.arange(x), (p, 1))
    if x > 1:
        # empty rows cost nothing to merge with anything: the greedy puts them all with the first non-empty
        # row (pairs of equal cost are taken in row-major order), so do that at once
        empty = mat.sum(axis=2) == 0
        first = np.where(empty.all(axis=1), 0, np.argmax(~empty, axis=1))
        pb, pr = np.nonzero(empty & (np.arange(x)[None] != first[:, None]))
        parent[pb, pr] = first[pb]
        alive = np.ones((p, x), dtype=bool)
        alive[pb, pr] = False
        keep = _compact(alive)  # position -> original row
        blk = np.arange(p)[:, None]
        mat, alive = mat[blk, keep], alive[blk, keep]
        x = keep.shape[1]
        cost = _row_bits(mat)  # (P, X)
        pair = np.full((p, x, x), np.inf)
        for i in range(x - 1):
            pair[:, i, i + 1:] = _row_bits(mat[:, i:i + 1] + mat[:, i + 1:]) - cost[:, i:i + 1] - cost[:, i + 1:]
        pair = np.where(alive[:, :, None] & alive[:, None, :], pair, np.inf)
        left = alive.sum(axis=1)
        rowarg = pair.argmin(axis=2)
        rowmin = np.take_along_axis(pair, rowarg[:, :, None], axis=2)[:, :, 0]
        while True:
            if x > 32 and left.max() <= x // 2:
                pos = _compact(alive)
                keep = keep[blk, pos]
                mat, alive, cost = mat[blk, pos], alive[blk, pos], cost[blk, pos]
                pair = pair[blk[:, :, None], pos[:, :, None], pos[:, None, :]]
                pair = np.where(alive[:, :, None] & alive[:, None, :], pair, np.inf)
                x = pos.shape[1]
                rowarg = pair.argmin(axis=2)
                rowmin = np.take_along_axis(pair, rowarg[:, :, None], axis=2)[:, :, 0]
            cols = np.arange(x)
            i_all = rowmin.argmin(axis=1)
            best = rowmin[np.arange(p), i_all]
            go = (best < model_bits) & (left > 1)
            if max_models is not None:
                go |= (left > max_models) & np.isfinite(best)
            act = np.flatnonzero(go)
            if not len(act):
                break
            i = i_all[act]
            j = rowarg[act, i]
            mat[act, i] += mat[act, j]
            parent[act, keep[act, j]] = keep[act, i]
            alive[act, j] = False
            left[act] -= 1
            cost[act, i] = _row_bits(mat[act, i])
            pair[act, j, :] = np.inf
            pair[act, :, j] = np.inf
            d = _row_bits(mat[act, i][:, None, :] + mat[act]) - cost[act, i][:, None] - cost[act]  # (A, X)
            d = np.where(alive[act] & (cols[None] != i[:, None]), d, np.inf)
            upper = cols[None] > i[:, None]
            pair[act, i, :] = np.where(upper, d, np.inf)
            lower = np.where(upper, np.inf, d)  # column i of the rows above i
            pair[act, :, i] = lower
            rowmin[act, j] = np.inf
            # rows above i: the new entry in column i may be their minimum, or their minimum was at i or j
            stale = (rowarg[act] == i[:, None]) | (rowarg[act] == j[:, None])
            better = lower < rowmin[act]
            rm, ra = rowmin[act], rowarg[act]
            rm = np.where(better, lower, rm)
            ra = np.where(better, i[:, None], ra)
            stale &= ~better
            stale[np.arange(len(act)), i] = True  # row i itself: recomputed
            rowmin[act], rowarg[act] = rm, ra
            sp, so = np.nonzero(stale)
            if len(sp):
                rows = pair[act[sp], so]  # (S, X)
                a = rows.argmin(axis=1)
                rowarg[act[sp], so] = a
                rowmin[act[sp], so] = rows[np.arange(len(sp)), a]
    # roots, then labels per block in order of first appearance
    rows = np.arange(p)[:, None]
    while True:
        nxt = parent[rows, parent]
        if np.array_equal(nxt, parent):
            break
        parent = nxt
    labels = np.empty(parent.shape, dtype=np.int64)
    for b in range(p):
        _, first, inv = np.unique(parent[b], return_index=True, return_inverse=True)
        order = np.argsort(np.argsort(first))
        labels[b] = order[inv]
    return labels


def _bits_of(v: int) -> int:
    return math.ceil(math.log2(v)) if v > 1 else 0


def table_side_bits(groups: int, classes: int, levels: int, channels: int, models: int, reference_classes: int = 1,
                    references: bool = False) -> int:
    """Side information of a context design: N - 1 free 24-bit frequencies per model, the channel map, the
    neighbour-class map, (with references) the reference channels and the reference-class map, and the
    context -> model map (each entry in as few bits as its range needs)."""
    side = (models * (levels - 1) * FREQ_BITS + channels * _bits_of(groups) + (levels + 1) * _bits_of(classes)
            + groups * reference_classes * classes * classes * _bits_of(models))
    if references:
        side += channels * _bits_of(channels + 1) + (levels + 1) * _bits_of(reference_classes)
    return side


# ---- reference channels ------------------------------------------------------------------------------------------
def channel_gains(indices: np.ndarray, sample: int = 1 << 18, seed: int = 0) -> np.ndarray:
    """(C, C) gain of coding channel c with channel r as its reference: the mutual information (bits) of two
    Gaussians with the correlation of the channels' indices, -1/2 log2(1 - rho^2) (|rho| capped at 0.999;
    0 for a constant channel and on the diagonal). Estimated on at most ``sample`` positions."""
    idx = np.asarray(indices)
    c = idx.shape[-1]
    flat = idx.reshape(-1, c)
    if len(flat) > sample:
        pick = np.sort(np.random.default_rng(seed).choice(len(flat), sample, replace=False))
        flat = flat[pick]
    x = flat.astype(np.float32)
    x -= x.mean(axis=0)
    cov = (x.T @ x).astype(np.float64)
    sd = np.sqrt(np.diag(cov))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = np.where(np.outer(sd, sd) > 0, cov / np.outer(sd, sd), 0.0)
    rho = np.clip(np.abs(rho), 0.0, 0.999)
    gain = -0.5 * np.log2(1.0 - rho * rho)
    np.fill_diagonal(gain, 0.0)
    return gain


def facility_location(gain: np.ndarray, max_bases: int) -> tuple[list[int], list[float]]:
    """Greedy facility location for the two-layer reference structure: base channels are added one at a time,
    each the one that raises sum over other channels c of max over bases r of gain[c, r] most (a base channel
    itself gains nothing). Returns the bases in the order chosen and the objective after each."""
    c = len(gain)
    cur = np.zeros(c)
    is_base = np.zeros(c, dtype=bool)
    order, value = [], []
    for _ in range(min(max_bases, c)):
        imp = np.maximum(gain - cur[:, None], 0.0)
        imp[is_base] = 0.0
        delta = imp.sum(axis=0) - cur
        delta[is_base] = -np.inf
        r = int(np.argmax(delta))
        is_base[r] = True
        cur = np.maximum(cur, gain[:, r])
        cur[is_base] = 0.0
        order.append(r)
        value.append(float(cur.sum()))
    return order, value


def assign_references(gain: np.ndarray, bases: list[int], min_gain: float = 0.0) -> np.ndarray:
    """reference_channel: each non-base channel's base channel of largest gain (-1 if below ``min_gain`` or
    none is positive); -1 for the bases."""
    c = len(gain)
    ref = np.full(c, -1, dtype=np.int64)
    if not bases:
        return ref
    b = np.asarray(bases, dtype=np.int64)
    g = gain[:, b]
    best = np.argmax(g, axis=1)
    ok = g[np.arange(c), best] > max(min_gain, 0.0)
    ref[ok] = b[best[ok]]
    ref[b] = -1
    return ref


def reference_structures(indices: np.ndarray, fractions: tuple[float, ...] = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2),
                         min_gain: float = 0.02) -> list[tuple[str, np.ndarray]]:
    """Candidate reference structures (name, reference_channel) from fit indices (B, H, W, C): greedy facility
    location, cut at base-set sizes of ``fractions`` of C and at the size where its objective peaks."""
    c = np.shape(indices)[-1]
    if c < 2:
        return []
    gain = channel_gains(indices)
    order, value = facility_location(gain, max(1, c // 2))
    sizes = {max(1, int(round(f * c))) for f in fractions} | {int(np.argmax(value)) + 1}
    out, seen = [], set()
    for k in sorted(s for s in sizes if s <= len(order)):
        ref = assign_references(gain, order[:k], min_gain)
        key = ref.tobytes()
        if (ref >= 0).any() and key not in seen:
            seen.add(key)
            out.append((f"{k} bases", ref))
    return out


# ---- the design --------------------------------------------------------------------------------------------------
@dataclass
class ContextDesign:
    """A chosen context structure and its models (counts on all calibration tensors)."""

    groups: int
    labels: np.ndarray  # channel -> group
    classes: int
    neighbour_class: list[int]  # N + 1 entries
    model_of_context: list[int]  # G R K^2 entries
    model_counts: np.ndarray  # (M, N) counts on all calibration tensors
    heldout_bits: float  # payload bits/element of the held-out tensors, models fitted on the fit tensors
    side_bits: int
    score: float  # held-out bits/element + side bits per calibration element / amortise
    tried: list[dict] = field(default_factory=list)
    reference_channel: list[int] | None = None  # C entries (-1: none); None: no references
    reference_classes: int = 1
    reference_class: list[int] | None = None  # N + 1 entries (entry N: no reference)
    version: int = 1  # the table version the design needs (1: readable by version 1 devices)
    alternatives: dict[str, dict] = field(default_factory=dict)  # best v1 / without / with references

    @property
    def models(self) -> int:
        return int(self.model_counts.shape[0])

    @property
    def dependent_channels(self) -> int:
        """Channels with a reference channel."""
        return 0 if self.reference_channel is None else int(sum(r >= 0 for r in self.reference_channel))

    @property
    def reference_bases(self) -> int:
        """Channels that are another channel's reference."""
        return 0 if self.reference_channel is None else len({r for r in self.reference_channel if r >= 0})

    def frequencies(self) -> list[list[int]]:
        return [integer_frequencies(r) for r in self.model_counts]


def split_fit_heldout(b: int, heldout_every: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Tensor numbers of the fit and held-out parts: every ``heldout_every``-th tensor is held out (all
    tensors are used for both when there are fewer than 2)."""
    allb = np.arange(b)
    if b < 2:
        return allb, allb
    held = allb[heldout_every - 1::heldout_every] if b >= heldout_every else allb[-1:]
    return np.setdiff1d(allb, held), held


def group_candidates(channels: int, levels: int, extra: list[int] | tuple[int, ...] = ()) -> list[int]:
    """G values tried with contexts: powers of two up to min(C, 256), plus ``extra`` (e.g. the K = 1 choice)."""
    gmax = min(channels, MAX_GROUPS)
    cands = {1, gmax} | {g for g in extra if 1 <= g <= gmax}
    g = 2
    while g < gmax:
        cands.add(g)
        g *= 2
    return sorted(cands)


@dataclass
class _Structure:
    """Per-channel counts (fit, held out) under one reference structure: counted with ``top`` reference classes
    and folded to R classes by ``fold`` (top class -> class) when summed into groups."""

    name: str
    reference_channel: np.ndarray | None  # None: no references
    reference_class: np.ndarray  # N + 1 entries -> 0..R-1
    fit: np.ndarray | None  # (C, top, F, F, N); None once released
    held: np.ndarray | None
    fold: np.ndarray | None = None  # top -> R; None: the identity

    @property
    def classes(self) -> int:
        return int(self.reference_class.max()) + 1

    def groups(self, per_channel: np.ndarray, labels: np.ndarray, g: int) -> np.ndarray:
        """(G, R, F, F, N) float64 group counts of (C, top, F, F, N) per-channel counts."""
        gj = _group_sum(per_channel, labels, g)
        if self.fold is None:
            return gj
        out = np.zeros((g, self.classes) + gj.shape[2:])
        for t, r in enumerate(self.fold):
            out[:, r] += gj[:, t]
        return out


class _Search:
    """The candidate designs of one ``design_contexts`` call: counts, channel groupings, class maps, scores."""

    def __init__(self, idx: np.ndarray, levels: int, amortise: float, heldout_every: int,
                 labels_of: dict[int, np.ndarray] | None) -> None:
        self.idx = idx
        b, _, _, self.channels = idx.shape
        self.levels = n = levels
        fit, held = split_fit_heldout(b, heldout_every)
        self.fit_ids, self.held_ids = fit, held
        self.disjoint = len(np.intersect1d(fit, held)) == 0
        part_of = np.zeros(b, dtype=np.int64)
        part_of[held] = 1
        self.part_of = part_of if self.disjoint else None
        # a sample of the fit tensors (at most SAMPLE_ELEMENTS) for the choices that need no exact counts
        step = max(1, math.ceil(len(fit) * idx[0].size / SAMPLE_ELEMENTS))
        self.fit_sample = idx[fit[::step]]
        self.values = np.bincount(self.fit_sample.ravel(), minlength=n)[:n]
        self.fine = fine_map(self.values, n)
        # Neighbour classes merge fine classes, so K cannot exceed them. Above 16 levels there can be fewer
        # than FINE_CLASSES: runs of equal-mass binning collapse when a few values hold most of the mass.
        self.fine_classes = int(self.fine.max()) + 1
        self.amortise = amortise
        self.model_bits = (n - 1) * FREQ_BITS / amortise
        self.max_models = MAX_KEYS // n
        self.labels_of = dict(labels_of or {})
        self.tried: list[dict] = []
        self.maps: dict[tuple, dict[int, list[int]]] = {}
        self.results: dict[tuple, dict] = {}
        self.group_list: list[int] = []
        self._last_groups: tuple = (None, None, None)
        plain = self.count(None, np.zeros(n + 1, dtype=np.int64))
        self.plain = _Structure("none", None, np.zeros(n + 1, dtype=np.int64), *plain)
        self.held_elements = float(self.plain.held.sum(dtype=np.float64))
        self.all_elements = float(self.plain.fit.sum(dtype=np.float64)) + (self.held_elements if self.disjoint else 0)
        self.ch_fit = self.plain.fit.sum(axis=(1, 2, 3), dtype=np.float64)  # (C, N) per-channel histograms

    def count(self, reference_channel: np.ndarray | None, reference_map: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(fit, held) per-channel counts (C, R, F, F, N)."""
        if self.disjoint:
            both = fine_counts(self.idx, self.levels, self.fine, reference_channel, reference_map, self.part_of, 2)
            return both[0], both[1]
        one = fine_counts(self.idx, self.levels, self.fine, reference_channel, reference_map)[0]
        return one, one

    def labels(self, g: int) -> np.ndarray:
        if g not in self.labels_of:
            self.labels_of[g] = em.cluster_channels(self.ch_fit, g)[0]
        return np.asarray(self.labels_of[g], dtype=np.int64)

    def class_maps(self, st: _Structure, g: int, gj_fit: np.ndarray) -> dict[int, list[int]]:
        """Neighbour-class maps of structure ``st`` at G = ``g``; a reference structure keeps the maps designed
        at the first G asked for (they differ little between groupings, and cost most of a candidate)."""
        key = (st.name, st.classes, g if st.reference_channel is None else None)
        if key not in self.maps:
            f = gj_fit.shape[-2]
            self.maps[key] = class_maps(gj_fit.reshape(-1, f, f, self.levels), f)
        return self.maps[key]

    def group_counts(self, st: _Structure, g: int) -> tuple[np.ndarray, np.ndarray]:
        """(fit, held) group counts (G, R, F, F, N) of ``st``; the last pair asked for is kept."""
        key = (st.name, st.classes, g)
        if self._last_groups[0] != key:
            labels = self.labels(g)
            self._last_groups = (key, st.groups(st.fit, labels, g), st.groups(st.held, labels, g))
        return self._last_groups[1], self._last_groups[2]

    def evaluate(self, st: _Structure, g: int, k: int, cmap: list[int] | None = None) -> dict:
        """Score structure ``st`` with G = ``g`` channel groups and K = ``k`` neighbour classes (class map
        ``cmap`` over the fine classes, or the one designed on this structure's counts)."""
        key = (st.name, st.classes, g, k, None if cmap is None else tuple(cmap))
        if key in self.results:
            return self.results[key]
        n, r = self.levels, st.classes
        labels = self.labels(g)
        gj_fit, gj_held = self.group_counts(st, g)  # (G, R, F, F, N)
        if cmap is None:
            cmap = self.class_maps(st, g, gj_fit)[k]
        f = gj_fit.shape[-2]
        cf = _by_class(gj_fit.reshape(-1, f, f, n), np.asarray(cmap), k).reshape(-1, n)
        ch = _by_class(gj_held.reshape(-1, f, f, n), np.asarray(cmap), k).reshape(-1, n)
        moc = merge_models(cf, self.model_bits, g, self.max_models)
        m = int(moc.max()) + 1
        mf = np.zeros((m, n))
        np.add.at(mf, moc, cf)
        mh = np.zeros((m, n))
        np.add.at(mh, moc, ch)
        bits = float((mh * _lengths(mf)).sum()) / self.held_elements
        refs = st.reference_channel is not None
        side = table_side_bits(g, k, n, self.channels, m, r, refs)
        score = bits + side / (self.amortise * self.all_elements)
        neighbour_class = [int(cmap[v]) for v in self.fine]
        version = 1 if (not refs and k * k * n <= 256 and n <= MAX_LEVELS_V1) else 2
        res = {"structure": st.name, "groups": g, "classes": k, "reference_classes": r, "models": m,
               "heldout_bits": bits, "side_bits": side, "score": score, "neighbour_class": neighbour_class,
               "version": version, "dependent_channels": int((st.reference_channel >= 0).sum()) if refs else 0,
               "_labels": labels, "_moc": moc, "_mf": mf, "_st": st, "_cmap": list(cmap)}
        self.results[key] = res
        self.tried.append({k2: v for k2, v in res.items() if not k2.startswith("_")})
        return res

    def refit(self, res: dict) -> np.ndarray:
        """Model counts (M, N) of a result on all calibration tensors."""
        st, n = res["_st"], self.levels
        per_channel = st.fit.astype(np.int64) + st.held if self.disjoint else st.fit
        gj = st.groups(per_channel, res["_labels"], res["groups"])
        f = gj.shape[-2]
        ca = _by_class(gj.reshape(-1, f, f, n), np.asarray(res["_cmap"]), res["classes"]).reshape(-1, n)
        mc = np.zeros((res["models"], n))
        np.add.at(mc, res["_moc"], ca)
        return mc


def _best(results: list[dict]) -> dict | None:
    return min(results, key=lambda r: r["score"]) if results else None


def _k_candidates(kmax: int) -> list[int]:
    """K values tried beyond version 1's limit: every K up to 6, then 8, 10, 12, 16."""
    return [k for k in sorted(set(range(1, 7)) | {8, 10, 12, 16}) if k <= kmax]


def _local_search(search: _Search, st: _Structure, start: tuple[int, int], gs: list[int], ks: list[int],
                  limit: int = 12) -> dict:
    """Descent over (G, K) from ``start`` on the candidate lists ``gs`` and ``ks``: each step takes the first
    neighbouring (G, K) that scores lower, trying the last successful direction first."""
    best = search.evaluate(st, *start)
    directions = [(0, -1), (0, 1), (-1, 0), (1, 0)]  # (G step, K step) in the candidate lists
    for _ in range(limit):
        gi, ki = gs.index(best["groups"]), ks.index(best["classes"])
        for d in list(directions):
            g2, k2 = gi + d[0], ki + d[1]
            if not (0 <= g2 < len(gs) and 0 <= k2 < len(ks)):
                continue
            res = search.evaluate(st, gs[g2], ks[k2])
            if res["score"] < best["score"]:
                best = res
                directions.remove(d)
                directions.insert(0, d)
                break
        else:
            break
    return best


REFERENCE_FINE = 9  # reference values are binned to at most this many fine classes before their classes are merged


def _reference_structure(search: _Search, base: dict, name: str, ref: np.ndarray, rmax: int) -> list[_Structure]:
    """The structures (one per R = 2..rmax) of reference channels ``ref``, counted once with the most classes.

    Reference classes: the fine reference values (N: no reference) are merged on counts of the best design's
    channel groups and neighbour classes, so that "no reference" joins the values that predict alike."""
    n = search.levels
    cls0 = np.asarray(base["neighbour_class"], dtype=np.int64)  # value -> neighbour class of the base design
    rfine = fine_map(search.values, n, REFERENCE_FINE)
    by_value = fine_counts(search.fit_sample, n, cls0, ref, rfine)[0]  # (C, Rf, K0, K0, N)
    by_value = _group_sum(by_value, base["_labels"], base["groups"])  # (G0, Rf, K0, K0, N)
    rmaps = value_class_maps(by_value.transpose(0, 2, 3, 1, 4), rmax)
    top = max(rmaps)
    rmap_top = np.asarray(rmaps[top], dtype=np.int64)[rfine]
    fit_c, held_c = search.count(ref, rmap_top)
    out = []
    for r in range(2, top + 1):
        rmap = np.asarray(rmaps[r], dtype=np.int64)[rfine]
        fold = np.zeros(top, dtype=np.int64)
        fold[rmap_top] = rmap  # nested maps: each class of the top map lies in one class of r
        out.append(_Structure(f"{name}, R={r}", ref, rmap, fit_c, held_c, fold))
    return out


def _reference_candidates(search: _Search, base: dict, rmax: int, progress: bool,
                          fixed_classes: int | None = None) -> list[dict]:
    """Every reference structure (base-set size) screened with R = 2 at the best design's G and K (its class
    map), then R up to ``rmax`` for the best base set, then a search over G and K around the best (G only
    with ``fixed_classes``; R * K^2 <= 256 is the caller's to keep then)."""
    from tqdm import tqdm

    n = search.levels
    k0, g0 = base["classes"], base["groups"]

    def screen(st: _Structure) -> dict:
        k = min(k0, max_classes_v2(n, st.classes))
        return search.evaluate(st, g0, k, base["_cmap"] if k == k0 else None)

    screened, by_base = [], {}
    for name, ref in tqdm(reference_structures(search.fit_sample), desc="reference structures",
                          disable=not progress, leave=False):
        sts = _reference_structure(search, base, name, ref, rmax)
        by_base[name] = sts
        screened.append(screen(sts[0]))
        if len(screened) > 1:  # release the counts of all but the best base set so far
            screened.sort(key=lambda r: r["score"])
            for st in by_base.pop(screened[1]["_st"].name.rsplit(",", 1)[0], []):
                st.fit = st.held = None
            screened = screened[:1]
    if not screened:
        return []
    best_name = screened[0]["_st"].name.rsplit(",", 1)[0]
    tried = list(screened)
    for st in by_base[best_name][1:]:  # more reference classes while they score lower
        tried.append(screen(st))
        if tried[-1]["score"] >= tried[-2]["score"]:
            break
    best = min(tried, key=lambda r: r["score"])
    st = best["_st"]
    gs = sorted({best["groups"]} | set(search.group_list))
    kmax = min(max_classes_v2(n, st.classes), search.fine_classes)
    ks = [fixed_classes] if fixed_classes else sorted(set(_k_candidates(kmax)) | {best["classes"]})
    return tried + [_local_search(search, st, (best["groups"], best["classes"]), gs, ks)]


def design_contexts(indices: np.ndarray, levels: int, classes: int | str = "auto", groups: int | str = "auto",
                    amortise: float = 1.0, extra_groups: tuple[int, ...] = (), heldout_every: int = 4,
                    labels_of: dict[int, np.ndarray] | None = None, progress: bool = False,
                    spec_version: int | str = "auto", references: bool = True) -> ContextDesign:
    """Choose channel groups, neighbour classes, class map, (version 2) reference channels and classes, and
    model merging for (B, H, W, C) calibration indices by the held-out coded bits plus table bits.
    ``classes`` / ``groups``: a fixed value or 'auto'. ``labels_of`` may give channel-group labels for some G
    (else they are clustered here). ``spec_version``: 1 (a table version 1 devices read), 2, or 'auto' (version
    2 features only where they code the held-out tensors in fewer bits); ``references`` False leaves reference
    channels out of the version 2 search."""
    from tqdm import tqdm

    spec_version = check_spec_version(spec_version)
    idx = np.asarray(indices)
    if idx.ndim == 3:
        idx = idx[None]
    b, h, w, c = idx.shape
    n = levels
    if not 2 <= n <= MAX_LEVELS:
        raise ValueError(f"levels must be in 2..{MAX_LEVELS}, got {n}")
    if spec_version == 1 and n > MAX_LEVELS_V1:
        raise ValueError(f"{n} levels need spec version 2 (version 1 tables have at most {MAX_LEVELS_V1} levels)")
    kmax1 = max_classes(n)
    kmax2 = max_classes_v2(n) if spec_version != 1 else kmax1
    if classes != "auto" and not 1 <= int(classes) <= kmax2:
        limit = "K*K*N <= 256" if spec_version == 1 else "K*K <= 256 and K <= N + 1"
        raise ValueError(f"classes K must be in 1..{kmax2} for {n} levels ({limit})")
    search = _Search(idx, n, amortise, heldout_every, labels_of)
    gs = [int(groups)] if groups != "auto" else group_candidates(c, n, extra_groups)
    search.group_list = gs
    if classes == "auto":
        ks = list(range(1, min(kmax1, search.fine_classes) + 1))
        ks_more = [k for k in _k_candidates(min(kmax2, search.fine_classes)) if k > kmax1]
    elif int(classes) > search.fine_classes:
        raise ValueError(f"classes K = {classes} exceed the {search.fine_classes} fine neighbour classes these "
                         f"{n}-level indices bin into (their values are concentrated on a few levels)")
    else:
        ks, ks_more = [int(classes)], []
    # the version 1 grid: every G and every K version 1 allows (at more than 16 levels: a version 2 table)
    grid = []
    for g in tqdm(gs, desc="context design (G)", disable=not progress, leave=False):
        for k in ks:
            grid.append(search.evaluate(search.plain, g, k))
    best_v1 = _best([r for r in grid if r["version"] == 1])
    best = _best(grid)
    if spec_version != 1:
        # more neighbour classes than version 1 allows, at the two best groupings
        if ks_more:
            for g in sorted({r["groups"] for r in sorted(grid, key=lambda r: r["score"])[:2]}):
                worse = 0
                for k in ks_more:
                    res = search.evaluate(search.plain, g, k)
                    worse = worse + 1 if res["score"] >= best["score"] else 0
                    best = _best([best, res])
                    if worse >= 1:
                        break
        no_refs = best
        refs = []
        if references and c >= 2:
            rmax = min(MAX_REFERENCE_CLASSES, n + 1)
            if classes != "auto":
                rmax = min(rmax, 256 // (int(classes) ** 2))
            if rmax >= 2:
                # screened at the best design of the version 1 grid: its K (at most version 1's) keeps the
                # reference candidates cheap, and the search over G and K moves on from there
                refs = _reference_candidates(search, _best(grid), rmax, progress,
                                             None if classes == "auto" else int(classes))
        with_refs = _best(refs)
        best = _best([r for r in (no_refs, with_refs) if r is not None])
        if spec_version == "auto" and best_v1 is not None:
            if not (best["score"] < best_v1["score"] and best["heldout_bits"] < best_v1["heldout_bits"]):
                best = best_v1
    else:
        best, no_refs, with_refs = best_v1, best_v1, None
    assert best is not None
    version = 2 if spec_version == 2 else best["version"]
    alternatives = {}
    for name, res in (("v1", best_v1), ("no references", no_refs), ("references", with_refs)):
        if res is not None:
            alternatives[name] = {k2: v for k2, v in res.items() if not k2.startswith("_")}
    st = best["_st"]
    refs_used = st.reference_channel is not None
    cd = ContextDesign(
        best["groups"], best["_labels"], best["classes"], best["neighbour_class"], [int(v) for v in best["_moc"]],
        search.refit(best), best["heldout_bits"], best["side_bits"], best["score"], search.tried,
        [int(v) for v in st.reference_channel] if refs_used else ([-1] * c if version == 2 else None),
        st.classes, [int(v) for v in st.reference_class] if version == 2 else None, version, alternatives)
    return cd


def apply_to_table(table: dict, cd: ContextDesign) -> dict:
    """The table with ``cd``'s contexts and models (not finalized); version 2 fields where ``cd`` needs them."""
    out = dict(table)
    ctx = {"groups": cd.groups, "classes": cd.classes,
           "channel_group": [int(v) for v in cd.labels],
           "neighbour_class": [int(v) for v in cd.neighbour_class],
           "model_of_context": [int(v) for v in cd.model_of_context]}
    if cd.version >= 2:
        c = len(cd.labels)
        ctx["reference_channel"] = [int(v) for v in cd.reference_channel] if cd.reference_channel else [-1] * c
        ctx["reference_classes"] = int(cd.reference_classes)
        ctx["reference_class"] = ([int(v) for v in cd.reference_class] if cd.reference_class
                                  else [0] * (len(cd.neighbour_class)))
    out["contexts"] = ctx
    out["models"] = cd.frequencies()
    return out
