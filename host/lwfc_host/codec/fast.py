"""Optional fast paths with numpy and constriction; frames are byte-identical to the pure-Python core.

Host code (the device package does not import it): the numpy+constriction encoder, and the vectorised
context rule (``context_ids``, ``context_map``, ``model_ids``) that the host decoder, the table design and
the evaluation use. Version 2 tables add the reference channel to the rule (SPEC.md 4.2): element (h, w, c)
with reference channel r (in the slice) has reference index ``idx[h, w, r]``, and ``levels`` ("no
reference") otherwise; version 1 tables behave as one reference class and no reference channels.
"""

from __future__ import annotations

import numpy as np

from lwfc.errors import EncodeError
from lwfc.frame import pack_frame
from lwfc.scan import diagonal_positions
from lwfc.tables import Tables, context_number


def index_array(indices_hwc: np.ndarray) -> np.ndarray:
    """The indices as int64, the width the table lookups below index with."""
    return np.asarray(indices_hwc, dtype=np.int64)


def context_ids(above: np.ndarray | None, left: np.ndarray | None, channel: np.ndarray | int,
                tables: Tables, reference: np.ndarray | None = None) -> np.ndarray:
    """The context rule (SPEC.md 4.2) vectorised: the context number
    ``((group * R + reference_class[reference]) * K + neighbour_class[above]) * K + neighbour_class[left]``
    of elements whose above, left and reference indices are ``above``, ``left`` and ``reference`` (the value
    ``levels`` meaning "outside the slice" / "no reference", as ``neighbours`` and ``reference_indices`` fill
    them in) and whose (absolute) channel number is ``channel``. All arrays broadcast together; with K = 1
    ``above``/``left`` are not read (they may be None); ``reference`` None means "no reference" everywhere
    (every element of a version 1 table). With R = 1 this is v1's ``group * K^2 + class_above * K + class_left``.

    The formula itself is the device's ``lwfc.tables.context_number`` (plain arithmetic, so it takes
    arrays); this adds the table lookups. ``class_context_ids`` is the same with the classes given."""
    k = tables.classes
    refs = tables.reference_classes
    group = np.asarray(tables.channel_group, dtype=np.int64)[channel]
    rcls = np.asarray(tables.reference_class, dtype=np.int64)
    class_reference = rcls[tables.levels] if reference is None else rcls[reference]
    if k == 1:
        return context_number(group, 0, 0, 1, class_reference, refs)
    ncls = np.asarray(tables.neighbour_class, dtype=np.int64)
    return class_context_ids(ncls[above], ncls[left], group, k, class_reference, refs)


def class_context_ids(class_above: np.ndarray, class_left: np.ndarray, group: np.ndarray,
                      classes: int, class_reference: np.ndarray | int = 0,
                      reference_classes: int = 1) -> np.ndarray:
    """``context_ids`` for neighbours whose classes are already looked up (the host decoder keeps the
    classes of the last decoded positions, so each class is looked up once). With the defaults (no
    reference class) ``group`` may be ``group * R + reference_class``, the decoder's per-channel base."""
    return context_number(group, class_above, class_left, classes, class_reference, reference_classes)


def neighbours(idx: np.ndarray, outside: int) -> tuple[np.ndarray, np.ndarray]:
    """Above and left neighbour indices of every element of a (..., H, W, C) index array (one tensor, or
    a batch), ``outside`` where the neighbour lies outside the tensor."""
    above = np.full_like(idx, outside)
    left = np.full_like(idx, outside)
    above[..., 1:, :, :] = idx[..., :-1, :, :]
    left[..., :, 1:, :] = idx[..., :, :-1, :]
    return above, left


