"""The JavaScript tools the codegen tests run (tsc, the Svelte compiler, esbuild, node --test), installed
with ``npm ci`` from the committed lockfile into plugins/forge-codegen/js/node_modules (gitignored).

No browser. If npm cannot install them the tests fail with npm's output: they are part of the
default suite and must not skip silently.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

JS = Path(__file__).resolve().parent.parent / "js"
BIN = JS / "node_modules" / ".bin"
STAMP = JS / "node_modules" / ".forge-lock-sha256"
TSCONFIG = {
    "compilerOptions": {
        "strict": True, "noEmit": True, "target": "ES2022", "module": "ESNext", "moduleResolution": "Bundler",
        "lib": ["ES2022", "DOM"], "skipLibCheck": True, "types": [], "noUncheckedIndexedAccess": True,
        "exactOptionalPropertyTypes": True, "noImplicitOverride": True, "isolatedModules": True,
    },
}


class JsToolError(AssertionError):
    pass


def ensure_installed() -> None:
    """``npm ci`` when node_modules does not match package-lock.json."""
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            raise JsToolError(f"{tool} is not installed: the codegen tests need Node.js 20+ and npm")
    want = hashlib.sha256((JS / "package-lock.json").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == want and (BIN / "tsc").exists():
        return
    proc = subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=JS,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise JsToolError(f"npm ci failed in {JS} (is the npm registry reachable?):\n{proc.stdout}\n{proc.stderr}")
    STAMP.write_text(want)


def run(cmd: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None,
        timeout: float = 300) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as exc:  # report what it printed so far instead of a bare timeout
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
        return subprocess.CompletedProcess(cmd, -9, out, err + f"\n(timed out after {timeout} s)")


def tsc(root: Path, include: list[str]) -> subprocess.CompletedProcess:
    """``tsc --noEmit --strict`` over ``include`` (globs relative to ``root``)."""
    (root / "tsconfig.json").write_text(json.dumps({**TSCONFIG, "include": include}, indent=2))
    return run([str(BIN / "tsc"), "-p", str(root / "tsconfig.json"), "--pretty", "false"], cwd=root)


def svelte_compile(source: Path, out: Path) -> subprocess.CompletedProcess:
    return run(["node", str(JS / "scripts" / "svelte-compile.mjs"), str(source), str(out)], cwd=JS)


def bundle(entry: Path, out: Path, *, minify: bool = False, browser: bool = False) -> None:
    """esbuild ``entry`` with everything it imports into one ESM file."""
    cmd = [str(BIN / "esbuild"), str(entry), "--bundle", "--format=esm", f"--outfile={out}", "--log-level=warning"]
    if minify:
        cmd.append("--minify")
    # svelte's package exports pick its server build under Node unless told it runs in a browser
    cmd.append("--platform=browser" if browser else "--platform=node")
    proc = run(cmd, cwd=JS)
    if proc.returncode != 0:
        raise JsToolError(f"esbuild {entry} failed:\n{proc.stderr}")


def min_gzip_size(entry: Path, tmp: Path) -> tuple[int, int]:
    """(minified bytes, minified + gzip -9 bytes) of ``entry`` and what it imports."""
    out = tmp / "size.min.js"
    bundle(entry, out, minify=True, browser=True)
    data = out.read_bytes()
    return len(data), len(gzip.compress(data, 9))


def node_test(files: list[Path], env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    return run(["node", "--experimental-websocket", "--test", "--test-reporter=spec", "--test-timeout=60000",
                *map(str, files)],
               cwd=JS, env=env, timeout=timeout)
