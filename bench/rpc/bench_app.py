"""The FORGE side of the benchmark: one public query running one SELECT with a bind parameter."""

from forge_kernel import query


@query(public=True)
async def value(ctx, id: int) -> int:
    return await ctx.db.fetchval("SELECT $1::int + 1", id)
