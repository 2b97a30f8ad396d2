"""forge-observe in an in-process node: metrics, /metrics, stored logs and spans, tail sampling."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from forge_kernel.testing.procs import eventually
from forge_observe import query
from forge_observe.service import for_node

from obs_support import FAST, rows


async def _node(forge_node, **observe):
    return await forge_node(modules=["obs_app"], config={
        "observe": {**FAST, **observe}, "gateway": {"port": 0}, "scheduler": {"tick_interval": 0.2}})


async def test_function_calls_are_counted_and_served_on_metrics(forge_node):
    node = await _node(forge_node)
    port = node.ports["http"]
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        for _ in range(3):
            assert (await http.post("/rpc/ping", json={})).json() == {"data": "pong"}
        assert (await http.post("/rpc/boom", json={})).status_code == 500
        text = (await http.get("/metrics")).text
    assert 'forge_function_calls_total{code="OK",function="ping",kind="query"} 3.0' in text
    assert 'forge_function_calls_total{code="INTERNAL",function="boom",kind="action"} 1.0' in text
    assert "forge_function_duration_seconds_bucket" in text
    assert "process_resident_memory_bytes" in text
    assert 'forge_db_pool_connections{pool="main",state="in_use"}' in text
    assert "forge_event_loop_lag_seconds" in text


async def test_the_writer_connects_while_the_node_starts(forge_node):
    """The telemetry writer's connection (and today's partitions) are made before the node's work
    starts, not at its first write in the middle of it: inside a 20,000-job drain the set-up cost
    PostgreSQL 3 us per job (bench/jobs). Nothing is written yet here: no log line reaches the
    sink (log_level ERROR), no snapshot or write is due."""
    node = await forge_node(modules=["obs_app"], config={
        "observe": {"flush_interval": 3600, "write_interval": 60, "log_level": "ERROR"}, "gateway": {"port": 0}})
    writer = for_node(node).writer
    assert writer.pending() == 0
    assert writer.conn is not None and not writer.conn.is_closed() and writer.reconnects == 0


async def test_errors_are_kept_and_stored_with_their_logs(forge_node, forge_db_url):
    node = await _node(forge_node, sample_rate=0.0)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{node.ports['http']}") as http:
        reply = await http.post("/rpc/boom", json={})
        ok = await http.post("/rpc/ping", json={})
    tp = reply.headers["traceparent"]
    trace_id = tp.split("-")[1]
    # an unsampled reply that went well names no trace (none is stored): x-request-id identifies it
    assert "traceparent" not in ok.headers and ok.headers["x-request-id"]

    async def stored():
        return await rows(forge_db_url, "SELECT name, kind, error FROM forge_obs_spans WHERE trace_id = $1", trace_id)

    spans = await eventually(stored, what="the failed call's spans")
    assert {(r["name"], r["kind"]) for r in spans} >= {("POST /rpc/boom", "server"), ("boom", "internal")}
    assert any(r["error"] == "INTERNAL" for r in spans)
    # the successful call at sample rate 0 is not kept; the failed one's root span records its request id
    assert not await rows(forge_db_url, "SELECT 1 FROM forge_obs_spans WHERE attrs->>'request.id' = $1",
                          ok.headers["x-request-id"])
    assert await rows(forge_db_url, "SELECT 1 FROM forge_obs_spans WHERE attrs->>'request.id' = $1 AND trace_id = $2",
                      reply.headers["x-request-id"], trace_id)

    async def logged():
        return await rows(forge_db_url, "SELECT level, message, trace_id, call_id FROM forge_obs_logs "
                                        "WHERE message LIKE 'about to fail%'")

    (log,) = await eventually(logged, what="the log line")
    assert log["level"] == "ERROR" and log["trace_id"] == trace_id and log["call_id"]


async def test_client_traceparent_is_continued_and_sampled_flag_honoured(forge_node, forge_db_url):
    node = await _node(forge_node, sample_rate=0.0)
    parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{node.ports['http']}") as http:
        reply = await http.post("/rpc/ping", json={}, headers={"traceparent": parent})
        bad = await http.post("/rpc/ping", json={}, headers={"traceparent": "00-zz-00-01"})
    version, trace_id, span_id, flags = reply.headers["traceparent"].split("-")
    assert trace_id == "4bf92f3577b34da6a3ce929d0e0e4736" and flags == "01" and span_id != "00f067aa0ba902b7"
    assert bad.status_code == 200 and bad.headers["traceparent"].split("-")[1] != trace_id

    async def stored():
        return await rows(forge_db_url, "SELECT name, parent_id FROM forge_obs_spans WHERE trace_id = $1", trace_id)

    spans = {r["name"]: r["parent_id"] for r in await eventually(stored, what="the continued trace")}
    assert spans["POST /rpc/ping"] == "00f067aa0ba902b7"
    assert spans["ping"] == span_id


async def test_sampled_mutation_links_sql_dispatch_and_job(forge_node, forge_db_url):
    node = await _node(forge_node, sample_rate=1.0)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{node.ports['http']}") as http:
        reply = await http.post("/rpc/add_note", json={"body": "hi"})
    assert reply.status_code == 200, reply.text
    trace_id = reply.headers["traceparent"].split("-")[1]

    async def chain():
        found = await rows(forge_db_url, "SELECT span_id, parent_id, name, kind, attrs FROM forge_obs_spans "
                                         "WHERE trace_id = $1", trace_id)
        return found if any(r["name"] == "job note_job" for r in found) else None

    spans = await eventually(chain, what="the job's spans in the request's trace")
    by_name = {r["name"]: r for r in spans}
    assert by_name["add_note"]["parent_id"] == by_name["POST /rpc/add_note"]["span_id"]
    assert by_name["dispatch note_job"]["parent_id"] == by_name["add_note"]["span_id"]
    assert by_name["job note_job"]["parent_id"] == by_name["dispatch note_job"]["span_id"]
    sqls = [r for r in spans if r["kind"] == "client"]
    assert any("INSERT INTO obs_notes" in r["attrs"] for r in sqls)
    assert any("UPDATE obs_notes" in r["attrs"] for r in sqls)
    recs = await eventually(lambda: _job_logs(forge_db_url), what="the job's log line")
    assert recs[0]["trace_id"] == trace_id and recs[0]["job_id"] is not None
    spans_api = await query.trace(node.pool, trace_id)
    assert [s.name for d, s in query.span_tree(spans_api)][0] == "POST /rpc/add_note"


async def _job_logs(url):
    return await rows(url, "SELECT trace_id, job_id FROM forge_obs_logs WHERE message LIKE 'job for note%'")


async def test_slow_calls_are_kept(forge_node, forge_db_url):
    node = await _node(forge_node, sample_rate=0.0, slow_threshold=0.2)
    obs = for_node(node)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{node.ports['http']}") as http:
        reply = await http.post("/rpc/sleepy", json={"seconds": 0.3})
    assert "traceparent" not in reply.headers  # not known to be kept when the reply was sent

    async def stored():  # found by the request id its root span records
        return await rows(forge_db_url, "SELECT 1 FROM forge_obs_spans WHERE attrs->>'request.id' = $1",
                          reply.headers["x-request-id"])

    await eventually(stored, what="the slow trace")
    assert obs.sink.kept >= 1


async def test_oversized_log_message_is_truncated_with_a_marker(forge_node, forge_db_url):
    node = await _node(forge_node, max_message_bytes=1000)
    assert (await node.executor.call("shout", {"size": 50_000})) == 50_000

    async def stored():
        return await rows(forge_db_url, "SELECT message FROM forge_obs_logs WHERE message LIKE 'xxx%'")

    (r,) = await eventually(stored, what="the long log line")
    assert len(r["message"].encode()) <= 1000 and r["message"].endswith("bytes]") and "truncated" in r["message"]


async def test_metrics_history_is_flushed_and_summarised(forge_node, forge_db_url):
    node = await _node(forge_node)
    for _ in range(5):
        await node.executor.call("ping", {})

    async def summary():
        fns = await query.function_summary(node.pool, 600)
        return [f for f in fns if f.function == "ping" and f.calls == 5]

    (ping,) = await eventually(summary, what="ping in the stored metrics")
    assert ping.p95_ms is not None and ping.errors == 0


async def test_metrics_endpoint_refuses_other_networks(forge_node):
    node = await _node(forge_node, metrics_allow=["10.0.0.0/8"])
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{node.ports['http']}") as http:
        reply = await http.get("/metrics")
    assert reply.status_code == 403 and "metrics_allow" in reply.text


class _Receiver:
    """A webhook receiver on loopback: records each POSTed JSON body; answers 500 to the first."""

    def __init__(self) -> None:
        import http.server
        import threading

        self.bodies: list[dict] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                outer.bodies.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
                self.send_response(500 if len(outer.bodies) == 1 else 200)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


async def test_alert_webhook_is_delivered_by_a_job_and_retried(forge_node, forge_db_url):
    receiver = _Receiver()
    try:
        rule = {"name": "calls-failing", "metric": "function_error_rate", "threshold": 0.0, "op": ">",
                "window": 60, "webhook": receiver.url}
        node = await forge_node(modules=["obs_app"], config={
            "observe": {**FAST, "alerts": [rule], "alert_interval": 1}, "gateway": {"port": 0},
            "scheduler": {"tick_interval": 0.2}, "worker": {"backoff_base": 0.1, "poll_interval": 0.2}})
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{node.ports['http']}") as http:
            assert (await http.post("/rpc/ping", json={})).status_code == 200
            await asyncio.sleep(1.0)  # a snapshot before the failure: the window's start
            assert (await http.post("/rpc/boom", json={})).status_code == 500

        async def delivered():
            return len(receiver.bodies) >= 2

        await eventually(delivered, timeout=60, what="the alert webhook delivered (after one refused POST)")
        first, second = receiver.bodies[:2]
        assert first == second and second["rule"] == "calls-failing" and second["state"] == "firing"
        assert second["metric"] == "function_error_rate" and 0 < second["value"] <= 1
        (alert,) = await query.alerts(node.pool)
        assert alert.state == "firing" and alert.id == second["alert_id"]

        async def finished():
            return await node.pool.fetchrow("SELECT status, attempt FROM forge_job_history "
                                            "WHERE name = 'observe_alert_webhook'")

        job = await eventually(finished, what="the webhook job's result")
        assert job["status"] == "succeeded" and job["attempt"] == 2  # the refused POST was retried
    finally:
        receiver.close()


def _samples(text: str, name: str) -> dict[str, float]:
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith(name + "{") or line.startswith(name + " ")}


async def test_cluster_gauges_come_from_the_leader_only(forge_node, forge_db_url):
    nodes = [await forge_node(modules=["obs_app"], config={
        "observe": {**FAST, "cluster_interval": 1}, "gateway": {"port": 0}, "node": {
            "id": f"gauge-{i}", "roles": ["gateway", "function", "scheduler"]},
        "scheduler": {"tick_interval": 0.2}}) for i in (1, 2)]
    async with httpx.AsyncClient() as http:
        assert (await http.post(f"http://127.0.0.1:{nodes[0].ports['http']}/rpc/add_note",
                                json={"body": "queued"})).status_code == 200  # a job no node here runs
        leader = await eventually(lambda: nodes[0].pool.fetchval("SELECT node_id FROM forge_leaders"),
                                  what="a scheduler leader")

        async def scraped():
            texts = {n.id: (await http.get(f"http://127.0.0.1:{n.ports['http']}/metrics")).text for n in nodes}
            # the leader collects every second: wait for a snapshot taken after both nodes registered
            # (the one before can already show the job when this database holds an earlier test's)
            ready = _samples(texts[leader], "forge_jobs") and _samples(texts[leader], "forge_cluster_nodes").get(
                'forge_cluster_nodes{status="running"}') == 2.0
            return texts if ready else None

        texts = await eventually(scraped, what="the leader's cluster gauges")
    follower = next(n.id for n in nodes if n.id != leader)
    assert _samples(texts[leader], "forge_jobs") == {'forge_jobs{queue="default",status="pending"}': 1.0}
    assert _samples(texts[leader], "forge_cluster_nodes") == {'forge_cluster_nodes{status="running"}': 2.0}
    # a scrape of every node counts the cluster once: the follower exports none of it
    for name in ("forge_jobs", "forge_jobs_oldest_pending_seconds", "forge_cluster_nodes"):
        assert not _samples(texts[follower], name), name
    # each node still serves its own series
    assert 'forge_node_info{node="%s"' % follower in texts[follower]
    assert _samples(texts[follower], "forge_db_pool_connections")


async def test_unsampled_jobs_get_a_span_only_when_they_log_fail_or_hand_on(forge_node, forge_db_url):
    """A job in an unsampled trace runs without a span (one job.finished event) until it needs one:
    its log lines still name the trace and the job, and a failed run is kept as a span continuing
    the request's trace (the dispatch span as its parent)."""
    node = await _node(forge_node, sample_rate=0.0)
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    unsampled = f"00-{trace_id}-b7ad6b7169203331-00"
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{node.ports['http']}") as http:
        assert (await http.post("/rpc/add_note", json={"body": "quiet"},
                                headers={"traceparent": unsampled})).status_code == 200
        assert (await http.post("/rpc/add_failing", json={}, headers={"traceparent": unsampled})).status_code == 200

    async def job_log():
        return await rows(forge_db_url, "SELECT trace_id, span_id, job_id FROM forge_obs_logs "
                                        "WHERE message LIKE 'job for note%'")

    (line,) = await eventually(job_log, what="the job's log line")
    assert line["trace_id"] == trace_id and line["job_id"] is not None and line["span_id"]

    async def failed_run():
        return await rows(forge_db_url, "SELECT span_id, parent_id, name, kind, error FROM forge_obs_spans "
                                        "WHERE trace_id = $1", trace_id)

    spans = await eventually(failed_run, what="the failed job's span")
    (run,) = [s for s in spans if s["name"] == "job failing_job"]
    assert run["kind"] == "consumer" and "failing on purpose" in run["error"] and run["parent_id"] != "b7ad6b7169203331"
    # the note job went well and its trace was not sampled: it kept nothing (its log line named the trace)
    assert not [s for s in spans if s["name"] == "job note_job"]
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"http://127.0.0.1:{node.ports['http']}/metrics")).text
    assert 'forge_jobs_finished_total{job="note_job",status="succeeded"} 1.0' in text
    assert 'forge_jobs_finished_total{job="failing_job",status="dead"} 1.0' in text


