"""``lwfc calibrate`` and ``lwfc design``: argument handling for calibration statistics and quantizer/table
design. The work lives in ``lwfc_host.design`` (the ``--report`` plot in ``lwfc_host.design.rd_report``).

No flag is silently ignored: a flag that does not apply to the combination given is refused with
``CommandError``. Flags whose use depends on the mode default to None here, so that "given" is visible;
their documented defaults are filled in where they apply.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lwfc_host.cli.errors import CommandError

DEFAULT_CLIP = "mse"
DEFAULT_GROUPS = "auto"
DEFAULT_TOLERANCE = 0.01
DEFAULT_TASK_IMAGES = 512
QUANTIZER_KINDS = ("uniform", "ecsq")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "calibrate", help="accumulate calibration statistics of split-layer activations",
        description="Stream activation tensors (NHWC .npy/.npz files, float32, or int8 with scale and zero "
                    "point) into histograms, per-channel statistics and a reservoir sample of whole tensors.")
    p.add_argument("--activations", required=True, help="a .npy/.npz file or a directory of them")
    p.add_argument("--output", required=True, help="stats file to write (.npz)")
    p.add_argument("--layout", choices=["NHWC", "NCHW"], default="NHWC", help="layout of the arrays (default NHWC)")
    p.add_argument("--int8-scale", type=float, help="scale of int8 .npy inputs")
    p.add_argument("--int8-zero-point", type=int, help="zero point of int8 .npy inputs")
    p.add_argument("--bins", type=int, default=None,
                   help="histogram bins for float input (default 4096; int8 input has one bin per value)")
    p.add_argument("--reservoir", type=int, default=64, help="whole tensors kept as a random sample (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_calibrate)

    d = subparsers.add_parser(
        "design", help="design clipping, quantizer and entropy models; write a table file",
        description="Design a table from calibration statistics: clip range, uniform or ECSQ quantizer, "
                    "channel-group (and neighbour-context) entropy models. See codec_spec/DESIGN-quantizer.md.")
    d.add_argument("--stats", help="stats file from lwfc calibrate (not with --objective accuracy)")
    d.add_argument("--levels", type=int,
                   help="number of quantization levels, 2..64 (more than 16 need a version 2 table)")
    d.add_argument("--quantizer", choices=list(QUANTIZER_KINDS), default=None,
                   help="with --levels: the quantizer (default uniform); with --target-bits or --objective accuracy: "
                        "search only this kind (default: both)")
    d.add_argument("--lam", type=float, default=None,
                   help="ECSQ Lagrange multiplier, dimensionless (distortion / (c_max - c_min)^2 + lam * bits); "
                        "with --levels and --quantizer ecsq (default 0)")
    d.add_argument("--target-bits", type=float, help="design for this coded rate, bits per element (within 3%%)")
    d.add_argument("--clip", choices=["model", "mse"], default=None,
                   help="clip range: fitted model (as in the paper) or empirical MSE search (default mse)")
    d.add_argument("--groups", default=None, help="channel groups G (1..min(C, 256)) or 'auto' (default)")
    d.add_argument("--classes", default=None,
                   help="neighbour classes K (naive class map; 1 = no neighbour contexts), or 'auto': classes, "
                        "class map, channel groups, (table version 2) reference channels and merged context models "
                        "chosen by held-out coded bits (design/contexts.py; K = 1 is among the candidates). "
                        "Default: auto, but 1 with --target-bits (rate targeting searches with channel-group models)")
    d.add_argument("--spec-version", choices=["auto", "1", "2"], default=None,
                   help="table version to design for: 1 (version 1 devices read it: at most 16 levels, K*K*levels "
                        "<= 256, no reference channels), 2 (reference channels, up to 64 levels, more neighbour "
                        "classes), or auto (default): version 2 features only where they code the held-out "
                        "calibration tensors in fewer bits, or where the levels or classes asked for need them")
    d.add_argument("--objective", choices=["mse", "accuracy"], default="mse",
                   help="accuracy: choose clip range, levels and quantizer by the cloud half's top-1 agreement on "
                        "held-out calibration images of --bundle (design/task_design.py)")
    d.add_argument("--bundle", help="bundle directory (for --objective accuracy)")
    d.add_argument("--tolerance", type=float, default=None,
                   help="--objective accuracy: allowed top-1 disagreement with the uncompressed pipeline (0.01)")
    d.add_argument("--task-images", type=int, default=None,
                   help="--objective accuracy: calibration images (half fit the statistics, half are held out; "
                        "default 512)")
    d.add_argument("--int8-scale", type=float, help="the edge model's output scale (for index_of_q)")
    d.add_argument("--int8-zero-point", type=int, help="the edge model's output zero point")
    d.add_argument("--shape", help="expected split-layer shape HxWxC; a stats file of another shape is refused")
    d.add_argument("--output", help="table file to write (.json)")
    d.add_argument("--report", action="store_true",
                   help="print the rate-distortion table and plot MSE against bits/element (PNG)")
    d.add_argument("--report-png", help="where to write the plot (default: next to --output, or rd_curve.png)")
    d.set_defaults(func=cmd_design)


def _given(args: argparse.Namespace, *dests: str) -> list[str]:
    """The flags among ``dests`` (argparse destinations) that were given on the command line."""
    return ["--" + d.replace("_", "-") for d in dests if getattr(args, d) not in (None, False)]


# ---- lwfc calibrate ---------------------------------------------------------------------------------------------
def _check_calibration_flags(args: argparse.Namespace, stats) -> None:
    """Refuse --bins and --int8-scale/--int8-zero-point where the data made no use of them."""
    if args.bins is not None and stats.kind == "int8":
        raise CommandError("--bins applies to float activations: int8 ones get one bin per value (256 bins)")
    if args.int8_scale is None:
        return
    given = (float(args.int8_scale), int(args.int8_zero_point))
    if stats.int8 is None:
        raise CommandError("the activations are float: --int8-scale and --int8-zero-point apply to int8 .npy files")
    if stats.int8 != given:
        raise CommandError(f"the int8 .npz files carry their own scale and zero point {stats.int8}, not the "
                           f"--int8-scale/--int8-zero-point {given}: leave those out")


def cmd_calibrate(args: argparse.Namespace) -> int:
    from lwfc_host.design.calibration import DEFAULT_BINS, CalibrationError, calibrate

    if (args.int8_scale is None) != (args.int8_zero_point is None):
        raise CommandError("give --int8-scale and --int8-zero-point together")
    try:
        stats = calibrate(args.activations, args.layout, args.int8_scale, args.int8_zero_point,
                          bins=DEFAULT_BINS if args.bins is None else args.bins, reservoir=args.reservoir,
                          seed=args.seed, progress=True)
        _check_calibration_flags(args, stats)
        summary = stats.save(args.output, source=str(args.activations))
    except CalibrationError as exc:
        raise CommandError(str(exc)) from exc
    h, w, c = stats.shape
    print(f"calibrated {summary['tensors']} tensors of {h}x{w}x{c} ({stats.kind}), {summary['elements']} elements")
    print(f"  mean {summary['mean']:.6g}  std {summary['std']:.6g}  min {summary['min']:.6g}  max {summary['max']:.6g}")
    print(f"  zeros {100 * summary['zero_fraction']:.2f}%  at min {100 * summary['fraction_at_min']:.3f}%  "
          f"at max {100 * summary['fraction_at_max']:.3f}%")
    print(f"  wrote {args.output} (reservoir of {len(stats.reservoir)} tensors)")
    return 0


# ---- lwfc design: flags -----------------------------------------------------------------------------------------
def _parse_groups(text: str) -> int | str:
    if text == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise CommandError(f"--groups must be an integer or 'auto', got {text!r}") from None


def _parse_classes(text: str) -> int | str:
    if text == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise CommandError(f"--classes must be an integer or 'auto', got {text!r}") from None


def _spec_version(args: argparse.Namespace) -> int | str:
    """--spec-version as 'auto', 1 or 2."""
    v = args.spec_version or "auto"
    return v if v == "auto" else int(v)


def _kinds(args: argparse.Namespace) -> tuple[str, ...]:
    """The quantizer kinds a search tries: the one --quantizer names, or both."""
    return (args.quantizer,) if args.quantizer else QUANTIZER_KINDS


def _refuse_unused_flags(args: argparse.Namespace) -> None:
    """Every flag given must take part in what this combination does."""
    if args.objective == "accuracy":
        unused = _given(args, "stats", "lam", "clip", "groups", "int8_scale", "int8_zero_point", "shape", "report",
                        "report_png")
        if unused:
            raise CommandError(f"--objective accuracy designs from the bundle's own calibration images and int8 "
                               f"parameters: {', '.join(unused)} apply to --objective mse only")
        return
    unused = _given(args, "bundle", "tolerance", "task_images")
    if unused:
        raise CommandError(f"{', '.join(unused)} apply to --objective accuracy only")
    if args.report_png and not args.report:
        raise CommandError("--report-png names the --report plot: give --report too")
    if args.target_bits is not None and args.lam is not None:
        raise CommandError("--target-bits searches lambda itself: --lam applies to --levels with --quantizer ecsq")
    if args.levels is not None and args.lam is not None and args.quantizer != "ecsq":
        raise CommandError("--lam is ECSQ's Lagrange multiplier: give --quantizer ecsq with it")
    if args.report and args.levels is None and args.target_bits is None:
        unused = _given(args, "quantizer", "lam", "groups", "classes", "int8_scale", "int8_zero_point", "output",
                        "spec_version")
        if unused:
            raise CommandError(f"--report alone plots uniform and ECSQ quantizers without designing a table: "
                               f"{', '.join(unused)} apply to a design (give --levels or --target-bits)")


def _design_for_accuracy(args: argparse.Namespace, classes: int | str) -> int:
    """--objective accuracy: task-aware choice on the bundle's calibration images (design/task_design.py)."""
    from lwfc_host.design.quantizers import DesignError
    from lwfc_host.design.tablefile import write_tables
    from lwfc_host.design.task_design import format_candidates, task_design

    if not args.bundle:
        raise CommandError("--objective accuracy needs --bundle")
    if args.output is None:
        raise CommandError("give --output")
    if args.levels is not None:
        raise CommandError("--objective accuracy chooses the levels itself (give --target-bits or nothing)")
    try:
        td = task_design(args.bundle, images=DEFAULT_TASK_IMAGES if args.task_images is None else args.task_images,
                         tolerance=DEFAULT_TOLERANCE if args.tolerance is None else args.tolerance,
                         target_bits=args.target_bits, kinds=_kinds(args), classes=classes, progress=True,
                         spec_version=_spec_version(args))
    except (DesignError, ValueError, FileNotFoundError) as exc:
        raise CommandError(str(exc)) from exc
    for line in format_candidates(td):
        print(line)
    _print_design(td.design)
    c = td.chosen
    print(f"chosen: {c.levels} levels {c.kind}" + (f" lambda {c.lam:g}" if c.kind == "ecsq" else "")
          + f", clip x{c.clip_scale:g}: agreement {c.agreement:.4f} on {td.reference_tensors} held-out images, "
          f"{c.coded_bits:.4f} bits/element in real frames ({td.seconds:.0f} s)")
    for note in td.notes:
        print(f"  note: {note}")
    final = write_tables(td.design.table, args.output)
    print(f"wrote {args.output} (table id {final['table_id']})")
    return 0


