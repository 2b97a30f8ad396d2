"""Talking to nodes from outside a node (the CLI, the dashboard): live status, logs, drain, job cancel.

Addresses come from ``forge_mesh_nodes``; channels are opened for one command and closed after it.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, AsyncIterator

import grpc

from forge_kernel.errors import NotFound, StartupError

from . import wire
from .channels import Stubs, open_stubs
from .config import MeshConfig
from .protocol import mesh_pb2 as pb
from .tls import Material, load_material
from .token import cluster_token

_NODES_SQL = """
SELECT n.id, n.status, n.last_heartbeat, m.address, m.epoch, m.tls, m.protocol
FROM forge_nodes n LEFT JOIN forge_mesh_nodes m ON m.node_id = n.id
WHERE n.status <> 'stopped' ORDER BY n.id
"""


def _material(cfg: MeshConfig) -> Material | None:
    try:
        return load_material(cfg, "forge-cli")
    except StartupError:
        return None


async def _mesh_tables(conn: Any) -> bool:
    return bool(await conn.fetchval("SELECT to_regclass('forge_mesh_nodes') IS NOT NULL"))


class NodeClient:
    """Channels to the nodes of one cluster, for one command."""

    def __init__(self, config: Any, token: str) -> None:
        self.config: MeshConfig = config["mesh"]
        self.token = token
        self.material = _material(self.config)
        self._open: list[Stubs] = []

    def stubs(self, row: Any) -> Stubs:
        stubs = open_stubs(row["address"], row["tls"], self.material, self.config.max_message_bytes, self.token)
        self._open.append(stubs)
        return stubs

    async def close(self) -> None:
        for s in self._open:
            with contextlib.suppress(Exception):
                await s.close()
        self._open.clear()

    async def __aenter__(self) -> "NodeClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


async def node_row(conn: Any, node_id: str) -> Any:
    if not await _mesh_tables(conn):
        raise NotFound("no node runs forge-mesh in this cluster (forge_mesh_nodes does not exist)")
    row = await conn.fetchrow(_NODES_SQL.replace("ORDER BY n.id", "AND n.id = $1"), node_id)
    if row is None:
        raise NotFound(f"no live node {node_id!r} (forge-node status lists them)")
    if row["address"] is None:
        raise NotFound(f"node {node_id!r} has no mesh address: is forge-mesh installed there?")
    return row


async def live_status(config: Any, conn: Any, timeout: float = 1.0) -> list[dict[str, Any]]:
    """Ask every node that forge_nodes lists as not stopped what it is doing now. Answers within
    ``timeout`` seconds overall; a node that does not answer in time is ``reachable: False``."""
    if not await _mesh_tables(conn):
        return []
    rows = await conn.fetch(_NODES_SQL)
    out: list[dict[str, Any]] = []
    async with NodeClient(config, await cluster_token(conn)) as client:
        async def ask(row: Any) -> dict[str, Any]:
            base = {"id": row["id"], "status": row["status"], "address": row["address"]}
            if row["address"] is None:
                return {**base, "reachable": False, "error": "no mesh address (forge-mesh not installed there?)"}
            try:
                stubs = client.stubs(row)
                reply = await stubs.status(pb.StatusRequest(protocol=row["protocol"] or 1), timeout=timeout,
                                           metadata=stubs.metadata)
            except grpc.aio.AioRpcError as exc:
                return {**base, "reachable": False, "error": f"{exc.code().name}: {exc.details()}"}
            except ConnectionError as exc:
                return {**base, "reachable": False, "error": str(exc)}
            return {**base, "reachable": True, "epoch": reply.epoch, "protocol": reply.protocol,
                    "version": reply.version, "activity": wire.decode_json(reply.activity_json, "StatusReply") or {}}

        tasks = [asyncio.ensure_future(ask(r)) for r in rows]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout + 0.2)
        for row, task in zip(rows, tasks):
            if task.done() and not task.cancelled() and task.exception() is None:
                out.append(task.result())
            else:
                task.cancel()
                out.append({"id": row["id"], "status": row["status"], "address": row["address"], "reachable": False,
                            "error": f"no answer within {timeout:g}s"})
    return out


async def follow_logs(config: Any, conn: Any, node_id: str, level: str = "INFO") -> AsyncIterator[str]:
    """The live log lines of ``node_id`` until the caller stops iterating or the node goes away."""
    row = await node_row(conn, node_id)
    async with NodeClient(config, await cluster_token(conn)) as client:
        stubs = client.stubs(row)
        call = stubs.logs(pb.LogsRequest(level=level), metadata=stubs.metadata)
        try:
            async for line in call:
                yield line.text
        finally:
            call.cancel()


async def drain(config: Any, conn: Any, node_id: str, timeout: float = 5.0) -> pb.DrainReply:
    row = await node_row(conn, node_id)
    async with NodeClient(config, await cluster_token(conn)) as client:
        stubs = client.stubs(row)
        return await stubs.drain(pb.DrainRequest(target_node=node_id, target_epoch=row["epoch"]), timeout=timeout,
                                 metadata=stubs.metadata)


async def cancel_job(config: Any, conn: Any, job_id: int, node_id: str, timeout: float = 1.0) -> bool:
    """Tell ``node_id`` to stop job ``job_id`` now; ``False`` when it cannot be told (the database
    request reaches it anyway)."""
    try:
        row = await node_row(conn, node_id)
        async with NodeClient(config, await cluster_token(conn)) as client:
            stubs = client.stubs(row)
            reply = await stubs.cancel_job(pb.CancelJobRequest(job_id=job_id, target_node=node_id), timeout=timeout,
                                           metadata=stubs.metadata)
        return reply.cancelled
    except (NotFound, grpc.aio.AioRpcError, ConnectionError, OSError, asyncio.TimeoutError):
        return False
