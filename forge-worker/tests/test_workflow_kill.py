"""Workflows survive crashes: real forge-node processes on a PostgreSQL of their own; one worker
SIGKILLed mid-run, then another, then PostgreSQL restarted, while 1,000 runs sleep, step and
compensate. Every run ends; every recorded step result exists once; compensations are recorded
exactly once for exactly the completed steps, in reverse order; a step's function ran more than
once only for runs a crash interrupted."""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import tempfile
import uuid
from pathlib import Path

import asyncpg
import pytest

from forge_kernel.db import with_database
from forge_kernel.embedded_pg import EmbeddedPostgres
from forge_kernel.testing import NodeProcess
from forge_worker import WorkflowClient

from worker_helpers import eventually

APPS = str(Path(__file__).parent / "apps")
ENV = {"PYTHONPATH": APPS + os.pathsep + os.environ.get("PYTHONPATH", ""), "FORGE_LOG__LEVEL": "WARNING",
       "WF_STEP_SECONDS": "0.05"}
LEASE = 2.0
RUNS = 1000


def node_config(db_url: str, node_id: str) -> dict:
    return {
        "database": {"url": db_url, "pool_max": 30},
        "node": {"id": node_id, "roles": ["worker"], "heartbeat_interval": 0.5, "dead_after": 3.0},
        "app": {"modules": ["workflow_app"], "example": False},
        "workflows": {"concurrency": 150, "lease": LEASE, "heartbeat_interval": 0.5, "rescue_interval": 0.5,
                      "poll_interval": 0.5, "suspend_after": 1.0,
                      # a step (an app mutation) fails while PostgreSQL restarts: its retries outlast the outage
                      "step_retries": 10, "step_backoff": 0.2, "step_backoff_max": 1.0,
                      # the default (off) runs in every other test
                      "durable_steps": True},
    }


async def _ended(pool) -> int:
    return await pool.fetchval("SELECT count(*) FROM forge_workflow_runs WHERE status IN ('succeeded', 'failed', 'cancelled')")


async def _held(pool, node_id: str) -> list:
    """Runs the node holds, and what each was doing: its last record and whether it compensates."""
    return await pool.fetch(
        """SELECT r.id, r.claims, r.compensating, clock_timestamp() AS at,
                  (SELECT s.kind || ':' || s.status || ':' || coalesce(s.result->>'until', '')
                   FROM forge_workflow_steps s WHERE s.run_id = r.id ORDER BY s.seq DESC LIMIT 1) AS last
           FROM forge_workflow_runs r WHERE r.status = 'running' AND r.node_id = $1""", node_id)


def _phase(row) -> str:
    if row["compensating"]:
        return "compensation"
    last = row["last"] or ""
    if last.startswith("sleep:"):
        return "sleep" if last.split(":", 2)[2] > row["at"].isoformat() else "step"
    return "step"


async def _resume_seconds(pool, held: list) -> list[float]:
    """Seconds from the kill to the first record a later claim wrote, per interrupted run."""
    # the first write of a later claim: a record, or the run's end (a run killed in its last sleep
    # records nothing more)
    rows = await pool.fetch(
        """SELECT h.id, extract(epoch FROM least(min(s.finished_at),
                                                 max(CASE WHEN r.claims > h.claims THEN r.finished_at END)) - h.at) AS s
           FROM unnest($1::uuid[], $2::int[], $3::timestamptz[]) AS h(id, claims, at)
           JOIN forge_workflow_runs r ON r.id = h.id
           LEFT JOIN forge_workflow_steps s ON s.run_id = h.id AND s.claim > h.claims
           GROUP BY h.id, h.at""",
        [r["id"] for r in held], [r["claims"] for r in held], [r["at"] for r in held])
    return [float(r["s"]) for r in rows if r["s"] is not None]


