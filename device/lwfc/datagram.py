"""The device side of a datagram link (codec_spec/PROTOCOL.md 10): each tensor goes out as slices that fit one
datagram each, all under the tensor's seq; the host assembles what arrives within its deadline, conceals the
rest and answers once per tensor. Nothing is retransmitted: a lost slice costs the part of the tensor it
held, never the whole answer.

- ``DatagramSession``: ``Session`` (lwfc.protocol) over a datagram transport (``UdpTransport``): one message per
  datagram, a HELLO retried with backoff until the host's WELCOME (the one that echoes this HELLO's ``client``
  value) arrives, answers read datagram by datagram.
- ``DatagramLink``: what the runner uses, like ``lwfc.link.Link``: ``submit(frames, tag)`` sends one tensor's
  slices (at most ``window`` tensors unanswered), ``pump``/``drain`` collect Answers (RESULT, ERROR, or LOST
  after the answer timeout), a new handshake when the host has forgotten the session.
- ``send_order``: the order in which a tensor's slices go out. Interleaved, a burst of lost datagrams takes
  slices that lie far apart, which the host's interpolation conceals better than one wide gap.
- ``max_frame_bytes``: the largest slice frame that fits a datagram of ``mtu`` bytes (the slices themselves are
  cut by ``lwfc.slices``).

MicroPython-compatible Python 3.7.
"""

import json

from .auth import TAG_SIZE
from .protocol import (
    E_NO_SESSION,
    ENVELOPE_SIZE,
    HELLO,
    PROTOCOL_VERSION,
    REFUSE,
    WELCOME,
    ConnectionClosed,
    Message,
    ProtocolError,
    Refused,
    Session,
    elapsed_ms,
    now_ms,
    pack_message,
    parse_datagram,
    parse_json,
    welcome_auth,
)

MIN_HELLO_DATAGRAM = 512  # a host answers no shorter HELLO datagram (no reflection amplification: 10.2)
HELLO_ATTEMPTS = 6
HELLO_FIRST_WAIT_S = 0.25  # doubled after each unanswered HELLO: 0.25, 0.5, 1, 2, 4, 8 s


def max_frame_bytes(mtu, auth=True):
    """The largest lwfc frame that travels in one datagram of ``mtu`` bytes: the envelope (20 bytes) and,
    with ``auth``, the tag (16) come off. Reserving the tag always keeps a slice plan valid with and without
    keys."""
    return mtu - ENVELOPE_SIZE - (TAG_SIZE if auth else 0)


def _bit_reverse(i, bits):
    r = 0
    for _ in range(bits):
        r = (r << 1) | (i & 1)
        i >>= 1
    return r


def send_order(n, interleave=True):
    """The order in which ``n`` slices (in raster order of their regions) are sent: 0 .. n-1, or interleaved by
    bit reversal (0, n/2, n/4, 3n/4, ...), so that consecutive datagrams carry slices far apart."""
    if not interleave or n <= 2:
        return list(range(n))
    bits = 0
    while (1 << bits) < n:
        bits += 1
    return [j for j in (_bit_reverse(i, bits) for i in range(1 << bits)) if j < n]


def _client_token():
    """16 random hex digits naming one handshake attempt sequence (its WELCOME echoes them)."""
    try:
        import os
        raw = os.urandom(8)
    except (ImportError, AttributeError, NotImplementedError):
        import random
        raw = bytes([random.getrandbits(8) for _ in range(8)])
    return "".join("%02x" % b for b in raw)


