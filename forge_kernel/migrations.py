"""Versioned, forward-only SQL migrations, applied under an advisory lock.

Each plugin owns a *namespace*. A migration is applied once, in its own transaction,
together with its row in ``forge_migrations`` (so a crash leaves it either applied and
recorded or neither). Editing an applied migration changes its checksum: that is
*drift* and stops start-up instead of being silently skipped.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.resources
import re
from typing import Iterable, Sequence

import asyncpg
import attrs

from .errors import StartupError

# pg_advisory_lock key: the first 8 bytes of sha1("forge.migrations")
LOCK_KEY = int.from_bytes(hashlib.sha1(b"forge.migrations").digest()[:8], "big", signed=True)
_FILE = re.compile(r"^(\d+)_([A-Za-z0-9_\-]+)\.sql$")

BOOTSTRAP = """
CREATE TABLE IF NOT EXISTS forge_migrations (
    namespace  text        NOT NULL,
    version    integer     NOT NULL,
    name       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    duration_ms double precision NOT NULL DEFAULT 0,
    PRIMARY KEY (namespace, version)
)
"""


@attrs.frozen
class Migration:
    namespace: str
    version: int
    name: str
    sql: str = attrs.field(repr=False)

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()

    @property
    def key(self) -> tuple[str, int]:
        return (self.namespace, self.version)


class MigrationError(StartupError):
    pass


class DriftError(MigrationError):
    pass


def from_package(package: str, *, namespace: str) -> list[Migration]:
    """Read ``NNNN_name.sql`` files from an importable package directory."""
    out = []
    for entry in importlib.resources.files(package).iterdir():
        m = _FILE.match(entry.name)
        if m:
            out.append(Migration(namespace, int(m.group(1)), m.group(2), entry.read_text()))
        elif entry.name.endswith(".sql"):
            raise MigrationError(f"{package}/{entry.name}: migration files are named NNNN_name.sql")
    return sorted(out, key=lambda m: m.version)


def from_directory(path, *, namespace: str) -> list[Migration]:
    from pathlib import Path

    out = []
    for entry in sorted(Path(path).glob("*.sql")):
        m = _FILE.match(entry.name)
        if not m:
            raise MigrationError(f"{entry}: migration files are named NNNN_name.sql")
        out.append(Migration(namespace, int(m.group(1)), m.group(2), entry.read_text()))
    return sorted(out, key=lambda m: m.version)


def check_unique(migrations: Iterable[Migration]) -> list[Migration]:
    """De-duplicate; namespaces keep the order they were given in (kernel first, then plugins,
    then the app), versions ascend inside each namespace."""
    seen: dict[tuple[str, int], Migration] = {}
    rank: dict[str, int] = {}
    for m in migrations:
        if m.key in seen and seen[m.key].checksum != m.checksum:
            raise MigrationError(f"two migrations claim {m.namespace} version {m.version}: {seen[m.key].name!r} and {m.name!r}")
        seen[m.key] = m
        rank.setdefault(m.namespace, len(rank))
    return sorted(seen.values(), key=lambda m: (rank[m.namespace], m.version))


@attrs.frozen
class MigrationStatus:
    namespace: str
    version: int
    name: str
    state: str  # applied | pending | drift | unknown (applied but no longer shipped)
    applied_at: str | None = None


async def _applied(conn: asyncpg.Connection) -> dict[tuple[str, int], asyncpg.Record]:
    exists = await conn.fetchval("SELECT to_regclass('forge_migrations') IS NOT NULL")
    if not exists:
        return {}
    rows = await conn.fetch("SELECT namespace, version, name, checksum, applied_at FROM forge_migrations")
    return {(r["namespace"], r["version"]): r for r in rows}


async def status(conn: asyncpg.Connection, migrations: Sequence[Migration]) -> list[MigrationStatus]:
    applied = await _applied(conn)
    out = []
    shipped = {m.key for m in migrations}
    for m in check_unique(migrations):
        row = applied.get(m.key)
        if row is None:
            out.append(MigrationStatus(m.namespace, m.version, m.name, "pending"))
        else:
            state = "applied" if row["checksum"] == m.checksum else "drift"
            out.append(MigrationStatus(m.namespace, m.version, m.name, state, row["applied_at"].isoformat()))
    for key, row in sorted(applied.items()):
        if key not in shipped:
            out.append(MigrationStatus(row["namespace"], row["version"], row["name"], "unknown", row["applied_at"].isoformat()))
    return out


def _raise_on_drift(states: list[MigrationStatus]) -> None:
    drift = [s for s in states if s.state == "drift"]
    if drift:
        listing = ", ".join(f"{s.namespace} {s.version:04d}_{s.name}" for s in drift)
        raise DriftError(
            f"migration drift: {listing} changed after it was applied; "
            "migrations are forward-only - restore the original file and add a new version"
        )


async def _lock(conn: asyncpg.Connection) -> None:
    """Take the migration lock. Tried in a loop rather than waited for in one pg_advisory_lock:
    a server-side statement_timeout (managed servers set one) would cancel a wait that outlasts
    another node's migrations."""
    pause = 0.02
    while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", LOCK_KEY):
        await asyncio.sleep(pause)
        pause = min(pause * 2, 0.5)


async def migrate(conn: asyncpg.Connection, migrations: Sequence[Migration]) -> list[Migration]:
    """Apply pending migrations on ``conn`` (a dedicated connection). Returns those applied here.

    Many nodes may call this at once: the advisory lock serialises them and the second
    finds nothing pending.
    """
    migrations = check_unique(migrations)
    await _lock(conn)
    try:
        await conn.execute(BOOTSTRAP)
        states = await status(conn, migrations)
        _raise_on_drift(states)
        pending = {(s.namespace, s.version) for s in states if s.state == "pending"}
        done = []
        for m in migrations:
            if m.key not in pending:
                continue
            try:
                async with conn.transaction():
                    started = await conn.fetchval("SELECT clock_timestamp()")
                    # the trailing statement: a file of only comments is an empty query to the server,
                    # whose answer asyncpg cannot take ('NoneType' has no 'decode')
                    await conn.execute(f"{m.sql}\n;SELECT 1")
                    await conn.execute(
                        "INSERT INTO forge_migrations (namespace, version, name, checksum, duration_ms) "
                        "VALUES ($1, $2, $3, $4, extract(epoch FROM clock_timestamp() - $5::timestamptz) * 1000)",
                        m.namespace, m.version, m.name, m.checksum, started,
                    )
            except asyncpg.PostgresError as exc:
                raise MigrationError(f"migration {m.namespace} {m.version:04d}_{m.name} failed: {exc}") from exc
            done.append(m)
        return done
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY)


async def is_current(conn: asyncpg.Connection, migrations: Sequence[Migration]) -> bool:
    return all(s.state == "applied" for s in await status(conn, migrations) if s.state != "unknown")
