"""Task accuracy under packet loss (``lwfc eval-loss``): whole frames against slices with concealment.

Pipeline: the bundle's int8 edge outputs of the evaluation set (``edge_cache``, shared with ``lwfc eval``) ->
one lwfc table (given, or designed on the calibration edge outputs at a chosen operating point) -> every tensor
coded whole (``FastEncoder``) and cut into slices that each fit one datagram of ``mtu`` bytes by the device's
own slice plans (``lwfc.slices.encode_sliced``: channel blocks, or the codec's row bands; frames byte-identical
to the device's) -> a packet channel that
drops datagrams (i.i.d., or Gilbert-Elliott bursts), seeded -> per tensor:

- **whole frame**: the frame is cut into ``ceil(bytes / room)`` datagrams; losing any of them loses the frame and
  its answer (a classifier's answer counts as wrong, a detector's as no detections);
- **slices**: each slice travels alone (in ``lwfc.datagram.send_order``, interleaved by default); the received
  slices are placed and the rest is concealed by each method of ``lwfc_host.codec.conceal``;

-> the cloud half (onnxruntime) -> the task metric (accuracy, or mAP@0.5 for the detector). The channel is one
packet stream through the whole evaluation set, so bursts run across tensors. Rates count every byte of every
frame (header and CRC included); the overhead of slicing is the extra bytes of the slices against the whole
frame, and, on the wire, with the link protocol's envelope (20 bytes, plus a 16-byte tag with keys) per datagram.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lwfc.datagram import max_frame_bytes, send_order
from lwfc.frame import parse_header
from lwfc.protocol import ENVELOPE_SIZE
from lwfc.slices import choose_plan, encode_sliced
from lwfc.tables import Tables
from lwfc_host.codec.conceal import DEFAULT_METHOD, METHODS, Concealer, ConcealParams, fit_conceal_params

LOSS_MODELS = ("iid", "ge")
DEFAULT_RATES = (0.0, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3)
DEFAULT_MTUS = (300, 600, 1200, 4000, 9000)
WHOLE = "whole frame"


def packet_losses(n: int, rate: float, model: str, rng: np.random.Generator, burst: float = 4.0) -> np.ndarray:
    """Which of ``n`` consecutive datagrams are lost (bool array), with mean loss rate ``rate``.

    ``iid``: each one independently. ``ge``: a Gilbert-Elliott channel whose bad state loses every datagram and
    good state none; the bad state lasts ``burst`` datagrams on average (leaves with probability 1 / burst), and
    is entered with probability rate / (1 - rate) / burst, so that the stationary loss rate is ``rate``. The
    first datagram's state is drawn from the stationary distribution."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"loss rate must be in [0, 1), got {rate}")
    if rate == 0.0 or n == 0:
        return np.zeros(n, dtype=bool)
    u = rng.random(n)
    if model == "iid":
        return u < rate
    if model != "ge":
        raise ValueError(f"unknown loss model {model!r}; known: {', '.join(LOSS_MODELS)}")
    if burst < 1.0:
        raise ValueError(f"mean burst length must be at least 1 datagram, got {burst}")
    leave = 1.0 / burst
    enter = rate * leave / (1.0 - rate)
    if enter > 1.0:
        raise ValueError(f"loss rate {rate} needs bursts longer than {burst} datagrams")
    lost = np.empty(n, dtype=bool)
    bad = rng.random() < rate
    for i in range(n):
        lost[i] = bad
        bad = (u[i] >= leave) if bad else (u[i] < enter)
    return lost


class _DeviceSlicer:
    """What the device's slice plans (``lwfc.slices.encode_sliced``) need of an encoder (``tables``,
    ``encode_indices``), backed by the numpy/constriction ``FastEncoder``
    (byte-identical frames), so the slices are exactly the device's."""

    def __init__(self, tables: Tables):
        from lwfc_host.codec.fast import FastEncoder

        self.tables = tables
        self.fast = FastEncoder(tables)
        self._idx: np.ndarray | None = None

    def slices(self, idx: np.ndarray, max_frame: int, plan: str = "auto") -> list[bytes]:
        self._idx = idx
        h, w, _ = idx.shape
        return encode_sliced(self, b"", h, w, max_frame, plan)

    def encode_indices(self, indices: bytes, height: int, width: int, region=None) -> bytes:
        return self.fast.frame_indices(self._idx, region)



