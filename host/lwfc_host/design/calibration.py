"""Calibration statistics of the activations at a split layer, accumulated in one streaming pass.

What is kept (codec_spec/DESIGN-quantizer.md, section 1):

* a global histogram with, per bin, the count, the sum and the sum of squares of the values that fell
  in it, so that the mean squared error of any quantizer whose thresholds lie on bin edges is exact;
* per-channel counts on the same bins (channel-group clustering needs per-channel index histograms);
* per-channel and global count, sum, sum of squares, minimum, maximum, number of exact zeros, and the
  number of elements at the minimum and at the maximum (saturation);
* a reservoir sample of up to ``reservoir`` whole tensors (Vitter's algorithm R, seeded): neighbour
  contexts and the final check by real encoding need whole tensors, not histograms.

Bins. Float input: bins are ``[k w, (k+1) w)`` with ``w`` a power of two and ``k`` an integer. Because
``w`` is a power of two, bin edges are exact in the table's fixed point (``floor(x 2^F) >= k w 2^F``
exactly when ``x >= k w``), so index counts computed from the histogram equal what the device produces.
When new data fall outside the covered range, ``w`` doubles and pairs of bins merge (only resolution is
lost, never data). int8 input: one bin per int8 value q (256 bins, value ``scale (q - zero_point)``),
which is exact by construction.
"""

from __future__ import annotations

import json
import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

STATS_FORMAT = "lwfc-calibration-stats"
STATS_VERSION = 1
DEFAULT_BINS = 4096
DEFAULT_RESERVOIR = 64
MAX_CHANNEL_BINS = 1 << 26  # 512 MB of per-channel int64 counts


class CalibrationError(ValueError):
    """Bad calibration input (empty, non-finite, inconsistent shapes or int8 parameters)."""


@dataclass
class Histogram:
    """Binned view of the calibration data used by the designers.

    ``lower``: each bin's lower edge (float input) or exact value (int8 input); ``value``: the mean of
    the values in the bin (the lower edge for empty bins); ``count``/``s1``/``s2``: count, sum and sum
    of squares per bin; ``ch_count``: (C, B) per-channel counts. ``width``: bin width (float input) or
    the int8 scale. ``exact_values``: True for int8 input (every bin holds one value)."""

    lower: np.ndarray
    count: np.ndarray
    s1: np.ndarray
    s2: np.ndarray
    ch_count: np.ndarray
    width: float
    exact_values: bool
    value: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = self.s1 / self.count
        self.value = np.where(self.count > 0, mean, self.lower + (0.0 if self.exact_values else 0.5 * self.width))

    @property
    def total(self) -> float:
        return float(self.count.sum())

    @property
    def upper(self) -> np.ndarray:
        return self.lower if self.exact_values else self.lower + self.width


