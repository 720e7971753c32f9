"""Attacks on `lwfc serve`, written from codec_spec/PROTOCOL.md alone, as an outsider would run them.

Every attack talks to a server on the loopback range only, with loops bounded in count and time, and stops
by itself. Attackers connect from ``ATTACKER_ADDRESS`` (another loopback address), so that the per-address
limits a host applies to them do not also count the legitimate device, which connects from 127.0.0.1 —
just as an attacker on the internet has an address of its own.

Each attack returns an ``Outcome``: its name and the facts it saw (JSON-ready), never a verdict; the callers
judge them against the bars of issue 20.

Used by tests/test_server_attacks.py (one regression test per attack) and tests/attack_bench.py (the whole
matrix against a live server with a legitimate device streaming throughout).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from lwfc import protocol as P
from lwfc.crc32 import crc32
from lwfc.frame import MAGIC, MAX_ELEMENTS, VERSION
from lwfc.link import Link

ATTACKER_ADDRESS = "127.0.0.2"
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Target:
    """A running server and what a device needs to talk to it."""

    host: str
    port: int
    hello: dict[str, Any]  # HELLO fields of an unkeyed device (device, model, bundle, table)
    frames: list[bytes]  # real frames for the bundle
    keyed_device: str = ""  # a device name the server holds a key for ...
    key: bytes = b""  # ... and that key
    feature_shape: tuple[int, int, int] = (0, 0, 0)  # the bundle's (H, W, C)

    @property
    def url(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    def to_json(self) -> dict[str, Any]:
        """The target as JSON (frames and key as hex), for an attack run in another process."""
        return {"host": self.host, "port": self.port, "hello": self.hello, "frames": [f.hex() for f in self.frames],
                "keyed_device": self.keyed_device, "key": self.key.hex(), "feature_shape": list(self.feature_shape)}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Target:
        return cls(obj["host"], obj["port"], obj["hello"], [bytes.fromhex(f) for f in obj["frames"]],
                   obj["keyed_device"], bytes.fromhex(obj["key"]), tuple(obj["feature_shape"]))


# --- raw peers ----------------------------------------------------------------------------------------

def connect(target: Target, source: str = ATTACKER_ADDRESS, timeout_s: float = 5.0,
            sndbuf: int | None = None) -> socket.socket:
    """A TCP connection to the server from ``source`` (a loopback address); ``sndbuf``: a small send buffer,
    so that what the client counts as sent is close to what the server was offered."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout_s)
    if sndbuf is not None:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    try:
        s.bind((source, 0))
        s.connect((target.host, target.port))
    except OSError:
        s.close()
        raise
    return s


