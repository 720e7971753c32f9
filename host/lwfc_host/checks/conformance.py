"""Conformance vectors (codec_spec/vectors) and the runner behind ``lwfc conformance``.

Each vector is a folder with tables.json, input.npy (int8 or float32, H x W x C), expected.lwfc and
indices.npy. The runner encodes every vector with every available encoder implementation, decodes
the expected frame with the host decoder, and reports one row per (vector, implementation).

Most vectors are ReLU-like tensors coded with tables made by the provisional table maker. The edge
vectors (``EDGE_VECTORS``) are index sequences with hand-made tables, each built so that the range coder
meets one case of SPEC.md 4.4-4.5 that random tensors practically never reach (several held-back words,
a carry at sealing, the sealing zero word or its near miss, an interval boundary exactly at 2^64), or so
that float input lands exactly on the quantizer's thresholds (3.4). ``coder_events`` counts what the coder met;
``regenerate`` records the counts in index.json, and the tests check that each edge vector hits its case.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from lwfc.encoder import Encoder, scan_keys
from lwfc.errors import LwfcError
from lwfc.frame import pack_frame, parse_frame
from lwfc.rangecoder import RangeEncoder
from lwfc.tables import Tables
from lwfc_host.codec.decoder import Decoder
from lwfc_host.codec.fast import FastEncoder, indices_from_float_np
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
    # version 2: "thirds" gives every channel but each third one a reference channel (``reference_pattern``),
    # with ``reference_classes`` classes of the reference index
    references: str | None = None
    reference_classes: int = 1
    # version 2 slice coded by the vector: (row_first, row_count, channel_first, channel_count)
    region: tuple[int, int, int, int] | None = None
    # hand-made vectors: returns (table dict without format/version/table_id, input array)
    build: Callable[[], tuple[dict, np.ndarray]] | None = None


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


# --- Edge vectors -------------------------------------------------------------------------------------
# Found by steering a copy of the range coder (SPEC.md 4.4) through index sequences: once words are held
# back, keep choosing the index whose interval contains 2^64 - 1, so that the interval keeps straddling
# 2^64 while it renormalises (more held-back words), then settle, seal or stop as each case needs. The
# expected bytes agree with constriction's RangeEncoder (tests/test_conformance_edges.py), and
# ``coder_events`` proves each case is hit.

EDGE_LEVELS = 8
EDGE_MODEL = [2603764, 1212073, 344813, 252157, 3272014, 3649088, 2488817, 2954490]
# 59 indices after which the coder holds back 3 words, the last of them with the interval around 2^64
_HELD_3 = "14664451573750476461014546100575767775370477470757551445645"
# after _HELD_3, index 7 lies wholly above 2^64 (a carry settles the 3 words: u+1, 0, 0) and index 5 wholly
# below (u, FFFFFFFF, FFFFFFFF)
_PENDING_CARRY = _HELD_3 + "7"
_PENDING_NO_CARRY = _HELD_3 + "5"
# 238 indices ending with 17 words held back and lower >= 2^64 - 2^32 + 1: the seal carries into them
_SEAL_CARRY = (_HELD_3 + "6477565440454545454207767774700075561477754477744476445606611766446515575454125646"
               "04765747260675160771700050577474507706557524606705127626541774660671775555764657644777675464"
               "52774")
# 11 indices ending in the normal situation with range < 2^33 - (lower mod 2^32): 4.5 step 4's zero word
_SEAL_ZERO = "61661705715"

# Three channel planes (K = 1, one model per channel). Plane 0 ends holding back a word with
# 2^64 - lower = 657 * 16323558 and scale = 657, so model 1's boundary at 16323558 (between its indices 3
# and 4) lands exactly on 2^64: index 4 starts there (L = 2^64: a carry), index 3 ends there (L + range =
# 2^64, still inverted). Model 2's index 4 (frequency 46) then ends exactly on a multiple of 2^32 in the
# normal situation, so that lower + range = 2^64 after renormalising (4.4 step 4).
BOUNDARY_MODELS = [
    [3064037, 1589877, 2653676, 486784, 3513643, 3340140, 1024885, 1104174],
    [4080889, 4080890, 4080889, 4080890, 113414, 113415, 113414, 113415],
    [2809195, 2809195, 2809195, 2809196, 46, 1846796, 1846796, 1846797],
]
# Two planes of two indices: after them range = 2^32 exactly and lower is a multiple of 2^32, so the
# interval's top lower + range (exclusive) is in the word after P and 4.5 step 4 emits no zero word;
# the inclusive top lower + range - 1 would be in P's word. Plane 0 leaves an odd scale s = 62499; model 1's
# index 3 (frequency ceil(2^36 / s)) then makes the scale exactly 2^12, and its index 1 (frequency 2^20,
# start chosen to make lower a multiple of 2^32) makes range 2^32.
SEAL_TOP_MODELS = [
    [4000, 2396173, 2396173, 2396173, 2396173, 2396173, 2396173, 2396178],
    [443869, 1048576, 608803, 1099530, 3394109, 3394110, 3394109, 3394110],
]
_BOUNDARY_PLANE_0 = "05452057222270654225465"
_BOUNDARY_PLANE_1 = "32121303031310003331012"
_BOUNDARY_PLANE_2 = "40360302662277377277327"


def index_table(models: list[list[int]], channel_group: list[int], levels: int) -> dict:
    """A K = 1 table whose int8 input q codes index min(max(q, 0), N - 1) (and float x index
    min(max(floor(x), 0), N - 1)), with the given models, one per group: vectors that pin index sequences."""
    groups = len(models)
    return {
        "layout": "NHWC", "channels": len(channel_group), "levels": levels, "quantizer": "uniform",
        "clip_min": 0.0, "clip_max": float(levels - 1),
        "int8": {"scale": 1.0, "zero_point": 0, "index_of_q": [min(max(q, 0), levels - 1) for q in range(-128, 128)]},
        "float_input": {"frac_bits": 0, "thresholds": list(range(1, levels))},
        "reconstruction": [float(i) for i in range(levels)],
        "contexts": {"groups": groups, "classes": 1, "channel_group": channel_group,
                     "neighbour_class": [0] * (levels + 1), "model_of_context": list(range(groups))},
        "models": [list(m) for m in models],
    }


def index_planes(*plane_digits: str) -> np.ndarray:
    """The (1, W, C) int8 input whose channel c holds the indices written as the digits of plane_digits[c]."""
    return np.array([[int(ch) for ch in p] for p in plane_digits], dtype=np.int8).T[None]


def _one_model(digits: str) -> Callable[[], tuple[dict, np.ndarray]]:
    return lambda: (index_table([EDGE_MODEL], [0], EDGE_LEVELS), index_planes(digits))


def _boundary(plane_1: str) -> Callable[[], tuple[dict, np.ndarray]]:
    return lambda: (index_table(BOUNDARY_MODELS, [0, 1, 2], EDGE_LEVELS),
                    index_planes(_BOUNDARY_PLANE_0, plane_1, _BOUNDARY_PLANE_2))


# Float input on the thresholds (SPEC.md 3.4): F = 4, T = (-32, -1, 0, 1, 40), i.e. -2, -1/16, 0, 1/16 and
# 2.5. Every threshold, one step (2^-F) and 2^-20 below it, small negatives that floor to X = -1 where
# truncation toward zero would give 0 (the index differs, as T_3 = 0), -0.0, values beyond +-2^31 after
# scaling, and the infinities.
FLOAT_THRESHOLDS = [-32, -1, 0, 1, 40]
FLOAT_VALUES = [-2.0, -2.0625, -0.0625, -0.125, 0.0, 0.0625, 2.5, 2.4375,
                -(2.0 ** -100), -0.03125, -0.0, 2.0 ** -100, 0.03125, 0.0625 - 2.0 ** -20, -0.0625 - 2.0 ** -20,
                2.5 - 2.0 ** -20, float("inf"), float("-inf"), 2.0 ** 127, -(2.0 ** 127), 2.0 ** 27, -(2.0 ** 27),
                2.0 ** 27 - 8.0, -(2.0 ** 27) - 16.0]  # all exact in float32


def _float_boundaries() -> tuple[dict, np.ndarray]:
    levels = len(FLOAT_THRESHOLDS) + 1
    table = index_table([[2796202, 2796203, 2796203, 2796202, 2796203, 2796203]], [0], levels)
    table["float_input"] = {"frac_bits": 4, "thresholds": FLOAT_THRESHOLDS}
    table["int8"] = {"scale": 0.0625, "zero_point": 0,
                     "index_of_q": [sum(t <= q for t in FLOAT_THRESHOLDS) for q in range(-128, 128)]}
    table["clip_min"], table["clip_max"] = -2.5, 3.0
    table["reconstruction"] = [-2.5, -1.0, -0.03125, 0.03125, 1.25, 3.0]
    return table, np.array(FLOAT_VALUES, dtype=np.float32).reshape(1, len(FLOAT_VALUES), 1)


EDGE_VECTORS = [
    VectorSpec("seal_zero_word", (1, len(_SEAL_ZERO), 1), EDGE_LEVELS, build=_one_model(_SEAL_ZERO),
               covers="sealing emits the extra zero word (4.5 step 4)"),
    VectorSpec("seal_no_zero_word", (1, 2, 2), EDGE_LEVELS, groups="channel",
               build=lambda: (index_table(SEAL_TOP_MODELS, [0, 1], EDGE_LEVELS), index_planes("00", "31")),
               covers="sealing with range = 2^32 and lower a multiple of 2^32: the exclusive top lower + range "
                      "is past P's word, so no zero word (4.5 step 4)"),
    VectorSpec("pending_carry", (1, len(_PENDING_CARRY), 1), EDGE_LEVELS, build=_one_model(_PENDING_CARRY),
               covers="3 held-back words settled by a carry: u+1, 0, 0 (4.4 step 2)"),
    VectorSpec("pending_no_carry", (1, len(_PENDING_NO_CARRY), 1), EDGE_LEVELS,
               build=_one_model(_PENDING_NO_CARRY),
               covers="3 held-back words settled without a carry: u, FFFFFFFF, FFFFFFFF (4.4 step 2)"),
    VectorSpec("seal_carry", (1, len(_SEAL_CARRY), 1), EDGE_LEVELS, build=_one_model(_SEAL_CARRY),
               covers="sealing while 17 words are held back, with a carry: u+1 and 16 zero words (4.5 step 2)"),
    VectorSpec("carry_boundary", (1, 23, 3), EDGE_LEVELS, groups="channel",
               build=_boundary("4" + _BOUNDARY_PLANE_1[1:]),
               covers="L = 2^64 exactly while words are held back: a carry (L >= 2^64, not L > 2^64; 4.4 step 2)"),
    VectorSpec("top_boundary", (1, 23, 3), EDGE_LEVELS, groups="channel", build=_boundary(_BOUNDARY_PLANE_1),
               covers="interval top exactly 2^64: L + range = 2^64 while inverted (4.4 step 2) and "
                      "lower + range = 2^64 after renormalising (4.4 step 4)"),
    VectorSpec("float_boundaries", (1, len(FLOAT_VALUES), 1), len(FLOAT_THRESHOLDS) + 1, dtype="float32",
               build=_float_boundaries,
               covers="float input on, just below and around every threshold; floor, not truncation; "
                      "-0.0, infinities and values beyond 2^31 after scaling (3.4)"),
]
VECTORS += EDGE_VECTORS


def reference_pattern(channels: int) -> list[int]:
    """Reference channels for the version 2 vectors: channels 2, 5, 8, ... are reference channels; each
    other channel c refers to reference channel number 7c mod (their count), so that references point both
    up and down the channel order and a slice of channels cuts some of them."""
    bases = [c for c in range(channels) if c % 3 == 2]
    if not bases:
        return [-1] * channels
    return [-1 if c % 3 == 2 else bases[(7 * c) % len(bases)] for c in range(channels)]


V2_VECTORS = [
    VectorSpec("v2_references", (16, 16, 32), 4, groups=4, classes=3, references="thirds", reference_classes=3,
               covers="reference channels (4.2), anti-diagonal scan with independent then dependent channels"),
    VectorSpec("v2_references_planar", (12, 10, 12), 6, groups="channel", references="thirds", reference_classes=4,
               covers="reference channels with K = 1: independent planes, then dependent planes"),
    VectorSpec("v2_levels_64", (8, 9, 16), 64, groups=2, classes=2, references="thirds", reference_classes=4,
               covers="64 levels, R * K * K = 16", seed=3),
    VectorSpec("v2_levels_32_float", (6, 7, 9), 32, groups=3, classes=3, dtype="float32",
               covers="32 levels, float input, no references (version 2 table)", seed=4),
    VectorSpec("slice_rows", (16, 16, 32), 4, groups=4, classes=3, region=(5, 4, 0, 32),
               covers="a slice of rows 5..8 of a version 1 table's tensor: a version 2 frame; row 5 has no above"),
    VectorSpec("slice_block", (16, 16, 32), 4, groups=4, classes=3, references="thirds", reference_classes=3,
               region=(3, 7, 4, 17), covers="rows 3..9, channels 4..20: references outside the slice count as none"),
    VectorSpec("slice_planar", (12, 10, 12), 6, groups="channel", references="thirds", reference_classes=4,
               region=(11, 1, 1, 9), covers="a one-row slice of a K = 1 table with references"),
    VectorSpec("slice_one_channel", (9, 11, 6), 5, groups=2, classes=2, references="thirds", reference_classes=2,
               region=(0, 9, 4, 1), covers="all rows of one dependent channel whose reference is outside"),
]
VECTORS += V2_VECTORS


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
    if spec.build is not None:
        return _write_vector(spec, root, *spec.build())
    rng = np.random.default_rng(spec.seed + 1000)
    calib = _activations(spec.shape, rng, batch=4)
    refs = reference_pattern(spec.shape[2]) if spec.references == "thirds" else None
    table = uniform_table(calib, spec.levels, clip_max=2.0, groups=spec.groups, classes=spec.classes,
                          reference_channel=refs, reference_classes=spec.reference_classes)
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
    if spec.region is not None:
        (folder / "region.json").write_text(json.dumps(dict(zip(REGION_FIELDS, spec.region))) + "\n")
    frame = _encoders()["python"](tables, data, spec.region)
    (folder / "expected.lwfc").write_bytes(frame)
    np.save(folder / "indices.npy", Decoder(tables).decode(frame).indices)
    return folder


REGION_FIELDS = ("row_first", "row_count", "channel_first", "channel_count")


def _write_vector(spec: VectorSpec, root: Path, table: dict, data: np.ndarray) -> Path:
    """Write a hand-made vector's folder: its table, input, frame and decoded indices."""
    if data.shape != spec.shape or table["levels"] != spec.levels or table["contexts"]["classes"] != spec.classes:
        raise ValueError(f"vector {spec.name}: its table or input disagrees with its VectorSpec")
    folder = root / spec.name
    folder.mkdir(parents=True, exist_ok=True)
    tables = Tables(write_tables(table, folder / "tables.json"))
    np.save(folder / "input.npy", data)
    frame = _encoders()["python"](tables, data)
    (folder / "expected.lwfc").write_bytes(frame)
    np.save(folder / "indices.npy", Decoder(tables).decode(frame).indices)
    return folder


