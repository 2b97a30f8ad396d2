"""Jobs forge-observe ships (registered through ``forge_app_modules``)."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from typing import Any

from forge_kernel import job


def _post(url: str, body: bytes, timeout: float) -> int:
    req = urllib.request.Request(url, data=body, method="POST", headers={"content-type": "application/json",
                                                                          "user-agent": "forge-observe"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - the URL is operator config (http/https only)
        return resp.status


@job(max_attempts=8, queue="default", timeout=30)
async def observe_alert_webhook(ctx: Any, url: str, payload: dict) -> int:
    """POST an alert transition as JSON; a refused or failed delivery raises, so the job is retried."""
    if not url.startswith(("http://", "https://")):
        raise ValueError("alert webhooks are http:// or https:// URLs")
    return await asyncio.to_thread(_post, url, json.dumps(payload).encode(), 10.0)
