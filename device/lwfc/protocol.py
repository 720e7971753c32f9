"""The lwfc link protocol (codec_spec/PROTOCOL.md): message envelope, a resynchronising stream parser (which
checks the tags of ``lwfc.auth`` in authenticated sessions), and the device side of a session (handshake,
sequence numbers, accounting of every frame as result, error or lost).

MicroPython-compatible Python 3.7: bytes, struct, json; no typing, no dataclasses. The host
server uses the same envelope and parser (one implementation, not two).
"""

import json
import struct

try:
    import time as _time
    _ticks_ms = _time.ticks_ms  # MicroPython: monotonic ms
    _ticks_diff = _time.ticks_diff

    def now_ms():
        return _ticks_ms()

    def elapsed_ms(t0):
        return _ticks_diff(_ticks_ms(), t0)
except AttributeError:
    import time as _time

    def now_ms():
        return _time.monotonic() * 1000.0

    def elapsed_ms(t0):
        return _time.monotonic() * 1000.0 - t0

from .auth import TAG_SIZE, Auth, compare_digest, hmac_sha256  # noqa: F401 - part of this module's API
from .crc32 import crc32
from .errors import LwfcError

PROTOCOL_VERSION = 1
SYNC = b"LK"
HEADER_SIZE = 16
CRC_SIZE = 4
FLAG_AUTH = 1
_HEAD = "<2sBBII"

# message types (PROTOCOL.md, 3)
HELLO = 1
WELCOME = 2
REFUSE = 3
DATA = 4
RESULT = 5
ERROR = 6
PING = 7
PONG = 8
BYE = 9
SLICE = 10  # one lwfc frame (a slice or a whole tensor) of the tensor numbered seq (PROTOCOL.md 10)
TYPE_NAMES = {HELLO: "HELLO", WELCOME: "WELCOME", REFUSE: "REFUSE", DATA: "DATA", RESULT: "RESULT",
              ERROR: "ERROR", PING: "PING", PONG: "PONG", BYE: "BYE", SLICE: "SLICE"}

# ERROR codes (PROTOCOL.md, 5.4) and device-side codes
E_CORRUPT = 1
E_BAD_FRAME = 2
E_UNKNOWN_TABLE = 3
E_TABLE_MISMATCH = 4
E_MISSING = 5
E_DUPLICATE = 6
E_TOO_LARGE = 7
E_AUTH = 8
E_NO_SESSION = 9
E_BAD_TYPE = 10
E_BAD_MESSAGE = 11
E_INFERENCE = 12
E_OVERLOADED = 13
E_GARBAGE = 14
E_LOST = 100
E_DROPPED = 101
E_SEND_FAILED = 102
ERROR_NAMES = {
    E_CORRUPT: "CORRUPT", E_BAD_FRAME: "BAD_FRAME", E_UNKNOWN_TABLE: "UNKNOWN_TABLE",
    E_TABLE_MISMATCH: "TABLE_MISMATCH", E_MISSING: "MISSING", E_DUPLICATE: "DUPLICATE",
    E_TOO_LARGE: "TOO_LARGE", E_AUTH: "AUTH", E_NO_SESSION: "NO_SESSION", E_BAD_TYPE: "BAD_TYPE",
    E_BAD_MESSAGE: "BAD_MESSAGE", E_INFERENCE: "INFERENCE", E_OVERLOADED: "OVERLOADED",
    E_GARBAGE: "GARBAGE", E_LOST: "LOST", E_DROPPED: "DROPPED", E_SEND_FAILED: "SEND_FAILED",
}

# REFUSE codes (PROTOCOL.md, 5.1)
R_PROTOCOL = 1
R_MODEL = 2
R_TABLE = 3
R_AUTH = 4
R_BUSY = 5
R_BAD_HELLO = 6
REFUSE_NAMES = {R_PROTOCOL: "PROTOCOL", R_MODEL: "MODEL", R_TABLE: "TABLE", R_AUTH: "AUTH", R_BUSY: "BUSY",
                R_BAD_HELLO: "BAD_HELLO"}

DEFAULT_MAX_MESSAGE = 1 << 20
SEQ_MOD = 1 << 32
ENVELOPE_SIZE = HEADER_SIZE + CRC_SIZE  # bytes a message adds to its body (plus TAG_SIZE with AUTH)


class ProtocolError(LwfcError):
    """The peer broke the link protocol (a refused handshake, an unexpected message, ...)."""


