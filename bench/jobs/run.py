"""Job queue benchmark: FORGE vs PgQueuer vs Procrastinate on the same PostgreSQL, same run.

    .venv/bin/python bench/jobs/run.py [--jobs 50000] [--seconds 15] [--latency-seconds 10]
                                            [--settings stock,nofsync] [--systems forge,pgqueuer,procrastinate]

For each PostgreSQL setting (``stock``: the server's durable defaults; ``nofsync``: fsync,
synchronous_commit and full_page_writes off) it starts one embedded PostgreSQL, then runs every
system against a fresh database of its own on that server:

* **drain**: N no-op jobs are stored first, then workers empty the queue; jobs/s = N / time
  from the first job's start until every job is done (start-up of each system excluded alike;
  FORGE: until its hot table is empty, i.e. every result written too).
* **continuous**: one producer enqueues batches of 10 while workers dequeue, for T seconds;
  jobs/s = jobs executed / T.
* **latency** (FORGE only): jobs offered at a fixed 1,000/s, one job per enqueue transaction
  (``JobQueue.enqueue`` on a 32-connection asyncpg pool, in the worker's process); enqueue-to-start
  latency = from just before the enqueue call until the job function starts. One second of
  warm-up at the same rate is run first and not measured.

PgQueuer runs its OWN benchmark tool, ``tools/benchmark.py`` from the pinned ``pgqueuer`` sdist
(the wheel does not ship it; the sdist is downloaded once with ``pip download`` into the git-ignored
``bench/results/pgqueuer-<version>/`` and its sha256 checked), as a subprocess pointed at the run's
fresh database through the libpq environment variables, after ``pgq install`` and ``pgq autovac``
as PgQueuer's CI does. Its ``--strategy drain --jobs N`` and ``--strategy throughput --time T``
stand for our two modes, with ``--driver apg --dequeue 5 --dequeue-batch-size 10`` (up to 50 jobs
in flight) and, for throughput, ``--enqueue 1 --enqueue-batch-size 10``; the figure is the rate the
tool itself reports (its ``--output-json``, the same number as its printed "Rate"). Its timing
windows are its own: drain = N / (consumers start .. queue empty, start-up included); throughput =
jobs done / time from its progress bar's creation until its consumers have stopped.
Procrastinate runs one worker with concurrency 50 (its default is 1) and ``batch_defer_async``
producers. FORGE runs one in-process node with the worker role and its default ``[worker]``
settings (concurrency 50). ``forge_pgbouncer`` is the same node with its pool through PgBouncer
in transaction mode (``[database] url``; sessions straight to the server, ``direct_url``), the
continuous producer through PgBouncer too; its ratio to ``forge`` is printed. ``forge_2x25``
(FORGE_SHAPES) is FORGE as a cluster: 2 worker-node processes (``worker_node.py``) x concurrency 25,
the peer of graphile_4x24; each FORGE system's ratio to graphile's best shape is printed. FORGE and Procrastinate run under uvloop in this process, PgQueuer's
tool under uvloop in its own.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from procstat import CpuMeter, RoleMeter  # noqa: E402


class Sample:
    """One round of one system: jobs/s, and CPU per job of its worker processes and of PostgreSQL
    over the same window when measured (``meter``)."""

    def __init__(self, rate: float, jobs: int, meter: CpuMeter | None = None, note: str = "",
                 elapsed: float | None = None) -> None:
        self.rate, self.jobs, self.note = rate, jobs, note
        self.worker_us = meter.worker_cpu / jobs * 1e6 if meter and jobs else None
        self.pg_us = meter.pg_cpu / jobs * 1e6 if meter and jobs else None
        #: CPUs the system obtained over the window: its workers' and PostgreSQL's CPU seconds per
        #: second (bound: every role, the producer's too - set by bound_window)
        self.cpus = (meter.worker_cpu + meter.pg_cpu) / elapsed if meter and elapsed else None
        #: bound: CPU per job of every role (workers, producer, the whole server)
        self.all_us: float | None = None

    def cpu(self) -> str:
        if self.worker_us is None:
            return "CPU per job not measured"
        return (f"CPU per job: workers {self.worker_us:5.1f} us, PostgreSQL {self.pg_us:5.1f} us"
                + (f", all roles {self.all_us:5.1f} us" if self.all_us is not None else "")
                + (f"; {self.cpus:.2f} CPUs" if self.cpus is not None else ""))

SETTINGS = {
    "stock": {},
    "nofsync": {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"},
}
SHOWN = ["server_version", "fsync", "synchronous_commit", "full_page_writes", "wal_level", "shared_buffers",
         "max_connections", "checkpoint_timeout", "max_wal_size", "work_mem"]


def db_url(base: str, name: str) -> str:
    from forge_kernel.db import with_database

    return with_database(base, name)


async def fresh_db(base: str, name: str) -> str:
    admin = await asyncpg.connect(base)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return db_url(base, name)


#: FORGE's variants; the others are peers
FORGES = ("forge", "forge-observe", "forge_prefetch0", "forge_fixed", "forge_lanes2")

#: systems --forge-variant adds (FORGE with other [worker] settings)
FORGES_VARIANTS: list[str] = []

#: [worker] settings of every FORGE node (--forge-worker); empty: the defaults
FORGE_WORKER: dict[str, Any] = {}


def fixed_prefetch() -> dict[str, int]:
    """forge_fixed's [worker] settings: the reserve fixed at its floor (twice concurrency), as before it adapted."""
    return {"prefetch": 2 * int(FORGE_WORKER.get("concurrency", 50))}


def run_quietly(main: Any) -> None:
    """Run coroutine ``main`` as a bench process does: logs at WARNING and up only (the standard
    library's, loguru's, the nodes' [log] level), under uvloop when it is installed."""
    import logging

    logging.disable(logging.WARNING)
    os.environ.setdefault("FORGE_LOG__LEVEL", "WARNING")
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)


# --- FORGE ---------------------------------------------------------------------------------------
async def forge_node(url: str, direct_url: str = "", observe: bool = False, **worker: Any):
    from forge_kernel.config import load_config
    from forge_kernel.node import Node
    from forge_kernel.plugins import PluginLoader

    # "forge" runs without forge-observe (as before it existed); "forge-observe" with it at its defaults
    loader = PluginLoader(env={} if observe else {"FORGE_DISABLE_PLUGINS": "observe"}).load()
    if observe and "observe" not in {p.name for p in loader.loaded()}:
        raise SystemExit("forge-observe is not installed in this environment (python3 dev.py test installs it)")
    data = {"database": {"url": url, "direct_url": direct_url, "pool_min": 2, "pool_max": 20},
            "node": {"roles": ["worker"]},
            "app": {"modules": ["forge_bench_jobs"], "example": False},
            "log": {"level": "WARNING"},
            "worker": {**FORGE_WORKER, **worker}}
    # freeze_gc: the garbage collector set up as `forge-node start` sets it up (start-up heap frozen,
    # [node] gc_thresholds): the benchmark process runs nothing else that allocates
    node = Node(load_config(loader.config_sections(), data=data, env={}), loader, freeze_gc=True)
    return node


async def forge_prepare(url: str) -> None:
    """Create the schema (a node that runs no role applies every migration and exits)."""
    from forge_kernel import migrations as migmod
    from forge_kernel.app import Registry
    from forge_kernel.node import all_migrations
    from forge_kernel.plugins import PluginLoader
    from forge_kernel.db import connect

    loader = PluginLoader(env={}).load()
    conn = await connect(url)
    try:
        await migmod.migrate(conn, all_migrations(loader, Registry.from_modules(["forge_bench_jobs"])))
    finally:
        await conn.close()


