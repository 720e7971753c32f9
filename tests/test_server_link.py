"""The device's accounting under faults: every frame it sends ends up in its summary as a result or an
error (host error codes, LOST, SEND_FAILED), over TCP and over a serial pty pair with garbage on the line."""

from __future__ import annotations

import json
import random
import shutil
import socket
import subprocess
import threading
import time

import pytest
from small_bundle import make_small_bundle, small_frames

from lwfc import protocol as P
from lwfc.bundle import bundle_id
from lwfc.link import Link
from lwfc.protocol import ConnectionClosed, Session
from lwfc.runner import summarize
from lwfc.transport import SerialTransport
from lwfc_host.serve import CloudModel, ServerConfig, run_in_thread


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    d = tmp_path_factory.mktemp("small_link")
    make_small_bundle(d)
    return d


@pytest.fixture(scope="module")
def frames(bundle):
    return small_frames(bundle, 20)


def hello(bundle, device="dev"):
    return {"device": device, "model": "small_head", "bundle": bundle_id(bundle),
            "table": json.loads((bundle / "tables.json").read_text())["table_id"]}


def record(i, frame, a):
    return {"index": i, "bytes": len(frame), "elements": 1024, "kind": a.kind, "code": a.code,
            "rtt_ms": a.rtt_ms, "encode_ms": 0.0}


