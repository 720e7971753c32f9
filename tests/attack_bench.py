"""The attacks of issue 20 against a live ``lwfc serve``, with a legitimate device streaming throughout.

The server is the real command in its own process (``lwfc serve --keys FILE`` with a private key file and a
``--status`` endpoint), serving the demo bundle (EfficientNet-Lite0 on photos; made once in the lwfc cache)
or ``--bundle DIR --images DIR``. The project's own device link streams real frames from 127.0.0.1 at
``--rate`` frames/s from start to end, in a process of its own (so that it shares no interpreter lock with
the attackers); the attacks come from 127.0.0.2, one after another, from this process. For each attack the
table gives what the attack saw, and what the legitimate device saw while it ran (and until the server had
released every connection the attack opened): the share of its frames answered with a RESULT, its p95 time
to RESULT against the calm baseline and in the seconds after, the server's resident memory before and
after, and the connections still open afterwards (1: the device's own). Attackers, device and server
share this machine's cores, which a remote attacker would not.

    python tests/attack_bench.py [--quick] [--json FILE] [--bundle DIR --images DIR]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import attacks  # noqa: E402

KEYED_DEVICE = "keyed-bench-device"
BASELINE_S = 10.0  # the calm window before the first attack
MIN_WINDOW_S = 3.0  # the shortest window a row of the table covers, from the attack's start
AFTER_S = 3.0  # the calm after each attack, before the next one


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    """Resident memory of process ``pid`` in MB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


class LiveServer:
    """``lwfc serve`` in a subprocess, with its status endpoint."""

    def __init__(self, bundle: Path, keys_file: Path, extra: list[str]):
        self.port, self.status_port = free_port(), free_port()
        cmd = [sys.executable, "-m", "lwfc_host", "serve", "--bundle", str(bundle),
               "--tcp", f"127.0.0.1:{self.port}", "--status", f"127.0.0.1:{self.status_port}",
               "--keys", str(keys_file), "--top", "1", *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while True:
            try:
                self.status()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                    raise SystemExit(f"lwfc serve did not start: {err[-2000:]}") from None
                time.sleep(0.2)

    def status(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.status_port}/status", timeout=5) as r:
            return json.loads(r.read())

    def settle(self, baseline_open: int, timeout_s: float = 30.0) -> tuple[dict[str, Any], float]:
        """Wait until no more than ``baseline_open`` connections are open; (status, seconds waited)."""
        t0 = time.monotonic()
        while True:
            st = self.status()
            if st["connections_open"] <= baseline_open or time.monotonic() - t0 > timeout_s:
                return st, time.monotonic() - t0
            time.sleep(0.1)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def attack_plan(quick: bool) -> list[tuple[str, Callable[[attacks.Target], attacks.Outcome]]]:
    """(name, attack) in the order run; ``quick``: smaller and shorter versions of the same attacks."""
    q = quick
    return [
        ("abortive close", lambda t: attacks.abortive_close(t, clients=60 if q else 300, frames_each=30)),
        ("SIGKILLed devices", lambda t: attacks.killed_devices(t, devices=4 if q else 10, run_s=1.0)),
        ("amplification probe", lambda t: attacks.amplification_probe(t, tries=5)),
        ("decode amplification", lambda t: attacks.amplification(t, connections=2, in_flight=4,
                                                                  duration_s=3.0 if q else 10.0)),
        ("PING without HELLO", lambda t: attacks.ping_without_hello(t, every_s=1.0, limit_s=15.0 if q else 30.0)),
        ("trickled body", lambda t: attacks.trickle(t, every_s=1.0, limit_s=15.0 if q else 30.0)),
        ("connection flood", lambda t: attacks.connection_flood(t, connections=200 if q else 400, hold_s=6.0)),
        ("keyed device without auth", attacks.keyed_without_auth),
        ("injection into an authenticated session", attacks.injection_into_authenticated_session),
        ("deeply nested HELLO", attacks.deep_hello),
        ("seq jump", attacks.seq_jump),
        ("corrupt-body flood", lambda t: attacks.corrupt_flood(t, limit_bytes=(64 if q else 512) << 20,
                                                                limit_s=10.0 if q else 20.0)),
    ]


def summary(name: str, facts: dict[str, Any]) -> str:
    """The one fact of an attack's outcome that says whether the host held."""
    pick = {
        "abortive close": lambda f: f"{f['clients']} clients reset",
        "SIGKILLed devices": lambda f: f"{f['connected']} killed mid-stream",
        "amplification probe": lambda f: f"{f['answers'][0] if f['answers'] else 'none'} in {f['median_ms']} ms",
        "decode amplification": lambda f: f"{f['sent']} sent, slowest answer {f['slowest_answer_ms']:.0f} ms",
        "PING without HELLO": lambda f: f"closed after {f['closed_after_s']} s",
        "trickled body": lambda f: f"closed after {f['closed_after_s']} s",
        "connection flood": lambda f: f"{f['refused_busy']} BUSY, newcomer {f['newcomer']}",
        "keyed device without auth": lambda f: f["answer"],
        "injection into an authenticated session": lambda f: f"genuine seq 1: {f['genuine_seq1']}",
        "deeply nested HELLO": lambda f: f["answer"],
        "seq jump": lambda f: f"{f['answers']} answers, {f['bytes_back']} B back",
        "corrupt-body flood": lambda f: f"cut off after {f['cut_off_after_bytes']} B",
    }[name]
    return pick(facts)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python tests/attack_bench.py", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller, shorter attacks (about 2 minutes)")
    parser.add_argument("--rate", type=float, default=20.0, help="the legitimate device's frames per second")
    parser.add_argument("--json", help="also write every outcome and figure to this file")
    parser.add_argument("--bundle", help="bundle directory (default: the demo's, made once in the lwfc cache)")
    parser.add_argument("--images", help="images whose features make the frames (default: the demo's photos)")
    return parser.parse_args(argv)


