"""Rate-aware fine-tuning of resnet_fmnist (lwfc_convert.rate_training) on a few hundred real Fashion-MNIST
images: the rate term makes the split tensor sparser than the same fine-tuning without it, and the command line
refuses the options where they do not apply."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="converter tests need torch (pip install '.[convert]')")

from lwfc_convert import datasets  # noqa: E402
from lwfc_convert.rate_training import finetune_for_rate  # noqa: E402
from lwfc_host.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def fmnist() -> None:
    try:
        datasets.load_fashion_mnist_arrays("train")
    except datasets.DatasetMissing as exc:
        pytest.skip(str(exc))


def test_the_rate_term_makes_the_split_tensor_sparser(fmnist, tmp_path):
    """The same seed and data with and without the rate term: only the rate term changes the split tensor's
    statistics this much; the summary's "before" is the committed model, the same for both."""
    runs = {}
    for weight in (0.0, 50.0):
        runs[weight] = finetune_for_rate(tmp_path / f"w{weight}.pt", rate_weight=weight, epochs=1, seed=1,
                                         threads=1, progress=False, train_limit=512, validation_limit=300)
    assert runs[0.0]["before"] == runs[50.0]["before"]
    plain, rate = runs[0.0]["after"]["validation"], runs[50.0]["after"]["validation"]
    assert rate["mean_abs"] < 0.8 * plain["mean_abs"]
    assert rate["nonzero"] < plain["nonzero"]
    saved = torch.load(runs[50.0]["path"], weights_only=True)
    assert "stage2.0.conv1.weight" in saved and runs[50.0]["train_images"] == 512


@pytest.mark.parametrize("args, message", [
    (["--model", "efficientnet_lite0_fmnist", "--rate-weight", "1"], "only for --model resnet_fmnist"),
    (["--model", "resnet_fmnist", "--rate-split", "stage3"], "go with --rate-weight"),
    (["--model", "resnet_fmnist", "--rate-weight", "-1"], "--rate-weight must be >= 0"),
    (["--model", "resnet_fmnist_rate"], "lwfc train --model resnet_fmnist --rate-weight 1"),
])
def test_train_refuses_rate_options_where_they_do_not_apply(args, message, capsys):
    assert main(["train", *args]) == 2
    assert message in capsys.readouterr().err
