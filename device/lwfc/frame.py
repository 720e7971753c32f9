"""The lwfc frame: header, payload, CRC-32 (codec_spec/SPEC.md, section 5).

All multi-byte fields are little-endian. An unsliced frame::

    offset size field
       0    2  magic            b"LW"
       2    1  version          1 or 2
       3    1  flags            bit 0: SLICE (version 2 only); every other bit reserved
       4    4  table_id         first 4 bytes of the table's SHA-256 id
       8    2  height           H >= 1    \\
      10    2  width            W >= 1     } the whole tensor
      12    2  channels         C >= 1    /
      14    4  element_count    H * W * C
      18    4  payload_length   bytes, a multiple of 4, at least 4, at most max_payload_length(element_count)
      22    -  payload          the range coder's 32-bit words, each little-endian
    22+L    4  crc32            CRC-32 of every byte before it

A slice (SLICE set) has the same 22-byte header size, with the region in place of the two counts: both
follow from it and from the frame's length, which the transport delimits (a slice travels in one datagram
or message), so a slice costs no more header than a whole frame::

      14    2  row_first        the slice's rows are row_first .. row_first + row_count - 1
      16    2  row_count
      18    2  channel_first    its channels channel_first .. channel_first + channel_count - 1
      20    2  channel_count
      22    -  payload          len(frame) - 26 bytes
    22+L    4  crc32

A version 1 frame is an unsliced version 2 frame with the version byte 1.
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
VERSION = 2  # the newest frame version; this module reads VERSIONS
VERSIONS = (1, 2)
FLAG_SLICE = 0x01
HEADER_SIZE = 22  # with or without SLICE
CRC_SIZE = 4
MIN_SLICE_FRAME = HEADER_SIZE + 4 + CRC_SIZE  # a slice's payload is at least one word
MAX_ELEMENTS = 1 << 26
_FIXED = "<2sBB4sHHH"  # the first 14 bytes
_SLICE = "<HHHH"
_COUNTS = "<II"


def max_payload_length(element_count):
    """Bound on the payload (bytes) a conforming encoder can produce for ``element_count`` symbols: each
    symbol narrows the range by at most 24 bits (every frequency is >= 1 of 2^24) plus under 0.006 bits of
    rounding, so 25 bits per symbol, plus at most 2 sealing words."""
    return 4 * ((25 * element_count + 31) // 32 + 2)


class FrameHeader(object):
    """The parsed, validated header fields of a frame.

    ``shape`` is the whole tensor's (H, W, C). The frame codes the slice of rows
    ``row_first .. row_first + row_count - 1`` and channels ``channel_first .. channel_first + channel_count - 1``
    (the whole tensor when ``sliced`` is false); ``slice_shape`` is its (row_count, W, channel_count) and
    ``element_count`` its number of elements."""

    __slots__ = ("version", "flags", "table_id", "shape", "row_first", "row_count", "channel_first",
                 "channel_count", "element_count", "payload_length")

    def __init__(self, table_id, shape, payload_length, version=1, flags=0, region=None):
        self.version = version
        self.flags = flags
        self.table_id = bytes(table_id)
        self.shape = tuple(shape)
        h, w, c = self.shape
        if region is None:
            region = (0, h, 0, c)
        self.row_first, self.row_count, self.channel_first, self.channel_count = region
        self.element_count = self.row_count * w * self.channel_count
        self.payload_length = payload_length

    @property
    def sliced(self):
        return bool(self.flags & FLAG_SLICE)

    @property
    def region(self):
        """(row_first, row_count, channel_first, channel_count)."""
        return (self.row_first, self.row_count, self.channel_first, self.channel_count)

    @property
    def slice_shape(self):
        return (self.row_count, self.shape[1], self.channel_count)

    @property
    def frame_length(self):
        return HEADER_SIZE + self.payload_length + CRC_SIZE

    def __repr__(self):
        extra = ", region=%r" % (self.region,) if self.sliced else ""
        return "FrameHeader(version=%d, table_id=%s, shape=%r%s, payload_length=%d)" % (
            self.version, hexlify(self.table_id), self.shape, extra, self.payload_length)


def hexlify(b):
    return "".join("%02x" % x for x in b)


def pack_frame(table_id, shape, payload, version=1, region=None):
    """Assemble a frame from a 4-byte table id, the whole tensor's (H, W, C), the payload bytes, the frame
    version and, for a slice (version 2 only), its region (row_first, row_count, channel_first, channel_count)."""
    h, w, c = shape
    if len(table_id) != 4:
        raise ValueError("table_id must be 4 bytes")
    if version not in VERSIONS:
        raise ValueError("frame version must be one of %r" % (VERSIONS,))
    if region is None:
        head = struct.pack(_FIXED, MAGIC, version, 0, bytes(table_id), h, w, c) + struct.pack(
            _COUNTS, h * w * c, len(payload))
    else:
        if version < 2:
            raise ValueError("slices need frame version 2")
        r0, rn, c0, cn = region
        head = struct.pack(_FIXED, MAGIC, version, FLAG_SLICE, bytes(table_id), h, w, c) + struct.pack(
            _SLICE, r0, rn, c0, cn)
    crc = crc32(payload, crc32(head))
    return b"".join((head, payload, struct.pack("<I", crc)))


def parse_header(buf):
    """Parse and check the header at the start of ``buf``: the first 22 bytes of an unsliced frame suffice; a
    slice's ``buf`` must be the whole frame, whose length gives its payload length.

    Checks everything the header alone can tell (SPEC.md 6, steps 1-3): magic, version, reserved flags,
    shape and slice region, element count and payload length limits. Raises a FrameError subclass naming
    the problem."""
    if len(buf) < HEADER_SIZE:
        if len(buf) >= 2 and bytes(buf[:2]) != MAGIC:
            raise BadMagic("bad magic %r, expected %r" % (bytes(buf[:2]), MAGIC))
        raise TruncatedFrame("truncated header: %d bytes, need %d" % (len(buf), HEADER_SIZE))
    magic, version, flags, table_id, h, w, c = struct.unpack(_FIXED, bytes(buf[:14]))
    if magic != MAGIC:
        raise BadMagic("bad magic %r, expected %r" % (magic, MAGIC))
    if version not in VERSIONS:
        raise UnsupportedVersion("unsupported frame version %d (this decoder reads versions %s)"
                                 % (version, ", ".join(str(v) for v in VERSIONS)))
    allowed = FLAG_SLICE if version >= 2 else 0
    if flags & ~allowed:
        raise ReservedBits("reserved flag bits set: 0x%02x" % (flags & ~allowed))
    sliced = flags & FLAG_SLICE
    if sliced and len(buf) < MIN_SLICE_FRAME:
        raise TruncatedFrame("truncated slice: %d bytes, a slice has at least %d" % (len(buf), MIN_SLICE_FRAME))
    if h == 0 or w == 0 or c == 0:
        raise BadShape("shape %dx%dx%d has a zero dimension" % (h, w, c))
    if h * w * c > MAX_ELEMENTS:
        raise BadShape("shape %dx%dx%d: %d elements exceeds the limit %d" % (h, w, c, h * w * c, MAX_ELEMENTS))
    region = None
    if sliced:
        region = struct.unpack(_SLICE, bytes(buf[14:22]))
        r0, rn, c0, cn = region
        if rn == 0 or cn == 0 or r0 + rn > h or c0 + cn > c:
            raise BadShape("slice rows %d+%d, channels %d+%d do not lie within the %dx%dx%d tensor"
                           % (r0, rn, c0, cn, h, w, c))
        n = rn * w * cn
        plen = len(buf) - HEADER_SIZE - CRC_SIZE
        what = "a %d-byte slice's payload" % len(buf)
    else:
        n, plen = struct.unpack(_COUNTS, bytes(buf[14:22]))
        if n != h * w * c:
            raise BadShape("element_count %d disagrees with the shape %dx%dx%d (%d elements)" % (n, h, w, c, h * w * c))
        what = "payload_length"
    if plen % 4 != 0 or plen < 4:
        raise PayloadError("%s %d is not a positive multiple of 4" % (what, plen))
    if plen > max_payload_length(n):
        raise PayloadError("%s %d exceeds the maximum %d for %d elements" % (what, plen, max_payload_length(n), n))
    return FrameHeader(table_id, (h, w, c), plen, version, flags, region)


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


def check_table_version(header, tables_version):
    """A version 1 frame is coded with a version 1 table only (SPEC.md 6, step 6). Returns an error message
    or None."""
    if header.version == 1 and tables_version != 1:
        return "a version 1 frame cannot be coded with a version %d table" % tables_version
    return None