@dataclass
class Sliced:
    """Every evaluation tensor coded whole and as slices of at most ``max_frame`` bytes."""

    mtu: int
    max_frame: int
    plan: str  # "rows" or "channels" (lwfc.slices.PLANS)
    whole_bytes: np.ndarray  # (N,)
    regions: list[list[tuple[int, int, int, int]]]  # per tensor, its slices' regions in raster order
    slice_bytes: list[np.ndarray]  # per tensor, its slices' frame lengths (same order)

    @property
    def slices_per_tensor(self) -> float:
        return float(np.mean([len(r) for r in self.regions]))


def code_tensors(tables: Tables, idx: np.ndarray, mtu: int, auth: bool = True, decode_check: int = 0,
                 progress: bool = False, what: str = "", plan: str = "auto") -> Sliced:
    """Code every index tensor of ``idx`` (N, H, W, C) whole and sliced by ``plan`` for datagrams of ``mtu`` bytes;
    the slices of the first ``decode_check`` tensors are decoded by the host decoder and checked to give the
    encoder's indices in their regions."""
    from tqdm import tqdm

    from lwfc_host.codec.decoder import Decoder

    slicer = _DeviceSlicer(tables)
    plan = choose_plan(tables, plan)
    room = max_frame_bytes(mtu, auth)
    dec = Decoder(tables) if decode_check else None
    whole, regions, sizes = [], [], []
    for i in tqdm(range(len(idx)), desc=what or f"{plan} slices at MTU {mtu}", disable=not progress, leave=False):
        frames = slicer.slices(idx[i], room, plan)
        whole.append(len(slicer.fast.frame_indices(idx[i])))
        heads = [parse_header(f) for f in frames]
        order = sorted(range(len(frames)), key=lambda j: (heads[j].region[0], heads[j].region[2]))
        regions.append([heads[j].region for j in order])
        sizes.append(np.asarray([len(frames[j]) for j in order], dtype=np.int64))
        if dec is not None and i < decode_check:
            for f in frames:
                d = dec.decode(f)
                r0, rn, c0, cn = d.header.region
                if not np.array_equal(d.indices, idx[i][r0:r0 + rn, :, c0:c0 + cn]):
                    raise RuntimeError(f"slice {d.header.region} of tensor {i} decodes to other indices")
    return Sliced(mtu, room, plan, np.asarray(whole, dtype=np.int64), regions, sizes)


def overhead_row(s: Sliced, elements: int, auth: bool = True) -> dict[str, float]:
    """The cost of slicing at one MTU: bits per element whole and sliced, the extra bits of the slices, and on
    the wire (each datagram with the envelope and tag) against the whole frame cut into datagrams of the same
    size."""
    env = ENVELOPE_SIZE + (16 if auth else 0)
    whole = s.whole_bytes.astype(np.float64)
    sliced = np.asarray([b.sum() for b in s.slice_bytes], dtype=np.float64)
    n_slices = np.asarray([len(b) for b in s.slice_bytes], dtype=np.float64)
    whole_packets = np.ceil(whole / s.max_frame)
    wire_whole = whole + env * whole_packets
    wire_sliced = sliced + env * n_slices
    return {"plan": s.plan, "mtu": s.mtu, "max_frame": s.max_frame, "slices_per_tensor": float(n_slices.mean()),
            "packets_whole_frame": float(whole_packets.mean()),
            "bpe_whole": float(8 * whole.mean() / elements), "bpe_sliced": float(8 * sliced.mean() / elements),
            "overhead_pct": float(100 * (sliced.sum() / whole.sum() - 1)),
            "wire_overhead_pct": float(100 * (wire_sliced.sum() / wire_whole.sum() - 1))}


@dataclass
class LossPoint:
    """The metric of one way of sending, under one loss model and rate."""

    model: str
    rate: float
    method: str  # WHOLE, or "<plan> slices+<concealment>"
    metrics: dict[str, float]
    measured_loss: float  # the fraction of datagrams the channel dropped
    answered: float  # fraction of tensors answered
    concealed: float  # mean fraction of a tensor's elements concealed (over all tensors)
    affected: float  # fraction of tensors with something lost
    conceal_mse: float = math.nan  # mean squared error of the concealed elements against the lossless decode
    order: str = "interleaved"
    plan: str = ""  # the slice plan ("" for whole frames)


