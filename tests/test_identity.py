"""Identity (issue 19, item 5): a job runs as the identity that dispatched it, crons and
plain-Python enqueues run as the system, ``ctx.as_system()`` is the one way to elevate, and
API-key callers live in a namespace no token subject can enter - through real HTTP and /ws."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from pathlib import Path

import asyncpg
import httpx
import jwt
import pytest

from forge_kernel import SYSTEM, Auth
from forge_kernel.executor import job_request

pytest.importorskip("forge_gateway")
pytest.importorskip("forge_worker")
pytest.importorskip("forge_realtime")

from forge_realtime.client import ForgeClient  # noqa: E402
from forge_worker import JobQueue  # noqa: E402

import identity_app  # noqa: E402

SECRET = "identity-secret-identity-secret-0123456"
API_KEY = "svc-admin-key-0123456789abcdef"
APPS = str(Path(__file__).parent / "apps")


def bearer(sub: str, roles: list[str] | None = None) -> dict[str, str]:
    token = jwt.encode({"sub": sub, "roles": roles or [], "exp": int(time.time()) + 600}, SECRET, algorithm="HS256")
    return {"Authorization": f"Bearer {token}"}


KEY = {"X-API-Key": API_KEY}


@pytest.fixture
def node(forge_processes):
    return forge_processes({
        "node": {"roles": ["gateway", "function", "worker", "realtime"]},
        "app": {"modules": ["identity_app"], "example": False},
        "worker": {"poll_interval": 0.2},
        "gateway": {"port": 0, "jwt_secret": SECRET,
                    "api_keys": [{"name": "svc-admin", "sha256": hashlib.sha256(API_KEY.encode()).hexdigest(),
                                  "roles": ["admin"]}]},
    }, env={"PYTHONPATH": APPS + os.pathsep + os.environ.get("PYTHONPATH", "")})


async def test_a_job_runs_as_whoever_dispatched_it(node, forge_processes):
    base = f"http://127.0.0.1:{node.ready_info()['ports']['http']}"
    async with httpx.AsyncClient(base_url=base, timeout=20) as http:
        for tag, headers, elevate in [("anonymous", {}, False), ("api-key", KEY, False),
                                      ("jwt", bearer("svc-admin"), False), ("anonymous-elevated", {}, True)]:
            r = await http.post("/rpc/dispatch_probe", json={"tag": tag, "elevate": elevate}, headers=headers)
            assert r.status_code == 200, r.text
    pool = await asyncpg.create_pool(forge_processes.db_url, min_size=1, max_size=2)
    try:
        await JobQueue(pool).enqueue(identity_app.probe, {"tag": "plain-python"})
        deadline = time.monotonic() + 60
        while await pool.fetchval("SELECT count(*) FROM identity_probes") < 5 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        rows = {r["tag"]: (r["kind"], r["user_id"], r["roles"], r["outcome"])
                for r in await pool.fetch("SELECT * FROM identity_probes")}
    finally:
        await pool.close()
    assert rows == {
        # anonymous stays anonymous: its job may not call a protected query
        "anonymous": ("anonymous", None, [], "UNAUTHENTICATED"),
        # an API key stays that service, with its roles
        "api-key": ("service", "apikey:svc-admin", ["admin"], "admin data"),
        # a token whose subject is the key's name is someone else, without the key's roles
        "jwt": ("user", "svc-admin", [], "FORBIDDEN"),
        # ctx.as_system() elevates explicitly; ctx.auth of the job itself is unchanged
        "anonymous-elevated": ("anonymous", None, [], "admin data"),
        # plain Python (and crons) run as the system
        "plain-python": ("system", "system", ["system"], "admin data"),
    }


async def test_api_key_and_token_subject_of_the_same_name_are_different_callers(node):
    port = node.ready_info()["ports"]["http"]
    jwt_headers = bearer("svc-admin")
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=20) as http:
        assert (await http.post("/rpc/add_note", json={"body": "by key"}, headers=KEY)).status_code == 200
        assert (await http.post("/rpc/add_note", json={"body": "by token"}, headers=jwt_headers)).status_code == 200
        assert (await http.post("/rpc/my_notes", json={}, headers=KEY)).json() == {"data": ["by key"]}
        assert (await http.post("/rpc/my_notes", json={}, headers=jwt_headers)).json() == {"data": ["by token"]}
        # rate limits are counted per caller: the key's one call does not use the token's
        assert (await http.post("/rpc/once", json={}, headers=KEY)).json() == {"data": "service:apikey:svc-admin"}
        assert (await http.post("/rpc/once", json={}, headers=jwt_headers)).json() == {"data": "user:svc-admin"}
        assert (await http.post("/rpc/once", json={}, headers=KEY)).status_code == 429
        # a token may not take the API keys' namespace, nor the system's name
        for sub in ("apikey:svc-admin", "system"):
            r = await http.post("/rpc/my_notes", json={}, headers=bearer(sub, ["admin"]))
            assert r.status_code == 401 and "reserved" in r.json()["error"]["message"], r.text
    # live queries: each caller's subscription gets its own result, never the other's cached one
    url = f"ws://127.0.0.1:{port}/ws"
    async with ForgeClient(url, token=API_KEY) as as_key, \
            ForgeClient(url, token=jwt_headers["Authorization"].split()[1]) as as_token:
        by_key, by_token = as_key.subscribe("my_notes"), as_token.subscribe("my_notes")
        assert await asyncio.wait_for(by_key.__anext__(), 20) == ["by key"]
        assert await asyncio.wait_for(by_token.__anext__(), 20) == ["by token"]


def test_job_identity_round_trip_and_defaults():
    user = Auth.for_user("ann", ["a"], {"secret-claim": 1})
    assert Auth.from_job(user.to_job()) == Auth(user_id="ann", roles=frozenset({"a"}), kind="user")
    assert Auth.from_job(Auth().to_job()) == Auth()
    assert Auth.from_job(SYSTEM.to_job()) is SYSTEM
    # crons and plain Python: no dispatcher, so the system
    req = job_request(identity_app.probe.__forge__, {"tag": "t"}, caller="scheduler")
    assert Auth.from_job(req.run_as, req.caller) is SYSTEM and req.caller == "scheduler"
    with pytest.raises(ValueError, match="reserved"):
        Auth.for_user("apikey:x")
