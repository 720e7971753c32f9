"""Writes an evaluation: points.csv, rate_accuracy.png (matplotlib Agg), report.md with the headline table,
and evaluation.json (everything, for later comparison)."""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from lwfc_host.evaluate.plans import Plan
from lwfc_host.evaluate.results import Evaluation, Point

CSV_COLUMNS = ["method", "setting", "bits_per_element", "bits_per_element_no_param_sets", "accuracy", "agreement",
               "agreement_confident", "agreement_float", "map50", "map50_float", "recall", "precision", "mse",
               "encode_ms", "decode_ms", "tensors", "notes"]
METRIC_COLUMNS = CSV_COLUMNS[4:12]
# How detection metrics are named in titles and table headers (classifier metrics go by their keys).
LABELS = {"map50": "mAP@0.5", "map50_float": "mAP@0.5 vs float model"}
RATES = (0.5, 0.8, 1.0)
TOLERANCE_PP = 1.0


def _fmt(v: float, digits: int = 4) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def write_csv(points: list[Point], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        wr = csv.writer(f)
        wr.writerow(CSV_COLUMNS)
        for p in points:
            m = p.metrics
            wr.writerow([p.method, p.setting, _fmt(p.bits_per_element, 5), _fmt(p.bits_per_element_no_param_sets, 5),
                         *(_fmt(m.get(k, math.nan)) for k in METRIC_COLUMNS),
                         _fmt(p.mse, 6), _fmt(p.encode_ms, 3), _fmt(p.decode_ms, 3), p.tensors, p.notes])


def curve(points: list[Point], metric: str) -> tuple[np.ndarray, np.ndarray]:
    """The method's operating curve: its points sorted by rate, keeping only those that beat every cheaper
    point (the upper envelope: nobody would pick a costlier point with lower accuracy)."""
    pts = sorted((p.bits_per_element, p.metrics[metric]) for p in points
                 if metric in p.metrics and math.isfinite(p.bits_per_element))
    r, a = [], []
    for rate, acc in pts:
        if not a or acc > a[-1]:
            r.append(rate)
            a.append(acc)
    return np.asarray(r), np.asarray(a)


def rate_for(r: np.ndarray, a: np.ndarray, target: float) -> float:
    """Lowest rate at which the (linearly interpolated) curve reaches ``target``; NaN if it never does."""
    if len(r) == 0 or a.max() < target:
        return math.nan
    k = int(np.argmax(a >= target))
    if k == 0:
        return float(r[0])  # already reached at the lowest rate measured (an upper bound)
    return float(r[k - 1] + (target - a[k - 1]) * (r[k] - r[k - 1]) / (a[k] - a[k - 1]))


def metric_at(r: np.ndarray, a: np.ndarray, rate: float) -> float:
    """The curve's value at ``rate`` (linear interpolation; NaN outside the measured range, except that
    above the last point the best measured value holds)."""
    if len(r) == 0 or rate < r[0]:
        return math.nan
    if rate >= r[-1]:
        return float(a[-1])
    return float(np.interp(rate, r, a))


def methods_of(points: list[Point]) -> list[str]:
    seen: list[str] = []
    for p in points:
        if p.method not in seen:
            seen.append(p.method)
    return seen


def reference_value(ev: Evaluation) -> tuple[float, str]:
    """The value a method must stay within 1 pp of: the float model's accuracy (labeled; for a fine-tuned
    model the higher of its own and the original model's, so that fine-tuning cannot lower the bar), 100% agreement
    with the uncompressed pipeline (unlabeled), or mAP@0.5 100% against the uncompressed int8 pipeline's
    detections (detectors)."""
    if ev.primary == "accuracy":
        original = ev.reference.get("original float accuracy", math.nan)
        if "float accuracy" in ev.reference and original > ev.reference["float accuracy"]:
            return original, "accuracy of the model it was fine-tuned from (above its own float accuracy)"
        if "float accuracy" in ev.reference:
            return ev.reference["float accuracy"], "float model accuracy"
        return ev.reference["int8 accuracy"], "int8 edge accuracy (float model not available)"
    if ev.primary == "map50":
        return 1.0, "uncompressed int8 pipeline's detections (mAP@0.5 100%)"
    return 1.0, "uncompressed int8 pipeline (agreement 100%)"


def secondary(ev: Evaluation) -> tuple[str, float, str] | None:
    """A second headline where the metric has one: for detectors, mAP@0.5 against the float model's detections,
    within 1 point of what the uncompressed int8 pipeline reaches against them."""
    value = ev.reference.get("int8 map50_float", math.nan)
    if ev.primary == "map50" and math.isfinite(value):
        return "map50_float", value, "uncompressed int8 pipeline's mAP@0.5 vs the float model"
    return None


def headline(ev: Evaluation, metric: str | None = None, ref: float | None = None) -> list[dict]:
    """Per method: the rate to stay within 1 pp of ``ref`` on ``metric`` (default: the primary metric and its
    reference value), the metric at RATES, the best value and the lowest rate."""
    metric = metric or ev.primary
    if ref is None:
        ref, _ = reference_value(ev)
    target = ref - TOLERANCE_PP / 100
    rows = []
    for m in methods_of(ev.points):
        pts = [p for p in ev.points if p.method == m]
        r, a = curve(pts, metric)
        if not len(r):  # only failed designs: listed under the per-method table, not as a method
            continue
        row = {"method": m, "rate_within_1pp": rate_for(r, a, target), "best": float(a.max()),
               "lowest_rate": float(r[0])}
        for x in RATES:
            row[f"at_{x}"] = metric_at(r, a, x)
        rows.append(row)
    return rows


def family(method: str) -> str:
    """The family a method's curve belongs to in the headline chart: lwfc with spec v2's designed contexts (the
    ``auto`` variant, reference channels where they win), lwfc within spec v1 (every other variant), and one per
    baseline codec."""
    if method.startswith("lwfc"):
        return "lwfc v2 (designed contexts + reference channels)" if method.endswith("ctx=auto") else "lwfc v1"
    head = method.split()[0]
    return {"hevc": "HEVC (x265)", "av1": "AV1 (libaom)", "jpeg": "JPEG", "webp": "WebP"}.get(head, head)


def envelope(points: list[Point], metric: str) -> tuple[np.ndarray, np.ndarray]:
    """The Pareto front of points: by rising rate, each point that beats every cheaper one on ``metric``."""
    pts = sorted((p for p in points if metric in p.metrics and math.isfinite(p.bits_per_element)),
                 key=lambda p: (p.bits_per_element, -p.metrics[metric]))
    rates, values = [], []
    for p in pts:
        if not values or p.metrics[metric] > values[-1]:
            rates.append(p.bits_per_element)
            values.append(p.metrics[metric])
    return np.asarray(rates), np.asarray(values)


def families(ev: Evaluation) -> dict[str, list[Point]]:
    """The measured points of each family. A setting without a point (a failed design, a capped sweep scale) is
    left out: the report names it once under its own heading, and alone it would make a family of nothing."""
    out: dict[str, list[Point]] = {}
    for p in ev.points:
        if math.isfinite(p.bits_per_element):
            out.setdefault(family(p.method), []).append(p)
    return out


def family_headline(ev: Evaluation) -> list[dict]:
    """Per family: the rate within 1 pp of the reference, its best value and lowest rate. The rate is the lowest
    of its envelope's and of each of its methods' own curves: linear interpolation over the union of two curves
    can cross the target later than one of them does (a flatter segment), and every interpolated point can be
    had by time-sharing the two settings it lies between."""
    ref, _ = reference_value(ev)
    target = ref - TOLERANCE_PP / 100
    rows = []
    for name, pts in families(ev).items():
        r, a = envelope(pts, ev.primary)
        rates = [rate_for(r, a, target)] + [rate_for(*curve([p for p in pts if p.method == m], ev.primary), target)
                                            for m in methods_of(pts)]
        finite = [x for x in rates if math.isfinite(x)]
        rows.append({"family": name, "rate_within_1pp": min(finite) if finite else math.nan,
                     "best": float(a.max()) if len(a) else math.nan,
                     "lowest_rate": float(r[0]) if len(r) else math.nan})
    return rows


def _reference_lines(ax, ev: Evaluation) -> None:
    """The horizontal lines every chart has: the references and the 1-pp line; then axes, limits and title."""
    ref, ref_name = reference_value(ev)
    if ev.primary == "accuracy":
        if "float accuracy" in ev.reference:
            ax.axhline(100 * ev.reference["float accuracy"], color="k", lw=1, label="float model")
        if "original float accuracy" in ev.reference:
            ax.axhline(100 * ev.reference["original float accuracy"], color="k", lw=1, ls=":",
                       label="float model before fine-tuning")
        ax.axhline(100 * ev.reference["int8 accuracy"], color="grey", lw=1, ls="--", label="int8 edge, no codec")
    elif ev.primary == "map50":
        ax.axhline(100.0, color="grey", lw=1, ls="--", label="int8 pipeline, no codec (the reference)")
        if "float map50" in ev.reference:
            ax.axhline(100 * ev.reference["float map50"], color="k", lw=1,
                       label="float model vs int8 pipeline detections")
    else:
        ax.axhline(100.0, color="grey", lw=1, ls="--", label="int8 edge, no codec")
        if "float agreement" in ev.reference:
            ax.axhline(100 * ev.reference["float agreement"], color="k", lw=1, label="float model vs int8 pipeline")
    ax.axhline(100 * ref - TOLERANCE_PP, color="r", lw=0.8, ls=":", label=f"{ref_name} - 1 pp")
    ax.set_xscale("log")
    ax.set_xlabel("bits per element (all bytes sent per tensor)")
    ax.set_ylabel({"accuracy": "top-1 accuracy (%)", "map50": "mAP@0.5 vs uncompressed int8 pipeline (%)"}
                  .get(ev.primary, "top-1 agreement (%)"))
    lo = min(100 * ref - 15, min((100 * p.metrics.get(ev.primary, 1) for p in ev.points if p.metrics), default=0))
    ax.set_ylim(max(lo, 100 * ref - 30), 100 * ref + 2 if ev.primary == "accuracy" else 101)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(f"{ev.bundle['model']} split at {ev.bundle['split']} ({ev.tensors} tensors "
                 f"{ev.shape[0]}x{ev.shape[1]}x{ev.shape[2]})", fontsize=9)  # long split names fit


def plot(ev: Evaluation, path: Path) -> None:
    """The headline chart: one envelope per family (lwfc v2, lwfc v1, each baseline) and the 1-pp line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    for name, pts in families(ev).items():
        r, a = envelope(pts, ev.primary)
        if len(r):
            lwfc = name.startswith("lwfc")
            ax.plot(r, 100 * a, "-" if lwfc else "--", marker="o" if lwfc else ".", lw=2.2 if "v2" in name else 1.5,
                    label=name)
    _reference_lines(ax, ev)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_variants(ev: Evaluation, path: Path) -> None:
    """Every method's curve (lwfc's quantizer, clip and context variants, each baseline setting family)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 6.5))
    styles = {"lwfc": "-", "hevc": "--", "av1": "--", "jpeg": ":", "webp": ":", "uniform+rle": "-.",
              "uniform+zlib": "-."}
    for m in methods_of(ev.points):
        pts = sorted((p for p in ev.points if p.method == m and ev.primary in p.metrics
                      and math.isfinite(p.bits_per_element)), key=lambda p: p.bits_per_element)
        if not pts:
            continue
        ls = styles.get(m.split()[0], "-")
        lw = 2.0 if m.startswith(("hevc", "av1")) or m.endswith(("ctx=groups+k2", "ctx=groups+k3", "ctx=auto")) \
            else 1.0
        ax.plot([p.bits_per_element for p in pts], [100 * p.metrics[ev.primary] for p in pts], ls, marker=".",
                lw=lw, label=m)
    _reference_lines(ax, ev)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def peak_memory(ev: Evaluation) -> str:
    """``Evaluation.peak_rss_mb`` in words."""
    if math.isnan(ev.peak_rss_mb):
        return "not recorded"
    return (f"{ev.peak_rss_mb:.0f} MB resident in the largest process (the evaluation, the edge-output computation, "
            "ffmpeg" + (f" or one of the {ev.jobs} workers, which run side by side)" if ev.jobs > 1 else ")"))


