"""forge-realtime benchmark: one run, one PostgreSQL (embedded, stock settings), real peers.

(a) write throughput at 32 writers (pgbench, single-row INSERT transactions): no capture,
    FORGE capture (statement trigger + change log + gated hint), and a NOTIFY per row.
(b) 1,000 clients on 100 distinct queries at 1,000 writes/s: commit-to-client latency for
    FORGE and for a naive peer that re-runs every subscription on each NOTIFY.
(c) 5,000 clients on one query at 50 writes/s: pushes/s, latency, re-runs per write.
(d) resident memory of the node per idle WebSocket connection.

Run: ``.venv/bin/python bench/realtime/run.py`` (``--quick`` for a smaller, faster run).
The node is a real ``forge-node`` process (gateway + realtime); clients and writers run in
this process, so client-side CPU is part of the measured latency for both peers.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
import attrs
import httpx
import psutil
import websockets  # noqa: F401 - the naive peer's server library

from forge_kernel import db as dbmod
from forge_kernel.embedded_pg import EmbeddedPostgres, _bin_dir
from forge_kernel.migrations import from_package, migrate
from forge_kernel.testing.procs import exit_on_sigterm, NodeProcess, free_port
from forge_realtime.capture import install_capture, remove_capture

sys.path.insert(0, str(Path(__file__).parent))

HERE = Path(__file__).parent

import stalls  # noqa: E402 - event-loop stall watch (this process, the client processes, the node)


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def with_db(url: str, name: str) -> str:
    from forge_kernel.db import with_database

    return with_database(url, name)


# --- (a) write throughput ---------------------------------------------------------------------
INSERT_SCRIPT = "\\set topic random(0, 99)\nINSERT INTO bench_writes (topic, payload) VALUES (:topic, 'payload');\n"
NOTIFY_TRIGGER = """
CREATE OR REPLACE FUNCTION bench_notify_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_notify('bench_rows', NEW.topic::text); RETURN NULL; END $$;
CREATE OR REPLACE TRIGGER bench_notify_row AFTER INSERT ON bench_writes FOR EACH ROW EXECUTE FUNCTION bench_notify_row();
"""


def pgbench(url: str, clients: int, seconds: int, script: Path) -> float:
    out = subprocess.run([str(_bin_dir() / "pgbench"), "-n", "-c", str(clients), "-j", "2", "-T", str(seconds),
                          "-f", str(script), url], capture_output=True, text=True, check=True)
    for line in out.stdout.splitlines():
        if line.startswith("tps = "):
            return float(line.split()[2])
    raise RuntimeError(f"pgbench printed no tps:\n{out.stdout}\n{out.stderr}")


async def bench_writes(url: str, seconds: int, rounds: int, modes: tuple[str, ...]) -> dict:
    conn = await asyncpg.connect(url)
    await conn.execute("CREATE TABLE bench_writes (id bigserial PRIMARY KEY, topic integer NOT NULL, payload text NOT NULL)")
    script = Path(script_dir := tempfile.mkdtemp()) / "insert.sql"
    script.write_text(INSERT_SCRIPT)
    results: dict[str, list[float]] = {m: [] for m in modes}
    logged: list[int] = []  # change-log rows written by each capture_on run
    install_ms: list[float] = []  # first-subscription cost: functions + 4 triggers + bookkeeping
    try:
        for _ in range(rounds):
            for mode in results:
                await remove_capture(conn, "bench_writes")
                await conn.execute("DROP TRIGGER IF EXISTS bench_notify_row ON bench_writes")
                if mode == "capture_on":
                    t0 = time.perf_counter()
                    await install_capture(conn, "bench_writes", ["topic"])
                    install_ms.append((time.perf_counter() - t0) * 1000)
                elif mode == "notify_per_row":
                    await conn.execute(NOTIFY_TRIGGER)
                await conn.execute("TRUNCATE bench_writes, forge_changes")
                await conn.execute("VACUUM ANALYZE bench_writes")
                await conn.execute("CHECKPOINT")
                tps = await asyncio.to_thread(pgbench, url, 32, seconds, script)
                results[mode].append(tps)
                if mode == "capture_on":
                    logged.append(await conn.fetchval("SELECT count(*) FROM forge_changes"))
                print(f"  (a) {mode:15s} {tps:9.0f} tps", flush=True)
    finally:
        await remove_capture(conn, "bench_writes")
        await conn.execute("DROP TABLE bench_writes")
        await conn.close()
        shutil.rmtree(script_dir, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    return {"tps_runs": results, "tps_median": med,
            "ratio_capture_on_vs_off": med["capture_on"] / med["capture_off"],
            "ratio_notify_per_row_vs_off": med["notify_per_row"] / med["capture_off"] if "notify_per_row" in med else None,
            "change_log_rows_per_capture_run": logged,
            "capture_install_ms": install_ms}


# --- CPU accounting ----------------------------------------------------------------------------
def _cpu(p: psutil.Process, children: bool = False) -> float:
    t = p.cpu_times()
    return t.user + t.system + ((t.children_user + t.children_system) if children else 0.0)


class CpuMeter:
    """CPU seconds used by the node, PostgreSQL (the postmaster, its live backends and those it
    reaped) and the harness (this process: the writers; the client processes), and by the
    whole machine, so a step can say which process saturates and how busy the others were."""

    def __init__(self, node_pid: int | None, pg_pid: int, client_pids: list[int]) -> None:
        self.node = psutil.Process(node_pid) if node_pid else None
        self.pg = psutil.Process(pg_pid)
        self.me = psutil.Process()
        self.clients = [psutil.Process(p) for p in client_pids]

    def sample(self) -> dict:
        pg = _cpu(self.pg, children=True)
        for c in self.pg.children():
            with contextlib.suppress(psutil.NoSuchProcess):
                pg += _cpu(c)
        m = psutil.cpu_times()
        return {"t": time.perf_counter(), "node": _cpu(self.node) if self.node else 0.0, "postgres": pg,
                "writer": _cpu(self.me), "clients": [_cpu(c) for c in self.clients],
                "machine_busy": sum(m) - m.idle - m.iowait}

    @staticmethod
    def report(a: dict, during: dict, b: dict, writes: int, pushes: int, reruns: int | None) -> dict:
        """Percent of one core over the write window (a -> during); CPU per operation over the
        whole step (a -> b: the backlog worked off after the writes stopped is part of it)."""
        wall = during["t"] - a["t"]
        pct = lambda x: round(100 * x / wall, 1)  # noqa: E731 - percent of one core
        d = lambda k, s=during: s[k] - a[k]  # noqa: E731
        clients = [y - x for x, y in zip(a["clients"], during["clients"])]
        ours = d("node") + d("postgres") + d("writer") + sum(clients)
        busy = d("machine_busy")
        out = {"node_pct": pct(d("node")), "postgres_pct": pct(d("postgres")), "writer_pct": pct(d("writer")),
               "client_procs_pct": [pct(c) for c in clients], "machine_busy_pct": pct(busy),
               "others_pct": pct(max(0.0, busy - ours)), "cores": os.cpu_count(),
               "load_average": os.getloadavg()[0]}
        node, pg, writer = d("node", b), d("postgres", b), d("writer", b)
        clients = [y - x for x, y in zip(a["clients"], b["clients"])]
        us = lambda x, n: round(x * 1e6 / n, 1) if n else None  # noqa: E731
        out["node_us_per_write"] = us(node, writes)
        out["node_us_per_push"] = us(node, pushes)
        out["node_us_per_rerun"] = us(node, reruns) if reruns else None
        out["postgres_us_per_write"] = us(pg, writes)
        out["writer_us_per_write"] = us(writer, writes)
        out["clients_us_per_push"] = us(sum(clients), pushes)
        # the single process nearest a full core (PostgreSQL is many processes: share of the machine)
        single = {"node": out["node_pct"], "writer": out["writer_pct"],
                  **{f"clients{i}": p for i, p in enumerate(out["client_procs_pct"])}}
        name = max(single, key=single.get)
        out["busiest_process"] = name
        out["busiest_pct"] = single[name]
        return out


# --- clients and writers ----------------------------------------------------------------------
class ClientProcs:
    """Benchmark clients spread over ``n`` processes (``clients.py``), so the harness is not
    the process that saturates."""

    def __init__(self, url: str, n: int) -> None:
        self.url, self.n = url, n
        self.procs: list[asyncio.subprocess.Process] = []
        self.stalls: list[list[list[float]]] = []  # per process, its loop stalls of the last report
        #: result hash -> clients holding it as their newest result, at the last report
        self.last_hashes: dict[str | None, int] = {}

    async def __aenter__(self) -> "ClientProcs":
        for _ in range(self.n):
            self.procs.append(await asyncio.create_subprocess_exec(
                sys.executable, str(HERE / "clients.py"), self.url, stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                # a session each (autogroup scheduling: one CPU share per session): the clients stand for
                # users' own machines, not one group squeezed beside the writer on a busy machine
                start_new_session=True))
        return self

    async def __aexit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._all({"cmd": "close"}), 30)
        for p in self.procs:
            if p.returncode is None:
                p.kill()
            await p.wait()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    async def _one(self, p: asyncio.subprocess.Process, cmd: dict) -> dict:
        p.stdin.write((json.dumps(cmd) + "\n").encode())
        await p.stdin.drain()
        line = await p.stdout.readline()
        if not line:
            raise RuntimeError(f"client process {p.pid} exited ({await p.wait()})")
        answer = json.loads(line)
        if not answer.get("ok"):
            raise RuntimeError(f"client process {p.pid}: {answer.get('error')}")
        return answer

    async def _all(self, cmd: dict) -> list[dict]:
        return await asyncio.gather(*(self._one(p, cmd) for p in self.procs))

    async def open(self, count: int, function: str | None, topics: int | None = None, topic: int | None = None,
                   dense: bool = False) -> None:
        share = [count // self.n + (1 if i < count % self.n else 0) for i in range(self.n)]
        first = [sum(share[:i]) for i in range(self.n)]
        await asyncio.gather(*(self._one(p, {"cmd": "open", "count": share[i], "first": first[i], "function": function,
                                             "topics": topics, "topic": topic, "dense": dense})
                               for i, p in enumerate(self.procs)))

    async def reset(self) -> None:
        await self._all({"cmd": "reset"})

    async def current_hash(self, function: str, args: dict) -> str:
        """The hash of the server's current result of ``function(args)`` (one more client subscribes)."""
        return (await self._one(self.procs[0], {"cmd": "final", "function": function, "args": args}))["hash"]

    async def report(self) -> tuple[list[tuple[int, float, int, float]], int]:
        """Every (row id, kernel receive time, client process, read time) delivery, and the number of pushes, since the
        last reset (each process's loop stalls in ``self.stalls``)."""
        deliveries, pushes = [], 0
        self.stalls = []
        self.last_hashes = {}
        with tempfile.TemporaryDirectory() as tmp:
            for i, p in enumerate(self.procs):
                path = Path(tmp) / f"c{i}"
                ans = await self._one(p, {"cmd": "report", "path": str(path)})
                n = ans["deliveries"]
                ids, times, read_times = array.array("q"), array.array("d"), array.array("d")
                with open(path, "rb") as fh:
                    ids.fromfile(fh, n)
                    times.fromfile(fh, n)
                    read_times.fromfile(fh, n)
                deliveries.extend(zip(ids, times, itertools.repeat(i), read_times))
                pushes += ans["pushes"]
                self.stalls.append(ans.get("stalls", []))
                for h, n_clients in ans.get("last_hashes", {}).items():
                    self.last_hashes[h] = self.last_hashes.get(h, 0) + n_clients
                if ans["error_count"] or ans["closed"]:
                    print(f"  client process {i}: {ans['error_count']} errors, {ans['closed']} sockets closed; "
                          f"{ans['errors']}", flush=True)
        return deliveries, pushes


