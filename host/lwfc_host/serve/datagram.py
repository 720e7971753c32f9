"""The datagram host (codec_spec/PROTOCOL.md 10): devices send each tensor as slices, one SLICE message per UDP
datagram, under the tensor's seq; the host assembles the slices of each seq until they tile the tensor or
``ServerConfig.slice_deadline_s`` has passed since the first one, conceals what is missing, runs the cloud half
and answers once per seq (RESULT with the concealed fraction, or ERROR).

A session belongs to the peer's address (IP, port). Nothing is retransmitted and nothing is ordered: a slice
that arrives after its tensor was answered is dropped (counted as late), a seq none of whose slices arrived is
answered ERROR MISSING once a later seq has been answered, a lost answer is the device's LOST. Every datagram is
parsed alone (``lwfc.protocol.parse_datagram``): one that is not exactly one valid message, or one that an
authenticated session cannot verify, is dropped without an answer. Memory is bounded by the number of sessions
(``max_connections``, ``max_per_address`` per IP), the tensors each may have open (``max_open_tensors``) and the
size of a tensor (slices may not overlap). A host never sends a peer without a session an answer larger than
the datagram it answers, and answers no HELLO shorter than ``MIN_HELLO_DATAGRAM`` (no reflection
amplification).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from lwfc import protocol as P
from lwfc.datagram import MIN_HELLO_DATAGRAM
from lwfc_host.serve.config import ServerConfig
from lwfc_host.serve.connection import check_hello, table_id_of
from lwfc_host.serve.metrics import Metrics
from lwfc_host.serve.slices import ADDED, DUPLICATE, REJECTED, PendingTensor

if TYPE_CHECKING:
    from lwfc_host.serve.cloud import CloudModel
    from lwfc_host.serve.scheduler import FairScheduler

Address = Any  # (host, port) as asyncio reports it


class Host(Protocol):
    """What a datagram endpoint uses of its server (``lwfc_host.serve.server.Server``)."""

    model: CloudModel
    config: ServerConfig
    max_message: int
    metrics: Metrics
    scheduler: FairScheduler

    def emit(self, record: dict[str, Any]) -> None: ...

    def work_slices(self, frames: list[bytes], session_table: bytes | None) -> tuple[str, Any]: ...


@dataclass(eq=False)
class DatagramSession:
    """One device's session on a datagram host."""

    address: Address
    device: str
    token: str  # WELCOME's ``session``
    hello_body: bytes  # a repeated HELLO with exactly this body gets the same WELCOME again
    welcome: bytes
    auth: P.Auth | None
    table_id: bytes
    created_at: float
    last_valid_at: float
    floor: int = 1  # the lowest seq not yet answered (or open)
    open: dict[int, PendingTensor] = field(default_factory=dict)
    timers: dict[int, asyncio.TimerHandle] = field(default_factory=dict)
    answered: set[int] = field(default_factory=set)  # answered seqs at or above ``floor``
    tensors: int = 0
    unverified: int = 0
    closed: bool = False


