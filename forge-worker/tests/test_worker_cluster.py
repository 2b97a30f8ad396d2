"""Real forge-node processes: a worker SIGKILLed mid-run, PostgreSQL restarted mid-run,
graceful shutdown finishing short jobs and releasing
long ones, the jobs CLI."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import asyncpg
import pytest

from forge_kernel.db import with_database
from forge_kernel.embedded_pg import EmbeddedPostgres
from forge_kernel.testing import NodeProcess
from forge_worker import JobQueue, runtime

from worker_helpers import eventually

APPS = str(Path(__file__).parent / "apps")
ENV = {"PYTHONPATH": APPS + os.pathsep + os.environ.get("PYTHONPATH", ""), "FORGE_LOG__LEVEL": "WARNING"}


def node_config(concurrency: int = 20, **worker) -> dict:
    return {
        "node": {"roles": ["worker"], "heartbeat_interval": 0.5, "dead_after": 3.0},
        "app": {"modules": ["worker_jobs"], "example": False},
        "worker": {"concurrency": concurrency, "lease": 5.0, "heartbeat_interval": 0.5, "rescue_interval": 1.0,
                   "poll_interval": 0.5, "backoff_base": 0.05, "backoff_max": 0.5, **worker},
    }


async def enqueue_work(pool, n: int) -> list[int]:
    queue = JobQueue(pool)
    import worker_jobs

    ids: list[int] = []
    for start in range(0, n, 5000):
        ids += await queue.enqueue_many([queue.request(worker_jobs.crash_work, {"i": i})
                                         for i in range(start, min(n, start + 5000))])
    return ids


async def ran_counts(pool) -> dict[int, int]:
    rows = await pool.fetch("SELECT job_id, count(*) AS n FROM job_log WHERE event = 'ran' GROUP BY job_id")
    return {r["job_id"]: r["n"] for r in rows}


async def crash_scenario(forge_processes, n_jobs: int) -> None:
    nodes = [forge_processes(node_config(), node_id=f"w{i}", env=ENV) for i in (1, 2)]
    pool = await asyncpg.create_pool(forge_processes.db_url, min_size=1, max_size=4)
    try:
        ids = await enqueue_work(pool, n_jobs)
        assert len(set(ids)) == n_jobs

        async def progressed():
            return await pool.fetchval("SELECT count(*) FROM job_log WHERE event = 'ran'") >= n_jobs // 3

        await eventually(progressed, timeout=120, what="a third of the jobs")
        victim = nodes[0]
        victim.kill()  # SIGKILL: no drain, no release, results in flight are lost
        # what the killed node held: rows still leased to it (running, or run with the result unwritten)
        held = {r["id"] for r in await pool.fetch(
            "SELECT id FROM forge_jobs WHERE status = 'running' AND node_id = $1", victim.node_id)}

        async def all_done():
            counts = await ran_counts(pool)
            left = await pool.fetchval("SELECT count(*) FROM forge_jobs")
            return counts if len(counts) == n_jobs and left == 0 else None

        counts = await eventually(all_done, timeout=300, what="every job to complete")
        dups = {job_id for job_id, n in counts.items() if n > 1}
        by_node = dict(await pool.fetch(
            "SELECT node_id, count(*) FROM job_log WHERE event = 'ran' GROUP BY node_id"))
        print(f"\ncrash test: {n_jobs} jobs, ran {sum(counts.values())} times; per node {by_node}; "
              f"held by the killed node {len(held)}; ran twice {len(dups)}; "
              f"dead {await pool.fetchval('SELECT count(*) FROM forge_jobs WHERE status = $1', 'dead')}")
        assert set(counts) == set(ids)
        assert dups <= held, f"jobs ran twice without running on the killed node: {sorted(dups - held)[:20]}"
        # concurrency 20 and the reserve claimed ahead, grown under this backlog up to prefetch_max
        # (its default: 32 x concurrency)
        bound = 20 + runtime.DEFAULT_PREFETCH_MAX_FACTOR * 20
        assert len(held) <= bound, f"the killed node held {len(held)} jobs with [worker] concurrency = 20 (bound {bound})"
        assert max(counts.values()) <= 2
        assert nodes[1].alive()
    finally:
        await pool.close()


@pytest.mark.timeout(600)  # its own waits (120 s + 300 s) name what is late; the suite's 300 s would not
async def test_killed_worker_20000_jobs_rerun_and_only_those_twice(forge_processes):
    await crash_scenario(forge_processes, 20_000)


@pytest.mark.parametrize("prefetch", [0, 8, None])
async def test_a_killed_worker_reruns_at_most_its_concurrency(forge_processes, prefetch):
    """A finished job keeps its row leased until its result is written, so a node SIGKILLed while
    results wait to be written holds (and the rescue re-runs) at most ``concurrency + prefetch``
    jobs (``concurrency`` with prefetch 0; with prefetch unset, ``concurrency + prefetch_max``, the
    most the reserve grows to under a backlog: 32 x concurrency). The results are held back on
    purpose: the test locks forge_job_history, which every result write inserts into."""
    concurrency, n_jobs = 8, 120
    bound = concurrency + (runtime.DEFAULT_PREFETCH_MAX_FACTOR * concurrency if prefetch is None else prefetch)
    # what its first claim takes (the reserve starts at prefetch, twice concurrency when unset): the
    # statement after it, writing their results, waits for the lock, so no claim commits after it
    first = concurrency + (runtime.DEFAULT_PREFETCH_FACTOR * concurrency if prefetch is None else prefetch)
    pool = await asyncpg.create_pool(forge_processes.db_url, min_size=2, max_size=4)
    lock = await asyncpg.connect(forge_processes.db_url)
    try:
        worker = {} if prefetch is None else {"prefetch": prefetch}
        victim = forge_processes(node_config(concurrency, **worker), node_id="victim", env=ENV)
        lock_tx = lock.transaction()
        await lock_tx.start()
        await lock.execute("LOCK TABLE forge_job_history IN SHARE ROW EXCLUSIVE MODE")  # blocks result writes only
        ids = await enqueue_work(pool, n_jobs)

        async def finished_unwritten():
            return await pool.fetchval("SELECT count(*) FROM job_log WHERE event = 'ran'") >= first

        await eventually(finished_unwritten, timeout=60, what="jobs to finish while their results cannot be written")
        await asyncio.sleep(1.0)  # room for a worker that frees slots early to claim and run more
        held = await pool.fetchval("SELECT count(*) FROM forge_jobs WHERE status = 'running' AND node_id = 'victim'")
        ran_before = await pool.fetchval("SELECT count(*) FROM job_log WHERE event = 'ran'")
        victim.kill()
        # its blocked result write would commit once the lock goes: end it as the crash would have
        await pool.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                           "AND pid <> pg_backend_pid() AND pid <> $1", lock.get_server_pid())
        await lock_tx.rollback()
        assert held <= bound and ran_before <= bound, (held, ran_before)
        forge_processes(node_config(concurrency), node_id="rescuer", env=ENV)

        async def all_done():
            counts = await ran_counts(pool)
            left = await pool.fetchval("SELECT count(*) FROM forge_jobs")
            return counts if len(counts) == n_jobs and left == 0 else None

        counts = await eventually(all_done, timeout=120, what="every job to complete on the second worker")
        reruns = {job_id: n - 1 for job_id, n in counts.items() if n > 1}
        assert set(counts) == set(ids)
        assert len(reruns) <= bound and max(counts.values()) <= 2, reruns
    finally:
        await lock.close()
        await pool.close()


async def restart_scenario(tmp_path: Path, n_jobs: int) -> None:
    # its own folder: pytest sessions of other projects on this host prune /tmp/pytest-of-<user>
    pg_root = Path(tempfile.mkdtemp(prefix="forge-worker-restart-pg-"))
    pg = EmbeddedPostgres(pg_root, settings={"fsync": "off", "synchronous_commit": "off"})
    url = pg.start()
    admin = await asyncpg.connect(url)
    await admin.execute("CREATE DATABASE restart_test")
    await admin.close()
    db_url = with_database(url, "restart_test")
    procs = []
    try:
        for i in (1, 2):
            cfg = node_config()
            cfg["database"] = {"url": db_url}
            cfg["node"]["id"] = f"r{i}"
            p = NodeProcess(tmp_path / f"r{i}", cfg, env=dict(ENV))
            procs.append(p)
            p.start()
        for p in procs:
            p.wait_ready()
        pool = await asyncpg.create_pool(db_url, min_size=1, max_size=2)
        ids = await enqueue_work(pool, n_jobs)
        await eventually(lambda: _at_least(pool, n_jobs // 4), timeout=120, what="a quarter of the jobs")
        await pool.close()
        # stop + start rather than EmbeddedPostgres.restart(): same data, same port
        await asyncio.to_thread(pg.stop)
        await asyncio.sleep(1.0)  # the workers see the database gone for a moment
        try:
            await asyncio.to_thread(pg.start)
        except Exception as exc:  # a loaded shared machine once made pg_ctl miss its 60 s window
            print(f"PostgreSQL start failed once ({exc}); starting again")
            await asyncio.to_thread(pg.start)
        pool = await asyncpg.create_pool(db_url, min_size=1, max_size=2)
        try:
            async def all_done():
                counts = await ran_counts(pool)
                left = await pool.fetchval("SELECT count(*) FROM forge_jobs")
                return counts if len(counts) == n_jobs and left == 0 else None

            counts = await eventually(all_done, timeout=180, what="every job after the restart")
            print(f"\nrestart test: {n_jobs} jobs, ran {sum(counts.values())} times, "
                  f"{sum(1 for n in counts.values() if n > 1)} twice")
            assert set(counts) == set(ids)
            assert all(p.alive() for p in procs)
        finally:
            await pool.close()
    finally:
        for p in procs:
            p.terminate(timeout=20)
        pg.stop()
        shutil.rmtree(pg_root, ignore_errors=True)


async def _at_least(pool, n):
    return await pool.fetchval("SELECT count(*) FROM job_log WHERE event = 'ran'") >= n


@pytest.mark.timeout(600)
async def test_workers_survive_postgres_restart_20000_jobs(tmp_path):
    await restart_scenario(tmp_path, 20_000)


async def test_graceful_shutdown_releases_unfinished_jobs(forge_processes):
    node = forge_processes(node_config(concurrency=4, shutdown_timeout=0.5), node_id="g1", env=ENV)
    pool = await asyncpg.create_pool(forge_processes.db_url, min_size=1, max_size=2)
    try:
        queue = JobQueue(pool)
        ids = [await queue.enqueue("long_running", {"seconds": 60}, max_attempts=1) for _ in range(4)]
        await eventually(lambda: _started(pool, 4), what="four long jobs to start")
        assert node.terminate(timeout=30) == 0
        rows = await pool.fetch("SELECT id, status, attempt, node_id FROM forge_jobs ORDER BY id")
        # released, not failed: back to pending, the attempt not used up
        assert [(r["id"], r["status"], r["attempt"], r["node_id"]) for r in rows] == \
            [(i, "pending", 0, None) for i in ids]
        other = forge_processes(node_config(concurrency=4, shutdown_timeout=0.5), node_id="g2", env=ENV)
        await eventually(lambda: _started(pool, 8), what="another worker to pick them up")
        other.terminate(timeout=30)
    finally:
        await pool.close()


async def test_graceful_shutdown_finishes_jobs_shorter_than_the_timeout(forge_processes):
    cfg = node_config(concurrency=4, shutdown_timeout=30.0)
    cfg["node"]["drain_timeout"] = 60.0
    node = forge_processes(cfg, node_id="f1", env=ENV)
    pool = await asyncpg.create_pool(forge_processes.db_url, min_size=1, max_size=2)
    try:
        queue = JobQueue(pool)
        # 8 s each: still running when the signal lands on a loaded machine, well inside the 30 s
        # shutdown timeout
        ids = [await queue.enqueue("long_running", {"seconds": 8}, max_attempts=1) for _ in range(4)]
        await eventually(lambda: _started(pool, 4), what="four jobs to start")
        # every slot is taken: this one waits, and a stopping worker must not claim it
        waiting = await queue.enqueue("record", {"value": "after-sigterm"})
        signalled_at = await pool.fetchval("SELECT clock_timestamp()")  # job_log.at uses the same clock
        assert await asyncio.to_thread(node.terminate, 90) == 0, node.log()[-4000:]
        log = await pool.fetch("SELECT job_id, event, attempt, node_id, at FROM job_log ORDER BY seq")
        for job_id in ids:
            events = [(r["event"], r["attempt"], r["node_id"]) for r in log if r["job_id"] == job_id]
            # ran exactly once, to the end, on f1 - not cancelled, not released and re-run
            assert events == [("started", 1, "f1"), ("ran", 1, "f1")], (job_id, events)
        assert all(r["at"] > signalled_at for r in log if r["event"] == "ran")  # finished during the drain
        history = await pool.fetch("SELECT id, status, attempt, node_id FROM forge_job_history ORDER BY id")
        assert [(r["id"], r["status"], r["attempt"], r["node_id"]) for r in history] == \
            [(i, "succeeded", 1, "f1") for i in ids]
        rows = await pool.fetch("SELECT id, status, attempt, node_id FROM forge_jobs")
        assert [(r["id"], r["status"], r["attempt"], r["node_id"]) for r in rows] == [(waiting, "pending", 0, None)]
        assert await pool.fetchval("SELECT status FROM forge_nodes WHERE id = 'f1'") == "stopped"
    finally:
        await pool.close()


async def _claimed_ahead(pool, node_id: str, n: int):
    """Rows leased to ``node_id`` that it claimed ahead and has not started (started_at NULL)."""
    rows = await pool.fetch("SELECT id FROM forge_jobs WHERE status = 'running' AND node_id = $1 "
                            "AND started_at IS NULL ORDER BY id", node_id)
    return [r["id"] for r in rows] if len(rows) >= n else None


async def test_a_killed_worker_s_jobs_claimed_ahead_run_once_and_no_last_attempt_is_lost(forge_processes):
    """SIGKILL a worker holding jobs it claimed ahead: every one of them runs, once, on another
    worker. One on its last attempt gets that attempt back (it never started: a last attempt
    starts only after its start is written) and is not dead-lettered; one with attempts left keeps
    the attempt its claim counted (documented: PostgreSQL cannot tell it from one that started a
    moment before the kill). The two jobs the victim was running, on their last attempt, are
    dead-lettered, as before."""
    pool = await asyncpg.create_pool(forge_processes.db_url, min_size=1, max_size=2)
    try:
        victim = forge_processes(node_config(concurrency=2, prefetch=4), node_id="victim", env=ENV)
        queue = JobQueue(pool)
        # stored at once, so that one claim takes all six: the long jobs (first in claim order)
        # start in the two slots, the other four are claimed ahead behind them
        ids = await queue.enqueue_many(
            [queue.request("long_running", {"seconds": 120}, max_attempts=1) for _ in range(2)]
            + [queue.request("record", {"value": f"last{i}"}, max_attempts=1) for i in range(2)]
            + [queue.request("record", {"value": f"more{i}"}, max_attempts=3) for i in range(2)])
        long, last, more = ids[:2], ids[2:4], ids[4:]
        await eventually(lambda: _started(pool, 2), what="two long jobs to take both slots")
        ahead = await eventually(lambda: _claimed_ahead(pool, "victim", 4), what="four jobs claimed ahead")
        assert sorted(ahead) == sorted(last + more)
        victim.kill()
        forge_processes(node_config(concurrency=4), node_id="rescuer", env=ENV)

        async def ran_once():
            rows = await pool.fetch("SELECT job_id, attempt, node_id FROM job_log WHERE event = 'ran' "
                                    "AND job_id = ANY($1::bigint[]) ORDER BY job_id", ahead)
            return rows if len(rows) >= 4 else None

        rows = await eventually(ran_once, timeout=120, what="the jobs claimed ahead to run on the rescuer")
        assert [(r["job_id"], r["node_id"]) for r in rows] == [(i, "rescuer") for i in sorted(ahead)]
        attempts = {r["job_id"]: r["attempt"] for r in rows}
        assert [attempts[i] for i in last] == [1, 1]  # the last attempt given back, not dead-lettered
        assert [attempts[i] for i in more] == [2, 2]  # the claim's attempt stays counted
        await eventually(lambda: _history_count(pool, 4), what="their results")
        hist = {r["id"]: (r["status"], r["attempt"]) for r in await pool.fetch(
            "SELECT id, status, attempt FROM forge_job_history")}
        assert [hist[i] for i in last + more] == [("succeeded", 1)] * 2 + [("succeeded", 2)] * 2
        dead = await eventually(lambda: _dead(pool, 2), timeout=60, what="the killed long jobs to be dead-lettered")
        assert sorted(dead) == sorted(long)  # they had started, on their last attempt
    finally:
        await pool.close()


async def test_graceful_stop_releases_jobs_claimed_ahead_at_once(forge_processes):
    """SIGTERM: jobs claimed ahead go back to the queue at once - another worker runs them while
    the stopping one still waits for its running jobs - with their attempt not counted."""
    cfg = node_config(concurrency=2, prefetch=4, shutdown_timeout=60.0)
    cfg["node"]["drain_timeout"] = 90.0
    pool = await asyncpg.create_pool(forge_processes.db_url, min_size=1, max_size=2)
    try:
        victim = forge_processes(cfg, node_id="stopping", env=ENV)
        queue = JobQueue(pool)
        ids = await queue.enqueue_many(  # one claim: two start, four are claimed ahead
            [queue.request("long_running", {"seconds": 20}, max_attempts=1) for _ in range(2)]
            + [queue.request("record", {"value": f"a{i}"}, max_attempts=1) for i in range(4)])
        long, ahead = ids[:2], ids[2:]
        await eventually(lambda: _started(pool, 2), what="two long jobs to take both slots")
        assert sorted(await eventually(lambda: _claimed_ahead(pool, "stopping", 4), what="claimed ahead")) == ahead
        forge_processes(node_config(concurrency=4), node_id="other", env=ENV)
        victim.signal(signal.SIGTERM)

        async def ran_elsewhere():
            rows = await pool.fetch("SELECT job_id, attempt, node_id FROM job_log WHERE event = 'ran' "
                                    "AND job_id = ANY($1::bigint[]) ORDER BY job_id", ahead)
            return rows if len(rows) >= 4 else None

        rows = await eventually(ran_elsewhere, timeout=60, what="the released jobs to run on the other worker")
        # the stopping worker is still waiting for its long jobs (20 s, shutdown_timeout 60 s): the
        # jobs claimed ahead did not wait for that, nor for a lease to expire
        assert victim.alive()
        assert [(r["job_id"], r["attempt"], r["node_id"]) for r in rows] == [(i, 1, "other") for i in ahead]
        long_rows = await pool.fetch("SELECT node_id, started_at IS NOT NULL AS started FROM forge_jobs "
                                     "WHERE id = ANY($1::bigint[])", long)
        assert [(r["node_id"], r["started"]) for r in long_rows] == [("stopping", True)] * 2
    finally:
        await pool.close()


async def _history_count(pool, n):
    return await pool.fetchval("SELECT count(*) FROM forge_job_history") >= n


async def _dead(pool, n):
    rows = await pool.fetch("SELECT id FROM forge_jobs WHERE status = 'dead'")
    return [r["id"] for r in rows] if len(rows) >= n else None


async def _started(pool, n):
    return await pool.fetchval("SELECT count(*) FROM job_log WHERE event = 'started'") >= n


async def test_jobs_cli_lists_retries_and_discards(forge_processes, tmp_path):
    pool = await asyncpg.create_pool(forge_processes.db_url, min_size=1, max_size=2)
    node = forge_processes(node_config(), node_id="c1", env=ENV)
    try:
        queue = JobQueue(pool)
        import worker_jobs

        a = await queue.enqueue(worker_jobs.always_fails, {})
        b = await queue.enqueue(worker_jobs.always_fails, {})
        pending = await queue.enqueue("record", {"value": "x"}, delay=3600)
        await eventually(lambda: _dead_count(pool, 2), what="two dead jobs")
        cfg = tmp_path / "cli.toml"
        cfg.write_text(f'[database]\nurl = "{forge_processes.db_url}"\n[app]\nexample = false\n')

        def cli(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "forge_kernel.cli", "--config", str(cfg), "jobs", *args],
                                  capture_output=True, text=True, timeout=60, env={**os.environ, **ENV})

        out = cli("dead")
        assert out.returncode == 0, out.stderr
        assert "always_fails" in out.stdout and str(a) in out.stdout and "ValueError" in out.stdout
        out = cli("retry", str(a))
        assert out.returncode == 0 and "retried 1 job(s)" in out.stdout
        out = cli("discard", str(b), "999999")
        assert out.returncode == 1 and "discarded 1 job(s)" in out.stdout and "999999" in out.stdout
        out = cli("cancel", str(pending))
        assert out.returncode == 0 and f"job {pending}: cancelled" in out.stdout
        out = cli("stats")
        assert out.returncode == 0
        out = cli("show", str(b))
        assert '"status": "discarded"' in out.stdout
        out = cli("retry")
        assert out.returncode == 2 and "give job ids or --all" in out.stdout
    finally:
        node.terminate()
        await pool.close()


async def _dead_count(pool, n):
    return await pool.fetchval("SELECT count(*) FROM forge_jobs WHERE status = 'dead'") >= n

