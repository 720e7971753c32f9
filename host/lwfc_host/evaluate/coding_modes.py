"""Measure before choosing (issue 16): the coded bits of a layer's calibration tensors under candidate coding
schemes, at equal distortion, held out as in the context design.

The tensors are split as ``design_contexts`` splits them (every 4th held out); every model below is fitted on
the fit tensors and charged on the held-out ones by its ideal code length (static counts plus 1/2, the
Krichevsky-Trofimov estimate, so an unseen symbol costs a finite number of bits). Table side bits are not
charged to any scheme: they are shipped once per bundle. Distortion is the mean squared error against the
float features.

Index-domain schemes code the same uniform quantizer's indices (same MSE), at each level count:

- ``v1 designed``: today's designed contexts (``design_contexts``: channel groups, neighbour classes, merged
  models), its own held-out estimate (v1 tables have at most 16 levels); ``v1 contexts, KT estimate``: the
  same contexts under this module's estimator (equal to it: a check), and ``v1 + cross-channel``: those
  contexts with the class of the correlated channel's co-located index (below) added, to see whether the
  cross-channel gain adds to v1's design;
- ``v2 designed``: the same design with spec version 2's features where they code the held-out tensors in fewer
  bits (``design_contexts(..., spec_version="auto")``: reference channels and their classes as one more context
  dimension, more neighbour classes; up to 64 levels).
- ``left+above``: channel group and three classes (0, 1, 2+) of the left and above indices;
- ``more neighbours``: as ``left+above``, plus zero/non-zero of the above-left, above-right and two-up indices;
- ``cross-channel``: as ``left+above``, plus the class of the co-located index of the channel before it in an
  order where each channel follows its most correlated predecessor (greedy chain on the fit tensors);
- ``LOCO-I``: JPEG-LS's median edge predictor on the decoded neighbour indices, the residual modulo the level
  count, coded with gradient-activity contexts (three quantized gradients, sign-merged) and a per-context bias
  correction fitted on the fit tensors.

Value-domain schemes change the distortion, so they are swept over their step and read at the uniform
quantizer's MSE (log-log interpolation between the two nearest steps):

- ``DPCM``: closed-loop prediction of each value by the median edge predictor of the reconstructed left, above
  and above-left values; the residual quantized by a uniform step; its index coded with channel group and the
  magnitudes of the left and above residual indices as context;
- ``5/3 wavelet``: the values on a 256-step integer grid, the reversible integer LeGall 5/3 lifting (JPEG 2000's,
  adds and shifts only) over up to 3 levels per channel plane, a deadzone quantizer whose step in each subband
  is the sweep's step over the subband's synthesis norm (equal distortion per band), each coefficient coded
  with its subband, its channel group, the activity of four decoded neighbours in the subband and whether its
  parent (one level coarser) is non-zero as context;
- ``5/3 wavelet, designed``: the same lifting with designed coefficient coding
  (``value_coding.DesignedWavelet``): up to 4 levels, a 4x finer integer grid, per-subband quantizer tables
  (rounding offset 3/8, reconstruction at the fit tensors' centroids), LL indices as median edge residuals,
  magnitude contexts from the left, above, above-left + above-right and parent magnitudes merged per subband
  by agglomeration and chosen (class count, channel groups) by bits on fit tensors held back from the
  merging, a bounded alphabet 0..15 with an Exp-Golomb escape, signs coded apart with the neighbours' signs,
  and decoded values under a fitted threshold set to c_min; swept by bisection on the MSE to the steps that
  bracket each level count's MSE (``bracket_sweep``);
- ``HEVC``: x265 all-intra on channel tiles (``baselines.hevc``, every byte counted), swept over QP;
- ``AV1``: libaom all-intra on the same tiles (``av1.av1``), swept over its constant-quality level.

    lwfc modes --bundle DIR [--images 64]            (int8 edge outputs of the bundle's calibration images)
    lwfc modes --model M --split S [--images 64]     (the float edge half, no conversion needed)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np


@dataclass
class LayerTensors:
    """Float features (B, H, W, C) of a layer and the clip range of its quantizers."""

    name: str
    x: np.ndarray
    c_min: float
    c_max: float
    source: str


@dataclass
class ModeResult:
    """Bits per element of each scheme at each level count's MSE, and the value-domain sweeps."""

    layer: str
    shape: tuple[int, int, int]
    tensors: tuple[int, int]  # (fit, held out)
    levels: list[int]
    mse: dict[int, float]
    bits: dict[str, dict[int, float]] = field(default_factory=dict)
    sweeps: dict[str, list[tuple[float, float, float]]] = field(default_factory=dict)  # (step, mse, bits)
    seconds: dict[str, float] = field(default_factory=dict)


