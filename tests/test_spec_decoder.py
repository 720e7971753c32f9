"""A decoder written from SPEC.md alone (4.1, 4.2, 4.6, 5, 6) agrees with the reference decoder: on every
conformance vector, on payloads mutated around their final words, and on which error comes first.

The spec decoder checks the canonical payload rule from its final state (4.6: length R + 1 + z, then
point = P * 2^32); the reference decoder re-encodes with constriction. Agreement on accept/reject and on
the kind of rejection is what makes the spec's three checks "equivalent to re-encoding"."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

from lwfc import errors as E
from lwfc.frame import HEADER_SIZE, parse_header
from lwfc_host.checks import conformance
from lwfc_host.codec.decoder import Decoder

T24 = 1 << 24
T32 = 1 << 32
T64 = 1 << 64
MAGIC = b"LW"


class SpecError(Exception):
    """A rejection by the spec decoder: ``kind`` is the class name SPEC.md 6 gives it."""

    def __init__(self, kind: str, why: str) -> None:
        super().__init__(f"{kind}: {why}")
        self.kind = kind
        self.why = why


def _unpack_words(b: bytes) -> list[int]:
    return list(struct.unpack(f"<{len(b) // 4}I", b))


def _pack_words(words: list[int]) -> bytes:
    return struct.pack(f"<{len(words)}I", *words)


def _max_payload(n: int) -> int:
    return 4 * (-(-25 * n // 32) + 2)


def spec_decode(frame: bytes, table: dict, table_id: bytes) -> list[list[list[int]]]:
    """SPEC.md 6, steps 1-7, on a frame and a table (the parsed JSON object). Returns indices[h][w][c] of the
    frame's slice (Hs x W x Cs; the whole tensor unsliced)."""
    b = frame
    if len(b) < 22:  # step 1
        if len(b) >= 2 and b[:2] != MAGIC:
            raise SpecError("BadMagic", "magic")
        raise SpecError("TruncatedFrame", "truncated header")
    magic, version, flags, tid, h, w, c = struct.unpack("<2sBB4sHHH", b[:14])
    if magic != MAGIC:  # step 2
        raise SpecError("BadMagic", "magic")
    if version not in (1, 2):
        raise SpecError("UnsupportedVersion", "version")
    if flags & ~(0x01 if version == 2 else 0):
        raise SpecError("ReservedBits", "flags")
    sliced = flags & 0x01
    if sliced and len(b) < 30:
        raise SpecError("TruncatedFrame", "truncated slice")
    if h == 0 or w == 0 or c == 0 or h * w * c > 1 << 26:  # step 3
        raise SpecError("BadShape", "header shape")
    if sliced:  # a slice has no counts: its region and the frame's length give them
        r0, hs, c0, cs = struct.unpack("<HHHH", b[14:22])
        n, plen = hs * w * cs, len(b) - 26
        if hs == 0 or cs == 0 or r0 + hs > h or c0 + cs > c:
            raise SpecError("BadShape", "slice region")
    else:
        r0, hs, c0, cs = 0, h, 0, c
        n, plen = struct.unpack("<II", b[14:22])
        if n != h * w * c:
            raise SpecError("BadShape", "element count")
    if plen % 4 or plen == 0 or plen > _max_payload(n):
        raise SpecError("PayloadError", "payload length")
    if len(b) < 26 + plen:  # step 4 (a slice's length always matches)
        raise SpecError("TruncatedFrame", "truncated frame")
    if len(b) > 26 + plen:
        raise SpecError("TrailingData", "trailing data")
    if zlib.crc32(b[:22 + plen]) != struct.unpack("<I", b[22 + plen:26 + plen])[0]:  # step 5
        raise SpecError("CrcMismatch", "crc")
    if tid != table_id:  # step 6
        raise SpecError("TableMismatch", "table id")
    if version == 1 and table["version"] != 1:
        raise SpecError("TableMismatch", "version 1 frame, version 2 table")
    if c != table["channels"]:
        raise SpecError("BadShape", "channels")
    words = _unpack_words(b[22:22 + plen])
    return _decode_indices(words, hs, w, c0, cs, table)  # step 7


