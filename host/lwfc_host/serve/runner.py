"""Running a server: ``serve`` until a signal (``lwfc serve``), or ``run_in_thread`` in the background (the
demo, the benchmark and the tests)."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import threading
from typing import Any, Callable

from lwfc_host.serve.cloud import CloudModel
from lwfc_host.serve.config import ServerConfig, parse_hostport
from lwfc_host.serve.server import Server


async def serve(model: CloudModel, config: ServerConfig, tcp: list[str], serial: list[str], baud: int,
                status: str | None = None, ready: Callable[[Server], None] | None = None,
                stop: asyncio.Event | None = None, udp: list[str] | None = None, mqtt: list[str] | None = None,
                mqtt_group: str = "lwfc", mqtt_login: tuple[str, str] | None = None) -> dict[str, Any]:
    """Run a server until SIGINT/SIGTERM (or ``stop``); SIGUSR1 prints the running totals. Returns them.

    ``tcp``: HOST:PORT addresses to listen on; ``udp``: HOST:PORT addresses for datagram sessions
    (PROTOCOL.md 10); ``mqtt``: mqtt://HOST:PORT/PREFIX brokers whose devices' frames this server takes as a worker
    of the pool ``mqtt_group`` (PROTOCOL.md 11), logging in with ``mqtt_login`` (username, password);
    ``serial``: serial devices at ``baud``; ``status``: HOST:PORT of the HTTP status
    endpoint; ``ready``: called with the server once it listens. Signals are handled only in the main thread
    (elsewhere ``stop`` ends it)."""
    server = Server(model, config)
    for addr in tcp:
        host, port = parse_hostport(addr, "--tcp")
        await server.start_tcp(host, port)
    for addr in udp or []:
        host, port = parse_hostport(addr, "--udp")
        await server.start_udp(host, port)
    for dev in serial:
        server.start_serial(dev, baud)
    for url in mqtt or []:
        await server.start_mqtt(url, mqtt_group, mqtt_login)
    if status:
        host, port = parse_hostport(status, "--status")
        h, p = await server.start_status(host, port)
        server.addresses.append(f"http://{h}:{p}/status")
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()

    def dump() -> None:
        print(json.dumps(server.status()), file=sys.stderr, flush=True)

    in_main = threading.current_thread() is threading.main_thread()
    if in_main:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGUSR1, dump)
    if ready is not None:
        ready(server)
    try:
        await stop.wait()
    finally:
        await server.close()
        if in_main:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
                loop.remove_signal_handler(sig)
    return server.status()


def run_in_thread(model: CloudModel, config: ServerConfig, tcp: list[str] | None = None,
                  serial: list[str] | None = None, baud: int = 115200,
                  status: str | None = None, udp: list[str] | None = None, mqtt: list[str] | None = None,
                  mqtt_group: str = "lwfc",
                  mqtt_login: tuple[str, str] | None = None) -> tuple[Server, Callable[[], dict[str, Any]]]:
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
                                            box["stop"], udp, mqtt, mqtt_group, mqtt_login)
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
