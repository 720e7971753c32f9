"""AV1 all-intra (libaom, through ffmpeg) on channel-tiled 4:0:0 frames: the second video baseline, what a
user would reach for after HEVC.

As for HEVC (``baselines.hevc``): each tensor is min/max-normalised to 8 bits (8 bytes of side information),
its channels tiled into one monochrome picture, the whole batch coded in one ffmpeg process, one intra frame
per tensor. The stream is IVF; each tensor's bytes are its temporal unit (temporal delimiter, sequence header,
frame), the IVF container's 12 bytes per frame not counted. The sequence header is repeated before every
intra frame; it is counted, and reported apart as ``optional_bytes`` (a long-running stream could send it
once), like HEVC's parameter sets.
"""

from __future__ import annotations

import struct
import subprocess
import time

import numpy as np

from lwfc_host.evaluate import baselines as bl
from lwfc_host.evaluate.baselines import BaselineBatch, BaselineError

IVF_HEADER = 32
IVF_FRAME_HEADER = 12
OBU_SEQUENCE_HEADER = 1
CPU_USED = 6  # libaom's speed preset: 6 keeps a 10,000-tensor evaluation within hours on two cores


def aom_params(crf: int) -> list[str]:
    """ffmpeg options for constant-quality all-intra libaom coding of monochrome frames."""
    return ["-c:v", "libaom-av1", "-usage", "allintra", "-cpu-used", str(CPU_USED), "-crf", str(int(crf)),
            "-b:v", "0", "-pix_fmt", "gray", "-f", "ivf"]


def ivf_frames(data: bytes) -> list[bytes]:
    """The frames (AV1 temporal units) of an IVF stream."""
    if data[:4] != b"DKIF" or len(data) < IVF_HEADER:
        raise BaselineError("libaom's output is not an IVF stream")
    frames, i = [], struct.unpack_from("<H", data, 6)[0]
    while i < len(data):
        if i + IVF_FRAME_HEADER > len(data):
            raise BaselineError("IVF stream ends inside a frame header")
        size = struct.unpack_from("<I", data, i)[0]
        frames.append(data[i + IVF_FRAME_HEADER:i + IVF_FRAME_HEADER + size])
        i += IVF_FRAME_HEADER + size
    return frames


def sequence_header_bytes(unit: bytes) -> int:
    """Bytes of the sequence header OBUs (headers included) in a temporal unit (AV1 spec 5.3)."""
    i, total = 0, 0
    while i < len(unit):
        start = i
        header = unit[i]
        obu_type, has_extension, has_size = (header >> 3) & 15, (header >> 2) & 1, (header >> 1) & 1
        i += 1 + has_extension
        size, shift = (0, 0)
        if not has_size:  # only the last OBU of a unit may omit its size
            size = len(unit) - i
        else:
            while True:
                byte = unit[i]
                i += 1
                size |= (byte & 0x7F) << shift
                shift += 7
                if not byte & 0x80:
                    break
        i += size
        if obu_type == OBU_SEQUENCE_HEADER:
            total += i - start
    return total


def _run(cmd: list[str], data: bytes, what: str) -> tuple[bytes, float]:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, input=data, capture_output=True)
    if r.returncode != 0:
        raise BaselineError(f"ffmpeg {what} failed: {r.stderr.decode(errors='replace')[-500:]}")
    return r.stdout, time.perf_counter() - t0


def av1(x: np.ndarray, crf: int) -> BaselineBatch:
    """AV1 all-intra at constant quality ``crf`` (0-63) on channel-tiled 8-bit 4:0:0 frames, one per tensor."""
    x = bl._as_batch(x)
    n, h, w, c = x.shape
    rows, cols = bl.tile_grid(c, h, w)
    lo, hi, side = bl.minmax_side_info(x)
    frames = bl.tile(bl.minmax_quantize(x, lo, hi, 8), rows, cols)
    fh, fw = frames.shape[1:]
    padded = bl._pad_to(frames, 8)
    ph, pw = padded.shape[1:]
    enc = [bl._ffmpeg(), "-hide_banner", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "gray", "-s", f"{pw}x{ph}",
           "-i", "-", *aom_params(crf), "-"]
    stream, t_enc = _run(enc, np.ascontiguousarray(padded.astype(np.uint8)).tobytes(), "libaom-av1 encoding")
    units = ivf_frames(stream)
    if len(units) != n:
        raise BaselineError(f"libaom produced {len(units)} frames for {n} tensors")
    dec = [bl._ffmpeg(), "-hide_banner", "-loglevel", "error", "-f", "ivf", "-i", "-", "-f", "rawvideo", "-pix_fmt",
           "gray", "-"]
    raw, t_dec = _run(dec, stream, "AV1 decoding")
    decoded = np.frombuffer(raw, dtype=np.uint8).reshape(-1, ph, pw).astype(np.uint16)
    if len(decoded) != n:
        raise BaselineError(f"ffmpeg decoded {len(decoded)} pictures from {n} AV1 frames")
    lo_r = np.asarray([bl.parse_side_info(s)[0] for s in side], dtype=np.float32)
    hi_r = np.asarray([bl.parse_side_info(s)[1] for s in side], dtype=np.float32)
    recon = bl.minmax_dequantize(bl.untile(decoded[:, :fh, :fw], rows, cols, h, w, c), lo_r, hi_r, 8)
    return BaselineBatch("av1", f"8bit crf{crf}", [[s, u] for s, u in zip(side, units)], recon, t_enc, t_dec,
                         np.asarray([sequence_header_bytes(u) for u in units], dtype=np.int64))