@dataclass
class LossEvaluation:
    """Everything ``lwfc eval-loss`` measured, as saved in loss.json."""

    bundle: str
    model: str
    shape: tuple[int, int, int]
    tensors: int
    primary: str
    reference: dict[str, float]  # int8 (uncompressed) and lossless lwfc metrics
    table: dict[str, Any]  # id, levels, contexts, how it was made
    mtu: int
    burst: float
    seed: int
    points: list[LossPoint]
    overhead: list[dict[str, float]]
    concealment_default: str = DEFAULT_METHOD
    seconds: dict[str, float] = field(default_factory=dict)
    command: str = ""
    description: str = ""
    overhead_command: str = ""  # set when the overhead was measured again (``remeasure_overhead``)

    def to_json(self) -> dict:
        return asdict(self)


def _no_answer(outputs: np.ndarray, answered: np.ndarray, detection: bool) -> np.ndarray:
    """Outputs where unanswered tensors give nothing: no detections (zero rows) for a detector; a classifier's
    unanswered rows are handled by ``_score``."""
    out = outputs.copy()
    if detection:
        out[~answered] = 0.0
    return out


def _score(metric: Any, outputs: np.ndarray, labels: np.ndarray, ref: dict[str, np.ndarray], answered: np.ndarray,
           detection: bool) -> dict[str, float]:
    """The metric with unanswered tensors counted as failures (a wrong class; no detections)."""
    if detection or answered.all():
        return metric(_no_answer(outputs, answered, detection), labels, ref)
    top1 = outputs.argmax(axis=1)
    res: dict[str, float] = {}
    if (labels >= 0).all():
        res["accuracy"] = float(((top1 == labels) & answered).mean())
    res["agreement"] = float(((top1 == ref["int8"].argmax(axis=1)) & answered).mean())
    return res


class LossRun:
    """One table's coded evaluation set (sliced by one plan) and the cloud outputs of its lossless decode;
    ``whole_frame`` and ``slices`` measure one loss model and rate. ``lossless``: those outputs, when another run
    on the same tensors has them already."""

    def __init__(self, tables: Tables, idx: np.ndarray, sliced: Sliced, session: Any, metric: Any,
                 labels: np.ndarray, ref: dict[str, np.ndarray], detection: bool, channel_mean: np.ndarray | None,
                 concealments: list[str], interleave: bool = True, burst: float = 4.0, seed: int = 0,
                 progress: bool = False, params: ConcealParams | None = None, lossless: np.ndarray | None = None):
        from lwfc_convert.cloud_runtime import batch_for, cloud_outputs

        self.tables, self.idx, self.sliced = tables, idx, sliced
        self.session, self.metric, self.labels, self.ref = session, metric, labels, ref
        self.detection = detection
        self.recon = np.asarray(tables.reconstruction, dtype=np.float32)
        self.concealers = {m: Concealer(tables, m, channel_mean, params) for m in concealments}
        self.interleave, self.burst, self.seed, self.progress = interleave, burst, seed, progress
        self.batch = batch_for(idx.shape[1:], 64)
        self._cloud = cloud_outputs
        n = len(idx)
        if lossless is None:
            lossless = np.concatenate([cloud_outputs(session, self.recon[idx[i:i + self.batch]])
                                       for i in range(0, n, self.batch)])
        self.lossless = lossless
        self.lossless_metrics = metric(self.lossless, labels, ref)

    def _rng(self, model: str, rate: float, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, LOSS_MODELS.index(model), int(round(rate * 1e6)), stream])

    def whole_frame(self, model: str, rate: float) -> LossPoint:
        """Frames cut into datagrams; a frame with any datagram lost is unanswered."""
        packets = np.ceil(self.sliced.whole_bytes / self.sliced.max_frame).astype(np.int64)
        lost = packet_losses(int(packets.sum()), rate, model, self._rng(model, rate, 0), self.burst)
        starts = np.concatenate([[0], np.cumsum(packets)[:-1]])
        answered = ~np.logical_or.reduceat(lost, starts) if len(lost) else np.ones(len(packets), dtype=bool)
        metrics = _score(self.metric, self.lossless, self.labels, self.ref, answered, self.detection)
        return LossPoint(model, rate, WHOLE, metrics, float(lost.mean()) if len(lost) else 0.0,
                         float(answered.mean()), float(1 - answered.mean()), float(1 - answered.mean()))

    def slice_losses(self, model: str, rate: float, interleave: bool) -> tuple[list[np.ndarray], float]:
        """Per tensor, which of its slices (raster order of regions) were lost; and the datagram loss rate."""
        counts = [len(r) for r in self.sliced.regions]
        lost = packet_losses(int(sum(counts)), rate, model, self._rng(model, rate, 1), self.burst)
        out, at = [], 0
        for n in counts:
            sent = lost[at:at + n]  # in send order
            by_slice = np.empty(n, dtype=bool)
            by_slice[send_order(n, interleave)] = sent
            out.append(by_slice)
            at += n
        return out, float(lost.mean()) if len(lost) else 0.0

    def known_mask(self, i: int, lost: np.ndarray) -> np.ndarray:
        h, _, c = self.idx.shape[1:]
        known = np.ones((h, c), dtype=bool)
        for (r0, rn, c0, cn), gone in zip(self.sliced.regions[i], lost):
            if gone:
                known[r0:r0 + rn, c0:c0 + cn] = False
        return known

    def slices(self, model: str, rate: float, interleave: bool | None = None,
               methods: list[str] | None = None) -> list[LossPoint]:
        """One point per concealment method: the received slices placed, the rest concealed."""
        interleave = self.interleave if interleave is None else interleave
        methods = methods or list(self.concealers)
        lost, measured = self.slice_losses(model, rate, interleave)
        affected = [i for i, gone in enumerate(lost) if gone.any()]
        masks = {i: self.known_mask(i, lost[i]) for i in affected}
        h, w, c = self.idx.shape[1:]
        concealed = sum(float((~m).mean()) for m in masks.values()) / len(self.idx)
        points = []
        for name in methods:
            conc = self.concealers[name]
            outputs = self.lossless.copy()
            sq, count = 0.0, 0
            for k in range(0, len(affected), self.batch):
                ids = affected[k:k + self.batch]
                x = np.concatenate([conc.fill_in(self.idx[i], masks[i]) for i in ids])
                outputs[ids] = self._cloud(self.session, x)
                for j, i in enumerate(ids):
                    miss = np.broadcast_to(~masks[i][:, None, :], (h, w, c))
                    diff = x[j][miss].astype(np.float64) - self.recon[self.idx[i]][miss]
                    sq += float(np.sum(diff ** 2))
                    count += diff.size
            metrics = self.metric(outputs, self.labels, self.ref)
            points.append(LossPoint(model, rate, f"{self.sliced.plan} slices+{name}", metrics, measured, 1.0,
                                    concealed, len(affected) / len(self.idx), sq / count if count else math.nan,
                                    "interleaved" if interleave else "raster", self.sliced.plan))
        return points


