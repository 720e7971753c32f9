"""Datagram links (PROTOCOL.md 10) end to end with real sockets: a device sends each tensor as slices through a
lossy UDP relay that drops datagrams by a seeded rule, and the server answers every tensor with the fraction it
concealed; malformed, unauthenticated and forged datagrams are dropped without stopping the server; a serial
line in datagram mode over a pty pair; the device's datagram code under MicroPython."""

from __future__ import annotations

import json
import random
import select
import shutil
import socket
import subprocess
import threading
import time

import numpy as np
import pytest
from conftest import make_case
from small_bundle import make_small_bundle, small_tensors

from lwfc import protocol as P
from lwfc.bundle import load_bundle
from lwfc.datagram import (
    MIN_HELLO_DATAGRAM,
    DatagramLink,
    DatagramSession,
    max_frame_bytes,
    send_order,
)
from lwfc.encoder import Encoder
from lwfc.frame import parse_header
from lwfc.link import Slices
from lwfc.slices import choose_plan, encode_sliced, plan_channel_regions
from lwfc.tables import load_tables
from lwfc.transport import SerialTransport, TransportError, UdpTransport, parse_address
from lwfc_host.serve import CloudModel, ServerConfig, run_in_thread

SHAPE = (16, 16, 32)
MTU = 300
KEY = bytes(range(16, 48))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    d = tmp_path_factory.mktemp("lossy_bundle")
    make_small_bundle(d, shape=SHAPE)
    return d


@pytest.fixture(scope="module")
def tensors(bundle):
    """Slice frames (raster order) of 24 tensors, each cut for datagrams of MTU bytes."""
    b = load_bundle(bundle)
    enc = Encoder(load_tables(b.tables_path))
    h, w, _ = SHAPE
    return [enc.encode_int8_sliced(t, h, w, max_frame_bytes(MTU)) for t in small_tensors(b.info, 24, seed=3)]


def hello(bundle, device="dev"):
    b = load_bundle(bundle)
    return {"device": device, "model": b.model, "bundle": b.id,
            "table": json.loads((bundle / "tables.json").read_text())["table_id"]}


def area(frame: bytes) -> int:
    _, rn, _, cn = parse_header(frame).region
    return rn * cn


class LossyRelay:
    """A UDP forwarder between one device and the server that drops device -> server SLICE datagrams by a seeded
    rule: each with probability ``p`` (never the first of its seq), and every slice of the seqs in ``drop_all``.
    It records, per seq, the slice frames it let through and the area of those it dropped."""

    def __init__(self, server_addr: tuple[str, int], p: float, seed: int, drop_all: set[int]):
        self.server_addr = server_addr
        self.p, self.rng, self.drop_all = p, random.Random(seed), drop_all
        self.down = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # the device's side
        self.down.bind(("127.0.0.1", 0))
        self.up = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # the server's side
        self.up.connect(server_addr)
        self.device = None
        self.passed: dict[int, list[bytes]] = {}
        self.dropped: dict[int, int] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        host, port = self.down.getsockname()
        return f"udp://{host}:{port}?mtu={MTU}"

    def _drops(self, data: bytes) -> bool:
        ev = P.parse_datagram(data)
        if not isinstance(ev, P.Message) or ev.type != P.SLICE:
            return False
        first = ev.seq not in self.passed and ev.seq not in self.dropped
        gone = ev.seq in self.drop_all or (not first and self.rng.random() < self.p)
        if gone:
            self.dropped[ev.seq] = self.dropped.get(ev.seq, 0) + area(bytes(ev.body))
        else:
            self.passed.setdefault(ev.seq, []).append(bytes(ev.body))
        return gone

    def _run(self) -> None:
        while not self.stop.is_set():
            ready, _, _ = select.select([self.down, self.up], [], [], 0.05)
            for s in ready:
                data, addr = s.recvfrom(65536)
                if s is self.down:
                    self.device = addr
                    if not self._drops(data):
                        self.up.send(data)
                elif self.device is not None:
                    self.down.sendto(data, self.device)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.down.close()
        self.up.close()


def udp_server(bundle, **config):
    server, stop = run_in_thread(CloudModel(bundle), ServerConfig(**config), udp=["127.0.0.1:0"])
    host, port = next(a for a in server.addresses if a.startswith("udp://"))[6:].rsplit(":", 1)
    return server, stop, (host, int(port))


