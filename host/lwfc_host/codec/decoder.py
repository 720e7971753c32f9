"""Host decoder: validate a frame, range-decode it with constriction in vectorised calls, reconstruct.

Decoding follows SPEC.md, section 6. With neighbour contexts (K > 1) one constriction call decodes a
whole anti-diagonal of positions (all their channels), whose contexts depend only on the diagonal
before (the context rule: ``lwfc_host.codec.fast.context_ids``). Without them (K = 1, channel-planar
order) one call decodes each channel's plane with its group's model, or the whole tensor in one call
when the table has a single model. The payload must be exactly the canonical
encoder output: it is re-encoded and compared, which catches words that run out, words left over and
any other non-canonical payload.
"""

from __future__ import annotations

from dataclasses import dataclass

import constriction
import numpy as np

from lwfc.errors import BadShape, PayloadError, TableMismatch
from lwfc.frame import FrameHeader, parse_frame
from lwfc.scan import diagonal_runs
from lwfc.tables import Tables
from lwfc_host.codec.fast import class_context_ids, plane_models, probability_rows, scan_permutation


@dataclass
class Decoded:
    """A decoded frame: header, quantization indices (H, W, C) and the float32 tensor (1, H, W, C)."""

    header: FrameHeader
    indices: np.ndarray
    tensor: np.ndarray

    @property
    def bits_per_element(self) -> float:
        return 8.0 * self.header.frame_length / self.header.element_count


class Decoder:
    """Decodes frames made with one table."""

    def __init__(self, tables: Tables, verify: bool = True):
        self.tables = tables
        self.verify = verify
        self._probs = probability_rows(tables)
        self._model_of_context = np.asarray(tables.model_of_context, dtype=np.int64)
        self._recon = np.asarray(tables.reconstruction, dtype=np.float32)
        self._family = constriction.stream.model.Categorical(perfect=False)
        self._plane_models = plane_models(tables) if tables.classes == 1 else None

    def decode(self, frame: bytes) -> Decoded:
        """Decode one complete frame. Raises a FrameError subclass for any malformed frame."""
        header, payload = parse_frame(frame)
        t = self.tables
        if header.table_id != t.table_id:
            raise TableMismatch(f"frame was coded with table {header.table_id.hex()}, "
                                f"this decoder has table {t.table_id_hex()}")
        h, w, c = header.shape
        if c != t.channels:
            raise BadShape(f"frame has {c} channels, the table is for {t.channels}")
        words = np.frombuffer(payload, dtype="<u4").astype(np.uint32)
        try:
            if t.classes == 1:
                idx, canonical = self._decode_planes(words, h, w, c)
            else:
                idx, canonical = self._decode_by_diagonals(words, h, w, c)
        except BaseException as exc:  # constriction raises plain ValueError/AssertionError/...
            if isinstance(exc, (KeyboardInterrupt, SystemExit, MemoryError)):
                raise
            raise PayloadError(f"payload does not decode: {exc}") from exc
        if canonical is not None:
            _check_canonical(words, canonical)
        tensor = self._recon[idx].reshape(1, h, w, c)
        return Decoded(header, idx, tensor)

    def _decode_planes(self, words, h, w, c):
        """K = 1: channel-planar order, each plane with one fixed model (one call per plane).

        Returns the (H, W, C) indices and, with ``verify``, their canonical re-encoding."""
        decoder = constriction.stream.queue.RangeDecoder(words)
        encoder = constriction.stream.queue.RangeEncoder() if self.verify else None
        if len(self.tables.models) == 1:
            planes = decoder.decode(self._plane_models[0], h * w * c).reshape(c, h * w)
            if encoder is not None:
                encoder.encode(planes.reshape(-1), self._plane_models[0])
        else:
            planes = np.empty((c, h * w), dtype=np.int32)
            for ch, model in enumerate(self._plane_models):
                planes[ch] = decoder.decode(model, h * w)
                if encoder is not None:
                    encoder.encode(planes[ch], model)
        idx = np.ascontiguousarray(planes.T).reshape(h, w, c).astype(np.uint8)
        return idx, None if encoder is None else encoder.get_compressed()

    def _decode_by_diagonals(self, words, h, w, c):
        """K > 1: one constriction call per anti-diagonal.

        ``last[r + 1]`` holds the neighbour classes of the most recently decoded position of row r
        (row -1 and rows not reached yet hold the class of "outside"). After diagonal d - 1, for a
        position (r, d - r) that is exactly its above neighbour in ``last[r]`` and its left neighbour in
        ``last[r + 1]``, so every step is a slice, not a gather.

        With ``verify`` each diagonal is re-encoded right after it is decoded, while its probability
        rows are still in cache (``np.take`` gathers them: several times faster than fancy indexing).
        Returns the (H, W, C) indices and, with ``verify``, their canonical re-encoding."""
        t = self.tables
        k = t.classes
        ncls = np.asarray(t.neighbour_class, dtype=np.int64)
        decoder = constriction.stream.queue.RangeDecoder(words)
        encoder = constriction.stream.queue.RangeEncoder() if self.verify else None
        last = np.full((h + 1, c), ncls[t.levels], dtype=np.int64)
        group = np.asarray(t.channel_group, dtype=np.int64)
        probs_of_context = self._probs[self._model_of_context]
        symbols = np.empty(h * w * c, dtype=np.int32)
        done = 0
        for first, count in diagonal_runs(h, w):
            r0 = first // w
            ctx = class_context_ids(last[r0:r0 + count], last[r0 + 1:r0 + count + 1], group, k)
            rows = np.take(probs_of_context, ctx.reshape(-1), axis=0)
            sym = decoder.decode(self._family, rows)
            if encoder is not None:
                encoder.encode(sym, self._family, rows)
            last[r0 + 1:r0 + count + 1] = np.take(ncls, sym).reshape(count, c)
            symbols[done:done + count * c] = sym
            done += count * c
        idx = np.empty((h * w, c), dtype=np.uint8)
        idx[scan_permutation(h, w)] = symbols.reshape(h * w, c)
        return idx.reshape(h, w, c), None if encoder is None else encoder.get_compressed()


def _check_canonical(words: np.ndarray, canonical: np.ndarray) -> None:
    """The canonical-payload rule (SPEC.md 4.6): the payload must be exactly the re-encoded symbols."""
    if len(canonical) > len(words):
        raise PayloadError(f"payload runs out: {len(words)} words, the symbols need {len(canonical)}")
    if len(canonical) < len(words):
        raise PayloadError(f"{len(words) - len(canonical)} payload words left over after the last symbol")
    if not np.array_equal(canonical, words):
        raise PayloadError("payload is not the canonical encoding of the symbols it decodes to")
