// Run one Python script under MicroPython (WebAssembly port) in node, for lwfc_host.codec.micropython.
//
// The npm package's own CLI always exits 0 and cannot read a script from stdin, so this drives its
// loadMicroPython API directly:
//
//   node mpy_run.mjs <micropython.mjs> <heap bytes> <root dir> <script file> <out dir>
//
// Every file under <root dir> is copied into MicroPython's virtual filesystem at the same relative
// path (so <root>/lib/lwfc/x.py becomes /lib/lwfc/x.py, which is on MicroPython's sys.path). After
// the script ran, every file the script wrote under /out is copied back into <out dir>.
// MicroPython's stdout goes to our stdout, its stderr to our stderr.
// Exit status: 0 on success, 3 when the script raised (traceback on stderr), 2 on a usage or
// loader error.

import fs from "node:fs";
import path from "node:path";
import { pathToFileURL } from "node:url";

const EXIT_PYTHON_ERROR = 3;
const EXIT_USAGE = 2;

// MicroPython hands output over one byte at a time; batch it so a few MB of output stay cheap, and
// flush at each newline so that a script killed by the caller's timeout still shows what it printed.
function byteSink(fd) {
  let buf = Buffer.alloc(65536);
  let n = 0;
  const flush = () => {
    if (n > 0) {
      fs.writeSync(fd, buf, 0, n);
      n = 0;
    }
  };
  const put = (bytes) => {
    for (const b of bytes) {
      if (n === buf.length) flush();
      buf[n++] = b;
      if (b === 10 && fd === 2) flush();
    }
  };
  return { put, flush };
}

function copyIn(FS, hostDir, vfsDir) {
  for (const entry of fs.readdirSync(hostDir, { withFileTypes: true })) {
    const src = path.join(hostDir, entry.name);
    const dst = vfsDir === "/" ? "/" + entry.name : vfsDir + "/" + entry.name;
    if (entry.isDirectory()) {
      if (!FS.analyzePath(dst).exists) FS.mkdir(dst);
      copyIn(FS, src, dst);
    } else {
      FS.writeFile(dst, fs.readFileSync(src));
    }
  }
}

function copyOut(FS, vfsDir, hostDir) {
  if (!FS.analyzePath(vfsDir).exists) return;
  fs.mkdirSync(hostDir, { recursive: true });
  for (const name of FS.readdir(vfsDir)) {
    if (name === "." || name === "..") continue;
    const src = vfsDir + "/" + name;
    const dst = path.join(hostDir, name);
    if (FS.isDir(FS.stat(src).mode)) {
      copyOut(FS, src, dst);
    } else {
      fs.writeFileSync(dst, FS.readFile(src));
    }
  }
}

async function main() {
  const [modulePath, heapArg, rootDir, scriptFile, outDir] = process.argv.slice(2);
  if (!outDir) {
    process.stderr.write("usage: node mpy_run.mjs <micropython.mjs> <heap bytes> <root dir> <script> <out dir>\n");
    return EXIT_USAGE;
  }
  const stdout = byteSink(1);
  const stderr = byteSink(2);
  const { loadMicroPython } = await import(pathToFileURL(modulePath).href);
  const mp = await loadMicroPython({
    heapsize: Number(heapArg),
    linebuffer: false,
    stdout: stdout.put,
    stderr: stderr.put,
  });
  copyIn(mp.FS, rootDir, "/");
  if (!mp.FS.analyzePath("/out").exists) mp.FS.mkdir("/out");
  const code = fs.readFileSync(scriptFile, "utf8");
  let status = 0;
  try {
    mp.runPython(code);
  } catch (err) {
    // runPython throws a PythonError whose message is MicroPython's formatted traceback; a plain
    // sys.exit() / sys.exit(0) is a normal end, as in CPython.
    if (err && err.type === "SystemExit" && /SystemExit(:[ \t]*0?)?\s*$/.test(String(err.message))) {
      stdout.flush();
      stderr.flush();
      copyOut(mp.FS, "/out", outDir);
      return 0;
    }
    stdout.flush();
    stderr.put(Buffer.from(String(err && err.message !== undefined ? err.message : err)));
    status = EXIT_PYTHON_ERROR;
  }
  stdout.flush();
  stderr.flush();
  copyOut(mp.FS, "/out", outDir);
  return status;
}

main().then(
  (status) => process.exit(status),
  (err) => {
    process.stderr.write("mpy_run.mjs: " + (err && err.stack ? err.stack : String(err)) + "\n");
    process.exit(EXIT_USAGE);
  },
);
