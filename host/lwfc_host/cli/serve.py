"""``lwfc serve``, ``lwfc flash`` and ``lwfc demo``: the host server, board flashing and the full demo."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    s = subparsers.add_parser(
        "serve", help="inference server: receive frames from devices, decode, run the cloud half, answer",
        description="Serve many devices at once over TCP, UDP and/or serial lines (codec_spec/PROTOCOL.md): decode "
                    "their lwfc frames, run the bundle's cloud half with onnxruntime, answer each frame with its "
                    "top-k classes or an error code. With --udp, devices send each tensor as slices in datagrams "
                    "and the answer says which fraction was concealed. With --mqtt, this process is one worker of a "
                    "pool that shares the frames a fleet publishes to an MQTT broker. SIGUSR1 prints the running "
                    "totals; they are printed at exit.")
    s.add_argument("--bundle", required=True, help="bundle directory (bundle.json, cloud.onnx, tables.json)")
    s.add_argument("--tables", action="append", help="table file(s) to accept (default: the bundle's tables.json)")
    s.add_argument("--tcp", action="append", default=[], metavar="ADDR:PORT",
                   help="listen on this TCP address (repeatable; default 127.0.0.1:5005 when no --serial)")
    s.add_argument("--udp", action="append", default=[], metavar="ADDR:PORT",
                   help="serve datagram sessions on this UDP address (repeatable; PROTOCOL.md 10): each tensor "
                        "arrives as slices, one per datagram; what is missing at the deadline is concealed")
    s.add_argument("--mqtt", action="append", default=[], metavar="mqtt://HOST:PORT/PREFIX",
                   help="be one worker of a pool on an MQTT broker (PROTOCOL.md 11): take a share of the frames the "
                        "devices publish to PREFIX/DEVICE/data (shared subscription $share/GROUP/PREFIX/+/data), "
                        "answer on PREFIX/DEVICE/result. mqtts://HOST:PORT/PREFIX[?ca=FILE] for TLS. Start as many "
                        "workers as cores, on any machines, each with --workers 1")
    s.add_argument("--mqtt-group", default="lwfc", metavar="NAME",
                   help="the pool's shared-subscription group: workers of one group split the frames (default lwfc)")
    s.add_argument("--mqtt-login", metavar="FILE",
                   help="file holding the broker login as one line USERNAME:PASSWORD (mode 600); never on the "
                        "command line")
    s.add_argument("--serial", action="append", default=[], metavar="DEV", help="serve a serial line (repeatable)")
    s.add_argument("--baud", type=int, help="baud rate of the --serial lines (default 115200)")
    s.add_argument("--status", metavar="ADDR:PORT", help="HTTP status endpoint answering the running totals as JSON")
    s.add_argument("--log", metavar="FILE", help="structured per-frame log, one JSON object per line ('-': stderr)")
    s.add_argument("--keys", metavar="FILE",
                   help="JSON {device: hex key} for authenticated sessions; must be private (mode 600). A device "
                        "with a key must always authenticate")
    s.add_argument("--require-auth", action="store_true", help="also refuse devices that have no key")
    s.add_argument("--top", type=int, help="classes in each answer of a classification bundle (default 5)")
    s.add_argument("--workers", type=int, default=2, help="decode/inference threads (default 2)")
    s.add_argument("--pipeline", type=int, default=4,
                   help="frames of one connection decoded at once; answers stay in order (default 4)")
    s.add_argument("--max-connections", type=int, default=256, help="connections served at once (default 256)")
    s.add_argument("--max-per-address", type=int, default=32,
                   help="connections at once from one IP address (default 32)")
    s.add_argument("--max-pending", type=int, default=64,
                   help="connections at once that have not completed HELLO, all addresses together (default 64)")
    s.add_argument("--max-seq-gap", type=int, default=1024,
                   help="how far a DATA seq may jump ahead of the expected one (default 1024)")
    s.add_argument("--max-message", type=int, default=0,
                   help="largest accepted message body in bytes (default: the largest legal frame of the bundle's "
                        "feature shape, at least 64 KiB)")
    s.add_argument("--max-garbage", type=int, default=1 << 20,
                   help="bytes of garbage tolerated without a valid message before closing (default 1 MiB)")
    s.add_argument("--hello-timeout", type=float, default=5.0,
                   help="seconds from connecting to a completed HELLO (absolute; default 5)")
    s.add_argument("--message-timeout", type=float, default=10.0,
                   help="seconds from a message's first byte to its last (absolute; default 10)")
    s.add_argument("--idle-timeout", type=float, default=30.0,
                   help="seconds without a valid message before a session is closed (default 30)")
    s.add_argument("--slice-deadline-ms", type=float, default=50.0,
                   help="a sliced tensor is answered when its slices tile it or this many ms after its first slice "
                        "arrived, its missing part concealed (default 50)")
    s.add_argument("--concealment", default=None,
                   help="how the missing part of a sliced tensor is filled in: zero, expectation, mean, interpolate, "
                        "adaptive, learned or conditional (default: conditional; without --conceal-params it falls "
                        "back to adaptive, which needs the table alone)")
    s.add_argument("--conceal-params", metavar="FILE",
                   help="calibration statistics for the concealment (conceal_params.npz written by `lwfc eval-loss`)")
    s.add_argument("--max-open-tensors", type=int, default=8,
                   help="tensors of one session assembled at once; a new one closes the oldest (default 8)")
    s.set_defaults(func=cmd_serve)

    b = subparsers.add_parser(
        "serve-bench", help="server benchmarks: TCP devices, or (--mqtt) a fleet over a broker with a worker pool",
        description="Without --mqtt: the TCP server's benchmark (python -m lwfc_host.serve.bench): device processes "
                    "over loopback TCP, frames per second and latency for each device count. With --mqtt: a fleet "
                    "of simulated devices publishing through one Mosquitto (started on a free loopback port) to "
                    "a pool of `lwfc serve --mqtt` worker processes, one run per pool size, then one with a worker "
                    "killed (SIGKILL) halfway: frames per second, p50/p99 round trip, CPU per frame of the "
                    "workers, the broker and the devices, lost and duplicate answers. The frames are the demo "
                    "bundle's (its edge half on the demo photos), the cloud half its real one.")
    b.add_argument("--mqtt", action="store_true", help="the fleet benchmark over MQTT (PROTOCOL.md 11)")
    b.add_argument("--devices", type=int, nargs="+",
                   help="TCP: one run per device count (default 1 5 20); --mqtt: the fleet's size (default 200)")
    b.add_argument("--frames", type=int,
                   help="TCP: frames per run, split over the devices (default 2000); --mqtt: frames per device "
                        "(default 500)")
    b.add_argument("--workers", type=int, nargs="+",
                   help="TCP: the server's decode threads (one value, default 2); --mqtt: one run per worker pool "
                        "size (processes, default 1 2 4)")
    b.add_argument("--window", type=int, help="unanswered frames per device (default: TCP 4, --mqtt 2)")
    b.add_argument("--no-kill", action="store_true", help="--mqtt: skip the run with a worker killed halfway")
    b.add_argument("--kill-workers", type=int, default=2, help="--mqtt: pool size of the kill run (default 2)")
    b.add_argument("--simulators", type=int, default=2,
                   help="--mqtt: processes that simulate the devices, each over one MQTT connection (default 2)")
    b.add_argument("--auth", action="store_true", help="--mqtt: a key per device, HMAC on every message")
    b.add_argument("--quick", action="store_true",
                   help="--mqtt: a short run for a test: 20 devices x 20 frames, pools of 1 and 2")
    b.add_argument("--json", metavar="FILE", help="--mqtt: write every run's figures to this file")
    b.add_argument("--bundle", help="bundle directory with tables.json (default: the demo's, made once in the cache)")
    b.add_argument("--images", help="images whose features make the frames (default: the demo's photos)")
    b.set_defaults(func=cmd_serve_bench)

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
    f.add_argument("--key-file", metavar="FILE",
                   help="file holding the device's shared key (hex, mode 600) for authenticated sessions; default "
                        "$LWFC_DEVICE_KEY if set. Written to the board as device.key, never into config.json")
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
    d.add_argument("--keep", action="store_true", help="keep the run's work directory (its path is printed)")
    d.set_defaults(func=cmd_demo)


def _error(msg: str) -> Exception:
    from lwfc_host.cli import CommandError

    return CommandError(msg)


def _check_serve_args(args: argparse.Namespace) -> None:
    """Refuse values the server would not honour as given (no flag is silently ignored or changed)."""
    if args.baud is not None and not args.serial:
        raise _error("--baud applies to --serial lines; no --serial given")
    if (args.mqtt_login or args.mqtt_group != "lwfc") and not args.mqtt:
        raise _error("--mqtt-group and --mqtt-login apply to --mqtt; no --mqtt given")
    if args.baud is not None and args.baud <= 0:
        raise _error(f"--baud must be positive, got {args.baud}")
    for flag, value in (("--top", args.top), ("--workers", args.workers), ("--pipeline", args.pipeline),
                        ("--max-connections", args.max_connections), ("--max-per-address", args.max_per_address),
                        ("--max-pending", args.max_pending), ("--max-seq-gap", args.max_seq_gap)):
        if value is not None and value < 1:
            raise _error(f"{flag} must be at least 1, got {value}")
    for flag, value in (("--max-message", args.max_message), ("--max-garbage", args.max_garbage)):
        if value < 0:
            raise _error(f"{flag} must not be negative, got {value}")
    if args.max_open_tensors < 1:
        raise _error(f"--max-open-tensors must be at least 1, got {args.max_open_tensors}")
    from lwfc_host.codec.conceal import METHODS

    if args.concealment is not None and args.concealment not in METHODS:
        raise _error(f"--concealment must be one of {', '.join(METHODS)}, got {args.concealment!r}")
    for flag, value in (("--hello-timeout", args.hello_timeout), ("--message-timeout", args.message_timeout),
                        ("--idle-timeout", args.idle_timeout), ("--slice-deadline-ms", args.slice_deadline_ms)):
        if not value > 0:
            raise _error(f"{flag} must be positive, got {value}")


def _load_login(path: str | None) -> tuple[str, str] | None:
    """The broker login of --mqtt-login (the device's reader: one implementation), as a ServerError when bad."""
    if path is None:
        return None
    from lwfc.errors import KeyFileError
    from lwfc.keys import load_login
    from lwfc_host.serve import ServerError

    try:
        return load_login(path)
    except KeyFileError as exc:
        raise ServerError(str(exc)) from exc


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio
    import json
    import sys

    from lwfc_host.serve import CloudModel, ServerConfig, ServerError, json_log_sink, load_keys, serve

    _check_serve_args(args)
    try:
        model = CloudModel(args.bundle, args.tables, top=args.top or 5, conceal_params=args.conceal_params,
                           **({"concealment": args.concealment} if args.concealment else {}))
        keys = load_keys(args.keys) if args.keys else {}
        login = _load_login(args.mqtt_login)
    except ServerError as exc:
        raise _error(str(exc)) from exc
    if args.top is not None and model.bundle.task == "detection":
        raise _error(f"--top applies to classification bundles; {args.bundle} is a detector (its answers are "
                     "detections)")
    if args.require_auth and not keys:
        raise _error("--require-auth needs --keys")
    config = ServerConfig(max_message=args.max_message, max_garbage=args.max_garbage,
                          hello_timeout_s=args.hello_timeout, message_timeout_s=args.message_timeout,
                          idle_timeout_s=args.idle_timeout, max_connections=args.max_connections,
                          max_per_address=args.max_per_address, max_pending=args.max_pending,
                          max_seq_gap=args.max_seq_gap, workers=args.workers, pipeline=args.pipeline, keys=keys,
                          require_auth=args.require_auth, log=json_log_sink(args.log) if args.log else None,
                          slice_deadline_s=args.slice_deadline_ms / 1000.0, max_open_tensors=args.max_open_tensors)
    tcp = args.tcp or ([] if args.serial or args.udp or args.mqtt else ["127.0.0.1:5005"])

    def ready(server) -> None:
        for a in server.addresses:
            print(f"lwfc serve: listening on {a}", flush=True)
        print(f"lwfc serve: model {model.model_name}, bundle {model.bundle_id}, tables "
              f"{', '.join(model.table_ids())}, max message {server.max_message} bytes", flush=True)

    try:
        final = asyncio.run(serve(model, config, tcp, args.serial, args.baud or 115200, args.status, ready,
                                  udp=args.udp, mqtt=args.mqtt, mqtt_group=args.mqtt_group, mqtt_login=login))
    except ServerError as exc:
        raise _error(str(exc)) from exc
    print(json.dumps(final), file=sys.stderr, flush=True)
    return 0


def cmd_serve_bench(args: argparse.Namespace) -> int:
    for flag, values in (("--devices", args.devices), ("--frames", [args.frames] if args.frames is not None else None),
                         ("--workers", args.workers), ("--window", [args.window] if args.window is not None else None),
                         ("--kill-workers", [args.kill_workers]), ("--simulators", [args.simulators])):
        if values is not None and min(values) < 1:
            raise _error(f"{flag} must be at least 1")
    if not args.mqtt:
        mqtt_only = [f for f, v in (("--no-kill", args.no_kill), ("--auth", args.auth), ("--quick", args.quick),
                                    ("--json", args.json)) if v]
        if mqtt_only or args.kill_workers != 2 or args.simulators != 2:
            raise _error(f"{', '.join(mqtt_only) or '--kill-workers/--simulators'} apply to --mqtt")
        if args.workers is not None and len(args.workers) > 1:
            raise _error("--workers takes one value for the TCP benchmark (the server's threads)")
        from lwfc_host.serve.bench import main

        argv = []
        for flag, value in (("--devices", args.devices), ("--frames", args.frames), ("--workers", args.workers),
                            ("--window", args.window), ("--bundle", args.bundle), ("--images", args.images)):
            if value is not None:
                argv += [flag, *map(str, value if isinstance(value, list) else [value])]
        return main(argv)
    if args.devices is not None and len(args.devices) > 1:
        raise _error("--devices takes one value with --mqtt (the fleet's size)")
    from lwfc_host.serve.fleet_bench import bench

    devices, frames, workers = (20, 20, [1, 2]) if args.quick else (200, 500, [1, 2, 4])
    runs = bench(args.devices[0] if args.devices else devices, args.frames or frames, args.workers or workers,
                 kill=not args.no_kill, window=args.window or 2, simulators=args.simulators, auth=args.auth,
                 bundle=args.bundle, images=args.images, json_path=args.json, kill_workers=args.kill_workers)
    bad = [r for r in runs if r["lost"] or r["handed_twice"] or r["answered_seqs"] != r["sent"]]
    return 1 if bad else 0


def cmd_flash(args: argparse.Namespace) -> int:
    from lwfc.errors import KeyFileError
    from lwfc.keys import load_key
    from lwfc_host.deploy.flash import KEY_NOTES, FlashError, flash

    try:
        key = load_key(args.key_file)
        written = flash(args.bundle, args.target, kind=args.kind, tables=args.tables, connect=args.connect,
                        device=args.device, key=key, mpy=not args.no_mpy, remote_dir=args.remote_dir)
    except (FlashError, KeyFileError) as exc:
        raise _error(str(exc)) from exc
    for name, size in written:
        print(f"  {name:<36} {size:>9} bytes")
    print(f"flashed {len(written)} files to {args.target}")
    if key is not None:
        kind = args.kind if args.kind != "auto" else ("micropython" if args.target.startswith("serial://")
                                                      else "linux")
        print(f"note: {KEY_NOTES[kind]}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from lwfc_host.cli.demo import DemoError, run_demo
    from lwfc_host.serve import ServerError

    try:
        run_demo(args.model, args.bundle, args.port, keep=args.keep)
    except (DemoError, ServerError) as exc:
        raise _error(str(exc)) from exc
    return 0
