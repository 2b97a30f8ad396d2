"""bench only: a gateway-only node's calls forwarded over HTTP keep-alive to a function node's
``/rpc/{function}`` (FORGE_BENCH_FORWARD_TO=host:port), through the same kernel hook forge-mesh
implements; what gRPC forwarding is compared with."""

from __future__ import annotations

import json
import os
from typing import Any

from forge_kernel import hookimpl
from forge_kernel.errors import ForgeError

from httpclient import Pool


class HttpForwarder:
    def __init__(self) -> None:
        host, _, port = os.environ["FORGE_BENCH_FORWARD_TO"].rpartition(":")
        self.host, self.port = host, int(port)
        self.pool: Pool | None = None  # created inside the running loop

    def wants(self, defn: Any) -> bool:
        return True

    async def forward(self, call: Any, args: Any, timeout: float) -> Any:
        if self.pool is None:
            self.pool = Pool(self.host, self.port, size=64)
        status, body = await self.pool.post(f"/rpc/{call.defn.name}", json.dumps(args or {}).encode(),
                                            {"x-request-id": call.request_id})
        reply = json.loads(body)
        if "error" in reply:
            err = reply["error"]
            raise ForgeError(err["message"], code=err["code"], details=err.get("details"))
        return reply["data"]

    async def claim(self, conn: Any, call_id: str, defn: Any) -> tuple[bool, Any]:
        return False, None

    async def record(self, conn: Any, call_id: str, result: Any) -> None:
        return None

    def problem(self) -> str | None:
        return None


@hookimpl
def forge_call_forwarder(node: Any) -> HttpForwarder:
    return HttpForwarder()
