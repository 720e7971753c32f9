"""Byte-stream transports behind one small interface, a datagram transport, and reconnection with backoff.

A byte-stream transport has ``write(data)`` (all of it, or raise OSError), ``read(n, timeout_s)`` (up to n
bytes; b"" when nothing arrived in time; raises ConnectionClosed at the end of the stream) and ``close()``.

- ``TcpTransport``: socket (CPython, Linux boards) or usocket (MicroPython with a network stack).
- ``SerialTransport``: pyserial (Linux boards: /dev/ttyUSB0, /dev/ttyACM0, a pty).
- ``UartTransport``: machine.UART (MicroPython boards).

A datagram transport (``datagram = True``) has ``send(datagram)``, ``recv(timeout_s)`` (one datagram, or None
when none arrived in time) and ``close()``; nothing is retransmitted (PROTOCOL.md 10):

- ``UdpTransport``: a UDP socket (socket / usocket).

``open_transport("tcp://HOST:PORT" | "udp://HOST:PORT" | "serial:///dev/ttyX?baud=N" | "uart://ID?baud=N")``
picks one. ``mqtt://HOST:PORT/PREFIX`` addresses parse here too, but a broker is no byte stream: ``lwfc.mqttlink``
carries frames over it. MicroPython-compatible Python 3.7.
"""

try:
    import socket
except ImportError:  # MicroPython names it usocket; a board without networking has neither (UART only)
    try:
        import usocket as socket  # type: ignore
    except ImportError:
        socket = None

import time

from .protocol import ConnectionClosed

try:
    _sleep_ms = time.sleep_ms
except AttributeError:
    def _sleep_ms(ms):
        time.sleep(ms / 1000.0)


class TransportError(OSError):
    """A transport address is malformed or the transport cannot be opened."""


DEFAULT_MTU = 1200  # bytes of one datagram (UDP payload): what fits every path without IP fragmentation
MIN_MTU = 128
MAX_DATAGRAM = 65507  # the largest UDP payload over IPv4


def parse_address(url):
    """(scheme, target, options) of a transport address: ("tcp", (host, port), {}), ("udp", (host, port),
    {"mtu": 1200}), ("serial", "/dev/ttyX", {"baud": 115200}), ("uart", 1, {"baud": 115200}), ("mqtt", (host, port,
    prefix), {}) (``mqtts``: over TLS, option ``ca``; PROTOCOL.md 11). Options:
    ``mtu`` (udp; also serial and uart, where it makes the line a datagram line: each slice its own message,
    PROTOCOL.md 10.6), ``baud`` (serial, uart)."""
    if "://" not in url:
        raise TransportError("transport address %r must look like tcp://HOST:PORT, udp://HOST:PORT or "
                             "serial:///dev/ttyX" % url)
    scheme, rest = url.split("://", 1)
    opts = {}
    if "?" in rest:
        rest, query = rest.split("?", 1)
        for kv in query.split("&"):
            if "=" not in kv:
                raise TransportError("bad option %r in %r (expected name=value)" % (kv, url))
            k, v = kv.split("=", 1)
            opts[k] = v
    if "mtu" in opts:
        try:
            opts["mtu"] = int(opts["mtu"])
        except ValueError:
            raise TransportError("mtu in %r is not a number" % url) from None
        if not MIN_MTU <= opts["mtu"] <= MAX_DATAGRAM:
            raise TransportError("mtu %d in %r is out of range (%d..%d)" % (opts["mtu"], url, MIN_MTU, MAX_DATAGRAM))
    if scheme in ("tcp", "udp"):
        if ":" not in rest:
            raise TransportError("%s address %r needs a port: %s://HOST:PORT" % (scheme, url, scheme))
        host, port = rest.rsplit(":", 1)
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        try:
            port = int(port)
        except ValueError:
            raise TransportError("port %r in %r is not a number" % (port, url)) from None
        if not 0 < port < 65536:
            raise TransportError("port %d in %r is out of range" % (port, url))
        if scheme == "udp":
            opts["mtu"] = opts.get("mtu", DEFAULT_MTU)
        elif "mtu" in opts:
            raise TransportError("mtu applies to udp://, serial:// and uart:// addresses, not %r" % url)
        return scheme, (host, port), opts
    if scheme in ("serial", "uart"):
        try:
            opts["baud"] = int(opts.get("baud", 115200))
        except ValueError:
            raise TransportError("baud rate in %r is not a number" % url) from None
        if not rest:
            raise TransportError("serial address %r names no device" % url)
        if scheme == "uart":
            try:
                rest = int(rest)
            except ValueError:
                raise TransportError("UART id in %r must be a number" % url) from None
        return scheme, rest, opts
    if scheme in ("mqtt", "mqtts"):
        return scheme, _mqtt_target(url, rest), _mqtt_options(url, opts)
    raise TransportError("unknown transport %r in %r (use tcp://, udp://, serial://, uart:// or mqtt://)"
                         % (scheme, url))


