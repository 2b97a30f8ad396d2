"""Node start-up and idle memory: cold start (initdb), warm restart (reused data), RSS when idle.

    python bench/startup/run.py [--runs 5] [--roles gateway,worker,...]

Each run starts `forge-node start` in a folder with no config (embedded PostgreSQL, example
app), waits for the ready file, reads the node's own ready time and its resident memory
after 3 idle seconds, then SIGTERMs it. Cold runs use a fresh folder (initdb included);
warm runs reuse the folder (PostgreSQL data kept, server stopped between runs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def one(folder: Path, env: dict[str, str]) -> tuple[float, float, int]:
    ready = folder / "ready.json"
    ready.unlink(missing_ok=True)
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "forge_kernel.cli", "start"], cwd=folder,
                            env={**env, "FORGE_READY_FILE": str(ready)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not ready.exists():
            if proc.poll() is not None:
                raise SystemExit(f"node exited with {proc.returncode}")
            time.sleep(0.005)
        wall = time.monotonic() - t0
        inside = json.loads(ready.read_text())["seconds"]
        time.sleep(3)
        rss = rss_kib(proc.pid)
    finally:  # never leave a node (and its PostgreSQL) behind
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    return wall, inside, rss


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--roles", default="", help="FORGE_NODE__ROLES for the node (default: all installed)")
    a = ap.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORGE_")}
    env["FORGE_LOG__LEVEL"] = "WARNING"
    if a.roles:
        env["FORGE_NODE__ROLES"] = a.roles
    cold, warm = [], []
    base = Path(tempfile.mkdtemp(prefix="forge-startup-"))
    base.chmod(0o711)  # as root the server runs as forge_pg, which must pass through to each .forge
    try:
        for i in range(a.runs):
            folder = base / f"cold{i}"
            folder.mkdir()
            cold.append(one(folder, env))
        for i in range(a.runs):
            warm.append(one(base / "cold0", env))
    finally:
        shutil.rmtree(base, ignore_errors=True)

    def show(name: str, rows: list[tuple[float, float, int]]) -> None:
        med = lambda i: statistics.median(r[i] for r in rows)
        print(f"{name:<14} process start→ready {med(0):6.2f}s (min {min(r[0] for r in rows):.2f}, max {max(r[0] for r in rows):.2f})"
              f"   node start()→ready {med(1):5.2f}s   idle RSS {med(2) / 1024:6.1f} MiB")

    print(f"forge-node start, example app, embedded PostgreSQL, {a.runs} runs each, roles={a.roles or 'all installed'}")
    show("cold (initdb)", cold)
    show("warm restart", warm)


if __name__ == "__main__":
    main()