def _scan(hs: int, w: int, independent: list[int], dependent: list[int], k: int):
    """SPEC.md 4.1, in the slice's own coordinates: (row - r0, column, channel - c0)."""
    if k == 1:
        for ch in independent + dependent:
            for y in range(hs):
                for x in range(w):
                    yield y, x, ch
    else:
        for d in range(hs + w - 1):
            rows = range(max(0, d - w + 1), min(d, hs - 1) + 1)
            for chans in (independent, dependent):
                for y in rows:
                    for ch in chans:
                        yield y, d - y, ch


def _decode_indices(words: list[int], hs: int, w: int, c0: int, cs: int, table: dict):
    ctx = table["contexts"]
    n_lv, k = table["levels"], ctx["classes"]
    v2 = table["version"] == 2
    r_cls = ctx["reference_classes"] if v2 else 1
    ref_class = ctx["reference_class"] if v2 else [0] * (n_lv + 1)
    ref_channel = ctx["reference_channel"] if v2 else [-1] * table["channels"]
    # 4.1: dependent when the reference channel lies in the slice; local channel numbers from here on
    ref_local = [ref_channel[c0 + j] - c0 if c0 <= ref_channel[c0 + j] < c0 + cs else -1 for j in range(cs)]
    independent = [j for j in range(cs) if ref_local[j] < 0]
    dependent = [j for j in range(cs) if ref_local[j] >= 0]
    cums = []
    for f in table["models"]:
        cums.append([sum(f[:s]) for s in range(n_lv)])
    pos = 2

    def next_word() -> int:
        nonlocal pos
        word = words[pos] if pos < len(words) else 0
        pos += 1
        return word

    lower, rng, renorms = 0, T64 - 1, 0
    point = (words[0] << 32) | (words[1] if len(words) > 1 else 0)
    idx = [[[0] * cs for _ in range(w)] for _ in range(hs)]
    for y, x, ch in _scan(hs, w, independent, dependent, k):  # 4.2: the context, then 4.6 steps 1-4
        a = idx[y - 1][x][ch] if y > 0 else n_lv
        left = idx[y][x - 1][ch] if x > 0 else n_lv
        ref = idx[y][x][ref_local[ch]] if ref_local[ch] >= 0 else n_lv
        cls = ctx["neighbour_class"]
        g = ctx["channel_group"][c0 + ch]
        m = ctx["model_of_context"][((g * r_cls + ref_class[ref]) * k + cls[a]) * k + cls[left]]
        freqs, cum = table["models"][m], cums[m]
        scale = rng >> 24
        q = ((point - lower) % T64) // scale
        if q >= T24:
            raise SpecError("PayloadError", "invalid quantile")
        s = max(i for i in range(n_lv) if cum[i] <= q)
        lower = (lower + scale * cum[s]) % T64
        rng = scale * freqs[s]
        if rng < T32:
            lower = (lower << 32) % T64
            rng <<= 32
            point = ((point << 32) % T64) | next_word()
            renorms += 1
        idx[y][x][ch] = s
    # the canonical payload rule, from the final state (4.6)
    p_word = ((lower + T32 - 1) % T64) >> 32
    z = 1 if ((lower + rng) % T64) >> 32 == p_word else 0
    if len(words) < renorms + 1 + z:
        raise SpecError("PayloadError", "runs out")
    if len(words) > renorms + 1 + z:
        raise SpecError("PayloadError", "left over")
    if point != p_word << 32:
        raise SpecError("PayloadError", "not canonical")
    return idx


SMALL = [spec.name for spec in conformance.VECTORS if spec.name != "large"]  # large: 1M elements, per element


