"""The slices of one tensor while they arrive (PROTOCOL.md 10): which frames came, where they lie, whether they
tile the tensor yet. Only headers are read here (no decoding: a slice whose header does not fit the bundle
costs nothing); decoding, concealment and the cloud half run later in a worker (``Server.work_slices``)."""

from __future__ import annotations

import time

import numpy as np

from lwfc.errors import FrameError
from lwfc.frame import FrameHeader

ADDED = "added"
DUPLICATE = "duplicate"  # covers part of what an earlier slice of the tensor covers (a repeat, or a bad cut)
REJECTED = "rejected"  # not a slice of this bundle's tensors (malformed header, another shape or table)
MAX_REASONS = 8


class PendingTensor:
    """One seq's slices: the frames whose headers fit the tensor and do not overlap, the (H, C) mask of the
    (row, channel) pairs they cover, and why any others were turned away."""

    def __init__(self, seq: int, shape: tuple[int, int, int], table_id: bytes | None = None):
        self.seq = seq
        self.shape = shape
        self.table_id = table_id  # the session's table: frames coded with another one are rejected
        self.frames: list[bytes] = []
        self.covered = np.zeros((shape[0], shape[2]), dtype=bool)
        self.count = 0  # (row, channel) pairs covered
        self.duplicates = 0
        self.rejected: list[str] = []  # "ErrorClass: message" of the first rejected frames (at most MAX_REASONS)
        self.rejected_count = 0
        self.first_at = time.monotonic()
        self.bytes = 0

    def offer(self, frame: bytes, check_header) -> str:
        """Take one frame if it is a new part of the tensor: ADDED, DUPLICATE or REJECTED. ``check_header(frame)``
        returns the frame's header or raises FrameError (``CloudModel.check_slice_header``)."""
        try:
            header: FrameHeader = check_header(frame)
        except FrameError as exc:
            return self._reject(f"{type(exc).__name__}: {exc}")
        if self.table_id is not None and header.table_id != self.table_id:
            return self._reject(f"TableMismatch: slice uses table {header.table_id.hex()}, the session announced "
                                f"{self.table_id.hex()}")
        r0, rn, c0, cn = header.region
        block = self.covered[r0:r0 + rn, c0:c0 + cn]
        if block.any():
            self.duplicates += 1
            return DUPLICATE
        block[:] = True
        self.count += rn * cn
        self.frames.append(frame)
        self.bytes += len(frame)
        return ADDED

    def _reject(self, why: str) -> str:
        self.rejected_count += 1
        if len(self.rejected) < MAX_REASONS:
            self.rejected.append(why)
        return REJECTED

    @property
    def complete(self) -> bool:
        """The slices received so far tile the tensor."""
        return self.count == self.covered.size