class Refused(ProtocolError):
    """The host refused the session; ``code`` is a REFUSE code, ``reason`` the host's explanation."""

    def __init__(self, code, reason):
        ProtocolError.__init__(self, "host refused the session (%s): %s" % (REFUSE_NAMES.get(code, code), reason))
        self.code = code
        self.reason = reason


class ConnectionClosed(OSError):
    """The byte stream ended (peer closed, cable pulled, host gone)."""


def next_seq(seq):
    """The seq after ``seq`` (1 .. 2^32-1, wrapping to 1: 0 is reserved for session messages)."""
    seq += 1
    return 1 if seq >= SEQ_MOD else seq


def seq_ahead(a, b):
    """How far seq ``a`` is ahead of ``b`` (negative when behind), modulo 2^32 as PROTOCOL.md 5.2 says."""
    d = (a - b) % SEQ_MOD
    return d if d < (1 << 31) else d - SEQ_MOD


# --- envelope ---------------------------------------------------------------------------------------

def pack_message(mtype, seq, body=b"", auth=None):
    """One message: header, body, body CRC and, with ``auth``, the tag."""
    body = bytes(body)
    flags = FLAG_AUTH if auth is not None else 0
    head = struct.pack(_HEAD, SYNC, mtype, flags, seq, len(body))
    msg = head + struct.pack("<I", crc32(head)) + body + struct.pack("<I", crc32(body))
    if auth is not None:
        msg += auth.tag(msg)
    return msg


def pack_json(mtype, seq, obj, auth=None):
    return pack_message(mtype, seq, json.dumps(obj).encode("utf-8"), auth)


def error_body(code, message, count=1):
    """The body of an ERROR (5.4): code, count, and the message (UTF-8, at most 1000 bytes)."""
    return struct.pack("<HH", code, count) + message.encode("utf-8")[:1000]


def pack_error(seq, code, message, count=1, auth=None):
    return pack_message(ERROR, seq, error_body(code, message, count), auth)


def unpack_error(body):
    """(code, count, message) of an ERROR body."""
    if len(body) < 4:
        raise ProtocolError("ERROR body of %d bytes is too short" % len(body))
    code, count = struct.unpack("<HH", bytes(body[:4]))
    try:
        text = bytes(body[4:]).decode("utf-8")
    except UnicodeError:
        text = repr(bytes(body[4:]))
    return code, max(count, 1), text


def welcome_auth(key, welcome):
    """The Auth of a session the host WELCOMEd (section 8): None without a device key; ProtocolError when the
    host sent no 32-hex-digit nonce for a keyed device."""
    if key is None:
        return None
    nonce = welcome.get("nonce")
    if not isinstance(nonce, str) or len(nonce) != 32:
        raise ProtocolError("host sent no nonce for an authenticated session")
    return Auth(key, bytes([int(nonce[i:i + 2], 16) for i in range(0, 32, 2)]))


def parse_json(body, what):
    try:
        obj = json.loads(bytes(body).decode("utf-8"))
    except (ValueError, UnicodeError):
        raise ProtocolError("%s body is not valid UTF-8 JSON" % what) from None
    except RuntimeError:  # RecursionError on CPython, RuntimeError on MicroPython: nesting too deep
        raise ProtocolError("%s body nests JSON too deeply" % what) from None
    if not isinstance(obj, dict):
        raise ProtocolError("%s body must be a JSON object" % what)
    return obj


class Message(object):
    """A received message that passed its CRCs (and tag, in an authenticated session)."""

    __slots__ = ("type", "flags", "seq", "body")

    def __init__(self, mtype, flags, seq, body):
        self.type = mtype
        self.flags = flags
        self.seq = seq
        self.body = body

    def __repr__(self):
        return "Message(%s, seq=%d, %d bytes)" % (TYPE_NAMES.get(self.type, self.type), self.seq, len(self.body))


# parser events other than Message: (kind, type, seq, length)
CORRUPT = "corrupt"
TOO_LARGE = "too_large"
BAD_AUTH = "bad_auth"


