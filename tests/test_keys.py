"""The device key (lwfc.keys): from a private file or $LWFC_DEVICE_KEY, with errors that say what is wrong."""

from __future__ import annotations

import os

import pytest

from lwfc.errors import KeyFileError
from lwfc.keys import KEY_ENV, load_key, parse_key

KEY = bytes(range(32))


def private(path, text: str):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return str(path)


def test_key_from_file_with_white_space(tmp_path):
    assert load_key(private(tmp_path / "k", "  " + KEY.hex().upper() + "\n"), environ={}) == KEY


def test_file_wins_over_environment_and_environment_over_nothing(tmp_path):
    other = bytes(range(100, 132))
    assert load_key(private(tmp_path / "k", KEY.hex()), environ={KEY_ENV: other.hex()}) == KEY
    assert load_key(None, environ={KEY_ENV: other.hex()}) == other
    assert load_key(None, environ={}) is None


@pytest.mark.parametrize("text, message", [
    ("zz" * 16, "not hex"), ("abc", "not hex"), ("00" * 15, "has 15 bytes; at least 16"), ("", "has 0 bytes")])
def test_bad_keys_are_named(tmp_path, text, message):
    path = private(tmp_path / "k", text)
    with pytest.raises(KeyFileError, match=message) as err:
        load_key(path, environ={})
    assert path in str(err.value)
    with pytest.raises(KeyFileError, match="\\$" + KEY_ENV):
        parse_key(text or "0", "$" + KEY_ENV)


def test_a_key_file_others_may_read_is_refused(tmp_path):
    path = private(tmp_path / "k", KEY.hex())
    os.chmod(path, 0o640)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_key(path, environ={})


def test_a_missing_key_file_is_named(tmp_path):
    with pytest.raises(KeyFileError, match="cannot read key file .*nothing-here"):
        load_key(str(tmp_path / "nothing-here"), environ={})
