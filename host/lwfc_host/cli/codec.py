"""Subcommands of the codec core: encode, decode, inspect, conformance, bench."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lwfc_host.cli.errors import CommandError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "encode", help="encode an int8 (or float) tensor into an lwfc frame",
        description="Quantize a tensor with a table file and write one lwfc frame (SPEC.md).")
    p.add_argument("--tables", required=True, help="table file (JSON)")
    p.add_argument("--input", required=True, help=".npy tensor in the table's NHWC layout: (H, W, C) or (1, H, W, C)")
    p.add_argument("--output", required=True, help="frame file to write (.lwfc)")
    p.add_argument("--float", action="store_true", help="the input is float32 (quantized by fixed-point thresholds)")
    p.add_argument("--backend", choices=["python", "constriction"], default="python",
                   help="pure-Python device encoder (default) or the numpy+constriction fast path")
    p.set_defaults(func=cmd_encode)

    p = subparsers.add_parser(
        "decode", help="decode an lwfc frame to a float32 tensor",
        description="Validate and decode one frame; write the reconstructed float32 tensor (1, H, W, C).")
    p.add_argument("--tables", required=True, help="table file (JSON) the frame was coded with")
    p.add_argument("--input", required=True, help="frame file (.lwfc)")
    p.add_argument("--output", required=True, help=".npy file for the float32 tensor")
    p.add_argument("--indices", help="also write the uint8 quantization indices (H, W, C) to this .npy file")
    p.set_defaults(func=cmd_decode)

    p = subparsers.add_parser(
        "inspect", help="print a frame's header fields and bits per element",
        description="Parse a frame's header, check its length and CRC, and print its fields.")
    p.add_argument("frame", help="frame file (.lwfc)")
    p.add_argument("--tables", help="also check the frame against this table file and decode it")
    p.set_defaults(func=cmd_inspect)

    p = subparsers.add_parser(
        "conformance", help="run the conformance vectors through every encoder and the decoder",
        description="Encode every vector in codec_spec/vectors with every available implementation "
                    "(pure Python, its per-element loop, numpy+constriction, MicroPython under node) and "
                    "decode with the host decoder. Exits 1 on any mismatch.")
    p.add_argument("--vectors", default=None, help="vector folder (default: codec_spec/vectors)")
    p.add_argument("--no-micropython", action="store_true", help="skip the MicroPython implementation")
    p.add_argument("--regenerate", action="store_true",
                   help="rewrite the vectors with the current encoder (only for a deliberate spec change)")
    p.set_defaults(func=cmd_conformance)

    p = subparsers.add_parser(
        "bench", help="encoder/decoder speed on a 256x64x64 tensor, with x265 for scale",
        description="Encode and decode a 256x64x64 int8 tensor with ReLU-like statistics (about 70% zeros, "
                    "4 levels) and print elements per second for each implementation.")
    p.add_argument("--shape", default="64,64,256", help="H,W,C (default 64,64,256)")
    p.add_argument("--repeats", type=int, default=3, help="timing repeats; the best is reported")
    p.add_argument("--no-micropython", action="store_true", help="skip MicroPython")
    p.add_argument("--no-x265", action="store_true", help="skip ffmpeg/libx265")
    p.set_defaults(func=cmd_bench)


def _load_tables(path: str):
    from lwfc.errors import TableError
    from lwfc_host.design.tablefile import load_verified

    try:
        return load_verified(path)
    except TableError as exc:
        raise CommandError(str(exc)) from exc


def _hwc(arr, channels: int):
    shape = arr.shape
    if len(shape) == 4 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) == 1:
        shape = (1, 1) + shape
    if len(shape) != 3 or shape[2] != channels:
        raise CommandError(f"input shape {arr.shape} is not (H, W, {channels}) or (1, H, W, {channels})")
    return arr.reshape(shape)


def cmd_encode(args: argparse.Namespace) -> int:
    import numpy as np

    from lwfc.encoder import Encoder
    from lwfc.errors import LwfcError
    from lwfc_host.codec.fast import FastEncoder, indices_from_float_np

    tables = _load_tables(args.tables)
    try:
        arr = np.load(args.input, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise CommandError(f"cannot read {args.input}: {exc}") from exc
    arr = _hwc(arr, tables.channels)
    h, w, c = arr.shape
    want = np.float32 if args.float else np.int8
    if arr.dtype != want:
        raise CommandError(f"input dtype is {arr.dtype}, expected {np.dtype(want).name}"
                           + ("" if args.float else " (use --float for float input)"))
    try:
        if args.backend == "python":
            enc = Encoder(tables)
            frame = (enc.encode_float(arr.reshape(-1).tolist(), h, w) if args.float
                     else enc.encode_int8(arr.tobytes(), h, w))
        else:
            idx = (indices_from_float_np(arr, tables) if args.float
                   else np.asarray(tables.index_of_q)[arr.astype(np.int64) + 128])
            frame = FastEncoder(tables).frame_indices(idx)
    except LwfcError as exc:
        raise CommandError(str(exc)) from exc
    Path(args.output).write_bytes(frame)
    print(f"{args.output}: {h}x{w}x{c} = {h * w * c} elements, {len(frame)} bytes, "
          f"{8 * len(frame) / (h * w * c):.4f} bits/element")
    return 0


def cmd_decode(args: argparse.Namespace) -> int:
    import numpy as np

    from lwfc.errors import FrameError
    from lwfc_host.codec.decoder import Decoder

    tables = _load_tables(args.tables)
    try:
        frame = Path(args.input).read_bytes()
    except OSError as exc:
        raise CommandError(f"cannot read {args.input}: {exc.strerror}") from exc
    try:
        out = Decoder(tables).decode(frame)
    except FrameError as exc:
        raise CommandError(f"{type(exc).__name__}: {exc}") from exc
    np.save(args.output, out.tensor)
    if args.indices:
        np.save(args.indices, out.indices)
    _, h, w, c = out.tensor.shape
    where = ""
    if out.header.sliced:
        r0, rn, c0, cn = out.header.region
        where = f", rows {r0}..{r0 + rn - 1} and channels {c0}..{c0 + cn - 1} of {'x'.join(map(str, out.header.shape))}"
    print(f"{args.output}: float32 (1, {h}, {w}, {c}){where}, {out.bits_per_element:.4f} bits/element")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from lwfc.errors import FrameError
    from lwfc.frame import parse_frame

    try:
        frame = Path(args.frame).read_bytes()
    except OSError as exc:
        raise CommandError(f"cannot read {args.frame}: {exc.strerror}") from exc
    try:
        header, _ = parse_frame(frame)
    except FrameError as exc:
        raise CommandError(f"{type(exc).__name__}: {exc}") from exc
    h, w, c = header.shape
    n = header.element_count
    print(f"version          {header.version}")
    print(f"flags            0x{header.flags:02x}")
    print(f"table_id         {header.table_id.hex()}")
    print(f"shape (H, W, C)  {h} x {w} x {c}")
    if header.sliced:
        r0, rn, c0, cn = header.region
        print(f"slice            rows {r0}..{r0 + rn - 1}, channels {c0}..{c0 + cn - 1}")
    print(f"element_count    {n}")
    print(f"payload_length   {header.payload_length} bytes ({header.payload_length // 4} words)")
    print(f"frame_length     {header.frame_length} bytes (header 22, CRC 4)")
    print(f"bits/element     {8 * header.frame_length / n:.4f} (payload only: {8 * header.payload_length / n:.4f})")
    print("crc32            ok")
    if args.tables:
        from lwfc_host.codec.decoder import Decoder

        tables = _load_tables(args.tables)
        try:
            Decoder(tables).decode(frame)
        except FrameError as exc:
            raise CommandError(f"{type(exc).__name__}: {exc}") from exc
        print(f"decode           ok with table {tables.table_id_hex()}")
    return 0


def cmd_conformance(args: argparse.Namespace) -> int:
    from lwfc_host.checks import conformance
    root = Path(args.vectors) if args.vectors else conformance.VECTOR_DIR
    if args.regenerate:
        conformance.regenerate(root)
        print(f"rewrote {len(conformance.VECTORS)} vectors in {root}")
    rows = conformance.run(root, micropython=not args.no_micropython)
    print(conformance.format_rows(rows))
    failed = [r for r in rows if not r.ok]
    vectors = len({r.vector for r in rows})
    impls = sorted({r.implementation for r in rows})
    print(f"\n{len(rows) - len(failed)} passed, {len(failed)} failed "
          f"({vectors} vectors; implementations: {', '.join(impls)})")
    return 1 if failed else 0


def cmd_bench(args: argparse.Namespace) -> int:
    from lwfc_host.checks import bench

    try:
        h, w, c = (int(v) for v in args.shape.split(","))
    except ValueError as exc:
        raise CommandError(f"--shape must be H,W,C, got {args.shape!r}") from exc
    if min(h, w, c) < 1:
        raise CommandError(f"--shape must be three positive integers H,W,C, got {args.shape!r}")
    if args.repeats < 1:  # no timing at all would print 0 elements/s for every implementation
        raise CommandError(f"--repeats must be at least 1, got {args.repeats}")
    bench.run(shape=(h, w, c), repeats=args.repeats, micropython=not args.no_micropython,
              x265=not args.no_x265, out=sys.stdout)
    return 0