class Parser(object):
    """Finds messages in a byte stream with garbage, losses and bit flips (PROTOCOL.md, 4).

    ``feed(data)`` appends bytes; ``next()`` returns the next Message, a tuple
    ``(CORRUPT | TOO_LARGE | BAD_AUTH, type, seq, length)``, or None when more bytes are needed.
    After TOO_LARGE the parser stops (``broken``): the stream cannot be followed without reading the
    oversized body. The buffer never holds more than ``max_message + 36`` bytes plus one fed chunk.

    Every byte that is not part of a valid message counts against ``garbage_since_valid`` (the budget of
    PROTOCOL.md 7): dropped bytes and the whole of a CORRUPT or BAD_AUTH message. With ``auth`` set (an
    authenticated session, PROTOCOL.md 8) a header announcing more than ``max_message`` cannot be verified
    either: it is dropped as garbage and the parser resynchronises, instead of reporting TOO_LARGE.
    """

    def __init__(self, max_message=DEFAULT_MAX_MESSAGE):
        self.max_message = max_message
        self.buf = b""
        self.pos = 0  # consumed bytes at the front of buf (dropped at the next feed: no copy per message)
        self.garbage = 0  # bytes dropped in total
        self.garbage_since_valid = 0  # since the last valid message
        self.auth = None  # an Auth once the session is authenticated
        self.broken = False
        self.max_buffered = 0

    def feed(self, data):
        if self.broken:
            return
        if self.pos:
            self.buf = self.buf[self.pos:]
            self.pos = 0
        self.buf = self.buf + bytes(data) if self.buf else bytes(data)
        if len(self.buf) > self.max_buffered:
            self.max_buffered = len(self.buf)

    def _drop(self, n):
        self.garbage += n
        self.garbage_since_valid += n
        self.pos += n

    def pending(self):
        """Bytes held that are not yet a complete message."""
        return len(self.buf) - self.pos

    def next(self):
        while not self.broken:
            buf = self.buf
            pos = self.pos
            i = buf.find(SYNC, pos)
            if i < 0:
                keep = 1 if buf[-1:] == SYNC[:1] else 0
                if len(buf) - pos > keep:
                    self._drop(len(buf) - pos - keep)
                return None
            if i > pos:
                self._drop(i - pos)
                pos = i
            if len(buf) - pos < HEADER_SIZE:
                return None
            (hcrc,) = struct.unpack("<I", buf[pos + 12:pos + 16])
            if crc32(buf[pos:pos + 12]) != hcrc:
                self._drop(1)
                continue
            _sync, mtype, flags, seq, length = struct.unpack(_HEAD, buf[pos:pos + 12])
            if length > self.max_message:
                if self.auth is not None:  # unverifiable: garbage, not a reason to end the session
                    self._drop(1)
                    continue
                self.broken = True
                self.buf = b""
                self.pos = 0
                return (TOO_LARGE, mtype, seq, length)
            total = HEADER_SIZE + length + CRC_SIZE + (TAG_SIZE if flags & FLAG_AUTH else 0)
            if len(buf) - pos < total:
                return None
            b0 = pos + HEADER_SIZE
            body = buf[b0:b0 + length]
            (bcrc,) = struct.unpack("<I", buf[b0 + length:b0 + length + CRC_SIZE])
            self.pos = pos + total
            if crc32(body) != bcrc:
                # the header passed its CRC, so its length (and seq) can be trusted: skip exactly this message
                self.garbage_since_valid += total
                return (CORRUPT, mtype, seq, length)
            if self.auth is not None:
                tag = buf[b0 + length + CRC_SIZE:pos + total]
                if not flags & FLAG_AUTH or not compare_digest(tag, self.auth.tag(buf[pos:b0 + length + CRC_SIZE])):
                    self.garbage_since_valid += total
                    return (BAD_AUTH, mtype, seq, length)
            self.garbage_since_valid = 0
            return Message(mtype, flags, seq, body)
        return None

    def __iter__(self):
        while True:
            ev = self.next()
            if ev is None:
                return
            yield ev


