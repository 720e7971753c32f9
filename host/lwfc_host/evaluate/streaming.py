"""Bounded memory for ``lwfc eval``: what lets every method code and score the evaluation tensors a chunk at a time
with the same numbers as if it held them all, and the process's peak memory for the report.

A detector's feature tensor is large (CenterNet-MobileNetV3: 128x128x72, 4.7 MB as float32), so a run holds the
int8 edge outputs of every view (1.2 MB each) but their float reconstructions only a chunk at a time
(``chunk_of``), runs the cloud half a few tensors at a time (``cloud_runtime.cloud_outputs``, whose outputs do not
depend on the batch) and keeps per chunk only the cloud outputs (detection rows or logits), the frame sizes and
the summed squared error.
"""

from __future__ import annotations

import resource
import sys
from typing import Callable

import numpy as np

from lwfc_convert.cloud_runtime import RUN_ELEMENTS, batch_for


def chunk_of(shape: tuple[int, ...], batch: int) -> int:
    """Tensors of ``shape`` (without N) coded and scored together: ``batch``, at most 256 MB of float32
    (``cloud_runtime.MAX_BATCH_ELEMENTS``). The chunk is part of the numbers: a baseline codes a chunk in one
    ffmpeg process (its start-up is shared by the chunk's tensors in the timings) and the squared error is summed
    per chunk (``squared_error``), so changing it changes the last bits of the MSE."""
    return batch_for(shape, batch)


def squared_error(recon: np.ndarray, x: np.ndarray,
                  to_float: Callable[[np.ndarray], np.ndarray] | None = None) -> float:
    """``float(np.sum((recon.astype(np.float64) - x) ** 2))`` for float32 reconstructions ``recon`` (N, ...) of
    ``x``, with the same value to the last bit (the same float64 steps element by element, then one sum over the
    whole contiguous array, so the same rounding) but one float64 copy of ``recon`` instead of three. ``x`` is
    float, or int8 edge outputs that ``to_float`` (``EdgeData.dequantize``) turns into floats a few tensors at a
    time."""
    d = recon.astype(np.float64)
    step = batch_for(recon.shape[1:], len(recon), RUN_ELEMENTS)
    for i in range(0, len(d), step):
        d[i:i + step] -= x[i:i + step] if to_float is None else to_float(x[i:i + step])
    np.square(d, out=d)
    return float(np.sum(d))


def peak_rss_mb() -> float:
    """The peak resident memory so far of the largest single process of the run, in MB (2^20 bytes): this one or
    a finished child (the edge-output computation, ffmpeg, ``--jobs`` workers); what ``/usr/bin/time -v`` reports
    as the maximum resident set size. (Linux counts in a child's figure its parent's peak when it was started,
    which is never more than this process's own.)"""
    unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in bytes on macOS, in KiB on Linux
    return max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)) \
        * unit / 2 ** 20