def test_device_summary_counts_results_and_errors(bundle, frames):
    server, stop = run_in_thread(CloudModel(bundle), ServerConfig(), tcp=["127.0.0.1:0"])
    try:
        link = Link(server.addresses[0], hello(bundle), window=3, policy="block")
        link.connect()
        sent = []
        answers = []
        rng = random.Random(1)
        for i in range(60):
            f = frames[i % len(frames)]
            if i % 3 == 1:
                b = bytearray(f)
                b[rng.randrange(len(b))] ^= 0x80
                f = bytes(b)
            elif i % 3 == 2:
                f = f[: len(f) // 2]
            sent.append(f)
            answers += link.submit(f, tag=i)
        answers += link.drain(30)
        link.close()
    finally:
        stop()
    by_tag = {a.tag: a for a in answers}
    assert sorted(by_tag) == list(range(60)) and len(answers) == 60
    for i, a in by_tag.items():
        assert (a.kind, a.code) == (("result", 0) if i % 3 == 0 else ("error", P.E_BAD_FRAME)), (i, a)
    s = summarize([record(i, sent[i], by_tag[i]) for i in range(60)], 1.0)
    assert s["frames"] == 60 and s["results"] == 20 and s["errors"] == {"BAD_FRAME": 40}


class MuteHost:
    """A peer that welcomes a device, then swallows its frames without answering, then hangs up and stops
    listening: the host crashed."""

    def __init__(self):
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.url = f"tcp://127.0.0.1:{self.listener.getsockname()[1]}"
        self.got = 0
        self.hang_up = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        conn, _ = self.listener.accept()
        self.listener.close()
        p = P.Parser()
        conn.settimeout(0.05)
        while not self.hang_up.is_set():
            try:
                data = conn.recv(65536)
            except socket.timeout:
                continue
            if not data:
                break
            p.feed(data)
            for m in p:
                if isinstance(m, P.Message) and m.type == P.HELLO:
                    conn.sendall(P.pack_json(P.WELCOME, 0, {"protocol": 1, "session": "x", "max_message": 1 << 20,
                                                            "keepalive_s": 10, "timeout_s": 30}))
                elif isinstance(m, P.Message) and m.type == P.DATA:
                    self.got += 1
        conn.shutdown(socket.SHUT_RDWR)
        conn.close()


def test_unanswered_frames_are_lost_and_queued_ones_fail_visibly(bundle, frames):
    host = MuteHost()
    link = Link(host.url, hello(bundle), window=2, queue_frames=8, policy="drop-oldest", answer_timeout_s=0.3,
                reconnect_attempts=2)
    link.connect()
    answers = []
    for i in range(4):
        answers += link.submit(frames[i], tag=i)
    time.sleep(0.4)
    answers += link.pump(0.05)  # the two in flight time out: LOST; two more go out
    assert sorted(a.tag for a in answers) == [0, 1] and all(a.code == P.E_LOST for a in answers)
    for i in range(4, 8):
        answers += link.submit(frames[i], tag=i)
    host.hang_up.set()
    with pytest.raises(ConnectionClosed, match="cannot reconnect") as info:
        for _ in range(100):
            answers += link.pump(0.05)
    answers += info.value.answers
    # the queue and the in-flight frames were all accounted for, none twice
    assert link.pending() == 0
    assert sorted(a.tag for a in answers) == list(range(8))
    assert {a.code for a in answers if a.tag >= 2} <= {P.E_LOST, P.E_SEND_FAILED}
    assert any(a.code == P.E_SEND_FAILED for a in answers)
    assert host.got >= 2


@pytest.mark.skipif(shutil.which("socat") is None, reason="needs socat (Debian package socat)")
def test_serial_line_with_garbage_and_bit_flips(bundle, frames, tmp_path):
    """Over a real pty pair: garbage, destroyed headers and corrupted bodies between frames; every DATA is
    answered (RESULT, CORRUPT or MISSING) and the server keeps the line."""
    host_end, dev_end = tmp_path / "h", tmp_path / "d"
    socat = subprocess.Popen(["socat", f"pty,raw,echo=0,link={host_end}", f"pty,raw,echo=0,link={dev_end}"])
    stop = None
    try:
        t0 = time.time()
        while not (host_end.exists() and dev_end.exists()):
            assert time.time() - t0 < 10
            time.sleep(0.05)
        server, stop = run_in_thread(CloudModel(bundle), ServerConfig(), serial=[str(host_end)], baud=115200)
        tr = SerialTransport(str(dev_end), 115200)
        s = Session(tr, hello(bundle, "uart0"), answer_timeout_s=20)
        tr.write(b"\x00\xffboot garbage LK\r\n")
        s.handshake()
        rng = random.Random(3)
        want = {}
        for i in range(150):
            seq = i + 1
            f = frames[i % len(frames)]
            kind = i % 5
            msg = bytearray(P.pack_message(P.DATA, seq, f))
            if kind == 1:
                msg[16 + rng.randrange(len(f))] ^= 0x04
                want[seq] = P.E_CORRUPT
            elif kind == 3:
                msg[rng.randrange(16)] ^= 0x01
                want[seq] = P.E_MISSING
            else:
                want[seq] = 0
            s.outstanding[seq] = (P.now_ms(), i)
            s.order.append(seq)
            s.seq = seq
            tr.write(bytes(rng.randrange(256) for _ in range(rng.randrange(20))) + bytes(msg))
        s.send_frame(frames[0], tag="last")
        want[151] = 0
        got = {}
        t0 = time.time()
        while len(got) < len(want) and time.time() - t0 < 30:
            for a in s.poll(0.1):
                got[a.seq] = a.code if a.kind == "error" else 0
        tr.close()
        st = server.status()
    finally:
        if stop is not None:
            stop()
        socat.terminate()
        socat.wait(10)
    assert got == want
    assert st["garbage_bytes"] > 0 and st["frames"] == sum(1 for c in want.values() if c == 0)


def test_keepalive_holds_the_session_and_reconnect_recovers(bundle, frames):
    server, stop = run_in_thread(CloudModel(bundle), ServerConfig(idle_timeout_s=0.5), tcp=["127.0.0.1:0"])
    try:
        # pings every 0.1 s keep an otherwise idle session open past the host's 0.5 s idle timeout
        link = Link(server.addresses[0], hello(bundle), keepalive_s=0.1)
        link.connect()
        t0 = time.time()
        while time.time() - t0 < 1.2:
            assert link.pump(0.05) == []
        ans = link.submit(frames[0], tag="a") + link.drain(10)
        assert [a.kind for a in ans] == ["result"] and link.reconnects == 0
        # without keep-alive the host closes the idle session (BYE); the link reconnects and goes on
        quiet = Link(server.addresses[0], hello(bundle, "quiet"), keepalive_s=60)
        quiet.connect()
        time.sleep(0.8)
        got = []
        for i in range(3):
            got += quiet.submit(frames[i], tag=i)
            time.sleep(0.05)
        got += quiet.drain(10)
        quiet.close()
        link.close()
    finally:
        stop()
    assert quiet.reconnects == 1
    assert sorted(a.tag for a in got) == [0, 1, 2]
    assert all(a.kind == "result" or a.code == P.E_LOST for a in got)
    assert sum(a.kind == "result" for a in got) >= 2
