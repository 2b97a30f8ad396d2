"""The admin dashboard over HTTP against real forge-node processes: every page and its JSON twin,
actions changing rows (one by one and on a whole filter, idempotent, audited), the safety rules
(credentials, read-only, CSRF, loopback, no secrets) and the shared live snapshot."""

from __future__ import annotations

import asyncio
import re
import time
import uuid

import httpx
import pytest

from dash_support import ADMIN_KEY, ENV, JWT_SECRET, READ_KEY, base_url, client, config, db, seed_jobs
from forge_kernel.testing.procs import eventually

PAGES = ["", "functions", "jobs", "queues", "crons", "realtime", "logs", "traces", "nodes", "migrations", "alerts",
         "audit"]


async def _csrf(c: httpx.AsyncClient) -> str:
    page = await c.get("/_forge/")
    assert page.status_code == 200, page.text[:500]
    return re.search(r'"X-CSRF-Token": "([^"]+)"', page.text).group(1)


async def test_pages_twins_and_actions_open_on_loopback(forge_processes):
    """No credential configured: loopback only, says so; every page and twin answers; each action
    changes its row, is audited, and a repeated request (same key) acts once."""
    p = forge_processes(config(secured=False), env=ENV)
    conn = await db(forge_processes.db_url)
    try:
        ids = await seed_jobs(conn)
        async with client(p) as c:
            for page in PAGES:
                r = await c.get(f"/_forge/{page}")
                assert r.status_code == 200, (page, r.text[:500])
                assert "answers loopback clients only" in r.text
                twin = await c.get(f"/_forge/api/{page or 'overview'}")
                assert twin.status_code == 200 and twin.headers["content-type"].startswith("application/json"), page
            assert (await c.get(f"/_forge/jobs/{ids['dead'][0]}")).status_code == 200
            # a log search says how far back it searched (a long one stops within its budget: see
            # test_log_search_walks_back_a_stretch_at_a_time_and_continues)
            search = {"text": "no line says this", "since": "7d"}
            assert "Newest 200 lines of the window" in (await c.get("/_forge/logs", params=search)).text
            twin = (await c.get("/_forge/api/logs", params=search)).json()
            assert twin["rows"] == [] and twin["searched"]["complete"] and twin["continue_until"] is None, twin
            assert (await c.get(f"/_forge/api/jobs/{ids['dead'][0]}")).json()["job"]["status"] == "dead"
            # a request through a proxy or for another host name is refused in this mode
            assert (await c.get("/_forge/", headers={"X-Forwarded-For": "203.0.113.9"})).status_code == 403
            assert (await c.get("/_forge/", headers={"Host": "evil.example"})).status_code == 403

            csrf = await _csrf(c)
            h = {"X-CSRF-Token": csrf}
            # POST without the CSRF token: refused, nothing changed
            r = await c.post("/_forge/api/actions/job.retry", json={"targets": [str(ids["dead"][0])]})
            assert r.status_code == 403
            assert await conn.fetchval("SELECT status FROM forge_jobs WHERE id = $1", ids["dead"][0]) == "dead"

            # the mail queue paused first: a retried job then stays pending (no worker claims it)
            r = await c.post("/_forge/api/actions/queue.pause", json={"targets": ["mail"]}, headers=h)
            assert r.json()["affected"] == 1
            assert await conn.fetchval("SELECT count(*) FROM forge_worker_queue_pauses WHERE queue = 'mail'") == 1
            r = await c.post("/_forge/api/actions/queue.pause", json={"targets": ["mail"]}, headers=h)
            assert r.json()["affected"] == 0  # already paused
            key = uuid.uuid4().hex
            r = await c.post("/_forge/api/actions/job.retry", json={"targets": [str(ids["dead"][0])],
                                                                    "idempotency_key": key}, headers=h)
            assert r.status_code == 200 and r.json()["affected"] == 1, r.text
            assert await conn.fetchval("SELECT status FROM forge_jobs WHERE id = $1", ids["dead"][0]) == "pending"
            again = await c.post("/_forge/api/actions/job.retry", json={"targets": [str(ids["dead"][0])],
                                                                        "idempotency_key": key}, headers=h)
            assert again.json()["replayed"] is True

            r = await c.post("/_forge/api/actions/job.discard", json={"targets": [str(ids["dead"][1])]}, headers=h)
            assert r.json()["affected"] == 1
            assert await conn.fetchval("SELECT status FROM forge_job_history WHERE id = $1", ids["dead"][1]) == "discarded"
            r = await c.post("/_forge/api/actions/job.cancel", json={"targets": [str(ids["scheduled"][0])]}, headers=h)
            assert r.json()["affected"] == 1
            assert await conn.fetchval("SELECT status FROM forge_job_history WHERE id = $1", ids["scheduled"][0]) == "cancelled"


            await eventually(lambda: conn.fetchval("SELECT count(*) FROM forge_cron_state WHERE cron = 'nightly_cleanup'"),
                             what="the leader registers the cron")
            r = await c.post("/_forge/api/actions/cron.pause", json={"targets": ["nightly_cleanup"]}, headers=h)
            assert r.json()["affected"] == 1
            assert await conn.fetchval("SELECT paused FROM forge_cron_state WHERE cron = 'nightly_cleanup'") is True
            r = await c.post("/_forge/api/actions/cron.resume", json={"targets": ["nightly_cleanup"]}, headers=h)
            assert await conn.fetchval("SELECT paused FROM forge_cron_state WHERE cron = 'nightly_cleanup'") is False
            r = await c.post("/_forge/api/actions/cron.trigger", json={"targets": ["nightly_cleanup"]}, headers=h)
            assert r.json()["affected"] == 1
            await eventually(lambda: conn.fetchval("SELECT count(*) FROM forge_cron_runs WHERE cron = 'nightly_cleanup' "
                                                   "AND kind = 'manual'"), what="the triggered run")
            r = await c.post("/_forge/api/actions/cron.trigger", json={"targets": ["no_such_cron"]}, headers=h)
            assert r.status_code == 404 and "nightly_cleanup" in r.json()["error"]["message"]

            # a whole filter: the count first (capped), then the action, idempotent by its key
            await conn.execute("UPDATE forge_jobs SET status = 'dead' WHERE id = ANY($1::bigint[])", ids["dead"][2:])
            pre = (await c.post("/_forge/api/bulk/retry", json={"status": "dead", "queue": "mail"}, headers=h)).json()
            assert pre["count"] == len(ids["dead"][2:]) and pre["capped"] is False
            key = uuid.uuid4().hex
            body = {"status": "dead", "queue": "mail", "confirm": "1", "idempotency_key": key}
            done = (await c.post("/_forge/api/bulk/retry", json=body, headers=h)).json()
            assert done["affected"] == pre["count"]
            assert (await c.post("/_forge/api/bulk/retry", json=body, headers=h)).json()["replayed"] is True

            await asyncio.sleep(1)  # several claim rounds: the paused queue's jobs stay put
            assert await conn.fetchval("SELECT count(*) FROM forge_jobs WHERE queue = 'mail' AND status = 'pending'") >= 2
            r = await c.post("/_forge/api/actions/queue.resume", json={"targets": ["mail"]}, headers=h)
            assert r.json()["affected"] == 1
            await eventually(lambda: conn.fetchval("SELECT count(*) = 0 FROM forge_jobs WHERE queue = 'mail' "
                                                   "AND status = 'pending'"), what="the resumed queue's jobs run")

            audit = (await c.get("/_forge/api/audit")).json()["rows"]
            assert {"job.retry", "job.discard", "job.cancel", "queue.pause", "queue.resume", "cron.pause",
                    "cron.resume", "cron.trigger"} <= {a["action"] for a in audit}
            retry = next(a for a in audit if a["action"] == "job.retry" and a["filter"] is None)
            assert retry["who"] == "loopback" and retry["before"][0]["status"] == "dead"
            assert retry["after"][0]["status"] == "pending" and retry["affected"] == 1
            assert any(a["outcome"] == "error" and a["action"] == "cron.trigger" for a in audit)
            page = await c.get("/_forge/audit")
            assert "job.retry" in page.text

            # drain: the node finishes and exits 0
            r = await c.post("/_forge/api/actions/node.drain", json={"targets": [p.node_id]}, headers=h)
            assert r.json()["affected"] == 1
        await eventually(lambda: asyncio.sleep(0, not p.alive()), timeout=40, what="the drained node exits")
        assert p.proc.returncode == 0
        assert await conn.fetchval("SELECT status FROM forge_nodes WHERE id = $1", p.node_id) == "stopped"
    finally:
        await conn.close()


