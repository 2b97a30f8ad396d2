"""Per-function rate limits shared by every node through PostgreSQL, kept cheap by leasing.

Each limit is a fixed window of ``per`` seconds numbered from the database clock, so all
nodes agree on window boundaries. A node claims tokens for a bucket with one upsert that
never grants more than the window has left; it may lease a few at once
(``[gateway] rate_limit_lease`` of the limit) and spend them locally, so a hot limit costs
one round trip per lease rather than per call. A window found empty is remembered
locally until it ends, so rejected callers cost no round trip at all.

Guarantee: across the cluster no window ever admits more than ``requests`` calls. Leasing
can under-admit by at most (nodes - 1) x lease tokens per window; lease 0 makes it exact.

The same limits apply to every transport: the gateway's ``/rpc`` and, through the kernel hook
``forge_rate_limiter``, realtime's ``/ws`` subscribes (:class:`CallLimits`).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from typing import Any, Mapping

import asyncpg
import attrs

from forge_kernel import Auth
from forge_kernel.app import FunctionDef, RateLimit
from forge_kernel.errors import RateLimited

from .clients import ClientAddress

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


class LeaseTable:
    """This node's leases by bucket, bounded to ``capacity`` entries at O(1) per operation, so
    neither memory nor the cost of a call grows with the number of distinct callers.

    Entries are kept in the order they were last claimed. Each claim drops up to two ended
    entries from the old end, and past ``capacity`` the oldest entry goes. Dropping a lease
    early only gives up its unspent tokens (the cluster admits fewer calls, never more) and
    dropping an "exhausted" mark costs one more round trip, so eviction is always safe."""

    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[str, _Lease] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, bucket: str, now: float) -> _Lease | None:
        """The bucket's lease while its window lasts, else ``None``."""
        lease = self._entries.get(bucket)
        if lease is not None and now >= lease.ends:
            del self._entries[bucket]
            return None
        return lease

    def put(self, bucket: str, lease: _Lease, now: float) -> None:
        entries = self._entries
        entries[bucket] = lease
        entries.move_to_end(bucket)
        for _ in range(2):
            if not entries or next(iter(entries.values())).ends > now:
                break
            entries.popitem(last=False)
        while len(entries) > self.capacity:
            entries.popitem(last=False)


class RateLimiter:
    def __init__(self, pool: asyncpg.Pool, *, lease_fraction: float = 0.05, max_leases: int = 100_000) -> None:
        self.pool = pool
        self.lease_fraction = lease_fraction
        self._leases = LeaseTable(max_leases)

    def lease_size(self, limit: RateLimit) -> int:
        return max(1, int(limit.requests * self.lease_fraction))

    async def acquire(self, function: str, limit: RateLimit, key: str) -> None:
        """Take one token for ``function`` keyed by ``key`` or raise ``RateLimited`` with ``retry_after``."""
        bucket = f"{function}|{limit.key}|{key}"
        now = time.monotonic()
        lease = self._leases.get(bucket, now)
        if lease is not None:
            if lease.tokens > 0:
                lease.tokens -= 1
                return
            if lease.tokens < 0:  # the window is used up cluster-wide: answer without a round trip
                raise self._limited(function, limit, lease.ends - now)
        granted, seconds_left = await self._claim(bucket, limit)
        now = time.monotonic()
        ends = now + max(0.0, seconds_left)
        if granted <= 0:
            self._leases.put(bucket, _Lease(-1, ends), now)
            raise self._limited(function, limit, seconds_left)
        self._leases.put(bucket, _Lease(granted - 1, ends), now)

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


def limit_key(limit: RateLimit, auth: Auth, client: str) -> str:
    """Whose calls a limit counts together: everyone (``global``), a client address (``ip``, and
    ``user`` for anonymous callers), or the authenticated caller (``user``)."""
    if limit.key == "global":
        return "*"
    if limit.key == "ip" or not auth.authenticated:
        return f"ip:{client}"
    return auth.scope_key()


class CallLimits:
    """Functions' rate limits for every transport; what the gateway returns from ``forge_rate_limiter``.

    One per node, shared by ``/rpc`` and ``/ws``, so a call counts the same whichever way it came."""

    def __init__(self, limiter: RateLimiter | None, clients: ClientAddress) -> None:
        self.limiter = limiter
        self.clients = clients

    def client_address(self, scope: Mapping[str, Any]) -> str:
        """The caller's address for an ASGI ``http`` or ``websocket`` scope (forwarded headers are
        believed only as ``[gateway] trust_forwarded_for`` / ``trusted_proxies`` say)."""
        client = scope.get("client")
        forwarded = [v.decode("latin-1") for n, v in scope.get("headers", ()) if n == b"x-forwarded-for"]
        return self.clients.of(client[0] if client else None, forwarded)

    async def admit(self, definition: FunctionDef, auth: Auth, client: str) -> None:
        """Spend one call of ``definition``'s rate limit (the caller is already authorised) or
        raise ``RateLimited``; a function without a limit costs nothing."""
        limit = definition.rate_limit
        if limit is None or self.limiter is None:
            return
        await self.limiter.acquire(definition.name, limit, limit_key(limit, auth, client))


async def prune(conn: Any) -> None:
    """Maintenance: drop counters of windows that ended (run by the scheduler leader)."""
    await conn.execute(PRUNE_SQL)
