"""Range encoder bit-compatible with constriction's ``stream.queue.RangeEncoder`` (SPEC.md, section 4).

32-bit words, 64-bit state (``low``, ``rng``), 24-bit probability precision. Symbols are given as
(cumulative start, frequency) pairs out of 2^24. The encoder follows constriction 0.5's algorithm
exactly, including its "inverted" situation, where a carry may still reach words that are held back.
"""

_M32 = 0xFFFFFFFF
_M64 = 0xFFFFFFFFFFFFFFFF
_T32 = 1 << 32
_T64 = 1 << 64


class RangeEncoder(object):
    """Streaming range encoder. ``encode_keys`` may be called several times; ``finish`` seals the
    stream and returns every word as a list of ints (each < 2^32)."""

    def __init__(self):
        self.words = []
        self.low = 0
        self.rng = _M64
        self.inverted = 0          # number of held-back words (0: normal situation)
        self.first_inverted = 0    # the first held-back word
        self.inversions = 0        # statistics, for tests: how often words were held back ...
        self.carries = 0           # ... and how often a carry settled them

    def encode_keys(self, keys, start, freq):
        """Encode one symbol per key: the symbol's interval is [start[key], start[key] + freq[key])."""
        words = self.words
        emit = words.append
        low = self.low
        rng = self.rng
        inv = self.inverted
        invw = self.first_inverted
        t32, t64, m32 = _T32, _T64, _M32  # locals: a global lookup per use costs on MicroPython
        for k in keys:
            scale = rng >> 24
            rng = scale * freq[k]
            low += scale * start[k]
            if inv:
                # Held-back words are settled once low + rng no longer wraps past 2^64; a carry out of
                # low turns them from (first, FFFF...) into (first + 1, 0000...).
                if low >= t64:
                    low -= t64
                    words.append(invw + 1)
                    words.extend([0] * (inv - 1))
                    inv = 0
                    self.carries += 1
                elif low + rng < t64:
                    words.append(invw)
                    words.extend([m32] * (inv - 1))
                    inv = 0
            if rng < t32:
                rng <<= 32
                w = low >> 32
                low = (low & m32) << 32
                if inv:
                    inv += 1
                elif low + rng < t64:
                    emit(w)
                else:
                    inv = 1
                    invw = w
                    self.inversions += 1
        self.low = low
        self.rng = rng
        self.inverted = inv
        self.first_inverted = invw

    def finish(self):
        """Seal the stream (constriction's ``get_compressed``) and return the list of words."""
        words = self.words
        low, rng, inv = self.low, self.rng, self.inverted
        if rng == _M64:  # nothing encoded
            return words
        point = (low + _M32) & _M64
        if inv:
            if point >= low:
                words.append(self.first_inverted)
                words.extend([_M32] * (inv - 1))
            else:
                words.append(self.first_inverted + 1)
                words.extend([0] * (inv - 1))
        point_word = point >> 32
        words.append(point_word)
        if ((low + rng) & _M64) >> 32 == point_word:
            words.append(0)
        self.inverted = 0
        self.rng = _M64
        return words
