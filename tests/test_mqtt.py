"""Fleets over MQTT (PROTOCOL.md 11) with a real Mosquitto on a free loopback port (a generated configuration, started
and stopped here; no broker double): devices publish frames through the broker, a pool of workers shares them, every
frame is answered once; the device's client is paho-mqtt (CPython) or MicroPython's own umqtt.simple; frames a dead
worker took are published again and answered by another; malformed, unauthenticated and replayed messages are
refused without stopping a worker; the device code under a real MicroPython."""

from __future__ import annotations

import json
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from small_bundle import make_small_bundle, small_frames
from umqtt_cpython import load_umqtt_simple

from lwfc import mqtt as M
from lwfc import protocol as P
from lwfc.bundle import load_bundle
from lwfc.errors import KeyFileError
from lwfc.keys import load_login
from lwfc.mqttlink import MqttLink
from lwfc.protocol import ProtocolError, Refused
from lwfc.retry import RetryWindow
from lwfc.transport import TransportError, parse_address
from lwfc_host.serve import CloudModel, ServerConfig, ServerError, run_in_thread
from lwfc_host.serve.broker import Mosquitto
from lwfc_host.serve.replay import CACHED, NEW, REPLAY, TOO_FAR, ReplayGuard

pytestmark = pytest.mark.skipif(shutil.which("mosquitto") is None and not os.path.exists("/usr/sbin/mosquitto"),
                                reason="needs the Debian package mosquitto (.ci/setup installs it)")

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


@pytest.fixture(scope="module")
def broker():
    with Mosquitto() as b:
        yield b


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("mqtt_bundle")
    make_small_bundle(d)
    return d


@pytest.fixture(scope="module")
def frames(bundle) -> list[bytes]:
    return small_frames(bundle, 12)


@pytest.fixture(scope="module")
def model(bundle) -> CloudModel:
    return CloudModel(bundle)


def hello(bundle: Path, device: str = "dev1") -> dict:
    b = load_bundle(bundle)
    return {"device": device, "model": b.model, "bundle": b.id,
            "table": json.loads((bundle / "tables.json").read_text())["table_id"]}


def prefix() -> str:
    """A topic prefix of its own for each test: workers and devices of other tests never see its messages."""
    return "t" + secrets.token_hex(4)


class Workers:
    """``n`` workers of one pool, each a server in a background thread of this process."""

    def __init__(self, model: CloudModel, url: str, n: int = 1, **config):
        self.servers, self.stops = [], []
        for _ in range(n):
            srv, stop = run_in_thread(model, ServerConfig(workers=1, **config), mqtt=[url])
            self.servers.append(srv)
            self.stops.append(stop)

    def stop(self) -> list[dict]:
        return [stop() for stop in self.stops]


def local_top(model: CloudModel, frame: bytes) -> list:
    decoded, _ = model.decode(frame)
    return model.infer(decoded.tensor)[0]["top"]


class Raw:
    """A plain paho client for the tests: publishes any payload on any topic and collects what arrives on
    ``PREFIX/+/result``."""

    def __init__(self, broker: Mosquitto, pfx: str):
        import paho.mqtt.client as mqtt

        from lwfc.mqttclient import no_delay

        self.got: queue.Queue = queue.Queue()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="raw-" + secrets.token_hex(4))
        self.c.on_socket_open = no_delay
        self.c.on_message = lambda c, u, m: self.got.put((m.topic, bytes(m.payload)))
        self.c.connect("127.0.0.1", broker.port)
        self.c.loop_start()
        self.c.subscribe(pfx + "/+/result", 1)
        time.sleep(0.2)

    def publish(self, topic: str, payload: bytes) -> None:
        self.c.publish(topic, payload, 1).wait_for_publish(5)

    def answers(self, n: int, timeout_s: float = 10.0) -> list[tuple[str, bytes]]:
        out = [self.got.get(timeout=timeout_s) for _ in range(n)]
        return out

    def nothing(self, wait_s: float = 0.5) -> bool:
        try:
            self.got.get(timeout=wait_s)
        except queue.Empty:
            return True
        return False

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


# --- addresses, topics, the retry window, the replay guard ---------------------------------------------------------

