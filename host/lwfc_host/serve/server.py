"""The host inference server: many devices at once over TCP and serial lines (codec_spec/PROTOCOL.md).

Each connection is one asyncio task that parses messages with the device's own resynchronising
parser, answers every DATA with a RESULT or an ERROR, and processes its frames in order. Decoding
(constriction) and the cloud half (onnxruntime) run in a thread pool, so slow frames of one device
do not stall the others. Memory is bounded: a connection reads only while it has no frame in work,
its parser buffer never exceeds ``max_message`` plus one read, and the number of connections is capped.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import hashlib
import json
import secrets
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from lwfc import protocol as P
from lwfc.errors import FrameError, LwfcError
from lwfc.frame import CRC_SIZE, HEADER_SIZE, max_payload_length, parse_frame
from lwfc.tables import Tables
from lwfc_host.codec.decoder import Decoder
from lwfc_host.design.tablefile import load_verified

READ_CHUNK = 65536


class ServerError(Exception):
    """The server cannot start: a bad bundle, table, key file or address."""


def bundle_id(bundle_dir: str | Path) -> str:
    """PROTOCOL.md 5.1: the first 8 hex digits of SHA-256 of the bundle's bundle.json file."""
    return hashlib.sha256(Path(bundle_dir, "bundle.json").read_bytes()).hexdigest()[:8]


def softmax(x: np.ndarray) -> np.ndarray:
    z = x - np.max(x)
    e = np.exp(z)
    return e / e.sum()


def top_k(logits: np.ndarray, class_names: list[str], k: int) -> list[list[Any]]:
    """[[class index, name, probability], ...] best first (probabilities from a softmax of the logits)."""
    p = softmax(np.asarray(logits, dtype=np.float64).reshape(-1))
    order = np.argsort(-p, kind="stable")[:k]
    return [[int(i), class_names[i] if i < len(class_names) else str(int(i)), round(float(p[i]), 6)]
            for i in order]


class CloudModel:
    """A bundle's tables, decoders and cloud half: frame bytes -> result dict (thread-safe)."""

    def __init__(self, bundle_dir: str | Path, table_paths: list[str | Path] | None = None, top: int = 5,
                 threads: int = 1):
        self.dir = Path(bundle_dir)
        bj = self.dir / "bundle.json"
        if not bj.exists():
            raise ServerError(f"{self.dir} is not a bundle directory: it has no bundle.json")
        try:
            self.info = json.loads(bj.read_text())
        except ValueError as exc:
            raise ServerError(f"{bj} is not valid JSON: {exc}") from exc
        self.bundle_id = bundle_id(self.dir)
        self.model_name = str(self.info.get("model", ""))
        self.class_names = list(self.info.get("class_names") or [])
        self.top = top
        if not table_paths:
            default = self.dir / "tables.json"
            if not default.exists():
                raise ServerError(f"no tables given and {default} does not exist (run `lwfc design` or pass --tables)")
            table_paths = [default]
        self.tables: dict[bytes, Tables] = {}
        self.decoders: dict[bytes, Decoder] = {}
        for p in table_paths:
            try:
                t = load_verified(p)
            except LwfcError as exc:
                raise ServerError(f"table file {p}: {exc}") from exc
            self.tables[t.table_id] = t
            self.decoders[t.table_id] = Decoder(t)
        self.session = None
        cloud = self.info.get("cloud", {}).get("file", "cloud.onnx")
        path = self.dir / cloud
        if path.exists():
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            self.input_name = self.session.get_inputs()[0].name
        shape = (self.info.get("feature") or {}).get("shape_nhwc")
        n = int(np.prod(shape[1:])) if shape else 1 << 18
        self.max_frame = HEADER_SIZE + max_payload_length(n) + CRC_SIZE

    def table_ids(self) -> list[str]:
        return [t.hex() for t in self.tables]

    def decode(self, frame: bytes) -> tuple[Any, float]:
        """(Decoded, ms). Raises FrameError (malformed) or KeyError (unknown table)."""
        t0 = time.perf_counter()
        header, _ = parse_frame(frame)  # CRC and length first, as SPEC.md 6 orders the checks
        dec = self.decoders.get(header.table_id)
        if dec is None:
            raise KeyError(header.table_id.hex())
        d = dec.decode(frame)
        return d, (time.perf_counter() - t0) * 1000

    def infer(self, tensor: np.ndarray) -> tuple[dict[str, Any], float]:
        """(result fields, ms) for a decoded (1, H, W, C) float32 tensor."""
        t0 = time.perf_counter()
        if self.session is None:
            res = {"kind": "tensor", "shape": list(tensor.shape),
                   "summary": [float(tensor.min()), float(tensor.max()), float(tensor.mean())]}
        else:
            out = self.session.run(None, {self.input_name: tensor.astype(np.float32, copy=False)})[0]
            if self.class_names and out.size == len(self.class_names):
                res = {"kind": "classification", "top": top_k(out, self.class_names, self.top)}
            elif out.ndim == 3 and out.shape[0] == 1 and out.shape[2] == 6:
                # a detector's (1, boxes, [x1, y1, x2, y2, score, class]) output
                from lwfc_convert.detection import describe

                res = {"kind": "detection", "detections": describe(out[0], self.class_names or None)}
            else:
                res = {"kind": "tensor", "shape": list(out.shape),
                       "summary": [float(out.min()), float(out.max()), float(out.mean())]}
        return res, (time.perf_counter() - t0) * 1000


