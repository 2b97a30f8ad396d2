"""Developer experience numbers: `forge-node new` to a serving node, reload latency, client size.

    python bench/codegen/run.py [--saves 20] [--out bench/codegen/results-DATE.json]

1. new -> serving: `forge-node new demo` in an empty folder, then `forge-node dev` there (its
   embedded PostgreSQL initialised from nothing), until `POST /rpc/list_tasks` answers. Reported
   in parts: new, dev until the ready file, first answer.
2. reload latency: `saves` times, the app's query is changed to return another constant (the file
   replaced at once, as editors save) and `POST /rpc/probe` is polled every 5 ms until the new value
   comes back; latency = first new answer - the save. p50 / p95 / max.
3. client size: the generated client (api.ts + runtime.ts) bundled and minified by esbuild, gzip -9.

Needs the codegen test tools (plugins/forge-codegen/js: `npm ci` there). Stops every process it starts.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
JS = ROOT / "plugins" / "forge-codegen" / "js"
PROBE = '''

@query(public=True)
async def probe(ctx) -> int:
    return {value}
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answer(port: int, name: str) -> object:
    try:
        return httpx.post(f"http://127.0.0.1:{port}/rpc/{name}", json={"board": "b"} if name == "list_tasks" else {},
                          timeout=5).json().get("data")
    except (httpx.HTTPError, ValueError):
        return None


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--saves", type=int, default=20)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="forge-bench-codegen-"))
    work.chmod(0o711)  # run as root, the embedded PostgreSQL (account forge_pg) must pass through
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORGE_")}
    result: dict = {"date": dt.date.today().isoformat(), "load_average_start": os.getloadavg()}
    proc = None
    try:
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-m", "forge_kernel.cli", "new", "demo"], cwd=work, env=env, check=True,
                       capture_output=True)
        t_new = time.monotonic()
        project = work / "demo"
        app = project / "demo" / "app.py"
        base = app.read_text()
        app.write_text(base + PROBE.format(value=0))
        ready = project / "ready.json"
        log = open(project / "dev.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "forge_kernel.cli", "dev", "--port", str(port)], cwd=project,
                                env={**env, "FORGE_READY_FILE": str(ready)}, stdout=log, stderr=subprocess.STDOUT)
        while not ready.exists():
            if proc.poll() is not None:
                raise SystemExit(f"forge-node dev exited:\n{(project / 'dev.log').read_text()[-3000:]}")
            time.sleep(0.01)
        t_ready = time.monotonic()
        while answer(port, "list_tasks") != []:
            time.sleep(0.01)
        t_serving = time.monotonic()
        result["new_to_serving_s"] = round(t_serving - t0, 3)
        result["parts_s"] = {"new": round(t_new - t0, 3), "dev_until_ready": round(t_ready - t_new, 3),
                             "first_answer": round(t_serving - t_ready, 3)}
        latencies = []
        for i in range(1, args.saves + 1):
            time.sleep(0.3)  # a person does not save twice within a scan
            tmp = app.with_name(".app.py.tmp")
            tmp.write_text(base + PROBE.format(value=i))
            saved = time.monotonic()
            tmp.replace(app)
            while answer(port, "probe") != i:
                if time.monotonic() - saved > 30:
                    raise SystemExit(f"save {i} not served after 30 s:\n{(project / 'dev.log').read_text()[-3000:]}")
                time.sleep(0.005)
            latencies.append(time.monotonic() - saved)
        q = statistics.quantiles(latencies, n=20)
        result["reload_latency_ms"] = {"saves": len(latencies), "p50": round(statistics.median(latencies) * 1000, 1),
                                       "p95": round(q[18] * 1000, 1), "max": round(max(latencies) * 1000, 1)}
        bundle = work / "client.min.js"
        subprocess.run([sys.executable, "-m", "forge_kernel.cli", "generate", "ts", "--out", str(work / "client")],
                       cwd=project, env=env, check=True, capture_output=True)
        subprocess.run([str(JS / "node_modules" / ".bin" / "esbuild"), str(work / "client" / "api.ts"), "--bundle",
                        "--minify", "--format=esm", "--platform=browser", f"--outfile={bundle}", "--log-level=error"],
                       check=True)
        import gzip

        data = bundle.read_bytes()
        result["client_bytes"] = {"minified": len(data), "min_gzip": len(gzip.compress(data, 9))}
        result["load_average_end"] = os.getloadavg()
    finally:
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        print((work / "demo" / "dev.log").read_text()[-2500:]) if os.environ.get("SHOWLOG") else None
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))
    out = args.out or Path(__file__).parent / f"results-{result['date']}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
