"""Chaos soak: three forge-node processes with every role on one embedded PostgreSQL, a mixed
load, a node SIGKILLed and restarted every ``--kill-every`` seconds, PostgreSQL restarted
``--pg-restarts`` times; at the end the guarantees are checked from the database and the clients.

    .venv/bin/python bench/soak/run.py                       # 30 minutes
    .venv/bin/python bench/soak/run.py --minutes 4 --json /tmp/soak.json

Not part of the test suite. Everything started here is stopped by its pid at the end (also on
Ctrl-C). See README.md for what is checked and the figures of the last run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import asyncpg
import attrs

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "mesh"), str(HERE.parent / "realtime")]

from httpclient import Pool  # noqa: E402  (bench/mesh: lean keep-alive HTTP client)
from wsclient import connect as ws_connect  # noqa: E402  (bench/realtime: lean WebSocket client)

from forge_kernel.db import with_database  # noqa: E402
from forge_kernel.embedded_pg import EmbeddedPostgres  # noqa: E402
from forge_kernel.testing.procs import exit_on_sigterm, NodeProcess, free_port  # noqa: E402

from soak_app import FLOW_STEPS, TOPICS  # noqa: E402

T0 = time.monotonic()


def now() -> float:
    """Seconds since the soak started (every event and error is stamped with it)."""
    return time.monotonic() - T0


def log(msg: str) -> None:
    print(f"[{now():7.1f}s] {msg}", flush=True)


# --- the cluster -----------------------------------------------------------------------------------
@attrs.define
class Slot:
    """One of the three nodes: a fixed id and port, restarted in place after each kill."""

    index: int
    node_id: str
    port: int
    workdir: Path
    db_url: str
    proc: NodeProcess | None = None
    incarnations: list[dict[str, Any]] = attrs.Factory(list)

    def start(self) -> None:
        cfg = {"node": {"id": self.node_id},
               "database": {"url": self.db_url},
               "app": {"modules": ["soak_app"], "example": False},
               "gateway": {"port": self.port}}
        self.proc = NodeProcess(self.workdir, cfg, env={"PYTHONPATH": str(HERE)})
        self.proc.start()
        self.incarnations.append({"pid": self.proc.pid, "started": round(now(), 1), "ready": None,
                                  "ended": None, "rss_mb": []})

    def wait_ready(self) -> None:
        self.proc.wait_ready(timeout=180)
        self.incarnations[-1]["ready"] = round(now(), 1)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive()

    def kill(self) -> None:
        self.proc.kill()
        self.incarnations[-1]["ended"] = round(now(), 1)


@attrs.define
class Errors:
    """Every error a client saw, with when and where; classified at the end against the restart windows."""

    seen: list[tuple[float, str, str, int]] = attrs.Factory(list)  # (t, source, class, slot)

    def add(self, source: str, cls: str, slot: int) -> None:
        self.seen.append((now(), source, cls, slot))


@attrs.define
class Stats:
    calls: Counter = attrs.Factory(Counter)  # (function, "ok"/"error")
    acked_jobs: set[int] = attrs.Factory(set)
    acked_flows: set[str] = attrs.Factory(set)
    unknown_outcome: Counter = attrs.Factory(Counter)  # mutation calls cut off without an answer


# --- HTTP load -------------------------------------------------------------------------------------
class Load:
    def __init__(self, slots: list[Slot], errors: Errors, stats: Stats) -> None:
        self.slots, self.errors, self.stats = slots, errors, stats
        self.pools = [Pool("127.0.0.1", s.port, size=8) for s in slots]
        self.seq = 0
        self.tasks: set[asyncio.Task] = set()

    async def call(self, fn: str, args: dict[str, Any], slot: int | None = None) -> tuple[bool, Any]:
        slot = random.randrange(len(self.slots)) if slot is None else slot
        body = json.dumps(args).encode()
        try:
            status, raw = await asyncio.wait_for(self.pools[slot].post(f"/rpc/{fn}", body), 30)
        except asyncio.TimeoutError:
            return self._fail(fn, "client timeout (30 s)", slot, cut=True)
        except ConnectionRefusedError:
            return self._fail(fn, "connection refused", slot, cut=False)
        except (ConnectionError, OSError) as exc:
            return self._fail(fn, f"connection lost ({type(exc).__name__})", slot, cut=True)
        if status == 200:
            self.stats.calls[(fn, "ok")] += 1
            return True, json.loads(raw)["data"]
        try:
            code = json.loads(raw)["error"]["code"]
        except (ValueError, KeyError, TypeError):
            code = raw[:60].decode(errors="replace")
        # a mutation whose database went away mid-call may have committed (the database says)
        return self._fail(fn, f"HTTP {status} {code}", slot, cut=status == 503)

    def _fail(self, fn: str, cls: str, slot: int, *, cut: bool) -> tuple[bool, Any]:
        self.stats.calls[(fn, "error")] += 1
        self.errors.add(f"rpc {fn}", cls, slot)
        if cut and fn in ("dispatch_jobs", "start_flow"):
            self.stats.unknown_outcome[fn] += 1  # the database says whether it committed
        return False, None

    async def rpc_query(self) -> None:
        await self.call("topic_items", {"topic": random.randrange(TOPICS)})

    async def write(self) -> None:
        await self.call("write_item", {"topic": random.randrange(TOPICS), "val": f"w{self._next()}"})

    async def dispatch(self) -> None:
        ok, ids = await self.call("dispatch_jobs", {"key": f"j{self._next()}", "n": random.randint(1, 3)})
        if ok:
            self.stats.acked_jobs.update(ids)

    async def flow(self) -> None:
        ok, run_id = await self.call("start_flow", {"key": f"f{self._next()}"})
        if ok:
            self.stats.acked_flows.add(run_id)

    def _next(self) -> int:
        self.seq += 1
        return self.seq

    async def paced(self, rate: float, fn, until: float) -> None:
        """``rate`` calls per second, each in its own task (a slow answer does not slow the pace)."""
        interval, due = 1.0 / rate, now()
        while due < until:
            due += interval
            await asyncio.sleep(max(0.0, due - now()))
            task = asyncio.create_task(fn())
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def drain(self) -> None:
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=40)


# --- live-query subscribers --------------------------------------------------------------------------
class Subscriber:
    def __init__(self, index: int, slots: list[Slot], errors: Errors) -> None:
        self.index, self.slots, self.errors = index, slots, errors
        self.topic = index % TOPICS
        self.home = self.slot = index % len(slots)
        self.data: Any = None
        self.hash: str | None = None
        self.pushes = 0
        self.reconnects = 0
        self.moves_home = 0
        self.proto = None
        self.subscribed = asyncio.Event()

    def on_message(self, _t: float, payload: bytes) -> None:
        msg = json.loads(payload)
        kind = msg.get("type")
        if kind == "data":
            self.data, self.hash = msg["data"], msg["hash"]
            self.pushes += 1
            self.subscribed.set()
        elif kind == "unchanged":
            self.hash = msg["hash"]
            self.subscribed.set()
        elif kind == "error":
            self.errors.add("ws message", f"error {msg.get('code')}", self.slot)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.subscribed.clear()
            try:
                self.proto = await ws_connect(f"ws://127.0.0.1:{self.slots[self.slot].port}/ws", self.on_message)
            except ConnectionRefusedError:
                self.errors.add("ws connect", "connection refused", self.slot)
                await self._move()
                continue
            except (ConnectionError, OSError, asyncio.TimeoutError) as exc:
                self.errors.add("ws connect", f"handshake failed ({str(exc)[:40] or type(exc).__name__})", self.slot)
                await self._move()
                continue
            sub = {"type": "subscribe", "id": "s", "function": "topic_items", "args": {"topic": self.topic}}
            if self.hash is not None:
                sub["hash"] = self.hash  # resubscribe: 'unchanged' if our copy is current
            self.proto.send(json.dumps(sub))
            pinger = asyncio.create_task(self._ping())
            closed = asyncio.ensure_future(self.proto.closed)
            stopped = asyncio.ensure_future(stop.wait())
            waits = [closed, stopped]
            if self.slot != self.home:  # away from home after a kill: go back once it is up again
                waits.append(asyncio.ensure_future(asyncio.sleep(random.uniform(20, 40))))
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            pinger.cancel()
            for w in waits[1:]:
                w.cancel()
            if stop.is_set():
                self.proto.close()
                return
            if not closed.done():  # our own choice, not an error: every kill keeps hitting a third of them
                self.proto.close()
                self.slot = self.home
                self.moves_home += 1
                continue
            code = closed.result()
            self.errors.add("ws closed", f"close {code}" if code is not None else "connection lost", self.slot)
            self.reconnects += 1
            await self._move()

    async def _ping(self) -> None:
        with contextlib.suppress(Exception):
            while True:
                await asyncio.sleep(30)
                self.proto.send('{"type": "ping"}')

    async def _move(self) -> None:
        """Reconnect after a jittered pause, to the next node (a load balancer's retry)."""
        await asyncio.sleep(random.uniform(0.2, 1.5))
        self.slot = (self.slot + 1) % len(self.slots)


# --- sampling --------------------------------------------------------------------------------------
def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


async def sampler(slots: list[Slot], subs: list, loads: list, until: float, every: float = 10.0) -> None:
    """RSS of every node (with the subscribers it holds then) every ``every`` seconds."""
    while now() < until:
        for s in slots:
            if s.alive():
                mb = rss_mb(s.proc.pid)
                if mb is not None:
                    held = sum(1 for sub in subs if sub.slot == s.index and sub.subscribed.is_set())
                    s.incarnations[-1]["rss_mb"].append((round(now()), mb, held))
        loads.append((round(now()), [round(x, 2) for x in os.getloadavg()]))
        await asyncio.sleep(every)


# --- chaos -----------------------------------------------------------------------------------------
def chaos_plan(duration: float, kill_every: float, pg_restarts: int) -> list[tuple[float, str]]:
    """Kills every ``kill_every`` s; PostgreSQL restarts spread over the run, half-way between two kills."""
    plan = [(t, "kill") for t in range(int(kill_every), int(duration), int(kill_every))]
    for k in range(1, pg_restarts + 1):
        base = duration * k / (pg_restarts + 1)
        plan.append((math.floor(base / kill_every) * kill_every + kill_every / 2, "pg"))
    return sorted(plan)


async def leader_slot(admin_url: str, slots: list[Slot]) -> int | None:
    with contextlib.suppress(Exception):
        conn = await asyncpg.connect(admin_url, timeout=5)
        try:
            node = await conn.fetchval("SELECT node_id FROM forge_leaders WHERE name = 'scheduler'")
        finally:
            await conn.close()
        return next((s.index for s in slots if s.node_id == node), None)
    return None


async def chaos(plan, slots: list[Slot], pg: EmbeddedPostgres, db_url: str, events: list[dict]) -> None:
    """SIGKILL a node and start it again at once; restart PostgreSQL (fast shutdown) in between.
    soak-1 is never killed, so one node's memory is followed for the whole run; the victim is the
    scheduler leader when it is on soak-2 or soak-3, else the one not killed last."""
    last_victim = 2
    for t, kind in plan:
        await asyncio.sleep(max(0.0, t - now()))
        if kind == "kill":
            leader = await leader_slot(db_url, slots)
            victim = leader if leader in (1, 2) and leader != last_victim else (1 if last_victim == 2 else 2)
            last_victim = victim
            s = slots[victim]
            t_kill = now()
            s.kill()
            s.start()
            try:
                await asyncio.to_thread(s.wait_ready)
            except Exception as exc:  # reported, the soak goes on with the others
                log(f"{s.node_id} did not come back: {exc}")
            ev = {"t": round(t_kill, 1), "kind": "kill", "node": s.node_id, "was_leader": victim == leader,
                  "back_after_s": round(now() - t_kill, 1)}
        else:
            t_stop = now()
            await asyncio.to_thread(pg.restart)
            ev = {"t": round(t_stop, 1), "kind": "pg_restart", "back_after_s": round(now() - t_stop, 1)}
        events.append(ev)
        log(f"chaos: {ev}")


# --- the checks ------------------------------------------------------------------------------------
async def wait_quiet(conn: asyncpg.Connection, timeout: float) -> dict[str, Any]:
    """Until no soak job or workflow run is left to do (or ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        jobs = await conn.fetchval("SELECT count(*) FROM forge_jobs WHERE name = 'soak_job' AND status <> 'dead'")
        flows = await conn.fetchval("SELECT count(*) FROM forge_workflow_runs WHERE name = 'soak_flow' "
                                    "AND status NOT IN ('succeeded', 'failed', 'cancelled', 'blocked')")
        if (jobs == 0 and flows == 0) or time.monotonic() > deadline:
            return {"jobs_left": jobs, "runs_left": flows}
        await asyncio.sleep(1)


async def check_jobs(conn: asyncpg.Connection, stats: Stats) -> dict[str, Any]:
    committed = {r["job_id"] for r in await conn.fetch("SELECT job_id FROM soak_dispatched")}
    runs = {r["job_id"]: r["n"] for r in await conn.fetch(
        "SELECT job_id, count(*) AS n FROM soak_job_runs GROUP BY job_id")}
    lost = sorted(committed - runs.keys())
    history = Counter(dict(await conn.fetch(
        "SELECT status, count(*) FROM forge_job_history WHERE name = 'soak_job' GROUP BY status")))
    live = Counter(dict(await conn.fetch("SELECT status, count(*) FROM forge_jobs WHERE name = 'soak_job' GROUP BY status")))
    lost_detail = [dict(r) for r in await conn.fetch(
        "SELECT id, status, attempt, node_id, last_error FROM forge_jobs WHERE id = ANY($1) "
        "UNION ALL SELECT id, status, attempt, node_id, last_error FROM forge_job_history WHERE id = ANY($1)",
        lost[:20])]
    attempts = Counter(dict(await conn.fetch(
        "SELECT attempt, count(*) FROM forge_job_history WHERE name = 'soak_job' GROUP BY attempt")))
    return {"dispatched_committed": len(committed), "acked_to_clients": len(stats.acked_jobs),
            "acked_but_not_committed": len(stats.acked_jobs - committed),
            "ran_at_least_once": len(committed & runs.keys()), "lost": len(lost), "lost_detail": lost_detail,
            "executions": sum(runs.values()), "re_executions": sum(n - 1 for n in runs.values()),
            "jobs_run_more_than_once": sum(1 for n in runs.values() if n > 1),
            "history_status": dict(history), "still_in_queue": dict(live),
            "history_attempts": {str(k): v for k, v in sorted(attempts.items())},
            "ran_but_not_committed": len(runs.keys() - committed)}


async def check_cron(conn: asyncpg.Connection, start_db: Any, end_db: Any) -> dict[str, Any]:
    """Every second from the first scheduled slot to the end of the load: one run row each (the
    enqueue is exactly once), dropped slots counted by the scheduler (catch_up skip, grace 30 s)."""
    first = await conn.fetchval("SELECT min(slot) FROM forge_cron_runs WHERE cron = 'soak_tick' AND kind = 'scheduled' "
                                "AND slot >= $1", start_db)
    rows = await conn.fetch("""
        WITH slots AS (SELECT generate_series($1::timestamptz, $2::timestamptz, interval '1 second') AS slot)
        SELECT s.slot, count(r.id) AS runs, min(r.status) AS status,
               (SELECT count(*) FROM soak_cron_execs e WHERE e.slot = s.slot) AS execs
        FROM slots s LEFT JOIN forge_cron_runs r ON r.cron = 'soak_tick' AND r.kind = 'scheduled' AND r.slot = s.slot
        GROUP BY s.slot ORDER BY s.slot""", first, end_db)
    state = await conn.fetchrow("SELECT dropped_total, last_dropped FROM forge_cron_state WHERE cron = 'soak_tick'")
    lag = await conn.fetchrow("""
        SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM enqueued_at - slot)) AS p50,
               max(extract(epoch FROM enqueued_at - slot)) AS max
        FROM forge_cron_runs WHERE cron = 'soak_tick' AND kind = 'scheduled' AND slot BETWEEN $1 AND $2""", first, end_db)
    missed = [r["slot"].isoformat() for r in rows if r["runs"] == 0]
    return {"window": [first.isoformat(), end_db.isoformat()], "expected_slots": len(rows),
            "run_rows": sum(r["runs"] for r in rows), "slots_run_twice": sum(1 for r in rows if r["runs"] > 1),
            "missed_slots": len(missed), "missed_examples": missed[:10],
            "dropped_total_by_scheduler": state["dropped_total"] if state else None,
            "statuses": dict(Counter(r["status"] for r in rows if r["runs"])),
            "executed": sum(1 for r in rows if r["execs"] > 0),
            "run_but_not_executed": sum(1 for r in rows if r["runs"] and not r["execs"]),
            "executed_more_than_once": sum(1 for r in rows if r["execs"] > 1),
            "enqueue_lag_s": {"p50": round(lag["p50"] or 0, 3), "max": round(lag["max"] or 0, 3)}}


async def check_flows(conn: asyncpg.Connection, stats: Stats) -> dict[str, Any]:
    flows = await conn.fetch("""
        SELECT f.key, f.run_id, r.status,
               count(s.key) FILTER (WHERE s.kind = 'step') AS steps,
               count(s.key) FILTER (WHERE s.kind = 'step' AND s.status = 'succeeded') AS steps_ok,
               count(s.key) FILTER (WHERE s.key LIKE '%~%') AS replaced,
               max(r.recoveries) AS recoveries
        FROM soak_flows f LEFT JOIN forge_workflow_runs r ON r.id::text = f.run_id
        LEFT JOIN forge_workflow_steps s ON s.run_id = r.id
        GROUP BY f.key, f.run_id, r.status""")
    execs = Counter()
    for r in await conn.fetch("SELECT key, step, count(*) AS n FROM soak_step_runs GROUP BY key, step"):
        execs[(r["key"], r["step"])] = r["n"]
    statuses = Counter(r["status"] for r in flows)
    want = len(FLOW_STEPS)
    bad_steps = [r["key"] for r in flows if r["status"] == "succeeded" and (r["steps"] != want or r["steps_ok"] != want)]
    missing_exec = sum(1 for r in flows if r["status"] == "succeeded"
                       for step in FLOW_STEPS if execs[(r["key"], step)] == 0)
    committed_ids = {r["run_id"] for r in flows}
    return {"started_committed": len(flows), "acked_to_clients": len(stats.acked_flows),
            "acked_but_not_committed": len(stats.acked_flows - committed_ids),
            "statuses": dict(statuses), "runs_with_wrong_step_records": len(bad_steps), "bad_examples": bad_steps[:5],
            "replaced_step_records": sum(r["replaced"] for r in flows),
            "recovered_runs": sum(1 for r in flows if (r["recoveries"] or 0) > 0),
            "step_executions": sum(execs.values()),
            "step_re_executions": sum(n - 1 for n in execs.values() if n > 1),
            "succeeded_steps_never_executed": missing_exec}


async def check_subscribers(subs: list[Subscriber], load: Load, timeout: float = 60.0) -> dict[str, Any]:
    """Each subscriber's last result against a fresh run of its query over /rpc (on soak-1)."""
    t_start = time.monotonic()
    first_mismatch = None
    while True:
        fresh = {}
        for topic in range(TOPICS):
            ok, data = await load.call("topic_items", {"topic": topic}, slot=0)
            if ok:
                fresh[topic] = data
        mismatched = [s.index for s in subs if s.topic not in fresh or s.data != fresh[s.topic]]
        if first_mismatch is None:
            first_mismatch = len(mismatched)
        if not mismatched or time.monotonic() - t_start > timeout:
            break
        await asyncio.sleep(1)
    return {"subscribers": len(subs), "equal_to_fresh_run": len(subs) - len(mismatched),
            "mismatched_at_first_look": first_mismatch, "mismatched_at_end": len(mismatched),
            "seconds_to_converge": round(time.monotonic() - t_start, 1),
            "pushes": sum(s.pushes for s in subs), "reconnects": sum(s.reconnects for s in subs),
            "moves_back_home": sum(s.moves_home for s in subs),
            "mismatch_examples": [{"sub": i, "topic": subs[i].topic, "last": subs[i].data,
                                   "fresh": fresh.get(subs[i].topic)} for i in mismatched[:3]]}


