"""Concealment of lost slices (lwfc_host.codec.conceal) on real slices: encoded by the device encoder, decoded by
the host decoder, assembled, some dropped and filled in; and the packet-loss channels of ``lwfc eval-loss``."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_case

from lwfc.encoder import Encoder
from lwfc.tables import Tables
from lwfc_host.codec.conceal import (
    METHODS,
    Concealer,
    SliceAssembly,
    channel_expectations,
    reference_expectations,
)
from lwfc_host.codec.decoder import Decoder
from lwfc_host.design.tablefile import finalize
from lwfc_host.evaluate.loss import packet_losses

SHAPE = (16, 12, 8)


@pytest.fixture(scope="module")
def sliced_case():
    """A ReLU-like 16x12x8 int8 tensor, its table (4 groups, K = 3), its real slices (each frame <= 90 bytes)
    decoded by the host, and the lossless reconstruction."""
    _, tables, q = make_case(shape=SHAPE, levels=6, groups=4, classes=3, seed=11)
    h, w, _ = SHAPE
    frames = Encoder(tables).encode_int8_sliced(q.tobytes(), h, w, 90)
    dec = Decoder(tables)
    decoded = [dec.decode(f) for f in frames]
    idx = np.asarray(tables.index_of_q)[q.astype(np.int64) + 128].astype(np.uint8)
    recon = np.asarray(tables.reconstruction, dtype=np.float32)[idx]
    return tables, decoded, idx, recon


def assemble(decoded, keep):
    a = SliceAssembly(SHAPE)
    for d, k in zip(decoded, keep):
        if k:
            assert a.add(d.header.region, d.indices)
    return a


def test_slices_tile_and_assemble_to_the_whole_tensor(sliced_case):
    tables, decoded, idx, recon = sliced_case
    assert len(decoded) >= 6 and all(d.header.sliced for d in decoded)
    a = assemble(decoded, [True] * len(decoded))
    assert a.complete and a.missing_fraction == 0.0 and a.slices == len(decoded)
    np.testing.assert_array_equal(a.indices, idx)
    for method in METHODS:  # nothing to conceal: every method gives the decoded reconstruction
        c = Concealer(tables, method).conceal(a)
        assert c.concealed == 0.0
        np.testing.assert_array_equal(c.tensor[0], recon)
    assert not a.add(decoded[0].header.region, decoded[0].indices)  # a repeated slice is refused
    assert a.slices == len(decoded)


def test_every_method_keeps_what_arrived_and_fills_the_rest(sliced_case):
    tables, decoded, idx, recon = sliced_case
    keep = [i % 3 != 1 for i in range(len(decoded))]
    a = assemble(decoded, keep)
    missing = ~a.known
    lost_pairs = sum(d.header.region[1] * d.header.region[3] for d, k in zip(decoded, keep) if not k)
    assert a.missing_fraction == pytest.approx(lost_pairs / (SHAPE[0] * SHAPE[2]))
    miss3 = np.broadcast_to(missing[:, None, :], SHAPE)
    errors = {}
    for method in METHODS:
        c = Concealer(tables, method).conceal(a)
        assert c.method == method and c.concealed == a.missing_fraction
        t = c.tensor[0]
        assert t.dtype == np.float32 and t.shape == SHAPE and np.isfinite(t).all()
        np.testing.assert_array_equal(t[~miss3], recon[~miss3])  # received elements are exact
        errors[method] = float(np.mean((t[miss3] - recon[miss3]) ** 2))
    zero = Concealer(tables, "zero").conceal(a).tensor[0]
    assert (zero[miss3] == 0).all()
    exp = channel_expectations(tables)
    e = Concealer(tables, "expectation").conceal(a).tensor[0]
    np.testing.assert_allclose(e[miss3], np.broadcast_to(exp, SHAPE)[miss3])
    # on these features neighbouring rows hardly correlate beyond two rows: the expectation beats zeros, and the
    # adaptive estimate, which falls back to the channel's mean where rows do not correlate, is as good
    assert errors["expectation"] < errors["zero"]
    assert errors["adaptive"] <= 1.02 * min(errors["expectation"], errors["interpolate"])


def test_smooth_rows_are_interpolated_better_than_filled(sliced_case):
    """A tensor whose rows vary slowly: both interpolations beat the constant fills by far."""
    tables = sliced_case[0]
    h, w, c = SHAPE
    hh, ww, cc = np.meshgrid(np.arange(h), np.arange(w), np.arange(c), indexing="ij")
    field = 0.5 + 0.45 * np.sin(hh / 3.0 + cc) * np.cos(ww / 5.0)
    idx = np.round(field * (tables.levels - 1)).astype(np.uint8)
    frames = Encoder(tables).encode_sliced(idx.tobytes(), h, w, 90)
    decoded = [Decoder(tables).decode(f) for f in frames]
    a = assemble(decoded, [i % 3 != 1 for i in range(len(decoded))])
    recon = np.asarray(tables.reconstruction, dtype=np.float32)[idx]
    miss3 = np.broadcast_to(~a.known[:, None, :], SHAPE)
    err = {m: float(np.mean((Concealer(tables, m).conceal(a).tensor[0][miss3] - recon[miss3]) ** 2)) for m in METHODS}
    assert max(err["interpolate"], err["adaptive"]) < 0.5 * min(err["expectation"], err["zero"])


def test_interpolation_is_linear_between_received_rows(sliced_case):
    tables, _, idx, recon = sliced_case
    known = np.ones((SHAPE[0], SHAPE[2]), dtype=bool)
    known[3:6, 2] = False  # rows 3-5 of channel 2: rows 2 and 6 received
    known[:4, 5] = False  # rows 0-3 of channel 5: only rows below
    known[:, 7] = False  # channel 7 entirely: the per-channel fill
    t = Concealer(tables, "interpolate").fill_in(idx, known)[0]
    for r, wa in ((3, 3 / 4), (4, 2 / 4), (5, 1 / 4)):
        np.testing.assert_allclose(t[r, :, 2], wa * recon[2, :, 2] + (1 - wa) * recon[6, :, 2], rtol=1e-6)
    for r in range(4):
        np.testing.assert_array_equal(t[r, :, 5], recon[4, :, 5])
    np.testing.assert_allclose(t[:, :, 7], channel_expectations(tables)[7])
    mean = np.linspace(0.1, 0.8, SHAPE[2]).astype(np.float32)
    t = Concealer(tables, "interpolate", channel_mean=mean).fill_in(idx, known)[0]
    np.testing.assert_allclose(t[:, :, 7], mean[7])
    t = Concealer(tables, "mean", channel_mean=mean).fill_in(idx, known)[0]
    np.testing.assert_allclose(t[3:6, :, 2], mean[2])


def test_expectation_is_the_outside_context_models_mean(sliced_case):
    tables = sliced_case[0]
    n = tables.levels
    k, r = tables.classes, tables.reference_classes
    recon = np.asarray(tables.reconstruction, dtype=np.float64)
    exp = channel_expectations(tables)
    for c in range(tables.channels):
        g = tables.channel_group[c]
        x = ((g * r + tables.reference_class[n]) * k + tables.neighbour_class[n]) * k + tables.neighbour_class[n]
        f = np.asarray(tables.models[tables.model_of_context[x]], dtype=np.float64)
        assert exp[c] == pytest.approx(float(f @ recon) / (1 << 24), rel=1e-6)
    assert reference_expectations(tables) is None  # a version 1 table has no reference channels


def _v2_table_with_references() -> Tables:
    """16 channels, odd channels refer to the even one before them; models make the reference informative."""
    levels, c = 8, 16
    models = []
    for rc in range(4):  # reference class rc: the dependent index is likely near 2 * rc
        p = np.full(levels, 1.0)
        p[min(2 * rc, levels - 1)] = 40.0
        f = np.maximum(1, np.round(p / p.sum() * (1 << 24))).astype(np.int64)
        f[np.argmax(f)] += (1 << 24) - f.sum()
        models.append(f.tolist())
    table = {
        "layout": "NHWC", "channels": c, "levels": levels, "clip_min": 0.0, "clip_max": 1.0,
        "int8": {"scale": 1 / 127, "zero_point": 0,
                 "index_of_q": [0] * 128 + [min(levels - 1, q * levels // 128) for q in range(128)]},
        "float_input": {"frac_bits": 8, "thresholds": [32 * (i + 1) for i in range(levels - 1)]},
        "reconstruction": [i / (levels - 1) for i in range(levels)],
        "contexts": {"groups": 1, "classes": 1, "channel_group": [0] * c, "neighbour_class": [0] * (levels + 1),
                     "reference_channel": [-1 if ch % 2 == 0 else ch - 1 for ch in range(c)],
                     "reference_classes": 4, "reference_class": [v // 2 for v in range(levels)] + [0],
                     "model_of_context": [0, 1, 2, 3]},
        "models": models,
    }
    return Tables(finalize(table))


def test_a_lost_channel_block_takes_its_reference_channels_conditional_expectation():
    tables = _v2_table_with_references()
    rng = np.random.default_rng(4)
    h, w, c = 6, 5, 16
    idx = rng.integers(0, 8, size=(h, w, c)).astype(np.uint8)
    frames = [Encoder(tables).encode_indices(idx.tobytes(), h, w, region) for region in ((0, h, 0, 8), (0, h, 8, 8))]
    decoded = [Decoder(tables).decode(f) for f in frames]
    a = SliceAssembly((h, w, c))
    assert a.add(decoded[0].header.region, decoded[0].indices)  # channels 8-15 never arrive
    cond = reference_expectations(tables)
    t = Concealer(tables, "interpolate").conceal(a).tensor[0]
    # channels 8-15 have no received row: the odd ones have their reference channel (received? no: 7, 9, ... are
    # in the lost block too, so their references 8, 10, ... are lost as well); all take the per-channel fill
    np.testing.assert_allclose(t[:, :, 8:], np.broadcast_to(channel_expectations(tables)[8:], (h, w, 8)))
    # now lose only the odd channels of the second block: their references (even channels) arrived
    a = SliceAssembly((h, w, c))
    full = Decoder(tables).decode(Encoder(tables).encode_indices(idx.tobytes(), h, w, (0, h, 0, c)))
    a.indices[:] = full.indices
    a.known[:] = True
    a.known[:, 9::2] = False
    t = Concealer(tables, "interpolate").fill_in(a.indices, a.known)[0]
    for ch in range(9, 16, 2):
        np.testing.assert_allclose(t[:, :, ch], cond[ch][idx[:, :, ch - 1]], rtol=1e-6)
    assert cond[9][0] < cond[9][7]  # an informative reference: the expectation follows it


def test_unknown_method_and_wrong_mean_are_refused(sliced_case):
    tables = sliced_case[0]
    with pytest.raises(ValueError, match="unknown concealment"):
        Concealer(tables, "median")
    with pytest.raises(ValueError, match="channel_mean has 3 values"):
        Concealer(tables, "mean", channel_mean=[0.0, 1.0, 2.0])


@pytest.mark.parametrize("model", ["iid", "ge"])
@pytest.mark.parametrize("rate", [0.02, 0.1, 0.3])
def test_loss_channels_hit_their_rate_and_burst_length(model, rate):
    lost = packet_losses(200_000, rate, model, np.random.default_rng(5), burst=4.0)
    assert lost.mean() == pytest.approx(rate, abs=0.1 * rate + 0.002)
    edges = np.diff(np.r_[0, lost.astype(np.int8), 0])
    runs = np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)
    if model == "ge":
        assert runs.mean() == pytest.approx(4.0, rel=0.1)
    else:
        assert runs.mean() == pytest.approx(1 / (1 - rate), rel=0.1)
    again = packet_losses(200_000, rate, model, np.random.default_rng(5), burst=4.0)
    np.testing.assert_array_equal(lost, again)  # seeded: the same channel every time
    assert not packet_losses(1000, 0.0, model, np.random.default_rng(5)).any()


def test_loss_evaluation_pipeline_on_small_tensors(tmp_path):
    """``lwfc eval-loss``'s parts on 40 small tensors and a real ONNX head: the device's slice plan, the overhead,
    whole-frame loss against slices with every concealment, and the report files."""
    from small_bundle import SMALL_CLASSES, make_small_bundle, relu_features, write_cloud_head

    from lwfc.tables import load_tables
    from lwfc_convert.cloud_runtime import cloud_outputs, onnx_session
    from lwfc_host.evaluate.loss import (
        WHOLE,
        LossEvaluation,
        LossRun,
        calibration_params,
        code_tensors,
        load_loss_evaluation,
        measure_overhead,
        overhead_row,
        write_outputs,
    )
    from lwfc_host.evaluate.metrics import ClassifierMetric

    shape = (16, 16, 32)
    info = make_small_bundle(tmp_path / "b", shape=shape)
    write_cloud_head(tmp_path / "head.onnx", shape[2], len(SMALL_CLASSES), batch=None)
    tables = load_tables(tmp_path / "b" / "tables.json")
    x = relu_features(shape, 9, batch=40)
    q = np.clip(np.round(x / info["feature"]["scale"]) - 128, -128, 127).astype(np.int8)
    idx = np.asarray(tables.index_of_q)[q.astype(np.int64) + 128].astype(np.uint8)
    rows = code_tensors(tables, idx, 300, decode_check=5, plan="rows")
    sliced = code_tensors(tables, idx, 300, decode_check=5)  # auto: the table has no reference channels
    assert sliced.plan == "channels" and rows.plan == "rows"
    assert sliced.max_frame == 300 - 36 and sliced.slices_per_tensor > 3
    for s in (rows, sliced):
        assert all(sum(r[1] * r[3] for r in regions) == shape[0] * shape[2] for regions in s.regions)
    assert all(r[1] == shape[0] for regions in sliced.regions for r in regions)  # channel blocks: all rows
    row = overhead_row(sliced, int(np.prod(shape)))
    assert row["bpe_sliced"] > row["bpe_whole"] and 0 < row["overhead_pct"] < row["wire_overhead_pct"] + 5
    session = onnx_session(tmp_path / "head.onnx")
    ref = {"int8": cloud_outputs(session, info["feature"]["scale"] * (q.astype(np.float32) + 128))}
    labels = ref["int8"].argmax(axis=1)
    params = calibration_params(tables, q[:10])
    run = LossRun(tables, idx, sliced, session, ClassifierMetric(), labels, ref, False,
                  params.channel_mean, list(METHODS), burst=3.0, seed=1, params=params)
    assert run.lossless_metrics["accuracy"] > 0.7
    for p in [run.whole_frame("iid", 0.0)] + run.slices("iid", 0.0):
        assert p.metrics["accuracy"] == run.lossless_metrics["accuracy"] and p.concealed == 0
    whole = run.whole_frame("iid", 0.2)
    assert 0.2 < whole.answered < 0.8 and whole.metrics["accuracy"] <= whole.answered
    points = run.slices("ge", 0.2) + run.slices("ge", 0.2, interleave=False, methods=["interpolate"])
    assert {p.method for p in points} == {f"channels slices+{m}" for m in METHODS}
    for p in points:
        assert p.answered == 1.0 and 0 < p.concealed < 0.5 and p.conceal_mse > 0
    rows_run = LossRun(tables, idx, rows, session, ClassifierMetric(), labels, ref, False, params.channel_mean,
                       ["zero", "conditional"], params=params, lossless=run.lossless)
    points += rows_run.slices("iid", 0.2)
    assert {p.plan for p in points} == {"channels", "rows"}
    ev = LossEvaluation("b", "small_head", shape, 40, "accuracy",
                        {"int8 accuracy": 1.0, "lossless accuracy": run.lossless_metrics["accuracy"]},
                        {"table_id": tables.table_id_hex(), "how": "test", "bpe_whole": row["bpe_whole"]}, 300, 3.0,
                        1, [whole] + points, [row], command="test")
    paths = write_outputs(ev, tmp_path / "out")
    assert all(p.exists() and p.stat().st_size > 0 for p in paths.values())
    text = paths["summary"].read_text()
    assert WHOLE in text and "Slicing overhead" in text and "(raster order)" in text
    # --overhead-only: the overhead measured again (the same encoder gives the same rows), the points kept
    again = measure_overhead(tables, idx, ["channels"], 300, [300, 600], 20)
    assert again[0] == {**row, "tensors": 40} and again[1]["mtu"] == 600 and again[1]["tensors"] == 20
    ev.overhead, ev.overhead_command = again, "lwfc eval-loss --overhead-only"
    write_outputs(ev, tmp_path / "out")
    back = load_loss_evaluation(tmp_path / "out" / "loss.json")
    assert repr(back.points) == repr(ev.points) and back.overhead == again  # repr: NaN == NaN
    assert "Measured again after the accuracy runs" in paths["summary"].read_text()


@pytest.mark.parametrize("flags, message", [
    (["--rates", "0,1.5"], "--rates must lie in [0, 1)"),
    (["--models", "iid,markov"], "--models: unknown markov"),
    (["--concealments", "zero,median"], "--concealments: unknown median"),
    (["--tables", "t.json", "--levels", "4"], "not both"),
    (["--contexts", "groups+k9"], "--contexts: unknown"),
    (["--mtu", "64"], "at least 128 bytes"),
    (["--burst", "0.5"], "--burst must be at least 1"),
])
def test_eval_loss_cli_refuses_bad_flags(flags, message, tmp_path, capsys):
    from lwfc_host.cli import main

    assert main(["eval-loss", "--bundle", str(tmp_path), "--output", str(tmp_path / "out"), *flags]) == 2
    assert message in capsys.readouterr().err


def test_eval_loss_overhead_only_needs_an_evaluation(tmp_path, capsys):
    from lwfc_host.cli import main

    assert main(["eval-loss", "--bundle", str(tmp_path), "--output", str(tmp_path / "out"), "--overhead-only"]) == 2
    assert "loss.json" in capsys.readouterr().err


def test_conditional_conceals_lost_channels_from_the_channels_that_arrived(tmp_path):
    """Channels that are mixtures of a few latent ones (as an expanded layer's are): a lost channel block is
    predicted from the received channels at the same position far better than by its mean; a lost row band
    (no channel arrived in those rows) falls back to the row predictor. Parameters survive save and load."""
    from lwfc_host.codec.conceal import ConcealParams, fit_conceal_params

    rng = np.random.default_rng(2)
    h, w, c, latent = 8, 8, 16, 3
    _, tables, _ = make_case(shape=(h, w, c), levels=8, groups=1, classes=1, seed=3)
    recon = np.asarray(tables.reconstruction, dtype=np.float32)

    def tensors(n):
        z = rng.normal(size=(n, h, w, latent))
        x = np.maximum(z @ mix, 0)  # ReLU of fixed mixtures of the latent channels
        return np.abs(recon[:, None] - x.reshape(-1)[None, :]).argmin(axis=0).reshape(n, h, w, c).astype(np.uint8)

    mix = rng.normal(size=(latent, c))
    calib, test = tensors(64), tensors(1)[0]
    params = fit_conceal_params(recon[calib])
    params.save(tmp_path / "p.npz")
    loaded = ConcealParams.load(tmp_path / "p.npz")
    np.testing.assert_array_equal(loaded.covariance, params.covariance)
    with pytest.raises(ValueError, match="not concealment parameters"):
        ConcealParams.load(tmp_path / "missing.npz")
    truth = recon[test]
    known = np.ones((h, c), dtype=bool)
    known[:, 4:8] = False  # a channel block over all rows
    miss = np.broadcast_to(~known[:, None, :], (h, w, c))
    err = {m: float(np.mean((Concealer(tables, m, params=loaded).fill_in(test, known)[0][miss] - truth[miss]) ** 2))
           for m in ("mean", "conditional")}
    assert err["conditional"] < 0.5 * err["mean"]
    known = np.ones((h, c), dtype=bool)
    known[3:5] = False  # a row band: no channel of those rows arrived
    a = Concealer(tables, "conditional", params=loaded).fill_in(test, known)[0]
    b = Concealer(tables, "learned", params=loaded).fill_in(test, known)[0]
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="for 16 channels"):
        Concealer(Tables(make_case(shape=(4, 4, 8))[0]), "conditional", params=loaded)