def _check_stats(stats, args: argparse.Namespace) -> None:
    """The stats file must be for the layer --shape names, and its activations must not be constant."""
    s = stats.summary
    if args.shape:
        try:
            want = tuple(int(v) for v in args.shape.lower().split("x"))
            assert len(want) == 3
        except (ValueError, AssertionError):
            raise CommandError(f"--shape must look like HxWxC, got {args.shape!r}") from None
        if want != stats.shape:
            raise CommandError(f"the stats file is for a {'x'.join(map(str, stats.shape))} layer, not "
                               f"{'x'.join(map(str, want))}: calibrate on this layer's activations")
    if not s["max"] > s["min"]:
        raise CommandError(f"the calibration activations are constant ({s['min']:g}): "
                           "nothing to design a quantizer for")


def _design_from_stats(args: argparse.Namespace, stats, classes: int | str):
    """--levels or --target-bits: the designed table (printed), or None with --report alone."""
    from lwfc_host.design import table_design as dz
    from lwfc_host.design.quantizers import DesignError
    from lwfc_host.design.rate_target import target_rate

    groups = _parse_groups(args.groups or DEFAULT_GROUPS)
    clip = args.clip or DEFAULT_CLIP
    try:
        if args.target_bits is not None:
            result, tried = target_rate(stats, args.target_bits, clip, groups, classes, args.int8_scale,
                                        args.int8_zero_point, kinds=_kinds(args), progress=True,
                                        spec_version=_spec_version(args))
            print(f"rate targeting tried {len(tried)} quantizers")
        elif args.levels is not None:
            result = dz.design(stats, args.levels, args.quantizer or "uniform", args.lam or 0.0, clip, groups,
                               classes, args.int8_scale, args.int8_zero_point, spec_version=_spec_version(args))
        else:
            return None
    except (DesignError, ValueError) as exc:
        raise CommandError(str(exc)) from exc
    _print_design(result)
    real, promised, frames = dz.measure_coded_rate(stats, result.table)
    print(f"  encoded {frames} sampled tensors with lwfc.encoder: {real:.4f} bits/element "
          f"(the models promise {promised:.4f} for them, frame overhead included)")
    return result