MQTT_PORTS = {"mqtt": 1883, "mqtts": 8883}  # the IANA ports of MQTT and MQTT over TLS


def _mqtt_target(url, rest):
    """(host, port, prefix) of ``mqtt://HOST[:PORT]/PREFIX``: PREFIX is one or more topic levels without
    wildcards (``+``, ``#``) or a leading ``$`` (the broker's own topics), and no empty level."""
    if "/" not in rest:
        raise TransportError("mqtt address %r needs a topic prefix: mqtt://HOST[:PORT]/PREFIX" % url)
    hostport, prefix = rest.split("/", 1)
    scheme = url.split("://", 1)[0]
    port = MQTT_PORTS[scheme]
    host = hostport
    if hostport.startswith("["):  # [IPv6]:port
        end = hostport.find("]")
        host, tail = hostport[1:end], hostport[end + 1:]
        if tail.startswith(":"):
            port = tail[1:]
    elif ":" in hostport:
        host, port = hostport.rsplit(":", 1)
    try:
        port = int(port)
    except ValueError:
        raise TransportError("port %r in %r is not a number" % (port, url)) from None
    if not 0 < port < 65536:
        raise TransportError("port %d in %r is out of range" % (port, url))
    if not host:
        raise TransportError("mqtt address %r names no broker host" % url)
    levels = prefix.split("/")
    for level in levels:
        if not level or "+" in level or "#" in level:
            raise TransportError("topic prefix %r in %r must be topic levels without '+', '#' or empty levels"
                                 % (prefix, url))
    if prefix.startswith("$"):
        raise TransportError("topic prefix %r in %r must not start with '$' (the broker's own topics)" % (prefix, url))
    return host, port, prefix


def _mqtt_options(url, opts):
    """The options of an mqtt:// address: ``ca`` (mqtts: a CA certificate file to verify the broker by)."""
    for k in opts:
        if k != "ca":
            raise TransportError("unknown option %r in %r (mqtt addresses take ca=FILE)" % (k, url))
    if "ca" in opts and not url.startswith("mqtts://"):
        raise TransportError("ca applies to mqtts:// (TLS) addresses, not %r" % url)
    return opts


class TcpTransport(object):
    """A TCP connection (TCP_NODELAY: frames are small and latency matters)."""

    def __init__(self, host, port, connect_timeout_s=5.0):
        self.name = "tcp://%s:%d" % (host, port)
        if socket is None:
            raise TransportError("this board has no socket module: use a serial or UART transport")
        addr = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)[0][-1]
        self.sock = socket.socket(socket.AF_INET if len(addr) == 2 else socket.AF_INET6, socket.SOCK_STREAM)
        try:
            self.sock.settimeout(connect_timeout_s)
            self.sock.connect(addr)
            try:
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except (AttributeError, OSError):
                pass
        except OSError:
            self.sock.close()
            raise
        self._timeout = None

    def write(self, data):
        self._settimeout(30.0)
        try:
            if hasattr(self.sock, "sendall"):
                self.sock.sendall(data)
            else:
                mv = memoryview(data)
                while mv:
                    n = self.sock.send(mv)
                    mv = mv[n:]
        except OSError as exc:
            raise ConnectionClosed("%s: send failed: %s" % (self.name, exc)) from None

    def _settimeout(self, t):
        if t != self._timeout:
            self.sock.settimeout(t)
            self._timeout = t

    def read(self, n, timeout_s):
        self._settimeout(max(timeout_s, 0.0) if timeout_s else 0.0)
        try:
            data = self.sock.recv(n)
        except OSError as exc:
            # a timeout (socket.timeout / EAGAIN / ETIMEDOUT on MicroPython) just means nothing arrived
            if _is_timeout(exc):
                return b""
            raise ConnectionClosed("%s: %s" % (self.name, exc)) from None
        if not data:
            raise ConnectionClosed("%s: connection closed by the host" % self.name)
        return data

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


class UdpTransport(object):
    """A UDP socket that talks to one host (``datagram``: one message per datagram, PROTOCOL.md 10)."""

    datagram = True

    def __init__(self, host, port, mtu=DEFAULT_MTU):
        self.name = "udp://%s:%d" % (host, port)
        self.mtu = mtu
        if socket is None:
            raise TransportError("this board has no socket module: use a serial or UART transport")
        addr = socket.getaddrinfo(host, port, 0, socket.SOCK_DGRAM)[0][-1]
        self.sock = socket.socket(socket.AF_INET if len(addr) == 2 else socket.AF_INET6, socket.SOCK_DGRAM)
        try:
            self.sock.connect(addr)  # only the host's datagrams come back
        except OSError:
            self.sock.close()
            raise
        self._timeout = None

    def send(self, datagram):
        """Send one datagram. A datagram the network drops is not an error; a local failure is."""
        try:
            self.sock.send(datagram)
        except OSError as exc:
            if _is_refused(exc):  # the host's port was closed a moment ago (ICMP): the datagram is lost
                return
            raise ConnectionClosed("%s: send failed: %s" % (self.name, exc)) from None

    def recv(self, timeout_s):
        """One datagram, or None when none arrived within ``timeout_s``."""
        t = max(timeout_s, 0.0) if timeout_s else 0.0
        if t != self._timeout:
            self.sock.settimeout(t)
            self._timeout = t
        try:
            return self.sock.recv(MAX_DATAGRAM + 1)
        except OSError as exc:
            if _is_timeout(exc) or _is_refused(exc):
                return None
            raise ConnectionClosed("%s: %s" % (self.name, exc)) from None

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def _is_refused(exc):
    code = exc.args[0] if exc.args else None
    return type(exc).__name__ == "ConnectionRefusedError" or code == 111  # ECONNREFUSED


