"""The edge half's outputs, computed once per bundle and data set and cached in an .npz.

Every method of an evaluation codes the same int8 edge outputs (N, H, W, C) of the evaluation set, and the
lwfc designs start from those of a disjoint calibration set. Computing them runs the int8 TFLite edge half on
every image (and the float model, for the reference outputs), which is the slow part of a run; the cache is
keyed by the bundle's files and the image counts, so any change to the bundle or the set recomputes it. It is
computed in a child process, so that the memory those models leave behind is not the evaluation's.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lwfc.bundle import CLOUD_FILE, EDGE_FILE, INFO_FILE, Bundle
from lwfc_convert.cloud_runtime import RUN_ELEMENTS, batch_for, cloud_outputs
from lwfc_host.evaluate.metrics import bundle_task
from lwfc_host.evaluate.plans import Plan
from lwfc_host.evaluate.pool import START_METHOD

CACHE_VERSION = 1  # bump when the cached arrays change meaning
# Intra-op threads of a cloud-half session in the evaluating process (its outputs do not depend on them); each
# worker process (--jobs) uses one.
SESSION_THREADS = 2


@dataclass
class EdgeData:
    """Int8 edge outputs (N, H, W, C) of the evaluation and calibration sets, and reference outputs."""

    q_eval: np.ndarray
    q_calib: np.ndarray
    labels: np.ndarray
    scale: float
    zero_point: int
    # "int8": cloud(int8 edge); "float": the float model (when its weights load); "original float": the model it
    # was fine-tuned from (ModelSpec.fine_tuned_from)
    ref: dict[str, np.ndarray]
    description: str
    seconds: float

    @property
    def labeled(self) -> bool:
        return bool((self.labels >= 0).all())

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        """Float features of int8 edge outputs (what the cloud half takes)."""
        return (self.scale * (q.astype(np.float32) - self.zero_point)).astype(np.float32)

    def cloud(self, session: Any, q: np.ndarray) -> np.ndarray:
        """The cloud half's outputs on int8 edge outputs ``q``, dequantized one run of the cloud half at a time
        (the float features of every view at once can be GBs)."""
        step = batch_for(q.shape[1:], len(q), RUN_ELEMENTS)
        return np.concatenate([cloud_outputs(session, self.dequantize(q[i:i + step])) for i in range(0, len(q), step)])


def _file_digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def cache_key(bundle: Bundle, dataset: str, eval_images: int | None, calib_images: int) -> str:
    """16 hex digits naming the edge outputs of ``bundle`` on this data set with these image counts."""
    h = hashlib.sha256()
    for name in (EDGE_FILE, CLOUD_FILE, INFO_FILE):
        h.update(_file_digest(bundle.path(name)).encode())
    h.update(json.dumps([dataset, eval_images, calib_images, CACHE_VERSION]).encode())
    return h.hexdigest()[:16]


def cache_path(bundle: Bundle, dataset: str, plan: Plan, cache_dir: str | Path) -> Path:
    """Where the edge outputs of ``bundle`` for ``plan``'s image counts are cached."""
    key = cache_key(bundle, dataset, plan.eval_images, plan.calib_images)
    return Path(cache_dir) / f"edge_{bundle.model}_{key}.npz"


def load_edge_data(path: str | Path) -> EdgeData:
    """The edge outputs saved by :func:`edge_data` (``seconds`` is 0: nothing was computed)."""
    with np.load(path, allow_pickle=False) as z:
        ref = {k[4:]: z[k] for k in z.files if k.startswith("ref_")}
        return EdgeData(z["q_eval"], z["q_calib"], z["labels"], float(z["scale"]), int(z["zero_point"]), ref,
                        str(z["description"]), 0.0)


def _save(data: EdgeData, path: Path) -> None:
    """Write the cache atomically (a temporary file renamed), so that a killed run leaves no half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, q_eval=data.q_eval, q_calib=data.q_calib, labels=data.labels, scale=data.scale,
                        zero_point=data.zero_point, description=np.array(data.description),
                        **{f"ref_{k}": v for k, v in data.ref.items()})
    tmp.replace(path)


def _images(bundle: Bundle, plan: Plan, progress: bool) -> tuple[Any, Any, str]:
    """(calibration images, evaluation (images, labels) batches, description) of the bundle's data set."""
    if bundle_task(bundle.info) == "detection":  # deterministic views of the darknet and bundled photos, labels -1
        from lwfc_convert.detection import detection_eval_data

        return detection_eval_data(bundle.model, plan.calib_images, plan.eval_images, seed=0, progress=progress)
    from lwfc_convert.bundle import calibration_and_eval_data

    return calibration_and_eval_data(bundle.model, plan.calib_images, plan.eval_images, seed=0, progress=progress)


