"""The node's WebSocket protocol: ``write_now`` (forge_kernel.websocket) on a real server and a
real client, beside the ASGI path."""

from __future__ import annotations

import asyncio
import types

import websockets

from forge_gateway.config import GatewayConfig
from forge_gateway.server import serve
from forge_gateway.websocket import text_frame, text_frame_header
from forge_kernel.testing import contracts
from forge_kernel.websocket import write_now


class Echoless:
    """An ASGI app whose WebSocket connections wait, handing their scope and ``send`` to the test."""

    def __init__(self) -> None:
        self.connections: asyncio.Queue = asyncio.Queue()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                event = await receive()
                await send({"type": event["type"] + ".complete"})
                if event["type"] == "lifespan.shutdown":
                    return
        if scope["type"] != "websocket":
            return
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        closed = asyncio.Event()
        self.connections.put_nowait((scope, send, closed))
        while (await receive())["type"] != "websocket.disconnect":
            pass
        closed.set()


async def test_write_now_keeps_the_kernel_contract():
    app = Echoless()
    async with serve(app, GatewayConfig(port=0)) as port:
        async with websockets.connect(f"ws://127.0.0.1:{port}/", max_size=None) as ws:
            scope, send, _ = await app.connections.get()
            conn = types.SimpleNamespace(write_now=write_now(scope), receive=ws.recv,
                                         send=lambda text: send({"type": "websocket.send", "text": text}))
            assert conn.write_now is not None, "the gateway's server offers no write_now"
            await contracts.check_websocket_write_now(conn)


async def test_write_now_refuses_while_the_peer_does_not_read_and_after_it_closed():
    app = Echoless()
    async with serve(app, GatewayConfig(port=0)) as port:
        ws = await websockets.connect(f"ws://127.0.0.1:{port}/", max_size=None, max_queue=1)
        scope, send, closed = await app.connections.get()
        now = write_now(scope)
        chunk = b"x" * 100_000
        written = 0
        while now((chunk, str(written).encode())):  # the client reads nothing meanwhile
            written += 1
            assert written < 2000, "write_now never refused although the peer read nothing"
            await asyncio.sleep(0)
        assert written > 0
        # everything taken arrives intact once the client reads
        for i in range(written):
            assert await asyncio.wait_for(ws.recv(), 30) == "x" * 100_000 + str(i)
        # the buffer drained below its low-water mark: messages are taken again
        for _ in range(100):
            if now((b"again",)):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("write_now kept refusing after the client caught up")
        assert await asyncio.wait_for(ws.recv(), 30) == "again"
        await ws.close()
        await asyncio.wait_for(closed.wait(), 10)
        assert now((b"late",)) is False


def test_frame_headers_use_the_shortest_length_encoding():
    assert text_frame_header(0) == b"\x81\x00"
    assert text_frame_header(125) == b"\x81\x7d"
    assert text_frame_header(126) == b"\x81\x7e\x00\x7e"
    assert text_frame_header(65535) == b"\x81\x7e\xff\xff"
    assert text_frame_header(65536) == b"\x81\x7f" + (65536).to_bytes(8, "big")


def test_a_fan_out_writes_the_very_same_frame_to_every_connection():
    """The parts tuple a fan-out hands to thousands of connections is framed once: every connection
    gets the same bytes object (one ``write`` of it), and the frame is exactly header + payload."""
    message = (b'{"type":"data","id":"s"', b',"data":' + b"[1]" * 100 + b"}")
    frame = text_frame(message)
    assert frame == text_frame_header(len(b"".join(message))) + b"".join(message)
    assert text_frame(message) is frame
    # another message (even with equal content, or a list, which could change) is framed afresh
    other = (b'{"type":"data","id":"t"', message[1])
    assert text_frame(other) == text_frame_header(len(b"".join(other))) + b"".join(other)
    parts = [b'{"a":', b"1}"]
    assert text_frame(parts) == b'\x81\x07{"a":1}'
    parts[1] = b"2}"
    assert text_frame(parts) == b'\x81\x07{"a":2}'


async def test_write_now_beside_compressed_asgi_messages():
    """With permessage-deflate negotiated, ASGI sends go out compressed (the deflate context carried
    from one message to the next) and ``write_now``'s shared frames uncompressed (RSV1 clear, which
    RFC 7692 allows for any message): a client decoding both, interleaved, reads every message
    intact and in call order."""
    app = Echoless()
    async with serve(app, GatewayConfig(port=0)) as port:
        async with websockets.connect(f"ws://127.0.0.1:{port}/", max_size=None, compression="deflate") as ws:
            assert "permessage-deflate" in (ws.response.headers.get("sec-websocket-extensions") or "")
            scope, send, _ = await app.connections.get()
            now = write_now(scope)
            expected = []
            for i in range(6):
                text = f'{{"n":{i},"pad":"{"abc" * 200}"}}'
                if i % 2:
                    assert now((text.encode(),))
                else:
                    await send({"type": "websocket.send", "text": text})
                expected.append(text)
            assert [await asyncio.wait_for(ws.recv(), 10) for _ in expected] == expected
