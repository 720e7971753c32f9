"""Measure before choosing (issue 16): would quantizer steps chosen per channel by the task's sensitivity code a
layer in fewer bits than one shared step, at equal task distortion?

Spec v2 has one quantizer per table: every channel gets the same step. Where the cloud half weighs channels
very unequally, a finer step on the channels it is sensitive to and a coarser one elsewhere spends the bits
where the task looks. This module estimates that gain before anyone adds per-channel quantizers to the spec.

- **Shared step.** A uniform quantizer over [c_min, c_max] with ``levels`` levels, the same on every channel:
  ``coding_modes.clip_range`` (0 on ReLU-like or non-negative layers, else the 0.1% quantile; the 99.9%
  quantile), its top times ``clip_scale``.
- **Sensitivity** of channel c: the task loss when only channel c is quantized with the shared step, divided
  by that channel's mean squared error (task loss per unit of MSE).
- **Allocated steps.** Step of channel c = k x shared step x sqrt(median sensitivity / sensitivity of c)
  (high-rate theory: equal task loss per bit everywhere), with k found by bisection so that the task loss
  equals the shared step's. The shared step is rescaled the same way (one k for all channels) and the allocation
  is compared with that: where the clip's error dominates the task loss, a coarser shared step costs nothing,
  and that saving is not the allocation's. High-rate theory predicts a saving of 0.5 log2(arithmetic /
  geometric mean of the sensitivities) bits per element; the measured saving says what is left of it here.
- **Rate**: each channel's order-0 entropy of its indices (its own model), in bits per element, the same
  estimate for both quantizers (lwfc's contexts take more off both; this compares quantizers, not coders).
- **Task loss** (``task_loss``): classifiers, the KL divergence of the cloud's softmax from the float one,
  averaged over images; detectors, the heads loss of the detector's QAT task distillation
  (``lwfc_convert.centernet.heads_loss``). Task loss is not task accuracy: at low rates the accuracy,
  measured in ``lwfc eval``, is the judge.

    python -m lwfc_host.evaluate.channel_allocation --model M --split S [--images 8] [--levels 22]
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

TaskLoss = Callable[[Any], float]  # quantized features (torch, N x C x H x W) -> task loss against the float ones


@dataclass
class Allocation:
    """What :func:`measure` found. Rates in bits per element (order-0 entropy per channel)."""

    levels: int
    c_min: float
    c_max: float
    shared_loss: float
    shared_bits: float
    matched_scale: float  # the shared step times this keeps the same task loss (bisection, as for k)
    matched_bits: float  # the shared step so rescaled: the baseline the allocation is compared with
    sensitivity: np.ndarray  # per channel: task loss per unit MSE
    predicted_saving_bits: float  # 0.5 log2(AM / GM) of the sensitivities
    allocated_scale: float  # k
    allocated_loss: float
    allocated_bits: float

    @property
    def ratio(self) -> float:
        """Allocated over (rescaled) shared bits at equal task loss."""
        return self.allocated_bits / self.matched_bits

    def lines(self) -> list[str]:
        s = self.sensitivity
        top = np.sort(s)[::-1]
        return [
            f"shared step: {self.levels} levels on [{self.c_min:.4g}, {self.c_max:.4g}], task loss "
            f"{self.shared_loss:.4g}, {self.shared_bits:.4f} bits/element; rescaled to the same loss (step x "
            f"{self.matched_scale:.3f}): {self.matched_bits:.4f} bits/element",
            f"sensitivity per channel (task loss per unit MSE): max / median {top[0] / np.median(s):.2f}, "
            f"min / median {top[-1] / np.median(s):.3f}",
            f"high-rate prediction: per-channel steps save {self.predicted_saving_bits:.3f} bits/element",
            f"allocated steps (k = {self.allocated_scale:.3f}): task loss {self.allocated_loss:.4g}, "
            f"{self.allocated_bits:.4f} bits/element = {self.ratio:.3f}x the rescaled shared step's",
        ]


def _indices(x: Any, c_min: float, steps: Any, tops: Any) -> Any:
    """Uniform indices per channel: round((x - c_min) / step), clamped to 0..top (torch, broadcast over C)."""
    import torch

    return torch.minimum(torch.clamp(torch.round((x - c_min) / steps), min=0), tops)


def _order0_bits(idx: Any) -> float:
    """Sum over channels of each channel's order-0 entropy of its indices, per element."""
    bits = 0.0
    for c in range(idx.shape[1]):
        _, counts = np.unique(idx[:, c].numpy(), return_counts=True)
        p = counts / counts.sum()
        bits -= float((counts * np.log2(p)).sum())
    return bits / idx.numel()


