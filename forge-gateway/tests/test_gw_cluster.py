"""Behaviour that needs several real nodes or a node's whole life: shared rate limits, plugin
routes, readiness, CORS, JWKS, graceful shutdown."""

from __future__ import annotations

import asyncio
import concurrent.futures
import http.server
import json
import threading
import time
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import jwt
import pytest
from jwt.algorithms import RSAAlgorithm

from gw_support import AUDIENCE, ISSUER, child_env, gateway_config


def spawn_gateway(forge_processes, keys, tmp_path, node_id, *, modules=("gw_app",), plugins=(), **gateway):
    cfg = gateway_config(keys, tmp_path, modules=list(modules), **gateway)
    proc = forge_processes(cfg, node_id=node_id, env=child_env(*plugins))
    return proc, f"http://127.0.0.1:{cfg['gateway']['port']}"


def test_rate_limit_is_shared_by_every_node(forge_processes, keys, tmp_path):
    _, a = spawn_gateway(forge_processes, keys, tmp_path, "rl-a")
    _, b = spawn_gateway(forge_processes, keys, tmp_path, "rl-b")
    # limited_global allows 5 per hour across the cluster; hammer both nodes at once
    urls = [a, b] * 10

    def call(url):
        return httpx.post(f"{url}/rpc/limited_global", timeout=30).status_code

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(call, urls))
    assert codes.count(200) == 5, codes
    assert codes.count(429) == 15, codes


def test_rate_limit_leases_never_over_admit(forge_processes, keys, tmp_path):
    # with leasing on, nodes take several tokens per round trip; the window still never over-admits
    _, a = spawn_gateway(forge_processes, keys, tmp_path, "lease-a", rate_limit_lease=0.5)
    _, b = spawn_gateway(forge_processes, keys, tmp_path, "lease-b", rate_limit_lease=0.5)
    codes = [httpx.post(f"{url}/rpc/limited_global", timeout=30).status_code for url in [a, b] * 6]
    assert codes.count(200) <= 5 and codes.count(200) >= 2, codes
    assert set(codes) <= {200, 429}


def test_rpc_on_a_node_without_the_function_role_names_the_role_and_who_runs_it(forge_processes, keys, tmp_path):
    urls = {}
    for node_id, roles in (("edge-only", ["gateway"]), ("full", ["gateway", "function"])):
        cfg = gateway_config(keys, tmp_path, modules=["gw_app"])
        cfg["node"] = {"roles": roles}
        forge_processes(cfg, node_id=node_id, env=child_env())
        urls[node_id] = f"http://127.0.0.1:{cfg['gateway']['port']}"
    edge, full = urls["edge-only"], urls["full"]
    from forge_kernel.testing import wait_for

    def unavailable(path: str) -> dict:
        r = httpx.post(f"{edge}{path}", json={}, timeout=30)
        assert r.status_code == 503, r.text
        err = r.json()["error"]
        assert err["code"] == "UNAVAILABLE" and err["details"] == {"role": "function", "node": "edge-only"}
        assert "node edge-only does not run functions (its roles: gateway)" in err["message"]
        return err

    # the list of nodes is looked up at most every 5 s (a loaded machine may record 'full' late)
    err = wait_for(lambda: (e := unavailable("/rpc/add")) and "nodes running it now: full (" in e["message"] and e,
                   30, interval=1, what="the hint naming the node that runs functions")
    assert f":{urlsplit(full).port})" in err["message"]
    assert unavailable("/rpc")["message"] == err["message"]  # JSON-RPC's path too
    assert httpx.post(f"{edge}/rpcx", timeout=30).status_code == 404
    assert httpx.get(f"{edge}/health", timeout=30).status_code == 200
    assert not any(p.startswith("/rpc") for p in httpx.get(f"{edge}/openapi.json", timeout=30).json()["paths"])


def test_plugin_routes_are_mounted(forge_processes, keys, tmp_path):
    _, url = spawn_gateway(forge_processes, keys, tmp_path, "routes", plugins=("gw_routes_plugin",))
    r = httpx.get(f"{url}/hello")
    assert r.status_code == 200 and r.json() == {"hello": "from a plugin"}


def test_ready_is_503_when_migrations_are_not_current(forge_processes, keys, tmp_path):
    proc, url = spawn_gateway(forge_processes, keys, tmp_path, "ready")
    assert httpx.get(f"{url}/ready").status_code == 200

    async def forget_a_migration():
        conn = await asyncpg.connect(forge_processes.db_url)
        try:
            await conn.execute("DELETE FROM forge_migrations WHERE namespace = 'gateway'")
        finally:
            await conn.close()

    asyncio.run(forget_a_migration())
    r = httpx.get(f"{url}/ready")
    assert r.status_code == 503
    assert "migrations pending" in r.json()["reason"]
    assert httpx.get(f"{url}/health").status_code == 200


def test_ready_is_503_while_the_database_is_unreachable(forge_processes, keys, tmp_path):
    proc, url = spawn_gateway(forge_processes, keys, tmp_path, "ready-db")
    assert httpx.get(f"{url}/ready").status_code == 200
    db_url = urlsplit(forge_processes.db_url)
    name = db_url.path.lstrip("/")
    other_db = urlunsplit(db_url._replace(path="/postgres"))  # ALLOW_CONNECTIONS false locks everyone out of ours

    async def set_connections(allowed: bool):
        conn = await asyncpg.connect(other_db)
        try:
            await conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(allowed).lower()}')
            if not allowed:  # and drop the node's open connections
                await conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name)
        finally:
            await conn.close()

    asyncio.run(set_connections(False))
    try:
        r = httpx.get(f"{url}/ready", timeout=30)
        assert r.status_code == 503
        assert r.json()["reason"].startswith("database unreachable")
        assert httpx.get(f"{url}/health").status_code == 200  # alive, just not ready
    finally:
        asyncio.run(set_connections(True))
    deadline = time.monotonic() + 30
    while httpx.get(f"{url}/ready", timeout=30).status_code != 200:  # the pool reconnects by itself
        assert time.monotonic() < deadline, "the node did not become ready again"
        time.sleep(0.2)
    assert proc.alive()