def cmd_design(args: argparse.Namespace) -> int:
    from lwfc_host.design.calibration import CalibrationError, load_stats
    from lwfc_host.design.tablefile import write_tables

    _refuse_unused_flags(args)
    classes = _parse_classes(args.classes or ("1" if args.target_bits is not None and args.objective == "mse"
                                              else "auto"))
    if args.objective == "accuracy":
        return _design_for_accuracy(args, classes)
    if not args.stats:
        raise CommandError("give --stats (or --objective accuracy --bundle B)")
    try:
        stats = load_stats(args.stats)
    except CalibrationError as exc:
        raise CommandError(str(exc)) from exc
    _check_stats(stats, args)
    if (args.levels is None) == (args.target_bits is None) and not args.report:
        raise CommandError("give exactly one of --levels and --target-bits")
    if args.levels is not None and args.target_bits is not None:
        raise CommandError("give exactly one of --levels and --target-bits")
    if (args.int8_scale is None) != (args.int8_zero_point is None):
        raise CommandError("give --int8-scale and --int8-zero-point together")
    if args.output is None and not args.report:
        raise CommandError("give --output (and/or --report)")
    result = _design_from_stats(args, stats, classes)
    if result is not None and args.output:
        final = write_tables(result.table, args.output)
        print(f"wrote {args.output} (table id {final['table_id']})")
    if args.report:
        from lwfc_host.design.rd_report import report

        png = args.report_png or (str(Path(args.output).with_suffix(".rd.png")) if args.output else "rd_curve.png")
        report(stats, args.clip or DEFAULT_CLIP, png)
    return 0


