"""CRC-32 (IEEE 802.3, the zlib/PNG polynomial 0xEDB88320, reflected, init and final xor 0xFFFFFFFF).

Uses the platform's C implementation where there is one (CPython's zlib or binascii, MicroPython's
binascii when built with it) and a table-driven pure-Python fallback otherwise."""

try:
    from zlib import crc32 as _native
except ImportError:  # MicroPython
    try:
        from binascii import crc32 as _native
    except ImportError:
        _native = None

_TABLE = None


def _make_table():
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0xEDB88320 if c & 1 else c >> 1
        table.append(c)
    return table


def crc32_pure(data, crc=0):
    """Pure-Python CRC-32 of ``data`` (bytes-like), continuing from ``crc``."""
    global _TABLE
    if _TABLE is None:
        _TABLE = _make_table()
    table = _TABLE
    c = crc ^ 0xFFFFFFFF
    for b in data:
        c = table[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def crc32(data, crc=0):
    """CRC-32 of ``data`` as an unsigned 32-bit int."""
    if _native is not None:
        return _native(data, crc) & 0xFFFFFFFF
    return crc32_pure(data, crc)
