"""Mutated frames: each is either decoded to the right tensor or rejected with the decoder's own error."""

import struct
import zlib

import numpy as np
import pytest

from lwfc.encoder import Encoder
from lwfc.errors import FrameError
from lwfc.frame import pack_frame
from lwfc_host.codec.decoder import Decoder


def _mutate(rng, frame: bytes) -> bytes:
    b = bytearray(frame)
    kind = rng.integers(0, 6)
    if kind == 0:  # flip 1-4 bits
        for _ in range(rng.integers(1, 5)):
            i = rng.integers(0, len(b))
            b[i] ^= 1 << rng.integers(0, 8)
    elif kind == 1:  # overwrite a byte
        b[rng.integers(0, len(b))] = rng.integers(0, 256)
    elif kind == 2:  # truncate
        b = b[: rng.integers(0, len(b))]
    elif kind == 3:  # append junk
        b += bytes(rng.integers(0, 256, size=rng.integers(1, 16), dtype=np.uint8))
    elif kind == 4:  # duplicate or drop a run
        i, j = sorted(rng.integers(0, len(b), size=2))
        b = b[:i] + b[i:j] * rng.integers(0, 3) + b[j:]
    else:  # overwrite a header field
        i = rng.integers(0, 22)
        b[i] = rng.integers(0, 256)
    out = bytes(b)
    resealed = bool(rng.random() < 0.5 and len(out) >= 26)
    if resealed:
        # re-seal with a valid CRC so that the checks behind the CRC are exercised too
        out = out[:-4] + struct.pack("<I", zlib.crc32(out[:-4]))
    return out, resealed


def _fuzz(case, count, seed):
    _, tables, q = case
    encoder = Encoder(tables)
    frame = encoder.encode_int8(q.tobytes(), q.shape[0], q.shape[1])
    dec = Decoder(tables)
    right = dec.decode(frame).indices
    rng = np.random.default_rng(seed)
    outcomes = {"decoded": 0, "rejected": 0, "other valid frame": 0}
    for _ in range(count):
        bad, resealed = _mutate(rng, frame)
        try:
            out = dec.decode(bad)
        except FrameError:
            outcomes["rejected"] += 1
            continue
        if bad == frame:  # the mutation was a no-op (e.g. a run duplicated zero times)
            assert np.array_equal(out.indices, right)
            outcomes["decoded"] += 1
        else:
            # Behind a valid CRC a payload change can make another valid frame. Then "the right tensor" is
            # the one that frame encodes: the device encoder must turn the decoded indices back into it.
            # (A version 1 table also reads version 2 frames, so the version byte may have changed too: the
            # frame is then rebuilt with the decoded header's version and region.)
            assert resealed
            head = out.header
            h, w, c = head.shape
            r0, rn, c0, cn = head.region
            full = np.zeros((h, w, c), dtype=np.uint8)
            full[r0:r0 + rn, :, c0:c0 + cn] = out.indices
            region = head.region if head.sliced else None
            payload = encoder.payload(full.tobytes(), h, w, region)
            assert pack_frame(tables.table_id, (h, w, c), payload, head.version, region) == bad
            outcomes["other valid frame"] += 1
    return outcomes


def test_fuzz_100k_mutated_frames():
    from conftest import make_case

    case = make_case(shape=(4, 5, 6), groups=2, classes=2, seed=9)
    outcomes = _fuzz(case, 100_000, seed=1)
    assert outcomes["rejected"] > 90_000


def test_fuzz_planar_tables(case_planar):
    outcomes = _fuzz(case_planar, 5_000, seed=2)
    assert outcomes["rejected"] > 4_000


@pytest.mark.slow
def test_fuzz_million_frames():
    from conftest import make_case

    outcomes = _fuzz(make_case(shape=(3, 3, 4), groups=1, classes=3, seed=4), 1_000_000, seed=3)
    assert outcomes["rejected"] > 900_000
