"""Every code example in the documentation runs: each ```python block of every markdown file and
each literal block (``::``) of Python in the docstrings of FORGE's packages is executed here, in the
setting it describes (a node, a pool, a plugin). A new example without a runner fails
``test_every_example_has_a_runner``."""

from __future__ import annotations

import ast
import importlib
import re
import sys
import textwrap
import time
import types
from pathlib import Path
from typing import Any, Awaitable, Callable

import asyncpg
import httpx
import pytest

from forge_kernel import Auth
from forge_kernel import migrations as migmod
from forge_kernel.app import Registry
from forge_kernel.plugins import PluginLoader

from test_docs import REPO, markdown_files

PACKAGES = ["forge_kernel", "forge-gateway/forge_gateway", "forge-worker/forge_worker",
            "forge-scheduler/forge_scheduler", "forge-realtime/forge_realtime"]
JWT_SECRET = "docs-example-secret-0123456789abcdef0123456789"


def markdown_examples() -> dict[str, str]:
    out = {}
    for md in markdown_files():
        for i, code in enumerate(re.findall(r"```python\n(.*?)```", md.read_text(), re.S)):
            out[f"{md.relative_to(REPO)}#{i}"] = code
    return out


def _literal_blocks(doc: str) -> list[str]:
    """reStructuredText literal blocks: the indented lines after a paragraph ending in ``::``."""
    blocks, lines = [], doc.splitlines()
    for i, line in enumerate(lines):
        if not line.rstrip().endswith("::"):
            continue
        body = []
        for nxt in lines[i + 1:]:
            if nxt.strip() and not nxt.startswith(" " * (len(line) - len(line.lstrip()) + 1)):
                break
            body.append(nxt)
        blocks.append(textwrap.dedent("\n".join(body)).strip() + "\n")
    return blocks


