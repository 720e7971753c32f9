"""Rate-accuracy evaluation of lwfc and the baselines on a real split model (``lwfc eval``).

Pipeline, the same for every method: images -> int8 TFLite edge half (ai-edge-litert) -> codec -> decoder ->
ONNX cloud half (onnxruntime, batched) -> metric. The edge outputs (int8) of the evaluation set and of a
calibration set are computed once and cached in an .npz; every method then codes the same tensors.

Rates come from the bytes each codec actually produced (lwfc frames with header and CRC; HEVC access units
with parameter sets, plus min/max side info; ...), never from an entropy estimate.

Metrics are pluggable (``METRICS``): a metric turns cloud outputs (and labels, and the reference outputs) into
named numbers and names its primary one. Classifiers use labeled accuracy, or, on unlabeled photos, top-1
agreement with the uncompressed pipeline; detectors (cloud outputs ``[N, 100, 6]`` detection rows) use mAP@0.5
against the uncompressed int8 pipeline's detections (``lwfc_convert.detection``), on deterministic views of the
darknet demo photos and the other bundled photos. ``--metric auto`` picks the one that fits the bundle.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

DEFAULT_CACHE = Path("cache") / "eval"
CONFIDENT = 0.5  # a view is "confident" when the reference top-1 softmax probability reaches this


# ---- settings ------------------------------------------------------------------------------------------------------
@dataclass
class Plan:
    """Which methods and rate points to run."""

    levels: list[int]
    kinds: list[str]
    clips: list[str]  # "mse", "model" (clipping.choose_clip) and "sweep" (the MSE clip's top x each clip_scale)
    contexts: list[str]  # keys of CONTEXTS: "one" (one model), "channel", "groups", "groups+k2", "auto", ...
    hevc_qps: dict[int, list[int]]  # bit depth -> QPs
    jpeg_qualities: list[int]
    webp_qualities: list[int]
    rle_levels: list[int]
    zlib_bits: list[int]
    calib_images: int
    eval_images: int | None  # None: the whole test set
    decode_check: int  # tensors decoded per extra context variant (the main variant decodes them all)
    # "sweep": uniform quantizers whose clip top is the MSE one times each scale, coded with the last context
    # variant only. Wider clips zero more small activations: far fewer bits for little task loss at 2-3 levels.
    clip_scales: list[float] = field(default_factory=lambda: [1.0, 1.3, 1.6, 2.0, 2.5])


def full_plan(limit: int | None = None, dataset: str = "fashion-mnist") -> Plan:
    return Plan(levels=[2, 3, 4, 5, 6, 7, 8], kinds=["uniform", "ecsq"], clips=["mse", "model", "sweep"],
                contexts=["one", "channel", "groups+k2", "auto"],
                # 10-bit frames add nothing on int8 edge outputs (256 values at most): fewer QPs there
                hevc_qps={8: [22, 27, 32, 36, 40, 43, 46, 49], 10: [32, 40, 46]},
                jpeg_qualities=[5, 10, 25, 50, 75, 95], webp_qualities=[5, 10, 25, 50, 75, 95],
                rle_levels=[2, 3, 4, 5, 6, 8], zlib_bits=[8, 4, 2], calib_images=512,
                eval_images=limit if limit is not None else (None if dataset == "fashion-mnist" else 320),
                decode_check=200)


def quick_plan(limit: int | None = None, dataset: str = "fashion-mnist") -> Plan:
    return Plan(levels=[2, 4], kinds=["uniform", "ecsq"], clips=["mse", "model", "sweep"],
                contexts=["one", "groups", "groups+k2"], hevc_qps={8: [30, 38, 44, 50]}, clip_scales=[1.0, 1.6],
                jpeg_qualities=[10, 50, 90], webp_qualities=[10, 50, 90], rle_levels=[2, 4], zlib_bits=[4, 2],
                calib_images=128, decode_check=20,
                eval_images=limit if limit is not None else (500 if dataset == "fashion-mnist" else 64))


def detection_plan(quick: bool, limit: int | None = None) -> Plan:
    """Plans for detectors: a feature tensor is 10-100 times larger than a classifier's (e.g. 128x128x72 for
    CenterNet-MobileNetV3), so fewer views and calibration views (every photo gets the same number of views:
    ``limit`` is rounded up to a multiple of the number of photos, see ``lwfc_convert.detection.views``).
    Quick: one quantizer family, 17 views (one per photo) unless ``limit`` says otherwise."""
    if quick:
        return Plan(levels=[2, 4], kinds=["uniform"], clips=["mse"], contexts=["one", "groups", "groups+k2"],
                    hevc_qps={8: [30, 38, 44, 50]}, jpeg_qualities=[10, 50, 90], webp_qualities=[10, 50, 90],
                    rle_levels=[2, 4], zlib_bits=[4, 2], calib_images=17, decode_check=4,
                    eval_images=limit if limit is not None else 17)
    return Plan(levels=[2, 3, 4, 5, 6, 8], kinds=["uniform", "ecsq"], clips=["mse", "model"],
                contexts=["one", "groups", "groups+k2", "groups+k3"], hevc_qps={8: [22, 27, 32, 36, 40, 43, 46, 49]},
                # below quality 25 JPEG/WebP tiles keep a small fraction of the detections (measured: mAP 12-17%
                # at q10 on 8 views), and each quality costs about 0.2 s per view
                jpeg_qualities=[25, 50, 75, 95], webp_qualities=[25, 50, 75, 95],
                rle_levels=[2, 3, 4, 5, 6, 8], zlib_bits=[8, 4, 2], calib_images=34, decode_check=16,
                eval_images=limit if limit is not None else 120)


MIN_DETECTION_VIEWS = 100  # a full (not --quick) detector evaluation needs at least this many views


# ---- metrics -------------------------------------------------------------------------------------------------------
def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@dataclass
class ClassifierMetric:
    """Top-1 accuracy on labeled data; top-1 agreement with the uncompressed int8 pipeline (edge half +
    cloud half, no feature codec) and with the float model, on all views and on confident ones."""

    name: str = "classification"

    def primary(self, labeled: bool) -> str:
        return "accuracy" if labeled else "agreement"

    def __call__(self, outputs: np.ndarray, labels: np.ndarray, ref: dict[str, np.ndarray]) -> dict[str, float]:
        top1 = outputs.argmax(axis=1)
        res: dict[str, float] = {}
        if (labels >= 0).all():
            res["accuracy"] = float((top1 == labels).mean())
        ref_int8 = ref["int8"].argmax(axis=1)
        res["agreement"] = float((top1 == ref_int8).mean())
        conf = _softmax(ref["int8"]).max(axis=1) >= CONFIDENT
        res["agreement_confident"] = float((top1[conf] == ref_int8[conf]).mean()) if conf.any() else math.nan
        if "float" in ref:
            res["agreement_float"] = float((top1 == ref["float"].argmax(axis=1)).mean())
        return res


def _detection_metric() -> Any:
    from lwfc_convert.detection import DetectionMetric

    return DetectionMetric()


METRICS: dict[str, Callable[[], Any]] = {"classification": ClassifierMetric, "detection": _detection_metric}


def bundle_task(bundle: dict) -> str:
    """``"detection"`` for a detector bundle (cloud half outputs detection rows), else ``"classification"``:
    bundle.json's ``task`` (written by ``lwfc convert`` since detectors exist), or the zoo's list of detectors."""
    task = bundle.get("task")
    if task:
        return str(task)
    from lwfc_convert.detection import is_detector

    return "detection" if is_detector(bundle.get("model", "")) else "classification"


def resolve_metric(bundle: dict, metric: str) -> str:
    """The metric plug-in to use: ``auto`` picks the bundle's task; a metric that does not fit it is an error
    that says why."""
    task = bundle_task(bundle)
    if metric == "auto":
        return task
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; known: auto, {', '.join(METRICS)}")
    if metric != task:
        out = bundle.get("cloud", {}).get("output", {}).get("shape")
        what = ("detection rows (x1, y1, x2, y2, score, class) per image, not class logits" if task == "detection"
                else "class logits, not detection rows")
        raise ValueError(f"--metric {metric} does not fit bundle {bundle.get('model')!r}: it is a {task} model (its "
                         f"cloud half outputs {out}: {what}); use --metric {task} or --metric auto")
    return metric


# ---- edge outputs, cached -------------------------------------------------------------------------------------------
@dataclass
class EdgeData:
    """Int8 edge outputs (N, H, W, C) of the evaluation and calibration sets, and reference outputs."""

    q_eval: np.ndarray
    q_calib: np.ndarray
    labels: np.ndarray
    scale: float
    zero_point: int
    ref: dict[str, np.ndarray]  # "int8": cloud(int8 edge), "float": the float model (when its weights load)
    description: str
    seconds: float

    @property
    def labeled(self) -> bool:
        return bool((self.labels >= 0).all())

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        return (self.scale * (q.astype(np.float32) - self.zero_point)).astype(np.float32)


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def cache_key(bundle_dir: Path, dataset: str, eval_images: int | None, calib_images: int) -> str:
    h = hashlib.sha256()
    for name in ("edge.tflite", "cloud.onnx", "bundle.json"):
        h.update(_file_digest(bundle_dir / name).encode())
    h.update(json.dumps([dataset, eval_images, calib_images, 1]).encode())
    return h.hexdigest()[:16]


MAX_BATCH_ELEMENTS = 1 << 26  # 256 MB of float32 features per cloud call or baseline chunk


def batch_for(shape: tuple[int, ...], batch: int) -> int:
    """``batch`` capped so that one batch of tensors of ``shape`` (without N) holds at most MAX_BATCH_ELEMENTS."""
    return max(1, min(batch, MAX_BATCH_ELEMENTS // max(1, int(np.prod(shape)))))


def cloud_outputs(session: Any, feats: np.ndarray, batch: int = 256) -> np.ndarray:
    """The ONNX cloud half on NHWC float features, in batches (of at most MAX_BATCH_ELEMENTS elements);
    classifier logits ``[N, classes]`` or detection rows ``[N, K, 6]``."""
    batch = batch_for(feats.shape[1:], batch)
    outs = []
    for i in range(0, len(feats), batch):
        outs.append(session.run(None, {session.get_inputs()[0].name: np.ascontiguousarray(feats[i:i + batch],
                                                                                         dtype=np.float32)})[0])
    return np.concatenate(outs)


def make_session(path: Path, threads: int = 2) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def edge_data(bundle_dir: Path, bundle: dict, dataset: str, plan: Plan, cache_dir: Path, session: Any,
              progress: bool = True) -> EdgeData:
    """Run the int8 edge half on the calibration and evaluation images once; later calls read the cache."""
    key = cache_key(bundle_dir, dataset, plan.eval_images, plan.calib_images)
    path = cache_dir / f"edge_{bundle['model']}_{key}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as z:
            ref = {k[4:]: z[k] for k in z.files if k.startswith("ref_")}
            return EdgeData(z["q_eval"], z["q_calib"], z["labels"], float(z["scale"]), int(z["zero_point"]), ref,
                            str(z["description"]), 0.0)
    import torch
    from tqdm import tqdm

    from lwfc_convert.tflite_export import make_interpreter, run_tflite

    t0 = time.time()
    if bundle_task(bundle) == "detection":  # deterministic views of the darknet and bundled photos, labels -1
        from lwfc_convert.detection import detection_eval_data

        calib, ev, desc = detection_eval_data(bundle["model"], plan.calib_images, plan.eval_images, seed=0,
                                              progress=progress)
    else:
        from lwfc_convert.bundle import calibration_and_eval_data

        calib, ev, desc = calibration_and_eval_data(bundle["model"], plan.calib_images, plan.eval_images, seed=0,
                                                    progress=progress)
    interp = make_interpreter(bundle_dir / bundle["edge"]["file"])
    q_calib = np.concatenate([run_tflite(interp, x)[0] for x in tqdm(calib, desc="edge half (calibration)",
                                                                     disable=not progress, leave=False)])
    q_eval, labels, float_logits = [], [], []
    model = None
    try:  # the float model's own outputs, for agreement with it and its accuracy on exactly these images
        from lwfc_convert.zoo import load_model

        model = load_model(bundle["model"])
    except Exception as exc:  # weights not installed here: the float numbers then come from bundle.json
        desc += f"; float model not loaded ({type(exc).__name__}: {exc})"
    for x, y in tqdm(ev, desc="edge half (evaluation)", disable=not progress, leave=False):
        q_eval.append(run_tflite(interp, x)[0])
        labels.append(np.asarray(y))
        if model is not None:
            with torch.no_grad():
                float_logits.append(model(x).numpy())
    q_eval_a = np.concatenate(q_eval)
    scale, zp = bundle["feature"]["scale"], bundle["feature"]["zero_point"]
    deq = (scale * (q_eval_a.astype(np.float32) - zp)).astype(np.float32)
    ref = {"int8": cloud_outputs(session, deq)}
    if float_logits:
        ref["float"] = np.concatenate(float_logits)
    data = EdgeData(q_eval_a, q_calib, np.concatenate(labels).astype(np.int64), float(scale), int(zp), ref, desc,
                    time.time() - t0)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, q_eval=data.q_eval, q_calib=data.q_calib, labels=data.labels, scale=data.scale,
                        zero_point=data.zero_point, description=np.array(desc),
                        **{f"ref_{k}": v for k, v in ref.items()})
    tmp.replace(path)
    return data


# ---- points --------------------------------------------------------------------------------------------------------
@dataclass
class Point:
    """One rate point of one method, measured on every evaluation tensor."""

    method: str
    setting: str
    bits_per_element: float  # 8 x all bytes sent per tensor / elements, averaged over tensors
    metrics: dict[str, float]
    encode_ms: float
    decode_ms: float
    tensors: int
    bits_per_element_no_param_sets: float = math.nan  # HEVC: without the repeated VPS/SPS/PPS
    mse: float = math.nan
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


# ---- lwfc ------------------------------------------------------------------------------------------------------------
ECSQ_RATE_RATIO = 0.8
CONTEXTS = {"one": (1, 1), "groups": ("auto", 1), "groups+k2": ("auto", 2), "groups+k3": ("auto", 3),
            # one model per channel (G = min(C, 256)); contexts designed on held-out bits (context_design.py)
            "channel": (256, 1), "auto": ("auto", "auto")}


def scaled_clip(stats: Any, levels: int, clip_scale: float) -> Any:
    """The MSE clip range of an N-level uniform quantizer with its top scaled by ``clip_scale``
    (``clipping.scale_top``)."""
    from lwfc_host.design.clipping import choose_clip, scale_top
    from lwfc_host.design.table_design import zeros_of

    hist = stats.histogram()
    return scale_top(hist, choose_clip(hist, levels, "mse", zeros_of(stats)), clip_scale)


def lwfc_designs(stats: Any, kind: str, clip: Any, levels: int, contexts: list[str]) -> list[tuple[str, Any]]:
    """(context name, Design) for one quantizer: the quantizer is designed once, each context variant only
    changes the entropy models. ECSQ's lambda is chosen so that its one-model entropy is ``ECSQ_RATE_RATIO``
    times that of the uniform quantizer with the same levels and clip range. (At equal entropy, on int8
    edge outputs whose grid is coarse, ECSQ's thresholds snap back onto the uniform ones and its points
    would duplicate uniform's; at a lower rate it trades levels for rate, which is what it is for.)"""
    from lwfc_host.design.table_design import design_quantizer, equal_rate_ecsq, finish_design
    from lwfc_host.design.quantizers import evaluate

    q, choice = design_quantizer(stats, levels, "uniform", 0.0, clip)
    if kind == "ecsq":
        hist = stats.histogram()
        from lwfc_host.design.table_design import zeros_of

        target = ECSQ_RATE_RATIO * evaluate(q, hist, zeros_of(stats)).entropy
        q = equal_rate_ecsq(stats, levels, choice, target)
        if q is None:
            return []
    out = []
    for ctx in contexts:
        groups, classes = CONTEXTS[ctx]
        if classes != "auto" and classes * classes * q.levels > 256:
            continue
        out.append((ctx, finish_design(stats, q, choice, groups, classes)))
    return out


def lwfc_combos(plan: Plan) -> list[tuple[str, str, int, float]]:
    """(kind, clip, levels, clip scale) of every lwfc quantizer the plan asks for."""
    combos = [(k, cl, lv, 1.0) for k in plan.kinds for cl in plan.clips if cl != "sweep" for lv in plan.levels]
    if "sweep" in plan.clips:
        combos += [("uniform", "sweep", lv, sc) for lv in plan.levels for sc in plan.clip_scales]
    return combos


def lwfc_stats(data: EdgeData) -> Any:
    """Calibration statistics of the calibration edge outputs (what every lwfc design starts from)."""
    from lwfc_host.design.calibration import CalibrationStats

    cs = CalibrationStats()
    cs.add_int8(data.q_calib, data.scale, data.zero_point, where="calibration edge outputs")
    return cs.loaded()


def run_lwfc_combo(combo: tuple[str, str, int, float], stats: Any, data: EdgeData, session: Any, metric: Any,
                   plan: Plan) -> list[Point]:
    """The points of one quantizer: the cloud runs once on the decoded tensors of the first context variant;
    every variant's frames are all encoded (their sizes are the rate), the first is decoded in full and each
    other one on ``plan.decode_check`` tensors, checked to give the same indices."""
    from lwfc_host.codec.fast import FastEncoder
    from lwfc.tables import Tables
    from lwfc_host.codec.decoder import Decoder

    kind, clip, levels, clip_scale = combo
    n, h, w, c = data.q_eval.shape
    n_el = h * w * c
    points: list[Point] = []
    try:
        if clip == "sweep":
            designs = lwfc_designs(stats, kind, scaled_clip(stats, levels, clip_scale), levels, plan.contexts[-1:])
        else:
            designs = lwfc_designs(stats, kind, clip, levels, plan.contexts)
    except Exception as exc:  # a design that cannot exist (e.g. ECSQ emptying all cells) is reported
        return [Point(f"lwfc {kind} clip={clip}", f"{levels} levels", math.nan, {}, math.nan, math.nan, 0,
                      notes=f"design failed: {exc}")]
    first_metrics: dict[str, float] = {}
    first_mse = math.nan
    chunk = batch_for(data.q_eval.shape[1:], 256)  # decoded tensors are held a chunk at a time, not all
    for vi, (ctx, d) in enumerate(designs):
        tables = Tables(d.table)
        t0 = time.perf_counter()
        encoder = FastEncoder(tables)
        frames = [encoder.frame_int8(data.q_eval[i]) for i in range(n)]
        t_enc = time.perf_counter() - t0
        dec = Decoder(tables)
        lut = encoder.lut
        m = n if vi == 0 else min(n, plan.decode_check)
        t_dec = 0.0
        outputs, se = [], 0.0
        for i in range(0, m, chunk):
            t0 = time.perf_counter()
            decoded = [dec.decode(frames[j]) for j in range(i, min(m, i + chunk))]
            t_dec += time.perf_counter() - t0
            # every variant must decode to the encoder's indices (so all variants agree with each other)
            if not np.array_equal(np.stack([dd.indices for dd in decoded]),
                                  lut[data.q_eval[i:i + len(decoded)].astype(np.int64) + 128]):
                raise RuntimeError(f"lwfc {kind} {clip} {levels} {ctx}: decoded indices differ from the encoder's")
            if vi == 0:
                recon = np.concatenate([dd.tensor for dd in decoded])
                outputs.append(cloud_outputs(session, recon))
                se += float(np.sum((recon.astype(np.float64) - data.dequantize(data.q_eval[i:i + len(decoded)])) ** 2))
        if vi == 0:
            first_metrics = metric(np.concatenate(outputs), data.labels, data.ref)
            first_mse = se / data.q_eval.size
        nbytes = np.asarray([len(f) for f in frames], dtype=np.int64)
        q = d.quantizer
        setting = f"{q.levels} levels" + (f" lambda={q.lam:.3g}" if kind == "ecsq" else "") + \
            (f" clip x{clip_scale:g}" if clip == "sweep" else "")
        g = d.table["contexts"]["groups"]
        points.append(Point(
            f"lwfc {kind} clip={clip} ctx={ctx}", setting, float(8 * nbytes.mean() / n_el), dict(first_metrics),
            1000 * t_enc / n, 1000 * t_dec / m, n, mse=first_mse,
            notes=(f"G={g} K={d.classes}; decoded {m} of {n}" if vi else f"G={g} K={d.classes}"),
            extra={"clip_min": q.clip_min, "clip_max": q.clip_max, "groups": g, "classes": d.classes,
                   "levels": q.levels, "kind": kind, "design_bits": d.coded_bits_per_element,
                   "clip_scale": clip_scale, "table": d.table}))
    return points


# ---- running tasks on several cores ---------------------------------------------------------------------------------
class ProcessLocalSession:
    """An onnxruntime session opened lazily once per process: a session's thread pool does not survive a
    fork, so each worker process opens its own (``threads`` intra-op threads)."""

    def __init__(self, path: Path, threads: int = 1) -> None:
        self.path = Path(path)
        self.threads = threads
        self._pid = -1
        self._session: Any = None

    def _get(self) -> Any:
        if self._pid != os.getpid():
            self._session = make_session(self.path, self.threads)
            self._pid = os.getpid()
        return self._session

    def run(self, *args: Any, **kwargs: Any) -> Any:
        return self._get().run(*args, **kwargs)

    def get_inputs(self) -> Any:
        return self._get().get_inputs()


_TASKS: list[Callable[[], Any]] = []


def _run_task(i: int) -> tuple[Any, float]:
    t0 = time.time()
    return _TASKS[i](), time.time() - t0


def run_tasks(tasks: list[Callable[[], Any]], jobs: int = 1, desc: str = "", progress: bool = True
              ) -> list[tuple[Any, float]]:
    """(result, seconds) of each task, in order. With ``jobs`` > 1 the tasks run in that many forked worker
    processes (POSIX only), which inherit the evaluation data without copying; tasks are handed out one at a
    time, so long and short ones balance. Each worker is single-threaded work on its own core, so per-tensor
    timings stay comparable with ``jobs`` = 1 as long as ``jobs`` does not exceed the free cores."""
    import multiprocessing

    from tqdm import tqdm

    if jobs <= 1 or len(tasks) < 2:
        out = []
        for t in tqdm(tasks, desc=desc, disable=not progress):
            t0 = time.time()
            out.append((t(), time.time() - t0))
        return out
    global _TASKS
    _TASKS = tasks
    try:
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            return list(tqdm(pool.imap(_run_task, range(len(tasks)), chunksize=1), total=len(tasks), desc=desc,
                             disable=not progress))
    finally:
        _TASKS = []


# ---- baselines -----------------------------------------------------------------------------------------------------
def run_baseline(name: str, fn: Callable[[np.ndarray], Any], data: EdgeData, session: Any, metric: Any,
                 chunk: int = 500) -> Point:
    """Code the evaluation tensors in chunks with one baseline setting, run the cloud on the reconstructions."""
    n = len(data.q_eval)
    n_el = int(np.prod(data.q_eval.shape[1:]))
    chunk = batch_for(data.q_eval.shape[1:], chunk)
    nbytes, optional, outs = [], [], []
    t_enc = t_dec = 0.0
    se = 0.0
    setting = ""
    for i in range(0, n, chunk):
        x = data.dequantize(data.q_eval[i:i + chunk])  # a chunk at a time: 10,000 float tensors can be GBs
        b = fn(x)
        setting = b.setting
        nbytes.append(b.nbytes)
        optional.append(b.optional_bytes if b.optional_bytes.size else np.zeros(len(x), dtype=np.int64))
        t_enc += b.encode_seconds
        t_dec += b.decode_seconds
        se += float(np.sum((b.recon.astype(np.float64) - x) ** 2))
        outs.append(cloud_outputs(session, b.recon))
    nb = np.concatenate(nbytes)
    opt = np.concatenate(optional)
    return Point(name, setting, float(8 * nb.mean() / n_el), metric(np.concatenate(outs), data.labels, data.ref),
                 1000 * t_enc / n, 1000 * t_dec / n, n,
                 bits_per_element_no_param_sets=float(8 * (nb - opt).mean() / n_el) if opt.any() else math.nan,
                 mse=se / (n * n_el))


def baseline_jobs(plan: Plan, clip_of_levels: Callable[[int], tuple[float, float]]) -> list[tuple[str, Callable]]:
    from lwfc_host.evaluate import baselines as bl
    jobs: list[tuple[str, Callable]] = []
    for bits, qps in plan.hevc_qps.items():
        for qp in qps:
            jobs.append((f"hevc {bits}-bit", lambda x, qp=qp, bits=bits: bl.hevc(x, qp, bits)))
    for q in plan.jpeg_qualities:
        jobs.append(("jpeg tiles", lambda x, q=q: bl.image_tiles(x, q, "JPEG")))
    for q in plan.webp_qualities:
        jobs.append(("webp tiles", lambda x, q=q: bl.image_tiles(x, q, "WEBP")))
    for lv in plan.rle_levels:
        lo, hi = clip_of_levels(lv)
        jobs.append(("uniform+rle", lambda x, lv=lv, lo=lo, hi=hi: bl.rle(x, lv, lo, hi)))
    for bits in plan.zlib_bits:
        jobs.append(("uniform+zlib", lambda x, bits=bits: bl.zlib_codec(x, bits)))
    return jobs


# ---- the whole evaluation ------------------------------------------------------------------------------------------
@dataclass
class Evaluation:
    bundle: dict
    bundle_dir: str
    dataset: str
    plan: Plan
    points: list[Point]
    reference: dict[str, float]  # the float model and the uncompressed int8 pipeline on the same images
    primary: str
    shape: tuple[int, int, int]
    tensors: int
    description: str
    seconds: dict[str, float]
    hevc_single_process_ms: dict[str, float]
    edge_cache: str = ""
    command: str = ""
    metric: str = "classification"
    metric_description: str = ""
    method_seconds: dict[str, float] = field(default_factory=dict)  # per method, summed over the workers
    jobs: int = 1

    def to_json(self) -> dict:
        d = asdict(self)
        return d


def resolve_dataset(bundle: dict, dataset: str) -> str:
    ds = bundle.get("dataset", "fashion-mnist") if dataset == "auto" else dataset
    if ds not in ("fashion-mnist", "photos"):
        raise ValueError(f"unknown dataset {dataset!r}: fashion-mnist, photos or auto")
    if ds != bundle.get("dataset"):
        raise ValueError(f"bundle {bundle['model']} is evaluated on {bundle.get('dataset')}, not {ds}")
    return ds


def evaluate_bundle(bundle_dir: str | Path, dataset: str = "auto", limit: int | None = None, quick: bool = False,
                    cache_dir: str | Path = DEFAULT_CACHE, metric: str = "auto",
                    methods: Iterable[str] | None = None, progress: bool = True,
                    overrides: dict[str, list] | None = None, jobs: int = 1) -> Evaluation:
    """Run every method of the plan on the bundle's evaluation set. ``overrides`` replaces plan lists
    (e.g. ``{"levels": [2, 3, 4], "contexts": ["one", "groups+k2"]}``). ``metric`` ``auto``: mAP@0.5 for
    detectors, accuracy/agreement for classifiers. ``jobs``: worker processes for the lwfc quantizers and
    baseline settings (``run_tasks``); the edge half runs once, before them."""
    from lwfc_convert.bundle import read_bundle

    bundle_dir = Path(bundle_dir)
    bundle = read_bundle(bundle_dir)
    ds = resolve_dataset(bundle, dataset)
    metric = resolve_metric(bundle, metric)
    detector = bundle_task(bundle) == "detection"
    if detector:
        plan = detection_plan(quick, limit)
    else:
        plan = quick_plan(limit, ds) if quick else full_plan(limit, ds)
    for k, v in (overrides or {}).items():
        if not hasattr(plan, k):
            raise ValueError(f"unknown plan field {k!r}")
        setattr(plan, k, v)
    unknown = [c for c in plan.contexts if c not in CONTEXTS]
    if unknown:
        raise ValueError(f"unknown contexts {unknown}; known: {', '.join(CONTEXTS)}")
    if detector and (plan.eval_images or 0) < MIN_DETECTION_VIEWS and not quick:
        raise ValueError(f"the detector evaluation needs at least {MIN_DETECTION_VIEWS} views (--limit), or --quick")
    elif not detector and ds == "photos" and (plan.eval_images or 0) < 300 and not quick:
        raise ValueError("the photo evaluation needs at least 300 views")
    methods = set(methods or ["lwfc", "hevc", "jpeg", "webp", "rle", "zlib"])
    session = make_session(bundle_dir / bundle["cloud"]["file"])
    met = METRICS[metric]()
    seconds: dict[str, float] = {}
    t0 = time.time()
    data = edge_data(bundle_dir, bundle, ds, plan, Path(cache_dir), session, progress)
    key = cache_key(bundle_dir, ds, plan.eval_images, plan.calib_images)
    edge_cache = str(Path(cache_dir) / f"edge_{bundle['model']}_{key}.npz")
    seconds["edge_outputs"] = time.time() - t0
    reference: dict[str, float] = {}
    for k, v in met(data.ref["int8"], data.labels, data.ref).items():
        reference[f"int8 {k}"] = v
    if "float" in data.ref:
        for k, v in met(data.ref["float"], data.labels, data.ref).items():
            reference[f"float {k}"] = v
    elif data.labeled and "float_accuracy" in bundle.get("accuracy", {}):
        reference["float accuracy"] = float(bundle["accuracy"]["float_accuracy"])  # whole test set (bundle.json)
    from lwfc_host.design.table_design import design_quantizer

    stats = lwfc_stats(data)

    def clip_of_levels(lv: int) -> tuple[float, float]:
        # RLE uses the MSE clip ranges of lwfc's uniform quantizers (the same quantizer, another entropy coder)
        q, _ = design_quantizer(stats, lv, "uniform", 0.0, "mse")
        return float(q.clip_min), float(q.clip_max)

    task_session = session if jobs <= 1 else ProcessLocalSession(bundle_dir / bundle["cloud"]["file"])
    tasks: list[Callable[[], Any]] = []
    kinds: list[str] = []
    if "lwfc" in methods:
        for combo in lwfc_combos(plan):
            tasks.append(lambda combo=combo: run_lwfc_combo(combo, stats, data, task_session, met, plan))
            kinds.append("lwfc")
    for name, fn in baseline_jobs(plan, clip_of_levels):
        if name.split()[0].split("+")[-1] in methods:
            tasks.append(lambda name=name, fn=fn: [run_baseline(name, fn, data, task_session, met)])
            kinds.append(name.split()[0])
    t0 = time.time()
    points: list[Point] = []
    method_seconds: dict[str, float] = {}
    for kind, (pts, secs) in zip(kinds, run_tasks(tasks, jobs, "lwfc and baselines", progress)):
        points += pts
        method_seconds[kind] = method_seconds.get(kind, 0.0) + secs
    seconds["methods"] = time.time() - t0
    hevc_single: dict[str, float] = {}
    if "hevc" in methods and plan.hevc_qps:
        from lwfc_host.evaluate.baselines import hevc_single_process_ms

        qp = plan.hevc_qps[8][len(plan.hevc_qps[8]) // 2]
        e, d = hevc_single_process_ms(data.dequantize(data.q_eval[:1]), qp, 8)
        hevc_single = {"qp": qp, "encode_ms": e, "decode_ms": d}
    n, h, w, c = data.q_eval.shape
    return Evaluation(bundle, str(bundle_dir), ds, plan, points, reference, met.primary(data.labeled), (h, w, c), n,
                      data.description, seconds, hevc_single, edge_cache, metric=metric,
                      metric_description=met.describe() if hasattr(met, "describe") else "",
                      method_seconds=method_seconds, jobs=jobs)
