"""Task-aware quantizer choice (``lwfc design --objective accuracy``).

MSE is only a proxy for what the cloud half does with the features. Here the clip range, the level count
and the quantizer (uniform or ECSQ at a few lambdas) are chosen by the task itself: the bundle's cloud half
(onnxruntime, ``cloud.onnx``) runs on the *reconstructed* features of held-out calibration images, and the
design with the lowest coded rate whose top-1 agreement with the uncompressed int8 pipeline (the same edge
half, its features not coded) stays within ``tolerance`` wins -- or, with a target rate, the design with the
best agreement at or below it.

Agreement needs no labels, and it bounds the accuracy loss: accuracy can drop by at most the fraction of
images whose top-1 changes. Calibration images are disjoint from the evaluation set (the bundle's
converter draws them from the training split / the non-held-out photos).

Steps: (1) edge outputs of ``images`` calibration images (cached as .npz next to the bundle's other
caches); (2) half of them feed the calibration statistics, the other half is held out; (3) every
candidate quantizer is scored on the held-out half -- reconstruction through the table's ``index_of_q``
and ``reconstruction`` (exactly what the decoder outputs), then the cloud half; (4) the few cheapest
candidates within tolerance (by the one-model entropy) get the full context design, and their rate is
measured by encoding the held-out tensors into real frames; the lowest wins.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lwfc.bundle import INFO_FILE, load_bundle
from lwfc_convert.cloud_runtime import cloud_outputs, onnx_session

DEFAULT_LEVELS = (2, 3, 4, 5, 6, 8, 12, 16)  # hard layers (e.g. EfficientNet-Lite0 block 8) need > 8
# Scales of the MSE clip's top. The task tolerates far wider ranges than MSE picks: on the ResNet stage-2
# layer, 3 levels at 2x the MSE clip cost 0.38 bits/element at -0.5 pp, against 0.63 at the MSE clip (wider
# cells zero more small activations, which costs the cloud little and the rate a lot), hence up to 2.5.
DEFAULT_CLIP_SCALES = (0.7, 1.0, 1.25, 1.6, 2.0, 2.5)
DEFAULT_LAMBDAS = (0.003, 0.01, 0.03)
FINALISTS = 4
SESSION_THREADS = 2  # intra-op threads of the cloud-half session


@dataclass
class TaskCandidate:
    """One quantizer scored on the task."""

    levels: int
    kind: str
    lam: float
    clip_scale: float
    clip_min: float
    clip_max: float
    entropy: float  # one-model entropy on the calibration statistics, bits/element (the cheap rate ranking)
    agreement: float  # top-1 agreement with the uncompressed int8 pipeline on the held-out tensors
    coded_bits: float = math.nan  # real frames (header + CRC + payload), held-out tensors, bits/element
    groups: int = 0
    classes: int = 0
    models: int = 0


@dataclass
class TaskDesign:
    """The chosen design (``design.Design`` with context models) and every candidate tried."""

    design: Any
    chosen: TaskCandidate
    candidates: list[TaskCandidate]
    reference_tensors: int
    tolerance: float
    seconds: float
    notes: list[str] = field(default_factory=list)


def _digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def calibration_edge_outputs(bundle_dir: str | Path, images: int, seed: int = 1, cache_dir: Path | None = None,
                             progress: bool = False) -> tuple[np.ndarray, float, int]:
    """Int8 edge outputs (B, H, W, C) of ``images`` calibration images of the bundle's data set (never its
    evaluation images), with the feature scale and zero point. Cached by bundle content, count and seed."""
    bundle = load_bundle(bundle_dir)
    key = hashlib.sha256(json.dumps([_digest(bundle.edge_path), _digest(bundle.path(INFO_FILE)),
                                     images, seed]).encode()).hexdigest()[:16]
    cache = (cache_dir or Path(bundle_dir)) / f"task_calib_{key}.npz"
    scale, zp = float(bundle.info["feature"]["scale"]), int(bundle.info["feature"]["zero_point"])
    if cache.exists():
        with np.load(cache) as z:
            return z["q"], scale, zp
    from tqdm import tqdm

    from lwfc.edge import make_interpreter
    from lwfc_convert.bundle import calibration_and_eval_data
    from lwfc_convert.tflite_export import run_tflite

    calib, _, _ = calibration_and_eval_data(bundle.model, images, 1, seed=seed, progress=False)
    interp = make_interpreter(bundle.edge_path)
    q = np.concatenate([run_tflite(interp, x)[0] for x in tqdm(calib, desc="edge half (task calibration)",
                                                               disable=not progress, leave=False)])
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, q=q)
    tmp.replace(cache)
    return q, scale, zp


def _quantizers(stats: Any, levels: tuple[int, ...], clip_scales: tuple[float, ...], lambdas: tuple[float, ...],
                kinds: tuple[str, ...]) -> list[tuple[Any, Any, float]]:
    """(quantizer, clip choice, clip scale) for every candidate: the MSE clip range scaled at the top (the
    bottom stays: after a ReLU it is 0 and holds the pile of zeros), capped at the data maximum."""
    from lwfc_host.design.clipping import choose_clip, scale_top
    from lwfc_host.design.quantizers import DesignError, ecsq, uniform
    from lwfc_host.design.table_design import zeros_of

    hist = stats.histogram()
    zeros = zeros_of(stats)
    out = []
    for n in levels:
        base = choose_clip(hist, n, "mse", zeros)
        seen = set()
        for s in clip_scales:
            cc = scale_top(hist, base, s)
            if cc.c_max in seen or not cc.c_max > base.c_min:
                continue
            seen.add(cc.c_max)
            try:
                if "uniform" in kinds:
                    out.append((uniform(hist, n, cc.c_min, cc.c_max, zeros), cc, s))
                if "ecsq" in kinds:
                    for lam in lambdas:
                        q = ecsq(hist, n, lam, cc.c_min, cc.c_max, zeros)
                        if q.levels >= 2:
                            out.append((q, cc, s))
            except DesignError:
                continue
    return out


def _reconstruct(q8: np.ndarray, table: dict) -> np.ndarray:
    """What the decoder outputs for int8 features under ``table``: reconstruction[index_of_q[q + 128]]."""
    lut = np.asarray(table["int8"]["index_of_q"], dtype=np.int64)
    recon = np.asarray(table["reconstruction"], dtype=np.float32)
    return recon[lut[q8.astype(np.int64) + 128]]


def measure_frames(table: dict, q8: np.ndarray) -> float:
    """Bits/element of real frames (header, CRC, payload) for int8 tensors (B, H, W, C), device-identical
    encoder (constriction fast path, byte-identical to lwfc.encoder)."""
    from lwfc.tables import Tables
    from lwfc_host.codec.fast import FastEncoder

    encoder = FastEncoder(Tables(table))
    nbytes = sum(len(encoder.frame_int8(x)) for x in q8)
    return 8.0 * nbytes / q8.size


def _score(stats: Any, quantizers: list[tuple[Any, Any, float]], session: Any, held: np.ndarray, ref: np.ndarray,
           scale: float, zp: int, progress: bool,
           spec_version: int | str = "auto") -> list[tuple[TaskCandidate, Any, Any]]:
    """(candidate, quantizer, clip choice) of every quantizer: its one-model entropy and its top-1 agreement
    on the held-out tensors (``ref``: the uncompressed pipeline's top-1)."""
    from tqdm import tqdm

    from lwfc_host.design.quantizers import evaluate
    from lwfc_host.design.table_design import finish_design, zeros_of

    hist = stats.histogram()
    zeros = zeros_of(stats)
    cands: list[tuple[TaskCandidate, Any, Any]] = []
    seen: dict[tuple, float] = {}
    for q, cc, s in tqdm(quantizers, desc="task design (quantizers)", disable=not progress, leave=False):
        # K = 1, G = 1 is enough to score the task: accuracy depends on the quantizer alone
        d = finish_design(stats, q, cc, 1, 1, scale, zp, spec_version=spec_version)
        # on int8 features ECSQ often snaps onto the uniform cells: the same decoder output needs no new run
        key = (tuple(d.table["int8"]["index_of_q"]), tuple(d.table["reconstruction"]))
        if key not in seen:
            top1 = cloud_outputs(session, _reconstruct(held, d.table)).argmax(axis=1)
            seen[key] = float((top1 == ref).mean())
        ent = evaluate(q, hist, zeros).entropy
        cands.append((TaskCandidate(q.levels, q.kind, float(q.lam), s, float(q.clip_min), float(q.clip_max),
                                    float(ent), seen[key]), q, cc))
    return cands


def _finalists(cands: list[tuple[TaskCandidate, Any, Any]], tolerance: float, target_bits: float | None,
               finalists: int, notes: list[str]) -> list[tuple[TaskCandidate, Any, Any]]:
    """The few candidates that get the full context design: the cheapest (by entropy) within tolerance, or,
    with a target rate, the most accurate whose one-model entropy is at most the target."""
    if target_bits is None:
        ok = [c for c in cands if c[0].agreement >= 1.0 - tolerance]
        if not ok:
            best = max(c[0].agreement for c in cands)
            notes.append(f"no candidate reaches agreement {1 - tolerance:.3f} (best {best:.3f}): taking the most "
                         "accurate ones")
            ok = [c for c in cands if c[0].agreement >= best]
        return sorted(ok, key=lambda c: c[0].entropy)[:finalists]
    # candidates whose one-model entropy is at most the target (contexts only lower it); best agreement
    ok = [c for c in cands if c[0].entropy <= target_bits] or sorted(cands, key=lambda c: c[0].entropy)[:1]
    top = max(c[0].agreement for c in ok)
    return sorted([c for c in ok if c[0].agreement >= top - 0.5 * tolerance], key=lambda c: -c[0].agreement)[:finalists]


def task_design(bundle_dir: str | Path, images: int = 512, tolerance: float = 0.01, target_bits: float | None = None,
                levels: tuple[int, ...] = DEFAULT_LEVELS, clip_scales: tuple[float, ...] = DEFAULT_CLIP_SCALES,
                lambdas: tuple[float, ...] = DEFAULT_LAMBDAS, kinds: tuple[str, ...] = ("uniform", "ecsq"),
                classes: int | str = "auto", cache_dir: str | Path | None = None, seed: int = 1,
                finalists: int = FINALISTS, progress: bool = False, spec_version: int | str = "auto") -> TaskDesign:
    """Choose the quantizer by the task (see the module docstring). Returns the finished design.
    ``spec_version`` (1, 2 or 'auto') is the table version the finalists are designed for
    (``table_design.finish_design``)."""
    from tqdm import tqdm

    from lwfc_host.design.calibration import CalibrationStats
    from lwfc_host.design.table_design import finish_design
    from lwfc_host.design.tablefile import finalize

    t0 = time.time()
    bundle = load_bundle(bundle_dir)
    q8, scale, zp = calibration_edge_outputs(bundle_dir, images, seed, Path(cache_dir) if cache_dir else None,
                                             progress)
    if len(q8) < 4:
        raise ValueError(f"need at least 4 calibration images, got {len(q8)}")
    fit, held = q8[0::2], q8[1::2]
    cs = CalibrationStats(reservoir=min(len(fit), 64))
    cs.add_int8(fit, scale, zp, where="task calibration edge outputs")
    stats = cs.loaded()
    session = onnx_session(bundle.cloud_path, threads=SESSION_THREADS)
    ref = cloud_outputs(session, (scale * (held.astype(np.float32) - zp)).astype(np.float32)).argmax(axis=1)
    from lwfc_host.design.table_design import check_levels

    for n in levels:
        check_levels(n, spec_version)
    cands = _score(stats, _quantizers(stats, levels, clip_scales, lambdas, kinds), session, held, ref, scale, zp,
                   progress, spec_version)
    notes: list[str] = []
    results = []
    for cand, q, cc in tqdm(_finalists(cands, tolerance, target_bits, finalists, notes),
                            desc="task design (context models, frames)", disable=not progress, leave=False):
        d = finish_design(stats, q, cc, "auto", classes, scale, zp, spec_version=spec_version)
        cand.coded_bits = measure_frames(d.table, held)
        c = d.table["contexts"]
        cand.groups, cand.classes, cand.models = c["groups"], c["classes"], len(d.table["models"])
        results.append((cand, d))
    if target_bits is None:
        chosen, d = min(results, key=lambda r: r[0].coded_bits)
    else:
        within = [r for r in results if r[0].coded_bits <= target_bits] or results
        chosen, d = max(within, key=lambda r: (r[0].agreement, -r[0].coded_bits))
    d.table["design"]["objective"] = {
        "metric": "top-1 agreement with the uncompressed int8 pipeline", "tolerance": tolerance,
        "target_bits": target_bits, "heldout_images": int(len(held)), "agreement": chosen.agreement,
        "heldout_coded_bits": chosen.coded_bits, "clip_scale": chosen.clip_scale}
    d.table = finalize(d.table, 2 if spec_version in (2, "2") else None)
    return TaskDesign(d, chosen, [c[0] for c in cands], int(len(held)), tolerance, time.time() - t0, notes)


def format_candidates(td: TaskDesign) -> list[str]:
    """Printable lines: every candidate's rate ranking, agreement and (finalists) coded rate."""
    lines = [f"{'N':>3} {'quantizer':<14} {'clip':>6} {'entropy':>8} {'agree':>7} {'coded':>8}  contexts"]
    for c in sorted(td.candidates, key=lambda c: (c.levels, c.kind, c.clip_scale, c.lam)):
        q = c.kind + (f" {c.lam:g}" if c.kind == "ecsq" else "")
        coded = f"{c.coded_bits:8.4f}" if c.coded_bits == c.coded_bits else f"{'':8}"
        ctx = f"G={c.groups} K={c.classes} M={c.models}" if c.groups else ""
        mark = " <= chosen" if c is td.chosen else ""
        lines.append(f"{c.levels:>3} {q:<14} {c.clip_scale:>6.2f} {c.entropy:8.4f} {c.agreement:7.4f} {coded}  "
                     f"{ctx}{mark}")
    return lines


def evaluate_table(bundle_dir: str | Path, table: dict, q_eval: np.ndarray, labels: np.ndarray | None = None,
                   batch: int = 256) -> dict[str, float]:
    """A table on evaluation int8 features through the real pipeline: frames (device-identical encoder),
    host decoder, ONNX cloud half. Returns bits/element of the frames, top-1 agreement with the uncompressed
    int8 pipeline and, with labels, accuracy of both."""
    from lwfc.tables import Tables
    from lwfc_host.codec.decoder import Decoder
    from lwfc_host.codec.fast import FastEncoder

    bundle = load_bundle(bundle_dir)
    scale, zp = float(bundle.info["feature"]["scale"]), int(bundle.info["feature"]["zero_point"])
    sess = onnx_session(bundle.cloud_path, threads=SESSION_THREADS)
    t = Tables(table)
    dec = Decoder(t)
    encoder = FastEncoder(t)
    nbytes = 0
    top, ref = [], []
    for i in range(0, len(q_eval), batch):
        q = q_eval[i:i + batch]
        frames = [encoder.frame_int8(x) for x in q]
        nbytes += sum(len(f) for f in frames)
        recon = np.concatenate([dec.decode(f).tensor for f in frames])
        top.append(cloud_outputs(sess, recon).argmax(axis=1))
        ref.append(cloud_outputs(sess, (scale * (q.astype(np.float32) - zp)).astype(np.float32)).argmax(axis=1))
    top_a, ref_a = np.concatenate(top), np.concatenate(ref)
    out = {"bits_per_element": 8.0 * nbytes / q_eval.size, "agreement": float((top_a == ref_a).mean())}
    if labels is not None and (labels >= 0).all():
        out["accuracy"] = float((top_a == labels).mean())
        out["int8_accuracy"] = float((ref_a == labels).mean())
    return out
