"""The edge runner: images -> preprocessing (as bundle.json says) -> int8 edge half (TFLite) -> lwfc
frame -> link to the host -> results. CPython with numpy, Pillow and ai_edge_litert or tflite_runtime
(Coral's stack; optionally with the Edge TPU delegate). The codec, protocol and transports it uses are
the MicroPython-compatible ones.

    python -m lwfc run --bundle B --connect tcp://HOST:PORT --images DIR

prints one line per frame and a summary: frames, results, errors by code, lost, dropped, bits per
element, encode ms and round-trip ms. ``--json FILE`` writes the same, per frame, for programs.
"""

import json
import os
import sys
import time

from .encoder import Encoder
from .protocol import ERROR_NAMES, ConnectionClosed, Refused
from .tables import load_tables

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".pgm", ".ppm", ".gif", ".webp", ".tif", ".tiff")


class RunnerError(Exception):
    """Bad input to the runner (a missing bundle file, an unreadable image, no interpreter, ...)."""


def bundle_id_of(bundle_dir):
    """PROTOCOL.md 5.1: first 8 hex digits of SHA-256 of bundle.json (the file's bytes)."""
    import hashlib

    with open(os.path.join(bundle_dir, "bundle.json"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:8]


def read_bundle(bundle_dir):
    path = os.path.join(bundle_dir, "bundle.json")
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as exc:
        raise RunnerError("cannot read %s: %s (is %s a bundle directory?)" % (path, exc.strerror, bundle_dir)) from None
    except ValueError as exc:
        raise RunnerError("%s is not valid JSON: %s" % (path, exc)) from None


# --- preprocessing (numpy + Pillow, no torch; lwfc_convert.preprocess builds on it) -------------------

def resize_crop(img, resize, size):
    """Resize the shorter side of a uint8 image to ``resize`` (bicubic, Pillow) and centre-crop ``size`` x
    ``size``; returns a PIL image. The converters calibrate with this same function."""
    from PIL import Image

    im = Image.fromarray(img)
    w, h = im.size
    s = resize / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    im = im.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return im.crop((left, top, left + size, top + size))


def preprocess(img, spec):
    """One uint8 image (H x W or H x W x C) -> float32 NHWC batch of 1, as bundle.json's preprocessing says."""
    import numpy as np
    from PIL import Image

    kind = spec["kind"]
    size = int(spec["size"])
    img = np.asarray(img)
    if kind == "grey":
        x = img.astype(np.float32)
        if x.ndim == 3:
            x = x[:, :, :3].mean(axis=2)
        if x.shape != (size, size):
            x = np.asarray(Image.fromarray(x.astype(np.float32), mode="F").resize((size, size), Image.BILINEAR))
        x = (x / 255.0 - float(spec["mean"])) / float(spec["std"])
        return x.reshape(1, size, size, 1).astype(np.float32)
    if kind == "grey_to_rgb":
        g = img if img.ndim == 2 else img[:, :, :3].mean(axis=2)
        x = np.asarray(Image.fromarray(g.astype(np.float32), mode="F").resize((size, size), Image.BILINEAR)) / 255.0
        x = np.repeat(x[:, :, None], 3, axis=2)
        mean = np.asarray(spec["mean"], dtype=np.float32)
        std = np.asarray(spec["std"], dtype=np.float32)
        return ((x - mean) / std).reshape(1, size, size, 3).astype(np.float32)
    if kind in ("rgb", "caffe"):
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        arr = np.asarray(resize_crop(np.ascontiguousarray(img[:, :, :3]), int(spec.get("resize", size)), size),
                         dtype=np.float32)
        arr = arr * (1.0 if kind == "caffe" else 1.0 / 255.0)
        if spec.get("order", "RGB") == "BGR":
            arr = arr[:, :, ::-1]
        mean = np.asarray(spec["mean"], dtype=np.float32)
        std = np.asarray(spec.get("std", [1.0, 1.0, 1.0]), dtype=np.float32)
        return ((arr - mean) / std).reshape(1, size, size, 3).astype(np.float32)
    raise RunnerError("unknown preprocessing kind %r in bundle.json" % kind)


def load_image(path):
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    if path.endswith(".npy"):
        return np.load(path)
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "RGB"):
                im = im.convert("RGB")
            return np.asarray(im)
    except (OSError, UnidentifiedImageError) as exc:
        raise RunnerError("cannot read image %s: %s" % (path, exc)) from None


