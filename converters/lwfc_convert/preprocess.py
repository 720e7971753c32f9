"""Preprocessing described by a small JSON-able dict, so that bundle.json can state exactly what an
edge device must do to a picture before the int8 input quantization.

Kinds:
- ``grey``: uint8 N x H x W (or N x H x W x C, averaged) -> N x 1 x size x size, ``(x/255 - mean)/std``.
- ``rgb``: uint8 H x W x 3 images -> resize shorter side to ``resize``, centre-crop ``size``,
  ``(x/255 - mean)/std`` per channel, channel order ``order`` ("RGB" or "BGR").
- ``caffe``: like ``rgb`` but on the 0..255 scale: ``x - mean`` in ``order`` (Caffe models, BGR).
- ``grey_to_rgb``: grey uint8 N x H x W -> resized to ``size`` (bilinear), replicated to 3 channels,
  then like ``rgb`` (used to feed Fashion-MNIST to an ImageNet backbone).

:func:`exact_int8_input` says when the int8 input of an edge half can hold the preprocessed pixels exactly.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from lwfc.images import resize_crop


def _resize_crop(img: np.ndarray, resize: int, size: int) -> np.ndarray:
    """Resize the shorter side to ``resize`` (bicubic, PIL) and centre-crop ``size`` x ``size``: the device
    runner's own rule (``lwfc.images``), so that calibration sees exactly what a board feeds the edge half."""
    return np.asarray(resize_crop(img, resize, size))


def exact_int8_input(spec: dict[str, Any]) -> tuple[float, int] | None:
    """The int8 input quantization (scale, zero point) that represents every image preprocessed by
    ``spec`` exactly, or None if there is none.

    ``rgb`` and ``caffe`` preprocessing feed whole pixel values p in 0..255 (resizing works on uint8) through
    x = (p - M) / D per channel (M = 255 mean, D = 255 std for ``rgb``; M = mean, D = std or 1 for
    ``caffe``). When all channels share M and D and M - 128 is an integer, the int8 value q = p - 128 with
    scale 1/D and zero point M - 128 is that x exactly: the input costs no rounding at all. A calibrated
    scale instead puts most pixels between two int8 steps (e.g. x = (p - 127.5)/127.5 falls exactly halfway
    between the steps of scale 2/255), noise that the first layers amplify. ``grey`` with its fractional
    Fashion-MNIST mean, and resampled ``grey_to_rgb`` images, have no such grid."""
    kind = spec.get("kind")
    if kind not in ("rgb", "caffe"):
        return None
    unit = 255.0 if kind == "rgb" else 1.0
    means = {round(float(m) * unit, 6) for m in spec["mean"]}
    stds = {round(float(d) * unit, 6) for d in spec.get("std", [1.0, 1.0, 1.0])}
    if len(means) != 1 or len(stds) != 1:
        return None
    offset, step = means.pop(), stds.pop()
    zero_point = offset - 128.0
    if step <= 0 or zero_point != round(zero_point) or not -128 <= zero_point <= 127:
        return None
    return 1.0 / step, int(zero_point)


def make_preprocess(spec: dict[str, Any]) -> Callable[[Any], Any]:
    """Return a function mapping a batch of uint8 images (array or list) to a float NCHW torch tensor."""
    import torch

    kind = spec["kind"]
    size = int(spec["size"])

    if kind == "grey":
        mean, std = float(spec["mean"]), float(spec["std"])

        def grey(images: Any) -> torch.Tensor:
            x = np.asarray(images, dtype=np.float32)
            if x.ndim == 4:
                x = x.mean(axis=3)
            x = torch.from_numpy(x)[:, None] / 255.0
            if x.shape[-1] != size or x.shape[-2] != size:
                x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
            return (x - mean) / std

        return grey

    if kind == "grey_to_rgb":
        mean = torch.tensor(spec["mean"], dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(spec["std"], dtype=torch.float32).view(1, 3, 1, 1)

        def grey_to_rgb(images: Any) -> torch.Tensor:
            x = torch.from_numpy(np.asarray(images, dtype=np.float32))[:, None] / 255.0
            x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
            return (x.expand(-1, 3, -1, -1) - mean) / std

        return grey_to_rgb

    if kind in ("rgb", "caffe"):
        resize = int(spec.get("resize", size))
        mean = np.asarray(spec["mean"], dtype=np.float32)
        std = np.asarray(spec.get("std", [1.0, 1.0, 1.0]), dtype=np.float32)
        bgr = spec.get("order", "RGB") == "BGR"
        scale = 1.0 if kind == "caffe" else 1.0 / 255.0

        def rgb(images: Sequence[np.ndarray]) -> torch.Tensor:
            out = []
            for img in images:
                img = np.asarray(img)
                if img.ndim == 2:
                    img = np.repeat(img[:, :, None], 3, axis=2)
                arr = _resize_crop(img[:, :, :3], resize, size).astype(np.float32) * scale
                if bgr:
                    arr = arr[:, :, ::-1]
                out.append((arr - mean) / std)
            return torch.from_numpy(np.ascontiguousarray(np.stack(out).transpose(0, 3, 1, 2)))

        return rgb

    raise ValueError(f"unknown preprocessing kind {kind!r}")
