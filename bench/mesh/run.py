"""bench/mesh: the same 1 KB query answered locally by F, forwarded G -> F over the gRPC mesh, and
forwarded G' -> F over HTTP keep-alive (to F's /rpc, through the same kernel hook), in one run.

Three nodes on one embedded PostgreSQL (stock durability): F (gateway + function), G (gateway only,
forge-mesh) and G' (gateway only, bench/mesh/http_forwarder.py instead of the mesh). For each mode,
rounds alternate: an open-loop load at --rate calls/s for --duration s (latency from the scheduled
send time, so a stall is not hidden), then a closed-loop wrk run for the most calls/s. Reports
p50/p99, the latency forwarding adds over the local call, CPU per call of the forwarding node and
of F, and calls/s.

    .venv/bin/python bench/mesh/run.py [--rate 500] [--duration 15] [--rounds 3] [--json out.json]
    .venv/bin/python bench/mesh/run.py --soak 600 [--rate 500]   # RSS of G and F under forwarded load
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from forge_kernel.embedded_pg import EmbeddedPostgres
from forge_kernel.testing import free_port, wait_for
from forge_kernel.testing.procs import write_config

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "bench" / "rpc"))

from httpclient import Pool  # noqa: E402
from run import cpu_seconds, run_wrk, wrk_script  # noqa: E402  (bench/rpc's helpers)

PY = sys.executable
BODY = json.dumps({"size": 1024}).encode()
BASE_PLUGINS = "forge_kernel.kernel_plugin,forge_gateway.hooks"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def system_seconds(pid: int) -> float:
    """stime of one process: the kernel's share (system calls, wake-ups) of its CPU."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[12]) / os.sysconf("SC_CLK_TCK")