def test_lossy_relay_every_tensor_answered_with_its_concealed_fraction(bundle, tensors):
    # a deadline well above loopback's delays (the device sends a tensor's slices back to back), so that on a
    # loaded machine no slice arrives after its tensor was answered: the concealed fractions are then exact
    server, stop, addr = udp_server(bundle, slice_deadline_s=0.3)
    relay = LossyRelay(addr, p=0.3, seed=7, drop_all={5, 11})
    try:
        link = DatagramLink(relay.address, hello(bundle), window=3, answer_timeout_s=5.0)
        link.connect()
        answers = []
        for i, frames in enumerate(tensors):
            answers += link.submit(frames, tag=i)
        answers += link.drain(10.0)
        link.close()
        status = server.status()
    finally:
        relay.close()
        stop()
    by_seq = {a.seq: a for a in answers}
    assert len(answers) == len(tensors) == len(by_seq)  # every tensor answered, exactly once
    total = SHAPE[0] * SHAPE[2]
    concealed = 0
    for seq in range(1, len(tensors) + 1):
        a = by_seq[seq]
        if seq in (5, 11):  # nothing of them arrived; later tensors were answered, so the host said so
            assert a.kind == "error" and a.code == P.E_MISSING, a
            continue
        assert a.kind == "result", a
        want = relay.dropped.get(seq, 0) / total
        assert a.result["concealed"] == pytest.approx(want, abs=1e-6)
        assert a.result["slices"] == len(relay.passed[seq])
        assert a.result["concealment"] == "conditional"
        concealed += want > 0
    assert concealed >= 10  # the rule really dropped slices of most tensors
    assert status["slices"]["received"] == sum(len(v) for v in relay.passed.values())
    assert status["slices"]["concealed_tensors"] == concealed
    assert status["errors"] == {"MISSING": 2}


def test_lossless_datagrams_decode_to_the_whole_tensor(bundle, tensors):
    """Without loss every tensor is answered complete, with the same top classes as its whole frame over TCP."""
    server, stop, addr = udp_server(bundle)
    try:
        link = DatagramLink(f"udp://{addr[0]}:{addr[1]}", hello(bundle), interleave=False)
        link.connect()
        answers = []
        for i, frames in enumerate(tensors[:6]):
            answers += link.submit(frames, tag=i)
        answers += link.drain(10.0)
        link.close()
    finally:
        stop()
    model = CloudModel(bundle)
    assert sorted(a.seq for a in answers) == list(range(1, 7))
    for a in answers:
        assert a.kind == "result" and a.result["concealed"] == 0.0
        frames = tensors[a.tag]
        assert a.result["slices"] == len(frames) > 1
        d = model.decode_slices(frames)[0]
        direct, _ = model.infer(model.conceal(d, next(iter(model.decoders))).tensor)
        assert a.result["top"] == direct["top"]


def _raw(sock: socket.socket, data: bytes, wait: float = 0.3) -> list[bytes]:
    sock.send(data)
    out = []
    t0 = time.time()
    while time.time() - t0 < wait:
        ready, _, _ = select.select([sock], [], [], 0.05)
        if ready:
            out.append(sock.recv(65536))
    return out


