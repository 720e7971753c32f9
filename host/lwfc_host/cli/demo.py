"""``lwfc demo``: the whole edge-to-host pipeline on one machine, on an embedded default.

1. Convert EfficientNet-Lite0 into a bundle (int8 edge.tflite, cloud.onnx), or reuse the cached one
   (``$LWFC_CACHE/bundles/<model>``, by default ``~/.cache/lwfc``).
2. Design the tables on int8 features of random crops of the calibration photos (cached too).
3. Start the inference server on a loopback TCP port.
4. Run the device runner (``python -m lwfc run``, a separate process) on the bundled photos.
5. Print each photo's top-3 from the host next to the top-3 of the uncompressed model (the same int8
   edge half, its features not coded), and the bits per element.

Steps 1 and 2 live in ``lwfc_host.serve.demo_bundle`` (the benchmark and the tests use them too).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from lwfc_convert.cache import cache_root
from lwfc_host.serve.demo_bundle import (
    DEFAULT_MODEL,
    DemoError,
    bundle_complete,
    ensure_bundle,
    ensure_tables,
    photo_files,
)

# importable from here as before: the command line's names for the demo's parts
__all__ = ["DEFAULT_MODEL", "DemoError", "bundle_complete", "cache_root", "ensure_bundle", "ensure_tables",
           "photo_files", "reference_top", "run_demo"]


def reference_top(bundle: Path, photos: list[Path], k: int = 3) -> dict[str, list[list[Any]]]:
    """Top-k of the uncompressed model (int8 edge half, features not coded, ONNX cloud half) per photo."""
    from lwfc.bundle import load_bundle
    from lwfc.edge import EdgeModel
    from lwfc.images import load_image, preprocess
    from lwfc_convert.cloud_runtime import onnx_session, run_onnx
    from lwfc_host.serve.cloud import top_k

    b = load_bundle(bundle)
    edge = EdgeModel(b.edge_path)
    sess = onnx_session(b.cloud_path)
    out = {}
    for p in photos:
        q = edge.run(preprocess(load_image(str(p)), b.preprocessing))
        x = ((q.astype(np.float32) - edge.out_zp) * edge.out_scale)[None]
        out[str(p)] = top_k(run_onnx(sess, x), b.class_names, k)
    return out


def _run_device(bundle: Path, url: str, photos: list[Path], work: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """``python -m lwfc run`` on the photos against the server at ``url``, in its own process: its JSON report."""
    photo_dir = work / "photos"
    photo_dir.mkdir()
    for p in photos:
        os.symlink(p, photo_dir / p.name)
    report = work / "run.json"
    cmd = [sys.executable, "-m", "lwfc", "run", "--bundle", str(bundle), "--connect", url,
           "--images", str(photo_dir), "--device", "demo-board", "--json", str(report)]
    log("device: " + " ".join(cmd[1:4]) + " ... (a separate process)")
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    for line in proc.stdout.splitlines():
        if "oneDNN" not in line and "absl::" not in line:
            log("  | " + line)
    if proc.returncode != 0:
        raise DemoError(f"the device runner failed (exit status {proc.returncode})")
    return json.loads(report.read_text())


def _fmt(top: list[list[Any]] | None, rec: dict[str, Any]) -> str:
    if not top:
        return "(" + rec.get("error", "no answer") + ")"
    return ", ".join(f"{t[1].split(',')[0][:11]} {t[2]:.2f}" for t in top[:3])


def _print_comparison(run: dict[str, Any], ref: dict[str, list[list[Any]]], photos: list[Path],
                      log: Callable[[str], None]) -> int:
    """One line per photo: the host's top-3 next to the uncompressed model's; returns how many top-1 agree."""
    photo_by_name = {p.name: p for p in photos}
    log("")
    log(f"{'photo':<26} {'host top-3 (lwfc-coded features)':<52} {'uncompressed top-3':<52} top-1")
    agree = 0
    for rec in run["frames"]:
        p = str(photo_by_name[Path(rec["image"]).name])
        host = rec.get("result", {}).get("top") if rec["kind"] == "result" else None
        refk = ref.get(p, [])
        same = bool(host) and bool(refk) and host[0][0] == refk[0][0]
        agree += same
        log(f"{Path(p).stem[:26]:<26} {_fmt(host, rec):<52} {_fmt(refk, rec):<52} {'same' if same else 'DIFF'}")
    return agree


def run_demo(model: str = DEFAULT_MODEL, bundle_dir: str | None = None, port: int = 0, workers: int = 2,
             keep: bool = False, out=sys.stdout) -> dict[str, Any]:
    """Run the full demo; returns the runner's JSON (summary and frames) plus the reference top-k."""
    from lwfc_host.serve import CloudModel, ServerConfig, run_in_thread

    def log(msg: str) -> None:
        print(msg, file=out, flush=True)

    t0 = time.time()
    bundle = ensure_bundle(model, Path(bundle_dir) if bundle_dir else None, log=log)
    photos = photo_files(cache_root() / "photos")
    ensure_tables(bundle, photos, log=log)
    server, stop = run_in_thread(CloudModel(bundle, top=3), ServerConfig(workers=workers), tcp=[f"127.0.0.1:{port}"])
    url = server.addresses[0]
    log(f"server: listening on {url} (model {server.model.model_name}, bundle {server.model.bundle_id}, "
        f"table {server.model.table_ids()[0]})")
    work = Path(tempfile.mkdtemp(prefix="lwfc-demo-"))
    try:
        run = _run_device(bundle, url, photos, work, log)
        status = stop()
        stop = None
    finally:
        if stop is not None:
            stop()
        if keep:
            log(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    ref = reference_top(bundle, photos)
    agree = _print_comparison(run, ref, photos, log)
    s = run["summary"]
    log("")
    log(f"{s['frames']} frames: {s['results']} results, {s['error_total']} errors; top-1 agrees with the "
        f"uncompressed model on {agree}/{s['frames']}")
    log(f"bits per element {s['bits_per_element']:.4f} (frame {s['frame_bytes_mean']:.0f} bytes for "
        f"{run['frames'][0]['elements']} int8 elements: {8 / s['bits_per_element']:.1f}x smaller than int8)")
    log(f"encode {s['encode_ms_mean']:.1f} ms, round trip p50 {s['rtt_ms_p50']:.1f} ms; server decode p50 "
        f"{status['decode_ms']['p50']:.1f} ms, inference p50 {status['infer_ms']['p50']:.1f} ms; "
        f"total {time.time() - t0:.1f} s")
    run["reference"] = ref
    run["agree_top1"] = agree
    run["server"] = status
    return run
