"""Cloud half -> ONNX with an NHWC float input (what the host decoder produces). Running it is
``cloud_runtime``'s job (onnxruntime, no torch)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .tflite_export import ExportError, first_line


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
        raise ExportError(f"ONNX export of the cloud half failed: {first_line(exc)}") from exc
    with torch.no_grad():
        out_shape = list(wrapped(example).shape[1:])
    return {"input": {"name": "features", "shape": [-1, h, w, c], "dtype": "float32", "layout": "NHWC"},
            "output": {"name": "logits", "shape": [-1, *out_shape], "dtype": "float32"},
            "export_seconds": time.time() - t0, "size_bytes": Path(output).stat().st_size}
