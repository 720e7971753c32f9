"""Every malformed frame is rejected with its own FrameError subclass and a message naming the problem."""

import struct
import zlib

import numpy as np
import pytest

from lwfc import errors as E
from lwfc.encoder import Encoder
from lwfc.frame import HEADER_SIZE, MAX_ELEMENTS, parse_header
from lwfc_host.codec.decoder import Decoder


def _frame(case):
    _, tables, q = case
    return tables, Encoder(tables).encode_int8(q.tobytes(), q.shape[0], q.shape[1])


def _recrc(body: bytes) -> bytes:
    """A frame body (header + payload) with a correct CRC appended: tests the checks behind the CRC."""
    return body + struct.pack("<I", zlib.crc32(body))


def _with_header(frame: bytes, **fields) -> bytes:
    names = ["magic", "version", "flags", "table_id", "h", "w", "c", "n", "plen"]
    vals = dict(zip(names, struct.unpack("<2sBB4sHHHII", frame[:HEADER_SIZE])))
    vals.update(fields)
    head = struct.pack("<2sBB4sHHHII", *(vals[k] for k in names))
    return _recrc(head + frame[HEADER_SIZE:-4])


def _with_payload(frame: bytes, payload: bytes) -> bytes:
    head = bytearray(frame[:HEADER_SIZE])
    head[18:22] = struct.pack("<I", len(payload))
    return _recrc(bytes(head) + payload)


@pytest.mark.parametrize("case_name", ["case_contexts", "case_planar"])
def test_each_error(case_name, request):
    tables, frame = _frame(request.getfixturevalue(case_name))
    dec = Decoder(tables)
    payload = frame[HEADER_SIZE:-4]
    h, w, c = struct.unpack("<HHH", frame[8:14])
    cases = [
        (E.BadMagic, "magic", b"XX" + frame[2:]),
        (E.BadMagic, "magic", b"XX"),
        (E.TruncatedFrame, "truncated header", frame[:10]),
        (E.TruncatedFrame, "truncated header", b""),
        (E.UnsupportedVersion, "version 3", _with_header(frame, version=3)),
        (E.UnsupportedVersion, "version 0", _with_header(frame, version=0)),
        (E.ReservedBits, "reserved", _with_header(frame, flags=1)),
        (E.TruncatedFrame, "truncated frame", frame[:-1]),
        (E.TruncatedFrame, "truncated frame", frame[: HEADER_SIZE + 4]),
        (E.TrailingData, "trailing", frame + b"\x00"),
        (E.CrcMismatch, "CRC", frame[:-1] + bytes([frame[-1] ^ 1])),
        (E.CrcMismatch, "CRC", frame[:30] + bytes([frame[30] ^ 0x10]) + frame[31:]),
        (E.TableMismatch, "table", _with_header(frame, table_id=b"\x00\x01\x02\x03")),
        (E.BadShape, "zero dimension", _with_header(frame, h=0, n=0)),
        (E.BadShape, "disagrees", _with_header(frame, n=h * w * c + 1)),
        (E.BadShape, "exceeds the limit", _with_header(frame, h=8192, w=8192, c=2, n=2 * 8192 * 8192)),
        (E.BadShape, "channels", _with_header(frame, c=c + 1, n=h * w * (c + 1))),
        (E.PayloadError, "multiple of 4", _with_header(frame, plen=len(payload) - 1)),
        (E.PayloadError, "exceeds the maximum", _with_header(frame, plen=2**31)),
        (E.PayloadError, "runs out", _with_payload(frame, payload[:-4])),
        (E.PayloadError, "left over", _with_payload(frame, payload + b"\x00\x00\x00\x00")),
        (E.PayloadError, "payload", _with_payload(frame, payload[:-4] + bytes([payload[-4] ^ 0x80]) + payload[-3:])),
    ]
    for exc, needle, bad in cases:
        with pytest.raises(exc, match=needle):
            dec.decode(bad)


def test_header_over_limit_allocates_nothing():
    # an element count at the limit with a tiny frame must fail on length, not try to allocate
    head = struct.pack("<2sBB4sHHHII", b"LW", 1, 0, b"\0\0\0\0", 8192, 8192, 1, 8192 * 8192, 4)
    assert 8192 * 8192 <= MAX_ELEMENTS
    assert parse_header(head).element_count == 8192 * 8192
    with pytest.raises(E.TruncatedFrame):
        from lwfc.frame import parse_frame
        parse_frame(head)


def test_decoder_keeps_working_after_errors(case_contexts):
    tables, frame = _frame(case_contexts)
    dec = Decoder(tables)
    with pytest.raises(E.FrameError):
        dec.decode(frame[:-3])
    assert np.array_equal(dec.decode(frame).indices, dec.decode(frame).indices)
