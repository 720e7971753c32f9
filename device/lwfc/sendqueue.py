"""A bounded send queue, so that a slow link cannot exhaust a board's memory.

Frames wait here while the link's window of unanswered frames is full. The queue is bounded by a
number of frames and a number of bytes; when full, the policy decides:

- ``drop-oldest``: the oldest waiting frame is dropped (and reported, so the runner counts it as
  DROPPED: nothing is lost silently); fresh features matter more than stale ones for live inference.
- ``block``: ``put`` returns False and the caller must drain the link (send, receive answers) until
  ``has_room`` before trying again.

MicroPython-compatible Python 3.7 (a list, no collections.deque needed).
"""

DROP_OLDEST = "drop-oldest"
BLOCK = "block"
POLICIES = (DROP_OLDEST, BLOCK)


class SendQueue(object):
    """FIFO of (frame bytes, tag) bounded by ``max_frames`` and ``max_bytes``."""

    def __init__(self, max_frames=16, max_bytes=1 << 20, policy=DROP_OLDEST):
        if policy not in POLICIES:
            raise ValueError("queue policy must be one of %s, got %r" % (", ".join(POLICIES), policy))
        if max_frames < 1 or max_bytes < 1:
            raise ValueError("queue limits must be positive")
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self.policy = policy
        self.items = []
        self.bytes = 0
        self.dropped = 0
        self.high_water = 0

    def __len__(self):
        return len(self.items)

    def has_room(self, size):
        return len(self.items) < self.max_frames and self.bytes + size <= self.max_bytes

    def put(self, frame, tag=None):
        """Queue a frame. Returns (accepted, dropped): ``dropped`` lists the (frame, tag) pairs dropped to
        make room (drop-oldest). With ``block``, a full queue gives (False, []) and nothing changes.
        A frame larger than ``max_bytes`` can never fit: ValueError."""
        size = len(frame)
        if size > self.max_bytes:
            raise ValueError("a %d-byte frame exceeds the queue's byte limit %d" % (size, self.max_bytes))
        dropped = []
        if not self.has_room(size):
            if self.policy == BLOCK:
                return False, dropped
            while self.items and not self.has_room(size):
                old = self.items.pop(0)
                self.bytes -= len(old[0])
                self.dropped += 1
                dropped.append(old)
        self.items.append((frame, tag))
        self.bytes += size
        if self.bytes > self.high_water:
            self.high_water = self.bytes
        return True, dropped

    def pop(self):
        """The oldest (frame, tag), or None when empty."""
        if not self.items:
            return None
        item = self.items.pop(0)
        self.bytes -= len(item[0])
        return item
