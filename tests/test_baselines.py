"""Baseline codecs on small real tensors: real ffmpeg/x265 and Pillow, rates counted from the bytes."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from lwfc_host.evaluate import baselines as bl


@pytest.fixture(scope="module")
def feats() -> np.ndarray:
    """ReLU-like features with spatial structure (a random walk along rows, clipped at zero)."""
    rng = np.random.default_rng(1)
    return np.maximum(0, rng.normal(size=(3, 10, 12, 7)).cumsum(axis=1) - 0.5).astype(np.float32)


def test_tiling_roundtrip_and_grid():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, size=(2, 5, 6, 11)).astype(np.uint16)
    rows, cols = bl.tile_grid(11, 5, 6)
    assert rows * cols >= 11
    frames = bl.tile(x, rows, cols)
    assert frames.shape == (2, rows * 5, cols * 6)
    np.testing.assert_array_equal(bl.untile(frames, rows, cols, 5, 6, 11), x)
    assert bl.tile_grid(48, 14, 14)[0] * 14 in range(84, 113)  # near-square frame
    assert bl.tile_grid(480, 14, 14) == (22, 22)


needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg (libx265) not installed")


@needs_ffmpeg
@pytest.mark.parametrize("bits", [8, 10])
def test_hevc_real_bytes(feats, bits):
    hi_q = bl.hevc(feats, qp=4, bits=bits)
    lo_q = bl.hevc(feats, qp=40, bits=bits)
    for b in (hi_q, lo_q):
        assert len(b.parts) == 3
        side, au = b.parts[0]
        assert len(side) == bl.SIDE_INFO_BYTES
        # every access unit starts with parameter sets (x265 repeats them before each all-intra picture)
        types = [t for _, _, t in bl.nal_units(au)]
        assert types[:3] == [32, 33, 34] and max(types) <= 34
        assert 60 <= b.optional_bytes[0] <= 100
        n_el = feats[0].size
        np.testing.assert_allclose(b.bits_per_element(), 8 * b.nbytes / n_el)
        assert (b.bits_per_element(True) < b.bits_per_element()).all()
    assert (lo_q.nbytes < hi_q.nbytes).all()
    err_hi = np.abs(hi_q.recon - feats).max()
    err_lo = np.abs(lo_q.recon - feats).mean()
    assert err_hi < 0.05 * feats.max()
    assert err_lo > np.abs(hi_q.recon - feats).mean()


@needs_ffmpeg
def test_hevc_access_unit_decodes_alone(feats):
    """The bytes counted for one tensor are enough to decode it: its access unit on its own decodes to the
    same picture as inside the stream."""
    b = bl.hevc(feats, qp=30, bits=8)
    rows, cols = bl.tile_grid(7, 10, 12)
    fh, fw = rows * 10 + (-rows * 10) % 8, cols * 12 + (-cols * 12) % 8
    alone, _ = bl.x265_decode(b.parts[1][1], fh, fw, 8)
    assert alone.shape[0] == 1
    lo, hi = bl.parse_side_info(b.parts[1][0])
    rec = bl.minmax_dequantize(bl.untile(alone[:, : rows * 10, : cols * 12], rows, cols, 10, 12, 7),
                               np.asarray([lo]), np.asarray([hi]), 8)
    np.testing.assert_array_equal(rec[0], b.recon[1])


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_image_tiles(feats, fmt):
    b90 = bl.image_tiles(feats, 90, fmt)
    b10 = bl.image_tiles(feats, 10, fmt)
    assert len(b90.parts[0]) == 1 + 3  # side info + ceil(7 / 3) tile images
    magic = b"\xff\xd8" if fmt == "JPEG" else b"RIFF"
    assert all(p.startswith(magic) for p in b90.parts[0][1:])
    assert (b10.nbytes < b90.nbytes).all()
    assert np.abs(b90.recon - feats).mean() < np.abs(b10.recon - feats).mean()
    # RGB coding of unrelated channels (colour transform, 4:2:0 chroma) is lossy even at quality 90
    assert np.abs(b90.recon - feats).mean() < 0.1 * feats.max()


@pytest.mark.parametrize("levels", [2, 3, 8, 16])
def test_rle_lossless_on_indices(feats, levels):
    b = bl.rle(feats, levels, 0.0, float(feats.max()))
    idx = bl.uniform_indices(feats, levels, 0.0, float(feats.max()))
    step = float(feats.max()) / (levels - 1)
    np.testing.assert_allclose(b.recon, idx * step, rtol=1e-6, atol=1e-6)
    # long runs are split: a constant plane longer than one run byte holds
    long = np.zeros(1000, dtype=np.uint8)
    assert bl.rle_decode(bl.rle_encode(long, levels), levels, 1000).tolist() == long.tolist()


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_zlib(feats, bits):
    b = bl.zlib_codec(feats, bits)
    lo, hi, _ = bl.minmax_side_info(feats)
    v = bl.minmax_quantize(feats, lo, hi, bits)
    np.testing.assert_allclose(b.recon, bl.minmax_dequantize(v, lo, hi, bits), rtol=1e-6)
    assert all(len(p[0]) == 8 for p in b.parts)


def test_pack_bits_roundtrip():
    rng = np.random.default_rng(3)
    for bits in (1, 2, 4, 8):
        v = rng.integers(0, 1 << bits, size=37).astype(np.uint8)
        np.testing.assert_array_equal(bl.unpack_bits(bl.pack_bits(v, bits), bits, 37), v)