async def test_credentials_roles_csrf_and_no_secrets(forge_processes):
    p = forge_processes(config(secured=True), env=ENV)
    conn = await db(forge_processes.db_url)
    try:
        ids = await seed_jobs(conn)
        async with client(p) as anon, client(p, ADMIN_KEY) as admin, client(p, READ_KEY) as reader:
            for page in PAGES:
                r = await anon.get(f"/_forge/{page}")
                assert r.status_code == 303 and r.headers["location"] == "/_forge/login", page
                assert (await anon.get(f"/_forge/api/{page or 'overview'}")).status_code == 401
                assert (await admin.get(f"/_forge/{page}")).status_code == 200, page
                assert (await reader.get(f"/_forge/api/{page or 'overview'}")).status_code == 200, page
            bad = await anon.get("/_forge/api/overview", headers={"X-API-Key": "wrong-key"})
            assert bad.status_code == 401

            # read-only: no action buttons anywhere, 403 on every POST
            for page in ("jobs", "queues", "crons", "nodes", f"jobs/{ids['dead'][0]}"):
                text = (await reader.get(f"/_forge/{page}")).text
                assert "data-action=" not in text and "data-bulk=" not in text, page
                assert "data-action=" in (await admin.get(f"/_forge/{page}")).text or page == "crons", page
            for path, body in (("/_forge/api/actions/job.retry", {"targets": [str(ids["dead"][0])]}),
                               ("/_forge/api/bulk/retry", {"status": "dead"}),
                               ("/_forge/api/actions/node.drain", {"targets": [p.node_id]})):
                assert (await reader.post(path, json=body)).status_code == 403, path
            assert await conn.fetchval("SELECT status FROM forge_jobs WHERE id = $1", ids["dead"][0]) == "dead"

            # a browser signs in (form with its own CSRF cookie), then every POST needs the session's token
            async with httpx.AsyncClient(base_url=base_url(p), follow_redirects=False) as browser:
                form = await browser.get("/_forge/login")
                token = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)
                r = await browser.post("/_forge/login", data={"csrf": token, "credential": ADMIN_KEY})
                assert r.status_code == 303, r.text[:300]
                cookie = r.headers["set-cookie"]
                assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict") and "Path=/_forge" in cookie
                csrf = await _csrf(browser)
                target = {"targets": [str(ids["dead"][0])]}
                assert (await browser.post("/_forge/api/actions/job.retry", json=target)).status_code == 403
                assert (await browser.post("/_forge/api/actions/job.retry", json=target,
                                           headers={"X-CSRF-Token": "x" + csrf})).status_code == 403
                assert (await browser.post("/_forge/api/actions/job.retry", json=target,
                                           headers={"X-CSRF-Token": csrf, "Origin": "https://evil.example"})).status_code == 403
                ok = await browser.post("/_forge/api/actions/job.retry", json=target, headers={"X-CSRF-Token": csrf})
                assert ok.status_code == 200 and ok.json()["affected"] == 1
                session_id = browser.cookies.get("forge_session")
                audit = (await admin.get("/_forge/api/audit")).json()["rows"]
                assert audit[0]["who"] == "apikey:ops" and audit[0]["role"] == "admin"

                # no page or twin shows a secret: keys, the JWT secret, the session id
                for page in PAGES + [f"jobs/{ids['dead'][1]}"]:
                    for path in (f"/_forge/{page}", f"/_forge/api/{page or 'overview'}"):
                        text = (await browser.get(path)).text
                        for secret in (ADMIN_KEY, READ_KEY, JWT_SECRET, session_id):
                            assert secret not in text, (path, secret[:6])
            assert await conn.fetchval("SELECT count(*) FROM forge_dashboard_sessions WHERE id_sha256 = "
                                       "sha256(convert_to($1, 'UTF8'))", session_id) == 1
    finally:
        await conn.close()