@dataclass
class ServerConfig:
    """Limits and timeouts (PROTOCOL.md, 7)."""

    max_message: int = 0  # 0: from the bundle (largest legal frame), at least 64 KiB
    max_garbage: int = 1 << 20
    hello_timeout_s: float = 5.0
    idle_timeout_s: float = 30.0
    keepalive_s: float = 10.0
    max_connections: int = 256
    workers: int = 2
    pipeline: int = 4  # frames of one connection in work at once (answers still go out in order)
    keys: dict[str, bytes] = field(default_factory=dict)
    require_auth: bool = False
    log: Callable[[dict[str, Any]], None] | None = None  # structured per-frame log sink


class Metrics:
    """Running totals and latency samples (a bounded window) of the whole server."""

    WINDOW = 100_000

    def __init__(self) -> None:
        self.started = time.time()
        self.frames = 0  # DATA messages answered with a RESULT
        self.errors: collections.Counter[str] = collections.Counter()
        self.bytes = 0  # frame bytes of decoded frames
        self.elements = 0
        self.garbage = 0
        self.connections_total = 0
        self.connections_open = 0
        self.refused = 0
        self.max_buffered = 0
        self.decode_ms: collections.deque[float] = collections.deque(maxlen=self.WINDOW)
        self.infer_ms: collections.deque[float] = collections.deque(maxlen=self.WINDOW)
        self.total_ms: collections.deque[float] = collections.deque(maxlen=self.WINDOW)
        self.lock = threading.Lock()

    @staticmethod
    def _pct(samples: collections.deque[float]) -> dict[str, float] | None:
        if not samples:
            return None
        a = np.fromiter(samples, dtype=np.float64)
        p50, p95, p99 = np.percentile(a, [50, 95, 99])
        return {"p50": round(float(p50), 3), "p95": round(float(p95), 3), "p99": round(float(p99), 3),
                "mean": round(float(a.mean()), 3), "n": int(a.size)}

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            up = time.time() - self.started
            return {
                "uptime_s": round(up, 3),
                "frames": self.frames,
                "errors": dict(self.errors),
                "error_total": sum(self.errors.values()),
                "bytes": self.bytes,
                "elements": self.elements,
                "bits_per_element": (8.0 * self.bytes / self.elements) if self.elements else None,
                "frames_per_s": self.frames / up if up > 0 else 0.0,
                "garbage_bytes": self.garbage,
                "connections_open": self.connections_open,
                "connections_total": self.connections_total,
                "refused": self.refused,
                "max_buffered_bytes": self.max_buffered,
                "decode_ms": self._pct(self.decode_ms),
                "infer_ms": self._pct(self.infer_ms),
                "server_ms": self._pct(self.total_ms),
            }


class Stream:
    """What a connection handler needs from a byte stream."""

    name: str
    closable: bool = True

    async def read(self) -> bytes:  # b"" at the end of the stream
        raise NotImplementedError

    async def write(self, data: bytes) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


