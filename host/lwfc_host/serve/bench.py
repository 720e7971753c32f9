"""Server benchmark: frames per second and latency percentiles for 1, 5 and 20 concurrent devices.

Each device is a real ``lwfc.link.Link`` over a real TCP socket to a real server (in this process's
background thread), sending real lwfc frames; the server really decodes them and runs a real ONNX cloud
half (a small classifier head built here, or a bundle's cloud.onnx with ``--bundle``). Printed figures:
frames per second (all devices together) and round-trip latency p50/p95/p99 seen by the devices, plus
the server's own decode and inference percentiles.

    python -m lwfc_host.serve.bench [--devices 1 5 20] [--frames 2000] [--bundle DIR --images DIR]

Also provides ``make_small_bundle``: a small bundle directory (bundle.json, tables.json, cloud.onnx) whose
frames are small, used by the load and fault tests.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

SMALL_SHAPE = (8, 8, 16)
SMALL_CLASSES = [f"class{i}" for i in range(10)]


def _relu_features(shape: tuple[int, int, int], seed: int, batch: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 1.0, size=(batch, *shape)).astype(np.float32)
    # spatially smooth, channel-dependent scale: a ReLU layer's look, so contexts matter
    x = (x + np.roll(x, 1, axis=1) + np.roll(x, 1, axis=2)) / 3 + np.linspace(-0.5, 0.5, shape[-1])
    return np.maximum(x, 0.0)


def write_cloud_head(path: Path, channels: int, classes: int, seed: int = 0) -> None:
    """A real ONNX classifier head: NHWC float features -> global average pool -> linear -> logits."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = rng.normal(0, 1, size=(channels, classes)).astype(np.float32)
    b = rng.normal(0, 0.1, size=(classes,)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["x", "axes"], ["pooled"], keepdims=0),
         helper.make_node("MatMul", ["pooled", "w"], ["mm"]),
         helper.make_node("Add", ["mm", "b"], ["logits"])],
        "head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, None, None, channels])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, classes])],
        [numpy_helper.from_array(np.array([1, 2], dtype=np.int64), "axes"), numpy_helper.from_array(w, "w"),
         numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())


def make_small_bundle(out: str | Path, shape: tuple[int, int, int] = SMALL_SHAPE, levels: int = 4,
                      seed: int = 0) -> dict[str, Any]:
    """A small bundle without an edge model (the device gets int8 tensors from ``small_tensors``):
    bundle.json, tables.json (uniform quantizer, neighbour contexts) and cloud.onnx. Returns bundle.json."""
    from lwfc_host.design.tablefile import write_tables
    from lwfc_host.design.tablegen import uniform_table

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    calib = _relu_features(shape, seed, batch=4)
    clip = float(np.quantile(calib[calib > 0], 0.99))
    scale = clip / 127.0
    table = uniform_table(calib, levels, clip_max=clip, groups=4, classes=3, int8_scale=scale,
                          int8_zero_point=-128)
    final = write_tables(table, out / "tables.json")
    write_cloud_head(out / "cloud.onnx", shape[2], len(SMALL_CLASSES), seed)
    info = {
        "bundle_version": 1, "model": "small_head", "description": "small synthetic bundle for tests/benchmarks",
        "split": "features", "activation": "relu",
        "cloud": {"file": "cloud.onnx"},
        "feature": {"shape_nhwc": [1, *shape], "layout": "NHWC", "scale": scale, "zero_point": -128,
                    "activation": "relu"},
        "class_names": SMALL_CLASSES, "tables": "tables.json", "table_id": final["table_id"],
    }
    (out / "bundle.json").write_text(json.dumps(info, indent=1))
    return info


def small_tensors(info: dict[str, Any], n: int, seed: int = 1) -> list[bytes]:
    """``n`` int8 feature tensors (bytes, NHWC) for a small bundle."""
    shape = tuple(info["feature"]["shape_nhwc"][1:])
    scale = info["feature"]["scale"]
    x = _relu_features(shape, seed, batch=n)
    q = np.clip(np.round(x / scale) - 128, -128, 127).astype(np.int8)
    return [q[i].tobytes() for i in range(n)]


def small_frames(bundle_dir: str | Path, n: int, seed: int = 1) -> list[bytes]:
    """``n`` distinct real lwfc frames for a small bundle (encoded by the device encoder)."""
    from lwfc.encoder import Encoder
    from lwfc.tables import load_tables

    info = json.loads(Path(bundle_dir, "bundle.json").read_text())
    h, w, _c = info["feature"]["shape_nhwc"][1:]
    enc = Encoder(load_tables(str(Path(bundle_dir, "tables.json"))))
    return [enc.encode_int8(t, h, w) for t in small_tensors(info, n, seed)]


