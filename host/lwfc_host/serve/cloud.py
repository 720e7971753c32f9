"""The host's half of a bundle: its table files, their decoders and the cloud half (cloud.onnx), turning
frame bytes into the fields of a RESULT (PROTOCOL.md 5.3). Thread-safe: the server's workers share one."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from lwfc.bundle import Bundle, load_bundle
from lwfc.errors import BadShape, BundleError, FrameError, LwfcError, TableMismatch
from lwfc.frame import CRC_SIZE, HEADER_SIZE, FrameHeader, max_payload_length, parse_frame, parse_header
from lwfc.tables import Tables
from lwfc_convert.cloud_runtime import onnx_session, run_onnx, softmax
from lwfc_host.codec.conceal import DEFAULT_METHOD, Concealed, Concealer, ConcealParams, SliceAssembly
from lwfc_host.codec.decoder import Decoder
from lwfc_host.design.tablefile import load_verified
from lwfc_host.serve.config import ServerError


def top_k(logits: np.ndarray, class_names: list[str], k: int) -> list[list[Any]]:
    """[[class index, name, probability], ...] best first (probabilities from a softmax of the logits)."""
    p = softmax(np.asarray(logits, dtype=np.float64).reshape(-1))
    order = np.argsort(-p, kind="stable")[:k]
    return [[int(i), class_names[i] if i < len(class_names) else str(int(i)), round(float(p[i]), 6)]
            for i in order]


def open_bundle(bundle_dir: str | Path) -> Bundle:
    """The checked bundle in ``bundle_dir``; ServerError (one line, naming the file) if it is not one."""
    try:
        return load_bundle(bundle_dir)
    except BundleError as exc:
        raise ServerError(str(exc)) from exc


def summary(x: np.ndarray) -> dict[str, Any]:
    """The answer for an output that is neither classes nor detections: its shape, min, max and mean."""
    return {"kind": "tensor", "shape": list(x.shape), "summary": [float(x.min()), float(x.max()), float(x.mean())]}


class CloudModel:
    """A bundle's tables, decoders and cloud half: frame bytes -> result dict (thread-safe).

    ``table_paths``: the table files whose frames are accepted (default: the bundle's tables.json); ``top``:
    classes in a classification answer; ``threads``: onnxruntime intra-op threads; ``concealment``: how the part
    of a sliced tensor that never arrived is filled in (``lwfc_host.codec.conceal.METHODS``), with the calibration
    statistics in ``conceal_params`` (``ConcealParams``, written by ``lwfc eval-loss``) where the method uses them.
    Without a cloud.onnx the answer summarises the decoded tensor.
    """

    def __init__(self, bundle_dir: str | Path, table_paths: list[str | Path] | None = None, top: int = 5,
                 threads: int = 1, concealment: str = DEFAULT_METHOD, conceal_params: str | Path | None = None):
        self.dir = Path(bundle_dir)
        self.bundle = open_bundle(self.dir)
        self.info = self.bundle.info
        self.bundle_id = self.bundle.id
        self.model_name = self.bundle.model
        self.class_names = self.bundle.class_names
        self.top = top
        if not table_paths:
            default = Path(self.bundle.tables_path)
            if not default.exists():
                raise ServerError(f"no tables given and {default} does not exist (run `lwfc design` or pass --tables)")
            table_paths = [default]
        self.tables: dict[bytes, Tables] = {}
        self.decoders: dict[bytes, Decoder] = {}
        self.concealers: dict[bytes, Concealer] = {}
        self.concealment = concealment
        params = None
        if conceal_params is not None:
            try:
                params = ConcealParams.load(conceal_params)
            except ValueError as exc:
                raise ServerError(str(exc)) from exc
        for p in table_paths:
            try:
                t = load_verified(p)
            except LwfcError as exc:
                raise ServerError(f"table file {p}: {exc}") from exc
            self.tables[t.table_id] = t
            self.decoders[t.table_id] = Decoder(t)
            try:
                self.concealers[t.table_id] = Concealer(t, concealment, params=params)
            except ValueError as exc:
                raise ServerError(str(exc)) from exc
        cloud = Path(self.bundle.cloud_path)
        self.session = onnx_session(cloud, threads) if cloud.exists() else None
        # the largest legal frame of the bundle's feature shape: the default message limit
        n = int(np.prod(self.bundle.feature_shape))
        self.max_frame = HEADER_SIZE + max_payload_length(n) + CRC_SIZE

    def table_ids(self) -> list[str]:
        """The ids (hex) of the accepted tables."""
        return [t.hex() for t in self.tables]

    def check_header(self, frame: bytes) -> FrameHeader:
        """The frame's header, if it can be this bundle's: BadShape when its (H, W, C) is not the bundle's
        feature shape, another FrameError when the header is malformed. Costs no decoding, so a short frame that
        claims a huge tensor is refused at once (PROTOCOL.md 7)."""
        header = parse_header(frame)
        if header.shape != self.bundle.feature_shape:
            got, want = ("x".join(map(str, shape)) for shape in (header.shape, self.bundle.feature_shape))
            raise BadShape(f"frame shape {got} is not this bundle's feature shape {want}")
        if header.sliced:  # a DATA message carries a whole tensor (PROTOCOL.md); slices are for datagram links
            raise BadShape(f"frame is a slice (rows {header.row_first}+{header.row_count}, channels "
                           f"{header.channel_first}+{header.channel_count}); a DATA message carries a whole tensor")
        return header

    def check_slice_header(self, frame: bytes) -> FrameHeader:
        """The header of one frame of a SLICE message (PROTOCOL.md 10): a slice of the bundle's feature tensor,
        or the whole tensor. BadShape when its (H, W, C) is not the bundle's; no decoding."""
        header = parse_header(frame)
        if header.shape != self.bundle.feature_shape:
            got, want = ("x".join(map(str, shape)) for shape in (header.shape, self.bundle.feature_shape))
            raise BadShape(f"frame shape {got} is not this bundle's feature shape {want}")
        return header

    def decode_slices(self, frames: list[bytes]) -> tuple[SliceAssembly, bytes | None, list[str], float]:
        """Decode the slice frames of one tensor and place them: (assembly, table id, errors, ms). A frame that
        does not decode, whose table is unknown or differs from the first good frame's, or that overlaps one
        already placed is left out and named in ``errors``; the assembly then misses its part."""
        t0 = time.perf_counter()
        assembly = SliceAssembly(self.bundle.feature_shape)
        table_id: bytes | None = None
        errors: list[str] = []
        for frame in frames:
            try:
                header = self.check_slice_header(frame)
                if table_id is not None and header.table_id != table_id:
                    raise TableMismatch(f"slice uses table {header.table_id.hex()}, the tensor's other slices "
                                        f"{table_id.hex()}")
                dec = self.decoders.get(header.table_id)
                if dec is None:
                    raise TableMismatch(f"unknown table {header.table_id.hex()}; this host has "
                                        f"{', '.join(self.table_ids())}")
                d = dec.decode(frame)
            except FrameError as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            if not assembly.add(d.header.region, d.indices):
                errors.append(f"BadShape: slice {d.header.region} overlaps another slice of the tensor")
                continue
            table_id = d.header.table_id
        return assembly, table_id, errors, (time.perf_counter() - t0) * 1000

    def conceal(self, assembly: SliceAssembly, table_id: bytes) -> Concealed:
        """The assembled tensor with what no slice covered filled in by the concealment of ``table_id``."""
        return self.concealers[table_id].conceal(assembly)

    def decode(self, frame: bytes) -> tuple[Any, float]:
        """(Decoded, ms). Raises FrameError (malformed, or not the bundle's shape) or KeyError (unknown table)."""
        t0 = time.perf_counter()
        header, _ = parse_frame(frame)  # CRC and length first, as SPEC.md 6 orders the checks
        self.check_header(frame)
        dec = self.decoders.get(header.table_id)
        if dec is None:
            raise KeyError(header.table_id.hex())
        d = dec.decode(frame)
        return d, (time.perf_counter() - t0) * 1000

    def infer(self, tensor: np.ndarray) -> tuple[dict[str, Any], float]:
        """(result fields, ms) for a decoded (1, H, W, C) float32 tensor."""
        t0 = time.perf_counter()
        if self.session is None:
            res = summary(tensor)
        else:
            out = run_onnx(self.session, tensor)
            if self.class_names and out.size == len(self.class_names):
                res = {"kind": "classification", "top": top_k(out, self.class_names, self.top)}
            elif out.ndim == 3 and out.shape[0] == 1 and out.shape[2] == 6:
                # a detector's (1, boxes, [x1, y1, x2, y2, score, class]) output
                from lwfc_convert.detection import describe

                res = {"kind": "detection", "detections": describe(out[0], self.class_names or None)}
            else:
                res = summary(out)
        return res, (time.perf_counter() - t0) * 1000