class TcpStream(Stream):
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, drain_timeout_s: float):
        self.reader, self.writer = reader, writer
        peer = writer.get_extra_info("peername")
        self.name = f"tcp://{peer[0]}:{peer[1]}" if peer else "tcp://?"
        self.drain_timeout_s = drain_timeout_s

    async def read(self) -> bytes:
        return await self.reader.read(READ_CHUNK)

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        # a peer that never reads must not make us buffer answers forever
        await asyncio.wait_for(self.writer.drain(), self.drain_timeout_s)

    async def close(self) -> None:
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), 2.0)
        except (OSError, asyncio.TimeoutError):
            pass


class SerialStream(Stream):
    """A serial line (pyserial) bridged into asyncio by a reader thread and a bounded queue (backpressure:
    the thread stops reading while the handler is busy)."""

    closable = False

    def __init__(self, device: str, baud: int, loop: asyncio.AbstractEventLoop):
        import serial

        try:
            self.ser = serial.Serial(device, baudrate=baud, timeout=0.2, write_timeout=10.0)
        except (serial.SerialException, OSError) as exc:
            raise ServerError(f"cannot open serial device {device}: {exc}") from exc
        self.name = f"serial://{device}"
        self.loop = loop
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=8)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._reader, name=f"serial-reader {device}", daemon=True)
        self.thread.start()

    def _reader(self) -> None:
        import serial

        while not self.stopped.is_set():
            try:
                data = self.ser.read(max(1, min(self.ser.in_waiting, READ_CHUNK)))
            except (serial.SerialException, OSError, TypeError):
                data = None
            if data == b"":
                continue
            try:
                asyncio.run_coroutine_threadsafe(self.queue.put(data or b""), self.loop).result()
            except (RuntimeError, concurrent.futures.CancelledError):  # the loop is gone or stopping
                return
            if not data:
                return

    async def read(self) -> bytes:
        return await self.queue.get()

    async def write(self, data: bytes) -> None:
        await self.loop.run_in_executor(None, self._write, data)

    def _write(self, data: bytes) -> None:
        self.ser.write(data)
        self.ser.flush()

    async def close(self) -> None:
        self.stopped.set()
        await self.loop.run_in_executor(None, self.thread.join, 2.0)
        self.ser.close()