def test_addresses_and_topics():
    assert parse_address("mqtt://broker:1884/plant/line1") == ("mqtt", ("broker", 1884, "plant/line1"), {})
    assert parse_address("mqtt://broker/lwfc") == ("mqtt", ("broker", 1883, "lwfc"), {})
    assert parse_address("mqtts://[::1]/lwfc?ca=/etc/ca.pem") == ("mqtts", ("::1", 8883, "lwfc"), {"ca": "/etc/ca.pem"})
    for bad, why in [("mqtt://broker", "needs a topic prefix"), ("mqtt://b:1/a/+/c", "without '+'"),
                     ("mqtt://b:1/a//c", "empty levels"), ("mqtt://b:1/$SYS", "must not start with '$'"),
                     ("mqtt://b:x/p", "not a number"), ("mqtt://b:1/p?ca=f", "applies to mqtts"),
                     ("mqtt://b:1/p?qos=2", "unknown option"), ("mqtt://:1/p", "names no broker")]:
        with pytest.raises(TransportError, match=why.replace("$", r"\$").replace("+", r"\+")):
            parse_address(bad)
    assert M.data_topic("a/b", "dev") == "a/b/dev/data" and M.result_topic("a/b", "dev") == "a/b/dev/result"
    assert M.shared_data_filter("g", "a/b") == "$share/g/a/b/+/data"
    assert M.device_of("a/b/dev/data", "a/b") == "dev"
    for topic in ("a/b/dev/result", "a/x/dev/data", "a/b/x/y/data", "a/b/" + "d" * 65 + "/data", "a/b//data"):
        assert M.device_of(topic, "a/b") is None
    assert not M.valid_device("a b") and not M.valid_device("a#") and M.valid_device("cam-07")


def test_retry_window_hands_each_seq_over_once(monkeypatch):
    now = [0.0]
    monkeypatch.setattr("lwfc.retry.now_ms", lambda: now[0])
    monkeypatch.setattr("lwfc.retry.elapsed_ms", lambda t0: now[0] - t0)
    w = RetryWindow(deadline_s=10.0, first_timeout_s=1.0, min_timeout_s=0.5)
    w.add(1, b"one", "a")
    w.add(2, b"two", "b")
    assert w.due() == []
    now[0] = 1000.0
    assert w.due() == [(1, b"one"), (2, b"two")]  # both overdue: published again, the timer doubled
    now[0] = 2500.0
    assert w.due() == []
    now[0] = 3000.0
    assert [s for s, _ in w.due()] == [1, 2]
    a = w.answer(1, "result", result={"ok": True})
    assert a.tag == "a" and a.rtt_ms == 3000.0 and w.srtt is None  # re-published: no round-trip sample (Karn)
    assert w.answer(1, "result") is None and w.duplicates == 1
    w.add(3, b"three", "c")
    now[0] = 3200.0
    w.answer(3, "result")
    assert w.srtt == 200.0 and w.timeout_ms == 800.0  # 2 * srtt + 4 * rttvar
    now[0] = 10000.0
    lost = w.expire()
    assert [(x.seq, x.code, x.tag) for x in lost] == [(2, P.E_LOST, "b")] and "3 times" in lost[0].message
    assert len(w) == 0


def test_replay_guard():
    g = ReplayGuard(window=4, max_gap=10, max_answers=3)
    s = b"s" * 16
    assert g.check("d", s, 1) == (NEW, None)
    g.record("d", s, 1, b"A1")
    assert g.check("d", s, 1) == (CACHED, b"A1")
    for k in (5, 6, 7):
        g.record("d", s, k, b"A%d" % k)
    assert g.check("d", s, 1) == (REPLAY, None)  # forgotten answer, 6 behind the highest seq 7
    assert g.check("d", s, 3)[0] == NEW  # 4 behind: inside the window (published again, answer forgotten)
    assert g.check("d", s, 18) == (TOO_FAR, None) and g.check("d", s, 17)[0] == NEW
    assert g.check("d", b"t" * 16, 1)[0] == NEW  # another session starts over
    assert g.check("e", s, 7)[0] == NEW  # another device


# --- devices and workers through a real broker ----------------------------------------------------------------------

