"""The inference server over real TCP sockets: answers, load, faults, limits, authentication.

Everything is real: the server (asyncio, in a background thread of this process), sockets on
127.0.0.1, frames from the device encoder, the host decoder, onnxruntime running a small real ONNX head.
"""

from __future__ import annotations

import json
import os
import random
import socket
import struct
import threading
import time
import urllib.request
from pathlib import Path
from typing import Callable, NamedTuple

import pytest
from small_bundle import make_small_bundle, small_frames

from lwfc import protocol as P
from lwfc.bundle import bundle_id
from lwfc.crc32 import crc32
from lwfc.link import Link
from lwfc_host.serve import CloudModel, ServerConfig, run_in_thread
from lwfc_host.serve.config import READ_CHUNK

KEY = bytes(range(16, 48))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("small_bundle")
    make_small_bundle(d)
    return d


@pytest.fixture(scope="module")
def frames(bundle) -> list[bytes]:
    return small_frames(bundle, 40)


@pytest.fixture(scope="module")
def model(bundle) -> CloudModel:
    return CloudModel(bundle, top=3)


@pytest.fixture(scope="module")
def expected(model, frames) -> list[list]:
    """What decoding each frame locally and running the same cloud half gives."""
    return [model.infer(model.decode(f)[0].tensor)[0]["top"] for f in frames]


@pytest.fixture
def server(model):
    started = []

    def start(**cfg):
        status = cfg.pop("status", None)
        config = ServerConfig(hello_timeout_s=cfg.pop("hello_timeout_s", 1.0), idle_timeout_s=5.0,
                              max_garbage=cfg.pop("max_garbage", 64 * 1024), **cfg)
        srv, stop = run_in_thread(model, config, tcp=["127.0.0.1:0"], status=status)
        started.append(stop)
        return srv

    yield start
    for stop in started:
        stop()


def hello_fields(bundle: Path, **over) -> dict:
    table = json.loads((bundle / "tables.json").read_text())["table_id"]
    h = {"device": "dev1", "model": "small_head", "bundle": bundle_id(bundle), "table": table}
    h.update(over)
    return h


class Raw:
    """A hand-driven peer on a real socket: sends arbitrary bytes, a thread collects every message."""

    def __init__(self, url: str):
        host, port = url[len("tcp://"):].rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.parser = P.Parser(1 << 20)
        self.msgs: list = []
        self.closed = threading.Event()
        self.auth = None
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    break
                self.parser.feed(data)
                self.msgs.extend(self.parser)
        except OSError:
            pass
        self.closed.set()

    def send(self, data: bytes):
        self.sock.sendall(data)

    def wait(self, pred, timeout=20.0):
        t0 = time.time()
        while time.time() - t0 < timeout:
            if pred(self.msgs):
                return self.msgs
            if self.closed.is_set() and not pred(self.msgs):
                break
            time.sleep(0.01)
        return self.msgs

    def hello(self, fields: dict, auth_key: bytes | None = None) -> P.Message:
        fields = dict(fields, protocol=1, auth=auth_key is not None)
        self.send(P.pack_json(P.HELLO, 0, fields))
        msgs = self.wait(lambda m: any(isinstance(x, P.Message) and x.type in (P.WELCOME, P.REFUSE) for x in m))
        m = [x for x in msgs if isinstance(x, P.Message) and x.type in (P.WELCOME, P.REFUSE)][0]
        if m.type == P.WELCOME and auth_key is not None:
            self.auth = P.Auth(auth_key, bytes.fromhex(json.loads(m.body)["nonce"]))
            self.parser.auth = self.auth
        return m

    def answers(self) -> dict[int, list[tuple]]:
        """seq -> [("result", top) | ("error", code)] (an ERROR with count n answers n seqs)."""
        out: dict[int, list[tuple]] = {}
        for m in self.msgs:
            if not isinstance(m, P.Message):
                continue
            if m.type == P.RESULT:
                out.setdefault(m.seq, []).append(("result", json.loads(m.body)["top"]))
            elif m.type == P.ERROR and m.seq:
                code, count, _ = P.unpack_error(m.body)
                for s in range(m.seq, m.seq + count):
                    out.setdefault(s, []).append(("error", code))
        return out

    def close(self):
        try:  # shutdown first: a thread blocked in recv() would keep the FIN from going out
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def test_results_equal_local_decoding(server, bundle, frames, expected):
    srv = server()
    link = Link(srv.addresses[0], hello_fields(bundle), window=4, policy="block")
    welcome = link.connect()
    assert welcome["max_message"] >= 1 << 16 and welcome["classes"] == 10
    answers = []
    for i, f in enumerate(frames):
        answers += link.submit(f, tag=i)
    answers += link.drain(30)
    link.close()
    assert sorted(a.tag for a in answers) == list(range(len(frames)))
    for a in answers:
        assert a.kind == "result", a
        assert a.result["top"] == expected[a.tag]
        assert a.result["bits_per_element"] == pytest.approx(8 * len(frames[a.tag]) / (8 * 8 * 16), abs=1e-6)


