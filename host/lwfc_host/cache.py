"""Where lwfc keeps what it can rebuild: converted bundles, npm packages, reference outputs."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$LWFC_CACHE`` if set, else ``~/.cache/lwfc``."""
    root = os.environ.get("LWFC_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "lwfc"
