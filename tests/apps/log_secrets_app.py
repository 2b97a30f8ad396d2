"""App for tests/test_log_secrets.py: a rate-limited function (the limiter goes to the database
before the function runs) and one whose own SQL fails."""

from forge_kernel import mutation, query
from forge_kernel.app import RateLimit


@query(rate_limit=RateLimit(1000, 1.0))
async def limited(ctx) -> int:
    return 1


@mutation
async def broken_sql(ctx, note: str) -> int:
    return await ctx.db.fetchval("SELECT no_such_column FROM forge_nodes WHERE id = $1", note)
