"""The edge runner: images -> preprocessing (as bundle.json says) -> int8 edge half (TFLite) -> lwfc
frame -> link to the host -> results. CPython with numpy, Pillow and ai_edge_litert or tflite_runtime
(Coral's stack; optionally with the Edge TPU delegate). The codec, protocol and transports it uses are
the MicroPython-compatible ones; the bundle is read by ``lwfc.bundle``, images by ``lwfc.images``, the
edge half runs in ``lwfc.edge``.

    python -m lwfc run --bundle B --connect tcp://HOST:PORT --images DIR
    python -m lwfc run --bundle B --connect mqtt://BROKER:1883/PREFIX --images DIR   (a pool of workers)

prints one line per frame and a summary: frames, results, errors by code, lost, dropped, bits per
element, encode ms and round-trip ms. ``--json FILE`` writes the same, per frame, for programs.
"""

import json
import os
import sys
import time

from .bundle import load_bundle
from .edge import EdgeModel
from .encoder import Encoder
from .images import list_images, load_image, preprocess
from .keys import KEY_ENV, load_key, load_login
from .protocol import ERROR_NAMES, ConnectionClosed, Refused
from .tables import load_tables


class RunnerError(Exception):
    """Bad input to the runner (an unreadable table file, a host that refuses or cannot be reached, ...).
    The key file, the bundle, the images and the edge model have their own errors: KeyFileError and
    BundleError (lwfc.errors), ImageError (lwfc.images) and EdgeError (lwfc.edge); ``python -m lwfc``
    reports all of them alike."""


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
    concealed = [r["result"].get("concealed", 0.0) for r in results if isinstance(r.get("result"), dict)]
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
        "concealed_mean": sum(concealed) / len(concealed) if concealed else None,
        "concealed_results": len([c for c in concealed if c > 0]),
    }


def print_summary(s, out=sys.stdout):
    """Print a run's summary (:func:`summarize`) in a few lines."""
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
    if s.get("concealed_results"):
        out.write("  concealed: %d results had missing slices; %.2f%% of all answered elements concealed\n"
                  % (s["concealed_results"], 100.0 * s["concealed_mean"]))
    out.write("  %.2f s, %.1f frames/s\n" % (s["wall_s"], s["frames_per_s"] or 0.0))
    out.flush()


def open_bundle(bundle, tables_path=None, edgetpu=False, threads=None):
    """What a run needs from the bundle directory: (Bundle, Tables, EdgeModel, preprocessing spec).
    ``tables_path`` overrides the bundle's tables.json."""
    b = load_bundle(bundle)
    tables_path = tables_path or b.tables_path
    try:
        tables = load_tables(tables_path)
    except OSError as exc:
        raise RunnerError("cannot read table file %s: %s (design one with `lwfc design`)"
                          % (tables_path, exc.strerror)) from None
    model = EdgeModel(b.edge_path, edgetpu, threads)
    return b, tables, model, b.preprocessing


def link_kind(connect):
    """(kind, mtu) of a transport address: ("stream", None) for tcp:// and plain serial lines, ("datagram", mtu)
    for udp://, ("sliced-stream", mtu) for a serial or UART line in datagram mode (``?mtu=N``, PROTOCOL.md
    10.6), ("mqtt", None) for a broker (mqtt://, mqtts://, PROTOCOL.md 11). With an mtu every tensor is sent as
    slices that fit it."""
    from .transport import parse_address

    scheme, _target, opts = parse_address(connect)
    if scheme in ("mqtt", "mqtts"):
        return "mqtt", None
    if scheme == "udp":
        return "datagram", opts["mtu"]
    if "mtu" in opts:
        return "sliced-stream", opts["mtu"]
    return "stream", None


def _connect(connect, hello, key, window, queue_frames, policy, answer_timeout_s, log, interleave=True,
             mqtt_login=None):
    """A connected link (``Link`` for byte streams, ``DatagramLink`` for udp://, ``MqttLink`` for a broker) and the
    host's WELCOME; a refusal or an unreachable host is a RunnerError."""
    from .protocol import ProtocolError

    kind = link_kind(connect)[0]
    if kind == "mqtt":
        from .mqttlink import MqttLink

        link = MqttLink(connect, hello, key=key, window=window, answer_timeout_s=answer_timeout_s, login=mqtt_login,
                        log=log)
    elif kind == "datagram":
        from .datagram import DatagramLink

        link = DatagramLink(connect, hello, key=key, window=window, answer_timeout_s=answer_timeout_s, log=log,
                            interleave=interleave)
    else:
        from .link import Link

        link = Link(connect, hello, key=key, window=window, queue_frames=queue_frames, policy=policy,
                    answer_timeout_s=answer_timeout_s, log=log)
    try:
        welcome = link.connect()
    except Refused as exc:
        raise RunnerError(str(exc)) from None
    except ProtocolError as exc:
        raise RunnerError("no session with %s: %s" % (connect, exc)) from None
    except OSError as exc:
        raise RunnerError("cannot connect to %s: %s" % (connect, exc)) from None
    return link, welcome