@pytest.fixture(scope="module")
def vectors():
    return {name: conformance.load_vector(conformance.VECTOR_DIR / name) for name in SMALL}


@pytest.mark.parametrize("name", SMALL)
def test_spec_decoder_decodes_every_vector(name, vectors):
    tables, _, expected, indices, _ = vectors[name]
    got = spec_decode(expected, tables.raw, tables.table_id)
    assert np.array_equal(np.asarray(got, dtype=np.uint8), indices)


def _reseal(frame: bytes, payload: bytes) -> bytes:
    head = bytearray(frame[:HEADER_SIZE])
    if not parse_header(frame).sliced:  # a slice has no payload_length: its frame's length says it
        head[HEADER_SIZE - 4:HEADER_SIZE] = struct.pack("<I", len(payload))
    body = bytes(head) + payload
    return body + struct.pack("<I", zlib.crc32(body))


def _reference_outcome(dec: Decoder, frame: bytes):
    """("ok", indices) or (class name, which of 4.6's cases) from the reference decoder."""
    try:
        return "ok", dec.decode(frame).indices
    except E.PayloadError as exc:
        msg = str(exc)
        why = ("runs out" if "runs out" in msg else "left over" if "left over" in msg
               else "not canonical" if "canonical" in msg else "invalid quantile" if "does not decode" in msg
               else msg)
        return "PayloadError", why
    except E.FrameError as exc:
        return type(exc).__name__, None


def _spec_outcome(tables, frame: bytes):
    try:
        return "ok", np.asarray(spec_decode(frame, tables.raw, tables.table_id), dtype=np.uint8)
    except SpecError as exc:
        return exc.kind, exc.why if exc.kind == "PayloadError" else None


def _payload_mutations(payload: bytes, rng: np.random.Generator):
    words = _unpack_words(payload)
    yield words[:-1]
    yield words[:-2]
    yield words + [0]
    yield words + [0, 0]
    yield words + [1]
    for i in range(max(0, len(words) - 4), len(words)):  # the final words, where the seal lives
        for delta in (1, -1, 1 << 31):
            yield words[:i] + [(words[i] + delta) % T32] + words[i + 1:]
    for _ in range(6):
        i = int(rng.integers(0, len(words)))
        yield words[:i] + [(words[i] ^ (1 << int(rng.integers(0, 32))))] + words[i + 1:]


@pytest.mark.parametrize("name", SMALL)
def test_spec_decoder_rejects_what_the_reference_rejects(name, vectors):
    tables, _, expected, _, _ = vectors[name]
    dec = Decoder(tables)
    rng = np.random.default_rng(sum(map(ord, name)))
    seen = set()
    payload = expected[HEADER_SIZE:-4]
    for words in _payload_mutations(payload, rng):
        if not words:
            continue
        frame = _reseal(expected, _pack_words(words))
        ref, spec = _reference_outcome(dec, frame), _spec_outcome(tables, frame)
        if ref[0] == "ok" or spec[0] == "ok":
            assert ref[0] == spec[0] == "ok" and np.array_equal(ref[1], spec[1]), (name, words, ref, spec)
            continue
        if ref[1] == "invalid quantile":  # constriction stops at the bad quantile, as 4.6 step 1 does
            assert spec == ("PayloadError", "invalid quantile"), (name, words, spec)
        assert ref == spec, (name, words)
        seen.add(spec[1])
    assert {"left over", "not canonical"} <= seen
    if len(payload) > 4:
        assert seen & {"runs out", "invalid quantile"}


