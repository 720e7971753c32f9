"""The AV1 all-intra baseline (lwfc_host.evaluate.av1) with the real libaom through ffmpeg: every tensor's
bytes are its own temporal unit, quality trades for rate, what is decoded is what was sent."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from lwfc_host.evaluate.av1 import av1, ivf_frames, sequence_header_bytes
from lwfc_host.evaluate.baselines import BaselineError

pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg with libaom-av1")


@pytest.fixture(scope="module")
def features() -> np.ndarray:
    rng = np.random.default_rng(0)
    x = rng.normal(0.2, 0.5, size=(3, 14, 14, 48)).astype(np.float32)
    x = (x + np.roll(x, 1, axis=1) + np.roll(x, 1, axis=2)) / 3  # some spatial correlation, as features have
    return np.maximum(x, 0)


def test_quality_trades_for_rate(features):
    fine, coarse = av1(features, 20), av1(features, 60)
    assert fine.recon.shape == coarse.recon.shape == features.shape
    mse = [float(np.mean((b.recon - features) ** 2)) for b in (fine, coarse)]
    assert mse[0] < mse[1] and (fine.bits_per_element() > coarse.bits_per_element()).all()
    assert mse[0] < 0.01 * float(features.var())  # near-transparent at crf 20
    assert fine.setting == "8bit crf20" and fine.method == "av1"


def test_each_tensor_is_its_own_intra_frame_with_its_sequence_header(features):
    b = av1(features, 40)
    assert len(b.parts) == 3 and all(len(side) == 8 for side, _ in b.parts)  # min/max side info per tensor
    for (_, unit), seq in zip(b.parts, b.optional_bytes):
        assert unit[0] >> 3 & 15 == 2  # a temporal unit starts with its temporal delimiter OBU
        assert seq == sequence_header_bytes(unit) and 8 <= seq <= 40
    assert (b.bits_per_element(without_optional=True) < b.bits_per_element()).all()
    # a tensor decodes alone: the first tensor's unit is a complete stream once wrapped in IVF
    assert b.nbytes[0] == 8 + len(b.parts[0][1])


def test_ivf_parsing_names_what_is_wrong():
    with pytest.raises(BaselineError, match="not an IVF stream"):
        ivf_frames(b"RIFF" + bytes(40))
    header = b"DKIF" + (0).to_bytes(2, "little") + (32).to_bytes(2, "little") + b"AV01" + bytes(20)
    assert ivf_frames(header) == []
    with pytest.raises(BaselineError, match="ends inside a frame header"):
        ivf_frames(header + bytes(5))