def list_images(source):
    """Image files of a directory (sorted), or the one file named."""
    if os.path.isdir(source):
        names = sorted(n for n in os.listdir(source) if n.lower().endswith(IMAGE_EXTENSIONS + (".npy",)))
        if not names:
            raise RunnerError("no images (%s) in %s" % (", ".join(IMAGE_EXTENSIONS), source))
        return [os.path.join(source, n) for n in names]
    if os.path.isfile(source):
        return [source]
    raise RunnerError("%s is neither an image file nor a directory" % source)


# --- the edge half ---------------------------------------------------------------------------------------

def make_interpreter(model_path, edgetpu=False, threads=None):
    """A TFLite interpreter from ai_edge_litert or tflite_runtime, whichever is installed; with ``edgetpu``
    the Edge TPU delegate (Coral: the model must be compiled with edgetpu_compiler)."""
    try:
        from ai_edge_litert.interpreter import Interpreter, load_delegate
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter, load_delegate
        except ImportError:
            raise RunnerError("no TFLite runtime: install ai-edge-litert (pip) or tflite-runtime (Coral)") from None
    if not os.path.exists(model_path):
        raise RunnerError("edge model %s does not exist" % model_path)
    kwargs = {"model_path": model_path}
    if threads:
        kwargs["num_threads"] = threads
    if edgetpu:
        try:
            kwargs["experimental_delegates"] = [load_delegate("libedgetpu.so.1")]
        except (OSError, ValueError) as exc:
            raise RunnerError("cannot load the Edge TPU delegate (libedgetpu.so.1): %s" % exc) from None
    interp = Interpreter(**kwargs)
    interp.allocate_tensors()
    return interp


class EdgeModel(object):
    """The int8 edge half: float NHWC input -> int8 NHWC feature tensor (bytes) and its shape."""

    def __init__(self, path, edgetpu=False, threads=None):
        self.interp = make_interpreter(path, edgetpu, threads)
        self.inp = self.interp.get_input_details()[0]
        self.out = self.interp.get_output_details()[0]
        self.in_scale, self.in_zp = self.inp["quantization"]
        self.out_scale, self.out_zp = self.out["quantization"]
        if self.out["dtype"].__name__ != "int8":
            raise RunnerError("the edge model's output is %s, not int8" % self.out["dtype"].__name__)

    def run(self, x):
        import numpy as np

        if self.inp["dtype"].__name__ == "int8":
            # the model's own input scale and zero point: calibrated, or the grid on which the preprocessed
            # pixels lie exactly (EfficientNet-Lite: (p - 127)/128 becomes q = p - 128)
            x = np.clip(np.round(x / self.in_scale) + self.in_zp, -128, 127).astype(np.int8)
        self.interp.set_tensor(self.inp["index"], x.astype(self.inp["dtype"], copy=False))
        self.interp.invoke()
        q = self.interp.get_tensor(self.out["index"])
        return q.reshape(q.shape[-3:])


# --- the run --------------------------------------------------------------------------------------------

def _pct(values, p):
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def _fmt_top(result):
    """One line for a server result: top-3 classes, the 3 best detections, or the tensor shape."""
    if result.get("top"):
        return "  ".join("%s %.3f" % (t[1], t[2]) for t in result["top"][:3])
    if result.get("kind") == "detection":
        dets = result.get("detections") or []
        best = "  ".join("%s %.2f" % (d["label"], d["score"]) for d in dets[:3])
        return "%d detections%s" % (len(dets), ("  " + best) if best else "")
    return "shape %s" % (result.get("shape"),)


def summarize(records, wall_s):
    """The summary of a run from its per-frame records (every frame exactly once)."""
    results = [r for r in records if r["kind"] == "result"]
    errors = {}
    for r in records:
        if r["kind"] == "error":
            name = ERROR_NAMES.get(r["code"], str(r["code"]))
            errors[name] = errors.get(name, 0) + 1
    enc = [r["encode_ms"] for r in records if r.get("encode_ms") is not None]
    edge = [r["edge_ms"] for r in records if r.get("edge_ms") is not None]
    rtt = [r["rtt_ms"] for r in results if r.get("rtt_ms") is not None]
    nbytes = sum(r["bytes"] for r in records)
    nel = sum(r["elements"] for r in records)
    return {
        "frames": len(records),
        "results": len(results),
        "errors": errors,
        "error_total": sum(errors.values()),
        "lost": errors.get("LOST", 0),
        "dropped": errors.get("DROPPED", 0),
        "bits_per_element": 8.0 * nbytes / nel if nel else None,
        "frame_bytes_mean": nbytes / len(records) if records else None,
        "edge_ms_mean": sum(edge) / len(edge) if edge else None,
        "encode_ms_mean": sum(enc) / len(enc) if enc else None,
        "encode_ms_p50": _pct(enc, 50),
        "rtt_ms_p50": _pct(rtt, 50),
        "rtt_ms_p95": _pct(rtt, 95),
        "rtt_ms_p99": _pct(rtt, 99),
        "wall_s": wall_s,
        "frames_per_s": len(records) / wall_s if wall_s > 0 else None,
    }