async def test_stored_log_lines_are_redacted_and_tracebacks_show_no_locals(forge_node, forge_db_url):
    """The PostgreSQL log sink goes through the kernel's log set-up (forge_kernel.logs.add_sink):
    secrets in the text are replaced, and a stored traceback never shows local variables."""
    node = await _node(forge_node)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{node.ports['http']}") as http:
        assert (await http.post("/rpc/leaky", json={})).status_code == 200

    async def stored():
        return await rows(forge_db_url, "SELECT message FROM forge_obs_logs WHERE message LIKE 'retrying with%'")

    (line,) = await eventually(stored, what="the log line")
    text = line["message"]
    assert "RuntimeError: lookup failed for 30 bytes" in text  # the exception is stored with its line
    assert "hunter2hunter2" not in text and "abcdefghijklmnop" not in text and "password=***" in text
    assert "z" * 24 not in text  # no locals (diagnose off): the secret in a local never reaches the database


async def test_an_activity_hint_waits_for_the_writer_connection_being_opened(forge_node, forge_db_url):
    """The writer's one connection is shared by its opening (at node start), its COPYs and its
    activity hints: a hint sent while the node still opens it must wait, not connect a second time
    and run a statement on a connection another task is using (the bench saw asyncpg's 'got result
    for unknown protocol state' and the writer's task crash)."""
    import asyncpg

    from forge_observe.writer import Writer

    node = await _node(forge_node)
    connections: list[asyncpg.Connection] = []

    async def connect() -> asyncpg.Connection:
        await asyncio.sleep(0.05)  # a real connect yields: let the hint's task run meanwhile
        conn = await asyncpg.connect(forge_db_url)
        connections.append(conn)
        return conn

    writer = Writer(connect, "hint-race", for_node(node).metrics)
    try:
        writer.hint_due = {"jobs"}
        opened, _ = await asyncio.gather(writer.open(timeout=10), writer._send_hint())
        assert opened and writer.hints_sent == 1
        assert len(connections) == 1, "the hint connected a second time"
    finally:
        await writer.close(timeout=2)
        for conn in connections:
            await conn.close()


