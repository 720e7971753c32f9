"""Baseline feature codecs that lwfc is compared against, each producing real coded bytes.

Every baseline takes a batch of float feature tensors (N, H, W, C), NHWC, and returns a
:class:`BaselineBatch`: for each tensor the byte strings a receiver needs (side information, container
headers, payload), and the reconstruction obtained by *decoding those bytes*. Rates are always counted from
those bytes, never estimated.

- **HEVC** (as in Cohen et al. and CompressAI-Vision's anchors): the C channels tiled into one near-square
  4:0:0 frame, min-max quantized to 8 or 10 bits, coded with ffmpeg + libx265 all-intra at an exact QP.
  x265 repeats the parameter sets (VPS/SPS/PPS, about 79 bytes) before every all-intra frame: a tensor
  that stands alone needs them, so the main rate counts them, and the rate without them is kept too.
- **JPEG / WebP** (sc2bench's baseline): groups of 3 channels as RGB images, min-max quantized to 8 bits,
  Pillow at a given quality. Every tile image carries its own container headers.
- **RLE** (Carra & Neglia 2023 style): uniform quantization (clip range given, e.g. the calibrated one), then
  byte-oriented run-length coding of each channel plane.
- **zlib**: uniform 8/4/2-bit min-max quantization, bit-packed, zlib level 9.

Min-max side information is two float32 values per tensor (64 bits) and is counted in the rate.
"""

from __future__ import annotations

import io
import math
import shutil
import struct
import subprocess
import time
import zlib
from dataclasses import dataclass, field

import numpy as np

SIDE_INFO_BYTES = 8  # per-tensor min and max as two little-endian float32


class BaselineError(RuntimeError):
    """A baseline codec (ffmpeg, Pillow, ...) failed or is missing."""


@dataclass
class BaselineBatch:
    """A batch coded by one baseline at one setting.

    ``parts[i]`` lists the byte strings sent for tensor i; ``nbytes[i]`` is their total. ``optional_bytes[i]``
    counts bytes inside ``parts[i]`` that a long-running stream could send once instead of per tensor
    (HEVC parameter sets); zero for the other codecs. ``recon`` is what decoding the bytes gives.
    """

    method: str
    setting: str
    parts: list[list[bytes]]
    recon: np.ndarray
    encode_seconds: float
    decode_seconds: float
    optional_bytes: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def nbytes(self) -> np.ndarray:
        return np.asarray([sum(len(p) for p in ps) for ps in self.parts], dtype=np.int64)

    def bits_per_element(self, without_optional: bool = False) -> np.ndarray:
        n_el = int(np.prod(self.recon.shape[1:]))
        b = self.nbytes
        if without_optional and self.optional_bytes.size:
            b = b - self.optional_bytes
        return 8.0 * b / n_el


# ---- shared helpers ----------------------------------------------------------------------------------------------
def _as_batch(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"expected (N, H, W, C) features, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or infinite values")
    return x


def tile_grid(channels: int, height: int, width: int) -> tuple[int, int]:
    """(rows, cols) of the channel tiles: the grid holding all channels with the fewest empty tiles, and
    among those the frame closest to square (what CompressAI-Vision's tiling aims at)."""
    best = None
    for rows in range(1, channels + 1):
        cols = math.ceil(channels / rows)
        empty = rows * cols - channels
        aspect = abs(math.log((rows * height) / (cols * width)))
        key = (empty > 0 and empty >= cols, aspect, empty)  # prefer full grids, then square, then fewer empties
        if best is None or key < best[0]:
            best = (key, rows, cols)
    return best[1], best[2]


def tile(x: np.ndarray, rows: int, cols: int, fill: float | int = 0) -> np.ndarray:
    """(N, H, W, C) -> (N, rows*H, cols*W): channel c at tile (c // cols, c % cols); empty tiles ``fill``."""
    n, h, w, c = x.shape
    planes = np.full((n, rows * cols, h, w), fill, dtype=x.dtype)
    planes[:, :c] = x.transpose(0, 3, 1, 2)
    return planes.reshape(n, rows, cols, h, w).transpose(0, 1, 3, 2, 4).reshape(n, rows * h, cols * w)