def markdown(ev: Evaluation) -> str:
    ref, ref_name = reference_value(ev)
    h, w, c = ev.shape
    pm = ev.metric_description or ("accuracy" if ev.primary == "accuracy"
                                   else "top-1 agreement with the uncompressed int8 pipeline")
    label = LABELS.get(ev.primary, ev.primary)
    lines = [f"# Rate-{label} evaluation: {ev.bundle['model']}, split {ev.bundle['split']}", ""]
    if ev.command:
        lines += ["Command: `" + ev.command + "`", ""]
    lines += [
        f"- Tensors: {ev.tensors} of shape {h}x{w}x{c} ({h * w * c} elements), int8 from the TFLite edge half; "
        f"{ev.description}.",
        f"- Metric: {pm}. Reference: {ref_name} = {100 * ref:.2f}%. "
        + ", ".join(f"{k} {100 * v:.2f}%" for k, v in ev.reference.items() if not math.isnan(v)) + ".",
        "- Rates: 8 x every byte a receiver needs per tensor / elements, averaged over tensors: lwfc frames with "
        "header and CRC (tables sent once per session, not counted); HEVC access units with the parameter sets "
        "x265 repeats before every all-intra picture, plus 64 bits of min/max; JPEG/WebP: every tile file with "
        "its headers plus min/max; RLE and zlib: the coded bytes (zlib plus min/max).",
        f"- Wall time: {sum(ev.seconds.values()):.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in
                                                                       ev.seconds.items()) + ")"
        + (f"; per method, summed over {ev.jobs} worker processes: " if ev.jobs > 1 else "; per method: ")
        + ", ".join(f"{k} {v:.0f} s" for k, v in ev.method_seconds.items()) + ".",
        f"- Peak memory: {peak_memory(ev)}.",
        "",
        f"## Headline (within {TOLERANCE_PP:g} pp of the reference, interpolated on each family's envelope)",
        "",
        "rate_accuracy.png draws these envelopes; rate_accuracy_variants.png every method's own curve.",
        "",
        f"| family | bits/element within {TOLERANCE_PP:g} pp | best {label} | lowest rate |",
        "|---|---|---|---|",
    ]
    for row in family_headline(ev):
        lines.append(f"| {row['family']} | {_fmt(row['rate_within_1pp'])} | {100 * row['best']:.2f}% | "
                     f"{_fmt(row['lowest_rate'])} |")
    lines += ["", f"### Per method (within {TOLERANCE_PP:g} pp, on each method's upper envelope)", ""]
    rows = headline(ev)
    lines += _table(rows, label)
    lines += ["", "`-`: the method has no point at or below that rate. A rate equal to a method's lowest rate means "
              "the target was already met at its cheapest point (an upper bound).", ""]
    failed = [p for p in ev.points if not math.isfinite(p.bits_per_element)]
    if failed:
        lines += ["Settings that gave no point: " + "; ".join(f"{p.method}, {p.setting} ({p.notes})" for p in failed)
                  + ".", ""]
    sec = secondary(ev)
    if sec:
        metric, value, name = sec
        lines += [f"### Against the float model: {LABELS.get(metric, metric)}, within {TOLERANCE_PP:g} pp of the "
                  f"{name} ({100 * value:.2f}%)", ""]
        lines += _table(headline(ev, metric, value), LABELS.get(metric, metric)) + [""]
    lines += _verdict(ev, rows)
    if ev.hevc_single_process_ms:
        s = ev.hevc_single_process_ms
        lines += ["", f"HEVC timing: points.csv gives x265/ffmpeg time per tensor inside one stream (one process "
                  f"for a batch of tensors). With one ffmpeg process per tensor (QP {s['qp']}, 8-bit) encoding took "
                  f"{s['encode_ms']:.0f} ms and decoding {s['decode_ms']:.0f} ms, mostly process start-up.", ""]
    lines += ["lwfc timing: encode = numpy table lookup + constriction range coder + framing "
              "(`lwfc_host.codec.fast`, byte-identical to the pure-Python device encoder); decode = the host decoder "
              "with the canonical-payload check. Context variants of one quantizer share its reconstruction, so the "
              "cloud runs once per quantizer; every variant's frames are all encoded, the first decoded in full, the "
              "others on a subset (notes column) and checked to give the same indices.", ""]
    lines += ["## All points", "", "| method | setting | bits/element | " + label + " | enc ms | dec ms |",
              "|---|---|---|---|---|---|"]
    for p in ev.points:
        if not math.isfinite(p.bits_per_element):
            continue  # listed above under "Settings that gave no point"
        v = p.metrics.get(ev.primary, math.nan)
        extra = f" ({p.bits_per_element_no_param_sets:.4f} w/o param sets)" if math.isfinite(
            p.bits_per_element_no_param_sets) else ""
        lines.append(f"| {p.method} | {p.setting} | {p.bits_per_element:.4f}{extra} | "
                     f"{100 * v:.2f}% | {p.encode_ms:.2f} | {p.decode_ms:.2f} |")
    return "\n".join(lines) + "\n"


