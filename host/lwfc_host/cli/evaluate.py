"""``lwfc eval``: rate-accuracy curves of lwfc and the baselines on a real bundle (``lwfc_host.evaluate.run``).

Every flag takes effect or is refused: list flags that no method to run would use (``--levels`` without lwfc
in ``--methods``, ``--clip-scales`` without the clip sweep, ...) are errors, not silently dropped."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval", help="rate-accuracy evaluation of lwfc against HEVC, JPEG/WebP tiles, RLE and zlib on a bundle",
        description="Runs the real pipeline (int8 TFLite edge half -> codec -> decoder -> ONNX cloud half) on a "
                    "labeled test set or on augmented photos, at many rate points per method, and writes "
                    "points.csv, rate_accuracy.png, report.md and evaluation.json to OUTPUT. Detector bundles "
                    "(centernet_mbv3_coco) are scored by mAP@0.5 against the uncompressed int8 pipeline's "
                    "detections on deterministic views of the darknet demo photos and the bundled photos.")
    p.add_argument("--bundle", required=True, help="bundle directory written by `lwfc convert`")
    p.add_argument("--dataset", default="auto", choices=["auto", "fashion-mnist", "photos"],
                   help="evaluation data (auto: the bundle's own data set)")
    p.add_argument("--limit", type=int, default=None,
                   help="number of evaluation images/views (default: all 10,000 test images, 320 photo views, "
                        "120 detector views; --quick: 500 images, 64 views, 17 detector views; detector views "
                        "are rounded up to a multiple of the number of photos, or are view 0 of the first LIMIT "
                        "photos when LIMIT is smaller)")
    p.add_argument("--quick", action="store_true", help="fewer rate points and images (about 2 minutes)")
    p.add_argument("--methods", default="lwfc,hevc,av1,jpeg,webp,rle,zlib",
                   help="comma-separated subset of lwfc,hevc,av1,jpeg,webp,rle,zlib (av1: libaom all-intra)")
    p.add_argument("--levels", default=None,
                   help="lwfc level counts, e.g. 2,3,4,6 (default: 2..8; detectors 2..6,8; quick: 2,4)")
    p.add_argument("--contexts", default=None,
                   help="lwfc context variants among one,channel,groups,groups+k2,groups+k3,auto,auto-v1 "
                        "(auto: contexts designed on held-out bits, with spec v2's reference channels where they "
                        "win; auto-v1: the same within spec version 1) (default: one,channel,groups+k2,auto; "
                        "detectors one,groups,groups+k2,groups+k3; quick: one,groups,groups+k2); the clip sweep "
                        "uses the last")
    p.add_argument("--sweep-contexts", default=None,
                   help="context variants the clip sweep codes with (default: the last of --contexts), e.g. "
                        "auto-v1,auto to compare spec versions on the same quantizers")
    p.add_argument("--clips", default=None,
                   help="lwfc clip choices among mse,model,sweep (default: all three; detectors mse,model; detector "
                        "--quick: mse); sweep = quantizers (--sweep-kinds) with the MSE clip's top times each "
                        "--clip-scales value")
    p.add_argument("--clip-scales", default=None,
                   help="clip sweep scales (default 1,1.3,1.6,2,2.5; quick: 1,1.6); needs sweep among the clips; a "
                        "scale whose top the data maximum caps like an earlier scale's is reported, not run again")
    p.add_argument("--kinds", default=None, help="lwfc quantizer kinds among uniform,ecsq for the mse and model "
                   "clips (default: both; detector --quick: uniform)")
    p.add_argument("--sweep-kinds", default=None,
                   help="quantizer kinds of the clip sweep among uniform,ecsq (default: uniform; ecsq adds a dead "
                        "zone to the wider clip)")
    p.add_argument("--hevc-qps", default=None, help="8-bit HEVC QPs, e.g. 30,36,42 (10-bit QPs are then dropped)")
    p.add_argument("--av1-crfs", default=None, help="AV1 (libaom) constant-quality levels 0-63, e.g. 40,50,60")
    p.add_argument("--metric", default="auto",
                   help="metric plug-in: auto (the bundle's task), classification (accuracy / top-1 agreement) or "
                        "detection (mAP@0.5 against the uncompressed int8 pipeline's detections)")
    p.add_argument("--cache", default="cache/eval", help="where edge-half outputs are cached")
    p.add_argument("--output", required=True, help="report directory")
    p.add_argument("--jobs", type=int, default=1,
                   help="worker processes for the lwfc quantizers and baseline settings (default 1; at most the "
                        "free cores, so that the per-tensor timings stay per core)")
    p.add_argument("--extend", default=None, metavar="REPORT_DIR",
                   help="add this run's points to the evaluation in REPORT_DIR (same bundle, data set and tensors, "
                        "checked; a point with the same method and setting is replaced) and write the combined "
                        "report to --output, e.g. to add rate points to a long evaluation later")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)

    lo = subparsers.add_parser(
        "eval-loss", help="task accuracy (or mAP) under packet loss: whole frames vs slices with concealment",
        description="Codes the bundle's evaluation tensors with one table (--tables, or designed here on the "
                    "calibration edge outputs), whole and as slices that fit one datagram each (the device's slice "
                    "plan), drops datagrams by a seeded i.i.d. or Gilbert-Elliott channel, conceals what is "
                    "missing by each concealment method, runs the cloud half and reports the task metric per loss "
                    "rate, with the bit overhead of slicing at several MTUs: loss.json, points.csv, overhead.csv, "
                    "loss_accuracy.png and summary.md in OUTPUT (codec_spec/PROTOCOL.md 10).")
    lo.add_argument("--bundle", required=True, help="bundle directory written by `lwfc convert`")
    lo.add_argument("--tables", help="table file to code with (default: design one, see --levels)")
    lo.add_argument("--levels", type=int, help="levels of the designed table (default 6)")
    lo.add_argument("--clip-scale", type=float,
                    help="designed table: the MSE clip's top times this (default 1.6; `lwfc eval`'s clip sweep)")
    lo.add_argument("--contexts",
                    help="designed table: a context variant of `lwfc eval` (default groups+k3: channel groups and "
                         "3 neighbour classes, no reference channels, so channel blocks slice cheaply)")
    lo.add_argument("--plans", default=None,
                    help="slice plans among auto,rows,channels (default auto,rows: the device's default and the "
                         "codec's row bands); the first gets every concealment, the others zero and the default")
    lo.add_argument("--limit", type=int, help="evaluation images/views (default: as `lwfc eval`: all 10,000 test "
                                              "images, 120 detector views)")
    lo.add_argument("--rates", default=None, help="datagram loss rates, e.g. 0,0.05,0.1 (default "
                                                  "0,0.01,0.02,0.05,0.1,0.15,0.2,0.3)")
    lo.add_argument("--models", default="iid,ge", help="loss models among iid,ge (default both)")
    lo.add_argument("--burst", type=float, default=4.0,
                    help="Gilbert-Elliott mean burst length in datagrams (default 4)")
    lo.add_argument("--mtu", type=int, default=1200, help="datagram size in bytes (default 1200)")
    lo.add_argument("--overhead-mtus", default=None,
                    help="datagram sizes for the slicing overhead (default 300,600,1200,4000,9000)")
    lo.add_argument("--overhead-tensors", type=int, default=1000,
                    help="tensors the overhead at the other MTUs is measured on (default 1000; --mtu: all)")
    lo.add_argument("--concealments", default=None,
                    help="concealment methods among zero,expectation,mean,interpolate,adaptive,learned,conditional "
                         "(default all)")
    lo.add_argument("--seed", type=int, default=0, help="seed of the loss channel (default 0)")
    lo.add_argument("--decode-check", type=int, default=200,
                    help="tensors whose slices are decoded by the host decoder and checked (default 200)")
    lo.add_argument("--cache", default="cache/eval", help="where edge-half outputs are cached (shared with eval)")
    lo.add_argument("--overhead-only", action="store_true",
                    help="measure the slicing overhead again for the evaluation already in OUTPUT (its table, "
                         "tensors, plans and MTUs; e.g. after a change to the slice header or plans) and rewrite "
                         "its report, keeping its loss results")
    lo.add_argument("--output", required=True, help="report directory")
    lo.add_argument("--no-progress", action="store_true", help="no progress bars")
    lo.set_defaults(func=run_loss)

    m = subparsers.add_parser(
        "modes", help="coded bits of a layer under candidate coding schemes at equal MSE (measure before choosing)",
        description="Estimates, on calibration tensors of one layer (held out as in the context design), the bits "
                    "per element of today's designed contexts, more neighbours, cross-channel contexts, LOCO-I index "
                    "prediction, closed-loop DPCM, the integer 5/3 wavelet (plain and with designed coefficient "
                    "coding), HEVC and AV1, at the MSE of the "
                    "uniform quantizer with each level count (lwfc_host.evaluate.coding_modes). Give --bundle (its "
                    "int8 edge half) or --model and --split (the float edge half, no conversion).")
    m.add_argument("--bundle", help="bundle directory (its int8 edge half on its calibration images)")
    m.add_argument("--model", help="zoo model (with --split): its float edge half in PyTorch")
    m.add_argument("--split", help="split point of --model (see `lwfc layers`)")
    m.add_argument("--images", type=int, default=64, help="calibration tensors; every 4th is held out (default 64)")
    m.add_argument("--levels", default="4,8,16,32", help="uniform quantizer level counts (default 4,8,16,32)")
    m.add_argument("--qps", default="17,22,27,32,37,42,47", help="HEVC QPs swept ('' for no HEVC)")
    m.add_argument("--av1-crfs", default="20,32,40,48,54,60,63",
                   help="AV1 (libaom) constant-quality levels swept, 0-63 ('' for no AV1)")
    m.add_argument("--output", help="also write the result as JSON to this file")
    m.add_argument("--only", help="measure only these value-domain schemes (separated by ';', e.g. '5/3 wavelet, "
                                  "designed;HEVC' -- quote it); the index-domain ones are skipped")
    m.add_argument("--update", help="add the measured schemes to this earlier --output JSON of the same layer "
                                    "(its other schemes are kept), e.g. with --only")
    m.add_argument("--no-progress", action="store_true", help="no progress bars")
    m.set_defaults(func=run_modes)


def _values(args: argparse.Namespace, flag: str, convert: Callable[[str], Any],
            allowed: tuple[str, ...] = ()) -> list | None:
    """The comma-separated values of ``--flag`` (None when not given); an empty list, a bad number or a name
    outside ``allowed`` is refused rather than dropped."""
    from lwfc_host.cli import CommandError

    text = getattr(args, flag.replace("-", "_"))
    if text is None:
        return None
    try:
        values = [convert(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise CommandError(f"--{flag}: bad number list {text!r}: {exc}") from exc
    if not values:
        raise CommandError(f"--{flag} needs at least one value")
    bad = [v for v in values if allowed and v not in allowed]
    if bad:
        raise CommandError(f"--{flag}: unknown {', '.join(map(str, bad))}; known: {', '.join(allowed)}")
    return values


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The plan fields the flags set (``plans.make_plan`` refuses those that no method to run would use)."""
    from lwfc_host.evaluate.plans import CLIPS, CONTEXTS, KINDS

    fields = {"levels": _values(args, "levels", int), "clip_scales": _values(args, "clip-scales", float),
              "contexts": _values(args, "contexts", str, tuple(CONTEXTS)),
              "sweep_contexts": _values(args, "sweep-contexts", str, tuple(CONTEXTS)),
              "kinds": _values(args, "kinds", str, KINDS), "sweep_kinds": _values(args, "sweep-kinds", str, KINDS),
              "clips": _values(args, "clips", str, CLIPS)}
    qps = _values(args, "hevc-qps", int)
    if qps is not None:
        fields["hevc_qps"] = {8: qps}
    crfs = _values(args, "av1-crfs", int)
    if crfs is not None:
        if any(not 0 <= c <= 63 for c in crfs):
            from lwfc_host.cli import CommandError

            raise CommandError(f"--av1-crfs must be between 0 and 63, got {crfs}")
        fields["av1_crfs"] = crfs
    return {k: v for k, v in fields.items() if v is not None}