class DatagramServer(asyncio.DatagramProtocol):
    """The datagram endpoint of a ``Server``: its model, config, metrics, worker scheduler and log."""

    def __init__(self, server: Host):
        self.server = server
        self.cfg = server.config
        self.model = server.model
        self.metrics = server.metrics
        self.transport: asyncio.DatagramTransport | None = None
        self.sessions: dict[Address, DatagramSession] = {}
        # A new HELLO from the address of an authenticated session: the new session waits here until a message
        # verifies under its nonce (so a forged HELLO cannot end a device's session), or for the idle timeout.
        self.pending: dict[Address, DatagramSession] = {}
        self.sweeper: asyncio.Task[None] | None = None
        self.tasks: set[asyncio.Task[Any]] = set()

    # --- asyncio callbacks --------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.sweeper = asyncio.get_running_loop().create_task(self._sweep())

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP port unreachable from a device that went away: its session times out

    def datagram_received(self, data: bytes, addr: Address) -> None:
        try:
            self._on_datagram(data, addr)
        except Exception as exc:  # noqa: BLE001 - one bad datagram must never stop the endpoint
            self.server.emit({"event": "datagram_error", "peer": self._name(addr),
                              "why": f"{type(exc).__name__}: {exc}"})

    # --- sending -------------------------------------------------------------------------------------------

    @staticmethod
    def _name(addr: Address) -> str:
        return f"udp://{addr[0]}:{addr[1]}"

    def _send(self, addr: Address, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(data, addr)

    def _error(self, addr: Address, seq: int, code: int, text: str, auth: P.Auth | None = None, count: int = 1,
               limit: int | None = None) -> None:
        """Send ERROR ``code``; with ``limit`` (a peer without a session), no larger than ``limit`` bytes."""
        with self.metrics.lock:
            self.metrics.errors[P.ERROR_NAMES.get(code, str(code))] += count
        self.server.emit({"event": "error", "peer": self._name(addr), "seq": seq, "count": count,
                          "code": P.ERROR_NAMES.get(code, code), "message": text})
        msg = P.pack_error(seq, code, text, count, auth)
        if limit is not None and len(msg) > limit:
            room = limit - (len(msg) - len(text.encode("utf-8")[:1000]))
            if room < 0:
                return
            msg = P.pack_error(seq, code, text.encode("utf-8")[:room].decode("utf-8", "ignore"), count, auth)
        self._send(addr, msg)

    # --- dispatch ------------------------------------------------------------------------------------------

    def _on_datagram(self, data: bytes, addr: Address) -> None:
        sess = self.sessions.get(addr)
        ev = P.parse_datagram(data, sess.auth if sess else None, self.server.max_message)
        pend = self.pending.get(addr)
        if pend is not None and not isinstance(ev, P.Message) and ev is not None:
            again = P.parse_datagram(data, pend.auth, self.server.max_message)
            if isinstance(again, P.Message) and again.type != P.HELLO:
                self._promote(pend)
                sess, ev = pend, again
        if not isinstance(ev, P.Message):
            with self.metrics.lock:
                self.metrics.datagrams_ignored += 1
                self.metrics.garbage += len(data)
            if sess is not None and ev is not None:
                sess.unverified += 1
                self.server.emit({"event": "unverified", "peer": self._name(addr), "device": sess.device,
                                  "why": ev[0], "type": ev[1], "seq": ev[2], "bytes": ev[3]})
            return
        msg = ev
        t = msg.type
        if t == P.HELLO:
            self._on_hello(addr, msg, len(data))
            return
        if t == P.PING:
            self._send(addr, P.pack_message(P.PONG, msg.seq, bytes(msg.body[:64]), sess.auth if sess else None))
            return
        if sess is None:
            if t not in (P.PONG, P.BYE, P.RESULT, P.ERROR, P.WELCOME, P.REFUSE):
                self._error(addr, msg.seq, P.E_NO_SESSION, "no session for this address: send HELLO first",
                            limit=len(data))
            return
        sess.last_valid_at = time.monotonic()
        if msg.flags & ~P.FLAG_AUTH:
            self._error(addr, msg.seq, P.E_BAD_MESSAGE, f"reserved flag bits set: 0x{msg.flags:02x}", sess.auth)
        elif t == P.SLICE:
            self._on_slice(sess, msg)
        elif t == P.BYE:
            self._end(sess, "bye")
        elif t == P.PONG:
            pass
        elif t == P.DATA:
            self._error(addr, msg.seq, P.E_BAD_TYPE, "over datagrams a tensor travels in SLICE messages "
                                                     "(PROTOCOL.md 10)", sess.auth)
        else:
            self._error(addr, msg.seq, P.E_BAD_TYPE, f"unexpected message type {t} from a device", sess.auth)

    # --- the handshake (10.2) ------------------------------------------------------------------------------

    def _on_hello(self, addr: Address, msg: P.Message, size: int) -> None:
        if size < MIN_HELLO_DATAGRAM:  # an answer could be larger than the question: no answer at all
            with self.metrics.lock:
                self.metrics.datagrams_ignored += 1
            self.server.emit({"event": "short_hello", "peer": self._name(addr), "bytes": size})
            return
        body = bytes(msg.body)
        for known in (self.sessions.get(addr), self.pending.get(addr)):
            if known is not None and known.hello_body == body:
                self._send(addr, known.welcome)  # our WELCOME was lost: the same one again
                return
        try:
            hello = P.parse_json(body, "HELLO")
        except P.ProtocolError as exc:
            self._refuse(addr, P.R_BAD_HELLO, str(exc), None)
            return
        client = hello.get("client")
        if not isinstance(client, str) or not 1 <= len(client) <= 64:
            self._refuse(addr, P.R_BAD_HELLO, "a datagram HELLO needs a client string (1-64 characters)", None)
            return
        refusal = check_hello(self.model, self.cfg, hello)
        if refusal is None:
            refusal = self._over_quota(addr)
        if refusal is not None:
            self._refuse(addr, refusal[0], refusal[1], client)
            return
        self._welcome(addr, hello, body, client)

    def _over_quota(self, addr: Address) -> tuple[int, str] | None:
        cfg = self.cfg
        if addr in self.sessions or addr in self.pending:
            return None  # a new session replaces this address's own
        if len(self.sessions) + len(self.pending) >= cfg.max_connections:
            return P.R_BUSY, f"too many sessions (limit {cfg.max_connections})"
        same_ip = sum(1 for a in self.sessions if a[0] == addr[0]) + sum(1 for a in self.pending if a[0] == addr[0])
        if same_ip >= cfg.max_per_address:
            return P.R_BUSY, f"too many sessions from {addr[0]} (limit {cfg.max_per_address})"
        return None

    def _refuse(self, addr: Address, code: int, reason: str, client: str | None) -> None:
        with self.metrics.lock:
            self.metrics.refused += 1
        self.server.emit({"event": "refuse", "peer": self._name(addr), "code": P.REFUSE_NAMES.get(code),
                          "reason": reason})
        obj: dict[str, Any] = {"code": code, "reason": reason[:200]}
        if client is not None:
            obj["client"] = client
        self._send(addr, P.pack_json(P.REFUSE, 0, obj))  # the HELLO was at least MIN_HELLO_DATAGRAM bytes

    def _welcome(self, addr: Address, hello: dict[str, Any], body: bytes, client: str) -> None:
        dev = hello["device"]
        wants_auth = bool(hello.get("auth"))
        token = secrets.token_hex(8)
        welcome: dict[str, Any] = {
            "protocol": P.PROTOCOL_VERSION, "session": token, "client": client, "transport": "datagram",
            "max_message": self.server.max_message, "keepalive_s": self.cfg.keepalive_s,
            "timeout_s": self.cfg.idle_timeout_s, "classes": len(self.model.class_names),
            "deadline_ms": round(self.cfg.slice_deadline_s * 1000, 3),
            "concealment": self.model.concealment,
        }
        auth = None
        if wants_auth:
            nonce = secrets.token_bytes(16)
            welcome["nonce"] = nonce.hex()
            auth = P.Auth(self.cfg.keys[dev], nonce)
        packed = P.pack_json(P.WELCOME, 0, welcome)
        now = time.monotonic()
        sess = DatagramSession(addr, dev, token, body, packed, auth, table_id_of(hello["table"]), now, now)
        old = self.sessions.get(addr)
        if old is not None and old.auth is not None:
            stale = self.pending.pop(addr, None)
            if stale is not None:
                self._drop(stale)
            self.pending[addr] = sess  # the old session keeps working until the new one proves itself
        else:
            if old is not None:
                self._drop(old)
            self.sessions[addr] = sess
        self.server.emit({"event": "session", "peer": self._name(addr), "device": dev, "session": token,
                          "table": sess.table_id.hex(), "auth": wants_auth, "transport": "datagram"})
        self._send(addr, packed)

    def _promote(self, sess: DatagramSession) -> None:
        """A message verified under a pending session's nonce: it replaces the address's session."""
        self.pending.pop(sess.address, None)
        old = self.sessions.get(sess.address)
        if old is not None:
            self._drop(old)
        self.sessions[sess.address] = sess

    def _drop(self, sess: DatagramSession) -> None:
        """Forget a session without answering its open tensors (its device has started another session)."""
        sess.closed = True
        for timer in sess.timers.values():
            timer.cancel()
        sess.timers.clear()
        sess.open.clear()

    def _end(self, sess: DatagramSession, why: str) -> None:
        """End a session: its open tensors are answered now, then it is forgotten."""
        for seq in sorted(sess.open, key=lambda s: P.seq_ahead(s, sess.floor)):
            self._finalize(sess, seq)
        sess.closed = True
        if self.sessions.get(sess.address) is sess:
            del self.sessions[sess.address]
            waiting = self.pending.pop(sess.address, None)
            if waiting is not None:  # the address's new session needs no proof any more
                self.sessions[sess.address] = waiting
        self.server.emit({"event": "session_end", "peer": self._name(sess.address), "device": sess.device,
                          "why": why, "tensors": sess.tensors})

    # --- slices (10.3, 10.4) -------------------------------------------------------------------------------

    def _on_slice(self, sess: DatagramSession, msg: P.Message) -> None:
        seq = msg.seq
        with self.metrics.lock:
            self.metrics.slices += 1
        pt = sess.open.get(seq)
        if pt is None:
            ahead = P.seq_ahead(seq, sess.floor)
            if ahead < 0 or seq in sess.answered or seq == 0:
                with self.metrics.lock:
                    self.metrics.slices_late += 1
                return
            if ahead > self.cfg.max_seq_gap:
                self._error(sess.address, seq, P.E_BAD_MESSAGE, f"seq {seq} is {ahead} ahead of the lowest open "
                            f"seq {sess.floor} (the limit is {self.cfg.max_seq_gap})", sess.auth)
                return
            while len(sess.open) >= max(1, self.cfg.max_open_tensors):  # close the oldest tensor now
                self._finalize(sess, min(sess.open, key=lambda s: P.seq_ahead(s, sess.floor)))
            pt = PendingTensor(seq, self.model.bundle.feature_shape, sess.table_id)
            sess.open[seq] = pt
            sess.timers[seq] = asyncio.get_running_loop().call_later(
                self.cfg.slice_deadline_s, self._finalize, sess, seq)
        outcome = pt.offer(bytes(msg.body), self.model.check_slice_header)
        if outcome != ADDED:
            with self.metrics.lock:
                if outcome == DUPLICATE:
                    self.metrics.slices_duplicate += 1
                elif outcome == REJECTED:
                    self.metrics.slices_rejected += 1
        if pt.complete:
            self._finalize(sess, seq)

    def _finalize(self, sess: DatagramSession, seq: int) -> None:
        """Close tensor ``seq`` (its slices tile it, its deadline passed, or room was needed): account for the
        seqs below it that never arrived (MISSING), then decode, conceal, infer and answer it in a worker."""
        pt = sess.open.pop(seq, None)
        timer = sess.timers.pop(seq, None)
        if timer is not None:
            timer.cancel()
        if pt is None or sess.closed:
            return
        self._account_gaps(sess, seq)
        sess.answered.add(seq)
        while sess.floor in sess.answered:
            sess.answered.discard(sess.floor)
            sess.floor = P.next_seq(sess.floor)
        sess.tensors += 1
        if not pt.frames:
            why = pt.rejected[0] if pt.rejected else "no slice"
            code = P.E_TABLE_MISMATCH if why.startswith("TableMismatch") else P.E_BAD_FRAME
            self._error(sess.address, seq, code, f"no slice of tensor {seq} fits this host "
                                                 f"({pt.rejected_count} rejected): {why}", sess.auth)
            return
        task = asyncio.get_running_loop().create_task(self._work(sess, seq, pt))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _account_gaps(self, sess: DatagramSession, seq: int) -> None:
        """Answer ERROR MISSING for every seq from the floor up to ``seq`` that is neither open nor answered."""
        s = sess.floor
        run_start, run = 0, 0
        while s != seq:
            if s in sess.open or s in sess.answered:
                if run:
                    self._missing(sess, run_start, run)
                    run = 0
            else:
                if not run:
                    run_start = s
                run += 1
                sess.answered.add(s)
                if run == 65535:
                    self._missing(sess, run_start, run)
                    run = 0
            s = P.next_seq(s)
        if run:
            self._missing(sess, run_start, run)

    def _missing(self, sess: DatagramSession, first: int, count: int) -> None:
        last = (first + count - 1) % P.SEQ_MOD
        self._error(sess.address, first, P.E_MISSING, f"no slice of tensors {first}..{last} arrived", sess.auth,
                    count)

    async def _work(self, sess: DatagramSession, seq: int, pt: PendingTensor) -> None:
        srv = self.server
        t0 = time.perf_counter()
        try:
            kind, payload = await srv.scheduler.run(sess, srv.work_slices, pt.frames, sess.table_id)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a bug in a worker must not take the server down
            kind, payload = "error", (P.E_INFERENCE, f"internal error: {type(exc).__name__}: {exc}")
        if kind == "error":
            code, text = payload
            self._error(sess.address, seq, code, text, sess.auth)
            return
        result, n_el, dec_ms, inf_ms = payload
        if pt.rejected_count:
            result["slices_rejected"] = pt.rejected_count
        total_ms = (time.perf_counter() - t0) * 1000
        m = self.metrics
        with m.lock:
            m.frames += 1
            m.bytes += pt.bytes
            m.elements += n_el
            m.decode_ms.append(dec_ms)
            m.infer_ms.append(inf_ms)
            m.total_ms.append(total_ms)
            m.sliced_tensors += 1
            m.concealed_sum += result["concealed"]
            if result["concealed"] > 0:
                m.concealed_tensors += 1
        srv.emit({"event": "frame", "peer": self._name(sess.address), "device": sess.device, "seq": seq,
                  "bytes": pt.bytes, "slices": result["slices"], "concealed": result["concealed"],
                  "assembly_ms": round((time.monotonic() - pt.first_at) * 1000, 3),
                  "decode_ms": round(dec_ms, 3), "infer_ms": round(inf_ms, 3), "server_ms": round(total_ms, 3)})
        self._send(sess.address, P.pack_message(P.RESULT, seq, json.dumps(result).encode(), sess.auth))

    # --- timeouts and shutdown -----------------------------------------------------------------------------

    async def _sweep(self) -> None:
        """Every second: end sessions idle for ``idle_timeout_s``, forget pending ones as old."""
        cfg = self.cfg
        while True:
            await asyncio.sleep(min(1.0, cfg.idle_timeout_s / 4))
            now = time.monotonic()
            for sess in list(self.sessions.values()):
                if now - sess.last_valid_at > cfg.idle_timeout_s:
                    self._send(sess.address, P.pack_message(P.BYE, 0, b"idle timeout", sess.auth))
                    self._end(sess, "idle timeout")
            for addr, sess in list(self.pending.items()):
                if now - sess.created_at > cfg.idle_timeout_s:
                    del self.pending[addr]
                    self._drop(sess)

    def status(self) -> dict[str, Any]:
        return {"sessions": len(self.sessions), "pending": len(self.pending),
                "open_tensors": sum(len(s.open) for s in self.sessions.values())}

    async def close(self) -> None:
        if self.sweeper is not None:
            self.sweeper.cancel()
        for sess in list(self.sessions.values()) + list(self.pending.values()):
            self._drop(sess)
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.sweeper is not None:
            await asyncio.gather(self.sweeper, return_exceptions=True)
        if self.transport is not None:
            self.transport.close()