def _table(rows: list[dict], label: str) -> list[str]:
    lines = ["| method | bits/element within 1 pp | " + " | ".join(f"{label} @ {x} b/e" for x in RATES)
             + " | best | lowest rate |",
             "|---|---|" + "---|" * len(RATES) + "---|---|"]
    for row in sorted(rows, key=lambda r: (math.isnan(r["rate_within_1pp"]), r["rate_within_1pp"])):
        lines.append(f"| {row['method']} | {_fmt(row['rate_within_1pp'], 3) or 'not reached'} | "
                     + " | ".join((f"{100 * row[f'at_{x}']:.2f}%" if math.isfinite(row[f"at_{x}"]) else "-")
                                  for x in RATES)
                     + f" | {100 * row['best']:.2f}% | {_fmt(row['lowest_rate'], 3)} |")
    return lines


def _verdict(ev: Evaluation, rows: list[dict]) -> list[str]:
    """Plain statements against the goal: below 0.6 bits/element within 1 pp, and clearly fewer bits than HEVC."""
    lw = [r for r in rows if r["method"].startswith("lwfc") and math.isfinite(r["rate_within_1pp"])]
    hv = [r for r in rows if r["method"].startswith("hevc") and math.isfinite(r["rate_within_1pp"])]
    out = ["## Against the goal", ""]
    if not lw:
        out.append("- No lwfc variant reached the reference within 1 pp at the rates tried: goal NOT met here.")
        out += _equal_quality(ev, rows)
        return out
    best = min(lw, key=lambda r: r["rate_within_1pp"])
    b = best["rate_within_1pp"]
    out.append(f"- Best lwfc variant: {best['method']} needs {b:.3f} bits/element to stay within 1 pp "
               + ("(below 0.6: goal met)." if b < 0.6 else "(NOT below 0.6: goal missed)."))
    if hv:
        h = min(hv, key=lambda r: r["rate_within_1pp"])
        hr = h["rate_within_1pp"]
        verdict = ("fewer bits than HEVC" if b < 0.9 * hr else "about the same as HEVC" if b <= 1.1 * hr
                   else "MORE bits than HEVC")
        out.append(f"- Best HEVC: {h['method']} needs {hr:.3f} bits/element; lwfc needs {100 * (b / hr - 1):+.0f}% "
                   f"({verdict}).")
    else:
        out.append("- No HEVC setting reached the reference within 1 pp at the QPs tried.")
    av = [r for r in rows if r["method"].startswith("av1") and math.isfinite(r["rate_within_1pp"])]
    if av:
        a = min(r["rate_within_1pp"] for r in av)
        out.append(f"- Best AV1 (libaom all-intra) needs {a:.3f} bits/element; lwfc needs {100 * (b / a - 1):+.0f}%.")
    elif any(r["method"].startswith("av1") for r in rows):
        out.append("- No AV1 setting reached the reference within 1 pp at the quality levels tried.")
    return out + _equal_quality(ev, rows)


