"""The edge conformance vectors (SPEC.md 9) hit their cases, agree with constriction, and bite: an encoder
with the mistake each one is for fails it, while every vector made before them still passes."""

from __future__ import annotations

import json
import math

import pytest

import lwfc.encoder
import lwfc.quantize
from lwfc.frame import HEADER_SIZE
from lwfc.rangecoder import RangeEncoder
from lwfc_host.checks import conformance
from lwfc_host.codec.fast import encode_indices_constriction

T32 = 1 << 32
T64 = 1 << 64
M32 = T32 - 1

EDGE = [spec.name for spec in conformance.EDGE_VECTORS]
EARLIER = [spec.name for spec in conformance.VECTORS
           if spec.name not in EDGE and spec not in conformance.V2_VECTORS]


@pytest.fixture(scope="module")
def vectors():
    return {spec.name: conformance.load_vector(conformance.VECTOR_DIR / spec.name) for spec in conformance.VECTORS}


def test_every_vector_is_listed_in_the_index_and_on_disk():
    on_disk = sorted(p.name for p in conformance.VECTOR_DIR.iterdir() if p.is_dir())
    index = json.loads((conformance.VECTOR_DIR / "index.json").read_text())
    v2 = [spec.name for spec in conformance.V2_VECTORS]
    assert sorted(e["name"] for e in index) == on_disk == sorted(EDGE + EARLIER + v2)
    assert len(EARLIER) == 13  # the vectors of v1, kept byte for byte


# what each edge vector must show in its index.json counts (SPEC.md 9)
HITS = {
    "seal_zero_word": lambda e: e["seal_zero_word"] and not e["seal_carry"],
    "seal_no_zero_word": lambda e: e["seal_zero_word_near_miss"] and not e["seal_zero_word"],
    "pending_carry": lambda e: e["max_pending_carry"] == 3,
    "pending_no_carry": lambda e: e["max_pending_no_carry"] == 3,
    "seal_carry": lambda e: e["seal_carry"] and e["seal_pending"] == 17,
    "carry_boundary": lambda e: e["exact_carry"] == 1,
    "top_boundary": lambda e: e["exact_top_inverted"] == 1 and e["exact_top_renormalised"] == 1,
    "float_boundaries": lambda e: e["threshold_hits"] >= len(conformance.FLOAT_THRESHOLDS),
}


@pytest.mark.parametrize("name", EDGE)
def test_edge_vector_hits_its_case(name, vectors):
    tables, data, expected, indices, _ = vectors[name]
    events = conformance.coder_events(tables, indices, expected[HEADER_SIZE:-4])
    events["threshold_hits"] = conformance.threshold_hits(tables, data)
    assert HITS[name](events), events
    entry = next(e for e in json.loads((conformance.VECTOR_DIR / "index.json").read_text()) if e["name"] == name)
    assert {k: entry[k] for k in events} == events  # index.json says what the vector really does


def test_earlier_vectors_never_meet_the_edge_cases():
    """Why the edge vectors were needed: no earlier vector holds back more than one word, carries while
    sealing, emits the sealing zero word or nearly does, meets a boundary exactly or puts a float on a
    threshold."""
    for e in json.loads((conformance.VECTOR_DIR / "index.json").read_text()):
        if e["name"] in EARLIER:
            assert e["max_pending"] <= 1 and not e["seal_carry"], e
            assert not e["seal_zero_word"] and not e["seal_zero_word_near_miss"], e
            assert e["exact_carry"] == e["exact_top_inverted"] == e["exact_top_renormalised"] == 0, e
            assert e["threshold_hits"] == 0, e


@pytest.mark.parametrize("name", EDGE)
def test_edge_vector_bytes_are_constrictions(name, vectors):
    tables, _, expected, indices, _ = vectors[name]
    assert encode_indices_constriction(indices, tables) == expected[HEADER_SIZE:-4]


def test_float_boundaries_indices_by_hand(vectors):
    """The float rule of SPEC.md 3.4 worked by hand for every input of the float_boundaries vector."""
    tables, data, _, indices, _ = vectors["float_boundaries"]
    want = {-2.0: 1, -2.0625: 0, -0.0625: 2, -0.125: 1, 0.0: 3, 0.0625: 4, 2.5: 5, 2.4375: 4,
            -(2.0 ** -100): 2, -0.03125: 2, 2.0 ** -100: 3, 0.03125: 3, 0.0625 - 2.0 ** -20: 3,
            -0.0625 - 2.0 ** -20: 1, 2.5 - 2.0 ** -20: 4, float("inf"): 5, float("-inf"): 0, 2.0 ** 127: 5,
            -(2.0 ** 127): 0, 2.0 ** 27: 5, -(2.0 ** 27): 0, 2.0 ** 27 - 8.0: 5, -(2.0 ** 27) - 16.0: 0}
    got = dict(zip(data.reshape(-1).tolist(), indices.reshape(-1).tolist()))
    assert got == want  # -0.0 == 0.0 as a key: both give index 3