class Connection:
    """One byte stream: handshake, sequence tracking, answers (PROTOCOL.md 5)."""

    def __init__(self, server: Server, stream: Stream):
        self.server = server
        self.stream = stream
        self.cfg = server.config
        self.parser = P.Parser(server.max_message)
        self.session: dict[str, Any] | None = None
        self.auth: P.Auth | None = None
        self.expected = 1
        self.table_id: bytes | None = None
        self.closing = False
        self.frames = 0
        self.errors = 0
        # Answers in the order they are due: futures of message bytes. Bounded: reading stops while it is
        # full, so a connection holds at most ``pipeline`` frames in work (memory and fairness).
        self.outq: asyncio.Queue[asyncio.Future[bytes | None] | None] = asyncio.Queue(maxsize=max(1, self.cfg.pipeline))
        self.sender: asyncio.Task[None] | None = None

    def _pack(self, mtype: int, seq: int, body: bytes = b"") -> bytes:
        return P.pack_message(mtype, seq, body, self.auth)

    async def send(self, data: bytes) -> None:
        """Queue a message behind every answer already due."""
        fut: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
        fut.set_result(data)
        await self._enqueue(fut)

    async def _enqueue(self, fut: asyncio.Future[bytes | None]) -> None:
        if self.sender is not None and self.sender.done():
            raise ConnectionError("the peer stopped taking answers")
        await self.outq.put(fut)

    async def _send_loop(self) -> None:
        while True:
            item = await self.outq.get()
            if item is None:
                return
            data = await item
            if data:
                await self.stream.write(data)

    async def error(self, seq: int, code: int, text: str, count: int = 1) -> None:
        self._count_error(seq, code, text, count)
        await self.send(P.pack_error(seq, code, text, count, self.auth))

    def _device(self) -> str | None:
        return self.session.get("device") if self.session else None

    async def refuse(self, code: int, reason: str) -> None:
        with self.server.metrics.lock:
            self.server.metrics.refused += 1
        self.server.emit({"event": "refuse", "peer": self.stream.name, "code": P.REFUSE_NAMES.get(code),
                          "reason": reason})
        await self.send(P.pack_json(P.REFUSE, 0, {"code": code, "reason": reason}))
        self.session = None
        self.closing = self.stream.closable

    async def on_hello(self, msg: P.Message) -> None:
        """Check HELLO (5.1) and answer WELCOME or REFUSE. A new HELLO restarts the session."""
        self.session, self.auth, self.parser.auth = None, None, None
        try:
            hello = P.parse_json(msg.body, "HELLO")
        except P.ProtocolError as exc:
            await self.refuse(P.R_BAD_HELLO, str(exc))
            return
        model = self.server.model
        dev = hello.get("device")
        if hello.get("protocol") != P.PROTOCOL_VERSION:
            await self.refuse(P.R_PROTOCOL, f"protocol {hello.get('protocol')!r} unsupported; this host speaks "
                                            f"{P.PROTOCOL_VERSION}")
            return
        if not isinstance(dev, str) or not 1 <= len(dev) <= 64 or not all(32 < ord(ch) < 127 for ch in dev):
            await self.refuse(P.R_BAD_HELLO, "device must be 1-64 printable ASCII characters without spaces")
            return
        if not isinstance(hello.get("table"), str) or not isinstance(hello.get("model", ""), str):
            await self.refuse(P.R_BAD_HELLO, "table and model must be strings")
            return
        if hello.get("model") and hello["model"] != model.model_name:
            await self.refuse(P.R_MODEL, f"this host serves model {model.model_name!r}, not {hello['model']!r}")
            return
        if hello.get("bundle") and hello["bundle"] != model.bundle_id:
            await self.refuse(P.R_MODEL, f"this host serves bundle {model.bundle_id}, not {hello['bundle']}")
            return
        try:
            tid = bytes.fromhex(hello["table"])
        except ValueError:
            tid = b""
        if tid not in model.tables:
            await self.refuse(P.R_TABLE, f"unknown table {hello['table']!r}; this host has "
                                         f"{', '.join(model.table_ids())}")
            return
        wants_auth = bool(hello.get("auth"))
        if self.cfg.require_auth and not wants_auth:
            await self.refuse(P.R_AUTH, "this host requires authenticated sessions")
            return
        welcome: dict[str, Any] = {
            "protocol": P.PROTOCOL_VERSION, "session": secrets.token_hex(8),
            "max_message": self.server.max_message, "keepalive_s": self.cfg.keepalive_s,
            "timeout_s": self.cfg.idle_timeout_s, "classes": len(model.class_names),
        }
        nonce = None
        if wants_auth:
            key = self.cfg.keys.get(dev)
            if key is None:
                await self.refuse(P.R_AUTH, f"no key for device {dev!r}")
                return
            nonce = secrets.token_bytes(16)
            welcome["nonce"] = nonce.hex()
        await self.send(P.pack_json(P.WELCOME, 0, welcome))
        if nonce is not None:
            self.auth = P.Auth(self.cfg.keys[dev], nonce)
            self.parser.auth = self.auth
        self.session = {"device": dev, "session": welcome["session"], "auth": wants_auth}
        self.table_id = tid
        self.expected = 1
        self.server.emit({"event": "session", "peer": self.stream.name, "device": dev,
                          "session": welcome["session"], "table": tid.hex(), "auth": wants_auth})

    async def on_data(self, msg: P.Message) -> None:
        seq = msg.seq
        ahead = P.seq_ahead(seq, self.expected)
        if ahead < 0:
            await self.error(seq, P.E_DUPLICATE, f"seq {seq} was already answered (expected {self.expected})")
            return
        if ahead > 0:
            s = self.expected
            while ahead > 0:  # the host answers every seq it skipped (5.2)
                n = min(ahead, 65535)
                await self.error(s, P.E_MISSING, f"DATA {s}..{(s + n - 1) % P.SEQ_MOD} never arrived", n)
                s = (s + n) % P.SEQ_MOD
                ahead -= n
        self.expected = P.next_seq(seq)
        await self.process(seq, bytes(msg.body))

    async def process(self, seq: int, frame: bytes) -> None:
        """Start decoding and inference of one frame; its answer takes its place in the answer queue."""
        task = asyncio.get_running_loop().create_task(self._work(seq, frame, self.table_id, self.auth))
        await self._enqueue(task)

    def _count_error(self, seq: int, code: int, text: str, count: int = 1) -> None:
        m = self.server.metrics
        with m.lock:
            m.errors[P.ERROR_NAMES.get(code, str(code))] += count
        self.errors += count
        self.server.emit({"event": "error", "peer": self.stream.name, "device": self._device(), "seq": seq,
                          "count": count, "code": P.ERROR_NAMES.get(code, code), "message": text})

    async def _work(self, seq: int, frame: bytes, table_id: bytes | None, auth: P.Auth | None) -> bytes:
        srv = self.server
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        try:
            kind, payload = await loop.run_in_executor(srv.executor, srv.work, frame, table_id)
        except Exception as exc:  # noqa: BLE001 - a bug in a worker must not take the server down
            kind, payload = "error", (P.E_INFERENCE, f"internal error: {type(exc).__name__}: {exc}")
        if kind == "error":
            code, text = payload
            self._count_error(seq, code, text)
            return P.pack_error(seq, code, text, 1, auth)
        result, n_el, dec_ms, inf_ms = payload
        total_ms = (time.perf_counter() - t0) * 1000
        m = srv.metrics
        with m.lock:
            m.frames += 1
            m.bytes += len(frame)
            m.elements += n_el
            m.decode_ms.append(dec_ms)
            m.infer_ms.append(inf_ms)
            m.total_ms.append(total_ms)
        self.frames += 1
        srv.emit({"event": "frame", "peer": self.stream.name, "device": self._device(), "seq": seq,
                  "bytes": len(frame), "elements": n_el, "bits_per_element": result["bits_per_element"],
                  "decode_ms": round(dec_ms, 3), "infer_ms": round(inf_ms, 3), "server_ms": round(total_ms, 3),
                  "top1": result.get("top", [[None]])[0] if result.get("top") else None,
                  **({"detections": len(result["detections"])} if "detections" in result else {})})
        return P.pack_message(P.RESULT, seq, json.dumps(result).encode(), auth)

    async def on_message(self, msg: P.Message) -> None:
        t = msg.type
        if t == P.HELLO:
            await self.on_hello(msg)
        elif t == P.PING:
            await self.send(self._pack(P.PONG, msg.seq, bytes(msg.body[:64])))
        elif t == P.PONG:
            pass
        elif t == P.BYE:
            self.closing = self.stream.closable
            self.session = None
        elif self.session is None:
            if t == P.DATA:
                await self.error(msg.seq, P.E_NO_SESSION, "DATA before a WELCOME: send HELLO first")
            else:
                await self.error(msg.seq, P.E_BAD_TYPE, f"unexpected message type {t} outside a session")
        elif msg.flags & ~P.FLAG_AUTH:
            await self.error(msg.seq, P.E_BAD_MESSAGE, f"reserved flag bits set: 0x{msg.flags:02x}")
        elif t == P.DATA:
            await self.on_data(msg)
        else:
            await self.error(msg.seq, P.E_BAD_TYPE, f"unexpected message type {t} from a device")

    async def on_event(self, ev: Any) -> None:
        if isinstance(ev, P.Message):
            await self.on_message(ev)
            return
        kind, mtype, seq, length = ev
        if kind == P.CORRUPT:
            if mtype == P.DATA and self.session is not None:
                # the header (and so seq) passed its CRC: answer it and move on
                if P.seq_ahead(seq, self.expected) >= 0:
                    await self.on_data_skipped(seq)
                await self.error(seq, P.E_CORRUPT, f"DATA {seq}: body of {length} bytes failed its CRC")
        elif kind == P.TOO_LARGE:
            await self.error(seq, P.E_TOO_LARGE, f"message of {length} bytes exceeds the limit "
                                                 f"{self.server.max_message}; closing")
            self.closing = True
            if not self.stream.closable:  # a serial line cannot be closed: start over on it
                self.parser = P.Parser(self.server.max_message)
                self.session = None
                self.closing = False
        elif kind == P.BAD_AUTH:
            await self.error(seq, P.E_AUTH, "missing or wrong authentication tag; closing")
            self.closing = self.stream.closable
            self.session, self.auth, self.parser.auth = None, None, None

    async def on_data_skipped(self, seq: int) -> None:
        """Account for a corrupt DATA's seq like a received one (MISSING for the gap before it)."""
        ahead = P.seq_ahead(seq, self.expected)
        if ahead > 0:
            await self.error(self.expected, P.E_MISSING, f"DATA {self.expected}.. never arrived", min(ahead, 65535))
        self.expected = P.next_seq(seq)

    async def run(self) -> None:
        srv = self.server
        self.sender = asyncio.get_running_loop().create_task(self._send_loop())
        try:
            while not self.closing and not self.sender.done():
                timeout = self.cfg.idle_timeout_s if self.session is not None else self.cfg.hello_timeout_s
                try:
                    data = await asyncio.wait_for(self.stream.read(), timeout)
                except asyncio.TimeoutError:
                    if not self.stream.closable:
                        continue  # a quiet serial line stays open
                    why = "idle timeout" if self.session is not None else "hello timeout"
                    srv.emit({"event": "timeout", "peer": self.stream.name, "device": self._device(), "why": why})
                    await self.send(self._pack(P.BYE, 0, why.encode()))
                    break
                if not data:
                    if self.parser.pending():
                        srv.emit({"event": "truncated", "peer": self.stream.name, "device": self._device(),
                                  "bytes": self.parser.pending()})
                    break
                g0 = self.parser.garbage
                self.parser.feed(data)
                for ev in self.parser:
                    await self.on_event(ev)
                    if self.closing:
                        break
                with srv.metrics.lock:
                    srv.metrics.garbage += self.parser.garbage - g0
                    srv.metrics.max_buffered = max(srv.metrics.max_buffered, self.parser.max_buffered)
                if self.parser.garbage_since_valid > self.cfg.max_garbage and not self.closing:
                    await self.error(0, P.E_GARBAGE, f"{self.parser.garbage_since_valid} bytes without a valid "
                                                     "message; closing")
                    if self.stream.closable:
                        break
                    self.parser.garbage_since_valid = 0
        except (ConnectionError, OSError, asyncio.TimeoutError) as exc:
            srv.emit({"event": "disconnect", "peer": self.stream.name, "device": self._device(), "why": str(exc)})
        finally:
            await self._finish_sending()
            if self.stream.closable:
                await self.stream.close()

    async def _finish_sending(self) -> None:
        """Send the answers still due (frames in work finish first), then stop the sender."""
        sender = self.sender
        if sender is None:
            return
        try:
            if not sender.done():
                await asyncio.wait_for(self.outq.put(None), self.cfg.idle_timeout_s)
            await asyncio.wait_for(sender, self.cfg.idle_timeout_s)
        except (ConnectionError, OSError, asyncio.TimeoutError) as exc:
            self.server.emit({"event": "disconnect", "peer": self.stream.name, "device": self._device(),
                              "why": f"answers not delivered: {exc}"})
        finally:
            if not sender.done():
                sender.cancel()
            while not self.outq.empty():  # work whose answers can no longer be sent: let it finish quietly
                item = self.outq.get_nowait()
                if item is not None and not item.done():
                    item.cancel()