def untile(frames: np.ndarray, rows: int, cols: int, h: int, w: int, c: int) -> np.ndarray:
    """Inverse of :func:`tile`: (N, rows*H, cols*W) -> (N, H, W, C)."""
    n = frames.shape[0]
    planes = frames.reshape(n, rows, h, cols, w).transpose(0, 1, 3, 2, 4).reshape(n, rows * cols, h, w)
    return planes[:, :c].transpose(0, 2, 3, 1)


def minmax_side_info(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[bytes]]:
    """Per-tensor float32 min and max, and their 8-byte encodings (what is sent)."""
    lo = x.reshape(len(x), -1).min(axis=1).astype(np.float32)
    hi = x.reshape(len(x), -1).max(axis=1).astype(np.float32)
    return lo, hi, [struct.pack("<ff", float(a), float(b)) for a, b in zip(lo, hi)]


def parse_side_info(side: bytes) -> tuple[np.float32, np.float32]:
    lo, hi = struct.unpack("<ff", side)
    return np.float32(lo), np.float32(hi)


def minmax_quantize(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, bits: int) -> np.ndarray:
    """Uniform quantization of each tensor of ``x`` over its own [lo, hi] to ``bits`` bits (uint16)."""
    top = (1 << bits) - 1
    shape = (-1,) + (1,) * (x.ndim - 1)
    span = np.maximum(hi - lo, np.float32(1e-30)).reshape(shape)
    v = np.rint((x - lo.reshape(shape)) / span * top)
    return np.clip(v, 0, top).astype(np.uint16)


def minmax_dequantize(v: np.ndarray, lo: np.ndarray, hi: np.ndarray, bits: int) -> np.ndarray:
    top = (1 << bits) - 1
    shape = (-1,) + (1,) * (v.ndim - 1)
    span = np.maximum(hi - lo, np.float32(1e-30)).reshape(shape)
    return (lo.reshape(shape) + v.astype(np.float32) * (span / top)).astype(np.float32)


# ---- HEVC (ffmpeg + libx265) -------------------------------------------------------------------------------------
HEVC_PARAM_NAL_TYPES = (32, 33, 34)  # VPS, SPS, PPS
HEVC_VCL_MAX = 31  # NAL unit types 0..31 are slice data


def _ffmpeg() -> str:
    exe = shutil.which("ffmpeg")
    if exe is None:
        raise BaselineError("ffmpeg is not installed (apt-get install ffmpeg; it must include libx265)")
    return exe


def x265_params(qp: int) -> str:
    """Exact-QP all-intra x265 settings; ``info=0`` drops the 2 KB encoder-options SEI. The log level only
    silences x265's own console output and does not change the bitstream."""
    return f"qp={int(qp)}:keyint=1:ipratio=1:pbratio=1:info=0:log-level=error"


def nal_units(stream: bytes) -> list[tuple[int, int, int]]:
    """(start, end, nal_type) of each NAL unit of an Annex-B stream; a unit spans from its start code
    (3 or 4 bytes) to the next one, so the units partition the stream."""
    starts = []
    i = stream.find(b"\x00\x00\x01")
    while i >= 0:
        s = i - 1 if i > 0 and stream[i - 1] == 0 else i
        starts.append((s, i + 3))
        i = stream.find(b"\x00\x00\x01", i + 3)
    out = []
    for k, (s, hdr) in enumerate(starts):
        end = starts[k + 1][0] if k + 1 < len(starts) else len(stream)
        out.append((s, end, (stream[hdr] >> 1) & 0x3F))
    if out and out[0][0] != 0:
        raise BaselineError("HEVC stream does not start with a start code")
    return out


def split_access_units(stream: bytes) -> list[tuple[bytes, int]]:
    """Split an all-intra HEVC stream into per-picture access units: (bytes, parameter-set bytes inside).

    A new access unit starts at a parameter set or prefix SEI that follows slice data, or at a slice whose
    first_slice_segment_in_pic_flag is set (x265 writes one slice per picture)."""
    units = nal_units(stream)
    aus: list[tuple[bytes, int]] = []
    cur_start = 0
    cur_params = 0
    seen_vcl = False
    for s, e, t in units:
        first_slice = t <= HEVC_VCL_MAX and (stream[s + (4 if stream[s + 2] == 0 else 3) + 2] & 0x80)
        starts_new = seen_vcl and (t in HEVC_PARAM_NAL_TYPES or t in (35, 39) or (t <= HEVC_VCL_MAX and first_slice))
        if starts_new:
            aus.append((stream[cur_start:s], cur_params))
            cur_start, cur_params, seen_vcl = s, 0, False
        if t in HEVC_PARAM_NAL_TYPES:
            cur_params += e - s
        if t <= HEVC_VCL_MAX:
            seen_vcl = True
    if seen_vcl:
        aus.append((stream[cur_start:], cur_params))
    return aus


