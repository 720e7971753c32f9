"""Link protocol (codec_spec/PROTOCOL.md): envelope, resynchronising parser, HMAC, send queue, addresses."""

from __future__ import annotations

import hashlib
import hmac
import random
import struct

import pytest

from lwfc import protocol as P
from lwfc.crc32 import crc32
from lwfc.sendqueue import SendQueue
from lwfc.transport import TransportError, parse_address


def messages(n: int, size: int = 50, seed: int = 0) -> list[tuple[int, bytes]]:
    rng = random.Random(seed)
    return [(i + 1, bytes(rng.randrange(256) for _ in range(rng.randrange(size)))) for i in range(n)]


def parse_all(stream: bytes, chunk: int = 7, max_message: int = 1 << 16) -> tuple[list, P.Parser]:
    p = P.Parser(max_message)
    out = []
    for i in range(0, len(stream), chunk):
        p.feed(stream[i:i + chunk])
        out.extend(p)
    return out, p


def test_envelope_layout():
    m = P.pack_message(P.DATA, 7, b"abc")
    assert m[:2] == b"LK" and m[2] == P.DATA and m[3] == 0
    assert struct.unpack("<II", m[4:12]) == (7, 3)
    assert struct.unpack("<I", m[12:16])[0] == crc32(m[:12])
    assert m[16:19] == b"abc" and struct.unpack("<I", m[19:23])[0] == crc32(b"abc")
    assert len(m) == 20 + 3


def test_roundtrip_in_small_chunks():
    msgs = messages(50)
    stream = b"".join(P.pack_message(P.DATA, s, b) for s, b in msgs)
    out, p = parse_all(stream, chunk=3)
    assert [(m.seq, m.body) for m in out] == msgs
    assert p.garbage == 0


def test_resync_after_garbage_and_false_syncs():
    msgs = messages(40, seed=1)
    rng = random.Random(2)
    parts = []
    for s, b in msgs:
        # garbage full of sync bytes and a fake header whose CRC fails
        parts.append(b"LK" * rng.randrange(3) + bytes(rng.randrange(256) for _ in range(rng.randrange(40))) + b"L")
        parts.append(P.pack_message(P.DATA, s, b))
    out, p = parse_all(b"".join(parts), chunk=5)
    assert [(m.seq, m.body) for m in out if isinstance(m, P.Message)] == msgs
    assert p.garbage > 0


def test_body_bit_flip_is_corrupt_with_seq_and_stream_continues():
    a = P.pack_message(P.DATA, 1, b"hello world")
    b = bytearray(P.pack_message(P.DATA, 2, b"second"))
    b[18] ^= 0x10
    c = P.pack_message(P.DATA, 3, b"third")
    out, _ = parse_all(a + bytes(b) + c)
    assert out[0].seq == 1 and out[2].seq == 3
    assert out[1] == (P.CORRUPT, P.DATA, 2, 6)


def test_header_bit_flip_skips_the_message():
    a = bytearray(P.pack_message(P.DATA, 1, b"x" * 30))
    a[9] ^= 0x01  # the length: the header CRC catches it
    out, p = parse_all(bytes(a) + P.pack_message(P.DATA, 2, b"ok"))
    assert [m.seq for m in out] == [2]
    assert p.garbage == len(a)


