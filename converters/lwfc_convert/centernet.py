"""The COCO detector shipped in the npm package ``@vladmandic/human``: CenterNet on a MobileNetV3 backbone
(``models/centernet.json`` + ``centernet.bin``, a TF.js graph model with float16 weights).

- :func:`ensure_npm_packages` installs the pinned npm packages (the model, and TensorFlow.js for the
  reference runner) into a cache folder: ``$LWFC_CACHE/npm``, default ``~/.cache/lwfc/npm``.
- :func:`load_centernet` converts the graph (:mod:`lwfc_convert.tfjs`) into :class:`CenterNetMBv3`:
  input NCHW RGB on the 0..255 scale, 512 x 512; output ``[N, 100, 6]`` rows
  ``(x1, y1, x2, y2, score, class)`` in input pixels, exactly as the graph's ``tower_0/detections``.
  The network part is the converted graph up to its heads (``tower_0/keypoints``, ``tower_0/wh``); the
  graph's own decoding ops are built for a batch of one, so :class:`CenterNetDecode` repeats them for any
  batch size, with its constants read from the graph (a test checks both give the same detections).
- :func:`tfjs_reference` runs the same graph with TensorFlow.js (pure-JavaScript CPU backend) in node,
  for verification; results are cached on disk.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .tfjs import convert
from .tfjs_graph import TfjsError, TfjsGraph, load_graph_model
from .tfjs_module import TfjsModule

# Pinned npm packages: the model, and the TensorFlow.js runtime used as the reference.
NPM_PACKAGES = {
    "@vladmandic/human": "3.3.6",
    "@tensorflow/tfjs-core": "4.22.0",
    "@tensorflow/tfjs-converter": "4.22.0",
    "@tensorflow/tfjs-backend-cpu": "4.22.0",
}
MODEL_RELPATH = "node_modules/@vladmandic/human/models/centernet.json"
LABELS_RELPATH = "node_modules/@vladmandic/human/src/object/labels.ts"
REFERENCE_SCRIPT = Path(__file__).parent / "data" / "tfjs_reference.mjs"

INPUT_NAME = "tower_0/images"
HEADS = ("tower_0/keypoints", "tower_0/wh")
DETECTIONS = "tower_0/detections"
INPUT_SIZE = 512


class NpmError(RuntimeError):
    """npm/node are missing, or installing the pinned packages failed."""


def cache_dir() -> Path:
    """lwfc's cache folder: ``$LWFC_CACHE`` or ``~/.cache/lwfc``."""
    from .cache import cache_root

    return cache_root()


def npm_prefix() -> Path:
    """Where the npm packages are installed (``<cache>/npm``)."""
    return cache_dir() / "npm"


def _installed_version(prefix: Path, package: str) -> str | None:
    try:
        return json.loads((prefix / "node_modules" / package / "package.json").read_text())["version"]
    except (OSError, ValueError, KeyError):
        return None


def missing_npm_packages(prefix: Path | None = None) -> list[str]:
    """The pinned packages (``name@version``) not installed at that version under ``prefix``."""
    prefix = prefix or npm_prefix()
    return [f"{p}@{v}" for p, v in NPM_PACKAGES.items() if _installed_version(prefix, p) != v]


def ensure_npm_packages(prefix: Path | None = None, install: bool = True) -> Path:
    """Make sure the pinned npm packages are installed under ``prefix`` (default :func:`npm_prefix`),
    running ``npm install --prefix`` for any that are missing. Returns the prefix."""
    prefix = prefix or npm_prefix()
    missing = missing_npm_packages(prefix)
    if not missing:
        return prefix
    if not install:
        raise NpmError(f"npm packages missing under {prefix}: {', '.join(missing)}")
    npm = shutil.which("npm")
    if npm is None:
        raise NpmError(f"npm is not installed (needed for {', '.join(missing)}): apt-get install nodejs npm")
    prefix.mkdir(parents=True, exist_ok=True)
    # --ignore-scripts: nothing here needs install scripts, and the human package's would fetch binaries.
    cmd = [npm, "install", "--prefix", str(prefix), "--no-audit", "--no-fund", "--ignore-scripts",
           "--save-exact", *[f"{p}@{v}" for p, v in NPM_PACKAGES.items()]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    still = missing_npm_packages(prefix)
    if proc.returncode != 0 or still:
        raise NpmError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}); still missing: {still}\n"
                       f"{proc.stderr[-2000:]}")
    return prefix


def model_json_path(install: bool = True) -> Path:
    """Path of ``centernet.json`` inside the installed npm package."""
    return ensure_npm_packages(install=install) / MODEL_RELPATH


