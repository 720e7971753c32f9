"""What one MQTT worker remembers of the frames it answered (PROTOCOL.md 11.5): a replay window per device session
and the latest answers, so that a frame delivered again (the device published it again, or the broker delivered
it twice) gets the very bytes it got before without being decoded again, and a captured frame replayed long
after its session moved on is dropped.

Workers share nothing, so this is each worker's own memory: a frame delivered again to *another* worker is
decoded and answered again, with the same result (decoding and the cloud half are deterministic), and the device
keeps the first answer it gets. Bounded: at most ``max_sessions`` sessions and ``max_answers`` answers, the least
recently used forgotten first.
"""

from __future__ import annotations

import collections
import threading

from lwfc.protocol import seq_ahead

NEW = "new"  # never answered here: decode it
CACHED = "cached"  # answered here before: send that answer again
REPLAY = "replay"  # more than ``window`` behind the session's highest seq: drop it, unanswered
TOO_FAR = "too_far"  # more than ``max_gap`` ahead of the session's highest seq: ERROR BAD_MESSAGE


class ReplayGuard:
    """Per (device, session): the highest seq answered; per (device, session, seq): the answer sent. Thread-safe."""

    def __init__(self, window: int = 1024, max_gap: int = 1024, max_sessions: int = 65536, max_answers: int = 4096):
        self.window = window
        self.max_gap = max_gap
        self.max_sessions = max_sessions
        self.max_answers = max_answers
        self.lock = threading.Lock()
        self.highest: collections.OrderedDict[tuple[str, bytes], int] = collections.OrderedDict()
        self.answers: collections.OrderedDict[tuple[str, bytes, int], bytes] = collections.OrderedDict()

    def check(self, device: str, session: bytes, seq: int) -> tuple[str, bytes | None]:
        """What to do with a verified DATA: (NEW | REPLAY | TOO_FAR, None) or (CACHED, the answer sent before)."""
        with self.lock:
            answer = self.answers.get((device, session, seq))
            if answer is not None:
                self.answers.move_to_end((device, session, seq))
                return CACHED, answer
            top = self.highest.get((device, session))
            if top is not None:
                ahead = seq_ahead(seq, top)
                if ahead < -self.window:
                    return REPLAY, None
                if ahead > self.max_gap:
                    return TOO_FAR, None
            return NEW, None

    def record(self, device: str, session: bytes, seq: int, answer: bytes) -> None:
        """Remember the answer sent for (device, session, seq)."""
        with self.lock:
            key = (device, session)
            top = self.highest.get(key)
            self.highest[key] = seq if top is None or seq_ahead(seq, top) > 0 else top
            self.highest.move_to_end(key)
            while len(self.highest) > self.max_sessions:
                self.highest.popitem(last=False)
            self.answers[(device, session, seq)] = answer
            while len(self.answers) > self.max_answers:
                self.answers.popitem(last=False)