class Bouncer:
    """PgBouncer (transaction mode, 20 server connections, FORGE's pool_max) in front of the
    run's server, for ``forge_pgbouncer``: ``url(database)`` goes through it."""

    def __init__(self, base: str) -> None:
        from forge_kernel.testing.servers import PgBouncer, private_folder, server_of

        # (the server listens on 127.0.0.1 too: PgBouncer runs as another account than the server and
        # cannot enter its private socket folder)
        _, port, self.user, password = server_of(base)
        self.root = private_folder("forge-bench-pgbouncer-")
        self.bouncer = PgBouncer(self.root, "127.0.0.1", port, {self.user: password}, pool_size=20).start()

    def url(self, database: str) -> str:
        return self.bouncer.url(database, self.user)

    def stop(self) -> None:
        self.bouncer.stop()
        shutil.rmtree(self.root, ignore_errors=True)


async def forge_drain(base: str, n: int, bouncer: Bouncer | None = None,
                      postmaster: int | None = None, observe: bool = False, worker: dict | None = None) -> Sample:
    import forge_bench_jobs as fb
    from forge_worker import JobQueue

    url = await fresh_db(base, "bench_forge_drain")
    await forge_prepare(url)
    conn = await asyncpg.connect(url)
    queue = JobQueue(conn)
    for i in range(0, n, 10_000):
        await queue.enqueue_many([queue.request(fb.noop) for _ in range(min(10_000, n - i))])
    fb.STATE["done"] = 0
    node = await forge_node(bouncer.url("bench_forge_drain"), url) if bouncer else \
        await forge_node(url, observe=observe, **(worker or {}))
    await node.start()
    meter = CpuMeter(lambda: [os.getpid()], postmaster) if postmaster else None
    while not fb.STATE["done"]:
        await asyncio.sleep(0.001)
    if meter:
        meter.start()
    while fb.STATE["done"] < n:
        await asyncio.sleep(0.005)
    while await conn.fetchval("SELECT EXISTS (SELECT 1 FROM forge_jobs)"):
        await asyncio.sleep(0.002)
    elapsed = time.perf_counter() - fb.STATE["first"]
    if meter:
        meter.stop()
    stats, prefetch = node.worker.stats, node.worker.prefetch
    await node.stop()
    await conn.close()
    return Sample(n / elapsed, n, meter, elapsed=elapsed, note=f"{n / max(stats['statements'], 1):.1f} jobs per claim statement, "
                                            f"{_round_trip_ms(stats)} ms per round trip; prefetch at the end {prefetch}")


def _round_trip_ms(stats: dict[str, Any]) -> str:
    """The claim loop's mean statement round trip (sent until its rows are back)."""
    return f"{1000 * stats['round_trip_s'] / max(stats['statements'], 1):.2f}"


async def forge_continuous(base: str, seconds: float, batch: int = 10, bouncer: Bouncer | None = None,
                           observe: bool = False) -> Sample:
    import forge_bench_jobs as fb
    from forge_worker import JobQueue

    url = await fresh_db(base, "bench_forge_cont")
    await forge_prepare(url)
    if bouncer:
        pooled = bouncer.url("bench_forge_cont")
        node = await forge_node(pooled, url)
        await node.start()
        conn = await asyncpg.connect(pooled, statement_cache_size=0)
    else:
        node = await forge_node(url, observe=observe)
        await node.start()
        conn = await asyncpg.connect(url)
    queue = JobQueue(conn)
    stop = asyncio.Event()

    async def produce() -> None:
        while not stop.is_set():
            await queue.enqueue_many([queue.request(fb.noop) for _ in range(batch)])

    fb.STATE["done"] = 0
    producer = asyncio.create_task(produce())
    t0 = time.perf_counter()
    await asyncio.sleep(seconds)
    done = fb.STATE["done"]
    elapsed = time.perf_counter() - t0
    stop.set()
    await producer
    await node.stop()
    await conn.close()
    return Sample(done / elapsed, done)


async def forge_latency(base: str, seconds: float, rate: int = 1000) -> tuple[float, float, float, int]:
    import forge_bench_jobs as fb
    from forge_worker import JobQueue

    url = await fresh_db(base, "bench_forge_latency")
    await forge_prepare(url)
    node = await forge_node(url)
    await node.start()
    pool = await asyncpg.create_pool(url, min_size=32, max_size=32)
    queue = JobQueue(pool)
    tasks: set[asyncio.Task] = set()

    async def enqueue_one() -> None:
        job_id = await queue.enqueue(fb.timed, {"sent": time.perf_counter()})
        fb.STATE["committed"][job_id] = time.perf_counter()

    async def offer(total: int) -> float:
        fb.STATE["latencies"] = []
        fb.STATE["starts"] = {}
        fb.STATE["committed"] = {}
        fb.STATE["done"] = 0
        t0 = time.perf_counter()
        for i in range(total):
            tick = t0 + i / rate
            delay = tick - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            t = asyncio.create_task(enqueue_one())
            tasks.add(t)
            t.add_done_callback(tasks.discard)
        offered = total / (time.perf_counter() - t0)
        deadline = time.perf_counter() + 30
        while fb.STATE["done"] < total and time.perf_counter() < deadline:
            await asyncio.sleep(0.01)
        return offered

    # warm-up, not measured: each of the 32 connections prepares its statements and introspects
    # the array types once, which stalls the first ~150 ms of enqueues
    await offer(rate)
    total = int(seconds * rate)
    offered = await offer(total)
    lat = sorted(fb.STATE["latencies"])
    # the same jobs measured from the moment the enqueue call returned (its commit acknowledged):
    # the queue's own share, without the durable INSERT's commit time
    after_commit = sorted(start - fb.STATE["committed"][job_id] for job_id, start in fb.STATE["starts"].items()
                          if job_id in fb.STATE["committed"])
    await node.stop()
    await pool.close()
    q = statistics.quantiles(lat, n=100)
    qc = statistics.quantiles(after_commit, n=100)
    return q[49] * 1000, q[98] * 1000, offered, len(lat), qc[49] * 1000, qc[98] * 1000


# --- FORGE as a cluster: several worker-node processes (worker_node.py) -------------------------------
#: (processes, concurrency each): FORGE's own way to more CPU is more nodes on one database, as
#: graphile_4x24 is graphile's; each shape also runs as forge-observe_<shape> (forge-observe loaded)
FORGE_SHAPES = {"forge_2x25": (2, 25)}


def forge_shape(system: str) -> tuple[int, int, bool]:
    """(processes, concurrency, forge-observe loaded) of a several-process FORGE system."""
    observe = system.startswith("forge-observe_")
    return (*FORGE_SHAPES["forge_" + system.split("_", 1)[1]], observe)


def forge_shape_systems() -> list[str]:
    return [name for s in FORGE_SHAPES for name in (s, "forge-observe_" + s.split("_", 1)[1])]


async def stop_processes(procs: list[asyncio.subprocess.Process]) -> None:
    """SIGTERM each process still running, then wait up to 30 s for each before SIGKILL."""
    for p in procs:
        if p.returncode is None:
            p.terminate()
    for p in procs:
        try:
            await asyncio.wait_for(p.wait(), 30)
        except asyncio.TimeoutError:
            p.kill()
            await p.wait()


