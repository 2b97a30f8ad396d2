"""bench/ratelimit: the cost of one rate-limited call as the number of distinct callers grows.

Issue 19 found the limiter's clean-up walking every lease on each new caller once more than
100,000 were held: 15-18 ms per call. This prints the per-call cost at 1k, 100k and 1M distinct
keys, with the node's bookkeeping measured two ways:

* ``local``: ``RateLimiter.acquire`` with the database claim answered in-process (a grant of the
  lease size, an hour-long window), so what is timed is the node's own lease table: the part
  that grew with the number of callers. The old policy (a dict rebuilt whenever it held more
  than 100,000 entries) is timed beside it unless ``--no-old``.
* ``db``: the real limiter against an embedded PostgreSQL (stock settings), one upsert per new
  caller, at 1k and 100k keys (``--db-keys`` to change, e.g. ``1000,100000,1000000``: 1M upserts
  take several minutes).

At each size the table is first filled with that many distinct callers, then 20,000 calls by new
callers, then the same 20,000 callers again (their leases are held: no claim), are timed (200 for
the old policy). Memory: the lease count and the process RSS.

    .venv/bin/python bench/ratelimit/run.py [--sizes 1000,100000,1000000] [--db-keys 1000,100000] [--no-old]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import time
from pathlib import Path

import asyncpg

from forge_kernel import RateLimit
from forge_kernel.embedded_pg import EmbeddedPostgres
from forge_kernel.migrations import from_package, migrate

from forge_gateway.ratelimit import RateLimiter, _Lease

RULE = RateLimit(1000, per=3600, key="ip")
TIMED = 20_000


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class LocalClaims(RateLimiter):
    """The limiter with its database claim answered in-process: times the node's own bookkeeping."""

    def __init__(self) -> None:
        super().__init__(None, lease_fraction=0.05)  # type: ignore[arg-type]

    async def _claim(self, bucket: str, limit: RateLimit) -> tuple[int, float]:
        return self.lease_size(limit), 3600.0


class OldLocalClaims(LocalClaims):
    """The policy before issue 19: a plain dict, rebuilt (every entry visited) whenever a new
    caller arrives while it holds more than 100,000 leases. Only for the comparison."""

    def __init__(self) -> None:
        super().__init__()
        self._old: dict[str, _Lease] = {}

    async def acquire(self, function: str, limit: RateLimit, key: str) -> None:
        bucket = f"{function}|{limit.key}|{key}"
        now = time.monotonic()
        lease = self._old.get(bucket)
        if lease is not None and now < lease.ends and lease.tokens > 0:
            lease.tokens -= 1
            return
        granted, seconds_left = await self._claim(bucket, limit)
        if len(self._old) > 100_000:
            self._old = {b: l for b, l in self._old.items() if l.ends > now}
        self._old[bucket] = _Lease(granted - 1, time.monotonic() + seconds_left)

    def __len__(self) -> int:
        return len(self._old)


async def timed(limiter: RateLimiter, keys: range, prefix: str) -> float:
    """Seconds per call for one call by each key."""
    start = time.perf_counter()
    for i in keys:
        await limiter.acquire("bench", RULE, f"{prefix}{i}")
    return (time.perf_counter() - start) / max(1, len(keys))


def held(limiter: RateLimiter) -> int:
    return len(limiter) if isinstance(limiter, OldLocalClaims) else len(limiter._leases)


async def curve(make, sizes: list[int], label: str, max_seconds: float = 120.0, timed_calls: int = TIMED) -> list[dict]:
    rows = []
    for size in sizes:
        limiter = make()
        fill_started = time.perf_counter()
        for i in range(size):
            await limiter.acquire("bench", RULE, f"ip:{i}")
            if time.perf_counter() - fill_started > max_seconds:
                print(f"  {label:5s} {size:>9,} keys: gave up filling after {max_seconds:.0f}s at {i:,} keys "
                      f"({(time.perf_counter() - fill_started) / (i + 1) * 1e6:,.0f} us per call so far)", flush=True)
                break
        else:
            new = await timed(limiter, range(size, size + timed_calls), "ip:")
            seen = await timed(limiter, range(size, size + timed_calls), "ip:")
            row = {"keys": size, "new_caller_us": new * 1e6, "seen_caller_us": seen * 1e6, "leases_held": held(limiter),
                   "rss_mb": rss_mb()}
            rows.append(row)
            print(f"  {label:5s} {size:>9,} keys: new caller {row['new_caller_us']:8.2f} us/call, "
                  f"seen caller {row['seen_caller_us']:6.2f} us/call, leases held {row['leases_held']:,}, "
                  f"RSS {row['rss_mb']:.0f} MB", flush=True)
        del limiter
    return rows


async def db_curve(db_url: str, sizes: list[int]) -> None:
    conn = await asyncpg.connect(db_url)
    await migrate(conn, from_package("forge_gateway.sql", namespace="gateway"))
    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=4)
    try:
        for size in sizes:
            await conn.execute("TRUNCATE forge_gateway_rate_limits")
            limiter = RateLimiter(pool, lease_fraction=0.05)
            # fill with concurrent callers (the node serves many at once), then time sequential calls
            batch = 64
            for start in range(0, size, batch):
                await asyncio.gather(*(limiter.acquire("bench", RULE, f"ip:{i}")
                                       for i in range(start, min(size, start + batch))))
            timed_keys = min(TIMED, 5000)
            new = await timed(limiter, range(size, size + timed_keys), "ip:")
            seen = await timed(limiter, range(size, size + timed_keys), "ip:")
            rows = await conn.fetchval("SELECT count(*) FROM forge_gateway_rate_limits")
            print(f"  db    {size:>9,} keys: new caller {new * 1e6:8.1f} us/call (one upsert), "
                  f"seen caller {seen * 1e6:6.2f} us/call (lease spent locally), leases held {len(limiter._leases):,}, "
                  f"rows {rows:,}, RSS {rss_mb():.0f} MB", flush=True)
    finally:
        await pool.close()
        await conn.close()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,100000,1000000")
    ap.add_argument("--db-keys", default="1000,100000", help="'' skips the database curve")
    ap.add_argument("--no-old", action="store_true", help="skip the old policy's curve")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}; cores {os.cpu_count()}", flush=True)
    print("local (database claim answered in-process): the node's lease bookkeeping", flush=True)
    await curve(LocalClaims, sizes, "now")
    if not args.no_old:
        # 200 timed calls: past 100,000 leases each new caller costs the old policy tens of ms
        await curve(OldLocalClaims, sizes, "old", max_seconds=60.0, timed_calls=200)
    db_sizes = [int(s) for s in args.db_keys.split(",") if s]
    if db_sizes:
        tmp = Path(tempfile.mkdtemp(prefix="forge-bench-ratelimit-"))
        pg = EmbeddedPostgres(tmp / "pg")
        try:
            print("db (the real limiter, embedded PostgreSQL, stock settings)", flush=True)
            await db_curve(pg.start(), db_sizes)
        finally:
            pg.release()
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"load average at the end {os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