def test_malformed_and_unauthenticated_datagrams_are_dropped_and_the_server_goes_on(bundle, tensors, tmp_path):
    server, stop, addr = udp_server(bundle, keys={"dev": KEY})
    attacker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    attacker.connect(addr)
    try:
        frame = tensors[0][0]
        good = P.pack_message(P.SLICE, 1, frame)
        bad_crc = bytearray(good)
        bad_crc[-1] ^= 1
        bad_head = bytearray(good)
        bad_head[9] ^= 1
        junk = [b"", b"x", b"LK" + bytes(30), bytes(bad_crc), bytes(bad_head), good[:-3], good + b"\x00",
                bytes(random.Random(1).randrange(256) for _ in range(500)),
                P.pack_json(P.HELLO, 0, {**hello(bundle), "protocol": 1, "client": "c", "auth": True})]  # < 512 B
        for d in junk:  # not one valid message (or a HELLO too short to answer): no answer at all
            assert _raw(attacker, d, 0.1) == [], d[:20]
        # a valid SLICE from an address without a session: NO_SESSION, never larger than what was sent
        small = P.pack_message(P.SLICE, 1, b"LW" + bytes(10))
        got = _raw(attacker, small)
        assert len(got) == 1 and len(got[0]) <= len(small)
        assert P.parse_datagram(got[0]).type == P.ERROR
        # the keyed device must authenticate: an unauthenticated HELLO is refused
        link = DatagramLink(f"udp://{addr[0]}:{addr[1]}", hello(bundle))
        with pytest.raises(P.Refused, match="must authenticate"):
            link.connect()
        link.close()
        # the real device, authenticated
        link = DatagramLink(f"udp://{addr[0]}:{addr[1]}", hello(bundle), key=KEY, window=2)
        link.connect()
        answers = link.submit(tensors[0], tag=0) + link.drain(5.0)
        # forgeries from the device's own address: untagged, wrongly tagged, a DATA, a forged HELLO
        dev = link.transport
        forged_auth = P.Auth(bytes(16) + KEY[16:], bytes(16))
        for d in (P.pack_message(P.SLICE, 2, frame), P.pack_message(P.SLICE, 2, frame, forged_auth),
                  P.pack_message(P.BYE, 0, b"forged"), P.pack_message(P.PING, 9, b"", forged_auth)):
            dev.send(d)
        forged_hello = dict(hello(bundle), protocol=1, client="forger", auth=True, transport="datagram",
                            pad=" " * 600)
        dev.send(P.pack_json(P.HELLO, 0, forged_hello))
        time.sleep(0.2)
        while dev.recv(0.05) is not None:  # the forged HELLO's WELCOME: the device does not act on it
            pass
        link.session.seq = 1  # the forged SLICE 2 above must not have opened tensor 2
        for i in range(1, 6):
            answers += link.submit(tensors[i], tag=i)
        answers += link.drain(5.0)
        # DATA over datagrams, authenticated: BAD_TYPE
        dev.send(P.pack_message(P.DATA, 99, frame, link.session.auth))
        extra = []
        t0 = time.time()
        while time.time() - t0 < 1 and not extra:
            data = dev.recv(0.1)
            if data is not None:
                extra.append(P.parse_datagram(data, link.session.auth))
        link.close()
        status = server.status()
    finally:
        attacker.close()
        stop()
    assert sorted(a.seq for a in answers) == list(range(1, 7))  # datagram answers come in any order
    assert all(a.kind == "result" and a.result["concealed"] == 0.0 for a in answers)
    assert isinstance(extra[0], P.Message) and P.unpack_error(extra[0].body)[0] == P.E_BAD_TYPE
    assert status["datagrams_ignored"] >= len(junk) + 4
    assert status["slices"]["late"] == 0 and status["frames"] == 6


def test_hello_is_retried_until_welcome_and_the_host_repeats_its_welcome(bundle):
    """The first two HELLO datagrams are lost; the host's WELCOME to a repeated HELLO is the same session."""
    server, stop, addr = udp_server(bundle)
    relay_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    relay_sock.bind(("127.0.0.1", 0))
    up = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    up.connect(addr)
    seen = []
    done = threading.Event()

    def relay() -> None:
        device = None
        while not done.is_set():
            ready, _, _ = select.select([relay_sock, up], [], [], 0.05)
            for s in ready:
                data, a = s.recvfrom(65536)
                if s is relay_sock:
                    device = a
                    seen.append(data)
                    if len(seen) > 2:
                        up.send(data)
                        if len(seen) == 3:
                            up.send(data)  # a duplicate of the HELLO: the same WELCOME again
                elif device is not None:
                    relay_sock.sendto(data, device)

    th = threading.Thread(target=relay, daemon=True)
    th.start()
    try:
        host, port = relay_sock.getsockname()
        tr = UdpTransport(host, port)
        s = DatagramSession(tr, hello(bundle), hello_first_wait_s=0.05)
        w = s.handshake()
        welcomes = []
        t0 = time.time()
        while time.time() - t0 < 0.5:
            data = tr.recv(0.05)
            if data is not None:
                welcomes.append(P.parse_json(P.parse_datagram(data).body, "WELCOME"))
        tr.close()
    finally:
        done.set()
        th.join(5)
        relay_sock.close()
        up.close()
        stop()
    assert s.hello_sent == 3 and len(set(seen)) == 1 and len(seen[0]) >= MIN_HELLO_DATAGRAM
    assert w["transport"] == "datagram" and w["deadline_ms"] == 50.0
    assert [x["session"] for x in welcomes] == [w["session"]]


