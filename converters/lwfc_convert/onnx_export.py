"""Cloud half -> ONNX with an NHWC float input (what the host decoder produces), checked with onnxruntime."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn


class NHWCInput(nn.Module):
    """Accepts N x H x W x C features and runs an NCHW module on them."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.permute(0, 3, 1, 2))


def export_cloud_onnx(cloud: nn.Module, feature_shape_chw: tuple[int, ...], output: str | Path,
                      opset: int = 17) -> dict[str, Any]:
    """Export ``cloud`` (NCHW in) as ONNX taking ``features`` N x H x W x C float32 (dynamic batch) and
    returning ``logits``. Returns shapes and the export time."""
    from .tflite_export import ExportError, _first_line

    c, h, w = feature_shape_chw
    wrapped = NHWCInput(cloud).eval()
    example = torch.zeros(1, h, w, c)
    t0 = time.time()
    try:
        torch.onnx.export(
            wrapped, (example,), str(output), input_names=["features"], output_names=["logits"],
            dynamic_axes={"features": {0: "batch"}, "logits": {0: "batch"}}, opset_version=opset,
            dynamo=False,
        )
    except Exception as exc:
        raise ExportError(f"ONNX export of the cloud half failed: {_first_line(exc)}") from exc
    with torch.no_grad():
        out_shape = list(wrapped(example).shape[1:])
    return {"input": {"name": "features", "shape": [-1, h, w, c], "dtype": "float32", "layout": "NHWC"},
            "output": {"name": "logits", "shape": [-1, *out_shape], "dtype": "float32"},
            "export_seconds": time.time() - t0, "size_bytes": Path(output).stat().st_size}


def onnx_session(path: str | Path) -> Any:
    """An onnxruntime CPU session for ``path``."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_onnx(session: Any, features_nhwc: np.ndarray) -> np.ndarray:
    """Run the cloud half on NHWC float features; returns the logits."""
    return session.run(None, {"features": np.asarray(features_nhwc, dtype=np.float32)})[0]


def check_onnx(cloud: nn.Module, path: str | Path, features_nchw: torch.Tensor) -> float:
    """Relative L2 error of onnxruntime's output against torch's for the same NCHW features."""
    with torch.no_grad():
        ref = cloud(features_nchw).numpy()
    got = run_onnx(onnx_session(path), features_nchw.permute(0, 2, 3, 1).numpy())
    return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-12))