def test_pool_answers_every_frame_once_with_the_cloud_half_of_tcp(broker, bundle, frames, model):
    """Two workers share the frames of one device (paho client); every frame comes back once with the answer that
    decoding it locally gives, and both workers took part."""
    url = broker.url(prefix())
    pool = Workers(model, url, n=2)
    link = MqttLink(url, hello(bundle), window=4)
    try:
        w = link.connect()
        assert w["transport"] == "mqtt" and w["session"] == link.session.hex() and w["classes"] == 10
        answers = []
        for i, f in enumerate(frames):
            answers += link.submit(f, tag=i)
        answers += link.drain(10)
    finally:
        link.close()
        finals = pool.stop()
    assert sorted(a.tag for a in answers) == list(range(len(frames)))
    assert all(a.kind == "result" for a in answers)
    for a in answers:
        assert a.result["top"] == local_top(model, frames[a.tag])
    taken = [f["mqtt"][0]["answered"] for f in finals]
    assert sum(taken) == len(frames) and min(taken) > 0  # the broker shared them out
    assert link.window.duplicates == 0 and link.unverified == 0


def test_umqtt_simple_client_with_keys(broker, bundle, frames, model):
    """The MicroPython path: lwfc.mqttlink over umqtt.simple itself (run on CPython), authenticated end to end."""
    umqtt = load_umqtt_simple()
    url = broker.url(prefix())
    pool = Workers(model, url, keys={"cam1": KEY})

    def client():
        return umqtt.MQTTClient("umqtt-" + secrets.token_hex(4), "127.0.0.1", broker.port, keepalive=30)

    link = MqttLink(url, hello(bundle, "cam1"), key=KEY, window=3, client_factory=client)
    try:
        assert link.connect()["transport"] == "mqtt"
        answers = []
        for i, f in enumerate(frames[:6]):
            answers += link.submit(f, tag=i)
        answers += link.drain(10)
    finally:
        link.close()
        final = pool.stop()[0]
    assert sorted(a.tag for a in answers) == list(range(6)) and all(a.kind == "result" for a in answers)
    assert [a.result["top"] for a in sorted(answers, key=lambda a: a.tag)] == [local_top(model, f) for f in frames[:6]]
    assert final["mqtt"][0]["unverified"] == 0 and final["frames"] == 6


def test_keys_login_and_refusals(broker, bundle, frames, model, tmp_path):
    """With keys every device must authenticate: a device without a key is refused (AUTH), one with the wrong key
    hears nothing it can verify; a worker of another bundle's table refuses the HELLO (TABLE)."""
    url = broker.url(prefix())
    pool = Workers(model, url, keys={"cam1": KEY, "cam2": KEY})
    try:
        with pytest.raises(Refused, match="AUTH"):
            MqttLink(url, hello(bundle, "plain")).connect()
        wrong = MqttLink(url, hello(bundle, "cam2"), key=OTHER_KEY, hello_attempts=2, hello_first_wait_s=0.3)
        with pytest.raises(ProtocolError, match="did not verify.*AUTH missing or wrong tag"):
            wrong.connect()
        bad_table = dict(hello(bundle, "cam1"), table="00" * 8)
        with pytest.raises(Refused, match="TABLE"):
            MqttLink(url, bad_table, key=KEY).connect()
        with pytest.raises(TransportError, match="topic level"):
            MqttLink(url, hello(bundle, "a/b"))
    finally:
        pool.stop()
    # broker login: a broker that takes named users only
    with Mosquitto(users={"worker": "w-secret", "cam1": "c-secret"}) as locked:
        url = locked.url(prefix())
        login = tmp_path / "login"
        login.write_text("cam1:c-secret\n")
        login.chmod(0o644)
        with pytest.raises(KeyFileError, match="accessible by group or others"):
            load_login(str(login))
        login.chmod(0o600)
        with pytest.raises(ServerError, match="refused"):
            run_in_thread(model, ServerConfig(), mqtt=[url])  # no login
        _srv, stop = run_in_thread(model, ServerConfig(workers=1), mqtt=[url], mqtt_login=("worker", "w-secret"))
        link = MqttLink(url, hello(bundle, "cam1"), login=load_login(str(login)))
        try:
            link.connect()
            answers = link.submit(frames[0], tag=0) + link.drain(10)
        finally:
            link.close()
            stop()
        assert [a.kind for a in answers] == ["result"]
        with pytest.raises(OSError, match="refused"):
            MqttLink(url, hello(bundle, "cam1"), login=("cam1", "wrong")).connect()