def test_final_checks_come_in_the_spec_order(vectors):
    """4.6: a payload that is both too short and wrong in its last word is "runs out", one too long and
    wrong is "left over": the length check comes before the point check."""
    tables, _, expected, _, _ = vectors["seal_zero_word"]  # its payload ends P, 0
    words = _unpack_words(expected[HEADER_SIZE:-4])
    assert words[-1] == 0
    dec = Decoder(tables)
    short = _reseal(expected, _pack_words(words[:-2] + [words[-2] ^ 1]))
    long = _reseal(expected, _pack_words(words[:-2] + [words[-2] ^ 1, 0, 0]))
    for frame, why in ((short, "runs out"), (long, "left over")):
        assert _spec_outcome(tables, frame) == ("PayloadError", why)
        assert _reference_outcome(dec, frame) == ("PayloadError", why)
    # dropping the sealing zero word is "runs out": the decoder knows from its state that it must be there
    dropped = _reseal(expected, expected[HEADER_SIZE:-8])
    assert _spec_outcome(tables, dropped) == _reference_outcome(dec, dropped) == ("PayloadError", "runs out")


def _header(frame: bytes, **fields) -> bytes:
    names = ["magic", "version", "flags", "table_id", "h", "w", "c", "n", "plen"]
    vals = dict(zip(names, struct.unpack("<2sBB4sHHHII", frame[:HEADER_SIZE])))
    vals.update(fields)
    return struct.pack("<2sBB4sHHHII", *(vals[k] for k in names)) + frame[HEADER_SIZE:]


def _recrc(frame: bytes) -> bytes:
    return frame[:-4] + struct.pack("<I", zlib.crc32(frame[:-4]))


def test_frame_checks_come_in_the_spec_order(vectors):
    """SPEC.md 6: the first failing check decides, in the order the spec lists them."""
    tables, _, frame, _, _ = vectors["odd_shape"]
    h, w, c = struct.unpack("<HHH", frame[8:14])
    dec = Decoder(tables)
    cases = [
        (b"X", "TruncatedFrame"),                        # 1 byte: no magic to check
        (b"XX", "BadMagic"),                             # 2 bytes that are not the magic
        (b"LW", "TruncatedFrame"),                       # a truncated header
        (_header(frame, version=3)[:21], "TruncatedFrame"),  # under 22 bytes nothing but the magic counts
        (_header(frame, version=3, flags=1), "UnsupportedVersion"),
        (_header(frame, flags=1, h=0), "ReservedBits"),  # version 1 reserves every flag bit
        (_header(frame, version=2, flags=2, h=0), "ReservedBits"),  # version 2 all but SLICE
        (_header(frame, version=2, flags=1)[:29], "TruncatedFrame"),  # a slice has at least 30 bytes
        (_header(frame, version=2, flags=1), "BadShape"),  # read as a slice: its fields do not fit
        (_header(frame, h=0, plen=3), "BadShape"),
        (_header(frame, plen=3)[:30], "PayloadError"),   # header checks before the frame length
        (_header(frame, table_id=b"\0\0\0\0")[:-1], "TruncatedFrame"),  # length before CRC and table id
        (_header(frame, table_id=b"\0\0\0\0") + b"\0", "TrailingData"),
        (_header(frame, table_id=b"\0\0\0\0"), "CrcMismatch"),  # CRC before the table id
        (_recrc(_header(frame, table_id=b"\0\0\0\0", c=c + 1, n=h * w * (c + 1))), "TableMismatch"),
        (_recrc(_header(frame, c=c + 1, n=h * w * (c + 1))), "BadShape"),  # table id first, then channels
    ]
    for bad, kind in cases:
        assert _spec_outcome(tables, bad)[0] == kind, (bad[:24], kind)
        assert _reference_outcome(dec, bad)[0] == kind, (bad[:24], kind)


def test_a_version_1_frame_needs_a_version_1_table(vectors):
    """SPEC.md 6 step 6: after the table id, a version 1 frame with a version 2 table is a TableMismatch."""
    tables, _, frame, _, _ = vectors["v2_references"]
    assert tables.version == 2 and frame[2] == 2
    bad = _recrc(_header(frame, version=1))
    assert _spec_outcome(tables, bad)[0] == _reference_outcome(Decoder(tables), bad)[0] == "TableMismatch"
