"""Server benchmark: frames per second and latency percentiles for 1, 5 and 20 concurrent devices.

Each device is a real ``lwfc.link.Link`` in its own process over a real TCP socket to a real server (in this
process's background thread), sending real lwfc frames: a real bundle's int8 edge half run on real photos,
encoded with the bundle's tables. The server really decodes them and runs the bundle's ONNX cloud half.
By default the bundle and photos are the demo's (``lwfc_host.serve.demo_bundle``: converted and designed
once into the lwfc cache). Printed figures: frames per second (all devices together) and round-trip
latency p50/p95/p99 seen by the devices, plus the server's own decode and inference percentiles.

    python -m lwfc_host.serve.bench [--devices 1 5 20] [--frames 2000] [--bundle DIR] [--images DIR]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np


def bundle_frames(bundle: str | Path, images: str | Path) -> list[bytes]:
    """Real frames: the bundle's edge half on the images, encoded with its tables."""
    from lwfc.bundle import load_bundle
    from lwfc.edge import EdgeModel
    from lwfc.encoder import Encoder
    from lwfc.images import list_images, load_image, preprocess
    from lwfc.tables import load_tables

    b = load_bundle(bundle)
    edge = EdgeModel(b.edge_path)
    enc = Encoder(load_tables(b.tables_path))
    out = []
    for p in list_images(str(images)):
        q = edge.run(preprocess(load_image(p), b.preprocessing))
        out.append(enc.encode_int8(q.tobytes(), q.shape[0], q.shape[1]))
    return out


def _device_process(url: str, hello: dict[str, Any], frames: list[bytes], per_device: int, window: int,
                    start: Any, out: Any) -> None:
    """One device in its own process (so devices do not share the server's interpreter lock)."""
    from lwfc.link import Link

    link = Link(url, hello, window=window, queue_frames=64, policy="block", answer_timeout_s=60)
    link.connect()
    start.wait()
    answers = []
    t0 = time.perf_counter()
    for i in range(per_device):
        answers.extend(link.submit(frames[i % len(frames)], tag=i))
    answers.extend(link.drain(120))
    t1 = time.perf_counter()
    link.close()
    out.put({"results": sum(a.kind == "result" for a in answers), "errors": sum(a.kind == "error" for a in answers),
             "answers": len(answers), "rtt": [a.rtt_ms for a in answers if a.kind == "result"], "t0": t0, "t1": t1})


def run_devices(url: str, hello: dict[str, Any], frames: list[bytes], devices: int, per_device: int,
                window: int = 4) -> dict[str, Any]:
    """``devices`` processes, each a Link sending ``per_device`` frames (HELLO: ``hello`` with its own device
    name); returns counts, frames per second (all devices, from the first send to the last answer) and
    round-trip percentiles."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # the server's threads live in this process: do not fork it
    start = ctx.Event()
    out = ctx.Queue()
    procs = []
    for k in range(devices):
        args = (url, dict(hello, device=f"bench{k}"), frames[k::devices] or frames, per_device, window, start, out)
        p = ctx.Process(target=_device_process, args=args)
        p.start()
        procs.append(p)
    time.sleep(0.5)
    start.set()
    rs = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(30)
    wall = max(r["t1"] for r in rs) - min(r["t0"] for r in rs)  # perf_counter is system-wide on Linux
    rtts = np.array([x for r in rs for x in r["rtt"]], dtype=np.float64)
    results = sum(r["results"] for r in rs)
    return {
        "devices": devices, "sent": devices * per_device, "answers": sum(r["answers"] for r in rs),
        "results": results, "errors": sum(r["errors"] for r in rs), "wall_s": wall,
        "fps": results / wall if wall > 0 else 0.0,
        "rtt_ms": {p: float(np.percentile(rtts, q)) for p, q in (("p50", 50), ("p95", 95), ("p99", 99))}
        if rtts.size else None,
    }


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lwfc_host.serve.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 5, 20])
    parser.add_argument("--frames", type=int, default=2000, help="frames per run (split over the devices)")
    parser.add_argument("--workers", type=int, default=2, help="server worker threads")
    parser.add_argument("--window", type=int, default=4, help="unanswered frames each device may have in flight")
    parser.add_argument("--bundle", help="bundle directory with tables.json (default: the demo's, made once in the "
                                         "lwfc cache)")
    parser.add_argument("--images", help="images whose features make the frames (default: the demo's photos)")
    args = parser.parse_args(argv)
    for flag, values in (("--devices", args.devices), ("--frames", [args.frames]), ("--workers", [args.workers]),
                         ("--window", [args.window])):
        if min(values) < 1:
            parser.error(f"{flag} must be at least 1")
    return args


def bundle_and_images(bundle: str | Path | None = None, images: str | Path | None = None) -> tuple[Path, Path]:
    """The bundle and image directories to run on: the given ones, else the demo's (made as ``lwfc demo``
    makes them). The fleet benchmark (``fleet_bench``) uses the same."""
    from lwfc_host.serve.demo_bundle import ensure_bundle, ensure_tables, photo_dir, photo_files

    if bundle and images:
        return Path(bundle), Path(images)
    photos = photo_files(photo_dir())
    if bundle:
        return Path(bundle), photo_dir()
    b = ensure_bundle()
    ensure_tables(b, photos)
    return b, Path(images) if images else photo_dir()


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)

    from lwfc_host.serve.cloud import CloudModel
    from lwfc_host.serve.config import ServerConfig
    from lwfc_host.serve.runner import run_in_thread

    bundle, images = bundle_and_images(args.bundle, args.images)
    model = CloudModel(bundle)
    frames = bundle_frames(bundle, images)
    if not frames:
        raise SystemExit(f"no images in {images}")
    shape = model.bundle.feature_shape
    n_el = int(np.prod(shape))
    hello = {"model": model.model_name, "bundle": model.bundle_id, "table": model.table_ids()[0]}
    mean_bytes = sum(map(len, frames)) / len(frames)
    print(f"bundle {model.model_name}: frames of {mean_bytes:.0f} bytes on average ({8 * mean_bytes / n_el:.3f} "
          f"bits/element), shape {'x'.join(map(str, shape))}, server workers {args.workers}, device window "
          f"{args.window}")
    print(f"{'devices':>7} {'frames':>6} {'fps':>8} {'rtt p50':>8} {'p95':>8} {'p99':>8} "
          f"{'decode p50':>10} {'infer p50':>9} {'lost':>5}")
    for d in args.devices:
        server, stop = run_in_thread(model, ServerConfig(workers=args.workers), tcp=["127.0.0.1:0"])
        url = server.addresses[0]
        per = max(1, args.frames // d)
        r = run_devices(url, hello, frames, d, per, args.window)
        status = stop()
        rtt = r["rtt_ms"] or {"p50": 0, "p95": 0, "p99": 0}
        print(f"{d:>7} {r['results']:>6} {r['fps']:>8.1f} {rtt['p50']:>8.2f} {rtt['p95']:>8.2f} {rtt['p99']:>8.2f} "
              f"{status['decode_ms']['p50']:>10.3f} {status['infer_ms']['p50']:>9.3f} "
              f"{r['sent'] - r['results'] - r['errors']:>5}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