def _equal_quality(ev: Evaluation, rows: list[dict]) -> list[str]:
    """Rates of the best lwfc variant and of HEVC at the highest quality every one of them reaches (so that the
    comparison is made on the curves themselves even where the 1 pp target is out of reach)."""
    lw = [r for r in rows if r["method"].startswith("lwfc") and math.isfinite(r["best"])]
    hv = [r for r in rows if r["method"].startswith("hevc") and math.isfinite(r["best"])]
    if not lw or not hv:
        return []
    level = min(max(r["best"] for r in lw), max(r["best"] for r in hv)) - 0.005
    rates = {}
    for group in (lw, hv):
        for r in group:
            c = curve([p for p in ev.points if p.method == r["method"]], ev.primary)
            rates[r["method"]] = rate_for(*c, level)
    best_lw = min((m for m in rates if m.startswith("lwfc")), key=lambda m: (math.isnan(rates[m]), rates[m]))
    best_hv = min((m for m in rates if m.startswith("hevc")), key=lambda m: (math.isnan(rates[m]), rates[m]))
    a, b = rates[best_lw], rates[best_hv]
    if not (math.isfinite(a) and math.isfinite(b)):
        return []
    who = "lwfc" if a < b else "HEVC"
    return [f"- At {100 * level:.1f}% {ev.primary} (just below the best that both reach): {best_lw} needs {a:.3f} "
            f"bits/element, {best_hv} {b:.3f}; {who} needs fewer ({100 * (a / b - 1):+.0f}% for lwfc)."]