def run(args: argparse.Namespace) -> int:
    from lwfc.bundle import load_bundle
    from lwfc_host.cli import CommandError
    from lwfc_host.evaluate.metrics import METRICS
    from lwfc_host.evaluate.plans import METHODS
    from lwfc_host.evaluate.report import (
        ExtendError,
        check_extendable,
        extend_evaluation,
        headline,
        peak_memory,
        write_report,
    )
    from lwfc_host.evaluate.run import evaluate_bundle

    if args.metric != "auto" and args.metric not in METRICS:
        raise CommandError(f"unknown metric {args.metric!r}; known: auto, {', '.join(METRICS)}")
    if args.jobs < 1:
        raise CommandError("--jobs must be at least 1")
    if args.limit is not None and args.limit < 1:
        raise CommandError("--limit must be at least 1")
    methods = _values(args, "methods", str, METHODS)
    overrides = _overrides(args)
    if args.extend:  # the cheap checks before a long run; extend_evaluation checks the rest after it
        try:
            check_extendable(Path(args.extend), load_bundle(args.bundle).info)
        except (ExtendError, FileNotFoundError, ValueError) as exc:
            raise CommandError(f"--extend: {exc}") from exc
    t0 = time.time()
    try:
        ev = evaluate_bundle(args.bundle, args.dataset, args.limit, args.quick, args.cache, args.metric, methods,
                             progress=not args.no_progress, overrides=overrides, jobs=args.jobs)
    except (FileNotFoundError, ValueError) as exc:
        raise CommandError(str(exc)) from exc
    ev.command = "lwfc " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["eval"] else \
        f"lwfc eval --bundle {args.bundle} --output {args.output}" + (" --quick" if args.quick else "")
    ev.seconds["other"] = max(0.0, time.time() - t0 - sum(ev.seconds.values()))
    if args.extend:
        try:
            ev = extend_evaluation(args.extend, ev)
        except ExtendError as exc:
            raise CommandError(str(exc)) from exc
    paths = write_report(ev, args.output)
    for row in headline(ev):
        r = row["rate_within_1pp"]
        shown = f"{r:.3f}" if r == r else "not reached"
        print(f"{row['method']:40s} {shown:>12s} bits/element within 1 pp")
    print(f"peak memory: {peak_memory(ev)}")
    print(f"wrote {', '.join(str(p) for p in paths.values())} in {time.time() - t0:.0f} s")
    return 0


