"""``lwfc calibrate`` and ``lwfc design``: calibration statistics and quantizer/table design."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REPORT_LEVELS = [2, 3, 4, 5, 6, 8, 12, 16]
TABLE_LEVELS = [2, 3, 4, 8]
REPORT_LAMBDAS = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1]


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
    p.add_argument("--bins", type=int, default=4096, help="histogram bins for float input (default 4096)")
    p.add_argument("--reservoir", type=int, default=64, help="whole tensors kept as a random sample (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_calibrate)

    d = subparsers.add_parser(
        "design", help="design clipping, quantizer and entropy models; write a table file",
        description="Design a table from calibration statistics: clip range, uniform or ECSQ quantizer, "
                    "channel-group (and neighbour-context) entropy models. See codec_spec/DESIGN-quantizer.md.")
    d.add_argument("--stats", help="stats file from lwfc calibrate (not with --objective accuracy)")
    d.add_argument("--levels", type=int, help="number of quantization levels, 2..16")
    d.add_argument("--quantizer", choices=["uniform", "ecsq"], default="uniform")
    d.add_argument("--lam", type=float, default=0.0,
                   help="ECSQ Lagrange multiplier, dimensionless (distortion / (c_max - c_min)^2 + lam * bits)")
    d.add_argument("--target-bits", type=float, help="design for this coded rate, bits per element (within 3%%)")
    d.add_argument("--clip", choices=["model", "mse"], default="mse",
                   help="clip range: fitted model (as in the paper) or empirical MSE search (default)")
    d.add_argument("--groups", default="auto", help="channel groups G (1..min(C, 256)) or 'auto' (default)")
    d.add_argument("--classes", default=None,
                   help="neighbour classes K (naive class map; 1 = no neighbour contexts), or 'auto': classes, "
                        "class map, channel groups and merged context models chosen by held-out coded bits "
                        "(context_design.py; K = 1 is among the candidates). Default: auto, but 1 with "
                        "--target-bits (rate targeting searches with channel-group models)")
    d.add_argument("--objective", choices=["mse", "accuracy"], default="mse",
                   help="accuracy: choose clip range, levels and quantizer by the cloud half's top-1 agreement on "
                        "held-out calibration images of --bundle (task_design.py)")
    d.add_argument("--bundle", help="bundle directory (for --objective accuracy)")
    d.add_argument("--tolerance", type=float, default=0.01,
                   help="--objective accuracy: allowed top-1 disagreement with the uncompressed pipeline (0.01)")
    d.add_argument("--task-images", type=int, default=512,
                   help="--objective accuracy: calibration images (half fit the statistics, half are held out)")
    d.add_argument("--int8-scale", type=float, help="the edge model's output scale (for index_of_q)")
    d.add_argument("--int8-zero-point", type=int, help="the edge model's output zero point")
    d.add_argument("--shape", help="expected split-layer shape HxWxC; a stats file of another shape is refused")
    d.add_argument("--output", help="table file to write (.json)")
    d.add_argument("--report", action="store_true",
                   help="print the rate-distortion table and plot MSE against bits/element (PNG)")
    d.add_argument("--report-png", help="where to write the plot (default: next to --output, or rd_curve.png)")
    d.set_defaults(func=cmd_design)


def _error(msg: str):
    from lwfc_host.cli import CommandError

    return CommandError(msg)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from lwfc_host.design.calibration import CalibrationError, calibrate

    try:
        stats = calibrate(args.activations, args.layout, args.int8_scale, args.int8_zero_point, bins=args.bins,
                          reservoir=args.reservoir, seed=args.seed, progress=True)
        summary = stats.save(args.output, source=str(args.activations))
    except CalibrationError as exc:
        raise _error(str(exc)) from exc
    h, w, c = stats.shape
    print(f"calibrated {summary['tensors']} tensors of {h}x{w}x{c} ({stats.kind}), {summary['elements']} elements")
    print(f"  mean {summary['mean']:.6g}  std {summary['std']:.6g}  min {summary['min']:.6g}  max {summary['max']:.6g}")
    print(f"  zeros {100 * summary['zero_fraction']:.2f}%  at min {100 * summary['fraction_at_min']:.3f}%  "
          f"at max {100 * summary['fraction_at_max']:.3f}%")
    print(f"  wrote {args.output} (reservoir of {len(stats.reservoir)} tensors)")
    return 0


def _parse_groups(text: str) -> int | str:
    if text == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise _error(f"--groups must be an integer or 'auto', got {text!r}") from None


def _parse_classes(text: str) -> int | str:
    if text == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise _error(f"--classes must be an integer or 'auto', got {text!r}") from None


def _design_for_accuracy(args: argparse.Namespace, classes: int | str) -> int:
    """--objective accuracy: task-aware choice on the bundle's calibration images (task_design.py)."""
    from lwfc_host.design.quantizers import DesignError
    from lwfc_host.design.tablefile import write_tables
    from lwfc_host.design.task_design import format_candidates, task_design

    if not args.bundle:
        raise _error("--objective accuracy needs --bundle")
    if args.output is None:
        raise _error("give --output")
    if args.levels is not None:
        raise _error("--objective accuracy chooses the levels itself (give --target-bits or nothing)")
    try:
        td = task_design(args.bundle, images=args.task_images, tolerance=args.tolerance,
                         target_bits=args.target_bits, classes=classes, progress=True)
    except (DesignError, ValueError, FileNotFoundError) as exc:
        raise _error(str(exc)) from exc
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


