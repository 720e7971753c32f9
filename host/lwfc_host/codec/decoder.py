"""Host decoder: validate a frame, range-decode it with constriction in vectorised calls, reconstruct.

Decoding follows SPEC.md, section 6, for version 1 and 2 frames (a slice, or the whole tensor) with
version 1 and 2 tables. A slice is decoded as if it were the tensor: its first row has no above neighbour,
and a reference channel outside its channels counts as none (the channel is then independent); channel
groups and reference channels are those of the absolute channel numbers.

With neighbour contexts (K > 1) each anti-diagonal of positions takes one constriction call for all its
positions' independent channels, whose contexts depend only on the diagonal before (the context rule:
``lwfc_host.codec.fast.context_ids``), then one for their dependent channels, whose reference classes come
from the independent symbols just decoded. Without them (K = 1, channel-planar order) one call decodes
each independent channel's plane with its fixed model, or all planes in one call when the table has a
single model, and one more call all dependent planes with a model per element. The payload must be exactly
the canonical encoder output: it is re-encoded and compared, which catches words that run out, words left
over and any other non-canonical payload.
"""

from __future__ import annotations

from dataclasses import dataclass

import constriction
import numpy as np

from lwfc.errors import BadShape, PayloadError, TableMismatch
from lwfc.frame import FrameHeader, check_table_version, parse_frame
from lwfc.scan import diagonal_runs
from lwfc.tables import Tables
from lwfc_host.codec.fast import (
    class_context_ids,
    plane_models,
    probability_rows,
    slice_channels,
)

_CACHE_LIMIT = 64  # per-shape and per-channel-range lookups kept per decoder


@dataclass
class Decoded:
    """A decoded frame: header, quantization indices (Hs, W, Cs) of the frame's slice (the whole tensor
    unless ``header.sliced``; ``header.region`` says where it lies) and their float32 reconstruction
    (1, Hs, W, Cs)."""

    header: FrameHeader
    indices: np.ndarray
    tensor: np.ndarray

    @property
    def bits_per_element(self) -> float:
        return 8.0 * self.header.frame_length / self.header.element_count


class _Channels:
    """What decoding needs about a slice's channels (channel_first .. channel_first + channel_count - 1):
    the scan's channel order (independent, then dependent local channels), its inverse, and per channel of
    that order the context base ``group * R`` (plus ``reference_class[N]`` for the independent ones), and
    for the dependent ones the position of their reference channel among the independent ones."""

    def __init__(self, tables: Tables, channel_first: int, channel_count: int):
        self.first, self.count = channel_first, channel_count
        independent, dependent, ref = slice_channels(tables, channel_first, channel_count)
        self.independent = independent
        self.dependent = dependent
        self.order = np.asarray(independent + dependent, dtype=np.int64)
        self.inverse = np.argsort(self.order)
        self.in_order = self.order.tolist() == list(range(channel_count))
        group = np.asarray(tables.channel_group, dtype=np.int64)[channel_first:channel_first + channel_count]
        r = tables.reference_classes
        no_ref = tables.reference_class[tables.levels]
        self.base_independent = group[independent] * r + no_ref
        self.base_dependent = group[dependent] * r
        position = {j: i for i, j in enumerate(independent)}
        self.reference_position = np.asarray([position[j] for j in ref], dtype=np.int64)
        self.independent_channels = [channel_first + j for j in independent]  # absolute numbers