async def test_live_snapshot_is_shared_paced_and_hinted(forge_processes):
    """20 streams on three pages of one node while hints arrive 20 times a second: one snapshot
    statement per refresh and refreshes at least ``live_interval`` apart (at most one statement a
    second); a change announced by a hint reaches an open stream although the next poll is a minute
    away (``live_poll = 60``); a job run on the node announces itself (forge-observe's activity hint)."""
    p = forge_processes(config(secured=True, live_poll=60.0), env=ENV)
    conn = await db(forge_processes.db_url)
    listener = await db(forge_processes.db_url)
    try:
        ids = await seed_jobs(conn)
        job_id = ids["dead"][0]
        marker = f"changed-by-the-test-{uuid.uuid4().hex[:8]}"
        async with client(p, ADMIN_KEY) as c:
            seen: list[str] = []
            got = asyncio.Event()

            async def watch(n: int, path: str) -> None:
                async with c.stream("GET", path) as r:
                    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
                    event: list[str] = []
                    async for line in r.aiter_lines():
                        if line.startswith("data:"):
                            event.append(line[5:].strip())
                        elif not line and event and n == 0:
                            html = "\n".join(event)
                            event = []
                            seen.append(html)
                            row = html.split(f'data-job="{job_id}"', 1)[-1].split("</tr>", 1)[0]
                            if marker in row:
                                got.set()

            paths = ["/_forge/live/jobs?status=live"] * 10 + ["/_forge/live/logs"] * 5 + ["/_forge/live/overview"] * 5
            streams = [asyncio.create_task(watch(i, path)) for i, path in enumerate(paths)]
            await eventually(lambda: _json(c, "/_forge/api/live", "subscribers", 20), what="20 subscribers")
            await eventually(lambda: _json(c, "/_forge/api/live", "listening", True), what="the hub listening")
            await eventually(lambda: asyncio.sleep(0, bool(seen)), what="the first fragment")
            before, t0 = (await c.get("/_forge/api/live")).json(), time.monotonic()
            while time.monotonic() - t0 < 3:  # a storm of hints
                await conn.execute("SELECT pg_notify('forge_observe_activity', 'jobs,logs@the-test')")
                await asyncio.sleep(0.05)
            after, elapsed = (await c.get("/_forge/api/live")).json(), time.monotonic() - t0
            ticks, statements = after["ticks"] - before["ticks"], after["statements"] - before["statements"]
            assert after["views"] == 3 and after["hints"] - before["hints"] >= 20, (before, after)
            assert statements == ticks and 2 <= ticks <= elapsed / after["interval"] + 1, (elapsed, before, after)

            # a change with its hint shows long before the next poll would come
            await conn.execute("UPDATE forge_jobs SET last_error = $2 WHERE id = $1", job_id, marker)
            await conn.execute("SELECT pg_notify('forge_observe_activity', 'jobs@the-test')")
            try:
                await asyncio.wait_for(got.wait(), 20)
            except asyncio.TimeoutError:
                raise AssertionError(f"{len(seen)} events; last: {seen[-1][:3000] if seen else None}; {p.log()[-3000:]}")

            # a job run on the node: its observer sends the activity hint itself
            heard: list[str] = []
            await listener.add_listener("forge_observe_activity", lambda *a: heard.append(a[3]))
            assert (await c.post("/rpc/place_order", json={"item": "hinted"})).status_code == 200
            await eventually(lambda: asyncio.sleep(0, any(h.endswith("@" + after["node"]) and "jobs" in h.split("@")[0]
                                                          for h in heard)), what="the node's activity hint")
            for t in streams:
                t.cancel()
            await asyncio.gather(*streams, return_exceptions=True)
    finally:
        await conn.close()
        await listener.close()


async def _json(c: httpx.AsyncClient, path: str, key: str, want: int) -> bool:
    return (await c.get(path)).json().get(key) == want
