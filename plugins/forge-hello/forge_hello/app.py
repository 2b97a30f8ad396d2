"""App functions the plugin contributes."""

from forge_kernel import query


@query(public=True, name="hello.greetings")
async def greetings(ctx, limit: int = 10) -> list[str]:
    rows = await ctx.db.fetch("SELECT greeting FROM hello_greetings ORDER BY id DESC LIMIT $1", limit)
    return [r["greeting"] for r in rows]
