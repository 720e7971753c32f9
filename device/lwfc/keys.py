"""A device's shared key (PROTOCOL.md 8): read from a file or the environment, never from the command line,
where every user of the machine sees it in the process list.

A key file holds the key as hex (at least 16 bytes; white space around it is ignored). On systems with file
permissions a key file that group or others may access is refused, as ssh refuses such a private key: the
key is what authenticates the device. MicroPython-compatible (its filesystems have no permissions, so there
the check is skipped: keep such a board physically secure).
"""

import os

from .errors import KeyFileError

KEY_ENV = "LWFC_DEVICE_KEY"  # the environment variable that may hold the key (hex)
KEY_FILE = "device.key"  # the name ``lwfc flash`` gives the key file on a board
MIN_KEY_BYTES = 16


def parse_key(text, where):
    """Hex text -> key bytes; KeyFileError naming ``where`` if it is not hex or too short."""
    text = text.strip()
    try:
        key = bytes([int(text[i:i + 2], 16) for i in range(0, len(text), 2)]) if len(text) % 2 == 0 else None
    except ValueError:
        key = None
    if key is None:
        raise KeyFileError("the key in %s is not hex" % where)
    if len(key) < MIN_KEY_BYTES:
        raise KeyFileError("the key in %s has %d bytes; at least %d are needed" % (where, len(key), MIN_KEY_BYTES))
    return key


def _check_private(path):
    try:
        mode = os.stat(path)[0]
    except OSError as exc:
        raise KeyFileError("cannot read key file %s: %s" % (path, exc)) from None
    if hasattr(os, "getuid") and mode & 0o077:  # a system with permissions (not MicroPython)
        raise KeyFileError("key file %s is accessible by group or others (mode %04o); make it private: chmod 600 %s"
                           % (path, mode & 0o7777, path))


def load_key(path=None, environ=None):
    """The device key from ``path`` (a key file), else from $LWFC_DEVICE_KEY, else None (no authentication)."""
    if path:
        _check_private(path)
        try:
            with open(path) as f:
                return parse_key(f.read(), path)
        except OSError as exc:
            raise KeyFileError("cannot read key file %s: %s" % (path, exc)) from None
    env = (environ if environ is not None else getattr(os, "environ", {})).get(KEY_ENV)
    if env:
        return parse_key(env, "$" + KEY_ENV)
    return None