def reset(sock: socket.socket) -> None:
    """Close with a TCP RST (SO_LINGER 0): an abortive close, as a crashed or killed peer's kernel sends."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


def hello_bytes(fields: dict[str, Any], auth: bool = False) -> bytes:
    """A HELLO message with ``fields`` (protocol and auth filled in)."""
    return P.pack_json(P.HELLO, 0, dict(fields, protocol=P.PROTOCOL_VERSION, auth=auth))


def read_messages(sock: socket.socket, until: Callable[[list[Any]], bool], timeout_s: float,
                  parser: P.Parser | None = None) -> tuple[list[Any], bool]:
    """Read messages until ``until(messages)`` holds, the peer closes or ``timeout_s`` passes.
    Returns (messages and parser events, closed by the peer)."""
    parser = parser or P.Parser(1 << 22)
    events: list[Any] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not until(events):
        sock.settimeout(max(0.01, min(0.5, deadline - time.monotonic())))
        try:
            data = sock.recv(65536)
        except socket.timeout:
            continue
        except OSError:
            return events, True
        if not data:
            return events, True
        parser.feed(data)
        events.extend(parser)
    return events, False


def read_until_quiet(sock: socket.socket, quiet_s: float, limit_s: float,
                     parser: P.Parser | None = None) -> tuple[list[Any], int, bool]:
    """Read until nothing arrives for ``quiet_s`` (or ``limit_s`` passes, or the peer closes).
    Returns (events, bytes read, closed by the peer)."""
    parser = parser or P.Parser(1 << 22)
    events: list[Any] = []
    nbytes = 0
    t_end = time.monotonic() + limit_s
    while time.monotonic() < t_end:
        sock.settimeout(max(0.01, min(quiet_s, t_end - time.monotonic())))
        try:
            data = sock.recv(65536)
        except socket.timeout:
            return events, nbytes, False
        except OSError:
            return events, nbytes, True
        if not data:
            return events, nbytes, True
        nbytes += len(data)
        parser.feed(data)
        events.extend(parser)
    return events, nbytes, False


def drain_nowait(sock: socket.socket) -> tuple[list[Any], bool]:
    """What the peer has already sent, without waiting: (events, closed by the peer)."""
    parser = P.Parser(1 << 22)
    events: list[Any] = []
    sock.setblocking(False)
    while True:
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return events, False
        except OSError:
            return events, True
        if not data:
            return events, True
        parser.feed(data)
        events.extend(parser)


def messages_of(events: list[Any], mtype: int) -> list[P.Message]:
    """The messages of type ``mtype`` among parser events."""
    return [e for e in events if isinstance(e, P.Message) and e.type == mtype]


def refuse_name(msg: P.Message) -> str:
    """"REFUSE <code name>" of a REFUSE message."""
    try:
        code = json.loads(bytes(msg.body))["code"]
    except (ValueError, KeyError, TypeError):
        return "REFUSE ?"
    return "REFUSE " + P.REFUSE_NAMES.get(code, str(code))


def answer_name(events: list[Any]) -> str:
    """The handshake answer among ``events``: "WELCOME", "REFUSE <code>", "BYE <reason>" or "none"."""
    for e in events:
        if isinstance(e, P.Message):
            if e.type == P.WELCOME:
                return "WELCOME"
            if e.type == P.REFUSE:
                return refuse_name(e)
            if e.type == P.BYE:
                return "BYE " + bytes(e.body).decode("utf-8", "replace")
    return "none"


def welcome(sock: socket.socket, fields: dict[str, Any], timeout_s: float = 5.0) -> P.Message:
    """Send HELLO and return WELCOME (AssertionError on anything else)."""
    sock.sendall(hello_bytes(fields))
    events, _ = read_messages(sock, lambda ev: bool(messages_of(ev, P.WELCOME) or messages_of(ev, P.REFUSE)),
                              timeout_s)
    got = messages_of(events, P.WELCOME)
    assert got, f"no WELCOME: {events!r}"
    return got[0]


def error_codes(events: list[Any]) -> list[int]:
    """The codes of the ERROR messages among ``events``, in order."""
    return [P.unpack_error(m.body)[0] for m in messages_of(events, P.ERROR)]


def error_names(events: list[Any]) -> list[str]:
    """The code names of the ERROR messages among ``events``, in order."""
    return [P.ERROR_NAMES.get(c, str(c)) for c in error_codes(events)]


def frame_claiming(shape: tuple[int, int, int], table_id: bytes) -> bytes:
    """A 30-byte lwfc frame whose header claims ``shape`` (H, W, C) with a 4-byte payload: well-formed up
    to its payload, which a decoder could only reject after decoding every claimed element."""
    h, w, c = shape
    head = struct.pack("<2sBB4sHHHII", MAGIC, VERSION, 0, table_id[:4], h, w, c, h * w * c, 4)
    body = head + b"\0\0\0\0"
    return body + struct.pack("<I", crc32(body))


def amplifying_shape(channels: int) -> tuple[int, int, int]:
    """The largest square shape with ``channels`` channels a frame may legally claim (SPEC.md: at most
    MAX_ELEMENTS elements): the bundle's channel count, so that a check of the channels alone lets it pass."""
    side = min(65535, math.isqrt(MAX_ELEMENTS // max(1, channels)))
    return side, side, channels


# --- the legitimate device ------------------------------------------------------------------------------

# Row kinds of a LegitDevice log besides "result" and the ERROR code names.
NOT_SENT = "NOT_SENT"  # the frame's time passed while the device was (re)connecting
CONNECT_FAILED = "CONNECT_FAILED"  # the host could not be reached or refused the session


class LegitDevice(threading.Thread):
    """The project's own device link (lwfc.link.Link) streaming real frames at ``rate_hz`` from 127.0.0.1
    until stopped, reconnecting when the host drops or refuses it. Every frame it was due to send is
    accounted for: its submission time and what became of it ("result", an ERROR name, LOST, DROPPED, ...,
    NOT_SENT, CONNECT_FAILED), with the time from submission to RESULT in ms."""

    def __init__(self, target: Target, rate_hz: float = 50.0, window: int = 4, device: str = "legit-device"):
        super().__init__(daemon=True, name=device)
        self.target, self.period_s, self.window, self.device = target, 1.0 / rate_hz, window, device
        self.stop_event = threading.Event()
        self.submitted: list[float] = []  # the due time of every frame, sent or not
        self.log: list[tuple[float, str, float | None]] = []  # (submitted at, outcome, ms to its RESULT)
        self.lock = threading.Lock()
        self.connects = 0
        self.failures: list[str] = []  # why connections broke or were refused

    def _record(self, answers: list[P.Answer]) -> None:
        now = time.monotonic()
        with self.lock:
            for a in answers:
                if a.tag is None:
                    continue
                if a.kind == "result":
                    self.log.append((a.tag, "result", 1000.0 * (now - a.tag)))
                else:
                    self.log.append((a.tag, P.ERROR_NAMES.get(a.code, str(a.code)), None))

    def _unsent(self, t: float, kind: str) -> None:
        with self.lock:
            self.submitted.append(t)
            self.log.append((t, kind, None))

    def _connect(self) -> Link | None:
        link = Link(self.target.url, dict(self.target.hello, device=self.device), window=self.window,
                    answer_timeout_s=10.0, reconnect_attempts=2)
        try:
            link.connect()
        except (OSError, P.ProtocolError) as exc:
            with self.lock:
                self.failures.append(f"connect: {exc}")
            return None
        self.connects += 1
        return link

    def run(self) -> None:
        frames = self.target.frames
        link: Link | None = None
        i = 0
        next_t = time.monotonic()
        while not self.stop_event.is_set():
            now = time.monotonic()
            while next_t + self.period_s < now:  # due while we were blocked: never sent
                self._unsent(next_t, NOT_SENT)
                next_t += self.period_s
            if link is None:
                link = self._connect()
                if link is None:
                    self._unsent(next_t, CONNECT_FAILED)
                    next_t += self.period_s
                    self.stop_event.wait(max(0.0, next_t - time.monotonic()))
                    continue
            try:
                t_sub = time.monotonic()
                with self.lock:
                    self.submitted.append(t_sub)
                self._record(link.submit(frames[i % len(frames)], tag=t_sub))
                i += 1
                next_t += self.period_s
                while time.monotonic() < next_t and not self.stop_event.is_set():
                    self._record(link.pump(max(0.0, min(0.01, next_t - time.monotonic()))))
            except (OSError, P.ProtocolError) as exc:  # ConnectionClosed after failed reconnection, Refused
                self._record(getattr(exc, "answers", []))
                with self.lock:
                    self.failures.append(f"link: {exc}")
                link = None
        if link is not None:
            try:
                self._record(link.drain(15.0))
                link.close()
            except (OSError, P.ProtocolError) as exc:
                self._record(getattr(exc, "answers", []))

    def stop(self) -> None:
        """Stop sending, wait for the answers still due, and end the thread."""
        self.stop_event.set()
        self.join(30)

    def window_stats(self, t0: float, t1: float) -> dict[str, Any]:
        """Frames due in [t0, t1): how many, how many got a RESULT (so far), p95 time to the RESULT (ms), and
        what became of the others."""
        with self.lock:
            submitted = sum(1 for t in self.submitted if t0 <= t < t1)
            rows = [r for r in self.log if t0 <= r[0] < t1]
        lat = sorted(r[2] for r in rows if r[1] == "result" and r[2] is not None)
        p95 = lat[min(len(lat) - 1, math.ceil(0.95 * len(lat)) - 1)] if lat else None
        kinds: dict[str, int] = {}
        for r in rows:
            kinds[r[1]] = kinds.get(r[1], 0) + 1
        unanswered = submitted - len(rows)
        if unanswered > 0:
            kinds["unanswered"] = unanswered
        return {"submitted": submitted, "answered": kinds.get("result", 0),
                "p95_ms": None if p95 is None else round(p95, 2), "outcomes": kinds}


# --- the attacks --------------------------------------------------------------------------------------

@dataclass
class Outcome:
    """What one attack did and what it saw."""

    name: str
    facts: dict[str, Any] = field(default_factory=dict)


def abortive_close(target: Target, clients: int = 300, frames_each: int = 30) -> Outcome:
    """Issue 20, 1: each client sends HELLO and ``frames_each`` DATA in one write (more than the host's
    pipeline takes at once), then resets the connection."""
    burst = hello_bytes(dict(target.hello, device="aborter"))
    for seq in range(1, frames_each + 1):
        burst += P.pack_message(P.DATA, seq, target.frames[seq % len(target.frames)])
    failed = 0
    for _ in range(clients):
        try:
            s = connect(target)
        except OSError:
            failed += 1
            continue
        try:
            s.sendall(burst)
        except OSError:
            failed += 1
        reset(s)
    return Outcome("abortive close", {"clients": clients, "frames_each": frames_each, "burst_bytes": len(burst),
                                      "connect_failed": failed})


DEVICE_SCRIPT = r"""
import json, sys
from lwfc.link import Link
url, hello_json, frames_path = sys.argv[1], sys.argv[2], sys.argv[3]
data = open(frames_path, "rb").read()
frames, i = [], 0
while i < len(data):
    n = int.from_bytes(data[i:i + 4], "little"); frames.append(data[i + 4:i + 4 + n]); i += 4 + n
link = Link(url, json.loads(hello_json), window=8, policy="block")  # as fast as the host answers
link.connect()
print("connected", flush=True)
k = 0
while True:
    link.submit(frames[k % len(frames)]); k += 1
"""


def killed_devices(target: Target, devices: int = 10, run_s: float = 1.0) -> Outcome:
    """Issue 20, 1: real device processes (lwfc.link, window 8) streaming as fast as the host answers them
    (eight frames in flight each), SIGKILLed while they have frames in flight."""
    with tempfile.NamedTemporaryFile("wb", suffix=".frames", delete=False) as f:
        for fr in target.frames:
            f.write(len(fr).to_bytes(4, "little") + fr)
        frames_path = f.name
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in [str(ROOT / "device"),
                                                                   os.environ.get("PYTHONPATH", "")] if p))
    procs: list[subprocess.Popen[bytes]] = []
    connected = 0
    try:
        for k in range(devices):
            hello = json.dumps(dict(target.hello, device=f"killed-{k}"))
            procs.append(subprocess.Popen([sys.executable, "-c", DEVICE_SCRIPT, target.url, hello, frames_path],
                                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env))
        for p in procs:  # a device that fails to connect exits: its stdout ends
            if p.stdout is not None and p.stdout.readline().strip() == b"connected":
                connected += 1
        time.sleep(run_s)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
        for p in procs:
            p.wait(10)
            if p.stdout is not None:
                p.stdout.close()
        os.unlink(frames_path)
    return Outcome("SIGKILLed devices", {"devices": devices, "connected": connected, "run_s": run_s})