def test_transport_addresses():
    assert parse_address("udp://127.0.0.1:5006") == ("udp", ("127.0.0.1", 5006), {"mtu": 1200})
    assert parse_address("udp://h:1?mtu=512")[2] == {"mtu": 512}
    assert parse_address("serial:///dev/ttyS0?baud=9600&mtu=256")[2] == {"baud": 9600, "mtu": 256}
    for bad in ("udp://h", "udp://h:1?mtu=x", "udp://h:1?mtu=64", "tcp://h:1?mtu=500"):
        with pytest.raises(TransportError):
            parse_address(bad)
    assert send_order(1) == [0] and send_order(5) == [0, 4, 2, 1, 3]
    for n in (3, 7, 8, 100, 145):
        order = send_order(n)
        assert sorted(order) == list(range(n))
        if n >= 16:  # datagrams sent one after the other carry slices far apart; no 4 in a row hold neighbours
            assert min(abs(a - b) for a, b in zip(order, order[1:])) >= n // 8
            assert all(abs(x - y) >= 2 for k in range(n - 3) for i, x in enumerate(order[k:k + 4])
                       for y in order[k + i + 1:k + 4])
    assert max_frame_bytes(1200) == 1164 and max_frame_bytes(1200, auth=False) == 1180


def test_channel_slice_plan_tiles_and_fits(bundle):
    """The channel plan: channel blocks over all rows (rows cut only when there are more slices than channels),
    every frame within the limit, the slices tiling the tensor and decoding to its indices."""
    from lwfc.errors import EncodeError
    from lwfc_host.codec.decoder import Decoder

    assert plan_channel_regions(14, 240, 5) == [(0, 14, 48 * i, 48) for i in range(5)]
    regions = plan_channel_regions(128, 72, 150)
    assert len(regions) == 150 and {r[1] for r in regions} <= {42, 43}  # 3 row bands x 50 channel blocks
    b = load_bundle(bundle)
    tables = load_tables(b.tables_path)
    enc = Encoder(tables)
    h, w, c = SHAPE
    data = small_tensors(b.info, 1, seed=8)[0]
    idx = np.frombuffer(data, dtype=np.int8).astype(np.int64) + 128
    idx = np.asarray(tables.index_of_q, dtype=np.uint8)[idx].reshape(SHAPE)
    dec = Decoder(tables)
    for limit in (100, 200, 600, 5000):
        frames = encode_sliced(enc, idx.tobytes(), h, w, limit, "channels")
        assert all(len(f) <= limit for f in frames)
        got = np.zeros(SHAPE, dtype=np.uint8)
        covered = 0
        for f in frames:
            d = dec.decode(f)
            r0, rn, c0, cn = d.header.region
            got[r0:r0 + rn, :, c0:c0 + cn] = d.indices
            covered += rn * cn
        assert covered == h * c
        np.testing.assert_array_equal(got, idx)
        if limit == 5000:
            assert len(frames) == 1 and not parse_header(frames[0]).sliced
    with pytest.raises(EncodeError, match="one-row, one-channel"):
        encode_sliced(enc, idx.tobytes(), h, w, 30, "channels")  # one payload word: no row fits
    with pytest.raises(ValueError, match="slice plan"):
        choose_plan(tables, "diagonal")
    assert choose_plan(tables, "auto") == "channels"  # no reference channels in this table
    assert choose_plan(type("T", (), {"reference_channel": [-1, 0] + [-1] * 30})(), "auto") == "rows"


