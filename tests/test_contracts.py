"""The hook contracts of forge_kernel.testing.contracts, run against every installed plugin
(the kernel, our role packages, and any third-party plugin in this environment)."""

import pytest

from forge_kernel.testing import contracts

PLUGINS = contracts.installed_plugins()
IDS = [name for name, _ in PLUGINS]


@pytest.mark.parametrize("plugin", [p for _, p in PLUGINS], ids=IDS)
def test_config_round_trip(plugin):
    contracts.check_config_round_trip(plugin)


@pytest.mark.parametrize("name, plugin", PLUGINS, ids=IDS)
def test_loader_isolation(name, plugin):
    if name == "kernel":
        pytest.skip("the kernel plugin is always registered first by the loader itself")
    contracts.check_loader_isolation(plugin, name=name)


def test_order_independence():
    contracts.check_order_independence([(n, p) for n, p in PLUGINS if n != "kernel"])


def test_service_order_random_graphs():
    contracts.check_service_order()


def test_service_order_of_the_installed_plugins():
    services = contracts.declared_services()
    assert {"worker", "scheduler", "realtime"} <= {s.role for s in services}, [s.name for s in services]
    contracts.check_service_order(services)


@pytest.mark.parametrize("plugin", [p for _, p in PLUGINS], ids=IDS)
async def test_migrations_twice_equal_once(plugin, forge_database_url):
    await contracts.check_migrations_idempotent(plugin, forge_database_url)


@pytest.mark.parametrize("plugin", [p for _, p in PLUGINS], ids=IDS)
async def test_concurrent_migrators_apply_once(plugin, forge_database_url):
    await contracts.check_concurrent_migrations(plugin, forge_database_url)


@pytest.mark.parametrize("plugin", [p for _, p in PLUGINS], ids=IDS)
async def test_admin_actions_leave_unknown_targets_alone(plugin, forge_database_url):
    await contracts.check_admin_actions(plugin, forge_database_url)


def test_admin_action_names_are_unique_across_plugins():
    from forge_kernel.admin import collect

    loader = contracts.PluginLoader().load()
    node = contracts.types.SimpleNamespace(id="n", registry=None, pool=None, config=None)
    names = set(collect(loader.hook.forge_admin_actions(node=node)))
    assert {"job.retry", "job.cancel", "job.discard", "queue.pause", "queue.resume", "cron.trigger", "cron.pause",
            "cron.resume", "node.drain", "workflow.cancel", "workflow.retry", "workflow.send_event"} <= names, sorted(names)


async def test_workflow_engine_starts_exactly_on_commit(forge_database_url):
    engines = [(n, p) for n, p in PLUGINS if hasattr(p, "forge_workflow_engine")]
    assert engines, "no installed plugin provides forge_workflow_engine"
    for _, plugin in engines:
        await contracts.check_workflow_engine(plugin, forge_database_url)


@pytest.mark.parametrize("plugin", [p for _, p in PLUGINS], ids=IDS)
def test_call_forwarder_wants_is_pure(plugin):
    contracts.check_call_forwarder_wants(plugin)


@pytest.mark.parametrize("plugin", [p for _, p in PLUGINS], ids=IDS)
async def test_call_ledger_matches_its_model(plugin, forge_database_url):
    await contracts.check_call_ledger(plugin, forge_database_url)


async def test_rate_limiter_hook_contract(forge_node):
    """The gateway's ``forge_rate_limiter`` object, on a live node (no HTTP server: role function only)."""
    node = await forge_node(modules=[], config={"node": {"roles": ["function"]},
                                                "gateway": {"rate_limit_lease": 0.5}})
    limiter = node.loader.hook.forge_rate_limiter(node=node)
    assert limiter is not None, "no plugin implements forge_rate_limiter (is forge-gateway installed?)"
    assert limiter is node.loader.hook.forge_rate_limiter(node=node), "one limiter per node, shared by transports"
    await contracts.check_rate_limiter(limiter)


async def test_registry_reloads_and_dev_notices(forge_node):
    """forge_registry_reloaded and forge_dev_notice, against every installed plugin on a running node
    (gateway, realtime, ...)."""
    from forge_kernel.testing.procs import free_port

    node = await forge_node(modules=[], config={"gateway": {"port": free_port()}})
    await contracts.check_registry_reloads(node)
    await contracts.check_dev_notices(node)
