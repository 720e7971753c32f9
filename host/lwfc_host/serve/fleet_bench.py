"""Fleet benchmark over MQTT (PROTOCOL.md 11): many simulated devices, one Mosquitto, a pool of 1, 2, 4, ...
``lwfc serve --mqtt`` worker processes; then the same with one worker killed (SIGKILL) halfway.

Real parts throughout: a real broker (``serve.broker``: Mosquitto on a free loopback port), real worker processes
(``python -m lwfc_host serve --mqtt ... --workers 1``, onnxruntime and numpy on one thread each, so N workers
scale on cores), real frames (the demo bundle's int8 edge half run on the demo photos, encoded once with its
tables) and the bundle's real cloud half. The devices are simulated so that they cost the workers little CPU: a
few processes each drive many devices over one MQTT connection, with the device's own window and re-publish timer
(``lwfc.retry.RetryWindow``) and payloads (``lwfc.mqtt``), one session id, seq space and window per device.

Figures per run: frames per second (all answers, from the first publish to the last answer), round-trip latency
p50/p99 seen by the devices, CPU per frame of the workers (their user + system time over the answered frames)
and of the broker and device simulators; lost, duplicate answers dropped and frames published again. The kill run
must answer every frame: 0 lost, and every device takes each seq once.

    lwfc serve-bench --mqtt [--devices 200] [--frames 500] [--workers 1 2 4] [--quick] [--json FILE]
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from lwfc import mqtt as M
from lwfc import protocol as P
from lwfc.retry import RetryWindow

WORKER_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# --- the simulated devices (each simulator process drives many over one MQTT connection) -------------------------

class _Device:
    """One simulated device: its session, window, seqs and records."""

    def __init__(self, name: str, key: bytes | None, deadline_s: float, first_timeout_s: float):
        self.name = name
        self.session = M.new_session_id()
        self.auth = M.session_auth(key, self.session)
        self.window = RetryWindow(deadline_s, first_timeout_s)
        self.topic = M.data_topic("", name)  # completed with the prefix by the simulator
        self.seq = 0
        self.sent = 0
        self.results = 0
        self.errors: dict[str, int] = {}
        self.rtt: list[float] = []
        self.seen: set[int] = set()
        self.twice = 0  # seqs handed over more than once: must stay 0


def _simulate(url: str, names: list[str], keys: dict[str, bytes], frames: list[bytes], per_device: int, window: int,
              first_timeout_s: float, deadline_s: float, ready: Any, start: Any, progress: Any, out: Any) -> None:
    """A simulator process: ``names`` devices, each publishing ``per_device`` frames with at most ``window``
    unanswered; puts its report on ``out``."""
    import paho.mqtt.client as mqtt

    from lwfc.mqttclient import no_delay
    from lwfc.transport import parse_address

    prefix = parse_address(url)[1][2]
    host, port = parse_address(url)[1][:2]
    devs = {n: _Device(n, keys.get(n), deadline_s, first_timeout_s) for n in names}
    for d in devs.values():
        d.topic = M.data_topic(prefix, d.name)
    inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
    subacks: queue.Queue[int] = queue.Queue()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"lwfc-sim-{os.getpid()}", protocol=mqtt.MQTTv311)
    c.on_socket_open = no_delay
    c.on_message = lambda cl, u, m: inbox.put((m.topic, m.payload))
    c.on_subscribe = lambda cl, u, mid, rc, p: subacks.put(mid)
    c.max_inflight_messages_set(65535)  # the devices' windows bound what is in flight, not the connection
    c.connect(host, port, 60)
    c.loop_start()
    for n in names:
        c.subscribe(M.result_topic(prefix, n), 1)
    for _ in names:
        subacks.get(timeout=30)
    ready.put(os.getpid())
    start.wait()
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    frame_no = 0

    def top_up(d: _Device) -> None:
        nonlocal frame_no
        while len(d.window) < window and d.sent < per_device:
            d.seq = P.next_seq(d.seq)
            payload = M.pack(d.session, P.DATA, d.seq, frames[frame_no % len(frames)], d.auth)
            frame_no += 1
            d.window.add(d.seq, payload, None)
            d.sent += 1
            c.publish(d.topic, payload, 1)

    def take(d: _Device, a: P.Answer) -> None:
        if a.seq in d.seen:
            d.twice += 1
        d.seen.add(a.seq)
        if a.kind == "result":
            d.results += 1
            d.rtt.append(a.rtt_ms)
        else:
            name = P.ERROR_NAMES.get(a.code, str(a.code))
            d.errors[name] = d.errors.get(name, 0) + 1
        with progress.get_lock():
            progress.value += 1

    for d in devs.values():
        top_up(d)
    last_sweep = time.perf_counter()
    remaining = len(devs)
    while remaining:
        items: list[tuple[str, bytes]] = []
        try:
            items.append(inbox.get(timeout=0.02))
            while True:
                items.append(inbox.get_nowait())
        except queue.Empty:
            pass
        for topic, payload in items:
            name = M.device_of(topic, prefix, M.RESULT_LEVEL)
            d = devs.get(name) if name else None
            if d is None:
                continue
            session, ev = M.unpack(payload, d.auth)
            if session != d.session or not isinstance(ev, P.Message):
                continue
            if ev.type == P.RESULT:
                a = d.window.answer(ev.seq, "result")
            elif ev.type == P.ERROR:
                code, _count, text = P.unpack_error(ev.body)
                a = d.window.answer(ev.seq, "error", code, text)
            else:
                continue
            if a is not None:
                take(d, a)
            top_up(d)
        if time.perf_counter() - last_sweep > 0.05:
            last_sweep = time.perf_counter()
            for d in devs.values():
                for _seq, payload in d.window.due():
                    c.publish(d.topic, payload, 1)
                for a in d.window.expire():
                    take(d, a)
                top_up(d)
        remaining = sum(1 for d in devs.values() if d.sent < per_device or len(d.window))
    t1 = time.perf_counter()
    c.disconnect()
    c.loop_stop()
    errors: dict[str, int] = {}
    for d in devs.values():
        for k, v in d.errors.items():
            errors[k] = errors.get(k, 0) + v
    out.put({"devices": len(devs), "sent": sum(d.sent for d in devs.values()),
             "results": sum(d.results for d in devs.values()), "errors": errors,
             "republished": sum(d.window.republished for d in devs.values()),
             "duplicates_dropped": sum(d.window.duplicates for d in devs.values()),
             "handed_twice": sum(d.twice for d in devs.values()),
             "answered_seqs": sum(len(d.seen) for d in devs.values()),
             "rtt": [x for d in devs.values() for x in d.rtt], "t0": t0, "t1": t1,
             "cpu_s": time.process_time() - cpu0})


# --- workers ---------------------------------------------------------------------------------------------------

class _Worker:
    """``lwfc serve --mqtt`` in its own process, on one thread."""

    def __init__(self, bundle: Path, url: str, keys_file: Path | None):
        args = [sys.executable, "-m", "lwfc_host", "serve", "--bundle", str(bundle), "--mqtt", url, "--workers", "1"]
        if keys_file is not None:
            args += ["--keys", str(keys_file)]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **WORKER_ENV})

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        t0 = time.time()
        while time.time() - t0 < timeout_s:
            line = self.proc.stdout.readline()  # type: ignore[union-attr]
            if not line:
                raise RuntimeError("lwfc serve --mqtt exited: " + self.proc.stderr.read()[-2000:])  # type: ignore
            if "listening on mqtt" in line:
                return
        raise RuntimeError("lwfc serve --mqtt did not subscribe in time")

    def cpu(self) -> float:
        from lwfc_host.serve.broker import process_cpu_seconds

        return process_cpu_seconds(self.proc.pid)

    def stop(self) -> dict[str, Any]:
        """SIGTERM; the final status it prints ({} when it was killed)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            _out, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _out, err = self.proc.communicate()
        lines = [ln for ln in (err or "").splitlines() if ln.startswith("{")]
        return json.loads(lines[-1]) if lines else {}