def amplification_probe(target: Target, tries: int = 5, shape: tuple[int, int, int] | None = None,
                        answer_timeout_s: float = 30.0) -> Outcome:
    """Issue 20, 2, measured: one session sends the amplifying frame ``tries`` times, one at a time, and times
    each answer (stops early once one takes over a second: that is decoding, and more would only load the
    host). Returns the answers' codes, the first message and the times."""
    shape = shape or amplifying_shape(target.feature_shape[2])
    frame = frame_claiming(shape, bytes.fromhex(target.hello["table"]))
    s = connect(target)
    times: list[float] = []
    answers: list[str] = []
    first_message = ""
    try:
        welcome(s, dict(target.hello, device="amplify-probe"))
        parser = P.Parser(1 << 20)
        for seq in range(1, tries + 1):
            t0 = time.monotonic()
            s.sendall(P.pack_message(P.DATA, seq, frame))
            events, closed = read_messages(
                s, lambda ev, seq=seq: any(isinstance(e, P.Message) and e.seq == seq and e.type in (P.RESULT, P.ERROR)
                                           for e in ev), answer_timeout_s, parser)
            got = [e for e in events if isinstance(e, P.Message) and e.seq == seq and e.type in (P.RESULT, P.ERROR)]
            if not got:
                answers.append("closed" if closed else "none")
                break
            times.append(round(1000 * (time.monotonic() - t0), 3))
            if got[0].type == P.RESULT:
                answers.append("RESULT")
            else:
                code, _count, text = P.unpack_error(got[0].body)
                answers.append(P.ERROR_NAMES.get(code, str(code)))
                first_message = first_message or text
            if times[-1] > 1000:
                break
    finally:
        s.close()
    srt = sorted(times)
    return Outcome("amplification frame, one at a time", {
        "claimed_shape": list(shape), "frame_bytes": len(frame), "answers": answers, "message": first_message,
        "answer_ms": times, "median_ms": srt[len(srt) // 2] if srt else None, "max_ms": srt[-1] if srt else None})


def amplification(target: Target, connections: int = 2, in_flight: int = 4, duration_s: float = 5.0,
                  shape: tuple[int, int, int] | None = None) -> Outcome:
    """Issue 20, 2: DATA whose tiny frame claims a huge shape (by default the largest legal one with the
    bundle's channel count), ``in_flight`` at a time on each of ``connections`` sessions.
    Returns the answers' error codes and the slowest answer (ms)."""
    shape = shape or amplifying_shape(target.feature_shape[2])
    frame = frame_claiming(shape, bytes.fromhex(target.hello["table"]))
    codes: dict[str, int] = {}
    slowest = [0.0]
    sent_total = [0]
    problems: list[str] = []
    lock = threading.Lock()

    def one(k: int) -> None:
        try:
            s = connect(target)
        except OSError as exc:
            with lock:
                problems.append(f"connect: {exc}")
            return
        try:
            welcome(s, dict(target.hello, device=f"amplifier-{k}"))
            parser, seq, sent = P.Parser(1 << 20), 0, {}
            t_end = time.monotonic() + duration_s
            while time.monotonic() < t_end:
                while len(sent) < in_flight:
                    seq += 1
                    sent[seq] = time.monotonic()
                    s.sendall(P.pack_message(P.DATA, seq, frame))
                    with lock:
                        sent_total[0] += 1
                s.settimeout(max(0.01, t_end - time.monotonic()))
                try:
                    data = s.recv(65536)
                except socket.timeout:
                    break
                if not data:
                    with lock:
                        problems.append("closed by the host")
                    break
                parser.feed(data)
                for ev in parser:
                    if isinstance(ev, P.Message) and ev.type in (P.ERROR, P.RESULT) and ev.seq in sent:
                        ms = 1000 * (time.monotonic() - sent.pop(ev.seq))
                        name = "RESULT" if ev.type == P.RESULT else P.ERROR_NAMES.get(P.unpack_error(ev.body)[0], "?")
                        with lock:
                            codes[name] = codes.get(name, 0) + 1
                            slowest[0] = max(slowest[0], ms)
            with lock:  # frames never answered within the attack are as slow as the attack is long, at least
                if sent:
                    codes["unanswered"] = codes.get("unanswered", 0) + len(sent)
                    slowest[0] = max(slowest[0], 1000 * (time.monotonic() - min(sent.values())))
        except (OSError, AssertionError) as exc:
            with lock:
                problems.append(f"{type(exc).__name__}: {exc}"[:200])
        finally:
            s.close()

    threads = [threading.Thread(target=one, args=(k,), daemon=True) for k in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(duration_s + 30)
    return Outcome("decode amplification", {"frame_bytes": len(frame), "claimed_shape": list(shape),
                                            "sent": sent_total[0], "answers": codes,
                                            "slowest_answer_ms": round(slowest[0], 2), "problems": problems})


def drip(sock: socket.socket, pieces: Iterable[bytes], every_s: float,
         limit_s: float) -> tuple[float | None, list[Any], int]:
    """Send ``pieces`` one every ``every_s``, reading what comes back in between, until the host closes the
    connection or ``limit_s`` passes. Returns (seconds until the host closed it, or None; events; pieces sent)."""
    t0 = time.monotonic()
    events: list[Any] = []
    parser = P.Parser(1 << 20)
    sent = 0
    for piece in pieces:
        if time.monotonic() - t0 > limit_s:
            break
        try:
            sock.sendall(piece)
        except OSError:
            return time.monotonic() - t0, events, sent
        sent += 1
        got, closed = read_messages(sock, lambda ev: False, every_s, parser)
        events += got
        if closed:
            return time.monotonic() - t0, events, sent
    return None, events, sent


def _bye(events: list[Any]) -> str | None:
    bye = messages_of(events, P.BYE)
    return bytes(bye[0].body).decode("utf-8", "replace") if bye else None


def ping_without_hello(target: Target, every_s: float = 0.5, limit_s: float = 30.0) -> Outcome:
    """Issue 20, 3: PINGs on a connection that never says HELLO. Returns how long the host kept it open and
    what it said."""
    s = connect(target)
    pings = (P.pack_message(P.PING, seq, b"") for seq in itertools.count(1))
    try:
        closed_after, events, sent = drip(s, pings, every_s, limit_s)
    finally:
        s.close()
    return Outcome("PING without HELLO", {
        "closed_after_s": None if closed_after is None else round(closed_after, 2), "limit_s": limit_s,
        "pings": sent, "pongs": len(messages_of(events, P.PONG)), "bye": _bye(events)})


def trickle(target: Target, every_s: float = 0.5, limit_s: float = 30.0, in_session: bool = True) -> Outcome:
    """Issue 20, 3: a message body sent one byte every ``every_s``. Returns how long the host kept the
    connection after the message's first byte, and what it said."""
    s = connect(target)
    msg = P.pack_message(P.DATA, 1, target.frames[0])
    try:
        if in_session:
            welcome(s, dict(target.hello, device="trickler"))
        pieces = [msg[:P.HEADER_SIZE]] + [msg[i:i + 1] for i in range(P.HEADER_SIZE, len(msg))]
        closed_after, events, sent = drip(s, pieces, every_s, limit_s)
    finally:
        s.close()
    return Outcome("trickled body", {
        "closed_after_s": None if closed_after is None else round(closed_after, 2), "limit_s": limit_s,
        "bytes_sent": P.HEADER_SIZE + sent - 1 if sent else 0, "message_bytes": len(msg), "bye": _bye(events),
        "errors": error_names(events)})


def connection_flood(target: Target, connections: int = 400, hold_s: float = 3.0,
                     sources: tuple[str, ...] = (ATTACKER_ADDRESS,)) -> Outcome:
    """Issue 20, 3: many connections (round robin from ``sources``) that never say HELLO, held open; meanwhile
    a newcomer from 127.0.0.1 asks for a session. Returns how the host treated the held connections (REFUSE
    BUSY, BYE, closed) and what the newcomer got."""
    socks: list[socket.socket] = []
    failed = 0
    for k in range(connections):
        try:
            socks.append(connect(target, source=sources[k % len(sources)], timeout_s=2.0))
        except OSError:
            failed += 1
    time.sleep(0.3)
    newcomer = "none"
    try:
        s = connect(target, source="127.0.0.1")
        s.sendall(hello_bytes(dict(target.hello, device="newcomer")))
        events, _ = read_messages(s, lambda ev: answer_name(ev) != "none", 5.0)
        newcomer = answer_name(events)
        s.close()
    except OSError as exc:
        newcomer = f"connect failed: {exc}"
    # what the host did to each held connection right away (quotas) ...
    busy = 0
    early_closed = 0
    alive: list[socket.socket] = []
    for c in socks:
        events, closed = drain_nowait(c)
        busy += answer_name(events) == "REFUSE BUSY"
        if closed:
            early_closed += 1
            c.close()
        else:
            alive.append(c)
    # ... and after holding them (the hello deadline)
    time.sleep(hold_s)
    late_closed = 0
    byes: dict[str, int] = {}
    for c in alive:
        events, closed = drain_nowait(c)
        late_closed += closed
        for m in messages_of(events, P.BYE):
            why = bytes(m.body).decode("utf-8", "replace")
            byes[why] = byes.get(why, 0) + 1
        busy += answer_name(events) == "REFUSE BUSY"
        c.close()
    return Outcome("connection flood", {
        "connections": connections, "sources": len(sources), "connect_failed": failed, "refused_busy": busy,
        "closed_at_once": early_closed, "held": len(alive), "closed_while_held": late_closed, "byes": byes,
        "hold_s": hold_s, "newcomer": newcomer})


def keyed_without_auth(target: Target) -> Outcome:
    """Issue 20, 4: a device the host holds a key for says ``auth: false``."""
    s = connect(target)
    try:
        s.sendall(hello_bytes(dict(target.hello, device=target.keyed_device), auth=False))
        events, closed = read_messages(s, lambda ev: answer_name(ev) != "none", 5.0)
        if answer_name(events).startswith("REFUSE") and not closed:
            _, closed = read_messages(s, lambda ev: False, 2.0)
    finally:
        s.close()
    return Outcome("keyed device without auth", {"answer": answer_name(events), "closed": closed})


def injection_into_authenticated_session(target: Target) -> Outcome:
    """Issue 20, 4: into an authenticated session, what the attacker can make without the key: an untagged
    DATA with a bad body CRC, an untagged DATA with a good body, a DATA with a wrong tag, and an untagged header
    announcing a body over any limit; then the device's genuine DATA seq 1 and a PING. The host must ignore
    what it cannot verify: the genuine frame gets its RESULT and the session stays open (PONG)."""
    s = connect(target)
    try:
        s.sendall(hello_bytes(dict(target.hello, device=target.keyed_device), auth=True))
        events, _ = read_messages(s, lambda ev: answer_name(ev) != "none", 5.0)
        w = messages_of(events, P.WELCOME)
        if not w:
            return Outcome("injection into an authenticated session", {"answer": answer_name(events)})
        auth = P.Auth(target.key, bytes.fromhex(json.loads(w[0].body)["nonce"]))
        forged = P.Auth(b"attacker-guessed-key", auth.nonce)
        frame = target.frames[0]
        bad_crc = bytearray(P.pack_message(P.DATA, 1, frame))
        bad_crc[-1] ^= 0xFF  # body CRC broken, no tag
        header = struct.pack("<2sBBII", P.SYNC, P.DATA, 0, 1, 1 << 30)
        too_large = header + struct.pack("<I", crc32(header))
        injected = [bytes(bad_crc), P.pack_message(P.DATA, 1, frame), P.pack_message(P.DATA, 1, frame, forged),
                    too_large]
        s.sendall(b"".join(injected))
        s.sendall(P.pack_message(P.DATA, 1, frame, auth) + P.pack_message(P.PING, 77, b"alive?", auth))
        parser = P.Parser(1 << 20)
        parser.auth = auth
        got, closed = read_messages(s, lambda ev: bool([e for e in messages_of(ev, P.PONG) if e.seq == 77]), 10.0,
                                    parser)
    finally:
        s.close()
    verified = [e for e in got if isinstance(e, P.Message)]
    first = [e for e in verified if e.seq == 1 and e.type in (P.RESULT, P.ERROR)]
    answer = "none" if not first else ("RESULT" if first[0].type == P.RESULT
                                       else "ERROR " + P.ERROR_NAMES.get(P.unpack_error(first[0].body)[0], "?"))
    return Outcome("injection into an authenticated session", {
        "injected_bytes": sum(map(len, injected)), "genuine_seq1": answer,
        "pong": bool([e for e in messages_of(verified, P.PONG) if e.seq == 77]), "closed": closed,
        "errors": error_names(verified), "unverified_answers": sum(1 for e in got if not isinstance(e, P.Message))})


def deep_hello(target: Target, depth: int = 60_000) -> Outcome:
    """Issue 20, 5: a HELLO body of ``depth`` '[' characters."""
    s = connect(target)
    try:
        s.sendall(P.pack_message(P.HELLO, 0, b"[" * depth))
        events, closed = read_messages(s, lambda ev: answer_name(ev) != "none" or bool(error_codes(ev)), 5.0)
        if not closed:
            more, closed = read_messages(s, lambda ev: False, 2.0)
            events += more
    except OSError:  # the host may reset a connection whose bytes it did not read
        events, closed = [], True
    finally:
        s.close()
    answer = answer_name(events)
    if answer == "none" and error_codes(events):
        answer = "ERROR " + error_names(events)[0]
    return Outcome("deeply nested HELLO", {"depth": depth, "answer": answer if answer != "none" or not closed
                                           else "closed without REFUSE", "closed": closed})


def seq_jump(target: Target, seq: int = 2**31 - 1) -> Outcome:
    """Issue 20, 5: one DATA far ahead of the expected seq, then the genuine DATA seq 1. Returns how many
    messages and bytes came back, the MISSING seqs claimed and the answer to seq 1."""
    s = connect(target)
    try:
        welcome(s, dict(target.hello, device="jumper"))
        s.sendall(P.pack_message(P.DATA, seq, target.frames[0]) + P.pack_message(P.DATA, 1, target.frames[1]))
        events, nbytes, _ = read_until_quiet(s, 0.5, 10.0)
    finally:
        s.close()
    msgs = [e for e in events if isinstance(e, P.Message) and e.type in (P.ERROR, P.RESULT)]
    seq1 = "none"
    for m in msgs:  # the first answer that covers seq 1 (an ERROR covers seq .. seq + count - 1)
        if m.type == P.RESULT and m.seq == 1:
            seq1 = "RESULT"
            break
        if m.type == P.ERROR:
            code, count, _ = P.unpack_error(m.body)
            if m.seq <= 1 < m.seq + count:
                seq1 = "ERROR " + P.ERROR_NAMES.get(code, str(code))
                break
    return Outcome("seq jump", {
        "seq": seq, "answers": len(msgs), "bytes_back": nbytes,
        "missing_counted": sum(P.unpack_error(m.body)[1] for m in messages_of(msgs, P.ERROR)
                               if P.unpack_error(m.body)[0] == P.E_MISSING),
        "codes": sorted(set(error_names(msgs))), "seq1": seq1})


def corrupt_flood(target: Target, body_bytes: int = 60_000, limit_bytes: int = 64 << 20,
                  limit_s: float = 20.0) -> Outcome:
    """Issue 20, 5: DATA messages with valid headers and bad body CRCs, as fast as the host takes them.
    Returns how many bytes the host took before it closed the connection (None: it never did within
    ``limit_bytes`` and ``limit_s``) and the ERROR codes it sent."""
    s = connect(target, sndbuf=64 * 1024)
    welcome(s, dict(target.hello, device="corrupter"))
    s.settimeout(1.0)  # shared by both threads: neither may change it
    bad = bytearray(P.pack_message(P.DATA, 1, bytes(body_bytes)))
    bad[-1] ^= 0xFF
    stop = threading.Event()
    codes: dict[str, int] = {}
    peer_closed = threading.Event()

    def read_answers() -> None:  # read the host's answers so that it never blocks on us
        parser = P.Parser(1 << 22)
        while not stop.is_set():
            try:
                data = s.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                peer_closed.set()
                return
            if not data:
                peer_closed.set()
                return
            parser.feed(data)
            for name in error_names(list(parser)):
                codes[name] = codes.get(name, 0) + 1

    reader = threading.Thread(target=read_answers, daemon=True)
    reader.start()
    sent, closed_at, stalled = 0, None, False
    t0 = time.monotonic()
    seq = 0
    while sent < limit_bytes and time.monotonic() - t0 < limit_s and closed_at is None:
        seq += 1
        struct.pack_into("<I", bad, 4, seq)
        struct.pack_into("<I", bad, 12, crc32(bytes(bad[:12])))
        view = memoryview(bytes(bad))
        while view:
            if peer_closed.is_set():
                closed_at = sent
                break
            try:
                n = s.send(view)
            except socket.timeout:  # the host does not read: keep trying until the time limit
                if time.monotonic() - t0 > limit_s:
                    stalled = True
                    break
                continue
            except OSError:
                closed_at = sent
                break
            sent += n
            view = view[n:]
        if stalled:
            break
    # let the reader take what arrived before the close (the ERROR) even when a failed send saw it first
    if peer_closed.wait(2.0) and closed_at is None:
        closed_at = sent
    stop.set()
    reader.join(3)
    s.close()
    return Outcome("corrupt-body flood", {"sent_bytes": sent, "messages": seq, "cut_off_after_bytes": closed_at,
                                          "stalled": stalled, "limit_bytes": limit_bytes,
                                          "seconds": round(time.monotonic() - t0, 2), "errors": codes})
