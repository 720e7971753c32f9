"""Spec v2 on the host: random version 2 tables (up to 64 levels, reference channels) and version 1 tables,
whole tensors and slices. The device encoder's two key paths and the host's FastEncoder give the same bytes,
the host decoder inverts them, and the host's vectorised context rule is the device's."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lwfc import errors as E
from lwfc.crc32 import crc32
from lwfc.encoder import Encoder, scan_keys
from lwfc.frame import HEADER_SIZE, pack_frame, parse_header
from lwfc.tables import MAX_KEYS, TOTAL, Tables, context_number
from lwfc_host.codec.decoder import Decoder
from lwfc_host.codec.fast import FastEncoder, context_map, model_ids, scan_order, slice_channels
from lwfc_host.design.tablefile import finalize


def _frequencies(rng: np.random.Generator, levels: int) -> list[int]:
    """A random model: N frequencies >= 1 summing to 2^24, from flat to very peaked."""
    p = rng.dirichlet(np.full(levels, float(rng.choice([0.05, 0.5, 5.0]))))
    f = 1 + np.floor(p * (TOTAL - levels)).astype(np.int64)
    f[int(np.argmax(f))] += TOTAL - int(f.sum())
    return f.tolist()


def random_table(rng: np.random.Generator, channels: int, version: int) -> Tables:
    """A valid table with random context fields: version 2 with random levels 2..64, reference classes R,
    classes K (R*K*K <= 256), groups, reference channels obeying the rule and models; or version 1
    (levels <= 16, K*K*N <= 256, no reference fields)."""
    if version == 2:
        levels = int(rng.integers(2, 65))
        refs = int(rng.choice([1, 2, 3, 5, 16, 64]))
        max_k = max(k for k in range(1, 17) if refs * k * k <= 256)
    else:
        levels = int(rng.integers(2, 17))
        refs = 1
        max_k = max(k for k in range(1, 17) if k * k * levels <= 256)
    classes = int(rng.choice([1, 1, 2, 3, max_k])) if max_k >= 3 else int(rng.integers(1, max_k + 1))
    classes = min(classes, max_k)
    groups = int(rng.integers(1, channels + 1))
    contexts = groups * refs * classes * classes
    most = min(contexts, MAX_KEYS // levels, 64)
    models = 1 if rng.random() < 0.15 else int(rng.integers(1, most + 1))
    ctx = {
        "groups": groups, "classes": classes,
        "channel_group": rng.integers(0, groups, size=channels).tolist(),
        "neighbour_class": rng.integers(0, classes, size=levels + 1).tolist(),
        "model_of_context": rng.integers(0, models, size=contexts).tolist(),
    }
    if version == 2:
        bases = [c for c in range(channels) if rng.random() < 0.4]
        ref = [-1] * channels
        for c in range(channels):
            if c not in bases and bases and rng.random() < 0.8:
                ref[c] = int(rng.choice(bases))
        ctx.update(reference_channel=ref, reference_classes=refs,
                   reference_class=rng.integers(0, refs, size=levels + 1).tolist())
    thresholds = np.cumsum(rng.integers(1, 50, size=levels - 1)) - 100
    table = {
        "layout": "NHWC", "channels": channels, "levels": levels, "clip_min": 0.0, "clip_max": 1.0,
        "int8": {"scale": 0.01, "zero_point": 0, "index_of_q": np.sort(rng.integers(0, levels, 256)).tolist()},
        "float_input": {"frac_bits": 8, "thresholds": thresholds.tolist()},
        "reconstruction": [i / levels for i in range(levels)],
        "contexts": ctx,
        "models": [_frequencies(rng, levels) for _ in range(models)],
    }
    tables = Tables(finalize(table))
    assert tables.version == version
    return tables


def random_indices(rng: np.random.Generator, shape: tuple[int, int, int], levels: int) -> np.ndarray:
    idx = rng.integers(0, levels, size=shape)
    if rng.random() < 0.5:  # mostly zeros, like quantized ReLU features
        idx[rng.random(shape) < 0.7] = 0
    return idx.astype(np.uint8)


@st.composite
def cases(draw):
    version = draw(st.sampled_from([2, 2, 2, 1]))
    h = draw(st.sampled_from([1, 1, 2, 3, 5, 7]))
    w = draw(st.sampled_from([1, 1, 2, 4, 6]))
    c = draw(st.integers(1, 9))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    tables = random_table(rng, c, version)
    idx = random_indices(rng, (h, w, c), tables.levels)
    region = None
    if draw(st.booleans()):
        rn = draw(st.integers(1, h))
        cn = draw(st.integers(1, c))
        region = (draw(st.integers(0, h - rn)), rn, draw(st.integers(0, c - cn)), cn)
    return tables, idx, region


@settings(max_examples=250, deadline=None)
@given(cases())
def test_encoders_agree_and_decoder_inverts(case):
    tables, idx, region = case
    h, w, c = idx.shape
    data = idx.tobytes()
    frame = Encoder(tables, fast=True).encode_indices(data, h, w, region)
    assert Encoder(tables, fast=False).encode_indices(data, h, w, region) == frame
    assert FastEncoder(tables).frame_indices(idx, region) == frame

    header = parse_header(frame)
    assert header.version == (2 if region is not None or tables.version == 2 else 1)
    assert header.sliced == (region is not None)
    assert len(frame) == HEADER_SIZE + header.payload_length + 4  # 22-byte header, sliced or not
    r0, rn, c0, cn = region if region is not None else (0, h, 0, c)
    out = Decoder(tables).decode(frame)
    assert out.header.shape == (h, w, c)
    assert out.header.region == (r0, rn, c0, cn)
    assert out.header.sliced == (region is not None)
    expected = idx[r0:r0 + rn, :, c0:c0 + cn]
    np.testing.assert_array_equal(out.indices, expected)
    assert out.indices.shape == (rn, w, cn)
    assert out.tensor.shape == (1, rn, w, cn) and out.tensor.dtype == np.float32
    np.testing.assert_array_equal(out.tensor[0], np.asarray(tables.reconstruction, np.float32)[expected])
    assert out.bits_per_element == 8 * len(frame) / (rn * w * cn)
    assert np.array_equal(Decoder(tables, verify=False).decode(frame).indices, expected)


@settings(max_examples=40, deadline=None)
@given(cases())
def test_int8_frames_agree(case):
    """FastEncoder.frame_int8 (region or not) equals the device's encode_int8."""
    tables, idx, region = case
    h, w, _ = idx.shape
    q = np.random.default_rng(idx.size).integers(-128, 128, size=idx.shape).astype(np.int8)
    frame = Encoder(tables).encode_int8(q.tobytes(), h, w, region)
    assert FastEncoder(tables).frame_int8(q, region=region) == frame
    expected = np.asarray(tables.index_of_q)[q.astype(int) + 128]
    r0, rn, c0, cn = region if region is not None else (0, h, 0, idx.shape[2])
    np.testing.assert_array_equal(Decoder(tables).decode(frame).indices, expected[r0:r0 + rn, :, c0:c0 + cn])


