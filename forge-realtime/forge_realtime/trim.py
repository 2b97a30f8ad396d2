"""Trimming the change log by age (run by the scheduler leader as a maintenance task)."""

from __future__ import annotations

import asyncpg


async def trim_change_log(conn: asyncpg.Connection, retention: float, batch: int = 10_000) -> int:
    """Delete change-log rows older than ``retention`` seconds, in batches so a large backlog
    never holds one long transaction. Returns the number deleted."""
    total = 0
    while True:
        status = await conn.execute(
            "DELETE FROM forge_changes WHERE ctid = ANY(ARRAY(SELECT ctid FROM forge_changes "
            "WHERE at < now() - make_interval(secs => $1) LIMIT $2))", float(retention), batch)
        n = int(status.split()[-1])
        total += n
        if n < batch:
            return total