@pytest.mark.timeout(600)
async def test_1000_runs_survive_sigkills_mid_step_sleep_compensation_and_a_postgres_restart(tmp_path):
    pg_root = Path(tempfile.mkdtemp(prefix="forge-wf-kill-pg-"))
    pg = EmbeddedPostgres(pg_root, settings={"fsync": "off", "synchronous_commit": "off"})
    url = pg.start()
    admin = await asyncpg.connect(url)
    await admin.execute("CREATE DATABASE wf_kill")
    await admin.close()
    db_url = with_database(url, "wf_kill")
    procs: list[NodeProcess] = []

    def spawn(node_id: str) -> NodeProcess:
        p = NodeProcess(tmp_path / node_id, node_config(db_url, node_id), env=dict(ENV))
        procs.append(p)
        return p.start()

    pool = None
    try:
        for p in [spawn("k1"), spawn("k2")]:
            p.wait_ready()
        pool = await asyncpg.create_pool(db_url, min_size=1, max_size=4)
        client = WorkflowClient(pool)
        failing = {i for i in range(RUNS) if i % 3 == 0}
        reqs = [client.request("booking", {"fail_at": 3 if i in failing else 0, "sleep": 0.4},
                               idempotency_key=f"kill-{i}") for i in range(RUNS)]
        ids = []
        for at in range(0, RUNS, 50):  # started one after another, like real traffic: oldest runs are claimed first
            ids += await client.start_many(reqs[at:at + 50])
        assert len(set(ids)) == RUNS
        held_all, resume, phases = [], [], {"step": 0, "sleep": 0, "compensation": 0}

        async def kill(victim: NodeProcess, at_least: int) -> None:
            await eventually(lambda: _at_least(pool, at_least), timeout=240, what=f"{at_least} runs to end")
            victim.kill()
            held = await _held(pool, victim.node_id)
            for r in held:
                phases[_phase(r)] += 1
            held_all.extend(held)
            return held

        first = await kill(procs[0], RUNS // 5)
        spawn("k3").wait_ready()
        second = await kill(procs[1], RUNS // 2)
        spawn("k4").wait_ready()
        await eventually(lambda: _at_least(pool, RUNS * 7 // 10), timeout=240, what="70% of the runs")
        running_at_restart = {r["id"] for r in await pool.fetch(
            "SELECT id FROM forge_workflow_runs WHERE status NOT IN ('succeeded', 'failed', 'cancelled')")}
        await pool.close()
        pool = None
        await asyncio.to_thread(pg.stop)
        await asyncio.sleep(1.0)
        await asyncio.to_thread(pg.start)
        pool = await asyncpg.create_pool(db_url, min_size=1, max_size=4)
        await eventually(lambda: _at_least(pool, RUNS), timeout=300, what="every run to end")
        resume = await _resume_seconds(pool, first) + await _resume_seconds(pool, second)

        runs = {r["id"]: r for r in await pool.fetch("SELECT id, status, error FROM forge_workflow_runs")}
        steps: dict = {}
        for s in await pool.fetch("SELECT run_id, key, kind, status, seq FROM forge_workflow_steps ORDER BY seq"):
            steps.setdefault(s["run_id"], []).append(s)
        log: dict = {}
        for r in await pool.fetch("SELECT run_id, step, event, count(*) AS n FROM wf_log GROUP BY 1, 2, 3"):
            log[(r["run_id"], r["step"], r["event"])] = r["n"]
        interrupted = {r["id"] for r in held_all} | running_at_restart
        twice = set()
        for i, rid in enumerate(ids):
            run = runs[uuid.UUID(rid)]
            recs = steps[run["id"]]
            keys = [(s["key"], s["kind"], s["status"]) for s in recs]
            if i in failing:
                assert run["status"] == "failed" and "boom" in run["error"], (rid, run["status"], run["error"])
                assert keys == [("1", "step", "succeeded"), ("2", "sleep", "succeeded"), ("3", "step", "succeeded"),
                                ("4", "sleep", "succeeded"), ("5", "step", "failed"),
                                ("c:3", "compensation", "succeeded"), ("c:1", "compensation", "succeeded")], (rid, keys)
                for step in "ab":
                    assert log.get((rid, step, "undone"), 0) >= 1, (rid, step)
            else:
                assert run["status"] == "succeeded", (rid, run["status"], run["error"])
                assert [k for k, _, _ in keys] == ["1", "2", "3", "4", "5", "6"], (rid, keys)
                assert not any(log.get((rid, s, "undone")) for s in "abc"), rid
            done = ["a", "b"] if i in failing else ["a", "b", "c"]
            for step in done:
                n = log.get((rid, step, "ran"), 0)
                assert n >= 1, (rid, step)
                if n > 1 or log.get((rid, step, "undone"), 0) > 1:
                    twice.add(run["id"])
            assert (rid, "c", "ran") not in log or i not in failing
        resume.sort()
        p99 = resume[max(0, int(len(resume) * 0.99) - 1)] if resume else 0.0
        print(f"\nworkflow kill test: {RUNS} runs ({len(failing)} compensating); interrupted by SIGKILL "
              f"{len(held_all)} (mid-step {phases['step']}, mid-sleep {phases['sleep']}, mid-compensation "
              f"{phases['compensation']}), live at the PostgreSQL restart {len(running_at_restart)}; step or "
              f"compensation functions that ran twice: {len(twice)}; resume after SIGKILL p50 "
              f"{statistics.median(resume) if resume else 0:.2f} s p99 {p99:.2f} s max {resume[-1] if resume else 0:.2f} s "
              f"(lease {LEASE:g} s + 2 s = {LEASE + 2:g} s)")
        assert twice <= interrupted, f"functions ran twice in runs no crash interrupted: {sorted(twice - interrupted)[:10]}"
        assert phases["step"] and phases["sleep"] and phases["compensation"], phases
        assert len(resume) == len(held_all)
    finally:
        if pool is not None:
            await pool.close()
        for p in procs:
            p.terminate(timeout=20)
        pg.stop()
        shutil.rmtree(pg_root, ignore_errors=True)


async def _at_least(pool, n: int) -> bool:
    return await _ended(pool) >= n