def slice_channels(tables: Tables, channel_first: int, channel_count: int):
    """The reference structure of the channels ``channel_first .. channel_first + channel_count - 1`` (a
    slice's, or the whole tensor's): (independent, dependent, reference) where ``independent`` and
    ``dependent`` are the local channel numbers (0 = channel_first) in scan order
    (``Tables.channels_in_order``) and ``reference[i]`` the local reference channel of ``dependent[i]``."""
    independent, dependent = tables.channels_in_order(channel_first, channel_count)
    ref = [tables.reference_channel[c] - channel_first for c in dependent]
    return ([c - channel_first for c in independent], [c - channel_first for c in dependent], ref)


def reference_indices(idx: np.ndarray, tables: Tables, channel_first: int = 0) -> np.ndarray | None:
    """Reference index of every element of a (..., H, W, Cs) index array whose last axis holds the channels
    ``channel_first .. channel_first + Cs - 1``: ``idx[..., r]`` for a channel whose reference channel r lies
    among them, ``levels`` ("no reference") otherwise. None when no channel has its reference among them
    (every element then has reference index ``levels``)."""
    _, dependent, ref = slice_channels(tables, channel_first, idx.shape[-1])
    if not dependent:
        return None
    out = np.full_like(idx, tables.levels)
    out[..., dependent] = idx[..., ref]
    return out


def context_map(idx: np.ndarray, tables: Tables, channel_first: int = 0) -> np.ndarray:
    """Context number (SPEC.md 4.2) of every element of a (..., H, W, Cs) index array, coded as one tensor
    (or as one slice: its first row has no above neighbour) whose channels are ``channel_first ..
    channel_first + Cs - 1`` (the whole tensor's by default). Reference channels outside them count as none."""
    cs = idx.shape[-1]
    reference = reference_indices(idx, tables, channel_first)
    channel = np.arange(channel_first, channel_first + cs)
    if tables.classes == 1:
        ctx = context_ids(None, None, channel, tables, reference)
    else:
        above, left = neighbours(idx, tables.levels)
        ctx = context_ids(above, left, channel, tables, reference)
    return np.broadcast_to(ctx, idx.shape)


def model_ids(idx: np.ndarray, tables: Tables, model_of_context: np.ndarray | None = None,
              channel_first: int = 0) -> np.ndarray:
    """Model index of every element of an (H, W, C) index array, or a batch (..., H, W, C) of them, by the
    context rule on each whole tensor (``context_map``; ``channel_first`` for a slice's channels).
    ``model_of_context``: ``tables.model_of_context`` as an int64 array, when the caller already has it."""
    if model_of_context is None:
        model_of_context = np.asarray(tables.model_of_context, dtype=np.int64)
    return model_of_context[context_map(idx, tables, channel_first)]


def scan_permutation(height: int, width: int) -> np.ndarray:
    """Raster position index of each position in scan order."""
    return np.fromiter(diagonal_positions(height, width), dtype=np.int64, count=height * width)


def scan_order(height: int, width: int, independent: list[int], dependent: list[int], classes: int) -> np.ndarray:
    """Flat raster index (into a (height, width, Cs) slice) of each element in scan order (SPEC.md 4.1):
    channel-planar for K = 1 (the ``independent`` planes, then the ``dependent`` ones); for K > 1, per
    anti-diagonal, the independent channels of its positions, then the dependent ones."""
    cs = len(independent) + len(dependent)
    order = np.asarray(independent + dependent, dtype=np.int64)
    if classes == 1:
        return (np.arange(height * width, dtype=np.int64)[None, :] * cs + order[:, None]).reshape(-1)
    pos = scan_permutation(height, width)
    flat = (pos[:, None] * cs + order[None, :]).reshape(-1)
    if not dependent:
        return flat
    diag = pos // width + pos % width
    key = 2 * diag[:, None] + (np.arange(cs) >= len(independent))[None, :]
    return flat[np.argsort(key.reshape(-1), kind="stable")]


def probability_rows(tables: Tables) -> np.ndarray:
    """Float32 rows ``frequency - 1`` per model: constriction's ``Categorical(perfect=False)`` turns
    them back into exactly these integer frequencies. Float32 is exact here, and half the memory
    traffic of float64: each row sums to 2^24 - N, so every partial sum constriction forms is an integer
    below 2^24 and its scale factor (2^24 - N) / sum is exactly 1."""
    return np.asarray(tables.models, dtype=np.float32) - np.float32(1.0)