class DatagramSession(Session):
    """A device session over a datagram transport (``send``, ``recv``, ``close``; PROTOCOL.md 10)."""

    def __init__(self, transport, hello, key=None, answer_timeout_s=10.0, hello_attempts=HELLO_ATTEMPTS,
                 hello_first_wait_s=HELLO_FIRST_WAIT_S):
        Session.__init__(self, transport, hello, key, answer_timeout_s)
        self.hello_attempts = hello_attempts
        self.hello_first_wait_s = hello_first_wait_s
        self.hello_sent = 0
        self.garbage = 0  # datagrams that were not one valid message

    def _send(self, data):
        self.transport.send(data)

    def _hello_datagram(self, client):
        hello = dict(self.hello)
        hello["protocol"] = PROTOCOL_VERSION
        hello["auth"] = self.key is not None
        hello["transport"] = "datagram"
        hello["client"] = client
        hello["pad"] = ""
        msg = pack_message(HELLO, 0, json.dumps(hello).encode("utf-8"))
        if len(msg) < MIN_HELLO_DATAGRAM:
            hello["pad"] = " " * (MIN_HELLO_DATAGRAM - len(msg))
            msg = pack_message(HELLO, 0, json.dumps(hello).encode("utf-8"))
        return msg

    def handshake(self, timeout_s=None):
        """Send HELLO until the host's WELCOME for it arrives (``hello_attempts`` tries, the wait doubling from
        ``hello_first_wait_s``); raises Refused, or ProtocolError when no answer came."""
        client = _client_token()
        msg = self._hello_datagram(client)
        wait_s = self.hello_first_wait_s
        for _ in range(self.hello_attempts):
            self._send(msg)
            self.hello_sent += 1
            t0 = now_ms()
            while elapsed_ms(t0) < wait_s * 1000.0:
                data = self.transport.recv(max(0.01, wait_s - elapsed_ms(t0) / 1000.0))
                if data is None:
                    continue
                ev = parse_datagram(data)
                if not isinstance(ev, Message):
                    self.garbage += 1
                    continue
                if ev.type == WELCOME:
                    w = parse_json(ev.body, "WELCOME")
                    if w.get("client") != client:
                        continue  # the answer to an older HELLO
                    self._welcomed(w)
                    return w
                if ev.type == REFUSE:
                    r = parse_json(ev.body, "REFUSE")
                    if r.get("client") in (None, client):
                        raise Refused(r.get("code", 0), r.get("reason", ""))
            wait_s *= 2
        raise ProtocolError("no WELCOME from the host after %d HELLO datagrams" % self.hello_attempts)

    def _welcomed(self, w):
        self.welcome = w
        if self.key is not None:
            self.auth = welcome_auth(self.key, w)
        self.last_rx_ms = now_ms()

    def poll(self, timeout_s=0.0):
        """Read the datagrams that have arrived (waiting up to ``timeout_s`` for the first); returns Answers.
        A datagram that is not one valid message (or, with a key, one this session cannot verify) is ignored."""
        out = []
        wait = timeout_s
        while True:
            data = self.transport.recv(wait)
            if data is None:
                return out
            wait = 0.0
            ev = parse_datagram(data, self.auth)
            if not isinstance(ev, Message):
                self.garbage += 1
                continue
            if ev.type == WELCOME:
                continue  # a repeated WELCOME for the handshake already done
            try:
                out.extend(self.handle(ev))
            except ConnectionClosed as exc:
                exc.answers = out + getattr(exc, "answers", [])
                raise


