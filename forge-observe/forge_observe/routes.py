"""``GET /metrics``: Prometheus text of this node (and the cluster gauges while it leads)."""

from __future__ import annotations

import hmac
import ipaddress
from typing import Any

from litestar import Request, Response, get
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest


def metrics_route(observer: Any, path: str = "/metrics") -> Any:
    cfg = observer.config
    networks = [ipaddress.ip_network(n, strict=False) for n in cfg.metrics_allow]
    token = cfg.metrics_token.encode()

    def allowed(request: Request) -> bool:
        host = request.client.host if request.client else ""
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            return False
        if not any(addr in n for n in networks):
            return False
        if token:
            given = request.headers.get("authorization", "")
            return hmac.compare_digest(given.encode(), b"Bearer " + token)
        return True

    @get(path, include_in_schema=False)
    async def forge_metrics(request: Request) -> Response:
        if not allowed(request):
            return Response(b'{"error":{"code":"FORBIDDEN","message":"/metrics is not open to this client '
                            b'([observe] metrics_allow, metrics_token)","details":null}}',
                            status_code=403, media_type="application/json")
        observer.aggregate()
        return Response(generate_latest(observer.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return forge_metrics
