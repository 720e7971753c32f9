"""End-to-end conversion: split -> int8 TFLite edge (ai-edge-litert) + ONNX cloud (onnxruntime) -> bundle.

Each model is converted once per session (module-scoped fixtures) with small calibration and evaluation
sets to keep the suite within a few minutes on 2 cores: Fashion-MNIST accuracies are measured on the first
2,000 test images here (the committed bundle notes give the full-test-set numbers)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="converter tests need torch (pip install '.[convert]')")
pytest.importorskip("litert_torch", reason="conversion needs litert-torch (pip install '.[convert]')")
pytest.importorskip("onnxruntime", reason="conversion needs onnxruntime (pip install '.[convert]')")
pytest.importorskip("ai_edge_litert", reason="conversion needs ai-edge-litert (pip install '.[convert]')")

from lwfc.edge import make_interpreter  # noqa: E402
from lwfc_convert import bundle, tflite_export, zoo  # noqa: E402
from lwfc_convert.cloud_runtime import onnx_session, run_onnx  # noqa: E402

EVAL_FMNIST = 2000
REPO = Path(__file__).resolve().parents[1]
TFLITE_VENV_PYTHON = REPO / "converters" / ".venv-tflite" / "bin" / "python"


@pytest.fixture(scope="module")
def resnet_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("resnet_bundle")
    info = bundle.convert("resnet_fmnist", "stage2", out, calib_images=256, eval_images=EVAL_FMNIST,
                          progress=False)
    return out, info


@pytest.fixture(scope="module")
def effnet_bundle(tmp_path_factory):
    pytest.importorskip("skimage", reason="ImageNet calibration uses the photos bundled with scikit-image")
    out = tmp_path_factory.mktemp("effnet_bundle")
    # A mid-network split keeps the test cheap; `lwfc convert` defaults to the deeper _blocks.8 point.
    info = bundle.convert("efficientnet_lite0", "_blocks.5._expand_act", out, calib_images=16,
                          eval_images=8, progress=False, qat_epochs=2)  # the ResNet bundle tests the default
    return out, info


def _check_fields(info, out):
    for key in ("model", "split", "activation", "preprocessing", "class_names", "accuracy", "edge", "cloud",
                "feature"):
        assert key in info, key
    assert (out / "edge.tflite").exists() and (out / "cloud.onnx").exists()
    assert json.loads((out / "bundle.json").read_text()) == info
    e = info["edge"]
    assert e["input"]["dtype"] == "int8" and e["output"]["dtype"] == "int8"
    assert e["input"]["layout"] == "NHWC" and e["output"]["layout"] == "NHWC"
    assert e["output"]["scale"] > 0 and -128 <= e["output"]["zero_point"] <= 127
    assert info["cloud"]["input"]["layout"] == "NHWC"
    assert info["cloud"]["input"]["shape"][1:] == e["output"]["shape"][1:]


def _run_bundle(out, info, x_nchw):
    """Deploy path: int8 edge in the TFLite interpreter, dequantize, float cloud in onnxruntime."""
    interp = make_interpreter(out / "edge.tflite")
    _, deq = tflite_export.run_tflite(interp, x_nchw)
    return run_onnx(onnx_session(out / "cloud.onnx"), deq)


def test_resnet_bundle_is_fully_int8(resnet_bundle):
    out, info = resnet_bundle
    _check_fields(info, out)
    assert tflite_export.check_int8(out / "edge.tflite") == []
    ops = {op["op"] for op in tflite_export.list_ops(out / "edge.tflite")}
    assert "ADD" in ops or "DELEGATE" in ops  # residual adds are inside the int8 graph
    assert info["activation"] == "relu" and info["feature"]["shape_nhwc"] == [1, 14, 14, 48]


def test_resnet_bundle_accuracy(resnet_bundle):
    out, info = resnet_bundle
    acc = info["accuracy"]
    assert acc["images"] == EVAL_FMNIST
    assert acc["float_accuracy"] >= 0.92  # the committed weights: 92.53% on all 10,000 test images
    assert abs(acc["int8_edge_float_cloud_accuracy"] - acc["float_accuracy"]) <= 0.01
    # Issue 4 asks for <= 3%: plain PTQ gives 3.2% at stage2, QAT fine-tuning (the default) brings it under
    assert acc["edge_int8_rel_l2_error"] <= 0.03
    assert info["qat"]["calibration_rel_l2_after"] < info["qat"]["calibration_rel_l2_before"]
    # the error budget, simulated on the first 512 held-out images, accounts for the TFLite model's error
    budget = info["int8_error_budget"]
    assert budget["images"] == bundle.ERROR_BUDGET_IMAGES
    assert budget["int8"] == pytest.approx(acc["edge_int8_rel_l2_error"], abs=0.005)
    assert budget["output_rounding"] < budget["weights_and_output"] < budget["int8"]
    assert acc["cloud_onnx_vs_torch_max_rel_l2_error"] <= 1e-4
    check = info["int8_check"]  # labeled: the accuracy drop, against 0.5 pp
    assert check["metric"].startswith("float_accuracy") and check["threshold"] == bundle.MAX_ACCURACY_DROP
    assert check["value"] == pytest.approx(acc["float_accuracy"] - acc["int8_edge_float_cloud_accuracy"])
    assert check["passed"] == (check["value"] <= 0.005) and bool(check["warnings"]) != check["passed"]
    # Recompute the int8 accuracy independently from the bundle files on a slice of the same images.
    from lwfc_convert.datasets import fashion_mnist

    x, y = next(iter(fashion_mnist("test", zoo.preprocess_fn("resnet_fmnist"), batch_size=500, progress=False)))
    logits = _run_bundle(out, info, x)
    assert logits.shape == (500, 10)
    assert abs(float((logits.argmax(1) == y.numpy()).mean()) - acc["int8_edge_float_cloud_accuracy"]) < 0.03


def test_effnet_bundle(effnet_bundle):
    out, info = effnet_bundle
    _check_fields(info, out)
    assert tflite_export.check_int8(out / "edge.tflite") == []
    assert info["activation"] == "relu6" and info["feature"]["shape_nhwc"] == [1, 28, 28, 240]
    assert info["preprocessing"]["size"] == 224 and len(info["class_names"]) == 1000
    acc = info["accuracy"]
    assert acc["cloud_onnx_vs_torch_max_rel_l2_error"] <= 1e-4
    assert acc["edge_int8_rel_l2_error"] <= 0.05
    assert acc["float_top1_in_int8_top5"] >= 0.9


def test_effnet_bundle_input_is_the_exact_pixel_grid(effnet_bundle):
    """EfficientNet-Lite's (p - 127)/128 pixels are int8 values p - 128 exactly: the TFLite model's input
    has that grid (not the calibrated one, nor one QAT learned) and quantizing real photos loses nothing."""
    out, info = effnet_bundle
    inp = tflite_export.tflite_io_details(out / "edge.tflite")["input"]
    assert inp["scale"] == pytest.approx(1 / 128, rel=1e-6) and inp["zero_point"] == -1
    assert info["edge"]["quantization"]["input"].startswith("exact")
    from lwfc.images import preprocess as device_preprocess
    from lwfc.images import resize_crop
    from lwfc_convert.datasets import load_photo, photo_paths

    img = load_photo(photo_paths()["skimage/coffee"])
    x = device_preprocess(img, info["preprocessing"])[0]  # NHWC float, what the board computes
    q = np.round(x / inp["scale"]) + inp["zero_point"]
    pre = info["preprocessing"]
    pixels = np.asarray(resize_crop(img, pre["resize"], pre["size"])).astype(int)
    assert np.array_equal(q, pixels - 128)
    assert np.abs((q - inp["zero_point"]) * inp["scale"] - x).max() < 1e-6
    # The deployed halves still see espresso in the coffee photo and a cat in Chelsea.
    from lwfc_convert.datasets import photos

    x, _ = next(iter(photos(zoo.preprocess_fn("efficientnet_lite0"), names=["skimage/coffee", "skimage/chelsea"],
                            progress=False)))
    pred = _run_bundle(out, info, x).argmax(1)
    names = info["class_names"]
    assert names[pred[0]] == "espresso"
    assert names[pred[1]] in {"tabby", "tiger cat", "Egyptian cat", "Persian cat", "Siamese cat"}


def test_lwfc_info_prints_bundle(resnet_bundle, capsys):
    from lwfc_host.cli import main

    out, info = resnet_bundle
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "resnet_fmnist" in text and "stage2" in text and "int8_edge_float_cloud_accuracy" in text
    assert "int8 error budget" in text and "output rounding alone" in text
    assert "int8 check: float_accuracy - int8_edge_float_cloud_accuracy" in text
    assert "computed now" not in text


def test_lwfc_info_judges_a_bundle_older_than_the_int8_check(resnet_bundle, tmp_path, capsys):
    """A bundle.json written before int8_check existed is judged on the metrics it recorded."""
    import shutil

    from lwfc_host.cli import main

    out, info = resnet_bundle
    old = tmp_path / "old"
    shutil.copytree(out, old)
    acc = dict(info["accuracy"], int8_edge_float_cloud_accuracy=info["accuracy"]["float_accuracy"] - 0.01)
    legacy = {k: v for k, v in info.items() if k != "int8_check"} | {"accuracy": acc}
    (old / "bundle.json").write_text(json.dumps(legacy))
    assert main(["info", str(old)]) == 0
    text = capsys.readouterr().out
    assert "= 0.01 (OUTSIDE <= 0.005" in text and "computed now from the recorded metrics" in text


def test_int8_check_thresholds():
    """`lwfc convert` warns when the int8 edge half costs the task more than the thresholds."""
    det = {"images": 544, "map50_int8_vs_float": 0.96, "recall_int8_vs_float": 0.95,
           "precision_int8_vs_float": 0.97, "reference_detections": 279}
    ok = bundle.int8_check(det, detector=True)
    assert ok["passed"] and ok["warnings"] == [] and ok["threshold"] == 0.95
    assert "interval90" not in ok  # metrics without the photo bootstrap
    spread = bundle.int8_check({**det, "map50_int8_vs_float_interval90": [0.93, 0.99]}, detector=True)
    assert spread["interval90"] == [0.93, 0.99] and spread["passed"]  # the rule is on the value
    low = bundle.int8_check({**det, "map50_int8_vs_float": 0.93}, detector=True)
    assert not low["passed"] and "93.0% of the float model's mAP@0.5 on 544 views" in low["warnings"][0]
    few = bundle.int8_check({**det, "images": 17}, detector=True)
    assert few["passed"] and "17 views, fewer than the 544" in few["warnings"][0]
    labeled = {"images": 2000, "float_accuracy": 0.925, "int8_edge_float_cloud_accuracy": 0.919,
               "top1_agreement_int8_vs_float": 0.995}
    lost = bundle.int8_check(labeled, detector=False)
    assert not lost["passed"] and "0.60 pp" in lost["warnings"][0]
    assert bundle.int8_check({**labeled, "int8_edge_float_cloud_accuracy": 0.921}, detector=False)["passed"]
    photos = {"images": 32, "top1_agreement_int8_vs_float": 0.97}
    disagree = bundle.int8_check(photos, detector=False)
    assert disagree["metric"] == "top1_agreement_int8_vs_float" and not disagree["passed"]
    assert bundle.int8_check({**photos, "top1_agreement_int8_vs_float": 1.0}, detector=False)["passed"]
    # unlabeled views with the expected accuracy drop: either criterion passes; both failing warns of both
    ties = bundle.int8_check({**photos, "expected_top1_accuracy_drop": 0.0007}, detector=False)
    assert ties["metric"] == "expected_top1_accuracy_drop" and ties["passed"] and ties["warnings"] == []
    assert ties["top1_agreement_int8_vs_float"] == 0.97
    agreeing = {"images": 32, "top1_agreement_int8_vs_float": 0.995, "expected_top1_accuracy_drop": 0.02}
    assert bundle.int8_check(agreeing, detector=False)["passed"]
    both = bundle.int8_check({**photos, "expected_top1_accuracy_drop": 0.02}, detector=False)
    assert not both["passed"] and "97.0% of 32 views" in both["warnings"][0] and "2.00 pp" in both["warnings"][0]


def test_expected_accuracy_drop_weighs_a_flip_by_the_float_probabilities():
    """A flip between two near-equal classes costs their difference; a flip away from a sure class costs it."""
    tie = np.log(np.array([[0.50, 0.49, 0.01]]))
    assert bundle.expected_accuracy_drop(tie, tie[:, [1, 0, 2]]) == pytest.approx(0.01)
    sure = np.log(np.array([[0.98, 0.01, 0.01]]))
    assert bundle.expected_accuracy_drop(sure, sure[:, [1, 0, 2]]) == pytest.approx(0.97)
    both = np.concatenate([tie, sure])
    assert bundle.expected_accuracy_drop(both, both) == 0.0
    assert bundle.expected_accuracy_drop(both, both[:, [1, 0, 2]]) == pytest.approx((0.01 + 0.97) / 2)


def test_tflite_runtime_matches_ai_edge_litert(resnet_bundle, tmp_path):
    """Coral's stack uses tflite-runtime (needs numpy < 2): run the edge half there, in its own venv."""
    if not TFLITE_VENV_PYTHON.exists():
        pytest.skip("tflite-runtime venv absent: create it with `python -m venv converters/.venv-tflite && "
                    "converters/.venv-tflite/bin/pip install 'numpy<2' tflite-runtime==2.14.0`")
    out, info = resnet_bundle
    from lwfc_convert.datasets import fashion_mnist

    x, _ = next(iter(fashion_mnist("test", zoo.preprocess_fn("resnet_fmnist"), batch_size=16, progress=False)))
    d = info["edge"]["input"]
    x_nhwc = x.permute(0, 2, 3, 1).numpy()
    q_in = np.clip(np.round(x_nhwc / d["scale"]) + d["zero_point"], -128, 127).astype(np.int8)
    np.save(tmp_path / "in.npy", q_in)
    script = (
        "import sys, numpy as np\n"
        "from tflite_runtime.interpreter import Interpreter\n"
        "it = Interpreter(model_path=sys.argv[1]); it.allocate_tensors()\n"
        "i, o = it.get_input_details()[0], it.get_output_details()[0]\n"
        "x = np.load(sys.argv[2]); outs = []\n"
        "for k in range(len(x)):\n"
        "    it.set_tensor(i['index'], x[k:k+1]); it.invoke(); outs.append(it.get_tensor(o['index']).copy())\n"
        "np.save(sys.argv[3], np.concatenate(outs))\n"
    )
    subprocess.run([str(TFLITE_VENV_PYTHON), "-c", script, str(out / "edge.tflite"), str(tmp_path / "in.npy"),
                    str(tmp_path / "out.npy")], check=True, timeout=120)
    got = np.load(tmp_path / "out.npy")
    interp = make_interpreter(out / "edge.tflite")
    d_in, d_out = interp.get_input_details()[0], interp.get_output_details()[0]
    ref = []
    for k in range(len(q_in)):
        interp.set_tensor(d_in["index"], q_in[k : k + 1])
        interp.invoke()
        ref.append(interp.get_tensor(d_out["index"]).copy())
    ref = np.concatenate(ref)
    assert got.dtype == np.int8 and got.shape == ref.shape
    # Different kernels (XNNPACK in ai-edge-litert, reference kernels in tflite-runtime 2.14) round
    # intermediate requantizations differently: a few values move by a few steps, nothing more.
    diff = np.abs(got.astype(int) - ref.astype(int))
    z = info["edge"]["output"]["zero_point"]
    rel = np.linalg.norm(got.astype(float) - ref) / np.linalg.norm(ref.astype(float) - z)
    print(f"tflite-runtime vs ai-edge-litert: max {diff.max()} steps, {(diff <= 1).mean():.4f} within 1 step, "
          f"relative L2 {rel:.4f}")
    # measured with the QAT-tuned edge half: 95% within one step, max 5 steps, 2.4% (plain PTQ: 98%, 5, 1.2%);
    # on 200 test images both runtimes are 2.7% from the float edge half, so neither is the worse one
    assert (diff <= 1).mean() >= 0.93 and diff.max() <= 8 and rel <= 0.035


