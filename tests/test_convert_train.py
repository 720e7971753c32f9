"""Training recipes are reproducible from a seed (tiny runs; the committed weights use the full recipe)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="converter tests need torch (pip install '.[convert]')")

from lwfc_convert import datasets  # noqa: E402
from lwfc_convert.train import train_resnet_fmnist  # noqa: E402


def test_resnet_training_is_reproducible(tmp_path):
    try:
        datasets.load_fashion_mnist_arrays("test")
    except datasets.DatasetMissing as exc:
        pytest.skip(str(exc))
    runs = []
    for k in range(2):
        res = train_resnet_fmnist(tmp_path / f"w{k}.pt", epochs=1, seed=3, threads=1, progress=False,
                                  train_limit=256, test_limit=200)
        runs.append(torch.load(res["path"], weights_only=True))
    assert runs[0].keys() == runs[1].keys()
    for key in runs[0]:
        assert torch.equal(runs[0][key], runs[1][key]), key
