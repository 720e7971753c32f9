"""Clip and quantize by table lookup (SPEC.md, section 3.3).

int8 input: index = index_of_q[q + 128]. Float input: X = floor(x * 2^frac_bits), clamped to the
int32 range; index = number of thresholds t with t <= X. Neither needs floating-point arithmetic
beyond the single multiply by a power of two.
"""

from .errors import EncodeError

_HAS_TRANSLATE = hasattr(bytes, "translate")


def byte_table(tables):
    """The 256-byte table from an int8's two's-complement byte to its index."""
    lut = tables.index_of_q
    return bytes(lut[(b + 128) & 0xFF] for b in range(256))


def indices_from_int8(data, tables, table=None):
    """Quantize int8 values given as bytes-like (two's complement) to index bytes."""
    if table is None:
        table = byte_table(tables)
    if _HAS_TRANSLATE:
        return bytes(data).translate(table)
    return bytes([table[b] for b in data])


def index_of_float(x, tables):
    """Index of one float under the table's fixed-point thresholds."""
    if x != x:
        raise EncodeError("input contains NaN")
    scaled = x * (1 << tables.frac_bits)
    if scaled >= 2147483647:
        fixed = 2147483647
    elif scaled <= -2147483648:
        fixed = -2147483648
    else:
        fixed = int(scaled)
        if fixed > scaled:  # int() truncates toward zero; the spec floors
            fixed -= 1
    thr = tables.thresholds
    lo, hi = 0, len(thr)
    while lo < hi:  # number of thresholds <= fixed
        mid = (lo + hi) >> 1
        if thr[mid] <= fixed:
            lo = mid + 1
        else:
            hi = mid
    return lo


def indices_from_float(values, tables):
    """Quantize an iterable of floats (NHWC order) to index bytes."""
    return bytes([index_of_float(x, tables) for x in values])