def _keys_file(directory: Path, key: bytes) -> Path:
    path = directory / "keys.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, stat.S_IRUSR | stat.S_IWUSR)
    with os.fdopen(fd, "w") as f:
        json.dump({KEYED_DEVICE: key.hex()}, f)
    return path


def _row(name: str, facts: dict[str, Any], legit: dict[str, Any], after: dict[str, Any], base_p95: float,
         rss: tuple[float, float], st: dict[str, Any]) -> dict[str, Any]:
    answered = 100.0 * legit["answered"] / legit["submitted"] if legit["submitted"] else float("nan")
    return {"attack": name, "saw": summary(name, facts), "legit_frames": legit["submitted"],
            "legit_answered_pct": round(answered, 1), "legit_p95_ms": legit["p95_ms"], "baseline_p95_ms": base_p95,
            "legit_p95_ms_after": after["p95_ms"], "legit_outcomes": legit["outcomes"],
            "rss_mb_before": round(rss[0], 1), "rss_mb_after": round(rss[1], 1),
            "connections_open_after": st["connections_open"], "facts": facts}


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    from lwfc_host.serve.bench import bundle_and_images, bundle_frames
    from lwfc_host.serve.cloud import CloudModel

    bundle, images = bundle_and_images(args.bundle, args.images)
    model = CloudModel(bundle)
    frames = bundle_frames(bundle, images)
    key = os.urandom(32)
    with tempfile.TemporaryDirectory() as tmp:
        server = LiveServer(bundle, _keys_file(Path(tmp), key), [])
        try:
            target = attacks.Target("127.0.0.1", server.port, {"model": model.model_name, "bundle": model.bundle_id,
                                                                "table": model.table_ids()[0]},
                                    frames, KEYED_DEVICE, key, tuple(model.bundle.feature_shape))
            rows = run_plan(server, target, args)
        finally:
            server.stop()
    print(f"\nlwfc serve, bundle {model.model_name} ({'x'.join(map(str, target.feature_shape))}), legitimate device "
          f"at {args.rate:g} frames/s from 127.0.0.1, attacks from {attacks.ATTACKER_ADDRESS}")
    print(f"{'attack':<40} {'what it got':<36} {'legit ok':>8} {'p95 ms':>7} {'after':>6} {'RSS MB':>10} "
          f"{'open':>4}")
    for r in rows:
        p95 = "-" if r["legit_p95_ms"] is None else f"{r['legit_p95_ms']:.1f}"
        after = "-" if r["legit_p95_ms_after"] is None else f"{r['legit_p95_ms_after']:.1f}"
        print(f"{r['attack']:<40} {r['saw'][:36]:<36} {r['legit_answered_pct']:>7.1f}% {p95:>7} {after:>6} "
              f"{r['rss_mb_before']:>4.0f}->{r['rss_mb_after']:<5.0f} {r['connections_open_after']:>4}")
    print(f"legit ok, p95: the legitimate device's frames due while the attack ran (until the server was back to its "
          f"baseline connections, {MIN_WINDOW_S:g} s at least); after: its p95 in the {AFTER_S:g} s after that; "
          f"calm baseline p95 {rows[0]['baseline_p95_ms'] if rows else '-'} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


def _legit_process(target_json: dict[str, Any], rate_hz: float, stop: Any, out: Any) -> None:
    """The legitimate device in a process of its own, so that it shares no interpreter lock with the
    attackers; on ``stop`` it sends back its log (monotonic times are comparable across processes)."""
    legit = attacks.LegitDevice(attacks.Target.from_json(target_json), rate_hz=rate_hz)
    legit.start()
    stop.wait()
    legit.stop()
    out.put((legit.submitted, legit.log))


def run_plan(server: LiveServer, target: attacks.Target, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The legitimate device streams; a calm baseline, then every attack in turn, each given at least
    ``MIN_WINDOW_S`` and until the server is back to its baseline connections. Returns the table's rows."""
    ctx = multiprocessing.get_context("spawn")
    stop, out = ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=_legit_process, args=(target.to_json(), args.rate, stop, out), daemon=True)
    proc.start()
    done: list[tuple[str, dict[str, Any], float, float, tuple[float, float], dict[str, Any]]] = []
    try:
        time.sleep(5.0)  # connect and warm up
        t_base = time.monotonic()
        time.sleep(BASELINE_S)
        t_base_end = time.monotonic()
        baseline_open = server.status()["connections_open"]
        for name, attack in attack_plan(args.quick):
            rss_before = rss_mb(server.proc.pid)
            t_start = time.monotonic()
            facts = attack(target).facts
            st, _ = server.settle(baseline_open)
            time.sleep(max(0.0, t_start + MIN_WINDOW_S - time.monotonic()))
            t_end = time.monotonic()
            done.append((name, facts, t_start, t_end, (rss_before, rss_mb(server.proc.pid)), st))
            print(f"{name}: {summary(name, facts)}; open {st['connections_open']}", flush=True)
            time.sleep(AFTER_S)  # the aftermath: does the device get its calm latency back?
    finally:
        stop.set()
        submitted, log = out.get(timeout=60)
        proc.join(30)
    legit = attacks.LegitDevice(target)  # not started: holds the child's log for window_stats
    legit.submitted, legit.log = submitted, log
    base = legit.window_stats(t_base, t_base_end)
    print(f"baseline: {base['answered']}/{base['submitted']} answered, p95 {base['p95_ms']} ms", flush=True)
    return [_row(name, facts, legit.window_stats(t0, t1), legit.window_stats(t1, t1 + AFTER_S - 0.5),
                 base["p95_ms"], rss, st) for name, facts, t0, t1, rss, st in done]


if __name__ == "__main__":
    raise SystemExit(main())