def print_summary(s, out=sys.stdout):
    out.write("summary: %d frames: %d results, %d errors%s\n" % (
        s["frames"], s["results"], s["error_total"],
        " (%s)" % ", ".join("%s %d" % kv for kv in sorted(s["errors"].items())) if s["errors"] else ""))
    if s["bits_per_element"] is not None:
        out.write("  bits per element %.4f (mean frame %.0f bytes)\n" % (s["bits_per_element"], s["frame_bytes_mean"]))
    if s["encode_ms_mean"] is not None:
        out.write("  edge %.2f ms, encode %.2f ms mean per frame\n" % (s["edge_ms_mean"] or 0.0, s["encode_ms_mean"]))
    if s["rtt_ms_p50"] is not None:
        out.write("  round trip ms: p50 %.2f  p95 %.2f  p99 %.2f\n"
                  % (s["rtt_ms_p50"], s["rtt_ms_p95"], s["rtt_ms_p99"]))
    out.write("  %.2f s, %.1f frames/s\n" % (s["wall_s"], s["frames_per_s"] or 0.0))
    out.flush()


def run(bundle, connect, images, tables_path=None, device="lwfc-device", key=None, window=4, queue_frames=16,
        policy="drop-oldest", edgetpu=False, repeat=1, limit=None, answer_timeout_s=30.0, save_frames=None,
        quiet=False, out=sys.stdout, threads=None):
    """Run the edge half on the images and stream the frames; returns (summary, per-frame records)."""
    from .link import Link

    info = read_bundle(bundle)
    tables_path = tables_path or os.path.join(bundle, info.get("tables", "tables.json"))
    try:
        tables = load_tables(tables_path)
    except OSError as exc:
        raise RunnerError("cannot read table file %s: %s (design one with `lwfc design`)"
                          % (tables_path, exc.strerror)) from None
    edge_file = os.path.join(bundle, (info.get("edge") or {}).get("file", "edge.tflite"))
    model = EdgeModel(edge_file, edgetpu, threads)
    pre = info.get("preprocessing")
    if not pre:
        raise RunnerError("bundle.json has no preprocessing section")
    enc = Encoder(tables)
    paths = list_images(images) * max(1, repeat)
    if limit:
        paths = paths[:limit]
    if save_frames:
        os.makedirs(save_frames, exist_ok=True)
    hello = {"device": device, "model": info.get("model", ""), "bundle": bundle_id_of(bundle),
             "table": tables.table_id_hex()}
    log = (lambda m: out.write("link: %s\n" % m)) if not quiet else None
    link = Link(connect, hello, key=key, window=window, queue_frames=queue_frames, policy=policy,
                answer_timeout_s=answer_timeout_s, log=log)
    try:
        welcome = link.connect()
    except Refused as exc:
        raise RunnerError(str(exc)) from None
    except OSError as exc:
        raise RunnerError("cannot connect to %s: %s" % (connect, exc)) from None
    if not quiet:
        out.write("connected to %s: session %s, table %s, %d images\n"
                  % (connect, welcome.get("session"), tables.table_id_hex(), len(paths)))
    records = {}

    def take(answers):
        for a in answers:
            r = records[a.tag]
            r["seq"] = a.seq
            r["kind"] = a.kind
            r["code"] = a.code
            r["rtt_ms"] = a.rtt_ms
            if a.kind == "result":
                r["result"] = a.result
            else:
                r["error"] = ERROR_NAMES.get(a.code, str(a.code)) + ": " + a.message
            if not quiet:
                line = "[%4d] %-28s %6.3f b/el  enc %6.2f ms  rtt %s  " % (
                    a.tag, os.path.basename(r["image"])[:28], r["bpe"], r["encode_ms"],
                    ("%7.2f ms" % a.rtt_ms) if a.rtt_ms is not None else "      -   ")
                out.write(line + (_fmt_top(a.result) if a.kind == "result" else "ERROR " + r["error"]) + "\n")
                out.flush()

    t_start = time.time()
    link_error = None
    try:
        for i, path in enumerate(paths):
            img = load_image(path)
            t0 = time.perf_counter()
            q = model.run(preprocess(img, pre))
            t1 = time.perf_counter()
            h, w, _c = q.shape
            frame = enc.encode_int8(q.tobytes(), h, w)
            t2 = time.perf_counter()
            if save_frames:
                with open(os.path.join(save_frames, "%05d.lwfc" % i), "wb") as f:
                    f.write(frame)
            records[i] = {"index": i, "image": path, "bytes": len(frame), "elements": h * w * q.shape[2],
                          "bpe": 8.0 * len(frame) / (h * w * q.shape[2]), "edge_ms": (t1 - t0) * 1000,
                          "encode_ms": (t2 - t1) * 1000, "kind": None}
            take(link.submit(frame, tag=i))
        take(link.drain())
    except ConnectionClosed as exc:  # the host is gone for good; every sent frame is still accounted for
        take(getattr(exc, "answers", []))
        link_error = str(exc)
    finally:
        link.close()
    wall = time.time() - t_start
    recs = [records[i] for i in sorted(records)]
    missing = [r for r in recs if r["kind"] is None]
    if missing:  # cannot happen by construction (Link answers every frame); say so loudly if it does
        raise RunnerError("%d frames were never accounted for: a bug" % len(missing))
    summary = summarize(recs, wall)
    summary["reconnects"] = link.reconnects
    summary["link_error"] = link_error
    if link_error and not quiet:
        out.write("link failed: %s (stopped after %d of %d images)\n" % (link_error, len(recs), len(paths)))
    if not quiet:
        print_summary(summary, out)
    return summary, recs