def _symbol_intervals(tables: Tables, indices: np.ndarray, channel_first: int = 0):
    """(cumulative start, frequency) of each index of an (Hs, W, Cs) slice whose first channel is
    ``channel_first``, in the scan order (SPEC.md 4.1-4.2), from the device encoder's own key tables."""
    h, w, cs = indices.shape
    full = np.zeros((h, w, tables.channels), dtype=np.uint8)  # the slice placed in a tensor of its rows
    full[:, :, channel_first:channel_first + cs] = indices
    for key in scan_keys(tables, full.tobytes(), h, w, (0, h, channel_first, cs)):
        yield tables.start[key], tables.freq[key]


def coder_events(tables: Tables, indices: np.ndarray, payload: bytes | None = None, channel_first: int = 0) -> dict:
    """What the range coder meets while coding an (Hs, W, Cs) index slice whose first channel is
    ``channel_first`` (the whole tensor by default; the index.json counts, SPEC.md 9).

    Replays the device's RangeEncoder one index at a time and classifies each step by SPEC.md 4.4-4.5
    from the state before it: nothing here codes on its own. With ``payload``, checks that the replay
    wrote exactly those bytes."""
    t64, t32 = 1 << 64, 1 << 32
    coder = RangeEncoder()
    ev = {"inversions": 0, "carries": 0, "max_pending": 0, "max_pending_carry": 0, "max_pending_no_carry": 0,
          "exact_carry": 0, "exact_top_inverted": 0, "exact_top_renormalised": 0}
    for start, freq in _symbol_intervals(tables, indices, channel_first):
        scale = coder.rng >> 24
        rng = scale * freq
        low = coder.low + scale * start
        held = coder.inverted
        if held and low == t64:
            ev["exact_carry"] += 1
        elif held and low + rng == t64:
            ev["exact_top_inverted"] += 1
        n_words, carries = len(coder.words), coder.carries
        coder.encode_keys((0,), (start,), (freq,))
        settled = held and len(coder.words) > n_words  # held-back words are only ever written by settling
        if settled:
            key = "max_pending_carry" if coder.carries > carries else "max_pending_no_carry"
            ev[key] = max(ev[key], held)
        if rng < t32 and (not held or settled) and coder.low + coder.rng == t64:
            ev["exact_top_renormalised"] += 1
        ev["max_pending"] = max(ev["max_pending"], coder.inverted)
    held = coder.inverted
    seal_carry = bool(held) and coder.low + t32 - 1 >= t64
    p_word = ((coder.low + t32 - 1) % t64) >> 32
    # 4.5 step 4 compares the word of the exclusive top lower + range; the inclusive top's word is P here
    near_miss = ((coder.low + coder.rng - 1) % t64) >> 32 == p_word != ((coder.low + coder.rng) % t64) >> 32
    n_words = len(coder.words)
    words = coder.finish()
    if payload is not None and payload != b"".join(w.to_bytes(4, "little") for w in words):
        raise AssertionError("the replayed range coder disagrees with the payload")
    ev.update(inversions=coder.inversions, carries=coder.carries, seal_pending=held, seal_carry=seal_carry,
              seal_zero_word=len(words) - n_words - held == 2, seal_zero_word_near_miss=near_miss)
    return ev


