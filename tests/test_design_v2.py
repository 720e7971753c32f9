"""Spec v2 table design (host/lwfc_host/design/contexts.py, table_design.py, tablefile.py, ``lwfc design
--spec-version``): reference channels chosen on correlated channels code held-out tensors in fewer bits,
version 2 tables (references, 32 and 64 levels) load with the device's reader and their frames decode, and
spec version 1 never writes a version 2 field."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lwfc.encoder import Encoder
from lwfc.tables import Tables, parse_tables
from lwfc_host.cli import main
from lwfc_host.codec.decoder import Decoder
from lwfc_host.codec.fast import FastEncoder
from lwfc_host.design import contexts as cdz
from lwfc_host.design import table_design as dz
from lwfc_host.design.calibration import CalibrationStats
from lwfc_host.design.quantizers import DesignError
from lwfc_host.design.tablefile import V2_CONTEXT_FIELDS, finalize, load_verified, write_tables

SHAPE = (10, 10, 32)
LATENTS = 4


def correlated(batch: int, seed: int) -> np.ndarray:
    """ReLU of channels that share one of 4 spatially smooth latent fields (per-channel gain, own noise): the
    channels of a latent correlate strongly at each position, as many channels of a CNN layer do."""
    rng = np.random.default_rng(seed)
    h, w, c = SHAPE
    z = rng.normal(size=(batch, h + 2, w + 2, LATENTS))
    lat = sum(z[:, i:i + h, j:j + w] for i in range(3) for j in range(3)) / 3.0
    gain = np.random.default_rng(99).uniform(0.6, 1.6, size=c)
    x = lat[..., np.arange(c) % LATENTS] * gain + 0.35 * rng.normal(size=(batch, h, w, c))
    return np.maximum(x - 0.2, 0.0).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    calib = correlated(24, seed=1)
    cs = CalibrationStats(reservoir=24)
    cs.add_float(calib)
    return cs.loaded(), correlated(4, seed=2)


def _roundtrip(table: dict, x: np.ndarray) -> float:
    """Frames of the device encoder for float tensors ``x`` decode to their indices with the host decoder, and
    the host's fast encoder writes the same bytes. Returns bits/element of the frames."""
    t = parse_tables(json.dumps(table))
    enc, fast, dec = Encoder(t), FastEncoder(t), Decoder(t)
    nbytes = 0
    for v in x:
        idx = dz.quantizer_indices(v, table)
        frame = enc.encode_indices(idx.tobytes(), v.shape[0], v.shape[1])
        assert fast.payload(idx) == enc.payload(idx.tobytes(), v.shape[0], v.shape[1])
        assert np.array_equal(dec.decode(frame).indices, idx)
        nbytes += len(frame)
    return 8.0 * nbytes / x.size


def _check_two_layers(ref: list[int]) -> None:
    for c, r in enumerate(ref):
        assert r == -1 or (r != c and ref[r] == -1)


def test_references_win_held_out_bits_on_correlated_channels(data):
    stats, _ = data
    q, cc = dz.design_quantizer(stats, 4, "uniform", 0.0, "mse")
    base = dz.finish_design(stats, q, cc, 1, 1)
    idx = dz.sample_indices(stats, base.table)
    cd = cdz.design_contexts(idx, 4)
    assert cd.version == 2 and cd.reference_classes >= 2
    _check_two_layers(cd.reference_channel)
    # every channel of a latent depends on one base channel of the same latent
    assert cd.reference_bases == LATENTS and cd.dependent_channels == SHAPE[2] - LATENTS
    for c, r in enumerate(cd.reference_channel):
        assert r == -1 or r % LATENTS == c % LATENTS
    without = cd.alternatives["no references"]["heldout_bits"]
    assert cd.heldout_bits < 0.9 * without
    assert cd.alternatives["v1"]["heldout_bits"] == without  # at 4 levels K^2 N <= 256 allows every K
    # spec version 1: the version 1 design, no references
    v1 = cdz.design_contexts(idx, 4, spec_version=1)
    assert v1.version == 1 and v1.reference_channel is None and v1.heldout_bits == pytest.approx(without)
    # reference channels that cannot help (every channel independent of the others) are not used with 'auto'
    rng = np.random.default_rng(3)
    noise = np.minimum(rng.geometric(0.6, size=(16, 8, 8, 12)) - 1, 3).astype(np.uint8)
    plain = cdz.design_contexts(noise, 4)
    assert plain.version == 1 and plain.dependent_channels == 0


