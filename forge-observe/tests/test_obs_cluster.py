"""forge-observe with real forge-node processes: one trace from HTTP to a job on another node and a
WebSocket push; the writer's connection killed under load; SIGTERM flushes what is buffered."""

from __future__ import annotations

import asyncio
import json
import signal

import asyncpg
import httpx
import websockets

from forge_kernel.testing.procs import eventually

from obs_support import ENV, FAST

APP = {"modules": ["obs_app"], "example": False}


async def test_one_trace_from_http_to_a_job_on_another_node_and_a_push(forge_processes, forge_db_url):
    front = forge_processes({"app": APP, "node": {"roles": ["gateway", "function", "realtime", "scheduler"]},
                             "observe": {**FAST, "sample_rate": 1.0}}, node_id="front", env=ENV)
    forge_processes({"app": APP, "node": {"roles": ["worker"]}, "observe": {**FAST, "sample_rate": 1.0}},
                    node_id="back", env=ENV)
    port = front.ready_info()["ports"]["http"]
    async with websockets.connect(f"ws://127.0.0.1:{port}/ws") as ws:
        await ws.send(json.dumps({"type": "subscribe", "id": "s1", "function": "notes", "args": {}}))
        first = json.loads(await asyncio.wait_for(ws.recv(), 30))
        assert first["type"] == "data" and first["data"] == []
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            reply = await http.post("/rpc/add_note", json={"body": "traced"})
        assert reply.status_code == 200, reply.text
        pushed = json.loads(await asyncio.wait_for(ws.recv(), 30))
        assert pushed["type"] == "data" and pushed["data"][0].startswith("traced")
    trace_id = reply.headers["traceparent"].split("-")[1]
    conn = await asyncpg.connect(forge_db_url)
    try:
        async def chain():
            rows = await conn.fetch("SELECT span_id, parent_id, name, kind, node_id FROM forge_obs_spans "
                                    "WHERE trace_id = $1", trace_id)
            names = {r["name"] for r in rows}
            return rows if {"job note_job", "push"} <= names else None

        rows = await eventually(chain, timeout=60, what="every span of the trace in the database")
    finally:
        await conn.close()
    by_name = {}
    for r in rows:
        by_name.setdefault(r["name"], r)
    http_span, mutation = by_name["POST /rpc/add_note"], by_name["add_note"]
    dispatch, job_run = by_name["dispatch note_job"], by_name["job note_job"]
    rerun, push = by_name["live query notes"], by_name["push"]
    assert http_span["node_id"] == mutation["node_id"] == "front" and http_span["kind"] == "server"
    assert mutation["parent_id"] == http_span["span_id"]
    assert dispatch["parent_id"] == mutation["span_id"]
    assert job_run["node_id"] == "back" and job_run["kind"] == "consumer"
    assert job_run["parent_id"] == dispatch["span_id"]
    assert any(r["kind"] == "client" and r["node_id"] == "back" and r["parent_id"] == job_run["span_id"]
               for r in rows), "the job's SQL"
    assert rerun["parent_id"] == mutation["span_id"] and rerun["node_id"] == "front"
    assert push["parent_id"] == rerun["span_id"]


