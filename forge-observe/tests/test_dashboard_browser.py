"""The dashboard in a real browser: Playwright driving Debian's Chromium (/usr/bin/chromium).

Signs in through the form, loads every page (no console error, no failed request, no response
>= 400), clicks actions and checks the rows in PostgreSQL, watches a database change appear without
a reload, follows a log line's trace link to the waterfall, checks the read-only view, and writes a
screenshot of each page to docs/dashboard/ (1280 px light, 390 px dark). Screenshots of failures
go to the test's tmp folder."""

from __future__ import annotations

import asyncio
import os
import random
import time
import uuid
from pathlib import Path

import pytest

from dash_support import ADMIN_KEY, ENV, READ_KEY, base_url, client, config, db, seed_jobs
from forge_kernel.testing.procs import eventually

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run"]
DOCS = Path(__file__).resolve().parents[2] / "docs" / "dashboard"
PAGES = ["", "functions", "jobs", "queues", "crons", "workflows", "realtime", "logs", "traces", "nodes", "migrations",
         "alerts", "audit"]

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed (.ci/run installs it)")


class Watch:
    """Console errors, failed requests and responses >= 400 of a page."""

    def __init__(self, page) -> None:
        self.problems: list[str] = []
        page.on("console", lambda m: m.type == "error" and self.problems.append(f"console: {m.text} at {m.location}"))
        page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        page.on("requestfailed", lambda r: self._failed(r))
        page.on("response", lambda r: r.status >= 400 and self.problems.append(f"{r.status} {r.url}"))

    def _failed(self, r) -> None:
        # a GET the browser dropped because the page navigated on (a live stream, the favicon) is
        # not a failure; every POST is awaited whole by the test (_act), so an aborted one is
        if r.method == "GET" and "ERR_ABORTED" in (r.failure or ""):
            return
        self.problems.append(f"failed: {r.url} {r.failure}")

    def take(self) -> list[str]:
        out, self.problems = self.problems, []
        return out


async def _sign_in(page, url: str, key: str) -> None:
    await page.goto(f"{url}/_forge/login")
    await page.fill("input[name=credential]", key)
    await page.click("button.primary")
    await page.wait_for_url(f"{url}/_forge/")


async def _act(page, path: str, selector: str, toast: str | None = None) -> None:
    """Click an action's button and wait for its whole answer (and its toast, if given).

    Playwright's response event fires on the status line and headers, which uvicorn writes before the
    body: a navigation right after it can still abort the request (a POST failed with ERR_ABORTED, its
    toast lost), so the body is awaited too."""
    async with page.expect_response(lambda r: path in r.url and r.request.method == "POST") as info:
        await page.click(selector)
    response = await info.value
    await response.finished()
    assert response.status == 200 and response.request.failure is None, (path, response.status,
                                                                         response.request.failure)
    if toast is not None:
        await page.wait_for_selector(f"#toast [data-toast]:has-text({toast!r})")


