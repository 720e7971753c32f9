"""The device encoder: indices -> context keys in scan order -> range coder -> frame (SPEC.md, 4-5).

Pure Python in the MicroPython-compatible subset. The context rule is ``tables.context_number``; both key
paths call it. Every element's range coder key is ``model * N + index`` (``Tables.start``/``freq``). On
CPython the keys of a whole slice are computed at C speed: ``bytes.translate`` for the 256-entry lookups,
big-integer lane arithmetic (byte lanes never carry because every lane value stays below 256; 16-bit lanes
because every key is below 2^16) and strided slice assignment; elsewhere a per-element loop gives the same
keys.

A frame codes one slice: rows ``row_first .. row_first + row_count - 1`` and channels
``channel_first .. channel_first + channel_count - 1`` of the tensor (the whole tensor unless sliced). The
slice is coded as if it were the whole tensor: a neighbour or reference outside it is "outside" (SPEC.md 4.2).
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


def _byte_map(values):
    """A 256-byte translation table holding ``values`` (each < 256) from entry 0; the rest 0."""
    t = bytearray(256)
    for v, x in enumerate(values):
        t[v] = x
    return bytes(t)


def planes(indices, channels):
    """The C channel planes of NHWC index bytes, each in raster order."""
    try:
        return [indices[ch::channels] for ch in range(channels)]
    except NotImplementedError:  # MicroPython without slice steps
        n = len(indices)
        return [bytes([indices[i] for i in range(ch, n, channels)]) for ch in range(channels)]


class _Slice(object):
    """What the key paths need about the slice being coded: its index bytes (row_count x W x channel_count,
    NHWC), and per local channel j (channel channel_first + j) the group, the local reference channel (-1
    if none in the slice) and the scan's channel order (independent channels, then dependent ones)."""

    def __init__(self, tables, indices, height, width, region):
        r0, rn, c0, cn = region
        self.rows = rn
        self.width = width
        self.channels = cn
        full_c = tables.channels
        if r0 == 0 and rn == height and c0 == 0 and cn == full_c:
            self.indices = bytes(indices)
        elif c0 == 0 and cn == full_c:
            self.indices = bytes(indices[r0 * width * full_c:(r0 + rn) * width * full_c])
        else:
            row = width * full_c
            rows = bytes(indices[r0 * row:(r0 + rn) * row])
            try:  # channel by channel, at C speed where strided slices exist
                block = bytearray(rn * width * cn)
                for j in range(cn):
                    block[j::cn] = rows[c0 + j::full_c]
                self.indices = bytes(block)
            except NotImplementedError:  # MicroPython without slice steps
                self.indices = b"".join(rows[p * full_c + c0:p * full_c + c0 + cn] for p in range(rn * width))
        self.group = tables.channel_group[c0:c0 + cn]
        independent, dependent = tables.channels_in_order(c0, cn)
        self.independent = [c - c0 for c in independent]
        self.dependent = [c - c0 for c in dependent]
        self.reference = [-1] * cn
        for c in dependent:
            self.reference[c - c0] = tables.reference_channel[c] - c0


def keys_fast(sl, tables):
    """Range coder keys ``model_key[group][y] + index`` of a slice in scan order, where
    ``y = context_number(0, class_above, class_left, K, class_reference, R)``, as a memoryview of native uint16
    (CPython fast path). The rule runs once, on the whole slice's byte lanes packed into big integers."""
    c = sl.channels
    indices = sl.indices
    n_el = len(indices)
    n_lv = tables.levels
    row = sl.width * c
    out = bytes([n_lv]) * c  # index N marks "outside the slice" / "no reference"
    above = out * sl.width + indices[: n_el - row]
    left = b"".join([out + indices[r * row: r * row + row - c] for r in range(sl.rows)])
    ctab = _byte_map(tables.neighbour_class)
    if sl.dependent:
        ref = bytearray(bytes([n_lv]) * n_el)
        for j in sl.dependent:
            ref[j::c] = indices[sl.reference[j]::c]
        ref_lanes = int.from_bytes(bytes(ref).translate(_byte_map(tables.reference_class)), "little")
    else:  # every element has class reference_class[N]; the byte string of that value, as lanes
        ref_lanes = int.from_bytes(bytes([tables.reference_class[n_lv]]) * n_el, "little")
    lanes = context_number(0, int.from_bytes(above.translate(ctab), "little"),
                           int.from_bytes(left.translate(ctab), "little"), tables.classes,
                           ref_lanes, tables.reference_classes)
    local = lanes.to_bytes(n_el, "little")
    # key of index 0 per element, as low and high bytes: one lookup per channel with its group's table
    low, high = bytearray(n_el), bytearray(n_el)
    tabs = {}
    for j in range(c):
        g = sl.group[j]
        if g not in tabs:
            mk = tables.model_key[g]
            tabs[g] = (_byte_map([k & 255 for k in mk]), _byte_map([k >> 8 for k in mk]))
        lo, hi = tabs[g]
        y = local[j::c]
        low[j::c] = y.translate(lo)
        high[j::c] = y.translate(hi)
    base = bytearray(2 * n_el)
    base[0::2] = low
    base[1::2] = high
    spread = bytearray(2 * n_el)
    spread[0::2] = indices
    keys = (int.from_bytes(base, "little") + int.from_bytes(spread, "little")).to_bytes(2 * n_el, "little")
    view = _ordered(sl, keys, tables.classes)
    if sys.byteorder != "little":
        import array
        arr = array.array("H", view)
        arr.byteswap()
        return arr
    return memoryview(view).cast("H")


