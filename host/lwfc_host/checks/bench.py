"""``lwfc bench``: speed of each encoder implementation and of the host decoder, with x265 for scale.

All figures are elements per second on one core, end to end: int8 tensor in, finished frame out (or
frame in, float32 tensor out). Timings take the best of several repeats.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TextIO

import numpy as np

from lwfc.encoder import Encoder
from lwfc.tables import Tables
from lwfc_host.codec.decoder import Decoder
from lwfc_host.codec.fast import FastEncoder
from lwfc_host.design.tablegen import uniform_table


def relu_tensor(shape: tuple[int, int, int], seed: int, zero_fraction: float = 0.5,
                batch: int | None = None) -> np.ndarray:
    """Float activations with ReLU-like statistics: spatially smooth, ``zero_fraction`` exactly zero
    (with the bench's 4-level quantizer about 70% of the indices are then 0)."""
    rng = np.random.default_rng(seed)
    h, w, c = shape
    b = batch or 1
    x = rng.normal(size=(b, h + 2, w + 2, c)).astype(np.float32)
    x = (x[:, :-2, :-2] + x[:, 1:-1, 1:-1] + x[:, 2:, 2:] + x[:, 2:, :-2]) / 2.0
    x *= rng.uniform(0.5, 1.5, size=c).astype(np.float32)
    threshold = np.quantile(x, zero_fraction)
    y = np.maximum(x - threshold, 0.0)
    return y if batch else y[0]


def _best(fn, repeats: int, *args) -> float:
    """Best wall time of ``fn(*args)`` over ``repeats`` calls."""
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - t0)
    return best


def x265_seconds(frame_u8: np.ndarray, preset: str, frames: int = 1, qp: int = 30) -> tuple[float, int]:
    """Wall time and bytes for ffmpeg/libx265 coding ``frames`` copies of a 4:0:0 8-bit picture,
    all-intra at a fixed QP, one worker thread, in one ffmpeg process."""
    h, w = frame_u8.shape
    params = f"qp={qp}:keyint=1:ipratio=1:pbratio=1:info=0:pools=1:frame-threads=1"
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "in.raw"
        out = Path(tmp) / "out.hevc"
        raw.write_bytes(np.ascontiguousarray(frame_u8).tobytes() * frames)
        cmd = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "gray",
               "-s", f"{w}x{h}", "-i", str(raw), "-c:v", "libx265", "-preset", preset,
               "-x265-params", params, "-f", "hevc", "-y", str(out)]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        elapsed = time.perf_counter() - t0
        return elapsed, out.stat().st_size


def tile_channels(q: np.ndarray) -> np.ndarray:
    """(H, W, C) int8 -> one near-square 8-bit picture of C tiles (min-max is q + 128 here)."""
    h, w, c = q.shape
    cols = int(math.ceil(math.sqrt(c)))
    rows = int(math.ceil(c / cols))
    pic = np.zeros((rows * h, cols * w), dtype=np.uint8)
    for ch in range(c):
        r, k = divmod(ch, cols)
        pic[r * h:(r + 1) * h, k * w:(k + 1) * w] = (q[:, :, ch].astype(np.int16) + 128).astype(np.uint8)
    return pic


