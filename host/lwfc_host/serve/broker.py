"""A real Mosquitto broker for the tests and the fleet benchmark: a generated configuration in a directory of its
own, a free loopback port, started and stopped by us. Not for production: there, a broker is run by its own
service manager with its own configuration (see the README's fleet section for the settings that matter).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType


class BrokerError(Exception):
    """Mosquitto is not installed, or did not start."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Mosquitto:
    """``mosquitto -c <generated config>`` on 127.0.0.1 and a free port.

    ``users``: {username: password}: the broker then refuses anonymous clients (the password file is hashed with
    ``mosquitto_passwd -U``, so no password reaches a command line). ``acl``: the text of an ACL file.
    ``max_queued``: QoS 1 messages the broker holds per client beyond those in flight; past it, it drops them
    (Mosquitto's default is 1000: a pool that falls far behind a large fleet loses frames to it, which devices then
    publish again). ``max_inflight``: QoS 1 messages in flight to one client at once (Mosquitto's default 20).
    ``tls``: (certificate file, key file): the listener speaks TLS only (``url`` gives mqtts://)."""

    def __init__(self, workdir: str | Path | None = None, users: dict[str, str] | None = None, acl: str | None = None,
                 max_queued: int = 100_000, max_inflight: int = 20, tls: tuple[str, str] | None = None):
        exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)
        if exe is None:
            raise BrokerError("mosquitto is not installed (apt-get install mosquitto)")
        self.exe = exe
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="lwfc-mosquitto-")
        self.dir = Path(workdir or self._tmp.name)  # type: ignore[union-attr]
        self.dir.mkdir(parents=True, exist_ok=True)
        self.users = users or {}
        self.acl = acl
        self.max_queued = max_queued
        self.max_inflight = max_inflight
        self.tls = tls
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def _config(self) -> Path:
        # set_tcp_nodelay: answers are small and latency matters (Nagle and delayed ACKs cost 40 ms a message)
        lines = [f"listener {self.port} 127.0.0.1", "set_tcp_nodelay true", "persistence false",
                 f"log_dest file {self.dir / 'broker.log'}", "log_type error", "log_type warning", "log_type notice",
                 "connection_messages true",
                 f"max_queued_messages {self.max_queued}", f"max_inflight_messages {self.max_inflight}",
                 # started by root, mosquitto would become the user "mosquitto", who cannot read our private files
                 f"user {pwd.getpwuid(os.getuid()).pw_name}"]
        if self.tls is not None:  # the listener speaks TLS only: mqtts://
            lines += [f"certfile {self.tls[0]}", f"keyfile {self.tls[1]}"]
        if self.users:
            pw = self.dir / "passwords"
            pw.write_text("".join(f"{u}:{p}\n" for u, p in self.users.items()))
            pw.chmod(0o600)
            tool = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
            subprocess.run([tool, "-U", str(pw)], check=True, capture_output=True)  # hashes the file in place
            lines += ["allow_anonymous false", f"password_file {pw}"]
        else:
            lines.append("allow_anonymous true")
        if self.acl is not None:
            acl = self.dir / "acl"
            acl.write_text(self.acl)
            acl.chmod(0o600)
            lines.append(f"acl_file {acl}")
        conf = self.dir / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n")
        return conf

    def start(self, timeout_s: float = 10.0) -> Mosquitto:
        """Start the broker and wait until it accepts connections (a few tries if the free port was taken)."""
        for _attempt in range(5):
            self.port = free_port()
            conf = self._config()
            self.proc = subprocess.Popen([self.exe, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                         stderr=subprocess.PIPE)
            t0 = time.monotonic()
            while time.monotonic() - t0 < timeout_s and self.proc.poll() is None:
                try:
                    socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                    return self
                except OSError:
                    time.sleep(0.05)
            err = self.stop()
        raise BrokerError(f"mosquitto did not start: {err[-1000:]} {self.log()[-1000:]}")

    def url(self, prefix: str = "lwfc") -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://127.0.0.1:{self.port}/{prefix}"

    def log(self) -> str:
        p = self.dir / "broker.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def cpu_seconds(self) -> float:
        """User + system CPU the broker has used so far."""
        return process_cpu_seconds(self.proc.pid) if self.proc is not None else 0.0

    def stop(self) -> str:
        """Stop the broker; returns what it wrote to stderr."""
        if self.proc is None:
            return ""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            _out, err = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _out, err = self.proc.communicate(timeout=10)
        return err.decode(errors="replace") if err else ""

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a running process (Linux /proc), 0.0 when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
