"""The demo's parts, made once and cached: the EfficientNet-Lite0 bundle, the photos and the bundle's tables.

``lwfc demo``, the server benchmark (``python -m lwfc_host.serve.bench``) and the end-to-end tests run on
them. The cache is ``$LWFC_CACHE`` (by default ``~/.cache/lwfc``): ``bundles/<model>`` and ``photos``.
Each part is made under a lock, so concurrent runs make it once.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np

from lwfc.bundle import CLOUD_FILE, EDGE_FILE, INFO_FILE, load_bundle
from lwfc.errors import BundleError
from lwfc_convert.cache import cache_lock, cache_root

DEFAULT_MODEL = "efficientnet_lite0"
Log = Callable[[str], None]


class DemoError(Exception):
    """The demo cannot run (missing model packages, a failed conversion, ...)."""


def bundle_complete(path: Path) -> bool:
    """Whether ``path`` holds a converted bundle (bundle.json, the edge and the cloud half)."""
    return all((path / f).exists() for f in (INFO_FILE, EDGE_FILE, CLOUD_FILE))


# The demo's bundle gets a short QAT fine-tuning (`lwfc convert` does 16 epochs): 16 epochs over 64 views at
# 224 px would add about four minutes to the first run on 2 cores, for a few tenths of a percent of int8 error.
DEMO_QAT_EPOCHS = 4


def _check_model(out: Path, model: str) -> None:
    """Refuse a directory that holds a bundle of another model: it must neither stand in silently for the
    model asked for nor be replaced by a conversion."""
    if not (out / INFO_FILE).exists():
        return
    try:
        have = load_bundle(out).model
    except BundleError as exc:
        raise DemoError(f"{out} is not a usable bundle directory: {exc}") from exc
    if have != model:
        raise DemoError(f"{out} holds a bundle of {have!r}, not {model!r}: pass --model {have} or another --bundle")


def ensure_bundle(model: str = DEFAULT_MODEL, bundle_dir: Path | None = None, calib_images: int = 64,
                  log: Log = print, qat_epochs: int = DEMO_QAT_EPOCHS) -> Path:
    """The bundle directory for ``model``: reused when complete, else converted (minutes, once)."""
    out = bundle_dir or cache_root() / "bundles" / model
    with cache_lock(out.with_name(out.name + ".lock")):
        return _ensure_bundle(model, out, calib_images, log, qat_epochs)


def _ensure_bundle(model: str, out: Path, calib_images: int, log: Log, qat_epochs: int) -> Path:
    _check_model(out, model)
    if bundle_complete(out):
        log(f"bundle: reusing {out}")
        return out
    log(f"bundle: converting {model} into {out} (int8 TFLite edge half, ONNX cloud half; a few minutes, once)")
    try:
        from lwfc_convert.bundle import convert
    except ImportError as exc:
        raise DemoError(f"the converter needs the convert extra (pip install -e '.[convert]'): {exc}") from exc
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.time()
    convert(model, None, tmp, calib_images=calib_images, eval_images=16, progress=False, qat_epochs=qat_epochs)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # only a complete bundle gets the cached name
    log(f"bundle: converted in {time.time() - t0:.0f} s")
    return out


def photo_dir() -> Path:
    """Where the demo's photos are cached (``photo_files`` fills it)."""
    return cache_root() / "photos"


def photo_files(dest: Path) -> list[Path]:
    """The photos shipped in installed packages (lwfc_convert.datasets), written as PNG files into ``dest``."""
    from PIL import Image

    from lwfc_convert.datasets import load_photo, photo_paths

    paths = photo_paths()
    if not paths:
        raise DemoError("no photos found: install scikit-image, matplotlib or scikit-learn (they ship the photos)")
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for name, path in sorted(paths.items()):
        f = dest / (name.replace("/", "_") + ".png")
        if not f.exists():
            Image.fromarray(load_photo(path)).save(f)
        out.append(f)
    return out


