"""FORGE on a server like the managed ones (RDS, Cloud SQL...): Debian's PostgreSQL (built with
TLS, unlike the embedded server), started by this module with a throwaway CA, reachable only
over TLS with a password, as a role that is not a superuser, with server-side timeouts."""

from __future__ import annotations

import asyncio
import shutil
import uuid
from typing import Any

import asyncpg
import pytest

from forge_kernel import ANONYMOUS
from forge_kernel.errors import StartupError
from forge_kernel.testing import eventually
from forge_kernel.testing.servers import PgServer, debian_bin_dir, give, private_folder, throwaway_tls

pytestmark = pytest.mark.skipif(debian_bin_dir() is None, reason="Debian's postgresql is not installed (.ci/run installs it)")

ROLE = "forge_app"
TIMEOUTS = {"statement_timeout": "5s", "idle_in_transaction_session_timeout": "5s"}


class Managed:
    def __init__(self, server: PgServer, tls: Any, other_ca: Any, password: str) -> None:
        self.server, self.tls, self.other_ca, self.password = server, tls, other_ca, password

    def url(self, db: str, role: str = ROLE, password: str | None = None, **params: str) -> str:
        return self.server.url(db, user=role, password=password or self.password, tcp=True, **params)


@pytest.fixture(scope="module")
def managed() -> Any:
    root = private_folder("forge-managed-")
    tls = throwaway_tls(root / "tls")
    other = throwaway_tls(root / "other", name="someone else")
    (root / "pg").mkdir()
    give(root / "pg")
    server = PgServer(debian_bin_dir(), root / "pg", listen="127.0.0.1",
                      hba=["local all all trust", "hostssl all all 127.0.0.1/32 scram-sha-256",
                           "hostnossl all all 127.0.0.1/32 reject"],
                      settings={"ssl": "on", "ssl_cert_file": str(tls.cert), "ssl_key_file": str(tls.key),
                                "fsync": "off", "full_page_writes": "off"})
    try:
        server.initdb().start()
        password = asyncio.run(server.create_app_role(ROLE, settings=TIMEOUTS))
        yield Managed(server, tls, other, password)
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
async def database(managed: Managed) -> Any:
    """A fresh database owned by the app role."""
    async with managed.server.fresh_database("managed_", ROLE) as name:
        yield name


async def test_verify_full_as_an_unprivileged_role_with_server_timeouts(managed, database, forge_node):
    """Migrations, a mutation dispatching a job the worker runs, crons' leader election, LISTEN and
    the realtime change reader, all over verified TLS."""
    url = managed.url(database, sslmode="verify-full", sslrootcert=str(managed.tls.ca))
    node = await forge_node(modules=["pooled_app"], config={
        "database": {"url": url}, "node": {"roles": ["function", "worker", "scheduler", "realtime"]},
        "worker": {"poll_interval": 0.1}})
    order = await node.executor.call("place_order", {"owner": "m", "item": "tls"}, ANONYMOUS)
    await eventually(lambda: node.pool.fetchval("SELECT status = 'done' FROM pa_orders WHERE id = $1", order), 30,
                     "the job to run")
    assert [o["item"] for o in await node.executor.call("orders_of", {"owner": "m"}, ANONYMOUS)] == ["tls"]
    await eventually(lambda: node.pool.fetchval("SELECT count(*) > 0 FROM forge_cron_runs"), 30, "a cron slot")
    admin = await asyncpg.connect(managed.server.url(database))
    try:
        rows = await admin.fetch("SELECT s.ssl, a.usename FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) "
                                 "WHERE a.datname = $1 AND a.usename = $2", database, ROLE)
        assert len(rows) >= 4 and all(r["ssl"] for r in rows)  # pool, query pool, heartbeat, LISTENs, leader
        assert not await admin.fetchval("SELECT rolsuper OR rolcreatedb OR rolcreaterole FROM pg_roles WHERE rolname = $1", ROLE)
    finally:
        await admin.close()


async def test_sslmode_require(managed, database, forge_node):
    node = await forge_node(modules=["pooled_app"], config={
        "database": {"url": managed.url(database, sslmode="require")}, "node": {"roles": ["function"]}})
    assert await node.executor.call("orders_of", {"owner": "x"}, ANONYMOUS) == []


async def test_a_certificate_from_another_ca_is_refused_clearly(managed, database, forge_node):
    url = managed.url(database, sslmode="verify-full", sslrootcert=str(managed.other_ca.ca))
    with pytest.raises(StartupError) as info:
        await forge_node(modules=["pooled_app"], config={"database": {"url": url, "connect_timeout": 5},
                                                         "node": {"roles": ["function"]}})
    message = str(info.value)
    assert "[database] url" in message and "certificate verify failed" in message
    assert managed.password not in message


async def test_a_connection_limit_below_the_pool_minimum_names_the_setting(managed, database, forge_node):
    """Before: 'cannot connect to PostgreSQL at [database] url: TooManyConnectionsError: too many
    connections for role' - nothing said which setting asks for the connections."""
    role = f"small_{uuid.uuid4().hex[:6]}"
    password = await managed.server.create_app_role(role, connection_limit=2)
    admin = await asyncpg.connect(managed.server.url())
    try:
        await admin.execute(f'GRANT ALL ON DATABASE "{database}" TO {role}')
        with pytest.raises(StartupError) as info:
            await forge_node(modules=["pooled_app"], config={
                "database": {"url": managed.url(database, role, password, sslmode="require"), "pool_min": 2},
                "node": {"roles": ["function"]}})
        message = str(info.value)
        assert "too many connections for role" in message and "[database] pool_min = 2" in message
        assert "CONNECTION LIMIT" in message
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await admin.execute(f"DROP ROLE IF EXISTS {role}")
        await admin.close()