class ForgeNodes:
    """``processes`` worker_node.py processes, each one FORGE node (worker role, concurrency
    ``concurrency``) on the run's database; stopped by pid (SIGTERM: a graceful node stop)."""

    def __init__(self, url: str, processes: int, concurrency: int, observe: bool) -> None:
        self.url, self.n, self.concurrency, self.observe = url, processes, concurrency, observe
        self.procs: list[asyncio.subprocess.Process] = []
        self.ready = 0
        self.firsts: list[float] = []
        self.done: list[int] = []
        #: claim statements each node sent over its life
        self.statements: list[int] = []
        self.output: list[str] = []
        self._readers: list[asyncio.Task] = []

    async def start(self) -> None:
        """Start the processes; return once every node runs."""
        argv = [sys.executable, str(HERE / "worker_node.py"), "--url", self.url, "--concurrency",
                str(self.concurrency), "--worker", json.dumps(FORGE_WORKER)] + (["--observe"] if self.observe else [])
        for _ in range(self.n):
            proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.PIPE,
                                                        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
            self.procs.append(proc)
            self._readers.append(asyncio.create_task(self._read(proc)))
        deadline = time.monotonic() + 60
        while self.ready < self.n:
            if time.monotonic() > deadline or any(p.returncode is not None for p in self.procs):
                raise RuntimeError("FORGE worker nodes did not start: " + "\n".join(self.output[-20:]))
            await asyncio.sleep(0.01)

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        async for raw in proc.stdout:
            line = raw.decode(errors="replace").strip()
            if line == "ready":
                self.ready += 1
            elif line.startswith("first "):
                self.firsts.append(float(line.split()[1]))
            elif line.startswith("done "):
                jobs, statements = map(int, line.split()[1:])
                self.done.append(jobs)
                self.statements.append(statements)
            elif line:
                self.output.append(line)

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.returncode is None]

    async def stop(self) -> None:
        await stop_processes(self.procs)
        await asyncio.gather(*self._readers, return_exceptions=True)  # their last lines ("done N") read

    async def check_once(self, conn: asyncpg.Connection, expected: int | None = None) -> str:
        """After :meth:`stop`: every job ran exactly once per attempt - the jobs the processes ran
        equal the attempts forge_job_history recorded, one attempt per job, each succeeded (and, for
        a drain, all ``expected`` of them with the hot table empty)."""
        if len(self.done) != self.n:
            raise RuntimeError(f"{self.n - len(self.done)} FORGE worker node(s) did not stop cleanly: "
                               + "\n".join(self.output[-20:]))
        ran = sum(self.done)
        rows, ids, ok, retried = await conn.fetchrow(
            "SELECT count(*), count(DISTINCT id), count(*) FILTER (WHERE status = 'succeeded'), "
            "count(*) FILTER (WHERE attempt > 1) FROM forge_job_history")
        left = await conn.fetchval("SELECT count(*) FROM forge_jobs WHERE status IN ('running', 'dead')")
        if not (ran == rows == ids == ok) or retried or left or (expected is not None and ran != expected):
            raise RuntimeError(f"FORGE nodes ran {ran} jobs ({self.done}); history: {rows} attempts of {ids} jobs, "
                               f"{ok} succeeded, {retried} retried; {left} left running or dead"
                               + (f"; expected {expected}" if expected is not None else ""))
        return (f"{ran:,} jobs run once each ({'/'.join(f'{d:,}' for d in self.done)} by process), "
                f"{ran / max(sum(self.statements), 1):.1f} jobs per claim statement")


async def forge_procs_drain(base: str, system: str, args: argparse.Namespace) -> Sample:
    import forge_bench_jobs as fb
    from forge_worker import JobQueue

    processes, concurrency, observe = forge_shape(system)
    url = await fresh_db(base, f"bench_{system.replace('-', '_')}_drain")
    await forge_prepare(url)
    nodes = ForgeNodes(url, processes, concurrency, observe)
    conn = await asyncpg.connect(url)
    try:
        await nodes.start()  # idle and listening: the jobs arrive in one transaction below, as graphile's
        meter = CpuMeter(nodes.pids, args.postmaster)
        queue = JobQueue(conn)
        async with conn.transaction():
            for i in range(0, args.jobs, 10_000):
                await queue.enqueue_many([queue.request(fb.noop) for _ in range(min(10_000, args.jobs - i))])
        while not nodes.firsts:
            await asyncio.sleep(0.001)
        meter.start()
        while await conn.fetchval("SELECT EXISTS (SELECT 1 FROM forge_jobs)"):
            await asyncio.sleep(0.002)
        end = time.time()
        meter.stop()
        elapsed = end - min(nodes.firsts)
        await nodes.stop()
        note = await nodes.check_once(conn, expected=args.jobs)
        return Sample(args.jobs / elapsed, args.jobs, meter, note=note, elapsed=elapsed)
    finally:
        await nodes.stop()
        await conn.close()


async def forge_procs_bound(base: str, system: str, args: argparse.Namespace) -> Sample:
    processes, concurrency, observe = forge_shape(system)
    url = await fresh_db(base, f"bench_{system.replace('-', '_')}_bound")
    await forge_prepare(url)
    nodes = ForgeNodes(url, processes, concurrency, observe)
    try:
        await nodes.start()
        sample = await bound_window("forge", url, nodes.pids, args)
        await nodes.stop()
        conn = await asyncpg.connect(url)
        try:
            sample.note += "; " + await nodes.check_once(conn)
        finally:
            await conn.close()
        return sample
    finally:
        await nodes.stop()


# --- PgQueuer: its own tools/benchmark.py, from the pinned sdist ----------------------------------
PGQ_VERSION = "1.6.0"
#: sha256 of pgqueuer-1.6.0.tar.gz as served by PyPI
PGQ_SDIST_SHA256 = "ed1306404f96e25c84c951f434e8b06b091e04e0177af0d5441505a7944f156e"
#: download cache; bench/results/ is git-ignored, PgQueuer's code is not kept in the repository
PGQ_CACHE = HERE.parent / "results" / f"pgqueuer-{PGQ_VERSION}"
#: the tool's options, set explicitly (these are also its defaults): 5 dequeue tasks x batch 10 =
#: up to 50 jobs in flight, as FORGE's worker concurrency 50; one producer enqueuing batches of 10,
#: as FORGE's and Procrastinate's continuous producers; asyncpg driver, as FORGE
PGQ_COMMON = ["--driver", "apg", "--dequeue", "5", "--dequeue-batch-size", "10"]


