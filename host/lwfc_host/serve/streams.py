"""The byte streams a connection runs on: a TCP socket (asyncio) or a serial line (pyserial, bridged into
asyncio by a reader thread). A connection needs only ``read``, ``write``, ``close``, a ``name`` for logs, and
``closable``: whether hanging up is possible (a serial line stays open, the session starts over on it)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading

from lwfc_host.serve.config import LINGER_MAX_BYTES, READ_CHUNK, ServerError


class Stream:
    """What a connection handler needs from a byte stream."""

    name: str
    address: str = ""  # the peer's IP address, for per-address quotas ("": none, e.g. a serial line)
    closable: bool = True

    async def read(self) -> bytes:  # b"" at the end of the stream
        raise NotImplementedError

    async def write(self, data: bytes) -> None:
        raise NotImplementedError

    async def close(self, linger_s: float = 0.0) -> None:
        """End the stream. ``linger_s`` > 0: the last answers must reach the peer even though it is still sending
        (see ``TcpStream.close``)."""
        raise NotImplementedError


class TcpStream(Stream):
    """One accepted TCP connection; a write waits at most ``drain_timeout_s`` for the peer to take it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, drain_timeout_s: float):
        self.reader, self.writer = reader, writer
        peer = writer.get_extra_info("peername")
        self.name = f"tcp://{peer[0]}:{peer[1]}" if peer else "tcp://?"
        self.address = str(peer[0]) if peer else "?"
        self.drain_timeout_s = drain_timeout_s

    async def read(self) -> bytes:
        return await self.reader.read(READ_CHUNK)

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        # a peer that never reads must not make us buffer answers forever
        await asyncio.wait_for(self.writer.drain(), self.drain_timeout_s)

    async def close(self, linger_s: float = 0.0) -> None:
        """Close the socket. Closing with unread input makes the kernel answer with a reset and drop what is still
        queued to send, so a peer that keeps sending would never read the ERROR that says why it is cut off.
        With ``linger_s`` > 0 the write side is shut first (our answers, then FIN) and input is read and
        discarded until the peer's FIN or for at most ``linger_s`` seconds and LINGER_MAX_BYTES bytes."""
        if linger_s > 0:
            await self._linger(linger_s)
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), 2.0)
        except (OSError, asyncio.TimeoutError):
            pass

    async def _linger(self, linger_s: float) -> None:
        """Shut the write side, then discard input until EOF, ``linger_s`` or LINGER_MAX_BYTES (see close)."""
        loop = asyncio.get_running_loop()
        until, discarded = loop.time() + linger_s, 0
        try:
            if self.writer.can_write_eof():
                self.writer.write_eof()
            while discarded < LINGER_MAX_BYTES and (left := until - loop.time()) > 0:
                data = await asyncio.wait_for(self.reader.read(READ_CHUNK), left)
                if not data:
                    return
                discarded += len(data)
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
                data = None  # the line is gone: tell the handler (b"") and stop
            if data == b"":
                continue  # the read timed out: a quiet line
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

    async def close(self, linger_s: float = 0.0) -> None:  # a serial line has no reset to avoid
        self.stopped.set()
        await self.loop.run_in_executor(None, self.thread.join, 2.0)
        self.ser.close()