def bundle_frames(bundle: Path, images: str) -> list[bytes]:
    """Real frames: the bundle's edge.tflite on the images, encoded with its tables."""
    from lwfc.encoder import Encoder
    from lwfc.runner import EdgeModel, list_images, load_image, preprocess
    from lwfc.tables import load_tables

    info = json.loads((bundle / "bundle.json").read_text())
    edge = EdgeModel(str(bundle / "edge.tflite"))
    enc = Encoder(load_tables(str(bundle / "tables.json")))
    out = []
    for p in list_images(images):
        q = edge.run(preprocess(load_image(p), info["preprocessing"]))
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


def run_devices(url: str, bundle_dir: str | Path, frames: list[bytes], devices: int, per_device: int,
                window: int = 4) -> dict[str, Any]:
    """``devices`` processes, each a Link sending ``per_device`` frames; returns counts, frames per second
    (all devices, from the first send to the last answer) and round-trip percentiles."""
    import multiprocessing as mp

    from lwfc_host.serve.server import bundle_id

    info = json.loads(Path(bundle_dir, "bundle.json").read_text())
    table = json.loads(Path(bundle_dir, "tables.json").read_text())["table_id"]
    ctx = mp.get_context("spawn")  # the server's threads live in this process: do not fork it
    start = ctx.Event()
    out = ctx.Queue()
    procs = []
    for k in range(devices):
        hello = {"device": f"bench{k}", "model": info["model"], "bundle": bundle_id(bundle_dir), "table": table}
        p = ctx.Process(target=_device_process, args=(url, hello, frames[k::devices] or frames, per_device, window,
                                                      start, out))
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lwfc_host.serve.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 5, 20])
    parser.add_argument("--frames", type=int, default=2000, help="frames per run (split over the devices)")
    parser.add_argument("--workers", type=int, default=2, help="server worker threads")
    parser.add_argument("--window", type=int, default=4, help="unanswered frames each device may have in flight")
    parser.add_argument("--workdir", default="cache/server_bench")
    parser.add_argument("--bundle", help="a real bundle (with tables.json) instead of the small synthetic one")
    parser.add_argument("--images", help="with --bundle: images whose features make the frames")
    args = parser.parse_args(argv)

    from lwfc_host.serve.server import CloudModel, ServerConfig, run_in_thread

    if args.bundle:
        if not args.images:
            parser.error("--bundle needs --images")
        bundle = Path(args.bundle)
        frames = bundle_frames(bundle, args.images)
        n_el = int(np.prod(json.loads((bundle / "bundle.json").read_text())["feature"]["shape_nhwc"]))
        shape = "x".join(map(str, json.loads((bundle / "bundle.json").read_text())["feature"]["shape_nhwc"][1:]))
    else:
        bundle = Path(args.workdir) / "small_bundle"
        make_small_bundle(bundle)
        frames = small_frames(bundle, 64)
        n_el = int(np.prod(SMALL_SHAPE))
        shape = "x".join(map(str, SMALL_SHAPE))
    model = CloudModel(bundle)
    mean_bytes = sum(map(len, frames)) / len(frames)
    print(f"bundle {model.model_name}: frames of {mean_bytes:.0f} bytes on average ({8 * mean_bytes / n_el:.3f} "
          f"bits/element), shape {shape}, server workers {args.workers}, device window {args.window}")
    print(f"{'devices':>7} {'frames':>6} {'fps':>8} {'rtt p50':>8} {'p95':>8} {'p99':>8} "
          f"{'decode p50':>10} {'infer p50':>9} {'lost':>5}")
    for d in args.devices:
        server, stop = run_in_thread(model, ServerConfig(workers=args.workers), tcp=["127.0.0.1:0"])
        url = server.addresses[0]
        per = max(1, args.frames // d)
        r = run_devices(url, bundle, frames, d, per, args.window)
        status = stop()
        rtt = r["rtt_ms"] or {"p50": 0, "p95": 0, "p99": 0}
        print(f"{d:>7} {r['results']:>6} {r['fps']:>8.1f} {rtt['p50']:>8.2f} {rtt['p95']:>8.2f} {rtt['p99']:>8.2f} "
              f"{status['decode_ms']['p50']:>10.3f} {status['infer_ms']['p50']:>9.3f} "
              f"{r['sent'] - r['results'] - r['errors']:>5}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
