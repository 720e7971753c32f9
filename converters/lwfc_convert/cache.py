"""Where lwfc keeps what it can rebuild: converted bundles, npm packages, reference outputs."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator


def cache_root() -> Path:
    """``$LWFC_CACHE`` if set, else ``~/.cache/lwfc``."""
    root = os.environ.get("LWFC_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "lwfc"


@contextlib.contextmanager
def cache_lock(path: Path) -> Iterator[None]:
    """An exclusive lock file: parallel processes (demos, test workers on a fresh machine) then install,
    convert or design a cached thing once while the others wait."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
