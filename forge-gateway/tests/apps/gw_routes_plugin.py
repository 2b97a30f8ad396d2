"""A third-party plugin that adds a route through the gateway hook (as realtime adds /ws)."""

from litestar import get

from forge_kernel import hookimpl


@get("/hello")
async def hello() -> dict[str, str]:
    return {"hello": "from a plugin"}


@hookimpl
def forge_gateway_routes(node):
    return [hello]
