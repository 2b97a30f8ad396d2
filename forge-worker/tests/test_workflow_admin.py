"""The workflow operator actions (``forge_admin_actions``: workflow.cancel, workflow.retry,
workflow.send_event) as an operator tool runs them: through the hook, on one connection inside the
tool's transaction, against an in-process node that does the work they ask for."""

from __future__ import annotations

import uuid

import pytest

from forge_kernel.admin import collect
from forge_kernel.errors import InvalidArgument, NotFound
from forge_worker import WorkflowClient

from worker_helpers import eventually, workflow_config

import workflow_app


async def _setup(forge_node):
    node = await forge_node(modules=["workflow_app"], config=workflow_config())
    actions = collect(node.loader.hook.forge_admin_actions(node=node))
    return node, WorkflowClient(node.pool, node.registry), actions


async def _run(node, action, targets, params=None):
    """As the dashboard runs it: one transaction, rolled back when the action raises."""
    async with node.pool.acquire() as conn:
        async with conn.transaction():
            return await action.run(conn, targets, params or {}, "test-operator")


async def _status(client, run_id, want):
    async def reached():
        info = await client.get(run_id, steps=False)
        return info if info.status == want else None
    return await eventually(reached, what=f"run {run_id} {want}")


async def test_cancel_compensates_and_a_second_cancel_changes_nothing(forge_node):
    node, client, actions = await _setup(forge_node)
    cancel = actions["workflow.cancel"]
    run_id = await client.start(workflow_app.booking, {"sleep": 30})
    await _status(client, run_id, "waiting")
    done = await _run(node, cancel, [run_id])
    assert done.affected == 1 and done.before == [{"id": run_id, "name": "booking", "status": "waiting"}]
    assert done.after[0]["cancel_requested"] is True
    # asked already (compensating or being stopped): the same request again changes nothing
    assert (await _run(node, cancel, [run_id])).affected == 0
    info = await client.wait(run_id, timeout=30)
    assert info.status == "cancelled"
    assert [(r["step"], r["event"]) for r in await node.pool.fetch(
        "SELECT step, event FROM wf_log WHERE run_id = $1 ORDER BY seq", run_id)] == [("a", "ran"), ("a", "undone")]
    assert (await _run(node, cancel, [run_id])).affected == 0  # ended: left alone
    with pytest.raises(NotFound, match="no workflow run"):
        await _run(node, cancel, [str(uuid.uuid4())])
    with pytest.raises(InvalidArgument, match="a workflow run id is a UUID, got 'order-7'"):
        await _run(node, cancel, ["order-7"])


async def test_retry_from_a_step_keeps_the_steps_before_it_and_is_idempotent(forge_node):
    node, client, actions = await _setup(forge_node)
    retry = actions["workflow.retry"]
    run_id = await client.start(workflow_app.booking, {"fail_at": 3})
    assert (await client.wait(run_id, timeout=30)).status == "failed"
    with pytest.raises(InvalidArgument, match="no recorded step 'nope'"):
        await _run(node, retry, [run_id], {"from_step": "nope"})
    assert (await client.get(run_id, steps=False)).status == "failed"  # rolled back
    done = await _run(node, retry, [run_id], {"from_step": "2"})
    assert done.affected == 1 and done.before[0]["status"] == "failed"
    assert done.after[0] == {"id": run_id, "name": "booking", "status": "pending", "from_step": "2"}
    assert (await _run(node, retry, [run_id], {"from_step": "2"})).affected == 0  # pending now: left alone
    assert (await client.wait(run_id, timeout=30)).status == "failed"  # step 3 fails for good again
    keys = [s.key for s in (await client.get(run_id)).steps]
    assert "1" in keys and "1~1" not in keys and {"2~1", "3~1"} <= set(keys), keys
    with pytest.raises(InvalidArgument, match="from_step"):
        await _run(node, retry, [run_id], {"from_step": 7})


async def test_send_event_reaches_a_waiting_run_by_correlation_key(forge_node):
    node, client, actions = await _setup(forge_node)
    send = actions["workflow.send_event"]
    run_id = await client.start(workflow_app.approval, {"timeout": 60}, correlation_key=f"order-{uuid.uuid4().hex}")
    info = await _status(client, run_id, "waiting")
    with pytest.raises(InvalidArgument, match="params.event"):
        await _run(node, send, [run_id], {"payload": 1})
    with pytest.raises(NotFound, match="no live workflow run"):
        await _run(node, send, ["no-such-key"], {"event": "approved"})
    done = await _run(node, send, [info.correlation_key], {"event": "approved", "payload": {"by": "ops"}})
    assert done.affected == 1 and done.after == [{"target": info.correlation_key, "event": "approved", "runs": 1}]
    assert (await client.wait(run_id, timeout=30)).result == {"name": "approved", "payload": {"by": "ops"}}
    with pytest.raises(NotFound):  # the run has ended: no live run takes events
        await _run(node, send, [run_id], {"event": "approved"})
