"""A device's link to the host: transport + session + bounded send queue + reconnection.

``Link.submit(frame, tag)`` queues a frame and sends what the window of unanswered frames allows;
``pump`` moves bytes both ways; ``drain`` waits for every answer. Every call returns the Answers that
became known, so the caller sees each submitted frame exactly once: as a RESULT, a host ERROR, LOST
(no answer in time, or the connection broke), DROPPED (the full queue dropped it) or SEND_FAILED
(the host could not be reached again). MicroPython-compatible Python 3.7.
"""

from .protocol import (
    E_DROPPED,
    E_LOST,
    E_SEND_FAILED,
    Answer,
    ConnectionClosed,
    Refused,
    Session,
    elapsed_ms,
    now_ms,
)
from .sendqueue import DROP_OLDEST, SendQueue
from .transport import Backoff, connect_with_backoff


class Slices(object):
    """One tensor's slice frames (``Encoder.encode_sliced``), queued as one item and sent as SLICE messages under
    one seq (a serial line in datagram mode, PROTOCOL.md 10.6); ``len()`` is their bytes, for the queue's limit."""

    def __init__(self, frames):
        self.frames = list(frames)
        self.size = 0
        for f in self.frames:
            self.size += len(f)

    def __len__(self):
        return self.size


class Link(object):
    """The device side of one host connection, reconnecting when it breaks."""

    def __init__(self, url, hello, key=None, window=8, queue_frames=16, queue_bytes=1 << 20,
                 policy=DROP_OLDEST, answer_timeout_s=30.0, keepalive_s=10.0, reconnect_attempts=8,
                 log=None, transport_factory=None):
        self.url = url
        self.hello = hello
        self.key = key
        self.window = window
        self.queue = SendQueue(queue_frames, queue_bytes, policy)
        self.answer_timeout_s = answer_timeout_s
        self.keepalive_ms = keepalive_s * 1000.0
        self.reconnect_attempts = reconnect_attempts
        self.log = log
        self.transport_factory = transport_factory
        self.session = None
        self.transport = None
        self.backoff = Backoff()
        self.reconnects = 0
        self.last_tx_ms = now_ms()

    def _open(self):
        if self.transport_factory is not None:
            return self.transport_factory()
        return connect_with_backoff(self.url, self.reconnect_attempts, self.backoff, self.log)

    def connect(self):
        """Open the transport and complete the handshake (raises Refused, ConnectionClosed, ...)."""
        self.transport = self._open()
        self.session = Session(self.transport, self.hello, self.key, self.answer_timeout_s)
        try:
            return self.session.handshake()
        except BaseException:
            self.transport.close()
            self.transport = None
            self.session = None
            raise

    def _broken(self, why):
        """The connection broke: its unanswered frames are LOST; reconnect for the queued ones."""
        answers = self.session.fail_all(why) if self.session else []
        if self.transport is not None:
            self.transport.close()
        self.transport = None
        self.session = None
        if self.log is not None:
            self.log("link broken (%s); %d frames lost, %d queued; reconnecting" % (why, len(answers), len(self.queue)))
        try:
            self.connect()
            self.reconnects += 1
        except (OSError, Refused) as exc:
            # the host is gone for good: everything still queued fails, visibly
            while len(self.queue):
                _frame, tag = self.queue.pop()
                answers.append(Answer(0, "error", E_SEND_FAILED, "cannot reconnect: %s" % exc, tag=tag))
            err = ConnectionClosed("cannot reconnect to %s: %s" % (self.url, exc))
            err.answers = answers  # the caller still learns what became of every frame
            raise err from None
        return answers

    def pump(self, timeout_s=0.0):
        """Send queued frames the window allows, read answers (waiting up to ``timeout_s``), expire old
        ones, keep the link alive. Returns Answers."""
        answers = []
        try:
            if self.session is None:  # a reconnection failed earlier: try again
                answers.extend(self._broken("not connected"))
            s = self.session
            while len(self.queue) and len(s.outstanding) < self.window:
                frame, tag = self.queue.pop()
                if isinstance(frame, Slices):
                    s.send_slices(frame.frames, tag)
                else:
                    s.send_frame(frame, tag)
                self.last_tx_ms = now_ms()
            answers.extend(s.poll(timeout_s))
            answers.extend(s.expire())
            if elapsed_ms(self.last_tx_ms) > self.keepalive_ms:
                s.ping()
                self.last_tx_ms = now_ms()
        except ConnectionClosed as exc:
            answers.extend(getattr(exc, "answers", []))
            try:
                answers.extend(self._broken(str(exc)))
            except ConnectionClosed as final:
                final.answers = answers + getattr(final, "answers", [])
                raise
        return answers

    def submit(self, frame, tag=None):
        """Queue a frame (bytes) or one tensor's ``Slices``; returns the Answers that became known meanwhile
        (DROPPED ones included)."""
        answers = []
        try:
            while True:
                ok, dropped = self.queue.put(frame, tag)
                for _f, t in dropped:
                    answers.append(Answer(0, "error", E_DROPPED, "send queue full (drop-oldest)", tag=t))
                if ok:
                    break
                answers.extend(self.pump(0.05))  # block policy: make room by draining the link
            answers.extend(self.pump(0.0))
        except ConnectionClosed as exc:
            exc.answers = answers + getattr(exc, "answers", [])
            raise
        return answers

    def pending(self):
        return len(self.queue) + (len(self.session.outstanding) if self.session else 0)

    def drain(self, timeout_s=None):
        """Pump until every frame is answered (or LOST after the answer timeout)."""
        answers = []
        t0 = now_ms()
        limit = (timeout_s if timeout_s is not None else self.answer_timeout_s + 5.0) * 1000.0
        try:
            while self.pending() and elapsed_ms(t0) < limit:
                answers.extend(self.pump(0.05))
        except ConnectionClosed as exc:
            exc.answers = answers + getattr(exc, "answers", [])
            raise
        if self.pending():
            why = "no answer before the end of the run"
            if self.session is not None:
                answers.extend(self.session.fail_all(why))
            while len(self.queue):
                _frame, tag = self.queue.pop()
                answers.append(Answer(0, "error", E_LOST, why + " (never sent)", tag=tag))
        return answers

    def close(self, reason="done"):
        if self.session is not None:
            self.session.bye(reason)
        if self.transport is not None:
            self.transport.close()
        self.session = None
        self.transport = None
