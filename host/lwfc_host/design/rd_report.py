"""The rate-distortion report of ``lwfc design --report``: uniform and ECSQ quantizers at several level
counts on the calibration data, printed as a table, plotted as MSE against bits/element (PNG), and saved
as JSON next to the plot.

Rates are payload bits/element without the frame overhead, with one model and with channel-group models
(G chosen for the uniform quantizer at each N and kept for the ECSQ points of that N).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from lwfc_host.design import table_design as dz
from lwfc_host.design.calibration import LoadedStats
from lwfc_host.design.clipping import ClipChoice
from lwfc_host.design.quantizers import DesignError
from lwfc_host.design.table_design import RDPoint

REPORT_LEVELS = [2, 3, 4, 5, 6, 8, 12, 16]
TABLE_LEVELS = [2, 3, 4, 8]
REPORT_LAMBDAS = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1]


@dataclass
class TableRow:
    """One level count of the printed table: the uniform quantizer, ECSQ at lambda 0, and ECSQ at the
    uniform quantizer's coded rate with N and with 2N levels (at most 16)."""

    levels: int
    uniform: RDPoint
    ecsq_lambda0: RDPoint
    ecsq_equal_rate: RDPoint
    ecsq_equal_rate_2n: RDPoint


@dataclass
class RDReport:
    """``uniform``: one point per level count; ``ecsq``: per level count, lambda 0 then the lambda sweep."""

    uniform: list[RDPoint] = field(default_factory=list)
    ecsq: list[list[RDPoint]] = field(default_factory=list)
    rows: list[TableRow] = field(default_factory=list)


def _ecsq_sweep(stats: LoadedStats, levels: int, cc: ClipChoice, pu: RDPoint) -> list[RDPoint]:
    """ECSQ at lambda 0 and each of REPORT_LAMBDAS (until lambda leaves a single cell), for the rate of
    channel-group models with the uniform quantizer's grouping and G (choosing G again for every point
    costs minutes on wide layers and changes little)."""
    hist = stats.histogram()
    grp = (pu.labels, stats.arrays["ch_zeros"]) if pu.groups > 1 else None
    q0 = dz.ecsq(hist, levels, 0.0, cc.c_min, cc.c_max, dz.zeros_of(stats), groups=grp)
    pts = [dz.rd_point(stats, q0, pu.groups)]
    for lam in REPORT_LAMBDAS:
        try:
            q = dz.ecsq(hist, levels, lam, cc.c_min, cc.c_max, dz.zeros_of(stats), groups=grp)
        except DesignError:
            break
        pts.append(dz.rd_point(stats, q, pu.groups))
    return pts


def _equal_rate_row(stats: LoadedStats, levels: int, clip: str, cc: ClipChoice, pu: RDPoint,
                    p0: RDPoint) -> TableRow:
    """ECSQ at the uniform quantizer's coded rate (channel-group models, the uniform's grouping), with N
    levels and with twice as many: the entropy constraint decides how many get used."""
    qe = dz.equal_rate_ecsq(stats, levels, cc, pu.grouped, pu.labels)
    n2 = min(2 * levels, 16)
    _, cc2 = dz.design_quantizer(stats, n2, "uniform", 0.0, clip)
    qe2 = dz.equal_rate_ecsq(stats, n2, cc2, pu.grouped, pu.labels)
    return TableRow(levels, pu, p0, dz.rd_point(stats, qe, pu.groups), dz.rd_point(stats, qe2, pu.groups))


def rd_points(stats: LoadedStats, clip: str, progress: bool = True) -> RDReport:
    """The report's points: for each of REPORT_LEVELS the uniform quantizer and the ECSQ lambda sweep;
    for TABLE_LEVELS also the equal-rate ECSQ rows."""
    from tqdm import tqdm

    rep = RDReport()
    for n in tqdm(REPORT_LEVELS, desc="report", unit="levels", disable=not progress):
        qu, cc = dz.design_quantizer(stats, n, "uniform", 0.0, clip)
        pu = dz.rd_point(stats, qu)
        rep.uniform.append(pu)
        pts = _ecsq_sweep(stats, n, cc, pu)
        rep.ecsq.append(pts)
        if n in TABLE_LEVELS:
            rep.rows.append(_equal_rate_row(stats, n, clip, cc, pu, pts[0]))
    return rep


