"""The bench's function: a 1 KB result after one SELECT."""

from forge_kernel import query


@query(public=True)
async def blob(ctx, size: int = 1024) -> str:
    await ctx.db.fetchval("SELECT 1")
    return "x" * size
