"""``lwfc convert``: split a zoo model, edge half -> int8 TFLite, cloud half -> ONNX, measure, and write a
bundle directory (edge.tflite, cloud.onnx, bundle.json). See converters/README.md for bundle.json."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lwfc.bundle import CLOUD_FILE, EDGE_FILE, INFO_FILE

if TYPE_CHECKING:
    from .zoo import QatRecipe

BUNDLE_VERSION = 1

# Photos held out from calibration (the ImageNet models have no labeled set here): they measure the
# int8 error and top-1 agreement; calibration uses random crops of the other photos.
HELD_OUT_PHOTOS = ("skimage/coffee", "skimage/chelsea", "matplotlib/grace_hopper", "sklearn/china")

# The int8 error budget (qat.error_budget) is simulated on at most this many held-out images.
ERROR_BUDGET_IMAGES = 512

# What the int8 edge half may cost on the task before `lwfc convert` warns (bundle.json "int8_check"):
MIN_MAP50_RETENTION = 0.95  # detectors: mAP@0.5 of the int8 pipeline against the float model's detections
MAX_ACCURACY_DROP = 0.005  # classifiers on labeled data: float minus int8 top-1 accuracy
MIN_TOP1_AGREEMENT = 0.99  # classifiers on unlabeled photos: int8 top-1 equal to the float top-1
# Unlabeled photos cannot measure an accuracy drop; its estimate (expected_top1_accuracy_drop) takes the float
# model's softmax as the distribution of the true class, and is held to MAX_ACCURACY_DROP. A view whose float
# top-1 is a near tie flips under any error at all, so agreement alone fails on a set with many such views.


def int8_check(metrics: dict[str, Any], detector: bool) -> dict[str, Any]:
    """Whether the int8 edge half keeps the task within the thresholds above, from the bundle's ``accuracy``
    (:func:`evaluate` or ``detection.bundle_metrics``): the metric, its value and threshold, ``passed``, and
    ``warnings`` (sentences for the user; a detector retention measured on fewer views than a full detector
    check uses, ``detection.CHECK_VIEWS``, is flagged as not conclusive either way). Detectors also get
    ``interval90``, the retention's 90% bootstrap interval over photos and views, when the metrics have it.
    Classifiers on unlabeled views pass on the expected accuracy drop or on top-1 agreement (either suffices;
    metrics recorded before the expected drop existed are judged on agreement alone)."""
    from .detection import CHECK_VIEWS

    n = int(metrics["images"])
    warnings = []
    if detector:
        value, threshold = float(metrics["map50_int8_vs_float"]), MIN_MAP50_RETENTION
        res = {"metric": "map50_int8_vs_float", "rule": f">= {threshold}", "value": value, "threshold": threshold,
               "passed": value >= threshold}
        if metrics.get("map50_int8_vs_float_interval90"):
            # The rule is on the value; the interval says how much other photos and views could move it.
            res["interval90"] = list(metrics["map50_int8_vs_float_interval90"])
        if not res["passed"]:
            warnings.append(f"the int8 edge half keeps {value:.1%} of the float model's mAP@0.5 on {n} views "
                            f"(threshold {threshold:.0%}; recall {metrics['recall_int8_vs_float']:.1%}, precision "
                            f"{metrics['precision_int8_vs_float']:.1%} of its {metrics['reference_detections']} "
                            "detections)")
        if n < CHECK_VIEWS:
            warnings.append(f"retention measured on {n} views, fewer than the {CHECK_VIEWS} of a full detector "
                            "check: not conclusive (--eval-images)")
    elif "float_accuracy" in metrics:
        drop = float(metrics["float_accuracy"]) - float(metrics["int8_edge_float_cloud_accuracy"])
        threshold = MAX_ACCURACY_DROP
        res = {"metric": "float_accuracy - int8_edge_float_cloud_accuracy", "rule": f"<= {threshold}",
               "value": drop, "threshold": threshold, "passed": drop <= threshold}
        if not res["passed"]:
            warnings.append(f"the int8 edge half loses {100 * drop:.2f} pp of top-1 accuracy on {n} images "
                            f"(threshold {100 * threshold:.1f} pp)")
    else:
        value, threshold = float(metrics["top1_agreement_int8_vs_float"]), MIN_TOP1_AGREEMENT
        res = {"metric": "top1_agreement_int8_vs_float", "rule": f">= {threshold}", "value": value,
               "threshold": threshold, "passed": value >= threshold}
        expected = metrics.get("expected_top1_accuracy_drop")  # bundles written before it existed lack it
        if expected is not None:
            # the classifiers' first criterion (accuracy lost), estimated; agreement is the alternative
            drop = float(expected)
            res = {"metric": "expected_top1_accuracy_drop", "rule": f"<= {MAX_ACCURACY_DROP} or "
                   f"top1_agreement_int8_vs_float >= {threshold}", "value": drop, "threshold": MAX_ACCURACY_DROP,
                   "top1_agreement_int8_vs_float": value,
                   "passed": drop <= MAX_ACCURACY_DROP or value >= threshold}
        if not res["passed"]:
            lost = "" if expected is None else f" and loses an expected {100 * float(expected):.2f} pp of accuracy"
            warnings.append(f"the int8 pipeline's top-1 agrees with the float model's on {value:.1%} of {n} "
                            f"views (threshold {threshold:.0%}){lost}")
    return {**res, "images": n, "warnings": warnings}


def expected_accuracy_drop(float_logits: np.ndarray, int8_logits: np.ndarray) -> float:
    """The top-1 accuracy the int8 pipeline is expected to lose where no labels exist, taking the float model's
    softmax as the distribution of the true class: mean over views of p(float top-1) - p(int8 top-1), with p
    that softmax. A flip between two near-equal classes costs almost nothing; a flip away from a confident
    class costs its probability. Exact for a calibrated float model; one value for a batch of views (N x K)."""
    z = float_logits - float_logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    rows = np.arange(len(p))
    return float(np.mean(p[rows, float_logits.argmax(1)] - p[rows, int8_logits.argmax(1)]))


def _rel_l2(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(got - ref) / max(float(np.linalg.norm(ref)), 1e-12))


def _photo_views(names: list[str], n: int, size: int, seed: int, random_crops: bool) -> list[np.ndarray]:
    """``n`` views (uint8 RGB) of the named photos: random crops/flips, or centre views when not random."""
    from PIL import Image

    from .datasets import load_photo, photo_paths

    paths = photo_paths()
    rng = np.random.default_rng(seed)
    views = []
    for k in range(n):
        img = load_photo(paths[names[k % len(names)]])
        if random_crops:
            h, w = img.shape[:2]
            s = int(min(h, w) * rng.uniform(0.5, 1.0))
            top, left = rng.integers(0, h - s + 1), rng.integers(0, w - s + 1)
            img = img[top : top + s, left : left + s]
            if rng.random() < 0.5:
                img = img[:, ::-1]
        views.append(np.asarray(Image.fromarray(np.ascontiguousarray(img))))
    return views


def _first_images(batches: list[Any], limit: int) -> list[Any]:
    """The first ``limit`` images of a list of NCHW batches, as batches."""
    out, n = [], 0
    for x in batches:
        if n >= limit:
            break
        out.append(x[: limit - n])
        n += len(out[-1])
    return out


def calibration_and_eval_data(name: str, calib_images: int, eval_images: int | None, seed: int = 0,
                              progress: bool = True) -> tuple[list[Any], list[tuple[Any, Any]], str]:
    """Calibration batches (NCHW float) and held-out evaluation batches (x, labels) of real images.

    Fashion-MNIST models: calibration on a seeded random subset of the *training* split, evaluation on the
    first ``eval_images`` of the test split (all 10,000 if None). ImageNet models: calibration on random
    crops of the photos not in HELD_OUT_PHOTOS, evaluation on the held-out photos (centre view plus random
    crops; labels -1)."""
    import torch

    from .datasets import load_fashion_mnist_arrays, photo_paths
    from .zoo import get_spec, preprocess_fn

    spec = get_spec(name)
    pre = preprocess_fn(name)
    if spec.dataset == "fashion-mnist":
        tr_x, _ = load_fashion_mnist_arrays("train")
        idx = np.random.default_rng(seed).choice(len(tr_x), size=calib_images, replace=False)
        calib = [pre(tr_x[idx[i : i + 32]]) for i in range(0, len(idx), 32)]
        from .datasets import fashion_mnist

        ev = list(fashion_mnist("test", pre, batch_size=250, limit=eval_images, progress=progress))
        return calib, ev, f"Fashion-MNIST test, first {sum(len(y) for _, y in ev)} images"
    available = sorted(photo_paths())
    held = [p for p in HELD_OUT_PHOTOS if p in available]
    rest = [p for p in available if p not in held]
    if not rest or not held:
        from .datasets import DatasetMissing

        raise DatasetMissing("the natural photos need scikit-image, matplotlib and scikit-learn installed")
    calib_views = _photo_views(rest, calib_images, spec.input_shape[1], seed, random_crops=True)
    calib = [pre(calib_views[i : i + 8]) for i in range(0, len(calib_views), 8)]
    n_eval = eval_images if eval_images is not None else 8 * len(held)
    ev_views = _photo_views(held, len(held), 0, seed, random_crops=False)
    ev_views += _photo_views(held, max(0, n_eval - len(held)), 0, seed + 1, random_crops=True)
    ev = [(pre(ev_views[i : i + 8]), torch.full((len(ev_views[i : i + 8]),), -1)) for i in
          range(0, len(ev_views), 8)]
    return calib, ev, f"{len(ev_views)} views (centre + random crops) of held-out photos {held}"


def evaluate(model: Any, edge: Any, cloud: Any, tflite_path: Path, onnx_path: Path,
             data: list[tuple[Any, Any]], progress: bool = True) -> dict[str, Any]:
    """Run the float model, the float edge half, the int8 TFLite edge half (ai-edge-litert) and the ONNX
    cloud half (onnxruntime) on ``data``; return accuracies / agreement and the int8 error."""
    import torch
    from tqdm import tqdm

    from lwfc.edge import make_interpreter

    from .cloud_runtime import onnx_session, run_onnx
    from .tflite_export import run_tflite

    interp = make_interpreter(tflite_path)
    sess = onnx_session(onnx_path)
    n = correct_float = correct_int8 = correct_onnx_float = agree = top5 = 0
    err_num = err_den = expected_drop = 0.0
    onnx_err = 0.0
    t_edge = 0.0
    for x, y in tqdm(data, desc="evaluating", unit="batch", disable=not progress, leave=False):
        with torch.no_grad():
            logits = model(x).numpy()
            feats = edge(x)
        f_nhwc = feats.permute(0, 2, 3, 1).numpy()
        t = time.perf_counter()
        _, deq = run_tflite(interp, x)
        t_edge += time.perf_counter() - t
        err_num += float(np.sum((deq - f_nhwc) ** 2))
        err_den += float(np.sum(f_nhwc**2))
        logits_int8 = run_onnx(sess, deq)
        logits_onnx_float = run_onnx(sess, f_nhwc)
        onnx_err = max(onnx_err, _rel_l2(logits_onnx_float, logits))
        pf, pq = logits.argmax(1), logits_int8.argmax(1)
        yy = y.numpy()
        n += len(yy)
        correct_float += int((pf == yy).sum())
        correct_int8 += int((pq == yy).sum())
        correct_onnx_float += int((logits_onnx_float.argmax(1) == yy).sum())
        agree += int((pf == pq).sum())
        expected_drop += expected_accuracy_drop(logits, logits_int8) * len(pf)
        top5 += int(sum(pf[i] in np.argsort(-logits_int8[i])[:5] for i in range(len(pf))))
    labeled = bool(n) and all(int(y.min()) >= 0 for _, y in data)
    res: dict[str, Any] = {
        "images": n,
        "top1_agreement_int8_vs_float": agree / n,
        "float_top1_in_int8_top5": top5 / n,
        "expected_top1_accuracy_drop": expected_drop / n,
        "edge_int8_rel_l2_error": float(np.sqrt(err_num / max(err_den, 1e-30))),
        "cloud_onnx_vs_torch_max_rel_l2_error": onnx_err,
        "edge_tflite_ms_per_image": 1000 * t_edge / n,
    }
    if labeled:
        res["float_accuracy"] = correct_float / n
        res["int8_edge_float_cloud_accuracy"] = correct_int8 / n
        res["float_edge_onnx_cloud_accuracy"] = correct_onnx_float / n
    return res


def convert(name: str, at: str | None, output: str | Path, calib_images: int = 256,
            eval_images: int | None = None, bias_correction: bool = True, seed: int = 0,
            progress: bool = True, qat_epochs: int = 16, equalization: bool = True) -> dict[str, Any]:
    """Build a bundle for zoo model ``name`` split at ``at`` (the model's default split if None) in
    directory ``output``; returns the bundle.json content.

    Steps: split the model and check the cut is exact; the edge half to int8 TFLite
    (:func:`convert_edge`); the cloud half to ONNX; measure both on held-out data; write bundle.json."""
    import torch

    from . import split as sp
    from .detection import bundle_metrics, is_detector
    from .onnx_export import export_cloud_onnx
    from .zoo import get_spec, load_model

    t_start = time.time()
    spec = get_spec(name)
    at = at or spec.default_split
    model = load_model(name)
    point = sp.describe(model, at)
    edge, cloud = sp.split(model, at)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    detector = is_detector(name)
    calib, ev, eval_desc = _data(name, detector, calib_images, eval_images, seed, progress)
    # The split must be exact before anything is quantized.
    split_err = sp.check_split(model, edge, cloud, ev[0][0][:4])
    if split_err > 1e-5:
        raise sp.SplitError(f"split at {at!r} is not exact: max |cloud(edge(x)) - model(x)| = {split_err:g}")
    task = None
    if spec.qat and spec.qat.task and qat_epochs > 0:
        # the recipe's task distillation: the cloud half's own outputs as a second QAT target
        from .qat import TaskDistillation

        with_outputs, loss = spec.qat.task(model)
        task = TaskDistillation(sp.split(with_outputs, at)[1], loss, spec.qat.task_weight)
    edge_int8 = convert_edge(edge, calib, ev, spec.preprocess, out / EDGE_FILE, bias_correction, qat_epochs,
                             seed, progress, equalization, spec.qat, task)
    t0 = time.time()
    onnx_info = export_cloud_onnx(cloud, tuple(point["shape_chw"]), out / CLOUD_FILE)
    t_onnx = time.time() - t0
    measure = bundle_metrics if detector else evaluate
    metrics = measure(model, edge, cloud, out / EDGE_FILE, out / CLOUD_FILE, ev, progress)
    settings = {"calibration_images": calib_images, "seed": seed, "equalization": equalization,
                "bias_correction": bias_correction, "qat_epochs": qat_epochs}
    timing = {"total_seconds": time.time() - t_start, **edge_int8["timing"], "onnx_export_seconds": t_onnx}
    info = _bundle_info(spec, point, detector, settings, edge_int8, onnx_info, metrics, eval_desc, split_err,
                        timing)
    with open(out / INFO_FILE, "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1)
    return info


def _data(name: str, detector: bool, calib_images: int, eval_images: int | None, seed: int,
          progress: bool) -> tuple[list[Any], list[tuple[Any, Any]], str]:
    """Calibration and evaluation data: deterministic photo views for detectors (scored by mAP@0.5 against
    the float model's detections), else :func:`calibration_and_eval_data`."""
    if detector:
        from .detection import CHECK_VIEWS, detection_eval_data

        return detection_eval_data(name, calib_images, CHECK_VIEWS if eval_images is None else eval_images, seed,
                                   progress)
    return calibration_and_eval_data(name, calib_images, eval_images, seed, progress)


def qat_images(edge: Any, calib: list[Any], recipe: QatRecipe, seed: int = 0) -> tuple[list[Any], str | None]:
    """What QAT fine-tunes ``edge`` on under ``recipe``: the calibration batches, or ``recipe.crops`` random crops
    of them (``qat.random_crops``) when the recipe asks for crops and the float edge half runs on a crop. An
    edge half that does not (a graph converted from TF.js with shapes fixed to the whole image, e.g.
    CenterNet's up to its head) gets as many whole calibration images as the crops hold pixels. Returns the
    batches and a sentence for bundle.json (None without crops)."""
    import torch

    from .qat import random_crops

    if not recipe.crop:
        return calib, None
    crops = random_crops(calib, recipe.crop, recipe.crops, seed)
    try:
        with torch.no_grad():
            edge(crops[:1])
    except (IndexError, RuntimeError) as exc:
        whole = torch.cat(list(calib))
        n = max(1, min(len(whole), recipe.crops * recipe.crop ** 2 // (whole.shape[2] * whole.shape[3])))
        return [whole[:n]], (f"{n} whole calibration images: the edge half does not run on "
                             f"{recipe.crop} x {recipe.crop} crops ({type(exc).__name__}: {exc})")
    return [crops], f"{recipe.crops} random {recipe.crop} x {recipe.crop} crops of the calibration images"


def convert_edge(edge: Any, calib: list[Any], ev: list[tuple[Any, Any]], preprocessing: dict[str, Any],
                 output: Path, bias_correction: bool = True, qat_epochs: int = 16, seed: int = 0,
                 progress: bool = True, equalization: bool = True, qat_recipe: QatRecipe | None = None,
                 task: Any = None) -> dict[str, Any]:
    """The float edge half -> fully int8 TFLite file ``output``: per-channel range equalisation
    (``equalize``, exact in float), bias correction (``quant_fix``), PT2E, QAT fine-tuning (``qat``, unless
    ``qat_epochs`` is 0; learning rates, crops and images per epoch from ``qat_recipe``, default the
    classifiers'; ``task``: its ``qat.TaskDistillation``, if any), conversion,
    the int8 check (ExportError if any op stays float) and the int8 error budget on the first held-out images
    of ``ev``. Returns the TFLite model's details (``tflite``), ``equalization``, ``bias_correction``,
    ``input_grid``, ``budget`` and ``timing``."""
    from .equalize import equalize
    from .preprocess import exact_int8_input
    from .qat import error_budget, qat_finetune
    from .quant_fix import bias_correct
    from .tflite_export import ExportError, check_int8, convert_edge_to_tflite
    from .zoo import QatRecipe

    recipe = qat_recipe or QatRecipe()
    t0 = time.time()
    edge_eq, eq_info = equalize(edge, calib) if equalization else (edge, None)
    t_eq = time.time() - t0
    t0 = time.time()
    edge_q, bc_info = bias_correct(edge_eq, calib) if bias_correction else (edge_eq, None)
    t_bc = time.time() - t0
    graph: dict[str, Any] = {}

    def refine(quantized: Any) -> dict[str, Any] | None:
        graph["quantized"] = quantized  # kept for the error budget below
        if qat_epochs <= 0:
            return None
        # fine-tune the converted graph against the float edge half (qat.py); the teacher is the original
        # float edge half (the equalised one computes the same function)
        images, described = qat_images(edge, calib, recipe, seed)
        info = qat_finetune(quantized, edge, images, epochs=qat_epochs, lr=recipe.lr, scale_lr=recipe.scale_lr,
                            batch=recipe.batch, seed=seed, progress=progress,
                            images_per_epoch=recipe.images_per_epoch, task=task)
        if described:
            info["crops"] = described
        return info

    # When the preprocessed pixels lie on an int8 grid, the input takes that grid, not a calibrated one.
    input_grid = exact_int8_input(preprocessing)
    t0 = time.time()
    tfl = convert_edge_to_tflite(edge_q, calib, calib[0][:1], output, progress, refine=refine,
                                 input_qparams=input_grid,
                                 range_limits=eq_info["range_limits"] if eq_info else None)
    t_tflite = time.time() - t0
    problems = check_int8(output)
    if problems:
        raise ExportError(f"edge half is not fully int8: {'; '.join(sorted(set(problems)))}")
    t0 = time.time()
    budget_images = _first_images([x for x, *_ in ev], ERROR_BUDGET_IMAGES)
    try:
        budget: dict[str, Any] = error_budget(graph["quantized"], edge, budget_images)
    except ValueError as exc:  # e.g. an output that is not quantized per tensor: say so, keep the bundle
        budget = {"unavailable": str(exc)}
    budget["seconds"] = time.time() - t0
    return {"tflite": tfl, "equalization": eq_info, "bias_correction": bc_info, "input_grid": input_grid,
            "budget": budget,
            "timing": {"tflite_conversion_seconds": t_tflite, "pt2e_calibration_seconds": tfl["pt2e_seconds"],
                       "equalization_seconds": t_eq, "bias_correction_seconds": t_bc}}


def _bundle_info(spec: Any, point: dict[str, Any], detector: bool, settings: dict[str, Any],
                 edge_int8: dict[str, Any], onnx_info: dict[str, Any], metrics: dict[str, Any], eval_desc: str,
                 split_err: float, timing: dict[str, float]) -> dict[str, Any]:
    """bundle.json's content (converters/README.md). ``settings``: the conversion's calibration_images,
    seed, equalization, bias_correction and qat_epochs; ``edge_int8``: what :func:`convert_edge` returned."""
    import torch

    tfl = edge_int8["tflite"]
    return {
        "bundle_version": BUNDLE_VERSION,
        "model": spec.name,
        "description": spec.description,
        "split": point["path"],
        "split_aliases": point["aliases"],
        "activation": point["activation"],
        "c_min": 0.0 if point["activation"] in ("relu", "relu6") else None,
        "c_max": 6.0 if point["activation"] == "relu6" else None,
        "model_input": {"shape_nchw": [1, *spec.input_shape], "dtype": "float32"},
        "edge": {
            "file": EDGE_FILE,
            "input": tfl["input"],
            "output": tfl["output"],
            "size_bytes": tfl["size_bytes"],
            "fully_int8": True,
            "quantization": {"scheme": "PT2E static, per-channel symmetric int8 weights, per-tensor int8 "
                                       "activations (histogram observer)",
                             **settings,
                             "input": ("exact: q = pixel - 128" if edge_int8["input_grid"] is not None
                                       else "calibrated")},
        },
        "cloud": {"file": CLOUD_FILE, **onnx_info},
        "feature": {"shape_nhwc": tfl["output"]["shape"], "shape_chw": point["shape_chw"],
                    "layout": "NHWC", "scale": tfl["output"]["scale"],
                    "zero_point": tfl["output"]["zero_point"], "activation": point["activation"]},
        "preprocessing": spec.preprocess,
        "dataset": spec.dataset,
        "task": "detection" if detector else "classification",
        "evaluation_set": eval_desc,
        "class_names": spec.classes(),
        "accuracy": metrics,
        "int8_check": int8_check(metrics, detector),
        "split_max_abs_error": split_err,
        "timing": timing,
        "equalization": edge_int8["equalization"],
        "bias_correction": edge_int8["bias_correction"],
        "qat": tfl["refine"],
        "int8_error_budget": edge_int8["budget"],
        "versions": _versions(),
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": platform.machine(),
        "torch": torch.__version__,
    }


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "litert-torch", "ai-edge-litert", "onnx", "onnxruntime", "torchao"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out
