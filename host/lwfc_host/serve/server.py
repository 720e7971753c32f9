"""The inference server: many devices at once over TCP, UDP and serial lines (codec_spec/PROTOCOL.md), and as
one worker of a pool sharing a broker's MQTT topics (``lwfc_host.serve.mqtt``, PROTOCOL.md 11).

Each connection is one asyncio task running a ``Connection`` (the per-connection state machine) that parses
messages with the device's own resynchronising parser, answers every DATA with a RESULT or an ERROR, and
processes its frames in order. Decoding (constriction) and the cloud half (onnxruntime) run in a thread
pool, where connections take turns (``FairScheduler``), so a busy device neither stalls nor queues ahead of
the others. Memory is bounded: a connection reads only
while it has few frames in work, its parser buffer never exceeds ``max_message`` plus one read, and the
number of connections is capped (``ServerConfig``): in all, per IP address, and for connections that have
not completed HELLO yet, so that neither one address nor silent peers can take every slot.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import json
import time
from typing import Any

import numpy as np

from lwfc import protocol as P
from lwfc.errors import FrameError
from lwfc_host.serve.cloud import CloudModel
from lwfc_host.serve.config import READ_CHUNK, ServerConfig, ServerError
from lwfc_host.serve.connection import Connection
from lwfc_host.serve.datagram import DatagramServer
from lwfc_host.serve.metrics import Metrics
from lwfc_host.serve.mqtt import DEFAULT_GROUP, MqttWorker
from lwfc_host.serve.scheduler import FairScheduler
from lwfc_host.serve.streams import SerialStream, Stream, TcpStream


class Server:
    """The inference server. ``await start_tcp(...)`` / ``start_serial(...)``, then run until ``close()``
    (``runner.serve`` does both)."""

    def __init__(self, model: CloudModel, config: ServerConfig | None = None):
        self.model = model
        self.config = config or ServerConfig()
        self.max_message = self.config.max_message or max(model.max_frame, 1 << 16)
        self.metrics = Metrics()
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=self.config.workers,
                                                              thread_name_prefix="lwfc-work")
        self.scheduler = FairScheduler(self.executor, self.config.workers)
        self.tcp_servers: list[asyncio.base_events.Server] = []
        self.tasks: set[asyncio.Task[Any]] = set()
        self.addresses: list[str] = []
        self.per_address: collections.Counter[str] = collections.Counter()  # open connections by peer IP
        self.pending = 0  # open connections that have not completed HELLO
        self.datagram_endpoints: list[DatagramServer] = []
        self.mqtt_workers: list[MqttWorker] = []

    def emit(self, record: dict[str, Any]) -> None:
        """Write one structured log record (stamped with the time), if a log sink is configured."""
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

    def work_slices(self, frames: list[bytes], session_table: bytes | None) -> tuple[str, Any]:
        """Decode the slices of one tensor, conceal what is missing and infer (in a worker thread): ("ok",
        (result, elements, decode_ms, infer_ms)) with ``concealed`` (the fraction of the tensor's elements no
        slice covered), ``slices`` and ``concealment`` in the result; ("error", (code, message)) when no slice
        decoded (PROTOCOL.md 10.4)."""
        assembly, table_id, errors, dec_ms = self.model.decode_slices(frames)
        if table_id is None:
            why = errors[0] if errors else "no slice"
            code = P.E_TABLE_MISMATCH if why.startswith("TableMismatch") else P.E_BAD_FRAME
            return "error", (code, f"no slice of the tensor decoded ({len(frames)} received): {why}")
        if session_table is not None and table_id != session_table:
            return "error", (P.E_TABLE_MISMATCH, f"slices use table {table_id.hex()}, the session announced "
                                                 f"{session_table.hex()}")
        t0 = time.perf_counter()
        concealed = self.model.conceal(assembly, table_id)
        dec_ms += (time.perf_counter() - t0) * 1000
        try:
            result, inf_ms = self.model.infer(concealed.tensor)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            return "error", (P.E_INFERENCE, f"cloud half failed: {type(exc).__name__}: {exc}")
        nbytes = sum(len(f) for f in frames)
        n_el = int(np.prod(assembly.shape))
        received = n_el * (1.0 - concealed.concealed)
        result.update({"ok": True, "bits_per_element": round(8.0 * nbytes / max(received, 1.0), 6),
                       "decode_ms": round(dec_ms, 3), "infer_ms": round(inf_ms, 3),
                       "concealed": round(concealed.concealed, 6), "slices": assembly.slices,
                       "concealment": concealed.method})
        if errors:
            result["slice_errors"] = errors[:8]
        return "ok", (result, int(round(received)), dec_ms, inf_ms)

    # --- accepting streams ------------------------------------------------------------------------------

    def _over_quota(self, address: str) -> str | None:
        """Why a new connection from ``address`` must be refused (BUSY), or None. Counts include it."""
        cfg = self.config
        if self.metrics.connections_open > cfg.max_connections:
            return f"too many connections (limit {cfg.max_connections})"
        if address and self.per_address[address] > cfg.max_per_address:
            return f"too many connections from {address} (limit {cfg.max_per_address})"
        if self.pending > cfg.max_pending:
            return f"too many connections waiting to say HELLO (limit {cfg.max_pending})"
        return None

    def admitted(self, conn: Connection) -> None:
        """``conn`` completed its first HELLO: it no longer counts against the pre-HELLO quota."""
        self.pending -= 1

    async def _run_connection(self, stream: Stream) -> None:
        """Serve one stream, within the connection quotas; every slot it takes is released however it ends."""
        m = self.metrics
        address = stream.address
        with m.lock:
            m.connections_total += 1
            m.connections_open += 1
        self.per_address[address] += 1
        self.pending += 1
        conn = Connection(self, stream)
        try:
            reason = self._over_quota(address)
            if reason is not None:
                await self._refuse_busy(stream, reason)
                return
            await conn.run()
        finally:
            if not conn.admitted:
                self.pending -= 1
            self.per_address[address] -= 1
            if not self.per_address[address]:
                del self.per_address[address]
            with m.lock:
                m.connections_open -= 1

    async def _refuse_busy(self, stream: Stream, reason: str) -> None:
        with self.metrics.lock:
            self.metrics.refused += 1
        self.emit({"event": "refuse", "peer": stream.name, "code": "BUSY", "reason": reason})
        try:  # no session, no answer queue: say why directly, then hang up
            await stream.write(P.pack_json(P.REFUSE, 0, {"code": P.R_BUSY, "reason": reason}))
        except (ConnectionError, OSError, asyncio.TimeoutError):
            pass
        await stream.close()

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

    async def start_udp(self, host: str, port: int) -> tuple[str, int]:
        """Serve datagram sessions on a UDP host:port (port 0: any free port; PROTOCOL.md 10); returns the bound
        address."""
        loop = asyncio.get_running_loop()
        try:
            transport, endpoint = await loop.create_datagram_endpoint(lambda: DatagramServer(self),
                                                                      local_addr=(host, port))
        except OSError as exc:
            raise ServerError(f"cannot listen for datagrams on {host}:{port}: {exc.strerror}") from exc
        self.datagram_endpoints.append(endpoint)
        addr = transport.get_extra_info("sockname")[:2]
        self.addresses.append(f"udp://{addr[0]}:{addr[1]}")
        return addr[0], addr[1]

    async def start_mqtt(self, url: str, group: str = DEFAULT_GROUP, login: tuple[str, str] | None = None) -> str:
        """Join the pool of workers ``group`` on the broker of ``mqtt://HOST:PORT/PREFIX`` (PROTOCOL.md 11); returns
        the shared subscription once the broker acknowledged it."""
        worker = MqttWorker(self, url, group, login)
        await asyncio.get_running_loop().run_in_executor(None, worker.start)
        self.mqtt_workers.append(worker)
        self.addresses.append(f"{url} ({worker.filter})")
        return worker.filter

    def start_serial(self, device: str, baud: int) -> None:
        """Serve the serial line ``device`` (one connection for as long as the server runs)."""
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

    # --- status and shutdown ----------------------------------------------------------------------------

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
        """The metrics snapshot plus what is served: model, bundle id, tables, addresses, message limit."""
        s = self.metrics.snapshot()
        s.update({"model": self.model.model_name, "bundle": self.model.bundle_id, "tables": self.model.table_ids(),
                  "listening": self.addresses, "max_message": self.max_message})
        if self.datagram_endpoints:
            s["datagram"] = [e.status() for e in self.datagram_endpoints]
        if self.mqtt_workers:
            s["mqtt"] = [w.status() for w in self.mqtt_workers]
        return s

    async def close(self) -> None:
        """Stop listening, cancel every connection and drop the work not started."""
        for srv in self.tcp_servers:
            srv.close()
        for endpoint in self.datagram_endpoints:
            await endpoint.close()
        loop = asyncio.get_running_loop()
        for worker in self.mqtt_workers:
            await loop.run_in_executor(None, worker.stop)
        tasks = [t for t in self.tasks if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.executor.shutdown(wait=False, cancel_futures=True)
