"""Pictures on a board: finding and reading image files, and the preprocessing bundle.json prescribes.

CPython only: numpy and Pillow, imported inside the functions, so ``import lwfc.images`` needs only the
standard library. No torch: ``lwfc_convert.preprocess`` builds on :func:`resize_crop`, so the converters
calibrate on exactly the pixels a board feeds the edge half. The preprocessing kinds are described in
``lwfc_convert.preprocess`` (grey, grey_to_rgb, rgb, caffe).
"""

import os

from .errors import BundleError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".pgm", ".ppm", ".gif", ".webp", ".tif", ".tiff")


class ImageError(Exception):
    """An image file or directory that cannot be read (or holds no images)."""


def load_image(path):
    """A uint8 H x W (grey) or H x W x 3 (RGB) array from an image file, or the array in a ``.npy`` file."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    if path.endswith(".npy"):
        return np.load(path)
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "RGB"):
                im = im.convert("RGB")
            return np.asarray(im)
    except (OSError, UnidentifiedImageError) as exc:
        raise ImageError("cannot read image %s: %s" % (path, exc)) from None


def list_images(source):
    """Image files of a directory (sorted), or the one file named."""
    if os.path.isdir(source):
        names = sorted(n for n in os.listdir(source) if n.lower().endswith(IMAGE_EXTENSIONS + (".npy",)))
        if not names:
            raise ImageError("no images (%s) in %s" % (", ".join(IMAGE_EXTENSIONS), source))
        return [os.path.join(source, n) for n in names]
    if os.path.isfile(source):
        return [source]
    raise ImageError("%s is neither an image file nor a directory" % source)


def resize_crop(img, resize, size):
    """Resize the shorter side of a uint8 image to ``resize`` (bicubic, Pillow) and centre-crop ``size`` x
    ``size``; returns a PIL image. The converters calibrate with this same function."""
    from PIL import Image

    im = Image.fromarray(img)
    w, h = im.size
    s = resize / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    im = im.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return im.crop((left, top, left + size, top + size))


def _grey(img, spec, size):
    import numpy as np
    from PIL import Image

    x = img.astype(np.float32)
    if x.ndim == 3:
        x = x[:, :, :3].mean(axis=2)
    if x.shape != (size, size):
        x = np.asarray(Image.fromarray(x.astype(np.float32), mode="F").resize((size, size), Image.BILINEAR))
    x = (x / 255.0 - float(spec["mean"])) / float(spec["std"])
    return x.reshape(1, size, size, 1).astype(np.float32)


def _grey_to_rgb(img, spec, size):
    import numpy as np
    from PIL import Image

    g = img if img.ndim == 2 else img[:, :, :3].mean(axis=2)
    x = np.asarray(Image.fromarray(g.astype(np.float32), mode="F").resize((size, size), Image.BILINEAR)) / 255.0
    x = np.repeat(x[:, :, None], 3, axis=2)
    mean = np.asarray(spec["mean"], dtype=np.float32)
    std = np.asarray(spec["std"], dtype=np.float32)
    return ((x - mean) / std).reshape(1, size, size, 3).astype(np.float32)


def _rgb(img, spec, size, caffe):
    import numpy as np

    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    arr = np.asarray(resize_crop(np.ascontiguousarray(img[:, :, :3]), int(spec.get("resize", size)), size),
                     dtype=np.float32)
    arr = arr * (1.0 if caffe else 1.0 / 255.0)
    if spec.get("order", "RGB") == "BGR":
        arr = arr[:, :, ::-1]
    mean = np.asarray(spec["mean"], dtype=np.float32)
    std = np.asarray(spec.get("std", [1.0, 1.0, 1.0]), dtype=np.float32)
    return ((arr - mean) / std).reshape(1, size, size, 3).astype(np.float32)


def preprocess(img, spec):
    """One uint8 image (H x W or H x W x C) -> float32 NHWC batch of 1, as bundle.json's preprocessing
    ``spec`` says. An unknown kind is a BundleError (the bundle asks for something this code lacks)."""
    import numpy as np

    kind = spec["kind"]
    size = int(spec["size"])
    img = np.asarray(img)
    if kind == "grey":
        return _grey(img, spec, size)
    if kind == "grey_to_rgb":
        return _grey_to_rgb(img, spec, size)
    if kind in ("rgb", "caffe"):
        return _rgb(img, spec, size, kind == "caffe")
    raise BundleError("unknown preprocessing kind %r in bundle.json" % kind)