def uniform_quantize(x: np.ndarray, levels: int, c_min: float, c_max: float) -> tuple[np.ndarray, np.ndarray]:
    """(indices, reconstruction) of the uniform quantizer on [c_min, c_max] with ``levels`` levels."""
    step = (c_max - c_min) / (levels - 1)
    idx = np.clip(np.rint((x - c_min) / step), 0, levels - 1).astype(np.int64)
    return idx, (c_min + idx * step).astype(np.float32)


def fit_mask(b: int) -> np.ndarray:
    """The fit tensors (True) and held-out ones (False), as ``design_contexts`` splits them."""
    from lwfc_host.design.contexts import split_fit_heldout

    fit_ids, held_ids = split_fit_heldout(b)
    mask = np.zeros(b, dtype=bool)
    mask[fit_ids] = True
    mask[held_ids] = False
    return mask


def at_mse(sweep: list[tuple[float, float, float]], target: float) -> float:
    """Bits per element at MSE ``target`` on a (step, mse, bits) sweep: log-log interpolation between the two
    points around it; NaN outside the swept range."""
    pts = sorted((m, b) for _, m, b in sweep if m > 0 and b > 0)
    for (m0, b0), (m1, b1) in zip(pts, pts[1:]):
        if m0 <= target <= m1:
            if m1 == m0:
                return min(b0, b1)
            t = (math.log(target) - math.log(m0)) / (math.log(m1) - math.log(m0))
            return math.exp(math.log(b0) + t * (math.log(b1) - math.log(b0)))
    return float("nan")


def _sweep(fn: Callable[[float], tuple[float, float]], steps: list[float]) -> list[tuple[float, float, float]]:
    return [(s, *fn(s)) for s in steps]


def bracket_sweep(fn: Callable[[float], tuple[float, float]], mse: Callable[[float], float],
                  targets: list[float], steps: list[float] | None = None) -> list[tuple[float, float, float]]:
    """(step, mse, bits) at the two neighbouring ``steps`` (default 1 to 256 in quarter octaves) around each MSE
    target, found by bisection on ``mse`` alone (cheap) before ``fn`` codes them: a sweep as dense as the step
    grid where :func:`at_mse` reads it, at a few codings' cost. Targets outside the steps' MSE range get none."""
    steps = steps or [2 ** (i / 4) for i in range(33)]
    seen: dict[float, float] = {}

    def m(s: float) -> float:
        if s not in seen:
            seen[s] = mse(s)
        return seen[s]

    need: set[float] = set()
    for target in targets:
        lo, hi = 0, len(steps) - 1
        if not m(steps[lo]) <= target <= m(steps[hi]):
            continue
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if m(steps[mid]) <= target else (lo, mid)
        need |= {steps[lo], steps[hi]}
    return [(s, *fn(s)) for s in sorted(need)]


def codec_sweep(code: Callable[[np.ndarray, int], Any], x: np.ndarray, fit: np.ndarray,
                settings: list[int]) -> list[tuple[float, float, float]]:
    """(setting, mse, bits/element) of a baseline codec (``baselines.hevc``: QP, ``av1.av1``: crf) on the
    held-out tensors, every byte counted."""
    held = x[~fit]
    out = []
    for setting in settings:
        batch = code(held, setting)
        out.append((float(setting), float(np.mean((batch.recon - held) ** 2)),
                    float(batch.bits_per_element().mean())))
    return out


