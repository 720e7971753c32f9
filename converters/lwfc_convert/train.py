"""Training on Fashion-MNIST: the small ResNet (``resnet_fmnist``) and the linear head on top of the
frozen EfficientNet-Lite0 backbone (``efficientnet_lite0_fmnist``). Both are reproducible from a seed
(single-process CPU training with a fixed thread count)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

WEIGHTS_DIR = Path(__file__).parent / "weights"


def _evaluate(model: Any, images: np.ndarray, labels: np.ndarray, preprocess: Any, batch: int = 500) -> float:
    import torch

    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(labels), batch):
            x = preprocess(images[i : i + batch])
            correct += int((model(x).argmax(1).numpy() == labels[i : i + batch]).sum())
    return correct / len(labels)


def train_resnet_fmnist(
    output: str | Path | None = None,
    epochs: int = 8,
    seed: int = 0,
    batch_size: int = 128,
    lr: float = 0.1,
    threads: int = 2,
    progress: bool = True,
) -> dict[str, Any]:
    """Train :class:`ResNetFMNIST` with SGD + one-cycle LR, random 2-pixel shifts and horizontal flips.

    Returns a summary (test accuracy, seconds, path). The state dict is saved to ``output``
    (default: the package's weights/resnet_fmnist.pt)."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from .datasets import load_fashion_mnist_arrays
    from .resnet_fmnist import MEAN, STD, ResNetFMNIST

    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    rng = np.random.default_rng(seed)
    tr_x, tr_y = load_fashion_mnist_arrays("train")
    te_x, te_y = load_fashion_mnist_arrays("test")
    model = ResNetFMNIST()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = epochs * ((len(tr_y) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.2)

    def norm(a: np.ndarray) -> torch.Tensor:
        return (torch.from_numpy(a.astype(np.float32))[:, None] / 255.0 - MEAN) / STD

    t0 = time.time()
    for epoch in range(epochs):
        model.train()
        order = rng.permutation(len(tr_y))
        padded = np.pad(tr_x, ((0, 0), (2, 2), (2, 2)))
        bar = tqdm(range(0, len(order), batch_size), desc=f"epoch {epoch + 1}/{epochs}", disable=not progress)
        for i in bar:
            idx = order[i : i + batch_size]
            # Augmentation: random shift by up to 2 pixels and random horizontal flip.
            dx, dy = rng.integers(0, 5, size=2)
            xb = padded[idx, dy : dy + 28, dx : dx + 28]
            flip = rng.random(len(idx)) < 0.5
            xb = np.where(flip[:, None, None], xb[:, :, ::-1], xb)
            x = norm(xb)
            y = torch.from_numpy(tr_y[idx])
            loss = F.cross_entropy(model(x), y, label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        acc = _evaluate(model, te_x, te_y, norm)
        print(f"epoch {epoch + 1}: test accuracy {acc:.4f} ({time.time() - t0:.0f} s)", flush=True)
    out = Path(output) if output else WEIGHTS_DIR / "resnet_fmnist.pt"
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out)
    return {"model": "resnet_fmnist", "test_accuracy": acc, "seconds": time.time() - t0, "path": str(out),
            "epochs": epochs, "seed": seed}
