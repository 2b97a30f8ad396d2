"""Durable workflows in one in-process node: the API, checkpoints, compensation, events,
children, parallel branches, versions, explanations, limits, retries."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest

from forge_kernel import SYSTEM
from forge_kernel.errors import Conflict, ForgeError, InvalidArgument, NotFound
from forge_worker import WorkflowClient

from worker_helpers import eventually, workflow_config

import workflow_app

MODS = ["workflow_app"]


async def _node(forge_node, **wf):
    node = await forge_node(modules=MODS, config=workflow_config(**wf))
    return node, WorkflowClient(node.pool, node.registry)


async def _log(pool, run_id):
    return [(r["step"], r["event"]) for r in await pool.fetch(
        "SELECT step, event FROM wf_log WHERE run_id = $1 ORDER BY seq", str(run_id))]


async def test_three_steps_record_each_result_once_with_a_full_history(forge_node):
    node, client = await _node(forge_node)
    run_id = await client.start(workflow_app.three_steps, {"n": 3})
    info = await client.wait(run_id, timeout=30)
    assert (info.status, info.result, info.error) == ("succeeded", 6, None)
    info = await client.get(run_id)
    assert [(s.key, s.name, s.kind, s.status, s.result, s.attempts) for s in info.steps] == [
        ("1", "add", "step", "succeeded", 4, 1), ("2", "add", "step", "succeeded", 5, 1),
        ("3", "add", "step", "succeeded", 6, 1)]
    assert info.steps[0].args == {"args": [3, 1], "kwargs": {}}
    assert all(s.node_id == node.id and s.started_at <= s.finished_at for s in info.steps)
    assert info.waiting_on is None and info.version == workflow_app.three_steps.__forge__.options["version"]


async def test_start_from_a_mutation_is_visible_exactly_when_it_commits(forge_node):
    node, client = await _node(forge_node)
    with pytest.raises(ForgeError):
        await node.executor.call("place_order", {"key": "order-1", "fail": True}, SYSTEM)
    assert await node.pool.fetchval("SELECT count(*) FROM forge_workflow_runs") == 0
    run_id = await node.executor.call("place_order", {"key": "order-1"}, SYSTEM)
    again = await node.executor.call("place_order", {"key": "order-1"}, SYSTEM)
    assert again == run_id  # same idempotency key, same run
    assert (await client.wait(run_id)).result == 4
    assert await client.start(workflow_app.three_steps, {"n": 1}, idempotency_key="order-1") == run_id
    assert await node.pool.fetchval("SELECT count(*) FROM forge_workflow_runs") == 1


async def test_bad_starts_name_the_problem(forge_node):
    node, client = await _node(forge_node)
    with pytest.raises(InvalidArgument, match="n: required"):
        await client.start(workflow_app.three_steps, {})
    with pytest.raises(InvalidArgument, match="idempotency_key"):
        await client.start(workflow_app.three_steps, {"n": 1}, idempotency_key="")
    with pytest.raises(InvalidArgument, match="reserved"):
        await client.send_event("x", "forge.child:x")
    with pytest.raises(NotFound):
        await client.send_event("no-such-run", "approved")


async def test_a_failed_step_runs_compensations_of_completed_steps_in_reverse(forge_node):
    node, client = await _node(forge_node)
    run_id = await client.start(workflow_app.booking, {"fail_at": 3})
    info = await client.wait(run_id)
    assert info.status == "failed" and "step 'boom' failed" in info.error and "cannot be done" in info.error
    assert await _log(node.pool, run_id) == [("a", "ran"), ("b", "ran"), ("b", "undone"), ("a", "undone")]
    info = await client.get(run_id)
    kinds = [(s.key, s.name, s.kind, s.status, s.attempts) for s in info.steps]
    assert kinds == [("1", "effect", "step", "succeeded", 1), ("2", "effect", "step", "succeeded", 1),
                     ("3", "boom", "step", "failed", 2), ("c:2", "effect", "compensation", "succeeded", 1),
                     ("c:1", "effect", "compensation", "succeeded", 1)]
    assert info.steps[0].compensation["function"] == "app:undo"


async def test_cancel_a_sleeping_run_compensates_and_ends_cancelled(forge_node):
    node, client = await _node(forge_node)
    run_id = await client.start(workflow_app.booking, {"sleep": 30})

    async def asleep():
        info = await client.get(run_id, steps=False)
        return info if info.status == "waiting" else None

    info = await eventually(asleep, what="the run to sleep")
    assert info.waiting_on.startswith("sleeping until ") and info.node_id is None
    assert await client.cancel(run_id) == "requested"
    info = await client.wait(run_id)
    assert info.status == "cancelled"
    assert await _log(node.pool, run_id) == [("a", "ran"), ("a", "undone")]
    with pytest.raises(Conflict):
        await client.cancel(run_id)


async def test_events_sent_before_the_wait_are_kept_and_a_timeout_resumes(forge_node):
    node, client = await _node(forge_node)
    run_id = await client.start(workflow_app.approval, {"timeout": None}, correlation_key="order-7")
    # sent at once: before or while the run begins to wait
    assert await node.executor.call("approve", {"target": "order-7"}, SYSTEM) == 1
    info = await client.wait(run_id)
    assert info.result == {"name": "approved", "payload": {"by": "test"}}
    late = await client.start(workflow_app.approval, {"timeout": 0.5})
    assert (await client.wait(late)).result == {"timed_out": True}
    waiting = await client.start(workflow_app.approval, {"timeout": 60})

    async def waits():
        i = await client.get(waiting, steps=False)
        return i if i.status == "waiting" else None

    info = await eventually(waits, what="the wait")
    assert "waiting for event 'approved' or 'rejected' until" in info.waiting_on
    with pytest.raises(ForgeError):  # rolled back: no event
        await node.executor.call("approve", {"target": waiting, "fail": True}, SYSTEM)
    await asyncio.sleep(0.3)
    assert (await client.get(waiting, steps=False)).status == "waiting"
    await client.send_event(waiting, "rejected", [1, 2])
    assert (await client.wait(waiting)).result == {"name": "rejected", "payload": [1, 2]}


async def test_now_random_uuid_and_step_results_replay_identically_after_a_sleep(forge_node):
    node, client = await _node(forge_node)
    # well past suspend_after (0.3 s) even when recording the sleep is slow: the run parks, resumes by replay
    run_id = await client.start(workflow_app.clocky, {"nap": 1.5})
    info = await client.wait(run_id)
    assert info.status == "succeeded" and info.claims == 2
    rec = {s.kind: s.result for s in (await client.get(run_id)).steps}
    assert info.result["now"] == rec["now"] and info.result["random"] == rec["random"]
    assert info.result["uuid"] == rec["uuid"] and info.result["receipt_type"] == "Receipt"


async def test_parallel_branches_and_child_workflows(forge_node):
    node, client = await _node(forge_node)
    fan = await client.start(workflow_app.fanout, {"n": 4})
    par = await client.start(workflow_app.parent, {"n": 3})
    assert (await client.wait(fan)).result == [110, 111, 112, 113]
    assert (await client.wait(par)).result == [3, 4, 5]
    keys = sorted(s.key for s in (await client.get(fan)).steps)
    assert keys == sorted(f"1.{b}.{i}" for b in range(1, 5) for i in (1, 2))
    children = await client.list(name="three_steps")
    assert len(children) == 3 and all(c.parent_id == par and c.status == "succeeded" for c in children)


async def test_oversized_results_and_exhausted_retries_fail_with_the_reason(forge_node):
    node, client = await _node(forge_node, max_value_bytes=2048)
    big = await client.start(workflow_app.oversized, {"size": 5000})
    info = await client.wait(big)
    assert info.status == "failed"
    assert "workflow oversized, step big: the result cannot be stored" in info.error
    assert "max_value_bytes" in info.error
    flaky = await client.start(workflow_app.flaky_forever, {})
    info = await client.wait(flaky)
    assert info.status == "failed" and "cannot be done" in info.error
    assert [(s.status, s.attempts) for s in (await client.get(flaky)).steps] == [("failed", 3)]


async def test_a_step_failing_with_a_nul_character_fails_its_run_with_the_reason(forge_node):
    """PostgreSQL's text holds no NUL: the step's error is stored with U+FFFD in its place (writing
    it as it was failed on every try, and the run never ended)."""
    node, client = await _node(forge_node)
    info = await client.wait(await client.start(workflow_app.fails_with_nul, {}), timeout=60)
    assert info.status == "failed" and "step x\ufffd cannot be done" in info.error
    assert [(s.status, s.attempts) for s in (await client.get(info.id)).steps] == [("failed", 2)]


async def test_a_failed_run_can_be_retried_from_a_chosen_step(forge_node):
    node, client = await _node(forge_node)
    run_id = await client.start(workflow_app.booking, {"fail_at": 2, "steps": 2})
    assert (await client.wait(run_id)).status == "failed"
    # compensations ran: a plain retry starts over (step 'a' was undone)
    await client.retry(run_id)
    assert (await client.wait(run_id)).status == "failed"
    steps = (await client.get(run_id)).steps
    assert [s.key for s in steps if "~" not in s.key] == ["1", "2", "c:1"]
    assert sorted({s.key.split("~")[1] for s in steps if "~" in s.key}) == ["1"]
    with pytest.raises(InvalidArgument, match="no recorded step"):
        await client.retry(run_id, from_step="nope")
    with pytest.raises(Conflict):
        await client.retry(await client.start(workflow_app.approval, {}))


async def test_concurrency_limit_holds_cluster_wide_and_queued_runs_explain_why(forge_node):
    node, client = await _node(forge_node)
    ids = [await client.start(workflow_app.one_at_a_time, {"hold": 0.6}) for _ in range(3)]

    async def one_running():
        infos = [await client.get(i, steps=False) for i in ids]
        running = [i for i in infos if i.status == "running"]
        return infos if len(running) == 1 and any(i.status == "pending" for i in infos) else None

    infos = await eventually(one_running, what="one running, others held")
    held = [i for i in infos if i.status == "pending"]
    assert all("concurrency limit of one_at_a_time (1 of 1 running)" in i.waiting_on for i in held)
    running = next(i for i in infos if i.status == "running")
    assert running.waiting_on.startswith(f"running on worker {node.id}, which holds its lease until")
    for i in ids:
        assert (await client.wait(i)).status == "succeeded"
    spans = await node.pool.fetch("""SELECT started_at, finished_at FROM forge_workflow_steps
                                     WHERE run_id = ANY($1::uuid[]) ORDER BY started_at""", ids)
    assert all(a["finished_at"] <= b["started_at"] for a, b in zip(spans, spans[1:]))


async def test_a_job_starts_a_run_once_whatever_its_attempts(forge_node):
    from forge_worker import JobQueue

    node, client = await _node(forge_node)
    queue = JobQueue(node.pool)
    for _ in range(2):  # the same job run twice (as a retry would) starts one run
        await queue.enqueue(workflow_app.kick_off, {"key": "from-a-job"})

    async def started():
        runs = await client.list(name="three_steps")
        return runs if runs and runs[0].status == "succeeded" else None

    runs = await eventually(started, what="the run the job started")
    assert len(runs) == 1 and runs[0].result == 13 and runs[0].idempotency_key == "from-a-job"


async def test_retry_from_a_chosen_step_keeps_the_steps_before_it(forge_node):
    node, client = await _node(forge_node)
    run_id = await client.start(workflow_app.booking, {"fail_at": 3})
    assert (await client.wait(run_id)).status == "failed"
    await client.retry(run_id, from_step="2")  # step 1 ('a') keeps its record; 2 and later run again
    info = await client.wait(run_id)
    assert info.status == "failed"
    steps = (await client.get(run_id)).steps
    live = [(s.key, s.claim) for s in steps if "~" not in s.key]
    assert live[0] == ("1", 1) and all(claim == 2 for key, claim in live[1:]), live
    assert sorted(s.key for s in steps if "~" in s.key) == ["2~1", "3~1", "c:1~1", "c:2~1"]
    assert await _log(node.pool, run_id) == [("a", "ran"), ("b", "ran"), ("b", "undone"), ("a", "undone"),
                                             ("b", "ran"), ("b", "undone"), ("a", "undone")]


async def test_recovery_and_retention_chores_run_from_any_node(forge_node):
    from forge_worker.service import maintenance_tasks

    node, client = await _node(forge_node)
    tasks = {t.name: t for t in maintenance_tasks(node)}
    ghost = await client.start(workflow_app.three_steps, {"n": 1}, delay=3600)
    # a run held by a worker that vanished: its lease ran out
    await node.pool.execute("""UPDATE forge_workflow_runs SET status = 'running', node_id = 'ghost', claims = 1,
                                      lease_until = now() - interval '1 second' WHERE id = $1""", ghost)
    async with node.pool.acquire() as conn:
        assert await tasks["workflows.recover_runs"].run(conn) == 1
    info = await client.wait(ghost)
    assert (info.status, info.recoveries, info.claims) == ("succeeded", 1, 2)
    await node.pool.execute("UPDATE forge_workflow_runs SET finished_at = now() - interval '30 days'")
    async with node.pool.acquire() as conn:
        assert await tasks["workflows.retention"].run(conn) == 1
    assert await client.get(ghost) is None
    assert await node.pool.fetchval("SELECT count(*) FROM forge_workflow_steps WHERE run_id = $1", ghost) == 0


async def test_a_lost_write_is_not_a_failed_workflow(forge_node, monkeypatch):
    """A checkpoint the runtime could not write (connection lost, statement aborted) leaves the
    run to be resumed after its lease; it never fails the run or runs its compensations."""
    import asyncpg

    from forge_worker.workflows import runtime as wfruntime

    node, client = await _node(forge_node, lease=1.0, rescue_interval=0.2)
    real = wfruntime.Execution.checkpoint
    broken: set = set()

    real_finish = wfruntime.Execution.finish

    async def checkpoint(self, rows):
        if rows[-1][0] == "3" and self.run_id not in broken:  # the third step's write is lost once
            broken.add(self.run_id)
            raise asyncpg.InterfaceError("connection lost (injected)")
        return await real(self, rows)

    async def finish(self, status, result, error, rows=()):
        if rows:  # the last step's result is written with the run's ending
            await checkpoint(self, rows)
        return await real_finish(self, status, result, error, rows)

    monkeypatch.setattr(wfruntime.Execution, "checkpoint", checkpoint)
    monkeypatch.setattr(wfruntime.Execution, "finish", finish)
    run_id = await client.start(workflow_app.booking, {})
    info = await client.wait(run_id)
    assert (info.status, info.claims, info.recoveries) == ("succeeded", 2, 1), info
    assert await _log(node.pool, run_id) == [("a", "ran"), ("b", "ran"), ("c", "ran"), ("c", "ran")]


async def test_the_last_step_is_recorded_with_the_end_of_the_run_in_one_statement(forge_node, monkeypatch):
    """Before: a 3-step run wrote 3 checkpoints and then its ending (4 statements); the last
    step's result now goes with the ending, and every earlier one before the next step starts."""
    from forge_worker.workflows import runtime as wfruntime

    node, client = await _node(forge_node)
    writes: list[tuple] = []
    real, real_finish = wfruntime.Execution.checkpoint, wfruntime.Execution.finish

    async def checkpoint(self, rows):
        writes.append(("checkpoint", [r[0] for r in rows]))
        return await real(self, rows)

    async def finish(self, status, result, error, rows=()):
        writes.append((status, [r[0] for r in rows]))
        return await real_finish(self, status, result, error, rows)

    monkeypatch.setattr(wfruntime.Execution, "checkpoint", checkpoint)
    monkeypatch.setattr(wfruntime.Execution, "finish", finish)
    run_id = await client.start(workflow_app.three_steps, {"n": 3})
    info = await client.wait(run_id, timeout=30)
    assert (info.status, info.result) == ("succeeded", 6)
    assert writes == [("checkpoint", ["1"]), ("checkpoint", ["2"]), ("succeeded", ["3"])]
    info = await client.get(run_id)
    assert [(s.key, s.status, s.result) for s in info.steps] == [("1", "succeeded", 4), ("2", "succeeded", 5),
                                                                 ("3", "succeeded", 6)]
    assert info.steps[-1].finished_at <= info.finished_at


