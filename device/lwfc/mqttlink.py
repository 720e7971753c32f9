"""The device side of an MQTT link (codec_spec/PROTOCOL.md 11): frames go to ``PREFIX/DEVICE/data`` through a
broker, a pool of workers shares them, the answers come back on ``PREFIX/DEVICE/result``.

There is no connection to a host, so there is no handshake nonce and no ordered stream: the device names its run
with a random 16-byte session id (the nonce of every tag), publishes each frame with QoS 1, keeps at most
``window`` frames unanswered, publishes a frame again with the same seq and bytes when its answer is overdue
(``lwfc.retry.RetryWindow``), drops answers for seqs already answered, and counts a frame LOST at its deadline.
Workers are deterministic, so a frame answered twice (it was published again, or the broker delivered it twice)
gets the same answer both times; the caller sees each frame exactly once.

``MqttLink`` has the interface of ``lwfc.link.Link`` that the runner uses (``connect``, ``submit``, ``pump``,
``drain``, ``pending``, ``close``). It talks to any client with the API of ``umqtt.simple.MQTTClient``
(``lwfc.mqttclient``): umqtt.simple itself on a MicroPython board, paho-mqtt behind the same API on CPython.

MicroPython-compatible Python 3.7.
"""

import json

from .mqtt import data_topic, new_session_id, pack, result_topic, session_auth, unpack, valid_device
from .protocol import (
    DATA,
    E_BAD_MESSAGE,
    ERROR,
    ERROR_NAMES,
    HELLO,
    PROTOCOL_VERSION,
    REFUSE,
    RESULT,
    WELCOME,
    ConnectionClosed,
    Message,
    ProtocolError,
    Refused,
    elapsed_ms,
    next_seq,
    now_ms,
    parse_json,
    unpack_error,
)
from .retry import RetryWindow
from .transport import Backoff, TransportError, parse_address

try:
    from time import sleep_ms as _sleep_ms
except ImportError:
    from time import sleep as _sleep

    def _sleep_ms(ms):
        _sleep(ms / 1000.0)

HELLO_ATTEMPTS = 5
HELLO_FIRST_WAIT_S = 1.0  # doubled after each unanswered HELLO: 1, 2, 4, 8, 16 s