def pgq_tool() -> Path:
    """PgQueuer's ``tools/benchmark.py`` from its pinned sdist (the wheel does not ship it)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("pgqueuer")
    except PackageNotFoundError:
        raise SystemExit(f"pgqueuer is not installed (the bench pins {PGQ_VERSION}): "
                         "pip install -r bench/jobs/requirements.txt") from None
    if installed != PGQ_VERSION:
        raise SystemExit(f"pgqueuer {installed} installed, the bench pins {PGQ_VERSION}: "
                         "pip install -r bench/jobs/requirements.txt")
    sdist = PGQ_CACHE / f"pgqueuer-{PGQ_VERSION}.tar.gz"
    if not sdist.exists():
        PGQ_CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        f"pgqueuer=={PGQ_VERSION}", "-d", str(PGQ_CACHE)], check=True)
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != PGQ_SDIST_SHA256:
        raise SystemExit(f"{sdist}: sha256 {digest}, expected {PGQ_SDIST_SHA256}")
    script = PGQ_CACHE / "tools" / "benchmark.py"
    script.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(sdist) as tar:
        script.write_bytes(tar.extractfile(f"pgqueuer-{PGQ_VERSION}/tools/benchmark.py").read())
    return script


def pgq_args(mode: str, args: argparse.Namespace) -> list[str]:
    """The tool's command-line options for one of our modes (worker-bound: as many enqueue tasks
    as our producers, batches as large as theirs; the tool's producers are not throttled, so its
    queue only grows)."""
    if mode == "drain":
        return ["--strategy", "drain", "--jobs", str(args.jobs), *PGQ_COMMON]
    if mode == "bound":
        return ["--strategy", "throughput", "--time", f"{args.seconds:g}", *PGQ_COMMON,
                "--enqueue", str(args.bound_producers), "--enqueue-batch-size", str(args.bound_batch)]
    return ["--strategy", "throughput", "--time", f"{args.seconds:g}", *PGQ_COMMON,
            "--enqueue", "1", "--enqueue-batch-size", "10"]


def libpq_env(url: str) -> dict[str, str]:
    """The tool connects with an empty DSN, i.e. through the libpq environment variables."""
    u = urlsplit(url)
    query = {k: v[-1] for k, v in parse_qs(u.query).items()}  # the embedded server: socket folder, passfile
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(PGHOST=query.get("host") or u.hostname or "", PGPORT=query.get("port") or str(u.port or 5432),
               PGUSER=u.username or "", PGDATABASE=u.path.lstrip("/"), PYTHONUNBUFFERED="1")
    if "passfile" in query:
        env["PGPASSFILE"] = query["passfile"]
    if u.password:
        env["PGPASSWORD"] = u.password
    return env


async def run_quiet(argv: list[str], env: dict[str, str], limit: float = 600.0, cwd: Path | None = None) -> str:
    proc = await asyncio.create_subprocess_exec(*argv, env=env, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT, cwd=cwd)
    try:
        out = (await asyncio.wait_for(proc.communicate(), limit))[0].decode(errors="replace")
    finally:  # a timeout or a cancelled bench never leaves the tool running
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}:\n{out}")
    return out


async def pgq_run(base: str, mode: str, args: argparse.Namespace) -> Sample:
    """One run of PgQueuer's benchmark tool on a fresh database; its own rate is the figure."""
    url = await fresh_db(base, f"bench_pgq_{mode}")
    env = libpq_env(url)
    # the schema as PgQueuer's CI prepares it for this tool: `pgq install` then `pgq autovac`
    # (FORGE's migration tunes its jobs table's autovacuum likewise)
    await run_quiet([sys.executable, "-m", "pgqueuer", "install"], env)
    await run_quiet([sys.executable, "-m", "pgqueuer", "autovac"], env)
    with tempfile.TemporaryDirectory(prefix="forge-bench-pgq-") as tmp:
        out = Path(tmp) / "benchmark.json"
        argv = [sys.executable, str(args.pgq_tool), *pgq_args(mode, args), "--output-json", str(out)]
        await run_quiet(argv, env)
        result = json.loads(out.read_text())
    # the JSON holds the same figure the tool prints in its result table's "Rate" row
    print(f"    pgqueuer tools/benchmark.py: {result['steps']:,} jobs, elapsed {result['elapsed']}, "
          f"rate {result['rate']:,.0f} jobs/s, left queued {result['queued']}", flush=True)
    # the tool reports its drain figure without checking the queue emptied, and a throughput
    # run whose consumers missed their grace period reports 0: check both before trusting it
    if not (result["steps"] > 0 and result["rate"] > 0):
        raise RuntimeError(f"PgQueuer's tool reported no work: {result}")
    if mode == "bound" and not result["queued"]:
        print("    WARNING: PgQueuer's queue ran dry: not worker-bound", flush=True)
    if mode == "drain":
        conn = await asyncpg.connect(url)
        try:
            left = await conn.fetchval("SELECT count(*) FROM pgqueuer")
        finally:
            await conn.close()
        if left:
            raise RuntimeError(f"PgQueuer's drain left {left} of {args.jobs} jobs queued; its rate is not a drain")
    return Sample(float(result["rate"]), result["steps"],
                  note=f"left queued {result['queued']:,}" if mode == "bound" else "")


# --- Procrastinate ----------------------------------------------------------------------------------
def procrastinate_app(url: str, counter: list[int]):
    import procrastinate

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=url))

    @app.task(name="noop")
    async def noop() -> None:
        if not counter[0]:
            counter[1] = time.perf_counter()
        counter[0] += 1

    return app, noop


async def procrastinate_drain(base: str, n: int, concurrency: int = 50) -> Sample:
    url = await fresh_db(base, "bench_procrastinate_drain")
    counter = [0, 0.0]
    app, noop = procrastinate_app(url, counter)
    async with app.open_async():
        await app.schema_manager.apply_schema_async()
        for i in range(0, n, 10_000):
            await noop.batch_defer_async(*[{} for _ in range(min(10_000, n - i))])
        await app.run_worker_async(concurrency=concurrency, wait=False, install_signal_handlers=False)
        elapsed = time.perf_counter() - counter[1]
    assert counter[0] >= n, f"Procrastinate drained {counter[0]} of {n}"
    return Sample(n / elapsed, n)


async def procrastinate_continuous(base: str, seconds: float, concurrency: int = 50, batch: int = 10) -> Sample:
    url = await fresh_db(base, "bench_procrastinate_cont")
    counter = [0, 0.0]
    app, noop = procrastinate_app(url, counter)
    stop = asyncio.Event()
    async with app.open_async():
        await app.schema_manager.apply_schema_async()

        async def produce() -> None:
            while not stop.is_set():
                await noop.batch_defer_async(*[{} for _ in range(batch)])

        worker = asyncio.create_task(app.run_worker_async(concurrency=concurrency, wait=True,
                                                          install_signal_handlers=False))
        producer = asyncio.create_task(produce())
        t0 = time.perf_counter()
        await asyncio.sleep(seconds)
        done, elapsed = counter[0], time.perf_counter() - t0
        stop.set()
        await producer
        worker.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(worker, 30)
    return Sample(done / elapsed, done)



# --- graphile-worker (Node.js), installed from npm at bench time ----------------------------------
GRAPHILE_VERSION = "0.17.3"  # 0.18 needs Node >= 22.18; the machine has Node 20
#: npm install cache; bench/results/ is git-ignored, graphile-worker's code is not kept in the repository
GRAPHILE_CACHE = HERE.parent / "results" / f"graphile-worker-{GRAPHILE_VERSION}"
#: graphile-worker's own fast settings, from its perfTest/graphile.config.js: a local queue of 500
#: jobs refetched after 10 ms, completions and failures batched (delay 0), pool = concurrency + 1
GRAPHILE_PRESET = {"localQueue": {"size": 500, "refetchDelay": {"durationMs": 10}},
                   "completeJobBatchDelay": 0, "failJobBatchDelay": 0}
#: (processes, concurrentJobs each): one process x 50 (FORGE's concurrency) and perfTest's 4 x 24
GRAPHILE_SHAPES = {"graphile_1x50": (1, 50), "graphile_4x24": (4, 24)}
#: the task: a no-op that says (once per process) when its first job started, in epoch ms
GRAPHILE_TASK = """let first = true;
module.exports = async () => {
  if (first) { first = false; process.stdout.write(`first ${performance.timeOrigin + performance.now()}\\n`); }
};
"""


def graphile_install() -> Path:
    """``npm install graphile-worker@GRAPHILE_VERSION`` into the cache folder (once)."""
    cli = GRAPHILE_CACHE / "node_modules" / "graphile-worker" / "dist" / "cli.js"
    if not cli.exists():
        GRAPHILE_CACHE.mkdir(parents=True, exist_ok=True)
        (GRAPHILE_CACHE / "package.json").write_text(json.dumps(
            {"private": True, "dependencies": {"graphile-worker": GRAPHILE_VERSION}}))
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--loglevel=error"], cwd=GRAPHILE_CACHE,
                       check=True)
    installed = json.loads((GRAPHILE_CACHE / "node_modules" / "graphile-worker" / "package.json").read_text())
    if installed["version"] != GRAPHILE_VERSION:
        raise SystemExit(f"{GRAPHILE_CACHE}: graphile-worker {installed['version']}, expected {GRAPHILE_VERSION}")
    return cli


def graphile_env(url: str) -> dict[str, str]:
    """node-postgres reads no passfile given in a URL: the password goes in PGPASSWORD instead."""
    u = urlsplit(url)
    query = {k: v[-1] for k, v in parse_qs(u.query).items()}
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    if "passfile" in query:
        env["PGPASSWORD"] = Path(query["passfile"]).read_text().strip().splitlines()[-1].split(":")[-1]
    conn = f"postgresql://{u.username}@/{u.path.lstrip('/')}?host={query.get('host', '')}&port={query.get('port', '')}"
    env.update(DATABASE_URL=conn, NO_LOG_SUCCESS="1")
    return env


