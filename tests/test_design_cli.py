"""``lwfc calibrate`` / ``lwfc design`` end to end, streaming calibration, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lwfc_host.cli import main
from lwfc_host.design.calibration import CalibrationError, CalibrationStats, calibrate, load_stats
from lwfc_host.design.tablefile import load_verified


def _relu(seed: int, shape=(40, 6, 5, 8)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.maximum(rng.normal(rng.normal(0, 0.5, shape[-1]), 1.0, shape), 0).astype(np.float32)


@pytest.fixture(scope="module")
def stats_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("acts")
    for i in range(3):
        np.save(d / f"part{i}.npy", _relu(i))
    out = d / "stats.npz"
    assert main(["calibrate", "--activations", str(d), "--output", str(out), "--reservoir", "16"]) == 0
    return out


def run_err(argv, capsys) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_streaming_equals_one_batch(tmp_path):
    x = np.concatenate([_relu(1), _relu(2) * 3.0, _relu(3) * 40.0])  # the range grows: bins merge twice
    one = CalibrationStats()
    one.add_float(x)
    many = CalibrationStats(reservoir=5)
    for i in range(0, len(x), 7):
        many.add_float(x[i:i + 7])
    for a, b in ((one, many),):
        assert a.summary() == pytest.approx(b.summary())
        ha, hb = a.histogram(), b.histogram()
        assert ha.total == hb.total == x.size
        assert hb.s1.sum() == pytest.approx(float(x.astype(np.float64).sum()))
        # every value sits in the bin its floor says (exact, so device thresholds match)
        w = 2.0 ** many.log2_width
        k = np.floor(x.astype(np.float64) / w).astype(np.int64) - many.k0
        np.testing.assert_array_equal(np.bincount(k.ravel(), minlength=many.bins), many.count)
        np.testing.assert_array_equal(many.ch_count.sum(axis=0), many.count)
    assert len(many.reservoir) == 5


def test_design_writes_a_valid_table(stats_file, tmp_path, capsys):
    out = tmp_path / "t.json"
    assert main(["design", "--stats", str(stats_file), "--levels", "4", "--quantizer", "ecsq", "--lam", "0.002",
                 "--clip", "model", "--groups", "auto", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "bits/element" in text and "MSE" in text
    t = load_verified(out)
    assert t.channels == 8 and 2 <= t.levels <= 4


def test_design_with_int8_parameters(stats_file, tmp_path):
    out = tmp_path / "t8.json"
    assert main(["design", "--stats", str(stats_file), "--levels", "3", "--int8-scale", "0.02",
                 "--int8-zero-point", "-128", "--output", str(out)]) == 0
    t = json.loads(out.read_text())
    assert t["int8"]["scale"] == 0.02 and t["int8"]["zero_point"] == -128


def test_target_bits_cli(stats_file, tmp_path, capsys):
    out = tmp_path / "tb.json"
    assert main(["design", "--stats", str(stats_file), "--target-bits", "1.5", "--groups", "1",
                 "--output", str(out)]) == 0
    assert load_verified(out).levels >= 2


@pytest.mark.slow
def test_report_writes_png(stats_file, tmp_path, capsys):
    png = tmp_path / "rd.png"
    assert main(["design", "--stats", str(stats_file), "--report", "--report-png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "ECSQ" in out and "gain of channel-group models" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- bad input ------------------------------------------------------------------------------------------------
def test_empty_activations(tmp_path, capsys):
    np.save(tmp_path / "empty.npy", np.zeros((0, 4, 4, 2), np.float32))
    err = run_err(["calibrate", "--activations", str(tmp_path / "empty.npy"), "--output", str(tmp_path / "s.npz")],
                  capsys)
    assert "empty" in err
    (tmp_path / "d").mkdir()
    err = run_err(["calibrate", "--activations", str(tmp_path / "d"), "--output", str(tmp_path / "s.npz")], capsys)
    assert "no .npy" in err


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_activations(tmp_path, capsys, bad):
    x = _relu(0)
    x[3, 1, 1, 2] = bad
    np.save(tmp_path / "x.npy", x)
    err = run_err(["calibrate", "--activations", str(tmp_path / "x.npy"), "--output", str(tmp_path / "s.npz")],
                  capsys)
    assert "NaN or infinite" in err


def test_constant_activations(tmp_path, capsys):
    np.save(tmp_path / "c.npy", np.full((5, 4, 4, 3), 1.5, np.float32))
    s = tmp_path / "s.npz"
    assert main(["calibrate", "--activations", str(tmp_path / "c.npy"), "--output", str(s)]) == 0
    err = run_err(["design", "--stats", str(s), "--levels", "4", "--output", str(tmp_path / "t.json")], capsys)
    assert "constant" in err


def test_target_rate_errors(stats_file, tmp_path, capsys):
    out = str(tmp_path / "t.json")
    assert "above 8" in run_err(["design", "--stats", str(stats_file), "--target-bits", "9", "--output", out], capsys)
    assert "below the lowest" in run_err(["design", "--stats", str(stats_file), "--target-bits", "0.0001",
                                          "--groups", "1", "--output", out], capsys)
    assert "above the highest" in run_err(["design", "--stats", str(stats_file), "--target-bits", "7",
                                           "--groups", "1", "--output", out], capsys)


def test_groups_above_channel_count_fall_back(stats_file, tmp_path, capsys):
    out = tmp_path / "t.json"
    assert main(["design", "--stats", str(stats_file), "--levels", "3", "--groups", "99", "--output", str(out)]) == 0
    assert "exceeds min(C, 256) = 8: using 8" in capsys.readouterr().out
    assert load_verified(out).groups == 8


def test_stats_from_another_layer(stats_file, tmp_path, capsys):
    err = run_err(["design", "--stats", str(stats_file), "--levels", "3", "--shape", "14x14x48",
                   "--output", str(tmp_path / "t.json")], capsys)
    assert "6x5x8 layer, not 14x14x48" in err


def test_mixed_shapes_and_int8_parameters(tmp_path):
    np.save(tmp_path / "a.npy", _relu(0))
    np.save(tmp_path / "b.npy", _relu(1, (4, 6, 5, 9)))
    with pytest.raises(CalibrationError, match="differs from the first"):
        calibrate(tmp_path)
    s = CalibrationStats()
    s.add_int8(np.zeros((2, 3, 3, 1), np.int8), 0.1, 0)
    with pytest.raises(CalibrationError, match="differ from the first"):
        s.add_int8(np.zeros((2, 3, 3, 1), np.int8), 0.2, 0)


def test_not_a_stats_file(tmp_path, capsys):
    np.savez(tmp_path / "x.npz", a=np.zeros(3))
    with pytest.raises(CalibrationError):
        load_stats(tmp_path / "x.npz")
    err = run_err(["design", "--stats", str(tmp_path / "x.npz"), "--levels", "3", "--output", "t.json"], capsys)
    assert "not an lwfc calibration stats file" in err


def test_int8_file_needs_parameters(tmp_path, capsys):
    np.save(tmp_path / "q.npy", np.zeros((2, 3, 3, 4), np.int8))
    err = run_err(["calibrate", "--activations", str(tmp_path / "q.npy"), "--output", str(tmp_path / "s.npz")],
                  capsys)
    assert "--int8-scale" in err
    assert main(["calibrate", "--activations", str(tmp_path / "q.npy"), "--output", str(tmp_path / "s.npz"),
                 "--int8-scale", "0.05", "--int8-zero-point", "-10"]) == 0


# ---- no flag is silently ignored --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["uniform", "ecsq"])
def test_quantizer_is_honoured_with_target_bits(stats_file, tmp_path, kind):
    out = tmp_path / f"{kind}.json"
    assert main(["design", "--stats", str(stats_file), "--target-bits", "1.75", "--groups", "1", "--quantizer", kind,
                 "--output", str(out)]) == 0
    assert json.loads(out.read_text())["quantizer"] == kind


@pytest.mark.parametrize("flags, needle", [
    (["--levels", "3", "--lam", "0.01"], "give --quantizer ecsq with it"),
    (["--levels", "3", "--quantizer", "uniform", "--lam", "0.01"], "give --quantizer ecsq with it"),
    (["--target-bits", "1.5", "--lam", "0.01"], "searches lambda itself"),
    (["--levels", "3", "--tolerance", "0.02"], "--tolerance apply to --objective accuracy only"),
    (["--levels", "3", "--task-images", "64"], "--task-images apply to --objective accuracy only"),
    (["--levels", "3", "--bundle", "b"], "--bundle apply to --objective accuracy only"),
    (["--levels", "3", "--report-png", "rd.png"], "give --report too"),
    (["--report", "--groups", "4"], "--report alone"),
    (["--report", "--quantizer", "ecsq"], "--report alone"),
    (["--report", "--output", "t.json"], "--report alone"),
])
def test_flags_that_do_not_apply_are_refused(stats_file, tmp_path, capsys, flags, needle):
    argv = ["design", "--stats", str(stats_file)] + flags
    if "--output" not in flags and "--report" not in flags:
        argv += ["--output", str(tmp_path / "t.json")]
    err = run_err(argv, capsys)
    assert needle in err
    assert not (tmp_path / "t.json").exists()


@pytest.mark.parametrize("flags", [["--stats", "s.npz"], ["--clip", "model"], ["--groups", "2"], ["--lam", "0.1"],
                                   ["--int8-scale", "0.1", "--int8-zero-point", "0"], ["--shape", "4x4x8"],
                                   ["--report"], ["--report-png", "rd.png"]])
def test_mse_flags_refused_with_objective_accuracy(tmp_path, capsys, flags):
    """Refused before anything is loaded: the bundle does not even exist here."""
    err = run_err(["design", "--objective", "accuracy", "--bundle", str(tmp_path / "none"), "--output",
                   str(tmp_path / "t.json")] + flags, capsys)
    assert "apply to --objective mse only" in err and flags[0] in err


def test_calibrate_refuses_int8_flags_the_data_do_not_use(tmp_path, capsys):
    np.save(tmp_path / "f.npy", _relu(0))
    argv = ["calibrate", "--activations", str(tmp_path / "f.npy"), "--output", str(tmp_path / "s.npz")]
    assert "together" in run_err(argv + ["--int8-scale", "0.1"], capsys)
    assert "activations are float" in run_err(argv + ["--int8-scale", "0.1", "--int8-zero-point", "0"], capsys)
    np.savez(tmp_path / "q.npz", q=np.zeros((2, 3, 3, 4), np.int8), scale=0.05, zero_point=-10)
    argv = ["calibrate", "--activations", str(tmp_path / "q.npz"), "--output", str(tmp_path / "s.npz")]
    assert "carry their own scale" in run_err(argv + ["--int8-scale", "0.1", "--int8-zero-point", "0"], capsys)
    assert "--bins applies to float" in run_err(argv + ["--bins", "128"], capsys)
    assert not (tmp_path / "s.npz").exists()
    assert main(argv + ["--int8-scale", "0.05", "--int8-zero-point", "-10"]) == 0  # the same parameters: fine