class MutantCoder(RangeEncoder):
    """SPEC.md 4.4-4.5 transcribed, with one deliberate mistake (``MISTAKE``) at a time. With no mistake it
    writes exactly the device coder's words (checked on every vector below)."""

    MISTAKE = None

    def encode_keys(self, keys, start, freq):
        mistake = self.MISTAKE
        for key in keys:
            scale = self.rng >> 24
            rng = scale * freq[key]
            low = self.low + scale * start[key]
            if self.inverted:
                carry = low > T64 if mistake == "carry_if_above" else low >= T64
                settle = low + rng <= T64 if mistake == "settle_at_top" else low + rng < T64
                if carry:
                    low -= T64
                    filler = M32 if mistake == "ones_after_carry" else 0
                    self._settle(self.first_inverted + 1, filler)
                    self.carries += 1
                elif settle:
                    filler = 0 if mistake == "zeros_without_carry" else M32
                    self._settle(self.first_inverted, filler)
            if rng < T32:
                rng <<= 32
                v = low >> 32
                low = (low & M32) << 32
                emit = low + rng <= T64 if mistake == "settle_at_top" else low + rng < T64
                if self.inverted:
                    self.inverted += 1
                elif emit:
                    self.words.append(v)
                else:
                    self.inverted, self.first_inverted = 1, v
                    self.inversions += 1
            self.low, self.rng = low, rng

    def _settle(self, first, filler):
        count = 1 if self.MISTAKE == "one_word" else self.inverted
        self.words.extend([first] + [filler] * (count - 1))
        self.inverted = 0

    def finish(self):
        if self.rng == T64 - 1:
            return self.words
        low, rng = self.low, self.rng
        p = (low + M32) % T64
        if self.inverted:
            if p >= low or self.MISTAKE == "seal_without_carry":
                self._settle(self.first_inverted, M32)
            else:
                self._settle(self.first_inverted + 1, 0)
        self.words.append(p >> 32)
        top = low + rng - 1 if self.MISTAKE == "inclusive_top" else low + rng
        if (top % T64) >> 32 == p >> 32 and self.MISTAKE != "no_seal_zero_word":
            self.words.append(0)
        return self.words


def _failing(monkeypatch, vectors, coder_mistake=None, index_of_float=None) -> set[str]:
    """The vectors whose frame the pure-Python encoder gets wrong with the mistake."""
    mutant = type("Mutant", (MutantCoder,), {"MISTAKE": coder_mistake})
    monkeypatch.setattr(lwfc.encoder, "RangeEncoder", mutant)
    if index_of_float is not None:
        monkeypatch.setattr(lwfc.quantize, "index_of_float", index_of_float)
    failing = set()
    encode = conformance._encoders()["python"]  # both key paths feed the same coder: one is enough here
    for name, (tables, data, expected, _, region) in vectors.items():
        try:
            if encode(tables, data, region) != expected:
                failing.add(name)
        except Exception:  # a mistake may also leave words that do not fit 32 bits
            failing.add(name)
    monkeypatch.undo()
    return failing


def test_mutant_coder_without_a_mistake_passes_everything(monkeypatch, vectors):
    assert _failing(monkeypatch, vectors) == set()


@pytest.mark.parametrize("mistake, caught_by", [
    ("no_seal_zero_word", {"seal_zero_word"}),
    ("inclusive_top", {"seal_no_zero_word"}),
    ("one_word", {"pending_carry", "pending_no_carry", "seal_carry", "top_boundary"}),
    ("ones_after_carry", {"pending_carry"}),
    ("zeros_without_carry", {"pending_no_carry", "top_boundary"}),
    ("seal_without_carry", {"seal_carry"}),
    ("carry_if_above", {"carry_boundary"}),
])
def test_each_range_coder_mistake_fails_its_vector(mistake, caught_by, monkeypatch, vectors):
    failing = _failing(monkeypatch, vectors, coder_mistake=mistake)
    assert failing == caught_by  # and so no earlier vector notices the mistake


def test_top_boundary_comparison_is_immaterial(monkeypatch, vectors):
    """SPEC.md 4.4: <= instead of < in steps 2 and 4 changes when words are written, not which: every vector,
    top_boundary included, comes out the same, although top_boundary takes the other branch twice."""
    assert _failing(monkeypatch, vectors, coder_mistake="settle_at_top") == set()
    tables, _, expected, indices, _ = vectors["top_boundary"]
    events = conformance.coder_events(tables, indices, expected[HEADER_SIZE:-4])
    assert events["exact_top_inverted"] == events["exact_top_renormalised"] == 1


def _fixed(x, frac_bits, truncate=False):
    """X of SPEC.md 3.4, or with truncation toward zero in place of the floor."""
    scaled = x * (1 << frac_bits)
    if scaled >= 2 ** 31 - 1:
        return 2 ** 31 - 1
    if scaled <= -(2 ** 31):
        return -(2 ** 31)
    return math.trunc(scaled) if truncate else math.floor(scaled)


def _index_strictly_above(x, tables):
    return sum(t < _fixed(x, tables.frac_bits) for t in tables.thresholds)


def _index_truncated(x, tables):
    return sum(t <= _fixed(x, tables.frac_bits, truncate=True) for t in tables.thresholds)


@pytest.mark.parametrize("rule", [_index_strictly_above, _index_truncated])
def test_each_quantizer_mistake_fails_float_boundaries(rule, monkeypatch, vectors):
    assert _failing(monkeypatch, vectors, index_of_float=rule) == {"float_boundaries"}
