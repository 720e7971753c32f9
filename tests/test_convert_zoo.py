"""Model zoo, data sets and weight loading (converters/lwfc_convert)."""

from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="converter tests need torch (pip install '.[convert]')")

from lwfc_convert import datasets, zoo  # noqa: E402

CAT_CLASSES = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}


def test_list_models():
    names = zoo.list_models()
    for n in ("resnet_fmnist", "efficientnet_lite0", "efficientnet_lite0_fmnist", "squeezenet1_1"):
        assert n in names


def test_cli_help_names_every_zoo_model():
    from lwfc_host.cli.convert import ZOO_MODELS

    assert list(ZOO_MODELS) == zoo.list_models()


def test_unknown_model_lists_known_names():
    with pytest.raises(zoo.UnknownModel) as exc:
        zoo.load_model("resnet9000")
    msg = str(exc.value)
    assert "resnet9000" in msg and "efficientnet_lite0" in msg and "resnet_fmnist" in msg


def test_imagenet_classes_file():
    names = zoo.imagenet_classes()
    assert len(names) == 1000
    assert names[0] == "tench" and names[967] == "espresso"


def _top1(name: str) -> dict[str, str]:
    model = zoo.load_model(name)
    classes = zoo.get_spec(name).classes()
    wanted = ["skimage/coffee", "skimage/chelsea"]
    out = {}
    for x, _ in datasets.photos(zoo.preprocess_fn(name), names=wanted, progress=False):
        with torch.no_grad():
            pred = model(x).argmax(1).tolist()
        out.update({n: classes[p] for n, p in zip(wanted, pred)})
    return out


@pytest.mark.parametrize("name", ["efficientnet_lite0", "squeezenet1_1"])
def test_imagenet_models_predict_what_a_person_expects(name):
    pytest.importorskip("skimage", reason="the photos ship with scikit-image")
    top1 = _top1(name)
    assert top1["skimage/coffee"] == "espresso"
    assert top1["skimage/chelsea"] in CAT_CLASSES


def test_exact_int8_input_grids():
    from lwfc_convert.preprocess import exact_int8_input

    # EfficientNet-Lite's (p - 127)/128: q = p - 128 with scale 1/128 and zero point -1
    assert exact_int8_input(zoo.get_spec("efficientnet_lite0").preprocess) == (1 / 128, -1)
    # raw 0..255 pixels (the CenterNet detector): scale 1, zero point -128
    assert exact_int8_input(zoo.get_spec("centernet_mbv3_coco").preprocess) == (1.0, -128)
    # x = (p - 127.5)/127.5 falls halfway between int8 steps; per-channel Caffe means differ; Fashion-MNIST's
    # mean is fractional and the backbone's grey images are resampled: no exact grid
    assert exact_int8_input({"kind": "rgb", "size": 8, "mean": [0.5] * 3, "std": [0.5] * 3}) is None
    assert exact_int8_input(zoo.get_spec("squeezenet1_1").preprocess) is None
    assert exact_int8_input(zoo.get_spec("resnet_fmnist").preprocess) is None
    assert exact_int8_input(zoo.get_spec("efficientnet_lite0_fmnist").preprocess) is None
    assert exact_int8_input({"kind": "caffe", "size": 8, "mean": [128.0] * 3}) == (1.0, 0)


def test_efficientnet_definition_is_faithful():
    model = zoo.load_model("efficientnet_lite0")
    acts = {type(m).__name__ for m in model.modules()}
    assert "ReLU6" in acts and "SiLU" not in acts and "Sigmoid" not in acts  # Lite: no swish, no SE
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(m.eps == 1e-3 for m in bns)
    # TF "SAME" padding: stride-2 3x3 conv on 224 px pads 0 before and 1 after.
    assert model._conv_stem.static_padding.padding == (0, 1, 0, 1)


