"""Spec v2 on the device side: the table reader's new rules, the slice header, the encoder's two key paths
and MicroPython agreeing on random version 2 tables and slices, and the slicer fitting frames to a packet size.
(The host decoder's round trips are in test_codec_v2.py; the conformance vectors pin the bytes.)"""

from __future__ import annotations

import copy
import json
import shutil
import struct
import zlib

import numpy as np
import pytest

from lwfc import errors as E
from lwfc.encoder import Encoder
from lwfc.frame import HEADER_SIZE, MIN_SLICE_FRAME, max_payload_length, parse_frame, parse_header
from lwfc.slices import plan_row_regions
from lwfc.tables import Tables
from lwfc_host.design.tablefile import finalize


def _models(m: int, n: int, rng) -> list[list[int]]:
    out = []
    for _ in range(m):
        w = rng.random(n) ** 3 + 1e-3
        f = np.maximum(1, np.floor(w / w.sum() * ((1 << 24) - n))).astype(np.int64)
        f[np.argmax(f)] += (1 << 24) - f.sum()
        out.append([int(v) for v in f])
    return out


def random_v2_table(rng, channels: int, levels: int, classes: int, refs: int, groups: int) -> dict:
    """A valid version 2 table with random contexts, reference channels and models."""
    bases = [c for c in range(channels) if rng.random() < 0.4] or [0]
    reference = [-1 if c in bases or rng.random() < 0.2 else int(rng.choice(bases)) for c in range(channels)]
    models = int(min(groups * refs * classes * classes, 65536 // levels, 40))
    return finalize({
        "layout": "NHWC", "channels": channels, "levels": levels, "quantizer": "uniform",
        "clip_min": 0.0, "clip_max": 1.0,
        "int8": {"scale": 0.01, "zero_point": -128,
                 "index_of_q": sorted(int(v) for v in rng.integers(0, levels, 256))},
        "float_input": {"frac_bits": 8, "thresholds": list(range(1, levels))},
        "reconstruction": [i / levels for i in range(levels)],
        "contexts": {"groups": groups, "classes": classes,
                     "channel_group": [int(v) for v in rng.integers(0, groups, channels)],
                     "neighbour_class": [int(v) for v in rng.integers(0, classes, levels + 1)],
                     "reference_channel": reference, "reference_classes": refs,
                     "reference_class": [int(v) for v in rng.integers(0, refs, levels + 1)],
                     "model_of_context": [int(v) for v in rng.integers(0, models, groups * refs * classes * classes)]},
        "models": _models(models, levels, rng),
    })


def random_cases(count: int, seed: int):
    """(table dict, int8 tensor, region or None) for random shapes, levels up to 64, K, R and slices."""
    rng = np.random.default_rng(seed)
    for case in range(count):
        c, n = int(rng.integers(1, 20)), int(rng.integers(2, 65))
        k, r = int(rng.integers(1, 4)), int(rng.integers(1, 5))
        h, w = int(rng.integers(1, 9)), int(rng.integers(1, 9))
        table = random_v2_table(rng, c, n, k, r, int(rng.integers(1, c + 1)))
        q = rng.integers(-128, 128, size=(h, w, c)).astype(np.int8)
        region = None
        if case % 2:
            r0, c0 = int(rng.integers(0, h)), int(rng.integers(0, c))
            region = (r0, int(rng.integers(1, h - r0 + 1)), c0, int(rng.integers(1, c - c0 + 1)))
        yield table, q, region


def test_fast_and_per_element_keys_agree_on_random_v2_tables():
    for table, q, region in random_cases(40, seed=11):
        t = Tables(table)
        h, w, _ = q.shape
        fast = Encoder(t, fast=True).encode_int8(q.tobytes(), h, w, region)
        assert fast == Encoder(t, fast=False).encode_int8(q.tobytes(), h, w, region)
        header, _ = parse_frame(fast)
        assert header.version == 2 and header.sliced == (region is not None)
        assert header.region == (region or (0, h, 0, t.channels))


@pytest.mark.skipif(shutil.which("node") is None, reason="MicroPython's WebAssembly port runs under node")
def test_micropython_encodes_random_v2_tables_and_slices_byte_identically():
    from lwfc_host.codec.micropython import encode_frames_micropython

    cases = list(random_cases(12, seed=5))
    jobs = [(json.dumps(table), q.tobytes(), q.shape[0], q.shape[1], "int8", region) for table, q, region in cases]
    expected = [Encoder(Tables(table)).encode_int8(q.tobytes(), q.shape[0], q.shape[1], region)
                for table, q, region in cases]
    assert encode_frames_micropython(jobs) == expected


def _v2_mutations(t: dict):
    n, c = t["levels"], t["channels"]
    ref = t["contexts"]["reference_channel"]
    dependent = next(i for i, r in enumerate(ref) if r >= 0)
    yield "reference_channel", lambda d: d["contexts"]["reference_channel"].__setitem__(0, 0)  # itself
    yield "reference_channel", lambda d: d["contexts"]["reference_channel"].__setitem__(0, c)
    yield "has a reference itself", lambda d: d["contexts"]["reference_channel"].__setitem__(
        next(i for i, r in enumerate(ref) if r < 0 and i != ref[dependent]), dependent)
    yield "reference_channel", lambda d: d["contexts"]["reference_channel"].pop()
    yield "reference_class", lambda d: d["contexts"]["reference_class"].__setitem__(n, 99)
    yield "reference_class", lambda d: d["contexts"]["reference_class"].pop()
    yield "reference_classes", lambda d: d["contexts"].pop("reference_classes")
    yield "classes", lambda d: d["contexts"].update(reference_classes=200)  # R K^2 > 256
    yield "levels", lambda d: d.update(levels=65)
    yield "models", lambda d: d.update(models=d["models"] * 2000)  # M N > 65536


def test_each_v2_violation_is_named():
    rng = np.random.default_rng(3)
    table = random_v2_table(rng, 12, 8, 2, 3, 2)
    table["contexts"]["reference_channel"] = [-1, -1, 0, 1, -1, 4, 4, 0, -1, 1, 8, -1]
    table = finalize(table)
    Tables(table)
    for needle, mutate in _v2_mutations(table):
        bad = copy.deepcopy(table)
        mutate(bad)
        with pytest.raises(E.TableError, match=needle):
            Tables(bad)


def test_version_1_tables_keep_their_limits_and_ignore_v2_fields(case_contexts):
    table, _, q = case_contexts
    assert table["version"] == 1
    with pytest.raises(E.TableError, match="levels"):
        Tables(dict(table, levels=17))
    extra = copy.deepcopy(table)
    extra["contexts"]["reference_channel"] = [0] * table["channels"]  # unknown to version 1: ignored
    t = Tables(extra)
    assert t.reference_channel == [-1] * table["channels"] and t.reference_classes == 1
    h, w, _ = q.shape
    assert Encoder(t).encode_int8(q.tobytes(), h, w) == Encoder(Tables(table)).encode_int8(q.tobytes(), h, w)


def _recrc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def _slice_frame(table: dict, q: np.ndarray, region) -> bytes:
    return Encoder(Tables(table)).encode_int8(q.tobytes(), q.shape[0], q.shape[1], region)


def _patched(frame: bytes, offset: int, fmt: str, value) -> bytes:
    body = bytearray(frame[:-4])
    struct.pack_into(fmt, body, offset, value)
    return _recrc(bytes(body))


def test_slice_header_errors(case_contexts):
    table, tables, q = case_contexts
    h, w, c = q.shape
    frame = _slice_frame(table, q, (2, 3, 4, 5))
    header = parse_header(frame)
    assert header.version == 2 and header.sliced and len(frame) == HEADER_SIZE + header.payload_length + 4
    assert header.region == (2, 3, 4, 5) and header.element_count == 3 * w * 5 and header.shape == (h, w, c)
    cases = [
        (E.TruncatedFrame, "truncated slice", frame[:MIN_SLICE_FRAME - 1]),
        (E.ReservedBits, "reserved", _patched(frame, 3, "<B", 0x03)),
        (E.ReservedBits, "reserved", _patched(_slice_frame(table, q, None), 3, "<B", 0x01)),  # version 1
        (E.BadShape, "do not lie", _patched(frame, 16, "<H", 0)),  # row_count 0
        (E.BadShape, "do not lie", _patched(frame, 14, "<H", h - 2)),  # rows past H
        (E.BadShape, "do not lie", _patched(frame, 20, "<H", c)),  # channels past C
        # a slice's payload length is its frame's length less 26: cut or extended, it fails there or at the CRC
        (E.PayloadError, "not a positive multiple", frame[:-1]),
        (E.PayloadError, "not a positive multiple", frame + b"\0"),
        (E.CrcMismatch, "CRC", frame[:-4]),
        (E.CrcMismatch, "CRC", frame + b"\0" * 4),
        (E.PayloadError, "exceeds the maximum", frame + b"\0" * max_payload_length(3 * w * 5)),
    ]
    for exc, needle, bad in cases:
        with pytest.raises(exc, match=needle):
            parse_frame(bad)


def test_encoder_rejects_a_region_outside_the_tensor(case_contexts):
    _, tables, q = case_contexts
    h, w, c = q.shape
    enc = Encoder(tables)
    for region in [(0, 0, 0, c), (h - 1, 2, 0, c), (0, h, c - 1, 2), (0, h, 0, 0), (-1, 1, 0, c)]:
        with pytest.raises(E.EncodeError, match="slice"):
            enc.encode_int8(q.tobytes(), h, w, region)


def test_plan_row_regions_tile_the_tensor():
    for height, channels, slices in [(64, 256, 131), (3, 5, 100), (10, 1, 3), (7, 9, 1), (1, 1, 5)]:
        cover = np.zeros((height, channels), dtype=int)
        regions = plan_row_regions(height, channels, slices)
        for r0, rn, c0, cn in regions:
            cover[r0:r0 + rn, c0:c0 + cn] += 1
        assert (cover == 1).all()
        assert len(regions) >= min(slices, height * channels)


@pytest.mark.parametrize("mtu", [300, 1200, 100000])
def test_sliced_frames_fit_the_packet_and_tile_the_tensor(mtu):
    from conftest import make_case

    _, tables, q = make_case(shape=(24, 20, 32), levels=8, groups=4, classes=3)
    h, w, c = q.shape
    enc = Encoder(tables)
    frames = enc.encode_int8_sliced(q.tobytes(), h, w, mtu)
    whole = enc.encode_int8(q.tobytes(), h, w)
    assert all(len(f) <= mtu for f in frames)
    if len(whole) <= mtu:
        assert frames == [whole]
        return
    cover = np.zeros((h, c), dtype=int)
    for f in frames:
        header, _ = parse_frame(f)
        assert header.sliced
        cover[header.row_first:header.row_first + header.row_count,
              header.channel_first:header.channel_first + header.channel_count] += 1
    assert (cover == 1).all()


def test_slicing_a_packet_too_small_for_one_row_is_an_encode_error():
    from conftest import make_case

    _, tables, q = make_case(shape=(24, 20, 32), levels=8, groups=4, classes=3)
    with pytest.raises(E.EncodeError, match="one-row, one-channel"):  # 34 bytes leave one payload word
        Encoder(tables).encode_int8_sliced(q.tobytes(), q.shape[0], q.shape[1], MIN_SLICE_FRAME + 4)
