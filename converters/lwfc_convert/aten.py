"""The aten ops of ``torch.export`` graphs that the int8 conversion treats specially, by name.

Shared by the PT2E quantizer (``tflite_export``: which nodes it annotates, and how) and the QAT fine-tuning
(``qat``: which quantizers TFLite makes share one scale). The names are those of the ops' overloads
(``node.target.__name__``), e.g. ``"relu6.default"``.
"""

from __future__ import annotations

from typing import Any

CONV_TARGETS = ("conv1d.default", "conv2d.default", "convolution.default")
ACT_TARGETS = ("relu.default", "relu_.default", "relu6.default", "hardtanh.default", "hardtanh_.default")
# Activations TFLite runs as ops of their own (HARD_SWISH), never fused into the convolution before them.
STANDALONE_ACT_TARGETS = ("hardswish.default", "hardswish_.default")
ADD_TARGETS = ("add.Tensor", "add_.Tensor")
# Ops TFLite runs without rescaling: their output keeps their input's scale and zero point (a pad writes the
# zero point, a max picks one of the inputs).
SHARE_TARGETS = ("constant_pad_nd.default", "pad.default", "max_pool2d.default",
                 "max_pool2d_with_indices.default")
# A concatenation: all inputs and the output share one scale (TFLite CONCATENATION without rescaling).
CAT_TARGETS = ("cat.default",)


def aten_name(node: Any) -> str:
    """The overload name of an fx node's target (``"relu6.default"``), or "" for targets without one."""
    return getattr(node.target, "__name__", "") or ""