def test_cors_origins_from_config(forge_processes, keys, tmp_path):
    _, url = spawn_gateway(forge_processes, keys, tmp_path, "cors", cors_origins=["https://app.example.com"])
    pre = httpx.options(f"{url}/rpc/add", headers={"Origin": "https://app.example.com",
                                                   "Access-Control-Request-Method": "POST",
                                                   "Access-Control-Request-Headers": "authorization, content-type"})
    assert pre.status_code in (200, 204)
    assert pre.headers["access-control-allow-origin"] == "https://app.example.com"
    r = httpx.post(f"{url}/rpc/add", json={"a": 1}, headers={"Origin": "https://app.example.com"})
    assert r.headers["access-control-allow-origin"] == "https://app.example.com"
    r = httpx.post(f"{url}/rpc/add", json={"a": 1}, headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers


def test_bad_config_is_a_startup_error_naming_the_key(forge_processes, keys, tmp_path):
    cfg = gateway_config(keys, tmp_path, modules=["gw_app"], cors_origins=["not an origin"])
    proc = forge_processes(cfg, node_id="badcfg", env=child_env(), ready=False)
    proc.proc.wait(60)
    assert proc.proc.returncode != 0
    assert "cors_origins" in proc.log() and "not an origin" in proc.log()


def test_port_in_use_is_a_clear_startup_error(forge_processes, keys, tmp_path):
    proc, url = spawn_gateway(forge_processes, keys, tmp_path, "first")
    port = int(url.rsplit(":", 1)[1])
    cfg = gateway_config(keys, tmp_path, modules=["gw_app"], port=port)
    second = forge_processes(cfg, node_id="second", env=child_env(), ready=False)
    second.proc.wait(60)
    assert second.proc.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port}" in second.log()


class _Jwks(http.server.BaseHTTPRequestHandler):
    body = b"{}"

    def do_GET(self):  # noqa: N802 - http.server API
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.fixture
def jwks_server(keys):
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    jwk = json.loads(RSAAlgorithm.to_jwk(load_pem_public_key(keys.public_pem)))
    jwk.update({"kid": "key-1", "alg": "RS256", "use": "sig"})
    handler = type("Handler", (_Jwks,), {"body": json.dumps({"keys": [jwk]}).encode()})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/.well-known/jwks.json"
    server.shutdown()
    server.server_close()


def test_jwks_url(forge_processes, keys, tmp_path, jwks_server):
    _, url = spawn_gateway(forge_processes, keys, tmp_path, "jwks", jwks_url=jwks_server, jwt_public_key_file="",
                           jwt_secret="")
    now = int(time.time())
    claims = {"sub": "carol", "exp": now + 60, "aud": AUDIENCE, "iss": ISSUER, "roles": ["admin"]}
    good = jwt.encode(claims, keys.private_pem, algorithm="RS256", headers={"kid": "key-1"})
    r = httpx.post(f"{url}/rpc/whoami", headers={"Authorization": f"Bearer {good}"})
    assert r.status_code == 200 and r.json()["data"]["user_id"] == "carol"
    unknown = jwt.encode(claims, keys.other_private_pem, algorithm="RS256", headers={"kid": "key-2"})
    r = httpx.post(f"{url}/rpc/whoami", headers={"Authorization": f"Bearer {unknown}"})
    assert r.status_code == 401 and "key-2" in r.json()["error"]["message"]
    forged = jwt.encode(claims, keys.other_private_pem, algorithm="RS256", headers={"kid": "key-1"})
    assert httpx.post(f"{url}/rpc/whoami", headers={"Authorization": f"Bearer {forged}"}).status_code == 401
    # no HMAC secret configured: an HS256 token cannot be accepted at all
    hs = jwt.encode(claims, "whatever-secret-value-long-enough-for-hs256!", algorithm="HS256")
    r = httpx.post(f"{url}/rpc/whoami", headers={"Authorization": f"Bearer {hs}"})
    assert r.status_code == 401 and "jwt_secret" in r.json()["error"]["message"]


def test_graceful_shutdown_finishes_in_flight_calls(forge_processes, keys, tmp_path):
    from forge_kernel.testing import wait_for

    proc, url = spawn_gateway(forge_processes, keys, tmp_path, "drain")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        flag = tmp_path / "in-flight"
        pending = pool.submit(lambda: httpx.post(f"{url}/rpc/slow_flagged", json={"seconds": 0.5, "flag": str(flag)},
                                                 timeout=30))
        wait_for(flag.exists, 30, what="the call in flight")  # a fixed pause lost the race on a busy machine
        proc.signal(15)
        r = pending.result()
    assert r.status_code == 200 and r.json() == {"data": "done"}
    proc.proc.wait(30)
    assert proc.proc.returncode == 0, proc.log()[-2000:]
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health")


def test_access_log_goes_to_the_node_log(forge_processes, keys, tmp_path):
    proc, url = spawn_gateway(forge_processes, keys, tmp_path, "access", access_log=True)
    httpx.post(f"{url}/rpc/add", json={"a": 1}, headers={"X-Request-Id": "acc-1"})
    from forge_kernel.testing import wait_for

    wait_for(lambda: "POST /rpc/add" in proc.log(), 10, what="access log line")
