"""Exceptions of the lwfc codec. Every malformed input raises one of these, with a message that
says what was wrong; nothing else escapes the parsers."""


class LwfcError(ValueError):
    """Base class of every error lwfc raises for bad input."""


class TableError(LwfcError):
    """A table file is malformed or violates the spec (codec_spec/SPEC.md, section 3)."""


class BundleError(LwfcError):
    """A bundle directory is missing a file, or its bundle.json is malformed (converters/README.md)."""


class KeyFileError(LwfcError):
    """A device key file or $LWFC_DEVICE_KEY is unreadable, not hex, too short, or readable by others; or a broker
    login file is unreadable, malformed or readable by others."""


class EncodeError(LwfcError):
    """The input to the encoder does not fit the table (shape, dtype, NaN, ...)."""


class FrameError(LwfcError):
    """A frame is malformed. Subclasses name the check that failed (SPEC.md, section 6)."""


class BadMagic(FrameError):
    pass


class UnsupportedVersion(FrameError):
    pass


class TruncatedFrame(FrameError):
    pass


class CrcMismatch(FrameError):
    pass


class TableMismatch(FrameError):
    pass


class BadShape(FrameError):
    pass


class TrailingData(FrameError):
    pass


class ReservedBits(FrameError):
    pass


class PayloadError(FrameError):
    """The payload is not the canonical range-coder output for the frame's element count: it runs out
    during decoding, leaves words over, or decodes to an impossible symbol."""
