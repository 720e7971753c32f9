"""One connection's state machine (codec_spec/PROTOCOL.md 5): handshake, sequence tracking, answers.

States: *no session* (HELLO, PING, PONG and BYE are taken; DATA is answered NO_SESSION, other types
BAD_TYPE) -> HELLO checked -> WELCOME -> *session* (each DATA is decoded and answered RESULT or ERROR, in
seq order; a tensor sent as SLICE messages, a serial line in datagram mode, is answered once its slices tile it
or its slice deadline has passed, the rest concealed: PROTOCOL.md 10.6) -> BYE, REFUSE, a timeout, a fatal
error or the end of the stream. A new HELLO restarts the
session. On a stream that cannot be closed (a serial line) every "close" becomes "forget the session and go
on reading".

Memory is bounded: a connection reads only while fewer than ``ServerConfig.pipeline`` answers are due, and
its parser buffer never exceeds the message limit plus one read (4 KiB before WELCOME). Time is bounded by
absolute deadlines (PROTOCOL.md 7): HELLO within ``hello_timeout_s`` of connecting, each message within
``message_timeout_s`` of its first byte, a valid message every ``idle_timeout_s`` in a session. Work is
bounded: a frame whose header does not match the bundle's feature shape is refused before any decoding.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from typing import TYPE_CHECKING, Any, Protocol

from lwfc import protocol as P
from lwfc.errors import FrameError
from lwfc_host.serve.config import FATAL_LINGER_S, MAX_PRE_SESSION_MESSAGE, ServerConfig
from lwfc_host.serve.metrics import Metrics
from lwfc_host.serve.slices import ADDED, DUPLICATE, REJECTED, PendingTensor
from lwfc_host.serve.streams import Stream

if TYPE_CHECKING:
    from lwfc_host.serve.cloud import CloudModel
    from lwfc_host.serve.scheduler import FairScheduler


class Host(Protocol):
    """What a connection uses of its server (``lwfc_host.serve.server.Server``)."""

    model: CloudModel
    config: ServerConfig
    max_message: int
    metrics: Metrics
    scheduler: FairScheduler

    def emit(self, record: dict[str, Any]) -> None: ...

    def work(self, frame: bytes, session_table: bytes | None) -> tuple[str, Any]: ...

    def work_slices(self, frames: list[bytes], session_table: bytes | None) -> tuple[str, Any]: ...

    def admitted(self, conn: Connection) -> None: ...


def table_id_of(text: str) -> bytes:
    """HELLO's table id (hex) as bytes; b"" (no table has it) when it is not hex."""
    try:
        return bytes.fromhex(text)
    except ValueError:
        return b""


def check_hello(model: CloudModel, cfg: ServerConfig, hello: dict[str, Any]) -> tuple[int, str] | None:
    """Why a HELLO (PROTOCOL.md 5.1) must be refused by a host serving ``model`` with ``cfg``, as (REFUSE code,
    reason), or None. The first failing check names it. Byte streams and datagram hosts share it."""
    dev = hello.get("device")
    if hello.get("protocol") != P.PROTOCOL_VERSION:
        return P.R_PROTOCOL, (f"protocol {hello.get('protocol')!r} unsupported; this host speaks "
                              f"{P.PROTOCOL_VERSION}")
    if not isinstance(dev, str) or not 1 <= len(dev) <= 64 or not all(32 < ord(ch) < 127 for ch in dev):
        return P.R_BAD_HELLO, "device must be 1-64 printable ASCII characters without spaces"
    if not isinstance(hello.get("table"), str) or not isinstance(hello.get("model", ""), str):
        return P.R_BAD_HELLO, "table and model must be strings"
    if hello.get("model") and hello["model"] != model.model_name:
        return P.R_MODEL, f"this host serves model {model.model_name!r}, not {hello['model']!r}"
    if hello.get("bundle") and hello["bundle"] != model.bundle_id:
        return P.R_MODEL, f"this host serves bundle {model.bundle_id}, not {hello['bundle']}"
    if table_id_of(hello["table"]) not in model.tables:
        return P.R_TABLE, f"unknown table {hello['table']!r}; this host has {', '.join(model.table_ids())}"
    wants_auth = bool(hello.get("auth"))
    if not wants_auth and dev in cfg.keys:
        return P.R_AUTH, f"device {dev!r} has a key: it must authenticate"
    if cfg.require_auth and not wants_auth:
        return P.R_AUTH, "this host requires authenticated sessions"
    if wants_auth and cfg.keys.get(dev) is None:
        return P.R_AUTH, f"no key for device {dev!r}"
    return None


