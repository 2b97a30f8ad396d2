"""Gateway test fixtures: RSA keys, and a real ``forge-node`` process serving the test app."""

from __future__ import annotations

import hashlib
from typing import Iterator

import pytest
from cryptography.hazmat.primitives import serialization

from gw_support import SERVICE_KEY, Keys, RunningGateway, _rsa, running_gateway


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
    with running_gateway(forge_database_url, keys, tmp_path_factory.mktemp("gw"), node_id="gw-main", api_keys=[
            {"name": "billing-service", "sha256": hashlib.sha256(SERVICE_KEY.encode()).hexdigest(), "roles": ["admin"]}
    ]) as gw:
        yield gw
