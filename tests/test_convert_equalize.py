"""Per-channel range equalisation (lwfc_convert.equalize) on a small MobileNetV3-like stem: the rewritten
float graph computes what the original computes, on random inputs far outside the calibration range too; the
int8 TFLite edge half gets more accurate; the int8 range limits clip where the hard-swish makes it exact."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="converter tests need torch (pip install '.[convert]')")
pytest.importorskip("litert_torch", reason="conversion needs litert-torch (pip install '.[convert]')")
pytest.importorskip("ai_edge_litert", reason="conversion needs ai-edge-litert (pip install '.[convert]')")

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from lwfc.edge import make_interpreter  # noqa: E402
from lwfc_convert import equalize as eq  # noqa: E402
from lwfc_convert import qat, split, tflite_export  # noqa: E402

SIXTH_F16 = 0.1666259765625  # 1/6 as the TF.js graph stores it (float16)
SMALL = (1, 4)  # stem channels with a tiny range, feeding depthwise kernels with a large gain


class Stem(nn.Module):
    """conv -> hard-swish decomposed as in the TF graph -> depthwise conv -> ReLU -> 1x1 conv, + the
    hard-swish (residual); then a 1x1 conv -> ReLU -> zero padding -> stride-2 depthwise conv."""

    def __init__(self, decomposed: bool = True) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.decomposed = decomposed
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.project = nn.Conv2d(8, 8, 1)
        self.expand = nn.Conv2d(8, 16, 1)
        self.dw2 = nn.Conv2d(16, 16, 3, stride=2, groups=16)
        with torch.no_grad():
            for m in (self.stem, self.dw, self.project, self.expand, self.dw2):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * 0.3)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.3)
            for c in SMALL:  # tiny pre-activation range, large depthwise gain
                self.stem.weight[c] *= 0.02
                self.stem.bias[c] = 0.1
                self.dw.weight[c] *= 30.0
            self.stem.weight[0] *= 20.0  # one wide channel sets the tensor's range
            self.expand.weight[:8] *= 0.05  # half of the ReLU channels span a twentieth of the others
        self.register_buffer("sixth", torch.tensor(SIXTH_F16))
        self.register_buffer("three", torch.tensor(3.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        h = (self.sixth * y) * F.relu6(y + self.three) if self.decomposed else F.hardswish(y)
        z = self.project(F.relu(self.dw(h))) + h
        return F.relu(self.dw2(F.pad(F.relu(self.expand(z)), (0, 1, 0, 1))))


def _images(n: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.fixture(scope="module")
def stem():
    gm = split.trace(Stem().eval())
    calib = [_images(16, 1), _images(16, 2)]
    rewritten, summary = eq.equalize(gm, calib)
    return gm, rewritten, summary, calib


def test_finds_decomposed_and_fused_hard_swishes_not_hard_sigmoids():
    gm = split.trace(Stem().eval())
    (hs,) = eq.find_hard_swishes(gm)
    assert hs.x.target == "stem" and hs.sixth == SIXTH_F16 and len(hs.inner) == 4
    assert len(eq.find_hard_swishes(split.trace(Stem(decomposed=False).eval()))) == 1

    class Gates(nn.Module):
        def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
            # a hard-sigmoid gate (squeeze-excite) and x * relu6(x + 3) * 1/6 in the other operand order
            return x * (F.relu6(z + 3.0) * SIXTH_F16) + (F.relu6(3.0 + x) * x) * (1 / 6)

    found = eq.find_hard_swishes(torch.fx.symbolic_trace(Gates()))
    assert len(found) == 1 and found[0].x.name == "x" and found[0].sixth == pytest.approx(1 / 6)


def test_rewrite_matches_float_on_random_inputs(stem):
    gm, rewritten, summary, _ = stem
    (hs,) = summary["hard_swish"]
    assert hs["conv"] == "stem" and hs["back_to_h"]  # the residual reads h back through a 1x1 depthwise conv
    gains = torch.tensor(hs["gains"])
    assert all(gains[c] > 4 * gains.median() for c in SMALL)
    assert [r["conv"] for r in summary["relu"]] == ["expand"]  # ReLU -> pad -> depthwise; not dw -> project
    assert summary["range_limits"]["stem"][0] >= -3.0 * float(gains.max())
    # The float function is unchanged, on inputs like the calibration images and on much larger ones
    # (where the gains' int8 clipping would act, the float rewrite must still be exact).
    for seed, scale in ((10, 1.0), (11, 10.0), (12, 0.01)):
        x = _images(8, seed, scale)
        with torch.no_grad():
            ref, got = gm(x), rewritten(x)
        assert torch.allclose(got, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    names = [n.target for n in rewritten.graph.nodes if n.op == "call_module"]
    assert "stem_hswish_gate" in names and "stem_hswish_out" in names


def _tflite_error(gm: torch.fx.GraphModule, reference: torch.nn.Module, calib: list[torch.Tensor], path,
                  limits: dict | None) -> float:
    tflite_export.convert_edge_to_tflite(gm, calib, calib[0][:1], path, progress=False, range_limits=limits)
    assert tflite_export.check_int8(path) == []
    x = _images(16, 20)
    _, deq = tflite_export.run_tflite(make_interpreter(path), x)
    with torch.no_grad():
        ref = reference(x).permute(0, 2, 3, 1)
    return qat.relative_l2(torch.from_numpy(deq), ref)


def test_int8_error_drops_with_equalisation(stem, tmp_path):
    gm, rewritten, summary, calib = stem
    plain = _tflite_error(gm, gm, calib, tmp_path / "plain.tflite", None)
    equalised = _tflite_error(rewritten, gm, calib, tmp_path / "eq.tflite", summary["range_limits"])
    assert equalised < 0.5 * plain, (plain, equalised)


def test_range_limits_clip_the_calibrated_range(stem):
    _, rewritten, summary, calib = stem
    low, high = summary["range_limits"]["stem"]
    quantized, _ = tflite_export.quantize_edge(rewritten, calib, calib[0][:1], progress=False)
    done = qat.limit_ranges(quantized, {"stem": (low, high)})
    lo, hi = done["stem"]
    assert lo == pytest.approx(low, rel=1e-6) and hi <= high + 1e-6
    q = next(n for n in quantized.graph.nodes if n.op == "call_function"
             and n.target == torch.ops.quantized_decomposed.quantize_per_tensor.default
             and n.args[0].meta.get("nn_module_stack") and qat._module_path(n.args[0]) == "stem")
    scale, zp = float(q.args[1]), int(q.args[2])
    assert (-128 - zp) * scale == pytest.approx(lo, abs=scale) and (127 - zp) * scale == pytest.approx(hi, abs=scale)


def test_channel_gains():
    # ReLU outputs: every channel scaled up to the largest, capped
    s, low, high = eq.channel_gains(torch.zeros(3), torch.tensor([4.0, 1.0, 1e-6]), torch.ones(3), max_gain=64)
    assert s.tolist() == pytest.approx([1.0, 4.0, 64.0]) and low == 0.0 and high == pytest.approx(4.0)
    # Signed ranges: a channel with a large negative excursion but no weight downstream is scaled down rather
    # than making the others share their steps with it; a symmetric small channel meets the tensor's floor
    # (here about a quarter of its top: sum_c weight_c (range / s_c)^2 is smallest there).
    lo, hi = torch.tensor([-0.1, -3.0, -0.5]), torch.tensor([4.0, 0.5, 0.5])
    s, low, high = eq.channel_gains(lo, hi, torch.tensor([1.0, 0.0, 1.0]))
    assert s[0] == 1.0 and s[1] < 1.0 and float(s[2]) == pytest.approx(2.0, rel=0.1)
    assert high == pytest.approx(4.0) and low == pytest.approx(float(-0.5 * s[2]))


def test_fused_hard_swish_is_int8(tmp_path):
    """A hard-swish left as F.hardswish (balanced channels: nothing to equalise) converts to an int8
    HARD_SWISH op, not a float island."""

    class Balanced(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.hardswish(self.conv(x))

    gm = split.trace(Balanced().eval())
    calib = [_images(8, 3)]
    rewritten, summary = eq.equalize(gm, calib)
    assert summary["hard_swish"] == [] and summary["relu"] == []
    path = tmp_path / "hs.tflite"
    tflite_export.convert_edge_to_tflite(rewritten, calib, calib[0][:1], path, progress=False)
    assert tflite_export.check_int8(path) == []
    assert "HARD_SWISH" in [op["op"] for op in tflite_export.list_ops(path)]