def design_table(stats: Any, levels: int, clip_scale: float, contexts: str) -> dict:
    """A table designed by ``lwfc_host.design`` on calibration statistics: a uniform quantizer with the MSE clip's
    top times ``clip_scale`` (``lwfc eval``'s clip sweep) and the context variant ``contexts``."""
    from lwfc_host.evaluate.lwfc_points import lwfc_designs, scaled_clip

    designs = lwfc_designs(stats, "uniform", scaled_clip(stats, levels, clip_scale), levels, [contexts])
    if not designs:
        raise ValueError(f"no {levels}-level design with contexts {contexts!r}")
    return designs[0][1].table


def calibration_params(tables: Tables, q_calib: np.ndarray, max_distance: int = 6) -> ConcealParams:
    """The concealment parameters (channel means and covariance, row predictor) fitted on the reconstructions of
    the calibration edge outputs."""
    lut = np.asarray(tables.index_of_q, dtype=np.int64)
    recon = np.asarray(tables.reconstruction, dtype=np.float32)
    return fit_conceal_params(recon[lut[q_calib.astype(np.int64) + 128]], max_distance)


def channel_means(tables: Tables, q_calib: np.ndarray) -> np.ndarray:
    """Per channel, the mean reconstructed value of the calibration edge outputs (the ``mean`` concealment)."""
    lut = np.asarray(tables.index_of_q, dtype=np.int64)
    recon = np.asarray(tables.reconstruction, dtype=np.float64)
    total = np.zeros(q_calib.shape[-1])
    for i in range(len(q_calib)):
        total += recon[lut[q_calib[i].astype(np.int64) + 128]].sum(axis=(0, 1))
    return (total / (len(q_calib) * q_calib.shape[1] * q_calib.shape[2])).astype(np.float32)


