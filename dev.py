#!/usr/bin/env python3
"""Set up and run FORGE from a checkout with nothing but Python 3.11 and pip.

    python3 dev.py start   # venv + install, then a node serving the example app on an embedded PostgreSQL
    python3 dev.py test    # venv + install, then the whole test suite

The virtual environment lives in .venv/ and is reinstalled only when a pyproject.toml changes.
Extra arguments are passed on (``dev.py test -k worker``, ``dev.py start --roles gateway``).
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
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


def ensure_test_tools() -> None:
    """Debian packages some tests drive: PgBouncer (tests/test_pooler.py), Debian's PostgreSQL,
    built with TLS unlike the embedded server (tests/test_managed_pg.py), and Chromium (the
    dashboard's browser test). Installed with apt-get when this runs as root on Debian
    (FORGE_NO_APT=1 turns that off); otherwise those tests are skipped, each saying why."""
    missing = []
    if not (shutil.which("pgbouncer") or os.path.exists("/usr/sbin/pgbouncer")):
        missing.append("pgbouncer")
    if not glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        missing.append("postgresql")
    if not shutil.which("chromium"):
        missing.append("chromium")
    if not missing:
        return
    if os.environ.get("FORGE_NO_APT") or not shutil.which("apt-get") or os.geteuid() != 0:
        print(f"forge: not installed: {', '.join(missing)}; the tests that need them will be skipped", flush=True)
        return
    print(f"forge: installing {', '.join(missing)} with apt-get (FORGE_NO_APT=1 skips this)", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    quiet = {"stdout": subprocess.DEVNULL}
    if subprocess.run(["apt-get", "update", "-qq"], env=env, **quiet).returncode != 0 or subprocess.run(
            ["apt-get", "install", "-y", "-qq", *missing], env=env, **quiet).returncode != 0:
        print("forge: apt-get failed; the tests that need those packages will be skipped", flush=True)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("start", "test"):
        print(__doc__)
        return 2
    python = ensure_venv()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    if argv[0] == "start":
        cmd = [str(BIN / "forge-node"), "start", *argv[1:]]
    else:
        ensure_test_tools()
        cmd = [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", *argv[1:]]
    os.chdir(ROOT)
    os.execve(cmd[0], cmd, env)  # the node (or pytest) receives signals directly


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