def load_evaluation(path: str | Path) -> Evaluation:
    """An Evaluation read back from evaluation.json (to re-render a report without re-running it)."""
    d = json.loads(Path(path).read_text(encoding="utf-8"))
    d.pop("headline", None)
    d.pop("headline_secondary", None)
    d["plan"] = Plan(**d["plan"])
    d["points"] = [Point(**p) for p in d["points"]]
    d["shape"] = tuple(d["shape"])
    return Evaluation(**d)



class ExtendError(ValueError):
    """An evaluation cannot be extended with another (different bundle, data or tensors)."""


def check_extendable(previous_dir: Path, bundle: dict) -> Evaluation:
    """The evaluation saved in ``previous_dir``, if a run on ``bundle`` (its bundle.json) may extend it: same
    model and split. Raises ExtendError otherwise (what a run can be checked against before it starts)."""
    path = previous_dir / "evaluation.json"
    if not path.exists():
        raise ExtendError(f"{previous_dir} holds no evaluation.json to extend")
    try:
        old = load_evaluation(path)
    except (OSError, ValueError, TypeError) as exc:
        raise ExtendError(f"cannot read {path}: {exc}") from exc
    for key in ("model", "split"):
        if old.bundle.get(key) != bundle.get(key):
            raise ExtendError(f"cannot extend {previous_dir}: its bundle's {key} is {old.bundle.get(key)!r}, "
                              f"this bundle's is {bundle.get(key)!r}")
    return old