class MqttLink(object):
    """A device's link through an MQTT broker to a pool of workers (PROTOCOL.md 11)."""

    def __init__(self, url, hello, key=None, window=4, answer_timeout_s=30.0, first_timeout_s=5.0, login=None,
                 keepalive_s=30, log=None, client_factory=None, hello_attempts=HELLO_ATTEMPTS,
                 hello_first_wait_s=HELLO_FIRST_WAIT_S, reconnect_attempts=8):
        _scheme, target, _opts = parse_address(url)
        self.url = url
        self.prefix = target[2]
        self.hello = dict(hello)
        self.device = self.hello["device"]
        if not valid_device(self.device):
            raise TransportError("device name %r cannot be an MQTT topic level (1-64 printable characters, none of "
                                 "'/', '+', '#')" % (self.device,))
        self.key = key
        self.session = new_session_id()
        self.auth = session_auth(key, self.session)
        self.window_size = max(1, window)
        self.window = RetryWindow(answer_timeout_s, first_timeout_s)
        self.login = login
        self.keepalive_s = keepalive_s
        self.log = log
        self.client_factory = client_factory
        self.hello_attempts = hello_attempts
        self.hello_first_wait_s = hello_first_wait_s
        self.reconnect_attempts = reconnect_attempts
        self.data_topic = data_topic(self.prefix, self.device)
        self.result_topic = result_topic(self.prefix, self.device)
        self.client_id = "lwfc-%s-%s" % (self.device, "".join("%02x" % b for b in self.session[:4]))
        self.client = None
        self.inbox = []
        self.seq = 0
        self.welcome = None
        self.reconnects = 0
        self.unverified = 0  # answers for this session that do not verify: forged, or a key the workers do not share
        self.last_unverified = ""
        self.foreign = 0  # answers for another session (an earlier run of this device name)
        self.last_tx_ms = now_ms()

    # --- the broker connection ----------------------------------------------------------------------------

    def _on_message(self, topic, msg):
        self.inbox.append(bytes(msg))

    def _open(self):
        if self.client_factory is not None:
            client = self.client_factory()
        else:
            from .mqttclient import open_client

            client = open_client(self.url, self.client_id, self.login, self.keepalive_s)
        client.set_callback(self._on_message)
        # A clean session: answers published while the device was away are gone, and its overdue frames get them
        # again when they are published again. The broker keeps nothing for a device that never comes back.
        client.connect(True)
        try:
            client.subscribe(self.result_topic, 1)
        except BaseException:
            self._close_client(client)
            raise
        self.client = client
        self.last_tx_ms = now_ms()

    @staticmethod
    def _close_client(client):
        try:
            client.disconnect()
        except (OSError, AttributeError):
            pass

    def _reconnect(self, why):
        """The broker connection broke: connect again (with backoff). Unanswered frames stay in the window and are
        published again when due; ConnectionClosed, with every one of them LOST, when the broker stays away."""
        if self.client is not None:
            self._close_client(self.client)
            self.client = None
        if self.log is not None:
            self.log("broker connection lost (%s); %d frames unanswered; reconnecting" % (why, len(self.window)))
        backoff = Backoff()
        last = why
        for i in range(self.reconnect_attempts):
            try:
                self._open()
                self.reconnects += 1
                return
            except OSError as exc:
                last = str(exc)
                if i + 1 < self.reconnect_attempts:
                    backoff.wait()
        err = ConnectionClosed("cannot reconnect to the broker of %s: %s" % (self.url, last))
        err.answers = self.window.fail_all("broker unreachable: %s" % last)
        raise err

    def _publish(self, payload):
        self.client.publish(self.data_topic, payload, False, 1)
        self.last_tx_ms = now_ms()

    # --- receiving -------------------------------------------------------------------------------------------

    def _receive(self, timeout_s):
        """This session's verified messages among those arrived (waiting up to ``timeout_s`` for the first)."""
        t0 = now_ms()
        while True:
            while self.client.check_msg() is not None:
                pass
            if self.inbox or elapsed_ms(t0) >= timeout_s * 1000.0:
                break
            _sleep_ms(2)
        out = []
        inbox, self.inbox = self.inbox, []
        for payload in inbox:
            session, ev = unpack(payload, self.auth)
            if session != self.session:
                self.foreign += 1
            elif isinstance(ev, Message):
                out.append(ev)
            elif ev is not None:
                self._unverified(payload)
        return out

    def _unverified(self, payload):
        """An answer for this session that does not verify. A worker that cannot verify a message answers it
        untagged (ERROR AUTH): keep its words for the report, act on nothing."""
        self.unverified += 1
        _session, plain = unpack(payload)
        if isinstance(plain, Message) and plain.type == ERROR:
            try:
                code, _count, text = unpack_error(plain.body)
            except ProtocolError:
                return
            self.last_unverified = "%s %s" % (ERROR_NAMES.get(code, code), text)

    def _handle(self, msg):
        """The Answers one verified message gives."""
        w = self.window
        if msg.type == RESULT:
            try:
                a = w.answer(msg.seq, "result", result=parse_json(msg.body, "RESULT"))
            except ProtocolError as exc:
                a = w.answer(msg.seq, "error", E_BAD_MESSAGE, str(exc))
            return [a] if a is not None else []
        if msg.type == ERROR:
            try:
                code, count, text = unpack_error(msg.body)
            except ProtocolError as exc:
                code, count, text = E_BAD_MESSAGE, 1, str(exc)
            out = []
            s = msg.seq
            for _ in range(count):
                a = w.answer(s, "error", code, text)
                if a is not None:
                    out.append(a)
                s = next_seq(s)
            return out
        if msg.type == REFUSE and self.log is not None:  # a worker that serves another bundle: its answer stands
            self.log("a worker refused this device: %s" % bytes(msg.body).decode("utf-8", "replace"))
        return []

    # --- the link ------------------------------------------------------------------------------------------

    def connect(self):
        """Connect to the broker, subscribe to the result topic and publish HELLO until a worker answers WELCOME
        (``hello_attempts`` tries, the wait doubling); raises Refused, ProtocolError, or OSError."""
        self._open()
        hello = dict(self.hello)
        hello["protocol"] = PROTOCOL_VERSION
        hello["auth"] = self.key is not None
        hello["transport"] = "mqtt"
        payload = pack(self.session, HELLO, 0, json.dumps(hello).encode("utf-8"), self.auth)
        wait_s = self.hello_first_wait_s
        for _ in range(self.hello_attempts):
            self._publish(payload)
            t0 = now_ms()
            while elapsed_ms(t0) < wait_s * 1000.0:
                for msg in self._receive(0.05):
                    if msg.type == WELCOME:
                        self.welcome = parse_json(msg.body, "WELCOME")
                        return self.welcome
                    if msg.type == REFUSE:
                        r = parse_json(msg.body, "REFUSE")
                        raise Refused(r.get("code", 0), r.get("reason", ""))
            wait_s *= 2
        hint = ""
        if self.unverified:
            hint = " (%d answers did not verify: does the host hold this device's key? last: %s)" % (
                self.unverified, self.last_unverified)
        raise ProtocolError("no WELCOME from a worker on %s after %d HELLO messages%s"
                            % (self.url, self.hello_attempts, hint))

    def pump(self, timeout_s=0.0):
        """Take the answers that arrived (waiting up to ``timeout_s``), publish overdue frames again, expire those
        past their deadline, keep the broker connection alive. Returns Answers."""
        answers = []
        try:
            if self.client is None:
                self._reconnect("not connected")
            for msg in self._receive(timeout_s):
                answers.extend(self._handle(msg))
            for _seq, payload in self.window.due():
                self._publish(payload)
            if elapsed_ms(self.last_tx_ms) > self.keepalive_s * 500.0:
                self.client.ping()
                self.last_tx_ms = now_ms()
        except OSError as exc:
            try:
                self._reconnect(str(exc))
            except ConnectionClosed as final:
                final.answers = answers + final.answers
                raise
        answers.extend(self.window.expire())
        return answers

    def submit(self, frame, tag=None):
        """Publish one frame as DATA, first waiting while ``window`` frames are unanswered; returns the Answers
        that became known meanwhile."""
        answers = []
        try:
            while len(self.window) >= self.window_size:
                answers.extend(self.pump(0.02))
            self.seq = next_seq(self.seq)
            payload = pack(self.session, DATA, self.seq, frame, self.auth)
            self.window.add(self.seq, payload, tag)  # first: whatever happens next, the frame is accounted for
            try:
                self._publish(payload)
            except OSError as exc:  # published again when due, after the reconnection
                self._reconnect(str(exc))
            answers.extend(self.pump(0.0))
        except ConnectionClosed as exc:
            exc.answers = answers + getattr(exc, "answers", [])
            raise
        return answers

    def pending(self):
        return len(self.window)

    def drain(self, timeout_s=None):
        """Pump until every frame is answered or LOST."""
        answers = []
        t0 = now_ms()
        limit = (timeout_s if timeout_s is not None else self.window.deadline_ms / 1000.0 + 1.0) * 1000.0
        try:
            while len(self.window) and elapsed_ms(t0) < limit:
                answers.extend(self.pump(0.05))
        except ConnectionClosed as exc:
            exc.answers = answers + getattr(exc, "answers", [])
            raise
        answers.extend(self.window.fail_all("no answer before the end of the run"))
        return answers

    def close(self, reason="done"):
        if self.client is not None:
            self._close_client(self.client)
        self.client = None