async def test_closing_the_writer_stops_its_task_and_nothing_reconnects(forge_node, forge_db_url):
    """close() (the node's drain) writes the rest and closes the connection while the writer's task
    may be mid-hint: the task must stop rather than send on the closing connection or connect again
    (the bench saw the task crash at every node stop, then reconnect after the drain)."""
    import asyncpg

    from forge_observe.writer import Writer

    node = await _node(forge_node)
    connections: list[asyncpg.Connection] = []

    async def connect() -> asyncpg.Connection:
        conn = await asyncpg.connect(forge_db_url)
        connections.append(conn)
        return conn

    writer = Writer(connect, "close-race", for_node(node).metrics, interval=0.01)
    assert await writer.open(timeout=10)
    task = asyncio.create_task(writer.run())
    try:
        for _ in range(20):  # hints in flight while the drain starts
            writer.hint({"jobs"})
            await asyncio.sleep(0.005)
        await writer.close(timeout=5)
        writer.hint({"jobs"})  # late activity during shutdown
        await asyncio.wait_for(task, 5)  # the task ends by itself, without an error
        assert writer.hints_sent >= 1
        assert len(connections) == 1 and connections[0].is_closed()
    finally:
        task.cancel()
        for conn in connections:
            await conn.close()


@pytest.mark.parametrize("head_sampled", [True, False])
async def test_a_job_without_a_traceparent_is_kept_as_its_head_decision_says(forge_node, forge_db_url, monkeypatch,
                                                                              head_sampled):
    """A job stored without a ``traceparent`` (enqueued outside any trace) is head-sampled once, by
    the worker's draw at the sampling rate: a sampled one's fresh trace is kept, with a trace id that
    says "sampled" to every other node; an unsampled one that goes well keeps nothing. (The span's
    own trace id used to decide a second time, so such jobs were kept at the rate squared.)"""
    from forge_kernel.telemetry import format_traceparent
    from forge_worker import JobQueue
    from forge_worker import runtime

    monkeypatch.setattr(runtime, "_random", lambda: 0.0 if head_sampled else 0.999)
    node = await _node(forge_node, sample_rate=0.01)
    queue = JobQueue(node.pool)
    note_id = await node.pool.fetchval("INSERT INTO obs_notes (body) VALUES ('outside') RETURNING id")
    job_id = await queue.enqueue("note_job", {"note_id": note_id})

    async def ran():
        return await rows(forge_db_url, "SELECT trace_id FROM forge_obs_logs WHERE message = $1",
                          f"job for note {note_id}")

    (line,) = await eventually(ran, what="the job's log line")
    trace_id = line["trace_id"]
    below = node.telemetry.head_sampled_remote(format_traceparent(int(trace_id, 16), 1, False))
    assert below is head_sampled  # what another node decides from the trace id

    async def stored():
        found = await rows(forge_db_url, "SELECT name, kind, attrs FROM forge_obs_spans WHERE trace_id = $1",
                           trace_id)
        return found if any(r["kind"] == "client" for r in found) else None

    if head_sampled:
        spans = await eventually(stored, what="the sampled job's spans")
        (run,) = [s for s in spans if s["name"] == "job note_job"]
        assert json.loads(run["attrs"])["job.id"] == job_id
        assert any("UPDATE obs_notes" in s["attrs"] for s in spans if s["kind"] == "client")
    else:
        await for_node(node).writer.write_pending()
        assert not await rows(forge_db_url, "SELECT 1 FROM forge_obs_spans WHERE trace_id = $1", trace_id)


