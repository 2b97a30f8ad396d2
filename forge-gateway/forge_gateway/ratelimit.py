"""Per-function rate limits shared by every node through PostgreSQL, kept cheap by leasing.

Each limit is a fixed window of ``per`` seconds numbered from the database clock, so all
nodes agree on window boundaries. A node claims tokens for a bucket with one upsert that
never grants more than the window has left; it may lease a few at once
(``[gateway] rate_limit_lease`` of the limit) and spend them locally, so a hot limit costs
one round trip per lease rather than per call. A window found empty is remembered
locally until it ends, so rejected callers cost no round trip at all.

Guarantee: across the cluster no window ever admits more than ``requests`` calls. Leasing
can under-admit by at most (nodes - 1) x lease tokens per window; lease 0 makes it exact.
"""

from __future__ import annotations

import math
import time
from typing import Any

import asyncpg
import attrs

from forge_kernel.app import RateLimit
from forge_kernel.errors import RateLimited

CLAIM_SQL = """
INSERT INTO forge_gateway_rate_limits AS r (bucket, window_no, used, last_grant, expires_at)
SELECT $1::text, w.no, LEAST($3::int, $4::int), LEAST($3::int, $4::int), to_timestamp((w.no + 1) * $2::float8)
FROM (SELECT floor(extract(epoch FROM clock_timestamp()) / $2::float8)::bigint AS no) AS w
ON CONFLICT (bucket, window_no) DO UPDATE
   SET used = r.used + LEAST($3::int, GREATEST($4::int - r.used, 0)),
       last_grant = LEAST($3::int, GREATEST($4::int - r.used, 0))
RETURNING last_grant, extract(epoch FROM expires_at - clock_timestamp())::float8 AS seconds_left
"""

PRUNE_SQL = "DELETE FROM forge_gateway_rate_limits WHERE expires_at < now() - interval '1 minute'"


@attrs.define
class _Lease:
    tokens: int
    #: time.monotonic() when the window ends
    ends: float


class RateLimiter:
    def __init__(self, pool: asyncpg.Pool, *, lease_fraction: float = 0.05) -> None:
        self.pool = pool
        self.lease_fraction = lease_fraction
        self._leases: dict[str, _Lease] = {}

    def lease_size(self, limit: RateLimit) -> int:
        return max(1, int(limit.requests * self.lease_fraction))

    async def acquire(self, function: str, limit: RateLimit, key: str) -> None:
        """Take one token for ``function`` keyed by ``key`` or raise ``RateLimited`` with ``retry_after``."""
        bucket = f"{function}|{limit.key}|{key}"
        now = time.monotonic()
        lease = self._leases.get(bucket)
        if lease is not None and now < lease.ends:
            if lease.tokens > 0:
                lease.tokens -= 1
                return
            if lease.tokens < 0:  # the window is used up cluster-wide: answer without a round trip
                raise self._limited(function, limit, lease.ends - now)
        granted, seconds_left = await self._claim(bucket, limit)
        ends = time.monotonic() + max(0.0, seconds_left)
        if len(self._leases) > 100_000:  # bounded memory under a flood of distinct keys
            self._leases = {b: l for b, l in self._leases.items() if l.ends > now}
        if granted <= 0:
            self._leases[bucket] = _Lease(-1, ends)
            raise self._limited(function, limit, seconds_left)
        self._leases[bucket] = _Lease(granted - 1, ends)

    async def _claim(self, bucket: str, limit: RateLimit) -> tuple[int, float]:
        row = await self.pool.fetchrow(CLAIM_SQL, bucket, float(limit.per), self.lease_size(limit), limit.requests)
        return row["last_grant"], row["seconds_left"]

    @staticmethod
    def _limited(function: str, limit: RateLimit, seconds_left: float) -> RateLimited:
        retry = max(1, math.ceil(seconds_left))
        err = RateLimited(f"{function}: rate limit of {limit.requests} per {limit.per:g}s "
                          f"(per {limit.key}) reached; retry in {retry}s",
                          details={"retry_after": retry, "limit": limit.requests, "per": limit.per, "key": limit.key})
        err.retry_after = retry  # type: ignore[attr-defined]
        return err


async def prune(conn: Any) -> None:
    """Maintenance: drop counters of windows that ended (run by the scheduler leader)."""
    await conn.execute(PRUNE_SQL)
