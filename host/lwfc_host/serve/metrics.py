"""The server's running totals and latency percentiles (the status endpoint, SIGUSR1 and the exit report)."""

from __future__ import annotations

import collections
import threading
import time
from typing import Any

import numpy as np


class Metrics:
    """Running totals and latency samples (a bounded window) of the whole server. Writers hold ``lock``:
    connections update it from the event loop, the status endpoint and signal handlers read it."""

    WINDOW = 100_000  # latency samples kept per series (the most recent ones)

    def __init__(self) -> None:
        self.started = time.time()
        self.frames = 0  # DATA messages answered with a RESULT
        self.errors: collections.Counter[str] = collections.Counter()
        self.bytes = 0  # frame bytes of decoded frames
        self.elements = 0
        self.garbage = 0
        self.connections_total = 0
        self.connections_open = 0
        self.refused = 0
        self.max_buffered = 0
        # slices (PROTOCOL.md 10): received, turned away, arriving after their tensor was answered; tensors
        # answered from slices, those with a concealed part, and the concealed fractions summed
        self.slices = 0
        self.slices_rejected = 0
        self.slices_duplicate = 0
        self.slices_late = 0
        self.sliced_tensors = 0
        self.concealed_tensors = 0
        self.concealed_sum = 0.0
        self.datagrams_ignored = 0  # datagrams that were not one valid, verifiable message
        self.decode_ms: collections.deque[float] = collections.deque(maxlen=self.WINDOW)
        self.infer_ms: collections.deque[float] = collections.deque(maxlen=self.WINDOW)
        self.total_ms: collections.deque[float] = collections.deque(maxlen=self.WINDOW)
        self.lock = threading.Lock()

    @staticmethod
    def _pct(samples: collections.deque[float]) -> dict[str, float] | None:
        if not samples:
            return None
        a = np.fromiter(samples, dtype=np.float64)
        p50, p95, p99 = np.percentile(a, [50, 95, 99])
        return {"p50": round(float(p50), 3), "p95": round(float(p95), 3), "p99": round(float(p99), 3),
                "mean": round(float(a.mean()), 3), "n": int(a.size)}

    def snapshot(self) -> dict[str, Any]:
        """The totals, rates and percentiles now, as JSON-ready values."""
        with self.lock:
            up = time.time() - self.started
            return {
                "uptime_s": round(up, 3),
                "frames": self.frames,
                "errors": dict(self.errors),
                "error_total": sum(self.errors.values()),
                "bytes": self.bytes,
                "elements": self.elements,
                "bits_per_element": (8.0 * self.bytes / self.elements) if self.elements else None,
                "frames_per_s": self.frames / up if up > 0 else 0.0,
                "garbage_bytes": self.garbage,
                "connections_open": self.connections_open,
                "connections_total": self.connections_total,
                "refused": self.refused,
                "max_buffered_bytes": self.max_buffered,
                "slices": {"received": self.slices, "rejected": self.slices_rejected,
                           "duplicate": self.slices_duplicate, "late": self.slices_late,
                           "tensors": self.sliced_tensors, "concealed_tensors": self.concealed_tensors,
                           "concealed_mean": (self.concealed_sum / self.sliced_tensors) if self.sliced_tensors
                           else None},
                "datagrams_ignored": self.datagrams_ignored,
                "decode_ms": self._pct(self.decode_ms),
                "infer_ms": self._pct(self.infer_ms),
                "server_ms": self._pct(self.total_ms),
            }
