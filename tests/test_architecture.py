"""The layers of DESIGN.md hold: `lint-imports` checks the contracts in pyproject.toml (host -> converters ->
device; the device imports only the standard library outside its board-runner modules; no import circles).
A wrong arrow fails here, with import-linter's own report of the offending import chain."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept():
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "BROKEN" not in proc.stdout
    assert "KEPT" in proc.stdout  # the contracts were read and checked, not skipped