# --- one run ---------------------------------------------------------------------------------------------------

def run_fleet(bundle: Path, frames: list[bytes], devices: int, per_device: int, workers: int, kill: bool = False,
              window: int = 2, simulators: int = 2, auth: bool = False, first_timeout_s: float = 5.0,
              deadline_s: float = 120.0, log: Any = print) -> dict[str, Any]:
    """One run: a fresh broker, ``workers`` worker processes, ``devices`` simulated devices sending ``per_device``
    frames each; with ``kill``, worker 0 gets SIGKILL when half the frames are answered. Returns the figures."""
    import multiprocessing as mp
    import tempfile

    from lwfc_host.serve.broker import Mosquitto

    names = [f"fleet{k:04d}" for k in range(devices)]
    keys = {n: os.urandom(16) for n in names} if auth else {}
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="lwfc-fleet-") as tmp, Mosquitto(Path(tmp) / "broker") as broker:
        keys_file = None
        if auth:
            keys_file = Path(tmp) / "keys.json"
            keys_file.write_text(json.dumps({n: k.hex() for n, k in keys.items()}))
            keys_file.chmod(0o600)
        url = broker.url("fleet")
        pool: list[_Worker] = []
        sims: list[Any] = []
        try:
            return _measure(pool, sims, broker, bundle, url, keys_file, keys, names, frames, devices, per_device,
                            workers, kill, window, simulators, first_timeout_s, deadline_s, ctx, log)
        finally:  # however the run ends (an error, ^C), nothing it started outlives it
            for p in sims:
                if p.is_alive():
                    p.kill()
            for w in pool:
                if w.proc.poll() is None:
                    w.proc.kill()
                    w.proc.wait(10)