def _settle(answer: asyncio.Future[bytes | None], task: asyncio.Task[bytes]) -> None:
    """Give ``answer`` the outcome of the task that computed it."""
    if answer.done():
        return
    if task.cancelled():
        answer.cancel()
    elif task.exception() is not None:
        answer.set_exception(task.exception())
    else:
        answer.set_result(task.result())


class Connection:
    """One byte stream: handshake, sequence tracking, answers (PROTOCOL.md 5)."""

    def __init__(self, server: Host, stream: Stream):
        self.server = server
        self.stream = stream
        self.cfg = server.config
        # Until WELCOME a peer may send only HELLO and PING: nothing larger is buffered for it.
        self.parser = P.Parser(MAX_PRE_SESSION_MESSAGE)
        self.session: dict[str, Any] | None = None
        self.admitted = False  # completed a HELLO once (the server's pre-HELLO quota no longer counts it)
        now = time.monotonic()
        self.accepted_at = now
        self.last_valid_at = now  # the last valid message
        self.partial_since: float | None = None  # when the bytes of an incomplete message began to arrive
        self.unverified = 0  # messages ignored in an authenticated session because they could not be verified
        self.auth: P.Auth | None = None
        self.expected = 1  # the seq the next DATA should carry
        self.table_id: bytes | None = None
        self.closing = False
        self.linger_s = 0.0  # how long closing waits for the peer to take the last answers (FATAL_LINGER_S)
        self.frames = 0
        self.errors = 0
        # Answers in the order they are due: futures of message bytes. Bounded: reading stops while it is
        # full, so a connection holds at most ``pipeline`` frames in work (memory and fairness).
        self.outq: asyncio.Queue[asyncio.Future[bytes | None] | None] = asyncio.Queue(maxsize=max(1, self.cfg.pipeline))
        self.sender: asyncio.Task[None] | None = None
        # tensors arriving as SLICE messages (PROTOCOL.md 10.6), by seq, and the events that close them early
        self.open: dict[int, PendingTensor] = {}
        self.open_done: dict[int, asyncio.Event] = {}

    # --- answers, in order ---------------------------------------------------------------------------

    def _pack(self, mtype: int, seq: int, body: bytes = b"") -> bytes:
        return P.pack_message(mtype, seq, body, self.auth)

    async def send(self, data: bytes) -> None:
        """Queue a message behind every answer already due."""
        fut: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
        fut.set_result(data)
        await self._enqueue(fut)

    async def _enqueue(self, fut: asyncio.Future[bytes | None]) -> None:
        """Queue an answer; ConnectionError once the sender has died (the peer reset or stopped reading). The wait
        for room races the sender: a sender that dies while the queue is full must not leave us waiting forever
        (that leaked the connection's slot)."""
        sender = self.sender
        if sender is None:
            await self.outq.put(fut)
            return
        if sender.done():
            raise ConnectionError("the peer stopped taking answers")
        put = asyncio.ensure_future(self.outq.put(fut))
        await asyncio.wait({put, sender}, return_when=asyncio.FIRST_COMPLETED)
        if not put.done():
            put.cancel()
            raise ConnectionError("the peer stopped taking answers")

    async def _send_loop(self) -> None:
        while True:
            item = await self.outq.get()
            if item is None:
                return
            data = await item
            if data:
                await self.stream.write(data)

    async def error(self, seq: int, code: int, text: str, count: int = 1) -> None:
        """Answer ERROR ``code`` for ``count`` seqs from ``seq`` on (and count it)."""
        self._count_error(seq, code, text, count)
        await self.send(P.pack_error(seq, code, text, count, self.auth))

    def _count_error(self, seq: int, code: int, text: str, count: int = 1) -> None:
        m = self.server.metrics
        with m.lock:
            m.errors[P.ERROR_NAMES.get(code, str(code))] += count
        self.errors += count
        self.server.emit({"event": "error", "peer": self.stream.name, "device": self._device(), "seq": seq,
                          "count": count, "code": P.ERROR_NAMES.get(code, code), "message": text})

    def _device(self) -> str | None:
        return self.session.get("device") if self.session else None

    # --- the handshake (5.1) ------------------------------------------------------------------------------

    async def refuse(self, code: int, reason: str) -> None:
        """Answer REFUSE and end the session (and the connection, where it can be closed)."""
        with self.server.metrics.lock:
            self.server.metrics.refused += 1
        self.server.emit({"event": "refuse", "peer": self.stream.name, "code": P.REFUSE_NAMES.get(code),
                          "reason": reason})
        await self.send(P.pack_json(P.REFUSE, 0, {"code": code, "reason": reason}))
        self.session = None
        self.closing = self.stream.closable

    def check_hello(self, hello: dict[str, Any]) -> tuple[int, str] | None:
        """Why a HELLO must be refused, as (REFUSE code, reason), or None. The first failing check names it."""
        return check_hello(self.server.model, self.cfg, hello)

    async def on_hello(self, msg: P.Message) -> None:
        """Check HELLO (5.1) and answer WELCOME or REFUSE. A new HELLO restarts the session."""
        self.session, self.auth, self.parser.auth = None, None, None
        try:
            hello = P.parse_json(msg.body, "HELLO")
        except P.ProtocolError as exc:
            await self.refuse(P.R_BAD_HELLO, str(exc))
            return
        refusal = self.check_hello(hello)
        if refusal is not None:
            await self.refuse(*refusal)
            return
        await self.welcome(hello["device"], table_id_of(hello["table"]), bool(hello.get("auth")))

    async def welcome(self, dev: str, tid: bytes, wants_auth: bool) -> None:
        """Answer WELCOME to a checked HELLO and start the session (authenticated: tags from here on)."""
        welcome: dict[str, Any] = {
            "protocol": P.PROTOCOL_VERSION, "session": secrets.token_hex(8),
            "max_message": self.server.max_message, "keepalive_s": self.cfg.keepalive_s,
            "timeout_s": self.cfg.idle_timeout_s, "classes": len(self.server.model.class_names),
        }
        nonce = None
        if wants_auth:
            nonce = secrets.token_bytes(16)
            welcome["nonce"] = nonce.hex()
        await self.send(P.pack_json(P.WELCOME, 0, welcome))  # untagged: the device needs the nonce first
        if nonce is not None:
            self.auth = P.Auth(self.cfg.keys[dev], nonce)
            self.parser.auth = self.auth
        self.parser.max_message = self.server.max_message
        if not self.admitted:
            self.admitted = True
            self.server.admitted(self)
        self.session = {"device": dev, "session": welcome["session"], "auth": wants_auth}
        self.table_id = tid
        self.expected = 1
        self.server.emit({"event": "session", "peer": self.stream.name, "device": dev,
                          "session": welcome["session"], "table": tid.hex(), "auth": wants_auth})

    # --- DATA (5.2, 5.3) ----------------------------------------------------------------------------------

    async def on_data(self, msg: P.Message) -> None:
        """Answer a DATA: DUPLICATE for an old seq; MISSING for any seqs it skipped, then its own answer."""
        seq = msg.seq
        ahead = P.seq_ahead(seq, self.expected)
        if ahead < 0:
            await self.error(seq, P.E_DUPLICATE, f"seq {seq} was already answered (expected {self.expected})")
            return
        if ahead > self.cfg.max_seq_gap:  # no device skips that many: answer it alone, keep the expected seq
            await self.error(seq, P.E_BAD_MESSAGE, f"seq {seq} is {ahead} ahead of the expected {self.expected} "
                                                   f"(the limit is {self.cfg.max_seq_gap})")
            return
        if ahead > 0:
            s = self.expected
            while ahead > 0:  # the host answers every seq it skipped (5.2)
                n = min(ahead, 65535)
                await self.error(s, P.E_MISSING, f"DATA {s}..{(s + n - 1) % P.SEQ_MOD} never arrived", n)
                s = (s + n) % P.SEQ_MOD
                ahead -= n
        self.expected = P.next_seq(seq)
        frame = bytes(msg.body)
        try:  # before any work: a header that does not fit the bundle costs no decoding (PROTOCOL.md 7)
            self.server.model.check_header(frame)
        except FrameError as exc:
            await self.error(seq, P.E_BAD_FRAME, f"{type(exc).__name__}: {exc}")
            return
        await self.process(seq, frame)

    async def on_data_skipped(self, seq: int) -> None:
        """Account for a corrupt DATA's seq like a received one (MISSING for the gap before it)."""
        ahead = P.seq_ahead(seq, self.expected)
        if ahead > 0:
            await self.error(self.expected, P.E_MISSING, f"DATA {self.expected}.. never arrived", ahead)
        self.expected = P.next_seq(seq)

    async def process(self, seq: int, frame: bytes) -> None:
        """Start decoding and inference of one frame; its answer takes its place in the answer queue."""
        task = asyncio.get_running_loop().create_task(self._work(seq, frame, self.table_id, self.auth))
        try:
            await self._enqueue(task)
        except BaseException:
            task.cancel()  # nobody will send its answer
            raise

    async def _work(self, seq: int, frame: bytes, table_id: bytes | None, auth: P.Auth | None) -> bytes:
        """The answer to DATA ``seq``: the frame decoded and inferred in a worker thread, counted and logged."""
        srv = self.server
        t0 = time.perf_counter()
        try:
            kind, payload = await srv.scheduler.run(self, srv.work, frame, table_id)
        except Exception as exc:  # noqa: BLE001 - a bug in a worker must not take the server down
            kind, payload = "error", (P.E_INFERENCE, f"internal error: {type(exc).__name__}: {exc}")
        if kind == "error":
            code, text = payload
            self._count_error(seq, code, text)
            return P.pack_error(seq, code, text, 1, auth)
        return self._result(seq, payload, len(frame), t0, auth)

    def _result(self, seq: int, payload: Any, nbytes: int, t0: float, auth: P.Auth | None) -> bytes:
        """Count and log a frame's (or a sliced tensor's) result; its RESULT message."""
        srv = self.server
        result, n_el, dec_ms, inf_ms = payload
        total_ms = (time.perf_counter() - t0) * 1000
        m = srv.metrics
        with m.lock:
            m.frames += 1
            m.bytes += nbytes
            m.elements += n_el
            m.decode_ms.append(dec_ms)
            m.infer_ms.append(inf_ms)
            m.total_ms.append(total_ms)
            if "concealed" in result:
                m.sliced_tensors += 1
                m.concealed_sum += result["concealed"]
                m.concealed_tensors += result["concealed"] > 0
        self.frames += 1
        srv.emit({"event": "frame", "peer": self.stream.name, "device": self._device(), "seq": seq,
                  "bytes": nbytes, "elements": n_el, "bits_per_element": result["bits_per_element"],
                  "decode_ms": round(dec_ms, 3), "infer_ms": round(inf_ms, 3), "server_ms": round(total_ms, 3),
                  "top1": result.get("top", [[None]])[0] if result.get("top") else None,
                  **({"detections": len(result["detections"])} if "detections" in result else {}),
                  **({"concealed": result["concealed"], "slices": result["slices"]} if "concealed" in result
                     else {})})
        return P.pack_message(P.RESULT, seq, json.dumps(result).encode(), auth)

    # --- SLICE: a serial line in datagram mode (PROTOCOL.md 10.6) ----------------------------------------

    async def on_slice(self, msg: P.Message) -> None:
        """One slice of the tensor ``msg.seq``: the first one of a new seq opens the tensor (answering MISSING for
        any seqs it skipped) and takes its place in the answer queue; the answer waits until the slices tile the
        tensor or the slice deadline has passed, then the rest is concealed. A slice of a tensor already closed is
        dropped (late): every seq is answered once."""
        seq = msg.seq
        srv = self.server
        with srv.metrics.lock:
            srv.metrics.slices += 1
        pt = self.open.get(seq)
        if pt is None:
            ahead = P.seq_ahead(seq, self.expected)
            if ahead < 0:
                with srv.metrics.lock:
                    srv.metrics.slices_late += 1
                return
            if ahead > self.cfg.max_seq_gap:
                await self.error(seq, P.E_BAD_MESSAGE, f"seq {seq} is {ahead} ahead of the expected {self.expected} "
                                                       f"(the limit is {self.cfg.max_seq_gap})")
                return
            if ahead > 0:
                await self.on_data_skipped(seq)
            self.expected = P.next_seq(seq)
            pt = PendingTensor(seq, srv.model.bundle.feature_shape, self.table_id)
            self.open[seq] = pt
            self._offer(pt, msg)
            # its place in the answer queue first (this waits while ``pipeline`` answers are due: no slices are
            # read meanwhile), then the deadline starts
            loop = asyncio.get_running_loop()
            answer: asyncio.Future[bytes | None] = loop.create_future()
            try:
                await self._enqueue(answer)
            except BaseException:
                self.open.pop(seq, None)
                raise
            done = self.open_done[seq] = asyncio.Event()
            if pt.complete:
                done.set()
            task = loop.create_task(self._slice_work(seq, pt, done, self.table_id, self.auth))
            task.add_done_callback(lambda t, answer=answer: _settle(answer, t))
            answer.add_done_callback(lambda a, task=task: task.cancel() if a.cancelled() else None)
            return
        self._offer(pt, msg)
        if pt.complete and seq in self.open_done:
            self.open_done[seq].set()

    def _offer(self, pt: PendingTensor, msg: P.Message) -> None:
        srv = self.server
        outcome = pt.offer(bytes(msg.body), srv.model.check_slice_header)
        if outcome != ADDED:
            with srv.metrics.lock:
                if outcome == DUPLICATE:
                    srv.metrics.slices_duplicate += 1
                elif outcome == REJECTED:
                    srv.metrics.slices_rejected += 1

    async def _slice_work(self, seq: int, pt: PendingTensor, done: asyncio.Event, table_id: bytes | None,
                          auth: P.Auth | None) -> bytes:
        """The answer to tensor ``seq``: after its slices tile it or its deadline, decoded, concealed, inferred."""
        try:
            await asyncio.wait_for(done.wait(), self.cfg.slice_deadline_s)
        except asyncio.TimeoutError:
            pass
        finally:
            self.open.pop(seq, None)
            self.open_done.pop(seq, None)
        srv = self.server
        t0 = time.perf_counter()
        if not pt.frames:
            why = pt.rejected[0] if pt.rejected else "no slice"
            code = P.E_TABLE_MISMATCH if why.startswith("TableMismatch") else P.E_BAD_FRAME
            text = f"no slice of tensor {seq} fits this host ({pt.rejected_count} rejected): {why}"
            self._count_error(seq, code, text)
            return P.pack_error(seq, code, text, 1, auth)
        try:
            kind, payload = await srv.scheduler.run(self, srv.work_slices, pt.frames, table_id)
        except Exception as exc:  # noqa: BLE001 - a bug in a worker must not take the server down
            kind, payload = "error", (P.E_INFERENCE, f"internal error: {type(exc).__name__}: {exc}")
        if kind == "error":
            code, text = payload
            self._count_error(seq, code, text)
            return P.pack_error(seq, code, text, 1, auth)
        if pt.rejected_count:
            payload[0]["slices_rejected"] = pt.rejected_count
        return self._result(seq, payload, pt.bytes, t0, auth)

    # --- dispatch ---------------------------------------------------------------------------------------

    async def on_message(self, msg: P.Message) -> None:
        """One valid message: the state machine's transitions."""
        self.last_valid_at = time.monotonic()
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
        elif t == P.SLICE:
            await self.on_slice(msg)
        else:
            await self.error(msg.seq, P.E_BAD_TYPE, f"unexpected message type {t} from a device")

    async def on_event(self, ev: Any) -> None:
        """One parser event: a valid message, or a damaged one (CORRUPT, TOO_LARGE, BAD_AUTH)."""
        if isinstance(ev, P.Message):
            await self.on_message(ev)
            return
        kind, mtype, seq, length = ev
        if self.auth is not None and kind in (P.CORRUPT, P.BAD_AUTH):
            # An authenticated session acts only on what it can verify (PROTOCOL.md 8): anything else may be
            # injected. The parser has counted it against the garbage budget, which ends a flood of it.
            self.unverified += 1
            self.server.emit({"event": "unverified", "peer": self.stream.name, "device": self._device(),
                              "why": kind, "type": mtype, "seq": seq, "bytes": length})
            return
        if kind == P.CORRUPT:
            if mtype == P.DATA and self.session is not None:
                # the header (and so seq) passed its CRC: answer it and move on
                if 0 <= P.seq_ahead(seq, self.expected) <= self.cfg.max_seq_gap:
                    await self.on_data_skipped(seq)
                await self.error(seq, P.E_CORRUPT, f"DATA {seq}: body of {length} bytes failed its CRC")
        elif kind == P.TOO_LARGE:
            limit = self.parser.max_message
            await self.error(seq, P.E_TOO_LARGE, f"message of {length} bytes exceeds the limit {limit}"
                                                 f"{'' if self.session else ' before WELCOME'}; closing")
            self.closing = True
            if not self.stream.closable:  # a serial line cannot be closed: start over on it
                self.parser = P.Parser(MAX_PRE_SESSION_MESSAGE)
                self.session = None
                self.closing = False

    # --- the read loop ----------------------------------------------------------------------------------

    async def on_bytes(self, data: bytes) -> bool:
        """Parse and answer what ``data`` completes; False when the connection must end (too much garbage)."""
        srv = self.server
        g0 = self.parser.garbage
        self.parser.feed(data)
        for ev in self.parser:
            await self.on_event(ev)
            if self.closing:
                break
        if not self.parser.pending():
            self.partial_since = None
        elif self.partial_since is None:
            self.partial_since = time.monotonic()
        with srv.metrics.lock:
            srv.metrics.garbage += self.parser.garbage - g0
            srv.metrics.max_buffered = max(srv.metrics.max_buffered, self.parser.max_buffered)
        if self.parser.garbage_since_valid > self.cfg.max_garbage and not self.closing:
            why = f" ({self.unverified} unverifiable messages: a wrong key?)" if self.unverified else ""
            await self.error(0, P.E_GARBAGE, f"{self.parser.garbage_since_valid} bytes without a valid "
                                             f"message{why}; closing")
            if self.stream.closable:
                self.linger_s = FATAL_LINGER_S
                return False
            self.parser.garbage_since_valid = 0
        return True

    def deadline(self) -> tuple[float, str]:
        """The earliest absolute deadline now running (monotonic seconds) and its name (PROTOCOL.md 7)."""
        cfg = self.cfg
        if self.session is None:
            # no session yet (or any more): HELLO is due, counted from the connection's start, never extended
            due = (self.accepted_at + cfg.hello_timeout_s, "hello timeout")
        else:
            due = (self.last_valid_at + cfg.idle_timeout_s, "idle timeout")
        if self.partial_since is not None:
            due = min(due, (self.partial_since + cfg.message_timeout_s, "message timeout"))
        return due

    async def run(self) -> None:
        """Serve the stream until it ends, misses a deadline, or the state machine closes it; then deliver what is
        due. A serial line has no deadlines: it cannot be closed, and a quiet line is normal."""
        srv = self.server
        self.sender = asyncio.get_running_loop().create_task(self._send_loop())
        try:
            while not self.closing and not self.sender.done():
                due, why = self.deadline()
                timeout = max(0.0, due - time.monotonic()) if self.stream.closable else None
                try:
                    data = await asyncio.wait_for(self.stream.read(), timeout)
                except asyncio.TimeoutError:
                    srv.emit({"event": "timeout", "peer": self.stream.name, "device": self._device(), "why": why})
                    await self.send(self._pack(P.BYE, 0, why.encode()))
                    break
                if not data:
                    if self.parser.pending():
                        srv.emit({"event": "truncated", "peer": self.stream.name, "device": self._device(),
                                  "bytes": self.parser.pending()})
                    break
                if not await self.on_bytes(data):
                    break
        except (ConnectionError, OSError, asyncio.TimeoutError) as exc:
            srv.emit({"event": "disconnect", "peer": self.stream.name, "device": self._device(), "why": str(exc)})
        finally:
            await self._finish_sending()
            if self.stream.closable:
                await self.stream.close(self.linger_s)

    async def _finish_sending(self) -> None:
        """Send the answers still due (frames in work finish first), then stop the sender."""
        sender = self.sender
        if sender is None:
            return
        try:
            if not sender.done():
                # the end marker waits for room behind the answers due; a sender that dies meanwhile (the
                # peer reset) must not leave us waiting for room that never comes, holding the slot
                put = asyncio.ensure_future(self.outq.put(None))
                done, _ = await asyncio.wait({put, sender}, timeout=self.cfg.idle_timeout_s,
                                             return_when=asyncio.FIRST_COMPLETED)
                if put not in done:
                    put.cancel()
                    raise ConnectionError("the peer stopped taking answers")
            await asyncio.wait_for(sender, self.cfg.idle_timeout_s)
        except (ConnectionError, OSError, asyncio.TimeoutError) as exc:
            self.server.emit({"event": "disconnect", "peer": self.stream.name, "device": self._device(),
                              "why": f"answers not delivered: {exc}"})
        finally:
            if not sender.done():
                sender.cancel()
            elif not sender.cancelled():
                sender.exception()  # retrieved: a sender that died of a reset is expected, not a stray error
            while not self.outq.empty():  # work whose answers can no longer be sent: let it finish quietly
                item = self.outq.get_nowait()
                if item is not None and not item.done():
                    item.cancel()