async def write_load(conns: list[asyncpg.Connection], rate: float, seconds: float, topic_of,
                     pg_clock: dict[int, float] | None = None) -> dict[int, float]:
    """Single-row INSERTs at ``rate`` per second over ``conns`` (``pg_clock``: also each row's
    PostgreSQL time at the end of its INSERT). The writer's own connections,
    not a pool: asyncpg's pool resets a connection when it is released (``RESET ALL`` and more,
    one round trip per write, a third of the writer's round trips with nothing to reset) - an
    app writing through a pool that skips it, or with a connection of its own, does not pay it."""
    commits: dict[int, float] = {}
    idle: asyncio.Queue[asyncpg.Connection] = asyncio.Queue()
    for conn in conns:
        idle.put_nowait(conn)
    tasks = []

    async def one(topic: int) -> None:
        conn = await idle.get()
        try:
            rid, ended = await conn.fetchrow(
                "INSERT INTO bench_items (topic, payload) VALUES ($1, 'payload') "
                "RETURNING id, extract(epoch FROM clock_timestamp())::float8", topic)
        finally:
            idle.put_nowait(conn)
        commits[rid] = now = time.perf_counter()
        if pg_clock is not None:
            # PostgreSQL's clock as the INSERT ended (before its commit), on this process's clock:
            # not delayed by this process's own waits for a core, as the commit stamp above is
            pg_clock[rid] = now - max(0.0, time.time() - ended)

    start = time.perf_counter()
    i = 0
    while True:
        target = start + i / rate
        now = time.perf_counter()
        if now - start >= seconds:
            break
        if target > now:
            await asyncio.sleep(target - now)
        tasks.append(asyncio.create_task(one(topic_of(i))))
        i += 1
    await asyncio.gather(*tasks)
    return commits


