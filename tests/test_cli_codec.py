"""The codec command line: encode, decode, inspect, conformance; bad input gives exit 2 and one line."""

import json
import shutil

import numpy as np
import pytest

from lwfc_host.cli import main
from lwfc_host.design.tablefile import write_tables


@pytest.fixture()
def files(tmp_path, case_contexts):
    table, tables, q = case_contexts
    write_tables(table, tmp_path / "t.json")
    np.save(tmp_path / "x.npy", q[None])  # (1, H, W, C), as TFLite gives it
    return tmp_path, tables, q


def test_encode_decode_inspect(files, capsys):
    d, tables, q = files
    for backend in ("python", "constriction"):
        assert main(["encode", "--tables", str(d / "t.json"), "--input", str(d / "x.npy"),
                     "--output", str(d / f"{backend}.lwfc"), "--backend", backend]) == 0
    assert (d / "python.lwfc").read_bytes() == (d / "constriction.lwfc").read_bytes()
    assert main(["decode", "--tables", str(d / "t.json"), "--input", str(d / "python.lwfc"),
                 "--output", str(d / "r.npy"), "--indices", str(d / "i.npy")]) == 0
    idx = np.load(d / "i.npy")
    np.testing.assert_array_equal(idx, np.asarray(tables.index_of_q)[q.astype(int) + 128])
    r = np.load(d / "r.npy")
    assert r.dtype == np.float32 and r.shape == (1,) + q.shape
    capsys.readouterr()
    assert main(["inspect", str(d / "python.lwfc"), "--tables", str(d / "t.json")]) == 0
    out = capsys.readouterr().out
    frame_len = len((d / "python.lwfc").read_bytes())
    assert f"{8 * frame_len / q.size:.4f}" in out and tables.table_id_hex() in out


def test_float_input(files):
    d, tables, q = files
    table = json.loads((d / "t.json").read_text())
    x = (table["int8"]["scale"] * (q.astype(np.float32) - table["int8"]["zero_point"])).astype(np.float32)
    np.save(d / "f.npy", x)
    assert main(["encode", "--tables", str(d / "t.json"), "--input", str(d / "f.npy"), "--float",
                 "--output", str(d / "f.lwfc")]) == 0
    assert main(["encode", "--tables", str(d / "t.json"), "--input", str(d / "f.npy"), "--float",
                 "--backend", "constriction", "--output", str(d / "g.lwfc")]) == 0
    assert (d / "f.lwfc").read_bytes() == (d / "g.lwfc").read_bytes()


def test_bad_inputs_exit_2(files, capsys):
    d, _, q = files
    (d / "bad.lwfc").write_bytes(b"LW\x01garbage")
    np.save(d / "wrong.npy", np.zeros((3, 3, 5), np.int8))
    np.save(d / "f32.npy", np.zeros(q.shape, np.float32))
    (d / "bad.json").write_text("{}")
    cases = [
        (["decode", "--tables", str(d / "t.json"), "--input", str(d / "bad.lwfc"), "--output", str(d / "o.npy")],
         "TruncatedFrame"),
        (["inspect", str(d / "bad.lwfc")], "TruncatedFrame"),
        (["inspect", str(d / "missing.lwfc")], "cannot read"),
        (["encode", "--tables", str(d / "t.json"), "--input", str(d / "wrong.npy"), "--output", str(d / "o")],
         "shape"),
        (["encode", "--tables", str(d / "t.json"), "--input", str(d / "f32.npy"), "--output", str(d / "o")],
         "--float"),
        (["encode", "--tables", str(d / "bad.json"), "--input", str(d / "x.npy"), "--output", str(d / "o")],
         "format"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1


def test_every_subcommand_has_help(capsys):
    from lwfc_host.cli import build_parser

    parser = build_parser()
    names = parser._subparsers._group_actions[0].choices
    for name in names:
        with pytest.raises(SystemExit) as exc:
            main([name, "--help"])
        assert exc.value.code == 0
        assert "usage: lwfc " + name in capsys.readouterr().out


def test_conformance_command(capsys):
    use_mp = shutil.which("node") is not None
    argv = ["conformance"] + ([] if use_mp else ["--no-micropython"])
    assert main(argv) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert " 0 failed" in out
    for impl in ["python", "python-loop", "constriction", "host-decoder"] + (["micropython"] if use_mp else []):
        assert impl in out.split("implementations:")[1]


@pytest.mark.parametrize("argv, needle", [
    (["bench", "--repeats", "0"], "--repeats must be at least 1"),
    (["bench", "--shape", "0,4,4"], "three positive integers"),
])
def test_bench_refuses_what_it_cannot_time(argv, needle, capsys):
    """--repeats 0 would time nothing and print 0 elements/s; an empty shape has no elements to time."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1