def test_fashion_mnist_loader():
    pytest.importorskip("tqdm")
    try:
        loader = datasets.fashion_mnist("test", batch_size=100, limit=300, progress=False)
    except datasets.DatasetMissing as exc:
        pytest.skip(str(exc))
    batches = list(loader)
    assert len(batches) == 3
    x, y = batches[0]
    assert x.shape == (100, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert 0 <= int(y.min()) and int(y.max()) <= 9
    train_x, train_y = datasets.load_fashion_mnist_arrays("train")
    assert train_x.shape == (60000, 28, 28) and train_y.shape == (60000,)


def test_idx_reader_rejects_truncated_file(tmp_path):
    header = struct.pack(">HBB", 0, 8, 3) + struct.pack(">III", 10, 28, 28)
    path = tmp_path / "bad-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(header + bytes(28 * 28 * 3))  # 3 of 10 images
    with pytest.raises(ValueError, match="truncated"):
        datasets.read_idx(path)


def test_photo_loader_yields_preprocessed_batches():
    pytest.importorskip("skimage")
    loader = datasets.photos(zoo.preprocess_fn("efficientnet_lite0"), batch_size=4, progress=False)
    x, y = next(iter(loader))
    assert x.shape[1:] == (3, 224, 224) and float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    assert (y == -1).all()


def test_truncated_weight_file_is_a_clear_error(tmp_path):
    good = zoo.WEIGHTS_DIR / "resnet_fmnist.pt"
    data = good.read_bytes()
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(zoo.WeightsError, match="unreadable or truncated"):
        zoo.load_state_dict(bad)
    with pytest.raises(zoo.WeightsError, match="does not exist"):
        zoo.load_state_dict(tmp_path / "missing.pt")


def test_mismatched_weights_are_a_clear_error(tmp_path):
    from lwfc_convert.resnet_fmnist import ResNetFMNIST

    sd = zoo.load_state_dict(zoo.WEIGHTS_DIR / "resnet_fmnist.pt")
    sd.pop("fc.bias")
    with pytest.raises(zoo.WeightsError, match="do not match"):
        zoo.load_strict(ResNetFMNIST(), sd, "test")


def test_restricted_unpickler_refuses_other_globals(tmp_path):
    from lwfc_convert.squeezenet import load_numpy_pickle

    ok = tmp_path / "ok.pkl"
    ok.write_bytes(pickle.dumps({"a": [np.arange(3.0), np.zeros(2)]}))
    assert load_numpy_pickle(ok)["a"][0].tolist() == [0.0, 1.0, 2.0]
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"a": print}))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        load_numpy_pickle(evil)


def test_effnet_fmnist_head_is_accurate():
    """The frozen ImageNet backbone + trained head classifies Fashion-MNIST (91.62% on the 10,000 test images,
    91.5% on these 200; the head trained on 2,000 images only reached 85%)."""
    try:
        loader = zoo.dataset("efficientnet_lite0_fmnist", "test", batch_size=100, limit=200, progress=False)
    except datasets.DatasetMissing as exc:
        pytest.skip(str(exc))
    model = zoo.load_model("efficientnet_lite0_fmnist")
    correct = n = 0
    for x, y in loader:
        assert x.shape[1:] == (3, 112, 112)
        with torch.no_grad():
            correct += int((model(x).argmax(1) == y).sum())
        n += len(y)
    assert correct / n >= 0.88


def test_the_rate_model_is_as_accurate_and_sparser_at_stage2():
    """resnet_fmnist_rate (fine-tuned for the codec) keeps the task (92.48% on all 10,000 test images, the
    original 92.53%) with far fewer non-zero stage 2 elements (11% against 29%); here the first 1,000."""
    from lwfc_convert.rate_training import split_statistics

    try:
        images, labels = datasets.load_fashion_mnist_arrays("test")
    except datasets.DatasetMissing as exc:
        pytest.skip(str(exc))
    assert zoo.get_spec("resnet_fmnist_rate").fine_tuned_from == "resnet_fmnist"
    stats = {name: split_statistics(zoo.load_model(name), "stage2", images[:1000], labels[:1000])
             for name in ("resnet_fmnist", "resnet_fmnist_rate")}
    assert stats["resnet_fmnist_rate"]["accuracy"] >= stats["resnet_fmnist"]["accuracy"] - 0.01
    assert stats["resnet_fmnist_rate"]["nonzero"] < 0.5 * stats["resnet_fmnist"]["nonzero"]