def extend_evaluation(previous_dir: str | Path, new: Evaluation) -> Evaluation:
    """``new``'s points added to the evaluation saved in ``previous_dir`` (``lwfc eval --extend``).

    Both must have coded the same cached edge outputs (same bundle files, data set, evaluation and calibration
    images: the edge-cache key says so) with the same metric. A point of ``new`` replaces an earlier one with
    the same method and setting. Plans are merged (unions), wall and method seconds summed, commands kept in
    order. The earlier points' table files are read back, so that the report written next holds them all."""
    previous_dir = Path(previous_dir)
    old = check_extendable(previous_dir, new.bundle)
    for what, a, b in (("edge-output cache (bundle files, data set, images)", Path(old.edge_cache).name,
                        Path(new.edge_cache).name),
                       ("number of tensors", old.tensors, new.tensors), ("metric", old.metric, new.metric)):
        if a != b:
            raise ExtendError(f"cannot extend {previous_dir}: its {what} is {a!r}, this run's is {b!r}")
    for p in old.points:
        ref = p.extra.get("table")
        if isinstance(ref, str):
            try:
                p.extra["table"] = json.loads((previous_dir / ref).read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise ExtendError(f"cannot read table {ref} of {previous_dir}: {exc}") from exc
            p.notes = "; ".join(n for n in p.notes.split("; ") if not n.startswith("table tables/"))
    replaced = {(p.method, p.setting) for p in new.points}
    points = [p for p in old.points if (p.method, p.setting) not in replaced] + list(new.points)
    plan = copy.deepcopy(old.plan)
    for f in dataclasses.fields(plan):
        a, b = getattr(plan, f.name), getattr(new.plan, f.name)
        if isinstance(a, list):
            setattr(plan, f.name, sorted(set(a) | set(b), key=lambda v: (str(type(v)), v)))
        elif isinstance(a, dict):
            merged = {int(k): list(v) for k, v in a.items()}
            for k, v in b.items():
                merged[int(k)] = sorted(set(merged.get(int(k), [])) | set(v))
            setattr(plan, f.name, merged)
    seconds = dict(old.seconds)
    for k, v in new.seconds.items():
        seconds[k] = seconds.get(k, 0.0) + v
    method_seconds = dict(old.method_seconds)
    for k, v in new.method_seconds.items():
        method_seconds[k] = method_seconds.get(k, 0.0) + v
    return dataclasses.replace(new, points=points, plan=plan, seconds=seconds, method_seconds=method_seconds,
                               command="; ".join(c for c in (old.command, new.command) if c),
                               hevc_single_process_ms=new.hevc_single_process_ms or old.hevc_single_process_ms,
                               jobs=max(old.jobs, new.jobs),
                               peak_rss_mb=max(new.peak_rss_mb, old.peak_rss_mb))


def write_report(ev: Evaluation, out_dir: str | Path) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "points.csv", "png": out / "rate_accuracy.png",
             "variants": out / "rate_accuracy_variants.png", "md": out / "report.md", "json": out / "evaluation.json"}
    # the lwfc tables, so that anyone can re-encode the cached tensors and check the rates
    tdir = out / "tables"
    # a report directory rewritten (e.g. by --extend) keeps no tables that no point refers to; points read back
    # from evaluation.json (re-rendering) refer to theirs by path
    kept = {str(p.extra["table"]) for p in ev.points if isinstance(p.extra.get("table"), str)}
    for stale in tdir.glob("*.json"):
        if f"tables/{stale.name}" not in kept:
            stale.unlink()
    for i, p in enumerate(ev.points):
        table = p.extra.get("table")
        if isinstance(table, dict):
            tdir.mkdir(exist_ok=True)
            name = f"{i:03d}_{table['table_id']}.json"
            (tdir / name).write_text(json.dumps(table), encoding="utf-8")
            p.extra["table"] = f"tables/{name}"
            p.notes = (p.notes + "; " if p.notes else "") + f"table tables/{name}"
    write_csv(ev.points, paths["csv"])
    plot(ev, paths["png"])
    plot_variants(ev, paths["variants"])
    paths["md"].write_text(markdown(ev), encoding="utf-8")
    d = ev.to_json()
    d["bundle"] = {k: v for k, v in d["bundle"].items() if k != "class_names"}
    d["headline"] = headline(ev)
    sec = secondary(ev)
    if sec:
        d["headline_secondary"] = {"metric": sec[0], "reference": sec[1], "rows": headline(ev, sec[0], sec[1])}
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(d, f, indent=1, default=float)
    return paths


if __name__ == "__main__":  # python -m lwfc_host.evaluate.report REPORT_DIR: re-render report.md and the plot
    import sys

    ev = load_evaluation(Path(sys.argv[1]) / "evaluation.json")
    write_report(ev, sys.argv[1])