async def test_a_job_started_after_a_sampled_one_is_outside_its_trace(forge_node, monkeypatch):
    """The next job claimed ahead starts from the ending job's task, whose context the new task
    copies: the ending job's span has left it by then, so the next job's SQL statements and log
    lines do not name the other job's trace."""
    import obs_app
    from forge_worker import JobQueue
    from forge_worker import runtime

    draws = iter([0.0])  # the first job run is head-sampled, the others not
    monkeypatch.setattr(runtime, "_random", lambda: next(draws, 0.999))
    node = await forge_node(modules=["obs_app"], config={
        "observe": {**FAST, "sample_rate": 0.01}, "gateway": {"port": 0}, "worker": {"concurrency": 1}})
    obs_app.SEEN_SPANS.clear()
    queue = JobQueue(node.pool)
    await queue.enqueue_many([queue.request("peek_job") for _ in range(3)])

    async def ran():
        return len(obs_app.SEEN_SPANS) == 3

    await eventually(ran, what="three jobs")
    first, *rest = obs_app.SEEN_SPANS
    assert first is not None and first.sampled and first.name == "job peek_job"
    assert rest == [None, None]


async def test_a_span_a_job_left_open_is_not_current_in_the_jobs_after_it(forge_node):
    """A job that leaves a span of its own open keeps it current in its task's context; the next
    job claimed ahead, started from that task, starts from the worker's context instead of a copy
    of that one, so it is outside that span (its statements and log lines name no trace of another job)."""
    import obs_app
    from forge_worker import JobQueue

    node = await forge_node(modules=["obs_app"], config={
        "observe": {**FAST, "sample_rate": 0.01}, "gateway": {"port": 0}, "worker": {"concurrency": 1}})
    obs_app.SEEN_SPANS.clear()
    queue = JobQueue(node.pool)
    await queue.enqueue_many([queue.request("span_left_open_job")] + [queue.request("peek_job") for _ in range(2)])

    async def ran():
        return len(obs_app.SEEN_SPANS) == 2

    await eventually(ran, what="the two jobs after it")
    assert obs_app.SEEN_SPANS == [None, None]


