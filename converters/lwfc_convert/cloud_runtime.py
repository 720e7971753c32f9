"""Running a bundle's cloud half (cloud.onnx) with onnxruntime: the one session factory, batched runs and
the softmax, shared by the converters' checks, the host server and the evaluation. No torch here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

# One batch of cloud-half inputs holds at most this many elements: 256 MB of float32 features per call.
MAX_BATCH_ELEMENTS = 1 << 26
# One onnxruntime run takes at most this many input elements (16 MB of float32). The session's memory arena keeps
# what its largest run needed, and a cloud half's activations are several times its input (CenterNet-MobileNetV3
# from 128x128x72: about 42 MB per tensor, so a MAX_BATCH_ELEMENTS batch of 56 tensors held 2.4 GB for the rest of
# the process); runs of a few tensors are as fast on a CPU. The outputs do not depend on the batch (tests check it).
RUN_ELEMENTS = 1 << 22


def onnx_session(path: str | Path, threads: int = 1) -> Any:
    """An onnxruntime CPU session for ``path`` using ``threads`` intra-op threads (and one inter-op)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_onnx(session: Any, features_nhwc: np.ndarray) -> np.ndarray:
    """The cloud half on one batch of NHWC float features: its first output."""
    x = np.ascontiguousarray(features_nhwc, dtype=np.float32)
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def batch_for(shape: tuple[int, ...], batch: int, max_elements: int = MAX_BATCH_ELEMENTS) -> int:
    """``batch`` capped so that one batch of tensors of ``shape`` (without N) holds at most ``max_elements``."""
    return max(1, min(batch, max_elements // max(1, int(np.prod(shape)))))


def cloud_outputs(session: Any, feats: np.ndarray, batch: int = 256) -> np.ndarray:
    """The cloud half on NHWC float features, in runs of at most ``batch`` tensors and RUN_ELEMENTS elements:
    classifier logits ``[N, classes]`` or detection rows ``[N, K, 6]``."""
    batch = batch_for(feats.shape[1:], batch, RUN_ELEMENTS)
    return np.concatenate([run_onnx(session, feats[i:i + batch]) for i in range(0, len(feats), batch)])


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Probabilities from logits along ``axis`` (shifted by the maximum, so large logits do not overflow)."""
    z = np.asarray(logits, dtype=np.float64)
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)
