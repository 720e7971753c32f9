"""Encoders agree byte for byte and the host decoder inverts them (property tests)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lwfc.encoder import Encoder, _Slice, keys_fast, keys_slow
from lwfc.errors import EncodeError
from lwfc.quantize import index_of_float
from lwfc.tables import Tables, context_number
from lwfc_host.codec.decoder import Decoder
from lwfc_host.codec.fast import context_map, encode_int8_constriction, indices_from_float_np, scan_order
from lwfc_host.design.tablegen import uniform_table


@st.composite
def table_and_tensor(draw):
    levels = draw(st.integers(2, 16))
    max_k = max(k for k in range(1, 12) if k * k * levels <= 256)
    classes = draw(st.integers(1, min(max_k, 4)))
    h, w, c = draw(st.integers(1, 9)), draw(st.integers(1, 9)), draw(st.integers(1, 12))
    groups = draw(st.sampled_from([1, "channel", min(c, 3)]))
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    calib = np.maximum(rng.normal(size=(2, h, w, c)), 0).astype(np.float32) * draw(st.floats(0.1, 5))
    clip_max = draw(st.floats(0.05, 6))
    table = uniform_table(calib, levels, clip_max=clip_max, groups=groups, classes=classes)
    q = rng.integers(-128, 128, size=(h, w, c)).astype(np.int8)
    if draw(st.booleans()):  # mostly-zero tensors, like real ReLU features
        q[rng.random(q.shape) < 0.8] = table["int8"]["zero_point"]
    return Tables(table), q


@settings(max_examples=150, deadline=None)
@given(table_and_tensor())
def test_all_encoders_agree_and_decode(case):
    tables, q = case
    h, w, _ = q.shape
    frame = Encoder(tables, fast=True).encode_int8(q.tobytes(), h, w)
    assert Encoder(tables, fast=False).encode_int8(q.tobytes(), h, w) == frame
    assert encode_int8_constriction(q, tables) == frame
    out = Decoder(tables).decode(frame)
    expected = np.asarray(tables.index_of_q)[q.astype(int) + 128]
    np.testing.assert_array_equal(out.indices, expected)
    np.testing.assert_array_equal(out.tensor[0], np.asarray(tables.reconstruction, np.float32)[expected])
    assert out.bits_per_element == 8 * len(frame) / q.size


@settings(max_examples=100, deadline=None)
@given(table_and_tensor(), st.lists(st.floats(allow_nan=False, width=32), min_size=1, max_size=50))
def test_float_rule_pure_python_matches_numpy(case, values):
    tables, _ = case
    values += [float("inf"), float("-inf"), 0.0, -0.0]
    values += [t / 2**tables.frac_bits for t in tables.thresholds]  # exactly on a threshold
    ours = [index_of_float(v, tables) for v in values]
    assert ours == indices_from_float_np(np.asarray(values), tables).tolist()


def test_float_encoding_matches_int8_lut_on_grid(case_contexts):
    table, tables, q = case_contexts
    scale, zp = table["int8"]["scale"], table["int8"]["zero_point"]
    x = scale * (q.astype(np.float64) - zp)
    h, w, _ = q.shape
    enc = Encoder(tables)
    assert enc.encode_float(x.reshape(-1).tolist(), h, w) == enc.encode_int8(q.tobytes(), h, w)


def test_nan_input_is_rejected(case_planar):
    _, tables, q = case_planar
    x = np.zeros(q.shape)
    x[0, 0, 0] = np.nan
    with pytest.raises(EncodeError, match="NaN"):
        Encoder(tables).encode_float(x.reshape(-1).tolist(), q.shape[0], q.shape[1])


def test_wrong_element_count_is_rejected(case_planar):
    _, tables, q = case_planar
    with pytest.raises(EncodeError, match="do not fill"):
        Encoder(tables).encode_int8(q.tobytes()[:-1], q.shape[0], q.shape[1])


def test_contexts_use_neighbours():
    """Neighbour contexts must beat the same quantizer without them on spatially smooth data."""
    rng = np.random.default_rng(5)
    # blocky ReLU features: a coarse random field upsampled 4x, so neighbours usually agree
    field = np.maximum(rng.normal(size=(9, 4, 4, 16)) - 0.3, 0).repeat(4, axis=1).repeat(4, axis=2)
    calib, x = field[:8].astype(np.float32), field[8]
    sizes = []
    for classes in (1, 3):
        table = uniform_table(calib, 4, clip_max=2.0, groups=4, classes=classes)
        tables = Tables(table)
        q = np.clip(np.round(x / table["int8"]["scale"]) + table["int8"]["zero_point"], -128, 127)
        sizes.append(len(Encoder(tables).encode_int8(q.astype(np.int8).tobytes(), 16, 16)))
    assert sizes[1] < 0.8 * sizes[0]


@st.composite
def random_context_tables(draw):
    """A valid table whose context fields (groups, class map, context -> model map, models) are random,
    and an index tensor for it."""
    levels = draw(st.integers(2, 16))
    classes = draw(st.integers(1, max(k for k in range(1, 17) if k * k * levels <= 256)))
    h, w, c = draw(st.integers(1, 7)), draw(st.integers(1, 7)), draw(st.integers(1, 9))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    table = uniform_table(np.abs(rng.normal(size=(1, h, w, c))).astype(np.float32), levels, clip_max=1.0)
    groups = int(rng.integers(1, c + 1))
    contexts = groups * classes * classes
    models = int(rng.integers(1, contexts + 1))
    freqs = rng.integers(1, 1000, size=(models, levels))
    freqs[:, -1] += (1 << 24) - freqs.sum(axis=1)
    table["contexts"] = {
        "groups": groups, "classes": classes,
        "channel_group": rng.integers(0, groups, size=c).tolist(),
        "neighbour_class": rng.integers(0, classes, size=levels + 1).tolist(),
        "model_of_context": rng.integers(0, models, size=contexts).tolist(),
    }
    table["models"] = freqs.tolist()
    return Tables(table), rng.integers(0, levels, size=(h, w, c)).astype(np.uint8)


@settings(max_examples=150, deadline=None)
@given(random_context_tables())
def test_context_rule_scalar_equals_vectorised(case):
    """The device's scalar context rule (lwfc.tables.context_number, per element and as the encoder's keys
    on both paths) equals the host's vectorised one (lwfc_host.codec.fast.context_map)."""
    tables, idx = case
    h, w, c = idx.shape
    n, k = tables.levels, tables.classes
    ncls = tables.neighbour_class
    vectorised = context_map(idx.astype(np.int64), tables)
    scalar = np.empty_like(vectorised)
    for y in range(h):
        for x in range(w):
            for ch in range(c):
                above = idx[y - 1, x, ch] if y > 0 else n
                left = idx[y, x - 1, ch] if x > 0 else n
                g = tables.channel_group[ch]
                scalar[y, x, ch] = context_number(g, ncls[above], ncls[left], k)
                assert scalar[y, x, ch] == g * k * k + ncls[above] * k + ncls[left]  # SPEC.md 4.2, literally
    np.testing.assert_array_equal(scalar, vectorised)
    # the encoder's keys (model * N + index, both paths) in scan order are those of the vectorised rule
    mids = np.asarray(tables.model_of_context)[vectorised]
    order = scan_order(h, w, list(range(c)), [], k)
    sl = _Slice(tables, idx.tobytes(), h, w, (0, h, 0, c))
    for keys in (keys_fast(sl, tables), keys_slow(sl, tables)):
        keys = np.asarray(list(keys), dtype=np.int64)
        np.testing.assert_array_equal(keys // n, mids.reshape(-1)[order])
        np.testing.assert_array_equal(keys % n, idx.reshape(-1)[order])
    # and the coder's (start, freq) per key are those of the context's model
    keys = mids * n + idx
    np.testing.assert_array_equal(np.asarray(tables.freq)[keys], np.asarray(tables.models)[mids, idx])