async def test_dashboard_in_chromium(forge_processes, tmp_path):
    from playwright.async_api import async_playwright

    p = forge_processes(config(secured=True), env=ENV)
    url = base_url(p)
    conn = await db(forge_processes.db_url)
    ids = await seed_jobs(conn)
    async with client(p) as api:  # traffic: a traced request whose job logs with the trace id
        for item in ("lamp", "desk", "chair"):
            assert (await api.post("/rpc/place_order", json={"item": item})).status_code == 200
        # a workflow run waiting for its approval (its charge fails until the flag file exists)
        paid = tmp_path / "stool-paid"
        r = await api.post("/rpc/start_order", json={"item": "stool", "paid_flag": str(paid)})
        assert r.status_code == 200, r.text
        run_id = r.json()["data"]
    await eventually(lambda: conn.fetchval("SELECT count(*) FROM forge_obs_logs WHERE message LIKE 'shipping %' "
                                           "AND trace_id IS NOT NULL"), what="job logs with a trace id")
    await eventually(lambda: conn.fetchval("SELECT count(*) FROM forge_cron_state"), what="crons registered")
    DOCS.mkdir(parents=True, exist_ok=True)
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        ctx = await browser.new_context(viewport={"width": 1280, "height": 900}, color_scheme="light")
        page = await ctx.new_page()
        page.on("dialog", lambda d: asyncio.ensure_future(d.accept()))
        watch = Watch(page)
        try:
            # refused without the credential
            r = await page.goto(f"{url}/_forge/jobs")
            assert page.url.endswith("/_forge/login") and r.status == 200
            watch.take()
            await _sign_in(page, url, ADMIN_KEY)

            for name in PAGES:
                r = await page.goto(f"{url}/_forge/{name}")
                assert r.status == 200, name
                await page.wait_for_load_state("networkidle")
                await page.screenshot(path=str(DOCS / f"{name or 'overview'}.png"), full_page=True)
                problems = watch.take()
                assert problems == [], (name, problems)
            await eventually(lambda: _run_is(conn, run_id, "waiting"), what="the run waiting for its event")
            for path, shot in ((f"jobs/{ids['dead'][0]}", "job"), (f"workflows/{run_id}", "workflow")):
                assert (await page.goto(f"{url}/_forge/{path}")).status == 200
                await page.screenshot(path=str(DOCS / f"{shot}.png"), full_page=True)
            assert watch.take() == []

            # keyboard: "/" focuses the search box
            await page.goto(f"{url}/_forge/jobs")
            await page.keyboard.press("/")
            assert await page.evaluate("document.activeElement.name") == "name"

            # actions by clicking: pause the mail queue, then retry a dead job (it stays pending)
            await page.goto(f"{url}/_forge/queues")
            await _act(page, "/actions/queue.pause", "tr[data-queue=mail] [data-action='queue.pause']",
                       toast="1 queue(s) paused")
            await eventually(lambda: conn.fetchval("SELECT count(*) FROM forge_worker_queue_pauses WHERE queue = 'mail'"),
                             what="the queue paused in PostgreSQL")
            await page.wait_for_selector("tr[data-queue=mail] [data-action='queue.resume']")  # the live region followed
            await page.goto(f"{url}/_forge/jobs?status=dead")
            job_id = ids["dead"][0]
            await _act(page, "/actions/job.retry", f"tr[data-job='{job_id}'] [data-action='job.retry']",
                       toast="1 dead-lettered job(s) back in the queue")
            await eventually(lambda: _status_is(conn, job_id, "pending"), what="the retried job pending")
            # each action's whole answer is awaited before the next navigation (which would abort it)
            await _act(page, "/actions/job.discard", f"tr[data-job='{ids['dead'][1]}'] [data-action='job.discard']",
                       toast="1 dead-lettered job(s) discarded")
            await eventually(lambda: conn.fetchval("SELECT count(*) FROM forge_job_history WHERE id = $1 AND "
                                                   "status = 'discarded'", ids["dead"][1]), what="discarded")
            # a whole filter: the count first, then the action. The live region swaps while the confirmed
            # request is in flight (its answer is held until the page shows the jobs gone): the action
            # still completes, and its answer still shows and closes the dialog
            await page.goto(f"{url}/_forge/jobs?status=scheduled")
            await page.wait_for_selector("#livedot:not([hidden])")
            await page.evaluate("window.forgeUpdates = 0; "
                                "document.addEventListener('forge:updated', () => { window.forgeUpdates++; })")
            await page.click("[data-bulk=cancel]")
            await page.wait_for_selector("[data-confirm-bulk=cancel]")
            assert "2 job(s)" in await page.inner_text(".confirm")

            async def after_a_live_update(route) -> None:
                await page.evaluate("window.forgeUpdates = 0")
                answer = await route.fetch()  # the jobs are cancelled; the live hub is poked
                await page.wait_for_selector("#live .empty")  # no wait_for_function: the CSP forbids eval
                assert await page.evaluate("window.forgeUpdates") > 0
                await route.fulfill(response=answer)

            await page.route("**/_forge/api/bulk/cancel", after_a_live_update)
            await _act(page, "/api/bulk/cancel", "[data-confirm-bulk=cancel]", toast="2 job(s) cancelled")
            await page.unroute("**/_forge/api/bulk/cancel", after_a_live_update)
            await page.wait_for_selector(".confirm", state="detached")  # the answer closed the dialog
            await eventually(lambda: conn.fetchval("SELECT count(*) = 0 FROM forge_jobs WHERE status = 'scheduled'"),
                             what="the scheduled jobs cancelled")
            await page.goto(f"{url}/_forge/crons")
            await _act(page, "/actions/cron.trigger", "tr[data-cron=nightly_cleanup] [data-action='cron.trigger']",
                       toast="1 run(s) requested")
            # the request row, or the manual run the leader made of it (and deleted the request)
            await eventually(lambda: conn.fetchval(
                "SELECT (SELECT count(*) FROM forge_cron_triggers WHERE cron = 'nightly_cleanup') + "
                "(SELECT count(*) FROM forge_cron_runs WHERE cron = 'nightly_cleanup' AND kind = 'manual')"),
                what="the cron trigger")
            assert watch.take() == []

            # a workflow run: send the event it waits for from its page; its charge fails (not paid);
            # then retry from the charge step chosen in the select, paid: it succeeds
            await page.goto(f"{url}/_forge/workflows/{run_id}")
            await page.fill("[data-form=send-event] input[name='param.event']", "approved")
            await page.fill("[data-form=send-event] textarea", '{"by": "browser"}')
            await _act(page, "/actions/workflow.send_event", "[data-form=send-event] [data-action='workflow.send_event']",
                       toast="sent to 1 run")
            await eventually(lambda: _run_is(conn, run_id, "failed"), what="the run failed at its charge")
            await page.wait_for_selector("[data-form=retry] select")  # the live region followed
            charge = await conn.fetchval("SELECT key FROM forge_workflow_steps WHERE run_id = $1::uuid AND name = 'charge' "
                                         "AND position('~' in key) = 0", run_id)
            paid.write_text("paid")
            await page.select_option("[data-form=retry] select", charge)
            await _act(page, "/actions/workflow.retry", "[data-form=retry] [data-action='workflow.retry']")
            await eventually(lambda: _run_is(conn, run_id, "succeeded"), what="the retried run succeeded")
            assert await conn.fetchval("SELECT result FROM forge_workflow_runs WHERE id = $1::uuid", run_id) == {
                "approved_by": {"by": "browser"}, "paid": "charged stool"}
            assert watch.take() == []

            # a change made in the database appears without a reload: a row edited by hand (no hint:
            # the poll, every [dashboard] live_poll seconds, finds it)
            await page.goto(f"{url}/_forge/jobs?status=live")
            await page.wait_for_selector("#livedot:not([hidden])")
            marker = f"seen-live-{uuid.uuid4().hex[:6]}"
            target = ids["dead"][2]
            t0 = time.monotonic()
            await conn.execute("UPDATE forge_jobs SET last_error = $2 WHERE id = $1", target, marker)
            await page.wait_for_selector(f"tr[data-job='{target}'] >> text={marker}", timeout=15_000)
            print(f"\nrow edited by hand to page (no hint): {(time.monotonic() - t0) * 1000:.0f} ms")
            # and jobs stored by a mutation (announced by hints), at unrelated moments: the time from the
            # mutation's answer (its commit) to the row in the page, reported (not asserted)
            await conn.execute("INSERT INTO forge_worker_queue_pauses (queue, paused_by) VALUES ('shipping', 'the test')")
            await page.goto(f"{url}/_forge/jobs?status=live&queue=shipping")
            await page.wait_for_selector("#livedot:not([hidden])")
            latencies = []
            async with client(p) as api:
                for i in range(20):
                    await asyncio.sleep(random.uniform(1.2, 2.5))
                    marker = f"live-{i}-{uuid.uuid4().hex[:6]}"
                    assert (await api.post("/rpc/place_order", json={"item": marker})).status_code == 200
                    t0 = time.monotonic()
                    await page.wait_for_selector(f"tr[data-job] >> text={marker}", timeout=15_000)
                    latencies.append(time.monotonic() - t0)
            await conn.execute("DELETE FROM forge_worker_queue_pauses WHERE queue = 'shipping'")
            latencies.sort()
            print(f"mutation's commit to page, {len(latencies)} changes: p50 {latencies[len(latencies) // 2] * 1000:.0f} ms, "
                  f"p90 {latencies[int(len(latencies) * 0.9)] * 1000:.0f} ms, max {latencies[-1] * 1000:.0f} ms "
                  f"(load average {os.getloadavg()[0]:.1f})")
            print("latencies ms: " + " ".join(f"{x * 1000:.0f}" for x in latencies))
            assert watch.take() == []

            # the logs page: new lines join the list live, merged into the lines the page searched
            await page.goto(f"{url}/_forge/logs?since=1h")
            await page.wait_for_selector("#livedot:not([hidden])")
            before = await page.locator(".logs .line").count()
            marker = f"log-live-{uuid.uuid4().hex[:6]}"
            async with client(p) as api:
                assert (await api.post("/rpc/place_order", json={"item": marker})).status_code == 200
            await page.wait_for_selector(f".logs .line >> text=placing order for {marker}", timeout=15_000)
            assert await page.locator(".logs .line").count() >= min(before + 1, 200)
            assert watch.take() == []

            # a hidden tab closes its stream (the node watches nothing for it), shown again it reopens
            async def subscribers(n: int) -> bool:
                return (await (await page.request.get(f"{url}/_forge/api/live")).json())["subscribers"] == n

            assert await subscribers(1)
            show = "h => { Object.defineProperty(document, 'hidden', {value: h, configurable: true}); " \
                   "document.dispatchEvent(new Event('visibilitychange')); }"
            await page.evaluate(show, True)
            await eventually(lambda: subscribers(0), what="the hidden tab's stream closed")
            await page.evaluate(show, False)
            await eventually(lambda: subscribers(1), what="the shown tab's stream open again")

            # a log line's trace link opens the waterfall
            await page.goto(f"{url}/_forge/logs?text=shipping")
            await page.click(".line [data-trace]")
            await page.wait_for_selector(".waterfall")
            names = await page.eval_on_selector_all(".span-row", "rows => rows.map(r => r.dataset.span)")
            assert "POST /rpc/place_order" in names and any(n.startswith("job ship_order") for n in names), names
            await page.screenshot(path=str(DOCS / "trace.png"), full_page=True)
            assert watch.take() == []

            # 390 px wide, dark
            small = await browser.new_context(viewport={"width": 390, "height": 844}, color_scheme="dark")
            await small.add_cookies(await ctx.cookies())
            sp = await small.new_page()
            sw = Watch(sp)
            for name in ("", "jobs", "traces"):
                assert (await sp.goto(f"{url}/_forge/{name}")).status == 200
                await sp.wait_for_load_state("networkidle")
                width = await sp.evaluate("document.documentElement.scrollWidth")
                assert width <= 390, (name, width)
                await sp.screenshot(path=str(DOCS / f"{name or 'overview'}-390-dark.png"), full_page=True)
            assert sw.take() == []
            await small.close()

            # read-only: no action buttons, 403 on POST
            ro = await browser.new_context(viewport={"width": 1280, "height": 900})
            rp = await ro.new_page()
            await _sign_in(rp, url, READ_KEY)
            for name in ("jobs?status=dead", "queues", "crons", "nodes", "workflows", f"workflows/{run_id}"):
                await rp.goto(f"{url}/_forge/{name}")
                assert await rp.locator("[data-action], [data-bulk]").count() == 0, name
            csrf = await rp.evaluate("JSON.parse(document.body.getAttribute('hx-headers'))['X-CSRF-Token']")
            r = await rp.request.post(f"{url}/_forge/api/actions/job.retry", data={"targets": [str(target)]},
                                      headers={"X-CSRF-Token": csrf})
            assert r.status == 403
            await ro.close()
            # and the admin's POST without the CSRF token is refused
            r = await page.request.post(f"{url}/_forge/api/actions/job.retry", data={"targets": [str(target)]})
            assert r.status == 403
        except Exception:
            await page.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
            print(f"screenshot of the failure: {tmp_path / 'failure.png'}")
            raise
        finally:
            await browser.close()
            await conn.close()


async def _status_is(conn, job_id: int, status: str) -> bool:
    return await conn.fetchval("SELECT status FROM forge_jobs WHERE id = $1", job_id) == status


async def _run_is(conn, run_id: str, status: str) -> bool:
    return await conn.fetchval("SELECT status FROM forge_workflow_runs WHERE id = $1::uuid", run_id) == status