async def test_a_step_starts_only_once_everything_before_it_is_committed(forge_node):
    """A step's result is written when the next operation starts (or with the run's ending):
    what a step sees in the database already holds every earlier record, parallel branches and
    recorded values included."""
    node, client = await _node(forge_node)
    run_id = await client.start(workflow_app.sees_its_history, {})
    info = await client.wait(run_id, timeout=30)
    assert info.status == "succeeded", info.error
    first, then = info.result
    assert first == ["1"]
    assert sorted(then) == ["1", "2", "3.1.1", "3.2.1", "4"]
    keys = [s.key for s in (await client.get(run_id)).steps]
    assert sorted(keys) == ["1", "2", "3.1.1", "3.2.1", "4", "5", "6"]


async def test_a_claim_walks_the_due_index_even_when_statistics_predate_a_burst(forge_node):
    """Before: statistics taken while few runs were due made every claim read all due runs and
    sort them (20 ms per claim with 20,000 due in bench/workflows) until autovacuum analyzed the
    table again; the claim now walks the due index in run_at order and stops at its limit."""
    from forge_worker.workflows import runtime as wfruntime
    from forge_worker.workflows import store

    node, _ = await _node(forge_node)
    async with node.pool.acquire() as conn:
        await conn.execute("ANALYZE forge_workflow_runs")
        await conn.execute("""INSERT INTO forge_workflow_runs (id, name, status, run_at)
                              SELECT gen_random_uuid(), 'burst_not_here', 'pending', now() - interval '1 minute'
                              FROM generate_series(1, 5000)""")
        try:
            plan = "\n".join(r[0] for r in await wfruntime.claim(
                conn, "EXPLAIN " + store.CLAIM, "n1", 30.0, ["burst_not_here"], [], 50))
        finally:
            await conn.execute("DELETE FROM forge_workflow_runs WHERE name = 'burst_not_here'")
    assert "Index Scan using forge_workflow_runs_due" in plan and "Sort" not in plan, plan