def calibration_crops(photos: list[Path], n: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` random square crops (with flips) of the photos, uint8 RGB."""
    from lwfc.images import load_image

    rng = np.random.default_rng(seed)
    imgs = [load_image(str(p)) for p in photos]
    crops = []
    for k in range(n):
        img = imgs[k % len(imgs)]
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        h, w = img.shape[:2]
        s = int(min(h, w) * rng.uniform(0.5, 1.0))
        top, left = rng.integers(0, h - s + 1), rng.integers(0, w - s + 1)
        crop = img[top:top + s, left:left + s]
        crops.append(np.ascontiguousarray(crop[:, ::-1] if rng.random() < 0.5 else crop))
    return crops


# The demo's table: task-aware (task_design.py) on the bundle's calibration images, with designed contexts.
# A cached tables.json made otherwise (an older demo) is designed again once. Tolerance: top-1 agreement
# with the uncompressed pipeline on held-out calibration images at least 1 - DEMO_TOLERANCE.
DEMO_DESIGN = "task-aware v1"
DEMO_TOLERANCE = 0.05
DEMO_TASK_IMAGES = 128


def ensure_tables(bundle: Path, photos: list[Path], levels: int = 4, classes: int | str = "auto", calib: int = 48,
                  log: Log = print, objective: str = "accuracy") -> Path:
    """The bundle's tables.json, unless already there (and made by this demo design): with ``objective``
    'accuracy' the task-aware choice of levels, clip range and quantizer (``task_design``) with automatic
    context models; with 'mse' (or when the task design cannot run) a uniform ``levels``-level quantizer, MSE
    clip, automatic channel groups and contexts designed on int8 features of random crops of the photos."""
    with cache_lock(bundle.with_name(bundle.name + ".lock")):
        return _ensure_tables(bundle, photos, levels, classes, calib, log, objective)


def _ensure_tables(bundle: Path, photos: list[Path], levels: int, classes: int | str, calib: int, log: Log,
                   objective: str = "accuracy") -> Path:
    path = Path(load_bundle(bundle).tables_path)
    made_by = f"{DEMO_DESIGN} {objective}"
    if _made_by(path) == made_by:
        log(f"tables: reusing {path}")
        return path
    if objective == "accuracy" and _task_aware_tables(bundle, path, classes, made_by, log):
        return path
    _mse_tables(bundle, path, photos, levels, classes, calib, made_by, log)
    return path


def _made_by(tables: Path) -> str | None:
    """The demo design recorded in a table file (None: no file, or not made by the demo)."""
    if not tables.exists():
        return None
    try:
        return json.loads(tables.read_text()).get("design", {}).get("demo")
    except ValueError:
        return None


def _task_aware_tables(bundle: Path, path: Path, classes: int | str, made_by: str, log: Log) -> bool:
    """Write the task-aware design to ``path``; False (logged) when it cannot run."""
    from lwfc_host.design.tablefile import write_tables
    from lwfc_host.design.task_design import task_design

    t0 = time.time()
    try:
        td = task_design(bundle, images=DEMO_TASK_IMAGES, tolerance=DEMO_TOLERANCE, levels=(3, 4, 5, 6, 8),
                         clip_scales=(0.85, 1.0, 1.2), lambdas=(0.01,), classes=classes)
    except Exception as exc:  # e.g. the converter's data sets are missing: fall back to the MSE design
        log(f"tables: task-aware design failed ({type(exc).__name__}: {exc}); designing for MSE")
        return False
    td.design.table["design"]["demo"] = made_by
    write_tables(td.design.table, path)
    c = td.chosen
    log(f"tables: task-aware design: {c.levels} levels {c.kind}, clip x{c.clip_scale:g}, agreement "
        f"{c.agreement:.3f} on {td.reference_tensors} held-out calibration images, {c.coded_bits:.3f} "
        f"bits/element, G={c.groups} K={c.classes} ({len(td.candidates)} candidates, "
        f"{time.time() - t0:.0f} s): {path}")
    return True


def _mse_tables(bundle: Path, path: Path, photos: list[Path], levels: int, classes: int | str, calib: int,
                made_by: str, log: Log) -> None:
    """Write a uniform, MSE-clipped design on int8 features of random crops of the photos to ``path``."""
    from lwfc.edge import EdgeModel
    from lwfc.images import preprocess
    from lwfc_host.design import table_design as dz
    from lwfc_host.design.calibration import CalibrationStats
    from lwfc_host.design.tablefile import write_tables

    b = load_bundle(bundle)
    edge = EdgeModel(b.edge_path)
    stats = CalibrationStats(reservoir=16)
    t0 = time.time()
    for crop in calibration_crops(photos, calib):
        q = edge.run(preprocess(crop, b.preprocessing))
        stats.add_int8(q[None], float(edge.out_scale), int(edge.out_zp))
    d = dz.design(stats.loaded(), levels, "uniform", 0.0, "mse", "auto", classes,
                  float(edge.out_scale), int(edge.out_zp))
    d.table["design"]["demo"] = made_by
    write_tables(d.table, path)
    log(f"tables: designed {levels} levels, {d.table['contexts']['groups']} channel groups, {classes} neighbour "
        f"classes on {calib} crops in {time.time() - t0:.1f} s: {path}")