class GraphileWorkers:
    """``processes`` graphile-worker CLI processes x ``concurrency`` jobs on the run's database,
    each in a folder holding the no-op task and a graphile.config.js with GRAPHILE_PRESET."""

    def __init__(self, cli: Path, url: str, processes: int, concurrency: int) -> None:
        self.cli, self.url, self.n, self.concurrency = cli, url, processes, concurrency
        self.env = graphile_env(url)
        self.dir = Path(tempfile.mkdtemp(prefix="forge-bench-graphile-"))
        (self.dir / "tasks").mkdir()
        (self.dir / "tasks" / "noop.js").write_text(GRAPHILE_TASK)
        preset = {"worker": {"connectionString": self.env["DATABASE_URL"], "concurrentJobs": concurrency,
                             "maxPoolSize": concurrency + 1, **GRAPHILE_PRESET}}
        (self.dir / "graphile.config.js").write_text(f"module.exports = {json.dumps(preset)};\n")
        self.procs: list[asyncio.subprocess.Process] = []
        self.output: list[str] = []
        self.firsts: list[float] = []
        self._readers: list[asyncio.Task] = []

    async def install_schema(self) -> None:
        await run_quiet(["node", str(self.cli), "--schema-only"], self.env, cwd=self.dir)

    async def start(self) -> None:
        """Start the processes; return once each has its LISTEN connection (NO_LOG_SUCCESS, as in
        graphile's perfTest, also silences its "looking for jobs" line)."""
        for _ in range(self.n):
            proc = await asyncio.create_subprocess_exec(
                "node", str(self.cli), "-j", str(self.concurrency), "-m", str(self.concurrency + 1),
                cwd=self.dir, env=self.env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
            self.procs.append(proc)
            self._readers.append(asyncio.create_task(self._read(proc)))
        conn = await asyncpg.connect(self.url)
        try:
            deadline = time.monotonic() + 60
            while await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                      "AND query LIKE 'LISTEN \"jobs:insert\"%'") < self.n:
                if time.monotonic() > deadline or any(p.returncode is not None for p in self.procs):
                    raise RuntimeError("graphile-worker did not start: " + "\n".join(self.output[-20:]))
                await asyncio.sleep(0.05)
        finally:
            await conn.close()

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        async for raw in proc.stdout:
            line = raw.decode(errors="replace").strip()
            if line.startswith("first "):
                self.firsts.append(float(line.split()[1]) / 1000)
            elif line:
                self.output.append(line)

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.returncode is None]

    async def stop(self) -> None:
        await stop_processes(self.procs)
        for t in self._readers:
            t.cancel()
        shutil.rmtree(self.dir, ignore_errors=True)


async def graphile_drain(base: str, system: str, args: argparse.Namespace) -> Sample:
    processes, concurrency = GRAPHILE_SHAPES[system]
    url = await fresh_db(base, f"bench_{system}_drain")
    workers = GraphileWorkers(args.graphile_cli, url, processes, concurrency)
    conn = await asyncpg.connect(url)
    try:
        await workers.install_schema()
        await workers.start()  # idle and listening: the jobs arrive in one transaction below
        meter = CpuMeter(workers.pids, args.postmaster)
        specs = json.dumps([{"identifier": "noop", "payload": {}}] * min(args.jobs, 10_000))
        async with conn.transaction():
            for i in range(0, args.jobs, 10_000):
                n = min(10_000, args.jobs - i)
                await conn.execute("SELECT graphile_worker.add_jobs(ARRAY(SELECT json_populate_recordset("
                                   "NULL::graphile_worker.job_spec, $1::json)) )",
                                   specs if n == 10_000 else json.dumps([{"identifier": "noop", "payload": {}}] * n))
        while not workers.firsts:
            await asyncio.sleep(0.001)
        meter.start()
        while await conn.fetchval("SELECT EXISTS (SELECT 1 FROM graphile_worker._private_jobs)"):
            await asyncio.sleep(0.002)
        end = time.time()
        meter.stop()
        return Sample(args.jobs / (end - min(workers.firsts)), args.jobs, meter, elapsed=end - min(workers.firsts))
    finally:
        await workers.stop()
        await conn.close()


async def graphile_bound(base: str, system: str, args: argparse.Namespace) -> Sample:
    processes, concurrency = GRAPHILE_SHAPES[system]
    url = await fresh_db(base, f"bench_{system}_bound")
    workers = GraphileWorkers(args.graphile_cli, url, processes, concurrency)
    try:
        await workers.install_schema()
        await workers.start()
        return await bound_window("graphile", url, workers.pids, args)
    finally:
        await workers.stop()

