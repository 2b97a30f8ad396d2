"""Where forge-observe's cost goes outside the recording: PostgreSQL's statements and backends, the
node's idle CPU, and the cyclic GC.

One embedded PostgreSQL with ``pg_stat_statements``, two FORGE nodes as in ``run.py --observe-only``
(without forge-observe, and with it at its defaults), each started through ``gc_node.py`` (GC
collections counted). Phases, each measured on its own:

* ``idle``: no requests for ``--idle`` seconds: each node's CPU per second, PostgreSQL's CPU per
  second by backend ``application_name``, and the statements run;
* ``forge`` / ``observe`` (alternating, ``--rounds`` each): wrk on one node for ``--duration`` seconds:
  the node's CPU and GC collections per request, PostgreSQL's CPU per request by ``application_name``
  and the statements run (calls and execution time per request, top ``--top``).

    .venv/bin/python bench/rpc/obs_costs.py [--idle 30] [--rounds 2] [--duration 10] [--top 12]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg
import httpx

from forge_kernel.embedded_pg import EmbeddedPostgres
from forge_kernel.testing import free_port, wait_for
from forge_kernel.testing.procs import exit_on_sigterm, write_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import CLK, cpu_seconds, run_wrk, stop_process, wrk_script  # noqa: E402

HERE = Path(__file__).resolve().parent
PY = sys.executable


def switches(pid: int) -> complex:
    """Context switches of one process (all its threads) as ``voluntary + involuntary * 1j``: how
    often it went to sleep waiting (for a socket), and how often it was put off the CPU."""
    total = 0j
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "status").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("voluntary_ctxt_switches"):
                total += int(line.split()[1])
            elif line.startswith("nonvoluntary_ctxt_switches"):
                total += int(line.split()[1]) * 1j
    return total


def backend_cpu(postmaster: int) -> dict[int, tuple[float, complex]]:
    """CPU seconds and context switches of every live process the postmaster forked, by pid."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == postmaster or int(entry.name) == postmaster:
                out[int(entry.name)] = ((int(fields[11]) + int(fields[12])) / CLK, switches(int(entry.name)))
        except OSError:
            continue
    return out


async def backend_names(url: str) -> dict[int, str]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT pid, coalesce(nullif(application_name, ''), backend_type) AS name "
                                "FROM pg_stat_activity")
        return {r["pid"]: r["name"] for r in rows}
    finally:
        await conn.close()


async def statements(url: str, reset: bool) -> list[dict]:
    conn = await asyncpg.connect(url)
    try:
        if reset:
            await conn.execute("SELECT pg_stat_statements_reset()")
            return []
        rows = await conn.fetch(
            "SELECT query, calls, total_exec_time, rows, wal_bytes FROM pg_stat_statements "
            "WHERE query NOT LIKE '%pg_stat_statements%' AND query NOT LIKE '%pg_stat_activity%' "
            "ORDER BY total_exec_time DESC")
        return [dict(r) for r in rows]
    finally:
        await conn.close()


def gc_counts(proc: subprocess.Popen, folder: Path) -> dict:
    path = folder / f"gc-{proc.pid}.json"
    path.unlink(missing_ok=True)
    os.kill(proc.pid, signal.SIGUSR2)
    wait_for(path.exists, 10, 0.05, "the node's GC counts")
    time.sleep(0.05)
    return json.loads(path.read_text())


class Phase:
    """CPU of both nodes and of PostgreSQL's backends, GC counts and statements, over one phase."""

    def __init__(self, db_url: str, postmaster: int, nodes: dict[str, subprocess.Popen], folder: Path) -> None:
        self.db_url, self.postmaster, self.nodes, self.folder = db_url, postmaster, nodes, folder

    def __enter__(self) -> "Phase":
        asyncio.run(statements(self.db_url, reset=True))
        self.gc0 = {n: gc_counts(p, self.folder) for n, p in self.nodes.items()}
        self.cpu0 = {n: cpu_seconds(p.pid) for n, p in self.nodes.items()}
        self.sw0 = {n: switches(p.pid) for n, p in self.nodes.items()}
        self.pg0 = backend_cpu(self.postmaster)
        self.t0 = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.monotonic() - self.t0
        pg1 = backend_cpu(self.postmaster)
        self.cpu = {n: cpu_seconds(p.pid) - self.cpu0[n] for n, p in self.nodes.items()}
        self.switches = {n: switches(p.pid) - self.sw0[n] for n, p in self.nodes.items()}
        gc1 = {n: gc_counts(p, self.folder) for n, p in self.nodes.items()}
        self.gc = {n: [b - a for a, b in zip(self.gc0[n]["collections"], gc1[n]["collections"])] for n in gc1}
        self.gc_seconds = {n: sum(gc1[n]["seconds"]) - sum(self.gc0[n]["seconds"]) for n in gc1}
        names = asyncio.run(backend_names(self.db_url))
        by_name: dict[str, float] = collections.defaultdict(float)
        sw_by_name: dict[str, complex] = collections.defaultdict(complex)
        for pid, (cpu, sw) in pg1.items():
            name = names.get(pid, "postmaster" if pid == self.postmaster else "other")
            cpu0, sw0 = self.pg0.get(pid, (0.0, 0j))
            by_name[name] += cpu - cpu0
            sw_by_name[name] += sw - sw0
        self.pg, self.pg_switches = dict(by_name), dict(sw_by_name)
        self.statements = asyncio.run(statements(self.db_url, reset=False))


