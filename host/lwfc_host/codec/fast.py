"""Optional fast paths with numpy and constriction; frames are byte-identical to the pure-Python core.

Host code (the device package does not import it): the numpy+constriction encoder, and the vectorised
context rule (``context_ids``, ``context_map``) that the host decoder and the table design use.
"""

from __future__ import annotations

import numpy as np

from lwfc.frame import pack_frame
from lwfc.scan import diagonal_positions
from lwfc.tables import Tables, context_number


def index_array(indices_hwc: np.ndarray) -> np.ndarray:
    """The indices as int64, the width the table lookups below index with."""
    return np.asarray(indices_hwc, dtype=np.int64)


def context_ids(above: np.ndarray | None, left: np.ndarray | None, channel: np.ndarray | int,
                tables: Tables) -> np.ndarray:
    """The context rule (SPEC.md 4.2) vectorised: the context number
    ``group * K^2 + neighbour_class[above] * K + neighbour_class[left]`` of elements whose above and left
    neighbour indices are ``above`` and ``left`` (the value ``levels`` meaning "outside the tensor", as
    ``neighbours`` fills them in) and whose channel index is ``channel``. All arrays broadcast together;
    with K = 1 the context is the channel's group and ``above``/``left`` are not read (they may be None).

    The formula itself is the device's ``lwfc.tables.context_number`` (plain arithmetic, so it takes
    arrays); this adds the table lookups. ``class_context_ids`` is the same with the classes given."""
    k = tables.classes
    group = np.asarray(tables.channel_group, dtype=np.int64)[channel]
    if k == 1:
        return group
    ncls = np.asarray(tables.neighbour_class, dtype=np.int64)
    return class_context_ids(ncls[above], ncls[left], group, k)


def class_context_ids(class_above: np.ndarray, class_left: np.ndarray, group: np.ndarray,
                      classes: int) -> np.ndarray:
    """``context_ids`` for neighbours whose classes are already looked up (the host decoder keeps the
    classes of the last decoded positions, so each class is looked up once)."""
    return context_number(group, class_above, class_left, classes)


def neighbours(idx: np.ndarray, outside: int) -> tuple[np.ndarray, np.ndarray]:
    """Above and left neighbour indices of every element of a (..., H, W, C) index array (one tensor, or
    a batch), ``outside`` where the neighbour lies outside the tensor."""
    above = np.full_like(idx, outside)
    left = np.full_like(idx, outside)
    above[..., 1:, :, :] = idx[..., :-1, :, :]
    left[..., :, 1:, :] = idx[..., :, :-1, :]
    return above, left


def context_map(idx: np.ndarray, tables: Tables) -> np.ndarray:
    """Context number (SPEC.md 4.2) of every element of a (..., H, W, C) index array."""
    above, left = neighbours(idx, tables.levels)
    return np.broadcast_to(context_ids(above, left, np.arange(idx.shape[-1]), tables), idx.shape)


def model_ids(idx: np.ndarray, tables: Tables, model_of_context: np.ndarray | None = None) -> np.ndarray:
    """Model index of every element of an (H, W, C) index array (raster order). ``model_of_context``:
    ``tables.model_of_context`` as an int64 array, when the caller already has it."""
    if model_of_context is None:
        model_of_context = np.asarray(tables.model_of_context, dtype=np.int64)
    return model_of_context[context_map(idx, tables)]


def scan_permutation(height: int, width: int) -> np.ndarray:
    """Raster position index of each position in scan order."""
    return np.fromiter(diagonal_positions(height, width), dtype=np.int64, count=height * width)


def probability_rows(tables: Tables) -> np.ndarray:
    """Float32 rows ``frequency - 1`` per model: constriction's ``Categorical(perfect=False)`` turns
    them back into exactly these integer frequencies. Float32 is exact here, and half the memory
    traffic of float64: each row sums to 2^24 - N, so every partial sum constriction forms is an integer
    below 2^24 and its scale factor (2^24 - N) / sum is exactly 1."""
    return np.asarray(tables.models, dtype=np.float32) - np.float32(1.0)


def plane_models(tables: Tables) -> list:
    """For K = 1 tables: the constriction model coding each channel's plane."""
    import constriction

    probs = probability_rows(tables)
    built = {}
    out = []
    for g in tables.channel_group:
        m = tables.model_of_context[g]
        if m not in built:
            built[m] = constriction.stream.model.Categorical(probs[m], perfect=False)
        out.append(built[m])
    return out


class FastEncoder:
    """Frames for one table, with numpy and constriction: byte-identical to ``encoder.encode_int8``.
    The per-table arrays (index lookup, probability rows, plane models, scan orders) are built once, so
    coding many tensors with one table costs only the per-tensor work."""

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

    def payload(self, idx_hwc: np.ndarray) -> bytes:
        """Payload bytes (SPEC.md section 5) for an (H, W, C) index array."""
        import constriction

        h, w, c = idx_hwc.shape
        idx = index_array(idx_hwc)
        encoder = constriction.stream.queue.RangeEncoder()
        if self.tables.classes == 1:  # channel-planar order, one model per plane
            planes = idx.reshape(h * w, c).T.astype(np.int32)
            if self._single is not None:
                encoder.encode(planes.reshape(-1), self._single)
            else:
                for ch in range(c):
                    encoder.encode(planes[ch], self._planes[ch])
        else:
            perm = self._scan.get((h, w))
            if perm is None:
                perm = self._scan[(h, w)] = scan_permutation(h, w)
            models = model_ids(idx, self.tables, self.model_of_context)
            symbols = idx.reshape(h * w, c)[perm].reshape(-1).astype(np.int32)
            mids = models.reshape(h * w, c)[perm].reshape(-1)
            encoder.encode(symbols, self._family, np.take(self.probs, mids, axis=0))
        return encoder.get_compressed().astype("<u4").tobytes()

    def frame_int8(self, q_hwc: np.ndarray) -> bytes:
        """Frame for an int8 (H, W, C) array: quantized by table lookup, then coded."""
        q = np.asarray(q_hwc, dtype=np.int8)
        idx = self.lut[q.astype(np.int64) + 128]
        return pack_frame(self.tables.table_id, idx.shape, self.payload(idx))


def encode_indices_constriction(idx_hwc: np.ndarray, tables: Tables) -> bytes:
    """Payload bytes for an (H, W, C) index array, coded with constriction (one-off; ``FastEncoder``
    for many tensors with one table)."""
    return FastEncoder(tables).payload(idx_hwc)


def encode_int8_constriction(q_hwc: np.ndarray, tables: Tables) -> bytes:
    """Frame for an int8 (H, W, C) array, quantized with numpy and coded with constriction (one-off;
    ``FastEncoder`` for many tensors with one table)."""
    return FastEncoder(tables).frame_int8(q_hwc)


def indices_from_float_np(x: np.ndarray, tables: Tables) -> np.ndarray:
    """Indices of a float array under the table's fixed-point thresholds (SPEC.md, section 3.3)."""
    from lwfc.errors import EncodeError

    x = np.asarray(x, dtype=np.float64)
    if np.isnan(x).any():
        raise EncodeError("input contains NaN")
    fixed = np.clip(np.floor(x * float(1 << tables.frac_bits)), -2147483648.0, 2147483647.0)
    return np.searchsorted(np.asarray(tables.thresholds, dtype=np.float64), fixed, side="right")