def _check_stats(stats, args) -> None:
    s = stats.summary
    if args.shape:
        try:
            want = tuple(int(v) for v in args.shape.lower().split("x"))
            assert len(want) == 3
        except (ValueError, AssertionError):
            raise _error(f"--shape must look like HxWxC, got {args.shape!r}") from None
        if want != stats.shape:
            raise _error(f"the stats file is for a {'x'.join(map(str, stats.shape))} layer, not "
                         f"{'x'.join(map(str, want))}: calibrate on this layer's activations")
    if not s["max"] > s["min"]:
        raise _error(f"the calibration activations are constant ({s['min']:g}): nothing to design a quantizer for")


def cmd_design(args: argparse.Namespace) -> int:
    from lwfc_host.design import table_design as dz
    from lwfc_host.design.calibration import CalibrationError, load_stats
    from lwfc_host.design.quantizers import DesignError
    from lwfc_host.design.tablefile import write_tables

    classes = _parse_classes(args.classes or ("1" if args.target_bits is not None and args.objective == "mse"
                                              else "auto"))
    if args.objective == "accuracy":
        return _design_for_accuracy(args, classes)
    if not args.stats:
        raise _error("give --stats (or --objective accuracy --bundle B)")
    try:
        stats = load_stats(args.stats)
    except CalibrationError as exc:
        raise _error(str(exc)) from exc
    _check_stats(stats, args)
    groups = _parse_groups(args.groups)
    if (args.levels is None) == (args.target_bits is None) and not args.report:
        raise _error("give exactly one of --levels and --target-bits")
    if args.levels is not None and args.target_bits is not None:
        raise _error("give exactly one of --levels and --target-bits")
    if (args.int8_scale is None) != (args.int8_zero_point is None):
        raise _error("give --int8-scale and --int8-zero-point together")
    if args.output is None and not args.report:
        raise _error("give --output (and/or --report)")
    result = None
    try:
        if args.target_bits is not None:
            result, tried = dz.target_rate(stats, args.target_bits, args.clip, groups, classes,
                                           args.int8_scale, args.int8_zero_point, progress=True)
            print(f"rate targeting tried {len(tried)} quantizers")
        elif args.levels is not None:
            result = dz.design(stats, args.levels, args.quantizer, args.lam, args.clip, groups, classes,
                               args.int8_scale, args.int8_zero_point)
    except (DesignError, ValueError) as exc:
        raise _error(str(exc)) from exc
    if result is not None:
        _print_design(result)
        real, promised, frames = dz.measure_coded_rate(stats, result.table)
        print(f"  encoded {frames} sampled tensors with lwfc.encoder: {real:.4f} bits/element "
              f"(the models promise {promised:.4f} for them, frame overhead included)")
        if args.output:
            final = write_tables(result.table, args.output)
            print(f"wrote {args.output} (table id {final['table_id']})")
    if args.report:
        png = args.report_png or (str(Path(args.output).with_suffix(".rd.png")) if args.output else "rd_curve.png")
        report(stats, args.clip, png)
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
          + (f" x {d.classes ** 2} neighbour contexts ({len(d.table['models'])} models)" if d.classes > 1 else "")
          + f": {d.model_bits_per_element:.4f} + frame overhead {d.overhead_bits_per_element:.4f} = "
          f"{d.coded_bits_per_element:.4f} bits/element")
    print(f"  MSE {d.mse:.6g} (clipped data {d.mse_clipped:.6g})")
    for note in d.notes:
        print(f"  note: {note}")