async def test_a_run_acts_as_whoever_started_it(forge_node):
    from forge_kernel.executor import Auth

    node, client = await _node(forge_node)
    alice = Auth.for_user("alice", roles=["buyer"])
    run_id = await node.executor.call("start_who_runs", {}, alice)
    assert (await client.wait(run_id)).result == {"user_id": "alice", "kind": "user", "roles": ["buyer"]}
    plain = await client.start(workflow_app.who_runs, {})  # plain Python: the system, as for jobs
    assert (await client.wait(plain)).result["kind"] == "system"


def test_a_compensation_read_back_resolves_only_to_functions_of_the_apps_modules():
    """A compensation is stored as ``module:qualname``; a row written by hand must not make the
    worker import or call anything outside the app (``os:system`` and the like)."""
    from forge_worker.workflows.context import resolve_ref

    assert resolve_ref("workflow_app:add", MODS) is workflow_app.add
    for ref in ["os:system", "subprocess:run", "workflow_app:asyncio.sleep", "workflow_app:dt.datetime",
                "workflow_app:__builtins__", "workflow_app:"]:
        with pytest.raises(LookupError):
            resolve_ref(ref, MODS)


async def test_a_pool_the_worker_loops_would_take_whole_is_refused_at_start(forge_node):
    """Before: with workflows registered and [database] pool_max = 8, the loops held all 8
    connections for the node's life; the node never became ready and logged nothing."""
    from forge_kernel import StartupError

    cfg = workflow_config()
    cfg["database"] = {"pool_min": 1, "pool_max": 5}
    with pytest.raises(StartupError, match=r"\[database\] pool_max = 5 is too small for this worker: .* set "
                                           r"pool_max to at least 7"):
        await forge_node(modules=MODS, config=cfg)
    cfg["database"] = {"pool_min": 1, "pool_max": 8}  # one writer fits: the node starts and runs a workflow
    node = await forge_node(modules=MODS, config=cfg)
    client = WorkflowClient(node.pool, node.registry)
    run_id = await client.start(workflow_app.clocky, {"nap": 0.0})
    assert (await client.wait(run_id)).status == "succeeded"