def latency_report(deliveries: list[tuple[int, float]], pushes: int, commits: dict[int, float], expected: int,
                   seconds: float, pg_clock: dict[int, float] | None = None) -> dict:
    lat = [(t - commits[rid]) * 1000 for rid, t, *_ in deliveries if rid in commits]
    # the same, to when the client process read it (what this benchmark measured until 2026-12-07)
    read = [(d[3] - commits[d[0]]) * 1000 for d in deliveries if d[0] in commits and len(d) > 3]
    # from PostgreSQL's clock at the end of the INSERT: a little before the commit (reads high by the
    # commit's duration), but not late when the writer waited for a core (the commit stamp then reads low)
    pg = [(t - pg_clock[rid]) * 1000 for rid, t, *_ in deliveries if rid in pg_clock] if pg_clock else []
    return {"writes": len(commits), "expected_deliveries": expected, "delivered": len(lat),
            # a row recorded before its commit time: only possible for a row counted as pushed out of a
            # result (clients.py ``dense``) that in fact had not committed yet when the result was read
            "before_commit": sum(1 for v in lat if v < 0),
            "delivered_fraction": len(lat) / expected if expected else float("nan"),
            "p50_ms": pct(lat, 50), "p90_ms": pct(lat, 90), "p99_ms": pct(lat, 99), "max_ms": max(lat, default=float("nan")),
            "pushes": pushes, "pushes_per_s": pushes / seconds,
            "read_p50_ms": pct(read, 50), "read_p99_ms": pct(read, 99),
            "pg_clock_p50_ms": pct(pg, 50), "pg_clock_p99_ms": pct(pg, 99)}


def tail_report(deliveries: list[tuple[int, float, int]], commits: dict[int, float], t0: float,
                stalls_of: dict[str, list[list[float]]], worst: int = 8) -> dict:
    """Where the slowest deliveries (the p99 tail) lost their time: for each process, the share of
    tail deliveries whose commit-to-receive window overlaps one of its event-loop stalls over 50 ms
    (``stalls_of``: name -> [end, late ms, cpu ms, runq ms, ...]; ``clientsN`` counts only for the
    deliveries of client process N), how bunched the tail is in time (the number of distinct 100 ms
    slots its commits fall in: a stall makes a few slots, a steady overload many), and the ``worst``
    slowest deliveries with the stalls they overlap (``at_s``: commit, seconds into the step)."""
    lat = sorted(((t - commits[rid]) * 1000, commits[rid], t, proc) for rid, t, proc, *_ in deliveries if rid in commits)
    if not lat:
        return {}
    cut = lat[min(len(lat) - 1, int(len(lat) * 0.99))][0]
    tail = [x for x in lat if x[0] >= cut]
    big = {name: [(end - late / 1000, end, late, cpu, runq) for end, late, cpu, runq, *_ in ss if late > 50]
           for name, ss in stalls_of.items()}

    def overlapping(commit: float, recv: float, proc: int) -> list[str]:
        found = []
        for name, ss in big.items():
            if name.startswith("clients") and name != f"clients{proc}":
                continue
            found += [f"{name} {late:.0f} ms (cpu {cpu:.0f}, runq {runq:.0f}) at {start - t0:.2f}s"
                      for start, end, late, cpu, runq in ss if start < recv and end > commit]
        return found

    share = {name: round(sum(1 for _, c, r, p in tail if any(
        s < r and e > c for s, e, *_ in ss) and (not name.startswith("clients") or name == f"clients{p}")) / len(tail), 3)
        for name, ss in big.items()}
    return {"p99_cut_ms": round(cut, 1), "tail": len(tail), "tail_slots_100ms": len({int((c - t0) * 10) for _, c, _, _ in tail}),
            "tail_overlapping_stall_over_50ms": share,
            "worst": [{"ms": round(ms, 1), "at_s": round(c - t0, 3), "client_proc": p, "stalls": overlapping(c, r, p)}
                      for ms, c, r, p in lat[-worst:][::-1]]}


async def quiet(stats, settle: float = 0.5, timeout: float = 30.0) -> None:
    """Wait until the server stops re-running (the previous step's backlog is gone)."""
    deadline = time.monotonic() + timeout
    work = lambda s: (s["runs"], s["pushes"], s["changes"])  # noqa: E731 - not the GC and loop-stall records
    last = work(await stats())
    while time.monotonic() < deadline:
        await asyncio.sleep(settle)
        now = work(await stats())
        if now == last:
            return
        last = now


@attrs.define
class Target:
    """What one measurement watches: a server (its CPU, its stats) and the clients subscribed to it."""

    name: str
    clients: ClientProcs
    meter: CpuMeter
    stats: Any = None  # async () -> the node's bench_stats (None: the naive peer)