def _measure(pool: list[_Worker], sims: list[Any], broker: Any, bundle: Path, url: str, keys_file: Path | None,
             keys: dict[str, bytes], names: list[str], frames: list[bytes], devices: int, per_device: int,
             workers: int, kill: bool, window: int, simulators: int, first_timeout_s: float, deadline_s: float,
             ctx: Any, log: Any) -> dict[str, Any]:
    """The body of ``run_fleet``: starts the workers and simulators into ``pool`` and ``sims``, runs, measures."""
    for _ in range(workers):
        pool.append(_Worker(bundle, url, keys_file))
    for w in pool:
        w.wait_ready()
    ready, start, out = ctx.Queue(), ctx.Event(), ctx.Queue()
    progress = ctx.Value("l", 0)
    for s in range(simulators):
        mine = names[s::simulators]
        if not mine:
            continue
        p = ctx.Process(target=_simulate, args=(url, mine, {n: keys[n] for n in mine if n in keys}, frames,
                                                per_device, window, first_timeout_s, deadline_s, ready, start,
                                                progress, out))
        p.start()
        sims.append(p)
    _collect(ready, sims, 120)
    cpu0 = [w.cpu() for w in pool]
    broker0 = broker.cpu_seconds()
    load0 = os.getloadavg()[0]
    start.set()
    total = devices * per_device
    killed: dict[str, Any] | None = None
    if kill:
        while progress.value < total // 2:
            time.sleep(0.01)
        victim = pool[0]
        killed = {"cpu_s": victim.cpu() - cpu0[0], "at_answers": progress.value}
        os.kill(victim.proc.pid, signal.SIGKILL)
        killed["t"] = time.perf_counter()
        log(f"  killed worker pid {victim.proc.pid} (SIGKILL) after {killed['at_answers']} of {total} answers")
    reports = _collect(out, sims, deadline_s + 60, progress)
    for p in sims:
        p.join(30)
    cpu1 = [w.cpu() for w in pool]
    broker_cpu = broker.cpu_seconds() - broker0
    load1 = os.getloadavg()[0]
    finals = [w.stop() for w in pool]
    worker_cpu = sum(b - a for a, b in zip(cpu0, cpu1))
    if killed is not None:
        worker_cpu += killed["cpu_s"]  # the killed worker's CPU, read just before the kill
    t0 = min(r["t0"] for r in reports)
    t1 = max(r["t1"] for r in reports)
    wall = t1 - t0
    rtt = np.array([x for r in reports for x in r["rtt"]], dtype=np.float64)
    results = sum(r["results"] for r in reports)
    errors: dict[str, int] = {}
    for r in reports:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    decoded = sum(f.get("frames", 0) for f in finals)
    return {
        "workers": workers, "killed": killed is not None, "devices": devices, "frames_per_device": per_device,
        "window": window, "auth": bool(keys), "sent": sum(r["sent"] for r in reports), "results": results,
        "errors": errors, "lost": errors.get("LOST", 0), "answered_seqs": sum(r["answered_seqs"] for r in reports),
        "handed_twice": sum(r["handed_twice"] for r in reports),
        "duplicates_dropped": sum(r["duplicates_dropped"] for r in reports),
        "republished": sum(r["republished"] for r in reports),
        "decoded_by_surviving_workers": decoded, "wall_s": wall, "fps": results / wall if wall > 0 else 0.0,
        "rtt_ms": {"p50": float(np.percentile(rtt, 50)), "p99": float(np.percentile(rtt, 99))} if rtt.size else None,
        "worker_cpu_ms_per_frame": 1000.0 * worker_cpu / max(results, 1),
        "broker_cpu_ms_per_frame": 1000.0 * broker_cpu / max(results, 1),
        "devices_cpu_ms_per_frame": 1000.0 * sum(r["cpu_s"] for r in reports) / max(results, 1),
        "load_before": load0, "load_after": load1,
        "after_kill_s": (t1 - killed["t"]) if killed is not None else None,  # the kill to the last answer
    }