def _pad_to(frames: np.ndarray, multiple: int) -> np.ndarray:
    """Edge-replicate frames up to a multiple of ``multiple`` pixels (x265 codes whole 8x8 minimum CUs; the
    padding is cropped after decoding and is part of the coded picture, so its cost is in the rate)."""
    n, fh, fw = frames.shape
    ph, pw = (-fh) % multiple, (-fw) % multiple
    if ph == 0 and pw == 0:
        return frames
    return np.pad(frames, ((0, 0), (0, ph), (0, pw)), mode="edge")


def x265_encode_frames(frames: np.ndarray, qp: int, bits: int) -> tuple[bytes, float]:
    """Code (N, FH, FW) uint16 frames (values < 2^bits) as one all-intra HEVC stream in one ffmpeg
    process; returns the stream and the wall time."""
    n, fh, fw = frames.shape
    pix, dt = ("gray", np.uint8) if bits == 8 else ("gray10le", "<u2")
    if bits not in (8, 10):
        raise ValueError("HEVC baseline supports 8 or 10 bits")
    cmd = [_ffmpeg(), "-hide_banner", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", pix, "-s", f"{fw}x{fh}",
           "-i", "-", "-c:v", "libx265", "-x265-params", x265_params(qp), "-f", "hevc", "-"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, input=np.ascontiguousarray(frames.astype(dt)).tobytes(), capture_output=True)
    dt_s = time.perf_counter() - t0
    if r.returncode != 0:
        raise BaselineError(f"ffmpeg/libx265 failed: {r.stderr.decode(errors='replace')[-500:]}")
    return r.stdout, dt_s


def x265_decode(stream: bytes, fh: int, fw: int, bits: int) -> tuple[np.ndarray, float]:
    """Decode an HEVC stream with ffmpeg to (N, FH, FW) uint16 frames; returns them and the wall time."""
    pix, dt = ("gray", np.uint8) if bits == 8 else ("gray10le", "<u2")
    cmd = [_ffmpeg(), "-hide_banner", "-loglevel", "error", "-f", "hevc", "-i", "-", "-f", "rawvideo",
           "-pix_fmt", pix, "-"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, input=stream, capture_output=True)
    dt_s = time.perf_counter() - t0
    if r.returncode != 0:
        raise BaselineError(f"ffmpeg HEVC decoding failed: {r.stderr.decode(errors='replace')[-500:]}")
    out = np.frombuffer(r.stdout, dtype=dt)
    return out.reshape(-1, fh, fw).astype(np.uint16), dt_s


def hevc(x: np.ndarray, qp: int, bits: int = 8) -> BaselineBatch:
    """HEVC all-intra on channel-tiled 4:0:0 frames, one frame per tensor, the whole batch in one stream.

    Each tensor's bytes: its access unit (parameter sets + slice) and the 8-byte min/max side info. The
    decoder gets the concatenated access units (each an independent IDR picture), exactly what was sent."""
    x = _as_batch(x)
    n, h, w, c = x.shape
    rows, cols = tile_grid(c, h, w)
    lo, hi, side = minmax_side_info(x)
    v = minmax_quantize(x, lo, hi, bits)
    frames = tile(v, rows, cols)
    fh, fw = frames.shape[1:]
    padded = _pad_to(frames, 8)
    stream, t_enc = x265_encode_frames(padded, qp, bits)
    aus = split_access_units(stream)
    if len(aus) != n:
        raise BaselineError(f"x265 produced {len(aus)} access units for {n} frames")
    decoded, t_dec = x265_decode(b"".join(a for a, _ in aus), padded.shape[1], padded.shape[2], bits)
    if len(decoded) != n:
        raise BaselineError(f"ffmpeg decoded {len(decoded)} pictures from {n} access units")
    lo_r = np.asarray([parse_side_info(s)[0] for s in side], dtype=np.float32)
    hi_r = np.asarray([parse_side_info(s)[1] for s in side], dtype=np.float32)
    recon = minmax_dequantize(untile(decoded[:, :fh, :fw], rows, cols, h, w, c), lo_r, hi_r, bits)
    return BaselineBatch("hevc", f"{bits}bit qp{qp}", [[s, a] for s, (a, _) in zip(side, aus)], recon, t_enc, t_dec,
                         np.asarray([p for _, p in aus], dtype=np.int64))