def _edge_outputs(bundle_dir: str | Path, limit: int | None, cache_dir: str | Path, progress: bool):
    """(bundle, is it a detector, cloud-half session, edge data) of ``lwfc eval``'s plan for ``limit`` images, so
    that the edge-output cache is shared with ``lwfc eval``; a detector evaluated on fewer than
    MIN_DETECTION_VIEWS views takes the quick plan's calibration views."""
    from lwfc.bundle import load_bundle
    from lwfc_convert.cloud_runtime import onnx_session
    from lwfc_host.evaluate.edge_cache import edge_data
    from lwfc_host.evaluate.metrics import bundle_task
    from lwfc_host.evaluate.plans import MIN_DETECTION_VIEWS, make_plan
    from lwfc_host.evaluate.run import SESSION_THREADS, resolve_dataset

    bundle = load_bundle(bundle_dir)
    detection = bundle_task(bundle.info) == "detection"
    ds = resolve_dataset(bundle.info, "auto")
    quick = detection and limit is not None and limit < MIN_DETECTION_VIEWS
    plan = make_plan(detection, ds, quick, limit, {}, {"lwfc"})
    session = onnx_session(bundle.cloud_path, threads=SESSION_THREADS)
    return bundle, detection, session, edge_data(bundle, ds, plan, cache_dir, progress)


def measure_overhead(tables: Tables, idx: np.ndarray, plans: list[str], mtu: int, mtus: list[int],
                     overhead_tensors: int, progress: bool = False,
                     sliced: dict[str, Sliced] | None = None) -> list[dict[str, float]]:
    """The slicing overhead rows (``overhead_row`` and the tensor count) per plan and MTU: at ``mtu`` on every
    tensor of ``idx`` (or from ``sliced``, already coded there), at the other MTUs on the first
    ``overhead_tensors``."""
    n, h, w, c = idx.shape
    rows = []
    for p in plans:
        for m in sorted(set(mtus) | {mtu}):
            if m == mtu and sliced is not None:
                s = sliced[p]
            else:
                s = code_tensors(tables, idx if m == mtu else idx[:overhead_tensors], m, progress=progress, plan=p)
            rows.append({**overhead_row(s, h * w * c), "tensors": len(s.whole_bytes)})
    return rows


def remeasure_overhead(out: str | Path, bundle_dir: str | Path, cache_dir: str | Path = "cache/eval",
                       progress: bool = True) -> LossEvaluation:
    """The evaluation saved in ``out`` (loss.json, tables.json) with its slicing overhead measured again by the
    encoder as it is now, on the same tensors, plans and MTUs (e.g. after a change to the slice header or the
    slice plans that leaves the loss results in place). Its accuracy points are kept as they were."""
    from lwfc_host.design.tablefile import load_verified

    out = Path(out)
    ev = load_loss_evaluation(out / "loss.json")
    tables = load_verified(out / "tables.json")
    if tables.table_id_hex() != ev.table.get("table_id"):
        raise ValueError(f"{out / 'tables.json'} is not the table of {out / 'loss.json'}")
    _, _, _, data = _edge_outputs(bundle_dir, ev.tensors, cache_dir, progress)
    lut = np.asarray(tables.index_of_q, dtype=np.int64)
    idx = lut[data.q_eval.astype(np.int64) + 128].astype(np.uint8)
    if len(idx) != ev.tensors:
        raise ValueError(f"the evaluation had {ev.tensors} tensors, the bundle's plan gives {len(idx)}")
    others = [int(o["tensors"]) for o in ev.overhead if int(o["mtu"]) != ev.mtu]
    mtus = sorted({int(o["mtu"]) for o in ev.overhead})
    ev.overhead = measure_overhead(tables, idx, list(ev.table["plans"]), ev.mtu, mtus,
                                   max(others) if others else ev.tensors, progress)
    return ev


def load_loss_evaluation(path: str | Path) -> LossEvaluation:
    """A ``LossEvaluation`` read back from its loss.json (e.g. to write its report again)."""
    d = json.loads(Path(path).read_text())
    d["points"] = [LossPoint(**p) for p in d["points"]]
    d["shape"] = tuple(d["shape"])
    return LossEvaluation(**d)