def measure(features: Any, task_loss: TaskLoss, levels: int, c_min: float, c_max: float,
            bisection_steps: int = 12) -> Allocation:
    """Shared step against per-channel steps on ``features`` (torch float, N x C x H x W) under ``task_loss``;
    see the module docstring. Costs C + 2 x (``bisection_steps`` + 1) + 1 evaluations of ``task_loss``."""
    import torch

    n_ch = features.shape[1]
    step = (c_max - c_min) / (levels - 1)

    def quantize(steps: np.ndarray) -> tuple[Any, Any]:
        s = torch.as_tensor(steps, dtype=features.dtype).view(1, -1, 1, 1)
        tops = torch.round(torch.as_tensor(c_max - c_min, dtype=features.dtype) / s)
        idx = _indices(features, c_min, s, tops)
        return idx, c_min + idx * s

    shared_idx, shared = quantize(np.full(n_ch, step))
    shared_loss = task_loss(shared)
    sensitivity = np.empty(n_ch)
    for c in range(n_ch):
        one = features.clone()
        one[:, c] = shared[:, c]
        mse = float((shared[:, c] - features[:, c]).pow(2).mean())
        sensitivity[c] = task_loss(one) / mse if mse > 0 else 0.0
    live = sensitivity > 0
    s_live = sensitivity[live]
    predicted = 0.5 * math.log2(float(s_live.mean()) / math.exp(float(np.log(s_live).mean()))) if live.any() else 0.0
    # a channel without error (constant, or on the grid) keeps the shared step
    relative = np.ones(n_ch)
    relative[live] = np.sqrt(np.median(s_live) / s_live)

    def at_shared_loss(rel: np.ndarray) -> tuple[float, float, float]:
        """(k, task loss, bits) of steps k x step x rel, k the largest that keeps the shared step's task loss
        (geometric bisection; the task loss grows with k), so that no saving is overstated."""
        def run(k: float) -> tuple[float, Any]:
            idx, values = quantize(np.clip(step * k * rel, step / 16, c_max - c_min))
            return task_loss(values), idx

        lo, hi = 0.25, 4.0
        for _ in range(bisection_steps):
            k = math.sqrt(lo * hi)
            lo, hi = (k, hi) if run(k)[0] <= shared_loss else (lo, k)
        loss, idx = run(lo)
        return lo, loss, _order0_bits(idx)

    # The shared step rescaled to the same loss first: where the clip's error dominates, a coarser shared step
    # loses nothing, and that saving is not the allocation's.
    k_shared, _, matched_bits = at_shared_loss(np.ones(n_ch))
    k, loss, bits = at_shared_loss(relative)
    return Allocation(levels, c_min, c_max, shared_loss, _order0_bits(shared_idx), k_shared, matched_bits,
                      sensitivity, predicted, k, loss, bits)


def kl_loss(head: Any, reference: Any, batch: int = 64) -> TaskLoss:
    """Classifiers: mean KL(softmax(head(reference)) || softmax(head(quantized))) over the images."""
    import torch

    with torch.no_grad():
        want = torch.cat([head(reference[i:i + batch]).log_softmax(1) for i in range(0, len(reference), batch)])

    def loss(quantized: Any) -> float:
        with torch.no_grad():
            got = torch.cat([head(quantized[i:i + batch]).log_softmax(1) for i in range(0, len(quantized), batch)])
        return float(torch.nn.functional.kl_div(got, want, log_target=True, reduction="batchmean"))

    return loss


def heads_loss(head: Any, reference: Any, batch: int = 2) -> TaskLoss:
    """Detectors: the mean over batches of ``lwfc_convert.centernet.heads_loss`` of the heads' outputs."""
    import torch

    from lwfc_convert.centernet import heads_loss as loss_of

    with torch.no_grad():
        want = [head(reference[i:i + batch]) for i in range(0, len(reference), batch)]

    def loss(quantized: Any) -> float:
        with torch.no_grad():
            return sum(float(loss_of(head(quantized[i:i + batch]), want[k]))
                       for k, i in enumerate(range(0, len(quantized), batch))) / len(want)

    return loss


def model_setup(model_name: str, split_at: str, images: int) -> tuple[Any, TaskLoss, str, str]:
    """A zoo model's float features on ``images`` calibration images (N x C x H x W), its task loss, the split's
    activation and a description."""
    import torch

    from lwfc_convert import split as splitting
    from lwfc_convert.detection import is_detector
    from lwfc_convert.zoo import load_model

    from .coding_modes import calibration_batches

    model = load_model(model_name).eval()
    points = {p.path: p for p in splitting.list_split_points(model)}
    activation = points[split_at].activation if split_at in points else ""
    detector = is_detector(model_name)
    if detector:
        from lwfc_convert.centernet import without_decode

        edge, head = splitting.split(without_decode(model), split_at)
    else:
        edge, head = splitting.split(model, split_at)
    calib = calibration_batches(model_name, images, detector, progress=False)
    with torch.no_grad():
        x = torch.cat([edge(xb) for xb in calib])[:images]
    make_loss: Callable[[Any, Any], TaskLoss] = heads_loss if detector else kl_loss
    return x, make_loss(head, x), activation, f"{model_name} {split_at}, float edge half, {len(x)} images"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lwfc_host.evaluate.channel_allocation",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="zoo model (lwfc layers lists them)")
    ap.add_argument("--split", required=True, help="split point (module path)")
    ap.add_argument("--images", type=int, default=8, help="calibration images or views (default 8)")
    ap.add_argument("--levels", default="22", help="comma-separated level counts of the shared step (default 22)")
    ap.add_argument("--clip-scale", type=float, default=1.0,
                    help="c_max = the 99.9%% quantile times this (default 1)")
    args = ap.parse_args(argv)
    from .coding_modes import clip_range

    x, loss, activation, described = model_setup(args.model, args.split, args.images)
    c_min, top = clip_range(x.numpy(), activation)
    c_max = top * args.clip_scale
    print(described)
    for levels in (int(v) for v in args.levels.split(",")):
        for line in measure(x, loss, levels, c_min, c_max).lines():
            print(f"  {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