def measure(layer: LayerTensors, levels: list[int], qps: list[int], progress: bool = True,
            av1_crfs: list[int] | None = None, only: set[str] | None = None) -> ModeResult:
    """Every scheme on ``layer`` (or the value-domain ones named in ``only``): index-domain ones at each level
    count, value-domain ones swept and read at the uniform quantizer's MSE of each level count."""
    import time

    from tqdm import tqdm

    from lwfc_host.evaluate.av1 import av1
    from lwfc_host.evaluate.baselines import hevc
    from lwfc_host.evaluate.code_lengths import channel_groups
    from lwfc_host.evaluate.index_coding import index_schemes
    from lwfc_host.evaluate.value_coding import DesignedWavelet, dpcm, wavelet

    x = layer.x.astype(np.float32)
    b, h, w, c = x.shape
    fit = fit_mask(b)
    res = ModeResult(layer.name, (h, w, c), (int(fit.sum()), int((~fit).sum())), levels, {})
    t0 = time.time()
    for n in tqdm(levels, desc=f"{layer.name}: index schemes", disable=not progress, leave=False):
        idx, rec = uniform_quantize(x, n, layer.c_min, layer.c_max)
        res.mse[n] = float(np.mean((rec - x) ** 2))
        if only is not None:
            continue
        for name, bits in index_schemes(idx, fit, n).items():
            res.bits.setdefault(name, {})[n] = bits
    res.seconds["index schemes"] = time.time() - t0
    groups = channel_groups(uniform_quantize(x, 8, layer.c_min, layer.c_max)[0], fit)
    span = layer.c_max - layer.c_min
    value_schemes = {
        "DPCM": (lambda s: dpcm(x, layer.c_min, layer.c_max, s, fit, groups),
                 [span / (n - 1) for n in (64, 32, 16, 11, 8, 6, 4, 3, 2)]),
        "5/3 wavelet": (lambda s: wavelet(x, layer.c_min, layer.c_max, s, fit, groups),
                        [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128]),
    }
    for name, (fn, steps) in value_schemes.items():
        if only is not None and name not in only:
            continue
        t0 = time.time()
        res.sweeps[name] = _sweep(fn, list(tqdm(steps, desc=f"{layer.name}: {name}", disable=not progress,
                                                leave=False)))
        res.seconds[name] = time.time() - t0
    if only is None or "5/3 wavelet, designed" in only:
        t0 = time.time()
        designed = DesignedWavelet(x, layer.c_min, layer.c_max, fit, groups)
        res.sweeps["5/3 wavelet, designed"] = bracket_sweep(designed, designed.mse, [res.mse[n] for n in levels])
        res.seconds["5/3 wavelet, designed"] = time.time() - t0
    for name, code, settings in (("HEVC", hevc, qps), ("AV1", av1, av1_crfs or [])):
        if settings and (only is None or name in only):
            t0 = time.time()
            res.sweeps[name] = codec_sweep(code, x, fit, settings)
            res.seconds[name] = time.time() - t0
    for name, sweep in res.sweeps.items():
        res.bits[name] = {n: at_mse(sweep, res.mse[n]) for n in levels}
    return res


# --- where the tensors come from -------------------------------------------------------------------------------

def calibration_batches(model_name: str, images: int, detector: bool, progress: bool = True) -> list[Any]:
    """The preprocessed calibration batches (NCHW) of zoo model ``model_name``: ``images`` detector views, or
    calibration images of the model's data set; the same ones for every measurement of this package."""
    if detector:
        from lwfc_convert.detection import detection_eval_data

        calib, _, _ = detection_eval_data(model_name, images, 1, seed=0, progress=progress)
    else:
        from lwfc_convert.bundle import calibration_and_eval_data

        calib, _, _ = calibration_and_eval_data(model_name, images, 1, seed=0, progress=progress)
    return calib


