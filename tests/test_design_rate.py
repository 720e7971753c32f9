"""Designed rates against real encoding, channel groups, neighbour contexts, rate targeting, int8 input."""

from __future__ import annotations

import numpy as np
import pytest

from lwfc.encoder import Encoder
from lwfc.frame import CRC_SIZE, HEADER_SIZE
from lwfc.tables import Tables
from lwfc_host.design import entropy_models as em
from lwfc_host.design import rate_target as rt
from lwfc_host.design import table_design as dz
from lwfc_host.design.calibration import CalibrationStats


def _channels_source(seed: int = 0, n: int = 300, c: int = 24) -> np.ndarray:
    """ReLU of Gaussians whose mean and spread differ per channel: channel groups should pay off."""
    rng = np.random.default_rng(seed)
    mu = rng.normal(-0.5, 0.8, c)
    sigma = rng.uniform(0.3, 2.0, c)
    return np.maximum(rng.normal(mu, sigma, (n, 8, 8, c)), 0.0).astype(np.float32)


@pytest.fixture(scope="module")
def stats():
    s = CalibrationStats(reservoir=300)
    x = _channels_source()
    for i in range(0, len(x), 50):  # streamed in batches
        s.add_float(x[i:i + 50])
    return s.loaded()


def _encode_all(table: dict, idx: np.ndarray) -> int:
    enc = Encoder(Tables(table))
    return sum(len(enc.encode_indices(t.tobytes(), t.shape[0], t.shape[1])) for t in idx)


@pytest.mark.parametrize("kind,levels,lam,groups,classes", [
    ("uniform", 2, 0.0, 1, 1), ("uniform", 4, 0.0, "auto", 1), ("ecsq", 8, 0.002, 3, 1),
    ("uniform", 3, 0.0, 2, 2),
])
def test_coded_rate_matches_designed_entropy(stats, kind, levels, lam, groups, classes):
    """The reservoir holds every calibration tensor here, so the designed rate is the rate of exactly
    these tensors: real frames must agree within 1% plus header, CRC and flush bytes."""
    d = dz.design(stats, levels, kind, lam, "mse", groups, classes)
    idx = dz.sample_indices(stats, d.table)
    assert idx.shape[0] == stats.tensors
    real = _encode_all(d.table, idx)
    ideal = d.model_bits_per_element * idx.size / 8  # payload bytes the models promise
    frames = idx.shape[0]
    payload = real - frames * (HEADER_SIZE + CRC_SIZE)
    assert ideal * 0.99 <= payload <= ideal * 1.01 + frames * 8  # flush: at most 2 words a frame
    # and the estimate with the average flush is within 1% of the real rate
    assert d.coded_bits_per_element == pytest.approx(8 * real / idx.size, rel=0.01)


def test_channel_groups_beat_one_model(stats):
    one = dz.design(stats, 4, "uniform", 0.0, "mse", 1)
    grouped = dz.design(stats, 4, "uniform", 0.0, "mse", "auto")
    assert 1 < grouped.groups.groups <= stats.channels
    assert grouped.model_bits_per_element < 0.95 * one.model_bits_per_element
    # more groups never cost more data bits (clustering is monotone enough on these channels)
    bits = [grouped.groups.tried[g][0] for g in sorted(grouped.groups.tried)]
    assert bits[-1] <= bits[0]


def test_group_clustering_finds_planted_groups():
    rng = np.random.default_rng(7)
    protos = np.array([[0.7, 0.2, 0.1], [0.1, 0.2, 0.7], [0.3, 0.4, 0.3]])
    truth = rng.integers(0, 3, 30)
    counts = np.stack([rng.multinomial(20000, protos[g]) for g in truth]).astype(float)
    labels, _ = em.cluster_channels(counts, 3)
    # same partition up to renaming
    for g in range(3):
        assert len(set(labels[truth == g])) == 1
    choice = em.choose_groups(counts, "auto")
    assert choice.groups == 3


def test_groups_larger_than_channels_fall_back_with_a_note(stats):
    d = dz.design(stats, 3, groups=10_000)
    assert d.groups.groups == min(stats.channels, 256)
    assert any("exceeds" in n for n in d.notes)


def test_neighbour_contexts_are_counted_with_the_spec_rule(stats):
    d = dz.design(stats, 3, "uniform", 0.0, "mse", 2, 2)
    t = Tables(d.table)
    assert t.classes == 2 and len(t.models) == 2 * 4
    idx = dz.sample_indices(stats, d.table)
    counts = em.count_contexts(idx, t)
    assert counts.sum() == idx.size