@pytest.mark.skipif(shutil.which("socat") is None, reason="needs socat (Debian package socat)")
def test_serial_line_in_datagram_mode(bundle, tensors, tmp_path):
    """Over a real pty pair each slice is its own SLICE message: lost and corrupted slices are concealed, garbage
    between them is skipped, every tensor is answered in order with its concealed fraction."""
    host_end, dev_end = tmp_path / "h", tmp_path / "d"
    socat = subprocess.Popen(["socat", f"pty,raw,echo=0,link={host_end}", f"pty,raw,echo=0,link={dev_end}"])
    stop = None
    try:
        t0 = time.time()
        while not (host_end.exists() and dev_end.exists()):
            assert time.time() - t0 < 10
            time.sleep(0.05)
        server, stop = run_in_thread(CloudModel(bundle), ServerConfig(slice_deadline_s=1.0), serial=[str(host_end)],
                                     baud=115200)
        tr = SerialTransport(str(dev_end), 115200)
        s = P.Session(tr, hello(bundle, "uart0"), answer_timeout_s=20)
        s.handshake()
        rng = random.Random(4)
        want = {}
        total = SHAPE[0] * SHAPE[2]
        for i, frames in enumerate(tensors[:12]):
            seq = i + 1
            s.seq = seq
            s.outstanding[seq] = (P.now_ms(), i)
            s.order.append(seq)
            gone = 0
            for j in send_order(len(frames)):
                msg = bytearray(P.pack_message(P.SLICE, seq, frames[j]))
                if j and rng.random() < 0.25:
                    gone += area(frames[j])
                    if rng.random() < 0.5:
                        continue  # lost on the line
                    msg[20 + rng.randrange(len(frames[j]) - 8)] ^= 0x10  # corrupted: its body CRC fails
                tr.write(bytes(rng.randrange(256) for _ in range(rng.randrange(12))) + bytes(msg))
            want[seq] = gone / total
        got = {}
        order = []
        t0 = time.time()
        while len(got) < len(want) and time.time() - t0 < 30:
            for a in s.poll(0.1):
                order.append(a.seq)
                got[a.seq] = a.result["concealed"] if a.kind == "result" else repr(a)
        tr.close()
        st = server.status()
    finally:
        if stop is not None:
            stop()
        socat.terminate()
        socat.wait(10)
    assert order == sorted(order) == list(range(1, 13))
    assert got == pytest.approx(want, abs=1e-6)
    assert sum(v > 0 for v in want.values()) >= 6 and st["garbage_bytes"] > 0


def test_stream_link_sends_slices_over_tcp(bundle, tensors):
    from lwfc.link import Link

    server, stop = run_in_thread(CloudModel(bundle), ServerConfig(), tcp=["127.0.0.1:0"])
    try:
        link = Link(server.addresses[0], hello(bundle))
        link.connect()
        answers = []
        for i, frames in enumerate(tensors[:5]):
            answers += link.submit(Slices(frames[1:] if i % 2 else frames), tag=i)
        answers += link.drain(10.0)
        link.close()
    finally:
        stop()
    assert [a.seq for a in answers] == [1, 2, 3, 4, 5]
    total = SHAPE[0] * SHAPE[2]
    for a in answers:
        frames = tensors[a.tag]
        want = area(frames[0]) / total if a.tag % 2 else 0.0
        assert a.kind == "result" and a.result["concealed"] == pytest.approx(want)