def _sw(switches: complex, per: float) -> str:
    return f"{switches.real / per:6.3f} slept, {switches.imag / per:6.3f} preempted"


def report(label: str, ph: Phase, per: float, unit: str, top: int) -> dict:
    print(f"\n== {label}: {ph.seconds:.1f} s, per {unit} (load avg {os.getloadavg()[0]:.1f})")
    for n in ph.nodes:
        print(f"  node {n:8s} CPU {ph.cpu[n] / per * 1e6:8.1f} us  switches {_sw(ph.switches[n], per)}  "
              f"GC collections {ph.gc[n]} ({ph.gc_seconds[n] / per * 1e6:.2f} us)")
    for name, cpu in sorted(ph.pg.items(), key=lambda kv: -kv[1]):
        if cpu > 0 or ph.pg_switches.get(name):
            print(f"  postgres {name:28s} CPU {cpu / per * 1e6:8.2f} us  switches {_sw(ph.pg_switches[name], per)}")
    print(f"  statements (top {top} by execution time): calls / exec us / rows per {unit}")
    for s in ph.statements[:top]:
        q = " ".join(s["query"].split())[:110]
        print(f"    {s['calls'] / per:9.4f} {s['total_exec_time'] * 1e3 / per:9.3f} {s['rows'] / per:9.3f}  {q}")
    return {"seconds": ph.seconds, "per": per, "node_cpu": ph.cpu, "node_switches": {n: [v.real, v.imag] for n, v in ph.switches.items()}, "gc": ph.gc,
            "gc_seconds": ph.gc_seconds, "pg_cpu": ph.pg, "pg_switches": {n: [v.real, v.imag] for n, v in ph.pg_switches.items()}, "statements": ph.statements}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--idle", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--json", default="", help="also write the phases' figures to this file")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="forge-bench-obs-costs-"))
    tmp.chmod(0o711)
    pg = EmbeddedPostgres(tmp / "pg", tcp_port=free_port(), settings={
        "shared_preload_libraries": "pg_stat_statements", "pg_stat_statements.track": "all",
        "pg_stat_statements.track_utility": "on"})
    procs: list[subprocess.Popen] = []
    try:
        db_url = pg.start()

        async def extension() -> None:
            conn = await asyncpg.connect(db_url)
            await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            await conn.close()
        asyncio.run(extension())
        ports = {"forge": free_port(), "observe": free_port()}
        cfg = write_config(tmp / "forge.toml", {
            "database": {"url": db_url, "pool_min": 2, "pool_max": 20},
            "app": {"modules": ["bench_app"], "example": False},
            "log": {"level": "WARNING"},
            "node": {"id": "bench", "roles": ["gateway", "function"], "event_loop": "uvloop"},
        })
        env = {**os.environ, "FORGE_CONFIG": str(cfg),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))}
        nodes = {}
        for name in ("forge", "observe"):
            extra = {"FORGE_DISABLE_PLUGINS": "observe"} if name == "forge" else {"FORGE_NODE__ID": "bench-observe"}
            nodes[name] = subprocess.Popen([PY, str(HERE / "gc_node.py"), "start"], cwd=tmp,
                                           env={**env, "FORGE_GATEWAY__PORT": str(ports[name]), **extra},
                                           stdout=open(tmp / f"{name}.log", "ab"), stderr=subprocess.STDOUT,
                                           start_new_session=True)
            procs.append(nodes[name])
        urls = {n: f"http://127.0.0.1:{p}" for n, p in ports.items()}
        for n, url in urls.items():
            wait_for(lambda: httpx.get(url + "/ready").status_code == 200, 60, 0.2, f"node {n}")
        script = wrk_script(tmp / "forge.lua", json.dumps({"id": 7}), "/rpc/value")
        for url in urls.values():
            run_wrk(url, script, 3, args.connections)  # warm-up
        postmaster = int((pg.pgdata / "postmaster.pid").read_text().split()[0])
        out: dict = {"load_start": os.getloadavg(), "phases": []}
        time.sleep(2)
        with Phase(db_url, postmaster, nodes, tmp) as ph:
            time.sleep(args.idle)
        out["phases"].append({"phase": "idle", **report("idle", ph, ph.seconds, "second", args.top)})
        for i in range(args.rounds):
            for n in (("forge", "observe") if i % 2 == 0 else ("observe", "forge")):
                with Phase(db_url, postmaster, nodes, tmp) as ph:
                    res = run_wrk(urls[n], script, args.duration, args.connections)
                total = res["rps"] * args.duration
                out["phases"].append({"phase": n, "round": i + 1, "rps": res["rps"],
                                      **report(f"round {i + 1} load on {n}: {res['rps']:.0f} req/s", ph, total,
                                               "request", args.top)})
        out["load_end"] = os.getloadavg()
        print(f"\nload average: start {out['load_start']}, end {out['load_end']}")
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1, default=str) + "\n")
    finally:
        for p in procs:
            stop_process(p)
        pg.release()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    exit_on_sigterm()
    main()
