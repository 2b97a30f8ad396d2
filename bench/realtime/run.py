"""forge-realtime benchmark: one run, one PostgreSQL (embedded, stock settings), real peers.

(a) write throughput at 32 writers (pgbench, single-row INSERT transactions): no capture,
    FORGE capture (statement trigger + change log + gated hint), and a NOTIFY per row.
(b) 1,000 clients on 100 distinct queries at 1,000 writes/s: commit-to-client latency for
    FORGE and for a naive peer that re-runs every subscription on each NOTIFY.
(c) 5,000 clients on one query at 50 writes/s: pushes/s, latency, re-runs per write.
(d) resident memory of the node per idle WebSocket connection.

Run: ``.venv/bin/python bench/realtime/run.py`` (``--quick`` for a smaller, faster run).
The node is a real ``forge-node`` process (gateway + realtime); clients and writers run in
this process, so client-side CPU is part of the measured latency for both peers.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg
import httpx
import msgspec
import psutil
import websockets  # noqa: F401 - the naive peer's server library

from forge_kernel import db as dbmod
from forge_kernel.embedded_pg import EmbeddedPostgres, _bin_dir
from forge_kernel.migrations import from_package, migrate
from forge_kernel.testing.procs import NodeProcess, free_port
from forge_realtime.capture import install_capture, remove_capture

sys.path.insert(0, str(Path(__file__).parent))
import wsclient  # noqa: E402

HERE = Path(__file__).parent
decode = msgspec.json.Decoder().decode


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def with_db(url: str, name: str) -> str:
    from forge_kernel.db import with_database

    return with_database(url, name)


# --- (a) write throughput ---------------------------------------------------------------------
INSERT_SCRIPT = "\\set topic random(0, 99)\nINSERT INTO bench_writes (topic, payload) VALUES (:topic, 'payload');\n"
NOTIFY_TRIGGER = """
CREATE OR REPLACE FUNCTION bench_notify_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_notify('bench_rows', NEW.topic::text); RETURN NULL; END $$;
CREATE OR REPLACE TRIGGER bench_notify_row AFTER INSERT ON bench_writes FOR EACH ROW EXECUTE FUNCTION bench_notify_row();
"""


def pgbench(url: str, clients: int, seconds: int, script: Path) -> float:
    out = subprocess.run([str(_bin_dir() / "pgbench"), "-n", "-c", str(clients), "-j", "2", "-T", str(seconds),
                          "-f", str(script), url], capture_output=True, text=True, check=True)
    for line in out.stdout.splitlines():
        if line.startswith("tps = "):
            return float(line.split()[2])
    raise RuntimeError(f"pgbench printed no tps:\n{out.stdout}\n{out.stderr}")


async def bench_writes(url: str, seconds: int, rounds: int, modes: tuple[str, ...]) -> dict:
    conn = await asyncpg.connect(url)
    await conn.execute("CREATE TABLE bench_writes (id bigserial PRIMARY KEY, topic integer NOT NULL, payload text NOT NULL)")
    script = Path(tempfile.mkdtemp()) / "insert.sql"
    script.write_text(INSERT_SCRIPT)
    results: dict[str, list[float]] = {m: [] for m in modes}
    logged: list[int] = []  # change-log rows written by each capture_on run
    install_ms: list[float] = []  # first-subscription cost: functions + 4 triggers + bookkeeping
    try:
        for _ in range(rounds):
            for mode in results:
                await remove_capture(conn, "bench_writes")
                await conn.execute("DROP TRIGGER IF EXISTS bench_notify_row ON bench_writes")
                if mode == "capture_on":
                    t0 = time.perf_counter()
                    await install_capture(conn, "bench_writes", ["topic"])
                    install_ms.append((time.perf_counter() - t0) * 1000)
                elif mode == "notify_per_row":
                    await conn.execute(NOTIFY_TRIGGER)
                await conn.execute("TRUNCATE bench_writes, forge_changes")
                await conn.execute("VACUUM ANALYZE bench_writes")
                await conn.execute("CHECKPOINT")
                tps = await asyncio.to_thread(pgbench, url, 32, seconds, script)
                results[mode].append(tps)
                if mode == "capture_on":
                    logged.append(await conn.fetchval("SELECT count(*) FROM forge_changes"))
                print(f"  (a) {mode:15s} {tps:9.0f} tps", flush=True)
    finally:
        await remove_capture(conn, "bench_writes")
        await conn.execute("DROP TABLE bench_writes")
        await conn.close()
    med = {k: statistics.median(v) for k, v in results.items()}
    return {"tps_runs": results, "tps_median": med,
            "ratio_capture_on_vs_off": med["capture_on"] / med["capture_off"],
            "ratio_notify_per_row_vs_off": med["notify_per_row"] / med["capture_off"] if "notify_per_row" in med else None,
            "change_log_rows_per_capture_run": logged,
            "capture_install_ms": install_ms}


# --- clients and writers ----------------------------------------------------------------------
class Client:
    """One benchmark socket (see wsclient.py): records (row id, receive time) of new rows."""

    __slots__ = ("proto", "max_id", "received", "pushes", "waiter")

    def __init__(self) -> None:
        self.proto, self.max_id, self.received, self.pushes, self.waiter = None, 0, [], 0, None

    def on_message(self, now: float, payload: bytes) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(decode(payload))
            return
        msg = decode(payload)
        if msg.get("type") != "data":
            return
        self.pushes += 1
        top = self.max_id
        for row in msg["data"]:
            rid = row["id"]
            if rid > self.max_id:
                self.received.append((rid, now))
                top = max(top, rid)
        self.max_id = top

    async def request(self, text: str) -> dict:
        self.waiter = asyncio.get_running_loop().create_future()
        self.proto.send(text)
        try:
            return await asyncio.wait_for(self.waiter, 60)
        finally:
            self.waiter = None


async def open_clients(url: str, n: int, subscription, concurrency: int = 50) -> list[Client]:
    """``subscription(i)`` -> (function, args) or None for an idle (authenticated, no subscription) socket."""
    clients: list[Client | None] = [None] * n
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with sem:
            c = Client()
            for attempt in range(5):
                try:
                    c.proto = await wsclient.connect(url, c.on_message)
                    break
                except (OSError, asyncio.TimeoutError, ConnectionError):
                    await asyncio.sleep(0.2 * (attempt + 1))
            else:
                raise RuntimeError(f"client {i} could not connect")
            assert (await c.request('{"type":"auth","token":null}'))["type"] == "ready"
            sub = subscription(i)
            if sub is not None:
                first = await c.request(json.dumps({"type": "subscribe", "id": "s", "function": sub[0], "args": sub[1]}))
                assert first["type"] == "data", first
                c.max_id = max([r["id"] for r in first["data"]], default=0)
            clients[i] = c

    await asyncio.gather(*(one(i) for i in range(n)))
    # thousands of long-lived client objects: keep them out of full GC passes, so the client
    # side adds no collection pauses to the latencies measured for either peer (the node does the same)
    gc.freeze()
    return clients  # type: ignore[return-value]


async def close_clients(clients: list[Client]) -> None:
    for c in clients:
        c.proto.close()
    await asyncio.sleep(0.5)


async def write_load(pool: asyncpg.Pool, rate: float, seconds: float, topic_of) -> dict[int, float]:
    commits: dict[int, float] = {}
    sem = asyncio.Semaphore(64)
    tasks = []

    async def one(topic: int) -> None:
        async with sem:
            async with pool.acquire() as conn:
                rid = await conn.fetchval("INSERT INTO bench_items (topic, payload) VALUES ($1, 'payload') RETURNING id",
                                          topic)
            commits[rid] = time.perf_counter()

    start = time.perf_counter()
    i = 0
    while True:
        target = start + i / rate
        now = time.perf_counter()
        if now - start >= seconds:
            break
        if target > now:
            await asyncio.sleep(target - now)
        tasks.append(asyncio.create_task(one(topic_of(i))))
        i += 1
    await asyncio.gather(*tasks)
    return commits


def latency_report(clients: list[Client], commits: dict[int, float], expected: int, seconds: float) -> dict:
    lat = [(t - commits[rid]) * 1000 for c in clients for rid, t in c.received if rid in commits]
    pushes = sum(c.pushes for c in clients)
    return {"writes": len(commits), "expected_deliveries": expected, "delivered": len(lat),
            "delivered_fraction": len(lat) / expected if expected else float("nan"),
            "p50_ms": pct(lat, 50), "p90_ms": pct(lat, 90), "p99_ms": pct(lat, 99), "max_ms": max(lat, default=float("nan")),
            "pushes": pushes, "pushes_per_s": pushes / seconds}


async def run_latency(url: str, db_url: str, n_clients: int, topics: int, rate: float, seconds: float,
                      grace: float = 5.0) -> tuple[dict, list[Client]]:
    clients = await open_clients(url, n_clients, lambda i: ("topic_latest", {"topic": i % topics}))
    pool = await asyncpg.create_pool(db_url, min_size=16, max_size=16)
    try:
        await asyncio.sleep(1.0)
        commits = await write_load(pool, rate, seconds, lambda i: i % topics)
        await asyncio.sleep(grace)  # let the last writes arrive (or show that they do not)
    finally:
        await pool.close()
    per_topic = n_clients / topics
    report = latency_report(clients, commits, int(len(commits) * per_topic), seconds)
    return report, clients


# --- the node ------------------------------------------------------------------------------------
async def node_port(db_url: str, node_id: str) -> int:
    conn = await asyncpg.connect(db_url)
    try:
        for _ in range(600):
            try:
                ports = await conn.fetchval("SELECT ports FROM forge_nodes WHERE id = $1 AND status = 'running'", node_id)
            except asyncpg.UndefinedTableError:  # migrations not applied yet
                ports = None
            ports = json.loads(ports) if isinstance(ports, str) else ports
            if ports and "http" in ports:
                return int(ports["http"])
            await asyncio.sleep(0.05)
    finally:
        await conn.close()
    raise RuntimeError("node did not publish its port")


def start_node(workdir: Path, db_url: str) -> NodeProcess:
    cfg = {"node": {"id": "bench", "roles": ["gateway", "function", "realtime"]},
           "database": {"url": db_url, "pool_min": 4, "pool_max": 30},
           "app": {"modules": ["bench_app"], "example": False},
           "log": {"level": "WARNING"},
           "gateway": {"port": 0},
           "realtime": {"max_concurrent_runs": 16, "max_subscriptions": 100, "subscribe_rate": 100.0}}
    env = {"PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    p = NodeProcess(workdir, cfg, env=env)
    p.start()
    # "ready in" is logged at INFO; with WARNING logs we wait for the published port instead
    return p


async def node_stats(port: int) -> dict:
    async with httpx.AsyncClient() as http:
        r = await http.post(f"http://127.0.0.1:{port}/rpc/bench_stats", json={})
        r.raise_for_status()
        return r.json()["data"]


# --- main ----------------------------------------------------------------------------------------
async def main(args: argparse.Namespace) -> dict:
    parts = set(args.only.split(","))
    root = Path(tempfile.mkdtemp(prefix="rtbench-"))
    pg = EmbeddedPostgres(root)  # stock settings (fsync and synchronous_commit on)
    admin_url = await asyncio.to_thread(pg.start)
    out: dict = {"args": vars(args)}
    node = None
    naive = None
    try:
        admin = await asyncpg.connect(admin_url)
        await admin.execute("CREATE DATABASE forge_bench")
        out["postgres"] = {k: await admin.fetchval(f"SHOW {k}") for k in (
            "server_version", "fsync", "synchronous_commit", "full_page_writes", "wal_level", "shared_buffers",
            "max_connections", "max_wal_size", "checkpoint_timeout", "work_mem")}
        await admin.close()
        db_url = with_db(admin_url, "forge_bench")
        out["machine"] = {"cpus": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
                          "load_average_at_start": os.getloadavg()}
        print(f"PostgreSQL {out['postgres']}\nmachine {out['machine']}", flush=True)

        if "a" in parts:
            # the write path alone: no node runs yet (its reader would compete for the same 2 cores)
            conn = await dbmod.connect(db_url)
            await migrate(conn, from_package("forge_realtime.sql", namespace="realtime"))
            await conn.close()
            print("(a) write throughput, 32 writers (no realtime node running)", flush=True)
            out["a_write_throughput"] = await bench_writes(db_url, args.write_seconds, args.write_rounds,
                                                           ("capture_off", "capture_on", "notify_per_row"))

        node = start_node(root / "node", db_url)
        port = await node_port(db_url, "bench")
        ws_url = f"ws://127.0.0.1:{port}/ws"
        proc = psutil.Process(node.pid)
        print(f"node pid {node.pid} serving {ws_url}", flush=True)

        if "d" in parts:
            print(f"(d) memory per idle connection ({args.idle} connections)", flush=True)
            warm = await open_clients(ws_url, 200, lambda i: None)  # warm up allocator and code paths
            await close_clients(warm)
            await asyncio.sleep(2.0)
            rss0 = proc.memory_info().rss
            idle = await open_clients(ws_url, args.idle, lambda i: None)
            await asyncio.sleep(2.0)
            rss1 = proc.memory_info().rss
            out["d_idle_memory"] = {"connections": args.idle, "rss_before_mb": rss0 / 2**20, "rss_after_mb": rss1 / 2**20,
                                    "bytes_per_connection": (rss1 - rss0) / args.idle}
            print(f"  {out['d_idle_memory']}", flush=True)
            await close_clients(idle)

        if "a" in parts:
            print("(a') capture on while the realtime node reads the change log", flush=True)
            out["a_with_reader"] = await bench_writes(db_url, args.write_seconds, max(1, args.write_rounds - 1),
                                                      ("capture_off", "capture_on"))

        if "b" in parts:
            for rate in args.b_rates:
                print(f"(b) {args.b_clients} clients / {args.b_topics} queries / {rate:g} writes/s: FORGE", flush=True)
                before = await node_stats(port)
                proc.cpu_percent(None)  # start the CPU measurement window
                rep, clients = await run_latency(ws_url, db_url, args.b_clients, args.b_topics, rate, args.seconds)
                after = await node_stats(port)
                rep["reruns_per_write"] = (after["runs"] - before["runs"]) / max(1, rep["writes"])
                rep["node_cpu_percent"] = proc.cpu_percent(None)
                await close_clients(clients)
                out.setdefault("b_forge", {})[f"{rate:g}"] = rep
                print(f"  {rep}", flush=True)

        if "c" in parts:
            print(f"(c) {args.c_clients} clients on one query at {args.c_rate:g} writes/s: FORGE", flush=True)
            clients = await open_clients(ws_url, args.c_clients, lambda i: ("topic_latest", {"topic": 1000}))
            pool = await asyncpg.create_pool(db_url, min_size=8, max_size=8)
            before = await node_stats(port)
            proc.cpu_percent(None)
            await asyncio.sleep(1.0)
            commits = await write_load(pool, args.c_rate, args.seconds, lambda i: 1000)
            await asyncio.sleep(5.0)
            after = await node_stats(port)
            await pool.close()
            rep = latency_report(clients, commits, len(commits) * args.c_clients, args.seconds)
            rep["reruns_per_write"] = (after["runs"] - before["runs"]) / max(1, rep["writes"])
            rep["node_pushes_per_s"] = (after["pushes"] - before["pushes"]) / args.seconds
            rep["node_cpu_percent"] = proc.cpu_percent(None)
            out["c_forge_fanout"] = rep
            print(f"  {rep}", flush=True)
            await close_clients(clients)

        node.terminate(30)
        node = None

        if "naive" in parts:
            conn = await asyncpg.connect(db_url)
            await remove_capture(conn, "bench_items")  # the naive peer's writes pay only for its own trigger
            await conn.close()
            naive_port = free_port()
            naive = subprocess.Popen([sys.executable, str(HERE / "naive_peer.py"), db_url, str(naive_port)],
                                     stdout=subprocess.PIPE, text=True)
            assert "ready" in naive.stdout.readline()
            naive_proc = psutil.Process(naive.pid)
            for rate in args.b_rates:
                print(f"(b) {args.b_clients} clients / {args.b_topics} queries / {rate:g} writes/s: naive peer", flush=True)
                naive_proc.cpu_percent(None)
                rep, clients = await run_latency(f"ws://127.0.0.1:{naive_port}", db_url, args.b_clients, args.b_topics,
                                                 rate, args.seconds)
                rep["reruns_per_write"] = float(args.b_clients)  # by construction: every subscription per NOTIFY
                rep["peer_cpu_percent"] = naive_proc.cpu_percent(None)
                await close_clients(clients)
                out.setdefault("b_naive", {})[f"{rate:g}"] = rep
                print(f"  {rep}", flush=True)
                await asyncio.sleep(3.0)  # let the naive peer's backlog drain before the next rate
        ratios = {}
        if "a_write_throughput" in out:
            ratios["a_capture_on_vs_off"] = out["a_write_throughput"]["ratio_capture_on_vs_off"]
            ratios["a_notify_per_row_vs_off"] = out["a_write_throughput"]["ratio_notify_per_row_vs_off"]
            ratios["a_capture_on_with_reader_vs_off"] = out["a_with_reader"]["ratio_capture_on_vs_off"]
        for rate in out.get("b_forge", {}):
            f, n = out["b_forge"][rate], out.get("b_naive", {}).get(rate)
            if n:
                ratios[f"b_{rate}_p50_naive_vs_forge"] = n["p50_ms"] / f["p50_ms"]
                ratios[f"b_{rate}_p99_naive_vs_forge"] = n["p99_ms"] / f["p99_ms"]
                ratios[f"b_{rate}_delivered_forge_naive"] = [f["delivered_fraction"], n["delivered_fraction"]]
        out["ratios"] = ratios
        out["machine"]["load_average_at_end"] = os.getloadavg()
    finally:
        if node is not None:
            node.terminate(30)
        if naive is not None:
            naive.terminate()
            naive.wait(10)
        await asyncio.to_thread(pg.release)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10.0, help="write duration of (b) and (c)")
    ap.add_argument("--write-seconds", type=int, default=10, help="pgbench duration per mode in (a)")
    ap.add_argument("--write-rounds", type=int, default=3, help="rounds of the three modes in (a)")
    ap.add_argument("--b-clients", type=int, default=1000)
    ap.add_argument("--b-topics", type=int, default=100)
    ap.add_argument("--b-rates", default="100,300,1000", help="write rates of (b), comma-separated")
    ap.add_argument("--c-clients", type=int, default=5000)
    ap.add_argument("--c-rate", type=float, default=50.0)
    ap.add_argument("--idle", type=int, default=2000)
    ap.add_argument("--only", default="a,b,c,d,naive", help="parts to run (a, b, c, d, naive)")
    ap.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    ap.add_argument("--output", default=str(HERE / "last_run.json"))
    a = ap.parse_args()
    if a.quick:
        a.seconds, a.write_seconds, a.write_rounds = 3.0, 3, 1
        a.b_clients, a.b_topics, a.b_rates, a.c_clients, a.idle = 100, 10, "100", 200, 200
    a.b_rates = [float(x) for x in str(a.b_rates).split(",")]
    import uvloop  # clients and writers on the same loop as both servers: less harness CPU in the latencies

    result = uvloop.run(main(a))
    Path(a.output).write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps(result.get("ratios", {}), indent=2))
    print(f"results written to {a.output}")