def report(stats, clip: str, png: str) -> dict:
    """RD points for uniform and ECSQ at several level counts; print the table, write the PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tqdm import tqdm

    from lwfc_host.design import table_design as dz
    from lwfc_host.design.quantizers import DesignError

    hist = stats.histogram()
    uni, ec, rows = [], [], []
    for n in tqdm(REPORT_LEVELS, desc="report", unit="levels"):
        qu, cc = dz.design_quantizer(stats, n, "uniform", 0.0, clip)
        pu = dz.rd_point(stats, qu)
        uni.append(pu)
        # ECSQ for the rate of channel-group models (the uniform quantizer's grouping)
        grp = (pu.labels, stats.arrays["ch_zeros"]) if pu.groups > 1 else None
        q0 = dz.ecsq(hist, n, 0.0, cc.c_min, cc.c_max, dz.zeros_of(stats), groups=grp)
        # the same G as the uniform quantizer at this N (choosing G again for every point costs minutes
        # on wide layers and changes little)
        pts = [dz.rd_point(stats, q0, pu.groups)]
        for lam in REPORT_LAMBDAS:
            try:
                q = dz.ecsq(hist, n, lam, cc.c_min, cc.c_max, dz.zeros_of(stats), groups=grp)
            except DesignError:
                break
            pts.append(dz.rd_point(stats, q, pu.groups))
        ec.append(pts)
        if n in TABLE_LEVELS:
            # ECSQ at the uniform quantizer's coded rate (channel-group models, the uniform's grouping)
            qe = dz.equal_rate_ecsq(stats, n, cc, pu.grouped, pu.labels)
            pe = dz.rd_point(stats, qe, pu.groups)
            # and with twice the levels: the entropy constraint decides how many get used
            n2 = min(2 * n, 16)
            _, cc2 = dz.design_quantizer(stats, n2, "uniform", 0.0, clip)
            qe2 = dz.equal_rate_ecsq(stats, n2, cc2, pu.grouped, pu.labels)
            pe2 = dz.rd_point(stats, qe2, pu.groups)
            rows.append((n, pu, pts[0], pe, pe2))
    print()
    print("rate-distortion on the calibration data (payload bits/element, without the frame overhead of "
          f"{dz.overhead_bits(stats):.4f}; (1) = one model, (G) = G channel-group models, G chosen for the uniform "
          "quantizer at each N)")
    print(f"{'N':>3} {'quantizer':<22} {'bits (1)':>9} {'bits (G)':>9} {'G':>4} {'MSE':>11}")
    for n, pu, p0, pe, pe2 in rows:
        print(f"{n:>3} {'uniform':<22} {pu.entropy:9.4f} {pu.grouped:9.4f} {pu.groups:4d} {pu.mse:11.5g}")
        print(f"{n:>3} {'ECSQ lambda=0':<22} {p0.entropy:9.4f} {p0.grouped:9.4f} {p0.groups:4d} {p0.mse:11.5g}")
        for label, p in ((f"ECSQ equal rate, {n} lv", pe), (f"ECSQ equal rate, {min(2 * n, 16)} lv", pe2)):
            used = f"  ({p.levels} used)" if p.levels < int(label.split(", ")[1].split()[0]) else ""
            # emptying cells makes the rate jump: say when the bisection could not land on the rate
            miss = "  (rate not matched)" if abs(p.grouped - pu.grouped) > 0.01 * pu.grouped else ""
            print(f"{n:>3} {label:<22} {p.entropy:9.4f} {p.grouped:9.4f} {p.groups:4d} {p.mse:11.5g}{used}{miss}")
    print()
    print("gain of channel-group models over one model (uniform quantizer):")
    for pu in uni:
        gain = pu.entropy - pu.grouped
        print(f"  N={pu.levels:>2}: {pu.entropy:.4f} -> {pu.grouped:.4f} bits/element with G={pu.groups} "
              f"({gain:.4f} bits, {100 * gain / pu.entropy:.1f}%)")
    fig, ax = plt.subplots(figsize=(7, 5))
    ax.plot([p.grouped for p in uni], [p.mse for p in uni], "o-", color="C0", label="uniform, group models")
    ax.plot([p.entropy for p in uni], [p.mse for p in uni], "o--", color="C0", alpha=0.5, label="uniform, one model")
    for i, pts in enumerate(ec):
        ax.plot([p.grouped for p in pts], [p.mse for p in pts], ".-", color="C1", alpha=0.8,
                label="ECSQ (lambda sweep), group models" if i == 0 else None)
        ax.annotate(f"{REPORT_LEVELS[i]}", (pts[0].grouped, pts[0].mse), fontsize=7, color="C1")
    for p in uni:
        ax.annotate(f"{p.levels}", (p.grouped, p.mse), fontsize=7, color="C0")
    ax.set_yscale("log")
    ax.set_xlabel("bits per element (payload, calibration data)")
    ax.set_ylabel("MSE")
    h, w, c = stats.shape
    ax.set_title(f"{h}x{w}x{c}, {stats.tensors} tensors, clip: {clip}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    print(f"wrote {png}")
    def row(p):
        return {k: v for k, v in p.__dict__.items() if k != "labels"}

    out = {"uniform": [row(p) for p in uni], "ecsq": [[row(p) for p in pts] for pts in ec],
           "table": [{"levels": n, "uniform": row(pu), "ecsq_lambda0": row(p0), "ecsq_equal_rate": row(pe),
                      "ecsq_equal_rate_2n": row(pe2)} for n, pu, p0, pe, pe2 in rows]}
    Path(png).with_suffix(".json").write_text(json.dumps(out, indent=1, default=float))
    return out