def _collect(q: Any, procs: list[Any], stall_s: float, progress: Any = None) -> list[Any]:
    """One item from ``q`` per process in ``procs``; RuntimeError as soon as one of them has died without its, or
    when ``progress`` (a shared counter of answers; None: the time since the call) has not moved for ``stall_s``:
    a run's length grows with the fleet, a stall does not."""
    items: list[Any] = []
    last, since = (progress.value if progress is not None else None), time.monotonic()
    while len(items) < len(procs):
        try:
            items.append(q.get(timeout=1.0))
        except queue.Empty:
            now = progress.value if progress is not None else None
            if now != last:
                last, since = now, time.monotonic()
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead or time.monotonic() - since > stall_s:
                for p in procs:
                    p.kill()
                why = "died" if dead else f"made no progress for {stall_s:.0f} s"
                raise RuntimeError(f"device simulator {why} (exit codes {[p.exitcode for p in procs]})") from None
    return items


def print_row(r: dict[str, Any], out: Any = sys.stdout) -> None:
    rtt = r["rtt_ms"] or {"p50": 0.0, "p99": 0.0}
    out.write(f"{r['workers']:>7}{' (kill)' if r['killed'] else '       '} {r['results']:>7} {r['fps']:>8.1f} "
              f"{rtt['p50']:>8.1f} {rtt['p99']:>8.1f} {r['worker_cpu_ms_per_frame']:>9.2f} "
              f"{r['broker_cpu_ms_per_frame']:>7.3f} {r['devices_cpu_ms_per_frame']:>7.3f} {r['lost']:>5} "
              f"{r['handed_twice']:>5} {r['duplicates_dropped']:>6} {r['republished']:>6}\n")
    out.flush()


HEADER = (f"{'workers':>14} {'answers':>7} {'fps':>8} {'p50 ms':>8} {'p99 ms':>8} {'worker':>9} {'broker':>7} "
          f"{'devices':>7} {'lost':>5} {'twice':>5} {'dupdrop':>6} {'again':>6}\n"
          f"{'':>14} {'':>7} {'':>8} {'':>8} {'':>8} {'ms CPU/frame':>25} {'':>7}\n")


def bench(devices: int, per_device: int, workers: list[int], kill: bool = True, window: int = 2, simulators: int = 2,
          auth: bool = False, bundle: str | Path | None = None, images: str | Path | None = None,
          json_path: str | None = None, kill_workers: int = 2, out: Any = sys.stdout) -> list[dict[str, Any]]:
    """The runs of ``lwfc serve-bench --mqtt``: one per worker count, then (with ``kill``) ``kill_workers`` workers
    of which one is killed halfway. Prints a table; returns the runs (and writes them to ``json_path``)."""
    from lwfc_host.serve.bench import bundle_and_images, bundle_frames

    b, imgs = bundle_and_images(bundle, images)
    frames = bundle_frames(b, imgs)
    if not frames:
        raise ValueError(f"no images in {imgs}")
    mean = sum(map(len, frames)) / len(frames)
    out.write(f"fleet over MQTT: {devices} devices x {per_device} frames (window {window}, {simulators} simulator "
              f"processes{', HMAC on every message' if auth else ''}), bundle {b.name}: {len(frames)} distinct "
              f"frames of {mean:.0f} bytes on average; one Mosquitto; load {os.getloadavg()[0]:.2f} before\n")
    out.write(HEADER)
    runs = []
    plan = [(n, False) for n in workers] + ([(kill_workers, True)] if kill else [])
    for n, k in plan:
        r = run_fleet(b, frames, devices, per_device, n, kill=k, window=window, simulators=simulators, auth=auth,
                      log=lambda m: out.write(m + "\n"))
        runs.append(r)
        print_row(r, out)
        if json_path:
            Path(json_path).write_text(json.dumps(runs, indent=1))
    base = next((r["fps"] for r in runs if r["workers"] == 1 and not r["killed"]), None)
    if base:
        out.write("speed-up over one worker: " + ", ".join(f"{r['workers']}{' (kill)' if r['killed'] else ''}: "
                                                          f"{r['fps'] / base:.2f}x" for r in runs) + "\n")
    return runs
