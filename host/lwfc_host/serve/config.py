"""The server's limits, timeouts and keys (PROTOCOL.md 7), and the small parsers ``lwfc serve`` needs to fill
them in: addresses, the key file and the structured log sink."""

from __future__ import annotations

import json
import os
import stat
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

# Bytes one read takes from a stream. A connection's parser buffer never exceeds the message limit plus one
# read plus one message header, which bounds a connection's memory.
READ_CHUNK = 65536

# After a fatal ERROR (too much garbage), the host reads and discards at most this many bytes, for at most
# FATAL_LINGER_S, so that the ERROR reaches a peer that is still sending (see TcpStream.close).
FATAL_LINGER_S = 1.0
LINGER_MAX_BYTES = 4 << 20


class ServerError(Exception):
    """The server cannot start: a bad bundle, table, key file or address."""


# A body before WELCOME is a HELLO (a few hundred bytes) or a PING (at most 64): nothing larger is read
# from a peer that has not been admitted (PROTOCOL.md 7).
MAX_PRE_SESSION_MESSAGE = 4096


@dataclass
class ServerConfig:
    """Limits, deadlines and keys (PROTOCOL.md 7 and 8). Every deadline is absolute: it is not extended by
    bytes that do not complete what it waits for."""

    max_message: int = 0  # 0: from the bundle (largest legal frame), at least 64 KiB
    max_garbage: int = 1 << 20  # bytes outside valid messages (corrupt ones included) before closing
    hello_timeout_s: float = 5.0  # from accept to a completed HELLO
    message_timeout_s: float = 10.0  # from a message's first byte to its last
    idle_timeout_s: float = 30.0  # since the last valid message of a session
    keepalive_s: float = 10.0
    max_connections: int = 256
    max_per_address: int = 32  # connections at once from one IP address
    max_pending: int = 64  # connections that have not completed HELLO, from all addresses together
    max_seq_gap: int = 1024  # the furthest a DATA seq may jump ahead of the expected one (PROTOCOL.md 5.2)
    workers: int = 2
    pipeline: int = 4  # frames of one connection in work at once (answers still go out in order)
    keys: dict[str, bytes] = field(default_factory=dict)
    require_auth: bool = False  # also refuse devices that have no key (a keyed device must always authenticate)
    log: Callable[[dict[str, Any]], None] | None = None  # structured per-frame log sink
    # Slices (PROTOCOL.md 10): a tensor is answered when its slices tile it or this long after its first slice
    # arrived, whichever comes first; what is missing then is concealed.
    slice_deadline_s: float = 0.05
    max_open_tensors: int = 8  # tensors of one session being assembled at once (a new one closes the oldest)


def parse_hostport(text: str, what: str) -> tuple[str, int]:
    """"HOST:PORT" or ":PORT" or "PORT" -> (host, port); ``what`` names the option in errors."""
    host, _, port = text.rpartition(":")
    try:
        p = int(port)
    except ValueError:
        raise ServerError(f"{what} {text!r} must be HOST:PORT") from None
    if not 0 <= p < 65536:
        raise ServerError(f"{what} port {p} is out of range")
    return (host.strip("[]") or "127.0.0.1"), p


def load_keys(path: str | Path) -> dict[str, bytes]:
    """A key file: JSON object {device name: key as hex (>= 16 bytes)}. Like ssh with a private key, it refuses
    a file that group or others may read or write: the keys are what authenticates every device."""
    try:
        mode = os.stat(path).st_mode
        if mode & 0o077:
            raise ServerError(f"key file {path} is accessible by group or others (mode {stat.S_IMODE(mode):04o}); "
                              f"make it private: chmod 600 {path}")
        obj = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ServerError(f"cannot read key file {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise ServerError(f"key file {path} is not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise ServerError(f"key file {path} must hold a JSON object {{device: hex key}}")
    keys = {}
    for dev, hexkey in obj.items():
        try:
            key = bytes.fromhex(hexkey)
        except (TypeError, ValueError):
            raise ServerError(f"key of device {dev!r} in {path} is not hex") from None
        if len(key) < 16:
            raise ServerError(f"key of device {dev!r} in {path} has {len(key)} bytes; at least 16 are needed")
        keys[dev] = key
    return keys


def json_log_sink(path: str) -> Callable[[dict[str, Any]], None]:
    """A structured log: one JSON object per line, to a file or '-' (stderr)."""
    f = sys.stderr if path == "-" else open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
    lock = threading.Lock()

    def sink(rec: dict[str, Any]) -> None:
        with lock:
            f.write(json.dumps(rec) + "\n")

    return sink
