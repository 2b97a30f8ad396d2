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
* service order - start order respects every ``after`` and stop order is its exact reverse;
* service order - also for the services the installed plugins declare, in any declaration order;
* migrations applied twice equal migrations applied once from any prefix already applied, and
  N concurrent runners (2 to 8) apply each migration exactly once;
* ``forge_rate_limiter`` - for any limit and any interleaving of callers, each caller (by the
  limit's key: user, client address or everyone) is admitted exactly ``min(calls, requests)``
  times, every refusal is ``RateLimited`` with a ``retry_after`` of at least a second, and a
  function without a limit is never refused (:func:`check_rate_limiter`);
* the WebSocket ``write_now`` extension (:mod:`forge_kernel.websocket`) - any mix of messages
  written through it (in any number of buffers) and through ASGI ``websocket.send`` arrives
  intact and in call order (:func:`check_websocket_write_now`).
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
        services.append(Service(name, _recording(name, log), after=after))
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
