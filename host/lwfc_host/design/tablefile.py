"""Writing table files: canonical content, table id, integer model frequencies (SPEC.md, section 3).

Reading and validating a table is the device's job (``lwfc.tables``); the host adds the one check the
device cannot afford: that ``table_id`` is the hash of the canonical content.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from lwfc.errors import TableError
from lwfc.tables import FORMAT, MAX_LEVELS_V1, TOTAL, Tables, parse_tables


def canonical_bytes(table: dict) -> bytes:
    """The canonical serialisation the table id hashes: every field but ``table_id``, keys sorted,
    no white space, ASCII, floats in Python's shortest round-trip form."""
    content = {k: v for k, v in table.items() if k != "table_id"}
    return json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def compute_table_id(table: dict) -> str:
    """First 4 bytes of SHA-256 of the canonical content, as 8 lower-case hex digits."""
    return hashlib.sha256(canonical_bytes(table)).hexdigest()[:8]


V2_CONTEXT_FIELDS = ("reference_channel", "reference_classes", "reference_class")


def needs_version_2(table: dict) -> bool:
    """Whether ``table`` uses what only version 2 tables may: reference channels (any of their fields), more
    than 16 levels, or more neighbour classes than K^2 N <= 256 allows."""
    ctx = table.get("contexts") or {}
    n, k = table.get("levels"), ctx.get("classes")
    if any(f in ctx for f in V2_CONTEXT_FIELDS):
        return True
    if isinstance(n, int) and n > MAX_LEVELS_V1:
        return True
    return isinstance(n, int) and isinstance(k, int) and k * k * n > 256


def as_version_2(table: dict) -> dict:
    """A copy of ``table`` with the version 2 context fields it lacks at their "no references" values: every
    reference_channel -1, one reference class, every reference_class 0 (the context numbers of a version 1
    table, SPEC.md 4.2)."""
    out = dict(table)
    ctx = dict(out.get("contexts") or {})
    if isinstance(out.get("channels"), int):
        ctx.setdefault("reference_channel", [-1] * out["channels"])
    ctx.setdefault("reference_classes", 1)
    if isinstance(out.get("levels"), int):
        ctx.setdefault("reference_class", [0] * (out["levels"] + 1))
    out["contexts"] = ctx
    return out


def finalize(table: dict, version: int | None = None) -> dict:
    """Return a copy of ``table`` with format, version and table_id set, validated.

    The version is 2 where the table uses version 2 fields or limits (``needs_version_2``; its missing
    version 2 fields are added at their "no references" values) or ``version`` = 2 asks for it, else 1, so
    that version 1 devices keep reading every table that does not need more. ``version`` = 1 refuses a table
    that needs version 2 (TableError)."""
    if version not in (None, 1, 2):
        raise ValueError(f"table version must be 1 or 2, got {version!r}")
    v2 = needs_version_2(table)
    if version == 1 and v2:
        raise TableError("the table needs version 2 (reference channels, more than 16 levels or K*K*levels > 256)")
    out = as_version_2(table) if v2 or version == 2 else dict(table)
    out["format"] = FORMAT
    out["version"] = 2 if v2 or version == 2 else 1
    out["table_id"] = "00000000"
    Tables(out)  # validate with the device's own reader first: a NaN is a TableError, not a hashing error
    out["table_id"] = compute_table_id(out)
    return out


def load_verified(path: str | Path) -> Tables:
    """Load a table file, validate it, and check that its table_id matches its content."""
    try:
        text = Path(path).read_bytes()
    except OSError as exc:
        raise TableError(f"cannot read table file {path}: {exc.strerror}") from exc
    try:
        tables = parse_tables(text)  # the device's reader: duplicate keys, non-finite numbers, types
    except TableError as exc:
        raise TableError(f"table file {path}: {exc}") from exc
    expected = compute_table_id(tables.raw)
    if tables.table_id_hex() != expected:
        raise TableError(f"table_id {tables.table_id_hex()} does not match the content's hash {expected}: "
                         "the file was edited after it was written")
    return tables


def write_tables(table: dict, path: str | Path) -> dict:
    """Finalize and write a table file (indented JSON; the id does not depend on formatting)."""
    final = finalize(table)
    Path(path).write_text(json.dumps(final, indent=1, sort_keys=True) + "\n")
    return final


def integer_frequencies(counts, total: int = TOTAL) -> list[int]:
    """Scale non-negative counts to integer frequencies, each >= 1, summing exactly to ``total``.

    Add-half smoothing first (so that no symbol has zero probability), then largest-remainder rounding
    of the part above the floor of 1 per symbol."""
    c = np.asarray(counts, dtype=np.float64) + 0.5
    n = len(c)
    if n < 1 or n > total:
        raise ValueError("need between 1 and total symbols")
    spare = total - n
    ideal = c / c.sum() * spare
    base = np.floor(ideal).astype(np.int64)
    short = spare - int(base.sum())
    order = np.argsort(-(ideal - base), kind="stable")
    base[order[:short]] += 1
    freqs = (base + 1).tolist()
    assert sum(freqs) == total
    return [int(f) for f in freqs]