def independent_models(tables: Tables) -> list[int]:
    """For K = 1 tables: per channel, the model of its plane when it is independent (no reference channel
    in the slice): ``model_of_context[context_number(g, 0, 0, 1, reference_class[N], R)]``."""
    rc = tables.reference_class[tables.levels]
    return [tables.model_of_context[context_number(g, 0, 0, 1, rc, tables.reference_classes)]
            for g in tables.channel_group]


def plane_models(tables: Tables) -> list:
    """For K = 1 tables: the constriction model coding each channel's plane when the channel is
    independent (``independent_models``)."""
    import constriction

    probs = probability_rows(tables)
    built = {}
    out = []
    for m in independent_models(tables):
        if m not in built:
            built[m] = constriction.stream.model.Categorical(probs[m], perfect=False)
        out.append(built[m])
    return out


def check_region(region, height: int, channels: int) -> tuple[int, int, int, int]:
    """``region`` (row_first, row_count, channel_first, channel_count) as ints, or the whole tensor's for
    None; EncodeError if it does not lie within ``height`` rows and ``channels`` channels (as the device's)."""
    if region is None:
        return (0, height, 0, channels)
    r0, rn, c0, cn = (int(v) for v in region)
    if rn < 1 or cn < 1 or r0 < 0 or c0 < 0 or r0 + rn > height or c0 + cn > channels:
        raise EncodeError(f"slice rows {r0}+{rn}, channels {c0}+{cn} do not lie within {height} rows and "
                          f"{channels} channels")
    return (r0, rn, c0, cn)