def coco_classes() -> list[str]:
    """The 80 COCO class names in the model's class-index order, read from the package's labels.ts."""
    path = ensure_npm_packages() / LABELS_RELPATH
    text = path.read_text(encoding="utf-8")
    pairs = [(int(c), lab) for c, lab in re.findall(r"class:\s*(\d+),\s*label:\s*'([^']+)'", text)]
    if len(pairs) != 80 or [c for c, _ in pairs] != list(range(1, 81)):
        raise TfjsError(f"{path}: expected 80 labels numbered 1..80, found {len(pairs)}")
    return [lab for _, lab in pairs]


def _const(graph: TfjsGraph, name: str) -> np.ndarray:
    try:
        return graph.weights[name]
    except KeyError:
        raise TfjsError(f"{graph.path}: constant {name!r} not found: not the expected CenterNet graph") from None


class CenterNetDecode(nn.Module):
    """The graph's decoding for any batch size: 3x3 max-pool peak picking on the class heatmaps, top-k
    over (y, x, class) in NHWC order, boxes ``(x*stride - l, y*stride - t, x*stride + r, y*stride + b)``
    from the size head at each peak, rows ``(x1, y1, x2, y2, score, class)``."""

    def __init__(self, k: int, stride: float, classes: int, width: int, pool: int) -> None:
        super().__init__()
        self.k, self.stride, self.classes, self.width, self.pool = k, stride, classes, width, pool

    def forward(self, keypoints: torch.Tensor, wh: torch.Tensor) -> torch.Tensor:
        pad = self.pool // 2
        hmax = F.max_pool2d(F.pad(keypoints, (pad, pad, pad, pad), value=float("-inf")), self.pool, 1)
        keep = keypoints * (keypoints == hmax).to(keypoints.dtype)
        flat = keep.permute(0, 2, 3, 1).flatten(1)
        # topk (not a stable sort) so that the cloud half exports to ONNX TopK; ties could only reorder
        # equal scores, and peaks of sigmoid outputs are not exactly equal in practice.
        scores, idx = torch.topk(flat, self.k, dim=1)
        cls = torch.remainder(idx, self.classes)
        pix = torch.div(idx, self.classes, rounding_mode="floor")
        y = torch.div(pix, self.width, rounding_mode="floor")
        x = torch.remainder(pix, self.width)
        sizes = wh.permute(0, 2, 3, 1).flatten(1, 2)
        g = torch.gather(sizes, 1, pix.unsqueeze(-1).expand(-1, -1, sizes.shape[-1]))
        xs = x.to(torch.float32) * self.stride
        ys = y.to(torch.float32) * self.stride
        return torch.stack([xs - g[..., 0], ys - g[..., 1], xs + g[..., 2], ys + g[..., 3], scores,
                            cls.to(torch.float32)], dim=-1)


class CenterNetMBv3(TfjsModule):
    """CenterNet-MobileNetV3 (COCO): NCHW RGB 0..255 input ``[N, 3, 512, 512]`` -> ``[N, 100, 6]``.

    Module paths follow the TF scopes (``MobilenetV3.expanded_conv_2.add``, ``CenternetHead.Relu_2``...)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        keypoints, wh = super().forward(x)
        return self.decode(keypoints, wh)


class CenterNetHeads(CenterNetMBv3):
    """The same network without the decoding: ``[N, 3, 512, 512]`` -> (keypoints ``[N, 80, 128, 128]``, class
    heatmaps in 0..1; wh ``[N, 4, 128, 128]``, box sides in pixels), differentiable, for QAT's task
    distillation (:func:`heads_loss`)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        keypoints, wh = TfjsModule.forward(self, x)
        return keypoints, wh


def without_decode(model: CenterNetMBv3) -> CenterNetHeads:
    """A copy of ``model`` as :class:`CenterNetHeads` (same parameters, copied; same module paths, so the same
    split points)."""
    heads = copy.deepcopy(model)
    heads.__class__ = CenterNetHeads
    return heads


def heads_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """How far the student's (keypoints, wh) are from the teacher's, where detection looks: squared heatmap
    errors weighted by the teacher's heat (plus 0.01, so that the background counts a little: a false peak
    there is a false detection), and squared box-side errors weighted by the teacher's hottest class at each
    position (sides only matter at peaks); each relative to the teacher's own weighted energy, summed."""
    kp_s, wh_s = student
    kp_t, wh_t = teacher
    w_kp = kp_t + 0.01
    w_wh = kp_t.amax(1, keepdim=True)
    heat = (w_kp * (kp_s - kp_t).pow(2)).sum() / (w_kp * kp_t.pow(2)).sum().clamp(min=1e-12)
    sides = (w_wh * (wh_s - wh_t).pow(2)).sum() / (w_wh * wh_t.pow(2)).sum().clamp(min=1e-12)
    return heat + sides