# --- worker-bound: producers in a process of their own keep the queue from running dry ---------------
class PgProfile:
    """--pg-profile: what PostgreSQL does during a worker-bound window - per statement (pg_stat_statements:
    calls, mean time, rows, WAL bytes and shared buffers dirtied per call) and what its backends wait
    on (pg_stat_activity sampled every 2 ms from a connection of its own)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.conn: asyncpg.Connection | None = None
        self.waits: dict[tuple[str, str], int] = {}
        self.samples = 0
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self.conn = await asyncpg.connect(self.url)
        await self.conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        await self.conn.execute("SELECT pg_stat_statements_reset()")
        self._task = asyncio.create_task(self._sample())

    async def _sample(self) -> None:
        me = self.conn.get_server_pid()
        while True:
            rows = await self.conn.fetch(
                """SELECT left(regexp_replace(query, '\\s+', ' ', 'g'), 40) AS q, state,
                          coalesce(wait_event_type || ':' || wait_event, 'CPU') AS w
                   FROM pg_stat_activity WHERE datname = current_database() AND pid <> $1
                     AND state IN ('active', 'idle in transaction')""", me)
            self.samples += 1
            for r in rows:
                key = (r["q"], r["w"])
                self.waits[key] = self.waits.get(key, 0) + 1
            await asyncio.sleep(0.002)

    async def report(self, jobs: int) -> str:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        rows = await self.conn.fetch(
            """SELECT left(regexp_replace(query, '\\s+', ' ', 'g'), 60) AS q, calls, total_exec_time, rows,
                      wal_bytes, shared_blks_dirtied, shared_blks_hit + shared_blks_read AS blks
               FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
               ORDER BY total_exec_time DESC LIMIT 16""")
        await self.conn.close()
        out = [f"    pg_stat_statements over the run ({jobs:,} jobs in the window):"]
        for r in rows:
            calls = max(r["calls"], 1)
            out.append(f"      {r['total_exec_time']:8.0f} ms {r['calls']:6d} calls {r['total_exec_time'] / calls:7.3f} ms/call "
                       f"{r['rows'] / calls:7.1f} rows/call {float(r['wal_bytes']) / max(r['rows'], 1):6.0f} WAL B/row "
                       f"{r['shared_blks_dirtied'] / calls:6.1f} dirtied/call {r['blks'] / max(r['rows'], 1):5.1f} blks/row  {r['q']}")
        out.append(f"    pg_stat_activity, {self.samples} samples (backends seen per sample, by statement and wait):")
        for (q, w), n in sorted(self.waits.items(), key=lambda kv: -kv[1])[:12]:
            out.append(f"      {n / max(self.samples, 1):5.2f}  {w:<28} {q}")
        return "\n".join(out)


async def bound_window(system: str, url: str, worker_pids: Any, args: argparse.Namespace) -> Sample:
    """Run producer.py against ``url`` and measure the workers between its ``start`` and ``stop``."""
    meter = CpuMeter(worker_pids, args.postmaster)
    roles = RoleMeter(worker_pids, args.postmaster)
    watcher = await asyncpg.connect(url)  # reads pg_stat_activity for the roles; its own backend is left out
    roles.skip.add(watcher.get_server_pid())

    async def kinds() -> dict[int, str]:
        # forge-observe's writer (its own connection) counted apart from the workers' backends
        return {r["pid"]: r["kind"] for r in await watcher.fetch(
            "SELECT pid, CASE WHEN application_name = 'forge-observe' THEN 'forge-observe writer' "
            "ELSE backend_type END AS kind FROM pg_stat_activity")}

    profile = PgProfile(url) if args.pg_profile else None
    if profile is not None:
        await profile.start()
        roles.skip.add(profile.conn.get_server_pid())
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(HERE / "producer.py"), "--system", system, "--url", url, "--app-dir", str(HERE),
        "--seconds", f"{args.seconds:g}", "--depth", str(args.bound_depth), "--batch", str(args.bound_batch),
        "--producers", str(args.bound_producers), stdout=asyncio.subprocess.PIPE)
    result = None
    try:
        async for raw in proc.stdout:
            line = raw.decode().strip()
            if line.startswith("pids "):
                roles.producer, *backends = map(int, line.split()[1:])
                roles.producer_backends.update(backends)
            elif line == "start":
                meter.start()
                roles.start()
                roles.kinds_at_start = await kinds()
            elif line == "stop":
                meter.stop()
                roles.stop()
                roles.classify(await kinds())
            elif line.startswith("{"):
                result = json.loads(line)
        await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    await watcher.close()
    if proc.returncode or result is None:
        raise RuntimeError(f"producer.py for {system} exited {proc.returncode}")
    if not result["fewest_pending"]:
        print(f"    WARNING: {system}'s queue ran dry during the window ({result}); raise --bound-depth", flush=True)
    if profile is not None:
        print(await profile.report(result["completed"]), flush=True)
    jobs = max(result["completed"], 1)
    total = sum(roles.roles.values())
    print(f"    CPU per job by role ({system}): " + ", ".join(
        f"{k} {v / jobs * 1e6:.1f}" for k, v in sorted(roles.roles.items(), key=lambda kv: -kv[1]))
        + f"; all {total / jobs * 1e6:.1f} us, {total / result['elapsed']:.2f} CPUs; machine (every process) "
        f"{roles.machine / jobs * 1e6:.1f} us, {roles.machine / result['elapsed']:.2f} CPUs"
        + (f"; exited in the window: {', '.join(roles.exited)}" if roles.exited else ""), flush=True)
    sample = Sample(result["completed"] / result["elapsed"], result["completed"], meter,
                    note=f"fewest pending {result['fewest_pending']:,}")
    sample.all_us, sample.cpus = total / jobs * 1e6, total / result["elapsed"]
    return sample


async def forge_bound(base: str, args: argparse.Namespace, observe: bool = False, worker: dict | None = None) -> Sample:
    url = await fresh_db(base, "bench_forge_bound")
    await forge_prepare(url)
    node = await forge_node(url, observe=observe, **(worker or {}))
    await node.start()
    try:
        before = node.worker.stats["statements"]
        sample = await bound_window("forge", url, lambda: [os.getpid()], args)
        # claim statements over the whole run (warm-up and window) against the window's jobs: a rough figure
        stats = node.worker.stats
        sample.note += (f"; ~{sample.jobs / max(stats['statements'] - before, 1):.1f} jobs per claim statement, "
                        f"{_round_trip_ms(stats)} ms per round trip, {stats['statements']} statements in "
                        f"{stats['round_trip_s']:.2f} s; prefetch at the end {node.worker.prefetch}, back to prefetch "
                        f"{stats.get('reserve_back', '?')} times, most of it waiting at {stats.get('reserve_waited', '?')} returns")
        return sample
    finally:
        await node.stop()


# --- driver -----------------------------------------------------------------------------------------
async def pg_settings(url: str) -> dict[str, str]:
    conn = await asyncpg.connect(url)
    try:
        return {k: await conn.fetchval(f"SHOW {k}") for k in SHOWN}
    finally:
        await conn.close()


async def run_setting(label: str, base: str, args: argparse.Namespace) -> dict[str, Any]:
    systems = args.systems
    res: dict[str, Any] = {"settings": await pg_settings(base)}
    bouncer = Bouncer(base) if "forge_pgbouncer" in systems else None
    try:
        return await _run_setting(label, base, args, res, bouncer)
    finally:
        if bouncer is not None:
            bouncer.stop()


async def _run_setting(label: str, base: str, args: argparse.Namespace, res: dict[str, Any],
                       bouncer: Bouncer | None) -> dict[str, Any]:
    systems = args.systems
    print(f"\n=== PostgreSQL settings '{label}': " + ", ".join(f"{k}={v}" for k, v in res["settings"].items()),
          flush=True)
    runs = {
        ("forge", "drain"): lambda: forge_drain(base, args.jobs, postmaster=args.postmaster),
        ("forge_pgbouncer", "drain"): lambda: forge_drain(base, args.jobs, bouncer, args.postmaster),
        ("forge-observe", "drain"): lambda: forge_drain(base, args.jobs, postmaster=args.postmaster, observe=True),
        ("forge-observe", "continuous"): lambda: forge_continuous(base, args.seconds, observe=True),
        ("forge-observe", "bound"): lambda: forge_bound(base, args, observe=True),
        ("pgqueuer", "drain"): lambda: pgq_run(base, "drain", args),
        ("procrastinate", "drain"): lambda: procrastinate_drain(base, args.jobs),
        ("forge", "continuous"): lambda: forge_continuous(base, args.seconds),
        ("forge_pgbouncer", "continuous"): lambda: forge_continuous(base, args.seconds, bouncer=bouncer),
        ("pgqueuer", "continuous"): lambda: pgq_run(base, "continuous", args),
        ("procrastinate", "continuous"): lambda: procrastinate_continuous(base, args.seconds),
        ("forge", "bound"): lambda: forge_bound(base, args),
        # FORGE without claim-ahead ([worker] prefetch = 0: claims only into free slots, as before it)
        ("forge_prefetch0", "drain"): lambda: forge_drain(base, args.jobs, postmaster=args.postmaster,
                                                          worker={"prefetch": 0}),
        ("forge_prefetch0", "bound"): lambda: forge_bound(base, args, worker={"prefetch": 0}),
        # FORGE with its reserve fixed at the default floor (no growth under a backlog: prefetch_max = prefetch)
        ("forge_fixed", "drain"): lambda: forge_drain(base, args.jobs, postmaster=args.postmaster,
                                                      worker=fixed_prefetch()),
        ("forge_fixed", "bound"): lambda: forge_bound(base, args, worker=fixed_prefetch()),
        # FORGE with two result-and-claim statements in flight under a backlog ([worker] claim_lanes = 2)
        ("forge_lanes2", "drain"): lambda: forge_drain(base, args.jobs, postmaster=args.postmaster,
                                                       worker={"claim_lanes": 2}),
        ("forge_lanes2", "bound"): lambda: forge_bound(base, args, worker={"claim_lanes": 2}),
        ("pgqueuer", "bound"): lambda: pgq_run(base, "bound", args),
    }
    for name, worker in args.forge_variant.items():
        # --forge-variant NAME:k=v,...: FORGE with those [worker] settings, as system forge_NAME
        runs[(f"forge_{name}", "drain")] = lambda w=worker: forge_drain(base, args.jobs, postmaster=args.postmaster,
                                                                         worker=w)
        runs[(f"forge_{name}", "bound")] = lambda w=worker: forge_bound(base, args, worker=w)
    for system in forge_shape_systems():
        runs[(system, "drain")] = lambda system=system: forge_procs_drain(base, system, args)
        runs[(system, "bound")] = lambda system=system: forge_procs_bound(base, system, args)
    for shape in GRAPHILE_SHAPES:
        runs[(shape, "drain")] = lambda shape=shape: graphile_drain(base, shape, args)
        runs[(shape, "bound")] = lambda shape=shape: graphile_bound(base, shape, args)
    for mode in args.modes:
        # systems take turns, round after round, so a noisy neighbour on a shared machine hits
        # them alike; each system's figure is the median of its rounds
        here = [s for s in systems if (s, mode) in runs]
        samples: dict[str, list[Sample]] = {s: [] for s in here}
        loads: list[float] = []
        for rnd in range(args.rounds):
            # every other round in reverse order, so no system always runs first
            for system in (here if rnd % 2 == 0 else here[::-1]):
                if system == "procrastinate" and rnd >= args.procrastinate_rounds:
                    continue
                sample = await runs[(system, mode)]()
                samples[system].append(sample)
                loads.append(os.getloadavg()[0])
                print(f"  {mode:<10} {system:<14} round {rnd + 1}: {sample.rate:>10,.0f} jobs/s  {sample.cpu()}  "
                      f"(load avg {loads[-1]:.1f}){'  ' + sample.note if sample.note else ''}", flush=True)
            if len(samples.get("forge", ())) == len(samples.get("forge-observe", ())) == rnd + 1:
                f, o = samples["forge"][-1], samples["forge-observe"][-1]
                cpu = (f"; node CPU per job {f.worker_us:.1f} -> {o.worker_us:.1f} us ({o.worker_us - f.worker_us:+.1f})"
                       if f.worker_us is not None and o.worker_us is not None else "")
                print(f"  {mode:<10} round {rnd + 1}: with forge-observe / without = {o.rate / f.rate:.3f}{cpu}",
                      flush=True)
        for system in here:
            got = samples[system]
            med = {"rate": statistics.median(x.rate for x in got)}
            if got[0].worker_us is not None:
                med["worker_us"] = statistics.median(x.worker_us for x in got)
                med["pg_us"] = statistics.median(x.pg_us for x in got)
            for key in ("all_us", "cpus"):
                if getattr(got[0], key) is not None:
                    med[key] = statistics.median(getattr(x, key) for x in got)
            res[(system, mode)] = med
            cpu = (f"  CPU per job: workers {med['worker_us']:.1f} us, PostgreSQL {med['pg_us']:.1f} us"
                   if "worker_us" in med else "")
            cpu += f", all roles {med['all_us']:.1f} us" if "all_us" in med else ""
            cpu += f"; {med['cpus']:.2f} CPUs" if "cpus" in med else ""
            print(f"  {mode:<10} {system:<14} median {med['rate']:>10,.0f} jobs/s{cpu}", flush=True)
        res[("load", mode)] = (min(loads), statistics.median(loads), max(loads)) if loads else None
        if loads:
            print(f"  {mode:<10} load avg min/median/max {min(loads):.1f}/{statistics.median(loads):.1f}/"
                  f"{max(loads):.1f}", flush=True)
        for forge in all_forges():
            for peer in here:
                if forge in here and not peer.startswith("forge"):
                    print(f"  {mode:<10} {forge} / {peer:<14} "
                          f"{res[(forge, mode)]['rate'] / res[(peer, mode)]['rate']:>6.2f}x", flush=True)
        best = graphile_best(res, here, mode)
        if best:
            for forge in all_forges():
                if forge in here:
                    print(f"  {mode:<10} {forge} / graphile's best ({best}) "
                          f"{res[(forge, mode)]['rate'] / res[(best, mode)]['rate']:>6.2f}x", flush=True)
        for variant in FORGES_VARIANTS:
            if "forge" in here and variant in here:
                # rounds are interleaved: a round's pair shares its neighbours' load
                paired = statistics.median(v.rate / f.rate for v, f in zip(samples[variant], samples["forge"]))
                print(f"  {mode:<10} {variant} / forge = {res[(variant, mode)]['rate'] / res[('forge', mode)]['rate']:.3f} "
                      f"(medians), {paired:.3f} (median of per-round ratios)", flush=True)
        if "forge" in here and "forge_prefetch0" in here:
            paired = statistics.median(f.rate / z.rate for f, z in zip(samples["forge"], samples["forge_prefetch0"]))
            print(f"  {mode:<10} FORGE claim-ahead / prefetch 0 "
                  f"{res[('forge', mode)]['rate'] / res[('forge_prefetch0', mode)]['rate']:>6.2f}x (medians), "
                  f"{paired:.2f}x (median of per-round ratios)", flush=True)
        if "forge" in here and "forge_fixed" in here:
            paired = statistics.median(f.rate / z.rate for f, z in zip(samples["forge"], samples["forge_fixed"]))
            print(f"  {mode:<10} FORGE adaptive reserve / fixed "
                  f"{res[('forge', mode)]['rate'] / res[('forge_fixed', mode)]['rate']:>6.2f}x (medians), "
                  f"{paired:.2f}x (median of per-round ratios)", flush=True)
        if "forge" in here and "forge_pgbouncer" in here:
            print(f"  {mode:<10} FORGE through PgBouncer / direct "
                  f"{res[('forge_pgbouncer', mode)]['rate'] / res[('forge', mode)]['rate']:>6.2f}x", flush=True)
        if "forge" in here and "forge-observe" in here:
            ratio = res[("forge-observe", mode)]["rate"] / res[("forge", mode)]["rate"]
            paired = statistics.median(o.rate / f.rate for o, f in zip(samples["forge-observe"], samples["forge"]))
            extra = (f"; node CPU per job {res[('forge-observe', mode)]['worker_us'] - res[('forge', mode)]['worker_us']:+.1f} us"
                     if "worker_us" in res[("forge", mode)] else "")
            res[("ratio", mode)] = ratio
            print(f"  {mode:<10} with forge-observe / without = {ratio:.3f} (medians), {paired:.3f} (median of "
                  f"per-round ratios); target >= 0.95{extra}", flush=True)
    if "forge" in systems and args.latency_seconds > 0:
        p50, p99, offered, n, c50, c99 = await forge_latency(base, args.latency_seconds)
        res["latency"] = (p50, p99, offered, n, c50, c99)
        print(f"  latency    forge  offered {offered:,.0f} jobs/s, {n} jobs: enqueue-to-start "
              f"p50 {p50:.2f} ms, p99 {p99:.2f} ms; commit-to-start p50 {c50:.2f} ms, p99 {c99:.2f} ms  "
              f"(load avg {os.getloadavg()[0]:.1f})", flush=True)
    return res


async def main_async(args: argparse.Namespace) -> None:
    from forge_kernel.embedded_pg import EmbeddedPostgres
    from forge_kernel.testing import free_port

    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"load avg {os.getloadavg()[0]:.1f}; drain N={args.jobs}, continuous/bound T={args.seconds}s, "
          f"{args.rounds} rounds, latency {args.latency_seconds}s at 1000 jobs/s")
    if any(s.startswith("forge-observe") for s in args.systems) and not observe_installed():
        raise SystemExit("forge-observe is not installed in this environment (python3 dev.py test installs it)")
    print("'forge' is a node without forge-observe, 'forge-observe' the same node with it at its defaults; "
          f"[worker] settings: {FORGE_WORKER or 'the defaults'}")
    shapes = [s for s in args.systems if s in forge_shape_systems()]
    if shapes:
        print("FORGE as a cluster: worker_node.py processes, each one node like 'forge' (worker role, its [worker] "
              "settings) with concurrency C, on the run's database: "
              + ", ".join(f"{s}: {forge_shape(s)[0]} x {forge_shape(s)[1]}" for s in shapes))
    if "bound" in args.modes:
        print(f"worker-bound: producer.py in a process of its own, {args.bound_producers} connections storing batches "
              f"of {args.bound_batch} whenever fewer than {args.bound_depth:,} jobs are pending (1 s warm-up)")
    if "pgqueuer" in args.systems:
        args.pgq_tool = pgq_tool()
        print(f"PgQueuer {PGQ_VERSION}: its own {args.pgq_tool.relative_to(HERE.parent.parent)} (from the "
              f"sdist, sha256 {PGQ_SDIST_SHA256[:12]}...), one process per run, libpq environment -> the "
              "run's database:")
        for mode in args.modes:
            print(f"  {mode:<10} python tools/benchmark.py {' '.join(pgq_args(mode, args))} --output-json ...")
    if any(s in GRAPHILE_SHAPES for s in args.systems):
        args.graphile_cli = graphile_install()
        node = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()
        print(f"graphile-worker {GRAPHILE_VERSION} (npm, in {GRAPHILE_CACHE.relative_to(HERE.parent.parent)}), "
              f"Node {node}, its perfTest settings: {json.dumps(GRAPHILE_PRESET)}, maxPoolSize = concurrentJobs + 1; "
              + ", ".join(f"{s}: {n} process(es) x {c}" for s, (n, c) in GRAPHILE_SHAPES.items() if s in args.systems))
    results = {}
    for label in args.settings:
        root = Path(tempfile.mkdtemp(prefix=f"forge-bench-jobs-{label}-"))
        extra = {"shared_preload_libraries": "pg_stat_statements", "track_io_timing": "on"} if args.pg_profile else {}
        pg = EmbeddedPostgres(root, settings={**SETTINGS[label], **extra}, tcp_port=free_port())
        base = pg.start()
        args.postmaster = pg._running_pid()
        try:
            results[label] = await run_setting(label, base, args)
        finally:
            pg.release()
            shutil.rmtree(root, ignore_errors=True)
    print("\n=== summary (jobs/s; CPU per job in us: workers / PostgreSQL)")
    for label, res in results.items():
        for mode in args.modes:
            here = [s for s in args.systems if (s, mode) in res]

            def fmt(s: str) -> str:
                m = res[(s, mode)]
                return (f"{s}={m['rate']:,.0f}" + (f" ({m['worker_us']:.0f}/{m['pg_us']:.0f}" if "worker_us" in m else "")
                        + (f", all {m['all_us']:.0f}" if "all_us" in m else "")
                        + (f", {m['cpus']:.2f} CPUs" if "cpus" in m else "") + (")" if "worker_us" in m else ""))

            ratios = "  ".join(f"{f}/{s}={res[(f, mode)]['rate'] / res[(s, mode)]['rate']:.2f}x"
                               for f in all_forges() if f in here for s in here if not s.startswith("forge"))
            best = graphile_best(res, here, mode)
            if best:
                ratios += "  vs graphile's best: " + "  ".join(
                    f"{f}={res[(f, mode)]['rate'] / res[(best, mode)]['rate']:.2f}x" for f in all_forges() if f in here)
            if ("ratio", mode) in res:
                ratios += f"  with/without forge-observe={res[('ratio', mode)]:.3f}"
            load = res.get(("load", mode))
            print(f"  {label:<8} {mode:<10} {'  '.join(fmt(s) for s in here)}   {ratios}"
                  + (f"   load {load[0]:.1f}-{load[2]:.1f}" if load else ""))
        if "latency" in res:
            p50, p99, offered, n, c50, c99 = res["latency"]
            print(f"  {label:<8} latency    enqueue-to-start p50={p50:.2f} ms  p99={p99:.2f} ms; "
                  f"commit-to-start p50={c50:.2f} ms  p99={c99:.2f} ms  (offered {offered:,.0f}/s, {n} jobs)")


def all_forges() -> list[str]:
    """FORGE's systems, in-process and several-process, whose ratios to the peers are printed."""
    return [*FORGES, *FORGES_VARIANTS, *forge_shape_systems()]