def threshold_hits(tables: Tables, data: np.ndarray) -> int:
    """How many float inputs land exactly on a threshold: X = floor(x * 2^F) (clamped) equals some T_j."""
    if data.dtype == np.int8:
        return 0
    x = np.asarray(data, dtype=np.float64)
    fixed = np.clip(np.floor(x * float(1 << tables.frac_bits)), -2147483648.0, 2147483647.0)
    return int(np.isin(fixed, np.asarray(tables.thresholds, dtype=np.float64)).sum())


def regenerate(root: Path = VECTOR_DIR) -> list[Path]:
    """Rewrite every vector and index.json (a deliberate, reviewed change of the spec only)."""
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    folders = [make_vector(spec, root) for spec in VECTORS]
    index = []
    for spec, folder in zip(VECTORS, folders):
        tables, data, expected, indices, region = load_vector(folder)
        header, payload = parse_frame(expected)
        entry = {"name": spec.name, "shape": list(spec.shape), "levels": spec.levels,
                 "groups": spec.groups, "classes": spec.classes, "input": spec.dtype,
                 "table_version": tables.version, "frame_version": header.version,
                 "dependent_channels": sum(r >= 0 for r in tables.reference_channel),
                 "reference_classes": tables.reference_classes,
                 "region": list(region) if region is not None else None,
                 "covers": spec.covers, "frame_bytes": len(expected)}
        # what the range coder and the quantizer meet (SPEC.md 3.4, 4.4, 4.5; every field defined in 9)
        entry.update(coder_events(tables, indices, payload, header.channel_first))
        entry["threshold_hits"] = threshold_hits(tables, data)
        index.append(entry)
    (root / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    return folders


Region = tuple[int, int, int, int] | None


def _python_encoder(fast: bool) -> Callable[[Tables, np.ndarray, Region], bytes]:
    def encode(tables: Tables, data: np.ndarray, region: Region = None) -> bytes:
        h, w, _ = data.shape
        enc = Encoder(tables, fast=fast)
        if data.dtype == np.int8:
            return enc.encode_int8(data.tobytes(), h, w, region)
        return enc.encode_float(data.reshape(-1).tolist(), h, w, region)
    return encode


def _constriction_encoder(tables: Tables, data: np.ndarray, region: Region = None) -> bytes:
    enc = FastEncoder(tables)
    if data.dtype == np.int8:
        return enc.frame_int8(data, region=region)
    version = 2 if region is not None else tables.version
    payload = enc.payload(indices_from_float_np(data, tables), region=region)
    return pack_frame(tables.table_id, data.shape, payload, version, region)


def _encoders() -> dict[str, Callable[[Tables, np.ndarray, Region], bytes]]:
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
    """(tables, input, expected frame, decoded indices, region or None) of a vector folder."""
    tables = load_verified(folder / "tables.json")
    data = np.load(folder / "input.npy")
    expected = (folder / "expected.lwfc").read_bytes()
    indices = np.load(folder / "indices.npy")
    region = None
    if (folder / "region.json").exists():
        fields = json.loads((folder / "region.json").read_text())
        region = tuple(int(fields[k]) for k in REGION_FIELDS)
    return tables, data, expected, indices, region


def run(root: Path = VECTOR_DIR, micropython: bool = True, progress: bool = False) -> list[Row]:
    """Run every vector through every encoder and the host decoder; one Row each."""
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if not folders:
        raise FileNotFoundError(f"no conformance vectors in {root}")
    rows: list[Row] = []
    loaded = {f.name: load_vector(f) for f in folders}
    for name, (tables, data, expected, indices, region) in loaded.items():
        n = indices.size
        for impl, encode in _encoders().items():
            try:
                frame = encode(tables, data, region)
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
        tables, data, _, _, region = loaded[name]
        if data.dtype == np.int8:
            jobs.append((json.dumps(tables.raw), data.tobytes(), data.shape[0], data.shape[1], "int8", region))
        else:
            jobs.append((json.dumps(tables.raw), data.astype("<f8").tobytes(), data.shape[0], data.shape[1], "float",
                         region))
    try:
        frames = mp.encode_frames_micropython(jobs)
    except Exception as exc:  # report, do not crash the table: the row says what failed
        return [Row("*", "micropython", 0, 0, False, f"error: {exc}")]
    rows = []
    for name, frame in zip(names, frames):
        _, _, expected, indices, _ = loaded[name]
        ok = frame == expected
        rows.append(Row(name, "micropython", indices.size, len(frame), ok, "" if ok else "frame differs"))
    return rows


def format_rows(rows: list[Row]) -> str:
    lines = [f"{'vector':<22} {'implementation':<14} {'elements':>9} {'bytes':>8} {'bits/el':>8}  result"]
    for r in rows:
        result = "ok" if r.ok else f"FAIL {r.detail}"
        lines.append(f"{r.vector:<22} {r.implementation:<14} {r.elements:>9} {r.frame_bytes:>8} "
                     f"{r.bits_per_element:>8.4f}  {result}")
    return "\n".join(lines)