def test_load_20_devices_2000_frames_none_lost(server, bundle, frames, expected):
    srv = server(workers=2)
    devices, per = 20, 100
    got: list[list] = [[] for _ in range(devices)]
    failures: list[BaseException] = []

    def device(k: int):
        try:
            link = Link(srv.addresses[0], hello_fields(bundle, device=f"load{k}"), window=4, policy="block")
            link.connect()
            for i in range(per):
                got[k] += link.submit(frames[(k + i) % len(frames)], tag=(k + i) % len(frames))
            got[k] += link.drain(60)
            link.close()
        except BaseException as exc:  # noqa: BLE001
            failures.append(exc)

    threads = [threading.Thread(target=device, args=(k,)) for k in range(devices)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not failures
    answers = [a for g in got for a in g]
    assert len(answers) == devices * per
    assert all(a.kind == "result" for a in answers), [a for a in answers if a.kind != "result"][:3]
    assert all(a.result["top"] == expected[a.tag] for a in answers)
    st = srv.status()
    assert st["frames"] >= devices * per and st["error_total"] == 0
    assert st["connections_total"] >= devices


def _frame_with_table(frame: bytes, table_id: bytes) -> bytes:
    body = frame[:4] + table_id + frame[8:-4]
    return body + struct.pack("<I", crc32(body))


# Corruptions: (rng, seq, lwfc frame) -> the DATA message as it goes on the line.

def _good(rng: random.Random, seq: int, f: bytes) -> bytes:
    return P.pack_message(P.DATA, seq, f)


def _frame_bit_flip(rng: random.Random, seq: int, f: bytes) -> bytes:
    b = bytearray(f)
    b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    return P.pack_message(P.DATA, seq, bytes(b))


def _frame_truncated(rng: random.Random, seq: int, f: bytes) -> bytes:
    return P.pack_message(P.DATA, seq, f[:rng.randrange(1, len(f))])


def _body_bit_flip(rng: random.Random, seq: int, f: bytes) -> bytes:
    b = bytearray(P.pack_message(P.DATA, seq, f))
    b[16 + rng.randrange(len(f))] ^= 1 << rng.randrange(8)
    return bytes(b)


def _unknown_table(rng: random.Random, seq: int, f: bytes) -> bytes:
    return P.pack_message(P.DATA, seq, _frame_with_table(f, b"\xde\xad\xbe\xef"))


def _header_destroyed(rng: random.Random, seq: int, f: bytes) -> bytes:
    b = bytearray(P.pack_message(P.DATA, seq, f))
    b[rng.randrange(16)] ^= 1 << rng.randrange(8)
    return bytes(b)


def _trailing_bytes(rng: random.Random, seq: int, f: bytes) -> bytes:
    return P.pack_message(P.DATA, seq, f + b"\x00\x01")


class Fault(NamedTuple):
    name: str
    corrupt: Callable[[random.Random, int, bytes], bytes]
    answer: int | None  # the ERROR code the DATA's seq gets first; None: its RESULT
    garbage_before: bool = False  # random bytes on the line before it
    previous_again: bool = False  # the previous DATA repeated before it (answered DUPLICATE)


# DATA number i gets FAULTS[i % 9]
FAULTS = [
    Fault("good", _good, None),
    Fault("a bit flip inside the lwfc frame (the frame's own CRC catches it)", _frame_bit_flip, P.E_BAD_FRAME),
    Fault("truncated lwfc frame", _frame_truncated, P.E_BAD_FRAME),
    Fault("a bit flip in the message body on the wire", _body_bit_flip, P.E_CORRUPT),
    Fault("a frame for a table the host does not hold", _unknown_table, P.E_UNKNOWN_TABLE),
    Fault("good, after garbage on the line", _good, None, garbage_before=True),
    Fault("the previous DATA again (duplicated on the line), then a good one", _good, None, previous_again=True),
    Fault("the header destroyed on the line: the host sees a gap and answers MISSING", _header_destroyed,
          P.E_MISSING),
    Fault("trailing bytes after the lwfc frame", _trailing_bytes, P.E_BAD_FRAME),
]


def test_fault_injection_1000_corrupted_frames(server, bundle, frames, expected):
    """Every DATA is answered exactly once with the right result or error code; the server survives."""
    srv = server()
    raw = Raw(srv.addresses[0])
    assert raw.hello(hello_fields(bundle)).type == P.WELCOME
    rng = random.Random(7)
    want: dict[int, tuple] = {}
    duplicates: dict[int, int] = {}
    corrupted = 0
    seq = 0
    prev_msg = None
    stream = []
    n = 1600
    for i in range(n):
        seq += 1
        f = frames[i % len(frames)]
        fault = FAULTS[i % len(FAULTS)]
        if fault.garbage_before:
            stream.append(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))))
        if fault.previous_again:
            stream.append(prev_msg)
            duplicates[seq - 1] = duplicates.get(seq - 1, 0) + 1
        msg = fault.corrupt(rng, seq, f)
        want[seq] = ("result", expected[i % len(frames)]) if fault.answer is None else ("error", fault.answer)
        corrupted += fault.answer is not None
        stream.append(msg)
        prev_msg = msg
    # the last message must not be a destroyed one, or nothing would reveal the gap
    seq += 1
    stream.append(P.pack_message(P.DATA, seq, frames[0]))
    want[seq] = ("result", expected[0])
    assert corrupted >= 1000
    data = b"".join(stream)
    for k in range(0, len(data), 4096):
        raw.send(data[k:k + 4096])
    raw.wait(lambda m: raw.answers().get(seq))
    got = raw.answers()
    raw.close()
    assert set(got) == set(want)
    for s, w in want.items():
        answers = got[s]
        assert answers[0] == w, (s, answers, w)
        extra = answers[1:]
        assert extra == [("error", P.E_DUPLICATE)] * duplicates.get(s, 0), (s, answers)
    st = srv.status()
    assert st["errors"]["BAD_FRAME"] >= 3 * n // 9 and st["errors"]["MISSING"] >= n // 9 - 1
    assert st["max_buffered_bytes"] <= srv.max_message + 36 + READ_CHUNK
    # and the server still serves a well-behaved device
    link = Link(srv.addresses[0], hello_fields(bundle), window=2)
    link.connect()
    ans = link.submit(frames[1], tag=1) + link.drain(10)
    link.close()
    assert [a.kind for a in ans] == ["result"] and ans[0].result["top"] == expected[1]