@settings(max_examples=100, deadline=None)
@given(cases())
def test_context_rule_scalar_equals_vectorised(case):
    """context_map / model_ids (the host's vectorised rule) equal lwfc.tables.context_number per element on
    the whole tensor, and, on a slice, the device's keys (model * N + index) in scan order (scan_order)."""
    tables, idx, region = case
    h, w, c = idx.shape
    n, k, refs = tables.levels, tables.classes, tables.reference_classes
    ncls, rcls, refch = tables.neighbour_class, tables.reference_class, tables.reference_channel
    scalar = np.empty(idx.shape, dtype=np.int64)
    for y in range(h):
        for x in range(w):
            for ch in range(c):
                above = idx[y - 1, x, ch] if y > 0 else n
                left = idx[y, x - 1, ch] if x > 0 else n
                ref = idx[y, x, refch[ch]] if refch[ch] >= 0 else n
                g = tables.channel_group[ch]
                scalar[y, x, ch] = context_number(g, ncls[above], ncls[left], k, rcls[ref], refs)
                assert scalar[y, x, ch] == ((g * refs + rcls[ref]) * k + ncls[above]) * k + ncls[left]
    np.testing.assert_array_equal(context_map(idx, tables), scalar)
    moc = np.asarray(tables.model_of_context)
    np.testing.assert_array_equal(model_ids(idx, tables), moc[scalar])
    batch = np.stack([idx, idx[::-1], idx[:, ::-1]])  # (B, H, W, C): each tensor on its own
    np.testing.assert_array_equal(model_ids(batch, tables), np.stack([model_ids(b, tables) for b in batch]))

    r0, rn, c0, cn = region if region is not None else (0, h, 0, c)
    keys = np.fromiter(scan_keys(tables, idx.tobytes(), h, w, (r0, rn, c0, cn)), dtype=np.int64)
    sub = idx[r0:r0 + rn, :, c0:c0 + cn]
    independent, dependent, _ = slice_channels(tables, c0, cn)
    order = scan_order(rn, w, independent, dependent, k)
    np.testing.assert_array_equal(keys % n, sub.reshape(-1)[order])
    np.testing.assert_array_equal(keys // n, model_ids(sub, tables, channel_first=c0).reshape(-1)[order])


def test_v2_table_with_dependents_decodes_bigger_tensor():
    """A K > 1 and a K = 1 version 2 table with half the channels dependent, on a 24x20x16 tensor: every
    encoder agrees, the decoder inverts, whole and sliced; a flipped payload bit is rejected."""
    rng = np.random.default_rng(7)
    for classes in (3, 1):
        table = {
            "layout": "NHWC", "channels": 16, "levels": 40, "clip_min": 0.0, "clip_max": 1.0,
            "int8": {"scale": 0.01, "zero_point": 0, "index_of_q": np.sort(rng.integers(0, 40, 256)).tolist()},
            "float_input": {"frac_bits": 8, "thresholds": list(range(39))},
            "reconstruction": [i / 40 for i in range(40)],
            "contexts": {"groups": 4, "classes": classes, "channel_group": [c % 4 for c in range(16)],
                         "neighbour_class": [min(v, classes - 1) for v in range(40)] + [0],
                         "reference_channel": [-1 if c % 2 == 0 else c - 1 for c in range(16)],
                         "reference_classes": 4, "reference_class": [min(v, 3) for v in range(40)] + [0],
                         "model_of_context": list(range(4 * 4 * classes * classes))},
            "models": [_frequencies(rng, 40) for _ in range(4 * 4 * classes * classes)],
        }
        tables = Tables(finalize(table))
        idx = random_indices(rng, (24, 20, 16), 40)
        dec = Decoder(tables)
        for region in (None, (3, 9, 1, 12), (23, 1, 5, 1), (0, 24, 0, 16)):
            frame = Encoder(tables).encode_indices(idx.tobytes(), 24, 20, region)
            assert FastEncoder(tables).frame_indices(idx, region) == frame
            r0, rn, c0, cn = region or (0, 24, 0, 16)
            np.testing.assert_array_equal(dec.decode(frame).indices, idx[r0:r0 + rn, :, c0:c0 + cn])
            bad = bytearray(frame[:-4])
            bad[HEADER_SIZE + 5] ^= 0x10
            bad = bytes(bad) + struct.pack("<I", crc32(bytes(bad)))
            with pytest.raises(E.PayloadError):
                dec.decode(bad)


def test_v1_table_with_region_gives_a_version_2_frame(case_contexts, case_planar):
    for _, tables, q in (case_contexts, case_planar):
        h, w, c = q.shape
        assert tables.version == 1
        whole = Encoder(tables).encode_int8(q.tobytes(), h, w)
        assert whole[2] == 1 and parse_header(whole).version == 1
        region = (2, 3, 5, 7)
        frame = Encoder(tables).encode_int8(q.tobytes(), h, w, region)
        assert frame[2] == 2
        assert FastEncoder(tables).frame_int8(q, region=region) == frame
        header = parse_header(frame)
        assert header.sliced and header.region == region and header.shape == (h, w, c)
        out = Decoder(tables).decode(frame)
        expected = np.asarray(tables.index_of_q)[q.astype(int) + 128][2:5, :, 5:12]
        np.testing.assert_array_equal(out.indices, expected)
        assert out.tensor.shape == (1, 3, w, 7)


def _v2_unsliced_frame():
    tables = random_table(np.random.default_rng(11), 6, 2)
    idx = random_indices(np.random.default_rng(12), (4, 5, 6), tables.levels)
    frame = Encoder(tables).encode_indices(idx.tobytes(), 4, 5)
    assert frame[2] == 2 and parse_header(frame).version == 2 and not parse_header(frame).sliced
    return tables, frame


def _patched(frame: bytes, at: int, new: bytes) -> bytes:
    """``frame`` with ``new`` written at offset ``at`` and its CRC recomputed."""
    body = frame[:at] + new + frame[at + len(new):-4]
    return body + struct.pack("<I", crc32(body))


def test_version_1_frame_with_version_2_table_is_a_table_mismatch():
    tables, frame = _v2_unsliced_frame()
    dec = Decoder(tables)
    v1 = _patched(frame, 2, b"\x01")
    with pytest.raises(E.TableMismatch, match="version 1 frame"):
        dec.decode(v1)
    # the table id is checked first, the channels after the version
    with pytest.raises(E.TableMismatch, match="coded with table"):
        dec.decode(_patched(v1, 4, b"\0\0\0\0"))
    h, w, c = struct.unpack("<HHH", frame[8:14])
    more = _patched(v1, 12, struct.pack("<H", c + 1))
    more = _patched(more, 14, struct.pack("<I", h * w * (c + 1)))
    with pytest.raises(E.TableMismatch, match="version 1 frame"):
        dec.decode(more)
    more2 = _patched(frame, 12, struct.pack("<H", c + 1))
    more2 = _patched(more2, 14, struct.pack("<I", h * w * (c + 1)))
    with pytest.raises(E.BadShape, match="channels"):
        dec.decode(more2)
    assert np.array_equal(dec.decode(frame).indices, dec.decode(frame).indices)  # still works


def test_mutated_sliced_frames_decode_right_or_are_rejected():
    """Bit flips, byte overwrites, truncation and junk on sliced version 2 frames of a table with dependent
    channels: each result is rejected with a FrameError, or (behind a resealed CRC) is another valid frame
    that the device encoder rebuilds from the decoded indices."""
    rng = np.random.default_rng(21)
    tables = random_table(rng, 7, 2)
    while not any(r >= 0 for r in tables.reference_channel) or tables.classes == 1:
        tables = random_table(rng, 7, 2)
    idx = random_indices(rng, (5, 4, 7), tables.levels)
    encoder = Encoder(tables)
    dec = Decoder(tables)
    outcomes = {"rejected": 0, "valid": 0}
    for region in ((1, 3, 0, 7), (0, 5, 2, 4)):
        frame = encoder.encode_indices(idx.tobytes(), 5, 4, region)
        for _ in range(1500):
            b = bytearray(frame)
            kind = rng.integers(0, 4)
            if kind == 0:
                for _ in range(rng.integers(1, 4)):
                    b[rng.integers(0, len(b))] ^= 1 << int(rng.integers(0, 8))
            elif kind == 1:
                b[rng.integers(0, HEADER_SIZE)] = rng.integers(0, 256)
            elif kind == 2:
                b = b[:rng.integers(0, len(b))]
            else:
                b += bytes(rng.integers(0, 256, size=rng.integers(1, 9), dtype=np.uint8))
            bad = bytes(b)
            if rng.random() < 0.5 and len(bad) >= 26:
                bad = bad[:-4] + struct.pack("<I", crc32(bad[:-4]))
            try:
                out = dec.decode(bad)
            except E.FrameError:
                outcomes["rejected"] += 1
                continue
            head = out.header
            h, w, c = head.shape
            r0, rn, c0, cn = head.region
            full = np.zeros((h, w, c), dtype=np.uint8)
            full[r0:r0 + rn, :, c0:c0 + cn] = out.indices
            region = head.region if head.sliced else None
            payload = encoder.payload(full.tobytes(), h, w, region)
            assert pack_frame(tables.table_id, (h, w, c), payload, head.version, region) == bad
            outcomes["valid"] += 1
    assert outcomes["rejected"] > 2500
