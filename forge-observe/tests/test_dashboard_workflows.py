"""The dashboard's workflow actions against real forge-node processes (cancel with compensations,
send an event a waiting run takes, retry from a chosen step until the run succeeds: rows checked
in PostgreSQL, every action audited, none for read-only), and every kind of action through a
leader failover: the scheduler leader SIGKILLed, the actions posted to the surviving node."""

from __future__ import annotations

import asyncio
import json

from dash_support import ADMIN_KEY, ENV, READ_KEY, client, config, db
from forge_kernel.testing.procs import eventually


async def _start(c, item: str, flag) -> str:
    r = await c.post("/rpc/start_order", json={"item": item, "paid_flag": str(flag)})
    assert r.status_code == 200, r.text
    return r.json()["data"]


async def _status(conn, run_id: str, want: str) -> None:
    async def reached():
        return await conn.fetchval("SELECT status FROM forge_workflow_runs WHERE id = $1::uuid", run_id) == want
    await eventually(reached, timeout=40, what=f"run {run_id} {want}")


async def _steps(conn, run_id: str) -> dict[str, tuple]:
    return {r["key"]: (r["name"], r["kind"], r["status"], r["finished_at"]) for r in await conn.fetch(
        "SELECT key, name, kind, status, finished_at FROM forge_workflow_steps WHERE run_id = $1::uuid", run_id)}


async def test_workflow_actions_change_the_rows_and_are_audited(forge_processes, tmp_path):
    p = forge_processes(config(secured=True), env=ENV)
    conn = await db(forge_processes.db_url)
    try:
        async with client(p, ADMIN_KEY) as admin, client(p, READ_KEY) as reader:
            lamp, desk = await _start(admin, "lamp", tmp_path / "lamp-paid"), await _start(admin, "desk", tmp_path / "x")
            for run_id in (lamp, desk):
                await _status(conn, run_id, "waiting")

            # the buttons: the admin sees them on the list and the run page, read-only sees none
            page = (await admin.get("/_forge/workflows")).text
            assert f'data-run="{lamp}"' in page and 'data-action="workflow.cancel"' in page
            assert 'hx-post="/_forge/api/actions/workflow.send_event"' in page
            run_page = (await admin.get(f"/_forge/workflows/{lamp}")).text
            assert 'name="json.payload"' in run_page and 'data-action="workflow.cancel"' in run_page
            for path in ("/_forge/workflows", f"/_forge/workflows/{lamp}"):
                text = (await reader.get(path)).text
                assert "data-action=" not in text and "/api/actions/" not in text, path
            assert (await reader.post("/_forge/api/actions/workflow.cancel", json={"targets": [desk]})).status_code == 403
            assert (await admin.get(f"/_forge/api/workflows/{lamp}")).json()["run"]["status"] == "waiting"

            # cancel: the reservation is released (a compensation row), the run ends cancelled; again: 0
            r = await admin.post("/_forge/api/actions/workflow.cancel", json={"targets": [desk]})
            assert r.status_code == 200 and r.json()["affected"] == 1, r.text
            assert await conn.fetchval("SELECT cancel_requested FROM forge_workflow_runs WHERE id = $1::uuid", desk)
            assert (await admin.post("/_forge/api/actions/workflow.cancel", json={"targets": [desk]})).json()["affected"] == 0
            await _status(conn, desk, "cancelled")
            assert ("reserve", "compensation", "succeeded") in [s[:3] for s in (await _steps(conn, desk)).values()]
            r = await admin.post("/_forge/api/actions/workflow.cancel", json={"targets": ["not-a-uuid"]})
            assert r.status_code == 400 and "'not-a-uuid'" in r.json()["error"]["message"]
            r = await admin.post("/_forge/api/actions/workflow.cancel", json={"targets": [lamp[:-4] + "0000"]})
            assert r.status_code == 404

            # send an event from the run page's form (by correlation key): the waiting run takes it,
            # then its charge fails (no payment yet) and it ends failed
            form = {"target": "order-lamp", "param.event": "approved", "json.payload": "{\"by\": \"ann\"}"}
            bad = await admin.post("/_forge/api/actions/workflow.send_event", data={**form, "json.payload": "{by"},
                                   headers={"HX-Request": "true"})
            assert bad.status_code == 400 and "payload: malformed JSON" in bad.text
            sent = await admin.post("/_forge/api/actions/workflow.send_event", data=form, headers={"HX-Request": "true"})
            assert sent.status_code == 200 and "sent to 1 run(s)" in sent.text, sent.text
            assert await conn.fetchval("SELECT payload FROM forge_workflow_events WHERE run_id = $1::uuid AND "
                                       "name = 'approved'", lamp) == {"by": "ann"}
            await _status(conn, lamp, "failed")
            before = await _steps(conn, lamp)
            charge = next(k for k, s in before.items() if s[0] == "charge")
            assert before[charge][2] == "failed"

            # retry from the charge step, now paid: the steps before it keep their records, the run succeeds
            (tmp_path / "lamp-paid").write_text("paid")
            body = {"targets": [lamp], "params": {"from_step": charge}}
            r = await admin.post("/_forge/api/actions/workflow.retry", json=body)
            assert r.status_code == 200 and r.json()["affected"] == 1, r.text
            assert (await admin.post("/_forge/api/actions/workflow.retry", json=body)).json()["affected"] == 0
            await _status(conn, lamp, "succeeded")
            assert await conn.fetchval("SELECT result FROM forge_workflow_runs WHERE id = $1::uuid", lamp) == {
                "approved_by": {"by": "ann"}, "paid": "charged lamp"}
            after = await _steps(conn, lamp)
            kept = [k for k, s in before.items() if s[1] == "step" and s[0] == "reserve"]
            assert kept and all(after[k] == before[k] for k in kept)  # recorded once, not run again
            assert after[f"{charge}~1"][2] == "failed" and after[charge][2] == "succeeded"

            session = (await admin.get("/_forge/api/session")).json()
            assert session["action_params"]["workflow.retry"] == ["from_step"]
            audit = [a for a in (await admin.get("/_forge/api/audit")).json()["rows"] if a["action"].startswith("workflow.")]
            done = {(a["action"], a["affected"]) for a in audit if a["outcome"] == "ok"}
            assert {("workflow.cancel", 1), ("workflow.cancel", 0), ("workflow.send_event", 1),
                    ("workflow.retry", 1), ("workflow.retry", 0)} <= done, audit
            retry = next(a for a in audit if a["action"] == "workflow.retry" and a["affected"] == 1)
            assert retry["who"] == "apikey:ops" and retry["params"] == {"from_step": charge}
            assert retry["before"][0]["status"] == "failed" and retry["after"][0]["status"] == "pending"
            assert any(a["outcome"] == "error" and a["action"] == "workflow.cancel" for a in audit)
    finally:
        await conn.close()