async def test_websocket_handshake_and_subscribe_are_traced(forge_processes, forge_db_url):
    """/ws: a span for the handshake continuing the client's traceparent, one per message continuing
    the handshake's, and the subscription's first live-query run a child of its subscribe span."""
    node = forge_processes({"app": APP, "node": {"roles": ["gateway", "function", "realtime"]},
                            "observe": {**FAST, "sample_rate": 1.0}}, env=ENV)
    port = node.ready_info()["ports"]["http"]
    client = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    async with websockets.connect(f"ws://127.0.0.1:{port}/ws", additional_headers={"traceparent": client}) as ws:
        await ws.send(json.dumps({"type": "subscribe", "id": "s1", "function": "notes", "args": {}}))
        assert json.loads(await asyncio.wait_for(ws.recv(), 30))["type"] == "data"
        await ws.send(json.dumps({"type": "subscribe", "id": "s2", "function": "no_such_query", "args": {}}))
        assert json.loads(await asyncio.wait_for(ws.recv(), 30))["type"] == "error"
    conn = await asyncpg.connect(forge_db_url)
    try:
        async def stored():
            rows = await conn.fetch("SELECT span_id, parent_id, name, kind, error, attrs FROM forge_obs_spans "
                                    "WHERE trace_id = $1", "4bf92f3577b34da6a3ce929d0e0e4736")
            return rows if sum(r["name"] == "WS subscribe" for r in rows) == 2 and any(
                r["name"] == "live query notes" for r in rows) else None

        rows = await eventually(stored, timeout=60, what="the connection's spans")
    finally:
        await conn.close()
    (handshake,) = [r for r in rows if r["name"] == "WS /ws"]
    ok, bad = sorted((r for r in rows if r["name"] == "WS subscribe"), key=lambda r: r["error"] is not None)
    (run,) = [r for r in rows if r["name"] == "live query notes"]
    assert handshake["kind"] == "server" and handshake["parent_id"] == "00f067aa0ba902b7"
    assert ok["parent_id"] == bad["parent_id"] == handshake["span_id"] and ok["error"] is None
    assert json.loads(ok["attrs"])["live.function"] == "notes" and bad["error"] == "NOT_FOUND"
    assert run["parent_id"] == ok["span_id"]


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_killing_the_writer_connection_under_load_fails_no_call(forge_processes, forge_db_url):
    node = forge_processes({"app": APP, "observe": {**FAST, "sample_rate": 1.0, "queue_size": 200}}, env=ENV)
    port = node.ready_info()["ports"]["http"]
    stop = asyncio.Event()
    statuses: list[int] = []

    async def load(http: httpx.AsyncClient) -> None:
        while not stop.is_set():
            statuses.append((await http.post("/rpc/ping", json={})).status_code)

    conn = await asyncpg.connect(forge_db_url)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            workers = [asyncio.create_task(load(http)) for _ in range(8)]
            await asyncio.sleep(1.0)
            before = (await http.get("/metrics")).text
            killed = await conn.fetch("SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity "
                                      "WHERE application_name = 'forge-observe' AND datname = current_database()")
            assert killed, "the writer's connection"
            await asyncio.sleep(1.0)

            async def reconnected():
                pids = await conn.fetch("SELECT pid FROM pg_stat_activity WHERE application_name = 'forge-observe' "
                                        "AND datname = current_database()")
                return {r["pid"] for r in pids} - {r["pid"] for r in killed}

            await eventually(reconnected, timeout=30, what="the writer to reconnect")
            await asyncio.sleep(1.0)
            stop.set()
            await asyncio.gather(*workers)
            after = (await http.get("/metrics")).text
    finally:
        await conn.close()
    assert statuses and set(statuses) == {200}, f"{len(statuses)} calls, statuses {set(statuses)}"
    written = _metric(after, "forge_observe_written_total", kind="spans")
    assert written > _metric(before, "forge_observe_written_total", kind="spans")
    dropped = _metric(after, "forge_observe_dropped_total")
    # what was lost is on /metrics (queue_full while the writer was away, or the batch in flight)
    print(f"calls={len(statuses)} spans written={written:.0f} dropped={dropped:.0f}")
    assert _metric(after, "forge_observe_writer_reconnects_total") >= 1


async def test_sigterm_flushes_buffered_logs_and_spans(forge_processes, forge_db_url):
    node = forge_processes({"app": APP, "observe": {"sample_rate": 1.0, "write_interval": 50.0,
                                                    "flush_interval": 3000.0}}, env=ENV)
    port = node.ready_info()["ports"]["http"]
    conn = await asyncpg.connect(forge_db_url)
    try:
        await asyncio.sleep(0.5)  # past the writer's first (start-up) pass
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            reply = await http.post("/rpc/boom", json={})
        trace_id = reply.headers["traceparent"].split("-")[1]
        await asyncio.sleep(0.5)
        assert await conn.fetchval("SELECT count(*) FROM forge_obs_spans WHERE trace_id = $1", trace_id) == 0
        node.signal(signal.SIGTERM)
        assert await asyncio.to_thread(node.proc.wait, 30) == 0
        assert await conn.fetchval("SELECT count(*) FROM forge_obs_spans WHERE trace_id = $1", trace_id) >= 2
        assert await conn.fetchval("SELECT count(*) FROM forge_obs_logs WHERE trace_id = $1 AND level = 'ERROR'",
                                   trace_id) >= 1
        assert await conn.fetchval("SELECT count(*) FROM forge_obs_metrics WHERE name = 'forge_function_calls_total' "
                                   "AND labels->>'function' = 'boom'") >= 1
    finally:
        await conn.close()
