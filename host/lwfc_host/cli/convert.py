"""``lwfc convert | layers | info | train``: the converter's subcommands. Registration imports nothing
heavy; torch and litert-torch are imported inside the work functions."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from lwfc_host.cli import CommandError

# The zoo's models, for --help (registration must not import the converters: see lwfc_host.cli).
# tests/test_convert_zoo.py checks that this list matches lwfc_convert.zoo.
ZOO_MODELS = ("resnet_fmnist", "resnet_fmnist_rate", "efficientnet_lite0", "efficientnet_lite0_fmnist", "squeezenet1_1",
              "centernet_mbv3_coco")
TRAINABLE = ("resnet_fmnist", "efficientnet_lite0_fmnist")


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean bad input (reported as one line), not a bug."""
    from lwfc_convert.datasets import DatasetMissing
    from lwfc_convert.split import SplitError
    from lwfc_convert.tflite_export import ExportError
    from lwfc_convert.weight_files import WeightsError
    from lwfc_convert.zoo import UnknownModel

    return (UnknownModel, WeightsError, SplitError, ExportError, DatasetMissing)


def _at_least(flag: str, value: int | None, least: int) -> None:
    """Refuse a count the work functions would not honour as given (a non-positive image count, ...)."""
    if value is not None and value < least:
        raise CommandError(f"{flag} must be at least {least}, got {value}")


def cmd_layers(args: argparse.Namespace) -> int:
    """Print the valid split points of a model with their output shapes and activation types."""
    try:
        from lwfc_convert.split import list_split_points
        from lwfc_convert.zoo import get_spec, load_model

        spec = get_spec(args.model)
        model = load_model(args.model)
        points = list_split_points(model)
    except _user_errors() as exc:
        raise CommandError(str(exc)) from exc
    if args.json:
        print(json.dumps([{"path": p.path, "shape_chw": list(p.shape_chw), "activation": p.activation,
                           "aliases": list(p.aliases)} for p in points], indent=1))
        return 0
    print(f"{args.model}: {spec.description}; input {spec.input_shape} (C, H, W)")
    print("activation: relu -> c_min = 0; relu6 -> values in [0, 6]; linear -> signed values")
    print(f"{'split point':32} {'shape (C, H, W)':18} {'elements':>9}  activation  also named")
    for p in points:
        n = 1
        for d in p.shape_chw:
            n *= d
        mark = " *" if p.path in spec.recommended_splits else ""
        print(f"{p.path + mark:32} {str(p.shape_chw):18} {n:>9}  {p.activation:10}  {', '.join(p.aliases)}")
    print("* recommended")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """Convert a zoo model into a bundle directory."""
    _at_least("--calib-images", args.calib_images, 1)
    _at_least("--eval-images", args.eval_images, 1)
    _at_least("--qat-epochs", args.qat_epochs, 0)  # convert() would treat a negative count as 0
    try:
        from lwfc_convert.bundle import convert
        from lwfc_convert.zoo import get_spec

        get_spec(args.model)  # unknown model: fail before importing the heavy converter
        info = convert(args.model, args.split, args.output, calib_images=args.calib_images,
                       eval_images=args.eval_images, bias_correction=not args.no_bias_correction,
                       seed=args.seed, progress=not args.quiet, qat_epochs=args.qat_epochs,
                       equalization=not args.no_equalization)
    except ModuleNotFoundError as exc:
        raise CommandError(f"missing converter dependency {exc.name!r}: pip install '.[convert]'") from exc
    except _user_errors() as exc:
        raise CommandError(str(exc)) from exc
    print_summary(info, args.output)
    for warning in info["int8_check"]["warnings"]:
        print(f"WARNING: {warning}", file=sys.stderr)
    return 0


