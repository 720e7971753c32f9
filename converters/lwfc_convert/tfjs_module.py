"""The torch module a TF.js graph becomes (``tfjs.convert`` fills it): its op modules sit in a module tree
that mirrors the TF name scopes, and ``forward`` runs them in the graph's order."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .tfjs_ops import TO_NHWC


class TfjsModule(nn.Module):
    """A converted TF.js graph. ``forward(x)`` takes the input as NCHW (``N, C, H, W``) when the graph's
    input is a 4-D NHWC image tensor (any other input in TF layout) and returns the requested outputs
    (one tensor, or a tuple) in TF layout (NHWC), or NCHW for 4-D outputs when built with
    ``nchw_outputs=True``.

    ``module_path(tf_name)`` gives the module path of a TF node; ``tf_name(path)`` the reverse."""

    def __init__(self) -> None:
        super().__init__()
        self._steps: list[tuple[str, list[str], list[str]]] = []
        self._input_name = ""
        self._outputs: list[tuple[str, bool]] = []  # (value name, permute NCHW -> NHWC on return)
        self._paths: dict[str, str] = {}
        self._const_outputs: dict[str, torch.Tensor] = {}
        self.input_nchw = True

    def module_path(self, tf_name: str) -> str:
        return self._paths[tf_name]

    def tf_name(self, path: str) -> str:
        for k, v in self._paths.items():
            if v == path:
                return k
        raise KeyError(path)

    def forward(self, x: torch.Tensor) -> Any:
        env: dict[str, torch.Tensor] = {self._input_name: x}
        for path, ins, outs in self._steps:
            result = self.get_submodule(path)(*[env[i] for i in ins])
            if len(outs) == 1:
                env[outs[0]] = result
            else:
                for o, r in zip(outs, result):
                    env[o] = r
        results = []
        for name, permute in self._outputs:
            t = env[name] if name in env else self._const_outputs[name]
            results.append(t.permute(*TO_NHWC) if permute else t)
        return results[0] if len(results) == 1 else tuple(results)

