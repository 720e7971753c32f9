"""The lwfc frame: header, payload, CRC-32 (codec_spec/SPEC.md, section 5).

All multi-byte fields are little-endian. Layout::

    offset size field
       0    2  magic            b"LW"
       2    1  version          1
       3    1  flags            0 (every bit reserved)
       4    4  table_id         first 4 bytes of the table's SHA-256 id
       8    2  height           H >= 1
      10    2  width            W >= 1
      12    2  channels         C >= 1
      14    4  element_count    H * W * C, at most MAX_ELEMENTS
      18    4  payload_length   bytes, a multiple of 4, at least 4, at most max_payload_length(n)
      22    -  payload          the range coder's 32-bit words, each little-endian
    22+L    4  crc32            CRC-32 of bytes [0, 22 + L)
"""

import struct

from .crc32 import crc32
from .errors import (
    BadMagic,
    BadShape,
    CrcMismatch,
    PayloadError,
    ReservedBits,
    TrailingData,
    TruncatedFrame,
    UnsupportedVersion,
)

MAGIC = b"LW"
VERSION = 1
HEADER_SIZE = 22
CRC_SIZE = 4
MAX_ELEMENTS = 1 << 26
_HEADER = "<2sBB4sHHHII"


def max_payload_length(element_count):
    """Bound on the payload (bytes) a conforming encoder can produce for ``element_count`` symbols: each
    symbol narrows the range by at most 24 bits (every frequency is >= 1 of 2^24) plus under 0.006 bits of
    rounding, so 25 bits per symbol, plus at most 2 sealing words."""
    return 4 * ((25 * element_count + 31) // 32 + 2)


class FrameHeader(object):
    """The parsed, validated header fields of a frame."""

    __slots__ = ("version", "flags", "table_id", "shape", "element_count", "payload_length")

    def __init__(self, table_id, shape, payload_length, version=VERSION, flags=0):
        self.version = version
        self.flags = flags
        self.table_id = bytes(table_id)
        self.shape = tuple(shape)
        self.element_count = shape[0] * shape[1] * shape[2]
        self.payload_length = payload_length

    @property
    def frame_length(self):
        return HEADER_SIZE + self.payload_length + CRC_SIZE

    def __repr__(self):
        return "FrameHeader(table_id=%s, shape=%r, payload_length=%d)" % (
            hexlify(self.table_id), self.shape, self.payload_length)


def hexlify(b):
    return "".join("%02x" % x for x in b)


def pack_frame(table_id, shape, payload):
    """Assemble a frame from a 4-byte table id, the (H, W, C) shape and the payload bytes."""
    h, w, c = shape
    n = h * w * c
    if len(table_id) != 4:
        raise ValueError("table_id must be 4 bytes")
    head = struct.pack(_HEADER, MAGIC, VERSION, 0, bytes(table_id), h, w, c, n, len(payload))
    crc = crc32(payload, crc32(head))
    return b"".join((head, payload, struct.pack("<I", crc)))


def parse_header(buf):
    """Parse and check the fixed header at the start of ``buf`` (needs only its first 22 bytes).

    Checks everything the header alone can tell: magic, version, reserved flags, shape, element count
    and payload length limits. Raises a FrameError subclass naming the problem."""
    if len(buf) < HEADER_SIZE:
        if len(buf) >= 2 and bytes(buf[:2]) != MAGIC:
            raise BadMagic("bad magic %r, expected %r" % (bytes(buf[:2]), MAGIC))
        raise TruncatedFrame("truncated header: %d bytes, need %d" % (len(buf), HEADER_SIZE))
    magic, version, flags, table_id, h, w, c, n, plen = struct.unpack(_HEADER, bytes(buf[:HEADER_SIZE]))
    if magic != MAGIC:
        raise BadMagic("bad magic %r, expected %r" % (magic, MAGIC))
    if version != VERSION:
        raise UnsupportedVersion("unsupported frame version %d (this decoder reads version %d)"
                                 % (version, VERSION))
    if flags != 0:
        raise ReservedBits("reserved flag bits set: 0x%02x" % flags)
    if h == 0 or w == 0 or c == 0:
        raise BadShape("shape %dx%dx%d has a zero dimension" % (h, w, c))
    if h * w * c != n:
        raise BadShape("element_count %d disagrees with shape %dx%dx%d (= %d)" % (n, h, w, c, h * w * c))
    if n > MAX_ELEMENTS:
        raise BadShape("element_count %d exceeds the limit %d" % (n, MAX_ELEMENTS))
    if plen % 4 != 0 or plen < 4:
        raise PayloadError("payload_length %d is not a positive multiple of 4" % plen)
    if plen > max_payload_length(n):
        raise PayloadError("payload_length %d exceeds the maximum %d for %d elements"
                           % (plen, max_payload_length(n), n))
    return FrameHeader(table_id, (h, w, c), plen, version, flags)


def parse_frame(buf):
    """Split a complete frame into (header, payload bytes) after checking length and CRC.

    ``buf`` must hold exactly one frame: fewer bytes raise TruncatedFrame, more raise TrailingData."""
    header = parse_header(buf)
    total = header.frame_length
    if len(buf) < total:
        raise TruncatedFrame("truncated frame: %d bytes, header announces %d" % (len(buf), total))
    if len(buf) > total:
        raise TrailingData("%d bytes of trailing data after a %d-byte frame" % (len(buf) - total, total))
    mv = memoryview(buf)
    body_end = HEADER_SIZE + header.payload_length
    (stored,) = struct.unpack("<I", bytes(mv[body_end:total]))
    actual = crc32(mv[:body_end])
    if stored != actual:
        raise CrcMismatch("CRC-32 mismatch: frame says %08x, content gives %08x" % (stored, actual))
    return header, bytes(mv[HEADER_SIZE:body_end])
