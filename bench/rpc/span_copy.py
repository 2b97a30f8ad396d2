"""PostgreSQL's CPU for the writer's COPYs of kept traces into ``forge_obs_spans``: per COPY and per row,
by batch size (a kept ``/rpc`` trace is three spans: the request's root, the function call, its SQL
statement). The backend's own CPU (``/proc``), on an embedded PostgreSQL with forge-observe's schema,
the writer's session settings (``synchronous_commit`` off); then one activity hint (``pg_notify``).

    .venv/bin/python bench/rpc/span_copy.py [--rows 12000]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import asyncpg

from forge_kernel.embedded_pg import EmbeddedPostgres
from forge_kernel.testing import free_port
from forge_kernel.testing.procs import write_config
from forge_observe.writer import ACTIVITY_CHANNEL, TABLES, ensure_partitions

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import cpu_seconds  # noqa: E402

HERE = Path(__file__).resolve().parent


def trace_rows(traces: int, node_id: str = "bench-observe") -> list[tuple]:
    """Rows of ``traces`` kept ``POST /rpc/value`` traces as ``writer.span_rows`` makes them."""
    rows, now = [], dt.datetime.now(dt.timezone.utc)
    for _ in range(traces):
        trace, root, call = "%032x" % random.getrandbits(128), "%016x" % random.getrandbits(64), "%016x" % random.getrandbits(64)
        rows += [(trace, root, None, "POST /rpc/{function}", "server", node_id, now, 0.9, None,
                  '{"request.id":"5f2c9a01d4e8b7a3","http.status_code":200}'),
                 (trace, call, root, "value", "internal", node_id, now, 0.5, None,
                  '{"function.kind":"query","call.id":"5f2c9a01d4e8b7a3"}'),
                 (trace, "%016x" % random.getrandbits(64), call, "sql", "client", node_id, now, 0.3, None,
                  '{"db.statement":"SELECT $1::int + 1"}')]
    return rows


async def measure(url: str, rows: int) -> None:
    conn = await asyncpg.connect(url, server_settings={"synchronous_commit": "off"})
    try:
        today = dt.datetime.now(dt.timezone.utc).date()
        await ensure_partitions(conn, today - dt.timedelta(days=1), today + dt.timedelta(days=2))
        backend = await conn.fetchval("SELECT pg_backend_pid()")
        table, columns = TABLES["spans"]
        for traces in (1, 5, 25, 100, 400):
            copies = max(1, rows // (3 * traces))
            batches = [trace_rows(traces) for _ in range(copies)]
            await conn.copy_records_to_table(table, records=trace_rows(traces), columns=columns)  # prepared
            cpu0 = cpu_seconds(backend)
            for batch in batches:
                await conn.copy_records_to_table(table, records=batch, columns=columns)
            cpu = cpu_seconds(backend) - cpu0
            print(f"{traces:4d} traces ({3 * traces:4d} rows) per COPY, {copies:5d} COPYs: backend CPU "
                  f"{cpu / copies * 1e6:7.0f} us per COPY, {cpu / (copies * 3 * traces) * 1e6:5.1f} us per row", flush=True)
        cpu0 = cpu_seconds(backend)
        for _ in range(2000):
            await conn.execute("SELECT pg_notify($1, $2)", ACTIVITY_CHANNEL, "spans@bench-observe")
        print(f"activity hint (pg_notify): {(cpu_seconds(backend) - cpu0) / 2000 * 1e6:.0f} us of backend CPU each")
    finally:
        await conn.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=12000, help="rows per batch size")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="forge-bench-span-copy-"))
    tmp.chmod(0o711)
    pg = EmbeddedPostgres(tmp / "pg", tcp_port=free_port())
    try:
        url = pg.start()
        cfg = write_config(tmp / "forge.toml", {"database": {"url": url},
                                                "app": {"modules": ["bench_app"], "example": False}})
        subprocess.run([sys.executable, "-m", "forge_kernel.cli", "migrate"], cwd=tmp, check=True, capture_output=True,
                       env={**os.environ, "FORGE_CONFIG": str(cfg), "PYTHONPATH": str(HERE)})
        asyncio.run(measure(url, args.rows))
        print(f"load average {os.getloadavg()}")
    finally:
        pg.release()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