def print_summary(info: dict[str, Any], where: Any) -> None:
    """Human-readable summary of a bundle.json."""
    acc = info["accuracy"]
    e = info["edge"]
    print(f"bundle {where}: {info['model']} split at {info['split']} ({info['activation']})")
    print(f"  edge.tflite: {e['size_bytes']} bytes, input {e['input']['shape']} {e['input']['dtype']} "
          f"scale {e['input']['scale']:.6g} zp {e['input']['zero_point']}; output {e['output']['shape']} "
          f"{e['output']['dtype']} scale {e['output']['scale']:.6g} zp {e['output']['zero_point']}")
    print(f"  cloud.onnx: input {info['cloud']['input']['shape']} NHWC float32 -> {info['cloud']['output']['shape']}")
    print(f"  preprocessing: {json.dumps(info['preprocessing'])}")
    print(f"  evaluated on {info['evaluation_set']}")
    for k, v in acc.items():
        print(f"  {k}: {v:.6g}" if isinstance(v, float) else f"  {k}: {v}")
    budget = info.get("int8_error_budget")  # bundles written before it existed lack it
    if budget and "int8" in budget:
        print(f"  int8 error budget (relative L2, simulated on {budget['images']} held-out images): output "
              f"rounding alone {budget['output_rounding']:.2%}, + int8 weights {budget['weights_and_output']:.2%}"
              f", + int8 activations {budget['int8']:.2%}")
    elif budget:
        print(f"  int8 error budget: {budget.get('unavailable')}")
    check, how = info.get("int8_check"), ""
    if check is None:  # a bundle written before the check existed: judge the metrics it recorded
        check, how = _recorded_int8_check(info), ", computed now from the recorded metrics"
    if check:
        verdict = "within" if check["passed"] else "OUTSIDE"
        spread = (f"; 90% interval over photos and views {check['interval90'][0]:.4g}..{check['interval90'][1]:.4g}"
                  if check.get("interval90") else "")
        agreement = (f"; top-1 agreement {check['top1_agreement_int8_vs_float']:.2%}"
                     if "top1_agreement_int8_vs_float" in check else "")
        print(f"  int8 check: {check['metric']} = {check['value']:.4g} ({verdict} {check['rule']}, "
              f"{check['images']} images{spread}{agreement}{how})")
    t = info["timing"]
    print(f"  conversion: {t['total_seconds']:.1f} s total, TFLite {t['tflite_conversion_seconds']:.1f} s")


def _recorded_int8_check(info: dict[str, Any]) -> dict[str, Any] | None:
    """``lwfc_convert.bundle.int8_check`` of a bundle's recorded metrics; None where they lack what it needs."""
    try:
        from lwfc_convert.bundle import int8_check

        return int8_check(info["accuracy"], info.get("task") == "detection")
    except (ImportError, KeyError, TypeError, ValueError):
        return None


