"""Table files as JSON (SPEC.md 3.1-3.2): what a reader rejects, and the canonical serialisation the table id
hashes, checked against an independent transcription of the spec's rules."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil

import numpy as np
import pytest

from lwfc.errors import TableError
from lwfc.tables import Tables, duplicate_key, parse_tables
from lwfc_host.checks import conformance
from lwfc_host.design.tablefile import canonical_bytes, compute_table_id


@pytest.fixture(scope="module")
def table() -> dict:
    return json.loads((conformance.VECTOR_DIR / "odd_shape" / "tables.json").read_text())


def _text(obj: dict) -> str:
    return json.dumps(obj, indent=1)


def _with_member(text: str, member: str) -> str:
    """``text`` (a JSON object) with ``member`` (raw JSON, e.g. '"levels": 5') added after its opening brace."""
    return "{" + member + "," + text.lstrip()[1:]


# --- what a reader rejects -----------------------------------------------------------------------------------

def test_the_vector_table_parses(table):
    assert parse_tables(_text(table)).table_id_hex() == table["table_id"]


@pytest.mark.parametrize("member, needle", [
    ('"levels": 5', "duplicate key levels"),
    ('"design": {"a": 1, "a": 1}', "duplicate key design.a"),
    ('"design": {"a\\u0062": 1, "ab": 2}', "duplicate key design.ab"),  # equal after unescaping
    ('"design": [{"k": 1}, {"k": 2, "k": 3}]', r"duplicate key design\[1\].k"),
])
def test_duplicate_keys_are_rejected(table, member, needle):
    with pytest.raises(TableError, match=needle):
        parse_tables(_with_member(_text(table), member))


def test_duplicate_key_inside_a_known_field(table):
    text = _text(table).replace('"zero_point":', '"scale": 1.0, "zero_point":', 1)
    with pytest.raises(TableError, match="duplicate key int8.scale"):
        parse_tables(text)


def test_duplicate_key_scanner_ignores_strings_and_escapes():
    ok = b'{"a": "{\\"a\\": 1, \\"a\\": 2}", "b": ["a", "a", {}], "c": {"a": 1}, "\\\\": 0, "\\"": 1}'
    json.loads(ok)
    assert duplicate_key(ok) is None
    assert duplicate_key('{"x": [], "y": {"\u00e9": 1, "z": 0, "\u00e9": 2}}'.encode()) == "y.\u00e9"


@pytest.mark.parametrize("member, needle", [
    ('"design": {"rate": NaN}', r"design.rate is not a finite number \(nan\)"),
    ('"design": [1, Infinity]', r"design\[1\] is not a finite number \(inf\)"),
    ('"design": {"x": 1e400}', r"design.x is not a finite number \(inf\)"),
    ('"extra": -1e400', r"extra is not a finite number \(-inf\)"),
])
def test_non_finite_numbers_are_rejected_anywhere(table, member, needle):
    with pytest.raises(TableError, match=needle):
        parse_tables(_with_member(_text(table), member))


def test_non_finite_in_a_known_field_is_rejected(table):
    bad = copy.deepcopy(table)
    bad["reconstruction"][2] = float("inf")
    with pytest.raises(TableError, match=r"reconstruction\[2\] is not a finite number"):
        Tables(bad)


@pytest.mark.parametrize("where, key, value", [
    (None, "version", True), (None, "version", 1.0), (None, "channels", True), (None, "levels", 5.0),
    ("int8", "zero_point", True), ("float_input", "frac_bits", False), ("contexts", "groups", True),
    ("contexts", "classes", True), ("contexts", "classes", 2.0),
])
def test_integers_are_integers(table, where, key, value):
    bad = copy.deepcopy(table)
    (bad if where is None else bad[where])[key] = value
    with pytest.raises(TableError, match=key):
        Tables(bad)


@pytest.mark.parametrize("tid", ["ABCDEF01", " f f f f", "+1234567", "0x123456", "1234567", "123456789"])
def test_table_id_must_be_lower_case_hex(table, tid):
    bad = copy.deepcopy(table)
    bad["table_id"] = tid
    with pytest.raises(TableError, match="table_id must be 8 lower-case hex digits"):
        Tables(bad)


def test_invalid_utf8_and_deep_nesting_are_table_errors(table):
    text = _with_member(_text(table), '"note": "x"').encode()
    with pytest.raises(TableError, match="not valid JSON"):
        parse_tables(text.replace(b'"x"', b'"\xff"'))
    with pytest.raises(TableError, match="not valid JSON"):
        parse_tables(_with_member(_text(table), '"deep": ' + "[" * 100_000 + "]" * 100_000))


# --- the canonical serialisation (3.2), transcribed from the spec ----------------------------------------------

_SHORT = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _spec_string(s: str) -> str:
    out = []
    for ch in s:
        cp = ord(ch)
        if ch in _SHORT:
            out.append(_SHORT[ch])
        elif 0x20 <= cp <= 0x7E:
            out.append(ch)
        elif cp > 0xFFFF:
            cp -= 0x10000
            out.append(f"\\u{0xD800 + (cp >> 10):04x}\\u{0xDC00 + (cp & 0x3FF):04x}")
        else:
            out.append(f"\\u{cp:04x}")
    return '"' + "".join(out) + '"'


def _spec_float(v: float) -> str:
    if v == 0:
        return "-0.0" if math.copysign(1.0, v) < 0 else "0.0"
    sign = "-" if v < 0 else ""
    mantissa, exp = np.format_float_scientific(abs(v), unique=True).split("e")  # shortest round-trip digits
    digits = mantissa.replace(".", "").rstrip("0") or "0"
    e = int(exp)
    if -4 <= e < 16:
        if e >= 0:
            whole, frac = digits[:e + 1].ljust(e + 1, "0"), digits[e + 1:]
        else:
            whole, frac = "0", "0" * (-e - 1) + digits
        return sign + whole + "." + (frac or "0")
    body = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
    return f"{sign}{body}e{'-' if e < 0 else '+'}{abs(e):02d}"


def _spec_value(v) -> str:
    if v is True:
        return "true"
    if v is False:
        return "false"
    if v is None:
        return "null"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return _spec_float(v)
    if isinstance(v, str):
        return _spec_string(v)
    if isinstance(v, list):
        return "[" + ",".join(_spec_value(x) for x in v) + "]"
    return "{" + ",".join(_spec_string(k) + ":" + _spec_value(v[k]) for k in sorted(v)) + "}"


def spec_table_id(obj: dict) -> str:
    content = {k: v for k, v in obj.items() if k != "table_id"}
    return hashlib.sha256(_spec_value(content).encode("ascii")).hexdigest()[:8]


@pytest.mark.parametrize("name", [spec.name for spec in conformance.VECTORS])
def test_spec_transcription_gives_every_vector_its_table_id(name):
    obj = json.loads((conformance.VECTOR_DIR / name / "tables.json").read_text())
    assert spec_table_id(obj) == compute_table_id(obj) == obj["table_id"]


def test_the_spec_example():
    obj = json.loads('{"b": [1, 2.0, 1E2, 0.00001, "é/"], "a": true, "table_id": "01234567"}')
    assert canonical_bytes(obj) == b'{"a":true,"b":[1,2.0,100.0,1e-05,"\\u00e9/"]}'
    assert _spec_value({k: v for k, v in obj.items() if k != "table_id"}).encode() == canonical_bytes(obj)


def test_strings_keys_and_nesting_as_the_spec_says():
    obj = {"z": {"table_id": "kept", "\u00e9": [None, False], "B": "\x00\x1f\x7f\u2028\U0001f600/\"\\\b\f\n\r\t"},
           "A": -0, "table_id": "gone", "big": 10 ** 30, "neg": -0.0}
    assert _spec_value({k: v for k, v in obj.items() if k != "table_id"}).encode() == canonical_bytes(obj)
    assert b'"table_id":"kept"' in canonical_bytes(obj) and b"gone" not in canonical_bytes(obj)


def test_float_rule_matches_pythons_on_many_floats():
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2 ** 63, size=20000, dtype=np.uint64)
    bits |= rng.integers(0, 2, size=20000, dtype=np.uint64) << np.uint64(63)  # negative ones too
    values = [v for v in np.frombuffer(bits.tobytes(), dtype=np.float64).tolist() if math.isfinite(v)]
    values += [1e16, 9999999999999998.0, 1e15, 0.0001, 0.00001, 1e-4 * (1 - 2 ** -52), 123456.789, 2.0 ** 60,
               5e-324, 1.7976931348623157e308, 0.1, 1 / 3, 100.0, -2.5]
    for v in values:
        assert _spec_float(v) == json.dumps(v), v


def test_integer_and_float_literals_are_different_tables(table):
    as_float = copy.deepcopy(table)
    as_int = copy.deepcopy(table)
    as_int["clip_min"] = 0
    as_float["clip_min"] = 0.0
    Tables(as_int), Tables(as_float)  # both valid
    assert compute_table_id(as_int) != compute_table_id(as_float)
    assert spec_table_id(as_int) == compute_table_id(as_int)


# --- the same rejections under MicroPython --------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed (MicroPython runs under node)")
def test_micropython_reader_rejects_the_same(table):
    from lwfc_host.codec.micropython import device_files, run_micropython

    text = _text(table)
    bad = {
        "dup": _with_member(text, '"design": {"a": 1, "a": 2}').encode(),
        "inf": _with_member(text, '"design": {"x": 1e400}').encode(),
        "nan": _with_member(text, '"design": NaN').encode(),
        "bool": text.replace('"levels": 5', '"levels": true').encode(),
        "tid": text.replace(table["table_id"], table["table_id"].upper()).encode(),
        "utf8": _with_member(text, '"note": "\xff"').encode("latin-1"),
        "ok": text.encode(),
    }
    files = dict(device_files())
    for name, content in bad.items():
        files[f"/in/{name}.json"] = content
    script = (
        "from lwfc.tables import parse_tables\n"
        "from lwfc.errors import TableError\n"
        f"for name in {sorted(bad)!r}:\n"
        "    with open('/in/%s.json' % name, 'rb') as f:\n"
        "        data = f.read()\n"
        "    try:\n"
        "        print(name, 'ok', parse_tables(data).table_id_hex())\n"
        "    except TableError as exc:\n"
        "        print(name, 'TableError', exc)\n"
    )
    lines = dict(line.split(" ", 1) for line in run_micropython(script, files).strip().splitlines())
    assert lines["ok"] == "ok " + table["table_id"]
    assert lines["dup"] == "TableError duplicate key design.a: a key may occur only once in each JSON object"
    assert lines["inf"] == "TableError design.x is not a finite number (inf)"
    assert lines["nan"].startswith("TableError table file is not valid JSON")  # not JSON: MicroPython agrees
    assert lines["bool"].startswith("TableError levels must be an integer in 2..16, found True")
    assert lines["tid"].startswith("TableError table_id must be 8 lower-case hex digits")
    assert lines["utf8"].startswith("TableError table file is not valid JSON")


def test_the_host_reads_table_files_with_the_device_reader(tmp_path, table):
    """lwfc_host.design.tablefile: load_verified refuses what the device refuses (it used to parse with plain
    json.loads, so a duplicate "levels" loaded on the host as the last value), and finalize reports a NaN as a
    TableError, not a hashing error."""
    from lwfc_host.design.tablefile import finalize, load_verified

    text = json.dumps(table)
    bad = tmp_path / "dup.json"
    bad.write_text('{"levels": 3, ' + text[1:])
    with pytest.raises(TableError, match="dup.json: duplicate key levels"):
        load_verified(bad)
    good = tmp_path / "good.json"
    good.write_text(text)
    assert load_verified(good).table_id_hex() == table["table_id"]
    nan = copy.deepcopy(table)
    nan["clip_max"] = float("nan")
    with pytest.raises(TableError):
        finalize(nan)
