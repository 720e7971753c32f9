"""Optional fast paths with numpy and constriction; frames are byte-identical to the pure-Python core.

Only for boards (and hosts) that have numpy; the host decoder reuses the context rule from here.
"""

import numpy as np

from lwfc.frame import pack_frame
from lwfc.scan import diagonal_positions


def index_array(indices_hwc):
    return np.asarray(indices_hwc, dtype=np.int64)


def context_ids(above, left, channel, tables):
    """Context number ``group * K^2 + class(above) * K + class(left)`` for elements whose above and left
    neighbour indices are given (the value ``levels`` meaning "outside the tensor") and whose channel
    index is ``channel``. All arrays broadcast together."""
    k = tables.classes
    group = np.asarray(tables.channel_group, dtype=np.int64)[channel]
    if k == 1:
        return group
    ncls = np.asarray(tables.neighbour_class, dtype=np.int64)
    return group * (k * k) + ncls[above] * k + ncls[left]


def neighbours(idx, outside):
    """Above and left neighbour indices of every element of an (H, W, C) index array, ``outside``
    where the neighbour lies outside the tensor."""
    above = np.full_like(idx, outside)
    left = np.full_like(idx, outside)
    above[1:] = idx[:-1]
    left[:, 1:] = idx[:, :-1]
    return above, left


def context_map(idx, tables):
    """Context number (SPEC.md 4.2) of every element of an (H, W, C) index array."""
    above, left = neighbours(idx, tables.levels)
    return np.broadcast_to(context_ids(above, left, np.arange(idx.shape[2]), tables), idx.shape)


def model_ids(idx, tables, model_of_context=None):
    """Model index of every element of an (H, W, C) index array (raster order). ``model_of_context``:
    ``tables.model_of_context`` as an int64 array, when the caller already has it."""
    if model_of_context is None:
        model_of_context = np.asarray(tables.model_of_context, dtype=np.int64)
    return model_of_context[context_map(idx, tables)]


def scan_permutation(height, width):
    """Raster position index of each position in scan order."""
    return np.fromiter(diagonal_positions(height, width), dtype=np.int64, count=height * width)


def probability_rows(tables):
    """Float32 rows ``frequency - 1`` per model: constriction's ``Categorical(perfect=False)`` turns
    them back into exactly these integer frequencies. Float32 is exact here, and half the memory
    traffic of float64: each row sums to 2^24 - N, so every partial sum constriction forms is an integer
    below 2^24 and its scale factor (2^24 - N) / sum is exactly 1."""
    return np.asarray(tables.models, dtype=np.float32) - np.float32(1.0)


def plane_models(tables):
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


class FastEncoder(object):
    """Frames for one table, with numpy and constriction: byte-identical to ``encoder.encode_int8``.
    The per-table arrays (index lookup, probability rows, plane models, scan orders) are built once, so
    coding many tensors with one table costs only the per-tensor work."""

    def __init__(self, tables):
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

    def payload(self, idx_hwc):
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

    def frame_int8(self, q_hwc):
        """Frame for an int8 (H, W, C) array: quantized by table lookup, then coded."""
        q = np.asarray(q_hwc, dtype=np.int8)
        idx = self.lut[q.astype(np.int64) + 128]
        return pack_frame(self.tables.table_id, idx.shape, self.payload(idx))


def encode_indices_constriction(idx_hwc, tables):
    """Payload bytes for an (H, W, C) index array, coded with constriction (one-off; ``FastEncoder``
    for many tensors with one table)."""
    return FastEncoder(tables).payload(idx_hwc)


def encode_int8_constriction(q_hwc, tables):
    """Frame for an int8 (H, W, C) array, quantized with numpy and coded with constriction (one-off;
    ``FastEncoder`` for many tensors with one table)."""
    return FastEncoder(tables).frame_int8(q_hwc)


def indices_from_float_np(x, tables):
    """Indices of a float array under the table's fixed-point thresholds (SPEC.md, section 3.3)."""
    from lwfc.errors import EncodeError

    x = np.asarray(x, dtype=np.float64)
    if np.isnan(x).any():
        raise EncodeError("input contains NaN")
    fixed = np.clip(np.floor(x * float(1 << tables.frac_bits)), -2147483648.0, 2147483647.0)
    return np.searchsorted(np.asarray(tables.thresholds, dtype=np.float64), fixed, side="right")