def run_modes(args: argparse.Namespace) -> int:
    """``lwfc modes``: measure the coding schemes on one layer and print the table."""
    import json
    import sys

    from lwfc_host.cli import CommandError
    from lwfc_host.evaluate import coding_modes as cm

    if bool(args.bundle) == bool(args.model) or bool(args.model) != bool(args.split):
        raise CommandError("give --bundle, or --model with --split")
    if args.images < 4:
        raise CommandError(f"--images must be at least 4 (every 4th is held out), got {args.images}")
    levels = _values(args, "levels", int) or []
    qps = _values(args, "qps", int) if args.qps else []
    crfs = _values(args, "av1-crfs", int) if args.av1_crfs else []
    if any(not 0 <= c <= 63 for c in crfs):
        raise CommandError(f"--av1-crfs must be between 0 and 63, got {crfs}")
    if any(n < 2 or n > 256 for n in levels):
        raise CommandError("--levels must be between 2 and 256")
    progress = not args.no_progress
    layer = (cm.bundle_tensors(args.bundle, args.images, progress) if args.bundle
             else cm.model_tensors(args.model, args.split, args.images, progress))
    only = None
    if args.only:
        known = ("DPCM", "5/3 wavelet", "5/3 wavelet, designed", "HEVC", "AV1")
        only = {p.strip() for p in args.only.split(";")}
        if not only <= set(known):
            raise CommandError(f"--only: {'; '.join(sorted(only - set(known)))} is none of {'; '.join(known)}")
    res = cm.measure(layer, levels, qps or [], progress, crfs, only)
    if args.update:
        with open(args.update) as f:
            stored = json.load(f)
        old = cm.from_json(stored)
        if old.mse.keys() != res.mse.keys() or any(abs(res.mse[n] / old.mse[n] - 1) > 0.01 for n in old.mse):
            raise CommandError(f"{args.update} holds another layer, other tensors or other levels (the uniform "
                               f"MSEs differ by over 1%)")
        for name, sweep in res.sweeps.items():  # read at the file's MSEs, the other schemes' targets
            old.bits[name] = {n: cm.at_mse(sweep, old.mse[n]) for n in old.levels}
            old.sweeps[name], old.seconds[name] = sweep, res.seconds[name]
        res = old
    print(f"{layer.name}: {layer.source}; clip [{layer.c_min:.4g}, {layer.c_max:.4g}]; shape "
          f"{'x'.join(map(str, res.shape))}; {res.tensors[0]} fit / {res.tensors[1]} held-out tensors")
    print("bits per element at the uniform quantizer's MSE (ratio to v1 designed contexts):")
    print("\n".join(cm.table(res)))
    if args.update:
        new = cm.to_json(res, stored["source"], stored["command"])
        new["updates"] = stored.get("updates", []) + ["lwfc modes " + " ".join(sys.argv[2:])]
        with open(args.update, "w") as f:
            json.dump(new, f, indent=1)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(cm.to_json(res, layer.source, "lwfc modes " + " ".join(sys.argv[2:])), f, indent=1)
    return 0