def _take(records, answers, quiet, out):
    """Record the host's answers in the frames' records (by tag) and print one line per answer."""
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


def _encode_one(i, path, model, pre, enc, save_frames, max_frame=None, plan="auto"):
    """Image ``path`` -> (lwfc frame, its record without an answer yet); with ``max_frame``, the list of slice
    frames (each at most ``max_frame`` bytes, cut by ``plan``: ``lwfc.slices.PLANS``) instead of one frame."""
    img = load_image(path)
    t0 = time.perf_counter()
    q = model.run(preprocess(img, pre))
    t1 = time.perf_counter()
    h, w, c = q.shape
    if max_frame:
        frames = enc.encode_int8_sliced(q.tobytes(), h, w, max_frame, plan)
    else:
        frames = [enc.encode_int8(q.tobytes(), h, w)]
    t2 = time.perf_counter()
    if save_frames:
        for j, frame in enumerate(frames):
            name = "%05d.lwfc" % i if not max_frame else "%05d.%03d.lwfc" % (i, j)
            with open(os.path.join(save_frames, name), "wb") as f:
                f.write(frame)
    nbytes = sum(len(f) for f in frames)
    record = {"index": i, "image": path, "bytes": nbytes, "elements": h * w * c, "slices": len(frames),
              "bpe": 8.0 * nbytes / (h * w * c), "edge_ms": (t1 - t0) * 1000,
              "encode_ms": (t2 - t1) * 1000, "kind": None}
    return (frames if max_frame else frames[0]), record


def _stream(link, paths, model, pre, enc, save_frames, records, quiet, out, kind="stream", max_frame=None,
            plan="auto"):
    """Encode and send every image, taking answers as they come; returns the link error (None if none).
    Every frame sent ends up answered in ``records``, even when the host goes away. ``kind`` and ``max_frame``:
    ``link_kind`` and the slice size (``lwfc.datagram.max_frame_bytes``) of a sliced link."""
    try:
        for i, path in enumerate(paths):
            frame, records[i] = _encode_one(i, path, model, pre, enc, save_frames, max_frame, plan)
            if kind == "sliced-stream":
                from .link import Slices

                frame = Slices(frame)
            _take(records, link.submit(frame, tag=i), quiet, out)
        _take(records, link.drain(), quiet, out)
    except ConnectionClosed as exc:  # the host is gone for good; every sent frame is still accounted for
        _take(records, getattr(exc, "answers", []), quiet, out)
        return str(exc)
    finally:
        link.close()
    return None


