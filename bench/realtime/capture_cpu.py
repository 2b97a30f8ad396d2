"""PostgreSQL backend CPU per single-row INSERT transaction with the capture trigger taken apart.

One connection on an embedded server (stock settings) writes single-row transactions into a
table; the backend's on-CPU time (``/proc/PID/schedstat``) over ``--writes`` of them is divided by
their count. Variants, interleaved in rounds: no capture; the trigger as installed; without the
hint gate and its NOTIFY; without the images (``jsonb_agg(jsonb_build_object(...))``) too; a trigger
body that only returns (the statement trigger and its transition table alone). One writer wins the
hint gate on every write, so the NOTIFY here is an upper bound (in bench/realtime (b) 0.13-0.3 writes
in one notify).

    .venv/bin/python bench/realtime/capture_cpu.py --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

import asyncpg

from forge_kernel.embedded_pg import EmbeddedPostgres
from forge_realtime import capture

SQL_DIR = Path(capture.__file__).parent / "sql"
INSERT = "INSERT INTO items (topic, payload) VALUES ($1, $2)"


def backend_cpu_ns(pid: int) -> int:
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])


async def per_write_us(conn: asyncpg.Connection, pid: int, writes: int) -> float:
    for i in range(writes // 10):  # warm the plan caches of whatever trigger body is installed
        await conn.execute(INSERT, i % 100, "x" * 40)
    start = backend_cpu_ns(pid)
    for i in range(writes):
        await conn.execute(INSERT, i % 100, "x" * 40)
    return (backend_cpu_ns(pid) - start) / writes / 1000


def variants() -> list[tuple[str, str | None]]:
    full = capture.capture_function_sql("items", ["id", "topic"])
    no_gate = full.replace(f"IF written > 0 AND pg_try_advisory_xact_lock({capture._HINT_LOCK_CLASS}, 0) THEN",
                           "IF false THEN")
    no_image = no_gate.replace("""jsonb_agg(jsonb_build_object('id', n."id", 'topic', n."topic"))""", "NULL")
    empty = full[:full.index("BEGIN")] + "BEGIN RETURN NULL; END $forge$"
    assert full != no_gate != no_image
    return [("no capture", None), ("capture as installed", full), ("without the hint gate and NOTIFY", no_gate),
            ("and without the images", no_image), ("trigger body that only returns", empty)]


async def main(args: argparse.Namespace) -> None:
    pg = EmbeddedPostgres(Path(tempfile.mkdtemp(prefix="capture-cpu-")), settings={})
    url = await asyncio.to_thread(pg.start)
    try:
        conn = await asyncpg.connect(url)
        for f in sorted(SQL_DIR.glob("*.sql")):
            await conn.execute(f.read_text())
        await conn.execute("CREATE TABLE items (id bigserial PRIMARY KEY, topic int NOT NULL, payload text)")
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        for rnd in range(args.rounds):
            for label, body in variants():
                if body is None:
                    await capture.remove_capture(conn, "items")
                else:
                    await capture.install_capture(conn, "items", ["topic"])
                    await conn.execute(body)
                print(f"round {rnd} {label}: {await per_write_us(conn, pid, args.writes):.1f} us of backend CPU "
                      f"per INSERT transaction", flush=True)
        await conn.close()
    finally:
        pg.stop()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--writes", type=int, default=3000)
    asyncio.run(main(ap.parse_args()))