def test_v2_table_roundtrips_through_the_reader_and_the_codec(data, tmp_path):
    stats, test = data
    d = dz.design(stats, 4, "uniform", 0.0, "mse", "auto", "auto")
    table = d.table
    ctx = table["contexts"]
    assert table["version"] == 2 and all(f in ctx for f in V2_CONTEXT_FIELDS)
    info = table["design"]["context_design"]
    assert info["references_used"] and info["dependent_channels"] == SHAPE[2] - LATENTS
    assert info["heldout_bits_with_references"] < info["heldout_bits_without_references"]
    written = write_tables(table, tmp_path / "v2.json")
    t = load_verified(tmp_path / "v2.json")  # the device's reader, and the id is the content's hash
    assert t.version == 2 and t.table_id_hex() == written["table_id"] == table["table_id"]
    assert t.reference_channel == ctx["reference_channel"] and t.reference_classes == ctx["reference_classes"]
    bits = _roundtrip(table, test)
    # and the references pay off in real frames against spec version 1's table for the same quantizer
    v1 = dz.design(stats, 4, "uniform", 0.0, "mse", "auto", "auto", spec_version=1)
    assert v1.table["reconstruction"] == table["reconstruction"]
    assert bits < _roundtrip(v1.table, test)


@pytest.mark.parametrize("levels", [32, 64])
def test_many_levels_give_valid_version_2_tables(data, levels):
    stats, test = data
    d = dz.design(stats, levels, "uniform", 0.0, "mse", "auto", "auto")
    t = Tables(d.table)
    assert t.version == 2 and t.levels == levels
    assert len(t.models) * levels <= 1 << 16
    _roundtrip(d.table, test[:2])
    # fixed classes beyond version 1's K^2 N <= 256, and channel groups only, need version 2 as well
    d2 = dz.design(stats, levels, "uniform", 0.0, "mse", 2, 1)
    assert Tables(d2.table).version == 2 and d2.table["contexts"]["reference_channel"] == [-1] * SHAPE[2]
    with pytest.raises(DesignError, match="spec version 2"):
        dz.design(stats, levels, spec_version=1)


def test_spec_version_1_never_writes_version_2_fields(data):
    stats, test = data
    for levels in (4, 16):
        d = dz.design(stats, levels, "uniform", 0.0, "mse", "auto", "auto", spec_version=1)
        assert d.table["version"] == 1 and not set(V2_CONTEXT_FIELDS) & set(d.table["contexts"])
        assert d.table["contexts"]["classes"] ** 2 * levels <= 256
        _roundtrip(d.table, test[:1])
    with pytest.raises(DesignError, match="K\\*K\\*levels <= 256"):
        dz.design(stats, 16, "uniform", 0.0, "mse", 1, 5, spec_version=1)
    # spec version 2 asks for a version 2 table even where version 1 would do
    d = dz.design(stats, 4, "uniform", 0.0, "mse", 2, 2, spec_version=2)
    assert d.table["version"] == 2
    with pytest.raises(Exception, match="needs version 2"):
        finalize(d.table, 1)


def test_design_cli_spec_version(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["design", "--help"])
    assert "--spec-version {auto,1,2}" in capsys.readouterr().out
    np.save(tmp_path / "acts.npy", correlated(24, seed=1))
    stats = tmp_path / "stats.npz"
    assert main(["calibrate", "--activations", str(tmp_path / "acts.npy"), "--output", str(stats)]) == 0
    capsys.readouterr()
    out2 = tmp_path / "t2.json"
    assert main(["design", "--stats", str(stats), "--levels", "4", "--output", str(out2)]) == 0
    text = capsys.readouterr().out
    assert "reference channels used (table version 2): 28 dependent channels on 4 reference channels" in text
    assert "bits/element with references" in text and "without" in text
    assert load_verified(out2).version == 2
    out1 = tmp_path / "t1.json"
    assert main(["design", "--stats", str(stats), "--levels", "4", "--spec-version", "1", "--output", str(out1)]) == 0
    text = capsys.readouterr().out
    assert "reference channels not tried (table version 1)" in text
    t1 = json.loads(out1.read_text())
    assert t1["version"] == 1 and "reference_channel" not in t1["contexts"]
    assert main(["design", "--stats", str(stats), "--levels", "32", "--spec-version", "1",
                 "--output", str(out1)]) == 2
    assert "spec version 2" in capsys.readouterr().err