class Server:
    """The inference server. ``await start_tcp(...)`` / ``start_serial(...)`` then ``await serve_forever()``."""

    def __init__(self, model: CloudModel, config: ServerConfig | None = None):
        self.model = model
        self.config = config or ServerConfig()
        self.max_message = self.config.max_message or max(model.max_frame, 1 << 16)
        self.metrics = Metrics()
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=self.config.workers,
                                                              thread_name_prefix="lwfc-work")
        self.tcp_servers: list[asyncio.base_events.Server] = []
        self.tasks: set[asyncio.Task[Any]] = set()
        self.addresses: list[str] = []

    def emit(self, record: dict[str, Any]) -> None:
        if self.config.log is not None:
            record["t"] = round(time.time(), 6)
            self.config.log(record)

    def work(self, frame: bytes, session_table: bytes | None) -> tuple[str, Any]:
        """Decode and infer one frame (in a worker thread): ("ok", (result, elements, decode_ms, infer_ms))
        or ("error", (code, message))."""
        try:
            decoded, dec_ms = self.model.decode(frame)
        except KeyError as exc:
            return "error", (P.E_UNKNOWN_TABLE, f"frame coded with unknown table {exc.args[0]}; this host has "
                                                f"{', '.join(self.model.table_ids())}")
        except FrameError as exc:
            return "error", (P.E_BAD_FRAME, f"{type(exc).__name__}: {exc}")
        if session_table is not None and decoded.header.table_id != session_table:
            return "error", (P.E_TABLE_MISMATCH, f"frame uses table {decoded.header.table_id.hex()}, the session "
                                                 f"announced {session_table.hex()}")
        try:
            result, inf_ms = self.model.infer(decoded.tensor)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            return "error", (P.E_INFERENCE, f"cloud half failed: {type(exc).__name__}: {exc}")
        result.update({"ok": True, "bits_per_element": round(decoded.bits_per_element, 6),
                       "decode_ms": round(dec_ms, 3), "infer_ms": round(inf_ms, 3)})
        return "ok", (result, decoded.header.element_count, dec_ms, inf_ms)

    async def _run_connection(self, stream: Stream) -> None:
        m = self.metrics
        with m.lock:
            m.connections_total += 1
            m.connections_open += 1
        conn = Connection(self, stream)
        try:
            if m.connections_open > self.config.max_connections:
                reason = f"too many connections (limit {self.config.max_connections})"
                with m.lock:
                    m.refused += 1
                self.emit({"event": "refuse", "peer": stream.name, "code": "BUSY", "reason": reason})
                try:  # no session, no answer queue: say why directly, then hang up
                    await stream.write(P.pack_json(P.REFUSE, 0, {"code": P.R_BUSY, "reason": reason}))
                except (ConnectionError, OSError, asyncio.TimeoutError):
                    pass
                await stream.close()
                return
            await conn.run()
        finally:
            with m.lock:
                m.connections_open -= 1

    async def _on_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self.tasks.add(task)
        try:
            await self._run_connection(TcpStream(reader, writer, self.config.idle_timeout_s))
        except asyncio.CancelledError:
            writer.close()  # the server is shutting down
        finally:
            self.tasks.discard(task)

    async def start_tcp(self, host: str, port: int) -> tuple[str, int]:
        """Listen on host:port (port 0: any free port); returns the bound address."""
        try:
            srv = await asyncio.start_server(self._on_tcp, host, port, limit=READ_CHUNK)
        except OSError as exc:
            raise ServerError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
        self.tcp_servers.append(srv)
        addr = srv.sockets[0].getsockname()[:2]
        self.addresses.append(f"tcp://{addr[0]}:{addr[1]}")
        return addr[0], addr[1]

    def start_serial(self, device: str, baud: int) -> None:
        stream = SerialStream(device, baud, asyncio.get_running_loop())
        self.addresses.append(f"serial://{device}?baud={baud}")
        task = asyncio.get_running_loop().create_task(self._run_serial(stream))
        self.tasks.add(task)

    async def _run_serial(self, stream: SerialStream) -> None:
        try:
            await self._run_connection(stream)
        except asyncio.CancelledError:
            pass
        finally:
            stream.stopped.set()
            stream.ser.close()

    async def start_status(self, host: str, port: int) -> tuple[str, int]:
        """A tiny HTTP endpoint: any GET answers the metrics snapshot as JSON."""

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
                body = json.dumps(self.status(), indent=1).encode()
                writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                             + str(len(body)).encode() + b"\r\n\r\n" + body)
                await writer.drain()
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                pass
            finally:
                writer.close()

        try:
            srv = await asyncio.start_server(handle, host, port)
        except OSError as exc:
            raise ServerError(f"cannot listen for status on {host}:{port}: {exc.strerror}") from exc
        self.tcp_servers.append(srv)
        return srv.sockets[0].getsockname()[:2]

    def status(self) -> dict[str, Any]:
        s = self.metrics.snapshot()
        s.update({"model": self.model.model_name, "bundle": self.model.bundle_id, "tables": self.model.table_ids(),
                  "listening": self.addresses, "max_message": self.max_message})
        return s

    async def close(self) -> None:
        for srv in self.tcp_servers:
            srv.close()
        tasks = [t for t in self.tasks if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.executor.shutdown(wait=False, cancel_futures=True)


def parse_hostport(text: str, what: str) -> tuple[str, int]:
    """"HOST:PORT" or ":PORT" or "PORT" -> (host, port)."""
    host, _, port = text.rpartition(":")
    try:
        p = int(port)
    except ValueError:
        raise ServerError(f"{what} {text!r} must be HOST:PORT") from None
    if not 0 <= p < 65536:
        raise ServerError(f"{what} port {p} is out of range")
    return (host.strip("[]") or "127.0.0.1"), p


def load_keys(path: str | Path) -> dict[str, bytes]:
    """A key file: JSON object {device name: key as hex (>= 16 bytes)}."""
    try:
        obj = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ServerError(f"cannot read key file {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise ServerError(f"key file {path} is not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise ServerError(f"key file {path} must hold a JSON object {{device: hex key}}")
    keys = {}
    for dev, hexkey in obj.items():
        try:
            key = bytes.fromhex(hexkey)
        except (TypeError, ValueError):
            raise ServerError(f"key of device {dev!r} in {path} is not hex") from None
        if len(key) < 16:
            raise ServerError(f"key of device {dev!r} in {path} has {len(key)} bytes; at least 16 are needed")
        keys[dev] = key
    return keys


def json_log_sink(path: str) -> Callable[[dict[str, Any]], None]:
    """A structured log: one JSON object per line, to a file or '-' (stderr)."""
    f = sys.stderr if path == "-" else open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
    lock = threading.Lock()

    def sink(rec: dict[str, Any]) -> None:
        with lock:
            f.write(json.dumps(rec) + "\n")

    return sink


async def serve(model: CloudModel, config: ServerConfig, tcp: list[str], serial: list[str], baud: int,
                status: str | None = None, ready: Callable[[Server], None] | None = None,
                stop: asyncio.Event | None = None) -> dict[str, Any]:
    """Run a server until SIGINT/SIGTERM (or ``stop``); SIGUSR1 prints the running totals. Returns them."""
    server = Server(model, config)
    for addr in tcp:
        host, port = parse_hostport(addr, "--tcp")
        await server.start_tcp(host, port)
    for dev in serial:
        server.start_serial(dev, baud)
    if status:
        host, port = parse_hostport(status, "--status")
        h, p = await server.start_status(host, port)
        server.addresses.append(f"http://{h}:{p}/status")
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()

    def dump() -> None:
        print(json.dumps(server.status()), file=sys.stderr, flush=True)

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGUSR1, dump)
    if ready is not None:
        ready(server)
    try:
        await stop.wait()
    finally:
        await server.close()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
                loop.remove_signal_handler(sig)
    return server.status()


def run_in_thread(model: CloudModel, config: ServerConfig, tcp: list[str] | None = None,
                  serial: list[str] | None = None, baud: int = 115200,
                  status: str | None = None) -> tuple[Server, Callable[[], dict[str, Any]]]:
    """Start a server in a background thread (for the demo, benchmark and tests); returns the server once it
    listens and a function that stops it and returns its final status."""
    started = threading.Event()
    box: dict[str, Any] = {}

    def target() -> None:
        async def main() -> None:
            box["stop"] = asyncio.Event()
            box["loop"] = asyncio.get_running_loop()

            def ready(s: Server) -> None:
                box["server"] = s
                started.set()

            try:
                box["status"] = await serve(model, config, tcp or [], serial or [], baud, status, ready,
                                            box["stop"])
            except BaseException as exc:
                box["error"] = exc
                started.set()

        asyncio.run(main())

    th = threading.Thread(target=target, name="lwfc-server", daemon=True)
    th.start()
    started.wait(60)
    if "error" in box:
        raise box["error"]

    def stop() -> dict[str, Any]:
        box["loop"].call_soon_threadsafe(box["stop"].set)
        th.join(10)
        return box.get("status", {})

    return box["server"], stop