def _ordered(sl, keys, classes):
    """Little-endian uint16 keys (NHWC order of the slice) reordered into scan order (SPEC.md 4.1)."""
    c = sl.channels
    order = sl.independent + sl.dependent
    if order != list(range(c)):  # move the dependent channels behind the independent ones at each position
        src = memoryview(keys).cast("H")
        moved = bytearray(len(keys))
        dst = memoryview(moved).cast("H")
        for to, j in enumerate(order):
            dst[to::c] = src[j::c]
        keys = bytes(moved)
    if classes == 1:  # channel-planar: each channel's plane in raster order, channels in scan order
        view = memoryview(keys).cast("H")
        return b"".join([view[j::c].tobytes() for j in range(c)])
    if sl.rows == 1 or sl.width == 1:  # one position per diagonal: scan order is raster order
        return keys
    span = 2 * c
    if not sl.dependent:
        return b"".join([keys[p * span: p * span + span] for p in diagonal_positions(sl.rows, sl.width)])
    split = 2 * len(sl.independent)
    parts = []
    diagonal = []
    for p in diagonal_positions(sl.rows, sl.width):
        if diagonal and p // sl.width + p % sl.width != diagonal[0] // sl.width + diagonal[0] % sl.width:
            parts.extend([keys[q * span: q * span + split] for q in diagonal])
            parts.extend([keys[q * span + split: q * span + span] for q in diagonal])
            diagonal = []
        diagonal.append(p)
    parts.extend([keys[q * span: q * span + split] for q in diagonal])
    parts.extend([keys[q * span + split: q * span + span] for q in diagonal])
    return b"".join(parts)


def keys_slow(sl, tables):
    """The same keys as ``keys_fast``, one element at a time (MicroPython, or any platform). The rule is
    applied once per pair of neighbour indices (N + 1 squared pairs, N meaning "outside"), not per element."""
    c = sl.channels
    k = tables.classes
    n_lv = tables.levels
    ncls = tables.neighbour_class
    rcls = tables.reference_class
    span = n_lv + 1
    # local context minus the reference part, for above index a and left index b at entry a * (N + 1) + b
    pair = [context_number(0, ncls[a], ncls[b], k) for a in range(span) for b in range(span)]
    kk = k * k  # context_number(0, 0, 0, K, rho, R) = rho * K^2
    model_key = [tables.model_key[g] for g in sl.group]
    reference = sl.reference
    rkk = [v * kk for v in rcls]  # the reference's part of the context: reference_class[b] * K^2
    no_ref = rkk[n_lv]
    indices = sl.indices
    row = sl.width * c
    width = sl.width
    if k == 1:  # channel-planar; neighbours do not count
        n_el = len(indices)
        for j in sl.independent:  # one model per plane
            key0 = model_key[j][no_ref]
            for at in range(j, n_el, c):
                yield key0 + indices[at]
        for j in sl.dependent:
            mk = model_key[j]
            dr = reference[j] - j
            for at in range(j, n_el, c):
                yield mk[rkk[indices[at + dr]]] + indices[at]
        return
    # The indices padded with one row above and one position to the left holding N ("outside"), so that
    # every element reads its neighbours without a test: row h, column w of the slice sits at padded
    # position (h + 1) * (W + 1) + w + 1.
    prow = (width + 1) * c
    padded = bytearray(bytes([n_lv]) * ((sl.rows + 1) * prow))
    for h in range(sl.rows):
        at = (h + 1) * prow + c
        padded[at:at + row] = indices[h * row:(h + 1) * row]
    # per channel, the model keys from its reference's part of the context on: an independent channel's
    # is fixed (no_ref), a dependent channel's adds rkk[reference index]
    independent = [(j, model_key[j][no_ref:]) for j in sl.independent]
    dependent = [(j, reference[j] - j, model_key[j]) for j in sl.dependent]
    for d in range(sl.rows + width - 1):
        h0 = d - width + 1 if d >= width else 0
        h1 = d if d < sl.rows else sl.rows - 1
        for h in range(h0, h1 + 1):
            base = (h + 1) * prow + (d - h + 1) * c
            above = base - prow
            left = base - c
            for j, mk in independent:
                yield mk[pair[padded[above + j] * span + padded[left + j]]] + padded[base + j]
        if dependent:
            for h in range(h0, h1 + 1):
                base = (h + 1) * prow + (d - h + 1) * c
                above = base - prow
                left = base - c
                for j, dr, mk in dependent:
                    at = base + j
                    yield mk[pair[padded[above + j] * span + padded[left + j]] + rkk[padded[at + dr]]] + padded[at]


