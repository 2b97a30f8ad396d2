"""A FORGE node: database, migrations, app registry, membership, services, drain."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import json
import os
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
from loguru import logger

from . import db as dbmod
from . import migrations as migmod
from .admin import DRAIN_KEY
from .app import Registry
from .config import Config
from .embedded_pg import EmbeddedPostgres
from .errors import StartupError
from .executor import FunctionExecutor, row_security
from .reads import QueryReads, ReadPool
from .plugins import PluginLoader, _flat, _version
from .services import MaintenanceTask, Service, ServiceStack, Supervisor, start_order
from .telemetry import CountingDispatcher, Telemetry

EXAMPLE_MODULE = "forge_example"


def database_url(config: Config) -> tuple[str, EmbeddedPostgres | None]:
    """The configured URL, or an embedded server under ``[database] data_dir`` (started or reused)."""
    if config.database.url:
        return config.database.url, None
    pg = EmbeddedPostgres(Path(config.database.data_dir).resolve(), tcp_port=config.database.embedded_port)
    first = not pg.initialized()
    t0 = time.monotonic()
    url = pg.start()
    what = "initialised and started" if first else ("started" if pg.started_here else "reused")
    tcp = f"; also on 127.0.0.1:{pg.port} (password in {pg.passfile})" if config.database.embedded_port else ""
    # the URL names the password file (readable by this account only), never the password
    logger.info(f"embedded PostgreSQL {what} in {time.monotonic() - t0:.2f}s under {pg.root}; "
                f"connect with: psql '{url}'{tcp}")
    return url, pg


def session_url(config: Config, url: str) -> str:
    """Where sessions go: ``[database] direct_url``, else the URL ``database_url`` gave."""
    return config.database.direct_url or url


def app_modules(config: Config, loader: PluginLoader) -> list[str]:
    """``[app] modules``, then the modules plugins ship (``forge_app_modules``). The example app
    is served when ``[app] modules`` is empty and ``[app] example`` is not false, whatever
    plugins add: installing a plugin never takes the example away."""
    modules = list(config.app.modules)
    if not modules and config.app.example:
        modules = [EXAMPLE_MODULE]
    return list(dict.fromkeys(modules + _flat(loader.hook.forge_app_modules())))


def importable_app_dir(config: Config) -> Path:
    """Put the folder of the config file (the working directory when there is none) first on
    ``sys.path``, as uvicorn's ``--app-dir`` does, so ``[app] modules`` next to ``forge.toml``
    import without ``PYTHONPATH``. Returns the folder."""
    folder = Path(config.path).resolve().parent if config.path else Path.cwd()
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    return folder


#: the kinds of app function that only run when a job store is installed (forge-worker)
JOB_KINDS = ("job", "cron", "workflow")


def check_job_store(registry: Registry, dispatcher: Any, roles: list[str]) -> None:
    """A node that serves functions (role ``function``) for an app with jobs needs a job store:
    without one every ``ctx.dispatch`` would fail, so say what to install before serving anything."""
    if dispatcher is not None or "function" not in roles:
        return
    kinds = registry.of_kind(*JOB_KINDS)
    if kinds:
        names = ", ".join(f"@{d.kind} {d.name}" for d in kinds[:5]) + (" ..." if len(kinds) > 5 else "")
        raise StartupError(f"the app defines background work ({names}) but no installed plugin stores jobs, "
                           f"so its functions could not dispatch them: install forge-worker on this node "
                           f"(pip install forge-worker; it need not run the worker role)")


def app_migrations(registry: Registry) -> list[migmod.Migration]:
    import importlib

    out: list[migmod.Migration] = []
    for name in registry.modules:
        out.extend(getattr(importlib.import_module(name), "MIGRATIONS", []) or [])
    return out


def all_migrations(loader: PluginLoader, registry: Registry | None) -> list[migmod.Migration]:
    return loader.migrations() + (app_migrations(registry) if registry else [])


class CollectTimer:
    """When a timed full collection is worth its pause, and the pass itself.

    Due when the heap (in allocated blocks) changed by at least ``growth`` (a fraction) since the
    last collection. Cycles nobody collected are blocks that stay allocated, so they move the count;
    a node that holds still (thousands of open connections and nothing closing) is not rescanned
    every interval to find nothing.

    Each timed pass freezes what survives it (``gc.freeze``): a full collection costs in proportion
    to what it walks, and what survived one pass (open connections, caches) mostly survives the
    next, so the next pass walks only what was allocated since (bench/realtime (b): a pass over
    1,000 open sockets paused the node 74 ms, 230 ms when it waited for a core). A frozen object that
    later becomes cyclic garbage (a closed connection's protocol and scope) is not seen by those
    passes; it stays allocated, so it grows the heap, and once the heap is ``rescan_growth`` larger
    than after the last full rescan, a pass unfreezes everything (the start-up heap too) and walks
    it all, then freezes the survivors again: a longer pause than an unfrozen heap's full pass, once
    per such growth. A heap that holds still or shrinks (a wave of closed connections whose cycles
    were frozen: they keep their blocks, so nothing grows) gets that rescan after ``rescan_every``
    intervals anyway, so frozen garbage lives at most that long (10 minutes at the defaults).
    """

    def __init__(self, growth: float, blocks: int, rescan_growth: float = 0.25, rescan_every: int = 10) -> None:
        self.growth = growth
        self.rescan_growth = rescan_growth
        self.rescan_every = rescan_every
        #: intervals of the timer's loop since the last rescan (``tick``)
        self.ticks = 0
        self.after_last = blocks
        #: the heap after the last pass that walked the frozen objects too
        self.after_rescan = blocks
        self.rescans = 0

    def due(self, blocks: int) -> bool:
        return abs(blocks - self.after_last) >= self.growth * self.after_last

    def rescan_due(self, blocks: int) -> bool:
        return self.ticks >= self.rescan_every or blocks - self.after_rescan >= self.rescan_growth * self.after_rescan

    def tick(self) -> None:
        """One interval of the timer's loop went by."""
        self.ticks += 1

    def collected(self, blocks: int) -> None:
        self.after_last = blocks

    def collect(self, *, rescan: bool | None = None) -> int:
        """One timed pass (``rescan``: walk the frozen objects too; None: when the heap grew enough).
        Returns what it freed, as ``gc.collect``."""
        if rescan is None:
            rescan = self.rescan_due(sys.getallocatedblocks())
        if rescan:
            gc.unfreeze()
        found = gc.collect()
        gc.freeze()
        blocks = sys.getallocatedblocks()
        self.collected(blocks)
        if rescan:
            self.after_rescan = blocks
            self.rescans += 1
            self.ticks = 0
        return found

    def on_gc(self, phase: str, info: dict) -> None:
        """``gc.callbacks``: the end of any full collection (ours or the interpreter's) is the new baseline."""
        if phase == "stop" and info["generation"] == 2:
            self.collected(sys.getallocatedblocks())


class Node:
    """One node process. ``await node.start()`` then ``await node.stop()`` (or ``run()``)."""

    def __init__(self, config: Config, loader: PluginLoader, *, registry: Registry | None = None,
                 freeze_gc: bool = False) -> None:
        self.config = config
        #: the node owns its process (``forge-node start``): collect, then freeze the start-up heap once ready
        self.freeze_gc = freeze_gc
        #: the timed collections of ``[node] gc_collect_interval`` (None: the node does not run them)
        self.gc_timer: CollectTimer | None = None
        self.loader = loader
        self.id = config.node.id or f"{config.node.host}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.version = _version("forge-kernel") or "0"
        self.roles = loader.resolve_roles(config.node.roles)
        self.capabilities = list(config.node.capabilities)
        self.ports: dict[str, int] = {}
        self.registry = registry
        #: the pool's URL (``[database] url``, maybe a transaction pooler) and the sessions' URL
        self.url: str = ""
        self.direct_url: str = ""
        #: ``self.url`` is a transaction-mode pooler: pool connections keep no session state
        #: between transactions (use SET LOCAL inside a transaction, never SET)
        self.pooled = False
        self.embedded: EmbeddedPostgres | None = None
        self.pool: asyncpg.Pool | None = None
        #: read-only sessions on the primary for queries (not through a pooler)
        self.query_pool: asyncpg.Pool | None = None
        #: the replica's pool (``[database] read_url``)
        self.read_pool: asyncpg.Pool | None = None
        self.reads: QueryReads | None = None
        self.executor: FunctionExecutor | None = None
        self.supervisor = Supervisor()
        self.services: list[Service] = []
        self.maintenance: list[MaintenanceTask] = []
        self.status = "starting"
        self.started_at = 0.0
        self.ready_at = 0.0
        self.stack = ServiceStack()
        self._hb_conn: asyncpg.Connection | None = None
        #: the node's row exists in forge_nodes (status changes before that have nowhere to go)
        self._registered = False
        self._stopping = asyncio.Event()
        #: what the node's parts record for an observer (forge-observe); inert until one attaches
        self.telemetry = Telemetry()
        self.supervisor.on_crash.append(lambda rec, exc: self._crash_noted(rec, exc))

    # --- helpers for plugins --------------------------------------------------------
    def runs(self, role: str) -> bool:
        return role in self.roles

    def section(self, name: str) -> Any:
        return self.config[name]

    async def connect(self, **kw: Any) -> asyncpg.Connection:
        """A dedicated connection (never from the pool) to ``[database] direct_url``, for what needs
        a session: LISTEN, advisory locks, migrations, heartbeats. Never through a transaction pooler."""
        return await dbmod.connect(self.direct_url, **kw)

    # --- lifecycle ------------------------------------------------------------------
    async def start(self) -> None:
        self.started_at = time.monotonic()
        db = self.config.database
        self.url, self.embedded = await asyncio.to_thread(database_url, self.config)
        self.direct_url = session_url(self.config, self.url)
        self.pooled = db.transaction_pooler
        self.pool = await self._open_pool("url", self.url, min_size=db.pool_min, pooled=self.pooled)
        primary = ReadPool(self.pool)
        if not self.pooled:
            # queries run here: read-only sessions save BEGIN READ ONLY + COMMIT per call (measured in
            # bench/rpc); through a transaction pooler they run in BEGIN READ ONLY on the pool instead
            self.query_pool = await self._open_pool("url", self.url, min_size=min(1, db.pool_min), read_only=True)
            primary = ReadPool(self.query_pool, readonly_sessions=True)
        replica = None
        if db.read_url:
            # opened lazily (min 0): a replica that is down sends queries to the primary, it does not stop the node
            self.read_pool = await self._open_pool("read_url", db.read_url, min_size=0, read_only=not self.pooled,
                                                   pooled=self.pooled)
            replica = ReadPool(self.read_pool, readonly_sessions=not self.pooled)
        self.reads = QueryReads(primary, replica, wait=db.read_wait)
        if replica is not None:
            await self._probe_replica()
        for package, sections in sorted(self.config.ignored.items()):
            logger.info(f"config sections {', '.join(f'[{s}]' for s in sections)} ignored: they belong to "
                        f"{package}, {'which is not installed' if _version(package) is None else 'whose plugin is not loaded'}"
                        f" on this node")
        if self.registry is None:
            self.registry = Registry.from_modules(app_modules(self.config, self.loader))
        dispatcher = self.loader.hook.forge_job_dispatcher(node=self)
        check_job_store(self.registry, dispatcher, self.roles)
        self.loader.hook.forge_registry_loaded(registry=self.registry, node=self)
        direct_key = "direct_url" if db.direct_url else "url"
        try:
            conn = await self.connect(timeout=db.connect_timeout)
        except asyncpg.TooManyConnectionsError as exc:
            raise StartupError(connection_limit_message(direct_key, exc, db.pool_min)) from None
        except (OSError, asyncpg.PostgresError, asyncio.TimeoutError) as exc:
            raise StartupError(f"cannot connect to PostgreSQL at [database] {direct_key}: {type(exc).__name__}: {exc}") from exc
        try:
            applied = await migmod.migrate(conn, all_migrations(self.loader, self.registry))
            # queries read a replica only once it has replayed the schema (ours or another node's)
            await self.reads.committed(conn)
        finally:
            await conn.close()
        if applied:
            logger.info(f"applied {len(applied)} migration(s): " + ", ".join(f"{m.namespace}/{m.version:04d}_{m.name}" for m in applied))
        middleware = _flat(self.loader.hook.forge_call_middleware(node=self))
        if dispatcher is not None:  # what it stores is counted for an observer (job.dispatched)
            dispatcher = CountingDispatcher(dispatcher, self.telemetry)
        self.executor = FunctionExecutor(self.registry, self.pool, default_timeout=self.config.app.function_timeout,
                                         middleware=middleware, dispatcher=dispatcher,
                                         node=self, reads=self.reads,
                                         workflow_engine=self.loader.hook.forge_workflow_engine(node=self),
                                         forwarder=self.loader.hook.forge_call_forwarder(node=self))
        async with self.pool.acquire() as c:
            self.executor.row_security, line, bypassed = await row_security(c, self.config.app.row_security)
        if line:
            # a superuser bypasses every policy: worth a warning against a real server, a note on the embedded one
            (logger.warning if bypassed and self.embedded is None else logger.info)(line)
        await self._register()
        self.supervisor.spawn("heartbeat", self._heartbeat_loop, service="kernel")
        self.maintenance = _flat(self.loader.hook.forge_maintenance_tasks(node=self))
        candidates = [s for s in _flat(self.loader.hook.forge_services(node=self)) if s.role is None or s.role in self.roles]
        self.services = start_order(candidates)
        try:
            await self.stack.enter(self.services, self)
        except Exception:
            await self.stop()
            raise
        await self._set_status("running")
        if self.freeze_gc:
            # What start-up built (modules, registry, routes, pools) lives as long as the node: move it out
            # of the cyclic GC's sight so a full collection scans only what requests allocate
            # (bench/realtime measured 25 ms full-collection pauses in the node's tail latency without
            # this). Collect first so start-up garbage is not frozen for good. Only when the node owns
            # the process: an embedding host's heap is not ours to freeze.
            gc.collect()
            gc.freeze()
            gc.set_threshold(*self.config.node.gc_thresholds)
            if self.config.node.gc_collect_interval > 0:
                self.supervisor.spawn("gc", self._collect_loop, service="kernel")
        self.ready_at = time.monotonic()
        ready_file = os.environ.get("FORGE_READY_FILE")
        if ready_file:  # lets supervisors and tests wait for readiness without parsing logs
            # written aside, then renamed: whoever sees the file sees all of it
            partial = Path(f"{ready_file}.{os.getpid()}.tmp")
            partial.write_text(json.dumps({"id": self.id, "pid": os.getpid(), "ports": self.ports,
                                           "roles": self.roles, "seconds": self.ready_at - self.started_at,
                                           "event_loop": _loop_name(), "gc_thresholds": gc.get_threshold()}))
            os.replace(partial, ready_file)
        logger.info(f"node {self.id} ready in {self.ready_at - self.started_at:.2f}s: roles={','.join(self.roles) or '-'} "
                    f"services={','.join(s.name for s in self.services) or '-'} ports={self.ports or '-'} "
                    f"functions={len(self.registry.functions)} loop={_loop_name()}")

    async def _collect_loop(self) -> None:
        """A full cyclic-GC collection every ``[node] gc_collect_interval`` seconds when the heap
        changed by ``gc_collect_growth`` since the last one, freezing what survives it; one that walks the
        frozen objects too once the heap grew by ``gc_rescan_growth``, or at the latest every tenth interval
        (see CollectTimer, the keys' comments)."""
        interval = self.config.node.gc_collect_interval
        timer = self.gc_timer = CollectTimer(self.config.node.gc_collect_growth, sys.getallocatedblocks(),
                                             self.config.node.gc_rescan_growth)
        gc.callbacks.append(timer.on_gc)  # a full collection the interpreter ran itself counts too
        try:
            while True:
                await asyncio.sleep(interval)
                timer.tick()
                blocks = sys.getallocatedblocks()
                if timer.due(blocks) or timer.rescan_due(blocks):
                    timer.collect()
        finally:
            gc.callbacks.remove(timer.on_gc)

    async def _open_pool(self, key: str, url: str, *, min_size: int, read_only: bool = False,
                         pooled: bool = False) -> asyncpg.Pool:
        db = self.config.database
        try:
            return await dbmod.create_pool(url, min_size=min_size, max_size=db.pool_max, timeout=db.connect_timeout,
                                           read_only=read_only, pooled=pooled)
        except dbmod.PoolerDetected as exc:
            raise StartupError(
                f"[database] {key} leads to a connection pooler ({exc}) but [database] pooler is '{db.pooler}'"
                f"{'' if db.direct_url else ' and direct_url is empty'}: set [database] direct_url to the PostgreSQL "
                f"server itself (migrations, leader election and LISTEN need a session) and [database] pooler = "
                f"\"transaction\"") from None
        except asyncpg.TooManyConnectionsError as exc:
            raise StartupError(connection_limit_message(key, exc, db.pool_min)) from None
        except (OSError, ValueError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncio.TimeoutError) as exc:
            raise StartupError(f"cannot connect to PostgreSQL at [database] {key}: {type(exc).__name__}: {exc}") from exc

    async def _probe_replica(self) -> None:
        """Say at start-up when the replica cannot be reached or is no standby (not fatal: queries
        read the primary then)."""
        try:
            async with asyncio.timeout(self.config.database.connect_timeout):
                async with self.read_pool.acquire() as conn:
                    standby = await conn.fetchval("SELECT pg_is_in_recovery()")
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncio.TimeoutError) as exc:
            self.reads.unreachable(exc)
            return
        if not standby:
            logger.warning("[database] read_url is not a standby (pg_is_in_recovery() is false); queries read it as if "
                           "it had every commit of the primary")

    async def stop(self) -> None:
        """Drain: mark draining, stop services in reverse start order within the drain timeout,
        mark stopped, close the pool, leave the embedded database."""
        if self.status in ("stopped",):
            return
        await self._set_status("draining")
        await self.stack.exit(self.config.node.drain_timeout, self.supervisor)
        await self.supervisor.cancel()
        await self._set_status("stopped")
        if self._hb_conn is not None:
            with contextlib.suppress(Exception):
                await self._hb_conn.close()
        if self.pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.pool.close(), 5)
        for pool in (self.query_pool, self.read_pool):
            if pool is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(pool.close(), 5)
        self.status = "stopped"
        if self.embedded is not None:
            # this node owns the server it started: nodes that joined through its URL get the drain
            # timeout to leave (warned about by name) before it stops
            await asyncio.to_thread(self.embedded.release, self.config.node.drain_timeout)

    async def run(self) -> None:
        """Start, wait for SIGTERM/SIGINT, drain."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        try:
            await self.start()
            await self._stopping.wait()
            logger.info(f"node {self.id} draining")
        finally:
            await self.stop()
        logger.info(f"node {self.id} stopped")

    def request_stop(self) -> None:
        self._stopping.set()

    async def reload_registry(self, registry: Registry) -> list[migmod.Migration]:
        """Serve ``registry`` from now on, without a restart (``forge-node dev``): check it
        (``forge_registry_loaded``), apply its new migrations, swap it in, then call
        ``forge_registry_reloaded``. A failed check or migration raises ``StartupError`` and the
        node keeps the registry it had. Returns the migrations applied."""
        self.loader.hook.forge_registry_loaded(registry=registry, node=self)
        conn = await self.connect()
        try:
            applied = await migmod.migrate(conn, all_migrations(self.loader, registry))
        finally:
            await conn.close()
        self.registry = registry
        if self.executor is not None:
            self.executor.registry = registry
        args = {"node": self, "registry": registry}
        # each implementation on its own: one failing must neither stop the others nor the node
        for impl in self.loader.hook.forge_registry_reloaded.get_hookimpls():
            try:
                result = impl.function(**{name: args[name] for name in impl.argnames})
                if inspect.isawaitable(result):
                    await result
            except Exception:
                logger.exception(f"forge_registry_reloaded of plugin {impl.plugin_name} failed")
        return applied

    # --- membership -----------------------------------------------------------------
    async def _register(self) -> None:
        await self.pool.execute(
            """INSERT INTO forge_nodes (id, host, pid, ports, roles, capabilities, version, status, info)
               VALUES ($1, $2, $3, $4, $5, $6, $7, 'starting', $8)
               ON CONFLICT (id) DO UPDATE SET host = EXCLUDED.host, pid = EXCLUDED.pid, ports = EXCLUDED.ports,
                 roles = EXCLUDED.roles, capabilities = EXCLUDED.capabilities, version = EXCLUDED.version,
                 status = 'starting', started_at = now(), last_heartbeat = now(), stopped_at = NULL, info = EXCLUDED.info""",
            self.id, self.config.node.host, os.getpid(), self.ports, self.roles, self.capabilities, self.version,
            {"plugins": [i.name for i in self.loader.loaded()], "heartbeat_interval": self.config.node.heartbeat_interval},
        )
        self._registered = True

    async def publish_ports(self) -> None:
        """Services call this after binding a port so ``forge-node status`` shows it."""
        if self.pool is not None:
            await self.pool.execute("UPDATE forge_nodes SET ports = $2 WHERE id = $1", self.id, self.ports)

    async def _set_status(self, status: str) -> None:
        self.status = status
        if self.pool is None or not self._registered:
            return  # a start that failed early: no row to update, only the real error to tell
        try:  # bounded: a pool held by stuck user code must not stall a drain
            await asyncio.wait_for(self.pool.execute(
                "UPDATE forge_nodes SET status = $2, last_heartbeat = now(), "
                "stopped_at = CASE WHEN $2 = 'stopped' THEN now() ELSE NULL END WHERE id = $1", self.id, status), 5)
        except Exception as exc:  # the database may be gone while we stop; that must not block exit
            logger.warning(f"could not record node status {status!r}: {exc}")

    async def _heartbeat_loop(self) -> None:
        interval = self.config.node.heartbeat_interval
        while True:
            try:
                if self._hb_conn is None or self._hb_conn.is_closed():
                    self._hb_conn = await self.connect(timeout=5)
                # the status too: it restores a row marked dead by a leader that thought us gone, and
                # records 'draining' when the pool was too busy for _set_status
                row = await self._hb_conn.fetchval(
                    "UPDATE forge_nodes SET last_heartbeat = now(), status = $2, stopped_at = NULL "
                    "WHERE id = $1 RETURNING coalesce(info -> $3, 'false')", self.id, self.status, DRAIN_KEY)
                if row is None:
                    logger.warning(f"node row {self.id} vanished; registering again")
                    await self._register()
                    await self._set_status(self.status)
                elif row and not self._stopping.is_set():
                    # an operator asked (node.drain admin action): drain as on SIGTERM
                    logger.warning(f"node {self.id} draining: asked by {row.get('by', '?') if isinstance(row, dict) else '?'} (node.drain)")
                    self.request_stop()
            except (OSError, asyncpg.PostgresError, asyncio.TimeoutError, asyncpg.InterfaceError) as exc:
                logger.warning(f"heartbeat failed ({type(exc).__name__}: {exc}); retrying")
                if self._hb_conn is not None:
                    with contextlib.suppress(Exception):
                        self._hb_conn.terminate()
                self._hb_conn = None
            await asyncio.sleep(interval)

    def _crash_noted(self, rec: Any, exc: BaseException) -> None:
        if self.pool is None:
            return

        async def note() -> None:
            with contextlib.suppress(Exception):
                await self.pool.execute(
                    "UPDATE forge_nodes SET info = info || jsonb_build_object('crashes', "
                    "coalesce(info->'crashes', '{}'::jsonb) || jsonb_build_object($2::text, $3::jsonb)) WHERE id = $1",
                    self.id, rec.name, {"count": rec.crashes, "error": rec.last_error})

        asyncio.get_running_loop().create_task(note())


def connection_limit_message(key: str, exc: BaseException, pool_min: int) -> str:
    return (f"PostgreSQL at [database] {key} refused a connection while the node opened its minimum "
            f"([database] pool_min = {pool_min} pool connections, one for queries, one session): {exc}. The "
            f"server allows fewer connections than the node needs (max_connections, or the role's or "
            f"database's CONNECTION LIMIT): lower [database] pool_min and pool_max, put a pooler in front "
            f"([database] url, with direct_url for sessions), or raise the limit")


#: heartbeats a live node may miss before ``forge-node status`` calls it unresponsive
MISSED_HEARTBEATS = 3


async def cluster_status(conn: asyncpg.Connection, dead_after: float,
                         heartbeat_interval: float = 2.0) -> list[dict[str, Any]]:
    """The cluster's nodes. A node whose row says it is live (starting, running, draining) shows
    as ``unresponsive`` once it missed ``MISSED_HEARTBEATS`` of its own heartbeats (at least 1 s)
    and as ``dead`` once its heartbeat is older than ``dead_after`` (when the cluster re-runs its
    jobs), before the scheduler leader marks it so. ``heartbeat_age`` is in seconds, never below 0
    (a heartbeat that commits between this statement's start, its ``now()``, and its snapshot carries
    a later time)."""
    rows = await conn.fetch(
        """SELECT id, host, pid, ports, roles, capabilities, version,
                  CASE WHEN status NOT IN ('running', 'starting', 'draining') THEN status
                       WHEN age > $1 THEN 'dead'
                       WHEN age > GREATEST(1.0, $3 * coalesce((info->>'heartbeat_interval')::float8, $2)) THEN 'unresponsive'
                       ELSE status END AS status,
                  started_at, last_heartbeat, age AS heartbeat_age, info
           FROM (SELECT *, GREATEST(0.0, extract(epoch FROM now() - last_heartbeat)::float8) AS age FROM forge_nodes) n
           ORDER BY status, started_at""", float(dead_after), float(heartbeat_interval), float(MISSED_HEARTBEATS))
    return [dict(r) for r in rows]


def _loop_name() -> str:
    """``uvloop`` or ``asyncio``: which event loop runs this node."""
    return type(asyncio.get_running_loop()).__module__.split(".")[0]
