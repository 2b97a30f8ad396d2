"""Hook contracts every FORGE plugin keeps, as hypothesis properties.

Run them against your own plugin (any third party can)::

    from forge_kernel.testing import contracts

    def test_config_round_trip():
        contracts.check_config_round_trip(my_plugin.hooks)

    async def test_migrations(forge_db_url):
        await contracts.check_migrations_idempotent(my_plugin.hooks, forge_db_url)
        await contracts.check_concurrent_migrations(my_plugin.hooks, forge_db_url)

    def test_loader_isolation():
        contracts.check_loader_isolation(my_plugin.hooks)

The properties:

* config round trip - every section value survives ``unstructure`` then ``structure``;
* loader isolation - whatever subset of plugins is broken, exactly the broken ones are
  reported failed, none is left half-registered, and the rest load;
* order independence - the resolved roles, config sections and migrations do not depend
  on the order in which plugins were registered;
* service order - start order respects every ``after`` and ``before``, and stop order is its exact reverse;
* service order - also for the services the installed plugins declare, in any declaration order;
* migrations applied twice equal migrations applied once from any prefix already applied, and
  N concurrent runners (2 to 8) apply each migration exactly once;
* call forwarder (``forge_call_forwarder``) - ``wants`` is a pure yes/no per function; the call-id
  ledger behaves like a map from call id to the result of the one transaction that committed it:
  a claim after a commit returns the stored result, a claim after a rollback owns the id again, and
  no interleaving of commits, rollbacks and retries makes a call id run twice.
* ``forge_rate_limiter`` - for any limit and any interleaving of callers, each caller (by the
  limit's key: user, client address or everyone) is admitted exactly ``min(calls, requests)``
  times, every refusal is ``RateLimited`` with a ``retry_after`` of at least a second, and a
  function without a limit is never refused (:func:`check_rate_limiter`);
* the WebSocket ``write_now`` extension (:mod:`forge_kernel.websocket`) - any mix of messages
  written through it (in any number of buffers) and through ASGI ``websocket.send`` arrives
  intact and in call order (:func:`check_websocket_write_now`);
* the workflow engine (``forge_workflow_engine``) starts runs and sends events exactly when the
  caller's transaction commits, and idempotency keys name one run.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import types
from typing import Any, Iterable

import attrs
try:
    from hypothesis import HealthCheck, assume, given, settings
    from hypothesis import strategies as st
except ImportError as exc:  # production nodes do not install hypothesis
    raise ImportError("forge_kernel.testing.contracts needs hypothesis, which comes with the testing extra: "
                      "pip install 'forge-kernel[testing]'") from exc

from ..convert import StructureError, structure, unstructure
from ..migrations import Migration, migrate, status
from ..plugins import PluginLoader, new_plugin_manager
from ..services import Service, ServiceStack, start_order

_SETTINGS = dict(max_examples=60, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def _sections(plugin: Any) -> dict[str, type]:
    pm = new_plugin_manager()
    pm.register(plugin, name="under-test")
    out: dict[str, type] = {}
    for res in pm.hook.forge_config_sections():
        out.update(res or {})
    return out


def _migrations(plugin: Any) -> list[Migration]:
    pm = new_plugin_manager()
    pm.register(plugin, name="under-test")
    out: list[Migration] = []
    for res in pm.hook.forge_migrations():
        out.extend(res or [])
    return out


# --- config -----------------------------------------------------------------------------
def _values(tp: Any) -> st.SearchStrategy[Any]:
    """Values of a config field type, biased towards what validators usually accept
    (small positive numbers, plain names) but still reaching the whole type."""
    if tp is int:
        return st.integers(1, 1000) | st.integers()
    if tp is float:
        return st.floats(0.1, 100.0) | st.floats(allow_nan=False, allow_infinity=False)
    if tp is str:
        return st.from_regex(r"[a-z][a-z0-9_\-]{0,11}", fullmatch=True) | st.text(max_size=20)
    import typing

    if typing.get_origin(tp) is list and typing.get_args(tp):
        return st.lists(_values(typing.get_args(tp)[0]), max_size=4)
    if attrs.has(tp):
        hints = typing.get_type_hints(tp)
        fields = {a.name: _values(hints[a.name]) for a in attrs.fields(tp) if a.name in hints}

        def build(kwargs: dict[str, Any]) -> Any:
            try:
                return tp(**kwargs)
            except (ValueError, TypeError):
                return _REJECTED

        return st.fixed_dictionaries({}, optional=fields).map(build).filter(lambda v: v is not _REJECTED)
    return st.from_type(tp)


_REJECTED = object()


def check_config_round_trip(plugin: Any) -> None:
    """Every value of every config section the plugin owns round-trips through cattrs:
    ``structure(unstructure(value)) == value``."""
    sections = _sections(plugin)
    if not sections:
        return

    @settings(**_SETTINGS)
    @given(data=st.data())
    def round_trip(data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(sections)), label="section")
        cls = sections[name]
        value = data.draw(_values(cls), label=name)
        raw = unstructure(value)
        try:
            again = structure(raw, cls)
        except StructureError as exc:
            raise AssertionError(f"[{name}] {value!r} does not round-trip: {exc}") from None
        assert again == value, f"[{name}] round trip changed {value!r} into {again!r}"

    round_trip()


# --- loader -----------------------------------------------------------------------------
def _broken(kind: int, index: int) -> Any:
    """A plugin broken in one of several ways."""
    from ..hookspecs import hookimpl

    mod = types.SimpleNamespace()
    if kind == 0:  # its descriptive hook raises
        def forge_roles():
            raise RuntimeError(f"broken plugin {index}")
        mod.forge_roles = hookimpl(forge_roles)
    elif kind == 1:  # a hookimpl that asks for an argument the spec does not have
        def forge_services(node, nonsense):
            return []
        mod.forge_services = hookimpl(forge_services)
    elif kind == 2:  # a typo'd hook name
        def forge_servicez(node):
            return []
        mod.forge_servicez = hookimpl(forge_servicez)
    else:  # returns something that is not a migration
        def forge_migrations():
            return ["CREATE TABLE nope ()"]
        mod.forge_migrations = hookimpl(forge_migrations)
    # a valid hook too, so a half-registration would be visible
    def forge_app_modules():
        return [f"broken_{index}"]
    mod.forge_app_modules = hookimpl(forge_app_modules)
    return mod


def check_loader_isolation(plugin: Any, name: str = "under-test") -> None:
    """For any set of broken plugins loaded around ``plugin``, only they fail, none is
    half-registered, and ``plugin`` loads."""

    @settings(**_SETTINGS)
    @given(kinds=st.lists(st.integers(0, 3), max_size=5), position=st.integers(0, 5))
    def isolation(kinds: list[int], position: int) -> None:
        extra = [(f"broken-{i}", _broken(k, i)) for i, k in enumerate(kinds)]
        extra.insert(min(position, len(extra)), (name, plugin))
        loader = PluginLoader(env={"FORGE_DISABLE_PLUGIN_AUTOLOAD": "1"}).load(extra=extra)
        status = {i.name: i.status for i in loader.infos}
        assert status[name] == "loaded", next(i.error for i in loader.infos if i.name == name)
        for i in range(len(kinds)):
            assert status[f"broken-{i}"] == "failed"
            assert loader.pm.get_plugin(f"broken-{i}") is None
        modules = [m for r in loader.hook.forge_app_modules() for m in (r or [])]
        assert not any(m.startswith("broken_") for m in modules), modules

    isolation()


def check_order_independence(plugins: Iterable[tuple[str, Any]]) -> None:
    """Resolved roles, config sections and migrations are the same in every registration order."""
    plugins = list(plugins)

    def resolved(order: list[tuple[str, Any]]) -> tuple:
        loader = PluginLoader(env={"FORGE_DISABLE_PLUGIN_AUTOLOAD": "1"}).load(extra=order)
        return (sorted(loader.provided_roles()), sorted(loader.config_sections()),
                sorted((m.namespace, m.version, m.checksum) for m in loader.migrations()),
                sorted((i.name, i.status) for i in loader.infos))

    @settings(**_SETTINGS)
    @given(order=st.permutations(plugins))
    def independent(order: list[tuple[str, Any]]) -> None:
        assert resolved(list(order)) == resolved(plugins)

    independent()


# --- services ---------------------------------------------------------------------------
@st.composite
def service_graphs(draw: st.DrawFn, max_services: int = 8) -> list[Service]:
    """Random acyclic service graphs (each service may depend on earlier ones), shuffled."""
    n = draw(st.integers(1, max_services))
    names = [f"s{i}" for i in range(n)]
    log: list[str] = draw(st.just([]))
    services = []
    for i, name in enumerate(names):
        after = tuple(draw(st.sets(st.sampled_from(names[:i]))) if i else ())
        # 'before' edges point the same way (from an earlier service to a later one), so the graph stays acyclic
        before = tuple(draw(st.sets(st.sampled_from(names[i + 1:]))) if i + 1 < n else ())
        services.append(Service(name, _recording(name, log), after=after, before=before))
    return draw(st.permutations(services))


def _recording(name: str, log: list[str]):
    @contextlib.asynccontextmanager
    async def lifespan(node: Any):
        log.append(f"start {name}")
        yield
        log.append(f"stop {name}")

    return lifespan


def check_service_order(services: list[Service] | None = None) -> None:
    """Start order respects ``after``; stop order is the exact reverse of start order.
    With ``services`` given (a plugin's), checks those; otherwise random graphs."""

    def run(svcs: list[Service]) -> tuple[list[str], list[str]]:
        log: list[str] = []
        wrapped = [attrs.evolve(s, lifespan=_recording(s.name, log)) for s in svcs]
        ordered = start_order(wrapped)

        async def go() -> None:
            stack = ServiceStack()
            await stack.enter(ordered, None)
            await stack.exit(5.0)

        asyncio.run(go())
        starts = [e[6:] for e in log if e.startswith("start ")]
        stops = [e[5:] for e in log if e.startswith("stop ")]
        return starts, stops

    def verify(svcs: list[Service]) -> None:
        starts, stops = run(svcs)
        pos = {n: i for i, n in enumerate(starts)}
        names = {s.name for s in svcs}
        for s in svcs:
            for dep in s.after:
                if dep in names:
                    assert pos[dep] < pos[s.name], f"{s.name} started before {dep}"
            for later in s.before:
                if later in names:
                    assert pos[s.name] < pos[later], f"{later} started before {s.name}"
        assert stops == list(reversed(starts))

    if services is not None:
        given_services = list(services)

        @settings(**{**_SETTINGS, "max_examples": 20})
        @given(svcs=st.permutations(given_services))
        def any_declaration_order(svcs: list[Service]) -> None:
            verify(svcs)

        any_declaration_order()
        return

    @settings(**_SETTINGS)
    @given(svcs=service_graphs())
    def ordered(svcs: list[Service]) -> None:
        verify(svcs)

    ordered()


# --- migrations -------------------------------------------------------------------------
async def _schema(conn: Any) -> list[tuple]:
    rows = await conn.fetch(
        """SELECT c.relname, c.relkind, a.attname, format_type(a.atttypid, a.atttypmod)
           FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
           LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
           WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')
           ORDER BY 1, 2, 3""")
    return [tuple(r) for r in rows]


async def _fresh_db(admin_url: str) -> tuple[str, Any]:
    import uuid

    import asyncpg

    from .fixtures import _with_db

    name = f"forge_c_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(admin_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()

    async def drop() -> None:
        a = await asyncpg.connect(admin_url)
        await a.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await a.close()

    return _with_db(admin_url, name), drop


def _with_kernel(migrations: list[Migration]) -> list[Migration]:
    from .. import kernel_plugin

    kernel = kernel_plugin.forge_migrations()
    return kernel + [m for m in migrations if m.namespace != "kernel"]


async def _apply_all_once(migs: list[Migration], db_url: str) -> tuple[list[tuple], list[tuple]]:
    """The schema and migration records of a fresh database after one plain run."""
    from ..db import connect

    url, drop = await _fresh_db(db_url)
    try:
        conn = await connect(url)
        try:
            assert [m.key for m in await migrate(conn, migs)] == [m.key for m in migs]
            return await _schema(conn), await _records(conn)
        finally:
            await conn.close()
    finally:
        await drop()


async def _records(conn: Any) -> list[tuple]:
    return [tuple(r) for r in await conn.fetch("SELECT namespace, version, checksum FROM forge_migrations ORDER BY 1, 2")]


def _same(what: str, got: list[tuple], want: list[tuple], done_before: int) -> None:
    # plain asserts here are not rewritten by pytest: say what differs
    if got != want:
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        raise AssertionError(f"{what} differs from a single run (with {done_before} applied before): "
                             f"missing {missing[:10]}, unexpected {extra[:10]}")


def _run_property(prop: Any) -> Any:
    # hypothesis drives a sync function; each example runs its own event loop in a worker thread
    return asyncio.to_thread(prop)


async def check_migrations_idempotent(plugin: Any, db_url: str, max_examples: int = 4) -> None:
    """Applying the plugin's migrations twice leaves the same schema and records as once, whatever
    prefix of them a database already had (a node upgraded from any earlier version)."""
    from ..db import connect

    migs = _with_kernel(_migrations(plugin))
    schema, records = await _apply_all_once(migs, db_url)

    async def example(done_before: int) -> None:
        url, drop = await _fresh_db(db_url)
        try:
            conn = await connect(url)
            try:
                await migrate(conn, migs[:done_before])
                applied = await migrate(conn, migs)
                assert [m.key for m in applied] == [m.key for m in migs[done_before:]], (
                    f"with {done_before} applied before, the run applied {[m.key for m in applied]}")
                again = await migrate(conn, migs)
                assert again == [], f"a second run applied {[m.key for m in again]}"
                _same("schema", await _schema(conn), schema, done_before)
                _same("forge_migrations records", await _records(conn), records, done_before)
                states = {(st.namespace, st.version): st.state for st in await status(conn, migs)}
                assert all(v == "applied" for v in states.values()), f"status after two runs: {states}"
            finally:
                await conn.close()
        finally:
            await drop()

    @settings(**{**_SETTINGS, "max_examples": max_examples})
    @given(done_before=st.integers(0, len(migs)))
    def twice_equals_once(done_before: int) -> None:
        asyncio.run(example(done_before))

    await _run_property(twice_equals_once)


async def check_concurrent_migrations(plugin: Any, db_url: str, runners: int | None = None,
                                      max_examples: int = 4) -> None:
    """N concurrent migrators (N from 2 to 8, or exactly ``runners``) apply each of the plugin's
    migrations exactly once, from any prefix already applied, and leave the one-run schema."""
    from ..db import connect

    migs = _with_kernel(_migrations(plugin))
    schema, records = await _apply_all_once(migs, db_url)

    async def example(n: int, done_before: int) -> None:
        url, drop = await _fresh_db(db_url)
        try:
            setup = await connect(url)
            try:
                await migrate(setup, migs[:done_before])
            finally:
                await setup.close()
            conns = [await connect(url) for _ in range(n)]
            try:
                results = await asyncio.gather(*(migrate(c, migs) for c in conns))
                applied = sorted(m.key for r in results for m in r)
                assert applied == sorted(m.key for m in migs[done_before:]), (
                    f"{n} concurrent runners after {done_before} applied: applied {applied}, expected each of "
                    f"{sorted(m.key for m in migs[done_before:])} once")
                _same("schema", await _schema(conns[0]), schema, done_before)
                _same("forge_migrations records", await _records(conns[0]), records, done_before)
            finally:
                for c in conns:
                    await c.close()
        finally:
            await drop()

    counts = st.just(runners) if runners is not None else st.integers(2, 8)

    @settings(**{**_SETTINGS, "max_examples": max_examples})
    @given(n=counts, done_before=st.integers(0, len(migs)))
    def each_once(n: int, done_before: int) -> None:
        asyncio.run(example(n, done_before))

    await _run_property(each_once)


def declared_services() -> list[Service]:
    """Every service the installed plugins declare for a node running all their roles, built
    with default configuration and never started (for :func:`check_service_order`). The node
    is not started either: ``forge_services`` sees its config, roles and loader, but no pool
    and no registry yet (the kernel calls the hook only after both exist, so a plugin that
    needs them there cannot be checked this way)."""
    from ..config import load_config
    from ..node import Node

    loader = PluginLoader().load()
    node = Node(load_config(loader.config_sections(), data={"database": {"url": "postgresql://unused/x"}}, env={}),
                loader)
    services = []
    for group in loader.hook.forge_services(node=node):
        services.extend(group or ())
    return [s for s in services if s.role is None or s.role in node.roles]


def installed_plugins() -> list[tuple[str, Any]]:
    """Every plugin the ``forge.plugins`` entry points load, plus the kernel's own."""
    loader = PluginLoader().load()
    return [(i.name, i.plugin) for i in loader.loaded()]


def _engine(plugin: Any) -> Any:
    """The plugin's ``forge_workflow_engine`` for a node with default settings and no app."""
    import types

    from ..app import Registry
    from ..config import load_config

    pm = new_plugin_manager()
    pm.register(plugin, name="under-test")
    node = types.SimpleNamespace(id="contract", config=load_config(_sections(plugin), data={}, env={}), registry=Registry())
    return pm.hook.forge_workflow_engine(node=node)


async def check_workflow_engine(plugin: Any, db_url: str, max_examples: int = 25) -> None:
    """``forge_workflow_engine``: runs started (and events sent) inside a transaction exist
    exactly when it commits; a request whose idempotency key a run holds returns that run's id
    (in the same batch, a later batch, or a batch after a rollback) and starts nothing; requests
    without a key always start a new run; ids come back in request order."""
    import uuid

    from ..db import connect
    from ..errors import NotFound
    from ..executor import WorkflowRequest

    engine = _engine(plugin)
    assert engine is not None, "the plugin declined forge_workflow_engine"
    migs = _with_kernel(_migrations(plugin))
    url, drop = await _fresh_db(db_url)
    conn = await connect(url)
    await migrate(conn, migs)
    await conn.close()

    async def example(batches: list[tuple[list[tuple[str, int, int | None]], bool]]) -> None:
        prefix = uuid.uuid4().hex[:8]
        conn = await connect(url)
        try:
            held: dict[str, str] = {}  # committed key -> run id
            for requests, commit in batches:
                reqs = [WorkflowRequest(name=name, args={"x": x},
                                        idempotency_key=None if key is None else f"{prefix}-{key}")
                        for name, x, key in requests]
                tx = conn.transaction()
                await tx.start()
                ids = await engine.start(conn, reqs)
                assert len(ids) == len(reqs), f"{len(reqs)} requests, {len(ids)} ids"
                seen: dict[str, str] = {}
                for r, run_id in zip(reqs, ids):
                    k = r.idempotency_key
                    if k is not None and k in held:
                        assert run_id == held[k], f"key {k} is held by {held[k]}, start returned {run_id}"
                    if k is not None:
                        assert seen.setdefault(k, run_id) == run_id, f"key {k} got two runs in one batch"
                fresh = [i for r, i in zip(reqs, ids) if r.idempotency_key is None]
                assert len(set(fresh)) == len(fresh), "requests without a key shared a run"
                new_ids = [i for r, i in zip(reqs, ids) if r.idempotency_key not in held]
                events = 0
                if new_ids:
                    events = await engine.send_event(conn, new_ids[0], "contract.ping", {"n": 1})
                    assert events >= 1, "send_event reached no run it just started"
                if commit:
                    await tx.commit()
                    for r, i in zip(reqs, ids):
                        if r.idempotency_key is not None:
                            held.setdefault(r.idempotency_key, i)
                else:
                    await tx.rollback()
                # seen from another connection, through the engine alone: an event reaches a
                # committed run and no rolled-back one; a key names its committed run again
                probe = await connect(url)
                try:
                    for run_id in new_ids:
                        try:
                            reached = await engine.send_event(probe, run_id, "contract.probe", None)
                        except NotFound:
                            reached = 0
                        assert bool(reached) == commit, (
                            f"run {run_id} {'missing after commit' if commit else 'visible after rollback'}")
                    async with probe.transaction():
                        keyed = [r for r in reqs if r.idempotency_key is not None]
                        again = await engine.start(probe, keyed)
                        for r, i in zip(keyed, again):
                            if r.idempotency_key in held:
                                assert i == held[r.idempotency_key], f"key {r.idempotency_key} lost its run"
                            else:
                                assert i not in ids, f"a rolled-back run {i} still holds key {r.idempotency_key}"
                        raise _Undo()
                except _Undo:
                    pass
                finally:
                    await probe.close()
        finally:
            await conn.close()

    name = st.sampled_from(["alpha", "beta.step", "gamma_3"])
    request = st.tuples(name, st.integers(-5, 5), st.one_of(st.none(), st.integers(0, 4)))

    @settings(**{**_SETTINGS, "max_examples": max_examples})
    @given(batches=st.lists(st.tuples(st.lists(request, min_size=1, max_size=6), st.booleans()),
                            min_size=1, max_size=4))
    def starts_are_transactional(batches: list) -> None:
        asyncio.run(example(batches))

    try:
        await _run_property(starts_are_transactional)
    finally:
        await drop()


# --- forge_call_forwarder -------------------------------------------------------------------
class _StubNode:
    """Just enough of a node for a forwarder to be built (never started): default config sections."""

    def __init__(self, plugin: Any, roles: list[str], capabilities: list[str]) -> None:
        self.id = "contract-node"
        self.roles = roles
        self.capabilities = capabilities
        self.config = {name: cls() for name, cls in _sections(plugin).items()}

    def runs(self, role: str) -> bool:
        return role in self.roles


def _forwarder(plugin: Any, roles: list[str], capabilities: list[str]) -> Any:
    pm = new_plugin_manager()
    pm.register(plugin, name="under-test")
    return pm.hook.forge_call_forwarder(node=_StubNode(plugin, roles, capabilities))


def check_call_forwarder_wants(plugin: Any) -> None:
    """``wants(defn)`` answers a bool, the same every time, for any function on any node."""
    from ..app import query as query_deco

    if _forwarder(plugin, [], []) is None:
        return

    async def fn(ctx) -> None:  # noqa: ANN001 - a function to describe
        return None

    @settings(**_SETTINGS)
    @given(kind=st.sampled_from(["query", "mutation", "action"]), capability=st.none() | st.sampled_from(["gpu", "media"]),
           roles=st.lists(st.sampled_from(["gateway", "function", "worker"]), unique=True),
           caps=st.lists(st.sampled_from(["gpu", "media"]), unique=True))
    def pure(kind: str, capability: str | None, roles: list[str], caps: list[str]) -> None:
        defn = attrs.evolve(query_deco(fn).__forge__, kind=kind, options={"capability": capability} if capability else {})
        fwd = _forwarder(plugin, roles, caps)
        first = fwd.wants(defn)
        assert isinstance(first, bool) and all(fwd.wants(defn) is first for _ in range(3)), (kind, capability, roles)
        if "function" in roles and (capability is None or capability in caps):
            assert first is False, f"a node that can run {kind} {capability} itself should not forward it"

    pure()


async def check_call_ledger(plugin: Any, db_url: str, max_examples: int = 40) -> None:
    """Model-based: random interleavings of mutations that claim a call id in their transaction and
    commit or roll back, and retries of the same ids, against a map of committed results."""
    from ..app import mutation as mutation_deco
    from ..db import connect

    if _forwarder(plugin, ["function"], []) is None:
        return
    migs = _with_kernel(_migrations(plugin))

    async def fn(ctx) -> None:  # noqa: ANN001 - a function to describe
        return None

    defn = mutation_deco(fn).__forge__
    steps = st.lists(st.tuples(st.sampled_from(["commit", "rollback", "retry"]), st.integers(0, 3),
                               st.integers(0, 1000)), min_size=1, max_size=25)

    url, drop = await _fresh_db(db_url)
    try:
        conn = await connect(url)
        try:
            await migrate(conn, migs)
        finally:
            await conn.close()

        async def example(ops: list[tuple[str, int, int]]) -> None:
            import uuid

            prefix = uuid.uuid4().hex[:8]  # each example its own call ids, in one database
            conn = await connect(url)
            try:
                fwd = _forwarder(plugin, ["function"], [])
                committed: dict[str, Any] = {}
                for op, which, value in ops:
                    call_id = f"{prefix}-{which}"
                    result = {"value": value}
                    tx = conn.transaction()
                    await tx.start()
                    done, stored = await fwd.claim(conn, call_id, defn)
                    assert done == (call_id in committed), (op, call_id, done, committed)
                    if done:
                        assert stored == committed[call_id], (stored, committed[call_id])
                        await tx.rollback()
                        continue
                    if op == "rollback":
                        await tx.rollback()
                        continue
                    await fwd.record(conn, call_id, result)
                    await tx.commit()
                    committed[call_id] = result
            finally:
                await conn.close()

        @settings(**{**_SETTINGS, "max_examples": max_examples})
        @given(ops=steps)
        def ledger(ops: list[tuple[str, int, int]]) -> None:
            asyncio.run(example(ops))

        await _run_property(ledger)
    finally:
        await drop()



class _Undo(Exception):
    """Rolls a probe's transaction back."""


# --- telemetry ----------------------------------------------------------------------------
def check_telemetry_traces() -> None:
    """``node.telemetry``'s span contract: for any tree of nested spans (some ending with an error),
    each local trace is either handed to the observer exactly once, after its last span ended, with
    every span in it, every parent among them (or the remote parent) and one trace id, or counted as
    discarded; it is handed over whenever it is head-sampled, has a failed span, or its root took at
    least ``keep_over``; finished spans no longer point at their trace (no reference cycle); and the
    current span is restored."""
    from ..telemetry import Telemetry, current_span

    @st.composite
    def trees(draw: st.DrawFn) -> list[Any]:
        def node(depth: int) -> Any:
            kids = draw(st.integers(0, 3 if depth < 3 else 0))
            return (draw(st.booleans()), [node(depth + 1) for _ in range(kids)])
        return [node(0) for _ in range(draw(st.integers(1, 3)))]

    def failing(tree: Any) -> bool:
        return tree[0] or any(failing(k) for k in tree[1])

    @settings(**_SETTINGS)
    @given(forest=trees(), remote=st.booleans(), rate=st.sampled_from([0.0, 1.0]),
           keep_over=st.sampled_from([0.0, float("inf")]))
    def traces(forest: list[Any], remote: bool, rate: float, keep_over: float) -> None:
        got: list[Any] = []
        tel = Telemetry()
        tel.attach(got.append, sample_rate=rate, keep_over=keep_over)
        parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00" if remote else None
        expected = []

        def run(tree: Any, top: bool) -> int:
            failed, kids = tree
            span = tel.start_span("s", remote=parent if top else None)
            n = 1 + sum(run(k, False) for k in kids)
            tel.end_span(span, "boom" if failed else None)
            assert span.trace is None and span.end_ns >= span.start_ns
            return n

        for tree in forest:
            n = run(tree, True)
            if rate == 1.0 or keep_over == 0.0 or failing(tree):
                expected.append(n)
            assert current_span() is None
        assert [len(t.spans) for t in got] == expected
        assert tel.discarded == len(forest) - len(expected)
        for t in got:
            ids = {s.span_id for s in t.spans}
            assert len({s.trace_id for s in t.spans}) == 1 and t.open == 0
            assert all(s.parent_id in ids or s.parent_id == t.remote_parent for s in t.spans)
            assert t.root is not None and t.root.parent_id == t.remote_parent
            assert t.sampled == (rate == 1.0) and all(s.sampled == t.sampled for s in t.spans)
            assert t.errors == sum(s.error is not None for s in t.spans)
            if remote:
                assert t.trace_id == 0x0af7651916cd43dd8448eb211c80319c and t.remote_parent == 0xb7ad6b7169203331

    traces()


def check_telemetry_head_decision() -> None:
    """``head_sampled_remote(traceparent)`` decides what ``start_span(remote=traceparent)`` would,
    without opening anything: for every valid traceparent (FORGE's own form, surrounding
    whitespace, a later version with more fields), any sampling rate and either honour setting.
    An invalid one (upper-case hex, all-zero ids, a bad separator or version, not text) starts a fresh trace
    on both sides: never sampled at rate 0, always at rate 1. A decision handed to ``start_span``
    (``sampled=``) is the one its trace keeps, and its trace id says the same to another node."""
    from ..telemetry import Telemetry, format_traceparent, parse_traceparent

    @settings(**_SETTINGS)
    @given(trace_id=st.integers(0, (1 << 128) - 1) | st.sampled_from([0, 1, (1 << 64) - 1, 1 << 64]),
           span_id=st.integers(0, (1 << 64) - 1), flags=st.integers(0, 255),
           rate=st.sampled_from([0.0, 1.0, 0.01, 0.5]) | st.floats(0.0, 1.0), honor=st.booleans(),
           form=st.sampled_from(["forge", "spaced", "later", "upper", "dash", "version", "number", "list", "bytes"]))
    def decide(trace_id: int, span_id: int, flags: int, rate: float, honor: bool, form: str) -> None:
        tel = Telemetry()
        tel.attach(lambda t: None, sample_rate=rate, honor_remote_sampled=honor)
        tp = format_traceparent(trace_id, span_id, False)[:-2] + f"{flags:02x}"
        tp = {"forge": tp, "spaced": f" {tp}\t", "later": "01" + tp[2:] + "-extra", "upper": tp.upper(),
              "dash": tp[:35] + "_" + tp[36:], "version": "ff" + tp[2:],
              # no text at all (a job's options are any JSON): invalid, never an error
              "number": trace_id, "list": [tp], "bytes": tp.encode()}[form]
        decided = tel.head_sampled_remote(tp)
        span = tel.start_span("job", "consumer", remote=tp)
        tel.end_span(span)
        if parse_traceparent(tp) is not None:
            assert decided == span.sampled
        elif rate in (0.0, 1.0):
            assert decided == span.sampled == (rate == 1.0)
        # the decision handed to start_span (the worker's, for a job) is the trace's, and its trace id
        # tells another node the same (an invalid traceparent: a fresh trace drawn to agree)
        both = parse_traceparent(tp) is None and 0 < int(rate * (1 << 64)) < 1 << 64  # ids of either kind exist
        for head in {decided, not decided} if both else {decided}:
            span = tel.start_span("job", "consumer", remote=tp, sampled=head)
            tel.end_span(span)
            assert span.sampled == head
            assert tel.head_sampled_remote(format_traceparent(span.trace_id, span.span_id, span.sampled)) == head

    decide()
    for rate in (0.0, 0.25, 0.5):  # a trace id's low bits exactly at the rate's threshold, and one below
        below = int(rate * (1 << 64))
        for low in {below, max(0, below - 1)}:
            decide.hypothesis.inner_test(trace_id=(7 << 64) | low, span_id=1, flags=0, rate=rate, honor=True,
                                         form="forge")


def check_telemetry_calls() -> None:
    """The executor's call recording (``call_started`` / ``call_ended``): every call is counted exactly
    once when drained - a failed one as a ``call`` event, a successful one as one of the seconds of
    its function's ``calls`` event - and recording stops with ``detach``; a call inside a sampled
    trace, or outside any span, gets a real span; inside an
    unsampled trace it gets a span only when it failed or took at least ``keep_over`` (recorded
    afterwards, a child of the current span), so the tail sampler can keep that trace."""
    from ..telemetry import Telemetry, call_clock

    @settings(**_SETTINGS)
    @given(rate=st.sampled_from([0.0, 1.0]), keep_over=st.sampled_from([0.0, float("inf")]),
           codes=st.lists(st.sampled_from(["OK", "INTERNAL", "NOT_FOUND"]), max_size=4), rooted=st.booleans())
    def calls(rate: float, keep_over: float, codes: list[str], rooted: bool) -> None:
        got: list[Any] = []
        tel = Telemetry()
        tel.attach(got.append, sample_rate=rate, keep_over=keep_over)
        root = tel.start_span("POST /rpc", "server") if rooted else None
        for code in codes:
            span = tel.call_started("f", "query", "req")
            assert (span is not None) == (not rooted or rate == 1.0)
            tel.call_ended(span, "f", "query", "req", call_clock(), code)
        tel.end_span(root)
        events = tel.drain()
        counted = []
        for kind, f in events:
            assert kind in ("call", "calls") and f[:2] == ("f", "query")
            if kind == "calls":
                assert f[2] == "OK" and all(s >= 0 for s in f[3])
            counted += [f[2]] * (len(f[3]) if kind == "calls" else 1)
        assert sorted(counted) == sorted(codes) and tel.drain() == []
        assert [f[2] for k, f in events if k == "call"] == [c for c in codes if c != "OK"]
        spans = [s for t in got for s in t.spans if s.name == "f"]
        assert [s.error or "OK" for s in spans] == (codes if rate == 1.0 else
                                                     [c for c in codes if c != "OK" or keep_over == 0.0])
        if rooted:
            assert all(s.parent_id == root.span_id for s in spans)
        tel.detach()
        tel.call_ended(None, "f", "query", "req", call_clock(), "OK")
        assert tel.drain() == []

    calls()


def check_telemetry_requests() -> None:
    """A request's root span (``start_request`` / ``end_request``, the gateway's): it keeps
    ``start_span``'s contract - the observer gets the local trace exactly when it is head-sampled,
    answered with a server error (HTTP 500 or more, the span's error), has a failed span, or took
    at least ``keep_over``; else it is counted as discarded - and when kept its root is the request's
    ``server`` span with ``request.id`` and ``http.status_code``, the parent of every span recorded
    in it. An unsampled root draws its span id only when asked, and then answers the same id to
    everyone (children, ``traceparent``, the stored span); a ``traceparent`` handed on (a job's)
    carries the head decision ``head_sampled_remote`` makes again on another node. A child recorded
    on an unsampled root that went well (``Span.record``: a dispatch) makes no local trace until
    one is needed, and is in the trace, a child of the root, whenever the observer gets it."""
    from ..telemetry import Span, Telemetry, current_span

    @settings(**_SETTINGS)
    @given(rate=st.sampled_from([0.0, 1.0, 0.01, 0.5]), keep_over=st.sampled_from([0.0, float("inf")]),
           status=st.sampled_from([200, 404, 500, 503]), remote=st.booleans(),
           work=st.lists(st.sampled_from(["traceparent", "child", "failed child", "record", "attribute", "log"]),
                         max_size=3))
    def requests(rate: float, keep_over: float, status: int, remote: bool, work: list[str]) -> None:
        got: list[Any] = []
        tel = Telemetry()
        tel.attach(got.append, sample_rate=rate, keep_over=keep_over)
        parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00" if remote else None
        root = tel.start_request("POST /rpc/f", parent)
        assert current_span() is root and root.kind == "server"
        handed, failed = [], False
        for w in work:
            if w == "traceparent":
                tp = root.traceparent()
                handed.append(tp)
                assert tel.head_sampled_remote(tp) == root.sampled
            elif w == "record":
                had_trace = root._trace is not None
                root.record("dispatch j", "producer", 1, 2, span_id=0x5EED)
                assert (root._trace is not None) == (had_trace or root.sampled)  # noted, no trace made
            elif w == "attribute":
                root.set("app.attr", 7)
            elif w == "log":  # what a log line reads (forge-observe's sink): the ids, the same ones later
                span = current_span()
                seen = (span.trace_id, span.span_id, span.kind, span.parent_id, span.sampled)
                assert span is root and span.trace.ids is not None and span.trace is root.trace
                assert seen == (root.trace_id, root.span_id, "server", root.parent_id, root.sampled)
            else:
                child = tel.start_span("f")
                assert child.parent_id == root.span_id and child.trace_id == root.trace_id
                tel.end_span(child, "INTERNAL" if w == "failed child" else None)
                failed = failed or w == "failed child"
        tel.end_request(root, status, "req-1")
        assert current_span() is None and root.end_ns >= root.start_ns
        kept = root.sampled or keep_over == 0.0 or status >= 500 or failed
        assert len(got) == int(kept) and tel.discarded == int(not kept)
        if rate in (0.0, 1.0) and not remote:
            assert root.sampled == (rate == 1.0)
        if kept:
            trace = got[0]
            assert trace.root is root and trace.open == 0 and root.trace is None
            assert all(type(s) is Span for s in trace.spans)  # plain data, ids drawn, when handed over
            assert root.attrs == {"request.id": "req-1", "http.status_code": status,
                                  **({"app.attr": 7} if "attribute" in work else {})}
            assert root.error == (f"HTTP {status}" if status >= 500 else None)
            assert all(s.parent_id == root.span_id for s in trace.spans if s is not root)
            assert len(trace.spans) == 1 + sum(w in ("child", "failed child", "record") for w in work)
            assert [s.span_id for s in trace.spans if s.kind == "producer"] == [0x5EED] * work.count("record")
            assert all(s.trace_id == root.trace_id and s.sampled == root.sampled for s in trace.spans)
        assert all(tp.split("-")[1:3] == [f"{root.trace_id:032x}", f"{root.span_id:016x}"] for tp in handed)
        if remote:
            assert root.trace_id == 0x0af7651916cd43dd8448eb211c80319c and root.parent_id == 0xb7ad6b7169203331

    requests()


def check_telemetry_events() -> None:
    """``emit`` keeps the newest ``ring_size`` events in order and counts every one it lost;
    with no observer attached it records nothing."""
    from ..telemetry import Telemetry

    @settings(**_SETTINGS)
    @given(ring=st.integers(1024, 1100), n=st.integers(0, 2500), drains=st.lists(st.integers(0, 2500), max_size=3))
    def bounded(ring: int, n: int, drains: list[int]) -> None:
        idle = Telemetry()
        idle.emit("x", 1)
        assert idle.drain() == [] and idle.dropped == 0
        tel = Telemetry()
        tel.attach(lambda t: None, ring_size=ring)
        seen: list[tuple] = []
        emitted = 0
        for cut in sorted(drains) + [n]:
            while emitted < min(cut, n):
                tel.emit("e", emitted)
                emitted += 1
            seen.extend(tel.drain())
        values = [f[0] for _, f in seen]
        assert values == sorted(values) and len(values) + tel.dropped == n
        assert not values or values[-1] == n - 1

    bounded()


# --- admin actions -------------------------------------------------------------------------
def _admin_actions(plugin: Any) -> dict[str, Any]:
    from ..admin import collect

    pm = new_plugin_manager()
    pm.register(plugin, name="under-test")
    # the hook sees a node that has not started: no pool, no registry (actions get their connection per call)
    node = types.SimpleNamespace(id="contract-node", registry=None, pool=None, config=None)
    return collect(pm.hook.forge_admin_actions(node=node))


async def _contents(conn: Any) -> list[tuple]:
    """Every row of every table of the public schema, as text (the contract's databases are tiny)."""
    out = []
    for (name,) in await conn.fetch("SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                                    "WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') ORDER BY 1"):
        rows = await conn.fetch(f'SELECT t::text AS row FROM "{name}" t ORDER BY 1')
        out.append((name, tuple(r["row"] for r in rows)))
    return out


_garbage_targets = st.lists(
    st.one_of(st.text(max_size=40), st.integers(-10, 10**20).map(str), st.just(""), st.just(" "),
              st.from_regex(r"[a-z_]{1,12}", fullmatch=True), st.just("1" * 400)),
    max_size=5)


async def check_admin_actions(plugin: Any, db_url: str, max_examples: int = 25) -> None:
    """``forge_admin_actions``: valid unique names; and for any targets (unknown ids and names,
    malformed text, empty lists) each action either raises ``InvalidArgument`` / ``NotFound`` or
    returns an ``ActionResult`` with ``affected == 0`` and changes no row of any table, twice in a
    row - on a database with only the kernel's and the plugin's tables, where no target exists."""
    from ..admin import ActionResult, AdminAction
    from ..db import connect
    from ..errors import InvalidArgument, NotFound

    actions = _admin_actions(plugin)
    if not actions:
        return
    for name, action in actions.items():
        assert isinstance(action, AdminAction) and action.name == name
        assert action.max_targets >= 1 and callable(action.run), name
    url, drop = await _fresh_db(db_url)
    try:
        conn = await connect(url)
        try:
            await migrate(conn, _with_kernel(_migrations(plugin)))
        finally:
            await conn.close()

        async def example(name: str, targets: list[str]) -> None:
            conn = await connect(url)
            try:
                before = await _contents(conn)
                for _ in range(2):
                    try:
                        async with conn.transaction():
                            result = await actions[name].run(conn, targets, {}, "contract")
                    except (InvalidArgument, NotFound):
                        continue
                    assert isinstance(result, ActionResult), f"{name} returned {result!r}"
                    assert result.affected == 0, f"{name}({targets!r}) changed {result.affected} unknown target(s)"
                assert await _contents(conn) == before, f"{name}({targets!r}) changed rows without a target"
            finally:
                await conn.close()

        @settings(**{**_SETTINGS, "max_examples": max_examples})
        @given(name=st.sampled_from(sorted(actions)), targets=_garbage_targets)
        def unknown_targets_change_nothing(name: str, targets: list[str]) -> None:
            asyncio.run(example(name, targets))

        for name in sorted(actions):  # always, not only when drawn: text PostgreSQL cannot store
            await example(name, ["a\x00b"])

        await _run_property(unknown_targets_change_nothing)
    finally:
        await drop()


# --- forge_rate_limiter -------------------------------------------------------------------
async def check_rate_limiter(limiter: Any, max_examples: int = 25) -> None:
    """The object a plugin returns from ``forge_rate_limiter`` keeps the hook's contract, on a
    live node (its database): each example uses a function name of its own and hour-long windows.

    Call from an async test with the node's event loop running (the examples run on it)."""
    import uuid

    from ..app import FunctionDef, RateLimit
    from ..errors import RateLimited
    from ..executor import ANONYMOUS, Auth

    loop = asyncio.get_running_loop()
    assert callable(getattr(limiter, "client_address", None)), "the limiter has no client_address(scope)"
    client = limiter.client_address({"type": "http", "client": ("192.0.2.10", 5000), "headers": []})
    assert isinstance(client, str) and client, f"client_address gave {client!r}"

    async def noop(ctx: Any) -> None:  # pragma: no cover - never run
        return None

    def definition(limit: RateLimit | None) -> FunctionDef:
        return FunctionDef(name=f"contract_{uuid.uuid4().hex[:12]}", kind="query", fn=noop, params=(), returns=None,
                           public=True, rate_limit=limit)

    def caller(i: int) -> Auth:
        return ANONYMOUS if i == 0 else Auth(user_id=f"contract-user-{i}", kind="user")

    async def example(requests: int, key: str, calls: list[tuple[int, int]]) -> None:
        limited, free = definition(RateLimit(requests, per=3600, key=key)), definition(None)
        admitted: dict[Any, int] = {}
        for who, address in calls:
            auth, client = caller(who), f"192.0.2.{address}"
            await limiter.admit(free, auth, client)  # never refused
            if key == "global":
                bucket: Any = "*"
            elif key == "ip" or not auth.authenticated:
                bucket = ("ip", client)
            else:
                bucket = ("user", auth.user_id)
            before = admitted.get(bucket, 0)
            try:
                await limiter.admit(limited, auth, client)
            except RateLimited as exc:
                assert before >= requests, f"{bucket} refused after {before} of {requests} calls"
                retry = (exc.details or {}).get("retry_after")
                assert isinstance(retry, int) and retry >= 1, f"retry_after {retry!r}"
                continue
            assert before < requests, f"{bucket} admitted a call beyond its {requests}"
            admitted[bucket] = before + 1

    @settings(**{**_SETTINGS, "max_examples": max_examples})
    @given(requests=st.integers(1, 5), key=st.sampled_from(["user", "ip", "global"]),
           calls=st.lists(st.tuples(st.integers(0, 3), st.integers(1, 3)), max_size=25))
    def admits_exactly_the_limit(requests: int, key: str, calls: list[tuple[int, int]]) -> None:
        asyncio.run_coroutine_threadsafe(example(requests, key, calls), loop).result(timeout=120)

    await _run_property(admits_exactly_the_limit)


# --- reloading the registry (forge_registry_reloaded) ------------------------------------------------
def _reload_probe(i: int) -> Any:
    """A public query (even i) or mutation (odd i) named ``forge_contract_reload_<i>`` returning i."""
    from ..app import mutation, query

    async def probe(ctx) -> int:
        return i

    probe.__name__ = probe.__qualname__ = f"forge_contract_reload_{i}"
    return (query if i % 2 == 0 else mutation)(public=True)(probe)


async def check_registry_reloads(node: Any, max_examples: int = 15, pool: int = 6) -> None:
    """For random sequences of registries, ``node.reload_registry`` leaves the node serving exactly the
    latest one (every function in it answers, every other is NOT_FOUND), calls each
    ``forge_registry_reloaded`` implementation once per reload with that registry, and none of the
    installed implementations fails. ``node`` is a started node; its registry is restored at the end."""
    from loguru import logger

    from ..app import Registry
    from ..errors import NotFound
    from ..hookspecs import hookimpl

    probes = [_reload_probe(i) for i in range(pool)]
    sequences: list[list[frozenset[int]]] = []

    @settings(**{**_SETTINGS, "max_examples": max_examples, "database": None})
    @given(st.lists(st.frozensets(st.integers(0, pool - 1)), min_size=1, max_size=4))
    def draw(seq: list[frozenset[int]]) -> None:
        sequences.append(seq)

    draw()  # the node lives on this event loop: draw the examples first, then replay them here

    class Spy:
        seen: list[Any] = []

        @hookimpl
        def forge_registry_reloaded(self, node: Any, registry: Any) -> None:
            self.seen.append(registry)

    spy = Spy()
    failures: list[str] = []
    sink = logger.add(lambda m: failures.append(str(m)), level="ERROR",
                      filter=lambda r: "forge_registry_reloaded" in r["message"])
    node.loader.pm.register(spy, name="forge-contract-reload-spy")
    original = node.registry
    try:
        for seq in sequences:
            for subset in seq:
                reg = Registry()
                for i in sorted(subset):
                    reg.add(probes[i].__forge__)
                before = len(spy.seen)
                await node.reload_registry(reg)
                assert node.registry is reg and node.executor.registry is reg, "the node does not serve the new registry"
                assert spy.seen[before:] == [reg], "forge_registry_reloaded was not called exactly once with it"
                for i in range(pool):
                    name = f"forge_contract_reload_{i}"
                    if i in subset:
                        assert await node.executor.call(name, {}) == i, f"{name} does not answer after the reload"
                    else:
                        try:
                            await node.executor.call(name, {})
                        except NotFound:
                            pass
                        else:
                            raise AssertionError(f"{name} still answers after a reload without it")
        assert not failures, f"forge_registry_reloaded implementations failed: {failures}"
    finally:
        node.loader.pm.unregister(name="forge-contract-reload-spy")
        logger.remove(sink)
        await node.reload_registry(original)


def dev_notices() -> st.SearchStrategy[dict[str, Any]]:
    """What ``forge_dev_notice`` receives: JSON-safe, with the documented keys."""
    text = st.text(max_size=200)
    return st.fixed_dictionaries({
        "event": st.sampled_from(["reloaded", "reload_failed"]),
        "message": text,
        "file": st.none() | st.text(min_size=1, max_size=80),
        "line": st.none() | st.integers(1, 10**6),
        "functions": st.lists(st.from_regex(r"[a-z_][a-z0-9_.]{0,20}", fullmatch=True), max_size=5),
    })


async def check_dev_notices(node: Any, max_examples: int = 30) -> None:
    """Every installed ``forge_dev_notice`` implementation takes any documented notice on a running
    node without raising and returns nothing."""
    notices: list[dict[str, Any]] = []

    @settings(**{**_SETTINGS, "max_examples": max_examples, "database": None})
    @given(dev_notices())
    def draw(notice: dict[str, Any]) -> None:
        notices.append(notice)

    draw()
    for notice in notices:
        results = node.loader.hook.forge_dev_notice(node=node, notice=notice)
        assert all(r is None for r in results), f"forge_dev_notice returned {results!r}"
        await asyncio.sleep(0)  # let writers run: a notice must not break a connection's outbox


# --- the WebSocket write_now extension (forge_kernel.websocket) ----------------------------------
def _payloads() -> st.SearchStrategy[str]:
    # across the three frame length encodings (7-bit, 16-bit, 64-bit), with non-ASCII text
    return st.text(max_size=40) | st.builds(lambda c, n: c * n, st.sampled_from(["a", "é", "\u2028", "🙂"]),
                                            st.sampled_from([125, 126, 127, 65535, 65536, 70000]).map(lambda n: n // 4)
                                            | st.integers(0, 20000))


async def check_websocket_write_now(connection: Any, max_examples: int = 30) -> None:
    """A server's ``write_now`` (``scope["extensions"][forge_kernel.websocket.WRITE_NOW]``) keeps its
    contract on an open connection: for any sequence of messages written through it (each split
    into any number of buffers) and through ASGI ``websocket.send``, with the caller falling back
    to ``websocket.send`` when ``write_now`` refuses, the peer receives exactly those texts, in
    call order; and on a connection whose peer has read everything, ``write_now`` takes a message.

    ``connection`` has ``write_now``; ``async send(text)`` (an ASGI ``websocket.send``); and
    ``async receive() -> str``, the peer's next text message. Call from an async test with the
    server's event loop running (the examples run on it)."""
    loop = asyncio.get_running_loop()

    async def example(ops: list[tuple[bool, list[str]]]) -> None:
        expected = []
        for i, (direct, parts) in enumerate(ops):
            text = "".join(parts)
            expected.append(text)
            if direct:
                took = connection.write_now([p.encode() for p in parts])
                assert isinstance(took, bool), f"write_now returned {took!r}"
                if i == 0:
                    assert took, "write_now refused a message on a connection whose peer had read everything"
                if took:
                    continue
            await connection.send(text)
        for i, want in enumerate(expected):
            got = await asyncio.wait_for(connection.receive(), 30)
            assert got == want, (f"message {i} of {len(expected)} differs: {len(got)} characters received, "
                                 f"{len(want)} sent ({got[:40]!r} vs {want[:40]!r})")

    @settings(**{**_SETTINGS, "max_examples": max_examples})
    @given(st.lists(st.tuples(st.booleans(), st.lists(_payloads(), max_size=4)), min_size=1, max_size=8))
    def arrive_intact_and_in_order(ops: list[tuple[bool, list[str]]]) -> None:
        asyncio.run_coroutine_threadsafe(example(ops), loop).result(timeout=120)

    await _run_property(arrive_intact_and_in_order)