class Decoder:
    """Decodes frames made with one table."""

    def __init__(self, tables: Tables, verify: bool = True):
        self.tables = tables
        self.verify = verify
        self._probs = probability_rows(tables)
        self._model_of_context = np.asarray(tables.model_of_context, dtype=np.int64)
        self._recon = np.asarray(tables.reconstruction, dtype=np.float32)
        self._ncls = np.asarray(tables.neighbour_class, dtype=np.int64)
        self._rcls = np.asarray(tables.reference_class, dtype=np.int64)
        self._family = constriction.stream.model.Categorical(perfect=False)
        self._plane_models = plane_models(tables) if tables.classes == 1 else None
        self._probs_of_context = None  # rows per context number, built on first use
        self._channels = {}  # (channel_first, channel_count) -> _Channels

    def decode(self, frame: bytes) -> Decoded:
        """Decode one complete frame. Raises a FrameError subclass for any malformed frame."""
        header, payload = parse_frame(frame)
        t = self.tables
        if header.table_id != t.table_id:
            raise TableMismatch(f"frame was coded with table {header.table_id.hex()}, "
                                f"this decoder has table {t.table_id_hex()}")
        problem = check_table_version(header, t.version)
        if problem is not None:
            raise TableMismatch(problem)
        _, w, c = header.shape
        if c != t.channels:
            raise BadShape(f"frame has {c} channels, the table is for {t.channels}")
        rows, cn = header.row_count, header.channel_count
        ch = self._slice_channels(header.channel_first, cn)
        words = np.frombuffer(payload, dtype="<u4").astype(np.uint32)
        try:
            if t.classes == 1:
                idx, canonical = self._decode_planes(words, rows, w, ch)
            elif not ch.dependent:
                idx, canonical = self._decode_by_diagonals(words, rows, w, ch)
            else:
                idx, canonical = self._decode_by_diagonals_dependent(words, rows, w, ch)
        except BaseException as exc:  # constriction raises plain ValueError/AssertionError/...
            if isinstance(exc, (KeyboardInterrupt, SystemExit, MemoryError)):
                raise
            raise PayloadError(f"payload does not decode: {exc}") from exc
        if canonical is not None:
            _check_canonical(words, canonical)
        tensor = self._recon[idx].reshape(1, rows, w, cn)
        return Decoded(header, idx, tensor)

    def _slice_channels(self, channel_first: int, channel_count: int) -> _Channels:
        key = (channel_first, channel_count)
        got = self._channels.get(key)
        if got is None:
            if len(self._channels) >= _CACHE_LIMIT:
                self._channels.clear()
            got = self._channels[key] = _Channels(self.tables, channel_first, channel_count)
        return got

    def _context_rows(self) -> np.ndarray:
        """Probability rows per context number (G * R * K * K rows of N float32, at most 16 MiB)."""
        if self._probs_of_context is None:
            self._probs_of_context = self._probs[self._model_of_context]
        return self._probs_of_context

    def _decode_planes(self, words, rows, w, ch):
        """K = 1: channel-planar order. Each independent plane has one fixed model (one call per plane, or
        one call for every plane when the table has a single model); then one call decodes every dependent
        plane, each element with the model of its reference index's class.

        Returns the (rows, W, Cs) indices and, with ``verify``, their canonical re-encoding."""
        t = self.tables
        n = rows * w
        cn = len(ch.order)
        n_ind = len(ch.independent)
        decoder = constriction.stream.queue.RangeDecoder(words)
        encoder = constriction.stream.queue.RangeEncoder() if self.verify else None
        if len(t.models) == 1:
            planes = decoder.decode(self._plane_models[0], n * cn).reshape(cn, n)
            if encoder is not None:
                encoder.encode(planes.reshape(-1), self._plane_models[0])
        else:
            planes = np.empty((cn, n), dtype=np.int32)
            for i, c in enumerate(ch.independent_channels):
                model = self._plane_models[c]
                planes[i] = decoder.decode(model, n)
                if encoder is not None:
                    encoder.encode(planes[i], model)
            if ch.dependent:
                # context_number(g, 0, 0, 1, reference class, R) = g * R + reference class
                ctx = ch.base_dependent[:, None] + np.take(self._rcls, planes[ch.reference_position])
                prob_rows = np.take(self._probs, self._model_of_context[ctx].reshape(-1), axis=0)
                sym = decoder.decode(self._family, prob_rows)
                if encoder is not None:
                    encoder.encode(sym, self._family, prob_rows)
                planes[n_ind:] = sym.reshape(-1, n)
        if not ch.in_order:
            planes = planes[ch.inverse]
        idx = np.ascontiguousarray(planes.T).reshape(rows, w, cn).astype(np.uint8)
        return idx, None if encoder is None else encoder.get_compressed()

    def _decode_by_diagonals(self, words, h, w, ch):
        """K > 1 without dependent channels (every version 1 table): one constriction call per anti-diagonal.

        ``last[r + 1]`` holds the neighbour classes of the most recently decoded position of row r
        (row -1 and rows not reached yet hold the class of "outside"). After diagonal d - 1, for a
        position (r, d - r) that is exactly its above neighbour in ``last[r]`` and its left neighbour in
        ``last[r + 1]``, so every step is a slice, not a gather.

        With ``verify`` each diagonal is re-encoded right after it is decoded, while its probability
        rows are still in cache (``np.take`` gathers them: several times faster than fancy indexing).
        Returns the (H, W, Cs) indices and, with ``verify``, their canonical re-encoding."""
        k = self.tables.classes
        ncls = self._ncls
        c = len(ch.order)
        decoder = constriction.stream.queue.RangeDecoder(words)
        encoder = constriction.stream.queue.RangeEncoder() if self.verify else None
        last = np.full((h + 1, c), ncls[self.tables.levels], dtype=np.int64)
        group = ch.base_independent  # group * R + reference_class[N]: the context's leading digit
        probs_of_context = self._context_rows()
        idx = np.empty((h * w, c), dtype=np.uint8)
        step = max(w - 1, 1)  # a diagonal's positions first, first + W - 1, ...: a strided run of rows
        for first, count in diagonal_runs(h, w):
            r0 = first // w
            ctx = class_context_ids(last[r0:r0 + count], last[r0 + 1:r0 + count + 1], group, k)
            rows = np.take(probs_of_context, ctx.reshape(-1), axis=0)
            sym = decoder.decode(self._family, rows)
            if encoder is not None:
                encoder.encode(sym, self._family, rows)
            sym = sym.reshape(count, c)
            last[r0 + 1:r0 + count + 1] = np.take(ncls, sym)
            idx[first:first + (count - 1) * step + 1:step] = sym
        return idx.reshape(h, w, c), None if encoder is None else encoder.get_compressed()

    def _decode_by_diagonals_dependent(self, words, h, w, ch):
        """K > 1 with dependent channels: per anti-diagonal, one call for the independent channels of its
        positions, then one for the dependent channels, whose reference classes are those of the independent
        symbols just decoded at the same positions. As ``_decode_by_diagonals``, with one ``last`` array per
        kind of channel; each call's symbols go to their positions by a strided copy, and the channels to their
        places once, at the end."""
        t = self.tables
        k = t.classes
        ncls = self._ncls
        rcls = self._rcls
        c = len(ch.order)
        n_ind = len(ch.independent)
        n_dep = c - n_ind
        decoder = constriction.stream.queue.RangeDecoder(words)
        encoder = constriction.stream.queue.RangeEncoder() if self.verify else None
        last_ind = np.full((h + 1, n_ind), ncls[t.levels], dtype=np.int64)
        last_dep = np.full((h + 1, n_dep), ncls[t.levels], dtype=np.int64)
        base_ind = ch.base_independent
        base_dep = ch.base_dependent
        ref_pos = ch.reference_position
        probs_of_context = self._context_rows()
        family = self._family
        # positions in raster order, channels in scan order (independent, then dependent): a diagonal's
        # positions first, first + W - 1, ... are a strided run of rows, so each call's symbols land by a
        # strided copy; the channels go back to their places once, at the end
        scanned = np.empty((h * w, c), dtype=np.uint8)
        step = max(w - 1, 1)  # W = 1: every diagonal has one position
        for first, count in diagonal_runs(h, w):
            r0 = first // w
            at = slice(first, first + (count - 1) * step + 1, step)
            # the independent channels (there is one at least: every reference channel is one)
            ctx = class_context_ids(last_ind[r0:r0 + count], last_ind[r0 + 1:r0 + count + 1], base_ind, k)
            rows = np.take(probs_of_context, ctx.reshape(-1), axis=0)
            sym = decoder.decode(family, rows)
            if encoder is not None:
                encoder.encode(sym, family, rows)
            sym = sym.reshape(count, n_ind)
            scanned[at, :n_ind] = sym
            last_ind[r0 + 1:r0 + count + 1] = np.take(ncls, sym)
            # the dependent channels: their reference classes from the symbols just decoded
            lead = base_dep + np.take(rcls, np.take(sym, ref_pos, axis=1))
            ctx = class_context_ids(last_dep[r0:r0 + count], last_dep[r0 + 1:r0 + count + 1], lead, k)
            rows = np.take(probs_of_context, ctx.reshape(-1), axis=0)
            sym = decoder.decode(family, rows).reshape(count, n_dep)
            if encoder is not None:
                encoder.encode(sym.reshape(-1), family, rows)
            scanned[at, n_ind:] = sym
            last_dep[r0 + 1:r0 + count + 1] = np.take(ncls, sym)
        idx = np.take(scanned, ch.inverse, axis=1)
        return idx.reshape(h, w, c), None if encoder is None else encoder.get_compressed()


def _check_canonical(words: np.ndarray, canonical: np.ndarray) -> None:
    """The canonical-payload rule (SPEC.md 4.6): the payload must be exactly the re-encoded symbols."""
    if len(canonical) > len(words):
        raise PayloadError(f"payload runs out: {len(words)} words, the symbols need {len(canonical)}")
    if len(canonical) < len(words):
        raise PayloadError(f"{len(words) - len(canonical)} payload words left over after the last symbol")
    if not np.array_equal(canonical, words):
        raise PayloadError("payload is not the canonical encoding of the symbols it decodes to")