def with_flags(session: bytes, mtype: int, seq: int, body: bytes, flags: int, auth: P.Auth) -> bytes:
    """A payload whose message has the flag bits ``flags`` (reserved ones included), tagged with ``auth``."""
    import struct

    from lwfc.crc32 import crc32

    head = struct.pack("<2sBBII", P.SYNC, mtype, flags, seq, len(body))
    msg = head + struct.pack("<I", crc32(head)) + body + struct.pack("<I", crc32(body))
    return session + msg + auth.tag(msg)


def test_malformed_and_unauthenticated_messages_are_refused_and_the_worker_keeps_serving(broker, bundle, frames,
                                                                                          model):
    """Every message on a data topic that names a device is answered on that device's result topic: ERROR with the
    code of the byte-stream server, untagged when the worker could not verify it (the device acts on none of it).
    A topic that names no device gets nothing. The worker goes on serving."""
    pfx = prefix()
    url = broker.url(pfx)
    pool = Workers(model, url, keys={"cam": KEY})
    raw = Raw(broker, pfx)
    sess = secrets.token_bytes(16)
    auth = M.session_auth(KEY, sess)
    good = M.pack(sess, P.DATA, 1, frames[0], auth)
    corrupt = bytearray(good)
    corrupt[40] ^= 0xFF  # inside the body: the body CRC fails
    cases = [  # (payload, ERROR code, tagged)
        (b"short", P.E_BAD_MESSAGE, False),
        (sess + b"no message here at all", P.E_BAD_MESSAGE, False),
        (bytes(corrupt), P.E_CORRUPT, False),
        (M.pack(sess, P.DATA, 3, frames[0]), P.E_AUTH, False),  # untagged
        (M.pack(sess, P.DATA, 4, frames[0], M.session_auth(OTHER_KEY, sess)), P.E_AUTH, False),  # another key
        (secrets.token_bytes(16) + good[16:], P.E_AUTH, False),  # a captured message put into another session
        (M.pack(sess, P.DATA, 6, b"not a frame", auth), P.E_BAD_FRAME, True),
        (M.pack(sess, P.SLICE, 7, frames[0], auth), P.E_BAD_TYPE, True),
        (M.pack(sess, P.RESULT, 8, b"{}", auth), P.E_BAD_TYPE, True),
        (with_flags(sess, P.DATA, 9, frames[0], P.FLAG_AUTH | 0x40, auth), P.E_BAD_MESSAGE, True),
    ]
    try:
        for payload, code, tagged in cases:
            raw.publish(M.data_topic(pfx, "cam"), payload)
            topic, answer = raw.answers(1)[0]
            assert topic == M.result_topic(pfx, "cam")
            _s, ev = M.unpack(answer, M.session_auth(KEY, answer[:16]) if tagged else None)
            assert isinstance(ev, P.Message) and ev.type == P.ERROR, (payload[:40], ev)
            assert bool(ev.flags & P.FLAG_AUTH) == tagged
            assert P.unpack_error(ev.body)[0] == code, P.unpack_error(ev.body)
        # no device to name: a name no device may have (a topic with more levels never reaches the workers' filter)
        for topic in (pfx + "/cam/extra/data", pfx + "/" + "x" * 65 + "/data"):
            raw.publish(topic, good)
        assert raw.nothing()
        # still serving: the good frame is answered, tagged
        raw.publish(M.data_topic(pfx, "cam"), good)
        _t, answer = raw.answers(1)[0]
        _s, ev = M.unpack(answer, auth)
        assert ev.type == P.RESULT and json.loads(ev.body)["top"] == local_top(model, frames[0])
    finally:
        raw.close()
        final = pool.stop()[0]
    st = final["mqtt"][0]
    assert st["failures"] == 0 and st["no_device"] == 1 and st["unverified"] == 3 and st["answered"] == 2


