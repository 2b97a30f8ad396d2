"""bench/rpc: FORGE ``POST /rpc/value`` against a bare Litestar + asyncpg app doing the same SELECT.

Both run in one process each on uvicorn + httptools with the same event loop, against the same
embedded PostgreSQL (stock durability settings), with the same pool size, driven by ``wrk``
(C, so the load generator is not the bottleneck). Rounds alternate FORGE and bare so drift in
machine load hits both. Prints req/s, p50, p99 per round, the medians and the ratio, and a
JSON-RPC batch of 10 calls.

When ``pgbouncer`` is installed, a second FORGE node takes its turn in every round with its pool
through PgBouncer in transaction mode (``[database] url``, pool_size = ``--pool-max``; sessions go
straight to the server, ``direct_url``): its ratio to the direct FORGE node is printed, with
PgBouncer's own CPU per request.

    .venv/bin/python bench/rpc/run.py [--duration 10] [--connections 32] [--rounds 3] [--observe | --observe-only]
    .venv/bin/python bench/rpc/run.py --instructions 1000

The FORGE node runs without forge-observe (``FORGE_DISABLE_PLUGINS=observe``). ``--observe`` adds
the same node with forge-observe at its defaults to every round; ``--observe-only`` runs just the
two of them (many short rounds fit in the same time). Contenders take turns in a round, in rotating
orders (reversed every other round); the with/without ratio is printed as the ratio of medians and as the
median of each round's own ratio, with the CPU each request cost in the server process; that median
has a distribution-free ~95 % interval and a verdict against 0.95 (met, missed, undecided), and
``--control`` adds the plain node's twin to every round (an A/A control in the same run).
``--instructions N`` counts, with callgrind, the CPU instructions a request costs each node
instead: a figure that does not move with the machine's load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import httpx

from forge_kernel.embedded_pg import EmbeddedPostgres
from forge_kernel.testing import free_port, wait_for
from forge_kernel.testing.procs import exit_on_sigterm, write_config
from forge_kernel.testing.servers import PgBouncer, private_folder, server_of

HERE = Path(__file__).resolve().parent
PY = sys.executable


def wrk_script(path: Path, body: str, url_path: str) -> Path:
    path.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = {json.dumps(body)}\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.path = "{url_path}"\n'
    )
    return path


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    value, unit = float(m.group(1)), m.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


CLK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def postgres_cpu(postmaster: int) -> float:
    """CPU of the PostgreSQL server: the postmaster and every backend it forked (live ones)."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == postmaster or int(entry.name) == postmaster:
            total += (int(fields[11]) + int(fields[12])) / CLK
    return total