def classify_errors(errors: Errors, events: list[dict], grace: float) -> dict[str, Any]:
    """An error counts as 'during a restart' from the kill (or PostgreSQL stop) until ``grace``
    seconds after the node (or server) was back."""
    windows = [(e["t"], e["t"] + e["back_after_s"] + grace) for e in events]
    during, outside = Counter(), Counter()
    outside_examples = []
    for t, source, cls, slot in errors.seen:
        key = f"{source}: {cls}"
        if any(a <= t <= b for a, b in windows):
            during[key] += 1
        else:
            outside[key] += 1
            if len(outside_examples) < 20:
                outside_examples.append({"t": round(t, 1), "where": f"soak-{slot + 1}", "what": key})
    return {"during_restarts": dict(during.most_common()), "outside_restarts": dict(outside.most_common()),
            "outside_examples": outside_examples, "window_grace_s": grace}


def node_log_errors(slots: list[Slot]) -> dict[str, int]:
    """ERROR lines of every node's logs, by message (request ids and numbers taken out)."""
    import re

    found: Counter = Counter()
    for s in slots:
        for path in s.workdir.glob("node-*.log"):
            for line in path.read_text(errors="replace").splitlines():
                if " ERROR " in line:
                    msg = line.split(" ERROR ", 1)[1].strip()
                    msg = re.sub(r"\(request [^)]*\)|[0-9a-f]{8}-[0-9a-f-]{27}|\d+(\.\d+)?", "N", msg)
                    found[msg[:120]] += 1
    return dict(found.most_common(40))


