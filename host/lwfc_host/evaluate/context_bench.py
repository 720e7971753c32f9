"""Measurements for the context design and the task-aware choice (codec_spec/DESIGN-quantizer.md, section 9).

``python -m lwfc_host.evaluate.context_bench eval BUNDLE OUT --levels 2,3,4 --qps 22,32,40``: ``lwfc eval``'s pipeline
(``evaluate_bundle``: real frames, host decoder, cloud half) with the context variants one model per channel,
channel groups, naive K = 3 and designed contexts, uniform and ECSQ (MSE clip), and HEVC, in one run.

``python -m lwfc_host.evaluate.context_bench task BUNDLE EDGE_NPZ OUT.json --tolerance 0.01 --images 256``: the
task-aware design on calibration images, then the chosen table on the evaluation tensors of an ``lwfc eval``
edge cache (real frames, decoder, cloud half).
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np


def run_eval(bundle: str, out: str, levels: list[int], qps: list[int], limit: int | None = None) -> None:
    from lwfc_host.evaluate.report import headline, write_report
    from lwfc_host.evaluate.run import evaluate_bundle

    ev = evaluate_bundle(bundle, "auto", limit, False, "cache/eval", "classification", ["lwfc", "hevc"],
                         progress=True,
                         overrides={"kinds": ["uniform", "ecsq"], "clips": ["mse"], "levels": levels,
                                    "contexts": ["channel", "groups", "groups+k3", "auto"], "hevc_qps": {8: qps}})
    ev.command = (f"python -m lwfc_host.evaluate.context_bench eval {bundle} {out} "
                  f"--levels {','.join(map(str, levels))} --qps {','.join(map(str, qps))}"
                  + (f" --limit {limit}" if limit else ""))
    write_report(ev, out)
    print("reference:", ev.reference)
    for row in headline(ev):
        r = row["rate_within_1pp"]
        print(f"{row['method']:40s} {'not reached' if r != r else f'{r:.4f}':>12s} bits/element within 1 pp")
    for p in ev.points:
        if math.isnan(p.bits_per_element):
            continue
        print(f"{p.method:40s} {p.setting:24s} {p.bits_per_element:8.4f} "
              + " ".join(f"{k} {v:.4f}" for k, v in p.metrics.items()) + f"  {p.notes.split(';')[0]}")


def run_task(bundle: str, edge_npz: str, out: str, tolerance: float, images: int) -> None:
    from lwfc_host.design.task_design import evaluate_table, format_candidates, task_design

    td = task_design(bundle, images=images, tolerance=tolerance, cache_dir="cache/eval", progress=True)
    print("\n".join(format_candidates(td)))
    print(td.notes, f"{td.seconds:.0f} s")
    with np.load(edge_npz) as z:
        res = evaluate_table(bundle, td.design.table, z["q_eval"], z["labels"])
    print(res)
    with open(out, "w") as f:
        json.dump({"chosen": td.chosen.__dict__, "eval": res, "notes": td.notes,
                   "candidates": [c.__dict__ for c in td.candidates]}, f, indent=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("eval")
    e.add_argument("bundle")
    e.add_argument("out")
    e.add_argument("--levels", default="2,3,4,5,6")
    e.add_argument("--qps", default="22,27,32,36,40,43,46")
    e.add_argument("--limit", type=int)
    t = sub.add_parser("task")
    t.add_argument("bundle")
    t.add_argument("edge_npz")
    t.add_argument("out")
    t.add_argument("--tolerance", type=float, default=0.01)
    t.add_argument("--images", type=int, default=256)
    a = ap.parse_args()
    if a.cmd == "eval":
        run_eval(a.bundle, a.out, [int(v) for v in a.levels.split(",")], [int(v) for v in a.qps.split(",")],
                 a.limit)
    else:
        run_task(a.bundle, a.edge_npz, a.out, a.tolerance, a.images)


if __name__ == "__main__":
    main()