def add_run_arguments(p):
    p.add_argument("--bundle", required=True, help="bundle directory (bundle.json, edge.tflite, tables.json)")
    p.add_argument("--connect", required=True, help="tcp://HOST:PORT or serial:///dev/ttyX[?baud=N]")
    p.add_argument("--images", required=True, help="a directory of images (or one image file)")
    p.add_argument("--tables", help="table file (default: the bundle's tables.json)")
    p.add_argument("--device", default="lwfc-device", help="this device's name (selects its key on the host)")
    p.add_argument("--key", help="shared key, hex (at least 16 bytes): authenticate every frame with HMAC-SHA256")
    p.add_argument("--window", type=int, default=4, help="unanswered frames in flight (default 4)")
    p.add_argument("--queue", type=int, default=16, help="send queue length in frames (default 16)")
    p.add_argument("--policy", choices=["drop-oldest", "block"], default="drop-oldest",
                   help="what a full send queue does (default drop-oldest)")
    p.add_argument("--edgetpu", action="store_true", help="use the Coral Edge TPU delegate (libedgetpu.so.1)")
    p.add_argument("--threads", type=int, help="TFLite interpreter threads")
    p.add_argument("--repeat", type=int, default=1, help="go through the images this many times")
    p.add_argument("--limit", type=int, help="stop after this many frames")
    p.add_argument("--answer-timeout", type=float, default=30.0, help="seconds before an unanswered frame is LOST")
    p.add_argument("--save-frames", help="also write each frame to this directory (NNNNN.lwfc)")
    p.add_argument("--json", help="write the summary and per-frame records to this file")
    p.add_argument("--quiet", action="store_true", help="print only the summary")


def run_from_args(args):
    key = None
    if args.key:
        try:
            key = bytes.fromhex(args.key)
        except ValueError:
            raise RunnerError("--key must be hex") from None
        if len(key) < 16:
            raise RunnerError("--key must have at least 16 bytes (32 hex digits)")
    summary, records = run(args.bundle, args.connect, args.images, args.tables, args.device, key, args.window,
                           args.queue, args.policy, args.edgetpu, args.repeat, args.limit, args.answer_timeout,
                           args.save_frames, args.quiet, threads=args.threads)
    if args.quiet:
        print_summary(summary)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "frames": records}, f, indent=1)
    return 1 if summary.get("link_error") else 0