def write_outputs(ev: LossEvaluation, out: str | Path) -> dict[str, Path]:
    """loss.json, points.csv, overhead.csv, loss_accuracy.png and summary.md in ``out``."""
    import csv

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "loss.json", "points": out / "points.csv", "overhead": out / "overhead.csv",
             "plot": out / "loss_accuracy.png", "summary": out / "summary.md"}
    paths["json"].write_text(json.dumps(ev.to_json(), indent=1))
    keys = sorted({k for p in ev.points for k in p.metrics})
    with open(paths["points"], "w", newline="", encoding="utf-8") as f:
        wr = csv.writer(f)
        wr.writerow(["loss_model", "loss_rate", "method", "order", *keys, "measured_loss", "answered", "concealed",
                     "affected", "conceal_mse"])
        for p in ev.points:
            wr.writerow([p.model, p.rate, p.method, p.order, *[p.metrics.get(k, "") for k in keys], p.measured_loss,
                         p.answered, p.concealed, p.affected, p.conceal_mse])
    with open(paths["overhead"], "w", newline="", encoding="utf-8") as f:
        wr = csv.DictWriter(f, fieldnames=list(ev.overhead[0]))
        wr.writeheader()
        wr.writerows(ev.overhead)
    _plot(ev, paths["plot"])
    paths["summary"].write_text("\n".join(summary_lines(ev)) + "\n")
    return paths


def _label(p: LossPoint) -> str:
    return p.method + (" (raster order)" if p.order == "raster" and p.method != WHOLE else "")


def _plot(ev: LossEvaluation, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in LOSS_MODELS if any(p.model == m for p in ev.points)]
    fig, axes = plt.subplots(1, len(models), figsize=(6.6 * len(models), 4.8), squeeze=False)
    key = ev.primary
    palette = plt.get_cmap("tab10")
    plans = [p for p in dict.fromkeys(p.plan for p in ev.points) if p]
    for ax, model in zip(axes[0], models):
        labels = sorted({_label(p) for p in ev.points if p.model == model}, key=lambda s: (s != WHOLE, s))
        for lab in labels:
            pts = sorted((p for p in ev.points if p.model == model and _label(p) == lab), key=lambda p: p.rate)
            first = pts[0]
            if first.method == WHOLE:
                style = {"color": "black", "lw": 2.0, "ls": "-"}
            else:
                conceal = first.method.split("+", 1)[1]
                style = {"color": palette(METHODS.index(conceal) % 10) if conceal in METHODS else "grey",
                         "lw": 1.3, "ls": ":" if first.order == "raster" else
                         ("-" if not plans or first.plan == plans[0] else "--")}
            ax.plot([100 * p.rate for p in pts], [100 * p.metrics[key] for p in pts], marker="o", ms=3, label=lab,
                    **style)
        lossless = ev.reference.get(f"lossless {key}")
        if lossless is not None:
            ax.axhline(100 * lossless, color="grey", lw=0.8, ls=":", label="lwfc, no loss")
        name = "i.i.d. losses" if model == "iid" else f"Gilbert-Elliott bursts (mean {ev.burst:g} datagrams)"
        ax.set_title(f"{ev.model}: {name}, MTU {ev.mtu}", fontsize=9)
        ax.set_xlabel("datagram loss rate (%)")
        ax.set_ylabel(f"{key} (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def summary_lines(ev: LossEvaluation) -> list[str]:
    """The markdown summary: the table, the references, the metric at each rate per method, slicing overhead."""
    key = ev.primary
    lossless = ev.reference.get(f"lossless {key}", math.nan)
    t = ev.table
    lines = [f"# {ev.model}: {key} under packet loss", "",
             f"`{ev.command}`", "",
             f"{ev.tensors} evaluation tensors of shape {'x'.join(map(str, ev.shape))} ({ev.description}); table "
             f"{t.get('table_id')} ({t.get('how')}), {t.get('bpe_whole', math.nan):.4f} bits/element as whole "
             f"frames. Datagrams of {ev.mtu} bytes (a slice frame of at most {max_frame_bytes(ev.mtu)} bytes: "
             f"envelope and tag reserved); loss seeded ({ev.seed}); Gilbert-Elliott bursts of {ev.burst:g} datagrams "
             f"on average. Unanswered whole frames count as failures. Concealment by default: "
             f"`{ev.concealment_default}`.", "",
             "References: " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in ev.reference.items()), ""]
    for model in LOSS_MODELS:
        pts = [p for p in ev.points if p.model == model]
        if not pts:
            continue
        rates = sorted({p.rate for p in pts})
        methods = sorted({_label(p) for p in pts}, key=lambda s: (s != WHOLE, s))
        lines += [f"## {'i.i.d.' if model == 'iid' else 'Gilbert-Elliott'} losses: {key} (%), change from the "
                  "lossless lwfc in pp", "",
                  "| method | " + " | ".join(f"{100 * r:g}%" for r in rates) + " |",
                  "|---|" + "---|" * len(rates)]
        for m in methods:
            cells = []
            for r in rates:
                p = next((p for p in pts if _label(p) == m and p.rate == r), None)
                v = math.nan if p is None else p.metrics[key]
                cells.append("" if p is None else f"{100 * v:.2f} ({100 * (v - lossless):+.2f})")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        mse = [p for p in pts if p.method != WHOLE and p.rate == max(rates) and p.order == "interleaved"]
        if mse:
            lines += ["", f"Concealment MSE at {100 * max(rates):g}% loss (concealed elements against the lossless "
                          "decode): " + ", ".join(f"{p.method} {p.conceal_mse:.4g}" for p in mse)]
        lines.append("")
    lines += ["## Slicing overhead", ""]
    if ev.overhead_command:
        lines += [f"Measured again after the accuracy runs, with the same table and tensors: `{ev.overhead_command}`",
                  ""]
    lines += ["| plan | MTU | slice frame ≤ | tensors | slices/tensor | datagrams/whole frame | bits/el whole | "
              "bits/el sliced | codec overhead | wire overhead |", "|---|---|---|---|---|---|---|---|---|---|"]
    for o in ev.overhead:
        lines.append(f"| {o.get('plan', '')} | {o['mtu']} | {o['max_frame']} | {o.get('tensors', ev.tensors)} | "
                     f"{o['slices_per_tensor']:.2f} | {o['packets_whole_frame']:.2f} | {o['bpe_whole']:.4f} | "
                     f"{o['bpe_sliced']:.4f} | {o['overhead_pct']:.2f}% | {o['wire_overhead_pct']:.2f}% |")
    lines += ["", "Codec overhead: the slices' frame bytes against the whole frame's. Wire overhead: with the "
              "link envelope and tag (36 bytes) on every datagram, against the whole frame cut into datagrams of "
              "the same size. Plans (`lwfc.slices.PLANS`): `channels` cuts channel blocks over all rows "
              "(rows too only when there are more slices than channels); `rows` is the codec's own plan "
              "(`lwfc.slices`), row bands first.", ""]
    return lines