def run(shape=(64, 64, 256), repeats: int = 3, micropython: bool = True, x265: bool = True,
        out: TextIO | None = None) -> list[tuple[str, str, float]]:
    """Run the benchmark, print a table, and return (configuration, implementation, elements/s) rows."""
    import sys

    out = out or sys.stdout
    h, w, c = shape
    n = h * w * c
    calib = relu_tensor(shape, seed=1, batch=4)
    x = relu_tensor(shape, seed=2)
    clip_max = float(np.quantile(calib[calib > 0], 0.99))
    from lwfc_host.checks.conformance import reference_pattern

    refs = reference_pattern(c)  # two thirds of the channels refer to one of the other third (spec v2)
    configs = [("one model", dict(groups=1, classes=1)),
               ("16 channel groups", dict(groups=16, classes=1)),
               ("4 groups x 3x3 neighbour contexts", dict(groups=4, classes=3)),
               ("v2: 16 channel groups + reference channels (R=3)",
                dict(groups=16, classes=1, reference_channel=refs, reference_classes=3)),
               ("v2: 4 groups x 3x3 neighbour contexts + reference channels (R=3)",
                dict(groups=4, classes=3, reference_channel=refs, reference_classes=3))]
    rows: list[tuple[str, str, float]] = []
    print(f"lwfc bench: int8 tensor {h}x{w}x{c} = {n} elements, 4 levels, one core; elements/s, best of "
          f"{repeats}", file=out)
    for label, cfg in configs:
        table = uniform_table(calib, 4, clip_max=clip_max, **cfg)
        tables = Tables(table)
        scale, zp = table["int8"]["scale"], table["int8"]["zero_point"]
        q = np.clip(np.round(x / scale) + zp, -128, 127).astype(np.int8)
        qb = q.tobytes()
        zeros = float(np.mean(np.asarray(tables.index_of_q)[q.astype(int) + 128] == 0))
        enc = Encoder(tables)
        frame = enc.encode_int8(qb, h, w)
        bpe = 8 * len(frame) / n
        print(f"\n[{label}] {zeros:.0%} zero indices, {bpe:.3f} bits/element ({len(frame)} bytes)", file=out)
        timings = {
            "pure-Python encoder (CPython)": _best(enc.encode_int8, repeats, qb, h, w),
            "numpy+constriction encoder": _best(FastEncoder(tables).frame_int8, repeats, q),
            "host decoder (canonical check)": _best(Decoder(tables).decode, repeats, frame),
            "host decoder (no check)": _best(Decoder(tables, verify=False).decode, repeats, frame),
        }
        if cfg.get("classes") == 3:  # slices that fit a 1200-byte packet (SPEC.md 5, lwfc.slices)
            timings["pure-Python encoder, slices of <= 1200 bytes"] = _best(
                enc.encode_int8_sliced, repeats, qb, h, w, 1200)
        assert FastEncoder(tables).frame_int8(q) == frame
        if micropython:
            try:
                import json

                from lwfc_host.codec.micropython import encode_speed_micropython
                mps = encode_speed_micropython(json.dumps(table), qb, h, w)
                timings["pure-Python encoder (MicroPython wasm, node)"] = n / mps
            except Exception as exc:  # report why, keep benchmarking the rest
                print(f"  MicroPython: not measured ({exc})", file=out)
        for name, secs in timings.items():
            rate = n / secs
            rows.append((label, name, rate))
            print(f"  {name:<46} {rate / 1e6:8.2f} M elements/s  ({secs * 1e3:8.1f} ms)", file=out)
    if x265:
        if shutil.which("ffmpeg") is None:
            print("\nx265: ffmpeg not found (apt-get install ffmpeg)", file=out)
        else:
            q = np.clip(np.round(x / (clip_max / 255)) - 128, -128, 127).astype(np.int8)
            pic = tile_channels(q)
            print(f"\n[x265 all-intra, channels tiled into one {pic.shape[1]}x{pic.shape[0]} 4:0:0 frame, "
                  "1 thread]", file=out)
            for preset in ("ultrafast", "medium"):
                one, size = min(x265_seconds(pic, preset) for _ in range(repeats))
                ten, _ = x265_seconds(pic, preset, frames=10)
                per_frame = max((ten - one) / 9, 1e-9)  # in-stream cost per frame, start-up excluded
                rows.append(("x265", f"{preset} (one process per tensor)", n / one))
                rows.append(("x265", f"{preset} (in one stream)", n / per_frame))
                print(f"  x265 {preset:<10} one process per tensor   {n / one / 1e6:8.2f} M elements/s "
                      f"({one * 1e3:7.1f} ms, {8 * size / n:.3f} bits/element at QP 30)", file=out)
                print(f"  x265 {preset:<10} in one stream            {n / per_frame / 1e6:8.2f} M elements/s "
                      f"({per_frame * 1e3:7.1f} ms per frame)", file=out)
    return rows
