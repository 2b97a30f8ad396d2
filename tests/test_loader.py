"""Plugin discovery and loading: isolation of broken plugins, required roles, switches, CLI."""

import json
import subprocess
import sys
import textwrap

import pytest

from forge_kernel.errors import StartupError
from forge_kernel.plugins import PluginLoader

GOOD = """
import attrs
from forge_kernel import hookimpl

@attrs.frozen
class Section:
    greeting: str = "hi"

@hookimpl
def forge_roles():
    return ["{role}"]

@hookimpl
def forge_config_sections():
    return {{"{section}": Section}}
"""


def make_dist(root, dist, module, source, version="1.0"):
    """Write an installed distribution (dist-info with a forge.plugins entry point) under root."""
    sys.modules.pop(module, None)  # each test gets its own version of the module
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[forge.plugins]\n{module} = {module}\n")


@pytest.fixture
def site(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def infos(loader):
    return {i.name: i for i in loader.infos}


def test_good_plugin_loads_with_roles_sections_hooks(site):
    make_dist(site, "good-plugin", "good_plug", GOOD.format(role="greeter", section="greet"))
    loader = PluginLoader(env={}).load()
    info = infos(loader)["good_plug"]
    assert info.status == "loaded"
    assert (info.distribution, info.version) == ("good-plugin", "1.0")
    assert info.roles == ["greeter"] and info.sections == ["greet"]
    assert info.hooks == ["forge_config_sections", "forge_roles"]
    assert "greeter" in loader.resolve_roles([])


@pytest.mark.parametrize("source, error", [
    ("raise RuntimeError('boom at import')", "import failed: RuntimeError: boom at import"),
    ("from forge_kernel import hookimpl\n@hookimpl\ndef forge_roles(unknown_arg):\n    return []\n", "PluginValidationError"),
    ("from forge_kernel import hookimpl\n@hookimpl\ndef forge_not_a_hook():\n    pass\n", "unknown hook 'forge_not_a_hook'"),
    ("from forge_kernel import hookimpl\n@hookimpl\ndef forge_roles():\n    return ['ok']\n@hookimpl\ndef forge_config_sections():\n    raise ValueError('bad section')\n", "ValueError: bad section"),
    ("from forge_kernel import hookimpl\n@hookimpl\ndef forge_config_sections():\n    return {'node': dict}\n", "must be an attrs class"),
])
def test_broken_optional_plugin_is_reported_and_skipped(site, source, error):
    make_dist(site, "broken-plugin", "broken_plug", source, version="0.3")
    make_dist(site, "good-plugin", "good_plug", GOOD.format(role="greeter", section="greet"))
    loader = PluginLoader(env={}).load()
    broken = infos(loader)["broken_plug"]
    assert broken.status == "failed"
    assert (broken.distribution, broken.version) == ("broken-plugin", "0.3")
    assert error in broken.error
    # never half-registered: none of its hooks are callable
    assert loader.pm.get_plugin("broken_plug") is None
    assert all(impl.plugin_name != "broken_plug" for impl in loader.hook.forge_roles.get_hookimpls())
    assert infos(loader)["good_plug"].status == "loaded"
    roles = loader.resolve_roles([])  # installed role packages may add their own roles
    assert "greeter" in roles and "ok" not in roles


def test_second_plugin_claiming_a_section_fails(site):
    make_dist(site, "a-plugin", "a_plug", GOOD.format(role="a", section="shared"))
    make_dist(site, "b-plugin", "b_plug", GOOD.format(role="b", section="shared"))
    loader = PluginLoader(env={}).load()
    assert infos(loader)["a_plug"].status == "loaded"
    assert "already owned by a-plugin" in infos(loader)["b_plug"].error


def test_broken_plugin_providing_a_needed_role_stops_startup(site):
    make_dist(site, "forge-worker", "fake_worker", "raise ImportError('no module named nothere')", version="9.9")
    loader = PluginLoader(env={}).load()
    with pytest.raises(StartupError, match=r"fake_worker \(forge-worker 9.9\) .*failed to load.*nothere"):
        loader.resolve_roles([])
    with pytest.raises(StartupError, match="roles asks for 'worker'.*forge-worker 9.9"):
        loader.resolve_roles(["worker"])


def test_missing_role_names_the_package_to_install(site):
    loader = PluginLoader(env={"FORGE_DISABLE_PLUGIN_AUTOLOAD": "1"}).load()
    with pytest.raises(StartupError, match=r"install forge-scheduler \(pip install forge-scheduler\)"):
        loader.resolve_roles(["scheduler"])
    with pytest.raises(StartupError, match="no known package provides it"):
        loader.resolve_roles(["teleport"])


def test_disable_switches(site):
    make_dist(site, "good-plugin", "good_plug", GOOD.format(role="greeter", section="greet"))
    loader = PluginLoader(env={"FORGE_DISABLE_PLUGINS": "good-plugin"}).load()
    assert infos(loader)["good_plug"].status == "disabled"
    assert loader.pm.get_plugin("good_plug") is None
    loader = PluginLoader(env={"FORGE_DISABLE_PLUGIN_AUTOLOAD": "1"}).load()
    assert "good_plug" not in infos(loader)
    # explicit plugins still load without autoload
    loader = PluginLoader(env={"FORGE_DISABLE_PLUGIN_AUTOLOAD": "1", "FORGE_PLUGINS": "good_plug"}).load()
    assert infos(loader)["good_plug"].status == "loaded"


def test_cli_plugins_json_lists_found_loaded_failed(site):
    make_dist(site, "good-plugin", "good_plug", GOOD.format(role="greeter", section="greet"))
    make_dist(site, "broken-plugin", "broken_plug", "raise RuntimeError('boom')", version="0.3")
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "forge_kernel.cli", "plugins", "--json"], env=env,
                         capture_output=True, text=True, timeout=60, check=True)
    data = json.loads(out.stdout)
    by = {p["name"]: p for p in data["plugins"]}
    assert by["good_plug"]["status"] == "loaded" and by["good_plug"]["roles"] == ["greeter"]
    assert by["broken_plug"]["status"] == "failed" and "boom" in by["broken_plug"]["error"]
    assert by["broken_plug"]["distribution"] == "broken-plugin" and by["broken_plug"]["version"] == "0.3"
    assert data["roles"]["greeter"] == "good-plugin"
    text = subprocess.run([sys.executable, "-m", "forge_kernel.cli", "plugins"], env=env,
                          capture_output=True, text=True, timeout=60, check=True).stdout
    assert "broken_plug" in text and "failed" in text and "greeter" in text
