"""Row-level security (issue 19, item 14): every call's transaction carries the caller, so the
example's todos policy keeps other owners' rows out of a query that forgets its owner filter -
over HTTP and over /ws - when the node connects as a role policies bind (here the tables' owner,
not a superuser: FORCE ROW LEVEL SECURITY binds the owner, nothing binds a superuser)."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time

import asyncpg
import httpx
import jwt
import pytest

from forge_kernel.db import with_database
from forge_kernel.testing import NodeProcess

pytest.importorskip("forge_gateway")
pytest.importorskip("forge_realtime")

from forge_realtime.client import ForgeClient  # noqa: E402

SECRET = "row-security-secret-row-security-secret"


def bearer(user: str) -> str:
    return jwt.encode({"sub": user, "exp": int(time.time()) + 600}, SECRET, algorithm="HS256")


async def as_superuser(url: str, *statements: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        for sql in statements:
            await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture
async def app_role_url(forge_db_url):
    """The test database handed to a new non-superuser login role (its owner), and a URL for it."""
    role, password = f"forge_app_{secrets.token_hex(4)}", secrets.token_urlsafe(16)
    name = forge_db_url.partition("?")[0].rpartition("/")[2]
    await as_superuser(forge_db_url, f"CREATE ROLE {role} LOGIN PASSWORD '{password}'",
                       f'ALTER DATABASE "{name}" OWNER TO {role}')
    yield forge_db_url.replace("postgresql://postgres@", f"postgresql://{role}:{password}@", 1)
    await as_superuser(forge_db_url, f"REASSIGN OWNED BY {role} TO postgres", f"DROP OWNED BY {role}")
    with contextlib.suppress(asyncpg.PostgresError):
        await as_superuser(with_database(forge_db_url, "postgres"), f"DROP ROLE {role}")


@pytest.fixture
def app_node(app_role_url, tmp_path):
    """A node serving the example app, connected as the database's owner role (not a superuser)."""
    node = NodeProcess(tmp_path / "node", {"node": {"id": "rls", "roles": ["gateway", "function", "realtime"]},
                                           "database": {"url": app_role_url},
                                           "gateway": {"port": 0, "jwt_secret": SECRET}},
                       env={"FORGE_LOG__LEVEL": "INFO"})
    try:
        yield node.start().wait_ready()
    finally:
        node.terminate(timeout=20)


async def test_a_query_without_an_owner_filter_returns_only_the_callers_rows(app_node, app_role_url):
    node = app_node
    port = node.ready_info()["ports"]["http"]
    alice, bob = {"Authorization": f"Bearer {bearer('alice')}"}, {"Authorization": f"Bearer {bearer('bob')}"}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=20) as http, \
            ForgeClient(f"ws://127.0.0.1:{port}/ws", token=bearer("alice")) as live:
        for title, who in [("a1", alice), ("b1", bob), ("a2", alice)]:
            r = await http.post("/rpc/add_todo", json={"title": title}, headers=who)
            assert r.status_code == 200, r.text
        # recent_todos has no owner filter: the policy over current_setting('forge.user_id') filters
        r = await http.post("/rpc/recent_todos", json={}, headers=alice)
        assert sorted(t["title"] for t in r.json()["data"]) == ["a1", "a2"], r.text
        r = await http.post("/rpc/recent_todos", json={}, headers=bob)
        assert [t["title"] for t in r.json()["data"]] == ["b1"], r.text
        # a write under someone else's name is refused by the policy's WITH CHECK
        assert (await http.post("/rpc/count_open", json={})).json() == {"data": 0}  # anonymous sees no rows
        # over /ws, the same query as alice, and bob's next todo never reaches her
        updates = live.subscribe("recent_todos")
        assert sorted(t["title"] for t in await asyncio.wait_for(updates.__anext__(), 20)) == ["a1", "a2"]
        assert (await http.post("/rpc/add_todo", json={"title": "b2"}, headers=bob)).status_code == 200
        assert (await http.post("/rpc/add_todo", json={"title": "a3"}, headers=alice)).status_code == 200
        pushed = await asyncio.wait_for(updates.__anext__(), 20)
        assert sorted(t["title"] for t in pushed) == ["a1", "a2", "a3"], pushed
    # the rows are all there, and the node said row security is on (no superuser warning: it is the owner)
    conn = await asyncpg.connect(app_role_url)
    try:
        await conn.execute("SET forge.auth_kind = 'system'")
        assert await conn.fetchval("SELECT count(*) FROM todos") == 5
        await conn.execute("RESET forge.auth_kind")
        assert await conn.fetchval("SELECT count(*) FROM todos") == 0  # no caller: the policy admits nothing
    finally:
        await conn.close()
    assert "row security: calls carry the caller (tables with policies: todos)" in node.log()
    assert "superuser" not in node.log()


async def test_pooled_connections_never_carry_one_caller_into_the_next(forge_node):
    node = await forge_node(config={"app": {"row_security": "on", "example": True}})
    from forge_kernel import Auth

    ex = node.executor
    assert ex.row_security
    await ex.call("add_todo", {"title": "t"}, Auth.for_user("carol"))
    # after a call, no connection of either pool holds a caller
    for pool in (node.pool, node.query_pool):
        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT current_setting('forge.user_id', true)") in (None, "")