async def measure_step(targets: list[Target], db_url: str, rate: float, seconds: float, topic_of, per_write: float,
                       grace: float = 5.0, profile_to=None, statements: bool = False,
                       final_of: tuple[str, dict] | None = None) -> dict[str, dict]:
    """One write rate, seen by every target at once: writes for ``seconds``, then ``grace`` for the
    last deliveries; latency from each write's commit to each subscriber that receives it, CPU of
    every process. ``profile_to(name)``: where to write a py-spy profile of that target's server.
    ``final_of``: the (function, args) every client is subscribed to (bench (c)): once the server is
    quiet, each client's newest result is compared with the server's final one (``final_result``)."""
    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=1)  # the harness's own questions
    writers = [await asyncpg.connect(db_url) for _ in range(16)]
    try:
        if statements:
            await pool.execute("SELECT pg_stat_statements_reset()")
        for t in targets:
            if t.stats is not None:
                await quiet(t.stats)
            await t.clients.reset()
        before = {t.name: await t.stats() if t.stats is not None else None for t in targets}
        spies = [profile(profile_to(t.name), t.meter.node.pid, seconds) for t in targets if profile_to and t.meter.node]
        a = {t.name: t.meter.sample() for t in targets}
        watch = stalls.LoopWatch()  # the writer's own loop: a late commit stamp reads as less latency
        watch.start()
        t0 = time.perf_counter()
        pg_clock: dict[int, float] = {}
        commits = await write_load(writers, rate, seconds, topic_of, pg_clock)
        during = {t.name: t.meter.sample() for t in targets}  # the write window: how busy each process was
        await asyncio.sleep(grace)  # let the last writes arrive (or show that they do not)
        b = {t.name: t.meter.sample() for t in targets}  # and what the whole step cost, backlog included
        for spy in spies:
            await asyncio.to_thread(spy.wait)
        watch.stop()
        after = {t.name: await t.stats() if t.stats is not None else None for t in targets}
        final_hash: dict[str, str] = {}
        if final_of is not None:
            for t in targets:
                if t.stats is not None:
                    await quiet(t.stats)  # every push of the last result sent
                    final_hash[t.name] = await t.clients.current_hash(*final_of)
        if statements:
            top = await pool.fetch(_TOP_STATEMENTS)
    finally:
        await pool.close()
        for conn in writers:
            await conn.close()
    reports = {}
    writer_stalls = watch.since(t0)
    for t in targets:
        deliveries, pushes = await t.clients.report()
        rep = latency_report(deliveries, pushes, commits, int(len(commits) * per_write), seconds, pg_clock)
        if t.name in final_hash:
            # delivery judged by the end state: every client's newest result is the server's final one
            # (the row counts above rebuild skipped rows from a five-row result, which can undercount)
            clients = sum(t.clients.last_hashes.values())
            holding = t.clients.last_hashes.get(final_hash[t.name], 0)
            rep["final_result"] = {"clients": clients, "holding_final": holding,
                                   "fraction": holding / clients if clients else float("nan")}
        stalls_of = {"writer": writer_stalls, **{f"clients{i}": ss for i, ss in enumerate(t.clients.stalls)}}
        rep["harness_loop_stalls"] = {name: stalls.summary(ss) for name, ss in stalls_of.items()}
        reruns = None
        if t.stats is not None:
            reruns = after[t.name]["runs"] - before[t.name]["runs"]
            rep["reruns_per_write"] = reruns / max(1, rep["writes"])
            # round trips to the change log and re-runs sent together, per write (None: a build without them)
            for key in ("polls", "hints", "batches", "batched_runs"):
                if after[t.name].get(key) is not None and before[t.name].get(key) is not None:
                    rep[f"{key}_per_write"] = (after[t.name][key] - before[t.name][key]) / max(1, rep["writes"])
            rep["node_pushes_per_s"] = (after[t.name]["pushes"] - before[t.name]["pushes"]) / seconds
            n = after[t.name]["gc_count"] - before[t.name]["gc_count"]
            pauses = after[t.name].pop("gc_pauses")
            pauses = pauses[-n:] if n > 0 else []
            rep["node_gc"] = {"collections": n, "full": sum(g == 2 for g, *_ in pauses),
                              "max_ms": max((p for _, p, *_ in pauses), default=0.0),
                              "total_ms": round(sum(p for _, p, *_ in pauses), 1), "pauses": pauses}
            node_stalls = [x for x in after[t.name].pop("stalls") if x[0] >= t0]
            rep["node_loop_stalls"] = stalls.summary(node_stalls)
            rep["node_stats_after"] = after[t.name]
            stalls_of["node"] = node_stalls
            # a GC pass as a stall of its own: [end, ms, ms on CPU (a pass computes), 0]
            stalls_of["node_gc"] = [[end, ms, ms, 0.0] for _, ms, end in pauses]
        rep["tail"] = tail_report(deliveries, commits, t0, stalls_of)
        rep["cpu"] = CpuMeter.report(a[t.name], during[t.name], b[t.name], rep["writes"], pushes, reruns)
        if t.stats is not None and after[t.name].get("fanout_cpu_ns") is not None:
            # the node's CPU split: writing chunked fan-outs (per push) and everything else (per write)
            fan_us = (after[t.name]["fanout_cpu_ns"] - before[t.name]["fanout_cpu_ns"]) / 1000
            node_pushes = after[t.name]["pushes"] - before[t.name]["pushes"]
            rep["cpu"]["node_fanout_us_per_push"] = round(fan_us / max(1, node_pushes), 2)
            rep["cpu"]["node_other_us_per_write"] = round(rep["cpu"]["node_us_per_write"]
                                                          - fan_us / max(1, rep["writes"]), 1)
        if t.stats is not None and after[t.name].get("fanout_passes") is not None:
            # where a hot query's latency goes: its fan-out passes, the idle time between them and
            # what a run started by a pass took to reach the fan-out (means over the step, ms)
            d = {k: after[t.name][k] - before[t.name][k]
                 for k in ("fanout_passes", "fanout_wall_ns", "fanout_idle_ns", "rerun_lags", "rerun_lag_ns")}
            passes = max(1, d["fanout_passes"])
            rep["fanout_timing"] = {"passes": d["fanout_passes"], "pass_ms": round(d["fanout_wall_ns"] / passes / 1e6, 2),
                                    "idle_ms_per_pass": round(d["fanout_idle_ns"] / passes / 1e6, 2),
                                    "rerun_lag_ms": round(d["rerun_lag_ns"] / max(1, d["rerun_lags"]) / 1e6, 2)}
        if len(targets) > 1:
            rep["cpu"]["side_by_side"] = [x.name for x in targets]  # PostgreSQL and the writer serve them all
        if statements:
            writes = max(1, rep["writes"])
            rep["pg_statements"] = [{"query": r["q"], "calls_per_write": round(r["calls"] / writes, 3),
                                     "us_per_write": round(r["ms"] * 1000 / writes, 1), "toplevel": r["toplevel"]}
                                    for r in top]
            for s in rep["pg_statements"][:8]:
                print(f"    pg {s['us_per_write']:7.1f} us/write {s['calls_per_write']:6.3f} calls/write "
                      f"{'' if s['toplevel'] else '(nested) '}{s['query']}", flush=True)
        reports[t.name] = rep
    return reports


#: PostgreSQL's execution time per statement (``--pg-statements``; planning and nested statements apart)
_TOP_STATEMENTS = """
SELECT left(regexp_replace(query, '\\s+', ' ', 'g'), 110) AS q, toplevel, sum(calls) AS calls,
       sum(total_exec_time + total_plan_time) AS ms
FROM pg_stat_statements GROUP BY 1, 2 ORDER BY ms DESC LIMIT 15
"""


