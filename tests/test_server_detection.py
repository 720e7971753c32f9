"""``lwfc serve`` on the real CenterNet-MobileNetV3 detector bundle (issue 7): the host answers each frame with
detections (boxes in input pixels, scores, COCO class indices and names), the same ones the host computes by
decoding the frame itself and running the ONNX cloud half; malformed frames get ERROR answers and the server
goes on serving.

Everything is real: the bundle converted once into the lwfc cache (``tests/conftest.py``; it needs node/npm
and the Debian package darknet), a table designed here on the int8 edge half's outputs for darknet's demo
photos (written outside the cache: the cached bundle is left as it is), ``lwfc serve`` and the device runner
(``python -m lwfc run``: int8 TFLite edge half, pure-Python encoder, link protocol) as separate processes
on a loopback TCP socket, and an in-process server driven by the device's ``Link``. About 20 s once the
bundle is cached.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_e2e import Serve, run_device

from lwfc import protocol as P

PHOTOS = ("darknet/eagle", "darknet/dog")  # the runner's two images; the eagle has one clear detection (bird)
CALIB_VIEWS = 8  # view 0 of the first 8 photos (darknet's 7 first) for the table design


@pytest.fixture(scope="module")
def bundle(centernet_bundle) -> Path:
    return centernet_bundle


@pytest.fixture(scope="module")
def info(bundle) -> dict:
    from lwfc.bundle import load_bundle

    return load_bundle(bundle).info


@pytest.fixture(scope="module")
def design(bundle, info, tmp_path_factory) -> dict:
    """A 4-level uniform table (MSE clip, automatic channel groups and neighbour contexts) designed on the int8
    edge half's outputs for view 0 of the first photos, plus the runner's images (PNG files of view 0 of
    ``PHOTOS``, 512 x 512: the bundle's preprocessing leaves them as they are) and their int8 features."""
    from PIL import Image

    from lwfc.bundle import load_bundle
    from lwfc.edge import EdgeModel
    from lwfc.images import preprocess
    from lwfc_convert.datasets import DatasetMissing
    from lwfc_convert.detection import views
    from lwfc_host.design import table_design as dz
    from lwfc_host.design.calibration import CalibrationStats
    from lwfc_host.design.tablefile import write_tables

    try:
        vs = dict(views(CALIB_VIEWS, require_darknet=True))
    except DatasetMissing as exc:
        pytest.skip(f"photos unavailable: {exc}")
    work = tmp_path_factory.mktemp("server_detection")
    edge = EdgeModel(load_bundle(bundle).edge_path)
    stats = CalibrationStats(reservoir=16)
    q = {}
    for name, view in vs.items():
        q[name] = edge.run(preprocess(view, info["preprocessing"]))
        stats.add_int8(q[name][None], float(edge.out_scale), int(edge.out_zp))
    d = dz.design(stats.loaded(), 4, "uniform", 0.0, "mse", "auto", "auto", float(edge.out_scale),
                  int(edge.out_zp))
    tables = work / "tables.json"
    write_tables(d.table, tables)
    images = work / "images"
    images.mkdir()
    for k, name in enumerate(PHOTOS):
        Image.fromarray(vs[name + "#0"]).save(images / f"{k:02d}_{name.split('/')[1]}.png")
    return {"tables": tables, "images": images, "work": work, "edge": edge,
            "q": {name: q[name + "#0"] for name in PHOTOS}}


@pytest.fixture(scope="module")
def cloud(bundle, info):
    """The ONNX cloud half in this process, configured as the server configures its own (one thread)."""
    from lwfc.bundle import load_bundle
    from lwfc_convert.cloud_runtime import onnx_session, run_onnx

    s = onnx_session(load_bundle(bundle).cloud_path, threads=1)
    return lambda x: run_onnx(s, x)


def host_detections(info, design, cloud, frame: bytes) -> tuple[list[dict], object]:
    """What the host computes for a frame without the server: decode, cloud half, describe."""
    from lwfc_convert.detection import describe
    from lwfc_host.codec.decoder import Decoder
    from lwfc_host.design.tablefile import load_verified

    decoded = Decoder(load_verified(design["tables"])).decode(frame)
    out = cloud(decoded.tensor)
    assert out.shape == (1, 100, 6)
    return describe(out[0], info["class_names"]), decoded


def check_detections(got: list, want: list[dict], class_names: list[str]) -> None:
    assert isinstance(got, list)
    for det in got:
        assert set(det) == {"box", "score", "class", "label"}, det
        x1, y1, x2, y2 = det["box"]
        assert -1.0 <= x1 < x2 <= 513.0 and -1.0 <= y1 < y2 <= 513.0, det  # input pixels (512 x 512)
        assert 0.2 <= det["score"] <= 1.0
        assert 0 <= det["class"] < len(class_names) and det["label"] == class_names[det["class"]]
    assert [d["score"] for d in got] == sorted((d["score"] for d in got), reverse=True)
    # the same detections as decoding the frame here and running the same cloud half (up to the rounding
    # of boxes to 0.01 px and scores to 1e-4 in the answer)
    assert [(d["class"], d["label"]) for d in got] == [(d["class"], d["label"]) for d in want]
    for g, w in zip(got, want):
        assert g["box"] == pytest.approx(w["box"], abs=0.011) and g["score"] == pytest.approx(w["score"], abs=1.1e-4)


def box_iou(a, b) -> float:
    from lwfc_convert.detection import box_iou as iou

    return float(iou(np.asarray(a), np.asarray(b))[0, 0])


def test_lwfc_serve_replies_with_detections(bundle, info, design, cloud, tmp_path):
    """`lwfc serve` and `python -m lwfc run` as processes over loopback TCP, on two darknet photos."""
    from lwfc_convert.detection import describe

    log = tmp_path / "frames.jsonl"
    srv = Serve(["--bundle", str(bundle), "--tables", str(design["tables"]), "--tcp", "127.0.0.1:0",
                 "--log", str(log)])
    try:
        run = run_device(bundle, srv.addresses[0], design["images"], tmp_path, "--tables", str(design["tables"]),
                         "--device", "cam0")
    finally:
        final, _err = srv.stop()
    s = run["summary"]
    assert s["frames"] == len(PHOTOS) and s["results"] == len(PHOTOS) and s["error_total"] == 0, run["stdout"]
    assert final["frames"] == len(PHOTOS) and final["error_total"] == 0
    events = [json.loads(ln) for ln in log.read_text().splitlines()]
    frames_logged = [e for e in events if e["event"] == "frame"]
    assert [e["device"] for e in frames_logged] == ["cam0"] * len(PHOTOS)
    names = info["class_names"]
    assert len(names) == 80
    results = {}
    for rec, photo in zip(run["frames"], PHOTOS):
        res = rec["result"]
        assert res["kind"] == "detection" and res["ok"] is True, res
        frame = (tmp_path / "frames" / f"{rec['index']:05d}.lwfc").read_bytes()
        # the device sent what the device encoder makes of the edge half's output for this photo
        assert frame == _encode(design, design["q"][photo])
        want, decoded = host_detections(info, design, cloud, frame)
        check_detections(res["detections"], want, names)
        assert res["bits_per_element"] == pytest.approx(8 * len(frame) / decoded.header.element_count, abs=1e-6)
        assert decoded.header.element_count == 128 * 128 * 72
        results[photo] = res["detections"]
        # the server's log and the runner's per-frame line say how many detections there were
        assert frames_logged[len(results) - 1]["detections"] == len(res["detections"])
        assert f"{len(res['detections'])} detections" in run["stdout"]
    # a broken decode or cloud half would not keep the eagle: the best detection is a bird, where the
    # uncompressed int8 pipeline puts it
    edge = design["edge"]
    x = edge.out_scale * (design["q"]["darknet/eagle"].astype(np.float32) - edge.out_zp)
    ref = describe(cloud(x[None])[0], names)
    best = results["darknet/eagle"][0]
    assert best["label"] == "bird" == ref[0]["label"]
    assert box_iou(best["box"], ref[0]["box"]) > 0.8
    assert results["darknet/dog"]  # a few objects (bicycle, car, ...) at this rate


def _encode(design, q: np.ndarray) -> bytes:
    from lwfc.encoder import Encoder
    from lwfc.tables import load_tables

    h, w, _c = q.shape
    return Encoder(load_tables(str(design["tables"]))).encode_int8(np.ascontiguousarray(q).tobytes(), h, w)


def test_detector_server_answers_malformed_frames_and_keeps_serving(bundle, info, design, cloud):
    """An in-process server on a loopback socket, the device's Link: bad frames get ERROR answers on the same
    session, which then still gets detections."""
    from lwfc.bundle import bundle_id
    from lwfc.link import Link
    from lwfc_host.serve import CloudModel, ServerConfig, run_in_thread

    q = design["q"]["darknet/eagle"]
    good = _encode(design, q)
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x10  # inside the payload: the frame's CRC-32 catches it
    small = _encode(design, q[:64, :64])  # a valid lwfc frame, but not the 128 x 128 x 72 the detector takes
    sent = {"truncated": good[: len(good) // 3], "bit flip": bytes(flipped), "trailing bytes": good + b"\0",
            "wrong shape": small, "good": good}
    want, _ = host_detections(info, design, cloud, good)
    hello = {"device": "cam1", "model": info["model"], "bundle": bundle_id(bundle),
             "table": json.loads(design["tables"].read_text())["table_id"]}
    server, stop = run_in_thread(CloudModel(bundle, [design["tables"]]), ServerConfig(), tcp=["127.0.0.1:0"])
    try:
        link = Link(server.addresses[0], hello, window=2, policy="block")
        welcome = link.connect()
        answers = []
        for tag, frame in sent.items():
            answers += link.submit(frame, tag=tag)
        answers += link.drain(60)
        link.close()
        st = server.status()
    finally:
        stop()
    assert welcome["classes"] == 80
    got = {a.tag: a for a in answers}
    assert sorted(got) == sorted(sent) and len(answers) == len(sent)
    for tag in ("truncated", "bit flip", "trailing bytes"):
        assert (got[tag].kind, got[tag].code) == ("error", P.E_BAD_FRAME), got[tag]
    a = got["wrong shape"]  # refused from its header, before any decoding (PROTOCOL.md 7)
    assert (a.kind, a.code) == ("error", P.E_BAD_FRAME) and "64x64x72 is not this bundle's feature shape" in a.message
    a = got["good"]
    assert a.kind == "result" and a.result["kind"] == "detection", a
    check_detections(a.result["detections"], want, info["class_names"])
    assert a.result["detections"] and a.result["detections"][0]["label"] == "bird"
    assert link.reconnects == 0  # errors are answers: the session went on
    assert st["frames"] == 1 and st["errors"] == {"BAD_FRAME": 4}