def _float_model(name: str) -> tuple[Any, str]:
    """The float zoo model ``name`` (its own outputs give agreement with it and its accuracy on exactly these
    images), or None and why not: where its weights are not installed, the float numbers come from
    bundle.json."""
    try:
        from lwfc_convert.zoo import load_model

        return load_model(name), ""
    except Exception as exc:
        return None, f"; float model {name} not loaded ({type(exc).__name__}: {exc})"


def _original_name(bundle: Bundle) -> str | None:
    """The zoo model the bundle's model was fine-tuned from, if any (``ModelSpec.fine_tuned_from``)."""
    try:
        from lwfc_convert.zoo import get_spec

        return get_spec(bundle.model).fine_tuned_from
    except (ImportError, KeyError):  # no converters installed, or a model the zoo does not know: no origin
        return None


def _compute(bundle: Bundle, plan: Plan, session: Any, progress: bool) -> EdgeData:
    """Run the int8 edge half (and the float model, where it loads) on the calibration and evaluation images."""
    import torch
    from tqdm import tqdm

    from lwfc.edge import make_interpreter
    from lwfc_convert.tflite_export import run_tflite

    t0 = time.time()
    calib, ev, desc = _images(bundle, plan, progress)
    interp = make_interpreter(bundle.edge_path)
    q_calib = np.concatenate([run_tflite(interp, x)[0] for x in tqdm(calib, desc="edge half (calibration)",
                                                                     disable=not progress, leave=False)])
    model, why_not = _float_model(bundle.model)
    original_name = _original_name(bundle)
    original, why_not_original = _float_model(original_name) if original_name else (None, "")
    q_eval, labels, float_logits, original_logits = [], [], [], []
    for x, y in tqdm(ev, desc="edge half (evaluation)", disable=not progress, leave=False):
        q_eval.append(run_tflite(interp, x)[0])
        labels.append(np.asarray(y))
        with torch.no_grad():
            if model is not None:
                float_logits.append(model(x).numpy())
            if original is not None:
                original_logits.append(original(x).numpy())
    feature = bundle.info["feature"]
    data = EdgeData(np.concatenate(q_eval), q_calib, np.concatenate(labels).astype(np.int64),
                    float(feature["scale"]), int(feature["zero_point"]), {}, desc + why_not + why_not_original,
                    0.0)
    data.ref["int8"] = data.cloud(session, data.q_eval)
    if float_logits:
        data.ref["float"] = np.concatenate(float_logits)
    if original_logits:
        data.ref["original float"] = np.concatenate(original_logits)
    data.seconds = time.time() - t0
    return data


def _compute_to_cache(bundle_dir: str, plan: Plan, path: str, progress: bool) -> None:
    """Compute the edge outputs of ``plan``'s images and write them to ``path`` (what the child process of
    :func:`edge_data` runs)."""
    from lwfc.bundle import load_bundle
    from lwfc_convert.cloud_runtime import onnx_session

    bundle = load_bundle(bundle_dir)
    _save(_compute(bundle, plan, onnx_session(bundle.cloud_path, threads=SESSION_THREADS), progress), Path(path))


def edge_data(bundle: Bundle, dataset: str, plan: Plan, cache_dir: str | Path, progress: bool = True) -> EdgeData:
    """The edge outputs of ``plan``'s calibration and evaluation images, read from the cache; on the first call
    computed into it by a child process. (The TFLite edge half, the float model and torch leave about 1.5 GB
    behind in the process that ran them, freed but kept by the allocator; the evaluation that follows needs as
    much again. The arrays come back the same through the .npz, which stores them exactly.)"""
    path = cache_path(bundle, dataset, plan, cache_dir)
    if not path.exists():
        with multiprocessing.get_context(START_METHOD).Pool(1) as pool:  # its exceptions are raised here
            pool.apply(_compute_to_cache, (str(bundle.directory), plan, str(path), progress))
    return load_edge_data(path)