def _is_timeout(exc):
    if type(exc).__name__ in ("timeout", "TimeoutError", "BlockingIOError"):
        return True
    code = exc.args[0] if exc.args else None
    return code in (11, 110, 116, "timed out")  # EAGAIN, ETIMEDOUT (Linux, MicroPython)


class SerialTransport(object):
    """A serial line through pyserial (Linux boards, USB CDC, a pty)."""

    def __init__(self, device, baud=115200):
        import serial  # pyserial

        self.name = "serial://%s" % device
        try:
            self.ser = serial.Serial(device, baudrate=baud, timeout=0.1, write_timeout=30.0)
        except (serial.SerialException, OSError) as exc:
            raise TransportError("cannot open %s: %s" % (device, exc)) from None
        self._serial = serial

    def write(self, data):
        try:
            self.ser.write(data)
            self.ser.flush()
        except (self._serial.SerialException, OSError) as exc:
            raise ConnectionClosed("%s: write failed: %s" % (self.name, exc)) from None

    def read(self, n, timeout_s):
        try:
            self.ser.timeout = max(timeout_s, 0.0)
            first = self.ser.read(1)
            if not first:
                return b""
            waiting = self.ser.in_waiting
            return first + (self.ser.read(min(waiting, n - 1)) if waiting and n > 1 else b"")
        except (self._serial.SerialException, OSError) as exc:
            raise ConnectionClosed("%s: read failed: %s" % (self.name, exc)) from None

    def close(self):
        try:
            self.ser.close()
        except (self._serial.SerialException, OSError):
            pass


class UartTransport(object):
    """machine.UART on a MicroPython board."""

    def __init__(self, uart_id, baud=115200):
        from machine import UART  # type: ignore

        self.name = "uart://%d" % uart_id
        self.uart = UART(uart_id, baud)
        self.uart.init(baud, bits=8, parity=None, stop=1, timeout=0, rxbuf=4096)

    def write(self, data):
        mv = memoryview(data)
        while mv:
            n = self.uart.write(mv)
            if n:
                mv = mv[n:]

    def read(self, n, timeout_s):
        t0 = time.ticks_ms()
        while not self.uart.any():
            if time.ticks_diff(time.ticks_ms(), t0) >= timeout_s * 1000:
                return b""
            _sleep_ms(1)
        return self.uart.read(min(self.uart.any(), n)) or b""

    def close(self):
        try:
            self.uart.deinit()
        except (AttributeError, OSError):
            pass


def open_transport(url):
    """A connected transport for an address (see parse_address)."""
    scheme, target, opts = parse_address(url)
    if scheme in MQTT_PORTS:  # no byte stream: a broker carries messages (PROTOCOL.md 11)
        raise TransportError("%s is a broker, not a byte stream: use lwfc.mqttlink.MqttLink" % url)
    if scheme == "tcp":
        return TcpTransport(target[0], target[1])
    if scheme == "udp":
        return UdpTransport(target[0], target[1], opts["mtu"])
    if scheme == "serial":
        return SerialTransport(target, opts["baud"])
    return UartTransport(target, opts["baud"])


class Backoff(object):
    """Exponential backoff with a cap: 0.1 s, 0.2 s, 0.4 s, ... up to ``max_s``; ``reset()`` after success."""

    def __init__(self, first_s=0.1, max_s=5.0, factor=2.0):
        self.first_s = first_s
        self.max_s = max_s
        self.factor = factor
        self.delay = first_s

    def wait(self):
        _sleep_ms(int(self.delay * 1000))
        self.delay = min(self.delay * self.factor, self.max_s)

    def reset(self):
        self.delay = self.first_s


def connect_with_backoff(url, attempts=10, backoff=None, log=None):
    """Open ``url``, retrying with backoff; raises the last error after ``attempts`` failures."""
    backoff = backoff or Backoff()
    last = None
    for i in range(attempts):
        try:
            t = open_transport(url)
            backoff.reset()
            return t
        except TransportError:
            raise  # a bad address does not get better with retries
        except OSError as exc:
            last = exc
            if log is not None:
                log("connect %s failed (%s); retry %d/%d in %.1f s" % (url, exc, i + 1, attempts, backoff.delay))
            if i + 1 < attempts:
                backoff.wait()
    raise ConnectionClosed("cannot connect to %s after %d attempts: %s" % (url, attempts, last))