def print_table(rep: RDReport, stats: LoadedStats) -> None:
    """The rate-distortion table and the gain of channel-group models, on stdout."""
    print()
    print("rate-distortion on the calibration data (payload bits/element, without the frame overhead of "
          f"{dz.overhead_bits(stats):.4f}; (1) = one model, (G) = G channel-group models, G chosen for the uniform "
          "quantizer at each N)")
    print(f"{'N':>3} {'quantizer':<22} {'bits (1)':>9} {'bits (G)':>9} {'G':>4} {'MSE':>11}")
    for row in rep.rows:
        n, pu, p0 = row.levels, row.uniform, row.ecsq_lambda0
        print(f"{n:>3} {'uniform':<22} {pu.entropy:9.4f} {pu.grouped:9.4f} {pu.groups:4d} {pu.mse:11.5g}")
        print(f"{n:>3} {'ECSQ lambda=0':<22} {p0.entropy:9.4f} {p0.grouped:9.4f} {p0.groups:4d} {p0.mse:11.5g}")
        for asked, p in ((n, row.ecsq_equal_rate), (min(2 * n, 16), row.ecsq_equal_rate_2n)):
            label = f"ECSQ equal rate, {asked} lv"
            used = f"  ({p.levels} used)" if p.levels < asked else ""
            # emptying cells makes the rate jump: say when the bisection could not land on the rate
            miss = "  (rate not matched)" if abs(p.grouped - pu.grouped) > 0.01 * pu.grouped else ""
            print(f"{n:>3} {label:<22} {p.entropy:9.4f} {p.grouped:9.4f} {p.groups:4d} {p.mse:11.5g}{used}{miss}")
    print()
    print("gain of channel-group models over one model (uniform quantizer):")
    for pu in rep.uniform:
        gain = pu.entropy - pu.grouped
        print(f"  N={pu.levels:>2}: {pu.entropy:.4f} -> {pu.grouped:.4f} bits/element with G={pu.groups} "
              f"({gain:.4f} bits, {100 * gain / pu.entropy:.1f}%)")


def plot(rep: RDReport, stats: LoadedStats, clip: str, png: str) -> None:
    """MSE (log scale) against bits/element: uniform with group models and with one model, and each
    level count's ECSQ lambda sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    uni = rep.uniform
    ax.plot([p.grouped for p in uni], [p.mse for p in uni], "o-", color="C0", label="uniform, group models")
    ax.plot([p.entropy for p in uni], [p.mse for p in uni], "o--", color="C0", alpha=0.5, label="uniform, one model")
    for i, pts in enumerate(rep.ecsq):
        ax.plot([p.grouped for p in pts], [p.mse for p in pts], ".-", color="C1", alpha=0.8,
                label="ECSQ (lambda sweep), group models" if i == 0 else None)
        ax.annotate(f"{REPORT_LEVELS[i]}", (pts[0].grouped, pts[0].mse), fontsize=7, color="C1")
    for p in uni:
        ax.annotate(f"{p.levels}", (p.grouped, p.mse), fontsize=7, color="C0")
    ax.set_yscale("log")
    ax.set_xlabel("bits per element (payload, calibration data)")
    ax.set_ylabel("MSE")
    h, w, c = stats.shape
    ax.set_title(f"{h}x{w}x{c}, {stats.tensors} tensors, clip: {clip}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def as_json(rep: RDReport) -> dict:
    """The points as plain data (channel labels left out)."""
    def row(p: RDPoint) -> dict:
        return {k: v for k, v in p.__dict__.items() if k != "labels"}

    return {"uniform": [row(p) for p in rep.uniform], "ecsq": [[row(p) for p in pts] for pts in rep.ecsq],
            "table": [{"levels": r.levels, "uniform": row(r.uniform), "ecsq_lambda0": row(r.ecsq_lambda0),
                       "ecsq_equal_rate": row(r.ecsq_equal_rate), "ecsq_equal_rate_2n": row(r.ecsq_equal_rate_2n)}
                      for r in rep.rows]}


def report(stats: LoadedStats, clip: str, png: str) -> dict:
    """RD points for uniform and ECSQ at several level counts: print the table, write the PNG and, next to
    it, the points as JSON (returned too)."""
    rep = rd_points(stats, clip)
    print_table(rep, stats)
    plot(rep, stats, clip, png)
    print(f"wrote {png}")
    out = as_json(rep)
    Path(png).with_suffix(".json").write_text(json.dumps(out, indent=1, default=float))
    return out