def graphile_best(res: dict[Any, Any], here: list[str], mode: str) -> str | None:
    """The graphile shape with the highest median in this mode (the target: FORGE >= it)."""
    shapes = [s for s in here if s in GRAPHILE_SHAPES]
    return max(shapes, key=lambda s: res[(s, mode)]["rate"]) if shapes else None


def observe_installed() -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("forge-observe")
    except PackageNotFoundError:
        return False
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=20_000, help="jobs for the drain mode")
    p.add_argument("--seconds", type=float, default=10.0, help="duration of the continuous and worker-bound modes")
    p.add_argument("--latency-seconds", type=float, default=10.0, help="duration of the 1000 jobs/s latency run")
    p.add_argument("--rounds", type=int, default=3, help="rounds per mode; each system's median is reported")
    p.add_argument("--procrastinate-rounds", type=int, default=1,
                   help="rounds for Procrastinate (an order of magnitude slower; one round takes minutes)")
    p.add_argument("--settings", type=lambda s: s.split(","), default=["stock", "nofsync"])
    p.add_argument("--systems", type=lambda s: s.split(","),
                   default=["forge", "forge-observe", "graphile_1x50", "graphile_4x24", "pgqueuer", "procrastinate"],
                   help="forge (without forge-observe), forge-observe (FORGE with it at its defaults), "
                        "forge_pgbouncer (FORGE's pool through PgBouncer), forge_prefetch0 (FORGE with "
                        "[worker] prefetch = 0, no claim-ahead), forge_fixed (FORGE with its reserve of jobs claimed ahead fixed at "
                        "twice concurrency, as before it adapted), forge_lanes2 (FORGE with [worker] claim_lanes = 2), graphile_1x50, graphile_4x24, "
                        "pgqueuer, procrastinate; FORGE as several worker-node processes: "
                        + ", ".join(f"{s} ({n} x concurrency {c})" for s, (n, c) in FORGE_SHAPES.items())
                        + ", and forge-observe_<shape> (the same with forge-observe)")
    p.add_argument("--modes", type=lambda s: [m for m in s.split(",") if m], default=["drain", "bound", "continuous"],
                   help="throughput modes to run (drain, bound = worker-bound continuous, continuous = one "
                        "producer of batches of 10); empty for the latency run only")
    p.add_argument("--bound-depth", type=int, default=20_000, help="worker-bound: keep at least this many jobs pending")
    p.add_argument("--bound-batch", type=int, default=500, help="worker-bound: jobs per enqueue call")
    p.add_argument("--bound-producers", type=int, default=2, help="worker-bound: producer connections")
    p.add_argument("--forge-worker", type=lambda s: dict(kv.split("=", 1) for kv in s.split(",") if kv), default={},
                   help="[worker] settings for FORGE's nodes, e.g. claim_statements=1 (default: none, the defaults)")
    p.add_argument("--forge-shapes", type=lambda s: [x for x in s.split(",") if x], default=None,
                   help="PxC,...: the several-process FORGE shapes (P processes x concurrency C) instead of "
                        f"FORGE_SHAPES ({','.join(s.split('_', 1)[1] for s in FORGE_SHAPES)}), e.g. 2x50,3x17")
    p.add_argument("--pg-profile", action="store_true",
                   help="worker-bound: print PostgreSQL's statements (pg_stat_statements) and its backends' wait "
                        "events (pg_stat_activity, sampled every 2 ms) for each window; adds some load of its own")
    p.add_argument("--forge-variant", action="append", default=[],
                   help="NAME:k=v,...: a further FORGE system forge_NAME with these [worker] settings (JSON values), "
                        "e.g. --forge-variant big:prefetch_max=800 --systems forge,forge_big (an A/B in one run)")
    args = p.parse_args()
    variants = {}
    for spec in args.forge_variant:
        name, _, kvs = spec.partition(":")
        variants[name] = {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in kvs.split(",") if kv)}
        FORGES_VARIANTS.append(f"forge_{name}")
    args.forge_variant = variants
    if args.forge_shapes is not None:
        FORGE_SHAPES.clear()
        FORGE_SHAPES.update({f"forge_{shape}": tuple(map(int, shape.split("x"))) for shape in args.forge_shapes})
    FORGE_WORKER.update({k: json.loads(v) for k, v in args.forge_worker.items()})
    run_quietly(main_async(args))


if __name__ == "__main__":
    from forge_kernel.testing.procs import exit_on_sigterm

    exit_on_sigterm()  # a kill PID still stops the servers it started
    main()