def headline(ev: LossEvaluation, rate: float = 0.1) -> list[str]:
    """A few lines for the terminal: the metric at ``rate`` per method and loss model, and the overhead at the
    evaluation's MTU."""
    key = ev.primary
    lossless = ev.reference.get(f"lossless {key}", math.nan)
    out = [f"lossless lwfc {key} {100 * lossless:.2f}% (" + ", ".join(f"{k} {100 * v:.2f}%"
                                                                       for k, v in ev.reference.items()) + ")"]
    for p in ev.points:
        if abs(p.rate - rate) < 1e-9:
            out.append(f"{p.model:4s} {100 * rate:g}% loss  {_label(p):44s} {key} {100 * p.metrics[key]:6.2f}% "
                       f"({100 * (p.metrics[key] - lossless):+.2f} pp); concealed {100 * p.concealed:.2f}% of "
                       "the elements")
    for o in ev.overhead:
        out.append(f"{o.get('plan', ''):8s} slices, MTU {o['mtu']:5d}: {o['slices_per_tensor']:.2f} slices/tensor, "
                   "codec overhead "
                   f"{o['overhead_pct']:.2f}%, wire overhead {o['wire_overhead_pct']:.2f}%")
    return out


def evaluate_loss(bundle_dir: str | Path, tables_path: str | None = None, levels: int = 6, clip_scale: float = 1.6,
                  contexts: str = "auto", limit: int | None = None, rates: list[float] | None = None,
                  models: list[str] | None = None, burst: float = 4.0, mtu: int = 1200,
                  overhead_mtus: list[int] | None = None, concealments: list[str] | None = None,
                  seed: int = 0, cache_dir: str | Path = "cache/eval", raster_too: bool = True,
                  decode_check: int = 200, progress: bool = True, out: str | Path | None = None,
                  overhead_tensors: int = 1000, plans: list[str] | None = None,
                  other_concealments: list[str] | None = None) -> LossEvaluation:
    """Run the whole evaluation (see the module docstring); ``out``: where the designed table and the concealment
    parameters are written. ``plans``: slice plans (``lwfc.slices.PLANS``; default auto, then rows), the first
    with every method of ``concealments``, the others with ``other_concealments`` (default zero and the default
    method). The overhead at MTUs other than ``mtu`` is measured on the first ``overhead_tensors`` tensors."""
    from lwfc_host.design.tablefile import load_verified
    from lwfc_host.evaluate.lwfc_points import lwfc_stats
    from lwfc_host.evaluate.metrics import METRICS, resolve_metric

    times: dict[str, float] = {}
    t0 = time.time()
    bundle, detection, session, data = _edge_outputs(bundle_dir, limit, cache_dir, progress)
    metric_name = resolve_metric(bundle.info, "auto")
    metric = METRICS[metric_name]()
    times["edge_outputs"] = time.time() - t0
    t0 = time.time()
    if tables_path:
        tables = load_verified(tables_path)
        how = f"from {tables_path}"
    else:
        table = design_table(lwfc_stats(data), levels, clip_scale, contexts)
        tables = Tables(table)
        how = f"designed here: uniform, {levels} levels, MSE clip top x{clip_scale:g}, contexts {contexts}"
        if out is not None:
            from lwfc_host.design.tablefile import write_tables

            Path(out).mkdir(parents=True, exist_ok=True)
            write_tables(table, Path(out) / "tables.json")
    times["design"] = time.time() - t0
    lut = np.asarray(tables.index_of_q, dtype=np.int64)
    idx = lut[data.q_eval.astype(np.int64) + 128].astype(np.uint8)
    n, h, w, c = idx.shape
    chosen: list[str] = []
    for p in plans or ["auto", "rows"]:
        p = choose_plan(tables, p)
        if p not in chosen:
            chosen.append(p)
    t0 = time.time()
    sliced = {p: code_tensors(tables, idx, mtu, decode_check=decode_check, progress=progress, plan=p) for p in chosen}
    overhead = measure_overhead(tables, idx, chosen, mtu, list(overhead_mtus or DEFAULT_MTUS), overhead_tensors,
                                progress, sliced)
    times["coding"] = time.time() - t0
    t0 = time.time()
    params = calibration_params(tables, data.q_calib)
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        params.save(Path(out) / "conceal_params.npz")  # `lwfc serve --conceal-params` takes it
    times["conceal_params"] = time.time() - t0
    t0 = time.time()
    concealments = concealments or list(METHODS)
    others = other_concealments or sorted({"zero", DEFAULT_METHOD})
    runs, lossless = [], None
    for i, p in enumerate(chosen):
        run = LossRun(tables, idx, sliced[p], session, metric, data.labels, data.ref, detection, params.channel_mean,
                      concealments if i == 0 else others, True, burst, seed, progress, params, lossless)
        lossless = run.lossless
        runs.append(run)
    primary = metric.primary(data.labeled)
    reference = {f"int8 {primary}": metric(data.ref["int8"], data.labels, data.ref)[primary],
                 f"lossless {primary}": runs[0].lossless_metrics[primary]}
    points: list[LossPoint] = []
    from tqdm import tqdm

    scenarios = [(m, r) for m in (models or list(LOSS_MODELS)) for r in (rates or list(DEFAULT_RATES))]
    for model, rate in tqdm(scenarios, desc="loss scenarios", disable=not progress, leave=False):
        points.append(runs[0].whole_frame(model, rate))
        for i, run in enumerate(runs):
            points.extend(run.slices(model, rate))
            if i == 0 and raster_too and model == "ge" and DEFAULT_METHOD in run.concealers:
                points.extend(run.slices(model, rate, interleave=False, methods=[DEFAULT_METHOD]))
    times["scenarios"] = time.time() - t0
    table_info = {"table_id": tables.table_id_hex(), "levels": tables.levels, "groups": tables.groups,
                  "classes": tables.classes, "reference_classes": tables.reference_classes,
                  "version": tables.version, "how": how, "plans": chosen,
                  "bpe_whole": overhead_row(sliced[chosen[0]], h * w * c)["bpe_whole"]}
    return LossEvaluation(str(bundle_dir), bundle.model, (h, w, c), n, primary, reference, table_info, mtu, burst,
                          seed, points, overhead, seconds=times, description=data.description)
