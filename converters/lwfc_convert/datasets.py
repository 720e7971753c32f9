"""Offline data sets: Fashion-MNIST (Debian ``dataset-fashion-mnist``) and natural photos bundled with
scikit-image, matplotlib and scikit-learn.

Every loader is an iterable of ``(images, labels)`` batches: ``images`` is a float NCHW tensor already
preprocessed for a given model (see :mod:`lwfc_convert.preprocess`), ``labels`` an int64 tensor (-1 for
unlabeled photos). Iteration shows a tqdm progress bar unless ``progress=False``.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

FMNIST_DIRS = [
    os.environ.get("LWFC_FMNIST_DIR", ""),
    "/usr/share/datasets/fashion-mnist",
]
_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class DatasetMissing(FileNotFoundError):
    """A data set is not installed on this machine (the message says how to install it)."""


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) into a numpy array of its declared shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4:
        raise ValueError(f"{path}: not an IDX file (too short)")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path}: truncated IDX file ({body.size} of {int(np.prod(dims))} bytes)")
    return body.reshape(dims)


def _find_fmnist_file(stem: str) -> Path:
    for d in FMNIST_DIRS:
        if not d:
            continue
        for name in (stem + ".gz", stem):
            p = Path(d) / name
            if p.exists():
                return p
    raise DatasetMissing(
        f"Fashion-MNIST file {stem} not found in {[d for d in FMNIST_DIRS if d]}; "
        "install it with `apt-get install dataset-fashion-mnist` or set LWFC_FMNIST_DIR"
    )


def load_fashion_mnist_arrays(split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """Return (images uint8 N x 28 x 28, labels int64 N) of the Fashion-MNIST ``train`` or ``test`` split."""
    if split not in _FMNIST_FILES:
        raise ValueError(f"unknown Fashion-MNIST split {split!r}: use 'train' or 'test'")
    img_stem, lab_stem = _FMNIST_FILES[split]
    images = read_idx(_find_fmnist_file(img_stem))
    labels = read_idx(_find_fmnist_file(lab_stem)).astype(np.int64)
    return images, labels


class BatchIterable:
    """Re-iterable batches of preprocessed images: ``for x, y in loader: ...``."""

    def __init__(
        self,
        images: Any,
        labels: np.ndarray,
        preprocess: Callable[[Any], Any],
        batch_size: int = 256,
        desc: str = "images",
        progress: bool = True,
    ) -> None:
        self.images = images
        self.labels = labels
        self.preprocess = preprocess
        self.batch_size = batch_size
        self.desc = desc
        self.progress = progress

    def __len__(self) -> int:
        return (len(self.labels) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        import torch
        from tqdm import tqdm

        n = len(self.labels)
        with tqdm(total=n, desc=self.desc, unit="img", disable=not self.progress, leave=False) as bar:
            for start in range(0, n, self.batch_size):
                stop = min(n, start + self.batch_size)
                x = self.preprocess(self.images[start:stop])
                y = torch.as_tensor(self.labels[start:stop], dtype=torch.int64)
                bar.update(stop - start)
                yield x, y


def fashion_mnist(
    split: str = "test",
    preprocess: Callable[[Any], Any] | None = None,
    batch_size: int = 256,
    limit: int | None = None,
    start: int = 0,
    progress: bool = True,
) -> BatchIterable:
    """Fashion-MNIST as batches. ``preprocess`` maps uint8 N x 28 x 28 to a model's input tensor
    (default: the ResNet's normalization); ``start``/``limit`` select a contiguous slice."""
    images, labels = load_fashion_mnist_arrays(split)
    stop = len(labels) if limit is None else min(len(labels), start + limit)
    if preprocess is None:
        from .preprocess import make_preprocess

        preprocess = make_preprocess({"kind": "grey", "size": 28, "mean": 0.2860, "std": 0.3530})
    return BatchIterable(
        images[start:stop], labels[start:stop], preprocess, batch_size, f"fashion-mnist {split}", progress
    )


def photo_paths() -> dict[str, Path]:
    """Natural photos shipped inside installed packages (name -> path); missing packages are skipped."""
    found: dict[str, Path] = {}
    try:
        import skimage

        d = Path(skimage.__file__).parent / "data"
        for name in ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
                     "hubble_deep_field.jpg", "immunohistochemistry.png", "camera.png"):
            if (d / name).exists():
                found["skimage/" + name.rsplit(".", 1)[0]] = d / name
    except ImportError:
        pass
    try:
        import matplotlib

        p = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
        if p.exists():
            found["matplotlib/grace_hopper"] = p
    except ImportError:
        pass
    try:
        import sklearn

        d = Path(sklearn.__file__).parent / "datasets" / "images"
        for name in ("china.jpg", "flower.jpg"):
            if (d / name).exists():
                found["sklearn/" + name.rsplit(".", 1)[0]] = d / name
    except ImportError:
        pass
    return found


def load_photo(path: str | Path) -> np.ndarray:
    """Read a photo as uint8 H x W x 3 RGB (grey images are replicated to 3 channels)."""
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"))
    return arr


def photos(
    preprocess: Callable[[Any], Any],
    names: list[str] | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> BatchIterable:
    """The bundled natural photos (unlabeled: label -1), preprocessed for one model. ``names`` limits
    them to a subset of :func:`photo_paths` keys; the order of the batches follows ``names``."""
    paths = photo_paths()
    if names is None:
        names = sorted(paths)
    missing = [n for n in names if n not in paths]
    if missing:
        raise DatasetMissing(f"photos not installed: {missing}; available: {sorted(paths)}")
    images = [load_photo(paths[n]) for n in names]
    labels = np.full(len(images), -1, dtype=np.int64)
    return BatchIterable(images, labels, preprocess, batch_size, "photos", progress)
