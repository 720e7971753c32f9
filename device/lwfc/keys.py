"""A device's shared key (PROTOCOL.md 8) and its broker login (PROTOCOL.md 11): read from a file (the key also from
the environment), never from the command line, where every user of the machine sees it in the process list.

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


def check_private(path, what="key file"):
    """KeyFileError unless ``path`` can be read and (where files have permissions) only its owner may access it."""
    try:
        mode = os.stat(path)[0]
    except OSError as exc:
        raise KeyFileError("cannot read %s %s: %s" % (what, path, exc)) from None
    if hasattr(os, "getuid") and mode & 0o077:  # a system with permissions (not MicroPython)
        raise KeyFileError("%s %s is accessible by group or others (mode %04o); make it private: chmod 600 %s"
                           % (what, path, mode & 0o7777, path))


def load_key(path=None, environ=None):
    """The device key from ``path`` (a key file), else from $LWFC_DEVICE_KEY, else None (no authentication)."""
    if path:
        check_private(path)
        try:
            with open(path) as f:
                return parse_key(f.read(), path)
        except OSError as exc:
            raise KeyFileError("cannot read key file %s: %s" % (path, exc)) from None
    env = (environ if environ is not None else getattr(os, "environ", {})).get(KEY_ENV)
    if env:
        return parse_key(env, "$" + KEY_ENV)
    return None


def load_login(path):
    """(username, password) for the MQTT broker from a login file: one line ``USERNAME:PASSWORD`` (the password
    may hold ':'), private like a key file. Never from the command line, where the process list shows it."""
    check_private(path, "login file")
    try:
        with open(path) as f:
            line = f.read().strip()
    except OSError as exc:
        raise KeyFileError("cannot read login file %s: %s" % (path, exc)) from None
    if ":" not in line or line.index(":") == 0 or "\n" in line:
        raise KeyFileError("login file %s must hold one line USERNAME:PASSWORD" % path)
    user, password = line.split(":", 1)
    return user, password
