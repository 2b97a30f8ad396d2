"""forge_mesh keeps grpcio's C core on its polling I/O path (forge_mesh/engine.py): the installed
grpcio still understands the flags, and the EventEngine's threads stay out of each call."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from forge_mesh import engine

ROUND_TRIPS = 300

# one process, a server and a client on one bidirectional stream: how often did the EventEngine's
# threads wake up while the round trips ran? (counted, not timed)
_PROBE = r"""
import asyncio, json, os, sys
from pathlib import Path
import forge_mesh  # first, as a node's plugin loader does
import grpc

def wakeups(name):
    total = 0
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        if (task / "comm").read_text().strip() == name:
            for line in (task / "status").read_text().splitlines():
                if "ctxt_switches" in line:
                    total += int(line.split()[1])
    return total

async def main(n):
    async def echo(frames, context):
        async for frame in frames:
            yield frame
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "t.T", {"Echo": grpc.stream_stream_rpc_method_handler(echo)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.stream_stream("/t.T/Echo")()
        for _ in range(20):
            await call.write(b"x" * 1024)
            await call.read()
        before = wakeups("event_engine")
        for _ in range(n):
            await call.write(b"x" * 1024)
            assert await call.read() == b"x" * 1024
        after = wakeups("event_engine")
        await call.done_writing()
    await server.stop(None)
    print(json.dumps({"event_engine_wakeups": after - before, "experiments": os.environ.get("GRPC_EXPERIMENTS"),
                      "not_applied": forge_mesh.engine.not_applied}))

asyncio.run(main(int(sys.argv[1])))
"""


def _probe(env_experiments: str | None) -> tuple[dict, str]:
    env = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
    if env_experiments is not None:
        env["GRPC_EXPERIMENTS"] = env_experiments
    out = subprocess.run([sys.executable, "-c", _PROBE, str(ROUND_TRIPS)], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


def test_importing_forge_mesh_keeps_the_event_engine_threads_out_of_each_call():
    got, stderr = _probe(None)
    assert got["experiments"] == engine.EXPERIMENTS and got["not_applied"] == ""
    # a grpcio that dropped an experiment says so on stderr and silently takes the EventEngine path
    assert "Unknown experiment" not in stderr, stderr
    # on the polling path the EventEngine threads only wake for housekeeping; on its own path
    # they wake several times per message (the control below shows the count does discriminate)
    assert got["event_engine_wakeups"] < ROUND_TRIPS // 2, got


def test_an_operators_grpc_experiments_are_left_alone_and_the_cost_is_visible():
    got, _ = _probe("")  # set, but empty: the C core's defaults, the EventEngine path
    assert got["experiments"] == ""
    assert "GRPC_EXPERIMENTS is set" in got["not_applied"]
    assert got["event_engine_wakeups"] >= ROUND_TRIPS, got


def test_grpc_imported_before_forge_mesh_is_reported():
    code = ("import os, grpc; os.environ.pop('GRPC_EXPERIMENTS', None); import forge_mesh; "
            "print(forge_mesh.engine.not_applied)")
    env = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, check=True)
    assert "grpc was imported before forge_mesh" in out.stdout