def parse_datagram(buf, auth=None, max_message=DEFAULT_MAX_MESSAGE):
    """The one message a datagram holds (PROTOCOL.md 10.1), as ``Parser.next`` reports it: a Message, a tuple
    ``(CORRUPT | BAD_AUTH, type, seq, length)`` for a message whose header is sound but whose body or tag is
    not, or None when the datagram is not one message (too short, no sync, a bad header CRC, a length other
    than the datagram's, more than ``max_message``): garbage, never answered."""
    n = len(buf)
    if n < HEADER_SIZE + CRC_SIZE or bytes(buf[0:2]) != SYNC:
        return None
    (hcrc,) = struct.unpack("<I", bytes(buf[12:16]))
    if crc32(bytes(buf[0:12])) != hcrc:
        return None
    _sync, mtype, flags, seq, length = struct.unpack(_HEAD, bytes(buf[0:12]))
    if length > max_message:
        return None
    total = HEADER_SIZE + length + CRC_SIZE + (TAG_SIZE if flags & FLAG_AUTH else 0)
    if total != n:
        return None
    body = bytes(buf[HEADER_SIZE:HEADER_SIZE + length])
    (bcrc,) = struct.unpack("<I", bytes(buf[HEADER_SIZE + length:HEADER_SIZE + length + CRC_SIZE]))
    if crc32(body) != bcrc:
        return (CORRUPT, mtype, seq, length)
    if auth is not None:
        tag = bytes(buf[HEADER_SIZE + length + CRC_SIZE:])
        if not flags & FLAG_AUTH or not compare_digest(tag, auth.tag(bytes(buf[:HEADER_SIZE + length + CRC_SIZE]))):
            return (BAD_AUTH, mtype, seq, length)
    return Message(mtype, flags, seq, body)


# --- the device side of a session -----------------------------------------------------------------

class Answer(object):
    """What became of one DATA frame: ``kind`` is "result" or "error"; ``code`` an ERROR code (error),
    ``result`` the host's JSON object (result), ``rtt_ms`` the time from send to answer (None if lost)."""

    __slots__ = ("seq", "kind", "code", "message", "result", "rtt_ms", "tag")

    def __init__(self, seq, kind, code=0, message="", result=None, rtt_ms=None, tag=None):
        self.seq = seq
        self.kind = kind
        self.code = code
        self.message = message
        self.result = result
        self.rtt_ms = rtt_ms
        self.tag = tag

    def __repr__(self):
        if self.kind == "result":
            return "Answer(seq=%d, result)" % self.seq
        return "Answer(seq=%d, error %s: %s)" % (self.seq, ERROR_NAMES.get(self.code, self.code), self.message)