def _print_design(d) -> None:
    q = d.quantizer
    print(f"quantizer {q.kind}, {q.levels} levels" + (f", lambda {q.lam:g}" if q.kind == "ecsq" else "")
          + f", clip [{q.clip_min:.6g}, {q.clip_max:.6g}] ({d.clip.method})"
          + (f", pinned {'+'.join(s for s, p in zip(('c_min', 'c_max'), q.pinned) if p)}" if any(q.pinned) else ""))
    print("  thresholds     " + " ".join(f"{t:.5g}" for t in q.thresholds))
    print("  reconstruction " + " ".join(f"{r:.5g}" for r in q.reconstruction))
    g = d.groups
    print(f"  entropy (one model) {d.entropy_one_model:.4f} bits/element; with {g.groups} channel group(s)"
          + (f" x {len(d.table['contexts']['model_of_context']) // g.groups} contexts "
             f"({len(d.table['models'])} models)" if len(d.table['contexts']['model_of_context']) > g.groups else "")
          + f": {d.model_bits_per_element:.4f} + frame overhead {d.overhead_bits_per_element:.4f} = "
          f"{d.coded_bits_per_element:.4f} bits/element")
    print(f"  MSE {d.mse:.6g} (clipped data {d.mse_clipped:.6g})")
    print("  " + _version_line(d.table))
    for note in d.notes:
        print(f"  note: {note}")


def _version_line(table: dict) -> str:
    """The table's version and, after a context design, whether reference channels are used, how many
    channels depend on one, and the held-out payload bits with and without them."""
    from lwfc_host.design.table_design import reference_note

    info = table.get("design", {}).get("context_design")
    if info is not None and "table_version" in info:
        return reference_note(info)
    reasons = []
    if table["version"] == 2:
        if table["levels"] > 16:
            reasons.append(f"{table['levels']} levels")
        k = table["contexts"]["classes"]
        if k * k * table["levels"] > 256:
            reasons.append(f"K = {k} classes")
    why = f" ({', '.join(reasons)})" if reasons else ""
    return f"table version {table['version']}{why}; no reference channels (no context design: --classes auto does one)"