def test_silent_device_is_closed_after_hello_timeout(server):
    srv = server(hello_timeout_s=0.3)
    raw = Raw(srv.addresses[0])
    t0 = time.time()
    assert raw.closed.wait(5)
    assert 0.25 < time.time() - t0 < 3
    assert [m.type for m in raw.msgs] == [P.BYE]
    assert raw.msgs[0].body == b"hello timeout"


def test_disconnect_mid_frame_and_data_before_hello(server, bundle, frames, expected):
    srv = server()
    raw = Raw(srv.addresses[0])
    raw.send(P.pack_message(P.DATA, 1, frames[0]))
    raw.wait(lambda m: m)
    assert P.unpack_error(raw.msgs[0].body)[0] == P.E_NO_SESSION
    assert raw.hello(hello_fields(bundle)).type == P.WELCOME
    msg = P.pack_message(P.DATA, 1, frames[0])
    raw.send(msg[: len(msg) // 2])
    raw.close()
    time.sleep(0.2)
    link = Link(srv.addresses[0], hello_fields(bundle))
    link.connect()
    ans = link.submit(frames[2], tag=2) + link.drain(10)
    link.close()
    assert ans[0].result["top"] == expected[2]
    t0 = time.time()
    while srv.status()["connections_open"] and time.time() - t0 < 5:
        time.sleep(0.05)
    assert srv.status()["connections_open"] == 0


def test_gigabyte_of_junk_closes_only_that_connection(server, bundle, frames, expected):
    srv = server(max_garbage=256 * 1024)
    good = Link(srv.addresses[0], hello_fields(bundle, device="good"))
    good.connect()
    raw = Raw(srv.addresses[0])
    junk = os.urandom(1 << 20)
    sent = 0
    try:
        while sent < 1 << 30:
            raw.sock.sendall(junk)
            sent += len(junk)
    except OSError:
        pass
    assert raw.closed.wait(10)
    assert sent < 64 << 20  # cut off long before a gigabyte
    errs = [P.unpack_error(m.body)[0] for m in raw.msgs if isinstance(m, P.Message) and m.type == P.ERROR]
    assert P.E_GARBAGE in errs
    st = srv.status()
    assert st["max_buffered_bytes"] <= srv.max_message + 36 + READ_CHUNK
    ans = good.submit(frames[3], tag=3) + good.drain(10)
    good.close()
    assert ans[0].kind == "result" and ans[0].result["top"] == expected[3]


def test_oversized_message_is_refused_and_closed(server, bundle):
    srv = server()
    raw = Raw(srv.addresses[0])
    assert raw.hello(hello_fields(bundle)).type == P.WELCOME
    head = struct.pack("<2sBBII", b"LK", P.DATA, 0, 1, 1 << 31)
    raw.send(head + struct.pack("<I", crc32(head)))
    assert raw.closed.wait(5)
    errs = [P.unpack_error(m.body) for m in raw.msgs if isinstance(m, P.Message) and m.type == P.ERROR]
    assert errs and errs[0][0] == P.E_TOO_LARGE


@pytest.mark.parametrize("over, code", [
    ({"table": "00000000"}, P.R_TABLE),
    ({"model": "resnet_fmnist"}, P.R_MODEL),
    ({"bundle": "12345678"}, P.R_MODEL),
    ({"device": "has space"}, P.R_BAD_HELLO),
    ({"protocol": 2}, P.R_PROTOCOL),
])
def test_hello_refusals(server, bundle, over, code):
    srv = server()
    raw = Raw(srv.addresses[0])
    fields = dict(hello_fields(bundle), protocol=1, auth=False)
    fields.update(over)
    raw.send(P.pack_json(P.HELLO, 0, fields))
    raw.wait(lambda m: m)
    m = raw.msgs[0]
    assert m.type == P.REFUSE and json.loads(m.body)["code"] == code
    assert raw.closed.wait(5)


def test_authentication(server, bundle, frames, expected):
    srv = server(keys={"dev1": KEY}, require_auth=True)
    link = Link(srv.addresses[0], hello_fields(bundle), key=KEY)
    assert "nonce" in link.connect()
    ans = link.submit(frames[4], tag=4) + link.drain(10)
    link.close()
    assert ans[0].result["top"] == expected[4]
    # no key: refused
    raw = Raw(srv.addresses[0])
    assert json.loads(raw.hello(hello_fields(bundle)).body)["code"] == P.R_AUTH
    # wrong key: what the host cannot verify is ignored (PROTOCOL.md 8: it may be injected), so it gets no
    # answer and the session stays; it counts as garbage, and a device that keeps sending with the wrong key
    # is cut off by the garbage budget (ERROR GARBAGE, which names the likely cause)
    raw = Raw(srv.addresses[0])
    assert raw.hello(hello_fields(bundle), auth_key=b"not-the-key-0123").type == P.WELCOME
    raw.parser.auth = None  # we cannot check the host's tags without the real key
    forged = P.pack_message(P.DATA, 1, frames[0], raw.auth)
    raw.send(forged)
    assert not raw.closed.wait(0.5) and raw.answers() == {}
    raw.send(forged * (64 * 1024 // len(forged) + 2))
    assert raw.closed.wait(5)
    errs = [P.unpack_error(m.body) for m in raw.msgs if isinstance(m, P.Message) and m.type == P.ERROR]
    assert raw.answers() == {} and [e[0] for e in errs] == [P.E_GARBAGE] and "wrong key" in errs[0][2]
    # unknown device name
    raw = Raw(srv.addresses[0])
    assert json.loads(raw.hello(hello_fields(bundle, device="intruder"), auth_key=KEY).body)["code"] == P.R_AUTH


def test_status_endpoint(server, bundle, frames):
    srv = server(status="127.0.0.1:0")
    link = Link(srv.addresses[0], hello_fields(bundle))
    link.connect()
    link.submit(frames[0], tag=0)
    link.drain(10)
    link.close()
    url = [a for a in srv.addresses if a.startswith("http://")][0]
    with urllib.request.urlopen(url, timeout=5) as r:
        st = json.loads(r.read())
    assert st["frames"] == 1 and st["decode_ms"]["n"] == 1 and st["bits_per_element"] > 0
    assert set(st["decode_ms"]) >= {"p50", "p95", "p99"}


def test_connection_limit_refuses_busy(server, bundle):
    srv = server(max_connections=1)
    first = Link(srv.addresses[0], hello_fields(bundle))
    first.connect()
    raw = Raw(srv.addresses[0])
    raw.wait(lambda m: m)
    assert raw.msgs[0].type == P.REFUSE and json.loads(raw.msgs[0].body)["code"] == P.R_BUSY
    assert raw.closed.wait(5)
    first.close()