def run_wrk(url: str, script: Path, duration: int, connections: int, threads: int = 1,
            server_pid: int | None = None, postmaster: int | None = None, pooler_pid: int | None = None) -> dict:
    cpu0 = cpu_seconds(server_pid) if server_pid else 0.0
    pg0 = postgres_cpu(postmaster) if postmaster else 0.0
    pool0 = cpu_seconds(pooler_pid) if pooler_pid else 0.0
    out = subprocess.run(["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--latency", "-s", str(script), url],
                         capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p50 = _ms(re.search(r"\s50%\s+(\S+)", out).group(1))
    p99 = _ms(re.search(r"\s99%\s+(\S+)", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: (.*)", out)
    total = int(re.search(r"(\d+) requests in", out).group(1))
    res = {"rps": rps, "p50_ms": p50, "p99_ms": p99, "non2xx": int(errors.group(1)) if errors else 0,
           "socket_errors": sock.group(1) if sock else ""}
    if server_pid:
        res["server_cpu_us_per_req"] = (cpu_seconds(server_pid) - cpu0) / total * 1e6
    if postmaster:
        # backends that exited during the run are not counted; pools keep theirs open
        res["pg_cpu_us_per_req"] = (postgres_cpu(postmaster) - pg0) / total * 1e6
    if pooler_pid:
        res["pgbouncer_cpu_us_per_req"] = (cpu_seconds(pooler_pid) - pool0) / total * 1e6
    return res


def stop_process(p: subprocess.Popen, grace: float = 20) -> None:
    """SIGTERM to the process group a server was started in (a node then leaves the cluster's node
    table, so the next node started has no stale peer); SIGKILL after ``grace`` seconds."""
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(30)


def aggregate_now(p: subprocess.Popen, folder: Path, timeout: float, what: str) -> None:
    """Make a node started through observed_node.py aggregate and write its queued spans now (SIGUSR1)
    and wait until it has (it touches ``aggregated`` in ``folder``, its working directory)."""
    done = folder / "aggregated"
    done.unlink(missing_ok=True)
    os.kill(p.pid, signal.SIGUSR1)
    wait_for(done.exists, timeout, 0.1, what)


def median_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float, float]:
    """The median of ``values``, a distribution-free confidence interval for it (order statistics:
    the k-th smallest and k-th largest, k the largest with P(Binomial(n, 1/2) < k) <= (1 - level) / 2),
    so one disturbed round moves neither end much, and the interval's coverage. Too few values for
    ``level`` (fewer than 6 for 95 %): the smallest and the largest, covering less."""
    ordered, n = sorted(values), len(values)
    k, tail = 1, 0.0
    while k < n:
        tail += math.comb(n, k - 1) / 2 ** n  # P(X <= k - 1)
        if tail > (1 - level) / 2:
            break
        k += 1
    k = max(1, k - 1)
    coverage = 1 - 2 * sum(math.comb(n, j) for j in range(k)) / 2 ** n
    return statistics.median(ordered), ordered[k - 1], ordered[n - k], coverage


def verdict(low: float, high: float, coverage: float, target: float) -> str:
    if coverage < 0.95:
        return f"TOO FEW ROUNDS (the interval covers {coverage:.0%}; 6 rounds or more make it 95 %)"
    if low >= target:
        return f"MET (the whole interval is >= {target})"
    if high < target:
        return f"MISSED (the whole interval is < {target})"
    return f"UNDECIDED (the interval spans {target}: more rounds, or a quieter machine)"


def check(url: str, body: dict | list, expect: object) -> None:
    r = httpx.post(url, json=body, timeout=10)
    r.raise_for_status()
    got = r.json()
    if got != expect:
        raise SystemExit(f"{url} answered {got!r}, expected {expect!r}")


def instructions_per_request(tmp: Path, env: dict, n: int, who: str, db_url: str, keep_dumps: str = "") -> float:
    """CPU instructions one request costs the server ``who`` (forge, observe, bare or raw), counted
    by callgrind (steady on a shared machine, where timings swing by 2x): the server runs under
    valgrind with instrumentation off, is warmed up, then ``n`` requests (8 at a time) are counted.
    forge-observe's timed loops (metric snapshots every 10 s, writes every 0.5 s) would run 50x
    more often per request under valgrind's slowdown: they are slowed down too (``flush_interval``
    3600 s, ``write_interval`` 60 s, its most, then an hour: observed_node.py), and so is the slow-trace threshold (3600 s: under valgrind
    a call of a few ms takes over the default 1 s, and every such trace would be stored); its
    aggregation (every 0.5 s: batches of thousands of events at full speed, tens under valgrind)
    runs once on the measured requests' events, before counting stops, followed by the writing of
    their sampled spans (observed_node.py), so the
    figure is the per-request path plus the aggregation of its events."""
    port, out = free_port(), tmp / f"callgrind.{who}"
    # the node's full collection every 60 s falls into one window and not the other (~1.9M instructions,
    # ~1k per request of 2,000): a cost per minute, not per request, left out of both
    node_env = {**env, "FORGE_GATEWAY__PORT": str(port), "FORGE_NODE__GC_COLLECT_INTERVAL": "0"}
    if who == "observe":
        node_env.update(FORGE_OBSERVE__FLUSH_INTERVAL="3600", FORGE_OBSERVE__WRITE_INTERVAL="60",
                        FORGE_OBSERVE__SLOW_THRESHOLD="3600", FORGE_NODE__ID="bench-observe-cg")
    elif who == "forge":
        node_env.update(FORGE_DISABLE_PLUGINS="observe", FORGE_NODE__ID="bench-cg")
    if who == "observe":  # its aggregation on SIGUSR1 only (observed_node.py)
        argv, path, ready = [PY, str(HERE / "observed_node.py"), "start"], "/rpc/value", "/ready"
    elif who == "forge":
        argv, path, ready = [PY, "-m", "forge_kernel.cli", "start"], "/rpc/value", "/ready"
    else:
        argv = [PY, str(HERE / f"{who}_app.py"), "--port", str(port), "--db-url", db_url, "--loop", "uvloop"]
        path, ready = "/value", None
    proc = subprocess.Popen(["valgrind", "--tool=callgrind", "--instr-atstart=no", "--cache-sim=no",
                             f"--callgrind-out-file={out}", *argv], cwd=tmp,
                            env=node_env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    async def load(count: int) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            async def worker(k: int) -> None:
                for _ in range(k):
                    assert (await client.post(path, json={"id": 7})).status_code == 200
            await asyncio.gather(*(worker(count // 8) for _ in range(8)))

    def control(*argv: str) -> None:
        subprocess.run(["callgrind_control", *argv, str(proc.pid)], check=True, stdout=subprocess.DEVNULL)

    def up() -> bool:
        try:
            if ready:
                return httpx.get(url + ready, timeout=30).status_code == 200
            return httpx.post(url + path, json={"id": 1}, timeout=30).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, 600, 1, f"{who} under valgrind")
        def aggregate() -> None:
            if who == "observe":
                aggregate_now(proc, tmp, 600, "forge-observe's aggregation under valgrind")

        asyncio.run(load(400))
        aggregate()  # the warm-up's spans written: the writer's COPY is prepared before counting starts
        control("-z")
        control("-i", "on")
        asyncio.run(load(n))
        aggregate()  # the measured requests' events folded in one batch, as at full speed, and their spans written
        control("-i", "off")
        control("-d", "measured")
        time.sleep(1)
        for dump in tmp.glob(out.name + "*"):
            text = dump.read_text(errors="replace")
            if re.search(r"^desc: Trigger: dump measured", text, re.M):
                if keep_dumps:  # for callgrind_annotate: where the instructions went, by C function
                    shutil.copy(dump, Path(keep_dumps) / f"callgrind.{who}")
                return int(re.search(r"^totals: (\d+)", text, re.M).group(1)) / (n // 8 * 8)
        raise SystemExit("callgrind wrote no dump for the measured requests")
    finally:
        # not SIGKILL: a stale node row made the next counted node's mesh dial it (~0.4k instructions per request)
        stop_process(proc, grace=120)


async def pg_settings(url: str) -> dict:
    conn = await asyncpg.connect(url)
    try:
        names = ["server_version", "fsync", "synchronous_commit", "full_page_writes", "shared_buffers",
                 "max_connections", "wal_level"]
        return {n: await conn.fetchval(f"SHOW {n}") for n in names}
    finally:
        await conn.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pool-max", type=int, default=20)
    ap.add_argument("--row-security", default="auto", choices=["auto", "on", "off"],
                    help="[app] row_security of the FORGE node: 'on' puts the caller into every call's transaction")
    ap.add_argument("--loop", default="uvloop", choices=["uvloop", "asyncio"],
                    help="event loop of both servers ([node] event_loop for FORGE, uvicorn --loop for bare)")
    ap.add_argument("--observe", action="store_true",
                    help="also run the FORGE node with forge-observe at its defaults and compare (target >= 0.95)")
    ap.add_argument("--observe-only", action="store_true",
                    help="run only FORGE with and without forge-observe (no bare app, no PgBouncer)")
    ap.add_argument("--fresh-nodes", action="store_true",
                    help="with --observe-only: start both FORGE nodes anew before every round (per-process "
                         "randomness then varies round to round instead of biasing the whole run)")
    ap.add_argument("--control", action="store_true",
                    help="with --observe-only: a third node WITHOUT forge-observe takes its turn in every round too "
                         "(an A/A control in the same run: how far apart two identical nodes measure, with its interval)")
    ap.add_argument("--servers", default="forge,observe,bare,raw",
                    help="with --instructions: which servers to count (comma-separated)")
    ap.add_argument("--no-pgbouncer", action="store_true", help="leave out the FORGE node through PgBouncer")
    ap.add_argument("--instructions", type=int, default=0, metavar="N",
                    help="instead of wrk rounds: CPU instructions per request of FORGE with and without forge-observe, bare and raw, "
                         "counted by callgrind over N requests each (needs valgrind)")
    ap.add_argument("--observe-env", action="append", default=[], metavar="KEY=VALUE",
                    help="with --observe: an environment variable for the node with forge-observe only, e.g. "
                         "FORGE_OBSERVE__SAMPLE_RATE=0 (the plain nodes refuse an [observe] key); repeatable")
    ap.add_argument("--busy-load", type=float, default=2.0, metavar="LOAD",
                    help="with --observe: a 1-minute load average above LOAD after any turn marks the run's verdict as "
                         "taken on a busy machine (other work then moves the ratio more than forge-observe does)")
    ap.add_argument("--keep-dumps", default="", metavar="DIR",
                    help="with --instructions: copy each server's callgrind dump of the measured requests into DIR")
    args = ap.parse_args()
    bad = [kv for kv in args.observe_env if "=" not in kv or not kv.split("=", 1)[0].startswith("FORGE_OBSERVE__")]
    if bad:
        ap.error(f"--observe-env takes FORGE_OBSERVE__KEY=VALUE, got {bad[0]!r}")
    observe_env = dict(kv.split("=", 1) for kv in args.observe_env)
    if observe_env:
        print(f"the node with forge-observe runs with {observe_env}", flush=True)
    args.observe = args.observe or args.observe_only
    if (args.fresh_nodes or args.control) and not args.observe_only:
        raise SystemExit("--fresh-nodes and --control go with --observe-only")
    if args.instructions and not shutil.which("valgrind"):
        raise SystemExit("--instructions needs valgrind: apt-get install -y valgrind")
    if not args.instructions and not shutil.which("wrk"):
        raise SystemExit("wrk is required: apt-get install -y wrk")

    load_start = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="forge-bench-rpc-"))
    tmp.chmod(0o711)  # as root the server runs as forge_pg, which must pass through to tmp/pg
    # stock settings (fsync on, synchronous_commit on); also on 127.0.0.1 for PgBouncer, which runs as
    # another account than the server and cannot enter its private socket folder
    pg = EmbeddedPostgres(tmp / "pg", tcp_port=free_port())
    procs: list[subprocess.Popen] = []
    bouncer = None
    try:
        db_url = pg.start()
        settings = asyncio.run(pg_settings(db_url))
        forge_port, bare_port = free_port(), free_port()
        cfg = write_config(tmp / "forge.toml", {
            "database": {"url": db_url, "pool_min": 2, "pool_max": args.pool_max},
            "app": {"modules": ["bench_app"], "example": False, "row_security": args.row_security},
            "gateway": {"port": forge_port},
            "log": {"level": "WARNING"},
            # a gateway node: the roles of other installed plugins (worker, scheduler, realtime) would run
            # their background loops in this process and skew its CPU figures
            "node": {"id": "bench", "roles": ["gateway", "function"], "event_loop": args.loop},
        })
        env = {**os.environ, "FORGE_CONFIG": str(cfg), "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))}
        if args.instructions:
            counts = {who: instructions_per_request(tmp, env, args.instructions, who, db_url, args.keep_dumps)
                      for who in args.servers.split(",")}
            if set(counts) != {"forge", "observe", "bare", "raw"}:
                print(", ".join(f"{who} {n:,.0f}" for who, n in counts.items()) + " CPU instructions per request")
                return
            without, with_ = counts["forge"], counts["observe"]
            print(f"CPU instructions per request (callgrind, {args.instructions} requests each): FORGE without "
                  f"forge-observe {without:,.0f}, with {with_:,.0f} ({with_ - without:+,.0f}, "
                  f"{(with_ / without - 1) * 100:+.1f}%); bare Litestar {counts['bare']:,.0f}, raw ASGI "
                  f"{counts['raw']:,.0f}; bare / FORGE with forge-observe {counts['bare'] / with_:.3f}, raw / "
                  f"FORGE {counts['raw'] / with_:.3f}; load average {os.getloadavg()}")
            return
        obs_port = free_port() if args.observe else 0
        observed = f"http://127.0.0.1:{obs_port}" if args.observe else ""

        control_port = free_port() if args.control else 0
        control = f"http://127.0.0.1:{control_port}" if args.control else ""

        def start_nodes() -> tuple[subprocess.Popen, subprocess.Popen | None, subprocess.Popen | None]:
            # the FORGE node as before forge-observe existed; with --observe a second one has it
            forge_proc = subprocess.Popen([PY, "-m", "forge_kernel.cli", "start"], cwd=tmp,
                                          env={**env, "FORGE_DISABLE_PLUGINS": "observe"},
                                          stdout=open(tmp / "forge.log", "ab"), stderr=subprocess.STDOUT,
                                          start_new_session=True)
            procs.append(forge_proc)
            observed_proc = None
            if args.observe:
                observed_proc = subprocess.Popen([PY, "-m", "forge_kernel.cli", "start"], cwd=tmp,
                                                 env={**env, "FORGE_GATEWAY__PORT": str(obs_port),
                                                      "FORGE_NODE__ID": "bench-observe", **observe_env},
                                                 stdout=open(tmp / "forge-observe.log", "ab"),
                                                 stderr=subprocess.STDOUT, start_new_session=True)
                procs.append(observed_proc)
            control_proc = None
            if args.control:  # the A/A control: the first node's twin
                control_proc = subprocess.Popen([PY, "-m", "forge_kernel.cli", "start"], cwd=tmp,
                                                env={**env, "FORGE_GATEWAY__PORT": str(control_port),
                                                     "FORGE_NODE__ID": "bench-control", "FORGE_DISABLE_PLUGINS": "observe"},
                                                stdout=open(tmp / "forge-control.log", "ab"),
                                                stderr=subprocess.STDOUT, start_new_session=True)
                procs.append(control_proc)
            return forge_proc, observed_proc, control_proc

        forge_proc, observed_proc, control_proc = start_nodes()
        pooled_port, pooled_proc = 0, None
        if PgBouncer.binary() and not args.observe_only and not args.no_pgbouncer:
            # the embedded server's URL names a socket folder and a password file: PgBouncer gets its TCP port
            _, port, user, password = server_of(db_url)
            bouncer = PgBouncer(private_folder("forge-bench-rpc-pgbouncer-"), "127.0.0.1", port, {user: password},
                                pool_size=args.pool_max).start()
            pooled_port = free_port()
            pooled_dir = tmp / "pooled"
            pooled_dir.mkdir()
            pooled_cfg = write_config(pooled_dir / "forge.toml", {
                "database": {"url": bouncer.url(urlsplit(db_url).path.lstrip("/"), user), "direct_url": db_url,
                             "pool_min": 2, "pool_max": args.pool_max},
                "app": {"modules": ["bench_app"], "example": False},
                "gateway": {"port": pooled_port},
                "log": {"level": "WARNING"},
                "node": {"id": "bench-pgbouncer", "roles": ["gateway", "function"], "event_loop": args.loop},
            })
            pooled_proc = subprocess.Popen([PY, "-m", "forge_kernel.cli", "start"], cwd=pooled_dir,
                                           env={**env, "FORGE_CONFIG": str(pooled_cfg)},
                                           stdout=open(pooled_dir / "forge.log", "wb"), stderr=subprocess.STDOUT,
                                           start_new_session=True)
            procs.append(pooled_proc)
        bare_proc = subprocess.Popen([PY, str(HERE / "bare_app.py"), "--port", str(bare_port), "--db-url", db_url,
                                      "--pool-max", str(args.pool_max), "--loop", args.loop],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(bare_proc)
        raw_port = free_port()
        raw_proc = subprocess.Popen([PY, str(HERE / "raw_app.py"), "--port", str(raw_port), "--db-url", db_url,
                                     "--pool-max", str(args.pool_max), "--loop", args.loop],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(raw_proc)
        raw = f"http://127.0.0.1:{raw_port}"
        forge = f"http://127.0.0.1:{forge_port}"
        bare = f"http://127.0.0.1:{bare_port}"
        pooled = f"http://127.0.0.1:{pooled_port}"
        wait_for(lambda: httpx.get(forge + "/ready").status_code == 200, 60, 0.2, "FORGE node")
        wait_for(lambda: httpx.post(bare + "/value", json={"id": 1}).status_code == 200, 60, 0.2, "bare app")
        check(forge + "/rpc/value", {"id": 7}, {"data": 8})
        check(bare + "/value", {"id": 7}, {"data": 8})
        wait_for(lambda: httpx.post(raw + "/value", json={"id": 1}).status_code == 200, 60, 0.2, "raw ASGI app")
        check(raw + "/value", {"id": 7}, {"data": 8})
        if bouncer:
            try:
                wait_for(lambda: httpx.get(pooled + "/ready").status_code == 200, 60, 0.2, "FORGE node through PgBouncer")
            except TimeoutError:
                raise SystemExit("the FORGE node through PgBouncer did not start:\n"
                                 + (tmp / "pooled" / "forge.log").read_text(errors="replace")[-3000:]) from None
            check(pooled + "/rpc/value", {"id": 7}, {"data": 8})
        if observed:
            wait_for(lambda: httpx.get(observed + "/ready").status_code == 200, 60, 0.2, "FORGE node with forge-observe")
            check(observed + "/rpc/value", {"id": 7}, {"data": 8})
            if "forge_function_calls_total" not in httpx.get(observed + "/metrics").text:
                raise SystemExit("the node with forge-observe serves no metrics: is forge-observe installed?")
        if control:
            wait_for(lambda: httpx.get(control + "/ready").status_code == 200, 60, 0.2, "the control FORGE node")
            check(control + "/rpc/value", {"id": 7}, {"data": 8})
        batch = [{"jsonrpc": "2.0", "method": "value", "params": {"id": i}, "id": i} for i in range(10)]
        check(forge + "/rpc", batch, [{"jsonrpc": "2.0", "result": i + 1, "id": i} for i in range(10)])

        s_forge = wrk_script(tmp / "forge.lua", json.dumps({"id": 7}), "/rpc/value")
        s_bare = wrk_script(tmp / "bare.lua", json.dumps({"id": 7}), "/value")
        s_batch = wrk_script(tmp / "batch.lua", json.dumps(batch), "/rpc")
        # warm-up: prepared statements, pool connections, CPU caches
        run_wrk(forge, s_forge, 2, args.connections)
        run_wrk(bare, s_bare, 2, args.connections)
        contenders = [("forge", forge, s_forge, forge_proc.pid)]
        if observed:
            run_wrk(observed, s_forge, 2, args.connections)
            contenders.append(("observe", observed, s_forge, observed_proc.pid))
        if control:
            run_wrk(control, s_forge, 2, args.connections)
            contenders.append(("control", control, s_forge, control_proc.pid))
        if not args.observe_only:
            run_wrk(raw, s_bare, 2, args.connections)
            contenders.append(("bare", bare, s_bare, bare_proc.pid))
            contenders.append(("raw", raw, s_bare, raw_proc.pid))
        if bouncer:
            run_wrk(pooled, s_forge, 2, args.connections)
            contenders.append(("pgbouncer", pooled, s_forge, pooled_proc.pid))
        postmaster = int((pg.pgdata / "postmaster.pid").read_text().split()[0])
        results: dict[str, list[dict]] = {name: [] for name, *_ in contenders}
        results["batch10"] = []

        def order(i: int) -> list[int]:
            """Round ``i``'s order: the contenders rotated by i // 2, reversed in odd rounds (two: as
            listed, then reversed; three: all six orders in six rounds): none always takes the same turn."""
            n = len(contenders)
            turn = [(k + i // 2) % n for k in range(n)]
            return turn[::-1] if i % 2 else turn

        for i in range(args.rounds):
            if args.fresh_nodes and i:
                # the FORGE nodes anew: what a process start draws at random (string hash seed, so which
                # attribute lookups collide in CPython's type cache; addresses) stays for the process's
                # life, so with the same processes in every round it biases a whole run one way
                for p in (forge_proc, observed_proc, control_proc):
                    if p is not None:
                        stop_process(p)
                        procs.remove(p)
                forge_proc, observed_proc, control_proc = start_nodes()
                pids = {"forge": forge_proc.pid, "observe": observed_proc.pid,
                        "control": control_proc.pid if control_proc else 0}
                for url in filter(None, (forge, observed, control)):
                    wait_for(lambda: httpx.get(url + "/ready").status_code == 200, 60, 0.2, "FORGE node")
                    run_wrk(url, s_forge, 2, args.connections)  # warm-up, as before the first round
                contenders = [(n, u, sc, pids[n]) for n, u, sc, _ in contenders]
            for name, url, script, pid in (contenders[k] for k in order(i)):
                res = run_wrk(url, script, args.duration, args.connections, server_pid=pid, postmaster=postmaster,
                              pooler_pid=bouncer.proc.pid if name == "pgbouncer" else None)
                res["load1"] = os.getloadavg()[0]
                results[name].append(res)
                extra = f" pgbouncer {res['pgbouncer_cpu_us_per_req']:4.0f} us" if name == "pgbouncer" else ""
                print(f"round {i + 1} {name:9s} {res['rps']:9.0f} req/s  p50 {res['p50_ms']:6.2f} ms  "
                      f"p99 {res['p99_ms']:6.2f} ms  cpu/req server {res['server_cpu_us_per_req']:5.0f} us "
                      f"postgres {res['pg_cpu_us_per_req']:5.0f} us{extra}  non-2xx {res['non2xx']} "
                      f"{res['socket_errors']}  (load avg {res['load1']:.1f})", flush=True)
        for i in range(0 if args.observe_only else max(1, args.rounds - 1)):
            res = run_wrk(forge, s_batch, args.duration, args.connections, server_pid=forge_proc.pid, postmaster=postmaster)
            results["batch10"].append(res)
            print(f"round {i + 1} batch10 {res['rps']:8.0f} req/s ({res['rps'] * 10:.0f} calls/s)  "
                  f"p50 {res['p50_ms']:6.2f} ms  p99 {res['p99_ms']:6.2f} ms  non-2xx {res['non2xx']}", flush=True)

        def med(name: str, key: str) -> float:
            return statistics.median(r[key] for r in results[name])

        keys = ("rps", "p50_ms", "p99_ms", "server_cpu_us_per_req", "pg_cpu_us_per_req")
        summary = {name: {k: med(name, k) for k in keys} for name in results if results[name]}
        if bouncer:
            summary["pgbouncer"]["pgbouncer_cpu_us_per_req"] = med("pgbouncer", "pgbouncer_cpu_us_per_req")
        # req/s on a shared 2-core machine swings with other load; CPU per request is the steadier
        # measure of the work each side does (server process + PostgreSQL backends)
        def cost_of(s: dict) -> float:
            return s["server_cpu_us_per_req"] + s["pg_cpu_us_per_req"] + s.get("pgbouncer_cpu_us_per_req", 0.0)

        cost = {n: cost_of(summary[n]) for n in ("forge", "bare") if n in summary}
        def per_round(a: str, b: str) -> float:
            return statistics.median(x["rps"] / y["rps"] for x, y in zip(results[a], results[b]))

        if "bare" in summary:
            summary["ratio_forge_over_bare"] = summary["forge"]["rps"] / summary["bare"]["rps"]
            summary["ratio_forge_over_bare_per_round"] = per_round("forge", "bare")
            summary["cpu_ratio_bare_over_forge"] = cost["bare"] / cost["forge"]
            summary["ratio_raw_over_bare"] = summary["raw"]["rps"] / summary["bare"]["rps"]
            summary["ratio_raw_over_bare_per_round"] = per_round("raw", "bare")
            summary["ratio_forge_over_raw"] = summary["forge"]["rps"] / summary["raw"]["rps"]
            if observed:
                summary["ratio_observe_over_bare"] = summary["observe"]["rps"] / summary["bare"]["rps"]
                summary["ratio_observe_over_bare_per_round"] = per_round("observe", "bare")
        def paired(a: str, b: str) -> dict:
            """``a`` / ``b`` round by round (req/s, and CPU per request of server + PostgreSQL inverted:
            b's / a's), each the median with its ~95 % interval (median_interval)."""
            rps = median_interval([x["rps"] / y["rps"] for x, y in zip(results[a], results[b])])
            cpu = median_interval([(y["server_cpu_us_per_req"] + y["pg_cpu_us_per_req"])
                                   / (x["server_cpu_us_per_req"] + x["pg_cpu_us_per_req"])
                                   for x, y in zip(results[a], results[b])])
            return {"rps": rps, "cpu": cpu, "rounds": len(results[a])}

        if observed:
            with_, without = summary["observe"], summary["forge"]
            summary["ratio_observe_over_forge"] = with_["rps"] / without["rps"]
            summary["observe_over_forge_paired"] = paired("observe", "forge")
            summary["ratio_observe_over_forge_per_round"] = summary["observe_over_forge_paired"]["rps"][0]
            if control:
                summary["control_over_forge_paired"] = paired("control", "forge")
            summary["observe_server_cpu_us_per_req_added"] = (with_["server_cpu_us_per_req"]
                                                              - without["server_cpu_us_per_req"])
            summary["observe_pg_cpu_us_per_req_added"] = with_["pg_cpu_us_per_req"] - without["pg_cpu_us_per_req"]
        if bouncer:
            pooled_cost = cost_of(summary["pgbouncer"])
            summary["ratio_pgbouncer_over_direct"] = summary["pgbouncer"]["rps"] / summary["forge"]["rps"]
            summary["cpu_ratio_direct_over_pgbouncer"] = cost["forge"] / pooled_cost
        if "batch10" in summary:
            summary["batch10"]["calls_per_s"] = summary["batch10"]["rps"] * 10
        summary["postgresql"] = settings
        summary["setup"] = {"connections": args.connections, "duration_s": args.duration, "rounds": args.rounds,
                            "pool_max": args.pool_max, "server": "uvicorn+httptools, 1 process each",
                            "loop": args.loop, "load": "wrk -t1", "cpus": os.cpu_count(),
                            "row_security": args.row_security}
        print("\nmedians:")
        for name in [n for n in ("forge", "observe", "control", "bare", "raw", "pgbouncer", "batch10") if n in summary]:
            s = summary[name]
            print(f"  {name:8s} {s['rps']:9.0f} req/s  p50 {s['p50_ms']:.2f} ms  p99 {s['p99_ms']:.2f} ms  "
                  f"cpu/req server {s['server_cpu_us_per_req']:.1f} us postgres {s['pg_cpu_us_per_req']:.1f} us")
        if "batch10" in summary:
            print(f"  batch10 = {summary['batch10']['calls_per_s']:.0f} calls/s")
        if "bare" in summary:
            print(f"  ratio FORGE / bare = {summary['ratio_forge_over_bare']:.3f} req/s (medians), "
                  f"{summary['ratio_forge_over_bare_per_round']:.3f} (median of per-round ratios; target >= 1.2); "
                  f"by CPU per request (server + PostgreSQL) {summary['cpu_ratio_bare_over_forge']:.3f}")
            if observed:
                print(f"  ratio FORGE with forge-observe / bare = {summary['ratio_observe_over_bare']:.3f} req/s "
                      f"(medians), {summary['ratio_observe_over_bare_per_round']:.3f} (median of per-round ratios)")
            print(f"  ratio raw ASGI / bare = {summary['ratio_raw_over_bare']:.3f} (medians), "
                  f"{summary['ratio_raw_over_bare_per_round']:.3f} (per round); FORGE / raw ASGI = "
                  f"{summary['ratio_forge_over_raw']:.3f}")
        if observed:
            print(f"  ratio FORGE with forge-observe / without = {summary['ratio_observe_over_forge']:.3f} req/s "
                  f"(medians), {summary['ratio_observe_over_forge_per_round']:.3f} (median of per-round ratios); "
                  f"target >= 0.95; CPU per request added: server "
                  f"{summary['observe_server_cpu_us_per_req_added']:+.1f} us, PostgreSQL "
                  f"{summary['observe_pg_cpu_us_per_req_added']:+.1f} us")
            rounds = []
            if control:
                rounds.append(("A/A control: FORGE / its twin", summary["control_over_forge_paired"]))
            rounds.append(("FORGE with forge-observe / without", summary["observe_over_forge_paired"]))
            coverage = summary["observe_over_forge_paired"]["rps"][3]
            print(f"  paired, round by round: median [{coverage:.1%} interval of the median], {args.rounds} rounds:")
            for label, p in rounds:
                r, c = p["rps"], p["cpu"]
                print(f"    {label}: req/s {r[0]:.3f} [{r[1]:.3f}, {r[2]:.3f}]; by CPU per request (server + "
                      f"PostgreSQL) {c[0]:.3f} [{c[1]:.3f}, {c[2]:.3f}]")
            r, c = summary["observe_over_forge_paired"]["rps"], summary["observe_over_forge_paired"]["cpu"]
            summary["verdict"] = verdict(r[1], r[2], r[3], 0.95)
            # on a shared machine a node gets a share of a core, and its req/s follows its CPU per request:
            # the steadier figure (the A/A control's interval is narrower by CPU than by req/s)
            summary["verdict_by_cpu"] = verdict(c[1], c[2], c[3], 0.95)
            busiest = max(r["load1"] for name, _, _, _ in contenders for r in results[name])
            if busiest > args.busy_load:
                summary["verdict"] += (f"; BUSY MACHINE: the 1-minute load average reached {busiest:.1f} (> {args.busy_load:g}), "
                                       f"so other work moved these rounds: re-run when it is quiet")
            print(f"  verdict, forge-observe's req/s ratio >= 0.95: {summary['verdict']}")
            print(f"  verdict by CPU per request (server + PostgreSQL) ratio >= 0.95: {summary['verdict_by_cpu']}")
            if control:
                c = summary["control_over_forge_paired"]["rps"]
                if not c[1] <= 1.0 <= c[2]:
                    print(f"  WARNING: the A/A control's interval [{c[1]:.3f}, {c[2]:.3f}] leaves out 1.0: two identical "
                          f"nodes measured apart, so this run's ratios are biased (or the machine's load drifted)")
        if bouncer:
            print(f"  FORGE through PgBouncer / direct = {summary['ratio_pgbouncer_over_direct']:.3f} req/s; by CPU per "
                  f"request (server + PostgreSQL + PgBouncer) {summary['cpu_ratio_direct_over_pgbouncer']:.3f}")
        summary["load_avg"] = {"start": load_start, "end": os.getloadavg()}
        print(f"  load average: start {load_start}, end {summary['load_avg']['end']}")
        print(f"  PostgreSQL: {settings}")
        (HERE / "last_result.json").write_text(json.dumps(summary, indent=2) + "\n")
    finally:
        for p in procs:
            stop_process(p)
        if bouncer is not None:
            bouncer.stop()
            shutil.rmtree(bouncer.root, ignore_errors=True)
        pg.release()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    exit_on_sigterm()  # a kill PID still stops the servers it started
    main()