class DatagramLink(object):
    """The device side of a datagram host (UDP, or a serial line in datagram mode), with the interface of
    ``lwfc.link.Link`` that the runner uses: ``connect``, ``submit(frames, tag)``, ``pump``, ``drain``,
    ``pending``, ``close``; every submitted tensor comes back exactly once as an Answer (RESULT, a host ERROR,
    or LOST when no answer came within ``answer_timeout_s``: a lost RESULT datagram is not resent)."""

    def __init__(self, url, hello, key=None, window=4, answer_timeout_s=10.0, keepalive_s=10.0,
                 interleave=True, log=None, transport_factory=None, hello_attempts=HELLO_ATTEMPTS):
        self.url = url
        self.hello = hello
        self.key = key
        self.window = window
        self.answer_timeout_s = answer_timeout_s
        self.keepalive_ms = keepalive_s * 1000.0
        self.interleave = interleave
        self.log = log
        self.transport_factory = transport_factory
        self.hello_attempts = hello_attempts
        self.transport = None
        self.session = None
        self.reconnects = 0
        self.datagrams = 0
        self.last_tx_ms = now_ms()

    def _open(self):
        if self.transport_factory is not None:
            return self.transport_factory()
        from .transport import open_transport

        return open_transport(self.url)

    def connect(self):
        """Open the transport and complete the handshake (raises Refused, ProtocolError, OSError)."""
        if self.transport is None:
            self.transport = self._open()
        self.session = DatagramSession(self.transport, self.hello, self.key, self.answer_timeout_s,
                                       self.hello_attempts)
        try:
            return self.session.handshake()
        except BaseException:
            self.session = None
            raise

    def _rehandshake(self, why):
        """The host has forgotten the session (NO_SESSION, or silence for its idle timeout): the tensors it did not
        answer are LOST; say HELLO again."""
        answers = self.session.fail_all(why) if self.session else []
        if self.log is not None:
            self.log("session lost (%s): %d tensors lost; new handshake" % (why, len(answers)))
        try:
            self.connect()
            self.reconnects += 1
        except (OSError, Refused, ProtocolError) as exc:
            err = ConnectionClosed("cannot restart the session with %s: %s" % (self.url, exc))
            err.answers = answers
            raise err from None
        return answers

    def _take(self, answers):
        """Answers, and a new handshake when one of them says the host has no session for us."""
        out = []
        forgotten = False
        for a in answers:
            out.append(a)
            if a.kind == "error" and a.code == E_NO_SESSION:
                forgotten = True
        if forgotten:
            out.extend(self._rehandshake("the host answered NO_SESSION"))
        return out

    def pump(self, timeout_s=0.0):
        """Read answers (waiting up to ``timeout_s``), expire old tensors, keep the session alive."""
        s = self.session
        if s is None:
            return self._rehandshake("not connected")
        answers = s.poll(timeout_s)
        answers.extend(s.expire())
        silent_ms = elapsed_ms(s.last_rx_ms)
        limit_ms = 1000.0 * float((s.welcome or {}).get("timeout_s", 30.0))
        if silent_ms > limit_ms and silent_ms > self.keepalive_ms:
            # nothing verifiable from the host for its idle timeout, keep-alives included: it has forgotten the
            # session (a restart; in an authenticated session its NO_SESSION cannot be verified) or is gone
            answers.extend(self._rehandshake("no answer from the host for %.0f s" % (silent_ms / 1000.0)))
            return self._take(answers)
        if elapsed_ms(self.last_tx_ms) > self.keepalive_ms:
            s.ping()
            self.last_tx_ms = now_ms()
        return self._take(answers)

    def submit(self, frames, tag=None):
        """Send one tensor's frames (``Encoder.encode_sliced``), waiting while ``window`` tensors are unanswered;
        returns the Answers that became known meanwhile."""
        answers = []
        try:
            if self.session is None:
                answers.extend(self._rehandshake("not connected"))
            while len(self.session.outstanding) >= self.window:
                answers.extend(self.pump(0.05))
            order = send_order(len(frames), self.interleave)
            self.session.send_slices([frames[i] for i in order], tag)
            self.datagrams += len(frames)
            self.last_tx_ms = now_ms()
            answers.extend(self.pump(0.0))
        except ConnectionClosed as exc:
            exc.answers = answers + getattr(exc, "answers", [])
            raise
        return answers

    def pending(self):
        return len(self.session.outstanding) if self.session else 0

    def drain(self, timeout_s=None):
        """Pump until every tensor is answered or LOST."""
        answers = []
        t0 = now_ms()
        limit = (timeout_s if timeout_s is not None else self.answer_timeout_s + 1.0) * 1000.0
        try:
            while self.pending() and elapsed_ms(t0) < limit:
                answers.extend(self.pump(0.05))
        except ConnectionClosed as exc:
            exc.answers = answers + getattr(exc, "answers", [])
            raise
        if self.pending():
            answers.extend(self.session.fail_all("no answer before the end of the run"))
        return answers

    def close(self, reason="done"):
        if self.session is not None:
            self.session.bye(reason)
        if self.transport is not None:
            self.transport.close()
        self.session = None
        self.transport = None

