"""Property: whatever the step graph (sequential and parallel steps, children, sleeps, events,
failing steps) and wherever a worker crashes (before or after a checkpoint is written, in
compensation too), the run ends with the records a crash-free run has, and compensations run
for exactly the completed steps, in reverse order of completion."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forge_worker import WorkflowClient
from forge_worker.workflows import runtime as wfruntime
from forge_worker.workflows.context import LeaseLost

from worker_helpers import workflow_config

import workflow_prop

_names = iter(f"s{i}" for i in range(10**9))


def _step() -> st.SearchStrategy:
    # fail_times: 0 succeeds, 1 succeeds on its retry, 5 fails for good
    return st.tuples(st.just("step"), st.builds(lambda: next(_names)), st.sampled_from([0, 0, 0, 1, 5]))


def _op(depth: int) -> st.SearchStrategy:
    leaf = st.one_of(_step(), _step(), st.tuples(st.just("sleep"), st.sampled_from([0.0, 0.01, 0.4])),
                     st.tuples(st.just("event"), st.sampled_from(["go", "stop"])),
                     st.tuples(st.just("child"), st.integers(0, 3)))
    if depth == 0:
        return leaf
    branch = st.lists(_op(depth - 1), min_size=1, max_size=3)
    return st.one_of(leaf, st.tuples(st.just("par"), st.lists(branch, min_size=2, max_size=3)))


graphs = st.lists(_op(1), min_size=1, max_size=6)


def _events(spec: list) -> list[str]:
    out = []
    for op in spec:
        if op[0] == "event":
            out.append(op[1])
        elif op[0] == "par":
            for branch in op[1]:
                out += _events(branch)
    return out


def _canon(spec) -> list:
    return [list(op) if op[0] != "par" else ["par", [_canon(b) for b in op[1]]] for op in spec]


@pytest.mark.timeout(600)
async def test_crashes_anywhere_end_like_a_crash_free_run(forge_node, monkeypatch):
    node = await forge_node(modules=["workflow_app", "workflow_prop"],
                            config=workflow_config(rescue_interval=0.05, heartbeat_interval=0.1, suspend_after=0.3))
    client = WorkflowClient(node.pool, node.registry)
    loop = asyncio.get_running_loop()
    crash_at: dict[uuid.UUID, tuple[int, bool]] = {}
    seen: dict[uuid.UUID, int] = {}
    crashed: set[uuid.UUID] = set()
    real = wfruntime.Execution.checkpoint

    real_finish = wfruntime.Execution.finish

    async def finish(self, status, result, error, rows=()):
        # the last step's result is written with the run's ending: a crash point like a checkpoint
        if not rows:
            return await real_finish(self, status, result, error, rows)
        return await checkpoint(self, rows, lambda _: real_finish(self, status, result, error, rows))

    async def checkpoint(self, rows, write=None):
        write = write or (lambda rows: real(self, rows))
        plan = crash_at.get(self.run_id)
        if plan is None or self.run_id in crashed:
            return await write(rows)
        seen[self.run_id] = seen.get(self.run_id, 0) + 1
        if seen[self.run_id] < plan[0]:
            return await write(rows)
        crashed.add(self.run_id)
        if plan[1]:  # the write made it, the worker died right after
            await write(rows)
        # the worker is gone: its lease runs out at once, another claim resumes the run
        await node.pool.execute("UPDATE forge_workflow_runs SET lease_until = now() - interval '1 second' "
                                "WHERE id = $1 AND claims = $2", self.run_id, self.claims)
        raise LeaseLost()

    monkeypatch.setattr(wfruntime.Execution, "checkpoint", checkpoint)
    monkeypatch.setattr(wfruntime.Execution, "finish", finish)

    async def run(spec: list, tag: str, crash: tuple[int, bool] | None) -> tuple:
        run_id = await client.start("graph", {"spec": spec, "tag": tag})
        if crash is not None:
            crash_at[uuid.UUID(run_id)] = crash
        for name in _events(spec):
            await client.send_event(run_id, name, {"event": name})
        info = await client.wait(run_id, timeout=60)
        steps = (await client.get(run_id)).steps
        return info, steps

    def records(steps) -> list:
        # a sleep records its wake time, a child its run id: those differ between any two runs
        def value(s):
            if s.kind == "sleep":
                return None
            if s.kind == "event":
                return repr(s.result["payload"])
            return repr(s.result)

        return sorted((s.key, "child" if s.name.startswith("child:") else s.name, s.kind, s.status, value(s))
                      for s in steps if s.kind != "child")

    stats = {"examples": 0, "crashed": 0, "failed": 0}

    async def example(spec: list, crash: tuple[int, bool]) -> None:
        tag = uuid.uuid4().hex[:8]
        clean, clean_steps = await run(spec, "a" + tag, None)
        other, other_steps = await run(spec, "b" + tag, crash)
        stats["examples"] += 1
        stats["crashed"] += other.claims > 1
        stats["failed"] += clean.status == "failed"
        assert (other.status, other.result) == (clean.status, clean.result), (spec, crash, other.error, clean.error)
        assert records(other_steps) == records(clean_steps), (spec, crash)
        for info, steps, t in ((clean, clean_steps, "a" + tag), (other, other_steps, "b" + tag)):
            done = [s.name for s in sorted(steps, key=lambda s: s.finished_at)
                    if s.kind == "step" and s.status == "succeeded"]
            undone = [s.name for s in sorted(steps, key=lambda s: s.finished_at) if s.kind == "compensation"]
            if info.status == "failed":
                assert undone == list(reversed(done)), (spec, crash, done, undone)
                assert workflow_prop.UNDO_ORDER.get(t, [])[-len(done):] == undone if done else True
                assert {n for (tt, n) in workflow_prop.UNDONE if tt == t} == set(done)
            else:
                assert undone == [] and not any(tt == t for (tt, _) in workflow_prop.UNDONE)
        # without a crash every function ran as often as its attempts say, each compensation once
        for s in clean_steps:
            if s.kind == "step":
                assert workflow_prop.RAN[("a" + tag, s.name)] == s.attempts
            if s.kind == "compensation":
                assert workflow_prop.UNDONE[("a" + tag, s.name)] == 1

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(spec=graphs, crash=st.tuples(st.integers(1, 12), st.booleans()))
    def prop(spec, crash):
        asyncio.run_coroutine_threadsafe(example(_canon(spec), crash), loop).result(120)

    await asyncio.to_thread(prop)
    print(f"\nproperty: {stats}")
    assert stats["crashed"] >= 10 and stats["failed"] >= 3, stats