def test_redelivered_frames_get_the_same_answer_and_replays_are_dropped(broker, bundle, frames, model):
    """A frame delivered again is answered from the worker's memory with the same bytes; on another worker it is
    decoded again, to the same result; a frame far behind its session's newest is a replay and dropped; one far
    ahead is refused."""
    pfx = prefix()
    url = broker.url(pfx)
    raw = Raw(broker, pfx)
    sess = secrets.token_bytes(16)
    topic = M.data_topic(pfx, "cam")
    one = Workers(model, url)
    try:
        raw.publish(topic, M.pack(sess, P.DATA, 1, frames[0]))
        raw.publish(topic, M.pack(sess, P.DATA, 1, frames[0]))
        (_, a1), (_, a2) = raw.answers(2)
        assert a1 == a2  # the very same bytes, timings included: not decoded twice
        raw.publish(topic, M.pack(sess, P.DATA, 1000, frames[1]))  # 999 ahead: within max_seq_gap (1024)
        raw.publish(topic, M.pack(sess, P.DATA, 2000, frames[1]))
        raw.answers(2)
        raw.publish(topic, M.pack(sess, P.DATA, 5, frames[2]))  # 1995 behind the newest: a replay
        assert raw.nothing()
        raw.publish(topic, M.pack(sess, P.DATA, 5000, frames[2]))  # 3000 ahead
        _s, ev = M.unpack(raw.answers(1)[0][1])
        assert P.unpack_error(ev.body)[0] == P.E_BAD_MESSAGE
    finally:
        st = one.stop()[0]["mqtt"][0]
    assert st["cached"] == 1 and st["replays"] == 1 and st["answered"] == 3  # decoded: seqs 1, 1000, 2000
    two = Workers(model, url, n=2)  # new workers: nothing remembered; round robin hands the copies to both
    try:
        sess = secrets.token_bytes(16)
        for _ in range(4):
            raw.publish(topic, M.pack(sess, P.DATA, 1, frames[3]))
        results = [json.loads(M.unpack(a)[1].body) for _t, a in raw.answers(4)]
    finally:
        finals = two.stop()
        raw.close()
    assert sorted(f["mqtt"][0]["answered"] for f in finals) == [1, 1]  # each decoded it once
    timing = ("decode_ms", "infer_ms")
    assert all({k: v for k, v in r.items() if k not in timing} == {k: v for k, v in results[0].items()
                                                                     if k not in timing} for r in results)