def switches(pid: int) -> int:
    """Context switches (voluntary + involuntary) of every thread of one process: each is a
    thread that slept and had to wait for a core again, a load-independent yardstick."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            lines = (task / "status").read_text().splitlines()
        except OSError:  # the thread ended meanwhile
            continue
        total += sum(int(line.split()[1]) for line in lines if "ctxt_switches" in line)
    return total


def start(tmp: Path, name: str, db_url: str, roles: list[str], plugins: str, extra_env: dict[str, str] | None = None,
          **sections: dict) -> tuple[subprocess.Popen, int]:
    port = free_port()
    cfg = write_config(tmp / f"{name}.toml", {
        "node": {"id": name, "roles": roles},
        "database": {"url": db_url, "pool_min": 2, "pool_max": 10},
        "app": {"modules": ["bench_app"], "example": False},
        "gateway": {"port": port},
        "log": {"level": "WARNING"},
        **sections,
    })
    env = {**os.environ, "FORGE_CONFIG": str(cfg), "PYTHONPATH": str(HERE), "FORGE_DISABLE_PLUGIN_AUTOLOAD": "1",
           "FORGE_PLUGINS": plugins, **(extra_env or {})}
    log = open(tmp / f"{name}.log", "wb")
    proc = subprocess.Popen([PY, "-m", "forge_kernel.cli", "start"], cwd=tmp, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    return proc, port


async def open_loop(port: int, rate: float, duration: float) -> dict:
    pool = Pool("127.0.0.1", port, size=64)
    loop = asyncio.get_running_loop()
    n = int(rate * duration)
    latencies: list[float] = []
    errors = 0
    kinds: dict[str, int] = {}
    begin = loop.time() + 0.05

    async def one(at: float) -> None:
        nonlocal errors
        try:
            status, body = await pool.post("/rpc/blob", BODY)
        except (ConnectionError, OSError) as exc:
            status, body = 0, str(exc).encode()
        if status != 200:
            errors += 1
            # what went wrong, by status and error code (a few kinds at most)
            code = body[:300].decode(errors="replace")
            with contextlib.suppress(ValueError, KeyError, TypeError):
                code = json.loads(body)["error"]["code"]
            kinds[f"{status} {code}"] = kinds.get(f"{status} {code}", 0) + 1
        latencies.append(loop.time() - at)

    # each call starts as its time comes: with a task per call created up front (300,000 in a
    # soak) the generator's own loop fell far behind under load, and G answered each of its 64
    # connections once with 408 (header_timeout: connected, then no request for 10 s)
    running: set[asyncio.Task] = set()
    for i in range(n):
        at = begin + i / rate
        delay = at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        task = loop.create_task(one(at))
        running.add(task)
        task.add_done_callback(running.discard)
    if running:
        await asyncio.gather(*running)
    latencies.sort()
    took = loop.time() - begin
    return {"calls": n, "errors": errors, "error_kinds": kinds, "calls_per_s": n / took,
            "p50_ms": latencies[len(latencies) // 2] * 1000, "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
            "latencies": latencies}


def measure(port: int, rate: float, duration: float, pids: dict[str, int]) -> dict:
    before = {k: cpu_seconds(p) for k, p in pids.items()}
    before_switches = {k: switches(p) for k, p in pids.items()}
    before_system = {k: system_seconds(p) for k, p in pids.items()}
    res = asyncio.run(open_loop(port, rate, duration))
    for k, p in pids.items():
        res[f"cpu_us_per_call_{k}"] = (cpu_seconds(p) - before[k]) / res["calls"] * 1e6
        res[f"switches_per_call_{k}"] = (switches(p) - before_switches[k]) / res["calls"]
        res[f"system_cpu_us_per_call_{k}"] = (system_seconds(p) - before_system[k]) / res["calls"] * 1e6
    res["load_average"] = os.getloadavg()[0]
    return res


def soak(ports: dict[str, int], pids: dict[str, int], rate: float, seconds: float, sample: float = 10.0) -> dict:
    """Forwarded load through G for ``seconds``; RSS of G and F every ``sample`` seconds."""
    series: list[dict] = []

    async def main() -> dict:
        load = asyncio.ensure_future(open_loop(ports["grpc"], rate, seconds))
        t0 = time.monotonic()
        while not load.done():
            series.append({"t": round(time.monotonic() - t0), "g_mb": rss_mb(pids["g"]), "f_mb": rss_mb(pids["f"])})
            print(f"  t={series[-1]['t']:4d}s  RSS G {series[-1]['g_mb']:.1f} MB  F {series[-1]['f_mb']:.1f} MB", flush=True)
            await asyncio.wait({load}, timeout=sample)
        return load.result()

    res = asyncio.run(main())
    del res["latencies"]  # the percentiles are kept; 300,000 raw figures are not worth a results file
    res["rss"] = series
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=500.0)
    ap.add_argument("--duration", type=float, default=15.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-seconds", type=int, default=5, help="closed-loop wrk run per mode and round (0: skip)")
    ap.add_argument("--soak", type=float, default=0.0, help="instead: forwarded load for this many seconds, RSS sampled")
    ap.add_argument("--modes", nargs="+", choices=["local", "grpc", "http"], default=["local", "grpc", "http"],
                    help="which of the three to run (default: all; the added latency needs local)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="forge-bench-mesh-"))
    tmp.chmod(0o711)  # as root the server runs as forge_pg, which must pass through to tmp/pg
    pg = EmbeddedPostgres(tmp / "pg")
    procs: dict[str, subprocess.Popen] = {}
    try:
        db_url = pg.start()
        fast = {"refresh_interval": 1.0, "probe_interval": 1.0}
        procs["f"], f_port = start(tmp, "f", db_url, ["gateway", "function"], BASE_PLUGINS + ",forge_mesh.hooks",
                                   mesh=fast)
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{f_port}/ready").status_code == 200, 90, 0.2, "F")
        procs["g"], g_port = start(tmp, "g", db_url, ["gateway"], BASE_PLUGINS + ",forge_mesh.hooks", mesh=fast)
        procs["h"], h_port = start(tmp, "h", db_url, ["gateway"], BASE_PLUGINS + ",http_forwarder",
                                   {"FORGE_BENCH_FORWARD_TO": f"127.0.0.1:{f_port}"})
        for name, port in (("g", g_port), ("h", h_port)):
            wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/ready").status_code == 200, 90, 0.2, name)
        ports = {m: p for m, p in (("local", f_port), ("grpc", g_port), ("http", h_port)) if m in args.modes}
        for mode, port in ports.items():
            r = httpx.post(f"http://127.0.0.1:{port}/rpc/blob", json={"size": 1024}, timeout=10)
            assert r.status_code == 200 and r.json()["data"] == "x" * 1024, (mode, r.text)
        pids = {"g": procs["g"].pid, "h": procs["h"].pid, "f": procs["f"].pid}
        load_before = os.getloadavg()
        if args.soak:
            print(f"soak: {args.rate:g} calls/s through G (gRPC) for {args.soak:g} s; load average {load_before}")
            res = soak(ports, pids, args.rate, args.soak)
            g, f = [s["g_mb"] for s in res["rss"]], [s["f_mb"] for s in res["rss"]]
            res["summary"] = {"g_first_mb": g[0], "g_after_60s_mb": g[min(6, len(g) - 1)], "g_last_mb": g[-1],
                              "g_max_mb": max(g), "f_first_mb": f[0], "f_after_60s_mb": f[min(6, len(f) - 1)],
                              "f_last_mb": f[-1], "f_max_mb": max(f), "load_average": os.getloadavg()}
            print(json.dumps(res["summary"], indent=2))
            out = res
        else:
            for port in ports.values():  # warm-up of pools and caches
                asyncio.run(open_loop(port, args.rate, 2))
            results: dict[str, list[dict]] = {m: [] for m in ports}
            # every round's latencies together: on a shared machine short rounds that alternate the
            # modes (--duration 2 --rounds 15) spread other programs' load evenly over the modes
            pooled: dict[str, list[float]] = {m: [] for m in ports}
            scripts = {m: wrk_script(tmp / f"{m}.lua", BODY.decode(), "/rpc/blob") for m in ports}
            for i in range(args.rounds):
                for mode, port in ports.items():
                    front = {"local": "f", "grpc": "g", "http": "h"}[mode]
                    res = measure(port, args.rate, args.duration, {"front": pids[front], "f": pids["f"]})
                    if args.max_seconds:
                        # CPU per call at the most calls/s too: with 32 in flight protocol 4 batches
                        f_cpu = cpu_seconds(pids["f"])
                        wrk = run_wrk(f"http://127.0.0.1:{port}", scripts[mode], args.max_seconds, 32,
                                      server_pid=pids[front])
                        res["max_calls_per_s"] = wrk["rps"]
                        res["max_cpu_us_per_call_front"] = wrk["server_cpu_us_per_req"]
                        res["max_cpu_us_per_call_f"] = ((cpu_seconds(pids["f"]) - f_cpu) * 1e6
                                                        / max(1.0, wrk["rps"] * args.max_seconds))
                    pooled[mode].extend(res.pop("latencies"))
                    results[mode].append(res)
                    print(f"round {i + 1} {mode:5s} {res['calls_per_s']:6.0f} calls/s  p50 {res['p50_ms']:6.2f} ms  "
                          f"p99 {res['p99_ms']:6.2f} ms  cpu/call front {res['cpu_us_per_call_front']:5.0f} us  "
                          f"F {res['cpu_us_per_call_f']:5.0f} us (system {res['system_cpu_us_per_call_front']:.0f} / "
                          f"{res['system_cpu_us_per_call_f']:.0f})  switches/call {res['switches_per_call_front']:.1f} / "
                          f"{res['switches_per_call_f']:.1f}  errors {res['errors']}  "
                          f"max {res.get('max_calls_per_s', 0):6.0f} calls/s ({res.get('max_cpu_us_per_call_front', 0):.0f} / "
                          f"{res.get('max_cpu_us_per_call_f', 0):.0f} us/call front / F)  load {res['load_average']:.1f}", flush=True)
            keys = ["calls_per_s", "p50_ms", "p99_ms", "cpu_us_per_call_front", "cpu_us_per_call_f",
                    "system_cpu_us_per_call_front", "system_cpu_us_per_call_f", "switches_per_call_front",
                    "switches_per_call_f", "max_calls_per_s", "max_cpu_us_per_call_front", "max_cpu_us_per_call_f",
                    "load_average"]
            med = {m: {k: statistics.median(r.get(k, 0) for r in rs) for k in keys} for m, rs in results.items()}
            forwarded = [m for m in ("grpc", "http") if m in ports and "local" in ports]
            for m in forwarded:
                med[m]["added_p50_ms"] = med[m]["p50_ms"] - med["local"]["p50_ms"]
                med[m]["added_p99_ms"] = med[m]["p99_ms"] - med["local"]["p99_ms"]
                # each round against the local call of the same round (the target is per round)
                med[m]["added_p99_ms_per_round"] = [r["p99_ms"] - lr["p99_ms"] for r, lr in zip(results[m], results["local"])]
            for m, lat in pooled.items():
                lat.sort()
                med[m]["pooled_p50_ms"] = lat[len(lat) // 2] * 1000
                med[m]["pooled_p99_ms"] = lat[int(len(lat) * 0.99)] * 1000
            for m in forwarded:
                med[m]["pooled_added_p50_ms"] = med[m]["pooled_p50_ms"] - med["local"]["pooled_p50_ms"]
                med[m]["pooled_added_p99_ms"] = med[m]["pooled_p99_ms"] - med["local"]["pooled_p99_ms"]
            if "grpc" in ports and "http" in ports:
                med["ratio_grpc_over_http_max_calls"] = (med["grpc"]["max_calls_per_s"] / med["http"]["max_calls_per_s"]
                                                         if med["http"]["max_calls_per_s"] else None)
            if forwarded == ["grpc", "http"]:
                med["ratio_http_over_grpc_added_p99"] = (med["http"]["added_p99_ms"] / med["grpc"]["added_p99_ms"]
                                                         if med["grpc"]["added_p99_ms"] > 0 else None)
            med["setup"] = {"rate": args.rate, "duration_s": args.duration, "rounds": args.rounds,
                            "load_average_before": load_before, "load_average_after": os.getloadavg(),
                            "cpus": os.cpu_count()}
            print("\nmedians:\n" + json.dumps(med, indent=2))
            out = {"medians": med, "rounds": results}
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2))
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
        for p in procs.values():
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        pg.release()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
