"""Message authentication (codec_spec/PROTOCOL.md 8): HMAC-SHA256 over the session's nonce and each message,
truncated to 16 bytes. MicroPython has ``hashlib.sha256`` but no ``hmac`` module, so HMAC (RFC 2104) is
written out here; the comparison of tags takes the same time whatever bytes differ.
"""

try:
    import hashlib
except ImportError:  # some MicroPython ports name it uhashlib
    import uhashlib as hashlib  # type: ignore

TAG_SIZE = 16  # bytes of the HMAC that follow an authenticated message


def hmac_sha256(key, data):
    """HMAC-SHA256 (RFC 2104) of ``data`` with ``key``."""
    block = 64
    if len(key) > block:
        key = hashlib.sha256(key).digest()
    key = bytes(key) + bytes(block - len(key))
    inner = hashlib.sha256(bytes([b ^ 0x36 for b in key]))
    inner.update(data)
    outer = hashlib.sha256(bytes([b ^ 0x5C for b in key]))
    outer.update(inner.digest())
    return outer.digest()


def compare_digest(a, b):
    """Constant-time comparison of two byte strings (so tags cannot be guessed byte by byte)."""
    if len(a) != len(b):
        return False
    r = 0
    for x, y in zip(a, b):
        r |= x ^ y
    return r == 0


class Auth(object):
    """A session's authentication state: the device key and the host's nonce (PROTOCOL.md, 8)."""

    def __init__(self, key, nonce):
        if len(key) < 16:
            raise ValueError("an authentication key must have at least 16 bytes")
        self.key = bytes(key)
        self.nonce = bytes(nonce)

    def tag(self, message_without_tag):
        return hmac_sha256(self.key, self.nonce + bytes(message_without_tag))[:TAG_SIZE]