def rss_summary(slots: list[Slot]) -> dict[str, Any]:
    out = {}
    for s in slots:
        incs = []
        for inc in s.incarnations:
            series = inc["rss_mb"]
            if not series:
                continue
            settled = [mb for t, mb, _ in series if t - inc["started"] >= 60] or [series[-1][1]]
            incs.append({"pid": inc["pid"], "from_s": inc["started"], "to_s": inc["ended"],
                         "first_mb": series[0][1], "after_60s_mb": settled[0], "last_mb": series[-1][1],
                         "max_mb": max(mb for _, mb, _ in series), "samples": len(series),
                         "subscribers_held": [min(h for *_, h in series), max(h for *_, h in series)]})
        out[s.node_id] = incs
    return out


# --- main ------------------------------------------------------------------------------------------
async def main(args: argparse.Namespace) -> dict[str, Any]:
    duration = args.minutes * 60
    root = Path(tempfile.mkdtemp(prefix="forge-soak-"))
    root.chmod(0o711)  # as root the server runs as forge_pg, which must pass through
    pg = EmbeddedPostgres(root / "pg")  # stock settings: fsync and synchronous_commit on
    slots: list[Slot] = []
    subs: list[Subscriber] = []
    out: dict[str, Any] = {"args": vars(args), "load_average_at_start": os.getloadavg(), "cpus": os.cpu_count()}
    try:
        admin_url = await asyncio.to_thread(pg.start)
        admin = await asyncpg.connect(admin_url)
        await admin.execute("CREATE DATABASE forge_soak")
        out["postgres"] = {k: await admin.fetchval(f"SHOW {k}") for k in (
            "server_version", "fsync", "synchronous_commit", "max_connections", "shared_buffers")}
        await admin.close()
        db_url = with_database(admin_url, "forge_soak")

        slots = [Slot(i, f"soak-{i + 1}", free_port(), root / f"node{i + 1}", db_url) for i in range(3)]
        slots[0].start()
        await asyncio.to_thread(slots[0].wait_ready)  # the first applies the migrations alone
        for s in slots[1:]:
            s.start()
        await asyncio.gather(*(asyncio.to_thread(s.wait_ready) for s in slots[1:]))
        log(f"3 nodes ready on ports {[s.port for s in slots]}; load average {os.getloadavg()}")

        errors, stats = Errors(), Stats()
        load = Load(slots, errors, stats)
        stop_subs = asyncio.Event()
        subs = [Subscriber(i, slots, errors) for i in range(args.subscribers)]
        sub_tasks = []
        for i, s in enumerate(subs):  # within the nodes' subscribe and connection rates
            sub_tasks.append(asyncio.create_task(s.run(stop_subs)))
            if i % 25 == 24:
                await asyncio.sleep(0.1)
        await asyncio.wait_for(asyncio.gather(*(s.subscribed.wait() for s in subs)), 120)
        log(f"{len(subs)} subscribers have their first result")

        conn = await asyncpg.connect(db_url)
        start_db = await conn.fetchval("SELECT now()")
        await conn.close()
        global T0
        T0 = time.monotonic()  # chaos and load are timed from here
        for s in slots:
            s.incarnations[-1]["started"] = 0.0
        events: list[dict] = []
        loads: list = []
        until = float(duration)
        plan = chaos_plan(duration, args.kill_every, args.pg_restarts)
        log(f"soak for {args.minutes} min: {len(plan)} chaos events {plan}")
        workers = [
            load.paced(args.rpc_rate, load.rpc_query, until),
            load.paced(args.write_rate, load.write, until),
            load.paced(args.dispatch_rate, load.dispatch, until),
            load.paced(args.flow_rate, load.flow, until),
            sampler(slots, subs, loads, until + 1),
            chaos(plan, slots, pg, db_url, events),
        ]

        async def progress() -> None:
            while now() < until:
                await asyncio.sleep(60)
                ok = sum(v for (fn, r), v in stats.calls.items() if r == "ok")
                log(f"calls ok {ok}, errors {len(errors.seen)}, load average {os.getloadavg()}, "
                    f"rss {[rss_mb(s.proc.pid) if s.alive() else None for s in slots]}, subscribers "
                    f"{[sum(1 for sub in subs if sub.slot == s.index) for s in slots]}")

        await asyncio.gather(*workers, progress())
        await load.drain()
        conn = await asyncpg.connect(db_url)
        end_db = await conn.fetchval("SELECT now()")
        log(f"load stopped; waiting for jobs and workflows to finish (load average {os.getloadavg()})")
        out["quiet"] = await wait_quiet(conn, args.settle)
        # the cron's window is over once its leader decided past it
        for _ in range(120):
            if await conn.fetchval("SELECT decided_until > $1::timestamptz + interval '2 seconds' FROM forge_cron_state "
                                   "WHERE cron = 'soak_tick'", end_db):
                break
            await asyncio.sleep(1)
        await asyncio.sleep(5)  # the last cron jobs and pushes
        checks = {"jobs": check_jobs(conn, stats), "cron": check_cron(conn, start_db, end_db),
                  "workflows": check_flows(conn, stats), "subscribers": check_subscribers(subs, load)}
        for name, check in checks.items():
            try:
                out[name] = await check
            except Exception as exc:  # a broken check must not hide the others
                out[name] = {"check_failed": repr(exc)}
        await conn.close()
        stop_subs.set()
        await asyncio.wait(sub_tasks, timeout=10)
        out["calls"] = {f"{fn} {r}": v for (fn, r), v in sorted(stats.calls.items())}
        out["unknown_outcome_mutations"] = dict(stats.unknown_outcome)
        out["errors"] = classify_errors(errors, events, args.error_grace)
        out["chaos"] = events
        out["rss"] = rss_summary(slots)
        out["rss_series"] = {s.node_id: [inc["rss_mb"] for inc in s.incarnations] for s in slots}
        out["load_average"] = loads
        out["load_average_at_end"] = os.getloadavg()
        out["node_log_errors"] = node_log_errors(slots)
        return out
    finally:
        for s in slots:
            if s.proc is not None:
                s.proc.terminate(timeout=20)
        if args.keep:
            print(f"kept {root}", flush=True)
        await asyncio.to_thread(pg.release, 5)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


