"""The device encoder: indices -> context keys in scan order -> range coder -> frame (SPEC.md, 4-5).

Pure Python in the MicroPython-compatible subset. The context rule is ``tables.context_number``; both key
paths call it. On CPython the key computation runs at C speed with ``bytes.translate``, big-integer lane
arithmetic (byte lanes never carry because every lane value stays below 256) and strided slice assignment;
elsewhere a per-element loop gives the same keys.
"""

import struct
import sys

from .errors import EncodeError
from .frame import MAX_ELEMENTS, pack_frame
from .quantize import byte_table, indices_from_float, indices_from_int8
from .rangecoder import RangeEncoder
from .scan import diagonal_positions
from .tables import context_number

_HAS_TRANSLATE = hasattr(bytes, "translate")
try:
    memoryview(b"").cast  # noqa: B018 - feature probe
    _HAS_CAST = True
except AttributeError:
    _HAS_CAST = False
_FAST = _HAS_TRANSLATE and _HAS_CAST


def _class_table(tables):
    t = bytearray(256)
    for v, cls in enumerate(tables.neighbour_class):
        t[v] = cls
    return bytes(t)


def planes(indices, channels):
    """The C channel planes of NHWC index bytes, each in raster order."""
    try:
        return [indices[ch::channels] for ch in range(channels)]
    except NotImplementedError:  # MicroPython without slice steps
        n = len(indices)
        return [bytes([indices[i] for i in range(ch, n, channels)]) for ch in range(channels)]


def keys_fast(indices, height, width, tables):
    """Range coder keys ``group * 256 + context_number(0, class_above, class_left, K) * N + index`` (K > 1) in
    scan order, as a memoryview of native uint16 (CPython fast path). The rule runs once, on the whole
    tensor's byte lanes packed into big integers."""
    c = tables.channels
    n_el = len(indices)
    n_lv = tables.levels
    row = width * c
    out = bytes([n_lv]) * c  # index N marks "outside the tensor"
    above = out * width + indices[: n_el - row]
    left = b"".join(out + indices[r * row: r * row + row - c] for r in range(height))
    ctab = _class_table(tables)
    lanes = context_number(0, int.from_bytes(above.translate(ctab), "little"),
                           int.from_bytes(left.translate(ctab), "little"), tables.classes)
    low = (lanes * n_lv + int.from_bytes(indices, "little")).to_bytes(n_el, "little")
    keys = bytearray(2 * n_el)
    keys[0::2] = low
    if tables.groups > 1:
        keys[1::2] = bytes(tables.channel_group) * (height * width)
    if height > 1 and width > 1:
        span = 2 * c
        keys = b"".join([keys[p * span: p * span + span] for p in diagonal_positions(height, width)])
    view = memoryview(keys).cast("H")
    if sys.byteorder != "little":
        import array
        arr = array.array("H", keys)
        arr.byteswap()
        return arr
    return view


def keys_slow(indices, height, width, tables):
    """The same keys as ``keys_fast``, one element at a time (MicroPython, or any platform). The rule is
    applied once per pair of neighbour indices (N + 1 squared pairs, N meaning "outside"), not per element."""
    c = tables.channels
    k = tables.classes
    n_lv = tables.levels
    ncls = tables.neighbour_class
    span = n_lv + 1
    # key low byte minus the index, for above index a and left index b at entry a * (N + 1) + b
    pair = [context_number(0, ncls[a], ncls[b], k) * n_lv for a in range(span) for b in range(span)]
    group_hi = [g * 256 for g in tables.channel_group]
    row = width * c
    for p in diagonal_positions(height, width):
        base = p * c
        has_above = p >= width
        has_left = p % width != 0
        for ch in range(c):
            a = indices[base - row + ch] if has_above else n_lv
            b = indices[base - c + ch] if has_left else n_lv
            yield group_hi[ch] + pair[a * span + b] + indices[base + ch]


# MicroPython passes *args on its small Python stack (about 2000 arguments with the default pystack, and
# "pystack exhausted" beyond), so the payload is packed a bounded number of words at a time. On CPython
# this costs about 5% over a single struct.pack call.
_PACK_CHUNK = 256


def pack_words(words):
    """The payload bytes: each 32-bit word of ``words`` little-endian."""
    n = len(words)
    if n <= _PACK_CHUNK:
        return struct.pack("<%dI" % n, *words)
    parts = []
    for i in range(0, n, _PACK_CHUNK):
        chunk = words[i:i + _PACK_CHUNK]
        parts.append(struct.pack("<%dI" % len(chunk), *chunk))
    return b"".join(parts)


def _check_shape(n_el, height, width, tables):
    if height < 1 or width < 1 or height > 65535 or width > 65535:
        raise EncodeError("height and width must be in 1..65535, got %dx%d" % (height, width))
    if n_el != height * width * tables.channels:
        raise EncodeError("%d values do not fill %dx%dx%d" % (n_el, height, width, tables.channels))
    if n_el > MAX_ELEMENTS:
        raise EncodeError("%d elements exceed the limit %d" % (n_el, MAX_ELEMENTS))


class Encoder(object):
    """Encodes tensors with one table. ``fast=None`` picks the C-speed key path where available."""

    def __init__(self, tables, fast=None):
        self.tables = tables
        self.fast = _FAST if fast is None else fast
        self._byte_table = byte_table(tables)
        self.last_coder = None

    def encode_indices(self, indices, height, width):
        """Frame for index bytes (NHWC order, each < levels)."""
        t = self.tables
        _check_shape(len(indices), height, width, t)
        coder = RangeEncoder()
        if t.classes == 1:
            # channel-planar order; with K = 1 the context number is the group g (``context_number``), so
            # each plane is coded with group g's keys g * 256 + index
            for ch, plane in enumerate(planes(bytes(indices), t.channels)):
                off = t.channel_group[ch] * 256
                coder.encode_keys(plane, t.start[off:off + t.levels], t.freq[off:off + t.levels])
        else:
            if self.fast:
                keys = keys_fast(bytes(indices), height, width, t)
            else:
                keys = keys_slow(indices, height, width, t)
            coder.encode_keys(keys, t.start, t.freq)
        words = coder.finish()
        self.last_coder = coder  # its inversion/carry counts are useful to tests
        payload = pack_words(words)
        return pack_frame(t.table_id, (height, width, t.channels), payload)

    def encode_int8(self, data, height, width):
        """Frame for an int8 tensor given as bytes-like (two's complement), NHWC, batch 1."""
        return self.encode_indices(indices_from_int8(data, self.tables, self._byte_table), height, width)

    def encode_float(self, values, height, width):
        """Frame for a float tensor given as an iterable of floats in NHWC order."""
        return self.encode_indices(indices_from_float(values, self.tables), height, width)