class Session(object):
    """A device's session over a transport (anything with ``write(bytes)``, ``read(n, timeout_s)`` that
    returns b"" on timeout and raises ConnectionClosed at the end of the stream, and ``close()``).

    ``hello`` holds the HELLO fields (device, model, bundle, table). ``send_frame`` returns the frame's
    seq; ``poll`` returns Answers. Every sent frame is answered exactly once: by the host, or as LOST
    (``expire``, ``fail_all``). ``tag`` values passed to ``send_frame`` come back on the Answer."""

    def __init__(self, transport, hello, key=None, answer_timeout_s=30.0, max_message=DEFAULT_MAX_MESSAGE):
        self.transport = transport
        self.hello = dict(hello)
        self.key = key
        self.answer_timeout_ms = answer_timeout_s * 1000.0
        self.parser = Parser(max_message)
        self.auth = None
        self.seq = 0
        self.outstanding = {}  # seq -> (sent at ms, tag)
        self.order = []  # outstanding seqs in send order
        self.welcome = None
        self.last_rx_ms = now_ms()
        self.ping_seq = 0
        self.garbage_reported = 0
        self.extra_answers = 0  # answers for seqs not outstanding (e.g. a duplicate's second answer)

    def _send(self, data):
        self.transport.write(data)

    def handshake(self, timeout_s=10.0):
        """Send HELLO and wait for WELCOME; raises Refused or ProtocolError."""
        hello = dict(self.hello)
        hello["protocol"] = PROTOCOL_VERSION
        hello["auth"] = self.key is not None
        self._send(pack_json(HELLO, 0, hello))
        t0 = now_ms()
        while elapsed_ms(t0) < timeout_s * 1000.0:
            data = self.transport.read(4096, 0.2)
            if data:
                self.parser.feed(data)
            for ev in self.parser:
                if not isinstance(ev, Message):
                    continue
                if ev.type == WELCOME:
                    w = parse_json(ev.body, "WELCOME")
                    self.welcome = w
                    if self.key is not None:
                        self.auth = welcome_auth(self.key, w)
                        self.parser.auth = self.auth
                    self.last_rx_ms = now_ms()
                    return w
                if ev.type == REFUSE:
                    r = parse_json(ev.body, "REFUSE")
                    raise Refused(r.get("code", 0), r.get("reason", ""))
                if ev.type == BYE:
                    why = bytes(ev.body).decode("utf-8", "replace")
                    raise ProtocolError("host said BYE during the handshake: %s" % why)
        raise ProtocolError("no WELCOME from the host within %.1f s" % timeout_s)

    def send_frame(self, frame, tag=None):
        """Send one lwfc frame as DATA; returns its seq."""
        self.seq = next_seq(self.seq)
        seq = self.seq
        msg = pack_message(DATA, seq, frame, self.auth)
        # outstanding before the write: if the write fails, fail_all() still accounts for this frame
        self.outstanding[seq] = (now_ms(), tag)
        self.order.append(seq)
        self._send(msg)
        return seq

    def send_slices(self, frames, tag=None):
        """Send the frames of one tensor (the slices ``Encoder.encode_sliced`` made, in the order given) as SLICE
        messages sharing one new seq (PROTOCOL.md 10): one answer comes for all of them. Returns the seq."""
        self.seq = next_seq(self.seq)
        seq = self.seq
        self.outstanding[seq] = (now_ms(), tag)
        self.order.append(seq)
        for frame in frames:
            self._send(pack_message(SLICE, seq, frame, self.auth))
        return seq

    def ping(self):
        self.ping_seq = next_seq(self.ping_seq)
        self._send(pack_message(PING, self.ping_seq, b"", self.auth))

    def bye(self, reason="done"):
        try:
            self._send(pack_message(BYE, 0, reason.encode("utf-8"), self.auth))
        except OSError:
            pass

    def _answer(self, seq, kind, code=0, message="", result=None):
        entry = self.outstanding.pop(seq, None)
        if entry is None:
            self.extra_answers += 1
            return None
        self.order.remove(seq)
        return Answer(seq, kind, code, message, result, elapsed_ms(entry[0]), entry[1])

    def handle(self, ev):
        """Answers that one parser event gives."""
        out = []
        if not isinstance(ev, Message):
            return out  # a corrupt answer: the seqs it answered stay outstanding until expire()
        self.last_rx_ms = now_ms()
        if ev.type == RESULT:
            try:
                res = parse_json(ev.body, "RESULT")
            except ProtocolError as exc:
                a = self._answer(ev.seq, "error", E_BAD_MESSAGE, str(exc))
            else:
                a = self._answer(ev.seq, "result", result=res)
            if a is not None:
                out.append(a)
        elif ev.type == ERROR:
            try:
                code, count, text = unpack_error(ev.body)
            except ProtocolError as exc:
                code, count, text = E_BAD_MESSAGE, 1, str(exc)
            s = ev.seq
            for _ in range(count):
                a = self._answer(s, "error", code, text)
                if a is not None:
                    out.append(a)
                s = next_seq(s)
            if ev.seq == 0 and code in (E_GARBAGE, E_TOO_LARGE, E_AUTH):
                raise ConnectionClosed("host closed the session: %s %s" % (ERROR_NAMES.get(code), text))
        elif ev.type == PING:
            self._send(pack_message(PONG, ev.seq, ev.body, self.auth))
        elif ev.type == BYE:
            raise ConnectionClosed("host said BYE: %s" % bytes(ev.body).decode("utf-8", "replace"))
        elif ev.type == REFUSE:
            r = parse_json(ev.body, "REFUSE")
            raise Refused(r.get("code", 0), r.get("reason", ""))
        return out

    def poll(self, timeout_s=0.0):
        """Read what has arrived (waiting up to ``timeout_s`` for the first bytes); returns Answers."""
        out = []
        data = self.transport.read(65536, timeout_s)
        if data:
            self.parser.feed(data)
        try:
            for ev in self.parser:
                out.extend(self.handle(ev))
        except ConnectionClosed as exc:
            # answers already taken off the outstanding table must reach the caller with the error
            exc.answers = out + getattr(exc, "answers", [])
            raise
        return out

    def expire(self):
        """Outstanding frames older than the answer timeout, as LOST Answers."""
        out = []
        while self.order:
            seq = self.order[0]
            sent, tag = self.outstanding[seq]
            if elapsed_ms(sent) < self.answer_timeout_ms:
                break
            self.order.pop(0)
            del self.outstanding[seq]
            out.append(Answer(seq, "error", E_LOST, "no answer within %.1f s" % (self.answer_timeout_ms / 1000.0),
                              tag=tag))
        return out

    def fail_all(self, why):
        """Every outstanding frame as a LOST Answer (the connection is gone)."""
        out = [Answer(s, "error", E_LOST, why, tag=self.outstanding[s][1]) for s in self.order]
        self.outstanding = {}
        self.order = []
        return out
