"""The cluster's mesh token (``forge_mesh_cluster``): created once, read by every node and CLI.

Mutual TLS proves membership beyond loopback; on a loopback-only machine the mesh is plaintext,
and the token is what keeps another local user (who can reach the port but not the database)
from sending calls under any identity, draining nodes or reading logs.
"""

from __future__ import annotations

import hmac
import secrets
from typing import Any

METADATA_KEY = "x-forge-mesh-token"


async def cluster_token(conn: Any) -> str:
    await conn.execute("INSERT INTO forge_mesh_cluster (id, token) VALUES (true, $1) ON CONFLICT (id) DO NOTHING",
                       secrets.token_urlsafe(32))
    return await conn.fetchval("SELECT token FROM forge_mesh_cluster WHERE id")


def token_matches(metadata: Any, token: str) -> bool:
    for key, value in metadata or ():
        if key == METADATA_KEY:
            return hmac.compare_digest(str(value), token)
    return False