@pytest.mark.parametrize("target", [0.35, 0.8, 1.4])
def test_target_bits(stats, target):
    d, tried = rt.target_rate(stats, target, "mse", 1, levels=[2, 3, 4, 6, 8], clip_scales=(1.0,))
    assert d.coded_bits_per_element == pytest.approx(target, rel=0.03)
    ok = [t for t in tried if abs(t.rate - target) <= 0.03 * target]
    assert d.mse <= min(t.mse for t in ok) * (1 + 1e-9)


def test_target_bits_out_of_range(stats):
    with pytest.raises(ValueError, match="above 8"):
        rt.target_rate(stats, 9.0)
    with pytest.raises(ValueError, match="above the highest"):
        rt.target_rate(stats, 6.0, levels=[2, 4], clip_scales=(1.0,))
    with pytest.raises(ValueError, match="below the lowest"):
        rt.target_rate(stats, 0.001, levels=[2], clip_scales=(1.0,))


def test_int8_input_design_is_exact():
    """int8 calibration: the histogram is exact per int8 value, so the designed model bits equal the
    bits of the integer models on the device's own index_of_q lookups."""
    rng = np.random.default_rng(9)
    x = np.maximum(rng.normal(0.0, 1.0, (80, 6, 6, 8)), 0.0)
    scale, zp = 6.0 / 255, -128
    q = np.clip(np.round(x / scale) + zp, -128, 127).astype(np.int8)
    s = CalibrationStats(reservoir=80)
    s.add_int8(q, scale, zp)
    st = s.loaded()
    d = dz.design(st, 4, "ecsq", 0.001, "model", "auto")
    t = Tables(d.table)
    assert d.table["int8"]["scale"] == scale and d.table["int8"]["zero_point"] == zp
    idx = np.asarray(t.index_of_q, dtype=np.int64)[q.astype(np.int64) + 128]
    lengths = -np.log2(np.asarray(t.models, dtype=float) / (1 << 24))
    model = np.asarray(t.model_of_context)[np.asarray(t.channel_group)]
    bits = sum((np.bincount(idx[..., c].ravel(), minlength=t.levels) * lengths[model[c]]).sum() for c in range(8))
    assert bits / idx.size == pytest.approx(d.model_bits_per_element, rel=1e-9)


@pytest.mark.parametrize("levels", [3, 4])
def test_group_aware_ecsq_not_worse_than_uniform_at_equal_grouped_rate(stats, levels):
    """ECSQ designed for the rate of channel-group models, compared with uniform at the same payload
    rate of those models."""
    qu, clip = dz.design_quantizer(stats, levels, "uniform")
    pu = dz.rd_point(stats, qu, 4)
    qe = dz.equal_rate_ecsq(stats, levels, clip, pu.grouped, pu.labels)
    pe = dz.rd_point(stats, qe, 4)
    ev = dz.evaluate(qe, stats.histogram(), dz.zeros_of(stats))
    rate_same_groups = dz.rate_with_groups(ev, pu.labels, 4, 0.0)
    assert rate_same_groups <= pu.grouped * 1.002
    assert pe.mse <= pu.mse * 1.001


def test_lwfc_encode_cli_frames_match_the_design(stats, tmp_path):
    """The same check through ``lwfc encode --float``: frame bytes = promised payload within 1% plus
    header, CRC and flush."""
    from lwfc_host.cli import main
    from lwfc_host.design.tablefile import write_tables

    pytest.importorskip("lwfc_host.cli.codec")
    d = dz.design(stats, 4, "ecsq", 0.001, "mse", "auto")
    table = write_tables(d.table, tmp_path / "t.json")
    t = Tables(table)
    x = stats.reservoir_float()[:6]
    idx = dz.sample_indices(stats, table)[:6]
    lengths = -np.log2(np.asarray(t.models, dtype=float) / (1 << 24))
    promised = (em.count_contexts(idx, t) * lengths[np.asarray(t.model_of_context)]).sum() / 8
    total = 0
    for i, xi in enumerate(x):
        np.save(tmp_path / f"x{i}.npy", xi)
        assert main(["encode", "--tables", str(tmp_path / "t.json"), "--input", str(tmp_path / f"x{i}.npy"),
                     "--output", str(tmp_path / f"f{i}.lwfc"), "--float"]) == 0
        total += (tmp_path / f"f{i}.lwfc").stat().st_size
    payload = total - len(x) * (HEADER_SIZE + CRC_SIZE)
    assert promised * 0.99 <= payload <= promised * 1.01 + len(x) * 8