def profile(path: Path, pid: int, seconds: float) -> subprocess.Popen:
    """py-spy on the node for the write window (collapsed stacks: ``bench/realtime/profile.py`` sums them).
    With FORGE_BENCH_PERF=1, ``perf record -g`` instead (kernel and C frames too: what a push's
    system call costs; ``perf report -i PATH.perf``)."""
    if os.environ.get("FORGE_BENCH_PERF") == "1":
        return subprocess.Popen(["perf", "record", "-g", "-F", "999", "-p", str(pid), "-o", f"{path}.perf", "--",
                                 "sleep", str(int(seconds))], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    spy = Path(sys.executable).parent / "py-spy"
    return subprocess.Popen([str(spy), "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "250",
                             "--format", "raw", "--nonblocking", "-o", str(path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def step_line(rep: dict) -> str:
    c = rep["cpu"]
    return (f"p50 {rep['p50_ms']:.2f} p90 {rep['p90_ms']:.2f} p99 {rep['p99_ms']:.2f} ms (read by the client: p50 "
            f"{rep.get('read_p50_ms', float('nan')):.2f} p99 {rep.get('read_p99_ms', float('nan')):.2f}; from PostgreSQL's clock: "
            f"p50 {rep.get('pg_clock_p50_ms', float('nan')):.2f} p99 {rep.get('pg_clock_p99_ms', float('nan')):.2f}), delivered "
            f"{rep['delivered_fraction']:.3f}"
            + (f" (final result held by {rep['final_result']['holding_final']}/{rep['final_result']['clients']} clients)"
               if "final_result" in rep else "")
            + f", {rep['pushes_per_s']:.0f} pushes/s, re-runs/write "
            f"{rep.get('reruns_per_write', float('nan')):.2f} (polls {rep.get('polls_per_write', float('nan')):.2f}, hints "
            f"{rep.get('hints_per_write', float('nan')):.2f}, batched {rep.get('batched_runs_per_write', float('nan')):.2f}) | CPU % node {c['node_pct']} postgres {c['postgres_pct']} "
            f"writer {c['writer_pct']} clients {c['client_procs_pct']} others {c['others_pct']} "
            f"(load {c['load_average']:.1f}) | node us/push {c['node_us_per_push']} us/write {c['node_us_per_write']}"
            + (f" (fan-out {c['node_fanout_us_per_push']} us/push, the rest {c['node_other_us_per_write']} us/write)"
               if "node_fanout_us_per_push" in c else "")
            + f", busiest {c['busiest_process']} {c['busiest_pct']}%"
            + (f" | fan-out: {rep['fanout_timing']['passes']} passes of {rep['fanout_timing']['pass_ms']} ms, idle "
               f"{rep['fanout_timing']['idle_ms_per_pass']} ms after each, runs {rep['fanout_timing']['rerun_lag_ms']} ms "
               f"from start to fan-out" if "fanout_timing" in rep else "")
            + (f" | node GC: {rep['node_gc']['collections']} collections ({rep['node_gc']['full']} full), longest "
               f"{rep['node_gc']['max_ms']:.1f} ms; loop stalls > 20 ms: {rep['node_loop_stalls']['over_20ms']}, "
               f"longest {rep['node_loop_stalls']['longest_ms']:.0f} ms" if "node_gc" in rep else "")
            + "".join(f"\n      stalls > 50 ms of {name}: {v['over_50ms_late_ms']:.0f} ms late in all, {v['over_50ms_cpu_ms']:.0f} on "
                      f"CPU, {v['over_50ms_runq_ms']:.0f} waiting for a core (longest {v['longest_ms']:.0f} ms)"
                      for name, v in {"node": rep.get("node_loop_stalls", {}), **rep.get("harness_loop_stalls", {})}.items()
                      if v.get("over_50ms_late_ms"))
            + (f"\n      p99 tail ({rep['tail']['tail']} deliveries >= {rep['tail']['p99_cut_ms']} ms, commits in "
               f"{rep['tail']['tail_slots_100ms']} slots of 100 ms) overlapping a stall > 50 ms: "
               f"{rep['tail']['tail_overlapping_stall_over_50ms']}; worst: {rep['tail']['worst'][:2]}" if rep.get("tail") else ""))


# --- the node ------------------------------------------------------------------------------------
async def node_port(db_url: str, node_id: str) -> int:
    conn = await asyncpg.connect(db_url)
    try:
        for _ in range(600):
            try:
                ports = await conn.fetchval("SELECT ports FROM forge_nodes WHERE id = $1 AND status = 'running'", node_id)
            except asyncpg.UndefinedTableError:  # migrations not applied yet
                ports = None
            ports = json.loads(ports) if isinstance(ports, str) else ports
            if ports and "http" in ports:
                return int(ports["http"])
            await asyncio.sleep(0.05)
    finally:
        await conn.close()
    raise RuntimeError("node did not publish its port")


PACKAGE_DIRS = ("", "forge-gateway", "forge-realtime", "forge-worker", "forge-scheduler", "forge-observe",
                "plugins/forge-codegen")


def start_node(workdir: Path, db_url: str, tree: Path | None = None, extra: dict | None = None,
               node_id: str = "bench") -> NodeProcess:
    """A real forge-node (gateway + realtime) serving bench_app; ``tree``: run the code of another
    checkout (its packages go first on PYTHONPATH) for an A/B comparison in one run."""
    cfg = {"node": {"id": node_id, "roles": ["gateway", "function", "realtime"]},
           "database": {"url": db_url, "pool_min": 4, "pool_max": 30},
           "app": {"modules": ["bench_app"], "example": False},
           "log": {"level": "WARNING"},
           "gateway": {"port": 0},
           # max_concurrent_runs: the node's default (8); 16 had a worse p99 at 1,000-2,000 writes/s on
           # 2 vCPUs (results-2026-12-06-runs.json): 16 woken backends compete with the node for a core
           "realtime": {"max_subscriptions": 100, "subscribe_rate": 100.0}}
    for section, values in (extra or {}).items():
        cfg.setdefault(section, {}).update(values)
    paths = [str(tree / d) for d in PACKAGE_DIRS if (tree / d).is_dir()] if tree else []
    env = {"PYTHONPATH": os.pathsep.join([*paths, str(HERE), os.environ.get("PYTHONPATH", "")])}
    p = NodeProcess(workdir, cfg, env=env)
    p.start()
    # "ready in" is logged at INFO; with WARNING logs we wait for the published port instead
    return p


async def node_gc(port: int, times: int = 3, timed: bool = False) -> list[dict]:
    """Time the node's full cyclic-GC collection (``[node] gc_collect_interval`` runs one a minute)
    with the step's sockets open: ``times`` collections, a second apart. ``timed``: the pass the
    node's timer runs (since 2026-12-07 it walks only what survived no earlier timed pass, unless
    the heap grew enough for a full rescan); otherwise one that walks everything. A diagnostic: a
    call the node does not answer in time (a 504 from its gateway when it is starved for a core)
    ends the list early with a warning instead of the run."""
    out = []
    async with httpx.AsyncClient(timeout=60) as http:
        for _ in range(times):
            try:
                r = await http.post(f"http://127.0.0.1:{port}/rpc/bench_gc", json={"timed": timed})
                r.raise_for_status()
            except httpx.HTTPError as exc:
                print(f"  bench_gc failed, GC timing skipped: {exc!r} (load {os.getloadavg()[0]:.1f})", flush=True)
                break
            out.append(r.json()["data"])
            await asyncio.sleep(1.0)
    return out


def set_sched_slice(pid: int, ns: int) -> None:
    """The EEVDF slice (``sched_setattr``'s ``sched_runtime`` for a SCHED_OTHER task, Linux 6.12+) of
    ``pid``'s main thread (the node's event loop): a shorter slice than the default (about 1.4 ms
    here) is picked sooner when it wakes, and preempts a longer-slice task (a CPU burner)."""
    import ctypes
    import struct

    libc = ctypes.CDLL(None, use_errno=True)
    sys_setattr = {"x86_64": 314, "aarch64": 274}[os.uname().machine]
    nice = os.getpriority(os.PRIO_PROCESS, pid)
    attr = ctypes.create_string_buffer(struct.pack("IIQiIQQQ", 48, 0, 0, nice, 0, ns, 0, 0), 56)
    if libc.syscall(sys_setattr, pid, attr, 0):
        err = ctypes.get_errno()
        raise OSError(err, f"sched_setattr({pid}, slice {ns} ns): {os.strerror(err)}")


async def node_stats(port: int) -> dict:
    async with httpx.AsyncClient() as http:
        r = await http.post(f"http://127.0.0.1:{port}/rpc/bench_stats", json={})
        r.raise_for_status()
        return r.json()["data"]


def burners(n: int, own_session: bool = False) -> list[subprocess.Popen]:
    """``n`` processes spinning on a core each: (a) under competing CPU load. ``own_session``: each
    in a session of its own, as other users' work is. With the kernel's autogroup scheduling
    (``/proc/sys/kernel/sched_autogroup_enabled``) each session shares the CPU as one group: burners
    in this process's session take their CPU from the writer and the client processes alone (each
    PostgreSQL backend, and the node, run in a session of their own)."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=own_session)
            for _ in range(n)]


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
        p.wait()


def median_report(reports: list[dict]) -> dict:
    """Per-field medians over rounds (numbers only; the rounds themselves are kept beside it)."""
    out: dict = {}
    for key, value in reports[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            vals = [r[key] for r in reports if isinstance(r.get(key), (int, float))]
            out[key] = statistics.median(vals) if vals else None
        elif isinstance(value, dict):
            out[key] = median_report([r[key] for r in reports])
    return out


# --- main ----------------------------------------------------------------------------------------
async def started_node(root: Path, db_url: str, name: str, tree: Path | None, args: argparse.Namespace,
                       rnd: int) -> tuple[NodeProcess, int]:
    config = {section: dict(values) for section, values in args.node_config.items()}
    for section, values in args.variant_config.get(name, {}).items():
        config.setdefault(section, {}).update(values)
    node = start_node(root / f"node-{name}-{rnd}", db_url, tree, config, node_id=f"bench-{name}")
    if name in args.node_slice_us:
        set_sched_slice(node.pid, args.node_slice_us[name] * 1000)
    if args.node_nice is not None:
        # the node runs in a session of its own: with autogroup scheduling its session's nice value sets
        # its share of the CPU against every other session (each burner, each PostgreSQL backend)
        Path(f"/proc/{node.pid}/autogroup").write_text(str(args.node_nice))
    port = await node_port(db_url, f"bench-{name}")
    print(f"[{name} round {rnd}] node pid {node.pid} serving ws://127.0.0.1:{port}/ws", flush=True)
    return node, port


async def run_forge(args: argparse.Namespace, parts: set[str], root: Path, db_url: str, pg_pid: int,
                    variants: list[tuple[str, Path | None]], out: dict, rnd: int) -> None:
    """One round of (d), (b) and (c) against the node builds in ``variants``, all running at once
    and seeing the same writes (side by side: the same machine load for each)."""
    nodes: list[tuple[str, NodeProcess, int]] = []
    try:
        for name, tree in variants:
            node, port = await started_node(root, db_url, name, tree, args, rnd)
            nodes.append((name, node, port))

        if "d" in parts and rnd == 0:
            from clients import ClientSet

            for name, node, port in nodes:
                proc = psutil.Process(node.pid)
                print(f"(d) [{name}] memory per idle connection ({args.idle} connections)", flush=True)
                warm = ClientSet()
                await warm.open(f"ws://127.0.0.1:{port}/ws", 200, lambda i: None)  # warm up allocator and code paths
                await warm.close()
                await asyncio.sleep(2.0)
                rss0 = proc.memory_info().rss
                idle = ClientSet()
                await idle.open(f"ws://127.0.0.1:{port}/ws", args.idle, lambda i: None)
                await asyncio.sleep(2.0)
                rss1 = proc.memory_info().rss
                out.setdefault("d_idle_memory", {})[name] = {
                    "connections": args.idle, "rss_before_mb": rss0 / 2**20, "rss_after_mb": rss1 / 2**20,
                    "bytes_per_connection": (rss1 - rss0) / args.idle}
                print(f"  {out['d_idle_memory'][name]}", flush=True)
                await idle.close()

        async def targets(stack: contextlib.AsyncExitStack, count: int, **sub) -> list[Target]:
            found = []
            for name, node, port in nodes:
                clients = await stack.enter_async_context(ClientProcs(f"ws://127.0.0.1:{port}/ws", args.client_procs))
                await clients.open(count, "topic_latest", **sub)
                found.append(Target(name, clients, CpuMeter(node.pid, pg_pid, clients.pids),
                                    (lambda p: lambda: node_stats(p))(port)))
            return found

        if "b" in parts:
            async with contextlib.AsyncExitStack() as stack:
                ts = await targets(stack, args.b_clients, topics=args.b_topics)
                await asyncio.sleep(1.0)
                # The heap grew with the clients' connections: the node's timed full collection
                # ([node] gc_collect_growth) runs once, a minute after start, in whichever step is on
                # then (the 2,000 writes/s one: 46-50 ms, the only collection of rt-knee's sweeps).
                # Run and time it here, as (c) does, so the steps measure the steady state.
                for name, node, port in nodes:
                    gcs = await node_gc(port, times=1)
                    out.setdefault("b_gc", {}).setdefault(name, []).append(gcs)
                    if gcs:
                        print(f"(b) [{name}] full GC with {args.b_clients} sockets before the steps: pause "
                              f"{gcs[0]['pause_ms']:.1f} ms, {gcs[0]['tracked']} objects tracked (load {os.getloadavg()[0]:.1f})",
                              flush=True)
                for rate in args.b_rates:
                    reps = await measure_step(ts, db_url, rate, args.seconds, lambda i: i % args.b_topics,
                                              args.b_clients / args.b_topics,
                                              profile_to=args.profile and (lambda n: args.profile / f"b-{n}-{rnd}-{rate:g}.txt"),
                                              statements=args.pg_statements)
                    for name, rep in reps.items():
                        out.setdefault("b_forge", {}).setdefault(name, {}).setdefault(f"{rate:g}", []).append(rep)
                        print(f"(b) [{name}] {args.b_clients} clients / {args.b_topics} queries / {rate:g} writes/s: "
                              f"{step_line(rep)}", flush=True)
                # the node's timed collection as its timer would run it now, after the steps' allocations
                # (what the 2,000 writes/s step of session 7 overlapped: a full pass, 74 ms quiet)
                for name, node, port in nodes:
                    gcs = await node_gc(port, times=2, timed=True)
                    out.setdefault("b_gc_timed", {}).setdefault(name, []).append(gcs)
                    if gcs:
                        print(f"(b) [{name}] the timer's GC pass after the steps: pause "
                              f"{', '.join('%.1f' % g['pause_ms'] for g in gcs)} ms (CPU "
                              f"{', '.join('%.1f' % g['cpu_ms'] for g in gcs)} ms), walked {gcs[0]['tracked']} objects "
                              f"({gcs[0]['frozen']} frozen) (load {os.getloadavg()[0]:.1f})", flush=True)

        if "c" in parts:
            async with contextlib.AsyncExitStack() as stack:
                ts = await targets(stack, args.c_clients, topic=1000, dense=True)
                await asyncio.sleep(1.0)
                for name, node, port in nodes:
                    gcs = await node_gc(port)
                    out.setdefault("c_gc", {}).setdefault(name, []).append(gcs)
                    if gcs:
                        print(f"(c) [{name}] full GC with {args.c_clients} sockets: pause "
                              f"{', '.join('%.1f' % g['pause_ms'] for g in gcs)} ms (CPU "
                              f"{', '.join('%.1f' % g['cpu_ms'] for g in gcs)} ms), generations {gcs[0]['generations']}, {gcs[-1]['tracked']} objects tracked "
                              f"({gcs[-1]['frozen']} frozen); most: {gcs[-1]['top_types'][:6]}, held by {gcs[-1]['held_by']} (load {os.getloadavg()[0]:.1f})",
                              flush=True)
                reps = await measure_step(ts, db_url, args.c_rate, args.seconds, lambda i: 1000, args.c_clients,
                                          profile_to=args.profile and (lambda n: args.profile / f"c-{n}-{rnd}.txt"),
                                          final_of=("topic_latest", {"topic": 1000}))
                for name, rep in reps.items():
                    out.setdefault("c_forge_fanout", {}).setdefault(name, []).append(rep)
                    print(f"(c) [{name}] {args.c_clients} clients on one query at {args.c_rate:g} writes/s: "
                          f"{step_line(rep)}", flush=True)
    finally:
        for _, node, _ in nodes:
            node.terminate(30)


async def main(args: argparse.Namespace) -> dict:
    parts = set(args.only.split(","))
    root = Path(tempfile.mkdtemp(prefix="rtbench-"))
    # stock settings (fsync and synchronous_commit on); --pg-statements adds pg_stat_statements (it costs a little CPU)
    pg = EmbeddedPostgres(root, settings={"shared_preload_libraries": "pg_stat_statements",
                                          "pg_stat_statements.track": "all"} if args.pg_statements else {})
    admin_url = await asyncio.to_thread(pg.start)
    out: dict = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    naive = None
    spinning: list[subprocess.Popen] = []
    try:
        pg_pid = pg._running_pid()
        admin = await asyncpg.connect(admin_url)
        await admin.execute("CREATE DATABASE forge_bench")
        if args.pg_statements:
            conn = await asyncpg.connect(with_db(admin_url, "forge_bench"))
            await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            await conn.close()
        out["postgres"] = {k: await admin.fetchval(f"SHOW {k}") for k in (
            "server_version", "fsync", "synchronous_commit", "full_page_writes", "wal_level", "shared_buffers",
            "max_connections", "max_wal_size", "checkpoint_timeout", "work_mem")}
        await admin.close()
        db_url = with_db(admin_url, "forge_bench")
        out["machine"] = {"cpus": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
                          "load_average_at_start": os.getloadavg()}
        print(f"PostgreSQL {out['postgres']}\nmachine {out['machine']}", flush=True)

        if "a" in parts:
            # the write path alone: no node runs yet (its reader would compete for the same 2 cores)
            conn = await dbmod.connect(db_url)
            await migrate(conn, from_package("forge_realtime.sql", namespace="realtime"))
            await conn.close()
            for n in args.a_burners:
                print(f"(a) write throughput, 32 writers, {n} CPU burners (no realtime node running)", flush=True)
                spinning = burners(n)
                try:
                    out.setdefault("a_write_throughput", {})[str(n)] = await bench_writes(
                        db_url, args.write_seconds, args.write_rounds, ("capture_off", "capture_on", "notify_per_row"))
                finally:
                    stop(spinning)
                print(f"  ratio capture on / off: {out['a_write_throughput'][str(n)]['ratio_capture_on_vs_off']:.3f} "
                      f"(load {os.getloadavg()[0]:.1f})", flush=True)

        # DIR "." is this checkout (a variant that differs only in --variant-config)
        variants = [("this", None)] + [(n, None if t == "." else Path(t)) for n, t in args.variant]
        spinning = burners(args.burners, own_session=True) if parts & {"b", "c", "d"} else []
        if spinning:
            print(f"{args.burners} CPU burners spinning through (b), (c) and (d), each in its own session", flush=True)
        if parts & {"b", "c", "d"}:
            for rnd in range(args.rounds):
                if args.side_by_side:
                    await run_forge(args, parts, root, db_url, pg_pid, variants, out, rnd)
                    continue
                for variant in (variants if rnd % 2 == 0 else variants[::-1]):  # ABBA: neither goes always first
                    await run_forge(args, parts, root, db_url, pg_pid, [variant], out, rnd)
            for key in ("b_forge",):
                for name, rates in out.get(key, {}).items():
                    out.setdefault("b_forge_median", {})[name] = {r: median_report(reps) for r, reps in rates.items()}
            for name, reps in out.get("c_forge_fanout", {}).items():
                out.setdefault("c_forge_median", {})[name] = median_report(reps)
        stop(spinning)

        if "a" in parts and "areader" in parts:
            node = start_node(root / "node-reader", db_url, node_id="bench-reader")
            try:
                await node_port(db_url, "bench-reader")
                print("(a') capture on while the realtime node reads the change log", flush=True)
                out["a_with_reader"] = await bench_writes(db_url, args.write_seconds, max(1, args.write_rounds - 1),
                                                          ("capture_off", "capture_on"))
            finally:
                node.terminate(30)

        if "naive" in parts:
            conn = await asyncpg.connect(db_url)
            await remove_capture(conn, "bench_items")  # the naive peer's writes pay only for its own trigger
            await conn.close()
            naive_port = free_port()
            naive = subprocess.Popen([sys.executable, str(HERE / "naive_peer.py"), db_url, str(naive_port)],
                                     stdout=subprocess.PIPE, text=True)
            assert "ready" in naive.stdout.readline()
            async with ClientProcs(f"ws://127.0.0.1:{naive_port}", args.client_procs) as clients:
                await clients.open(args.b_clients, "topic_latest", topics=args.b_topics)
                target = Target("naive", clients, CpuMeter(naive.pid, pg_pid, clients.pids))
                for rate in args.naive_rates:
                    rep = (await measure_step([target], db_url, rate, args.seconds, lambda i: i % args.b_topics,
                                              args.b_clients / args.b_topics))["naive"]
                    rep["reruns_per_write"] = float(args.b_clients)  # by construction: every subscription per NOTIFY
                    out.setdefault("b_naive", {})[f"{rate:g}"] = rep
                    print(f"(b) naive peer / {rate:g} writes/s: {step_line(rep)}", flush=True)
                    await asyncio.sleep(3.0)  # let the naive peer's backlog drain before the next rate
        ratios = {}
        for n, a in out.get("a_write_throughput", {}).items():
            ratios[f"a_capture_on_vs_off_burners{n}"] = a["ratio_capture_on_vs_off"]
            ratios[f"a_notify_per_row_vs_off_burners{n}"] = a["ratio_notify_per_row_vs_off"]
        if "a_with_reader" in out:
            ratios["a_capture_on_with_reader_vs_off"] = out["a_with_reader"]["ratio_capture_on_vs_off"]
        for name, rates in out.get("b_forge_median", {}).items():
            for rate, f in rates.items():
                ratios[f"b_{name}_{rate}_p99_ms"] = f["p99_ms"]
                n = out.get("b_naive", {}).get(rate)
                if n:
                    ratios[f"b_{name}_{rate}_p99_naive_vs_forge"] = n["p99_ms"] / f["p99_ms"]
        for name, c in out.get("c_forge_median", {}).items():
            ratios[f"c_{name}_pushes_per_s"] = c["node_pushes_per_s"]
            ratios[f"c_{name}_p99_ms"] = c["p99_ms"]
        out["ratios"] = ratios
        out["machine"]["load_average_at_end"] = os.getloadavg()
    finally:
        stop(spinning)
        if naive is not None:
            naive.terminate()
            naive.wait(10)
        await asyncio.to_thread(pg.release)
        shutil.rmtree(root, ignore_errors=True)
    return out


if __name__ == "__main__":
    exit_on_sigterm()  # a kill PID still stops the node, clients and PostgreSQL it started
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10.0, help="write duration of each (b) step and of (c)")
    ap.add_argument("--write-seconds", type=int, default=10, help="pgbench duration per mode in (a)")
    ap.add_argument("--write-rounds", type=int, default=5, help="rounds of the three modes in (a)")
    ap.add_argument("--a-burners", default="0,2", help="CPU burners during (a), one (a) per value")
    ap.add_argument("--b-clients", type=int, default=1000)
    ap.add_argument("--b-topics", type=int, default=100)
    ap.add_argument("--b-rates", default="100,300,1000,2000,3000", help="write rates of (b), comma-separated")
    ap.add_argument("--naive-rates", default="100,300,1000", help="write rates of (b) for the naive peer")
    ap.add_argument("--c-clients", type=int, default=5000)
    ap.add_argument("--c-rate", type=float, default=50.0)
    ap.add_argument("--idle", type=int, default=2000)
    ap.add_argument("--burners", type=int, default=0,
                    help="CPU burners spinning through (b), (c) and (d) (a slow day), each in its own session")
    ap.add_argument("--node-nice", type=int, default=None,
                    help="nice value of the node's autogroup (/proc/PID/autogroup): its CPU share on a busy machine")
    ap.add_argument("--node-slice-us", action="append", default=[],
                    type=lambda s: (s.split("=", 1)[0], int(s.split("=", 1)[1])),
                    help="NAME=US: the EEVDF slice of that variant's node ('this' or a --variant name), Linux 6.12+")
    ap.add_argument("--client-procs", type=int, default=2, help="processes the benchmark clients are spread over")
    ap.add_argument("--rounds", type=int, default=1, help="rounds of (b) and (c) (each variant once per round)")
    ap.add_argument("--variant", action="append", default=[], type=lambda s: tuple(s.split("=", 1)),
                    help="NAME=CHECKOUT: also run a node from another checkout, interleaved (A/B in one run)")
    ap.add_argument("--variant-config", action="append", default=[],
                    type=lambda s: (s.split("=", 1)[0], json.loads(s.split("=", 1)[1])),
                    help="NAME=JSON: extra node config of one variant ('this' or a --variant name)")
    ap.add_argument("--side-by-side", action="store_true",
                    help="run every variant's node at once on the same writes (same machine load for each)")
    ap.add_argument("--node-config", type=json.loads, default={}, help="extra node config, JSON {section: {key: value}}")
    ap.add_argument("--only", default="a,areader,b,c,d,naive", help="parts to run (a, areader, b, c, d, naive)")
    ap.add_argument("--profile", type=Path, default=None, help="folder for py-spy profiles of the node, one per step")
    ap.add_argument("--pg-statements", action="store_true",
                    help="load pg_stat_statements and print PostgreSQL's time per statement per (b) step")
    ap.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    ap.add_argument("--output", default=str(HERE / "last_run.json"))
    a = ap.parse_args()
    if a.quick:
        a.seconds, a.write_seconds, a.write_rounds = 3.0, 3, 1
        a.b_clients, a.b_topics, a.b_rates, a.naive_rates, a.c_clients, a.idle = 100, 10, "100,300", "100", 200, 200
    a.b_rates = [float(x) for x in str(a.b_rates).split(",")]
    a.naive_rates = [float(x) for x in str(a.naive_rates).split(",")]
    a.a_burners = [int(x) for x in str(a.a_burners).split(",")]
    a.variant_config = dict(a.variant_config)
    a.node_slice_us = dict(a.node_slice_us)
    if a.profile:
        a.profile.mkdir(parents=True, exist_ok=True)
    import uvloop  # clients and writers on the same loop as both servers: less harness CPU in the latencies

    result = uvloop.run(main(a))
    Path(a.output).write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps(result.get("ratios", {}), indent=2))
    print(f"results written to {a.output}")
