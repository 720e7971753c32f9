"""The 5/3 wavelet with designed coefficient coding (issue 16; lwfc_host.evaluate.value_coding.DesignedWavelet):
its lifting is exactly invertible at every level count it uses, its quantizer tables reproduce their indices
from their reconstructions, its merged contexts beat the old row's fixed ones on a smooth layer at equal MSE,
and ``lwfc modes --only ... --update`` adds its row to an earlier result."""

from __future__ import annotations

import numpy as np
import pytest

from lwfc_host.evaluate import coding_modes as cm
from lwfc_host.evaluate.value_coding import (
    DesignedWavelet,
    WaveletOptions,
    agglomerate,
    designed_levels,
    dwt2,
    idwt2,
    wavelet,
)


def smooth_layer(b: int = 16, h: int = 32, w: int = 32, c: int = 6, seed: int = 0) -> np.ndarray:
    """A smooth ReLU-like layer: per tensor and channel a sum of low-frequency waves, a little noise, clipped
    below at 0."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    out = np.zeros((b, h, w, c))
    for i in range(b):
        for j in range(c):
            f = rng.uniform(0.05, 0.25, size=(3, 2))
            ph = rng.uniform(0, 2 * np.pi, size=3)
            out[i, :, :, j] = sum(np.sin(f[k, 0] * x + f[k, 1] * y + ph[k]) for k in range(3)) + 0.3 * j / c
    out += 0.05 * rng.normal(size=out.shape)
    return np.maximum(out, 0).astype(np.float32)


@pytest.mark.parametrize("h, w", [(7, 7), (14, 14), (27, 27), (128, 16), (5, 9), (2, 3)])
def test_designed_lifting_is_exactly_invertible_at_every_level_count(h, w):
    v = np.random.default_rng(h * 31 + w).integers(0, 255 << 2, size=(2, h, w, 3))  # the 4x finer grid
    for levels in sorted({1, 2, 3, 4, designed_levels(h, w)}):
        if min(h, w) < 2 ** (levels - 1):
            continue
        bands = dwt2(v, levels)
        assert sum(b[0].size for b in bands) == h * w * 3
        assert np.array_equal(idwt2(bands, levels), v)
    assert 1 <= designed_levels(h, w) <= 4


@pytest.mark.parametrize("rounding", [0.0, 0.375, 0.5])
def test_quantizer_tables_reproduce_their_indices(rounding):
    x = smooth_layer(b=8, h=16, w=16, c=2)
    fit = cm.fit_mask(8)
    dw = DesignedWavelet(x, 0.0, float(x.max()), fit, np.zeros(2, dtype=np.int64), WaveletOptions(rounding=rounding))
    for step in (3.0, 12.0, 40.0):
        qs, recs = dw.quantize(step)
        for k, (q, rec) in enumerate(zip(qs, recs)):
            delta = dw.band_step(k, step)
            if delta <= 1:
                assert np.array_equal(q, rec)  # a step under one grid unit: the band is coded losslessly
                continue
            again = np.sign(rec) * np.floor(np.abs(rec) / delta + rounding)  # quantize the reconstruction again
            assert np.array_equal(again, q), (step, k)
            assert np.array_equal(np.sign(rec), np.sign(q))


def test_agglomeration_merges_alike_cells_first():
    counts = np.array([[90, 10], [89, 11], [10, 90], [0, 0], [11, 89]], dtype=float)
    out = agglomerate(counts, ks=(1, 2, 4))
    two = out[2]
    assert two[0] == two[1] and two[2] == two[4] and two[0] != two[2]
    assert two[3] in (two[2], two[4])  # the empty cell joins its nearest non-empty neighbour's class
    assert len(set(out[1])) == 1 and len(set(out[4])) == 4


def test_designed_contexts_beat_the_old_wavelet_row_at_equal_mse():
    x = smooth_layer()
    fit = cm.fit_mask(len(x))
    groups = np.arange(x.shape[-1]) * 2 // x.shape[-1]
    c_max = float(np.quantile(x, 0.999))
    old = [(s, *wavelet(x, 0.0, c_max, s, fit, groups)) for s in (2, 3, 4, 6, 8, 12, 16, 24, 32, 48)]
    dw = DesignedWavelet(x, 0.0, c_max, fit, groups)
    targets = [m for _, m, _ in old[2:-2:2]]
    new = cm.bracket_sweep(dw, dw.mse, targets)
    for target in targets:
        b_old, b_new = cm.at_mse(old, target), cm.at_mse(new, target)
        assert b_new == b_new and b_old == b_old, target  # both swept across the target
        assert b_new <= b_old, (target, b_new, b_old)


def test_lwfc_modes_adds_the_designed_row_to_an_earlier_result(tmp_path):
    import json

    from lwfc_host.cli import main

    out = tmp_path / "modes.json"
    assert main(["modes", "--model", "resnet_fmnist", "--split", "stage2", "--images", "8", "--levels", "4",
                 "--qps", "", "--av1-crfs", "", "--output", str(out), "--no-progress"]) == 0
    first = json.loads(out.read_text())
    del first["bits_per_element"]["5/3 wavelet, designed"], first["sweeps"]["5/3 wavelet, designed"]
    out.write_text(json.dumps(first))
    assert main(["modes", "--model", "resnet_fmnist", "--split", "stage2", "--images", "8", "--levels", "4",
                 "--qps", "", "--av1-crfs", "", "--only", "5/3 wavelet, designed", "--update", str(out),
                 "--no-progress"]) == 0
    res = json.loads(out.read_text())
    assert res["bits_per_element"]["v1 designed"] == first["bits_per_element"]["v1 designed"]
    assert res["bits_per_element"]["5/3 wavelet, designed"]["4"] > 0 and res["command"] == first["command"]
    assert len(res["updates"]) == 1  # the command line that added the row (under pytest: pytest's own)
