"""A third-party plugin that adds routes through the gateway hook (as realtime adds /ws)."""

from litestar import WebSocket, get, websocket

from forge_kernel import hookimpl


@get("/hello")
async def hello() -> dict[str, str]:
    return {"hello": "from a plugin"}


@websocket("/echo")
async def echo(socket: WebSocket) -> None:
    """Answers every text message with itself (the TLS tests speak WSS to it)."""
    await socket.accept()
    while True:
        event = await socket.receive()
        if event["type"] == "websocket.disconnect":
            return
        await socket.send_text(event.get("text") or "")


@hookimpl
def forge_gateway_routes(node):
    return [hello, echo]
