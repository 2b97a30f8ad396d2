"""Durable workflow benchmark: FORGE vs DBOS Transact on the same PostgreSQL, same run.

    .venv/bin/python bench/workflows/run.py [--n 3000] [--seconds 10] [--concurrency 50] [--resume-runs 1000]

One embedded PostgreSQL with the server's stock durability settings (fsync, synchronous_commit,
full_page_writes on; printed at the top). Every measurement gets a fresh database. DBOS Transact
(dbos==3.4.0) runs in a venv of its own (bench/workflows/.venv-dbos, made on first use from
requirements-dbos.txt) as a subprocess; FORGE runs an in-process node (worker role) for the
throughput modes and real ``forge-node`` processes for the resume measurement. Both run 3-step
no-op workflows with the same concurrency (C runs at once) under uvloop:

* drain: N workflows stored first (N=3,000 for DBOS, 20,000 for FORGE, whose 3,000 last ~2 s) (FORGE: WorkflowClient.start_many; DBOS: DBOSClient.enqueue on
  a queue), then the runtime starts: workflows/s = N / (runtime start .. all N succeeded);
* continuous: one producer starts batches of 10 for T s while the runtime runs (FORGE:
  start_many; DBOS: queue.enqueue_async); workflows/s = workflows finished in the window / T;
  DBOS also runs "direct": C tasks call the workflow function in a loop (its fastest path);
* checkpoint latency: the time of each step's checkpoint (FORGE: its write, batched with whatever
  other checkpoints wait; DBOS: its read then write transactions of the step), during the drain
  (queueing included) and at an offered --rate (default 50 workflows/s, one started every 20 ms,
  which both sustain; FORGE's default durable_steps=false);
* resume: R slow workflows (step, 3 s step, step) in flight on one process, SIGKILLed once every
  run recorded its first step; a new process takes over (FORGE: a new node, lease 2 s; DBOS: a
  process with the same executor id, which recovers that executor's workflows). Seconds from
  the kill until every run finished (the 3 s step runs again in both);
* wake (FORGE only): an idle node's CPU over 20 s, then 200 runs waiting for an event (one sent
  every 20 ms) and 200 runs sleeping until a time 20 ms apart: event/timer to resumption p50/p99.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import venv
from pathlib import Path

import asyncpg

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))
DBOS_VENV = HERE / ".venv-dbos"
SHOWN = ["server_version", "fsync", "synchronous_commit", "full_page_writes", "wal_level", "shared_buffers",
         "max_connections"]


def dbos_python() -> str:
    py = DBOS_VENV / "bin" / "python"
    if not py.exists():
        print("bench: creating bench/workflows/.venv-dbos for DBOS Transact", flush=True)
        venv.EnvBuilder(with_pip=True).create(DBOS_VENV)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "-r", str(HERE / "requirements-dbos.txt")], check=True)
    return str(py)


async def fresh_db(base: str, name: str) -> str:
    admin = await asyncpg.connect(base)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    from forge_kernel.db import with_database

    return with_database(base, name)


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# --- FORGE --------------------------------------------------------------------------------------
def forge_config(url: str, concurrency: int, **workflows) -> dict:
    return {"database": {"url": url, "pool_min": 2, "pool_max": concurrency + 10},
            "node": {"roles": ["worker"]}, "app": {"modules": ["bench_flows"], "example": False},
            "log": {"level": "WARNING"}, "workflows": {"concurrency": concurrency, **workflows}}


async def forge_node(url: str, concurrency: int, **workflows):
    from forge_kernel.config import load_config
    from forge_kernel.node import Node
    from forge_kernel.plugins import PluginLoader

    loader = PluginLoader().load()
    cfg = load_config(loader.config_sections(), data=forge_config(url, concurrency, **workflows), env={})
    node = Node(cfg, loader, freeze_gc=False)
    await node.start()
    return node


async def forge_migrate(url: str) -> None:
    from forge_kernel.app import Registry
    from forge_kernel.migrations import migrate
    from forge_kernel.node import all_migrations
    from forge_kernel.plugins import PluginLoader

    conn = await asyncpg.connect(url)
    try:
        await migrate(conn, all_migrations(PluginLoader().load(), Registry.from_modules(["bench_flows"])))
    finally:
        await conn.close()


TIMES: list[float] = []
#: the resume run's [workflows] lease: a killed node's runs are recovered once it expires
LEASE = 2.0


def instrument_forge() -> None:
    from forge_worker.workflows.runtime import Execution

    real = Execution.checkpoint

    async def timed(self, rows):
        t = time.perf_counter()
        try:
            return await real(self, rows)
        finally:
            TIMES.append(time.perf_counter() - t)

    Execution.checkpoint = timed
    real_finish = Execution.finish

    async def finish(self, status, result, error, rows=()):
        # a run's last step is recorded with its ending, in one statement: that write is its checkpoint
        t = time.perf_counter()
        try:
            return await real_finish(self, status, result, error, rows)
        finally:
            if rows:
                TIMES.append(time.perf_counter() - t)

    Execution.finish = finish


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[max(0, int(len(v) * q) - 1)] * 1000 if v else 0.0


LEFT = """SELECT EXISTS (SELECT 1 FROM forge_workflow_runs WHERE status IN ('pending', 'waiting'))
                 OR EXISTS (SELECT 1 FROM forge_workflow_runs WHERE status = 'running')"""


async def succeeded(url_or_pool) -> int:
    return await url_or_pool.fetchval("SELECT count(*) FROM forge_workflow_runs WHERE status = 'succeeded'")


async def forge_drain(base: str, n: int, concurrency: int, durable: bool = False) -> dict:
    from forge_worker import WorkflowClient

    url = await fresh_db(base, "forge_drain")
    await forge_migrate(url)
    pool = await asyncpg.create_pool(url, min_size=1, max_size=4)
    client = WorkflowClient(pool)
    for at in range(0, n, 1000):
        await client.start_many([client.request("three_noop", {"i": i}) for i in range(at, min(n, at + 1000))])
    TIMES.clear()
    t0 = time.perf_counter()
    node = await forge_node(url, concurrency, durable_steps=durable)
    try:
        while await pool.fetchval(LEFT):  # through the partial indexes: polling costs the server nothing
            await asyncio.sleep(0.02)
        took = time.perf_counter() - t0
        assert await succeeded(pool) == n
    finally:
        await node.stop()
        await pool.close()
    return {"mode": "drain", "durable_steps": durable, "n": n, "seconds": took, "rate": n / took, "checkpoint_p50_ms": pct(TIMES, 0.5),
            "checkpoint_p99_ms": pct(TIMES, 0.99), "checkpoints": len(TIMES)}


async def forge_continuous(base: str, seconds: float, concurrency: int) -> dict:
    from forge_worker import WorkflowClient

    url = await fresh_db(base, "forge_cont")
    await forge_migrate(url)
    node = await forge_node(url, concurrency)
    pool = await asyncpg.create_pool(url, min_size=1, max_size=4)
    client = WorkflowClient(pool)
    try:
        stop = time.perf_counter() + seconds
        t0 = time.perf_counter()
        i = 0
        while time.perf_counter() < stop:
            await client.start_many([client.request("three_noop", {"i": i + k}) for k in range(10)])
            i += 10
            await asyncio.sleep(0)
        took = time.perf_counter() - t0
        done = await succeeded(pool)
    finally:
        await pool.close()
        await node.stop()
    return {"mode": "continuous", "done": done, "started": i, "seconds": took, "rate": done / took}


async def forge_latency(base: str, seconds: float, concurrency: int, rate: float) -> dict:
    """Checkpoint latency at an offered rate both sides sustain (not queueing behind a drain)."""
    from forge_worker import WorkflowClient

    url = await fresh_db(base, "forge_latency")
    await forge_migrate(url)
    node = await forge_node(url, concurrency)
    pool = await asyncpg.create_pool(url, min_size=1, max_size=4)
    client = WorkflowClient(pool)
    try:
        async def offer(duration: float) -> int:
            t0, i = time.perf_counter(), 0
            while time.perf_counter() - t0 < duration:
                await client.start("three_noop", {"i": i})
                i += 1
                await asyncio.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
            return i

        await offer(1.0)  # warm-up, not measured
        while await succeeded(pool) < await pool.fetchval("SELECT count(*) FROM forge_workflow_runs"):
            await asyncio.sleep(0.05)
        TIMES.clear()
        n = await offer(seconds)
        while await succeeded(pool) < await pool.fetchval("SELECT count(*) FROM forge_workflow_runs"):
            await asyncio.sleep(0.05)
    finally:
        await pool.close()
        await node.stop()
    return {"mode": "latency", "rate": rate, "workflows": n, "checkpoint_p50_ms": pct(TIMES, 0.5),
            "checkpoint_p99_ms": pct(TIMES, 0.99), "checkpoints": len(TIMES)}


async def forge_resume(base: str, runs: int, tmp: Path) -> dict:
    from forge_kernel.testing import NodeProcess
    from forge_worker import WorkflowClient

    url = await fresh_db(base, "forge_resume")
    await forge_migrate(url)
    env = {"PYTHONPATH": str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""), "FORGE_LOG__LEVEL": "WARNING"}
    cfg = forge_config(url, runs, lease=LEASE, rescue_interval=0.5, heartbeat_interval=0.5)
    cfg["database"]["pool_max"] = 40
    a = NodeProcess(tmp / "a", {**cfg, "node": {"id": "resume-a", "roles": ["worker"]}}, env=env).start().wait_ready()
    pool = await asyncpg.create_pool(url, min_size=1, max_size=4)
    b = None
    try:
        client = WorkflowClient(pool)
        await client.start_many([client.request("slow_three", {"i": i, "hold_s": 3.0}) for i in range(runs)])
        while await pool.fetchval("SELECT count(*) FROM forge_workflow_steps WHERE key = '1'") < runs:
            await asyncio.sleep(0.01)
        a.kill()
        killed = await pool.fetchval("SELECT clock_timestamp()")
        t0 = time.perf_counter()
        b = NodeProcess(tmp / "b", {**cfg, "node": {"id": "resume-b", "roles": ["worker"]}}, env=env).start()
        while await succeeded(pool) < runs:
            await asyncio.sleep(0.02)
        took = time.perf_counter() - t0
        firsts = [float(r["s"]) for r in await pool.fetch(
            """SELECT extract(epoch FROM min(s.finished_at) - $1) AS s FROM forge_workflow_steps s
               WHERE s.claim > 1 GROUP BY s.run_id""", killed)]
    finally:
        await pool.close()
        a.terminate(10)
        if b is not None:
            b.terminate(20)
    return {"mode": "resume", "runs": runs, "seconds_to_all_done": took, "resumed": len(firsts),
            "resume_p50_s": statistics.median(firsts) if firsts else None, "resume_p99_s": pct(firsts, 0.99) / 1000,
            "lease_s": LEASE}


async def forge_wake(base: str, runs: int, concurrency: int) -> dict:
    """Item 7: how soon a sent event / a due timer resumes a waiting run (database clock: from the
    event's sent_at, or the sleep's wake time, to the start of the run's next record), and what an
    idle node costs (this process's CPU time while nothing is due, in % of one core)."""
    import datetime as dt

    from forge_worker import WorkflowClient

    url = await fresh_db(base, "forge_wake")
    await forge_migrate(url)
    node = await forge_node(url, concurrency, heartbeat_interval=1.0)
    pool = await asyncpg.create_pool(url, min_size=1, max_size=4)
    client = WorkflowClient(pool)
    try:
        await asyncio.sleep(2)  # settle
        c0, w0 = time.process_time(), time.perf_counter()
        await asyncio.sleep(20)
        idle_cpu = (time.process_time() - c0) / (time.perf_counter() - w0) * 100
        ids = await client.start_many([client.request("waiter", {"i": i}) for i in range(runs)])
        while await pool.fetchval("SELECT count(*) FROM forge_workflow_runs WHERE status = 'waiting'") < runs:
            await asyncio.sleep(0.05)
        for run_id in ids:  # one event every 20 ms
            await client.send_event(run_id, "go")
            await asyncio.sleep(0.02)
        while await succeeded(pool) < runs:
            await asyncio.sleep(0.05)
        event_lag = [float(r["s"]) for r in await pool.fetch(
            """SELECT extract(epoch FROM s.started_at - e.sent_at) AS s FROM forge_workflow_events e
               JOIN forge_workflow_steps s ON s.run_id = e.run_id AND s.key = '2'""")]
        start = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=3)
        await client.start_many([client.request("sleeper", {"i": i, "until": (start + dt.timedelta(
            milliseconds=20 * i)).isoformat()}) for i in range(runs)])
        while await succeeded(pool) < 2 * runs:
            await asyncio.sleep(0.05)
        timer_lag = [float(r["s"]) for r in await pool.fetch(
            """SELECT extract(epoch FROM s.started_at - (w.result->>'until')::timestamptz) AS s
               FROM forge_workflow_steps w JOIN forge_workflow_steps s ON s.run_id = w.run_id AND s.key = '2'
               WHERE w.kind = 'sleep'""")]
    finally:
        await pool.close()
        await node.stop()
    return {"mode": "wake", "runs": runs, "idle_cpu_percent_of_one_core": idle_cpu,
            "event_to_resume_p50_ms": pct(event_lag, 0.5), "event_to_resume_p99_ms": pct(event_lag, 0.99),
            "timer_to_resume_p50_ms": pct(timer_lag, 0.5), "timer_to_resume_p99_ms": pct(timer_lag, 0.99)}


# --- DBOS -----------------------------------------------------------------------------------------
def dbos(py: str, mode: str, url: str, **kw) -> dict:
    args = [py, str(HERE / "dbos_side.py"), mode, "--url", url] + [f"--{k}={v}" for k, v in kw.items()]
    out = subprocess.run(args, capture_output=True, text=True, timeout=1800)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"dbos_side {mode} failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    return json.loads(lines[-1])


async def dbos_resume(py: str, base: str, runs: int) -> dict:
    url = await fresh_db(base, "dbos_resume")
    args = [py, str(HERE / "dbos_side.py"), "hold", "--url", url, f"--n={runs}", "--hold=3.0",
            f"--concurrency={min(runs, 100)}"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        conn = None
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                conn = conn or await asyncpg.connect(url)
                got = await conn.fetchval("SELECT count(DISTINCT workflow_uuid) FROM dbos.operation_outputs "
                                          "WHERE function_id = 1")
                if got >= runs:
                    break
            except (asyncpg.UndefinedTableError, OSError):
                pass
            if proc.poll() is not None:
                raise RuntimeError(f"dbos hold exited: {proc.stderr.read()[-3000:]}")
            await asyncio.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        await conn.close()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    t0 = time.perf_counter()
    result = dbos(py, "recover", url, n=runs, concurrency=min(runs, 100))
    return {"mode": "resume", "runs": runs, "seconds_to_all_done": time.perf_counter() - t0,
            "recover_reported_s": result["seconds"]}


# --- the run --------------------------------------------------------------------------------------------
async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=3000, help="DBOS drain size")
    ap.add_argument("--forge-n", type=int, default=20000, help="FORGE drain size (its drain of 3,000 lasts ~2 s)")
    ap.add_argument("--rate", type=float, default=50.0, help="offered workflows/s of the latency mode")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--concurrency", type=int, default=50)
    ap.add_argument("--resume-runs", type=int, default=1000)
    ap.add_argument("--systems", default="forge,dbos")
    ap.add_argument("--modes", default="drain,continuous,latency,resume,wake")
    args = ap.parse_args()
    systems, modes = args.systems.split(","), args.modes.split(",")
    from forge_kernel.embedded_pg import EmbeddedPostgres

    instrument_forge()
    py = dbos_python() if "dbos" in systems else ""
    root = Path(tempfile.mkdtemp(prefix="forge-bench-wf-"))
    root.chmod(0o711)  # the embedded server runs as its own account and must pass through to root/pg
    pg = EmbeddedPostgres(root / "pg", settings={})
    base = pg.start()
    results: dict = {"forge": {}, "dbos": {}}
    try:
        conn = await asyncpg.connect(base)
        shown = {k: await conn.fetchval(f"SHOW {k}") for k in SHOWN}
        await conn.close()
        print(f"machine: {platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}; "
              f"PostgreSQL settings: {shown}")
        print(f"workflows of 3 no-op steps; concurrency {args.concurrency} on both sides; N={args.n}, "
              f"T={args.seconds:g}s; resume runs {args.resume_runs}\n", flush=True)
        for mode in modes:
            for system in systems:
                before = load()
                if system == "forge":
                    if mode == "drain":
                        r = await forge_drain(base, args.forge_n, args.concurrency)
                        # the same with every checkpoint waiting for its WAL flush, as DBOS's do
                        results["forge"]["drain_durable"] = d = await forge_drain(base, args.forge_n, args.concurrency,
                                                                                  True)
                        print(f"forge  drain (durable_steps) {json.dumps(d)}  load {load()}", flush=True)
                    elif mode == "continuous":
                        r = await forge_continuous(base, args.seconds, args.concurrency)
                    elif mode == "wake":
                        r = await forge_wake(base, 200, args.concurrency)
                    elif mode == "latency":
                        r = await forge_latency(base, args.seconds, args.concurrency, args.rate)
                    else:
                        r = await forge_resume(base, args.resume_runs, root)
                elif mode == "wake":
                    continue
                else:
                    if mode == "drain":
                        r = dbos(py, "drain", await fresh_db(base, "dbos_drain"), n=args.n,
                                 concurrency=args.concurrency)
                    elif mode == "latency":
                        r = dbos(py, "latency", await fresh_db(base, "dbos_latency"), seconds=args.seconds,
                                 concurrency=args.concurrency, rate=args.rate)
                    elif mode == "continuous":
                        r = dbos(py, "continuous", await fresh_db(base, "dbos_cont"), seconds=args.seconds,
                                 concurrency=args.concurrency)
                        results["dbos"]["direct"] = dbos(py, "direct", await fresh_db(base, "dbos_direct"),
                                                         seconds=args.seconds, concurrency=args.concurrency)
                        print(f"dbos   direct      {json.dumps(results['dbos']['direct'])}  load {load()}", flush=True)
                    else:
                        r = await dbos_resume(py, base, args.resume_runs)
                r["load_before"], r["load_after"] = before, load()
                results[system][mode] = r
                print(f"{system:<6} {mode:<11} {json.dumps(r)}", flush=True)
        f, d = results["forge"], results["dbos"]
        print("\nratios (FORGE / DBOS):")
        for mode in ("drain", "continuous"):
            if mode in f and mode in d:
                print(f"  {mode}: {f[mode]['rate']:.0f} vs {d[mode]['rate']:.1f} workflows/s = {f[mode]['rate'] / d[mode]['rate']:.1f}x")
        if "continuous" in f and "direct" in d:
            print(f"  continuous vs DBOS direct calls: {f['continuous']['rate'] / d['direct']['rate']:.1f}x")
        if "drain_durable" in f and "drain" in d:
            print(f"  drain with durable_steps: {f['drain_durable']['rate']:.0f} vs {d['drain']['rate']:.1f} = "
                  f"{f['drain_durable']['rate'] / d['drain']['rate']:.1f}x; checkpoint p50 "
                  f"{f['drain_durable']['checkpoint_p50_ms']:.2f} ms p99 {f['drain_durable']['checkpoint_p99_ms']:.2f} ms")
        if "drain" in f and "drain" in d and d["drain"].get("checkpoint_p50_ms"):
            print(f"  checkpoint p50 {f['drain']['checkpoint_p50_ms']:.2f} ms vs {d['drain']['checkpoint_p50_ms']:.2f} ms; "
                  f"p99 {f['drain']['checkpoint_p99_ms']:.2f} ms vs {d['drain']['checkpoint_p99_ms']:.2f} ms")
        if "latency" in f and "latency" in d:
            print(f"  checkpoint latency at {args.rate:g} workflows/s offered: p50 {f['latency']['checkpoint_p50_ms']:.2f} ms "
                  f"vs {d['latency']['checkpoint_p50_ms']:.2f} ms, p99 {f['latency']['checkpoint_p99_ms']:.2f} ms vs "
                  f"{d['latency']['checkpoint_p99_ms']:.2f} ms")
        if "resume" in f and "resume" in d:
            print(f"  resume of {args.resume_runs} SIGKILLed runs: {f['resume']['seconds_to_all_done']:.1f} s vs "
                  f"{d['resume']['seconds_to_all_done']:.1f} s")
        out = HERE / "results"
        out.mkdir(exist_ok=True)
        stamp = time.strftime("%Y-%m-%dT%H%MZ", time.gmtime())
        (out / f"{stamp}.json").write_text(json.dumps({"settings": shown, "args": vars(args), **results}, indent=2))
    finally:
        pg.stop()


if __name__ == "__main__":
    import uvloop

    uvloop.install()
    asyncio.run(main())