async def test_actions_work_through_a_leader_failover(forge_processes, tmp_path):
    """Two nodes; the scheduler leader is SIGKILLed; a cron trigger, a queue pause, a workflow
    cancel and a drain posted to the survivor all take effect (the trigger runs once it leads)."""
    cfg = config(secured=True)
    cfg["scheduler"] = {"election_interval": 1.0}
    nodes = [forge_processes(cfg, env=ENV), forge_processes(cfg, env=ENV)]
    conn = await db(forge_processes.db_url)
    try:
        leader_id = await eventually(lambda: conn.fetchval("SELECT node_id FROM forge_leaders WHERE name = 'scheduler'"),
                                     what="a scheduler leader")
        leader = next(n for n in nodes if n.node_id == leader_id)
        survivor = next(n for n in nodes if n is not leader)
        await eventually(lambda: conn.fetchval("SELECT count(*) FROM forge_cron_state WHERE cron = 'nightly_cleanup'"),
                         what="the leader registers the cron")
        async with client(survivor, ADMIN_KEY) as c:
            run_id = await _start(c, "chair", tmp_path / "never-paid")
            await _status(conn, run_id, "waiting")

            leader.kill()
            await asyncio.to_thread(leader.proc.wait, 30)
            # usually no node leads yet (the survivor tries the lock every second): shown, not asserted
            print(f"\nsurvivor leads when the actions are posted: {await _leads(conn, survivor.node_id)}")
            r = await c.post("/_forge/api/actions/cron.trigger", json={"targets": ["nightly_cleanup"]})
            assert r.status_code == 200 and r.json()["affected"] == 1, r.text
            r = await c.post("/_forge/api/actions/queue.pause", json={"targets": ["mail"]})
            assert r.status_code == 200 and r.json()["affected"] == 1, r.text
            r = await c.post("/_forge/api/actions/workflow.cancel", json={"targets": [run_id]})
            assert r.status_code == 200 and r.json()["affected"] == 1, r.text
            assert await conn.fetchval("SELECT count(*) FROM forge_worker_queue_pauses WHERE queue = 'mail'") == 1

            await eventually(lambda: _leads(conn, survivor.node_id), timeout=40, what="the survivor leads")
            await eventually(lambda: conn.fetchval("SELECT count(*) FROM forge_cron_runs WHERE cron = 'nightly_cleanup' "
                                                   "AND kind = 'manual' AND status = 'succeeded'"),
                             timeout=40, what="the triggered cron run, by the new leader")
            await _status(conn, run_id, "cancelled")
            assert await conn.fetchval("SELECT count(*) FROM forge_workflow_steps WHERE run_id = $1::uuid AND "
                                       "kind = 'compensation' AND status = 'succeeded'", run_id) == 1

            r = await c.post("/_forge/api/actions/node.drain", json={"targets": [survivor.node_id]})
            assert r.status_code == 200 and r.json()["affected"] == 1, r.text
            audit = [a["action"] for a in (await c.get("/_forge/api/audit")).json()["rows"]]
            assert {"cron.trigger", "queue.pause", "workflow.cancel", "node.drain"} <= set(audit)
        await eventually(lambda: asyncio.sleep(0, not survivor.alive()), timeout=40, what="the drained survivor exits")
        assert survivor.proc.returncode == 0
        assert await conn.fetchval("SELECT status FROM forge_nodes WHERE id = $1", survivor.node_id) == "stopped"
    finally:
        await conn.close()


async def _leads(conn, node_id: str) -> bool:
    return await conn.fetchval("SELECT node_id FROM forge_leaders WHERE name = 'scheduler'") == node_id
