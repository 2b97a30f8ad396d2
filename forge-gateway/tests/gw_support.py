"""Helpers shared by the gateway tests (imported as ``gw_support``; ``conftest`` is a name every
package's tests use, so it cannot be imported by name when the whole repository runs)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import asyncpg
import attrs
import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from forge_kernel.testing import NodeProcess, free_port

APPS = str(Path(__file__).parent / "apps")
SECRET = "test-hmac-secret-that-is-long-enough-for-hs256"
AUDIENCE = "forge-tests"
ISSUER = "https://issuer.test"
SERVICE_KEY = "svc-key-" + "x" * 24


def child_env(*plugins: str) -> dict[str, str]:
    """Environment of a node process: the test apps importable, and only the kernel, the gateway and
    ``plugins`` loaded (other packages installed beside us are built concurrently; their state must
    not decide these tests)."""
    return {
        "PYTHONPATH": os.pathsep.join(p for p in (APPS, os.environ.get("PYTHONPATH", "")) if p),
        "FORGE_DISABLE_PLUGIN_AUTOLOAD": "1",
        # gw_app has a @job: a node serving it needs a job store (the stand-in one)
        "FORGE_PLUGINS": ",".join(dict.fromkeys(["forge_kernel.kernel_plugin", "forge_gateway.hooks",
                                                 "gw_dispatch_plugin", *plugins])),
        # the repository's root conftest turns node logs down to WARNING; these tests read INFO lines
        "FORGE_LOG__LEVEL": "INFO",
    }


@attrs.frozen
class Keys:
    private_pem: bytes
    public_pem: bytes
    other_private_pem: bytes

    def rs256(self, claims: dict[str, Any] | None = None, **kw: Any) -> str:
        return jwt.encode(_claims(claims, **kw), self.private_pem, algorithm="RS256")

    def hs256(self, claims: dict[str, Any] | None = None, secret: str | bytes = SECRET, **kw: Any) -> str:
        return jwt.encode(_claims(claims, **kw), secret, algorithm="HS256")


def _claims(claims: dict[str, Any] | None, *, sub: str = "user-1", roles: Any = ("reader",), ttl: float = 300,
            aud: str | None = AUDIENCE, iss: str | None = ISSUER, **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    out: dict[str, Any] = {"sub": sub, "roles": list(roles) if isinstance(roles, tuple) else roles, "exp": now + int(ttl),
                           "iat": now}
    if aud is not None:
        out["aud"] = aud
    if iss is not None:
        out["iss"] = iss
    out.update(extra)
    out.update(claims or {})
    return {k: v for k, v in out.items() if v is not None}


def _rsa() -> Any:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def create_database(admin_url: str) -> str:
    name = f"forge_gw_{uuid.uuid4().hex[:10]}"

    async def go() -> None:
        conn = await asyncpg.connect(admin_url)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    asyncio.run(go())
    base, _, query = admin_url.partition("?")
    return base.rpartition("/")[0] + f"/{name}" + (f"?{query}" if query else "")


def drop_database(admin_url: str, url: str) -> None:
    name = url.partition("?")[0].rpartition("/")[2]

    async def go() -> None:
        conn = await asyncpg.connect(admin_url)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    asyncio.run(go())


def gateway_config(keys: Keys, tmp: Path, *, modules: list[str], **gateway: Any) -> dict[str, dict[str, Any]]:
    pub = tmp / "jwt_public.pem"
    pub.write_bytes(keys.public_pem)
    gw = {
        "port": free_port(),
        "jwt_secret": SECRET,
        "jwt_public_key_file": str(pub),
        "jwt_audience": AUDIENCE,
        "jwt_issuer": ISSUER,
        "max_body_bytes": 65536,
        "rate_limit_lease": 0.0,
        **gateway,
    }
    return {"gateway": gw, "app": {"modules": modules, "example": False}, "log": {"level": "INFO"}}


@attrs.define
class RunningGateway:
    url: str
    proc: NodeProcess

    def client(self, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kw)


@contextlib.contextmanager
def running_gateway(admin_url: str, keys: Keys, tmp: Path, *, node_id: str, plugins: tuple[str, ...] = (),
                    modules: tuple[str, ...] = ("gw_app",), **gateway: Any) -> Iterator[RunningGateway]:
    """A ``forge-node`` process serving ``modules`` on a database of its own, with ``[gateway]``
    settings ``gateway`` on top of the tests' defaults; killed (by pid) and its database dropped
    when the block ends."""
    db = create_database(admin_url)
    cfg = gateway_config(keys, tmp, modules=list(modules), **gateway)
    cfg["database"] = {"url": db}
    cfg["node"] = {"id": node_id}
    proc = NodeProcess(tmp / "node", cfg, env=child_env("gw_dispatch_plugin", *plugins))
    proc.start()
    try:
        proc.wait_ready()
        scheme = "https" if gateway.get("tls_cert") else "http"
        yield RunningGateway(f"{scheme}://127.0.0.1:{cfg['gateway']['port']}", proc)
    finally:
        proc.terminate(timeout=20)
        drop_database(admin_url, db)
