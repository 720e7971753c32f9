"""The baselines' rate points: one baseline codec (``baselines``) at one setting on every evaluation tensor.

A setting is a picklable codec call (``functools.partial`` of a function of ``baselines``), so that it can
be sent to a worker process as it is.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable

import numpy as np

from lwfc_convert.cloud_runtime import cloud_outputs
from lwfc_host.evaluate import baselines as bl
from lwfc_host.evaluate.av1 import av1
from lwfc_host.evaluate.edge_cache import EdgeData
from lwfc_host.evaluate.plans import Plan
from lwfc_host.evaluate.results import Point
from lwfc_host.evaluate.streaming import chunk_of, squared_error

Codec = Callable[[np.ndarray], bl.BaselineBatch]


def run_baseline(name: str, fn: Codec, data: EdgeData, session: Any, metric: Any, chunk: int = 500) -> Point:
    """Code the evaluation tensors in chunks with one baseline setting, run the cloud on the reconstructions."""
    n = len(data.q_eval)
    n_el = int(np.prod(data.q_eval.shape[1:]))
    chunk = chunk_of(data.q_eval.shape[1:], chunk)
    nbytes, optional, outs = [], [], []
    t_enc = t_dec = 0.0
    se = 0.0
    setting = ""
    for i in range(0, n, chunk):
        x = data.dequantize(data.q_eval[i:i + chunk])  # a chunk at a time: 10,000 float tensors can be GBs
        b = fn(x)
        setting = b.setting
        nbytes.append(b.nbytes)
        optional.append(b.optional_bytes if b.optional_bytes.size else np.zeros(len(x), dtype=np.int64))
        t_enc += b.encode_seconds
        t_dec += b.decode_seconds
        outs.append(cloud_outputs(session, b.recon))
        se += squared_error(b.recon, x)
        del x, b  # before the next chunk's are made
    nb = np.concatenate(nbytes)
    opt = np.concatenate(optional)
    return Point(name, setting, float(8 * nb.mean() / n_el), metric(np.concatenate(outs), data.labels, data.ref),
                 1000 * t_enc / n, 1000 * t_dec / n, n,
                 bits_per_element_no_param_sets=float(8 * (nb - opt).mean() / n_el) if opt.any() else math.nan,
                 mse=se / (n * n_el))


def baseline_settings(plan: Plan, clip_of_levels: Callable[[int], tuple[float, float]]) -> list[tuple[str, Codec]]:
    """(method name, codec call) of every baseline setting of the plan. RLE quantizes on
    ``clip_of_levels(levels)``, a clip range known to both ends."""
    settings: list[tuple[str, Codec]] = []
    for bits, qps in plan.hevc_qps.items():
        settings += [(f"hevc {bits}-bit", partial(bl.hevc, qp=qp, bits=bits)) for qp in qps]
    settings += [("av1 8-bit", partial(av1, crf=crf)) for crf in plan.av1_crfs]
    settings += [("jpeg tiles", partial(bl.image_tiles, quality=q, fmt="JPEG")) for q in plan.jpeg_qualities]
    settings += [("webp tiles", partial(bl.image_tiles, quality=q, fmt="WEBP")) for q in plan.webp_qualities]
    for lv in plan.rle_levels:
        lo, hi = clip_of_levels(lv)
        settings.append(("uniform+rle", partial(bl.rle, levels=lv, c_min=lo, c_max=hi)))
    settings += [("uniform+zlib", partial(bl.zlib_codec, bits=bits)) for bits in plan.zlib_bits]
    return settings


def method_of(name: str) -> str:
    """The ``--methods`` name of a baseline method: ``"hevc 8-bit"`` -> hevc, ``"av1 8-bit"`` -> av1,
    ``"uniform+rle"`` -> rle."""
    return name.split()[0].split("+")[-1]