class FastEncoder:
    """Frames for one table, with numpy and constriction: byte-identical to ``lwfc.encoder.Encoder``
    (version 1 and 2 tables, whole tensors and slices). The per-table arrays (index lookup, probability
    rows, plane models, scan orders) are built once, so coding many tensors with one table costs only the
    per-tensor work."""

    def __init__(self, tables: Tables) -> None:
        import constriction

        self.tables = tables
        self.lut = np.asarray(tables.index_of_q, dtype=np.int64)
        self.probs = probability_rows(tables)
        self.model_of_context = np.asarray(tables.model_of_context, dtype=np.int64)
        self._family = constriction.stream.model.Categorical(perfect=False)
        self._single = (constriction.stream.model.Categorical(self.probs[0], perfect=False)
                        if len(tables.models) == 1 else None)
        self._planes = plane_models(tables) if tables.classes == 1 and self._single is None else None
        self._scan = {}  # (H, W) -> scan_permutation
        self._orders = {}  # (rows, W, channel_first, channel_count) -> scan_order
        self._channels = {}  # (channel_first, channel_count) -> slice_channels

    def _slice_channels(self, c0: int, cn: int):
        got = self._channels.get((c0, cn))
        if got is None:
            got = self._channels[(c0, cn)] = slice_channels(self.tables, c0, cn)
        return got

    def payload(self, idx_hwc: np.ndarray, region=None) -> bytes:
        """Payload bytes (SPEC.md section 5) for an (H, W, C) index array: the whole tensor, or the slice
        ``region`` = (row_first, row_count, channel_first, channel_count)."""
        import constriction

        t = self.tables
        h, w, c = idx_hwc.shape
        r0, rn, c0, cn = check_region(region, h, c)
        idx = index_array(idx_hwc)
        if (r0, rn, c0, cn) != (0, h, 0, c):
            idx = idx[r0:r0 + rn, :, c0:c0 + cn]
        independent, dependent, ref = self._slice_channels(c0, cn)
        encoder = constriction.stream.queue.RangeEncoder()
        if t.classes == 1:  # channel-planar order
            planes = idx.reshape(rn * w, cn).T.astype(np.int32)
            if self._single is not None:  # one model for everything
                if dependent:
                    planes = planes[independent + dependent]
                encoder.encode(planes.reshape(-1), self._single)
            else:
                for j in independent:  # one fixed model per plane
                    encoder.encode(planes[j], self._planes[c0 + j])
                if dependent:  # the model of each element from its reference index
                    group = np.asarray(t.channel_group, dtype=np.int64)[np.asarray(dependent) + c0]
                    rcls = np.asarray(t.reference_class, dtype=np.int64)
                    ctx = context_number(group[:, None], 0, 0, 1, rcls[planes[ref]], t.reference_classes)
                    mids = self.model_of_context[ctx].reshape(-1)
                    encoder.encode(planes[dependent].reshape(-1), self._family, np.take(self.probs, mids, axis=0))
        elif not dependent:  # v1's order: positions by anti-diagonals, all channels of a position
            perm = self._scan.get((rn, w))
            if perm is None:
                perm = self._scan[(rn, w)] = scan_permutation(rn, w)
            models = model_ids(idx, t, self.model_of_context, c0)
            symbols = idx.reshape(rn * w, cn)[perm].reshape(-1).astype(np.int32)
            mids = models.reshape(rn * w, cn)[perm].reshape(-1)
            encoder.encode(symbols, self._family, np.take(self.probs, mids, axis=0))
        else:  # per anti-diagonal: the independent channels of its positions, then the dependent ones
            key = (rn, w, c0, cn)
            order = self._orders.get(key)
            if order is None:
                order = self._orders[key] = scan_order(rn, w, independent, dependent, t.classes)
            models = model_ids(idx, t, self.model_of_context, c0)
            symbols = idx.reshape(-1)[order].astype(np.int32)
            mids = models.reshape(-1)[order]
            encoder.encode(symbols, self._family, np.take(self.probs, mids, axis=0))
        return encoder.get_compressed().astype("<u4").tobytes()

    def frame_indices(self, idx_hwc: np.ndarray, region=None) -> bytes:
        """Frame for an (H, W, C) index array (the slice ``region`` of it, if given): version 1 for a whole
        tensor with a version 1 table, version 2 otherwise, as the device's encoder."""
        idx = np.asarray(idx_hwc)
        payload = self.payload(idx, region)
        version = 2 if region is not None else self.tables.version
        return pack_frame(self.tables.table_id, idx.shape, payload, version, region)

    def frame_int8(self, q_hwc: np.ndarray, region=None) -> bytes:
        """Frame for an int8 (H, W, C) array: quantized by table lookup, then coded (the slice ``region`` =
        (row_first, row_count, channel_first, channel_count) of it, if given)."""
        q = np.asarray(q_hwc, dtype=np.int8)
        return self.frame_indices(self.lut[q.astype(np.int64) + 128], region)


def encode_indices_constriction(idx_hwc: np.ndarray, tables: Tables, region=None) -> bytes:
    """Payload bytes for an (H, W, C) index array (or its slice ``region``), coded with constriction
    (one-off; ``FastEncoder`` for many tensors with one table)."""
    return FastEncoder(tables).payload(idx_hwc, region)


def encode_int8_constriction(q_hwc: np.ndarray, tables: Tables, region=None) -> bytes:
    """Frame for an int8 (H, W, C) array (or its slice ``region``), quantized with numpy and coded with
    constriction (one-off; ``FastEncoder`` for many tensors with one table)."""
    return FastEncoder(tables).frame_int8(q_hwc, region)


def indices_from_float_np(x: np.ndarray, tables: Tables) -> np.ndarray:
    """Indices of a float array under the table's fixed-point thresholds (SPEC.md, section 3.3)."""
    x = np.asarray(x, dtype=np.float64)
    if np.isnan(x).any():
        raise EncodeError("input contains NaN")
    fixed = np.clip(np.floor(x * float(1 << tables.frac_bits)), -2147483648.0, 2147483647.0)
    return np.searchsorted(np.asarray(tables.thresholds, dtype=np.float64), fixed, side="right")