def clip_range(x: np.ndarray, activation: str) -> tuple[float, float]:
    """[c_min, c_max]: 0 (or the 0.1% quantile of a linear layer) to the 99.9% quantile of the values."""
    flat = x.ravel()
    sample = flat[:: max(1, flat.size // 2_000_000)]
    hi = float(np.quantile(sample, 0.999))
    lo = 0.0 if activation in ("relu", "relu6") or sample.min() >= 0 else float(np.quantile(sample, 0.001))
    return lo, max(hi, lo + 1e-6)


def bundle_tensors(bundle_dir: str, images: int, progress: bool = True) -> LayerTensors:
    """The float features of the int8 edge half on ``images`` calibration images of the bundle's data set."""
    from lwfc.bundle import load_bundle
    from lwfc.edge import make_interpreter
    from lwfc_convert.tflite_export import run_tflite
    from lwfc_host.evaluate.metrics import bundle_task

    bundle = load_bundle(bundle_dir)
    calib = calibration_batches(bundle.model, images, bundle_task(bundle.info) == "detection", progress)
    interp = make_interpreter(bundle.edge_path)
    q = np.concatenate([run_tflite(interp, xb)[0] for xb in calib])[:images]
    feature = bundle.info["feature"]
    x = (float(feature["scale"]) * (q.astype(np.float32) - int(feature["zero_point"]))).astype(np.float32)
    activation = str(feature.get("activation", bundle.info.get("activation", "")))
    return LayerTensors(f"{bundle.model} {bundle.info['split']}", x, *clip_range(x, activation),
                        f"int8 edge half of bundle {bundle_dir}, {len(x)} calibration images")


def model_tensors(model_name: str, split_at: str, images: int, progress: bool = True) -> LayerTensors:
    """The float features of a zoo model's edge half (PyTorch, no conversion) on ``images`` calibration images."""
    import torch

    from lwfc_convert import split as splitting
    from lwfc_convert.detection import is_detector
    from lwfc_convert.zoo import load_model

    model = load_model(model_name)
    edge, _ = splitting.split(model, split_at)
    points = {p.path: p for p in splitting.list_split_points(model)}
    activation = points[split_at].activation if split_at in points else ""
    calib = calibration_batches(model_name, images, is_detector(model_name), progress)
    with torch.no_grad():
        x = torch.cat([edge(xb) for xb in calib])[:images].permute(0, 2, 3, 1).contiguous().numpy()
    return LayerTensors(f"{model_name} {split_at}", x, *clip_range(x, activation),
                        f"float edge half (PyTorch) of {model_name} at {split_at}, {len(x)} calibration images")


# --- the report -------------------------------------------------------------------------------------------------

INDEX_SCHEMES = ("v1 designed", "left+above", "more neighbours", "cross-channel", "LOCO-I")


def to_json(res: ModeResult, source: str, command: str) -> dict[str, Any]:
    """The result as JSON-ready values."""
    return {"layer": res.layer, "source": source, "command": command, "shape_hwc": list(res.shape),
            "tensors_fit_heldout": list(res.tensors), "levels": res.levels,
            "mse": {str(n): v for n, v in res.mse.items()},
            "bits_per_element": {k: {str(n): v for n, v in d.items()} for k, d in res.bits.items()},
            "sweeps": {k: [list(p) for p in v] for k, v in res.sweeps.items()}, "seconds": res.seconds}


def table(res: ModeResult) -> list[str]:
    """A markdown table: one row per scheme, one column per level count (bits/element at that MSE)."""
    head = "| scheme | " + " | ".join(f"{n} levels" for n in res.levels) + " |"
    rows = [head, "|---|" + "---|" * len(res.levels),
            "| MSE | " + " | ".join(f"{res.mse[n]:.3g}" for n in res.levels) + " |"]
    v1 = res.bits.get("v1 designed", {})
    for name, by_level in res.bits.items():
        cells = []
        for n in res.levels:
            b = by_level.get(n, float("nan"))
            ref = v1.get(n, float("nan"))
            ratio = f" ({b / ref:.2f}×)" if name != "v1 designed" and ref == ref and ref > 0 and b == b else ""
            cells.append("—" if b != b else f"{b:.3f}{ratio}")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return rows


def from_json(obj: dict[str, Any]) -> ModeResult:
    """A result written by :func:`to_json`."""
    levels = [int(n) for n in obj["levels"]]
    res = ModeResult(obj["layer"], tuple(obj["shape_hwc"]), tuple(obj["tensors_fit_heldout"]), levels,
                     {int(n): v for n, v in obj["mse"].items()})
    res.bits = {k: {int(n): v for n, v in d.items()} for k, d in obj["bits_per_element"].items()}
    res.sweeps = {k: [tuple(p) for p in v] for k, v in obj["sweeps"].items()}
    res.seconds = obj.get("seconds", {})
    return res


ALTERNATIVES = ("more neighbours", "cross-channel", "LOCO-I")


def overview(results: list[ModeResult], levels: tuple[int, ...] = (4, 8, 16)) -> list[str]:
    """One row per layer: v1's bits, v1 with the cross-channel class as a ratio to v1, the best index-domain
    alternative as a ratio to left+above (the same simple grouping without it: what the idea adds), and the
    value-domain schemes as ratios to v1, at each of ``levels`` that every result has."""
    levels = tuple(n for n in levels if all(n in r.levels for r in results))
    others = [k for k in ("5/3 wavelet", "5/3 wavelet, designed", "HEVC", "AV1") if any(k in r.bits for r in results)]
    head = ["layer"] + [f"{name} @{n}" for n in levels for name in ["v1", "v1 + cross", "best index", *others]]
    rows = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in results:
        cells = [f"{r.layer} ({'×'.join(map(str, r.shape))})"]
        for n in levels:
            v1, plain = r.bits["v1 designed"].get(n, math.nan), r.bits["left+above"].get(n, math.nan)
            best = min(ALTERNATIVES, key=lambda k: r.bits[k].get(n, math.inf))
            cross = r.bits.get("v1 + cross-channel", {}).get(n, math.nan) / v1
            cells += [f"{v1:.3f}", "—" if math.isnan(cross) else f"{cross:.2f}×",
                      f"{best} {r.bits[best][n] / plain:.2f}×"]
            ratios = [r.bits[k].get(n, math.nan) / v1 if k in r.bits else math.nan for k in others]
            cells += ["—" if math.isnan(q) else f"{q:.2f}×" for q in ratios]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def summary(paths: list[str]) -> str:
    """Markdown: the cross-layer overview, then every result file's table under its layer, source and command."""
    import json

    objs = []
    for path in paths:
        with open(path) as f:
            objs.append(json.load(f))
    results = [from_json(o) for o in objs]
    parts = ["# Coding schemes at equal MSE, per layer (issue 16, \"measure before choosing\")", "",
             "Bits per element of held-out calibration tensors at the MSE of the uniform quantizer with each level",
             "count (clip at the 99.9% quantile); in brackets the ratio to today's designed contexts (v1, at most 16",
             "levels). Made by `lwfc modes` (lwfc_host/evaluate/coding_modes.py explains every scheme) and",
             "`python -m lwfc_host.evaluate.coding_modes FILES`; the files beside this one hold the sweeps. Equal MSE",
             "is not equal task accuracy: the rate-accuracy evaluation (`lwfc eval`) judges the schemes that win",
             "here. What it means for spec v2: codec_spec/DESIGN-quantizer.md, section 10.", "",
             "## Across layers", "",
             "v1: today's designed contexts (bits/element); v1 + cross: those contexts with the correlated channel's",
             "class added, as a ratio to v1; best index: the best of more neighbours, cross-channel and LOCO-I as a",
             "ratio to left+above (the same simple grouping without the idea); the others as ratios to v1 at v1's",
             "MSE.", ""] + overview(results) + [""]
    for obj, res in zip(objs, results):
        parts += [f"## {res.layer} ({'×'.join(map(str, res.shape))})", "",
                  f"{obj['source']}; {res.tensors[0]} fit / {res.tensors[1]} held-out tensors. "
                  f"`{obj['command']}`", ""] + table(res) + [""]
    return "\n".join(parts)


if __name__ == "__main__":
    import sys

    print(summary(sys.argv[1:]))
