#!/usr/bin/env python3
"""Set up and run FORGE from a checkout with nothing but Python 3.11 and pip.

    python3 dev.py start   # venv + install, then a node serving the example app on an embedded PostgreSQL
    python3 dev.py test    # venv + install, then the whole test suite

The virtual environment lives in .venv/ and is reinstalled only when a pyproject.toml changes.
Extra arguments are passed on (``dev.py test -k worker``, ``dev.py start --roles gateway``).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
# the role packages and our own plugins (forge-codegen, forge-mesh), installed beside the kernel;
# the third-party example under plugins/ (forge-hello) is built by its tests
PACKAGES = ["forge-gateway", "forge-worker", "forge-scheduler", "forge-realtime", "forge-observe", "plugins/forge-codegen",
            "plugins/forge-mesh"]


def _stamp() -> str:
    h = hashlib.sha256()
    for p in [ROOT / "pyproject.toml", *(ROOT / d / "pyproject.toml" for d in PACKAGES)]:
        if p.exists():
            h.update(p.read_bytes())
    return h.hexdigest()


def ensure_venv() -> Path:
    python = BIN / "python"
    stamp = VENV / ".forge-installed"
    if python.exists() and stamp.exists() and stamp.read_text() == _stamp():
        return python
    if not python.exists():
        print("forge: creating .venv", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "-U", "pip", "setuptools>=70", "wheel"], check=True)
    args = ["-e", f"{ROOT}[test]"]
    for d in PACKAGES:
        pyproject = ROOT / d / "pyproject.toml"
        if pyproject.exists():
            # a package's own test dependencies (validators, fuzzers) come with it
            extras = tomllib.loads(pyproject.read_text()).get("project", {}).get("optional-dependencies", {})
            args += ["-e", f"{ROOT / d}[test]" if "test" in extras else str(ROOT / d)]
    print("forge: installing " + ", ".join(["forge-kernel"] + [d for d in PACKAGES if (ROOT / d).exists()]), flush=True)
    subprocess.run([*pip, *args], check=True)
    stamp.write_text(_stamp())
    return python


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("start", "test"):
        print(__doc__)
        return 2
    python = ensure_venv()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    if argv[0] == "start":
        cmd = [str(BIN / "forge-node"), "start", *argv[1:]]
    else:
        cmd = [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", *argv[1:]]
    os.chdir(ROOT)
    os.execve(cmd[0], cmd, env)  # the node (or pytest) receives signals directly


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