def verdict(out: dict[str, Any]) -> list[str]:
    problems = [f"{k} check failed: {out[k]['check_failed']}" for k in ("jobs", "cron", "workflows", "subscribers")
                if "check_failed" in out[k]]
    if problems:
        return problems
    j, c, w, s = out["jobs"], out["cron"], out["workflows"], out["subscribers"]
    if j["lost"] or j["acked_but_not_committed"]:
        problems.append(f"jobs lost: {j['lost']} (acked but not committed {j['acked_but_not_committed']})")
    if c["slots_run_twice"]:
        problems.append(f"cron slots run twice: {c['slots_run_twice']}")
    if c["missed_slots"] > (c["dropped_total_by_scheduler"] or 0):
        problems.append(f"cron slots missed beyond the counted drops: {c['missed_slots']}")
    if c["run_but_not_executed"]:
        problems.append(f"cron runs never executed: {c['run_but_not_executed']}")
    if set(w["statuses"]) - {"succeeded"} or w["runs_with_wrong_step_records"] or w["replaced_step_records"]:
        problems.append(f"workflows: {w['statuses']}, wrong step records {w['runs_with_wrong_step_records']}")
    if s["mismatched_at_end"]:
        problems.append(f"subscribers whose last result differs from a fresh run: {s['mismatched_at_end']}")
    if out["errors"]["outside_restarts"]:
        problems.append(f"errors outside restarts: {out['errors']['outside_restarts']}")
    return problems


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--kill-every", type=float, default=120.0, help="seconds between SIGKILLs")
    p.add_argument("--pg-restarts", type=int, default=2)
    p.add_argument("--subscribers", type=int, default=500)
    p.add_argument("--rpc-rate", type=float, default=20.0, help="query calls per second")
    p.add_argument("--write-rate", type=float, default=5.0, help="write_item mutations per second")
    p.add_argument("--dispatch-rate", type=float, default=5.0, help="dispatch_jobs mutations per second (1-3 jobs each)")
    p.add_argument("--flow-rate", type=float, default=2.0, help="start_flow mutations per second")
    p.add_argument("--settle", type=float, default=180.0, help="seconds to wait for the last jobs and runs")
    p.add_argument("--error-grace", type=float, default=15.0,
                   help="seconds after a node or PostgreSQL is back during which errors count as part of the restart")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--keep", action="store_true", help="keep the data and node logs")
    args = p.parse_args()
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    out = asyncio.run(main(args))
    problems = verdict(out)
    out["problems"] = problems
    text = json.dumps(out, indent=1, default=str)
    if args.json:
        args.json.write_text(text)
    summary = {k: out[k] for k in ("jobs", "cron", "workflows", "subscribers", "errors", "chaos", "rss",
                                   "unknown_outcome_mutations", "node_log_errors", "problems")}
    print(json.dumps(summary, indent=1, default=str))
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    exit_on_sigterm()  # a kill PID still stops the servers it started
    cli()