_MPY_SCRIPT = """
import json
from lwfc.datagram import DatagramSession, send_order, max_frame_bytes, MIN_HELLO_DATAGRAM
from lwfc import protocol as P
from lwfc.tables import parse_tables
from lwfc.encoder import Encoder

class FakeHost(object):
    datagram = True
    def __init__(self):
        self.sent = []
        self.inbox = []
        self.hellos = 0
    def send(self, d):
        self.sent.append(d)
        ev = P.parse_datagram(d)
        if ev.type == P.HELLO:
            self.hellos += 1
            h = json.loads(ev.body)
            if self.hellos == 2:  # the first HELLO is lost
                self.inbox.append(P.pack_json(P.WELCOME, 0, {"protocol": 1, "session": "s", "client": "old"}))
                self.inbox.append(P.pack_json(P.WELCOME, 0, {"protocol": 1, "session": "s", "client": h["client"],
                                                           "nonce": "00112233445566778899aabbccddeeff"}))
    def recv(self, timeout_s):
        return self.inbox.pop(0) if self.inbox else None

tables = parse_tables(open("/in/t.json").read())
job = open("/in/job.txt").read().split()
h, w = int(job[0]), int(job[1])
tr = FakeHost()
s = DatagramSession(tr, {"device": "d", "model": "m", "bundle": "", "table": tables.table_id_hex()},
                    key=open("/in/key.bin", "rb").read(), hello_first_wait_s=0.05)
welcome = s.handshake()
frames = Encoder(tables).encode_int8_sliced(open("/in/q.bin", "rb").read(), h, w, max_frame_bytes(300), "channels")
order = send_order(len(frames))
n0 = len(tr.sent)
seq = s.send_slices([frames[i] for i in order], tag="t")
for k in range(n0, len(tr.sent)):
    open("/out/%03d.bin" % (k - n0), "wb").write(tr.sent[k])
tr.inbox.append(P.pack_message(P.RESULT, seq, b'{"ok": true, "concealed": 0.25}', s.auth))
tr.inbox.append(P.pack_message(P.RESULT, seq, b'{"forged": 1}'))
answers = s.poll(0)
print(tr.hellos, len(tr.sent[0]) >= MIN_HELLO_DATAGRAM, welcome["session"], seq, len(answers),
      answers[0].result["concealed"], answers[0].tag, s.garbage)
# a tall tensor with few channels: more slices than channels, each channel cut into its own row bands
t2 = parse_tables(open("/in/t2.json").read())
for k, f in enumerate(Encoder(t2).encode_int8_sliced(open("/in/q2.bin", "rb").read(), 32, 16, 120, "channels")):
    open("/out/b%03d.lwfc" % k, "wb").write(f)
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed (MicroPython's WebAssembly port)")
def test_datagram_session_under_micropython(bundle, tensors):
    """lwfc.datagram under a real MicroPython: HELLO retried and padded, a stale WELCOME ignored, SLICE datagrams
    byte-identical to CPython's, answers verified (a forged one ignored)."""
    from lwfc_host.codec.micropython import device_files, run_micropython_files

    b = load_bundle(bundle)
    data = small_tensors(b.info, 1, seed=3)[0]
    files = device_files()
    table2, tables2, q2 = make_case(shape=(32, 16, 4), levels=6, groups=2, classes=3, seed=5)
    files.update({"/in/t.json": (bundle / "tables.json").read_bytes(), "/in/q.bin": data, "/in/key.bin": KEY,
                  "/in/job.txt": f"{SHAPE[0]} {SHAPE[1]}".encode(), "/in/t2.json": json.dumps(table2).encode(),
                  "/in/q2.bin": q2.tobytes()})
    out, written = run_micropython_files(_MPY_SCRIPT, files)
    banded = Encoder(tables2).encode_int8_sliced(q2.tobytes(), 32, 16, 120, "channels")
    assert [written[k] for k in sorted(written) if k.startswith("b")] == banded
    regions = [parse_header(f).region for f in banded]
    assert len(banded) > 4 and any(r[1] < 32 for r in regions)  # more slices than channels: row bands too
    assert all(len(f) <= 120 for f in banded) and sum(r[1] * r[3] for r in regions) == 32 * 4
    from lwfc_host.codec.decoder import Decoder

    idx2 = np.asarray(tables2.index_of_q, dtype=np.uint8)[q2.astype(np.int64) + 128]
    for f, (r0, rn, c0, cn) in zip(banded, regions):
        np.testing.assert_array_equal(Decoder(tables2).decode(f).indices, idx2[r0:r0 + rn, :, c0:c0 + cn])
    written = {k: v for k, v in written.items() if not k.startswith("b")}
    assert out.split() == ["2", "True", "s", "1", "1", "0.25", "t", "1"]
    auth = P.Auth(KEY, bytes.fromhex("00112233445566778899aabbccddeeff"))
    frames = Encoder(load_tables(b.tables_path)).encode_int8_sliced(data, SHAPE[0], SHAPE[1], max_frame_bytes(MTU),
                                                                    "channels")
    assert len(frames) > 2 and all(parse_header(f).region[1] == SHAPE[0] for f in frames)
    want = [P.pack_message(P.SLICE, 1, frames[i], auth) for i in send_order(len(frames))]
    assert [written[k] for k in sorted(written)] == want
    assert all(len(d) <= MTU for d in want)



