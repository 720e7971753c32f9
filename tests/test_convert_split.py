"""Splitting models into edge and cloud halves; `lwfc layers`."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="converter tests need torch (pip install '.[convert]')")

from lwfc_convert import split as sp  # noqa: E402
from lwfc_convert import zoo  # noqa: E402


@pytest.fixture(scope="module")
def resnet():
    return zoo.load_model("resnet_fmnist")


@pytest.fixture(scope="module")
def effnet():
    return zoo.load_model("efficientnet_lite0")


@pytest.mark.parametrize("at", ["stem", "stage1.0", "stage1", "stage2", "stage2.0", "stage3"])
def test_resnet_split_is_exact(resnet, at):
    edge, cloud = sp.split(resnet, at)
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(cloud(edge(x)), resnet(x), atol=1e-5, rtol=0)
        assert edge(x).dim() == 4


@pytest.mark.parametrize("at", ["_blocks.0", "_blocks.8._expand_act", "_blocks.10", "_blocks.15"])
def test_effnet_split_is_exact(effnet, at):
    edge, cloud = sp.split(effnet, at)
    x = torch.rand(2, 3, 224, 224) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(cloud(edge(x)), effnet(x), atol=1e-5, rtol=0)


def test_split_inside_residual_block_is_refused_with_valid_list(resnet):
    with pytest.raises(sp.SplitError) as exc:
        sp.split(resnet, "stage2.0.conv1")  # the skip connection crosses this cut
    msg = str(exc.value)
    assert "stage2.0.conv1" in msg and "valid split points" in msg and "stage2" in msg


def test_unknown_split_point(resnet):
    with pytest.raises(sp.SplitError, match="is not a module of the model.*stage3"):
        sp.split(resnet, "stage7")


def test_split_points_shapes_and_activations():
    points = {p: (shape, act) for p, shape, act in sp.split_points("resnet_fmnist")}
    assert points["stage1"] == ((24, 28, 28), "relu")
    assert points["stage2"] == ((48, 14, 14), "relu")
    assert points["stage3"] == ((96, 7, 7), "relu")
    eff = {p: (shape, act) for p, shape, act in sp.split_points("efficientnet_lite0")}
    assert eff["_blocks.8._expand_act"] == ((480, 14, 14), "relu6")
    assert eff["_blocks.10"] == ((112, 14, 14), "linear")  # projection + skip: signed values
    assert "_blocks.9._expand_act" not in eff  # inside a residual block


def test_lwfc_layers_cli(capsys):
    from lwfc_host.cli import main

    assert main(["layers", "--model", "resnet_fmnist"]) == 0
    out = capsys.readouterr().out
    assert "stage2" in out and "(48, 14, 14)" in out and "relu" in out


def test_lwfc_layers_unknown_model(capsys):
    from lwfc_host.cli import main

    assert main(["layers", "--model", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'nope'" in err and "resnet_fmnist" in err


def test_squeezenet_fire_outputs_are_relu():
    points = {p: (shape, act) for p, shape, act in sp.split_points("squeezenet1_1")}
    assert points["fire5"] == ((256, 27, 27), "relu")  # concatenation of two ReLU branches
    assert points["fire3"] == ((128, 56, 56), "relu")
