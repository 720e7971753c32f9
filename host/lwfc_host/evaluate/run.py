"""Rate-accuracy evaluation of lwfc and the baselines on a real split model (``lwfc eval``).

Pipeline, the same for every method: images -> int8 TFLite edge half (ai-edge-litert) -> codec -> decoder ->
ONNX cloud half (onnxruntime, batched) -> metric. The edge outputs (int8) of the evaluation set and of a
calibration set are computed once and cached (``edge_cache``); every method then codes the same tensors.

Rates come from the bytes each codec actually produced (lwfc frames with header and CRC; HEVC access units
with parameter sets, plus min/max side info; ...), never from an entropy estimate.

The parts: ``plans`` (which rate points), ``metrics`` (accuracy, agreement, mAP@0.5: ``--metric auto`` picks
the one that fits the bundle), ``edge_cache``, ``lwfc_points`` and ``baseline_points`` (one task per quantizer
or baseline setting), ``pool`` (the tasks on several cores), ``results`` (what is saved), ``report``;
``streaming`` keeps memory bounded whatever the number of tensors (float reconstructions a chunk at a time, the
cloud half a few tensors at a time, only cloud outputs and frame sizes kept) and records the peak.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable

from lwfc.bundle import load_bundle
from lwfc_convert.cloud_runtime import onnx_session
from lwfc_host.evaluate.baseline_points import Codec, baseline_settings, method_of, run_baseline
from lwfc_host.evaluate.edge_cache import SESSION_THREADS, EdgeData, cache_path, edge_data, load_edge_data
from lwfc_host.evaluate.lwfc_points import Combo, lwfc_combos, lwfc_stats, run_lwfc_combo
from lwfc_host.evaluate.metrics import METRICS, bundle_task, resolve_metric
from lwfc_host.evaluate.plans import METHODS, Plan, make_plan
from lwfc_host.evaluate.pool import Shared, run_tasks
from lwfc_host.evaluate.results import Evaluation, Point
from lwfc_host.evaluate.streaming import peak_rss_mb

DEFAULT_CACHE = Path("cache") / "eval"
DATASETS = ("fashion-mnist", "photos")


@dataclass
class TaskContext:
    """What every lwfc and baseline task reads: the edge outputs, the lwfc calibration statistics, a
    cloud-half session, the metric and the plan."""

    data: EdgeData
    stats: Any
    session: Any
    metric: Any
    plan: Plan


def worker_context(edge_cache: str, cloud_path: str, metric: str, plan: Plan) -> TaskContext:
    """A worker's TaskContext, rebuilt from the edge-output cache: the same arrays, and the same statistics
    (``lwfc_stats`` is deterministic), so a task gives the same points in a worker as in-process."""
    data = load_edge_data(edge_cache)
    return TaskContext(data, lwfc_stats(data), onnx_session(cloud_path, threads=1), METRICS[metric](), plan)


def lwfc_task(combo: Combo, ctx: TaskContext) -> list[Point]:
    """The points of one lwfc quantizer (every context variant of the plan)."""
    return run_lwfc_combo(combo, ctx.stats, ctx.data, ctx.session, ctx.metric, ctx.plan)


def baseline_task(name: str, codec: Codec, ctx: TaskContext) -> list[Point]:
    """The point of one baseline setting."""
    return [run_baseline(name, codec, ctx.data, ctx.session, ctx.metric)]


def resolve_dataset(info: dict, dataset: str) -> str:
    """The data set to evaluate bundle.json's content ``info`` on: ``auto`` is the bundle's own, and no
    other may be asked for (the edge half was calibrated on it)."""
    ds = info.get("dataset", "fashion-mnist") if dataset == "auto" else dataset
    if ds not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}: fashion-mnist, photos or auto")
    if ds != info.get("dataset"):
        raise ValueError(f"bundle {info['model']} is evaluated on {info.get('dataset')}, not {ds}")
    return ds


def _reference(metric: Any, data: EdgeData, info: dict) -> dict[str, float]:
    """The metric of the uncompressed int8 pipeline, of the float model and, for a fine-tuned model, of the model
    it was fine-tuned from, on the evaluation images."""
    reference = {f"int8 {k}": v for k, v in metric(data.ref["int8"], data.labels, data.ref).items()}
    if "float" in data.ref:
        reference.update({f"float {k}": v for k, v in metric(data.ref["float"], data.labels, data.ref).items()})
    elif data.labeled and "float_accuracy" in info.get("accuracy", {}):
        reference["float accuracy"] = float(info["accuracy"]["float_accuracy"])  # whole test set (bundle.json)
    if "original float" in data.ref:
        reference.update({f"original float {k}": v
                          for k, v in metric(data.ref["original float"], data.labels, data.ref).items()})
    return reference


def _tasks(ctx: TaskContext, methods: set[str]) -> tuple[list[Callable[[TaskContext], list[Point]]], list[str]]:
    """Picklable tasks of every lwfc quantizer and baseline setting to run, and the name each one's seconds
    are summed under."""
    from lwfc_host.design.table_design import design_quantizer

    def clip_of_levels(lv: int) -> tuple[float, float]:
        # RLE uses the MSE clip ranges of lwfc's uniform quantizers (the same quantizer, another entropy coder)
        q, _ = design_quantizer(ctx.stats, lv, "uniform", 0.0, "mse")
        return float(q.clip_min), float(q.clip_max)

    tasks: list[Callable[[TaskContext], list[Point]]] = []
    kinds: list[str] = []
    if "lwfc" in methods:
        for combo in lwfc_combos(ctx.plan):
            tasks.append(partial(lwfc_task, combo))
            kinds.append("lwfc")
    for name, codec in baseline_settings(ctx.plan, clip_of_levels):
        if method_of(name) in methods:
            tasks.append(partial(baseline_task, name, codec))
            kinds.append(name.split()[0])
    return tasks, kinds


def _hevc_single(data: EdgeData, plan: Plan, methods: set[str]) -> dict[str, float]:
    """HEVC's encode and decode ms for one tensor with its own ffmpeg processes, at the middle 8-bit QP."""
    qps = plan.hevc_qps.get(8)
    if "hevc" not in methods or not qps:
        return {}
    from lwfc_host.evaluate.baselines import hevc_single_process_ms

    qp = qps[len(qps) // 2]
    e, d = hevc_single_process_ms(data.dequantize(data.q_eval[:1]), qp, 8)
    return {"qp": qp, "encode_ms": e, "decode_ms": d}


def _methods(methods: Iterable[str] | None) -> set[str]:
    chosen = set(methods or METHODS)
    unknown = sorted(chosen - set(METHODS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    return chosen


def evaluate_bundle(bundle_dir: str | Path, dataset: str = "auto", limit: int | None = None, quick: bool = False,
                    cache_dir: str | Path = DEFAULT_CACHE, metric: str = "auto",
                    methods: Iterable[str] | None = None, progress: bool = True,
                    overrides: dict[str, Any] | None = None, jobs: int = 1) -> Evaluation:
    """Run every method of the plan on the bundle's evaluation set. ``overrides`` replaces plan lists
    (``plans.make_plan``). ``metric`` ``auto``: mAP@0.5 for detectors, accuracy/agreement for classifiers.
    ``jobs``: worker processes for the lwfc quantizers and baseline settings (``pool.run_tasks``); the edge
    half runs once, before them, and the results do not depend on ``jobs``."""
    bundle = load_bundle(bundle_dir)
    ds = resolve_dataset(bundle.info, dataset)
    metric = resolve_metric(bundle.info, metric)
    methods = _methods(methods)
    plan = make_plan(bundle_task(bundle.info) == "detection", ds, quick, limit, overrides, methods)
    session = onnx_session(bundle.cloud_path, threads=SESSION_THREADS)
    met = METRICS[metric]()
    t0 = time.time()
    data = edge_data(bundle, ds, plan, cache_dir, progress)
    edge_cache = cache_path(bundle, ds, plan, cache_dir)
    seconds = {"edge_outputs": time.time() - t0}
    ctx = TaskContext(data, lwfc_stats(data), session, met, plan)
    tasks, kinds = _tasks(ctx, methods)
    shared = Shared(ctx, worker_context, (str(edge_cache), bundle.cloud_path, metric, plan))
    t0 = time.time()
    points: list[Point] = []
    method_seconds: dict[str, float] = {}
    for kind, (pts, secs) in zip(kinds, run_tasks(tasks, jobs, "lwfc and baselines", progress, shared)):
        points += pts
        method_seconds[kind] = method_seconds.get(kind, 0.0) + secs
    seconds["methods"] = time.time() - t0
    n, h, w, c = data.q_eval.shape
    return Evaluation(bundle.info, str(Path(bundle_dir)), ds, plan, points, _reference(met, data, bundle.info),
                      met.primary(data.labeled), (h, w, c), n, data.description, seconds,
                      _hevc_single(data, plan, methods), str(edge_cache), metric=metric,
                      metric_description=met.describe() if hasattr(met, "describe") else "",
                      method_seconds=method_seconds, jobs=jobs, peak_rss_mb=peak_rss_mb())
