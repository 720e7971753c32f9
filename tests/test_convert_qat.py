"""Quantization-aware fine-tuning of a converted PT2E graph (lwfc_convert.qat) on the real resnet_fmnist edge
half: the fake-quantized copy computes what the converted graph computes, fine-tuning lowers the int8 error
against the float edge half, and the TFLite model converted from the tuned graph shows the same error."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="converter tests need torch (pip install '.[convert]')")
pytest.importorskip("litert_torch", reason="conversion needs litert-torch (pip install '.[convert]')")
pytest.importorskip("ai_edge_litert", reason="conversion needs ai-edge-litert (pip install '.[convert]')")

from lwfc.edge import make_interpreter  # noqa: E402
from lwfc_convert import qat, split, tflite_export, zoo  # noqa: E402
from lwfc_convert.bundle import calibration_and_eval_data  # noqa: E402
from lwfc_convert.quant_fix import bias_correct  # noqa: E402


@pytest.fixture(scope="module")
def converted():
    torch.manual_seed(0)
    model = zoo.load_model("resnet_fmnist")
    edge, _ = split.split(model, "stage2")
    calib, ev, _ = calibration_and_eval_data("resnet_fmnist", 256, 64, seed=0, progress=False)
    folded, _ = bias_correct(edge, calib)
    quantized, quantizer = tflite_export.quantize_edge(folded, calib, calib[0][:1], progress=False)
    return edge, quantized, quantizer, calib, ev[0][0][:64]


def test_fake_quant_graph_matches_converted_graph(converted):
    _, quantized, _, _, x = converted
    fq = qat.fake_quant_graph(quantized)
    with torch.no_grad():
        batched = fq(x[:16])  # the copy runs batches; the converted graph is specialised to batch 1
        single = torch.cat([quantized(x[i:i + 1]) for i in range(16)])
    # Same quantizers, same parameters: the outputs agree on the int8 grid. A batched convolution may sum in
    # another order than a single-image one (CPU-dependent kernels), which can move a value sitting on a
    # rounding boundary by one output step, so allow that, rarely, and nothing larger.
    levels = torch.unique(single)
    step = float((levels[1:] - levels[:-1]).min())
    moved = (batched - single).abs()
    assert float(moved.max()) <= step * 1.001
    assert float((moved > 1e-6).float().mean()) <= 1e-3
    assert set(dict(fq.named_parameters())) == set(dict(quantized.named_parameters()))


def test_qat_lowers_int8_error_and_survives_tflite(converted, tmp_path):
    import copy

    import litert_torch
    from litert_torch.quantize.quant_config import QuantConfig

    edge, quantized, quantizer, calib, x = converted
    tuned = copy.deepcopy(quantized)
    summary = qat.qat_finetune(tuned, edge, calib, epochs=2, progress=False)
    assert summary["calibration_rel_l2_after"] < summary["calibration_rel_l2_before"]
    assert summary["images"] == 256 and len(summary["history"]) == 3
    # learned activation scales were written into the graph's quantize/dequantize nodes
    moved = [a for a in summary["activation_scales"] if a["scale_after"] != a["scale_before"]]
    assert moved
    nodes = {n.name: n for n in tuned.graph.nodes}
    for group in summary["activation_scales"]:
        for name in group["tensors"]:
            q = nodes[name]
            assert q.args[1] == group["scale_after"] and q.args[2] == group["zero_point"]
            assert all(d.args[1] == group["scale_after"] for d in q.users)  # its dequantize nodes too
    with torch.no_grad():
        ref = edge(x)
        before = qat.relative_l2(torch.cat([quantized(x[i:i + 1]) for i in range(len(x))]), ref)
        after = qat.relative_l2(torch.cat([tuned(x[i:i + 1]) for i in range(len(x))]), ref)
    assert after < before  # held-out images, not the calibration set
    # the tuned graph converts like the untuned one, and the int8 model computes what was simulated
    nhwc = litert_torch.to_channel_last_io(tuned, args=[0], outputs=[0])
    path = tmp_path / "edge.tflite"
    litert_torch.convert(nhwc, (calib[0][:1].permute(0, 2, 3, 1).contiguous(),),
                         quant_config=QuantConfig(pt2e_quantizer=quantizer)).export(str(path))
    assert tflite_export.check_int8(path) == []
    _, deq = tflite_export.run_tflite(make_interpreter(path), x)
    got = qat.relative_l2(torch.from_numpy(deq).permute(0, 3, 1, 2), ref)
    assert got == pytest.approx(after, abs=0.004)
    # the error budget's full simulation is what the TFLite model shows; its parts are smaller
    budget = qat.error_budget(tuned, edge, [x])
    assert budget["images"] == len(x)
    assert budget["int8"] == pytest.approx(got, abs=0.004)
    assert 0 < budget["output_rounding"] < budget["weights_and_output"] < budget["int8"]


def test_fake_quant_graph_rejects_a_float_graph(converted):
    edge = converted[0]
    with pytest.raises(ValueError, match="no quantize/dequantize pairs"):
        qat.fake_quant_graph(torch.fx.symbolic_trace(edge) if not isinstance(edge, torch.fx.GraphModule) else edge)


def test_activation_groups_tie_only_what_tflite_shares():
    """A padding keeps its input's quantization (one group); two ReLU6 outputs calibrated to the same 0..6
    range are different tensors (two groups), so each may learn its own scale."""

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Conv2d(3, 4, 3)
            self.b = torch.nn.Conv2d(4, 4, 3)
            with torch.no_grad():
                self.b.weight.mul_(20)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.nn.functional.relu6(self.a(x))
            y = torch.nn.functional.pad(y, (1, 1, 1, 1))
            return torch.nn.functional.relu6(self.b(y))

    torch.manual_seed(0)
    calib = [4 * torch.randn(8, 3, 12, 12)]  # wide enough that both ReLU6 outputs saturate at 6
    quantized, _ = tflite_export.quantize_edge(Net().eval(), calib, calib[0][:1], progress=False)
    by_input = {}
    for n in quantized.graph.nodes:
        if n.op == "call_function" and n.target == torch.ops.quantized_decomposed.quantize_per_tensor.default:
            by_input[n.args[0].name] = n
    relus = [k for k in by_input if "hardtanh" in k or "relu6" in k]
    pad = next(k for k in by_input if "pad" in k)
    assert len(relus) == 2 and by_input[relus[0]].args[1] == by_input[relus[1]].args[1]  # same 0..6 scale
    groups = {name: i for i, names in enumerate(qat._activation_groups(quantized)) for name in names}
    assert groups[by_input[pad].name] == groups[by_input[relus[0]].name]
    assert groups[by_input[relus[0]].name] != groups[by_input[relus[1]].name]


def test_fixed_input_quantization_is_kept_by_qat():
    """fix_input_quantization sets the input's grid on the input and on the padding that shares it, and
    QAT trains the other scales but leaves that interface alone."""

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Conv2d(3, 8, 3, 2)
            self.b = torch.nn.Conv2d(8, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.nn.functional.relu6(self.a(torch.nn.functional.pad(x, (0, 1, 0, 1))))
            return torch.relu(self.b(y))

    torch.manual_seed(0)
    net = Net().eval()
    calib = [(torch.randint(0, 256, (16, 3, 12, 12)).float() - 127) / 128 for _ in range(2)]
    quantized, _ = tflite_export.quantize_edge(net, calib, calib[0][:1], progress=False,
                                               input_qparams=(1 / 128, -1))
    names = qat.input_quantizers(quantized)
    assert len(names) == 2  # the input and its padding
    nodes = {n.name: n for n in quantized.graph.nodes}
    for name in names:
        assert (nodes[name].args[1], nodes[name].args[2]) == (1 / 128, -1)
        assert all((d.args[1], d.args[2]) == (1 / 128, -1) for d in nodes[name].users)
    summary = qat.qat_finetune(quantized, net, calib, epochs=2, progress=False)
    assert summary["activation_scales"] and not any(set(names) & set(a["tensors"])
                                                    for a in summary["activation_scales"])
    nodes = {n.name: n for n in quantized.graph.nodes}
    assert all((nodes[name].args[1], nodes[name].args[2]) == (1 / 128, -1) for name in names)


def test_task_distillation_lowers_the_cloud_halfs_error(converted):
    """A second target, the cloud half's logits: the task loss falls, only ``images_per_epoch`` images train
    per epoch, and the summary reports both losses per epoch."""
    import copy

    edge, quantized, _, calib, x = converted
    model = zoo.load_model("resnet_fmnist")
    _, cloud = split.split(model, "stage2")
    task = qat.TaskDistillation(cloud, weight=1.0)
    tuned = copy.deepcopy(quantized)
    summary = qat.qat_finetune(tuned, edge, calib, epochs=2, progress=False, images_per_epoch=64, task=task)
    assert summary["images"] == 256 and summary["images_per_epoch"] == 64
    td = summary["task_distillation"]
    assert td["weight"] == 1.0 and len(td["history"]) == 3 and len(summary["history"]) == 3
    assert td["after"] < td["before"]
    with torch.no_grad():  # held out: the logits' error falls too
        ref = cloud(edge(x))
        before = qat.relative_l2(cloud(torch.cat([quantized(x[i:i + 1]) for i in range(len(x))])), ref)
        after = qat.relative_l2(cloud(torch.cat([tuned(x[i:i + 1]) for i in range(len(x))])), ref)
    assert after < before


def test_relative_mse_and_the_centernet_heads_loss():
    from lwfc_convert.centernet import heads_loss

    t = (torch.tensor([3.0, 4.0]),)
    assert float(qat.relative_mse(t, t)) == 0.0
    assert float(qat.relative_mse((torch.zeros(2),), t)) == pytest.approx(1.0)
    gen = torch.Generator().manual_seed(0)
    heat = torch.rand(2, 80, 8, 8, generator=gen) * 0.05
    heat[0, 3, 4, 4] = 0.9  # one object
    sides = torch.rand(2, 4, 8, 8, generator=gen) * 50
    teacher = (heat, sides)
    assert float(heads_loss(teacher, teacher)) == 0.0
    assert float(heads_loss((torch.zeros_like(heat), torch.zeros_like(sides)), teacher)) == pytest.approx(2.0)
    # the same heatmap error costs more at the object's peak than in the background
    at_peak, in_background = heat.clone(), heat.clone()
    at_peak[0, 3, 4, 4] -= 0.2
    in_background[1, 3, 4, 4] += 0.2
    assert float(heads_loss((at_peak, sides), teacher)) > 5 * float(heads_loss((in_background, sides), teacher))
    # a box side only counts where something is detected
    wrong_side_at_peak, wrong_side_elsewhere = sides.clone(), sides.clone()
    wrong_side_at_peak[0, :, 4, 4] += 10
    wrong_side_elsewhere[1, :, 4, 4] += 10
    assert float(heads_loss((heat, wrong_side_at_peak), teacher)) > 5 * float(
        heads_loss((heat, wrong_side_elsewhere), teacher))
