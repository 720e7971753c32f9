"""Rate-aware fine-tuning: a model whose split tensor the codec codes in fewer bits at the same accuracy.

On a ReLU split, lwfc's rate is set by how many elements quantize to a non-zero index and how large those
indices are: zero is the cheapest symbol in every context. Fine-tuning the whole model (edge and cloud halves)
on its labels with an L1 penalty on the split tensor added to the task loss drives more of those elements to
exactly zero and shrinks the rest, while the cloud half learns to read the sparser features. The codec does
not change; the features do. This is the "compressible features" training of collaborative intelligence
(Alvar and Bajić, ICIP 2019), with the simplest rate proxy.

The result is a new model and is judged like any other: ``lwfc convert`` and ``lwfc eval`` code its tensors
with lwfc and with every baseline, and its accuracy loss is counted against the original model's float
accuracy (see the notes in converters/NOTES.md). The rate weight is chosen on the last VALIDATION_IMAGES
training images, which the fine-tuning does not see, never on the test set.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .train import pad_for_shifts, resnet_input, shifted_and_flipped
from .zoo import RATE_WEIGHTS_FILE, RESNET_WEIGHTS_FILE, WEIGHTS_DIR, resnet_fmnist_from

VALIDATION_IMAGES = 10_000  # the last training images: held out from the fine-tuning, used to choose the weight


@contextmanager
def _outputs_of(module: Any) -> Iterator[list[Any]]:
    """A list that receives every output of ``module`` while the context is open (a forward hook)."""
    seen: list[Any] = []
    handle = module.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        yield seen
    finally:
        handle.remove()


def split_statistics(model: Any, split: str, images: np.ndarray, labels: np.ndarray,
                     batch: int = 500) -> dict[str, float]:
    """Top-1 accuracy of ``model`` on Fashion-MNIST ``images`` (N, 28, 28) uint8, and the mean absolute value
    and the fraction of non-zero elements of the output of its submodule ``split``."""
    import torch

    model.eval()
    correct, abs_sum, nonzero, elements = 0, 0.0, 0, 0
    with _outputs_of(model.get_submodule(split)) as seen, torch.no_grad():
        for i in range(0, len(labels), batch):
            seen.clear()
            logits = model(resnet_input(images[i : i + batch]))
            correct += int((logits.argmax(1).numpy() == labels[i : i + batch]).sum())
            f = seen[0]
            abs_sum += float(f.abs().sum())
            nonzero += int((f != 0).sum())
            elements += f.numel()
    return {"accuracy": correct / len(labels), "mean_abs": abs_sum / elements, "nonzero": nonzero / elements}


def finetune_for_rate(
    output: str | Path | None = None,
    split: str = "stage2",
    rate_weight: float = 1.0,
    epochs: int = 2,
    lr: float = 0.01,
    seed: int = 0,
    threads: int = 1,
    init: str | Path | None = None,
    progress: bool = True,
    train_limit: int | None = None,
    validation_limit: int | None = None,
) -> dict[str, Any]:
    """Fine-tune resnet_fmnist with loss = cross-entropy + ``rate_weight`` x mean |split tensor|.

    ``split``: the submodule whose output is the split tensor (``stage1``, ``stage2`` or ``stage3``).
    ``rate_weight``: nats of cross-entropy per unit of the split tensor's mean absolute value (the float
    model's activation units; the committed resnet_fmnist has 0.090 at stage2); 0 fine-tunes without the
    rate term. Training: the first 60,000 - VALIDATION_IMAGES training images (``train_limit`` fewer, for quick
    checks) with the ResNet's augmentation, SGD with Nesterov momentum from ``lr`` down a cosine to zero over
    ``epochs`` epochs, label smoothing 0.05, as ``train.train_resnet_fmnist`` trains it.
    ``init``: the weights to start from (default: the committed resnet_fmnist).

    Saves the state dict to ``output`` (default: the package's weights/resnet_fmnist_rate.pt) and returns a
    summary: accuracy, mean |split| and non-zero fraction on the validation images (the last
    VALIDATION_IMAGES training images, ``validation_limit`` of them) and on the test set, before and after."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from .datasets import load_fashion_mnist_arrays
    if rate_weight < 0:
        raise ValueError(f"rate_weight must be >= 0, got {rate_weight}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    rng = np.random.default_rng(seed)
    images, labels = load_fashion_mnist_arrays("train")
    n_train = len(labels) - VALIDATION_IMAGES
    tr_x, tr_y = images[:n_train][:train_limit], labels[:n_train][:train_limit]
    va_x, va_y = images[n_train:][:validation_limit], labels[n_train:][:validation_limit]
    te_x, te_y = load_fashion_mnist_arrays("test")
    te_x, te_y = te_x[:validation_limit], te_y[:validation_limit]
    init_path = Path(init) if init else WEIGHTS_DIR / RESNET_WEIGHTS_FILE
    model = resnet_fmnist_from(init_path)
    try:
        module = model.get_submodule(split)
    except AttributeError as exc:
        raise ValueError(f"resnet_fmnist has no submodule {split!r}: use stage1, stage2 or stage3") from exc
    before = {"validation": split_statistics(model, split, va_x, va_y),
              "test": split_statistics(model, split, te_x, te_y)}
    batch_size = 128
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = epochs * ((len(tr_y) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    padded = pad_for_shifts(tr_x)
    t0 = time.time()
    with _outputs_of(module) as seen:
        for epoch in range(epochs):
            model.train()
            order = rng.permutation(len(tr_y))
            bar = tqdm(range(0, len(order), batch_size), desc=f"epoch {epoch + 1}/{epochs}", disable=not progress)
            for i in bar:
                idx = order[i : i + batch_size]
                seen.clear()
                logits = model(resnet_input(shifted_and_flipped(padded, idx, rng)))
                task = F.cross_entropy(logits, torch.from_numpy(tr_y[idx]), label_smoothing=0.05)
                rate = seen[0].abs().mean()
                loss = task + rate_weight * rate
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                bar.set_postfix(task=f"{task.item():.3f}", mean_abs=f"{rate.item():.4f}")
    after = {"validation": split_statistics(model, split, va_x, va_y),
             "test": split_statistics(model, split, te_x, te_y)}
    out = Path(output) if output else WEIGHTS_DIR / RATE_WEIGHTS_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out)
    return {"model": "resnet_fmnist", "split": split, "rate_weight": rate_weight, "epochs": epochs, "lr": lr,
            "seed": seed, "init": str(init_path), "train_images": len(tr_y), "seconds": time.time() - t0,
            "path": str(out), "before": before, "after": after}