class CalibrationStats:
    """Streaming accumulator of calibration statistics for one split layer (NHWC tensors)."""

    def __init__(self, bins: int = DEFAULT_BINS, reservoir: int = DEFAULT_RESERVOIR, seed: int = 0) -> None:
        if bins < 64 or bins % 2:
            raise ValueError("bins must be an even number >= 64")
        self.bins = bins
        self.reservoir_size = reservoir
        self.rng = np.random.default_rng(seed)
        self.shape: tuple[int, int, int] | None = None  # (H, W, C)
        self.int8: tuple[float, int] | None = None  # (scale, zero_point) when fed int8 tensors
        self.kind: str | None = None  # "float" or "int8"
        self.tensors = 0
        self.k0 = 0  # first bin's index (float input): bin j covers [(k0 + j) w, (k0 + j + 1) w)
        self.log2_width: int | None = None
        self.count = np.zeros(bins, dtype=np.int64)
        self.s1 = np.zeros(bins)
        self.s2 = np.zeros(bins)
        self.ch_count: np.ndarray | None = None
        self.ch_n = self.ch_s1 = self.ch_s2 = self.ch_zeros = None
        self.ch_min = self.ch_max = self.ch_at_min = self.ch_at_max = None
        self.reservoir: list[np.ndarray] = []

    # ---- feeding ---------------------------------------------------------------------------------------------
    def _check_shape(self, hwc: tuple[int, int, int], where: str) -> None:
        if self.shape is None:
            c = hwc[2]
            if self.kind == "float" and c * self.bins > MAX_CHANNEL_BINS:
                # per-channel counts take C x bins x 8 bytes
                raise CalibrationError(f"{where}: {c} channels x {self.bins} bins of per-channel histograms exceed "
                                       f"{MAX_CHANNEL_BINS} counts; use fewer --bins")
            self.shape = hwc
            self.ch_n = np.zeros(c, dtype=np.int64)
            self.ch_zeros = np.zeros(c, dtype=np.int64)
            self.ch_s1 = np.zeros(c)
            self.ch_s2 = np.zeros(c)
            self.ch_min = np.full(c, np.inf)
            self.ch_max = np.full(c, -np.inf)
            self.ch_at_min = np.zeros(c, dtype=np.int64)
            self.ch_at_max = np.zeros(c, dtype=np.int64)
        elif self.shape != hwc:
            raise CalibrationError(f"{where}: tensor shape (H, W, C) = {hwc} differs from the first one, {self.shape}"
                                   " (all calibration tensors must come from one layer)")

    def add_float(self, x: np.ndarray, where: str = "input") -> None:
        """Add a batch of float tensors, shape (N, H, W, C) or (H, W, C)."""
        x = np.asarray(x)
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4:
            raise CalibrationError(f"{where}: expected an (N, H, W, C) or (H, W, C) array, got shape {x.shape}")
        if x.size == 0:
            return
        if self.kind == "int8":
            raise CalibrationError(f"{where}: float tensors mixed with int8 tensors")
        self.kind = "float"
        x = x.astype(np.float32, copy=False)
        finite = np.isfinite(x)
        if not finite.all():
            bad = int(x.size - finite.sum())
            raise CalibrationError(f"{where}: {bad} of {x.size} values are NaN or infinite")
        self._check_shape(tuple(int(s) for s in x.shape[1:]), where)
        self._accumulate_moments(x)
        self._hist_float(x)
        self._sample(x)

    def add_int8(self, q: np.ndarray, scale: float, zero_point: int, where: str = "input") -> None:
        """Add a batch of int8 tensors (N, H, W, C) or (H, W, C) with their quantization parameters."""
        q = np.asarray(q)
        if q.ndim == 3:
            q = q[None]
        if q.ndim != 4:
            raise CalibrationError(f"{where}: expected an (N, H, W, C) or (H, W, C) array, got shape {q.shape}")
        if q.dtype != np.int8:
            raise CalibrationError(f"{where}: int8 input must have dtype int8, has {q.dtype}")
        if not (math.isfinite(scale) and scale > 0) or not -128 <= int(zero_point) <= 127:
            raise CalibrationError(f"{where}: bad int8 parameters scale={scale}, zero_point={zero_point}")
        if q.size == 0:
            return
        if self.kind == "float":
            raise CalibrationError(f"{where}: int8 tensors mixed with float tensors")
        if self.int8 is not None and self.int8 != (float(scale), int(zero_point)):
            raise CalibrationError(f"{where}: int8 parameters {scale}, {zero_point} differ from the first ones, "
                                   f"{self.int8}")
        self.kind = "int8"
        self.int8 = (float(scale), int(zero_point))
        self._check_shape(tuple(int(s) for s in q.shape[1:]), where)
        x = (scale * (q.astype(np.float64) - zero_point)).astype(np.float32)
        self._accumulate_moments(x)
        if self.ch_count is None:
            self.count = np.zeros(256, dtype=np.int64)
            self.s1 = np.zeros(256)
            self.s2 = np.zeros(256)
            self.ch_count = np.zeros((self.shape[2], 256), dtype=np.int64)
        c = self.shape[2]
        b = q.reshape(-1, c).astype(np.int64) + 128
        self.ch_count += np.bincount((b + 256 * np.arange(c)).ravel(), minlength=256 * c).reshape(c, 256)
        per_bin = self.ch_count.sum(axis=0)
        vals = scale * (np.arange(-128, 128) - zero_point)
        self.count = per_bin
        self.s1 = per_bin * vals
        self.s2 = per_bin * vals * vals
        self._sample(q)

    def _accumulate_moments(self, x: np.ndarray) -> None:
        c = x.shape[-1]
        flat = x.reshape(-1, c).astype(np.float64)
        self.tensors += x.shape[0]
        self.ch_n += flat.shape[0]
        self.ch_s1 += flat.sum(axis=0)
        self.ch_s2 += (flat * flat).sum(axis=0)
        self.ch_zeros += (flat == 0).sum(axis=0)
        mn = flat.min(axis=0)
        mx = flat.max(axis=0)
        at_mn = (flat == mn).sum(axis=0)
        at_mx = (flat == mx).sum(axis=0)
        # saturation: the number of elements at the running minimum / maximum of each channel
        self.ch_at_min = np.where(mn < self.ch_min, at_mn, self.ch_at_min + np.where(mn == self.ch_min, at_mn, 0))
        self.ch_at_max = np.where(mx > self.ch_max, at_mx, self.ch_at_max + np.where(mx == self.ch_max, at_mx, 0))
        self.ch_min = np.minimum(self.ch_min, mn)
        self.ch_max = np.maximum(self.ch_max, mx)

    def _merge_pairs(self) -> None:
        """Double the bin width: bin k (absolute) goes to floor(k / 2)."""
        k = self.k0 + np.arange(self.bins)
        new_k0 = self.k0 // 2
        j = k // 2 - new_k0
        for name in ("count", "s1", "s2"):
            old = getattr(self, name)
            new = np.zeros_like(old)
            np.add.at(new, j, old)
            setattr(self, name, new)
        new = np.zeros_like(self.ch_count)
        np.add.at(new.T, j, self.ch_count.T)
        self.ch_count = new
        self.k0 = new_k0
        self.log2_width += 1

    def _hist_float(self, x: np.ndarray) -> None:
        lo = float(x.min())
        hi = float(x.max())
        c = self.shape[2]
        if self.log2_width is None:
            span = max(abs(lo), abs(hi), 1e-30)
            # the first batch fills about a quarter of the bins on its wider side of zero; bin 0 starts at 0
            # for non-negative data so that ReLU's zeros sit at the start of a bin
            self.log2_width = int(math.ceil(math.log2(span / (self.bins // 4))))
            self.k0 = 0 if lo >= 0 else -(self.bins // 2)
            self.ch_count = np.zeros((c, self.bins), dtype=np.int64)
        while True:
            w = 2.0 ** self.log2_width
            kl = math.floor(lo / w)
            kh = math.floor(hi / w)
            if kl >= self.k0 and kh < self.k0 + self.bins:
                break
            nz = np.flatnonzero(self.count)
            need_lo = min(kl, int(nz[0]) + self.k0) if nz.size else kl
            need_hi = max(kh, int(nz[-1]) + self.k0) if nz.size else kh
            if need_hi - need_lo < self.bins:  # a shift of the window is enough
                self._shift(need_lo - self.k0 if need_lo < self.k0 else need_hi - (self.k0 + self.bins - 1))
            else:
                self._merge_pairs()
        flat = x.reshape(-1, c).astype(np.float64)
        b = np.floor(flat * 2.0 ** -self.log2_width).astype(np.int64) - self.k0
        self.count += np.bincount(b.ravel(), minlength=self.bins)
        self.s1 += np.bincount(b.ravel(), weights=flat.ravel(), minlength=self.bins)
        self.s2 += np.bincount(b.ravel(), weights=(flat * flat).ravel(), minlength=self.bins)
        self.ch_count += np.bincount((b + self.bins * np.arange(c)).ravel(),
                                     minlength=self.bins * c).reshape(c, self.bins)

    def _shift(self, shift: int) -> None:
        """Move the window of bins by ``shift`` (the bins falling out of it are empty)."""
        for name in ("count", "s1", "s2"):
            old = getattr(self, name)
            setattr(self, name, np.roll(old, -shift))
        self.ch_count = np.roll(self.ch_count, -shift, axis=1)
        self.k0 += shift

    def _sample(self, batch: np.ndarray) -> None:
        """Reservoir sampling (algorithm R) of whole tensors."""
        first = self.tensors - batch.shape[0]  # tensors seen before this batch
        for i, t in enumerate(batch):
            n = first + i  # 0-based number of this tensor in the stream
            if len(self.reservoir) < self.reservoir_size:
                self.reservoir.append(np.array(t))
            else:
                j = int(self.rng.integers(0, n + 1))
                if j < self.reservoir_size:
                    self.reservoir[j] = np.array(t)

    # ---- results ---------------------------------------------------------------------------------------------
    def check_nonempty(self) -> None:
        if self.tensors == 0 or self.shape is None:
            raise CalibrationError("no calibration tensors were given (empty input)")

    def save(self, path, source: str = "") -> dict:
        """Write the statistics as a .npz file (a path or a binary file object); returns the summary."""
        self.check_nonempty()
        summary = self.summary()
        meta = {
            "format": STATS_FORMAT, "version": STATS_VERSION, "kind": self.kind, "shape": list(self.shape),
            "tensors": self.tensors, "int8": list(self.int8) if self.int8 else None, "k0": self.k0,
            "log2_width": self.log2_width, "bins": int(self.count.size), "source": source, "summary": summary,
        }
        res = np.stack(self.reservoir)
        with (open(path, "wb") if isinstance(path, (str, Path)) else nullcontext(path)) as f:
            np.savez_compressed(
                f, meta=np.array(json.dumps(meta)), count=self.count, s1=self.s1, s2=self.s2,
                ch_count=self.ch_count, ch_n=self.ch_n, ch_s1=self.ch_s1, ch_s2=self.ch_s2, ch_zeros=self.ch_zeros,
                ch_min=self.ch_min, ch_max=self.ch_max, ch_at_min=self.ch_at_min, ch_at_max=self.ch_at_max,
                reservoir=res)
        return summary

    def loaded(self) -> LoadedStats:
        """The statistics as ``load_stats`` would read them back (in memory, no file)."""
        import io

        buf = io.BytesIO()
        self.save(buf)
        buf.seek(0)
        return load_stats(buf)

    def summary(self) -> dict:
        """Human-readable global numbers: elements, mean, std, min, max, fraction of zeros, saturation."""
        n = int(self.ch_n.sum())
        mean = float(self.ch_s1.sum() / n)
        var = max(float(self.ch_s2.sum() / n) - mean * mean, 0.0)
        mn = float(self.ch_min.min())
        mx = float(self.ch_max.max())
        at_min = int(self.ch_at_min[self.ch_min == mn].sum())
        at_max = int(self.ch_at_max[self.ch_max == mx].sum())
        return {"tensors": self.tensors, "elements": n, "mean": mean, "std": math.sqrt(var), "min": mn, "max": mx,
                "zero_fraction": float(self.ch_zeros.sum() / n), "fraction_at_min": at_min / n,
                "fraction_at_max": at_max / n}

    # The loaded form (LoadedStats) shares these accessors.
    def histogram(self) -> Histogram:
        self.check_nonempty()
        return _histogram(self.kind, self.count, self.s1, self.s2, self.ch_count, self.k0, self.log2_width,
                          self.int8)


def _histogram(kind, count, s1, s2, ch_count, k0, log2_width, int8) -> Histogram:
    if kind == "int8":
        scale, zp = int8
        lower = scale * (np.arange(-128, 128) - zp)
        return Histogram(lower, count.astype(np.float64), s1, s2, ch_count.astype(np.float64), scale, True)
    w = 2.0 ** log2_width
    lower = (k0 + np.arange(count.size)) * w
    return Histogram(lower, count.astype(np.float64), s1, s2, ch_count.astype(np.float64), w, False)


@dataclass
class LoadedStats:
    """A stats file read back: metadata, histograms, per-channel moments and the reservoir of tensors."""

    meta: dict
    arrays: dict

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.meta["shape"])

    @property
    def channels(self) -> int:
        return int(self.meta["shape"][2])

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    @property
    def int8(self) -> tuple[float, int] | None:
        return tuple(self.meta["int8"]) if self.meta.get("int8") else None

    @property
    def tensors(self) -> int:
        return int(self.meta["tensors"])

    @property
    def summary(self) -> dict:
        return self.meta["summary"]

    def histogram(self) -> Histogram:
        """The binned data (built once; the designers call this often)."""
        cached = self.__dict__.get("_hist")
        if cached is not None:
            return cached
        a = self.arrays
        self.__dict__["_hist"] = _histogram(self.kind, a["count"], a["s1"], a["s2"], a["ch_count"], self.meta["k0"],
                                            self.meta["log2_width"], self.int8)
        return self.__dict__["_hist"]

    def reservoir_float(self) -> np.ndarray:
        """The sampled tensors as float32 (B, H, W, C) (int8 ones dequantized)."""
        r = self.arrays["reservoir"]
        if self.kind == "int8":
            scale, zp = self.int8
            return (scale * (r.astype(np.float64) - zp)).astype(np.float32)
        return r.astype(np.float32)

    def reservoir_int8(self) -> np.ndarray | None:
        return self.arrays["reservoir"] if self.kind == "int8" else None


def load_stats(path: str | Path) -> LoadedStats:
    """Read and check a stats file written by ``CalibrationStats.save``."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as exc:
        raise CalibrationError(f"cannot read stats file {path}: {exc}") from exc
    if "meta" not in arrays:
        raise CalibrationError(f"{path} is not an lwfc calibration stats file (no 'meta')")
    meta = json.loads(str(arrays.pop("meta")))
    if meta.get("format") != STATS_FORMAT or meta.get("version") != STATS_VERSION:
        raise CalibrationError(f"{path} is not an lwfc calibration stats file of version {STATS_VERSION}")
    h, w, c = meta["shape"]
    if arrays["ch_count"].shape[0] != c or arrays["reservoir"].shape[1:] != (h, w, c):
        raise CalibrationError(f"{path} is inconsistent: its arrays do not match its shape {meta['shape']}")
    return LoadedStats(meta, arrays)


# ---- reading activation files -----------------------------------------------------------------------------------
def iter_activation_files(source: str | Path) -> list[Path]:
    """The .npy/.npz files of a directory (sorted), or the one file given."""
    p = Path(source)
    if p.is_dir():
        files = sorted(q for q in p.iterdir() if q.suffix in (".npy", ".npz"))
        if not files:
            raise CalibrationError(f"{p} holds no .npy or .npz files")
        return files
    if not p.exists():
        raise CalibrationError(f"{p} does not exist")
    return [p]


def iter_batches(files: Iterable[Path], layout: str = "NHWC", chunk: int = 64,
                 int8_scale: float | None = None, int8_zero_point: int | None = None
                 ) -> Iterator[tuple[str, np.ndarray, tuple[float, int] | None]]:
    """Yield (where, batch, int8 params or None) chunks of at most ``chunk`` tensors, without loading a
    whole file into memory (.npy files are memory-mapped).

    An .npz file may hold ``activations`` (float) or ``q`` (int8) plus ``scale`` and ``zero_point``;
    an int8 .npy file takes its parameters from ``int8_scale``/``int8_zero_point``."""
    for f in files:
        if f.suffix == ".npz":
            with np.load(f, allow_pickle=False) as z:
                if "q" in z.files:
                    arr = z["q"]
                    params = (float(z["scale"]), int(z["zero_point"]))
                elif "activations" in z.files:
                    arr, params = z["activations"], None
                elif len(z.files) == 1:
                    arr, params = z[z.files[0]], None
                else:
                    raise CalibrationError(f"{f}: an .npz needs 'activations', or 'q' with 'scale' and 'zero_point'")
        else:
            try:
                arr = np.load(f, mmap_mode="r", allow_pickle=False)
            except ValueError as exc:
                raise CalibrationError(f"{f}: {exc}") from exc
            params = None
        if arr.dtype == np.int8 and params is None:
            if int8_scale is None or int8_zero_point is None:
                raise CalibrationError(f"{f} holds int8 values: give --int8-scale and --int8-zero-point")
            params = (float(int8_scale), int(int8_zero_point))
        if arr.dtype != np.int8 and not np.issubdtype(arr.dtype, np.floating):
            raise CalibrationError(f"{f}: dtype {arr.dtype} is neither float nor int8")
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4:
            raise CalibrationError(f"{f}: expected (N, H, W, C) or (H, W, C), got shape {arr.shape}")
        if layout == "NCHW":
            arr = arr.transpose(0, 2, 3, 1)
        for i in range(0, arr.shape[0], chunk):
            yield f"{f.name}[{i}:{i + chunk}]", np.ascontiguousarray(arr[i:i + chunk]), params


def calibrate(source: str | Path, layout: str = "NHWC", int8_scale: float | None = None,
              int8_zero_point: int | None = None, bins: int = DEFAULT_BINS, reservoir: int = DEFAULT_RESERVOIR,
              seed: int = 0, progress: bool = False) -> CalibrationStats:
    """Accumulate statistics over every tensor in ``source`` (a .npy/.npz file or a directory of them)."""
    stats = CalibrationStats(bins=bins, reservoir=reservoir, seed=seed)
    files = iter_activation_files(source)
    batches = iter_batches(files, layout, int8_scale=int8_scale, int8_zero_point=int8_zero_point)
    if progress:
        from tqdm import tqdm
        batches = tqdm(batches, desc="calibrate", unit="batch")
    for where, batch, params in batches:
        if params is None:
            stats.add_float(batch, where)
        else:
            stats.add_int8(batch.astype(np.int8, copy=False), params[0], params[1], where)
    stats.check_nonempty()
    return stats
