"""End to end with real parts only: `lwfc serve` and the device runner (`python -m lwfc run`) as separate
processes, the real int8 EfficientNet-Lite0 edge.tflite, a real TCP link on 127.0.0.1 and a real pty
pair made by socat (serial). The host's answers must equal what decoding the same frames locally gives.

The bundle is the demo's cached one (``$LWFC_CACHE/bundles/efficientnet_lite0``); the first run on a
fresh machine converts it (a few minutes).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lwfc_host.serve import CloudModel
from lwfc_host.serve.demo_bundle import ensure_bundle, ensure_tables, photo_files

N_IMAGES = 3


@pytest.fixture(scope="module")
def bundle() -> Path:
    b = ensure_bundle(log=lambda m: None)
    photos = photo_files(b.parent.parent / "photos")
    ensure_tables(b, photos, log=lambda m: None)
    return b


@pytest.fixture(scope="module")
def images(bundle, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("images")
    for p in photo_files(bundle.parent.parent / "photos")[:N_IMAGES]:
        shutil.copy(p, d / p.name)
    return d


class Serve:
    """`lwfc serve` in its own process; waits for its 'listening on' lines."""

    def __init__(self, args: list[str], expect: int = 1):
        self.proc = subprocess.Popen([sys.executable, "-m", "lwfc_host", "serve", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.addresses = []
        t0 = time.time()
        while len(self.addresses) < expect:
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError("lwfc serve exited: " + self.proc.stderr.read())
            if "listening on" in line:
                self.addresses.append(line.split("listening on ", 1)[1].strip())
            assert time.time() - t0 < 60

    def stop(self) -> tuple[dict, str]:
        self.proc.send_signal(signal.SIGTERM)
        _out, err = self.proc.communicate(timeout=30)
        assert self.proc.returncode == 0, err
        final = json.loads([ln for ln in err.splitlines() if ln.startswith("{")][-1])
        return final, err


def run_device(bundle: Path, url: str, images: Path, work: Path, *extra: str) -> dict:
    frames = work / "frames"
    report = work / "run.json"
    proc = subprocess.run([sys.executable, "-m", "lwfc", "run", "--bundle", str(bundle), "--connect", url,
                           "--images", str(images), "--save-frames", str(frames), "--json", str(report), *extra],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "summary:" in proc.stdout
    run = json.loads(report.read_text())
    run["stdout"] = proc.stdout
    return run


def check_answers_equal_local_decoding(bundle: Path, run: dict, frames_dir: Path) -> None:
    local = CloudModel(bundle, top=5)
    s = run["summary"]
    assert s["frames"] == N_IMAGES and s["results"] == N_IMAGES and s["error_total"] == 0
    for rec in run["frames"]:
        frame = (frames_dir / f"{rec['index']:05d}.lwfc").read_bytes()
        decoded, _ = local.decode(frame)
        want, _ = local.infer(decoded.tensor)
        assert rec["result"]["top"] == want["top"]
        assert rec["result"]["bits_per_element"] == pytest.approx(8 * len(frame) / decoded.header.element_count,
                                                                  abs=1e-6)


def test_tcp_end_to_end(bundle, images, tmp_path):
    log = tmp_path / "frames.jsonl"
    srv = Serve(["--bundle", str(bundle), "--tcp", "127.0.0.1:0", "--log", str(log)])
    try:
        run = run_device(bundle, srv.addresses[0], images, tmp_path)
        srv.proc.send_signal(signal.SIGUSR1)  # running totals on stderr, server keeps going
        time.sleep(0.5)
    finally:
        final, err = srv.stop()
    check_answers_equal_local_decoding(bundle, run, tmp_path / "frames")
    assert final["frames"] == N_IMAGES and final["error_total"] == 0
    assert sum(1 for ln in err.splitlines() if ln.startswith("{")) == 2  # SIGUSR1 and exit
    records = [json.loads(ln) for ln in log.read_text().splitlines()]
    frames = [r for r in records if r["event"] == "frame"]
    assert len(frames) == N_IMAGES and all(r["decode_ms"] > 0 and r["bits_per_element"] > 0 for r in frames)


def test_udp_end_to_end_in_slices(bundle, images, tmp_path):
    """`lwfc serve --udp` and the runner over udp://: every tensor goes out as slices of one datagram each (MTU 600)
    and comes back complete, with the answer that decoding and placing the saved slices locally gives."""
    srv = Serve(["--bundle", str(bundle), "--udp", "127.0.0.1:0"])
    try:
        run = run_device(bundle, srv.addresses[0] + "?mtu=600", images, tmp_path)
    finally:
        final, _err = srv.stop()
    s = run["summary"]
    assert s["frames"] == s["results"] == N_IMAGES and s["error_total"] == 0
    local = CloudModel(bundle, top=5)
    for rec in run["frames"]:
        frames = [p.read_bytes() for p in sorted((tmp_path / "frames").glob(f"{rec['index']:05d}.*.lwfc"))]
        assert len(frames) == rec["slices"] > 1 and all(len(f) <= 600 - 36 for f in frames)
        assembly, table_id, errors, _ = local.decode_slices(frames)
        assert assembly.complete and not errors
        want, _ = local.infer(local.conceal(assembly, table_id).tensor)
        assert rec["result"]["top"] == want["top"] and rec["result"]["concealed"] == 0.0
        assert rec["result"]["slices"] == len(frames)
    assert final["frames"] == N_IMAGES and final["slices"]["received"] == sum(r["slices"] for r in run["frames"])


@pytest.mark.skipif(shutil.which("mosquitto") is None and not os.path.exists("/usr/sbin/mosquitto"),
                    reason="needs the Debian package mosquitto")
def test_mqtt_end_to_end_pool_of_two_with_keys_and_broker_login(bundle, images, tmp_path):
    """Two `lwfc serve --mqtt` processes (a pool) and the runner over mqtt://, through a real Mosquitto that takes
    named users only: the broker logins and the device key come from private files, every message is tagged, and
    the answers are those that decoding the saved frames locally gives."""
    from lwfc_host.serve.broker import Mosquitto

    def private(name: str, text: str) -> str:
        path = tmp_path / name
        path.write_text(text)
        path.chmod(0o600)
        return str(path)

    key = os.urandom(32)
    keys = private("keys.json", json.dumps({"cam1": key.hex()}))
    with Mosquitto(users={"workers": "w-secret", "cam1": "c-secret"}) as broker:
        url = broker.url("plant/line1")
        args = ["--bundle", str(bundle), "--mqtt", url, "--mqtt-login", private("w.login", "workers:w-secret"),
                "--keys", keys, "--workers", "1"]
        pool = [Serve(args), Serve(args)]
        try:
            run = run_device(bundle, url, images, tmp_path, "--device", "cam1", "--key-file",
                             private("device.key", key.hex()), "--mqtt-login", private("c.login", "cam1:c-secret"))
        finally:
            finals = [srv.stop()[0] for srv in pool]
    check_answers_equal_local_decoding(bundle, run, tmp_path / "frames")
    assert "connected to mqtt://" in run["stdout"]
    assert sum(f["frames"] for f in finals) == N_IMAGES
    assert all(f["mqtt"][0]["unverified"] == 0 and f["mqtt"][0]["failures"] == 0 for f in finals)


@pytest.mark.skipif(shutil.which("socat") is None, reason="needs socat (Debian package socat)")
def test_serial_end_to_end_over_pty_pair(bundle, images, tmp_path):
    host_end, dev_end = tmp_path / "host-tty", tmp_path / "dev-tty"
    socat = subprocess.Popen(["socat", f"pty,raw,echo=0,link={host_end}", f"pty,raw,echo=0,link={dev_end}"],
                             stderr=subprocess.PIPE)
    try:
        t0 = time.time()
        while not (host_end.exists() and dev_end.exists()):
            assert time.time() - t0 < 10, "socat made no pty pair"
            time.sleep(0.05)
        srv = Serve(["--bundle", str(bundle), "--serial", str(host_end), "--baud", "921600"])
        try:
            # garbage on the line before the device starts (a board's boot messages) must not matter
            with open(dev_end, "wb", buffering=0) as f:
                f.write(b"boot: rst:0x1 (POWERON_RESET)\r\nLK\x00garbage\r\n")
            run = run_device(bundle, f"serial://{dev_end}?baud=921600", images, tmp_path)
        finally:
            final, _err = srv.stop()
    finally:
        socat.terminate()
        socat.wait(10)
    check_answers_equal_local_decoding(bundle, run, tmp_path / "frames")
    assert final["frames"] == N_IMAGES and final["garbage_bytes"] > 0


def _private_file(path: Path, text: str) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


def test_authenticated_end_to_end_key_from_file_or_environment(bundle, images, tmp_path):
    """The device key comes from a private file or $LWFC_DEVICE_KEY, never argv; a keyed device without its
    key is refused, and so is a key file others may read."""
    key = os.urandom(32)
    keys = _private_file(tmp_path / "keys.json", json.dumps({"board-7": key.hex()}))
    device_key = _private_file(tmp_path / "device.key", key.hex() + "\n")
    srv = Serve(["--bundle", str(bundle), "--tcp", "127.0.0.1:0", "--keys", str(keys)])
    try:
        (tmp_path / "a").mkdir()
        run = run_device(bundle, srv.addresses[0], images, tmp_path / "a", "--device", "board-7",
                         "--key-file", str(device_key))
        check_answers_equal_local_decoding(bundle, run, tmp_path / "a" / "frames")
        base = [sys.executable, "-m", "lwfc", "run", "--bundle", str(bundle), "--connect", srv.addresses[0],
                "--images", str(images), "--device", "board-7", "--limit", "1"]
        by_env = subprocess.run(base, capture_output=True, text=True, timeout=120,
                                env=dict(os.environ, LWFC_DEVICE_KEY=key.hex()))
        assert by_env.returncode == 0 and "summary: 1 frames: 1 results" in by_env.stdout, by_env.stdout
        env = {k: v for k, v in os.environ.items() if k != "LWFC_DEVICE_KEY"}
        keyless = subprocess.run(base, capture_output=True, text=True, timeout=120, env=env)
        assert keyless.returncode == 2 and "host refused the session (AUTH)" in keyless.stderr, keyless.stderr
        os.chmod(device_key, 0o644)
        exposed = subprocess.run(base + ["--key-file", str(device_key)], capture_output=True, text=True,
                                 timeout=120, env=env)
        assert exposed.returncode == 2 and "chmod 600" in exposed.stderr, exposed.stderr
    finally:
        final, _ = srv.stop()
    assert final["frames"] == N_IMAGES + 1


def test_refused_device_gets_a_clear_error(bundle, images, tmp_path):
    other = tmp_path / "other.json"
    table = json.loads((bundle / "tables.json").read_text())
    table["clip_max"] = table["clip_max"] * 1.01  # another table: another id
    from lwfc_host.design.tablefile import write_tables

    write_tables(table, other)
    srv = Serve(["--bundle", str(bundle), "--tcp", "127.0.0.1:0"])
    try:
        proc = subprocess.run([sys.executable, "-m", "lwfc", "run", "--bundle", str(bundle), "--tables", str(other),
                               "--connect", srv.addresses[0], "--images", str(images)],
                              capture_output=True, text=True, timeout=120)
    finally:
        srv.stop()
    assert proc.returncode == 2
    assert "host refused the session (TABLE)" in proc.stderr and "unknown table" in proc.stderr


def test_runner_bad_input(tmp_path):
    env = dict(os.environ)
    for args, msg in [
        (["--bundle", str(tmp_path), "--connect", "tcp://127.0.0.1:1", "--images", str(tmp_path)], "bundle.json"),
        (["--bundle", str(tmp_path), "--connect", "udp://x:1", "--images", str(tmp_path)], "bundle.json"),
        (["--bundle", str(tmp_path), "--connect", "mqtt://x:1", "--images", str(tmp_path)], "needs a topic prefix"),
        (["--bundle", str(tmp_path), "--connect", "mqtt://x:1/p", "--images", str(tmp_path), "--mqtt-login",
          str(tmp_path / "none")], "cannot read login file"),
    ]:
        proc = subprocess.run([sys.executable, "-m", "lwfc", "run", *args], capture_output=True, text=True, env=env,
                              timeout=60)
        assert proc.returncode == 2 and msg in proc.stderr, proc.stderr
