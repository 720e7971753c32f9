"""Per-channel quantizer steps against one shared step (lwfc_host.evaluate.channel_allocation) on a synthetic
task whose channel weights are known."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from lwfc_host.evaluate.channel_allocation import measure  # noqa: E402


def _task(features, weights):
    """Task loss: the weighted squared error of every channel (the weights are the true sensitivities)."""
    w = torch.as_tensor(weights, dtype=features.dtype).view(1, -1, 1, 1)

    def loss(quantized):
        return float((w * (quantized - features).pow(2)).mean())

    return loss


def _features(channels=8):
    gen = torch.Generator().manual_seed(0)
    return torch.rand((32, channels, 16, 16), generator=gen) * 4.0


def test_unequal_channels_are_coded_in_fewer_bits_at_equal_task_loss():
    x = _features()
    weights = np.array([100.0, 100.0, 10.0, 10.0, 1.0, 1.0, 0.1, 0.1])
    res = measure(x, _task(x, weights), levels=32, c_min=0.0, c_max=4.0)
    assert res.allocated_loss <= res.shared_loss * 1.0001  # the saving is at no more task loss
    assert res.sensitivity / res.sensitivity.max() == pytest.approx(weights / weights.max(), rel=0.05)
    # high-rate theory: 0.5 log2(AM / GM) of the weights (1.54 bits here); uniform data at 32 levels is close
    assert res.predicted_saving_bits == pytest.approx(0.5 * np.log2(weights.mean() / np.exp(np.log(weights).mean())),
                                                      rel=0.05)
    assert res.shared_bits - res.allocated_bits == pytest.approx(res.predicted_saving_bits, abs=0.2)
    assert res.ratio < 0.75


def test_equal_channels_gain_nothing():
    x = _features()
    res = measure(x, _task(x, np.ones(8)), levels=16, c_min=0.0, c_max=4.0)
    assert res.predicted_saving_bits == pytest.approx(0.0, abs=0.01)
    assert res.ratio == pytest.approx(1.0, abs=0.02)
    assert "bits/element" in "\n".join(res.lines())


def test_a_clip_dominated_loss_is_charged_to_the_shared_step_not_credited_to_the_allocation():
    """Half the range clipped: the clip's error dominates, so a much coarser shared step keeps the same loss; the
    allocation is compared with that coarser step and gains nothing on equal channels."""
    x = _features()
    res = measure(x, _task(x, np.ones(8)), levels=48, c_min=0.0, c_max=2.0)
    assert res.matched_scale > 2.0 and res.matched_bits < 0.8 * res.shared_bits
    assert res.ratio == pytest.approx(1.0, abs=0.03)
