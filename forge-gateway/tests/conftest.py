"""Gateway test fixtures: a real ``forge-node`` process serving the test app, keys and tokens."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import asyncpg
import attrs
import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
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
        "FORGE_PLUGINS": ",".join(["forge_kernel.kernel_plugin", "forge_gateway.hooks", *plugins]),
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


@pytest.fixture(scope="session")
def keys() -> Keys:
    key, other = _rsa(), _rsa()
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    other_priv = other.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption())
    return Keys(priv, pub, other_priv)


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


@pytest.fixture(scope="module")
def gateway(forge_database_url: str, keys: Keys, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    """One gateway node for a test module, serving ``gw_app``; killed (by pid) at the end."""
    tmp = tmp_path_factory.mktemp("gw")
    db = create_database(forge_database_url)
    cfg = gateway_config(keys, tmp, modules=["gw_app"], api_keys=[
        {"name": "billing-service", "sha256": hashlib.sha256(SERVICE_KEY.encode()).hexdigest(), "roles": ["admin"]}])
    cfg["database"] = {"url": db}
    cfg["node"] = {"id": "gw-main"}
    proc = NodeProcess(tmp / "node", cfg, env=child_env("gw_dispatch_plugin"))
    proc.start()
    try:
        proc.wait_ready()
        yield RunningGateway(f"http://127.0.0.1:{cfg['gateway']['port']}", proc)
    finally:
        proc.terminate(timeout=20)
        drop_database(forge_database_url, db)