def run(bundle, connect, images, tables_path=None, device="lwfc-device", key=None, window=4, queue_frames=16,
        policy="drop-oldest", edgetpu=False, repeat=1, limit=None, answer_timeout_s=30.0, save_frames=None,
        quiet=False, out=sys.stdout, threads=None, interleave=True, slice_plan="auto", mqtt_login=None):
    """Run the edge half on the images and stream the frames; returns (summary, per-frame records). Over
    udp:// (or a serial line with ``?mtu=N``) every tensor goes out as slices that fit one datagram, sent in
    interleaved order unless ``interleave`` is false, cut by ``slice_plan`` (``lwfc.slices.PLANS``). Over mqtt://
    every frame goes through the broker to a pool of workers, logging in with ``mqtt_login`` (username,
    password)."""
    b, tables, model, pre = open_bundle(bundle, tables_path, edgetpu, threads)
    enc = Encoder(tables)
    paths = list_images(images) * max(1, repeat)
    if limit:
        paths = paths[:limit]
    if save_frames:
        os.makedirs(save_frames, exist_ok=True)
    hello = {"device": device, "model": b.model, "bundle": b.id, "table": tables.table_id_hex()}
    log = (lambda m: out.write("link: %s\n" % m)) if not quiet else None
    kind, mtu = link_kind(connect)
    max_frame = None
    if mtu is not None:
        from .datagram import max_frame_bytes
        from .slices import choose_plan

        max_frame = max_frame_bytes(mtu)
        slice_plan = choose_plan(tables, slice_plan)
    link, welcome = _connect(connect, hello, key, window, queue_frames, policy, answer_timeout_s, log,
                             interleave, mqtt_login)
    if not quiet:
        out.write("connected to %s: session %s, table %s, %d images%s\n"
                  % (connect, welcome.get("session"), tables.table_id_hex(), len(paths),
                     ", slices of at most %d bytes (%s plan)" % (max_frame, slice_plan) if max_frame else ""))
    records = {}
    t_start = time.time()
    link_error = _stream(link, paths, model, pre, enc, save_frames, records, quiet, out, kind, max_frame,
                         slice_plan)
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
    """The options of ``python -m lwfc run`` (argparse parser ``p``)."""
    p.add_argument("--bundle", required=True, help="bundle directory (bundle.json, edge.tflite, tables.json)")
    p.add_argument("--connect", required=True,
                   help="tcp://HOST:PORT, udp://HOST:PORT[?mtu=N] (each tensor as slices of one datagram each; "
                        "default mtu 1200), serial:///dev/ttyX[?baud=N][&mtu=N] (with mtu: datagram mode, each "
                        "slice its own message) or mqtt://HOST:PORT/PREFIX (mqtts:// for TLS, ?ca=FILE): through a "
                        "broker to a pool of `lwfc serve --mqtt` workers")
    p.add_argument("--images", required=True, help="a directory of images (or one image file)")
    p.add_argument("--tables", help="table file (default: the bundle's tables.json)")
    p.add_argument("--device", default="lwfc-device", help="this device's name (selects its key on the host)")
    p.add_argument("--key-file", help="file holding this device's shared key as hex (at least 16 bytes, mode 600): "
                                      "authenticate every message with HMAC-SHA256; default: $%s if set. "
                                      "Never on the command line, where the process list shows it" % KEY_ENV)
    p.add_argument("--mqtt-login", help="file holding the broker login as one line USERNAME:PASSWORD (mode 600); "
                                        "never on the command line")
    p.add_argument("--window", type=int, default=4, help="unanswered frames in flight (default 4)")
    p.add_argument("--queue", type=int, default=16, help="send queue length in frames (default 16)")
    p.add_argument("--policy", choices=["drop-oldest", "block"], default="drop-oldest",
                   help="what a full send queue does (default drop-oldest)")
    p.add_argument("--edgetpu", action="store_true", help="use the Coral Edge TPU delegate (libedgetpu.so.1)")
    p.add_argument("--threads", type=int, help="TFLite interpreter threads")
    p.add_argument("--repeat", type=int, default=1, help="go through the images this many times")
    p.add_argument("--limit", type=int, help="stop after this many frames")
    p.add_argument("--answer-timeout", type=float, default=30.0, help="seconds before an unanswered frame is LOST")
    p.add_argument("--slice-plan", choices=["auto", "rows", "channels"], default="auto",
                   help="how a tensor is cut into slices on a datagram link: channel blocks (fewer bits, better "
                        "concealment), row bands, or auto (channels unless the table has reference channels)")
    p.add_argument("--no-interleave", action="store_true",
                   help="send a tensor's slices in raster order (default: interleaved, so that a burst of lost "
                        "datagrams takes slices far apart)")
    p.add_argument("--save-frames", help="also write each frame to this directory (NNNNN.lwfc)")
    p.add_argument("--json", help="write the summary and per-frame records to this file")
    p.add_argument("--quiet", action="store_true", help="print only the summary")


def run_from_args(args):
    """``python -m lwfc run``: check the arguments no run would otherwise reject, run, write --json; the exit
    status is 1 when the link to the host failed, else 0."""
    for flag, value in (("--repeat", args.repeat), ("--limit", args.limit), ("--threads", args.threads)):
        if value is not None and value < 1:  # run() would quietly treat these as "no limit" / "default"
            raise RunnerError("%s must be at least 1, got %d" % (flag, value))
    from .transport import parse_address

    scheme = parse_address(args.connect)[0]  # a malformed address fails before the bundle is read
    if args.mqtt_login and scheme not in ("mqtt", "mqtts"):
        raise RunnerError("--mqtt-login applies to mqtt:// and mqtts:// addresses, not %s" % args.connect)
    key = load_key(args.key_file)
    login = load_login(args.mqtt_login) if args.mqtt_login else None
    summary, records = run(args.bundle, args.connect, args.images, args.tables, args.device, key, args.window,
                           args.queue, args.policy, args.edgetpu, args.repeat, args.limit, args.answer_timeout,
                           args.save_frames, args.quiet, threads=args.threads,
                           interleave=not args.no_interleave, slice_plan=args.slice_plan, mqtt_login=login)
    if args.quiet:
        print_summary(summary)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "frames": records}, f, indent=1)
    return 1 if summary.get("link_error") else 0