def docstring_examples() -> dict[str, str]:
    out = {}
    for pkg in PACKAGES:
        root = REPO / pkg
        for path in sorted(root.rglob("*.py")):
            module = ".".join(path.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__")
            tree = ast.parse(path.read_text())
            nodes = [(module, tree)] + [(f"{module}.{n.name}", n) for n in ast.walk(tree)
                                        if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
            for name, node in nodes:
                blocks = [b for b in _literal_blocks(ast.get_docstring(node, clean=True) or "") if _is_python(b)]
                for i, code in enumerate(blocks):
                    out[f"{name}#{i}"] = code
    return out


def _is_python(block: str) -> bool:
    """Literal blocks are code when they parse as Python (a folder layout or a shell line does not)."""
    try:
        compile(block, "<docstring>", "exec", flags=ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    except SyntaxError:
        return False
    return True


def all_examples() -> dict[str, str]:
    return {**markdown_examples(), **docstring_examples()}


class Ex:
    """What a runner gets: the example's code, fixtures, and helpers to import or run code."""

    def __init__(self, code: str, forge_node: Any, forge_db_url: str, tmp_path: Path, monkeypatch: Any) -> None:
        self.code, self.forge_node, self.db_url, self.tmp = code, forge_node, forge_db_url, tmp_path
        monkeypatch.syspath_prepend(str(tmp_path))
        self._names: list[str] = []

    def module(self, name: str, code: str | None = None) -> types.ModuleType:
        (self.tmp / f"{name}.py").write_text(self.code if code is None else code)
        sys.modules.pop(name, None)
        self._names.append(name)
        return importlib.import_module(name)

    async def run(self, code: str | None = None, **names: Any) -> dict[str, Any]:
        """Run the example as the body of an async function (top-level ``await`` and ``async
        with`` work); ``names`` are its globals; returns its local variables."""
        body = textwrap.indent(self.code if code is None else code, "    ")
        scope = dict(names)
        exec(compile(f"async def __example():\n{body}\n    return locals()\n", "<example>", "exec"), scope)
        return await scope["__example"]()

    async def pool(self) -> asyncpg.Pool:
        """A pool on the test's database with every installed package's tables."""
        conn = await asyncpg.connect(self.db_url)
        try:
            await migmod.migrate(conn, PluginLoader().load().migrations())
        finally:
            await conn.close()
        return await asyncpg.create_pool(self.db_url, min_size=1, max_size=4)

    def cleanup(self) -> None:
        for name in self._names:
            sys.modules.pop(name, None)


RUNNERS: dict[str, Callable[[Ex], Awaitable[None]]] = {}


def runs(key: str):
    def register(fn):
        RUNNERS[key] = fn
        return fn
    return register


def _registry_checked(module: types.ModuleType) -> Registry:
    """The registry of ``module``, checked by every installed plugin as at node start-up."""
    registry = Registry.from_modules([module.__name__])
    PluginLoader().load().hook.forge_registry_loaded(registry=registry, node=None)
    return registry


# --- markdown -------------------------------------------------------------------------------
@runs("README.md#0")
async def _readme_app(ex: Ex) -> None:
    ex.module("doc_readme_app")
    conn = await asyncpg.connect(ex.db_url)  # the example's table is the example app's
    try:
        await migmod.migrate(conn, migmod.from_package("forge_example.migrations", namespace="example"))
    finally:
        await conn.close()
    node = await ex.forge_node(modules=["doc_readme_app"], config={"node": {"roles": ["function", "scheduler"]}})
    ann = Auth(user_id="ann", kind="user")
    todo = await node.executor.call("add_todo", {"title": "buy milk"}, ann)
    assert todo["owner"] == "ann" and todo["title"] == "buy milk" and todo["done"] is False
    assert await node.executor.call("list_todos", {}, ann) == [todo]
    job = await node.pool.fetchrow("SELECT name, caller, status, args FROM forge_jobs")
    assert (job["name"], job["caller"], job["status"]) == ("send_reminder", "ann", "scheduled")
    assert job["args"] == {"todo_id": todo["id"]}


@runs("plugins/forge-codegen/README.md#0")
async def _codegen_model_options(ex: Ex) -> None:
    from forge_codegen import schema

    prelude = ("from datetime import datetime\nfrom uuid import UUID\nfrom forge_kernel import model\n\n"
               "@model(table='users')\nclass User:\n    id: UUID\n\n")
    module = ex.module("doc_codegen_models", prelude + ex.code)
    models = [module.User.__forge_model__, module.Task.__forge_model__]
    ddl = "\n".join(schema.model_ddl(models))
    conn = await asyncpg.connect(ex.db_url)
    try:
        async with conn.transaction():  # the DDL the models describe is valid PostgreSQL
            for statement in schema.model_ddl(models):
                await conn.execute(statement)
            tasks = await schema.current_tables(conn, ["tasks"])
    finally:
        await conn.close()
    assert "REFERENCES" in ddl and "ON DELETE CASCADE" in ddl.upper(), ddl
    columns = tasks["tasks"].columns
    assert columns["email"].nullable and not columns["created_at"].nullable and not columns["title"].nullable, columns


@runs("docs/architecture.md#0")
async def _architecture_sketch(ex: Ex) -> None:
    registry = _registry_checked(ex.module("doc_architecture"))
    assert {d.name: d.kind for d in registry.functions.values()} == {
        "count_open": "query", "add_todo": "mutation", "send_reminder": "job", "morning_digest": "cron"}


@runs("forge-gateway/README.md#0")
async def _gateway_routes(ex: Ex) -> None:
    plugin = ex.module("doc_gateway_routes")
    loader = PluginLoader().load(extra=[("doc-routes", plugin)])
    node = await ex.forge_node(modules=[], loader=loader,
                               config={"node": {"roles": ["gateway"]}, "gateway": {"port": 0}})
    async with httpx.AsyncClient() as client:
        r = await client.get(f"http://127.0.0.1:{node.ports['http']}/hello", timeout=30)
    assert r.json() == {"hello": "world"}


@runs("forge-realtime/README.md#0")
async def _realtime_client(ex: Ex) -> None:
    import jwt

    node = await ex.forge_node(config={
        "node": {"roles": ["gateway", "function", "realtime"]},
        "gateway": {"port": 0, "jwt_secret": JWT_SECRET, "jwt_algorithms": ["HS256"]}})
    ann = Auth(user_id="ann", kind="user")
    await node.executor.call("add_todo", {"title": "subscribe"}, ann)
    seen = []

    class Seen(Exception):
        pass

    def show(value: Any) -> None:  # the example prints every result; the first is enough here
        seen.append(value)
        raise Seen

    code = ex.code.replace("localhost:8080", f"127.0.0.1:{node.ports['http']}")  # the node's port
    token = jwt.encode({"sub": "ann", "exp": int(time.time()) + 600}, JWT_SECRET, algorithm="HS256")
    with pytest.raises(Seen):
        await ex.run(code, jwt=token, print=show)
    assert [t["title"] for t in seen[0]] == ["subscribe"]


@runs("forge-scheduler/README.md#0")
async def _cron_definitions(ex: Ex) -> None:
    from forge_scheduler import crons_of

    registry = _registry_checked(ex.module("doc_crons"))
    crons = crons_of(registry)
    assert set(crons) == {"morning_digest", "every_ten_seconds"}
    assert crons["every_ten_seconds"].overlap == "skip"


@runs("forge-scheduler/README.md#1")
async def _crons_api(ex: Ex) -> None:
    ex.module("doc_crons", markdown_examples()["forge-scheduler/README.md#0"])
    node = await ex.forge_node(modules=["doc_crons"], config={"node": {"roles": ["scheduler"]}})
    scope = await ex.run(node=node)
    assert [c.name for c in await scope["crons"].list()] == ["every_ten_seconds", "morning_digest"]


@runs("forge-worker/README.md#0")
async def _job_definitions(ex: Ex) -> None:
    registry = _registry_checked(ex.module("doc_worker_jobs"))
    assert registry.get("send_email").options["concurrency"] == 4 and registry.get("signup").kind == "mutation"


@runs("forge-worker/README.md#1")
async def _enqueue_from_python(ex: Ex) -> None:
    jobs = ex.module("doc_worker_jobs", markdown_examples()["forge-worker/README.md#0"])
    pool = await ex.pool()
    try:
        scope = await ex.run(pool=pool, send_email=jobs.send_email, addresses=["a@example.com", "b@example.com"])
        assert len(scope["ids"]) == 2
        rows = await pool.fetch("SELECT name, queue, status FROM forge_jobs ORDER BY id")
        assert [tuple(r) for r in rows] == [("send_email", "mail", "pending"), ("send_email", "mail", "scheduled")] + \
            [("send_email", "mail", "pending")] * 2
    finally:
        await pool.close()


@runs("forge-worker/README.md#2")
async def _workflow_definitions(ex: Ex) -> None:
    registry = _registry_checked(ex.module("doc_workflows"))
    checkout = registry.get("checkout")
    assert checkout.kind == "workflow" and checkout.options["version"] == "2" and checkout.options["concurrency"] == 20
    assert registry.get("place_order").kind == "mutation"


# --- docstrings ------------------------------------------------------------------------------
@runs("forge_worker.queue.JobQueue#0")
async def _job_queue_docstring(ex: Ex) -> None:
    from forge_worker import JobQueue

    jobs = ex.module("doc_send_email", "from forge_kernel import job\n\n"
                                       "@job\nasync def send_email(ctx, to: str) -> None: ...\n")
    pool = await ex.pool()
    try:
        scope = await ex.run(pool=pool, JobQueue=JobQueue, send_email=jobs.send_email)
        assert scope["job_id"] > 0 and len(scope["ids"]) == 5000
        delayed = await pool.fetchrow("SELECT status, args FROM forge_jobs WHERE id = $1", scope["job_id"])
        assert delayed["status"] == "scheduled" and delayed["args"] == '{"to": "a@example.com"}'
    finally:
        await pool.close()


@runs("forge_kernel.testing.contracts#0")
async def _contracts_docstring(ex: Ex) -> None:
    hooks = ex.module("doc_plugin_hooks", textwrap.dedent('''
        import attrs
        from forge_kernel import hookimpl
        from forge_kernel.migrations import Migration

        @attrs.frozen
        class DocPluginConfig:
            greeting: str = "hi"

        @hookimpl
        def forge_config_sections():
            return {"docplugin": DocPluginConfig}

        @hookimpl
        def forge_migrations():
            return [Migration("docplugin", 1, "things", "CREATE TABLE docplugin_things (id int PRIMARY KEY)")]
        '''))
    scope = {"my_plugin": types.SimpleNamespace(hooks=hooks)}
    exec(compile(ex.code, "<contracts example>", "exec"), scope)
    tests = {name: fn for name, fn in scope.items() if name.startswith("test_")}
    assert set(tests) == {"test_config_round_trip", "test_migrations", "test_loader_isolation"}
    tests["test_config_round_trip"]()
    tests["test_loader_isolation"]()
    await tests["test_migrations"](ex.db_url)


# --- the tests -------------------------------------------------------------------------------
def test_every_example_has_a_runner():
    found = set(all_examples())
    assert not found - set(RUNNERS), f"examples nobody runs (add a runner here): {sorted(found - set(RUNNERS))}"
    assert not set(RUNNERS) - found, f"runners of examples that are gone: {sorted(set(RUNNERS) - found)}"


@pytest.mark.parametrize("key", sorted(RUNNERS))
async def test_example_runs(key, forge_node, forge_db_url, tmp_path, monkeypatch):
    ex = Ex(all_examples()[key], forge_node, forge_db_url, tmp_path, monkeypatch)
    try:
        await RUNNERS[key](ex)
    finally:
        ex.cleanup()
