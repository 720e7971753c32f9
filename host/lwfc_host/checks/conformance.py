"""Conformance vectors (codec_spec/vectors) and the runner behind ``lwfc conformance``.

Each vector is a folder with tables.json, input.npy (int8 or float32, H x W x C), expected.lwfc and
indices.npy. The runner encodes every vector with every available encoder implementation, decodes
the expected frame with the host decoder, and reports one row per (vector, implementation).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from lwfc.encoder import Encoder
from lwfc.errors import LwfcError
from lwfc.frame import pack_frame
from lwfc.tables import Tables
from lwfc_host.codec.decoder import Decoder
from lwfc_host.codec.fast import encode_indices_constriction, encode_int8_constriction, indices_from_float_np
from lwfc_host.design.tablefile import load_verified, write_tables
from lwfc_host.design.tablegen import uniform_table

VECTOR_DIR = Path(__file__).resolve().parents[3] / "codec_spec" / "vectors"  # the repository's codec_spec/


@dataclass
class VectorSpec:
    """How to make one vector: shape, quantizer, contexts, input kind and what it covers."""

    name: str
    shape: tuple[int, int, int]
    levels: int
    groups: int | str = 1
    classes: int = 1
    fill: str = "relu"          # relu | zero | saturated
    dtype: str = "int8"         # int8 | float32
    covers: str = ""
    seed: int = 0


VECTORS = [
    VectorSpec("all_zero", (8, 8, 16), 4, classes=3, fill="zero", covers="every element at index 0"),
    VectorSpec("all_saturated", (8, 8, 16), 4, groups="channel", fill="saturated",
               covers="every element clipped to c_max (index N-1), one model per channel"),
    VectorSpec("single_element", (1, 1, 1), 2, covers="1x1x1 tensor, 2 levels"),
    VectorSpec("odd_shape", (7, 13, 5), 5, groups="channel", classes=2, covers="odd H, W, C; neighbour contexts"),
    VectorSpec("row_vector", (1, 37, 6), 3, classes=3, covers="H = 1 (anti-diagonals of one position)"),
    VectorSpec("column_vector", (23, 1, 3), 3, classes=2, covers="W = 1"),
    VectorSpec("levels_2", (9, 9, 8), 2, classes=3, covers="2 levels, neighbour contexts"),
    VectorSpec("levels_16", (10, 6, 12), 16, groups=3, classes=4, covers="16 levels, K = 4 (K*K*N = 256)"),
    VectorSpec("one_model", (16, 16, 32), 4, groups=1, covers="one model for all elements"),
    VectorSpec("model_per_channel", (16, 16, 32), 4, groups="channel", covers="one model per channel, same input"),
    VectorSpec("groups_and_contexts", (16, 16, 32), 4, groups=4, classes=3, covers="4 channel groups x 9 contexts"),
    VectorSpec("float_input", (6, 5, 7), 6, groups=2, classes=2, dtype="float32",
               covers="float input through fixed-point thresholds"),
    VectorSpec("large", (64, 64, 256), 4, groups=8, classes=3, covers="256x64x64 elements (1 MiB)", seed=7),
]


def _activations(shape, rng, batch=None):
    """ReLU-like, spatially correlated activations (smoothed Gaussian noise, shifted and rectified)."""
    h, w, c = shape
    b = 1 if batch is None else batch
    x = rng.normal(size=(b, h + 2, w + 2, c)).astype(np.float32)
    x = (x[:, :-2, :-2] + x[:, 1:-1, 1:-1] + x[:, 2:, 2:] + x[:, 2:, :-2]) / 2.0
    scale = rng.uniform(0.5, 1.5, size=c).astype(np.float32)
    y = np.maximum(x * scale - 0.4, 0.0)
    return y if batch is not None else y[0]


def make_vector(spec: VectorSpec, root: Path) -> Path:
    """Write one vector folder, encoding with the pure-Python encoder."""
    rng = np.random.default_rng(spec.seed + 1000)
    calib = _activations(spec.shape, rng, batch=4)
    table = uniform_table(calib, spec.levels, clip_max=2.0, groups=spec.groups, classes=spec.classes)
    folder = root / spec.name
    folder.mkdir(parents=True, exist_ok=True)
    table = write_tables(table, folder / "tables.json")
    tables = Tables(table)
    x = _activations(spec.shape, rng)
    scale, zp = table["int8"]["scale"], table["int8"]["zero_point"]
    if spec.fill == "zero":
        x = np.zeros(spec.shape, np.float32)
    elif spec.fill == "saturated":
        x = np.full(spec.shape, 1e6, np.float32)
    if spec.dtype == "int8":
        data = np.clip(np.round(x / scale) + zp, -128, 127).astype(np.int8)
    else:
        data = (x + rng.normal(scale=0.05, size=x.shape)).astype(np.float32)  # some negatives too
    np.save(folder / "input.npy", data)
    frame = _encoders()["python"](tables, data)
    (folder / "expected.lwfc").write_bytes(frame)
    np.save(folder / "indices.npy", Decoder(tables).decode(frame).indices)
    return folder


def regenerate(root: Path = VECTOR_DIR) -> list[Path]:
    """Rewrite every vector and index.json (a deliberate, reviewed change of the spec only)."""
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    folders = [make_vector(spec, root) for spec in VECTORS]
    index = []
    for spec, folder in zip(VECTORS, folders):
        tables, data, expected, _ = load_vector(folder)
        enc = Encoder(tables)
        if data.dtype == np.int8:
            enc.encode_int8(data.tobytes(), data.shape[0], data.shape[1])
        else:
            enc.encode_float(data.reshape(-1).tolist(), data.shape[0], data.shape[1])
        index.append({"name": spec.name, "shape": list(spec.shape), "levels": spec.levels,
                      "groups": spec.groups, "classes": spec.classes, "input": spec.dtype,
                      "covers": spec.covers, "frame_bytes": len(expected),
                      # range-coder situations the vector exercises (SPEC.md 4.4)
                      "inversions": enc.last_coder.inversions, "carries": enc.last_coder.carries})
    (root / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    return folders


def _python_encoder(fast: bool) -> Callable[[Tables, np.ndarray], bytes]:
    def encode(tables: Tables, data: np.ndarray) -> bytes:
        h, w, _ = data.shape
        enc = Encoder(tables, fast=fast)
        if data.dtype == np.int8:
            return enc.encode_int8(data.tobytes(), h, w)
        return enc.encode_float(data.reshape(-1).tolist(), h, w)
    return encode


def _constriction_encoder(tables: Tables, data: np.ndarray) -> bytes:
    if data.dtype == np.int8:
        return encode_int8_constriction(data, tables)
    idx = indices_from_float_np(data, tables)
    h, w, c = data.shape
    return pack_frame(tables.table_id, (h, w, c), encode_indices_constriction(idx, tables))


def _encoders() -> dict[str, Callable[[Tables, np.ndarray], bytes]]:
    return {
        "python": _python_encoder(True),
        "python-loop": _python_encoder(False),
        "constriction": _constriction_encoder,
    }


@dataclass
class Row:
    vector: str
    implementation: str
    elements: int
    frame_bytes: int
    ok: bool
    detail: str = ""

    @property
    def bits_per_element(self) -> float:
        return 8.0 * self.frame_bytes / self.elements if self.frame_bytes else float("nan")


def load_vector(folder: Path):
    tables = load_verified(folder / "tables.json")
    data = np.load(folder / "input.npy")
    expected = (folder / "expected.lwfc").read_bytes()
    indices = np.load(folder / "indices.npy")
    return tables, data, expected, indices


def run(root: Path = VECTOR_DIR, micropython: bool = True, progress: bool = False) -> list[Row]:
    """Run every vector through every encoder and the host decoder; one Row each."""
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if not folders:
        raise FileNotFoundError(f"no conformance vectors in {root}")
    rows: list[Row] = []
    loaded = {f.name: load_vector(f) for f in folders}
    for name, (tables, data, expected, indices) in loaded.items():
        n = data.size
        for impl, encode in _encoders().items():
            try:
                frame = encode(tables, data)
                ok = frame == expected
                rows.append(Row(name, impl, n, len(frame), ok, "" if ok else "frame differs"))
            except LwfcError as exc:
                rows.append(Row(name, impl, n, 0, False, f"error: {exc}"))
        try:
            dec = Decoder(tables).decode(expected)
            recon = np.asarray(tables.reconstruction, np.float32)[indices].reshape(dec.tensor.shape)
            ok = np.array_equal(dec.indices, indices) and np.array_equal(dec.tensor, recon)
            rows.append(Row(name, "host-decoder", n, len(expected), ok, "" if ok else "decoded tensor differs"))
        except LwfcError as exc:
            rows.append(Row(name, "host-decoder", n, len(expected), False, f"error: {exc}"))
    if micropython:
        rows.extend(_micropython_rows(loaded))
    return rows


def _micropython_rows(loaded) -> list[Row]:
    try:
        from lwfc_host.codec import micropython as mp
    except ImportError as exc:
        return [Row("*", "micropython", 0, 0, False, f"runner unavailable: {exc}")]
    names = list(loaded)
    jobs = []
    for name in names:
        tables, data, _, _ = loaded[name]
        if data.dtype == np.int8:
            jobs.append((json.dumps(tables.raw), data.tobytes(), data.shape[0], data.shape[1], "int8"))
        else:
            jobs.append((json.dumps(tables.raw), data.astype("<f8").tobytes(), data.shape[0], data.shape[1], "float"))
    try:
        frames = mp.encode_frames_micropython(jobs)
    except Exception as exc:  # report, do not crash the table: the row says what failed
        return [Row("*", "micropython", 0, 0, False, f"error: {exc}")]
    rows = []
    for name, frame in zip(names, frames):
        _, data, expected, _ = loaded[name]
        ok = frame == expected
        rows.append(Row(name, "micropython", data.size, len(frame), ok, "" if ok else "frame differs"))
    return rows


def format_rows(rows: list[Row]) -> str:
    lines = [f"{'vector':<22} {'implementation':<14} {'elements':>9} {'bytes':>8} {'bits/el':>8}  result"]
    for r in rows:
        result = "ok" if r.ok else f"FAIL {r.detail}"
        lines.append(f"{r.vector:<22} {r.implementation:<14} {r.elements:>9} {r.frame_bytes:>8} "
                     f"{r.bits_per_element:>8.4f}  {result}")
    return "\n".join(lines)
