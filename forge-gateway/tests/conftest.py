"""Gateway test fixtures: RSA keys, and a real ``forge-node`` process serving the test app."""

from __future__ import annotations

import hashlib
from typing import Iterator

import pytest
from cryptography.hazmat.primitives import serialization

from gw_support import (SERVICE_KEY, Keys, NodeProcess, RunningGateway, _rsa, child_env, create_database,
                        drop_database, gateway_config)


@pytest.fixture(scope="session")
def keys() -> Keys:
    key, other = _rsa(), _rsa()
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    other_priv = other.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption())
    return Keys(priv, pub, other_priv)


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
