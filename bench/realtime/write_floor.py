"""The floor under bench (c)'s CPU per push: one ``write`` of a ~440-byte WebSocket frame onto
each of N loopback TCP sockets from bare uvloop (no framework, no Python per socket beyond the
call), with the receiving ends in another process, as the benchmark's clients are.

    .venv/bin/python bench/realtime/write_floor.py [N]      # default 5,000 sockets

Prints the sender's CPU time per write (median and best of 20 rounds, the loop's callbacks
after the writes included): on loopback the sender's system call also does the receiver's TCP
work and wakes it, which is most of what a push costs the node.
"""

from __future__ import annotations

import asyncio
import os
import struct
import subprocess
import sys
import time

import uvloop


async def sink(n: int, port: int) -> None:
    loop = asyncio.get_running_loop()

    class Discard(asyncio.Protocol):
        def data_received(self, data: bytes) -> None:
            pass

    for _ in range(n):
        await loop.create_connection(Discard, "127.0.0.1", port)
    print("ready", flush=True)
    await asyncio.sleep(3600)


async def main(n: int) -> None:
    loop = asyncio.get_running_loop()
    transports: list[asyncio.Transport] = []

    class Accept(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            transports.append(transport)  # type: ignore[arg-type]

    server = await loop.create_server(Accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    receivers = subprocess.Popen([sys.executable, __file__, str(n), "--sink", str(port)], stdout=subprocess.PIPE,
                                 text=True)
    try:
        await loop.run_in_executor(None, receivers.stdout.readline)
        while len(transports) < n:
            await asyncio.sleep(0.1)
        payload = (b'{"type":"data","id":"s","hash":"' + b"0" * 32 + b'","position":123456,"data":'
                   + b'[{"id":1,"topic":1000,"payload":"payload"}]' * 8 + b"}")
        frame = struct.pack("!BBH", 0x81, 126, len(payload)) + payload
        per_write = []
        for _ in range(20):
            c0 = time.thread_time()
            for t in transports:
                t.write(frame)
            await asyncio.sleep(0.1)  # thread time: only what this thread computed, callbacks included
            per_write.append((time.thread_time() - c0) * 1e6 / n)
        per_write.sort()
        print(f"{len(frame)}-byte frame to {n} sockets: {per_write[len(per_write) // 2]:.1f} us of sender CPU per "
              f"write (median of 20), best {per_write[0]:.1f} (load {os.getloadavg()[0]:.1f})")
    finally:
        receivers.kill()
        receivers.wait()
        server.close()


if __name__ == "__main__":
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    if len(sys.argv) > 3 and sys.argv[2] == "--sink":
        uvloop.run(sink(count, int(sys.argv[3])))
    else:
        uvloop.run(main(count))
