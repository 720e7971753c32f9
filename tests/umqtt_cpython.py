"""MicroPython's ``umqtt.simple`` (tests/third_party/umqtt_simple.py, unchanged) on CPython: the module is loaded
with a ``socket`` module whose sockets have MicroPython's stream methods (``read(n)``: n bytes, or None at once
when non-blocking and nothing arrived; ``write(buf, n)``), so the tests run the very client a MicroPython board
uses against a real Mosquitto."""

from __future__ import annotations

import importlib.util
import socket as _socket
import sys
import types
from pathlib import Path
from typing import Any

_PATH = Path(__file__).resolve().parent / "third_party" / "umqtt_simple.py"


class MicroPythonSocket:
    """A CPython TCP socket with MicroPython's ``read`` and ``write``."""

    def __init__(self, *args: Any) -> None:
        self.sock = _socket.socket(*args)
        self.blocking = True

    def settimeout(self, t: float | None) -> None:
        self.sock.settimeout(t)
        self.blocking = t is None or t > 0

    def setblocking(self, flag: bool) -> None:
        self.sock.setblocking(flag)
        self.blocking = flag

    def connect(self, addr: Any) -> None:
        self.sock.connect(addr)
        self.sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)

    def read(self, n: int) -> bytes | None:
        if not self.blocking:
            try:
                return self.sock.recv(n)
            except BlockingIOError:
                return None
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                break
            buf += chunk
        return buf

    def write(self, data: bytes | str, n: int | None = None) -> int:
        if isinstance(data, str):  # MicroPython writes a str as its UTF-8 bytes
            data = data.encode()
        data = bytes(data if n is None else data[:n])
        self.sock.sendall(data)
        return len(data)

    def close(self) -> None:
        self.sock.close()


def load_umqtt_simple() -> types.ModuleType:
    """The umqtt.simple module, its ``socket`` the MicroPython-like one above."""
    shim = types.ModuleType("socket")
    shim.socket = MicroPythonSocket  # type: ignore[attr-defined]
    shim.getaddrinfo = _socket.getaddrinfo  # type: ignore[attr-defined]
    spec = importlib.util.spec_from_file_location("umqtt_simple", _PATH)
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    real = sys.modules["socket"]
    sys.modules["socket"] = shim  # what its ``import socket`` binds
    try:
        spec.loader.exec_module(mod)  # type: ignore[union-attr]
    finally:
        sys.modules["socket"] = real
    return mod