def hevc_single_process_ms(x: np.ndarray, qp: int, bits: int = 8) -> tuple[float, float]:
    """Encode and decode ms of one tensor with its own ffmpeg processes (start-up included), for the report
    next to the in-stream time per tensor."""
    b = hevc(_as_batch(x)[:1], qp, bits)
    return 1000 * b.encode_seconds, 1000 * b.decode_seconds


# ---- JPEG / WebP tiles (Pillow) ----------------------------------------------------------------------------------
def image_tiles(x: np.ndarray, quality: int, fmt: str = "JPEG") -> BaselineBatch:
    """Groups of 3 channels as 8-bit RGB images (the last group padded with zero planes), each saved by
    Pillow as JPEG or lossy WebP at ``quality``; min-max side info per tensor."""
    from PIL import Image

    x = _as_batch(x)
    n, h, w, c = x.shape
    fmt = fmt.upper()
    if fmt not in ("JPEG", "WEBP"):
        raise ValueError("fmt must be JPEG or WEBP")
    lo, hi, side = minmax_side_info(x)
    v = minmax_quantize(x, lo, hi, 8).astype(np.uint8)
    groups = -(-c // 3)
    padded = np.zeros((n, h, w, 3 * groups), dtype=np.uint8)
    padded[..., :c] = v
    parts: list[list[bytes]] = []
    t0 = time.perf_counter()
    for i in range(n):
        tensor_parts = [side[i]]
        for g in range(groups):
            buf = io.BytesIO()
            img = Image.fromarray(np.ascontiguousarray(padded[i, :, :, 3 * g:3 * g + 3]), "RGB")
            if fmt == "JPEG":
                img.save(buf, "JPEG", quality=int(quality))
            else:
                img.save(buf, "WEBP", quality=int(quality), method=4)
            tensor_parts.append(buf.getvalue())
        parts.append(tensor_parts)
    t_enc = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = np.empty((n, h, w, 3 * groups), dtype=np.uint8)
    lo_r = np.empty(n, dtype=np.float32)
    hi_r = np.empty(n, dtype=np.float32)
    for i, ps in enumerate(parts):
        lo_r[i], hi_r[i] = parse_side_info(ps[0])
        for g, data in enumerate(ps[1:]):
            with Image.open(io.BytesIO(data)) as im:
                out[i, :, :, 3 * g:3 * g + 3] = np.asarray(im.convert("RGB"))
    recon = minmax_dequantize(out[..., :c], lo_r, hi_r, 8)
    t_dec = time.perf_counter() - t0
    return BaselineBatch(fmt.lower(), f"q{quality}", parts, recon, t_enc, t_dec)


# ---- uniform quantization + run-length coding ----------------------------------------------------------------------
def uniform_indices(x: np.ndarray, levels: int, c_min: float, c_max: float) -> np.ndarray:
    """Indices 0..levels-1 of a uniform quantizer on [c_min, c_max] (values outside are clipped)."""
    step = (c_max - c_min) / (levels - 1)
    return np.clip(np.rint((np.asarray(x, dtype=np.float64) - c_min) / step), 0, levels - 1).astype(np.uint8)


def rle_encode(plane_symbols: np.ndarray, levels: int) -> bytes:
    """Byte-oriented run-length code of a 1-D symbol sequence: each byte holds a symbol in its top
    ceil(log2 levels) bits and (run length - 1) in the rest; longer runs are split."""
    vb = max(1, math.ceil(math.log2(levels)))
    rb = 8 - vb
    if rb < 1:
        raise ValueError("run-length coding needs levels <= 128")
    s = np.asarray(plane_symbols, dtype=np.int64).ravel()
    if s.size == 0:
        return b""
    change = np.flatnonzero(np.diff(s)) + 1
    starts = np.concatenate([[0], change])
    runs = np.diff(np.concatenate([starts, [s.size]]))
    vals = s[starts]
    cap = 1 << rb
    chunks = -(-runs // cap)
    vals_rep = np.repeat(vals, chunks)
    # every chunk of a run is full (cap) except its last one
    lens = np.full(vals_rep.size, cap, dtype=np.int64)
    last = np.cumsum(chunks) - 1
    lens[last] = runs - (chunks - 1) * cap
    return ((vals_rep << rb) | (lens - 1)).astype(np.uint8).tobytes()


def rle_decode(data: bytes, levels: int, count: int) -> np.ndarray:
    vb = max(1, math.ceil(math.log2(levels)))
    rb = 8 - vb
    b = np.frombuffer(data, dtype=np.uint8).astype(np.int64)
    out = np.repeat(b >> rb, (b & ((1 << rb) - 1)) + 1)
    if out.size != count:
        raise BaselineError(f"run-length data decodes to {out.size} symbols, expected {count}")
    return out.astype(np.uint8)


def rle(x: np.ndarray, levels: int, c_min: float, c_max: float) -> BaselineBatch:
    """Uniform quantization on a fixed clip range (known to both ends, like an lwfc table) and run-length
    coding of the channel planes in raster order (runs of zeros along rows dominate after ReLU)."""
    x = _as_batch(x)
    n, h, w, c = x.shape
    step = (c_max - c_min) / (levels - 1)
    t0 = time.perf_counter()
    idx = uniform_indices(x, levels, c_min, c_max)
    parts = [[rle_encode(idx[i].transpose(2, 0, 1), levels)] for i in range(n)]
    t_enc = time.perf_counter() - t0
    t0 = time.perf_counter()
    dec = np.stack([rle_decode(p[0], levels, h * w * c).reshape(c, h, w).transpose(1, 2, 0) for p in parts])
    recon = (c_min + dec.astype(np.float32) * np.float32(step)).astype(np.float32)
    t_dec = time.perf_counter() - t0
    return BaselineBatch("rle", f"{levels} levels clip=[{c_min!r}, {c_max!r}]", parts, recon, t_enc, t_dec)


# ---- uniform b-bit + zlib ------------------------------------------------------------------------------------------
def pack_bits(v: np.ndarray, bits: int) -> bytes:
    """Pack values < 2^bits (bits in 1, 2, 4, 8), most significant first within each byte."""
    if bits == 8:
        return v.astype(np.uint8).tobytes()
    per = 8 // bits
    flat = v.astype(np.uint8).ravel()
    flat = np.concatenate([flat, np.zeros((-flat.size) % per, dtype=np.uint8)]).reshape(-1, per)
    shifts = (bits * np.arange(per - 1, -1, -1)).astype(np.uint8)
    return np.bitwise_or.reduce(flat << shifts, axis=1).astype(np.uint8).tobytes()


def unpack_bits(data: bytes, bits: int, count: int) -> np.ndarray:
    b = np.frombuffer(data, dtype=np.uint8)
    if bits == 8:
        return b[:count].copy()
    per = 8 // bits
    shifts = (bits * np.arange(per - 1, -1, -1)).astype(np.uint8)
    return ((b[:, None] >> shifts) & ((1 << bits) - 1)).astype(np.uint8).ravel()[:count]


def zlib_codec(x: np.ndarray, bits: int) -> BaselineBatch:
    """Min-max uniform quantization to ``bits`` (8, 4 or 2) bits, packed in channel-planar order, zlib -9."""
    if bits not in (1, 2, 4, 8):
        raise ValueError("zlib baseline packs 1, 2, 4 or 8 bits")
    x = _as_batch(x)
    n, h, w, c = x.shape
    t0 = time.perf_counter()
    lo, hi, side = minmax_side_info(x)
    v = minmax_quantize(x, lo, hi, bits)
    parts = [[side[i], zlib.compress(pack_bits(v[i].transpose(2, 0, 1), bits), 9)] for i in range(n)]
    t_enc = time.perf_counter() - t0
    t0 = time.perf_counter()
    rec = np.empty((n, h, w, c), dtype=np.float32)
    for i, (s, data) in enumerate(parts):
        a, b = parse_side_info(s)
        vv = unpack_bits(zlib.decompress(data), bits, h * w * c).reshape(c, h, w).transpose(1, 2, 0)
        rec[i] = minmax_dequantize(vv[None], np.asarray([a]), np.asarray([b]), bits)[0]
    t_dec = time.perf_counter() - t0
    return BaselineBatch("zlib", f"{bits}bit", parts, rec, t_enc, t_dec)
