"""The kernel's plugin contracts, run against forge-scheduler; and the no-cross-imports rule."""

import ast
from pathlib import Path

import forge_scheduler
from forge_kernel.testing import contracts
from forge_scheduler import hooks

PACKAGE = Path(forge_scheduler.__file__).parent
OTHER_PLUGINS = ("forge_worker", "forge_gateway", "forge_realtime", "forge_observe", "forge_mesh", "forge_codegen")


def test_config_round_trip():
    contracts.check_config_round_trip(hooks)


def test_loader_isolation():
    contracts.check_loader_isolation(hooks, name="scheduler")


async def test_migrations_idempotent_and_concurrent(forge_db_url):
    await contracts.check_migrations_idempotent(hooks, forge_db_url)
    await contracts.check_concurrent_migrations(hooks, forge_db_url)


def test_never_imports_another_plugin():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in OTHER_PLUGINS]
    assert offenders == []
