"""bench/rpc/opcodes.py: Python bytecode instructions per ``/rpc/value`` request, by function, in a FORGE node
without and with forge-observe - where the node's extra work goes, one Python function at a time.

callgrind (``run.py --instructions``) counts a whole node, but nearly half of its instructions are the
interpreter's loop (``_PyEval_EvalFrameDefault``), which it cannot split by Python function. This runs
each node (``traced_node.py``: ``forge-node start`` with ``sys.settrace`` opcode events switched on and
off by SIGHUP) against one embedded PostgreSQL, sends 400 warm-up requests, then counts the bytecode
instructions every Python function runs over N requests (8 at a time, httpx). The observed node's
aggregation runs once at the end of the counted window on the measured requests' events (SIGUSR1, as
in ``observed_node.py``), so its cost per request is counted as at full speed. The counts are
deterministic (no load, no timing): a function's figure moves only when the code it runs does.

    .venv/bin/python bench/rpc/opcodes.py [--requests 2000] [--top 30]

Prints each node's bytecode instructions per request and the functions whose count differs most.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from forge_kernel.embedded_pg import EmbeddedPostgres
from forge_kernel.testing import free_port, wait_for
from forge_kernel.testing.procs import write_config
from run import aggregate_now, stop_process

HERE = Path(__file__).resolve().parent


def count(who: str, db_url: str, tmp: Path, n: int) -> dict[str, collections.Counter]:
    """Bytecode instructions and calls by function (file:name) over ``n`` requests of node ``who``."""
    port, wd = free_port(), tmp / who
    wd.mkdir()
    cfg = write_config(wd / "forge.toml", {
        "database": {"url": db_url, "pool_min": 2, "pool_max": 20},
        "app": {"modules": ["bench_app"], "example": False},
        "gateway": {"port": port}, "log": {"level": "WARNING"},
        "node": {"id": f"bench-opcodes-{who}", "roles": ["gateway", "function"], "event_loop": "uvloop"},
    })
    env = {**os.environ, "FORGE_CONFIG": str(cfg), "PYTHONPATH": str(HERE), "FORGE_NODE__GC_COLLECT_INTERVAL": "0"}
    if who == "forge":
        env["FORGE_DISABLE_PLUGINS"] = "observe"
    else:  # as run.py --instructions: timed writes hourly, no trace slow under the tracer's slowdown
        env.update(FORGE_OBSERVE__FLUSH_INTERVAL="3600", FORGE_OBSERVE__WRITE_INTERVAL="60",
                   FORGE_OBSERVE__SLOW_THRESHOLD="3600")
    proc = subprocess.Popen([sys.executable, str(HERE / "traced_node.py"), "start"], cwd=wd, env=env,
                            stdout=open(wd / "node.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(url + "/ready", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    async def load(k: int) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            async def worker(m: int) -> None:
                for _ in range(m):
                    assert (await client.post("/rpc/value", json={"id": 7})).status_code == 200
            await asyncio.gather(*(worker(k // 8) for _ in range(8)))

    def aggregate() -> None:
        if who == "observe":
            aggregate_now(proc, wd, 120, "forge-observe's aggregation")

    try:
        wait_for(up, 120, 0.5, f"the {who} node")
        asyncio.run(load(400))
        aggregate()
        os.kill(proc.pid, signal.SIGHUP)  # counting on
        time.sleep(0.3)
        asyncio.run(load(n))
        aggregate()
        os.kill(proc.pid, signal.SIGHUP)  # off: the counts are written
        wait_for((wd / "opcodes.json").exists, 60, 0.2, "the counts")
        time.sleep(0.5)
        raw = json.loads((wd / "opcodes.json").read_text())
    finally:
        stop_process(proc, grace=60)
    out: dict[str, collections.Counter] = {}
    for what in ("ops", "calls"):
        merged: collections.Counter = collections.Counter()
        for key, value in raw[what].items():
            path, _, name = key.rsplit(":", 2)
            merged[re.sub(r"^.*/(site-packages|lib/python3\.\d+)/", "", path.replace(str(HERE.parents[1]) + "/", "")) + ":" + name] += value
        out[what] = merged
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()
    n = args.requests // 8 * 8
    tmp = Path(tempfile.mkdtemp(prefix="forge-bench-opcodes-"))
    tmp.chmod(0o711)
    pg = EmbeddedPostgres(tmp / "pg", tcp_port=free_port())
    try:
        db_url = pg.start()
        without, with_ = count("forge", db_url, tmp, n), count("observe", db_url, tmp, n)
    finally:
        pg.release()
        shutil.rmtree(tmp, ignore_errors=True)
    a, b = without["ops"], with_["ops"]
    ta, tb = sum(a.values()) / n, sum(b.values()) / n
    print(f"Python bytecode instructions per request ({n} requests): FORGE without forge-observe {ta:,.1f}, "
          f"with {tb:,.1f} ({tb - ta:+,.1f}); Python function calls per request {sum(without['calls'].values()) / n:,.1f} "
          f"/ {sum(with_['calls'].values()) / n:,.1f}")
    diff = sorted(((b[k] - a[k]) / n, k) for k in a.keys() | b.keys())
    print(f"\n{'added':>9} {'without':>9} {'with':>9}  function (bytecode instructions per request)")
    for d, k in [x for x in diff[::-1] if x[0] > 0][:args.top] + [x for x in diff if x[0] < 0][:5]:
        if abs(d) >= 0.05:
            print(f"{d:+9.2f} {a[k] / n:9.2f} {b[k] / n:9.2f}  {k}")


if __name__ == "__main__":
    main()
