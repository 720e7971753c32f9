"""An MQTT client with the API of MicroPython's ``umqtt.simple.MQTTClient`` (micropython-lib), which is what
``lwfc.mqttlink`` talks to (PROTOCOL.md 11):

    client = MQTTClient(client_id, server, port, user, password, keepalive, ssl, ssl_params)
    client.set_callback(f)            # f(topic: bytes, msg: bytes), called from check_msg / wait_msg / publish
    client.connect(clean_session=True)
    client.subscribe(topic, qos)      # waits for SUBACK
    client.publish(topic, msg, retain, qos)  # qos 1 waits for PUBACK
    client.check_msg()                # one waiting message to the callback, or None at once
    client.ping(); client.disconnect()

``open_client`` gives ``umqtt.simple.MQTTClient`` itself on a MicroPython board (publish/subscribe over a plain
socket), and on CPython ``PahoClient``: the same API over paho-mqtt, imported only there (like pyserial in
``lwfc.transport``), so nothing a MicroPython board imports needs paho.
"""

from .transport import MQTT_PORTS, TransportError, parse_address


def open_client(url, client_id, login=None, keepalive=30):
    """An unconnected client for the broker of ``mqtt[s]://HOST:PORT/PREFIX``: umqtt.simple where paho-mqtt is not
    installed (MicroPython), else ``PahoClient``. ``login``: (username, password) or None."""
    scheme, target, opts = parse_address(url)
    if scheme not in MQTT_PORTS:
        raise TransportError("%s is not an mqtt:// or mqtts:// address" % url)
    host, port, _prefix = target
    user, password = login if login else (None, None)
    tls = scheme == "mqtts"
    try:
        import paho.mqtt.client  # noqa: F401 - only to learn whether this is CPython with paho-mqtt
    except ImportError:
        try:
            from umqtt.simple import MQTTClient  # type: ignore
        except ImportError:
            raise TransportError("no MQTT client: install paho-mqtt (CPython) or umqtt.simple (MicroPython: "
                                 "mip.install('umqtt.simple'))") from None
        params = {"server_hostname": host}
        if "ca" in opts:  # MicroPython's ssl.wrap_socket takes the CA certificate's bytes, not a file name
            with open(opts["ca"], "rb") as f:
                params["cadata"] = f.read()
            params["cert_reqs"] = 2  # ssl.CERT_REQUIRED
        return MQTTClient(client_id, host, port, user, password, keepalive, tls or None, params)
    return PahoClient(client_id, host, port, user, password, keepalive, tls, {"ca_certs": opts.get("ca")})


