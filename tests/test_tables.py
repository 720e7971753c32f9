"""Table files are validated: each violation raises TableError naming the problem."""

import copy
import json

import pytest

from lwfc.errors import TableError
from lwfc.tables import Tables, parse_tables
from lwfc_host.design.tablefile import compute_table_id, load_verified, write_tables


def _mutations(t):
    n = t["levels"]
    yield "format", lambda d: d.update(format="other")
    yield "version", lambda d: d.update(version=3)
    yield "reference_classes", lambda d: d.update(version=2)  # a version 2 table needs its fields
    yield "table_id", lambda d: d.update(table_id="xyz")
    yield "layout", lambda d: d.update(layout="NCHW")
    yield "levels", lambda d: d.update(levels=17)
    yield "levels", lambda d: d.update(levels=True)
    yield "channels", lambda d: d.update(channels=0)
    yield "clip_min", lambda d: d.update(clip_min=d["clip_max"])
    yield "int8.scale", lambda d: d["int8"].update(scale=0)
    yield "zero_point", lambda d: d["int8"].update(zero_point=200)
    yield "index_of_q", lambda d: d["int8"].update(index_of_q=d["int8"]["index_of_q"][:255])
    yield "index_of_q", lambda d: d["int8"]["index_of_q"].__setitem__(255, n)
    yield "non-decreasing", lambda d: d["int8"]["index_of_q"].__setitem__(0, n - 1)
    yield "thresholds", lambda d: d["float_input"].update(thresholds=d["float_input"]["thresholds"][::-1])
    yield "frac_bits", lambda d: d["float_input"].update(frac_bits=40)
    yield "reconstruction", lambda d: d.update(reconstruction=d["reconstruction"][:-1])
    yield "reconstruction", lambda d: d["reconstruction"].__setitem__(0, "a")
    yield "groups", lambda d: d["contexts"].update(groups=d["channels"] + 1)
    yield "classes", lambda d: d["contexts"].update(classes=9)
    yield "channel_group", lambda d: d["contexts"]["channel_group"].__setitem__(0, 99)
    yield "neighbour_class", lambda d: d["contexts"]["neighbour_class"].__setitem__(0, 9)
    yield "model_of_context", lambda d: d["contexts"]["model_of_context"].__setitem__(0, 999)
    yield "frequency below 1", lambda d: d["models"][0].__setitem__(0, 0)
    yield "sums to", lambda d: d["models"][0].__setitem__(0, d["models"][0][0] + 1)
    yield "models", lambda d: d.update(models=[])
    yield "contexts", lambda d: d.pop("contexts")
    yield "integers", lambda d: d["models"][0].__setitem__(0, 1.5)


def test_each_violation_is_named(case_contexts):
    table, _, _ = case_contexts
    for needle, mutate in _mutations(table):
        bad = copy.deepcopy(table)
        mutate(bad)
        with pytest.raises(TableError, match=needle.split(".")[-1]):
            Tables(bad)


def test_not_json_and_not_object():
    with pytest.raises(TableError, match="not valid JSON"):
        parse_tables(b"{nope")
    with pytest.raises(TableError, match="JSON object"):
        parse_tables(b"[1, 2]")


def test_table_id_is_checked_by_the_host(tmp_path, case_contexts):
    table, _, _ = case_contexts
    path = tmp_path / "t.json"
    written = write_tables(table, path)
    assert load_verified(path).table_id_hex() == written["table_id"] == compute_table_id(written)
    edited = json.loads(path.read_text())
    edited["reconstruction"][0] += 0.5
    path.write_text(json.dumps(edited))
    with pytest.raises(TableError, match="does not match"):
        load_verified(path)


def test_table_id_ignores_formatting(case_contexts):
    table, _, _ = case_contexts
    assert compute_table_id(json.loads(json.dumps(table, indent=3))) == table["table_id"]


def test_unreadable_file(tmp_path):
    with pytest.raises(TableError, match="cannot read"):
        load_verified(tmp_path / "missing.json")