def test_every_single_bit_flip_is_caught():
    good = P.pack_message(P.DATA, 5, b"payload bytes")
    tail = P.pack_message(P.DATA, 6, b"next")
    for bit in range(8 * len(good)):
        bad = bytearray(good)
        bad[bit // 8] ^= 1 << (bit % 8)
        out, _ = parse_all(bytes(bad) + tail, chunk=64)
        assert not any(isinstance(m, P.Message) and m.seq == 5 for m in out)
        assert isinstance(out[-1], P.Message) and out[-1].seq == 6


def test_too_large_is_reported_without_waiting_or_allocating():
    head = struct.pack("<2sBBII", b"LK", P.DATA, 0, 9, 1 << 30)
    msg = head + struct.pack("<I", crc32(head))
    p = P.Parser(max_message=1000)
    p.feed(msg)
    assert p.next() == (P.TOO_LARGE, P.DATA, 9, 1 << 30)
    assert p.broken and p.pending() == 0


def test_unverifiable_messages_are_garbage_in_an_authenticated_session():
    """PROTOCOL.md 4 and 8: with a session key, a too-large header is dropped like a bad header (resync, no
    TOO_LARGE, the parser keeps going), and corrupt or untagged messages count in full as garbage."""
    auth = P.Auth(b"secret-key-16byt", b"n" * 16)
    head = struct.pack("<2sBBII", b"LK", P.DATA, 0, 9, 1 << 30)
    too_large = head + struct.pack("<I", crc32(head))
    corrupt = bytearray(P.pack_message(P.DATA, 2, b"abcdef", auth))
    corrupt[20] ^= 1
    untagged = P.pack_message(P.DATA, 3, b"xyz")
    good = P.pack_message(P.DATA, 4, b"abc", auth)
    p = P.Parser(max_message=1000)
    p.auth = auth
    p.feed(too_large + bytes(corrupt) + untagged)
    events = list(p)
    assert [e[0] for e in events] == [P.CORRUPT, P.BAD_AUTH] and not p.broken
    assert p.garbage_since_valid >= len(too_large) - 1 + len(corrupt) + len(untagged)
    p.feed(good)
    m = p.next()
    assert isinstance(m, P.Message) and m.seq == 4 and p.garbage_since_valid == 0


def test_corrupt_messages_count_against_the_garbage_budget():
    bad = bytearray(P.pack_message(P.DATA, 1, bytes(500)))
    bad[-1] ^= 0xFF
    p = P.Parser(max_message=1000)
    p.feed(bytes(bad) * 3)
    assert [e[0] for e in p] == [P.CORRUPT] * 3
    assert p.garbage_since_valid == 3 * len(bad)


def test_deeply_nested_json_is_a_protocol_error():
    with pytest.raises(P.ProtocolError, match="nests JSON too deeply"):
        P.parse_json(b"[" * 60000, "HELLO")


def test_buffer_stays_bounded_on_junk():
    p = P.Parser(max_message=4096)
    rng = random.Random(3)
    for _ in range(200):
        p.feed(bytes(rng.randrange(256) for _ in range(1000)) + b"LK")
        list(p)
    assert p.max_buffered <= 4096 + 36 + 1000 + 2
    assert p.garbage >= 200 * 1000


def test_hmac_matches_python_hmac():
    for key, data in [(b"k" * 16, b""), (bytes(range(100)), b"abc" * 50), (b"0123456789abcdef", b"x")]:
        assert P.hmac_sha256(key, data) == hmac.new(key, data, hashlib.sha256).digest()


def test_auth_tags_checked():
    auth = P.Auth(b"secret-key-16byt", b"n" * 16)
    good = P.pack_message(P.DATA, 1, b"abc", auth)
    assert len(good) == 20 + 3 + 16
    p = P.Parser()
    p.auth = auth
    p.feed(good)
    assert isinstance(p.next(), P.Message)
    forged = P.pack_message(P.DATA, 2, b"abc", P.Auth(b"wrong-key-16byte", b"n" * 16))
    unauth = P.pack_message(P.DATA, 3, b"abc")
    replay_other_session = P.pack_message(P.DATA, 4, b"abc", P.Auth(b"secret-key-16byt", b"m" * 16))
    p.feed(forged + unauth + replay_other_session)
    assert [e[0] for e in p] == [P.BAD_AUTH] * 3


def test_error_body_roundtrip():
    p = P.Parser()
    p.feed(P.pack_error(17, P.E_MISSING, "three gone", count=3))
    m = p.next()
    assert m.type == P.ERROR and m.seq == 17
    assert P.unpack_error(m.body) == (P.E_MISSING, 3, "three gone")


def test_seq_arithmetic_wraps():
    assert P.next_seq(5) == 6
    assert P.next_seq(2**32 - 1) == 1
    assert P.seq_ahead(1, 2**32 - 1) == 2
    assert P.seq_ahead(3, 5) == -2


def test_send_queue_drop_oldest_and_block():
    q = SendQueue(max_frames=3, max_bytes=100, policy="drop-oldest")
    for i in range(5):
        ok, dropped = q.put(b"x" * 10, tag=i)
        assert ok
        assert [t for _, t in dropped] == ([] if i < 3 else [i - 3])
    assert [q.pop()[1] for _ in range(3)] == [2, 3, 4]
    ok, dropped = q.put(b"y" * 90, tag="big")
    ok2, dropped2 = q.put(b"z" * 20, tag="z")  # bytes bound: the big one goes
    assert ok and ok2 and [t for _, t in dropped2] == ["big"]
    b = SendQueue(max_frames=2, max_bytes=1000, policy="block")
    assert b.put(b"1")[0] and b.put(b"2")[0]
    assert b.put(b"3") == (False, [])
    assert len(b) == 2
    with pytest.raises(ValueError, match="exceeds the queue's byte limit"):
        b.put(b"x" * 2000)
    with pytest.raises(ValueError, match="policy"):
        SendQueue(policy="sometimes")


def test_parse_address():
    assert parse_address("tcp://127.0.0.1:5005") == ("tcp", ("127.0.0.1", 5005), {})
    assert parse_address("serial:///dev/ttyUSB0?baud=921600") == ("serial", "/dev/ttyUSB0", {"baud": 921600})
    assert parse_address("serial:///dev/ttyS1")[2]["baud"] == 115200
    for bad, msg in [("127.0.0.1:5005", "must look like"), ("tcp://host", "needs a port"),
                     ("tcp://h:port", "not a number"), ("tcp://h:70000", "out of range"),
                     ("serial://", "names no device"), ("serial:///dev/x?baud=fast", "baud rate"),
                     ("quic://h:1", "unknown transport")]:
        with pytest.raises(TransportError, match=msg):
            parse_address(bad)


def test_device_link_modules_are_python37_syntax():
    """Coral's Mendel Linux ships Python 3.7: the device package must parse there (MicroPython imports the
    link modules: tests/test_flash.py runs them on a MicroPython board)."""
    import ast
    from pathlib import Path

    import lwfc

    root = Path(lwfc.__file__).parent
    for name in ("auth", "protocol", "transport", "sendqueue", "link", "datagram", "keys", "runner", "__main__"):
        src = (root / f"{name}.py").read_text()
        ast.parse(src, f"{name}.py", feature_version=(3, 7))