class WorkerProcess:
    """``lwfc serve --mqtt`` in a process of its own (it can be stopped and killed)."""

    def __init__(self, bundle: Path, url: str, *extra: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "lwfc_host", "serve", "--bundle", str(bundle), "--mqtt",
                                      url, "--workers", "1", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        t0 = time.time()
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError("lwfc serve --mqtt exited: " + self.proc.stderr.read())
            if "listening on mqtt://" in line:
                break
            assert time.time() - t0 < 60

    def stop(self) -> dict:
        self.proc.send_signal(signal.SIGTERM)
        _out, err = self.proc.communicate(timeout=30)
        assert self.proc.returncode == 0, err
        return json.loads([ln for ln in err.splitlines() if ln.startswith("{")][-1])


def test_frames_a_killed_worker_took_are_published_again_and_answered(broker, bundle, frames, model):
    """Worker A hangs (SIGSTOP) taking the first frames, B joins, A is killed (SIGKILL): the broker forgets what A
    held, the device publishes those frames again when they are overdue, B answers them. Every frame is answered
    once, none is lost."""
    url = broker.url(prefix())
    a = WorkerProcess(bundle, url)
    b = None
    link = MqttLink(url, hello(bundle), window=8, first_timeout_s=0.5, answer_timeout_s=30)
    try:
        link.connect()
        os.kill(a.proc.pid, signal.SIGSTOP)
        answers = []
        for i, f in enumerate(frames[:6]):
            answers += link.submit(f, tag=i)
        b = WorkerProcess(bundle, url)
        os.kill(a.proc.pid, signal.SIGKILL)
        a.proc.wait(10)
        for i, f in enumerate(frames[6:], start=6):
            answers += link.submit(f, tag=i)
        answers += link.drain(20)
    finally:
        link.close()
        if a.proc.poll() is None:
            a.proc.kill()
        final = b.stop() if b is not None else {}
    assert sorted(a.tag for a in answers) == list(range(len(frames)))
    assert all(x.kind == "result" for x in answers)
    assert all(x.result["top"] == local_top(model, frames[x.tag]) for x in answers)
    # A answered nothing, so every frame A took was answered by B only after the device published it again. How
    # many A took is the broker's choice (under load B can join before the last of the six reached A): at least one.
    assert link.window.republished >= 1 and final["frames"] >= len(frames)


_MPY_SCRIPT = """
from lwfc.mqttlink import MqttLink
from lwfc import mqtt as M
from lwfc import protocol as P
import time

KEY = open("/in/key.bin", "rb").read()
SESSION = open("/in/session.bin", "rb").read()

class Client(object):
    # umqtt.simple's API; the answers a worker would publish are made here from what the link publishes
    def __init__(self):
        self.published = []
        self.inbox = []
        self.cb = None
    def set_callback(self, f):
        self.cb = f
    def connect(self, clean_session=True):
        return 0
    def subscribe(self, topic, qos=0):
        self.topic = topic
    def publish(self, topic, msg, retain=False, qos=0):
        self.published.append((topic, msg))
        session, ev = M.unpack(msg, M.session_auth(KEY, msg[:16]))
        if ev.type == P.HELLO:
            self.inbox.append(M.pack(session, P.WELCOME, 0, b'{"protocol": 1, "transport": "mqtt"}',
                                     M.session_auth(KEY, session)))
    def check_msg(self):
        if not self.inbox:
            return None
        self.cb(self.topic, self.inbox.pop(0))
        return 0x30
    def ping(self):
        pass
    def disconnect(self):
        pass

c = Client()
link = MqttLink("mqtt://h:1/pre", {"device": "cam", "model": "m", "bundle": "", "table": "00"}, key=KEY,
                client_factory=lambda: c, first_timeout_s=0.05)
link.session = SESSION
link.auth = M.session_auth(KEY, SESSION)
w = link.connect()
answers = link.submit(open("/in/frame.bin", "rb").read(), tag="t")
time.sleep(0.1)
answers += link.pump(0)
auth = M.session_auth(KEY, SESSION)
c.inbox.append(M.pack(SESSION, P.RESULT, 1, b'{"ok": true}', auth))
c.inbox.append(M.pack(SESSION, P.RESULT, 1, b'{"ok": true}', auth))
c.inbox.append(M.pack(SESSION, P.RESULT, 1, b'{"forged": true}'))
answers += link.pump(0)
print(w["transport"], len(answers), answers[0].tag, answers[0].result["ok"], link.window.duplicates, link.unverified,
      c.topic)
for k in range(len(c.published)):
    open("/out/%d.bin" % k, "wb").write(c.published[k][1])
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed (MicroPython's WebAssembly port)")
def test_mqtt_link_under_micropython(bundle, frames):
    """lwfc.mqttlink with a client of umqtt.simple's API under a real MicroPython: HELLO, DATA and its re-publish are
    byte for byte what CPython packs, a duplicate answer and a forged one are dropped."""
    from lwfc_host.codec.micropython import device_files, run_micropython_files

    session = bytes(range(100, 116))
    files = device_files()
    files.update({"/in/key.bin": KEY, "/in/session.bin": session, "/in/frame.bin": frames[0]})
    out, written = run_micropython_files(_MPY_SCRIPT, files)
    assert out.split() == ["mqtt", "1", "t", "True", "1", "1", "pre/cam/result"]
    auth = M.session_auth(KEY, session)
    published = [written[k] for k in sorted(written, key=lambda k: int(k.split(".")[0]))]
    _s, hello_msg = M.unpack(published[0], auth)
    assert hello_msg.type == P.HELLO and json.loads(hello_msg.body)["transport"] == "mqtt"
    data = M.pack(session, P.DATA, 1, frames[0], auth)
    assert published[1:] == [data, data]  # published again with the same seq and bytes


def test_command_line_checks(broker, bundle, capsys):
    """Flags that would be ignored or cannot work are refused with one clear line."""
    from lwfc_host.cli import main

    for argv, why in [
        (["serve", "--bundle", str(bundle), "--mqtt-login", "x"], "apply to --mqtt"),
        (["serve", "--bundle", str(bundle), "--mqtt", broker.url("p"), "--mqtt-group", "a/b"], "one topic level"),
        (["serve", "--bundle", str(bundle), "--mqtt", "mqtt://127.0.0.1:1/p"], "cannot reach the MQTT broker"),
        (["serve-bench", "--mqtt", "--devices", "1", "2"], "one value with --mqtt"),
        (["serve-bench", "--quick"], "apply to --mqtt"),
        (["serve-bench", "--mqtt", "--frames", "0"], "at least 1"),
    ]:
        assert main(argv) == 2
        assert why in capsys.readouterr().err


@pytest.mark.slow
def test_fleet_benchmark_quick_mode_loses_nothing(tmp_path):
    """`lwfc serve-bench --mqtt --quick` on the demo bundle: pools of 1 and 2 workers, then one worker killed
    halfway; every run answers every frame, none lost, none handed over twice."""
    out = tmp_path / "runs.json"
    proc = subprocess.run([sys.executable, "-m", "lwfc_host", "serve-bench", "--mqtt", "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = json.loads(out.read_text())
    assert [(r["workers"], r["killed"]) for r in runs] == [(1, False), (2, False), (2, True)]
    for r in runs:
        assert r["results"] == r["sent"] == r["answered_seqs"] == 400
        assert r["lost"] == 0 and r["handed_twice"] == 0 and r["errors"] == {}
    assert "killed worker pid" in proc.stdout


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make a test CA")
def test_tls_to_the_broker(bundle, frames, model, tmp_path):
    """mqtts://: the broker's certificate is verified against the CA given in the address (?ca=FILE), by the device
    and the worker alike; without the CA the connection fails."""
    def ssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=tmp_path)

    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=lwfc test CA", "-keyout",
        "ca.key", "-out", "ca.crt")
    ssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "broker.key", "-out",
        "broker.csr")
    (tmp_path / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    ssl("x509", "-req", "-in", "broker.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2",
        "-extfile", "san.ext", "-out", "broker.crt")
    with Mosquitto(tmp_path / "broker", tls=(str(tmp_path / "broker.crt"), str(tmp_path / "broker.key"))) as broker:
        url = broker.url(prefix()) + f"?ca={tmp_path / 'ca.crt'}"
        _srv, stop = run_in_thread(model, ServerConfig(workers=1), mqtt=[url])
        link = MqttLink(url, hello(bundle))
        try:
            link.connect()
            answers = link.submit(frames[0], tag=0) + link.drain(10)
        finally:
            link.close()
            stop()
        assert [a.kind for a in answers] == ["result"]
        with pytest.raises(OSError):  # the system's CAs do not know this broker
            MqttLink(url.split("?")[0], hello(bundle)).connect()


def test_the_readme_acl_confines_each_device_to_its_own_topics(bundle, frames, model):
    """The broker ACL of the README's fleet section, on Mosquitto 2.0: the workers' user shares every device's data
    topic through $share, a device reaches the pool on its own topic, and a device that publishes on another's
    topic reaches no worker (the broker drops it)."""
    acl = ("pattern write lwfc/%u/data\npattern read lwfc/%u/result\n\n"
           "user workers\ntopic read lwfc/+/data\ntopic write lwfc/+/result\n")
    with Mosquitto(users={"workers": "w", "cam1": "c1", "cam2": "c2"}, acl=acl) as broker:
        url = broker.url("lwfc")
        _srv, stop = run_in_thread(model, ServerConfig(workers=1), mqtt=[url], mqtt_login=("workers", "w"))
        link = MqttLink(url, hello(bundle, "cam1"), login=("cam1", "c1"))
        impostor = MqttLink(url, hello(bundle, "cam1"), login=("cam2", "c2"), hello_attempts=2,
                            hello_first_wait_s=0.3)
        try:
            link.connect()
            answers = link.submit(frames[0], tag=0) + link.drain(10)
            with pytest.raises(ProtocolError, match="no WELCOME"):
                impostor.connect()
        finally:
            link.close()
            impostor.close()
            final = stop()
    assert [a.kind for a in answers] == ["result"]
    assert final["mqtt"][0]["received"] == 2  # cam1's HELLO and frame; nothing of cam2's