class PahoClient(object):
    """umqtt.simple's API over paho-mqtt (CPython). paho's network thread takes the messages; ``check_msg`` and
    ``wait_msg`` hand them to the callback in the caller's thread, one per call, as umqtt.simple does. A lost
    connection raises OSError from the next call (no silent reconnection: the caller reconnects and subscribes
    again)."""

    def __init__(self, client_id, server, port=0, user=None, password=None, keepalive=0, ssl=False,
                 ssl_params=None):
        self.client_id = client_id
        self.server = server
        self.port = port or (8883 if ssl else 1883)
        self.user = user
        self.password = password
        self.keepalive = keepalive or 60
        self.ssl = ssl
        self.ssl_params = ssl_params or {}
        self.cb = None
        self.client = None
        self.timeout_s = 10.0

    def set_callback(self, f):
        self.cb = f

    def connect(self, clean_session=True, timeout=None):
        """Connect and wait for CONNACK; OSError when the broker cannot be reached or refuses."""
        import queue
        import threading

        import paho.mqtt.client as mqtt

        self.inbox = queue.Queue()
        self.broken = None
        self.connected = threading.Event()
        self.refused = None
        self.acks = {}  # SUBSCRIBE mid -> Event
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, clean_session=clean_session,
                        protocol=mqtt.MQTTv311, reconnect_on_failure=False)
        if self.user is not None:
            c.username_pw_set(self.user, self.password)
        if self.ssl:
            c.tls_set(ca_certs=self.ssl_params.get("ca_certs"))
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        c.on_socket_open = no_delay
        self.client = c
        try:
            c.connect(self.server, self.port, self.keepalive)
        except (OSError, ValueError) as exc:
            raise OSError("cannot reach MQTT broker %s:%d: %s" % (self.server, self.port, exc)) from None
        c.loop_start()
        if not self.connected.wait(timeout or self.timeout_s) or self.refused is not None:
            why = self.refused if self.refused is not None else "no CONNACK"
            self.disconnect()
            raise OSError("MQTT broker %s:%d refused the connection: %s" % (self.server, self.port, why))
        return 0

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            self.refused = str(reason_code)
        self.connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self.broken = "connection to the broker lost (%s)" % reason_code
        self.connected.set()
        self.inbox.put(None)  # wakes a wait_msg

    def _on_message(self, client, userdata, msg):
        self.inbox.put((msg.topic.encode(), msg.payload))

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        self.acks.setdefault(mid, _event()).failed = any(rc.is_failure for rc in reason_codes)
        self.acks[mid].set()

    def _check(self):
        if self.broken:
            raise OSError(self.broken)

    def subscribe(self, topic, qos=0):
        """Subscribe and wait for SUBACK; OSError when the broker refuses it."""
        self._check()
        if isinstance(topic, bytes):
            topic = topic.decode()
        rc, mid = self.client.subscribe(topic, qos)
        if rc != 0:
            raise OSError("SUBSCRIBE %s failed (paho rc %d)" % (topic, rc))
        ev = self.acks.setdefault(mid, _event())
        if not ev.wait(self.timeout_s) or ev.failed:
            raise OSError("the broker refused SUBSCRIBE %s" % topic)
        del self.acks[mid]

    def publish(self, topic, msg, retain=False, qos=0):
        """Publish; with QoS 1 wait for PUBACK (OSError without one)."""
        self._check()
        if isinstance(topic, bytes):
            topic = topic.decode()
        info = self.client.publish(topic, bytes(msg), qos, retain)
        if info.rc != 0:
            raise OSError("PUBLISH %s failed (paho rc %d)" % (topic, info.rc))
        if qos:
            try:
                info.wait_for_publish(self.timeout_s)
            except (RuntimeError, ValueError) as exc:
                raise OSError("PUBLISH %s: %s" % (topic, exc)) from None
            if not info.is_published():
                self._check()
                raise OSError("no PUBACK for %s within %.0f s" % (topic, self.timeout_s))

    def _deliver(self, item):
        if item is None:
            self._check()
            return None
        self.cb(item[0], item[1])
        return 0x30  # umqtt.simple returns the packet's first byte: a PUBLISH

    def check_msg(self):
        """Hand one waiting message to the callback; None at once when there is none."""
        import queue

        self._check()
        try:
            return self._deliver(self.inbox.get_nowait())
        except queue.Empty:
            return None

    def wait_msg(self, timeout=None):
        """Hand the next message to the callback, waiting for it (up to ``timeout`` s; None when none came)."""
        import queue

        self._check()
        try:
            return self._deliver(self.inbox.get(True, timeout))
        except queue.Empty:
            return None

    def ping(self):
        self._check()  # paho's network thread keeps the connection alive itself

    def disconnect(self):
        if self.client is not None:
            try:
                self.client.disconnect()
            finally:
                self.client.loop_stop()


def no_delay(client, userdata, sock):
    """paho's on_socket_open: send each packet at once. Frames and answers are single packets that wait for an
    acknowledgement, so Nagle's algorithm meeting delayed ACKs would add 40 ms to every message."""
    import socket

    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError):  # not a TCP socket (a websocket or a test double)
        pass


def _event():
    import threading

    ev = threading.Event()
    ev.failed = False
    return ev
