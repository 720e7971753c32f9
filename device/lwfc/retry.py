"""A device's unanswered frames on a link without a connection (MQTT, PROTOCOL.md 11.4): each is published again,
with the same seq and the same bytes, when its answer is overdue, and handed to the caller exactly once: with its
first answer, or as LOST when its deadline passes first. Answers for a seq already handed over are duplicates
(a re-published frame answered twice) and are dropped, counted.

When a frame is overdue follows TCP's retransmission timer (RFC 6298): a smoothed round trip and its variation
from the answers to frames published once (Karn: a re-published frame's answer says nothing about either copy's
round trip), the timeout doubling for each re-publish of the same frame and new frames starting from the doubled
timeout until a frame published once is answered (RFC 6298 5.5). A worker pool that is busy therefore
makes devices wait longer before they publish again, instead of doubling its work. Unlike TCP's, the timeout is
twice the smoothed round trip plus four variations (at least 1 s): a busy pool's round trip is mostly time in the
broker's queue, which grows while a fleet starts up, and a frame published again too early is decoded twice
(by another worker) exactly when the pool has no time to spare; a late re-publish costs only the latency of a
frame that really was lost, which is rare.

MicroPython-compatible Python 3.7.
"""

from .protocol import E_LOST, Answer, elapsed_ms, now_ms

# entry fields: [payload, first sent (ms), last sent (ms), timeout (ms), sends, tag]
_PAYLOAD, _FIRST, _SENT, _TIMEOUT, _SENDS, _TAG = 0, 1, 2, 3, 4, 5


class RetryWindow(object):
    """Outstanding frames by seq. ``add`` one as it is published; ``due`` gives those to publish again now;
    ``answer`` takes an answer (an Answer the first time, None for a duplicate); ``expire`` gives those past
    ``deadline_s`` as LOST."""

    def __init__(self, deadline_s=30.0, first_timeout_s=5.0, min_timeout_s=1.0, max_timeout_s=60.0):
        self.deadline_ms = deadline_s * 1000.0
        self.min_ms = min_timeout_s * 1000.0
        self.max_ms = max_timeout_s * 1000.0
        self.timeout_ms = first_timeout_s * 1000.0  # for a frame's first publish, until round trips are known
        self.srtt = None
        self.rttvar = None
        self.entries = {}
        self.order = []  # outstanding seqs, oldest first
        self.republished = 0
        self.duplicates = 0  # answers for seqs no longer outstanding, dropped

    def __len__(self):
        return len(self.order)

    def add(self, seq, payload, tag=None):
        now = now_ms()
        self.entries[seq] = [payload, now, now, self.timeout_ms, 1, tag]
        self.order.append(seq)

    def due(self):
        """(seq, payload) of every frame whose answer is overdue, now counted as published again."""
        out = []
        for seq in self.order:
            e = self.entries[seq]
            if elapsed_ms(e[_SENT]) >= e[_TIMEOUT] and elapsed_ms(e[_FIRST]) < self.deadline_ms:
                e[_SENT] = now_ms()
                e[_TIMEOUT] = min(e[_TIMEOUT] * 2, self.max_ms)
                e[_SENDS] += 1
                # RFC 6298 5.5: new frames start from the backed-off timeout too, until an answer to a frame
                # published once gives a round trip again (while the pool's queue grows, every answer is late)
                if e[_TIMEOUT] > self.timeout_ms:
                    self.timeout_ms = e[_TIMEOUT]
                self.republished += 1
                out.append((seq, e[_PAYLOAD]))
        return out

    def _sample(self, rtt):
        if self.srtt is None:
            self.srtt = rtt
            self.rttvar = rtt / 2.0
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt
        self.timeout_ms = min(max(self.min_ms, 2.0 * self.srtt + 4.0 * self.rttvar), self.max_ms)

    def answer(self, seq, kind, code=0, message="", result=None):
        """The Answer for ``seq`` the first time an answer for it arrives; None (counted) after that."""
        e = self.entries.pop(seq, None)
        if e is None:
            self.duplicates += 1
            return None
        self.order.remove(seq)
        rtt = elapsed_ms(e[_FIRST])
        if e[_SENDS] == 1:
            self._sample(rtt)
        return Answer(seq, kind, code, message, result, rtt, e[_TAG])

    def expire(self):
        """Outstanding frames past their deadline, as LOST Answers."""
        out = []
        while self.order:
            seq = self.order[0]
            e = self.entries[seq]
            if elapsed_ms(e[_FIRST]) < self.deadline_ms:
                break
            self.order.pop(0)
            del self.entries[seq]
            out.append(Answer(seq, "error", E_LOST, "no answer within %.1f s (published %d times)"
                              % (self.deadline_ms / 1000.0, e[_SENDS]), tag=e[_TAG]))
        return out

    def fail_all(self, why):
        """Every outstanding frame as a LOST Answer (the run ends)."""
        out = [Answer(s, "error", E_LOST, why, tag=self.entries[s][_TAG]) for s in self.order]
        self.entries = {}
        self.order = []
        return out
