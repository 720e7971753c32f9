"""The pure-Python range encoder reproduces constriction's RangeEncoder word for word."""

import constriction
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from lwfc.rangecoder import RangeEncoder
from lwfc_host.design.tablefile import integer_frequencies


def _constriction_words(symbols, freqs_per_symbol):
    enc = constriction.stream.queue.RangeEncoder()
    probs = np.asarray(freqs_per_symbol, dtype=np.float64) - 1.0
    enc.encode(np.asarray(symbols, dtype=np.int32), constriction.stream.model.Categorical(perfect=False), probs)
    return enc.get_compressed().tolist()


def _ours(symbols, freqs_per_symbol):
    start, freq = [], []
    for s, f in zip(symbols, freqs_per_symbol):
        start.append(sum(f[:s]))
        freq.append(f[s])
    coder = RangeEncoder()
    coder.encode_keys(range(len(symbols)), start, freq)
    return coder.finish(), coder


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_matches_constriction_on_random_models(data):
    n_levels = data.draw(st.integers(2, 16))
    n = data.draw(st.integers(1, 400))
    # skewed models, including frequencies of 1, so that inversions and carries happen
    raw = data.draw(st.lists(st.lists(st.integers(0, 10**6), min_size=n_levels, max_size=n_levels),
                             min_size=1, max_size=4))
    models = [integer_frequencies(np.asarray(r) ** 2) for r in raw]
    which = data.draw(st.lists(st.integers(0, len(models) - 1), min_size=n, max_size=n))
    symbols = data.draw(st.lists(st.integers(0, n_levels - 1), min_size=n, max_size=n))
    fps = [models[m] for m in which]
    ours, _ = _ours(symbols, fps)
    assert ours == _constriction_words(symbols, fps)


def test_long_stream_with_carries_matches_constriction():
    rng = np.random.default_rng(3)
    model = integer_frequencies([1e6, 3e5, 1, 10])
    symbols = rng.choice(4, size=200_000, p=np.asarray(model) / 2**24).tolist()
    ours, coder = _ours(symbols, [model] * len(symbols))
    assert coder.inversions > 10 and coder.carries > 5  # the hard paths really ran
    assert ours == _constriction_words(symbols, [model] * len(symbols))


def test_empty_stream_has_no_words():
    assert RangeEncoder().finish() == []


def test_integer_frequencies_sum_and_floor():
    f = integer_frequencies([0, 0, 5, 1e9])
    assert sum(f) == 2**24 and min(f) >= 1 and len(f) == 4
