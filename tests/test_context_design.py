"""Context design (host/lwfc_host/design/contexts.py): designed neighbour classes and merged context models
beat the naive class map in real frames of the device encoder, stay valid tables and round-trip through
the host decoder."""

from __future__ import annotations

import numpy as np
import pytest

from lwfc.encoder import Encoder
from lwfc.tables import Tables
from lwfc_host.codec.decoder import Decoder
from lwfc_host.design import contexts as cdz
from lwfc_host.design import table_design as dz
from lwfc_host.design.calibration import CalibrationStats
from lwfc_host.design.tablefile import finalize

SHAPE = (12, 12, 24)
LEVELS = 6


def smooth_relu(batch: int, seed: int) -> np.ndarray:
    """ReLU of spatially smooth fields (3x3 box-filtered noise, per-channel gain): neighbours correlate as
    in CNN feature maps, about half the values are exactly zero."""
    rng = np.random.default_rng(seed)
    h, w, c = SHAPE
    z = rng.normal(size=(batch, h + 2, w + 2, c))
    x = sum(z[:, i:i + h, j:j + w] for i in range(3) for j in range(3)) / 3.0
    x *= rng.uniform(0.5, 2.0, size=c)
    return np.maximum(x - 0.2, 0.0).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    """Spatially smooth ReLU activations (about half zeros): calibration tensors and other test tensors."""
    calib = smooth_relu(24, seed=1)
    test = smooth_relu(6, seed=2)
    cs = CalibrationStats(reservoir=24)
    cs.add_float(calib)
    return cs.loaded(), test


def _frames_bits(table: dict, x: np.ndarray) -> tuple[float, list[bytes]]:
    """Real frames of the device encoder (pure-Python core) for float tensors; bits/element."""
    t = Tables(table)
    enc = Encoder(t)
    frames = []
    for v in x:
        idx = dz.quantizer_indices(v, table)
        frames.append(enc.encode_indices(idx.tobytes(), v.shape[0], v.shape[1]))
    return 8.0 * sum(len(f) for f in frames) / x.size, frames


def _roundtrip(table: dict, x: np.ndarray, frames: list[bytes]) -> None:
    dec = Decoder(Tables(table))
    for v, f in zip(x, frames):
        d = dec.decode(f)
        assert np.array_equal(d.indices, dz.quantizer_indices(v, table))
        recon = np.asarray(table["reconstruction"], dtype=np.float32)[d.indices]
        assert np.array_equal(d.tensor[0], recon)


def test_designed_contexts_beat_naive_classes_in_real_frames(data):
    stats, test = data
    q, cc = dz.design_quantizer(stats, LEVELS, "uniform", 0.0, "mse")
    # the same quantizer, the same channel groups; naive classes (0, 1, >= 2) against designed contexts
    naive = dz.finish_design(stats, q, cc, 4, 3)
    auto = dz.finish_design(stats, q, cc, "auto", "auto")
    one = dz.finish_design(stats, q, cc, 4, 1)
    assert naive.table["reconstruction"] == auto.table["reconstruction"]
    b_naive, f_naive = _frames_bits(naive.table, test)
    b_auto, f_auto = _frames_bits(auto.table, test)
    b_one, _ = _frames_bits(one.table, test)
    ctx = auto.table["contexts"]
    assert ctx["classes"] > 1 and len(ctx["neighbour_class"]) == LEVELS + 1
    assert b_auto < b_naive < b_one, (b_auto, b_naive, b_one)
    _roundtrip(auto.table, test, f_auto)
    _roundtrip(naive.table, test, f_naive)
    assert auto.table["design"]["context_design"]["classes"] == ctx["classes"]


