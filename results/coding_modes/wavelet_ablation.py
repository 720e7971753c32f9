"""One design variant of the 5/3 wavelet with designed coefficient coding on one cached layer, read at the MSE of
the uniform quantizer with 4, 8 and 16 levels (results/coding_modes_wavelet.md, the ablation).

    python results/coding_modes/wavelet_ablation.py TENSORS.npz RESULT.json '{"option": value}' LABEL [--sub]

TENSORS.npz holds x (B, H, W, C), c_min and c_max of the layer (``coding_modes.bundle_tensors`` or
``model_tensors``, saved with numpy.savez); RESULT.json is the layer's ``lwfc modes`` result, whose uniform MSEs
are the targets; the options are ``value_coding.WaveletOptions`` fields. --sub: every third channel only (the
targets then come from the uniform quantizer on those channels). Appends one JSON line to
results/coding_modes/wavelet_ablation.jsonl and prints it.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

from lwfc_host.evaluate.code_lengths import channel_groups
from lwfc_host.evaluate.coding_modes import at_mse, bracket_sweep, fit_mask, uniform_quantize
from lwfc_host.evaluate.index_coding import correlation_chain
from lwfc_host.evaluate.value_coding import DesignedWavelet, WaveletOptions


def main(argv: list[str]) -> None:
    tensors, result, options, label = argv[:4]
    sub = "--sub" in argv
    d = np.load(tensors)
    x, c_min, c_max = d["x"].astype(np.float32), float(d["c_min"]), float(d["c_max"])
    with open(result) as f:
        ref = json.load(f)
    mse = {n: ref["mse"][str(n)] for n in (4, 8, 16)}
    if sub:
        x = np.ascontiguousarray(x[..., ::3])
        mse = {n: float(np.mean((uniform_quantize(x, n, c_min, c_max)[1] - x) ** 2)) for n in mse}
    opts = json.loads(options)
    fit = fit_mask(len(x))
    idx8 = uniform_quantize(x, 8, c_min, c_max)[0]
    groups = channel_groups(idx8, fit)
    prev = correlation_chain(idx8, fit) if opts.get("cross") else None
    t0 = time.time()
    dw = DesignedWavelet(x, c_min, c_max, fit, groups, WaveletOptions(**opts), prev)
    sweep = bracket_sweep(dw, dw.mse, list(mse.values()))
    line = {"layer": ref["layer"] + (" (every third channel)" if sub else ""), "label": label, "options": opts,
            "levels": dw.levels, "bits": {n: at_mse(sweep, m) for n, m in mse.items()}, "mse": mse,
            "sweep": sweep, "seconds": time.time() - t0}
    print(json.dumps(line))
    with open("results/coding_modes/wavelet_ablation.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
