"""Quantizer design against known answers: uniform source, Laplacian high-rate gap (Gish-Pierce), ECSQ vs
uniform at equal rate, the clipping optimum of a rectified Gaussian, pinning at the clip points."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate, optimize
from scipy import stats as st

from lwfc_host.design import table_design as dz
from lwfc_host.design.calibration import CalibrationStats
from lwfc_host.design.clipping import choose_clip, fit_model
from lwfc_host.design.quantizers import DesignError, ecsq, evaluate, uniform


def stats_of(x: np.ndarray, **kw) -> CalibrationStats:
    s = CalibrationStats(**kw)
    s.add_float(x.astype(np.float32))
    return s


@pytest.fixture(scope="module")
def uniform_source():
    rng = np.random.default_rng(1)
    return stats_of(rng.uniform(0.0, 1.0, (2000, 32, 32, 1)))  # 2M samples: Lloyd's optimum is flat


@pytest.mark.parametrize("levels,lam", [(2, 0.0), (4, 0.0), (7, 0.0), (16, 0.0), (2, 0.003), (4, 0.003),
                                        (7, 0.003), (16, 0.02)])
def test_ecsq_designs_the_uniform_quantizer_for_a_uniform_source(uniform_source, levels, lam):
    h = uniform_source.histogram()
    q = ecsq(h, levels, lam, 0.0, 1.0)
    if lam < 0.01:
        assert q.levels == levels
    levels = q.levels  # a large lambda drops cells; the remaining ones are still equal
    assert not any(q.pinned)  # no data piled at the clip points
    tol = 3 * h.width + 2e-3
    np.testing.assert_allclose(q.thresholds, np.arange(1, levels) / levels, atol=tol)
    np.testing.assert_allclose(q.reconstruction, (np.arange(levels) + 0.5) / levels, atol=tol)
    ev = evaluate(q, h)
    assert ev.entropy == pytest.approx(math.log2(levels), abs=2e-3)
    assert ev.mse == pytest.approx(1 / (12 * levels ** 2), rel=0.03)


def test_laplacian_high_rate_gap_to_shannon_lower_bound():
    """Entropy-coded uniform quantizer at >= 5 bits: H(Q) - R_SLB(D) = 1/2 log2(2 pi e / 12) = 0.254 bits."""
    rng = np.random.default_rng(2)
    b = 1.0
    s = stats_of(rng.laplace(0.0, b, (250, 64, 64, 1)))
    h = s.histogram()
    step = 0.125  # a multiple of the histogram's power-of-two bin width: cells are exact
    levels = 241
    c = (levels - 1) / 2 * step
    q = uniform(h, levels, -c, c)
    ev = evaluate(q, h)
    assert ev.entropy >= 5.0
    h_x = math.log2(2 * math.e * b)  # differential entropy of the Laplacian
    slb = h_x - 0.5 * math.log2(2 * math.pi * math.e * ev.mse)
    assert ev.entropy - slb == pytest.approx(0.254, abs=0.03)


@pytest.fixture(scope="module")
def clipped_relu_gaussian():
    """ReLU6-like: min(max(y, 0), 2.5) with y ~ N(0.2, 1): piles at both clip points."""
    rng = np.random.default_rng(3)
    return stats_of(np.clip(rng.normal(0.2, 1.0, (200, 32, 32, 1)), 0.0, 2.5)).loaded()


@pytest.mark.parametrize("levels", [3, 4, 8])
def test_ecsq_never_worse_than_uniform_at_equal_rate(clipped_relu_gaussian, levels):
    s = clipped_relu_gaussian
    h = s.histogram()
    zeros = dz.zeros_of(s)
    clip = choose_clip(h, levels, "mse", zeros)
    qu = uniform(h, levels, clip.c_min, clip.c_max, zeros)
    eu = evaluate(qu, h, zeros)
    one = np.zeros(1, dtype=np.int64)  # one model: the coded rate with the table's integer frequencies

    def coded(ev):
        return dz.rate_with_groups(ev, one, 1, 0.0)

    qe = dz.equal_rate_ecsq(s, levels, clip, coded(eu), one)
    ee = evaluate(qe, h, zeros)
    assert coded(ee) <= coded(eu) * 1.002
    assert ee.mse <= eu.mse * 1.001


def test_modified_ecsq_pins_the_clip_points(clipped_relu_gaussian):
    s = clipped_relu_gaussian
    h = s.histogram()
    zeros = dz.zeros_of(s)
    q = ecsq(h, 4, 0.0, 0.0, 2.5, zeros)
    assert q.pinned == (True, True)
    assert q.reconstruction[0] == 0.0 and q.reconstruction[-1] == 2.5
    free = ecsq(h, 4, 0.0, 0.0, 2.5, zeros, pin=False)  # plain Lloyd: the end values drift inward
    assert free.reconstruction[0] > 0.0 and free.reconstruction[-1] < 2.5
    # the zeros are reconstructed exactly only by the pinned design
    assert evaluate(q, h, zeros).counts[0] >= zeros


def _true_mse(c: float, levels: int, mu: float, sigma: float) -> float:
    step = c / (levels - 1)
    total = 0.0
    for j in range(levels):
        a = 0.0 if j == 0 else (j - 0.5) * step
        b = np.inf if j == levels - 1 else (j + 0.5) * step
        total += integrate.quad(lambda y, r=j * step: (y - r) ** 2 * st.norm.pdf(y, mu, sigma), a, b)[0]
    return total  # the mass below 0 is reconstructed at 0 exactly


@pytest.fixture(scope="module")
def relu_gaussian():
    rng = np.random.default_rng(4)
    return stats_of(np.maximum(rng.normal(-0.3, 1.0, (120, 64, 64, 1)), 0.0)).loaded()


@pytest.mark.parametrize("levels", [2, 4, 8])
def test_clipping_search_recovers_the_known_optimum(relu_gaussian, levels):
    best = optimize.minimize_scalar(lambda c: _true_mse(c, levels, -0.3, 1.0), bounds=(0.1, 6.0),
                                    method="bounded", options={"xatol": 1e-5}).x
    h = relu_gaussian.histogram()
    zeros = dz.zeros_of(relu_gaussian)
    for method, tol in (("model", 0.01), ("mse", 0.02)):
        c = choose_clip(h, levels, method, zeros)
        assert c.c_min == 0.0
        assert c.c_max == pytest.approx(best, rel=tol), method


def test_model_fit_finds_the_generating_distribution(relu_gaussian):
    m = fit_model(relu_gaussian.histogram(), dz.zeros_of(relu_gaussian))
    assert m.neg is None
    assert m.pos.family == "gauss"
    assert m.pos.params[0] == pytest.approx(-0.3, abs=0.03)
    assert m.pos.params[1] == pytest.approx(1.0, abs=0.02)
    assert m.zero == pytest.approx(st.norm.cdf(0.3), abs=0.005)


def test_leaky_relu_gets_a_small_negative_clip_min():
    rng = np.random.default_rng(5)
    y = rng.normal(0.2, 1.0, (60, 32, 32, 1))
    s = stats_of(np.where(y > 0, y, 0.1 * y))
    h = s.histogram()
    for method in ("model", "mse"):
        c = choose_clip(h, 4, method)
        assert -0.1 < c.c_min < 0.0
        assert 1.5 < c.c_max < 3.0


def test_ecsq_rate_falls_with_lambda(clipped_relu_gaussian):
    h = clipped_relu_gaussian.histogram()
    rates = [evaluate(ecsq(h, 8, lam, 0.0, 2.5), h).entropy for lam in (0.0, 1e-3, 1e-2, 3e-2)]
    assert all(a >= b - 1e-9 for a, b in zip(rates, rates[1:]))
    with pytest.raises(DesignError):
        ecsq(h, 8, 100.0, 0.0, 2.5)  # a single cell left