async def test_a_job_whose_options_hold_no_usable_traceparent_runs_in_a_fresh_trace(forge_node):
    """A job's options are any JSON (raw SQL, ``@job`` options): a ``traceparent`` that is no text, or
    options that are no object, start a fresh trace; the job runs as it would without forge-observe
    (they raised TypeError / AttributeError in the head decision, and the job failed every attempt)."""
    import obs_app
    from forge_worker import JobQueue

    node = await forge_node(modules=["obs_app"], config={
        "observe": {**FAST, "sample_rate": 1.0}, "gateway": {"port": 0}})
    obs_app.SEEN_SPANS.clear()
    queue = JobQueue(node.pool)
    ids = await queue.enqueue_many([queue.request("peek_job", delay=1.5) for _ in range(3)])
    updated = await node.pool.execute(
        """UPDATE forge_jobs SET options = (ARRAY['{"traceparent": 5}', '[1, 2]', '{"traceparent": ["00"]}'])[
               array_position($1::bigint[], id)]::jsonb
           WHERE id = ANY($1::bigint[]) AND status = 'scheduled'""", ids)
    assert updated == "UPDATE 3"  # before any of them was due

    async def done():
        jobs = [await queue.get(i) for i in ids]
        return jobs if all(j.status in ("succeeded", "dead") for j in jobs) else None

    jobs = await eventually(done, what="the three jobs to end")
    assert [j.status for j in jobs] == ["succeeded"] * 3, [j.last_error for j in jobs]
    assert len(obs_app.SEEN_SPANS) == 3 and all(s is not None and s.sampled for s in obs_app.SEEN_SPANS)