def test_server_conceals_with_calibration_parameters(bundle, tensors, tmp_path):
    """``lwfc serve --conceal-params``: the conditional concealment with fitted statistics; a file that is not one
    is refused at start."""
    from lwfc_host.codec.conceal import fit_conceal_params
    from lwfc_host.serve import ServerError

    b = load_bundle(bundle)
    tables = load_tables(b.tables_path)
    q = np.frombuffer(b"".join(small_tensors(b.info, 16, seed=5)), dtype=np.int8).reshape(16, *SHAPE)
    recon = np.asarray(tables.reconstruction, dtype=np.float32)[np.asarray(tables.index_of_q)[q.astype(int) + 128]]
    fit_conceal_params(recon).save(tmp_path / "p.npz")
    model = CloudModel(bundle, conceal_params=tmp_path / "p.npz")
    frames = tensors[0][1:]  # the first slice lost
    assembly, tid, errors, _ = model.decode_slices(frames)
    with_params = model.conceal(assembly, tid)
    without = CloudModel(bundle).conceal(assembly, tid)
    assert with_params.method == without.method == "conditional" and with_params.concealed > 0 and not errors
    assert not np.array_equal(with_params.tensor, without.tensor)  # the statistics were used
    (tmp_path / "bad.npz").write_bytes(b"not numpy")
    with pytest.raises(ServerError, match="not concealment parameters"):
        CloudModel(bundle, conceal_params=tmp_path / "bad.npz")


def test_authenticated_device_finds_a_restarted_host(bundle, tensors):
    """The host restarts and forgets the session; its NO_SESSION cannot be verified by an authenticated device,
    which instead notices that nothing verifiable came for the host's idle timeout and says HELLO again."""
    config = {"keys": {"dev": KEY}, "idle_timeout_s": 1.0}
    server, stop, addr = udp_server(bundle, **config)
    url = f"udp://{addr[0]}:{addr[1]}"
    link = DatagramLink(url, hello(bundle), key=KEY, keepalive_s=0.2, answer_timeout_s=1.5)
    try:
        link.connect()
        first = link.submit(tensors[0], tag=0) + link.drain(5.0)
        stop()
        server, stop = run_in_thread(CloudModel(bundle), ServerConfig(**config), udp=[f"{addr[0]}:{addr[1]}"])
        answers = []
        t0 = time.time()
        i = 1
        while not any(a.kind == "result" for a in answers) and time.time() - t0 < 20:
            answers += link.submit(tensors[i % len(tensors)], tag=i)
            answers += link.pump(0.3)
            i += 1
        answers += link.drain(5.0)
        link.close()
    finally:
        stop()
    assert [a.kind for a in first] == ["result"]
    assert link.reconnects >= 1
    assert any(a.kind == "result" for a in answers)
    assert all(a.kind == "result" or a.code == P.E_LOST for a in answers)  # the rest: LOST, accounted for


def test_channel_plan_at_every_packet_size():
    """Packet sizes from tiny to ample, on a tensor with few channels: the plan moves between channel blocks and
    per-channel row bands (and halving) and always tiles the tensor with frames that fit, or says it cannot."""
    from lwfc.errors import EncodeError

    _, tables, q = make_case(shape=(6, 20, 4), levels=6, groups=2, classes=3, seed=9)
    enc = Encoder(tables)
    idx = np.asarray(tables.index_of_q, dtype=np.uint8)[q.astype(np.int64) + 128]
    whole = len(enc.encode_indices(idx.tobytes(), 6, 20))
    fitted = 0
    for limit in range(40, whole + 60, 5):
        try:
            frames = encode_sliced(enc, idx.tobytes(), 6, 20, limit, "channels")
        except EncodeError:
            continue
        fitted += 1
        regions = [parse_header(f).region if parse_header(f).sliced else (0, 6, 0, 4) for f in frames]
        assert all(len(f) <= limit for f in frames)
        mask = np.zeros((6, 4), dtype=int)
        for r0, rn, c0, cn in regions:
            mask[r0:r0 + rn, c0:c0 + cn] += 1
        assert (mask == 1).all(), limit
    assert fitted > 10
