"""Design of the neighbour-context entropy models (SPEC.md 4.2) from calibration tensors.

Everything is derived from one array of *joint counts* per channel: how often index s occurs at an
element of channel c whose above neighbour has index a and left neighbour index l (a, l in 0..N, N meaning
"outside the tensor"). Any choice of channel groups, neighbour-class map and model merging only sums
entries of that array, so hundreds of candidate designs cost no further pass over the data.

The search, for each candidate number of channel groups G:

1. channel groups: the K = 1 clustering of ``entropy_models.cluster_channels`` (per-channel histograms);
2. neighbour-class map: agglomerative -- start with one class per neighbour value (N + 1 classes), merge
   the two classes whose merge raises the fit tensors' conditional code length least, record the map at
   every K allowed by the spec (K^2 N <= 256);
3. models: contexts (g, class_above, class_left) are merged greedily (``model_of_context``) while a merge
   costs fewer data bits than the bits of the model table it saves (MDL); empty or rare contexts merge first
   because merging them costs (almost) nothing;
4. score: bits of the *held-out* calibration tensors coded with the integer models fitted on the fit tensors,
   plus the table's side information spread over the calibration data (as ``choose_groups`` does).

The best (G, K) wins; its models are then refitted on all calibration tensors. Code lengths use the
spec's integer frequencies (``tablefile.integer_frequencies``), so the scores are what the range coder
spends up to the final flush.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from lwfc.tables import MAX_GROUPS, TOTAL
from lwfc_host.codec.fast import neighbours
from lwfc_host.design import entropy_models as em
from lwfc_host.design.tablefile import integer_frequencies

FREQ_BITS = em.FREQ_BITS


def max_classes(levels: int) -> int:
    """The spec's limit on K for ``levels`` quantization indices: K^2 N <= 256, and at most N + 1 classes."""
    return min(levels + 1, int(math.isqrt(256 // levels)))


def joint_counts(indices: np.ndarray, levels: int) -> np.ndarray:
    """Counts (C, N+1, N+1, N) of (channel, above index, left index, index) over (B, H, W, C) indices."""
    idx = np.asarray(indices, dtype=np.int64).reshape((-1,) + np.shape(indices)[-3:])
    c = idx.shape[-1]
    n = levels
    above, left = neighbours(idx, n)  # the neighbours of the spec's context rule, N = outside
    ch = np.arange(c, dtype=np.int64)
    key = ((ch * (n + 1) + above) * (n + 1) + left) * n + idx
    return np.bincount(key.ravel(), minlength=c * (n + 1) * (n + 1) * n).reshape(c, n + 1, n + 1, n)


def _ideal_bits(counts: np.ndarray) -> float:
    """Adaptive-free conditional code length of count rows (last axis = symbols), add-half smoothed."""
    c = counts.reshape(-1, counts.shape[-1]).astype(np.float64) + 0.5
    p = c / c.sum(axis=1, keepdims=True)
    return float(-((c - 0.5) * np.log2(p)).sum())


def _lengths(rows: np.ndarray) -> np.ndarray:
    """Code lengths (bits) of the spec's integer frequencies fitted on each count row."""
    rows = np.atleast_2d(rows)
    f = np.array([integer_frequencies(r) for r in rows], dtype=np.float64)
    return -np.log2(f / TOTAL)


def _by_class(group_joint: np.ndarray, cmap: np.ndarray, k: int) -> np.ndarray:
    """(G, N+1, N+1, N) joint counts -> (G, K, K, N) context counts under class map ``cmap``."""
    onehot = np.zeros((len(cmap), k))
    onehot[np.arange(len(cmap)), cmap] = 1.0
    return np.einsum("gabs,ai,bj->gijs", group_joint, onehot, onehot)


def class_maps(group_joint: np.ndarray, kmax: int) -> dict[int, list[int]]:
    """Neighbour-class maps for K = 1..kmax by agglomerative merging of neighbour values on the fit counts.

    Which values share a class is learnt, not assumed: e.g. "outside" usually joins the class of the
    most common index (0 after a ReLU), and high indices that rarely occur merge with their neighbours."""
    n1 = group_joint.shape[1]
    cmap = np.arange(n1)
    maps: dict[int, list[int]] = {}
    k = n1
    if k <= kmax:
        maps[k] = cmap.tolist()
    while k > 1:
        best = None
        for i in range(k):
            for j in range(i + 1, k):
                m = np.where(cmap == j, i, cmap)
                m = np.where(m > j, m - 1, m)
                bits = _ideal_bits(_by_class(group_joint, m, k - 1))
                if best is None or bits < best[0]:
                    best = (bits, m)
        cmap = best[1]
        k -= 1
        if k <= kmax:
            maps[k] = cmap.tolist()
    return maps


MERGE_BLOCK = 384  # contexts merged pairwise at once (the pair matrix is quadratic in this)


def merge_models(ctx_counts: np.ndarray, model_bits: float, groups: int = 1) -> np.ndarray:
    """Context -> model map for contexts numbered g K^2 + (class pair), see ``_merge_rows``. With many
    contexts (G K^2 > MERGE_BLOCK) the contexts of each class pair are merged across groups first, then
    the resulting models with each other."""
    x = len(ctx_counts)
    if x <= MERGE_BLOCK:
        return _merge_rows(ctx_counts, model_bits)
    kk = x // groups
    labels = np.empty(x, dtype=np.int64)
    rows, nxt = [], 0
    for pair in range(kk):
        members = np.arange(pair, x, kk)
        sub = _merge_rows(ctx_counts[members], model_bits)
        labels[members] = sub + nxt
        for m in range(int(sub.max()) + 1):
            rows.append(ctx_counts[members[sub == m]].sum(axis=0))
        nxt += int(sub.max()) + 1
    rows_a = np.asarray(rows)
    if len(rows_a) <= MERGE_BLOCK:
        second = _merge_rows(rows_a, model_bits)
        labels = second[labels]
    # relabel in order of first appearance
    _, first = np.unique(labels, return_index=True)
    relabel = np.empty(int(labels.max()) + 1, dtype=np.int64)
    relabel[labels[np.sort(first)]] = np.arange(len(first))
    return relabel[labels]


def _merge_rows(ctx_counts: np.ndarray, model_bits: float) -> np.ndarray:
    """Context -> model map: merge contexts greedily while merging two models raises the (ideal) data bits
    by less than ``model_bits``, the side information one model costs. Returns labels 0..M-1 in order of
    first appearance."""
    counts = [np.asarray(r, dtype=np.float64) for r in ctx_counts]
    x = len(counts)
    alive = list(range(x))
    members = {i: [i] for i in range(x)}

    def own(r: np.ndarray) -> float:
        return _ideal_bits(r[None])

    cost = {i: own(counts[i]) for i in range(x)}
    if x > 1:
        # merge cost matrix, kept up to date one row at a time
        mat = np.stack(counts)
        pair = np.full((x, x), np.inf)
        for i in range(x):
            merged = mat[i][None] + mat[i + 1:]
            if len(merged):
                tot = merged + 0.5
                ll = -((merged) * np.log2(tot / tot.sum(axis=1, keepdims=True))).sum(axis=1)
                pair[i, i + 1:] = ll - cost[i] - np.array([cost[j] for j in range(i + 1, x)])
        while len(alive) > 1:
            i, j = np.unravel_index(np.argmin(pair), pair.shape)
            if not pair[i, j] < model_bits:
                break
            counts[i] = counts[i] + counts[j]
            members[i] += members.pop(j)
            cost[i] = own(counts[i])
            alive.remove(j)
            pair[j, :] = np.inf
            pair[:, j] = np.inf
            others = [o for o in alive if o != i]
            if not others:
                break
            merged = counts[i][None] + np.stack([counts[o] for o in others])
            tot = merged + 0.5
            ll = -(merged * np.log2(tot / tot.sum(axis=1, keepdims=True))).sum(axis=1)
            d = ll - cost[i] - np.array([cost[o] for o in others])
            for o, v in zip(others, d):
                a, b = (i, o) if i < o else (o, i)
                pair[a, b] = v
    labels = np.empty(x, dtype=np.int64)
    for m, root in enumerate(sorted(members, key=lambda r: min(members[r]))):
        labels[members[root]] = m
    return labels


def table_side_bits(groups: int, classes: int, levels: int, channels: int, models: int) -> int:
    """Side information of a context design: N - 1 free 24-bit frequencies per model, the channel map, the
    neighbour-class map and the context -> model map (each entry in as few bits as its range needs)."""
    def b(v: int) -> int:
        return math.ceil(math.log2(v)) if v > 1 else 0

    return (models * (levels - 1) * FREQ_BITS + channels * b(groups) + (levels + 1) * b(classes)
            + groups * classes * classes * b(models))


@dataclass
class ContextDesign:
    """A chosen context structure and its models (counts on all calibration tensors)."""

    groups: int
    labels: np.ndarray  # channel -> group
    classes: int
    neighbour_class: list[int]  # N + 1 entries
    model_of_context: list[int]  # G K^2 entries
    model_counts: np.ndarray  # (M, N) counts on all calibration tensors
    heldout_bits: float  # payload bits/element of the held-out tensors, models fitted on the fit tensors
    side_bits: int
    score: float  # held-out bits/element + side bits per calibration element / amortise
    tried: list[dict] = field(default_factory=list)

    @property
    def models(self) -> int:
        return int(self.model_counts.shape[0])

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


def design_contexts(indices: np.ndarray, levels: int, classes: int | str = "auto", groups: int | str = "auto",
                    amortise: float = 1.0, extra_groups: tuple[int, ...] = (), heldout_every: int = 4,
                    labels_of: dict[int, np.ndarray] | None = None, progress: bool = False) -> ContextDesign:
    """Choose channel groups, neighbour classes, class map and model merging for (B, H, W, C) calibration
    indices by the held-out coded bits plus table bits. ``classes`` / ``groups``: a fixed value or 'auto'.
    ``labels_of`` may give channel-group labels for some G (else they are clustered here)."""
    from tqdm import tqdm

    idx = np.asarray(indices)
    b, h, w, c = idx.shape
    n = levels
    kmax = max_classes(n)
    if classes != "auto" and not 1 <= int(classes) <= kmax:
        raise ValueError(f"classes K must be in 1..{kmax} for {n} levels (K*K*N <= 256)")
    fit, held = split_fit_heldout(b, heldout_every)
    j_fit = joint_counts(idx[fit], n).astype(np.float64)
    j_held = joint_counts(idx[held], n).astype(np.float64)
    # disjoint parts add up to all tensors; with one tensor both parts are that tensor
    j_all = j_fit + j_held if len(np.intersect1d(fit, held)) == 0 else j_fit
    held_elements = float(j_held.sum())
    all_elements = float(j_all.sum())
    ch_fit = j_fit.sum(axis=(1, 2))
    gs = [int(groups)] if groups != "auto" else group_candidates(c, n, extra_groups)
    ks = list(range(1, kmax + 1)) if classes == "auto" else [int(classes)]
    model_bits = (n - 1) * FREQ_BITS / amortise
    tried: list[dict] = []
    best: ContextDesign | None = None
    for g in tqdm(gs, desc="context design (G)", disable=not progress, leave=False):
        labels = labels_of[g] if labels_of and g in labels_of else em.cluster_channels(ch_fit, g)[0]
        onehot = np.zeros((c, g))
        onehot[np.arange(c), labels] = 1.0
        gj_fit = np.einsum("cabs,cg->gabs", j_fit, onehot)
        gj_held = np.einsum("cabs,cg->gabs", j_held, onehot)
        maps = class_maps(gj_fit, max(ks)) if max(ks) > 1 else {1: [0] * (n + 1)}
        for k in ks:
            cmap = np.asarray(maps[k])
            cf = _by_class(gj_fit, cmap, k).reshape(g * k * k, n)
            ch = _by_class(gj_held, cmap, k).reshape(g * k * k, n)
            moc = merge_models(cf, model_bits, g)
            m = int(moc.max()) + 1
            mf = np.zeros((m, n))
            np.add.at(mf, moc, cf)
            mh = np.zeros((m, n))
            np.add.at(mh, moc, ch)
            bits = float((mh * _lengths(mf)).sum()) / held_elements
            side = table_side_bits(g, k, n, c, m)
            score = bits + side / (amortise * all_elements)
            tried.append({"groups": g, "classes": k, "models": m, "heldout_bits": bits, "side_bits": side,
                          "score": score, "neighbour_class": cmap.tolist()})
            if best is None or score < best.score:
                best = ContextDesign(g, labels, k, cmap.tolist(), moc.tolist(), mf, bits, side, score)
    assert best is not None
    # refit the chosen structure's frequencies on all calibration tensors
    onehot = np.zeros((c, best.groups))
    onehot[np.arange(c), best.labels] = 1.0
    ca = _by_class(np.einsum("cabs,cg->gabs", j_all, onehot), np.asarray(best.neighbour_class),
                   best.classes).reshape(-1, n)
    mc = np.zeros((best.models, n))
    np.add.at(mc, np.asarray(best.model_of_context), ca)
    best.model_counts = mc
    best.tried = tried
    return best


def apply_to_table(table: dict, cd: ContextDesign) -> dict:
    """The table with ``cd``'s contexts and models (not finalized)."""
    out = dict(table)
    out["contexts"] = {"groups": cd.groups, "classes": cd.classes,
                       "channel_group": [int(v) for v in cd.labels],
                       "neighbour_class": [int(v) for v in cd.neighbour_class],
                       "model_of_context": [int(v) for v in cd.model_of_context]}
    out["models"] = cd.frequencies()
    return out