def cmd_info(args: argparse.Namespace) -> int:
    """Print a bundle's bundle.json (summary, or the full JSON with --json)."""
    from lwfc.bundle import load_bundle
    from lwfc.errors import BundleError

    try:
        info = load_bundle(args.bundle).info
    except BundleError as exc:
        raise CommandError(str(exc)) from exc
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        print_summary(info, args.bundle)
        print(f"  classes: {len(info['class_names'])} ({', '.join(info['class_names'][:5])}, ...)")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train resnet_fmnist or the efficientnet_lite0_fmnist head."""
    if args.model == "resnet_fmnist_rate":
        raise CommandError("resnet_fmnist_rate is resnet_fmnist fine-tuned for the codec: lwfc train --model "
                           "resnet_fmnist --rate-weight 1")
    if args.model not in TRAINABLE:
        raise CommandError(f"no training recipe for {args.model!r}; trainable: {', '.join(TRAINABLE)}")
    _at_least("--epochs", args.epochs, 1)  # 0 would silently mean the default
    _at_least("--threads", args.threads, 1)
    if args.cache is not None and args.model != "efficientnet_lite0_fmnist":
        raise CommandError("--cache holds the frozen EfficientNet backbone's features: only for "
                           "--model efficientnet_lite0_fmnist")
    rate_options = args.rate_split is not None or args.init is not None
    if (args.rate_weight is not None or rate_options) and args.model != "resnet_fmnist":
        raise CommandError("--rate-weight, --rate-split and --init fine-tune resnet_fmnist: only for "
                           "--model resnet_fmnist")
    if rate_options and args.rate_weight is None:
        raise CommandError("--rate-split and --init go with --rate-weight (rate-aware fine-tuning)")
    if args.rate_weight is not None and args.rate_weight < 0:
        raise CommandError(f"--rate-weight must be >= 0, got {args.rate_weight}")
    try:
        if args.rate_weight is not None:
            from lwfc_convert.rate_training import finetune_for_rate

            res = finetune_for_rate(args.output, split=args.rate_split or "stage2", rate_weight=args.rate_weight,
                                    epochs=args.epochs or 2, seed=args.seed, threads=args.threads,
                                    init=args.init, progress=not args.quiet)
        elif args.model == "resnet_fmnist":
            from lwfc_convert.train import train_resnet_fmnist

            res = train_resnet_fmnist(args.output, epochs=args.epochs or 12, seed=args.seed,
                                      threads=args.threads, progress=not args.quiet)
        else:
            from lwfc_convert.train import train_effnet_fmnist_head

            res = train_effnet_fmnist_head(args.output, epochs=args.epochs or 30, seed=args.seed,
                                           threads=args.threads, cache=args.cache, progress=not args.quiet)
    except _user_errors() as exc:
        raise CommandError(str(exc)) from exc
    print(json.dumps(res, indent=1))
    return 0


def register(subparsers: Any) -> None:
    """Add the converter's subcommands to the ``lwfc`` parser."""
    models = ", ".join(ZOO_MODELS)

    p = subparsers.add_parser(
        "convert", help="split a model, edge half -> int8 TFLite, cloud half -> ONNX, write a bundle",
        description="Split a zoo model at a module path; quantize the edge half to a fully int8 TFLite model "
        "(PT2E, per-channel weights, NHWC int8 I/O) calibrated on real images; export the cloud half to "
        "ONNX (NHWC float input); measure accuracies (float; int8 edge + float cloud) and write "
        "edge.tflite, cloud.onnx and bundle.json into OUTPUT. Needs: pip install '.[convert]'.")
    p.add_argument("--model", required=True, help=f"zoo model ({models})")
    p.add_argument("--split", default=None, help="module path to cut after (see `lwfc layers`); "
                   "default: the model's recommended split")
    p.add_argument("--calib-images", type=int, default=256, help="calibration images (default 256)")
    p.add_argument("--eval-images", type=int, default=None,
                   help="held-out images for the accuracy/error report (default: whole Fashion-MNIST test "
                   "set, 32 photo views for ImageNet models, 544 for the detector; photo sets take at least one "
                   "view per photo, the detector's the same number per photo)")
    p.add_argument("--output", required=True, help="bundle directory to write")
    p.add_argument("--no-bias-correction", action="store_true", help="skip BN folding + bias correction")
    p.add_argument("--no-equalization", action="store_true",
                   help="skip the per-channel range equalisation of conv -> ReLU -> depthwise and conv -> hard-swish "
                        "chains (exact in float; it is what keeps the detector's int8 detections)")
    p.add_argument("--qat-epochs", type=int, default=16,
                   help="epochs of quantization-aware fine-tuning of the converted graph (weights, biases and "
                        "activation scales) on the calibration images, distilled from the float edge half "
                        "(default 16; 0: plain post-training quantization)")
    p.add_argument("--seed", type=int, default=0, help="seed for calibration sampling (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_convert)

    p = subparsers.add_parser(
        "layers", help="list a model's valid split points (shapes, activation types)",
        description="List the module paths where MODEL can be cut into an edge and a cloud half (only one "
        "tensor crosses), with the output shape (C, H, W) and the activation type: relu (c_min = 0), relu6 "
        "([0, 6]) or linear (signed).")
    p.add_argument("--model", required=True, help=f"zoo model ({models})")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_layers)

    p = subparsers.add_parser("info", help="print a converted bundle's bundle.json",
                              description="Print what `lwfc convert` recorded in BUNDLE/bundle.json.")
    p.add_argument("bundle", help="bundle directory (or its bundle.json)")
    p.add_argument("--json", action="store_true", help="print the full JSON")
    p.set_defaults(func=cmd_info)

    p = subparsers.add_parser(
        "train", help="train a Fashion-MNIST model of the zoo (resnet_fmnist or the EfficientNet head)",
        description="Train resnet_fmnist (SGD, one-cycle, seeded) or the head (1280-512-10) of "
        "efficientnet_lite0_fmnist on cached frozen-backbone features, and save the weights (default: the "
        "package's weights/ folder). With --rate-weight, fine-tune resnet_fmnist for the codec instead "
        "(lwfc_convert.rate_training).")
    p.add_argument("--model", required=True, help=" or ".join(TRAINABLE))
    p.add_argument("--output", default=None, help="weight file to write (default: package weights/)")
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs (default 12 for the ResNet, 30 for the head, 2 with --rate-weight)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: one thread is faster on a busy machine, and the committed "
                   "weights were trained with 1)")
    p.add_argument("--cache", default=None, help="backbone feature cache file (efficientnet_lite0_fmnist only)")
    p.add_argument("--rate-weight", type=float, default=None,
                   help="resnet_fmnist only: fine-tune the trained model (not from scratch) with this weight on "
                   "the mean absolute value of the split tensor added to the cross-entropy, so that the codec "
                   "needs fewer bits for it (default output: the zoo's resnet_fmnist_rate; 2 epochs)")
    p.add_argument("--rate-split", default=None, choices=("stage1", "stage2", "stage3"),
                   help="with --rate-weight: the split tensor's module (default stage2)")
    p.add_argument("--init", default=None,
                   help="with --rate-weight: weights to start from (default: the committed resnet_fmnist)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)
