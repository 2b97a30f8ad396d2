"""No secret reaches a log line or an error message (issue 19, item 4).

A real node with a JWT secret and an API key is driven down the paths that used to print
them - a database fault during an API-key call (a traceback whose frames held the request
headers), a validly signed JWT with an absurd ``exp`` (locals held the token, its claims and
the gateway config), a failing function called with the key - and ``forge-node start`` is given
config errors holding secrets. Then the whole output is searched for every secret.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import httpx
import jwt
import pytest

from forge_kernel.logs import Redactor, redact
from forge_kernel.testing.procs import write_config

pytest.importorskip("forge_gateway")

APPS = str(Path(__file__).parent / "apps")
JWT_SECRET = "jwt-" + secrets.token_hex(20)
API_KEY = "key-" + secrets.token_hex(20)


def env() -> dict[str, str]:
    return {"PYTHONPATH": APPS + os.pathsep + os.environ.get("PYTHONPATH", ""), "FORGE_LOG__LEVEL": "DEBUG",
            "FORGE_DISABLE_PLUGIN_AUTOLOAD": "1",
            "FORGE_PLUGINS": "forge_gateway.hooks"}


def assert_no_secret(text: str, *secrets_: str) -> None:
    for s in secrets_:
        assert s not in text, f"secret {s[:6]}... found in:\n{text[max(0, text.find(s) - 800):text.find(s) + 200]}"


async def test_secrets_never_reach_the_log(forge_processes):
    key_hash = hashlib.sha256(API_KEY.encode()).hexdigest()
    node = forge_processes({
        "node": {"roles": ["gateway", "function"]},
        "app": {"modules": ["log_secrets_app"], "example": False},
        "gateway": {"port": 0, "jwt_secret": JWT_SECRET, "api_keys": [{"name": "svc-logs", "sha256": key_hash}]},
    }, env=env())
    base = f"http://127.0.0.1:{node.ready_info()['ports']['http']}"
    absurd = jwt.encode({"sub": "mallory", "exp": int(time.time()) + 10**12, "note": "claims-" + API_KEY[:10]},
                        JWT_SECRET, algorithm="HS256")
    conn = await asyncpg.connect(forge_processes.db_url)
    try:
        # a database fault under an API-key call: the limiter's table is gone
        await conn.execute("ALTER TABLE forge_gateway_rate_limits RENAME TO forge_rate_limits_gone")
        async with httpx.AsyncClient(base_url=base, timeout=20) as http:
            r = await http.post("/rpc/limited", json={}, headers={"X-API-Key": API_KEY})
            assert r.status_code == 500, r.text
            r = await http.post("/rpc/broken_sql", json={"note": API_KEY}, headers={"Authorization": f"Bearer {API_KEY}"})
            assert r.status_code == 500, r.text
            r = await http.post("/rpc/limited", json={}, headers={"Authorization": f"Bearer {absurd}"})
            assert r.status_code in (401, 500), r.text
            for reply in [r]:
                assert_no_secret(reply.text, JWT_SECRET, API_KEY, absurd)
    finally:
        await conn.execute("ALTER TABLE IF EXISTS forge_rate_limits_gone RENAME TO forge_gateway_rate_limits")
        await conn.close()
    node.terminate()
    log = node.log()
    assert "limited" in log and "broken_sql" in log  # the faults were logged ...
    assert_no_secret(log, JWT_SECRET, API_KEY, absurd, absurd.split(".")[1])  # ... without the secrets


@pytest.mark.parametrize("gateway, secret", [
    ({"jwt_secret": 12345678901234567890123456789012345}, "12345678901234567890123456789012345"),
    ({"api_keys": [{"name": "svc", "sha256": API_KEY}]}, API_KEY),
])
def test_config_errors_never_echo_a_secret(tmp_path, gateway, secret):
    cfg = write_config(tmp_path / "forge.toml", {"database": {"url": "postgresql://u:db-" + JWT_SECRET + "@h/d"},
                                                 "gateway": gateway})
    proc = subprocess.run([sys.executable, "-m", "forge_kernel.cli", "--config", str(cfg), "start"],
                          capture_output=True, text=True, timeout=60, env={**os.environ, **env()})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "[gateway]" in out and "value not shown: a secret" in out, out
    assert_no_secret(out, secret, JWT_SECRET)


def test_redaction_rules():
    r = Redactor()
    r.add_values(["s3cret-value", "tiny"])
    r.add_sha256([hashlib.sha256(API_KEY.encode()).hexdigest()])
    text = (f"url postgresql://app:hunter2@db/x token s3cret-value, key {API_KEY}, "
            f"password=hunter3&user=x {{'api_key': 'abc123', \"token\": \"t0k\"}} Authorization: Bearer abcdefghijk "
            f"x-api-key: zzz jwt eyJhbGciOi.eyJzdWIiOi.c2lnbmF0dXJl tiny")
    out = r(text)
    for leaked in ("hunter2", "s3cret-value", API_KEY, "hunter3", "abc123", "t0k", "abcdefghijk", "zzz", "eyJzdWIiOi"):
        assert leaked not in out, out
    # ordinary words stay: short values only where a key names them, and messages keep their sense
    assert "tiny" in out and "user=x" in out and "token expired" == r("token expired")
    assert redact("[gateway] jwt_secret: expected str, got int") == "[gateway] jwt_secret: expected str, got int"