def test_convert_cli_errors(tmp_path, capsys):
    from lwfc_host.cli import main

    assert main(["convert", "--model", "nope", "--output", str(tmp_path / "b")]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
    assert main(["convert", "--model", "resnet_fmnist", "--split", "stage2.0.conv2",
                 "--output", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "valid split points" in err and "stage2" in err
    assert main(["info", str(tmp_path / "not_a_bundle")]) == 2


def test_export_failure_names_the_op(tmp_path):
    """An edge half with an op that has no TFLite lowering fails with a message naming it."""

    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)

        def forward(self, x):
            return torch.special.i0(self.conv(x))

    x = torch.randn(1, 1, 8, 8)
    with pytest.raises(tflite_export.ExportError, match="op aten.i0"):
        tflite_export.convert_edge_to_tflite(Odd().eval(), [torch.randn(4, 1, 8, 8)], x, tmp_path / "x.tflite",
                                             progress=False)


def test_qat_images_fall_back_to_whole_images_when_crops_do_not_run():
    """QAT on crops (the detector's recipe) needs an edge half that runs on a crop; one whose shapes are fixed to
    the whole image (CenterNet up to its head) fine-tunes on as many whole images as the crops hold pixels."""
    from lwfc_convert.zoo import QatRecipe

    class Fixed(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[:, :, torch.tensor([63])]  # index 63: only whole 64-px images have it

    calib = [torch.rand(4, 3, 64, 64), torch.rand(4, 3, 64, 64)]
    recipe = QatRecipe(crop=16, crops=32)
    images, described = bundle.qat_images(Fixed(), calib, recipe)
    assert len(images) == 1 and images[0].shape == (2, 3, 64, 64)  # 32 crops of 16 px = 2 images of 64 px
    assert described.startswith("2 whole calibration images") and "IndexError" in described
    images, described = bundle.qat_images(torch.nn.Conv2d(3, 4, 3), calib, recipe)
    assert images[0].shape == (32, 3, 16, 16) and described.startswith("32 random 16 x 16 crops")
    assert bundle.qat_images(Fixed(), calib, QatRecipe()) == (calib, None)
