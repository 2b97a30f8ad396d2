"""bench/mesh: the mesh's call streams alone (forge_mesh.streams over grpcio, two processes on
loopback, no database, no HTTP): CPU and context switches per call on each end, stream messages
per call, for protocol 3 (one call per message) and protocol 4 (batches), at a given number of
calls in flight. Load-independent yardsticks for the transport's cost per forwarded call.

    .venv/bin/python bench/mesh/streams_bench.py [--calls 20000] [--concurrency 1 8 32] [--protocol 3 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import forge_mesh  # noqa: F401  (first: grpc's I/O path is chosen before grpc is imported)
import grpc
import uvloop

from forge_mesh.protocol import mesh_pb2 as pb
from forge_mesh.streams import StreamPool, serve_stream

CLK = os.sysconf("SC_CLK_TCK")
RESULT = b'"' + b"x" * 1024 + b'"'


def usage(pid: int) -> tuple[float, int]:
    """CPU seconds and context switches (voluntary + involuntary, every thread) of one process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLK
    switches = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if "ctxt_switches" in line:
                switches += int(line.split()[1])
    return cpu, switches


async def serve() -> None:
    async def run(req: pb.CallRequest) -> pb.CallReply:
        await asyncio.sleep(0)  # a real call awaits its database at least once
        return pb.CallReply(result_json=RESULT)

    def streamed(batched: bool):
        async def handler(messages, context):
            async for out in serve_stream(messages, run, batched):
                yield out
        return handler

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("forge.mesh.v1.Mesh", {
        "Calls": grpc.stream_stream_rpc_method_handler(streamed(False), request_deserializer=pb.CallFrame.FromString,
                                                       response_serializer=pb.CallResult.SerializeToString),
        "Batches": grpc.stream_stream_rpc_method_handler(streamed(True), request_deserializer=pb.CallBatch.FromString,
                                                         response_serializer=pb.ResultBatch.SerializeToString),
    }),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


async def client(port: int, server_pid: int, protocol: int, concurrency: int, calls: int, streams: int) -> dict:
    batched = protocol >= 4
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        if batched:
            opener = channel.stream_stream("/forge.mesh.v1.Mesh/Batches", request_serializer=pb.CallBatch.SerializeToString,
                                           response_deserializer=pb.ResultBatch.FromString)
        else:
            opener = channel.stream_stream("/forge.mesh.v1.Mesh/Calls", request_serializer=pb.CallFrame.SerializeToString,
                                           response_deserializer=pb.CallResult.FromString)
        pool = StreamPool(opener, size=streams, batched=batched)
        caller = pb.Caller(kind="user", user_id="alice", roles=["reader"])

        async def worker(n: int) -> None:
            for _ in range(n):
                req = pb.CallRequest(function="blob", args_json=b'{"size": 1024}', caller=caller, request_id="r" * 16,
                                     target_node="f", target_epoch="e" * 16, timeout_ms=10_000, protocol=protocol)
                reply = await pool.request(req, 10.0)
                assert reply.result_json == RESULT

        await asyncio.gather(*(worker(200) for _ in range(concurrency)))  # warm-up
        before = sum(s.messages for s in pool.streams)
        c0, s0 = usage(os.getpid()), usage(server_pid)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(calls // concurrency) for _ in range(concurrency)))
        took = time.perf_counter() - t0
        c1, s1 = usage(os.getpid()), usage(server_pid)
        n = calls // concurrency * concurrency
        messages = sum(s.messages for s in pool.streams) - before
        await pool.close()
    return {"protocol": protocol, "streams": streams, "concurrency": concurrency, "calls": n, "calls_per_s": round(n / took),
            "client_cpu_us_per_call": round((c1[0] - c0[0]) / n * 1e6, 1),
            "server_cpu_us_per_call": round((s1[0] - s0[0]) / n * 1e6, 1),
            "client_switches_per_call": round((c1[1] - c0[1]) / n, 2),
            "server_switches_per_call": round((s1[1] - s0[1]) / n, 2),
            "calls_per_message": round(n / messages, 2) if messages else None,
            "load_average": os.getloadavg()[0]}


def main() -> None:
    if sys.argv[1:] == ["--serve"]:
        uvloop.run(serve())
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--protocol", type=int, nargs="+", default=[3, 4])
    ap.add_argument("--streams", type=int, nargs="+", default=[4], help="streams per peer (StreamPool size)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    out = []
    for protocol in args.protocol:
        for concurrency, streams in [(c, s) for c in args.concurrency for s in args.streams]:
            server = subprocess.Popen([sys.executable, __file__, "--serve"], stdout=subprocess.PIPE, text=True)
            try:
                port = int(server.stdout.readline())
                res = uvloop.run(client(port, server.pid, protocol, concurrency, args.calls, streams))
            finally:
                server.terminate()
                server.wait(10)
            print(json.dumps(res), flush=True)
            out.append(res)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
