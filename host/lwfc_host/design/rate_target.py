"""Rate targeting: the design with the lowest MSE at a coded rate within 3% of a target
(codec_spec/DESIGN-quantizer.md, section 6).

For each level count, on the clip range of section 2 scaled by a few factors: the uniform quantizer, ECSQ
at lambda = 0 and ECSQ with lambda found by bisection for the target rate. Candidates are rated with
channel-group integer models (grouping fixed during the search) plus the frame overhead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lwfc.tables import MAX_GROUPS
from lwfc_host.design import entropy_models as em
from lwfc_host.design.calibration import Histogram, LoadedStats
from lwfc_host.design.clipping import ClipChoice, choose_clip
from lwfc_host.design.quantizers import DesignError, Quantizer, ecsq, evaluate, uniform
from lwfc_host.design.table_design import (
    Design,
    check_levels,
    design_quantizer,
    finish_design,
    overhead_bits,
    rate_with_groups,
    zeros_of,
)

RATE_TOLERANCE = 0.03
MAX_TARGET_BITS = 8.0
DEFAULT_LEVELS = [2, 3, 4, 5, 6, 8, 10, 12, 16]
HIGH_LEVELS = [20, 24, 32, 48, 64]  # version 2 tables only
KINDS = ("uniform", "ecsq")


@dataclass
class Candidate:
    """One quantizer the search tried: requested levels, kind, lambda, clip scale, coded rate, MSE."""

    levels: int
    kind: str
    lam: float
    clip_scale: float
    rate: float
    mse: float


class _RateSearch:
    """The candidates tried (in order) and the lowest-MSE one whose rate is within 3% of the target."""

    def __init__(self, bits: float) -> None:
        self.bits = bits
        self.low, self.high = bits * (1 - RATE_TOLERANCE), bits * (1 + RATE_TOLERANCE)
        self.tried: list[Candidate] = []
        self.best: tuple[float, Quantizer, ClipChoice] | None = None

    def consider(self, q: Quantizer, cc: ClipChoice, ev, rate: float, scale: float) -> None:
        self.tried.append(Candidate(q.requested_levels, q.kind, q.lam, scale, rate, ev.mse))
        if self.low <= rate <= self.high and (self.best is None or ev.mse < self.best[0]):
            self.best = (ev.mse, q, cc)


def _check_target(stats: LoadedStats, bits: float, levels: list[int], over: float) -> None:
    """Cheap bounds first: the frame overhead is the least any quantizer costs, log2(N) + overhead the most."""
    if not math.isfinite(bits) or bits <= 0:
        raise DesignError(f"target rate must be a positive number of bits per element, got {bits}")
    if bits > MAX_TARGET_BITS:
        raise DesignError(f"target rate {bits} bits/element is above 8 (the int8 input itself)")
    if bits * (1 + RATE_TOLERANCE) < over:
        raise DesignError(f"target {bits} bits/element is below the lowest rate reached: the frame header alone "
                          f"costs {over:.4f} bits/element on a {'x'.join(map(str, stats.shape))} tensor")
    if bits * (1 - RATE_TOLERANCE) > math.log2(max(levels)) + over:
        raise DesignError(f"target {bits} bits/element is above the highest rate reached: {max(levels)} levels "
                          f"code at most {math.log2(max(levels)) + over:.4f} bits/element here")


def _search_grouping(stats: LoadedStats, bits: float, clip: str, groups: int | str,
                     levels: list[int]) -> tuple[np.ndarray, int]:
    """Channel groups (labels, G) the search rates candidates with. With G > 1 (or auto): grouped once, on
    the uniform quantizer closest to the target, and kept while searching (clustering every candidate
    would cost more than it changes); the final design groups again."""
    c = stats.channels
    if groups != "auto" and int(groups) <= 1:
        return np.zeros(c, dtype=np.int64), 1
    guess = min(levels, key=lambda n: abs(math.log2(n) - bits))
    q0, _ = design_quantizer(stats, guess, "uniform", 0.0, clip)
    gc = em.choose_groups(evaluate(q0, stats.histogram(), zeros_of(stats)).ch_counts,
                          groups if groups == "auto" else min(int(groups), min(c, MAX_GROUPS)))
    return gc.labels, gc.groups


def _scan_candidates(stats: LoadedStats, search: _RateSearch, levels: list[int], clip: str,
                     clip_scales: tuple[float, ...], labels: np.ndarray, g: int, kinds: tuple[str, ...],
                     progress: bool) -> None:
    """Every level count on the chosen clip range scaled by each of ``clip_scales``: the uniform quantizer
    and ECSQ (lambda by bisection), as far as ``kinds`` allows."""
    hist = stats.histogram()
    zeros = zeros_of(stats)
    over = overhead_bits(stats)
    # clip ranges beyond the largest calibration value only waste levels (ReLU6 piles up exactly there)
    data_top = float(hist.lower[np.flatnonzero(hist.count)[-1]])
    it = levels
    if progress:
        from tqdm import tqdm
        it = tqdm(levels, desc="target rate", unit="levels")
    for n in it:
        base = choose_clip(hist, n, clip, zeros)
        tops = sorted({min(base.c_min + s * (base.c_max - base.c_min), data_top) for s in clip_scales})
        for top in tops:
            scale = (top - base.c_min) / (base.c_max - base.c_min)
            cc = ClipChoice(base.c_min, top, base.method, base.mse, base.model, list(base.notes))
            try:
                qu = uniform(hist, n, cc.c_min, cc.c_max, zeros)  # raises when the range holds too few bins
            except DesignError:
                continue
            if "uniform" in kinds:
                ev = evaluate(qu, hist, zeros)
                search.consider(qu, cc, ev, rate_with_groups(ev, labels, g, over), scale)
            if "ecsq" in kinds:
                _search_lambda(hist, n, cc, zeros, labels, g, over, search.bits, stats.arrays["ch_zeros"],
                               lambda q, e, r, cc=cc, scale=scale: search.consider(q, cc, e, r, scale))


def _default_levels(stats: LoadedStats, bits: float, spec_version: int | str) -> list[int]:
    """The level counts searched: up to 16, and more (version 2 tables) with spec version 2, or with 'auto'
    when 16 levels cannot reach the target."""
    if spec_version in (2, "2"):
        return DEFAULT_LEVELS + HIGH_LEVELS
    if spec_version == "auto" and bits * (1 - RATE_TOLERANCE) > math.log2(max(DEFAULT_LEVELS)) + overhead_bits(stats):
        return DEFAULT_LEVELS + HIGH_LEVELS
    return DEFAULT_LEVELS


def _no_candidate(bits: float, tried: list[Candidate], over: float) -> DesignError:
    """The error when no candidate came within 3% of ``bits``: it states the reachable range."""
    rates = [t.rate for t in tried]
    lo, hi = (min(rates), max(rates)) if rates else (float("nan"), float("nan"))
    if bits < lo:
        return DesignError(f"target {bits} bits/element is below the lowest rate reached, {lo:.4f} "
                           f"(the frame header alone costs {over:.4f} bits/element)")
    if bits > hi:
        most = max(t.levels for t in tried)
        return DesignError(f"target {bits} bits/element is above the highest rate reached, {hi:.4f} "
                           f"(at most {most} levels)")
    return DesignError(f"no quantizer tried came within 3% of {bits} bits/element (rates {lo:.4f}..{hi:.4f})")


def target_rate(stats: LoadedStats, bits: float, clip: str = "mse", groups: int | str = 1, classes: int = 1,
                int8_scale: float | None = None, int8_zero_point: int | None = None,
                levels: list[int] | None = None, clip_scales: tuple[float, ...] = (0.8, 1.0, 1.25),
                kinds: tuple[str, ...] = KINDS, progress: bool = False,
                spec_version: int | str = "auto") -> tuple[Design, list[Candidate]]:
    """The design whose coded rate on the calibration set is within 3% of ``bits`` per element and whose
    MSE is lowest among the candidates tried: for each level count, on the chosen clip range scaled by each
    of ``clip_scales``, the quantizers of ``kinds`` (uniform; ECSQ with lambda by bisection). ``levels`` by
    default: 2..16, and up to 64 (a version 2 table) with ``spec_version`` 2 or, with 'auto', for targets
    16 levels cannot reach; ``spec_version`` goes on to ``finish_design``."""
    levels = levels or _default_levels(stats, bits, spec_version)
    for n in levels:
        check_levels(n, spec_version)
    unknown = set(kinds) - set(KINDS)
    if unknown or not kinds:
        raise DesignError(f"quantizer kinds must be among uniform and ecsq, got {list(kinds)}")
    over = overhead_bits(stats)
    _check_target(stats, bits, levels, over)
    labels, g = _search_grouping(stats, bits, clip, groups, levels)
    search = _RateSearch(bits)
    _scan_candidates(stats, search, levels, clip, clip_scales, labels, g, kinds, progress)
    if search.best is None:
        raise _no_candidate(bits, search.tried, over)
    _, q, cc = search.best
    d = finish_design(stats, q, cc, groups, classes, int8_scale, int8_zero_point, spec_version=spec_version)
    d = _refit_lambda(stats, search, d, q, cc, classes, int8_scale, int8_zero_point, spec_version)
    if abs(d.coded_bits_per_element - bits) > RATE_TOLERANCE * bits:
        d.notes.append(f"the final grouping moved the rate to {d.coded_bits_per_element:.4f} bits/element, "
                       f"outside 3% of {bits}")
    return d, search.tried


def _refit_lambda(stats: LoadedStats, search: _RateSearch, d: Design, q: Quantizer, cc: ClipChoice,
                  classes: int, int8_scale: float | None, int8_zero_point: int | None,
                  spec_version: int | str = "auto") -> Design:
    """The final grouping fits the chosen quantizer better than the search's grouping did, which moves the
    rate; with ECSQ, find lambda again for the new groups (G kept, so the groups stay put), at most twice."""
    bits = search.bits
    for _ in range(2):
        if abs(d.coded_bits_per_element - bits) <= RATE_TOLERANCE * bits or q.kind != "ecsq":
            break
        labels, g = d.groups.labels, d.groups.groups
        search.best = None
        _search_lambda(stats.histogram(), q.requested_levels, cc, zeros_of(stats), labels, g, overhead_bits(stats),
                       bits, stats.arrays["ch_zeros"], lambda q2, e, r, cc=cc: search.consider(q2, cc, e, r, 1.0))
        if search.best is None:
            break
        _, q, cc = search.best
        d = finish_design(stats, q, cc, g, classes, int8_scale, int8_zero_point, spec_version=spec_version)
    return d


def _search_lambda(hist: Histogram, n: int, cc: ClipChoice, zeros: float, labels: np.ndarray, g: int,
                   over: float, bits: float, ch_zeros: np.ndarray, consider) -> None:
    """ECSQ at lambda = 0, then bisection on log10 lambda for the coded rate ``bits``; every design is
    passed to ``consider(q, evaluation, rate)``."""
    grp = (labels, ch_zeros) if g > 1 else None

    def run(lam):
        q = ecsq(hist, n, lam, cc.c_min, cc.c_max, zeros, groups=grp)
        e = evaluate(q, hist, zeros)
        return q, e, rate_with_groups(e, labels, g, over)

    q0, e0, r0 = run(0.0)
    consider(q0, e0, r0)
    if r0 < bits * (1 - RATE_TOLERANCE):
        return  # even lambda = 0 codes below the target: more levels are needed
    a, b = -8.0, 1.0  # log10 lambda: the rate falls as lambda grows
    for _ in range(20):
        m = 0.5 * (a + b)
        try:
            q, e, r = run(10.0 ** m)
        except DesignError:  # a single cell left: lambda too large
            b = m
            continue
        consider(q, e, r)
        if abs(r - bits) < 0.005 * bits:
            break
        if r > bits:
            a = m
        else:
            b = m
