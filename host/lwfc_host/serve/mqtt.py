"""The MQTT worker (codec_spec/PROTOCOL.md 11): one of a pool of ``lwfc serve --mqtt`` processes, on any number
of machines, that share the devices' frames through a broker.

Each worker joins the shared subscription ``$share/GROUP/PREFIX/+/data`` (MQTT 5), so the broker hands every
frame to one worker of the group, and publishes the answer to ``PREFIX/DEVICE/result``. There is no connection
per device and no handshake nonce: every message carries the device's session id (``lwfc.mqtt``), a device's key
verifies its tags in any worker, and a replay window per session (``ReplayGuard``) turns a frame delivered again
into the answer it got before. The frame format, the cloud half and the ERROR codes are those of the byte-stream
server (``Server.work``); a message that is malformed or cannot be verified is answered ERROR on the device's
result topic (untagged: nothing it says can be trusted) when the topic names a device, and never stops the
worker.

Delivery: the worker subscribes with QoS 1 in a clean session that expires with its connection (a dead worker's
undelivered frames are not kept for it) and acknowledges a frame only after its answer is published; frames a
worker took with it when it died are published again by their devices when their answers are overdue.
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import socket
import threading
import time
from typing import TYPE_CHECKING, Any, Protocol

from lwfc import mqtt as M
from lwfc import protocol as P
from lwfc.mqttclient import no_delay
from lwfc.transport import parse_address
from lwfc_host.serve.config import ServerError
from lwfc_host.serve.connection import check_hello
from lwfc_host.serve.replay import CACHED, REPLAY, TOO_FAR, ReplayGuard

if TYPE_CHECKING:
    from lwfc_host.serve.cloud import CloudModel
    from lwfc_host.serve.config import ServerConfig
    from lwfc_host.serve.metrics import Metrics

DEFAULT_GROUP = "lwfc"
ZERO_SESSION = bytes(M.SESSION_SIZE)  # in an answer to a payload too short to hold a session id
Publish = tuple[str, bytes]  # (topic, payload)


class Host(Protocol):
    """What a worker uses of its server (``lwfc_host.serve.server.Server``)."""

    model: CloudModel
    config: ServerConfig
    max_message: int
    metrics: Metrics

    def emit(self, record: dict[str, Any]) -> None: ...

    def work(self, frame: bytes, session_table: bytes | None) -> tuple[str, Any]: ...


class MqttWorker:
    """One worker of a pool: a paho-mqtt (MQTT 5) client, ``server.config.workers`` threads that decode and answer,
    and a replay window. ``start()`` returns once the shared subscription is acknowledged; ``stop()`` ends it.

    With device keys configured (``server.config.keys``), every device must authenticate: over a broker anyone
    who may publish can publish on any device's topic."""

    def __init__(self, server: Host, url: str, group: str = DEFAULT_GROUP, login: tuple[str, str] | None = None,
                 name: str | None = None):
        scheme, target, opts = parse_address(url)
        if scheme not in ("mqtt", "mqtts"):
            raise ServerError(f"--mqtt {url!r} must be mqtt://HOST:PORT/PREFIX or mqtts://HOST:PORT/PREFIX")
        if not group or any(ch in group for ch in "/+#"):
            raise ServerError(f"MQTT group {group!r} must be one topic level (no '/', '+', '#')")
        self.server = server
        self.url = url
        self.host, self.port, self.prefix = target
        self.tls = scheme == "mqtts"
        self.ca = opts.get("ca")
        self.group = group
        self.login = login
        self.name = name or f"lwfc-worker-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.filter = M.shared_data_filter(group, self.prefix)
        cfg = server.config
        self.require_auth = cfg.require_auth or bool(cfg.keys)
        self.guard = ReplayGuard(max_gap=cfg.max_seq_gap)
        self.inbox: queue.Queue[Any] = queue.Queue()
        self.threads: list[threading.Thread] = []
        self.client: Any = None
        self.subscribed = threading.Event()
        self.refused: str | None = None
        self.counts = {"received": 0, "answered": 0, "cached": 0, "replays": 0, "unverified": 0, "malformed": 0,
                       "no_device": 0, "failures": 0}
        self.lock = threading.Lock()

    # --- what to answer ---------------------------------------------------------------------------------------

    def _count(self, what: str) -> None:
        with self.lock:
            self.counts[what] += 1

    def _error(self, device: str, session: bytes, seq: int, code: int, text: str, auth: P.Auth | None) -> Publish:
        with self.server.metrics.lock:
            self.server.metrics.errors[P.ERROR_NAMES.get(code, str(code))] += 1
        self.server.emit({"event": "error", "peer": "mqtt", "device": device, "seq": seq,
                          "code": P.ERROR_NAMES.get(code, code), "message": text})
        return M.result_topic(self.prefix, device), M.pack(session, P.ERROR, seq, P.error_body(code, text), auth)

    def handle(self, topic: str, payload: bytes) -> list[Publish]:
        """The messages to publish in answer to one message on a data topic. Never raises for bad input."""
        self._count("received")
        device = M.device_of(topic, self.prefix)
        if device is None:  # no device to answer: the topic is not PREFIX/DEVICE/data with a valid name
            self._count("no_device")
            return []
        cfg = self.server.config
        key = cfg.keys.get(device)
        if len(payload) < M.SESSION_SIZE:
            self._count("malformed")
            return [self._error(device, ZERO_SESSION, 0, P.E_BAD_MESSAGE,
                                f"payload of {len(payload)} bytes: too short for a session id and a message", None)]
        session = bytes(payload[:M.SESSION_SIZE])
        if key is None and self.require_auth:
            self._count("unverified")
            why = f"no key for device {device!r}: this worker takes authenticated devices only"
            _, plain = M.unpack(payload, None, self.server.max_message)
            if isinstance(plain, P.Message) and plain.type == P.HELLO:  # an answer the device can act on
                return [(M.result_topic(self.prefix, device),
                         M.pack(session, P.REFUSE, 0, json.dumps({"code": P.R_AUTH, "reason": why}).encode()))]
            return [self._error(device, session, _seq_of(payload), P.E_AUTH, why, None)]
        auth = M.session_auth(key, session)
        _, ev = M.unpack(payload, auth, self.server.max_message)
        if not isinstance(ev, P.Message):
            return [self._unusable(device, session, payload, ev)]
        if ev.flags & ~P.FLAG_AUTH:
            self._count("malformed")
            return [self._error(device, session, ev.seq, P.E_BAD_MESSAGE, f"reserved flag bits set: 0x{ev.flags:02x}",
                                auth)]
        if ev.type == P.DATA:
            return self._on_data(device, session, ev, auth)
        if ev.type == P.HELLO:
            return [self._on_hello(device, session, ev, auth)]
        if ev.type == P.PING:
            return [(M.result_topic(self.prefix, device), M.pack(session, P.PONG, ev.seq, bytes(ev.body[:64]), auth))]
        self._count("malformed")
        why = ("over MQTT a tensor travels as one DATA message" if ev.type == P.SLICE
               else f"unexpected message type {ev.type} on a data topic")
        return [self._error(device, session, ev.seq, P.E_BAD_TYPE, why, auth)]

    def _unusable(self, device: str, session: bytes, payload: bytes, ev: Any) -> Publish:
        """ERROR for a payload whose message is not one (BAD_MESSAGE or TOO_LARGE), is corrupt (CORRUPT) or does not
        verify (AUTH). Untagged: nothing in it can be trusted, so the device acts on none of it (PROTOCOL.md 8)."""
        if ev is None:
            self._count("malformed")
            size = len(payload) - M.SESSION_SIZE
            if size > self.server.max_message + P.ENVELOPE_SIZE + P.TAG_SIZE:
                return self._error(device, session, _seq_of(payload), P.E_TOO_LARGE,
                                   f"message of {size} bytes exceeds the limit {self.server.max_message}", None)
            return self._error(device, session, _seq_of(payload), P.E_BAD_MESSAGE,
                               f"the {size} bytes after the session id are not one message (PROTOCOL.md 2)", None)
        kind, mtype, seq, length = ev
        if kind == P.CORRUPT:
            self._count("malformed")
            return self._error(device, session, seq, P.E_CORRUPT, f"body of {length} bytes failed its CRC", None)
        self._count("unverified")
        self.server.emit({"event": "unverified", "peer": "mqtt", "device": device, "type": mtype, "seq": seq,
                          "bytes": length})
        return self._error(device, session, seq, P.E_AUTH, "missing or wrong tag (is the device's key the "
                                                           "worker's?)", None)

    def _on_hello(self, device: str, session: bytes, msg: P.Message, auth: P.Auth | None) -> Publish:
        """WELCOME or REFUSE for a device's HELLO: the checks of PROTOCOL.md 5.1, and the HELLO must name the device
        of its topic. No nonce: the device's session id is the nonce."""
        rt = M.result_topic(self.prefix, device)
        try:
            hello = P.parse_json(msg.body, "HELLO")
            refusal = check_hello(self.server.model, self.server.config, hello)
        except P.ProtocolError as exc:
            refusal = (P.R_BAD_HELLO, str(exc))
        if refusal is None and hello.get("device") != device:
            refusal = (P.R_BAD_HELLO, f"HELLO names device {hello.get('device')!r} on the topic of {device!r}")
        if refusal is not None:
            with self.server.metrics.lock:
                self.server.metrics.refused += 1
            self.server.emit({"event": "refuse", "peer": "mqtt", "device": device,
                              "code": P.REFUSE_NAMES.get(refusal[0]), "reason": refusal[1]})
            return rt, M.pack(session, P.REFUSE, 0, json.dumps({"code": refusal[0], "reason": refusal[1]}).encode(),
                              auth)
        cfg = self.server.config
        welcome = {"protocol": P.PROTOCOL_VERSION, "session": session.hex(), "transport": "mqtt",
                   "max_message": self.server.max_message, "classes": len(self.server.model.class_names),
                   "timeout_s": cfg.idle_timeout_s, "worker": self.name}
        self.server.emit({"event": "session", "peer": "mqtt", "device": device, "session": session.hex(),
                          "auth": auth is not None, "transport": "mqtt"})
        return rt, M.pack(session, P.WELCOME, 0, json.dumps(welcome).encode(), auth)

    def _on_data(self, device: str, session: bytes, msg: P.Message, auth: P.Auth | None) -> list[Publish]:
        rt = M.result_topic(self.prefix, device)
        verdict, cached = self.guard.check(device, session, msg.seq)
        if verdict == CACHED:
            self._count("cached")
            return [(rt, cached)]
        if verdict == REPLAY:
            self._count("replays")
            self.server.emit({"event": "replay", "peer": "mqtt", "device": device, "seq": msg.seq})
            return []
        if verdict == TOO_FAR:
            return [self._error(device, session, msg.seq, P.E_BAD_MESSAGE, f"seq {msg.seq} is more than "
                                f"{self.guard.max_gap} ahead of this session's highest", auth)]
        frame = bytes(msg.body)
        t0 = time.perf_counter()
        try:
            kind, out = self.server.work(frame, None)  # the frame names its table; any table this host holds
        except Exception as exc:  # noqa: BLE001 - a bug in decoding must not stop the worker
            kind, out = "error", (P.E_INFERENCE, f"internal error: {type(exc).__name__}: {exc}")
        if kind == "error":
            answer = self._error(device, session, msg.seq, out[0], out[1], auth)[1]
        else:
            result, n_el, dec_ms, inf_ms = out
            answer = M.pack(session, P.RESULT, msg.seq, json.dumps(result).encode(), auth)
            self._account(device, msg.seq, len(frame), result, n_el, dec_ms, inf_ms, t0)
        self.guard.record(device, session, msg.seq, answer)
        self._count("answered")
        return [(rt, answer)]

    def _account(self, device: str, seq: int, nbytes: int, result: dict[str, Any], n_el: int, dec_ms: float,
                 inf_ms: float, t0: float) -> None:
        total_ms = (time.perf_counter() - t0) * 1000
        m = self.server.metrics
        with m.lock:
            m.frames += 1
            m.bytes += nbytes
            m.elements += n_el
            m.decode_ms.append(dec_ms)
            m.infer_ms.append(inf_ms)
            m.total_ms.append(total_ms)
        self.server.emit({"event": "frame", "peer": "mqtt", "device": device, "seq": seq, "bytes": nbytes,
                          "bits_per_element": result["bits_per_element"], "decode_ms": round(dec_ms, 3),
                          "infer_ms": round(inf_ms, 3), "server_ms": round(total_ms, 3)})

    # --- the broker ---------------------------------------------------------------------------------------------

    def start(self, timeout_s: float = 15.0) -> None:
        """Connect (MQTT 5, clean start, no session kept after the connection), join the shared subscription and
        start the decoding threads; ServerError when the broker cannot be reached or refuses."""
        import paho.mqtt.client as mqtt

        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.name, protocol=mqtt.MQTTv5,
                        manual_ack=True)
        if self.login is not None:
            c.username_pw_set(*self.login)
        if self.tls:
            c.tls_set(ca_certs=self.ca)
        c.on_connect = self._on_connect
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message
        c.on_socket_open = no_delay
        c.reconnect_delay_set(1, 5)  # a broker that restarts gets its workers back within seconds
        self.client = c
        try:
            c.connect(self.host, self.port, keepalive=30, clean_start=True)
        except (OSError, ValueError) as exc:
            raise ServerError(f"cannot reach the MQTT broker {self.host}:{self.port}: {exc}") from exc
        c.loop_start()
        if not self.subscribed.wait(timeout_s) or self.refused:
            c.loop_stop()
            raise ServerError(f"MQTT broker {self.host}:{self.port}: {self.refused or 'no SUBACK'} for {self.filter}")
        for k in range(max(1, self.server.config.workers)):
            th = threading.Thread(target=self._work_loop, name=f"lwfc-mqtt-{k}", daemon=True)
            th.start()
            self.threads.append(th)

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            self.refused = f"connection refused ({reason_code})"
            self.subscribed.set()
            return
        # subscribe on every (re)connection: a clean start keeps no subscription
        client.subscribe(self.filter, qos=1)

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        if any(rc.is_failure for rc in reason_codes):
            self.refused = f"subscription refused ({', '.join(str(rc) for rc in reason_codes)})"
        self.subscribed.set()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        # paho's network thread: hand the message over and return at once
        self.inbox.put((msg.topic, msg.payload, msg.mid, msg.qos))

    def _work_loop(self) -> None:
        while True:
            item = self.inbox.get()
            if item is None:
                return
            topic, payload, mid, qos = item
            try:
                answers = self.handle(topic, payload)
                for rt, body in answers:
                    self.client.publish(rt, body, qos=1)
            except Exception as exc:  # noqa: BLE001 - one message must never stop the worker
                self._count("failures")
                self.server.emit({"event": "mqtt_error", "topic": topic, "why": f"{type(exc).__name__}: {exc}"})
            finally:
                # acknowledged after the answer is queued: a broker that redelivers unacknowledged messages of a
                # dead subscriber hands this frame to another worker
                if qos:
                    self.client.ack(mid, qos)

    def status(self) -> dict[str, Any]:
        with self.lock:
            return {"url": self.url, "filter": self.filter, "worker": self.name, **self.counts}

    def stop(self) -> None:
        """Leave the broker: frames not yet taken stay with the broker for the other workers; those taken are
        answered first."""
        if self.client is None:
            return
        try:
            self.client.unsubscribe(self.filter)
        except Exception:  # noqa: BLE001 - leaving anyway
            pass
        for _ in self.threads:
            self.inbox.put(None)
        for th in self.threads:
            th.join(30)
        self.client.disconnect()
        self.client.loop_stop()


def _seq_of(payload: bytes) -> int:
    """The seq field of a payload's message header, for an answer when the message itself is unusable; 0 when the
    payload is too short to have one."""
    head = payload[M.SESSION_SIZE:M.SESSION_SIZE + 8]
    return int.from_bytes(head[4:8], "little") if len(head) == 8 else 0
