"""A plugin that ships app functions (``forge_app_modules``), as forge-hello does, and a mutation
that dispatches a job by name."""

from forge_kernel import hookimpl, mutation, query


@hookimpl
def forge_app_modules():
    return ["newcomer_app"]


@query(public=True)
async def newcomer_hello(ctx) -> str:
    return "hello"


@mutation
async def dispatch_by_name(ctx) -> int:
    return await ctx.dispatch("defined_on_another_node")