def _remeasure_overhead(args: argparse.Namespace) -> int:
    """``lwfc eval-loss --overhead-only``: the overhead of the evaluation in --output, measured again."""
    from lwfc_host.cli import CommandError
    from lwfc_host.evaluate.loss import remeasure_overhead, write_outputs

    t0 = time.time()
    try:
        ev = remeasure_overhead(args.output, args.bundle, args.cache, progress=not args.no_progress)
    except (FileNotFoundError, ValueError) as exc:
        raise CommandError(str(exc)) from exc
    ev.overhead_command = "lwfc " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    ev.seconds["overhead_again"] = time.time() - t0
    write_outputs(ev, args.output)
    for o in ev.overhead:
        print(f"{o['plan']:<9} MTU {o['mtu']:>5}: {o['slices_per_tensor']:7.2f} slices/tensor, codec overhead "
              f"{o['overhead_pct']:.2f}%, wire {o['wire_overhead_pct']:.2f}% ({o['tensors']} tensors)")
    print(f"rewrote the report in {args.output} in {time.time() - t0:.0f} s")
    return 0


def run_loss(args: argparse.Namespace) -> int:
    """``lwfc eval-loss``: accuracy under packet loss, whole frames against slices with concealment."""
    from lwfc_host.cli import CommandError
    from lwfc_host.codec.conceal import METHODS
    from lwfc_host.evaluate.loss import LOSS_MODELS, evaluate_loss, headline, write_outputs

    if args.overhead_only:
        return _remeasure_overhead(args)
    rates = _values(args, "rates", float)
    if rates is not None and any(not 0 <= r < 1 for r in rates):
        raise CommandError(f"--rates must lie in [0, 1), got {rates}")
    models = _values(args, "models", str, LOSS_MODELS)
    mtus = _values(args, "overhead-mtus", int)
    concealments = _values(args, "concealments", str, METHODS)
    plans = _values(args, "plans", str, ("auto", "rows", "channels"))
    if args.mtu < 128 or any(m < 128 for m in mtus or []):
        raise CommandError("MTUs must be at least 128 bytes")
    if args.limit is not None and args.limit < 1:
        raise CommandError("--limit must be at least 1")
    if args.burst < 1:
        raise CommandError(f"--burst must be at least 1 datagram, got {args.burst}")
    design = {"levels": args.levels, "clip_scale": args.clip_scale, "contexts": args.contexts}
    if args.tables and any(v is not None for v in design.values()):
        raise CommandError("--levels, --clip-scale and --contexts design a table; --tables gives one: not both")
    if args.contexts is not None:
        from lwfc_host.evaluate.plans import CONTEXTS

        if args.contexts not in CONTEXTS:
            raise CommandError(f"--contexts: unknown {args.contexts}; known: {', '.join(CONTEXTS)}")
    if args.levels is not None and not 2 <= args.levels <= 64:
        raise CommandError(f"--levels must be in 2..64, got {args.levels}")
    t0 = time.time()
    try:
        ev = evaluate_loss(args.bundle, args.tables, args.levels or 6, args.clip_scale or 1.6,
                           args.contexts or "groups+k3", args.limit, rates,
                           models, args.burst, args.mtu, mtus, concealments, args.seed, args.cache,
                           decode_check=args.decode_check, progress=not args.no_progress, out=args.output,
                           overhead_tensors=args.overhead_tensors, plans=plans)
    except (FileNotFoundError, ValueError) as exc:
        raise CommandError(str(exc)) from exc
    ev.command = "lwfc " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["eval-loss"] else \
        f"lwfc eval-loss --bundle {args.bundle} --output {args.output}"
    ev.seconds["total"] = time.time() - t0
    paths = write_outputs(ev, args.output)
    for line in headline(ev):
        print(line)
    print(f"wrote {', '.join(str(p) for p in paths.values())} in {time.time() - t0:.0f} s")
    return 0