def test_merged_models_are_valid_and_roundtrip(data):
    stats, test = data
    q, cc = dz.design_quantizer(stats, 4, "uniform", 0.0, "mse")
    base = dz.finish_design(stats, q, cc, 1, 1)
    idx = dz.sample_indices(stats, base.table)
    # a side cost per model far above the data bits merges contexts; the table must stay valid
    cd = cdz.design_contexts(idx, 4, classes=3, groups=2, amortise=1e-3)
    assert cd.models < 2 * 3 * 3
    assert sorted(set(cd.model_of_context)) == list(range(cd.models))
    table = finalize(cdz.apply_to_table(base.table, cd))
    t = Tables(table)
    assert len(t.models) == cd.models and t.classes == 3
    _, frames = _frames_bits(table, test[:2])
    _roundtrip(table, test[:2], frames)


def test_class_maps_and_merge_rules():
    rng = np.random.default_rng(0)
    # index 0 and "outside" behave alike, 1 and 2 alike: the 2-class map must put them together
    n = 3
    j = np.zeros((1, n + 1, n + 1, n))
    like0 = np.array([90.0, 8, 2])
    like1 = np.array([10.0, 45, 45])
    for a in range(n + 1):
        for b in range(n + 1):
            p = like0 if (a in (0, n) and b in (0, n)) else like1
            j[0, a, b] = rng.multinomial(5000, p / p.sum())
    maps = cdz.class_maps(j, 3)
    m2 = maps[2]
    assert m2[0] == m2[n] and m2[1] == m2[2] and m2[0] != m2[1]
    # two identical contexts merge, a distinct one does not (model cost small against the data)
    rows = np.array([[500.0, 500, 0], [499, 501, 0], [0, 10, 990]])
    assert cdz.merge_models(rows, 24.0 * 2).tolist() == [0, 0, 1]
    assert cdz.max_classes(4) == 5 and cdz.max_classes(16) == 4 and cdz.max_classes(2) == 3


def test_joint_counts_match_spec_contexts(data):
    """joint_counts summed by a class map equals entropy_models.count_contexts (lwfc_host.codec.fast.context_ids)."""
    from lwfc_host.design import entropy_models as em
    stats, _ = data
    q, cc = dz.design_quantizer(stats, 4, "uniform", 0.0, "mse")
    base = dz.finish_design(stats, q, cc, 1, 1)
    idx = dz.sample_indices(stats, base.table)[:4]
    cd = cdz.design_contexts(idx, 4, classes=2, groups=1, spec_version=1)  # v1 contexts: no reference class
    table = finalize(cdz.apply_to_table(base.table, cd))
    want = em.count_contexts(idx, Tables(table))
    got = cdz._by_class(cdz.joint_counts(idx, 4).sum(axis=0, keepdims=True).astype(float),
                        np.asarray(cd.neighbour_class), 2).reshape(-1, 4)
    assert np.array_equal(want, got)


def test_many_levels_with_concentrated_values_bound_the_classes():
    """Above 16 levels neighbour values are binned to at most 17 fine classes of equal mass; when a few
    levels hold most of the mass the bins collapse to fewer, and K may not exceed them (the detector's
    24- and 32-level designs failed with a KeyError before)."""
    x = np.random.default_rng(0).normal(size=(8, 24, 24, 6))
    for axis in (1, 2):  # smooth maps: more neighbour classes keep paying, up to K = F
        for _ in range(4):
            x = (x + np.roll(x, 1, axis=axis) + np.roll(x, -1, axis=axis)) / 3
    x = (x - x.min()) / (x.max() - x.min())
    idx = np.minimum((23.99 * x ** 3).astype(np.int64), 23)  # cubed: the mass sits on the low levels
    search = cdz._Search(idx, 24, 1.0, 4, None)
    assert search.fine_classes == 10  # fewer than the 16 classes version 2 allows at 24 levels
    d = cdz.design_contexts(idx, 24, "auto", "auto")
    assert 1 <= d.classes <= search.fine_classes and len(d.neighbour_class) == 25
    with pytest.raises(ValueError, match=f"classes K = 16 exceed the {search.fine_classes} fine neighbour classes"):
        cdz.design_contexts(idx, 24, 16, 1)