def scan_keys(tables, indices, height, width, region=None):
    """Every element's range coder key ``model * N + index`` in scan order, one at a time (for tools that
    replay the range coder: ``Tables.start[key]``, ``Tables.freq[key]`` give its interval)."""
    if region is None:
        region = (0, height, 0, tables.channels)
    return keys_slow(_Slice(tables, indices, height, width, region), tables)


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


def _check_region(region, height, channels):
    r0, rn, c0, cn = region
    if rn < 1 or cn < 1 or r0 < 0 or c0 < 0 or r0 + rn > height or c0 + cn > channels:
        raise EncodeError("slice rows %d+%d, channels %d+%d do not lie within %d rows and %d channels"
                          % (r0, rn, c0, cn, height, channels))


class Encoder(object):
    """Encodes tensors with one table. ``fast=None`` picks the C-speed key path where available.

    Frames take the table's version (a version 1 table gives version 1 frames, byte for byte what a
    version 1 encoder writes), except that a slice is always a version 2 frame."""

    def __init__(self, tables, fast=None):
        self.tables = tables
        self.fast = _FAST if fast is None else fast
        self._byte_table = byte_table(tables)
        self.last_coder = None

    def payload(self, indices, height, width, region=None):
        """The payload words' bytes for index bytes (the whole tensor, NHWC order, each < levels) coding the
        slice ``region`` = (row_first, row_count, channel_first, channel_count), the whole tensor if None."""
        t = self.tables
        _check_shape(len(indices), height, width, t)
        if region is None:
            region = (0, height, 0, t.channels)
        _check_region(region, height, t.channels)
        sl = _Slice(t, indices, height, width, region)
        coder = RangeEncoder()
        if t.classes == 1 and not sl.dependent:
            # channel-planar order, each plane with one model: its keys are model * N + index
            for j, plane in enumerate(planes(sl.indices, sl.channels)):
                off = t.model_key[sl.group[j]][context_number(0, 0, 0, 1, t.reference_class[t.levels],
                                                              t.reference_classes)]
                coder.encode_keys(plane, t.start[off:off + t.levels], t.freq[off:off + t.levels])
        else:
            keys = keys_fast(sl, t) if self.fast else keys_slow(sl, t)
            coder.encode_keys(keys, t.start, t.freq)
        words = coder.finish()
        self.last_coder = coder  # its inversion/carry counts are useful to tests
        return pack_words(words)

    def encode_indices(self, indices, height, width, region=None):
        """Frame for index bytes (the whole tensor, NHWC order, each < levels); a slice of it when ``region``
        = (row_first, row_count, channel_first, channel_count) is given."""
        t = self.tables
        payload = self.payload(indices, height, width, region)
        version = 2 if region is not None else t.version
        return pack_frame(t.table_id, (height, width, t.channels), payload, version, region)

    def encode_int8(self, data, height, width, region=None):
        """Frame for an int8 tensor given as bytes-like (two's complement), NHWC, batch 1."""
        return self.encode_indices(indices_from_int8(data, self.tables, self._byte_table), height, width, region)

    def encode_float(self, values, height, width, region=None):
        """Frame for a float tensor given as an iterable of floats in NHWC order."""
        return self.encode_indices(indices_from_float(values, self.tables), height, width, region)

    def encode_sliced(self, indices, height, width, max_frame_bytes, plan="auto"):
        """Frames of at most ``max_frame_bytes`` each whose slices tile the tensor, cut by ``plan``
        (``lwfc.slices.PLANS``)."""
        from .slices import encode_sliced
        return encode_sliced(self, indices, height, width, max_frame_bytes, plan)

    def encode_int8_sliced(self, data, height, width, max_frame_bytes, plan="auto"):
        """``encode_sliced`` for an int8 tensor given as bytes-like (two's complement), NHWC."""
        return self.encode_sliced(indices_from_int8(data, self.tables, self._byte_table), height, width,
                                  max_frame_bytes, plan)