def build_centernet(graph: TfjsGraph | str | Path | None = None) -> CenterNetMBv3:
    """Convert the npm package's CenterNet graph (or ``graph``) into a :class:`CenterNetMBv3` in eval mode."""
    if graph is None:
        graph = model_json_path()
    if not isinstance(graph, TfjsGraph):
        graph = load_graph_model(graph)
    model = convert(graph, outputs=list(HEADS), nchw_outputs=True, into=CenterNetMBv3())
    # Decoding constants, read from the graph's own post-processing ops.
    k = int(_const(graph, "tower_0/TopKV2/k"))
    strides = {float(_const(graph, f"tower_0/mul_{i}/y")) for i in (3, 4, 5, 6)}
    if len(strides) != 1:
        raise TfjsError(f"{graph.path}: box strides differ ({strides}): not the expected CenterNet graph")
    classes = int(_const(graph, "tower_0/strided_slice_7"))
    width = int(_const(graph, "tower_0/strided_slice_6"))
    pool = graph.node("tower_0/max_pooling2d/MaxPool").attr["ksize"][1]
    model.add_module("decode", CenterNetDecode(k, strides.pop(), classes, width, pool))
    model.input_shape = (3, INPUT_SIZE, INPUT_SIZE)
    return model.eval()


def load_centernet() -> CenterNetMBv3:
    """The zoo's ``centernet_mbv3_coco``: installs the npm package if needed and converts it."""
    return build_centernet(model_json_path())


def to_input(images_nhwc: np.ndarray) -> torch.Tensor:
    """NHWC float images (0..255) -> the model's NCHW input tensor."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(images_nhwc, np.float32).transpose(0, 3, 1, 2)))


def tfjs_reference(images_nhwc: np.ndarray, outputs: Sequence[str] = (DETECTIONS,), model_json: Path | None = None,
                   use_cache: bool = True, timeout: float = 3600) -> list[np.ndarray]:
    """Run the TF.js graph with TensorFlow.js (CPU backend, pure JavaScript) in node on float32 NHWC
    images, one at a time; returns one array per output with the images stacked on axis 0. Results are
    cached under ``<cache>/tfjs_reference`` keyed by the inputs, the model files and the runner script."""
    images = np.ascontiguousarray(np.asarray(images_nhwc, dtype="<f4"))
    if images.ndim != 4:
        raise ValueError(f"images must be N x H x W x C, got shape {images.shape}")
    model_json = Path(model_json) if model_json else model_json_path()
    prefix = ensure_npm_packages()
    node = shutil.which("node")
    if node is None:
        raise NpmError("node is not installed: apt-get install nodejs")
    h = hashlib.sha256()
    h.update(images.tobytes())
    h.update(str(images.shape).encode())
    h.update(json.dumps(list(outputs)).encode())
    h.update(model_json.read_bytes())
    for shard in sorted(model_json.parent.glob(model_json.stem + "*.bin")):
        h.update(shard.read_bytes())
    h.update(REFERENCE_SCRIPT.read_bytes())
    cache = cache_dir() / "tfjs_reference" / f"{h.hexdigest()[:32]}.npz"
    if use_cache and cache.exists():
        with np.load(cache) as z:
            return [z[f"out{i}"] for i in range(len(outputs))]
    with tempfile.TemporaryDirectory() as tmp:
        inp, out = Path(tmp) / "in.f32", Path(tmp) / "out.f32"
        images.tofile(inp)
        cmd = [node, str(REFERENCE_SCRIPT), str(prefix), str(model_json), str(inp), ",".join(map(str, images.shape)),
               str(out), *outputs]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise TfjsError(f"TF.js reference run failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
        info = json.loads(proc.stdout.strip().splitlines()[-1])
        flat = np.fromfile(out, dtype="<f4")
    shapes = [tuple(s[1:]) for s in info["shapes"]]
    per_image = [int(np.prod(s)) for s in shapes]
    flat = flat.reshape(images.shape[0], sum(per_image))
    results, start = [], 0
    for s, n in zip(shapes, per_image):
        results.append(flat[:, start:start + n].reshape((images.shape[0], *s)))
        start += n
    if use_cache:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp_path = cache.with_suffix(".tmp.npz")
        np.savez(tmp_path, **{f"out{i}": r for i, r in enumerate(results)})
        tmp_path.replace(cache)
    return results
