"""bench/rpc/protocol_overhead.py: CPU per request of the gateway's connection protocol
(``forge_gateway.protocol.EdgeProtocol``) against uvicorn's own httptools protocol, in-process.

Feeds the same keep-alive ``POST /rpc/value`` request (the shape wrk sends) 20,000 times to each
protocol over a fake transport, answering from a trivial ASGI app, and prints the best of 7
rounds of process CPU per request. Steadier than ``run.py`` on a shared machine: it measures only
what the edge limits add on the hot path.

    .venv/bin/python bench/rpc/protocol_overhead.py
"""
import asyncio
import os
import time

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState
from forge_gateway.protocol import EdgeProtocol, ConnectionGate, EdgeLimits

async def app(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b'{"data":8}'})

class T:
    def __init__(self): self.out = 0; self.closing = False
    def write(self, d): self.out += len(d)
    def is_closing(self): return self.closing
    def close(self): self.closing = True
    def get_extra_info(self, name, default=None): return ("127.0.0.1", 5555) if name in ("peername", "sockname") else default
    def pause_reading(self): pass
    def resume_reading(self): pass
    def set_protocol(self, p): pass
    def get_protocol(self): return None

REQ = (b"POST /rpc/value HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nContent-Type: application/json\r\n"
       b"Content-Length: 9\r\nUser-Agent: wrk\r\nAccept: */*\r\n\r\n{\"id\": 7}")

async def main():
    cfg = uvicorn.Config(app, log_config=None, lifespan="off", proxy_headers=False)
    cfg.load()
    loop = asyncio.get_running_loop()
    makers = {"httptools": lambda st: HttpToolsProtocol(config=cfg, server_state=st, app_state={}, _loop=loop),
              "edge": lambda st: EdgeProtocol(config=cfg, server_state=st, app_state={}, _loop=loop,
                                             gate=ConnectionGate(EdgeLimits()))}
    best = {k: 1e9 for k in makers}
    for rep in range(7):
        for name, make in makers.items():
            st = ServerState()
            p = make(st); t = T(); p.connection_made(t)
            n = 20000
            t0 = time.process_time()
            for i in range(n):
                p.data_received(REQ)
                await asyncio.sleep(0)
            best[name] = min(best[name], (time.process_time() - t0) / n * 1e6)
            p.connection_lost(None)
    print({k: round(v, 2) for k, v in best.items()}, "us CPU per request (best of 7); load average", os.getloadavg())
asyncio.run(main())
